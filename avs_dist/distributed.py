"""Process-group setup, rank helpers and a process exit that survives gloo's shutdown race.

One process per rank, configured the torchrun way (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT). A process started without those variables becomes a world of
one so that the single-process path runs the same collectives as the multi-process one;
a world of one needs no rendezvous host and ignores MASTER_ADDR / MASTER_PORT (`avs-dist
train --nproc N>1` ignores them too: its torchrun meets on 127.0.0.1). The wait for the
other ranks is bounded by train.rendezvous_timeout_s and ends on a stop signal (`rendezvous`).

Besides the main group (nccl on GPU, gloo on CPU) every rank joins a second gloo group
for control messages (the stop flag, object gathers): they then never touch the GPU
stream and never wait behind queued NCCL kernels.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    control: object  # gloo ProcessGroup for CPU-side control collectives

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_rank() -> tuple[int, int, int]:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


class RendezvousError(RuntimeError):
    """The wait before training (store, the other ranks) timed out or was stopped: one line
    naming what it waited for (host, port, ranks present of the world size)."""


def setup(strategy: str = "ddp", timeout_s: float = 600.0, rendezvous_timeout_s: float = 300.0,
          stopped=lambda: None) -> Dist:
    """Join (or create) the default process group and the gloo control group.

    A world of one needs no rendezvous: it uses an in-process store, and stale MASTER_ADDR /
    MASTER_PORT variables in the environment are replaced (DeepSpeed reads them). A larger
    world meets at MASTER_ADDR:MASTER_PORT (`rendezvous`): at most `rendezvous_timeout_s`
    seconds (train.rendezvous_timeout_s), and `stopped()` (a stop signal's reason, or None)
    is polled while it waits. `timeout_s`: every collective's timeout afterwards.
    RendezvousError when the wait fails."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        if int(os.environ.get("WORLD_SIZE", "1")) != 1:
            raise RendezvousError("WORLD_SIZE > 1 needs RANK too (start ranks with torchrun or `avs-dist train --nproc N`)")
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    rank, world, local = env_rank()
    if world == 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "nccl" if cuda else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        store = dist.HashStore() if world == 1 else rendezvous(rank, world, rendezvous_timeout_s, stopped)
        store.set_timeout(timeout)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout,
                                device_id=device if cuda else None)
    if strategy.startswith("zero"):
        import_deepspeed()
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)  # adopts the group above
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    return Dist(rank, world, local, device, backend, control)


CONNECT_TRY_S = 2.0  # one connection attempt to the store; the stop and the deadline are checked between them
ARRIVAL_POLL_S = 0.2


def rendezvous(rank: int, world: int, timeout_s: float, stopped=lambda: None):
    """The store of this attempt once all `world` ranks have reached it (module docstring of
    `_store`). Every wait is bounded by `timeout_s` and polls `stopped()`; RendezvousError
    names MASTER_ADDR:MASTER_PORT and the ranks present."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        raise RendezvousError(f"rank {rank} of {world}: MASTER_ADDR and MASTER_PORT must be set (torchrun and "
                              "avs-dist submit set them)")
    where = f"MASTER_ADDR:MASTER_PORT={host}:{port} (rank {rank} of {world})"
    try:
        socket.getaddrinfo(host, int(port))
    except (socket.gaierror, ValueError) as e:
        raise RendezvousError(f"rendezvous at {where}: the host does not resolve ({e}); a stale MASTER_ADDR in "
                              "the environment? (a world of one needs none)") from None
    deadline = time.monotonic() + timeout_s

    def check(what: str, present) -> None:
        why = stopped()
        if why is None and time.monotonic() < deadline:
            return
        cause = f"stopped ({why})" if why else f"timed out after {timeout_s:.0f} s (train.rendezvous_timeout_s)"
        raise RendezvousError(f"rendezvous at {where} {cause} while waiting for {what}; ranks present: {present()}")

    store, error = None, None
    hosted_here = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    while store is None:
        check("the store", lambda: f"unknown ({error})")
        try:
            if not hosted_here:  # a plain connect first: the store's client logs every failed try
                socket.create_connection((host, int(port)), timeout=CONNECT_TRY_S).close()
            store = _store(rank, world, datetime.timedelta(seconds=min(CONNECT_TRY_S, timeout_s)))
        except OSError as e:
            error = f"{e.strerror or e}"
            time.sleep(ARRIVAL_POLL_S)
        except RuntimeError as e:  # DistNetworkError and DistStoreError are RuntimeErrors
            error = str(e).splitlines()[0][:200]
    store.set(f"arrived/{rank}", "1")
    arrived = store.add("arrived", 1)
    while arrived < world:
        check(f"{world - arrived} more rank(s)",
              lambda: f"{arrived} of {world} {[r for r in range(world) if store.check([f'arrived/{r}'])]}")
        time.sleep(ARRIVAL_POLL_S)
        arrived = store.add("arrived", 0)
    return store


def _store(rank: int, world: int, timeout: datetime.timedelta):
    """The rendezvous store, with a key prefix per torchrun attempt.

    After a worker failure torchrun restarts every rank against the agent's store, which
    still holds the previous attempt's keys; gloo then read a dead rank's address from them
    (a flaky "connectFullMesh ... Connection refused" on restart). A prefix per attempt
    keeps each attempt's keys apart. As with env://, the agent hosts the store when it says
    so (TORCHELASTIC_USE_AGENT_STORE), otherwise rank 0 does.
    """
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    # wait_for_workers=False: the ranks' arrival is counted by `rendezvous`, which can be stopped
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                         is_master=rank == 0 and not agent, timeout=timeout, multi_tenant=True,
                         wait_for_workers=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return dist.PrefixStore(f"avs-dist/{run_id}/attempt{attempt}", base)


def import_deepspeed():
    """Import DeepSpeed with the CPU accelerator when there is no GPU, and without its log noise."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import logging
    import warnings

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


def barrier(d: Dist) -> None:
    dist.barrier(group=d.control)


def any_flag(d: Dist, flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (MAX over the gloo control group)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=d.control)
    return bool(t.item())


def gather_objects(d: Dist, obj) -> list | None:
    """Every rank's `obj` on rank 0 (None elsewhere), over the control group."""
    out = [None] * d.world_size if d.is_main else None
    dist.gather_object(obj, out, dst=0, group=d.control)
    return out


def broadcast_object(d: Dist, obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=d.control)
    return box[0]


def on_main(d: Dist, fn):
    """fn() on rank 0 only; its result on every rank. If it raises, every rank raises (rank 0
    the exception itself, the others a RuntimeError with its message): no rank is left
    waiting in a collective for a rank 0 that failed."""
    outcome = None
    if d.is_main:
        try:
            outcome = ("ok", fn())
        except Exception as e:
            broadcast_object(d, ("error", f"{type(e).__name__}: {e}"))
            raise
    kind, value = broadcast_object(d, outcome)
    if kind == "error":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


@torch.no_grad()
def average_buffers(module: torch.nn.Module, d: Dist) -> None:
    """Average floating-point buffers (BatchNorm running stats) so that every rank agrees.

    DDP here runs with broadcast_buffers=False and DeepSpeed never syncs buffers, so each
    rank's BN statistics follow its own batches; for evaluation and checkpoints they are
    averaged (see averaged_buffers), which also uses every rank's data instead of rank 0's
    only. Integer buffers (num_batches_tracked) are equal on every rank already.
    """
    if d.world_size == 1:
        return
    bufs = [b for b in module.buffers() if b.is_floating_point()]
    if not bufs:
        return
    flat = torch.cat([b.detach().reshape(-1).float() for b in bufs])
    dist.all_reduce(flat)
    flat /= d.world_size
    offset = 0
    for b in bufs:
        n = b.numel()
        b.copy_(flat[offset:offset + n].view_as(b).to(b.dtype))
        offset += n


@contextlib.contextmanager
def averaged_buffers(module: torch.nn.Module, d: Dist):
    """Rank-averaged buffers inside the block (evaluation, checkpoint contents), each rank's
    own afterwards.

    Training keeps per-rank running statistics: the running mean is linear in the batch
    statistics, so averaging only when they are read equals averaging at every step, and the
    training state does not depend on when checkpoints or evaluations happened (a resumed run
    stays bit-identical to an uninterrupted one).
    """
    if d.world_size == 1:  # nothing to average, nothing to restore
        yield
        return
    bufs = [b for b in module.buffers() if b.is_floating_point()]
    saved = [b.detach().clone() for b in bufs]
    average_buffers(module, d)
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(bufs, saved):
                b.copy_(s)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # a peer already gone; nothing left to release
            print(f"destroy_process_group: {e}", file=sys.stderr)


def hard_exit(rc: int) -> None:
    """Leave without interpreter finalization.

    A gloo worker thread can free a finished work object while Python finalizes and abort
    the process ("terminate called without an active exception", ~3% of runs; pytorch#190489). Flushing and `os._exit` after the process group is gone avoids it.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(rc)
