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
import jaxtyping
import numpy as np
import pytest
from scipy.special import expit

from elbo_core import parameterization, schedules, weighting

# Definitions and conversions are a few float64 operations on O(1) numbers over
# logsnr in [-10, 10], where dividing by alpha or sigma amplifies rounding by at
# most e^5 ~ 150: 1e-16 * 150 * (a few operations) ~ 1e-13. Measured 9.2e-13.
DEFINITION_RTOL = 5e-12
# The same round trip on [-15, 15]: cancellation in `z - alpha x_hat` or
# `z - sigma eps` amplifies rounding by up to 1/sigma or 1/alpha ~ e^7.5 ~ 2e3.
# Measured 6.0e-13.
ROUNDTRIP_ATOL = 3e-12
# MSE factor from squared errors of random vectors: the ratio of two sums of
# squares of affine images, exact up to rounding amplified as above. Measured
# 7.3e-13.
MSE_FACTOR_RTOL = 4e-12
# `mse_factor` is `exp(log_mse_factor)`: one exp, an ulp or two.
EXP_LOG_RTOL = 1e-15
# EDM's c_skip, c_out, c_in from a logaddexp and an exp against numpy's direct
# formulas on [-15, 15]: a few ulps. Measured 1.1e-15.
EDM_COEFFICIENT_RTOL = 4e-15
# Table 1: max minus min over logsnr of (log implied w - log closed form). Both are
# sums of a few log-space terms of size <= ~40 (an ulp of 7.1e-15) on the widest
# range tested. Measured 1.4e-14.
TABLE_1_LOG_SPREAD = 1e-13
# The same log terms summed on both sides, of size <= ~30 (ulp 3.6e-15).
LOG_SUM_ATOL = 1e-14
# A non-increasing log-ratio whose differences of neighbours rise above zero only
# by the rounding of two log-weights of size <= ~40 (ulp 7.1e-15). Measured 3.6e-15.
NON_INCREASING_ATOL = 3e-14
# Velocity definitions differentiate the schedule at `t(logsnr)`, and `t` holds
# ~1e-16 absolute, which moves logsnr by ~1e-16 / p(logsnr): p >= this keeps the
# slope to ~1e-13.
VELOCITY_DENSITY_FLOOR = 1e-3
FLOAT32_EPS = float(np.finfo(np.float32).eps)  # 2^-23
# float32 against float64 on the same float32 inputs, in ulps (2^-23) of a
# condition factor. Every coefficient is exp(L) of a log-space L, which float32
# rounds to an ulp of `1 + |logsnr| + |log c|` (the size of the log terms: log
# alpha^2, log sigma^2, log p, log c); exp turns that into a relative error. An
# affine output `A z + B eps` then errs by that times `|A z| + |B eps|`, the
# magnitude of its terms, so cancellation between them costs nothing. Measured: at
# most 2.3 ulps (the velocity's MSE factor under the EDM schedule).
FLOAT32_ULPS = 8
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
def _evaluate(param, x, eps, eps_hat, z, logsnr):
    """Every output for a batch; `z` is given (see `_latent`), so that float32 and
    float64 runs share their inputs exactly."""
    output = jax.vmap(param.from_eps)(eps, z, logsnr)
    output_hat = jax.vmap(param.from_eps)(eps_hat, z, logsnr)
    ones, zeros = jnp.ones_like(z), jnp.zeros_like(z)
    return dict(
        output=output,
        output_hat=output_hat,
        roundtrip=jax.vmap(param.to_eps)(output, z, logsnr),
        target=jax.vmap(param.target)(x, eps, logsnr),
        mse_factor=jax.vmap(param.mse_factor)(logsnr),
        log_mse_factor=jax.vmap(param.log_mse_factor)(logsnr),
        # The affine coefficients, `from_eps = A z + B eps`, `to_eps = C out + E z`.
        from_eps_z=jax.vmap(param.from_eps)(zeros, ones, logsnr),
        from_eps_eps=jax.vmap(param.from_eps)(ones, zeros, logsnr),
        to_eps_output=jax.vmap(param.to_eps)(ones, zeros, logsnr),
        to_eps_z=jax.vmap(param.to_eps)(zeros, ones, logsnr),
    )


def _latent(x, eps, logsnr):
    """`z = alpha x + sigma eps` in numpy float64."""
    logsnr = np.asarray(logsnr)[:, None]
    alpha, sigma = _alpha_sigma(logsnr)
    return alpha * np.asarray(x) + sigma * np.asarray(eps)


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
    z = jnp.asarray(_latent(x, eps, logsnr))
    values = _evaluate(param, x, eps, eps_hat, z, logsnr)
    arrays = dict(x=x, eps=eps, eps_hat=eps_hat, z=z, logsnr=logsnr)
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
    p >= `VELOCITY_DENSITY_FLOOR` to keep the slope to ~1e-13.
    """
    mask = np.abs(logsnr) <= 10
    if name in VELOCITY_CASES:
        density = np.asarray(jax.vmap(param.schedule.density)(jnp.asarray(logsnr)))
        mask &= density > VELOCITY_DENSITY_FLOOR
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
        np.exp(values["log_mse_factor"]), values["mse_factor"], rtol=EXP_LOG_RTOL
    )


def test_flow_matching_velocity_is_eps_minus_x():
    # On the untruncated linear path z = (1 - t) x + t eps the velocity is eps - x;
    # truncated to [-40, 40] the path is rescaled by 1 - 2 sigmoid(-20) ~ 1 - 4e-9.
    schedule = schedules.FlowMatchingOT(logsnr_min=-40.0, logsnr_max=40.0)
    param = parameterization.Velocity(schedule, path="linear")
    # On |logsnr| <= 10, where recovering x from z costs at most e^5 of precision.
    logsnr = jnp.linspace(-10.0, 10.0, NUM_GRID)
    x, eps, _ = _draws(NUM_GRID, seed=1)
    values = _evaluate(param, x, eps, eps, jnp.asarray(_latent(x, eps, logsnr)), logsnr)
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
        np.testing.assert_allclose(value, reference, rtol=EDM_COEFFICIENT_RTOL)
    np.testing.assert_allclose(
        coefficients[3], np.log(sigma_ve) / 4, rtol=EDM_COEFFICIENT_RTOL
    )


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
        rtol=0,
        atol=LOG_SUM_ATOL,
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
    # The truncation to [-40, 40] keeps all but ~e^(-20 + |s|/2) of the mass at each
    # end, so the constant itself is zero to twice that.
    assert np.max(np.abs(difference)) < 2 * math.exp(-20 + abs(shift) / 2)

    # Its ratio to e^(-l/2) falls by (d/64)^2 from low to high logsnr.
    log_ratio = log_implied + logsnr / 2
    assert np.all(np.diff(log_ratio) <= NON_INCREASING_ATOL)
    span = math.exp(log_ratio[0] - log_ratio[-1])
    assert span == pytest.approx((resolution / 64) ** 2, rel=TABLE_1_LOG_SPREAD)
    # So e^(-l/2) is off by far more than the Table 1 tolerance.
    assert np.ptp(log_implied + logsnr / 2) > 1.0


# --- float32 --------------------------------------------------------------------------


def _float32_inputs(bound):
    """logsnr on [-bound, bound], x, eps, eps_hat and z, rounded to float32 once."""
    logsnr = np.linspace(-bound, bound, NUM_GRID)
    x, eps, eps_hat = (np.asarray(a) for a in _draws(NUM_GRID))
    z = _latent(x, eps, logsnr)
    return [
        np.asarray(a, np.float32).astype(np.float64)
        for a in (x, eps, eps_hat, z, logsnr)
    ]


@pytest.mark.parametrize("name", CASES)
def test_float32_agrees_with_float64_on_widest_range(name):
    # On [-40, 40], except the EDM schedule's velocity (see VELOCITY_CASES).
    param, bound = _build(name)
    x, eps, eps_hat, z, logsnr = _float32_inputs(bound)
    values = {}
    for dtype in (jnp.float64, jnp.float32):
        inputs = (jnp.asarray(a, dtype) for a in (x, eps, eps_hat, z, logsnr))
        values[dtype] = _evaluate(param, *inputs)
        for key, value in values[dtype].items():
            assert value.dtype == dtype, (key, value.dtype)
            assert bool(jnp.all(jnp.isfinite(value))), (key, dtype)
    reference = {k: np.asarray(v) for k, v in values[jnp.float64].items()}
    single = {k: np.asarray(v, np.float64) for k, v in values[jnp.float32].items()}

    # Condition factors (see FLOAT32_ULPS), from the float64 values.
    size = 1 + np.abs(logsnr) + np.abs(reference["log_mse_factor"])
    a_z, b_eps, c_out, e_z = (
        np.abs(reference[k])
        for k in ("from_eps_z", "from_eps_eps", "to_eps_output", "to_eps_z")
    )
    output_terms = a_z * np.abs(z) + b_eps * np.abs(eps)
    alpha, sigma = _alpha_sigma(logsnr[:, None])
    scales = dict(
        output=output_terms,
        output_hat=a_z * np.abs(z) + b_eps * np.abs(eps_hat),
        target=a_z * (np.abs(alpha * x) + np.abs(sigma * eps)) + b_eps * np.abs(eps),
        mse_factor=reference["mse_factor"],
        log_mse_factor=np.ones_like(size),
    )
    errors = {}
    for key, scale in scales.items():
        scale = scale * (size if scale.ndim == 1 else size[:, None])
        error = np.abs(single[key] - reference[key]) / scale
        errors[key] = float(np.max(error)) / FLOAT32_EPS
    # The round trip recovers eps to the conditioning of undoing the output.
    roundtrip_scale = (c_out * output_terms + e_z * np.abs(z)) * size[:, None]
    error = np.abs(single["roundtrip"] - eps) / roundtrip_scale
    errors["roundtrip"] = float(np.max(error)) / FLOAT32_EPS
    assert max(errors.values()) <= FLOAT32_ULPS, errors


def test_float32_implied_weightings_agree_with_float64():
    # Table 1 on [-40, 40], recipes and closed forms, and EDM's preconditioning.
    # Log-weights are sums of log-space terms of size <= 1 + |logsnr| + |log w|.
    logsnr = np.linspace(-40.0, 40.0, NUM_GRID)
    rows = parameterization.table_1(-40.0, 40.0)
    param = parameterization.EDMF()
    log_weights, coefficients = {}, {}
    for dtype in (jnp.float64, jnp.float32):
        grid = jnp.asarray(logsnr, dtype)
        log_weights[dtype] = _table_1_log_weights(rows, grid)
        coefficients[dtype] = [
            jax.vmap(c)(grid)
            for c in (param.c_skip, param.c_out, param.c_in, param.c_noise)
        ]
    errors = {}
    pairs = zip(log_weights[jnp.float32], log_weights[jnp.float64], strict=True)
    for row, (single, double) in zip(rows, pairs, strict=True):
        for label, value, reference in zip(
            ("implied", "closed form"), single, double, strict=True
        ):
            assert value.dtype == jnp.float32, row.objective
            assert bool(jnp.all(jnp.isfinite(value))), row.objective
            reference = np.asarray(reference)
            size = 1 + np.abs(logsnr) + np.abs(reference)
            error = np.abs(np.asarray(value, np.float64) - reference) / size
            errors[row.objective, label] = float(np.max(error)) / FLOAT32_EPS
    # c_skip, c_out, c_in are exps of log terms of size <= 1 + |logsnr|; c_noise is
    # -logsnr / 8, exact.
    names = ("c_skip", "c_out", "c_in", "c_noise")
    for name, value, reference in zip(
        names, coefficients[jnp.float32], coefficients[jnp.float64], strict=True
    ):
        assert value.dtype == jnp.float32, name
        reference = np.asarray(reference)
        scale = 1 + np.abs(logsnr)
        if name != "c_noise":
            scale = scale * np.abs(reference)
        error = np.abs(np.asarray(value, np.float64) - reference) / scale
        errors[name] = float(np.max(error)) / FLOAT32_EPS
    assert max(errors.values()) <= FLOAT32_ULPS, errors


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


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: parameterization.P2LossWeight(k=0.0), "k=0.0"),
        (lambda: parameterization.P2LossWeight(k=-1.0), "k=-1.0"),
        (lambda: parameterization.P2LossWeight(gamma=np.nan), "gamma=nan"),
        (lambda: parameterization.MinSNRLossWeight(gamma=0.0), "gamma=0.0"),
        (lambda: parameterization.MinSNRLossWeight(gamma=np.nan), "gamma=nan"),
        (lambda: parameterization.EDMF(sigma_data=np.inf), "sigma_data=inf"),
    ],
)
def test_bad_loss_weight_constants_are_named(build, message):
    # Not a "math domain error" from inside log_weight: the constructor names it.
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("name", CASES)
def test_overrides_are_type_checked(name):
    # Runtime type checking (pyproject's addopts) reaches every override: an output
    # whose shape differs from z's, or a logsnr that is not a scalar, raises
    # jaxtyping's TypeCheckError before any arithmetic.
    param, _ = _build(name)
    with pytest.raises(jaxtyping.TypeCheckError):
        param.to_eps(jnp.ones(3), jnp.ones(4), 0.0)
    with pytest.raises(jaxtyping.TypeCheckError):
        param.from_eps(jnp.ones(3), jnp.ones(4), 0.0)
    with pytest.raises(jaxtyping.TypeCheckError):
        param.log_mse_factor(jnp.zeros(2))


def test_loss_weights_are_type_checked():
    for explicit in (
        parameterization.P2LossWeight(),
        parameterization.MinSNRLossWeight(),
        parameterization.V().implied_weighting(schedules.Cosine()),
    ):
        with pytest.raises(jaxtyping.TypeCheckError):
            explicit.log_weight(jnp.zeros(2))
