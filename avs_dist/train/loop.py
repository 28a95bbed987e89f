"""The training loop.

A step is one optimizer step on one global batch (data/loader.py). After every step, in
this order: the stop request is agreed over the ranks, the step is logged (flushed to
metrics.jsonl when a validation or checkpoint follows), validation runs when due (and
updates checkpoints/best/), a checkpoint is written when due or when stopping. A
checkpoint therefore follows every action of its step, and resuming from it replays
nothing: a resumed fp32 CPU run logs bit-identical losses to an uninterrupted one.
"""
from __future__ import annotations

import time

from avs_dist.train.step import train_step


def train(s, stop) -> str:
    """Train session `s` (train/session.py) until its last step or an agreed stop request
    (train/stop.py). Returns "completed" or "stopped"; every rank calls it."""
    state, log = s.state, s.log
    s.strategy.module.train()
    s.validator.run_deferred(state)  # a stop came when validation was due

    while state.step < s.total_steps:
        t0 = time.perf_counter()
        batches = s.data.next_step()  # this rank's micro-batches of the next global batch
        out = train_step(s.strategy, batches.micro, s.cfg.loss)
        state.step += 1

        stopping = stop.agreed(s.d)  # one small CPU collective per step: all ranks stop together
        validate = s.validator.due(state.step, batches)
        save = s.checkpointer.due(state.step, s.total_steps, stopping)
        # flushed before a validation or checkpoint, so metrics.jsonl holds every step it covers
        log.record_step(state.step, batches, out, time.perf_counter() - t0, flush=validate or save)
        if validate:
            s.validator.run(state, batches.epoch, defer=stopping)  # a stop saves first, validates on resume
        if save:
            s.checkpointer.save(state.step, batches.epoch, state.metrics())
        if stopping:
            why = stop.reason or "asked on another rank"
            log.info(f"stop requested: checkpoint at step {state.step} written, exiting ({why})")
            return "stopped"
    return "completed"
