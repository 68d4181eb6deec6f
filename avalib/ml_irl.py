"""ML-IRL's reward learning (irl-rewards-from-demonstrations.md; train_ppo.py --iterations K): sample the
current policy on the demonstrations' prompts, pair (demonstration, sample), and learn a reward on the
pairs: a preference objective through train_rm.py, or a discriminator (AfD Eq. 18 / 20) here."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import ava
from avalib import data, distributed, generation, loop, models, reward_models, sources


def learn_reward(args, iteration: int, policy_lm, tokenizer, output_dir: Path, dist: distributed.Distributed,
                 train_preference_reward):
    """One reward-learning step of ML-IRL: sample the current policy on the demonstrations' prompts,
    pair (demonstration, sample), and train a reward model on the pairs: a preference objective
    through `train_preference_reward(pairs_file, output_dir, iteration)` (train_ppo.py's, which calls
    train_rm.train_reward_model with its Args), or a discriminator (demonstration tokens 1, policy tokens 0)
    here. `args` is train_ppo.py's Args."""
    demos, _ = sources.load_rows(args.demos, "demos", "train", tokenizer, args.skip_bad_rows, args.limit or None)
    samples = generation.generate(policy_lm, tokenizer, [d["prompt"] for d in demos],
                                  max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_p=args.top_p, seed=args.seed + 7919 * iteration,
                              chat_template=False, desc=f"ML-IRL {iteration}: sampling the policy")
    pairs = [{"prompt": d["prompt"], "chosen": d["response"], "rejected": s}
             for d, s in zip(demos, samples) if s.strip() and s != d["response"]]
    directory = output_dir / f"irl-{iteration}"
    saved = directory / "reward" / "model"
    if (saved / "reward_model.json").is_file():  # learnt before a restart: the same reward, not a new one
        model, _, _ = reward_models.load_reward_model(saved, dist.device)
        return model.eval()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    if args.irl_reward in ("bt", "ava-p"):
        train_preference_reward(directory / "pairs.jsonl", directory / "reward", iteration)
        model, _, _ = reward_models.load_reward_model(saved, dist.device)
        return model.eval()
    model = train_discriminator(args, pairs, tokenizer, directory / "reward", dist)
    if dist.is_main:
        reward_models.save_reward_model(saved, model, tokenizer, {"kind": "bt", "ava_config": None,
                                                           "discriminator": args.irl_reward,
                                                           "level": args.adversarial_level})
    return model


def train_discriminator(args, pairs: list[dict], tokenizer, output_dir: Path, dist: distributed.Distributed):
    """D_phi(y | x) or D_phi(s, a) = sigmoid(logit) separating demonstrations (1) from policy samples (0)
    by binary cross-entropy (AfD Eq. 18 / 20), on the initial model's backbone with a scalar head. It
    trains through the same loop as every reward model (avalib/loop.py: batches, DDP, clipping, metrics),
    for --reward-steps steps at --reward-lr."""
    lm, _ = models.load_model(args.model, tokenizer=tokenizer)
    models.freeze_layers(lm, None if args.trainable_layers < 0 else args.trainable_layers)
    model = ava.ScalarRewardModel(lm, "bt").to(dist.device)
    items = [data.encode_pair(tokenizer, p["prompt"], p["chosen"], p["rejected"], args.max_length)[:2] for p in pairs]

    def loss_fn(model, local):
        n = len(local)
        out = model(**data.collate([items[i][0] for i in local] + [items[i][1] for i in local], tokenizer.pad_token_id,
                                   device=dist.device))
        labels = torch.cat([torch.ones(n), torch.zeros(n)]).to(out.score.device)
        if args.adversarial_level == "token":
            token_labels = labels[:, None].expand_as(out.rewards)
            per_token = F.binary_cross_entropy_with_logits(out.rewards, token_labels, reduction="none")
            loss = ava.masked_mean(per_token, out.mask)
        else:
            loss = F.binary_cross_entropy_with_logits(out.score, labels)
        return loss, {"loss": loss}

    loop_args = dataclasses.replace(args, lr=args.reward_lr, max_steps=args.reward_steps, epochs=10**6, save_every=0,
                                    eval_every=0, resume=False, crash_at_step=0, inject_nan_at_step=0, dump_grads="")
    lengths = [len(chosen["input_ids"]) + len(rejected["input_ids"]) for chosen, rejected in items]
    model, _ = loop.train_loop(loop_args, model, lengths, loss_fn, dist, output_dir, desc="discriminator")
    return model.eval()
