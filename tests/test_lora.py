"""LoRA through peft on a locally built tiny Qwen2: every preset trains the adapter alone (the base weights are
bitwise unchanged, PPO's critic included); the reference of a KL term is the base (the adapter disabled) and equals
a separate frozen copy; a fresh adapter computes exactly what the base does; checkpoints and final/ hold the adapter
only, `tokenmdp merge` writes a full model equal to base + (alpha / r) B A; --resume is exact; the own KV decoder
samples with the adapter; bad input is one clear error each."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import tests.test_trainer  # noqa: F401  (registers the parity task)
from tokenmdp.algos.presets import PRESETS
from tokenmdp.cli import main
from tokenmdp.errors import TokenMDPError
from tokenmdp.policy.adapters import add_lora, inject_lora, load_adapter, merge_adapter
from tokenmdp.policy.logprobs import sequence_logprobs
from tokenmdp.policy.model import load_policy
from tokenmdp.rollout import get_engine
from tokenmdp.train.config import load_config
from tokenmdp.train.trainer import train

SMALL = ["task.name=parity", "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=6",
         "run.steps=2", "run.save_every=0", "optim.lr=1e-2", "run.threads=1", "model.lora.enabled=true",
         "model.lora.rank=4", "model.lora.alpha=8"]


def _cfg(tmp_path, model_dir, algo, *extra, name=None):
    out = tmp_path / (name or algo)
    return load_config(None, [f"model.path={model_dir}", f"algo.name={algo}", f"run.out={out}", *SMALL, *extra])


class Keep:
    """A callback that keeps the run's live components (to look at the model after training)."""

    def __init__(self):
        self.c = None

    def on_step(self, step, record, learner):
        self.c = learner


@pytest.mark.parametrize("algo", list(PRESETS))
def test_every_preset_trains_the_adapter_only(tmp_path, tiny_random_dir, algo):
    extra = ["algo.overlong_buffer=2"] if PRESETS[algo].overlong_buffer else []
    keep = Keep()
    run = train(_cfg(tmp_path, tiny_random_dir, algo, *extra), progress=False, callbacks=[keep])
    c = keep.c
    assert c.adapter is not None and c.ref_model is None  # no second model for the reference
    base = load_file(str(tiny_random_dir / "model.safetensors"))
    live = c.model.state_dict()
    frozen = {k.replace(".base_layer", ""): v for k, v in live.items() if "lora_" not in k}
    assert set(base) <= set(frozen)
    assert all(torch.equal(base[k], frozen[k]) for k in base), "a base weight moved"
    lora_b = {k: v for k, v in live.items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values()), f"{algo}: an adapter matrix B stayed zero"
    assert not (run / "final" / "model.safetensors").exists()
    assert (run / "final" / "adapter_model.safetensors").is_file()
    saved = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    if c.critic is not None:  # PPO: the critic's backbone is frozen too; its adapter and value head trained
        trained = {n for n, p in c.critic.named_parameters() if p.requires_grad}
        assert trained and all("lora_" in n or n.startswith("value_head") for n in trained)
        crit = torch.load(run / "checkpoints" / "step-2" / "critic.pt")
        assert set(crit) == trained
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2


def test_fresh_adapter_is_the_base_and_disabled_adapter_is_the_reference(tiny_random_dir):
    policy = load_policy(tiny_random_dir)
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    resp = torch.tensor([[9, 10, 11]])
    rmask = torch.ones_like(resp)
    before, _ = sequence_logprobs(policy.model, ids, mask, resp, rmask)
    peft_model = add_lora(policy.model, rank=4, alpha=8, seed=3)
    inner = peft_model.get_base_model()
    fresh, _ = sequence_logprobs(inner, ids, mask, resp, rmask)
    assert torch.equal(before, fresh)  # B = 0: exactly the base
    with torch.no_grad():
        for name, p in inner.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    moved, _ = sequence_logprobs(inner, ids, mask, resp, rmask)
    assert (moved - before).abs().max() > 1e-4
    with peft_model.disable_adapter():
        ref, _ = sequence_logprobs(inner, ids, mask, resp, rmask)
    assert torch.equal(ref, before)
    again = add_lora(load_policy(tiny_random_dir).model, rank=4, alpha=8, seed=3)  # same seed, same adapter
    a = {k: v for k, v in again.state_dict().items() if "lora_A" in k}
    b = {k: v for k, v in add_lora(load_policy(tiny_random_dir).model, rank=4, alpha=8, seed=3).state_dict().items()
         if "lora_A" in k}
    assert a and all(torch.equal(a[k], b[k]) for k in a)


def test_kl_reference_is_the_base(tmp_path, tiny_random_dir):
    """GRPO with a KL term: the logged KL to the reference at step 1 is 0 (the adapter starts at B = 0) and the
    reference log-probs are those of the base model."""
    run = train(_cfg(tmp_path, tiny_random_dir, "grpo", "algo.kl_coef=0.1"), progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kl_keys = [k for k in records[0] if "kl" in k and "ref" in k] or [k for k in records[0] if k.startswith("kl/")]
    assert kl_keys, sorted(records[0])
    assert all(abs(records[0][k]) < 1e-6 for k in kl_keys), {k: records[0][k] for k in kl_keys}
    # step 2 samples from the adapter moved by step 1: a reference that is the base, not the live policy, is now
    # apart from it (a trainer that took the adapted policy as its own reference would log 0 here)
    assert records[1]["update/rows"] > 0
    assert all(records[1][k] > 1e-6 for k in kl_keys), {k: records[1][k] for k in kl_keys}


def test_fast_engine_samples_with_the_adapter(tiny_random_dir):
    """The own KV decoder fuses q/k/v and gate/up weights: under LoRA it must fuse W + (alpha / r) B A, so its
    sampled log-probs equal the teacher-forced ones of the adapted model, and differ from the base's."""
    policy = load_policy(tiny_random_dir)
    peft_model = add_lora(policy.model, rank=4, alpha=8, seed=0)
    inner = peft_model.get_base_model()
    with torch.no_grad():
        for name, p in inner.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    for decoder in ("kv", "hf"):
        eng = get_engine("fast", inner, policy.tokenizer, decoder=decoder)
        ro = eng.generate(["n=12:", "n=7:"], n=2, max_new_tokens=5, temperature=1.0, seed=1)
        ref, _ = sequence_logprobs(inner, ro.prompt_ids, ro.prompt_mask, ro.response_ids, ro.response_mask)
        torch.testing.assert_close(ro.logprobs, ref, atol=1e-4, rtol=0)
        with peft_model.disable_adapter():
            base, _ = sequence_logprobs(inner, ro.prompt_ids, ro.prompt_mask, ro.response_ids, ro.response_mask)
        assert (base - ref).abs().max() > 1e-3


def test_resume_is_exact_and_merge_writes_the_full_model(tmp_path, tiny_random_dir):
    straight = train(_cfg(tmp_path, tiny_random_dir, "grpo", "run.steps=4", name="straight"), progress=False)
    split_cfg = _cfg(tmp_path, tiny_random_dir, "grpo", "run.steps=4", "run.save_every=2", name="split")
    with pytest.raises(KeyboardInterrupt):
        train(split_cfg, progress=False, callbacks=[_stop_after(3)])
    ckpt = split_cfg.run_dir() / "checkpoints" / "step-2" / "model"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    train(split_cfg, resume=True, progress=False)
    a = load_file(str(straight / "final" / "adapter_model.safetensors"))
    b = load_file(str(split_cfg.run_dir() / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    out = tmp_path / "merged"
    assert main(["merge", str(straight / "final"), "--out", str(out)]) == 0
    merged = load_policy(out)
    adapted = load_adapter(load_policy(tiny_random_dir).model, straight / "final", trainable=False)
    ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
    resp, rmask = torch.tensor([[8, 9]]), torch.ones(1, 2, dtype=torch.long)
    x, _ = sequence_logprobs(merged.model, ids, mask, resp, rmask)
    y, _ = sequence_logprobs(adapted.get_base_model(), ids, mask, resp, rmask)
    torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    assert main(["merge", str(straight / "final"), "--out", str(out)]) == 2  # never overwritten


def _stop_after(step):
    def stop(s, record, c):
        if s == step:
            raise KeyboardInterrupt

    return stop


def test_gradient_checkpointing_gives_the_same_run(tmp_path, tiny_random_dir):
    a = train(_cfg(tmp_path, tiny_random_dir, "grpo", name="plain"), progress=False)
    b = train(_cfg(tmp_path, tiny_random_dir, "grpo", "model.gradient_checkpointing=true", name="ckpt"),
              progress=False)
    x = load_file(str(a / "final" / "adapter_model.safetensors"))
    y = load_file(str(b / "final" / "adapter_model.safetensors"))
    assert all(torch.allclose(x[k], y[k], atol=1e-6, rtol=0) for k in x)


def test_full_fine_tuning_with_gradient_checkpointing_matches(tmp_path, tiny_random_dir):
    base = [f for f in SMALL if not f.startswith("model.lora")]
    cfg = lambda name, *e: load_config(None, [f"model.path={tiny_random_dir}", "algo.name=grpo",  # noqa: E731
                                              f"run.out={tmp_path / name}", *base, *e])
    a = train(cfg("plain"), progress=False)
    b = train(cfg("ckpt", "model.gradient_checkpointing=true"), progress=False)
    x, y = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    assert all(torch.allclose(x[k], y[k], atol=1e-6, rtol=0) for k in x)


# bad input ------------------------------------------------------------------------------------------------
def test_bad_lora_settings_are_one_error_each(tmp_path, tiny_random_dir):
    with pytest.raises(TokenMDPError, match="model.lora.rank.*at least 1"):
        _cfg(tmp_path, tiny_random_dir, "grpo", "model.lora.rank=0")
    with pytest.raises(TokenMDPError, match="model.lora.dropout"):
        _cfg(tmp_path, tiny_random_dir, "grpo", "model.lora.dropout=1.5")
    with pytest.raises(TokenMDPError, match="model.lora.target_modules"):
        _cfg(tmp_path, tiny_random_dir, "grpo", "model.lora.target_modules=[]")
    cfg = _cfg(tmp_path, tiny_random_dir, "grpo", "model.lora.target_modules=[q_proj,wq]", name="bad-targets")
    with pytest.raises(TokenMDPError, match=r"no linear layer named 'wq'.*q_proj"):
        train(cfg, progress=False)
    assert not cfg.run_dir().exists()  # nothing written


def test_adapter_where_a_model_is_expected_and_the_reverse(tmp_path, tiny_random_dir):
    run = train(_cfg(tmp_path, tiny_random_dir, "grpo"), progress=False)
    with pytest.raises(TokenMDPError, match="is a LoRA adapter, not a full model.*tokenmdp merge"):
        load_policy(run / "final")
    cfg = load_config(None, [f"model.path={run / 'final'}", "algo.name=grpo", f"run.out={tmp_path / 'x'}",
                             *SMALL])
    with pytest.raises(TokenMDPError, match="LoRA adapter"):
        train(cfg, progress=False)
    with pytest.raises(TokenMDPError, match="is a full model"):
        merge_adapter(tiny_random_dir, tmp_path / "m")
    with pytest.raises(TokenMDPError, match="a full model was given where an adapter is expected"):
        load_adapter(load_policy(tiny_random_dir).model, tiny_random_dir)


def test_inject_lora_freezes_all_but_the_adapter(tiny_random):
    model, _ = tiny_random
    import copy

    backbone = copy.deepcopy(model.model)
    inject_lora(backbone, rank=2, alpha=4, seed=0)
    trained = [n for n, p in backbone.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)


def test_checkpointing_recomputes_in_the_loss_forward_only(tiny_random_dir):
    """With model.gradient_checkpointing, a decoder layer runs twice for a loss (forward, then again in the
    backward) inside update_mode, once without gradients, and the gradients equal those without checkpointing."""
    from tokenmdp.train.learner import update_mode
    from tokenmdp.train.setup import enable_checkpointing

    ids, mask = torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.long)
    resp, rmask = torch.tensor([[9, 10]]), torch.ones(1, 2, dtype=torch.long)

    def run(checkpointing: bool):
        model = load_policy(tiny_random_dir).model
        if checkpointing:
            enable_checkpointing(model)
        calls = []
        model.model.layers[0].mlp.register_forward_pre_hook(lambda m, a, kw: calls.append(1), with_kwargs=True)
        with update_mode(model):
            lp, _ = sequence_logprobs(model, ids, mask, resp, rmask)
        lp.sum().backward()
        with torch.no_grad(), update_mode(model):
            sequence_logprobs(model, ids, mask, resp, rmask)
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        assert not model.training and not model.model.layers[0].training
        return len(calls), grads

    n_plain, g_plain = run(False)
    n_ckpt, g_ckpt = run(True)
    assert n_plain == 2  # one loss forward, one no-grad forward
    assert n_ckpt == 3  # the loss forward again in the backward
    assert all(torch.allclose(a, b, atol=1e-7, rtol=0) for a, b in zip(g_plain, g_ckpt))


def test_shared_prompt_update_with_lora_equals_the_padded_one(tmp_path, tiny_random_dir):
    """The prompt once per group (optim.shared_prompt) through LoRA layers: the same adapter as the padded update
    (AdamW's eps raised so that float noise in near-zero gradient elements cannot flip a step's sign)."""
    extra = ["optim.eps=1e-3", "optim.micro_batch_size=3"]
    a = train(_cfg(tmp_path, tiny_random_dir, "grpo", *extra, name="padded"), progress=False)
    b = train(_cfg(tmp_path, tiny_random_dir, "grpo", *extra, "optim.shared_prompt=true", name="shared"),
              progress=False)
    x = load_file(str(a / "final" / "adapter_model.safetensors"))
    y = load_file(str(b / "final" / "adapter_model.safetensors"))
    assert x.keys() == y.keys()
    assert all(torch.allclose(x[k], y[k], atol=1e-6, rtol=1e-5) for k in x)


def test_lora_dropout_with_checkpointing_is_refused_and_the_adapter_records_a_named_gguf(tmp_path, tiny_random_dir):
    with pytest.raises(TokenMDPError, match="model.lora.dropout.*gradient_checkpointing"):
        _cfg(tmp_path, tiny_random_dir, "grpo", "model.lora.dropout=0.1", "model.gradient_checkpointing=true")
    from tokenmdp.train.setup import Settings, _base_record

    cfg = _cfg(tmp_path, tiny_random_dir, "grpo", "model.gguf_file=smol.gguf")
    settings = Settings("/m/smol", {}, None, 8, None)
    assert _base_record(cfg, settings) == "/m/smol/smol.gguf"
    settings = Settings("/m/x.gguf", {}, None, 8, None)
    assert _base_record(_cfg(tmp_path, tiny_random_dir, "grpo"), settings) == "/m/x.gguf"
