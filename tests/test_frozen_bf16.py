"""bf16 in PPO (train_ppo.py --bf16, --frozen-bf16): refused on a CPU with a clear message; the frozen
reference and reward model are bf16 after the set-up while the policy and critic stay fp32; an update
runs under bf16 autocast (on a CPU through the dry-run aid AVA_ALLOW_CPU_BF16); and the memory plan
counts frozen models in bf16 and fp32."""
import copy
import dataclasses
import json
import math

import pytest
import torch

from avalib import cli, distributed, memory_plan, models, reward_models
import train_ppo
import train_rm
from conftest import tiny_lm
from test_train_rm import hh_rows, write_jsonl


def test_bf16_flags_are_refused_on_cpu_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.delenv(distributed.CPU_BF16, raising=False)
    with pytest.raises(SystemExit, match=r"--bf16: mixed precision needs a CUDA GPU; on this CPU bf16 matmul runs ~2.7x"):
        train_ppo.main(["--bf16", "--reward-model", str(tmp_path), "--output-dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match=r"--frozen-bf16: bf16 weights for the frozen reference and reward model need a CUDA GPU"):
        train_ppo.main(["--frozen-bf16", "--reward-model", str(tmp_path), "--output-dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="CUDA"):  # the training scripts share the check
        train_rm.main(["--bf16", "--output-dir", str(tmp_path / "y")])


def test_freeze_for_scoring_holds_the_model_in_bf16_without_gradients():
    model = models.freeze_for_scoring(tiny_lm("llama").train(), "cpu", bf16=True)
    assert not model.training and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters())
    assert {p.dtype for p in models.freeze_for_scoring(tiny_lm("llama"), "cpu").parameters()} == {torch.float32}


@pytest.fixture
def ppo_setup(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("AVA_CACHE", str(tmp_path / "cache"))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", hh_rows(8))
    train_rm.main(["--model", tiny_model_dir, "--objective", "ava-p", "--data", pairs, "--max-length", "64", "--batch-size", "4",
                   "--trainable-layers", "-1", "--output-dir", str(tmp_path / "rm"), "--save-every", "0"])
    return {"pairs": pairs, "reward_model": str(tmp_path / "rm" / "model"), "model": tiny_model_dir}


def test_ppo_set_up_puts_the_frozen_models_in_bf16_and_keeps_the_trained_ones_fp32(tmp_path, ppo_setup):
    args = cli.parse_config(train_ppo.Args, ["--model", ppo_setup["model"], "--reward-model", ppo_setup["reward_model"],
                                             "--frozen-bf16", "--output-dir", str(tmp_path / "ppo")])
    dist = distributed.Distributed()
    lm, tokenizer = models.load_model(args.model, device=dist.device)
    reference = models.freeze_for_scoring(copy.deepcopy(lm), dist.device, args.frozen_bf16)  # as main() does
    policy = models.Policy(lm)
    stage = train_ppo.build_stage(args, 0, lm, policy, tokenizer, tmp_path / "ppo", dist)
    dtypes = lambda module: {p.dtype for p in module.parameters()}
    assert dtypes(reference) == dtypes(stage["reward_model"]) == {torch.bfloat16}
    assert dtypes(stage["policy"]) == dtypes(stage["value"]) == {torch.float32}
    reward, _, _ = reward_models.load_reward_model(ppo_setup["reward_model"])  # the critic copied fp32 weights
    torch.testing.assert_close(stage["value"].lm.model.layers[0].mlp.up_proj.weight, reward.lm.model.layers[0].mlp.up_proj.weight)


def test_ppo_update_runs_under_bf16_autocast(tmp_path, ppo_setup, monkeypatch):
    monkeypatch.setenv(distributed.CPU_BF16, "1")  # what --dry-run does: the bf16 code paths, on a CPU
    out = tmp_path / "ppo"
    final = train_ppo.main(["--model", ppo_setup["model"], "--reward-model", ppo_setup["reward_model"], "--prompts",
                            ppo_setup["pairs"], "--eval-prompts", "none", "--updates", "2", "--output-dir", str(out),
                            "--max-new-tokens", "6", "--rollout-batch", "4", "--minibatch", "2", "--trainable-layers", "-1",
                            "--max-length", "64", "--bf16", "--frozen-bf16"])
    assert final["updates"] == 2
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()[:-1]]
    for key in ("proxy/score", "kl/sum", "loss/policy", "loss/value"):
        assert all(math.isfinite(line[key]) for line in lines), key
    assert abs(lines[0]["kl/sum"]) < 0.5  # the first rollout is the reference's own: bf16 rounding, not a real KL


# ---- the plan: frozen models, host memory per rank ----

def plan_args(script: str, **overrides):
    import train_direct

    cls = {"ppo": train_ppo.Args, "direct": train_direct.Args, "rm": train_rm.Args}[script]
    return dataclasses.replace(cli.parse_config(cls, []), plan="llama-2-7b", trainable_layers=-1, **overrides)


LLAMA_2_7B = 6_738_415_616


@pytest.mark.parametrize("frozen_bf16,bytes_per_parameter", [(False, 4), (True, 2)])
def test_plan_counts_frozen_models_in_bf16_or_fp32(frozen_bf16, bytes_per_parameter):
    args = plan_args("ppo", bf16=True, frozen_bf16=frozen_bf16)
    without = memory_plan.memory_plan(args, "sft")
    with_two = memory_plan.memory_plan(args, "sft", frozen_models=2)
    assert "frozen_models" not in without["bytes"]
    assert with_two["bytes"]["frozen_models"] == 2 * bytes_per_parameter * LLAMA_2_7B  # reference + reward model
    for ac in ("off", "on"):
        assert with_two[f"checkpointing_{ac}"]["total"] - without[f"checkpointing_{ac}"]["total"] == 2 * bytes_per_parameter * LLAMA_2_7B
    assert "frozen_models" in memory_plan.format_plan(with_two)


def test_plan_reports_host_memory_per_rank():
    lean = memory_plan.memory_plan(plan_args("rm", fsdp=True, plan_world_size=8), "bt")
    ddp = memory_plan.memory_plan(plan_args("rm", plan_world_size=8), "bt")
    dpo = memory_plan.memory_plan(plan_args("direct", fsdp=True, plan_world_size=8), "dpo")  # its reference pass needs it all
    hidden = 4096
    assert lean["lean_loading"] and lean["host_bytes_per_rank"] == {"rank_0": 4 * (LLAMA_2_7B + hidden),
                                                                     "other_ranks": 4 * hidden}  # BT's head alone
    assert not ddp["lean_loading"] and ddp["host_bytes_per_rank"] == {"rank_0": 4 * (LLAMA_2_7B + hidden),
                                                                        "other_ranks": 4 * (LLAMA_2_7B + hidden)}
    assert not dpo["lean_loading"] and dpo["host_bytes_per_rank"]["other_ranks"] == 4 * LLAMA_2_7B
    assert "other ranks 0.0 GB (lean loading" in memory_plan.format_plan(lean)
