"""Samplers for any denoiser: probability-flow ODE, DDPM ancestral, EDM stochastic.

A denoiser is `model(z, logsnr) -> eps_hat` on one example, with variance-preserving
latents `z = alpha x + sigma eps`. Every sampler draws one example from `N(0, I)` at
`logsnr_min` (or EDM's `N(0, sigma_max^2 I)` in its own coordinates) and returns
`(x, stats)`, where `stats["num_function_evaluations"]` counts denoiser calls. A batch
is a `jax.vmap` over keys, or `batch_sample`, which compiles once per shape.

- `ode_sample`: the probability-flow ODE `dz/dlogsnr = 1/2 sigma^2 z - 1/2 sigma
  eps_hat` from `logsnr_min` up to `logsnr_max` with an adaptive diffrax solver;
  returns `x = z_max / alpha_max`, exactly the distribution whose density
  `likelihood.ode_log_likelihood` computes.
- `ddpm_sample`: ancestral sampling on a logsnr grid (Ho et al. 2020 in the
  continuous-time form of Kingma et al. 2021), each step a draw from the Gaussian
  posterior `q(z_s | z_t, x = x_hat)`; returns `z_max / alpha_max`.
- `edm_sample`: Karras et al. (2022), Algorithm 2: Heun steps on `rho`-spaced noise
  levels between EDM's `sigma_max = 80` and `sigma_min = 0.002` (within the
  schedule's range) with stochastic churn; returns its last, noiseless iterate.

The last two are the samplers of the paper's Table 2.
"""

import math
from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .likelihood import (
    DEFAULT_MAX_STEPS,
    _check_choice,
    _check_positive_int,
    _resolve_controller,
    _resolve_solver,
    _rms_norm,
    solve_statistics,
)
from .losses import Denoiser
from .process import log_alpha2, log_sigma2, probability_flow_drift_logsnr
from .schedules import Schedule

__all__ = [
    "DDPM_VARIANCES",
    "batch_sample",
    "ddpm_sample",
    "edm_sample",
    "ode_sample",
    "probability_flow",
]

DDPM_VARIANCES = ("posterior", "forward")

# EDM's noise range (Karras et al. 2022, section 5 and Table 1): in its
# variance-exploding coordinates, the levels of its sampler run from
# sigma_max = 80 down to sigma_min = 0.002 (logsnr from -8.76 up to 12.43).
EDM_SIGMA_MIN = 0.002
EDM_SIGMA_MAX = 80.0


def _dtype(dtype) -> Any:
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype={dtype} must be a floating-point dtype.")
    return dtype


def _normal(key, shape, dtype) -> Array:
    """`N(0, I)` of `shape`, drawn flat."""
    # NOTE: XLA:CPU compiles a multi-dimensional threefry draw up to ten times more
    # slowly than the same draw flat.
    return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


def _check_shape(owner: str, shape) -> tuple[int, ...]:
    if not isinstance(shape, tuple | list) or not all(
        isinstance(n, int) and n >= 1 for n in shape
    ):
        raise ValueError(
            f"{owner}: shape={shape!r} must be a tuple of positive integers, the shape "
            "of one example."
        )
    return tuple(shape)


def _check_schedule(owner: str, schedule) -> None:
    if not isinstance(schedule, Schedule):
        raise ValueError(
            f"{owner}: schedule must be an elbo_core.schedules.Schedule; got "
            f"{type(schedule).__name__}."
        )


# --- probability-flow ODE -------------------------------------------------------------


class _Drift(eqx.Module):
    """`dz/dlogsnr` of the probability-flow ODE; the model is passed as `args`."""

    def __call__(self, logsnr, z, model):
        eps_hat = jnp.asarray(model(z, logsnr)).astype(z.dtype)
        return probability_flow_drift_logsnr(eps_hat, z, logsnr).astype(z.dtype)


def probability_flow(
    model: Denoiser,
    z: Float[Array, "*shape"],
    *,
    logsnr_start: float,
    logsnr_end: float,
    solver: diffrax.AbstractSolver | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    dt0: float | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
) -> tuple[Float[Array, "*shape"], dict[str, Array]]:
    """Carry a latent along the probability-flow ODE from one log-SNR to another.

    Integrates `dz/dlogsnr = 1/2 sigma^2 z - 1/2 sigma eps_hat(z; logsnr)` from
    `logsnr_start` to `logsnr_end` in either direction: down (towards noise) encodes,
    up (towards data) decodes. Adaptive steps with `solver` (Tsit5 by default) and a
    PID controller at `rtol`, `atol` (default `1e-5`) unless a `stepsize_controller`
    is given.

    **Returns:** `(z_end, stats)`, with the statistics of
    `likelihood.solve_statistics`; `z_end` is NaN when the solve failed.
    """
    owner = "probability_flow"
    for name, value in (("logsnr_start", logsnr_start), ("logsnr_end", logsnr_end)):
        if not (isinstance(value, int | float) and math.isfinite(value)):
            raise ValueError(f"{owner}: {name}={value!r} must be a finite number.")
    if logsnr_start == logsnr_end:
        raise ValueError(
            f"{owner}: logsnr_start and logsnr_end are both {logsnr_start}; the flow "
            "needs two different levels."
        )
    _check_positive_int(owner, "max_steps", max_steps)
    z = jnp.asarray(z)
    dtype = z.dtype if jnp.issubdtype(z.dtype, jnp.floating) else _dtype(None)
    z = z.astype(dtype)
    solver = _resolve_solver(solver)
    controller = _resolve_controller(
        owner, stepsize_controller, rtol, atol, dtype, _rms_norm
    )
    direction = 1.0 if logsnr_end > logsnr_start else -1.0
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(_Drift()),
        solver,
        t0=jnp.asarray(logsnr_start, dtype),
        t1=jnp.asarray(logsnr_end, dtype),
        dt0=None if dt0 is None else direction * abs(dt0),
        y0=z,
        args=model,
        stepsize_controller=controller,
        max_steps=max_steps,
        throw=False,
    )
    stats = solve_statistics(solution, solver)
    z_end = jnp.where(stats["successful"], solution.ys[-1], jnp.nan)
    return z_end, stats


def ode_sample(
    model: Denoiser,
    *,
    shape: tuple[int, ...],
    schedule: Schedule,
    solver: diffrax.AbstractSolver | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    dt0: float | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    dtype: Any = None,
    key: PRNGKeyArray,
) -> tuple[Float[Array, "*shape"], dict[str, Array]]:
    """One sample by the probability-flow ODE, adaptive, from noise to data.

    `z_min ~ N(0, I)` at `schedule.logsnr_min`, carried up to `logsnr_max` by
    `probability_flow`, and returned as data `x = z_max / alpha_max`: the inverse of
    the map whose Jacobian `likelihood.ode_log_likelihood` accounts for.

    **Returns:** `(x, stats)`, `stats` as in `probability_flow` (NaN samples and
    `successful` false when a solve fails).
    """
    _check_schedule("ode_sample", schedule)
    shape = _check_shape("ode_sample", shape)
    dtype = _dtype(dtype)
    z_min = _normal(key, shape, dtype)
    z_max, stats = probability_flow(
        model,
        z_min,
        logsnr_start=float(schedule.logsnr_min),
        logsnr_end=float(schedule.logsnr_max),
        solver=solver,
        rtol=rtol,
        atol=atol,
        stepsize_controller=stepsize_controller,
        dt0=dt0,
        max_steps=max_steps,
    )
    log_alpha_max = 0.5 * log_alpha2(jnp.asarray(schedule.logsnr_max, dtype))
    return z_max * jnp.exp(-log_alpha_max), stats


# --- DDPM ancestral sampler -----------------------------------------------------------


def ddpm_sample(
    model: Denoiser,
    *,
    shape: tuple[int, ...],
    schedule: Schedule,
    num_steps: int,
    variance: str = "posterior",
    dtype: Any = None,
    key: PRNGKeyArray,
) -> tuple[Float[Array, "*shape"], dict[str, Array]]:
    """One sample by ancestral sampling on the grid `logsnr_i = schedule.logsnr(t_i)`.

    `t_i = 1 - i / num_steps`, so the grid runs from `logsnr_min` up to `logsnr_max`.
    From `z_t` at `logsnr_t` to `logsnr_s > logsnr_t`, with `x_hat = (z_t - sigma_t
    eps_hat) / alpha_t`, draw from `q(z_s | z_t, x = x_hat)`, whose mean is

        mu = (alpha_s / alpha_t) (z_t + expm1(logsnr_t - logsnr_s) sigma_t eps_hat)

    and whose variance is, by `variance`:

    - `"posterior"`: `sigma_s^2 (1 - exp(logsnr_t - logsnr_s))`, the true posterior
      variance (DDPM's `beta tilde`; Kingma et al. 2021);
    - `"forward"`: `sigma_t^2 (1 - exp(logsnr_t - logsnr_s))`, the variance of
      `q(z_t | z_s)` (DDPM's `beta`), larger.

    One denoiser call per step; the sample is `z_max / alpha_max` (as `ode_sample`).

    **Returns:** `(x, {"num_function_evaluations": num_steps})`.
    """
    owner = "ddpm_sample"
    _check_schedule(owner, schedule)
    shape = _check_shape(owner, shape)
    _check_positive_int(owner, "num_steps", num_steps)
    _check_choice(owner, "variance", variance, DDPM_VARIANCES)
    dtype = _dtype(dtype)
    init_key, step_key = jax.random.split(key)
    t = jnp.linspace(1.0, 0.0, num_steps + 1, dtype=dtype)
    logsnr = jnp.vectorize(schedule.logsnr)(t).astype(dtype)

    def step(z, inputs):
        logsnr_t, logsnr_s, noise_key = inputs
        eps_hat = jnp.asarray(model(z, logsnr_t)).astype(dtype)
        alpha_ratio = jnp.exp(0.5 * (log_alpha2(logsnr_s) - log_alpha2(logsnr_t)))
        sigma_t = jnp.exp(0.5 * log_sigma2(logsnr_t))

        # Posterior mean of q(z_s | z_t, x = x_hat), in terms of eps_hat.
        ratio = jnp.expm1(logsnr_t - logsnr_s)  # in (-1, 0)
        mean = alpha_ratio * (z + ratio * sigma_t * eps_hat)

        # Add Gaussian noise of the chosen variance.
        level = logsnr_s if variance == "posterior" else logsnr_t
        std = jnp.exp(0.5 * log_sigma2(level)) * jnp.sqrt(-ratio)
        noise = _normal(noise_key, shape, dtype)
        return mean + std * noise, None

    z = _normal(init_key, shape, dtype)
    keys = jax.random.split(step_key, num_steps)
    z, _ = jax.lax.scan(step, z, (logsnr[:-1], logsnr[1:], keys))
    x = z * jnp.exp(-0.5 * log_alpha2(logsnr[-1]))
    return x, {"num_function_evaluations": jnp.asarray(num_steps)}


# --- EDM stochastic sampler -----------------------------------------------------------


def _edm_sigma_range(owner, schedule, sigma_min, sigma_max) -> tuple[float, float]:
    """`(sigma_min, sigma_max)` clipped to the schedule's noise levels."""
    # sigma = exp(-logsnr / 2), formed in logs so that logsnr = +-40 stays finite.
    log_sigma_lo = -float(schedule.logsnr_max) / 2
    log_sigma_hi = -float(schedule.logsnr_min) / 2
    log_lo = max(math.log(sigma_min), log_sigma_lo)
    log_hi = min(math.log(sigma_max), log_sigma_hi)
    if not log_lo < log_hi:
        raise ValueError(
            f"{owner}: sigma_min={sigma_min} and sigma_max={sigma_max}, clipped to the "
            f"schedule's [{math.exp(log_sigma_lo):.4g}, {math.exp(log_sigma_hi):.4g}] "
            "(exp(-logsnr / 2) at its end points), leave no range of noise levels."
        )
    return math.exp(log_lo), math.exp(log_hi)


def _edm_time_steps(sigma_min, sigma_max, num_steps, rho, dtype) -> Array:
    """EDM's levels `t_i = (a + i / (N - 1) (b - a))^rho`, `a = sigma_max^(1/rho)`,
    `b = sigma_min^(1/rho)`.

    Formed from `log sigma` so that `sigma_max = exp(20)` (logsnr -40) stays finite.
    """
    i = jnp.arange(num_steps, dtype=dtype)
    fraction = i / max(num_steps - 1, 1)
    root_max = math.exp(math.log(sigma_max) / rho)
    root_min = math.exp(math.log(sigma_min) / rho)
    return (root_max + fraction * (root_min - root_max)) ** rho


def edm_sample(
    model: Denoiser,
    *,
    shape: tuple[int, ...],
    schedule: Schedule,
    num_steps: int = 18,
    sigma_min: float = EDM_SIGMA_MIN,
    sigma_max: float = EDM_SIGMA_MAX,
    rho: float = 7.0,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    dtype: Any = None,
    key: PRNGKeyArray,
) -> tuple[Float[Array, "*shape"], dict[str, Array]]:
    """One sample by EDM's stochastic sampler (Karras et al. 2022, Algorithm 2).

    In EDM's variance-exploding coordinates `x = z / alpha`, with noise level
    `t = sigma_VE = exp(-logsnr / 2)`, the denoiser is `D(x; t) = x - t eps_hat(alpha
    x; logsnr)`, so the ODE slope `(x - D(x; t)) / t` is `eps_hat` itself. Levels

        t_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho)
               - sigma_max^(1/rho)))^rho,   i = 0 .. N - 1,   t_N = 0

    (EDM's equation 5) run from `sigma_max` down to `sigma_min`, and the sampler
    starts from `x_0 ~ N(0, sigma_max^2 I)`. At every level in `[s_tmin, s_tmax]`
    it first adds noise to raise the level by a factor `1 + gamma`, `gamma =
    min(s_churn / N, sqrt(2) - 1)`, with noise scale `s_noise`; then it takes a
    Heun step (an Euler step into `t_N = 0`). `s_churn = 0` is the deterministic
    Heun sampler of EDM's Algorithm 1.

    `sigma_min` and `sigma_max` default to EDM's 0.002 and 80 and are clipped to the
    schedule's range, `[exp(-logsnr_max / 2), exp(-logsnr_min / 2)]`, where the
    model was trained.

    NOTE: the levels are not taken from the schedule's end points. For a wide
    range they lie far outside the noise levels that matter: `[-40, 40]` gives
    `sigma` from `2e-9` to `5e8`, and with 32 steps the `rho`-spaced grid spends
    them at both extremes and takes one Heun step from `sigma = 0.03` to `2e-9`.
    With the exact denoiser of a 2-D mixture (variances 2.56 and 1.62), levels from
    the end points gave sample variances 2.93 and 1.80 on `[-20, 20]` and 20.7 and
    12.3 on `[-40, 40]` (4000 samples); EDM's levels give 2.62 and 1.63 on both
    (20000 samples; the bias of 32 Heun steps: 2.59 and 1.62 with 64). What EDM's
    levels cost is small: the prior `N(0, sigma_max^2 I)` ignores the data's mean
    `m` and spread, which biases the sample mean by about `-m std(x) / sigma_max`
    and the variance by a relative `-Var(x) / sigma_max^2`, and the last step
    returns the denoised mean at `sigma_min`, whose variance is short of the data's
    by about `sigma_min^2`.

    With churn at `t_0`, the raised level lies beyond `sigma_max`; keep `s_tmax <
    sigma_max` (EDM uses 50 with 80) when the model was trained only up to it.

    **Arguments:**

    - `model`: a denoiser `model(z, logsnr) -> eps_hat` on one example.
    - `shape`: the shape of one example.
    - `schedule`: its end points bound the noise levels.
    - `num_steps`: `N`, the number of levels; `2 N - 1` denoiser calls.
    - `sigma_min`, `sigma_max`: the lowest and highest level, in EDM's `sigma`.
    - `rho`: the spacing exponent of the levels.
    - `s_churn`, `s_tmin`, `s_tmax`, `s_noise`: EDM's stochasticity settings.
    - `dtype`: the floating dtype of the sample.
    - `key`: a `jax.random.key`.

    **Returns:** `(x, {"num_function_evaluations": 2 num_steps - 1})`.

    **Raises:** `ValueError` for a non-positive `sigma_min` or `sigma_max`, or for
    levels that leave no range once clipped to the schedule's.
    """
    owner = "edm_sample"
    _check_schedule(owner, schedule)
    shape = _check_shape(owner, shape)
    _check_positive_int(owner, "num_steps", num_steps)
    positive = (
        ("rho", rho),
        ("s_noise", s_noise),
        ("sigma_min", sigma_min),
        ("sigma_max", sigma_max),
    )
    for name, value in positive:
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{owner}: {name}={value!r} must be a positive number.")
    if not (math.isfinite(s_churn) and s_churn >= 0):
        raise ValueError(f"{owner}: s_churn={s_churn!r} must be non-negative.")
    if not (0 <= s_tmin <= s_tmax):
        raise ValueError(
            f"{owner}: need 0 <= s_tmin <= s_tmax; got s_tmin={s_tmin}, "
            f"s_tmax={s_tmax}."
        )
    sigma_min, sigma_max = _edm_sigma_range(owner, schedule, sigma_min, sigma_max)
    dtype = _dtype(dtype)
    init_key, churn_key = jax.random.split(key)
    t_steps = _edm_time_steps(sigma_min, sigma_max, num_steps, rho, dtype)
    gamma = min(s_churn / num_steps, math.sqrt(2) - 1)

    def slope(x, t):
        # (x - D(x; t)) / t with D(x; t) = x - t eps_hat(alpha x; logsnr): eps_hat.
        logsnr = -2 * jnp.log(t)
        alpha = jnp.exp(0.5 * log_alpha2(logsnr))
        return jnp.asarray(model(alpha * x, logsnr)).astype(dtype)

    def churn(x, t, noise_key):
        # Increase the noise level temporarily: t_hat = (1 + gamma_i) t.
        in_range = (t >= s_tmin) & (t <= s_tmax)
        gamma_i = jnp.where(in_range, gamma, 0.0)
        t_hat = t * (1 + gamma_i)
        eps = s_noise * _normal(noise_key, shape, dtype)
        return x + t * jnp.sqrt(gamma_i * (2 + gamma_i)) * eps, t_hat

    def heun_step(x, inputs):
        t_cur, t_next, noise_key = inputs
        x_hat, t_hat = churn(x, t_cur, noise_key)

        # Euler step from t_hat to t_next.
        d_cur = slope(x_hat, t_hat)
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Apply the 2nd-order correction.
        d_prime = slope(x_next, t_next)
        x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        return x_next, None

    # Sample x_0 ~ N(0, t_0^2 I), then Heun steps down to t_{N-1}.
    x = t_steps[0] * _normal(init_key, shape, dtype)
    keys = jax.random.split(churn_key, num_steps)
    x, _ = jax.lax.scan(heun_step, x, (t_steps[:-1], t_steps[1:], keys[:-1]))

    # The last step goes to t_N = 0, where no correction is possible: Euler.
    x_hat, t_hat = churn(x, t_steps[-1], keys[-1])
    x = x_hat - t_hat * slope(x_hat, t_hat)
    return x, {"num_function_evaluations": jnp.asarray(2 * num_steps - 1)}


# --- batches --------------------------------------------------------------------------


@eqx.filter_jit
def _batch(sampler, model, keys, options):
    return jax.vmap(lambda key: sampler(model, key=key, **options))(keys)


def batch_sample(
    sampler: Callable[..., tuple[Array, dict[str, Array]]],
    model: Denoiser,
    *,
    num_samples: int,
    key: PRNGKeyArray,
    **options: Any,
) -> tuple[Float[Array, " num_samples *shape"], dict[str, Array]]:
    """`num_samples` independent draws of `sampler(model, key=..., **options)`.

    `sampler` is one of `ode_sample`, `ddpm_sample`, `edm_sample`. Compiled once per
    shape and options; the model is an argument of the compiled function, so new
    parameter values reuse it.
    """
    _check_positive_int("batch_sample", "num_samples", num_samples)
    return _batch(sampler, model, jax.random.split(key, num_samples), options)
