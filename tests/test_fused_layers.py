"""optim.fused_layers: the update's passes with RMSNorm, rotary and SwiGLU as fused C++ kernels. Each kernel equals
its formula written out in float64 (forward and backward); the fused backbone equals the transformers one on
padded batches, over a KV cache, with grouped-query heads, q/k norms and LoRA; a training run with it equals the
run without it to float rounding; settings it cannot serve are refused by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmdp.errors import TokenMDPError
from tokenmdp.policy import fused_layers
from tokenmdp.policy.logprobs import sequence_logprobs, split_causal_lm
from tokenmdp.policy.shared_prompt import grouped_sequence_logprobs
from tokenmdp.policy.tiny import build_tiny_random

pytestmark = pytest.mark.skipif(fused_layers.kernels() is None, reason="no C++ compiler here")


def _check_grads(fn, ref, inputs, *, rtol=1e-5):
    """fn(*inputs) (float32 kernels) against ref(*inputs in float64): values and input gradients."""
    torch.manual_seed(0)
    xs = [x.detach().float().requires_grad_(x.requires_grad) for x in inputs]
    ys = [x.detach().double().requires_grad_(x.requires_grad) for x in inputs]
    out, want = fn(*xs), ref(*ys)
    g = torch.randn(out.shape, dtype=torch.float64)
    (out * g.float()).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(out.double(), want, rtol=rtol, atol=rtol * float(want.detach().abs().max()))
    for x, y in zip(xs, ys):
        if y.requires_grad:
            torch.testing.assert_close(x.grad.double(), y.grad, rtol=rtol, atol=rtol * float(y.grad.abs().max()))


class _Norm(torch.nn.Module):
    def __init__(self, weight, eps):
        super().__init__()
        self.weight, self.variance_epsilon = weight, eps


def test_rms_norm_forward_and_backward_are_the_formula():
    x = torch.randn(3, 70, 40, dtype=torch.float64, requires_grad=True)  # 210 rows: several row chunks
    w = torch.randn(40, dtype=torch.float64, requires_grad=True)

    def ref(x, w):
        return w * x * (x.pow(2).mean(-1, keepdim=True) + 1e-6).rsqrt()

    _check_grads(lambda x, w: fused_layers.rms_norm(x, _Norm(w, 1e-6)), ref, [x, w])
    row = torch.tensor([[3.0, 4.0]])  # by hand: rms = sqrt((9 + 16) / 2), y = x / rms
    y = fused_layers.rms_norm(row, _Norm(torch.ones(2), 0.0))
    torch.testing.assert_close(y, row / (12.5 ** 0.5))


def test_rotary_forward_and_backward_are_the_formula():
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64, requires_grad=True)
    angle = torch.randn(2, 5, 4, dtype=torch.float64)
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)

    def ref(x, cos, sin):
        half = torch.cat((-x[..., 4:], x[..., :4]), dim=-1)
        return x * cos.unsqueeze(2) + half * sin.unsqueeze(2)

    _check_grads(fused_layers.rotary, ref, [x, cos, sin])
    v = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 4)  # pairs (x0, x2), (x1, x3); a quarter turn of the
    cos, sin = torch.tensor([[[0.0, 1.0, 0.0, 1.0]]]), torch.tensor([[[1.0, 0.0, 1.0, 0.0]]])  # first: (1, 0) -> (0, 1)
    torch.testing.assert_close(fused_layers.rotary(v, cos, sin).flatten(), torch.tensor([0.0, 0.0, 1.0, 0.0]))


def test_swiglu_forward_and_backward_are_the_formula_including_large_inputs():
    gate = torch.cat([torch.randn(1000, dtype=torch.float64) * 4, torch.tensor([-100.0, 100.0, 0.0],
                                                                               dtype=torch.float64)])
    up = torch.randn(1003, dtype=torch.float64)
    _check_grads(fused_layers.swiglu, lambda a, b: F.silu(a) * b, [gate.requires_grad_(), up.requires_grad_()])


def _arch_models():
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(vocab_size=90, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, eos_token_id=1, pad_token_id=0, bos_token_id=None,
                  max_position_embeddings=128)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**common)).eval()
    qwen3 = Qwen3ForCausalLM(Qwen3Config(head_dim=8, **common)).eval()
    qwen2_gqa, _ = build_tiny_random(seed=1, hidden_size=32, num_heads=4, num_kv_heads=2)
    return {"llama": llama, "qwen3": qwen3, "qwen2-gqa": qwen2_gqa}


def _batch(seed=0, rows=6, p=7, t=9, vocab=90):
    """Left-padded prompts (three groups of two rows) and right-padded responses."""
    g = torch.Generator().manual_seed(seed)
    pmask = torch.ones(rows, p, dtype=torch.long)
    for i in range(rows):
        pmask[i, : (i // 2) * 2] = 0
    pid = torch.randint(3, vocab, (rows // 2, p), generator=g).repeat_interleave(2, 0) * pmask
    resp = torch.randint(3, vocab, (rows, t), generator=g)
    rmask = torch.ones_like(resp)
    rmask[1, 4:] = 0
    rmask[4, 1:] = 0
    return pid, pmask, resp, rmask


def _scored(model, score, batch):
    model.zero_grad(set_to_none=True)
    lp, ent = score(model, *batch, return_entropy=True)
    (lp.pow(2).sum() + lp.sum() + ent.sum()).backward()
    return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2-gqa"])
@pytest.mark.parametrize("score", [sequence_logprobs, grouped_sequence_logprobs], ids=["padded", "shared"])
def test_the_fused_backbone_equals_the_transformers_one(arch, score):
    """Log-probs, entropies and every parameter's gradient: padded pass and shared prompt (its cache)."""
    model = _arch_models()[arch]
    batch = _batch()
    ref_lp, ref_grads = _scored(model, score, batch)
    assert fused_layers.enable(model) is None
    try:
        assert isinstance(split_causal_lm(model).backbone, fused_layers.FusedBackbone)
        lp, grads = _scored(model, score, batch)
    finally:
        fused_layers.disable(model)
    assert not isinstance(split_causal_lm(model).backbone, fused_layers.FusedBackbone)
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
    assert (lp[batch[3] == 0] == 0).all()
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()), msg=name)


def test_the_fused_backbone_without_its_kernels_is_the_transformers_forward_bit_for_bit(monkeypatch):
    """The same forward with torch operators in place of the three kernels equals transformers exactly: the
    difference is the kernels' float rounding and nothing else (masking, positions, cache, GQA)."""
    model = _arch_models()["qwen2-gqa"]
    batch = _batch(seed=1)
    ref, _ = grouped_sequence_logprobs(model, *batch)

    def norm(x, module):
        eps = module.variance_epsilon
        return module.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rot(x, cos, sin):
        half = x.shape[-1] // 2
        return x * cos.unsqueeze(2) + torch.cat((-x[..., half:], x[..., :half]), -1) * sin.unsqueeze(2)

    monkeypatch.setattr(fused_layers, "rms_norm", norm)
    monkeypatch.setattr(fused_layers, "rotary", rot)
    monkeypatch.setattr(fused_layers, "swiglu", lambda a, b: F.silu(a) * b)
    fused_layers.enable(model)
    try:
        lp, _ = grouped_sequence_logprobs(model, *batch)
    finally:
        fused_layers.disable(model)
    assert torch.equal(lp, ref)


def test_training_with_fused_layers_equals_training_without(tmp_path, tiny_random_dir):
    """Two GRPO steps with the shared prompt, fused layers off and on, and with LoRA: the same parameters to float
    rounding (AdamW's eps raised as in tests/test_shared_prompt.py)."""
    from safetensors.torch import load_file
    from test_trainer import SMALL

    from tokenmdp.train.config import load_config
    from tokenmdp.train.trainer import train

    finals = {}
    for lora in (False, True):
        for fused in (False, True):
            out = tmp_path / f"{lora}-{fused}"
            extra = ["model.lora.enabled=true", "model.lora.rank=4", "optim.lr=1e-2"] if lora else []
            cfg = load_config(None, [f"model.path={tiny_random_dir}", "algo.name=grpo", f"run.out={out}", *SMALL,
                                     "optim.micro_batch_size=3", "optim.eps=1e-3", "optim.shared_prompt=true",
                                     f"optim.fused_layers={str(fused).lower()}", *extra])
            run = train(cfg, progress=False)
            name = "adapter_model.safetensors" if lora else "model.safetensors"
            finals[lora, fused] = load_file(str(run / "final" / name))
    for lora in (False, True):
        a, b = finals[lora, False], finals[lora, True]
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    start = load_file(str(tiny_random_dir / "model.safetensors"))
    assert any(not torch.equal(finals[False, True][k], start[k]) for k in start)


def test_settings_fused_layers_cannot_serve_are_refused_by_name(tmp_path, tiny_random_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tokenmdp.train.config import load_config

    base = [f"model.path={tiny_random_dir}", "algo.name=grpo", f"run.out={tmp_path / 'r'}", "optim.fused_layers=true"]
    for extra, named in (("model.dtype=bfloat16", "model.dtype"), ("run.mixed_precision=bf16", "mixed_precision"),
                         ("model.gradient_checkpointing=true", "gradient_checkpointing")):
        with pytest.raises(TokenMDPError, match=f"optim.fused_layers.*{named}"):
            load_config(None, [*base, extra])
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    assert "not a Llama-family" in fused_layers.enable(gpt2)
    assert fused_layers.fused_backbone(gpt2) is None
