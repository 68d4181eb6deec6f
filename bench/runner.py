"""What the benchmark scripts share: running one cached row as a subprocess while measuring how much
of the machine other processes took, and writing a generated table into a docs page (docs/*.md) or the
README's results at a glance."""
from __future__ import annotations

import json
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


def run_measured(command: list[str], log: Path | None = None) -> dict:
    """Run `command` in the repository (check=True); returns when it started (UTC), its wall seconds and the
    share of the machine's CPU time that *other* processes took meanwhile (timings are comparable only near 0;
    runs started in different sessions may have had different machines of the same kind). log: the command's
    output (progress bars included) goes to this file instead of the terminal."""
    print("running:", " ".join(command[1:]), flush=True)
    started, busy_before = time.time(), busy_cpu_seconds()
    own_before = os.times().children_user + os.times().children_system
    if log is None:
        subprocess.run(command, check=True, cwd=ROOT)
    else:
        with open(log, "a") as sink:
            subprocess.run(command, check=True, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
    wall = time.time() - started
    own = os.times().children_user + os.times().children_system - own_before
    other = max(0.0, busy_cpu_seconds() - busy_before - own) / (wall * os.cpu_count())
    return {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), "wall_seconds": wall, "load_average_at_end": os.getloadavg()[0], "other_processes_cpu_share": other}


def train(command: list[str], output_dir: Path, save_every: int, log: Path | None = None) -> dict:
    """Run a training script's `command` into output_dir (a checkpoint every save_every steps) under run_measured;
    a run cut short (its checkpoint.pt is there: a session's end) is continued with --resume."""
    command = [*command, "--output-dir", str(output_dir), "--save-every", str(save_every)]
    if (output_dir / "checkpoint.pt").is_file():
        command.append("--resume")
    return run_measured(command, log)


def fresh_clone(source: Path, prefix: str) -> tuple[Path, Path, str, dict]:
    """A clone of `source`'s HEAD in a new temporary directory, as a new user or CI gets it: (the directory, the
    clone, its commit, an environment without this session's virtualenv or paths)."""
    import tempfile

    work = Path(tempfile.mkdtemp(prefix=prefix))
    clone = work / "ava"
    subprocess.run(["git", "clone", "--quiet", str(source), str(clone)], check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, check=True, capture_output=True, text=True).stdout.strip()
    env = {k: v for k, v in os.environ.items() if k not in ("AVA_VENV", "VIRTUAL_ENV", "PYTHONPATH")}
    return work, clone, commit, env


def measure_or_report(doc: str, measure, write, result: Path) -> None:
    """A bench script's command line: --source (the repository to clone) and --report (rewrite the Markdown from
    the JSON only); `measure(source) -> dict` is stored in `result`, then `write(result_dict)` renders it."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(ROOT), help="the repository to clone (its HEAD)")
    parser.add_argument("--report", action="store_true", help="only rewrite the Markdown from the JSON")
    args = parser.parse_args()
    if not args.report:
        result.write_text(json.dumps(measure(Path(args.source)), indent=1) + "\n")
    write(json.loads(result.read_text()))


def dev_metrics(final: dict) -> dict:
    """A run's final.json (or metrics record) reduced to its last dev evaluation: the `eval/` metrics, without the prefix."""
    return {k.removeprefix("eval/"): v for k, v in final.items() if k.startswith("eval/")}


def train_once(command: list[str], output_dir: Path, save_every: int, log: Path | None = None) -> dict:
    """train() unless output_dir holds a finished run (final.json); the measurements either way (measured.json)."""
    if not (output_dir / "final.json").is_file():
        (output_dir / "measured.json").write_text(json.dumps(train(command, output_dir, save_every, log)))
    return json.loads((output_dir / "measured.json").read_text())


def update_page(page: str, block: str, name: str, script: str = "", heading_level: int = 0) -> None:
    """A page (docs/train_rm.md, README.md, ...) shows a benchmark's generated block between its markers
    `<!-- NAME:start (bench/SCRIPT.py --report writes this) -->` and `<!-- NAME:end -->`: generated, never
    typed by hand. heading_level > 0 moves the block's Markdown headings down so that its highest one has
    that level (a generated `## ...` must not sit inside a page's `####` section)."""
    path = ROOT / page
    text = path.read_text()
    start, end = f"<!-- {name}:start (bench/{script or name}.py --report writes this) -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"{page}: no markers {start} ... {end}: put them where the block belongs")
    if heading_level:
        def is_heading(line: str) -> bool:
            return line.startswith("#") and line.lstrip("#").startswith(" ")

        levels = [len(line) - len(line.lstrip("#")) for line in block.splitlines() if is_heading(line)]
        shift = max(0, heading_level - min(levels)) if levels else 0
        block = "\n".join("#" * shift + line if is_heading(line) else line for line in block.splitlines())
    head, rest = text.split(start, 1)
    path.write_text(head + start + "\n" + block + "\n" + end + rest.split(end, 1)[1])


def glance(lines: list[str], columns: list[str], keep=lambda row: True) -> str:
    """The README's compact copy of a generated Markdown table: the first table in `lines` whose header has
    every one of `columns`, cut to those columns, rows where keep({column: cell}) is true. Cells are copied,
    never recomputed, so the README shows exactly what the docs page does."""
    def cells(line: str) -> list[str]:
        return [cell.strip() for cell in line.strip().strip("|").split("|")]

    for index, line in enumerate(lines):
        if line.startswith("|") and set(columns) <= set(header := cells(line)):
            picked = [header.index(column) for column in columns]
            out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            for row in lines[index + 2:]:
                if not row.startswith("|"):
                    break
                values = dict(zip(header, cells(row)))
                if keep(values):
                    out.append("| " + " | ".join(cells(row)[i] for i in picked) + " |")
            return "\n".join(out)
    raise ValueError(f"no table with columns {columns}")
