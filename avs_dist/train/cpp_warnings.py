"""Dropping one known C++ warning that Python's `warnings` filters cannot reach.

torch's C++ code warns through its own handler, straight to file descriptor 2, wherever no
Python frame catches it (e.g. DDP's reducer called from `DistributedDataParallel.forward`).
The only place to drop such a line is the descriptor itself, around the call that emits it.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile

# DDP with find_unused_parameters=True, once per process, when the forward used every parameter.
DDP_ALL_USED = "find_unused_parameters=True was specified in DDP constructor, but did not find any unused"


@contextlib.contextmanager
def drop_stderr_lines(marker: str):
    """Run the block with fd 2 going to a temporary file; then write every line of it that does
    not contain `marker` to the real stderr (also when the block raises). Other threads' output
    to stderr during the block is delayed to its end, not lost."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().splitlines(keepends=True) if marker.encode() not in line]
            if kept:
                os.write(2, b"".join(kept))
