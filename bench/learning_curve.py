"""Bradley-Terry's learning curve on task v2: would more train pairs lift it past 75% on test?

Issue 24 asks the main command's budget to bring BT to >= 75% on task v2's test pairs (gold labels). At
two epochs of all 4,665 train pairs BT reads 73.7% (3 seeds, bench/results/token_rewards.md); more
epochs, more trainable layers and other learning rates did not help on test (bench/results/budget.md).
This asks what data would: BT at bench/token_rewards.py's settings (2 epochs, top 2 layers, lr 1e-3,
16 pairs a step) on nested random subsets of the train requests (1/8, 1/4, 1/2, all; every pair of a
kept request, its Bradley-Terry label as in training on `builtin`), scored on the dev and test splits
against the gold labels; each subset paired with all requests on the same test pairs, the seeds averaged
pair by pair on both sides, with a bootstrap interval and a sign-flip test over the 78 test requests
(avalib/stats.py: a request's 15 pairs share its replies, and seeds scored on the same pairs are not more
data). Nothing is chosen on test here: the settings are fixed, the curve only reports.

A subset is written as a TRL prompt/chosen/rejected file (the rows builtin trains on, in the same
order, a pair whose replies are identical left out and counted: it carries no preference) and trained
with `train_rm.py --data FILE`; a model is scored on test with `train_rm.py --eval-only`.

    python bench/learning_curve.py --seeds 0,1,2      # train what is missing, then the report
    python bench/learning_curve.py --seeds 0 --requests 311 --second-pass   # twice the replies, the same steps
    python bench/learning_curve.py --report

Results: bench/results/learning_curve/<requests>-requests-seed<k>.json, bench/results/learning_curve.{md,png};
each records the task build it was made on (`task.replies_sha256`). Runs live under
$AVA_CACHE/bench-runs/learning_curve/, keyed by their arguments and the task build.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from avalib import models, stats  # noqa: E402
from bench import runner, table1, token_rewards  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "learning_curve"
FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 1)
FLAGS = {**token_rewards.CONFIG, "epochs": 2, "objective": "bt"}  # bench/token_rewards.py's BT row


def request_order(requests: list[str], seed: int = 0) -> list[str]:
    """The train requests in a fixed random order: the first k of it are the subset of k requests, so the
    subsets are nested (a larger one holds every request of a smaller one)."""
    order = sorted(requests)
    random.Random(seed).shuffle(order)
    return order


def subset_rows(pairs: list[dict], kept: set[str]) -> tuple[list[dict], int]:
    """The pairs of the kept requests (by instruction), in their order, as prompt/chosen/rejected rows; and
    how many were left out for identical replies (train_rm.py refuses a pair that carries no preference)."""
    rows = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs if p["instruction"] in kept]
    same = sum(r["chosen"] == r["rejected"] for r in rows)
    return [r for r in rows if r["chosen"] != r["rejected"]], same


def counts(train_requests: int) -> list[int]:
    return [max(1, round(f * train_requests)) for f in FRACTIONS]


def result_path(requests: int, seed: int, second_pass: bool = False) -> Path:
    return RESULTS / f"{requests}-requests{'-second-pass' if second_pass else ''}-seed{seed}.json"


def run(requests: int, seed: int, second_pass: bool = False) -> dict:
    """BT on the first `requests` train requests of request_order (with second_pass: all of them, with the
    second sampling pass's pairs after the first's, and one epoch instead of two: the same 584 steps of 16)."""
    from avalib import evaluation, task

    built = task.load_task("default", progress=False)
    build = token_rewards.task_build(built)
    pairs = built.pairs("train")
    order = request_order(sorted({p["instruction"] for p in pairs}))
    if second_pass:  # task v2 "large": the default's train pairs, then those of a second sampling pass
        requests = len(order)
        pairs = task.load_task("large", progress=False).pairs("train")
    rows, identical = subset_rows(pairs, set(order[:requests]))
    flags = {**FLAGS, "seed": seed, **({"epochs": 1} if second_pass else {})}
    arguments = ["--eval-data", "builtin:gold", "--eval-split", "dev", "--no-export-hf"] + [
        item for k, v in flags.items() for item in (f"--{k}", str(v))]
    key = hashlib.sha256(json.dumps([requests, build["replies_sha256"], arguments] + (["second pass"] if second_pass else []))
                         .encode()).hexdigest()[:12]
    path = result_path(requests, seed, second_pass)
    if path.is_file() and json.loads(path.read_text()).get("key") == key:
        return json.loads(path.read_text())
    home = models.cache_dir() / "bench-runs" / "learning_curve"
    data_file = home / f"train-{path.stem.rsplit('-seed', 1)[0]}-{build['replies_sha256']}.jsonl"
    home.mkdir(parents=True, exist_ok=True)
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    output_dir = home / f"{path.stem}-{key}"
    output_dir.mkdir(parents=True, exist_ok=True)
    steps_per_epoch = -(-len(rows) // FLAGS["batch-size"])
    command = [sys.executable, str(ROOT / "train_rm.py"), "--data", str(data_file), *arguments,
               "--eval-every", str(steps_per_epoch if not second_pass else steps_per_epoch // 2)]
    measured = runner.train_once(command, output_dir, save_every=50)
    test_file = output_dir / "test_margins.json"
    if not test_file.is_file():
        runner.run_measured([sys.executable, str(ROOT / "train_rm.py"), "--eval-only", "--load", str(output_dir / "model"),
                             "--eval-data", "builtin:gold", "--eval-split", "test", "--max-length", str(FLAGS["max-length"]),
                             "--eval-margins", str(test_file)])
    final = json.loads((output_dir / "final.json").read_text())
    test_margins = json.loads(test_file.read_text())["margins"]
    result = {"requests": requests, "of_requests": len(order), "second_pass": second_pass, "pairs": len(rows),
              "identical_left_out": identical, "seed": seed, "key": key,
              "command": f"python train_rm.py --data <the {requests} requests' pairs{', both passes' if second_pass else ''}> "
                         + " ".join(arguments),
              **measured, "steps": final["steps"],
              "dev": runner.dev_metrics(final),
              "dev_curve": token_rewards.dev_curve(output_dir),
              "dev_margins": json.loads((output_dir / "eval_margins.json").read_text())["margins"],
              "test": {k[5:]: v for k, v in evaluation.pairwise_accuracy(test_margins).items()}, "test_margins": test_margins,
              "task": build}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def versus(ours: dict[int, dict], theirs: dict[int, dict], requests) -> dict | None:
    """stats.paired of ours against theirs on the test pairs, over the seeds both have: each side's seeds averaged
    pair by pair, the interval and the sign-flip test over requests. None if they share no seed."""
    both = [s for s in sorted(ours) if s in theirs]
    if not both:
        return None
    return {"seeds": both, **stats.paired([ours[s]["test_margins"] for s in both], [theirs[s]["test_margins"] for s in both],
                                          requests)}


def last_doubling(by: dict, seeds: list[int], requests) -> dict | None:
    """Test accuracy gained by the largest subset over the next smaller one, per seed, and paired (versus: the seeds
    averaged, by request): what the last doubling of the data bought, measured, not fitted."""
    sizes = sorted(by)
    if len(sizes) < 2:
        return None
    small, large = by[sizes[-2]], by[sizes[-1]]
    both = [s for s in seeds if s in small and s in large]
    if not both:
        return None
    gains = [large[s]["test"]["accuracy"] - small[s]["test"]["accuracy"] for s in both]
    return {"from": sizes[-2], "to": sizes[-1], "seeds": both, "gains": gains, "mean": statistics.mean(gains),
            "paired": versus(large, small, requests)}


def report(requests=None) -> str:
    """Rebuild bench/results/learning_curve.{md,png} from the results (requests: each test pair's request, in the
    order of their test_margins; default the task's)."""
    results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*-requests*-seed*.json"))]
    if not results:
        return ""
    requests = table1.requests_of("default", "test") if requests is None else requests
    by, second = {}, {}
    for r in results:
        if r.get("second_pass"):
            second[r["seed"]] = r
        else:
            by.setdefault(r["requests"], {})[r["seed"]] = r
    full = by[max(by)]
    seeds = sorted({s for runs in by.values() for s in runs})
    describe = lambda m: table1.describe(m) if m else "-"
    lines = ["| train requests | pairs | " + " | ".join(f"test % seed {s} (Wilson 95%)" for s in seeds)
             + " | test mean % | seeds averaged, 95% by request | dev mean % | vs all requests, test, seeds averaged: "
             "difference (95%), p, +/- | wall s (mean) |",
             "|---|---|" + "---|" * len(seeds) + "---|---|---|---|---|"]
    for size in sorted(by):
        runs = by[size]
        test = [runs[s]["test"]["accuracy"] for s in seeds if s in runs]
        dev = [runs[s]["dev"]["accuracy"] for s in seeds if s in runs]
        pooled = stats.accuracy_interval([runs[s]["test_margins"] for s in sorted(runs)], requests)
        cells = [token_rewards.cell(runs[s]["test"]["accuracy"], runs[s]["test"]["accuracy_wilson95"], True) if s in runs else "-"
                 for s in seeds]
        pairs = statistics.mean(runs[s]["pairs"] for s in runs)
        lines.append(f"| {size} of {next(iter(runs.values()))['of_requests']} | {pairs:.0f} | " + " | ".join(cells)
                     + f" | {100 * statistics.mean(test):.1f} | {token_rewards.interval_cell(pooled['ci95'])} | "
                     f"{100 * statistics.mean(dev):.1f} | {describe(versus(runs, full, requests)) if size != max(by) else '-'} | "
                     f"{statistics.mean(r['wall_seconds'] for r in runs.values()):.0f} |")
    notes = []
    if gain := last_doubling(by, seeds, requests):
        top = statistics.mean(by[gain["to"]][s]["test"]["accuracy"] for s in gain["seeds"])
        notes.append(f"The last doubling ({gain['from']} to {gain['to']} requests) added "
                     + ", ".join(f"{100 * g:+.1f}" for g in gain["gains"]) + " points on test (seeds "
                     + ", ".join(str(s) for s in gain["seeds"]) + "; the seeds averaged, paired by request: "
                     + describe(gain["paired"])
                     + f"). If the next doubling of the train requests added as much, BT would read {100 * (top + gain['mean']):.1f}%: "
                     "an extrapolation, not a measurement (each doubling's gain so far, by seed: "
                     + "; ".join(f"seed {s} " + ", ".join(f"{100 * (by[b][s]['test']['accuracy'] - by[a][s]['test']['accuracy']):+.1f}"
                                                          for a, b in zip(sorted(by), sorted(by)[1:]) if s in by[a] and s in by[b])
                                 for s in seeds) + ").")
    if second:
        lines += ["", "| more replies, same steps | pairs | steps | seed | test % (Wilson 95%) | 95% by request | dev % | vs all "
                  "requests' first pass (2 epochs, the same seed), test, paired by request: difference (95%), p, +/- | wall s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s, r in sorted(second.items()):
            m = versus({s: r}, full, requests)
            lines.append(f"| both passes, 1 epoch | {r['pairs']} | {r['steps']} | {s} | "
                         f"{token_rewards.cell(r['test']['accuracy'], r['test']['accuracy_wilson95'], True)} | "
                         f"{token_rewards.interval_cell(stats.accuracy_interval(r['test_margins'], requests)['ci95'])} | "
                         f"{100 * r['dev']['accuracy']:.1f} | {describe(m)} | {r['wall_seconds']:.0f} |")
        m = versus(second, full, requests)
        if m and len(m["seeds"]) > 1:
            ours = stats.accuracy_interval([second[s]["test_margins"] for s in m["seeds"]], requests)
            theirs = stats.accuracy_interval([full[s]["test_margins"] for s in m["seeds"]], requests)
            notes.append(f"Both passes against the first pass, seeds {', '.join(map(str, m['seeds']))} averaged pair by pair and "
                         f"paired by request: {100 * ours['accuracy']:.1f}% ({token_rewards.interval_cell(ours['ci95'])}) "
                         f"against {100 * theirs['accuracy']:.1f}% ({token_rewards.interval_cell(theirs['ci95'])}), "
                         f"difference {describe(m)}.")
        notes.append("Both passes: task v2's train pairs plus a second sampling pass over the same train requests (6 more "
                     "replies each, sampling seed 1, paired among themselves, labels drawn with seed 1; "
                     "task v2's size 'large', `--data builtin:large`), one epoch: as many steps as the two epochs of the "
                     "first pass alone, each pair seen once.")
    other = max(r["other_processes_cpu_share"] for r in results)
    text = ("\n".join(lines) + "\n\n" + "\n".join(notes) + ("\n\n" if notes else "") +
            f"BT at bench/token_rewards.py's settings (2 epochs, top 2 layers, lr 1e-3, 16 pairs a step) on nested random "
            f"subsets of task v2's train requests (every pair of a kept request, labelled as in training); accuracy against "
            f"the gold labels on the test split ({full[seeds[0]]['test']['pairs'] if seeds[0] in full else '-'} pairs of "
            f"{len(set(requests))} requests) and the dev split. Paired (avalib/stats.py): each test pair scored 1 right, 1/2 "
            "tie, 0 wrong (as accuracy counts it), averaged over the seeds pair by pair (seeds scored on the same pairs are "
            "not more data), then the difference in accuracy points, its 95% interval and p resampling and sign-flipping "
            "whole requests (a request's 15 pairs share its 6 replies); + / - the pairs where the row scores higher / "
            f"lower. Task build: {table1.task_builds(results)}; every build has the same requests and pairs in the same "
            f"order. The other CPU use during the runs was at most {100 * other:.0f}%. Regenerate: "
            "`python bench/learning_curve.py --report`.\n")
    (ROOT / "bench" / "results" / "learning_curve.md").write_text(text)
    plot(by, seeds, second)
    print(text)
    return text


def plot(by: dict, seeds: list[int], second: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for s in seeds:
        xs = [by[k][s]["pairs"] for k in sorted(by) if s in by[k]]
        ax.plot(xs, [100 * by[k][s]["test"]["accuracy"] for k in sorted(by) if s in by[k]], "o-", alpha=0.5, label=f"seed {s}")
    for s, r in sorted(second.items()):
        ax.plot([r["pairs"]], [100 * r["test"]["accuracy"]], "*", markersize=10, color=f"C{seeds.index(s) if s in seeds else s}",
                label=f"seed {s}: second sampling pass, same steps")
    ax.axhline(75, color="grey", linestyle=":", label="75% (issue 24)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("train pairs")
    ax.set_ylabel("test accuracy, gold labels (%)")
    ax.set_title("Bradley-Terry on task v2: more pairs")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(ROOT / "bench" / "results" / "learning_curve.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--requests", default="", help="comma-separated subset sizes in train requests (default: "
                                                      "1/8, 1/4, 1/2 and all of them)")
    parser.add_argument("--second-pass", action="store_true", help="also (after the curve) BT on all train requests "
                        "with a second sampling pass's pairs (task v2 'large'), one epoch")
    parser.add_argument("--report", action="store_true", help="only rebuild the table from the results")
    args = parser.parse_args()
    if not args.report:
        from avalib import task

        total = len({p["instruction"] for p in task.load_task("default", progress=False).pairs("train")})
        sizes = [int(k) for k in args.requests.split(",") if k.strip()] or counts(total)
        for seed in [int(s) for s in args.seeds.split(",")]:
            for requests in sorted(sizes):
                if not 0 < requests <= total:
                    raise SystemExit(f"--requests: {requests} is not between 1 and the {total} train requests")
                run(requests, seed)
            if args.second_pass:
                run(total, seed, second_pass=True)
    report()


if __name__ == "__main__":
    main()
