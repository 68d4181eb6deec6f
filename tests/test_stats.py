"""avalib/stats.py: intervals and paired tests over whole requests, ties counted as accuracy counts them."""
import math

import numpy as np
import pytest

from avalib import evaluation, stats


def mcnemar_exact(wins: int, losses: int) -> float:
    n, k = wins + losses, min(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0


def test_a_tie_is_half_right_in_scores_accuracy_and_paired_tests():
    assert list(stats.pair_scores([2.0, 0.0, -1.0])) == [1.0, 0.5, 0.0]
    margins = [1.0, 0.0, 0.0, -2.0]
    assert stats.accuracy_interval(margins)["accuracy"] == evaluation.pairwise_accuracy(margins)["eval/accuracy"] == 0.5
    result = stats.paired([0.0, 1.0], [-1.0, 1.0])  # a tie against a wrong answer is half a win
    assert result["difference"] == 0.25 and (result["wins"], result["losses"]) == (1, 0)


def test_one_pair_per_cluster_without_ties_is_mcnemars_exact_test():
    for wins, losses in [(5, 0), (7, 2), (3, 3), (10, 4)]:
        ours = [1.0] * wins + [-1.0] * losses + [1.0] * 6 + [-1.0] * 3  # then 6 both right, 3 both wrong
        theirs = [-1.0] * wins + [1.0] * losses + [1.0] * 6 + [-1.0] * 3
        result = stats.paired(ours, theirs)
        assert (result["wins"], result["losses"]) == (wins, losses)
        assert result["p"] == pytest.approx(mcnemar_exact(wins, losses))


def test_pairs_of_one_request_move_together():
    """Requests all right or all wrong: the clustered interval and test are much wider than counting each
    pair on its own, and a 'significant' pooled difference is not significant by request."""
    generator = np.random.default_rng(0)
    clusters = [c for c in range(30) for _ in range(15)]
    good = generator.random(30) < 0.7
    ours = [1.0 if good[c] else -1.0 for c in clusters]
    theirs_good = good.copy()
    theirs_good[:4] = ~theirs_good[:4]  # 4 requests ranked the other way: 60 pairs of difference
    theirs = [1.0 if theirs_good[c] else -1.0 for c in clusters]
    by_pair, by_request = stats.paired(ours, theirs), stats.paired(ours, theirs, clusters)
    assert by_pair["difference"] == by_request["difference"]
    assert by_pair["p"] < 0.01 < 0.1 < by_request["p"]
    assert (by_request["ci95"][1] - by_request["ci95"][0]) > 2 * (by_pair["ci95"][1] - by_pair["ci95"][0])
    alone, together = stats.accuracy_interval(ours), stats.accuracy_interval(ours, clusters)
    assert together["clusters"] == 30 and alone["clusters"] == 450
    assert (together["ci95"][1] - together["ci95"][0]) > 2 * (alone["ci95"][1] - alone["ci95"][0])


def test_seeds_on_the_same_pairs_are_not_more_data():
    generator = np.random.default_rng(1)
    clusters = [c for c in range(40) for _ in range(15)]
    ours = list(generator.normal(0.1, 1, 600))
    theirs = list(generator.normal(0.0, 1, 600))
    one = stats.paired(ours, theirs, clusters)
    three = stats.paired([ours] * 3, [theirs] * 3, clusters)  # the same run three times: the same evidence
    assert three["p"] == one["p"] and three["difference"] == one["difference"]
    pooled = stats.paired(ours * 3, theirs * 3, [(s, c) for s in range(3) for c in clusters])  # a pooled count: 3x the requests
    assert pooled["p"] < one["p"] / 3
    assert stats.accuracy_interval([ours, theirs], clusters)["accuracy"] == pytest.approx(
        (stats.accuracy_interval(ours)["accuracy"] + stats.accuracy_interval(theirs)["accuracy"]) / 2)
    with pytest.raises(ValueError, match="different numbers of pairs"):
        stats.paired([ours, ours[:-1]], theirs)
    with pytest.raises(ValueError, match="cluster labels"):
        stats.paired(ours, theirs, clusters[:-1])


def test_the_sign_flip_p_is_exact_for_few_clusters_and_close_for_many():
    assert stats.sign_flip_p([1, 1, 1, 1, 1]) == pytest.approx(2 / 32)
    assert stats.sign_flip_p([0, 0]) == 1.0
    d = np.random.default_rng(2).normal(0.2, 1, 200)
    z = abs(d.sum()) / math.sqrt((d ** 2).sum())  # the normal approximation of the same randomisation test
    assert stats.sign_flip_p(d) == pytest.approx(math.erfc(z / math.sqrt(2)), abs=0.02)
    assert "p = " in stats.describe(stats.paired([1.0, -1.0, 1.0], [1.0, 1.0, -1.0]))


def test_calibration_is_zero_for_the_true_probabilities_and_large_for_overconfidence():
    generator = np.random.default_rng(4)
    truth = 1 / (1 + np.exp(-generator.normal(0, 2, 2000)))
    exact = stats.calibration(truth, truth)
    assert exact["ece"] == pytest.approx(0.0, abs=1e-12) and exact["pairs"] == 2000
    sharp = stats.calibration(np.where(truth > 0.5, 0.99, 0.01), truth)  # right side, far too sure
    assert sharp["ece"] > 0.15 and sharp["brier"] > exact["brier"]
    assert sum(b["count"] for b in sharp["bins"]) == 4000  # both orientations
    outcomes = (generator.random(2000) < truth).astype(float)  # 0/1 outcomes drawn from the truth
    assert stats.calibration(truth, outcomes)["ece"] < 0.05
