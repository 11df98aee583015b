"""Loss functions: the DPO family of preference losses, DPOLossFn, NLLLossFn, the
policy-gradient losses of RL with generation (ClippedPGLossFn), the critic's (ValueLossFn) and
the reward model's (BradleyTerryLossFn).

Each preference loss is a pure function of the four per-sequence log-probs of a set of pairs

    fn(policy_chosen_logps, policy_rejected_logps,
       reference_chosen_logps, reference_rejected_logps, /, *, beta, **params)
        -> per-pair losses [num_pairs]

(written pc, pr, rc, rr in the code; positional-only), where every input is `[num_pairs]`
(log-probs already summed, or averaged, over the response tokens), and params are the further
`dpo.*` keys the loss takes (label_smoothing, simpo_gamma, ...). s(x) is the logistic sigmoid
and h = (pc - rc) - (pr - rr) the DPO margin. `PREFERENCE_LOSSES` maps the config name
(`dpo.loss_type`) to a `LossSpec`: the function, its params, its label-smoothing range and the
settings it requires; validation and DPOLossFn read that one table. The definitions follow TRL's `DPOTrainer` (1.16) except
where docs/guides/dpo.md says otherwise (label smoothing in `sigmoid`, the `aot_pair` name, `ipo`
averaging, `simpo`); the papers are cited in each docstring.

`DPOLossFn` and `NLLLossFn` follow the calling convention of docs/design.md: called once per
micro-batch, they return that micro-batch's share of the global-batch loss (already divided by
global counts) and additive metrics.

This module imports neither ray nor torch.distributed.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from rl_toolkit.config_schema import (
    DPOLossConfig,
    PGLossConfig,
    ValueLossConfig,
    check_pg_loss_config,
)
from rl_toolkit.utils.config import ConfigError

Tensor = torch.Tensor


def _margins(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> Tensor:
    """DPO's implicit reward margin (pc - rc) - (pr - rr), `[num_pairs]`."""
    return (pc - pr) - (rc - rr)


def _smoothed_logistic(z: Tensor, label_smoothing: float) -> Tensor:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z): logistic loss with flipped-label noise."""
    return -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing


def sigmoid_loss(
    pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, /, *, beta: float, label_smoothing: float
) -> Tensor:
    """DPO: -(1 - eps) log s(beta h) - eps log s(-beta h), h = (pc - rc) - (pr - rr).

    Rafailov et al. 2023, "Direct Preference Optimization", eq. 7. With eps > 0 this is
    conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"), which assumes a
    fraction eps of the labels is flipped.
    """
    return _smoothed_logistic(beta * _margins(pc, pr, rc, rr), label_smoothing)


def robust_loss(
    pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, /, *, beta: float, label_smoothing: float
) -> Tensor:
    """Robust DPO: [-(1 - eps) log s(beta h) + eps log s(-beta h)] / (1 - 2 eps).

    Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback":
    an unbiased estimate of the clean-label loss when a fraction eps < 0.5 is flipped.
    """
    z = beta * _margins(pc, pr, rc, rr)
    smoothed = -F.logsigmoid(z) * (1 - label_smoothing) + F.logsigmoid(-z) * label_smoothing
    return smoothed / (1 - 2 * label_smoothing)


def hinge_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, /, *, beta: float) -> Tensor:
    """SLiC hinge: max(0, 1 - beta h).

    Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback" (with the reference-normalised margin h and 1/beta as the margin).
    """
    return torch.relu(1 - beta * _margins(pc, pr, rc, rr))


def ipo_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, /, *, beta: float) -> Tensor:
    """IPO: (h - 1 / (2 beta))^2, where beta plays the role of the paper's tau.

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences". The paper uses log-probs averaged over tokens
    (`dpo.preference_average_log_probs: true`).
    """
    return (_margins(pc, pr, rc, rr) - 1 / (2 * beta)) ** 2


def exo_pair_loss(
    pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, /, *, beta: float, label_smoothing: float
) -> Tensor:
    """EXO (pairwise): reverse KL between the model's and the smoothed label distribution.

    loss = s(beta h) (log s(beta h) - log(1 - eps)) + s(-beta h) (log s(-beta h) - log eps).
    Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment";
    eps (label_smoothing) must be in (0, 0.5); the paper uses 1e-3.
    """
    z = beta * _margins(pc, pr, rc, rr)
    chosen_term = z.sigmoid() * (F.logsigmoid(z) - math.log(1 - label_smoothing))
    rejected_term = (-z).sigmoid() * (F.logsigmoid(-z) - math.log(label_smoothing))
    return chosen_term + rejected_term


def nca_pair_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, /, *, beta: float) -> Tensor:
    """NCA (pairwise): -log s(r_c) - 0.5 log s(-r_c) - 0.5 log s(-r_r), r = beta (logp - ref).

    Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards":
    optimises absolute likelihoods, so the chosen log-prob is pushed up, not only the
    margin.
    """
    chosen_rewards = beta * (pc - rc)
    rejected_rewards = beta * (pr - rr)
    return (
        -F.logsigmoid(chosen_rewards)
        - 0.5 * F.logsigmoid(-chosen_rewards)
        - 0.5 * F.logsigmoid(-rejected_rewards)
    )


def bco_pair_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, /, *, beta: float) -> Tensor:
    """BCO (pairwise): -log s(r_c - delta) - log s(-(r_r - delta)), r = beta (logp - ref).

    Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment".
    The paper (and earlier TRL releases) set the reference point delta to a running mean of the
    rewards kept by each trainer process. Here, as in TRL 1.16, delta = 0: a per-worker running
    mean would make the update depend on the number of workers and on the micro-batch split, and
    the rewards start at 0 when the policy starts from the reference, so the two agree at the
    start of training.
    """
    return -F.logsigmoid(beta * (pc - rc)) - F.logsigmoid(-beta * (pr - rr))


def sppo_hard_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, /, *, beta: float) -> Tensor:
    """SPPO with hard labels: (a - 1 / (2 beta))^2 + (b + 1 / (2 beta))^2.

    a = pc - rc, b = pr - rr. Wu et al. 2024, "Self-Play Preference Optimization for Language
    Model Alignment", with win probability 1 for chosen and 0 for rejected.
    """
    return (pc - rc - 0.5 / beta) ** 2 + (pr - rr + 0.5 / beta) ** 2


def aot_loss(
    pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, /, *, beta: float, label_smoothing: float
) -> Tensor:
    """AOT for paired data: sigmoid loss on sort(pc - pr) - sort(rc - rr).

    Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport":
    the policy's margins should stochastically dominate the reference's. The sort runs
    over the pairs this function receives, i.e. one micro-batch on one worker, so the loss
    depends on the micro-batch size (see docs/guides/dpo.md).
    """
    delta = torch.sort(pc - pr, dim=0).values - torch.sort(rc - rr, dim=0).values
    return _smoothed_logistic(beta * delta, label_smoothing)


def aot_pair_loss(
    pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, /, *, beta: float, label_smoothing: float
) -> Tensor:
    """AOT for unpaired data: sigmoid loss on sort(pc - rc) - sort(pr - rr).

    Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport":
    chosen log-ratios should dominate rejected ones, whichever pairs they come from (TRL 1.16
    calls this loss `aot_unpaired`). Sorted within the micro-batch, as for `aot_loss`.
    """
    delta = torch.sort(pc - rc, dim=0).values - torch.sort(pr - rr, dim=0).values
    return _smoothed_logistic(beta * delta, label_smoothing)


def apo_zero_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, /, *, beta: float) -> Tensor:
    """APO-zero: (1 - s(beta (pc - rc))) + s(beta (pr - rr)).

    D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions":
    raises the chosen and lowers the rejected likelihood; for chosen outputs better
    than the model's own.
    """
    return (1 - torch.sigmoid(beta * (pc - rc))) + torch.sigmoid(beta * (pr - rr))


def apo_down_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, /, *, beta: float) -> Tensor:
    """APO-down: s(beta (pc - rc)) + (1 - s(beta ((pc - rc) - (pr - rr)))).

    D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions":
    lowers both likelihoods, the rejected more; for chosen outputs worse than the
    model's own.
    """
    chosen_ratio = pc - rc
    return torch.sigmoid(beta * chosen_ratio) + (
        1 - torch.sigmoid(beta * (chosen_ratio - (pr - rr)))
    )


def discopop_loss(
    pc: Tensor,
    pr: Tensor,
    rc: Tensor,
    rr: Tensor,
    /,
    *,
    beta: float,
    discopop_tau: float,
) -> Tensor:
    """DiscoPOP (log-ratio modulated loss): (1 - m) (-log s(z)) + m exp(-z).

    z = beta h, m = s(z / tau). Chris Lu et al. 2024, "Discovering Preference Optimization
    Algorithms with and without Human Intervention", eq. 5: blends the logistic (DPO) and
    exponential losses, with the blend set by the margin; tau is `dpo.discopop_tau`. For
    |z| of the order of tau the loss is not monotone in the margin (near z = 0 it rises with
    z).
    """
    z = beta * _margins(pc, pr, rc, rr)
    modulation = torch.sigmoid(z / discopop_tau)
    return -F.logsigmoid(z) * (1 - modulation) + torch.exp(-z) * modulation


def simpo_loss(
    pc: Tensor,
    pr: Tensor,
    rc: Tensor,
    rr: Tensor,
    /,
    *,
    beta: float,
    simpo_gamma: float,
    label_smoothing: float,
) -> Tensor:
    """SimPO: -(1 - eps) log s(beta (pc - pr) - gamma) - eps log s(-(beta (pc - pr) - gamma)).

    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward". Reference-free with length-averaged log-probs (DPOLossFn enforces both); the
    reference inputs are ignored.
    """
    return _smoothed_logistic(beta * (pc - pr) - simpo_gamma, label_smoothing)


@dataclass(frozen=True)
class LossSpec:
    """A preference loss and what it reads from the `dpo` config section.

    fn: the loss, `fn(pc, pr, rc, rr, *, beta, **{key: cfg[key] for key in params})`.
    params: the further `dpo.*` keys it takes, by keyword (label_smoothing only where used).
    smoothing: (low, high): the loss takes `label_smoothing` eps with low <= eps < high; None:
        it does not, and eps must be 0.
    requires: `dpo.*` values the loss is defined for, e.g. SimPO is reference-free.
    """

    fn: Callable[..., Tensor]
    params: tuple[str, ...] = ()
    smoothing: tuple[float, float] | None = None
    requires: tuple[tuple[str, bool], ...] = ()


_SMOOTHED = (0.0, 0.5)  # a fraction of flipped labels below one half
PREFERENCE_LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(sigmoid_loss, ("label_smoothing",), _SMOOTHED),
    "robust": LossSpec(robust_loss, ("label_smoothing",), _SMOOTHED),
    "hinge": LossSpec(hinge_loss),
    "ipo": LossSpec(ipo_loss),
    # log(eps) appears in the loss: eps > 0
    "exo_pair": LossSpec(exo_pair_loss, ("label_smoothing",), (1e-12, 0.5)),
    "nca_pair": LossSpec(nca_pair_loss),
    "bco_pair": LossSpec(bco_pair_loss),
    "sppo_hard": LossSpec(sppo_hard_loss),
    "aot": LossSpec(aot_loss, ("label_smoothing",), _SMOOTHED),
    "aot_pair": LossSpec(aot_pair_loss, ("label_smoothing",), _SMOOTHED),
    "apo_zero": LossSpec(apo_zero_loss),
    "apo_down": LossSpec(apo_down_loss),
    "discopop": LossSpec(discopop_loss, ("discopop_tau",)),
    "simpo": LossSpec(
        simpo_loss,
        ("simpo_gamma", "label_smoothing"),
        _SMOOTHED,
        requires=(("reference_free", True), ("preference_average_log_probs", True)),
    ),
}


# Metrics that DPOLossFn reports as sums over valid pairs divided by the global pair count.
PAIR_MEAN_METRICS = (
    "accuracy",
    "rewards_chosen_mean",
    "rewards_rejected_mean",
    "reward_margin_mean",
    "logps_chosen_mean",
    "logps_rejected_mean",
)


def validate_dpo_loss_config(cfg: DPOLossConfig) -> None:
    """Raise ConfigError naming the `dpo.*` key if the loss parameters do not fit the loss."""
    loss_type = cfg["loss_type"]
    if loss_type not in PREFERENCE_LOSSES:
        raise ConfigError(
            f"dpo.loss_type: unknown loss type {loss_type!r}; "
            f"expected one of {sorted(PREFERENCE_LOSSES)}"
        )
    spec, eps = PREFERENCE_LOSSES[loss_type], cfg["label_smoothing"]
    if spec.smoothing is None and eps != 0:
        uses_it = sorted(name for name, other in PREFERENCE_LOSSES.items() if other.smoothing)
        raise ConfigError(
            f"dpo.label_smoothing must be 0 for loss_type {loss_type!r} (it does not use it); "
            f"got {eps}. Losses that use it: {uses_it}"
        )
    if spec.smoothing is not None and not spec.smoothing[0] <= eps < spec.smoothing[1]:
        bracket = "(0" if spec.smoothing[0] > 0 else "[0"
        raise ConfigError(
            f"dpo.label_smoothing must be in {bracket}, {spec.smoothing[1]}) for loss_type "
            f"{loss_type!r}, got {eps}"
        )
    unmet = [f"dpo.{key}={str(value).lower()}" for key, value in spec.requires if cfg[key] != value]
    if unmet:
        needed = " and ".join(f"dpo.{key}={str(value).lower()}" for key, value in spec.requires)
        raise ConfigError(f"dpo.loss_type {loss_type!r} needs {needed}; set {', '.join(unmet)}")


def _sequence_logps(logprobs: Tensor, token_mask: Tensor, average: bool) -> Tensor:
    """Per-sequence log-prob of the response, `[b]` from `[b, T]` log-probs and mask.

    Summed over response tokens, or divided by their number when `average` (a row without
    response tokens, e.g. a padding row, gives 0 rather than NaN).
    """
    logps = (logprobs * token_mask).sum(dim=-1)
    if average:
        logps = logps / token_mask.sum(dim=-1).clamp(min=1)
    return logps


class DPOLossFn:
    """The DPO-family loss of one micro-batch of interleaved pairs, normalised globally.

    L = preference_loss_weight * sum_pairs(L_pref) / N + sft_loss_weight * sum_pairs(L_sft) / N,
    N = number of valid pairs in the global batch = global_valid_seqs / 2. L_pref is the
    configured PREFERENCE_LOSSES entry; L_sft = -logp_c (per token when sft_average_log_probs).

    Args:
        cfg: the loss keys of the `dpo` config section; checked here (ConfigError on a bad value).
    """

    def __init__(self, cfg: DPOLossConfig) -> None:
        validate_dpo_loss_config(cfg)
        self.beta = cfg["reference_policy_kl_penalty"]
        self.preference_loss_weight = cfg["preference_loss_weight"]
        self.sft_loss_weight = cfg["sft_loss_weight"]
        self.preference_average_log_probs = cfg["preference_average_log_probs"]
        self.sft_average_log_probs = cfg["sft_average_log_probs"]
        self.reference_free = cfg["reference_free"]
        spec = PREFERENCE_LOSSES[cfg["loss_type"]]
        self.preference_loss = spec.fn
        self.loss_params = {key: cfg[key] for key in spec.params}

    def __call__(
        self,
        logprobs: Tensor,
        data: dict[str, Any],
        global_valid_seqs: Tensor,
        global_valid_toks: Tensor,
    ) -> tuple[Tensor, dict[str, float]]:
        """This micro-batch's share of the global-batch loss, and additive metrics.

        Args:
            logprobs: `[b, T]` float32 next-token log-probs of the micro-batch (b = 2 * pairs).
            data: the micro-batch with `token_mask` `[b, T]`, `sample_mask` `[b]` and, unless
                reference_free, `reference_policy_logprobs` `[b, T]`; rows interleaved
                `[c0, r0, c1, r1, ...]`.
            global_valid_seqs: 0-d tensor, valid sequences in the global batch (2 per pair).
            global_valid_toks: 0-d tensor, valid response tokens in the global batch (unused:
                the DPO loss is normalised per pair).

        Returns:
            (loss, metrics): the 0-d loss, and metrics that sum over micro-batches and workers
            to global-batch means (num_valid_samples sums to the number of valid pairs).
        """
        token_mask = data["token_mask"]
        sample_mask = data["sample_mask"]
        assert logprobs.shape == token_mask.shape and logprobs.shape[0] % 2 == 0
        assert torch.equal(sample_mask[0::2], sample_mask[1::2]), "a pair must be valid or not"
        valid = sample_mask[0::2] > 0  # [pairs]
        num_global_pairs = (global_valid_seqs / 2).clamp(min=1)

        logps = _sequence_logps(logprobs, token_mask, self.preference_average_log_probs)  # [b]
        if self.reference_free:
            ref_logps = torch.zeros_like(logps)
        else:
            ref_logprobs = data["reference_policy_logprobs"]
            ref_logps = _sequence_logps(ref_logprobs, token_mask, self.preference_average_log_probs)
        # Only valid pairs enter the loss: aot sorts across pairs, so padding must not take part.
        pc, pr = logps[0::2][valid], logps[1::2][valid]
        rc, rr = ref_logps[0::2][valid], ref_logps[1::2][valid]
        pref = self.preference_loss(pc, pr, rc, rr, beta=self.beta, **self.loss_params)
        sft_logps = _sequence_logps(logprobs, token_mask, self.sft_average_log_probs)[0::2][valid]

        preference_loss = pref.sum() / num_global_pairs
        sft_loss = -sft_logps.sum() / num_global_pairs
        loss = self.preference_loss_weight * preference_loss + self.sft_loss_weight * sft_loss
        with torch.no_grad():
            rewards_chosen = self.beta * (pc - rc)  # [valid pairs]
            rewards_rejected = self.beta * (pr - rr)
            sums = torch.stack(
                [
                    (rewards_chosen > rewards_rejected).sum(),
                    rewards_chosen.sum(),
                    rewards_rejected.sum(),
                    (rewards_chosen - rewards_rejected).sum(),
                    pc.sum(),
                    pr.sum(),
                ]
            )
            means = (sums / num_global_pairs).tolist()  # one device sync for all metrics
            losses = torch.stack([loss, preference_loss, sft_loss]).tolist()
        metrics = dict(zip(("loss", "preference_loss", "sft_loss"), losses, strict=True))
        metrics |= dict(zip(PAIR_MEAN_METRICS, means, strict=True))
        metrics["num_valid_samples"] = int(valid.sum().item())
        return loss, metrics


class NLLLossFn:
    """SFT loss: negative log-likelihood per response token, normalised over the global batch.

    L = -sum_{i,t} sample_mask_i * token_mask_it * logprobs_it / global_valid_toks.
    """

    def __call__(
        self,
        logprobs: Tensor,
        data: dict[str, Any],
        global_valid_seqs: Tensor,
        global_valid_toks: Tensor,
    ) -> tuple[Tensor, dict[str, float]]:
        """This micro-batch's share of the global mean token NLL, and additive metrics.

        Args:
            logprobs: `[b, T]` next-token log-probs.
            data: the micro-batch with `token_mask` `[b, T]` and `sample_mask` `[b]`.
            global_valid_seqs: 0-d tensor, valid sequences in the global batch (unused).
            global_valid_toks: 0-d tensor, valid response tokens in the global batch.

        Returns:
            (loss, metrics): metrics `loss`, `num_valid_samples` and `num_valid_tokens` (counts
            of this micro-batch).
        """
        mask = data["token_mask"] * data["sample_mask"][:, None]  # [b, T]
        loss = -(logprobs * mask).sum() / global_valid_toks.clamp(min=1)
        metrics = {
            "loss": loss.item(),
            "num_valid_samples": int(data["sample_mask"].sum().item()),
            "num_valid_tokens": int(mask.sum().item()),
        }
        return loss, metrics


# ---------------------------------------------------------------------------------------------
# Policy-gradient losses (RL with generation: GRPO, PPO's actor)

# Log-ratios are clamped before exponentiation, and k3 after: a token whose probability moved by
# more than e^20 would otherwise give inf and NaN gradients.
_MAX_LOG_RATIO = 20.0
_MAX_K3 = 10.0


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi, `[b, T]`.

    With l = log pi(y_t) - log pi_ref(y_t) (Schulman 2020, "Approximating KL Divergence"):
    k1 = l (unbiased, high variance, can be negative); k2 = l^2 / 2 (biased, low variance);
    k3 = exp(-l) - 1 + l (unbiased, >= 0; the GRPO paper's estimator), clamped to 10.
    """
    log_ratio = (logprobs - ref_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    assert estimator == "k3", f"unknown KL estimator {estimator!r}"
    return (torch.exp(-log_ratio) - 1 + log_ratio).clamp(max=_MAX_K3)


def ppo_clip_loss(
    ratio: Tensor,
    logprobs: Tensor,
    advantages: Tensor,
    /,
    *,
    clip_min: float,
    clip_max: float,
    dual_clip_c: float | None,
) -> Tensor:
    """PPO's clipped objective, per token: -min(r A, clip(r, 1 - e_low, 1 + e_high) A).

    Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7, with DAPO's separate
    bounds (Yu et al. 2025, "clip-higher": e_high > e_low keeps low-probability tokens
    explorable). With dual clip c (Ye et al. 2020, "Mastering Complex Control in MOBA Games with
    Deep RL"), a negative advantage's loss is at most -c A, so a huge ratio cannot dominate.
    """
    clipped = ratio.clamp(1 - clip_min, 1 + clip_max)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)
    if dual_clip_c is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -dual_clip_c * advantages), loss)
    return loss


def cispo_loss(
    ratio: Tensor, logprobs: Tensor, advantages: Tensor, /, *, clip_min: float, clip_max: float
) -> Tensor:
    """CISPO, per token: -sg(clip(r, 1 - e_low, 1 + e_high)) A log pi(y_t).

    MiniMax 2025, "MiniMax-M1", eq. 4: the clipped ratio weights a REINFORCE term without its
    gradient, so clipped tokens still contribute a gradient (PPO's clip zeroes it).
    """
    weight = ratio.clamp(1 - clip_min, 1 + clip_max).detach()
    return -weight * advantages * logprobs


def reinforce_loss(ratio: Tensor, logprobs: Tensor, advantages: Tensor, /) -> Tensor:
    """REINFORCE, per token: -A log pi(y_t) (Williams 1992), on-policy; the ratio is unused."""
    return -advantages * logprobs


class ClippedPGLossFn:
    """The policy-gradient loss of one micro-batch of rollouts, normalised over the global batch.

    Per token t of completion i (mask m_it on the generated tokens), with the log-probs l of the
    current policy, l_old of the policy that the batch was scored with before this update
    (`prev_logprobs`; without it, one update per rollout: l_old = sg(l), the ratio is 1 with
    the policy gradient), A the advantage (`advantages [b, T]`):
        ratio r = exp(l - l_old) (token level) or, for GSPO (Zheng et al. 2025, "Group Sequence
        Policy Optimization"), exp(sum_t m (l - l_old) / sum_t m) for every token of i;
        per-token loss = policy_loss(r, A) [+ beta * KL_t(l, l_ref) unless kl_in_reward],
        times the importance weight of TIS / ICE-POP against the generator's log-probs
        (`generation_logprobs`);
    aggregated as configured, with the global counts of the batch (so the gradient does not
    depend on the number of workers or the micro-batch size). With an entropy bonus c > 0
    (`entropy_coef`), L = agg(per-token loss) - c * agg(H), where
    H_t = -sum_v pi(v | y_<t) log pi(v | y_<t) is the current policy's entropy at token t,
    aggregated the same way and not importance-weighted (Williams and Peng 1991, "Function
    Optimization using Connectionist Reinforcement Learning Algorithms"; Mnih et al. 2016,
    "Asynchronous Methods for Deep Reinforcement Learning", sec. 4: the entropy bonus of A3C).
    The worker computes H in the chunked log-prob kernel, only when asked: `needs_entropy`.

    Args:
        cfg: the loss section (config_schema.PGLossConfig); checked here.
    """

    def __init__(self, cfg: PGLossConfig) -> None:
        check_pg_loss_config(cfg, "loss")
        self.cfg = cfg
        clip = {"clip_min": cfg["ratio_clip_min"], "clip_max": cfg["ratio_clip_max"]}
        # Each: (ratio, logprobs, advantages) -> per-token loss [b, T].
        losses: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
            "ppo_clip": partial(ppo_clip_loss, **clip, dual_clip_c=cfg["ratio_clip_c"]),
            "cispo": partial(cispo_loss, **clip),
            "reinforce": reinforce_loss,
        }
        self.policy_loss = losses[cfg["policy_loss"]]
        # Read by the worker (LossFn): it passes `entropy` only when this is set.
        self.needs_entropy = cfg["entropy_coef"] > 0

    def __call__(
        self,
        logprobs: Tensor,
        data: dict[str, Any],
        global_valid_seqs: Tensor,
        global_valid_toks: Tensor,
        *,
        entropy: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """This micro-batch's share of the global-batch loss, and additive metrics.

        Args:
            logprobs: `[b, T]` log-probs of the current policy, 0 off the generated tokens.
            data: the micro-batch: `token_mask [b, T]`, `sample_mask [b]`, `advantages [b, T]`,
                and as configured `prev_logprobs`, `generation_logprobs`,
                `reference_policy_logprobs` (each `[b, T]`).
            global_valid_seqs, global_valid_toks: 0-d tensors, the valid completions and their
                generated tokens in the global batch.
            entropy: `[b, T]` entropies of the current policy's next-token distributions, 0
                off the generated tokens; required when `needs_entropy`.

        Returns:
            (loss, metrics): metrics sum over micro-batches and workers to global-batch values
            (`kl`, `clip_fraction`, `importance_dropped` and, when given, `entropy` are means
            over generated tokens).
        """
        cfg = self.cfg
        mask = data["token_mask"] * data["sample_mask"][:, None]  # (b, T)
        old = data["prev_logprobs"] if "prev_logprobs" in data else logprobs.detach()
        ratio = self._ratio(logprobs, old, mask)  # (b, T)
        per_token = self.policy_loss(ratio, logprobs, data["advantages"])  # (b, T)
        kl = torch.zeros_like(per_token)
        if cfg["reference_policy_kl_penalty"] > 0:
            kl = kl_estimate(logprobs, data["reference_policy_logprobs"], cfg["kl_estimator"])
            if not cfg["kl_in_reward"]:
                per_token = per_token + cfg["reference_policy_kl_penalty"] * kl
        weight, dropped = self._importance_weight(old, data, mask)
        loss = self._aggregate(per_token * weight, mask, global_valid_seqs, global_valid_toks)
        if self.needs_entropy:
            assert entropy is not None, "entropy_coef > 0: the worker passes entropy="
            bonus = self._aggregate(entropy, mask, global_valid_seqs, global_valid_toks)
            loss = loss - cfg["entropy_coef"] * bonus
        with torch.no_grad():
            clip_max, clip_min = 1 + cfg["ratio_clip_max"], 1 - cfg["ratio_clip_min"]
            clipped = ((ratio > clip_max) | (ratio < clip_min)).float()
            toks = global_valid_toks.clamp(min=1)
            metrics = {
                "loss": loss.item(),
                "kl": ((kl * mask).sum() / toks).item(),
                "clip_fraction": ((clipped * mask).sum() / toks).item(),
                "importance_dropped": ((dropped * mask).sum() / toks).item(),
                "num_valid_samples": int(data["sample_mask"].sum().item()),
            }
            if entropy is not None:
                metrics["entropy"] = ((entropy * mask).sum() / toks).item()
        return loss, metrics

    def _ratio(self, logprobs: Tensor, old: Tensor, mask: Tensor) -> Tensor:
        log_ratio = (logprobs - old) * mask
        if self.cfg["ratio_level"] == "sequence":
            per_seq = log_ratio.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)  # (b,)
            log_ratio = per_seq[:, None].expand_as(logprobs)
        return torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))

    def _importance_weight(
        self, old: Tensor, data: dict[str, Any], mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The TIS / ICE-POP weight of each token (detached), and which tokens ICE-POP drops."""
        correction = self.cfg["importance_correction"]
        if correction == "none":
            return torch.ones_like(mask), torch.zeros_like(mask)
        log_ratio = (old.detach() - data["generation_logprobs"]) * mask
        ratio = torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
        if correction == "tis":  # Yao et al. 2025, "Your Efficient RL Framework Secretly..."
            return ratio.clamp(max=self.cfg["importance_max"]), torch.zeros_like(mask)
        # ICE-POP (Ling team 2025): tokens whose ratio leaves [min, max] do not train.
        kept = (ratio >= self.cfg["importance_min"]) & (ratio <= self.cfg["importance_max"])
        return kept.float(), (~kept).float()

    def _aggregate(
        self, per_token: Tensor, mask: Tensor, global_valid_seqs: Tensor, global_valid_toks: Tensor
    ) -> Tensor:
        """Sum over this micro-batch, divided by the global batch's count for the aggregation."""
        aggregation = self.cfg["aggregation"]
        masked = per_token * mask
        if aggregation == "token_mean":
            return masked.sum() / global_valid_toks.clamp(min=1)
        seqs = global_valid_seqs.clamp(min=1)
        if aggregation == "seq_mean_token_mean":
            return (masked.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)).sum() / seqs
        length = self.cfg["sum_norm_length"]
        assert length is not None, "checked with the config: sum_norm needs its length"
        return masked.sum() / (seqs * length)


# ---------------------------------------------------------------------------------------------
# The critic's loss (PPO) and the reward model's (Bradley-Terry)


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, /, *, clip: float | None
) -> Tensor:
    """PPO's value loss per token: 0.5 max((V - G)^2, (V_old + clip(V - V_old, -e, e) - G)^2).

    V the critic's new value, V_old the value the rollout was scored with (GAE's), G the return.
    The clipped term keeps the new value within e of the old one unless that lowers the loss
    (OpenAI baselines' PPO2; Schulman et al. 2017 do not clip the value). With clip None:
    0.5 (V - G)^2.
    """
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * unclipped
    clipped = (old_values + (values - old_values).clamp(-clip, clip) - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped)


class ValueLossFn:
    """The critic's loss of one micro-batch of a rollout, normalised over the global batch.

    L = sum_{i,t} m_it * clipped_value_loss(V_it, V_old_it, G_it) / N_tok, with m the generated
    tokens of valid rows (`token_mask * sample_mask`) and N_tok their number in the global batch
    (a token mean, whatever the workers and micro-batches).

    Args:
        cfg: the `value_loss_fn` section.
    """

    def __init__(self, cfg: ValueLossConfig) -> None:
        self.clip = cfg["value_clip"]

    def __call__(
        self,
        values: Tensor,
        data: dict[str, Any],
        global_valid_seqs: Tensor,
        global_valid_toks: Tensor,
    ) -> tuple[Tensor, dict[str, float]]:
        """This micro-batch's share of the global-batch loss, and additive metrics.

        Args:
            values: `[b, T]` the critic's values (with autograd), 0 off the generated tokens.
            data: the micro-batch: `token_mask [b, T]`, `sample_mask [b]`, `values [b, T]` (the
                rollout's, V_old) and `returns [b, T]`.
            global_valid_seqs, global_valid_toks: 0-d tensors, the global batch's counts.

        Returns:
            (loss, metrics): `loss`, `value_clip_fraction` (tokens whose clipped term is the
            larger), `value_mean` and `num_valid_samples`, additive over micro-batches and
            workers.
        """
        mask = data["token_mask"] * data["sample_mask"][:, None]  # (b, T)
        old, returns = data["values"], data["returns"]
        per_token = clipped_value_loss(values, old, returns, clip=self.clip)
        toks = global_valid_toks.clamp(min=1)
        loss = (per_token * mask).sum() / toks
        with torch.no_grad():
            clipped = (2 * per_token > (values - returns) ** 2).float()  # the clipped term won
            metrics = {
                "loss": loss.item(),
                "value_clip_fraction": ((clipped * mask).sum() / toks).item(),
                "value_mean": ((values * mask).sum() / toks).item(),
                "num_valid_samples": int(data["sample_mask"].sum().item()),
            }
        return loss, metrics


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, /) -> Tensor:
    """-log s(r_c - r_r), per pair: the reward model's loss on a preference pair.

    Bradley and Terry 1952, "Rank Analysis of Incomplete Block Designs"; as a reward model's
    objective, Ouyang et al. 2022 (InstructGPT), eq. 1: P(chosen > rejected) = s(r_c - r_r).
    """
    return -F.logsigmoid(chosen - rejected)


# Metrics of BradleyTerryLossFn, each summed over valid pairs and divided by the global count.
RM_PAIR_METRICS = ("accuracy", "margin_mean", "chosen_score_mean", "rejected_score_mean")


class BradleyTerryLossFn:
    """The reward model's loss of one micro-batch of interleaved pairs, normalised globally:
    L = sum_pairs bradley_terry_loss(r_c, r_r) / N, N the valid pairs of the global batch.

    The scores r are the model's output after each sequence's last token (`per_sequence`: the
    value worker passes `[b]` scores, rows `[c0, r0, c1, r1, ...]`).
    """

    per_sequence = True  # read by ValueWorker.train: one score per sequence, not per token

    def __call__(
        self,
        scores: Tensor,
        data: dict[str, Any],
        global_valid_seqs: Tensor,
        global_valid_toks: Tensor,
    ) -> tuple[Tensor, dict[str, float]]:
        """This micro-batch's share of the global-batch loss, and additive metrics.

        Args:
            scores: `[b]` the sequences' scores (with autograd), b = 2 * pairs.
            data: the micro-batch, with `sample_mask [b]` (a pair is valid or not as a whole).
            global_valid_seqs: 0-d tensor, valid sequences in the global batch (2 per pair).
            global_valid_toks: unused (the loss is per pair).

        Returns:
            (loss, metrics): `loss`, the means of RM_PAIR_METRICS over the global batch's valid
            pairs, and `num_valid_samples` (valid pairs of this micro-batch).
        """
        sample_mask = data["sample_mask"]
        assert torch.equal(sample_mask[0::2], sample_mask[1::2]), "a pair must be valid or not"
        valid = sample_mask[0::2] > 0  # (pairs,)
        chosen, rejected = scores[0::2][valid], scores[1::2][valid]
        num_pairs = (global_valid_seqs / 2).clamp(min=1)
        loss = bradley_terry_loss(chosen, rejected).sum() / num_pairs
        with torch.no_grad():
            sums = torch.stack(
                [(chosen > rejected).sum(), (chosen - rejected).sum(), chosen.sum(), rejected.sum()]
            )
            means = (sums / num_pairs).tolist()
        metrics = {"loss": loss.item(), **dict(zip(RM_PAIR_METRICS, means, strict=True))}
        metrics["num_valid_samples"] = int(valid.sum().item())
        return loss, metrics
