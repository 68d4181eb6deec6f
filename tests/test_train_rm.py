"""train_rm.py from the command line, on a tiny random Llama with SmolLM2's tokenizer: every
objective trains and evaluates, data formats, bad input, eval-only on an unseen file, resume after a
kill, and 2-process torchrun."""
import gzip
import json
import os
import subprocess
import sys

import pytest

from avalib import data, reward_models, sources, task
import train_rm
from conftest import ROOT, SHARED_DATA

HH = SHARED_DATA / "hh-rlhf-harmless"


def write_jsonl(path, rows, gz=False):
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return str(path)


def hh_rows(n=12):
    rows = []
    for i in range(n):
        prompt = f"\n\nHuman: question number {i} about cats?\n\nAssistant:"
        rows.append({"chosen": prompt + f" A kind and helpful answer {i}.", "rejected": prompt + f" Go away {i}."})
    return rows


def run(tmp_path, *extra, name="run"):
    out = tmp_path / name
    argv = ["--output-dir", str(out), "--max-length", "64", "--batch-size", "4", "--save-every", "2",
            "--trainable-layers", "-1", "--lr", "1e-3", *extra]
    return train_rm.main(argv), out


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl.gz", hh_rows(12), gz=True)


@pytest.mark.parametrize("objective,extra", [
    ("bt", []), ("bt-var", []), ("pref-trans", []), ("ava-p", []), ("ava-d", []),
    ("ava-p", ["--ablate", "w/o rwt,w/o ptq"]), ("ava-p", ["--ablate", "irl"]),
    ("ava-p", ["--negative", "unlikelihood", "--cer", "logsigmoid", "--kl-td-on", "chosen"]),
])
def test_every_objective_trains_evaluates_and_saves(tmp_path, tiny_model_dir, pairs_file, objective, extra):
    final, out = run(tmp_path, "--model", tiny_model_dir, "--objective", objective, "--data", pairs_file,
                     "--eval-data", pairs_file, *extra)
    assert final["steps"] == 3 and final["eval/pairs"] == 12
    assert 0 <= final["eval/accuracy"] <= 1 and final["train_tokens_per_second"] > 0
    lines = [json.loads(row) for row in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines[:-1]] == [1, 2, 3] and all("loss" in row for row in lines[:-1])
    if objective == "ava-p":
        assert "ava/td_logp" in lines[0] or "irl" in extra
        assert "rewards/accuracies" in lines[0]
    # The saved model loads through one function and scores texts, per token for every kind.
    model, tokenizer, meta = reward_models.load_reward_model(out / "model")
    assert meta["kind"] == objective
    scored = reward_models.score_texts(model, tokenizer, ["Hello?"], [" Fine, thanks."])
    assert len(scored[0]["tokens"]) == len(scored[0]["rewards"]) > 0
    assert ("sigmas" in scored[0]) == objective.startswith("ava")
    # ...and eval-only on the saved model reproduces the run's final accuracy.
    again = train_rm.main(["--eval-only", "--load", str(out / "model"), "--eval-data", pairs_file, "--max-length", "64",
                           "--eval-margins", str(tmp_path / "again.json")])
    assert again["eval/accuracy"] == final["eval/accuracy"]
    # Each pair's margin is kept (for paired comparisons between models) and agrees with the accuracy.
    margins = json.loads((out / "eval_margins.json").read_text())
    assert margins["pairs"] == len(margins["margins"]) == 12 and margins["eval_data"] == pairs_file
    assert sum(m > 0 for m in margins["margins"]) / 12 == final["eval/accuracy"]
    assert json.loads((tmp_path / "again.json").read_text())["margins"] == pytest.approx(margins["margins"], abs=1e-5)


def test_training_learns_on_a_separable_toy_set(tmp_path, tiny_model_dir, pairs_file):
    final, _ = run(tmp_path, "--model", tiny_model_dir, "--objective", "bt", "--data", pairs_file,
                   "--eval-data", pairs_file, "--epochs", "8", "--lr", "3e-3")
    assert final["eval/accuracy"] >= 0.9  # "kind and helpful" vs "go away": trivially separable


def test_ava_d_and_afd_on_demonstrations(tmp_path, tiny_model_dir, pairs_file, monkeypatch):
    monkeypatch.setenv("AVA_CACHE", str(tmp_path / "cache"))
    demos = write_jsonl(tmp_path / "demos.jsonl", [{"instruction": f"Say something nice {i}", "input": "", "output": f"You are great {i}."}
                                                  for i in range(8)])
    final, _ = run(tmp_path, "--model", tiny_model_dir, "--objective", "ava-d", "--data", demos, "--eval-data", pairs_file, name="d")
    assert final["train_pairs"] == 8 and final["steps"] == 2
    final, _ = run(tmp_path, "--model", tiny_model_dir, "--objective", "bt", "--afd", "--data", demos,
                   "--afd-max-new-tokens", "6", "--eval-data", pairs_file, name="afd")
    cached = list((tmp_path / "cache" / "samples").glob("*.json"))
    assert len(cached) == 1 and len(json.loads(cached[0].read_text())["samples"]) == 8
    stamp = cached[0].stat().st_mtime_ns
    run(tmp_path, "--model", tiny_model_dir, "--objective", "ava-p", "--afd", "--data", demos,
        "--afd-max-new-tokens", "6", "--eval-data", pairs_file, name="afd2")
    assert cached[0].stat().st_mtime_ns == stamp  # the initial policy's samples were reused, not redrawn


def test_data_formats(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    standard = write_jsonl(tmp_path / "trl.jsonl", [{"prompt": "Q?", "chosen": " yes", "rejected": " no"}])
    conversational = write_jsonl(tmp_path / "conv.jsonl", [{
        "prompt": [{"role": "user", "content": "Q?"}],
        "chosen": [{"role": "assistant", "content": "yes"}], "rejected": [{"role": "assistant", "content": "no"}]}])
    (tmp_path / "list.json").write_text(json.dumps(hh_rows(2)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(hh_rows(3)), tmp_path / "rows.parquet")
    assert sources.load_rows(standard, "pairs")[0][0]["prompt"] == "Q?"
    pair = sources.load_rows(conversational, "pairs", tokenizer=tokenizer)[0][0]
    assert pair["prompt"].endswith("<|im_start|>assistant\n") and pair["chosen"].startswith("yes")
    assert len(sources.load_rows(str(tmp_path / "list.json"), "pairs")[0]) == 2
    hh = sources.load_rows(str(tmp_path / "rows.parquet"), "pairs")[0]
    assert hh[0]["prompt"].endswith("\n\nAssistant:") and hh[0]["chosen"] == " A kind and helpful answer 0."
    demos = write_jsonl(tmp_path / "demos.jsonl", [{"question": "1+1?", "answer": "2"}, {"prompt": "P", "completion": "C"},
                                                   {"prompt": "P", "response": "R"}, hh_rows(1)[0]])
    rows = sources.load_rows(demos, "demos", tokenizer=tokenizer)[0]
    assert [r["response"] for r in rows] == ["2", "C", "R", " A kind and helpful answer 0."]
    assert "1+1?" in rows[0]["prompt"] and rows[0]["prompt"].endswith("assistant\n")


def test_long_prompts_are_cut_from_the_left_and_responses_from_the_right(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = "".join(f"turn {i}. " for i in range(100)) + "LAST TURN"
    chosen, rejected, cut = data.encode_pair(tokenizer, prompt, " short", " word " * 200, max_length=64)
    assert cut and len(chosen["input_ids"]) <= 64 and len(rejected["input_ids"]) == 64
    assert tokenizer.decode(chosen["input_ids"][: chosen["prompt_length"]]).endswith("LAST TURN")  # latest kept
    assert chosen["prompt_length"] == rejected["prompt_length"]  # one shared prompt
    assert tokenizer.decode(rejected["input_ids"][rejected["prompt_length"]:]).startswith(" word")  # start kept


BAD_ROWS = {
    "malformed line": (b'{"chosen": "x"\n', "malformed JSON", "<line>"),
    "missing key": (json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b"}).encode() + b"\n", "missing", "rejected"),
    "empty response": (json.dumps({"prompt": "p", "chosen": "  ", "rejected": "r"}).encode() + b"\n", "empty", "chosen"),
    "chosen == rejected": (json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}).encode() + b"\n", "identical", "rejected"),
    "invalid utf-8": (b'{"prompt": "p", "chosen": "\xff\xfe", "rejected": "r"}\n', "invalid UTF-8", "<line>"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_input_names_file_line_and_field_or_is_skipped_and_counted(tmp_path, tiny_model_dir, case):
    bad, problem, field = BAD_ROWS[case]
    good = json.dumps({"prompt": "p", "chosen": "good", "rejected": "bad"}).encode() + b"\n"
    path = tmp_path / "data.jsonl"
    path.write_bytes(good + good + bad + good)
    with pytest.raises(data.DataError) as error:
        sources.load_rows(str(path), "pairs")
    assert str(error.value).startswith(f"{path}:3: field {field!r}") and problem in str(error.value)
    rows, report = sources.load_rows(str(path), "pairs", skip_bad=True)
    assert len(rows) == 3 and sum(report.skipped.values()) == 1 and report.kept == 3
    with pytest.raises(data.DataError, match=f"{path}:3: field {field!r}"):  # the script stops on it too
        train_rm.main(["--data", str(path), "--model", tiny_model_dir, "--trainable-layers", "-1",
                       "--output-dir", str(tmp_path / "out")])


@pytest.mark.slow
def test_bad_input_from_the_command_line_is_one_line_not_a_traceback(tmp_path, tiny_model_dir):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "p", "chosen": "good", "rejected": "bad"}\n{"prompt": "p", "chosen": "good"}\n')
    for model in (tiny_model_dir, str(tmp_path / "nothing-here")):
        done = subprocess.run([sys.executable, "train_rm.py", "--data", str(path), "--model", model,
                               "--trainable-layers", "-1"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
        expected = f"{path}:2: field 'rejected': missing" if model == tiny_model_dir else "cannot load a tokenizer from"
        assert expected in done.stderr


@pytest.mark.slow
def test_resume_after_a_kill_ends_with_the_same_metrics(tmp_path, tiny_model_dir, pairs_file):
    common_args = ["--model", tiny_model_dir, "--objective", "ava-p", "--data", pairs_file, "--eval-data", pairs_file,
                   "--epochs", "3", "--save-every", "2", "--max-length", "64", "--batch-size", "4", "--lr", "1e-3"]
    killed = tmp_path / "killed"
    args = [sys.executable, "train_rm.py", *common_args, "--output-dir", str(killed)]
    # The uninterrupted run is a fresh process too, as the resumed one is.
    done = subprocess.run([sys.executable, "train_rm.py", *common_args, "--output-dir", str(tmp_path / "straight")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    straight = json.loads((tmp_path / "straight" / "final.json").read_text())
    crashed = subprocess.run(args + ["--crash-at-step", "5"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert crashed.returncode == -9, crashed.stderr[-2000:]  # SIGKILL after step 5; last checkpoint: step 4
    assert not (killed / "final.json").exists()
    resumed = subprocess.run(args + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = json.loads((killed / "final.json").read_text())
    for key in ("steps", "eval/accuracy", "eval/margin", "eval/ties"):
        assert final[key] == pytest.approx(straight[key], abs=1e-6), key
    assert (straight["resumed_from_step"], final["resumed_from_step"]) == (0, 4)  # a resumed run says so
    straight_lines = [json.loads(row) for row in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    resumed_lines = [json.loads(row) for row in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in resumed_lines] == [row["step"] for row in straight_lines]  # step 5 not logged twice
    for a, b in zip(straight_lines[:-1], resumed_lines[:-1]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path, tiny_model_dir, pairs_file):
    """Bradley-Terry's loss is a mean over pairs, so 2 ranks x 2 pairs reproduce 1 rank x 4 pairs."""
    base = ["train_rm.py", "--model", tiny_model_dir, "--objective", "bt", "--data", pairs_file, "--eval-data", pairs_file,
            "--max-length", "64", "--batch-size", "4", "--lr", "1e-3", "--trainable-layers", "-1", "--threads", "1", "--epochs", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                          *base, "--output-dir", str(tmp_path / "two")], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, *base, "--output-dir", str(tmp_path / "one")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    lines = {n: [json.loads(row) for row in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("one", "two")}
    assert len(lines["one"]) == len(lines["two"]) == 7
    for a, b in zip(lines["one"][:-1], lines["two"][:-1]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["rewards/accuracies"] == b["rewards/accuracies"]
    assert lines["one"][-1]["eval/accuracy"] == lines["two"][-1]["eval/accuracy"]
    # Each rank scored every other pair; the margins come back in the file's order.
    margins = {n: json.loads((tmp_path / n / "eval_margins.json").read_text())["margins"] for n in ("one", "two")}
    assert len(margins["two"]) == 12 and margins["two"] == pytest.approx(margins["one"], abs=1e-5)
    assert len(set(round(m, 4) for m in margins["one"])) > 1  # distinct margins, so the order is really checked


@pytest.mark.integration
def test_default_data_is_the_builtin_task(tmp_path, tiny_model_dir):
    """The main script's default data is the offline task: pairs from its train split, accuracy on
    its dev split (here its tiny size, sampled once from the real SmolLM2 into the cache)."""
    assert train_rm.Args().data == "builtin"

    built = task.load_task("tiny", progress=False)
    final, _ = run(tmp_path, "--model", tiny_model_dir, "--data", "builtin:tiny", "--objective", "ava-p")
    assert final["train_pairs"] == len(built.pairs("train")) and final["eval/pairs"] == len(built.pairs("dev"))
    gold, _ = run(tmp_path, "--model", tiny_model_dir, "--data", "builtin:tiny", "--eval-data", "builtin:tiny:gold",
                  "--max-steps", "1", name="gold")
    assert gold["eval/pairs"] == len(built.pairs("dev", noise_free=True))


def test_a_builtin_source_defaults_to_its_own_size_with_gold_labels():
    """One rule for every script's default evaluation data (avalib/sources.py: builtin_default)."""
    assert sources.builtin_default("builtin", gold=True) == "builtin:default:gold"
    assert sources.builtin_default("builtin:tiny", gold=True) == "builtin:tiny:gold"
    assert sources.builtin_default("builtin:v1-tiny:gold", gold=False) == "builtin:v1-tiny"
    assert sources.builtin_default("pairs.jsonl", gold=True) == ""
    assert train_rm.Args().frozen_trunk_cache and train_rm.Args().trainable_layers == 2


def test_the_run_ends_with_a_sentence_naming_accuracy_interval_and_where_the_model_went(tmp_path, tiny_model_dir,
                                                                                     pairs_file, capsys):
    final, out = run(tmp_path, "--model", tiny_model_dir, "--data", pairs_file, "--eval-data", pairs_file,
                     "--objective", "bt", "--max-steps", "1")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    low, high = final["eval/accuracy_wilson95"]
    assert last.startswith(f"bt: accuracy {100 * final['eval/accuracy']:.1f}% (95% interval {100 * low:.1f}-{100 * high:.1f}%)")
    assert f"model saved to {out / 'model'}" in last


def test_demo_runs_on_any_source(tmp_path, tiny_model_dir, pairs_file, capsys):
    import demo

    demo.main(["--model", tiny_model_dir, "--data", pairs_file, "--pairs", "4", "--steps", "1", "--trainable-layers", "1"])
    out = capsys.readouterr().out
    assert "An unseen pair" in out and "E[R|y]" in out and "mu " in out
