"""Memory and time of one training step: AVA-p as ava.py computes it, against a naive AVA-p that
materialises the full (B, T, V) logits, and against DPO, at SmolLM2's vocabulary (49152) and at a
128k one (128256, Llama 3's).

    python bench/memory.py                  # every measurement, each in a fresh process (~5 min on a busy machine)
    python bench/memory.py --report         # rebuild bench/results/memory.md (and docs/scale.md's copy) from memory.json

The model: SmolLM2's shape (hidden 576, intermediate 1536, 9 heads, 3 key/value heads, tied
embeddings), 4 layers instead of 30, random weights; everything trains (AdamW). The batch: 4
preference pairs (8 sequences of 128 tokens, 32 of prompt, 96 of response), as train_direct.py
feeds them (chosen and rejected in one forward).

Methods, all with the same model, batch and optimiser:
  ava-p  TQR + ava.ava_p_loss: Eq. 12-14 only on the N trained transitions, in checkpointed chunks
         of `vocab_chunk` (512) transitions (ava.gather_token_terms).
  naive  the same heads and loss, but Q from the full logits: logits (B, T, V) -> softmax ->
         log_softmax(alpha * p) (Eq. 12) over every position, then gathered. Written here, not in ava.py.
  dpo    ava.token_logprobs (the same chunked gather of log pi) + ava.dpo_loss against fixed reference
         log-probs (train_direct.py precomputes them once).

What is measured, per method, in a fresh process (so no allocator state carries over), after one
warm-up step (AdamW's state exists, so it is in the baseline of every method alike):
  peak RSS increase   the process's peak resident memory during one step (forward, backward, AdamW)
                      minus its resident memory just before it. Linux's VmHWM is reset with
                      /proc/self/clear_refs, and glibc is told to return every block >= 64 KiB to the
                      system on free (MALLOC_MMAP_THRESHOLD_), so resident memory follows the live
                      tensors instead of the allocator's cache. torch has no allocator statistics on
                      CPU, and tracemalloc does not see its allocations.
  saved for backward  the bytes of every tensor autograd keeps from forward to backward (each storage
                      once, parameters excluded): the part that grows with the batch.
  seconds per step    mean of 2 steps after the measured one: wall time, and the CPU time of the process
                      (all its threads), which other processes on a shared machine disturb less; the
                      share of the machine's CPU that other processes took meanwhile is recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.runner import busy_cpu_seconds  # noqa: E402

RESULTS = ROOT / "bench" / "results"
VOCABS = (49152, 128256)
METHODS = ("ava-p", "naive", "dpo")
SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=9, num_key_value_heads=3,
             max_position_embeddings=512, tie_word_embeddings=True)
PAIRS, LENGTH, PROMPT = 4, 128, 32
THREADS = 1  # one thread: CPU time per step is then steady on a shared machine (no OpenMP spinning)
TIMED_STEPS = 2


def status_kib(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def naive_forward(model, input_ids, attention_mask, response_mask):
    """TQR's forward with Eq. 12 computed the obvious way: full (B, T, V) logits at every position."""
    import torch.nn.functional as F

    import ava

    cfg = model.config
    response = response_mask.bool()
    hidden = ava.hidden_states(model.lm, input_ids, attention_mask)  # (B, T, d)
    mask = response[:, 1:]
    read = response.clone()
    read[:, :-1] |= mask
    weights = model.weighting(hidden, read, literal=cfg.reward_weighting == "literal")  # (B, T)
    raw = model.reward_head(hidden).float()
    mu = weights * raw[..., 0]
    sigma = weights * F.softplus(raw[..., 1]) + cfg.sigma_min
    logits = model.lm.get_output_embeddings()(hidden).float()  # (B, T, V)
    q_all = (cfg.alpha * logits.softmax(dim=-1)).log_softmax(dim=-1)  # (B, T, V): Eq. 12 everywhere
    q = q_all[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1) * weights[:, :-1] * mask  # (B, T-1)
    return ava.TQROutput(q_taken=q, q_logprob=q, mu=mu[:, 1:].masked_fill(~mask, 0.0),
                         sigma=sigma[:, 1:].masked_fill(~mask, 1.0), mask=mask, weights=weights)


def measure(method: str, vocab: int) -> dict:
    """One method at one vocabulary size, in this (fresh) process."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import ava

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **SHAPE))
    model = ava.TQR(lm, ava.AVAConfig()) if method != "dpo" else lm  # heads as initialised for training
    model.train()
    generator = torch.Generator().manual_seed(1)
    rows = 2 * PAIRS
    input_ids = torch.randint(3, vocab, (rows, LENGTH), generator=generator)
    attention_mask = torch.ones(rows, LENGTH, dtype=torch.long)
    response_mask = torch.zeros(rows, LENGTH, dtype=torch.bool)
    response_mask[:, PROMPT:] = True
    batch = (input_ids, attention_mask, response_mask)
    with torch.no_grad():
        reference = ava.token_logprobs(lm, *batch).sum(dim=1) - 0.1  # (rows,) fixed, as train_direct precomputes

    def loss_fn():
        if method == "dpo":
            logp = ava.token_logprobs(lm, *batch).sum(dim=1)
            return ava.dpo_loss(logp[:PAIRS], logp[PAIRS:], reference[:PAIRS], reference[PAIRS:])[0]
        out = model(*batch) if method == "ava-p" else naive_forward(model, *batch)
        return ava.ava_p_loss(ava.take_rows(out, slice(0, PAIRS)), ava.take_rows(out, slice(PAIRS, rows)), model.config)[0]

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    step()  # warm-up: AdamW's state, one-time allocations
    optimizer.zero_grad(set_to_none=True)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        if tensor.device.type == "cpu" and tensor.untyped_storage().data_ptr() not in parameters:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    rss_before = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    started = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn()
    loss.backward()
    optimizer.step()
    first_seconds = time.perf_counter() - started
    peak = status_kib("VmHWM")
    times, cpu_times = [], []
    for _ in range(TIMED_STEPS):
        started, cpu_started = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
    n_trained = int(response_mask[:, 1:].sum())
    return {"method": method, "vocab": vocab, "loss": float(loss), "peak_rss_increase_bytes": (peak - rss_before) * 1024,
            "rss_before_bytes": rss_before * 1024, "saved_for_backward_bytes": sum(storages.values()),
            "step_seconds": sum(times) / len(times), "step_seconds_each": times, "measured_step_seconds": first_seconds,
            "step_cpu_seconds": sum(cpu_times) / len(cpu_times), "step_cpu_seconds_each": cpu_times,
            "trained_transitions": n_trained, "full_logits_bytes": rows * LENGTH * vocab * 4}


def run_all() -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(THREADS))
    results = []
    for vocab in VOCABS:
        for method in METHODS:  # side by side: the three methods of one vocabulary run back to back
            busy, wall = busy_cpu_seconds(), time.perf_counter()
            children = os.times()
            done = subprocess.run([sys.executable, __file__, "--measure", method, str(vocab)], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=1200)
            if done.returncode != 0:
                raise SystemExit(f"{method} at V={vocab} failed:\n{done.stderr[-3000:]}")
            wall = time.perf_counter() - wall
            own = sum(os.times()[2:4]) - sum(children[2:4])
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result["other_processes_cpu_share"] = max(0.0, busy_cpu_seconds() - busy - own) / (wall * os.cpu_count())
            result["load_average_at_end"] = os.getloadavg()[0]
            results.append(result)
            print(f"V={vocab} {method}: peak +{result['peak_rss_increase_bytes'] / 2**30:.2f} GiB, saved "
                  f"{result['saved_for_backward_bytes'] / 2**30:.3f} GiB, {result['step_seconds']:.2f} s/step "
                  f"({result['step_cpu_seconds']:.2f} CPU s), "
                  f"loss {result['loss']:.5f}, other CPU use {100 * result['other_processes_cpu_share']:.0f}%", flush=True)
    import torch

    return {"config": {**SHAPE, "pairs": PAIRS, "length": LENGTH, "prompt": PROMPT, "threads": THREADS,
                       "timed_steps": TIMED_STEPS, "torch": torch.__version__, "cpus": os.cpu_count()},
            "results": results}


def report(data: dict) -> str:
    gib = lambda n: f"{n / 2**30:.2f}"
    by = {(r["vocab"], r["method"]): r for r in data["results"]}
    c = data["config"]
    lines = ["# One training step: AVA-p (chunked) vs naive full-logits AVA-p vs DPO", "",
             f"Regenerate: `python bench/memory.py`. Model: SmolLM2's shape (hidden {c['hidden_size']}, intermediate "
             f"{c['intermediate_size']}, {c['num_attention_heads']} heads / {c['num_key_value_heads']} key-value heads, tied "
             f"embeddings), {c['num_hidden_layers']} layers, random weights, every parameter trained with AdamW. Batch: "
             f"{c['pairs']} pairs = {2 * c['pairs']} sequences x {c['length']} tokens ({c['prompt']} prompt + "
             f"{c['length'] - c['prompt']} response). torch {c['torch']}, {c['threads']} thread{'s' if c['threads'] > 1 else ''}, one fresh "
             "process per cell.",
             "",
             "| vocabulary | method | peak RSS increase (GiB) | saved for backward (GiB) | s / step | CPU s / step | "
             "peak vs AVA-p | CPU time vs AVA-p | other CPU use |",
             "|---|---|---|---|---|---|---|---|---|"]
    for vocab in sorted({r["vocab"] for r in data["results"]}):
        base = by[(vocab, "ava-p")]
        for method in METHODS:
            r = by[(vocab, method)]
            lines.append(f"| {vocab} | {method} | {gib(r['peak_rss_increase_bytes'])} | {gib(r['saved_for_backward_bytes'])} | "
                         f"{r['step_seconds']:.2f} | {r['step_cpu_seconds']:.2f} | "
                         f"{r['peak_rss_increase_bytes'] / base['peak_rss_increase_bytes']:.2f}x | "
                         f"{r['step_cpu_seconds'] / base['step_cpu_seconds']:.2f}x | {100 * r['other_processes_cpu_share']:.0f}% |")
    checks = []
    for vocab in sorted({r["vocab"] for r in data["results"]}):
        a, n, d = by[(vocab, "ava-p")], by[(vocab, "naive")], by[(vocab, "dpo")]
        checks.append(f"V={vocab}: one (B, T, V) fp32 tensor is {gib(a['full_logits_bytes'])} GiB; naive and chunked "
                      f"AVA-p losses agree to {abs(a['loss'] - n['loss']):.1e}; AVA-p / DPO: peak "
                      f"{a['peak_rss_increase_bytes'] / d['peak_rss_increase_bytes']:.2f}x, saved "
                      f"{a['saved_for_backward_bytes'] / d['saved_for_backward_bytes']:.2f}x, CPU time "
                      f"{a['step_cpu_seconds'] / d['step_cpu_seconds']:.2f}x, wall time {a['step_seconds'] / d['step_seconds']:.2f}x.")
    lines += ["", *[f"- {c}" for c in checks], "",
              "Peak RSS increase: the process's peak resident memory during one step (forward, backward, AdamW) minus "
              "its resident memory just before (VmHWM reset through /proc/self/clear_refs; glibc returns blocks >= 64 KiB "
              "on free, so resident memory follows live tensors). It includes the gradients (the same for every method) "
              "and every transient tensor. Saved for backward: what autograd keeps between forward and backward (each "
              "storage once, parameters excluded). s / step and CPU s / step: wall and process CPU time, mean of "
              f"{c['timed_steps']} steps; other CPU use: the share of the machine's CPU time other processes took meanwhile "
              "(the machine was shared: CPU time is the steadier figure; a vocabulary's three methods ran back to back)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", nargs=2, metavar=("METHOD", "VOCAB"), help=argparse.SUPPRESS)
    parser.add_argument("--report", action="store_true", help="rebuild memory.md from memory.json")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], int(args.measure[1]))))
        return
    path = RESULTS / "memory.json"
    data = json.loads(path.read_text()) if args.report else run_all()
    if not args.report:
        path.write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / "memory.md").write_text(report(data))
    from bench import runner

    runner.update_page("docs/scale.md", "\n".join(report(data).splitlines()[2:]), "memory")
    print(report(data))


if __name__ == "__main__":
    main()
