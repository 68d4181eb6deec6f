"""Data formats: one preference pair or demonstration from any supported row format, tokenised and batched.

Every bad row is a DataError naming file:line and field. Text from data is text: a special token's
string in it (`<|im_end|>`, `<|im_start|>`, ...) is escaped when the row is read (`escape_special_tokens`),
so that no tokenisation turns it into the control token; the chat template's own structure around the
content it renders stays as it is."""
from __future__ import annotations

import functools
import re
from pathlib import Path

import torch


HH_ASSISTANT = "\n\nAssistant:"


class DataError(ValueError):
    """Bad input, with the file, line and field it came from."""

    def __init__(self, where: str, field: str, problem: str):
        super().__init__(f"{where}: field {field!r}: {problem}")
        self.where, self.field, self.problem = where, field, problem


# invisible and never a line break: what an escaped special token carries after its first character
WORD_JOINER = "\u2060"


def special_token_texts(tokenizer) -> tuple[str, ...]:
    """The strings a tokenizer reads as control tokens: its special tokens (EOS, pad, the chat template's
    <|im_start|>, ...) and every added token marked special; () without a tokenizer."""
    texts = set(getattr(tokenizer, "all_special_tokens", None) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts.update(token.content for token in decoder.values() if getattr(token, "special", False))
    return tuple(sorted(texts))


@functools.lru_cache(maxsize=8)
def _special_pattern(texts: tuple[str, ...]):
    # longest first; one character cannot be split
    usable = sorted((t for t in texts if len(t) > 1), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, usable))) if usable else None


def escape_special_tokens(tokenizer, text: str) -> str:
    """`text` as text: every special token's string in it (special_token_texts) gets a word joiner (U+2060,
    invisible) after its first character, so that "<|im_end|>" in a reply is tokenised as the ordinary
    tokens of "<", U+2060 and "|im_end|>", never as the end of a turn. We escape rather than tokenise with
    split_special_tokens because data text flows as strings (prompts rendered through the chat template
    hold the template's real special tokens beside the user's text): escaped when read, it stays safe
    through every later tokenisation, ours or a library's, and the text otherwise reads the same.
    Idempotent; text without such strings comes back unchanged."""
    pattern = _special_pattern(special_token_texts(tokenizer)) if tokenizer is not None else None
    while pattern is not None and pattern.search(text):  # again: an escape may leave a special string nested in another
        text = pattern.sub(lambda found: found.group()[0] + WORD_JOINER + found.group()[1:], text)
    return text


def split_hh(chosen: str, rejected: str, where: str = "<pair>") -> tuple[str, str, str]:
    """Anthropic HH raw format -> (prompt, chosen response, rejected response). The shared prompt is
    everything up to and including the last "\n\nAssistant:" of the dialogue that both sides share:
    normally the chosen dialogue's last Assistant turn; a few HH rows carry an extra Assistant turn
    inside the chosen response, and there the prompt ends where the two dialogues still agree."""
    common_length = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        common_length += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, common_length)
    if cut < 0:
        field = "chosen" if HH_ASSISTANT not in chosen else "rejected"
        raise DataError(where, field, f"no {HH_ASSISTANT.strip()!r} turn shared by chosen and rejected: not an HH pair")
    prompt = chosen[: cut + len(HH_ASSISTANT)]
    return prompt, chosen[len(prompt):], rejected[len(prompt):]


def container_error(path, error: BaseException, line: int | None = None) -> DataError:
    """A damaged or mislabelled file (a truncated .gz, plain text named .gz, a .parquet that is not
    parquet, a file that cannot be read) as a DataError naming the file, and the line where known,
    instead of a traceback from gzip, zlib or pyarrow."""
    import gzip
    import zlib

    where = f"{path}:{line}" if line else str(path)
    detail = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, EOFError):
        problem = f"the compressed stream ends early ({detail}): the file is truncated; copy or download it again"
    elif isinstance(error, gzip.BadGzipFile) and "Not a gzipped file" in detail:
        problem = f"not gzip-compressed ({detail}): a plain file named .gz? rename it (e.g. to .jsonl) or compress it"
    elif isinstance(error, (gzip.BadGzipFile, zlib.error)):
        problem = f"damaged gzip data ({detail}); copy or download it again"
    elif type(error).__module__.startswith("pyarrow"):
        problem = f"not a readable parquet file ({type(error).__name__}: {detail})"
    else:
        problem = f"cannot read the file ({detail})"
    return DataError(where, "<file>", problem)


def read_jsonl(path: str | Path, yield_errors: bool = False):
    """Yield (where, record) from a .jsonl or .jsonl.gz file; `where` is "file:line" for errors.
    An unreadable line raises DataError, or with yield_errors is yielded as (where, DataError) so
    the caller may skip it and read on. A UTF-8 byte-order mark before the first line is allowed;
    a damaged container (truncated or not gzip) is a DataError at the line where reading stopped."""
    import gzip
    import json
    import zlib

    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        handle = opener(path, "rb")
    except OSError as error:  # e.g. permission denied
        raise container_error(path, error) from None
    number = 0
    try:
        with handle:
            for number, raw in enumerate(handle, start=1):
                where = f"{path}:{number}"
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # utf-8-sig: drop a byte-order mark
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise DataError(where, "<line>", f"expected a JSON object, got {type(record).__name__}")
                except UnicodeDecodeError as error:
                    record = DataError(where, "<line>", f"invalid UTF-8 ({error.reason} at byte {error.start})")
                except json.JSONDecodeError as error:
                    record = DataError(where, "<line>", f"malformed JSON ({error.msg}, column {error.colno})")
                except DataError as error:
                    record = error
                if isinstance(record, DataError) and not yield_errors:
                    raise record
                yield where, record
    except (OSError, EOFError, zlib.error) as error:  # raised while reading line number + 1
        raise container_error(path, error, number + 1) from None


def encode(tokenizer, prompt: str, responses: list[str], max_length: int) -> tuple[list[dict], bool]:
    """Tokenise responses that share one prompt. The prompt is cut from the left (latest turns kept),
    each response from the right, so prompt + response <= max_length; EOS ends every response.
    Returns (one example per response, was anything cut)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids or [tokenizer.eos_token_id]
    encoded = [tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for text in responses]
    longest = max(len(r) for r in encoded)
    # a long response may not squeeze the prompt below half
    prompt_budget = max(max_length - longest, max_length // 2, 1)
    cut = len(prompt_ids) > prompt_budget or min(len(prompt_ids), prompt_budget) + longest > max_length
    prompt_ids = prompt_ids[-prompt_budget:]
    examples = [{"input_ids": prompt_ids + r[: max_length - len(prompt_ids)],
                 "prompt_length": len(prompt_ids)} for r in encoded]
    return examples, cut


def encode_pair(tokenizer, prompt: str, chosen: str, rejected: str, max_length: int) -> tuple[dict, dict, bool]:
    """A preference pair with one shared (identically cut) prompt: (chosen, rejected, was_cut)."""
    (chosen_example, rejected_example), cut = encode(tokenizer, prompt, [chosen, rejected], max_length)
    return chosen_example, rejected_example, cut


def encode_rows(rows: list[dict], tokenizer, max_length: int, report=None) -> list[tuple[dict, ...]]:
    """Rows -> encoded items, as every script trains on them: (chosen, rejected) for a pair (one shared,
    identically cut prompt), (response,) for a demonstration. `report.cut` counts the rows that had to
    be cut to fit max_length."""
    items = []
    for row in rows:
        texts = [row["response"]] if "response" in row else [row["chosen"], row["rejected"]]
        examples, cut = encode(tokenizer, row["prompt"], texts, max_length)
        if report is not None:
            report.cut += cut
        items.append(tuple(examples))
    return items


def collate(examples: list[dict], pad_id: int, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Right-pad examples into input_ids, attention_mask and response_mask (B, T) tensors, on `device`
    (default: the CPU). Models do not move their inputs: the caller puts the batch where the model is."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    response_mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"])
        attention_mask[row, :n] = 1
        response_mask[row, example["prompt_length"]:n] = True
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}
    return batch if device is None else {name: tensor.to(device) for name, tensor in batch.items()}


def _text(record: dict, where: str, field: str, allow_empty: bool = False) -> str:
    if field not in record:
        raise DataError(where, field, "missing")
    value = record[field]
    if not isinstance(value, str):
        raise DataError(where, field, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(where, field, "empty")
    return value


def _check_messages(messages, where: str, field: str) -> None:
    """A conversational field: a non-empty list of {"role": str, "content": str} messages."""
    if not isinstance(messages, list) or not messages:
        got = type(messages).__name__ if not isinstance(messages, list) else "an empty list"
        raise DataError(where, field, f"expected a non-empty list of {{role, content}} messages, got {got}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(where, f"{field}[{index}]",
                            f"expected a {{role, content}} message, got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise DataError(where, f"{field}[{index}].{key}", "missing")
            if not isinstance(message[key], str):
                raise DataError(where, f"{field}[{index}].{key}",
                                f"expected a string, got {type(message[key]).__name__}")


def _render_conversation(tokenizer, prompt, response, where: str, field: str) -> tuple[str, str]:
    """TRL's conversational format: message lists rendered with the tokenizer's chat template. Every
    message is checked first (role and content strings), so the template never sees a bad one."""
    _check_messages(prompt, where, "prompt")
    _check_messages(response, where, field)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(where, field, "conversational data needs a tokenizer with a chat template")
    as_text = lambda messages: [{key: escape_special_tokens(tokenizer, value) if isinstance(value, str) else value
                                 for key, value in message.items()} for message in messages]
    prompt, response = as_text(prompt), as_text(response)  # the messages' text escaped, the template's structure not
    try:
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(prompt + response, tokenize=False)
    except Exception as error:  # the template's own checks (jinja2 raise_exception: e.g. roles must alternate)
        raise DataError(where, field, f"the chat template refused the conversation ({type(error).__name__}: "
                                      f"{str(error).splitlines()[0] if str(error) else ''})") from None
    if not full.startswith(prompt_text):
        raise DataError(where, field, "the chat template does not render the prompt as a prefix of the conversation")
    return prompt_text, full[len(prompt_text):]


def pair_from_record(record: dict, where: str, tokenizer=None) -> dict:
    """One preference pair from any supported format: HH raw (`chosen`/`rejected` dialogues), TRL
    standard (`prompt`/`chosen`/`rejected` strings) or TRL conversational (message lists)."""
    for key in ("chosen", "rejected"):
        if key not in record:
            raise DataError(where, key, "missing")
    if "prompt" not in record:  # Anthropic HH: the prompt is everything up to the last Assistant turn
        prompt, chosen, rejected = split_hh(_text(record, where, "chosen"), _text(record, where, "rejected"), where)
    elif isinstance(record["chosen"], list):
        prompt, chosen = _render_conversation(tokenizer, record["prompt"], record["chosen"], where, "chosen")
        _, rejected = _render_conversation(tokenizer, record["prompt"], record["rejected"], where, "rejected")
    else:
        prompt = _text(record, where, "prompt", allow_empty=True)
        chosen, rejected = _text(record, where, "chosen"), _text(record, where, "rejected")
    # strings from the file are text throughout (rendered ones escaped their content)
    if not isinstance(record["chosen"], list):
        prompt, chosen, rejected = (escape_special_tokens(tokenizer, text) for text in (prompt, chosen, rejected))
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise DataError(where, key, "empty response")
    if chosen == rejected:
        raise DataError(where, "rejected", "identical to chosen: the pair carries no preference")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "where": where}


def demonstration_from_record(record: dict, where: str, tokenizer=None) -> dict:
    """One demonstration: `prompt`/`response`, `prompt`/`completion`, `instruction`/`input`/`output`,
    `question`/`answer`, or the chosen half of a preference pair. Instruction and question formats
    are rendered through the tokenizer's chat template when it has one."""
    def chat(user_text: str) -> str:
        user_text = escape_special_tokens(tokenizer, user_text)  # the user's text escaped, the template's structure not
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                                 add_generation_prompt=True)
        return user_text + "\n\n"

    if "chosen" in record:
        pair = pair_from_record(record, where, tokenizer)
        prompt, response = pair["prompt"], pair["chosen"]
    elif "instruction" in record:
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(where, "input", f"expected a string, got {type(extra).__name__}")
        prompt = chat(_text(record, where, "instruction") + (f"\n\n{extra}" if extra.strip() else ""))
        response = _text(record, where, "output")
    elif "question" in record:
        prompt, response = chat(_text(record, where, "question")), _text(record, where, "answer")
    elif "prompt" in record:
        key = "response" if "response" in record else "completion"
        prompt = escape_special_tokens(tokenizer, _text(record, where, "prompt", allow_empty=True))
        response = _text(record, where, key)
    else:
        raise DataError(where, "<row>", "not a demonstration: expected prompt/response, prompt/completion, "
                        "instruction/input/output, question/answer or chosen/rejected")
    if "chosen" not in record:  # (a pair's chosen half was escaped, or rendered, by pair_from_record)
        response = escape_special_tokens(tokenizer, response)
    return {"prompt": prompt, "response": response, "where": where}


def pair_batches(tokenizer, pairs: list[dict], max_length: int) -> tuple[dict, dict, int]:
    """Preference pairs -> (chosen batch, rejected batch, number of pairs that had to be cut)."""
    encoded = [encode_pair(tokenizer, p["prompt"], p["chosen"], p["rejected"], max_length) for p in pairs]
    pad = tokenizer.pad_token_id
    return (collate([e[0] for e in encoded], pad), collate([e[1] for e in encoded], pad), sum(e[2] for e in encoded))
