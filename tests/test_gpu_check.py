"""bench/gpu_check.py cannot rot: its --dry-run (a tiny model on the CPU) takes every path the GPU
check takes, for 1-2 steps: every script in fp32 and bf16 (bf16 on the CPU through the testing aid
AVA_ALLOW_CPU_BF16), torchrun with one process, DDP's and FSDP2's flags, the memory plan of each run,
and the throughput of ours against TRL's trainers (TRL's rows when trl is installed); and it writes
the same JSON and Markdown, marked as a dry run."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402


@pytest.mark.slow
def test_dry_run_takes_every_path_and_writes_the_report(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    env = dict(os.environ, AVA_CACHE=str(tmp_path / "cache"))
    # conftest's tiny model (its 1,024-id tokenizer): the dry run's 14 runs then spend their time on the paths they
    # check, not on a 49,152-row LM head; the dry run's own tiny model is built in the test below
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--model", tiny_model_dir, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["dry_run"] and "DRY RUN" in (out / "gpu_check.md").read_text()
    runs = {run["name"]: run for run in result["runs"]}
    assert len(runs) == 14 and all(run["status"] == "ok" for run in runs.values()), \
        {name: (run["status"], run.get("error") or run.get("output_tail")) for name, run in runs.items() if run["status"] != "ok"}
    for script in ("train_rm", "train_direct", "train_ppo"):
        assert {run["precision"] for run in runs.values() if run["script"] == f"{script}.py"} >= {"fp32", "bf16"} - (
            {"bf16"} if script == "train_ppo" else set())
    assert runs["train_ppo-ppo-bf16+frozen"]["final"]["updates"] == 1
    for name, run in runs.items():
        assert (run["plan"] is None) == (run["script"] == "train_ppo.py"), name
        if run["plan"]:
            assert run["plan"]["allocated_bytes"] > 0 and run["final"]["steps"] == 2, name
        if name.endswith("-fsdp"):  # one process: what the code does with --fsdp is said
            assert any("nothing to shard" in did for did in run["code_did"]), name
        assert run["peak_host_bytes"] > 0 and run["peak_gpu_bytes"] is None
    throughput = {r["system"]: r for r in result["throughput"]["results"]}
    for system in ("ours BT", "ours AVA-p", "ours DPO"):
        assert throughput[system]["status"] == "ok" and throughput[system]["tokens_per_second"] > 0, throughput[system]
    trl = importlib.util.find_spec("trl") is not None
    for system in ("TRL RewardTrainer", "TRL DPOTrainer"):
        assert throughput[system]["status"] == ("ok" if trl else "skipped: trl is not installed"), throughput[system]
    assert any(r["system"] == "ours AVA-p" and r["baseline"] == "ours DPO (steps only)" for r in result["throughput"]["ratios"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the real check")
def test_without_cuda_it_asks_for_the_dry_run():
    with pytest.raises(SystemExit, match="--dry-run"):
        gpu_check.main([])


def test_the_dry_runs_own_tiny_model_has_smollm2s_tokenizer(tmp_path, tiny_model_dir):
    from avalib import models

    path, weights = gpu_check.prepare_model("", tmp_path, dry_run=True)
    lm, tokenizer = models.load_model(path)
    assert weights == "random (tiny Llama, SmolLM2's tokenizer)" and lm.config.vocab_size == len(tokenizer) == 49152
    assert lm.config.hidden_size == 32 and lm.config.num_hidden_layers == 2


def test_synthetic_pairs_fill_max_length_for_the_plan(tiny_model_dir):
    from avalib import data, models

    tokenizer = models.load_tokenizer()  # SmolLM2's own, as gpu_check uses it (a word is about one of its tokens)
    for row in gpu_check.synthetic_pairs(4, 0, True, 48):  # every sequence exactly --max-length: --plan's bound
        chosen, rejected, _ = data.encode_pair(tokenizer, row["prompt"], row["chosen"], row["rejected"], 48)
        assert len(chosen["input_ids"]) == len(rejected["input_ids"]) == 48
    for row in gpu_check.synthetic_pairs(16, 1, False, 128):  # throughput: every pair fits uncut, as TRL keeps them
        chosen, rejected, cut = data.encode_pair(tokenizer, row["prompt"], row["chosen"], row["rejected"], 10**6)
        assert max(len(chosen["input_ids"]), len(rejected["input_ids"])) <= 128


@pytest.mark.slow
def test_gpu_profile_dry_run_times_and_profiles_every_step_with_and_without_prompt_sharing(tmp_path):
    import gpu_profile

    result = gpu_profile.main(["--dry-run", "--out", str(tmp_path)])
    assert [(r["kind"], r["share_prompts"]) for r in result["rows"]] == [
        (kind, share) for kind in ("bt", "ava-p", "dpo") for share in (True, False)]
    for row in result["rows"]:
        assert row["tokens_per_second"] > 0 and row["timed_steps"] >= 1 and row["top_self_cpu_ms"], row["kind"]
    by = {(r["kind"], r["share_prompts"]): r for r in result["rows"]}
    # prompt sharing runs a prompt, then its replies, per group: more, smaller matmuls (what a GPU pays for per launch)
    for kind in ("bt", "ava-p", "dpo"):
        assert by[kind, True]["matmul_calls_per_epoch"] > by[kind, False]["matmul_calls_per_epoch"], kind
    assert "DRY RUN" in (tmp_path / "gpu_profile.md").read_text()
