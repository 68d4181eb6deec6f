"""Sources: rows from the built-in task, a local file, a local dataset directory or a hub dataset (with a
subset), every row checked; `parse_source` is the one parser of a source's name."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from avalib import data, distributed, generation


def load_hh_pairs(path: str | Path, limit: int | None = None) -> list[dict]:
    """HH-RLHF preference pairs -> [{"prompt", "chosen", "rejected", "where"}]; bad rows are errors."""
    return load_rows(str(path), "pairs", limit=limit)[0]


FILE_TYPES = (".jsonl", ".jsonl.gz", ".json", ".parquet")


@dataclass(frozen=True)
class Source:
    """A parsed --data / --eval-data / --prompts / --demos value (`parse_source`)."""
    kind: str          # "builtin", "file", "directory" (laid out as a hub dataset) or "hub"
    location: str      # builtin: the task size; file / directory: the path; hub: the dataset id
    subset: str = ""   # directory / hub: the subset's data directory (datasets' data_dir), e.g. "harmless-base"
    gold: bool = False  # builtin: the noise-free labels (the gold sign)


def parse_source(spec: str) -> Source:
    """The one parser of data sources:
      builtin[:SIZE][:gold]   the offline task (task.py): SIZE "default", "large" (default with twice the
                              train replies) or "tiny"; gold = noise-free labels
      PATH                    a local .json, .jsonl, .jsonl.gz or .parquet file
      DIR[:SUBSET]            a local directory laid out as a hub dataset: DIR/SUBSET/SPLIT.jsonl.gz (or
                              .jsonl, .json, .parquet, SPLIT-00000-of-00001.parquet, data/SPLIT-*...)
      ORG/NAME[:SUBSET]       a hub dataset: datasets.load_dataset(NAME, data_dir=SUBSET, split=SPLIT),
                              e.g. Anthropic/hh-rlhf:harmless-base
    A bad spec is a DataError naming it; a path that does not exist is a FileNotFoundError."""
    spec = str(spec).strip()
    if not spec:
        raise data.DataError("''", "<source>", "empty: give builtin, a file, a directory or a hub dataset id")
    if spec == "builtin" or spec.startswith("builtin:"):
        from avalib import task

        parts = spec.split(":")[1:]
        sizes = [p for p in parts if p != "gold"]
        if len(sizes) > 1 or any(size not in task.SIZE_NAMES for size in sizes):
            raise data.DataError(spec, "<source>",
                                 f"expected builtin[:SIZE][:gold] with SIZE one of {sorted(task.SIZE_NAMES)}")
        return Source("builtin", sizes[0] if sizes else "default", gold="gold" in parts)
    path = Path(spec).expanduser()
    if path.exists():
        return Source("directory" if path.is_dir() else "file", str(path))
    base, _, subset = spec.rpartition(":")
    if base and subset and "/" not in subset and Path(base).expanduser().is_dir():
        return Source("directory", str(Path(base).expanduser()), subset)
    looks_local = (spec.startswith((".", "/", "~")) or spec.endswith(FILE_TYPES + (".gz",))
                   or (base and base.startswith((".", "/", "~"))))
    if looks_local:  # a path, not a hub id ("org/name")
        raise FileNotFoundError(f"{spec}: no such file or directory")
    return Source("hub", base if base and subset else spec, subset if base else "")


def builtin_default(spec: str, gold: bool) -> str:
    """What a script evaluates on by default when its data is the built-in task: the same size, with the
    gold labels (gold=True: "builtin:SIZE:gold") or as prompts ("builtin:SIZE"); "" for other data."""
    if not (spec == "builtin" or spec.startswith("builtin:")):
        return ""
    source = parse_source(spec)
    return f"builtin:{source.location}" + (":gold" if gold else "")


def load_eval_pairs(args, tokenizer) -> tuple[list[tuple[dict, dict]], LoadReport | None]:
    """The evaluation pairs of a script's args (eval_data, or the built-in task's gold-labelled size of
    its data; eval_split, eval_limit, skip_bad_rows, max_length), encoded: ([(chosen, rejected)], report)."""
    source = args.eval_data or builtin_default(args.data, gold=True)
    if not source:
        return [], None
    rows, report = load_rows(source, "pairs", args.eval_split, tokenizer, args.skip_bad_rows, args.eval_limit or None)
    return data.encode_rows(rows, tokenizer, args.max_length, report), report


def split_files(directory: Path, split: str) -> list[Path]:
    """A dataset directory's files for `split`, as the hub lays them out: SPLIT.EXT, SPLIT-*.EXT or
    SPLIT_*.EXT, directly in it or in its data/ folder. None is a DataError listing what is there."""
    def matches(folder: Path) -> list[Path]:
        if not folder.is_dir():
            return []
        return sorted(f for f in folder.iterdir() if f.is_file() and f.name.endswith(FILE_TYPES)
                      and any(f.name.startswith(split + sep) for sep in (".", "-", "_")))

    files = matches(directory) or matches(directory / "data")
    if not files:
        if not directory.is_dir():
            raise data.DataError(str(directory), "<directory>", "no such subset directory"
                                 + _listing(directory.parent, "subsets here"))
        raise data.DataError(str(directory), "<directory>",
                             f"a directory with no data file for split {split!r} (expected {split}.jsonl.gz, "
                             f"{split}.jsonl, {split}.json, {split}.parquet or {split}-*.parquet in it or in its "
                             f"data/){_listing(directory)}; pass a file, or DIR:SUBSET for a dataset directory laid "
                             "out as on the hub")
    return files


def _listing(directory: Path, what: str = "found") -> str:
    names = sorted(f.name + ("/" if f.is_dir() else "") for f in directory.iterdir()) if directory.is_dir() else []
    return f"; {what}: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}" if names else ""


def read_file(path: Path, split: str = "train", yield_errors: bool = False):
    """Yield (where, record) from one local .jsonl / .jsonl.gz / .json / .parquet file: the one opener
    of every container format. `where` names the file and line (or row). A damaged or mislabelled
    container (truncated gzip, plain text named .gz, not parquet, gzip or parquet named .jsonl) is a
    DataError naming the file, never a traceback from gzip or pyarrow."""
    name = path.name
    if not name.endswith(FILE_TYPES):
        raise data.DataError(str(path), "<file>", f"unsupported file type: use {', '.join(FILE_TYPES)}")
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as error:
        raise data.container_error(path, error) from None
    if name.endswith((".jsonl", ".json")) and head[:2] == b"\x1f\x8b":
        raise data.DataError(str(path), "<file>", "gzip-compressed data in a file named without .gz: name it .jsonl.gz")
    if name.endswith((".jsonl", ".json", ".jsonl.gz")) and head == b"PAR1":
        raise data.DataError(str(path), "<file>", "a parquet file named as JSON: name it .parquet")
    if name.endswith((".jsonl", ".jsonl.gz")):
        yield from data.read_jsonl(path, yield_errors)
    elif name.endswith(".json"):
        yield from _read_json(path, split)
    else:
        yield from _read_parquet(path)


def _read_json(path: Path, split: str):
    """A .json file: a list of objects, or {split: [...]} / {"data": [...]}."""
    import json

    try:
        loaded = json.loads(path.read_bytes().decode("utf-8-sig"))  # utf-8-sig: a byte-order mark is allowed
    except OSError as error:
        raise data.container_error(path, error) from None
    except UnicodeDecodeError as error:
        raise data.DataError(f"{path}", "<file>", f"invalid UTF-8 at byte {error.start}") from None
    except json.JSONDecodeError as error:
        raise data.DataError(f"{path}:{error.lineno}", "<file>", f"malformed JSON ({error.msg})") from None
    rows = loaded.get(split, loaded.get("data")) if isinstance(loaded, dict) else loaded
    if not isinstance(rows, list):
        keys = f" (its keys: {sorted(loaded)[:8]})" if isinstance(loaded, dict) else ""
        raise data.DataError(str(path), "<file>", f"expected a JSON list of objects, or {{{split!r}: [...]}}{keys}")
    for index, record in enumerate(rows):
        if not isinstance(record, dict):
            raise data.DataError(f"{path}[{index}]", "<row>", f"expected an object, got {type(record).__name__}")
        yield f"{path}[{index}]", record


def _read_parquet(path: Path):
    import pyarrow
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, pyarrow.ArrowException) as error:
        raise data.container_error(path, error) from None
    for index, record in enumerate(rows):
        yield f"{path}:row {index}", record


def read_records(source: str | Path | Source, split: str = "train", yield_errors: bool = False):
    """Yield (where, record) from a local file, a local dataset directory (its files for `split`) or a
    hub dataset (`parse_source`). `where` names the file and line (or row)."""
    parsed = source if isinstance(source, Source) else parse_source(str(source))
    if parsed.kind == "file":
        yield from read_file(Path(parsed.location), split, yield_errors)
    elif parsed.kind == "directory":
        for path in split_files(Path(parsed.location) / parsed.subset, split):
            yield from read_file(path, split, yield_errors)
    elif parsed.kind == "hub":
        name = f"{parsed.location}{':' + parsed.subset if parsed.subset else ''}"
        for index, record in enumerate(_load_hub(parsed, split)):
            yield f"{name}[{split}]:{index}", record
    else:
        raise ValueError(f"read_records: {parsed.kind} rows come from load_rows")


def _load_hub(parsed: Source, split: str):
    """datasets.load_dataset(id, data_dir=subset, split=split); its failures (offline, unknown id,
    subset or split) as one DataError naming the dataset."""
    import datasets

    where = f"{parsed.location}{':' + parsed.subset if parsed.subset else ''}"
    try:
        return datasets.load_dataset(parsed.location, data_dir=parsed.subset or None, split=split)
    except (OSError, ValueError, ConnectionError, datasets.exceptions.DatasetsError) as error:
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise data.DataError(f"{where} [{split}]", "<source>",
                             f"cannot load this hub dataset ({type(error).__name__}: {detail}); "
                             "no local file or directory has this name either") from None


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
    """Pairs (kind="pairs") or demonstrations (kind="demos") from a source (`parse_source`): "builtin"
    or "builtin:tiny" (the offline task, see task.py), a local file, a local dataset directory, or a
    hub dataset id with an optional subset. Bad rows raise DataError naming file:line and field, or,
    with skip_bad, are skipped and counted; a damaged file is a DataError whatever skip_bad says. Read with
    the `tokenizer` that will tokenise them (every script does), the rows' text is escaped against its
    special tokens (data.escape_special_tokens); the built-in task's prompts keep the chat template's."""
    report = LoadReport(f"{source} [{split}]")
    parsed = parse_source(source)
    if parsed.kind == "builtin":
        from avalib import task

        built = task.load_task(parsed.location)
        rows = built.pairs(split, noise_free=parsed.gold) if kind == "pairs" else built.demonstrations(split)
        rows = [dict(row, where=f"builtin:{parsed.location}[{split}]:{i}") for i, row in enumerate(rows)][:limit]
        report.kept = len(rows)
        return rows, report
    convert = data.pair_from_record if kind == "pairs" else data.demonstration_from_record
    rows = []
    for where, record in read_records(parsed, split, yield_errors=True):
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
    # text (a cache entry older than generate's escape)
    samples = [data.escape_special_tokens(tokenizer, s) for s in samples]
    pairs = [{"prompt": d["prompt"], "chosen": d["response"], "rejected": s, "where": d["where"]}
             for d, s in zip(demos, samples) if s.strip() and s != d["response"]]
    if (dist is None or dist.is_main) and len(pairs) < len(demos):
        print(f"AfD: {len(demos) - len(pairs)} demonstrations dropped: "
              "the initial policy's sample was empty or identical")
    return pairs


def load_prompts(source: str, split: str, tokenizer=None, skip_bad: bool = False, limit: int = 0) -> list[str]:
    """Prompts as the exact text training saw: "builtin[:SIZE]" (the task's chat-templated prompts of
    `split`), or the unique prompts of a pairs / demonstrations file, in order; "none" gives []."""
    if source == "none" or not source:
        return []
    if parse_source(source).kind == "builtin":
        from avalib import task

        prompts = [p["prompt"] for p in task.load_task(parse_source(source).location).prompts(split)]
    else:
        rows, _ = load_rows(source, "demos", split, tokenizer, skip_bad)
        prompts = list(dict.fromkeys(row["prompt"] for row in rows))
    return prompts[:limit or None]
