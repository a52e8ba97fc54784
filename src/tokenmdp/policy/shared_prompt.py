"""Teacher-forced log-probs with each distinct prompt run once: the responses of a group attend to its shared KV.

The ``G`` responses of a GRPO group share their prompt ``x``, and a causal model's prompt computation does not
see the response, so the keys and values of every layer at the prompt's columns are the same in the ``G`` rows.
:func:`grouped_sequence_logprobs` runs each distinct prompt row of the batch once (``U <= B`` rows, found by
:func:`prompt_groups`), repeats each layer's cached keys and values to the rows that share it,

    K_l[b] = K_l^prompt[u(b)],    V_l[b] = V_l^prompt[u(b)],

and runs the responses alone on top of them, with the attention mask ``[prompt_mask | response_mask]`` and the
position ids ``cumsum(mask) - 1`` of the full row (sliced to the response columns), exactly as the padded pass
:func:`tokenmdp.policy.logprobs.sequence_logprobs` would see them. The repeat is an ``index_select`` on the
autograd graph, so the backward sums the ``G`` rows' gradients into the prompt's keys and values and on into
the prompt pass: the log-probs and the parameter gradients are those of the padded pass up to float summation
order. The predictor of the first response token is the prompt's last unmasked column, read from the prompt
pass's hidden states.

The prompt pass costs ``U x P`` token positions instead of ``B x P``: with ``G`` samples per prompt, ``1 / G`` of
the prompt compute of the padded pass. In the update a :class:`PromptPass` runs the prompts of a whole chunk of
groups once and serves several response micro-batches, its gradient sent through once after the last of them, so
the micro-batches need not hold whole groups and can be cut by response length (little padding).

A model whose backbone takes no cache or position ids, whose layers are not all full attention (a sliding
window keeps only part of the prompt's cache), or that checkpoints its layers (transformers then turns the cache
off) falls back to the padded pass, with one warning per model class.
"""

from __future__ import annotations

import inspect
import warnings

import torch
from torch import nn

from tokenmdp.policy.logprobs import (
    counted_logprobs,
    position_ids_from_mask,
    predictor_index,
    sequence_logprobs,
    split_causal_lm,
)

#: Model classes already warned about falling back to the padded pass.
_WARNED: set[str] = set()


def prompt_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct prompt rows: ``(first (U,), inverse (B,))`` with ``first[u]`` the first row holding distinct
    prompt ``u`` and ``inverse[b]`` the distinct prompt of row ``b``. Two rows are the same prompt when their
    masks and their unmasked ids are equal (pad ids are ignored).

    ``ids [[7, 8], [0, 9], [7, 8]]``, masks ``[[1, 1], [0, 1], [1, 1]]`` -> first ``[1, 0]``, inverse
    ``[1, 0, 1]`` (distinct rows in sorted order).
    """
    batch = prompt_ids.shape[0]
    key = torch.cat([prompt_ids * prompt_mask, prompt_mask], dim=1)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    count = int(inverse.max()) + 1 if batch else 0
    rows = torch.arange(batch, device=prompt_ids.device)
    first = torch.full((count,), batch, dtype=torch.long, device=prompt_ids.device)
    first = first.scatter_reduce(0, inverse, rows, reduce="amin")
    return first, inverse


def cache_kwarg(backbone: nn.Module) -> str | None:
    """The name under which ``backbone.forward`` takes a KV cache (``cache`` in transformers >= 5.x,
    ``past_key_values`` before), or None when it takes no cache or no position ids."""
    try:
        params = inspect.signature(backbone.forward).parameters
    except (TypeError, ValueError):
        return None
    if "position_ids" not in params:
        return None
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def backbone_support(backbone: nn.Module) -> tuple[str | None, str]:
    """``(cache kwarg, "")`` when ``backbone`` can run the prompts once and the responses on their cache, else
    ``(None, why not)``."""
    kwarg = cache_kwarg(backbone)
    if kwarg is None:
        return None, f"the backbone {type(backbone).__name__} takes no KV cache and position ids"
    cfg = getattr(backbone, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        return None, f"its layers are not all full attention ({', '.join(sorted(kinds))})"
    if any(getattr(m, "gradient_checkpointing", False) is True for m in backbone.modules()):
        return None, "gradient checkpointing turns the KV cache off"
    return kwarg, ""


def warn_fallback(model: nn.Module, why: str) -> None:
    """Say once per model class that ``model`` is scored by the padded pass, and why."""
    name = type(model).__name__
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(f"optim.shared_prompt: {name} runs the padded forward pass instead ({why})",
                      RuntimeWarning, stacklevel=3)


def _new_cache(backbone: nn.Module):
    """An empty dynamic KV cache for ``backbone`` (a fresh one per forward: the graph holds its tensors)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=backbone.config)
    except TypeError:  # transformers 4.x before the config argument
        return DynamicCache()


def _cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's ``(keys, values)`` in a transformers KV cache (``layers`` from 5.x, ``key_cache`` before)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


class _Rows(torch.autograd.Function):
    """``x.index_select(0, rows)`` whose backward adds each row's gradient back with ``index_add_`` (torch's own
    backward of ``index_select`` scatters element by element: 1.7x slower on the strided gradient a KV cache's
    concatenation hands back, benchmarks/RESULTS.md)."""

    @staticmethod
    def forward(ctx, x, rows):
        ctx.save_for_backward(rows)
        ctx.shape = x.shape
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        return grad.new_zeros(ctx.shape).index_add_(0, rows, grad.contiguous()), None


class PromptPass:
    """The distinct prompts of some rows run through ``backbone`` once, for their responses to attend to.

    ``first`` and ``inverse`` are :func:`prompt_groups` of the rows; every layer's keys and values (``U`` rows) and
    the last hidden states stay here for :meth:`states` to hand to any response pass over these prompts.

    ``detach=True`` (the prompts of a whole chunk of rows, scored in several response micro-batches): the response
    passes see detached leaves, so each micro-batch's backward leaves the gradient of its keys, values and
    predictor states on them, summed over the micro-batches, and :meth:`backward` sends those sums through the
    prompt pass once. By the chain rule the parameter gradients are those of one graph through both passes: the
    padded pass's, up to float summation order. The response micro-batches need not hold whole groups then, and
    are cut by response length alone (less padding). ``detach=False``: one graph, nothing to send.
    """

    def __init__(self, backbone: nn.Module, kwarg: str, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *,
                 detach: bool = False):
        self.backbone, self.kwarg = backbone, kwarg
        self.first, self.inverse = prompt_groups(prompt_ids, prompt_mask)
        self.mask = prompt_mask[self.first].long()
        cache = _new_cache(backbone)
        out = backbone(input_ids=prompt_ids[self.first], attention_mask=self.mask,
                       position_ids=position_ids_from_mask(self.mask), use_cache=True, **{kwarg: cache})
        self._outputs = [t for kv in _cache_layers(cache) for t in kv] + [out.last_hidden_state]
        self._inputs = ([t.detach().requires_grad_(t.requires_grad) for t in self._outputs] if detach
                        else self._outputs)

    @property
    def tokens(self) -> int:
        """Token positions the prompt pass ran (distinct prompts x the longest)."""
        return self.mask.numel()

    def states(self, slots: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor,
               context_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Predictor hidden states ``(N, H)`` of the ``N`` counted response tokens, at ``(rows, cols)``, of
        responses whose rows hold the prompts ``slots`` (indices into the distinct prompts), counted as in
        ``sequence_logprobs`` (``context_mask``: the response's attention mask when it differs from
        ``response_mask``, a multi-turn episode)."""
        p_len = self.mask.shape[1]
        attn = torch.cat([self.mask[slots], response_mask if context_mask is None else context_mask], dim=1).long()
        positions = position_ids_from_mask(attn)
        *kv, prompt_hidden = self._inputs
        cache = _new_cache(self.backbone)
        for layer in range(len(kv) // 2):  # every layer's K, V: (U, heads, P, d) -> (B, heads, P, d), on the graph
            cache.update(_Rows.apply(kv[2 * layer], slots), _Rows.apply(kv[2 * layer + 1], slots), layer)
        resp_out = self.backbone(input_ids=response_ids, attention_mask=attn, position_ids=positions[:, p_len:],
                                 use_cache=True, **{self.kwarg: cache})
        pred = predictor_index(attn, p_len)
        rows, cols = (response_mask.bool() & (pred >= 0)).nonzero(as_tuple=True)
        src = pred[rows, cols]
        in_prompt = (src < p_len).unsqueeze(-1)
        from_prompt = prompt_hidden[slots[rows], src.clamp(max=p_len - 1)]
        from_response = resp_out.last_hidden_state[rows, (src - p_len).clamp(min=0)]
        return torch.where(in_prompt, from_prompt, from_response), (rows, cols)

    def backward(self) -> None:
        """Send the gradients the response passes left on the detached keys, values and states through the prompt
        pass (a no-op without ``detach`` or without gradients); the pass's tensors are released."""
        if self._inputs is not self._outputs:
            pairs = [(out, leaf.grad) for out, leaf in zip(self._outputs, self._inputs) if leaf.grad is not None]
            if pairs:
                torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
        self._outputs = self._inputs = []


def shared_prompt_states(
    backbone: nn.Module,
    kwarg: str,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    context_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Predictor hidden states ``(N, H)`` of the ``N`` counted response tokens, at ``(rows, cols)``, computed
    with each distinct prompt run once (the module docstring) on one graph; counted as in ``sequence_logprobs``
    (``context_mask``: the response's attention mask when it differs from ``response_mask``, a multi-turn
    episode)."""
    prompts = PromptPass(backbone, kwarg, prompt_ids, prompt_mask)
    return prompts.states(prompts.inverse, response_ids, response_mask, context_mask)


def grouped_sequence_logprobs(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    context_mask: torch.Tensor | None = None,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``sequence_logprobs`` with each distinct prompt row run through the backbone once.

    Same parameters and result as :func:`tokenmdp.policy.logprobs.sequence_logprobs`: ``(logprobs (B, T)
    float32, entropy (B, T) float32 or None)``, zeros where ``response_mask`` is 0, equal to the padded pass up to
    float summation order, in value and in gradient. Rows need no group index: rows whose prompt ids and mask are
    equal share one prompt pass (:func:`prompt_groups`). A model that cannot take the prompt's cache (the module
    docstring) is scored by the padded pass, with one warning per model class.
    """
    if temperature <= 0:
        temperature = 1.0
    try:
        parts = split_causal_lm(model)
        kwarg, why = backbone_support(parts.backbone)
    except TypeError as exc:
        kwarg, why = None, str(exc)
    if kwarg is None:
        warn_fallback(model, why)
        return sequence_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask,
                                 temperature=temperature, return_entropy=return_entropy, chunk_size=chunk_size,
                                 context_mask=context_mask, entropy_grad=entropy_grad)
    if response_ids.shape[1] == 0 or prompt_ids.shape[1] == 0:
        return sequence_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask,
                                 temperature=temperature, return_entropy=return_entropy, chunk_size=chunk_size,
                                 context_mask=context_mask, entropy_grad=entropy_grad)
    hidden, where = shared_prompt_states(parts.backbone, kwarg, prompt_ids, prompt_mask, response_ids, response_mask,
                                         context_mask)
    return counted_logprobs(hidden, where, response_ids, parts, temperature=temperature,
                            return_entropy=return_entropy, chunk_size=chunk_size, entropy_grad=entropy_grad)


__all__ = ["PromptPass", "backbone_support", "grouped_sequence_logprobs", "prompt_groups", "shared_prompt_states",
           "warn_fallback"]
