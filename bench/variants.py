"""Screening our AVA-p variants (avalib/cli.py PRESETS) against the faithful AVA-p, on task v2's dev split.

Each row trains AVA-p with train_rm.py under one short budget (SCREEN: bench/token_rewards.py's
configuration cut at --max-steps), then is scored on the dev split only (the test split is for the
finalists, bench/token_rewards.py): accuracy against the gold labels (Wilson 95%), paired with the
faithful AVA-p on the same pairs (exact McNemar test), and its token rewards against the gold
(avalib/token_metrics.py, bootstrap intervals over replies). One seed: a screen, not a verdict.

    python bench/variants.py --rows "paper,return-cer,centred-td-return"   # train what is missing
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
from avalib import cli, models  # noqa: E402
from bench import runner, table1, token_rewards  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "variants"
SCREEN = {**token_rewards.CONFIG, "max-steps": 100, "objective": "ava-p", "seed": 0}


def arguments(preset: str) -> list[str]:
    flags = {**SCREEN, "preset": preset}
    return ["--data", "builtin", "--eval-data", "builtin:gold", "--eval-split", "dev"] + [
        item for k, v in flags.items() for item in (f"--{k}", str(v))]


def run(preset: str) -> dict:
    args = arguments(preset)
    key = hashlib.sha256(json.dumps(args).encode()).hexdigest()[:12]
    path = RESULTS / f"{preset}.json"
    if path.is_file() and json.loads(path.read_text()).get("key") == key:
        return json.loads(path.read_text())
    output_dir = models.cache_dir() / "bench-runs" / "variants" / f"{preset}-{key}"
    if not (output_dir / "final.json").is_file():
        command = [sys.executable, str(ROOT / "train_rm.py"), *args, "--output-dir", str(output_dir), "--save-every", "50"]
        if (output_dir / "checkpoint.pt").is_file():  # a run cut short (a session's end): continue it
            command.append("--resume")
        measured = runner.run_measured(command)
        (output_dir / "measured.json").write_text(json.dumps(measured))
    from avalib import reward_models

    final = json.loads((output_dir / "final.json").read_text())
    model, tokenizer, _ = reward_models.load_reward_model(output_dir / "model")
    result = {"preset": preset, "config": cli.PRESETS[preset], "key": key,
              "command": "python train_rm.py " + " ".join(args), **json.loads((output_dir / "measured.json").read_text()),
              "dev": {k[5:]: v for k, v in final.items() if k.startswith("eval/")},
              "dev_margins": json.loads((output_dir / "eval_margins.json").read_text())["margins"],
              "tokens_dev": token_rewards.token_table(model, tokenizer, "dev", SCREEN["max-length"])}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def report() -> None:
    results = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}
    paper = results.get("paper")
    cell = token_rewards.cell
    lines = ["| preset | what it changes | dev accuracy % (Wilson 95%) | vs paper, paired: +/- (p) | token Pearson | "
             "Pearson, gold-bearing tokens | AUC +/- tokens | returns-to-go Pearson | per-word Pearson |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in sorted(results.items(), key=lambda item: item[0] != "paper"):
        t, d = r["tokens_dev"], r["dev"]
        paired = "-"
        if paper is not None and name != "paper":
            m = table1.mcnemar(r["dev_margins"], paper["dev_margins"])
            paired = f"+{m['wins']} / -{m['losses']} (p = {m['p']:.2f})"
        change = ", ".join(f"{k}={v}" for k, v in r["config"].items()) or "(the faithful objective)"
        lines.append(f"| {name} | {change} | {cell(d['accuracy'], d['accuracy_wilson95'], True)} | {paired} | "
                     f"{cell(t['pearson'], t['pearson_ci95'])} | {cell(t['pearson_nonzero'], t['pearson_nonzero_ci95'])} | "
                     f"{cell(t['auc'], t['auc_ci95'])} | {cell(t['return_to_go_pearson'], t['return_to_go_pearson_ci95'])} | "
                     f"{cell(t['word_pearson'], t['word_pearson_ci95'])} |")
    any_run = next(iter(results.values()), None)
    notes = [f"Task v2's dev split: {any_run['dev']['pairs']} pairs (gold labels), {any_run['tokens_dev']['replies']} replies; "
             f"budget: {SCREEN['max-steps']} steps of {SCREEN['batch-size']} pairs, seed 0, top {SCREEN['trainable-layers']} "
             "layers, lr " + str(SCREEN["lr"]) + ". Regenerate: `python bench/variants.py --report`." if any_run else ""]
    text = "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"
    (ROOT / "bench" / "results" / "variants.md").write_text(text)
    runner.update_page("docs/train_rm.md", text, "variants", heading_level=4)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="", help=f"comma-separated presets: {', '.join(cli.PRESETS)}")
    parser.add_argument("--report", action="store_true", help="only rebuild the table from the results")
    args = parser.parse_args()
    if not args.report:
        for preset in [r.strip() for r in args.rows.split(",") if r.strip()]:
            if preset not in cli.PRESETS:
                raise SystemExit(f"--rows: unknown preset {preset!r}; choose from {', '.join(cli.PRESETS)}")
            run(preset)
    report()


if __name__ == "__main__":
    main()
