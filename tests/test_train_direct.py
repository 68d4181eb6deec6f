"""train_direct.py from the command line, on a tiny random Llama with SmolLM2's tokenizer: every
objective trains, samples and is judged; DPO's reference; learning on a separable toy set; a reward
model as judge; eval-only against another policy; bad flags and bad data; resume; 2-process torchrun."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import ava
from avalib import data, models, reward_models, sources
import train_direct
from conftest import ROOT
from test_train_rm import hh_rows, write_jsonl

FAST = ["--max-length", "64", "--batch-size", "4", "--save-every", "2", "--trainable-layers", "-1", "--lr", "1e-3",
        "--max-new-tokens", "6", "--samples-per-prompt", "2", "--prompt-split", "train", "--judge", "gold"]


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.setenv("AVA_CACHE", str(tmp_path / "cache"))  # opponent and AfD samples land here
    pairs = write_jsonl(tmp_path / "pairs.jsonl", hh_rows(8))
    demos = write_jsonl(tmp_path / "demos.jsonl", [{"prompt": f"Say something nice {i}.", "response": f" You are great {i}."}
                                                   for i in range(8)])
    return {"pairs": pairs, "demos": demos}


def run(tmp_path, model, *extra, name="run"):
    out = tmp_path / name
    return train_direct.main(["--model", model, "--output-dir", str(out), *FAST, *extra]), out


@pytest.mark.parametrize("objective,extra,data", [
    ("ava-p", [], "pairs"), ("dpo", [], "pairs"), ("sft", ["--chosen-half"], "pairs"), ("sft", [], "demos"),
    ("ava-d", [], "demos"), ("dpo", ["--afd"], "demos"), ("ava-p", ["--afd"], "demos"),
])
def test_every_objective_trains_samples_and_is_judged(tmp_path, tiny_model_dir, files, objective, extra, data):
    final, out = run(tmp_path, tiny_model_dir, "--objective", objective, "--data", files[data],
                     "--eval-data", files["pairs"], "--eval-prompts", files["pairs"], *extra)
    assert final["train_rows"] == 8 and final["steps"] == 2
    result = final["win_rate"]
    assert result["n"] == 8 * 2 and result["win"] + result["tie"] + result["lose"] == result["n"]
    assert result["wilson95"][0] <= result["win_rate"] <= result["wilson95"][1]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16 and {s["verdict"] for s in samples} <= {"win", "tie", "lose"}
    assert [s["verdict"] for s in samples].count("win") == result["win"]
    # implicit-reward accuracy for the objectives that have an implicit reward
    assert ("eval/accuracy" in final) == (objective != "sft") and (objective == "sft" or final["eval/pairs"] == 8)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines[:-1]] == [1, 2] and all(math.isfinite(line["loss"]) for line in lines[:-1])
    # the policy reloads as a causal LM; AVA's also as a reward model (its heads are saved with it)
    lm, _ = models.load_model(str(out / "policy"))
    assert isinstance(lm, torch.nn.Module)
    if objective.startswith("ava"):
        model, _, meta = reward_models.load_reward_model(out / "policy")
        assert isinstance(model, ava.TQR) and meta["kind"] == objective


def test_afd_pairs_demonstrations_with_cached_initial_samples(tmp_path, tiny_model_dir, files):
    run(tmp_path, tiny_model_dir, "--objective", "dpo", "--afd", "--data", files["demos"], "--eval-prompts", "none", name="a")
    cached = sorted((tmp_path / "cache" / "samples").glob("*.json"))
    assert len(cached) == 1 and len(json.loads(cached[0].read_text())["samples"]) == 8
    stamp = cached[0].stat().st_mtime_ns
    run(tmp_path, tiny_model_dir, "--objective", "ava-p", "--afd", "--data", files["demos"], "--eval-prompts", "none", name="b")
    assert cached[0].stat().st_mtime_ns == stamp  # reused, not redrawn


def test_dpo_starts_at_log_2_because_its_reference_is_the_initial_policy(tiny_model_dir):
    lm, tokenizer = models.load_model(tiny_model_dir)
    rows = [{"prompt": p["chosen"][:p["chosen"].rindex("Assistant:") + 10], "chosen": " yes", "rejected": " no"} for p in hh_rows(4)]
    report = sources.LoadReport("test")
    items = data.encode_rows(rows, tokenizer, 64, report)
    references = train_direct.reference_logprobs(lm, items, tokenizer.pad_token_id, batch_size=3)  # 2 batches
    args = train_direct.Args(objective="dpo")
    loss, terms = train_direct.compute_loss(models.Policy(lm), items, references, args, ava.AVAConfig(), tokenizer.pad_token_id)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5) and terms["margin"].abs().item() < 1e-5
    # and the reference is the sum of the response's token log-probs, checked against full logits
    batch = data.collate([items[0][0]], tokenizer.pad_token_id)
    logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0, :-1].log_softmax(-1)
    targets = batch["input_ids"][0, 1:]
    expected = logits.gather(1, targets[:, None])[:, 0][batch["response_mask"][0, 1:]].sum()
    assert references[0, 0].item() == pytest.approx(expected.item(), abs=1e-4)


def test_reference_batches_by_length_but_returns_rows_in_data_order(tiny_model_dir):
    lm, tokenizer = models.load_model(tiny_model_dir)
    rows = [{"prompt": "Human: " + "hi " * (1 + 7 * (i % 3)) + "\n\nAssistant:", "chosen": " yes" * (1 + i), "rejected": " no"}
            for i in range(5)]
    items = data.encode_rows(rows, tokenizer, 64, sources.LoadReport("test"))
    assert len({max(len(e["input_ids"]) for e in item) for item in items}) == 5  # so sorting reorders them
    one_by_one = torch.cat([train_direct.reference_logprobs(lm, [item], tokenizer.pad_token_id, batch_size=1) for item in items])
    batched = train_direct.reference_logprobs(lm, items, tokenizer.pad_token_id, batch_size=2)
    torch.testing.assert_close(batched, one_by_one, atol=1e-4, rtol=0)
    assert (batched[:, 0] != batched[:, 1]).all() and len(set(batched[:, 0].tolist())) == 5


@pytest.mark.parametrize("objective", ["dpo", "ava-p"])
def test_implicit_reward_learns_a_separable_toy_set(tmp_path, tiny_model_dir, files, objective):
    final, out = run(tmp_path, tiny_model_dir, "--objective", objective, "--data", files["pairs"], "--eval-data", files["pairs"],
                     "--eval-prompts", "none", "--epochs", "6")
    assert final["eval/accuracy"] >= 0.9  # "kind and helpful" vs "go away"
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()[:-1]]
    assert sum(losses[-2:]) < sum(losses[:2])


def test_sft_lowers_the_nll_of_its_demonstrations(tmp_path, tiny_model_dir, files):
    _, out = run(tmp_path, tiny_model_dir, "--objective", "sft", "--data", files["demos"], "--eval-prompts", "none", "--epochs", "8",
                 "--lr", "1e-2")
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()[:-1]]
    assert losses[-1] < 0.7 * losses[0]  # nats per response token


def test_reward_model_judge_and_eval_only_against_another_policy(tmp_path, tiny_model_dir, files):
    import train_rm

    train_rm.main(["--model", tiny_model_dir, "--objective", "bt", "--data", files["pairs"], "--max-length", "64",
                   "--output-dir", str(tmp_path / "rm"), "--trainable-layers", "-1", "--batch-size", "4"])
    judge = str(tmp_path / "rm" / "model")
    final, out = run(tmp_path, tiny_model_dir, "--objective", "sft", "--data", files["demos"],
                     "--eval-prompts", files["pairs"], "--judge", judge, name="sft")
    assert final["win_rate"]["judge"] == judge and final["win_rate"]["n"] == 16
    # eval-only: the SFT policy against the initial model = the run's own result (same samples, same judge)
    again = train_direct.main(["--eval-only", "--load", str(out / "policy"), "--model", tiny_model_dir, *FAST,
                               "--eval-prompts", files["pairs"], "--judge", judge])
    assert {k: again["win_rate"][k] for k in ("win", "tie", "lose")} == {k: final["win_rate"][k] for k in ("win", "tie", "lose")}
    # ...and against itself as the opponent: identical samples, so every verdict is a tie
    itself = train_direct.main(["--eval-only", "--load", str(out / "policy"), "--model", tiny_model_dir, *FAST,
                                "--eval-prompts", files["pairs"], "--opponent", str(out / "policy")])
    assert itself["win_rate"]["tie"] == itself["win_rate"]["n"] == 16


@pytest.mark.parametrize("flags,message", [
    (["--objective", "sft", "--afd"], "--afd builds preference pairs"),
    (["--objective", "ava-p", "--no-pretrained-q"], "pretrained Q"),
    (["--objective", "dpo", "--ablate", "w/o rwt"], "--ablate applies"),
    (["--objective", "dpo", "--judge", "/nonexistent"], "neither 'gold' nor a reward model"),
])
def test_bad_flag_combinations_say_why(tmp_path, tiny_model_dir, files, flags, message):
    with pytest.raises(SystemExit, match=message):
        run(tmp_path, tiny_model_dir, "--data", files["pairs"], *flags)


def test_bad_data_names_file_line_and_field(tmp_path, tiny_model_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "chosen": "good", "rejected": "bad"}\n{"prompt": "p", "chosen": "x", "rejected": "x"}\n')
    with pytest.raises(data.DataError, match=f"{path}:2: field 'rejected': identical"):
        run(tmp_path, tiny_model_dir, "--objective", "dpo", "--data", str(path))


@pytest.mark.slow
def test_dpo_resume_after_a_kill_ends_with_the_same_metrics(tmp_path, tiny_model_dir, files):
    base = [sys.executable, "train_direct.py", "--model", tiny_model_dir, "--objective", "dpo", "--data", files["pairs"],
            "--eval-data", files["pairs"], "--eval-prompts", "none", "--epochs", "3", *FAST]
    env = dict(os.environ)
    done = subprocess.run(base + ["--output-dir", str(tmp_path / "straight")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    killed = base + ["--output-dir", str(tmp_path / "killed")]
    crashed = subprocess.run(killed + ["--crash-at-step", "3"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    resumed = subprocess.run(killed + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight, final = (json.loads((tmp_path / n / "final.json").read_text()) for n in ("straight", "killed"))
    assert final["steps"] == straight["steps"] == 6
    assert final["eval/accuracy"] == straight["eval/accuracy"]
    lines = {n: [json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()[:-1]]
             for n in ("straight", "killed")}
    assert [line["step"] for line in lines["killed"]] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(lines["straight"], lines["killed"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process_for_dpo(tmp_path, tiny_model_dir, files):
    base = ["train_direct.py", "--model", tiny_model_dir, "--objective", "dpo", "--data", files["pairs"],
            "--eval-data", files["pairs"], "--eval-prompts", "none", *FAST, "--threads", "1", "--epochs", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
                          *base, "--output-dir", str(tmp_path / "two")], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, *base, "--output-dir", str(tmp_path / "one")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    lines = {n: [json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("one", "two")}
    assert len(lines["one"]) == len(lines["two"]) == 5
    for a, b in zip(lines["one"][:-1], lines["two"][:-1]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert lines["one"][-1]["eval/accuracy"] == lines["two"][-1]["eval/accuracy"]
