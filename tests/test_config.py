"""AVA's configuration lives in ava.py alone: the flags are built from ava.AVAConfig, the presets are ava.PRESETS,
and a flag the user gives overrides the preset even when it equals the paper's default."""
import dataclasses
from typing import Literal

import pytest
import torch

import ava
import train_direct
import train_rm
from avalib import cli
from conftest import random_batch, randomize_heads, tiny_lm


def config_of(argv, script=train_rm):
    return cli.parse_config(script.Args, argv).ava_config()


def test_a_flag_overrides_the_preset_even_at_its_default():
    assert config_of(["--preset", "mu-weights-half-td"]).lam == 0.5
    assert config_of(["--preset", "mu-weights-half-td", "--lam", "1"]).lam == 1.0  # 1.0 is the paper's default
    assert config_of(["--preset", "mu-weights", "--no-centred-q"]).centred_q is False
    assert config_of(["--preset", "mu-weights", "--centred-q"]).centred_q is True
    assert config_of(["--preset", "mu-weights", "--cer-reading", "last"]).cer_reading == "last"
    assert config_of([]) == ava.AVAConfig() == ava.preset("paper")
    assert config_of(["--preset", "mu-weights-half-td"], train_direct) == ava.preset("mu-weights-half-td")
    assert config_of(["--preset", "mu-weights", "--ablate", "w/o irl"]) == ava.preset("mu-weights", irl=False)


def test_every_config_field_is_a_flag_with_its_comment_choices_and_bounds(capsys):
    flags = {f.name for f in dataclasses.fields(cli.AVAFlags)}
    assert {f.name for f in dataclasses.fields(ava.AVAConfig)} | {"preset", "ablate"} == flags
    with pytest.raises(SystemExit):
        cli.parse_config(train_rm.Args, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--weights-on {all,mu} Eq. 11 weights multiply every head (paper) or the reward head only (paper: all)" in text
    assert "--gamma GAMMA discount in the TD error (Eq. 14); AVRIL uses 1 ([0, 1]; paper: 1.0)" in text
    assert "(default: None)" not in text
    with pytest.raises(SystemExit):
        cli.parse_config(train_rm.Args, ["--kl-weight", "-1"])
    assert "--kl-weight: must be a finite number >= 0, got -1.0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="alpha: must be a finite number > 0"):
        ava.AVAConfig(alpha=0.0)
    with pytest.raises(ValueError, match="weights_on: must be one of"):
        ava.AVAConfig(weights_on="q")


def test_a_variant_is_added_by_editing_ava_py_alone(monkeypatch):
    """A new preset is a line in ava.PRESETS; a new switch is a field of AVAConfig: both reach every script's flags."""
    monkeypatch.setitem(ava.PRESETS, "my-variant", {"lam": 0.3, "weights_on": "mu"})
    assert config_of(["--preset", "my-variant"]) == ava.AVAConfig(lam=0.3, weights_on="mu")

    @dataclasses.dataclass(frozen=True)
    class WithASwitch(ava.AVAConfig):
        my_switch: Literal["off", "on"] = "off"  # a switch of our own

    flags = cli.ava_flags(WithASwitch)
    parsed = cli.parse_config(flags, ["--my-switch", "on", "--preset", "my-variant"])
    assert parsed.ava_config() == WithASwitch(lam=0.3, weights_on="mu", my_switch="on")
    field = next(f for f in dataclasses.fields(flags) if f.name == "my_switch")
    assert field.metadata["help"] == "a switch of our own (paper: off)" and field.metadata["choices"] == ("off", "on")


def test_kl_weight_scales_the_kl_term_alone_values_and_gradients():
    torch.manual_seed(0)
    model = randomize_heads(ava.TQR(tiny_lm(), ava.AVAConfig()))
    ids, attention, response = random_batch(batch_size=4)

    def loss_and_grads(config):
        model.config = config
        model.zero_grad()
        out = model(ids, attention, response)
        loss, terms = ava.ava_p_loss(ava.take_rows(out, slice(0, 2)), ava.take_rows(out, slice(2, 4)), config)
        loss.backward()
        return loss.detach(), terms, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full, terms, grads_full = loss_and_grads(ava.AVAConfig())
    none, _, grads_none = loss_and_grads(ava.AVAConfig(kl_weight=0.0))
    half, _, _ = loss_and_grads(ava.AVAConfig(kl_weight=0.5))
    assert none - full == pytest.approx(-terms["kl"].item(), rel=1e-5)  # loss = -objective, objective = ... - kl
    assert half - full == pytest.approx(-0.5 * terms["kl"].item(), rel=1e-5)
    model.config = ava.AVAConfig()
    model.zero_grad()
    out = model(ids, attention, response)
    kl = sum(ava.irl_terms(ava.take_rows(out, rows), ava.AVAConfig())["kl"] for rows in (slice(0, 2), slice(2, 4)))
    kl.backward()
    grads_kl = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads_kl["reward_head.weight"].abs().sum() > 0
    for name in grads_full:  # loss = -objective: d(loss without KL) = d(loss) - d(KL)
        assert torch.allclose(grads_none[name], grads_full[name] - grads_kl.get(name, 0), atol=1e-6), name
