"""CI as it runs after a session: `bash .ci/run` in a fresh clone of HEAD, timed, with the machine's other CPU use.

.ci/run builds a new virtualenv (setup.sh), runs `ruff check .` and then the README's test command; this clones
the repository, runs it, and records the wall time of the whole run and of pytest alone (pytest's own summary
line), the test counts and the slowest tests (`--durations` through PYTEST_ADDOPTS). The test suite's target
is at most 8 minutes on 2 cores (issue 44). Writes bench/results/ci_time.{json,md}. Run it alone.

    python bench/ci_time.py
    python bench/ci_time.py --report
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import runner  # noqa: E402

RESULT = ROOT / "bench" / "results" / "ci_time.json"
TARGET_SECONDS = 8 * 60


def measure(source: Path) -> dict:
    work, clone, commit, env = runner.fresh_clone(source, "ava-ci-")
    env["PYTEST_ADDOPTS"] = "--durations=15"
    busy, own = runner.busy_cpu_seconds(), os.times().children_user + os.times().children_system
    started = time.time()
    done = subprocess.run(["bash", ".ci/run"], cwd=clone, env=env, capture_output=True, text=True)
    wall = time.time() - started
    other = max(0.0, runner.busy_cpu_seconds() - busy - (os.times().children_user + os.times().children_system - own))
    output = done.stdout + done.stderr
    (work / "ci.log").write_text(output)
    summary = next((line for line in reversed(output.splitlines()) if re.search(r"\d+ (passed|failed)", line)), "")
    pytest_seconds = re.search(r"in ([\d.]+)s", summary)
    durations = [line.strip() for line in output.splitlines() if re.match(r"\s*[\d.]+s (call|setup|teardown)\s", line)]
    return {"date": time.strftime("%Y-%m-%d"), "commit": commit, "exit_code": done.returncode, "wall_seconds": wall,
            "pytest_seconds": float(pytest_seconds.group(1)) if pytest_seconds else None, "summary": summary.strip("= "),
            "slowest": durations[:15], "cpus": os.cpu_count(), "other_processes_cpu_share": other / (wall * os.cpu_count()),
            "target_seconds": TARGET_SECONDS, "log": str(work / "ci.log")}


def markdown(result: dict) -> str:
    slowest = "\n".join(f"- `{line}`" for line in result["slowest"])
    pytest_seconds = result["pytest_seconds"]
    verdict = ("within" if pytest_seconds is not None and pytest_seconds <= result["target_seconds"] else "NOT within")
    return (f"# CI on a fresh clone\n\nRegenerate with: `python bench/ci_time.py` (run alone).\n\n`bash .ci/run` in a fresh clone of "
            f"commit `{result['commit'][:12]}` on {result['cpus']} CPU cores, {result['date']}: exit code {result['exit_code']}, "
            f"{result['wall_seconds'] / 60:.1f} minutes in all (new virtualenv, ruff, pytest); pytest: "
            f"`{result['summary']}`, {verdict} the {result['target_seconds'] // 60}-minute target for the suite. Other processes "
            f"used {100 * result['other_processes_cpu_share']:.1f}% of the CPUs meanwhile.\n\nThe slowest tests:\n\n{slowest}\n")


def write(result: dict) -> None:
    text = markdown(result)
    RESULT.with_suffix(".md").write_text(text)
    print(text)


def main() -> None:
    runner.measure_or_report(__doc__, measure, write, RESULT)


if __name__ == "__main__":
    main()
