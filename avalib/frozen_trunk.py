"""The frozen trunk: the frozen bottom layers' outputs, computed once per sequence and kept on disk.

With --trainable-layers k, the embeddings and the bottom L-k decoder layers never change, so what
they output for a sequence is the same at every step, in every epoch, and for every seed and
objective. `attach_frozen_trunk` computes it once per sequence (prompts shared, as ava.hidden_states
does), keeps it under $AVA_CACHE/frozen-trunk/<key>/ in chunks (a killed build resumes at its last
finished chunk; the key names the model, k and every sequence), and puts `FrozenTrunk.features` in
place of the reward model's `features` (ava.LMWithHeads), so that only the top k layers run, from the
cached states; ava.py knows nothing of it. A speed-up, not a change of model: on
SmolLM2 with 4 of 30 layers trainable a step skips the forward pass of 26. It needs a decoder whose
first trainable layer takes the states as `inputs_embeds` unchanged (Llama and its kind; GPT-2 adds
position embeddings there): `attach_frozen_trunk` checks that on real rows and refuses otherwise.


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
    renumbered = [(m, m.layer_idx) for layer in kept for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)]
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
    `features` is ava.hidden_states computed that way."""

    def __init__(self, lm, trainable_layers: int, chunks: list[dict[str, torch.Tensor]]):
        self.lm, self.trainable_layers = lm, trainable_layers
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

    def features(self, input_ids, attention_mask, response_mask=None, share_prompts: bool = True) -> torch.Tensor:
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


def attach_frozen_trunk(model, args, examples: list[dict], dist: distributed.Distributed, chunk_size: int = 256,
                        batch_size: int = 16) -> dict:
    """Compute (or load) the frozen bottom layers' outputs of `model.lm` for every example ({"input_ids",
    "prompt_length"}, in order: rows that share a prompt should be neighbours), set model.frozen_trunk
    and put its `features` in place of model.features (model: an ava.LMWithHeads, e.g. TQR). Under
    torchrun each rank builds every world_size-th chunk, then all load all. Returns what to record:
    where, how many sequences, seconds spent building and loading."""
    from safetensors.torch import load_file, save_file

    lm = model.lm

    n_layers, k = len(models.decoder_layers(lm)), args.trainable_layers
    if not 0 < k < n_layers:
        raise Refused(f"--frozen-trunk-cache needs some frozen and some trainable layers: 0 < --trainable-layers < {n_layers} (got {k})")
    if getattr(args, "fsdp", False):
        raise Refused("--frozen-trunk-cache: not with --fsdp (FSDP2 shards the layers the cache bypasses); use DDP")
    bottom = [p for layer in models.decoder_layers(lm)[:n_layers - k] for p in layer.parameters()] + list(lm.get_input_embeddings().parameters())
    if any(p.requires_grad for p in bottom):
        raise Refused("--frozen-trunk-cache: the embeddings and bottom layers must be frozen (freeze_layers first)")
    unique = list({tuple(e["input_ids"]): e for e in examples}.values())  # one entry per distinct sequence, in order
    directory = models.cache_dir() / "frozen-trunk" / _trunk_key(args.model, k, [e["input_ids"] for e in unique])
    directory.mkdir(parents=True, exist_ok=True)
    chunks = [unique[i:i + chunk_size] for i in range(0, len(unique), chunk_size)]
    paths = [directory / f"chunk-{i:05d}.safetensors" for i in range(len(chunks))]
    started, training = time.perf_counter(), lm.training
    todo = [i for i in range(dist.rank, len(chunks), dist.world_size) if not paths[i].is_file()]
    lm.eval()
    bar = tqdm(total=sum(len(chunks[i]) for i in todo), desc="frozen trunk", disable=not dist.is_main or not todo)
    with torch.no_grad(), only_layers(lm, slice(0, n_layers - k), final_norm=False):
        for i in todo:
            ids, states = [], []
            for start in range(0, len(chunks[i]), batch_size):
                part = chunks[i][start:start + batch_size]
                batch = {key: value.to(dist.device) for key, value in data.collate(part, 0).items()}
                hidden = ava.hidden_states(lm, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
                for row, example in enumerate(part):
                    ids.append(torch.tensor(example["input_ids"], dtype=torch.long))
                    states.append(hidden[row, :len(example["input_ids"])].float().cpu())
                bar.update(len(part))
            offsets = torch.tensor([0] + [len(x) for x in ids]).cumsum(0)
            temporary = paths[i].with_suffix(".tmp")
            save_file({"ids": torch.cat(ids), "offsets": offsets, "states": torch.cat(states).contiguous()}, str(temporary))
            os.replace(temporary, paths[i])  # a chunk is there whole or not at all
    bar.close()
    built = time.perf_counter() - started
    if dist.world_size > 1:
        torch.distributed.barrier()
    trunk = FrozenTrunk(lm, k, [load_file(str(path)) for path in paths])
    _check_frozen_trunk(model, trunk, unique[:2], args.model, dist.device)
    model.frozen_trunk = trunk
    model.features = lambda input_ids, attention_mask, response_mask: trunk.features(
        input_ids, attention_mask, response_mask, share_prompts=model.share_prompts)
    lm.train(training)
    return {"directory": str(directory), "sequences": len(unique), "chunks_built_here": len(todo),
            "built_seconds": built, "seconds": time.perf_counter() - started}


def _check_frozen_trunk(model, trunk: FrozenTrunk, examples: list[dict], model_name: str, device) -> None:
    """The top layers from the cached states must give what the whole model gives, on real rows."""
    batch = {key: value.to(device) for key, value in data.collate(examples, 0).items()}
    with torch.no_grad():
        cached = trunk.features(**batch)
        full = model.features(**batch)
    valid = batch["attention_mask"].bool()
    difference = float((cached[valid] - full[valid]).abs().max())
    if not difference <= 1e-4 * max(1.0, float(full[valid].abs().max())):
        raise Refused(f"--frozen-trunk-cache: {model_name} does not run its top layers from cached states the way its "
                         f"full forward does (largest difference {difference:.3g}); its first trainable layer must take "
                         "them as inputs_embeds unchanged (Llama-family decoders do, GPT-2 does not): drop the flag")
