"""The variance-preserving process: scales, sampling, SDE and probability flow.

The SDE coefficients are checked through the marginal variance they must produce,
the probability-flow drift (with the exact optimal denoiser of Gaussian and
Gaussian-mixture data) through the flow map of Gaussian data and the continuity
equation of the mixture's exact marginal, and the log-SNR-time drift through its
definition as the time-`t` drift over `dlogsnr/dt`.
"""

import inspect

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

from elbo_core import (
    analytic,
    parameterization,
    process,
    schedules,
    weighting,
)

# Scales: log_sigmoid and exp in float64 are accurate to a few ulps.
SCALE_RTOL = 1e-14
# `log alpha^2 - log sigma^2` near logsnr = 0 is a difference of two values of size
# log 2, each to half an ulp (1.1e-16): a few 1e-16 absolute where rtol means nothing.
LOG_RATIO_ATOL = 1e-15
# `sigma(40) = exp(1/2 log_sigmoid(-40))`: one log_sigmoid and one exp in float64,
# each to an ulp, so the tiny scale keeps full relative precision (not flushed).
TAIL_SCALE_RTOL = 1e-15
# SDE identities compare sums of a few float64 products of autodiff derivatives;
# relative to the size of their terms they hold to rounding.
SDE_RTOL = 1e-11
# The continuity equation sums terms of size up to ~1e3 (the score of narrow
# components times the drift); it cancels to rounding relative to that size.
CONTINUITY_RTOL = 1e-9
# Monte Carlo checks pass within this many standard errors (two-sided false-alarm
# probability 6e-7 per check).
NUM_STANDARD_ERRORS = 5.0

SCHEDULE_CASES = {
    "cosine": schedules.Cosine(),
    "edm": schedules.EDM(),
    "fm_ot": schedules.FlowMatchingOT(),
    "piecewise_constant": schedules.PiecewiseConstant(
        jnp.array([1.0, 3.0, 2.0, 0.5]), logsnr_min=-12.0, logsnr_max=10.0
    ),
}
NUM_T = 101


def test_scales():
    logsnr = jnp.linspace(-40.0, 40.0, 801)
    alpha = jax.vmap(process.alpha)(logsnr)
    sigma = jax.vmap(process.sigma)(logsnr)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=SCALE_RTOL)
    # alpha^2 / sigma^2 = exp(logsnr), compared in log space where both are exact.
    log_ratio = jax.vmap(process.log_alpha2)(logsnr) - jax.vmap(process.log_sigma2)(
        logsnr
    )
    np.testing.assert_allclose(log_ratio, logsnr, rtol=SCALE_RTOL, atol=LOG_RATIO_ATOL)
    np.testing.assert_allclose(
        jnp.exp(jax.vmap(process.log_alpha2)(logsnr)), alpha**2, rtol=SCALE_RTOL
    )
    # The tiny scale at each end is accurate, not flushed: sigma(40) = e^-20 ...
    tail = np.exp(-20.0)
    assert float(process.sigma(40.0)) == pytest.approx(tail, rel=TAIL_SCALE_RTOL)
    assert float(process.alpha(-40.0)) == pytest.approx(tail, rel=TAIL_SCALE_RTOL)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_sample_q_moments(dtype):
    # z = alpha x + sigma eps ~ N(alpha x, sigma^2 I): the sample mean has standard
    # error sigma / sqrt(N), the sample variance sigma^2 sqrt(2 / N).
    num = 20_000
    x = jnp.array([1.5, -0.5, 0.0, 3.0], dtype)
    logsnr = jnp.array([-40.0, -6.0, 0.0, 4.0, 40.0], dtype)

    @jax.jit
    def draw(logsnr, keys):
        return jax.vmap(lambda key: process.sample_q(x, logsnr, key=key))(keys)

    keys = jax.random.split(jax.random.key(31), (len(logsnr), num))
    z, eps = jax.vmap(draw)(logsnr, keys)
    assert z.dtype == eps.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(z)))
    alpha = jax.vmap(process.alpha)(logsnr)[:, None]
    sigma = jax.vmap(process.sigma)(logsnr)[:, None]
    resolution = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(
        z, alpha[:, None] * x + sigma[:, None] * eps, rtol=0, atol=10 * resolution
    )
    # Moments at the middle levels; at +-40 one scale is below the resolution of z.
    z, alpha, sigma = (np.asarray(a[1:-1], np.float64) for a in (z, alpha, sigma))
    mean_error = np.abs(np.mean(z, axis=1) - alpha * np.asarray(x))
    assert np.all(mean_error < NUM_STANDARD_ERRORS * sigma / np.sqrt(num))
    var_error = np.abs(np.var(z, axis=1) - sigma**2)
    assert np.all(var_error < NUM_STANDARD_ERRORS * sigma**2 * np.sqrt(2 / num))


# --- SDE coefficients and drifts, per schedule -------------------------------------


def _gaussian_variance(logsnr, std):
    """Marginal variance alpha^2 s^2 + sigma^2 of N(0, s^2) data."""
    # NOTE: through log_sigmoid, whose derivative sigmoid(-logsnr) is accurate;
    # the derivative of sigmoid itself, s (1 - s), loses 1 - s near logsnr = 15.
    alpha2 = jnp.exp(jax.nn.log_sigmoid(logsnr))
    return alpha2 * std**2 + jnp.exp(jax.nn.log_sigmoid(-logsnr))


@eqx.filter_jit
def _sde_values(schedule, oracle, t):
    """SDE quantities on a t grid for the 1-D Gaussian `oracle`, N(0, s^2) data."""
    std = oracle.stds[0]

    def one(t):
        logsnr = schedule.logsnr(t)
        variance, dvariance_dt = jax.jvp(
            lambda t: _gaussian_variance(schedule.logsnr(t), std), (t,), (1.0,)
        )
        z = jnp.array([0.7])
        eps_hat = oracle.eps_optimal(z, logsnr)
        return dict(
            logsnr=logsnr,
            density=schedule.density(logsnr),
            slope=process.dlogsnr_dt(schedule, t),
            f=process.forward_drift(jnp.ones(()), t, schedule),
            g=process.forward_diffusion(t, schedule),
            variance=variance,
            dvariance_dt=dvariance_dt,
            z=z,
            score=oracle.score(z, logsnr),
            pf_drift=process.probability_flow_drift(eps_hat, z, t, schedule),
            reverse_drift=process.reverse_sde_drift(eps_hat, z, t, schedule),
            forward_drift=process.forward_drift(z, t, schedule),
            pf_drift_logsnr=process.probability_flow_drift_logsnr(eps_hat, z, logsnr),
        )

    return jax.vmap(one)(t)


@pytest.fixture(params=sorted(SCHEDULE_CASES), scope="module")
def sde(request):
    schedule = SCHEDULE_CASES[request.param]
    t = jnp.linspace(0.0, 1.0, NUM_T)
    values = {}
    for std in (0.5, 2.0):
        oracle = analytic.GaussianMixture.gaussian(1, std)
        values[std] = _sde_values(schedule, oracle, t)
        values[std] = {k: np.asarray(v) for k, v in values[std].items()}
    return request.param, schedule, values


def test_dlogsnr_dt_is_inverse_density(sde):
    *_, values = sde
    v = values[0.5]
    np.testing.assert_allclose(-v["slope"] * v["density"], 1.0, rtol=SDE_RTOL)


def test_marginal_variance_ode(sde):
    # d(var)/dt = 2 f var + g^2 for var = alpha^2 s^2 + sigma^2.
    *_, values = sde
    for std, v in values.items():
        rhs = 2 * v["f"] * v["variance"] + v["g"] ** 2
        scale = np.abs(2 * v["f"] * v["variance"]) + v["g"] ** 2
        np.testing.assert_allclose(
            (v["dvariance_dt"] - rhs) / scale, 0, atol=SDE_RTOL, err_msg=str(std)
        )
        # And sigma^2 itself (s = 0): the noise scale of the SDE.
        assert np.all(v["g"] >= 0)


def test_probability_flow_is_gaussian_flow_map(sde):
    # For N(0, s^2) data the marginal flow map is z_t = z_0 sqrt(var_t / var_0), so
    # the probability-flow drift at z is z (1/2) d log(var_t) / dt.
    *_, values = sde
    for v in values.values():
        expected = v["z"] * (0.5 * v["dvariance_dt"] / v["variance"])[:, None]
        scale = np.abs(v["forward_drift"]) + np.abs(expected) + 1e-300
        np.testing.assert_allclose((v["pf_drift"] - expected) / scale, 0, atol=SDE_RTOL)


def test_reverse_sde_drift_definition(sde):
    # f z - g^2 score, and the probability-flow drift is f z - g^2 score / 2.
    *_, values = sde
    for v in values.values():
        g2 = (v["g"] ** 2)[:, None]
        scale = np.abs(v["forward_drift"]) + np.abs(g2 * v["score"])
        np.testing.assert_allclose(
            (v["reverse_drift"] - (v["forward_drift"] - g2 * v["score"])) / scale,
            0,
            atol=SDE_RTOL,
        )
        np.testing.assert_allclose(
            (v["pf_drift"] - (v["forward_drift"] - 0.5 * g2 * v["score"])) / scale,
            0,
            atol=SDE_RTOL,
        )


def test_logsnr_time_drift_is_time_drift_over_slope(sde):
    *_, values = sde
    for v in values.values():
        expected = v["pf_drift"] / v["slope"][:, None]
        # The two terms, 1/2 sigma^2 z and 1/2 sigma eps_hat, are of size |z| and
        # cancel to alpha^2 |z| at low logsnr.
        scale = np.abs(v["z"])
        np.testing.assert_allclose(
            v["pf_drift_logsnr"] / scale, expected / scale, rtol=0, atol=SDE_RTOL
        )


# --- the continuity equation for a Gaussian mixture --------------------------------


MIXTURE = analytic.GaussianMixture(
    np.array([[-1.0, 1.5], [2.0, 0.0], [0.0, -2.0]]),
    np.array([0.3, 0.8, 0.5]),
    np.array([0.5, 0.3, 0.2]),
)


@eqx.filter_jit
def _continuity_terms(schedule, mixture, z, t):
    """The three terms of d log q/dt + div u + u . grad log q = 0 for the
    probability-flow velocity u of the exact marginal q(z, t)."""

    def velocity(z, t):
        eps_hat = mixture.eps_optimal(z, schedule.logsnr(t))
        return process.probability_flow_drift(eps_hat, z, t, schedule)

    def one(z, t):
        dlogq_dt = jax.jvp(
            lambda t: mixture.marginal_log_prob(z, schedule.logsnr(t)), (t,), (1.0,)
        )[1]
        divergence = jnp.trace(jax.jacfwd(velocity)(z, t))
        transport = velocity(z, t) @ mixture.score(z, schedule.logsnr(t))
        return jnp.stack([dlogq_dt, divergence, transport])

    return jax.vmap(one)(z, t)


@pytest.mark.parametrize("name", ["cosine", "fm_ot"])
def test_probability_flow_continuity_equation(name):
    # The probability-flow ODE transports the exact marginal of the mixture.
    schedule = SCHEDULE_CASES[name]
    rng = np.random.default_rng(37)
    num = 64
    t = rng.uniform(0.05, 0.95, num)
    z = rng.normal(size=(num, 2)) * 2.0
    terms = np.asarray(_continuity_terms(schedule, MIXTURE, jnp.asarray(z), t))
    residual = terms.sum(axis=1)
    scale = np.abs(terms).sum(axis=1)
    assert np.all(np.abs(residual) <= CONTINUITY_RTOL * scale)
    # The check is not vacuous: the terms are far from zero.
    assert np.median(scale) > 0.1


# --- float32 on the widest range ---------------------------------------------------


# NOTE: not the EDM schedule: its density at the ends of [-40, 40] is ~1e-55 and
# ~1e-69, so dlogsnr/dt and every drift there (~1e55, 1e69) exist in float64 only
# (tests/test_schedules.py checks that float32 is finite wherever representable).
FLOAT32_SCHEDULES = {
    "cosine": schedules.Cosine,
    "shifted_cosine_512": lambda **k: schedules.ShiftedCosine(resolution=512, **k),
    "fm_ot": schedules.FlowMatchingOT,
}
FLOAT32_EPS = float(np.finfo(np.float32).eps)  # 2^-23
# float32 against float64 on the same (float32-representable) inputs. Every output
# is a sum of at most two products of a few factors (alpha, sigma from log_sigmoid
# and exp, dlogsnr/dt, the inputs), each factor correct to a few float32 ulps: the
# error is a few ulps of the magnitude of the terms (the condition factor), which
# is what the error is divided by, so that cancellation between the terms costs
# nothing. Measured: at most 5.1 ulps (forward drift, fm_ot).
FLOAT32_ULPS = 16


@eqx.filter_jit
def _all_outputs(schedule, t, x, eps, eps_hat):
    logsnr = jax.vmap(schedule.logsnr)(t)
    z = jax.vmap(
        lambda x, eps, logsnr: process.alpha(logsnr) * x + process.sigma(logsnr) * eps
    )(x, eps, logsnr)
    drifts = jax.vmap(
        lambda eps_hat, z, t: (
            process.probability_flow_drift(eps_hat, z, t, schedule),
            process.reverse_sde_drift(eps_hat, z, t, schedule),
            process.forward_drift(z, t, schedule),
        )
    )(eps_hat, z, t)
    return dict(
        logsnr=logsnr,
        log_alpha2=jax.vmap(process.log_alpha2)(logsnr),
        log_sigma2=jax.vmap(process.log_sigma2)(logsnr),
        alpha=jax.vmap(process.alpha)(logsnr),
        sigma=jax.vmap(process.sigma)(logsnr),
        z=z,
        dlogsnr_dt=jax.vmap(lambda t: process.dlogsnr_dt(schedule, t))(t),
        forward_diffusion=jax.vmap(lambda t: process.forward_diffusion(t, schedule))(t),
        probability_flow_drift=drifts[0],
        reverse_sde_drift=drifts[1],
        forward_drift=drifts[2],
        probability_flow_drift_logsnr=jax.vmap(process.probability_flow_drift_logsnr)(
            eps_hat, z, logsnr
        ),
    )


def _float32_inputs(num, seed):
    """A t grid and draws of x, eps, eps_hat, rounded to float32 once: the same
    inputs for both precisions, so only the arithmetic differs."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, num)
    x, eps, eps_hat = rng.normal(size=(3, num, 3))
    return [np.asarray(a, np.float32).astype(np.float64) for a in (t, x, eps, eps_hat)]


def _term_scales(values, x, eps, eps_hat):
    """Magnitude of the terms of each output, from the float64 values."""
    alpha, sigma = values["alpha"][:, None], values["sigma"][:, None]
    slope = values["dlogsnr_dt"][:, None]
    f = 0.5 * sigma**2 * slope  # forward drift coefficient
    z_terms = np.abs(alpha * x) + np.abs(sigma * eps)
    eps_term = np.abs(sigma * slope * eps_hat)
    log_terms = np.maximum(1, np.abs(values["logsnr"]))
    return dict(
        logsnr=log_terms,
        log_alpha2=log_terms,
        log_sigma2=log_terms,
        alpha=values["alpha"],
        sigma=values["sigma"],
        z=z_terms,
        dlogsnr_dt=np.abs(values["dlogsnr_dt"]),
        forward_diffusion=values["forward_diffusion"],
        forward_drift=np.abs(f) * z_terms,
        probability_flow_drift=np.abs(f) * z_terms + 0.5 * eps_term,
        reverse_sde_drift=np.abs(f) * z_terms + eps_term,
        probability_flow_drift_logsnr=0.5
        * (sigma**2 * z_terms + sigma * np.abs(eps_hat)),
    )


@pytest.mark.parametrize("name", sorted(FLOAT32_SCHEDULES))
def test_float32_agrees_with_float64_on_widest_range(name):
    schedule = FLOAT32_SCHEDULES[name](logsnr_min=-40.0, logsnr_max=40.0)
    t, x, eps, eps_hat = _float32_inputs(101, seed=41)
    values = {}
    for dtype in (jnp.float64, jnp.float32):
        inputs = (jnp.asarray(a, dtype) for a in (t, x, eps, eps_hat))
        values[dtype] = _all_outputs(schedule, *inputs)
        for key, value in values[dtype].items():
            assert value.dtype == dtype, (key, value.dtype)
            assert bool(jnp.all(jnp.isfinite(value))), (key, dtype)
    reference = {k: np.asarray(v) for k, v in values[jnp.float64].items()}
    # The grid reaches both ends of the range, where the scales are e^-20.
    assert reference["logsnr"].min() == -40.0 and reference["logsnr"].max() == 40.0
    scales = _term_scales(reference, x, eps, eps_hat)
    assert set(scales) == set(reference)
    for key, scale in scales.items():
        error = np.abs(
            np.asarray(values[jnp.float32][key], np.float64) - reference[key]
        )
        ulps = float(np.max(error / np.abs(scale))) / FLOAT32_EPS
        assert ulps <= FLOAT32_ULPS, (key, ulps)


# --- the guards of the whole layer ------------------------------------------------


def test_runtime_type_checking_is_on():
    # pyproject's addopts switch jaxtyping's checks on for elbo_core: a shape that
    # contradicts an annotation raises jaxtyping's TypeCheckError, not a ValueError
    # from inside the function (or nothing at all).
    with pytest.raises(jaxtyping.TypeCheckError):
        process.alpha(jnp.ones(3))
    with pytest.raises(jaxtyping.TypeCheckError):
        process.probability_flow_drift_logsnr(jnp.ones(3), jnp.ones(4), 0.0)


LAYER_1_MODULES = [analytic, parameterization, process, schedules, weighting]


def _public_callables(module):
    """Public functions and classes defined in `module`, and their public methods
    and properties (dunder methods other than `__call__` excluded)."""
    for name, value in vars(module).items():
        if (
            name.startswith("_")
            or getattr(value, "__module__", None) != module.__name__
        ):
            continue
        if inspect.isfunction(value):
            yield name, value
        elif inspect.isclass(value):
            yield name, value
            for attribute, member in vars(value).items():
                public = not attribute.startswith("_") or attribute == "__call__"
                if public and (
                    inspect.isfunction(member) or isinstance(member, property)
                ):
                    yield f"{name}.{attribute}", getattr(value, attribute)


@pytest.mark.parametrize("module", LAYER_1_MODULES, ids=lambda m: m.__name__)
def test_public_api_is_documented(module):
    # Every public function, class, method and property of layer 1 has a docstring
    # (its own or, for an override, the one of the method it implements).
    undocumented = [
        name for name, value in _public_callables(module) if not inspect.getdoc(value)
    ]
    assert not undocumented, undocumented
