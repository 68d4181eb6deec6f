"""avalib/token_metrics.agreement: token rewards against a known gold, with bootstrap intervals."""
import numpy as np
import pytest

from avalib import token_metrics


def replies(n=40, seed=0):
    """Replies of words of 1-3 tokens; a word's valence sits on its last token (as the task's gold)."""
    generator = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        tokens, gold = [], []
        for _ in range(generator.integers(3, 8)):
            pieces = int(generator.integers(1, 4))
            valence = float(generator.choice([0.0, 0.0, 1.9, -2.5, 3.1]))
            tokens += [" w"] + ["x"] * (pieces - 1)
            gold += [0.0] * (pieces - 1) + [valence]
        items.append({"tokens": tokens + ["<eos>"], "gold": gold + [None]})
    return items


def with_rewards(items, reward):
    return [dict(item, rewards=reward(item)) for item in items]


def test_the_gold_itself_agrees_perfectly_and_its_negation_perfectly_wrong():
    items = replies()
    perfect = token_metrics.agreement(with_rewards(items, lambda i: [g if g is not None else 5.0 for g in i["gold"]]))
    for name in token_metrics.METRICS:
        assert perfect[name] == pytest.approx(1.0), name
    assert perfect["pearson_ci95"][0] == pytest.approx(1.0) and perfect["tokens"] == sum(len(i["gold"]) - 1 for i in items)
    wrong = token_metrics.agreement(with_rewards(items, lambda i: [-g if g is not None else 0.0 for g in i["gold"]]))
    assert wrong["pearson"] == pytest.approx(-1.0) and wrong["auc"] == pytest.approx(0.0)


def test_reward_moved_inside_a_word_is_wrong_per_token_but_right_per_word():
    def first_token_of_each_word(item):
        rewards, start = [0.0] * len(item["gold"]), 0
        for t, token in enumerate(item["tokens"][:-1]):
            if token.startswith(" "):
                start = t
            if item["gold"][t]:
                rewards[start] += item["gold"][t]
        return rewards

    moved = token_metrics.agreement(with_rewards(replies(), first_token_of_each_word))
    assert moved["word_pearson"] == pytest.approx(1.0)
    assert moved["pearson"] < 0.9 and moved["return_to_go_pearson"] < 1.0


def test_noise_is_near_zero_and_its_interval_covers_zero():
    generator = np.random.default_rng(1)
    noise = token_metrics.agreement(with_rewards(replies(200), lambda i: list(generator.normal(size=len(i["gold"])))))
    assert abs(noise["pearson"]) < 0.1 and noise["pearson_ci95"][0] < 0 < noise["pearson_ci95"][1]
    assert noise["auc_ci95"][0] < 0.5 < noise["auc_ci95"][1]


def test_reply_level_sentiment_carries_the_pooled_pearson_but_not_the_within_reply_one():
    """A reward that is each reply's mean gold at every token knows which replies are cheerful and nothing of
    where in them the reward sits: the pooled Pearson is positive, the within-reply one is undefined-to-zero;
    adding the true per-token gold on top lifts only the within-reply measure to 1."""
    items = replies(200, seed=3)
    level = lambda item: float(np.mean([g for g in item["gold"] if g is not None]))
    flat = token_metrics.agreement(with_rewards(items, lambda i: [level(i)] * len(i["gold"])), bootstrap=20)
    assert flat["pearson"] > 0.2 and not abs(flat["within_reply_pearson"]) > 1e-6  # no variation within any reply (0 or nan)
    shaped = token_metrics.agreement(with_rewards(items, lambda i: [10 * level(i) + (g or 0.0) for g in i["gold"]]), bootstrap=20)
    assert shaped["within_reply_pearson"] == pytest.approx(1.0) and shaped["pearson"] < 0.9
