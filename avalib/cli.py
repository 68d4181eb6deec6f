"""Command line: a dataclass is the config, its field metadata the --help (cleanrl style)."""
from __future__ import annotations

from dataclasses import dataclass, field


from avalib import models


def arg(default, help: str, choices=None):
    """A config field with its --help text (cleanrl style: one dataclass, a real --help)."""
    return field(default=default, metadata={"help": help, "choices": choices})


def parse_config(cls, argv=None, description: str | None = None):
    """Parse argv into the dataclass `cls`: --field-name for every field, booleans as --x/--no-x.
    Fields a script inherits (TrainFlags, AVAFlags) appear in --help in their own groups, after the
    script's own."""
    import argparse
    import dataclasses

    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    parser = argparse.ArgumentParser(description=description, formatter_class=Formatter)
    owners = [c for c in cls.__mro__ if dataclasses.is_dataclass(c)]
    groups = {c: parser.add_argument_group((c.__doc__ or c.__name__).strip().splitlines()[0]) if c is not cls else parser
              for c in owners}
    for owner in owners:
        own = vars(owner).get("__annotations__", {})
        for f in dataclasses.fields(cls):
            if f.name not in own or next(c for c in owners if f.name in vars(c).get("__annotations__", {})) is not owner:
                continue
            flag, meta, group = "--" + f.name.replace("_", "-"), f.metadata, groups[owner]
            if isinstance(f.default, bool):
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=meta.get("help"))
            else:
                group.add_argument(flag, type=type(f.default), default=f.default, choices=meta.get("choices"),
                                   help=meta.get("help"))
    return cls(**vars(parser.parse_args(argv)))


@dataclass
class TrainFlags:
    """training loop (shared by train_rm.py, train_direct.py, train_ppo.py)"""
    model: str = arg(models.DEFAULT_MODEL, "'smollm2' (embedded SmolLM2-135M-Instruct), a hub id or a local path")
    max_length: int = arg(512, "tokens per sequence: prompts cut from the left, responses from the right")
    batch_size: int = arg(8, "pairs (or demonstrations) per optimiser step, over all processes")
    eval_batch_size: int = arg(16, "pairs per evaluation batch, per process")
    lr: float = arg(1e-4, "AdamW learning rate (linear decay to 0)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient clipping (0: off)")
    epochs: int = arg(1, "passes over the training data")
    max_steps: int = arg(0, "stop after this many optimiser steps (0: run all epochs)")
    trainable_layers: int = arg(4, "top decoder layers trained, the rest frozen (-1: train everything)")
    seed: int = arg(0, "seed of initialisation, data order and sampling")
    limit: int = arg(0, "use only the first N training rows (0: all)")
    eval_limit: int = arg(0, "use only the first N evaluation pairs (0: all)")
    eval_every: int = arg(0, "evaluate every N steps (0: at the end only)")
    save_every: int = arg(50, "write a checkpoint every N steps (and at the end)")
    log_every: int = arg(1, "write a metrics line every N steps")
    resume: bool = arg(False, "continue from OUTPUT_DIR/checkpoint.pt")
    skip_bad_rows: bool = arg(False, "skip malformed rows and count them, instead of stopping at the first")
    threads: int = arg(0, "torch CPU threads per process (0: torch's default)")
    crash_at_step: int = arg(0, "testing aid: SIGKILL this process right after step N (to test --resume)")
    # scale (section "scale" below; README "Scale: from a laptop to a GPU node")
    fsdp: bool = arg(False, "under torchrun: FSDP2 (parameters, gradients and AdamW state sharded over the processes; "
                            "fully_shard on each decoder layer, then the root) instead of DDP; resume from sharded "
                            "checkpoints (torch.distributed.checkpoint), full safetensors export at the end")
    bf16: bool = arg(False, "bf16 mixed precision on a CUDA GPU with bf16 (fp32 master weights, gradients reduced in fp32); "
                            "refused on CPU, where bf16 matmul is ~2.7x slower than fp32")
    activation_checkpointing: bool = arg(False, "keep only each decoder layer's input and recompute the layer in the "
                                                "backward pass: activation memory / ~n_layers, about 1/3 more compute")
    plan: str = arg("", "print the per-GPU memory plan of this run's flags for MODEL ('llama-2-7b', or a model directory "
                        "or config.json) and exit, loading no data and no weights (built on the meta device)")
    plan_world_size: int = arg(1, "--plan: number of GPUs (FSDP divides parameters, gradients and AdamW state by it; DDP replicates)")
    plan_gpu_gb: float = arg(80.0, "--plan: memory of one GPU, GB (10^9 bytes)")
    dump_grads: str = arg("", "testing aid: after every step's backward (gradients reduced across processes, not yet "
                              "clipped) rank 0 writes all full gradients so far to PATH (torch.save: a list, one dict per step)")


def _ava_default(name: str):
    import ava

    return getattr(ava.AVAConfig, name)


@dataclass
class AVAFlags:
    """AVA hyper-parameters and variants (ava.AVAConfig; see README)"""
    ablate: str = arg("", "comma-separated Table 1 ablations, e.g. 'w/o rwt,w/o neg' "
                          "(from: w/o rwt, w/o neg, w/o irl, w/o cer, w/o ptq)")
    alpha: float = arg(_ava_default("alpha"), "Eq. 12 temperature mapping LM probabilities to Q-values")
    beta: float = arg(_ava_default("beta"), "likelihood weight (Eq. 13) / Boltzmann temperature (Eq. 3)")
    gamma: float = arg(_ava_default("gamma"), "TD discount (Eq. 14)")
    lam: float = arg(_ava_default("lam"), "weight of the TD log-density term (lambda, Eq. 13)")
    cer_weight: float = arg(_ava_default("cer_weight"), "weight of CER (Eq. 18)")
    reward_weighting: str = arg(_ava_default("reward_weighting"), "Eq. 11 weights", choices=("mean-one", "literal", "off"))
    negative: str = arg(_ava_default("negative"), "rejected-likelihood term", choices=("literal", "unlikelihood", "off"))
    cer: str = arg(_ava_default("cer"), "CER form", choices=("sigmoid", "logsigmoid", "off"))
    kl_td_on: str = arg(_ava_default("kl_td_on"), "sequences that get KL and TD terms", choices=("both", "chosen"))
    pretrained_q: bool = arg(_ava_default("pretrained_q"), "Q from the pretrained LM head via Eq. 12 (--no-pretrained-q = w/o ptq)")
    irl: bool = arg(_ava_default("irl"), "KL and TD terms (--no-irl = w/o irl)")

    def ava_config(self):
        import dataclasses

        import ava

        names = {f.name for f in dataclasses.fields(ava.AVAConfig)}
        config = ava.AVAConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})
        ablations = [a.strip() if a.strip().startswith("w/o") else f"w/o {a.strip()}" for a in self.ablate.split(",") if a.strip()]
        unknown = [a for a in ablations if a not in ava.ABLATIONS]
        if unknown:
            raise SystemExit(f"--ablate: unknown {unknown}; choose from {list(ava.ABLATIONS)}")
        return ava.ablate(config, *ablations)


@dataclass
class LoRAFlags:
    """LoRA through peft (train_direct.py; train_ppo.py)"""
    lora_r: int = arg(0, "LoRA rank: train low-rank adapters instead of the LM's weights (0: off); the adapters go on "
                         "the top --trainable-layers decoder layers (-1: all); reward and Q heads train in full")
    lora_alpha: float = arg(16.0, "LoRA scaling numerator (the update is alpha / r * B A)")
    lora_dropout: float = arg(0.0, "dropout on the LoRA branch's input")
    lora_target_modules: str = arg("all-linear", "comma-separated names of the linear layers to adapt (e.g. "
                                                 "'q_proj,v_proj'), or 'all-linear' (every linear layer but the LM head)")
