"""Adversarial images (FGSM, PGD under L-inf and L2) and fooling images."""

from __future__ import annotations

import pytest
import torch

import convscope as cs
from convscope.synthesis import NotDifferentiableError, adversarial, fooling_image


@pytest.fixture(scope="module")
def chelsea_x(model):
    return model.preprocess(cs.sample_image("chelsea"))


def test_targeted_pgd_reaches_the_target_within_4_over_255(model, chelsea_x, untouched):
    with untouched(model.module):
        a = adversarial(model, chelsea_x, target=386, eps=4 / 255, norm="linf", steps=10, progress=False)
    assert a.before[0].indices[0] == 282  # tiger cat
    assert a.after[0].indices[0] == 386 and bool(a.success[0])
    assert float(a.perturbation["linf"][0]) <= 4 / 255 + 1e-6
    assert torch.equal(model.logits(a.input).argmax(1).cpu(), torch.tensor([386]))
    assert a.pixels.min() >= 0 and a.pixels.max() <= 1
    assert a.forward_passes == 12 and a.backward_passes == 10


def test_l2_budget_is_respected(model, chelsea_x):
    a = adversarial(model, chelsea_x, target="koala", eps=0.5, norm="l2", steps=3, progress=False)
    assert float(a.perturbation["l2"][0]) <= 0.5 + 1e-4
    assert a.target.tolist() == [105]
    assert a.history[-1] < a.history[0]  # target cross-entropy falls


def test_untargeted_fgsm_takes_one_signed_step(model, chelsea_x):
    a = adversarial(model, chelsea_x, eps=2 / 255, method="fgsm", progress=False)
    diff = (a.pixels - model.to_pixels(chelsea_x).clamp(0, 1)).abs()
    assert a.steps == 1 and float(diff.max()) == pytest.approx(2 / 255, abs=1e-6)
    assert a.after[0].indices[0] != 282 and bool(a.success[0])


@pytest.mark.parametrize("bad", [dict(eps=0), dict(eps=-0.1), dict(norm="l3"), dict(method="cw"), dict(steps=0),
                                 dict(eps=1.5), dict(target=1000), dict(target="no such class")])
def test_bad_budgets_and_targets_are_clear_errors(model, chelsea_x, bad, untouched):
    kw = dict(target=386, steps=1, progress=False) | bad
    with untouched(model.module), pytest.raises(cs.ConvscopeError):
        adversarial(model, chelsea_x, **kw)


def test_not_differentiable_model(detached):
    with pytest.raises(NotDifferentiableError):
        adversarial(detached, torch.rand(1, 3, 16, 16), target=1, steps=1, progress=False)


def test_fooling_image_reaches_high_confidence_from_noise(model, untouched):
    with untouched(model.module):
        r = fooling_image(model, "Indian elephant", confidence=0.95, steps=100, size=96, progress=False)
    assert r.extras["probability"] >= 0.95 and r.extras["target"] == 385
    assert model.predict(r.input)[0].indices[0] == 385 and r.steps < 100
