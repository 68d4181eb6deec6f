"""Screening our AVA-p variants (ava.PRESETS, and EXTRA below) against the faithful AVA-p, on task v2's dev split.

Each row trains AVA-p with train_rm.py under one short budget (SCREEN: bench/token_rewards.py's
configuration cut at --max-steps), then is scored on the dev split only (the test split is for the
finalists, bench/token_rewards.py): accuracy against the gold labels (Wilson 95%, and a bootstrap
interval over the dev split's requests, whose 15 pairs each share replies), paired with the faithful AVA-p
on the same pairs (avalib/stats.py: the difference in accuracy points, ties half, a bootstrap interval and a
sign-flip test over requests), and its token rewards against the gold (avalib/token_metrics.py, bootstrap
intervals over replies). Seed 0 screens every variant; the finalists (and the faithful AVA-p beside them)
run seeds 1 and 2 too, each paired with the faithful AVA-p of the same seed, and all seeds averaged pair by
pair against the faithful AVA-p's.

    python bench/variants.py --rows "paper,return-cer,centred-td-return"   # train what is missing
    python bench/variants.py --rows "paper,mu-weights" --seeds 1,2          # the finalists' other seeds
    python bench/variants.py --rows "wo-neg-paper,wo-eq12,scaled-alpha10"  # the EXTRA rows
    python bench/variants.py --report                                     # rebuild the table only
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ava  # noqa: E402
from avalib import cli, models, stats  # noqa: E402
from bench import runner, table1, token_rewards  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "variants"
SCREEN = {**token_rewards.CONFIG, "max-steps": 100, "objective": "ava-p", "seed": 0}
# rows beyond the presets, screened the same way (train_rm.py flags): the paper's own reading of w/o neg
# (AVA-d on y+ plus CER), a w/o ptq control that keeps the pretrained head but not Eq. 12's map, and alpha
# and beta raised together with the prior widened to the TD error's spread (delta_t ~ alpha * (pi_t -
# pi_t+1), standard deviation ~0.45 at alpha = 1, so ~4.5 at alpha = 10)
EXTRA = {
    "wo-neg-paper": {"ablate": "w/o neg (AVA-d + CER)"},
    "wo-eq12": {"ablate": "w/o eq12"},
    "scaled-alpha10": {"alpha": 10.0, "beta": 10.0, "prior-sigma": 5.0},
}
ROWS = [*ava.PRESETS, *EXTRA]


def flags_of(row: str) -> dict:
    return {"preset": row} if row in ava.PRESETS else EXTRA[row]


def config_of(row: str) -> dict:
    """What a row changes in ava.AVAConfig, as field=value (read through the scripts' own AVAFlags.ava_config)."""
    import dataclasses

    argv = [item for k, v in flags_of(row).items() for item in (f"--{k}", str(v))]
    config, default = cli.parse_config(cli.AVAFlags, argv).ava_config(), ava.AVAConfig()
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if getattr(config, f.name) != getattr(default, f.name)}


def arguments(preset: str, seed: int = 0) -> list[str]:
    flags = {**SCREEN, **flags_of(preset), "seed": seed}
    return ["--data", "builtin", "--eval-data", "builtin:gold", "--eval-split", "dev"] + [
        item for k, v in flags.items() for item in (f"--{k}", str(v))]


def result_path(preset: str, seed: int) -> Path:
    return RESULTS / (f"{preset}.json" if seed == 0 else f"{preset}-seed{seed}.json")


def run(preset: str, seed: int = 0) -> dict:
    args = arguments(preset, seed)
    key = hashlib.sha256(json.dumps(args).encode()).hexdigest()[:12]
    path = result_path(preset, seed)
    if path.is_file() and json.loads(path.read_text()).get("key") == key:
        return json.loads(path.read_text())
    output_dir = models.cache_dir() / "bench-runs" / "variants" / f"{path.stem}-{key}"
    measured = runner.train_once([sys.executable, str(ROOT / "train_rm.py"), *args], output_dir, save_every=50)
    from avalib import reward_models

    final = json.loads((output_dir / "final.json").read_text())
    model, tokenizer, _ = reward_models.load_reward_model(output_dir / "model")
    result = {"preset": preset, "seed": seed, "config": config_of(preset), "key": key,
              "command": "python train_rm.py " + " ".join(args), **measured,
              "dev": runner.dev_metrics(final),
              "dev_margins": json.loads((output_dir / "eval_margins.json").read_text())["margins"],
              "tokens_dev": token_rewards.token_table(model, tokenizer, "dev", SCREEN["max-length"])}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def report(requests=None) -> None:
    """Rebuild bench/results/variants.md and the docs block (requests: each dev pair's request, default the task's)."""
    every = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    requests = table1.requests_of("default", "dev") if requests is None and every else requests
    results = {r["preset"]: r for r in every if r.get("seed", 0) == 0}
    paper = results.get("paper")
    cell = token_rewards.cell
    lines = ["| preset | what it changes | dev accuracy % (Wilson 95%) | 95% by request | vs paper, paired: difference (95%), "
             "p, +/- | token Pearson | Pearson, gold-bearing tokens | AUC +/- tokens | returns-to-go Pearson | per-word Pearson |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in sorted(results.items(), key=lambda item: item[0] != "paper"):
        t, d = r["tokens_dev"], r["dev"]
        paired = "-"
        if paper is not None and name != "paper":
            paired = table1.describe(stats.paired(r["dev_margins"], paper["dev_margins"], requests))
        change = ", ".join(f"{k}={v}" for k, v in r["config"].items()) or "(the faithful objective)"
        lines.append(f"| {name} | {change} | {cell(d['accuracy'], d['accuracy_wilson95'], True)} | "
                     f"{token_rewards.interval_cell(stats.accuracy_interval(r['dev_margins'], requests)['ci95'])} | {paired} | "
                     f"{cell(t['pearson'], t['pearson_ci95'])} | {cell(t['pearson_nonzero'], t['pearson_nonzero_ci95'])} | "
                     f"{cell(t['auc'], t['auc_ci95'])} | {cell(t['return_to_go_pearson'], t['return_to_go_pearson_ci95'])} | "
                     f"{cell(t['word_pearson'], t['word_pearson_ci95'])} |")
    any_run = next(iter(results.values()), None)
    notes = [f"Task v2's dev split: {any_run['dev']['pairs']} pairs of {len(set(requests))} requests (gold labels), "
             f"{any_run['tokens_dev']['replies']} replies; budget: {SCREEN['max-steps']} steps of {SCREEN['batch-size']} pairs, "
             f"seed 0, top {SCREEN['trainable-layers']} layers, lr {SCREEN['lr']}. Paired (avalib/stats.py): the difference "
             "in dev accuracy points (ties half, as accuracy counts them); its 95% interval and p resample and sign-flip "
             "whole requests (a request's 15 pairs share its 6 replies); then + / - the pairs this row scores higher / lower. "
             f"Task build: {table1.task_builds(every)} (every build has the same requests and pairs in the same order). "
             "Regenerate: `python bench/variants.py --report`." if any_run else ""]
    text = "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n" + seeds_table(every, requests)
    (ROOT / "bench" / "results" / "variants.md").write_text(text)
    runner.update_page("docs/train_rm.md", text, "variants", heading_level=4)
    print(text)


def seeds_table(every: list[dict], requests=None) -> str:
    """The presets run with more than one seed: each seed's dev accuracy and token Pearson, paired with the
    faithful AVA-p of the same seed, and all seeds averaged pair by pair against the faithful AVA-p's seeds
    (stats.paired, clustered by `requests`)."""
    by = {}
    for r in every:
        by.setdefault(r["preset"], {})[r.get("seed", 0)] = r
    several = [name for name, runs in by.items() if len(runs) > 1]
    if not several:
        return ""
    lines = ["", "Seeds (the same budget; each run paired with the faithful AVA-p of its seed, then the seeds averaged pair by "
             "pair on both sides, by request as above):", "",
             "| preset | seeds | dev accuracy % by seed | mean | seeds averaged, 95% by request | vs paper by seed: difference "
             "(p) | vs paper, seeds averaged: difference (95%), p, +/- | token Pearson by seed | mean |",
             "|---|---|---|---|---|---|---|---|---|"]
    paper = by.get("paper", {})
    for name in sorted(several, key=lambda n: n != "paper"):
        runs = by[name]
        seeds = sorted(runs)
        accuracy = [100 * runs[s]["dev"]["accuracy"] for s in seeds]
        pearson = [runs[s]["tokens_dev"]["pearson"] for s in seeds]
        margins = [runs[s]["dev_margins"] for s in seeds]
        pooled = stats.accuracy_interval(margins, requests)
        by_seed = table1.paired_by_seed(runs, {} if name == "paper" else paper, "dev_margins", requests)
        averaged = "-" if name == "paper" or not paper else table1.describe(
            stats.paired(margins, [paper[s]["dev_margins"] for s in sorted(paper)], requests))
        lines.append(f"| {name} | {', '.join(map(str, seeds))} | {', '.join(f'{a:.1f}' for a in accuracy)} | "
                     f"{sum(accuracy) / len(accuracy):.1f} | {token_rewards.cell(pooled['accuracy'], pooled['ci95'], True)} | "
                     f"{by_seed} | {averaged} | "
                     f"{', '.join(f'{p:+.2f}' for p in pearson)} | {sum(pearson) / len(pearson):+.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="", help=f"comma-separated rows: {', '.join(ROWS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (seed 0 is the screen)")
    parser.add_argument("--report", action="store_true", help="only rebuild the table from the results")
    args = parser.parse_args()
    if not args.report:
        for preset in [r.strip() for r in args.rows.split(",") if r.strip()]:
            if preset not in ROWS:
                raise SystemExit(f"--rows: unknown row {preset!r}; choose from {', '.join(ROWS)}")
            for seed in [int(s) for s in args.seeds.split(",")]:
                run(preset, seed)
    report()


if __name__ == "__main__":
    main()
