"""PPO against a learned reward: AVA's dense intermediate rewards (Eq. 19) or a last-token score;
Best-of-N; the ML-IRL loop; adversarial (AIRL / GAIL-style) rewards.

  python train_ppo.py --reward-model runs/rm/model                    # PPO; AVA model -> dense rewards mu_t
  python train_ppo.py --reward-model runs/rm/model --pessimism 1.0    # the pessimistic reward mu - 1.0 * sigma
  python train_ppo.py --reward-model runs/bt/model                    # BT / Pref-Trans: last-token score
  python train_ppo.py --best-of-n 8 --reward-model runs/rm/model --bon-against runs/bt/model   # Table 2
  python train_ppo.py --iterations 3 --demos builtin --irl-reward ava-p                       # ML-IRL
  python train_ppo.py --iterations 3 --demos builtin --irl-reward adversarial-rkl --adversarial-level token
  torchrun --nproc_per_node 2 train_ppo.py --reward-model runs/rm/model

One PPO update: sample a batch of replies (KV-cached, the shared sampler), score them with the
frozen reward model and the frozen reference (the initial policy), build per-token rewards (the
reward model's rewards minus kl_coef * (log pi - log pi_ref) at every token), estimate advantages
with GAE (gamma = 1, lambda = 0.95) from a value model, whiten them over valid tokens, then
`--ppo-epochs` passes of clipped policy and value losses over minibatches (one optimiser step each;
--grad-accum splits a minibatch into micro-batches weighted by their valid tokens, so its gradient is
unchanged, gradients synchronised after the last). The implementation details that make PPO on LMs
work ("The N+ implementation details of RLHF with PPO"), each a flag or a documented choice:
  - EOS: a reply ends at the policy's EOS; the EOS token is part of the action sequence (it gets a
    log-prob, a reward and an advantage), exactly as the reward model saw EOS-terminated replies.
    A reply cut at --max-new-tokens without EOS gets --missing-eos-penalty subtracted at its last token.
  - Pad != EOS: SmolLM2's pad token *is* its EOS; masks come from lengths, never from ids.
  - Temperature: logits are divided by --temperature both when sampling and when computing the
    log-probs PPO trains on (old, new and reference alike). --top-p defaults to 1: a nucleus would
    make the sampled policy differ from the one whose log-probs are trained.
  - Value model: a copy of the reward model's backbone with a scalar head initialised from its reward
    head (AVA: the mu row), read at the state (position t) of each transition (--no-value-from-reward: the policy's
    backbone, zero head).
  - GAE over response tokens with the value after the last token 0; advantages whitened over valid
    tokens (--no-whiten-advantages); policy ratio clipped at --cliprange, value at --cliprange-value;
    dropout off (every model in eval mode).
  - --bf16 (a CUDA GPU): bf16 autocast around the rollouts' scoring (policy, reference, value, reward
    model) and the update's forward passes; weights, gradients and AdamW stay fp32, losses are taken
    in fp32 (FSDP2: its bf16 policy instead). --frozen-bf16 holds the frozen reference and reward
    model in bf16 (half their memory); the critic copies the reward model's weights in fp32 first.
Rank 0 logs per update the proxy reward (the reward model's sequence score of the rollouts) and, on
the built-in task, their gold reward, so reward hacking shows as a widening gap (proxy_vs_gold.png).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import ava
from avalib import (checkpoint, cli, data, distributed, evaluation, generation, gold, loop, lora, memory_plan,
                    metrics, ml_irl, models, reward_models, script, sources, viz)
from avalib.cli import arg

REWARDS = ("auto", "dense", "sequence")
IRL_REWARDS = ("bt", "ava-p", "adversarial-rkl", "adversarial-js")


@dataclass
class Args(cli.LoRAFlags, cli.TrainFlags):
    """train_ppo.py"""
    reward_model: str = arg("", "a reward model saved by train_rm.py (its OUTPUT_DIR/model)")
    reward: str = arg("auto", "dense: the reward at every token (Eq. 19, AVA's mu_t); sequence: the score at the last "
                              "token; auto: dense for AVA models, sequence otherwise", choices=REWARDS)
    pessimism: float = arg(0.0,
                           "k of the pessimistic reward mu - k * sigma (AVA models: sigma is the posterior's)", low=0)
    prompts: str = arg("builtin", "rollout prompts: builtin[:tiny] or a pairs / demonstrations file")
    prompt_split: str = arg("train", "split of --prompts")
    eval_prompts: str = arg("",
                            "held-out prompts to judge on (default: builtin when --prompts is builtin; 'none' skips)")
    eval_split: str = arg("test", "split of --eval-prompts")
    prompt_limit: int = arg(0, "use only the first N held-out prompts (0: all)", low=0)
    samples_per_prompt: int = arg(4, "replies per held-out prompt, by each side", low=1)
    opponent: str = arg("initial", "what the final policy is judged against: 'initial' or a policy directory")
    judge: str = arg("gold", "'gold' (the built-in task's judge) or a reward model directory")
    output_dir: str = arg("runs/ppo", "where the policy, metrics, plot and checkpoints go")
    lr: float = arg(1e-5, "AdamW learning rate of policy and value (linear decay to 0 over the updates)", above=0)
    updates: int = arg(40, "PPO updates (per ML-IRL iteration)", low=1)
    rollout_batch: int = arg(16, "prompts sampled per update, over all processes", low=1)
    minibatch: int = arg(8, "replies per gradient step inside an update, over all processes (each process runs its "
                            "share in --grad-accum micro-batches)", low=1)
    ppo_epochs: int = arg(1, "passes over each rollout batch", low=1)
    kl_coef: float = arg(0.05, "per-token KL penalty to the reference policy", low=0)
    gamma: float = arg(1.0, "GAE discount", low=0, high=1)
    gae_lambda: float = arg(0.95, "GAE lambda", low=0, high=1)
    cliprange: float = arg(0.2, "policy ratio clip", above=0)
    cliprange_value: float = arg(0.2, "value clip", above=0)
    vf_coef: float = arg(0.1, "weight of the value loss", low=0)
    whiten_advantages: bool = arg(True, "whiten advantages over the valid tokens of each rollout batch")
    missing_eos_penalty: float = arg(1.0, "subtracted from the last-token reward of a reply without EOS", low=0)
    value_from_reward: bool = arg(True, "initialise the value model from the reward model (backbone and head)")
    max_new_tokens: int = arg(48, "length cap of sampled replies", low=1)
    temperature: float = arg(1.0, "sampling temperature, applied the same way to every log-prob PPO computes", above=0)
    top_p: float = arg(1.0, "nucleus sampling at rollout (1: off, so the trained policy is the sampled one)",
                       above=0, high=1)
    eval_top_p: float = arg(0.95, "nucleus sampling of the held-out replies judged at the end, and of Best-of-N's "
                                  "candidates and plain samples", above=0, high=1)
    sample_seed: int = arg(1234, "seed of the held-out evaluation samples", low=0)
    best_of_n: int = arg(0,
                         "Best-of-N mode: no training; pick the best of N samples of --model by --reward-model", low=0)
    bon_against: str = arg("", "Best-of-N: also judge against the best of the same N under this reward model")
    iterations: int = arg(0,
                          "ML-IRL: alternate reward learning on (demonstration, policy sample) pairs with PPO, K times",
                         low=0)
    demos: str = arg("builtin", "ML-IRL: demonstrations (builtin: the task's best-of-4 replies)")
    irl_reward: str = arg("ava-p", "ML-IRL reward learning: a preference objective on (demo, sample) pairs, or a "
                                   "discriminator (adversarial-rkl: r = log D - log(1-D); adversarial-js: "
                                   "r = -log(1-D))", choices=IRL_REWARDS)
    adversarial_level: str = arg("token", "discriminator at every token (dense reward) or on the whole reply",
                                 choices=("token", "sequence"))
    reward_steps: int = arg(30, "ML-IRL: reward / discriminator steps per iteration", low=1)
    reward_lr: float = arg(1e-4, "ML-IRL: learning rate of reward learning", above=0)
    frozen_bf16: bool = arg(False, "hold the frozen reference policy and reward model in bf16 (half their memory; the "
                                   "policy and value model keep fp32 weights); a CUDA GPU with bf16, as --bf16")


# ---- the value model ----

class ValueModel(nn.Module):
    """V(y_{1:t}) per transition t, read at position t (the state before the action), (B, T-1)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.head = nn.Linear(lm.get_output_embeddings().in_features, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, attention_mask, response_mask) -> torch.Tensor:
        hidden = ava.hidden_states(self.lm, input_ids, attention_mask)
        return self.head(hidden[:, :-1]).float()[..., 0] * response_mask[:, 1:]


def value_model_from(reward_model, policy_lm, from_reward: bool) -> ValueModel:
    """The critic: the reward model's backbone and reward head (AVA: the mu row), or the policy's backbone with a zero
    head."""
    if not from_reward:
        return ValueModel(copy.deepcopy(policy_lm))
    value = ValueModel(copy.deepcopy(reward_model.lm))
    with torch.no_grad():
        value.head.weight.copy_(reward_model.reward_head.weight[:1])
        if getattr(reward_model.reward_head, "bias", None) is not None:
            value.head.bias.copy_(reward_model.reward_head.bias[:1])
    return value


# ---- PPO's arithmetic (all on the transition grid (B, T-1); mask = response transitions) ----

def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over each row's response transitions; the value after the
    last one is 0 (the episode ends). Returns (advantages, returns = advantages + values), zero off mask."""
    mask = mask.float()
    advantages = torch.zeros_like(rewards)
    following = torch.zeros_like(rewards[:, 0])  # A_{t+1}
    for t in reversed(range(rewards.shape[1])):
        valid_next = mask[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(following)
        next_value = values[:, t + 1] * valid_next if t + 1 < rewards.shape[1] else torch.zeros_like(following)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        following = (delta + gamma * lam * following * valid_next) * mask[:, t]
        advantages[:, t] = following
    return advantages, (advantages + values) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the valid entries (unbiased variance, as in the N+ details), zero elsewhere."""
    mean = ava.masked_mean(values, mask)
    variance = ((values - mean) ** 2 * mask).sum() / (mask.sum() - 1).clamp(min=1)
    return (values - mean) * torch.rsqrt(variance + 1e-8) * mask


def ppo_losses(logp, old_logp, advantages, values, old_values, returns, mask, cliprange: float, cliprange_value: float):
    """Clipped surrogate policy loss and clipped value loss (PPO, Schulman et al. 2017), masked means."""
    ratio = torch.exp(logp - old_logp)
    policy_loss = ava.masked_mean(torch.max(-advantages * ratio,
                                            -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)), mask)
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    value_loss = 0.5 * ava.masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)
    stats = {"policy/clipfrac": ava.masked_mean(((ratio - 1).abs() > cliprange).float(), mask),
             "policy/approxkl": 0.5 * ava.masked_mean((logp - old_logp) ** 2, mask),
             "value/clipfrac": ava.masked_mean(((values - old_values).abs() > cliprange_value).float(), mask)}
    return policy_loss, value_loss, stats


# ---- rewards ----

@torch.no_grad()
def score_rollouts(reward_model, batch: dict, dense: bool, pessimism: float, discriminator: str = ""):
    """(sequence score (B,), per-transition reward (B, T-1)): dense puts the model's reward at every
    response token, sequence puts the score at the last one. AVA: mu - k * sigma (Eq. 19). A
    discriminator's logit l becomes l (reverse KL, AIRL) or softplus(l) = -log(1 - D) (JS, GAIL)."""
    out = reward_model(**batch)
    mask = batch["response_mask"][:, 1:].bool()
    if isinstance(out, ava.TQROutput):
        per_token, _ = ava.dense_rewards(out, pessimism)
        score = out.sequence_reward() - pessimism * out.sequence_sigma()
    else:
        per_token, score = out.rewards, out.score
    if discriminator:
        transform = (lambda x: x) if discriminator == "adversarial-rkl" else F.softplus
        per_token, score = transform(per_token) * mask, transform(score)
    if not dense:
        per_token = torch.zeros_like(per_token).scatter(1, ava.last_index(mask)[:, None], score[:, None])
    return score, per_token * mask


def rollout_examples(generations: list, eos_id: int) -> list[dict]:
    """Prompt + reply (+ EOS if the policy emitted it) as training examples: the policy's own tokens,
    never re-tokenised text."""
    return [{"input_ids": g.prompt_ids + g.response_ids + ([eos_id] if g.finished else []),
             "prompt_length": len(g.prompt_ids)} for g in generations]


# ---- one PPO update ----

def ppo_update(policy, value, reference, reward_model, optimizer, scheduler, prompts: list[str], tokenizer,
               args: Args, seed: int, dense: bool, dist: distributed.Distributed, discriminator: str = "",
               dumped: list | None = None) -> dict:
    """Rollout on this rank's prompts, then `ppo_epochs` passes of minibatch updates, each minibatch in
    --grad-accum micro-batches weighted by their valid tokens (its gradient is the whole minibatch's),
    one clipped optimiser step per minibatch. Returns stats.
    --dump-grads: every minibatch's reduced gradients are appended to `dumped` and written out."""
    eos_id = tokenizer.eos_token_id
    generations = generation.generate_ids(distributed.unwrap(policy), tokenizer, prompts,
                                      max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      top_p=args.top_p,
                                      seed=seed, chat_template=False, progress=False,
                                      synced=distributed.is_sharded(args, dist))
    batch = {k: v.to(dist.device) for k, v in data.collate(rollout_examples(generations, eos_id),
                                                           tokenizer.pad_token_id).items()}
    mask = batch["response_mask"][:, 1:].bool()
    finished = torch.tensor([g.finished for g in generations], device=dist.device)
    # --bf16: scoring in bf16 autocast (not under FSDP2)
    with torch.no_grad(), distributed.autocast_context(args, dist):
        old_logp = policy(**batch)
        ref_logp = ava.token_logprobs(reference, **batch, temperature=args.temperature)
        old_values = value(**batch)
        score, model_rewards = score_rollouts(reward_model, batch, dense, args.pessimism, discriminator)
        kl = (old_logp - ref_logp) * mask
        rewards = model_rewards - args.kl_coef * kl
        last = ava.last_index(mask)[:, None]
        rewards = rewards.scatter_add(1, last, -(args.missing_eos_penalty * (~finished).float())[:, None])
        advantages, returns = gae(rewards, old_values, mask, args.gamma, args.gae_lambda)
        if args.whiten_advantages:
            advantages = whiten(advantages, mask)

    replies = [tokenizer.decode(g.response_ids, skip_special_tokens=True) for g in generations]
    stats = {"proxy/score": score.mean(), "proxy/reward_sum": (model_rewards.sum(1)).mean(), "kl/sum": kl.sum(1).mean(),
             "rollout/length": mask.sum(1).float().mean(), "rollout/eos_rate": finished.float().mean()}
    if sources.builtin_default(args.prompts, gold=False):
        stats["gold/score"] = torch.tensor(sum(map(gold.gold_score, replies)) / len(replies))
    totals: dict[str, float] = {}
    n, steps = len(prompts), 0
    local_minibatch = max(1, args.minibatch // dist.world_size)
    order_generator = torch.Generator().manual_seed(seed)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]

    def minibatch_loss(trained, rows: list[int]):
        """PPO's loss on some rows of the rollout batch (a micro-batch): means over their valid tokens."""
        part = {k: v[rows] for k, v in batch.items()}
        width = int(part["attention_mask"].sum(1).max())  # drop columns that are padding in every row
        part = {k: v[:, :width] for k, v in part.items()}
        cut = lambda x: x[rows][:, :width - 1]  # these rows' transitions (B', width - 1)
        logp, values = trained[0](**part), trained[1](**part)  # policy, value model
        policy_loss, value_loss, more = ppo_losses(logp, cut(old_logp), cut(advantages), values, cut(old_values),
                                                   cut(returns), cut(mask), args.cliprange, args.cliprange_value)
        return policy_loss + args.vf_coef * value_loss, {"loss/policy": policy_loss, "loss/value": value_loss, **more}

    valid_tokens = lambda rows: int(mask[rows].sum())  # a micro-batch's weight: PPO's losses are token means
    for _ in range(args.ppo_epochs):
        order = torch.randperm(n, generator=order_generator).tolist()
        for start in range(0, n, local_minibatch):
            rows = order[start:start + local_minibatch]
            optimizer.zero_grad(set_to_none=True)
            # --grad-accum micro-batches, gradients synchronised after the last; --bf16 autocast (FSDP2: its policy)
            loss, terms = loop.accumulate_gradients((policy, value), rows, minibatch_loss, args, dist,
                                                    scheduler.last_epoch + 1, len(rows) * dist.world_size,
                                                    weight=valid_tokens)
            if args.dump_grads:
                distributed.dump_gradients(args.dump_grads,
                                           nn.ModuleDict({"policy": distributed.unwrap(policy),
                                                          "value": distributed.unwrap(value)}),
                                      dumped, dist)
            values = {"loss": loss, "loss/policy": terms["loss/policy"], "loss/value": terms["loss/value"],
                      "gradient norm": loop.gradient_norm(trainable, args.max_grad_norm)}
            if not loop.check_finite(f"update {scheduler.last_epoch + 1}", values, args, dist,
                                     checkpoint_path=Path(args.output_dir) / "checkpoint.pt"):
                stats["train/skipped_nonfinite"] = stats.get("train/skipped_nonfinite", 0) + 1  # --skip-nonfinite
                continue
            optimizer.step()
            steps += 1
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + float(v)
    scheduler.step()
    stats.update({k: v / steps for k, v in totals.items()})
    stats = {k: float(v) for k, v in stats.items()}
    names = sorted(stats)
    reduced = distributed.all_reduce_sum([stats[k] for k in names], dist)
    return {k: v / dist.world_size for k, v in zip(names, reduced)}


# ---- a stage: one reward model, a value model, an optimiser (ML-IRL starts a new one per iteration) ----

def irl_preference_reward(args: Args, pairs: Path, output_dir: Path, iteration: int) -> dict:
    """ML-IRL's preference reward of one iteration: train_rm.py's --irl-reward objective on the
    (demonstration, policy sample) pairs, for --reward-steps steps at --reward-lr."""
    import train_rm

    return train_rm.train_reward_model(train_rm.Args(
        model=args.model, objective=args.irl_reward, data=str(pairs), output_dir=str(output_dir),
        max_steps=args.reward_steps, epochs=1000, batch_size=args.batch_size, lr=args.reward_lr,
        trainable_layers=args.trainable_layers, max_length=args.max_length, seed=args.seed + iteration, save_every=0))


def build_stage(args: Args, iteration: int, lm, policy, tokenizer, output_dir: Path,
                dist: distributed.Distributed) -> dict:
    discriminator = args.irl_reward if args.iterations and args.irl_reward.startswith("adversarial") else ""
    if args.iterations:
        train_preference_reward = functools.partial(irl_preference_reward, args)
        reward_model = ml_irl.learn_reward(args, iteration, lm, tokenizer, output_dir, dist, train_preference_reward)
    else:
        reward_model, reward_tokenizer, _ = reward_models.load_reward_model(args.reward_model, dist.device)
        if reward_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise SystemExit(f"--reward-model {args.reward_model}: its tokenizer differs from the policy's; PPO scores "
                             "the policy's own tokens, so both must share one vocabulary")
    reward_model.eval().requires_grad_(False)
    dense = (args.reward == "dense" or (args.reward == "auto" and isinstance(reward_model, ava.TQR))
             or (discriminator and args.adversarial_level == "token"))
    if dist.is_main:
        print(f"PPO optimises {reward_models.which_reward(reward_model, dense, args.pessimism, discriminator)}")
    value = value_model_from(reward_model, lm, args.value_from_reward and not discriminator).to(dist.device).eval()
    # after the critic took fp32 copies
    reward_model = models.freeze_for_scoring(reward_model, dist.device, args.frozen_bf16)
    models.freeze_layers(value.lm, None if args.trainable_layers < 0 else args.trainable_layers)
    lora.apply_lora(value.lm, args)  # --lora-r: the critic's backbone adapts like the policy's
    value.head.requires_grad_(True)  # its head trains in full
    # the policy was sharded once, in main (in place); the critic is new each stage
    if distributed.is_sharded(args, dist):
        wrapped_policy, wrapped_value = policy, distributed.distribute(value, args, dist)
    else:  # DDP wrappers (one process: the modules themselves)
        wrapped_policy, wrapped_value = distributed.distribute(policy, args,
                                                               dist), distributed.distribute(value, args, dist)
    trainable = [p for module in (policy, value) for p in module.parameters() if p.requires_grad]  # after sharding
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / args.updates))
    return {"iteration": iteration, "reward_model": reward_model, "discriminator": discriminator, "dense": bool(dense),
            "policy": wrapped_policy, "value": wrapped_value,
            "modules": nn.ModuleDict({"policy": policy, "value": value}),
            "optimizer": optimizer, "scheduler": scheduler}


# ---- the run ----

def main(argv=None) -> dict:
    args = cli.parse_config(Args, argv, __doc__)
    if args.activation_checkpointing:  # transformers checkpoints a decoder layer only in training mode
        raise SystemExit("--activation-checkpointing: not in train_ppo.py yet: its models run in eval mode (dropout "
                         "off), where transformers does not checkpoint a layer, so it would save nothing; use "
                         "--grad-accum (smaller micro-batches) instead")
    if args.plan:  # bytes per GPU of policy, value model, frozen reference and reward model; nothing loaded
        return memory_plan.print_plan(args, "ppo", "train_ppo.py")
    dist = script.begin(args)
    if args.best_of_n:
        if not args.reward_model:
            raise SystemExit("--best-of-n needs --reward-model")
        return evaluation.best_of_n(args)
    if not args.iterations and not args.reward_model:
        raise SystemExit("train_ppo.py needs --reward-model DIR (a model saved by train_rm.py), or --iterations K "
                         "for ML-IRL")
    if args.reward_model and not (Path(args.reward_model) / "reward_model.json").is_file():
        raise SystemExit(f"--reward-model {args.reward_model!r}: not a reward model saved by train_rm.py (no "
                         "reward_model.json)")
    if args.judge != "gold" and not (Path(args.judge) / "reward_model.json").is_file():
        raise SystemExit(f"--judge {args.judge!r}: neither 'gold' nor a reward model saved by train_rm.py")
    sharded = distributed.is_sharded(args, dist)
    if sharded and args.iterations:
        raise SystemExit("--fsdp with --iterations (ML-IRL) is not supported: its reward learning runs train_rm.py "
                         "inside each process; use DDP (drop --fsdp) or run train_rm.py and train_ppo.py in turn")
    if args.rollout_batch % dist.world_size or args.minibatch % dist.world_size:
        raise SystemExit(f"--rollout-batch and --minibatch must divide by the {dist.world_size} processes")
    output_dir = script.output_directory(args)
    checkpoint_path = output_dir / "checkpoint.pt"

    lm, tokenizer = models.load_model(args.model, device=dist.device)
    train_prompts = sources.load_prompts(args.prompts, args.prompt_split, tokenizer, args.skip_bad_rows, args.limit)
    eval_source = args.eval_prompts or sources.builtin_default(args.prompts, gold=False) or "none"
    eval_prompts = sources.load_prompts(eval_source, args.eval_split, tokenizer, args.skip_bad_rows, args.prompt_limit)
    if not train_prompts:
        raise SystemExit(f"--prompts {args.prompts!r}: no prompts")
    # the initial policy, frozen
    reference = models.freeze_for_scoring(copy.deepcopy(lm), dist.device, args.frozen_bf16)
    models.freeze_layers(lm, None if args.trainable_layers < 0 else args.trainable_layers)
    lora.apply_lora(lm, args)  # --lora-r: adapters only; merged into the exported policy
    # dropout off, always. Prompt sharing runs two passes per distinct prompt of a batch (ava.hidden_states): not
    # under FSDP2, whose every rank must run as many sharded forwards
    policy = models.Policy(lm, args.temperature, share_prompts=not sharded).eval()
    skeleton = None
    if sharded:  # FSDP2: each decoder layer, then the policy as root; rollouts sample through it
        skeleton = distributed.meta_skeleton(policy)
        distributed.distribute(policy, args, dist)

    iterations = max(args.iterations, 1)
    total_updates = iterations * args.updates
    update, state = 0, None
    if args.resume:
        state = checkpoint.load(checkpoint_path)  # checked already (script.output_directory), as are its flags
        update = state["update"]
        if not sharded:  # (sharded: one stage only, whose shards load with it below)
            policy_weights = {k[len("policy."):]: v for k, v in state["model"].items() if k.startswith("policy.")}
            policy.load_state_dict(policy_weights, strict=False)  # the rest of the state loads with its stage below
    log = metrics.MetricsLog(output_dir / "metrics.jsonl", dist.is_main, resume_step=update if args.resume else None,
                             report_to=args.report_to, config=dataclasses.asdict(args))
    loop.record_resume(log, args, update)  # --resume-override over changed flags: said in metrics.jsonl
    bar = tqdm(total=total_updates, initial=update, desc="PPO", disable=not dist.is_main)
    started, stage, dumped = time.perf_counter(), None, []
    while update < total_updates:
        iteration = update // args.updates
        if stage is None or stage["iteration"] != iteration:  # a new reward (ML-IRL), value model and optimiser
            stage = build_stage(args, iteration, lm, policy, tokenizer, output_dir, dist)
            if state is not None and update % args.updates:  # resumed mid-stage: its value, optimiser and RNG too
                checkpoint.resume(checkpoint_path, stage["modules"], stage["optimizer"], stage["scheduler"], sharded)
            state = None
        # the update's prompts: a seeded draw, so a resumed run sees what the uninterrupted one saw
        generator = torch.Generator().manual_seed(args.seed * 100_003 + update)
        chosen = [train_prompts[i] for i in torch.randint(len(train_prompts), (args.rollout_batch,),
                                                          generator=generator).tolist()]
        stats = ppo_update(stage["policy"], stage["value"], reference, stage["reward_model"], stage["optimizer"],
                           stage["scheduler"], distributed.shard(chosen, dist), tokenizer, args,
                           seed=args.seed * 1_000_003 + update * 101 + dist.rank, dense=stage["dense"], dist=dist,
                           discriminator=stage["discriminator"], dumped=dumped)
        update += 1
        bar.update(1)
        bar.set_postfix({k: f"{stats[k]:.3f}" for k in ("proxy/score", "gold/score", "kl/sum") if k in stats})
        if update % args.log_every == 0:
            log.write({"step": update, "iteration": iteration, "lr": stage["scheduler"].get_last_lr()[0], **stats})
        if (args.save_every and update % args.save_every == 0) or update % args.updates == 0:
            checkpoint.save(checkpoint_path, stage["modules"], stage["optimizer"], stage["scheduler"],
                            {"step": update, "update": update, "iteration": iteration,
                             "args": dataclasses.asdict(args)}, dist, sharded)
        if args.crash_at_step and update == args.crash_at_step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()

    final = {"updates": update, "iterations": iterations, "train_seconds": time.perf_counter() - started,
             "reward_model": args.reward_model, "reward": args.reward, "pessimism": args.pessimism}
    if sharded:  # the full weights, gathered on every rank: export and evaluation as in one process
        stage = None
        lm = distributed.gather_full_model(policy, skeleton, dist).lm
    if dist.is_main:
        lora.merge_lora(lm, output_dir / "policy" / "lora")  # --lora-r: adapter saved, then merged for export
        models.save_policy(output_dir / "policy", lm, tokenizer, {"args": dataclasses.asdict(args)})
        if eval_prompts:
            final["win_rate"] = evaluation.judge_policy(
                lm, tokenizer, eval_prompts, opponent=args.model if args.opponent == "initial" else args.opponent,
                judge=args.judge, samples_per_prompt=args.samples_per_prompt, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_p=args.eval_top_p, seed=args.sample_seed,
                name="PPO policy", samples_path=output_dir / "samples.jsonl")
        viz.plot_proxy_vs_gold(output_dir / "metrics.jsonl", output_dir / "proxy_vs_gold.png")
        metrics.write_final(final, output_dir, log, update)
    distributed.end_distributed(dist)
    return final


if __name__ == "__main__":
    script.run_script(main)
