"""Atomic checkpoints of a training run: ``checkpoints/step-N/``.

A checkpoint holds everything a resumed run needs to continue bit for bit on a CPU:

* ``model/``: the policy in Hugging Face ``save_pretrained`` format (safetensors) plus the tokenizer;
* ``critic.pt``: the PPO critic's state dict (when there is one);
* ``optimizer.pt``, ``scheduler.pt`` (and ``critic_optimizer.pt``): their ``state_dict``;
* ``rng.pt``: the Python, NumPy and torch (CPU and CUDA) generator states;
* ``trainer_state.json``: the step and any running statistics of the trainer;
* ``async_batches.pt`` (``rollout.max_staleness > 0``): the batches already sampled for the next steps.

It is written into a hidden temporary folder and renamed to ``step-N`` only when complete
(:func:`tokenmdp.atomic.write_folder`), so a crash never
leaves a folder that looks like a checkpoint but is not one. Only the newest ``keep_last`` are kept.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenmdp.atomic import remove_leftovers, write_folder
from tokenmdp.errors import TokenMDPError

STEP_RE = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"
CHECKSUM_FILE = "checksums.json"  # sha256 of every other file of the checkpoint, written with it


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with file.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(folder: Path) -> None:
    """``checksums.json``: the sha256 of every file under ``folder`` (relative paths), itself excluded."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE)
    sums = {str(p.relative_to(folder)): _sha256(p) for p in files}
    (folder / CHECKSUM_FILE).write_text(json.dumps(sums, indent=1, sort_keys=True) + "\n")


def damage(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder (a file missing, truncated or changed since it was written, or an
    unreadable trainer state), or None when it is whole. A checkpoint written before checksums existed is taken
    as whole when its trainer state reads."""
    try:
        json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        return f"{STATE_FILE} unreadable ({exc.__class__.__name__})"
    file = folder / CHECKSUM_FILE
    if not file.is_file():
        return None
    try:
        sums = json.loads(file.read_text())
    except ValueError:
        return f"{CHECKSUM_FILE} unreadable"
    if not isinstance(sums, dict):
        return f"{CHECKSUM_FILE} is not a JSON object"
    for name, digest in sums.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if _sha256(path) != digest:
            return f"{name} does not match its checksum (truncated or changed since it was written)"
    return None


def rng_state() -> dict:
    """The states of every random generator the trainer touches."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Checkpoint:
    """A finished checkpoint folder and its trainer state."""

    path: Path
    step: int
    state: dict

    def load_into(self, optimizer=None, scheduler=None, critic=None, critic_optimizer=None) -> None:
        """Restore optimizer, scheduler, critic and RNG states (the model itself loads from ``model_dir``)."""
        pairs = [
            (optimizer, "optimizer.pt"),
            (scheduler, "scheduler.pt"),
            (critic, "critic.pt"),
            (critic_optimizer, "critic_optimizer.pt"),
        ]
        for obj, name in pairs:
            if obj is None:
                continue
            file = self.path / name
            if not file.is_file():
                raise TokenMDPError(f"checkpoint {self.path} has no {name}")
            obj.load_state_dict(torch.load(file, map_location="cpu", weights_only=False))
        rng = self.path / "rng.pt"
        if rng.is_file():
            set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))

    @property
    def model_dir(self) -> Path:
        return self.path / "model"


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model,
    tokenizer=None,
    optimizer=None,
    scheduler=None,
    critic=None,
    critic_optimizer=None,
    state: dict | None = None,
    keep_last: int = 2,
    extra_files: dict[str, Path] | None = None,
    model_state: dict | None = None,
    extra_objects: dict[str, Any] | None = None,
) -> Path:
    """Write ``root/step-<step>`` atomically (temp folder, then rename) and prune to ``keep_last``.

    ``model`` is an unwrapped Hugging Face model; ``extra_files`` maps names to files copied into ``model/``
    (for example ``tokenmdp.json``); ``model_state``: the full state dict to save in ``model``'s format instead of
    its own (a sharded model's, gathered); ``extra_objects`` maps file names to objects written with ``torch.save``
    (the in-flight batches of overlapped rollouts). Returns the checkpoint folder.
    """
    root = Path(root)

    def write(tmp: Path) -> None:
        save_model(tmp / "model", model, tokenizer, extra_files, state_dict=model_state)
        for obj, name in [
            (optimizer, "optimizer.pt"),
            (scheduler, "scheduler.pt"),
            (critic, "critic.pt"),
            (critic_optimizer, "critic_optimizer.pt"),
        ]:
            if obj is not None:  # a module, an optimizer, or a state dict already taken (an adapter-only critic)
                torch.save(obj if isinstance(obj, dict) else obj.state_dict(), tmp / name)
        for name, obj in (extra_objects or {}).items():
            torch.save(obj, tmp / name)
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **(state or {})}, indent=2))
        write_checksums(tmp)

    final = write_folder(root / f"step-{step}", write, replace=True)
    prune(root, keep_last)
    return final


def save_model(path: Path, model, tokenizer=None, extra_files: dict[str, Path] | None = None, *,
               state_dict: dict | None = None) -> None:
    """``save_pretrained`` of model and tokenizer into ``path``, plus copies of ``extra_files``; ``state_dict``:
    the weights to write instead of the model's own (a sharded model's, gathered whole)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if state_dict is not None:
        model.save_pretrained(path, state_dict=state_dict)
    else:
        model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    for name, src in (extra_files or {}).items():
        if src is not None and Path(src).is_file():
            shutil.copyfile(src, path / name)


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Finished checkpoints under ``root`` as ``(step, path)``, oldest first (temp folders ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_RE.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, and any leftover temp folders."""
    found = list_checkpoints(root)
    for _, path in found[: max(0, len(found) - keep_last)]:
        shutil.rmtree(path)
    remove_leftovers(root)


def latest_checkpoint(root: Path, *, verify: bool = True) -> Checkpoint | None:
    """The newest whole checkpoint under ``root``, or None (none was written).

    With ``verify``, each checkpoint's files are checked against its ``checksums.json`` (:func:`damage`); a
    damaged one is skipped with a warning naming the file, and the previous whole one is used. When every
    checkpoint is damaged: :class:`TokenMDPError` naming them (nothing is silently redone from step 0).
    """
    found = list_checkpoints(root)
    damaged = []
    for step, path in reversed(found):
        problem = damage(path) if verify else None
        if problem is None:
            if damaged:
                warnings.warn(f"damaged checkpoint(s) skipped: {'; '.join(damaged)}; resuming from {path}",
                              stacklevel=2)
            state: dict[str, Any] = json.loads((path / STATE_FILE).read_text())
            return Checkpoint(path=path, step=step, state=state)
        damaged.append(f"{path}: {problem}")
    if damaged:
        raise TokenMDPError(f"every checkpoint under {root} is damaged: {'; '.join(damaged)}")
    return None
