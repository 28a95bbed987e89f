"""`avs-dist bench model`: runs a variant end to end on CPU and writes the JSON report."""
import json

import pytest

from avs_dist import bench_model


def test_bench_model_cpu_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench_model.main(["--preset", "cpu", "--device", "cpu", "--steps", "1", "--warmup", "0",
                           "--variants", "factorized_fp32_nchw_one_b1", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    for key in ("device", "torch", "date", "preset", "results"):
        assert key in report
    (r,) = report["results"]
    assert "error" not in r, r.get("error")
    assert r["name"] == "factorized_fp32_nchw_one_b1" and not r["two_branch"] and r["frames_per_step"] == 5
    assert r["frames_per_s"] > 0 and r["gflop_per_frame"] > 0 and r["peak_mem_gib"] > 0
    assert r["mem_kind"] == "process_peak_rss" and len(r["ms_per_step_all"]) == 1
    assert "factorized_fp32_nchw_one_b1" in capsys.readouterr().out


def test_variant_selection():
    full = bench_model.PRESETS["full"]["variants"]
    names = [v.name for v in bench_model.select(full, "factorized_bf16_cl_*")]
    assert names and all(n.startswith("factorized_bf16_cl_") for n in names)
    assert "reference_fp32_nchw_one_b4" in [v.name for v in full]  # the published baseline
    with pytest.raises(SystemExit, match="matches none"):
        bench_model.select(full, "nothing_*")
    with pytest.raises(SystemExit, match="not a preset variant"):
        bench_model.select(full, "bogus")
