"""Sharded training (``run.fsdp``): the policy's parameters, gradients and optimizer moments split over the run's
processes with torch's FSDP2 (``torch.distributed.fsdp.fully_shard``, the call ``accelerate``'s FSDP2 plugin
makes), so that a model that outgrows one device trains on several.

Each decoder layer is one FSDP unit (its parameters all-gathered just before its forward and backward, freed
after); the root unit is :class:`ScoringRoot`, a module whose ``forward`` is the teacher-forced scoring of the
policy (:func:`tokenmdp.policy.logprobs.sequence_logprobs` or its shared-prompt form). The root's own parameters
(embeddings, final norm, the output head, tied to the embeddings in Llama / Qwen2 / SmolLM2) are all-gathered by
the root's hooks around exactly that computation, since the project never calls the causal LM's own ``forward``
(it runs the backbone and the head separately). The backward pass reduce-scatters the gradients, averaged over
processes (the update then does not average them again).

What needs the full weights outside a scoring pass gets them explicitly:

* rollouts and held-out evaluation (:func:`full_weights`): every unit all-gathered for the whole generation
  (the sampling engine reads the weights themselves), then freed. This costs one full copy of the parameters on
  each process during generation (no gradients, no optimizer moments); the training state stays sharded;
* checkpoints (:func:`full_state_dict`, :func:`optimizer_state`): the full parameters in ``save_pretrained``
  format and the full optimizer state, gathered tensor by tensor onto the main process (CPU); loading a
  checkpoint loads the full model on each process and shards it again (:func:`load_optimizer_state` for the
  moments), so ``--resume`` continues exactly.

Every process must run the same collectives in the same order: a scoring pass all-gathers, so each process runs
as many of them as the others (:func:`tokenmdp.train.updates.lockstep` pads a process's micro-batches with
passes of zero loss).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from collections.abc import Iterator

import torch
from torch import nn

from tokenmdp.errors import TokenMDPError


class ScoringRoot(nn.Module):
    """The FSDP root around a causal LM: ``root(score, *args, **kwargs)`` is ``score(model, *args, **kwargs)``,
    with the root's parameters all-gathered around it (and their gradients reduce-scattered in the backward)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, score, *args, **kwargs):
        return score(self.model, *args, **kwargs)


@dataclass
class Sharding:
    """A policy sharded over the processes: ``root`` (the FSDP root around ``model``) and every FSDP unit."""

    root: nn.Module
    units: list[nn.Module]
    world_size: int


def _units_of(model: nn.Module) -> list[nn.Module]:
    """The decoder layers: modules whose class the model names in ``_no_split_modules`` (transformers' own list
    of blocks that must stay whole)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if not units:
        raise TokenMDPError(f"config field 'run.fsdp': cannot find the decoder layers of {type(model).__name__} "
                            "(no module class named in its _no_split_modules)")
    return units


def shard_model(model: nn.Module, device: torch.device, world_size: int) -> Sharding:
    """Shard ``model`` in place over the ``world_size`` processes of the default process group: each decoder layer,
    then the :class:`ScoringRoot` around the model (the embeddings, final norm and head). Call before the
    optimizer is built (it must hold the sharded parameters)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    units = _units_of(model)
    for unit in units:
        fully_shard(unit, mesh=mesh)
    root = ScoringRoot(model)
    # the root reshards after its forward too: a pass without gradients (behaviour log-probs) frees it at once
    fully_shard(root, mesh=mesh, reshard_after_forward=True)
    return Sharding(root=root, units=[*units, root], world_size=world_size)


def local_fraction(param: torch.Tensor) -> float:
    """How much of ``param`` this process holds: ``1 / world_size`` of a sharded parameter (rows split evenly),
    1 for a plain tensor."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return 1.0
    return param.to_local().numel() / max(1, param.numel())


@contextmanager
def full_weights(sharding: Sharding | None) -> Iterator[None]:
    """Inside the block every parameter of the sharded policy is whole (plain tensors the sampling engine can read,
    no collective in its forward passes, whatever their number per process); freed again after. A no-op for
    ``None`` (an unsharded run). Every process enters it at the same point (one all-gather per unit)."""
    if sharding is None:
        yield
        return
    sharding.root.set_reshard_after_forward(False)  # a layer's forward (the hf decoder) then keeps it whole
    for unit in sharding.units:
        unit.unshard()
    try:
        yield
    finally:
        sharding.root.set_reshard_after_forward(True)
        for unit in sharding.units:
            unit.reshard()


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(model: nn.Module, *, main: bool) -> dict[str, torch.Tensor] | None:
    """The model's full state dict on the CPU of the main process (``None`` elsewhere), gathered one tensor at a
    time (every process calls it, in the same order); tied parameters are gathered once."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        key = id(value)
        if key not in seen:
            full = _full(value.detach())
            seen[key] = full.cpu() if main else full.new_empty(0)
            del full
        if main:
            out[name] = seen[key]
    return out if main else None


def grad_norm(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """The total gradient norm over every process's shards (clipped to ``max_norm`` when given), a plain tensor:
    the norm of the whole unsharded gradient."""
    if max_norm is not None and max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return _full(norm)


def _inner(optimizer):
    while hasattr(optimizer, "optimizer"):  # accelerate's AcceleratedOptimizer
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_state(model: nn.Module, optimizer) -> dict:
    """The full optimizer state (moments of the whole parameters, keyed by parameter name) on the CPU of the main
    process, an empty dict elsewhere; every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, _inner(optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    """Load a full optimizer state written by :func:`optimizer_state` into the sharded optimizer (each process
    keeps its shard of the moments)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, _inner(optimizer), optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


__all__ = ["ScoringRoot", "Sharding", "shard_model", "full_weights", "full_state_dict", "grad_norm",
           "optimizer_state", "load_optimizer_state", "local_fraction"]
