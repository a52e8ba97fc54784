"""The algorithm presets: every algorithm of the family as a visible set of choices.

An :class:`AlgoSpec` names one choice on each axis of the family (``docs/design.md``): the kind of update (``pg``,
``isft``, ``dpo``), the advantage estimator and its scaling, the credit assignment, the loss aggregation, the
ratio clip, the KL (estimator, weight, in the loss or in the reward), the entropy bonus, the number of inner
``epochs`` over each batch, and whether a critic is trained. :data:`PRESETS` holds the named algorithms;
``describe()`` prints
their choices side by side; ``get_algo(name, **overrides)`` builds a custom mix (``--set algo.aggregation=...``).
:func:`tokenmdp.algos.core.compute_advantages` turns rewards into the advantages a spec asks for. The field
types are ``Literal`` choices checked by the project's one coercer (:mod:`tokenmdp.schema`).

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
* ``gspo``, ``cispo``, ``sapo``: how the importance ratio enters the loss, the peers' 2025 variants (GSPO's one
  ratio per response, CISPO's clipped weight on ``log pi``, SAPO's soft gate; :func:`tokenmdp.algos.core.
  policy_loss`). On-policy, with one optimizer step per batch, each takes its aggregation's REINFORCE step; they
  differ with minibatches, epochs or a stale batch.
* ``raft++``, ``reinforce_rej``, ``w_reinforce``: the controls the literature compares GRPO with. RAFT++ trains
  on the correct responses only, with the importance ratio and its clip (Xiong et al. 2025). Reinforce-Rej is
  REINFORCE with the group mean as baseline, dropping groups whose rewards all agree; Xiong et al. credit most
  of GRPO's edge over RAFT to that drop. W-REINFORCE (Zhu et al. 2025, the NSR paper) rewards +0.1 for a
  correct response and -1 for a wrong one: negatives carry most of the weight.
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
from dataclasses import dataclass
from typing import Any, Literal

from tokenmdp.algos.core import Aggregation, KLEstimator, RatioLoss
from tokenmdp.errors import TokenMDPError
from tokenmdp.schema import Where, check_fields, hints, literal_choices

@dataclass(frozen=True)
class AlgoSpec:
    """One algorithm: a choice on every axis. Fields are validated on creation (errors name the field)."""

    name: str = "custom"
    kind: Literal["pg", "isft", "dpo"] = "pg"
    # advantages
    advantage: Literal["grpo", "rloo", "reinforce", "gae"] = "grpo"
    std_scale: Literal["group", "batch", "none"] = "group"  # grpo's std division
    std: Literal["population", "unbiased"] = "unbiased"
    advantage_eps: float = 1e-6
    baseline: Literal["none", "batch_mean", "moving_average"] = "none"  # reinforce's baseline
    baseline_momentum: float = 0.9
    returns: Literal["sequence", "to_go"] = "sequence"  # R_i on every token, or the return-to-go of token rewards
    whiten_advantages: bool = False
    # credit assignment (token rewards for gae / to_go)
    credit: Literal["terminal", "uniform", "discounted", "process"] = "terminal"
    credit_gamma: float = 1.0
    # credit "process": the last token gets R - sum of the step rewards (residual: the return stays R, so with
    # sequence returns the update is uniform credit's exactly) or R (add: the return is R + the step rewards)
    process_final: Literal["residual", "add"] = "residual"
    # loss
    aggregation: Aggregation = "seq_mean_token_mean"
    max_len: int | None = None  # seq_sum_const constant; None = the rollout's max_new_tokens
    clip_low: float = 0.2
    clip_high: float | None = None  # None = clip_low
    # how the importance ratio enters the loss: PPO's clip, GSPO's sequence ratio, CISPO's clipped weight, SAPO's
    # soft gate (tokenmdp.algos.core.policy_loss); all equal the REINFORCE gradient on-policy
    ratio_loss: RatioLoss = "clip"
    sapo_tau_pos: float = 1.0  # SAPO's gate temperature where A > 0
    sapo_tau_neg: float = 1.05  # and where A < 0 (steeper: negative updates decay faster off-policy)
    kl_coef: float = 0.0
    kl_estimator: KLEstimator = "k3"
    kl_in: Literal["loss", "reward"] = "loss"
    entropy_coef: float = 0.0
    epochs: int = 1  # passes over each batch of rollouts (PPO's inner epochs; TRL's num_iterations)
    # a batch whose sampler is not pi_old (rollout.max_staleness > 0, or rollout.recompute_logprobs: an inference
    # engine's numerics): importance weight pi_old / behaviour per token or per response, truncated at tis_cap or
    # masked above it (tokenmdp.algos.core.truncated_is; verl's token TIS default 2; TRL's vllm_importance_sampling)
    tis_cap: float = 2.0
    tis_level: Literal["token", "sequence"] = "token"
    tis_mode: Literal["truncate", "mask"] = "truncate"
    # PPO critic
    critic: bool = False
    gamma: float = 1.0
    lam: float = 0.95
    value_clip: float | None = 0.2
    value_coef: float = 0.5
    # DAPO extras
    filter_groups: bool = False  # dynamic sampling: drop groups whose rewards are all equal
    # the rows a policy-gradient update trains on: all, or the correct ones only (RAFT++: positives with the
    # ratio's clip; normalisers count the kept rows)
    keep: Literal["all", "correct"] = "all"
    overlong_buffer: int = 0  # soft overlong penalty over the last `overlong_buffer` tokens (0 = off)
    overlong_penalty: float = 1.0
    # filtered iterative SFT
    isft_mode: Literal["+", "-", "+-"] = "+-"
    isft_weighting: Literal["constant", "advantage"] = "constant"
    isft_pos_weight: float = 1.0
    isft_neg_weight: float = 1.0
    # DPO
    dpo_beta: float = 0.1
    dpo_loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    dpo_label_smoothing: float = 0.0
    description: str = ""

    def __post_init__(self) -> None:
        for field_name, allowed in CHOICES.items():
            value = getattr(self, field_name)
            if value not in allowed:
                raise TokenMDPError(f"algo field {field_name!r} is {value!r}; choose one of "
                                    f"{', '.join(repr(a) for a in allowed)}")
        for field_name in _NON_NEGATIVE:
            value = getattr(self, field_name)
            if value is not None and value < 0:
                raise TokenMDPError(f"algo field {field_name!r} must be >= 0, got {value}")
        for field_name in _UNIT:
            if not 0.0 <= getattr(self, field_name) <= 1.0:
                raise TokenMDPError(f"algo field {field_name!r} must be in [0, 1], got {getattr(self, field_name)}")
        if self.epochs < 1:
            raise TokenMDPError(f"algo field 'epochs' must be >= 1, got {self.epochs}")
        if self.max_len is not None and self.max_len < 1:
            raise TokenMDPError(f"algo field 'max_len' must be >= 1 or None, got {self.max_len}")
        if not self.tis_cap > 0:
            raise TokenMDPError(f"algo field 'tis_cap' must be > 0, got {self.tis_cap}")
        if not (self.sapo_tau_pos > 0 and self.sapo_tau_neg > 0):
            raise TokenMDPError(f"algo fields 'sapo_tau_pos' and 'sapo_tau_neg' must be > 0, got "
                                f"{self.sapo_tau_pos} and {self.sapo_tau_neg}")
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
            keys += ["returns", "whiten_advantages", "aggregation"]
            keys += ["ratio_loss"] if self.ratio_loss != "clip" else []
            keys += ["sapo_tau_pos", "sapo_tau_neg"] if self.ratio_loss == "sapo" else ["clip_low", "clip_high"]
            keys += ["kl_coef"]
            keys += ["kl_estimator", "kl_in"] if self.kl_coef > 0 else []
            keys += ["entropy_coef", "epochs"]
            keys += ["filter_groups"] if self.filter_groups else []
            keys += ["keep"] if self.keep != "all" else []
            keys += ["overlong_buffer", "overlong_penalty"] if self.overlong_buffer > 0 else []
        elif self.kind == "isft":
            keys += ["isft_mode", "isft_weighting"]
            keys += ["advantage", "std_scale", "std"] if self.isft_weighting == "advantage" else []
            keys += ["aggregation", "epochs"]
        else:
            keys += ["dpo_beta", "dpo_loss_type", "dpo_label_smoothing", "epochs"]
        return {k: getattr(self, k) for k in keys}


#: The allowed values of every choice field, read off its ``Literal`` type.
CHOICES: dict[str, tuple] = {k: literal_choices(h) for k, h in hints(AlgoSpec).items() if literal_choices(h)}
#: Fields renamed since earlier versions (named in the unknown-field error).
RENAMED = {"mu": "epochs"}
_NON_NEGATIVE = ("clip_low", "clip_high", "kl_coef", "entropy_coef", "value_coef", "overlong_penalty",
                 "isft_pos_weight", "isft_neg_weight", "advantage_eps")
_UNIT = ("gamma", "lam", "credit_gamma", "baseline_momentum")


def _preset(name: str, description: str, **choices: Any) -> AlgoSpec:
    return AlgoSpec(name=name, description=description, **choices)


_PG_ONE_EPOCH = dict(kind="pg", epochs=1, clip_low=0.2)
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
        _preset("gspo", "grpo_nokl with one clipped ratio per response (the mean log-ratio), clip 3e-4/4e-4",
                advantage="grpo", std_scale="group", std="unbiased", aggregation="seq_mean_token_mean",
                ratio_loss="gspo", **(_PG_ONE_EPOCH | dict(clip_low=3e-4, clip_high=4e-4))),
        _preset("cispo", "group mean/std; token mean; the ratio clipped (<= 1.28, no lower bound) as a detached "
                "weight on log pi: no token loses its gradient",
                advantage="grpo", std_scale="group", std="unbiased", aggregation="token_mean", ratio_loss="cispo",
                **(_PG_ONE_EPOCH | dict(clip_low=1.0, clip_high=0.28))),
        _preset("sapo", "group mean/std; token mean; a soft sigmoid gate of the ratio (tau 1.0 / 1.05) for the clip",
                advantage="grpo", std_scale="group", std="unbiased", aggregation="token_mean", ratio_loss="sapo",
                **_PG_ONE_EPOCH),
        # the controls of the literature (Xiong et al. 2025, arXiv 2504.11343; Zhu et al. 2025, arXiv 2506.01347)
        _preset("raft++", "positives only, advantage = reward (1), with the ratio's clip 0.2; token mean over the "
                "kept responses",
                advantage="reinforce", baseline="none", keep="correct", aggregation="token_mean", **_PG_ONE_EPOCH),
        _preset("reinforce_rej", "group mean, no std; groups all right or all wrong dropped; token mean; no KL",
                advantage="grpo", std_scale="none", filter_groups=True, aggregation="token_mean", **_PG_ONE_EPOCH),
        _preset("w_reinforce", "REINFORCE with reward +0.1 for a correct response and -1 for a wrong one: "
                "isft+- with positives down-weighted to 0.1; token mean",
                kind="isft", isft_mode="+-", isft_weighting="constant", isft_pos_weight=0.1, isft_neg_weight=1.0,
                aggregation="token_mean"),
        _preset("ppo", "critic + GAE(1, 0.95), whitened; token mean; clip 0.2; k1 KL 0.05 in the reward; 2 epochs",
                kind="pg", advantage="gae", critic=True, gamma=1.0, lam=0.95, whiten_advantages=True,
                credit="terminal", aggregation="token_mean", clip_low=0.2, kl_coef=0.05, kl_estimator="k1",
                kl_in="reward", epochs=2),
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


def get_algo(name: str | AlgoSpec, **overrides: Any) -> AlgoSpec:
    """The preset ``name`` with ``overrides`` applied; an unknown name or field raises :class:`TokenMDPError`.

    Override values go through the project's one coercer (:func:`tokenmdp.schema.check_fields`): strings from the
    command line are parsed (``"0.3"``, ``"true"``, ``"none"``), integral floats are accepted for integer fields.
    """
    if isinstance(name, AlgoSpec):
        base = name
    elif name in PRESETS:
        base = PRESETS[name]
    else:
        raise TokenMDPError(f"unknown algorithm {name!r}; choose from {', '.join(PRESETS)}")
    return dataclasses.replace(base, **check_fields(AlgoSpec, overrides, Where("algo field"), renamed=RENAMED))


def describe(names: list[str] | None = None) -> str:
    """A plain-text table of the presets' choices (``names`` default: all), one line per preset."""
    names = list(PRESETS) if names is None else names
    lines = []
    for n in names:
        spec = get_algo(n)
        parts = ", ".join(f"{k}={v}" for k, v in spec.choices().items())
        lines.append(f"{n:<10} {spec.description}\n{'':<10} {parts}")
    return "\n".join(lines)


__all__ = ["AlgoSpec", "CHOICES", "PRESETS", "describe", "get_algo"]
