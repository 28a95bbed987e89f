"""Validator: validation when it is due, the best checkpoint by val mIoU, the final test evaluation.

Every rank evaluates its share of the split (data/loader.py eval_loader) with the
rank-averaged BatchNorm statistics; the metrics are gathered, so every rank gets the same
result (evaluation.py). Evaluation runs under preserved_rng: when and how often it runs does
not change the training that follows.
"""
from __future__ import annotations

from avs_dist import distributed
from avs_dist.provenance import final_source
from avs_dist.train.state import preserved_rng


class Validator:
    def __init__(self, cfg, d, strategy, checkpointer, log, splits: dict):
        self.cfg, self.d, self.strategy, self.checkpointer, self.log = cfg, d, strategy, checkpointer, log
        self.splits = splits

    def due(self, step: int, batches) -> bool:
        """At the end of every train.eval_every_epochs-th epoch, and every train.eval_every_steps steps."""
        t = self.cfg.train
        at_epoch = batches.epoch_end and t.eval_every_epochs and (batches.epoch + 1) % t.eval_every_epochs == 0
        return bool(at_epoch or (t.eval_every_steps and step % t.eval_every_steps == 0))

    def _has(self, split: str) -> bool:
        return bool(self.splits.get(split, {}).get("videos"))

    def run(self, state, epoch: int, defer: bool = False) -> None:
        """Validate the step just taken (of `epoch`), log, and replace checkpoints/best/ on a new
        best val mIoU (TrainState keeps the record). defer=True (a stop is being saved) only
        records that it is due: the resumed run validates first (run_deferred)."""
        if defer:
            state.defer_validation(epoch)
            return
        if not self._has("val"):
            self.log.warn("the shard set has no val videos: no validation, no best checkpoint")
            return
        with distributed.averaged_buffers(self.strategy.module, self.d):
            result = self.evaluate("val", audio_gap=False)
            self.log.log_eval(state.step, result, "val")
            if state.record_validation(result):
                self.checkpointer.save_best(state.step, epoch, {"val": result})

    def run_deferred(self, state) -> None:
        if state.pending_epoch is not None:
            self.run(state, state.pending_epoch)

    def evaluate(self, split: str, audio_gap: bool) -> dict:
        from avs_dist.data.loader import eval_loader
        from avs_dist.evaluation import evaluate
        from avs_dist.precision import resolve_precision

        cfg, d = self.cfg, self.d
        with preserved_rng():
            model = self.strategy.eval_model()
            loader = eval_loader(cfg.data.shards, split, cfg.data, d.rank, d.world_size, device=d.device, crops=False)
            result = evaluate(model, loader, d.device, cfg.data.eval_batch_videos, audio_gap,
                              precision=resolve_precision(cfg.train.precision, d.device), group=d.control)
        self.strategy.module.train()
        return result

    def final(self, step: int) -> dict:
        """{"test": metrics with the audio gap (train.audio_gap_eval)} at the end of a run."""
        if not self._has("test"):
            self.log.warn("the shard set has no test videos: no final test evaluation")
            return {}
        with distributed.averaged_buffers(self.strategy.module, self.d):
            result = self.evaluate("test", audio_gap=self.cfg.train.audio_gap_eval)
        self.log.log_eval(step, result, "test", source=final_source(step, None))
        return {"test": result}
