"""Generation: a plain sampling loop over the KV cache, and a disk cache of samples.

A plain sampling loop over the KV cache, not `model.generate`: every step is in view (temperature,
nucleus filter, EOS bookkeeping), randomness comes from a private torch.Generator (the output
depends only on `seed` and the inputs, and the global RNG is left alone), and no generation_config
default (repetition penalty, top-k) silently changes the policy being sampled. Its greedy output
equals `model.generate(do_sample=False)` token for token (tests/test_task.py).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from avalib import data, distributed, models


def cached_generate(model_name: str, prompts: list[str], *, max_new_tokens: int, temperature: float, top_p: float,
                    seed: int, chat_template: bool, model=None, tokenizer=None,
                    dist: distributed.Distributed | None = None,
                    desc: str = "sampling") -> list[str]:
    """`generate` with its replies cached on disk under a key of the model's weights, the prompts and
    the sampling settings: baselines' and initial-policy samples are drawn once, then reused. Rank 0
    samples; other ranks wait and read. `model`/`tokenizer` may be passed if already loaded. An entry
    is checked when read (`_read_samples`): a damaged one is sampled again, with one line saying so."""
    import json

    settings = {"model": models.model_identity(model_name), "prompts": prompts, "max_new_tokens": max_new_tokens,
                "temperature": temperature, "top_p": top_p, "seed": seed, "chat_template": chat_template}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = models.cache_dir() / "samples" / f"{key}.json"
    dist = dist or distributed.Distributed()
    samples, problem = _read_samples(path, settings) if dist.is_main and path.is_file() else (None, None)
    if problem:
        print(f"{path}: damaged sample cache ({problem}); sampling again")
    if samples is None and dist.is_main:
        if model is None:
            model, tokenizer = models.load_model(model_name)
        samples = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, seed=seed, chat_template=chat_template, desc=desc)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = models.staging_path(path)
        tmp.write_text(json.dumps({"settings": settings, "samples": samples, "sha256": _samples_digest(samples)}))
        os.replace(tmp, path)
    if dist.world_size > 1:
        torch.distributed.barrier()
        if not dist.is_main:
            samples, problem = _read_samples(path, settings)
            if samples is None:
                raise models.CacheError(f"{path}: damaged sample cache ({problem}); clear it with: rm {path}")
    return samples


def _samples_digest(samples: list[str]) -> str:
    import json

    return hashlib.sha256(json.dumps(samples).encode()).hexdigest()


def _read_samples(path, settings: dict) -> tuple[list[str] | None, str | None]:
    """(the cached samples, None), or (None, what is wrong): the entry must parse, be made for exactly
    these settings (not a file copied from another key), hold one string per prompt and, where it records
    one (entries written before it did, do not), match its sha256."""
    import json

    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: malformed JSON or UTF-8, e.g. a truncated file
        return None, f"unreadable: {type(error).__name__}"
    if not isinstance(payload, dict) or payload.get("settings") != json.loads(json.dumps(settings)):
        return None, "not made for these settings"
    samples = payload.get("samples")
    if not isinstance(samples,
                      list) or len(samples) != len(settings["prompts"]) or not all(isinstance(x, str) for x in samples):
        return None, f"not {len(settings['prompts'])} samples"
    if "sha256" in payload and payload["sha256"] != _samples_digest(samples):
        return None, "its samples differ from what was written (sha256)"
    return samples, None


@dataclass
class Generation:
    """One sampled reply. `response_ids` stops before the EOS; `finished` is False when the reply
    was cut at `max_new_tokens` instead of ending with EOS."""
    prompt_ids: list[int]
    response_ids: list[int]
    finished: bool


def chat_prompt_text(tokenizer, prompt: str) -> str:
    """`prompt` as one user turn in the tokenizer's chat template, ending where the assistant's reply
    starts. Training scripts format prompts with this too, so they see exactly what was sampled."""
    # text, inside the structure
    messages = [{"role": "user", "content": data.escape_special_tokens(tokenizer, prompt)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_token_ids(tokenizer, prompt: str, chat_template: bool = True) -> list[int]:
    """Token ids of a prompt, chat-formatted or raw (raw: the tokenizer adds its usual special tokens)."""
    if chat_template:
        return tokenizer(chat_prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a reply: the tokenizer's EOS plus the model's generation_config EOS ids."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    ids.discard(None)
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation_config defines an EOS token")
    return sorted(ids)


def sample_next_token(logits: torch.Tensor, temperature: float, top_p: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. temperature 0 is greedy; top_p < 1 is nucleus sampling
    (Holtzman et al. 2020): sample from the smallest set of most likely tokens whose mass reaches top_p.

    Written for speed on a CPU, where sampling would otherwise cost more than the model's forward
    step (B=32, V=49152: full sort ~55 ms, torch.multinomial ~25 ms, one decoding step ~100 ms):
    the nucleus is looked for among the 256 likeliest tokens first (widened until it fits, so the
    result is exact), and one uniform per row is inverted through the CDF.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    vocab_size = probs.shape[-1]
    candidate_ids = None  # None: every token is a candidate, in vocabulary order
    if top_p < 1.0:
        k = min(256, vocab_size)
        probs_topk, candidate_ids = probs.topk(k, dim=-1)  # (B, k), sorted descending
        while k < vocab_size and bool((probs_topk.sum(dim=-1) < top_p).any()):
            k = min(4 * k, vocab_size)
            probs_topk, candidate_ids = probs.topk(k, dim=-1)
        mass_before = probs_topk.cumsum(dim=-1) - probs_topk  # (B, k) mass of the likelier tokens
        probs = probs_topk.masked_fill(mass_before >= top_p, 0.0)  # (B, k); the top token always stays
    cdf = probs.cumsum(dim=-1)  # (B, k) unnormalised
    u = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device) * cdf[:, -1:]  # (B, 1)
    # first index whose CDF exceeds u: never a zero-probability token, since u < total
    choice = torch.searchsorted(cdf, u, right=True).clamp(max=probs.shape[-1] - 1)  # (B, 1)
    if candidate_ids is not None:
        choice = candidate_ids.gather(-1, choice)
    return choice.squeeze(-1)


def _sample_batch(model, prompts_ids: list[list[int]], *, max_new_tokens: int, temperature: float,
                  top_p: float, generator: torch.Generator, eos_ids: torch.Tensor, pad_id: int, synced: bool = False):
    """Sample replies for one batch of tokenised prompts. Returns (new tokens (B, N), reply lengths (B,),
    finished (B,)); row b's reply is new_tokens[b, :lengths[b]], its EOS (if any) excluded. synced: stop
    only when every process's batch has finished (an FSDP-sharded model's forward is a collective, so
    every process must run as many), and under no_grad rather than inference_mode, since FSDP2 reuses
    the buffers it gathers parameters into and inference tensors cannot be written outside it."""
    with (torch.no_grad() if synced else torch.inference_mode()):
        return _sample_tokens(model, prompts_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              generator=generator, eos_ids=eos_ids, pad_id=pad_id, synced=synced)


def _sample_tokens(model, prompts_ids, *, max_new_tokens, temperature, top_p, generator, eos_ids, pad_id, synced):
    from transformers import DynamicCache

    device = eos_ids.device
    # identical prompts (several samples of one prompt) are encoded once, then their cache rows copied
    unique: dict[tuple[int, ...], int] = {}
    row_of = torch.tensor([unique.setdefault(tuple(ids), len(unique)) for ids in prompts_ids], device=device)  # (B,)
    U, L = len(unique), max(len(ids) for ids in unique)
    input_ids = torch.full((U, L), pad_id, dtype=torch.long, device=device)  # (U, L), left-padded
    attention_mask = torch.zeros((U, L), dtype=torch.long, device=device)  # (U, L)
    for row, ids in enumerate(unique):
        input_ids[row, L - len(ids):] = torch.tensor(ids, device=device)
        attention_mask[row, L - len(ids):] = 1
    # every prompt starts at position 0 whatever its padding (the pad value itself is never attended)
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)  # (U, L)
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]  # (U, V)
    cache.reorder_cache(row_of)  # (U, ...) -> (B, ...) in every layer
    logits, attention_mask, position_ids = logits[row_of], attention_mask[row_of], position_ids[row_of]
    B = len(prompts_ids)

    new_tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)  # (B, N)
    lengths = torch.zeros(B, dtype=torch.long, device=device)  # (B,) reply tokens before the EOS
    finished = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
    for step in range(max_new_tokens):
        token = sample_next_token(logits, temperature, top_p, generator)  # (B,)
        new_tokens[:, step] = token
        hit_eos = torch.isin(token, eos_ids) & ~finished
        lengths += (~finished & ~hit_eos).long()
        finished |= hit_eos
        done = finished.all()
        if synced:
            done = done.to(torch.int32)
            torch.distributed.all_reduce(done, op=torch.distributed.ReduceOp.MIN)
        if bool(done) or step == max_new_tokens - 1:
            break
        # finished rows keep decoding (simpler than shrinking the cache); their tokens lie past
        # `lengths` and are never read, and rows never attend to each other
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)  # (B, L+step+1)
        position_ids = position_ids[:, -1:] + 1  # (B, 1)
        logits = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=cache, use_cache=True).logits[:, -1]  # (B, V)
    return new_tokens, lengths, finished


def generate_ids(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0, batch_size: int = 16, chat_template: bool = True,
                 progress: bool = True, desc: str = "generating", synced: bool = False) -> list[Generation]:
    """Sample one reply per prompt with a KV cache, in left-padded batches; returns token ids.
    synced: the model is FSDP-sharded and every process calls this with as many prompts (see _sample_batch).

    Prompts are batched longest-first (similar lengths waste little padding) and the results put
    back in input order. The output is a deterministic function of (model, prompts, settings, seed);
    `batch_size` is one of the settings, since padding changes the float rounding. Masks come from
    the prompt lengths and the EOS bookkeeping, never from pad ids (SmolLM2's pad *is* its EOS).
    """
    if isinstance(prompts, str) or not all(isinstance(prompt, str) for prompt in prompts):
        raise TypeError("prompts must be a list of strings")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        return []

    device = next(model.parameters()).device
    encoded = [prompt_token_ids(tokenizer, prompt, chat_template) for prompt in prompts]
    if any(len(ids) == 0 for ids in encoded):
        raise ValueError("an empty prompt tokenises to no tokens: nothing to condition on")
    eos_ids = torch.tensor(eos_token_ids(model, tokenizer), device=device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(eos_ids[0])
    generator = torch.Generator(device=device).manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # longest first, stable

    results: list[Generation | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                new_tokens, lengths, finished = _sample_batch(
                    model, [encoded[i] for i in batch], max_new_tokens=max_new_tokens,
                    temperature=temperature, top_p=top_p, generator=generator, eos_ids=eos_ids, pad_id=pad_id,
                    synced=synced)
                for row, i in enumerate(batch):
                    results[i] = Generation(prompt_ids=list(encoded[i]),
                                            response_ids=new_tokens[row, :lengths[row]].tolist(),
                                            finished=bool(finished[row]))
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return results


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, seed: int = 0, batch_size: int = 16, chat_template: bool = True,
             progress: bool = True, desc: str = "generating") -> list[str]:
    """Sample one reply per prompt (see `generate_ids`) and decode it, special tokens dropped, as text: a
    special token's string spelled out by ordinary tokens is escaped (data.escape_special_tokens), so that
    the reply, tokenised again (AfD pairs, a reward model judging it), never holds a control token."""
    generations = generate_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
                               chat_template=chat_template, progress=progress, desc=desc)
    return [data.escape_special_tokens(tokenizer, tokenizer.decode(g.response_ids, skip_special_tokens=True))
            for g in generations]
