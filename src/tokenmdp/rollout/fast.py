"""The `fast` engine: the project's own sampling loop over a preallocated key-value cache.

One prefill of the left-padded prompts, then one decode step per token (see
:mod:`tokenmdp.rollout.kv_decoder`), with temperature, top-k and top-p applied in torch, the log-prob of each
sampled token computed in the loop, each row stopped at its first EOS, finished rows dropped from the batch once a
quarter of it has finished (``compact_fraction``), and an early exit when every row is done. Everything runs under
``torch.inference_mode`` with a private ``torch.Generator`` (the global RNG is never touched).

Log-probs are those of the sampled tokens under ``logits / temperature`` without top-k/top-p renormalisation
(greedy, temperature 0: under the untempered logits), the quantity that
:func:`tokenmdp.policy.logprobs.sequence_logprobs` recomputes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tokenmdp.errors import TokenMDPError
from tokenmdp.rollout.types import (
    Engine,
    Rollout,
    build_rollout,
    check_sampling,
    encode_prompts,
    eos_token_ids,
    pad_token_id,
)
from tokenmdp.rollout.kv_decoder import kv_cache_dtype_of, make_decoder


def filter_logits(z: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf the logits outside the top-k set, then outside the nucleus of mass ``top_p``.

    The nucleus keeps, in decreasing probability, every token whose preceding mass is below ``top_p``: with
    probabilities ``[0.5, 0.3, 0.2]`` and ``top_p=0.6``, tokens 0 and 1 are kept (mass before them 0 and 0.5), token
    2 is dropped (0.8 >= 0.6). At least one token is always kept. ``z`` is (B, V).
    """
    if top_k > 0 and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        before = probs.cumsum(dim=-1) - probs
        drop = before >= top_p
        drop[:, 0] = False
        z = z.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return z


def sample_next(logits: torch.Tensor, *, temperature: float, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of ``logits`` (B, V); return (tokens (B,), log-probs (B,) float32).

    The log-prob is ``z[y] - logsumexp(z)`` with ``z = logits / temperature`` (no top-k/top-p renormalisation);
    temperature 0 takes the argmax and scores it under the untempered logits.
    """
    z = logits.float()
    if temperature == 0:
        tokens = z.argmax(dim=-1)
    else:
        z = z / temperature
        # inverse-CDF sampling: one uniform number per row (a zero-probability token is never picked)
        cdf = torch.softmax(filter_logits(z, top_k=top_k, top_p=top_p), dim=-1).cumsum(dim=-1)
        u = torch.rand(z.shape[0], 1, generator=generator, device=z.device, dtype=cdf.dtype) * cdf[:, -1:]
        tokens = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=z.shape[-1] - 1)
    logp = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)
    return tokens, logp


class FastEngine(Engine):
    """Rollouts through the project's own decode loop.

    Parameters
    ----------
    model, tokenizer : a transformers causal LM and its tokenizer.
    decoder : "auto" (the own key-value decoder for Llama-family models, else the transformers forward), "kv" or
        "hf".
    compact_fraction : drop finished rows from the batch once this fraction of it has finished (1 = never).
    fuse_weights : concatenate q/k/v and gate/up weights for the own decoder (default: up to 1e9 parameters).
    fused_attention : the own decoder's compiled decode step (rotary, cache writes, attention, SwiGLU;
        :mod:`tokenmdp.rollout.fused`, float32 on the CPU; ``rollout.engine_options={fused_attention: true}``):
        about 1.5x on the tiny model's rollouts, the same log-probs to float rounding (so seeded runs differ from
        the default's); off by default.
    quantize : "int8": the own decoder's linear layers run as int8 copies of the weights (fbgemm, CPU;
        :func:`tokenmdp.rollout.fused.int8_linear`), 3-7x float32 at SmolLM2's decode shapes. The samples then
        come from a policy a little off the trained one, and their log-probs are the int8 model's: train with
        ``rollout.recompute_logprobs=true``, which recomputes pi_old in float32 and weights the mismatch by
        truncated importance sampling (the recipe of 8-bit rollouts in FlashRL). Off by default.
    kv_cache_dtype : "float16" stores the generated keys and values in float16 for the fused decode step (as
        vLLM's ``kv_cache_dtype``; needs ``fused_attention``): half the bytes it reads at every step, with keys and
        values rounded to 11 significant bits, so its log-probs differ from float32's (about 5e-6 nats on average
        on the tiny model, 1e-2 at the most; train with ``rollout.recompute_logprobs=true``, as for int8). "auto"
        (default): the model's own type.
    eos_token_id, add_special_tokens : as for the `hf` engine.
    """

    name = "fast"

    def __init__(self, model: torch.nn.Module, tokenizer, *, decoder: str = "auto", compact_fraction: float = 0.25,
                 fuse_weights: bool | None = None, fused_attention: bool = False, quantize: str | None = None,
                 kv_cache_dtype: str = "auto", eos_token_id: int | Sequence[int] | None = None,
                 add_special_tokens: bool | None = None):
        if decoder not in ("auto", "kv", "hf"):
            raise TokenMDPError(f"decoder must be 'auto', 'kv' or 'hf', got {decoder!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.decoder = decoder
        self.compact_fraction = float(compact_fraction)
        self.fuse_weights = fuse_weights
        self.fused_attention = bool(fused_attention)
        if quantize not in (None, "int8"):
            raise TokenMDPError(f"quantize must be None or 'int8', got {quantize!r}")
        self.quantize = quantize
        kv_cache_dtype_of(kv_cache_dtype, self.fused_attention)  # refused here, not at the first generate
        self.kv_cache_dtype = kv_cache_dtype
        self.eos_ids = eos_token_ids(model, tokenizer, eos_token_id)
        self.pad_id = pad_token_id(tokenizer)
        self.add_special_tokens = add_special_tokens

    def _generator(self, device: torch.device, seed: int | None) -> torch.Generator:
        gen = torch.Generator(device=device)
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(int(seed))
        return gen

    @torch.inference_mode()
    def generate(self, prompts: list[str], *, n: int = 1, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None) -> Rollout:
        check_sampling(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
        device = next(self.model.parameters()).device
        ids, mask = encode_prompts(self.tokenizer, prompts, n=1, device=device,
                                   add_special_tokens=self.add_special_tokens)
        response, logprobs = self.sample_ids(ids, mask, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                                             top_p=top_p, top_k=top_k, seed=seed)
        ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
        return build_rollout(self.tokenizer, prompts, n, ids, mask, response, logprobs, self.eos_ids)

    @torch.inference_mode()
    def sample_ids(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, n: int = 1, max_new_tokens: int,
                   temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                   stop_ids: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample from left-padded token ids (the multi-turn driver's turns): raw ids and log-probs (B * n,
        steps); each row stops at its first EOS or ``stop_ids`` token (columns after it are not meaningful)."""
        check_sampling(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            return self._loop(prompt_ids.to(device), prompt_mask.to(device), n, max_new_tokens,
                              self._generator(device, seed),
                              dict(temperature=temperature, top_k=int(top_k), top_p=float(top_p)),
                              stops=list(self.eos_ids) + [int(s) for s in stop_ids if int(s) not in self.eos_ids])
        finally:
            self.model.train(was_training)

    def _loop(self, ids: torch.Tensor, mask: torch.Tensor, n: int, max_new: int, gen: torch.Generator,
              sampling: dict, stops: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill the distinct prompts, decode n samples each; response ids (B, steps) and log-probs (B, steps)."""
        device = ids.device
        batch = ids.shape[0] * n
        dec = make_decoder(self.model, self.decoder, fuse=self.fuse_weights, fused_attention=self.fused_attention,
                           quantize=self.quantize, kv_cache_dtype=self.kv_cache_dtype)
        logits = dec.prefill(ids, mask, n, max_new)
        out_ids = torch.full((batch, max_new), self.pad_id, dtype=torch.long, device=device)
        out_lp = torch.zeros(batch, max_new, dtype=torch.float32, device=device)
        rows = torch.arange(batch, device=device)  # original row of each live batch row
        alive = torch.ones(batch, dtype=torch.bool, device=device)
        pos = mask.sum(1).repeat_interleave(n)  # position id of the next token
        eos = torch.tensor(self.eos_ids if stops is None else list(stops), device=device)
        steps = 0
        for t in range(max_new):
            tokens, logp = sample_next(logits, generator=gen, **sampling)
            live = rows[alive]
            out_ids[live, t] = tokens[alive]
            out_lp[live, t] = logp[alive]
            alive = alive & ~torch.isin(tokens, eos)
            steps = t + 1
            n_alive = int(alive.sum())
            if n_alive == 0 or steps == max_new:
                break
            if dec.can_select and len(alive) - n_alive >= max(1.0, self.compact_fraction * len(alive)):
                keep = alive.nonzero().squeeze(1)
                dec.select(keep)
                rows, tokens, pos, alive = rows[keep], tokens[keep], pos[keep], alive[keep]
            logits = dec.step(tokens, pos, t)
            pos = pos + 1
        return out_ids[:, :steps], out_lp[:, :steps]


__all__ = ["FastEngine", "sample_next", "filter_logits"]
