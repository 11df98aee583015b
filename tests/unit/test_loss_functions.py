"""Tests for rl_toolkit.algorithms.loss_functions: every preference loss by hand, DPOLossFn
against a naive per-pair loop, global normalisation across micro-batches, config errors."""

import inspect
import math
import typing

import pydantic
import pytest
import torch

from rl_toolkit.algorithms.loss_functions import (
    PREFERENCE_LOSSES,
    DPOLossConfig,
    DPOLossFn,
    NLLLossFn,
)
from rl_toolkit.config_schema import DPOLossConfig as SchemaLossConfig
from rl_toolkit.utils.config import ConfigError


def softplus(x: float) -> float:
    """log(1 + e^x) = -log sigmoid(-x)."""
    return math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def make_cfg(**overrides) -> DPOLossConfig:
    cfg = DPOLossConfig(
        reference_policy_kl_penalty=0.5,
        preference_loss_weight=1.0,
        sft_loss_weight=0.0,
        preference_average_log_probs=False,
        sft_average_log_probs=False,
        loss_type="sigmoid",
        label_smoothing=0.0,
        reference_free=False,
        simpo_gamma=0.5,
        discopop_tau=0.05,
    )
    cfg.update(overrides)
    return cfg


# One pair: pc = -1, pr = -3, rc = -2, rr = -2.5, beta = 0.5.
# Chosen log-ratio a = pc - rc = 1.0, rejected log-ratio b = pr - rr = -0.5,
# margin h = a - b = 1.5, beta * h = 0.75; beta * a = 0.5, beta * b = -0.25.
BETA = 0.5
EPS = 0.1
ONE_PAIR = [torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.5)]
EXPECTED_ONE_PAIR = {
    # -log s(0.75)
    ("sigmoid", 0.0): softplus(-0.75),
    # conservative DPO: 0.9 * -log s(0.75) + 0.1 * -log s(-0.75)
    ("sigmoid", EPS): 0.9 * softplus(-0.75) + 0.1 * softplus(0.75),
    # (0.9 * -log s(0.75) - 0.1 * -log s(-0.75)) / (1 - 0.2)
    ("robust", EPS): (0.9 * softplus(-0.75) - 0.1 * softplus(0.75)) / 0.8,
    # max(0, 1 - 0.75)
    ("hinge", 0.0): 0.25,
    # (1.5 - 1 / (2 * 0.5))^2 = 0.5^2
    ("ipo", 0.0): 0.25,
    # s(.75) (log s(.75) - log .9) + s(-.75) (log s(-.75) - log .1)
    ("exo_pair", EPS): sig(0.75) * (-softplus(-0.75) - math.log(0.9))
    + sig(-0.75) * (-softplus(0.75) - math.log(0.1)),
    # -log s(0.5) - 0.5 log s(-0.5) - 0.5 log s(0.25)
    ("nca_pair", 0.0): softplus(-0.5) + 0.5 * softplus(0.5) + 0.5 * softplus(-0.25),
    # delta = 0: -log s(0.5) - log s(0.25)
    ("bco_pair", 0.0): softplus(-0.5) + softplus(-0.25),
    # (1 - 1 / (2 * 0.5))^2 + (-0.5 + 1)^2 = 0 + 0.25
    ("sppo_hard", 0.0): 0.25,
    # 1 - s(0.5) + s(-0.25)
    ("apo_zero", 0.0): 1 - sig(0.5) + sig(-0.25),
    # s(0.5) + 1 - s(0.75)
    ("apo_down", 0.0): sig(0.5) + 1 - sig(0.75),
    # m = s(0.75 / 0.05) = s(15); (1 - m) * -log s(0.75) + m * exp(-0.75)
    ("discopop", 0.0): (1 - sig(15)) * softplus(-0.75) + sig(15) * math.exp(-0.75),
    # beta * (pc - pr) - gamma = 0.5 * 2 - 0.5 = 0.5: -log s(0.5)
    ("simpo", 0.0): softplus(-0.5),
}
PARAMS = {"discopop_tau": 0.05, "simpo_gamma": 0.5}


def call_loss(loss_type: str, pc, pr, rc, rr, eps: float = 0.0) -> torch.Tensor:
    """The loss with the keyword arguments its LossSpec declares (label smoothing = eps)."""
    spec = PREFERENCE_LOSSES[loss_type]
    params = {key: eps if key == "label_smoothing" else PARAMS[key] for key in spec.params}
    return spec.fn(pc, pr, rc, rr, beta=BETA, **params)


@pytest.mark.parametrize(("loss_type", "eps"), list(EXPECTED_ONE_PAIR))
def test_loss_hand_computed(loss_type: str, eps: float) -> None:
    losses = call_loss(loss_type, *ONE_PAIR, eps=eps)
    assert losses.shape == (1,)
    assert losses.item() == pytest.approx(EXPECTED_ONE_PAIR[(loss_type, eps)], rel=1e-6)


def test_aot_losses_sort_across_pairs() -> None:
    # Pair 0 as above; pair 1: pc = -2, pr = -1, rc = -2, rr = -2.
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-2.0, -2.0]), torch.tensor([-2.5, -2.0])
    # aot: sort(pc - pr) = sort([2, -1]) = [-1, 2]; sort(rc - rr) = sort([0.5, 0]) = [0, 0.5];
    # delta = [-1, 1.5]; beta * delta = [-0.5, 0.75].
    aot = call_loss("aot", pc, pr, rc, rr)
    assert aot.tolist() == pytest.approx([softplus(0.5), softplus(-0.75)], rel=1e-6)
    # aot_pair: sort(pc - rc) = sort([1, 0]) = [0, 1]; sort(pr - rr) = sort([-0.5, 1]) =
    # [-0.5, 1]; delta = [0.5, 0]; beta * delta = [0.25, 0].
    aot_pair = call_loss("aot_pair", pc, pr, rc, rr)
    assert aot_pair.tolist() == pytest.approx([softplus(-0.25), math.log(2)], rel=1e-6)


# policy == reference (all log-ratios 0), beta = 0.5, eps = 0.1 where the loss takes it.
IDENTITY = {
    "sigmoid": (0.0, math.log(2)),
    "robust": (EPS, math.log(2)),  # (0.9 ln 2 - 0.1 ln 2) / 0.8
    "hinge": (0.0, 1.0),
    "ipo": (0.0, 1 / (4 * BETA**2)),  # (0 - 1 / (2 beta))^2
    "exo_pair": (EPS, -math.log(2) - 0.5 * math.log(0.9) - 0.5 * math.log(0.1)),
    "nca_pair": (0.0, 2 * math.log(2)),  # ln 2 + 0.5 ln 2 + 0.5 ln 2
    "bco_pair": (0.0, 2 * math.log(2)),
    "sppo_hard": (0.0, 2 / (2 * BETA) ** 2),  # 2 * (1 / (2 beta))^2
    "aot": (0.0, math.log(2)),
    "aot_pair": (0.0, math.log(2)),
    "apo_zero": (0.0, 1.0),  # 1 - 1/2 + 1/2
    "apo_down": (0.0, 1.0),  # 1/2 + 1 - 1/2
    "discopop": (0.0, 0.5 * math.log(2) + 0.5),  # m = 1/2: ln 2 / 2 + e^0 / 2
    "simpo": (0.0, softplus(0.5)),  # -log s(0 - gamma)
}


def test_every_loss_is_tested() -> None:
    assert set(IDENTITY) == set(PREFERENCE_LOSSES)
    assert {name for name, _ in EXPECTED_ONE_PAIR} | {"aot", "aot_pair"} == set(PREFERENCE_LOSSES)


@pytest.mark.parametrize("loss_type", sorted(IDENTITY))
def test_identity_value_and_gradient_sign(loss_type: str) -> None:
    eps, expected = IDENTITY[loss_type]
    pc = torch.full((2,), -2.0, requires_grad=True)
    pr = torch.full((2,), -2.0, requires_grad=True)
    ref = torch.full((2,), -2.0)
    losses = call_loss(loss_type, pc, pr, ref, ref, eps=eps)
    assert losses.tolist() == pytest.approx([expected, expected], rel=1e-6)
    if loss_type == "discopop":
        # DiscoPOP is not monotone in the margin for |beta h| of the order of tau (its blend
        # weight moves faster than the two losses): check the sign at beta h = -1 instead.
        pc = torch.full((2,), -3.0, requires_grad=True)
        pr = torch.full((2,), -1.0, requires_grad=True)
        losses = call_loss("discopop", pc, pr, ref, ref)
    losses.sum().backward()
    # Raising the rejected log-prob raises the loss.
    assert (pr.grad > 0).all()
    if loss_type == "apo_down":
        # APO-down lowers both likelihoods: at the identity its pull on the chosen log-prob
        # (+beta/4 from the anchor, -beta/4 from the margin) cancels.
        assert pc.grad.tolist() == pytest.approx([0.0, 0.0], abs=1e-7)
    else:
        assert (pc.grad < 0).all()


def make_batch(num_pairs: int, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    """Random interleaved pairs with prompts, padding, and the last pair a padding pair."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * num_pairs
    logprobs = -torch.rand(rows, seq_len, generator=gen) * 3
    ref = -torch.rand(rows, seq_len, generator=gen) * 3
    token_mask = torch.zeros(rows, seq_len)
    for i in range(rows):
        prompt_len = 1 + i % 3
        length = seq_len - (i % 4)
        token_mask[i, prompt_len:length] = 1.0
    sample_mask = torch.ones(rows)
    sample_mask[-2:] = 0.0
    return {
        "logprobs": logprobs * (token_mask > 0),
        "reference_policy_logprobs": ref * (token_mask > 0),
        "token_mask": token_mask,
        "sample_mask": sample_mask,
    }


def naive_loss(batch: dict[str, torch.Tensor], cfg: DPOLossConfig) -> float:
    """DPO loss by a plain loop over pairs (docs: shared/design.md, "The DPO loss")."""
    beta = cfg["reference_policy_kl_penalty"]
    num_pairs = int(batch["sample_mask"].sum().item()) // 2
    total_pref = total_sft = 0.0
    for i in range(0, len(batch["sample_mask"]), 2):
        if batch["sample_mask"][i] == 0:
            continue
        seq = {}
        for name, row in (("c", i), ("r", i + 1)):
            mask = batch["token_mask"][row]
            n = mask.sum().item()
            logp = (batch["logprobs"][row] * mask).sum().item()
            ref = (batch["reference_policy_logprobs"][row] * mask).sum().item()
            div = n if cfg["preference_average_log_probs"] else 1.0
            seq[name] = (logp / div, ref / div)
            if name == "c":
                total_sft += -logp / (n if cfg["sft_average_log_probs"] else 1.0)
        delta = (seq["c"][0] - seq["c"][1]) - (seq["r"][0] - seq["r"][1])
        total_pref += softplus(-beta * delta)
    return (
        cfg["preference_loss_weight"] * total_pref / num_pairs
        + cfg["sft_loss_weight"] * total_sft / num_pairs
    )


@pytest.mark.parametrize("pref_avg", [False, True])
@pytest.mark.parametrize("sft_avg", [False, True])
def test_dpo_loss_fn_matches_naive(pref_avg: bool, sft_avg: bool) -> None:
    cfg = make_cfg(
        preference_loss_weight=0.7,
        sft_loss_weight=0.3,
        preference_average_log_probs=pref_avg,
        sft_average_log_probs=sft_avg,
    )
    batch = make_batch(num_pairs=4, seq_len=9, seed=0)
    global_seqs = batch["sample_mask"].sum()
    global_toks = (batch["token_mask"] * batch["sample_mask"][:, None]).sum()
    loss, metrics = DPOLossFn(cfg)(batch["logprobs"], batch, global_seqs, global_toks)
    assert loss.item() == pytest.approx(naive_loss(batch, cfg), rel=1e-5)
    assert metrics["loss"] == pytest.approx(loss.item())
    assert metrics["num_valid_samples"] == 3
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_micro_batches_sum_to_global_batch() -> None:
    cfg = make_cfg(sft_loss_weight=0.2, preference_average_log_probs=True)
    batch = make_batch(num_pairs=4, seq_len=7, seed=1)
    global_seqs = batch["sample_mask"].sum()
    global_toks = (batch["token_mask"] * batch["sample_mask"][:, None]).sum()
    loss_fn = DPOLossFn(cfg)

    full = batch["logprobs"].clone().requires_grad_(True)
    loss, metrics = loss_fn(full, batch, global_seqs, global_toks)
    loss.backward()

    parts = batch["logprobs"].clone().requires_grad_(True)
    total, summed = torch.tensor(0.0), {}
    for start in (0, 4):  # two micro-batches of two pairs
        micro = {k: v[start : start + 4] for k, v in batch.items()}
        part_loss, part_metrics = loss_fn(parts[start : start + 4], micro, global_seqs, global_toks)
        total = total + part_loss
        for key, value in part_metrics.items():
            summed[key] = summed.get(key, 0) + value
    total.backward()

    assert total.item() == pytest.approx(loss.item(), rel=1e-6)
    assert torch.allclose(parts.grad, full.grad, rtol=1e-6, atol=1e-7)
    assert summed == pytest.approx(metrics, rel=1e-5)
    # the padding pair gets no gradient
    assert full.grad[-2:].abs().sum() == 0


def test_metrics_by_hand() -> None:
    # One pair, one response token each: logp_c = -1, logp_r = -3, ref_c = -2, ref_r = -2.5.
    data = {
        "token_mask": torch.tensor([[0.0, 1.0], [0.0, 1.0]]),
        "sample_mask": torch.ones(2),
        "reference_policy_logprobs": torch.tensor([[0.0, -2.0], [0.0, -2.5]]),
    }
    logprobs = torch.tensor([[0.0, -1.0], [0.0, -3.0]])
    loss, m = DPOLossFn(make_cfg(sft_loss_weight=0.5))(
        logprobs, data, torch.tensor(2.0), torch.tensor(2.0)
    )
    # preference: -log s(0.5 * 1.5); sft: -logp_c = 1; loss = pref + 0.5 * 1
    assert m["preference_loss"] == pytest.approx(softplus(-0.75), rel=1e-6)
    assert m["sft_loss"] == pytest.approx(1.0)
    assert loss.item() == pytest.approx(softplus(-0.75) + 0.5, rel=1e-6)
    assert m["rewards_chosen_mean"] == pytest.approx(0.5)  # 0.5 * (-1 + 2)
    assert m["rewards_rejected_mean"] == pytest.approx(-0.25)  # 0.5 * (-3 + 2.5)
    assert m["reward_margin_mean"] == pytest.approx(0.75)
    assert m["accuracy"] == 1.0
    assert m["logps_chosen_mean"] == pytest.approx(-1.0)
    assert m["logps_rejected_mean"] == pytest.approx(-3.0)


def test_reference_free_never_reads_reference() -> None:
    batch = make_batch(num_pairs=2, seq_len=5, seed=2)
    del batch["reference_policy_logprobs"]
    cfg = make_cfg(reference_free=True)
    loss, _ = DPOLossFn(cfg)(batch["logprobs"], batch, torch.tensor(2.0), torch.tensor(1.0))
    # one valid pair: -log s(beta * (logp_c - logp_r))
    logp = (batch["logprobs"] * batch["token_mask"]).sum(-1)
    assert loss.item() == pytest.approx(softplus(-0.5 * (logp[0] - logp[1]).item()), rel=1e-6)


def test_simpo_through_loss_fn() -> None:
    batch = make_batch(num_pairs=2, seq_len=6, seed=3)
    del batch["reference_policy_logprobs"]
    cfg = make_cfg(loss_type="simpo", reference_free=True, preference_average_log_probs=True)
    loss, _ = DPOLossFn(cfg)(batch["logprobs"], batch, torch.tensor(2.0), torch.tensor(1.0))
    mask = batch["token_mask"]
    avg = (batch["logprobs"] * mask).sum(-1) / mask.sum(-1)
    # -log s(beta * (avg_c - avg_r) - gamma)
    assert loss.item() == pytest.approx(softplus(-(0.5 * (avg[0] - avg[1]).item() - 0.5)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loss_type": "dpo"}, "expected one of .*'sigmoid'"),
        ({"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
        ({"label_smoothing": -0.1}, r"label_smoothing must be in \[0, 0.5\)"),
        ({"loss_type": "exo_pair", "label_smoothing": 0.0}, r"in \(0, 0.5\) for loss_type"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "must be 0 for loss_type 'hinge'"),
        ({"loss_type": "simpo", "preference_average_log_probs": True}, "reference_free=true"),
        ({"loss_type": "simpo", "reference_free": True}, "preference_average_log_probs=true"),
    ],
)
def test_invalid_config_raises(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DPOLossFn(make_cfg(**overrides))


@pytest.mark.parametrize("key", ["reference_policy_kl_penalty", "discopop_tau"])
def test_positive_loss_parameters_are_part_of_the_schema(key: str) -> None:
    # The config schema rejects them before anything starts (test_config_checks.py does it
    # end to end); here: the bound is on the type, not in the loss code.
    with pytest.raises(pydantic.ValidationError, match="greater than 0"):
        pydantic.TypeAdapter(SchemaLossConfig).validate_python(make_cfg(**{key: 0.0}))


def test_one_loss_table() -> None:
    # The config's Literal of loss names and the table are the same set.
    names = typing.get_args(typing.get_type_hints(SchemaLossConfig)["loss_type"])
    assert set(names) == set(PREFERENCE_LOSSES)
    for name, spec in PREFERENCE_LOSSES.items():
        accepted = set(inspect.signature(spec.fn).parameters) - {"pc", "pr", "rc", "rr", "beta"}
        assert accepted == set(spec.params), name  # every declared key, and only those
        assert ("label_smoothing" in spec.params) == (spec.smoothing is not None), name


def test_nll_loss_global_token_mean() -> None:
    batch = make_batch(num_pairs=2, seq_len=5, seed=4)
    mask = batch["token_mask"] * batch["sample_mask"][:, None]
    global_toks = mask.sum()
    loss, metrics = NLLLossFn()(batch["logprobs"], batch, torch.tensor(2.0), global_toks)
    assert loss.item() == pytest.approx(-(batch["logprobs"] * mask).sum().item() / global_toks)
    assert metrics["num_valid_samples"] == 2
    assert metrics["num_valid_tokens"] == int(global_toks.item())


def test_nll_loss_over_any_split_of_an_sft_batch_is_the_batch_loss() -> None:
    """SFT: micro-batches (or workers) of any size sum to the global batch's loss and gradient.

    Rows of 1 to 7 learned tokens: a mean of per-micro-batch means, or of per-row means, would
    weight tokens unequally and differ.
    """
    generator = torch.Generator().manual_seed(5)
    lengths = [8, 3, 6, 2, 7, 5]
    token_mask = torch.zeros(6, 8)
    for row, length in enumerate(lengths):
        token_mask[row, 8 - length :] = 1.0
    batch = {"token_mask": token_mask, "sample_mask": torch.tensor([1.0, 1, 1, 1, 1, 0])}
    logprobs = -torch.rand(6, 8, generator=generator)  # (B, T)
    counts = (batch["sample_mask"].sum(), (token_mask * batch["sample_mask"][:, None]).sum())
    assert counts[1] == 26  # the masked row's 5 tokens do not count

    def loss_and_grad(splits: list[list[int]]) -> tuple[float, torch.Tensor]:
        leaf = logprobs.clone().requires_grad_(True)
        total = 0.0
        for rows in splits:
            micro_batch = {key: value[rows] for key, value in batch.items()}
            loss, _ = NLLLossFn()(leaf[rows], micro_batch, *counts)
            loss.backward()
            total += loss.item()
        return total, leaf.grad

    expected = -(logprobs * token_mask)[:5].sum().item() / 26
    whole_loss, whole_grad = loss_and_grad([list(range(6))])
    assert whole_loss == pytest.approx(expected, abs=1e-6)
    for splits in ([[0], [1, 2], [3, 4, 5]], [[0, 1, 2], [3, 4, 5]], [[i] for i in range(6)]):
        loss, grad = loss_and_grad(splits)
        assert loss == pytest.approx(whole_loss, abs=1e-6)
        torch.testing.assert_close(grad, whole_grad, atol=1e-7, rtol=0)
    assert whole_grad[5].abs().sum() == 0 and whole_grad[1, :5].abs().sum() == 0  # masked, prompt
