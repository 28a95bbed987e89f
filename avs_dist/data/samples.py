"""Random access to the samples of shard files, by key.

The train loader reads its videos in an order drawn over the whole split (data/loader.py),
so it reads samples by key instead of streaming shards front to back. A shard is an
uncompressed tar: its member headers give every file's offset and size, so a sample is a
few positioned reads. The header index is built on a shard's first use (one pass over the
512-byte headers, no data read) and kept, with a bounded number of open files, per reader
(one per loader worker; the limit on open files is per process).
"""
from __future__ import annotations

import tarfile
from collections import OrderedDict

from avs_dist.data.shards import ShardError


def _is_crop(suffix: str) -> bool:
    return suffix.startswith("crop")  # crops.npy, crop0.png .. crop4.jpg


def tar_index(path: str) -> dict[str, list[tuple[str, int, int]]]:
    """{sample key: [(suffix, data offset, size)]} of a tar file, from its headers only.

    Raises ShardError naming the file if it is not a readable tar (e.g. truncated)."""
    index: dict[str, list[tuple[str, int, int]]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            while (info := tar.next()) is not None:
                if info.isreg():
                    key, _, suffix = info.name.partition(".")
                    index.setdefault(key, []).append((suffix, info.offset_data, info.size))
                tar.members = []  # the index above is all we keep
    except (tarfile.TarError, OSError) as e:
        raise ShardError(f"{path}: unreadable shard ({e})") from None
    return index


class SampleReader:
    """Reads raw samples ({suffix: bytes, "__key__", "__url__"}) by (shard path, key).

    crops=False leaves the crop members unread. At most `max_open` files stay open."""

    def __init__(self, crops: bool = True, max_open: int = 128):
        self.crops = crops
        self.max_open = max_open
        self._index: dict[str, dict] = {}
        self._files: OrderedDict[str, object] = OrderedDict()

    def _file(self, path: str):
        f = self._files.pop(path, None)
        if f is None:
            try:
                f = open(path, "rb")
            except OSError as e:
                raise ShardError(f"{path}: cannot open shard ({e})") from None
            if len(self._files) >= self.max_open:
                self._files.popitem(last=False)[1].close()
        self._files[path] = f
        return f

    def read(self, path: str, key: str) -> dict:
        index = self._index.get(path)
        if index is None:
            index = self._index[path] = tar_index(path)
        members = index.get(key)
        if members is None:
            raise ShardError(f"{path}: has no sample {key!r}, which the manifest lists in it")
        f = self._file(path)
        raw = {"__key__": key, "__url__": path}
        for suffix, offset, size in members:
            if not self.crops and _is_crop(suffix):
                continue
            f.seek(offset)
            data = f.read(size)
            if len(data) != size:
                raise ShardError(f"{path}: sample {key!r} is cut short ({suffix}: {len(data)} of {size} bytes)")
            raw[suffix] = data
        return raw

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
