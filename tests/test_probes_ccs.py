"""CCS specifics: the loss, train-set normalisation applied unchanged at test time, restarts, seeding."""

from __future__ import annotations

import pytest
import torch

from intervene import probes
from intervene.probes.synthetic import planted_pairs


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return planted_pairs(400, 12, seed=11)


@pytest.mark.parametrize("normalize", ["burns", "meanonly", "none"])
def test_normalisation_is_fitted_on_train_and_applied_unchanged(data, normalize: str) -> None:
    xp, xn, y, _ = data
    probe = probes.CCSProbe(normalize=normalize, n_restarts=2).fit(xp, xn)
    if normalize == "none":
        assert torch.all(probe.mean_pos_ == 0) and torch.all(probe.scale_pos_ == 1)
    else:
        torch.testing.assert_close(probe.mean_pos_, xp.mean(0))
        torch.testing.assert_close(probe.mean_neg_, xn.mean(0))
    if normalize == "burns":
        expected = ((xp - xp.mean(0)).norm(dim=0) / 400**0.5).mean()
        torch.testing.assert_close(probe.scale_pos_, expected)
    # A shifted test set: re-centring on the test batch (elk's bug) would change predictions.
    tp, tn = xp[:50] + 0.7, xn[:50] - 0.3
    batch = probe.predict_proba(tp, tn)
    for i in (0, 17, 49):
        single = probe.predict_proba(tp[i : i + 1], tn[i : i + 1])
        torch.testing.assert_close(single[0], batch[i])
    torch.testing.assert_close(probe.predict_proba(tp[:7], tn[:7]), batch[:7])


def test_loss_and_credence_formulas(data) -> None:
    xp, xn, y, _ = data
    probe = probes.CCSProbe(n_restarts=3, weight_decay=0.0).fit(xp, xn)
    zp = (xp - probe.mean_pos_) / probe.scale_pos_
    zn = (xn - probe.mean_neg_) / probe.scale_neg_
    pp = torch.sigmoid(zp @ probe.weight_ + probe.bias_)
    pn = torch.sigmoid(zn @ probe.weight_ + probe.bias_)
    loss = ((pp - (1 - pn)) ** 2 + torch.minimum(pp, pn) ** 2).mean()
    torch.testing.assert_close(probe.loss_, loss, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(probe.predict_proba(xp, xn), 0.5 * (pp + 1 - pn), atol=1e-6, rtol=1e-5)
    # coef_/intercept_ express the positive side's log-odds on raw activations.
    torch.testing.assert_close(
        xp @ probe.coef_ + probe.intercept_, zp @ probe.weight_ + probe.bias_, atol=1e-4, rtol=1e-4
    )
    # Well below 0.25, the loss of the degenerate solution p = 1/2 everywhere (the shared content
    # along the planted direction makes some pairs inconsistent, so it does not reach 0).
    assert float(loss) < 0.2


def test_restarts_keep_the_lowest_loss(data) -> None:
    xp, xn, _, _ = data
    one = probes.CCSProbe(n_restarts=1, seed=3).fit(xp, xn)
    many = probes.CCSProbe(n_restarts=6, seed=3).fit(xp, xn)  # its first init is `one`'s init
    assert float(many.loss_) <= float(one.loss_) + 1e-7


def test_seeded_and_deterministic(data) -> None:
    xp, xn, _, _ = data
    a = probes.CCSProbe(n_restarts=3, seed=5).fit(xp, xn)
    b = probes.CCSProbe(n_restarts=3, seed=5).fit(xp, xn)
    torch.testing.assert_close(a.weight_, b.weight_, rtol=0, atol=0)


def test_calibration_flip_keeps_credences_consistent(data) -> None:
    xp, xn, y, direction = data
    probe = probes.CCSProbe(n_restarts=3).fit(xp, xn)
    before = probe.predict_proba(xp, xn)
    sign = torch.sign((probe.direction_ * direction).sum())
    probe.calibrate(xp, xn, y)
    assert float((probe.direction_ * direction).sum()) > 0.9
    after_rank = probes.auroc(y, probe.decision_function(xp, xn))
    before_rank = probes.auroc(y, before)
    assert after_rank > 0.95
    assert abs(after_rank - (before_rank if sign > 0 else 1 - before_rank)) < 1e-9
    assert torch.all(probe.platt_scale_ > 0)


def test_batched_restarts_over_layers_and_heads() -> None:
    xp, xn, y, direction = planted_pairs(200, 6, batch=(2, 2), seed=12)
    probe = probes.CCSProbe(n_restarts=2).fit(xp, xn).calibrate(xp, xn, y)
    assert probe.weight_.shape == (2, 2, 6) and probe.loss_.shape == (2, 2)
    assert torch.all((probe.direction_ * direction).sum(-1) > 0.9)
    assert probe.predict_proba(xp, xn).shape == (2, 2, 200)
    with pytest.raises(TypeError):
        probe.predict_proba(xp)
