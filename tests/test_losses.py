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

from elbo_core import analytic, losses, schedules, weighting

LOGSNR_MIN, LOGSNR_MAX = -12.0, 12.0

# The by-parts identity must hold to quadrature precision (the issue asks below
# 1e-8); composite 8-node Gauss-Legendre on 32 panels of width 0.75, outer and inner,
# measures about 1e-11, so 1e-8 leaves room for rounding and machine differences.
BY_PARTS_RTOL = 1e-8
BY_PARTS_POINTS = 256
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
# PAPER.md section 4 quotes -ELBO and the NLL at s = 0.7 on [-12, 12] to 6 decimals.
PAPER_DECIMALS_TOLERANCE = 5e-7
# Masses of the parts of dw/dt are summed over a 20001-point grid: exact but in the
# cells where dw/dlogsnr changes sign, where the error is |w''| h^2 / 2 ~ 1e-6 at most.
MASS_TOLERANCE = 1e-6
# A piecewise-constant proposal on 100 bins of width 0.24 approximates p*; its
# variance exceeds the continuous optimum by O(width^2): measured 2.3e-3 relative
# for the 1-D perturbed case, 9.1e-3 on 50 bins and 5.7e-4 on 200 (ratio 4.0).
BINNING_RTOL = 5e-3


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
        num_inner=BY_PARTS_POINTS,
        num_hermite=BY_PARTS_HERMITE,
    )
    assert float(terms.relative_residual) < BY_PARTS_RTOL
    # The identity is not vacuous: the weighted ELBOs carry the loss unless w is
    # constant, and the constant is the model-independent prior term.
    if name != "elbo":
        assert abs(float(terms.integral)) > 1e-3 * abs(float(terms.weighted_loss))
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
        num_inner=BY_PARTS_POINTS,
        num_hermite=BY_PARTS_HERMITE,
    )
    split = losses.by_parts(MIXTURE, X, **kwargs)
    unsplit = losses.by_parts(MIXTURE, X, breakpoints=(), **kwargs)
    assert float(split.relative_residual) < BY_PARTS_RTOL
    assert float(unsplit.relative_residual) > 10 * float(split.relative_residual)


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
def test_monotonic_weighted_loss_is_an_expected_elbo(name):
    w = weighting.WEIGHTINGS[name]()
    weight_min = float(w(LOGSNR_MIN))
    expected_constant = float(
        losses.augmentation_constant(X, weighting=w, logsnr_min=LOGSNR_MIN)
    )
    constants = []
    for denoiser in ("exact", "perturbed"):
        model = DENOISERS[denoiser]
        # The same Gauss-Hermite rule on both sides: only the levels are random.
        exact = float(
            losses.weighted_loss_quadrature(
                model,
                X,
                weighting=w,
                logsnr_min=LOGSNR_MIN,
                logsnr_max=LOGSNR_MAX,
                num_hermite=BY_PARTS_HERMITE,
            )
        )
        estimate = losses.expected_truncated_loss(
            model,
            X,
            weighting=w,
            logsnr_min=LOGSNR_MIN,
            logsnr_max=LOGSNR_MAX,
            num_samples=20_000,
            num_points=BY_PARTS_POINTS,
            num_hermite=BY_PARTS_HERMITE,
            key=jax.random.key(0),
        )
        constant = weight_min * float(estimate.mean) - exact
        stderr = weight_min * float(estimate.stderr)
        tolerance = NUM_SIGMAS * stderr + QUADRATURE_RTOL * abs(exact)
        assert abs(constant - expected_constant) < tolerance, (denoiser, constant)
        constants.append((constant, stderr, abs(exact)))

    # The constant does not depend on the model. It is a difference of two losses,
    # so its quadrature error scales with the losses, not with the constant (which
    # is ~2e-6 for the ELBO weighting, whose two sides are computed with no noise).
    (first, first_se, first_scale), (second, second_se, second_scale) = constants
    assert abs(first - second) < NUM_SIGMAS * math.hypot(first_se, second_se) + (
        QUADRATURE_RTOL * max(first_scale, second_scale)
    )


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
    xi, prob = losses.eps_quadrature((1,), num_hermite=24)
    terms = jax.vmap(
        lambda x: losses.negative_elbo_quadrature(
            oracle,
            x,
            logsnr_min=logsnr_min,
            logsnr_max=logsnr_max,
            num_hermite=24,
        )
    )(std * xi)
    closed = losses.gaussian_elbo_terms(
        std, logsnr_min=logsnr_min, logsnr_max=logsnr_max
    )
    for field in ("prior", "reconstruction", "diffusion"):
        assert math.isclose(
            float(prob @ getattr(terms, field)),
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
    assert float(parts) == pytest.approx(float(bpd["bpd"]), rel=1e-14)


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
    assert float(moments.loss()) == pytest.approx(exact, rel=1e-6)

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
    assert max(variances.values()) > 2 * min(variances.values())
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
    # The i.i.d. standard error is conservative for the coupled draws.
    assert abs(float(estimate.mean) - exact) < NUM_SIGMAS * float(estimate.stderr)

    u = losses.draw_uniforms(1000, sampling=sampling, key=jax.random.key(5))
    assert u.shape == (1000,) and bool(jnp.all((u >= 0) & (u < 1)))
    if sampling in ("stratified", "low_discrepancy"):
        counts = np.bincount(np.floor(np.asarray(u) * 1000).astype(int), minlength=1000)
        assert np.all(counts == 1)  # exactly one draw per stratum


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

    # Levels stratified across the batch keep every term unbiased (the i.i.d.
    # standard error is conservative for them).
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
        assert masses["negative_mass"] > 0.01 * masses["positive_mass"]


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
