"""The README's main command, timed as a new user meets it: a fresh clone, a fresh cache, a fresh virtualenv.

    bash setup.sh && .venv/bin/python train_rm.py

is run in a clone of this repository's HEAD (so only what is committed counts) with AVA_CACHE pointed at an
empty directory (no converted model, no frozen-trunk cache; the task is shipped, so nothing is sampled), and
each phase is timed: set-up, the GGUF-to-fp32 conversion (from the converted model's appearance in the
cache), the frozen-trunk cache (final.json), training (final.json: train_seconds) and the rest (loading,
the dev evaluation, saving). The machine's other CPU use during the run is recorded: the figure is clean only
near 0. Writes bench/results/main_command.{json,md}; the README and docs/train_rm.md quote the Markdown.

    python bench/main_command.py            # ~15 minutes on 2 cores; run it alone
    python bench/main_command.py --report   # rewrite the Markdown from the JSON
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import runner  # noqa: E402

RESULT = ROOT / "bench" / "results" / "main_command.json"
BUDGET_SECONDS = 15 * 60  # issue 40: set-up plus the main command within 15 minutes on 2 cores


def timed(command: list[str], cwd: Path, env: dict, log: Path, watch: Path | None = None) -> dict:
    """Run command (check=True), its output to log; wall seconds, other processes' CPU share, and, if `watch`
    is a directory, the seconds after the start at which its first entry appeared."""
    started, busy_before = time.time(), runner.busy_cpu_seconds()
    own_before = os.times().children_user + os.times().children_system
    appeared = None
    with open(log, "w") as sink:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        while process.poll() is None:
            if watch is not None and appeared is None and watch.is_dir() and any(
                    (entry / "config.json").is_file() for entry in watch.glob("smollm2-*")):
                appeared = time.time() - started
            time.sleep(0.5)
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}); see {log}")
    wall = time.time() - started
    own = os.times().children_user + os.times().children_system - own_before
    other = max(0.0, runner.busy_cpu_seconds() - busy_before - own) / (wall * os.cpu_count())
    return {"seconds": wall, "other_processes_cpu_share": other, "appeared_after_seconds": appeared}


def measure(source: Path) -> dict:
    work, clone, commit, env = runner.fresh_clone(source, "ava-main-command-")
    cache = work / "cache"
    env.update(AVA_CACHE=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    setup = timed(["bash", "setup.sh"], clone, env, work / "setup.log")
    run = timed([str(clone / ".venv" / "bin" / "python"), "train_rm.py"], clone, env, work / "train_rm.log", watch=cache)
    final = json.loads((clone / "runs" / "rm" / "final.json").read_text())
    lines = (work / "train_rm.log").read_text().replace("\r", "\n").splitlines()
    last = next((line for line in reversed(lines) if line.startswith(final["objective"] + ": accuracy")), None)
    trunk = final.get("frozen_trunk") or {}
    conversion = run["appeared_after_seconds"]
    phases = {"setup (bash setup.sh)": setup["seconds"],
              "start-up and GGUF-to-fp32 conversion (until the converted SmolLM2 is in the cache)": conversion,
              "frozen-trunk cache": trunk.get("built_seconds"),
              "training": final.get("train_seconds")}
    phases["the rest (imports, task and model loading, dev evaluation, saving)"] = run["seconds"] - sum(
        v for k, v in phases.items() if v is not None and k != "setup (bash setup.sh)")
    total = setup["seconds"] + run["seconds"]
    import torch

    return {"date": time.strftime("%Y-%m-%d"), "commit": commit, "command": "bash setup.sh && .venv/bin/python train_rm.py",
            "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                        "cpu": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                                     if line.startswith("model name")), platform.processor())},
            "phases_seconds": phases, "total_seconds": total, "budget_seconds": BUDGET_SECONDS,
            "within_budget": total <= BUDGET_SECONDS, "steps": final["steps"],
            "seconds_per_step": final["train_seconds"] / final["steps"] if final.get("train_seconds") else None,
            "other_processes_cpu_share": {"setup": setup["other_processes_cpu_share"], "train_rm.py": run["other_processes_cpu_share"]},
            "last_line": last, "dev_accuracy": final.get("eval/accuracy"), "dev_accuracy_wilson95": final.get("eval/accuracy_wilson95"),
            "task_sampled": any("sampling" in line for line in lines)}


def markdown(result: dict) -> str:
    fmt = lambda s: "-" if s is None else f"{s:.0f} s"
    rows = "\n".join(f"| {phase} | {fmt(seconds)} |" for phase, seconds in result["phases_seconds"].items())
    other = result["other_processes_cpu_share"]
    return (f"# The main command, timed on a fresh clone\n\nRegenerate with: `python bench/main_command.py` (run alone).\n\n"
            f"`{result['command']}` in a fresh clone of commit `{result['commit'][:12]}`, with an empty `AVA_CACHE` and a "
            f"new virtualenv, on {result['machine']['cpus']} CPU cores ({result['machine']['cpu']}; torch "
            f"{result['machine']['torch']}), {result['date']}. The task is shipped, so nothing is sampled"
            f"{' (yet the log shows sampling!)' if result['task_sampled'] else ''}.\n\n"
            f"| phase | time |\n|---|---|\n{rows}\n| **total** | **{result['total_seconds']:.0f} s "
            f"({result['total_seconds'] / 60:.1f} min)** |\n\n"
            f"Training: {result['steps']} steps, {result['seconds_per_step']:.2f} s a step. Budget {result['budget_seconds'] // 60} "
            f"minutes: {'met' if result['within_budget'] else 'NOT met'}. Other processes used {100 * other['setup']:.1f}% of the "
            f"CPUs during set-up and {100 * other['train_rm.py']:.1f}% during train_rm.py (timings are clean only near 0).\n\n"
            f"The run ended: `{result['last_line']}`\n")


def write(result: dict) -> None:
    RESULT.with_suffix(".md").write_text(markdown(result))
    runner.update_page("docs/train_rm.md", markdown(result).split("\n", 3)[3].strip(), "main_command")
    runner.update_page("README.md", glance(result), "main_command-glance", script="main_command")
    print(markdown(result))


def main() -> None:
    runner.measure_or_report(__doc__, measure, write, RESULT)


def glance(result: dict) -> str:
    """The README's sentence: the whole line's time on a fresh machine, and its phases."""
    phases = result["phases_seconds"]
    return (f"On a fresh 2-core machine the whole line took {result['total_seconds'] / 60:.1f} minutes "
            f"({result['date']}; set-up {phases['setup (bash setup.sh)'] / 60:.1f}, training {phases['training'] / 60:.1f}; "
            f"[bench/results/main_command.md](bench/results/main_command.md)) and ended: `{result['last_line']}`")


if __name__ == "__main__":
    main()
