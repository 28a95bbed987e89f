"""One rank of a training run: `torchrun ... -m avs_dist.launch.rank --config ... --shards ... --run-dir ...`
(also `python -m avs_dist.train`, `torchrun launch/train.py`, and what `avs-dist train` starts).

RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT come from the environment as
torchrun sets them; without them the process is a world of one. Exit codes: 0 when the run
completed or was stopped after saving its checkpoint (status.json says which), 1 on an
error, 2 for a bad command line, config or shard set, or a run directory another run owns
(train/runlock.py). The process ends with os._exit after
the process group is gone (distributed.hard_exit).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from avs_dist import distributed
from avs_dist.launch.args import check_run, resolve_config, run_parser
from avs_dist.launch.signals import install_stop_signals, watch_launcher


def main(argv: list[str] | None = None, lock_held: bool = False) -> int:
    """`lock_held`: the caller (avs-dist train, in this process) owns the run directory."""
    from avs_dist.config import ConfigError
    from avs_dist.data.shards import ShardError
    from avs_dist.errors import UserError

    p = argparse.ArgumentParser(prog="python -m avs_dist.launch.rank", parents=[run_parser()],
                                description="one rank of a training run (torchrun sets the environment)")
    args = p.parse_intermixed_args(argv)
    try:
        cfg = resolve_config(args)
        import torch

        resume = "auto" if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 else args.resume
        check_run(cfg, int(os.environ.get("WORLD_SIZE", "1")), torch.cuda.is_available(), sha256=args.check_sha256,
                  run_dir=args.run_dir, resume=resume)
    except (ConfigError, ShardError) as e:
        print(f"{'config' if isinstance(e, ConfigError) else 'shard'} error: {e}", file=sys.stderr)
        distributed.hard_exit(2)
    except UserError as e:  # e.g. --resume naming a folder that is not there
        print(f"error: {e}", file=sys.stderr)
        distributed.hard_exit(2)

    from avs_dist.train.checkpoint import CheckpointSaveError, NonFiniteError
    from avs_dist.train.loop import train
    from avs_dist.train.runlock import RunDirBusy
    from avs_dist.train.session import Session
    from avs_dist.train.stop import LAUNCHER_ENV, StopRequest, stop_file

    stop = StopRequest(stop_file(args.run_dir))
    install_stop_signals(stop)
    watch_launcher(stop)
    # under `avs-dist train` the launcher owns the run directory; otherwise rank 0 takes it
    lock_wait_s = None if lock_held or LAUNCHER_ENV in os.environ else 0.0
    rc = 0
    try:
        with Session.open(cfg, args.run_dir, resume, lock_wait_s=lock_wait_s, stop=stop) as session:
            session.finish(train(session, stop), stop)
    except RunDirBusy as e:  # every rank raises rank 0's message
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        rc = 2
    except NonFiniteError as e:  # likewise
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        rc = 1
    except distributed.RendezvousError as e:  # each rank's own: the ranks it saw differ
        print(f"error: {e}", file=sys.stderr)
        rc = 1
    except CheckpointSaveError as e:  # every rank raises it; the message says it all
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"checkpoint error: {e}", file=sys.stderr, flush=True)
        rc = 1
    except UserError as e:  # a bad input found only once the run opened (every rank): its one line, no traceback
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{'config ' if isinstance(e, ConfigError) else ''}error: {e}", file=sys.stderr, flush=True)
        rc = 2
    except Exception:
        traceback.print_exc()
        rc = 1
    distributed.hard_exit(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
