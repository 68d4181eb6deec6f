"""AVA: Approximated Variational Alignment (Cai, Yuan, Shi, Lin), in one file.

LLM alignment as Bayesian inverse RL. A sequence y = (y_1 .. y_T) is a trajectory: state y_{1:t},
action y_{t+1}. A Transformer with a Q-value head and a Gaussian reward head (TQR, Eq. 8-10) is
trained so that (i) the Boltzmann policy of its Q-values explains the demonstrations, (ii) the reward
posterior q_phi(R | y_{1:t+1}) = N(mu_t, sigma_t) stays close to an N(0, 1) prior, and (iii) the TD
error of Q is likely under that posterior, which ties reward and policy together (AVRIL). Per valid
transition t, maximised:

    AVA-d (Eq. 13):  beta * Q(y_{1:t}, y_{t+1})  -  KL(N(mu_t, sigma_t) || N(0, 1))
                     + lambda * log N(delta_t; mu_t, sigma_t),
                     delta_t = Q(y_{1:t}, y_{t+1}) - gamma * Q(y_{1:t+1}, y_{t+2})      (Eq. 14)
    AVA-p (Eq. 17):  the same on the chosen y+, minus the likelihood term on the rejected y-,
    CER   (Eq. 18):  + sigmoid(E[R | y+] - E[R | y-]),  E[R | y] = mu at the last valid position.

Q is either the pretrained LM head mapped by Eq. 12, Q = log softmax(alpha * softmax(logits)), or a
fresh linear head; head outputs are multiplied by preference-attention reward weights (Eq. 11).

Reading of the paper (SPEC.md), and deviations from it, each with its reason:
 1. Alignment: Q of transition t is read at position t; its reward at position t+1 (the reward must
    have seen the action, and a causal decoder's state at t has not).
 2. Terms are averaged over valid transitions, not summed (Eq. 5/17 sum): the loss scale then does
    not depend on sequence length or batch size.
 3. Eq. 5 sums t = 1 .. |y|-2. We keep the last transition in the likelihood and KL terms (its action
    is usually EOS, and its mu is what CER and scoring read); only the TD error, needing y_{t+2}, drops it.
 4. Reward weights (Eq. 11) are computed over the positions some term reads (the response and the last
    prompt token), so a long prompt does not dilute them, and rescaled to mean one: the literal 1/|y|
    form sums to one and shrinks every Q, mu and sigma by ~T (`reward_weighting="literal"` keeps it).
 5. sigma = w * softplus(s) + sigma_min (sigma must stay > 0 after weighting).
 6. With a pretrained Q head the likelihood term is Eq. 13's literal beta * Q; with a fresh head it is
    the Boltzmann log-likelihood log softmax(beta * Q)[a] of Eq. 3 (a raw Q is not a log-probability).
 7. KL and TD terms are applied to both chosen and rejected sequences (every sequence is a
    demonstration the reward must explain); `kl_td_on="chosen"` restricts them.
 8. Optional variants: the unlikelihood negative term log(1 - p) of the bound (Eq. 16) instead of
    Eq. 17's -log p, and log-sigmoid CER (the literal sigmoid has vanishing gradients when wrong).
 9. Initialisation (the paper is silent): the reward head starts at the prior (sigma = 1) and the
    Eq. 11 projections near zero, so w_t starts at 1 (PreferenceAttention says why).

Our extensions (AVAConfig switches, off by default). With Eq. 12 and gamma = 1, delta_t follows the
LM alone (alpha * (pi_t - pi_{t+1}) + O(1/V)), sum_t delta_t telescopes to Q_first - Q_last, and CER
reads only the last mu, which TD never reaches (SPEC.md, last section): the preference reaches an
intermediate mu_t only through pi. `cer_reading` puts CER (and the score) on the weighted return of
Eq. 19; `centred_q` / `td_terminal` remove Eq. 12's -log V offset from delta_t and add a TD step into a
terminal state of value 0; `prior_sigma` scales the prior to delta's spread; `weights_on="mu"` keeps
Eq. 11's weights off Q (a side channel); `q_map="logits"` is a w/o ptq control (same head, no map);
`kl_weight` weighs the KL term on its own (0 ablates it; `lam` does the same for the TD term). PRESETS
names the variants we measured (docs/train_rm.md says what each showed).

Layout: config; masks, hidden states; Eq. 11; Eq. 3/12; TQR (Eq. 8-10); terms (Eq. 6, 13, 14); AVA-d,
AVA-p, CER (Eq. 13, 17, 18); Eq. 19; baselines; the exact speed-ups.
Shapes: B batch, T sequence length, V vocabulary, d hidden size, N valid transitions in a batch.
Only torch and einops; nothing here reads files or parses arguments.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, replace
from functools import partial
from typing import ClassVar, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import einsum
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class AVAConfig:
    """Hyper-parameters and switches of one AVA objective. alpha has no precedent in the paper's text
    (chosen on dev); AVRIL's code uses beta = gamma = lambda = 1. Fields after `vocab_chunk` are our
    extensions (module docstring), off by default. Each field's comment is its --help in the scripts,
    its Literal type its choices, RANGES its bounds (the scripts build their flags from them)."""
    alpha: float = 1.0          # Eq. 12 temperature mapping probabilities to Q-values; at 0 every Q-value is equal
    beta: float = 1.0           # weight of the likelihood term (Eq. 13) / Boltzmann temperature (Eq. 3)
    gamma: float = 1.0          # discount in the TD error (Eq. 14); AVRIL uses 1
    lam: float = 1.0            # lambda, weight of the TD log-density term (Eq. 13)
    cer_weight: float = 1.0     # weight of F_c (Eq. 18); Algorithm 1 adds F_p + F_c with weight 1
    reward_weighting: Literal["mean-one", "literal", "off"] = "mean-one"  # Eq. 11 weights ("off" = w/o rwt)
    pretrained_q: bool = True   # Q from the pretrained LM head via Eq. 12 (False = w/o ptq: a fresh Linear(d, V))
    negative: Literal["literal", "unlikelihood", "off"] = "literal"  # rejected term: Eq. 17, Eq. 16's bound, or w/o neg
    irl: bool = True            # the KL and TD terms (False = w/o irl: contrastive SFT + CER)
    cer: Literal["sigmoid", "logsigmoid", "off"] = "sigmoid"  # CER form: Eq. 18, its log, or w/o cer
    kl_td_on: Literal["both", "chosen"] = "both"  # which sequences of a pair get the KL and TD terms
    sigma_min: float = 1e-4     # floor on sigma
    vocab_chunk: int = 512      # transitions per chunk of the full-vocabulary computation
    # -- our extensions (not in the paper) --
    cer_reading: Literal["last", "return-sum", "return-mean"] = "last"  # E[R|y]: last mu (paper), sum/mean of w_t mu_t
    centred_q: bool = False     # TD on Q + w log V: removes Eq. 12's -log V offset from delta_t
    td_terminal: bool = False   # one more TD step, from the last transition into a terminal state of value 0
    prior_sigma: float = 1.0    # the reward prior N(0, prior_sigma^2) (paper: N(0, 1))
    weights_on: Literal["all", "mu"] = "all"  # Eq. 11 weights multiply every head (paper) or the reward head only
    q_map: Literal["eq12", "logits"] = "eq12"  # pretrained Q: Eq. 12, or the LM head's logits (a w/o ptq control)
    kl_weight: float = 1.0      # weight of the KL term (Eq. 6 in Eq. 13; paper: 1); 0 ablates the KL alone

    RANGES: ClassVar[dict] = {"alpha": "> 0", "beta": "> 0", "gamma": "[0, 1]", "lam": ">= 0", "cer_weight": ">= 0",
                              "sigma_min": "> 0", "vocab_chunk": ">= 1", "prior_sigma": "> 0", "kl_weight": ">= 0"}

    @property
    def eq12(self) -> bool:
        """Q is Eq. 12's map of the pretrained LM head (not a fresh head, not our raw-logits control)."""
        return self.pretrained_q and self.q_map == "eq12"

    @classmethod
    def field_problem(cls, name: str, value) -> str | None:
        """What is wrong with `value` for field `name` ("must be one of ...", "must be > 0"), or None."""
        hint = typing.get_type_hints(cls)[name]
        if typing.get_origin(hint) is Literal and value not in typing.get_args(hint):
            return f"must be one of {typing.get_args(hint)}, got {value!r}"
        rule = cls.RANGES.get(name)
        if rule and not (isinstance(value, (int, float)) and math.isfinite(value) and _within(value, rule)):
            return f"must be a finite number {'in ' if rule[0] == '[' else ''}{rule}, got {value}"
        return None

    def __post_init__(self):
        problems = [f"{f.name}: {p}" for f in dataclasses.fields(self)
                    if (p := self.field_problem(f.name, getattr(self, f.name)))]
        if problems:
            raise ValueError("AVAConfig: " + "; ".join(problems))


def _within(value: float, rule: str) -> bool:
    """value against '> 0', '>= 1' or '[0, 1]'."""
    if rule.startswith("["):
        low, high = (float(x) for x in rule.strip("[]").split(","))
        return low <= value <= high
    operator, bound = rule.split()
    return value > float(bound) if operator == ">" else value >= float(bound)


ABLATIONS = {  # the Table 1 ablations: each a switch of the one objective, never a copy of it
    "w/o rwt": dict(reward_weighting="off"),
    "w/o neg": dict(negative="off"),
    "w/o irl": dict(irl=False),
    "w/o cer": dict(cer="off"),
    "w/o ptq": dict(pretrained_q=False),
    # ours: the paper's w/o neg (AVA-d on y+ plus CER); a w/o ptq control keeping the head, not Eq. 12
    "w/o neg (AVA-d + CER)": dict(negative="off", kl_td_on="chosen"),
    "w/o eq12": dict(q_map="logits"),
}

# Named AVAConfigs (--preset): "paper" is the faithful objective; the others are our variants (docs/train_rm.md,
# "Presets", says what each changes, why, and what it measured on task v2).
_MU_WEIGHTS = dict(weights_on="mu", centred_q=True, td_terminal=True, cer_reading="return-sum")
PRESETS = {
    "paper": {},
    "return-cer": dict(cer_reading="return-sum"),
    "centred-td": dict(centred_q=True, td_terminal=True),
    "centred-td-return": dict(centred_q=True, td_terminal=True, cer_reading="return-sum"),
    "centred-td-discounted": dict(centred_q=True, td_terminal=True, gamma=0.9),
    "mu-weights": _MU_WEIGHTS,
    # a measured negative result: the floor does not stop the collapse
    "mu-weights-floor": {**_MU_WEIGHTS, "sigma_min": 0.1},
    "mu-weights-half-td": {**_MU_WEIGHTS, "lam": 0.5},  # recommended for token rewards
}


def preset(name: str, **changes) -> AVAConfig:
    """`preset("mu-weights-half-td", lam=1.0)` -> that named AVAConfig with `changes` on top."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: expected one of {list(PRESETS)}")
    return AVAConfig(**{**PRESETS[name], **changes})


def ablate(config: AVAConfig, *names: str) -> AVAConfig:
    """`ablate(AVAConfig(), "w/o rwt")` -> the config of that Table 1 row."""
    for name in names:
        if name not in ABLATIONS:
            raise ValueError(f"unknown ablation {name!r}: expected one of {list(ABLATIONS)}")
        config = replace(config, **ABLATIONS[name])
    return config


# ----------------------------------------------------------------------------------------------
# Masks and shared plumbing

def check_masks(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor) -> None:
    """Validate a right-padded batch. response_mask marks the tokens whose transitions are trained
    (the response); it must sit inside attention_mask, and position 0 has no state before it."""
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape or input_ids.shape != response_mask.shape:
        raise ValueError(f"input_ids, attention_mask, response_mask must share one (B, T) shape; got "
                         f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(response_mask.shape)}")
    attention, response = attention_mask.bool(), response_mask.bool()
    if (response & ~attention).any():
        raise ValueError("response_mask marks padding positions (outside attention_mask)")
    if response[:, 0].any():
        raise ValueError("response_mask[:, 0] is set: the first token has no state before it; "
                         "put BOS or the prompt first")
    if (attention[:, 1:] & ~attention[:, :-1]).any():
        raise ValueError("attention_mask is not right-padded (a valid token follows padding)")
    empty = (~response.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} have no response token: nothing to train or score there")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid entries. An empty mask gives 0 (documented zero, never NaN)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool -> (B,) index of the last True in each row."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask.bool(), positions, -1).amax(dim=1)



def hidden_states(lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  response_mask: torch.Tensor | None = None, *, share_prompts: bool = True,
                  inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Last hidden states (B, T, d) of any Hugging Face causal LM, after its final norm, without the
    (B, T, V) logits; `inputs_embeds` (B, T, d) may enter the decoder stack in place of the ids. With
    response_mask and share_prompts, rows with the same prompt tokens (chosen and rejected, N samples)
    share one pass over the prompt (last section); it needs the KV cache (off under checkpointing)."""
    if response_mask is not None and share_prompts and _right_padded(attention_mask):
        groups = prompt_groups(input_ids, response_mask)
        if any(len(rows) > 1 for rows, _ in groups):
            return _shared_prompt_hidden_states(lm, input_ids, attention_mask, groups, inputs_embeds)
    inputs = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    return lm.base_model(**inputs, attention_mask=attention_mask, use_cache=False).last_hidden_state


class LMWithHeads(nn.Module):
    """TQR's and the baselines' shared base: a causal LM `lm` whose last hidden states feed heads.

    share_prompts: rows with the same prompt share one pass over it (`hidden_states`); build with False
    where the KV cache is unavailable (activation checkpointing recomputes layers without it).
    trunk: what computes those states, if not `hidden_states(lm, ...)`: any callable
    `trunk(input_ids, attention_mask, response_mask, share_prompts=...) -> (B, T, d)` that gives the same
    states, e.g. one that reads the frozen bottom layers' outputs from a cache and runs only the top
    layers of `lm`. It is held, not registered as a submodule: it runs `lm`'s own layers, whose
    parameters are `lm`'s (in the state dict once, under "lm.")."""

    def __init__(self, lm: nn.Module, *, trunk=None, share_prompts: bool = True):
        super().__init__()
        self.lm, self.share_prompts = lm, share_prompts
        self.__dict__["trunk"] = trunk  # not a submodule (see above), whatever its type

    def features(self, input_ids, attention_mask, response_mask) -> torch.Tensor:
        """The last hidden states (B, T, d) the heads read."""
        compute = self.trunk or partial(hidden_states, self.lm)
        return compute(input_ids, attention_mask, response_mask, share_prompts=self.share_prompts)


# ----------------------------------------------------------------------------------------------
# Reward weighting (Eq. 11)

def preference_weights(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor,
                       literal: bool = False) -> torch.Tensor:
    """Eq. 11: w_t = 1/|y| * sum_i softmax_{t'}(q_i . k_{t'} / sqrt(d_k))_t over the valid positions.

    query, key: (B, T, d_k); mask: (B, T) bool. Returns (B, T), zero off the mask. Literal weights sum
    to 1 per row; by default they are rescaled to mean 1 over the valid positions (deviation 4)."""
    scores = einsum(query.float(), key.float(), "b i k, b j k -> b i j") / math.sqrt(query.shape[-1])  # (B, T, T)
    scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    attention = scores.softmax(dim=-1).nan_to_num(0.0) * mask[:, :, None]  # rows of invalid queries dropped
    weights = attention.sum(dim=1)  # (B, T): sum over queries i; mean over valid positions is 1
    if literal:
        weights = weights / mask.sum(dim=1, keepdim=True).clamp(min=1)
    return weights


class PreferenceAttention(nn.Module):
    """Query and key projections of the last hidden states for Eq. 11 (Preference Transformer style:
    not causal, padding masked)."""

    def __init__(self, hidden_size: int, key_size: int | None = None):
        super().__init__()
        key_size = key_size or hidden_size
        self.query = nn.Linear(hidden_size, key_size, bias=False)
        self.key = nn.Linear(hidden_size, key_size, bias=False)
        # Tiny init (deviation 9): w_t starts at 1. Eq. 12's Q carries an offset of ~ -log V, so unequal w_t
        # alone make |delta_t| large: with std 0.02 on SmolLM2, |delta_t| reached 17 and td_logp -700 at step 0.
        nn.init.normal_(self.query.weight, std=1e-3)
        nn.init.normal_(self.key.weight, std=1e-3)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, literal: bool = False) -> torch.Tensor:
        return preference_weights(self.query(hidden), self.key(hidden), mask, literal)


# ----------------------------------------------------------------------------------------------
# Q-values (Eq. 3, Eq. 12), computed in chunks so only one (chunk, V) block is alive at a time

def pretrained_q(logits: torch.Tensor, actions: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 12: Q_w(y_{1:t}, a) = log softmax(alpha * pi_w(. | y_{1:t}))[a], pi_w = softmax(logits):
    a softmax over probabilities, so Q is bounded in [-log V - alpha, 0]. logits (N, V), actions (N,).
    Computed in float32 at least; its backward pass is written out by hand in `_PretrainedQ` (last
    section: the same gradient as autograd's, with fewer (N, V) tensors)."""
    return _PretrainedQ.apply(logits, actions, float(alpha))


def boltzmann_log_likelihood(q_values: torch.Tensor, actions: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """Eq. 3: log B(a | s; Q) = log softmax(beta * Q(s, .))[a]. q_values (N, V), actions (N,)."""
    scaled = beta * q_values.float()
    return scaled.gather(-1, actions[:, None]).squeeze(-1) - scaled.logsumexp(dim=-1)


def _token_terms(hidden, weight, bias, actions, reward_weights, *, alpha, beta, pretrained, with_logp):
    """One chunk: hidden (n, d) -> (n, 3) = [Q(s, a) weighted, log-prob of a under the Q-policy,
    log pi_LM(a | s)]. The (n, V) logits die here; autograd checkpointing recomputes them.
    pretrained=True maps the logits by Eq. 12; False takes them as Q-values (a fresh Q head, or our
    q_map="logits" control); None skips the Q columns (zeros): DPO and SFT need only log pi."""
    logits = F.linear(hidden, weight, bias).float()  # (n, V)
    w = reward_weights.float()
    if pretrained is None:
        q_taken = q_logprob = torch.zeros_like(w)
    elif pretrained:  # Q from the LM head (Eq. 12), weighted by w_t (Eq. 11)
        q_taken = w * pretrained_q(logits, actions, alpha)
        q_logprob = q_taken  # <= 0: a log-probability under softmax(alpha * pi), scaled by w
    else:  # `logits` are Q-values (a fresh Q head, or q_map="logits"); the policy is Boltzmann (Eq. 3)
        q_taken = w * logits.gather(-1, actions[:, None]).squeeze(-1)
        q_logprob = boltzmann_log_likelihood(logits, actions, beta * w[:, None])
    logp = logits.log_softmax(-1).gather(-1, actions[:, None]).squeeze(-1) if with_logp else torch.zeros_like(q_taken)
    return torch.stack([q_taken, q_logprob, logp], dim=-1)


KEPT_VOCAB_BYTES = 2**29  # what the backward pass may keep of the (N, V) tensors before chunks are recomputed instead


def gather_token_terms(hidden, weight, bias, actions, reward_weights, *, alpha=1.0, beta=1.0, pretrained=True,
                       with_logp=False, chunk=512) -> torch.Tensor:
    """The full-vocabulary part of every loss, on N selected transitions only: (N, d) -> (N, 3).

    Chunks of `chunk` transitions, so only one chunk's (chunk, V) logits are alive at a time. Under
    autograd the backward pass needs what each chunk saves (~2 (N, V) fp32 tensors in all, 8 N V bytes):
    up to KEPT_VOCAB_BYTES they are kept, beyond it each chunk is checkpointed and recomputed in the
    backward pass (memory N x d, not N x V, at one more forward of the chunk). Both give the same
    values and gradients (tests/test_gradients.py); keeping is ~a third fewer vocabulary matmuls."""
    fn = partial(_token_terms, alpha=alpha, beta=beta, pretrained=pretrained, with_logp=with_logp)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    recompute = grad and 8 * hidden.shape[0] * weight.shape[0] > KEPT_VOCAB_BYTES
    out = []
    for start in range(0, hidden.shape[0], chunk):
        part = slice(start, start + chunk)
        args = (hidden[part], weight, bias, actions[part], reward_weights[part])
        out.append(checkpoint(fn, *args, use_reentrant=False) if recompute else fn(*args))
    return torch.cat(out) if out else hidden.new_zeros(0, 3, dtype=torch.float32)


def _scatter(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) values at the True positions of a (B, L) mask -> (B, L), zero elsewhere."""
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask, values)


def token_logprobs(lm: nn.Module, input_ids, attention_mask, response_mask, chunk: int = 512,
                   temperature: float = 1.0, share_prompts: bool = True) -> torch.Tensor:
    """log pi(y_{t+1} | y_{1:t}) per response transition, (B, T-1), zero elsewhere (DPO, SFT, PPO).
    `temperature` divides the logits (PPO scores its samples at the temperature it drew them with)."""
    check_masks(input_ids, attention_mask, response_mask)
    hidden = hidden_states(lm, input_ids, attention_mask, response_mask, share_prompts=share_prompts)
    mask = response_mask[:, 1:].bool()  # transition t is trained when its action y_{t+1} is a response token
    head = lm.get_output_embeddings()
    selected = hidden[:, :-1][mask] / temperature  # (N, d); logits / T = (h / T) W^T + b / T
    bias = None if head.bias is None else head.bias / temperature
    terms = gather_token_terms(selected, head.weight, bias, input_ids[:, 1:][mask],
                               selected.new_ones(selected.shape[0]), pretrained=None, with_logp=True, chunk=chunk)
    return _scatter(terms[:, 2], mask)


# ----------------------------------------------------------------------------------------------
# TQR: Transformer with Q-value and Reward heads (Eq. 8-11)

@dataclass
class TQROutput:
    """Everything the losses need, on the transition grid: index t is transition t (state y_{1:t},
    action y_{t+1}). All (B, T-1); off `mask` every field is 0 except sigma, which is 1 (safe to log)."""
    q_taken: torch.Tensor    # Q(y_{1:t}, y_{t+1}), weighted by w_t (read at position t)
    q_logprob: torch.Tensor  # log-prob of y_{t+1} under the Q-policy (Eq. 12 / Eq. 3)
    mu: torch.Tensor         # reward mean of transition t, weighted (read at position t+1; Eq. 9-10)
    sigma: torch.Tensor      # reward standard deviation of transition t, weighted, > 0
    mask: torch.Tensor       # bool: valid response transitions
    weights: torch.Tensor    # (B, T) reward weights w (Eq. 11); ones if weighting is off
    logp: torch.Tensor | None = None  # log pi_LM(y_{t+1} | y_{1:t}) of the LM, if asked for
    reading: str = "last"    # AVAConfig.cer_reading: how sequence_reward reads E[R | y]

    def sequence_reward(self) -> torch.Tensor:
        """E[R | y], (B,), used by CER, accuracy and Best-of-N: mu at the last valid transition (the
        paper), or (our extension, `cer_reading`) the return sum_t w_t mu_t of Eq. 19, or its mean."""
        if self.reading == "last":
            return self.mu.gather(1, last_index(self.mask)[:, None]).squeeze(1)
        total = (self.mu * self.mask).sum(dim=1)
        return total if self.reading == "return-sum" else total / self.mask.sum(dim=1).clamp(min=1)

    def sequence_sigma(self) -> torch.Tensor:  # sigma at the last valid transition, (B,)
        return self.sigma.gather(1, last_index(self.mask)[:, None]).squeeze(1)


class TQR(LMWithHeads):
    """Any Hugging Face causal LM plus a Q-value head, a Gaussian reward head and reward weighting.
    `trunk` and `share_prompts`: how the hidden states are computed (LMWithHeads)."""

    def __init__(self, lm: nn.Module, config: AVAConfig = AVAConfig(), *, trunk=None, share_prompts: bool = True):
        super().__init__(lm, trunk=trunk, share_prompts=share_prompts)
        self.config = config
        lm_head = lm.get_output_embeddings()
        hidden_size, vocab_size = lm_head.in_features, lm_head.out_features
        # Eq. 8: Q head. Default: the pretrained LM head, mapped to Q by Eq. 12 (no new parameters).
        self.q_head = None if config.pretrained_q else nn.Linear(hidden_size, vocab_size)
        # Eq. 9: reward head -> (mu, pre-softplus sigma); starts exactly at the prior N(0, 1).
        self.reward_head = nn.Linear(hidden_size, 2)
        nn.init.zeros_(self.reward_head.weight)
        with torch.no_grad():
            self.reward_head.bias.copy_(torch.tensor([0.0, math.log(math.expm1(1.0))]))
        self.weighting = None if config.reward_weighting == "off" else PreferenceAttention(hidden_size)

    def forward(self, input_ids, attention_mask, response_mask, with_logp: bool = False) -> TQROutput:
        cfg = self.config
        check_masks(input_ids, attention_mask, response_mask)
        response = response_mask.bool()
        hidden = self.features(input_ids, attention_mask, response)  # (B, T, d)
        mask = response[:, 1:]  # (B, T-1): transition t trained iff its action y_{t+1} is a response token
        # Positions some term reads: Q at t for every trained transition, mu/sigma at t+1 (deviation 4).
        read = response.clone()
        read[:, :-1] |= mask
        if self.weighting is None:
            weights = read.float()
        else:
            weights = self.weighting(hidden, read, literal=cfg.reward_weighting == "literal")  # (B, T)

        raw = self.reward_head(hidden).float()  # (B, T, 2)
        mu = weights * raw[..., 0]  # Eq. 9-11: head outputs times w_t
        sigma = weights * F.softplus(raw[..., 1]) + cfg.sigma_min  # deviation 5

        head = self.q_head or self.lm.get_output_embeddings()
        selected = hidden[:, :-1][mask]  # (N, d): only trained transitions reach the vocabulary
        q_weights = weights if cfg.weights_on == "all" else torch.ones_like(weights)  # ours: "mu" leaves Q unweighted
        eq12 = cfg.eq12  # else Q = logits of a fresh head or (ours) the LM head
        terms = gather_token_terms(selected, head.weight, head.bias, input_ids[:, 1:][mask], q_weights[:, :-1][mask],
                                   alpha=cfg.alpha, beta=cfg.beta, pretrained=eq12,
                                   with_logp=with_logp, chunk=cfg.vocab_chunk)  # (N, 3)
        q_taken = _scatter(terms[:, 0], mask)
        if cfg.centred_q:  # ours: Q + log V (per weighted Q: w_t (Q + log V)), so delta_t loses Eq. 12's offset
            q_taken = q_taken + math.log(head.weight.shape[0]) * q_weights[:, :-1] * mask
        zero = ~mask
        return TQROutput(
            q_taken=q_taken, q_logprob=_scatter(terms[:, 1], mask), reading=cfg.cer_reading,
            mu=mu[:, 1:].masked_fill(zero, 0.0), sigma=sigma[:, 1:].masked_fill(zero, 1.0),
            mask=mask, weights=weights, logp=_scatter(terms[:, 2], mask) if with_logp else None)


# ----------------------------------------------------------------------------------------------
# The terms of the objective, each on its own

def kl_to_standard_normal(mu: torch.Tensor, sigma: torch.Tensor, prior_sigma: float = 1.0) -> torch.Tensor:
    """d_t (Eq. 6): KL(N(mu, sigma) || N(0, 1)) = -log sigma + (sigma^2 + mu^2) / 2 - 1/2. With
    prior_sigma = s (our extension) the prior is N(0, s^2): log(s / sigma) + (sigma^2 + mu^2) / (2 s^2) - 1/2."""
    return math.log(prior_sigma) - sigma.log() + (sigma.square() + mu.square()) / (2 * prior_sigma ** 2) - 0.5


def gaussian_log_density(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """log N(x; mu, sigma): the TD-consistency term log q_phi(delta_t | y_{1:t+1}) of Eq. 13."""
    return -0.5 * ((x - mu) / sigma).square() - sigma.log() - 0.5 * math.log(2 * math.pi)


def td_error(q_taken: torch.Tensor, mask: torch.Tensor, gamma: float,
             terminal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 7 / Eq. 14: delta_t = Q(y_{1:t}, y_{t+1}) - gamma * Q(y_{1:t+1}, y_{t+2}), taken with the
    demonstrated next action. Defined where t and t+1 are both valid; (B, L) -> (delta, td_mask).
    terminal=True (our extension): the last valid transition also gets delta = Q(y_{1:t}, y_{t+1}),
    the step into a terminal state of value 0."""
    delta = F.pad(q_taken[:, :-1] - gamma * q_taken[:, 1:], (0, 1))
    td_mask = F.pad(mask[:, :-1] & mask[:, 1:], (0, 1))
    if terminal:
        last = mask & ~td_mask  # the last valid transition of each row
        delta, td_mask = torch.where(last, q_taken, delta), td_mask | last
    return delta * td_mask, td_mask


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler 2012); x is clamped below 0."""
    x = x.clamp(max=-1e-6)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def likelihood_term(out: TQROutput, config: AVAConfig) -> torch.Tensor:
    """Per-transition likelihood term (B, T-1): Eq. 13's beta * Q with a pretrained Q head, the
    Boltzmann log B of Eq. 5 with a fresh one (beta already inside; deviation 6)."""
    return config.beta * out.q_logprob if config.eq12 else out.q_logprob


def negative_term(out: TQROutput, config: AVAConfig) -> torch.Tensor:
    """What F_p adds for the rejected sequence, per transition: Eq. 17's -loglik, or the unlikelihood
    log(1 - p) of Eq. 16's bound log(1 - p(y- | R)), taken per transition."""
    scale = config.beta if config.eq12 else 1.0
    if config.negative == "unlikelihood":
        return scale * log1mexp(out.q_logprob)
    return -likelihood_term(out, config)


def contrastive_expected_return(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor,
                                form: str = "sigmoid") -> torch.Tensor:
    """F_c (Eq. 18), per pair, maximised: sigmoid(E[R|y+] - E[R|y-]) (or its log)."""
    margin = reward_chosen - reward_rejected
    return F.logsigmoid(margin) if form == "logsigmoid" else torch.sigmoid(margin)


def irl_terms(out: TQROutput, config: AVAConfig) -> dict[str, torch.Tensor]:
    """The reward-side terms of one sequence: mean KL (Eq. 6) and mean TD log-density (Eq. 13)."""
    delta, td_mask = td_error(out.q_taken, out.mask, config.gamma, config.td_terminal)
    return {"kl": masked_mean(kl_to_standard_normal(out.mu, out.sigma, config.prior_sigma), out.mask),
            "td_logp": masked_mean(gaussian_log_density(delta, out.mu, out.sigma), td_mask)}


def ava_d_loss(out: TQROutput, config: AVAConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-F_d (Eq. 5 / Eq. 13), averaged over valid transitions; returns (loss, terms)."""
    zero = out.mu.new_zeros(())
    terms = {"loglik": masked_mean(likelihood_term(out, config), out.mask)}
    if config.irl:  # w/o irl: the likelihood alone
        terms.update(irl_terms(out, config))
    # Eq. 13
    objective = terms["loglik"] - config.kl_weight * terms.get("kl", zero) + config.lam * terms.get("td_logp", zero)
    terms["loss"] = -objective
    return -objective, terms


def ava_p_loss(chosen: TQROutput, rejected: TQROutput,
               config: AVAConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-(F_p + cer_weight * F_c) (Eq. 17 + Eq. 18, Algorithm 1 line 6-7); returns (loss, terms). Each term is
    computed where its switch leaves it on (the ablations of Table 1: w/o neg, w/o irl, w/o cer), then the
    objective is their weighted sum."""
    zero = chosen.mu.new_zeros(())
    reward_chosen, reward_rejected = chosen.sequence_reward(), rejected.sequence_reward()
    terms = {"loglik_chosen": masked_mean(likelihood_term(chosen, config), chosen.mask)}
    if config.negative != "off":
        terms["negative"] = masked_mean(negative_term(rejected, config), rejected.mask)
    if config.irl:
        parts = [irl_terms(out, config) for out in ([chosen, rejected] if config.kl_td_on == "both" else [chosen])]
        terms["kl"], terms["td_logp"] = sum(p["kl"] for p in parts), sum(p["td_logp"] for p in parts)
    if config.cer != "off":
        terms["cer"] = contrastive_expected_return(reward_chosen, reward_rejected, config.cer).mean()
    term = lambda name: terms.get(name, zero)
    objective = (term("loglik_chosen") + term("negative") - config.kl_weight * term("kl") + config.lam * term("td_logp")
                 + config.cer_weight * term("cer"))  # Eq. 17 + Eq. 18
    terms["loss"] = -objective
    terms.update(preference_metrics(reward_chosen, reward_rejected))
    terms["sigma"] = masked_mean(chosen.sigma, chosen.mask).detach()
    return -objective, terms


# ----------------------------------------------------------------------------------------------
# Using the reward

def dense_rewards(out: TQROutput, pessimism: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 19: the reward of every response transition, E[R(y_{1:t+1})] = mu_t, (B, T-1), with sigma.
    pessimism k > 0 gives the uncertainty-penalised reward mu - k * sigma."""
    return (out.mu - pessimism * out.sigma) * out.mask, out.sigma * out.mask


def preference_metrics(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL-style metrics: accuracy (ties count half) and mean margin."""
    margin = (reward_chosen - reward_rejected).detach()
    return {"accuracy": ((margin > 0).float() + 0.5 * (margin == 0).float()).mean(), "margin": margin.mean()}


def take_rows(output, rows):
    """The rows `rows` (a slice or index tensor) of a TQROutput or RewardOutput: chosen and rejected
    run through the model as one batch, then are taken apart."""
    return type(output)(**{f.name: (getattr(output, f.name)[rows] if isinstance(getattr(output, f.name), torch.Tensor)
                                    else getattr(output, f.name)) for f in dataclasses.fields(output)})


# ----------------------------------------------------------------------------------------------
# Baselines: Bradley-Terry, variance-aware Bradley-Terry, Preference Transformer, DPO, SFT

def bradley_terry_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r+ - r-) (Bradley & Terry 1952)."""
    return -F.logsigmoid(reward_chosen - reward_rejected).mean()


def bradley_terry_variance_loss(reward_chosen, reward_rejected, spread_chosen, spread_rejected) -> torch.Tensor:
    """AfD appendix A, Eq. 26: -log sigmoid((r+ - r-) / sqrt((v+^2 + v-^2) / 2))."""
    scale = ((spread_chosen.square() + spread_rejected.square()) / 2).sqrt()
    return -F.logsigmoid((reward_chosen - reward_rejected) / scale).mean()


def preference_transformer_score(rewards: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Preference Transformer (Kim et al. 2023): sum_t w_t r_t with weights summing to one, (B,)."""
    return (weights * rewards).sum(dim=1)


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float = 0.1):
    """DPO (Rafailov et al.): -log sigmoid(beta * [(log pi(y+) - log ref(y+)) - (log pi(y-) - log ref(y-))]).
    Inputs are sequence log-probs (B,); returns (loss, implicit reward of y+, of y-)."""
    reward_chosen = beta * (policy_chosen - reference_chosen)
    reward_rejected = beta * (policy_rejected - reference_rejected)
    return -F.logsigmoid(reward_chosen - reward_rejected).mean(), reward_chosen.detach(), reward_rejected.detach()


def sft_loss(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the response, averaged over its tokens."""
    return -masked_mean(logp, mask)


@dataclass
class RewardOutput:
    score: torch.Tensor             # (B,) sequence reward
    rewards: torch.Tensor           # (B, T-1) per-transition rewards (read at t+1), zero off mask
    mask: torch.Tensor              # (B, T-1) valid response transitions
    spread: torch.Tensor | None = None   # (B,) v of Eq. 26 (bt-var)
    weights: torch.Tensor | None = None  # (B, T-1) Preference Transformer weights
    levels: torch.Tensor | None = None   # (B, T) the head at every position (bt, bt-var): the reward of each prefix


class ScalarRewardModel(LMWithHeads):
    """The baselines' reward models on any causal LM: "bt" (score at the last valid token), "bt-var"
    (plus a variance head, Eq. 26) and "pref-trans" (attention-weighted sum of per-token rewards)."""

    KINDS = ("bt", "bt-var", "pref-trans")

    def __init__(self, lm: nn.Module, kind: str = "bt", *, trunk=None, share_prompts: bool = True):
        if kind not in self.KINDS:
            raise ValueError(f"ScalarRewardModel kind={kind!r}: expected one of {self.KINDS}")
        super().__init__(lm, trunk=trunk, share_prompts=share_prompts)
        self.kind = kind
        hidden_size = lm.get_output_embeddings().in_features
        # No bias: these losses only see reward differences, so a bias would never get a gradient.
        self.reward_head = nn.Linear(hidden_size, 1, bias=False)
        nn.init.normal_(self.reward_head.weight, std=0.02)  # as HF's sequence-classification heads
        self.spread_head = nn.Linear(hidden_size, 1) if kind == "bt-var" else None  # v of Eq. 26
        self.weighting = PreferenceAttention(hidden_size) if kind == "pref-trans" else None

    def forward(self, input_ids, attention_mask, response_mask) -> RewardOutput:
        check_masks(input_ids, attention_mask, response_mask)
        hidden = self.features(input_ids, attention_mask, response_mask)
        mask = response_mask[:, 1:].bool()
        levels = self.reward_head(hidden).float()[..., 0]  # (B, T)
        rewards = levels[:, 1:] * mask  # (B, T-1): transition t read at t+1
        last = last_index(mask)[:, None]
        if self.kind == "pref-trans":
            weights = self.weighting(hidden[:, 1:], mask, literal=True)  # sums to 1 over the response
            return RewardOutput(preference_transformer_score(rewards, weights), rewards, mask, weights=weights)
        spread = None
        if self.spread_head is not None:
            last_hidden = hidden[:, 1:].gather(1, last[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, 1, d)
            spread = F.softplus(self.spread_head(last_hidden).float()[:, 0, 0]) + 1e-4
        return RewardOutput(rewards.gather(1, last).squeeze(1), rewards, mask, spread=spread, levels=levels)

    def loss(self, chosen: RewardOutput, rejected: RewardOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.kind == "bt-var":
            loss = bradley_terry_variance_loss(chosen.score, rejected.score, chosen.spread, rejected.spread)
        else:
            loss = bradley_terry_loss(chosen.score, rejected.score)
        return loss, {"loss": loss, **preference_metrics(chosen.score, rejected.score)}


# ----------------------------------------------------------------------------------------------
# Exact speed-ups: the same functions as above, computed with less time or memory (each checked
# against the plain computation, values and gradients, in tests/test_tqr.py and tests/test_gradients.py)

class _PretrainedQ(torch.autograd.Function):
    """Eq. 12 with its gradient written out, so that a chunk needs no more (N, V) tensors than DPO's
    log-softmax. Autograd through softmax -> scale -> logsumexp keeps pi and alpha * pi and
    allocates several more (N, V) tensors in the backward pass (AVA-p's step peaked ~40% above DPO's,
    bench/memory.py); here only pi is kept, the normaliser is summed 64 rows at a time, and the
    backward pass works in one more buffer. With
    Q_a = alpha pi_a - log sum_v exp(alpha pi_v), rho = softmax(alpha pi) and pi = softmax(z):
        dQ_a / dz_j = alpha pi_j ([j = a] - rho_j - pi_a + <pi, rho>)."""

    @staticmethod
    def forward(ctx, logits, actions, alpha):
        pi = logits.softmax(dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))  # (N, V)
        shift = alpha * pi.amax(dim=-1)  # (N,) logsumexp's stabiliser
        total = torch.empty_like(shift)  # (N,) sum_v exp(alpha pi_v - shift), 64 rows at a time
        for start in range(0, pi.shape[0], 64):
            rows = slice(start, start + 64)
            total[rows] = torch.mul(pi[rows], alpha).sub_(shift[rows, None]).exp_().sum(dim=-1)
        log_z = shift + total.log()  # (N,)
        ctx.save_for_backward(pi, actions, log_z)
        ctx.alpha, ctx.dtype = alpha, logits.dtype
        return alpha * pi.gather(-1, actions[:, None]).squeeze(-1) - log_z

    @staticmethod
    def backward(ctx, grad_q):
        pi, actions, log_z = ctx.saved_tensors
        grad = torch.mul(pi, ctx.alpha).sub_(log_z[:, None]).exp_()  # (N, V) rho = softmax(alpha pi)
        pi_rho = torch.bmm(pi[:, None, :], grad[:, :, None])[:, 0, 0]  # (N,) <pi, rho>, no (N, V) temporary
        pi_a = pi.gather(-1, actions[:, None]).squeeze(-1)
        grad.neg_().sub_((pi_a - pi_rho)[:, None]).scatter_add_(-1, actions[:, None], torch.ones_like(pi_a)[:, None])
        grad.mul_(pi).mul_((ctx.alpha * grad_q)[:, None])
        return grad.to(ctx.dtype), None, None


def _right_padded(attention_mask: torch.Tensor) -> bool:
    """Every row is its tokens, then padding (right-padded, as the scripts build their batches)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return bool((attention_mask.bool() == (positions < attention_mask.sum(dim=1, keepdim=True))).all())


def prompt_groups(input_ids: torch.Tensor, response_mask: torch.Tensor) -> list[tuple[list[int], int]]:
    """[(rows, prompt length)]: rows whose tokens before their first response token are identical.
    The prompt is everything before the first response token (at least one token must precede it)."""
    starts = response_mask.int().argmax(dim=1).tolist()  # (B,) first response position
    groups: dict[tuple, list[int]] = {}
    for row, start in enumerate(starts):
        key = (start, tuple(input_ids[row, :start].tolist())) if start > 0 else ("alone", row)
        groups.setdefault(key, []).append(row)
    return [(rows, key[0] if key[0] != "alone" else 0) for key, rows in groups.items()]


def _shared_prompt_hidden_states(lm, input_ids, attention_mask, groups, embeds=None) -> torch.Tensor:
    """hidden_states with one pass per distinct prompt: prompt (1, P) with a KV cache, then the group's
    k responses (k, R) attending to the cache repeated k times. Rows are right-padded as given;
    positions past a row's length hold zeros (the plain batch holds states of padding there).
    With `embeds`, slices of them enter the decoder stack instead of the token ids."""
    base = lm.base_model
    source, name = (input_ids, "input_ids") if embeds is None else (embeds, "inputs_embeds")
    lengths = attention_mask.sum(dim=1).tolist()
    batch, width = input_ids.shape
    pieces: list[torch.Tensor | None] = [None] * batch
    for rows, prompt_length in groups:
        if prompt_length == 0:  # no prompt to share: the row on its own, unpadded
            row = rows[0]
            pieces[row] = base(**{name: source[row:row + 1, :lengths[row]]}, use_cache=False).last_hidden_state[0]
            continue
        prompt = base(**{name: source[rows[0]:rows[0] + 1, :prompt_length]}, use_cache=True)
        cache = prompt.past_key_values
        cache.batch_repeat_interleave(len(rows))  # (1, heads, P, d_h) -> (k, heads, P, d_h)
        end = max(lengths[r] for r in rows)
        mask = attention_mask[rows, :end]  # (k, P + R): the prompt, then each response's own length
        positions = torch.arange(prompt_length, end, device=input_ids.device).expand(len(rows), -1)
        responses = base(**{name: source[rows, prompt_length:end]}, attention_mask=mask, position_ids=positions,
                         past_key_values=cache, use_cache=True).last_hidden_state  # (k, R, d)
        for i, row in enumerate(rows):
            pieces[row] = torch.cat([prompt.last_hidden_state[0], responses[i, :lengths[row] - prompt_length]])
    hidden = nn.utils.rnn.pad_sequence(pieces, batch_first=True)  # (B, <=T, d)
    return F.pad(hidden, (0, 0, 0, width - hidden.shape[1]))  # (B, T, d)
