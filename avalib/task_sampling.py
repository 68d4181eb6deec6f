"""Sampling the built-in task's replies from a model, and the cache of tasks sampled from other models.

The shipped task (avalib/shipped_task.py) was sampled by `sample_records`; `python -m avalib.task --rebuild SIZE`
samples it again. A task asked of another local model is sampled once and cached under
avalib.models.cache_dir()/task/<size>-<key>/task.json, <key> hashing everything the samples depend on; the
entry holds the sha256 of its content, checked on every read (`read_cache`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import tempfile
from pathlib import Path

from avalib import generation, models
from avalib.task_prompts import STEERING

TASK_FORMAT_VERSION = 1  # bump when the prompts' formatting or the cached records change meaning
LABEL_FIELDS = ("pairing", "gold", "bt_temperature")  # TaskConfig fields applied on load: not in the cache key


def model_fingerprint(model_path: str | Path) -> dict:
    """What identifies a local model directory for the cache key: its name, config.json's content
    and its weight files' names, sizes and modification times (hashing 0.5 GB would cost seconds)."""
    path = Path(model_path)
    if not path.is_dir():
        raise ValueError(f"task data is sampled from a local model directory (no network); {model_path!r} is not one")
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"{path}: no config.json, not a model directory")
    weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf"))
    if not weights:
        raise ValueError(f"{path}: no weight files (*.safetensors, *.bin)")
    return {"name": path.name, "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest(),
            "weights": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weights]}


def build_inputs(config, model_path: str, seconds: float, **extra) -> dict:
    """What a shipped build records of how it was made: the TaskConfig, the model's files (names, sizes, config
    hash), torch, threads, Python, the CPU, the date and the sampling seconds (plus `extra`)."""
    import platform
    import time

    import torch

    fingerprint = model_fingerprint(model_path)
    cpuinfo = Path("/proc/cpuinfo")
    cpu = next((line.split(":",
                           1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")),
               None) if cpuinfo.is_file() else None
    return {"config": dataclasses.asdict(config), **extra, "format": TASK_FORMAT_VERSION,
            "model": {"name": fingerprint["name"], "config_sha256": fingerprint["config_sha256"],
                      "weights": [[name, size] for name, size, _ in fingerprint["weights"]]},
            "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "machine": platform.machine(), "cpu": cpu or platform.processor(), "date": time.strftime("%Y-%m-%d"),
            "seconds": seconds}


def cache_key(config, prompts: list[tuple[str, str]], fingerprint: dict) -> str:
    """A hash of everything the cached samples depend on."""
    sampling = {k: v for k, v in dataclasses.asdict(config).items() if k not in LABEL_FIELDS}
    payload = {"format": TASK_FORMAT_VERSION, "config": sampling, "prompts": prompts, "model": fingerprint}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def sample_records(config, prompts: list[tuple[str, str]], model_path: str, progress: bool) -> list[dict]:
    """Sample `config.samples_per_prompt` (config: a task.TaskConfig) replies to each (instruction, split) of `prompts`
    with the model at
    `model_path`, under `config`'s sampling settings and seed: the slow part of a build (minutes for the
    default size). Records without gold; a MORE_PASSES size calls it again with the next seed."""
    model, tokenizer = models.load_model(model_path)
    k = config.samples_per_prompt
    instructions = [prompt for prompt, _ in prompts]

    def context(instruction: str, j: int) -> str:  # what reply j is sampled from (v2: under a system instruction)
        steer = STEERING[j % len(STEERING)] if config.steering else ""
        messages = ([{"role": "system", "content": steer}] if steer else []) + [
            {"role": "user", "content": instruction}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # sample j of prompt i sits at i * k + j; each reply gets its own draw of the one seeded stream
    generations = generation.generate_ids(
        model, tokenizer, [context(prompt, j) for prompt in instructions for j in range(k)],
        max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
        seed=config.seed, batch_size=config.batch_size, chat_template=False, progress=progress,
        desc=f"task {config.size}: sampling {len(instructions)} prompts x {k}")
    records = []
    for i, (instruction, split) in enumerate(prompts):
        samples = generations[i * k:(i + 1) * k]
        records.append({
            "instruction": instruction,
            "prompt": generation.chat_prompt_text(tokenizer, instruction),
            "split": split,
            "responses": [tokenizer.decode(g.response_ids, skip_special_tokens=True) for g in samples],
            "n_tokens": [len(g.response_ids) for g in samples],
            "finished": [g.finished for g in samples],  # False: cut at max_new_tokens
            "steering": [j % len(STEERING) if config.steering else None for j in range(k)],
        })
    return records


def content_digest(payload: dict) -> str:
    """The sha256 of a cache entry's content (every field but "sha256" itself), as JSON with sorted keys:
    stored in the entry when written, compared when read (`read_cache`)."""
    content = {key: value for key, value in payload.items() if key != "sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def write_atomically(directory: Path, payload: dict) -> None:
    """Write payload to directory/task.json, with the sha256 of its content (`content_digest`), so that
    `directory` appears complete or not at all: the file is written in a staging directory next to it,
    flushed to disk, and the directory renamed into place (a rename within one file system is atomic).
    An entry already there is replaced."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=directory.name + ".tmp-", dir=directory.parent))
    retired = None
    try:
        staging.chmod(0o755)  # mkdtemp makes it private
        with open(staging / "task.json", "w", encoding="utf-8") as handle:
            json.dump({**payload, "sha256": content_digest(payload)}, handle, ensure_ascii=False, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        if directory.exists():  # rebuild: move the old entry aside, then swap the new one in
            retired = directory.with_name(staging.name + ".old")
            directory.rename(retired)
        try:
            staging.rename(directory)
        except OSError:
            if not (directory / "task.json").is_file():  # not "another process finished first"
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)


def read_cache(cached: Path, key: str) -> dict:
    """A cached task.json, checked when read: it must parse, hold `key` and its records, and match the
    sha256 it was written with (entries written before it was recorded carry none). A damaged entry
    is a models.CacheError naming it and the command that clears it; the next run then samples it again."""
    clear = f"clear it with: rm -r {shlex.quote(str(cached.parent))} (the next run samples the task again)"
    try:
        payload = json.loads(cached.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: malformed JSON or UTF-8, e.g. a truncated file
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise models.CacheError(f"{cached}: damaged task cache ({detail}); {clear}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("records", payload.get("passes_records")), list):
        raise models.CacheError(f"{cached}: not a task cache entry (no records); {clear}")
    if payload.get("key") != key:
        raise models.CacheError(f"{cached}: holds key {payload.get('key')!r}, expected {key!r}; {clear}")
    if "sha256" in payload and payload["sha256"] != content_digest(payload):
        raise models.CacheError(f"{cached}: damaged task cache (its content differs from what was written: sha256); "
                                f"{clear}")
    return payload
