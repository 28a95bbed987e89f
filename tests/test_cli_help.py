"""What `--help` and `--version` tell a user: defaults, presets, no "(default: None)"."""
import io

import pytest

from avs_dist.cli import COMMANDS, GROUPS, main


def _help(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


def test_version(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"avs-dist {version('avs-dist')}"


@pytest.mark.parametrize("argv, shown", [
    (["train"], ["--nproc NPROC         local ranks (processes) to start (default: 1)"]),
    (["pack"], ["--crop-size CROP_SIZE\n                        default: 224", "--workers WORKERS     default: 2"]),
    (["eval"], ["--split SPLIT         default: test", "default: auto"]),
    (["predict"], ["default: test", "(0: all) (default: 0)"]),
    (["demo"], ["(default: runs/demo)", "synthetic S4 videos (default: 40)"]),
    (["submit"], ["Slurm job name (default: avs-<config name>)", "--nodes NODES         default: 1"]),
])
def test_help_shows_defaults(capsys, argv, shown):
    text = " ".join(_help(capsys, [*argv, "--help"]).split())  # argparse wraps at the terminal width
    for s in shown:
        assert " ".join(s.split()) in text


@pytest.mark.parametrize("argv", [[c] for c in COMMANDS] + [[g, s] for g, (sub, _) in GROUPS.items() for s in sub])
def test_no_help_says_default_none(capsys, argv):
    text = _help(capsys, [*argv, "--help"])
    for bad in ("(default: None)", "(default: False)", "default: avs-<config name> (default"):
        assert bad not in text


def test_train_help_lists_presets(capsys):
    from avs_dist.config import PRESET_DIR

    text = " ".join(_help(capsys, ["train", "--help"]).split())
    names = sorted(p.stem for p in PRESET_DIR.glob("*.toml"))
    assert len(names) >= 8 and f"presets (--config): {', '.join(names)}" in text


def test_bench_data_table_keeps_loader_names_at_80_columns():
    from rich.console import Console

    from avs_dist.data.bench import LOADERS, result_table

    row = {"videos_per_s": 123.4, "cpu_s": 1.25, "cores_used": 1.5, "videos_per_cpu_s": 98.7}
    result = {"subset": "s4", "split": "train", "videos": 40, "workers": 2, "frame_size": [64, 64],
              "image_format": "raw", "machine": {"load_avg_1_5_15_at_end": [1.0, 1.0, 1.0]},
              "ratio_vs_per_file": {k: {"per_core": 1.0, "wall": 1.0} for k in LOADERS[1:]},
              **{k: row for k in LOADERS}}
    out = io.StringIO()
    Console(file=out, width=80).print(result_table(result))
    text = out.getvalue()
    for name in LOADERS:
        assert f" {name} " in text, name


def test_temporary_run_names_no_logs(tmp_path, capsys):
    # bench train's harness runs in a folder it deletes: no `tensorboard --logdir` for it
    from avs_dist.config import load_config, to_dict
    from avs_dist.train.logger import RunLogger

    for kept in (True, False):
        logger = RunLogger(tmp_path / str(kept), to_dict(load_config("tiny")), rank=0, total_steps=1, steps_per_epoch=1)
        logger.kept = kept
        logger.finish({"miou": 0.5}, None)
        logger.close()
        assert ("tensorboard --logdir" in capsys.readouterr().out) is kept
