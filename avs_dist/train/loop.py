"""The training loop.

A step is one optimizer step on one global batch (data/loader.py). After every step, in
this order: the stop request is agreed over the ranks, the step is logged (flushed to
metrics.jsonl when a validation or checkpoint follows), validation runs when due (and
updates checkpoints/best/), a checkpoint is written when due or when stopping. A
checkpoint therefore follows every action of its step, and resuming from it replays
nothing: a resumed fp32 CPU run logs bit-identical losses to an uninterrupted one.

A step whose gradient is NaN/inf is skipped by the strategy (no update) and counted; more
than train.max_nonfinite_steps of them in a row stop the run: status "failed", and
NonFiniteError names the step, the terms and the last finite checkpoint.
"""
from __future__ import annotations

import math
import time

from avs_dist import distributed
from avs_dist.train.checkpoint import NonFiniteError, latest_valid, resume_hint
from avs_dist.train.step import train_step
from avs_dist.train.strategy import NONFINITE


def train(s, stop) -> str:
    """Train session `s` (train/session.py) until its last step or an agreed stop request
    (train/stop.py). Returns "completed" or "stopped"; every rank calls it. NonFiniteError
    (non-finite steps past the limit, or weights that cannot be saved) after status.json
    says "failed" with its message."""
    try:
        return _train(s, stop)
    except NonFiniteError as e:
        s.fail(str(e))
        raise


def _train(s, stop) -> str:
    state, log = s.state, s.log
    s.strategy.module.train()
    s.validator.run_deferred(state)  # a stop came when validation was due

    in_a_row = 0  # non-finite steps skipped in a row (the same on every rank: train/strategy.py)
    while state.step < s.total_steps:
        t0 = time.perf_counter()
        batches = s.data.next_step()  # this rank's micro-batches of the next global batch
        out = train_step(s.strategy, batches.micro, s.cfg.loss)
        state.step += 1
        in_a_row = in_a_row + 1 if out.skipped == NONFINITE else 0
        state.nonfinite_steps += out.skipped == NONFINITE

        stopping = stop.agreed(s.d)  # one small CPU collective per step: all ranks stop together
        validate = s.validator.due(state.step, batches)
        save = s.checkpointer.due(state.step, s.total_steps, stopping)
        # flushed before a validation or checkpoint, so metrics.jsonl holds every step it covers
        log.record_step(state.step, batches, out, time.perf_counter() - t0, flush=validate or save or in_a_row > 0,
                        nonfinite_steps=state.nonfinite_steps)
        if in_a_row > s.cfg.train.max_nonfinite_steps:
            _fail_nonfinite(s, out, in_a_row)
        if validate:
            s.validator.run(state, batches.epoch, defer=stopping)  # a stop saves first, validates on resume
        if save:
            s.checkpointer.save(state.step, batches.epoch, state.metrics())
        if stopping:
            why = stop.reason or "asked on another rank"
            log.info(f"stop requested: checkpoint at step {state.step} written, exiting ({why})")
            return "stopped"
    return "completed"


def _fail_nonfinite(s, out, in_a_row: int) -> None:
    """Past train.max_nonfinite_steps: NonFiniteError on every rank with rank 0's message (the
    step, the non-finite terms, the checkpoint to resume from)."""
    def message() -> str:
        values = dict(zip(out.names, out.losses.float().cpu().tolist()))
        terms = [f"{k}={v}" for k, v in values.items() if not math.isfinite(v)]
        what = (f"loss {', '.join(terms)}" if terms else
                f"gradient (grad norm {float(out.grad_norm):g}; every loss term finite on rank 0)")
        return (f"step {s.state.step}: non-finite {what}; {in_a_row} steps in a row skipped, more than "
                f"train.max_nonfinite_steps={s.cfg.train.max_nonfinite_steps}: the run stops. "
                f"{_resume_line(s.run_dir)}")

    raise NonFiniteError(distributed.on_main(s.d, message))


def _resume_line(run_dir) -> str:
    """checkpoint.resume_hint as a sentence; without a finite checkpoint the start may be the cause."""
    hint = resume_hint(run_dir)
    if latest_valid(run_dir, lambda msg: None) is None:
        hint += "; were the starting weights (model.init_from) finite?"
    return hint[:1].upper() + hint[1:]  # not str.capitalize: it would lower-case the path
