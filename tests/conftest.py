"""Shared fixtures: a small synthetic AVSBench download and its packed shard sets.

Session-scoped and cheap (a few seconds in all): 12 videos per subset at 64x64
(8 train / 2 val / 2 test), crops of 32x32, 4 videos per shard (several train shards).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

SYNTH_VIDEOS = 12
SYNTH_SIZE = 64
CROP_SIZE = 32
SHARD_VIDEOS = 4


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    from avs_dist.data import synth

    root = tmp_path_factory.mktemp("synth")
    synth.generate(root, videos=SYNTH_VIDEOS, size=SYNTH_SIZE, subset="both", seed=0)
    return root


def _pack(tmp_path_factory, root, subset):
    from avs_dist.data.pack import pack

    out = tmp_path_factory.mktemp(f"{subset}_shards")
    pack(root, subset, out, crop_size=CROP_SIZE, shard_videos=SHARD_VIDEOS, workers=1,
         progress=False, log=lambda *a, **k: None)
    return out


@pytest.fixture(scope="session")
def s4_shards(tmp_path_factory, synth_root):
    return _pack(tmp_path_factory, synth_root, "s4")


@pytest.fixture(scope="session")
def ms3_shards(tmp_path_factory, synth_root):
    return _pack(tmp_path_factory, synth_root, "ms3")


AVSS_CLIPS = 33  # 11 per set (v1s, v1m: 5 frames; v2: 10): 7 train / 2 val / 2 test each
AVSS_SIZE = 32  # packed frame side


@pytest.fixture(scope="session")
def avss_shards(tmp_path_factory):
    """A synthetic AVSBench-semantic release packed at 32x32, 5 clips per shard: 21 train
    clips (14 of 5 frames, 7 of 10), 6 val, 6 test."""
    from avs_dist.data import synth
    from avs_dist.data.pack import pack

    root = tmp_path_factory.mktemp("avss_synth")
    synth.generate(root, videos=AVSS_CLIPS, size=40, subset="avss", seed=2)
    out = tmp_path_factory.mktemp("avss_shards")
    pack(root, "avss", out, image_size=AVSS_SIZE, shard_videos=5, workers=1, progress=False,
         log=lambda *a, **k: None)
    return out


@pytest.fixture
def roots(synth_root, tmp_path):
    """A writable copy of the synthetic download (both subsets and their boxes), for tests that edit files."""
    root = tmp_path / "data"
    for sub in ("Single-source", "Multi-sources"):
        shutil.copytree(synth_root / sub, root / sub)
        shutil.copytree(synth_root / "boxes" / sub, root / "boxes" / sub)
    return root


def slurm_missing() -> str | None:
    if shutil.which("sinfo") is None:
        return "no Slurm client here (sinfo not found); start one with slurm/dev-cluster.sh start"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld is not answering"
    if out.returncode != 0:
        return f"no Slurm running (sinfo: {out.stderr.strip()}); start one with slurm/dev-cluster.sh start"
    if not re.search(r"idle|mix|alloc|comp", out.stdout):
        return f"no usable Slurm node (sinfo states: {out.stdout.split()})"
    return None


def _slurm_unmet(reason: str) -> None:
    """Skip with the reason; under AVS_REQUIRE_SLURM=1 (CI) fail instead."""
    if os.environ.get("AVS_REQUIRE_SLURM") == "1":
        pytest.fail(f"AVS_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running Slurm (slurm/dev-cluster.sh start), else skip with the reason. CI starts one
    and sets AVS_REQUIRE_SLURM=1: there a missing cluster fails the test instead of skipping it."""
    reason = slurm_missing()
    if reason:
        _slurm_unmet(reason)


@pytest.fixture(scope="session")
def slurm_nodes(slurm_cluster) -> list[str]:
    """The usable nodes of the running Slurm, at least two, else skip (fail under
    AVS_REQUIRE_SLURM=1). CI starts them with `slurm/dev-cluster.sh start --nodes 2`."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=15)
    nodes = sorted({n for n, state in (line.split() for line in out.stdout.splitlines() if line.strip())
                    if re.fullmatch(r"idle|mix|alloc|comp", state)})
    if len(nodes) < 2:
        _slurm_unmet(f"the multi-node tests need at least 2 usable Slurm nodes, sinfo lists {nodes or 'none'} "
                     f"(start them with: slurm/dev-cluster.sh start --nodes 2)")
    return nodes


@pytest.fixture(scope="session")
def dev_nodes(slurm_nodes) -> list[str]:
    """The nodes, when they are this machine's dev-cluster namespaces, which tests may enter
    (`dev-cluster.sh exec`) and fail on purpose (`kill-node`); else skip (fail under AVS_REQUIRE_SLURM=1)."""
    for node in slurm_nodes:
        from slurm_jobs import DEV_CLUSTER

        out = subprocess.run(["bash", str(DEV_CLUSTER), "exec", node, "hostname"], capture_output=True, text=True,
                             timeout=30)
        if out.returncode != 0 or out.stdout.strip() != node:
            _slurm_unmet(f"node {node} is not a namespace node of slurm/dev-cluster.sh on this machine "
                         f"(`dev-cluster.sh exec {node} hostname`: {(out.stderr or out.stdout).strip()})")
    return slurm_nodes
