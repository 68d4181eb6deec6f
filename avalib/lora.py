"""LoRA through peft: adapters on the top --trainable-layers decoder blocks, merged before export.

weighting, or a fresh Q head) are created after and train in full. Merged into the weights for export.

"""
from __future__ import annotations

from pathlib import Path

import torch


def apply_lora(lm, args) -> int:
    """Inject LoRA adapters into `lm` in place (peft) when args.lora_r > 0 and freeze everything but
    them. Returns the number of adapter parameters (0: LoRA off, nothing changed)."""
    if not getattr(args, "lora_r", 0):
        return 0
    from peft import LoraConfig, inject_adapter_in_model

    n = lm.config.num_hidden_layers
    k = getattr(args, "trainable_layers", -1)
    if k == 0:
        raise SystemExit("--lora-r with --trainable-layers 0: no decoder layer to adapt")
    targets = args.lora_target_modules
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, bias="none",
                        target_modules=(targets if targets == "all-linear"
                                        else [t.strip() for t in targets.split(",") if t.strip()]),
                        layers_to_transform=None if k < 0 or k >= n else list(range(n - k, n)))
    inject_adapter_in_model(config, lm)
    lm.peft_config = {"default": config}  # what merge_lora saves as adapter_config.json
    count = 0
    for name, p in lm.named_parameters():
        p.requires_grad_("lora_" in name)
        count += p.numel() if "lora_" in name else 0
    if count == 0:
        raise SystemExit(f"--lora-target-modules {targets!r}: no such linear layer in {type(lm).__name__}")
    return count


def merge_lora(lm, adapter_dir: str | Path | None = None) -> int:
    """Fold the LoRA updates into the weights and put the plain layers back (the exported model is an
    ordinary causal LM); with `adapter_dir`, first save the adapter alone (peft's format). Returns the
    number of merged layers (0: no LoRA)."""
    from peft.tuners.lora import LoraLayer

    adapted = [(name, module) for name, module in lm.named_modules() if isinstance(module, LoraLayer)]
    if not adapted:
        return 0
    if adapter_dir is not None:
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        adapter_dir = Path(adapter_dir)
        adapter_dir.mkdir(parents=True, exist_ok=True)
        state = get_peft_model_state_dict(lm, adapter_name="default")
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
                  str(adapter_dir / "adapter_model.safetensors"))
        lm.peft_config["default"].save_pretrained(str(adapter_dir))
    with torch.no_grad():
        for name, module in adapted:
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(lm.get_submodule(parent_name) if parent_name else lm, child, module.get_base_layer())
    del lm.peft_config
    return len(adapted)
