"""train_ppo.py: PPO's arithmetic against slow references, the reward choices, and the script end to
end on a tiny random Llama (PPO with AVA and BT reward models, Best-of-N, ML-IRL with a preference
reward and with a discriminator, resume after a kill)."""
import json
import math
import subprocess
import sys

import pytest
import torch

import ava
from avalib import models
import train_ppo
import train_rm
from conftest import ROOT, random_batch, randomize_heads, tiny_lm
from test_train_rm import hh_rows, write_jsonl


def reference_gae(rewards, values, mask, gamma, lam):
    """GAE written per row over its list of valid transitions (Schulman et al. 2016)."""
    advantages = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        steps = mask[b].nonzero().flatten().tolist()
        following = 0.0
        for i in reversed(range(len(steps))):
            t = steps[i]
            next_value = values[b, steps[i + 1]] if i + 1 < len(steps) else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            following = delta + gamma * lam * following
            advantages[b, t] = following
    return advantages


def test_gae_matches_the_per_row_reference():
    generator = torch.Generator().manual_seed(0)
    mask = torch.zeros(4, 9, dtype=torch.bool)
    for b, (start, end) in enumerate([(0, 9), (2, 7), (4, 5), (1, 8)]):
        mask[b, start:end] = True
    rewards, values = torch.randn(4, 9, generator=generator) * mask, torch.randn(4, 9, generator=generator) * mask
    for gamma, lam in [(1.0, 0.95), (0.9, 1.0), (1.0, 0.0)]:
        advantages, returns = train_ppo.gae(rewards, values, mask, gamma, lam)
        expected = reference_gae(rewards, values, mask, gamma, lam)
        torch.testing.assert_close(advantages, expected)
        torch.testing.assert_close(returns, (expected + values) * mask)


def test_whiten_uses_only_valid_entries():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    out = train_ppo.whiten(values, mask)
    torch.testing.assert_close(out, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-4, rtol=0)


def test_ppo_losses_clip_the_ratio_and_the_value():
    mask = torch.ones(1, 4, dtype=torch.bool)
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.0, 1.0, 1.5, 0.5]]))  # ratios 1, 1, 1.5, 0.5
    values = torch.tensor([[0.0, 0.0, 1.0, -1.0]])
    returns = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    policy_loss, value_loss, stats = train_ppo.ppo_losses(logp, old, advantages, values, torch.zeros(1, 4), returns, mask, 0.2, 0.2)
    # per token: -A * ratio, pessimistically clipped: [-1, 1, -1.2 (clipped), 0.8 (max(0.5, 0.8))]
    assert policy_loss.item() == pytest.approx((-1 + 1 - 1.2 + 0.8) / 4)
    # values clipped to +-0.2 of the old ones: max of the plain and the clipped squared error
    expected = 0.5 * (0 + 1 + max(0.0, 0.8 ** 2) + max(4.0, 1.2 ** 2)) / 4
    assert value_loss.item() == pytest.approx(expected)
    assert stats["policy/clipfrac"].item() == pytest.approx(0.5) and stats["value/clipfrac"].item() == pytest.approx(0.5)


def test_rewards_dense_sequence_pessimistic_and_adversarial():
    torch.manual_seed(0)
    model = randomize_heads(ava.TQR(tiny_lm("llama")))
    input_ids, attention_mask, response_mask = random_batch()
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}
    out = model(**batch)
    mask = out.mask
    score, dense = train_ppo.score_rollouts(model, batch, dense=True, pessimism=0.0)
    torch.testing.assert_close(dense, out.mu * mask)  # Eq. 19: mu_t at every response token
    torch.testing.assert_close(score, out.sequence_reward())
    score_k, dense_k = train_ppo.score_rollouts(model, batch, dense=True, pessimism=2.0)
    torch.testing.assert_close(dense_k, (out.mu - 2.0 * out.sigma) * mask)
    torch.testing.assert_close(score_k, out.sequence_reward() - 2.0 * out.sequence_sigma())
    score_s, sparse = train_ppo.score_rollouts(model, batch, dense=False, pessimism=0.0)
    last = ava.last_index(mask)
    assert (sparse.count_nonzero(dim=1) <= 1).all() and torch.allclose(sparse[torch.arange(4), last], score_s)
    discriminator = randomize_heads(ava.ScalarRewardModel(tiny_lm("llama"), "bt"))
    logits = discriminator(**batch)
    _, rkl = train_ppo.score_rollouts(discriminator, batch, dense=True, pessimism=0.0, discriminator="adversarial-rkl")
    _, js = train_ppo.score_rollouts(discriminator, batch, dense=True, pessimism=0.0, discriminator="adversarial-js")
    torch.testing.assert_close(rkl, logits.rewards * mask)  # log D - log(1 - D) = the logit
    d = torch.sigmoid(logits.rewards)
    torch.testing.assert_close(js, -torch.log1p(-d) * mask)  # -log(1 - D)


def test_token_logprobs_divide_the_logits_by_the_temperature():
    lm = tiny_lm("llama")
    input_ids, attention_mask, response_mask = random_batch()
    logp = ava.token_logprobs(lm, input_ids, attention_mask, response_mask, temperature=0.7)
    logits = lm(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1] / 0.7
    expected = logits.log_softmax(-1).gather(-1, input_ids[:, 1:, None])[..., 0] * response_mask[:, 1:]
    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def reward_models_once(tiny_model_dir, tmp_path_factory):
    """The AVA-p and BT reward models the PPO tests read (none writes to them), trained once per module."""
    root = tmp_path_factory.mktemp("ppo-reward-models")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AVA_CACHE", str(root / "cache"))
        pairs = write_jsonl(root / "pairs.jsonl", hh_rows(8))
        models = {}
        for kind in ("ava-p", "bt"):
            train_rm.main(["--model", tiny_model_dir, "--objective", kind, "--data", pairs, "--max-length", "64",
                           "--batch-size", "4", "--trainable-layers", "-1", "--lr", "1e-3", "--output-dir", str(root / kind)])
            models[kind] = str(root / kind / "model")
    return {"pairs": pairs, "models": models, "model": tiny_model_dir}


@pytest.fixture
def setup(reward_models_once, tmp_path, monkeypatch):
    monkeypatch.setenv("AVA_CACHE", str(tmp_path / "cache"))  # each test's own sample caches
    return reward_models_once


FAST = ["--max-new-tokens", "6", "--rollout-batch", "4", "--minibatch", "2", "--samples-per-prompt", "1",
        "--trainable-layers", "-1", "--lr", "1e-3", "--eval-split", "train", "--max-length", "64"]


@pytest.mark.parametrize("kind,extra", [("ava-p", []), ("ava-p", ["--pessimism", "1.0"]), ("bt", []),
                                        ("ava-p", ["--reward", "sequence", "--ppo-epochs", "2"])])
def test_ppo_runs_logs_proxy_and_changes_the_policy(tmp_path, setup, kind, extra):
    out = tmp_path / "ppo"
    final = train_ppo.main(["--model", setup["model"], "--reward-model", setup["models"][kind], "--prompts", setup["pairs"],
                            "--eval-prompts", setup["pairs"], "--updates", "3", "--output-dir", str(out), *FAST, *extra])
    assert final["updates"] == 3 and final["win_rate"]["n"] == 8
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines[:-1]] == [1, 2, 3]
    for key in ("proxy/score", "kl/sum", "loss/policy", "loss/value", "policy/clipfrac", "rollout/eos_rate"):
        assert all(math.isfinite(line[key]) for line in lines[:-1]), key
    assert lines[0]["kl/sum"] == pytest.approx(0.0, abs=1e-4)  # the first rollout is the reference's own
    assert (out / "proxy_vs_gold.png").stat().st_size > 1000
    before, _ = models.load_model(setup["model"])
    after, _ = models.load_model(str(out / "policy"))
    changed = [n for (n, a), (_, b) in zip(before.named_parameters(), after.named_parameters()) if not torch.equal(a, b)]
    assert changed  # PPO moved the policy


def test_best_of_n_picks_the_reward_models_favourite(tmp_path, setup):
    result = train_ppo.main(["--model", setup["model"], "--best-of-n", "3", "--reward-model", setup["models"]["ava-p"],
                             "--bon-against", setup["models"]["bt"], "--eval-prompts", setup["pairs"],
                             "--output-dir", str(tmp_path / "bon"), *FAST])
    assert result["vs_plain_sample"]["n"] == 8 and result["vs_best_of_n_under"]["n"] == 8
    assert json.loads((tmp_path / "bon" / "best_of_n.json").read_text()) == result


@pytest.mark.parametrize("irl_reward,level", [("bt", "token"), ("adversarial-rkl", "token"), ("adversarial-js", "sequence")])
def test_ml_irl_alternates_reward_learning_and_ppo(tmp_path, setup, irl_reward, level):
    demos = write_jsonl(tmp_path / "demos.jsonl", [{"prompt": f"Say something nice {i}.", "response": f" You are great {i}."}
                                                   for i in range(6)])
    out = tmp_path / "irl"
    final = train_ppo.main(["--model", setup["model"], "--iterations", "2", "--updates", "2", "--demos", demos,
                            "--irl-reward", irl_reward, "--adversarial-level", level, "--reward-steps", "2",
                            "--batch-size", "4", "--prompts", demos, "--eval-prompts", "none", "--output-dir", str(out), *FAST])
    assert final["updates"] == 4 and final["iterations"] == 2
    for k in (0, 1):  # one reward per iteration, learnt on that iteration's (demonstration, policy sample) pairs
        assert (out / f"irl-{k}" / "reward" / "model" / "reward_model.json").is_file()
        assert len((out / f"irl-{k}" / "pairs.jsonl").read_text().splitlines()) >= 1
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()[:-1]]
    assert [line["iteration"] for line in lines] == [0, 0, 1, 1]


def test_bad_flags_say_why(tmp_path, setup):
    with pytest.raises(SystemExit, match="needs --reward-model"):
        train_ppo.main(["--model", setup["model"], "--output-dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="not a reward model"):
        train_ppo.main(["--model", setup["model"], "--reward-model", str(tmp_path), "--output-dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--activation-checkpointing: not in train_ppo.py yet: its models run in eval"):
        train_ppo.main(["--activation-checkpointing", "--plan", "llama-2-7b"])  # not even planned


@pytest.mark.slow
def test_ppo_resume_after_a_kill_ends_with_the_same_metrics(tmp_path, setup):
    base = [sys.executable, "train_ppo.py", "--model", setup["model"], "--reward-model", setup["models"]["ava-p"],
            "--prompts", setup["pairs"], "--eval-prompts", "none", "--updates", "5", "--save-every", "2", *FAST]
    done = subprocess.run(base + ["--output-dir", str(tmp_path / "straight")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    killed = base + ["--output-dir", str(tmp_path / "killed")]
    crashed = subprocess.run(killed + ["--crash-at-step", "3"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    resumed = subprocess.run(killed + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    lines = {n: [json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()[:-1]]
             for n in ("straight", "killed")}
    assert [line["step"] for line in lines["killed"]] == [1, 2, 3, 4, 5]
    for a, b in zip(lines["straight"], lines["killed"]):
        for key in ("proxy/score", "loss/policy", "loss/value", "kl/sum"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)


def test_ppo_with_lora_trains_adapters_and_the_value_head_and_exports_a_merged_policy(tmp_path, setup):
    out = tmp_path / "lora"
    train_ppo.main(["--model", setup["model"], "--reward-model", setup["models"]["ava-p"], "--prompts", setup["pairs"],
                    "--eval-prompts", "none", "--updates", "2", "--output-dir", str(out), "--save-every", "1",
                    *FAST, "--lora-r", "4", "--lr", "1e-2"])
    saved = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    trained = {name for name in saved if "lora_" in name or name == "value.head.weight"}
    assert any(n.startswith("policy.") for n in trained) and any(n.startswith("value.") for n in trained)
    assert (out / "policy" / "lora" / "adapter_model.safetensors").is_file()  # the adapter alone, peft's format
    before, _ = models.load_model(setup["model"])
    after, _ = models.load_model(str(out / "policy"))  # a plain causal LM: the adapter merged into its weights
    names = [n for n, _ in after.named_parameters()]
    assert names == [n for n, _ in before.named_parameters()] and not any("lora" in n for n in names)
    changed = [n for (n, a), (_, b) in zip(before.named_parameters(), after.named_parameters()) if not torch.equal(a, b)]
    assert changed and all(".layers." in n and "proj" in n for n in changed)  # only adapted linear layers moved


def torchrun_ppo(tmp_path, name, flags, port, crash_at=0, resume=False):
    import os

    out = tmp_path / name
    env = dict(os.environ, OMP_NUM_THREADS="1")
    extra = (["--crash-at-step", str(crash_at)] if crash_at else []) + (["--resume"] if resume else [])
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                           "train_ppo.py", *flags, "--output-dir", str(out), "--dump-grads", str(out) + ".grads", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    return done, out


@pytest.mark.slow
def test_ppo_under_fsdp_matches_ddp_in_rollouts_losses_and_gradients_and_resumes(tmp_path, setup):
    """FSDP2 (sampling through the sharded policy, sharded checkpoints, the full export) against DDP on
    the same 2 processes: the same seeds give the same rollouts, so every metric and every reduced
    gradient must agree. Then an FSDP run killed after update 3 resumes to the same metrics."""
    flags = ["--model", setup["model"], "--reward-model", setup["models"]["ava-p"], "--prompts", setup["pairs"],
             "--eval-prompts", "none", "--updates", "4", "--save-every", "2", "--threads", "1", *FAST]
    runs = {}
    for i, sharding in enumerate(["ddp", "fsdp"]):
        done, out = torchrun_ppo(tmp_path, sharding, flags + (["--fsdp"] if sharding == "fsdp" else []), 29571 + i)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[sharding] = ([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()[:-1]],
                          torch.load(str(out) + ".grads"), out)
    (ddp_lines, ddp_grads, ddp_out), (fsdp_lines, fsdp_grads, fsdp_out) = runs["ddp"], runs["fsdp"]
    assert [line["step"] for line in fsdp_lines] == [1, 2, 3, 4]
    for a, b in zip(ddp_lines, fsdp_lines):
        for key in ("proxy/score", "kl/sum", "rollout/length", "loss/policy", "loss/value"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
    assert len(ddp_grads) == len(fsdp_grads) == 8  # 4 updates x 2 minibatches
    for step, (a, b) in enumerate(zip(ddp_grads, fsdp_grads)):
        assert a.keys() == b.keys() and a, step
        for key in a:
            scale = a[key].abs().max().clamp(min=1e-8)
            assert float((a[key] - b[key]).abs().max() / scale) < 1e-4, (step, key)
    from safetensors.torch import load_file

    exported = [load_file(str(out / "policy" / "model.safetensors")) for out in (ddp_out, fsdp_out)]
    assert exported[0].keys() == exported[1].keys()
    for key in exported[0]:
        torch.testing.assert_close(exported[1][key], exported[0][key], rtol=1e-4, atol=1e-5)

    crashed, out = torchrun_ppo(tmp_path, "fsdp-killed", flags + ["--fsdp"], 29575, crash_at=3)
    assert crashed.returncode != 0
    resumed, out = torchrun_ppo(tmp_path, "fsdp-killed", flags + ["--fsdp"], 29577, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()[:-1]]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    for a, b in zip(fsdp_lines, lines):
        for key in ("proxy/score", "loss/policy", "loss/value", "kl/sum"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)


# ---- --grad-accum: micro-batches inside a PPO minibatch ----

@pytest.fixture(scope="module")
def eager_eos_policy(tiny_model_dir, tmp_path_factory):
    """tiny_model_dir with a random EOS embedding (tied: its output row too; the pad row it shares is zero), so
    that replies end at different lengths: a micro-batch's share of a minibatch's valid tokens is then not its
    share of the replies, and a split weighted by replies (or by 1/N) gives a different gradient."""
    directory = tmp_path_factory.mktemp("eager-eos")
    lm, tokenizer = models.load_model(tiny_model_dir)
    with torch.no_grad():
        embedding = lm.get_input_embeddings().weight
        embedding[tokenizer.eos_token_id] = torch.randn(embedding.shape[1], generator=torch.Generator().manual_seed(0))
    lm.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def assert_same_gradients(reference, other, dumps):
    """Every minibatch's every gradient, to 1e-4 of its own scale (as tests/test_scale.py compares)."""
    assert len(reference) == len(other) == dumps
    for step, (a, b) in enumerate(zip(reference, other)):
        assert a.keys() == b.keys() and a, step
        for key in a:
            scale = a[key].abs().max().clamp(min=1e-8)
            assert float((a[key] - b[key]).abs().max() / scale) < 1e-4, (step, key)


def accumulation_flags(setup, policy):
    """8 rollouts of different lengths, minibatches of 4: --grad-accum 2 splits each 2 + 2, 3 splits it 2 + 1 + 1."""
    return ["--model", policy, "--reward-model", setup["models"]["ava-p"], "--prompts", setup["pairs"],
            "--eval-prompts", "none", "--updates", "2", "--rollout-batch", "8", "--minibatch", "4", "--max-new-tokens",
            "6", "--trainable-layers", "-1", "--lr", "1e-3", "--save-every", "0", "--threads", "1"]


def test_grad_accum_gives_every_minibatch_the_unsplit_gradient(tmp_path, setup, eager_eos_policy):
    """PPO's losses are means over the minibatch's valid tokens: each micro-batch weighted by its share of them
    sums to the unsplit minibatch's gradient, split evenly (2) or not (3), in the policy and in the value model."""
    grads, lines = {}, {}
    for accumulation in (1, 2, 3):
        out = tmp_path / f"accum-{accumulation}"
        train_ppo.main([*accumulation_flags(setup, eager_eos_policy), "--grad-accum", str(accumulation),
                        "--output-dir", str(out), "--dump-grads", str(out) + ".grads"])
        grads[accumulation] = torch.load(str(out) + ".grads")
        lines[accumulation] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()[:-1]]
    first = lines[1][0]  # the rollouts differ in length (a mean of 8 equal lengths would be a whole number)
    assert 0 < first["rollout/eos_rate"] < 1 and first["rollout/length"] != int(first["rollout/length"])
    assert {key.split(".")[0] for key in grads[1][0]} == {"policy", "value"}
    for accumulation in (2, 3):
        assert_same_gradients(grads[1], grads[accumulation], dumps=4)  # 2 updates x 2 minibatches
        for a, b in zip(lines[1], lines[accumulation]):
            for key in ("proxy/score", "loss/policy", "loss/value", "policy/clipfrac", "kl/sum"):
                assert a[key] == pytest.approx(b[key], abs=1e-5), (accumulation, a["step"], key)


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_grad_accum_under_torchrun_gives_the_unsplit_gradient(tmp_path, setup, eager_eos_policy, sharding):
    """2 processes, DDP or FSDP2 (gloo): each process's 4 replies of a minibatch in 3 micro-batches (2 + 1 + 1),
    the gradients reduced only after the last, against the same run without accumulation."""
    flags = [*accumulation_flags(setup, eager_eos_policy), "--rollout-batch", "16", "--minibatch", "8",
             *(["--fsdp"] if sharding == "fsdp" else [])]
    grads = {}
    for i, accumulation in enumerate((1, 3)):
        done, out = torchrun_ppo(tmp_path, f"{sharding}-{accumulation}", [*flags, "--grad-accum", str(accumulation)],
                                 29581 + 2 * (sharding == "fsdp") + i)
        assert done.returncode == 0, done.stderr[-3000:]
        grads[accumulation] = torch.load(str(out) + ".grads")
    assert_same_gradients(grads[1], grads[3], dumps=4)


def test_ml_irl_trains_its_preference_reward_through_a_function_of_train_rm_args(tmp_path, monkeypatch):
    """ML-IRL's reward step calls train_rm.train_reward_model with a train_rm.Args built field by field (a renamed
    field fails where it is built), never train_rm.main with flag strings."""
    seen = []
    monkeypatch.setattr(train_rm, "train_reward_model", lambda args: seen.append(args) or {"steps": 0})
    monkeypatch.setattr(train_rm, "main", lambda argv=None: pytest.fail("ML-IRL called train_rm.main"))
    args = train_ppo.Args(model="m", irl_reward="bt", reward_steps=7, reward_lr=3e-4, batch_size=4, trainable_layers=2,
                          max_length=96, seed=5)
    train_ppo.irl_preference_reward(args, tmp_path / "pairs.jsonl", tmp_path / "reward", iteration=2)
    (got,) = seen
    assert isinstance(got, train_rm.Args)
    assert (got.model, got.objective, got.data, got.output_dir) == ("m", "bt", str(tmp_path / "pairs.jsonl"),
                                                                     str(tmp_path / "reward"))
    assert (got.max_steps, got.lr, got.batch_size, got.trainable_layers, got.max_length, got.seed, got.save_every) == (
        7, 3e-4, 4, 2, 96, 7, 0)
