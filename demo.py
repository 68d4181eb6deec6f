"""A first look at AVA: fine-tune SmolLM2-135M-Instruct's TQR with AVA-p on a few preference pairs
(about a minute on a laptop CPU), then print the reward it gives every token of an unseen pair.

    python demo.py [--model smollm2|HUB_ID|PATH] [--pairs 8] [--steps 25]
    python demo.py --data Anthropic/hh-rlhf:harmless-base       # the Hub's HH-RLHF (harmless subset)
    python demo.py --data ../shared/data/hh-rlhf-harmless       # a local copy laid out as the Hub's

--data takes any source train_rm.py takes (avalib/sources.py); without one it reads a local HH copy
($AVA_HH_DIR, or ../shared/data/hh-rlhf-harmless) where there is one, else the built-in task.
"""
import argparse
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import ava
from avalib import data, models, reward_models, sources

DATA = Path(__file__).resolve().parent.parent / "shared" / "data" / "hh-rlhf-harmless"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=models.DEFAULT_MODEL, help="'smollm2' (embedded), a hub id or a local path")
    parser.add_argument("--data", default="", help="pairs: a hub id[:subset], a directory, a file or builtin "
                                                 "(default: a local HH copy if there is one, else builtin)")
    parser.add_argument("--pairs", type=int, default=8, help="training pairs")
    parser.add_argument("--steps", type=int, default=25, help="full-batch AVA-p steps")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--trainable-layers", type=int, default=2, help="top decoder layers trained (the rest frozen)")
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    lm, tokenizer = models.load_model(args.model)
    models.freeze_layers(lm, args.trainable_layers)
    config = ava.AVAConfig()
    model = ava.TQR(lm, config)
    local_hh = Path(os.environ.get("AVA_HH_DIR", str(DATA)))
    source = args.data or (str(local_hh) if (local_hh / "train.jsonl.gz").is_file() else "builtin")
    train, _ = sources.load_rows(source, "pairs", "train", tokenizer, limit=args.pairs)
    chosen, rejected, _ = data.pair_batches(tokenizer, train, args.max_length)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    for _ in (bar := tqdm(range(args.steps), desc="AVA-p")):
        loss, terms = ava.ava_p_loss(model(**chosen), model(**rejected), config)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{terms['accuracy'].item():.2f}",
                        margin=f"{terms['margin'].item():.2f}")

    model.eval()
    held_out = "test" if source.startswith(("builtin", "Anthropic/")) else "dev"  # the hub's HH has train/test
    pair = sources.load_rows(source, "pairs", held_out, tokenizer, limit=1)[0][0]
    chosen, rejected, _ = data.pair_batches(tokenizer, [pair], args.max_length)
    print(f"\nAn unseen pair ({pair['where']}). Prompt tail: {pair['prompt'][-160:]!r}")
    with torch.no_grad():
        for name, batch in (("chosen", chosen), ("rejected", rejected)):
            out = model(**batch)
            print(f"\n{name}: E[R|y] = {out.sequence_reward()[0]:+.3f} (sigma {out.sequence_sigma()[0]:.3f})")
            rewards, sigma = ava.dense_rewards(out)  # Eq. 19: the reward of every response token
            ids = batch["input_ids"][0]
            table = reward_models.token_reward_table(tokenizer, ids, rewards[0], sigma[0], out.mask[0])
            for token, mu, s in table:
                print(f"  {token!r:>18}  mu {mu:+.3f}  sigma {s:.3f}")


if __name__ == "__main__":
    sys.exit(main())
