"""The benchmark's own statistics: the paired comparison of two reward models on the same pairs."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import table1


def test_paired_cells_count_a_tie_as_half_as_accuracy_does():
    """The McNemar count these cells replaced counted a tie as wrong, so a model could gain accuracy over another
    (a tie against a wrong answer) with no win in the paired column; stats.paired scores a tie 1/2 on both sides."""
    ours, theirs = {0: {"m": [0.0, 1.0]}, 1: {"m": [1.0, 1.0]}}, {0: {"m": [-1.0, 1.0]}}
    # seed 0: the tie is half a win over the wrong answer, +25 points on 2 pairs (one cluster each: p = 1); seed 1 unpaired
    assert table1.paired_by_seed(ours, theirs, "m") == "+25.0 (p = 1.00); -"
    # two requests of two pairs, both pairs of 'a' won: the sign flip sees one cluster, p = 1
    assert table1.paired_by_seed({0: {"m": [1.0, 1.0, 1.0, -1.0]}}, {0: {"m": [-1.0, -1.0, 1.0, -1.0]}}, "m",
                                 ["a", "a", "b", "b"]) == "+50.0 (p = 1.00)"
    assert table1.describe({"difference": -0.2, "ci95": [-0.3, -0.1], "p": 0.0001, "wins": 1, "losses": 9}) == \
        "-20.0 (-30.0, -10.0), p < 0.001, +1/-9"
    assert table1.clusters("harmless") is None and table1.clusters("helpful") is None  # HH-RLHF: one pair, one cluster


def test_margins_that_disagree_with_the_recorded_accuracy_are_refused(tmp_path):
    (tmp_path / "eval_margins.json").write_text(json.dumps({"margins": [0.1234567, -0.2, 0.3, 1e-9]}))
    assert table1.read_margins(tmp_path, tmp_path / "r.json", 0.75) == [0.123457, -0.2, 0.3, 1e-9]
    with pytest.raises(SystemExit, match="r.json: the saved model's dev margins give accuracy 0.75"):
        table1.read_margins(tmp_path, tmp_path / "r.json", 0.5)


def test_paired_comparison_averages_the_seeds_with_margins_on_both_sides(tmp_path, monkeypatch):
    monkeypatch.setattr(table1, "RESULTS", tmp_path)
    (tmp_path / "harmless").mkdir()
    bt = [{"seed": 0}, {"seed": 1, "dev_margins": [-1.0, 1.0, 1.0]}, {"seed": 2, "dev_margins": [1.0, 1.0, -1.0]}]
    for run in bt:
        table1.result_path("harmless", "BT", run["seed"]).write_text(json.dumps(run))
    # Ours: seeds 0 and 2 kept margins (seed 1 did not, and is left out); BT: seeds 1 and 2. Each side's per-pair
    # scores averaged over its seeds: ours (1, .5, .5), BT's (.5, 1, .5), so +0.5 and -0.5 on two pairs, 0 points;
    # one cluster per pair (HH-RLHF), every sign pattern of (+.5, -.5) at least as far from 0: p = 1.
    ours = [{"seed": 2, "dev_margins": [1.0, -1.0, 1.0]}, {"seed": 1}, {"seed": 0, "dev_margins": [1.0, 1.0, -1.0]}]
    paired = table1.paired_with_bt("harmless", "AVA-p", ours)
    assert {k: paired[k] for k in ("baseline", "seeds", "baseline_seeds", "row_seeds", "difference", "wins", "losses", "p",
                                   "clusters")} == {"baseline": "BT", "seeds": [0, 2], "baseline_seeds": [1, 2],
                                                    "row_seeds": [2, 1, 0], "difference": 0.0, "wins": 1, "losses": 1,
                                                    "p": 1.0, "clusters": 3}
    # the bootstrap's extremes: all three pairs drawn at -0.5 (or +0.5) happens in 1 of 27 draws, more than 2.5%
    assert table1.paired_cell(paired) == "+0.0 (-50.0, +50.0), p = 1.00, +1/-1 (seeds 0, 2 v 1, 2)"
    assert table1.paired_cell({**paired, "seeds": [1, 2], "row_seeds": [1, 2]}).endswith("+1/-1")  # the same seeds: not shown
    assert table1.paired_cell(None) == "-"
    assert table1.paired_with_bt("harmless", "AVA-p", [{"seed": 0}]) is None  # no margins of ours kept
    assert table1.paired_with_bt("harmless", "BT", bt) is None  # BT against itself
    assert table1.paired_with_bt("harmless", "AVA-p (ablation config)", ours) is None  # its BT has no results here


def test_cache_check_compares_a_run_with_its_cached_rerun_pair_by_pair(tmp_path, monkeypatch):
    monkeypatch.setattr(table1, "RESULTS", tmp_path)
    monkeypatch.setenv("AVA_CACHE", str(tmp_path / "cache"))
    (tmp_path / "harmless").mkdir()
    before = {"seed": 2, "eval/accuracy": 0.5, "dev_margins": [1.0, -1.0, 2.0, -2.0], "wall_seconds": 600.0,
              "train_tokens_per_second": 300.0, "started_at": "2026-11-30T00:00:00Z"}
    table1.result_path("harmless", "BT", 2).write_text(json.dumps(before))
    calls = []

    def train(arguments, output_dir):  # the rerun: one pair flips, the others move a little
        calls.append(arguments)
        output_dir.mkdir(parents=True)
        (output_dir / "eval_margins.json").write_text(json.dumps({"margins": [1.1, 0.5, 1.9, -2.0]}))
        return ({"wall_seconds": 300.0, "other_processes_cpu_share": 0.01, "started_at": "2026-12-02T00:00:00Z"},
                {"eval/accuracy": 0.75, "train_tokens_per_second": 900.0,
                 "frozen_trunk": {"built_seconds": 120.0, "sequences": 8}})

    monkeypatch.setattr(table1, "train", train)
    check = table1.cache_check("harmless", "BT", 2)
    assert calls == [table1.run_arguments("harmless", "BT", 2)]
    assert check["accuracy"] == {"without": 0.5, "with": 0.75}
    assert (check["ranked_differently"]["wins"], check["ranked_differently"]["losses"]) == (1, 0)
    assert check["largest_margin_difference"] == pytest.approx(1.5)
    assert check["minutes"] == {"without": 10.0, "with": 5.0, "with_building_the_cache": 2.0}
    assert 0.5 < check["margin_correlation"] < 1
    assert table1.cache_check("harmless", "BT", 2) == check and len(calls) == 1  # cached: not trained again
    assert "harmless BT seed 2: dev accuracy 50.0% without, 75.0% with" in "\n".join(table1.cache_check_lines())
    # A run made with the cache cannot be the reference.
    table1.result_path("harmless", "BT", 1).write_text(json.dumps({**before, "seed": 1, "frozen_trunk": {"sequences": 8}}))
    with pytest.raises(SystemExit, match="made without the cache"):
        table1.cache_check("harmless", "BT", 1)


def test_tokens_per_second_of_cached_runs_are_shown_apart():
    row = {"tokens_per_second": 300.0, "tokens_per_second_cached": 900.0, "cached_seeds": 2, "seeds": [0, 1, 2]}
    assert table1.speed(row) == "300; 900 cached (2 of 3 seeds)"
    assert table1.speed({**row, "cached_seeds": 0, "tokens_per_second_cached": None}) == "300"
    assert table1.speed({**row, "tokens_per_second": None, "cached_seeds": 1, "seeds": [0]}) == "900 cached"


def test_readouts_of_a_tqr_are_its_table_score_and_its_dense_rewards():
    """The read-outs come from one forward pass: 'table score' is what train_rm.evaluate compares, the token
    reward sum and mean are Eq. 19's mu_t over the response, and the LM terms are its log-likelihood."""
    import torch

    import ava
    from avalib import data, distributed
    import train_rm
    from bench import readouts
    from conftest import randomize_heads, tiny_lm

    model = randomize_heads(ava.TQR(tiny_lm("llama"), ava.AVAConfig())).eval()
    generator = torch.Generator().manual_seed(0)
    def example(p, r):
        return {"input_ids": torch.randint(3, 90, (p + r,), generator=generator).tolist(), "prompt_length": p}
    items = [(example(3, 5), example(3, 7)), (example(4, 6), example(4, 2)), (example(2, 9), example(2, 4))]
    columns = readouts.sequence_readouts(model, items, pad_id=2, batch_size=4)
    found = readouts.margins(columns)
    margins = []
    train_rm.evaluate(model, items, 4, 2, distributed.Distributed(), margins)
    assert found["table score"] == pytest.approx(margins, abs=1e-6)
    assert found["response tokens"] == [5 - 7, 6 - 2, 9 - 4]  # one transition per response token
    batch = data.collate([items[0][0]], 2)
    with torch.no_grad():
        out, logp = model(**batch, with_logp=True), ava.token_logprobs(model.lm, **batch)
    assert columns["token reward sum"][0] == pytest.approx(float(out.mu.sum()), abs=1e-5)
    assert columns["token reward mean"][0] == pytest.approx(float(out.mu.sum() / out.mask.sum()), abs=1e-5)
    assert columns["LM logp sum"][0] == pytest.approx(float(logp.sum()), abs=1e-4)
    assert len(set(found["token reward sum"])) == 3 and found["table score"] != found["token reward sum"]


def test_readouts_refuse_rows_cut_at_different_max_lengths():
    """Read-outs cut the dev pairs as the rows' runs did; a main-configuration row (512 tokens) and an ablation
    row (256) in one run could not both reproduce their recorded margins, so that is refused before any loading."""
    from bench import readouts

    with pytest.raises(SystemExit, match=r"different max lengths \[256, 512\]"):
        readouts.measure("helpful", ["AVA-p", "AVA-p w/o cer"])


def test_readouts_measured_before_stats_paired_are_compared_from_their_counts_when_nothing_ties():
    """A stored McNemar count (wins: right here and wrong there) fixes every pair's score difference when neither
    read-out ties, so the comparison rebuilt from it is stats.paired on the real margins (one cluster per pair)."""
    from avalib import stats
    from bench import readouts

    ours, table = [1.0, 2.0, -1.0, 0.5, -0.5, 3.0], [-1.0, 1.0, 1.0, 0.5, -0.5, -2.0]
    direct = stats.paired(ours, table)
    stored = {"ties": 0.0, "vs_table_score": {"wins": 2, "losses": 1, "p": 1.0}}
    rebuilt = readouts.versus_table_score(stored, {"ties": 0.0}, len(ours))
    keys = ("difference", "wins", "losses", "p", "pairs", "clusters")
    assert {k: rebuilt[k] for k in keys} == {k: direct[k] for k in keys}
    assert readouts.versus_table_score({**stored, "ties": 0.005}, {"ties": 0.0}, 6) is None  # a tie counted as wrong there
    assert readouts.versus_table_score({"ties": 0.0, "vs_table_score": direct}, {"ties": 0.0}, 6) is direct
    assert readouts.versus_table_score({"ties": 0.0}, {"ties": 0.0}, 6) is None  # the table score itself


def test_missing_trl_runs_are_priced_at_trls_own_minutes(monkeypatch):
    """TRL runs without the frozen-trunk cache: pricing them at our cached main-config minutes would hide most of
    their time, so they get their own measured mean (and no total until one is timed)."""
    def row(name, config, minutes, cached):
        return {"task": "harmless", "row": name, "config": config, "wall_minutes": sum(minutes), "resumed_seeds": 0,
                "run_minutes": minutes, "run_minutes_cached": minutes if cached else []}
    table = [row("BT", "main", [18.0, 20.0], True), row("AVA-p (ablation config)", "ablation", [12.0], True)]
    monkeypatch.setattr(table1, "missing_runs", lambda: [("helpful", "TRL RewardTrainer", 0), ("helpful", "BT", 0),
                                                          ("helpful", "AVA-p w/o cer", 0)])
    assert "1 TRL run, none timed yet; no total" in table1.time_estimate(table)
    text = table1.time_estimate(table + [row("TRL RewardTrainer", "main", [54.0], False)])
    assert "1 TRL run at 54 min each" in text and "1 main-config run at 19 min each" in text
    assert "1 ablation-config run at 12 min each" in text
    assert f"estimated total {round((38 + 12 + 54 + 54 + 19 + 12) / 60)} h" in text


def test_trl_row_is_counted_pair_by_pair_on_every_dev_pair():
    """TRL's eval_accuracy is a mean of per-batch accuracies over the pairs it kept: an uneven last batch
    weighs its pairs more, and dropped pairs are not counted. The table counts every pair once."""
    from bench import trl_reward

    counted = trl_reward.count([1.0, -1.0, 0.0, 2.0], kept=[True, True, False, True], trl_batch=2)
    assert counted["eval/accuracy"] == 0.5 and counted["eval/ties"] == 0.25 and counted["eval/pairs"] == 4
    assert counted["eval/trl_kept_pairs"] == 3
    assert counted["eval/trl_batch_mean_recomputed"] == (0.5 + 1.0) / 2  # [1, -1] then [2]: the lone pair weighs double

    class Chars:  # a character-level tokenizer: one id per character
        eos_token = "$"

        def __call__(self, text):
            return {"input_ids": [ord(c) for c in text]}
    assert trl_reward.trl_ids(Chars(), "abc", "de", 10) == ([ord(c) for c in "abcde$"], False)  # as TRL: + EOS
    assert trl_reward.trl_ids(Chars(), "abcdefgh", "xy", 5) == ([ord(c) for c in "ghxy$"], True)  # prompt cut left
    assert trl_reward.trl_ids(Chars(), "ab", "wxyzuv", 4) == ([ord(c) for c in "wxyz"], True)  # then response right


def test_variant_seeds_are_paired_with_the_faithful_run_seed_by_seed_and_seeds_averaged_by_request():
    from bench import variants

    def run(preset, seed, margins, pearson):
        accuracy = sum(m > 0 for m in margins) / len(margins)
        return {"preset": preset, "seed": seed, "dev": {"accuracy": accuracy}, "dev_margins": margins,
                "tokens_dev": {"pearson": pearson}}

    every = [run("paper", 0, [1.0, -1.0, -1.0, 1.0], 0.0), run("paper", 1, [-1.0, -1.0, -1.0, -1.0], -0.1),
             run("mu-weights", 0, [1.0, 1.0, -1.0, 1.0], 0.3), run("mu-weights", 1, [1.0, 1.0, 1.0, -1.0], 0.2),
             run("return-cer", 0, [1.0, 1.0, 1.0, 1.0], 0.1)]  # one seed only: not in the seeds table
    requests = ["a", "a", "b", "b"]
    lines = variants.seeds_table(every, requests).strip().splitlines()
    rows = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"preset", "paper", "mu-weights"}
    # seed 0: one pair of request a only mu-weights ranks right, +25 points, one non-zero request: p = 1;
    # seed 1: three pairs (a: 2, b: 1), +75 points, sign patterns of (2, 1) as extreme as 3: 2 of 4
    assert "| +25.0 (p = 1.00); +75.0 (p = 0.50) |" in rows["mu-weights"]
    # seeds averaged: mu-weights (1, 1, .5, .5) against paper's (.5, 0, 0, .5): +50 points, a +1.5, b +0.5 (p = 2/4);
    # the bootstrap over the two requests gives .75 (a, a), .5 (a, b) or .25 (b, b)
    assert "| +50.0 (+25.0, +75.0), p = 0.50, +3/-0 |" in rows["mu-weights"]
    assert "| 75.0 (50.0, 100.0) |" in rows["mu-weights"]  # its seeds averaged: a 1, b .5
    assert "| 75.0, 75.0 | 75.0 |" in rows["mu-weights"] and "+0.30, +0.20 | +0.25 |" in rows["mu-weights"]
    assert "| -; - | - |" in rows["paper"]
    assert variants.seeds_table(every[:1], requests) == ""


def test_a_rows_results_include_seeds_run_beyond_its_own_count_and_no_other_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(table1, "RESULTS", tmp_path)
    (tmp_path / "harmless").mkdir()
    assert table1.ALL["AVA-p mu-weights"][2] == 1  # a one-seed row, run with --seeds 1,2 as well
    for row, seed in [("AVA-p mu-weights", 0), ("AVA-p mu-weights", 2), ("AVA-p mu-weights", 1), ("BT", 0), ("BT-var", 0)]:
        table1.result_path("harmless", row, seed).write_text(json.dumps({"row": row, "seed": seed}))
    assert [r["seed"] for r in table1.results("harmless", "AVA-p mu-weights")] == [0, 1, 2]
    assert [r["row"] for r in table1.results("harmless", "BT")] == ["BT"]  # not BT-var's file


def test_token_reward_models_table_pools_seeds_pair_by_pair_and_pairs_by_request():
    from avalib import stats
    from bench import token_rewards

    def summary(row, *runs):
        return {"row": row, "runs": [{"seed": seed, "test": {"eval/accuracy": float(np.mean(stats.pair_scores(margins)))},
                                      "test_margins": margins, "tokens": {"pearson": pearson, "within_reply_pearson": pearson / 2,
                                                                          "word_pearson": pearson}}
                                     for seed, margins, pearson in runs]}

    requests = ["a", "a", "b", "b"]
    table = [summary("BT", (0, [1.0, -1.0, -1.0, 1.0], 0.2), (1, [-1.0, -1.0, -1.0, -1.0], 0.1)),
             summary("Pref-Trans", (0, [1.0, 1.0, 1.0, 1.0], 0.2)),
             summary("AVA-p mu-weights", (0, [1.0, 1.0, -1.0, 1.0], 0.3), (1, [1.0, 0.0, 1.0, -1.0], 0.4))]
    lines = token_rewards.models_table(table, requests)
    rows = {line.split(" | ")[0].strip("| "): line for line in lines[2:]}
    assert set(rows) == {"BT", "Pref-Trans", "AVA-p mu-weights"}
    # mu-weights by seed 75.0 and 62.5 (a tie is half); seeds pooled pair by pair: (1, .75, .5, .5) -> 68.75
    assert "| 0, 1 | 68.8 (8.8) | 68.8 (" in rows["AVA-p mu-weights"]
    # against BT pooled pair by pair (.5, 0, 0, .5): +43.75 points; two requests, each +0.875: sign-flip p = 2/4
    assert "| +43.8 (" in rows["AVA-p mu-weights"] and "), 0.50 |" in rows["AVA-p mu-weights"]
    assert rows["BT"].split(" | ")[4] == "-"  # not paired with itself
    assert "+0.35 (0.07) | +0.17 (0.04) | +0.35 (0.07) |" in rows["AVA-p mu-weights"]
    assert "| 100.0 | 100.0 (100.0, 100.0) |" in rows["Pref-Trans"]  # one seed: no sd


def test_token_rewards_says_when_results_come_from_different_task_builds():
    from bench import token_rewards

    def summary(row, *runs):
        return {"row": row, "runs": [{"seed": seed, **({"task": {"replies_sha256": sha}} if sha else {})}
                                     for seed, sha in runs]}

    one_build = [summary("BT", (0, "aaaa"), (1, "aaaa")), summary("AVA-p", (0, "aaaa"))]
    assert token_rewards.builds_note(one_build) == ""
    note = token_rewards.builds_note([summary("BT", (0, None), (1, "bbbb")), summary("AVA-p", (0, None), (1, "bbbb"))])
    assert "replies `bbbb`: BT seed 1, AVA-p seed 1" in note
    assert "before builds were recorded (2026-12-04/05): BT seed 0, AVA-p seed 0." in note
    assert "approximate" in note


def test_token_rewards_sets_results_of_another_task_build_beside_the_main_table(tmp_path, monkeypatch):
    from bench import token_rewards

    def result(row, seed, sha, accuracy, pearson):
        return {"row": row, "seed": seed, "task": {"replies_sha256": sha}, "test": {"eval/accuracy": accuracy},
                "tokens": {"pearson": pearson, "pearson_nonzero": pearson + 0.3}}

    monkeypatch.setattr(token_rewards, "RESULTS", tmp_path)
    assert token_rewards.other_builds_table({}) == ""
    (tmp_path / "build-cccc").mkdir()
    for name, r in {"BT-seed0": result("BT", 0, "cccc", 0.70, 0.10), "AVA-p-seed3": result("AVA-p", 3, "cccc", 0.60, 0.01)}.items():
        (tmp_path / "build-cccc" / f"{name}.json").write_text(json.dumps(r))
    (tmp_path / "BT-seed0.json").write_text("{}")  # the main table's own files are not read here
    table = token_rewards.other_builds_table({("BT", 0): result("BT", 0, "aaaa", 0.75, 0.20),
                                              ("AVA-p", 0): result("AVA-p", 0, "aaaa", 0.65, 0.02)})  # seed 3 is not seed 0
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows == ["| AVA-p | 3 | earlier build | `cccc` | 60.0 | - | +0.01 | - | +0.31 | - | - |",
                    "| BT | 0 | earlier build | `cccc` | 70.0 | 75.0 | +0.10 | +0.20 | +0.40 | +0.50 | - |"]
    (tmp_path / "other-machine-aaaa").mkdir()  # the shipped build, trained on another machine: the margins' drift shown
    (tmp_path / "other-machine-aaaa" / "BT-seed0.json").write_text(json.dumps(
        {**result("BT", 0, "aaaa", 0.74, 0.21), "test_margins": [0.5, -0.25, 1.0]}))
    table = token_rewards.other_builds_table({("BT", 0): {**result("BT", 0, "aaaa", 0.75, 0.20), "test_margins": [0.5, -0.5, 1.0]}})
    assert "| BT | 0 | other machine | `aaaa` | 74.0 | 75.0 | +0.21 | +0.20 | +0.51 | +0.50 | 2.5e-01 |" in table


def test_token_reward_rows_can_be_named_on_the_command_line():
    from bench import token_rewards

    # --rows is comma-separated: a row whose name holds a comma could never be run
    assert not [row for row in [*token_rewards.ROWS, *token_rewards.REFERENCES] if "," in row]


def test_budget_screens_pair_each_objective_with_its_own_defaults_at_the_same_seed(tmp_path, monkeypatch):
    from bench import budget, token_rewards

    (tmp_path / "bench" / "results" / "budget").mkdir(parents=True)
    monkeypatch.setattr(budget, "ROOT", tmp_path)
    monkeypatch.setattr(budget, "RESULTS", tmp_path / "bench" / "results" / "budget")
    monkeypatch.setattr(budget, "test_note", lambda: "")

    def write(row, objective, seed, margins, legacy=False):
        result = {"row": row, "dev": {"accuracy": sum(m > 0 for m in margins) / len(margins), "accuracy_wilson95": [0.0, 1.0],
                                      "pairs": len(margins)},
                  "dev_margins": margins, "wall_seconds": 1.0, "other_processes_cpu_share": 0.0}
        if not legacy:  # the first BT screen's results carry neither field
            result.update(objective=objective, seed=seed)
        budget.result_path(row, objective, seed).write_text(json.dumps(result))

    write("2@0.001", "bt", 0, [1.0, 1.0, -1.0, -1.0], legacy=True)
    write("4@0.0003", "bt", 0, [1.0, 1.0, 1.0, 1.0], legacy=True)
    write("2@0.001", "pref-trans", 1, [-1.0, -1.0, -1.0, -1.0])
    write("2@0.0003", "pref-trans", 1, [1.0, 1.0, 1.0, -1.0])
    write("2@0.003", "ava-p", 1, [1.0, 1.0, 1.0, 1.0])  # no defaults row at this seed: nothing to pair with
    assert budget.result_path("2@0.001", "bt", 0).name == "2-at-0.001.json"  # the first screen keeps its names
    # one file per objective, seed and setting: two objectives' screens at one seed must not overwrite each other
    assert len({budget.result_path("2@0.001", o, s) for o in budget.ROW_OF for s in (0, 1)}) == 2 * len(budget.ROW_OF)
    budget.report(requests=["a", "a", "b", "b"])
    text = (tmp_path / "bench" / "results" / "budget.md").read_text()
    rows = {tuple(cell.strip() for cell in line.split("|")[1:4]): line for line in text.splitlines() if line.startswith("| ")}
    # 4@0.0003 wins both pairs of request b over the defaults: +50 points, one non-zero request (p = 1), the bootstrap
    # over the two requests 0 (a, a), 50 (a, b) or 100 (b, b)
    assert "| 100.0-100.0 | +50.0 (+0.0, +100.0), p = 1.00, +2/-0 |" in rows["4@0.0003", "100.0 (0.0, 100.0)", "100.0-100.0"]
    # Pref-Trans 3e-4 paired with Pref-Trans's own defaults at seed 1 (+75 points: a +2, b +1), not with BT's seed-0
    # defaults (+25)
    assert "| +75.0 (+50.0, +100.0), p = 0.50, +3/-0 |" in rows["Pref-Trans", "1", "2@0.0003"]
    assert "| - |" in rows["AVA-p", "1", "2@0.003"] and "| - |" in rows["Pref-Trans", "1", "2@0.001 (defaults)"]
    assert "| not recorded |" in rows["AVA-p", "1", "2@0.003"]  # these results record no task build
    assert "dev split, 4 pairs of 2 requests" in text and "resample and sign-flip whole requests" in text
    # an objective's defaults row is bench/token_rewards.py's run of it when the arguments agree (BT's token_rewards
    # row trains two epochs, so BT's screen at one epoch is not read from it)
    assert budget.ROW_OF["bt"] == "BT" and budget.ROW_OF["pref-trans"] == "Pref-Trans"
    assert budget.arguments("2@0.001", "pref-trans", 1) == token_rewards.run_arguments("Pref-Trans", 1)
    assert budget.arguments("2@0.001", "bt", 0) != token_rewards.run_arguments("BT", 0)


def sandboxed_token_rewards(tmp_path, monkeypatch, build: str):
    """bench/token_rewards.py with its results and run directories in tmp_path and a stand-in task whose build (replies
    hash) is `build`; the main table's build is "main"."""
    import types

    from avalib import task
    from bench import token_rewards

    monkeypatch.setattr(token_rewards, "result_path", lambda row, seed: tmp_path / f"{row}-{seed}.json")
    monkeypatch.setattr(token_rewards.models, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(task, "load_task", lambda *a, **k: types.SimpleNamespace(
        key="k", pairs=lambda split: [None] * 40, replies_sha256=lambda: build))
    monkeypatch.setattr(token_rewards, "main_build", lambda: "main")
    return token_rewards


def test_token_rewards_trains_again_when_a_committed_result_has_no_model_on_this_machine(tmp_path, monkeypatch):
    """Results are committed, models are not: the notebook (need_model) must train a missing model, not load a
    directory that is not there; the benchmark itself (need_model off) keeps the committed result."""
    token_rewards = sandboxed_token_rewards(tmp_path, monkeypatch, "main")  # this machine has the main table's task
    monkeypatch.setattr(token_rewards, "evaluate_model", lambda model_dir, max_length: {"test": {}})
    commands, logs = [], []

    def run_measured(command, log=None):  # stands in for a training run: what train_rm.py leaves behind
        commands.append(command)
        logs.append(log)
        out = Path(command[command.index("--output-dir") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "final.json").write_text(json.dumps({"steps": 3}))
        (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "rewards/margins": 0.1 * s, "ava/sigma": 1 - 0.1 * s})
                                                   + "\n" for s in range(1, 10)))
        return {"wall_seconds": 1.0}

    monkeypatch.setattr(token_rewards.runner, "run_measured", run_measured)
    arguments = token_rewards.run_arguments("AVA-p", 0)
    key = token_rewards.hashlib.sha256(json.dumps(arguments).encode()).hexdigest()[:12]
    committed = {"row": "AVA-p", "seed": 0, "key": key, "test": {"eval/accuracy": 0.66}}
    token_rewards.result_path("AVA-p", 0).write_text(json.dumps(committed))
    assert token_rewards.run_row("AVA-p", 0) == committed and commands == []
    result = token_rewards.run_row("AVA-p", 0, need_model=True, quiet=True)
    assert len(commands) == 1 and "--resume" not in commands[0]
    assert logs == [token_rewards.run_directory("AVA-p", 0) / "train.log"]  # quiet: the output goes to the run's log
    assert (token_rewards.run_directory("AVA-p", 0) / "final.json").is_file()
    assert json.loads(token_rewards.result_path("AVA-p", 0).read_text()) == result != committed
    # the trace: five logged steps, evenly spaced, the first and last included
    assert [t["step"] for t in result["training_trace"]] == [1, 3, 5, 7, 9]
    assert result["training_trace"][-1] == {"step": 9, "margin": pytest.approx(0.9), "sigma": pytest.approx(0.1)}
    assert "9: 0.90, 0.10." in token_rewards.trace_note(result)
    assert token_rewards.run_row("AVA-p", 0, need_model=True) == result and len(commands) == 1  # now it is here


def test_a_run_on_another_task_build_is_kept_beside_the_main_table_not_over_it(tmp_path, monkeypatch):
    """A machine whose sampling built task v2 with other replies (another replies_sha256 than the main table's,
    bench/results/task.json) writes its run under build-SHA/ and reads it back from there; the main table's
    committed result is left as it was."""
    token_rewards = sandboxed_token_rewards(tmp_path, monkeypatch, "other")
    evaluated = []
    monkeypatch.setattr(token_rewards, "evaluate_model",
                        lambda model_dir, max_length: evaluated.append(model_dir) or {"test": {"eval/accuracy": 0.7}})
    commands = []

    def run_measured(command, log=None):
        commands.append(command)
        out = Path(command[command.index("--output-dir") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "final.json").write_text(json.dumps({"steps": 3, "eval/accuracy": 0.71, "loss": 0.5, "evaluation": 1}))
        (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "rewards/margins": 0.1}) + "\n")
        return {"wall_seconds": 1.0}

    monkeypatch.setattr(token_rewards.runner, "run_measured", run_measured)
    arguments = token_rewards.run_arguments("BT", 0)
    key = token_rewards.hashlib.sha256(json.dumps(arguments).encode()).hexdigest()[:12]
    committed = {"row": "BT", "seed": 0, "key": key, "test": {"eval/accuracy": 0.74}, "task": {"replies_sha256": "main"}}
    main = token_rewards.result_path("BT", 0)
    main.write_text(json.dumps(committed))
    assert token_rewards.run_row("BT", 0) == committed and commands == []  # the benchmark reads the committed figure
    result = token_rewards.run_row("BT", 0, need_model=True)  # the notebook, on the other build: trains here
    assert len(commands) == 1 and result["task"]["replies_sha256"] == "other"
    assert result["dev"] == {"accuracy": 0.71}  # the last dev evaluation, its eval/ prefix dropped, nothing else
    assert json.loads(main.read_text()) == committed  # the main table is untouched
    assert json.loads((tmp_path / "build-other" / main.name).read_text()) == result
    assert token_rewards.run_row("BT", 0, need_model=True) == result  # read back: not retrained, not re-evaluated
    assert len(commands) == 1 and len(evaluated) == 1
    # a row the main table lacks, run on the other build, goes beside it too
    token_rewards.run_row("Pref-Trans", 0)
    assert not token_rewards.result_path("Pref-Trans", 0).exists()
    assert (tmp_path / "build-other" / token_rewards.result_path("Pref-Trans", 0).name).is_file()
    # on the main table's build the file is the main table's
    assert token_rewards.build_result_path("BT", 0, "main") == main


def test_a_measured_run_can_send_its_output_to_a_log_file(tmp_path, capfd):
    from bench import runner

    log = tmp_path / "train.log"
    runner.run_measured([sys.executable, "-c", "import sys; print('to stdout'); print('to stderr', file=sys.stderr)"], log)
    assert "to stdout" in log.read_text() and "to stderr" in log.read_text()
    assert "to stdout" not in capfd.readouterr().out.splitlines()  # only the 'running: ...' line


def learning_curve_result(requests, seed, margins, second_pass=False):
    """A bench/learning_curve.py result, as its report reads it, for these test margins."""
    from avalib import stats

    accuracy = float(stats.pair_scores(margins).mean())
    return {"requests": requests, "of_requests": 16, "pairs": 15 * requests * (2 if second_pass else 1), "seed": seed,
            "wall_seconds": 1.0, "other_processes_cpu_share": 0.01, "task": {"replies_sha256": "abc"},
            "dev": {"accuracy": 0.7}, "test_margins": margins, "second_pass": second_pass, "steps": 3,
            "test": {"accuracy": accuracy, "accuracy_wilson95": [0.1, 0.9], "pairs": len(margins)}}


def write_learning_curve(tmp_path, monkeypatch, results):
    from bench import learning_curve

    monkeypatch.setattr(learning_curve, "RESULTS", tmp_path)
    monkeypatch.setattr(learning_curve, "ROOT", tmp_path)
    monkeypatch.setattr(learning_curve, "plot", lambda by, seeds, second: None)
    (tmp_path / "bench" / "results").mkdir(parents=True)
    for r in results:
        learning_curve.result_path(r["requests"], r["seed"], r["second_pass"]).write_text(json.dumps(r))


def test_learning_curve_subsets_are_nested_keep_whole_requests_and_pair_with_all_requests_by_request(tmp_path, monkeypatch):
    from bench import learning_curve

    requests = [f"request {i}" for i in range(16)]
    order = learning_curve.request_order(list(reversed(requests)))
    assert set(order) == set(requests) and order == learning_curve.request_order(requests)  # fixed, whatever the input order
    sizes = learning_curve.counts(16)
    assert sizes == [2, 4, 8, 16]
    assert all(set(order[:a]) < set(order[:b]) for a, b in zip(sizes, sizes[1:]))  # nested
    pairs = [{"prompt": f"p{i % 4}", "chosen": f"a{i}", "rejected": "same" if i == 5 else f"b{i}",
              "instruction": requests[i % 4], "score_chosen": 1.0} for i in range(12)]
    pairs[5]["chosen"] = "same"
    rows, identical = learning_curve.subset_rows(pairs, {requests[1], requests[2]})
    assert identical == 1 and [r["chosen"] for r in rows] == ["a1", "a2", "a6", "a9", "a10"]  # order kept, pair 5 out
    assert set(rows[0]) == {"prompt", "chosen", "rejected"}

    result = learning_curve_result
    write_learning_curve(tmp_path, monkeypatch, [
        result(8, 0, [1, 1, -1, -1]), result(16, 0, [1, -1, 1, 1]), result(8, 1, [1, 1, 1, -1]), result(16, 1, [-1, 1, 1, -1]),
        result(16, 0, [1, 1, 1, 1], second_pass=True), result(16, 1, [1, 1, -1, -1], second_pass=True)])
    text = learning_curve.report(requests=["a", "a", "b", "b"])  # two test requests of two pairs each
    row = next(line for line in text.splitlines() if line.startswith("| 8 of 16"))
    # seeds averaged: 8 requests (1, 1, .5, 0) against all 16 (.5, .5, 1, .5): +1 on request a, -1 on b, 0 points;
    # the bootstrap over the two requests +50 (a, a), 0 (a, b), -50 (b, b)
    assert "| +0.0 (-50.0, +50.0), p = 1.00, +2/-2 |" in row
    assert "| 62.5 | 25.0-100.0 |" in row  # the mean of 50% and 75%; its seeds averaged by request: a 1, b .25
    # the last doubling: 16 requests against 8, +25 and -25 points by seed, 0 with the seeds averaged
    assert ("added +25.0, -25.0 points on test (seeds 0, 1; the seeds averaged, paired by request: "
            "+0.0 (-50.0, +50.0), p = 1.00, +2/-2)") in text
    # second pass against the first at the same seed: seed 0 +25 points (one pair of request a), seed 1 0 (+1 / -1)
    assert "| both passes, 1 epoch | 480 | 3 | 0 | " in text and "| +25.0 (+0.0, +50.0), p = 1.00, +1/-0 |" in text
    assert "| +0.0 (-50.0, +50.0), p = 1.00, +1/-1 |" in text
    # and the seeds averaged: (1, 1, .5, .5) against (.5, .5, 1, .5), a +1, b -.5 over 4 pairs: +12.5 points
    assert ("seeds 0, 1 averaged pair by pair and paired by request: 75.0% (50.0-100.0) against 62.5% (50.0-75.0), "
            "difference +12.5 (-25.0, +50.0), p = 1.00, +2/-1.") in text
    assert "`abc` (6 runs, an earlier build than the shipped one)" in text


def test_learning_curve_second_pass_is_seed_averaged_and_tested_by_request_not_pooled(tmp_path, monkeypatch):
    """Three seeds of the second pass win 12 and lose 2 of 40 test pairs each against the first pass, but 10 of the
    wins are the pairs of one request (and the other request's 2 wins and 2 losses cancel). Counted pair by pair and
    the seeds pooled (36 / 6) that is 'significant', and even the seeds averaged pair by pair with each pair its own
    cluster (12 / 2: exact sign-flip p = 0.013); resampled and sign-flipped by request, one request carries the whole
    difference: p = 1."""
    from avalib import stats
    from bench import learning_curve

    requests = ["a"] * 20 + ["b"] * 20
    first = [-1.0] * 10 + [1.0] * 10 + [-1.0, -1.0, 1.0, 1.0] + [1.0] * 16
    second = [1.0] * 10 + [1.0] * 10 + [1.0, 1.0, -1.0, -1.0] + [1.0] * 16
    assert stats.paired(second * 3, first * 3)["p"] < 0.001  # the seeds pooled as if independent
    assert stats.paired([second] * 3, [first] * 3)["p"] == pytest.approx(2 * (91 + 14 + 1) / 2 ** 14)  # by pair: 0.013
    write_learning_curve(tmp_path, monkeypatch, [learning_curve_result(16, s, first) for s in range(3)]
                         + [learning_curve_result(16, s, second, second_pass=True) for s in range(3)])
    text = learning_curve.report(requests=requests)
    # +10 points of 40 on request a, 0 on b: +25 points; the bootstrap over the two requests +50 (a, a), +25, 0 (b, b)
    assert ("seeds 0, 1, 2 averaged pair by pair and paired by request: 95.0% (90.0-100.0) against 70.0% (50.0-90.0), "
            "difference +25.0 (+0.0, +50.0), p = 1.00, +12/-2.") in text
    assert text.count("| +25.0 (+0.0, +50.0), p = 1.00, +12/-2 |") == 3  # each seed, by request


def test_token_rewards_reevaluates_a_model_trained_here_without_training_it(tmp_path, monkeypatch):
    token_rewards = sandboxed_token_rewards(tmp_path, monkeypatch, "main")
    evaluations = []
    monkeypatch.setattr(token_rewards, "evaluate_model", lambda model_dir, max_length: evaluations.append(1) or {"test": {"n": len(evaluations)}})
    commands = []
    monkeypatch.setattr(token_rewards.runner, "run_measured", lambda command, log=None: commands.append(command) or {})
    with pytest.raises(SystemExit, match="no trained model"):
        token_rewards.run_row("BT", 0, reevaluate=True)
    out = token_rewards.run_directory("BT", 0)
    out.mkdir(parents=True)
    (out / "final.json").write_text(json.dumps({"steps": 3}))
    (out / "measured.json").write_text(json.dumps({"wall_seconds": 5.0}))
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "rewards/margins": 0.1}) + "\n")
    first = token_rewards.run_row("BT", 0)
    assert first["test"] == {"n": 1} and first["wall_seconds"] == 5.0 and commands == []  # the model is here: evaluated only
    assert token_rewards.run_row("BT", 0) == first and len(evaluations) == 1  # stored: read back
    again = token_rewards.run_row("BT", 0, reevaluate=True)
    assert again["test"] == {"n": 2} and commands == []  # evaluated again, never trained


def test_token_rewards_uncertainty_calibrates_against_the_labellers_probability():
    """A model whose margins are the gold differences is calibrated against sigmoid(gold difference / tau); an AVA
    posterior with the right spread is too; ranking by mu - k sigma moves the margins by k (s- - s+)."""
    import math

    from bench import token_rewards

    gold = [(0.5 * i, -0.3 * i) for i in range(1, 41)]
    pairs = [{"prompt": f"p{i // 5}", "chosen": f"c{i}", "rejected": f"r{i}", "score_chosen": a, "score_rejected": b}
             for i, (a, b) in enumerate(gold)]
    margins = [a - b for a, b in gold]
    requests = [p["prompt"] for p in pairs]
    by_reply = {**{(p["prompt"], p["chosen"]): {"score_sigma": 0.2} for p in pairs},
                **{(p["prompt"], p["rejected"]): {"score_sigma": 0.1} for p in pairs}}
    bt = token_rewards.uncertainty(pairs, {k: {} for k in by_reply}, margins, requests, "bt")
    assert bt["sigmoid"]["ece"] < 1e-9 and "posterior" not in bt
    ava = token_rewards.uncertainty(pairs, by_reply, margins, requests, "ava")
    spread = math.sqrt(0.2 ** 2 + 0.1 ** 2)
    assert ava["posterior"]["bins"][-1]["predicted"] == pytest.approx(0.5 * math.erfc(-margins[-1] / math.sqrt(2) / spread), abs=0.01)
    assert ava["pessimism"]["1.0"]["accuracy"] == 1.0  # every margin > k (0.2 - 0.1)
    shifted = token_rewards.uncertainty(pairs, by_reply, [0.05] * len(pairs), requests, "ava")
    assert shifted["pessimism"]["1.0"]["accuracy"] == 0.0 and shifted["pessimism"]["0.5"]["accuracy"] == 0.5  # 0.05 - k 0.1


def test_best_of_n_picks_within_disjoint_groups():
    from bench import best_of_n

    gold = [[float(i) for i in range(32)], [float(-i) for i in range(32)]]
    ceiling = best_of_n.curve(gold, gold)
    assert ceiling["1"]["gold"] == pytest.approx((15.5 - 15.5) / 2) and ceiling["1"]["selections"] == 64
    # groups of 32: the first request's best is 31, the second's 0
    assert ceiling["32"]["gold"] == pytest.approx((31 + 0) / 2) and ceiling["32"]["selections"] == 2
    inverted = best_of_n.curve(gold, [[-g for g in row] for row in gold])  # a reward that prefers the worst
    assert inverted["32"]["gold"] == pytest.approx((0 - 31) / 2)
    assert ceiling["4"]["ci95"][0] <= ceiling["4"]["gold"] <= ceiling["4"]["ci95"][1]
