"""The memory plan (--plan): bytes per GPU, worked out from a model built on the meta device (no weights)."""
from __future__ import annotations

import inspect
from pathlib import Path

import torch

import ava
from avalib import distributed, generation, lora, models, reward_models


LLAMA_2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)  # meta-llama/Llama-2-7b-hf's config.json


def activation_bytes_per_token_layer(config, precision: str = "fp32") -> int:
    """What autograd keeps per token for one Llama-style decoder layer (HF's LlamaDecoderLayer, SDPA
    attention without the T x T matrix, as flash / memory-efficient kernels on a GPU), h = hidden,
    kv = key/value width, i = intermediate, a = heads. Counted tensor by tensor with
    saved_tensors_hooks; tests/test_scale.py checks each line exactly on CPU:
      "fp32":     4 * (8h + 2kv + 4i + a + 2)  each RMSNorm keeps its input, normalised input and output;
                                               attention q, k, v and its output; SwiGLU gate, up, silu, product
      "bf16":     20h + 4kv + 8i + 4a + 8      bf16 weights (FSDP2's bf16 policy): RMSNorm upcasts its input to fp32
      "autocast": 30h + 4kv + 8i + 4a + 8      fp32 weights under bf16 autocast (DDP, one GPU): fp32 residual stream
                                               and norms, each linear keeps its own bf16 copy of its input
                                               (plus every weight's bf16 copy, counted apart by `memory_plan`)
    """
    h, i, a = config.hidden_size, config.intermediate_size, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", a) * (getattr(config, "head_dim", None) or h // a)
    if precision == "fp32":
        return 4 * (8 * h + 2 * kv + 4 * i + a + 2)
    return {"bf16": 20, "autocast": 30}[precision] * h + 4 * kv + 8 * i + 4 * a + 8


def _plan_model(config, objective: str, args):
    """The model `objective` trains, on the meta device, frozen / LoRA'd as the flags say. PPO trains two:
    "ppo-policy" (the LM itself) and "ppo-value" (train_ppo.ValueModel: an LM backbone and a scalar head)."""
    import ava
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        models.freeze_layers(lm, None if args.trainable_layers < 0 else args.trainable_layers)
        lora_params = lora.apply_lora(lm, args)
        if objective in ("ava-p", "ava-d"):
            model = ava.TQR(lm, args.ava_config() if hasattr(args, "ava_config") else ava.AVAConfig())
        elif objective in ava.ScalarRewardModel.KINDS:
            model = reward_models.build_reward_model(lm, objective)
        elif objective == "ppo-value":  # ValueModel's parameters: .lm and .head (trained in full)
            model = torch.nn.ModuleDict({"lm": lm, "head": torch.nn.Linear(config.hidden_size, 1)})
        else:  # dpo, sft, ppo-policy: the LM itself (DPO's reference log-probs are computed once before training)
            model = lm
    return model, lm, lora_params


def plan_config(name: str):
    """'llama-2-7b' (built in, no download), or a model directory / config.json (no weights read)."""
    from transformers import AutoConfig, LlamaConfig

    if name.lower() in ("llama-2-7b", "llama2-7b", "meta-llama/llama-2-7b-hf"):
        return LlamaConfig(**LLAMA_2_7B)
    path = Path(name)
    return AutoConfig.from_pretrained(str(path.parent if path.name == "config.json" else path))


# generation.generate_ids's batch: how many rollouts one process samples at once (its KV cache)
GENERATION_BATCH = inspect.signature(generation.generate_ids).parameters["batch_size"].default


def _trained_model_bytes(model, lm, objective: str, args, world: int, fsdp: bool, precision: str) -> dict:
    """One trained model's share of `memory_plan` (PPO sums two): its parameters, gradients and AdamW state
    on this GPU, its FSDP2 buffers, its bf16 weight copies under autocast, and its activations per token."""
    import math

    config = lm.config
    compute = 2 if precision == "bf16" else 4  # bytes of the hidden states between layers (and of gathered weights)
    layers = models.decoder_layers(lm)
    layer_ids = {id(p) for p in layers.parameters()}

    def local(p):  # elements this GPU holds
        return math.ceil(p.shape[0] / world) * (p.numel() // p.shape[0]) if fsdp and p.dim() > 0 else p.numel()

    params = list(model.parameters())  # each tensor once (tied weights too)
    # the value model never calls its LM head (an untied one): no gradient, no AdamW state
    unused = ({id(lm.get_output_embeddings().weight)} - {id(lm.get_input_embeddings().weight)}
              if objective == "ppo-value" else set())
    trained_params = [p for p in params if p.requires_grad and id(p) not in unused]
    n_trainable = sum(p.numel() for p in trained_params)
    local_trainable = sum(local(p) for p in trained_params)
    parts = {"parameters": 4 * sum(local(p) for p in params), "gradients": 4 * local_trainable,
             "optimizer": 8 * local_trainable}
    # FSDP2: the root (embeddings, LM head, final norm, our heads) stays gathered through forward and backward;
    # two layers gathered at once (prefetch) and one layer's unsharded fp32 grads
    root = sum(p.numel() for p in params if id(p) not in layer_ids)
    layer = max(sum(p.numel() for p in block.parameters()) for block in layers)
    layer_trainable = max(sum(p.numel() for p in block.parameters() if p.requires_grad) for block in layers)
    trained = [j for j, block in enumerate(layers) if any(p.requires_grad for p in block.parameters())]
    # below the lowest trained layer autograd keeps nothing
    crossed_layers = len(layers) - min(trained) if trained else 0
    head_params = sum(p.numel() for name, p in model.named_parameters()
                      if model is not lm and not name.startswith("lm."))
    sequence_head = objective in ("bt", "bt-var", "pref-trans", "ppo-value")  # no LM head, no vocabulary
    copies = {"off": 0, "on": 0, "largest": 0}
    if args.bf16 and not fsdp:  # autocast: every matmul saves its bf16 weight copy for the backward pass, from
        matrices = lambda module: sum(p.numel() for p in module.parameters() if p.dim() == 2)  # not the norms'
        crossed = sum(matrices(block) for block in list(layers)[min(trained):]) if trained else 0
        # the lowest trained layer up, the LM head and our heads
        crossed += (0 if sequence_head else lm.get_output_embeddings().weight.numel()) + head_params
        copies = {"off": 2 * crossed, "on": 2 * n_trainable,  # checkpointing: the cached trainable copies ...
                  "largest": 2 * max(matrices(block) for block in layers)}  # ... and the recomputed layer's
    h, length = config.hidden_size, args.max_length
    per_layer = activation_bytes_per_token_layer(config, precision)
    norm = 8 * h if compute == 2 else 12 * h
    heads = {"ava-p": 3 * compute * h + 12 * length, "ava-d": 3 * compute * h + 12 * length,  # Eq. 11 q, k (B T T fp32)
             "pref-trans": 2 * compute * h + 12 * length, "dpo": compute * h, "sft": compute * h,
             "ppo-policy": compute * h}.get(objective, 0)
    # the resolved config (flags default to None)
    chunk = args.ava_config().vocab_chunk if hasattr(args, "ava_config") else 512
    return {"parts": parts, "params": sum(p.numel() for p in params), "trainable": n_trainable,
            "head_params": head_params, "fsdp_root": compute * root,
            "fsdp_layers": compute * 2 * layer + 4 * layer_trainable, "copies": copies,
            "per_token": {"off": crossed_layers * per_layer + norm + heads,
                          "on": crossed_layers * compute * h + norm + heads},  # checkpointing keeps layer inputs
            # one layer's activations: the backward's working set (the recomputed layer)
            "working": per_layer if crossed_layers else 0,
            # one chunk's transient (chunk, V) tensors (ava.gather_token_terms)
            "vocab": 0 if sequence_head else 6 * 4 * chunk * config.vocab_size}


def memory_plan(args, objective: str, script: str = "", frozen_models: int = 0) -> dict:
    """Bytes per GPU for training `objective` with this run's flags on args.plan_world_size GPUs:
    parameters (fp32 master weights), gradients and AdamW state (fp32, trainable only), FSDP2's
    transient all-gather / reduce-scatter buffers, activations (with and without checkpointing),
    and the full-vocabulary chunks. FSDP2 splits every parameter along dim 0 over the GPUs (padded,
    as fully_shard does); DDP and one GPU keep everything whole. Tokens per GPU: ceil(batch_size /
    world / grad_accum) pairs (or demonstrations: one micro-batch) x sequences per item x max_length, i.e. every
    sequence padded to --max-length (an upper bound). Under FSDP2 every micro-batch's backward reduce-scatters
    (distributed.gradient_sync), so --grad-accum adds no gradient memory.

    Activations, bytes per token (L' = decoder layers from the lowest trained one up: autograd keeps
    nothing below it; A = `activation_bytes_per_token_layer`; c = bytes of a hidden state):
      checkpointing off:  L' * A + final norm + heads + A
      checkpointing on:   L' * c * hidden + final norm + heads + A   (each layer keeps its input only)
    where the last A is one layer's worth: the recomputed layer, or the backward's working set. Heads:
    AVA and Pref-Trans keep Eq. 11's query and key (2 c h) and fp32 T x T scores (12 T); AVA, DPO,
    SFT and PPO's policy keep the gathered hidden states of the trained transitions (c h). The
    full-vocabulary chunks add 6 x vocab_chunk x V x 4 bytes, transient, and the activations what the
    backward keeps of them, min(8 x tokens x V, ava.KEPT_VOCAB_BYTES) (beyond that bound they are
    recomputed). Under bf16 autocast (DDP, one GPU) every matmul also keeps a bf16 copy of its weight:
    2 bytes per weight the backward crosses (checkpointing on: the cached trainable ones plus one layer's).

    PPO (objective "ppo", train_ppo.py) trains two models, each counted as above and summed: the policy
    (the LM; its heads as SFT's) and the value model (the LM's backbone and a scalar head: no vocabulary; an
    untied LM head it holds but never calls gets no gradient and no AdamW state); LoRA and
    --trainable-layers apply to both, as build_stage does. Both graphs are alive at the backward, so their
    activations, autocast copies and FSDP2 roots add up; one layer is worked on (or gathered) at a time.
    Tokens: one micro-batch, ceil(minibatch / world / grad_accum) replies of --max-length prompt tokens (an
    assumed bound: PPO does not cut prompts) + --max-new-tokens. The frozen reference policy and reward model
    are 2 frozen models (below; the reward model assumed of the policy's architecture). Sampling keeps a KV
    cache ("kv_cache"): 2 x layers x kv x (prompt + new tokens) x c' bytes per reply, min(GENERATION_BATCH,
    rollout_batch / world) replies at once, c' = 2 under FSDP2's bf16 policy, else 4 (sampling runs outside
    autocast); it is freed before the update, so the total is the static bytes plus the larger of the two
    phases (the rollouts' scoring passes run without gradients, one layer's transient at a time: not counted).
    No checkpointing row: train_ppo.py refuses --activation-checkpointing (its models run in eval mode, where
    transformers does not checkpoint).

    Frozen models (`frozen_models` full copies of the LM on every GPU, never sharded: PPO's reference
    policy and reward model are 2): 4 bytes per LM parameter each, 2 with args.frozen_bf16
    (bytes["frozen_models"], present when there are any; their heads, < 0.3% at 7B, are not counted).
    Host memory per rank while loading ("host_bytes_per_rank"): the full fp32 model on every rank
    (4 bytes per parameter), except under FSDP2's lean loading (distributed.lean_loading), where rank
    0 alone reads the weights and the other ranks hold only the heads they build (the LM on the meta device).
    PPO loads on every rank, one model at a time: 4 bytes per LM parameter."""
    import math

    config = plan_config(args.plan)
    ppo = objective == "ppo"
    built = [_plan_model(config, kind, args) for kind in (("ppo-policy", "ppo-value") if ppo else (objective,))]
    lm, lora_params = built[0][1], sum(lora_params for _, _, lora_params in built)
    world = max(1, args.plan_world_size)
    fsdp = bool(args.fsdp) and world > 1
    precision = ("bf16" if fsdp else "autocast") if args.bf16 else "fp32"
    compute = 2 if precision == "bf16" else 4
    shares = [_trained_model_bytes(model, model_lm, kind, args, world, fsdp, precision)
              for (model, model_lm, _), kind in zip(built, ("ppo-policy", "ppo-value") if ppo else (objective,))]
    total_of = lambda key: sum(share[key] for share in shares)
    gib = 2**30
    parts = {name: sum(share["parts"][name] for share in shares) for name in ("parameters", "gradients", "optimizer")}
    if fsdp:
        parts["fsdp_buffers"] = total_of("fsdp_root") + max(share["fsdp_layers"] for share in shares)
    # one micro-batch (--grad-accum; accumulate_gradients runs at most one item a micro-batch)
    batch_size = args.minibatch if ppo else args.batch_size
    accumulation = max(1, getattr(args, "grad_accum", 1))
    micro_batches = max(1, min(accumulation, batch_size // world))
    autocast = {"off": sum(share["copies"]["off"] for share in shares),
                "on": sum(share["copies"]["on"] for share in shares)
                + max(share["copies"]["largest"] for share in shares)}
    pairwise = objective in ("ava-p", "dpo", "bt", "bt-var", "pref-trans") or getattr(args, "afd", False)
    sequences = 2 if pairwise else 1
    items = math.ceil(batch_size / world / accumulation)
    length = args.max_length + args.max_new_tokens if ppo else args.max_length
    tokens = items * sequences * length
    per_token = {ac: sum(share["per_token"][ac] for share in shares) for ac in ("off", "on")}
    working = max(share["working"] for share in shares)
    vocab = max(share["vocab"] for share in shares)
    # with the activations, what the backward keeps of every chunk (ava.gather_token_terms: 8 N V bytes for the
    # micro-batch's N <= tokens transitions, never above KEPT_VOCAB_BYTES)
    kept = lambda n_tokens: sum(bool(share["vocab"]) * min(8 * n_tokens * config.vocab_size, ava.KEPT_VOCAB_BYTES)
                                for share in shares)
    overhead = 2 * gib  # CUDA context, NCCL buffers, allocator slack: assumed, not measured
    frozen_models = 2 if ppo else frozen_models  # PPO: the reference policy and the reward model
    lm_params = sum(p.numel() for name, p in lm.named_parameters() if "lora_" not in name)
    if frozen_models:
        parts["frozen_models"] = frozen_models * lm_params * (2 if getattr(args, "frozen_bf16", False) else 4)
    lean = distributed.lean_loading(args, world, objective) and not ppo
    host_model = 4 * lm_params if ppo else 4 * total_of("params")
    host = {"rank_0": host_model, "other_ranks": 4 * total_of("head_params") if lean else host_model}
    static = sum(parts.values()) + vocab + overhead
    result = {"script": script, "objective": objective, "model": args.plan, "world_size": world,
              "sharding": "FSDP2" if fsdp else ("DDP" if world > 1 else "none"), "bf16": bool(args.bf16),
              "trainable_layers": args.trainable_layers, "lora_r": getattr(args, "lora_r", 0),
              "batch_size": batch_size, "micro_batches": micro_batches, "max_length": length, "tokens_per_gpu": tokens,
              "params": total_of("params"), "trainable_params": total_of("trainable"), "lora_params": lora_params,
              "gpu_gb": args.plan_gpu_gb, "bytes": {**parts, "vocab_chunks": vocab, "overhead": overhead},
              "lean_loading": lean, "host_bytes_per_rank": host}
    rollout = 0
    if ppo:  # sampling: keys and values of every layer for a generation batch of replies
        rows = min(GENERATION_BATCH, math.ceil(args.rollout_batch / world))
        heads = config.num_attention_heads
        kv = (getattr(config, "num_key_value_heads", heads)
              * (getattr(config, "head_dim", None) or config.hidden_size // heads))  # key / value width
        rollout = 2 * config.num_hidden_layers * kv * length * rows * compute
        result.update(frozen_params=frozen_models * lm_params, rollout_batch=args.rollout_batch,
                      kv_cache={"bytes": rollout, "replies_per_gpu": rows, "tokens": length})
    for ac in ("off",) if ppo else ("off", "on"):  # (and the recomputed layer's copies)
        activations = tokens * (per_token[ac] + working) + kept(tokens)
        total = static + max(autocast[ac] + activations, rollout)
        kept_bound = ava.KEPT_VOCAB_BYTES * sum(bool(share["vocab"]) for share in shares)
        room = args.plan_gpu_gb * 1e9 - static - autocast[ac] - kept_bound
        fits = max(0, int(room // (sequences * length * (per_token[ac] + working))))
        result[f"checkpointing_{ac}"] = {"activations": activations, "autocast_copies": autocast[ac], "total": total,
                                         "fits": total <= args.plan_gpu_gb * 1e9, "max_items_per_gpu": fits}
    result["chosen"] = "on" if args.activation_checkpointing and not ppo else "off"
    return result


def format_plan(plan: dict) -> str:
    """The plan as a few readable lines."""
    gb = lambda n: f"{n / 1e9:.1f} GB"
    trained = "policy + value model: " if plan["objective"] == "ppo" else ""
    frozen = (f"; frozen reference + reward model: {plan['frozen_params'] / 1e9:.2f} B parameters"
              if "frozen_params" in plan else "")
    micro = f" in {plan['micro_batches']} micro-batches" if plan.get("micro_batches", 1) > 1 else ""
    lines = [f"{plan['script'] or 'plan'}: {plan['objective']} on {plan['model']} ({trained}"
             f"{plan['params'] / 1e9:.2f} B parameters, {plan['trainable_params'] / 1e9:.3f} B "
             f"trainable{', LoRA r=%d' % plan['lora_r'] if plan['lora_r'] else ''}{frozen}), "
             f"{plan['world_size']} GPU(s) x {plan['gpu_gb']:.0f} GB, {plan['sharding']}, "
             f"{'bf16' if plan['bf16'] else 'fp32'}",
             f"  per GPU: {plan['tokens_per_gpu']} tokens ({plan['batch_size']} items per step over all GPUs{micro}, "
             f"max length {plan['max_length']})"]
    lines += [f"  {name:<21} {gb(value):>10}" for name, value in plan["bytes"].items()]
    if "kv_cache" in plan:
        kv = plan["kv_cache"]
        lines.append(f"  {'kv_cache':<21} {gb(kv['bytes']):>10}  while sampling ({kv['replies_per_gpu']} replies "
                     f"per GPU at once x {kv['tokens']} tokens; freed before the update)")
    host = plan["host_bytes_per_rank"]
    lines.append(f"  host memory per rank while loading: rank 0 {gb(host['rank_0'])}, other ranks "
                 f"{gb(host['other_ranks'])}"
                 + (" (lean loading: only rank 0 reads the weights)" if plan["lean_loading"] else ""))
    for ac in [ac for ac in ("off", "on") if f"checkpointing_{ac}" in plan]:
        part = plan[f"checkpointing_{ac}"]
        mark = " <- this run" if plan["chosen"] == ac else ""
        copies = f"bf16 weight copies {gb(part['autocast_copies'])}, " if part["autocast_copies"] else ""
        lines.append(f"  activation checkpointing {ac:>3}: activations {gb(part['activations'])}, {copies}total "
                     f"{gb(part['total'])}, {'fits' if part['fits'] else 'does NOT fit'}; at most "
                     f"{part['max_items_per_gpu']} items per GPU{mark}")
    return "\n".join(lines)


def print_plan(args, objective: str, script: str = "") -> dict:
    """--plan: print `memory_plan` and return it (the scripts return right after, loading nothing)."""
    plan = memory_plan(args, objective, script)
    print(format_plan(plan))
    return plan
