"""LoRA adapters through ``peft``: add one to a causal LM, reload one from a folder, merge one into a full model.

A LoRA adapter replaces a linear layer's weight ``W`` (out x in) by

    W' = W + (alpha / r) * B @ A,        A: (r, in), B: (out, r), B = 0 at the start,

so a fresh adapter leaves the model's outputs unchanged, and only ``A`` and ``B`` (``2 r (in + out)`` numbers per
layer) are trained. With the adapter disabled the model is exactly the base model again: the reference policy of
a KL penalty costs no second model in memory (:func:`adapter_disabled`).

A folder written by :func:`save_adapter` holds ``adapter_config.json`` and ``adapter_model.safetensors`` (peft's
format) but no ``config.json``; its ``base_model_name_or_path`` is the base model's folder, ``.gguf`` file or hub id,
so :func:`merge_adapter` (``tokenmdp merge``) can write the full model without being told the base again.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from tokenmdp.atomic import write_folder
from tokenmdp.errors import TokenMDPError
from tokenmdp.policy.model import ADAPTER_CONFIG, META_FILE, load_policy


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a peft adapter (``adapter_config.json``)."""
    return Path(path).is_dir() and (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | os.PathLike) -> str:
    """The base model an adapter folder was trained on (its ``base_model_name_or_path``)."""
    file = Path(path) / ADAPTER_CONFIG
    try:
        base = json.loads(file.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as exc:
        raise TokenMDPError(f"{file}: unreadable adapter config ({exc.__class__.__name__})") from None
    if not base:
        raise TokenMDPError(f"{file}: no base_model_name_or_path (which model is this adapter for?)")
    return str(base)


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers, the head excluded (what ``target_modules`` can name)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear) and mod is not head}
    return sorted(names)


def _check_targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[str] | str:
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return target_modules
        target_modules = [target_modules]
    targets = list(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise TokenMDPError("config field 'model.lora.target_modules' must be 'all-linear' or a list of module names")
    have = linear_module_names(model)
    missing = [t for t in targets if t not in have]
    if missing:
        raise TokenMDPError(f"config field 'model.lora.target_modules': {type(model).__name__} has no linear layer "
                            f"named {', '.join(map(repr, missing))}; its linear layers are: {', '.join(have)} (or "
                            "'all-linear')")
    return targets


def add_lora(model: nn.Module, *, rank: int, alpha: float, dropout: float = 0.0,
             target_modules: str | Sequence[str] = "all-linear", seed: int = 0, base: str | None = None):
    """Wrap ``model`` in a fresh LoRA adapter (a ``peft.PeftModel``); only the adapter's parameters train.

    ``A`` is initialised from ``seed`` in a forked RNG (the caller's random streams are untouched, and the same
    seed gives the same adapter); ``B`` is zero, so the wrapped model computes exactly what ``model`` did.
    ``base`` is recorded as the adapter's base model (default: the model's own ``name_or_path``).
    """
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise TokenMDPError(f"config field 'model.lora.rank' must be at least 1, got {rank}")
    if alpha <= 0:
        raise TokenMDPError(f"config field 'model.lora.alpha' must be positive, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise TokenMDPError(f"config field 'model.lora.dropout' must be in [0, 1), got {dropout}")
    targets = _check_targets(model, target_modules)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                     task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, cfg)
    if base is not None:
        peft_model.peft_config["default"].base_model_name_or_path = base
    return peft_model


def inject_lora(module: nn.Module, *, rank: int, alpha: float, dropout: float = 0.0,
                target_modules: str | Sequence[str] = "all-linear", seed: int = 0) -> nn.Module:
    """LoRA layers put in place into any module (no wrapper; PPO's critic backbone): every parameter of
    ``module`` is frozen but the adapter's. ``A`` from ``seed`` in a forked RNG, ``B`` zero."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = _check_targets(module, target_modules)
    if targets == "all-linear":  # resolved by peft only for wrapped models: name every linear layer here
        targets = linear_module_names(module)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = inject_adapter_in_model(cfg, module)
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)
    return module


def load_adapter(model: nn.Module, folder: str | os.PathLike, *, trainable: bool = True):
    """``model`` wrapped in the adapter saved in ``folder`` (a checkpoint's ``model/`` or a run's ``final/``)."""
    from peft import PeftModel

    if not is_adapter_folder(folder):
        raise TokenMDPError(f"{folder} holds no LoRA adapter ({ADAPTER_CONFIG} missing): a full model was given "
                            "where an adapter is expected")
    try:
        return PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)
    except (ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TokenMDPError(f"cannot load the adapter in {folder} onto {type(model).__name__}: {first}") from None


def load_merged_policy(path: str | os.PathLike, *, dtype: str = "float32"):
    """The policy in ``path``: a full model folder (:func:`load_policy`), or a LoRA adapter folder loaded onto its
    recorded base and merged in memory, so a LoRA run's ``final/`` evaluates like a full model."""
    if not is_adapter_folder(path):
        return load_policy(path, dtype=dtype)
    import dataclasses

    base = load_policy(adapter_base(path), dtype=dtype)
    merged = load_adapter(base.model, path, trainable=False).merge_and_unload()
    merged.eval()
    return dataclasses.replace(base, model=merged, name=Path(path).name)


@contextmanager
def adapter_disabled(peft_model) -> Iterator[None]:
    """The base model's computation (the adapter bypassed) inside the block: the frozen reference policy."""
    with peft_model.disable_adapter():
        yield


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict entries of ``module``'s trainable parameters only (an adapter-only critic checkpoint)."""
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    return {k: v for k, v in module.state_dict().items() if k in names}


def merge_adapter(folder: str | os.PathLike, out: str | os.PathLike, *, base: str | None = None,
                  dtype: str = "float32") -> Path:
    """Write the full model ``base + adapter`` of the adapter ``folder`` into ``out`` (atomically): the merged
    weights ``W + (alpha / r) B A`` in ``save_pretrained`` format, the tokenizer, and the adapter folder's
    ``tokenmdp.json``. ``base`` defaults to the adapter's recorded base model."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TokenMDPError(f"adapter folder not found: {folder}")
    if not is_adapter_folder(folder):
        what = "a full model" if (folder / "config.json").is_file() else "not an adapter folder"
        raise TokenMDPError(f"{folder} is {what} ({ADAPTER_CONFIG} missing): `tokenmdp merge` takes the adapter "
                            "folder of a LoRA run (its final/ or checkpoints/step-N/model)")
    policy = load_policy(base or adapter_base(folder), dtype=dtype)
    merged = load_adapter(policy.model, folder, trainable=False).merge_and_unload()

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        policy.tokenizer.save_pretrained(tmp)
        if (folder / META_FILE).is_file():
            (tmp / META_FILE).write_bytes((folder / META_FILE).read_bytes())

    return write_folder(Path(out), write, replace=False)


__all__ = ["ADAPTER_CONFIG", "adapter_base", "adapter_disabled", "add_lora", "inject_lora", "is_adapter_folder",
           "linear_module_names", "load_adapter", "load_merged_policy", "merge_adapter", "trainable_state"]
