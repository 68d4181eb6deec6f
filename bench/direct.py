"""The AVA paper's Tables 4 and 5 at CPU scale: direct optimisation, judged by win rate.

SmolLM2-135M-Instruct on the built-in task v1 (builtin:v1, avalib/task.py), judged by its gold judge (VADER sentiment of
the reply). Every row trains the policy with train_direct.py under one budget (CONFIG: the same
optimiser steps, batch, learning rate and trainable layers: one pass over the first 352 training
pairs or demonstrations, 44 steps of 8, so the whole benchmark fits in about an hour on 2 CPU
cores; a pair row sees twice the tokens of a demonstration row), then samples 8 replies to each of the
task's held-out *test* prompts (nothing was tuned on them). Each row is judged against the initial
model; head-to-head matchups (Table 4: AVA-p vs DPO and SFT, from preferences; Table 5: AVA-d vs
SFT and AfD, from demonstrations) judge the two rows' stored replies prompt by prompt: the same
prompts, the same sampling seed. A tie (|gold difference| <= 0.05) counts half; Wilson 95% intervals.

    python bench/direct.py                 # run what is missing (each row cached), then the report
    python bench/direct.py --step-time     # AVA-p / DPO step time on one batch, side by side (idle machine)
    python bench/direct.py --report        # rebuild the table only

Runs are cached like bench/table1.py: results in bench/results/direct/<row>.json (committed),
checkpoints in $AVA_CACHE/bench-runs/direct (resumed if a session was cut).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from avalib import data, evaluation, gold, models, sources  # noqa: E402
from bench import runner  # noqa: E402
from bench.runner import slug  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "direct"
CONFIG = {"trainable-layers": 2, "max-length": 128, "batch-size": 8, "lr": 5e-5, "max-steps": 44, "limit": 352, "epochs": 1,
          "data": "builtin:v1", "eval-prompts": "builtin:v1", "prompt-split": "test", "samples-per-prompt": 8, "judge": "gold", "opponent": "initial"}
ROWS = {  # name: (train_direct.py arguments, table)
    "AVA-p": ({"objective": "ava-p"}, "preferences"),
    "DPO": ({"objective": "dpo"}, "preferences"),
    "SFT (chosen half)": ({"objective": "sft", "chosen-half": True}, "preferences"),
    "AVA-d": ({"objective": "ava-d"}, "demonstrations"),
    "SFT (demonstrations)": ({"objective": "sft"}, "demonstrations"),
    "AfD w/ DPO": ({"objective": "dpo", "afd": True}, "demonstrations"),
    "AfD w/ AVA-p": ({"objective": "ava-p", "afd": True}, "demonstrations"),
}
MATCHUPS = [("AVA-p", "DPO"), ("AVA-p", "SFT (chosen half)"), ("DPO", "SFT (chosen half)"),
            ("AVA-d", "SFT (demonstrations)"), ("AVA-d", "AfD w/ DPO"), ("AVA-d", "AfD w/ AVA-p")]


def run_arguments(row: str) -> list[str]:
    extra, _ = ROWS[row]
    flags = {**CONFIG, **extra}
    out = []
    for k, v in flags.items():
        out += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return out


def run_row(row: str) -> dict:
    arguments = run_arguments(row)
    key = hashlib.sha256(json.dumps(arguments).encode()).hexdigest()[:12]
    path = RESULTS / f"{slug(row)}.json"
    if path.is_file() and json.loads(path.read_text()).get("key") == key:
        return json.loads(path.read_text())
    output_dir = models.cache_dir() / "bench-runs" / "direct" / f"{slug(row)}-{key}"
    measured = runner.train([sys.executable, str(ROOT / "train_direct.py"), *arguments], output_dir, save_every=20)
    final = json.loads((output_dir / "final.json").read_text())
    replies = [json.loads(line) for line in (output_dir / "samples.jsonl").read_text().splitlines()]
    result = {"row": row, "key": key, "command": "python train_direct.py " + " ".join(arguments),
              **measured, **final,
              "replies": [{"prompt": r["prompt"], "reply": r["policy"], "initial": r["opponent"]} for r in replies]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def head_to_head(a: dict, b: dict) -> dict:
    """Judge row a's replies against row b's, prompt by prompt (same prompts and sampling seed)."""

    if [r["prompt"] for r in a["replies"]] != [r["prompt"] for r in b["replies"]]:
        raise ValueError(f"{a['row']} and {b['row']} replied to different prompts")
    verdicts = [gold.judge(x["prompt"], x["reply"], y["reply"]) for x, y in zip(a["replies"], b["replies"])]
    counts = {v: verdicts.count(v) for v in ("win", "tie", "lose")}
    n = len(verdicts)
    score = counts["win"] + 0.5 * counts["tie"]
    return {**counts, "n": n, "win_rate": score / n, "wilson95": list(evaluation.wilson(score, n))}


def step_time(repeats: int = 10) -> dict:
    """Seconds per forward+backward of AVA-p and of DPO on the same 8 built-in pairs, same model and
    trainable layers, interleaved in one process (so machine load hits both alike); DPO's reference
    log-probs precomputed, as train_direct.py does."""
    import torch

    import ava
    import train_direct

    lm, tokenizer = models.load_model("smollm2")
    rows, report = sources.load_rows("builtin:v1", "pairs", "train", tokenizer)
    items = data.encode_rows(rows[:8], tokenizer, CONFIG["max-length"], report)
    pad = tokenizer.pad_token_id
    references = train_direct.reference_logprobs(lm, items, pad, batch_size=8)
    models.freeze_layers(lm, CONFIG["trainable-layers"])
    config = ava.AVAConfig()
    wrapped = {"ava-p": ava.TQR(lm, config), "dpo": models.Policy(lm)}
    args = {k: train_direct.Args(objective=k) for k in wrapped}
    times = {k: [] for k in wrapped}
    for i in range(repeats + 2):
        for kind, model in wrapped.items():
            model.zero_grad(set_to_none=True)
            started = time.perf_counter()
            loss, _ = train_direct.compute_loss(model, items, references, args[kind], config, pad)
            loss.backward()
            if i >= 2:  # two warm-up rounds
                times[kind].append(time.perf_counter() - started)
    tokens = sum(len(e["input_ids"]) for item in items for e in item)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"pairs": 8, "tokens": tokens, "threads": torch.get_num_threads(), "repeats": repeats,
            "seconds_median": median, "seconds_all": times, "ratio_ava_p_over_dpo": median["ava-p"] / median["dpo"]}


def report() -> None:
    runs = {row: json.loads(p.read_text()) for row in ROWS if (p := RESULTS / f"{slug(row)}.json").is_file()}
    step = json.loads((RESULTS / "step_time.json").read_text()) if (RESULTS / "step_time.json").is_file() else None
    table = {"config": CONFIG, "rows": [], "matchups": [], "step_time": step}
    for row, r in runs.items():
        w = r["win_rate"]
        table["rows"].append({"row": row, "table": ROWS[row][1], "vs_initial": {k: w[k] for k in ("win", "tie", "lose", "n", "win_rate", "wilson95")},
                              "gold_mean": w["gold_mean_ours"], "gold_mean_initial": w["gold_mean_opponent"],
                              "implicit_accuracy": r.get("eval/accuracy"), "implicit_accuracy_pairs": r.get("eval/pairs"),
                              "steps": r["steps"], "train_rows": r["train_rows"], "train_minutes": r["train_seconds"] / 60,
                              "wall_minutes": r["wall_seconds"] / 60, "other_cpu_share": r["other_processes_cpu_share"],
                              "command": r["command"]})
    for a, b in MATCHUPS:
        if a in runs and b in runs:
            table["matchups"].append({"row": a, "against": b, **head_to_head(runs[a], runs[b])})
    (ROOT / "bench" / "results" / "direct.json").write_text(json.dumps(table, indent=2))

    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    lines = ["# Tables 4 and 5 at CPU scale: direct optimisation on the built-in task, gold judge", "",
             "Regenerate: `python bench/direct.py` (runs what is missing; `--report` only rebuilds; `--step-time` the timing).",
             f"One budget for every row: {CONFIG}. Replies: 8 per held-out test prompt (temperature 1, top-p 0.95, <= 48 tokens).", "",
             "Head to head (row's replies against the other row's, same prompts and sampling seed; tie = half):", "",
             "| table | policy | against | win | tie | lose | win rate | 95% interval |", "|---|---|---|---|---|---|---|---|"]
    for m in table["matchups"]:
        lines.append(f"| {ROWS[m['row']][1]} | {m['row']} | {m['against']} | {m['win']} | {m['tie']} | {m['lose']} | "
                     f"{pct(m['win_rate'])} | {pct(m['wilson95'][0])}-{pct(m['wilson95'][1])} |")
    lines += ["", "Each policy against the initial model, its mean gold reward, and its implicit reward's accuracy on the task's dev pairs (gold labels):", "",
              "| table | policy | win rate vs initial | 95% interval | mean gold (initial) | implicit-reward accuracy | steps | train min | other CPU use |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in table["rows"]:
        v = r["vs_initial"]
        accuracy = "-" if r["implicit_accuracy"] is None else f"{pct(r['implicit_accuracy'])} (n={r['implicit_accuracy_pairs']})"
        lines.append(f"| {r['table']} | {r['row']} | {pct(v['win_rate'])} | {pct(v['wilson95'][0])}-{pct(v['wilson95'][1])} | "
                     f"{r['gold_mean']:+.3f} ({r['gold_mean_initial']:+.3f}) | {accuracy} | {r['steps']} | {r['train_minutes']:.1f} | "
                     f"{100 * r['other_cpu_share']:.0f}% |")
    missing = [row for row in ROWS if row not in runs]
    lines += ["", f"Not yet run: {', '.join(missing) if missing else 'none'}."]
    if step:
        s = step["seconds_median"]
        lines += [f"Step time on one batch of {step['pairs']} pairs ({step['tokens']} tokens, {step['threads']} threads, "
                  f"median of {step['repeats']} interleaved forward+backward): AVA-p {s['ava-p']:.2f} s, DPO {s['dpo']:.2f} s, "
                  f"ratio AVA-p / DPO = {step['ratio_ava_p_over_dpo']:.2f}."]
    (ROOT / "bench" / "results" / "direct.md").write_text("\n".join(lines) + "\n")
    runner.update_page("docs/train_direct.md", "\n".join(lines[2:]), "direct")
    runner.update_page("README.md", runner.glance(lines, ["table", "policy", "against", "win rate", "95% interval"]),
                       "direct-glance", "direct")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names")
    parser.add_argument("--step-time", action="store_true", help="measure the AVA-p / DPO step-time ratio")
    parser.add_argument("--report", action="store_true", help="only rebuild the table from cached runs")
    args = parser.parse_args()
    if args.step_time:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "step_time.json").write_text(json.dumps(step_time(), indent=2))
    elif not args.report:
        for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
            if row not in ROWS:
                raise SystemExit(f"unknown row {row!r}: choose from {list(ROWS)}")
            run_row(row)
    report()


if __name__ == "__main__":
    main()
