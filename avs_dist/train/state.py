"""Training state with one owner each, all Stateful (state_dict / load_state_dict).

- `TrainState`: the optimizer-step count and the validation record (best val mIoU, the last
  val result, an evaluation that a stop deferred). The same on every rank.
- `RankState`: what differs per rank: the python / numpy / torch (+ CUDA) RNG streams and
  the rank's own BatchNorm running statistics (distributed.averaged_buffers). Restored per
  rank when the world size is unchanged; on another world size the RNG streams are
  reseeded from (seed, rank, step) and every rank starts from the rank-averaged statistics
  of model.pt, so the run continues on the same data (data/loader.py) but not bit-identically.
"""
from __future__ import annotations

import contextlib
import math
import random
from dataclasses import asdict, dataclass, field

import numpy as np
import torch


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def preserved_rng():
    """Run a block (evaluation) without consuming the training RNG streams, so that when
    and how often it runs does not change the training that follows."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


@dataclass
class TrainState:
    """Optimizer steps taken, and the validation record kept for the best checkpoint. The
    Validator reports to it (record_validation, defer_validation); only it changes the record."""

    step: int = 0
    best_miou: float = -math.inf
    last_val: dict = field(default_factory=dict)
    # A stop came at a step whose validation was due: the epoch of that step, validated on resume.
    pending_epoch: int | None = None
    nonfinite_steps: int = 0  # steps skipped for a NaN/inf gradient, in the whole run

    @property
    def best(self) -> float | None:
        return self.best_miou if self.best_miou > -math.inf else None

    def defer_validation(self, epoch: int) -> None:
        self.pending_epoch = epoch

    def record_validation(self, result: dict) -> bool:
        """Keep a validation's result; True when its mIoU is a new best."""
        self.last_val, self.pending_epoch = result, None
        miou = result.get("miou")
        if miou is not None and miou > self.best_miou:
            self.best_miou = miou
            return True
        return False

    def metrics(self) -> dict:
        """What model.pt records of the validation so far."""
        return {"val": self.last_val, "best_val_miou": self.best}

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.best_miou = state["step"], state["best_miou"]
        self.last_val, self.pending_epoch = state["last_val"], state["pending_epoch"]
        self.nonfinite_steps = state.get("nonfinite_steps", 0)  # absent in checkpoints before it


class RankState:
    """This rank's RNG streams and BatchNorm running statistics (module docstring)."""

    def __init__(self, module: torch.nn.Module, rank: int, seed: int):
        self.module, self.rank, self.seed = module, rank, seed

    def state_dict(self) -> dict:
        buffers = {k: v.detach().cpu().clone() for k, v in self.module.named_buffers() if v.is_floating_point()}
        return {"rng": rng_state(), "buffers": buffers}

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state["rng"])
        own = dict(self.module.named_buffers())
        with torch.no_grad():
            for k, v in state["buffers"].items():
                own[k].copy_(v)

    def reseed(self, step: int, model_state: dict) -> None:
        """A rank without saved state of its own (another world size): fresh RNG streams from
        (seed, rank, step), and the rank-averaged BatchNorm statistics of `model_state` (model.pt)."""
        seed_everything(int(np.random.SeedSequence([self.seed, self.rank, step]).generate_state(1)[0]))
        own = dict(self.module.named_buffers())
        with torch.no_grad():
            for k, v in model_state.items():
                if k in own and own[k].is_floating_point():
                    own[k].copy_(v)
