"""What users of other trainers expect (issue 44): --report-to tensorboard writes events TensorBoard reads back,
a saved reward model loads with one call from outside the repository and carries a model card, code trains a
reward model by calling a function with a config (not a script's main with flag strings), every flag is used
as given (no `top_p = 0.95 if top_p == 1`), and the testing aids stay out of the users' --help."""
import json
import os
import re
import subprocess
import sys

import pytest

from avalib import cli, metrics
from conftest import ROOT
from test_train_rm import hh_rows, write_jsonl
import train_direct
import train_ppo
import train_rm


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """One AVA-p model trained through train_rm.train_reward_model (a function of its Args), evaluated, logged
    to TensorBoard: the runs the tests below read (none writes to it)."""
    root = tmp_path_factory.mktemp("ecosystem")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AVA_CACHE", str(root / "cache"))
        pairs = write_jsonl(root / "pairs.jsonl", hh_rows(8))
        args = train_rm.Args(model=tiny_model_dir, objective="ava-p", preset="mu-weights-half-td", data=pairs,
                             eval_data=pairs, output_dir=str(root / "ava"), max_length=64, batch_size=4, epochs=2, max_steps=3,
                             trainable_layers=-1, lr=1e-3, save_every=0, report_to="tensorboard")
        final = train_rm.train_reward_model(args)
    return {"root": root, "pairs": pairs, "final": final, "out": root / "ava", "model": tiny_model_dir}


def test_a_reward_model_trains_from_a_config_in_code(trained):
    final, out = trained["final"], trained["out"]
    assert final["steps"] == 3 and final["eval/pairs"] == 8 and (out / "model" / "reward_model.json").is_file()
    saved = json.loads((out / "model" / "reward_model.json").read_text())
    assert saved["ava_config"]["lam"] == 0.5 and saved["args"]["preset"] == "mu-weights-half-td"  # the preset resolved
    with pytest.raises(SystemExit, match="--lr: must be a finite number > 0, got -1"):  # checked as the command line is
        train_rm.train_reward_model(train_rm.Args(lr=-1.0, output_dir=str(trained["root"] / "bad")))


def test_report_to_tensorboard_writes_events_tensorboard_reads(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained["out"] / "tensorboard"))
    events.Reload()
    logged = [json.loads(line) for line in (trained["out"] / "metrics.jsonl").read_text().splitlines()[:-1]]
    tags = events.Tags()["scalars"]
    for name in ("loss", "rewards/accuracies", "rewards/margins", "ava/sigma", "ava/td_logp", "lr"):
        assert name in tags, name
        scalars = events.Scalars(name)
        assert [s.step for s in scalars] == [line["step"] for line in logged], name
        assert [s.value for s in scalars] == pytest.approx([line[name] for line in logged], rel=1e-6), name
    assert events.Scalars("eval/accuracy")[-1].value == pytest.approx(trained["final"]["eval/accuracy"])


def test_report_to_names_a_missing_tracker_and_none_writes_no_events(tmp_path):
    if metrics.importlib.util.find_spec("wandb") is None:
        with pytest.raises(SystemExit, match=r"--report-to wandb: the wandb package is not installed \(pip install wandb\)"):
            metrics.check_report_to("wandb")
    log = metrics.MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"step": 1, "loss": 0.5})
    log.close()
    assert not (tmp_path / "tensorboard").exists() and (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 0.5}\n'


def test_every_saved_reward_model_has_a_model_card(trained):
    card = (trained["out"] / "model" / "README.md").read_text()
    final = trained["final"]
    low, high = final["eval/accuracy_wilson95"]
    for expected in ("objective: `ava-p`", "AVA preset: `mu-weights-half-td`", '"lam": 0.5', f"data: `{trained['pairs']}`",
                     "budget: epochs 2, max steps 3, batch size 4, lr 0.001, trainable layers -1, max length 64, seed 0",
                     f"dev accuracy {100 * final['eval/accuracy']:.1f}% (Wilson 95% interval {100 * low:.1f}% to "
                     f"{100 * high:.1f}%) on 8 pairs", "RewardModel.from_pretrained", "## How to score"):
        assert expected in card, expected


def test_a_saved_model_loads_with_one_call_from_outside_the_repository(trained, tmp_path):
    """The card's own snippet, run in a fresh interpreter (-I: no PYTHONPATH, no user site) whose working directory
    is outside the repository and whose path gains only the repository root: the scores match the in-process ones."""
    from avalib.reward_models import RewardModel

    card = (trained["out"] / "model" / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    probe = (f"import json, sys\nsys.path.insert(0, {str(ROOT)!r})\n{snippet}\n"
             "print(json.dumps({'kind': type(reward_model.model).__name__, 'score': scored[0]['score'], "
             "'rewards': scored[0]['rewards'], 'modules': sorted(m for m in sys.modules if m.startswith('train_'))}))")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    done = subprocess.run([sys.executable, "-I", "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    outside = json.loads(done.stdout.strip().splitlines()[-1])
    here = RewardModel.from_pretrained(trained["out"] / "model").score(["How do I say thank you?"],
                                                                       [" Thank you very much!"])[0]
    assert outside["kind"] == "TQR" and outside["modules"] == []  # no script imported to load it
    assert outside["score"] == pytest.approx(here["score"], abs=1e-6)
    assert outside["rewards"] == pytest.approx(here["rewards"], abs=1e-6)


@pytest.mark.parametrize("args_class", [train_rm.Args, train_direct.Args, train_ppo.Args])
def test_testing_aids_work_but_stay_out_of_help(args_class, capsys):
    with pytest.raises(SystemExit):
        cli.parse_config(args_class, ["--help"])
    shown = capsys.readouterr().out
    assert "--report-to" in shown and "--resume" in shown
    for aid in ("--crash-at-step", "--inject-nan-at-step", "--dump-grads"):
        assert aid not in shown, aid
    parsed = cli.parse_config(args_class, ["--crash-at-step", "3", "--inject-nan-at-step", "2", "--dump-grads", "g.pt"])
    assert (parsed.crash_at_step, parsed.inject_nan_at_step, parsed.dump_grads) == (3, 2, "g.pt")


def test_command_line_shows_a_config_as_its_flags():
    fields = dict(plan="llama-2-7b", plan_gpu_gb=80.0, bf16=True, fsdp=False, lr=1e-3, trainable_layers=-1)
    argv = cli.command_line(fields)
    assert argv == ["--plan", "llama-2-7b", "--plan-gpu-gb", "80", "--bf16", "--no-fsdp", "--lr", "0.001",
                    "--trainable-layers", "-1"]
    parsed = cli.parse_config(train_rm.Args, argv)
    assert {name: getattr(parsed, name) for name in fields} == fields


def test_ppo_uses_top_p_as_given(trained, tmp_path, monkeypatch):
    """--top-p 1 at rollout stays 1 (no 0.95 put in its place), and the final judging samples at --eval-top-p;
    Best-of-N's candidates too."""
    from avalib import evaluation, generation

    monkeypatch.setenv("AVA_CACHE", str(tmp_path / "cache"))
    seen = {"rollout": [], "judge": [], "bon": []}
    real_generate_ids, real_cached = generation.generate_ids, generation.cached_generate

    def rollout(*args, **kwargs):
        seen["rollout"].append(kwargs["top_p"])
        return real_generate_ids(*args, **kwargs)

    monkeypatch.setattr(generation, "generate_ids", rollout)
    monkeypatch.setattr(evaluation, "judge_policy", lambda *a, **kwargs: seen["judge"].append(kwargs["top_p"]) or {"n": 0})
    fast = ["--model", trained["model"], "--reward-model", str(trained["out"] / "model"), "--prompts", trained["pairs"],
            "--eval-prompts", trained["pairs"], "--max-new-tokens", "4", "--rollout-batch", "2", "--minibatch", "2",
            "--samples-per-prompt", "1", "--trainable-layers", "-1", "--eval-split", "train", "--max-length", "64"]
    train_ppo.main([*fast, "--updates", "1", "--top-p", "1.0", "--eval-top-p", "0.9", "--output-dir", str(tmp_path / "ppo")])
    assert seen["rollout"] == [1.0] and seen["judge"] == [0.9]

    def candidates(*args, **kwargs):
        seen["bon"].append(kwargs["top_p"])
        return real_cached(*args, **kwargs)

    monkeypatch.setattr(generation, "cached_generate", candidates)
    monkeypatch.setattr(evaluation, "judge_replies", lambda judge, prompts, ours, theirs: ["tie"] * len(ours))
    train_ppo.main([*fast, "--best-of-n", "2", "--top-p", "1.0", "--eval-top-p", "0.8", "--prompt-limit", "2",
                    "--output-dir", str(tmp_path / "bon")])
    assert seen["bon"] == [0.8, 0.8]
