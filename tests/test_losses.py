"""Policy and value losses: hand values, padding invariance, exact micro-batch accumulation, on-policy = REINFORCE."""

from __future__ import annotations

import math

import pytest
import torch

from tokenmdp.algos.core import AGGREGATIONS, aggregate, kl_penalty, kl_reward, policy_loss, value_loss
from tokenmdp.errors import TokenMDPError

LN15 = math.log(1.5)


def one_token(logp_value, old_value, adv, **kw):
    logp = torch.tensor([[logp_value]], dtype=torch.float64, requires_grad=True)
    loss, metrics = policy_loss(logp, torch.tensor([[old_value]], dtype=torch.float64), torch.tensor([adv]),
                                torch.ones(1, 1), **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    return float(loss.detach()), float(grad), metrics


def test_ppo_clip_hand_values():
    loss, grad, m = one_token(LN15, 0.0, 1.0, clip_low=0.2)
    assert loss == pytest.approx(-1.2) and grad == 0.0
    assert m["policy/clip_frac"] == 1.0 and m["policy/clip_frac_high"] == 1.0
    assert m["policy/ratio_mean"] == pytest.approx(1.5)
    assert m["policy/approx_kl"] == pytest.approx(0.5 - LN15)  # rho - 1 - log rho = 0.0945
    loss, grad, m = one_token(LN15, 0.0, -1.0, clip_low=0.2)  # A < 0: the unclipped branch is the max
    assert loss == pytest.approx(1.5) and grad == pytest.approx(1.5) and m["policy/clip_frac"] == 0.0
    loss, grad, m = one_token(math.log(0.5), 0.0, -1.0, clip_low=0.2)  # rho 0.5 < 0.8 with A < 0: clipped
    assert loss == pytest.approx(0.8) and grad == 0.0 and m["policy/clip_frac_low"] == 1.0
    loss, grad, _ = one_token(math.log(0.5), 0.0, 1.0, clip_low=0.2)  # rho 0.5 with A > 0: unclipped
    assert loss == pytest.approx(-0.5) and grad == pytest.approx(-0.5)


def test_asymmetric_clip_higher():
    loss, grad, _ = one_token(math.log(1.25), 0.0, 1.0, clip_low=0.2)
    assert loss == pytest.approx(-1.2) and grad == 0.0
    loss, grad, m = one_token(math.log(1.25), 0.0, 1.0, clip_low=0.2, clip_high=0.28)
    assert loss == pytest.approx(-1.25) and grad == pytest.approx(-1.25) and m["policy/clip_frac"] == 0.0


def test_aggregate_hand_values():
    per_token = torch.tensor([[1.0, 2, 0], [3, 0, 0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert float(aggregate(per_token, m, aggregation="seq_mean_token_mean")) == pytest.approx(2.25)
    assert float(aggregate(per_token, m, aggregation="token_mean")) == pytest.approx(2.0)
    assert float(aggregate(per_token, m, aggregation="seq_sum_const", max_len=4)) == pytest.approx(0.75)
    assert float(aggregate(per_token, m, aggregation="seq_mean_token_sum")) == pytest.approx(3.0)
    with pytest.raises(TokenMDPError, match="seq_sum_const' needs a positive max_len"):
        aggregate(per_token, m, aggregation="seq_sum_const")
    with pytest.raises(TokenMDPError, match="unknown aggregation 'sum'"):
        aggregate(per_token, m, aggregation="sum")


def test_kl_estimators_hand_values():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert float(kl_penalty(logp, ref, estimator="k1")) == pytest.approx(math.log(2))
    assert float(kl_penalty(logp, ref, estimator="k2")) == pytest.approx(0.5 * math.log(2) ** 2)
    assert float(kl_penalty(logp, ref, estimator="k3")) == pytest.approx(0.5 - 1 + math.log(2))
    with pytest.raises(TokenMDPError, match="unknown kl_estimator 'k4'"):
        kl_penalty(logp, ref, estimator="k4")


def test_kl_estimators_against_exact_kl():
    """Under samples from pi, E[k1] = E[k3] = KL(pi || pi_ref) exactly (computed by enumerating a categorical)."""
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    ref = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    kl = float((pi * (pi / ref).log()).sum())
    for est in ("k1", "k3"):
        assert float((pi * kl_penalty(pi.log(), ref.log(), estimator=est)).sum()) == pytest.approx(kl)
    assert torch.all(kl_penalty(pi.log(), ref.log(), estimator="k3") >= 0)


def test_kl_in_the_reward():
    r = torch.tensor([[0.0, 1.0, 0.0]])
    logp, ref = torch.tensor([[0.1, 0.2, 5.0]]), torch.zeros(1, 3)
    shaped, m = kl_reward(r, logp, ref, torch.tensor([[1, 1, 0]]), kl_coef=0.5, estimator="k1")
    torch.testing.assert_close(shaped, torch.tensor([[-0.05, 0.9, 0.0]]))
    assert m["policy/kl_ref"] == pytest.approx(0.15)


def test_kl_and_entropy_in_the_loss():
    logp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25)]])
    ent = torch.tensor([[0.7]])
    loss, m = policy_loss(logp, logp.detach(), torch.tensor([0.0]), torch.ones(1, 1), ref_logprobs=ref, kl_coef=0.1,
                          kl_estimator="k1", entropy=ent, entropy_coef=0.01)
    assert float(loss.detach()) == pytest.approx(0.1 * math.log(2) - 0.007)
    assert m["policy/kl_ref"] == pytest.approx(math.log(2)) and m["policy/entropy"] == pytest.approx(0.7)
    with pytest.raises(TokenMDPError, match="no ref_logprobs"):
        policy_loss(logp, logp.detach(), torch.tensor([0.0]), torch.ones(1, 1), kl_coef=0.1)
    with pytest.raises(TokenMDPError, match="advantages must have shape"):
        policy_loss(logp, logp.detach(), torch.zeros(3), torch.ones(1, 1))


def test_value_loss_hand_values():
    v = torch.tensor([[1.0]], requires_grad=True)
    loss, m = value_loss(v, torch.tensor([[0.5]]), torch.tensor([[2.0]]), torch.ones(1, 1), clip_range=0.2)
    (g,) = torch.autograd.grad(loss, v)
    assert float(loss.detach()) == pytest.approx(0.845) and float(g) == 0.0 and m["value/clip_frac"] == 1.0
    loss, _ = value_loss(v, torch.tensor([[0.5]]), torch.tensor([[2.0]]), torch.ones(1, 1), clip_range=None)
    (g,) = torch.autograd.grad(loss, v)
    assert float(loss.detach()) == pytest.approx(0.5) and float(g) == pytest.approx(-1.0)


# ---------------------------------------------------------------- invariances

def random_batch(b=6, t=7, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 2, 5, 1, 4, 6])[:b]
    mask = (torch.arange(t) < lengths.unsqueeze(-1)).long()
    logits = torch.randn(b, t, generator=gen, dtype=dtype)
    old = logits - 0.3 * torch.randn(b, t, generator=gen, dtype=dtype)
    ref = logits - 0.3 * torch.randn(b, t, generator=gen, dtype=dtype)
    adv = torch.randn(b, generator=gen, dtype=dtype)
    ent = torch.rand(b, t, generator=gen, dtype=dtype)
    return logits, old - 1.0, ref - 1.0, adv, ent, mask


def loss_and_grad(params, old, ref, adv, ent, mask, **kw):
    p = params.detach().clone().requires_grad_(True)
    logp = p - 1.0  # stand-in for log-probs that depend on parameters
    loss, _ = policy_loss(logp, old, adv, mask, ref_logprobs=ref, entropy=ent * p, **kw)
    (g,) = torch.autograd.grad(loss, p)
    return loss.detach(), g


KW = dict(clip_low=0.2, clip_high=0.28, kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01, max_len=10)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_padding_does_not_change_the_loss(aggregation):
    params, old, ref, adv, ent, mask = random_batch()
    base, g = loss_and_grad(params, old, ref, adv, ent, mask, aggregation=aggregation, **KW)
    extra = 3  # three more padding columns filled with garbage, and garbage on the existing padding
    garbage = lambda x: torch.cat([torch.where(mask.bool(), x, torch.full_like(x, 1e4)),  # noqa: E731
                                   torch.full((x.shape[0], extra), -1e4, dtype=x.dtype)], dim=1)
    pmask = torch.cat([mask, torch.zeros(mask.shape[0], extra, dtype=mask.dtype)], dim=1)
    padded, gp = loss_and_grad(garbage(params), garbage(old), garbage(ref), adv, garbage(ent), pmask,
                               aggregation=aggregation, **KW)
    torch.testing.assert_close(padded, base)
    torch.testing.assert_close(gp[:, : mask.shape[1]], g)
    assert torch.all(gp[:, mask.shape[1]:] == 0) and torch.all(gp[~pmask.bool()] == 0)
    # token-level advantages with padding garbage give the same too
    adv_tok = torch.where(pmask.bool(), adv.unsqueeze(-1).expand(pmask.shape), torch.tensor(99.0, dtype=adv.dtype))
    padded2, _ = loss_and_grad(garbage(params), garbage(old), garbage(ref), adv_tok, garbage(ent), pmask,
                               aggregation=aggregation, **KW)
    torch.testing.assert_close(padded2, base)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_micro_batches_with_accumulation_equal_the_full_batch(aggregation):
    """Split 6 sequences into micro-batches of 1, 3 and 2 rows, each trimmed to its own longest response;
    with the full batch's num_tokens / num_seqs and the micro-batch losses summed, the gradient is exact."""
    params, old, ref, adv, ent, mask = random_batch()
    full, g_full = loss_and_grad(params, old, ref, adv, ent, mask, aggregation=aggregation, **KW)
    n_tok, n_seq = int(mask.sum()), mask.shape[0]
    total, grad = torch.zeros((), dtype=params.dtype), torch.zeros_like(params)
    for rows in ([0], [1, 2, 3], [4, 5]):
        r = torch.tensor(rows)
        width = int(mask[r].sum(-1).max())
        def sl(x, r=r, width=width):
            return x[r, :width]

        loss, g = loss_and_grad(sl(params), sl(old), sl(ref), adv[r], sl(ent), sl(mask), aggregation=aggregation,
                                num_tokens=n_tok, num_seqs=n_seq, **KW)
        total += loss
        grad[r, :width] += g
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(grad, g_full)
    if aggregation == "token_mean":  # the naive mean of micro-batch means is NOT the full-batch loss
        naive = sum(loss_and_grad(params[r], old[r], ref[r], adv[r], ent[r], mask[r], aggregation=aggregation,
                                  **KW)[0] for r in (torch.tensor([0]), torch.tensor([1, 2, 3]))) / 2
        assert abs(float(naive) - float(full)) > 1e-3


@pytest.mark.parametrize("token_level", [False, True])
def test_on_policy_ppo_gradient_equals_reinforce(token_level):
    """At rho = 1 clipping is inactive: grad of the clipped loss = grad of -mean_i sum_t A_it log pi (REINFORCE)."""
    params, _, _, adv, _, mask = random_batch(seed=3)
    if token_level:
        adv = adv.unsqueeze(-1) * torch.linspace(0.5, 1.5, mask.shape[1], dtype=adv.dtype)
    p = params.clone().requires_grad_(True)
    loss, m = policy_loss(p, p.detach(), adv, mask, clip_low=0.2, aggregation="seq_mean_token_sum")
    (g_ppo,) = torch.autograd.grad(loss, p)
    a = adv if token_level else adv.unsqueeze(-1)
    reinforce = -(a * p * mask).sum() / mask.shape[0]
    (g_rf,) = torch.autograd.grad(reinforce, p)
    torch.testing.assert_close(g_ppo, g_rf)
    assert m["policy/clip_frac"] == 0.0 and m["policy/ratio_mean"] == pytest.approx(1.0)
    assert m["policy/approx_kl"] == pytest.approx(0.0)


def test_value_loss_padding_and_accumulation():
    gen = torch.Generator().manual_seed(5)
    v, vo, ret = (torch.randn(6, 7, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = random_batch()[-1]

    def run(vv, vvo, rr, mm, **kw):
        p = vv.clone().requires_grad_(True)
        loss, _ = value_loss(p, vvo, rr, mm, clip_range=0.2, **kw)
        return loss.detach(), torch.autograd.grad(loss, p)[0]

    full, g = run(v, vo, ret, mask)
    pad = lambda x: torch.cat([torch.where(mask.bool(), x, 1e3), torch.full((6, 2), 1e3, dtype=x.dtype)], 1)  # noqa
    pm = torch.cat([mask, torch.zeros(6, 2, dtype=mask.dtype)], 1)
    padded, gp = run(pad(v), pad(vo), pad(ret), pm)
    torch.testing.assert_close(padded, full)
    torch.testing.assert_close(gp[:, :7], g)
    a, ga = run(v[:2], vo[:2], ret[:2], mask[:2], num_tokens=int(mask.sum()))
    b, gb = run(v[2:], vo[2:], ret[2:], mask[2:], num_tokens=int(mask.sum()))
    torch.testing.assert_close(a + b, full)
    torch.testing.assert_close(torch.cat([ga, gb]), g)


# --- GSPO, CISPO, SAPO: how the ratio enters the loss --------------------------------------------------------------


def _grad(ratio_loss: str, logp: list, old: list, adv: list, mask: list, **kw):
    lp = torch.tensor([logp], dtype=torch.float64, requires_grad=True)
    loss, m = policy_loss(lp, torch.tensor([old], dtype=torch.float64), torch.tensor(adv, dtype=torch.float64),
                          torch.tensor([mask]), ratio_loss=ratio_loss, **kw)
    loss.backward()
    return float(loss.detach()), lp.grad[0].tolist(), m


def test_gspo_one_ratio_per_response_by_hand():
    """Log-ratios 0.2 and -0.1: s = e^0.05 = 1.051271; A = +1, clip 0.2 (unclipped): loss -s, gradient -s / 2 on
    each token (token mean); GSPO's own clip 3e-4 / 4e-4 clips s: the loss is -1.0004 and the gradient 0."""
    logp, old = [math.log(0.6), math.log(0.3), 0.0], [math.log(0.6) - 0.2, math.log(0.3) + 0.1, 0.0]
    s = math.exp(0.05)
    loss, grad, m = _grad("gspo", logp, old, [1.0], [1, 1, 0], clip_low=0.2)
    assert loss == pytest.approx(-s) and grad == pytest.approx([-s / 2, -s / 2, 0.0])
    assert m["policy/ratio_min"] == pytest.approx(s) and m["policy/ratio_max"] == pytest.approx(s)
    loss, grad, m = _grad("gspo", logp, old, [1.0], [1, 1, 0], clip_low=3e-4, clip_high=4e-4)
    assert loss == pytest.approx(-1.0004) and grad == pytest.approx([0.0, 0.0, 0.0])
    assert m["policy/clip_frac"] == 1.0


def test_cispo_clips_the_weight_not_the_gradient_by_hand():
    """rho = 1.5, A = +1, clip_high 0.28: weight 1.28, gradient -1.28 (the clipped surrogate's is 0); rho = 0.5,
    A = -1, clip_low 1 (no lower bound): weight 0.5, gradient +0.5; loss -w A log pi."""
    lp0 = math.log(0.6)
    loss, grad, m = _grad("cispo", [lp0], [lp0 - math.log(1.5)], [1.0], [1], clip_low=1.0, clip_high=0.28)
    assert grad == pytest.approx([-1.28]) and loss == pytest.approx(-1.28 * lp0) and m["policy/clip_frac"] == 1.0
    _, clip_grad, _ = _grad("clip", [lp0], [lp0 - math.log(1.5)], [1.0], [1], clip_low=0.2, clip_high=0.28)
    assert clip_grad == pytest.approx([0.0])
    loss, grad, m = _grad("cispo", [lp0], [lp0 - math.log(0.5)], [-1.0], [1], clip_low=1.0, clip_high=0.28)
    assert grad == pytest.approx([0.5]) and loss == pytest.approx(0.5 * lp0) and m["policy/clip_frac"] == 0.0


def test_sapo_soft_gate_by_hand():
    """l = -sigmoid(tau (rho - 1)) (4 / tau) A: gradient -4 sigma'(tau (rho - 1)) rho A. rho = 1.5, A = +1,
    tau 1: -6 sigma'(0.5) = -1.410022; A = -1, tau_neg 1.05: +6 sigma'(0.525) = 1.401209; rho = 1: -A."""
    def dsig(x):
        return 1 / (1 + math.exp(-x)) * (1 - 1 / (1 + math.exp(-x)))

    assert 6 * dsig(0.5) == pytest.approx(1.410022, abs=1e-6) and 6 * dsig(0.525) == pytest.approx(1.401209, abs=1e-6)
    lp0 = math.log(0.6)
    loss, grad, _ = _grad("sapo", [lp0], [lp0 - math.log(1.5)], [1.0], [1])
    assert grad == pytest.approx([-1.410022], abs=1e-6) and loss == pytest.approx(-4 / (1 + math.exp(-0.5)))
    _, grad, _ = _grad("sapo", [lp0], [lp0 - math.log(1.5)], [-1.0], [1])
    assert grad == pytest.approx([1.401209], abs=1e-6)
    _, grad, _ = _grad("sapo", [lp0], [lp0], [0.7], [1])
    assert grad == pytest.approx([-0.7])


@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean", "seq_sum_const"])
def test_every_ratio_loss_is_the_reinforce_step_on_policy(aggregation):
    """At rho = 1 (one on-policy step) the four ratio losses give the same gradient for any aggregation: they differ
    only off-policy (minibatches, epochs, a stale batch)."""
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(4, 5, generator=g, dtype=torch.float64) - 2
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    adv = torch.tensor([0.5, -1.0, 1.5, -0.25], dtype=torch.float64)
    grads = []
    for rl in ("clip", "gspo", "cispo", "sapo"):
        x = lp.clone().requires_grad_(True)
        loss, _ = policy_loss(x, lp, adv, mask, aggregation=aggregation, max_len=5, ratio_loss=rl)
        loss.backward()
        grads.append(x.grad)
    for gr in grads[1:]:
        torch.testing.assert_close(gr, grads[0], rtol=1e-12, atol=1e-12)
    with pytest.raises(TokenMDPError, match="ratio_loss must be"):
        policy_loss(lp, lp, adv, mask, ratio_loss="gpso")
