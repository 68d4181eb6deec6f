"""Distribution: DDP under torchrun (gloo on CPU, NCCL on GPU), FSDP2 with --fsdp, a no-op in one process.

The one entry point is `distribute(model, args, dist)`; `init_distributed` / `end_distributed` bracket a run.

One distributed layer for every script: `train_loop` calls `distribute` (DDP by default, FSDP2 with
--fsdp, activation checkpointing with --activation-checkpointing), casts to bf16 with --bf16 on a
GPU, writes sharded checkpoints (torch.distributed.checkpoint) under FSDP and gathers the full
weights back into a plain model at the end, so evaluation and the safetensors export run as in a
single process. Under FSDP2 rank 0 alone reads the weights (lean loading: the other ranks build the
model on the meta device and receive their shards from rank 0). LoRA (peft) is applied by the policy
scripts before training and merged before export. `memory_plan` works out bytes per GPU for a model
on the meta device (--plan).
Measured on CPU/gloo (tests/test_scale.py): 2 processes reproduce 1 process's losses and gradients
over the same global batch, for DDP and for FSDP2 (torch 2.13; see `check_fsdp_averages`).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from avalib import models


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    created: bool = False  # this call started the process group (so its caller should end it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Distributed:
    """Read torchrun's environment; start a process group when there is more than one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    created = world_size > 1 and not torch.distributed.is_initialized()
    if created:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world_size, local_rank, device, created)


def all_reduce_sum(values: list[float], dist: Distributed) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.world_size > 1:
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def gather_strided(values: list, dist: Distributed) -> list:
    """Undo `items[rank::world_size]`: every rank's values, back in the items' order, on every rank."""
    if dist.world_size == 1:
        return list(values)
    parts: list = [None] * dist.world_size
    torch.distributed.all_gather_object(parts, list(values))
    ordered: list = [None] * sum(len(part) for part in parts)
    for rank, part in enumerate(parts):
        ordered[rank::dist.world_size] = part
    return ordered


def shard(batch: list, dist: Distributed) -> list:
    """This rank's part of a global batch (every rank gets at least one item if the batch allows)."""
    return batch[dist.rank::dist.world_size]


def is_sharded(args, dist: Distributed) -> bool:
    """FSDP2 is on: --fsdp under torchrun with more than one process (one process has nothing to shard)."""
    return bool(getattr(args, "fsdp", False)) and dist.world_size > 1


# testing aid: =1 lets --bf16 / --frozen-bf16 run on a CPU (bench/gpu_check.py --dry-run)
CPU_BF16 = "AVA_ALLOW_CPU_BF16"


def check_scale_flags(args, dist: Distributed) -> None:
    """Refuse flag combinations that cannot do what they say, before anything is loaded."""
    if getattr(args, "bf16", False) or getattr(args, "frozen_bf16", False):
        flag = "--bf16" if getattr(args, "bf16", False) else "--frozen-bf16"
        if dist.device.type != "cuda":
            if os.environ.get(CPU_BF16) == "1":  # the dry run exercises the bf16 code paths, slowly
                return
            if flag == "--bf16":
                raise SystemExit("--bf16: mixed precision needs a CUDA GPU; on this CPU bf16 matmul runs ~2.7x slower "
                                 "than fp32, so training stays in fp32 (drop --bf16)")
            raise SystemExit("--frozen-bf16: bf16 weights for the frozen reference and reward model need a CUDA GPU; "
                             "on this CPU bf16 matmul runs ~2.7x slower than fp32, so they stay in fp32 (drop "
                             "--frozen-bf16)")
        if not torch.cuda.is_bf16_supported():
            raise SystemExit(f"{flag}: this GPU has no bf16 support (drop {flag})")


def lean_loading(args, world_size: int, objective: str = "") -> bool:
    """FSDP2's lean loading: rank 0 alone reads the weights (the others build the model on the meta
    device, models.load_model(on_meta=True)) and `distribute` sends each rank its shards, so no rank
    but 0 ever holds the full model in host memory. Not where every rank needs the full weights before
    sharding: DPO's reference pass, AfD's sampling (the frozen-trunk cache refuses --fsdp by itself)."""
    return bool(getattr(args, "fsdp",
                        False)) and world_size > 1 and objective != "dpo" and not getattr(args, "afd", False)


def autocast_context(args, dist: Distributed):
    """bf16 autocast around the forward pass and loss under --bf16, except under FSDP2, whose
    MixedPrecisionPolicy casts the parameters itself. Master weights and optimiser stay fp32."""
    if getattr(args, "bf16", False) and not is_sharded(args, dist):
        return torch.autocast(device_type=dist.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def unwrap(model):
    """The module inside a DDP wrapper, or the module itself (FSDP2 shards in place: nothing to unwrap)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def share_prompts(args) -> bool:
    """Whether a model for this run may share a prompt's pass among its rows (ava.hidden_states): not under
    --activation-checkpointing, whose recomputed layers run without the KV cache that sharing needs."""
    return not getattr(args, "activation_checkpointing", False)


def enable_activation_checkpointing(model) -> None:
    """Keep only each decoder layer's input; the backward pass recomputes the layer (non-reentrant
    torch.utils.checkpoint, through transformers, which checkpoints `forward` inside the module's
    hooks, so FSDP2's hooks are not run twice). Prompt sharing (ava.hidden_states) needs the KV cache
    that checkpointing drops: the model must have been built with share_prompts=False
    (`share_prompts(args)` says which), and one built otherwise is refused here, not changed."""
    if getattr(model, "share_prompts", False):
        raise ValueError(f"--activation-checkpointing: {type(model).__name__} was built with share_prompts=True, which "
                         "needs the KV cache that checkpointing drops; build it with "
                         "share_prompts=distributed.share_prompts(args)")
    lm = models.language_model(model)
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.x
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def gradient_sync(model, enabled: bool):
    """A context in which the backward pass does (enabled) or does not all-reduce gradients across processes,
    for gradient accumulation: DDP's no_sync (its gradients are whole on every process anyway, so waiting for
    the last micro-batch costs no memory and saves the all-reduces). FSDP2 synchronises every micro-batch:
    its reduce-scatter keeps each process's gradients sharded, while set_requires_gradient_sync(False) would
    hold every trained parameter's gradient whole, in fp32, until the last micro-batch (4 bytes per trained
    parameter: ~23 GB more per GPU on the 7B FSDP2 plan of docs/scale.md). One process: nothing to do."""
    if enabled or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def check_fsdp_averages(mesh) -> None:
    """FSDP2 on gloo has been reported to sum gradients across ranks instead of averaging them
    (pytorch issue 162338). A one-parameter probe, sharded like the model, catches that at start-up:
    rank r sees gradient r + 1, so the mean is (world + 1) / 2 and the sum world (world + 1) / 2."""
    from torch.distributed.fsdp import fully_shard

    world, rank = mesh.size(), mesh.get_rank()
    probe = torch.nn.Linear(1, world, bias=False, device=mesh.device_type)
    torch.nn.init.ones_(probe.weight)
    fully_shard(probe, mesh=mesh)
    probe(torch.full((1, 1), float(rank + 1), device=mesh.device_type)).sum().backward()
    got = probe.weight.grad.full_tensor().flatten()
    if not torch.allclose(got, torch.full_like(got, (world + 1) / 2)):
        raise SystemExit(f"FSDP2 on this torch ({torch.__version__}) and backend "
                         f"({torch.distributed.get_backend()}) does not average gradients across processes "
                         f"(got {got.tolist()}, expected {(world + 1) / 2}; pytorch issue 162338): drop --fsdp (DDP)")


def distribute(model, args, dist: Distributed):
    """The model as training sees it. One process: the model itself. Several: DDP (replicated weights,
    gradients all-reduced, buckets shared with the gradients), or with --fsdp FSDP2: fully_shard on each
    decoder layer, then on the root (TQR / reward model / policy, which owns the embeddings, the LM
    head and our heads), applied in place; parameters become this rank's DTensor shards, so the
    optimiser must be built afterwards. --bf16 under FSDP2: bf16 compute copies, fp32 gradient
    reduction and fp32 master shards. Lean loading (some rank built the model on the meta device,
    `lean_loading`): after sharding, every rank's shards are filled from rank 0's weights
    (`load_from_rank0`). --activation-checkpointing in every case. Batches must be on `dist.device`
    already (data.collate(..., device=dist.device)): nothing here moves them."""
    if getattr(args, "activation_checkpointing", False):
        enable_activation_checkpointing(model)
    if dist.world_size == 1:
        if getattr(args, "fsdp", False):
            print("--fsdp: one process, nothing to shard: training unsharded "
                  "(FSDP2 needs torchrun with several processes)")
        return model
    if not is_sharded(args, dist):
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None, gradient_as_bucket_view=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    check_fsdp_averages(mesh)
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if getattr(args, "bf16", False) else MixedPrecisionPolicy())
    lean = _any_rank(any(p.is_meta for p in model.parameters()))  # lean loading: some rank built it on meta
    if lean:  # rank 0's weights (host memory, before sharding) and every rank's buffers (not all in a state dict)
        full = model.state_dict() if dist.is_main else {}
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    for layer in models.decoder_layers(models.language_model(model)):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if lean:
        load_from_rank0(model, full, buffers, dist)
    return model


def _any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is True on any (a collective)."""
    tensor = torch.tensor([float(flag)], device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return bool(tensor.item())


def load_from_rank0(model, full: dict, buffers: dict, dist: Distributed) -> None:
    """Lean loading, after fully_shard: give every rank's shards real memory on its device, then fill
    them from rank 0's full state dict `full` (the other ranks pass {}), sent shard by shard
    (set_model_state_dict with broadcast_from_rank0; no rank but 0 holds the full model). Buffers
    are not all in a state dict (rotary frequencies are not), so each rank restores its own."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=dist.device)
    with torch.no_grad():
        for name, value in buffers.items():
            model.get_buffer(name).copy_(value)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor shard's full value (a collective: every rank must call it), or the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def dump_gradients(path: str, model, dumped: list, dist: Distributed) -> None:
    """--dump-grads: append this step's full gradients {name: tensor} (every rank gathers FSDP
    shards; rank 0 keeps them) and rewrite `path` with every step so far."""
    grads = {name: _full(p.grad).detach().cpu().clone() for name, p in model.named_parameters() if p.grad is not None}
    if dist.is_main:
        dumped.append(grads)
        tmp = Path(path).with_name(Path(path).name + ".tmp")
        torch.save(dumped, tmp)
        os.replace(tmp, path)


def meta_skeleton(model):
    """A copy of `model` whose parameters live on the meta device (no memory) and whose buffers are
    real copies (rotary frequencies are not in the state dict): the plain module that FSDP's
    gathered weights are loaded back into by `gather_full_model`."""
    import copy

    memo = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b.detach().clone()
    return copy.deepcopy(model, memo)


def gather_full_model(sharded, skeleton, dist: Distributed):
    """All-gather FSDP's shards into the skeleton's plain module on every rank (train_rm evaluates on
    every rank; rank 0 exports with save_pretrained). Costs the full model once per rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    buffers = {name: b for name, b in skeleton.named_buffers()}
    plain = skeleton.to_empty(device=dist.device)
    missing, unexpected = plain.load_state_dict(full, strict=False)
    if unexpected or set(missing) - set(buffers):
        raise RuntimeError(f"gathering FSDP weights: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, value in buffers.items():
            if name not in full:  # non-persistent (rotary inv_freq): as before training
                plain.get_buffer(name).copy_(value)
    lm = models.language_model(plain)
    if getattr(getattr(lm, "config", None), "tie_word_embeddings", False):
        lm.get_output_embeddings().weight = lm.get_input_embeddings().weight  # to_empty gave each its own tensor
    return plain.train(sharded.training)


def end_distributed(dist: Distributed) -> None:
    """End the process group if this run started it (a caller that started it, e.g. ML-IRL calling
    train_rm.train_reward_model, keeps it)."""
    if dist.created:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
