"""The built-in offline task: be positive, judged by VADER, with a gold reward known per token.

A task whose true reward is known exactly, down to the token, for researchers without the Hugging Face
Hub: to train on (every script's default --data), to judge win rates with, and to score token-level
rewards against. The DPO paper's "controlled sentiment generation" (Rafailov et al. 2023, Sec. 6.1),
with a lexicon (VADER, avalib/gold.py) in place of their classifier. docs/task.md has the whole story.

Two versions, each reproducible under its own sizes ("builtin:SIZE" as a --data source):
  v2 ("default", "tiny"): each of the 432 requests (avalib/task_prompts.py) gets 6 replies from the
     embedded SmolLM2-135M-Instruct (<= 32 tokens), sampled in turn under a cheerful, a grumpy and the
     default system instruction (task_prompts.STEERING; the reward model sees the plain request), and
     every two replies of a request form a pair (15 per request). Splits 7/1/2 by a hash of the
     request (sizes: bench/results/task.md). The sequence gold is the SUM of the
     per-word valences, i.e. exactly the sum of the token gold (gold.gold_sum), the target of Eq. 19's
     dense reward. Labels: Bradley-Terry on the gold difference at temperature 1.0 (sum units).
     "large" (MORE_PASSES): "default" with its train requests sampled a second time (seed 1), 9,330
     train pairs instead of 4,665, the same dev and test.
  v1 ("v1", "v1-tiny"): 4 replies (<= 48 tokens) per request without steering, paired off (0, 1),
     (2, 3); splits 8/1/1; gold = VADER's compound S / sqrt(S^2 + 15) of the summed valences S (a
     monotone function of the token gold's sum); Bradley-Terry labels at temperature 0.1.
`noise_free=True` (source "builtin:gold") labels every pair by the sign of its gold difference.

The sampled replies of every size are shipped with the repository (avalib/task_data/, read and checked
by avalib/shipped_task.py): loading reads that file, samples nothing and gives the same task on every
machine. `python -m avalib.task --rebuild SIZE` samples a size afresh and says whether, and where, it
differs from the shipped file (sampling at temperature 1 is not reproducible across CPUs). A task from
another local model (`model=`) is sampled once and cached under
avalib.models.cache_dir()/task/<size>-<key>/task.json (<key> hashes the requests, the model files,
every generation setting and TASK_FORMAT_VERSION; written atomically). Gold scores and labels are
recomputed on every load (VADER takes ~0.1 ms a text), so they always follow the code.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from avalib import gold, models, shipped_task, task_sampling
from avalib.task_sampling import LABEL_FIELDS, TASK_FORMAT_VERSION, cache_key, model_fingerprint, sample_records  # noqa: F401
from avalib.task_prompts import all_prompts, split_of


SPLITS = ("train", "dev", "test")


# Bradley-Terry temperature tau of v1's labels, in gold (compound, -1..1) units. At 0.1 a gold gap of
# 0.1 is labelled right 73% of the time, 0.3 95%; on v1's default size 88% of the labels agree with the
# gold sign (the label ceiling): noisy, like human labels. v2's gold is a sum of valences (a word such
# as "great" is 3.1), and its tau is 1.0: a gap of 1 is labelled right 73% of the time, 3 95%.
BT_TEMPERATURE = 0.1




def preference_probability(gold_a: float, gold_b: float, temperature: float) -> float:
    """Bradley-Terry: P(a preferred to b) = sigmoid((gold_a - gold_b) / temperature); temperature 0
    is the noise-free limit (1, 0, or 1/2 on an exact tie)."""
    if temperature < 0:
        raise ValueError(f"Bradley-Terry temperature must be >= 0, got {temperature}")
    difference = gold_a - gold_b
    if temperature == 0 or difference == 0:
        return 0.5 if difference == 0 else float(difference > 0)
    return 1.0 / (1.0 + math.exp(-difference / temperature))


def _uniform(*parts) -> float:
    """A uniform draw in [0, 1) determined by `parts` alone (so labels don't depend on iteration order)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def label_agreement(pairs: list[dict]) -> float | None:
    """Share of pairs whose chosen response has the higher gold, among pairs whose gold differs
    (the label ceiling: a reward model that knew the gold would agree with the labels this often).
    None when every pair is an exact gold tie."""
    decided = [pair for pair in pairs if pair["score_chosen"] != pair["score_rejected"]]
    if not decided:
        return None
    return sum(pair["score_chosen"] > pair["score_rejected"] for pair in decided) / len(decided)


@dataclass(frozen=True)
class TaskConfig:
    """One size of the task. Every field is part of the cache key."""
    size: str
    prompts_per_split: tuple[int, int, int] | None  # (train, dev, test) prompts kept, in order; None = all
    samples_per_prompt: int = 4  # replies sampled per prompt
    max_new_tokens: int = 48  # reply length cap (most replies hit it: SmolLM2-135M rambles)
    version: int = 1  # see the module docstring
    steering: bool = False  # v2: sample reply j under task_prompts.STEERING[j % 3]
    test_share: int = 1  # tenths of the requests in the test split (task_prompts.split_of)
    # recomputed on every load, so not part of the cache key:
    pairing: str = "disjoint"  # "disjoint": (0, 1), (2, 3), ...; "all": every two replies of a request
    gold: str = "compound"  # sequence gold: "compound" (gold.gold_score) or "sum" (gold.gold_sum)
    bt_temperature: float = BT_TEMPERATURE  # Bradley-Terry temperature of the labels, in the gold's units
    temperature: float = 1.0  # sampling temperature of the replies
    top_p: float = 0.95  # nucleus sampling: drops the least likely 5% of the mass (gibberish of a 135M model)
    seed: int = 0  # sampling seed
    batch_size: int = 64  # replies per batch (part of the key: padding changes float rounding)


V2 = dict(version=2, steering=True, test_share=2, pairing="all", gold="sum", bt_temperature=1.0)
SIZES = {
    "default": TaskConfig("default", None, samples_per_prompt=6, max_new_tokens=32, **V2),
    "tiny": TaskConfig("tiny", (8, 2, 2), samples_per_prompt=3, max_new_tokens=12, batch_size=8, **V2),
    "v1": TaskConfig("v1", None),
    "v1-tiny": TaskConfig("v1-tiny", (8, 2, 2), samples_per_prompt=2, max_new_tokens=12, batch_size=8),
}
# name -> (base size, passes): the base's train requests sampled again, pass p with seed base.seed + p, paired
# within the pass and labelled with label seed `seed + p` (pass 0 is the base's train split, pair for pair;
# dev and test are the base's). "large": 9,330 train pairs, BT ~75% on test (bench/results/learning_curve.md).
MORE_PASSES = {"large": ("default", 2)}
SIZE_NAMES = (*SIZES, *MORE_PASSES)


def select_prompts(config: TaskConfig) -> list[tuple[str, str]]:
    """(prompt, split) pairs of a size, in all_prompts() order."""
    prompts = [(prompt, split_of(prompt, config.test_share)) for prompt in all_prompts()]
    if config.prompts_per_split is None:
        return prompts
    kept = []
    for split, count in zip(SPLITS, config.prompts_per_split):
        in_split = [item for item in prompts if item[1] == split]
        if count > len(in_split):
            raise ValueError(f"size {config.size!r} asks for {count} {split} prompts; there are {len(in_split)}")
        kept += in_split[:count]
    order = {prompt: index for index, (prompt, _) in enumerate(prompts)}
    return sorted(kept, key=lambda item: order[item[0]])


@dataclass
class Task:
    """A built task: cached samples plus their gold scores. See the module docstring."""
    config: TaskConfig
    key: str
    path: Path
    records: list[dict]  # one per prompt: instruction, prompt, split, responses, n_tokens, finished, gold
    build_seconds: float  # model load + sampling, when the cache was built
    built_now: bool  # True if this call sampled the replies, False if it read the cache
    train_passes: int = 1  # MORE_PASSES: a train record holds passes x samples_per_prompt replies

    def replies_sha256(self) -> str:
        """A hash of the sampled replies (with their prompts and splits), which the cache key cannot
        promise: the key hashes what was asked for, and a build on another CPU can round a logit
        differently, sample another token and diverge from there (two builds of the default size on
        two machines differed in a few train and dev replies; bench/results/task.md). Results record
        it, so that figures computed on different builds are never silently compared."""
        replies = [[r["split"], r["instruction"], r["responses"]] for r in self.records]
        return hashlib.sha256(json.dumps(replies).encode("utf-8")).hexdigest()[:16]

    def _records(self, split: str) -> list[dict]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
        return [record for record in self.records if record["split"] == split]

    def prompts(self, split: str) -> list[dict]:
        """Prompt-only records for PPO rollouts and evaluation: {"prompt", "instruction"}."""
        return [{"prompt": r["prompt"], "instruction": r["instruction"]} for r in self._records(split)]

    def pairs(self, split: str, *, bt_temperature: float | None = None, seed: int = 0,
              noise_free: bool = False) -> list[dict]:
        """Preference pairs (TRL standard format) with Bradley-Terry labels, see the module docstring; with
        train passes (MORE_PASSES) pass after pass, each paired within itself, with label seed `seed + pass`."""
        temperature = 0.0 if noise_free else (self.config.bt_temperature if bt_temperature is None else bt_temperature)
        passes, k = (self.train_passes if split == "train" else 1), self.config.samples_per_prompt
        pairs = []
        for p in range(passes):
            span = slice(p * k, (p + 1) * k) if passes > 1 else slice(None)
            for record in self._records(split):
                responses, gold = record["responses"][span], record["gold"][span]
                n = len(responses)
                indices = ([(2 * i, 2 * i + 1) for i in range(n // 2)] if self.config.pairing == "disjoint"
                           else [(a, b) for a in range(n) for b in range(a + 1, n)])
                for pair_index, (a, b) in enumerate(indices):
                    p_a = preference_probability(gold[a], gold[b], temperature)
                    if _uniform(seed + p, record["instruction"], pair_index) >= p_a:
                        a, b = b, a
                    pairs.append({"prompt": record["prompt"], "chosen": responses[a], "rejected": responses[b],
                                  "score_chosen": gold[a], "score_rejected": gold[b],
                                  "instruction": record["instruction"]})
        return pairs

    def demonstrations(self, split: str) -> list[dict]:
        """The best of each prompt's samples under gold (first one on ties): {"prompt", "response", "score"}."""
        demonstrations = []
        for record in self._records(split):
            best = max(range(len(record["gold"])), key=lambda j: (record["gold"][j], -j))
            demonstrations.append({"prompt": record["prompt"], "response": record["responses"][best],
                                   "score": record["gold"][best], "instruction": record["instruction"]})
        return demonstrations

    def stats(self) -> dict:
        """Counts and gold summaries per split, for the CLI and the benchmark."""
        out = {"size": self.config.size, "key": self.key, "path": str(self.path),
               "build_seconds": self.build_seconds, "splits": {}}
        for split in SPLITS:
            records = self._records(split)
            golds = [g for r in records for g in r["gold"]]
            finished = [f for r in records for f in r["finished"]]
            tokens = [n for r in records for n in r["n_tokens"]]
            pairs = self.pairs(split)
            out["splits"][split] = {
                "prompts": len(records), "responses": len(golds), "pairs": len(pairs),
                "gold_mean": sum(golds) / len(golds) if golds else None,
                "gold_positive": sum(g > 0 for g in golds), "gold_zero": sum(g == 0 for g in golds),
                "gold_negative": sum(g < 0 for g in golds),
                "finished_with_eos": sum(finished), "mean_tokens": sum(tokens) / len(tokens) if tokens else None,
                "pairs_exact_gold_tie": sum(p["score_chosen"] == p["score_rejected"] for p in pairs),
                "pairs_judge_tie": sum(gold.judge("", p["chosen"], p["rejected"]) == "tie" for p in pairs),
                "label_agreement_bt": label_agreement(pairs),
            }
        return out


def load_task(size: str = "default", *, model: str | None = None, rebuild: bool = False,
              build_if_missing: bool = True, progress: bool = True) -> Task:
    """Load the task: the shipped replies (avalib/task_data/, checked against their sha256), or, for another
    model or a rebuild, from the cache, sampling it first if the cache has no entry for these inputs.

    size: a key of SIZES ("default" and "tiny": task v2; "v1" and "v1-tiny": task v1; see the module
    docstring; the tiny ones have 12 prompts and <= 12 tokens, for tests) or of MORE_PASSES ("large":
    "default" with a second pass over its train requests). model: a local model directory to sample
    from, or None for the shipped replies of the embedded SmolLM2-135M-Instruct. rebuild: sample again
    (embedded model: into the cache, the shipped file untouched). build_if_missing=False raises
    FileNotFoundError instead of sampling when nothing is cached.
    """
    if size in MORE_PASSES:
        return _with_more_passes(size, model=model, rebuild=rebuild, build_if_missing=build_if_missing, progress=progress)
    if size not in SIZES:
        raise ValueError(f"unknown task size {size!r}; choose from {sorted(SIZE_NAMES)}")
    config = SIZES[size]
    if model is None and not rebuild and size in shipped_task.manifest():
        records, entry = shipped_task.read(size)
        _score(records, config)
        return Task(config=config, key=entry["sha256"][:16], path=shipped_task.DATA_DIR / entry["file"],
                    records=records, build_seconds=entry["build"]["seconds"], built_now=False)
    prompts = select_prompts(config)
    model_path = models.resolve_model_path(model)
    key = cache_key(config, prompts, model_fingerprint(model_path))
    cached = models.cache_dir() / "task" / f"{size}-{key}" / "task.json"
    built_now = _needs_build(cached, size, rebuild, build_if_missing)
    if built_now:
        started = time.perf_counter()
        records = sample_records(config, prompts, model_path, progress)
        build_seconds = time.perf_counter() - started
        payload = {"format": TASK_FORMAT_VERSION, "key": key, "config": dataclasses.asdict(config),
                   "model": model_path, "build_seconds": build_seconds, "records": records}
        task_sampling.write_atomically(cached.parent, payload)
    else:
        payload = task_sampling.read_cache(cached, key)
        records, build_seconds = payload["records"], payload["build_seconds"]

    _score(records, config)
    return Task(config=config, key=key, path=cached.parent, records=records, build_seconds=build_seconds,
                built_now=built_now)


def _needs_build(cached: Path, size: str, rebuild: bool, build_if_missing: bool) -> bool:
    """Sample now? (rebuild, or nothing cached); nothing cached and build_if_missing=False: FileNotFoundError."""
    if not rebuild and not cached.is_file() and not build_if_missing:
        raise FileNotFoundError(f"no cached task {size!r} for these inputs at {cached.parent}; "
                                f"build it with: python -m avalib.task --size {size}")
    return rebuild or not cached.is_file()


def _score(records: list[dict], config: TaskConfig) -> None:  # every reply's gold: from the code, never the cache
    score = gold.gold_sum if config.gold == "sum" else gold.gold_score
    for record in records:
        record["gold"] = [score(response) for response in record["responses"]]


def _with_more_passes(size: str, *, model: str | None, rebuild: bool, build_if_missing: bool, progress: bool) -> Task:
    """MORE_PASSES[size]: the base size loaded (or built) as usual, then its train requests sampled again, once
    per further pass: shipped (avalib/task_data/), or cached under <size>-<key>, <key> hashing the base build's key."""
    base_size, passes = MORE_PASSES[size]
    base = load_task(base_size, model=model, rebuild=rebuild, build_if_missing=build_if_missing, progress=progress)
    payload = {"format": TASK_FORMAT_VERSION, "base": base.key, "passes": passes}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    cached = models.cache_dir() / "task" / f"{size}-{key}" / "task.json"
    path, built_now = cached.parent, False
    if model is None and not rebuild and size in shipped_task.manifest():
        extra, entry = shipped_task.read(size)
        key, path, seconds = entry["sha256"][:16], shipped_task.DATA_DIR / entry["file"], entry["build"]["seconds"]
        more = [[record for record in extra if record["pass"] == p] for p in range(1, passes)]
    elif built_now := _needs_build(cached, size, rebuild, build_if_missing):
        started = time.perf_counter()
        more = _sample_passes(base, passes, models.resolve_model_path(model), progress)
        task_sampling.write_atomically(path, {**payload, "key": key, "build_seconds": (seconds := time.perf_counter() - started),
                                 "passes_records": more})
    else:
        stored = task_sampling.read_cache(cached, key)
        more, seconds = stored["passes_records"], stored["build_seconds"]
    records = [dict(record) for record in base.records]
    by_instruction = {record["instruction"]: record for record in records if record["split"] == "train"}
    for extra in (record for pass_records in more for record in pass_records):  # a train request's replies of pass p
        record = by_instruction[extra["instruction"]]
        record.update({f: record[f] + extra[f] for f in ("responses", "n_tokens", "finished", "steering")})
    _score(records, base.config)
    return Task(config=dataclasses.replace(base.config, size=size), key=key, path=path, records=records,
                build_seconds=base.build_seconds + seconds, built_now=built_now or base.built_now, train_passes=passes)


def _sample_passes(base: Task, passes: int, model_path: str, progress: bool) -> list[list[dict]]:
    """The base's train requests sampled once per further pass p = 1 .. passes - 1, with seed base seed + p."""
    prompts = [(record["instruction"], "train") for record in base.records if record["split"] == "train"]
    return [[dict(record, **{"pass": p}) for record in sample_records(
        dataclasses.replace(base.config, seed=base.config.seed + p), prompts, model_path, progress)] for p in range(1, passes)]


def rebuild(size: str, progress: bool = True) -> tuple[list[dict], dict]:
    """Sample `size` afresh with the embedded model, touching no file: its records as shipped_task stores them
    (for a MORE_PASSES size, only its further passes, over the shipped base's train requests) and the
    build's inputs (task_sampling.build_inputs)."""
    model_path = models.resolve_model_path(None)
    started = time.perf_counter()
    if size in MORE_PASSES:
        base_size, passes = MORE_PASSES[size]
        base = load_task(base_size, progress=False)
        config, records = base.config, [r for pass_records in _sample_passes(base, passes, model_path, progress) for r in pass_records]
        extra = {"base": base_size, "base_sha256": shipped_task.manifest()[base_size]["sha256"], "passes": passes}
    else:
        config, extra = SIZES[size], {}
        records = sample_records(config, select_prompts(config), model_path, progress)
    return records, task_sampling.build_inputs(config, model_path, time.perf_counter() - started, **extra)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Load the built-in sentiment task and print its stats, or sample a size "
                                                 "afresh and compare it with the shipped file.")
    parser.add_argument("--size", choices=sorted(SIZE_NAMES), default="default", help="task size")
    parser.add_argument("--model", default=None, help="sample from this local model directory instead (cached)")
    parser.add_argument("--rebuild", metavar="SIZE", choices=sorted(SIZE_NAMES), default=None,
                        help="sample SIZE afresh with the embedded model and say whether, and where, it differs from the "
                             "shipped file (minutes: sampling)")
    parser.add_argument("--diff-json", default="", help="with --rebuild: write the comparison to this JSON file")
    parser.add_argument("--ship", action="store_true", help="with --rebuild: replace the shipped file with the rebuild "
                                                            "(maintainers; record the change and re-run what depends on it)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.rebuild:
        records, build = rebuild(args.rebuild, progress=not args.no_progress)
        build["command"] = f"python -m avalib.task --rebuild {args.rebuild}" + (" --ship" if args.ship else "")
        shipped = shipped_task.read(args.rebuild)[0] if args.rebuild in shipped_task.manifest() else []
        report = shipped_task.compare(shipped, records)
        print(f"task {args.rebuild} sampled in {build['seconds']:.1f} s: {shipped_task.describe(report)}")
        if args.diff_json:
            Path(args.diff_json).write_text(json.dumps({"size": args.rebuild, "build": build, **report}, indent=1))
        if args.ship:
            entry = shipped_task.write(args.rebuild, records, build, passes=args.rebuild in MORE_PASSES)
            print(f"shipped: {shipped_task.DATA_DIR / entry['file']} (sha256 {entry['sha256'][:16]}...)")
        return

    started = time.perf_counter()
    task = load_task(args.size, model=args.model, progress=not args.no_progress)
    seconds = time.perf_counter() - started
    stats = task.stats()
    print(f"task {args.size} {'built' if task.built_now else 'loaded'} in {seconds:.1f} s: {task.path} "
          f"(replies {task.replies_sha256()}; model load + sampling took {task.build_seconds:.1f} s when it was built)")
    print(f"{'split':6} {'prompts':>7} {'replies':>7} {'pairs':>5} {'gold>0':>6} {'gold=0':>6} {'gold<0':>6} "
          f"{'eos':>5} {'tokens':>6} {'ties':>5} {'BT=gold':>7}")
    for split, s in stats["splits"].items():
        agreement = "-" if s["label_agreement_bt"] is None else f"{s['label_agreement_bt']:.3f}"
        mean_tokens = "-" if s["mean_tokens"] is None else f"{s['mean_tokens']:.1f}"
        print(f"{split:6} {s['prompts']:7d} {s['responses']:7d} {s['pairs']:5d} {s['gold_positive']:6d} "
              f"{s['gold_zero']:6d} {s['gold_negative']:6d} {s['finished_with_eos']:5d} {mean_tokens:>6} "
              f"{s['pairs_judge_tie']:5d} {agreement:>7}")
    print("ties: pairs whose gold differs by <= TIE_MARGIN; BT=gold: sampled labels agreeing with the gold sign")


if __name__ == "__main__":
    main(sys.argv[1:])
