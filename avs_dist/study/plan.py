"""A study file (TOML) and the plan it makes: arms x seeds, one run folder each.

    name = "seed_ablation"
    baseline = "avsbench"            # the arm every other arm is compared with, paired by seed
    seeds = [1, 2, 3]                # train.seed of each run: the same seed, the same data order
    select = "best val miou"         # each run's checkpoint for the test figures (checkpoints/best)
    common = ["train.epochs=15"]     # overrides of every run (optional)

    [[arms]]
    name = "avsbench"
    preset = "s4_avsbench"
    overrides = []                   # optional

Shipped studies live in avs_dist/studies/ (`load_study("seed_ablation")`); a user's is any
.toml path. `make_plan` turns a study, the shard set and the command line's extra overrides
into the plan (a dict, saved as STUDY_DIR/plan.json): one run per (seed, arm), seed-major so
that a study cut short has whole pairs, in `runs/<arm>/seed<seed>`. `save_plan` refuses a
study folder made from another plan instead of mixing two.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from avs_dist.config import ConfigError, is_config_path, load_config
from avs_dist.errors import BadFileError, MissingFileError, UserError
from avs_dist.fileio import write_json

STUDY_DIR = Path(__file__).resolve().parent.parent / "studies"
SELECT = ("best val miou",)  # the one selection avs-dist keeps a checkpoint for (checkpoints/best)
KEYS = {"name", "baseline", "seeds", "select", "common", "arms", "description"}
ARM_KEYS = {"name", "preset", "overrides", "description"}
# Set by the study for every run: an arm setting them would break the pairing or the layout.
STUDY_OWNED = ("train.seed", "data.shards")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
PLAN_FILE = "plan.json"


class StudyError(UserError, ValueError):
    """A study file or study folder that cannot be used; the message names it and the fix."""


def study_names() -> list[str]:
    return sorted(p.stem for p in STUDY_DIR.glob("*.toml"))


def study_path(name_or_path: str) -> Path:
    """The .toml of a shipped study name or a path; StudyError when there is none."""
    if is_config_path(name_or_path):
        path = Path(name_or_path)
        if not path.is_file():
            raise StudyError(f"study file {path} does not exist")
        return path.resolve()
    path = STUDY_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise StudyError(f"unknown study {name_or_path!r} (shipped: {', '.join(study_names())}; or give a .toml path)")
    return path


def load_study(name_or_path: str) -> dict:
    """The study file as a checked dict {name, baseline, seeds, select, common, arms, source}.
    StudyError naming the file and key for an unknown key, a missing or bad value."""
    path = study_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise StudyError(f"{path}: invalid TOML: {e}") from None

    def bad(msg: str) -> StudyError:
        return StudyError(f"{path}: {msg}")

    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise bad(f"unknown key(s) {unknown} (a study has {sorted(KEYS)})")
    arms = data.get("arms")
    if not isinstance(arms, list) or len(arms) < 2:
        raise bad("needs at least two [[arms]] (a baseline and one to compare with it)")
    study = {"name": str(data.get("name", path.stem)), "source": str(path),
             "select": data.get("select", SELECT[0]), "common": _overrides(data.get("common", []), "common", bad),
             "seeds": _seeds(data.get("seeds"), bad), "arms": [_arm(a, i, bad) for i, a in enumerate(arms)]}
    names = [a["name"] for a in study["arms"]]
    if len(set(names)) != len(names):
        raise bad(f"arm names must differ (got {names})")
    study["baseline"] = data.get("baseline", names[0])
    if study["baseline"] not in names:
        raise bad(f"baseline = {study['baseline']!r} is not an arm (arms: {names})")
    if study["select"] not in SELECT:
        raise bad(f"select = {study['select']!r}: the one selection available is {SELECT[0]!r} (checkpoints/best)")
    return study


def _seeds(seeds, bad) -> list[int]:
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                            for s in seeds):
        raise bad(f"seeds must be a non-empty list of integers (got {seeds!r})")
    if len(set(seeds)) != len(seeds):
        raise bad(f"seeds must differ (got {seeds})")
    return list(seeds)


def _overrides(items, where: str, bad) -> list[str]:
    if not isinstance(items, list) or not all(isinstance(o, str) and "=" in o for o in items):
        raise bad(f"{where}: overrides are a list of \"key=value\" strings (got {items!r})")
    owned = [o for o in items if o.split("=", 1)[0].strip() in STUDY_OWNED]
    if owned:
        raise bad(f"{where}: {owned}: the study sets {' and '.join(STUDY_OWNED)} itself (seeds = [...], --shards)")
    return list(items)


def _arm(arm, index: int, bad) -> dict:
    if not isinstance(arm, dict):
        raise bad(f"arms[{index}] must be a table")
    unknown = sorted(set(arm) - ARM_KEYS)
    if unknown:
        raise bad(f"arms[{index}]: unknown key(s) {unknown} (an arm has {sorted(ARM_KEYS)})")
    name, preset = arm.get("name"), arm.get("preset")
    if not isinstance(name, str) or not NAME.match(name):
        raise bad(f"arms[{index}].name must be letters, digits, _ . - (it names a folder; got {name!r})")
    if not isinstance(preset, str) or not preset:
        raise bad(f"arms[{index}] ({name}): preset is required (a config preset name or .toml path)")
    return {"name": name, "preset": preset, "overrides": _overrides(arm.get("overrides", []), f"arm {name}", bad),
            "description": str(arm.get("description", ""))}


def make_plan(study: dict, shards, extra: list[str] | None = None, seeds: list[int] | None = None) -> dict:
    """The plan of `study` on the shard set `shards` (its absolute path), with `extra` overrides
    after `common` and, if given, `seeds` instead of the file's. Every run's config is loaded
    (ConfigError naming the arm for an unknown key or an impossible value)."""
    shards = str(Path(shards).resolve())
    common = [*study["common"], *(extra or [])]
    bad = [o for o in extra or [] if o.split("=", 1)[0].strip() in STUDY_OWNED]
    if bad:
        raise StudyError(f"{bad}: the study sets {' and '.join(STUDY_OWNED)} itself (the study's seeds, --shards)")
    runs = []
    for seed in seeds or study["seeds"]:
        for arm in study["arms"]:
            # the study writes each run's HParams session itself (the same keys in every run)
            overrides = [*common, *arm["overrides"], "train.tb_hparams=false", f"train.seed={seed}"]
            preset = str(Path(arm["preset"]).resolve()) if is_config_path(arm["preset"]) else arm["preset"]
            try:
                load_config(preset, [*overrides, f"data.shards={json.dumps(shards)}"])
            except ConfigError as e:
                raise ConfigError(f"study {study['name']}, arm {arm['name']}: {e}") from None
            runs.append({"arm": arm["name"], "seed": seed, "preset": preset, "overrides": overrides,
                         "run_dir": f"runs/{arm['name']}/seed{seed}"})
    return {"study": study["name"], "source": study["source"], "baseline": study["baseline"],
            "select": study["select"], "seeds": list(seeds or study["seeds"]), "shards": shards,
            "common": common, "arms": study["arms"], "runs": runs}


# What makes two plans the same study: not where the file was read from.
_IDENTITY = ("study", "baseline", "select", "seeds", "shards", "common", "arms", "runs")


def save_plan(study_dir, plan: dict) -> None:
    """Write STUDY_DIR/plan.json, or check that the one there is this plan. StudyError naming
    what differs when the folder holds another study's runs (never mixed)."""
    path = Path(study_dir) / PLAN_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError as e:
            raise StudyError(f"{path}: not a study plan ({e}); use another --out") from None
        differ = [k for k in _IDENTITY if old.get(k) != json.loads(json.dumps(plan.get(k)))]
        if differ:
            raise StudyError(f"{study_dir} holds another plan (it differs in {', '.join(differ)}): give another "
                             f"--out, or run the study that made it ({old.get('source')})")
        return
    write_json(path, plan)


def read_plan(study_dir) -> dict:
    """STUDY_DIR/plan.json. MissingFileError / BadFileError (one line, naming the file) when
    it is absent or not a study plan."""
    path = Path(study_dir) / PLAN_FILE
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file: {study_dir} is not a study folder "
                               "(`avs-dist study run STUDY --out DIR` makes one)")
    try:
        plan = json.loads(path.read_text())
    except ValueError as e:
        raise BadFileError(f"{path}: not valid JSON ({e}); run the study again to rewrite it") from None
    missing = [k for k in ("baseline", "arms", "runs") if not isinstance(plan, dict) or k not in plan]
    if missing:
        raise BadFileError(f"{path}: no {', '.join(repr(k) for k in missing)}: not a plan written by `avs-dist study`")
    for i, run in enumerate(plan["runs"]):
        lacks = [k for k in ("arm", "seed", "run_dir") if not isinstance(run, dict) or k not in run]
        if lacks:
            raise BadFileError(f"{path}: runs[{i}] has no {', '.join(repr(k) for k in lacks)}: "
                               "not a plan written by `avs-dist study`")
    return plan


def run_dir(study_dir, run: dict) -> Path:
    return Path(study_dir).resolve() / run["run_dir"]


def check_runs(plan: dict, study_dir, world_size: int, cuda: bool) -> None:
    """Every run checked as `avs-dist train` checks it (launch/args.py check_run) before any
    starts: its config on `world_size` ranks, the shard set (read once) and what a run that
    resumes would change. ConfigError (naming the arm and seed) / ShardError otherwise."""
    from avs_dist.launch.args import check_run, check_shards_fit, stored_frame_size

    manifest = None
    for run in plan["runs"]:
        cfg = load_config(run["preset"], [*run["overrides"], f"data.shards={json.dumps(plan['shards'])}"])
        folder = run_dir(study_dir, run)
        try:
            if manifest is None:
                manifest = check_run(cfg, world_size, cuda, run_dir=folder, resume="auto")
                frame_size = stored_frame_size(plan["shards"], manifest)
            else:
                check_run(cfg, world_size, cuda, shards=False, run_dir=folder, resume="auto")
                check_shards_fit(cfg, manifest, frame_size)
        except ConfigError as e:
            raise ConfigError(f"study {plan['study']}, arm {run['arm']} seed {run['seed']}: {e}") from None
