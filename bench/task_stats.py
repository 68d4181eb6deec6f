"""Benchmark of the built-in task (avalib/task.py): cost to build and load, and how informative its labels are.

Measures
- build: wall time of load_task(size, rebuild=True) (model load + sampling + atomic write), size on disk;
- load: wall time of a second load_task in this process, and of a fresh `python -c` process that
  imports task and loads (imports included: what a training script pays);
- per split: prompts, replies, pairs, replies ended by EOS, mean reply length, gold sign counts,
  pairs tied exactly and within the judge's TIE_MARGIN;
- label ceiling: how often the Bradley-Terry label agrees with the sign of the gold difference
  (pairs with equal gold excluded), over 5 label seeds (mean, std), next to its expectation under the
  BT model, mean over pairs of sigmoid(|gold difference| / tau);
- a trivial baseline: "the longer reply wins" (in tokens), its agreement with the gold sign (pairs
  with equal gold or equal length excluded) and with the BT labels.

- spread: quantiles of the gold of the replies and of the gold difference within pairs.

Writes bench/results/task.{json,md} for the default size (task v2), task-<size>.{json,md} for the
others (task-v1.* is task v1's default size). Run from the repository root:
    python bench/task_stats.py               # default size, rebuilds the cache to time it
    python bench/task_stats.py --size v1     # task v1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avalib import gold, task  # noqa: E402


@dataclass
class Args:
    size: str = "default"
    """task size to measure"""
    rebuild: bool = True
    """sample the task again to time the build (otherwise the cached build time is reported)"""
    label_seeds: int = 5
    """Bradley-Terry label seeds to average the label ceiling over"""
    out: str = str(ROOT / "bench" / "results")
    """directory for task.json and task.md"""


def parse_args() -> Args:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = Args()
    parser.add_argument("--size", default=defaults.size, choices=sorted(task.SIZES), help="task size to measure")
    parser.add_argument("--no-rebuild", dest="rebuild", action="store_false",
                        help="report the cached build time instead of rebuilding")
    parser.add_argument("--label-seeds", type=int, default=defaults.label_seeds,
                        help="Bradley-Terry label seeds to average the label ceiling over")
    parser.add_argument("--out", default=defaults.out, help="directory for task.json and task.md")
    return Args(**vars(parser.parse_args()))


class CpuShare:
    """How much of the machine other processes used while a block ran: (busy CPU-seconds of the whole
    machine, from /proc/stat, minus this process's own) / (wall seconds x cores). Timings are only
    clean when this is near 0; the benchmark reports it next to them."""

    def __enter__(self):
        self.machine, self.own, self.wall = self._machine_busy(), self._own(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.wall
        busy = self._machine_busy() - self.machine
        self.other_share = max(0.0, (busy - (self._own() - self.own)) / (wall * os.cpu_count()))
        self.seconds = wall

    @staticmethod
    def _machine_busy() -> float:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        times = os.times()
        return times.user + times.system + times.children_user + times.children_system


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fresh_process_load_seconds(size: str) -> dict:
    """Load the task in a new Python process: (seconds inside load_task, seconds for the whole process)."""
    code = ("import time; from avalib import task; t = time.perf_counter(); task.load_task(%r, progress=False); "
            "print(time.perf_counter() - t)" % size)
    started = time.perf_counter()
    output = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}).stdout
    return {"load_task_seconds": float(output.strip().splitlines()[-1]),
            "process_seconds": time.perf_counter() - started}


def longer_wins(pairs: list[dict], length: dict[tuple[str, str], int]) -> dict:
    """Agreement of "the longer reply is preferred" with the gold sign and with the BT labels;
    pairs of equal length are left out (and counted)."""
    gold_hits = gold_total = label_hits = label_total = 0
    for pair in pairs:
        chosen_length = length[pair["instruction"], pair["chosen"]]
        rejected_length = length[pair["instruction"], pair["rejected"]]
        if chosen_length == rejected_length:
            continue
        chosen_is_longer = chosen_length > rejected_length
        label_total += 1
        label_hits += chosen_is_longer
        if pair["score_chosen"] != pair["score_rejected"]:
            gold_total += 1
            gold_hits += chosen_is_longer == (pair["score_chosen"] > pair["score_rejected"])
    return {"agreement_with_gold": gold_hits / gold_total if gold_total else None, "pairs_scored_gold": gold_total,
            "agreement_with_labels": label_hits / label_total if label_total else None,
            "pairs_scored_labels": label_total, "pairs_equal_length": len(pairs) - label_total}


def split_report(loaded: task.Task, split: str, label_seeds: int) -> dict:
    stats = loaded.stats()["splits"][split]
    n_tokens = {(record["instruction"], response): n for record in loaded.records
                for response, n in zip(record["responses"], record["n_tokens"])}
    n_characters = {(record["instruction"], response): len(response) for record in loaded.records
                    for response in record["responses"]}
    agreements = [task.label_agreement(loaded.pairs(split, seed=seed)) for seed in range(label_seeds)]
    agreements = [a for a in agreements if a is not None]
    pairs = loaded.pairs(split)
    decided = [p for p in pairs if p["score_chosen"] != p["score_rejected"]]
    expected = [task.preference_probability(abs(p["score_chosen"] - p["score_rejected"]), 0.0, loaded.config.bt_temperature)
                for p in decided]
    differences = sorted(abs(p["score_chosen"] - p["score_rejected"]) for p in pairs)
    replies = sorted(g for record in loaded.records if record["split"] == split for g in record["gold"])
    quantiles = lambda values: {f"q{q}": values[min(len(values) - 1, int(q / 100 * len(values)))]
                                for q in (10, 25, 50, 75, 90)} if values else {}
    return {
        **{k: v for k, v in stats.items() if k != "label_agreement_bt"},
        "demonstrations": len(loaded.demonstrations(split)),
        "demonstration_gold_mean": statistics.fmean(d["score"] for d in loaded.demonstrations(split)),
        "pairs_gold_differs": len(decided),
        "median_abs_gold_difference": differences[len(differences) // 2] if differences else None,
        "abs_gold_difference_quantiles": quantiles(differences),
        "reply_gold_quantiles": quantiles(replies),
        "label_ceiling_mean": statistics.fmean(agreements) if agreements else None,
        "label_ceiling_std": statistics.stdev(agreements) if len(agreements) > 1 else None,
        "label_ceiling_per_seed": agreements,
        "label_ceiling_expected": statistics.fmean(expected) if expected else None,
        "longer_wins_tokens": longer_wins(pairs, n_tokens),
        "longer_wins_characters": longer_wins(pairs, n_characters),
    }


def markdown(result: dict) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    b = result["build"]
    lines = [
        f"# Built-in task: `{result['size']}` size",
        "",
        "Regenerate with: `python bench/task_stats.py" + ("" if result["size"] == "default" else f" --size {result['size']}")
        + "` (from the repository root; rebuilds the task cache to time it).",
        "",
        f"Machine: {result['machine']['cpus']} CPU cores, torch {result['machine']['torch']} "
        f"({result['machine']['threads']} threads), {result['date']}.",
        "",
        f"This build: cache key `{result['key']}`, replies `{result.get('replies_sha256', '-')}` "
        "(Task.replies_sha256: the key hashes what was asked for; a build on another CPU can sample other "
        "replies, and results record which build they used).",
        "",
        "| cost | value |",
        "|---|---|",
        f"| build (model load + sampling + write) | {b['seconds']:.1f} s"
        + ("" if b["rebuilt_now"] else " (from the cache: model load + sampling only)") + " |",
        f"| on disk | {b['bytes'] / 1e6:.2f} MB |",
        f"| second load, same process | {result['load']['same_process_seconds']:.2f} s |",
        f"| load in a fresh process (load_task / whole process incl. imports) | "
        f"{result['load']['fresh_process']['load_task_seconds']:.2f} s / "
        f"{result['load']['fresh_process']['process_seconds']:.2f} s |",
        "",
        (f"Other processes used {100 * b['cpu_share_used_by_other_processes']:.0f}% of the CPUs during the build and "
         if b["rebuilt_now"] else "Not rebuilt (--no-rebuild): the build time is the one recorded in the cache. "
         "Other processes used ")
        + f"{100 * result['load']['cpu_share_used_by_other_processes']:.0f}% during the fresh-process load "
        "(timings are clean only near 0%).",
        "",
        f"Settings: {result['config']['samples_per_prompt']} replies per prompt, <= {result['config']['max_new_tokens']} "
        f"new tokens, temperature {result['config']['temperature']}, top-p {result['config']['top_p']}, "
        f"seed {result['config']['seed']}; Bradley-Terry temperature tau = {result['bt_temperature']}, "
        f"judge tie margin {result['tie_margin']}.",
        "",
        "| split | prompts | replies | ended by EOS | mean tokens | gold > 0 / = 0 / < 0 | pairs | exact gold ties | "
        "judge ties | label ceiling (5 seeds) | expected under BT | longer-wins vs gold: tokens | characters |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for split, s in result["splits"].items():
        ceiling = "-" if s["label_ceiling_mean"] is None else (
            f"{pct(s['label_ceiling_mean'])} ± {100 * (s['label_ceiling_std'] or 0):.1f}")
        lines.append(
            f"| {split} | {s['prompts']} | {s['responses']} | {s['finished_with_eos']} | {s['mean_tokens']:.1f} | "
            f"{s['gold_positive']} / {s['gold_zero']} / {s['gold_negative']} | {s['pairs']} | "
            f"{s['pairs_exact_gold_tie']} | {s['pairs_judge_tie']} | {ceiling} | {pct(s['label_ceiling_expected'])} | "
            f"{pct(s['longer_wins_tokens']['agreement_with_gold'])} (n={s['longer_wins_tokens']['pairs_scored_gold']}) | "
            f"{pct(s['longer_wins_characters']['agreement_with_gold'])} (n={s['longer_wins_characters']['pairs_scored_gold']}) |")
    lines += [
        "",
        "- label ceiling: share of Bradley-Terry labels (seeds 0-4, mean ± std) that agree with the sign of the "
        "gold difference, over pairs whose gold differs; a reward model that knew the gold would score this "
        "accuracy on the labels. 'expected under BT': mean of sigmoid(|gold difference| / tau) over the same pairs.",
        "- longer-wins: the longer reply (in tokens, or in characters) predicted preferred; agreement with the gold "
        "sign over pairs with different gold and different lengths (n). Most replies reach the token cap, so the "
        "token version leaves most pairs undecided.",
        "- determinism: " + ("not checked (no rebuild)." if not b["rebuilt_now"] else
                             "no previous cache to compare the rebuild with." if b["reproduced_previous_cache"] is None else
                             f"the rebuild reproduced the replies cached before it: {b['reproduced_previous_cache']}."),
        "- judge ties: pairs whose gold differs by at most the tie margin (judge() says \"tie\").",
        "",
        "| split | reply gold: 10% / 25% / 50% / 75% / 90% | abs gold difference in a pair: 10% / 25% / 50% / 75% / 90% |",
        "|---|---|---|",
    ]
    for split, s in result["splits"].items():
        spread = lambda q: " / ".join(f"{v:+.2f}" for v in q.values()) if q else "-"
        lines.append(f"| {split} | {spread(s.get('reply_gold_quantiles'))} | {spread(s.get('abs_gold_difference_quantiles'))} |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    import torch

    previous = None  # the replies cached before the rebuild, if any: a rebuild must reproduce them
    if args.rebuild:
        try:
            previous = [r["responses"] for r in task.load_task(args.size, build_if_missing=False).records]
        except FileNotFoundError:
            pass
    with CpuShare() as build_share:
        built = task.load_task(args.size, rebuild=args.rebuild)
    with CpuShare() as load_share:
        loaded = task.load_task(args.size, progress=False)
    assert not loaded.built_now and loaded.records == built.records
    with CpuShare() as fresh_share:
        fresh = fresh_process_load_seconds(args.size)

    result = {
        "size": args.size,
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "config": asdict(task.SIZES[args.size]),
        "key": loaded.key,
        "replies_sha256": loaded.replies_sha256(),
        "bt_temperature": task.SIZES[args.size].bt_temperature,
        "tie_margin": gold.TIE_MARGIN,
        "build": {"seconds": build_share.seconds if args.rebuild else None, "rebuilt_now": built.built_now,
                  "model_load_and_sampling_seconds": built.build_seconds, "bytes": directory_bytes(loaded.path),
                  "cpu_share_used_by_other_processes": build_share.other_share,
                  "reproduced_previous_cache": None if previous is None else previous == [
                      r["responses"] for r in built.records]},
        "load": {"same_process_seconds": load_share.seconds, "fresh_process": fresh,
                 "cpu_share_used_by_other_processes": fresh_share.other_share},
        "splits": {split: split_report(loaded, split, args.label_seeds) for split in task.SPLITS},
    }
    if result["build"]["seconds"] is None:
        result["build"]["seconds"] = built.build_seconds
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "task" if args.size == "default" else f"task-{args.size}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
