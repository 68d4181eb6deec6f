"""Read-outs of saved Table 1 models, side by side: why AVA-d (and AVA-p w/o cer) rank dev pairs near or below chance.

Table 1 scores a sequence by `mu` at its last valid transition (SPEC.md, "Using the reward"). AVA-d
never trains that position with a TD target (Eq. 14's delta_t needs a valid t+2), only with the KL
to the N(0, 1) prior, so its last `mu` is whatever the head generalises to there. This script scores
the dev pairs with several read-outs of one forward pass of a saved model, and with plain baselines:

- `table score`: the sequence score of Table 1 (for AVA, mu at the last valid transition; checked to
  reproduce the run's recorded dev margins);
- `token reward sum`, `token reward mean`: the return of the per-token rewards (AVA: Eq. 19's mu_t),
  and its mean per response token;
- `LM logp sum`, `LM logp mean`: the log-likelihood of the response under the model's own LM
  (AVA-d's likelihood term trains it on the chosen halves, like SFT);
- `untrained LM logp sum / mean`: the same under SmolLM2-135M-Instruct as loaded (no training);
- `longer wins`: the response with more tokens wins.

Each read-out gets dev accuracy (Wilson 95% interval), a paired comparison with `table score` on the same
pairs (avalib/stats.py: the difference in accuracy points, ties half, with a bootstrap interval and a
sign-flip test; HH-RLHF's pairs share no replies, so each pair is its own cluster), and the Spearman
correlation of its margins with the response-length difference (in tokens). The dev pairs are cut at the
rows' configuration's max length, as their runs cut them, so rows of one run share a configuration.

    python bench/readouts.py --task harmless --rows AVA-d,Pref-Trans    # models must be in $AVA_CACHE/bench-runs
    python bench/readouts.py --report                                   # rebuild the Markdown only
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ava  # noqa: E402
from avalib import data, evaluation, models, reward_models, sources, stats  # noqa: E402
from bench import runner, table1  # noqa: E402

OUT = ROOT / "bench" / "results" / "readouts"


def dev_items(task: str, max_length: int, limit: int | None = None):
    """The dev pairs exactly as train_rm.py evaluates them (same reader, same cutting)."""
    tokenizer = models.load_tokenizer()
    rows, _ = sources.load_rows(str(ROOT / table1.DATA / f"hh-rlhf-{task}" / "dev.jsonl.gz"), "pairs", "dev", tokenizer, skip_bad=True, limit=limit)
    return [data.encode_pair(tokenizer, r["prompt"], r["chosen"], r["rejected"], max_length)[:2] for r in rows], tokenizer


@torch.no_grad()
def sequence_readouts(model, items: list[tuple], pad_id: int, batch_size: int = 8, desc: str = "") -> dict[str, list[float]]:
    """Per sequence (chosen rows first, then rejected, in the order of items): every read-out this model has."""
    examples = [item[0] for item in items] + [item[1] for item in items]
    columns: dict[str, list[float]] = {}
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, leave=False):
        batch = data.collate(examples[start:start + batch_size], pad_id)
        if isinstance(model, ava.TQR):
            out = model(**batch, with_logp=True)
            count = out.mask.sum(1)
            found = {"table score": out.sequence_reward(), "token reward sum": out.mu.sum(1), "token reward mean": out.mu.sum(1) / count,
                     "LM logp sum": out.logp.sum(1), "LM logp mean": out.logp.sum(1) / count}
        elif isinstance(model, ava.ScalarRewardModel):
            out = model(**batch)
            count = out.mask.sum(1)
            found = {"table score": out.score, "token reward sum": out.rewards.sum(1), "token reward mean": out.rewards.sum(1) / count}
        else:  # a plain causal LM: its log-likelihood of the response
            logp = ava.token_logprobs(model, **batch)
            count = batch["response_mask"][:, 1:].sum(1)
            found = {"untrained LM logp sum": logp.sum(1), "untrained LM logp mean": logp.sum(1) / count}
        found["response tokens"] = count.float()
        for name, values in found.items():
            columns.setdefault(name, []).extend(values.float().tolist())
    return columns


def margins(columns: dict[str, list[float]]) -> dict[str, list[float]]:
    return {name: [c - r for c, r in zip(values[: len(values) // 2], values[len(values) // 2:])] for name, values in columns.items()}


def describe(name: str, m: list[float], reference: list[float] | None, length: list[float]) -> dict:
    n = len(m)
    right = sum(x > 0 for x in m)
    row = {"readout": name, "accuracy": right / n, "ties": sum(x == 0 for x in m) / n, "wilson95": list(evaluation.wilson(right, n)),
           "spearman_with_length_difference": evaluation.rank_correlation(m, length)}
    if reference is not None and m is not reference:
        row["vs_table_score"] = stats.paired(m, reference)  # HH-RLHF: one cluster per pair
    return row


def measure(task: str, rows: list[str], limit: int | None = None) -> dict:
    """The read-outs of `rows` (one configuration: the dev pairs are cut at its max length, as its runs cut them)."""
    lengths = {table1.ALL[row][1]["max-length"] for row in rows}
    if len(lengths) != 1:
        raise SystemExit(f"rows {rows} were trained at different max lengths {sorted(lengths)}: read each configuration out in its own run")
    max_length = lengths.pop()
    items, tokenizer = dev_items(task, max_length, limit)
    result = {"task": task, "pairs": len(items), "max_length": max_length, "models": []}
    lm, _ = models.load_model(tokenizer=tokenizer)
    base = margins(sequence_readouts(lm.eval(), items, tokenizer.pad_token_id, desc="untrained LM"))
    length = base.pop("response tokens")
    result["baselines"] = [describe("longer wins", length, None, length)] + [describe(k, v, None, length) for k, v in base.items()]
    del lm
    for row in rows:
        committed = table1.results(task, row)
        if not committed:
            raise SystemExit(f"{row}: no committed Table 1 result for {task}")
        saved = [r for r in committed if (table1.run_dir(task, row, r["seed"]) / "model").is_dir()]
        if not saved:  # saved models live on the machine that trained them
            raise SystemExit(f"{row}: no saved model of seeds {[r['seed'] for r in committed]} under "
                             f"{table1.run_dir(task, row, committed[0]['seed']).parent} (run it with bench/table1.py first)")
        run = saved[0]  # the lowest seed whose model is here
        directory = table1.run_dir(task, row, run["seed"]) / "model"
        model, _, _ = reward_models.load_reward_model(directory)
        found = margins(sequence_readouts(model, items, tokenizer.pad_token_id, desc=row))
        found.pop("response tokens")
        recorded = run.get("dev_margins")
        if recorded is not None:
            recorded = recorded[: len(items)]  # the table's read-out must be the one the run recorded
            worst = max(abs(a - b) for a, b in zip(found["table score"], recorded))
            if worst > 1e-3:
                raise SystemExit(f"{row}: 'table score' differs from the run's recorded dev margins by {worst}")
        result["models"].append({"row": row, "seed": run["seed"], "objective": run["objective"], "table_accuracy": run["eval/accuracy"],
                                 "readouts": [describe(k, v, found["table score"], length) for k, v in found.items()],
                                 "margin_spearman_with_untrained_LM_logp_mean": evaluation.rank_correlation(found["table score"], base["untrained LM logp mean"])})
        del model
    return result


def versus_table_score(x: dict, table_score: dict, pairs: int) -> dict | None:
    """A read-out's stats.paired against its model's table score. Results measured before stats.paired kept McNemar's
    counts only (wins: right here and wrong there, losses the reverse); where neither read-out has a tie, every pair
    scores 1 or 0, so those counts fix each pair's difference (+1 on a win, -1 on a loss, 0 elsewhere) and, with one
    cluster per pair, the comparison itself (its resampling aside): stats.paired is run on pairs rebuilt from them."""
    m = x.get("vs_table_score")
    if m is None or "difference" in m:
        return m
    if x["ties"] or table_score["ties"]:
        return None  # a tie there counted as wrong: the counts do not give the pairs' scores
    same = pairs - m["wins"] - m["losses"]
    return stats.paired([1.0] * m["wins"] + [-1.0] * m["losses"] + [1.0] * same,
                        [-1.0] * m["wins"] + [1.0] * m["losses"] + [1.0] * same)


def markdown(results: list[dict]) -> str:
    lines = ["# Read-outs of saved Table 1 models on dev", "",
             "Regenerate: `python bench/readouts.py --task TASK --rows ROWS` (needs the rows' saved models in $AVA_CACHE/bench-runs).",
             "`table score` is the model's Table 1 sequence score (AVA: mu at the last valid transition; BT: the last token's score; Pref-Trans: sum_t w_t r_t);",
             "token reward sum / mean: its per-token rewards (AVA: Eq. 19's mu_t) summed or averaged over the response;",
             "vs table score: the read-out against its model's table score on the same dev pairs (avalib/stats.py): the",
             "difference in accuracy points (a tie counts half, as in accuracy), its 95% bootstrap interval and a sign-flip p,",
             "then + the pairs this read-out scores higher, - those the table score does. HH-RLHF's pairs share no replies, so",
             "the interval and p resample and sign-flip single pairs (one cluster per pair), which without ties is McNemar's",
             "exact test; results measured before these were kept store McNemar's counts, from which the comparison is",
             "rebuilt (no read-out of theirs has a tie, so the counts fix every pair's score).",
             "rho(length): Spearman correlation of the margin with the chosen - rejected difference in response tokens.", ""]
    for r in results:
        lines += [f"## {r['task']} dev ({r['pairs']} pairs, max length {r['max_length']})", "",
                  "| model | read-out | accuracy | 95% interval | vs table score: difference (95%), p, +/- | rho(length) |", "|---|---|---|---|---|---|"]
        def line(model, x, table_score=None):
            paired = None if table_score is None else versus_table_score(x, table_score, r["pairs"])
            paired = "-" if paired is None else table1.describe(paired)
            return (f"| {model} | {x['readout']} | {100 * x['accuracy']:.1f} | {100 * x['wilson95'][0]:.1f}-{100 * x['wilson95'][1]:.1f} | "
                    f"{paired} | {x['spearman_with_length_difference']:+.2f} |")
        lines += [line("no training", x) for x in r["baselines"]]
        for m in r["models"]:
            table_score = next(x for x in m["readouts"] if x["readout"] == "table score")
            lines += [line(f"{m['row']} seed {m['seed']}", x, table_score) for x in m["readouts"]]
        lines += [""] + [f"- {m['row']}: Spearman of its Table 1 margin with the untrained LM's mean log-likelihood margin: "
                         f"{m['margin_spearman_with_untrained_LM_logp_mean']:+.2f}." for m in r["models"]] + [""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["harmless", "helpful"], default="harmless")
    parser.add_argument("--rows", default="AVA-d", help="comma-separated Table 1 rows whose saved models to read out")
    parser.add_argument("--limit", type=int, default=0, help="only the first N dev pairs, printed, nothing written (a smoke test)")
    parser.add_argument("--report", action="store_true", help="only rebuild the Markdown from the committed JSON")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.report:
        rows = [r.strip() for r in args.rows.split(",") if r.strip()]
        unknown = [r for r in rows if r not in table1.ALL]
        if unknown:
            raise SystemExit(f"unknown rows {unknown}; Table 1 rows are {list(table1.ALL)}")
        found = measure(args.task, rows, args.limit or None)
        if args.limit:
            print(markdown([found]))
            return
        found["command"] = f"python bench/readouts.py --task {args.task} --rows \"{','.join(rows)}\""
        (OUT / f"{args.task}.json").write_text(json.dumps(found, indent=1) + "\n")
    results = [json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))]
    text = markdown(results)
    (OUT.parent / "readouts.md").write_text(text)
    runner.update_page("docs/train_rm.md", text.split("\n", 2)[2].strip(), "readouts", heading_level=4)
    print(text)


if __name__ == "__main__":
    main()
