"""Every term of ava.py against a slow reference written straight from the paper's equations:
explicit Python loops over t, the full model's logits (not our chunked gather), and
torch.distributions for the Gaussian terms. Random tiny models, padding and prompts of different
lengths. Equal within 1e-5."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

import ava
from conftest import random_batch, randomize_heads, tiny_lm

ATOL = 1e-5


def close(actual, expected):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32), torch.as_tensor(expected, dtype=torch.float32),
                               atol=ATOL, rtol=0)


def full_forward(lm, input_ids, attention_mask):
    """Logits and last hidden states from the model's own full forward pass."""
    out = lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    close(lm.get_output_embeddings()(hidden), out.logits)  # the hidden states are the ones the head reads
    return out.logits, hidden


def read_positions(response):
    """Positions whose head outputs some term reads: Q at t (action t+1 in the response), mu at t+1."""
    T = len(response)
    return [p for p in range(T) if response[p] or (p + 1 < T and response[p + 1])]


def reference_weights(weighting, hidden, positions, literal):
    """Eq. 11 with loops: w_t = 1/n * sum_i softmax_{t'}(q_i . k_{t'} / sqrt(d))_t (times n: mean one)."""
    weights = torch.zeros(hidden.shape[0])
    if weighting is None:
        weights[positions] = 1.0
        return weights
    query, key = weighting.query(hidden), weighting.key(hidden)
    for i in positions:
        scores = torch.stack([query[i] @ key[j] / math.sqrt(query.shape[-1]) for j in positions])
        for index, j in enumerate(positions):
            weights[j] += scores.softmax(0)[index]
    return weights / len(positions) if literal else weights


def reference_sequence(model, config, logits, hidden, ids, response):
    """AVA-d's per-transition terms for one sequence, from the equations (0-indexed: transition t has
    state ids[:t+1], action ids[t+1])."""
    T = len(ids)
    w = reference_weights(model.weighting, hidden, read_positions(response), config.reward_weighting == "literal")

    def q(t):  # Q(y_{1:t}, y_{t+1}) read at position t, weighted
        if config.pretrained_q:  # Eq. 12
            value = torch.log_softmax(config.alpha * torch.softmax(logits[t], 0), 0)[ids[t + 1]]
        else:
            value = model.q_head(hidden[t])[ids[t + 1]]
        return w[t] * value

    def q_logprob(t):
        if config.pretrained_q:
            return q(t)
        return torch.log_softmax(config.beta * w[t] * model.q_head(hidden[t]), 0)[ids[t + 1]]  # Eq. 3

    def reward(t):  # N(mu_t, sigma_t) of transition t, read at position t+1 (Eq. 9-10)
        raw = model.reward_head(hidden[t + 1])
        return w[t + 1] * raw[0], w[t + 1] * F.softplus(raw[1]) + config.sigma_min

    scale = config.beta if config.pretrained_q else 1.0
    terms = {"loglik": [], "unlikelihood": [], "kl": [], "td_logp": []}
    last = None
    for t in range(T - 1):
        if not response[t + 1]:
            continue
        last = t
        mu, sigma = reward(t)
        lp = q_logprob(t)
        terms["loglik"].append(scale * lp)
        terms["unlikelihood"].append(scale * torch.log(1 - torch.exp(lp.double())).float())
        terms["kl"].append(kl_divergence(Normal(mu, sigma), Normal(0.0, 1.0)))
        if t + 2 < T and response[t + 2]:
            delta = q(t) - config.gamma * q(t + 1)  # Eq. 14
            terms["td_logp"].append(Normal(mu, sigma).log_prob(delta))
    terms["last_mu"] = reward(last)[0]
    return terms


def reference_batch(model, config, input_ids, attention_mask, response_mask):
    logits, hidden = full_forward(model.lm, input_ids, attention_mask)
    rows = [reference_sequence(model, config, logits[b], hidden[b], input_ids[b].tolist(), response_mask[b].tolist())
            for b in range(input_ids.shape[0])]
    mean = lambda key: torch.stack([x for r in rows for x in r[key]]).mean()
    return {"loglik": mean("loglik"), "unlikelihood": mean("unlikelihood"), "kl": mean("kl"), "td_logp": mean("td_logp"),
            "last_mu": torch.stack([r["last_mu"] for r in rows])}


CONFIGS = {
    "default": ava.AVAConfig(),
    "literal weights": ava.AVAConfig(reward_weighting="literal"),
    "w/o rwt": ava.ablate(ava.AVAConfig(), "w/o rwt"),
    "w/o ptq": ava.ablate(ava.AVAConfig(), "w/o ptq"),
    "w/o neg": ava.ablate(ava.AVAConfig(), "w/o neg"),
    "w/o irl": ava.ablate(ava.AVAConfig(), "w/o irl"),
    "w/o cer": ava.ablate(ava.AVAConfig(), "w/o cer"),
    "unlikelihood+logsigmoid+chosen-only": ava.AVAConfig(negative="unlikelihood", cer="logsigmoid", kl_td_on="chosen"),
    "hyper-parameters": ava.AVAConfig(alpha=7.0, beta=2.0, gamma=0.9, lam=0.5, cer_weight=3.0),
    "fresh head with beta": ava.AVAConfig(pretrained_q=False, beta=0.5, negative="unlikelihood"),
}


def pair_batches(seed=0):
    chosen = random_batch(4, 12, seed=seed, prompt_lengths=[1, 3, 2, 5], lengths=[12, 9, 7, 10])
    rejected = random_batch(4, 11, seed=seed + 1, prompt_lengths=[1, 3, 2, 5], lengths=[11, 5, 11, 8])
    return chosen, rejected


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_ava_p_matches_reference(name, kind):
    config = CONFIGS[name]
    model = randomize_heads(ava.TQR(tiny_lm(kind), config))
    (chosen_batch, rejected_batch) = pair_batches()
    loss, terms = ava.ava_p_loss(model(*chosen_batch), model(*rejected_batch), config)
    with torch.no_grad():
        pos = reference_batch(model, config, *chosen_batch)
        neg = reference_batch(model, config, *rejected_batch)
    objective = pos["loglik"]
    close(terms["loglik_chosen"], pos["loglik"])
    if config.negative != "off":
        expected_negative = neg["unlikelihood"] if config.negative == "unlikelihood" else -neg["loglik"]
        close(terms["negative"], expected_negative)
        objective = objective + expected_negative
    else:
        assert "negative" not in terms
    if config.irl:
        kl = pos["kl"] + (neg["kl"] if config.kl_td_on == "both" else 0)
        td = pos["td_logp"] + (neg["td_logp"] if config.kl_td_on == "both" else 0)
        close(terms["kl"], kl)
        close(terms["td_logp"], td)
        objective = objective - kl + config.lam * td
    else:
        assert "kl" not in terms and "td_logp" not in terms
    margin = pos["last_mu"] - neg["last_mu"]
    if config.cer != "off":
        cer = (F.logsigmoid(margin) if config.cer == "logsigmoid" else torch.sigmoid(margin)).mean()
        close(terms["cer"], cer)
        objective = objective + config.cer_weight * cer
    close(loss, -objective)
    close(terms["accuracy"], (margin > 0).float().mean())


@pytest.mark.parametrize("name", ["default", "w/o ptq", "w/o rwt", "hyper-parameters"])
def test_ava_d_matches_reference(name):
    config = CONFIGS[name]
    model = randomize_heads(ava.TQR(tiny_lm("llama"), config))
    batch = random_batch(3, 10, seed=4, prompt_lengths=[2, 1, 4], lengths=[10, 6, 8])
    loss, terms = ava.ava_d_loss(model(*batch), config)
    with torch.no_grad():
        ref = reference_batch(model, config, *batch)
    close(terms["loglik"], ref["loglik"])
    close(terms["kl"], ref["kl"])
    close(terms["td_logp"], ref["td_logp"])
    close(loss, -(ref["loglik"] - ref["kl"] + config.lam * ref["td_logp"]))


def test_weights_match_eq_11_and_mean_one():
    model = randomize_heads(ava.TQR(tiny_lm("gpt2")))
    batch = random_batch(3, 10, seed=2)
    out = model(*batch)
    _, hidden = full_forward(model.lm, batch[0], batch[1])
    for b in range(3):
        positions = read_positions(batch[2][b].tolist())
        with torch.no_grad():
            expected = reference_weights(model.weighting, hidden[b], positions, literal=False)
        close(out.weights[b], expected)
        close(out.weights[b, positions].mean(), 1.0)


def test_pretrained_q_and_td_error_loops():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=generator) * 4
    actions = torch.randint(0, 50, (6,), generator=generator)
    q = ava.pretrained_q(logits, actions, alpha=3.0)
    for n in range(6):
        pi = [math.exp(x) for x in logits[n].tolist()]
        pi = [p / sum(pi) for p in pi]
        close(q[n], 3.0 * pi[actions[n]] - math.log(sum(math.exp(3.0 * p) for p in pi)))
    assert (q <= 0).all() and (q >= -math.log(50) - 3.0).all()  # bounded, as SPEC.md says

    q_taken = torch.randn(2, 7, generator=generator)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    delta, td_mask = ava.td_error(q_taken, mask, gamma=0.8)
    for b in range(2):
        for t in range(7):
            valid = bool(mask[b, t]) and t + 1 < 7 and bool(mask[b, t + 1])
            assert bool(td_mask[b, t]) == valid
            close(delta[b, t], q_taken[b, t] - 0.8 * q_taken[b, t + 1] if valid else 0.0)


def test_gaussian_terms_and_log1mexp():
    mu, sigma, x = torch.tensor([0.3, -2.0, 5.0]), torch.tensor([0.5, 1.7, 0.01]), torch.tensor([1.0, -1.0, 5.001])
    close(ava.kl_to_standard_normal(mu, sigma), kl_divergence(Normal(mu, sigma), Normal(0.0, 1.0)))
    close(ava.gaussian_log_density(x, mu, sigma), Normal(mu, sigma).log_prob(x))
    xs = torch.tensor([-1e-4, -0.3, -0.69, -0.7, -5.0, -40.0], dtype=torch.float64)
    torch.testing.assert_close(ava.log1mexp(xs), torch.log(1 - torch.exp(xs)))


def test_dense_rewards_are_mu_on_response_transitions():
    model = randomize_heads(ava.TQR(tiny_lm("llama")))
    batch = random_batch(3, 10, seed=5)
    out = model(*batch)
    logits, hidden = full_forward(model.lm, batch[0], batch[1])
    rewards, sigma = ava.dense_rewards(out, pessimism=2.0)
    for b in range(3):
        response = batch[2][b].tolist()
        w = reference_weights(model.weighting, hidden[b], read_positions(response), literal=False)
        for t in range(9):
            if response[t + 1]:
                raw = model.reward_head(hidden[b, t + 1])
                mu, s = w[t + 1] * raw[0], w[t + 1] * F.softplus(raw[1]) + 1e-4
                close(rewards[b, t], mu - 2.0 * s)
                close(sigma[b, t], s)
            else:
                assert rewards[b, t] == 0 and sigma[b, t] == 0
        last = max(t for t in range(9) if response[t + 1])
        close(out.sequence_reward()[b], out.mu[b, last])


def reference_logps(lm, input_ids, attention_mask, response_mask):
    logits, _ = full_forward(lm, input_ids, attention_mask)
    rows = []
    for b in range(input_ids.shape[0]):
        rows.append(sum(torch.log_softmax(logits[b, t], 0)[input_ids[b, t + 1]]
                        for t in range(input_ids.shape[1] - 1) if response_mask[b, t + 1]))
    return torch.stack(rows)


def test_dpo_and_sft_match_reference():
    policy, reference = tiny_lm("llama", seed=0), tiny_lm("llama", seed=1)
    chosen, rejected = pair_batches(3)
    pc, pr = ava.token_logprobs(policy, *chosen).sum(1), ava.token_logprobs(policy, *rejected).sum(1)
    rc, rr = ava.token_logprobs(reference, *chosen).sum(1), ava.token_logprobs(reference, *rejected).sum(1)
    with torch.no_grad():
        close(pc, reference_logps(policy, *chosen))
        close(rr, reference_logps(reference, *rejected))
    loss, reward_chosen, reward_rejected = ava.dpo_loss(pc, pr, rc, rr, beta=0.3)
    expected = [-math.log(1 / (1 + math.exp(-0.3 * ((a - b) - (c - d)))))
                for a, c, b, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]
    close(loss, sum(expected) / len(expected))
    close(reward_chosen, 0.3 * (pc - rc))
    token_logps = ava.token_logprobs(policy, *chosen)
    n_tokens = int(chosen[2][:, 1:].sum())
    close(ava.sft_loss(token_logps, chosen[2][:, 1:]), -pc.sum() / n_tokens)


@pytest.mark.parametrize("kind", ["bt", "bt-var", "pref-trans"])
def test_scalar_reward_models_match_reference(kind):
    model = randomize_heads(ava.ScalarRewardModel(tiny_lm("gpt2"), kind))
    chosen, rejected = pair_batches(5)
    out_c, out_r = model(*chosen), model(*rejected)
    loss, metrics = model.loss(out_c, out_r)
    scores, spreads = [], []
    with torch.no_grad():
        for ids, attention, response in (chosen, rejected):
            _, hidden = full_forward(model.lm, ids, attention)
            row_scores, row_spreads = [], []
            for b in range(ids.shape[0]):
                positions = [p for p in range(ids.shape[1]) if response[b, p]]  # response tokens: rewards r_t
                raw = [model.reward_head(hidden[b, p]) for p in positions]
                if kind == "pref-trans":
                    w = reference_weights(model.weighting, hidden[b], positions, literal=True)
                    row_scores.append(sum(w[p] * r[0] for p, r in zip(positions, raw)))
                else:
                    row_scores.append(raw[-1][0])
                    if kind == "bt-var":
                        row_spreads.append(F.softplus(model.spread_head(hidden[b, positions[-1]])[0]) + 1e-4)
            scores.append(torch.stack(row_scores))
            spreads.append(row_spreads)
    close(out_c.score, scores[0])
    close(out_r.score, scores[1])
    if kind == "bt-var":
        expected = [-F.logsigmoid((a - b) / math.sqrt((va ** 2 + vb ** 2) / 2))
                    for a, b, va, vb in zip(scores[0], scores[1], spreads[0], spreads[1])]
    else:
        expected = [-F.logsigmoid(a - b) for a, b in zip(scores[0], scores[1])]
    close(loss, torch.stack(expected).mean())
    close(metrics["accuracy"], (scores[0] > scores[1]).float().mean())
