"""torchrun (torch.distributed.run) as `avs-dist train --nproc N` starts it, minus the
traceback torchrun prints when a rank fails.

A rank that stops on an error says why in one line of its own (a non-finite run, a bad shard,
a failed save) or prints its traceback (a bug); torchrun then raises ChildFailedError from its
`main` and Python prints a 30-line traceback of the launcher itself, with no more information
than "rank r exited with code c". Here that is one line, and the exit code is torchrun's.
`launch/local.py:supervise` prints the run's outcome after it (failed, and where it resumes).
Arguments are torchrun's, unchanged.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        how = f"exit code {failure.exitcode}" if failure.exitcode >= 0 else f"signal {failure.signal_name()}"
        print(f"torchrun: rank {rank} ended with {how} (its own output above says why)", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
