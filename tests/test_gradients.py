"""Gradient parity: the full AVA-p and AVA-d losses, and the gradient of every trainable parameter
(the LM's layers, the reward head, the weighting's query and key, the fresh Q head), against plain
autograd through a slow reference built from the model's raw pieces and the equations:

- hidden states and logits from the LM's own full forward pass over the padded batch (no prompt
  sharing, no KV cache, no chunking, no checkpointing);
- Eq. 12 as log_softmax(alpha * softmax(logits)) (no hand-written backward);
- Eq. 11 with loops over the read positions;
- per-transition loops over t for the likelihood, KL (torch.distributions) and TD (Eq. 14) terms;
- CER at the last valid mu.

tests/test_reference.py compares forward values only, so a term cut out of the graph (a stray
.detach()) passes it; here it does not, and `test_the_gradient_check_catches_a_detached_term` shows
that it cannot. The model is built in float64 and the reference runs in float64; ava computes its
heads in float32, which sets the tolerances. Nothing of ava's is called in the reference.

To run this file against a mutated copy of ava.py in DIR, import it before pytest starts:
`python -c "import sys; sys.path.insert(0, 'DIR'); import ava, pytest; sys.exit(pytest.main(['tests/test_gradients.py']))"`;
a plain PYTHONPATH=DIR is shadowed by conftest.py, which puts the repository root first on sys.path."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

import ava
from conftest import random_batch, randomize_heads, tiny_lm

# ava's heads and losses run in float32 (`.float()` on the float64 model's hidden states), so the
# parity is float32's. Measured on these models and batches: the largest gradient error is ~2e-6 of
# the parameter's largest gradient entry, the loss's ~1e-6 relative (the margin here is ~10x); a
# detached term moves some parameter's gradient by 0.4 .. 1 of its largest entry.
LOSS_TOLERANCE = dict(rtol=1e-5, atol=1e-6)
GRAD_RTOL, GRAD_ATOL_SCALE = 1e-4, 1e-5  # atol: this fraction of the parameter's largest |reference grad|


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Every tensor here is tiny (scalars in the reference's loops): a second intra-op thread only adds
    contention. Measured on a loaded 2-core machine: 58 s for this file with 2 threads, 4 s with 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(config, seed=0):
    """Tiny random Llama in TQR, every head randomised (TQR's reward head starts at exactly the prior),
    in float64."""
    model = randomize_heads(ava.TQR(tiny_lm("llama", seed=seed), config), seed=seed).double()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a non-zero mu bias and a sigma bias off softplus^-1(1): nothing at a symmetric point
        model.reward_head.bias.add_(torch.randn(2, generator=generator, dtype=torch.float64) * 0.3)
    return model


def pair_batch(seed=0):
    """Three pairs as one batch (chosen rows 0-2, then rejected rows 3-5, as train_rm.py stacks them),
    each pair sharing its prompt, so ava runs every prompt once (prompt sharing). Right-padded, lengths
    differ; one rejected response has a single token (no TD transition there)."""
    prompt_lengths = [1, 4, 3]
    input_ids, attention_mask, response_mask = random_batch(
        6, 12, seed=seed, prompt_lengths=prompt_lengths * 2, lengths=[12, 9, 7, 11, 5, 12])
    for pair, p in enumerate(prompt_lengths):
        input_ids[3 + pair, :p] = input_ids[pair, :p]
    return input_ids, attention_mask, response_mask


def demonstration_batch(seed=3):
    """AVA-d: four demonstrations, rows 0 and 2 two samples of one prompt (prompt sharing again)."""
    input_ids, attention_mask, response_mask = random_batch(4, 10, seed=seed, prompt_lengths=[2, 1, 2, 4],
                                                            lengths=[10, 6, 8, 9])
    input_ids[2, :2] = input_ids[0, :2]
    return input_ids, attention_mask, response_mask


# ----------------------------------------------------------------------------------------------
# The slow reference, from the equations

def read_positions(response):
    """Positions whose head outputs some term reads (ava.py deviation 4): Q at t when action t+1 is a
    response token, mu and sigma at t+1."""
    T = len(response)
    return [p for p in range(T) if response[p] or (p + 1 < T and response[p + 1])]


def reference_weights(model, config, hidden, positions):
    """Eq. 11, looped: w_j = sum_i softmax_{j'}(q_i . k_j' / sqrt(d_k))_j over the read positions,
    divided by their number when literal (sum one), else left at mean one; ones when weighting is off."""
    if model.weighting is None:
        return {p: hidden.new_ones(()) for p in positions}
    query, key = model.weighting.query(hidden), model.weighting.key(hidden)
    weights = {p: hidden.new_zeros(()) for p in positions}
    for i in positions:
        attention = torch.stack([query[i] @ key[j] for j in positions]).div(math.sqrt(query.shape[-1])).softmax(0)
        for index, j in enumerate(positions):
            weights[j] = weights[j] + attention[index]
    if config.reward_weighting == "literal":
        weights = {p: w / len(positions) for p, w in weights.items()}
    return weights


def reference_sequence(model, config, logits, hidden, ids, response):
    """Per-transition terms of one sequence (0-indexed: transition t has state ids[:t+1], action
    ids[t+1]), each a differentiable scalar: lists for the likelihood, unlikelihood, KL and TD terms,
    and the sequence reward (mu at the last valid transition)."""
    w = reference_weights(model, config, hidden, read_positions(response))
    w_q = w if config.weights_on == "all" else {p: hidden.new_ones(()) for p in w}  # ours: weights on mu only
    eq12 = config.pretrained_q and config.q_map == "eq12"
    q_values = model.q_head if model.q_head is not None else model.lm.get_output_embeddings()  # ours: q_map logits
    log_v = math.log(logits.shape[-1])

    def q(t):  # Q(y_{1:t}, y_{t+1}), read at position t, times w_t
        if eq12:  # Eq. 12
            return w_q[t] * torch.log_softmax(config.alpha * torch.softmax(logits[t], 0), 0)[ids[t + 1]]
        return w_q[t] * q_values(hidden[t])[ids[t + 1]]

    def q_td(t):  # the Q the TD error reads: centred (ours) by + w_t log V
        return q(t) + (w_q[t] * log_v if config.centred_q else 0.0)

    def q_logprob(t):  # log-prob of the action under the Q-policy
        if eq12:
            return q(t)
        return torch.log_softmax(config.beta * w_q[t] * q_values(hidden[t]), 0)[ids[t + 1]]  # Eq. 3

    def posterior(t):  # q_phi(R | y_{1:t+1}) = N(mu_t, sigma_t), read at position t+1 (Eq. 9-10)
        raw = model.reward_head(hidden[t + 1])
        return Normal(w[t + 1] * raw[0], w[t + 1] * F.softplus(raw[1]) + config.sigma_min)

    scale = config.beta if eq12 else 1.0
    prior = Normal(hidden.new_zeros(()), hidden.new_ones(()) * config.prior_sigma)
    terms = {"loglik": [], "unlikelihood": [], "kl": [], "td_logp": []}
    last, means = None, []
    for t in range(len(ids) - 1):
        if not response[t + 1]:
            continue
        last = t
        reward = posterior(t)
        means.append(reward.mean)
        log_prob = q_logprob(t)
        terms["loglik"].append(scale * log_prob)
        terms["unlikelihood"].append(scale * torch.log(1 - torch.exp(log_prob)))  # Eq. 16, per transition
        terms["kl"].append(kl_divergence(reward, prior))  # Eq. 6
        if t + 2 < len(ids) and response[t + 2]:
            delta = q_td(t) - config.gamma * q_td(t + 1)  # Eq. 14, with the demonstrated next action
            terms["td_logp"].append(reward.log_prob(delta))  # Eq. 13
        elif config.td_terminal:  # ours: the step into a terminal state of value 0
            terms["td_logp"].append(reward.log_prob(q_td(t)))
    readings = {"last": posterior(last).mean, "return-sum": torch.stack(means).sum(),  # E[R | y] (Eq. 18; ours: return)
                "return-mean": torch.stack(means).mean()}
    terms["reward"] = readings[config.cer_reading]
    return terms


def reference_rows(model, config, input_ids, attention_mask, response_mask):
    """Per-row terms from the LM's plain full forward pass over the whole padded batch."""
    out = model.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    logits, hidden = out.logits, out.hidden_states[-1]  # (B, T, V), (B, T, d)
    # The last hidden states are the ones the LM head reads (after the final norm).
    torch.testing.assert_close(model.lm.get_output_embeddings()(hidden), logits)
    return [reference_sequence(model, config, logits[b], hidden[b], input_ids[b].tolist(), response_mask[b].tolist())
            for b in range(input_ids.shape[0])]


def mean(rows, key):
    """Average over every transition of every row (ava.py deviation 2)."""
    return torch.stack([x for row in rows for x in row[key]]).mean()


def reference_ava_d(model, config, batch):
    rows = reference_rows(model, config, *batch)
    objective = mean(rows, "loglik")
    if config.irl:
        objective = objective - mean(rows, "kl") + config.lam * mean(rows, "td_logp")
    return -objective


def reference_ava_p(model, config, batch, pairs):
    rows = reference_rows(model, config, *batch)
    chosen, rejected = rows[:pairs], rows[pairs:]
    objective = mean(chosen, "loglik")  # Eq. 17: + beta * loglik(y+)
    if config.negative == "literal":
        objective = objective - mean(rejected, "loglik")  # - beta * loglik(y-)
    elif config.negative == "unlikelihood":
        objective = objective + mean(rejected, "unlikelihood")
    if config.irl:
        for sequences in ([chosen, rejected] if config.kl_td_on == "both" else [chosen]):
            objective = objective - mean(sequences, "kl") + config.lam * mean(sequences, "td_logp")
    if config.cer != "off":  # Eq. 18
        margin = torch.stack([c["reward"] - r["reward"] for c, r in zip(chosen, rejected)])
        cer = F.logsigmoid(margin) if config.cer == "logsigmoid" else torch.sigmoid(margin)
        objective = objective + config.cer_weight * cer.mean()
    return -objective


# ----------------------------------------------------------------------------------------------
# ava's fast path and the comparison

def fast_ava_p(model, config, batch, pairs):
    out = model(*batch)
    return ava.ava_p_loss(ava.take_rows(out, slice(0, pairs)), ava.take_rows(out, slice(pairs, None)), config)[0]


def fast_ava_d(model, config, batch):
    return ava.ava_d_loss(model(*batch), config)[0]


def loss_and_gradients(model, loss_fn):
    """The loss and {name: gradient} of every parameter that requires one (zeros where none reached it)."""
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    grads = {name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
             for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_gradients_close(fast, reference):
    assert fast.keys() == reference.keys()
    for name, expected in reference.items():
        atol = GRAD_ATOL_SCALE * float(expected.abs().max()) + 1e-12
        torch.testing.assert_close(fast[name], expected, rtol=GRAD_RTOL, atol=atol,
                                   msg=lambda text, name=name: f"gradient of {name}: {text}")


def expected_nonzero(model, config, objective):
    """Which gradients must be non-zero: every LM parameter, the weighting and the fresh Q head when
    present; the reward head's mu row when some term reads mu (KL/TD, or CER in AVA-p), its sigma row
    only through KL/TD. Returns {name or "reward_head.<param>[mu|sigma]": whether it must be non-zero}."""
    reads_mu = config.irl or (objective == "p" and config.cer != "off")
    expected = {}
    for name, p in model.named_parameters():
        if name.startswith("reward_head."):
            expected[name + "[mu]"] = reads_mu
            expected[name + "[sigma]"] = config.irl
        else:
            expected[name] = True
    return expected


def assert_expected_gradients(model, config, objective, grads):
    for name, must in expected_nonzero(model, config, objective).items():
        if name.endswith("]"):
            base, row = name[:-1].split("[")
            value = grads[base][0 if row == "mu" else 1]
        else:
            value = grads[name]
        nonzero = bool(value.abs().sum() > 0)
        assert nonzero == must, f"{name}: gradient {'zero' if must else 'non-zero'}, expected {'non-zero' if must else 'zero'}"


def run_parity(config, objective):
    """(model, fast loss, reference loss, fast gradients, reference gradients) for one objective."""
    model = make_model(config)
    if objective == "p":
        batch, pairs = pair_batch(), 3
        fast_fn, reference_fn = (lambda: fast_ava_p(model, config, batch, pairs),
                                 lambda: reference_ava_p(model, config, batch, pairs))
    else:
        batch = demonstration_batch()
        fast_fn, reference_fn = lambda: fast_ava_d(model, config, batch), lambda: reference_ava_d(model, config, batch)
    # The fast path must really share prompts: it then runs the decoder stack once per prompt and once
    # per group of responses, where the plain padded batch (the reference) runs it once.
    calls = []
    hook = model.lm.base_model.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        fast_loss, fast_grads = loss_and_gradients(model, fast_fn)
    finally:
        hook.remove()
    assert len(calls) > 1, "ava's fast path ran the batch in one pass: prompt sharing is not exercised"
    reference_loss, reference_grads = loss_and_gradients(model, reference_fn)
    return model, fast_loss, reference_loss, fast_grads, reference_grads


def check(config, objective):
    model, fast_loss, reference_loss, fast_grads, reference_grads = run_parity(config, objective)
    assert torch.isfinite(reference_loss)
    torch.testing.assert_close(fast_loss.double(), reference_loss, **LOSS_TOLERANCE)
    assert_gradients_close(fast_grads, reference_grads)
    assert_expected_gradients(model, config, objective, fast_grads)
    assert_expected_gradients(model, config, objective, reference_grads)


P_CONFIGS = {
    "default": ava.AVAConfig(),
    "w/o rwt": ava.AVAConfig(reward_weighting="off"),
    "literal weights": ava.AVAConfig(reward_weighting="literal"),
    "w/o ptq": ava.AVAConfig(pretrained_q=False),
    "fresh head, beta, chunks": ava.AVAConfig(pretrained_q=False, beta=0.5, negative="unlikelihood", vocab_chunk=5),
    "unlikelihood": ava.AVAConfig(negative="unlikelihood"),
    "w/o neg": ava.AVAConfig(negative="off"),
    "logsigmoid cer": ava.AVAConfig(cer="logsigmoid"),
    "w/o cer": ava.AVAConfig(cer="off"),
    "kl_td_on chosen": ava.AVAConfig(kl_td_on="chosen"),
    "gamma < 1, hyper-parameters, chunks": ava.AVAConfig(alpha=7.0, beta=2.0, gamma=0.9, lam=0.5, cer_weight=3.0,
                                                         vocab_chunk=5),
    "w/o irl": ava.AVAConfig(irl=False),
    # our extensions (ava.py module docstring)
    "cer on the return (sum)": ava.AVAConfig(cer_reading="return-sum"),
    "cer on the return (mean), logsigmoid": ava.AVAConfig(cer_reading="return-mean", cer="logsigmoid"),
    "centred q, terminal td, gamma < 1": ava.AVAConfig(centred_q=True, td_terminal=True, gamma=0.9),
    "prior scaled, alpha raised": ava.AVAConfig(prior_sigma=3.0, alpha=10.0, beta=10.0),
    "weights on mu only": ava.AVAConfig(weights_on="mu", centred_q=True),
    "q = lm head logits": ava.AVAConfig(q_map="logits", beta=0.5),
}

D_CONFIGS = {
    "default": ava.AVAConfig(),
    "w/o rwt": ava.AVAConfig(reward_weighting="off"),
    "literal weights": ava.AVAConfig(reward_weighting="literal"),
    "w/o ptq": ava.AVAConfig(pretrained_q=False, beta=0.5),
    "gamma < 1, hyper-parameters, chunks": ava.AVAConfig(alpha=7.0, beta=2.0, gamma=0.9, lam=0.5, vocab_chunk=5),
    "w/o irl": ava.AVAConfig(irl=False),
    "centred q, terminal td": ava.AVAConfig(centred_q=True, td_terminal=True),
    "q = lm head logits, prior scaled": ava.AVAConfig(q_map="logits", prior_sigma=2.0),
}


@pytest.mark.parametrize("name", list(P_CONFIGS))
def test_ava_p_loss_and_every_gradient_match_the_reference(name):
    check(P_CONFIGS[name], "p")


@pytest.mark.parametrize("name", list(D_CONFIGS))
def test_ava_d_loss_and_every_gradient_match_the_reference(name):
    check(D_CONFIGS[name], "d")


# ----------------------------------------------------------------------------------------------
# The check can fail: cut one path out of ava's graph and the gradients must disagree

def _detached_mu_density(x, mu, sigma):  # TD no longer trains mu
    return -0.5 * ((x - mu.detach()) / sigma).square() - sigma.log() - 0.5 * math.log(2 * math.pi)


def _detached_delta_td_error(original):  # TD no longer trains Q
    def td_error(q_taken, mask, gamma, *more):
        delta, td_mask = original(q_taken, mask, gamma, *more)
        return delta.detach(), td_mask
    return td_error


def _kl_without_mu_squared(mu, sigma, prior_sigma=1.0):  # the prior no longer pulls mu towards 0
    return math.log(prior_sigma) - sigma.log() + sigma.square() / (2 * prior_sigma ** 2) - 0.5


MUTATIONS = {
    "td density: mu detached": ("gaussian_log_density", lambda original: _detached_mu_density),
    "td error: delta detached": ("td_error", _detached_delta_td_error),
    "kl: mu**2 dropped": ("kl_to_standard_normal", lambda original: _kl_without_mu_squared),
}


@pytest.mark.parametrize("objective", ["p", "d"])
@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_the_gradient_check_catches_a_detached_term(mutation, objective, monkeypatch):
    """Patch the helper that ava's irl_terms calls (in the namespace irl_terms resolves names in, so
    this holds wherever the reorganised code puts it) and the gradient comparison must fail."""
    name, make = MUTATIONS[mutation]
    namespace = ava.irl_terms.__globals__
    assert name in namespace, f"irl_terms no longer calls {name}: update this test's mutations"
    monkeypatch.setitem(namespace, name, make(namespace[name]))
    _, _, _, fast_grads, reference_grads = run_parity(ava.AVAConfig(), objective)
    with pytest.raises(AssertionError, match="gradient of"):
        assert_gradients_close(fast_grads, reference_grads)
