"""ValueModel: shapes, masking, V(s_t) alignment, padding invariance, gradient flow, save/load."""

from __future__ import annotations

import pytest
import torch

from tokenmdp.errors import TokenMDPError
from tokenmdp.policy.value_head import ValueModel



def _batch():
    prompt = torch.tensor([[0, 0, 10, 11], [12, 13, 14, 15]])
    pmask = (prompt != 0).long()
    resp = torch.tensor([[20, 21, 22], [23, 24, 0]])
    rmask = (resp != 0).long()
    return prompt, pmask, resp, rmask


@pytest.fixture(scope="module")
def critic(tiny_random):
    return ValueModel.from_policy(tiny_random[0], seed=0)


def test_shapes_and_mask(critic):
    v = critic.values(*_batch())
    assert v.shape == (2, 3) and v.dtype == torch.float32
    assert v[1, 2] == 0 and (v[0] != 0).all() and v[1, :2].ne(0).all()


def test_constant_head_gives_bias(critic):
    """With w = 0 and c = 0.5, V(s_t) = 0.5 on every counted token and 0 elsewhere."""
    vm = critic
    with torch.no_grad():
        w, b = vm.value_head.weight.clone(), vm.value_head.bias.clone()
        vm.value_head.weight.zero_()
        vm.value_head.bias.fill_(0.5)
    try:
        v = vm.values(*_batch())
        assert v.tolist() == [[0.5, 0.5, 0.5], [0.5, 0.5, 0.0]]
    finally:
        with torch.no_grad():
            vm.value_head.weight.copy_(w)
            vm.value_head.bias.copy_(b)


def test_alignment_is_state_before_token(critic):
    """values[:, t] is the head applied to the hidden state of the last token of (x, y_<t)."""
    prompt, pmask, resp, rmask = _batch()
    v = critic.values(prompt, pmask, resp, rmask)
    # state before y_1 of row 0 is (x, y_0): its value is forward() at the last column of [x, y_0]
    per_col = critic(torch.cat([prompt[:1], resp[:1, :1]], 1), torch.cat([pmask[:1], rmask[:1, :1]], 1))
    torch.testing.assert_close(v[0, 1], per_col[0, -1], atol=1e-6, rtol=0)
    torch.testing.assert_close(v[0, 0], per_col[0, -2], atol=1e-6, rtol=0)


def test_padding_invariance(critic):
    prompt, pmask, resp, rmask = _batch()
    v = critic.values(prompt, pmask, resp, rmask)
    alone = critic.values(prompt[1:, :], pmask[1:], resp[1:, :2], rmask[1:, :2])
    torch.testing.assert_close(v[1:, :2], alone, atol=1e-5, rtol=0)
    right = critic.values(torch.tensor([[10, 11, 0, 0]]), torch.tensor([[1, 1, 0, 0]]), resp[:1], rmask[:1])
    torch.testing.assert_close(right, v[:1], atol=1e-5, rtol=0)


def test_gradient_flow(tiny_random):
    vm = ValueModel.from_policy(tiny_random[0], seed=0)
    prompt, pmask, resp, rmask = _batch()
    returns = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    loss = ((vm.values(prompt, pmask, resp, rmask) - returns) ** 2 * rmask).sum() / rmask.sum()
    loss.backward()
    assert vm.value_head.weight.grad.abs().sum() > 0 and vm.value_head.bias.grad.abs() > 0
    assert vm.backbone.embed_tokens.weight.grad.abs().sum() > 0
    assert vm.backbone.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    # the copied backbone is independent of the policy
    assert tiny_random[0].model.embed_tokens.weight.grad is None
    # a few SGD steps fit the targets
    opt = torch.optim.Adam(vm.parameters(), lr=1e-2)
    first = loss.item()
    for _ in range(30):
        opt.zero_grad()
        loss = ((vm.values(prompt, pmask, resp, rmask) - returns) ** 2 * rmask).sum() / rmask.sum()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first


def test_save_load_roundtrip(critic, tmp_path):
    critic.save_pretrained(tmp_path / "critic")
    assert (tmp_path / "critic" / "value_head.safetensors").is_file()
    assert (tmp_path / "critic" / "model.safetensors").is_file()
    back = ValueModel.from_pretrained(tmp_path / "critic")
    torch.testing.assert_close(back.values(*_batch()), critic.values(*_batch()), atol=1e-6, rtol=0)


def test_from_policy_folder_and_config(tiny_random, tiny_random_dir):
    a = ValueModel.from_policy(tiny_random_dir, seed=3)
    b = ValueModel.from_policy(tiny_random[0], seed=3)
    torch.testing.assert_close(a.values(*_batch()), b.values(*_batch()), atol=1e-6, rtol=0)
    c = ValueModel.from_config(tiny_random[0].config, seed=3)
    assert c.values(*_batch()).shape == (2, 3)


def test_errors(tiny_random_dir, tmp_path):
    with pytest.raises(TokenMDPError, match="value_head.safetensors"):
        ValueModel.from_pretrained(tiny_random_dir)
    with pytest.raises(TokenMDPError, match="not a saved critic"):
        ValueModel.from_pretrained(tmp_path)
    with pytest.raises(TokenMDPError, match="not found"):
        ValueModel.from_policy(tmp_path / "nope")
