"""Command line: a dataclass is the config, its field metadata the --help (cleanrl style) and the
range each flag must lie in, checked once after parsing (`check_config`), before any work starts."""
from __future__ import annotations

import math
from dataclasses import dataclass, field


from avalib import models


def arg(default, help: str, choices=None, *, low=None, high=None, above=None, below=None, check=None, why: str = "",
        kind=None, hidden: bool = False):
    """A config field with its --help text (cleanrl style: one dataclass, a real --help) and what its
    value must be: low <= x <= high, above < x < below (each optional), and check(x) -> a problem
    (str) or None; `why` is said when the value is refused. Floats must be finite as well. kind: the
    value's type where the default (None: "unset") does not tell it. hidden: a testing aid, accepted
    on the command line but left out of --help (its help text stays here, for readers of the code)."""
    return field(default=default, metadata={"help": help, "choices": choices, "low": low, "high": high, "above": above,
                                            "below": below, "check": check, "why": why, "kind": kind, "hidden": hidden})


def _bounds_text(meta) -> str:
    """'> 0', '>= 1', 'in [0, 1]', 'in (0, 1]' from a field's low / above / high / below."""
    lower = (f"[{meta['low']}" if meta.get("low") is not None
             else f"({meta['above']}" if meta.get("above") is not None else "")
    upper = (f"{meta['high']}]" if meta.get("high") is not None
             else f"{meta['below']})" if meta.get("below") is not None else "")
    if lower and upper:
        return f"in {lower}, {upper}"
    if lower:
        return (">= " if lower[0] == "[" else "> ") + lower[1:]
    if upper:
        return ("<= " if upper[-1] == "]" else "< ") + upper[:-1]
    return ""


def _within(value, meta) -> bool:
    """NaN fails every comparison, so it is never within bounds."""
    return ((meta.get("low") is None or value >= meta["low"]) and (meta.get("high") is None or value <= meta["high"])
            and (meta.get("above") is None or value > meta["above"])
            and (meta.get("below") is None or value < meta["below"]))


def check_config(config) -> list[str]:
    """Every field of a parsed config against its metadata: one problem per bad flag, each naming the
    flag, what it must be and what it got ("--lr: must be a finite number > 0, got nan")."""
    import dataclasses

    problems = []
    for f in dataclasses.fields(config):
        value, meta, flag = getattr(config, f.name), f.metadata, "--" + f.name.replace("_", "-")
        why = f" ({meta['why']})" if meta.get("why") else ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            bounds = _bounds_text(meta)
            finite = not isinstance(value, float) or math.isfinite(value)
            if not finite or not _within(value, meta):
                kind = "a finite number" if isinstance(value, float) else ""
                problems.append(f"{flag}: must be {' '.join(p for p in (kind, bounds) if p)}{why}, got {value}")
                continue
        problem = meta["check"](value) if meta.get("check") else None
        if problem:
            problems.append(f"{flag}: {problem}{why}")
    return problems


def parse_config(cls, argv=None, description: str | None = None):
    """Parse argv into the dataclass `cls`: --field-name for every field, booleans as --x/--no-x.
    Fields a script inherits (TrainFlags, AVAFlags) appear in --help in their own groups, after the
    script's own. Every value is then checked against its field's bounds (`check_config`): a bad one
    is an error naming the flag (exit status 2, as argparse's own), before anything is loaded."""
    import argparse
    import dataclasses

    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        def _get_help_string(self, action):  # an unset flag (None: "as the preset says") shows no "(default: None)"
            return action.help if action.default is None else super()._get_help_string(action)

    parser = argparse.ArgumentParser(description=description, formatter_class=Formatter)
    owners = [c for c in cls.__mro__ if dataclasses.is_dataclass(c)]
    groups = {c: parser if c is cls else parser.add_argument_group((c.__doc__ or c.__name__).strip().splitlines()[0])
              for c in owners}
    for owner in owners:
        own = vars(owner).get("__annotations__", {})
        for f in dataclasses.fields(cls):
            declared_by = next(c for c in owners if f.name in vars(c).get("__annotations__", {}))
            if f.name not in own or declared_by is not owner:
                continue
            flag, meta, group = "--" + f.name.replace("_", "-"), f.metadata, groups[owner]
            kind = meta.get("kind") or type(f.default)
            shown = argparse.SUPPRESS if meta.get("hidden") else meta.get("help")  # testing aids: not in --help
            if kind is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=shown)
            else:
                group.add_argument(flag, type=kind, default=f.default, choices=meta.get("choices"), help=shown)
    config = cls(**vars(parser.parse_args(argv)))
    problems = check_config(config)
    if problems:  # argparse's own usage errors exit 2 too; one line per bad flag, not the whole usage
        said = "".join(f"{parser.prog}: error: {problem}\n" for problem in problems)
        parser.exit(2, said + f"(see {parser.prog} --help)\n")
    return config


def command_line(fields: dict) -> list[str]:
    """The flags that set these config fields, in their order: {"max_length": 64, "bf16": True, "lr": 0.001}
    -> ["--max-length", "64", "--bf16", "--lr", "0.001"] (False: --no-x; floats as %g). For showing a
    config as the command that gives it; code builds the config dataclass itself."""
    argv = []
    for name, value in fields.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return argv


@dataclass
class TrainFlags:
    """training loop (shared by train_rm.py, train_direct.py, train_ppo.py)"""
    model: str = arg(models.DEFAULT_MODEL, "'smollm2' (embedded SmolLM2-135M-Instruct), a hub id or a local path")
    max_length: int = arg(512, "tokens per sequence: prompts cut from the left, responses from the right", low=2,
                           why="room for a prompt token and a response token")
    batch_size: int = arg(8, "pairs (or demonstrations) per optimiser step, over all processes", low=1)
    grad_accum: int = arg(1, "gradient accumulation: each process runs its part of a step in this many micro-batches, "
                             "synchronising gradients only after the last, so --batch-size no longer ties to the GPU "
                             "count and memory (a micro-batch is ceil(batch-size / processes / grad-accum) items)",
                             low=1)
    eval_batch_size: int = arg(16, "pairs per evaluation batch, per process", low=1)
    lr: float = arg(1e-4, "AdamW learning rate (linear decay to 0)", above=0)
    weight_decay: float = arg(0.0, "AdamW weight decay", low=0)
    max_grad_norm: float = arg(1.0, "gradient clipping (0: off)", low=0)
    epochs: int = arg(1, "passes over the training data", low=1)
    max_steps: int = arg(0, "stop after this many optimiser steps (0: run all epochs)", low=0)
    trainable_layers: int = arg(4, "top decoder layers trained, the rest frozen (-1: train everything)", low=-1)
    seed: int = arg(0, "seed of initialisation, data order and sampling", low=0)
    limit: int = arg(0, "use only the first N training rows (0: all)", low=0)
    eval_limit: int = arg(0, "use only the first N evaluation pairs (0: all)", low=0)
    eval_every: int = arg(0, "evaluate every N steps (0: at the end only)", low=0)
    save_every: int = arg(50, "write a checkpoint every N steps (and at the end; 0: at the end only)", low=0)
    log_every: int = arg(1, "write a metrics line every N steps", low=1)
    resume: bool = arg(False, "continue from OUTPUT_DIR/checkpoint.pt (it says which step; flags that change the "
                              "optimisation must be the checkpoint's)")
    resume_override: bool = arg(False, "with --resume: continue even though flags that change the optimisation (the "
                                       "objective, --lr, --batch-size, --data, --model, the AVA config, ...) differ "
                                       "from the checkpoint's; they are named, and recorded in metrics.jsonl")
    skip_bad_rows: bool = arg(False, "skip malformed rows and count them, instead of stopping at the first")
    threads: int = arg(0, "torch CPU threads per process (0: torch's default)", low=0)
    report_to: str = arg("none", "also send the logged metrics to TensorBoard (event files in OUTPUT_DIR/tensorboard) "
                                 "or Weights & Biases (project $WANDB_PROJECT, default 'ava'); metrics.jsonl is "
                                 "written in every case; each needs its package installed",
                                 choices=("none", "tensorboard", "wandb"))
    crash_at_step: int = arg(0, "testing aid: SIGKILL this process right after step N (to test --resume)",
                             low=0, hidden=True)
    skip_nonfinite: bool = arg(False, "a step whose loss, a loss term or the gradient norm is NaN or infinite is "
                                      "skipped (no optimiser step) and counted (metric train/skipped_nonfinite), "
                                      "instead of stopping the run with the last checkpoint intact")
    inject_nan_at_step: int = arg(0, "testing aid: make the loss NaN at step N (PPO: update N), to test the non-finite "
                                     "stop and --skip-nonfinite", low=0, hidden=True)
    # scale (section "scale" below; README "Scale: from a laptop to a GPU node")
    fsdp: bool = arg(False, "under torchrun: FSDP2 (parameters, gradients and AdamW state sharded over the processes; "
                            "fully_shard on each decoder layer, then the root) instead of DDP; resume from sharded "
                            "checkpoints (torch.distributed.checkpoint), full safetensors export at the end")
    bf16: bool = arg(False, "bf16 mixed precision on a CUDA GPU with bf16 (fp32 master weights, gradients reduced in "
                            "fp32); refused on CPU, where bf16 matmul is ~2.7x slower than fp32")
    activation_checkpointing: bool = arg(False, "keep only each decoder layer's input and recompute the layer in the "
                                                "backward pass: activation memory / ~n_layers, about 1/3 more compute")
    plan: str = arg("", "print the per-GPU memory plan of this run's flags for MODEL ('llama-2-7b', or a model "
                        "directory or config.json) and exit, loading no data and no weights (built on the meta device)")
    plan_world_size: int = arg(1, "--plan: number of GPUs (FSDP divides parameters, gradients and AdamW state by it; "
                                  "DDP replicates)", low=1)
    plan_gpu_gb: float = arg(80.0, "--plan: memory of one GPU, GB (10^9 bytes)", above=0)
    dump_grads: str = arg("", "testing aid: after every step's backward (gradients reduced across processes, not yet "
                              "clipped) rank 0 writes all full gradients so far to PATH (torch.save: a list, one "
                              "dict per step)", hidden=True)


def _field_comments(cls) -> dict[str, str]:
    """name -> the comment on the line of its field in the class's source (ava.AVAConfig documents each field so)."""
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source at hand (a frozen build): flags without help text
        return {}
    comments = {token.start[0]: token.string.lstrip("# ").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    body = ast.parse(source).body[0].body
    return {node.target.id: comments[node.lineno] for node in body
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.lineno in comments}


def ava_flags(config_cls=None):
    """The AVA flags as a config dataclass built from ava.AVAConfig: --preset, --ablate and one flag per field (help
    from the field's comment, choices from its Literal type, bounds from RANGES). Every field flag defaults to None,
    "as the preset says", so that any flag the user gives overrides the preset, even one equal to the default."""
    import dataclasses
    import typing

    import ava

    config_cls = config_cls or ava.AVAConfig
    hints, comments = typing.get_type_hints(config_cls), _field_comments(config_cls)
    preset_problem = lambda value: None if value in ava.PRESETS else f"unknown preset; choose from {list(ava.PRESETS)}"
    fields = [("preset", str, arg("paper", "a named AVAConfig (ava.PRESETS): 'paper' (the faithful objective) or one "
                                           "of our variants; any AVA flag given overrides it", check=preset_problem)),
              ("ablate", str, arg("", "comma-separated Table 1 ablations, e.g. 'w/o rwt,w/o neg' (from ava.ABLATIONS)",
                                  check=lambda value: _ablation_problem(value)))]
    for f in dataclasses.fields(config_cls):
        hint = hints[f.name]
        literal = typing.get_origin(hint) is typing.Literal
        kind = str if literal else hint
        bounds = config_cls.RANGES.get(f.name)
        help_text = f"{comments.get(f.name, '')} ({bounds + '; ' if bounds else ''}paper: {f.default})"
        fields.append((f.name, kind | None, arg(None, help_text, choices=typing.get_args(hint) if literal else None,
                                                kind=kind, why=comments.get(f.name, ""),
                                                check=lambda value, name=f.name: None if value is None
                                                else config_cls.field_problem(name, value))))

    def ava_config(self):
        """The AVAConfig of these flags: the preset, then every flag given, then the ablations."""
        problem = _ablation_problem(self.ablate)
        if problem:
            raise SystemExit(f"--ablate: {problem}")
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(config_cls)
                 if getattr(self, f.name) is not None}
        return ava.ablate(config_cls(**{**ava.PRESETS[self.preset], **given}), *_ablations(self.ablate))

    return dataclasses.make_dataclass("AVAFlags", fields, namespace={
        "ava_config": ava_config, "__doc__": "AVA hyper-parameters and variants (ava.AVAConfig, whose docstring says "
                                             "what each is and why)"})


AVAFlags = ava_flags()


def _ablations(ablate: str) -> list[str]:
    """'w/o rwt, neg' -> ['w/o rwt', 'w/o neg']."""
    return [a.strip() if a.strip().startswith("w/o") else f"w/o {a.strip()}" for a in ablate.split(",") if a.strip()]


def _ablation_problem(ablate: str) -> str | None:
    import ava

    unknown = [a for a in _ablations(ablate) if a not in ava.ABLATIONS]
    return f"unknown {unknown}; choose from {list(ava.ABLATIONS)}" if unknown else None


@dataclass
class LoRAFlags:
    """LoRA through peft (train_direct.py; train_ppo.py)"""
    lora_r: int = arg(0, "LoRA rank: train low-rank adapters instead of the LM's weights (0: off); the adapters go on "
                         "the top --trainable-layers decoder layers (-1: all); reward and Q heads train in full", low=0)
    lora_alpha: float = arg(16.0, "LoRA scaling numerator (the update is alpha / r * B A)", above=0)
    lora_dropout: float = arg(0.0, "dropout on the LoRA branch's input", low=0, below=1)
    lora_target_modules: str = arg("all-linear", "comma-separated names of the linear layers to adapt (e.g. "
                                                 "'q_proj,v_proj'), or 'all-linear' (every linear layer but the LM "
                                                 "head)",
                                   check=lambda value: None if value.strip(",\n ") else
                                   "empty: name the layers, or 'all-linear'")
