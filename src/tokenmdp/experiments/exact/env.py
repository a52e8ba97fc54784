"""The exact tier's two-LLM case: every preset's exact expected update when a frozen, stochastic environment writes
tokens between the policy's (:mod:`tokenmdp.mdp.enumerate_env`), next to the same presets on the degenerate token
MDP of the same vocabulary and policy budget (:mod:`tokenmdp.experiments.exact.groups`, no environment).

The base's tokens are in every transcript and in every group, but out of every loss: the tables' ``mask`` is the
policy's ``response_mask``, so token counts, lengths ``|o|`` and the ``max_len`` divisor count policy tokens only,
as the sampled trainer does. The updates are the exact tier's own (:func:`~tokenmdp.experiments.exact.
evaluate_table`: the project's loss code on every multiset of ``G`` episodes, weighted by its probability, which
now includes the base's ``prod base(e | c)``).

**Does the paper's equivalence survive the stochastic transition?** Derivation: ``p(y) = prod_policy pi(y_t | s_t)
* prod_env base(e_t | c_t)`` and ``base`` does not depend on ``theta``, so ``grad log p(y) = sum_{policy t} grad
log pi(y_t | s_t)`` (the masked score) and ``grad J = E[R grad log p(y)]``, ``E[grad log p(y)] = 0`` exactly as
on the degenerate MDP. Hence

* ``isft+-adv`` equals ``grpo_nokl`` group by group: both weigh a response's masked token log-probs by
  ``A_i / |o_i|``; the transition never enters (an algebraic identity in the per-response weights);
* ISFT+ / ISFT- with a sequence sum and a constant divisor, REINFORCE (b = 0) and RLOO give ``grad J / L``
  (``L`` the policy's budget), Dr. GRPO ``(G - 1) / (G L) grad J``; every weight that depends on the group's
  rewards alone (std scaling, kept-count divisors, DPO at its reference) keeps cosine 1;
* per-response length weights (``1/|o|``, token means) bend the direction when the policy's lengths vary among
  the responses they weigh: the ``alternate`` default's correct episodes all have 2 policy tokens, so ISFT+'s
  token mean keeps cosine 1 there, while the ``hint`` variant's correct episodes have 1 or 2 and it bends.

The defaults: V = 3, policy budget 2, G = 4, seed 0, base seed 1 (``tokenmdp exact --env two_llm``). The base's
tokens being masked out of every loss is what keeps filtered SFT on ``grad J``: trained on the whole transcript it
bends away. Figures: ``benchmarks/RESULTS.md`` ("Beyond the degenerate MDP", the exact tier's two-LLM case).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from tokenmdp.errors import TokenMDPError
from tokenmdp.experiments.exact.tier import DEFAULTS, mdp_info, evaluate_table, run_threads
from tokenmdp.experiments.exact.groups import exact_mdp
from tokenmdp.experiments.exact.updates import row_coefficients, variants
from tokenmdp.mdp.enumerate import SequenceTable, enumerate_sequences, probabilities, token_logprobs
from tokenmdp.mdp.enumerate_env import ENV_VARIANTS, TwoLLMTokenMDP, enumerate_env_sequences, policy_rows

Tensor = torch.Tensor
ENV_DEFAULTS: dict[str, Any] = dict(variants=ENV_VARIANTS, max_len=2, vocab=3, env_after=(1,), base_seed=1,
                                    base_scale=1.0)
COMPARED = ("cosine", "norm_ratio", "scale", "final_J")


def _cosine(a: Tensor, b: Tensor) -> float:
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else 0.0


def _max_abs(x: Tensor) -> float:
    return float(x.abs().max()) if x.numel() else 0.0


def transcript_update(table: SequenceTable, theta: Tensor) -> Tensor:
    """``E[R grad log pi(every transcript token)]`` (D,): filtered SFT that also trains on the base's tokens (the
    mask dropped), with the episodes' true probabilities; compare it with ``grad J`` to see what the mask does."""
    if table.observation_mask is None:
        raise TokenMDPError("transcript_update needs a table with environment tokens")
    unmasked = dataclasses.replace(table, mask=table.mask | table.observation_mask)
    leaf = theta.detach().clone().requires_grad_(True)
    weight = probabilities(theta.detach(), table) * table.rewards
    (grad,) = torch.autograd.grad((weight * token_logprobs(leaf, unmasked).sum(-1)).sum(), leaf)
    return grad.reshape(-1)


def env_identities(table: SequenceTable, state: dict[str, Any]) -> dict[str, Any]:
    """What the two-LLM case adds to the identities: the group-by-group ``isft+-adv`` / ``grpo_nokl`` check on the
    loss coefficients of every row of every group, the largest update on the base's rows, and the transcript
    update's cosine."""
    catalogue, batch, point = variants(), state["batch"], state["start"]
    adv, grpo = (row_coefficients(catalogue[n], batch, point) for n in ("isft+-adv", "grpo_nokl"))
    diff = float((adv - grpo).abs().max())
    env_rows = ~policy_rows(table)
    width = table.vocab_size
    on_env = max(_max_abs(u.view(-1, width)[env_rows]) for u in state["updates"].values())
    grad = state["grad"]
    transcript = transcript_update(table, state["theta0"])
    return {
        "isft+-adv_vs_grpo_nokl_group_max_abs_diff": diff,
        "isft+-adv_vs_grpo_nokl_group_rel_diff": diff / float(grpo.abs().max()),
        "env_rows": int(env_rows.sum()),
        "env_rows_max_abs_update": on_env,
        "env_rows_max_abs_grad_J": _max_abs(grad.view(-1, width)[env_rows]),
        "transcript_sft_cosine": _cosine(transcript, grad),
        "transcript_sft_env_share": float(transcript.view(-1, width)[env_rows].norm() / transcript.norm()),
    }


def _env_info(mdp: TwoLLMTokenMDP, table: SequenceTable, state: dict[str, Any], seed: int,
              init_scale: float) -> dict[str, Any]:
    correct, lengths, groups = table.rewards > 0.5, table.lengths, state["batch"].groups
    return {
        "variant": mdp.variant, "vocab": mdp.vocab_size, "max_len": mdp.max_len,
        "env_after": list(mdp.env_after) if mdp.variant == "alternate" else [], "base_seed": mdp.base_seed,
        "base_scale": mdp.base_scale, "num_sequences": table.num_sequences, "num_groups": groups.num,
        "num_ordered_groups": table.num_sequences**groups.size, "num_correct": int(correct.sum()),
        "num_contexts": table.num_prefixes, "num_env_contexts": int((~policy_rows(table)).sum()),
        "correct_lengths": sorted(set(lengths[correct].tolist())),
        "incorrect_lengths": sorted(set(lengths[~correct].tolist())),
        "description": (f"{mdp.describe()}; lengths count policy tokens only; tabular softmax policy over every "
                        f"context, start theta ~ {init_scale:g} N(0, 1) with seed {seed}; all {groups.num} multisets "
                        f"of {groups.size} episodes, weighted by their multinomial probability"),
    }


def run_exact_env(
    *,
    env_variants: tuple[str, ...] | list[str] = ENV_DEFAULTS["variants"],
    group_size: int = DEFAULTS["group_size"],
    steps: int = DEFAULTS["steps"],
    lr: float = DEFAULTS["lr"],
    seed: int = DEFAULTS["seed"],
    max_len: int = ENV_DEFAULTS["max_len"],
    vocab: int = ENV_DEFAULTS["vocab"],
    env_after: tuple[int, ...] = ENV_DEFAULTS["env_after"],
    base_seed: int = ENV_DEFAULTS["base_seed"],
    base_scale: float = ENV_DEFAULTS["base_scale"],
    presets: list[str] | None = None,
    normalize: bool = True,
    init_scale: float = DEFAULTS["init_scale"],
) -> dict[str, Any]:
    """The two-LLM case (module docstring): for each of ``env_variants`` and for the degenerate token MDP of the
    same ``vocab`` and ``max_len`` (the policy's budget), the exact tier's document (``mdp``, ``start``,
    ``grad_J_norm``, ``presets``, ``identities``, ``dynamics``, ...). Returns ``{"variants": {name: doc},
    "degenerate": doc, "comparison": {preset: {case: {cosine, norm_ratio, scale, final_J}}}, "seconds"}``."""
    t0 = time.perf_counter()
    unknown = [v for v in env_variants if v not in ENV_VARIANTS]
    if unknown or not env_variants:
        raise TokenMDPError(f"exact: --env-variant: choose from {', '.join(ENV_VARIANTS)}, got {list(env_variants)}")
    mdps = [TwoLLMTokenMDP(vocab_size=vocab, max_len=max_len, variant=v, env_after=tuple(env_after),
                           base_seed=base_seed, base_scale=base_scale) for v in env_variants]
    kw = dict(group_size=group_size, steps=steps, lr=lr, seed=seed, presets=presets, normalize=normalize,
              init_scale=init_scale)
    with run_threads(1):
        docs: dict[str, Any] = {}
        for mdp in mdps:
            table = enumerate_env_sequences(mdp)
            doc, state = evaluate_table(table, **kw)  # type: ignore[arg-type]
            doc["identities"].update(env_identities(table, state))
            docs[mdp.variant] = {"mdp": _env_info(mdp, table, state, seed, init_scale), **doc}
        table = enumerate_sequences(exact_mdp(vocab, max_len))
        doc, state = evaluate_table(table, **kw)  # type: ignore[arg-type]
        degenerate = {"mdp": mdp_info(table, state["batch"].groups, init_scale, seed), **doc}
    cases = {**docs, "degenerate": degenerate}
    comparison = {name: {case: {k: d["presets"][name][k] for k in COMPARED} for case, d in cases.items()}
                  for name in degenerate["presets"]}
    return {"variants": docs, "degenerate": degenerate, "comparison": comparison,
            "seconds": time.perf_counter() - t0}


__all__ = ["COMPARED", "ENV_DEFAULTS", "env_identities", "run_exact_env", "transcript_update"]
