"""Sources: rows from the built-in task, a local file or a hub dataset, every row checked."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from avalib import data, distributed, generation


def load_hh_pairs(path: str | Path, limit: int | None = None) -> list[dict]:
    """HH-RLHF preference pairs -> [{"prompt", "chosen", "rejected", "where"}]; bad rows are errors."""
    return load_rows(str(path), "pairs", limit=limit)[0]


def read_records(source: str | Path, split: str = "train", yield_errors: bool = False):
    """Yield (where, record) from a local .json / .jsonl / .jsonl.gz / .parquet file, or from a hub
    dataset id through `datasets` (split as given). `where` names the file and line (or row)."""
    path = Path(source)
    if path.is_file():
        name = path.name
        if name.endswith((".jsonl", ".jsonl.gz")):
            yield from data.read_jsonl(path, yield_errors)
        elif name.endswith(".json"):
            import json

            try:
                loaded = json.loads(path.read_bytes().decode("utf-8"))
            except UnicodeDecodeError as error:
                raise data.DataError(f"{path}", "<file>", f"invalid UTF-8 at byte {error.start}") from None
            except json.JSONDecodeError as error:
                raise data.DataError(f"{path}:{error.lineno}", "<file>", f"malformed JSON ({error.msg})") from None
            rows = loaded.get(split, loaded.get("data")) if isinstance(loaded, dict) else loaded
            if not isinstance(rows, list):
                raise data.DataError(str(path), "<file>", "expected a JSON list of objects (or {split: [...]})")
            for index, record in enumerate(rows):
                if not isinstance(record, dict):
                    raise data.DataError(f"{path}[{index}]", "<row>", f"expected an object, got {type(record).__name__}")
                yield f"{path}[{index}]", record
        elif name.endswith(".parquet"):
            import pyarrow.parquet as pq

            for index, record in enumerate(pq.read_table(path).to_pylist()):
                yield f"{path}:row {index}", record
        else:
            raise data.DataError(str(path), "<file>", "unsupported file type: use .json, .jsonl, .jsonl.gz or .parquet")
    elif str(source).endswith((".json", ".jsonl", ".gz", ".parquet")) or str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{source}: no such file")  # a path, not a hub id ("org/name")
    else:
        import datasets

        for index, record in enumerate(datasets.load_dataset(str(source), split=split)):
            yield f"{source}[{split}]:{index}", record


@dataclass
class LoadReport:
    """What loading did to the rows: kept, skipped (with reasons), cut to fit max_length."""
    source: str
    kept: int = 0
    skipped: dict = field(default_factory=dict)
    cut: int = 0

    def __str__(self):
        skipped = sum(self.skipped.values())
        reasons = "; ".join(f"{n} x {r}" for r, n in self.skipped.items())
        return (f"{self.source}: {self.kept} kept, {skipped} skipped{f' ({reasons})' if skipped else ''}, "
                f"{self.cut} cut to fit --max-length")


def load_rows(source: str, kind: str, split: str = "train", tokenizer=None, skip_bad: bool = False,
              limit: int | None = None) -> tuple[list[dict], LoadReport]:
    """Pairs (kind="pairs") or demonstrations (kind="demos") from a source: "builtin" or
    "builtin:tiny" (the offline task, see task.py), a local file, or a hub dataset id. Bad rows raise
    DataError naming file:line and field, or, with skip_bad, are skipped and counted."""
    report = LoadReport(f"{source} [{split}]")
    if source.startswith("builtin"):  # "builtin[:SIZE][:gold]"; gold = noise-free labels (the gold sign)
        from avalib import task

        parts = source.split(":")[1:]
        size = next((p for p in parts if p != "gold"), "default")
        built = task.load_task(size)
        rows = built.pairs(split, noise_free="gold" in parts) if kind == "pairs" else built.demonstrations(split)
        rows = [dict(row, where=f"builtin:{size}[{split}]:{i}") for i, row in enumerate(rows)][:limit]
        report.kept = len(rows)
        return rows, report
    convert = data.pair_from_record if kind == "pairs" else data.demonstration_from_record
    rows = []
    for where, record in read_records(source, split, yield_errors=True):
        if limit is not None and len(rows) >= limit:
            break
        try:
            if isinstance(record, data.DataError):  # an unreadable line
                raise record
            rows.append(convert(record, where, tokenizer))
        except data.DataError as error:
            if not skip_bad:
                raise
            reason = f"{error.field}: {error.problem.split(' (')[0].split(':')[0]}"
            report.skipped[reason] = report.skipped.get(reason, 0) + 1
    report.kept = len(rows)
    if not rows:
        raise data.DataError(report.source, "<file>", "no usable rows")
    return rows, report


def afd_pairs(demos: list[dict], model_name: str, *, max_new_tokens: int, temperature: float, top_p: float,
              seed: int, model=None, tokenizer=None, dist: distributed.Distributed | None = None) -> list[dict]:
    """AfD (Sun & van der Schaar): pair every demonstration (x, y*) with a sample y~ of the initial
    policy, (x, chosen=y*, rejected=y~). Samples are cached (`cached_generate`). Pairs whose sample is
    empty or equals the demonstration are dropped and counted: they carry no preference."""
    samples = generation.cached_generate(model_name, [d["prompt"] for d in demos], max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, seed=seed, chat_template=False,
                              model=model, tokenizer=tokenizer, dist=dist, desc="AfD: sampling the initial policy")
    pairs = [{"prompt": d["prompt"], "chosen": d["response"], "rejected": s, "where": d["where"]}
             for d, s in zip(demos, samples) if s.strip() and s != d["response"]]
    if (dist is None or dist.is_main) and len(pairs) < len(demos):
        print(f"AfD: {len(demos) - len(pairs)} demonstrations dropped: the initial policy's sample was empty or identical")
    return pairs


def load_prompts(source: str, split: str, tokenizer=None, skip_bad: bool = False, limit: int = 0) -> list[str]:
    """Prompts as the exact text training saw: "builtin[:SIZE]" (the task's chat-templated prompts of
    `split`), or the unique prompts of a pairs / demonstrations file, in order; "none" gives []."""
    if source == "none" or not source:
        return []
    if source.startswith("builtin"):
        from avalib import task

        size = next((part for part in source.split(":")[1:] if part != "gold"), "default")
        prompts = [p["prompt"] for p in task.load_task(size).prompts(split)]
    else:
        rows, _ = load_rows(source, "demos", split, tokenizer, skip_bad)
        prompts = list(dict.fromkeys(row["prompt"] for row in rows))
    return prompts[:limit or None]
