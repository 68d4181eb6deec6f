"""The model card of a saved reward model: README.md in its directory, saying what the model is (objective,
preset and resolved AVA config), how it was trained (data, budget), how well it did (dev accuracy with
its interval, when the run evaluated) and how to score with it, from reward_model.json's record of the
run and the run's final metrics. Plain Markdown, written by reward_models.save_reward_model."""
from __future__ import annotations

import json
from pathlib import Path

OBJECTIVES = {
    "ava-p": "AVA-p (Eq. 17 + CER, Eq. 18): a TQR model, Q-values and a Gaussian reward posterior N(mu_t, sigma_t) "
             "per token, trained on preference pairs",
    "ava-d": "AVA-d (Eq. 13): a TQR model, Q-values and a Gaussian reward posterior N(mu_t, sigma_t) per token, "
             "trained on demonstrations",
    "bt": "Bradley-Terry: a scalar reward read at the last token, -log sigmoid(r+ - r-)",
    "bt-var": "BT-var (AfD Eq. 26): Bradley-Terry with a variance head",
    "pref-trans": "Preference Transformer: attention-weighted sum of per-token rewards",
}
BUDGET = ("epochs", "max_steps", "batch_size", "lr", "trainable_layers", "max_length", "seed")


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def reward_model_card(directory: str | Path, meta: dict, results: dict) -> str:
    """README.md for the reward model saved in `directory`: meta is what reward_model.json holds ({"kind",
    "ava_config", "args", ...}), results the run's final metrics (final.json; {} if none)."""
    args, kind = meta.get("args") or {}, meta["kind"]
    by = ("train_ppo.py's ML-IRL, as its discriminator" if meta.get("discriminator")
          else "train_direct.py, the policy's own reward" if "objective" in meta else "train_rm.py")
    lines = [f"# Reward model: {kind}", "",
             f"Trained with ava, the reference implementation of AVA (Approximated Variational Alignment), by {by}. "
             "Load it with one call (below); `reward_model.json` holds the full record of the run.", "",
             "## What it is", "",
             f"- objective: `{kind}`, {OBJECTIVES.get(kind, 'a reward model')}"]
    if meta.get("discriminator"):
        lines.append(f"- an ML-IRL discriminator ({meta['discriminator']}, {meta.get('level', 'token')} level): "
                     "demonstrations 1, policy samples 0")
    if args.get("model"):
        lines.append(f"- base model: `{args['model']}`")
    if meta.get("ava_config"):
        preset = args.get("preset", "paper")
        ablate = f", ablations `{args['ablate']}`" if args.get("ablate") else ""
        lines += [f"- AVA preset: `{preset}`{ablate}; the resolved config (ava.AVAConfig):", "",
                  "```json", json.dumps(meta["ava_config"], indent=1), "```"]
    lines += ["", "## How it was trained", ""]
    if args.get("data"):
        split = f" (split `{args['train_split']}`)" if args.get("train_split") else ""
        rows = f", {results['train_pairs']} training rows" if "train_pairs" in results else ""
        lines.append(f"- data: `{args['data']}`{split}{rows}{', AfD pairs' if args.get('afd') else ''}")
    budget = ", ".join(f"{name.replace('_', ' ')} {args[name]}" for name in BUDGET if name in args)
    if budget:
        lines.append(f"- budget: {budget}")
    if "steps" in results:
        timed = isinstance(results.get("train_seconds"), (int, float))
        seconds = f" in {results['train_seconds']:.0f} s" if timed else ""
        lines.append(f"- trained {results['steps']} optimiser steps{seconds}")
    lines += ["", "## How well it did", ""]
    if "eval/accuracy" in results:
        low, high = results.get("eval/accuracy_wilson95", [float("nan")] * 2)
        source = args.get("eval_data") or f"{args.get('data', '?')} [{args.get('eval_split', 'dev')}]"
        lines.append(f"- dev accuracy {_percent(results['eval/accuracy'])} (Wilson 95% interval {_percent(low)} to "
                     f"{_percent(high)}) on {results.get('eval/pairs', '?')} pairs of `{source}`, ties counted half; "
                     f"mean margin {results.get('eval/margin', float('nan')):+.3f}")
    else:
        lines.append("- not evaluated when saved (`python train_rm.py --eval-only --load DIR --eval-data PAIRS` "
                     "measures it)")
    lines += ["", "## How to score", "",
              "With the repository's root (`ava.py`, `avalib/`) on the Python path:", "", "```python",
              "from avalib.reward_models import RewardModel", "",
              f"reward_model = RewardModel.from_pretrained({str(Path(directory))!r})",
              "scored = reward_model.score([\"How do I say thank you?\"], [\" Thank you very much!\"])",
              "scored[0][\"score\"]    # the sequence reward" + (" E[R | y]" if meta.get("ava_config") else ""),
              "scored[0][\"rewards\"]  # per response token" + (" mu_t (Eq. 19), with scored[0][\"sigmas\"]"
                                                            if meta.get("ava_config") else ""),
              "```", "",
              "or, for a file of prompt/response rows, `python -m avalib.score --model DIR --data rows.jsonl --out "
              "scores.jsonl`. Prompts are scored as the exact text given (the built-in task's prompts are "
              "chat-templated text).", "",
              "Files: the backbone (`model.safetensors`, `config.json`, save_pretrained), the tokenizer, the heads "
              "(`heads.safetensors`), `reward_model.json`."]
    return "\n".join(lines) + "\n"
