"""The benchmark's own statistics: the paired comparison of two reward models on the same pairs."""
import json
import math

import pytest

from bench import table1


def test_mcnemar_counts_discordant_pairs_and_gives_the_exact_p():
    # Pairs: both right, only ours right (x3, one of them a tie for theirs), only theirs right, both wrong.
    ours = [1.0, 0.5, 0.2, 0.1, -0.3, -1.0]
    theirs = [2.0, -0.5, 0.0, -0.1, 0.4, -2.0]
    result = table1.mcnemar(ours, theirs)
    assert (result["wins"], result["losses"]) == (3, 1)
    assert result["p"] == pytest.approx(2 * (1 + 4) / 16)  # two-sided exact binomial, 1 of 4 discordant
    assert table1.mcnemar([1.0] * 12 + [-1.0] * 2, [-1.0] * 12 + [1.0] * 2)["p"] == pytest.approx(
        2 * sum(math.comb(14, i) for i in range(3)) / 2 ** 14)
    assert table1.mcnemar([1.0, -1.0], [1.0, -1.0]) == {"wins": 0, "losses": 0, "p": 1.0}
    with pytest.raises(ValueError, match="not the same dev pairs"):
        table1.mcnemar([1.0], [1.0, 2.0])


def test_margins_that_disagree_with_the_recorded_accuracy_are_refused(tmp_path):
    (tmp_path / "eval_margins.json").write_text(json.dumps({"margins": [0.1234567, -0.2, 0.3, 1e-9]}))
    assert table1.read_margins(tmp_path, tmp_path / "r.json", 0.75) == [0.123457, -0.2, 0.3, 1e-9]
    with pytest.raises(SystemExit, match="r.json: the saved model's dev margins give accuracy 0.75"):
        table1.read_margins(tmp_path, tmp_path / "r.json", 0.5)


def test_paired_comparison_uses_each_rows_lowest_seed_with_margins(tmp_path, monkeypatch):
    monkeypatch.setattr(table1, "RESULTS", tmp_path)
    (tmp_path / "harmless").mkdir()
    bt = [{"seed": 0}, {"seed": 1, "dev_margins": [-1.0, 1.0, 1.0]}, {"seed": 2, "dev_margins": [1.0, 1.0, 1.0]}]
    for run in bt:
        table1.result_path("harmless", "BT", run["seed"]).write_text(json.dumps(run))
    ours = [{"seed": 1}, {"seed": 2, "dev_margins": [1.0, -1.0, 1.0]}, {"seed": 0}]
    paired = table1.paired_with_bt("harmless", "AVA-p", ours)
    assert paired == {"baseline": "BT", "seed": 2, "baseline_seed": 1, "wins": 1, "losses": 1, "p": 1.0}
    assert table1.paired_with_bt("harmless", "AVA-p", [{"seed": 0}]) is None  # no margins of ours kept
    assert table1.paired_with_bt("harmless", "BT", bt) is None  # BT against itself
    assert table1.paired_with_bt("harmless", "AVA-p (ablation config)", ours) is None  # its BT has no results here
