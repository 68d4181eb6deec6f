"""Lean loading under FSDP2 (models.load_model(on_meta=True), distributed.load_from_rank0): rank 0
alone reads the weights, rank 1 builds the model on the meta device, and after sharding both hold
exactly the full model's weights and compute its outputs (2 processes on gloo, a tiny Llama with a
tied LM head)."""
import os
import subprocess
import sys

import pytest
import torch

from avalib import data, models, reward_models
from conftest import ROOT

WORKER = '''
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, {root!r})
from avalib import data, distributed, models, reward_models

model_dir, out = sys.argv[1], sys.argv[2]
dist = distributed.init_distributed()
torch.manual_seed(dist.rank)  # rank 1's fresh head differs from rank 0's until rank 0's weights arrive
lm, tokenizer = models.load_model(model_dir, on_meta=not dist.is_main)
built_on_meta = all(p.is_meta for p in lm.parameters())
model = reward_models.build_reward_model(lm, "bt")
skeleton = distributed.meta_skeleton(model)
sharded = distributed.distribute(model, SimpleNamespace(fsdp=True, bf16=False, activation_checkpointing=False), dist)
batch = data.collate([data.encode(tokenizer, "Say something nice.", [" You are great."], 32)[0][0],
                      data.encode(tokenizer, "Hello", [" Hi there, friend!"], 32)[0][0]], tokenizer.pad_token_id)
with torch.no_grad():
    rewards = sharded(**batch).rewards
full = distributed.gather_full_model(sharded, skeleton, dist)
torch.save({{"built_on_meta": built_on_meta, "rewards": rewards, "state": full.state_dict(),
            "tied": full.lm.lm_head.weight is full.lm.model.embed_tokens.weight}}, f"{{out}}.{{dist.rank}}")
distributed.end_distributed(dist)
'''


@pytest.mark.slow
def test_rank_1_builds_on_meta_and_ends_with_the_full_weights(tmp_path, tiny_model_dir):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(root=str(ROOT)))
    out = tmp_path / "result"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29591",
                           str(worker), tiny_model_dir, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    torch.manual_seed(0)  # the same heads as rank 0's
    lm, tokenizer = models.load_model(tiny_model_dir)
    model = reward_models.build_reward_model(lm, "bt").eval()
    batch = data.collate([data.encode(tokenizer, "Say something nice.", [" You are great."], 32)[0][0],
                          data.encode(tokenizer, "Hello", [" Hi there, friend!"], 32)[0][0]], tokenizer.pad_token_id)
    with torch.no_grad():
        expected_rewards = model(**batch).rewards
    expected = model.state_dict()
    for rank in (0, 1):
        result = torch.load(f"{out}.{rank}", weights_only=False)
        assert result["built_on_meta"] == (rank == 1)  # rank 1 never read a weight
        assert result["state"].keys() == expected.keys() and result["tied"]
        for name, value in expected.items():
            assert torch.equal(result["state"][name], value), (rank, name)
        torch.testing.assert_close(result["rewards"], expected_rewards, rtol=1e-5, atol=1e-6)
