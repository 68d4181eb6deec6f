"""The built-in offline task: be positive, judged by VADER, with a gold reward known per token.

Researchers without the Hugging Face Hub still need a task whose true reward is known exactly,
down to the token: to train on (train_rm.py, train_direct.py, train_ppo.py use it by default), to
judge win rates with, and to compare AVA's token-level rewards against in the notebooks. This is
the "controlled sentiment generation" setting of the DPO paper (Rafailov et al. 2023, Sec. 6.1),
with a lexicon in place of their sentiment classifier, so that it runs anywhere and the reward
can be read word by word.

Prompts
    PROMPT_GROUPS: 6 groups x 3 templates x 24 subjects = 432 requests written for this project
    ("Describe your day at the dentist.", "Write a short review of a cheap umbrella.", ...) whose
    replies can go either way in sentiment. A prompt's split is fixed by a hash of its text (~80%
    train, 10% dev, 10% test: 354 / 40 / 38), so adding prompts never moves old ones between splits.

Responses
    `samples_per_prompt` replies per prompt sampled from the embedded SmolLM2-135M-Instruct
    (chat template, temperature 1, nucleus 0.95, fixed seed) by avalib.generation.generate_ids.

Gold reward (VADER, Hutto & Gilbert 2014; package vaderSentiment 3.3.2)
    VADER scores each whitespace-separated word: its lexicon valence, adjusted by VADER's rules
    (boosters such as "very", negations such as "not" up to three words back, ALL-CAPS emphasis,
    "but" halving what comes before it and scaling what follows by 1.5). Let v_1 .. v_W be these
    per-word valences, exactly as VADER computes them (we run its own rule code, word by word).
    - token-level gold: word w's valence v_w is placed on the LAST token that overlaps the word
      (character offsets from the tokenizer; the word without its leading/trailing punctuation,
      as VADER reads it); every other token gets 0. The last token because only then is the word
      complete ("un" + "happy"); a reward read at token t has seen token t (SPEC.md, time steps).
    - sequence gold: gold_score(text) = S / sqrt(S^2 + 15) with S = sum_w v_w = the sum of the token
      rewards: VADER's compound score in (-1, 1), minus its one term that no word carries (the
      "!"/"?" emphasis bonus, added with the sign of the total) and without its rounding to 4
      decimals. So the sequence gold is a strictly increasing function of the summed token gold,
      exactly, for every text and every tokenizer.
    Caveat: a few of VADER's rules look ahead ("but" rescales the words before it; "no" drops its
    own valence when a lexicon word follows), so a token's gold can change when later words
    arrive: it decomposes the finished sequence's reward, as a token-level reading of any
    sequence-level judgement does.

Preferences, demonstrations, prompt-only sets
    - pairs: each prompt's samples are paired off disjointly, (0, 1), (2, 3), ..., and labelled by a
      Bradley-Terry model on the gold difference, P(a > b) = sigmoid((gold_a - gold_b) / tau), with
      tau = BT_TEMPERATURE = 0.1 unless given (then 88% of the default size's labels agree with
      the gold sign). The label's coin is a hash of (seed, prompt, pair index), so a pair's label
      does not depend on which other pairs exist. noise_free=True labels by the sign of the gold
      difference (tau -> 0; exact gold ties stay a fair coin). Records are in TRL's
      standard preference format, {"prompt", "chosen", "rejected"}, plus the gold scores
      "score_chosen" / "score_rejected" and the bare request "instruction".
    - demonstrations: the best of a prompt's samples under gold, {"prompt", "response", "score"}.
    - prompts: {"prompt", "instruction"} for PPO rollouts and win-rate evaluation.
    "prompt" is the chat-formatted text the replies were sampled from (it ends in
    "<|im_start|>assistant\\n"), so it feeds avalib.data.encode_pair and
    avalib.generation.generate(..., chat_template=False) unchanged.

Judge
    judge(prompt, a, b) compares gold scores: "tie" when they differ by at most TIE_MARGIN = 0.05
    (VADER's own neutral band is |compound| < 0.05), else "win"/"lose" from a's side. The gold ignores
    the prompt (the task is "reply positively, whatever was asked"); the argument is kept so any
    judge can be swapped in.

Cache
    Sampling is the only slow part (5.5-7 min on 2 CPU cores for the default size: 327 s on an idle
    machine, 403 s with 11% of it busy elsewhere, bench/results/task.md), so only the samples are
    cached, in
    avalib.models.cache_dir()/task/<size>-<key>/task.json, where <key> hashes the prompts, the model
    files, every generation setting, the seed and TASK_FORMAT_VERSION. Gold scores and labels are
    recomputed on load (VADER takes ~0.1 ms a text), so they always follow the code above. The
    directory is written under a temporary name and renamed into place: no reader ever sees half
    a cache. Loading takes ~0.2 s.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from avalib import generation, gold, models


SPLITS = ("train", "dev", "test")


# Bradley-Terry temperature tau of the default labels, in gold (compound, -1..1) units. At 0.1 a
# gold gap of 0.1 is labelled right 73% of the time, 0.3 95%; on the default size 88% of the labels
# agree with the gold sign (the label ceiling, bench/results/task.md): noisy, like human labels.
BT_TEMPERATURE = 0.1


TASK_FORMAT_VERSION = 1  # bump when the prompts' formatting or the cached records change meaning


PROMPT_GROUPS: list[tuple[list[str], list[str]]] = [
    (["Describe your day at {}.",
      "Write a short diary entry about a visit to {}.",
      "Tell a friend how your trip to {} went."],
     ["the beach", "the dentist", "a crowded airport", "a job interview", "the zoo", "a rainy music festival",
      "your grandmother's house", "a new gym", "the DMV", "an amusement park", "a quiet library",
      "a hospital waiting room", "a wedding", "a campsite in the mountains", "a busy train station",
      "a farmers' market", "an escape room", "a science museum", "a run-down hotel", "a ski resort",
      "a hair salon", "a football stadium", "a cooking class", "the post office"]),
    (["Write a short review of {}.",
      "Write a customer comment about {} you tried last month.",
      "What do you think of {}?"],
     ["a secondhand bicycle", "a cheap umbrella", "a new smartphone", "a noisy blender", "a pair of running shoes",
      "an electric toothbrush", "a robot vacuum cleaner", "a budget laptop", "a scented candle", "a smartwatch",
      "a coffee maker", "a mattress delivered in a box", "a video game console", "a pair of wireless earbuds",
      "an air fryer", "a paperback novel", "a winter coat", "a desk lamp", "a kids' scooter", "a camping tent",
      "a set of kitchen knives", "a meal-kit subscription", "a streaming service", "a language-learning app"]),
    (["Describe how you felt during {}.",
      "Write a short message to a friend about {}.",
      "Write two sentences about {}."],
     ["a surprise birthday party", "a delayed flight", "your first day at a new job", "a power outage",
      "a long weekend with friends", "losing your keys", "a thunderstorm at night", "moving to a new city",
      "a family reunion", "a traffic jam on the highway", "a graduation ceremony", "a failed cooking experiment",
      "a marathon", "a job rejection", "adopting a puppy", "a flat tire", "a snow day",
      "a concert by your favorite band", "a group project at school", "a long hospital stay",
      "winning a small prize", "a holiday dinner", "a missed train", "a first date"]),
    (["Describe the taste of {}.",
      "Write a restaurant review that mentions {}.",
      "Would you recommend {}? Answer in a few sentences."],
     ["a bowl of ramen", "cold pizza", "a vegan burger", "hospital food", "homemade apple pie", "airline food",
      "a spicy curry", "burnt toast", "fresh sushi", "instant noodles", "a chocolate cake",
      "a salad with no dressing", "street tacos", "a school cafeteria lunch", "grilled salmon",
      "a gas-station sandwich", "french fries", "a green smoothie", "leftover soup", "a fancy tasting menu",
      "pancakes", "black coffee", "a fruit salad", "microwave popcorn"]),
    (["What do you think about {}?",
      "Write a short opinion about {}.",
      "Give your honest opinion of {}."],
     ["working from home", "Monday mornings", "public transport in big cities", "social media", "online shopping",
      "homework", "winter", "summer vacations", "self-driving cars", "video calls", "reality TV",
      "open-plan offices", "learning to code", "long commutes", "electric cars", "group chats", "rainy days",
      "living in a small town", "fast fashion", "board games", "gardening", "standardized tests",
      "smartphones for kids", "traveling alone"]),
    (["Write a short review of {}.",
      "Summarize your opinion of {} in a few sentences.",
      "Tell me what you liked or disliked about {}."],
     ["a horror movie you watched recently", "a long fantasy novel", "a children's cartoon", "a jazz concert",
      "a stand-up comedy show", "a documentary about the ocean", "a video game sequel", "a Broadway musical",
      "a podcast about history", "a romantic comedy", "a poetry reading", "an art exhibition",
      "a superhero movie", "a cooking show", "a true-crime series", "a classical music album", "a school play",
      "a mystery novel", "a nature documentary", "an online course", "a magic show", "a science fiction series",
      "a local band's first album", "a museum audio tour"]),
]


def all_prompts() -> list[str]:
    """Every request of the task, in a fixed order (group, then subject, then template)."""
    prompts = [template.format(subject) for templates, subjects in PROMPT_GROUPS
               for subject in subjects for template in templates]
    if len(set(prompts)) != len(prompts):
        raise AssertionError("PROMPT_GROUPS produces duplicate prompts")
    return prompts


def split_of(prompt: str) -> str:
    """A prompt's split, from a hash of its text: 8/10 train, 1/10 dev, 1/10 test."""
    bucket = int(hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8], 16) % 10
    return "train" if bucket < 8 else "dev" if bucket == 8 else "test"


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
    samples_per_prompt: int = 4  # replies sampled per prompt (pairs use them two by two)
    max_new_tokens: int = 48  # reply length cap (most replies hit it: SmolLM2-135M rambles)
    temperature: float = 1.0  # sampling temperature of the replies
    top_p: float = 0.95  # nucleus sampling: drops the least likely 5% of the mass (gibberish of a 135M model)
    seed: int = 0  # sampling seed
    batch_size: int = 64  # replies per batch (part of the key: padding changes float rounding)


SIZES = {
    "default": TaskConfig("default", None),
    "tiny": TaskConfig("tiny", (8, 2, 2), samples_per_prompt=2, max_new_tokens=12, batch_size=8),
}


def select_prompts(config: TaskConfig) -> list[tuple[str, str]]:
    """(prompt, split) pairs of a size, in all_prompts() order."""
    prompts = [(prompt, split_of(prompt)) for prompt in all_prompts()]
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


def model_fingerprint(model_path: str | Path) -> dict:
    """What identifies a local model directory for the cache key: its name, config.json's content
    and its weight files' names, sizes and modification times (hashing 0.5 GB would cost seconds)."""
    path = Path(model_path)
    if not path.is_dir():
        raise ValueError(f"task data is sampled from a local model directory (no network); {model_path!r} is not one")
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"{path}: no config.json, not a model directory")
    weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf"))
    if not weights:
        raise ValueError(f"{path}: no weight files (*.safetensors, *.bin)")
    return {"name": path.name, "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest(),
            "weights": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weights]}


def cache_key(config: TaskConfig, prompts: list[tuple[str, str]], fingerprint: dict) -> str:
    """A hash of everything the cached samples depend on."""
    payload = {"format": TASK_FORMAT_VERSION, "config": dataclasses.asdict(config), "prompts": prompts,
               "model": fingerprint}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _build_records(config: TaskConfig, prompts: list[tuple[str, str]], model_path: str, progress: bool) -> list[dict]:
    """Sample the replies: the slow part (minutes for the default size)."""
    model, tokenizer = models.load_model(model_path)
    k = config.samples_per_prompt
    instructions = [prompt for prompt, _ in prompts]
    # sample j of prompt i sits at i * k + j; each reply gets its own draw of the one seeded stream
    generations = generation.generate_ids(
        model, tokenizer, [prompt for prompt in instructions for _ in range(k)],
        max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
        seed=config.seed, batch_size=config.batch_size, chat_template=True, progress=progress,
        desc=f"task {config.size}: sampling {len(instructions)} prompts x {k}")
    records = []
    for i, (instruction, split) in enumerate(prompts):
        samples = generations[i * k:(i + 1) * k]
        records.append({
            "instruction": instruction,
            "prompt": generation.chat_prompt_text(tokenizer, instruction),
            "split": split,
            "responses": [tokenizer.decode(g.response_ids, skip_special_tokens=True) for g in samples],
            "n_tokens": [len(g.response_ids) for g in samples],
            "finished": [g.finished for g in samples],  # False: cut at max_new_tokens
        })
    return records


def _write_atomically(directory: Path, payload: dict) -> None:
    """Write payload to directory/task.json so that `directory` appears complete or not at all: the
    file is written in a staging directory next to it, flushed to disk, and the directory renamed
    into place (a rename within one file system is atomic). An entry already there is replaced."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=directory.name + ".tmp-", dir=directory.parent))
    retired = None
    try:
        staging.chmod(0o755)  # mkdtemp makes it private
        with open(staging / "task.json", "w", encoding="utf-8") as handle:
            json.dump(payload, handle, ensure_ascii=False, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        if directory.exists():  # rebuild: move the old entry aside, then swap the new one in
            retired = directory.with_name(staging.name + ".old")
            directory.rename(retired)
        try:
            staging.rename(directory)
        except OSError:
            if not (directory / "task.json").is_file():  # not "another process finished first"
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)


@dataclass
class Task:
    """A built task: cached samples plus their gold scores. See the module docstring."""
    config: TaskConfig
    key: str
    path: Path
    records: list[dict]  # one per prompt: instruction, prompt, split, responses, n_tokens, finished, gold
    build_seconds: float  # model load + sampling, when the cache was built
    built_now: bool  # True if this call sampled the replies, False if it read the cache

    def _records(self, split: str) -> list[dict]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
        return [record for record in self.records if record["split"] == split]

    def prompts(self, split: str) -> list[dict]:
        """Prompt-only records for PPO rollouts and evaluation: {"prompt", "instruction"}."""
        return [{"prompt": r["prompt"], "instruction": r["instruction"]} for r in self._records(split)]

    def pairs(self, split: str, *, bt_temperature: float = BT_TEMPERATURE, seed: int = 0,
              noise_free: bool = False) -> list[dict]:
        """Preference pairs (TRL standard format) with Bradley-Terry labels, see the module docstring."""
        temperature = 0.0 if noise_free else bt_temperature
        pairs = []
        for record in self._records(split):
            responses, gold = record["responses"], record["gold"]
            for pair_index in range(len(responses) // 2):
                a, b = 2 * pair_index, 2 * pair_index + 1
                p_a = preference_probability(gold[a], gold[b], temperature)
                if _uniform(seed, record["instruction"], pair_index) >= p_a:
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
            gold = [g for r in records for g in r["gold"]]
            finished = [f for r in records for f in r["finished"]]
            tokens = [n for r in records for n in r["n_tokens"]]
            pairs = self.pairs(split)
            out["splits"][split] = {
                "prompts": len(records), "responses": len(gold), "pairs": len(pairs),
                "gold_mean": sum(gold) / len(gold) if gold else None,
                "gold_positive": sum(g > 0 for g in gold), "gold_zero": sum(g == 0 for g in gold),
                "gold_negative": sum(g < 0 for g in gold),
                "finished_with_eos": sum(finished), "mean_tokens": sum(tokens) / len(tokens) if tokens else None,
                "pairs_exact_gold_tie": sum(p["score_chosen"] == p["score_rejected"] for p in pairs),
                "pairs_judge_tie": sum(abs(p["score_chosen"] - p["score_rejected"]) <= gold.TIE_MARGIN for p in pairs),
                "label_agreement_bt": label_agreement(pairs),
            }
        return out


def load_task(size: str = "default", *, model: str | None = None, rebuild: bool = False,
              build_if_missing: bool = True, progress: bool = True) -> Task:
    """Load the task from the cache, sampling it first if the cache has no entry for these inputs.

    size: "default" (432 prompts x 4 replies x <= 48 tokens, 5.5-7 min to build on 2 cores) or "tiny"
    (12 prompts x 2 replies x <= 12 tokens, for tests). model: a local model directory, or None for
    the embedded SmolLM2-135M-Instruct. rebuild: sample again even if cached. build_if_missing=False
    raises FileNotFoundError instead of sampling when nothing is cached.
    """
    if size not in SIZES:
        raise ValueError(f"unknown task size {size!r}; choose from {sorted(SIZES)}")
    config = SIZES[size]
    prompts = select_prompts(config)
    model_path = models.resolve_model_path(model)
    key = cache_key(config, prompts, model_fingerprint(model_path))
    directory = models.cache_dir() / "task" / f"{size}-{key}"
    cached = directory / "task.json"

    built_now = rebuild or not cached.is_file()
    if built_now and not build_if_missing and not rebuild:
        raise FileNotFoundError(f"no cached task {size!r} for these inputs at {directory}; "
                                f"build it with: python task.py --size {size}")
    if built_now:
        started = time.perf_counter()
        records = _build_records(config, prompts, model_path, progress)
        build_seconds = time.perf_counter() - started
        payload = {"format": TASK_FORMAT_VERSION, "key": key, "config": dataclasses.asdict(config),
                   "model": model_path, "build_seconds": build_seconds, "records": records}
        _write_atomically(directory, payload)
    else:
        try:
            payload = json.loads(cached.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise RuntimeError(f"{cached}: unreadable task cache ({error}); delete it or pass rebuild=True") from error
        if payload.get("key") != key:
            raise RuntimeError(f"{cached}: holds key {payload.get('key')!r}, expected {key!r}; delete it")
        records, build_seconds = payload["records"], payload["build_seconds"]

    for record in records:  # the gold always comes from the code, never from the cache
        record["gold"] = [gold.gold_score(response) for response in record["responses"]]
    return Task(config=config, key=key, path=directory, records=records, build_seconds=build_seconds,
                built_now=built_now)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build (or load) the offline sentiment task and print its stats.")
    parser.add_argument("--size", choices=sorted(SIZES), default="default", help="task size")
    parser.add_argument("--model", default=None, help="local model directory (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--rebuild", action="store_true", help="sample again even if cached")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    task = load_task(args.size, model=args.model, rebuild=args.rebuild, progress=not args.no_progress)
    seconds = time.perf_counter() - started
    stats = task.stats()
    print(f"task {args.size} {'built' if task.built_now else 'loaded'} in {seconds:.1f} s: {task.path}")
    print(f"(model load + sampling took {task.build_seconds:.1f} s when the cache was built)")
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
