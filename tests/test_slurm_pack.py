"""Packing in chunks (`avs-dist pack --chunk I --num-chunks N`, `--finalize`) and as a Slurm array."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from avs_dist.data.pack import CHUNK_DIR, PackError, finalize_chunks, main, pack, pack_chunk
from avs_dist.data.shards import read_manifest

SHARD_VIDEOS = 2  # 12 synthetic videos -> 6 shards (train 4, val 1, test 1)
QUIET = dict(crop_size=32, shard_videos=SHARD_VIDEOS, progress=False, log=lambda *a, **k: None)


def _shards(manifest: dict) -> list[tuple]:
    return [(e["file"], e["split"], e["videos"], e["sha256"], tuple(e["keys"])) for e in manifest["shards"]]


@pytest.fixture(scope="module")
def one_process(synth_root, tmp_path_factory):
    return pack(synth_root, "s4", tmp_path_factory.mktemp("seq"), **QUIET)


def test_chunks_then_finalize_equal_a_one_process_pack(synth_root, one_process, tmp_path):
    out = tmp_path / "chunked"
    for i in (2, 0, 1):  # any order, as array tasks finish
        pack_chunk(synth_root, "s4", out, i, 3, **QUIET)
        assert not (out / "manifest.json").exists()  # incomplete until finalized
    manifest = finalize_chunks(synth_root, "s4", out, 3, shard_videos=SHARD_VIDEOS, log=lambda *a: None)
    assert _shards(manifest) == _shards(one_process)  # byte-identical shards (sha256), same order
    assert manifest["splits"] == one_process["splits"] and manifest["options"] == one_process["options"]
    assert read_manifest(out)["shards"] == manifest["shards"]
    assert not (out / CHUNK_DIR).exists()


def test_finalize_names_missing_chunks_and_changed_shards(synth_root, tmp_path):
    out = tmp_path / "chunked"
    for i in (0, 2):
        pack_chunk(synth_root, "s4", out, i, 3, **QUIET)
    with pytest.raises(PackError, match=r"chunks \[1\] of 3 have no record"):
        finalize_chunks(synth_root, "s4", out, 3, shard_videos=SHARD_VIDEOS)
    pack_chunk(synth_root, "s4", out, 1, 3, **QUIET)
    victim = out / "train-00001.tar"
    victim.write_bytes(victim.read_bytes()[:-512])
    with pytest.raises(PackError, match="train-00001.tar: missing or changed"):
        finalize_chunks(synth_root, "s4", out, 3, shard_videos=SHARD_VIDEOS)
    assert not (out / "manifest.json").exists()
    pack_chunk(synth_root, "s4", out, 1, 3, **QUIET)  # rerunning the chunk repairs it
    finalize_chunks(synth_root, "s4", out, 3, shard_videos=SHARD_VIDEOS, log=lambda *a: None)
    assert (out / "manifest.json").is_file()


def test_chunk_command_line_errors(synth_root, tmp_path, capsys):
    base = ["--data-root", str(synth_root), "--subset", "s4", "--out", str(tmp_path / "o"), "--no-progress"]
    with pytest.raises(SystemExit):
        main([*base, "--chunk", "0"])  # no --num-chunks
    with pytest.raises(SystemExit):
        main([*base, "--chunk", "0", "--num-chunks", "2", "--skip-bad"])
    assert main([*base, "--chunk", "3", "--num-chunks", "2"]) == 1
    assert "--chunk 3: expected 0 <= chunk < --num-chunks (2)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- on Slurm
@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_pack_array_on_slurm(synth_root, one_process, tmp_path):
    out = tmp_path / "shards"
    name = f"avs-test-pack-{os.getpid()}"
    script = Path(__file__).resolve().parents[1] / "slurm" / "pack-array.sbatch"
    try:
        sub = subprocess.run(
            ["sbatch", "--wait", "--parsable", "--array=0-2", f"--job-name={name}", "--cpus-per-task=1",
             "--time=10", f"--chdir={tmp_path}", str(script), "3", "--data-root", str(synth_root), "--subset", "s4",
             "--out", str(out), "--crop-size", "32", "--shard-videos", str(SHARD_VIDEOS)],
            capture_output=True, text=True, timeout=180, env={**os.environ, "PYTHON": sys.executable})
        logs = lambda: "\n".join(p.read_text() for p in sorted(tmp_path.glob("slurm-*.out")))  # noqa: E731
        assert sub.returncode == 0, sub.stderr + logs()
        end = time.time() + 120  # the finalize job starts once the whole array has ended
        while subprocess.run(["squeue", "-h", "-n", f"{name}-finalize"], capture_output=True,
                             text=True).stdout.strip() and time.time() < end:
            time.sleep(1)
    finally:
        subprocess.run(["scancel", "--name", name])
        subprocess.run(["scancel", "--name", f"{name}-finalize"])
    assert (out / "manifest.json").is_file(), logs()
    manifest = json.loads((out / "manifest.json").read_text())
    assert _shards(manifest) == _shards(one_process)
    assert "finalized s4" in logs() and not (out / CHUNK_DIR).exists()
