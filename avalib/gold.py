"""The built-in task's gold reward (VADER), per word, per token and per sequence; the gold judge."""
from __future__ import annotations

import functools
import math
import string
from dataclasses import dataclass


TIE_MARGIN = 0.05  # judge: gold scores within this distance tie (VADER's neutral band is |compound| < 0.05)


VADER_ALPHA = 15.0  # VADER's normalisation constant: compound = S / sqrt(S^2 + alpha)


@functools.lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


@dataclass(frozen=True)
class WordValence:
    """One word as VADER reads it: its characters text[start:end] and its valence after VADER's rules."""
    start: int
    end: int
    word: str
    valence: float


def gold_word_valences(text: str) -> list[WordValence]:
    """VADER's per-word valences of `text`, with each word's character span in `text`.

    Runs VADER 3.3.2's own rule code (SentimentIntensityAnalyzer.polarity_scores, up to the point
    where it sums the list), keeping track of where each word came from: emoji are replaced by
    their lexicon descriptions (every word of a description points back at the emoji), words are
    the whitespace-separated chunks with leading/trailing punctuation stripped unless that leaves
    two characters or fewer (emoticons such as ":)" stay whole).
    """
    if not isinstance(text, str):
        raise TypeError(f"gold reward: expected a string, got {type(text).__name__}")
    from vaderSentiment.vaderSentiment import BOOSTER_DICT, SentiText

    analyzer = _vader()
    # 1. emoji -> descriptions; source[i] is the span of `text` that converted character i came from
    converted, source = [], []
    previous_was_space = True
    for position, char in enumerate(text):
        if char in analyzer.emojis:
            description = ("" if previous_was_space else " ") + analyzer.emojis[char]
            converted.extend(description)
            source.extend([(position, position + 1)] * len(description))
            previous_was_space = False
        else:
            converted.append(char)
            source.append((position, position + 1))
            previous_was_space = char == " "
    converted_text = "".join(converted)

    # 2. words = whitespace-separated chunks (str.split semantics), with their spans
    chunks, start = [], None
    for position, char in enumerate(converted_text + " "):  # the sentinel space closes the last word
        if char.isspace():
            if start is not None:
                chunks.append((start, position))
                start = None
        elif start is None:
            start = position
    sentitext = SentiText(converted_text.strip())
    words = sentitext.words_and_emoticons
    if len(words) != len(chunks):
        raise AssertionError(f"VADER split {len(words)} words, we found {len(chunks)}: {text!r}")

    # 3. VADER's valence loop, verbatim from polarity_scores
    sentiments: list[float] = []
    for i, item in enumerate(words):
        if item.lower() in BOOSTER_DICT:
            sentiments.append(0.0)
            continue
        if i < len(words) - 1 and item.lower() == "kind" and words[i + 1].lower() == "of":
            sentiments.append(0.0)
            continue
        sentiments = analyzer.sentiment_valence(0.0, sentitext, item, i, sentiments)
    sentiments = analyzer._but_check(words, sentiments)

    # 4. each word's span in the original text (VADER strips punctuation unless <= 2 characters remain)
    result = []
    for (chunk_start, chunk_end), word, valence in zip(chunks, words, sentiments):
        chunk = converted_text[chunk_start:chunk_end]
        if word != chunk:  # punctuation was stripped: narrow the span to the word itself
            chunk_start += len(chunk) - len(chunk.lstrip(string.punctuation))
            chunk_end = chunk_start + len(word)
        start, end = source[chunk_start][0], source[chunk_end - 1][1]
        result.append(WordValence(start, end, text[start:end], float(valence)))
    return result


def normalize_gold(total_valence: float) -> float:
    """VADER's squashing of a valence sum into (-1, 1): S / sqrt(S^2 + 15)."""
    return total_valence / math.sqrt(total_valence * total_valence + VADER_ALPHA)


def gold_score(text: str) -> float:
    """Sequence-level gold of a response: normalize_gold(sum of its word valences), in (-1, 1).
    Equals VADER's compound score for text without "!" or "?" (up to VADER's rounding)."""
    return normalize_gold(sum(word.valence for word in gold_word_valences(text)))


def gold_sum(text: str) -> float:
    """Task v2's sequence gold: the sum of the response's word valences, which is exactly the sum of
    its token gold (gold_token_rewards, for any tokenizer): the return of Eq. 19's dense reward."""
    return float(sum(word.valence for word in gold_word_valences(text)))


def token_rewards_from_offsets(text: str, offsets: list[tuple[int, int]]) -> list[float]:
    """Token-level gold for tokens with character spans `offsets` into `text` (one (start, end) per
    token; empty spans, e.g. special tokens, get 0). Each word's valence goes to the last token
    overlapping it; every other token gets 0, so the rewards sum to the word valences' sum.

    For a response inside a longer sequence, pass its tokens' offsets shifted to the response."""
    rewards = [0.0] * len(offsets)
    for word in gold_word_valences(text):
        if word.valence == 0.0:
            continue
        last = None
        for index, (start, end) in enumerate(offsets):
            if start < word.end and end > word.start and end > start:
                last = index
        if last is None:
            raise ValueError(f"no token overlaps the word {word.word!r} at characters {word.start}:{word.end}: "
                             "offsets do not cover the text")
        rewards[last] += word.valence
    return rewards


def gold_token_rewards(text: str, tokenizer) -> list[float]:
    """Token-level gold of `text`, aligned to tokenizer(text, add_special_tokens=False)["input_ids"]:
    one float per token, each word's VADER valence on its last token, 0 elsewhere. Needs a fast
    (Rust) tokenizer for the character offsets. normalize_gold(sum(rewards)) == gold_score(text)."""
    try:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as error:
        raise ValueError("gold_token_rewards needs character offsets: use a fast tokenizer "
                         "(AutoTokenizer.from_pretrained(..., use_fast=True))") from error
    offsets = [tuple(span) for span in encoding["offset_mapping"]]
    if len(offsets) != len(encoding["input_ids"]):
        raise ValueError("the tokenizer returned a different number of offsets and tokens")
    return token_rewards_from_offsets(text, offsets)


def judge(prompt: str, response_a: str, response_b: str, margin: float = TIE_MARGIN) -> str:
    """Gold judgement of a against b: "win" / "tie" / "lose" from a's side. A tie is a gold difference
    of at most `margin`. The prompt does not enter the gold (see the module docstring)."""
    if not isinstance(prompt, str):
        raise TypeError(f"judge: prompt must be a string, got {type(prompt).__name__}")
    if margin < 0:
        raise ValueError(f"judge: margin must be >= 0, got {margin}")
    difference = gold_score(response_a) - gold_score(response_b)
    return "tie" if abs(difference) <= margin else "win" if difference > 0 else "lose"


def win_rate(prompts: list[str], responses: list[str], baselines: list[str], margin: float = TIE_MARGIN) -> dict:
    """Judge responses against baselines prompt by prompt. win_rate counts a tie as half a win."""
    if not len(prompts) == len(responses) == len(baselines):
        raise ValueError(f"win_rate: {len(prompts)} prompts, {len(responses)} responses, {len(baselines)} baselines")
    if not prompts:
        raise ValueError("win_rate: nothing to judge")
    verdicts = [judge(p, a, b, margin) for p, a, b in zip(prompts, responses, baselines)]
    counts = {verdict: verdicts.count(verdict) for verdict in ("win", "tie", "lose")}
    return {**counts, "n": len(verdicts), "win_rate": (counts["win"] + 0.5 * counts["tie"]) / len(verdicts)}
