"""The training-length rule on synthetic validation curves."""

from __future__ import annotations

import math

import pytest

from tunesmith.eval.curve import training_length, validations


def curve(f, steps):
    return [(s, f(s)) for s in steps]


STEPS = range(10, 110, 10)


def test_a_curve_cut_off_mid_fall_is_under_trained_with_a_fair_estimate():
    # 0.5 + 2 exp(-s / 100): at step 100 it still falls by 1.4% of the loss per 10 steps.
    found = training_length(curve(lambda s: 0.5 + 2 * math.exp(-s / 100), STEPS), best_kept=False)
    assert found["verdict"] == "under-trained"
    # Exactly: what remains (2 exp(-(100 + n) / 100)) falls under 0.5% of 1.236 after ~ 118 more steps.
    exact = -100 * math.log(0.005 * (0.5 + 2 * math.exp(-1)) / 2) - 100
    assert found["more_steps"] == pytest.approx(exact, rel=0.15)
    assert found["line"].startswith("under-trained: the validation loss was still falling at the last step")
    assert f"about {found['more_steps']} more steps (train.max_steps {100 + found['more_steps']})" in found["line"]


def test_a_fall_that_is_not_slowing_asks_for_at_least_as_many_steps_again():
    found = training_length(curve(lambda s: 3 - 0.01 * s, STEPS), best_kept=False)
    assert found["verdict"] == "under-trained" and found["more_steps"] == 100
    assert "at least 100 more steps" in found["line"]


def test_a_flat_curve_says_nothing():
    assert training_length(curve(lambda s: 0.5 + 2 * math.exp(-s / 5), STEPS), best_kept=False) is None
    noisy = [(10, 1.0), (20, 0.8), (30, 0.7), (40, 0.7001), (50, 0.6999)]
    assert training_length(noisy, best_kept=False) is None


def test_a_curve_that_rises_is_over_fitted_and_says_which_weights_are_kept():
    rises = curve(lambda s: 1 + (s - 40) ** 2 / 2000, STEPS)  # lowest at step 40
    found = training_length(rises, best_kept=True)
    assert found["verdict"] == "over-fitted" and found["best_step"] == 40
    assert found["line"].startswith("over-fitted: validation loss lowest at step 40 (1.0000)")
    assert found["line"].endswith("step 40's weights are kept, not the last step's")
    assert training_length(rises, best_kept=False)["line"].endswith(
        "the last step's weights are kept, not step 40's (train.keep_best)")


def test_a_rise_within_the_noise_is_not_over_fitting():
    assert training_length([(10, 1.0), (20, 0.6), (30, 0.5), (40, 0.503)], best_kept=False) is None


def test_too_few_validations_say_nothing():
    assert training_length([(10, 1.0), (20, 0.5)], best_kept=False) is None


def test_validations_are_read_from_the_log_one_per_step():
    records = [{"step": 1, "loss": 2.0}, {"step": 2, "val_loss": 1.5}, {"step": 2, "val_loss": 1.4},
               {"step": 4, "val_loss": 1.2}]
    assert validations(records) == [(2, 1.4), (4, 1.2)]
