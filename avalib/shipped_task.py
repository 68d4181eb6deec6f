"""The built-in task's sampled replies, shipped with the repository, so that every machine loads one task.

Sampling at temperature 1 is not reproducible across CPUs (a logit rounded differently samples another
token, and the reply diverges from there: builds of the same inputs on three machines gave three reply
sets), so the replies are data, not a recipe: one gzip-compressed JSON-lines file per size in
avalib/task_data/ (one line per request: instruction, prompt, split, responses, n_tokens, finished,
steering; for "large" only its further passes, one line per train request and pass), and MANIFEST.json
beside them with each file's sha256, its counts and the inputs of the build that made it (the size's
TaskConfig, the model's files, torch, the machine, the date, the sampling time).

Reading a file checks its sha256 and counts against the manifest (a damaged or edited file is named, with
the way out, never parsed half-way); `python -m avalib.task --rebuild SIZE` samples the size again and
`compare` says whether, and where, the rebuild differs from the shipped file.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
from pathlib import Path

DATA_DIR = Path(__file__).resolve().with_name("task_data")
MANIFEST = DATA_DIR / "MANIFEST.json"
FIELDS = ("instruction", "prompt", "split", "responses", "n_tokens", "finished", "steering")
PASS_FIELDS = ("instruction", "pass", "responses", "n_tokens", "finished", "steering")  # "large": a further pass


class ShippedTaskError(RuntimeError):
    """A shipped task file is missing, damaged or does not match MANIFEST.json."""


def manifest() -> dict:
    """MANIFEST.json: size -> {file, sha256, bytes, records, replies, replies_sha256, build}."""
    try:
        return json.loads(MANIFEST.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as error:
        raise ShippedTaskError(f"{MANIFEST}: unreadable ({error}); restore it with: git checkout -- {_relative(MANIFEST)}")


def shipped_sizes() -> list[str]:
    return sorted(manifest())


def encode(records: list[dict], fields: tuple[str, ...]) -> bytes:
    """JSON lines, gzip-compressed with a zero timestamp: the same records always give the same bytes."""
    lines = "".join(json.dumps({f: record[f] for f in fields}, ensure_ascii=False, sort_keys=True) + "\n"
                    for record in records)
    return gzip.compress(lines.encode("utf-8"), compresslevel=9, mtime=0)


def replies_sha256(records: list[dict]) -> str:
    """A hash of the replies with their requests and splits (what Task.replies_sha256 returns for a loaded task)."""
    replies = [[r["split"], r["instruction"], r["responses"]] for r in records]
    return hashlib.sha256(json.dumps(replies).encode("utf-8")).hexdigest()[:16]


def read(size: str) -> tuple[list[dict], dict]:
    """The shipped records of `size` and its manifest entry, after checking the file's sha256 and counts."""
    entry = manifest().get(size)
    if entry is None:
        raise ShippedTaskError(f"no shipped task {size!r} in {MANIFEST} (shipped: {shipped_sizes()}); "
                               f"sample it with: python -m avalib.task --rebuild {size}")
    path = DATA_DIR / entry["file"]
    restore = (f"restore it with: git checkout -- {_relative(path)} (or sample the task afresh: "
               f"python -m avalib.task --rebuild {size})")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ShippedTaskError(f"{path}: cannot read the shipped task {size!r} ({error.strerror}); {restore}")
    digest = hashlib.sha256(raw).hexdigest()
    if digest != entry["sha256"]:
        raise ShippedTaskError(f"{path}: sha256 {digest[:16]}... does not match MANIFEST.json's {entry['sha256'][:16]}... "
                               f"(damaged or edited); {restore}")
    records = [json.loads(line) for line in gzip.decompress(raw).decode("utf-8").splitlines()]
    replies = sum(len(r["responses"]) for r in records)
    if (len(records), replies) != (entry["records"], entry["replies"]):
        raise ShippedTaskError(f"{path}: {len(records)} records / {replies} replies, MANIFEST.json says "
                               f"{entry['records']} / {entry['replies']}; {restore}")
    return records, entry


def write(size: str, records: list[dict], build: dict, *, passes: bool = False) -> dict:
    """Ship `records` as the size's file (atomically) and record it in MANIFEST.json; returns the entry."""
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    payload = encode(records, PASS_FIELDS if passes else FIELDS)
    name = f"{size}.jsonl.gz"
    _replace(DATA_DIR / name, payload)
    entry = {"file": name, "sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload),
             "records": len(records), "replies": sum(len(r["responses"]) for r in records),
             **({} if passes else {"replies_sha256": replies_sha256(records)}), "build": build}
    _replace(MANIFEST, (json.dumps({**manifest(), size: entry}, indent=1, sort_keys=True) + "\n").encode("utf-8"))
    return entry


def compare(shipped: list[dict], rebuilt: list[dict], examples: int = 5) -> dict:
    """Where a rebuild's replies differ from the shipped ones: counts per split, and the first `examples`
    differing replies (request, split, reply index, the character where they part, both texts from there).
    Records are matched by (instruction, pass); requests present on one side only are listed."""
    def keyed(records):
        return {(r["instruction"], r.get("pass", 0)): r for r in records}

    old, new = keyed(shipped), keyed(rebuilt)
    report = {"replies": 0, "differing_replies": 0, "differing_requests": 0, "by_split": {},
              "only_shipped": [k[0] for k in old if k not in new], "only_rebuilt": [k[0] for k in new if k not in old],
              "examples": []}
    for key, record in old.items():
        if key not in new:
            continue
        split = record.get("split", "train")
        counts = report["by_split"].setdefault(split, {"replies": 0, "differing": 0})
        differing = 0
        for index, (a, b) in enumerate(zip(record["responses"], new[key]["responses"])):
            counts["replies"] += 1
            report["replies"] += 1
            if a == b:
                continue
            differing += 1
            if len(report["examples"]) < examples:
                at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                report["examples"].append({"instruction": key[0], "split": split, "pass": key[1], "reply": index,
                                           "from_character": at, "shipped": a[at:at + 60], "rebuilt": b[at:at + 60]})
        differing += abs(len(record["responses"]) - len(new[key]["responses"]))
        counts["differing"] += differing
        report["differing_replies"] += differing
        report["differing_requests"] += differing > 0
    report["identical"] = (report["differing_replies"] == 0 and not report["only_shipped"] and not report["only_rebuilt"])
    return report


def describe(report: dict) -> str:
    """compare()'s report as a few lines of text."""
    if report["identical"]:
        return f"the rebuild is identical to the shipped file ({report['replies']} replies)"
    splits = ", ".join(f"{split} {c['differing']} of {c['replies']}" for split, c in report["by_split"].items())
    lines = [f"the rebuild differs from the shipped file in {report['differing_replies']} of {report['replies']} replies, "
             f"{report['differing_requests']} requests ({splits})"]
    if report["only_shipped"] or report["only_rebuilt"]:
        lines.append(f"requests only in the shipped file: {len(report['only_shipped'])}; only in the rebuild: "
                     f"{len(report['only_rebuilt'])}")
    for e in report["examples"]:
        lines.append(f"  {e['split']} request {e['instruction'][:50]!r} reply {e['reply']}"
                     f"{' (pass ' + str(e['pass']) + ')' if e['pass'] else ''}, from character {e['from_character']}: "
                     f"shipped {e['shipped']!r} / rebuilt {e['rebuilt']!r}")
    return "\n".join(lines)


def _replace(path: Path, payload: bytes) -> None:
    """Write payload to path atomically (a temporary file beside it, flushed, then renamed over it)."""
    handle, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
