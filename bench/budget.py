"""The reward models' budget on task v2: learning rates and trainable depths, scored on the dev split
against the gold labels (the test split is not used here). First for Bradley-Terry (issue: train_rm.py's
defaults should be the setting at which BT learns the task), then the learning rate of every other
objective (issue: learning rate chosen on dev).

Each row is `train_rm.py --objective OBJECTIVE` for one epoch of task v2's 4,665 train pairs (16 a step),
with the frozen-trunk cache; dev accuracy (Wilson 95%, and a bootstrap interval over the dev split's 43
requests, whose 15 pairs each share replies), paired with the same objective's and seed's defaults row
(2@1e-3) on the same 645 dev pairs (avalib/stats.py: the difference in accuracy points, ties half, with a
bootstrap interval and a sign-flip test over requests), wall time and the other CPU use during the run. One
seed per objective: a screen. An objective's defaults row at a seed that bench/token_rewards.py has already
trained is read from that run (the same arguments), not trained again. Each result records the task build it
was made on (the first BT screen predates that record).

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
from avalib import models, stats  # noqa: E402
from bench import runner, table1, token_rewards  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "budget"
BASE = {**token_rewards.CONFIG, "objective": "bt", "seed": 0}
DEFAULT = f"{BASE['trainable-layers']}@{BASE['lr']:g}"  # train_rm.py's defaults
# objective -> bench/token_rewards.py's row of it at the defaults: the first that sets nothing but the objective and its
# budget (epochs); trained_by_token_rewards reads its run only where its arguments are exactly this screen's
ROW_OF = {}
for _name, _spec in token_rewards.ROWS.items():
    if set(_spec) <= {"objective", "epochs"}:
        ROW_OF.setdefault(_spec["objective"], _name)

PAIRED_NOTE = ("Paired (avalib/stats.py): the difference in dev accuracy points (ties half, as accuracy counts them); its "
               "95% interval and p resample and sign-flip whole requests (a request's 15 pairs share its 6 replies); then "
               "+ / - the pairs this row scores higher / lower.")


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
    if row is None or token_rewards.run_arguments(row, seed) != args:
        return None
    directory = token_rewards.run_directory(row, seed)
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


def build_of(result: dict) -> str:
    sha = (result.get("task") or {}).get("replies_sha256")
    return f"`{sha}`" if sha else "not recorded"


def committed_test_result(row: str, seed: int = 0) -> tuple[dict, str] | None:
    """A bench/token_rewards.py row's committed test result and where it lies: the main table (the shipped build),
    else a result kept from an earlier build (bench/results/token_rewards/build-*/)."""
    main = token_rewards.result_path(row, seed)
    for path in [main, *sorted(main.parent.glob(f"build-*/{main.name}"))]:
        if path.is_file():
            return json.loads(path.read_text()), "the main table" if path == main else path.parent.name
    return None


def epochs_of(result: dict, row: str) -> int:
    """The epochs a result was trained for: its command's --epochs, else the row's definition."""
    words = result.get("command", "").split()
    return int(words[words.index("--epochs") + 1]) if "--epochs" in words else token_rewards.row_flags(row)["epochs"]


def test_note(requests=None) -> str:
    """The dev pick on the test split, where bench/token_rewards.py has run it (seed 0), paired with its BT row by
    request (requests: each test pair's, default the task's)."""
    pick_row, base_row = "BT 4 layers at lr 3e-4", "BT"
    found, base_found = committed_test_result(pick_row), committed_test_result(base_row)
    if not (found and base_found):
        return ""
    (pick, pick_where), (bt, bt_where) = found, base_found
    requests = table1.requests_of("default", "test") if requests is None else requests
    m = stats.paired(pick["test_margins"], bt["test_margins"], requests)
    same = build_of(pick) == build_of(bt) != "not recorded"
    test = lambda r: token_rewards.cell(r["test"]["eval/accuracy"], r["test"]["eval/accuracy_wilson95"], True)
    return (f"\nOn the test split ({pick['test']['eval/pairs']} pairs of {m['clusters']} requests; result files under "
            f"bench/results/token_rewards/), the dev pick 4@0.0003 scores {test(pick)}, against {test(bt)} for BT at the "
            f"defaults ({epochs_of(bt, base_row)} epochs there), paired by request {table1.describe(m)}: the dev gain is a dev "
            f"gain only. Task builds: the pick {build_of(pick)} ({pick_where}), BT {build_of(bt)} ({bt_where})"
            + ("." if same else "; not known to be one build (the same requests and pairs, replies that may differ), so the "
               "pairing is approximate.") + "\n")


def paired_with(r: dict, base: dict | None, requests) -> str:
    if base is None or base is r:
        return "-"
    return table1.describe(stats.paired(r["dev_margins"], base["dev_margins"], requests))


def accuracy_cells(r: dict, requests) -> str:
    """'74.6 (71.1, 77.8) | 71.0-78.1': dev accuracy with its Wilson interval, then its interval by request."""
    return (f"{token_rewards.cell(r['dev']['accuracy'], r['dev']['accuracy_wilson95'], True)} | "
            f"{token_rewards.interval_cell(stats.accuracy_interval(r['dev_margins'], requests)['ci95'])}")


def report(requests=None) -> None:
    """Rebuild bench/results/budget.md from the results (requests: each dev pair's request, default the task's)."""
    results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    if requests is None and results:  # the request of each dev pair, in the order of every result's dev_margins
        requests = table1.requests_of("default", "dev")
    screens: dict[tuple[str, int], dict[str, dict]] = {}  # (objective, seed) -> row -> result
    for r in results:  # the first BT results predate the objective and seed fields: BT, seed 0
        screens.setdefault((r.get("objective", "bt"), r.get("seed", 0)), {})[r["row"]] = r
    by_bt = screens.pop(("bt", 0), {})
    base = by_bt.get(DEFAULT)
    lines = ["| trainable layers @ lr | dev accuracy % (Wilson 95%) | 95% by request | vs the defaults, paired: difference "
             "(95%), p, +/- | wall s | other CPU use | task build |", "|---|---|---|---|---|---|---|"]
    for row, r in sorted(by_bt.items(), key=lambda item: item[0] != DEFAULT):
        lines.append(f"| {row}{' (defaults)' if row == DEFAULT else ''} | "
                     f"{accuracy_cells(r, requests)} | {paired_with(r, base, requests)} | {r['wall_seconds']:.0f} | "
                     f"{100 * r['other_processes_cpu_share']:.0f}% | {build_of(r)} |")
    text = "\n".join(lines) + "\n\n" + (
        f"BT, one epoch of task v2 (16 pairs a step), seed 0, frozen-trunk cache; dev split, {base['dev']['pairs']} pairs "
        f"of {len(set(requests))} requests, gold labels. {PAIRED_NOTE} Regenerate: `python bench/budget.py --report`.\n"
        if base else "") + test_note() + (f"\nTask build (the last column): {table1.task_builds(results)}. Every build has the same "
                           "requests and pairs in the same order (some replies differ), so the request clusters hold for "
                           "all; a row is paired only with the defaults row of its own screen.\n" if results else "")
    if screens:
        order = list(ROW_OF)  # --objective's choices: every screened objective is in it
        lines = ["| objective | seed | trainable layers @ lr | dev accuracy % (Wilson 95%) | 95% by request | vs 2@0.001 "
                 "(the defaults), paired: difference (95%), p, +/- | wall s | other CPU use | task build |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for (objective, seed), rows in sorted(screens.items(), key=lambda item: (order.index(item[0][0]), item[0][1])):
            for row, r in sorted(rows.items(), key=lambda item: float(item[0].split("@")[1])):
                lines.append(f"| {ROW_OF[objective]} | {seed} | {row}{' (defaults)' if row == DEFAULT else ''} | "
                             f"{accuracy_cells(r, requests)} | {paired_with(r, rows.get(DEFAULT), requests)} | "
                             f"{r['wall_seconds']:.0f} | {100 * r['other_processes_cpu_share']:.0f}% | {build_of(r)} |")
        text += ("\n## The learning rate of the other objectives\n\n" + "\n".join(lines) + "\n\n"
                 "One epoch of task v2 each, the top 2 layers; dev split, gold labels; each row paired with its objective's "
                 "defaults row at the same seed (that row is bench/token_rewards.py's run of the objective at that seed, "
                 f"read from its run, where it exists). A screen: one seed, one epoch. {PAIRED_NOTE}\n")
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
