"""The memory plan (--plan): bytes per GPU, worked out from a model built on the meta device (no weights)."""
from __future__ import annotations

from pathlib import Path

import torch

from avalib import distributed, lora, models, reward_models


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
    """The model `objective` trains, on the meta device, frozen / LoRA'd as the flags say."""
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
        else:  # dpo, sft: the LM itself (DPO's reference log-probs are computed once before training)
            model = lm
    return model, lm, lora_params


def plan_config(name: str):
    """'llama-2-7b' (built in, no download), or a model directory / config.json (no weights read)."""
    from transformers import AutoConfig, LlamaConfig

    if name.lower() in ("llama-2-7b", "llama2-7b", "meta-llama/llama-2-7b-hf"):
        return LlamaConfig(**LLAMA_2_7B)
    path = Path(name)
    return AutoConfig.from_pretrained(str(path.parent if path.name == "config.json" else path))


def memory_plan(args, objective: str, script: str = "", frozen_models: int = 0) -> dict:
    """Bytes per GPU for training `objective` with this run's flags on args.plan_world_size GPUs:
    parameters (fp32 master weights), gradients and AdamW state (fp32, trainable only), FSDP2's
    transient all-gather / reduce-scatter buffers, activations (with and without checkpointing),
    and the full-vocabulary chunks. FSDP2 splits every parameter along dim 0 over the GPUs (padded,
    as fully_shard does); DDP and one GPU keep everything whole. Tokens per GPU: ceil(batch_size /
    world / grad_accum) pairs (or demonstrations: one micro-batch) x sequences per item x max_length, i.e. every
    sequence padded
    to --max-length (an upper bound).

    Activations, bytes per token (L' = decoder layers from the lowest trained one up: autograd keeps
    nothing below it; A = `activation_bytes_per_token_layer`; c = bytes of a hidden state):
      checkpointing off:  L' * A + final norm + heads + A
      checkpointing on:   L' * c * hidden + final norm + heads + A   (each layer keeps its input only)
    where the last A is one layer's worth: the recomputed layer, or the backward's working set. Heads:
    AVA and Pref-Trans keep Eq. 11's query and key (2 c h) and fp32 T x T scores (12 T); AVA, DPO and
    SFT keep the gathered hidden states of the trained transitions (c h). The full-vocabulary chunks
    add 6 x vocab_chunk x V x 4 bytes, transient. Under bf16 autocast (DDP, one GPU) every matmul
    also keeps a bf16 copy of its weight: 2 bytes per weight the backward crosses (checkpointing on:
    the cached trainable ones plus one layer's).

    Frozen models (`frozen_models` full copies of the LM on every GPU, never sharded: PPO's reference
    policy and reward model are 2): 4 bytes per LM parameter each, 2 with args.frozen_bf16
    (bytes["frozen_models"], present when there are any; their heads, < 0.3% at 7B, are not counted).
    Host memory per rank while loading ("host_bytes_per_rank"): the full fp32 model on every rank
    (4 bytes per parameter), except under FSDP2's lean loading (distributed.lean_loading), where rank
    0 alone reads the weights and the other ranks hold only the heads they build (the LM on the meta device)."""
    import math

    config = plan_config(args.plan)
    model, lm, lora_params = _plan_model(config, objective, args)
    world = max(1, args.plan_world_size)
    fsdp = bool(args.fsdp) and world > 1
    precision = ("bf16" if fsdp else "autocast") if args.bf16 else "fp32"
    compute = 2 if precision == "bf16" else 4  # bytes of the hidden states between layers (and of gathered weights)
    layers = models.decoder_layers(lm)
    layer_ids = {id(p) for p in layers.parameters()}

    def local(p):  # elements this GPU holds
        return math.ceil(p.shape[0] / world) * (p.numel() // p.shape[0]) if fsdp and p.dim() > 0 else p.numel()

    params = list(model.parameters())  # each tensor once (tied weights too)
    n_params, n_trainable = sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
    local_all = sum(local(p) for p in params)
    local_trainable = sum(local(p) for p in params if p.requires_grad)
    gib = 2**30
    parts = {"parameters": 4 * local_all, "gradients": 4 * local_trainable, "optimizer": 8 * local_trainable}
    if fsdp:  # the root (embeddings, LM head, final norm, our heads) stays gathered through forward and backward;
        root = sum(p.numel() for p in params if id(p) not in layer_ids)  # two layers gathered at once (prefetch);
        layer = max(sum(p.numel() for p in block.parameters()) for block in layers)  # one layer's unsharded fp32 grads
        layer_trainable = max(sum(p.numel() for p in block.parameters() if p.requires_grad) for block in layers)
        parts["fsdp_buffers"] = compute * (root + 2 * layer) + 4 * layer_trainable
    trained = [j for j, block in enumerate(layers) if any(p.requires_grad for p in block.parameters())]
    # below the lowest trained layer autograd keeps nothing
    crossed_layers = len(layers) - min(trained) if trained else 0
    autocast = {"off": 0, "on": 0}
    if args.bf16 and not fsdp:  # autocast: every matmul saves its bf16 weight copy for the backward pass, from
        matrices = lambda module: sum(p.numel() for p in module.parameters() if p.dim() == 2)  # not the norms'
        crossed = sum(matrices(block) for block in list(layers)[min(trained):]) if trained else 0
        reads_head = objective not in ("bt", "bt-var", "pref-trans")  # the lowest trained layer up, the LM head
        crossed += (lm.get_output_embeddings().weight.numel() if reads_head else 0) + sum(  # and our heads
            p.numel() for name, p in model.named_parameters() if model is not lm and not name.startswith("lm."))
        largest = max(matrices(block) for block in layers)
        autocast = {"off": 2 * crossed, "on": 2 * (n_trainable + largest)}  # checkpointing: cached trainable copies
    pairwise = objective in ("ava-p", "dpo", "bt", "bt-var", "pref-trans") or getattr(args, "afd", False)
    sequences = 2 if pairwise else 1
    # one micro-batch (--grad-accum)
    items = math.ceil(args.batch_size / world / max(1, getattr(args, "grad_accum", 1)))
    tokens = items * sequences * args.max_length
    h, length = config.hidden_size, args.max_length
    per_layer = activation_bytes_per_token_layer(config, precision)
    norm = 8 * h if compute == 2 else 12 * h
    heads = {"ava-p": 3 * compute * h + 12 * length, "ava-d": 3 * compute * h + 12 * length,  # Eq. 11 q, k (B T T fp32)
             "pref-trans": 2 * compute * h + 12 * length, "dpo": compute * h, "sft": compute * h}.get(objective, 0)
    per_token = {"off": crossed_layers * per_layer + norm + heads,
                 "on": crossed_layers * compute * h + norm + heads}  # checkpointing keeps layer inputs
    # one layer's activations: the backward's working set (the recomputed layer)
    working = per_layer if crossed_layers else 0
    # the resolved config (flags default to None)
    chunk = args.ava_config().vocab_chunk if hasattr(args, "ava_config") else 512
    vocab = 0 if objective in ("bt", "bt-var", "pref-trans") else 6 * 4 * chunk * config.vocab_size
    overhead = 2 * gib  # CUDA context, NCCL buffers, allocator slack: assumed, not measured
    if frozen_models:
        lm_params = sum(p.numel() for name, p in lm.named_parameters() if "lora_" not in name)
        parts["frozen_models"] = frozen_models * lm_params * (2 if getattr(args, "frozen_bf16", False) else 4)
    head_params = sum(p.numel() for name, p in model.named_parameters()
                      if model is not lm and not name.startswith("lm."))
    lean = distributed.lean_loading(args, world, objective)
    host = {"rank_0": 4 * n_params, "other_ranks": 4 * head_params if lean else 4 * n_params}
    static = sum(parts.values()) + vocab + overhead
    result = {"script": script, "objective": objective, "model": args.plan, "world_size": world,
              "sharding": "FSDP2" if fsdp else ("DDP" if world > 1 else "none"), "bf16": bool(args.bf16),
              "trainable_layers": args.trainable_layers, "lora_r": getattr(args, "lora_r", 0),
              "batch_size": args.batch_size, "max_length": length, "tokens_per_gpu": tokens,
              "params": n_params, "trainable_params": n_trainable, "lora_params": lora_params,
              "gpu_gb": args.plan_gpu_gb, "bytes": {**parts, "vocab_chunks": vocab, "overhead": overhead},
              "lean_loading": lean, "host_bytes_per_rank": host}
    for ac in ("off", "on"):  # (and the recomputed layer's copies)
        activations = tokens * (per_token[ac] + working)
        total = static + autocast[ac] + activations
        room = args.plan_gpu_gb * 1e9 - static - autocast[ac]
        fits = max(0, int(room // (sequences * length * (per_token[ac] + working))))
        result[f"checkpointing_{ac}"] = {"activations": activations, "autocast_copies": autocast[ac], "total": total,
                                         "fits": total <= args.plan_gpu_gb * 1e9, "max_items_per_gpu": fits}
    result["chosen"] = "on" if args.activation_checkpointing else "off"
    return result


def format_plan(plan: dict) -> str:
    """The plan as a few readable lines."""
    gb = lambda n: f"{n / 1e9:.1f} GB"
    lines = [f"{plan['script'] or 'plan'}: {plan['objective']} on {plan['model']} ({plan['params'] / 1e9:.2f} B "
             f"parameters, {plan['trainable_params'] / 1e9:.3f} B "
             f"trainable{', LoRA r=%d' % plan['lora_r'] if plan['lora_r'] else ''}), {plan['world_size']} GPU(s) x "
             f"{plan['gpu_gb']:.0f} GB, {plan['sharding']}, {'bf16' if plan['bf16'] else 'fp32'}",
             f"  per GPU: {plan['tokens_per_gpu']} tokens ({plan['batch_size']} items per step over all GPUs, "
             f"max length {plan['max_length']})"]
    lines += [f"  {name:<16} {gb(value):>10}" for name, value in plan["bytes"].items()]
    host = plan["host_bytes_per_rank"]
    lines.append(f"  host memory per rank while loading: rank 0 {gb(host['rank_0'])}, other ranks "
                 f"{gb(host['other_ranks'])}"
                 + (" (lean loading: only rank 0 reads the weights)" if plan["lean_loading"] else ""))
    for ac in ("off", "on"):
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
