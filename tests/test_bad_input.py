"""The project's corpus of malformed and odd inputs, run against train_rm.py, train_direct.py and
train_ppo.py as a new user would (on a tiny random Llama with SmolLM2's tokenizer).

Every case must end with a non-zero exit, no traceback, and a message naming the file, line and field
(`file:line: field 'x': problem`) or the flag. Cases run in-process through `script.run_script`, the
scripts' own `__main__`, so that an exception it would not turn into one line fails the test with its
traceback; three run as real subprocesses to prove that no traceback reaches the user. Damaged models
and resumes with changed flags are in the corpus too (tests/test_trust.py has the caches and injected
control tokens). Valid but odd files (a byte-order mark, CRLF, a dataset directory laid out as on the
hub) must be read.
"""
import gzip
import json
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

import train_direct
import train_ppo
import train_rm
from avalib import script, sources
from conftest import ROOT

SCRIPTS = {"rm": train_rm, "direct": train_direct, "ppo": train_ppo}
DATA_FLAG = {"rm": "--data", "direct": "--data", "ppo": "--prompts"}


def pair(i: int) -> dict:
    return {"prompt": f"Question {i}?", "chosen": f" A kind answer {i}.", "rejected": f" Go away {i}."}


def lines(*rows) -> bytes:
    return b"".join(row if isinstance(row, bytes) else json.dumps(row).encode() + b"\n" for row in rows)


GOOD = lines(*[pair(i) for i in range(8)])
CONVERSATION = {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Hello."}],
                "rejected": [{"role": "assistant", "content": "Go."}]}


def truncated_checkpoint() -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({"step": 2, "model": {"w": torch.zeros(4096)}, "rng": {}}, buffer)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


# name -> (relative path, bytes); `{name}` in a case's arguments and expected text becomes its path
FILES = {
    "truncated_gz": ("truncated.jsonl.gz", lambda: gzip.compress(lines(*[pair(i) for i in range(400)]))[:1500]),
    "plain_gz": ("plain.jsonl.gz", lambda: GOOD),
    "fake_parquet": ("rows.parquet", lambda: b"prompt,chosen,rejected\nq,a,b\n"),
    "gzip_named_jsonl": ("packed.jsonl", lambda: gzip.compress(GOOD)),
    "content_list": ("conv.jsonl", lambda: lines(CONVERSATION, dict(CONVERSATION, chosen=[
        {"role": "assistant", "content": "Hello."}, {"role": "assistant", "content": [{"type": "text", "text": "x"}]}]))),
    "content_none": ("conv_none.jsonl", lambda: lines(dict(CONVERSATION, prompt=[{"role": "user", "content": None}]))),
    "no_role": ("conv_role.jsonl", lambda: lines(dict(CONVERSATION, rejected=[{"content": "Go."}]))),
    "role_int": ("conv_role_int.jsonl", lambda: lines(dict(CONVERSATION, prompt=[{"role": 1, "content": "Hi?"}]))),
    "messages_str": ("conv_str.jsonl", lambda: lines(dict(CONVERSATION, rejected=["Go."]))),
    "truncated_json": ("cut.jsonl", lambda: GOOD[:200] + b'\n{"prompt": "p", "chosen": "a", "rej\n'),
    "missing_key": ("missing.jsonl", lambda: lines(pair(0), {"prompt": "p", "chosen": " a"})),
    "wrong_type": ("type.jsonl", lambda: lines(pair(0), {"prompt": "p", "chosen": 3, "rejected": " b"})),
    "invalid_utf8": ("utf8.jsonl", lambda: lines(pair(0), b'{"prompt": "p", "chosen": "\xff\xfe", "rejected": "r"}\n')),
    "identical": ("same.jsonl", lambda: lines(pair(0), pair(1), {"prompt": "p", "chosen": " same", "rejected": " same"})),
    "empty_response": ("empty_resp.jsonl", lambda: lines(pair(0), {"prompt": "p", "chosen": "   ", "rejected": " r"})),
    "csv": ("rows.csv", lambda: b"prompt,chosen,rejected\nq,a,b\n"),
    "empty_file": ("empty.jsonl", lambda: b""),
    "list_line": ("list_line.jsonl", lambda: lines(pair(0), [1, 2, 3])),
    "json_dict": ("dict.json", lambda: json.dumps({"rows": [pair(0)]}).encode()),
    "json_scalar_row": ("scalars.json", lambda: json.dumps([pair(0), "text"]).encode()),
    "hh_unshared": ("hh.jsonl", lambda: lines({"chosen": "Human: hi Assistant: yes", "rejected": "Human: hi Assistant: no"})),
    "data_dir": ("not-a-dataset/notes.txt", lambda: b"hello"),
    "hub_dir": ("hub/harmless-base/train.jsonl", lambda: GOOD),
    "checkpoint_cut": ("cut-run/checkpoint.pt", truncated_checkpoint),
    "checkpoint_text": ("text-run/checkpoint.pt", lambda: b"this is not a checkpoint\n"),
    "checkpoint_empty": ("empty-run/checkpoint.pt", lambda: b""),
    "a_file": ("a-file", lambda: b"x"),
}


@dataclass
class Case:
    script: str
    name: str
    argv: list
    expected: list  # substrings of the message

    @property
    def id(self):
        return f"{self.script}-{self.name}"


def data_case(script_name: str, name: str, file: str, *expected: str, extra=()) -> Case:
    return Case(script_name, name, [DATA_FLAG[script_name], file, *extra], list(expected))


def data_cases(script_name: str, names: list[str]) -> list[Case]:
    table = {
        "truncated .jsonl.gz": ("{truncated_gz}", "{truncated_gz}:", "field '<file>'", "truncated"),
        "plain text named .gz": ("{plain_gz}", "{plain_gz}:1: field '<file>': not gzip-compressed"),
        ".parquet that is not parquet": ("{fake_parquet}", "{fake_parquet}: field '<file>': not a readable parquet file"),
        "gzip named .jsonl": ("{gzip_named_jsonl}", "{gzip_named_jsonl}: field '<file>': gzip-compressed data"),
        "message content a list": ("{content_list}", "{content_list}:2: field 'chosen[1].content': expected a string, got list"),
        "message content null": ("{content_none}", "{content_none}:1: field 'prompt[0].content': expected a string, got NoneType"),
        "message without role": ("{no_role}", "{no_role}:1: field 'rejected[0].role': missing"),
        "message role an int": ("{role_int}", "{role_int}:1: field 'prompt[0].role': expected a string, got int"),
        "messages not dicts": ("{messages_str}", "{messages_str}:1: field 'rejected[0]': expected a {{role, content}} message"),
        "truncated JSON line": ("{truncated_json}", "{truncated_json}:", "field '<line>': malformed JSON"),
        "missing key": ("{missing_key}", "{missing_key}:2: field 'rejected': missing"),
        "wrong type": ("{wrong_type}", "{wrong_type}:2: field 'chosen': expected a string, got int"),
        "invalid UTF-8": ("{invalid_utf8}", "{invalid_utf8}:2: field '<line>': invalid UTF-8"),
        "chosen == rejected": ("{identical}", "{identical}:3: field 'rejected': identical to chosen"),
        "empty response": ("{empty_response}", "{empty_response}:2: field 'chosen': empty"),
        "unsupported extension": ("{csv}", "{csv}: field '<file>': unsupported file type"),
        "empty file": ("{empty_file}", "{empty_file} [", "no usable rows"),
        "a JSON list as a line": ("{list_line}", "{list_line}:2: field '<line>': expected a JSON object, got list"),
        ".json without the split": ("{json_dict}", "{json_dict}: field '<file>': expected a JSON list of objects", "rows"),
        ".json with a non-object row": ("{json_scalar_row}", "{json_scalar_row}[1]: field '<row>': expected an object, got str"),
        "HH pair without a shared Assistant turn": ("{hh_unshared}", "{hh_unshared}:1: field 'chosen'", "Assistant"),
        "a directory": ("{data_dir_dir}", "not-a-dataset", "field '<directory>'", "no data file for split"),
        "a missing file": ("{a_file}.jsonl", "{a_file}.jsonl: no such file or directory"),
        "an unknown builtin size": ("builtin:huge", "builtin:huge: field '<source>'", "tiny"),
        "an unknown subset of a dataset directory": ("{hub_dir_dir}/..:helpful-base", "helpful-base: field '<directory>'",
                                                     "no such subset", "harmless-base/"),
        "an empty source": ("", "field '<source>': empty"),
    }
    return [data_case(script_name, name, *table[name]) for name in names]


def flag_case(script_name: str, name: str, flags: list, *expected: str) -> Case:
    return Case(script_name, name, list(flags), list(expected))


def common_cases(s: str) -> list[Case]:
    """Flags every script shares (TrainFlags), and the faults of OUTPUT_DIR and --resume."""
    return [
        flag_case(s, "batch size 0", ["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
        flag_case(s, "negative lr", ["--lr", "-0.001"], "--lr: must be a finite number > 0, got -0.001"),
        flag_case(s, "NaN lr", ["--lr", "nan"], "--lr: must be a finite number > 0, got nan"),
        flag_case(s, "max length 1", ["--max-length", "1"], "--max-length: must be >= 2", "a prompt token and a response token"),
        flag_case(s, "trainable layers beyond the model", ["--trainable-layers", "3"], "--trainable-layers 3", "has 2 decoder layers"),
        flag_case(s, "trainable layers -2", ["--trainable-layers", "-2"], "--trainable-layers: must be >= -1, got -2"),
        flag_case(s, "output dir under a file", ["--output-dir", "{a_file}/run"], "--output-dir {a_file}/run: cannot write there"),
        flag_case(s, "resume without a checkpoint", ["--output-dir", "{data_dir_dir}", "--resume"], "--resume: no checkpoint at"),
        flag_case(s, "resume from a truncated checkpoint", ["--output-dir", "{checkpoint_cut_dir}", "--resume"],
                  "--resume: {checkpoint_cut} is damaged", "without --resume"),
        flag_case(s, "NaN injected into the loss", ["--inject-nan-at-step", "1"],
                  "non-finite loss (nan)", "no checkpoint was written yet", "--skip-nonfinite"),
    ]


CASES = [
    # ---- train_rm.py ----
    *data_cases("rm", ["truncated .jsonl.gz", "plain text named .gz", ".parquet that is not parquet", "gzip named .jsonl",
                       "message content a list", "message content null", "message without role", "message role an int",
                       "messages not dicts", "truncated JSON line", "missing key", "wrong type", "invalid UTF-8",
                       "chosen == rejected", "empty response", "unsupported extension", "empty file", "a JSON list as a line",
                       ".json without the split", ".json with a non-object row", "HH pair without a shared Assistant turn",
                       "a directory", "a missing file", "an unknown builtin size", "an unknown subset of a dataset directory",
                       "an empty source"]),
    *common_cases("rm"),
    flag_case("rm", "alpha 0", ["--alpha", "0"], "--alpha: must be a finite number > 0", "every Q-value is equal"),
    flag_case("rm", "gamma above 1", ["--gamma", "1.5"], "--gamma: must be a finite number in [0, 1], got 1.5"),
    flag_case("rm", "epochs 0", ["--epochs", "0"], "--epochs: must be >= 1, got 0"),
    flag_case("rm", "log every 0", ["--log-every", "0"], "--log-every: must be >= 1, got 0"),
    flag_case("rm", "infinite weight decay", ["--weight-decay", "inf"], "--weight-decay: must be a finite number >= 0, got inf"),
    flag_case("rm", "AfD top-p 0", ["--afd-top-p", "0"], "--afd-top-p: must be a finite number in (0, 1], got 0.0"),
    flag_case("rm", "unknown ablation", ["--ablate", "w/o nonsense"], "--ablate: unknown ['w/o nonsense']"),
    flag_case("rm", "two bad flags at once", ["--eval-batch-size", "0", "--max-grad-norm", "-1"],
              "--eval-batch-size: must be >= 1, got 0", "--max-grad-norm: must be a finite number >= 0, got -1.0"),
    flag_case("rm", "resume from a text file", ["--output-dir", "{checkpoint_text_dir}", "--resume"],
              "{checkpoint_text} is damaged or not a checkpoint"),
    flag_case("rm", "resume from an empty file", ["--output-dir", "{checkpoint_empty_dir}", "--resume"],
              "{checkpoint_empty} is damaged or not a checkpoint"),
    flag_case("rm", "bad eval data", ["--eval-data", "{missing_key}"], "{missing_key}:2: field 'rejected': missing"),
    flag_case("rm", "no such model", ["--model", "{a_file}-model"], "cannot load a tokenizer from", "a-file-model"),
    flag_case("rm", "a model with truncated weights", ["--model", "{damaged_model}"],
              "cannot load a causal LM from '{damaged_model}': model.safetensors (truncated", "copy or save the model again"),
    flag_case("rm", "resume with a changed objective", ["--output-dir", "{changed_run}", "--resume"],
              "--resume: {changed_run}/checkpoint.pt was written with other flags that change the optimisation",
              "--objective 'bt' (now 'ava-p')", "--resume-override"),
    # ---- train_direct.py ----
    *data_cases("direct", ["truncated .jsonl.gz", "plain text named .gz", ".parquet that is not parquet",
                           "message content a list", "message without role", "truncated JSON line", "chosen == rejected",
                           "a directory", "empty file", "gzip named .jsonl"]),
    *common_cases("direct"),
    flag_case("direct", "DPO beta 0", ["--objective", "dpo", "--dpo-beta", "0"], "--dpo-beta: must be a finite number > 0"),
    flag_case("direct", "top-p above 1", ["--top-p", "1.5"], "--top-p: must be a finite number in (0, 1], got 1.5"),
    flag_case("direct", "negative temperature", ["--temperature", "-1"], "--temperature: must be a finite number >= 0"),
    flag_case("direct", "negative LoRA rank", ["--lora-r", "-1"], "--lora-r: must be >= 0, got -1"),
    flag_case("direct", "LoRA dropout 1", ["--lora-dropout", "1"], "--lora-dropout: must be a finite number in [0, 1), got 1.0"),
    flag_case("direct", "samples per prompt 0", ["--samples-per-prompt", "0"], "--samples-per-prompt: must be >= 1, got 0"),
    flag_case("direct", "alpha 0", ["--alpha", "0"], "--alpha: must be a finite number > 0"),
    flag_case("direct", "empty LoRA targets", ["--lora-target-modules", ","], "--lora-target-modules: empty"),
    # ---- train_ppo.py ----
    *data_cases("ppo", ["truncated .jsonl.gz", "plain text named .gz", ".parquet that is not parquet", "message content a list",
                        "missing key", "a directory", "invalid UTF-8"]),
    *common_cases("ppo"),
    flag_case("ppo", "rollout batch 0", ["--rollout-batch", "0"], "--rollout-batch: must be >= 1, got 0"),
    flag_case("ppo", "minibatch 0", ["--minibatch", "0"], "--minibatch: must be >= 1, got 0"),
    flag_case("ppo", "updates 0", ["--updates", "0"], "--updates: must be >= 1, got 0"),
    flag_case("ppo", "cliprange 0", ["--cliprange", "0"], "--cliprange: must be a finite number > 0, got 0.0"),
    flag_case("ppo", "temperature 0", ["--temperature", "0"], "--temperature: must be a finite number > 0, got 0.0"),
    flag_case("ppo", "negative KL coefficient", ["--kl-coef", "-0.1"], "--kl-coef: must be a finite number >= 0"),
    flag_case("ppo", "GAE lambda 2", ["--gae-lambda", "2"], "--gae-lambda: must be a finite number in [0, 1], got 2.0"),
    flag_case("ppo", "max new tokens 0", ["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1, got 0"),
    flag_case("ppo", "reward lr 0", ["--reward-lr", "0"], "--reward-lr: must be a finite number > 0, got 0.0"),
    flag_case("ppo", "resume from a text file", ["--output-dir", "{checkpoint_text_dir}", "--resume"],
              "{checkpoint_text} is damaged or not a checkpoint"),
    flag_case("ppo", "a reward model with truncated heads", ["--reward-model", "{damaged_rm}"],
              "{damaged_rm}/heads.safetensors: damaged or missing (truncated"),
    flag_case("ppo", "a policy with truncated weights", ["--model", "{damaged_model}"], "model.safetensors (truncated"),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_model_dir):
    """The corpus's files, a good pairs file and (for train_ppo.py) a tiny reward model."""
    root = tmp_path_factory.mktemp("corpus")
    paths = {}
    for name, (relative, content) in FILES.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content())
        paths[name], paths[f"{name}_dir"] = str(path), str(path.parent)
    paths["pairs"] = str(root / "pairs.jsonl")
    (root / "pairs.jsonl").write_bytes(GOOD)
    train_rm.main(["--model", tiny_model_dir, "--objective", "bt", "--data", paths["pairs"], "--max-length", "64",
                   "--batch-size", "4", "--max-steps", "1", "--trainable-layers", "-1", "--output-dir", str(root / "rm")])
    paths["reward_model"], paths["root"], paths["model"] = str(root / "rm" / "model"), str(root), tiny_model_dir
    import shutil  # damaged copies (a full disk mid-copy), and a checkpoint made with other flags

    for name, source, cut in (("damaged_model", tiny_model_dir, "model.safetensors"),
                              ("damaged_rm", paths["reward_model"], "heads.safetensors")):
        shutil.copytree(source, root / name)
        (root / name / cut).write_bytes((root / name / cut).read_bytes()[:(root / name / cut).stat().st_size // 2])
        paths[name] = str(root / name)
    (root / "changed-run").mkdir()
    shutil.copy(root / "rm" / "checkpoint.pt", root / "changed-run" / "checkpoint.pt")  # --objective bt, --max-steps 1
    paths["changed_run"] = str(root / "changed-run")
    return paths


def base_argv(script_name: str, paths: dict, out: str) -> list[str]:
    common = ["--model", paths["model"], "--output-dir", out, "--max-length", "64", "--batch-size", "4",
              "--trainable-layers", "-1", "--save-every", "2"]
    if script_name == "rm":
        return common + ["--data", paths["pairs"]]
    if script_name == "direct":
        return common + ["--data", paths["pairs"], "--eval-prompts", "none", "--max-new-tokens", "4"]
    return common + ["--reward-model", paths["reward_model"], "--prompts", paths["pairs"], "--eval-prompts", "none",
                     "--updates", "2", "--rollout-batch", "4", "--minibatch", "2", "--max-new-tokens", "4"]


def run_in_process(module, argv: list[str], capsys) -> tuple[object, str]:
    """The script's __main__ (script.run_script) in this process: (exit code, what the user reads)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        script.run_script(lambda: module.main(argv))
    code = exited.value.code
    captured = capsys.readouterr()
    return code, (code if isinstance(code, str) else "") + "\n" + captured.err


def test_the_corpus_is_large_enough():
    per_script = {name: sum(case.script == name for case in CASES) for name in SCRIPTS}
    assert len(CASES) >= 40 and min(per_script.values()) >= 15, per_script
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_malformed_input_ends_in_one_message_naming_the_file_or_flag(case, corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AVA_CACHE", str(tmp_path / "cache"))
    fill = lambda text: text.format(**corpus)  # noqa: E731
    argv = base_argv(case.script, corpus, str(tmp_path / "out")) + [fill(a) for a in case.argv]
    code, message = run_in_process(SCRIPTS[case.script], argv, capsys)
    assert code not in (0, None), message
    assert "Traceback" not in message
    for expected in case.expected:
        assert fill(expected) in message, message


@pytest.mark.parametrize("script_name,flags,expected", [
    ("rm", ["--data", "{truncated_gz}"], "{truncated_gz}:"),
    ("direct", ["--lr", "nan"], "--lr: must be a finite number > 0, got nan"),
    ("ppo", ["--output-dir", "{checkpoint_cut_dir}", "--resume"], "{checkpoint_cut} is damaged"),
])
def test_from_the_command_line_no_traceback_reaches_the_user(corpus, tmp_path, script_name, flags, expected):
    fill = lambda text: text.format(**corpus)  # noqa: E731
    argv = base_argv(script_name, corpus, str(tmp_path / "out")) + [fill(f) for f in flags]
    done = subprocess.run([sys.executable, f"train_{script_name}.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert fill(expected) in done.stderr, done.stderr[-3000:]


# ---- valid files that must be read ----

def test_valid_odd_files_are_read(tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + GOOD)
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes(GOOD.replace(b"\n", b"\r\n") + b"\r\n\r\n   \n")
    bom_json = tmp_path / "bom.json"
    bom_json.write_bytes(b"\xef\xbb\xbf" + json.dumps({"train": [pair(i) for i in range(3)]}).encode())
    gz = tmp_path / "bom.jsonl.gz"
    gz.write_bytes(gzip.compress(b"\xef\xbb\xbf" + GOOD))
    for path, n in ((bom, 8), (crlf, 8), (bom_json, 3), (gz, 8)):
        rows, report = sources.load_rows(str(path), "pairs")
        assert len(rows) == n and rows[0]["prompt"] == "Question 0?" and report.kept == n, path


def hub_layout(root, subset="harmless-base"):
    """A local directory laid out as Anthropic/hh-rlhf on the hub: SUBSET/train.jsonl.gz, SUBSET/test.jsonl.gz."""
    hh = [{"chosen": f"\n\nHuman: question {i}?\n\nAssistant: A kind answer {i}.",
           "rejected": f"\n\nHuman: question {i}?\n\nAssistant: Go away {i}."} for i in range(10)]
    (root / subset).mkdir(parents=True)
    (root / subset / "train.jsonl.gz").write_bytes(gzip.compress(lines(*hh[:8])))
    (root / subset / "test.jsonl.gz").write_bytes(gzip.compress(lines(*hh[8:])))
    (root / "helpful-base").mkdir()
    (root / "helpful-base" / "train.jsonl.gz").write_bytes(gzip.compress(lines(*hh[:2])))
    return root


def test_a_dataset_directory_with_a_subset_is_read_offline(tmp_path, tiny_model_dir):
    root = hub_layout(tmp_path / "hh-rlhf")
    assert sources.parse_source(f"{root}:harmless-base") == sources.Source("directory", str(root), "harmless-base")
    train, _ = sources.load_rows(f"{root}:harmless-base", "pairs", "train")
    test, _ = sources.load_rows(f"{root}:harmless-base", "pairs", "test")
    assert (len(train), len(test)) == (8, 2) and train[0]["where"] == f"{root / 'harmless-base' / 'train.jsonl.gz'}:1"
    assert len(sources.load_rows(f"{root}:helpful-base", "pairs")[0]) == 2
    assert len(sources.load_rows(str(root / "harmless-base"), "pairs", "test")[0]) == 2  # the subset's own directory
    shards = tmp_path / "sharded" / "data"
    shards.mkdir(parents=True)
    import pyarrow as pa
    import pyarrow.parquet as pq

    for k in range(2):  # data/train-0000k-of-00002.parquet, as the hub's parquet exports are laid out
        pq.write_table(pa.Table.from_pylist([pair(2 * k), pair(2 * k + 1)]), shards / f"train-0000{k}-of-00002.parquet")
    assert [r["prompt"] for r in sources.load_rows(str(tmp_path / "sharded"), "pairs")[0]] == [f"Question {i}?" for i in range(4)]
    # ...and a script trains on it, evaluating on the subset's test split
    final = train_rm.main(["--model", tiny_model_dir, "--objective", "bt", "--data", f"{root}:harmless-base",
                           "--eval-data", f"{root}:harmless-base", "--eval-split", "test", "--max-length", "64",
                           "--batch-size", "4", "--max-steps", "1", "--trainable-layers", "-1", "--output-dir", str(tmp_path / "out")])
    assert final["train_pairs"] == 8 and final["eval/pairs"] == 2


def test_a_hub_id_with_a_subset_goes_to_datasets_as_its_data_dir(monkeypatch):
    import datasets

    calls = []

    def load_dataset(name, data_dir=None, split=None):
        calls.append((name, data_dir, split))
        return [pair(0), pair(1)]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)  # no network: the call is what is tested
    rows, _ = sources.load_rows("Anthropic/hh-rlhf:harmless-base", "pairs", "test")
    assert calls == [("Anthropic/hh-rlhf", "harmless-base", "test")] and len(rows) == 2
    assert rows[0]["where"] == "Anthropic/hh-rlhf:harmless-base[test]:0"
    sources.load_rows("Anthropic/hh-rlhf", "pairs")
    assert calls[-1] == ("Anthropic/hh-rlhf", None, "train")


def test_builtin_specs_parse_in_one_place():
    assert sources.parse_source("builtin") == sources.Source("builtin", "default")
    assert sources.parse_source("builtin:tiny:gold") == sources.Source("builtin", "tiny", gold=True)
    assert sources.parse_source("builtin:gold") == sources.Source("builtin", "default", gold=True)


def test_every_scripts_defaults_pass_their_own_checks():
    from avalib import cli

    for module in SCRIPTS.values():
        assert cli.check_config(module.Args()) == []
