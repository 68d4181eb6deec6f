"""Score a JSONL file of prompt/response rows with a reward model saved by train_rm.py (any kind).

    python -m avalib.score --model runs/rm/model --data rows.jsonl --out scores.jsonl

Rows: prompt/response (or prompt/completion, instruction/input/output, question/answer, the chosen
half of chosen/rejected, conversational message lists: the formats train_rm.py reads for
demonstrations). Output, one line per row in the input's order: {"row", "score", "tokens",
"rewards"} and, for AVA models, "sigma" (at the last token) and "sigmas" (per token). "score" is
the model's sequence score (E[R|y] for AVA, the last-token head for BT); "rewards" are the
per-token rewards of the response tokens in "tokens" (AVA: Eq. 19's mu_t; BT: the head read at
every token; Pref-Trans: the per-token rewards its attention weights sum). --no-per-token writes
the scores alone.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main(argv=None) -> list[dict]:
    from avalib import reward_models, sources

    parser = argparse.ArgumentParser(prog="python -m avalib.score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="a reward model directory saved by train_rm.py (OUTPUT_DIR/model)")
    parser.add_argument("--data", required=True,
                        help="a JSONL (or .json, .jsonl.gz, .parquet) file of prompt/response rows")
    parser.add_argument("--out", required=True, help="where to write the scores (JSONL, one line per row)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per sequence (prompt cut from the left, "
                                                                   "response from the right, as in training)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--per-token", action=argparse.BooleanOptionalAction, default=True,
                        help="also write each response token with its reward (and sigma)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.max_length < 2 or args.batch_size < 1:
        parser.error("--max-length must be >= 2 and --batch-size >= 1")
    model, tokenizer, _ = reward_models.load_reward_model(args.model, args.device)
    rows, report = sources.load_rows(args.data, "demos", "train", tokenizer)
    if not rows:
        raise SystemExit(f"--data {args.data}: no rows")
    scores = reward_models.score_texts(model, tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows],
                                       args.max_length, args.batch_size, per_token=args.per_token)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"row": i, **item}) + "\n" for i, item in enumerate(scores)))
    print(f"{report}\nwrote {len(scores)} scores to {out}")
    return scores


if __name__ == "__main__":
    from avalib import script

    script.run_script(main)
