"""Faults during a run: a non-finite loss or gradient never reaches the weights or a checkpoint
(stop, or skip and count with --skip-nonfinite), a checkpoint write that fails (a full disk) keeps
the previous checkpoint, a damaged or foreign checkpoint is named on --resume, flags that no longer fit
it are named (tests/test_trust.py: every changed optimisation flag is refused), and (slow) every script
killed by SIGKILL at a random step resumes to the metrics of an uninterrupted run."""
import dataclasses
import io
import json
import math
import random
import subprocess
import sys

import pytest
import torch

import train_direct
import train_ppo
import train_rm
from avalib import checkpoint, cli, distributed, loop
from conftest import ROOT
from test_bad_input import GOOD

SCRIPTS = {"rm": train_rm, "direct": train_direct, "ppo": train_ppo}


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_dir):
    """A pairs file and a tiny reward model (for train_ppo.py)."""
    root = tmp_path_factory.mktemp("resume")
    (root / "pairs.jsonl").write_bytes(GOOD)
    pairs = str(root / "pairs.jsonl")
    train_rm.main(["--model", tiny_model_dir, "--objective", "ava-p", "--data", pairs, "--max-length", "64",
                   "--batch-size", "4", "--max-steps", "2", "--trainable-layers", "-1", "--lr", "1e-3",
                   "--output-dir", str(root / "rm")])
    return {"pairs": pairs, "reward_model": str(root / "rm" / "model"), "model": tiny_model_dir}


def argv(script_name: str, files: dict, out, steps: int) -> list[str]:
    """`steps` optimiser steps (PPO: updates) on the tiny model, a checkpoint every 2."""
    common = ["--model", files["model"], "--output-dir", str(out), "--max-length", "64", "--batch-size", "4",
              "--trainable-layers", "-1", "--lr", "1e-3", "--save-every", "2", "--threads", "1"]
    if script_name == "rm":  # 8 pairs, 4 a batch: 2 steps an epoch
        return common + ["--objective", "ava-p", "--data", files["pairs"], "--eval-data", files["pairs"], "--epochs", str(steps // 2)]
    if script_name == "direct":
        return common + ["--objective", "ava-p", "--data", files["pairs"], "--eval-prompts", "none", "--epochs", str(steps // 2)]
    return common + ["--reward-model", files["reward_model"], "--prompts", files["pairs"], "--eval-prompts", "none",
                     "--updates", str(steps), "--rollout-batch", "4", "--minibatch", "2", "--max-new-tokens", "6"]


def all_finite(payload: dict) -> bool:
    return all(torch.isfinite(t).all() for t in payload["model"].values())


# ---- non-finite values ----

@pytest.mark.parametrize("script_name", list(SCRIPTS))
def test_a_nan_loss_stops_the_run_naming_step_and_term_and_the_last_checkpoint_stays_loadable(
        script_name, files, tmp_path, monkeypatch):
    monkeypatch.setenv("AVA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    module = SCRIPTS[script_name]
    with pytest.raises(SystemExit) as stopped:
        module.main(argv(script_name, files, out, 4) + ["--inject-nan-at-step", "3"])
    message = str(stopped.value.code)
    step = "update 3" if script_name == "ppo" else "step 3"
    assert message.startswith(f"{step}: non-finite loss (nan)") and "gradient norm (nan)" in message, message
    assert f"the last checkpoint {out / 'checkpoint.pt'} (step 2) is intact" in message and "--skip-nonfinite" in message
    saved = checkpoint.load(out / "checkpoint.pt")
    assert saved["step"] == 2 and all_finite(saved)
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2]  # step 3 never logged, never saved
    # ...and the run resumes from it, to the end
    final = module.main(argv(script_name, files, out, 4) + ["--resume"])
    assert final.get("steps", final.get("updates")) == 4
    assert all_finite(checkpoint.load(out / "checkpoint.pt"))


def tiny_training(tmp_path, **flags):
    """train_loop on a 2-parameter regression, one batch a step: (model before, model after, metrics lines)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.linspace(-1, 1, 8)[:, None]

    def loss_fn(model, local):
        loss = ((model(x[local]) - 2 * x[local]) ** 2).mean()
        return loss, {"loss": loss}

    args = dataclasses.replace(cli.TrainFlags(), batch_size=8, lr=0.1, save_every=0, **flags)
    model, run = loop.train_loop(args, model, [1] * 8, loss_fn, distributed.Distributed(), tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return before, list(model.parameters()), lines


def test_skip_nonfinite_skips_the_update_and_counts_it(tmp_path):
    before, after, lines = tiny_training(tmp_path / "skip", max_steps=1, skip_nonfinite=True, inject_nan_at_step=1)
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # the NaN step changed nothing
    assert lines == [{"step": 1, "epoch": 0, "lr": 0.1, "train/skipped_nonfinite": 1}]  # no NaN logged; the schedule waited
    before, after, lines = tiny_training(tmp_path / "later", epochs=3, skip_nonfinite=True, inject_nan_at_step=2)
    assert [line["train/skipped_nonfinite"] for line in lines] == [0, 1, 1]
    assert all(torch.isfinite(p).all() for p in after) and not torch.equal(before[0], after[0])
    assert all(math.isfinite(line["loss"]) for line in lines if "loss" in line) and "loss" not in lines[1]
    _, _, lines = tiny_training(tmp_path / "off", epochs=2)
    assert "train/skipped_nonfinite" not in lines[0]  # the metric appears with the flag only


def test_an_infinite_gradient_is_named_even_when_the_loss_is_finite(tmp_path):
    def poisoned(model, local):
        weight = next(model.parameters())
        loss = (weight * 0).sum() + 1.0
        weight.register_hook(lambda grad: grad + float("inf"))
        return loss, {"loss": loss}

    model = torch.nn.Linear(1, 1)
    args = dataclasses.replace(cli.TrainFlags(), batch_size=1, max_steps=1, save_every=0, max_grad_norm=0.0)
    with pytest.raises(SystemExit, match=r"step 1: non-finite gradient norm \(inf\)"):
        loop.train_loop(args, model, [1], poisoned, distributed.Distributed(), tmp_path)


def test_check_finite_names_every_bad_term():
    args = cli.TrainFlags()
    assert loop.check_finite("step 4", {"loss": 1.0, "ava/kl": torch.tensor(2.0)}, args)
    with pytest.raises(SystemExit, match=r"^step 4: non-finite ava/td_logp \(nan\), ava/kl \(-inf\); .*no checkpoint"):
        loop.check_finite("step 4", {"loss": 1.0, "ava/td_logp": float("nan"), "ava/kl": torch.tensor(-math.inf)}, args)
    assert not loop.check_finite("step 4", {"loss": math.inf}, dataclasses.replace(args, skip_nonfinite=True))


# ---- checkpoint writes that fail, checkpoints that are damaged ----

def small_checkpoint(path, step: int, value: float):
    model = torch.nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.fill_(value)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    checkpoint.save(path, model, optimizer, scheduler, {"step": step}, distributed.Distributed())
    return model, optimizer, scheduler


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")])
def test_a_checkpoint_write_that_fails_partway_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error):
    path = tmp_path / "checkpoint.pt"
    small_checkpoint(path, 1, 1.0)
    real_save = torch.save

    def disk_fills_up(payload, target):  # half of the bytes reach the disk, then it is full
        buffer = io.BytesIO()
        real_save(payload, buffer)
        with open(target, "wb") as handle:
            handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise error

    monkeypatch.setattr(torch, "save", disk_fills_up)
    with pytest.raises(SystemExit) as stopped:
        small_checkpoint(path, 2, 5.0)
    message = str(stopped.value.code)
    assert message.startswith(f"cannot write the checkpoint {path}") and str(error).split(": ")[-1][:20] in message
    assert f"the last checkpoint {path} (step 1) is intact" in message and "--resume" in message
    monkeypatch.undo()
    saved = checkpoint.load(path)
    assert saved["step"] == 1 and torch.equal(saved["model"]["weight"], torch.ones(1, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no half-written .tmp left behind


def test_a_full_disk_at_a_checkpoint_stops_the_script_and_it_resumes_from_the_previous_one(files, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def full_at_second_write(payload, target, *args, **kwargs):
        calls.append(target)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(payload, target, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_at_second_write)
    with pytest.raises(SystemExit, match=r"No space left on device.*\(step 2\) is intact"):
        train_rm.main(argv("rm", files, out, 6))
    monkeypatch.undo()
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 2
    assert train_rm.main(argv("rm", files, out, 6) + ["--resume"])["steps"] == 6


def test_a_damaged_checkpoint_is_named_with_the_previous_one_to_resume_from(tmp_path):
    path = tmp_path / "checkpoint.pt"
    small_checkpoint(path, 1, 1.0)
    small_checkpoint(path, 2, 2.0)  # checkpoint.pt.prev keeps step 1
    path.write_bytes(path.read_bytes()[:200])  # damaged: truncated
    with pytest.raises(SystemExit) as stopped:
        checkpoint.load(path)
    message = str(stopped.value.code)
    assert message.startswith(f"--resume: {path} is damaged or not a checkpoint (truncated")
    assert f"the previous checkpoint {path}.prev (step 1) loads: move it to {path}" in message
    (tmp_path / "checkpoint.pt.prev").rename(path)
    assert checkpoint.load(path)["step"] == 1


def test_resuming_with_flags_that_do_not_fit_the_checkpoint_is_named(files, tmp_path):
    out = tmp_path / "run"
    train_rm.main(argv("rm", files, out, 2) + ["--trainable-layers", "1"])
    with pytest.raises(SystemExit, match=r"--resume: .*checkpoint.pt was written with other flags .*--epochs 1 \(now 2\), "
                                         r"--trainable-layers 1 \(now -1\);.*--resume-override"):
        train_rm.main(argv("rm", files, out, 4) + ["--resume"])  # -1: every layer, which the checkpoint lacks
    with pytest.raises(SystemExit, match=r"--resume: .*checkpoint.pt does not fit this run .*--trainable-layers"):
        train_rm.main(argv("rm", files, out, 4) + ["--resume", "--resume-override"])  # let through: the weights do not fit


# ---- kill and resume ----

KILL_SEED = 20240611  # the random step is drawn from this seed and the script's name, and printed


@pytest.mark.slow
@pytest.mark.parametrize("script_name,steps", [("rm", 6), ("direct", 6), ("ppo", 5)])
def test_killed_at_a_random_step_resumes_to_the_metrics_of_an_uninterrupted_run(script_name, steps, files, tmp_path):
    crash_at = random.Random(f"{KILL_SEED}-{script_name}").randint(2, steps - 1)  # after the first checkpoint (step 2)
    print(f"{script_name}: SIGKILL after step {crash_at} of {steps}")
    env = {**__import__("os").environ, "AVA_CACHE": str(tmp_path / "cache")}

    def run(name, *extra):
        command = [sys.executable, f"train_{script_name}.py", *argv(script_name, files, tmp_path / name, steps), *extra]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)

    done = run("straight")
    assert done.returncode == 0, done.stderr[-3000:]
    crashed = run("killed", "--crash-at-step", str(crash_at))
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    assert not (tmp_path / "killed" / "final.json").exists()
    resumed = run("killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def metrics(name):
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    straight, killed = metrics("straight"), metrics("killed")
    assert [line["step"] for line in killed] == [line["step"] for line in straight]  # nothing lost, nothing twice
    timing = ("seconds", "per_second", "rss", "resumed_from")
    for a, b in zip(straight, killed):
        keys = {k for k in a if not any(t in k for t in timing)}
        assert keys == {k for k in b if not any(t in k for t in timing)}, a["step"]
        for key in keys:
            if isinstance(a[key], (int, float)) and not isinstance(a[key], bool):
                assert b[key] == pytest.approx(a[key], abs=1e-6), (a["step"], key)
            else:
                assert b[key] == a[key], (a["step"], key)
