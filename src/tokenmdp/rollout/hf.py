"""The `hf` engine: sampling with transformers' ``model.generate``.

Log-probabilities are recorded inside ``generate`` by a logits processor placed before top-k/top-p: at each step
it stores ``log_softmax(logits / temperature)`` and, at the next step (or after the loop, for the last one),
gathers the entry of the token that was actually sampled. So the returned ``logprobs`` are those of the sampled
tokens under ``logits / temperature`` *without* top-k/top-p renormalisation, the quantity that a teacher-forced
:func:`tokenmdp.policy.logprobs.sequence_logprobs` recomputes. Only one ``(B, V)`` float32 tensor is kept at a
time. The model's own generation config (repetition penalty, default top-k of a hub model ...) is not applied:
sampling follows only the arguments of :meth:`HFEngine.generate`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from tokenmdp.rollout.types import (
    Engine,
    Rollout,
    build_rollout,
    check_sampling,
    encode_prompts,
    eos_token_ids,
    pad_token_id,
)


class LogprobRecorder(LogitsProcessor):
    """Scales logits by ``1 / temperature`` and records the log-prob of each sampled token (see module doc)."""

    def __init__(self, temperature: float, prompt_len: int):
        self.temperature = temperature if temperature > 0 else 1.0
        self.prompt_len = prompt_len
        self.prev: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def _gather_prev(self, tokens: torch.Tensor) -> None:
        if self.prev is not None:
            self.steps.append(self.prev.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] > self.prompt_len:
            self._gather_prev(input_ids[:, -1])
        scaled = scores.float() / self.temperature
        self.prev = torch.log_softmax(scaled, dim=-1)
        return scaled

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """Gather the last step and return (B, T) log-probs for ``sequences[:, prompt_len:]``."""
        if sequences.shape[1] > self.prompt_len:
            self._gather_prev(sequences[:, -1])
        self.prev = None
        if not self.steps:
            return torch.zeros(sequences.shape[0], 0)
        return torch.stack(self.steps, dim=1)


class HFEngine(Engine):
    """Rollouts through ``model.generate``.

    Parameters
    ----------
    model, tokenizer : a transformers causal LM and its tokenizer.
    eos_token_id : id or ids that end an episode (default: the model's generation config, then the tokenizer).
    add_special_tokens : passed to the tokenizer (default: add them unless the prompt starts with the BOS text).
    """

    name = "hf"

    def __init__(self, model: torch.nn.Module, tokenizer, *, eos_token_id: int | Sequence[int] | None = None,
                 add_special_tokens: bool | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = eos_token_ids(model, tokenizer, eos_token_id)
        self.pad_id = pad_token_id(tokenizer)
        self.add_special_tokens = add_special_tokens

    def _config(self, max_new_tokens: int, greedy: bool, stops: list[int] | None = None) -> GenerationConfig:
        # top_k=0 turns off transformers' global default top_k=50; greedy leaves the sampling flags unset
        sampling = {} if greedy else {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=not greedy,
            **sampling,
            num_beams=1,
            repetition_penalty=1.0,
            eos_token_id=self.eos_ids if stops is None else stops,
            pad_token_id=self.pad_id,
            bos_token_id=None,
            use_cache=True,
        )

    @torch.inference_mode()
    def generate(self, prompts: list[str], *, n: int = 1, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None) -> Rollout:
        check_sampling(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
        device = next(self.model.parameters()).device
        ids, mask = encode_prompts(self.tokenizer, prompts, n=n, device=device,
                                   add_special_tokens=self.add_special_tokens)
        response, logprobs = self._sample(ids, mask, max_new_tokens, temperature, top_p, top_k, seed, self.eos_ids)
        return build_rollout(self.tokenizer, prompts, n, ids, mask, response, logprobs, self.eos_ids)

    @torch.inference_mode()
    def sample_ids(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, n: int = 1, max_new_tokens: int,
                   temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                   stop_ids: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample from left-padded token ids (the multi-turn driver's turns): raw ids and log-probs (B * n,
        steps); each row stops at its first EOS or ``stop_ids`` token (columns after it are not meaningful)."""
        check_sampling(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
        device = next(self.model.parameters()).device
        ids, mask = prompt_ids.to(device), prompt_mask.to(device)
        if n > 1:
            ids, mask = ids.repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0)
        stops = list(self.eos_ids) + [int(s) for s in stop_ids if int(s) not in self.eos_ids]
        return self._sample(ids, mask, max_new_tokens, temperature, top_p, top_k, seed, stops)

    def _sample(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, temperature: float, top_p: float,
                top_k: int, seed: int | None, stops: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``model.generate`` on prompt ids (B, P): response ids and their log-probs (B, steps)."""
        device = ids.device
        greedy = temperature == 0
        recorder = LogprobRecorder(temperature, ids.shape[1])
        procs = LogitsProcessorList([recorder])
        if not greedy and top_k > 0:
            procs.append(TopKLogitsWarper(top_k=int(top_k)))
        if not greedy and top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=float(top_p)))
        saved = self.model.generation_config
        self.model.generation_config = GenerationConfig(eos_token_id=self.eos_ids, pad_token_id=self.pad_id)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                if seed is not None:
                    torch.manual_seed(int(seed))
                else:
                    torch.seed()
                seqs = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    generation_config=self._config(max_new_tokens, greedy, stops),
                    logits_processor=procs,
                )
        finally:
            self.model.generation_config = saved
            self.model.train(was_training)
        return seqs[:, ids.shape[1]:], recorder.finish(seqs).to(device)


__all__ = ["HFEngine", "LogprobRecorder"]
