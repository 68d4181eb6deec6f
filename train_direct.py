"""Direct optimisation of the policy with AVA-p / AVA-d, against DPO, SFT and AfD; judged by win rate.

  python train_direct.py --objective ava-p                       # AVA-p on the built-in task's pairs
  python train_direct.py --objective dpo                         # DPO (frozen reference, log-probs precomputed)
  python train_direct.py --objective sft --chosen-half           # SFT on the chosen half of the pairs
  python train_direct.py --objective ava-d                       # AVA-d on demonstrations (builtin: best of 4)
  python train_direct.py --objective dpo --afd                   # AfD w/ DPO: (demonstration, initial sample) pairs
  torchrun --nproc_per_node 2 train_direct.py --objective ava-p --data ../shared/data/hh-rlhf-harmless/train.jsonl.gz
  python train_direct.py --eval-only --load runs/direct/policy --opponent runs/sft/policy --judge gold

Algorithm 1 with the policy initialised from the pretrained LLM: for ava-p / ava-d the LLM *is* the
TQR's backbone, its LM head mapped to Q by Eq. 12, so the likelihood, TD and CER terms train the
policy and the reward head together. The trained policy samples from the LM's own distribution
pi_w (Eq. 12 maps pi_w to Q for the objective; it is not a different policy).

Evaluation (rank 0): the implicit-reward accuracy on held-out pairs (DPO: beta * log pi/pi_ref;
AVA: E[R|y] of the reward head), then win / tie / lose of the trained policy's samples against an
opponent's (the initial model, or another saved policy) on held-out prompts, under the built-in
task's gold judge or a reward model saved by train_rm.py. Opponent samples are cached on disk.

Output: OUTPUT_DIR/policy (save_pretrained; AVA also writes its heads, so it loads as a reward model
too), OUTPUT_DIR/metrics.jsonl, OUTPUT_DIR/samples.jsonl (every judged pair), OUTPUT_DIR/final.json,
OUTPUT_DIR/checkpoint.pt (for --resume).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

import ava
from avalib import cli, data, distributed, evaluation, loop, lora, metrics, models, reward_models, script, sources
from avalib.cli import arg

OBJECTIVES = ("ava-p", "ava-d", "dpo", "sft")
PAIRWISE = ("ava-p", "dpo")  # trained on preference pairs (or AfD pairs); the others on demonstrations


@dataclass
class Args(cli.AVAFlags, cli.LoRAFlags, cli.TrainFlags):
    """train_direct.py"""
    objective: str = arg("ava-p", "training objective", choices=OBJECTIVES)
    afd: bool = arg(False, "AfD: build (demonstration, sample of the initial policy) pairs from demonstrations "
                           "(for dpo and ava-p)")
    chosen_half: bool = arg(False, "demonstrations (sft, ava-d, AfD) are the chosen responses of --data's pairs")
    data: str = arg("builtin", "training data: builtin[:tiny], a local file, or a hub dataset id")
    train_split: str = arg("train", "split of --data (builtin and hub datasets)")
    eval_data: str = arg("", "held-out pairs for the implicit-reward accuracy (default: builtin:gold dev when --data "
                             "is builtin)")
    eval_split: str = arg("dev", "split of --eval-data")
    eval_prompts: str = arg("", "held-out prompts to sample and judge: builtin[:tiny] or a pairs/demonstrations file "
                                "(default: builtin when --data is builtin; 'none' skips the win rate)")
    prompt_split: str = arg("test", "split of --eval-prompts")
    prompt_limit: int = arg(0, "use only the first N held-out prompts (0: all)", low=0)
    samples_per_prompt: int = arg(4, "replies sampled per held-out prompt, by each side", low=1)
    opponent: str = arg("initial", "what the trained policy is judged against: 'initial' (the untrained --model) "
                                   "or a policy directory (OUTPUT_DIR/policy of another run, or any model path)")
    judge: str = arg("gold", "'gold' (the built-in task's gold judge) or a reward model directory saved by train_rm.py")
    max_new_tokens: int = arg(48, "length cap of sampled replies", low=1)
    temperature: float = arg(1.0, "sampling temperature (0: greedy)", low=0)
    top_p: float = arg(0.95, "nucleus sampling", above=0, high=1)
    sample_seed: int = arg(1234, "seed of evaluation sampling (the same for both sides)", low=0)
    dpo_beta: float = arg(0.1, "DPO's beta (KL strength to the reference)", above=0)
    output_dir: str = arg("runs/direct", "where the policy, metrics, samples and checkpoints go")
    lr: float = arg(2e-5, "AdamW learning rate (linear decay to 0)", above=0)
    eval_only: bool = arg(False, "only judge --load against --opponent on --eval-prompts")
    load: str = arg("", "a saved policy directory (for --eval-only)")
    afd_max_new_tokens: int = arg(48, "AfD: length cap of the initial policy's samples", low=1)


# ---- data ----

def load_training_rows(args: Args, tokenizer):
    """Pairs for ava-p / dpo; demonstrations for sft / ava-d and for AfD (to be paired with samples)."""
    wants_demos = args.objective not in PAIRWISE or args.afd
    if wants_demos and args.chosen_half:
        pairs, report = sources.load_rows(args.data, "pairs", args.train_split, tokenizer, args.skip_bad_rows,
                                          args.limit or None)
        return [{"prompt": p["prompt"], "response": p["chosen"], "where": p["where"]} for p in pairs], report
    return sources.load_rows(args.data, "demos" if wants_demos else "pairs", args.train_split, tokenizer,
                            args.skip_bad_rows, args.limit or None)


def load_prompts(args: Args, tokenizer) -> list[str]:
    """Held-out prompts as the exact text training saw (builtin: chat-templated; HH: raw dialogue)."""
    source = args.eval_prompts or sources.builtin_default(args.data, gold=False) or "none"
    return sources.load_prompts(source, args.prompt_split, tokenizer, args.skip_bad_rows, args.prompt_limit)


# ---- losses ----

def sequence_logprobs(model, items: list[tuple], pad_id: int) -> torch.Tensor:
    """sum_t log pi(y_{t+1} | y_{1:t}) over the response, (rows,), for every sequence of `items`,
    chosen ones first (one forward for the whole batch)."""
    columns = len(items[0])
    batch = data.collate([item[c] for c in range(columns) for item in items], pad_id, device=models.device_of(model))
    return model(**batch).sum(dim=1)


@torch.no_grad()
def reference_logprobs(lm, items: list[tuple], pad_id: int, batch_size: int) -> torch.Tensor:
    """DPO's frozen reference: the initial policy's sequence log-probs, (items, 2), computed once before
    training (the reference never changes, so it need not stay in memory as a second model).
    Items are batched longest first, so each batch pads little; the rows come back in `items` order."""
    if not items:
        return torch.zeros(0, 2)
    policy, columns = models.Policy(lm).eval(), len(items[0])
    order = sorted(range(len(items)), key=lambda i: -max(len(example["input_ids"]) for example in items[i]))
    values = []
    for start in range(0, len(order), batch_size):
        part = [items[i] for i in order[start:start + batch_size]]
        values.append(sequence_logprobs(policy, part, pad_id).view(columns, len(part)).T)
    return torch.cat(values)[torch.tensor(order).argsort()]


def compute_loss(model, items, references, args: Args, config: ava.AVAConfig, pad_id: int):
    kind, n, device = args.objective, len(items), models.device_of(model)
    if kind == "sft":
        batch = data.collate([item[0] for item in items], pad_id, device=device)
        loss = ava.sft_loss(model(**batch), batch["response_mask"][:, 1:].bool())
        return loss, {"loss": loss}
    if kind == "dpo":
        logp = sequence_logprobs(model, items, pad_id)
        loss, reward_chosen, reward_rejected = ava.dpo_loss(logp[:n], logp[n:], references[:, 0], references[:, 1],
                                                            beta=args.dpo_beta)
        return loss, {"loss": loss, **ava.preference_metrics(reward_chosen, reward_rejected)}
    if kind == "ava-d":
        return ava.ava_d_loss(model(**data.collate([item[0] for item in items], pad_id, device=device)), config)
    out = model(**data.collate([item[0] for item in items] + [item[1] for item in items], pad_id, device=device))
    return ava.ava_p_loss(ava.take_rows(out, slice(0, n)), ava.take_rows(out, slice(n, 2 * n)), config)


# ---- evaluation ----

@torch.no_grad()
def implicit_reward_accuracy(model, kind: str, items: list[tuple], references, args: Args, pad_id: int) -> dict:
    """How often the trained model's own reward ranks the chosen reply of a held-out pair first.
    DPO: beta * (log pi - log pi_ref); AVA: E[R|y] (mu at the last token). Exact ties counted apart."""
    was_training = model.training
    model.eval()
    differences = []
    for start in range(0, len(items), args.eval_batch_size):
        part = items[start:start + args.eval_batch_size]
        n = len(part)
        if kind == "dpo":
            logp = sequence_logprobs(model, part, pad_id)
            reference = references[start:start + n]
            differences.append(args.dpo_beta * ((logp[:n] - reference[:, 0]) - (logp[n:] - reference[:, 1])))
        else:
            out = model(**data.collate([p[0] for p in part] + [p[1] for p in part], pad_id,
                                       device=models.device_of(model)))
            score = out.sequence_reward()
            differences.append(score[:n] - score[n:])
    model.train(was_training)
    difference = torch.cat(differences)
    return evaluation.pairwise_accuracy(difference.tolist())


def win_rate(policy_lm, tokenizer, policy_name: str, prompts: list[str], args: Args, output_dir: Path | None) -> dict:
    """The trained policy against --opponent under --judge (evaluation.judge_policy)."""
    return evaluation.judge_policy(
        policy_lm, tokenizer, prompts, opponent=args.model if args.opponent == "initial" else args.opponent,
        judge=args.judge, samples_per_prompt=args.samples_per_prompt, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, seed=args.sample_seed, name=policy_name,
        samples_path=None if output_dir is None else output_dir / "samples.jsonl")


def eval_only(args: Args) -> dict:
    if not args.load:
        raise SystemExit("--eval-only needs --load DIR (a policy saved by train_direct.py, or any model path)")
    lm, tokenizer = models.load_model(args.load)
    prompts = load_prompts(args, tokenizer)
    if not prompts:
        raise SystemExit("--eval-only needs --eval-prompts (builtin or a file of prompts)")
    result = {"win_rate": win_rate(lm, tokenizer, args.load, prompts, args, None)}
    print(json.dumps(result))
    return result


# ---- the run ----

def main(argv=None) -> dict:
    args, dist = script.start(Args, argv, __doc__, "train_direct.py")
    if dist is None:  # --plan: bytes per GPU for these flags, from a model on the meta device
        return args.plan_printed
    if args.eval_only:
        return eval_only(args)
    kind = args.objective
    if args.afd and kind not in PAIRWISE:
        raise SystemExit(f"--afd builds preference pairs: use it with {' or '.join(PAIRWISE)}, not {kind}")
    # (the resolved config: the flag is None unless given)
    if kind in ("ava-p", "ava-d") and not args.ava_config().pretrained_q:
        raise SystemExit("direct optimisation trains the LM through Eq. 12's pretrained Q (a fresh Q head would "
                         "leave the policy's own head out of the likelihood): drop --no-pretrained-q, or use "
                         "train_rm.py")
    if kind not in ("ava-p", "ava-d") and args.ablate:
        raise SystemExit("--ablate applies to ava-p and ava-d only")
    if args.judge != "gold" and not (Path(args.judge) / "reward_model.json").is_file():
        raise SystemExit(f"--judge {args.judge!r}: neither 'gold' nor a reward model saved by train_rm.py")
    output_dir = script.output_directory(args)

    tokenizer = models.load_tokenizer(args.model)
    config = args.ava_config()
    pad_id = tokenizer.pad_token_id
    rows, report = load_training_rows(args, tokenizer)  # bad data fails before the model loads
    eval_items, eval_report = sources.load_eval_pairs(args, tokenizer)
    prompts = load_prompts(args, tokenizer)
    # FSDP2: rank 0 reads the weights, the others build on meta
    lean = distributed.lean_loading(args, dist.world_size, kind)
    lm, _ = models.load_model(args.model, tokenizer=tokenizer, on_meta=lean and not dist.is_main,
                              device=None if lean else dist.device)  # lean: fully_shard puts the shards on the device
    if args.afd:
        rows = sources.afd_pairs(rows, args.model, max_new_tokens=args.afd_max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed, model=lm, tokenizer=tokenizer, dist=dist)
    items = data.encode_rows(rows, tokenizer, args.max_length, report)
    if dist.is_main:
        print(report)
        if eval_report:
            print(eval_report)

    references = eval_references = None
    if kind == "dpo":  # before any update: the reference is the initial policy (cached for --resume)
        path = output_dir / "reference_logprobs.pt"
        if args.resume and path.is_file():
            references, eval_references = torch.load(path).values()
        else:
            references = reference_logprobs(lm, items, pad_id, args.eval_batch_size)
            eval_references = reference_logprobs(lm, eval_items, pad_id, args.eval_batch_size)
            if dist.is_main:
                torch.save({"train": references.cpu(), "eval": eval_references.cpu()}, path)
        references, eval_references = references.to(dist.device), eval_references.to(dist.device)
    models.freeze_layers(lm, None if args.trainable_layers < 0 else args.trainable_layers)
    lora.apply_lora(lm, args)  # --lora-r: adapters only (the heads below are built after, and train in full)
    share = distributed.share_prompts(args)  # off under --activation-checkpointing
    if kind in ("ava-p", "ava-d"):
        model = ava.TQR(lm, config, share_prompts=share)
    else:
        model = models.Policy(lm, share_prompts=share)
    model = model if lean else model.to(dist.device)

    def loss_fn(model, local):
        refs = references[local] if references is not None else None
        return compute_loss(model, [items[i] for i in local], refs, args, config, pad_id)

    lengths = [sum(len(example["input_ids"]) for example in item) for item in items]
    model, run = loop.train_loop(args, model, lengths, loss_fn, dist, output_dir, metric_name=metrics.metric_name,
                                   desc=f"{'AfD w/ ' if args.afd else ''}{kind}")
    final = {"objective": kind, "afd": args.afd, "steps": run["steps"], "train_rows": len(items),
             "train_rows_cut": report.cut, "train_rows_skipped": sum(report.skipped.values()),
             "train_tokens_per_second": (run["tokens"] / run["seconds"] if run["seconds"] > 0 and run["tokens"]
                                         else None),
             "train_seconds": run["seconds"]}
    if dist.is_main:
        if eval_items and kind != "sft":
            final.update(implicit_reward_accuracy(model, kind, eval_items, eval_references, args, pad_id))
        lora.merge_lora(model.lm, output_dir / "policy" / "lora")  # --lora-r: adapter saved, then merged for export
        meta = {"objective": kind, "afd": args.afd,
                "ava_config": dataclasses.asdict(config) if kind.startswith("ava") else None,
                "args": dataclasses.asdict(args)}
        if isinstance(model, ava.TQR):  # the policy and its reward: loadable by load_model and load_reward_model
            reward_models.save_reward_model(output_dir / "policy", model, tokenizer, {"kind": kind, **meta})
            (output_dir / "policy" / "policy.json").write_text(json.dumps(meta, indent=2, default=str))
        else:
            models.save_policy(output_dir / "policy", model.lm, tokenizer, meta)
        if prompts:
            final["win_rate"] = win_rate(model.lm, tokenizer, str(output_dir / "policy"), prompts, args, output_dir)
        metrics.write_final(final, output_dir, run["metrics"], run["steps"])
    distributed.end_distributed(dist)
    return final


if __name__ == "__main__":
    script.run_script(main)
