"""Evaluation: pairwise accuracy, win rates under the gold judge or a reward model, intervals."""
from __future__ import annotations

from pathlib import Path

from avalib import generation, gold, reward_models


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion (accuracies and win rates on a few hundred items)."""
    import math

    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def judge_replies(judge: str, prompts: list[str], ours: list[str], theirs: list[str], max_length: int = 512) -> list[str]:
    """'win' / 'tie' / 'lose' for each (ours, theirs): `judge` is "gold" (the built-in task's gold
    judge, gold.judge) or a reward model directory saved by train_rm.py (higher sequence score wins)."""
    if judge == "gold":

        return [gold.judge(p, a, b) for p, a, b in zip(prompts, ours, theirs)]
    model, tokenizer, _ = reward_models.load_reward_model(judge)
    score_a = [r["score"] for r in reward_models.score_texts(model, tokenizer, prompts, ours, max_length, per_token=False)]
    score_b = [r["score"] for r in reward_models.score_texts(model, tokenizer, prompts, theirs, max_length, per_token=False)]
    return ["tie" if a == b else "win" if a > b else "lose" for a, b in zip(score_a, score_b)]


def win_rate_summary(verdicts: list[str]) -> dict:
    """Counts, the win rate (a tie counts half) and its Wilson 95% interval."""
    counts = {v: verdicts.count(v) for v in ("win", "tie", "lose")}
    n = len(verdicts)
    score = counts["win"] + 0.5 * counts["tie"]
    return {**counts, "n": n, "win_rate": score / n if n else float("nan"), "wilson95": list(wilson(score, n))}


def judge_policy(lm, tokenizer, prompts: list[str], *, opponent: str, judge: str, samples_per_prompt: int,
                 max_new_tokens: int, temperature: float, top_p: float, seed: int, name: str = "policy",
                 samples_path: Path | None = None) -> dict:
    """Sample `samples_per_prompt` replies per prompt from `lm` and from `opponent` (a model name or
    directory; its samples are cached) with the same prompts, settings and seed, and judge them
    pairwise. Prompts are the exact text training saw (no chat template is added)."""
    repeated = [p for p in prompts for _ in range(samples_per_prompt)]
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, chat_template=False)
    ours = generation.generate(lm, tokenizer, repeated, desc=f"sampling {name}", **sampling)
    theirs = generation.cached_generate(opponent, repeated, desc=f"sampling {opponent}", **sampling)
    verdicts = judge_replies(judge, repeated, ours, theirs)
    result = {**win_rate_summary(verdicts), "opponent": opponent, "judge": judge, "prompts": len(prompts)}
    if judge == "gold":

        result["gold_mean_ours"] = sum(map(gold.gold_score, ours)) / len(ours)
        result["gold_mean_opponent"] = sum(map(gold.gold_score, theirs)) / len(theirs)
    if samples_path is not None:
        import json

        with Path(samples_path).open("w") as handle:
            for prompt, a, b, verdict in zip(repeated, ours, theirs, verdicts):
                handle.write(json.dumps({"prompt": prompt, "policy": a, "opponent": b, "verdict": verdict}) + "\n")
    return result


def rank_correlation(x, y) -> float:
    """Spearman's rho: the Pearson correlation of average ranks (tied values share their mean rank).
    NaN when there are fewer than two pairs or either side is constant."""
    import numpy as np

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"rank_correlation: expected two 1-d sequences of one length, got {x.shape} and {y.shape}")
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")

    def ranks(values):
        _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
        return (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based mean rank of each tie group

    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])
