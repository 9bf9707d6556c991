"""Tests of `elbo_core.likelihood`: the probability-flow ODE log-likelihood.

The oracle's exact denoiser with the oracle's exact noisy marginal as prior makes the
ODE log-likelihood exact up to solver error, so most checks compare with closed
forms. Solves are shared through module-scoped fixtures: each distinct configuration
costs one compilation of a diffrax solve (several seconds on two cores).
"""

import collections
import contextlib
import math

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.stats import norm

from elbo_core import analytic, likelihood, losses, networks, process, schedules
from elbo_core.likelihood import NoisyMarginal

# Accuracy demanded of the oracle at tight tolerances (the requirement).
ORACLE_ACCURACY = 1e-5
# Tolerance sweep: a 5th-order solver's global error falls roughly in proportion to
# the tolerance, so each 100-fold tightening must cut the error.
TOLERANCES = (1e-6, 1e-8, 1e-10)
# Solver tolerance for checks that need "exact" solves; its global error on these
# problems is below 1e-8 nats (measured by the sweep above).
TIGHT = 1e-10
# Identities that hold up to solver error at TIGHT: a few times its error.
IDENTITY_TOLERANCE = 1e-7
# Monte Carlo bounds: four standard errors.
NUM_STANDARD_ERRORS = 4.0
# Float32 solve at rtol = atol = 1e-5 over [-40, 40]: the global error and float32
# rounding of a sum of ~100 terms of size ~10 stay below 1e-3 nats.
FLOAT32_ACCURACY = 1e-3
# The N(0, I) prior's error for one example, expanded in alpha_min, matches to third
# order: alpha_min^3 (1.5e-8 at logsnr_min = -12) times a cubic in |z_min| < 4 and
# the data's moments; measured 9 alpha_min^3, allowed 100.
THIRD_ORDER_FACTOR = 100.0
# Two formulas for the same number, differing by the rounding of a few operations.
ROUNDING = 1e-10

LOGSNR_MIN, LOGSNR_MAX = -12.0, 12.0
SCHEDULE = schedules.Cosine(logsnr_min=LOGSNR_MIN, logsnr_max=LOGSNR_MAX)
KEY = jax.random.key(0)


def _mixture() -> analytic.GaussianMixture:
    return analytic.GaussianMixture(
        np.array([[-2.0, 0.5], [1.5, -1.0], [0.5, 2.0]]),
        np.array([0.4, 0.6, 0.3]),
        np.array([0.3, 0.5, 0.2]),
    )


def _gaussian10() -> analytic.GaussianMixture:
    return analytic.GaussianMixture.gaussian(10, std=0.6, mean=0.3)


def _data(mixture, num_examples, seed):
    """Draws from the mixture, with NumPy (no compilation per shape)."""
    rng = np.random.default_rng(seed)
    weights = np.asarray(mixture.weights)
    component = rng.choice(mixture.num_components, size=num_examples, p=weights)
    noise = rng.standard_normal((num_examples, mixture.dim))
    means, stds = np.asarray(mixture.means), np.asarray(mixture.stds)
    return jnp.asarray(means[component] + stds[component, None] * noise)


def _latents(mixture, num_examples, seed, logsnr):
    """Draws from the exact noisy marginal q(z) at `logsnr`."""
    x = _data(mixture, num_examples, seed)
    eps = np.random.default_rng(seed + 1000).standard_normal(x.shape)
    return process.alpha(logsnr) * x + process.sigma(logsnr) * eps


def _exact_data_log_prob(mixture, x, logsnr_max):
    """The density of `z_max / alpha_max`, what the data-space solve estimates."""
    return jax.vmap(mixture.perturbed_log_prob, in_axes=(0, None))(x, logsnr_max)


def _standard_normal_gap(mixture, z_min, logsnr_min):
    """`log N(z_min; 0, I) - log q(z_min)`: the exact error of the N(0, I) prior."""
    return jax.vmap(lambda z: likelihood.normal_prior_error(mixture, z, logsnr_min))(
        z_min
    )


# --- exactness against the oracle -----------------------------------------------------


@pytest.fixture(scope="module", params=["mixture2", "gaussian10"])
def oracle_sweep(request):
    """Errors against the exact marginal at each tolerance (one compilation)."""
    mixture = _mixture() if request.param == "mixture2" else _gaussian10()
    z = _latents(mixture, 16, seed=1, logsnr=LOGSNR_MAX)
    exact = jax.vmap(lambda row: mixture.marginal_log_prob(row, LOGSNR_MAX))(z)
    errors, evaluations = [], []
    for tolerance in TOLERANCES:
        log_likelihood, stats = likelihood.batch_ode_log_likelihood(
            mixture,
            z,
            schedule=SCHEDULE,
            prior=NoisyMarginal(mixture),
            input_space="latent",
            rtol=tolerance,
            atol=tolerance,
        )
        assert bool(jnp.all(stats["successful"]))
        errors.append(float(jnp.max(jnp.abs(log_likelihood - exact))))
        evaluations.append(float(jnp.mean(stats["num_function_evaluations"])))
    return errors, evaluations


def test_oracle_log_likelihood_is_exact(oracle_sweep):
    errors, _ = oracle_sweep
    assert errors[-1] < ORACLE_ACCURACY, errors


def test_error_shrinks_with_tolerance(oracle_sweep):
    errors, evaluations = oracle_sweep
    assert all(a > b for a, b in zip(errors[:-1], errors[1:], strict=True)), errors
    assert all(a < b for a, b in zip(evaluations[:-1], evaluations[1:], strict=True))


def test_direction_encodes_towards_noise():
    """The flow maps z_max down to z_min; for Gaussian data the map is linear.

    For `x ~ N(m, s^2 I)`, `(z - alpha m) / sqrt(alpha^2 s^2 + sigma^2)` is conserved
    along the probability-flow ODE, which fixes `z_min` in closed form. Encoding then
    decoding returns the start.
    """
    from elbo_core.sampling import probability_flow

    mean, std = 0.3, 0.6
    mixture = analytic.GaussianMixture.gaussian(3, std=std, mean=mean)
    z_max = jnp.array([0.7, -1.2, 2.0])

    def standardise(z, logsnr):
        alpha, sigma = process.alpha(logsnr), process.sigma(logsnr)
        return (z - alpha * mean) / jnp.sqrt(alpha**2 * std**2 + sigma**2)

    def unstandardise(u, logsnr):
        alpha, sigma = process.alpha(logsnr), process.sigma(logsnr)
        return alpha * mean + u * jnp.sqrt(alpha**2 * std**2 + sigma**2)

    expected = unstandardise(standardise(z_max, LOGSNR_MAX), LOGSNR_MIN)
    flow = dict(rtol=TIGHT, atol=TIGHT)
    z_min, stats = probability_flow(
        mixture, z_max, logsnr_start=LOGSNR_MAX, logsnr_end=LOGSNR_MIN, **flow
    )
    assert bool(stats["successful"])
    np.testing.assert_allclose(z_min, expected, atol=IDENTITY_TOLERANCE)
    z_back, _ = probability_flow(
        mixture, z_min, logsnr_start=LOGSNR_MIN, logsnr_end=LOGSNR_MAX, **flow
    )
    np.testing.assert_allclose(z_back, z_max, atol=IDENTITY_TOLERANCE)


# --- the N(0, I) prior and the ELBO ---------------------------------------------------


@pytest.fixture(scope="module")
def mixture_with_normal_prior():
    mixture = _mixture()
    x = _data(mixture, 512, seed=2)
    log_likelihood, stats = likelihood.batch_ode_log_likelihood(
        mixture, x, schedule=SCHEDULE, rtol=TIGHT, atol=TIGHT
    )
    return mixture, x, log_likelihood, stats


def test_normal_prior_error_is_the_exact_prior_gap(mixture_with_normal_prior):
    """Per example, the N(0, I) prior's error is `log N(z_min) - log q(z_min)`."""
    mixture, x, log_likelihood, stats = mixture_with_normal_prior
    exact = _exact_data_log_prob(mixture, x, LOGSNR_MAX)
    gap = _standard_normal_gap(mixture, stats["z_min"], LOGSNR_MIN)
    np.testing.assert_allclose(log_likelihood - exact, gap, atol=IDENTITY_TOLERANCE)


def test_normal_prior_within_reported_mismatch(mixture_with_normal_prior):
    """`E[log q - log p_ode] = KL(q(z_min) || N(0, I))`, in `[0, E prior_kl]`.

    Per example, expanding `log q(z) - log N(z; 0, I)` in `a = alpha_min` (with
    `sigma_min^2 = 1 - a^2`, data mean `m`, covariance `C`) gives

        a z.m + a^2 (D/2 - |z|^2/2 - E|x|^2/2 + z^T C z/2) + O(a^3),

    so the error is of the order of `alpha_min`, far below a nat.
    """
    mixture, x, log_likelihood, stats = mixture_with_normal_prior
    shortfall = _exact_data_log_prob(mixture, x, LOGSNR_MAX) - log_likelihood
    margin = NUM_STANDARD_ERRORS * float(jnp.std(shortfall)) / math.sqrt(x.shape[0])
    mean = float(jnp.mean(shortfall))
    assert -margin <= mean <= float(jnp.mean(stats["prior_kl"])) + margin

    a, z = math.exp(LOGSNR_MIN / 2), stats["z_min"]
    m, c = mixture.mean(), mixture.covariance()
    second_moment = jnp.trace(c) + m @ m
    quadratic = jnp.einsum("ni,ij,nj->n", z, c, z)
    expansion = a * z @ m + a**2 * (
        mixture.dim / 2 - jnp.sum(z**2, axis=1) / 2 - second_moment / 2 + quadratic / 2
    )
    residual = float(jnp.max(jnp.abs(shortfall - expansion)))
    assert residual < THIRD_ORDER_FACTOR * a**3, residual


def test_gaussian_prior_mismatch_and_elbo_in_closed_form():
    """Expectations over Gaussian data, exact: prior mismatch and the ELBO's order.

    For `x ~ N(0, s^2 I)` and the exact denoiser the flow is linear, so the ODE
    log-likelihood, the exact log-density and the ELBO (whose expectation over
    `eps` is a quadratic) are quadratics in `x`. Their expectations are then exact
    averages over `2 D` design points with the mean and covariance of the data
    (`x = +-sqrt(D) s e_i`), and of the noise for the ELBO. In closed form, with
    `V = alpha^2 s^2 + sigma^2`,

        E[log q - log p_ode] = -D/2 log V_min + D/2 (V_min - 1) alpha_max^2 s^2 / V_max,

    which lies in `[0, E KL(q(z_min | x) || N(0, I))]` (the reported `prior_kl`);
    and the ELBO of the same denoiser lies below the ODE log-likelihood.
    """
    std, num_dims, logsnr_min = 0.6, 10, -6.0
    schedule = schedules.Cosine(logsnr_min=logsnr_min, logsnr_max=LOGSNR_MAX)
    mixture = analytic.GaussianMixture.gaussian(num_dims, std=std)
    design = math.sqrt(num_dims) * jnp.concatenate(
        [jnp.eye(num_dims), -jnp.eye(num_dims)]
    )
    x = std * design
    log_likelihood, stats = likelihood.batch_ode_log_likelihood(
        mixture, x, schedule=schedule, rtol=TIGHT, atol=TIGHT
    )
    exact = _exact_data_log_prob(mixture, x, LOGSNR_MAX)

    # The prior's mismatch, in closed form, and within the reported bound.
    def variance(logsnr):
        return float(process.alpha(logsnr) ** 2 * std**2 + process.sigma(logsnr) ** 2)

    v_min, v_max = variance(logsnr_min), variance(LOGSNR_MAX)
    alpha2_max = float(process.alpha(LOGSNR_MAX) ** 2)
    expected_gap = (
        -num_dims / 2 * math.log(v_min)
        + num_dims / 2 * (v_min - 1) * alpha2_max * std**2 / v_max
    )
    gap = float(jnp.mean(exact - log_likelihood))
    assert abs(gap - expected_gap) < IDENTITY_TOLERANCE, (gap, expected_gap)
    assert 0 < expected_gap < float(jnp.mean(stats["prior_kl"]))

    # The ELBO (exact expectation over eps by the design) is below, on average.
    elbo = -jax.vmap(
        lambda row: (
            losses.negative_elbo_quadrature(
                mixture, row, logsnr_min=logsnr_min, logsnr_max=LOGSNR_MAX, eps=design
            ).total
        )
    )(x)
    closed_form = losses.gaussian_elbo_terms(
        std, logsnr_min=logsnr_min, logsnr_max=LOGSNR_MAX, num_dims=num_dims
    )
    np.testing.assert_allclose(jnp.mean(elbo), -closed_form.total, atol=1e-8)
    assert float(jnp.mean(elbo)) < float(jnp.mean(log_likelihood)) - 1e-6


# --- Hutchinson -----------------------------------------------------------------------


NUM_PROBES = 256


@pytest.fixture(scope="module")
def hutchinson_runs():
    mixture = _mixture()
    # The same shape and options as `oracle_sweep`: the exact solve reuses its
    # compilation.
    z = _latents(mixture, 16, seed=4, logsnr=LOGSNR_MAX)
    common = dict(
        schedule=SCHEDULE,
        prior=NoisyMarginal(mixture),
        input_space="latent",
        rtol=1e-8,
        atol=1e-8,
    )
    exact, _ = likelihood.batch_ode_log_likelihood(mixture, z, **common)
    runs = {}
    for name in likelihood.PROBE_DISTRIBUTIONS:
        runs[name] = likelihood.batch_ode_log_likelihood(
            mixture,
            z,
            divergence="hutchinson",
            num_probes=NUM_PROBES,
            probe_distribution=name,
            key=jax.random.key(5),
            **common,
        )
    return exact, runs


@pytest.mark.parametrize("name", likelihood.PROBE_DISTRIBUTIONS)
def test_hutchinson_agrees_with_exact(hutchinson_runs, name):
    exact, runs = hutchinson_runs
    estimate, stats = runs[name]
    assert stats["probe_log_likelihoods"].shape == (exact.shape[0], NUM_PROBES)
    assert bool(jnp.all(stats["successful"]))
    np.testing.assert_allclose(
        estimate, jnp.mean(stats["probe_log_likelihoods"], axis=1), rtol=1e-12
    )
    deviation = jnp.abs(estimate - exact)
    assert bool(jnp.all(deviation <= NUM_STANDARD_ERRORS * stats["std_error"])), (
        deviation,
        stats["std_error"],
    )


def test_rademacher_variance_not_above_gaussian(hutchinson_runs):
    """`Var(u^T M u)` is `2 sum_{i != j} M_ij^2` for Rademacher probes and
    `2 sum_{i, j} M_ij^2` for Gaussian ones (M symmetric), so never larger."""
    _, runs = hutchinson_runs
    rademacher = jnp.var(runs["rademacher"][1]["probe_log_likelihoods"], axis=1)
    gaussian = jnp.var(runs["gaussian"][1]["probe_log_likelihoods"], axis=1)
    assert float(jnp.mean(rademacher)) <= float(jnp.mean(gaussian))
    assert int(jnp.sum(rademacher <= gaussian)) >= 0.75 * rademacher.shape[0]


def test_rademacher_exact_for_diagonal_jacobian():
    """Isotropic Gaussian data: a diagonal Jacobian, so every Rademacher probe is
    exact."""
    mixture = _gaussian10()
    z = _latents(mixture, 2, seed=6, logsnr=LOGSNR_MAX)
    probes = jax.random.rademacher(jax.random.key(7), (3, 10), float)

    @eqx.filter_jit
    def traces(model, z, probes):
        def one(row):
            _, estimates = likelihood.eps_divergence(model, row, 1.0, probes)
            _, exact = likelihood.eps_divergence(model, row, 1.0)
            return estimates, exact

        return jax.vmap(one)(z)

    estimates, exact = traces(mixture, z, probes)
    np.testing.assert_allclose(estimates, jnp.broadcast_to(exact[:, None], (2, 3)))


# --- the exact divergence -------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 3, 10, 64])
def test_exact_divergence_matches_jacobian_trace(chunk_size):
    mixture = analytic.GaussianMixture(
        np.linspace(-1, 1, 20).reshape(2, 10),
        np.array([0.5, 0.8]),
        np.array([0.4, 0.6]),
    )
    z = jnp.linspace(-1.5, 2.0, 10)

    @eqx.filter_jit
    def compute(model, z):
        eps_hat, trace = likelihood.eps_divergence(model, z, 0.7, chunk_size=chunk_size)
        jacobian = jax.jacfwd(lambda v: model(v, 0.7))(z)
        return eps_hat, model(z, 0.7), trace, jnp.trace(jacobian)

    eps_hat, expected_eps_hat, trace, expected_trace = compute(mixture, z)
    np.testing.assert_allclose(eps_hat, expected_eps_hat, rtol=1e-12)
    np.testing.assert_allclose(trace, expected_trace, rtol=1e-12)


def test_augmented_drift_is_the_probability_flow():
    z, logsnr = jnp.array([0.3, -0.4]), 1.5

    @eqx.filter_jit
    def compute(model, z):
        def flow(v):
            return process.probability_flow_drift_logsnr(model(v, logsnr), v, logsnr)

        drift, divergence = likelihood.augmented_drift(model, z, logsnr)
        return drift, flow(z), divergence, jnp.trace(jax.jacfwd(flow)(z))

    drift, expected_drift, divergence, expected_divergence = compute(_mixture(), z)
    np.testing.assert_allclose(drift, expected_drift, rtol=1e-12)
    np.testing.assert_allclose(divergence, expected_divergence, rtol=1e-12)


# --- statistics, failures, compilation ------------------------------------------------


class _CountingDenoiser(eqx.Module):
    """Counts evaluations at run time through a host callback."""

    base: analytic.GaussianMixture

    def __call__(self, z, logsnr):
        jax.debug.callback(_count_evaluation)
        return self.base(z, logsnr)


_EVALUATIONS = [0]


def _count_evaluation():
    _EVALUATIONS[0] += 1


def test_function_evaluations_are_counted_honestly():
    mixture = _mixture()
    _EVALUATIONS[0] = 0
    log_likelihood, stats = likelihood.ode_log_likelihood(
        _CountingDenoiser(mixture), jnp.array([0.2, 0.4]), schedule=SCHEDULE
    )
    jax.block_until_ready(log_likelihood)
    assert _EVALUATIONS[0] == int(stats["num_function_evaluations"])
    assert int(stats["num_steps"]) == int(stats["num_accepted_steps"]) + int(
        stats["num_rejected_steps"]
    )
    assert int(stats["num_function_evaluations"]) == 1 + 6 * int(stats["num_steps"])


def test_failed_solve_is_flagged():
    """A solve cut short returns NaN for everything it would have computed.

    With Hutchinson probes, two steps from logsnr_max barely move `z`, so the
    truncated solve's values look plausible (probe estimates agreeing to 1e-8);
    none of them may come back finite.
    """
    mixture = _mixture()
    log_likelihood, stats = likelihood.ode_log_likelihood(
        mixture,
        jnp.array([0.2, 0.4]),
        schedule=SCHEDULE,
        divergence="hutchinson",
        num_probes=4,
        max_steps=2,
        key=KEY,
    )
    assert not bool(stats["successful"])
    assert int(stats["num_steps"]) == 2
    assert bool(jnp.isnan(log_likelihood))
    from_the_solve = (
        "std_error",
        "probe_log_likelihoods",
        "prior_log_prob",
        "divergence_integral",
        "z_min",
    )
    for name in from_the_solve:
        assert bool(jnp.all(jnp.isnan(stats[name]))), (name, stats[name])
    # What depends on x alone stays finite.
    assert bool(jnp.isfinite(stats["data_jacobian"]))
    assert bool(jnp.isfinite(stats["prior_kl"]))
    bpd = likelihood.ode_bits_per_dim(stats, num_dims=2, num_levels=256)
    assert bool(jnp.isnan(bpd["bpd"])) and bool(jnp.isnan(bpd["bpd_flow"]))


# JAX records these events for every trace of an outermost jitted function and for
# every XLA compilation (`jax.monitoring`).
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def _count_compilations():
    """Count top-level traces and XLA compilations while the block runs."""
    counts = collections.Counter()

    def listener(event, duration, **kwargs):
        counts[event] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _float32(tree):
    return jax.tree.map(
        lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, tree
    )


def test_batch_reuses_its_compilation_and_is_finite_in_float32_over_wide_range():
    """New parameters, tolerances, probes and log-SNR range: no trace, no compile.

    The second call changes every argument that may change between calls in
    practice (a model after a training step, a tolerance sweep, a fresh key, another
    schedule and range); it must neither retrace the batched solve nor compile
    anything. The first call shows that the counter sees both.
    """
    x = _data(_mixture(), 8, seed=8).astype(jnp.float32)
    network = _float32(
        networks.MLPDenoiser((2,), width_size=32, depth=2, key=jax.random.key(0))
    )
    trained = jax.tree.map(lambda a: 1.5 * a if eqx.is_inexact_array(a) else a, network)
    calls = [
        (
            network,
            1e-5,
            jax.random.key(1),
            schedules.Cosine(logsnr_min=-40.0, logsnr_max=40.0),
        ),
        (
            trained,
            1e-4,
            jax.random.key(2),
            schedules.Linear(logsnr_min=-30.0, logsnr_max=35.0),
        ),
    ]
    results, counts = [], []
    for model, tolerance, key, schedule in calls:
        with _count_compilations() as count:
            log_likelihood, stats = likelihood.batch_ode_log_likelihood(
                model,
                x,
                schedule=schedule,
                divergence="hutchinson",
                num_probes=2,
                rtol=tolerance,
                atol=tolerance,
                key=key,
            )
            jax.block_until_ready(log_likelihood)
        results.append((log_likelihood, stats))
        counts.append(count)
    assert counts[0][TRACE_EVENT] >= 1 and counts[0][COMPILE_EVENT] >= 1, counts[0]
    assert counts[1][TRACE_EVENT] == 0 and counts[1][COMPILE_EVENT] == 0, counts[1]
    for log_likelihood, stats in results:
        assert log_likelihood.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(log_likelihood)))
        assert bool(jnp.all(stats["successful"]))
    assert not np.allclose(results[0][0], results[1][0])


def test_schedule_end_points_can_be_traced():
    """A schedule passed through `jax.jit`: one trace serves every range.

    With the exact marginal as prior, the result is exact for any `logsnr_min`,
    and it must equal the solve outside `jit` (whose compilation the oracle sweep
    above already made).
    """
    mixture = _mixture()
    z = _latents(mixture, 16, seed=1, logsnr=LOGSNR_MAX)
    exact = jax.vmap(lambda row: mixture.marginal_log_prob(row, LOGSNR_MAX))(z)
    options = dict(
        prior=NoisyMarginal(mixture), input_space="latent", rtol=TIGHT, atol=TIGHT
    )
    traced_ends = []

    @jax.jit
    def solve(schedule, z):
        traced_ends.append(schedule.logsnr_min)
        return likelihood.batch_ode_log_likelihood(
            mixture, z, schedule=schedule, **options
        )

    z_min = []
    for logsnr_min in (LOGSNR_MIN, -8.0):
        schedule = schedules.Cosine(logsnr_min=logsnr_min, logsnr_max=LOGSNR_MAX)
        traced, stats = solve(schedule, z)
        untraced, _ = likelihood.batch_ode_log_likelihood(
            mixture, z, schedule=schedule, **options
        )
        np.testing.assert_allclose(traced, untraced, atol=IDENTITY_TOLERANCE)
        np.testing.assert_allclose(traced, exact, atol=ORACLE_ACCURACY)
        z_min.append(stats["z_min"])
    assert len(traced_ends) == 1 and isinstance(traced_ends[0], jax.core.Tracer)
    assert not np.allclose(z_min[0], z_min[1])


def test_float32_oracle_over_wide_range():
    mixture = _mixture()
    mixture32 = _float32(mixture)
    schedule = schedules.Cosine(logsnr_min=-40.0, logsnr_max=40.0)
    z = _latents(mixture, 8, seed=9, logsnr=40.0)
    exact = jax.vmap(lambda row: mixture.marginal_log_prob(row, 40.0))(z)
    log_likelihood, stats = likelihood.batch_ode_log_likelihood(
        mixture32,
        z.astype(jnp.float32),
        schedule=schedule,
        prior=NoisyMarginal(mixture32),
        input_space="latent",
    )
    assert log_likelihood.dtype == jnp.float32
    assert bool(jnp.all(stats["successful"]))
    np.testing.assert_allclose(log_likelihood, exact, atol=FLOAT32_ACCURACY)


# --- discrete data --------------------------------------------------------------------


def test_bits_per_dim_of_uniform_levels_is_log2_k():
    """A uniform density over the dequantised cube is uniform over the k levels."""
    num_levels, num_dims = 256, 5
    bin_width = 2 / (num_levels - 1)
    log_density = -num_dims * math.log(2 + bin_width)
    bpd = likelihood.bits_per_dim(log_density, num_dims=num_dims, num_levels=num_levels)
    np.testing.assert_allclose(bpd, math.log2(num_levels), rtol=1e-12)
    # The offset for [-1, 1] data: log2(127.5) bits per dimension.
    offset = likelihood.bits_per_dim(0.0, num_dims=1, num_levels=256)
    np.testing.assert_allclose(offset, math.log2(127.5), rtol=1e-12)


# Gauss-Legendre nodes per dimension for the expectation over the position in a bin.
NUM_BIN_NODES = 4


def test_bits_per_dim_end_to_end_on_discretised_oracle():
    """dequantize -> ODE -> bits per dimension, on data with a known discrete law.

    Data on `k = 4` levels in 2-D with probabilities `P`; the model is a mixture of
    narrow Gaussians (std h/4) at the level centres with weights `P`. With its exact
    denoiser and exact prior the ODE gives the exact density of each dequantised
    point, so each component of `ode_bits_per_dim` is checked, and so is the chain

        H(P) <= -E log2 Q(bin) <= E[bpd]      (bits per dimension)

    (Gibbs: `Q`, the model's bin masses, has total mass at most one; then Jensen,
    equation (3) of `likelihood`), with the expectation over the position in a bin
    by Gauss-Legendre (no Monte Carlo error): the ODE's bits per dimension bound
    the discrete entropy, within solver tolerance.
    """
    num_levels, num_dims = 4, 2
    h = 2 / (num_levels - 1)
    levels = -1 + h * np.arange(num_levels)
    centres = np.stack(np.meshgrid(levels, levels, indexing="ij"), -1).reshape(-1, 2)
    probs = np.arange(1.0, 17.0) / 136.0
    model = analytic.GaussianMixture(centres, np.full(16, h / 4), probs)

    # Dequantised points: draws through `dequantize`, and quadrature nodes.
    rng = np.random.default_rng(11)
    draws = jnp.asarray(centres[rng.choice(16, size=32, p=probs)])
    dequantized = likelihood.dequantize(draws, num_levels=num_levels, key=KEY)
    unit, unit_weights = np.polynomial.legendre.leggauss(NUM_BIN_NODES)
    u = np.stack(np.meshgrid(unit, unit, indexing="ij"), -1).reshape(-1, 2)
    u_prob = np.outer(unit_weights, unit_weights).ravel() / 4
    nodes = (centres[:, None] + h * u[None] / 2).reshape(-1, 2)
    node_prob = (probs[:, None] * u_prob[None]).ravel()
    x = jnp.concatenate([dequantized, jnp.asarray(nodes)])

    log_likelihood, stats = likelihood.batch_ode_log_likelihood(
        model, x, schedule=SCHEDULE, prior=NoisyMarginal(model), rtol=TIGHT, atol=TIGHT
    )
    assert bool(jnp.all(stats["successful"]))
    bpd = likelihood.ode_bits_per_dim(stats, num_dims=num_dims, num_levels=num_levels)

    # The components sum to the total, which is `bits_per_dim` of the
    # log-likelihood, and equals the exact value point by point.
    bits_tolerance = IDENTITY_TOLERANCE / (num_dims * math.log(2))
    names = ("bpd_prior", "bpd_flow", "bpd_scaling", "bpd_dequantization")
    total = sum(bpd[name] for name in names)
    np.testing.assert_allclose(total, bpd["bpd"], rtol=ROUNDING)
    np.testing.assert_allclose(
        bpd["bpd_dequantization"], math.log2((num_levels - 1) / 2), rtol=ROUNDING
    )
    np.testing.assert_allclose(
        bpd["bpd_scaling"], -math.log2(process.alpha(LOGSNR_MAX)), rtol=ROUNDING
    )
    total_only = likelihood.bits_per_dim(
        log_likelihood, num_dims=num_dims, num_levels=num_levels
    )
    np.testing.assert_allclose(bpd["bpd"], total_only, atol=bits_tolerance)
    exact = likelihood.bits_per_dim(
        _exact_data_log_prob(model, x, LOGSNR_MAX),
        num_dims=num_dims,
        num_levels=num_levels,
    )
    np.testing.assert_allclose(bpd["bpd"], exact, atol=bits_tolerance)

    # The chain of bounds, in expectation over data and position in the bin.
    expected_bpd = float(node_prob @ bpd["bpd"][draws.shape[0] :])
    entropy = float(-probs @ np.log2(probs)) / num_dims
    # The ODE's density is the model's blurred by z_max / alpha_max's noise.
    std = math.sqrt((h / 4) ** 2 + math.exp(-LOGSNR_MAX))
    lower = (centres[:, None, :] - h / 2 - centres[None, :, :]) / std
    mass_1d = norm.cdf(lower + h / std) - norm.cdf(lower)  # (bin, component, dim)
    bin_mass = jnp.prod(mass_1d, axis=-1) @ probs
    cross_entropy = float(-probs @ jnp.log2(bin_mass)) / num_dims
    assert entropy <= cross_entropy <= expected_bpd + bits_tolerance, (
        entropy,
        cross_entropy,
        expected_bpd,
    )


def test_dequantize_stays_in_bins():
    num_levels = 5
    dequantize = jax.jit(lambda x: likelihood.dequantize(x, num_levels=5, key=KEY))
    x = jnp.array([-1.0, -0.5, 0.0, 0.5, 1.0] * 20)
    y = dequantize(x)
    assert bool(jnp.all(jnp.abs(y - x) <= 0.5 * 2 / (num_levels - 1)))
    assert not bool(jnp.allclose(y, x))
    with pytest.raises(Exception, match="levels"):
        dequantize(jnp.array([0.1] * 100))


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(divergence="trace"), "divergence='trace'"),
        (dict(divergence="hutchinson"), "needs a key"),
        (dict(num_probes=0), "num_probes=0"),
        (dict(probe_distribution="uniform"), "probe_distribution"),
        (dict(input_space="pixels"), "input_space"),
        (dict(rtol=-1.0), "rtol=-1.0"),
        (dict(solver=diffrax.Kvaerno5()), "explicit Runge-Kutta"),
        (
            dict(stepsize_controller=diffrax.ConstantStepSize(), rtol=1e-3),
            "not both",
        ),
        (dict(dtype=jnp.int32), "floating-point"),
    ],
)
def test_bad_input_raises_clear_error(options, message):
    with pytest.raises(ValueError, match=message):
        likelihood.ode_log_likelihood(
            _mixture(), jnp.zeros(2), schedule=SCHEDULE, **options
        )


def test_bad_batch_option_is_named():
    with pytest.raises(ValueError, match="tolerance"):
        likelihood.batch_ode_log_likelihood(
            _mixture(), jnp.zeros((2, 2)), schedule=SCHEDULE, tolerance=1e-3
        )
