"""Reward models on the built-in task v2, trained to convergence, and their token rewards against the gold.

Every row trains with train_rm.py on builtin (task v2: noisy Bradley-Terry labels), evaluating on the
dev split's gold labels after every epoch (`eval/accuracy` in metrics.jsonl: the curve shows where it
stops improving); then, once, on the test split against the gold labels (>= 1,000 pairs; Wilson 95%
interval, and a bootstrap interval over requests since a request's 15 pairs share replies), and token
by token on every test reply (avalib/token_metrics.py: Pearson, Spearman, on gold-bearing tokens, AUC,
returns-to-go, per word; bootstrap intervals over replies). The reading per model:
AVA: mu_t (Eq. 19); Pref-Trans: r_t; BT, BT-var: the head at every prefix (trained only at the last).
Two references: a linear probe fit by ridge regression on the frozen (untrained) SmolLM2's last hidden
states to the gold token rewards of the train replies (a ceiling for a linear read-out), and zero.

    python bench/token_rewards.py --rows BT,AVA-p --seeds 0        # train what is missing, evaluate
    python bench/token_rewards.py --rows probe                     # the linear-probe ceiling
    python bench/token_rewards.py --report                         # rebuild the tables only

Results: bench/results/token_rewards/<row>-seed<k>.json (committed), bench/results/token_rewards.{json,md}.
A machine whose task build differs from the main table's (bench/results/task.json's replies) writes its runs
under bench/results/token_rewards/build-<replies>/ instead; the report sets them beside the main table.
Runs (checkpoints, models) live under $AVA_CACHE/bench-runs/token_rewards/, keyed by their arguments.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from avalib import models  # noqa: E402
from bench import runner  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "token_rewards"
# train_rm.py's defaults, with --max-length 160 (which cuts nothing on task v2)
CONFIG = {"trainable-layers": 2, "max-length": 160, "batch-size": 16, "lr": 1e-3, "epochs": 1}
ROWS = {  # name: train_rm.py arguments beyond CONFIG
    "BT": {"objective": "bt"},
    "BT 4 layers at lr 3e-4": {"objective": "bt", "trainable-layers": 4, "lr": 3e-4},  # bench/budget.md's pick on dev
    "BT-var": {"objective": "bt-var"},
    "Pref-Trans": {"objective": "pref-trans"},
    "AVA-p": {"objective": "ava-p"},
    "AVA-d": {"objective": "ava-d"},
    # a second epoch on seed 0: does dev accuracy still improve after the one epoch the seeds use?
    **{f"{name} 2 epochs": {"objective": objective, "epochs": 2} for name, objective in
       (("BT-var", "bt-var"), ("Pref-Trans", "pref-trans"), ("AVA-p", "ava-p"))},
    # AVA-p's dev accuracy still rose from the first epoch to the second on two of three seeds: a third
    "AVA-p 3 epochs": {"objective": "ava-p", "epochs": 3},
    # our AVA-p variants (avalib/cli.py PRESETS; ava.py's docstring says what each changes and why)
    **{f"AVA-p {name}": {"objective": "ava-p", "preset": name} for name in
       ("return-cer", "centred-td", "centred-td-return", "centred-td-discounted", "mu-weights", "mu-weights-floor",
        "mu-weights-half-td")},
    # a DPO policy (train_direct.py); its implicit per-token reward beta * log pi/pi_ref is a token-level
    # soft-Q reading (Rafailov et al. 2024, "From r to Q*"); lr: train_direct.py's default for a policy
    "DPO": {"script": "train_direct.py", "objective": "dpo", "lr": 1e-4, "dpo-beta": 0.1},
}
REFERENCES = ("probe",)


def run_arguments(row: str, seed: int, epochs: int) -> list[str]:
    flags = {**CONFIG, "epochs": epochs, **ROWS[row], "seed": seed}
    flags.pop("script", None)
    own = ["--eval-prompts", "none"] if script_of(row) == "train_direct.py" else ["--no-export-hf"]
    return ["--data", "builtin", "--eval-data", "builtin:gold", "--eval-split", "dev", *own] + [
        item for k, v in flags.items() for item in (f"--{k}", str(v))]


def script_of(row: str) -> str:
    return ROWS[row].get("script", "train_rm.py")


def result_path(row: str, seed: int) -> Path:
    return RESULTS / f"{runner.slug(row)}-seed{seed}.json"


def bootstrap_over_requests(margins: list[float], requests: list[str], draws: int = 1000, seed: int = 0) -> list[float]:
    """95% interval of the accuracy (ties half) with whole requests resampled: their pairs share replies."""
    import numpy as np

    groups: dict[str, list[float]] = {}
    for margin, request in zip(margins, requests):
        groups.setdefault(request, []).append(1.0 if margin > 0 else 0.5 if margin == 0 else 0.0)
    scores = list(groups.values())
    generator = np.random.default_rng(seed)
    accuracies = []
    for _ in range(draws):
        picked = [scores[i] for i in generator.integers(0, len(scores), len(scores))]
        accuracies.append(sum(map(sum, picked)) / sum(map(len, picked)))
    return [float(np.percentile(accuracies, 2.5)), float(np.percentile(accuracies, 97.5))]


def replies_of(split: str):
    """Every request of a split with its replies: [(prompt, [reply, ...])]."""
    from avalib import task

    return [(r["prompt"], r["responses"]) for r in task.load_task("default", progress=False).records if r["split"] == split]


def token_table(model, tokenizer, split: str, max_length: int) -> dict:
    """token_metrics.agreement of a model's per-token readings on every reply of a split."""
    from avalib import token_metrics, viz

    return token_metrics.agreement([item for prompt, replies in replies_of(split)
                                    for item in viz.token_readings(model, tokenizer, prompt, replies, max_length, gold=True)])


def evaluate_model(model_dir: Path, max_length: int) -> dict:
    """Test accuracy against the gold labels and the token table of a saved reward model. Each test reply
    is read once (viz.token_readings: its score and its per-token rewards); a pair's margin is the
    difference of its two replies' scores (the 1,170 test pairs share 468 replies)."""
    from avalib import reward_models, token_metrics, viz

    model, tokenizer, _ = reward_models.load_reward_model(model_dir)
    result = test_scores(lambda prompt, replies: viz.token_readings(model, tokenizer, prompt, replies, max_length, gold=True), tokenizer)
    readings = result.pop("readings")
    if readings and readings[0]["deltas"] is not None:  # AVA: how much of mu_t is the TD error delta_t (Eq. 14)
        import numpy as np

        pairs_md = [(m, d) for item in readings for m, d in zip(item["rewards"], item["deltas"]) if d is not None]
        mu, delta = np.array(pairs_md).T
        result["mu_vs_td_error_pearson"] = float(np.corrcoef(mu, delta)[0, 1])
        result["td_error_vs_gold"] = token_metrics.agreement([dict(item, rewards=[0.0 if d is None else d for d in item["deltas"]])
                                                              for item in readings], bootstrap=0)["pearson"]
    return result


def test_scores(readings_of, tokenizer) -> dict:
    """Test accuracy against the gold labels from per-reply readings: readings_of(prompt, replies) -> items
    with "score" (the sequence reward) and token readings; a pair's margin is its replies' score difference."""
    from avalib import evaluation, sources, token_metrics

    readings, score = [], {}
    for prompt, replies in replies_of("test"):
        for reply, item in zip(replies, readings_of(prompt, replies)):
            readings.append(item)
            score[prompt, reply] = item["score"]
    pairs, _ = sources.load_rows("builtin:gold", "pairs", "test", tokenizer)
    margins = [score[p["prompt"], p["chosen"]] - score[p["prompt"], p["rejected"]] for p in pairs]
    accuracy = evaluation.pairwise_accuracy(margins)
    return {"test": {**accuracy, "accuracy_bootstrap_requests95": bootstrap_over_requests(margins, [p["prompt"] for p in pairs])},
            "test_margins": margins, "tokens": token_metrics.agreement(readings), "readings": readings}


def evaluate_dpo(policy_dir: Path, beta: float, max_length: int) -> dict:
    """DPO's implicit reward token by token (viz.implicit_token_readings: beta * log pi/pi_ref, the initial
    SmolLM2 as pi_ref), a reply's score their sum (DPO's implicit sequence reward)."""
    from avalib import viz

    policy, tokenizer = models.load_model(str(policy_dir))
    reference, _ = models.load_model("smollm2", tokenizer=tokenizer)
    result = test_scores(lambda prompt, replies: viz.implicit_token_readings(
        policy, reference, tokenizer, prompt, replies, beta, max_length, gold=True), tokenizer)
    result.pop("readings")
    return result


def dev_curve(output_dir: Path) -> list[dict]:
    """Dev accuracy (gold labels) at every evaluation of the run: where training stops improving."""
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{"step": r["step"], "epoch": r.get("epoch"), "accuracy": r["eval/accuracy"]} for r in lines
            if "eval/accuracy" in r and not r.get("final")]


def training_trace(output_dir: Path, points: int = 5) -> list[dict]:
    """The training margin (and AVA's mean sigma_t) at `points` evenly spaced logged steps, the last included: a
    margin stuck at 0 with sigma near 0 is the collapse docs/train_rm.md describes, visible in the committed result."""
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    lines = [r for r in lines if "rewards/margins" in r]
    picked = sorted({round(i * (len(lines) - 1) / max(points - 1, 1)) for i in range(points)}) if lines else []
    return [{"step": lines[i]["step"], "margin": lines[i]["rewards/margins"],
             **({"sigma": lines[i]["ava/sigma"]} if "ava/sigma" in lines[i] else {})} for i in picked]


def trace_note(result: dict) -> str:
    """The training trace of an AVA run as text (step: margin, sigma), or "" for runs made before it was kept."""
    trace = [t for t in result.get("training_trace", []) if "sigma" in t]
    return (" Training (step: margin, sigma_t): " + "; ".join(f"{t['step']}: {t['margin']:.2f}, {t['sigma']:.2f}"
                                                             for t in trace) + "." if trace else "")


def run_directory(row: str, seed: int, epochs: int) -> Path:
    """Where a row's run lives (checkpoints, metrics, the model): $AVA_CACHE/bench-runs/token_rewards/."""
    key = hashlib.sha256(json.dumps(run_arguments(row, seed, epochs)).encode()).hexdigest()[:12]
    return models.cache_dir() / "bench-runs" / "token_rewards" / f"{result_path(row, seed).stem}-{key}"


def committed_epochs(row: str, seed: int = 0) -> int:
    """The epochs of a row's committed result (the notebooks load the same models), else CONFIG's."""
    path = result_path(row, seed)
    if not path.is_file():
        return CONFIG["epochs"]
    command = json.loads(path.read_text())["command"].split()
    return int(command[command.index("--epochs") + 1])


def main_build() -> str | None:
    """The task build the main table is on: the replies of bench/results/task.json (bench/task_stats.py's build)."""
    path = ROOT / "bench" / "results" / "task.json"
    return json.loads(path.read_text()).get("replies_sha256") if path.is_file() else None


def build_result_path(row: str, seed: int, replies_sha256: str) -> Path:
    """Where a run on this build of task v2 keeps its result: the main table's file when the build is the main
    table's, else RESULTS/build-REPLIES_SHA/ beside it (other_builds_table), so that a machine whose sampling
    gave other replies never overwrites the main table with a run on other test pairs."""
    path = result_path(row, seed)
    return path if replies_sha256 == main_build() else path.parent / f"build-{replies_sha256}" / path.name


def run_row(row: str, seed: int, epochs: int, need_model: bool = False, quiet: bool = False) -> dict:
    """The row's result, run now if it is missing (or, with need_model, if its trained model is not on this
    machine: results are committed, models are not, so a new machine trains it again). Without need_model a
    committed main-table result stands; a run made here is written for this machine's task build
    (build_result_path). quiet: the training's output goes to train.log in its run directory (a notebook keeps
    its outputs short)."""
    arguments = run_arguments(row, seed, epochs)
    key = hashlib.sha256(json.dumps(arguments).encode()).hexdigest()[:12]
    output_dir = run_directory(row, seed, epochs)
    have_model = (output_dir / "final.json").is_file()

    def stored(path: Path) -> dict | None:
        result = json.loads(path.read_text()) if path.is_file() else {}
        if result.get("key") != key:
            return None
        if "training_trace" not in result and have_model:  # results made before the trace was kept
            result["training_trace"] = training_trace(output_dir)
            path.write_text(json.dumps(result, indent=1))
        return result

    if not need_model and (result := stored(result_path(row, seed))):
        return result
    from avalib import task

    built = task.load_task("default", progress=False)
    build = task_build(built)
    path = build_result_path(row, seed, build["replies_sha256"])
    if have_model and (result := stored(path)):
        return result
    command = [sys.executable, str(ROOT / script_of(row)), *arguments]
    if not have_model:  # dev accuracy after every epoch: where training stops improving
        command += ["--eval-every", str(-(-len(built.pairs("train")) // CONFIG["batch-size"]))]
    output_dir.mkdir(parents=True, exist_ok=True)
    measured = runner.train_once(command, output_dir, save_every=50, log=output_dir / "train.log" if quiet else None)
    final = json.loads((output_dir / "final.json").read_text())
    evaluated = (evaluate_dpo(output_dir / "policy", ROWS[row]["dpo-beta"], CONFIG["max-length"]) if ROWS[row]["objective"] == "dpo"
                 else evaluate_model(output_dir / "model", CONFIG["max-length"]))
    result = {"row": row, "seed": seed, "key": key, "command": f"python {script_of(row)} " + " ".join(arguments),
              **measured, "steps": final["steps"], "train_tokens_per_second": final.get("train_tokens_per_second"),
              "dev": runner.dev_metrics(final), "dev_curve": dev_curve(output_dir),
              "training_trace": training_trace(output_dir),
              **evaluated, "task": build}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def task_build(built=None) -> dict:
    """Which build of task v2 a result used (built: a loaded Task, else it is loaded): builds with the same
    cache key can differ in a few replies when sampled on different CPUs (avalib.task.Task.replies_sha256)."""
    from avalib import task

    built = built or task.load_task("default", progress=False)
    return {"key": built.key, "replies_sha256": built.replies_sha256()}


def builds_note(table: list[dict]) -> str:
    """Which task build each result used, so that results from different builds are not silently compared."""
    by_build = {}
    for s in table:
        for r in s["runs"]:
            by_build.setdefault(r.get("task", {}).get("replies_sha256"), []).append(f"{s['row']} seed {r['seed']}")
    if len(by_build) < 2:
        return ""
    parts = [f"replies `{sha}`: {', '.join(runs)}" for sha, runs in by_build.items() if sha]
    earlier = by_build.get(None)
    return ("Task builds: the results come from more than one build of task v2 (the same cache key sampled on "
            "different machines; such builds differed in a few train and dev replies and at least one test reply, "
            "bench/results/task.md), so their test pairs are the same prompts and nearly the same replies, and "
            "the paired comparisons across builds are approximate. " + "; ".join(parts)
            + (f"; an earlier build, before builds were recorded (2026-12-04/05): {', '.join(earlier)}." if earlier else "."))


def probe_row() -> dict:
    """The linear-probe ceiling: ridge regression from the frozen SmolLM2's last hidden state at the
    position of each reply token (where a reward head reads transition t: position t+1) to its gold,
    fit on the train replies, the ridge strength chosen on dev, scored on test like every model. As a
    sequence reward it is the sum of its token predictions (task v2's gold is the sum of the token golds),
    so its test accuracy is what a linear read-out of the frozen states reaches when taught the gold itself
    rather than noisy pair labels: a reference for the reward models' accuracy."""
    import numpy as np
    import torch

    import ava
    from avalib import data, gold, task, token_metrics

    lm, tokenizer = models.load_model("smollm2")
    built = task.load_task("default", progress=False)

    def features(split):
        rows = []
        for record in (r for r in built.records if r["split"] == split):
            examples, _ = data.encode(tokenizer, record["prompt"], record["responses"], CONFIG["max-length"])
            batch = data.collate(examples, tokenizer.pad_token_id)
            with torch.no_grad():
                hidden = ava.hidden_states(lm, **batch)  # (B, T, d)
            for row, (reply, example) in enumerate(zip(record["responses"], examples)):
                start, n = example["prompt_length"], len(example["input_ids"])
                text_ids = tokenizer(reply, add_special_tokens=False).input_ids
                n_text = min(len(text_ids), n - start)
                golds = gold.gold_token_rewards(reply, tokenizer)[:n_text]
                tokens = [tokenizer.decode([i]) for i in example["input_ids"][start:n]]
                rows.append((hidden[row, start:start + n_text].numpy(), np.array(golds), tokens[:n_text],
                             (record["prompt"], reply)))
        return rows

    train, dev, test = features("train"), features("dev"), features("test")
    x = np.concatenate([f for f, _, _, _ in train])
    y = np.concatenate([g for _, g, _, _ in train])
    mean_x, mean_y = x.mean(0), y.mean()
    gram, moment = (x - mean_x).T @ (x - mean_x), (x - mean_x).T @ (y - mean_y)

    def fit(strength):
        weight = np.linalg.solve(gram + strength * np.eye(len(gram)), moment)
        return lambda f: (f - mean_x) @ weight + mean_y

    def items(rows, predict):
        return [{"rewards": list(map(float, predict(f))), "gold": list(g), "tokens": t} for f, g, t, _ in rows]

    scores = {s: token_metrics.agreement(items(dev, fit(s)), bootstrap=0)["pearson"] for s in (1, 10, 100, 1000, 10000)}
    strength = max(scores, key=scores.get)
    by_reply = {key: dict(item, score=sum(item["rewards"])) for (*_, key), item in zip(test, items(test, fit(strength)))}
    scored = test_scores(lambda prompt, replies: [by_reply[prompt, reply] for reply in replies], tokenizer)
    scored.pop("readings")
    return {"row": "probe", "seed": 0, "ridge_strength": strength, "dev_pearson_by_strength": scores,
            "train_tokens": int(len(y)), **scored, "task": task_build(built)}


def summarise(row: str) -> dict | None:
    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"{runner.slug(row)}-seed*.json"))]
    if not runs:
        return None
    mean = lambda values: statistics.mean(values) if values else None
    spread = lambda values: statistics.stdev(values) if len(values) > 1 else None
    accuracy = [r["test"]["eval/accuracy"] for r in runs if "test" in r]
    return {"row": row, "seeds": [r["seed"] for r in runs], "runs": runs,
            "test_accuracy_mean": mean(accuracy), "test_accuracy_sd": spread(accuracy),
            **{f"{m}_mean": mean([r["tokens"][m] for r in runs]) for m in ("pearson", "pearson_nonzero", "auc",
                                                                           "return_to_go_pearson", "word_pearson")}}


def other_builds_table(main_runs: dict[tuple[str, int], dict]) -> str:
    """Runs kept from other builds of task v2 (RESULTS/build-REPLIES_SHA/*.json: a machine whose sampling gave
    other replies trains there), each beside the same row and seed of the main table: how much a result moves
    with the build. main_runs: (row, seed) -> result."""
    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("build-*/*-seed*.json"))]
    if not runs:
        return ""
    lines = ["", "Other builds of task v2 (the same command on a machine whose sampling gave other replies; result files "
             "under bench/results/token_rewards/build-*/), beside the same row and seed of the main table (its build above):", "",
             "| model | seed | replies | test accuracy % | main table | token Pearson | main table | Pearson, gold-bearing tokens | main table |",
             "|---|---|---|---|---|---|---|---|---|"]
    pick = lambda run, f: f(run) if run and "test" in run else "-"
    accuracy = lambda run: f"{100 * run['test']['eval/accuracy']:.1f}"
    pearson = lambda run: f"{run['tokens']['pearson']:+.2f}"
    nonzero = lambda run: f"{run['tokens']['pearson_nonzero']:+.2f}"
    for r in runs:
        ours = main_runs.get((r["row"], r["seed"]))
        lines.append(f"| {r['row']} | {r['seed']} | `{r.get('task', {}).get('replies_sha256')}` | {accuracy(r)} | "
                     f"{pick(ours, accuracy)} | {pearson(r)} | {pick(ours, pearson)} | {nonzero(r)} | {pick(ours, nonzero)} |")
    return "\n".join(lines) + "\n"


def cell(value, interval=None, percent=False) -> str:
    if value is None or value != value:
        return "-"
    scale = 100 if percent else 1
    text = f"{scale * value:.1f}" if percent else f"{value:+.2f}"
    return text + (f" ({scale * interval[0]:.{1 if percent else 2}f}, {scale * interval[1]:.{1 if percent else 2}f})"
                   if interval else "")


PAIRED_WITH = ("BT", "AVA-p")  # every row run on several seeds is paired with these, seed by seed


def seeds_table(table: list[dict]) -> str:
    """The rows run on more than one seed: test accuracy by seed, mean and standard deviation, each seed
    paired (exact McNemar on the same test pairs) with BT's and the faithful AVA-p's run of the same seed,
    and token Pearson by seed."""
    from bench.table1 import paired_by_seed

    runs_of = {s["row"]: {r["seed"]: r for r in s["runs"] if "test_margins" in r} for s in table}
    several = [s["row"] for s in table if len(runs_of[s["row"]]) > 1]
    if not several:
        return ""
    lines = ["", "Seeds (the same budget; test split, gold labels; each seed paired with the same seed of "
             + " and ".join(PAIRED_WITH) + "):", "",
             "| model | seeds | test accuracy % by seed | mean (sd) | "
             + " | ".join(f"vs {other} by seed: +/- (p)" for other in PAIRED_WITH) + " | token Pearson by seed | mean |",
             "|---|---|---|---|" + "---|" * len(PAIRED_WITH) + "---|---|"]
    for row in several:
        runs = runs_of[row]
        seeds = sorted(runs)
        accuracy = [100 * runs[s]["test"]["eval/accuracy"] for s in seeds]
        pearson = [runs[s]["tokens"]["pearson"] for s in seeds]
        paired = [paired_by_seed(runs, {} if other == row else runs_of.get(other, {}), "test_margins") for other in PAIRED_WITH]
        sd = f"{statistics.stdev(accuracy):.1f}"
        lines.append(f"| {row} | {', '.join(map(str, seeds))} | {', '.join(f'{a:.1f}' for a in accuracy)} | "
                     f"{statistics.mean(accuracy):.1f} ({sd}) | {' | '.join(paired)} | "
                     f"{', '.join(f'{p:+.2f}' for p in pearson)} | {statistics.mean(pearson):+.2f} |")
    return "\n".join(lines) + "\n"


def report() -> None:
    table = [s for s in (summarise(row) for row in [*ROWS, *REFERENCES]) if s]
    lines = ["| model | seed | test accuracy, gold labels % (Wilson 95%) | dev accuracy by epoch % | token Pearson | "
             "Pearson, gold-bearing tokens | AUC +/- tokens | returns-to-go Pearson | per-word Pearson |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in table:
        for r in s["runs"]:
            t = r["tokens"]
            test = cell(r["test"]["eval/accuracy"], r["test"]["eval/accuracy_wilson95"], True) if "test" in r else "-"
            curve = ", ".join(f"{100 * c['accuracy']:.1f}" for c in r.get("dev_curve", [])) or "-"
            lines.append(f"| {s['row']} | {r['seed']} | {test} | {curve} | {cell(t['pearson'], t['pearson_ci95'])} | "
                         f"{cell(t['pearson_nonzero'], t['pearson_nonzero_ci95'])} | {cell(t['auc'], t['auc_ci95'])} | "
                         f"{cell(t['return_to_go_pearson'], t['return_to_go_pearson_ci95'])} | "
                         f"{cell(t['word_pearson'], t['word_pearson_ci95'])} |")
    tested = next((r for s in table for r in s["runs"] if "test" in r), None)
    notes = [f"Task v2's test split: {tested['test']['eval/pairs']} pairs, gold labels; token metrics over "
             f"{tested['tokens']['replies']} replies ({tested['tokens']['tokens']} tokens, "
             f"{tested['tokens']['nonzero_tokens']} carrying a word valence). Intervals: Wilson for accuracy, "
             "bootstrap over replies for token metrics (95%)." if tested else "",
             "Regenerate: `python bench/token_rewards.py --report`; each row's command is in its result file.",
             builds_note(table)]
    notes += [f"{s['row']} seed {r['seed']}: Pearson of mu_t with its TD error delta_t (Eq. 14, which with Eq. 12 is "
              f"alpha * (pi_t(y_t+1) - pi_t+1(y_t+2)) + O(1/V)) {r['mu_vs_td_error_pearson']:+.2f}; of delta_t with the gold "
              f"{r['td_error_vs_gold']:+.2f}." + trace_note(r) for s in table for r in s["runs"] if "mu_vs_td_error_pearson" in r]
    text = ("\n".join(lines) + "\n\n" + "\n".join(n for n in notes if n) + "\n" + seeds_table(table)
            + other_builds_table({(s["row"], r["seed"]): r for s in table for r in s["runs"]}))
    (ROOT / "bench" / "results" / "token_rewards.md").write_text(text)
    (ROOT / "bench" / "results" / "token_rewards.json").write_text(
        json.dumps([{k: v for k, v in s.items() if k != "runs"} for s in table], indent=1))
    runner.update_page("docs/train_rm.md", text, "token_rewards", heading_level=4)
    runner.update_page("README.md", runner.glance(lines, ["model", "seed", "test accuracy, gold labels % (Wilson 95%)",
                                                         "token Pearson", "per-word Pearson"]), "token_rewards-glance",
                       script="token_rewards")
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="", help=f"comma-separated rows: {', '.join([*ROWS, *REFERENCES])}")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--epochs", type=int, default=CONFIG["epochs"], help="epochs (dev accuracy after each)")
    parser.add_argument("--report", action="store_true", help="only rebuild the tables from the results")
    args = parser.parse_args()
    if not args.report:
        for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
            if row == "probe":
                RESULTS.mkdir(parents=True, exist_ok=True)
                result_path("probe", 0).write_text(json.dumps(probe_row(), indent=1))
                continue
            if row not in ROWS:
                raise SystemExit(f"--rows: unknown row {row!r}; choose from {', '.join([*ROWS, *REFERENCES])}")
            for seed in [int(s) for s in args.seeds.split(",")]:
                run_row(row, seed, args.epochs)
    report()


if __name__ == "__main__":
    main()
