"""The exact tier: every algorithm's expected update on a token MDP small enough to enumerate, without sampling.

Three files of computation, by responsibility (and :mod:`tokenmdp.experiments.exact.plots` for the figures):
:mod:`tokenmdp.experiments.exact.groups` holds the MDP (vocabulary ``{0: EOS, 1: a, 2: b, ...}``, ``max_len`` L,
one empty prompt, the final-answer verifier), the enumeration of its responses' multisets (groups) and what every
update needs at one ``theta``; :mod:`tokenmdp.experiments.exact.updates` the presets as this tier runs them and the
exact expected update ``U = sum_g P(g) u_g`` of each (their docstrings give the details); this module the dynamics,
:func:`run_exact` (every preset's update at ``theta_0``, its dynamics, the summaries and the identities below),
:func:`save_exact` and the public constants. Every public name of the three is importable from
:mod:`tokenmdp.experiments.exact`.

**Identities** (docs/math.md sections 4.2 and 7; ``tests/test_exact.py``), with ``s = grad log p(y)``, ``E[s] = 0``,
``grad J = E[R s]``, ``E[s | R=1] = grad J / J`` and ``E[s | R=0] = -grad J / (1 - J)``:

* ``isft+-adv`` equals ``grpo_nokl`` group by group, up to ``isft_weights`` casting the advantages to torch's
  default dtype (float32 rounding; exactly 0 with float64);
* ``isft+_seqsum_const``, ``isft-_seqsum_const``, ``reinforce`` (b = 0, the same estimator as ISFT+), ``rloo``:
  ``U = grad J / L``;
* ``dr_grpo``: ``A_i = R_i - mean_j R_j`` contains ``R_i / G``, so ``U = (G - 1) / (G L) grad J``;
* on one prompt, any per-response weight that is a function of the group's rewards alone gives a multiple of
  ``grad J``: ``grpo_nokl_seqsum`` (std scaling), ``*_seqsum_kept`` (kept-count divisors, scale
  ``P(n_kept > 0) / (J L)`` for ISFT+) and ``dpo`` at the reference (scale ``(beta / 2) P(mixed) / (J (1 - J))``)
  all have cosine 1. Only length-dependent weights (``1/|o|``, token means) bend the direction; the prompt
  reweighting of docs/math.md section 7 needs several prompts, which this tier does not model.

**Hand-computed example** (the tests): V = 2, L = 2, ``theta = 0`` (``init_scale=0``): responses ``[0]``,
``[1, 0]`` (correct), ``[1, 1]`` (truncated), probabilities 1/2, 1/4, 1/4; ``J = 1/4``; ``grad J`` is +-1/8 on the
two rows, ``|grad J| = 1/4``. With G = 2, REINFORCE's one-sample update is ``x = R s / 2`` with ``|s|^2 = 1``:
``E|x|^2 = 1/16``, per-sample variance ``1/16 - 1/64 = 3/64``; Dr. GRPO's ``U = grad J / 4``.

**The two-LLM case** (:mod:`tokenmdp.experiments.exact.env`, ``tokenmdp exact --env two_llm``): the same
updates on an MDP where a frozen stochastic base writes tokens between the policy's, masked out of every loss,
through :func:`evaluate_table`; the identities above survive the stochastic transition.

**Per-sample variance**: ``variance = G * Var``, the variance of one response's share of a group estimate
(comparable across group sizes); ``relative_variance = G * Var / |U|^2`` is free of the presets' constant scales.

**Dynamics**: ``steps`` of ``theta <- theta + lr * U / |U|`` (``normalize=True``, the default: every preset moves
the same distance per step, so the trajectories compare directions rather than arbitrary constant scales such as
``1/L``, much as Adam in the trainers is insensitive to them) or ``theta <- theta + lr * U`` (plain SGD). Records
0..steps hold the state (J, P(correct), E[length | correct], E[length | incorrect], P(truncated)) and the update
taken from it (``update_norm``, ``step_size``, ``cosine`` with ``grad J`` there).

**The length shift** ``len_incorrect_shift`` = E[length | incorrect] after the dynamics minus at the start;
``len_incorrect_slope`` = ``grad E[length | incorrect] . U / |U|`` at the start (first order). Dr. GRPO moves along
``grad J``, so its sign is that of the task, not of the algorithm: over start seeds the sign pattern is not
robust, the difference is (GRPO's slope exceeds Dr. GRPO's; ``benchmarks/RESULTS.md``, "The exact tier"), and
``grpo_nokl_seqsum`` (std kept, ``1/|o|`` removed) moves exactly like Dr. GRPO: the difference is the ``1/|o|``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tokenmdp.errors import TokenMDPError
from tokenmdp.experiments.exact.groups import (MAX_GROUPS, Groups, count_groups, enumerate_groups,
                                               exact_mdp, make_point)
from tokenmdp.experiments.exact.updates import (GroupBatch, Variant, expected_update, variants)
from tokenmdp.mdp.enumerate import SequenceTable, enumerate_sequences, exact_gradient, init_logits, probabilities

Tensor = torch.Tensor
DEFAULTS = dict(group_size=4, steps=30, lr=0.1, seed=0, max_len=3, vocab=3, init_scale=1.0)
IDENTITY_PRESETS = ("grpo_nokl", "grpo_nokl_seqsum", "dr_grpo", "isft+-adv", "isft+_seqsum_const",
                    "isft-_seqsum_const")
SKIPPED = {
    "ppo": "needs a learned critic, whitens advantages across a batch of prompts and takes 2 epochs (the second "
           "off-policy): not the expected update of one on-policy group; see ppo_oracle (exact V^pi critic, "
           "no whitening, first epoch)",
}


def policy_stats(theta: Tensor, table: SequenceTable) -> dict[str, Tensor]:
    """J, P(correct), E[length | correct], E[length | incorrect], P(truncated) (differentiable in ``theta``)."""
    p = probabilities(theta, table)
    correct = (table.rewards > 0.5).to(torch.float64)
    length = table.lengths.to(torch.float64)
    p_correct = p @ correct
    return {
        "J": p @ table.rewards,
        "p_correct": p_correct,
        "len_correct": (p * correct) @ length / p_correct,
        "len_incorrect": (p * (1 - correct)) @ length / (1 - p_correct),
        "p_truncated": p @ (~table.terminated).to(torch.float64),
    }


def _floats(stats: dict[str, Tensor]) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in stats.items()}


def _cosine(a: Tensor, b: Tensor) -> float:
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else 0.0


def _step(update: Tensor, lr: float, normalize: bool) -> Tensor:
    norm = float(update.norm())
    if normalize:
        return update * (lr / norm) if norm > 0 else torch.zeros_like(update)
    return lr * update


def dynamics(v: Variant, batch: GroupBatch, theta0: Tensor, *, steps: int, lr: float,
             normalize: bool) -> list[dict]:
    """``steps`` of exact expected-update ascent from ``theta0``; records 0..steps (state ``theta_k`` and the
    update taken from it: ``update_norm``, ``step_size``, ``cosine`` with ``grad J(theta_k)``)."""
    table = batch.groups.table
    theta, out = theta0.detach().clone(), []
    for k in range(steps + 1):
        update, _ = expected_update(v, batch, make_point(theta, batch.groups))
        _, grad = exact_gradient(theta, table)
        delta = _step(update, lr, normalize)
        out.append({"step": k, **_floats(policy_stats(theta, table)), "update_norm": float(update.norm()),
                    "step_size": float(delta.norm()), "cosine": _cosine(update, grad.reshape(-1))})
        theta = theta + delta.view_as(theta)
    return out


def _check_args(group_size: int, steps: int, lr: float, max_len: int, vocab: int) -> None:
    for name, value, low in (("group_size", group_size, 2), ("steps", steps, 0), ("max_len", max_len, 1),
                             ("vocab", vocab, 2)):
        if int(value) < low:
            raise TokenMDPError(f"exact: {name} must be >= {low}, got {value}")
    if not lr > 0:
        raise TokenMDPError(f"exact: lr must be > 0, got {lr}")
    n, m = count_groups(vocab, max_len, group_size)
    if m > MAX_GROUPS:
        raise TokenMDPError(f"exact: {m} groups of {group_size} from {n} responses (vocab {vocab}, max_len "
                            f"{max_len}) exceed the limit of MAX_GROUPS = {MAX_GROUPS}; use a smaller "
                            "--group-size, --max-len or --vocab")


def _names(presets: list[str] | None, table: dict[str, Variant]) -> list[str]:
    chosen = list(table) if presets is None else list(presets)
    unknown = [p for p in chosen if p not in table]
    if unknown:
        hint = "; skipped presets: " + ", ".join(SKIPPED) if any(u in SKIPPED for u in unknown) else ""
        raise TokenMDPError(f"exact: unknown preset(s) {', '.join(unknown)}; choose from {', '.join(table)}{hint}")
    return chosen + [p for p in IDENTITY_PRESETS if p not in chosen]


def _identities(updates: dict[str, Tensor], grad: Tensor, summaries: dict[str, dict]) -> dict[str, Any]:
    def scale(name: str) -> float:
        return float(updates[name] @ grad) / float(grad @ grad)

    diff = (updates["isft+-adv"] - updates["grpo_nokl"]).abs().max()
    out: dict[str, Any] = {
        "isft+-adv_vs_grpo_nokl_max_abs_diff": float(diff),
        "isft+-adv_vs_grpo_nokl_rel_diff": float(diff / updates["grpo_nokl"].norm()),
    }
    for sign in "+-":
        out[f"isft{sign}_seqsum_cosine"] = _cosine(updates[f"isft{sign}_seqsum_const"], grad)
        out[f"isft{sign}_seqsum_scale"] = scale(f"isft{sign}_seqsum_const")
    out["dr_grpo_cosine"] = _cosine(updates["dr_grpo"], grad)
    out["dr_grpo_scale"] = scale("dr_grpo")
    shown = ("grpo_nokl", "dr_grpo", "grpo_nokl_seqsum")
    out["len_incorrect_shift"] = {k: summaries[k]["len_incorrect_shift"] for k in shown}
    out["len_incorrect_slope"] = {k: summaries[k]["len_incorrect_slope"] for k in shown}
    return out


def run_exact(
    *,
    group_size: int = DEFAULTS["group_size"],
    steps: int = DEFAULTS["steps"],
    lr: float = DEFAULTS["lr"],
    seed: int = DEFAULTS["seed"],
    max_len: int = DEFAULTS["max_len"],
    vocab: int = DEFAULTS["vocab"],
    presets: list[str] | None = None,
    normalize: bool = True,
    init_scale: float = DEFAULTS["init_scale"],
) -> dict[str, Any]:
    """The exact tier (module docstring): every preset's expected update at ``theta_0`` and its dynamics.

    ``presets`` (default: all of :func:`variants`) is extended by :data:`IDENTITY_PRESETS`. Returns the
    ``exact.json`` document: ``mdp``, ``group_size``, ``steps``, ``lr``, ``seed``, ``start``, ``grad_J_norm``,
    ``presets``, ``skipped``, ``identities``, ``dynamics``, ``seconds`` (and ``normalize``, ``init_scale``).
    """
    _check_args(group_size, steps, lr, max_len, vocab)
    with run_threads(1):
        return _run(group_size=group_size, steps=steps, lr=lr, seed=seed, max_len=max_len, vocab=vocab,
                    presets=presets, normalize=normalize, init_scale=init_scale)


@contextlib.contextmanager
def run_threads(num: int) -> Iterator[None]:
    """Torch's intra-op threads set to ``num`` inside the block: tensors of a few hundred thousand numbers are
    fastest on one thread, by far on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(num)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _summary(v: Variant, update: Tensor, var: Tensor, run: list[dict], grad: Tensor, len_grads: list[Tensor],
             group_size: int) -> dict[str, Any]:
    norm = float(update.norm())
    unit = update / norm if norm > 0 else update
    variance = group_size * float(var)
    return {
        "cosine": _cosine(update, grad), "norm_ratio": norm / float(grad.norm()), "variance": variance,
        "relative_variance": variance / norm**2 if norm > 0 else None,
        "scale": float(update @ grad / (grad @ grad)), "update_norm": norm,
        "len_correct_slope": float(len_grads[0] @ unit), "len_incorrect_slope": float(len_grads[1] @ unit),
        "len_incorrect_shift": run[-1]["len_incorrect"] - run[0]["len_incorrect"],
        "final_J": run[-1]["J"], "description": v.description, "choices": v.spec.choices(),
    }


def mdp_info(table: SequenceTable, groups: Groups, init_scale: float, seed: int) -> dict[str, Any]:
    correct, lengths = table.rewards > 0.5, table.lengths
    v, length, g = table.vocab_size, table.mdp.max_len, groups.size
    return {
        "vocab": v, "max_len": length, "num_sequences": table.num_sequences, "num_groups": groups.num,
        "num_ordered_groups": table.num_sequences**g, "num_correct": int(correct.sum()),
        "correct_lengths": sorted(set(lengths[correct].tolist())),
        "incorrect_lengths": sorted(set(lengths[~correct].tolist())),
        "description": (f"token MDP, vocab {v} (EOS = 0, answer token a = 1), max_len {length}, one prompt; reward "
                        "1 iff the response ends with 'a EOS' (truncated: wrong); tabular softmax policy, start "
                        f"theta ~ {init_scale:g} N(0, 1) with seed {seed}; all {groups.num} multisets of {g} "
                        "responses, weighted by their multinomial probability"),
    }


def _run(*, group_size: int, steps: int, lr: float, seed: int, max_len: int, vocab: int, presets: list[str] | None,
         normalize: bool, init_scale: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    table = enumerate_sequences(exact_mdp(vocab, max_len))
    doc, state = evaluate_table(table, group_size=group_size, steps=steps, lr=lr, seed=seed, presets=presets,
                                normalize=normalize, init_scale=init_scale)
    return {"mdp": mdp_info(table, state["batch"].groups, init_scale, seed), **doc,
            "seconds": time.perf_counter() - t0}


def evaluate_table(table: SequenceTable, *, group_size: int, steps: int, lr: float, seed: int,
                   presets: list[str] | None, normalize: bool, init_scale: float
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every preset's expected update at ``theta_0`` on any enumerated ``table`` (the token MDP's, or one with
    environment tokens), its dynamics, the summaries and the identities. Returns ``(doc, state)``: ``doc`` the
    ``exact.json`` document less ``mdp`` and ``seconds``; ``state`` what it was computed from (``updates`` by
    preset, ``grad`` (D,), the :class:`GroupBatch` ``batch``, the start :class:`Point` ``start``, ``theta0``)."""
    groups = enumerate_groups(table, group_size)
    theta0 = init_logits(table, seed=seed, scale=init_scale, requires_grad=False)
    catalogue = variants()
    start = make_point(theta0, groups)
    batch = GroupBatch(groups, start)
    _, grad = exact_gradient(theta0, table)
    grad = grad.reshape(-1)
    leaf = theta0.clone().requires_grad_(True)
    stats = policy_stats(leaf, table)
    len_grads = [torch.autograd.grad(stats[k], leaf, retain_graph=True)[0].reshape(-1)
                 for k in ("len_correct", "len_incorrect")]
    summaries, updates, runs = {}, {}, {}
    for name in _names(presets, catalogue):
        v = catalogue[name]
        updates[name], var = expected_update(v, batch, start, per_group=True)
        runs[name] = dynamics(v, batch, theta0, steps=steps, lr=lr, normalize=normalize)
        summaries[name] = _summary(v, updates[name], var, runs[name], grad, len_grads, group_size)
    doc = {
        "group_size": group_size, "steps": steps, "lr": lr, "seed": seed, "normalize": normalize,
        "init_scale": init_scale,
        "start": _floats(stats),
        "grad_J_norm": float(grad.norm()),
        "presets": summaries,
        "skipped": dict(SKIPPED),
        "identities": _identities(updates, grad, summaries),
        "dynamics": runs,
    }
    return doc, {"updates": updates, "grad": grad, "batch": batch, "start": start, "theta0": theta0}


def save_exact(result: dict[str, Any], out_dir: str | Path, figures: dict[str, bytes] | None = None) -> Path:
    """Write ``exact.json`` (and ``plots/<name>.png`` for each of ``figures``) into ``out_dir``; returns the json
    path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "exact.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    if figures:
        (out / "plots").mkdir(exist_ok=True)
        for name, png in figures.items():
            (out / "plots" / f"{name}.png").write_bytes(png)
    return path


__all__ = ["DEFAULTS", "IDENTITY_PRESETS", "SKIPPED", "dynamics", "evaluate_table", "mdp_info", "policy_stats",
           "run_exact", "run_threads", "save_exact"]
