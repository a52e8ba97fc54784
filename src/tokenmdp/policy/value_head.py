"""A critic for PPO: a causal-LM backbone with a scalar value head.

``V(s_t)`` of the token-MDP state ``s_t = (x, y_<t)`` is read off the backbone's last hidden state at the last
token of ``s_t`` (the same position whose logits give ``pi(. | s_t)``):

    values[b, t] = w . h[b, pred(t)] + c,

``h`` the backbone's final hidden states (B, L, H), ``pred(t)`` the last unmasked column before response token
``t``, ``w`` (H,) and ``c`` the head's weight and bias (computed in float32). Zeros where ``response_mask`` is 0.

Saved folders hold the backbone in Hugging Face format (``config.json`` + safetensors) plus
``value_head.safetensors``; :meth:`ValueModel.from_pretrained` reads them back and
:meth:`ValueModel.from_policy` starts a critic from a policy folder (the LM head is dropped, the value head is new).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tokenmdp.errors import TokenMDPError
from tokenmdp.policy.logprobs import position_ids_from_mask, predictor_index
from tokenmdp.policy.shared_prompt import backbone_support, shared_prompt_states, warn_fallback

HEAD_FILE = "value_head.safetensors"


class ValueModel(nn.Module):
    """Backbone (e.g. ``Qwen2Model``) + ``nn.Linear(H, 1)`` value head.

    The head's weight starts ~ N(0, 1 / (H + 1)^2) and its bias at 0, so initial values are small but the backbone
    receives gradients from the first step.
    """

    def __init__(self, backbone: nn.Module, *, seed: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        hidden = self.config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden, 1, dtype=torch.float32)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            self.value_head.weight.copy_(torch.randn(1, hidden, generator=gen) / (hidden + 1))
            self.value_head.bias.zero_()

    # construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Any, *, seed: int | None = None) -> ValueModel:
        """A randomly initialised critic of architecture ``config`` (a transformers config)."""
        from transformers import AutoModel

        return cls(AutoModel.from_config(config), seed=seed)

    @classmethod
    def from_policy(cls, policy: str | os.PathLike | nn.Module, *, dtype: str = "float32",
                    seed: int | None = None, gguf_file: str | None = None) -> ValueModel:
        """A critic whose backbone is a copy of a causal LM's (a folder, a ``.gguf`` file, a folder and its
        ``gguf_file``, or an in-memory model), with a new value head."""
        import copy

        from transformers import AutoModel

        if isinstance(policy, nn.Module):
            backbone = copy.deepcopy(getattr(policy, policy.base_model_prefix))
            return cls(backbone, seed=seed)
        from tokenmdp.policy.model import DTYPES, resolve_source

        source, gguf, _ = resolve_source(policy, gguf_file)
        try:
            backbone = AutoModel.from_pretrained(source, dtype=DTYPES.get(dtype, torch.float32), gguf_file=gguf)
        except (OSError, ValueError) as exc:
            raise TokenMDPError(f"cannot load a critic backbone from {os.fspath(policy)}: {exc}") from exc
        return cls(backbone, seed=seed)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: str = "float32") -> ValueModel:
        """Load a critic saved by :meth:`save_pretrained`."""
        from transformers import AutoModel

        from tokenmdp.policy.model import DTYPES

        folder = Path(path)
        head_file = folder / HEAD_FILE
        if not (folder / "config.json").is_file():
            raise TokenMDPError(f"{folder} is not a saved critic (no config.json)")
        if not head_file.is_file():
            raise TokenMDPError(f"{folder} has no {HEAD_FILE}: not a saved critic (use ValueModel.from_policy)")
        model = cls(AutoModel.from_pretrained(str(folder), dtype=DTYPES.get(dtype, torch.float32)))
        state = load_file(str(head_file))
        model.value_head.load_state_dict({k.removeprefix("value_head."): v for k, v in state.items()})
        return model

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write the backbone (Hugging Face format, safetensors) and ``value_head.safetensors`` into ``path``."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(str(folder))
        save_file({f"value_head.{k}": v.detach().contiguous().cpu() for k, v in self.value_head.state_dict().items()},
                  str(folder / HEAD_FILE))
        return folder

    # computation --------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Value of the state ending at each column: (B, L) float32 (position ids from the mask by default)."""
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state
        return self.value_head(hidden.float()).squeeze(-1)

    def values(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
               response_mask: torch.Tensor, *, shared_prompt: bool = False,
               context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """V(s_t) of the state before each response token: (B, T) float32, zeros where ``response_mask`` is 0.

        ``shared_prompt``: run each distinct prompt row once and the responses on its KV cache
        (:mod:`tokenmdp.policy.shared_prompt`; the same values and gradients up to float summation order); a
        backbone that cannot falls back to the padded pass, with one warning. ``context_mask``: the response's
        attention mask when it differs from ``response_mask`` (a multi-turn episode's observation tokens).
        """
        if shared_prompt and prompt_ids.shape[1] and response_ids.shape[1]:
            kwarg, why = backbone_support(self.backbone)
            if kwarg is not None:
                hidden, (rows, cols) = shared_prompt_states(self.backbone, kwarg, prompt_ids, prompt_mask,
                                                            response_ids, response_mask, context_mask)
                out = torch.zeros(response_ids.shape, dtype=torch.float32, device=response_ids.device)
                return out.index_put((rows, cols), self.value_head(hidden.float()).squeeze(-1))
            warn_fallback(self, why)
        ids = torch.cat([prompt_ids, response_ids], dim=1)
        attn = torch.cat([prompt_mask, response_mask if context_mask is None else context_mask], dim=1).long()
        per_col = self.forward(ids, attn)
        pred = predictor_index(attn, prompt_ids.shape[1])
        out = per_col.gather(1, pred.clamp(min=0))
        return out * (response_mask.bool() & (pred >= 0))

__all__ = ["ValueModel", "HEAD_FILE"]
