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
    """Optimizer steps taken, and the validation record kept for the best checkpoint."""

    step: int = 0
    best_miou: float = -math.inf
    last_val: dict = field(default_factory=dict)
    eval_pending: bool = False  # a stop came at a step whose validation was due: run it on resume

    @property
    def best(self) -> float | None:
        return self.best_miou if self.best_miou > -math.inf else None

    def metrics(self) -> dict:
        """What model.pt records of the validation so far."""
        return {"val": self.last_val, "best_val_miou": self.best}

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.best_miou = state["step"], state["best_miou"]
        self.last_val, self.eval_pending = state["last_val"], state["eval_pending"]


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

    def reseed(self, step: int) -> None:
        """Fresh streams for a rank that has no saved state (another world size)."""
        seed_everything(int(np.random.SeedSequence([self.seed, self.rank, step]).generate_state(1)[0]))
