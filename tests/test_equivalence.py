"""The paper's identity on a real tiny Qwen2 model: on-policy, KL-free GRPO gradient = weighted filtered SFT."""

from __future__ import annotations

import pytest
import torch

from tokenmdp.algos.core import grpo_advantages, policy_loss
from tokenmdp.algos.isft import isft_loss
from tokenmdp.errors import TokenMDPError
from tokenmdp.train.equivalence import cosine, flat_grad, gradient_cosines
from tokenmdp.policy.logprobs import sequence_logprobs

PROMPTS = ["3 5 7 = 22\n", "1 2 = 3\n", "9 4 8 = 1\n"]
G = 4


@pytest.fixture(scope="module")
def batch(tiny_random):
    """Groups of G sampled responses (1 to 10 tokens) per prompt, with on-policy behaviour log-probs."""
    model, tok = tiny_random
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    prompt_ids = enc["input_ids"].repeat_interleave(G, dim=0)
    prompt_mask = enc["attention_mask"].repeat_interleave(G, dim=0)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, max_new_tokens=10,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    response_ids = out[:, prompt_ids.shape[1]:]
    is_eos = (response_ids == tok.eos_token_id).long()
    after_eos = (is_eos.cumsum(-1) - is_eos) > 0
    # cut each row at a random length too (as if max_new_tokens differed): lengths 1..10, so 1/|o_i| matters
    cut = torch.randint(1, 11, (response_ids.shape[0],), generator=torch.Generator().manual_seed(0))
    after_eos |= torch.arange(response_ids.shape[1]) >= cut.unsqueeze(-1)
    response_mask = (~after_eos).long()
    response_ids = torch.where(after_eos, torch.full_like(response_ids, tok.pad_token_id), response_ids)
    with torch.no_grad():
        old, _ = sequence_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask)
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 1, 0, 0, 0, 1])
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                response_mask=response_mask, old_logprobs=old), grpo_advantages(rewards, group_size=G)


def test_batch_is_a_real_rollout(batch):
    b, adv = batch
    lengths = b["response_mask"].sum(-1)
    assert b["response_ids"].shape[0] == len(PROMPTS) * G and lengths.min() >= 1 and len(set(lengths.tolist())) > 3
    assert torch.all(b["old_logprobs"][b["response_mask"].bool()] < 0)
    assert adv.abs().max() > 0.5


def test_on_policy_kl_free_grpo_equals_weighted_filtered_sft(tiny_random, batch):
    model, _ = tiny_random
    b, adv = batch
    out = gradient_cosines(model, b, adv, clip_low=0.2, kl_coef=0.0)
    assert out["equiv/cosine"] > 0.9999 and out["equiv/cosine_on_policy"] > 0.9999
    assert out["equiv/grad_norm_grpo"] == pytest.approx(out["equiv/grad_norm_isft"], rel=1e-4)
    assert out["equiv/grad_norm_grpo"] > 0 and out["equiv/clip_frac"] == 0.0


def test_accepts_a_rollout(tiny_random, batch):
    """A Rollout carries the behaviour log-probs as ``logprobs``; the diagnostic reads them from there."""
    from tokenmdp.rollout.types import Rollout

    model, _ = tiny_random
    b, adv = batch
    n = b["response_ids"].shape[0]
    ro = Rollout(prompt_ids=b["prompt_ids"], prompt_mask=b["prompt_mask"], response_ids=b["response_ids"],
                 response_mask=b["response_mask"], logprobs=b["old_logprobs"],
                 terminated=torch.zeros(n, dtype=torch.bool), truncated=torch.ones(n, dtype=torch.bool))
    assert gradient_cosines(model, ro, adv)["equiv/cosine"] > 0.9999


def test_the_length_weighting_matters(tiny_random, batch):
    """Plain (unweighted, token-mean) filtered SFT on the same batch is not the GRPO direction."""
    model, _ = tiny_random
    b, adv = batch
    params = [p for p in model.parameters() if p.requires_grad]
    logp, _ = sequence_logprobs(model, b["prompt_ids"], b["prompt_mask"], b["response_ids"], b["response_mask"])
    g_grpo = flat_grad(policy_loss(logp, b["old_logprobs"], adv, b["response_mask"])[0], params)
    g_plain = flat_grad(isft_loss(logp, b["response_mask"], adv > 0, mode="+-")[0], params, retain_graph=False)
    assert cosine(g_grpo, g_plain) < 0.99


def test_clipping_and_kl_take_them_apart(tiny_random, batch):
    """Off-policy behaviour log-probs (as after inner epochs) and a KL to a reference break the identity."""
    model, _ = tiny_random
    b, adv = batch
    gen = torch.Generator().manual_seed(1)
    mask = b["response_mask"].bool()
    noise = lambda s: torch.where(mask, s * torch.randn(mask.shape, generator=gen), 0.0)  # noqa: E731
    off = dict(b, old_logprobs=b["old_logprobs"] + noise(0.5), ref_logprobs=b["old_logprobs"] + noise(1.0))
    out = gradient_cosines(model, off, adv, clip_low=0.2, kl_coef=0.5, kl_estimator="k3")
    assert out["equiv/cosine_on_policy"] > 0.9999
    assert out["equiv/cosine"] < 0.99 and out["equiv/clip_frac"] > 0.1 and out["equiv/ratio_max"] > 1.2
    # each ingredient moves the direction on its own: without the KL the clipped off-policy ratio still
    # separates them, and switching the clip off changes the cosine too
    assert out["equiv/cosine_no_kl"] < 0.9999 and abs(out["equiv/cosine_no_kl"] - out["equiv/cosine"]) > 1e-3
    assert abs(out["equiv/cosine_no_clip"] - out["equiv/cosine"]) > 1e-3


def test_helpers_and_errors(tiny_random, batch):
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    assert cosine(a, b) == pytest.approx(2 ** -0.5) and cosine(a, torch.zeros(2)) == 0.0
    w = torch.nn.Parameter(torch.tensor([2.0, 3.0]))
    unused = torch.nn.Parameter(torch.ones(3))
    g = flat_grad((w**2).sum(), [w, unused])
    assert g.tolist() == [4.0, 6.0, 0.0, 0.0, 0.0]
    model, _ = tiny_random
    bb, adv = batch
    with pytest.raises(TokenMDPError, match="needs ref_logprobs"):
        gradient_cosines(model, bb, adv, kl_coef=0.1)
    with pytest.raises(TokenMDPError, match="no field 'response_ids'"):
        gradient_cosines(model, {k: v for k, v in bb.items() if k != "response_ids"}, adv)
    with pytest.raises(TokenMDPError, match="advantages must have shape"):
        gradient_cosines(model, bb, adv[:3])


def test_per_token_advantages_constant_along_each_row_are_the_sequence_case(tiny_random, batch):
    """(B, T) advantages equal to A_i on every token give the (B,) case's cosines exactly; returns-to-go of
    process rewards (A_t = G_t - b_i, varying along a row) move the step away from weighted filtered SFT."""
    model, _ = tiny_random
    data, adv = batch
    mask = data["response_mask"]
    flat = adv.unsqueeze(1).expand(mask.shape).clone() * mask
    seq = gradient_cosines(model, data, adv)
    tok = gradient_cosines(model, data, flat)
    for key in ("equiv/cosine_on_policy", "equiv/grad_norm_grpo", "equiv/grad_norm_isft"):
        assert tok[key] == pytest.approx(seq[key], rel=1e-9, abs=1e-12), key
    assert seq["equiv/cosine_on_policy"] > 0.9999
    # a step reward of +0.5 on each row's first token: G_t - b_i is A_i + 0.5 on the first token only, where
    # the SFT side still weighs the whole row by its first token's A_i0
    bump = torch.zeros_like(flat)
    bump[:, 0] = 0.5
    varied = gradient_cosines(model, data, (flat + bump) * mask)
    assert varied["equiv/cosine_on_policy"] < 0.999
    with pytest.raises(TokenMDPError, match=r"\(B, T\)"):
        gradient_cosines(model, data, flat[:, :3])
