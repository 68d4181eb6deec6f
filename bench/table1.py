"""The AVA paper's Table 1 at CPU scale: reward accuracy on HH-RLHF dev.

SmolLM2-135M-Instruct, trained on hh-rlhf-{harmless,helpful}/train, evaluated on the matching dev
split (200 pairs: accuracies carry a Wilson 95% interval). One configuration for every main row
(MAIN below, at least as strong as the TRL reference run: top 4 layers, max length 512, 8 pairs a
step, lr 1e-4, one epoch); the ablations share a cheaper one (ABLATION). BT, Pref-Trans and AVA-p
run 3 seeds. Every run is cached: its result lands in bench/results/table1/<task>/<row>-seed<k>.json
(committed) and its checkpoints in $AVA_CACHE/bench-runs (resumed if a session was cut), so the
table can be filled in parts across sessions:

    python bench/table1.py --task harmless --rows BT,AVA-p --seeds 0     # run what is missing
    python bench/table1.py --report                                       # rebuild the table only
    python bench/table1.py --paired --rows "BT (ablation config),AVA-p alpha=10"  # give results their dev margins

Each result keeps its model's margin on every dev pair (`dev_margins`), so that a row can be compared
with BT pair by pair (avalib/stats.py: each pair scored 1 / 1/2 / 0 as accuracy counts it, the seeds averaged
pair by pair, a bootstrap interval and a sign-flip test; HH-RLHF's pairs share no replies, so each is its own
cluster, while task v1's pairs of one request are resampled together), which is far less noisy than two
accuracies on 200 pairs.

Throughput (tokens/s) is measured inside each run; the share of CPU time other processes took
during the run is recorded next to it, since a busy machine makes it incomparable.

Runs made since the frozen-trunk cache exists use it (train_rm.py --frozen-trunk-cache: the frozen
bottom layers' outputs are computed once per task and configuration, on this machine, and every row
and seed trains its top layers from them). It is the same model, so results made with and without it
share a row; `--cache-check` measures that claim on real data (a committed run trained again with the
cache, compared pair by pair), and the table marks the tokens/s of cached runs, which count the
training steps only.

    python bench/table1.py --task harmless --cache-check BT --seeds 2
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from avalib import evaluation, models, stats  # noqa: E402
from bench import runner  # noqa: E402

DATA = Path("..") / "shared" / "data"  # relative to the repository (runs use cwd=ROOT): cache keys survive a move
RESULTS = ROOT / "bench" / "results" / "table1"
MAIN = {"trainable-layers": 4, "max-length": 512, "batch-size": 8, "lr": 1e-4, "epochs": 1}
ABLATION = {"trainable-layers": 2, "max-length": 256, "batch-size": 8, "lr": 1e-4, "epochs": 1}
ROWS = {  # name: (train_rm.py arguments, configuration, seeds); None: bench/trl_reward.py, not train_rm.py
    "TRL RewardTrainer": (None, MAIN, 1),
    "BT": ({"objective": "bt"}, MAIN, 3),
    "BT-var": ({"objective": "bt-var"}, MAIN, 1),
    "Pref-Trans": ({"objective": "pref-trans"}, MAIN, 3),
    "AVA-p": ({"objective": "ava-p"}, MAIN, 3),
    "AVA-d": ({"objective": "ava-d"}, MAIN, 1),
    "AVA-p (ablation config)": ({"objective": "ava-p"}, ABLATION, 1),
    "AVA-p w/o rwt": ({"objective": "ava-p", "ablate": "w/o rwt"}, ABLATION, 1),
    "AVA-p w/o neg": ({"objective": "ava-p", "ablate": "w/o neg"}, ABLATION, 1),
    "AVA-p w/o irl": ({"objective": "ava-p", "ablate": "w/o irl"}, ABLATION, 1),
    "AVA-p w/o cer": ({"objective": "ava-p", "ablate": "w/o cer"}, ABLATION, 1),
    "AVA-p w/o ptq": ({"objective": "ava-p", "ablate": "w/o ptq"}, ABLATION, 1),
    "BT (ablation config)": ({"objective": "bt"}, ABLATION, 1),  # what the ablations are read against
}
TUNING = {  # AVA-p's hyper-parameters and SPEC.md's flagged variants, chosen on dev (never on test); cheap config
    "AVA-p alpha=10": ({"objective": "ava-p", "alpha": 10}, ABLATION, 1),
    "AVA-p alpha=100": ({"objective": "ava-p", "alpha": 100}, ABLATION, 1),
    "AVA-p cer=logsigmoid": ({"objective": "ava-p", "cer": "logsigmoid"}, ABLATION, 1),
    "AVA-p cer-weight=10": ({"objective": "ava-p", "cer-weight": 10}, ABLATION, 1),
    "AVA-p lam=0.1": ({"objective": "ava-p", "lam": 0.1}, ABLATION, 1),  # the TD density takes most of the objective
    "AVA-p negative=unlikelihood": ({"objective": "ava-p", "negative": "unlikelihood"}, ABLATION, 1),
    "AVA-p kl-td-on=chosen": ({"objective": "ava-p", "kl-td-on": "chosen"}, ABLATION, 1),
    # our variants (avalib/cli.py PRESETS), screened on task v2 dev by bench/variants.py
    "AVA-p return-cer": ({"objective": "ava-p", "preset": "return-cer"}, ABLATION, 1),
    "AVA-p mu-weights": ({"objective": "ava-p", "preset": "mu-weights"}, ABLATION, 1),
}
ALL = {**ROWS, **TUNING}
TASKS = ("harmless", "helpful", "builtin")


def run_arguments(task: str, row: str, seed: int) -> list[str]:
    extra, config, _ = ALL[row]
    if task == "builtin":  # task v1, on which these rows were run (task v2: bench/token_rewards.py)
        data = ["--data", "builtin:v1", "--eval-data", "builtin:v1:gold"]  # accuracy against the gold labels
    else:
        data = ["--data", str(DATA / f"hh-rlhf-{task}" / "train.jsonl.gz"),
                "--eval-data", str(DATA / f"hh-rlhf-{task}" / "dev.jsonl.gz"), "--skip-bad-rows"]
    flags = {**config, **extra, "seed": seed}
    return data + [item for k, v in flags.items() for item in (f"--{k}", str(v))]


def result_path(task: str, row: str, seed: int) -> Path:
    return RESULTS / task / f"{runner.slug(row)}-seed{seed}.json"


def run_dir(task: str, row: str, seed: int) -> Path:
    """Where the run's checkpoints and saved model live (outside the repository, under $AVA_CACHE)."""
    key = hashlib.sha256(json.dumps(run_arguments(task, row, seed)).encode()).hexdigest()[:12]
    return models.cache_dir() / "bench-runs" / "table1" / task / f"{result_path(task, row, seed).stem}-{key}"


def training_terms(metrics: Path) -> dict:
    """Each logged training term (loss, the AVA terms, margin, sigma, ...) averaged over the first and
    the last tenth of the run's steps: how the objective's parts moved, kept with the result."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows = [r for r in rows if "loss" in r and "step" in r]
    tenth = max(1, len(rows) // 10)

    def mean(part: list[dict]) -> dict:
        names = sorted({k for r in part for k, v in r.items() if isinstance(v, float) and k != "lr"})
        return {k: sum(r[k] for r in part if k in r) / sum(k in r for r in part) for k in names}
    return {"steps_per_tenth": tenth, "first_tenth": mean(rows[:tenth]), "last_tenth": mean(rows[-tenth:])}


def run_row(task: str, row: str, seed: int, need_model: bool = False, paired: bool = False) -> dict:
    """The row's result, run now if it is missing (or, with need_model, if its saved model is not on
    this machine: results are committed, models are not, so a new machine trains it again). With
    paired, a result without dev margins gets them: from its saved model, trained again if not here."""
    path = result_path(task, row, seed)
    if ALL[row][0] is None:  # TRL's row: its own script writes the result; the machine's load is added here
        if not path.is_file() or counted_trl_way(row, json.loads(path.read_text())):
            measured = runner.run_measured([sys.executable, str(ROOT / "bench" / "trl_reward.py"), "--task", task,
                                            "--seed", str(seed)])
            path.write_text(json.dumps({**json.loads(path.read_text()), **measured}, indent=2))
        return json.loads(path.read_text())
    arguments = run_arguments(task, row, seed)
    key = hashlib.sha256(json.dumps(arguments).encode()).hexdigest()[:12]
    output_dir = run_dir(task, row, seed)
    have_model = (output_dir / "model" / "reward_model.json").is_file()
    cached = json.loads(path.read_text()) if path.is_file() else {}
    need_model = need_model or (paired and "dev_margins" not in cached)
    if cached.get("key") == key and (have_model or not need_model):
        result = cached
        if "training_terms" not in result and (output_dir / "metrics.jsonl").is_file():  # runs made before it was kept
            result["training_terms"] = training_terms(output_dir / "metrics.jsonl")
        if paired and "dev_margins" not in result:  # runs made before margins were kept: score the saved model again
            subprocess.run([sys.executable, str(ROOT / "train_rm.py"), *arguments, "--eval-only", "--load",
                            str(output_dir / "model"), "--eval-margins", str(output_dir / "eval_margins.json")],
                           check=True, cwd=ROOT)
            result["dev_margins"] = read_margins(output_dir, path, result["eval/accuracy"])
        path.write_text(json.dumps(result, indent=2))
        return result
    measured, final = train(arguments, output_dir)
    result = {"task": task, "row": row, "seed": seed, "key": key,
              "command": "python train_rm.py " + " ".join(arguments + TRUNK),
              **measured, **final, "training_terms": training_terms(output_dir / "metrics.jsonl"),
              "dev_margins": read_margins(output_dir, path, final["eval/accuracy"])}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


TRUNK = ["--frozen-trunk-cache"]  # not part of a run's key: the same model, trained with less work


def train(arguments: list[str], output_dir: Path) -> tuple[dict, dict]:
    """Run train_rm.py (resuming its checkpoint if a session was cut) -> (machine measurements, final.json)."""
    measured = runner.train([sys.executable, str(ROOT / "train_rm.py"), *arguments, *TRUNK], output_dir, save_every=20)
    return measured, json.loads((output_dir / "final.json").read_text())


def cache_check(task: str, row: str, seed: int) -> dict:
    """A committed run made without the frozen-trunk cache, trained again with it (same arguments and
    seed): if the cache is the same model, the two differ by float rounding only. Compares accuracy and
    each dev pair's margin; written to bench/results/table1/<task>/cache-check-<row>-seed<k>.json."""
    before = json.loads(result_path(task, row, seed).read_text())
    if before.get("frozen_trunk") or "dev_margins" not in before:
        raise SystemExit(f"{result_path(task, row, seed)}: the check needs a run made without the cache, with dev margins")
    arguments = run_arguments(task, row, seed)
    output_dir = run_dir(task, row, seed).with_name(run_dir(task, row, seed).name + "-cache-check")
    path = RESULTS / task / f"cache-check-{result_path(task, row, seed).name}"
    if not path.is_file():
        measured, final = train(arguments, output_dir)
        after = {**measured, **final, "dev_margins": read_margins(output_dir, path, final["eval/accuracy"])}
        difference = [abs(a - b) for a, b in zip(after["dev_margins"], before["dev_margins"])]
        spread = statistics.pstdev(before["dev_margins"])
        path.write_text(json.dumps({
            "task": task, "row": row, "seed": seed, "command": "python train_rm.py " + " ".join(arguments + TRUNK),
            "accuracy": {"without": before["eval/accuracy"], "with": after["eval/accuracy"]},
            "ranked_differently": stats.paired(after["dev_margins"], before["dev_margins"], clusters(task)),
            "margin_correlation": statistics.correlation(after["dev_margins"], before["dev_margins"]),
            "largest_margin_difference": max(difference), "mean_margin_difference": sum(difference) / len(difference),
            "margin_spread": spread,
            "minutes": {"without": before["wall_seconds"] / 60, "with": after["wall_seconds"] / 60,
                        "with_building_the_cache": after["frozen_trunk"]["built_seconds"] / 60},
            "train_tokens_per_second": {"without": before["train_tokens_per_second"], "with": after["train_tokens_per_second"]},
            "other_cpu_share": {"without": before.get("other_processes_cpu_share"), "with": after["other_processes_cpu_share"]},
            "started_at": {"without": before.get("started_at"), "with": after["started_at"]},
            "frozen_trunk": after["frozen_trunk"]}, indent=2))
    return json.loads(path.read_text())


def read_margins(output_dir: Path, path: Path, accuracy: float) -> list[float]:
    """The run's margin on each dev pair (6 significant digits: the sign, which decides accuracy, is kept),
    checked against the accuracy the run recorded."""
    margins = [float(f"{m:.6g}") for m in json.loads((output_dir / "eval_margins.json").read_text())["margins"]]
    scored = sum(m > 0 for m in margins) / len(margins)
    if abs(scored - accuracy) > 1e-9:
        raise SystemExit(f"{path}: the saved model's dev margins give accuracy {scored}, the run recorded {accuracy}")
    return margins


def counted_trl_way(row: str, result: dict) -> bool:
    """A TRL result made before bench/trl_reward.py counted pair by pair: its accuracy is TRL's own mean of
    per-batch accuracies and it kept no dev margins. The table marks it and run_row runs it again."""
    return ALL[row][0] is None and "dev_margins" not in result


def baseline(row: str) -> str:
    """The BT row a row is compared with pair by pair: the one trained in the same configuration."""
    return "BT" if config_name(row) == "main" else "BT (ablation config)"


@functools.cache
def requests_of(size: str, split: str) -> tuple[str, ...]:
    """The request (prompt) of each pair of a split of the built-in task (task v2 "default" / "large", task v1
    "v1"), in the order of every stored margin: the clusters of its intervals and paired tests, since a request's
    pairs share its replies. The order depends on the requests only, so it holds for results made on earlier
    builds of the task too (their replies differed, their requests and pair order did not)."""
    from avalib import task

    return tuple(p["prompt"] for p in task.load_task(size, progress=False).pairs(split, noise_free=True))


def task_builds(results: list[dict]) -> str:
    """Which builds of task v2 results were made on (the replies_sha256 each records), against the shipped one:
    '`db20f047b016527e` (15 runs, an earlier build than the shipped one); ...; the task ships as data, build `...`'."""
    from avalib import shipped_task

    shipped = shipped_task.manifest().get("default", {}).get("replies_sha256")
    by: dict[str | None, list[dict]] = {}
    for r in results:
        by.setdefault((r.get("task") or {}).get("replies_sha256"), []).append(r)
    parts = []
    for sha, runs in sorted(by.items(), key=lambda item: str(item[0])):
        count = f"{len(runs)} run{'s' * (len(runs) != 1)}"
        if sha is None:
            dates = ", ".join(sorted({r["started_at"][:10] for r in runs if r.get("started_at")}))
            parts.append(f"not recorded ({count}{', made ' + dates if dates else ''}, before results recorded their build "
                         "and before the task was shipped)")
        else:
            parts.append(f"`{sha}` ({count}, {'the shipped build' if sha == shipped else 'an earlier build than the shipped one'})")
    return "; ".join(parts) + f"; the task ships as data, build `{shipped}`"


def clusters(task: str) -> tuple[str, ...] | None:
    """What a paired test on a task's dev pairs resamples: HH-RLHF's pairs share no replies, so each pair is its
    own cluster (None); the built-in task v1's pairs are clustered by request."""
    return None if task in TASKS[:2] else requests_of("v1", "dev")


def describe(m: dict) -> str:
    """'+1.9 (-0.6, +4.4), p = 0.14, +212/-170' (stats.describe of a stats.paired result; 'p < 0.001', not 'p = < 0.001')."""
    return stats.describe(m).replace("p = <", "p <")


def paired_by_seed(ours: dict[int, dict], theirs: dict[int, dict], margins: str, requests=None) -> str:
    """'+3.4 (p = 0.04); -; ...': each seed of ours against theirs' run of the same seed ('-' where it has none),
    on the margins under the key `margins` (the same pairs in the same order): stats.paired's difference in
    accuracy points (ties half, as accuracy counts them) and its sign-flip p over `requests` (each pair's
    cluster; None: one cluster per pair)."""
    cells = []
    for seed in sorted(ours):
        if seed not in theirs:
            cells.append("-")
            continue
        m = stats.paired(ours[seed][margins], theirs[seed][margins], requests)
        cells.append(f"{100 * m['difference']:+.1f} (p {'' if m['p'] < 0.001 else '= '}{stats.format_p(m['p'])})")
    return "; ".join(cells)


def paired_with_bt(task: str, row: str, runs: list[dict]) -> dict | None:
    """This row against its configuration's BT on the same dev pairs (from runs, its results already loaded):
    stats.paired of the seeds of the row whose dev margins were kept against BT's seeds that kept them, each side
    averaged pair by pair over its seeds (seeds scored on the same pairs are not more data), clustered as
    clusters(task). None if there is nothing to pair; the seeds used are recorded."""
    if row == baseline(row):
        return None
    ours = sorted((r for r in runs if "dev_margins" in r), key=lambda r: r["seed"])
    theirs = [r for r in results(task, baseline(row)) if "dev_margins" in r]
    if not ours or not theirs:
        return None
    return {"baseline": baseline(row), "seeds": [r["seed"] for r in ours], "baseline_seeds": [r["seed"] for r in theirs],
            "row_seeds": [r["seed"] for r in runs],
            **stats.paired([r["dev_margins"] for r in ours], [r["dev_margins"] for r in theirs], clusters(task))}


def results(task: str, row: str) -> list[dict]:
    """A row's committed results, by seed: its own seeds and any more run with --seeds (each file read once per
    version, however many rows pair with it)."""
    named = (p.stem.rpartition("-seed") for p in (RESULTS / task).glob(f"{runner.slug(row)}-seed*.json"))
    found = {int(seed) for slug, _, seed in named if slug == runner.slug(row) and seed.isdigit()}
    return [_read_result(p, p.stat().st_mtime_ns) for seed in sorted(found | set(range(ALL[row][2])))
            if (p := result_path(task, row, seed)).is_file()]


@functools.cache
def _read_result(path: Path, version: int) -> dict:
    return json.loads(path.read_text())


def summarise(task: str, row: str) -> dict | None:
    """A row's seeds pooled: mean accuracy (± sample std over seeds), Wilson 95% interval, speed, memory, time."""
    runs = results(task, row)
    if not runs:
        return None
    accuracies = [r["eval/accuracy"] for r in runs]
    n = runs[0]["eval/pairs"]
    mean = sum(accuracies) / len(accuracies)
    low, high = evaluation.wilson(mean * n, n)
    spread = (sum((a - mean) ** 2 for a in accuracies) / (len(accuracies) - 1)) ** 0.5 if len(runs) > 1 else None
    return {"task": task, "row": row, "config": config_name(row),
            "seeds": [r["seed"] for r in runs], "accuracy": mean, "accuracy_std": spread,
            "wilson95": [low, high], "eval_pairs": n, "ties": sum(r["eval/ties"] for r in runs) / len(runs),
            "tokens_per_second": mean_of([r["train_tokens_per_second"] for r in runs if not r.get("frozen_trunk")]),
            "tokens_per_second_cached": mean_of([r["train_tokens_per_second"] for r in runs if r.get("frozen_trunk")]),
            "cached_seeds": sum(bool(r.get("frozen_trunk")) for r in runs),
            "other_cpu_share": None if all(r.get("other_processes_cpu_share") is None for r in runs)
            else max(r["other_processes_cpu_share"] for r in runs if r.get("other_processes_cpu_share") is not None),
            "other_cpu_unrecorded": sum(r.get("other_processes_cpu_share") is None for r in runs),
            "peak_rss_gb": max(r["peak_rss_gb_rank0"] for r in runs),
            "wall_minutes": sum(r["wall_seconds"] for r in runs) / 60,
            "resumed_seeds": sum(r.get("resumed_from_step", 0) > 0 for r in runs),  # timed from their resume only
            "run_minutes": [r["wall_seconds"] / 60 for r in runs if not r.get("resumed_from_step", 0)],  # whole runs
            "run_minutes_cached": [r["wall_seconds"] / 60 for r in runs if not r.get("resumed_from_step", 0) and r.get("frozen_trunk")],
            "train_margin_last_tenth": mean_of([r["training_terms"]["last_tenth"].get("rewards/margins")
                                                for r in runs if "training_terms" in r]),
            "paired_with_bt": paired_with_bt(task, row, runs),
            "counted_trl_way": sum(counted_trl_way(row, r) for r in runs),
            "command": runs[0]["command"]}


def mean_of(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def markdown_rows(table: list[dict]) -> list[str]:
    lines = ["| task | row | config | seeds | dev accuracy | 95% interval | vs BT, paired: difference (95%), p, +/- | ties | train margin | train tokens/s | other CPU use | peak RSS (GB) | minutes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        other = "not recorded" if r["other_cpu_share"] is None else f"{100 * r['other_cpu_share']:.0f}%" + (
            f" ({r['other_cpu_unrecorded']} of {len(r['seeds'])} seeds not recorded)" if r["other_cpu_unrecorded"] else "")
        minutes = f"{r['wall_minutes']:.1f}" + (
            f" ({r['resumed_seeds']} of {len(r['seeds'])} resumed: timed from the resume on)" if r["resumed_seeds"] else "")
        accuracy = f"{100 * r['accuracy']:.1f}" + (f" ± {100 * r['accuracy_std']:.1f}" if r["accuracy_std"] is not None else "") + (
            " (TRL's own count: a mean of per-batch accuracies over the pairs it kept; to be recounted)" if r.get("counted_trl_way") else "")
        paired = paired_cell(r["paired_with_bt"])
        lines.append(f"| {'builtin v1' if r['task'] == 'builtin' else r['task']} | {r['row']} | {r['config']} | {len(r['seeds'])} | {accuracy} | "
                     f"{100 * r['wilson95'][0]:.1f}-{100 * r['wilson95'][1]:.1f} | {paired} | {100 * r['ties']:.1f} | "
                     f"{'-' if r['train_margin_last_tenth'] is None else format(r['train_margin_last_tenth'], '.3f')} | "
                     f"{speed(r)} | {other} | "
                     f"{r['peak_rss_gb']:.2f} | {minutes} |")
    return lines


def paired_cell(comparison: dict | None) -> str:
    """The 'vs BT, paired' cell: describe() of the seeds-averaged comparison, its seeds shown where they are not the
    same on both sides or not all of the row's."""
    if comparison is None:
        return "-"
    seeds = lambda s: ", ".join(map(str, s))
    used, theirs = comparison["seeds"], comparison["baseline_seeds"]
    shown = used != theirs or used != comparison.get("row_seeds", used)
    return describe(comparison) + (f" (seeds {seeds(used)} v {seeds(theirs)})" if shown else "")


def speed(r: dict) -> str:
    """Train tokens/s; runs with the frozen-trunk cache apart (their steps skip the frozen layers)."""
    parts = [] if r["tokens_per_second"] is None else [f"{r['tokens_per_second']:.0f}"]
    if r["cached_seeds"]:
        parts.append(f"{r['tokens_per_second_cached']:.0f} cached"
                     + (f" ({r['cached_seeds']} of {len(r['seeds'])} seeds)" if len(r["seeds"]) > 1 else ""))
    return "; ".join(parts)


def config_name(row: str) -> str:
    return "main" if ALL[row][1] is MAIN else "ablation"


def missing_runs() -> list[tuple[str, str, int]]:
    """(task, row, seed) of every Table 1 run on the two HH tasks whose result is not cached yet (or, for TRL's
    row, was counted TRL's way: run_row runs it again)."""
    def missing(path: Path, row: str) -> bool:
        return not path.is_file() or counted_trl_way(row, _read_result(path, path.stat().st_mtime_ns))
    return [(task, row, seed) for task in TASKS[:2] for row, (_, _, seeds) in ROWS.items()
            for seed in range(seeds) if missing(result_path(task, row, seed), row)]


def price_kind(row: str) -> str:
    """Which measured runs price a missing run of `row`: TRL's own, or those of its configuration."""
    return "TRL" if ALL[row][0] is None else config_name(row)


def time_estimate(table: list[dict]) -> str:
    """How long the whole table (both HH tasks, every row and seed) takes: the runs made, plus the
    missing ones at the mean minutes of the measured runs of their configuration (on either task;
    those made with the frozen-trunk cache, where there are any, since the missing runs will use it).
    TRL's runs (bench/trl_reward.py, no frozen-trunk cache) are priced apart, at their own measured minutes.
    A resumed run's minutes count in "made" but not in the mean: they cover only its steps after the resume."""
    kinds = ("main", "ablation", "TRL")
    measured, cached, made, resumed = {k: [] for k in kinds}, {k: [] for k in kinds}, 0.0, 0
    for r in table:
        if r["task"] in TASKS[:2]:
            kind = price_kind(r["row"])
            measured[kind] += r["run_minutes"]
            cached[kind] += r["run_minutes_cached"]
            made, resumed = made + r["wall_minutes"], resumed + r["resumed_seeds"]
    missing = {k: 0 for k in kinds}
    for _, row, _ in missing_runs():
        missing[price_kind(row)] += 1
    done = made / 60
    parts, total, untimed = [], done, False
    for config in kinds:
        if not missing[config]:
            continue
        label = config if config == "TRL" else f"{config}-config"
        count = f"{missing[config]} {label} run" + "s" * (missing[config] != 1)
        timed = cached[config] or measured[config]  # the missing runs will use the cache
        if timed:
            mean = sum(timed) / len(timed)
            total += missing[config] * mean / 60
            parts.append(f"{count} at {mean:.0f} min each (the mean of "
                         f"{len(timed)} measured{' with the frozen-trunk cache, each building it or not' if cached[config] else ''})")
        else:
            untimed = True
            parts.append(f"{count}, none timed yet")
    runs = sum(map(len, measured.values())) + resumed
    text = (f"Whole table (both tasks, every row and seed, Table 1 rows only): {runs} runs made took {done:.1f} h"
            + (f" ({resumed} resumed, timed from the resume on)" if resumed else ""))
    if not parts:
        return text + "."
    estimate = f"; estimated total {total:.0f} h" if not untimed else "; no total until every configuration has a timed run"
    return text + "; still to run: " + ", ".join(parts) + estimate + " (on 2 idle cores)."


def cache_check_lines() -> list[str]:
    checks = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*/cache-check-*.json"))]
    if not checks:
        return ["Frozen-trunk check: not run yet (`python bench/table1.py --cache-check BT --seeds 2`)."]
    lines = ["**Frozen-trunk check** (a committed run trained again with the cache, same arguments and seed; "
             "`python bench/table1.py --task TASK --cache-check ROW --seeds K`):", ""]
    for c in checks:
        flips = c["ranked_differently"]
        lines.append(
            f"- {c['task']} {c['row']} seed {c['seed']}: dev accuracy {100 * c['accuracy']['without']:.1f}% without, "
            f"{100 * c['accuracy']['with']:.1f}% with; dev pairs ranked right by one run only: {flips['wins']} with, "
            f"{flips['losses']} without; margins correlate {c['margin_correlation']:.4f}, largest difference "
            f"{c['largest_margin_difference']:.3g} (their spread {c['margin_spread']:.3g}); "
            f"train tokens/s {c['train_tokens_per_second']['without']:.0f} without, {c['train_tokens_per_second']['with']:.0f} "
            f"with; minutes {c['minutes']['without']:.1f} without, {c['minutes']['with']:.1f} with "
            f"(of which {c['minutes']['with_building_the_cache']:.1f} building the cache; other CPU use "
            f"{100 * (c['other_cpu_share']['with'] or 0):.0f}%; the run without it was made in another session, "
            f"started {c['started_at']['without'] or 'before this was recorded'}).")
    return lines


def report() -> None:
    """Rebuild bench/results/table1.{json,md} from whatever runs are cached."""
    table = [r for task in TASKS for row in ROWS if (r := summarise(task, row))]
    tuning = [r for task in TASKS for row in TUNING if (r := summarise(task, row))]
    (ROOT / "bench" / "results" / "table1.json").write_text(json.dumps({"table1": table, "tuning": tuning}, indent=2))
    lines = ["# Table 1 at CPU scale: reward accuracy on dev", "",
             "Regenerate: `python bench/table1.py --task harmless`, then `--task helpful`, then "
             "`--task builtin --rows BT,AVA-p --seeds 0` (each runs what is missing; `--report` only rebuilds).",
             f"Main configuration: {MAIN}. Ablation configuration: {ABLATION}.", "", *markdown_rows(table)]
    todo: dict[tuple[str, str], list[int]] = {}
    for task, row, seed in missing_runs():
        todo.setdefault((task, row), []).append(seed)
    missing = [f"{t}/{row}" + (f" (seeds {', '.join(map(str, seeds))})" if ROWS[row][2] > 1 else "")
               for (t, row), seeds in todo.items()]
    lines += ["", f"Not yet run: {', '.join(missing) if missing else 'none'}.", "", time_estimate(table), "",
              "Accuracy: mean over seeds (± sample std); interval: Wilson 95% on the pooled mean over the dev pairs.",
              "vs BT, paired: the row against BT in the same configuration, on the same dev pairs (avalib/stats.py): each",
              "pair scored 1 right, 1/2 tie, 0 wrong (as accuracy counts it) and averaged over the seeds whose dev margins",
              "were kept (the seeds used are shown where the two sides use different ones or not all of the row's); the difference in",
              "accuracy points, its 95% bootstrap interval and a sign-flip p, then + the pairs this row scores higher, - those",
              "BT scores higher.",
              "HH-RLHF's pairs share no replies, so the interval and p resample and sign-flip single pairs (one cluster",
              "per pair: one seed against one without ties is McNemar's exact test); on the built-in task v1 they would",
              "resample and sign-flip whole requests, but its two rows kept no dev margins ('-': a run's dev margins",
              "were not kept; `--paired` adds them).",
              "Train margin: the mean reward margin (chosen - rejected score) over the last tenth of training steps,",
              "from the runs' metrics.jsonl, averaged over the seeds whose metrics were kept ('-': none were).",
              "Other CPU use: the share of the machine's CPU time other processes took during the run; tokens/s",
              "is comparable only near 0% (rows marked 'not recorded' ran before this was measured and shared",
              "the machine with other jobs). TRL's row comes from `python bench/trl_reward.py` (TRL drops the pairs",
              "longer than max length that ours cuts; its tokens/s counts the pairs it kept; its accuracy is counted",
              "pair by pair on every dev pair, the dropped ones cut as ours are, not TRL's mean of per-batch accuracies).",
              "Cached: runs made with the frozen-trunk cache (train_rm.py --frozen-trunk-cache), the same model trained",
              "with less work; their tokens/s count the training steps only (the top layers, from the cached outputs",
              "of the frozen ones), their minutes include building the cache when the run built it, and their peak",
              "RSS includes holding it.", "", *cache_check_lines()]
    lines += ["", "**AVA-p on dev: hyper-parameters and SPEC.md's flagged variants** (ablation configuration; "
              "chosen on dev only, so a setting picked here and then scored on the same dev pairs is optimistically "
              "biased: the held-out test split is not available here; read each row against `AVA-p (ablation config)` "
              "and `BT (ablation config)` above). "
              f"Regenerate: `python bench/table1.py --task harmless --rows \"{','.join(TUNING)}\"`.", ""]
    lines += markdown_rows(tuning) if tuning else ["Not yet run."]
    (ROOT / "bench" / "results" / "table1.md").write_text("\n".join(lines) + "\n")
    runner.update_page("docs/train_rm.md", "\n".join(lines[2:]), "table1")
    main_rows = lambda cells: "ablation" not in cells["row"] and "w/o" not in cells["row"]  # the ablations: docs/train_rm.md
    runner.update_page("README.md", runner.glance(lines, ["task", "row", "seeds", "dev accuracy", "95% interval"], main_rows),
                       "table1-glance", "table1")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, default="harmless")
    parser.add_argument("--rows", default="", help="comma-separated row names (default: every Table 1 row; "
                        f"the dev-tuning rows are {', '.join(TUNING)})")
    parser.add_argument("--seeds", default="", help="comma-separated seeds (default: each row's own count)")
    parser.add_argument("--report", action="store_true", help="only rebuild the table from cached runs")
    parser.add_argument("--paired", action="store_true", help="give the rows' results their dev margins (for the "
                        "paired comparison with BT): score the saved model, training the row again if it is not here")
    parser.add_argument("--cache-check", metavar="ROW", default="", help="train a committed run of ROW (made without "
                        "the frozen-trunk cache; --seeds picks it) again with the cache and compare the two pair by pair")
    args = parser.parse_args()
    if args.cache_check:
        if args.cache_check not in ALL or ALL[args.cache_check][0] is None:
            raise SystemExit(f"--cache-check: {args.cache_check!r} is not one of our rows: choose from {list(ALL)[1:]}")
        for seed in [int(s) for s in args.seeds.split(",")] if args.seeds else [0]:
            print(json.dumps(cache_check(args.task, args.cache_check, seed), indent=2))
    elif not args.report:
        rows = [r.strip() for r in args.rows.split(",") if r.strip()] or [
            row for row, (extra, _, _) in ROWS.items() if extra is not None or args.task != "builtin"]
        for row in rows:
            if row not in ALL:
                raise SystemExit(f"unknown row {row!r}: choose from {list(ALL)}")
            if ALL[row][0] is None and args.task == "builtin":
                raise SystemExit(f"{row!r} runs on the HH tasks only (bench/trl_reward.py)")
            seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else range(ALL[row][2])
            for seed in seeds:
                run_row(args.task, row, seed, paired=args.paired)
    report()


if __name__ == "__main__":
    main()
