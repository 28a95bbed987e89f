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


def test_bench_model_pvt_variants_cpu(tmp_path):
    """The PVT-v2 variants run end to end: the reference's setting (fp32, quadratic TPAVI) and
    ours (bf16 autocast, factorized TPAVI), on the cpu preset's pvt_v2_b0."""
    out = tmp_path / "bench.json"
    names = "reference_fp32_nchw_one_b1_pvt,factorized_bf16_cl_two_b1_mmup_pvt"
    rc = bench_model.main(["--preset", "cpu", "--device", "cpu", "--steps", "1", "--warmup", "0",
                           "--variants", names, "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["pvt_backbone"] == "pvt_v2_b0"
    ref, ours = report["results"]
    assert "error" not in ref and "error" not in ours, (ref.get("error"), ours.get("error"))
    assert ref["pvt"] and ours["pvt"] and ours["two_branch"] and ours["upsample"] == "matmul"
    assert ref["gflop_per_frame"] > 0 and ours["frames_per_s"] > 0
    full = [v.name for v in bench_model.PRESETS["full"]["variants"]]
    assert {"reference_fp32_nchw_one_b4_pvt", "factorized_bf16_cl_one_b4_pvt"} <= set(full)


def test_flop_counter_counts_cpu_attention():
    """PVT's attention runs as one fused SDPA kernel; on CPU the count must equal that of the
    same attention written as matrix products (timm's unfused path)."""
    import torch

    from avs_dist.models.pvt import PVTEncoder

    enc = PVTEncoder("pvt_v2_b0").eval()
    x = torch.randn(1, 3, 64, 64)
    counts = []
    for fused in (True, False):
        for stage in enc.stages:
            for block in stage.blocks:
                block.attn.fused_attn = fused
        counter = bench_model.flop_counter()
        with torch.no_grad(), counter:
            enc(x)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


def test_ratios_to_the_reference_and_the_card_peak():
    """x_reference divides by the reference setting of the same encoder from the same run;
    peak_fraction by the card's bf16 peak (known cards, or --peak-tflops)."""
    def row(name, fps, tflops):
        v = bench_model._v(name)
        import dataclasses

        return {"name": name, **dataclasses.asdict(v), "frames_per_s": fps, "achieved_tflop_s": tflops}

    rows = [row("reference_fp32_nchw_one_b4", 200.0, 50.0), row("factorized_bf16_cl_two_b16", 700.0, 150.0),
            row("reference_fp32_nchw_one_b4_pvt", 100.0, 30.0), row("factorized_bf16_cl_one_b4_pvt", 250.0, 60.0),
            {"name": "broken", "error": "out of memory"}]
    bench_model.add_ratios(rows, 1000.0)
    assert [r.get("x_reference") for r in rows[:4]] == [1.0, 3.5, 1.0, 2.5]
    assert rows[1]["reference_variant"] == "reference_fp32_nchw_one_b4"
    assert rows[3]["reference_variant"] == "reference_fp32_nchw_one_b4_pvt"
    assert rows[1]["peak_fraction"] == pytest.approx(0.15)
    import torch

    assert bench_model.bf16_peak(torch.device("cpu"), None) is None
    assert bench_model.bf16_peak(torch.device("cpu"), 500.0) == 500.0


def test_bench_model_avss_5_and_10_frames(tmp_path):
    """The AVSS variants run end to end at 5 and 10 frames per clip and report the cost per clip."""
    out = tmp_path / "bench.json"
    names = "factorized_fp32_nchw_one_b1_avss,factorized_fp32_nchw_one_b1_avss_t10"
    rc = bench_model.main(["--preset", "cpu", "--device", "cpu", "--steps", "1", "--warmup", "0",
                           "--variants", names, "--out", str(out)])
    assert rc == 0
    five, ten = json.loads(out.read_text())["results"]
    assert "error" not in five and "error" not in ten, (five.get("error"), ten.get("error"))
    assert five["avss"] and (five["frames_per_clip"], ten["frames_per_clip"]) == (5, 10)
    assert ten["frames_per_step"] == 10 and ten["ms_per_clip_median"] == ten["ms_per_step_median"]
    # twice the frames: about twice the FLOPs per clip, the same per frame (within 10%)
    assert abs(ten["gflop_per_frame"] / five["gflop_per_frame"] - 1) < 0.1


def test_avss_variant_names():
    v = bench_model._v("factorized_bf16_cl_one_b4_mmup_pvt_avss_t10")
    assert (v.avss, v.frames, v.pvt, v.upsample) == (True, 10, True, "matmul")
    assert v.name == "factorized_bf16_cl_one_b4_mmup_pvt_avss_t10"
    assert bench_model._v("factorized_fp32_nchw_one_b2").frames == 5
    for bad in ("factorized_fp32_nchw_two_b2_avss", "factorized_fp32_nchw_one_b2_t0", "factorized_fp32_nchw_one_b2_t5_t10"):
        with pytest.raises(ValueError):
            bench_model._v(bad)
