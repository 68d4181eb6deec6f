"""Evaluation: pairwise accuracy, win rates under the gold judge or a reward model, intervals."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from avalib import data, generation, gold, models, reward_models, sources


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion (accuracies and win rates on a few hundred items)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def pairwise_accuracy(margins: list[float]) -> dict:
    """Accuracy on preference pairs from each pair's margin (chosen - rejected score), the same in every
    script: a win counts 1, an exact tie 1/2 (as TRL's rewards/accuracies and ava.preference_metrics);
    ties are also reported apart, with the Wilson 95% interval and the mean margin."""
    n = len(margins)
    wins, ties = sum(m > 0 for m in margins), sum(m == 0 for m in margins)
    return {"eval/accuracy": (wins + 0.5 * ties) / max(n, 1),
            "eval/accuracy_wilson95": list(wilson(wins + 0.5 * ties, n)),
            "eval/ties": ties / max(n, 1), "eval/margin": sum(margins) / max(n, 1), "eval/pairs": n}


def judge_replies(judge: str, prompts: list[str], ours: list[str], theirs: list[str],
                  max_length: int = 512) -> list[str]:
    """'win' / 'tie' / 'lose' for each (ours, theirs): `judge` is "gold" (the built-in task's gold
    judge, gold.judge) or a reward model directory saved by train_rm.py (higher sequence score wins)."""
    if judge == "gold":

        return [gold.judge(p, a, b) for p, a, b in zip(prompts, ours, theirs)]
    model, tokenizer, _ = reward_models.load_reward_model(judge)
    # text, for its tokenizer
    ours, theirs = ([data.escape_special_tokens(tokenizer, reply) for reply in replies] for replies in (ours, theirs))
    scores = lambda replies: [r["score"] for r in reward_models.score_texts(model, tokenizer, prompts, replies,
                                                                           max_length, per_token=False)]
    score_a, score_b = scores(ours), scores(theirs)
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


@torch.no_grad()
def best_of_n(args) -> dict:
    """Best-of-N (the paper's Table 2; train_ppo.py --best-of-n N): for every held-out prompt (x
    samples_per_prompt), N samples of --model, the best under --reward-model; judged against a plain
    sample and against the best under --bon-against. `args` is train_ppo.py's Args. Writes
    OUTPUT_DIR/best_of_n.json."""
    lm, tokenizer = models.load_model(args.model)
    prompts = sources.load_prompts(args.eval_prompts or "builtin", args.eval_split, tokenizer, args.skip_bad_rows,
                                   args.prompt_limit)
    repeated = [p for p in prompts for _ in range(args.samples_per_prompt)]
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.eval_top_p,
                    chat_template=False)
    candidates = generation.cached_generate(args.model, [p for p in repeated for _ in range(args.best_of_n)],
                                        seed=args.sample_seed, model=lm, tokenizer=tokenizer,
                                        desc="Best-of-N candidates", **sampling)
    plain = generation.cached_generate(args.model, repeated, seed=args.sample_seed + 1, model=lm, tokenizer=tokenizer,
                                   desc="plain samples", **sampling)

    def pick(reward_dir: str) -> list[str]:
        model, rm_tokenizer, _ = reward_models.load_reward_model(reward_dir)
        # text, for the judge's tokenizer
        replies = [data.escape_special_tokens(rm_tokenizer, reply) for reply in candidates]
        each_prompt = [p for p in repeated for _ in range(args.best_of_n)]
        scored = reward_models.score_texts(model, rm_tokenizer, each_prompt, replies, args.max_length, per_token=False)
        scores = [r["score"] for r in scored]
        k = args.best_of_n
        return [candidates[i * k + max(range(k), key=lambda j: scores[i * k + j])] for i in range(len(repeated))]

    ours = pick(args.reward_model)
    result = {"best_of_n": args.best_of_n, "prompts": len(prompts), "reward_model": args.reward_model,
              "vs_plain_sample": win_rate_summary(judge_replies(args.judge, repeated, ours, plain))}
    if args.bon_against:
        theirs = pick(args.bon_against)
        result["vs_best_of_n_under"] = {"reward_model": args.bon_against,
                                        **win_rate_summary(judge_replies(args.judge, repeated, ours, theirs))}
    if args.judge == "gold":
        result["gold_mean"] = {"best_of_n": sum(map(gold.gold_score, ours)) / len(ours),
                               "plain": sum(map(gold.gold_score, plain)) / len(plain)}
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "best_of_n.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result
