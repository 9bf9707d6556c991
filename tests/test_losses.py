"""The weighted loss, the ELBO and the main theorem, checked by numbers (float64).

The oracle is a 2-D Gaussian mixture with its exact denoiser; every identity is also
checked for deliberately wrong denoisers, because the main result is integration by
parts and holds for any model.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
import scipy.stats

from elbo_core import analytic, losses, process, schedules, weighting

LOGSNR_MIN, LOGSNR_MAX = -12.0, 12.0

# The by-parts identity must hold to quadrature precision (the issue asks below
# 1e-8); composite 8-node Gauss-Legendre on 32 outer panels of width 0.75 and 25
# inner ones of width 0.96 measures at most 7e-12 (1.5e-12 for w = 1, where the two
# sides are the two rules), so 1e-8 leaves room for rounding and machine differences.
BY_PARTS_RTOL = 1e-8
BY_PARTS_POINTS = 256
# The nested rule for L has a different panel count from the outer rule, so that no
# row of the identity compares a sum with itself.
BY_PARTS_INNER = 200
# Unless w is constant, the weighted ELBOs carry most of the loss: |integral| / L_w
# is at least 0.977 for every weighting and denoiser here (eps_cosine is lowest).
INTEGRAL_SHARE_FLOOR = 0.5
# Gauss-Hermite nodes per dimension for the fixed eps rule of the identity; the
# identity holds for any fixed rule, so accuracy in eps is irrelevant there.
BY_PARTS_HERMITE = 3
# Gauss-Hermite nodes per dimension where the eps expectation is compared with Monte
# Carlo: 10 nodes put its error (below 1e-4 relative for this mixture, against 20
# nodes) far under the Monte Carlo standard errors (about 1%).
ACCURATE_HERMITE = 10
# Monte Carlo terms per estimate of one example's weighted loss; one count for all
# such tests, so that the compiled estimator is shared.
MC_SAMPLES = 20_000
# Monte Carlo agreement: within this many standard errors (two-sided, a false alarm
# rate of 6e-5 per comparison for a normal estimate).
NUM_SIGMAS = 4.0
# Composite Gauss-Legendre with 256 nodes on [-12, 12] reaches about 1e-11 relative
# on these smooth integrands; comparisons of two quadratures allow 1e-9.
QUADRATURE_RTOL = 1e-9
# Sums and ratios of a few float64 numbers that are equal in exact arithmetic.
ROUNDING_RTOL = 1e-14
# PAPER.md section 4 quotes -ELBO and the NLL at s = 0.7 on [-12, 12] to 6 decimals.
PAPER_DECIMALS_TOLERANCE = 5e-7
# Masses of the parts of dw/dt are summed over a 20001-point grid: exact but in the
# cells where dw/dlogsnr changes sign, where the error is |w''| h^2 / 2 ~ 1e-6 at most.
MASS_TOLERANCE = 1e-6
# A piecewise-constant proposal on 100 bins of width 0.24 approximates p*; its
# variance exceeds the continuous optimum by O(width^2): measured 2.3e-3 relative
# for the 1-D perturbed case, 9.1e-3 on 50 bins and 5.7e-4 on 200 (ratio 4.0).
BINNING_RTOL = 5e-3
# The schedules are not interchangeable as proposals: for sigmoid(2 - logsnr) on
# [-12, 12] uniform-in-logsnr draws have 3.68 times the variance of the best
# schedule (EDM), so the spread must exceed 3.
PROPOSAL_VARIANCE_SPREAD = 3.0
# The non-monotonic weightings all rise from near zero to a peak inside the range
# and fall back to near zero, so about half of |dw/dt| is negative (measured 0.498
# to 0.500); a share below 0.45 would mean a sign error in dw/dt.
NEGATIVE_SHARE_FLOOR = 0.45
# With the levels of p_w shared by two denoisers, the standard error of the paired
# difference of their implied constants must be far below either constant's own
# (measured 0.05 to 0.09 of it with stratified draws); above a quarter the pairing
# would not be working.
PAIRING_GAIN = 0.25
# Draws of p_w per implied-constant check: stratified in 32 replicates; 40000 put
# the standard error of v_cosine's constant near 0.1 nats (its loss lives in a rare
# tail of p_w) and that of the paired difference near 0.005.
AUGMENTATION_SAMPLES = 40_000
# Standard-error calibration: the spread of this many independent estimates of
# CALIBRATION_SAMPLES terms each is compared with the reported standard errors. The
# empirical variance of the estimates is chi-square with REPEATS - 1 degrees of
# freedom around the true variance: its two-sided 1e-4 quantiles are 0.915 and
# 1.089 times the truth for 4000 repeats, a band that excludes the i.i.d. formula
# applied to antithetic pairs with correlation +0.32 (a ratio near 1.3).
CALIBRATION_REPEATS = 4000
CALIBRATION_SAMPLES = 64
CALIBRATION_FALSE_ALARM = 1e-4
# The reported variances are estimates too: the band is widened by this many
# standard errors of their mean (measured 0.8% to 1.8% relative).
CALIBRATION_DENOMINATOR_SIGMAS = 4.0
# Antithetic partners under v_cosine with the linear proposal are correlated by
# +0.33 (+-0.01 on 10000 pairs); the pair-based variance must show more than +0.2.
ANTITHETIC_MIN_CORRELATION = 0.2


def _mixture():
    return analytic.GaussianMixture(
        np.array([[-1.0, 0.5], [1.0, 1.0], [0.3, -1.0]]),
        np.array([0.3, 0.5, 0.2]),
        np.array([0.3, 0.5, 0.2]),
    )


class RandomDenoiser(eqx.Module):
    """A smooth denoiser with random weights: no relation to the data at all."""

    weight: jax.Array
    bias: jax.Array

    def __init__(self, dim, *, key):
        weight_key, bias_key = jax.random.split(key)
        self.weight = jax.random.normal(weight_key, (dim, dim + 1))
        self.bias = jax.random.normal(bias_key, (dim,))

    def __call__(self, z, logsnr):
        features = jnp.concatenate([z, jnp.tanh(jnp.asarray(logsnr))[None] / 4])
        return jnp.tanh(self.weight @ features + self.bias)


MIXTURE = _mixture()


def _sample(data, num_samples, key):
    """`num_samples` examples drawn from a mixture, in one compiled call."""
    draw = jax.jit(jax.vmap(lambda k: data.sample(key=k)))
    return draw(jax.random.split(key, num_samples))


X = jnp.array([0.4, -0.7])
DENOISERS = {
    "exact": MIXTURE,
    "perturbed": losses.PerturbedDenoiser(MIXTURE, scale=0.8),
    "random": RandomDenoiser(2, key=jax.random.key(7)),
}
MONOTONIC = ("elbo", "v_cosine", "fm_ot", "indi", "sigmoid", "edm_monotonic")
# fm_ot is the same function as v_cosine; the Monte Carlo check runs it once.
MONOTONIC_DISTINCT = ("elbo", "v_cosine", "indi", "sigmoid", "edm_monotonic")
NON_MONOTONIC = ("eps_cosine", "edm", "p2", "min_snr")


# --- quadrature rules ---------------------------------------------------------------


def test_logsnr_quadrature_is_exact_for_polynomials_and_splits_at_breakpoints():
    nodes, weights = losses.logsnr_quadrature(-3.0, 5.0, num_points=64)
    for degree in range(16):
        exact = (5.0 ** (degree + 1) - (-3.0) ** (degree + 1)) / (degree + 1)
        assert math.isclose(
            float(jnp.sum(weights * nodes**degree)), exact, rel_tol=1e-12
        )

    # A breakpoint becomes a panel edge; the node count does not change.
    kinked, kinked_weights = losses.logsnr_quadrature(
        -3.0, 5.0, num_points=64, breakpoints=(math.log(5.0), 9.0)
    )
    assert kinked.shape == nodes.shape
    below = kinked < math.log(5.0)
    assert math.isclose(
        float(jnp.sum(kinked_weights[below])), math.log(5.0) + 3.0, rel_tol=1e-13
    )
    integrand = jnp.abs(kinked - math.log(5.0)) ** 3
    exact = ((5.0 - math.log(5.0)) ** 4 + (math.log(5.0) + 3.0) ** 4) / 4
    assert math.isclose(
        float(jnp.sum(kinked_weights * integrand)), exact, rel_tol=1e-12
    )


def test_eps_quadrature_moments():
    eps, prob = losses.eps_quadrature((2,), num_hermite=6)
    assert eps.shape == (36, 2) and math.isclose(float(prob.sum()), 1.0)
    assert float(jnp.max(jnp.abs(prob @ eps))) < 1e-14
    assert np.allclose(prob @ eps**2, 1.0) and np.allclose(prob @ eps**4, 3.0)
    with pytest.raises(ValueError, match="MAX_HERMITE_POINTS"):
        losses.eps_quadrature((28, 28))


# --- check 1: the by-parts identity for every weighting and any denoiser ------------


@pytest.mark.parametrize("denoiser", sorted(DENOISERS))
@pytest.mark.parametrize("name", sorted(weighting.WEIGHTINGS))
def test_by_parts_identity_holds_for_any_weighting_and_denoiser(name, denoiser):
    w = weighting.WEIGHTINGS[name]()
    terms = losses.by_parts(
        DENOISERS[denoiser],
        X,
        weighting=w,
        logsnr_min=LOGSNR_MIN,
        logsnr_max=LOGSNR_MAX,
        num_points=BY_PARTS_POINTS,
        num_inner=BY_PARTS_INNER,
        num_hermite=BY_PARTS_HERMITE,
    )
    assert float(terms.relative_residual) < BY_PARTS_RTOL
    # The identity is not vacuous: the weighted ELBOs carry the loss unless w is
    # constant; for w = 1 the two sides are different rules for the same integral
    # (so they do not agree to the last bit), and the constant is the
    # model-independent prior term.
    if name == "elbo":
        assert float(terms.integral) == 0.0 and float(terms.residual) != 0.0
    else:
        share = abs(float(terms.integral)) / abs(float(terms.weighted_loss))
        assert share > INTEGRAL_SHARE_FLOOR
    expected_constant = w(LOGSNR_MIN) * losses.prior_kl(X, LOGSNR_MIN)
    assert math.isclose(float(terms.constant), float(expected_constant), rel_tol=1e-14)


def test_by_parts_needs_the_kink_split_for_min_snr():
    # Without a panel edge at log(gamma), the kink of min_snr costs accuracy: the
    # breakpoints are what makes the identity hold to quadrature precision.
    w = weighting.MinSNR()
    kwargs = dict(
        weighting=w,
        logsnr_min=LOGSNR_MIN,
        logsnr_max=LOGSNR_MAX,
        num_points=BY_PARTS_POINTS,
        num_inner=BY_PARTS_INNER,
        num_hermite=BY_PARTS_HERMITE,
    )
    split = losses.by_parts(MIXTURE, X, **kwargs)
    unsplit = losses.by_parts(MIXTURE, X, breakpoints=(), **kwargs)
    assert float(split.relative_residual) < BY_PARTS_RTOL
    assert float(unsplit.relative_residual) > 10 * float(split.relative_residual)


# Time form against logsnr form: composite Gauss-Legendre in t (panels at the times
# of equal logsnr panels) measures at most 7e-12 relative for cosine, flow-matching
# and shifted cosine. The EDM schedule squeezes its lowest panel [-12, -11.25] into
# the last 5e-9 of t, where float64's spacing of 1.1e-16 leaves logsnr uncertain by
# ~4e-8: measured up to 2.4e-6 there.
TIME_FORM_RTOL = {"cosine": 1e-9, "fm_ot": 1e-9, "shifted_cosine": 1e-9, "edm": 1e-5}
TIME_FORM_WEIGHTINGS = ("sigmoid", "v_cosine", "min_snr")


@pytest.mark.parametrize("schedule_name", sorted(TIME_FORM_RTOL))
def test_by_parts_in_time_equals_the_logsnr_form(schedule_name):
    # Int_0^1 (dw/dt) L(t; x) dt along a schedule is the logsnr integral of
    # (-dw/dlogsnr) L, and the weighted loss in time is the weighted loss in logsnr:
    # both sides of the identity are computed again in t and must not move.
    schedule = _proposal(schedule_name)
    model = DENOISERS["perturbed"]
    kwargs = dict(
        logsnr_min=LOGSNR_MIN,
        logsnr_max=LOGSNR_MAX,
        num_points=BY_PARTS_POINTS,
        num_inner=BY_PARTS_INNER,
        num_hermite=BY_PARTS_HERMITE,
    )
    tolerance = TIME_FORM_RTOL[schedule_name]
    for name in TIME_FORM_WEIGHTINGS:
        w = weighting.WEIGHTINGS[name]()
        in_logsnr = _by_parts_in_logsnr(name)
        in_time = losses.by_parts(model, X, weighting=w, schedule=schedule, **kwargs)
        scale = abs(float(in_logsnr.weighted_loss))
        for field in ("weighted_loss", "integral", "endpoint", "constant"):
            deviation = float(getattr(in_time, field) - getattr(in_logsnr, field))
            assert abs(deviation) < tolerance * scale, (name, field, deviation)
        assert float(in_time.relative_residual) < max(tolerance, BY_PARTS_RTOL)
        # The rule in t is not the rule in logsnr in disguise.
        assert float(in_time.weighted_loss) != float(in_logsnr.weighted_loss)


_BY_PARTS_CACHE = {}


def _by_parts_in_logsnr(name):
    """`by_parts` of the perturbed denoiser in logsnr, computed once per weighting."""
    if name not in _BY_PARTS_CACHE:
        _BY_PARTS_CACHE[name] = losses.by_parts(
            DENOISERS["perturbed"],
            X,
            weighting=weighting.WEIGHTINGS[name](),
            logsnr_min=LOGSNR_MIN,
            logsnr_max=LOGSNR_MAX,
            num_points=BY_PARTS_POINTS,
            num_inner=BY_PARTS_INNER,
            num_hermite=BY_PARTS_HERMITE,
        )
    return _BY_PARTS_CACHE[name]


def test_time_quadrature_integrates_along_a_schedule():
    # Int_0^1 dlogsnr/dt dt = logsnr_min - logsnr_max, and the panels sit at the
    # times of equal logsnr panels (the ends at exactly 0 and 1).
    schedule = _proposal("cosine")
    t, t_weights = losses.time_quadrature(schedule, num_points=BY_PARTS_POINTS)
    assert t.shape == (BY_PARTS_POINTS,) and bool(jnp.all(jnp.diff(t) > 0))
    assert float(jnp.sum(t_weights)) == pytest.approx(1.0, rel=ROUNDING_RTOL)
    slope = jax.vmap(lambda s: process.dlogsnr_dt(schedule, s))(t)
    total = float(jnp.sum(t_weights * slope))
    assert total == pytest.approx(LOGSNR_MIN - LOGSNR_MAX, rel=QUADRATURE_RTOL)
    with pytest.raises(ValueError, match="logsnr_max=15.0"):
        losses.by_parts(
            MIXTURE,
            X,
            weighting=weighting.Sigmoid(),
            logsnr_min=LOGSNR_MIN,
            logsnr_max=LOGSNR_MAX,
            schedule=_proposal("cosine", LOGSNR_MIN, 15.0),
        )


def test_truncated_loss_ends_are_the_prior_and_the_elbo():
    levels = jnp.array([LOGSNR_MIN, -3.0, 0.0, 4.0, LOGSNR_MAX])
    values = losses.truncated_loss(
        MIXTURE, X, levels, logsnr_min=LOGSNR_MIN, num_hermite=BY_PARTS_HERMITE
    )
    assert values.shape == levels.shape
    assert float(values[0]) == pytest.approx(float(losses.prior_kl(X, LOGSNR_MIN)))
    assert bool(jnp.all(jnp.diff(values) > 0))  # the integrand is non-negative
    terms = losses.negative_elbo_quadrature(
        MIXTURE,
        X,
        logsnr_min=LOGSNR_MIN,
        logsnr_max=LOGSNR_MAX,
        num_hermite=BY_PARTS_HERMITE,
    )
    assert math.isclose(
        float(values[-1]),
        float(terms.prior + terms.diffusion),
        rel_tol=QUADRATURE_RTOL,
    )


def test_dweight_dt_integrates_to_the_end_weights():
    # Int_0^1 dw/dt dt = w(min) - w(max) along any schedule.
    schedule = schedules.Cosine(logsnr_min=LOGSNR_MIN, logsnr_max=LOGSNR_MAX)
    t, t_weights = losses.logsnr_quadrature(0.0, 1.0, num_points=512)
    for name in ("eps_cosine", "sigmoid", "edm"):
        w = weighting.WEIGHTINGS[name]()
        slope = jax.jit(jax.vmap(lambda s, w=w: losses.dweight_dt(w, schedule, s)))(t)
        expected = float(w(LOGSNR_MIN) - w(LOGSNR_MAX))
        # The cosine schedule packs the logsnr tails into thin layers at t = 0 and
        # 1, so the rule in t is accurate relative to Int |dw/dt|, not to the
        # (possibly much smaller) net change.
        scale = float(jnp.sum(t_weights * jnp.abs(slope)))
        assert abs(float(jnp.sum(t_weights * slope)) - expected) < 1e-7 * scale


# --- check 2: monotonic weightings are expected ELBOs under p_w ---------------------


@pytest.mark.parametrize("name", MONOTONIC_DISTINCT)
def test_implied_constant_by_quadrature_is_the_prior_term_for_any_model(name):
    # w(min) E_{p_w}[L] - L_w(x), all by quadrature (p_w and its point mass from the
    # weighting), must be w(min) KL(q(z_min | x) || N(0, I)) for every denoiser, to
    # quadrature precision relative to the losses it is the difference of.
    w = weighting.WEIGHTINGS[name]()
    losses_w = []
    for denoiser in ("exact", "perturbed"):
        result = losses.implied_constant(
            DENOISERS[denoiser],
            X,
            weighting=w,
            logsnr_min=LOGSNR_MIN,
            logsnr_max=LOGSNR_MAX,
            num_points=BY_PARTS_POINTS,
            num_inner=BY_PARTS_INNER,
            num_hermite=BY_PARTS_HERMITE,
        )
        expected = losses.augmentation_constant(X, weighting=w, logsnr_min=LOGSNR_MIN)
        assert float(result.reference) == float(expected)
        scale = abs(float(result.weighted_loss))
        deviation = float(result.constant - result.reference)
        assert abs(deviation) < QUADRATURE_RTOL * scale, (denoiser, deviation)
        assert float(result.expected_loss_stderr) == 0.0
        losses_w.append(scale)
    # The two denoisers' losses differ by far more than the tolerance.
    assert abs(losses_w[0] - losses_w[1]) > 1e6 * QUADRATURE_RTOL * max(losses_w)


@pytest.mark.parametrize("name", ("v_cosine", "indi", "sigmoid", "edm_monotonic"))
def test_implied_constants_by_monte_carlo_agree_and_pair(name):
    # Levels drawn from p_w (stratified, 32 independent replicates) and shared by
    # the two denoisers; L at each level and L_w by quadrature with one eps rule.
    # (w = 1 has all of p_w on the point mass at logsnr_max: nothing random to test.)
    w = weighting.WEIGHTINGS[name]()
    comparison = losses.compare_implied_constants(
        [DENOISERS["exact"], DENOISERS["perturbed"]],
        X,
        weighting=w,
        logsnr_min=LOGSNR_MIN,
        logsnr_max=LOGSNR_MAX,
        num_samples=AUGMENTATION_SAMPLES,
        num_points=BY_PARTS_POINTS,
        num_hermite=BY_PARTS_HERMITE,
        key=jax.random.key(0),
    )
    constants = comparison.constants
    assert comparison.num_independent == losses.COUPLED_REPLICATES
    slack = QUADRATURE_RTOL * np.abs(np.asarray(constants.weighted_loss))
    deviation = np.abs(np.asarray(constants.constant - constants.reference))
    stderr = np.asarray(constants.constant_stderr)
    assert np.all(deviation < NUM_SIGMAS * stderr + slack), (deviation, stderr)

    # The constant does not depend on the model: the paired difference, whose
    # standard error comes from per-draw differences at the shared levels.
    difference = float(comparison.difference[1])
    difference_stderr = float(comparison.difference_stderr[1])
    assert abs(difference) < NUM_SIGMAS * difference_stderr + slack.max()
    assert 0 < difference_stderr < PAIRING_GAIN * stderr.min()
    assert float(comparison.difference[0]) == 0.0


def test_augmentation_levels_invert_the_cdf_of_p_w():
    # The levels from uniforms are those Weighting.sample_augmentation draws from
    # the same uniform (its own key), and stratified uniforms give the CDF
    # 1 - w(logsnr) / w(min) with one level per stratum.
    low, high = jnp.asarray(LOGSNR_MIN), jnp.asarray(LOGSNR_MAX)
    edm_monotonic = weighting.EDMMonotonic()  # flat below its peak: no p_w there
    keys = jax.random.split(jax.random.key(3), 16)
    direct = jax.jit(
        jax.vmap(
            lambda k: edm_monotonic.sample_augmentation(LOGSNR_MIN, LOGSNR_MAX, key=k)
        )
    )(keys)
    u = jax.vmap(lambda k: jax.random.uniform(k, dtype=jnp.float64))(keys)
    from_uniforms = jax.vmap(
        edm_monotonic.augmentation_logsnr, in_axes=(0, None, None)
    )(u, low, high)
    assert np.array_equal(from_uniforms, direct)
    for w in (weighting.Sigmoid(bias=2.0), edm_monotonic):
        num = 1000
        u = (jnp.arange(num) + 0.5) / num
        levels = np.sort(np.asarray(losses._augmentation_logsnr(w, u, low, high)))
        cdf = 1 - np.asarray(jax.vmap(w)(jnp.asarray(levels))) / float(w(LOGSNR_MIN))
        below_top = levels < LOGSNR_MAX
        assert np.allclose(cdf[below_top], np.asarray(u)[below_top], atol=1e-12)


def test_expected_elbo_with_one_draw_per_level_is_unbiased():
    w = weighting.Sigmoid(bias=2.0)
    exact = losses.weighted_loss_quadrature(
        MIXTURE, X, weighting=w, logsnr_min=LOGSNR_MIN, logsnr_max=LOGSNR_MAX,
        num_hermite=ACCURATE_HERMITE,
    )  # fmt: skip
    estimate = losses.expected_truncated_loss(
        MIXTURE,
        X,
        weighting=w,
        logsnr_min=LOGSNR_MIN,
        logsnr_max=LOGSNR_MAX,
        num_samples=100_000,
        key=jax.random.key(1),
    )
    constant = losses.augmentation_constant(X, weighting=w, logsnr_min=LOGSNR_MIN)
    value = w(LOGSNR_MIN) * estimate.mean - constant
    assert abs(float(value - exact)) < NUM_SIGMAS * float(
        w(LOGSNR_MIN) * estimate.stderr
    )


def test_expected_elbo_refuses_non_monotonic_weightings():
    with pytest.raises(ValueError, match="EpsCosine is not non-increasing"):
        losses.expected_truncated_loss(
            MIXTURE,
            X,
            weighting=weighting.EpsCosine(),
            logsnr_min=LOGSNR_MIN,
            logsnr_max=LOGSNR_MAX,
            num_samples=10,
            key=jax.random.key(0),
        )


# --- check 3: ELBO tightness on Gaussian data ----------------------------------------


def test_gaussian_elbo_matches_the_paper_numbers():
    terms = losses.gaussian_elbo_terms(0.7, logsnr_min=-12.0, logsnr_max=12.0)
    assert abs(float(terms.total) - 1.062270) < PAPER_DECIMALS_TOLERANCE
    assert abs(float(analytic.gaussian_nll(0.7)) - 1.062264) < PAPER_DECIMALS_TOLERANCE


@pytest.mark.parametrize(
    ("logsnr_min", "logsnr_max"), [(-4.0, 4.0), (-8.0, 8.0), (-12.0, 12.0)]
)
def test_gaussian_elbo_closed_form_equals_quadrature_through_the_oracle(
    logsnr_min, logsnr_max
):
    std = 0.7
    oracle = analytic.GaussianMixture.gaussian(1, std)
    # E_x over x ~ N(0, std^2) by Gauss-Hermite: the integrand is smooth in x.
    xs, x_prob = losses.data_quadrature(oracle, num_hermite=24)
    expected = losses.expected_negative_elbo(
        oracle,
        xs,
        x_prob=x_prob,
        logsnr_min=logsnr_min,
        logsnr_max=logsnr_max,
        num_hermite=24,
    )
    closed = losses.gaussian_elbo_terms(
        std, logsnr_min=logsnr_min, logsnr_max=logsnr_max
    )
    for field in ("prior", "reconstruction", "diffusion"):
        assert math.isclose(
            float(getattr(expected, field)),
            float(getattr(closed, field)),
            rel_tol=QUADRATURE_RTOL,
            abs_tol=1e-14,
        ), field


def test_gaussian_elbo_gap_vanishes_as_the_range_widens():
    std = 0.7
    nll = float(analytic.gaussian_nll(std))
    gaps = [
        float(losses.gaussian_elbo_terms(std, logsnr_min=-r, logsnr_max=r).total - nll)
        for r in (4.0, 8.0, 12.0, 16.0, 20.0)
    ]
    assert all(gap > 0 for gap in gaps)  # an upper bound on the NLL
    assert all(b < a for a, b in zip(gaps[:-1], gaps[1:], strict=True))
    # At wide ranges the gap falls like exp(-logsnr_max) (reconstruction) and
    # exp(logsnr_min) (prior): a factor e^4 per step of 4.
    assert gaps[-1] < 1e-8
    assert gaps[-2] / gaps[-1] == pytest.approx(math.exp(4), rel=0.05)


def test_negative_elbo_monte_carlo_agrees_with_quadrature_and_bpd():
    exact = losses.negative_elbo_quadrature(
        MIXTURE,
        X,
        logsnr_min=LOGSNR_MIN,
        logsnr_max=LOGSNR_MAX,
        num_hermite=ACCURATE_HERMITE,
    )
    estimate = losses.negative_elbo(
        MIXTURE,
        X,
        logsnr_min=LOGSNR_MIN,
        logsnr_max=LOGSNR_MAX,
        num_samples=MC_SAMPLES,
        key=jax.random.key(2),
    )
    assert float(estimate.prior) == float(exact.prior)
    assert float(estimate.reconstruction) == float(exact.reconstruction)
    assert abs(float(estimate.diffusion - exact.diffusion)) < NUM_SIGMAS * float(
        estimate.diffusion_stderr
    )
    assert float(exact.diffusion_stderr) == 0.0

    bpd = exact.bits_per_dim()
    assert set(bpd) == {"bpd", "bpd_prior", "bpd_recon", "bpd_diff", "bpd_diff_stderr"}
    assert float(bpd["bpd"]) == pytest.approx(float(exact.total) / (2 * math.log(2)))
    parts = bpd["bpd_prior"] + bpd["bpd_recon"] + bpd["bpd_diff"]
    assert float(parts) == pytest.approx(float(bpd["bpd"]), rel=ROUNDING_RTOL)


# Discrete data: DISCRETE_LEVELS values in [-1, 1] with these probabilities (mean
# 0.4), and the oracle of a mixture of near-deltas on them (std 1e-8: its residual
# denoising error up to logsnr 16 adds below 1e-21 nats).
DISCRETE_LEVELS = 5
DISCRETE_PROBS = np.array([0.05, 0.1, 0.2, 0.3, 0.35])
DISCRETE_STD = 1e-8
DISCRETE_RANGES = (4.0, 8.0, 12.0, 16.0)
# Once the decoder resolves the bins, the gap E[-ELBO] - H is the prior's mismatch
# KL(q(z_min) || N(0, 1)) = 1/2 a (E x)^2 + O(a^2), a = sigmoid(logsnr_min), up to
# relative corrections O(a): measured 4.6e-4 at -8, 9e-6 at -12 and 3e-5 at -16.
DISCRETE_GAP_RTOL = 1e-3
# Panels per coordinate for E over eps: the posterior over well-separated levels
# switches sharply in eps at high logsnr, where Gauss-Hermite (even 128 nodes)
# stalls near 1e-7; 48 panels agree with 100 to 1e-12 here.
DISCRETE_EPS_PANELS = 48
# Smallest relative change of the decoder term from 64 to 4 Gauss-Hermite nodes that
# shows the nodes were used (measured 2.7e-3 at logsnr_max = 4).
DECODER_NODES_EFFECT = 1e-3


def _discrete_data():
    levels = -1 + 2 * np.arange(DISCRETE_LEVELS) / (DISCRETE_LEVELS - 1)
    oracle = analytic.GaussianMixture(
        levels[:, None], np.full(DISCRETE_LEVELS, DISCRETE_STD), DISCRETE_PROBS
    )
    return jnp.asarray(levels[:, None]), oracle


def test_discrete_elbo_bounds_the_entropy_and_closes_to_the_prior_mismatch():
    levels, oracle = _discrete_data()
    entropy = float(-DISCRETE_PROBS @ np.log(DISCRETE_PROBS))
    mean = float(DISCRETE_PROBS @ np.asarray(levels[:, 0]))
    eps, eps_prob = losses.eps_panel_quadrature((1,), num_panels=DISCRETE_EPS_PANELS)
    gaps = []
    for half_range in DISCRETE_RANGES:
        terms = losses.expected_negative_elbo(
            oracle,
            levels,
            x_prob=DISCRETE_PROBS,
            logsnr_min=-half_range,
            logsnr_max=half_range,
            eps=eps,
            eps_prob=eps_prob,
            decoder="discrete",
            num_levels=DISCRETE_LEVELS,
        )
        gap = float(terms.total) - entropy
        gaps.append(gap)
        # Expected code length of a discrete model: never below the entropy.
        assert gap > 0, (half_range, gap)

        # Bits per dimension (D = 1) are the same number in bits, term by term.
        bpd = terms.bits_per_dim()
        parts = bpd["bpd_prior"] + bpd["bpd_recon"] + bpd["bpd_diff"]
        assert float(parts) == pytest.approx(float(bpd["bpd"]), rel=ROUNDING_RTOL)
        assert float(bpd["bpd"]) == pytest.approx(
            float(terms.total) / math.log(2), rel=ROUNDING_RTOL
        )
        assert float(bpd["bpd"]) > entropy / math.log(2)
        if half_range >= 8:
            mismatch = 0.5 * float(jax.nn.sigmoid(-half_range)) * mean**2
            assert gap == pytest.approx(mismatch, rel=DISCRETE_GAP_RTOL), half_range
    assert all(b < a for a, b in zip(gaps[:-1], gaps[1:], strict=True)), gaps


def test_discrete_elbo_monte_carlo_and_decoder_nodes():
    # At logsnr_max = 4 the bins are 1.8 decoder scales wide, so the decoder's
    # expectation is not trivial and its number of nodes shows.
    levels, oracle = _discrete_data()
    x = levels[3]
    kwargs = dict(
        logsnr_min=-4.0,
        logsnr_max=4.0,
        decoder="discrete",
        num_levels=DISCRETE_LEVELS,
        decoder_hermite=4,
    )
    eps, eps_prob = losses.eps_panel_quadrature((1,), num_panels=DISCRETE_EPS_PANELS)
    exact = losses.negative_elbo_quadrature(
        oracle, x, eps=eps, eps_prob=eps_prob, **kwargs
    )
    estimate = losses.negative_elbo(
        oracle,
        x,
        num_samples=MC_SAMPLES,
        sampling="stratified",
        key=jax.random.key(2),
        **kwargs,
    )
    assert float(estimate.prior) == float(exact.prior)
    assert float(estimate.reconstruction) == float(exact.reconstruction)
    deviation = abs(float(estimate.diffusion - exact.diffusion))
    assert deviation < NUM_SIGMAS * float(estimate.diffusion_stderr)

    # decoder_hermite sets the decoder's nodes in both functions (4 nodes are
    # 2.7e-3 relative from the default 64, against 1e-3 required); num_hermite is
    # the rule over eps of the diffusion term and leaves the decoder alone.
    discrete = dict(decoder="discrete", num_levels=DISCRETE_LEVELS)
    coarse = losses.reconstruction(x, 4.0, decoder_hermite=4, **discrete)
    fine = losses.reconstruction(x, 4.0, **discrete)
    assert float(exact.reconstruction) == float(coarse)
    assert abs(float(coarse - fine)) > DECODER_NODES_EFFECT * float(fine)
    hermite = losses.negative_elbo_quadrature(oracle, x, num_hermite=4, **kwargs)
    assert float(hermite.reconstruction) == float(exact.reconstruction)
    assert float(hermite.diffusion) != float(exact.diffusion)


def test_discrete_decoder_is_a_distribution_over_the_levels():
    # For a fixed z the bin probabilities of all k levels sum to one.
    num_levels = 5
    levels = jnp.arange(num_levels)[:, None]
    values = -1 + 2 * levels / (num_levels - 1)
    z_over_alpha = jnp.array([-1.3, -0.2, 0.55, 2.0])[None, :]
    for logsnr_max in (-30.0, -2.0, 3.0, 9.0):
        half_width = jnp.exp(-math.log(num_levels - 1) + logsnr_max / 2)
        scale = math.exp(-logsnr_max / 2)  # sigma / alpha
        eps = (z_over_alpha - values) / scale
        nll = losses._discrete_nll(levels, eps, half_width, num_levels)
        totals = jnp.sum(jnp.exp(-nll), axis=0)
        assert np.allclose(totals, 1.0, rtol=0, atol=1e-13), logsnr_max


def test_discrete_reconstruction_matches_a_direct_monte_carlo():
    num_levels = 256
    x = jnp.array([-1.0, 1.0, -1 + 2 * 100 / 255, -1 + 2 * 200 / 255])
    logsnr_max = 9.0
    value = float(
        losses.reconstruction(x, logsnr_max, decoder="discrete", num_levels=num_levels)
    )
    # Direct: scipy's normal CDF on draws of eps, bins from the data values.
    rng = np.random.default_rng(0)
    eps = rng.standard_normal((200_000, x.size))
    scale = math.exp(-logsnr_max / 2)
    mean = np.asarray(x) + scale * eps
    half = 1 / (num_levels - 1)
    upper = np.where(np.asarray(x) >= 1, np.inf, (np.asarray(x) + half - mean) / scale)
    lower = np.where(
        np.asarray(x) <= -1, -np.inf, (np.asarray(x) - half - mean) / scale
    )
    nll = -np.log(scipy.stats.norm.cdf(upper) - scipy.stats.norm.cdf(lower)).sum(-1)
    stderr = nll.std(ddof=1) / math.sqrt(nll.size)
    assert abs(value - nll.mean()) < NUM_SIGMAS * stderr


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_elbo_terms_are_finite_over_the_whole_logsnr_range(dtype):
    x = jnp.array([-1.0, -1 + 2 / 255, 0.0 + 1 / 255, 1.0], dtype)
    for logsnr in (-40.0, -12.0, 0.0, 12.0, 40.0):
        level = jnp.asarray(logsnr, dtype)
        values = [
            losses.prior_kl(x, level),
            losses.reconstruction(x, level),
            losses.reconstruction(x, level, decoder="discrete"),
        ]
        for value in values:
            assert value.dtype == dtype and bool(jnp.isfinite(value)), logsnr
    assert float(losses.prior_kl(x, jnp.asarray(-40.0, dtype))) >= 0.0
    # Data on the grid are decoded perfectly at high logsnr.
    top = losses.reconstruction(x, jnp.asarray(40.0, dtype), decoder="discrete")
    assert float(top) < 1e-6


def test_prior_kl_is_accurate_at_very_low_logsnr():
    # KL = 1/2 (a ||x||^2 + D (-log(1 - a) - a)), a = sigmoid(logsnr); at -40 the
    # second part is a^2 / 2 to full precision, which naive evaluation loses.
    x = jnp.zeros(3)
    a = 1 / (1 + math.exp(40.0))
    assert float(losses.prior_kl(x, -40.0)) == pytest.approx(0.75 * a**2, rel=1e-12)


# --- check 4: schedule invariance and proposal variances ----------------------------


PROPOSALS = ("cosine", "edm", "linear", "fm_ot")


def _proposal(name, logsnr_min=LOGSNR_MIN, logsnr_max=LOGSNR_MAX):
    return schedules.SCHEDULES[name](logsnr_min=logsnr_min, logsnr_max=logsnr_max)


def test_weighted_loss_is_schedule_invariant_while_variances_differ():
    w = weighting.Sigmoid(bias=2.0)
    exact = float(
        losses.weighted_loss_quadrature(
            MIXTURE,
            X,
            weighting=w,
            logsnr_min=LOGSNR_MIN,
            logsnr_max=LOGSNR_MAX,
            num_hermite=ACCURATE_HERMITE,
        )
    )
    # The per-sample variance under each proposal, in closed form from the moments
    # of the weighted integrand for this one example (E over eps only).
    moments = losses.integrand_moments(
        MIXTURE,
        X[None],
        weighting=w,
        logsnr_min=LOGSNR_MIN,
        logsnr_max=LOGSNR_MAX,
        num_hermite=ACCURATE_HERMITE,
    )
    # 100 bins of 8 nodes against the 256-node rule: measured 8.9e-12 apart.
    assert float(moments.loss()) == pytest.approx(exact, rel=QUADRATURE_RTOL)

    variances = {}
    for name in PROPOSALS:
        proposal = _proposal(name)
        estimate = losses.weighted_loss(
            MIXTURE,
            X,
            weighting=w,
            proposal=proposal,
            logsnr_min=LOGSNR_MIN,
            logsnr_max=LOGSNR_MAX,
            num_samples=MC_SAMPLES,
            key=jax.random.key(3),
        )
        assert abs(float(estimate.mean) - exact) < NUM_SIGMAS * float(
            estimate.stderr
        ), name
        predicted = float(moments.variance(proposal))
        assert abs(float(estimate.variance) - predicted) < NUM_SIGMAS * float(
            estimate.variance_stderr
        ), name
        variances[name] = predicted
    spread = max(variances.values()) / min(variances.values())
    assert spread > PROPOSAL_VARIANCE_SPREAD
    assert variances["linear"] == max(variances.values())


@pytest.mark.parametrize("sampling", losses.SAMPLING_METHODS)
def test_every_sampling_method_is_unbiased(sampling):
    w = weighting.EpsCosine()
    proposal = _proposal("fm_ot")
    exact = float(
        losses.weighted_loss_quadrature(
            MIXTURE,
            X,
            weighting=w,
            logsnr_min=LOGSNR_MIN,
            logsnr_max=LOGSNR_MAX,
            num_hermite=ACCURATE_HERMITE,
        )
    )
    estimate = losses.weighted_loss(
        MIXTURE,
        X,
        weighting=w,
        proposal=proposal,
        logsnr_min=LOGSNR_MIN,
        logsnr_max=LOGSNR_MAX,
        num_samples=MC_SAMPLES,
        sampling=sampling,
        key=jax.random.key(4),
    )
    # The standard error comes from independent units: terms, antithetic pairs or
    # (for coupled draws) the 32 replicates.
    assert abs(float(estimate.mean) - exact) < NUM_SIGMAS * float(estimate.stderr)
    expected_units = {"iid": MC_SAMPLES, "antithetic": MC_SAMPLES // 2}
    assert estimate.num_independent == expected_units.get(
        sampling, losses.COUPLED_REPLICATES
    )

    u = losses.draw_uniforms(1000, sampling=sampling, key=jax.random.key(5))
    assert u.shape == (1000,) and bool(jnp.all((u >= 0) & (u < 1)))
    if sampling in ("stratified", "low_discrepancy"):
        counts = np.bincount(np.floor(np.asarray(u) * 1000).astype(int), minlength=1000)
        assert np.all(counts == 1)  # exactly one draw per stratum
        # In replicates, every block of 125 holds one draw per stratum of its own.
        blocks = losses.draw_uniforms(
            1000, sampling=sampling, num_replicates=8, key=jax.random.key(5)
        ).reshape(8, 125)
        for block in np.asarray(blocks):
            counts = np.bincount(np.floor(block * 125).astype(int), minlength=125)
            assert np.all(counts == 1)
    if sampling == "antithetic":
        assert np.allclose(np.asarray(u[:500] + u[500:]), 1.0, rtol=0, atol=1e-15)


@pytest.mark.parametrize("sampling", losses.SAMPLING_METHODS)
def test_reported_stderr_matches_the_spread_of_repeated_estimates(sampling):
    # v_cosine under the linear proposal: antithetic partners are correlated
    # (+0.32), so the i.i.d. formula is wrong for pairs as for coupled draws.
    w = weighting.VCosine()
    proposal = _proposal("linear")
    replicates = 8 if sampling in ("stratified", "low_discrepancy") else None
    repeated = jax.jit(
        jax.vmap(
            lambda key: losses.weighted_loss(
                MIXTURE,
                X,
                weighting=w,
                proposal=proposal,
                logsnr_min=LOGSNR_MIN,
                logsnr_max=LOGSNR_MAX,
                num_samples=CALIBRATION_SAMPLES,
                sampling=sampling,
                num_replicates=replicates,
                key=key,
            )
        )
    )
    estimates = repeated(jax.random.split(jax.random.key(11), CALIBRATION_REPEATS))
    spread = float(np.var(np.asarray(estimates.mean), ddof=1))
    reported = np.asarray(estimates.stderr) ** 2
    relative_error = reported.std() / reported.mean() / math.sqrt(reported.size)
    widen = CALIBRATION_DENOMINATOR_SIGMAS * relative_error
    dof = CALIBRATION_REPEATS - 1
    low, high = (
        scipy.stats.chi2.ppf(
            [CALIBRATION_FALSE_ALARM / 2, 1 - CALIBRATION_FALSE_ALARM / 2], dof
        )
        / dof
    )
    ratio = spread / reported.mean()
    assert low * (1 - widen) < ratio < high * (1 + widen), ratio
    if sampling != "iid":
        # The i.i.d. formula sqrt(variance / n) would fail here.
        naive = spread / float(np.mean(np.asarray(estimates.variance)))
        naive *= CALIBRATION_SAMPLES
        assert not low * (1 - widen) < naive < high * (1 + widen), naive


def test_antithetic_pairs_across_a_batch():
    # One level per example, partners i and i + n/2 on levels u and 1 - u; the
    # examples are fresh draws, so the estimate is of E_x L_w(x).
    w = weighting.VCosine()
    proposal = _proposal("linear")
    data_key, loss_key = jax.random.split(jax.random.key(12))
    batch = _sample(MIXTURE, MC_SAMPLES, data_key)
    estimate = losses.weighted_loss_batch(
        MIXTURE,
        batch,
        weighting=w,
        proposal=proposal,
        logsnr_min=LOGSNR_MIN,
        logsnr_max=LOGSNR_MAX,
        sampling="antithetic",
        key=loss_key,
    )
    # E_x L_w(x) by quadrature: 6 Gauss-Hermite nodes per dimension for x and eps
    # are within 2e-4 of 10 nodes, far below the standard error (0.04).
    xs, x_prob = losses.data_quadrature(MIXTURE, num_hermite=6)
    exact = losses.integrand_moments(
        MIXTURE,
        xs,
        x_prob=x_prob,
        weighting=w,
        logsnr_min=LOGSNR_MIN,
        logsnr_max=LOGSNR_MAX,
        num_hermite=6,
        num_bins=BY_PARTS_POINTS // losses.GAUSS_LEGENDRE_ORDER,
    ).loss()
    assert estimate.num_independent == MC_SAMPLES // 2
    assert abs(float(estimate.mean - exact)) < NUM_SIGMAS * float(estimate.stderr)
    # Partners are positively correlated here (rho = +0.33, measured on 1e5
    # pairs), so the pair-based error is sqrt(1 + rho) times the i.i.d. formula:
    # reporting the latter would understate it by 13%.
    inflation = float(estimate.stderr**2 * MC_SAMPLES / estimate.variance)
    assert inflation > 1 + ANTITHETIC_MIN_CORRELATION, inflation
    with pytest.raises(ValueError, match="even num_samples; got 3"):
        losses.weighted_loss_batch(
            MIXTURE,
            batch[:3],
            weighting=w,
            proposal=proposal,
            logsnr_min=LOGSNR_MIN,
            logsnr_max=LOGSNR_MAX,
            sampling="antithetic",
            key=loss_key,
        )


# --- the variance-optimal and adaptive proposals -------------------------------------


def test_optimal_proposal_reaches_the_closed_form_variance():
    # 1-D data, two components, a perturbed denoiser: E over (x, eps) by
    # Gauss-Hermite in both (12 nodes each), accurate far beyond the Monte Carlo
    # errors below (about 1% on the variance).
    data = analytic.GaussianMixture(
        np.array([[-1.0], [0.8]]), np.array([0.3, 0.5]), np.array([0.4, 0.6])
    )
    model = losses.PerturbedDenoiser(data, amplitude=0.5)
    w = weighting.Sigmoid(bias=2.0)
    xs, x_prob = losses.data_quadrature(data, num_hermite=12)
    moments = losses.integrand_moments(
        model,
        xs,
        x_prob=x_prob,
        weighting=w,
        logsnr_min=LOGSNR_MIN,
        logsnr_max=LOGSNR_MAX,
        num_hermite=12,
    )
    optimal = moments.optimal_proposal()
    assert isinstance(optimal, schedules.PiecewiseConstant)
    assert optimal.num_bins == 100

    # Formula for this proposal against the closed form of the optimum: the
    # piecewise-constant optimum exceeds it by O(bin width^2).
    closed_form = float(moments.optimal_variance())
    variance = float(moments.variance(optimal))
    assert closed_form <= variance <= closed_form * (1 + BINNING_RTOL)

    # The optimum beats every schedule and the paper's adaptive proxy.
    for name in PROPOSALS:
        assert float(moments.variance(_proposal(name))) > variance, name
    assert float(moments.variance(moments.adaptive_proposal())) >= variance

    # Monte Carlo: the per-sample variance of fresh draws (x, eps, level ~ p*).
    data_key, loss_key = jax.random.split(jax.random.key(8))
    estimate = losses.weighted_loss_batch(
        model,
        _sample(data, 50_000, data_key),
        weighting=w,
        proposal=optimal,
        logsnr_min=LOGSNR_MIN,
        logsnr_max=LOGSNR_MAX,
        key=loss_key,
    )
    deviation = abs(float(estimate.variance) - variance)
    assert deviation < NUM_SIGMAS * float(estimate.variance_stderr)
    deviation = abs(float(estimate.mean - moments.loss()))
    assert deviation < NUM_SIGMAS * float(estimate.stderr)

    # Levels stratified across the batch keep every term unbiased (the standard
    # error comes from the spread of 32 independent replicates).
    stratified = losses.weighted_loss_batch(
        model,
        _sample(data, 50_000, data_key),
        weighting=w,
        proposal=optimal,
        logsnr_min=LOGSNR_MIN,
        logsnr_max=LOGSNR_MAX,
        sampling="stratified",
        key=loss_key,
    )
    deviation = abs(float(stratified.mean - moments.loss()))
    assert deviation < NUM_SIGMAS * float(stratified.stderr)


def test_adaptive_proxy_is_optimal_for_a_single_gaussian_with_its_exact_denoiser():
    # The residual eps - eps_hat is then Gaussian with a variance that depends on
    # logsnr only, so E[g^2] = (1 + 2 / D) E[g]^2 and the two proposals coincide up
    # to binning.
    data = analytic.GaussianMixture.gaussian(2, 0.7)
    xs, x_prob = losses.data_quadrature(data, num_hermite=6)
    moments = losses.integrand_moments(
        data,
        xs,
        x_prob=x_prob,
        weighting=weighting.Sigmoid(bias=2.0),
        logsnr_min=LOGSNR_MIN,
        logsnr_max=LOGSNR_MAX,
        num_hermite=6,
        num_bins=50,
    )
    ratio = moments.mean_square / moments.mean**2
    assert np.allclose(ratio, 1 + 2 / 2, rtol=1e-10)
    adaptive = float(moments.variance(moments.adaptive_proposal()))
    optimal = float(moments.variance(moments.optimal_proposal()))
    assert optimal <= adaptive <= optimal * (1 + BINNING_RTOL)


# --- check 5: the negative part of dw/dt ---------------------------------------------


@pytest.mark.parametrize("name", sorted(weighting.WEIGHTINGS))
def test_negative_mass_of_dw_dt(name):
    w = weighting.WEIGHTINGS[name]()
    masses = losses.dweight_masses(w, LOGSNR_MIN, LOGSNR_MAX)
    balance = masses["positive_mass"] - masses["negative_mass"]
    assert balance == pytest.approx(
        masses["weight_min"] - masses["weight_max"], abs=1e-12
    )
    if name in MONOTONIC:
        assert masses["negative_mass"] == 0.0
    else:
        assert name in NON_MONOTONIC
        assert masses["negative_fraction"] > NEGATIVE_SHARE_FLOOR


def test_negative_mass_of_eps_cosine_in_closed_form():
    # sech(l / 2) rises from sech(6) to 1 on [-12, 0] and falls back on [0, 12].
    masses = losses.dweight_masses(weighting.EpsCosine(), LOGSNR_MIN, LOGSNR_MAX)
    expected = 1 - 1 / math.cosh(6.0)
    assert masses["negative_mass"] == pytest.approx(expected, abs=MASS_TOLERANCE)
    assert masses["positive_mass"] == pytest.approx(expected, abs=MASS_TOLERANCE)
    assert masses["negative_fraction"] == pytest.approx(0.5, abs=MASS_TOLERANCE)


# --- bad input ------------------------------------------------------------------------


def test_bad_input_raises_clear_errors():
    w = weighting.Sigmoid()
    with pytest.raises(ValueError, match=r"logsnr_max=15.0.*\[-12.0, 12.0\]"):
        losses.weighted_loss(
            MIXTURE,
            X,
            weighting=w,
            proposal=_proposal("cosine", -12.0, 15.0),
            logsnr_min=LOGSNR_MIN,
            logsnr_max=LOGSNR_MAX,
            key=jax.random.key(0),
        )
    with pytest.raises(ValueError, match="decoder='bernoulli'"):
        losses.negative_elbo(
            MIXTURE,
            X,
            logsnr_min=LOGSNR_MIN,
            logsnr_max=LOGSNR_MAX,
            decoder="bernoulli",
            key=jax.random.key(0),
        )
    with pytest.raises(ValueError, match="num_levels=1"):
        losses.reconstruction(X, 5.0, decoder="discrete", num_levels=1)
    with pytest.raises(ValueError, match="even num_samples; got 3"):
        losses.draw_uniforms(3, sampling="antithetic", key=jax.random.key(0))
    with pytest.raises(ValueError, match="sampling='sobol'"):
        losses.draw_uniforms(3, sampling="sobol", key=jax.random.key(0))
    # (jaxtyping's run-time check in the test session names the shapes first.)
    with pytest.raises((ValueError, jaxtyping.TypeCheckError), match="shape"):
        losses.weighted_loss_quadrature(
            MIXTURE,
            X,
            weighting=w,
            logsnr_min=LOGSNR_MIN,
            logsnr_max=LOGSNR_MAX,
            eps=jnp.zeros((5, 3)),
        )
    with pytest.raises((ValueError, jaxtyping.TypeCheckError), match="eps_prob"):
        losses.weighted_loss_quadrature(
            MIXTURE,
            X,
            weighting=w,
            logsnr_min=LOGSNR_MIN,
            logsnr_max=LOGSNR_MAX,
            eps=jnp.zeros((5, 2)),
            eps_prob=jnp.ones(4) / 4,
        )
    with pytest.raises(ValueError, match="num_replicates=3 applies to stratified"):
        losses.weighted_loss(
            MIXTURE,
            X,
            weighting=w,
            proposal=_proposal("cosine"),
            logsnr_min=LOGSNR_MIN,
            logsnr_max=LOGSNR_MAX,
            num_samples=12,
            num_replicates=3,
            key=jax.random.key(0),
        )
    with pytest.raises(ValueError, match="num_samples=10 must be a multiple of"):
        losses.draw_uniforms(
            10, sampling="stratified", num_replicates=4, key=jax.random.key(0)
        )
    with pytest.warns(UserWarning, match="no standard error"):
        single = losses.weighted_loss(
            MIXTURE,
            X,
            weighting=w,
            proposal=_proposal("cosine"),
            logsnr_min=LOGSNR_MIN,
            logsnr_max=LOGSNR_MAX,
            num_samples=8,
            sampling="low_discrepancy",
            num_replicates=1,
            key=jax.random.key(0),
        )
    assert math.isnan(float(single.stderr))
    with pytest.raises(ValueError, match="EpsCosine is not non-increasing"):
        losses.implied_constant(
            MIXTURE,
            X,
            weighting=weighting.EpsCosine(),
            logsnr_min=LOGSNR_MIN,
            logsnr_max=LOGSNR_MAX,
        )
    with pytest.raises(ValueError, match="logsnr_min=3.0 must be below"):
        losses.negative_elbo_quadrature(MIXTURE, X, logsnr_min=3.0, logsnr_max=-3.0)
    with pytest.raises(Exception, match="must be one of the 256 levels"):
        losses.reconstruction(jnp.array([0.5]), 5.0, decoder="discrete")


def test_weighted_loss_term_is_finite_in_float32_at_the_extremes():
    x = jnp.array([0.3, -1.2], jnp.float32)

    def model(z, logsnr):
        return 0.5 * z

    # The EDM proposal's density at +-40 is below e^-120, so w / p itself exceeds
    # float32 there (see the NOTE in weighted_loss_term); it is checked on its
    # default range, the others on [-40, 40].
    for name in PROPOSALS:
        bound = 15.0 if name == "edm" else 40.0
        proposal = _proposal(name, -bound, bound)
        for logsnr in (-bound, -bound / 2, 0.0, bound / 2, bound):
            value = losses.weighted_loss_term(
                model,
                x,
                jnp.asarray(logsnr, jnp.float32),
                weighting=weighting.Sigmoid(),
                proposal=proposal,
                key=jax.random.key(0),
            )
            assert value.dtype == jnp.float32
            assert bool(jnp.isfinite(value)), (name, logsnr)
