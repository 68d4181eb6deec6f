"""TQR behaviour beyond the numbers: where gradients flow, that every objective trains every
trainable parameter, stability at the extremes, mask errors, and bounded memory."""
import copy

import pytest
import torch

import ava
from conftest import VOCAB, random_batch, randomize_heads, tiny_lm


def pairs(seed=0, vocab_size=VOCAB):
    return (random_batch(3, 10, vocab_size=vocab_size, seed=seed, prompt_lengths=[1, 2, 4], lengths=[10, 8, 9]),
            random_batch(3, 9, vocab_size=vocab_size, seed=seed + 1, prompt_lengths=[1, 2, 4], lengths=[9, 9, 6]))


def grads_of(model, scalar):
    model.zero_grad(set_to_none=True)
    scalar.backward(retain_graph=True)
    return {name: (p.grad.clone() if p.grad is not None else None) for name, p in model.named_parameters()}


def nonzero(grad):
    return grad is not None and grad.abs().sum() > 0


def test_without_irl_the_likelihood_terms_send_no_gradient_to_the_reward_head():
    config = ava.ablate(ava.AVAConfig(), "w/o irl")
    model = ava.TQR(tiny_lm("llama"), config)
    chosen, rejected = pairs()
    loss, terms = ava.ava_p_loss(model(*chosen), model(*rejected), config)
    likelihood = grads_of(model, -(terms["loglik_chosen"] + terms["negative"]))
    assert not nonzero(likelihood["reward_head.weight"]) and not nonzero(likelihood["reward_head.bias"])
    assert nonzero(likelihood["lm.model.layers.1.mlp.up_proj.weight"])  # the likelihood does train the policy
    # The whole w/o-irl loss reaches the reward head through CER alone.
    total, cer = grads_of(model, loss), grads_of(model, -config.cer_weight * terms["cer"])
    torch.testing.assert_close(total["reward_head.weight"], cer["reward_head.weight"])
    assert nonzero(total["reward_head.weight"])


@pytest.mark.parametrize("pretrained_q", [True, False])
def test_td_term_reaches_both_the_q_side_and_the_reward_head(pretrained_q):
    config = ava.AVAConfig(pretrained_q=pretrained_q)
    model = ava.TQR(tiny_lm("gpt2"), config)
    out = model(*random_batch(3, 10, seed=3))
    td = ava.irl_terms(out, config)["td_logp"]
    grads = grads_of(model, td)
    assert nonzero(grads["reward_head.weight"])  # through mu and sigma
    assert nonzero(grads["lm.transformer.h.1.mlp.c_fc.weight"])  # through delta, into the backbone
    q_side = "lm.transformer.wte.weight" if pretrained_q else "q_head.weight"  # GPT-2 ties its LM head to wte
    assert nonzero(grads[q_side])
    # ...and delta itself carries gradient to the Q side (not only mu/sigma do)
    delta, mask = ava.td_error(out.q_taken, out.mask, config.gamma)
    assert nonzero(grads_of(model, (delta * mask).sum())[q_side])


def objectives():
    yield "ava-p", ava.AVAConfig()
    for name in ava.ABLATIONS:
        yield f"ava-p {name}", ava.ablate(ava.AVAConfig(), name)
    yield "ava-p variants", ava.AVAConfig(negative="unlikelihood", cer="logsigmoid", kl_td_on="chosen", reward_weighting="literal")
    yield "ava-d", ava.AVAConfig()
    yield "ava-d w/o ptq", ava.AVAConfig(pretrained_q=False)


def step_changes_every_parameter(model, loss_fn):
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = loss_fn()
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    unchanged = [name for name, p in model.named_parameters()
                 if p.requires_grad and torch.equal(p.detach(), before[name])]
    assert not unchanged, f"parameters not updated by one step: {unchanged}"


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("name,config", list(objectives()), ids=[n for n, _ in objectives()])
def test_every_trainable_parameter_changes_after_one_step_of_each_ava_objective(kind, name, config):
    model = ava.TQR(tiny_lm(kind), config)
    chosen, rejected = pairs()
    if name.startswith("ava-d"):
        step_changes_every_parameter(model, lambda: ava.ava_d_loss(model(*chosen), config)[0])
    else:
        step_changes_every_parameter(model, lambda: ava.ava_p_loss(model(*chosen), model(*rejected), config)[0])


@pytest.mark.parametrize("kind", ["bt", "bt-var", "pref-trans"])
def test_every_trainable_parameter_changes_after_one_step_of_each_baseline_reward_model(kind):
    model = ava.ScalarRewardModel(tiny_lm("llama"), kind)
    chosen, rejected = pairs()
    step_changes_every_parameter(model, lambda: model.loss(model(*chosen), model(*rejected))[0])


@pytest.mark.parametrize("objective", ["dpo", "sft"])
def test_every_trainable_parameter_changes_after_one_step_of_dpo_and_sft(objective):
    policy, reference = tiny_lm("gpt2", seed=0), tiny_lm("gpt2", seed=1)
    chosen, rejected = pairs()
    with torch.no_grad():
        ref_c, ref_r = ava.token_logprobs(reference, *chosen).sum(1), ava.token_logprobs(reference, *rejected).sum(1)

    def loss():
        if objective == "sft":
            return ava.sft_loss(ava.token_logprobs(policy, *chosen), chosen[2][:, 1:])
        pc, pr = ava.token_logprobs(policy, *chosen).sum(1), ava.token_logprobs(policy, *rejected).sum(1)
        return ava.dpo_loss(pc, pr, ref_c, ref_r)[0]

    step_changes_every_parameter(policy, loss)


def test_padding_and_prompt_tokens_never_contribute():
    """Changing the ids under padding or in the prompt's non-final positions of one row changes no
    term of that row except through the backbone's context; changing padding changes nothing at all."""
    model = ava.TQR(tiny_lm("llama"))
    ids, attention, response = random_batch(3, 10, seed=7, lengths=[10, 6, 8])
    out = model(ids, attention, response)
    padded = ids.clone()
    padded[1, 6:] = 50
    padded[2, 8:] = 17
    again = model(padded, attention, response)
    for field in ("q_taken", "q_logprob", "mu", "sigma", "weights"):
        torch.testing.assert_close(getattr(out, field), getattr(again, field))
    loss, _ = ava.ava_p_loss(out, model(ids.flip(0), attention.flip(0) * 0 + attention, response), ava.AVAConfig())
    assert torch.isfinite(loss)
    # Off-mask entries are exactly neutral.
    assert (out.q_taken[~out.mask] == 0).all() and (out.mu[~out.mask] == 0).all() and (out.sigma[~out.mask] == 1).all()


def test_a_row_without_response_tokens_is_a_clear_error():
    model = ava.TQR(tiny_lm("llama"))
    ids, attention, response = random_batch(3, 10)
    response[1] = False
    with pytest.raises(ValueError, match=r"rows \[1\] have no response token"):
        model(ids, attention, response)
    response = random_batch(3, 10)[2]
    response[0, 0] = True
    with pytest.raises(ValueError, match="first token has no state"):
        model(ids, attention, response)
    attention_left = attention.clone()
    attention_left[0, 0] = 0
    with pytest.raises(ValueError, match="not right-padded"):
        model(ids, attention_left, random_batch(3, 10)[2])
    assert ava.masked_mean(torch.ones(3), torch.zeros(3, dtype=torch.bool)) == 0  # the documented zero


def test_stable_with_extreme_logits_large_alpha_and_tiny_sigma():
    for config in (ava.AVAConfig(alpha=1e4), ava.AVAConfig(pretrained_q=False, beta=50.0, negative="unlikelihood"),
                   ava.AVAConfig(alpha=1e4, negative="unlikelihood", cer="logsigmoid", reward_weighting="literal")):
        model = ava.TQR(tiny_lm("llama"), config)
        with torch.no_grad():
            model.lm.lm_head.weight.mul_(1e3)  # logits of order 1e3-1e4
            if model.q_head is not None:
                model.q_head.weight.mul_(1e3)
            model.reward_head.bias[1] = -60.0  # softplus -> ~1e-26: sigma sits on its floor
            model.reward_head.weight.mul_(100.0)
        chosen, rejected = pairs()
        out_c, out_r = model(*chosen), model(*rejected)
        assert out_c.sigma[out_c.mask].min() >= config.sigma_min * 0.999
        loss, terms = ava.ava_p_loss(out_c, out_r, config)
        assert all(torch.isfinite(v).all() for v in terms.values()), terms
        loss.backward()
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        assert not bad, bad


def test_chunking_changes_nothing():
    chosen, rejected = pairs()
    results = []
    for chunk in (1, 7, 10_000):
        config = ava.AVAConfig(vocab_chunk=chunk)
        model = ava.TQR(tiny_lm("llama"), config)
        loss, _ = ava.ava_p_loss(model(*chosen), model(*rejected), config)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        for name, grad in grads.items():
            torch.testing.assert_close(grad, results[0][1][name], atol=1e-6, rtol=1e-5)


def saved_tensor_sizes(fn):
    """numel of every tensor autograd saves for backward while fn() runs."""
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


def test_what_the_backward_keeps_of_the_vocabulary_is_bounded_and_recomputing_changes_nothing(monkeypatch):
    """Memory: beyond ava.KEPT_VOCAB_BYTES, what autograd keeps for backward, summed over the whole AVA-p loss, is
    smaller than a single N x V tensor (N = trained transitions: checkpointed chunks keep only their inputs); within
    it, what is kept stays under the 8 N V bytes the memory plan counts. Either way the same loss and gradients."""
    vocab = 8192
    model = ava.TQR(tiny_lm("llama", vocab_size=vocab), ava.AVAConfig(vocab_chunk=4))
    randomize_heads(model)
    chosen, rejected = pairs(vocab_size=vocab)
    n_transitions = int(chosen[2][:, 1:].sum() + rejected[2][:, 1:].sum())
    loss = lambda: ava.ava_p_loss(model(*chosen), model(*rejected), model.config)
    head = lambda sizes: [s for s in sizes if s != vocab * 32]  # the LM head's weight (V x d) itself may be saved

    def loss_and_grads():
        model.zero_grad()
        value = loss()[0]
        value.backward()
        return value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    kept = sum(head(saved_tensor_sizes(loss)))
    kept_loss, kept_grads = loss_and_grads()
    monkeypatch.setattr(ava, "KEPT_VOCAB_BYTES", 0)  # recompute every chunk
    recomputed = sum(head(saved_tensor_sizes(loss)))
    assert recomputed < n_transitions * vocab
    # kept, the vocabulary adds at least one (N, V) fp32 tensor (pi) and at most the two (8 N V bytes) of the plan
    assert n_transitions * vocab <= kept - recomputed <= 2 * n_transitions * vocab
    recomputed_loss, recomputed_grads = loss_and_grads()
    assert torch.equal(kept_loss, recomputed_loss) and kept_grads.keys() == recomputed_grads.keys()
    for name in kept_grads:
        assert torch.equal(kept_grads[name], recomputed_grads[name]), name  # bit for bit: the same ops, once or twice
    # The check can fail: the naive way (full logits, then log-softmax) keeps B x T x V tensors.
    naive = saved_tensor_sizes(lambda: model.lm(chosen[0], attention_mask=chosen[1]).logits.log_softmax(-1).sum())
    assert max(naive) >= chosen[0].numel() * vocab


def pair_batch(seed=0):
    """Four rows, two prompts, each shared by a chosen and a rejected response of different lengths
    (rows 0/2 and 1/3, as train_rm.py stacks pairs), right-padded."""
    input_ids, attention_mask, response_mask = random_batch(4, 14, seed=seed, prompt_lengths=[5, 3, 5, 3],
                                                            lengths=[14, 9, 11, 12])
    input_ids[2, :5], input_ids[3, :3] = input_ids[0, :5], input_ids[1, :3]
    return input_ids, attention_mask, response_mask


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_shared_prompt_runs_once_and_changes_neither_values_nor_gradients(kind):
    """ava.hidden_states runs a prompt shared by several rows once, reusing its keys and values: the
    hidden states on every valid position, the AVA-p loss and every gradient equal the plain batch's."""
    input_ids, attention_mask, response_mask = pair_batch()
    assert ava.prompt_groups(input_ids, response_mask) == [([0, 2], 5), ([1, 3], 3)]
    results = {}
    for share in (True, False):
        lm = tiny_lm(kind)
        model = randomize_heads(ava.TQR(lm, ava.AVAConfig(), share_prompts=share))
        calls = []
        hook = lm.base_model.register_forward_hook(lambda module, args, kwargs, out: calls.append(1), with_kwargs=True)
        hidden = ava.hidden_states(lm, input_ids, attention_mask, response_mask, share_prompts=share)
        hook.remove()
        out = model(input_ids, attention_mask, response_mask)
        loss, _ = ava.ava_p_loss(ava.take_rows(out, [0, 1]), ava.take_rows(out, [2, 3]), ava.AVAConfig())
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[share] = (hidden, loss, grads, len(calls))
    (h1, l1, g1, calls1), (h0, l0, g0, calls0) = results[True], results[False]
    assert (calls1, calls0) == (4, 1)  # two prompts + two response groups, against one padded batch
    valid = attention_mask.bool()
    torch.testing.assert_close(h1[valid], h0[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    assert g1.keys() == g0.keys() and len(g1) > 5
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-4, msg=name)


def test_prompts_are_shared_only_when_their_tokens_are_identical():
    input_ids, attention_mask, response_mask = pair_batch()
    input_ids[2, 4] = (input_ids[0, 4] + 1) % VOCAB  # row 2's prompt now differs in its last token
    assert ava.prompt_groups(input_ids, response_mask) == [([0], 5), ([1, 3], 3), ([2], 5)]
    lm = tiny_lm("llama")
    shared = ava.hidden_states(lm, input_ids, attention_mask, response_mask)
    plain = ava.hidden_states(lm, input_ids, attention_mask)
    valid = attention_mask.bool()
    torch.testing.assert_close(shared[valid], plain[valid], atol=1e-5, rtol=1e-5)


def test_with_a_zero_td_error_the_td_and_kl_terms_drive_sigma_to_its_floor_and_pin_mu():
    """The collapse of mu-weights (avalib/cli.py PRESETS): where delta_t = 0, log N(0; mu, sigma) - KL has no
    -log sigma left (the two cancel), grows as sigma shrinks, and then punishes any mu by mu^2 / (2 sigma^2); the
    mu-weights-floor preset stops sigma at 0.1 (which, measured, does not stop the collapse)."""

    def objective(mu, sigma):
        mu, sigma = torch.tensor(mu), torch.tensor(sigma)
        return float(ava.gaussian_log_density(torch.tensor(0.0), mu, sigma) - ava.kl_to_standard_normal(mu, sigma))

    assert objective(0.0, 1.0) < objective(0.0, 0.1) < objective(0.0, 1e-4)  # sigma -> 0 pays, with nothing to stop it
    assert objective(0.5, 1e-4) < -1e6 < objective(0.5, 0.1)  # at the default floor a reward of 0.5 costs ~1e7
    floor = ava.AVAConfig(**ava.PRESETS["mu-weights-floor"])
    assert floor.sigma_min == 0.1 and {k: v for k, v in ava.PRESETS["mu-weights-floor"].items() if k != "sigma_min"} == \
        ava.PRESETS["mu-weights"]
    model = ava.TQR(tiny_lm("llama"), floor)
    with torch.no_grad():  # a reward head that asks for sigma ~ 0 everywhere
        model.reward_head.weight.zero_()
        model.reward_head.bias.fill_(-30.0)
    chosen, _ = pairs()
    with torch.no_grad():
        out = model(*chosen)
    sigma = out.sigma[out.mask.bool()]
    assert float(sigma.min()) >= 0.1 and float(sigma.max()) < 0.1 + 1e-6


def test_half_td_keeps_a_barrier_on_sigma_where_the_td_error_is_zero():
    """The mu-weights-half-td preset (lambda = 0.5): with delta_t = 0, -KL + lambda log N(0; mu, sigma) keeps
    (1 - lambda) log sigma, so the sigma it prefers is sqrt(1 - lambda), not the floor, and the price of a reward
    mu stays mu^2 (1 + lambda / (1 - lambda)) / 2. And ava_p_loss weights the TD term by lambda: its loss and its
    gradient on the reward head move by exactly (1 - lambda) times the TD term's."""

    config = ava.AVAConfig(**ava.PRESETS["mu-weights-half-td"])
    assert config.lam == 0.5 and {k: v for k, v in ava.PRESETS["mu-weights-half-td"].items() if k != "lam"} == \
        ava.PRESETS["mu-weights"]

    def objective(mu, sigma, lam):
        mu, sigma = torch.tensor(mu, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64)
        return float(lam * ava.gaussian_log_density(torch.tensor(0.0, dtype=torch.float64), mu, sigma)
                     - ava.kl_to_standard_normal(mu, sigma))

    grid = [10 ** (k / 50) for k in range(-200, 51)]  # sigma from 1e-4 to 10
    best = max(grid, key=lambda s: objective(0.0, s, config.lam))
    assert abs(best - (1 - config.lam) ** 0.5) < 0.05  # an interior optimum ...
    assert objective(0.0, 1e-4, config.lam) < objective(0.0, 0.1, config.lam) < objective(0.0, best, config.lam)
    assert max(grid, key=lambda s: objective(0.0, s, 1.0)) == grid[0]  # ... where lambda = 1 runs to the floor
    price = objective(0.0, best, config.lam) - objective(0.5, best, config.lam)
    assert abs(price - 0.25 * (1 + config.lam / (1 - config.lam)) / 2) < 0.01

    model = ava.TQR(tiny_lm("llama"), config)
    randomize_heads(model)
    chosen, rejected = pairs()
    half_loss, half = ava.ava_p_loss(model(*chosen), model(*rejected), config)
    full_config = ava.AVAConfig(**{**ava.PRESETS["mu-weights"], "lam": 1.0})
    full_loss, full = ava.ava_p_loss(model(*chosen), model(*rejected), full_config)
    torch.testing.assert_close(full_loss - half_loss, -(1 - config.lam) * full["td_logp"])
    difference = {k: g_full - g_half for (k, g_full), g_half in
                  zip(grads_of(model, full_loss).items(), grads_of(model, half_loss).values()) if g_full is not None}
    td = grads_of(model, -(1 - config.lam) * full["td_logp"])
    torch.testing.assert_close(difference["reward_head.weight"], td["reward_head.weight"], atol=1e-6, rtol=1e-4)
    assert nonzero(td["reward_head.weight"])
