"""optim.shared_prompt: each distinct prompt runs once and its group's responses attend to its KV cache. The
log-probs, entropies, critic values and every parameter's gradient equal the padded pass's; a training run with it
on equals the run with it off; a model that cannot take a cache falls back with one warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from tokenmdp.policy.logprobs import sequence_logprobs
from tokenmdp.policy.shared_prompt import grouped_sequence_logprobs, prompt_groups
from tokenmdp.policy.tiny import build_tiny_random
from tokenmdp.train.learner import micro_batches


@pytest.fixture(scope="module")
def model():
    m, _ = build_tiny_random(seed=3, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1)
    return m.double()


def _groups(seed=0, prompts=3, group=4, p=7, t=6, vocab=90):
    """``prompts`` left-padded prompts of different lengths, ``group`` right-padded responses each, rows shuffled."""
    g = torch.Generator().manual_seed(seed)
    pmask = torch.ones(prompts, p, dtype=torch.long)
    for i in range(prompts):
        pmask[i, : i * 2] = 0  # prompt lengths p, p - 2, p - 4
    pid = torch.randint(3, vocab, (prompts, p), generator=g) * pmask
    pid, pmask = pid.repeat_interleave(group, 0), pmask.repeat_interleave(group, 0)
    resp = torch.randint(3, vocab, (prompts * group, t), generator=g)
    rmask = torch.ones_like(resp)
    for row, length in ((1, 3), (5, 1), (6, 4)):
        rmask[row, length:] = 0
    perm = torch.randperm(prompts * group, generator=g)
    return pid[perm], pmask[perm], resp[perm], rmask[perm]


def _grads(module, fn):
    module.zero_grad()
    out = fn()
    loss = sum(o.pow(2).sum() + o.sum() for o in out if o is not None)
    loss.backward()
    return out, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_prompt_groups_hand_example():
    ids = torch.tensor([[7, 8], [5, 9], [7, 8], [0, 9]])
    mask = torch.tensor([[1, 1], [0, 1], [1, 1], [0, 1]])
    first, inverse = prompt_groups(ids, mask)  # rows 1 and 3 differ only in a pad id
    assert inverse.tolist() == [1, 0, 1, 0] and first.tolist() == [1, 0]


@pytest.mark.parametrize("temperature, chunk", [(1.0, None), (0.7, 5)])
def test_logprobs_entropy_and_gradients_equal_the_padded_pass(model, temperature, chunk):
    batch = _groups()
    kw = dict(temperature=temperature, return_entropy=True, chunk_size=chunk)
    (lp, ent), grads = _grads(model, lambda: grouped_sequence_logprobs(model, *batch, **kw))
    (ref_lp, ref_ent), ref_grads = _grads(model, lambda: sequence_logprobs(model, *batch, **kw))
    torch.testing.assert_close(lp, ref_lp, atol=1e-6, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-6, rtol=0)
    assert (lp[batch[3] == 0] == 0).all() and (lp[batch[3] == 1] < 0).all()
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
    for name, g in ref_grads.items():  # the head's logits are float32 (as in sequence_logprobs): rtol ~1e-7
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6 * float(g.abs().max()), msg=name)


def test_a_prompt_pass_across_micro_batches_equals_the_padded_pass(model):
    """PromptPass(detach=True): the prompts once, the responses in three micro-batches that split every group,
    each with its own backward, then the prompt pass's backward: the log-probs and every parameter's gradient equal
    one padded pass over all rows (the gradient reaches the prompt only through the detached keys, values and
    states, so a missing backward would leave it short)."""
    from tokenmdp.policy.logprobs import counted_logprobs, split_causal_lm
    from tokenmdp.policy.shared_prompt import PromptPass, backbone_support

    pid, pmask, resp, rmask = _groups(seed=4)
    parts = split_causal_lm(model)
    kwarg = backbone_support(parts.backbone)[0]

    def chunked():
        prompts = PromptPass(parts.backbone, kwarg, pid, pmask, detach=True)
        out = torch.zeros(resp.shape, dtype=torch.float32)
        for rows in (torch.tensor([0, 5, 7, 11]), torch.tensor([1, 2, 3, 4, 6]), torch.tensor([8, 9, 10])):
            hidden, where = prompts.states(prompts.inverse[rows], resp[rows], rmask[rows])
            lp, _ = counted_logprobs(hidden, where, resp[rows], parts, temperature=1.0, return_entropy=False,
                                     chunk_size=None)
            (lp.pow(2).sum() + lp.sum()).backward()  # the loss of _grads, micro-batch by micro-batch
            out[rows] = lp.detach()
        prompts.backward()
        return out

    model.zero_grad()
    lp = chunked()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (ref_lp, _), ref_grads = _grads(model, lambda: sequence_logprobs(model, pid, pmask, resp, rmask))
    torch.testing.assert_close(lp, ref_lp.float(), atol=1e-6, rtol=0)
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6 * float(g.abs().max()), msg=name)
    model.zero_grad()  # without the prompt pass's backward the embeddings miss the prompt tokens' share
    prompts = PromptPass(parts.backbone, kwarg, pid, pmask, detach=True)
    hidden, where = prompts.states(prompts.inverse, resp, rmask)
    lp, _ = counted_logprobs(hidden, where, resp, parts, temperature=1.0, return_entropy=False, chunk_size=None)
    (lp.pow(2).sum() + lp.sum()).backward()
    name = next(n for n in ref_grads if "embed" in n)
    assert not torch.allclose(dict(model.named_parameters())[name].grad, ref_grads[name], rtol=1e-3, atol=0)


def test_prompt_chunks_hand_example():
    from tokenmdp.train.micro import prompt_chunks

    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    prompts = torch.tensor([4, 4, 3, 3, 5, 5])
    lengths = prompts + torch.tensor([6, 2, 1, 1, 3, 2])  # longest rows: group 0 (10), group 2 (8), group 1 (4)
    rows = torch.arange(6)
    cut = [c.tolist() for c in prompt_chunks(rows, lengths, groups, prompts, max_tokens=20)]
    assert cut == [[0, 1, 4, 5], [2, 3]]  # 2 prompts x 5 = 10 <= 20 / 2; 3 x 5 = 15 > 10
    assert [c.tolist() for c in prompt_chunks(rows, lengths, groups, prompts)] == [[0, 1, 4, 5, 2, 3]]
    assert [c.tolist() for c in prompt_chunks(rows, lengths, groups, prompts, max_tokens=6)] == [[0, 1], [4, 5],
                                                                                                  [2, 3]]


def test_a_right_padded_prompt_and_single_rows(model):
    """Right-padded prompts (the first response token's predictor inside the prompt), groups of one."""
    pid = torch.tensor([[10, 11, 12, 0, 0], [10, 11, 12, 0, 0], [20, 21, 22, 23, 24]])
    pmask = (pid != 0).long()
    resp = torch.tensor([[30, 31], [32, 33], [34, 0]])
    rmask = (resp != 0).long()
    lp, _ = grouped_sequence_logprobs(model, pid, pmask, resp, rmask)
    ref, _ = sequence_logprobs(model, pid, pmask, resp, rmask)
    torch.testing.assert_close(lp, ref, atol=1e-6, rtol=0)


def test_critic_values_and_gradients_equal_the_padded_pass(model):
    from tokenmdp.policy.value_head import ValueModel

    critic = ValueModel.from_policy(model, seed=1)
    batch = _groups(seed=1)
    (v,), grads = _grads(critic, lambda: (critic.values(*batch, shared_prompt=True),))
    (ref,), ref_grads = _grads(critic, lambda: (critic.values(*batch),))
    torch.testing.assert_close(v, ref, atol=1e-6, rtol=0)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6 * float(g.abs().max()), msg=name)


class OpaqueLM(nn.Module):
    """A causal LM behind a wrapper with no backbone / head split and no cache argument."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask, position_ids=None, use_cache=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)


def test_a_model_without_a_cache_falls_back_with_one_warning(model):
    wrapped, batch = OpaqueLM(model), _groups(seed=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lp, _ = grouped_sequence_logprobs(wrapped, *batch)
        grouped_sequence_logprobs(wrapped, *batch)
    ours = [w for w in caught if "optim.shared_prompt" in str(w.message)]
    assert len(ours) == 1 and "OpaqueLM" in str(ours[0].message) and ours[0].category is RuntimeWarning
    torch.testing.assert_close(lp, sequence_logprobs(model, *batch)[0], atol=1e-6, rtol=0)


def test_micro_batches_keep_groups_together():
    lengths = torch.tensor([5, 9, 5, 9, 2, 3, 2, 3])
    groups = torch.tensor([0, 1, 0, 1, 2, 2, 2, 2])
    rows = torch.arange(8)
    cut = [m.tolist() for m in micro_batches(rows, 2, lengths, groups)]
    assert cut == [[1, 3], [0, 2], [4, 5], [6, 7]]  # groups longest first, each group's rows together
    assert [m.tolist() for m in micro_batches(rows, 3, lengths)] == [[1, 3, 0], [2, 5, 7], [4, 6]]
    assert sorted(sum(cut, [])) == rows.tolist()


@pytest.mark.parametrize("algo, budget", [("grpo", "auto"), ("grpo", "16"), ("ppo", "auto"), ("isft+", "auto"),
                                          ("dpo", "auto")])
def test_training_with_shared_prompts_equals_training_without(tmp_path, tiny_random_dir, algo, budget, monkeypatch):
    """Two AdamW steps (rollouts of step 2 from the step-1 parameters) with shared prompts on and off give the same
    parameters, policy and critic; minibatches of 6 rows of groups of 4, micro-batches of 3: groups are split
    (a token budget of 16 also cuts each minibatch's prompts into several chunks: ``prompt_chunks``).

    AdamW's eps is 1e-3: with the default 1e-8 its first step is ``lr * g / |g|``, which turns the float-order
    noise (~1e-9) of a gradient element that is itself ~0 into a step of either sign (a few elements in 1e5 differ
    by up to 1e-5 then); with eps 1e-3 such elements step ``lr * g / eps`` and the runs agree to float32 ulps."""
    from safetensors.torch import load_file
    from test_trainer import SMALL  # tests/ is on the path (conftest.py); registers the parity task

    import tokenmdp.policy.shared_prompt as sp
    import tokenmdp.policy.value_head as vh
    from tokenmdp.train.config import load_config
    from tokenmdp.train.trainer import train

    calls = []
    sp_states, sp_init = sp.shared_prompt_states, sp.PromptPass.__init__

    def counting(who):
        def states(*args):
            calls.append(who)
            return sp_states(*args)
        return states

    def chunk_init(self, *args, detach=False):  # a chunk's prompts once across micro-batches (Learner.micro_passes)
        if detach:
            calls.append("policy")
        sp_init(self, *args, detach=detach)

    monkeypatch.setattr(sp, "shared_prompt_states", counting("policy"))
    monkeypatch.setattr(vh, "shared_prompt_states", counting("critic"))
    monkeypatch.setattr(sp.PromptPass, "__init__", chunk_init)
    finals = {}
    for shared in (False, True):
        out = tmp_path / f"{algo}-{shared}"
        cfg = load_config(None, [f"model.path={tiny_random_dir}", f"algo.name={algo}", f"run.out={out}", *SMALL,
                                 "optim.minibatch_size=6", "optim.micro_batch_size=3", "optim.eps=1e-3",
                                 f"optim.micro_batch_tokens={budget}",
                                 f"optim.shared_prompt={str(shared).lower()}"])
        run = train(cfg, progress=False)
        assert bool(calls) == shared  # the shared pass runs when, and only when, it is on
        finals[shared] = load_file(str(run / "final" / "model.safetensors"))
        if algo == "ppo":
            finals[shared].update({f"critic.{k}": v for k, v in
                                   torch.load(run / "checkpoints" / "step-2" / "critic.pt").items()})
    assert "policy" in calls and ("critic" in calls) == (algo == "ppo")
    start = load_file(str(tiny_random_dir / "model.safetensors"))
    assert any(not torch.equal(finals[False][k], start[k]) for k in start)
    assert finals[True].keys() == finals[False].keys()
    for key, value in finals[False].items():
        torch.testing.assert_close(finals[True][key], value, rtol=1e-5, atol=1e-6, msg=key)
