"""Reward models others can load (avalib/export.py, avalib/score.py): a Bradley-Terry / BT-var model
exported as a Hugging Face sequence classifier gives our scores through AutoModelForSequenceClassification
(right- and left-padded batches, SmolLM2's pad = EOS trap included); train_rm.py writes the export; the
scoring command line writes scores, per-token rewards and AVA's sigma."""
import json

import pytest
import torch

from avalib import data, export, models, reward_models, score
import train_rm
from conftest import randomize_heads, tiny_lm
from test_train_rm import hh_rows, write_jsonl


PROMPTS = ["\n\nHuman: how do cats purr?\n\nAssistant:", "Say something nice.", "\n\nHuman: hi\n\nAssistant:"]
RESPONSES = [" With their larynx, mostly.", " You are great and kind, and everyone likes you a lot.", " Hello!"]


def saved_reward_model(tmp_path, tiny_model_dir, kind, backbone="llama"):
    """A tiny reward model with non-degenerate heads, saved as train_rm.py saves it."""
    tokenizer = models.load_tokenizer(tiny_model_dir)
    lm = models.load_model(tiny_model_dir, tokenizer=tokenizer)[0] if backbone == "llama" else tiny_lm("gpt2", len(tokenizer))
    model = randomize_heads(reward_models.build_reward_model(lm, kind), seed=3)
    directory = tmp_path / f"{kind}-{backbone}"
    reward_models.save_reward_model(directory, model, tokenizer, {"kind": kind, "ava_config": None})
    return directory


def hf_scores(directory, padding_side="right"):
    """What another codebase does: AutoModelForSequenceClassification and AutoTokenizer from the export,
    our token layout (prompt + response + EOS), the tokenizer's own padding."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    classifier = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.padding_side = padding_side
    ids = [data.encode(tokenizer, p, [r], 512)[0][0]["input_ids"] for p, r in zip(PROMPTS, RESPONSES)]
    batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
    with torch.no_grad():
        return classifier(**batch).logits[:, 0], batch


@pytest.mark.parametrize("kind,backbone", [("bt", "llama"), ("bt-var", "llama"), ("bt", "gpt2")])
def test_exported_sequence_classifier_gives_our_scores(tmp_path, tiny_model_dir, kind, backbone):
    directory = saved_reward_model(tmp_path, tiny_model_dir, kind, backbone)
    exported = export.export_saved_reward_model(directory)
    assert exported == directory / "sequence_classification"
    model, tokenizer, _ = reward_models.load_reward_model(directory)
    ours = torch.tensor([r["score"] for r in reward_models.score_texts(model, tokenizer, PROMPTS, RESPONSES)])
    theirs, batch = hf_scores(exported)
    assert (batch["attention_mask"] == 0).any()  # the rows differ in length: padding was there to be skipped
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    if backbone == "llama":  # left padding shifts every position; rotary attention sees only offsets
        left, _ = hf_scores(exported, "left")
        torch.testing.assert_close(left, ours, rtol=0, atol=1e-4)
    config = json.loads((exported / "config.json").read_text())
    pad = config["pad_token_id"]
    assert pad != tokenizer.eos_token_id and pad == len(tokenizer)  # a new id after every real one
    assert config["id2label"] == {"0": "LABEL_0"}


def test_pad_equal_to_eos_would_read_the_wrong_token(tmp_path, tiny_model_dir):
    """Why the export brings its own pad token: with SmolLM2's pad (= EOS) HF reads the token before
    the EOS, a different score."""
    from transformers import AutoModelForSequenceClassification

    exported = export.export_saved_reward_model(saved_reward_model(tmp_path, tiny_model_dir, "bt"))
    good, batch = hf_scores(exported)
    classifier = AutoModelForSequenceClassification.from_pretrained(exported).eval()
    classifier.config.pad_token_id = models.load_tokenizer(tiny_model_dir).eos_token_id
    with torch.no_grad():
        bad = classifier(**batch).logits[:, 0]
    assert (bad - good).abs().min() > 1e-4


def test_ava_and_preference_transformer_do_not_export(tmp_path, tiny_model_dir):
    for kind in ("ava-p", "pref-trans"):
        with pytest.raises(SystemExit, match="no standard Hugging Face class"):
            export.export_saved_reward_model(saved_reward_model(tmp_path, tiny_model_dir, kind))


def test_train_rm_writes_the_export_for_bt(tmp_path, tiny_model_dir):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", hh_rows(8))
    common = ["--model", tiny_model_dir, "--data", pairs, "--max-length", "64", "--batch-size", "4", "--lr", "1e-3",
              "--trainable-layers", "-1", "--save-every", "0"]
    train_rm.main([*common, "--objective", "bt", "--output-dir", str(tmp_path / "bt")])
    exported = tmp_path / "bt" / "model" / export.SUBDIRECTORY
    model, tokenizer, _ = reward_models.load_reward_model(tmp_path / "bt" / "model")
    ours = torch.tensor([r["score"] for r in reward_models.score_texts(model, tokenizer, PROMPTS, RESPONSES)])
    torch.testing.assert_close(hf_scores(exported)[0], ours, rtol=0, atol=1e-5)
    train_rm.main([*common, "--objective", "ava-p", "--output-dir", str(tmp_path / "ava")])
    assert not (tmp_path / "ava" / "model" / export.SUBDIRECTORY).exists()


def test_score_command_line_writes_scores_and_per_token_rewards(tmp_path, tiny_model_dir):
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": p, "response": r} for p, r in zip(PROMPTS, RESPONSES)])
    for kind in ("ava-p", "bt"):
        directory = saved_reward_model(tmp_path, tiny_model_dir, kind)
        out = tmp_path / f"{kind}.jsonl"
        score.main(["--model", str(directory), "--data", rows, "--out", str(out), "--batch-size", "2"])
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        model, tokenizer, _ = reward_models.load_reward_model(directory)
        expected = reward_models.score_texts(model, tokenizer, PROMPTS, RESPONSES)
        assert [line["row"] for line in lines] == [0, 1, 2]
        for line, want in zip(lines, expected):
            assert line["score"] == pytest.approx(want["score"], abs=1e-6)
            assert line["tokens"] == want["tokens"] and line["tokens"][-1] == tokenizer.eos_token
            assert line["rewards"] == pytest.approx(want["rewards"], abs=1e-6)
            assert ("sigma" in line and len(line["sigmas"]) == len(line["tokens"])) == (kind == "ava-p")
        if kind == "ava-p":  # the score is E[R|y]: mu at the last token
            assert lines[0]["score"] == pytest.approx(lines[0]["rewards"][-1], abs=1e-6)
        else:  # BT: the head at the last token (the EOS)
            assert lines[1]["score"] == pytest.approx(lines[1]["rewards"][-1], abs=1e-6)
