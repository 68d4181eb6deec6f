"""Reward models on the built-in task v2, trained to convergence, and their token rewards against the gold.

Every row trains with train_rm.py on builtin (task v2, the shipped build: noisy Bradley-Terry labels) for
the budget its row definition gives (ROWS: epochs, layers, lr), evaluating on the dev split's gold labels
after every epoch (`eval/accuracy` in metrics.jsonl: the curve shows where it stops improving); then,
once, on the test split against the gold labels (1,170 pairs; Wilson 95% interval, and a bootstrap
interval over the 78 requests, since a request's 15 pairs share its 6 replies: avalib/stats.py), and
token by token on every test reply (avalib/token_metrics.py: Pearson pooled and within each reply,
Spearman, on gold-bearing tokens, AUC, returns-to-go, per word; bootstrap intervals over replies).

Readings. The main one per model: AVA: mu_t (Eq. 19); Pref-Trans: r_t; BT, BT-var: the head's level at
every prefix (trained only at the last). Alternatives, each as fair to its model (READINGS): BT and
BT-var as the difference between successive prefixes (r_t - r_{t-1}: per-token rewards that sum to the
score), Pref-Trans as w_t r_t (the terms of the score it is trained on). Two references: a linear probe
fit by ridge regression on the frozen (untrained) SmolLM2's last hidden states to the gold token rewards
of the train replies (a ceiling for a linear read-out), and zero.

The uncertainty (issue: is sigma informative?): for every test pair the predicted probability that the
chosen reply wins, against the probability with which the task's labeller prefers it (sigmoid of the
gold difference at the labels' temperature): calibration error and a reliability table; AVA's
posterior Phi((S+ - S-) / sqrt(s+^2 + s-^2)) beside the sigmoid of its margin; the rank correlation of
sigma_t with the error of mu_t per token; and the accuracy of ranking by mu - k sigma.

    python bench/token_rewards.py --rows BT,AVA-p --seeds 0,1,2   # train what is missing, evaluate
    python bench/token_rewards.py --rows probe                    # the linear-probe ceiling
    python bench/token_rewards.py --rows BT --reevaluate          # evaluate this machine's trained models again
    python bench/token_rewards.py --report                        # rebuild the tables only

Results: bench/results/token_rewards/<row>-seed<k>.json (committed), bench/results/token_rewards.{json,md},
bench/results/calibration.png. Results made on earlier task builds (before the task was shipped) live under
bench/results/token_rewards/build-<replies>/ and are set beside the main table. Runs (checkpoints, models)
live under $AVA_CACHE/bench-runs/token_rewards/, keyed by their arguments.
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
from avalib import models, stats  # noqa: E402
from bench import runner  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "token_rewards"
# train_rm.py's defaults, with --max-length 160 (which cuts nothing on task v2); a row's own budget overrides them
CONFIG = {"trainable-layers": 2, "max-length": 160, "batch-size": 16, "lr": 1e-3, "epochs": 1}
ROWS = {  # name: train_rm.py arguments beyond CONFIG (its budget included)
    "BT": {"objective": "bt", "epochs": 2},  # BT's dev accuracy still rose in its second epoch
    "BT 4 layers at lr 3e-4": {"objective": "bt", "trainable-layers": 4, "lr": 3e-4},  # bench/budget.md's pick on dev
    "BT-var": {"objective": "bt-var"},
    "Pref-Trans": {"objective": "pref-trans"},
    "AVA-p": {"objective": "ava-p"},
    "AVA-d": {"objective": "ava-d"},
    # a second epoch: does dev accuracy still improve after the one epoch the seeds use?
    **{f"{name} 2 epochs": {"objective": objective, "epochs": 2} for name, objective in
       (("BT-var", "bt-var"), ("Pref-Trans", "pref-trans"), ("AVA-p", "ava-p"))},
    # AVA-p's dev accuracy still rose from the first epoch to the second on two of three seeds: a third
    "AVA-p 3 epochs": {"objective": "ava-p", "epochs": 3},
    # our AVA-p variants (ava.PRESETS; ava.py's docstring says what each changes and why)
    **{f"AVA-p {name}": {"objective": "ava-p", "preset": name} for name in
       ("return-cer", "centred-td", "centred-td-return", "centred-td-discounted", "mu-weights", "mu-weights-floor",
        "mu-weights-half-td")},
    # which AVA term earns the recommended variant its place: it without the IRL terms, with the KL or the TD term
    # alone, and with the TD term's weight lambda at 0 (= KL only), 0.25, 0.75 (0.5 is the variant, 1 mu-weights)
    **{f"AVA-p half-td {name}": {"objective": "ava-p", "preset": "mu-weights-half-td", **change} for name, change in
       (("w/o irl", {"irl": False}), ("TD only", {"kl-weight": 0.0}), ("KL only", {"lam": 0.0}),
        ("lambda 0.25", {"lam": 0.25}), ("lambda 0.75", {"lam": 0.75}))},
    # a stability candidate (screened on dev with the lambda rows): mu-weights at full TD weight with sigma kept
    # >= 0.5, where mu-weights-floor's 0.1 still let mu^2 / (2 sigma^2) pin mu to 0
    "AVA-p mu-weights sigma-floor 0.5": {"objective": "ava-p", "preset": "mu-weights", "sigma-min": 0.5},
    # AVA-d with the variant's switches: does it learn from the chosen replies alone?
    "AVA-d mu-weights-half-td": {"objective": "ava-d", "preset": "mu-weights-half-td"},
    # a DPO policy (train_direct.py); its implicit per-token reward beta * log pi/pi_ref is a token-level
    # soft-Q reading (Rafailov et al. 2024, "From r to Q*"); lr: train_direct.py's default for a policy
    "DPO": {"script": "train_direct.py", "objective": "dpo", "lr": 1e-4, "dpo-beta": 0.1},
}
REFERENCES = ("probe",)
# the alternative readings (module docstring): name -> (the objectives it applies to, item -> per-token rewards)
READINGS = {
    "prefix difference": (("bt", "bt-var"), lambda item: item["differences"]),
    "w_t r_t": (("pref-trans",), lambda item: [w * r / len(item["weights"]) for w, r in zip(item["weights"], item["rewards"])]),
}
PESSIMISM = (0.5, 1.0, 2.0)  # k of the ranking by mu - k sigma
GLANCE = ("BT", "BT-var", "Pref-Trans", "AVA-p", "AVA-p 2 epochs", "AVA-d", "AVA-p mu-weights", "AVA-p mu-weights-half-td",
          "DPO", "probe")  # the README's rows; docs/train_rm.md has every row


def row_flags(row: str) -> dict:
    """The row's train flags: CONFIG, then its own (its budget included)."""
    return {**CONFIG, **ROWS[row]}


def run_arguments(row: str, seed: int) -> list[str]:
    flags = {**row_flags(row), "seed": seed}
    flags.pop("script", None)
    own = ["--eval-prompts", "none"] if script_of(row) == "train_direct.py" else ["--no-export-hf"]
    return ["--data", "builtin", "--eval-data", "builtin:gold", "--eval-split", "dev", *own] + [
        item for k, v in flags.items() for item in ([f"--{'' if v else 'no-'}{k}"] if isinstance(v, bool) else [f"--{k}", str(v)])]


def script_of(row: str) -> str:
    return ROWS[row].get("script", "train_rm.py")


def result_path(row: str, seed: int) -> Path:
    return RESULTS / f"{runner.slug(row)}-seed{seed}.json"


def replies_of(split: str):
    """Every request of a split with its replies: [(prompt, [reply, ...])]."""
    from avalib import task

    return [(r["prompt"], r["responses"]) for r in task.load_task("default", progress=False).records if r["split"] == split]


def test_pairs(tokenizer=None) -> list[dict]:
    """The test pairs, gold-labelled, in the order of every result's test_margins (the scripts' own loader)."""
    from avalib import sources

    return sources.load_rows("builtin:gold", "pairs", "test", tokenizer)[0]


def pair_requests(split: str = "test") -> list[str]:
    """The request (prompt) of each pair of a split, in the order of the results' margins: the clusters of
    every interval and paired test (avalib/stats.py)."""
    from avalib import task

    return [p["prompt"] for p in task.load_task("default", progress=False).pairs(split, noise_free=True)]


def token_table(model, tokenizer, split: str, max_length: int) -> dict:
    """token_metrics.agreement of a model's per-token readings on every reply of a split."""
    from avalib import token_metrics, viz

    return token_metrics.agreement([item for prompt, replies in replies_of(split)
                                    for item in viz.token_readings(model, tokenizer, prompt, replies, max_length, gold=True)])


def evaluate_model(model_dir: Path, max_length: int) -> dict:
    """Test accuracy against the gold labels, the token tables (main reading and READINGS) and the uncertainty
    measures of a saved reward model. Each test reply is read once (viz.token_readings: its score, its per-token
    rewards, sigma where there is one); a pair's margin is the difference of its two replies' scores (the 1,170
    test pairs share 468 replies)."""
    import numpy as np

    from avalib import reward_models, token_metrics, viz

    model, tokenizer, _ = reward_models.load_reward_model(model_dir)
    result = test_scores(lambda prompt, replies: viz.token_readings(model, tokenizer, prompt, replies, max_length, gold=True), tokenizer)
    readings, kind = result.pop("readings"), result.pop("kind")
    result["tokens_by_reading"] = {name: token_metrics.agreement([dict(item, rewards=read(item)) for item in readings])
                                   for name, (kinds, read) in READINGS.items() if kind in kinds}
    result["dev_tokens"] = token_table(model, tokenizer, "dev", max_length)  # for screens, which choose on dev only
    if readings and readings[0]["deltas"] is not None:  # AVA: how much of mu_t is the TD error delta_t (Eq. 14)
        pairs_md = [(m, d) for item in readings for m, d in zip(item["rewards"], item["deltas"]) if d is not None]
        mu, delta = np.array(pairs_md).T
        result["mu_vs_td_error_pearson"] = float(np.corrcoef(mu, delta)[0, 1])
        result["td_error_vs_gold"] = token_metrics.agreement([dict(item, rewards=[0.0 if d is None else d for d in item["deltas"]])
                                                              for item in readings], bootstrap=0)["pearson"]
        result["sigma_vs_error"] = sigma_versus_error(readings)
        result["mu_tracks"] = what_mu_tracks(model, tokenizer, readings, max_length)
    return result


def what_mu_tracks(model, tokenizer, readings: list[dict], max_length: int) -> dict:
    """What an AVA model's mu_t follows on the test replies, each a Pearson pooled over tokens: the gold, its own
    TD error delta_t, the log-probability the model's LM gives the token (log pi(y_t+1 | y_1:t): with Eq. 12 the TD
    error is a likelihood contrast), and the token's position in its reply (0 first, 1 last)."""
    import numpy as np
    import torch

    import ava
    from avalib import data

    logps = []
    with torch.no_grad():
        for prompt, replies in replies_of("test"):
            batch = data.collate(data.encode(tokenizer, prompt, replies, max_length)[0], tokenizer.pad_token_id)
            logp = ava.token_logprobs(model.lm, **batch)  # (B, T-1), zero off the response
            logps += [logp[row, batch["response_mask"][row, 1:].bool()].tolist() for row in range(len(replies))]
    rows = [(m, d, lp, t / max(len(item["rewards"]) - 1, 1), g) for item, logp in zip(readings, logps)
            for t, (m, d, lp, g) in enumerate(zip(item["rewards"], item["deltas"], logp, item["gold"]))]
    mu, delta, logp, position, gold = (np.array([np.nan if v is None else v for v in column], dtype=float) for column in zip(*rows))
    pearson = lambda x, y: float(np.corrcoef(x[(ok := ~np.isnan(x) & ~np.isnan(y))], y[ok])[0, 1])
    return {"gold": pearson(mu, gold), "td_error": pearson(mu, delta), "token_logprob": pearson(mu, logp),
            "position": pearson(mu, position), "td_error_vs_token_logprob": pearson(delta, logp), "tokens": len(rows)}


def sigma_versus_error(readings: list[dict]) -> dict:
    """Does sigma_t say where mu_t is wrong? The gold is in other units than mu, so mu is first mapped to the gold
    by least squares (g ~ a mu + b, pooled over the test tokens); then the rank correlation of sigma_t with
    |g_t - (a mu_t + b)| per token, pooled and within replies, and the sigma_t spread (a constant sigma says nothing)."""
    import numpy as np

    from avalib import evaluation

    rows = [(m, s, g, i) for i, item in enumerate(readings) for m, s, g in zip(item["rewards"], item["sigmas"], item["gold"])
            if g is not None]
    mu, sigma, gold, reply = (np.array(column) for column in zip(*rows))
    slope, intercept = np.polyfit(mu, gold, 1) if np.ptp(mu) > 0 else (0.0, gold.mean())
    error = np.abs(gold - (slope * mu + intercept))
    centred = lambda x: x - (np.bincount(reply, weights=x) / np.bincount(reply))[reply]
    return {"spearman": evaluation.rank_correlation(sigma, error) if np.ptp(sigma) > 0 else float("nan"),
            "within_reply_spearman": evaluation.rank_correlation(centred(sigma), centred(error)) if np.ptp(sigma) > 0 else float("nan"),
            "sigma_quantiles": [float(q) for q in np.percentile(sigma, [10, 50, 90])], "tokens": len(rows)}


def test_scores(readings_of, tokenizer) -> dict:
    """Test accuracy against the gold labels from per-reply readings: readings_of(prompt, replies) -> items with
    "score" (the sequence reward) and token readings; a pair's margin is its replies' score difference. With the
    margins: the request-clustered interval, and the uncertainty measures (`uncertainty`)."""
    from avalib import evaluation, token_metrics

    readings, by_reply = [], {}
    for prompt, replies in replies_of("test"):
        for reply, item in zip(replies, readings_of(prompt, replies)):
            readings.append(item)
            by_reply[prompt, reply] = item
    pairs = test_pairs(tokenizer)
    margins = [by_reply[p["prompt"], p["chosen"]]["score"] - by_reply[p["prompt"], p["rejected"]]["score"] for p in pairs]
    requests = [p["prompt"] for p in pairs]
    accuracy = evaluation.pairwise_accuracy(margins)
    return {"test": {**accuracy, "accuracy_requests95": stats.accuracy_interval(margins, requests)["ci95"]},
            "test_margins": margins, "tokens": token_metrics.agreement(readings),
            "uncertainty": uncertainty(pairs, by_reply, margins, requests, readings[0]["kind"]),
            "readings": readings, "kind": readings[0]["kind"]}


def uncertainty(pairs: list[dict], by_reply: dict, margins: list[float], requests: list[str], kind: str) -> dict:
    """The predicted probability that each test pair's chosen reply wins, against the probability with which the
    task's labeller prefers it, sigmoid((gold+ - gold-) / tau): stats.calibration of the sigmoid of the margin
    (the link BT, Pref-Trans, CER and DPO train through) and, where the model has a sigma, of its own probability
    (AVA: the posterior Phi(margin / sqrt(s+^2 + s-^2)); BT-var: Eq. 26's sigmoid(margin / sqrt((v+^2 + v-^2) / 2)));
    for AVA also the accuracy of ranking by mu - k sigma for k in PESSIMISM, each paired with k = 0."""
    import math

    from avalib import evaluation, task

    tau = task.SIZES["default"].bt_temperature
    target = [1 / (1 + math.exp(-(p["score_chosen"] - p["score_rejected"]) / tau)) for p in pairs]
    sigmoid = lambda x: 1 / (1 + math.exp(-max(min(x, 50.0), -50.0)))
    out = {"sigmoid": stats.calibration([sigmoid(m) for m in margins], target)}
    sigmas = [(by_reply[p["prompt"], p["chosen"]].get("score_sigma"), by_reply[p["prompt"], p["rejected"]].get("score_sigma"))
              for p in pairs]
    if sigmas[0][0] is None:
        return out
    if kind == "ava":
        posterior = [0.5 * math.erfc(-m / math.sqrt(2 * (a * a + b * b))) for m, (a, b) in zip(margins, sigmas)]
        out["posterior"] = stats.calibration(posterior, target)
        out["pessimism"] = {}
        for k in PESSIMISM:
            shifted = [m - k * (a - b) for m, (a, b) in zip(margins, sigmas)]  # (mu+ - k s+) - (mu- - k s-)
            out["pessimism"][str(k)] = {"accuracy": evaluation.pairwise_accuracy(shifted)["eval/accuracy"],
                                        "vs_k0": stats.paired(shifted, margins, requests)}
    else:  # bt-var
        out["eq26"] = stats.calibration([sigmoid(m / math.sqrt((a * a + b * b) / 2)) for m, (a, b) in zip(margins, sigmas)], target)
    return out


def evaluate_dpo(policy_dir: Path, beta: float, max_length: int) -> dict:
    """DPO's implicit reward token by token (viz.implicit_token_readings: beta * log pi/pi_ref, the initial
    SmolLM2 as pi_ref), a reply's score their sum (DPO's implicit sequence reward)."""
    from avalib import viz

    policy, tokenizer = models.load_model(str(policy_dir))
    reference, _ = models.load_model("smollm2", tokenizer=tokenizer)
    result = test_scores(lambda prompt, replies: viz.implicit_token_readings(
        policy, reference, tokenizer, prompt, replies, beta, max_length, gold=True), tokenizer)
    result.pop("readings"), result.pop("kind")
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


def run_directory(row: str, seed: int) -> Path:
    """Where a row's run lives (checkpoints, metrics, the model): $AVA_CACHE/bench-runs/token_rewards/."""
    key = hashlib.sha256(json.dumps(run_arguments(row, seed)).encode()).hexdigest()[:12]
    return models.cache_dir() / "bench-runs" / "token_rewards" / f"{result_path(row, seed).stem}-{key}"


def main_build() -> str | None:
    """The task build the main table is on: the shipped default task's replies (avalib/task_data/MANIFEST.json)."""
    from avalib import shipped_task

    return shipped_task.manifest().get("default", {}).get("replies_sha256")


def build_result_path(row: str, seed: int, replies_sha256: str) -> Path:
    """Where a run on this build of task v2 keeps its result: the main table's file when the build is the main
    table's (the shipped one), else RESULTS/build-REPLIES_SHA/ beside it (other_builds_table), so that a run on
    other test pairs never overwrites the main table."""
    path = result_path(row, seed)
    return path if replies_sha256 == main_build() else path.parent / f"build-{replies_sha256}" / path.name


def run_row(row: str, seed: int, need_model: bool = False, quiet: bool = False, reevaluate: bool = False) -> dict:
    """The row's result, run now if it is missing (or, with need_model, if its trained model is not on this
    machine: results are committed, models are not, so a new machine trains it again). Without need_model a
    committed main-table result stands; reevaluate evaluates a model trained here again (after the evaluation
    changed), without training it. quiet: the training's output goes to train.log in its run directory."""
    arguments = run_arguments(row, seed)
    key = hashlib.sha256(json.dumps(arguments).encode()).hexdigest()[:12]
    output_dir = run_directory(row, seed)
    have_model = (output_dir / "final.json").is_file()

    def stored(path: Path) -> dict | None:
        result = json.loads(path.read_text()) if path.is_file() else {}
        return result if result.get("key") == key else None

    if not need_model and not reevaluate and (result := stored(result_path(row, seed))):
        return result
    from avalib import task

    built = task.load_task("default", progress=False)
    build = task_build(built)
    path = build_result_path(row, seed, build["replies_sha256"])
    if have_model and not reevaluate and (result := stored(path)):
        return result
    if reevaluate and not have_model:
        raise SystemExit(f"--reevaluate {row!r} seed {seed}: no trained model at {output_dir}")
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
              "training_trace": training_trace(output_dir), **evaluated, "task": build}
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
            **{f"{m}_mean": mean([r["tokens"][m] for r in runs if m in r["tokens"]])
               for m in ("pearson", "within_reply_pearson", "pearson_nonzero", "auc", "return_to_go_pearson", "word_pearson")}}


def other_builds_table(main_runs: dict[tuple[str, int], dict]) -> str:
    """Runs kept from other builds of task v2 (RESULTS/build-REPLIES_SHA/*.json: made before the task was shipped,
    on machines whose sampling gave other replies; build-unrecorded/: before results recorded their build) and from
    other machines on the shipped build (RESULTS/other-machine-REPLIES_SHA/*.json), each beside the same row and seed
    of the main table: how much a result moves with the build, and with the machine (on the same build, the largest
    difference of a test pair's margin says how far training numerics drift between two CPUs). main_runs: (row, seed)
    -> result."""
    runs = [(p.parent.name, json.loads(p.read_text())) for p in
            sorted([*RESULTS.glob("build-*/*-seed*.json"), *RESULTS.glob("other-machine-*/*-seed*.json")])]
    if not runs:
        return ""
    lines = ["", "## Other builds and other machines", "",
             "Other builds of task v2 (`earlier build`: the same command on a machine whose sampling gave other replies, before "
             "the task was shipped) and other machines on the shipped build (`other machine`), beside the same row and seed "
             "of the main table (result files under bench/results/token_rewards/):", "",
             "| model | seed | where | replies | test accuracy % | main table | token Pearson | main table | "
             "Pearson, gold-bearing tokens | main table | largest test-margin difference |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    pick = lambda run, f: f(run) if run and "test" in run else "-"
    accuracy = lambda run: f"{100 * run['test']['eval/accuracy']:.1f}"
    pearson = lambda run: f"{run['tokens']['pearson']:+.2f}"
    nonzero = lambda run: f"{run['tokens']['pearson_nonzero']:+.2f}"
    for where, r in runs:
        ours = main_runs.get((r["row"], r["seed"]))
        same_build = ours and ours.get("task", {}).get("replies_sha256") == r.get("task", {}).get("replies_sha256")
        drift = (f"{max(abs(a - b) for a, b in zip(r['test_margins'], ours['test_margins'])):.1e}"
                 if same_build and "test_margins" in r and "test_margins" in ours else "-")
        lines.append(f"| {r['row']} | {r['seed']} | {'other machine' if where.startswith('other-machine') else 'earlier build'} | "
                     f"{'`' + r['task']['replies_sha256'] + '`' if r.get('task', {}).get('replies_sha256') else 'not recorded'} | "
                     f"{accuracy(r)} | {pick(ours, accuracy)} | {pearson(r)} | {pick(ours, pearson)} | {nonzero(r)} | "
                     f"{pick(ours, nonzero)} | {drift} |")
    return "\n".join(lines) + "\n"


def cell(value, interval=None, percent=False) -> str:
    if value is None or value != value:
        return "-"
    scale = 100 if percent else 1
    text = f"{scale * value:.1f}" if percent else f"{value:+.2f}"
    return text + (f" ({scale * interval[0]:.{1 if percent else 2}f}, {scale * interval[1]:.{1 if percent else 2}f})"
                   if interval else "")


def interval_cell(interval) -> str:
    """'71.4-76.4' for a 95% interval of an accuracy, '-' for none."""
    return f"{100 * interval[0]:.1f}-{100 * interval[1]:.1f}" if interval else "-"


PAIRED_WITH = ("BT", "Pref-Trans")  # every row is paired with these on the same test pairs, seeds averaged


def mean_sd(values: list[float], fmt: str) -> str:
    """'73.7 (0.6)': the mean, and the sample sd over seeds when there are several."""
    if not values:
        return "-"
    return format(statistics.mean(values), fmt) + (f" ({statistics.stdev(values):{fmt.lstrip('+')}})" if len(values) > 1 else "")


def models_table(table: list[dict], requests: list[str]) -> list[str]:
    """One row per model: seeds, test accuracy mean (sd over seeds), the seeds' pair-averaged accuracy with its 95%
    bootstrap interval over requests, the paired difference with PAIRED_WITH (seeds averaged pair by pair, then a
    bootstrap interval and a sign-flip test over the 78 requests: avalib/stats.py), and the token measures' means."""
    runs_of = {s["row"]: [r for r in s["runs"] if "test_margins" in r] for s in table}
    lines = ["| model | seeds | test accuracy % mean (sd) | seeds pooled, 95% by request | "
             + " | ".join(f"vs {other}: difference (95%), p" for other in PAIRED_WITH)
             + " | token Pearson | within-reply Pearson | per-word Pearson |",
             "|---|---|---|---|" + "---|" * len(PAIRED_WITH) + "---|---|---|"]
    for s in table:
        runs = runs_of[s["row"]]
        if not runs:
            continue
        margins = [r["test_margins"] for r in runs]
        pooled = stats.accuracy_interval(margins, requests)
        paired = []
        for other in PAIRED_WITH:
            theirs = [r["test_margins"] for r in runs_of.get(other, [])]
            if other == s["row"] or not theirs:
                paired.append("-")
                continue
            m = stats.paired(margins, theirs, requests)
            paired.append(f"{100 * m['difference']:+.1f} ({100 * m['ci95'][0]:+.1f}, {100 * m['ci95'][1]:+.1f}), "
                          f"{stats.format_p(m['p'])}")
        token = lambda metric: mean_sd([r["tokens"][metric] for r in runs if r["tokens"].get(metric) is not None], "+.2f")
        lines.append(f"| {s['row']} | {', '.join(str(r['seed']) for r in runs)} | "
                     f"{mean_sd([100 * r['test']['eval/accuracy'] for r in runs], '.1f')} | "
                     f"{cell(pooled['accuracy'], pooled['ci95'], True)} | {' | '.join(paired)} | {token('pearson')} | "
                     f"{token('within_reply_pearson')} | {token('word_pearson')} |")
    return lines


def readings_table(table: list[dict]) -> list[str]:
    """Every reading of the rows that have alternatives (READINGS) beside their main one, seed by seed."""
    lines = ["| model | seed | reading | token Pearson | within-reply Pearson | Pearson, gold-bearing tokens | per-word Pearson |",
             "|---|---|---|---|---|---|---|"]
    for s in table:
        for r in s["runs"]:
            for name, t in [("main", r["tokens"]), *r.get("tokens_by_reading", {}).items()]:
                if not r.get("tokens_by_reading"):
                    break
                lines.append(f"| {s['row']} | {r['seed']} | {name} | {cell(t['pearson'], t['pearson_ci95'])} | "
                             f"{cell(t.get('within_reply_pearson'), t.get('within_reply_pearson_ci95'))} | "
                             f"{cell(t['pearson_nonzero'], t['pearson_nonzero_ci95'])} | {cell(t['word_pearson'], t['word_pearson_ci95'])} |")
    return lines if len(lines) > 2 else []


def uncertainty_table(table: list[dict]) -> list[str]:
    """Calibration (ECE, Brier) of each model's predicted preference probability against the labeller's, the rank
    correlation of sigma_t with the error of mu_t, and AVA's accuracy when ranking by mu - k sigma."""
    lines = ["| model | seed | ECE, sigmoid of margin | ECE, own probability | Brier, sigmoid / own | sigma_t vs error of mu_t: "
             "Spearman (within reply) | sigma_t 10/50/90% | test accuracy % at k = 0 / " + " / ".join(map(str, PESSIMISM)) + " |",
             "|---|---|---|---|---|---|---|---|"]
    for s in table:
        for r in (r for r in s["runs"] if r.get("uncertainty")):
            u, error = r["uncertainty"], r.get("sigma_vs_error")
            own_name = next((name for name in ("posterior", "eq26") if name in u), None)
            own = u.get(own_name, {})
            cells = [s["row"], str(r["seed"]), f"{u['sigmoid']['ece']:.3f}",
                     f"{own['ece']:.3f} ({'posterior' if own_name == 'posterior' else 'Eq. 26'})" if own else "-",
                     f"{u['sigmoid']['brier']:.3f} / " + (f"{own['brier']:.3f}" if own else "-"),
                     f"{error['spearman']:+.2f} ({error['within_reply_spearman']:+.2f})" if error else "-",
                     " / ".join(f"{q:.2f}" for q in error["sigma_quantiles"]) if error else "-",
                     f"{100 * r['test']['eval/accuracy']:.1f} / " + " / ".join(
                         f"{100 * u['pessimism'][str(k)]['accuracy']:.1f} (p {stats.format_p(u['pessimism'][str(k)]['vs_k0']['p'])})"
                         for k in PESSIMISM) if "pessimism" in u else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines if len(lines) > 2 else []


VARIANT = "AVA-p mu-weights-half-td"
ABLATION_ROWS = {  # row: what it is, against the recommended variant (lambda 0.5, KL and TD on)
    VARIANT: "the variant: CER on sum_t w_t mu_t, KL, TD at lambda 0.5",
    "AVA-p half-td w/o irl": "no KL, no TD (CER and the likelihood terms only)",
    "AVA-p half-td TD only": "no KL (kl_weight 0), TD at lambda 0.5",
    "AVA-p half-td KL only": "KL, no TD (lambda 0)",
    "AVA-p half-td lambda 0.25": "TD at lambda 0.25",
    "AVA-p half-td lambda 0.75": "TD at lambda 0.75",
    "AVA-p mu-weights": "TD at lambda 1 (the paper's weight)",
    "AVA-p mu-weights sigma-floor 0.5": "TD at lambda 1, sigma >= 0.5",
    "Pref-Trans": "reference: BT on sum_t w_t r_t, no Bayesian terms",
}
COLLAPSED = 0.55  # a run whose test accuracy ends below this has collapsed (mu_t = 0 leaves the margins at 0: chance)


def ablation_table(table: list[dict], requests: list[str]) -> list[str]:
    """Which AVA term earns the variant its place: each ablation's seeds pooled pair by pair, paired by request with the
    variant and with Pref-Trans, and its token measures (mean, sd over seeds); collapsed seeds counted."""
    runs_of = {s["row"]: [r for r in s["runs"] if "test_margins" in r] for s in table}
    lines = ["| row | what | seeds | test accuracy % mean (sd) | collapsed | vs the variant: difference (95%), p | "
             "vs Pref-Trans: difference (95%), p | token Pearson | within-reply | gold-bearing tokens |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row, what in ABLATION_ROWS.items():
        runs = runs_of.get(row, [])
        if not runs:
            continue
        margins = [r["test_margins"] for r in runs]

        def versus(other):
            theirs = [r["test_margins"] for r in runs_of.get(other, [])]
            if other == row or not theirs:
                return "-"
            m = stats.paired(margins, theirs, requests)
            return f"{100 * m['difference']:+.1f} ({100 * m['ci95'][0]:+.1f}, {100 * m['ci95'][1]:+.1f}), {stats.format_p(m['p'])}"

        token = lambda metric: mean_sd([r["tokens"][metric] for r in runs if r["tokens"].get(metric) is not None], "+.2f")
        lines.append(f"| {row} | {what} | {', '.join(str(r['seed']) for r in runs)} | "
                     f"{mean_sd([100 * r['test']['eval/accuracy'] for r in runs], '.1f')} | "
                     f"{sum(r['test']['eval/accuracy'] < COLLAPSED for r in runs)} of {len(runs)} | {versus(VARIANT)} | "
                     f"{versus('Pref-Trans')} | {token('pearson')} | {token('within_reply_pearson')} | {token('pearson_nonzero')} |")
    return lines if len(lines) > 3 else []


def stability_screen(table: list[dict]) -> list[str]:
    """The screen for a variant both stable and near the probe's token Pearson, on dev only: each candidate's dev
    accuracy and dev token Pearson by seed, against the rule set before looking (every seed: dev accuracy above
    COLLAPSED, dev token Pearson within 0.1 of the probe's dev Pearson, dev accuracy no more than 1 point below
    Pref-Trans's seed-mean dev accuracy). Candidates that pass go to test (their rows in the tables above)."""
    runs_of = {s["row"]: s["runs"] for s in table}
    probe = next((r for r in runs_of.get("probe", [])), None)
    reference = [r["dev"]["accuracy"] for r in runs_of.get("Pref-Trans", []) if r.get("dev", {}).get("accuracy") is not None]
    if probe is None or not reference:
        return []
    probe_dev = max(probe["dev_pearson_by_strength"].values())
    bar = statistics.mean(reference) - 0.01
    lines = [f"Rule (dev only): on every seed dev accuracy > {100 * COLLAPSED:.0f}% and >= {100 * bar:.1f}% (Pref-Trans's dev mean "
             f"{100 * statistics.mean(reference):.1f}% less 1 point), and dev token Pearson >= {probe_dev - 0.1:+.2f} (the probe's "
             f"dev Pearson {probe_dev:+.2f} less 0.1).", "",
             "| candidate | seeds | dev accuracy % by seed | dev token Pearson by seed | passes |", "|---|---|---|---|---|"]
    for row in [r for r in ABLATION_ROWS if r.startswith("AVA-p")]:
        runs = [r for r in runs_of.get(row, []) if r.get("dev_tokens")]
        if not runs:
            continue
        passes = len(runs) >= 3 and all(r["dev"]["accuracy"] > COLLAPSED and r["dev"]["accuracy"] >= bar
                                        and r["dev_tokens"]["pearson"] >= probe_dev - 0.1 for r in runs)
        accuracy = ", ".join(f"{100 * r['dev']['accuracy']:.1f}" for r in runs)
        pearson = ", ".join(f"{r['dev_tokens']['pearson']:+.2f}" for r in runs)
        seeds = ", ".join(str(r["seed"]) for r in runs)
        lines.append(f"| {row} | {seeds} | {accuracy} | {pearson} | {'yes' if passes else 'no'} |")
    return lines


def mu_tracks_table(table: list[dict]) -> list[str]:
    """What each AVA model's mu_t follows (what_mu_tracks), seed by seed."""
    lines = ["| model | seed | test accuracy % | mu_t vs gold | vs its TD error delta_t | vs log pi(token) | vs position in reply | "
             "delta_t vs log pi(token) |", "|---|---|---|---|---|---|---|---|"]
    for s in table:
        for r in (r for r in s["runs"] if r.get("mu_tracks")):
            m = r["mu_tracks"]
            lines.append(f"| {s['row']} | {r['seed']} | {100 * r['test']['eval/accuracy']:.1f} | {m['gold']:+.2f} | {m['td_error']:+.2f} | "
                         f"{m['token_logprob']:+.2f} | {m['position']:+.2f} | {m['td_error_vs_token_logprob']:+.2f} |")
    return lines if len(lines) > 2 else []


def calibration_plot(table: list[dict], path: Path) -> None:
    """Reliability diagrams: predicted probability against the labeller's, per model (seeds' bins pooled), the
    sigmoid of the margin and, where there is one, the model's own probability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [s for s in table if any(r.get("uncertainty") for r in s["runs"]) and s["row"] in
             ("BT", "BT-var", "Pref-Trans", "AVA-p", "AVA-p mu-weights", "AVA-p mu-weights-half-td")]
    if not shown:
        return
    figure, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.3), squeeze=False)
    for axis, s in zip(axes[0], shown):
        for name, style in (("sigmoid", "o-"), ("posterior", "s--"), ("eq26", "s--")):
            bins = [b for r in s["runs"] if name in r.get("uncertainty", {}) for b in r["uncertainty"][name]["bins"]]
            if not bins:
                continue
            merged = {}
            for b in bins:
                m = merged.setdefault(tuple(b["bin"]), [0, 0.0, 0.0])
                m[0] += b["count"]
                m[1] += b["count"] * b["predicted"]
                m[2] += b["count"] * b["target"]
            xs = [m[1] / m[0] for m in merged.values()]
            ys = [m[2] / m[0] for m in merged.values()]
            label = {"sigmoid": "sigmoid(margin)", "posterior": "posterior (sigma)", "eq26": "Eq. 26 (spread)"}[name]
            axis.plot(xs, ys, style, markersize=3, label=label)
        axis.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
        axis.set_title(s["row"], fontsize=9)
        axis.set_xlabel("predicted P(chosen wins)", fontsize=8)
        axis.legend(fontsize=7)
    axes[0][0].set_ylabel("labeller's P(chosen wins)", fontsize=8)
    figure.suptitle("Calibration on task v2's test pairs (both orientations; seeds pooled)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report() -> None:
    table = [s for s in (summarise(row) for row in [*ROWS, *REFERENCES]) if s]
    requests = pair_requests("test")
    lines = ["| model | seed | test accuracy, gold labels % (Wilson 95%) | 95% by request | dev accuracy by epoch % | token Pearson | "
             "within-reply Pearson | Pearson, gold-bearing tokens | AUC +/- tokens | returns-to-go Pearson | per-word Pearson |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in table:
        for r in s["runs"]:
            t = r["tokens"]
            test = cell(r["test"]["eval/accuracy"], r["test"]["eval/accuracy_wilson95"], True) if "test" in r else "-"
            by_request = r["test"].get("accuracy_requests95") if "test" in r else None
            curve = ", ".join(f"{100 * c['accuracy']:.1f}" for c in r.get("dev_curve", [])) or "-"
            lines.append(f"| {s['row']} | {r['seed']} | {test} | {interval_cell(by_request)} | "
                         f"{curve} | {cell(t['pearson'], t['pearson_ci95'])} | "
                         f"{cell(t.get('within_reply_pearson'), t.get('within_reply_pearson_ci95'))} | "
                         f"{cell(t['pearson_nonzero'], t['pearson_nonzero_ci95'])} | {cell(t['auc'], t['auc_ci95'])} | "
                         f"{cell(t['return_to_go_pearson'], t['return_to_go_pearson_ci95'])} | "
                         f"{cell(t['word_pearson'], t['word_pearson_ci95'])} |")
    tested = next((r for s in table for r in s["runs"] if "test" in r), None)
    notes = [f"Task v2's test split (the shipped build, replies `{main_build()}`): {tested['test']['eval/pairs']} pairs of "
             f"{len(set(requests))} requests, gold labels; token metrics over {tested['tokens']['replies']} replies "
             f"({tested['tokens']['tokens']} tokens, {tested['tokens']['nonzero_tokens']} carrying a word valence). Intervals: "
             "Wilson and a bootstrap over requests for accuracy, a bootstrap over replies for token metrics (95%). Each row's "
             "budget is in its definition (bench/token_rewards.py: ROWS) and its command in its result file." if tested else "",
             "Regenerate: `python bench/token_rewards.py --report`.", builds_note(table)]
    notes += [f"{s['row']} seed {r['seed']}: Pearson of mu_t with its TD error delta_t (Eq. 14, which with Eq. 12 is "
              f"alpha * (pi_t(y_t+1) - pi_t+1(y_t+2)) + O(1/V)) {r['mu_vs_td_error_pearson']:+.2f}; of delta_t with the gold "
              f"{r['td_error_vs_gold']:+.2f}." + trace_note(r) for s in table for r in s["runs"] if "mu_vs_td_error_pearson" in r]
    summary = models_table(table, requests)
    readings, uncertain, tracks = readings_table(table), uncertainty_table(table), mu_tracks_table(table)
    ablation, screen = ablation_table(table, requests), stability_screen(table)
    text = ("## By model\n\nSeeds pooled: each test pair's score (1 right, 1/2 tie, 0 wrong) averaged over the seeds, then "
            "resampled (interval) and sign-flipped (p) by request, so neither the 15 pairs of a request nor the seeds that "
            "share the pairs count as independent (avalib/stats.py).\n\n" + "\n".join(summary)
            + "\n\n## By seed\n\n" + "\n".join(lines) + "\n\n" + "\n".join(n for n in notes if n) + "\n"
            + ("\n## What AVA's terms add: ablations of the recommended variant\n\nEach row is the variant "
               f"(`--preset mu-weights-half-td`) with one change, its seeds pooled pair by pair and paired by request with "
               f"the variant and with Pref-Trans; collapsed: test accuracy below {100 * COLLAPSED:.0f}%.\n\n" + "\n".join(ablation) + "\n"
               if ablation else "")
            + ("\n## A variant both stable and near the probe: the screen on dev\n\n" + "\n".join(screen) + "\n" if screen else "")
            + ("\n## Alternative readings\n\nBT and BT-var read as the difference between successive prefixes (r_t - r_{t-1}), "
               "Pref-Trans as w_t r_t (the terms of its score), beside each one's main reading:\n\n" + "\n".join(readings) + "\n"
               if readings else "")
            + ("\n## Uncertainty\n\nPredicted probability that the chosen reply wins against the probability with which the "
               "task's labeller prefers it (sigmoid of the gold difference at tau = 1); both orientations of every test pair, 10 "
               "bins. AVA's own probability is the posterior Phi((S+ - S-) / sqrt(s+^2 + s-^2)) of its reward head, BT-var's "
               "Eq. 26's scaled sigmoid. k: ranking by mu - k sigma (p: paired with k = 0, by request). Reliability diagrams: "
               "[calibration.png](calibration.png).\n\n" + "\n".join(uncertain) + "\n" if uncertain else "")
            + ("\n## What AVA's mu_t follows\n\nPearson over the test replies' tokens of each AVA model's mu_t with the gold, "
               "with its own TD error (Eq. 14), with the log-probability its LM gives the token, and with the token's "
               "position in its reply:\n\n" + "\n".join(tracks) + "\n" if tracks else "")
            + other_builds_table({(s["row"], r["seed"]): r for s in table for r in s["runs"]}))
    (ROOT / "bench" / "results" / "token_rewards.md").write_text(text)
    (ROOT / "bench" / "results" / "token_rewards.json").write_text(
        json.dumps([{k: v for k, v in s.items() if k != "runs"} for s in table], indent=1))
    calibration_plot(table, ROOT / "bench" / "results" / "calibration.png")
    runner.update_page("docs/train_rm.md", text, "token_rewards", heading_level=4)
    runner.update_page("README.md", runner.glance(summary, ["model", "seeds", "test accuracy % mean (sd)", "seeds pooled, 95% by request",
                                                           "token Pearson", "within-reply Pearson"], lambda cells: cells["model"] in GLANCE),
                       "token_rewards-glance", script="token_rewards")
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="", help=f"comma-separated rows: {', '.join([*ROWS, *REFERENCES])}")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--reevaluate", action="store_true", help="evaluate the rows' models trained on this machine again")
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
                run_row(row, seed, reevaluate=args.reevaluate)
    report()


if __name__ == "__main__":
    main()
