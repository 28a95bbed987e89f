"""AVSBench data: layout readers, audio features, boxes, synthetic data, shards and loaders.

The reading API for packed shards:

    from avs_dist.data import iter_videos
    for video in iter_videos("shards/s4", "test"):
        video["frames"]  # uint8 [5, H, W, 3]

See avs_dist/data/shards.py for the full description of each field.
"""
from avs_dist.data.classes import S4_CLASSES, class_index  # noqa: F401


def __getattr__(name):
    # Lazy so that importing avs_dist.data does not pull in webdataset for layout-only users.
    if name in ("iter_videos", "read_manifest", "verify_shards", "check_shards"):
        from avs_dist.data import shards
        return getattr(shards, name)
    raise AttributeError(name)
