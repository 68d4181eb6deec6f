"""The AVA paper's Table 3 at CPU scale: PPO with AVA-p's dense rewards vs PPO with Bradley-Terry vs SFT.

SmolLM2-135M-Instruct on the built-in task v1 (builtin:v1, avalib/task.py), gold judge. The reward models are Table 1's
built-in rows (bench/table1.py --task builtin: AVA-p and BT, main configuration, seed 0; trained
first if missing). Every PPO row has one budget (CONFIG). After training, 8 replies to each held-out
test prompt (top-p 0.95, as bench/direct.py samples), judged against the initial model and, head to
head, against the other rows and bench/direct.py's SFT policies (same prompts and sampling seed).
Each update logs the proxy reward (the reward model's score of the rollouts) and their gold reward:
bench/results/ppo_proxy_vs_gold.png shows both per row, the picture of reward hacking.

    python bench/ppo.py              # run what is missing (rows cached), then the report
    python bench/ppo.py --report     # rebuild the table and the plot only
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from avalib import models  # noqa: E402
from bench import direct, runner, table1  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "ppo"
CONFIG = {"trainable-layers": 4, "updates": 20, "rollout-batch": 16, "minibatch": 8, "ppo-epochs": 1, "lr": 1e-5,
          "kl-coef": 0.05, "max-new-tokens": 48, "prompts": "builtin:v1", "eval-prompts": "builtin:v1", "eval-split": "test", "samples-per-prompt": 8,
          "judge": "gold"}
ROWS = {  # name: (reward model row of Table 1 (builtin), extra train_ppo.py flags)
    "PPO w/ AVA-p (dense)": ("AVA-p", {}),
    "PPO w/ AVA-p (dense, pessimistic k=1)": ("AVA-p", {"pessimism": 1.0}),
    "PPO w/ BT": ("BT", {}),
}
MATCHUPS = [("PPO w/ AVA-p (dense)", "PPO w/ BT"), ("PPO w/ AVA-p (dense, pessimistic k=1)", "PPO w/ BT"),
            ("PPO w/ AVA-p (dense)", "PPO w/ AVA-p (dense, pessimistic k=1)"),
            ("PPO w/ AVA-p (dense)", "SFT (demonstrations)"), ("PPO w/ BT", "SFT (demonstrations)")]


def reward_model_dir(row: str) -> Path:
    """The saved model of Table 1's built-in row (seed 0), trained now if it is missing."""
    table1.run_row("builtin", row, 0, need_model=True)
    return table1.run_dir("builtin", row, 0) / "model"


def run_row(row: str) -> dict:
    reward_row, extra = ROWS[row]
    flags = {**CONFIG, **extra}
    arguments = [item for k, v in flags.items() for item in (f"--{k}", str(v))]
    key = hashlib.sha256(json.dumps([reward_row, arguments]).encode()).hexdigest()[:12]
    path = RESULTS / f"{runner.slug(row)}.json"
    if path.is_file() and json.loads(path.read_text()).get("key") == key:
        return json.loads(path.read_text())
    model_dir = reward_model_dir(reward_row)
    output_dir = models.cache_dir() / "bench-runs" / "ppo" / f"{runner.slug(row)}-{key}"
    measured = runner.train([sys.executable, str(ROOT / "train_ppo.py"), "--reward-model", str(model_dir), *arguments],
                            output_dir, save_every=5)
    final = json.loads((output_dir / "final.json").read_text())
    curve = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    replies = [json.loads(line) for line in (output_dir / "samples.jsonl").read_text().splitlines()]
    result = {"row": row, "key": key, "reward_model_row": reward_row,
              "command": f"python train_ppo.py --reward-model <Table 1 builtin {reward_row} model> " + " ".join(arguments),
              **measured, **final,
              "curve": [{k: line[k] for k in ("step", "proxy/score", "gold/score", "kl/sum") if k in line}
                        for line in curve if "proxy/score" in line],
              "replies": [{"prompt": r["prompt"], "reply": r["policy"], "initial": r["opponent"]} for r in replies]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def plot(runs: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.4), squeeze=False)
    for ax, (row, r) in zip(axes[0], runs.items()):
        steps = [c["step"] for c in r["curve"]]
        ax.plot(steps, [c["proxy/score"] for c in r["curve"]], color="tab:blue", label="proxy (reward model)")
        ax.set_xlabel("PPO update")
        ax.set_ylabel("proxy", color="tab:blue")
        twin = ax.twinx()
        twin.plot(steps, [c["gold/score"] for c in r["curve"]], color="tab:orange", label="gold")
        twin.set_ylabel("gold", color="tab:orange")
        ax.set_title(row, fontsize=9)
    fig.tight_layout()
    fig.savefig(ROOT / "bench" / "results" / "ppo_proxy_vs_gold.png", dpi=90)
    plt.close(fig)


def report() -> None:
    runs = {row: json.loads(p.read_text()) for row in ROWS if (p := RESULTS / f"{runner.slug(row)}.json").is_file()}
    others = {row: json.loads(p.read_text()) for row in direct.ROWS if (p := direct.RESULTS / f"{runner.slug(row)}.json").is_file()}
    pool = {**others, **runs}
    table = {"config": CONFIG, "rows": [], "matchups": []}
    for row, r in runs.items():
        w = r["win_rate"]
        first, last = r["curve"][:5], r["curve"][-5:]
        mean = lambda xs, k: sum(x[k] for x in xs) / len(xs)  # noqa: E731
        table["rows"].append({"row": row, "vs_initial": {k: w[k] for k in ("win", "tie", "lose", "n", "win_rate", "wilson95")},
                              "gold_mean": w["gold_mean_ours"], "gold_mean_initial": w["gold_mean_opponent"],
                              "proxy_first5": mean(first, "proxy/score"), "proxy_last5": mean(last, "proxy/score"),
                              "gold_first5": mean(first, "gold/score"), "gold_last5": mean(last, "gold/score"),
                              "train_minutes": r["train_seconds"] / 60, "other_cpu_share": r["other_processes_cpu_share"],
                              "command": r["command"]})
    for a, b in MATCHUPS:
        if a in pool and b in pool:
            table["matchups"].append({"row": a, "against": b, **direct.head_to_head({**pool[a], "row": a}, {**pool[b], "row": b})})
    (ROOT / "bench" / "results" / "ppo.json").write_text(json.dumps(table, indent=2))
    if runs:
        plot(runs)
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    lines = ["# Table 3 at CPU scale: PPO on the built-in task, gold judge", "",
             "Regenerate: `python bench/ppo.py` (runs what is missing; `--report` only rebuilds).",
             f"One budget for every row: {CONFIG}. Reward models: Table 1's built-in rows (seed 0).", "",
             "| policy | against | win | tie | lose | win rate | 95% interval |", "|---|---|---|---|---|---|---|"]
    for m in table["matchups"]:
        lines.append(f"| {m['row']} | {m['against']} | {m['win']} | {m['tie']} | {m['lose']} | {pct(m['win_rate'])} | "
                     f"{pct(m['wilson95'][0])}-{pct(m['wilson95'][1])} |")
    lines += ["", "| policy | win rate vs initial | 95% interval | mean gold (initial) | proxy: first 5 -> last 5 updates | "
              "gold: first 5 -> last 5 | train min | other CPU use |", "|---|---|---|---|---|---|---|---|"]
    for r in table["rows"]:
        v = r["vs_initial"]
        lines.append(f"| {r['row']} | {pct(v['win_rate'])} | {pct(v['wilson95'][0])}-{pct(v['wilson95'][1])} | "
                     f"{r['gold_mean']:+.3f} ({r['gold_mean_initial']:+.3f}) | {r['proxy_first5']:+.3f} -> {r['proxy_last5']:+.3f} | "
                     f"{r['gold_first5']:+.3f} -> {r['gold_last5']:+.3f} | {r['train_minutes']:.1f} | {100 * r['other_cpu_share']:.0f}% |")
    missing = [row for row in ROWS if row not in runs]
    lines += ["", f"Not yet run: {', '.join(missing) if missing else 'none'}.",
              "Curves (proxy and gold reward of the rollouts per update): `bench/results/ppo_proxy_vs_gold.png`."]
    (ROOT / "bench" / "results" / "ppo.md").write_text("\n".join(lines) + "\n")
    runner.update_page("docs/train_ppo.md", "\n".join(lines[2:]), "ppo")
    runner.update_page("README.md", runner.glance(lines, ["policy", "against", "win rate", "95% interval"]), "ppo-glance", "ppo")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=";".join(ROWS), help="row names separated by ';' (they contain commas)")
    parser.add_argument("--report", action="store_true", help="only rebuild the table and plot from cached runs")
    args = parser.parse_args()
    if not args.report:
        for row in [r.strip() for r in args.rows.split(";") if r.strip()]:
            if row not in ROWS:
                raise SystemExit(f"unknown row {row!r}: choose from {list(ROWS)}")
            run_row(row)
    report()


if __name__ == "__main__":
    main()
