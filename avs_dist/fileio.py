"""Small file helpers shared by the shard packer and the checkpoint writer: both publish
atomically (temp name, fsync, rename, fsync the folder) and record sha256 digests."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json(path: str | Path, data, indent: int = 2) -> None:
    """`data` as JSON at `path` (folders created), written atomically (write_text_atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=indent, default=str) + "\n")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace `path` with `text` all at once: a reader sees the old file or the whole new one.
    The temp name is `path` + ".tmp" (cleaners of half-written output look for it)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
