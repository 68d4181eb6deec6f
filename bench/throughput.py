"""Training throughput side by side with the peer users would pick: TRL's RewardTrainer and DPOTrainer.

    python bench/throughput.py                 # measure (about an hour on 2 idle cores), then write the report
    python bench/throughput.py --report        # rebuild bench/results/throughput.md from throughput.json

One process, one configuration for everyone: SmolLM2-135M-Instruct, top 4 layers trainable (the rest
frozen), max length 512, 8 pairs a step, AdamW at lr 1e-4 (Table 1's main configuration), fp32 on
--threads CPU threads, no activation checkpointing (TRL's configs default to it; it is switched off
here so that TRL does not recompute activations ours keeps). The data: the first --pairs pairs of
hh-rlhf-harmless/train that fit in 512 tokens (so nobody cuts or drops any), the same pairs for
every system. Each system batches them its
own way: TRL in its sampler's order, padded; ours in length-grouped batches (train_loop's).

Systems:
  TRL RewardTrainer      Bradley-Terry, AutoModelForSequenceClassification (trl, benchmark-only dependency)
  ours BT                train_rm.py's step: ScalarRewardModel + ava.bradley_terry_loss
  ours AVA-p             train_rm.py's step: TQR + ava.ava_p_loss (train_direct.py's AVA-p step is the same computation)
  TRL DPOTrainer         DPO with its reference model, log-probs recomputed every step (its default)
  TRL DPOTrainer (precomputed reference)   precompute_ref_log_probs=True: one reference pass first, as ours
  ours DPO               train_direct.py's step, plus its one reference pass over the data (counted in its time)
Where ours does less work: a chosen and a rejected response share their prompt, which runs once
(ava.hidden_states); batches are length-grouped and the prompt is never padded; the full-vocabulary
terms touch response tokens only; DPO's reference log-probs are computed once, not every step.
`ours ... (no prompt sharing)` rows switch the first of these off (the model built with share_prompts=False).

Measured: every system runs --rounds epochs over the pairs, the systems interleaved round by round
(so machine load hits all alike); the first step of each round is a warm-up and not timed (in the
first round it is the step whose FLOPs are counted). A step is
forward, backward and the optimiser step (TRL: from its on_step_begin to on_step_end callback).
Tokens/s counts real tokens (no padding) of chosen and rejected sequences, prompt included for each,
which is how TRL counts them too. FLOPs: torch's FlopCounterMode over one untimed step per system,
per real token, times tokens/s (the DPO row adds its reference pass's share); MFU divides by this machine's fp32 matmul peak measured here.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.runner import busy_cpu_seconds, update_page  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless" / "train.jsonl.gz"
MODEL = None  # the embedded SmolLM2-135M-Instruct; --model (a local directory) for a smoke run
CONFIG = {"trainable-layers": 4, "max-length": 512, "batch-size": 8, "lr": 1e-4}
TARGETS = [  # (system, baseline, at least this ratio of tokens/s), from issue 7
    ("ours BT", "TRL RewardTrainer", 1.2),
    ("ours AVA-p", "TRL RewardTrainer", 1.0),
    ("ours DPO", "TRL DPOTrainer", 1.2),
    ("ours DPO", "TRL DPOTrainer (precomputed reference)", 1.2),
    ("ours AVA-p", "ours DPO", 1 / 1.05),
    ("ours AVA-p", "ours DPO (steps only)", 1 / 1.05),  # a step against a step, DPO's reference pass left out
]


def matmul_peak(threads: int, size: int = 2048, repeats: int = 10) -> float:
    """Best fp32 GFLOP/s of a (size x size) @ (size x size) matmul on `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def load_pairs(n: int | None, tokenizer, max_length: int) -> list[dict]:
    """The first n (None: all) harmless pairs whose chosen and rejected both fit in max_length tokens, uncut."""
    from avalib import data, sources

    rows, _ = sources.load_rows(str(DATA), "pairs", skip_bad=True)
    kept = []
    for row in rows:
        chosen, rejected, cut = data.encode_pair(tokenizer, row["prompt"], row["chosen"], row["rejected"], 10**6)
        if max(len(chosen["input_ids"]), len(rejected["input_ids"])) <= max_length:
            kept.append(row)
        if len(kept) == n:
            return kept
    if n is None:
        return kept
    raise SystemExit(f"{DATA}: only {len(kept)} pairs fit in {max_length} tokens, {n} asked for")


def charge_reference_pass(steps: list[dict], seconds: float, flops: float, total_tokens: int, counted: bool) -> None:
    """A DPO run's one reference pass, charged to its steps: all its time on the last step (the first
    is a warm-up, untimed), and the FLOP-counted first step's share of its FLOPs, by tokens."""
    steps[-1]["seconds"] += seconds
    steps[-1]["reference_seconds"] = seconds
    if counted:
        steps[0]["flops"] += flops * steps[0]["tokens"] / total_tokens


class Ours:
    """One of our training steps (train_rm.py's or train_direct.py's compute_loss), AdamW, our batches."""

    def __init__(self, name: str, kind: str, pairs: list[dict], tokenizer, share_prompts: bool = True):
        import torch

        import ava
        from avalib import data, models, reward_models
        import train_direct
        import train_rm

        self.name, self.kind, self.share = name, kind, share_prompts
        self.pad = tokenizer.pad_token_id
        lm, _ = models.load_model(MODEL, tokenizer=tokenizer)
        self.items = [data.encode_pair(tokenizer, p["prompt"], p["chosen"], p["rejected"], CONFIG["max-length"])[:2]
                      for p in pairs]
        self.lengths = [len(a["input_ids"]) + len(b["input_ids"]) for a, b in self.items]
        self.config = ava.AVAConfig()
        self.references = None
        if kind == "dpo":  # the frozen initial policy, as train_direct.py's reference
            self.reference_lm = copy.deepcopy(lm).eval().requires_grad_(False)
        models.freeze_layers(lm, CONFIG["trainable-layers"])
        if kind == "dpo":
            self.model = models.Policy(lm, share_prompts=share_prompts)
            self.args = train_direct.Args(objective="dpo")
            self.loss = lambda items, idx: train_direct.compute_loss(self.model, items, self.references[idx], self.args,
                                                                     self.config, self.pad)
        else:
            self.model = reward_models.build_reward_model(lm, kind, self.config, share_prompts=share_prompts)
            self.loss = lambda items, idx: train_rm.compute_loss(self.model, items, kind, self.config, self.pad)
        self.model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=CONFIG["lr"])

    def _reference_pass(self, count_flops: bool) -> tuple[float, float]:
        """DPO's reference log-probs, once per run over the data (train_direct.py does it before
        training): (seconds, FLOPs if counted)."""
        from torch.utils.flop_counter import FlopCounterMode

        import train_direct

        counter = FlopCounterMode(display=False) if count_flops else None
        started = time.perf_counter()
        with counter if counter is not None else contextlib.nullcontext():
            self.references = train_direct.reference_logprobs(self.reference_lm, self.items, self.pad, CONFIG["batch-size"])
        return time.perf_counter() - started, counter.get_total_flops() if counter is not None else 0.0

    def epoch(self, seed: int, count_flops: bool = False) -> list[dict]:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from avalib import loop

        steps = []
        if self.kind == "dpo":  # its once-per-run cost, added to the run's timed steps below
            reference_seconds, reference_flops = self._reference_pass(count_flops)
        for i, batch in enumerate(loop.length_grouped_batches(self.lengths, CONFIG["batch-size"], seed, 0)):
            items = [self.items[j] for j in batch]
            counter = FlopCounterMode(display=False) if count_flops and i == 0 else None
            started = time.perf_counter()
            with counter if counter is not None else contextlib.nullcontext():
                loss, _ = self.loss(items, torch.tensor(batch))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
            steps.append({"seconds": time.perf_counter() - started, "tokens": sum(self.lengths[j] for j in batch),
                          **({"flops": counter.get_total_flops()} if counter is not None else {})})
        if self.kind == "dpo":
            charge_reference_pass(steps, reference_seconds, reference_flops, sum(self.lengths), count_flops)
        return steps


class TRL:
    """TRL's RewardTrainer or DPOTrainer on the same pairs; steps timed by a callback. kind "dpo-pre" is
    DPOTrainer with precompute_ref_log_probs=True: one reference pass before training, as ours does,
    timed (and FLOP-counted) and charged to the run like ours."""

    use_cpu, bf16 = True, False  # here: fp32 on the CPU (bench/gpu_check.py sets them for a GPU and bf16)

    def __init__(self, name: str, kind: str, pairs: list[dict], tokenizer, workdir: Path):
        import datasets
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback

        from avalib import models

        self.name, self.kind, self.tokenizer, self.workdir = name, kind, tokenizer, workdir
        self.dataset = datasets.Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
        path = models.resolve_model_path(MODEL)
        if kind == "bt":
            self.model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
            self.model.config.pad_token_id = tokenizer.pad_token_id
        else:
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        models.freeze_layers(self.model, CONFIG["trainable-layers"])
        if kind == "bt":
            self.model.score.requires_grad_(True)
        self.steps: list[dict] = []
        outer = self

        class Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                outer._started = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                outer.steps[-1]["seconds"] = time.perf_counter() - outer._started

        self.callback = Timer()

    def epoch(self, seed: int, count_flops: bool = False) -> list[dict]:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

        common_args = dict(output_dir=str(self.workdir / self.kind), max_length=CONFIG["max-length"],
                           per_device_train_batch_size=CONFIG["batch-size"], learning_rate=CONFIG["lr"], num_train_epochs=1,
                           seed=seed, logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=self.use_cpu, bf16=self.bf16,
                           disable_tqdm=True, dataloader_num_workers=0,
                           gradient_checkpointing=False)  # TRL defaults to True; ours does not recompute, so neither does TRL
        reference = {"seconds": 0.0, "flops": 0.0}

        class TimedDPOTrainer(DPOTrainer):  # times the one reference pass precompute_ref_log_probs makes
            def _precompute_ref_logps(self, *args, **kwargs):
                counter = FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
                started = time.perf_counter()
                with counter:
                    out = super()._precompute_ref_logps(*args, **kwargs)
                reference["seconds"] += time.perf_counter() - started
                reference["flops"] += counter.get_total_flops() if count_flops else 0.0
                return out

        if self.kind == "bt":
            trainer = RewardTrainer(model=self.model, args=RewardConfig(**common_args), train_dataset=self.dataset,
                                    processing_class=self.tokenizer, callbacks=[self.callback])
        else:
            trainer = TimedDPOTrainer(model=self.model, train_dataset=self.dataset, processing_class=self.tokenizer,
                                      args=DPOConfig(**common_args, beta=0.1, precompute_ref_log_probs=self.kind == "dpo-pre"),
                                      callbacks=[self.callback])
        if len(trainer.train_dataset) != len(self.dataset):
            raise SystemExit(f"{self.name} dropped {len(self.dataset) - len(trainer.train_dataset)} pairs: not the same data")
        self.steps = []
        inner_step = trainer.training_step

        def training_step(model, inputs, *args, **kwargs):
            masks = [v for k, v in inputs.items() if k.endswith("attention_mask")]
            self.steps.append({"tokens": sum(int(m.sum()) for m in masks), "positions": sum(m.numel() for m in masks)})
            if count_flops and len(self.steps) == 1:
                counter = FlopCounterMode(display=False)
                with counter:
                    out = inner_step(model, inputs, *args, **kwargs)
                self.steps[-1]["flops_forward_backward"] = counter.get_total_flops()
                return out
            return inner_step(model, inputs, *args, **kwargs)

        trainer.training_step = training_step
        torch.manual_seed(seed)
        trainer.train()
        for step in self.steps:  # the optimiser step is outside training_step; its FLOPs are negligible
            if "flops_forward_backward" in step:
                step["flops"] = step.pop("flops_forward_backward")
        if self.kind == "dpo-pre":  # charged like ours DPO's
            charge_reference_pass(self.steps, reference["seconds"], reference["flops"],
                                  sum(s["tokens"] for s in self.steps), count_flops)
        return self.steps


def measure(args) -> dict:
    import torch

    from avalib import models

    torch.set_num_threads(args.threads)
    peak = matmul_peak(args.threads)
    tokenizer = models.load_tokenizer(MODEL)
    pairs = load_pairs(args.pairs, tokenizer, CONFIG["max-length"])
    workdir = Path(tempfile.mkdtemp(prefix="ava-throughput-"))
    systems = [TRL("TRL RewardTrainer", "bt", pairs, tokenizer, workdir),
               Ours("ours BT", "bt", pairs, tokenizer),
               Ours("ours AVA-p", "ava-p", pairs, tokenizer),
               TRL("TRL DPOTrainer", "dpo", pairs, tokenizer, workdir),
               TRL("TRL DPOTrainer (precomputed reference)", "dpo-pre", pairs, tokenizer, workdir),
               Ours("ours DPO", "dpo", pairs, tokenizer)]
    if args.ablation:
        systems += [Ours("ours BT (no prompt sharing)", "bt", pairs, tokenizer, share_prompts=False),
                    Ours("ours AVA-p (no prompt sharing)", "ava-p", pairs, tokenizer, share_prompts=False)]
    runs = {s.name: [] for s in systems}
    flops = {}
    busy, wall = busy_cpu_seconds(), time.perf_counter()
    own = time.process_time()
    for round_ in range(args.rounds):
        for system in systems:
            steps = system.epoch(seed=round_, count_flops=round_ == 0)  # FLOPs counted in the first, untimed step
            if round_ == 0:
                flops[system.name] = steps[0]["flops"] / steps[0]["tokens"]
            timed = steps[1:]  # the first step of each round warms up
            runs[system.name].append({"seconds": sum(s["seconds"] for s in timed), "tokens": sum(s["tokens"] for s in timed),
                                      "steps": len(timed), "reference_seconds": sum(s.get("reference_seconds", 0.0) for s in timed),
                                      "positions": sum(s.get("positions", 0) for s in timed)})
            print(f"round {round_ + 1} {system.name}: {runs[system.name][-1]['tokens'] / runs[system.name][-1]['seconds']:.0f} "
                  "tokens/s", flush=True)
    wall = time.perf_counter() - wall
    other = max(0.0, busy_cpu_seconds() - busy - (time.process_time() - own)) / (wall * os.cpu_count())
    results = []
    for name, rounds in runs.items():
        per_round = [r["tokens"] / r["seconds"] for r in rounds]
        tokens_per_second = sum(r["tokens"] for r in rounds) / sum(r["seconds"] for r in rounds)
        steps_only = sum(r["tokens"] for r in rounds) / sum(r["seconds"] - r["reference_seconds"] for r in rounds)
        results.append({"system": name, "tokens_per_second": tokens_per_second, "per_round": per_round,
                        "tokens_per_second_steps_only": steps_only,
                        "padding": 1 - sum(r["tokens"] for r in rounds) / sum(r["positions"] for r in rounds)
                        if rounds[0]["positions"] else None,
                        "flops_per_token": flops[name], "gflops_per_second": flops[name] * tokens_per_second / 1e9,
                        "mfu": flops[name] * tokens_per_second / 1e9 / peak,
                        "tokens_per_round": rounds[0]["tokens"], "timed_steps_per_round": rounds[0]["steps"]})
    import trl

    return {"config": {**CONFIG, "pairs": len(pairs), "rounds": args.rounds, "threads": args.threads,
                       "torch": torch.__version__, "trl": trl.__version__, "cpus": os.cpu_count()},
            "matmul_peak_gflops": peak, "other_processes_cpu_share": other, "wall_seconds": wall, "results": results}


def epoch_layout(seed: int = 0) -> dict:
    """Positions the transformer body runs per real token over one whole epoch of harmless train (the
    pairs that fit in max length uncut, which is what TRL keeps), no training: TRL's from its own
    RewardTrainer dataloader (chosen and rejected padded together to the batch's longest), ours as
    prompt sharing runs each pair whatever batch it is in (the prompt once, then both responses
    padded to the longer; see ava.hidden_states). Real tokens count the prompt once per
    sequence, as tokens/s does, so a shared prompt can take ours below 1."""
    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from avalib import data, models

    tokenizer = models.load_tokenizer(MODEL)
    pairs = load_pairs(None, tokenizer, CONFIG["max-length"])
    model = AutoModelForSequenceClassification.from_pretrained(models.resolve_model_path(MODEL), num_labels=1,
                                                               dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    with tempfile.TemporaryDirectory() as workdir:
        trainer = RewardTrainer(model=model, processing_class=tokenizer,
                                train_dataset=datasets.Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")}
                                                                          for p in pairs]),
                                args=RewardConfig(output_dir=workdir, max_length=CONFIG["max-length"], seed=seed,
                                                  per_device_train_batch_size=CONFIG["batch-size"], report_to=[],
                                                  use_cpu=True, bf16=False))
        if len(trainer.train_dataset) != len(pairs):
            raise SystemExit(f"TRL dropped {len(pairs) - len(trainer.train_dataset)} of the pairs that fit: not the same data")
        trl_tokens = trl_positions = 0
        for batch in trainer.get_train_dataloader():
            masks = [v for k, v in batch.items() if k.endswith("attention_mask")]
            trl_tokens += sum(int(m.sum()) for m in masks)
            trl_positions += sum(m.numel() for m in masks)
    ours_tokens = ours_positions = 0
    for p in pairs:
        chosen, rejected, _ = data.encode_pair(tokenizer, p["prompt"], p["chosen"], p["rejected"], CONFIG["max-length"])
        prompt = chosen["prompt_length"]  # the same for rejected: one shared, identically cut prompt
        ours_tokens += len(chosen["input_ids"]) + len(rejected["input_ids"])
        ours_positions += prompt + 2 * (max(len(chosen["input_ids"]), len(rejected["input_ids"])) - prompt)
    return {"pairs": len(pairs), "seed": seed,
            "trl": {"tokens": trl_tokens, "positions": trl_positions, "padding": 1 - trl_tokens / trl_positions},
            "ours": {"tokens": ours_tokens, "positions": ours_positions}}


def report(data: dict) -> str:
    by = {r["system"]: r for r in data["results"]}
    for r in data["results"]:
        if "tokens_per_second_steps_only" in r and r["system"].startswith("ours DPO"):
            by[f"{r['system']} (steps only)"] = {"tokens_per_second": r["tokens_per_second_steps_only"]}
    c = data["config"]
    lines = ["# Training throughput: ours vs TRL, side by side in one process", "",
             f"Regenerate: `python bench/throughput.py` (TRL {c['trl']}, a benchmark-only dependency: "
             "`pip install trl==1.16.0`). SmolLM2-135M-Instruct, top "
             f"{c['trainable-layers']} layers trainable, max length {c['max-length']}, {c['batch-size']} pairs a step, "
             f"AdamW lr {c['lr']}, fp32, no activation checkpointing (TRL's default of it switched off), {c['threads']} threads, torch {c['torch']}; the first {c['pairs']} "
             f"hh-rlhf-harmless train pairs that fit uncut; {c['rounds']} interleaved epochs per system, warm-up step "
             f"excluded. fp32 matmul peak measured here: {data['matmul_peak_gflops']:.0f} GFLOP/s. Other processes took "
             f"{100 * data['other_processes_cpu_share']:.0f}% of the machine's CPU during the run ({data['wall_seconds'] / 60:.0f} min).",
             "", "| system | real tokens/s | per epoch | steps only | padding | MFLOP per token | GFLOP/s | MFU |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        only = r.get("tokens_per_second_steps_only", r["tokens_per_second"])
        only = f"{only:.0f}" if abs(only - r["tokens_per_second"]) > 0.5 else "="
        padding = "-" if r.get("padding") is None else f"{100 * r['padding']:.0f}%"
        lines.append(f"| {r['system']} | {r['tokens_per_second']:.0f} | {' / '.join(f'{x:.0f}' for x in r['per_round'])} | {only} | "
                     f"{padding} | "
                     f"{r['flops_per_token'] / 1e6:.0f} | {r['gflops_per_second']:.0f} | {100 * r['mfu']:.0f}% |")
    lines += ["", "| target (issue 7) | ratio of tokens/s | met |", "|---|---|---|"]
    for system, baseline, at_least in TARGETS:
        if system in by and baseline in by:
            ratio = by[system]["tokens_per_second"] / by[baseline]["tokens_per_second"]
            lines.append(f"| {system} >= {at_least:.2f} x {baseline} | {ratio:.2f} | {'yes' if ratio >= at_least else 'no'} |")
    lines += ["", "Steps only: the DPO rows without their one reference pass (the other rows have none: '='). "
              "Padding: the share of the positions in TRL's batches that are padding (ours groups by length and "
              "never pads a prompt; '-')."]
    if "epoch_layout" in data:
        e = data["epoch_layout"]
        lines += ["", f"Over one whole epoch (the {e['pairs']} harmless train pairs that fit in {c['max-length']} tokens "
                  "uncut; batches only, no training: `python bench/throughput.py --layout`), the transformer body runs "
                  f"{e['trl']['positions'] / e['trl']['tokens']:.2f} positions per real token in TRL's batches "
                  f"({100 * e['trl']['padding']:.0f}% of them padding) and {e['ours']['positions'] / e['ours']['tokens']:.2f} "
                  "in ours (a shared prompt runs once, but counts once per sequence among the real tokens)."]
    lines += ["", "MFLOP per token: the FLOPs torch's FlopCounterMode counts in one step "
              "(forward and backward) per real token, so less work per token shows there; MFU = GFLOP/s / the matmul peak. "
              "Only matmuls are counted: torch's CPU attention kernel has no FLOP formula, for any system, so MFU is a "
              "slight underestimate for all."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=48, help="pairs per epoch (6 steps of 8, the first untimed)")
    parser.add_argument("--rounds", type=int, default=2, help="timed epochs per system, interleaved")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--no-ablation", dest="ablation", action="store_false", help="skip the no-prompt-sharing rows")
    parser.add_argument("--report", action="store_true", help="only rebuild the Markdown from throughput.json")
    parser.add_argument("--layout", action="store_true",
                        help="only count one whole epoch's padding and positions (a minute), added to throughput.json")
    parser.add_argument("--out", default=str(RESULTS / "throughput.json"))
    parser.add_argument("--model", default=None, help="a local model directory instead of SmolLM2 (smoke runs)")
    args = parser.parse_args()
    global MODEL
    MODEL = args.model
    path = Path(args.out)
    data = json.loads(path.read_text()) if args.report or args.layout else measure(args)
    if args.layout:
        data["epoch_layout"] = epoch_layout()
    if not args.report:
        path.write_text(json.dumps(data, indent=2) + "\n")
    text = report(data)
    if path == RESULTS / "throughput.json":
        (RESULTS / "throughput.md").write_text(text)
        update_page("docs/scale.md", "\n".join(text.splitlines()[2:]), "throughput")
    print(text)


if __name__ == "__main__":
    main()
