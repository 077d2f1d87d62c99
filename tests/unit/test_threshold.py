"""τ selection: budget quantiles, the Learn-then-Test guarantee, and the cost-quality curve."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest
from scipy import stats

from service.routing.threshold import (
    NoThresholdError,
    Sample,
    budget_threshold,
    cost_quality_curve,
    guarantee_threshold,
    min_served,
    served_flip_risk,
)

Array = npt.NDArray[np.float64]
GRID = np.round(np.arange(1, 11) / 10, 2)  # 0.1, 0.2, ..., 1.0


@pytest.mark.parametrize(
    ("share", "tau"), [(0.0, 0.0), (0.3, 0.4), (0.35, 0.4), (0.9, 1.0), (1.0, 1.0)]
)
def test_budget_threshold_is_the_largest_tau_within_the_share(share: float, tau: float) -> None:
    assert budget_threshold(GRID, None, share) == pytest.approx(tau)
    assert Sample.of(GRID).teacher_share(tau) <= share + 1e-12


def test_budget_threshold_weighs_rows_and_keeps_ties_together() -> None:
    # CDF over (0.2, 0.5, 0.8) with weights (1, 1, 2): 0.25, 0.5, 1.0.
    assert budget_threshold([0.2, 0.5, 0.8], [1.0, 1.0, 2.0], 0.5) == pytest.approx(0.8)
    assert budget_threshold([0.2, 0.5, 0.8], [1.0, 1.0, 2.0], 0.49) == pytest.approx(0.5)
    # Three rows tied at 0.5: a 0.2 budget cannot split them, so none goes to the teacher.
    assert budget_threshold([0.5, 0.5, 0.5, 0.9, 0.9], None, 0.2) == pytest.approx(0.5)
    assert budget_threshold([0.5, 0.5, 0.5, 0.9, 0.9], None, 0.6) == pytest.approx(0.9)


def test_served_flip_risk_matches_hand_computations() -> None:
    c = np.linspace(0.01, 1.0, 100)
    none = served_flip_risk(c, np.zeros(100), None, 0.505, delta=0.05)
    assert none.n == 50 and none.rate == 0.0
    # Zero flips in n: the one-sided upper bound solves (1 - u)^n = δ.
    assert none.upper == pytest.approx(1.0 - 0.05 ** (1 / 50))
    flips = c < 0.605  # 10 of the 50 served rows flip
    some = served_flip_risk(c, flips, None, 0.505, delta=0.05)
    assert some.rate == pytest.approx(0.2)
    assert stats.binom.cdf(10, 50, some.upper) == pytest.approx(0.05)  # the CP definition
    # Weights w: the rate is Σw·flip / Σw and n_eff is (Σw)² / Σw².
    w = np.where(c < 0.795, 1.0, 3.0)  # served: 29 rows of weight 1, 21 of weight 3
    weighted = served_flip_risk(c, flips, w, 0.505, delta=0.05)
    assert weighted.rate == pytest.approx(10 / (29 + 21 * 3))
    assert weighted.n_eff == pytest.approx(92**2 / (29 + 21 * 9))


def test_guarantee_passes_every_tau_above_it_and_fails_the_next_one() -> None:
    rng = np.random.default_rng(0)
    c = rng.uniform(0.1, 1.0, 4000)
    flips = rng.random(4000) < 0.4 * (1.0 - c)
    choice = guarantee_threshold(c, flips, None, 0.05, 0.1, step=0.01)
    assert choice.bound <= 0.05 and choice.flip_rate <= 0.05
    assert choice.teacher_share == pytest.approx(float((c < choice.threshold).mean()))
    candidates = np.unique(Sample.of(c).thresholds(np.linspace(0, 1, 101)))
    tested = [t for t in candidates if (c >= t).sum() >= min_served(0.05, 0.1)]
    above = [t for t in tested if t >= choice.threshold]
    assert all(served_flip_risk(c, flips, None, t, 0.1).upper <= 0.05 for t in above)
    below = max(t for t in tested if t < choice.threshold)
    assert served_flip_risk(c, flips, None, below, 0.1).upper > 0.05


def test_the_scan_starts_where_half_the_allowed_flips_would_still_pass() -> None:
    start = min_served(0.05, 0.05)
    # At that n, k = 0.025·n flips put the one-sided 95% Clopper-Pearson bound at 0.05.
    assert stats.beta.ppf(0.95, 0.025 * start + 1, start - 0.025 * start) == pytest.approx(
        0.05, abs=1e-5
    )
    # ...and it is above the least n that can pass at all, 1 - 0.05^(1/n) ≤ 0.05.
    assert start > math.log(0.05) / math.log(0.95)


def test_guarantee_stops_at_the_first_failure_even_if_a_lower_tau_would_pass() -> None:
    c = np.linspace(0.001, 1.0, 1000)
    flips = (c > 0.6) & (c <= 0.62)  # a bad band of 20 rows; everything else is clean
    choice = guarantee_threshold(c, flips, None, 0.05, 0.05, step=0.01)
    assert choice.threshold > 0.6
    # Serving everything would pass on its own (2% flips in 1000), but the scan stopped in
    # the band: passing it would test a τ chosen after seeing it fail above.
    assert served_flip_risk(c, flips, None, 0.0, 0.05).upper <= 0.05


def test_too_few_pairs_for_the_guarantee_is_an_error_that_says_why() -> None:
    needed = min_served(0.05, 0.05)
    c = np.linspace(0.5, 1.0, math.floor(needed))
    with pytest.raises(NoThresholdError, match=f"n_eff ≥ {math.ceil(needed)} served pairs"):
        guarantee_threshold(c, np.zeros(c.size), None, 0.05, 0.05)
    enough = np.linspace(0.5, 1.0, math.ceil(needed))
    assert guarantee_threshold(enough, np.zeros(enough.size), None, 0.05, 0.05).threshold == 0.0


# -- the guarantee on simulated calibration sets ---------------------------------------------
#
# Traffic: c ~ U(0.1, 1); a flip has probability 0.2·(1 - c)/0.9. So the true served flip
# rate is R(τ) = E[flip | c ≥ τ] = (1 - τ)/9 for τ ≥ 0.1, and R(τ) ≤ ε iff τ ≥ 1 - 9ε. The
# "fresh data" risk of a chosen τ is this exact population value.

EPSILON, DELTA = 0.05, 0.1
TEST_LEVEL = 0.001  # chance that the check below fails although the guarantee holds


def true_risk(tau: float) -> float:
    return (1.0 - max(tau, 0.1)) / 9.0


def trial_count() -> int:
    """Fewest trials (in 50s) at which a rule failing at 2δ is caught with power 0.99."""
    for n in range(50, 5001, 50):
        limit = stats.binom.ppf(1.0 - TEST_LEVEL, n, DELTA)
        if stats.binom.sf(limit, n, 2.0 * DELTA) >= 0.99:
            return n
    raise AssertionError("unreachable")


def simulate(
    choose: Callable[[Array, Array, Array, Sample], float], *, pi0: float, trials: int
) -> int:
    """How many of `trials` calibration sets give a τ whose true risk exceeds ε."""
    rng = np.random.default_rng(12345)
    violations = 0
    for _ in range(trials):
        c = rng.uniform(0.1, 1.0, 3000)
        flips = rng.random(c.size) < 0.2 * (1.0 - c) / 0.9
        # The cascade at τ_old = 0.7: below it always observed (π = 1), above it shadowed.
        pi = np.where(c < 0.7, 1.0, pi0)
        seen = rng.random(c.size) < pi
        tau = choose(c[seen], flips[seen].astype(float), 1.0 / pi[seen], Sample.of(c))
        violations += true_risk(tau) > EPSILON
    return violations


def ltt(c: Array, flips: Array, w: Array, traffic: Sample) -> float:
    try:
        choice = guarantee_threshold(c, flips, w, EPSILON, DELTA, traffic=traffic, step=0.01)
    except NoThresholdError:
        return 1.0  # it declined: everything goes to the teacher, nothing is at risk
    return choice.threshold


def plug_in(c: Array, flips: Array, w: Array, traffic: Sample) -> float:
    """The naive rule: the lowest τ whose *estimated* served flip rate is ≤ ε."""
    taus = np.unique(traffic.thresholds(np.linspace(0, 1, 101)))
    served = c[None, :] >= taus[:, None]
    rate = (served * w * flips).sum(axis=1) / np.maximum((served * w).sum(axis=1), 1e-300)
    return float(taus[(rate <= EPSILON) & served.any(axis=1)].min())


@pytest.mark.parametrize("pi0", [1.0, 0.5], ids=["every_pair", "shadow_weighted"])
def test_the_guarantee_holds_over_many_calibration_sets(pi0: float) -> None:
    trials = trial_count()
    violations = simulate(ltt, pi0=pi0, trials=trials)
    # Under the guarantee violations ~ Binomial(trials, ≤ δ).
    assert violations <= stats.binom.ppf(1.0 - TEST_LEVEL, trials, DELTA)


def test_the_simulation_catches_a_rule_without_the_guarantee() -> None:
    trials = trial_count()
    violations = simulate(plug_in, pi0=0.5, trials=trials)
    assert violations > stats.binom.isf(TEST_LEVEL, trials, DELTA)


# -- the cost-quality curve ------------------------------------------------------------------


def test_cost_quality_curve_by_hand() -> None:
    # Four pairs, equal weights. Labels: rows 0, 1 labelled.
    c = np.array([0.3, 0.5, 0.7, 0.9])
    ys, yt = np.array([0, 1, 2, 3]), np.array([1, 1, 0, 3])  # rows 0 and 2 flip
    y = np.array([1, 0, -1, -1])  # row 0: teacher right, student wrong; row 1: both wrong
    points = {
        p.threshold: p
        for p in cost_quality_curve(c, ys, yt, None, labels=y, shares=[0.0, 0.25, 0.75, 1.0])
    }
    assert sorted(points) == [0.0, 0.5, 0.9, 1.0]
    serve_all, p50, p90, none = points[0.0], points[0.5], points[0.9], points[1.0]
    assert (serve_all.teacher_share, serve_all.agreement, serve_all.flips_recovered) == (0, 0.5, 0)
    assert serve_all.accuracy == 0.0 and serve_all.gap_recovered == 0.0
    assert (p50.teacher_share, p50.agreement, p50.flips_recovered) == (0.25, 0.75, 0.5)
    assert p50.served_flip_rate == pytest.approx(1 / 3)
    assert p50.accuracy == 0.5 and p50.gap_recovered == 1.0  # row 0 went to the teacher
    assert (p90.teacher_share, p90.agreement, p90.served_flip_rate) == (0.75, 1.0, 0.0)
    assert none.teacher_share == 1.0 and none.served_flip_rate is None
    unlabelled = cost_quality_curve(c, ys, yt, None, shares=[0.5])
    assert unlabelled[0].accuracy is None and unlabelled[0].gap_recovered is None


def test_curve_weights_pairs_by_inverse_inclusion() -> None:
    c = np.array([0.2, 0.8])
    ys, yt = np.array([0, 0]), np.array([1, 1])
    # The confident row stands for 3 requests (π = 1/3): serving everything, 1 agrees in 4.
    (point,) = cost_quality_curve(c, ys, yt, [1.0, 3.0], shares=[0.0])
    assert point.agreement == 0.0
    (point,) = cost_quality_curve(c, ys, yt, [1.0, 3.0], shares=[0.25])
    assert point.teacher_share == 0.25 and point.agreement == pytest.approx(0.25)


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="share"):
        budget_threshold(GRID, None, 1.5)
    with pytest.raises(ValueError, match="weights"):
        budget_threshold(GRID, np.ones(3), 0.5)
    with pytest.raises(ValueError, match="positive"):
        budget_threshold(GRID, np.zeros(10), 0.5)
    with pytest.raises(ValueError, match="epsilon"):
        guarantee_threshold(GRID, np.zeros(10), None, 0.0, 0.1)
    with pytest.raises(ValueError, match="delta"):
        guarantee_threshold(GRID, np.zeros(10), None, 0.1, 1.0)
    with pytest.raises(ValueError, match="flips"):
        guarantee_threshold(GRID, np.zeros(3), None, 0.1, 0.1)
    with pytest.raises(ValueError, match="no teacher-observed pairs"):
        cost_quality_curve([], [], [], None)
