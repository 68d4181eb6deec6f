"""The built-in task ships with the repository (avalib/task_data/): every machine loads the same replies.

The hashes below are the shipped builds. A test here fails when a shipped file, its counts or its
replies change: re-shipping a task is a deliberate act (`python -m avalib.task --rebuild SIZE --ship`)
after which these values and every table that depends on the task are updated together.
"""
import gzip
import json
import shutil

import pytest

from avalib import generation, models, shipped_task, task, task_sampling

# size: (sha256 of the file, request records, replies, Task.replies_sha256 of the loaded task)
SHIPPED = {
    "default": ("9ed92437a5cffd418da964375ff2e40814171c20d32e9eff9a2810332a99f380", 432, 2592, "b55e9fec3f911997"),
    "large": ("bb09cdd6128be214218cb85921ecd3d1c07e4f3a1bf68ef5b9304f7c12d02619", 311, 1866, "37843a1a115f62b7"),
    "tiny": ("aa9aea38fa6f3bd0671c7ea3d7fdd22e51dea56d901bdad1ee0b9b2aa590e872", 12, 36, "f8f94e6ca6f877ec"),
    "v1": ("6026f6708ad15f12a6147657181aebaa99139fcff0e086f44de51e3174ba6c19", 432, 1728, "b3ad6e2a02664dee"),
    "v1-tiny": ("0d331184b1d5930ffb2fd0de90956250268615180a31bc31410bbbbca7e00127", 12, 24, "f7fdeefcc6fc6e44"),
}
PAIRS = {"default": (4665, 645, 1170), "large": (9330, 645, 1170)}


@pytest.mark.parametrize("size", sorted(SHIPPED))
def test_the_shipped_file_is_the_recorded_build(size):
    sha256, records, replies, replies_sha256 = SHIPPED[size]
    entry = shipped_task.manifest()[size]
    assert (entry["sha256"], entry["records"], entry["replies"]) == (sha256, records, replies)
    loaded, _ = shipped_task.read(size)  # checks the file's bytes against the manifest
    assert len(loaded) == records and sum(len(r["responses"]) for r in loaded) == replies
    assert task.load_task(size, progress=False).replies_sha256() == replies_sha256
    assert {"config", "model", "torch", "cpu", "date", "seconds"} <= set(entry["build"])


def test_every_size_is_shipped():
    assert set(shipped_task.manifest()) == set(task.SIZE_NAMES)


def test_loading_the_shipped_task_samples_nothing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("loading a shipped task sampled or loaded a model")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(generation, "generate_ids", refuse)
    monkeypatch.setattr(models, "resolve_model_path", refuse)
    for size, counts in PAIRS.items():
        loaded = task.load_task(size, progress=False)
        assert not loaded.built_now and loaded.path.parent == shipped_task.DATA_DIR
        assert tuple(len(loaded.pairs(split)) for split in task.SPLITS) == counts
    large, default = task.load_task("large", progress=False), task.load_task("default", progress=False)
    assert large.pairs("train")[:4665] == default.pairs("train")  # pass 0 is the default's, pair for pair
    assert large.pairs("test") == default.pairs("test") and large.pairs("dev") == default.pairs("dev")


@pytest.fixture
def shipped_copy(tmp_path, monkeypatch):
    """The shipped files copied to a temporary directory that shipped_task reads instead."""
    directory = tmp_path / "task_data"
    shutil.copytree(shipped_task.DATA_DIR, directory)
    monkeypatch.setattr(shipped_task, "DATA_DIR", directory)
    monkeypatch.setattr(shipped_task, "MANIFEST", directory / "MANIFEST.json")
    return directory


def test_a_damaged_or_edited_shipped_file_is_named_with_the_way_out(shipped_copy):
    path = shipped_copy / "tiny.jsonl.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(shipped_task.ShippedTaskError, match=r"tiny\.jsonl\.gz: sha256 .* git checkout"):
        task.load_task("tiny", progress=False)
    lines = gzip.decompress(raw).decode().splitlines()
    edited = gzip.compress(("\n".join(lines[:-1]) + "\n").encode(), mtime=0)  # a request removed
    path.write_bytes(edited)
    with pytest.raises(shipped_task.ShippedTaskError, match="does not match MANIFEST"):
        task.load_task("tiny", progress=False)
    manifest = json.loads((shipped_copy / "MANIFEST.json").read_text())
    manifest["tiny"]["sha256"] = shipped_task.hashlib.sha256(edited).hexdigest()  # the manifest edited to match
    (shipped_copy / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(shipped_task.ShippedTaskError, match="11 records / 33 replies, MANIFEST.json says 12 / 36"):
        task.load_task("tiny", progress=False)
    path.unlink()
    with pytest.raises(shipped_task.ShippedTaskError, match="cannot read the shipped task 'tiny'"):
        task.load_task("tiny", progress=False)
    (shipped_copy / "MANIFEST.json").write_text("{")
    with pytest.raises(shipped_task.ShippedTaskError, match="MANIFEST.json: unreadable"):
        task.load_task("tiny", progress=False)


def test_encoding_is_deterministic_and_round_trips():
    records, _ = shipped_task.read("tiny")
    payload = shipped_task.encode(records, shipped_task.FIELDS)
    assert payload == (shipped_task.DATA_DIR / "tiny.jsonl.gz").read_bytes()  # same records, same bytes
    assert [json.loads(line) for line in gzip.decompress(payload).decode().splitlines()] == records


def test_compare_says_where_a_rebuild_differs():
    records, _ = shipped_task.read("tiny")
    assert shipped_task.compare(records, records)["identical"]
    changed = json.loads(json.dumps(records))
    reply = changed[3]["responses"][1]
    changed[3]["responses"][1] = reply[:4] + "#" + reply[5:]
    report = shipped_task.compare(records, changed)
    assert not report["identical"] and report["differing_replies"] == 1 and report["differing_requests"] == 1
    assert report["by_split"][records[3]["split"]]["differing"] == 1
    example = report["examples"][0]
    assert (example["instruction"], example["reply"], example["from_character"]) == (records[3]["instruction"], 1, 4)
    assert example["rebuilt"].startswith("#") and "differs from the shipped file in 1 of 36" in shipped_task.describe(report)
    report = shipped_task.compare(records, changed[:-1])
    assert report["only_shipped"] == [records[-1]["instruction"]] and not report["identical"]


@pytest.fixture
def fake_embedded_sampler(tmp_path, monkeypatch):
    """A fake embedded model: a model directory, a tokenizer, and a sampler whose replies follow the seed."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "model.safetensors").write_bytes(b"weights")

    class Tokenizer:
        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
            return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(f"w{i}" for i in ids)

    def generate_ids(model, tokenizer, prompts, *, seed, **kwargs):
        return [generation.Generation(prompt_ids=[1], response_ids=[seed, i % 7], finished=True) for i in range(len(prompts))]

    monkeypatch.setattr(models, "resolve_model_path", lambda name=None: str(model_dir))
    monkeypatch.setattr(models, "load_model", lambda path: (None, Tokenizer()))
    monkeypatch.setattr(generation, "chat_prompt_text", lambda tokenizer, instruction: f"<user>{instruction}<assistant>")
    monkeypatch.setattr(generation, "generate_ids", generate_ids)
    monkeypatch.setenv("AVA_CACHE", str(tmp_path / "cache"))


def test_rebuild_reports_the_difference_and_ship_replaces_the_file(shipped_copy, fake_embedded_sampler, tmp_path, capsys):
    before = (shipped_copy / "v1-tiny.jsonl.gz").read_bytes()
    task.main(["--rebuild", "v1-tiny", "--diff-json", str(tmp_path / "diff.json"), "--no-progress"])
    assert "differs from the shipped file in 24 of 24 replies" in capsys.readouterr().out
    diff = json.loads((tmp_path / "diff.json").read_text())
    assert diff["differing_replies"] == 24 and diff["build"]["config"]["size"] == "v1-tiny"
    assert (shipped_copy / "v1-tiny.jsonl.gz").read_bytes() == before  # a rebuild alone changes nothing
    task.main(["--rebuild", "v1-tiny", "--ship", "--no-progress"])
    shipped = task.load_task("v1-tiny", progress=False)
    assert shipped.records[0]["responses"] == ["w0 w0", "w0 w1"]  # the fake sampler's replies, now shipped
    task.main(["--rebuild", "v1-tiny", "--no-progress"])
    assert "identical to the shipped file (24 replies)" in capsys.readouterr().out
    assert task_sampling.TASK_FORMAT_VERSION == shipped_task.manifest()["v1-tiny"]["build"]["format"]
