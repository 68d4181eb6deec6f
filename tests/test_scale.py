"""Scale (avalib/distributed.py, avalib/memory_plan.py): the 7B memory plan against what fully_shard and autograd really
do, activation checkpointing, LoRA through peft, --bf16 refused on CPU; and under torchrun (slow):
2 processes reproduce 1 process's losses AND gradients over the same global batch, for DDP and for
FSDP2 on gloo (pytorch issue 162338 reported FSDP2 summing gradients there), and FSDP2's sharded
checkpoints resume a killed run exactly."""
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import ava
from avalib import cli, distributed, lora, memory_plan, models, reward_models
import train_direct
import train_ppo
import train_rm
from conftest import ROOT, random_batch, tiny_lm
from test_train_rm import write_jsonl


def plan_args(**overrides):
    """train_direct's flags, as its parser would make them, with overrides."""
    return dataclasses.replace(cli.parse_config(train_direct.Args, []), **overrides)


# ---- the plan ----

def test_plan_of_llama_2_7b_divides_by_world_size_under_fsdp_and_replicates_under_ddp():
    base = dict(plan="llama-2-7b", trainable_layers=-1, batch_size=16, max_length=1024, bf16=True)
    fsdp = memory_plan.memory_plan(plan_args(**base, fsdp=True, plan_world_size=8), "dpo")
    ddp = memory_plan.memory_plan(plan_args(**base, fsdp=False, plan_world_size=8), "dpo")
    one = memory_plan.memory_plan(plan_args(**base, fsdp=True, plan_world_size=1), "dpo")
    assert fsdp["params"] == 6_738_415_616  # Llama-2-7b
    assert one["bytes"]["parameters"] == 4 * fsdp["params"] and one["sharding"] == "none"
    assert ddp["bytes"]["parameters"] == one["bytes"]["parameters"] and ddp["bytes"]["optimizer"] == 8 * fsdp["params"]
    for part in ("parameters", "gradients", "optimizer"):  # 4096, 11008 and 32000 all divide by 8: no padding
        assert fsdp["bytes"][part] * 8 == one["bytes"][part]
    assert fsdp["tokens_per_gpu"] == 2 * 2 * 1024 and one["tokens_per_gpu"] == 16 * 2 * 1024
    on, off = fsdp["checkpointing_on"], fsdp["checkpointing_off"]
    assert on["activations"] < off["activations"] / 5 and on["max_items_per_gpu"] > off["max_items_per_gpu"]
    assert off["activations"] > 32 * 4096 * fsdp["tokens_per_gpu"]  # every layer keeps far more than its input
    accumulated = memory_plan.memory_plan(plan_args(**base, fsdp=True, plan_world_size=8, grad_accum=2), "dpo")
    assert accumulated["tokens_per_gpu"] == fsdp["tokens_per_gpu"] // 2  # --grad-accum: one micro-batch's activations
    # FSDP2 accumulates the micro-batches' gradients unsharded (fp32) until the synchronising backward
    assert accumulated["bytes"] == fsdp["bytes"]  # FSDP2 reduce-scatters every micro-batch: no gradient memory added


def test_plan_counts_what_fully_shard_puts_on_each_rank():
    """FSDP2 on a fake process group of 8 (no communication), on the meta device: rank 0's shards
    hold exactly the elements the plan counts per GPU."""
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    args = plan_args(plan="llama-2-7b", trainable_layers=-1, fsdp=True, plan_world_size=8)
    plan = memory_plan.memory_plan(args, "ava-p")
    model, lm, _ = memory_plan._plan_model(memory_plan.plan_config("llama-2-7b"), "ava-p", args)
    torch.distributed.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
    try:
        for layer in models.decoder_layers(lm):
            fully_shard(layer)
        fully_shard(model)
        local = sum(p.to_local().numel() for p in model.parameters())
    finally:
        torch.distributed.destroy_process_group()
    assert 4 * local == plan["bytes"]["parameters"]


def test_plan_from_the_command_line_loads_nothing(capsys):
    plan = train_rm.main(["--plan", "llama-2-7b", "--plan-world-size", "8", "--fsdp", "--bf16", "--trainable-layers", "-1",
                          "--model", "/no/such/model", "--data", "/no/such/file.jsonl"])
    out = capsys.readouterr().out
    assert plan["objective"] == "ava-p" and plan["sharding"] == "FSDP2" and "parameters" in out and "fits" in out
    lora = train_direct.main(["--plan", "llama-2-7b", "--lora-r", "16", "--bf16", "--activation-checkpointing",
                              "--trainable-layers", "-1", "--objective", "dpo"])
    # LoRA r=16 on all 7 linear layers of 32 blocks: r * (in + out) each
    assert lora["lora_params"] == lora["trainable_params"] == 16 * 32 * (4 * 2 * 4096 + 3 * (4096 + 11008))
    assert lora["checkpointing_on"]["fits"] and lora["chosen"] == "on"


def ppo_plan(**overrides):
    """train_ppo.py --plan llama-2-7b, fully fine-tuned on 8 GPUs with FSDP2 and bf16, with overrides."""
    args = dataclasses.replace(cli.parse_config(train_ppo.Args, []), plan="llama-2-7b", trainable_layers=-1, bf16=True,
                               fsdp=True, plan_world_size=8, rollout_batch=64, minibatch=16, max_length=512,
                               max_new_tokens=256)
    return memory_plan.memory_plan(dataclasses.replace(args, **overrides), "ppo", "train_ppo.py")


def test_ppo_plan_counts_four_models_and_shards_the_trained_two_under_fsdp():
    """Policy and value model trained (parameters, gradients, AdamW; FSDP2 splits them over the 8 GPUs), the
    frozen reference and reward model whole on every GPU, the activations of both trained models on one
    micro-batch of prompt + new tokens, and the sampler's KV cache."""
    from transformers import LlamaConfig

    lm, value_head, lm_head = 6_738_415_616, 4096 + 1, 32000 * 4096  # Llama-2-7b; the value head; its LM head
    eight, one = ppo_plan(), ppo_plan(plan_world_size=1)
    assert eight["params"] == one["params"] == 2 * lm + value_head and eight["frozen_params"] == 2 * lm
    assert one["sharding"] == "none" and eight["sharding"] == "FSDP2"
    # the value model never calls its (untied) LM head: no gradient, no AdamW state for it
    assert eight["trainable_params"] == 2 * lm - lm_head + value_head
    assert one["bytes"]["parameters"] == 4 * (2 * lm + value_head)
    assert eight["bytes"]["parameters"] == 4 * (2 * lm // 8 + value_head)  # the head's one row is not split
    assert one["bytes"]["gradients"] == 4 * (2 * lm - lm_head + value_head)
    assert eight["bytes"]["gradients"] == 4 * ((2 * lm - lm_head) // 8 + value_head)
    assert eight["bytes"]["optimizer"] == 2 * eight["bytes"]["gradients"]
    assert eight["bytes"]["frozen_models"] == one["bytes"]["frozen_models"] == 2 * 4 * lm  # never sharded
    assert ppo_plan(frozen_bf16=True)["bytes"]["frozen_models"] == 2 * 2 * lm
    # one micro-batch: 16 replies / 8 GPUs of 512 prompt + 256 new tokens; both models keep their activations
    tokens = 2 * (512 + 256)
    assert eight["tokens_per_gpu"] == tokens and eight["max_length"] == 768
    layer = memory_plan.activation_bytes_per_token_layer(LlamaConfig(**memory_plan.LLAMA_2_7B), "bf16")
    policy, value = 32 * layer + 8 * 4096 + 2 * 4096, 32 * layer + 8 * 4096  # layers, final norm, gathered states
    kept = min(8 * tokens * 32000, ava.KEPT_VOCAB_BYTES)  # what the policy's backward keeps of its vocabulary chunks
    assert eight["checkpointing_off"]["activations"] == tokens * (policy + value + layer) + kept
    # sampling: keys and values of 32 layers x 4096 for 8 replies per GPU (64 / 8) of 768 tokens, bf16
    assert eight["kv_cache"]["bytes"] == 2 * 32 * 4096 * 768 * 8 * 2
    static = sum(eight["bytes"].values())
    assert eight["checkpointing_off"]["total"] == static + eight["checkpointing_off"]["activations"]
    assert "checkpointing_on" not in eight  # train_ppo.py refuses it (its models run in eval mode)
    # --grad-accum: half the tokens, half the activations; FSDP2 then holds the unsharded gradients meanwhile
    accumulated = ppo_plan(grad_accum=2)
    assert accumulated["tokens_per_gpu"] == tokens // 2
    assert accumulated["checkpointing_off"]["activations"] < 0.6 * eight["checkpointing_off"]["activations"]
    assert accumulated["bytes"] == eight["bytes"] and accumulated["kv_cache"] == eight["kv_cache"]
    lora = ppo_plan(lora_r=16, grad_accum=2)  # LoRA on both trained models, counted as apply_lora counts it
    assert lora["lora_params"] == 2 * 16 * 32 * (4 * 2 * 4096 + 3 * (4096 + 11008))
    assert lora["trainable_params"] == lora["lora_params"] + value_head
    assert lora["checkpointing_off"]["total"] < accumulated["checkpointing_off"]["total"]


def test_ppo_plan_from_the_command_line_loads_nothing(tmp_path):
    out = tmp_path / "never"
    done = subprocess.run([sys.executable, "train_ppo.py", "--plan", "llama-2-7b", "--plan-world-size", "8", "--fsdp",
                           "--bf16", "--frozen-bf16", "--lora-r", "16", "--trainable-layers", "-1", "--minibatch", "16",
                           "--grad-accum", "2",
                           "--model", "/no/such/model", "--reward-model", "/no/such/reward-model",
                           "--output-dir", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "train_ppo.py: ppo on llama-2-7b (policy + value model" in done.stdout
    for part in ("frozen_models", "kv_cache", "in 2 micro-batches", "fits"):
        assert part in done.stdout, part
    assert not out.exists()


def test_accumulated_backwards_wait_for_the_last_micro_batch_under_ddp_and_stay_sharded_under_fsdp2():
    """DDP's no_sync must wrap every micro-batch's backward but the last, for every model the loss runs through
    (PPO: policy and value model); FSDP2 is never put out of sync (its gradients stay sharded). The summed
    gradient is the whole batch's."""
    from avalib import loop

    class RecordingDDP(torch.nn.parallel.DistributedDataParallel):  # DDP as distributed.gradient_sync sees it
        def __init__(self, module):
            torch.nn.Module.__init__(self)
            self.module, self.synchronising = module, True

        def forward(self, x):
            return self.module(x)

        @contextlib.contextmanager
        def no_sync(self):
            self.synchronising = False
            try:
                yield
            finally:
                self.synchronising = True

    class FSDPLike(torch.nn.Linear):
        synchronising = True

        def set_requires_gradient_sync(self, enabled):
            self.synchronising = enabled

    torch.manual_seed(0)
    inputs = torch.randn(5, 3)
    for make, expected in ((RecordingDDP, [False, False, False, False, True, True]), (None, [True] * 6)):
        trained = tuple(make(torch.nn.Linear(3, 1)) if make else FSDPLike(3, 1) for _ in range(2))
        seen = []
        for model in trained:
            weight = model.module.weight if make else model.weight
            weight.register_hook(lambda grad, model=model: seen.append(model.synchronising))
        loss_fn = lambda models, rows: ((models[0](inputs[rows]) * models[1](inputs[rows])).mean(), {})
        loop.accumulate_gradients(trained, [0, 1, 2, 3, 4], loss_fn, SimpleNamespace(grad_accum=3),
                                  distributed.Distributed(), step=1, batch_items=5)
        assert seen == expected  # 3 micro-batches x 2 models
        weights = [model.module.weight if make else model.weight for model in trained]
        accumulated = [weight.grad.clone() for weight in weights]
        for weight in weights:
            weight.grad = None
        loss_fn(trained, [0, 1, 2, 3, 4])[0].backward()
        for weight, gradient in zip(weights, accumulated):
            torch.testing.assert_close(gradient, weight.grad)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "autocast"])
def test_activation_formula_is_what_autograd_saves_per_layer(precision):
    """The plan's bytes per token per decoder layer, against every tensor autograd keeps (counted once
    per storage) in HF's Llama with SDPA: one layer's worth is the difference of a 2- and a 1-layer
    model, and the per-token part the difference of two lengths (under autocast the saved bf16 weight
    copies are the rest: exactly 2 bytes per weight of its linear layers)."""
    import contextlib

    from transformers import LlamaConfig, LlamaForCausalLM

    def saved(config, layers, length, batch=2):
        config.num_hidden_layers = layers
        torch.manual_seed(0)
        lm = LlamaForCausalLM(config).to(torch.bfloat16 if precision == "bf16" else torch.float32)
        params = {p.data_ptr() for p in lm.parameters()}
        storages = {}

        def pack(tensor):
            if tensor.data_ptr() not in params:
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        ids = torch.randint(0, 128, (batch, length))
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "autocast" else contextlib.nullcontext()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
            lm.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        return sum(storages.values())

    for hidden, kv_heads, heads, intermediate in [(64, 4, 4, 128), (128, 2, 8, 512)]:
        config = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                             num_key_value_heads=kv_heads, max_position_embeddings=128)
        one_layer = {length: saved(config, 2, length) - saved(config, 1, length) for length in (24, 48)}
        per_token = (one_layer[48] - one_layer[24]) / (2 * 24)
        assert per_token == memory_plan.activation_bytes_per_token_layer(config, precision)
        linear = sum(p.numel() for p in LlamaForCausalLM(config).model.layers[0].parameters() if p.dim() == 2)
        assert one_layer[24] - 2 * 24 * per_token == (2 * linear if precision == "autocast" else 0)


# ---- activation checkpointing, bf16 on CPU ----

def test_activation_checkpointing_keeps_less_and_gives_the_same_gradients():
    def run(checkpointing):
        lm = tiny_lm("llama")
        model = ava.TQR(lm, ava.AVAConfig(), share_prompts=not checkpointing)  # sharing needs the KV cache checkpointing drops
        if checkpointing:
            with pytest.raises(ValueError, match="share_prompts=True"):  # a model built to share prompts is refused, not changed
                distributed.enable_activation_checkpointing(ava.TQR(tiny_lm("llama"), ava.AVAConfig()))
            distributed.enable_activation_checkpointing(model)
        model.train()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
            loss, _ = ava.ava_d_loss(model(*random_batch(batch_size=4, length=24)), model.config)
        loss.backward()
        return sum(saved), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (bytes_off, grads_off), (bytes_on, grads_on) = run(False), run(True)
    assert bytes_on < 0.6 * bytes_off
    assert grads_on.keys() == grads_off.keys()
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], rtol=1e-5, atol=1e-7)


def test_bf16_is_refused_on_cpu(tmp_path):
    with pytest.raises(SystemExit, match="CUDA"):
        train_rm.main(["--bf16", "--output-dir", str(tmp_path)])


# ---- LoRA ----

def lora_args(r=4, trainable_layers=-1, targets="all-linear"):
    return SimpleNamespace(lora_r=r, lora_alpha=8.0, lora_dropout=0.0, lora_target_modules=targets,
                           trainable_layers=trainable_layers)


@pytest.mark.parametrize("targets,trainable_layers", [("all-linear", -1), ("q_proj,v_proj", 1)])
def test_lora_trains_only_adapters_and_heads_and_merges_into_a_plain_model(tmp_path, targets, trainable_layers):
    lm = tiny_lm("llama")
    initial = {n: p.detach().clone() for n, p in lm.named_parameters()}
    count = lora.apply_lora(lm, lora_args(targets=targets, trainable_layers=trainable_layers))
    model = ava.TQR(lm, ava.AVAConfig())
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):  # LoRA's B starts at zero, so A gets no gradient before B has moved once
        optimizer.zero_grad()
        out = model(*random_batch(batch_size=4, length=16, seed=step))
        loss, _ = ava.ava_p_loss(ava.take_rows(out, slice(0, 2)), ava.take_rows(out, slice(2, 4)), model.config)
        loss.backward()
        if step == 0:
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.step()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    heads = {n for n in with_grad if not n.startswith("lm.")}
    adapters = with_grad - heads
    assert heads == {"reward_head.weight", "reward_head.bias", "weighting.query.weight", "weighting.key.weight"}
    assert adapters and all(".lora_A." in n or ".lora_B." in n for n in adapters)
    assert sum(p.numel() for n, p in model.named_parameters() if n in adapters) == count
    layers = {int(n.split(".layers.")[1].split(".")[0]) for n in adapters}
    assert layers == ({0, 1} if trainable_layers < 0 else {1})  # the top --trainable-layers blocks
    assert {n.split(".")[-4] for n in adapters} == ({"q_proj", "v_proj"} if targets != "all-linear" else
                                                    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
    after = dict(model.named_parameters())
    for name in with_grad:  # every trained tensor moved in the last step ...
        assert not torch.equal(after[name], before[name]), name
    for name, value in before.items():  # ... and nothing else did
        if name not in with_grad:
            assert torch.equal(after[name], value), name
    # merged: an ordinary causal LM (original parameter names) with the same outputs, the adapter saved apart
    batch = random_batch(batch_size=2, length=10, seed=7)
    model.eval()
    with torch.no_grad():
        expected = model.lm(input_ids=batch[0], attention_mask=batch[1]).logits
        assert lora.merge_lora(model.lm, tmp_path / "adapter") > 0
        merged = model.lm(input_ids=batch[0], attention_mask=batch[1]).logits
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5)
    assert {n for n, _ in model.lm.named_parameters()} == set(initial)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4


def test_train_direct_with_lora_exports_a_merged_policy(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("AVA_CACHE", str(tmp_path / "cache"))
    from test_train_rm import hh_rows

    pairs = write_jsonl(tmp_path / "pairs.jsonl", hh_rows(8))
    out = tmp_path / "run"
    final = train_direct.main(["--model", tiny_model_dir, "--objective", "ava-p", "--data", pairs, "--eval-data", pairs,
                               "--eval-prompts", "none", "--output-dir", str(out), "--max-length", "64", "--batch-size", "4",
                               "--lr", "1e-2", "--trainable-layers", "-1", "--lora-r", "4", "--epochs", "2"])
    assert final["steps"] == 4
    before, _ = models.load_model(tiny_model_dir)
    after, _ = models.load_model(str(out / "policy"))  # a plain causal LM: the adapters are merged in
    changed = {n for (n, a), b in zip(after.named_parameters(), before.parameters()) if not torch.equal(a, b)}
    assert changed and all("proj" in n for n in changed)  # only adapted linear layers; embeddings and norms untouched
    assert (out / "policy" / "lora" / "adapter_model.safetensors").is_file()
    model, _, meta = reward_models.load_reward_model(out / "policy")  # AVA's heads, trained in full, load with it
    assert meta["args"]["lora_r"] == 4 and model.reward_head.weight.abs().sum() > 0


# ---- torchrun: 2 processes against 1, DDP and FSDP2 on gloo ----

def equal_length_pairs(n=8):
    """Pairs whose chosen (and rejected) replies all tokenise to the same length. AVA's terms are means
    over the response transitions a process holds, and data parallelism averages those means: that
    equals the 1-process mean exactly when every process holds as many transitions (else tokens are
    weighted by their process, as with any token-mean loss under DDP)."""
    rows = []
    for i in range(n):
        prompt = f"\n\nHuman: question number {i} about cats?\n\nAssistant:"
        rows.append({"chosen": prompt + f" A kind and helpful answer {i}.", "rejected": prompt + f" Go away {i}."})
    return rows


def run_script(tmp_path, name, script, flags, processes, port=29531, timeout=300):
    out = tmp_path / name
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
                str(port)] if processes > 1 else [sys.executable]
    done = subprocess.run([*launcher, script, *flags, "--output-dir", str(out), "--dump-grads", str(out) + ".grads"],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return lines, torch.load(str(out) + ".grads"), out


def assert_same_training(one, two, steps):
    (lines_one, grads_one, _), (lines_two, grads_two, _) = one, two
    assert len(grads_one) == len(grads_two) == steps and len(lines_one) == len(lines_two) == steps + 1
    for a, b in zip(lines_one[:-1], lines_two[:-1]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    for step, (a, b) in enumerate(zip(grads_one, grads_two)):
        assert a.keys() == b.keys() and a, step
        for name in a:  # each tensor to 1e-4 of its own scale (a summed gradient would be 2x)
            scale = a[name].abs().max().clamp(min=1e-8)
            assert float((a[name] - b[name]).abs().max() / scale) < 1e-4, (step, name)


CASES = {  # script, flags
    "rm-ava-p": ("train_rm.py", ["--objective", "ava-p", "--trainable-layers", "-1"]),
    "direct-dpo": ("train_direct.py", ["--objective", "dpo", "--trainable-layers", "1", "--eval-prompts", "none"]),
    "direct-ava-p-checkpointing": ("train_direct.py", ["--objective", "ava-p", "--trainable-layers", "-1",
                                                       "--activation-checkpointing", "--eval-prompts", "none"]),
    "direct-ava-p-lora": ("train_direct.py", ["--objective", "ava-p", "--lora-r", "4", "--lr", "1e-2",
                                              "--trainable-layers", "-1", "--eval-prompts", "none"]),
    # gradient accumulation: no gradient sync until the last micro-batch (the 1-process reference runs
    # the same micro-batches; test_gradient_accumulation_equals_the_larger_batch ties it to no accumulation)
    "rm-ava-p-accum": ("train_rm.py", ["--objective", "ava-p", "--trainable-layers", "-1", "--grad-accum", "2"]),
    "direct-dpo-accum": ("train_direct.py", ["--objective", "dpo", "--trainable-layers", "1", "--eval-prompts", "none",
                                             "--grad-accum", "2"]),
}


@pytest.mark.parametrize("script,flags", [("train_rm.py", ["--objective", "ava-p", "--trainable-layers", "-1"]),
                                          ("train_rm.py", ["--objective", "bt", "--trainable-layers", "-1"]),
                                          ("train_direct.py", ["--objective", "dpo", "--trainable-layers", "1",
                                                               "--eval-prompts", "none"])])
def test_gradient_accumulation_equals_the_larger_batch(tmp_path, tiny_model_dir, script, flags, monkeypatch):
    """--grad-accum 2 (and 4: one item a micro-batch) gives every step the gradient of the whole batch."""
    import importlib

    monkeypatch.setenv("AVA_CACHE", str(tmp_path / "cache"))
    main = importlib.import_module(script[:-3]).main
    pairs = write_jsonl(tmp_path / "pairs.jsonl", equal_length_pairs())
    base = ["--model", tiny_model_dir, "--data", pairs, "--max-length", "64", "--batch-size", "4", "--lr", "1e-3",
            "--max-steps", "2", "--save-every", "0", *flags]
    grads = {}
    for accumulation in (1, 2, 4):
        dump = tmp_path / f"grads-{accumulation}.pt"
        main([*base, "--grad-accum", str(accumulation), "--dump-grads", str(dump), "--output-dir", str(tmp_path / f"run-{accumulation}")])
        grads[accumulation] = torch.load(dump)
    for accumulation in (2, 4):
        for step, (a, b) in enumerate(zip(grads[1], grads[accumulation])):
            assert a.keys() == b.keys() and a, step
            for name in a:
                scale = a[name].abs().max().clamp(min=1e-8)
                assert float((a[name] - b[name]).abs().max() / scale) < 1e-4, (accumulation, step, name)


@pytest.fixture(scope="module")
def scale_data(tmp_path_factory, tiny_model_dir):
    directory = tmp_path_factory.mktemp("scale")
    pairs = write_jsonl(directory / "pairs.jsonl", equal_length_pairs())
    base = ["--model", tiny_model_dir, "--data", pairs, "--eval-data", pairs, "--max-length", "64", "--batch-size", "4",
            "--lr", "1e-3", "--threads", "1", "--epochs", "2", "--save-every", "2"]
    return directory, base, {}


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_match_one_in_losses_and_gradients(scale_data, case, sharding, monkeypatch):
    directory, base, single = scale_data
    monkeypatch.setenv("AVA_CACHE", str(directory / "cache"))
    script, flags = CASES[case]
    if case not in single:  # the 1-process reference, shared by DDP and FSDP
        single[case] = run_script(directory, f"{case}-one", script, [*base, *flags], processes=1)
    two = run_script(directory, f"{case}-{sharding}", script, [*base, *flags, *(["--fsdp"] if sharding == "fsdp" else [])],
                     processes=2, port=29531 + list(CASES).index(case) * 2 + (sharding == "fsdp"))
    assert_same_training(single[case], two, steps=4)
    final_one = json.loads((single[case][2] / "final.json").read_text())
    final_two = json.loads((two[2] / "final.json").read_text())
    if "eval/accuracy" in final_one:
        assert final_two["eval/accuracy"] == final_one["eval/accuracy"]
    exported = "model" if script == "train_rm.py" else "policy"  # the export: one set of full weights
    from safetensors.torch import load_file

    a, b = (load_file(str(run / exported / "model.safetensors")) for run in (single[case][2], two[2]))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
    if sharding == "fsdp":  # resumable from shards; the last sharded checkpoint is the only one kept
        assert [p.name for p in two[2].glob("checkpoint-sharded-*")] == ["checkpoint-sharded-0000004"]


@pytest.mark.slow
def test_fsdp_resume_after_a_kill_ends_with_the_same_metrics(scale_data):
    directory, base, _ = scale_data
    flags = [*base, "--objective", "ava-p", "--trainable-layers", "-1", "--fsdp", "--epochs", "3"]
    straight = run_script(directory, "fsdp-straight", "train_rm.py", flags, processes=2, port=29551)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    killed = directory / "fsdp-killed"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29553",
                "train_rm.py", *flags, "--output-dir", str(killed)]
    crashed = subprocess.run(launcher + ["--crash-at-step", "5"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert crashed.returncode != 0 and not (killed / "final.json").exists()
    assert torch.load(killed / "checkpoint.pt", weights_only=False)["sharded"] == "checkpoint-sharded-0000004"
    resumed = subprocess.run(launcher + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    lines = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines[:-1]] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight[0][:-1], lines[:-1]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    final = json.loads((killed / "final.json").read_text())
    assert final["eval/accuracy"] == json.loads((straight[2] / "final.json").read_text())["eval/accuracy"]
    # a sharded checkpoint is not resumed without --fsdp (and says so)
    refused = subprocess.run([sys.executable, "train_rm.py", *[f for f in flags if f != "--fsdp"], "--output-dir",
                              str(killed), "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert refused.returncode != 0 and "sharded (FSDP2)" in refused.stderr


def test_eq12_gradient_written_out_equals_autograd_of_the_formula():
    """ava.pretrained_q's hand-written backward (it keeps fewer vocabulary-sized tensors) against
    autograd through the plain formula, in float64, and torch's finite-difference gradcheck."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 13, dtype=torch.float64, generator=generator, requires_grad=True)
    actions = torch.randint(0, 13, (6,), generator=generator)
    upstream = torch.randn(6, dtype=torch.float64, generator=generator)
    for alpha in (1.0, 3.0, 0.25):
        scaled = alpha * logits.softmax(dim=-1)
        plain = scaled.gather(-1, actions[:, None]).squeeze(-1) - scaled.logsumexp(dim=-1)
        ours = ava.pretrained_q(logits, actions, alpha)
        torch.testing.assert_close(ours, plain)
        expected, = torch.autograd.grad((plain * upstream).sum(), logits)
        got, = torch.autograd.grad((ours * upstream).sum(), logits)
        torch.testing.assert_close(got, expected)
        assert torch.autograd.gradcheck(lambda z: ava.pretrained_q(z, actions, alpha), (logits,))
    half = logits.detach().bfloat16().requires_grad_()  # bf16 logits (FSDP2's bf16 policy): Q in float32
    q = ava.pretrained_q(half, actions, 1.0)
    q.sum().backward()
    assert q.dtype == torch.float32 and half.grad.dtype == torch.bfloat16
