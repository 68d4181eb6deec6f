"""Reward models: build, save (safetensors, with a model card), load, score.

    from avalib.reward_models import RewardModel
    reward_model = RewardModel.from_pretrained("runs/rm/model")   # any directory train_rm.py saved
    reward_model.score(["How do I say thank you?"], [" Thank you very much!"])  # [{"score", "tokens", "rewards", ...}]
"""
from __future__ import annotations

from pathlib import Path

import torch

import ava
from avalib import data, model_card, models


REWARD_KINDS = ("bt", "bt-var", "pref-trans", "ava-p", "ava-d")


def build_reward_model(lm, kind: str, ava_config=None, *, trunk=None, share_prompts: bool = True):
    """A reward model of one kind around a causal LM: TQR for AVA, ScalarRewardModel otherwise. trunk and
    share_prompts: how it computes its hidden states (ava.LMWithHeads; trunk e.g. frozen_trunk.build_frozen_trunk)."""
    if kind in ("ava-p", "ava-d"):
        model = ava.TQR(lm, ava_config or ava.AVAConfig(), trunk=trunk, share_prompts=share_prompts)
        uses_lm_head = model.q_head is None
    elif kind in ava.ScalarRewardModel.KINDS:
        model, uses_lm_head = ava.ScalarRewardModel(lm, kind, trunk=trunk, share_prompts=share_prompts), False
    else:
        raise ValueError(f"unknown reward model kind {kind!r}: expected one of {REWARD_KINDS}")
    head = lm.get_output_embeddings()
    if not uses_lm_head and head.weight is not lm.get_input_embeddings().weight:
        head.requires_grad_(False)  # an untied LM head this model never reads: no gradient, so freeze it (DDP)
    return model


def save_reward_model(directory: str | Path, model, tokenizer, meta: dict, results: dict | None = None) -> None:
    """`directory/` gets the backbone via save_pretrained (safetensors), the tokenizer, the heads
    (`heads.safetensors`: everything outside the LM), `reward_model.json` (kind, AVA config, run config) and
    a model card, README.md (model_card.reward_model_card: what it is, how it was trained, how well it did
    on `results`, the run's final metrics, and how to score with it)."""
    import json

    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.lm.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    heads = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()
             if not name.startswith("lm.")}
    save_file(heads, str(directory / "heads.safetensors"))
    (directory / "reward_model.json").write_text(json.dumps(meta, indent=2, default=str))
    (directory / "README.md").write_text(model_card.reward_model_card(directory, meta, results or {}))


def load_reward_model(directory: str | Path, device: str | torch.device = "cpu"):
    """Load what `save_reward_model` wrote -> (model in eval mode on `device`, tokenizer, meta). Its batches
    go to `device` too (data.collate(..., device=device); score_texts does it)."""
    import json

    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path = directory / "reward_model.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory}: not a saved reward model (no reward_model.json)")
    meta = json.loads(meta_path.read_text())
    lm, tokenizer = models.load_model(str(directory))
    model = build_reward_model(lm, meta["kind"],
                               ava.AVAConfig(**meta["ava_config"]) if meta.get("ava_config") else None)
    heads = directory / "heads.safetensors"
    if problem := models.safetensors_problem(heads):  # named here: safetensors' own error names no file
        raise models.ModelLoadError(f"{heads}: damaged or missing ({problem}); save or copy the reward model again")
    missing = model.load_state_dict(load_file(str(heads)), strict=False)
    not_loaded = [k for k in missing.missing_keys if not k.startswith("lm.")]
    if not_loaded or missing.unexpected_keys:
        raise RuntimeError(f"{directory}/heads.safetensors does not match a {meta['kind']} model: "
                           f"missing {not_loaded}, unexpected {missing.unexpected_keys}")
    return model.to(device).eval(), tokenizer, meta


class RewardModel:
    """A saved reward model in one object, loaded with one call from anywhere (only this package on the
    path): `RewardModel.from_pretrained(directory)`. `.score(prompts, responses)` scores text
    (score_texts: the sequence score, and per token the rewards, AVA's mu_t with sigma_t); `.model` is
    the torch module (ava.TQR or ava.ScalarRewardModel), `.tokenizer` its tokenizer, `.meta` how it was
    trained (reward_model.json; README.md in the directory says it in prose)."""

    def __init__(self, model, tokenizer, meta: dict):
        self.model, self.tokenizer, self.meta = model, tokenizer, meta

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> RewardModel:
        return cls(*load_reward_model(directory, device))

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    def score(self, prompts: list[str], responses: list[str], **options) -> list[dict]:
        """score_texts(model, tokenizer, prompts, responses, **options): one dict per response."""
        return score_texts(self.model, self.tokenizer, prompts, responses, **options)


def reward_forward(model, batch: dict):
    """(sequence score (B,), per-transition rewards (B, T-1), sigma (B, T-1) or None, mask) of any reward model."""
    out = model(**batch)
    if isinstance(out, ava.TQROutput):
        rewards, sigma = ava.dense_rewards(out)
        return out.sequence_reward(), rewards, sigma, out.mask
    return out.score, out.rewards, None, out.mask


@torch.no_grad()
def score_texts(model, tokenizer, prompts: list[str], responses: list[str], max_length: int = 512,
                batch_size: int = 8, per_token: bool = True) -> list[dict]:
    """Score responses to prompts with a reward model: {"score", "sigma", and per token: "tokens",
    "rewards", "sigmas"} (sigma only for AVA's TQR; per-token rewards are Eq. 19's mu_t)."""
    results = []
    for start in range(0, len(prompts), batch_size):
        part = zip(prompts[start:start + batch_size], responses[start:start + batch_size])
        examples = [data.encode(tokenizer, p, [r], max_length)[0][0] for p, r in part]
        batch = data.collate(examples, tokenizer.pad_token_id, device=models.device_of(model))
        score, rewards, sigma, mask = reward_forward(model, batch)  # on the model's device; read on the CPU
        score, rewards, mask, ids = score.float().cpu(), rewards.float().cpu(), mask.cpu(), batch["input_ids"].cpu()
        sigma = None if sigma is None else sigma.float().cpu()
        for row in range(len(examples)):
            item = {"score": float(score[row])}
            positions = mask[row].nonzero().flatten()
            if sigma is not None:
                item["sigma"] = float(sigma[row, positions[-1]])
            if per_token:
                item["tokens"] = [tokenizer.decode([int(ids[row, t + 1])]) for t in positions]
                item["rewards"] = rewards[row, positions].tolist()
                if sigma is not None:
                    item["sigmas"] = sigma[row, positions].tolist()
            results.append(item)
    return results


def token_reward_table(tokenizer, input_ids, mu, sigma, mask) -> list[tuple[str, float, float]]:
    """One sequence's response tokens with the reward of the transition that emitted each one:
    [(token text, mu, sigma)]. input_ids (T,); mu, sigma, mask on the transition grid (T-1,)."""
    rows = []
    for t in mask.nonzero().flatten().tolist():
        rows.append((tokenizer.decode([int(input_ids[t + 1])]), float(mu[t]), float(sigma[t])))
    return rows


def which_reward(reward_model, dense: bool, pessimism: float, discriminator: str) -> str:
    """What the rollouts are scored by, in words (logged once per stage). With Eq. 19 an AVA model's dense
    reward is mu_t at every token, so PPO maximises the return sum_t mu_t: the score the model was trained
    to rank pairs by only where its config reads E[R|y] as that return (cer_reading="return-sum"); with
    the paper's "last", CER ranks by the last mu and the other mu_t are what TD and the prior made them."""
    if discriminator:
        return f"the {discriminator} discriminator's {'per-token' if dense else 'sequence'} reward"
    penalty = f" - {pessimism} * sigma_t" if pessimism else ""
    if isinstance(reward_model, ava.TQR):
        reading = reward_model.config.cer_reading
        if not dense:
            return f"the AVA model's sequence score E[R|y] ({reading}){penalty} at the last token"
        agrees = "the same return its CER ranked pairs by" if reading == "return-sum" else (
            f"a return its CER did not rank pairs by (it read E[R|y] as '{reading}')")
        return f"the dense reward mu_t{penalty} of Eq. 19 at every token: the return sum_t mu_t, {agrees}"
    kind = getattr(reward_model, "kind", "reward model")
    return (f"the {kind} model's per-token reward at every token" if dense
            else f"the {kind} model's sequence score at the last token")
