"""The reward models' budget on task v2: learning rates and trainable depths, scored on the dev split
against the gold labels (the test split is not used here). First for Bradley-Terry (issue: train_rm.py's
defaults should be the setting at which BT learns the task), then the learning rate of every other
objective (issue: learning rate chosen on dev).

Each row is `train_rm.py --objective OBJECTIVE` for one epoch of task v2's 4,665 train pairs (16 a step),
with the frozen-trunk cache; dev accuracy (Wilson 95%), paired with the same objective's and seed's
defaults row (2@1e-3) on the same 645 dev pairs (exact McNemar test), wall time and the other CPU use
during the run. One seed per objective: a screen. An objective's defaults row at a seed that
bench/token_rewards.py has already trained is read from that run (the same arguments), not trained again.

    python bench/budget.py --rows "2@1e-3,2@3e-3,4@1e-3,4@3e-4"                        # BT, seed 0
    python bench/budget.py --objective pref-trans --seed 1 --rows "2@3e-4,2@1e-3,2@3e-3"
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
# objective -> bench/token_rewards.py's row that trains it at the defaults (the rows that set nothing but the objective)
ROW_OF = {spec["objective"]: name for name, spec in token_rewards.ROWS.items() if set(spec) == {"objective"}}


def canonical(row: str) -> str:
    """'2@1e-3' -> '2@0.001': one name per setting."""
    layers, lr = row.split("@")
    return f"{int(layers)}@{float(lr):g}"


def arguments(row: str, objective: str = "bt", seed: int = 0) -> list[str]:
    layers, lr = row.split("@")
    flags = {**BASE, "objective": objective, "seed": seed, "trainable-layers": int(layers), "lr": float(lr)}
    return ["--data", "builtin", "--eval-data", "builtin:gold", "--eval-split", "dev", "--no-export-hf"] + [
        item for k, v in flags.items() for item in (f"--{k}", str(v))]


def result_path(row: str, objective: str = "bt", seed: int = 0) -> Path:
    """BT at seed 0 keeps the screen's first names (2-at-0.001.json); the others say objective and seed."""
    name = row.replace("@", "-at-")
    return RESULTS / (f"{name}.json" if (objective, seed) == ("bt", 0) else f"{objective}-{name}-seed{seed}.json")


def trained_by_token_rewards(args: list[str], objective: str, seed: int) -> Path | None:
    """The run of bench/token_rewards.py with exactly these arguments (its one-epoch row of the objective), if trained."""
    row = ROW_OF.get(objective)
    if row is None or token_rewards.run_arguments(row, seed, 1) != args:
        return None
    directory = token_rewards.run_directory(row, seed, 1)
    return directory if (directory / "final.json").is_file() and (directory / "measured.json").is_file() else None


def run(row: str, objective: str = "bt", seed: int = 0) -> dict:
    args = arguments(row, objective, seed)
    key = hashlib.sha256(json.dumps(args).encode()).hexdigest()[:12]
    path = result_path(row, objective, seed)
    if path.is_file() and json.loads(path.read_text()).get("key") == key:
        return json.loads(path.read_text())
    output_dir = (trained_by_token_rewards(args, objective, seed)
                  or models.cache_dir() / "bench-runs" / "budget" / f"{path.stem}-{key}")
    measured = runner.train_once([sys.executable, str(ROOT / "train_rm.py"), *args], output_dir, save_every=50)
    final = json.loads((output_dir / "final.json").read_text())
    result = {"row": row, "objective": objective, "seed": seed, "key": key, "command": "python train_rm.py " + " ".join(args),
              **measured, "steps": final["steps"],
              "trunk_seconds": (final.get("frozen_trunk") or {}).get("seconds"),
              "dev": runner.dev_metrics(final),
              "dev_margins": json.loads((output_dir / "eval_margins.json").read_text())["margins"],
              "task": token_rewards.task_build()}
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
            f"defaults ({token_rewards.committed_epochs('BT')} epochs there), paired +{m['wins']} / -{m['losses']} (p = {m['p']:.2f}): the dev gain is a dev "
            "gain only.\n")


def paired_with(r: dict, base: dict | None) -> str:
    if base is None or base is r:
        return "-"
    m = table1.mcnemar(r["dev_margins"], base["dev_margins"])
    return f"+{m['wins']} / -{m['losses']} (p = {m['p']:.2f})"


def report() -> None:
    results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    screens: dict[tuple[str, int], dict[str, dict]] = {}  # (objective, seed) -> row -> result
    for r in results:  # the first BT results predate the objective and seed fields: BT, seed 0
        screens.setdefault((r.get("objective", "bt"), r.get("seed", 0)), {})[r["row"]] = r
    by_bt = screens.pop(("bt", 0), {})
    base = by_bt.get(DEFAULT)
    lines = ["| trainable layers @ lr | dev accuracy % (Wilson 95%) | vs the defaults, paired: +/- (p) | wall s | "
             "other CPU use |", "|---|---|---|---|---|"]
    for row, r in sorted(by_bt.items(), key=lambda item: item[0] != DEFAULT):
        lines.append(f"| {row}{' (defaults)' if row == DEFAULT else ''} | "
                     f"{token_rewards.cell(r['dev']['accuracy'], r['dev']['accuracy_wilson95'], True)} | "
                     f"{paired_with(r, base)} | {r['wall_seconds']:.0f} | {100 * r['other_processes_cpu_share']:.0f}% |")
    text = "\n".join(lines) + "\n\n" + (
        f"BT, one epoch of task v2 (16 pairs a step), seed 0, frozen-trunk cache; dev split, {base['dev']['pairs']} pairs, "
        "gold labels. Regenerate: `python bench/budget.py --report`.\n" if base else "") + test_note()
    if screens:
        order = list(ROW_OF)  # --objective's choices: every screened objective is in it
        lines = ["| objective | seed | trainable layers @ lr | dev accuracy % (Wilson 95%) | vs 2@0.001 (the defaults), "
                 "paired: +/- (p) | wall s | other CPU use |", "|---|---|---|---|---|---|---|"]
        for (objective, seed), rows in sorted(screens.items(), key=lambda item: (order.index(item[0][0]), item[0][1])):
            for row, r in sorted(rows.items(), key=lambda item: float(item[0].split("@")[1])):
                lines.append(f"| {ROW_OF[objective]} | {seed} | {row}{' (defaults)' if row == DEFAULT else ''} | "
                             f"{token_rewards.cell(r['dev']['accuracy'], r['dev']['accuracy_wilson95'], True)} | "
                             f"{paired_with(r, rows.get(DEFAULT))} | {r['wall_seconds']:.0f} | "
                             f"{100 * r['other_processes_cpu_share']:.0f}% |")
        text += ("\n## The learning rate of the other objectives\n\n" + "\n".join(lines) + "\n\n"
                 "One epoch of task v2 each, the top 2 layers; dev split, gold labels; each row paired with its objective's "
                 "defaults row at the same seed (that row is bench/token_rewards.py's run of the objective at that seed, "
                 "read from its run, where it exists). A screen: one seed, one epoch.\n")
    (ROOT / "bench" / "results" / "budget.md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="", help="comma-separated LAYERS@LR, e.g. 2@1e-3,4@3e-4")
    parser.add_argument("--objective", default="bt", choices=sorted(ROW_OF), help="train_rm.py's --objective (default bt)")
    parser.add_argument("--seed", type=int, default=0, help="train_rm.py's --seed (default 0)")
    parser.add_argument("--report", action="store_true", help="only rebuild the table from the results")
    args = parser.parse_args()
    if not args.report:
        for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
            try:
                row = canonical(row)
            except ValueError:
                raise SystemExit(f"--rows: {row!r} is not LAYERS@LR (e.g. 2@1e-3)") from None
            run(row, args.objective, args.seed)
    report()


if __name__ == "__main__":
    main()
