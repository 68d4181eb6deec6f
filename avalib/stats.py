"""Accuracy intervals and paired comparisons that respect the data's structure.

The built-in task's pairs are not independent: a request's 15 pairs share its 6 replies, so a reward
model that misreads one reply gets several pairs wrong together; and two seeds scored on the same test
pairs are two looks at the same pairs, not twice the data. Every interval and paired test here works on
whole clusters (a cluster: the request, i.e. the prompt, a pair belongs to; pairs that share nothing are
each their own cluster):

- a pair's score is 1 when the model ranks it right, 1/2 on a tie, 0 when wrong: the same count as
  accuracy (evaluation.pairwise_accuracy), so a paired test and an accuracy never treat a tie differently;
- several seeds of one model are averaged pair by pair before anything is resampled;
- `accuracy_interval`: a percentile bootstrap over clusters (clusters drawn with replacement);
- `paired`: the difference of two models on the same pairs, a bootstrap interval over clusters, and a
  two-sided sign-flip (randomisation) test: under "no difference" each cluster's summed difference is as
  likely negative as positive, so its sign is flipped at random (exactly, over every sign pattern, when
  there are at most 16 clusters). With one pair per cluster and no ties this is McNemar's exact test;
- `calibration`: how well predicted preference probabilities match the probabilities they predict
  (expected calibration error, Brier score, a reliability table).
"""
from __future__ import annotations

import numpy as np


def pair_scores(margins) -> np.ndarray:
    """1 / 0.5 / 0 per pair for a margin (chosen minus rejected score) > 0 / == 0 / < 0."""
    m = np.asarray(margins, dtype=float)
    return (m > 0) + 0.5 * (m == 0)


def _seed_mean(runs) -> np.ndarray:
    """One run's margins (a list of floats) or several runs' (a list of lists, the same pairs in the same order):
    the per-pair score averaged over the runs."""
    runs = [runs] if len(runs) and np.isscalar(runs[0]) else list(runs)
    lengths = {len(r) for r in runs}
    if len(lengths) != 1:
        raise ValueError(f"runs scored on different numbers of pairs: {sorted(lengths)}")
    return np.mean([pair_scores(r) for r in runs], axis=0)


def _cluster_sums(values: np.ndarray, clusters) -> tuple[np.ndarray, np.ndarray]:
    """(sum of values, number of pairs) per cluster, clusters in order of first appearance."""
    if clusters is None:
        return values.astype(float), np.ones(len(values))
    if len(clusters) != len(values):
        raise ValueError(f"{len(clusters)} cluster labels for {len(values)} pairs")
    index = {}
    labels = np.array([index.setdefault(c, len(index)) for c in clusters])
    return np.bincount(labels, weights=values, minlength=len(index)), np.bincount(labels, minlength=len(index)).astype(float)


def _bootstrap(sums: np.ndarray, counts: np.ndarray, draws: int, seed: int) -> list[float]:
    generator = np.random.default_rng(seed)
    picks = generator.integers(0, len(sums), (draws, len(sums)))
    ratios = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    return [float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))]


def accuracy_interval(runs, clusters=None, draws: int = 2000, seed: int = 0) -> dict:
    """Accuracy (ties half) of one run's margins, or of several seeds' averaged pair by pair, with a 95% bootstrap
    interval over clusters. clusters: a label per pair (e.g. its prompt), None for one cluster per pair."""
    sums, counts = _cluster_sums(_seed_mean(runs), clusters)
    return {"accuracy": float(sums.sum() / counts.sum()), "ci95": _bootstrap(sums, counts, draws, seed),
            "pairs": int(counts.sum()), "clusters": len(sums)}


def sign_flip_p(cluster_differences: np.ndarray, draws: int = 20000, seed: int = 0) -> float:
    """Two-sided randomisation p of sum(d) under random signs of the clusters' summed differences d."""
    d = np.asarray(cluster_differences, dtype=float)
    d = d[d != 0]  # a zero flips to itself
    if len(d) == 0:
        return 1.0
    observed = abs(d.sum()) - 1e-9
    if len(d) <= 16:  # every sign pattern: exact
        signs = 1 - 2 * ((np.arange(2 ** len(d))[:, None] >> np.arange(len(d))) & 1)
        return float(np.mean(np.abs(signs @ d) >= observed))
    generator, extreme = np.random.default_rng(seed), 0
    for start in range(0, draws, 2000):
        signs = generator.choice([-1.0, 1.0], size=(min(2000, draws - start), len(d)))
        extreme += int((np.abs(signs @ d) >= observed).sum())
    return (1 + extreme) / (1 + draws)  # the observed pattern counts as one draw: p is never 0


def paired(ours, theirs, clusters=None, draws: int = 20000, seed: int = 0) -> dict:
    """Two models on the same pairs. ours, theirs: one run's margins or several seeds' (averaged pair by pair).
    Returns difference (accuracy of ours minus theirs), its ci95 (bootstrap over clusters), p (sign-flip over
    clusters), wins / losses (pairs where ours scores higher / lower; with several seeds, by the seed-averaged
    score), and the numbers of pairs and clusters."""
    difference = _seed_mean(ours) - _seed_mean(theirs)
    sums, counts = _cluster_sums(difference, clusters)
    return {"difference": float(sums.sum() / counts.sum()), "ci95": _bootstrap(sums, counts, min(draws, 5000), seed),
            "p": sign_flip_p(sums, draws, seed), "wins": int((difference > 0).sum()), "losses": int((difference < 0).sum()),
            "pairs": int(counts.sum()), "clusters": len(sums)}


def describe(result: dict, percent: bool = True) -> str:
    """'+1.9 (-0.6, +4.4), p = 0.14, +212/-170' for a paired() result."""
    scale = 100 if percent else 1
    low, high = (scale * v for v in result["ci95"])
    return (f"{scale * result['difference']:+.1f} ({low:+.1f}, {high:+.1f}), p = {format_p(result['p'])}, "
            f"+{result['wins']}/-{result['losses']}")


def format_p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}" if p < 0.01 else f"{p:.2f}"


def calibration(predicted, target, bins: int = 10) -> dict:
    """Predicted P(a preferred to b) against the target probability (a 0/1 outcome, or the known probability of
    the labelling process), each pair counted in both orientations (p, t) and (1 - p, 1 - t) so that the table
    is symmetric about 1/2. Returns ece (sum over equal-width bins of share x |mean p - mean t|), brier (mean
    (p - t)^2) and per bin its range, count, mean predicted and mean target."""
    p, t = np.asarray(predicted, dtype=float), np.asarray(target, dtype=float)
    p, t = np.concatenate([p, 1 - p]), np.concatenate([t, 1 - t])
    which = np.minimum((p * bins).astype(int), bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            gap = abs(p[inside].mean() - t[inside].mean())
            ece += inside.mean() * gap
            table.append({"bin": [b / bins, (b + 1) / bins], "count": int(inside.sum()),
                          "predicted": float(p[inside].mean()), "target": float(t[inside].mean())})
    return {"ece": float(ece), "brier": float(np.mean((p - t) ** 2)), "pairs": len(p) // 2, "bins": table}
