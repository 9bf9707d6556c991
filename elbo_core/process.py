"""The variance-preserving diffusion process, parameterised by log-SNR.

The forward process is `q(z | x) = N(alpha x, sigma^2 I)` with
`alpha^2 = sigmoid(logsnr)` and `sigma^2 = sigmoid(-logsnr)` (PAPER.md section 1).
Both scales are computed from `log_sigmoid`, so they stay finite and accurate in
float32 for `|logsnr|` up to 40 and beyond.

Given a noise schedule `logsnr(t)`, the process is the SDE
`dz = f(t) z dt + g(t) dW` with

    f(t) = d log(alpha) / dt = 1/2 sigma^2 dlogsnr/dt,
    g(t)^2 = d(sigma^2)/dt - 2 f(t) sigma^2 = -sigma^2 dlogsnr/dt.

With the score written through an eps-predictor, `score = -eps_hat / sigma`, the
probability-flow ODE and the reverse-time SDE have drifts

    dz/dt = f z - 1/2 g^2 score = f z - 1/2 sigma (dlogsnr/dt) eps_hat,
    dz/dt = f z - g^2 score     = f z - sigma (dlogsnr/dt) eps_hat.

In log-SNR time the probability-flow ODE does not depend on the schedule at all:
`dz/dlogsnr = 1/2 sigma^2 z - 1/2 sigma eps_hat`; a schedule only fixes its end points.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, Scalar, ScalarLike

from .schedules import Schedule


def log_alpha2(logsnr: ScalarLike) -> Scalar:
    """Log signal variance, `log(alpha^2) = log sigmoid(logsnr)` (PAPER.md section 1).

    **Arguments:**

    - `logsnr`: a scalar.

    **Returns:** a non-positive scalar, accurate for any finite `logsnr`.
    """
    return jax.nn.log_sigmoid(jnp.asarray(logsnr))


def log_sigma2(logsnr: ScalarLike) -> Scalar:
    """Log noise variance, `log(sigma^2) = log sigmoid(-logsnr)` (PAPER.md section 1).

    **Arguments:**

    - `logsnr`: a scalar.

    **Returns:** a non-positive scalar, accurate for any finite `logsnr`.
    """
    return jax.nn.log_sigmoid(-jnp.asarray(logsnr))


def alpha(logsnr: ScalarLike) -> Scalar:
    """Signal scale `alpha = sqrt(sigmoid(logsnr))`, computed in log space.

    **Arguments:**

    - `logsnr`: a scalar.

    **Returns:** a scalar in [0, 1].
    """
    return jnp.exp(0.5 * log_alpha2(logsnr))


def sigma(logsnr: ScalarLike) -> Scalar:
    """Noise scale `sigma = sqrt(sigmoid(-logsnr))`, computed in log space.

    **Arguments:**

    - `logsnr`: a scalar.

    **Returns:** a scalar in [0, 1].
    """
    return jnp.exp(0.5 * log_sigma2(logsnr))


def sample_q(
    x: Float[ArrayLike, "*shape"], logsnr: ScalarLike, *, key: PRNGKeyArray
) -> tuple[Float[Array, "*shape"], Float[Array, "*shape"]]:
    """Draw `z ~ q(z | x) = N(alpha x, sigma^2 I)` (PAPER.md section 1).

    **Arguments:**

    - `x`: one example, any shape.
    - `logsnr`: the noise level, a scalar.
    - `key`: a PRNG key.

    **Returns:** `(z, eps)` with `z = alpha x + sigma eps`, both the shape and dtype
    of `x`, so that callers can form the regression target of any parameterisation.
    """
    x = jnp.asarray(x)
    eps = jax.random.normal(key, x.shape, x.dtype)
    return alpha(logsnr) * x + sigma(logsnr) * eps, eps


def dlogsnr_dt(schedule: Schedule, t: ScalarLike) -> Scalar:
    """`dlogsnr/dt` of a schedule by forward-mode autodiff, `-1 / p(logsnr(t))`.

    **Arguments:**

    - `schedule`: the noise schedule.
    - `t`: time in [0, 1], a scalar.

    **Returns:** a negative scalar.
    """
    t = jnp.asarray(t, dtype=jnp.result_type(t, float))
    return jax.jvp(schedule.logsnr, (t,), (jnp.ones_like(t),))[1]


def forward_drift(
    z: Float[ArrayLike, "*shape"], t: ScalarLike, schedule: Schedule
) -> Float[Array, "*shape"]:
    """Drift `f(t) z` of the forward SDE, `f = 1/2 sigma^2 dlogsnr/dt`.

    **Arguments:**

    - `z`: the latent, any shape.
    - `t`: time in [0, 1], a scalar.
    - `schedule`: the noise schedule.

    **Returns:** `f(t) z`, the shape of `z`.
    """
    logsnr = schedule.logsnr(t)
    f = 0.5 * jnp.exp(log_sigma2(logsnr)) * dlogsnr_dt(schedule, t)
    return f * jnp.asarray(z)


def forward_diffusion(t: ScalarLike, schedule: Schedule) -> Scalar:
    """Diffusion coefficient `g(t) = sqrt(-sigma^2 dlogsnr/dt)` of the forward SDE.

    **Arguments:**

    - `t`: time in [0, 1], a scalar.
    - `schedule`: the noise schedule.

    **Returns:** a non-negative scalar.
    """
    logsnr = schedule.logsnr(t)
    return jnp.sqrt(-jnp.exp(log_sigma2(logsnr)) * dlogsnr_dt(schedule, t))


def probability_flow_drift(
    eps_hat: Float[ArrayLike, "*shape"],
    z: Float[ArrayLike, "*shape"],
    t: ScalarLike,
    schedule: Schedule,
) -> Float[Array, "*shape"]:
    """Probability-flow ODE drift `f z - 1/2 sigma (dlogsnr/dt) eps_hat` in time `t`.

    `f z - 1/2 g^2 score` with `score = -eps_hat / sigma` (module docstring).

    **Arguments:**

    - `eps_hat`: the noise prediction at `(z, logsnr(t))`.
    - `z`: the latent, the same shape.
    - `t`: time in [0, 1], a scalar.
    - `schedule`: the noise schedule.

    **Returns:** `dz/dt`, the shape of `z`.
    """
    logsnr = schedule.logsnr(t)
    slope = dlogsnr_dt(schedule, t)
    eps_term = -0.5 * sigma(logsnr) * slope * jnp.asarray(eps_hat)
    return forward_drift(z, t, schedule) + eps_term


def reverse_sde_drift(
    eps_hat: Float[ArrayLike, "*shape"],
    z: Float[ArrayLike, "*shape"],
    t: ScalarLike,
    schedule: Schedule,
) -> Float[Array, "*shape"]:
    """Reverse-time SDE drift `f z - sigma (dlogsnr/dt) eps_hat` in time `t`.

    `f z - g^2 score` with `score = -eps_hat / sigma`; the reverse SDE runs from
    `t = 1` to `t = 0` with diffusion `g(t)`.

    **Arguments:**

    - `eps_hat`: the noise prediction at `(z, logsnr(t))`.
    - `z`: the latent, the same shape.
    - `t`: time in [0, 1], a scalar.
    - `schedule`: the noise schedule.

    **Returns:** the drift, the shape of `z`.
    """
    logsnr = schedule.logsnr(t)
    slope = dlogsnr_dt(schedule, t)
    eps_term = -sigma(logsnr) * slope * jnp.asarray(eps_hat)
    return forward_drift(z, t, schedule) + eps_term


def probability_flow_drift_logsnr(
    eps_hat: Float[ArrayLike, "*shape"],
    z: Float[ArrayLike, "*shape"],
    logsnr: ScalarLike,
) -> Float[Array, "*shape"]:
    """Probability-flow ODE drift in log-SNR time, `dz/dlogsnr`.

    `dz/dlogsnr = 1/2 sigma^2 z - 1/2 sigma eps_hat`, the time-`t` drift divided by
    `dlogsnr/dt`; it is the same for every schedule.

    **Arguments:**

    - `eps_hat`: the noise prediction at `(z, logsnr)`.
    - `z`: the latent, the same shape.
    - `logsnr`: the noise level, a scalar.

    **Returns:** `dz/dlogsnr`, the shape of `z`.
    """
    sigma2 = jnp.exp(log_sigma2(logsnr))
    return 0.5 * sigma2 * jnp.asarray(z) - 0.5 * sigma(logsnr) * jnp.asarray(eps_hat)
