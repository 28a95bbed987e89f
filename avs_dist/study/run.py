"""Running a study's plan on this machine, and what each of its runs has become.

Each run is the real `avs-dist train` command in a subprocess (its checks, run-folder lock,
resume and stop handling are the ones a user gets), then `avs-dist eval` of the run's selected
checkpoint (checkpoints/best: the best val mIoU) on test, written to <run_dir>/selected_test.json.
Their output goes to STUDY_DIR/logs/<arm>_seed<seed>.log; one line per run here.

Running a study again continues it: finished runs are skipped, a stopped (or preempted) run
resumes from its last checkpoint, a trained run that lacks its test evaluation gets it, and a
failed run (<run_dir>/study_error.txt, its one-line error) is reported, not retried, unless
`retry_failed`. Runs go one after another, or several at once in `slots` (disjoint GPU sets,
or on CPU a share of the cores each).

A stop signal (SIGTERM, SIGINT, SIGHUP, SIGUSR2) to the study is passed on once to every
running `avs-dist train`, which saves a checkpoint at the next step boundary and exits; no
further run starts. A second signal is passed on too: the trainings then abort.
"""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from avs_dist.fileio import read_json_dict
from avs_dist.launch.args import usable_cores
from avs_dist.launch.signals import STOP_SIGNALS
from avs_dist.study.plan import run_dir
from avs_dist.study.state import ERROR_FILE, SELECTED_FILE, run_state


def _fig(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def slot_envs(nproc: int, gpus: list[str] | None, parallel: int) -> list[dict]:
    """The environment of each slot a run can take: with `gpus`, len(gpus) // nproc disjoint
    CUDA_VISIBLE_DEVICES sets; else `parallel` CPU slots sharing the cores (OMP_NUM_THREADS)."""
    if gpus:
        if len(gpus) < nproc:
            raise ValueError(f"--gpus {','.join(gpus)}: fewer GPUs than --nproc {nproc}")
        return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[i:i + nproc])} for i in range(0, len(gpus) - nproc + 1, nproc)]
    threads = max(1, usable_cores() // (parallel * nproc))
    env = {"OMP_NUM_THREADS": str(threads)} if parallel > 1 and "OMP_NUM_THREADS" not in os.environ else {}
    return [dict(env) for _ in range(parallel)]


def train_command(study_dir, run: dict, shards: str, nproc: int) -> list[str]:
    return [sys.executable, "-m", "avs_dist.cli", "train", "--config", run["preset"], "--shards", shards,
            "--run-dir", str(run_dir(study_dir, run)), "--nproc", str(nproc), *run["overrides"]]


def eval_command(study_dir, run: dict, shards: str) -> list[str]:
    folder = run_dir(study_dir, run)  # a run folder: eval takes its best/, else its newest valid checkpoint
    return [sys.executable, "-m", "avs_dist.cli", "eval", "--checkpoint", str(folder), "--shards", shards,
            "--split", "test", "--out", str(folder / SELECTED_FILE), "--plot", str(folder / "selected_audio_gap.png")]


def error_line(log: Path, status: dict) -> str:
    """The one line that says why a run failed: status.json's reason, else the last line of
    its log naming an error, else the last line."""
    if status.get("status") == "failed" and status.get("reason"):
        return str(status["reason"])
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "failed (no log)"
    named = [ln for ln in lines if "error" in ln.lower()]
    return (named or lines or ["failed (empty log)"])[-1][:500]


class LocalStudy:
    """Runs the plan's runs that are not finished, in `slots` (slot_envs), and returns 0 when
    every run finished, 1 when any failed, 0 after a stop (the same command continues)."""

    def __init__(self, study_dir, plan: dict, nproc: int, slots: list[dict], retry_failed: bool = False,
                 say=print):
        self.dir, self.plan, self.nproc, self.slots = Path(study_dir).resolve(), plan, nproc, slots
        self.retry_failed, self.say = retry_failed, say
        self.procs: dict[int, subprocess.Popen] = {}  # slot -> the process it runs now
        self.lock = threading.Lock()
        self.signals: list[str] = []
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)

    def todo(self) -> list[dict]:
        """The runs to work on, in plan order, saying once what is skipped and why."""
        out = []
        for run in self.plan["runs"]:
            state = run_state(run_dir(self.dir, run))
            if state["state"] == "finished":
                self.say(f"  {run['arm']} seed {run['seed']}: finished earlier")
            elif state["state"] == "failed" and not self.retry_failed:
                self.say(f"  {run['arm']} seed {run['seed']}: failed earlier, not retried (--retry-failed): "
                         f"{state['error']}")
            else:
                out.append(run)
        return out

    def run(self) -> int:
        runs = self.todo()
        work: queue.Queue = queue.Queue()
        for i, run in enumerate(runs):
            work.put((i + 1, len(runs), run))
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            threads = [threading.Thread(target=self._worker, args=(slot, work), daemon=True)
                       for slot in range(min(len(self.slots), len(runs)))]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                time.sleep(0.2)  # the main thread stays free for signals
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if self.signals:
            self.say(f"study stopped ({self.signals[0]}): the same command continues it")
            return 0
        return 1 if any(run_state(run_dir(self.dir, r))["state"] == "failed" for r in self.plan["runs"]) else 0

    def _on_signal(self, signum, frame) -> None:
        self.signals.append(signal.Signals(signum).name)
        with self.lock:
            live = list(self.procs.values())
        self.say(f"study: {self.signals[-1]}: "
                 + ("each running training saves a checkpoint and stops; no new run starts"
                    if len(self.signals) == 1 else "passed on again: the trainings abort"))
        for proc in live:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _worker(self, slot: int, work: queue.Queue) -> None:
        while not self.signals:
            try:
                index, total, run = work.get_nowait()
            except queue.Empty:
                return
            self._one(slot, f"[{index}/{total}] {run['arm']} seed {run['seed']}", run)

    def _exec(self, slot: int, cmd: list[str], log: Path) -> int:
        env = {**os.environ, **self.slots[slot]}
        with open(log, "a") as out:
            out.write(f"\n$ {' '.join(cmd[2:])}\n")
            out.flush()
            with self.lock:
                if self.signals:
                    return -1
                # its own session: a terminal's Ctrl-C reaches the study, which passes it on once
                proc = self.procs[slot] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                                           start_new_session=True)
            rc = proc.wait()
            with self.lock:
                self.procs.pop(slot, None)
        return rc

    def _one(self, slot: int, title: str, run: dict) -> None:
        folder = run_dir(self.dir, run)
        log = self.dir / "logs" / f"{run['arm']}_seed{run['seed']}.log"
        (folder / ERROR_FILE).unlink(missing_ok=True)  # retried, or resumed: its old error is not this attempt's
        state = run_state(folder)["state"]
        t0 = time.time()
        if state != "trained":
            self.say(f"{title}: {'resuming' if state == 'stopped' else 'training'} (log: {log})")
            rc = self._exec(slot, train_command(self.dir, run, self.plan["shards"], self.nproc), log)
            status = read_json_dict(folder / "status.json")
            if status.get("status") != "completed":
                if rc == 0 or self.signals:  # stopped with a checkpoint: the same command resumes it
                    self.say(f"{title}: stopped at step {status.get('step')}")
                    return
                self._fail(folder, title, error_line(log, status))
                return
        rc = self._exec(slot, eval_command(self.dir, run, self.plan["shards"]), log)
        if rc != 0 or not (folder / SELECTED_FILE).is_file():
            if not self.signals:
                self._fail(folder, title, "test evaluation of the selected checkpoint failed: " + error_line(log, {}))
            return
        test, final = read_json_dict(folder / SELECTED_FILE), read_json_dict(folder / "final_metrics.json")
        self.say(f"{title}: finished in {time.time() - t0:.0f} s: best val miou {_fig(final.get('best_val_miou'))} "
                 f"(step {final.get('best_val_step')}), test miou {_fig(test.get('miou'))} of that checkpoint")

    def _fail(self, folder: Path, title: str, error: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ERROR_FILE).write_text(error + "\n")
        self.say(f"{title}: failed: {error}")
