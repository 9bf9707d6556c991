"""Log-likelihood of a diffusion model by the probability-flow ODE, with diffrax.

**The ODE.** In log-SNR time the probability-flow ODE of the variance-preserving
process does not depend on the schedule (`process.probability_flow_drift_logsnr`):

    dz/dlogsnr = v(z, logsnr) = 1/2 sigma^2 z - 1/2 sigma eps_hat(z; logsnr).

The schedule only fixes the end points `logsnr_min` and `logsnr_max`, which enter the
solve as arrays: a new range reuses the compilation, and a schedule whose end points
are traced (one passed through `jax.jit`) works inside `jit`. We integrate in
`logsnr` itself, not in `t`: the drift decays like `sigma^2` at high log-SNR and like
`alpha^2` at low log-SNR, so an adaptive solver takes long steps at both ends of a
range as wide as [-40, 40], whereas `dlogsnr/dt` of most schedules blows up there.

**Direction.** The likelihood of `z_max` (at `logsnr_max`, the data end) needs the
noise `z_min` it flows to, so the ODE runs from `logsnr_max` *down* to `logsnr_min`
(`t0 = logsnr_max > t1 = logsnr_min` in diffrax). Along a solution the log-density
changes as `d log p / dlogsnr = -div v` (instantaneous change of variables), so

    log p(z_max) = log prior(z_min) + Int_{logsnr_max}^{logsnr_min} div v dlogsnr,
    div v = 1/2 sigma^2 D - 1/2 sigma tr(d eps_hat / dz).                (1)

The integral is carried as an extra state, `delta`, integrated along with `z`.

**Data.** Data `x` enter at `logsnr_max` as `z_max = alpha_max x`, the noiseless
limit of `q(z_max | x)`, which adds the Jacobian `D log alpha_max`:

    log p(x) = log p(z_max = alpha_max x) + D log alpha_max.                 (2)

This is the exact log-density of `x_tilde = z_max / alpha_max` under the model, the
quantity that the ELBO of `elbo_core.losses` (Gaussian decoder, which reads `x` off
`z_max / alpha_max`) bounds, so the two are comparable in nats; both differ from the
density of noiseless data by noise of scale `exp(-logsnr_max / 2)`.

**Prior.** As in the ELBO, the prior at `logsnr_min` is `N(0, I)`. It differs from
the model's own marginal there. For the exact denoiser, whose flow carries `q(z_max)`
onto `q(z_min)`, the error it causes averages to

    E[log q(z_max) - log p_ode(z_max)] = KL(q(z_min) || N(0, I))
                                       <= E_x KL(q(z_min | x) || N(0, I)),

the ELBO's prior term (`losses.prior_kl`), which every result reports as `prior_kl`.
Per example the error is `log N(z_min) - log q(z_min)` (`normal_prior_error`), of the
order of `alpha_min`. For checks, `NoisyMarginal(mixture)` uses the exact noisy
marginal of a `GaussianMixture` as the prior instead, which makes (1) exact for the
oracle up to solver error.

**Divergence.** Exact, by forward-mode Jacobian-vector products against basis
vectors in chunks (memory bounded by `chunk_size` tangents at a time), or Hutchinson's
estimator `E[u^T J u] = tr J` with `num_probes` Rademacher or Gaussian probes drawn
once and held fixed through the solve. Each probe carries its own `delta`, so every
probe gives a full log-likelihood estimate and their spread gives the standard error.

**Discrete data.** For data on `k` levels, `dequantize` adds uniform noise within
each level's bin and `ode_bits_per_dim` turns the solve into bits per dimension, term
by term (prior, divergence integral, `D log alpha_max`, bin width).

**Cost.** Every result reports the solver's steps and the number of evaluations of
the vector field (each one denoiser call plus its Jacobian-vector products). A solve
that stops at `max_steps` or fails otherwise is reported in the statistics, and every
value it would have produced (log-likelihood, probe estimates, their standard error,
prior term, divergence integral, `z_min`) is NaN, never a silently truncated number.
"""

import abc
import functools
import math
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, Scalar, ScalarLike

from . import losses
from .analytic import GaussianMixture
from .losses import Denoiser
from .process import log_alpha2, log_sigma2
from .schedules import Schedule

__all__ = [
    "DIVERGENCES",
    "INPUT_SPACES",
    "PROBE_DISTRIBUTIONS",
    "NoisyMarginal",
    "Prior",
    "StandardNormal",
    "augmented_drift",
    "batch_ode_log_likelihood",
    "bits_per_dim",
    "count_function_evaluations",
    "dequantize",
    "draw_probes",
    "eps_divergence",
    "normal_prior_error",
    "ode_bits_per_dim",
    "ode_log_likelihood",
    "solve_statistics",
]

DIVERGENCES = ("exact", "hutchinson")
PROBE_DISTRIBUTIONS = ("rademacher", "gaussian")
INPUT_SPACES = ("data", "latent")

DEFAULT_RTOL = 1e-5
DEFAULT_ATOL = 1e-5
DEFAULT_MAX_STEPS = 4096
# Basis vectors pushed through the Jacobian at once by the exact divergence: bounds
# the memory of one evaluation to this many tangents of the network's activations.
DEFAULT_CHUNK_SIZE = 256
# Distance from the grid of k levels tolerated by `dequantize`, in bin widths.
GRID_TOLERANCE = 1e-3


def _check_positive_int(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{owner}: {name}={value!r} must be an integer.")
    if value < 1:
        raise ValueError(f"{owner}: {name}={value} must be at least 1.")


def _check_choice(owner: str, name: str, value: Any, choices: tuple[str, ...]):
    if value not in choices:
        raise ValueError(f"{owner}: {name}={value!r} is not one of {list(choices)}.")


def _float_dtype(x: Array, dtype) -> Any:
    """The floating dtype to compute in: `dtype`, else `x`'s, else the default."""
    if dtype is not None:
        dtype = jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"dtype={dtype} must be a floating-point dtype.")
        return dtype
    if jnp.issubdtype(x.dtype, jnp.floating):
        return x.dtype
    return jnp.result_type(float)


# --- priors at logsnr_min -------------------------------------------------------------


class Prior(eqx.Module):
    """A density for `z_min` at the noisy end of the ODE."""

    @abc.abstractmethod
    def log_prob(self, z: Float[Array, "*shape"], logsnr: ScalarLike) -> Scalar:
        """`log prior(z)` of a latent at `logsnr`."""


class StandardNormal(Prior):
    """`N(0, I)`, the prior of the ELBO (the limit of `q(z)` as `logsnr -> -inf`)."""

    def log_prob(self, z: Float[Array, "*shape"], logsnr: ScalarLike) -> Scalar:
        return -0.5 * jnp.sum(z**2) - 0.5 * z.size * math.log(2 * math.pi)


class NoisyMarginal(Prior):
    """The exact noisy marginal `q(z)` of Gaussian-mixture data at `logsnr`.

    With the mixture's own optimal denoiser this makes the ODE log-likelihood exact
    up to solver error: the check of the whole pipeline.
    """

    data: GaussianMixture

    def log_prob(self, z: Float[Array, "*shape"], logsnr: ScalarLike) -> Scalar:
        z = z.reshape(-1)
        return self.data.marginal_log_prob(z, logsnr).astype(z.dtype)


def normal_prior_error(
    data: GaussianMixture, z_min: Float[ArrayLike, "*shape"], logsnr_min: ScalarLike
) -> Scalar:
    """The exact error `log N(z_min; 0, I) - log q(z_min)` of the `N(0, I)` prior.

    With the exact denoiser of Gaussian-mixture data, the flow carries `q(z_max)`
    onto `q(z_min)`, so the ODE log-likelihood with the default `StandardNormal()`
    prior exceeds the exact one by this amount, example by example, up to solver
    error. Its mean over `z_min ~ q(z_min)` is `-KL(q(z_min) || N(0, I))`: never
    positive, and no lower than minus the mean `prior_kl` (module docstring).

    **Arguments:**

    - `data`: the mixture whose exact denoiser drove the solve.
    - `z_min`: the latent one example flows to (`stats["z_min"]`).
    - `logsnr_min`: the noisy end of the solve.

    **Returns:** a scalar, in nats.
    """
    z_min = jnp.asarray(z_min)
    normal = StandardNormal().log_prob(z_min, logsnr_min)
    return normal - NoisyMarginal(data).log_prob(z_min, logsnr_min)


# --- the vector field and its divergence ----------------------------------------------


def _flat_denoiser(model: Denoiser, shape, logsnr, dtype):
    """`eps_hat` as a map between flat vectors, in `dtype`."""

    def fn(z_flat):
        eps_hat = jnp.asarray(model(z_flat.reshape(shape), logsnr))
        return eps_hat.astype(dtype).reshape(-1)

    return fn


def _exact_trace(jvp_fn, num_dims: int, chunk_size: int, dtype) -> Scalar:
    """`tr J` from `J e_i` for every basis vector, `chunk_size` at a time."""
    chunk_size = min(chunk_size, num_dims)
    num_chunks = -(-num_dims // chunk_size)

    def chunk_trace(indices):
        # Basis vectors as one-hot rows; the padding index `num_dims` gives zero rows.
        tangents = jax.nn.one_hot(indices, num_dims, dtype=dtype)
        return jnp.sum(jax.vmap(jvp_fn)(tangents) * tangents)

    indices = jnp.arange(num_chunks * chunk_size).reshape(num_chunks, chunk_size)
    if num_chunks == 1:
        return chunk_trace(indices[0])
    return jnp.sum(jax.lax.map(chunk_trace, indices))


def eps_divergence(
    model: Denoiser,
    z: Float[Array, "*shape"],
    logsnr: ScalarLike,
    probes: Float[Array, "num_probes dim"] | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Float[Array, "*shape"], Float[Array, "*probes"]]:
    """`eps_hat(z; logsnr)` and the trace of its Jacobian `d eps_hat / dz`.

    Without `probes`, the exact trace `sum_i e_i^T J e_i` from forward-mode products
    with `chunk_size` basis vectors at a time (a scalar). With `probes` of shape
    `(num_probes, D)` (flattened `z`), Hutchinson's estimates `u^T J u`, one per
    probe (a vector).
    """
    dtype = z.dtype
    fn = _flat_denoiser(model, z.shape, logsnr, dtype)
    eps_hat, jvp_fn = jax.linearize(fn, z.reshape(-1))
    if probes is None:
        trace = _exact_trace(jvp_fn, z.size, chunk_size, dtype)
    else:
        trace = jnp.sum(jax.vmap(jvp_fn)(probes) * probes, axis=1)
    return eps_hat.reshape(z.shape), trace


def augmented_drift(
    model: Denoiser,
    z: Float[Array, "*shape"],
    logsnr: ScalarLike,
    probes: Float[Array, "num_probes dim"] | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Float[Array, "*shape"], Float[Array, "*probes"]]:
    """The probability-flow drift and its divergence, equation (1) of the module.

    `dz/dlogsnr = 1/2 sigma^2 z - 1/2 sigma eps_hat` and
    `div = 1/2 sigma^2 D - 1/2 sigma tr(d eps_hat / dz)`, the trace exact or per
    Hutchinson probe as in `eps_divergence`. This is one evaluation of the vector
    field that `ode_log_likelihood` integrates.
    """
    logsnr = jnp.asarray(logsnr, z.dtype)
    eps_hat, trace = eps_divergence(model, z, logsnr, probes, chunk_size=chunk_size)
    sigma2 = jnp.exp(log_sigma2(logsnr))
    sigma = jnp.exp(0.5 * log_sigma2(logsnr))
    drift = 0.5 * sigma2 * z - 0.5 * sigma * eps_hat
    divergence = 0.5 * sigma2 * z.size - 0.5 * sigma * trace
    return drift, divergence


class _AugmentedField(eqx.Module):
    """The vector field of the state `(z, delta)`; the model and probes are dynamic."""

    chunk_size: int = eqx.field(static=True)

    def __call__(self, logsnr, state, args):
        model, probes = args
        z, _ = state
        return augmented_drift(model, z, logsnr, probes, chunk_size=self.chunk_size)


def _split_norm(error) -> Scalar:
    """RMS norm of the latent's error and of the log-density's, whichever is larger."""
    # NOTE: one RMS over the whole state would weigh the log-density accumulator as
    # one coordinate among D + 1 and let its error grow D-fold unnoticed in high
    # dimension; controlling each part separately keeps the log-likelihood as
    # accurate as the latent path.
    return jnp.maximum(
        *(jnp.sqrt(jnp.mean(jnp.square(part))) for part in jax.tree.leaves(error))
    )


# --- solver statistics ----------------------------------------------------------------


def count_function_evaluations(
    solver: diffrax.AbstractSolver, num_steps: ArrayLike
) -> Array:
    """Vector-field evaluations of an explicit Runge-Kutta solve of `num_steps` steps.

    `s` stages per step, one of them reused from the previous step when the tableau
    is first-same-as-last (Tsit5, Dopri5, Dopri8, Bosh3), which then costs one
    evaluation at the start: `fsal + (s - fsal) num_steps`, rejected steps included.
    (diffrax 0.7 chooses the first step size without evaluating the field.)

    **Raises:** `ValueError` for solvers other than explicit Runge-Kutta, whose
    evaluation counts are not determined by the number of steps.
    """
    if not isinstance(solver, diffrax.AbstractERK):
        raise ValueError(
            f"solver {type(solver).__name__} is not an explicit Runge-Kutta method "
            "(diffrax.AbstractERK); its function evaluations cannot be counted from "
            "its steps. Use e.g. diffrax.Tsit5(), Dopri5(), Dopri8() or Bosh3()."
        )
    tableau = solver.tableau
    num_stages = len(tableau.c) + 1
    fsal = int(bool(tableau.fsal))
    return fsal + (num_stages - fsal) * jnp.asarray(num_steps)


def solve_statistics(
    solution: diffrax.Solution, solver: diffrax.AbstractSolver
) -> dict[str, Array]:
    """The cost and outcome of a diffrax solve as a flat dict of arrays.

    Keys: `num_function_evaluations`, `num_steps`, `num_accepted_steps`,
    `num_rejected_steps`, `successful` (false when the solve hit `max_steps` or
    failed otherwise).
    """
    stats = solution.stats
    return {
        "num_function_evaluations": count_function_evaluations(
            solver, stats["num_steps"]
        ),
        "num_steps": jnp.asarray(stats["num_steps"]),
        "num_accepted_steps": jnp.asarray(stats["num_accepted_steps"]),
        "num_rejected_steps": jnp.asarray(stats["num_rejected_steps"]),
        "successful": solution.result == diffrax.RESULTS.successful,
    }


def _rms_norm(error) -> Scalar:
    """Root mean square over every coordinate of the state."""
    leaves = [jnp.ravel(leaf) for leaf in jax.tree.leaves(error)]
    return jnp.sqrt(jnp.mean(jnp.square(jnp.concatenate(leaves))))


def _resolve_controller(owner, stepsize_controller, rtol, atol, dtype, norm):
    if stepsize_controller is not None:
        if rtol is not None or atol is not None:
            raise ValueError(
                f"{owner}: pass either rtol/atol (for the default PID controller) or "
                "a stepsize_controller, not both."
            )
        return stepsize_controller
    rtol = DEFAULT_RTOL if rtol is None else rtol
    atol = DEFAULT_ATOL if atol is None else atol
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ValueError(f"{owner}: {name}={value!r} must be a positive number.")
    # NOTE: tolerances are arrays, so that a tolerance sweep reuses one compilation.
    return diffrax.PIDController(
        rtol=jnp.asarray(rtol, dtype), atol=jnp.asarray(atol, dtype), norm=norm
    )


def _resolve_solver(solver):
    solver = diffrax.Tsit5() if solver is None else solver
    count_function_evaluations(solver, 0)  # raises for solvers we cannot count
    return solver


# --- the log-likelihood ---------------------------------------------------------------


class _Options(eqx.Module):
    """Everything static about a log-likelihood solve (hashable: one compilation).

    The schedule's end points are not here: they are arrays, arguments of the solve.
    """

    divergence: str = eqx.field(static=True)
    num_probes: int = eqx.field(static=True)
    chunk_size: int = eqx.field(static=True)
    input_space: str = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    dt0: float | None = eqx.field(static=True)
    dtype: Any = eqx.field(static=True)


@functools.partial(jax.jit, static_argnames=("distribution", "shape", "dtype"))
def _draw(keys, distribution, shape, dtype):
    # NOTE: drawn flat and reshaped. With JAX's partitionable threefry, XLA:CPU took
    # 8 s to compile a draw of shape (16, 64, 10) and 0.5 s for the same numbers
    # drawn flat.
    def draw(key):
        size = math.prod(shape)
        if distribution == "rademacher":
            return jax.random.rademacher(key, (size,), dtype).reshape(shape)
        return jax.random.normal(key, (size,), dtype).reshape(shape)

    return jax.vmap(draw)(keys) if keys.ndim else draw(keys)


def draw_probes(
    key: PRNGKeyArray,
    *,
    num_probes: int,
    num_dims: int,
    distribution: str = "rademacher",
    dtype: Any = None,
) -> Float[Array, "num_probes num_dims"]:
    """The Hutchinson probes that `ode_log_likelihood(..., key=key)` uses.

    Rademacher (`+-1`) or standard Gaussian entries, shape `(num_probes, num_dims)`.
    `batch_ode_log_likelihood(..., key=key)` gives example `i` the probes of
    `jax.random.split(key, num_examples)[i]`.
    """
    _check_choice("draw_probes", "distribution", distribution, PROBE_DISTRIBUTIONS)
    _check_positive_int("draw_probes", "num_probes", num_probes)
    _check_positive_int("draw_probes", "num_dims", num_dims)
    dtype = jnp.dtype(jnp.result_type(float) if dtype is None else dtype)
    return _draw(key, distribution, (num_probes, num_dims), dtype)


def _draw_probes(keys, distribution: str, options: _Options, num_dims: int):
    """Probes per key (drawn outside the solve, so the distribution does not change
    the compiled solve); `None` for the exact divergence."""
    if options.divergence == "exact":
        return None
    shape = (options.num_probes, num_dims)
    return _draw(keys, distribution, shape, jnp.dtype(options.dtype))


def _log_likelihood(
    model, x, probes, prior, solver, controller, ends, options: _Options
):
    """One example: solve, then assemble equation (2) and the statistics."""
    dtype = options.dtype
    x = jnp.asarray(x, dtype)
    num_dims = x.size
    logsnr_min, logsnr_max = ends
    log_alpha_max = 0.5 * log_alpha2(logsnr_max)

    # Enter the ODE at logsnr_max: z_max = alpha_max x for data, x itself for latents.
    if options.input_space == "data":
        z_max = jnp.exp(log_alpha_max) * x
        data_jacobian = num_dims * log_alpha_max
    else:
        z_max = x
        data_jacobian = jnp.zeros((), dtype)

    # Integrate from logsnr_max down to logsnr_min, carrying Int div v dlogsnr.
    num_estimates = 1 if probes is None else options.num_probes
    delta0 = jnp.zeros(() if probes is None else (num_estimates,), dtype)
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(_AugmentedField(options.chunk_size)),
        solver,
        t0=logsnr_max,
        t1=logsnr_min,
        dt0=None if options.dt0 is None else -abs(options.dt0),
        y0=(z_max, delta0),
        args=(model, probes),
        stepsize_controller=controller,
        max_steps=options.max_steps,
        throw=False,
    )
    z_min, delta = (leaf[-1] for leaf in solution.ys)
    stats = solve_statistics(solution, solver)

    # log p(x) = log prior(z_min) + Int div v + D log alpha_max, per probe.
    prior_log_prob = prior.log_prob(z_min, logsnr_min)
    estimates = jnp.reshape(prior_log_prob + delta + data_jacobian, (num_estimates,))
    log_likelihood = jnp.mean(estimates)
    if num_estimates > 1:
        std_error = jnp.std(estimates, ddof=1) / math.sqrt(num_estimates)
    elif probes is None:
        std_error = jnp.zeros((), dtype)
    else:
        std_error = jnp.full((), jnp.nan, dtype)

    # A failed solve has no results: every value it produced is NaN, with
    # `successful` false. The data Jacobian and prior_kl depend on x alone.
    def unless_failed(value):
        return jnp.where(stats["successful"], value, jnp.nan)

    x_data = z_max * jnp.exp(-log_alpha_max)
    stats.update(
        std_error=unless_failed(std_error),
        probe_log_likelihoods=unless_failed(estimates),
        prior_log_prob=unless_failed(prior_log_prob),
        divergence_integral=unless_failed(jnp.mean(delta)),
        data_jacobian=data_jacobian,
        prior_kl=losses.prior_kl(x_data, logsnr_min).astype(dtype),
        z_min=unless_failed(z_min),
    )
    return unless_failed(log_likelihood), stats


def _prepare(
    owner,
    x,
    *,
    schedule,
    divergence,
    num_probes,
    probe_distribution,
    chunk_size,
    prior,
    input_space,
    solver,
    rtol,
    atol,
    stepsize_controller,
    dt0,
    max_steps,
    dtype,
    key,
    batched,
):
    """Check every argument once, outside `jit`, and resolve the defaults."""
    if not isinstance(schedule, Schedule):
        raise ValueError(
            f"{owner}: schedule must be an elbo_core.schedules.Schedule; got "
            f"{type(schedule).__name__}."
        )
    _check_choice(owner, "divergence", divergence, DIVERGENCES)
    _check_choice(owner, "probe_distribution", probe_distribution, PROBE_DISTRIBUTIONS)
    _check_choice(owner, "input_space", input_space, INPUT_SPACES)
    _check_positive_int(owner, "num_probes", num_probes)
    _check_positive_int(owner, "chunk_size", chunk_size)
    _check_positive_int(owner, "max_steps", max_steps)
    if divergence == "hutchinson" and key is None:
        raise ValueError(
            f"{owner}: divergence='hutchinson' draws random probes and needs a key; "
            "pass key=jax.random.key(seed)."
        )
    if dt0 is not None and not (math.isfinite(dt0) and dt0 != 0):
        raise ValueError(f"{owner}: dt0={dt0!r} must be a finite non-zero step.")
    prior = StandardNormal() if prior is None else prior
    if not isinstance(prior, Prior):
        raise ValueError(
            f"{owner}: prior must be an elbo_core.likelihood.Prior (StandardNormal() "
            f"or NoisyMarginal(mixture)); got {type(prior).__name__}."
        )
    x = jnp.asarray(x)
    if x.ndim < (1 if batched else 0) or x.size == 0:
        expected = "(num_examples, *shape)" if batched else "one example"
        raise ValueError(f"{owner}: x must be {expected}; got shape {x.shape}.")
    dtype = _float_dtype(x, dtype)
    # NOTE: the end points are arrays, not Python floats: a new range reuses the
    # compilation, and a schedule traced by `jax.jit` has traced end points.
    ends = (
        jnp.asarray(schedule.logsnr_min, dtype),
        jnp.asarray(schedule.logsnr_max, dtype),
    )
    options = _Options(
        divergence=divergence,
        num_probes=int(num_probes),
        chunk_size=int(chunk_size),
        input_space=input_space,
        max_steps=int(max_steps),
        dt0=None if dt0 is None else float(dt0),
        dtype=dtype,
    )
    solver = _resolve_solver(solver)
    controller = _resolve_controller(
        owner, stepsize_controller, rtol, atol, dtype, _split_norm
    )
    x = x.astype(dtype)
    if key is not None and batched:
        key = jax.random.split(key, x.shape[0])
    num_dims = math.prod(x.shape[1:] if batched else x.shape)
    probes = _draw_probes(key, probe_distribution, options, num_dims)
    return x, probes, prior, solver, controller, ends, options


def ode_log_likelihood(
    model: Denoiser,
    x: Float[ArrayLike, "*shape"],
    *,
    schedule: Schedule,
    divergence: str = "exact",
    num_probes: int = 1,
    probe_distribution: str = "rademacher",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    prior: Prior | None = None,
    input_space: str = "data",
    solver: diffrax.AbstractSolver | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    dt0: float | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    dtype: Any = None,
    key: PRNGKeyArray | None = None,
) -> tuple[Scalar, dict[str, Array]]:
    """Log-likelihood of one example by the probability-flow ODE, in nats.

    Solves `dz/dlogsnr = 1/2 sigma^2 z - 1/2 sigma eps_hat` from
    `schedule.logsnr_max` down to `schedule.logsnr_min` with the log-density change
    (1), and returns `log p(x)` of equation (2) (module docstring).

    **Arguments:**

    - `model`: a denoiser `model(z, logsnr) -> eps_hat` on one example.
    - `x`: one example; data (`input_space="data"`, entering as `alpha_max x` with
      the Jacobian `D log alpha_max`) or a latent at `logsnr_max`
      (`input_space="latent"`, no Jacobian).
    - `schedule`: fixes `logsnr_min` and `logsnr_max`; the ODE in log-SNR time does
      not otherwise depend on it. The end points enter the solve as arrays, so they
      may be traced (a schedule passed through `jax.jit`).
    - `divergence`: `"exact"` (forward-mode Jacobian, `chunk_size` basis vectors at
      a time) or `"hutchinson"` with `num_probes` probes from `probe_distribution`,
      drawn once from `key` and fixed through the solve.
    - `prior`: density of `z_min`; `StandardNormal()` (default, as in the ELBO) or
      `NoisyMarginal(mixture)` for exact checks.
    - `solver`: an explicit Runge-Kutta diffrax solver, `Tsit5()` by default.
    - `rtol`, `atol`: tolerances of the default PID controller (default `1e-5`);
      or pass a `stepsize_controller` of your own instead.
    - `dt0`: first step size in logsnr (sign ignored); diffrax's default if `None`.
    - `max_steps`: steps before the solve stops and is reported as failed.
    - `dtype`: floating dtype of the solve; `x`'s by default. The model should
      compute in the same precision (its output is cast to it).
    - `key`: for Hutchinson probes; unused by the exact divergence.

    **Returns:** `(log_likelihood, stats)`: the log-likelihood (the mean over probes
    for Hutchinson; NaN when the solve failed) and a dict of arrays:
    `num_function_evaluations`, `num_steps`, `num_accepted_steps`,
    `num_rejected_steps`, `successful`, `std_error` (over probes: 0 for the exact
    divergence, NaN for a single probe), `probe_log_likelihoods`, `prior_log_prob`,
    `divergence_integral`, `data_jacobian`, `prior_kl` (`KL(q(z_min | x) ||
    N(0, I))` of the ELBO, which bounds the prior's mismatch on average over data)
    and `z_min`, the noise the example flows to (its latent code; for oracle data,
    `normal_prior_error` turns it into the exact error that the `N(0, I)` prior
    makes for this example). When the solve fails, the log-likelihood and every
    statistic computed from the solve (`std_error`, `probe_log_likelihoods`,
    `prior_log_prob`, `divergence_integral`, `z_min`) are NaN; `data_jacobian` and
    `prior_kl` depend on `x` alone and stay finite.

    For a batch, `jax.vmap` over `x` and `key` (each example keeps its own adaptive
    steps), or use `batch_ode_log_likelihood`, which compiles once per shape.
    """
    x, probes, prior, solver, controller, ends, options = _prepare(
        "ode_log_likelihood",
        x,
        schedule=schedule,
        divergence=divergence,
        num_probes=num_probes,
        probe_distribution=probe_distribution,
        chunk_size=chunk_size,
        prior=prior,
        input_space=input_space,
        solver=solver,
        rtol=rtol,
        atol=atol,
        stepsize_controller=stepsize_controller,
        dt0=dt0,
        max_steps=max_steps,
        dtype=dtype,
        key=key,
        batched=False,
    )
    return _log_likelihood(model, x, probes, prior, solver, controller, ends, options)


@eqx.filter_jit
def _batch_log_likelihood(model, x, probes, prior, solver, controller, ends, options):
    def one(example, probes):
        return _log_likelihood(
            model, example, probes, prior, solver, controller, ends, options
        )

    return jax.vmap(one)(x, probes)


def batch_ode_log_likelihood(
    model: Denoiser,
    x: Float[ArrayLike, " num_examples *shape"],
    *,
    schedule: Schedule,
    key: PRNGKeyArray | None = None,
    **options: Any,
) -> tuple[Float[Array, " num_examples"], dict[str, Array]]:
    """`ode_log_likelihood` of every example of a batch, jitted once per shape.

    The model, the data, the prior's arrays, the tolerances, the Hutchinson probes
    and the schedule's end points are arguments of the compiled function, not
    constants inside it: new values (a model after another training step, another
    tolerance, key or log-SNR range) reuse the compilation. Each example
    has its own adaptive steps and its own probes (`key` is split per example).
    Keyword options are those of `ode_log_likelihood`.

    **Returns:** `(log_likelihoods, stats)`, every statistic with a leading batch
    axis.
    """
    x, probes, prior, solver, controller, ends, settings = _prepare(
        "batch_ode_log_likelihood",
        x,
        schedule=schedule,
        key=key,
        batched=True,
        **{**_DEFAULT_OPTIONS, **_check_option_names(options)},
    )
    return _batch_log_likelihood(
        model, x, probes, prior, solver, controller, ends, settings
    )


_DEFAULT_OPTIONS = dict(
    divergence="exact",
    num_probes=1,
    probe_distribution="rademacher",
    chunk_size=DEFAULT_CHUNK_SIZE,
    prior=None,
    input_space="data",
    solver=None,
    rtol=None,
    atol=None,
    stepsize_controller=None,
    dt0=None,
    max_steps=DEFAULT_MAX_STEPS,
    dtype=None,
)


def _check_option_names(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(_DEFAULT_OPTIONS))
    if unknown:
        raise ValueError(
            f"batch_ode_log_likelihood: unknown option(s) {unknown}; valid options "
            f"are {sorted(_DEFAULT_OPTIONS)}."
        )
    return options


# --- discrete data --------------------------------------------------------------------


def dequantize(
    x: Float[ArrayLike, "*shape"], *, num_levels: int, key: PRNGKeyArray
) -> Float[Array, "*shape"]:
    """Uniform dequantisation of data on `num_levels` levels in [-1, 1].

    The levels are `-1 + 2 i / (k - 1)`, `i = 0 .. k - 1` (the grid of
    `losses.reconstruction`'s discrete decoder); each owns a bin of width
    `h = 2 / (k - 1)` centred on it. Returns `x + h (u - 1/2)`, `u ~ U(0, 1)^D`.

    **Raises:** at run time (`eqx.error_if`) when `x` is off the grid.
    """
    _check_num_levels("dequantize", num_levels)
    x = jnp.asarray(x, jnp.result_type(x, float))
    position = (x + 1) * (num_levels - 1) / 2
    off_grid = jnp.abs(position - jnp.round(position)) > GRID_TOLERANCE
    outside = (position < -GRID_TOLERANCE) | (
        position > num_levels - 1 + GRID_TOLERANCE
    )
    x = eqx.error_if(
        x,
        jnp.any(off_grid | outside),
        f"dequantize: every coordinate of x must be one of the {num_levels} levels "
        f"-1 + 2 i / {num_levels - 1} in [-1, 1]",
    )
    bin_width = 2.0 / (num_levels - 1)
    u = jax.random.uniform(key, x.shape, x.dtype)
    return x + bin_width * (u - 0.5)


def _check_num_levels(owner: str, num_levels: Any) -> None:
    _check_positive_int(owner, "num_levels", num_levels)
    if num_levels < 2:
        raise ValueError(f"{owner}: num_levels={num_levels} must be at least 2.")


def _log_bin_width(num_levels: int) -> float:
    """`log h`, `h = 2 / (k - 1)`: the width of a bin of `dequantize`'s grid."""
    return math.log(2.0 / (num_levels - 1))


def ode_bits_per_dim(
    stats: dict[str, ArrayLike], *, num_dims: int, num_levels: int
) -> dict[str, Array]:
    """Bits per dimension of discrete data from the ODE solve of its dequantised copy.

    Data `x` on `k = num_levels` levels `-1 + 2 i / (k - 1)` in [-1, 1]; each level
    owns a bin of width `h = 2 / (k - 1)`, and `dequantize` draws `x_deq = x + h (u
    - 1/2)`, `u ~ U(0, 1)^D`. The probability of `x`'s bin is the model's density
    integrated over the bin, so by Jensen's inequality

        -log P(x) = -log E_u [p(x_deq) h^D] <= E_u [-log p(x_deq)] - D log h.   (3)

    The ODE started at `z_max = alpha_max x_deq` (`input_space="data"`) gives
    `log p(x_deq)` by equations (1) and (2) of the module docstring, three terms that
    the solve reports in `stats`. Written out, the code length of `x` is at most, in
    bits per dimension,

        bpd = ( - log prior(z_min)            bpd_prior   stats["prior_log_prob"]
                - Int div v dlogsnr           bpd_flow    stats["divergence_integral"]
                - D log alpha_max             bpd_scaling stats["data_jacobian"]
                - D log h )                   bpd_dequantization
              / (D log 2),

    the integral running from `logsnr_max` down to `logsnr_min`. This is for one
    draw of `u`: the mean over draws (and over data) is the bound (3), which the
    exact model of the discrete data meets only when its density is flat on every
    bin. The components sum to `bpd`:

    - `bpd_prior`: minus the prior's log-density at `z_min` (`N(0, I)` by default:
      about `log2(2 pi e) / 2 = 2.05` bits when `z_min` is typical).
    - `bpd_flow`: minus the log-volume change of the flow from `z_max` to `z_min`.
    - `bpd_scaling`: `-log2 alpha_max = log2(1 + exp(-logsnr_max)) / 2`, from
      entering the ODE at `alpha_max x_deq`; it vanishes as `logsnr_max` grows.
    - `bpd_dequantization`: `-log2 h = log2((k - 1) / 2)`, the same for every
      example: the bin's volume, turning a density into a probability.

    NOTE: the levels lie at `-1 + 2 i / (k - 1)`, so the extreme levels are exactly
    -1 and 1 (`2 p / 255 - 1` for 8-bit pixels `p`, the grid of the discrete decoder
    in `losses.reconstruction`), and the bins have width `2 / (k - 1)`. The offset
    is then `log2((k - 1) / 2) = log2(127.5) = 6.994` bits for `k = 256`, not the 7
    bits (`log2 128`) of VDM and score_sde, which tile [-1, 1] with `k` bins of width
    `2 / k` (score_sde dequantises to `(p + u) / 256` and rescales by `2 x - 1`).
    Both bound a code length of the same discrete data: the densities of the two
    dequantised copies differ by the Jacobian of the rescaling `k / (k - 1)` between
    them, which the offsets undo. Mixing them, as in adding 7 bits to a density of
    data scaled as here, overstates the code length by `log2(256 / 255) = 0.0056`
    bits per dimension.

    **Arguments:**

    - `stats`: the statistics of `ode_log_likelihood` (or of
      `batch_ode_log_likelihood`, with a batch axis) for dequantised data and
      `input_space="data"`: `prior_log_prob`, `divergence_integral` and
      `data_jacobian` are used.
    - `num_dims`: `D`, the number of dimensions of one example.
    - `num_levels`: `k`, the number of levels of the discrete data.

    **Returns:** a dict of arrays of the batch shape (scalars for one example):
    `bpd` and its components `bpd_prior`, `bpd_flow`, `bpd_scaling` and
    `bpd_dequantization`. A failed solve gives NaN `bpd`, `bpd_prior` and
    `bpd_flow`.

    **Raises:** `ValueError` for `num_levels < 2`, or for a `num_dims` that does
    not match `stats["z_min"]`.
    """
    owner = "ode_bits_per_dim"
    _check_positive_int(owner, "num_dims", num_dims)
    _check_num_levels(owner, num_levels)
    prior_log_prob = jnp.asarray(stats["prior_log_prob"])
    if "z_min" in stats:
        z_size = jnp.size(stats["z_min"])
        if z_size != num_dims * prior_log_prob.size:
            raise ValueError(
                f"{owner}: num_dims={num_dims} does not match stats['z_min'] of "
                f"{z_size} elements for {prior_log_prob.size} example(s)."
            )
    dtype = jnp.result_type(prior_log_prob, float)
    to_bits = 1.0 / (num_dims * math.log(2.0))

    # Each term of log p(x_deq) + D log h, as bits per dimension of -log P(x).
    components = {
        "bpd_prior": -prior_log_prob * to_bits,
        "bpd_flow": -jnp.asarray(stats["divergence_integral"]) * to_bits,
        "bpd_scaling": -jnp.asarray(stats["data_jacobian"]) * to_bits,
        "bpd_dequantization": jnp.full(
            prior_log_prob.shape, -_log_bin_width(num_levels) / math.log(2.0)
        ),
    }
    components = {name: value.astype(dtype) for name, value in components.items()}
    return {"bpd": sum(components.values()), **components}


def bits_per_dim(
    log_likelihood: Float[ArrayLike, "*batch"], *, num_dims: int, num_levels: int
) -> Float[Array, "*batch"]:
    """Bits per dimension of discrete data from the density of its dequantised copy.

    The total of `ode_bits_per_dim`, from a log-likelihood in nats alone:
    `(-log_likelihood / D - log h) / log 2` with `h = 2 / (k - 1)` the bin width of
    `k = num_levels` levels in [-1, 1] (`dequantize`); see `ode_bits_per_dim` for
    the bound this is and its terms. For `k = 256` the offset is `log2(127.5) =
    6.994` bits, not the 7 of conventions with bins of width `2 / k`.
    `log_likelihood` is in nats over `num_dims` dimensions, as `ode_log_likelihood`
    returns it for `input_space="data"`.
    """
    _check_positive_int("bits_per_dim", "num_dims", num_dims)
    _check_num_levels("bits_per_dim", num_levels)
    log_likelihood = jnp.asarray(log_likelihood, jnp.result_type(log_likelihood, float))
    nats_per_dim = -log_likelihood / num_dims
    return (nats_per_dim - _log_bin_width(num_levels)) / math.log(2.0)
