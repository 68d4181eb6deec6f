"""What the benchmark scripts share: running one cached row as a subprocess while measuring how much
of the machine other processes took, and writing a generated table into README.md."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def slug(row: str) -> str:
    """A row name as a file name: 'AVA-p w/o rwt' -> 'AVA-p-wo-rwt'."""
    return row.replace("/", "").replace(" ", "-").replace("(", "").replace(")", "").replace(",", "").replace("=", "")


def busy_cpu_seconds() -> float:
    """CPU seconds all processes of this machine have spent busy (from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def run_measured(command: list[str]) -> dict:
    """Run `command` in the repository (check=True); returns when it started (UTC), its wall seconds and the
    share of the machine's CPU time that *other* processes took meanwhile (timings are comparable only near 0;
    runs started in different sessions may have had different machines of the same kind)."""
    print("running:", " ".join(command[1:]), flush=True)
    started, busy_before = time.time(), busy_cpu_seconds()
    own_before = os.times().children_user + os.times().children_system
    subprocess.run(command, check=True, cwd=ROOT)
    wall = time.time() - started
    own = os.times().children_user + os.times().children_system - own_before
    other = max(0.0, busy_cpu_seconds() - busy_before - own) / (wall * os.cpu_count())
    return {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), "wall_seconds": wall, "load_average_at_end": os.getloadavg()[0], "other_processes_cpu_share": other}


def update_readme(block: str, name: str) -> None:
    """README.md shows a benchmark's table between its markers: generated, never typed by hand."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = f"<!-- {name}:start (bench/{name}.py --report writes this) -->", f"<!-- {name}:end -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        readme.write_text(head + start + "\n" + block + "\n" + end + rest.split(end, 1)[1])
