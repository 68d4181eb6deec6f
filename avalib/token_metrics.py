"""Token rewards scored against a known per-token gold (the built-in task's VADER valences).

`agreement(items)` takes replies read token by token -- each {"rewards": [r_t], "gold": [g_t],
"tokens": [text]}, as `viz.token_readings(..., gold=True)` gives them (gold None on the EOS, which
no word carries; such tokens are left out) -- and returns, each with a 95% bootstrap interval over
replies (replies resampled with replacement, so that the tokens of one reply move together):

  pearson, spearman            pooled over every token of every reply
  pearson_nonzero, ...         over the tokens whose gold is not 0 (the ones that carry a word valence)
  auc                          P(r of a gold-positive token > r of a gold-negative token), ties 1/2
  return_to_go_pearson         sum_{s >= t} r_s against sum_{s >= t} g_s: potential-based shaping
                               (Ng et al. 1999) moves reward between tokens without changing which
                               policy is optimal; returns-to-go undo such moves within the reply's tail
  word_pearson                 the reward summed over each word's tokens against the word's valence (a
                               token starting with white space starts a word): shaping inside a word
                               cancels
  within_reply_pearson         pooled, after subtracting each reply's own mean from its rewards and from
                               its gold: where *within* a reply the reward sits. The pooled figures can be
                               carried by reply-level sentiment alone (a model that lifts every token of a
                               cheerful reply scores there); this one cannot

A reward model can rank replies well and still put its reward on the wrong tokens; these numbers say
where it puts it.
"""
from __future__ import annotations

import numpy as np

from avalib import evaluation

METRICS = ("pearson", "spearman", "pearson_nonzero", "spearman_nonzero", "auc", "return_to_go_pearson", "word_pearson",
           "within_reply_pearson")


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC of scores for label 1 against label 0 (average ranks: ties count 1/2)."""
    positive, negative = scores[labels == 1], scores[labels == 0]
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    _, inverse, counts = np.unique(np.concatenate([positive, negative]), return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]
    wins = ranks[:len(positive)].sum() - len(positive) * (len(positive) + 1) / 2
    return float(wins / (len(positive) * len(negative)))


def _reply_arrays(item: dict) -> dict:
    """One reply's tokens that carry a gold value: rewards, gold, returns-to-go, and per-word sums."""
    keep = [t for t, g in enumerate(item["gold"]) if g is not None]
    r = np.array([float(item["rewards"][t]) for t in keep])
    g = np.array([float(item["gold"][t]) for t in keep])
    words_r, words_g = [], []
    for t, token in zip(keep, (item["tokens"][t] for t in keep)):
        if not words_r or token[:1].isspace():
            words_r.append(0.0)
            words_g.append(0.0)
        words_r[-1] += float(item["rewards"][t])
        words_g[-1] += float(item["gold"][t])
    return {"r": r, "g": g, "r_togo": np.cumsum(r[::-1])[::-1], "g_togo": np.cumsum(g[::-1])[::-1],
            "words_r": np.array(words_r), "words_g": np.array(words_g),
            "r_within": r - r.mean() if len(r) else r, "g_within": g - g.mean() if len(g) else g}


def _metrics(replies: list[dict]) -> dict:
    join = lambda key: np.concatenate([reply[key] for reply in replies]) if replies else np.zeros(0)
    r, g = join("r"), join("g")
    nonzero = g != 0
    signed = g[nonzero] > 0
    return {"pearson": _pearson(r, g), "spearman": evaluation.rank_correlation(r, g) if len(r) > 1 else float("nan"),
            "pearson_nonzero": _pearson(r[nonzero], g[nonzero]),
            "spearman_nonzero": evaluation.rank_correlation(r[nonzero],
                                                            g[nonzero]) if nonzero.sum() > 1 else float("nan"),
            "auc": _auc(r[nonzero], signed.astype(int)),
            "return_to_go_pearson": _pearson(join("r_togo"), join("g_togo")),
            "word_pearson": _pearson(join("words_r"), join("words_g")),
            "within_reply_pearson": _pearson(join("r_within"), join("g_within"))}


def agreement(items: list[dict], bootstrap: int = 200, seed: int = 0) -> dict:
    """{metric: value, metric + "_ci95": [low, high], "replies", "tokens", "nonzero_tokens"} (module docstring)."""
    replies = [_reply_arrays(item) for item in items]
    result = _metrics(replies)
    generator = np.random.default_rng(seed)
    draws = {name: [] for name in METRICS}
    for _ in range(bootstrap):
        sample = [replies[i] for i in generator.integers(0, len(replies), len(replies))]
        for name, value in _metrics(sample).items():
            draws[name].append(value)
    for name in METRICS:
        values = np.array([v for v in draws[name] if v == v])
        result[name + "_ci95"] = [float(np.percentile(values, 2.5)),
                                  float(np.percentile(values, 97.5))] if len(values) else None
    result.update(replies=len(replies), tokens=int(sum(len(reply["r"]) for reply in replies)),
                  nonzero_tokens=int(sum((reply["g"] != 0).sum() for reply in replies)))
    return result
