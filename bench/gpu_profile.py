"""Why our small-model steps are slow on a GPU: tokens/s of our BT, AVA-p and DPO steps with prompt sharing on
and off, and a torch.profiler table of one step of each (where the host time goes: kernel launches, syncs).

bench/gpu_check.py found ours 0.31x (BT) and 0.09x (DPO) of TRL's tokens/s on one H200 at 135M parameters and
8 pairs a step, against 1.7-2.8x faster on the CPU. The hypothesis: per-prompt passes (ava.hidden_states' prompt
sharing runs one prompt, then its replies, per group) launch many small kernels, which a GPU pays for and a CPU
does not. This script measures it.

    python bench/gpu_profile.py --model DIR [--out DIR]      # a CUDA GPU; DIR as bench/gpu_check.py's --model
    python bench/gpu_profile.py --dry-run                    # a tiny model on the CPU: the code path only
Output: OUT/gpu_profile.json and OUT/gpu_profile.md (OUT: bench/results/gpu).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="a model directory, or config + tokenizer (random weights)")
    parser.add_argument("--out", default="", help="where gpu_profile.json and .md go")
    parser.add_argument("--dry-run", action="store_true", help="a tiny model on the CPU (the code path only)")
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--bf16", action="store_true", help="autocast to bf16 (CUDA)")
    args = parser.parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from avalib import models
    from bench import gpu_check, throughput

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        raise SystemExit("no CUDA GPU here: run with --dry-run")
    device = torch.device("cuda" if cuda else "cpu")
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp()) if args.dry_run else ROOT / "bench" / "results" / "gpu")
    out.mkdir(parents=True, exist_ok=True)
    s = gpu_check.SETTINGS["dry" if args.dry_run else "gpu"]
    model, _ = gpu_check.prepare_model(args.model, Path(tempfile.mkdtemp()), args.dry_run)
    throughput.MODEL = model
    throughput.CONFIG = {**throughput.CONFIG, "max-length": s["max_length"], "batch-size": s["batch_size"],
                         "trainable-layers": s["trainable_layers"]}
    tokenizer = models.load_tokenizer(model)
    pairs = gpu_check.synthetic_pairs(args.pairs if not args.dry_run else 8, 1, False, s["max_length"])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    rows = []
    for kind in ("bt", "ava-p", "dpo"):
        for share in (True, False):
            system = throughput.Ours(f"ours {kind}", kind, pairs, tokenizer, share_prompts=share)
            system.model.to(device)  # the losses put batches on the model's device
            if kind == "dpo":
                system.reference_lm.to(device)
            step = system.optimizer.step
            system.optimizer.step = lambda *a, _step=step, **k: (_step(*a, **k), sync())[0]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                system.epoch(seed=0)  # warm-up epoch (allocator, kernels)
                timed = system.epoch(seed=1)[1:]
                with profile(activities=activities) as prof:
                    system.epoch(seed=2)
            tokens, seconds = sum(x["tokens"] for x in timed), sum(x["seconds"] for x in timed)
            averages = prof.key_averages()
            top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
            launches = sum(e.count for e in averages if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
            syncs = sum(e.count for e in averages if "Synchronize" in e.key or e.key in ("cudaMemcpyAsync", "aten::item",
                                                                                      "aten::_local_scalar_dense"))
            row = {"kind": kind, "share_prompts": share, "timed_steps": len(timed), "tokens": tokens, "seconds": seconds,
                   "tokens_per_second": tokens / seconds, "seconds_per_step": seconds / len(timed),
                   "kernel_launches_per_epoch": launches, "matmul_calls_per_epoch": sum(
                       e.count for e in averages if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul")), "syncs_and_copies_per_epoch": syncs,
                   "steps_per_epoch": len(timed) + 1,
                   "top_self_cpu_ms": [[e.key, e.count, e.self_cpu_time_total / 1e3] for e in top]}
            rows.append(row)
            print(f"{kind} share_prompts={share}: {row['tokens_per_second']:.0f} tokens/s, {row['seconds_per_step'] * 1e3:.0f} ms/step, "
                  f"{launches} launches/epoch", flush=True)
            system = None
    result = {"dry_run": args.dry_run, "device": torch.cuda.get_device_name(0) if cuda else "CPU (dry run)",
              "torch": torch.__version__, "bf16": args.bf16, "pairs": len(pairs), "settings": s, "rows": rows}
    lines = [f"# Where a small-model step's time goes ({result['device']}{', DRY RUN' if args.dry_run else ''})", "",
             f"`python bench/gpu_profile.py` (torch {torch.__version__}, {'bf16 autocast' if args.bf16 else 'fp32'}): "
             f"{len(pairs)} synthetic pairs, {s['batch_size']} a step, max length {s['max_length']}, top "
             f"{s['trainable_layers']} layers trained; one warm-up epoch, one timed (its first step excluded), one profiled.", "",
             "| step | prompt sharing | tokens/s | ms/step | kernel launches/step | syncs + copies/step |", "|---|---|---|---|---|---|"]
    for r in rows:
        n = r["steps_per_epoch"]
        lines.append(f"| {r['kind']} | {'on' if r['share_prompts'] else 'off'} | {r['tokens_per_second']:.0f} | "
                     f"{r['seconds_per_step'] * 1e3:.0f} | {r['kernel_launches_per_epoch'] / n:.0f} | {r['syncs_and_copies_per_epoch'] / n:.0f} |")
    lines += ["", "Top host (self CPU) time in the profiled epoch, ms:", ""]
    for r in rows:
        lines.append(f"- {r['kind']}, sharing {'on' if r['share_prompts'] else 'off'}: " +
                     "; ".join(f"{k} x{c} {ms:.0f}" for k, c, ms in r["top_self_cpu_ms"][:6]))
    (out / "gpu_profile.json").write_text(json.dumps(result, indent=1))
    (out / "gpu_profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
