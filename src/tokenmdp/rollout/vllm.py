"""The `vllm` engine (optional extra ``tokenmdp[vllm]``, needs a CUDA GPU).

Sampling runs in ``vllm.LLM``; the policy being trained stays an in-process transformers model. After each update
:meth:`VLLMEngine.sync_weights` copies its weights into vLLM's model (``load_weights``, through ``LLM.apply_model``,
which with vLLM's multiprocess V1 engine needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` or
``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and clears the prefix cache.

Log-probabilities: vLLM reports either raw log-probs (temperature 1) or processed ones (after temperature *and*
top-k/top-p renormalisation), neither of which is the project's contract (``log_softmax(logits / temperature)``
without renormalisation). So by default (``logprobs="recompute"``) the engine recomputes them teacher-forced with
:func:`tokenmdp.policy.logprobs.sequence_logprobs` on the in-process model, which is what the training loss sees
anyway; ``logprobs="vllm"`` keeps vLLM's processed values instead (exact when top-k and top-p are off; needs
vLLM >= 0.10.2 for ``logprobs_mode``).
"""

from __future__ import annotations

from typing import Any
from collections.abc import Sequence

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
    "the 'vllm' rollout engine needs the vllm package, which is not installed: "
    "pip install 'tokenmdp[vllm]' (vLLM needs a CUDA GPU); use engine 'fast' or 'hf' on a CPU"
)


def _import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise TokenMDPError(MISSING) from exc
    return vllm


class VLLMEngine(Engine):
    """Rollouts through ``vllm.LLM``.

    Parameters
    ----------
    model : the in-process policy (a transformers causal LM) or a model path / hub id.
    tokenizer : its tokenizer (prompts are tokenized here and passed to vLLM as token ids).
    logprobs : "recompute" (default; teacher-forced on ``model``) or "vllm".
    gpu_memory_utilization, dtype, llm_kwargs : passed to ``vllm.LLM``.
    """

    name = "vllm"

    def __init__(self, model: Any, tokenizer, *, logprobs: str = "recompute", gpu_memory_utilization: float = 0.4,
                 dtype: str = "auto", eos_token_id: int | Sequence[int] | None = None,
                 add_special_tokens: bool | None = None, **llm_kwargs: Any):
        self.vllm = _import_vllm()
        if logprobs not in ("recompute", "vllm"):
            raise TokenMDPError(f"logprobs must be 'recompute' or 'vllm', got {logprobs!r}")
        is_module = isinstance(model, torch.nn.Module)
        path = (getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)) if is_module \
            else str(model)
        if not path:
            raise TokenMDPError("the vllm engine needs a model saved to a folder (model.config._name_or_path is empty)")
        if logprobs == "recompute" and not is_module:
            raise TokenMDPError("logprobs='recompute' needs the in-process model, not a path; pass the model")
        self.model = model if is_module else None
        self.tokenizer = tokenizer
        self.logprobs_mode = logprobs
        self.eos_ids = eos_token_ids(model if is_module else torch.nn.Module(), tokenizer, eos_token_id)
        self.add_special_tokens = add_special_tokens
        if logprobs == "vllm":  # log-probs after temperature (vLLM >= 0.10.2); raw ones ignore the temperature
            llm_kwargs.setdefault("logprobs_mode", "processed_logprobs")
        self.llm = self.vllm.LLM(model=path, tokenizer=path, dtype=dtype,
                                 gpu_memory_utilization=gpu_memory_utilization, **llm_kwargs)
        if is_module:
            self.sync_weights(model)

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load ``model``'s current weights into the vLLM model and drop cached prefixes."""
        self.model = model
        state = {k: v.detach() for k, v in model.state_dict().items()}

        def load(vllm_model: Any) -> None:
            vllm_model.load_weights(weights=state.items())

        if hasattr(self.llm, "apply_model"):
            self.llm.apply_model(load)
        else:  # older vLLM (V0 engine)
            load(self.llm.llm_engine.model_executor.driver_worker.model_runner.model)
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()

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
            skip_special_tokens=True,
        )

    def generate(self, prompts: list[str], *, n: int = 1, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None) -> Rollout:
        check_sampling(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
        ids, mask = encode_prompts(self.tokenizer, prompts, n=1, add_special_tokens=self.add_special_tokens)
        requests = [{"prompt_token_ids": row[m.bool()].tolist()} for row, m in zip(ids, mask)]
        outs = self.llm.generate(requests, self._params(n, max_new_tokens, temperature, top_p, top_k, seed),
                                 use_tqdm=False)
        samples = [c for o in outs for c in o.outputs]  # request i, sample j -> row i * n + j
        resp = right_pad([list(c.token_ids) for c in samples], pad_token_id(self.tokenizer), dtype=torch.long)
        valid = right_pad([[1] * len(c.token_ids) for c in samples], 0, length=resp.shape[1], dtype=torch.long)
        if self.logprobs_mode == "vllm":
            lps = right_pad([[next(iter(d.values())).logprob if d else 0.0 for d in (c.logprobs or [])]
                             for c in samples], 0.0, length=resp.shape[1], dtype=torch.float32)
        else:
            lps = torch.zeros(resp.shape, dtype=torch.float32)
        ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
        rollout = build_rollout(self.tokenizer, prompts, n, ids, mask, resp, lps, self.eos_ids, valid)
        if self.logprobs_mode == "recompute":
            from tokenmdp.policy.logprobs import sequence_logprobs

            device = next(self.model.parameters()).device
            r = rollout.to(device)
            with torch.inference_mode():
                lp, _ = sequence_logprobs(self.model, r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask,
                                          temperature=temperature)
            rollout = Rollout(**{**r.__dict__, "logprobs": lp})
        return rollout


__all__ = ["VLLMEngine", "MISSING"]
