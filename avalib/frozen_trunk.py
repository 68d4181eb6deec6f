"""The frozen trunk: the frozen bottom layers' outputs, computed once per sequence and kept on disk.

With --trainable-layers k, the embeddings and the bottom L-k decoder layers never change, so what
they output for a sequence is the same at every step, in every epoch, and for every seed and
objective. `build_frozen_trunk` computes it once per sequence (prompts shared, as ava.hidden_states
does), keeps it under $AVA_CACHE/frozen-trunk/<key>/ in chunks (a killed build resumes at its last
finished chunk; the key names the model, k and every sequence; a damaged chunk, truncated, overwritten or
copied from another cache, is found by a cheap check when read and computed again, with one line saying
so), and returns a `FrozenTrunk`: the reward model is then built with it (`ava.TQR(lm, config,
trunk=trunk)`, reward_models.build_reward_model(..., trunk=trunk)) and computes its hidden states
through it, so that only the top k layers run, from the cached states. A speed-up, not a change of
model: on SmolLM2 with 4 of 30 layers trainable a step skips the forward pass of 26. It needs a decoder
whose first trainable layer takes the states as `inputs_embeds` unchanged (Llama and its kind; GPT-2
adds position embeddings there): `build_frozen_trunk` checks that on real rows and refuses otherwise.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import time

import torch
from tqdm.auto import tqdm

import ava
from avalib import data, distributed, models


class Refused(SystemExit):
    """The cache cannot stand in for this model exactly (the message says why); train_rm.py then trains
    the whole model, which gives the same result, only slower."""


@contextlib.contextmanager
def only_layers(lm, part: slice, final_norm: bool = True):
    """Within the block, lm.base_model runs as if its decoder stack were just layers[part] (their KV-cache
    indices renumbered from 0) and, with final_norm=False, without its final norm. The same modules:
    parameters, gradients and optimiser state are untouched."""
    import torch.nn as nn

    base, layers = lm.base_model, models.decoder_layers(lm)
    stack = next(name for name, module in base.named_children() if module is layers)
    kept = layers[part]
    renumbered = [(m, m.layer_idx) for layer in kept for m in layer.modules()
                  if isinstance(getattr(m, "layer_idx", None), int)]
    norms = {} if final_norm else {name: getattr(base, name) for name in models.final_norms(lm)}
    setattr(base, stack, kept)
    for position, layer in enumerate(kept):
        for m in layer.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = position
    for name in norms:
        setattr(base, name, nn.Identity())
    try:
        yield
    finally:
        setattr(base, stack, layers)
        for m, index in renumbered:
            m.layer_idx = index
        for name, module in norms.items():
            setattr(base, name, module)


class FrozenTrunk:
    """The outputs of an LM's frozen bottom layers (the input of its first trainable layer) for known
    token sequences, looked up by their exact ids. `lookup` gives them for a right-padded batch (None
    if any row is unknown: that batch takes the full model), `top_layers_only` runs the rest, and
    calling it is ava.hidden_states computed that way: the `trunk` of ava.LMWithHeads. `report` says
    where it lives and what building it cost (build_frozen_trunk)."""

    def __init__(self, lm, trainable_layers: int, chunks: list[dict[str, torch.Tensor]], report: dict | None = None):
        self.lm, self.trainable_layers, self.report = lm, trainable_layers, report or {}
        self.states: dict[bytes, torch.Tensor] = {}
        for chunk in chunks:
            ids, offsets, states = chunk["ids"], chunk["offsets"].tolist(), chunk["states"]
            for start, end in zip(offsets[:-1], offsets[1:]):
                self.states[ids[start:end].numpy().tobytes()] = states[start:end]

    def lookup(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        found = []
        for row, n in enumerate(attention_mask.sum(dim=1).tolist()):
            states = self.states.get(input_ids[row, :n].cpu().numpy().tobytes())
            if states is None:
                return None
            found.append(states)
        hidden = torch.zeros(*input_ids.shape, found[0].shape[-1], dtype=found[0].dtype)
        for row, states in enumerate(found):
            hidden[row, :len(states)] = states
        return hidden.to(input_ids.device)

    def top_layers_only(self):
        n = len(models.decoder_layers(self.lm))
        return only_layers(self.lm, slice(n - self.trainable_layers, n))

    def __call__(self, input_ids, attention_mask, response_mask=None, share_prompts: bool = True) -> torch.Tensor:
        """ava.hidden_states(lm, ...): from the cached states through the top layers when every row is
        known, through the whole model otherwise."""
        bottom = self.lookup(input_ids, attention_mask)  # (B, T, d) or None
        if bottom is None:
            return ava.hidden_states(self.lm, input_ids, attention_mask, response_mask, share_prompts=share_prompts)
        with self.top_layers_only():
            return ava.hidden_states(self.lm, input_ids, attention_mask, response_mask, share_prompts=share_prompts,
                                     inputs_embeds=bottom)


def _trunk_key(model_name: str, trainable_layers: int, sequences: list[list[int]]) -> str:
    digest = hashlib.sha256()
    digest.update(repr((models.model_identity(model_name), trainable_layers, "fp32", 1)).encode())
    for ids in sequences:
        digest.update(torch.tensor(ids, dtype=torch.long).numpy().tobytes() + b"|")
    return digest.hexdigest()[:16]


def build_frozen_trunk(lm, args, examples: list[dict], dist: distributed.Distributed, chunk_size: int = 256,
                       batch_size: int = 16) -> FrozenTrunk:
    """Compute (or load) the frozen bottom layers' outputs of `lm` (its layers frozen already:
    models.freeze_layers) for every example ({"input_ids", "prompt_length"}, in order: rows that share a
    prompt should be neighbours) -> the FrozenTrunk to build the reward model with. Under torchrun each
    rank builds every world_size-th chunk, then all load all. Its `report` is what to record: where, how
    many sequences, seconds spent building and loading. `args`: model, trainable_layers, fsdp."""
    from safetensors.torch import load_file, save_file

    n_layers, k = len(models.decoder_layers(lm)), args.trainable_layers
    if not 0 < k < n_layers:
        raise Refused("--frozen-trunk-cache needs some frozen and some trainable layers: 0 < --trainable-layers < "
                      f"{n_layers} (got {k})")
    if getattr(args, "fsdp", False):
        raise Refused("--frozen-trunk-cache: not with --fsdp (FSDP2 shards the layers the cache bypasses); use DDP")
    bottom = [p for layer in models.decoder_layers(lm)[:n_layers - k] for p in layer.parameters()]
    bottom += list(lm.get_input_embeddings().parameters())
    if any(p.requires_grad for p in bottom):
        raise Refused("--frozen-trunk-cache: the embeddings and bottom layers must be frozen (freeze_layers first)")
    unique = list({tuple(e["input_ids"]): e for e in examples}.values())  # one entry per distinct sequence, in order
    directory = models.cache_dir() / "frozen-trunk" / _trunk_key(args.model, k, [e["input_ids"] for e in unique])
    directory.mkdir(parents=True, exist_ok=True)
    chunks = [unique[i:i + chunk_size] for i in range(0, len(unique), chunk_size)]
    paths = [directory / f"chunk-{i:05d}.safetensors" for i in range(len(chunks))]
    started, training, width = time.perf_counter(), lm.training, lm.config.hidden_size
    mine = range(dist.rank, len(chunks), dist.world_size)
    damaged = {i: problem for i in mine
               if paths[i].is_file() and (problem := _chunk_problem(paths[i], chunks[i], width))}
    for i, problem in damaged.items():  # a full disk, a half-copied cache: this chunk is computed again
        print(f"frozen trunk: {paths[i]} is damaged ({problem}); computing it again")
    todo = [i for i in mine if not paths[i].is_file() or i in damaged]
    lm.eval()
    bar = tqdm(total=sum(len(chunks[i]) for i in todo), desc="frozen trunk", disable=not dist.is_main or not todo)
    with torch.no_grad(), only_layers(lm, slice(0, n_layers - k), final_norm=False):
        for i in todo:
            ids, states = [], []
            for start in range(0, len(chunks[i]), batch_size):
                part = chunks[i][start:start + batch_size]
                batch = data.collate(part, 0, device=dist.device)
                hidden = ava.hidden_states(lm, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
                for row, example in enumerate(part):
                    ids.append(torch.tensor(example["input_ids"], dtype=torch.long))
                    states.append(hidden[row, :len(example["input_ids"])].float().cpu())
                bar.update(len(part))
            offsets = torch.tensor([0] + [len(x) for x in ids]).cumsum(0)
            temporary = models.staging_path(paths[i])  # this run's own: two runs may fill one cache at once
            save_file({"ids": torch.cat(ids), "offsets": offsets, "states": torch.cat(states).contiguous()},
                      str(temporary))
            os.replace(temporary, paths[i])  # a chunk is there whole or not at all
    bar.close()
    built = time.perf_counter() - started
    if dist.world_size > 1:  # the other ranks' chunks are checked as this rank's were
        torch.distributed.barrier()
        for i in (i for i in range(len(chunks)) if i not in mine):
            if problem := _chunk_problem(paths[i], chunks[i], width):
                raise models.CacheError(f"frozen trunk: {paths[i]} is damaged ({problem}); clear the cache with: "
                                        f"rm -r {directory}")
    trunk = FrozenTrunk(lm, k, [load_file(str(path)) for path in paths])
    _check_frozen_trunk(lm, trunk, unique[:2], args.model, dist.device)
    lm.train(training)
    trunk.report = {"directory": str(directory), "sequences": len(unique), "chunks_built_here": len(todo),
                    "built_seconds": built, "seconds": time.perf_counter() - started}
    return trunk


def _chunk_problem(path, examples: list[dict], width: int) -> str | None:
    """What is wrong with a cached chunk, or None. Cheap (the states are not read): its safetensors header
    describes the file (models.safetensors_problem: truncated, overwritten), it holds a chunk's three
    tensors, exactly the sequences of `examples` (ids and offsets: not a chunk copied from another cache)
    and one fp32 state of `width` per token."""
    from safetensors import safe_open

    if problem := models.safetensors_problem(path):
        return problem
    try:
        with safe_open(str(path), "pt") as handle:
            names = sorted(handle.keys())
            if names != ["ids", "offsets", "states"]:
                return f"not a frozen-trunk chunk (it holds {names[:4]})"
            ids, offsets, states = handle.get_tensor("ids"), handle.get_tensor("offsets"), handle.get_slice("states")
            shape, dtype = states.get_shape(), states.get_dtype()
    except Exception as error:  # safetensors' own error type: whatever it finds unreadable
        return f"unreadable ({type(error).__name__})"
    expected = torch.tensor([0] + [len(e["input_ids"]) for e in examples]).cumsum(0)
    tokens = torch.tensor([t for e in examples for t in e["input_ids"]])
    if not torch.equal(offsets, expected) or not torch.equal(ids, tokens):
        return "it holds other sequences than this chunk's"
    if list(shape) != [int(expected[-1]), width] or dtype != "F32":
        return f"states of shape {list(shape)} ({dtype}), expected [{int(expected[-1])}, {width}] (F32)"
    return None


def _check_frozen_trunk(lm, trunk: FrozenTrunk, examples: list[dict], model_name: str, device) -> None:
    """The top layers from the cached states must give what the whole model gives, on real rows."""
    batch = data.collate(examples, 0, device=device)
    with torch.no_grad():
        cached = trunk(**batch)
        full = ava.hidden_states(lm, **batch)
    valid = batch["attention_mask"].bool()
    difference = float((cached[valid] - full[valid]).abs().max())
    if not difference <= 1e-4 * max(1.0, float(full[valid].abs().max())):
        raise Refused(f"--frozen-trunk-cache: {model_name} does not run its top layers from cached states the way its "
                      f"full forward does (largest difference {difference:.3g}); its first trainable layer must take "
                      "them as inputs_embeds unchanged (Llama-family decoders do, GPT-2 does not): drop the flag")
