"""Export: reward models others can load without this repository.

A Bradley-Terry or BT-var model is a causal LM's backbone plus one linear head read at the last
token of the sequence (ava.ScalarRewardModel: prompt + response + EOS, the score is the head at
the EOS). That is exactly a Hugging Face sequence-classification model with one label, so
`export_sequence_classification` writes one (LlamaForSequenceClassification for Llama / SmolLM2,
GPT2ForSequenceClassification for GPT-2, ...): the backbone's weights unchanged, `score.weight` =
our `reward_head.weight` (1, d), no bias (ours has none). train_rm.py writes it after training, in
OUTPUT_DIR/model/sequence_classification; `python -m avalib.export DIR` exports a model saved earlier.

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    model = AutoModelForSequenceClassification.from_pretrained("runs/rm/model/sequence_classification")
    tokenizer = AutoTokenizer.from_pretrained("runs/rm/model/sequence_classification")
    ids = [tokenizer(prompt, add_special_tokens=False).input_ids
           + tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]]
    batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt")     # pads with the export's pad token
    score = model(**batch).logits[:, 0]                                # = our score (tests/test_export.py, 1e-5)

The padding trap, and how the export avoids it. HF's sequence classifiers read the score at "the
rightmost token that is not config.pad_token_id". SmolLM2's pad token IS its EOS (<|im_end|>), and
our sequences end with EOS, so with pad_token_id = EOS HF would read the token before the EOS: a
different, wrong score. The export therefore adds a pad token that never occurs in any text,
`<|ava_pad|>`, to the exported tokenizer, gives it the id after the last one (its embedding row is
zeros and never read: padding is masked), and sets config.pad_token_id and the tokenizer's pad
token to it. Every other token id is unchanged, so the policy's tokenizer and this model agree on
every real token. Pad on either side: right padding is exact; left padding shifts the positions,
which rotary attention does not see (up to float rounding). Score what we trained on: the prompt and
the response tokenised separately, without special tokens, and EOS appended (data.encode); a
response cut at the length limit has no EOS and is read at its last token, as ours.

BT-var: the export carries the mean (the score); the variance head (Eq. 26) stays in heads.safetensors.

AVA (ava-p / ava-d) and Preference Transformer models are not a last-token linear head, so they
have no standard HF class. To score them from another codebase, load the backbone (the directory
is a plain causal LM: AutoModelForCausalLM.from_pretrained(DIR)) and the heads (safetensors
`heads.safetensors`, names as below), then with h = the backbone's last hidden states after its
final norm (`lm.model(input_ids, attention_mask).last_hidden_state`, (B, T, d); never the logits),
on a right-padded batch of prompt + response + EOS whose response positions are R (a bool (B, T)
mask, prompt excluded):
  - Preference Transformer: r_t = reward_head.weight . h_{t+1} for each response transition t (the
    token t+1 is a response token); weights w = Eq. 11 with literal normalisation: queries q =
    weighting.query.weight h, keys k = weighting.key.weight h over the response positions,
    w_j = (1/|y|) sum_i softmax_j(q_i . k_j / sqrt(d)) (not causal, padding masked); score = sum_t w_t r_t.
  - AVA (TQR): the positions read are R plus the one before the first response token (the state of
    the first action); w = Eq. 11 over those positions (by default "mean-one": without the 1/|y|;
    reward_model.json's ava_config.reward_weighting says which; "off" means w = 1); the reward head
    gives (m, s) = reward_head.weight h + reward_head.bias at every position; mu = w * m,
    sigma = w * softplus(s) + sigma_min (ava_config.sigma_min). The score E[R|y] is mu at the
    sequence's last token (ava_config.cer_reading "last", the default), sigma there its uncertainty,
    and mu at each response token its dense per-token reward (Eq. 19).
`python -m avalib.score` writes all of these for a JSONL file of rows, with this repository.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from avalib import models, reward_models

EXPORTABLE = ("bt", "bt-var")  # kinds whose score is a linear head on the last token
SUBDIRECTORY = "sequence_classification"  # where train_rm.py puts the export, inside OUTPUT_DIR/model
PAD_TOKEN = "<|ava_pad|>"  # a token no text contains: HF's last-non-pad-token rule then finds our EOS


def export_sequence_classification(model, tokenizer, directory: str | Path) -> Path:
    """Write a bt / bt-var model (ava.ScalarRewardModel) as a Hugging Face sequence-classification model
    with one label (see the module docstring): config, safetensors weights, tokenizer with its own pad token."""
    import copy

    from transformers import AutoModelForSequenceClassification

    kind = getattr(model, "kind", None)
    if kind not in EXPORTABLE:
        raise ValueError(f"a {kind or type(model).__name__} reward model is not a last-token linear head: only "
                         f"{' and '.join(EXPORTABLE)} export as sequence classifiers "
                         "(see avalib/export.py for the others)")
    lm = models.language_model(model)
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    config = copy.deepcopy(lm.config)
    config.num_labels = 1  # one score; id2label {0: "LABEL_0"}
    classifier = AutoModelForSequenceClassification.from_config(config, dtype=lm.dtype)
    missing, unexpected = classifier.base_model.load_state_dict(lm.base_model.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{type(classifier).__name__}: backbone weights do not match (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    with torch.no_grad():
        classifier.score.weight.copy_(model.reward_head.weight)  # (1, d) both: no transpose
    if len(tokenizer) > classifier.get_input_embeddings().num_embeddings:
        classifier.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        classifier.get_input_embeddings().weight[tokenizer.pad_token_id].zero_()  # never read (padding is masked)
    classifier.config.pad_token_id = tokenizer.pad_token_id
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    classifier.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    (directory / "README.md").write_text(
        f"# {kind} reward model (exported by ava)\n\n"
        f"`AutoModelForSequenceClassification.from_pretrained(this directory)`; the score is `logits[:, 0]`.\n"
        f"Score prompt tokens + response tokens + EOS (`{tokenizer.eos_token}`), each part tokenised without special "
        f"tokens. The pad token `{PAD_TOKEN}` (id {tokenizer.pad_token_id}) occurs in no text, so the last "
        "non-pad token is the EOS, where the model was trained to score (the original pad token was the EOS "
        "itself).\n")
    return directory


def export_saved_reward_model(model_directory: str | Path, directory: str | Path | None = None) -> Path:
    """Export a reward model saved by train_rm.py (OUTPUT_DIR/model) to `directory` (default:
    MODEL_DIRECTORY/sequence_classification)."""
    model, tokenizer, meta = reward_models.load_reward_model(model_directory)
    if meta["kind"] not in EXPORTABLE:
        raise SystemExit(f"{model_directory}: a {meta['kind']} model has no standard Hugging Face class; "
                         "avalib/export.py's docstring says how to score it elsewhere, `python -m avalib.score` here")
    return export_sequence_classification(model, tokenizer, directory or Path(model_directory) / SUBDIRECTORY)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m avalib.export",
                                     description="Export a bt / bt-var reward model saved by train_rm.py as a "
                                                 "Hugging Face sequence-classification model (see avalib/export.py).")
    parser.add_argument("model", help="a reward model directory saved by train_rm.py (its OUTPUT_DIR/model)")
    parser.add_argument("--out", default="", help=f"where to write it (default: MODEL/{SUBDIRECTORY})")
    args = parser.parse_args(argv)
    directory = export_saved_reward_model(args.model, args.out or None)
    print(f"wrote {directory}")
    return directory


if __name__ == "__main__":
    main()
