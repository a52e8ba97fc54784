"""The algorithm registry: every algorithm as a visible set of choices.

An :class:`AlgoSpec` names one choice on each axis of the family (DESIGN.md): the kind of update (``pg``,
``isft``, ``dpo``), the advantage estimator and its scaling, the credit assignment, the loss aggregation, the
ratio clip, the KL (estimator, weight, in the loss or in the reward), the entropy bonus, the number of inner
epochs ``mu``, and whether a critic is trained. :data:`PRESETS` holds the named algorithms; ``describe()`` prints
their choices side by side; ``get_algo(name, **overrides)`` builds a custom mix (``--set algo.aggregation=...``).
:func:`compute_advantages` turns rewards into the advantages a spec asks for, so trainers hold no per-algorithm
branches.

The presets (each states how it differs from its neighbours):

* ``reinforce``: advantage ``R - b`` with a moving-average baseline (unbiased), sum over tokens divided by a
  constant (the unbiased REINFORCE estimator, scaled), one on-policy epoch, no KL.
* ``rloo``: leave-one-out group baseline (Ahmadian et al. 2024), otherwise as ``reinforce``.
* ``grpo``: group mean and group std (unbiased, as TRL/verl), per-sequence token mean (the ``1/|o_i|`` factor),
  clip 0.2, KL to the reference by k3 in the loss with weight 0.04 (DeepSeekMath), one epoch.
* ``grpo_nokl``: ``grpo`` without the KL (beta = 0): with one on-policy epoch it takes the same step as
  ``isft+-adv`` (the reduction of arXiv 2505.13697).
* ``bnpo``: ``grpo`` with the token-mean aggregation (batch-normalised tokens).
* ``dr_grpo``: no std division, token sum divided by a constant ``max_len``, no KL (Liu et al. 2025).
* ``dapo``: group std, token mean, asymmetric clip 0.2 / 0.28, no KL, dynamic sampling (drop groups whose rewards
  are all equal) and the soft overlong penalty (Yu et al. 2025).
* ``ppo``: a critic, GAE (gamma 1, lambda 0.95) on terminal credit, whitened advantages, clip 0.2, clipped value
  loss, KL in the reward (k1, weight 0.05), two inner epochs.
* ``dpo``: pairwise sigmoid loss, beta 0.1, on-policy pairs (best vs worst response of a group).
* ``isft+``, ``isft-``, ``isft+-``: filtered iterative SFT on positives, negatives, or both, constant weights,
  token mean (plain SFT on the kept set).
* ``isft+-adv``: ``isft+-`` weighted by the GRPO advantage over the length (``A_i / |o_i|``): the supervised form
  that on-policy, KL-free GRPO reduces to (arXiv 2505.13697).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

import torch

from tokenmdp.algos.advantages import gae, grpo_advantages, overlong_penalty, reinforce_advantages, returns_to_go
from tokenmdp.algos.advantages import rloo_advantages, whiten
from tokenmdp.algos.dpo import DPO_LOSS_TYPES
from tokenmdp.algos.isft import ISFT_MODES, ISFT_WEIGHTINGS
from tokenmdp.algos.losses import AGGREGATIONS, KL_ESTIMATORS
from tokenmdp.errors import TokenMDPError
from tokenmdp.mdp.credit import CREDIT, assign_credit
from tokenmdp.values import parse_value

CHOICES: dict[str, tuple] = {
    "kind": ("pg", "isft", "dpo"),
    "advantage": ("grpo", "rloo", "reinforce", "gae"),
    "std_scale": ("group", "batch", "none"),
    "std": ("population", "unbiased"),
    "baseline": ("none", "batch_mean", "moving_average"),
    "returns": ("sequence", "to_go"),
    "credit": tuple(CREDIT),
    "process_final": ("residual", "add"),
    "aggregation": AGGREGATIONS,
    "kl_estimator": KL_ESTIMATORS,
    "kl_in": ("loss", "reward"),
    "isft_mode": ISFT_MODES,
    "isft_weighting": ISFT_WEIGHTINGS,
    "dpo_loss_type": DPO_LOSS_TYPES,
}
_NON_NEGATIVE = ("clip_low", "clip_high", "kl_coef", "entropy_coef", "value_coef", "overlong_penalty",
                 "isft_pos_weight", "isft_neg_weight", "advantage_eps")
_UNIT = ("gamma", "lam", "credit_gamma", "baseline_momentum")


@dataclass(frozen=True)
class AlgoSpec:
    """One algorithm: a choice on every axis. Fields are validated on creation (errors name the field)."""

    name: str = "custom"
    kind: str = "pg"  # pg | isft | dpo
    # advantages
    advantage: str = "grpo"  # grpo | rloo | reinforce | gae
    std_scale: str = "group"  # grpo: group | batch | none
    std: str = "unbiased"  # population | unbiased
    advantage_eps: float = 1e-6
    baseline: str = "none"  # reinforce: none | batch_mean | moving_average
    baseline_momentum: float = 0.9
    returns: str = "sequence"  # sequence: R_i on every token | to_go: return-to-go of the token rewards
    whiten_advantages: bool = False
    # credit assignment (token rewards for gae / to_go)
    credit: str = "terminal"
    credit_gamma: float = 1.0
    # credit "process": the last token gets R - sum of the step rewards (residual: the return stays R, so with
    # sequence returns the update is uniform credit's exactly) or R (add: the return is R + the step rewards)
    process_final: str = "residual"
    # loss
    aggregation: str = "seq_mean_token_mean"
    max_len: int | None = None  # seq_sum_const constant; None = the rollout's max_new_tokens
    clip_low: float = 0.2
    clip_high: float | None = None  # None = clip_low
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_in: str = "loss"  # loss | reward
    entropy_coef: float = 0.0
    mu: int = 1  # inner epochs over each batch of rollouts
    # a stale batch (rollout.max_staleness > 0): truncated importance weight min(pi_old / mu, tis_cap) per token
    # (tokenmdp.algos.correction.truncated_is; verl's token TIS default 2)
    tis_cap: float = 2.0
    # PPO critic
    critic: bool = False
    gamma: float = 1.0
    lam: float = 0.95
    value_clip: float | None = 0.2
    value_coef: float = 0.5
    # DAPO extras
    filter_groups: bool = False  # dynamic sampling: drop groups whose rewards are all equal
    overlong_buffer: int = 0  # soft overlong penalty over the last `overlong_buffer` tokens (0 = off)
    overlong_penalty: float = 1.0
    # filtered iterative SFT
    isft_mode: str = "+-"
    isft_weighting: str = "constant"
    isft_pos_weight: float = 1.0
    isft_neg_weight: float = 1.0
    # DPO
    dpo_beta: float = 0.1
    dpo_loss_type: str = "sigmoid"
    dpo_label_smoothing: float = 0.0
    description: str = ""

    def __post_init__(self) -> None:
        for field_name, allowed in CHOICES.items():
            value = getattr(self, field_name)
            if value not in allowed:
                raise TokenMDPError(f"algo field {field_name!r} is {value!r}; choose from {', '.join(allowed)}")
        for field_name in _NON_NEGATIVE:
            value = getattr(self, field_name)
            if value is not None and value < 0:
                raise TokenMDPError(f"algo field {field_name!r} must be >= 0, got {value}")
        for field_name in _UNIT:
            if not 0.0 <= getattr(self, field_name) <= 1.0:
                raise TokenMDPError(f"algo field {field_name!r} must be in [0, 1], got {getattr(self, field_name)}")
        if self.mu < 1:
            raise TokenMDPError(f"algo field 'mu' must be >= 1, got {self.mu}")
        if self.max_len is not None and self.max_len < 1:
            raise TokenMDPError(f"algo field 'max_len' must be >= 1 or None, got {self.max_len}")
        if not self.tis_cap > 0:
            raise TokenMDPError(f"algo field 'tis_cap' must be > 0, got {self.tis_cap}")
        if self.dpo_beta <= 0:
            raise TokenMDPError(f"algo field 'dpo_beta' must be > 0, got {self.dpo_beta}")
        if self.advantage == "gae" and not self.critic:
            raise TokenMDPError("algo field 'advantage' is 'gae' but 'critic' is false (GAE needs a critic)")
        if self.returns == "to_go" and self.advantage == "grpo" and self.std_scale != "none":
            raise TokenMDPError(
                "algo field 'returns' is 'to_go' but 'std_scale' is not 'none': a return-to-go minus a group "
                "baseline is defined without std scaling"
            )
        if self.overlong_buffer < 0:
            raise TokenMDPError(f"algo field 'overlong_buffer' must be >= 0, got {self.overlong_buffer}")

    @property
    def needs_reference(self) -> bool:
        """Whether a frozen reference model is needed (a non-zero KL weight, or DPO)."""
        return self.kind == "dpo" or (self.kind == "pg" and self.kl_coef > 0)

    @property
    def group_based(self) -> bool:
        """Whether the advantage needs groups of responses to the same prompt."""
        return (self.kind == "pg" and self.advantage in ("grpo", "rloo")) or self.kind == "dpo"

    @property
    def kl_in_reward(self) -> bool:
        """Whether the KL is subtracted from the token rewards (PPO-RLHF) rather than added to the loss."""
        return self.kl_in == "reward" and self.kl_coef > 0

    @property
    def loss_kl_coef(self) -> float:
        """The KL weight of the loss term (0 when the KL sits in the reward or is off)."""
        return self.kl_coef if self.kl_in == "loss" else 0.0

    @property
    def credit_kwargs(self) -> dict[str, float]:
        """Keyword arguments of :func:`tokenmdp.mdp.credit.assign_credit` for this spec's credit."""
        return {"gamma": self.credit_gamma} if self.credit == "discounted" else {}

    def divisor(self, max_new_tokens: int) -> int:
        """The constant of the ``seq_sum_const`` aggregation: ``max_len``, else the rollout's ``max_new_tokens``."""
        return self.max_len or max_new_tokens

    def trains_on_pairs(self, dpo_data: object | None) -> bool:
        """Whether a step trains on offline preference pairs (DPO with a pairs file) instead of rollouts."""
        return self.kind == "dpo" and dpo_data is not None

    def choices(self) -> dict[str, Any]:
        """The fields that matter for this spec, in a fixed order (for printing); irrelevant knobs are hidden."""
        keys = ["kind"]
        if self.kind == "pg":
            keys += ["advantage"]
            keys += {"grpo": ["std_scale"] + (["std"] if self.std_scale != "none" else []),
                     "rloo": [], "reinforce": ["baseline"], "gae": ["critic", "gamma", "lam"]}[self.advantage]
            keys += ["credit"] + (["process_final"] if self.credit == "process" else [])
            keys += ["returns", "whiten_advantages", "aggregation", "clip_low", "clip_high", "kl_coef"]
            keys += ["kl_estimator", "kl_in"] if self.kl_coef > 0 else []
            keys += ["entropy_coef", "mu"]
            keys += ["filter_groups"] if self.filter_groups else []
            keys += ["overlong_buffer", "overlong_penalty"] if self.overlong_buffer > 0 else []
        elif self.kind == "isft":
            keys += ["isft_mode", "isft_weighting"]
            keys += ["advantage", "std_scale", "std"] if self.isft_weighting == "advantage" else []
            keys += ["aggregation", "mu"]
        else:
            keys += ["dpo_beta", "dpo_loss_type", "dpo_label_smoothing", "mu"]
        return {k: getattr(self, k) for k in keys}


def _preset(name: str, description: str, **choices: Any) -> AlgoSpec:
    return AlgoSpec(name=name, description=description, **choices)


_PG_ONE_EPOCH = dict(kind="pg", mu=1, clip_low=0.2)
PRESETS: dict[str, AlgoSpec] = {
    spec.name: spec
    for spec in [
        _preset("reinforce", "R - moving-average baseline; token sum / constant; no KL",
                advantage="reinforce", baseline="moving_average", aggregation="seq_sum_const", **_PG_ONE_EPOCH),
        _preset("rloo", "leave-one-out group baseline; token sum / constant; no KL",
                advantage="rloo", aggregation="seq_sum_const", **_PG_ONE_EPOCH),
        _preset("grpo", "group mean/std advantage; per-sequence token mean; clip 0.2; k3 KL 0.04 in the loss",
                advantage="grpo", std_scale="group", std="unbiased", aggregation="seq_mean_token_mean",
                kl_coef=0.04, kl_estimator="k3", kl_in="loss", **_PG_ONE_EPOCH),
        _preset("grpo_nokl", "grpo without the KL term (the paper's 'GRPO no KL'; the form the reduction is about)",
                advantage="grpo", std_scale="group", std="unbiased", aggregation="seq_mean_token_mean",
                **_PG_ONE_EPOCH),
        _preset("bnpo", "grpo with the token-mean aggregation",
                advantage="grpo", std_scale="group", std="unbiased", aggregation="token_mean",
                kl_coef=0.04, kl_estimator="k3", kl_in="loss", **_PG_ONE_EPOCH),
        _preset("dr_grpo", "group mean, no std; token sum / constant max_len; no KL",
                advantage="grpo", std_scale="none", aggregation="seq_sum_const", **_PG_ONE_EPOCH),
        _preset("dapo", "group mean/std; token mean; clip 0.2/0.28; no KL; dynamic sampling; overlong penalty",
                advantage="grpo", std_scale="group", std="unbiased", aggregation="token_mean", clip_high=0.28,
                filter_groups=True, overlong_buffer=16, **_PG_ONE_EPOCH),
        _preset("ppo", "critic + GAE(1, 0.95), whitened; token mean; clip 0.2; k1 KL 0.05 in the reward; 2 epochs",
                kind="pg", advantage="gae", critic=True, gamma=1.0, lam=0.95, whiten_advantages=True,
                credit="terminal", aggregation="token_mean", clip_low=0.2, kl_coef=0.05, kl_estimator="k1",
                kl_in="reward", mu=2),
        _preset("dpo", "sigmoid preference loss, beta 0.1, on-policy best-vs-worst pairs",
                kind="dpo", dpo_beta=0.1, dpo_loss_type="sigmoid", aggregation="token_mean"),
        _preset("isft+", "SFT on the correct responses (token mean)",
                kind="isft", isft_mode="+", isft_weighting="constant", aggregation="token_mean"),
        _preset("isft-", "negated-likelihood steps on the incorrect responses (token mean)",
                kind="isft", isft_mode="-", isft_weighting="constant", aggregation="token_mean"),
        _preset("isft+-", "both: + on correct, - on incorrect (token mean)",
                kind="isft", isft_mode="+-", isft_weighting="constant", aggregation="token_mean"),
        _preset("isft+-adv", "both, weighted by the GRPO advantage / length (the form GRPO reduces to)",
                kind="isft", isft_mode="+-", isft_weighting="advantage", advantage="grpo", std="unbiased",
                aggregation="seq_mean_token_mean"),
    ]
}


def _coerce(name: str, value: Any, ftype: str) -> Any:
    """Check an override against the field's type; strings (command line) are read by
    :func:`tokenmdp.values.parse_value` first, and integral floats (YAML) are accepted for integer fields."""
    optional, base = "None" in ftype, ftype.split("|")[0].strip()
    if isinstance(value, str) and base != "str":  # "none" (any case) means None, as "null" does
        value = None if value.strip().lower() == "none" else parse_value(value, where=f"algo field {name!r}")
    if value is None:
        if optional:
            return None
        raise TokenMDPError(f"algo field {name!r} cannot be None")
    bad = TokenMDPError(f"algo field {name!r}: cannot read {value!r} as {base}")
    if base == "str":
        if not isinstance(value, str):
            raise bad
        return value
    if base == "bool":
        if isinstance(value, bool):
            return value
        if value in (0, 1):
            return bool(value)
        raise bad
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad
    if base == "int":
        if float(value) != int(value):
            raise bad
        return int(value)
    return float(value)


def get_algo(name: str | AlgoSpec, **overrides: Any) -> AlgoSpec:
    """The preset ``name`` with ``overrides`` applied; an unknown name or field raises :class:`TokenMDPError`.

    Override values are checked against the field types: strings from the command line are parsed
    (``"0.3"``, ``"true"``, ``"none"``), integral floats are accepted for integer fields (``mu=2.0``).
    """
    if isinstance(name, AlgoSpec):
        base = name
    elif name in PRESETS:
        base = PRESETS[name]
    else:
        raise TokenMDPError(f"unknown algorithm {name!r}; choose from {', '.join(PRESETS)}")
    known = {f.name: str(f.type) for f in fields(AlgoSpec)}
    clean: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in known:
            raise TokenMDPError(f"unknown algo field {key!r}; fields: {', '.join(sorted(known))}")
        clean[key] = _coerce(key, value, known[key])
    return dataclasses.replace(base, **clean)


def describe(names: list[str] | None = None) -> str:
    """A plain-text table of the presets' choices (``names`` default: all), one line per preset."""
    names = list(PRESETS) if names is None else names
    lines = []
    for n in names:
        spec = get_algo(n)
        parts = ", ".join(f"{k}={v}" for k, v in spec.choices().items())
        lines.append(f"{n:<10} {spec.description}\n{'':<10} {parts}")
    return "\n".join(lines)


def compute_advantages(
    spec: AlgoSpec,
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    group_size: int,
    values: torch.Tensor | None = None,
    token_rewards: torch.Tensor | None = None,
    baseline_state: torch.Tensor | None = None,
    max_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The advantages (B, T) that ``spec`` asks for; returns ``(advantages, returns, baseline_state)``.

    ``rewards`` (B,) are the verifier rewards (groups contiguous). ``token_rewards`` (B, T), when given, replace
    the credit assignment of ``spec.credit`` (e.g. with KL in the reward, or process rewards); otherwise they are
    ``assign_credit(spec.credit, rewards, response_mask)``. Sequence estimators (grpo, rloo, reinforce) use the
    sequence return ``R_i = sum_t token_rewards`` on every token (``returns="sequence"``) or the return-to-go
    ``G_t`` minus the same per-sequence baseline (``returns="to_go"``; only for estimators without std scaling,
    so that ``A_t = G_t - b_i``). ``gae`` needs ``values`` (B, T) and
    returns the critic targets as ``returns``. DAPO's overlong penalty (``spec.overlong_buffer > 0``, needs
    ``max_len``) is added to the rewards first. ``baseline_state`` is REINFORCE's moving average (pass back the
    returned one next step).
    """
    mask = response_mask.to(torch.bool)
    dtype = rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()
    rewards = rewards.to(dtype)
    if spec.overlong_buffer > 0:
        if max_len is None:
            raise TokenMDPError("algo field 'overlong_buffer' is set but no max_len was given to compute_advantages")
        penalty = overlong_penalty(mask.sum(-1), max_len=max_len, buffer=spec.overlong_buffer,
                                   penalty=spec.overlong_penalty).to(dtype)
        rewards = rewards + penalty
        if token_rewards is not None:
            token_rewards = token_rewards + assign_credit("terminal", penalty, mask)
    if token_rewards is None:
        if spec.credit == "process":
            raise TokenMDPError("credit 'process' needs token_rewards from the step verifier (mdp.credit.process)")
        token_rewards = assign_credit(spec.credit, rewards, mask, **spec.credit_kwargs)
    returns = None
    if spec.advantage == "gae":
        if values is None:
            raise TokenMDPError("advantage 'gae' needs values from the critic")
        adv, returns = gae(token_rewards, values, mask, gamma=spec.gamma, lam=spec.lam)
    else:
        seq_return = token_rewards.sum(dim=-1)
        if spec.advantage == "grpo":
            seq_adv = grpo_advantages(seq_return, group_size=group_size, scale=spec.std_scale, std=spec.std,
                                      eps=spec.advantage_eps)
        elif spec.advantage == "rloo":
            seq_adv = rloo_advantages(seq_return, group_size=group_size)
        else:
            seq_adv, baseline_state = reinforce_advantages(seq_return, baseline=spec.baseline,
                                                           state=baseline_state, momentum=spec.baseline_momentum)
        adv = seq_adv.unsqueeze(-1).expand(mask.shape).clone()
        if spec.returns == "to_go":  # unscaled estimators: A_t = G_t - b_i = A_i + (G_t - R_i)
            adv = adv + returns_to_go(token_rewards, mask, gamma=1.0) - seq_return.unsqueeze(-1)
    if spec.whiten_advantages:
        adv = whiten(adv, mask)
    return torch.where(mask, adv, torch.zeros((), dtype=adv.dtype)), returns, baseline_state


__all__ = ["AlgoSpec", "PRESETS", "CHOICES", "get_algo", "describe", "compute_advantages"]
