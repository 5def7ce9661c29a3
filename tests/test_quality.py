"""Issue 11: the unknown verdict, calibrated probabilities, mirror-averaged features."""
import pytest
import torch

from calibration import (
    class_means,
    expected_calibration_error,
    fit_temperature,
    nearest_similarity,
    pass_threshold,
)


def sampled_labels(logits, generator):
    return torch.multinomial(logits.softmax(1), 1, generator=generator).flatten()


def test_temperature_recovers_how_overconfident_the_logits_are():
    generator = torch.Generator().manual_seed(0)
    honest = torch.randn(4000, 10, generator=generator) * 3
    labels = sampled_labels(honest, generator)  # softmax(honest) is calibrated by construction
    overconfident = honest * 2.5
    assert fit_temperature(overconfident, labels) == pytest.approx(2.5, rel=0.1)
    before = expected_calibration_error(overconfident.softmax(1), labels)
    after = expected_calibration_error((overconfident / 2.5).softmax(1), labels)
    assert before > 0.1 and after < 0.03


def test_calibration_error_of_known_cases():
    labels = torch.tensor([0, 0, 0, 0])
    always_right_and_sure = torch.tensor([[1.0, 0.0]] * 4)
    assert expected_calibration_error(always_right_and_sure, labels) == pytest.approx(0)
    # 90% confident, right half the time: 0.4 off.
    half_right = torch.tensor([[0.9, 0.1], [0.1, 0.9]] * 2)
    assert expected_calibration_error(half_right, labels) == pytest.approx(0.4)


def test_threshold_lets_the_chosen_share_through_and_flags_far_features():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 64, generator=generator)
    labels = torch.arange(500) % 5
    features = centres[labels] + 0.3 * torch.randn(500, 64, generator=generator)
    means = class_means(features, labels, 5)
    assert torch.allclose(means.norm(dim=1), torch.ones(5))
    fresh = centres[labels] + 0.3 * torch.randn(500, 64, generator=generator)
    threshold = pass_threshold(nearest_similarity(fresh, means), pass_rate=0.95)
    assert (nearest_similarity(fresh, means) >= threshold).float().mean() == pytest.approx(0.95,
                                                                                          abs=0.01)
    strangers = torch.randn(200, 64, generator=generator)  # near none of the class means
    assert (nearest_similarity(strangers, means) < threshold).all()
