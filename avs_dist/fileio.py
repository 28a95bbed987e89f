"""Small file helpers shared by the shard packer and the checkpoint writer: both publish
atomically (temp name, fsync, rename, fsync the folder) and record sha256 digests."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

# A full disk or quota: what a writer reports as "no space" (with the sizes).
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


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


def read_json_dict(path: str | Path) -> dict:
    """The JSON object in `path`, or {} when the file is missing, unreadable, cut short or not
    an object: for status and result files a run may not have written (yet)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


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


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as df -H and file managers print them)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def folder_bytes(path: str | Path) -> int:
    """Bytes of every file below `path` (the file itself when it is one)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind `exc`: itself, or one in its __cause__ / __context__ chain (torch.save
    to a file object raises a RuntimeError whose context is the OSError of the failed write)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def free_bytes(path: str | Path) -> int | None:
    """Free bytes (for this user) on the filesystem of `path` or its nearest existing parent."""
    path = Path(path).absolute()
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def describe_write_failure(path: str | Path, exc: BaseException, need: int | None = None) -> str:
    """One line on why writing `path` failed, for an error message: "writing P failed: no space
    left on device (it needs ~95.0 MB, 1.2 MB free there)" when the disk or quota is full (also
    when only the C++ writer's `basic_ios::clear: iostream error` says so but `need` exceeds what
    is free), else the OS's reason or the exception. Remove a partial file first, so that the
    free space reported is what the whole file would have had."""
    path = Path(path)
    free = free_bytes(path.parent)
    os_err = os_error_in(exc)
    sizes = f"it needs ~{human_bytes(need)}, " if need else ""
    sizes += f"{human_bytes(free)} free without it" if free is not None else "free space unknown"
    if os_err is not None and os_err.errno in NO_SPACE:
        return f"writing {path} failed: {os.strerror(os_err.errno).lower()} ({sizes})"
    if os_err is None and need is not None and free is not None and need > free:
        return f"writing {path} failed: no space left on device ({sizes}; the writer said: {exc})"
    if os_err is not None:
        return f"writing {path} failed: {os_err.strerror or os_err} ({sizes})"
    return f"writing {path} failed: {type(exc).__name__}: {exc} ({sizes})"
