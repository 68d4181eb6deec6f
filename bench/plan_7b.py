"""Llama-2-7b on paper: bytes per GPU for train_rm.py and train_direct.py on 1 x 80 GB and 8 x 80 GB.

    python bench/plan_7b.py      # writes bench/results/plan_7b.json, plan_7b.md and docs/scale.md's excerpt (seconds; nothing is downloaded)

Each row is `python SCRIPT --plan llama-2-7b ...` (memory_plan.memory_plan): the model is built on the meta
device (no weights), frozen / LoRA'd as the flags say, and its parameters split as FSDP2 splits them
(dim 0 over the GPUs, padded) or kept whole (DDP, one GPU). The formulas and what they leave out are
in memory_plan.memory_plan and memory_plan.activation_bytes_per_token_layer; the per-layer activation counts
are checked against autograd on CPU (tests/test_scale.py), the GPU totals are estimates, not
measurements (no GPU was available).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from avalib import cli, memory_plan  # noqa: E402
import train_direct  # noqa: E402
import train_rm  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MAX_LENGTH, ITEMS_PER_GPU = 1024, 4
SCRIPTS = {"train_rm.py": (train_rm.Args, ("ava-p", "bt")), "train_direct.py": (train_direct.Args, ("ava-p", "dpo"))}
SETUPS = [  # (GPUs, fields of the script's Args, label)
    (1, dict(trainable_layers=-1), "full fine-tuning"),
    (1, dict(trainable_layers=4), "top 4 layers (the scripts' default)"),
    (1, dict(trainable_layers=-1, lora_r=16), "LoRA r=16, all linear layers"),
    (8, dict(trainable_layers=-1, fsdp=True), "full fine-tuning, FSDP2"),
    (8, dict(trainable_layers=-1), "full fine-tuning, DDP"),
]


def fields(objective: str, gpus: int, extra: dict) -> dict:
    """The script's Args fields of one row (in the order its command line gives them)."""
    return dict(plan="llama-2-7b", plan_world_size=gpus, plan_gpu_gb=80.0, objective=objective, bf16=True,
                batch_size=ITEMS_PER_GPU * gpus, max_length=MAX_LENGTH, **extra)


def rows() -> list[dict]:
    out = []
    for gpus, extra, label in SETUPS:
        for script, (args_class, objectives) in SCRIPTS.items():
            if "lora_r" in extra and script != "train_direct.py":
                continue  # LoRA is wired into the policy scripts
            for objective in objectives:
                row = fields(objective, gpus, extra)
                args = args_class(**row)
                assert not cli.check_config(args), cli.check_config(args)
                plan = memory_plan.memory_plan(args, objective, script)
                plan.update(setup=label, command=f"python {script} {' '.join(cli.command_line(row))}")
                out.append(plan)
    return out


def table(plans: list[dict]) -> str:
    gb = lambda n: f"{n / 1e9:.1f}"
    lines = ["# Llama-2-7b on paper: memory per GPU (GB = 10^9 bytes)", "",
             "Regenerate: `python bench/plan_7b.py` (each row is `python SCRIPT --plan llama-2-7b ...`, the command in "
             "plan_7b.json). bf16 mixed precision with fp32 master weights, gradients and AdamW state; "
             f"{ITEMS_PER_GPU} pairs (or demonstrations) per GPU per step, every sequence padded to {MAX_LENGTH} tokens; "
             "2 GB assumed for the CUDA context, NCCL and allocator slack. Estimates from formulas (checked against autograd "
             "on CPU per layer), not GPU measurements.", "",
             "| GPUs | setup | script | objective | trainable (B) | params | grads | AdamW | FSDP buffers | "
             "activations, ckpt off | total, ckpt off | activations, ckpt on | total, ckpt on | max items/GPU (ckpt on) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in plans:
        b, off, on = p["bytes"], p["checkpointing_off"], p["checkpointing_on"]
        mark = lambda part: f"{gb(part['total'])}{'' if part['fits'] else ' (no)'}"
        lines.append(f"| {p['world_size']} x 80 GB | {p['setup']} | {p['script']} | {p['objective']} | "
                     f"{p['trainable_params'] / 1e9:.3f} | {gb(b['parameters'])} | {gb(b['gradients'])} | {gb(b['optimizer'])} | "
                     f"{gb(b.get('fsdp_buffers', 0))} | {gb(off['activations'] + off['autocast_copies'])} | {mark(off)} | "
                     f"{gb(on['activations'] + on['autocast_copies'])} | {mark(on)} | {on['max_items_per_gpu']} |")
    lines += ["", "(no): does not fit in 80 GB. Activations include, under bf16 autocast (DDP, one GPU), the bf16 copies "
              "of weights autograd keeps for the backward pass. 'max items/GPU' is the largest per-GPU batch that fits "
              "with activation checkpointing at this length (the scripts have no gradient accumulation: the global "
              "--batch-size is items/GPU x GPUs). Not counted: the DPO reference pass and sampling before / after "
              "training, and the final export, which gathers the full fp32 weights on every rank (27 GB) once the "
              "sharded training state is freed."]
    return "\n".join(lines) + "\n"


EXCERPT_ROWS = [  # (GPUs, setup, script, objective): the excerpt docs/scale.md shows
    (8, "full fine-tuning, FSDP2", "train_rm.py", "ava-p"), (8, "full fine-tuning, FSDP2", "train_direct.py", "ava-p"),
    (8, "full fine-tuning, FSDP2", "train_direct.py", "dpo"), (8, "full fine-tuning, DDP", "train_direct.py", "ava-p"),
    (1, "full fine-tuning", "train_direct.py", "ava-p"), (1, "top 4 layers (the scripts' default)", "train_rm.py", "ava-p"),
    (1, "LoRA r=16, all linear layers", "train_direct.py", "ava-p"), (1, "LoRA r=16, all linear layers", "train_direct.py", "dpo"),
]


def excerpt(plans: list[dict]) -> str:
    gb = lambda n: f"{n / 1e9:.0f}"
    by = {(p["world_size"], p["setup"], p["script"], p["objective"]): p for p in plans}
    lines = ["| GPUs | setup | script | objective | weights + grads + AdamW | activations (ckpt off / on) | "
             "total (ckpt off / on) | max pairs/GPU (ckpt on) |", "|---|---|---|---|---|---|---|---|"]
    for key in EXCERPT_ROWS:
        p = by[key]
        b, off, on = p["bytes"], p["checkpointing_off"], p["checkpointing_on"]
        state = b["parameters"] + b["gradients"] + b["optimizer"]
        total = lambda part: f"{gb(part['total'])}{'' if part['fits'] else ' (no)'}"
        lines.append(f"| {key[0]} x 80 GB | {key[1]} | {key[2]} | {key[3]} | {gb(state)} | "
                     f"{gb(off['activations'] + off['autocast_copies'])} / {gb(on['activations'] + on['autocast_copies'])} | "
                     f"{total(off)} / {total(on)} | {on['max_items_per_gpu']} |")
    lines.append("\n(no): over 80 GB. Every row and column: [bench/results/plan_7b.md](../bench/results/plan_7b.md).")
    return "\n".join(lines)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", action="store_true", help="rebuild the tables from plan_7b.json only")
    path = RESULTS / "plan_7b.json"
    plans = json.loads(path.read_text()) if parser.parse_args().report else rows()
    path.write_text(json.dumps(plans, indent=2) + "\n")
    (RESULTS / "plan_7b.md").write_text(table(plans))
    from bench import runner

    runner.update_page("docs/scale.md", excerpt(plans), "plan_7b")
    print(table(plans))


if __name__ == "__main__":
    main()
