"""Parameterisations against their definitions, their MSE factors and Table 1.

Every output is checked against its definition written out here independently
(the velocity by autodiff of the path through the schedule), every MSE factor
against the squared error it claims and against PAPER.md section 2, and every row
of Table 1 is recovered from its training recipe, including the shifted-cosine
discrepancy of section 3.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import expit

from elbo_core import parameterization, schedules, weighting

# Definitions and conversions are a few float64 operations on O(1) numbers over
# logsnr in [-10, 10], where dividing by alpha or sigma amplifies rounding by at
# most e^5 ~ 150: 1e-16 * 150 * (a few operations) is far below this.
DEFINITION_RTOL = 1e-11
# The same round trip on [-15, 15]: cancellation in `z - alpha x_hat` or
# `z - sigma eps` amplifies rounding by up to 1/sigma or 1/alpha ~ e^7.5 ~ 2e3.
ROUNDTRIP_ATOL = 1e-11
# MSE factor from squared errors of random vectors: the ratio of two sums of
# squares of affine images, exact up to rounding amplified as above.
MSE_FACTOR_RTOL = 1e-10
# Table 1: max minus min over logsnr of (log implied w - log closed form); the
# brief's bar, far above the ~1e-14 the log-space formulas reach.
TABLE_1_LOG_SPREAD = 1e-6
# float32 rounding: a few ulps (2^-23) of O(1) quantities.
FLOAT32_RTOL = 1e-5
DIM = 3
NUM_GRID = 201

# Velocity: path, schedule, and the schedule's range. NOTE: the EDM schedule's
# density at logsnr = -40 is ~1e-69, so its velocity (dlogsnr/dt ~ 1e69) and
# factor (~1e138) do not exist in float32; it is built on [-15, 15], where p >=
# 1e-13 and the factor stays below 1e26.
VELOCITY_CASES = {
    "velocity_linear_fm_ot": ("linear", schedules.FlowMatchingOT, 40.0),
    "velocity_linear_cosine": ("linear", schedules.Cosine, 40.0),
    "velocity_vp_cosine": ("vp", schedules.Cosine, 40.0),
    "velocity_vp_edm": ("vp", schedules.EDM, 15.0),
}


def _build(name):
    """The parameterisation and the logsnr range it is tested on in float32."""
    if name in VELOCITY_CASES:
        path, schedule, bound = VELOCITY_CASES[name]
        schedule = schedule(logsnr_min=-bound, logsnr_max=bound)
        return parameterization.Velocity(schedule, path=path), bound
    return parameterization.get_parameterization(name), 40.0


CASES = ["eps", "x", "v", "edm_f", "score", *VELOCITY_CASES]


# --- independent definitions ----------------------------------------------------------


def _alpha_sigma(logsnr):
    return np.sqrt(expit(logsnr)), np.sqrt(expit(-logsnr))


def _path_scales(path, logsnr):
    """`alpha_p, sigma_p` of a velocity path, with `alpha_p / sigma_p = e^(l/2)`."""
    if path == "linear":
        return jax.nn.sigmoid(logsnr / 2), jax.nn.sigmoid(-logsnr / 2)
    return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


@eqx.filter_jit
def _velocity_definition(schedule, path, x, eps, logsnr):
    """`u = d/dt (alpha_p x + sigma_p eps)` at `t(logsnr)`, by autodiff of the path,
    and PAPER.md's factor `(sigma_p^2 / 4) (dlogsnr/dt)^2`, for a batch."""

    def one(x, eps, logsnr):
        def z_path(t):
            alpha_p, sigma_p = _path_scales(path, schedule.logsnr(t))
            return alpha_p * x + sigma_p * eps

        t = schedule.t_of_logsnr(logsnr)
        velocity = jax.jvp(z_path, (t,), (jnp.ones_like(t),))[1]
        slope = jax.grad(schedule.logsnr)(t)
        _, sigma_p = _path_scales(path, logsnr)
        return velocity, sigma_p**2 / 4 * slope**2

    return jax.vmap(one)(x, eps, logsnr)


def _definition(name, param, x, eps, logsnr):
    """The output for data `x` and noise `eps`, from its definition."""
    if name in VELOCITY_CASES:
        path, *_ = VELOCITY_CASES[name]
        velocity, _ = _velocity_definition(
            param.schedule, path, jnp.asarray(x), jnp.asarray(eps), jnp.asarray(logsnr)
        )
        return np.asarray(velocity)
    alpha, sigma = _alpha_sigma(logsnr)
    z = alpha * x + sigma * eps
    if name == "eps":
        return eps
    if name == "x":
        return x
    if name == "v":
        return alpha * eps - sigma * x
    if name == "score":
        return -eps / sigma
    if name == "edm_f":
        # Karras et al. in VE coordinates: x_ve = z / alpha, sigma_ve = sigma / alpha.
        sigma_data = 0.5
        x_ve, sigma_ve = z / alpha, sigma / alpha
        c_skip = sigma_data**2 / (sigma_ve**2 + sigma_data**2)
        c_out = sigma_ve * sigma_data / np.sqrt(sigma_ve**2 + sigma_data**2)
        return (x - c_skip * x_ve) / c_out
    raise AssertionError(name)


def _mse_factor_definition(name, param, logsnr):
    """PAPER.md section 2's c(logsnr)."""
    _, sigma = _alpha_sigma(logsnr)
    if name == "eps":
        return np.ones_like(logsnr)
    if name == "x":
        return np.exp(-logsnr)
    if name == "v":
        return 1 + np.exp(-logsnr)
    if name == "score":
        return 1 / sigma**2
    if name == "edm_f":
        return (np.exp(-logsnr) + 0.25) / 0.25
    path, *_ = VELOCITY_CASES[name]
    # Same shapes as the definition test's call, so it is compiled once.
    x = jnp.zeros((len(logsnr), DIM))
    _, factor = _velocity_definition(param.schedule, path, x, x, jnp.asarray(logsnr))
    return np.asarray(factor)


# --- the library, on a grid, compiled once per parameterisation and dtype ---------


@eqx.filter_jit
def _evaluate(param, x, eps, eps_hat, logsnr):
    alpha = jnp.exp(0.5 * jax.nn.log_sigmoid(logsnr))[:, None]
    sigma = jnp.exp(0.5 * jax.nn.log_sigmoid(-logsnr))[:, None]
    z = alpha * x + sigma * eps
    output = jax.vmap(param.from_eps)(eps, z, logsnr)
    output_hat = jax.vmap(param.from_eps)(eps_hat, z, logsnr)
    return dict(
        z=z,
        output=output,
        output_hat=output_hat,
        roundtrip=jax.vmap(param.to_eps)(output, z, logsnr),
        target=jax.vmap(param.target)(x, eps, logsnr),
        mse_factor=jax.vmap(param.mse_factor)(logsnr),
        log_mse_factor=jax.vmap(param.log_mse_factor)(logsnr),
    )


def _draws(num, seed=0):
    """Data, noise and a noise prediction (numpy draws: nothing to compile)."""
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(2.0 * rng.standard_normal((num, DIM))),
        jnp.asarray(rng.standard_normal((num, DIM))),
        jnp.asarray(rng.standard_normal((num, DIM))),
    )


@pytest.fixture(params=CASES, scope="module")
def case(request):
    name = request.param
    param, _ = _build(name)
    logsnr = jnp.linspace(-15.0, 15.0, NUM_GRID)
    x, eps, eps_hat = _draws(NUM_GRID)
    values = _evaluate(param, x, eps, eps_hat, logsnr)
    arrays = dict(x=x, eps=eps, eps_hat=eps_hat, logsnr=logsnr)
    arrays = {k: np.asarray(v) for k, v in (arrays | values).items()}
    return name, param, arrays


def test_to_eps_inverts_from_eps(case):
    *_, values = case
    np.testing.assert_allclose(
        values["roundtrip"], values["eps"], rtol=0, atol=ROUNDTRIP_ATOL
    )


def _well_conditioned(name, param, logsnr):
    """Where the definitions can be evaluated to `DEFINITION_RTOL`.

    Dividing by alpha or sigma costs up to e^5 of precision on |logsnr| <= 10.
    The velocity's definition differentiates the schedule at `t(logsnr)`, and `t`
    holds ~1e-16 absolute, which moves logsnr by ~1e-16 / p(logsnr): that needs
    p >= 1e-3 to keep the slope to ~1e-13.
    """
    mask = np.abs(logsnr) <= 10
    if name in VELOCITY_CASES:
        mask &= np.asarray(jax.vmap(param.schedule.density)(jnp.asarray(logsnr))) > 1e-3
    return mask


def test_from_eps_matches_definition(case):
    name, param, values = case
    middle = _well_conditioned(name, param, values["logsnr"])
    logsnr = values["logsnr"][middle]
    x, eps = values["x"][middle], values["eps"][middle]
    if name in VELOCITY_CASES:
        expected = _definition(name, param, x, eps, logsnr)
    else:
        expected = _definition(name, param, x, eps, logsnr[:, None])
    scale = np.max(np.abs(expected), axis=-1, keepdims=True)
    np.testing.assert_allclose(
        values["output"][middle] / scale, expected / scale, rtol=0, atol=DEFINITION_RTOL
    )
    # The regression target is the same thing, formed from x and eps.
    np.testing.assert_allclose(
        values["target"][middle] / scale, expected / scale, rtol=0, atol=DEFINITION_RTOL
    )


def test_mse_factor_is_ratio_of_squared_errors(case):
    name, param, values = case
    output_error = np.sum((values["output_hat"] - values["output"]) ** 2, axis=-1)
    eps_error = np.sum((values["eps_hat"] - values["eps"]) ** 2, axis=-1)
    np.testing.assert_allclose(
        output_error / eps_error, values["mse_factor"], rtol=MSE_FACTOR_RTOL
    )
    middle = _well_conditioned(name, param, values["logsnr"])
    np.testing.assert_allclose(
        values["mse_factor"][middle],
        _mse_factor_definition(name, param, values["logsnr"][middle]),
        rtol=MSE_FACTOR_RTOL,
    )
    np.testing.assert_allclose(
        np.exp(values["log_mse_factor"]), values["mse_factor"], rtol=1e-14
    )


def test_flow_matching_velocity_is_eps_minus_x():
    # On the untruncated linear path z = (1 - t) x + t eps the velocity is eps - x;
    # truncated to [-40, 40] the path is rescaled by 1 - 2 sigmoid(-20) ~ 1 - 4e-9.
    schedule = schedules.FlowMatchingOT(logsnr_min=-40.0, logsnr_max=40.0)
    param = parameterization.Velocity(schedule, path="linear")
    # On |logsnr| <= 10, where recovering x from z costs at most e^5 of precision.
    logsnr = jnp.linspace(-10.0, 10.0, NUM_GRID)
    x, eps, _ = _draws(NUM_GRID, seed=1)
    values = _evaluate(param, x, eps, eps, logsnr)
    width = 1 - 2 * expit(-20.0)
    np.testing.assert_allclose(
        values["output"], width * (eps - x), rtol=0, atol=DEFINITION_RTOL
    )


def test_edm_f_preconditioning_coefficients():
    # c_skip, c_out, c_in, c_noise of Karras et al. Table 1, with sigma_ve^2 = e^-l.
    param = parameterization.EDMF(sigma_data=0.5)
    logsnr = np.linspace(-15.0, 15.0, 61)
    sigma_ve = np.exp(-logsnr / 2)
    total = sigma_ve**2 + 0.25
    coefficients = jax.vmap(
        lambda x: (param.c_skip(x), param.c_out(x), param.c_in(x), param.c_noise(x))
    )(jnp.asarray(logsnr))
    expected = (0.25 / total, sigma_ve * 0.5 / np.sqrt(total), 1 / np.sqrt(total))
    for value, reference in zip(coefficients[:3], expected, strict=True):
        np.testing.assert_allclose(value, reference, rtol=1e-13)
    np.testing.assert_allclose(coefficients[3], np.log(sigma_ve) / 4, rtol=1e-13)


# --- Table 1 --------------------------------------------------------------------------


@eqx.filter_jit
def _table_1_log_weights(rows, logsnr):
    """(implied, closed form) log-weights of every row, in one compiled call."""
    return [
        (
            jax.vmap(row.implied().log_weight)(logsnr),
            jax.vmap(row.weighting.log_weight)(logsnr),
        )
        for row in rows
    ]


def test_table_1_rows_recovered():
    logsnr_min, logsnr_max = -15.0, 15.0
    logsnr = jnp.linspace(logsnr_min, logsnr_max, 301)
    rows = parameterization.table_1(logsnr_min, logsnr_max)
    assert len(rows) == 8
    for row, (log_implied, log_closed) in zip(
        rows, _table_1_log_weights(rows, logsnr), strict=True
    ):
        difference = log_implied - log_closed
        spread = float(jnp.max(difference) - jnp.min(difference))
        assert spread < TABLE_1_LOG_SPREAD, (row.objective, spread)
        # Monotonicity computed from the recipe and from the closed form agrees
        # with the paper's column.
        implied = row.implied()
        assert implied.is_monotonic(logsnr_min, logsnr_max) == row.paper_monotonic
        assert row.weighting.is_monotonic() == row.paper_monotonic, row.objective


def test_implied_weighting_is_zero_outside_schedule():
    row = parameterization.table_1(-10.0, 12.0)[1]  # eps-MSE, cosine
    implied = row.implied()
    outside = jnp.array([-10.5, 12.5, -40.0, 40.0])
    assert bool(jnp.all(jax.vmap(implied)(outside) == 0))


def test_implied_weighting_with_explicit_weight():
    # w = p a c: the explicit weight multiplies in.
    cosine = schedules.Cosine()
    explicit = weighting.Sigmoid(bias=1.0)
    with_weight = parameterization.X().implied_weighting(cosine, explicit)
    without = parameterization.X().implied_weighting(cosine)
    logsnr = jnp.linspace(-14.0, 14.0, 57)
    np.testing.assert_allclose(
        jax.vmap(with_weight.log_weight)(logsnr),
        jax.vmap(without.log_weight)(logsnr) + jax.vmap(explicit.log_weight)(logsnr),
        rtol=1e-14,
    )


@pytest.mark.parametrize("resolution", [128, 256, 512])
def test_shifted_cosine_v_mse_is_not_exp_half(resolution):
    # PAPER.md section 3: v-MSE under the shifted cosine implies
    # w = (1/pi) e^(-l/2) cosh(l/2) / cosh((l - s)/2), not e^(-l/2).
    schedule = schedules.ShiftedCosine(
        resolution=resolution, logsnr_min=-40.0, logsnr_max=40.0
    )
    implied = parameterization.V().implied_weighting(schedule)
    shift = 2 * math.log(64 / resolution)
    logsnr = np.linspace(-40.0, 40.0, 321)
    log_implied = np.asarray(jax.vmap(implied.log_weight)(jnp.asarray(logsnr)))
    log_closed = (
        -np.log(np.pi)
        - logsnr / 2
        + np.logaddexp(logsnr / 2, -logsnr / 2)
        - np.logaddexp((logsnr - shift) / 2, -(logsnr - shift) / 2)
    )
    difference = log_implied - log_closed
    assert np.ptp(difference) < TABLE_1_LOG_SPREAD
    # The truncation to [-40, 40] keeps all but ~e^(-20 + |s|/2) of the mass, so the
    # constant itself is zero to that precision.
    assert np.max(np.abs(difference)) < TABLE_1_LOG_SPREAD

    # Its ratio to e^(-l/2) falls by (d/64)^2 from low to high logsnr.
    log_ratio = log_implied + logsnr / 2
    assert np.all(np.diff(log_ratio) <= 1e-12)
    span = math.exp(log_ratio[0] - log_ratio[-1])
    assert span == pytest.approx((resolution / 64) ** 2, rel=TABLE_1_LOG_SPREAD)
    # So e^(-l/2) is off by far more than the Table 1 tolerance.
    assert np.ptp(log_implied + logsnr / 2) > 1.0


# --- float32 --------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_float32_finite_on_widest_range(name):
    # On [-40, 40], except the EDM schedule's velocity (see VELOCITY_CASES).
    param, bound = _build(name)
    lo, hi = -bound, bound
    values = {}
    for dtype in (jnp.float64, jnp.float32):
        logsnr = jnp.linspace(lo, hi, NUM_GRID, dtype=dtype)
        x, eps, eps_hat = (a.astype(dtype) for a in _draws(NUM_GRID))
        values[dtype] = _evaluate(param, x, eps, eps_hat, logsnr)
        for key, value in values[dtype].items():
            assert value.dtype == dtype, (key, value.dtype)
            assert bool(jnp.all(jnp.isfinite(value))), (key, dtype)
    # The round trip keeps float32 precision where neither alpha nor sigma is tiny.
    middle = np.abs(np.linspace(lo, hi, NUM_GRID)) <= 5
    _, eps, _ = _draws(NUM_GRID)
    np.testing.assert_allclose(
        values[jnp.float32]["roundtrip"][middle],
        eps[middle],
        rtol=0,
        atol=100 * FLOAT32_RTOL,
    )


def test_float32_implied_weightings_finite():
    logsnr = jnp.linspace(-40.0, 40.0, NUM_GRID, dtype=jnp.float32)
    rows = parameterization.table_1(-40.0, 40.0)
    for row, log_weights in zip(rows, _table_1_log_weights(rows, logsnr), strict=True):
        for log_w in log_weights:
            assert log_w.dtype == jnp.float32, row.objective
            assert bool(jnp.all(jnp.isfinite(log_w))), row.objective
    param = parameterization.EDMF()
    for coefficient in (param.c_skip, param.c_out, param.c_in, param.c_noise):
        value = jax.vmap(coefficient)(logsnr)
        assert value.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(value)))


# --- errors ---------------------------------------------------------------------------


def test_registry():
    assert set(parameterization.PARAMETERIZATIONS) == {
        "eps",
        "x",
        "v",
        "edm_f",
        "score",
        "velocity",
    }
    for name, cls in parameterization.PARAMETERIZATIONS.items():
        kwargs = dict(schedule=schedules.Cosine()) if name == "velocity" else {}
        assert type(parameterization.get_parameterization(name, **kwargs)) is cls


def test_unknown_parameterization_lists_valid_names():
    with pytest.raises(ValueError, match="valid names") as info:
        parameterization.get_parameterization("epsilon")
    assert "'epsilon'" in str(info.value)
    for name in parameterization.PARAMETERIZATIONS:
        assert name in str(info.value)


def test_velocity_rejects_unknown_path():
    # Under runtime type checking the Literal annotation rejects it first (a
    # TypeError naming the argument and value); without it, the module's own check
    # raises ValueError naming the valid paths.
    with pytest.raises((ValueError, TypeError), match="path") as info:
        parameterization.Velocity(schedules.Cosine(), path="ve")
    assert "'ve'" in str(info.value)


@pytest.mark.parametrize("sigma_data", [0.0, -0.5])
def test_edm_f_rejects_non_positive_sigma_data(sigma_data):
    with pytest.raises(ValueError, match=f"sigma_data={sigma_data}"):
        parameterization.EDMF(sigma_data=sigma_data)
