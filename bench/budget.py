"""The main command's budget: Bradley-Terry on task v2 under a few learning rates and trainable depths,
scored on the dev split against the gold labels (issue: train_rm.py's defaults should be the setting at
which BT learns the task; the test split is not used here).

Each row is `train_rm.py --objective bt` for one epoch of task v2's 4,665 train pairs (16 a step), seed 0,
with the frozen-trunk cache; dev accuracy (Wilson 95%), paired with the current defaults' row on the same
645 dev pairs (exact McNemar test), wall time and the other CPU use during the run. One seed: a screen.

    python bench/budget.py --rows "2@1e-3,2@3e-3,4@1e-3,4@3e-4"   # LAYERS@LR; trains what is missing
    python bench/budget.py --report
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from avalib import models  # noqa: E402
from bench import runner, table1, token_rewards  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "budget"
BASE = {**token_rewards.CONFIG, "objective": "bt", "seed": 0}
DEFAULT = f"{BASE['trainable-layers']}@{BASE['lr']:g}"  # train_rm.py's defaults


def canonical(row: str) -> str:
    """'2@1e-3' -> '2@0.001': one name per setting."""
    layers, lr = row.split("@")
    return f"{int(layers)}@{float(lr):g}"


def arguments(row: str) -> list[str]:
    layers, lr = row.split("@")
    flags = {**BASE, "trainable-layers": int(layers), "lr": float(lr)}
    return ["--data", "builtin", "--eval-data", "builtin:gold", "--eval-split", "dev", "--no-export-hf"] + [
        item for k, v in flags.items() for item in (f"--{k}", str(v))]


def run(row: str) -> dict:
    args = arguments(row)
    key = hashlib.sha256(json.dumps(args).encode()).hexdigest()[:12]
    path = RESULTS / f"{row.replace('@', '-at-')}.json"
    if path.is_file() and json.loads(path.read_text()).get("key") == key:
        return json.loads(path.read_text())
    output_dir = models.cache_dir() / "bench-runs" / "budget" / f"{path.stem}-{key}"
    if not (output_dir / "final.json").is_file():
        command = [sys.executable, str(ROOT / "train_rm.py"), *args, "--output-dir", str(output_dir), "--save-every", "50"]
        if (output_dir / "checkpoint.pt").is_file():  # a run cut short: continue it
            command.append("--resume")
        measured = runner.run_measured(command)
        (output_dir / "measured.json").write_text(json.dumps(measured))
    final = json.loads((output_dir / "final.json").read_text())
    result = {"row": row, "key": key, "command": "python train_rm.py " + " ".join(args),
              **json.loads((output_dir / "measured.json").read_text()), "steps": final["steps"],
              "trunk_seconds": (final.get("frozen_trunk") or {}).get("seconds"),
              "dev": {k[5:]: v for k, v in final.items() if k.startswith("eval/")},
              "dev_margins": json.loads((output_dir / "eval_margins.json").read_text())["margins"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def test_note() -> str:
    """The dev pick on the test split, where bench/token_rewards.py has run it (seed 0), paired with its BT row."""
    path, base = token_rewards.result_path("BT 4 layers at lr 3e-4", 0), token_rewards.result_path("BT", 0)
    if not (path.is_file() and base.is_file()):
        return ""
    pick, bt = json.loads(path.read_text()), json.loads(base.read_text())
    m = table1.mcnemar(pick["test_margins"], bt["test_margins"])
    return (f"\nOn the test split ({pick['test']['eval/pairs']} pairs, bench/token_rewards.md), the dev pick 4@0.0003 scores "
            f"{token_rewards.cell(pick['test']['eval/accuracy'], pick['test']['eval/accuracy_wilson95'], True)}, against "
            f"{token_rewards.cell(bt['test']['eval/accuracy'], bt['test']['eval/accuracy_wilson95'], True)} for BT at the "
            f"defaults (three epochs there), paired +{m['wins']} / -{m['losses']} (p = {m['p']:.2f}): the dev gain is a dev "
            "gain only.\n")


def report() -> None:
    results = {r["row"]: r for r in (json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json")))}
    base = results.get(DEFAULT)
    lines = ["| trainable layers @ lr | dev accuracy % (Wilson 95%) | vs the defaults, paired: +/- (p) | wall s | "
             "other CPU use |", "|---|---|---|---|---|"]
    for row, r in sorted(results.items(), key=lambda item: item[0] != DEFAULT):
        paired = "-" if base is None or row == DEFAULT else (lambda m: f"+{m['wins']} / -{m['losses']} (p = {m['p']:.2f})")(
            table1.mcnemar(r["dev_margins"], base["dev_margins"]))
        lines.append(f"| {row}{' (defaults)' if row == DEFAULT else ''} | "
                     f"{token_rewards.cell(r['dev']['accuracy'], r['dev']['accuracy_wilson95'], True)} | {paired} | "
                     f"{r['wall_seconds']:.0f} | {100 * r['other_processes_cpu_share']:.0f}% |")
    text = "\n".join(lines) + "\n\n" + (
        f"BT, one epoch of task v2 (16 pairs a step), seed 0, frozen-trunk cache; dev split, {base['dev']['pairs']} pairs, "
        "gold labels. Regenerate: `python bench/budget.py --report`.\n" if base else "") + test_note()
    (ROOT / "bench" / "results" / "budget.md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="", help="comma-separated LAYERS@LR, e.g. 2@1e-3,4@3e-4")
    parser.add_argument("--report", action="store_true", help="only rebuild the table from the results")
    args = parser.parse_args()
    if not args.report:
        for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
            run(canonical(row))
    report()


if __name__ == "__main__":
    main()
