"""Best-of-N on task v2 (the paper's Table 2), as an over-optimisation curve (Gao et al. 2023).

For every test request of the built-in task v2 (78), the initial policy (SmolLM2-135M-Instruct, the plain
request, temperature 1, top-p 0.95, <= 32 new tokens: the task's own sampling) draws DRAWS replies. For N in
1, 2, 4, ..., 32 they are cut into DRAWS // N disjoint groups of N (so every N has at least 500 independent
selections: 78 x 224 / 32 = 546), and each reward model picks the reply of a group it scores highest; the
curve is the gold (task v2's sequence gold, the summed VADER valences) of the picked replies against N. The
gold itself picking is the ceiling; AVA is read as mu - k sigma for k in K (the pessimistic reward). Intervals:
a bootstrap over requests (a request's selections share its replies' distribution).

The reward models are bench/token_rewards.py's (seed 0 of ROWS below; trained there if missing). Their
bottom 28 layers are SmolLM2's, frozen, so the frozen-trunk cache (avalib/frozen_trunk.py) computes them once
for all the replies and each model runs only its own top layers.

    python bench/best_of_n.py            # sample (cached in chunks), score, write bench/results/best_of_n.{json,md,png}
    python bench/best_of_n.py --report   # rewrite the Markdown and the plot from the JSON
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import runner, token_rewards  # noqa: E402

RESULT = ROOT / "bench" / "results" / "best_of_n.json"
DRAWS = 224  # replies per request
NS = (1, 2, 4, 8, 16, 32)
K = (0.0, 0.5, 1.0, 2.0)  # AVA's pessimism: pick by mu - k sigma
ROWS = ("BT", "Pref-Trans", "AVA-p 2 epochs", "AVA-p mu-weights-half-td")  # bench/token_rewards.py rows, seed 0
SAMPLING = dict(max_new_tokens=32, temperature=1.0, top_p=0.95, chat_template=False)
CHUNK = 4  # requests per cached sampling call: a killed run loses at most one chunk


def sample(prompts: list[str], seed: int = 0) -> list[list[str]]:
    """DRAWS replies of the initial policy to each prompt, cached in chunks of CHUNK requests."""
    from avalib import generation, models

    lm, tokenizer = models.load_model("smollm2")
    replies = []
    for start in range(0, len(prompts), CHUNK):
        part = prompts[start:start + CHUNK]
        drawn = generation.cached_generate("smollm2", [p for p in part for _ in range(DRAWS)], seed=seed + start, model=lm,
                                           tokenizer=tokenizer, desc=f"Best-of-N: requests {start + 1}-{start + len(part)} "
                                           f"of {len(prompts)}", **SAMPLING)
        replies += [drawn[i * DRAWS:(i + 1) * DRAWS] for i in range(len(part))]
    return replies


def scores_of(row: str, prompts: list[str], replies: list[list[str]]) -> dict:
    """One reward model's score (and, for AVA, the sigma of its score) of every reply, through the shared frozen trunk."""
    import torch

    import ava
    from avalib import data, distributed, frozen_trunk, models, reward_models

    directory = token_rewards.run_directory(row, 0)
    token_rewards.run_row(row, 0, need_model=True, quiet=True)  # trains it first if it is not on this machine
    loaded, tokenizer, meta = reward_models.load_reward_model(directory / "model")
    max_length = token_rewards.CONFIG["max-length"]
    examples = [data.encode(tokenizer, prompt, group, max_length)[0] for prompt, group in zip(prompts, replies)]
    args = types.SimpleNamespace(model="smollm2", trainable_layers=token_rewards.row_flags(row)["trainable-layers"], fsdp=False)
    models.freeze_layers(loaded.lm, args.trainable_layers)  # scoring only: the trunk's layers are frozen as in training
    trunk = frozen_trunk.build_frozen_trunk(loaded.lm, args, [e for group in examples for e in group], distributed.Distributed())
    model = reward_models.build_reward_model(loaded.lm, meta["kind"], getattr(loaded, "config", None), trunk=trunk)
    model.load_state_dict(loaded.state_dict())  # the same weights, its hidden states through the trunk
    model.eval()
    score, sigma = [], []
    with torch.no_grad():
        for group in examples:
            for start in range(0, len(group), 32):
                out = model(**data.collate(group[start:start + 32], tokenizer.pad_token_id))
                if isinstance(out, ava.TQROutput):
                    score += out.sequence_reward().tolist()
                    sigma += (out.sequence_sigma() if out.reading == "last" else (out.sigma.square() * out.mask).sum(1).sqrt()).tolist()
                else:
                    score += out.score.tolist()
    return {"score": score, "sigma": sigma or None}


def curve(gold: list[list[float]], pick_by: list[list[float]]) -> dict:
    """N -> the mean gold of the picked replies (disjoint groups of N), its 95% bootstrap interval over requests,
    and the number of selections."""
    import numpy as np

    out = {}
    for n in NS:
        per_request = []
        for g, p in zip(gold, pick_by):
            groups = len(g) // n
            per_request.append([g[i * n + int(np.argmax(p[i * n:(i + 1) * n]))] for i in range(groups)])
        means = np.array([np.mean(x) for x in per_request])
        draws = np.random.default_rng(0).integers(0, len(means), (2000, len(means)))
        boot = means[draws].mean(axis=1)
        out[str(n)] = {"gold": float(means.mean()), "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
                       "selections": int(sum(len(x) for x in per_request))}
    return out


def measure() -> dict:
    from avalib import gold, task

    started, busy = time.time(), runner.busy_cpu_seconds()
    built = task.load_task("default", progress=False)
    prompts = [p["prompt"] for p in built.prompts("test")]
    replies = sample(prompts)
    golds = [[gold.gold_sum(r) for r in group] for group in replies]
    chunked = lambda flat: [flat[i * DRAWS:(i + 1) * DRAWS] for i in range(len(prompts))]
    curves = {"gold (ceiling)": curve(golds, golds)}
    for row in ROWS:
        scored = scores_of(row, prompts, replies)
        score = chunked(scored["score"])
        if scored["sigma"] is None:
            curves[row] = curve(golds, score)
            continue
        sigma = chunked(scored["sigma"])
        for k in K:
            curves[f"{row}, mu - {k:g} sigma"] = curve(golds, [[m - k * s for m, s in zip(a, b)] for a, b in zip(score, sigma)])
    return {"date": time.strftime("%Y-%m-%d"), "requests": len(prompts), "draws": DRAWS, "sampling": SAMPLING,
            "task": token_rewards.task_build(built), "rows": {row: token_rewards.run_arguments(row, 0) for row in ROWS},
            "curves": curves, "wall_seconds": time.time() - started,
            "reply_gold_mean": sum(map(sum, golds)) / sum(map(len, golds)), "busy_cpu_seconds": runner.busy_cpu_seconds() - busy}


def report(result: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    header = "| picked by | " + " | ".join(f"N = {n}" for n in NS) + " |"
    lines = [header, "|---|" + "---|" * len(NS)]
    for name, c in result["curves"].items():
        lines.append(f"| {name} | " + " | ".join(f"{c[str(n)]['gold']:+.2f} ({c[str(n)]['ci95'][0]:+.2f}, {c[str(n)]['ci95'][1]:+.2f})"
                                               for n in NS) + " |")
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for name, c in result["curves"].items():
        if ", mu - " in name and not name.endswith(("mu - 0 sigma", "mu - 1 sigma")):
            continue  # the plot keeps k = 0 and 1; the table has every k
        axis.plot(NS, [c[str(n)]["gold"] for n in NS], "o--" if name.startswith("gold") else "o-", markersize=3, label=name)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("N (replies per selection)")
    axis.set_ylabel("gold of the picked reply (summed valences)")
    axis.set_title("Best-of-N on task v2's test requests", fontsize=10)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(RESULT.with_suffix(".png"), dpi=110)
    plt.close(figure)
    selections = {n: result["curves"]["gold (ceiling)"][str(n)]["selections"] for n in NS}
    return ("# Best-of-N on task v2 (Table 2)\n\nRegenerate with: `python bench/best_of_n.py` (`--report` for the tables only).\n\n"
            f"{result['requests']} test requests of the shipped task v2 (replies `{result['task']['replies_sha256']}`), {result['draws']} "
            f"replies each from the initial SmolLM2-135M-Instruct (temperature {result['sampling']['temperature']}, top-p "
            f"{result['sampling']['top_p']}, <= {result['sampling']['max_new_tokens']} tokens; mean reply gold "
            f"{result['reply_gold_mean']:+.2f}), cut into disjoint groups of N; selections per N: "
            + ", ".join(f"{n}: {s}" for n, s in selections.items()) + ". Cells: the mean gold of the picked replies "
            "(95% bootstrap over requests). Reward models: bench/token_rewards.py's seed 0 (commands in the JSON). "
            f"Wall {result['wall_seconds'] / 60:.0f} min.\n\n" + "\n".join(lines) + "\n\n![Best-of-N](best_of_n.png)\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", action="store_true", help="only rewrite the Markdown and the plot from the JSON")
    args = parser.parse_args()
    if not args.report:
        RESULT.write_text(json.dumps(measure(), indent=1) + "\n")
    text = report(json.loads(RESULT.read_text()))
    RESULT.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
