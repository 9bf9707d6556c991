"""The weighted loss, the continuous-time ELBO and the paper's main result.

A denoiser is any callable `model(z, logsnr) -> eps_hat` on one example: a network or
the oracle `elbo_core.analytic.GaussianMixture`. Everything here holds for every
denoiser, good or bad.

**Weighted loss** (PAPER.md section 2), over a fixed range `[logsnr_min, logsnr_max]`:

    L_w(x) = 1/2 Int w(logsnr) E_eps ||eps_hat(z; logsnr) - eps||^2 dlogsnr
           = E_{logsnr ~ p, eps} [ 1/2 (w / p) ||eps_hat - eps||^2 ],

for any proposal `p` (a `Schedule` on the same range): the schedule is an importance
sampling distribution and changes the variance, never the mean.

**ELBO** (Kingma et al. 2021; PAPER.md section 2, `w = 1`):

    -ELBO(x) = KL(q(z_min | x) || N(0, I))          (prior)
             + E_q [-log p(x | z_max)]              (reconstruction)
             + 1/2 Int E_eps ||eps - eps_hat||^2 dlogsnr    (diffusion)

**Main result** (PAPER.md section 4). With the truncated loss

    L(logsnr; x) = KL(q(z_min | x) || N(0, I)) + 1/2 Int_{min}^{logsnr} E_eps ||eps -
    eps_hat||^2 dlogsnr',

(`L(t; x)` is `L(logsnr(t); x)` for any schedule), integration by parts gives, for any
weighting,

    L_w(x) = Int (-dw/dlogsnr) L(logsnr; x) dlogsnr
             + w(max) L(max; x) - w(min) L(min; x),

where the first term is `Int_0^1 (dw/dt) L(t; x) dt` in time (`by_parts` computes
either form) and the last is a model-independent constant (`L(min; x)` is the prior
KL). For a non-increasing `w`,
`L_w(x) = w(min) E_{logsnr ~ p_w} [L(logsnr; x)] - w(min) L(min; x)`
(`implied_constant`, `compare_implied_constants`).

Both Monte Carlo estimators (with standard errors that respect how the draws were
coupled) and deterministic quadrature versions are provided: composite Gauss-Legendre
in logsnr or in time, and Gauss-Hermite, composite Gauss-Legendre or a fixed set of
draws for the expectation over `eps`.
"""

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, Scalar, ScalarLike

from . import process
from .schedules import Linear, PiecewiseConstant, Schedule
from .weighting import (
    ELBO,
    MONOTONIC_CHECK_POINTS,
    MONOTONIC_SLOPE_ULPS,
    EDMMonotonic,
    MinSNR,
    Shifted,
    Weighting,
)

__all__ = [
    "DECODERS",
    "SAMPLING_METHODS",
    "ByParts",
    "ConstantComparison",
    "ELBOTerms",
    "ImpliedConstant",
    "IntegrandMoments",
    "MonteCarloEstimate",
    "PerturbedDenoiser",
    "augmentation_constant",
    "by_parts",
    "check_proposal",
    "compare_implied_constants",
    "data_quadrature",
    "denoising_error",
    "draw_uniforms",
    "dweight_dt",
    "dweight_masses",
    "eps_panel_quadrature",
    "eps_quadrature",
    "expected_negative_elbo",
    "expected_truncated_loss",
    "gaussian_elbo_terms",
    "implied_constant",
    "integrand_moments",
    "logsnr_quadrature",
    "negative_elbo",
    "negative_elbo_quadrature",
    "prior_kl",
    "reconstruction",
    "time_quadrature",
    "truncated_loss",
    "weighted_loss",
    "weighted_loss_batch",
    "weighted_loss_quadrature",
    "weighted_loss_term",
    "weighting_breakpoints",
]

Denoiser = Callable[..., Any]

DECODERS = ("gaussian", "discrete")
SAMPLING_METHODS = ("iid", "stratified", "low_discrepancy", "antithetic")

# Nodes per panel of composite Gauss-Legendre quadrature in logsnr: exact for
# polynomials of degree 15 on each panel.
GAUSS_LEGENDRE_ORDER = 8
# Gauss-Hermite nodes per dimension for expectations over eps: the integrands are
# smooth, and 1-D expectations (the discretised decoder) converge long before this.
NUM_HERMITE = 8
DECODER_HERMITE = 64
# A product Gauss-Hermite grid larger than this is refused: pass fixed draws instead.
MAX_HERMITE_POINTS = 2**16
# Relative tolerance when a proposal's range is compared with the loss's range.
RANGE_RTOL = 1e-9
# Distance from the grid of k levels tolerated for discrete data, in bin widths.
GRID_TOLERANCE = 1e-3
# Grid on which the positive and negative parts of dw/dlogsnr are measured.
DWEIGHT_GRID_POINTS = 20001
# Bins narrower than this (in decoder-noise units) use the midpoint expansion.
NARROW_BIN = 1e-3
# Outer nodes processed together in nested quadratures (memory, not accuracy).
OUTER_BATCH = 16
# Nodes of the nested rule for `L(logsnr; x)` in `by_parts` and `implied_constant`:
# 25 panels against the outer rule's 32 (256 nodes), so that even the row `w = 1`,
# where both sides reduce to one integral of the denoising error, compares two
# different rules rather than a sum with itself.
NUM_INNER = 200
# Composite Gauss-Legendre for E over eps covers [-EPS_PANEL_RANGE, EPS_PANEL_RANGE]
# per coordinate; the normal mass outside is 2 Phi(-12) = 3.6e-33.
EPS_PANEL_RANGE = 12.0
# Independent replicates that the standard error of stratified or low-discrepancy
# draws is estimated from by default (the largest divisor of the number of draws up
# to this): 31 degrees of freedom keep P(|t| > 4) near 4e-4, and each replicate still
# spreads num_samples / 32 draws over its own strata.
COUPLED_REPLICATES = 32
# Below this alpha^2 the prior KL uses its power series (see `prior_kl`).
PRIOR_SERIES_THRESHOLD = 0.05
PRIOR_SERIES_TERMS = 12


def _float_dtype():
    return jnp.result_type(float)


def _as_float(x) -> Array:
    return jnp.asarray(x, dtype=jnp.result_type(x, float))


def _check_range(owner: str, logsnr_min: float, logsnr_max: float) -> None:
    if not (math.isfinite(logsnr_min) and math.isfinite(logsnr_max)):
        raise ValueError(
            f"{owner}: logsnr_min={logsnr_min} and logsnr_max={logsnr_max} must both "
            "be finite numbers."
        )
    if not logsnr_min < logsnr_max:
        raise ValueError(
            f"{owner}: logsnr_min={logsnr_min} must be below logsnr_max={logsnr_max}."
        )


def _check_positive_int(owner: str, name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{owner}: {name}={value!r} must be an integer.")
    if value < minimum:
        raise ValueError(f"{owner}: {name}={value} must be at least {minimum}.")


# --- results --------------------------------------------------------------------------


class MonteCarloEstimate(eqx.Module):
    """A Monte Carlo estimate with its spread.

    **Fields:**

    - `mean`: the estimate (average of the per-sample terms).
    - `stderr`: its standard error, from the spread of independent units:
      `sqrt(var(units) / num_independent)` where the units are the terms for i.i.d.
      draws, the means of the pairs `(u, 1 - u)` for antithetic draws, and the means
      of the independent replicates for stratified and low-discrepancy draws (whose
      terms within a replicate are coupled, so that their spread says nothing about
      the error of their mean). NaN when there is a single unit.
    - `variance`: the sample variance of one term (the per-sample variance of the
      estimator, the quantity a proposal changes). Every term is marginally a draw
      from the proposal, so this is unbiased for i.i.d. draws and within
      `variance / (num_samples - 1)` of unbiased for coupled ones.
    - `variance_stderr`: the standard error of `variance`,
      `sqrt((m4 - variance^2) / num_samples)` with `m4` the fourth central moment
      (the i.i.d. formula; an approximation for coupled draws).
    - `num_samples`: the number of terms averaged.
    - `num_independent`: the number of independent units behind `stderr`.
    """

    mean: Float[Array, "*batch"]
    stderr: Float[Array, "*batch"]
    variance: Float[Array, "*batch"]
    variance_stderr: Float[Array, "*batch"]
    num_samples: int = eqx.field(static=True)
    num_independent: int = eqx.field(static=True)


def _independent_units(terms: Array, sampling: str, num_replicates: int) -> Array:
    """The independent averages behind the standard error (see `MonteCarloEstimate`).

    The layouts are those of `draw_uniforms`: antithetic partners `i` and `i + n/2`,
    replicates in contiguous blocks.
    """
    num_samples = terms.shape[0]
    if sampling == "antithetic":
        half = num_samples // 2
        return 0.5 * (terms[:half] + terms[half:])
    if sampling == "iid":
        return terms
    return jnp.mean(terms.reshape(num_replicates, -1), axis=1)


def _estimate(
    terms: Float[Array, " n"], sampling: str = "iid", num_replicates: int = 1
) -> MonteCarloEstimate:
    num_samples = terms.shape[0]
    mean = jnp.mean(terms)
    units = _independent_units(terms, sampling, num_replicates)
    num_units = units.shape[0]
    if num_units > 1:
        stderr = jnp.std(units, ddof=1) / math.sqrt(num_units)
    else:
        stderr = jnp.full_like(mean, jnp.nan)
    if num_samples > 1:
        variance = jnp.var(terms, ddof=1)
        fourth = jnp.mean((terms - mean) ** 4)
        variance_stderr = jnp.sqrt(jnp.maximum(fourth - variance**2, 0) / num_samples)
    else:
        variance = variance_stderr = jnp.full_like(mean, jnp.nan)
    return MonteCarloEstimate(
        mean, stderr, variance, variance_stderr, num_samples, num_units
    )


def _check_sampling(
    owner: str,
    sampling: str,
    num_samples: int,
    num_replicates: int | None,
    estimator: bool = True,
) -> int:
    """Validate a sampling method for `num_samples` draws; return the replicates.

    `num_replicates=None` means one for i.i.d. and antithetic draws and, for the
    coupled methods, the largest divisor of `num_samples` up to
    `COUPLED_REPLICATES`. An `estimator` warns when it can report no standard error.
    """
    if sampling not in SAMPLING_METHODS:
        raise ValueError(
            f"{owner}: sampling={sampling!r} is not one of {list(SAMPLING_METHODS)}."
        )
    if sampling == "antithetic" and num_samples % 2:
        raise ValueError(
            f"{owner}: antithetic sampling needs an even num_samples; got "
            f"{num_samples}."
        )
    coupled = sampling in ("stratified", "low_discrepancy")
    if num_replicates is None:
        if not coupled:
            return 1
        limit = min(COUPLED_REPLICATES, num_samples)
        num_replicates = max(r for r in range(1, limit + 1) if num_samples % r == 0)
    _check_positive_int(owner, "num_replicates", num_replicates)
    if num_replicates > 1 and not coupled:
        raise ValueError(
            f"{owner}: num_replicates={num_replicates} applies to stratified and "
            f"low_discrepancy draws only; {sampling!r} draws are independent "
            "(antithetic ones in pairs) already."
        )
    if num_samples % num_replicates:
        raise ValueError(
            f"{owner}: num_samples={num_samples} must be a multiple of "
            f"num_replicates={num_replicates}, one equal block of draws per replicate."
        )
    if estimator and coupled and num_replicates == 1:
        warnings.warn(
            f"{owner}: {sampling} draws in a single replicate have no standard error "
            "(it is NaN); pass num_replicates >= 2 to estimate one.",
            stacklevel=3,
        )
    return num_replicates


class ELBOTerms(eqx.Module):
    """The three terms of the negative continuous-time ELBO, in nats.

    **Fields:**

    - `prior`: `KL(q(z_min | x) || N(0, I))`.
    - `reconstruction`: `E_q [-log p(x | z_max)]`.
    - `diffusion`: `1/2 Int E ||eps - eps_hat||^2 dlogsnr`.
    - `diffusion_stderr`: the Monte Carlo standard error of `diffusion` (zero for
      the quadrature version; the other two terms are computed deterministically).
    - `num_dims`: the number of dimensions of one example, for bits per dimension.

    Scalars for one example; arrays of the batch shape after `jax.vmap`.
    """

    prior: Float[Array, "*batch"]
    reconstruction: Float[Array, "*batch"]
    diffusion: Float[Array, "*batch"]
    diffusion_stderr: Float[Array, "*batch"]
    num_dims: int = eqx.field(static=True)

    @property
    def total(self) -> Float[Array, "*batch"]:
        """`-ELBO`, the sum of the three terms, in nats."""
        return self.prior + self.reconstruction + self.diffusion

    def bits_per_dim(self) -> dict[str, Float[Array, "*batch"]]:
        """The terms in bits per dimension, `nats / (num_dims log 2)`.

        Keys `bpd` (the total), `bpd_prior`, `bpd_recon`, `bpd_diff` and
        `bpd_diff_stderr`. With the discretised decoder these are bits per dimension
        of the discrete data directly. With the Gaussian decoder they are of a
        density; see `reconstruction` for the offset that makes them comparable.
        """
        scale = 1.0 / (self.num_dims * math.log(2.0))
        return {
            "bpd": self.total * scale,
            "bpd_prior": self.prior * scale,
            "bpd_recon": self.reconstruction * scale,
            "bpd_diff": self.diffusion * scale,
            "bpd_diff_stderr": self.diffusion_stderr * scale,
        }


# --- quadrature rules -----------------------------------------------------------------


def _panel_counts(lengths: Sequence[float], num_panels: int) -> list[int]:
    """Split `num_panels` over segments in proportion to length, at least one each.

    The counts add up to `max(num_panels, len(lengths))` (largest remainders get
    the spare panels), so the number of nodes does not depend on where the
    breakpoints fall and compiled code is reused across weightings.
    """
    num_panels = max(num_panels, len(lengths))
    total = sum(lengths)
    shares = [num_panels * length / total for length in lengths]
    counts = [max(1, math.floor(share)) for share in shares]
    spare = num_panels - sum(counts)
    order = sorted(
        range(len(lengths)), key=lambda i: shares[i] - counts[i], reverse=True
    )
    for i in order[:spare] if spare > 0 else ():
        counts[i] += 1
    while sum(counts) > num_panels:  # segments forced up to one panel
        i = max(range(len(counts)), key=lambda j: counts[j])
        counts[i] -= 1
    return counts


def _panel_edges(
    logsnr_min: float, logsnr_max: float, num_points: int, breakpoints: Sequence[float]
) -> np.ndarray:
    """Panel edges of `logsnr_quadrature`: equal panels between the breakpoints."""
    cuts = sorted({float(b) for b in breakpoints if logsnr_min < float(b) < logsnr_max})
    edges = [float(logsnr_min), *cuts, float(logsnr_max)]
    lengths = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
    num_panels = max(1, round(num_points / GAUSS_LEGENDRE_ORDER))
    counts = _panel_counts(lengths, num_panels)
    pieces = [
        np.linspace(a, b, count + 1)[:-1]
        for a, b, count in zip(edges[:-1], edges[1:], counts, strict=True)
    ]
    return np.concatenate([*pieces, [float(logsnr_max)]])


def _panel_rule(edges: np.ndarray) -> tuple[Array, Array]:
    """Gauss-Legendre with `GAUSS_LEGENDRE_ORDER` nodes on every panel of `edges`."""
    unit_nodes, unit_weights = np.polynomial.legendre.leggauss(GAUSS_LEGENDRE_ORDER)
    half = 0.5 * np.diff(edges)[:, None]
    nodes = edges[:-1, None] + half * (unit_nodes + 1)
    weights = half * unit_weights
    dtype = _float_dtype()
    return jnp.asarray(nodes.ravel(), dtype), jnp.asarray(weights.ravel(), dtype)


def logsnr_quadrature(
    logsnr_min: float,
    logsnr_max: float,
    *,
    num_points: int = 256,
    breakpoints: Sequence[float] = (),
) -> tuple[Float[Array, " num_nodes"], Float[Array, " num_nodes"]]:
    """Composite Gauss-Legendre nodes and weights on `[logsnr_min, logsnr_max]`.

    `Int f dlogsnr ~ sum_i weights_i f(nodes_i)`. The range is cut at `breakpoints`
    (kinks of a weighting, see `weighting_breakpoints`) that fall strictly inside it,
    and each piece into equal panels of `GAUSS_LEGENDRE_ORDER` nodes, about
    `num_points / GAUSS_LEGENDRE_ORDER` panels in all. On every panel where the
    integrand is smooth, the error falls like the panel width to the power 16.

    **Returns:** `(nodes, weights)`, increasing in logsnr.
    """
    _check_range("logsnr_quadrature", logsnr_min, logsnr_max)
    _check_positive_int("logsnr_quadrature", "num_points", num_points)
    return _panel_rule(_panel_edges(logsnr_min, logsnr_max, num_points, breakpoints))


def time_quadrature(
    schedule: Schedule, *, num_points: int = 256, breakpoints: Sequence[float] = ()
) -> tuple[Float[Array, " num_nodes"], Float[Array, " num_nodes"]]:
    """Composite Gauss-Legendre nodes and weights in time `t` on `[0, 1]`.

    `Int_0^1 f(t) dt ~ sum_i weights_i f(t_i)`, for integrands along `schedule`
    such as `(dw/dt) L(t; x)`. A schedule packs wide stretches of logsnr into short
    stretches of `t` (the cosine schedule's tails into layers of width ~1e-3 at
    both ends), so equal panels in `t` resolve them poorly: the panel edges are
    placed at the times `schedule.t_of_logsnr` of the edges of `logsnr_quadrature`
    (equal panels in logsnr, cut at `breakpoints`). The nodes inside each panel are
    Gauss-Legendre in `t`, not the images of those in logsnr, so the rule differs
    from the logsnr rule except for the linear schedule.

    **Returns:** `(t, weights)`, increasing in `t`.
    """
    if not isinstance(schedule, Schedule):
        raise ValueError(
            f"time_quadrature: schedule must be a Schedule; got "
            f"{type(schedule).__name__}."
        )
    _check_positive_int("time_quadrature", "num_points", num_points)
    logsnr_edges = _panel_edges(
        schedule.logsnr_min, schedule.logsnr_max, num_points, breakpoints
    )
    times = np.asarray(_times_of(schedule, jnp.asarray(logsnr_edges)), dtype=float)
    # logsnr increases along the edges, so t decreases; the ends are exact.
    edges = np.concatenate([[0.0], times[::-1][1:-1], [1.0]])
    if not np.all(np.diff(edges) > 0):
        raise ValueError(
            f"time_quadrature: {type(schedule).__name__} maps the panel edges to "
            "times that are not strictly increasing; use fewer points."
        )
    return _panel_rule(edges)


@eqx.filter_jit
def _times_of(schedule, logsnr):
    return jax.vmap(schedule.t_of_logsnr)(logsnr)


def _unit_quadrature(num_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Composite Gauss-Legendre on [0, 1] with about `num_points` nodes."""
    num_panels = max(1, round(num_points / GAUSS_LEGENDRE_ORDER))
    unit_nodes, unit_weights = np.polynomial.legendre.leggauss(GAUSS_LEGENDRE_ORDER)
    lo = np.arange(num_panels)[:, None] / num_panels
    half = 0.5 / num_panels
    nodes = (lo + half * (unit_nodes + 1)).ravel()
    weights = np.broadcast_to(half * unit_weights, (num_panels, unit_weights.size))
    return nodes, weights.ravel()


def _product_rule(
    owner: str, shape: tuple[int, ...], unit_nodes: np.ndarray, unit_prob: np.ndarray
) -> tuple[Array, Array]:
    """The product of a 1-D rule for `N(0, 1)` over every coordinate of `shape`."""
    num_dims = math.prod(shape)
    num_points = unit_nodes.size**num_dims
    if num_points > MAX_HERMITE_POINTS:
        raise ValueError(
            f"{owner}: a product rule of {unit_nodes.size} nodes in {num_dims} "
            f"dimensions has {num_points} points, more than "
            f"MAX_HERMITE_POINTS={MAX_HERMITE_POINTS}; pass a fixed array of eps draws "
            "of shape (num_eps, *x.shape) instead."
        )
    grids = np.meshgrid(*([unit_nodes] * num_dims), indexing="ij")
    probs = np.meshgrid(*([unit_prob] * num_dims), indexing="ij")
    eps = np.stack([g.ravel() for g in grids], axis=-1).reshape(num_points, *shape)
    prob = np.prod(np.stack([p.ravel() for p in probs], axis=-1), axis=-1)
    dtype = _float_dtype()
    return jnp.asarray(eps, dtype), jnp.asarray(prob, dtype)


def eps_quadrature(
    shape: tuple[int, ...], *, num_hermite: int = NUM_HERMITE
) -> tuple[Float[Array, " num_eps *shape"], Float[Array, " num_eps"]]:
    """Product Gauss-Hermite rule for expectations over `eps ~ N(0, I)` of `shape`.

    `E_eps f(eps) ~ sum_i prob_i f(eps_i)`, exact for polynomials of degree up to
    `2 num_hermite - 1` in each coordinate. The grid has `num_hermite^D` points, so
    it suits low-dimensional data; beyond `MAX_HERMITE_POINTS` points pass a fixed
    set of draws to the quadrature functions instead.

    **Returns:** `(eps, prob)` with `eps` of shape `(num_hermite^D, *shape)` and
    probabilities summing to one.
    """
    _check_positive_int("eps_quadrature", "num_hermite", num_hermite)
    unit_nodes, unit_weights = np.polynomial.hermite_e.hermegauss(num_hermite)
    unit_prob = unit_weights / math.sqrt(2 * math.pi)
    return _product_rule("eps_quadrature", shape, unit_nodes, unit_prob)


def eps_panel_quadrature(
    shape: tuple[int, ...], *, num_panels: int = 48
) -> tuple[Float[Array, " num_eps *shape"], Float[Array, " num_eps"]]:
    """Composite Gauss-Legendre rule for expectations over `eps ~ N(0, I)`.

    Per coordinate, `num_panels` equal panels of `GAUSS_LEGENDRE_ORDER` nodes on
    `[-EPS_PANEL_RANGE, EPS_PANEL_RANGE]`, with the normal density folded into the
    weights. Gauss-Hermite converges fast for smooth integrands but stalls (near
    1e-7 relative for the ELBO of data on a few levels) when the integrand switches
    sharply in `eps`, as the posterior over well-separated discrete values does at
    high logsnr; local panels resolve the switch. Pass the result as
    `eps=..., eps_prob=...`.

    **Returns:** `(eps, prob)` with `(GAUSS_LEGENDRE_ORDER num_panels)^D` points;
    `prob` sums to one up to the mass beyond the range.
    """
    _check_positive_int("eps_panel_quadrature", "num_panels", num_panels)
    unit_nodes, unit_weights = np.polynomial.legendre.leggauss(GAUSS_LEGENDRE_ORDER)
    edges = np.linspace(-EPS_PANEL_RANGE, EPS_PANEL_RANGE, num_panels + 1)
    half = 0.5 * np.diff(edges)[:, None]
    nodes = (edges[:-1, None] + half * (unit_nodes + 1)).ravel()
    weights = (half * unit_weights).ravel()
    prob = weights * np.exp(-0.5 * nodes**2) / math.sqrt(2 * math.pi)
    return _product_rule("eps_panel_quadrature", shape, nodes, prob)


def _resolve_eps(
    shape: tuple[int, ...], eps, num_hermite: int, eps_prob=None
) -> tuple[Array, Array]:
    """The rule over `eps`: Gauss-Hermite when `eps` is None, else the given nodes.

    Given nodes carry `eps_prob` (a rule such as `eps_panel_quadrature`) or, by
    default, equal weights (draws).
    """
    if eps is None:
        if eps_prob is not None:
            raise ValueError(
                "eps_prob was given without eps: pass both (the nodes and their "
                "probabilities) or neither (Gauss-Hermite)."
            )
        return eps_quadrature(shape, num_hermite=num_hermite)
    eps = _as_float(eps)
    if eps.ndim < 1 or eps.shape[1:] != tuple(shape) or eps.shape[0] < 1:
        raise ValueError(
            f"eps draws must have shape (num_eps, *x.shape) = (num_eps, "
            f"{', '.join(map(str, shape))}); got {eps.shape}."
        )
    if eps_prob is None:
        prob = jnp.full((eps.shape[0],), 1.0 / eps.shape[0], eps.dtype)
    else:
        prob = _as_float(eps_prob)
        if prob.shape != (eps.shape[0],):
            raise ValueError(
                f"eps_prob must have shape (num_eps,) = ({eps.shape[0]},), one "
                f"probability per eps node; got {prob.shape}."
            )
    return eps, prob


# --- the terms of the ELBO ------------------------------------------------------------


def _softplus_minus_sigmoid(logsnr: Array) -> Array:
    """`-log(sigma^2) - alpha^2 = -log(1 - a) - a` with `a = sigmoid(logsnr)`."""
    a = jax.nn.sigmoid(logsnr)
    # NOTE: both terms are about `a` for very negative logsnr and cancel to `a^2/2`;
    # below the threshold the power series `sum_{k>=2} a^k / k` keeps full relative
    # precision (truncation error below a^13 / 13, under 1e-15 relative).
    small = jnp.minimum(a, PRIOR_SERIES_THRESHOLD)
    series = sum(small**k / k for k in range(2, PRIOR_SERIES_TERMS + 2))
    direct = jax.nn.softplus(logsnr) - a
    return jnp.where(a < PRIOR_SERIES_THRESHOLD, series, direct)


def prior_kl(x: Float[ArrayLike, "*shape"], logsnr_min: ScalarLike) -> Scalar:
    """Prior term `KL(q(z_min | x) || N(0, I))` in nats.

    `1/2 sum_i (alpha^2 x_i^2 + sigma^2 - 1 - log sigma^2)
     = 1/2 [alpha^2 ||x||^2 + D (-log sigma^2 - alpha^2)]` at `logsnr_min`,
    computed so that it stays accurate (and non-negative) for `logsnr_min` down to
    -40 and below.
    """
    x = _as_float(x)
    logsnr_min = jnp.asarray(logsnr_min, x.dtype)
    alpha2 = jnp.exp(process.log_alpha2(logsnr_min))
    num_dims = x.size
    return 0.5 * (
        alpha2 * jnp.sum(x**2) + num_dims * _softplus_minus_sigmoid(logsnr_min)
    )


def _log1mexp(x: Array) -> Array:
    """`log(1 - exp(x))` for `x <= 0`, accurate at both ends."""
    return jnp.where(
        x > -math.log(2.0),
        jnp.log(-jnp.expm1(jnp.minimum(x, -1e-300))),
        jnp.log1p(-jnp.exp(jnp.minimum(x, 0.0))),
    )


def _log_bin_probability(lower: Array, upper: Array) -> Array:
    """`log(Phi(upper) - Phi(lower))` for finite `lower < upper`, in log space."""
    # NOTE: the interval is reflected into the lower half-line, where log_ndtr keeps
    # full relative precision; the difference of CDFs is then a log1mexp.
    flip = lower + upper > 0
    lo = jnp.where(flip, -upper, lower)
    hi = jnp.where(flip, -lower, upper)
    log_hi = log_ndtr(hi)
    return log_hi + _log1mexp(log_ndtr(lo) - log_hi)


def _discrete_nll(
    level: Array, eps: Array, half_width: Array, num_levels: int
) -> Array:
    """`-log p(x | z)` of one coordinate on bin `level` (0 .. k-1), `z` from `eps`.

    `half_width` is the bin half-width in units of the decoder scale,
    `h alpha / sigma`; the bin is `[-half_width - eps, half_width - eps]` in standard
    units, open-ended for the first and last levels.
    """
    upper = half_width - eps
    lower = -half_width - eps
    first = level <= 0
    last = level >= num_levels - 1
    # NOTE: for a bin much narrower than the decoder scale (logsnr_max very
    # negative) the two bounds agree to working precision and their CDFs cancel;
    # there the mass is `2 c phi(eps) (1 + (eps^2 - 1) c^2 / 6 + O(c^4))`,
    # `c = half_width`, whose truncation error is below 1e-12 for c < 1e-3.
    narrow = half_width < NARROW_BIN
    c = jnp.minimum(half_width, NARROW_BIN)
    log_narrow = (
        jnp.log(2 * c)
        - 0.5 * eps**2
        - 0.5 * math.log(2 * math.pi)
        + jnp.log1p((eps**2 - 1) * c**2 / 6)
    )
    interior = jnp.where(narrow, log_narrow, _log_bin_probability(lower, upper))
    return -jnp.where(
        first, log_ndtr(upper), jnp.where(last, log_ndtr(-lower), interior)
    )


def _check_on_grid(x: Array, num_levels: int) -> Array:
    """The level index of every coordinate; an error at run time if off the grid."""
    position = (x + 1) * (num_levels - 1) / 2
    level = jnp.round(position)
    off_grid = jnp.abs(position - level) > GRID_TOLERANCE
    outside = (level < 0) | (level > num_levels - 1)
    level = eqx.error_if(
        level,
        jnp.any(outside | off_grid),
        f"discrete decoder: every coordinate of x must be one of the {num_levels} "
        f"levels -1 + 2 i / {num_levels - 1} in [-1, 1]",
    )
    return jnp.clip(level, 0, num_levels - 1)


def _check_decoder(owner: str, decoder: str, num_levels: int) -> None:
    if decoder not in DECODERS:
        raise ValueError(
            f"{owner}: decoder={decoder!r} is not one of {list(DECODERS)}: 'gaussian' "
            "for continuous data, 'discrete' for data on num_levels levels in [-1, 1]."
        )
    if decoder == "discrete":
        _check_positive_int(owner, "num_levels", num_levels, minimum=2)


def reconstruction(
    x: Float[ArrayLike, "*shape"],
    logsnr_max: ScalarLike,
    *,
    decoder: str = "gaussian",
    num_levels: int = 256,
    decoder_hermite: int = DECODER_HERMITE,
) -> Scalar:
    """Reconstruction term `E_{z ~ q(z_max | x)} [-log p(x | z)]` in nats.

    The decoder has no parameters: it reads `x` off `z / alpha`, whose noise has
    scale `sigma / alpha = exp(-logsnr_max / 2)`.

    - `decoder="gaussian"`: the density `p(x | z) = N(x; z / alpha, sigma^2 / alpha^2
      I)`, so the term is `D/2 (log(2 pi) - logsnr_max + 1)` exactly, for any `x`.
      The ELBO is then a bound on a density: its bits per dimension can be negative.
      For data quantised to `k` levels in [-1, 1] (bin width `2 / (k - 1)`) and
      uniformly dequantised, add `log2((k - 1) / 2)` bits per dimension to compare
      with discrete likelihoods (`log2 127.5 = 6.994` bits for 8-bit images; see
      `likelihood.ode_bits_per_dim` on the 7 bits of other conventions).
    - `decoder="discrete"`: the probability of the bin of `x` among `num_levels`
      levels `-1 + 2 i / (k - 1)`, `Phi((x + h - z/alpha) alpha/sigma) - Phi((x - h -
      z/alpha) alpha/sigma)` with `h = 1 / (k - 1)`, the end bins open to infinity.
      This is a probability mass: its bits per dimension, `nats / (D log 2)`, are
      those of the discrete data and need no dequantisation offset. Each bin is
      formed as a difference of normal CDFs in log space (`log_ndtr`), finite for
      every `logsnr_max` in [-40, 40].

    The expectation over `z` factorises into one-dimensional expectations over each
    coordinate's noise, which are computed by Gauss-Hermite quadrature with
    `decoder_hermite` nodes (deterministic, no Monte Carlo error). The ELBO
    functions pass their own `decoder_hermite` here; their `num_hermite`, where
    they have one, is the rule for the diffusion term's expectation over `eps`.

    **Raises:** `ValueError` for an unknown decoder; at run time (`eqx.error_if`)
    when discrete data are off the grid of levels.
    """
    _check_decoder("reconstruction", decoder, num_levels)
    x = _as_float(x)
    logsnr_max = jnp.asarray(logsnr_max, x.dtype)
    num_dims = x.size
    if decoder == "gaussian":
        return 0.5 * num_dims * (math.log(2 * math.pi) - logsnr_max + 1.0)

    _check_positive_int("reconstruction", "decoder_hermite", decoder_hermite)
    return _discrete_reconstruction(x, logsnr_max, num_levels, decoder_hermite)


@eqx.filter_jit
def _discrete_reconstruction(x, logsnr_max, num_levels, decoder_hermite):
    level = _check_on_grid(x.ravel(), num_levels)
    unit_nodes, unit_weights = np.polynomial.hermite_e.hermegauss(decoder_hermite)
    eps = jnp.asarray(unit_nodes, x.dtype)
    prob = jnp.asarray(unit_weights / math.sqrt(2 * math.pi), x.dtype)
    # h alpha / sigma = exp(log h + logsnr / 2), formed in log space.
    half_width = jnp.exp(-math.log(num_levels - 1) + logsnr_max / 2)
    nll = _discrete_nll(level[:, None], eps[None, :], half_width, num_levels)
    return jnp.sum(nll @ prob)


# --- the weighted loss, Monte Carlo ---------------------------------------------------


def check_proposal(proposal: Schedule, logsnr_min: float, logsnr_max: float) -> None:
    """Raise `ValueError` unless `proposal` spans exactly `[logsnr_min, logsnr_max]`.

    The weighted loss is an integral over a fixed range; a proposal on another range
    would estimate a different integral.
    """
    if not isinstance(proposal, Schedule):
        raise ValueError(
            f"proposal must be a Schedule (see elbo_core.schedules); got "
            f"{type(proposal).__name__}."
        )
    _check_range("weighted loss", logsnr_min, logsnr_max)
    scale = max(abs(logsnr_min), abs(logsnr_max), 1.0)
    for name, have, want in (
        ("logsnr_min", proposal.logsnr_min, logsnr_min),
        ("logsnr_max", proposal.logsnr_max, logsnr_max),
    ):
        if abs(have - want) > RANGE_RTOL * scale:
            raise ValueError(
                f"proposal {type(proposal).__name__} has {name}={have}, but the loss "
                f"is over [{logsnr_min}, {logsnr_max}]; build the proposal on the same "
                "range (it must be a density on exactly that range to be unbiased)."
            )


def draw_uniforms(
    num_samples: int,
    *,
    sampling: str = "iid",
    num_replicates: int = 1,
    key: PRNGKeyArray,
) -> Float[Array, " num_samples"]:
    """Uniforms in [0, 1) to be mapped through a schedule, one per sample.

    Every draw is marginally `U(0, 1)`, so every term built from it is unbiased;
    the methods differ in how the draws are spread jointly:

    - `"iid"`: independent.
    - `"stratified"`: one draw in each of `num_samples` equal strata, the strata
      randomly assigned to positions (so that position `i` of a batch is not tied to
      stratum `i`).
    - `"low_discrepancy"`: `(u0 + i / num_samples) mod 1` with one shared `u0`
      (Kingma et al. 2021).
    - `"antithetic"`: `u` in the first half and `1 - u` in the second, so that
      draws `i` and `i + num_samples / 2` are partners; `num_samples` must be even.

    With `num_replicates > 1` (stratified and low-discrepancy draws only) the draws
    are that many independent blocks of `num_samples / num_replicates` consecutive
    positions, each stratified or shifted on its own: the spread of the block means
    is then an honest standard error (see `MonteCarloEstimate`).
    """
    _check_positive_int("draw_uniforms", "num_samples", num_samples)
    num_replicates = _check_sampling(
        "draw_uniforms", sampling, num_samples, num_replicates, estimator=False
    )
    dtype = _float_dtype()
    if sampling == "iid":
        return jax.random.uniform(key, (num_samples,), dtype)
    if sampling == "antithetic":
        u = jax.random.uniform(key, (num_samples // 2,), dtype)
        return jnp.concatenate([u, 1.0 - u])

    size = num_samples // num_replicates
    replicate_keys = jax.random.split(key, num_replicates)
    if sampling == "stratified":

        def block(replicate_key):
            permutation_key, offset_key = jax.random.split(replicate_key)
            strata = jax.random.permutation(permutation_key, size)
            offsets = jax.random.uniform(offset_key, (size,), dtype)
            return (strata + offsets) / size

    else:

        def block(replicate_key):
            u0 = jax.random.uniform(replicate_key, (), dtype)
            return jnp.mod(u0 + jnp.arange(size, dtype=dtype) / size, 1.0)

    return jax.vmap(block)(replicate_keys).reshape(num_samples)


def weighted_loss_term(
    model: Denoiser,
    x: Float[ArrayLike, "*shape"],
    logsnr: ScalarLike,
    *,
    weighting: Weighting,
    proposal: Schedule,
    key: PRNGKeyArray,
) -> Scalar:
    """One importance-sampled term of the weighted loss at a drawn `logsnr`.

    `1/2 (w(logsnr) / p(logsnr)) ||eps_hat(z; logsnr) - eps||^2` with
    `z = alpha x + sigma eps`, `eps ~ N(0, I)` drawn here and `logsnr` drawn by the
    caller from `proposal` (`proposal.sample`, or `draw_uniforms` mapped through
    `proposal.logsnr_from_uniform` for stratified draws across a batch). Its
    expectation is `L_w(x)` on the proposal's range for every proposal.

    This is the per-example training loss: `jax.vmap` it over a batch.
    """
    x = _as_float(x)
    logsnr = jnp.asarray(logsnr, x.dtype)
    z, eps = process.sample_q(x, logsnr, key=key)
    eps_hat = model(z, logsnr)
    # NOTE: the importance weight w / p is formed from logs, so it is finite
    # whenever the ratio itself is representable. A proposal with light tails
    # spread over a wide range can make the ratio overflow float32 (~e^88) at
    # the ends, e.g. the EDM schedule on [-40, 40], where p(40) ~ e^-124: use
    # float64 or a range that the proposal covers.
    log_ratio = weighting.log_weight(logsnr) - proposal.log_density(logsnr)
    return 0.5 * jnp.exp(log_ratio) * jnp.sum((eps_hat - eps) ** 2)


# NOTE: the Monte Carlo estimators draw the levels and their importance weights in
# one compiled function (per proposal and weighting) and evaluate the model in
# another (per model), so that trying many proposals compiles the model once.


@eqx.filter_jit
def _importance_levels(weighting, proposal, num_samples, sampling, num_replicates, key):
    """Levels drawn from the proposal and their log importance weights `log(w/p)`."""
    u = draw_uniforms(
        num_samples, sampling=sampling, num_replicates=num_replicates, key=key
    )
    logsnr = proposal.logsnr_from_uniform(u)
    log_ratio = jax.vmap(weighting.log_weight)(logsnr)
    return logsnr, log_ratio - jax.vmap(proposal.log_density)(logsnr)


@eqx.filter_jit
def _importance_terms(model, x, logsnr, log_ratio, key, batched):
    """`1/2 exp(log_ratio) ||eps_hat - eps||^2` at each level, as `weighted_loss_term`.

    `x` is one example shared by all levels, or one example per level if `batched`.
    """
    keys = jax.random.split(key, logsnr.shape[0])

    def term(example, level, level_log_ratio, noise_key):
        z, eps = process.sample_q(example, level, key=noise_key)
        error = jnp.sum((model(z, level) - eps) ** 2)
        return 0.5 * jnp.exp(level_log_ratio) * error

    in_axes = (0 if batched else None, 0, 0, 0)
    return jax.vmap(term, in_axes=in_axes)(x, logsnr, log_ratio, keys)


def _weighted_loss_terms(
    model, x, weighting, proposal, num_samples, sampling, num_replicates, key
):
    uniform_key, noise_key = jax.random.split(key)
    logsnr, log_ratio = _importance_levels(
        weighting, proposal, num_samples, sampling, num_replicates, uniform_key
    )
    return _importance_terms(model, x, logsnr, log_ratio, noise_key, False)


def weighted_loss(
    model: Denoiser,
    x: Float[ArrayLike, "*shape"],
    *,
    weighting: Weighting,
    proposal: Schedule,
    logsnr_min: float,
    logsnr_max: float,
    num_samples: int = 1,
    sampling: str = "iid",
    num_replicates: int | None = None,
    key: PRNGKeyArray,
) -> MonteCarloEstimate:
    """Monte Carlo estimate of the weighted loss `L_w(x)` of one example.

    `L_w(x) = 1/2 Int_{min}^{max} w E_eps ||eps_hat - eps||^2 dlogsnr`
    (PAPER.md section 2) estimated by `num_samples` terms of `weighted_loss_term`,
    noise levels drawn from `proposal` (any schedule on the same range) with the
    given `sampling` method (see `draw_uniforms`). Unbiased for every proposal.
    Stratified and low-discrepancy draws come in `num_replicates` independent
    replicates (by default the largest divisor of `num_samples` up to
    `COUPLED_REPLICATES`), from whose spread the standard error is computed.

    **Returns:** a `MonteCarloEstimate`; its `variance` is the per-sample variance
    under this proposal.

    **Raises:** `ValueError` when the proposal's range is not
    `[logsnr_min, logsnr_max]` or a count or method is invalid.
    """
    check_proposal(proposal, logsnr_min, logsnr_max)
    _check_positive_int("weighted_loss", "num_samples", num_samples)
    num_replicates = _check_sampling(
        "weighted_loss", sampling, num_samples, num_replicates
    )
    terms = _weighted_loss_terms(
        model,
        _as_float(x),
        weighting,
        proposal,
        num_samples,
        sampling,
        num_replicates,
        key,
    )
    return _estimate(terms, sampling, num_replicates)


# --- quadrature over logsnr and eps ---------------------------------------------------


def _eps_mse(model, x, logsnr, eps, prob):
    """`E_eps ||eps - eps_hat(alpha x + sigma eps; logsnr)||^2` over a rule."""
    alpha = process.alpha(logsnr)
    sigma = process.sigma(logsnr)

    def squared_error(eps_i):
        eps_hat = model(alpha * x + sigma * eps_i, logsnr)
        return jnp.sum((eps_hat - eps_i) ** 2)

    return jax.vmap(squared_error)(eps) @ prob


@eqx.filter_jit
def _mse_curve(model, x, logsnr, eps, prob):
    """`_eps_mse` at every node of a 1-D array of logsnr values."""
    return jax.lax.map(
        lambda level: _eps_mse(model, x, level, eps, prob),
        logsnr,
        batch_size=OUTER_BATCH,
    )


def denoising_error(
    model: Denoiser,
    x: Float[ArrayLike, "*shape"],
    logsnr: Float[ArrayLike, "*levels"],
    *,
    eps: Float[ArrayLike, " num_eps *shape"] | None = None,
    eps_prob: Float[ArrayLike, " num_eps"] | None = None,
    num_hermite: int = NUM_HERMITE,
) -> Float[Array, "*levels"]:
    """`E_eps ||eps - eps_hat(alpha x + sigma eps; logsnr)||^2` at each level.

    Twice the slope of the truncated loss, `dL(logsnr; x)/dlogsnr` (PAPER.md
    section 4); the expectation by Gauss-Hermite, or over given `eps` nodes with
    probabilities `eps_prob` (equal by default, for draws).
    """
    x = _as_float(x)
    eps, prob = _resolve_eps(x.shape, eps, num_hermite, eps_prob)
    levels = _as_float(logsnr)
    values = _mse_curve(model, x, levels.reshape(-1).astype(x.dtype), eps, prob)
    return values.reshape(levels.shape)


def weighting_breakpoints(weighting: Weighting) -> tuple[float, ...]:
    """Where `w` is continuous but not smooth, for splitting quadrature panels.

    `min_snr` has a kink at `log(gamma)`; `edm_monotonic` at its `logsnr_peak`;
    `Shifted` moves those of the weighting it wraps by its shift. The other
    weightings of `WEIGHTINGS` are smooth.
    """
    if isinstance(weighting, MinSNR):
        return (math.log(weighting.gamma),)
    if isinstance(weighting, EDMMonotonic):
        return (float(weighting.logsnr_peak),)
    if isinstance(weighting, Shifted):
        inner = weighting_breakpoints(weighting.weighting)
        return tuple(b + weighting.shift for b in inner)
    return ()


def weighted_loss_quadrature(
    model: Denoiser,
    x: Float[ArrayLike, "*shape"],
    *,
    weighting: Weighting,
    logsnr_min: float,
    logsnr_max: float,
    num_points: int = 256,
    eps: Float[ArrayLike, " num_eps *shape"] | None = None,
    eps_prob: Float[ArrayLike, " num_eps"] | None = None,
    num_hermite: int = NUM_HERMITE,
) -> Scalar:
    """Deterministic weighted loss `L_w(x)` by quadrature.

    `L_w(x) = 1/2 Int_{min}^{max} w(logsnr) E_eps ||eps_hat - eps||^2 dlogsnr`, the
    integral by composite Gauss-Legendre (`logsnr_quadrature`, split at the
    weighting's kinks), the expectation over `eps` by Gauss-Hermite with
    `num_hermite` nodes per dimension or, when `eps` is given, over those nodes with
    probabilities `eps_prob` (equal by default, for fixed draws; see
    `eps_panel_quadrature` for a rule).
    """
    x = _as_float(x)
    eps, prob = _resolve_eps(x.shape, eps, num_hermite, eps_prob)
    nodes, weights = logsnr_quadrature(
        logsnr_min,
        logsnr_max,
        num_points=num_points,
        breakpoints=weighting_breakpoints(weighting),
    )
    mse = _mse_curve(model, x, nodes, eps, prob)
    weight = _weight_values(weighting, nodes)
    return 0.5 * jnp.sum(weights * weight * mse)


# --- the ELBO -------------------------------------------------------------------------


def _elbo_checks(owner, x, logsnr_min, logsnr_max, decoder, num_levels):
    _check_range(owner, logsnr_min, logsnr_max)
    _check_decoder(owner, decoder, num_levels)
    if x.size < 1:
        raise ValueError(f"{owner}: x must have at least one element; got {x.shape}.")


def negative_elbo(
    model: Denoiser,
    x: Float[ArrayLike, "*shape"],
    *,
    logsnr_min: float,
    logsnr_max: float,
    num_samples: int = 1,
    proposal: Schedule | None = None,
    sampling: str = "iid",
    num_replicates: int | None = None,
    decoder: str = "gaussian",
    num_levels: int = 256,
    decoder_hermite: int = DECODER_HERMITE,
    key: PRNGKeyArray,
) -> ELBOTerms:
    """Monte Carlo negative continuous-time ELBO of one example, with its terms.

    `-ELBO(x) = KL(q(z_min | x) || N(0, I)) + E_q[-log p(x | z_max)]
    + 1/2 Int_{min}^{max} E_eps ||eps - eps_hat||^2 dlogsnr` (Kingma et al. 2021).

    The prior and reconstruction terms are computed deterministically (`prior_kl`,
    `reconstruction` with the chosen `decoder`, its expectation over the decoder's
    noise by Gauss-Hermite with `decoder_hermite` nodes); the diffusion term is the
    weighted loss with `w = 1`, estimated with `num_samples` noise levels from
    `proposal` (default: uniform in logsnr on the range) drawn by `sampling` in
    `num_replicates` replicates (see `weighted_loss`), and its standard error is
    reported.

    **Returns:** `ELBOTerms` in nats; `.total` and `.bits_per_dim()`.
    """
    x = _as_float(x)
    _elbo_checks("negative_elbo", x, logsnr_min, logsnr_max, decoder, num_levels)
    if proposal is None:
        proposal = Linear(logsnr_min=logsnr_min, logsnr_max=logsnr_max)
    diffusion = weighted_loss(
        model,
        x,
        weighting=ELBO(),
        proposal=proposal,
        logsnr_min=logsnr_min,
        logsnr_max=logsnr_max,
        num_samples=num_samples,
        sampling=sampling,
        num_replicates=num_replicates,
        key=key,
    )
    return ELBOTerms(
        prior=prior_kl(x, logsnr_min),
        reconstruction=reconstruction(
            x,
            logsnr_max,
            decoder=decoder,
            num_levels=num_levels,
            decoder_hermite=decoder_hermite,
        ),
        diffusion=diffusion.mean,
        diffusion_stderr=diffusion.stderr,
        num_dims=x.size,
    )


def negative_elbo_quadrature(
    model: Denoiser,
    x: Float[ArrayLike, "*shape"],
    *,
    logsnr_min: float,
    logsnr_max: float,
    num_points: int = 256,
    eps: Float[ArrayLike, " num_eps *shape"] | None = None,
    eps_prob: Float[ArrayLike, " num_eps"] | None = None,
    num_hermite: int = NUM_HERMITE,
    decoder: str = "gaussian",
    num_levels: int = 256,
    decoder_hermite: int = DECODER_HERMITE,
) -> ELBOTerms:
    """Deterministic negative continuous-time ELBO of one example, with its terms.

    The same three terms as `negative_elbo`; the diffusion term
    `1/2 Int E_eps ||eps - eps_hat||^2 dlogsnr` by composite Gauss-Legendre in
    logsnr (about `num_points` nodes) and, over `eps`, Gauss-Hermite with
    `num_hermite` nodes per dimension or the given nodes `eps` of shape
    `(num_eps, *x.shape)` with probabilities `eps_prob` (equal by default, for
    draws). The reconstruction term uses `decoder_hermite` nodes over the decoder's
    noise. `diffusion_stderr` is zero.
    """
    x = _as_float(x)
    _elbo_checks(
        "negative_elbo_quadrature", x, logsnr_min, logsnr_max, decoder, num_levels
    )
    diffusion = weighted_loss_quadrature(
        model,
        x,
        weighting=ELBO(),
        logsnr_min=logsnr_min,
        logsnr_max=logsnr_max,
        num_points=num_points,
        eps=eps,
        eps_prob=eps_prob,
        num_hermite=num_hermite,
    )
    return ELBOTerms(
        prior=prior_kl(x, logsnr_min),
        reconstruction=reconstruction(
            x,
            logsnr_max,
            decoder=decoder,
            num_levels=num_levels,
            decoder_hermite=decoder_hermite,
        ),
        diffusion=diffusion,
        diffusion_stderr=jnp.zeros_like(diffusion),
        num_dims=x.size,
    )


def expected_negative_elbo(
    model: Denoiser,
    x: Float[ArrayLike, " num_examples *shape"],
    *,
    x_prob: Float[ArrayLike, " num_examples"] | None = None,
    logsnr_min: float,
    logsnr_max: float,
    num_points: int = 256,
    eps: Float[ArrayLike, " num_eps *shape"] | None = None,
    eps_prob: Float[ArrayLike, " num_eps"] | None = None,
    num_hermite: int = NUM_HERMITE,
    decoder: str = "gaussian",
    num_levels: int = 256,
    decoder_hermite: int = DECODER_HERMITE,
) -> ELBOTerms:
    """`E_x [-ELBO(x)]` with its terms, over weighted examples, by quadrature.

    `sum_i x_prob_i ELBOTerms(x_i)` with every term from `negative_elbo_quadrature`
    (same arguments). With the nodes and probabilities of `data_quadrature` this is
    the expectation over a Gaussian mixture; with the `k` levels of discrete data and
    their probabilities it is the expected code length, which exceeds the entropy
    `-sum p log p` for every model. `x_prob` defaults to equal weights (data draws).

    **Returns:** `ELBOTerms` of scalars: the expected prior, reconstruction and
    diffusion terms (`diffusion_stderr` zero), in nats and `.bits_per_dim()`.
    """
    x = _as_float(x)
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(
            "expected_negative_elbo: x must have shape (num_examples, ...); got "
            f"{x.shape}."
        )
    if x_prob is None:
        x_prob = jnp.full((x.shape[0],), 1.0 / x.shape[0], x.dtype)
    x_prob = _as_float(x_prob)
    if x_prob.shape != (x.shape[0],):
        raise ValueError(
            f"expected_negative_elbo: x_prob must have shape ({x.shape[0]},), one "
            f"probability per example; got {x_prob.shape}."
        )
    terms = jax.vmap(
        lambda example: negative_elbo_quadrature(
            model,
            example,
            logsnr_min=logsnr_min,
            logsnr_max=logsnr_max,
            num_points=num_points,
            eps=eps,
            eps_prob=eps_prob,
            num_hermite=num_hermite,
            decoder=decoder,
            num_levels=num_levels,
            decoder_hermite=decoder_hermite,
        )
    )(x)
    return ELBOTerms(
        prior=x_prob @ terms.prior,
        reconstruction=x_prob @ terms.reconstruction,
        diffusion=x_prob @ terms.diffusion,
        diffusion_stderr=jnp.zeros((), x.dtype),
        num_dims=terms.num_dims,
    )


def gaussian_elbo_terms(
    std: float, *, logsnr_min: float, logsnr_max: float, num_dims: int = 1
) -> ELBOTerms:
    """Closed-form expected `-ELBO` terms for data `x ~ N(0, std^2 I)`, optimal model.

    Per dimension, with `a = alpha^2` at `logsnr_min`:

    - prior: `E_x KL = 1/2 (a std^2 + (-log sigma^2 - a))`;
    - reconstruction (Gaussian decoder): `1/2 (log(2 pi) - logsnr_max + 1)`;
    - diffusion: the optimal eps-MSE is `sigmoid(logsnr + log std^2)`, so
      `1/2 Int sigmoid(logsnr + log std^2) dlogsnr
       = 1/2 [softplus(max + log std^2) - softplus(min + log std^2)]`.

    As the range widens the total tends to the exact NLL
    `analytic.gaussian_nll(std)` per dimension (PAPER.md section 4).
    """
    _check_range("gaussian_elbo_terms", logsnr_min, logsnr_max)
    if not std > 0:
        raise ValueError(f"gaussian_elbo_terms: std={std} must be positive.")
    dtype = _float_dtype()
    lo = jnp.asarray(logsnr_min, dtype)
    hi = jnp.asarray(logsnr_max, dtype)
    log_var = 2 * math.log(std)
    alpha2 = jnp.exp(process.log_alpha2(lo))
    prior = 0.5 * (alpha2 * std**2 + _softplus_minus_sigmoid(lo))
    recon = 0.5 * (math.log(2 * math.pi) - hi + 1.0)
    diffusion = 0.5 * (jax.nn.softplus(hi + log_var) - jax.nn.softplus(lo + log_var))
    return ELBOTerms(
        prior=num_dims * prior,
        reconstruction=num_dims * recon,
        diffusion=num_dims * diffusion,
        diffusion_stderr=jnp.zeros_like(diffusion),
        num_dims=num_dims,
    )


# --- the truncated loss and the main result -------------------------------------------


@eqx.filter_jit
def _truncated_losses(
    model, x, levels, logsnr_min, unit_nodes, unit_weights, eps, prob
):
    """`L(logsnr; x)` at each of `levels`, each by its own Gauss-Legendre rule."""
    base = prior_kl(x, logsnr_min)

    def one(level):
        length = level - logsnr_min
        inner = logsnr_min + length * unit_nodes
        mse = jax.vmap(lambda node: _eps_mse(model, x, node, eps, prob))(inner)
        return base + 0.5 * length * jnp.sum(unit_weights * mse)

    return jax.lax.map(one, levels, batch_size=OUTER_BATCH)


def truncated_loss(
    model: Denoiser,
    x: Float[ArrayLike, "*shape"],
    logsnr: Float[ArrayLike, "*levels"],
    *,
    logsnr_min: float,
    num_points: int = 256,
    eps: Float[ArrayLike, " num_eps *shape"] | None = None,
    eps_prob: Float[ArrayLike, " num_eps"] | None = None,
    num_hermite: int = NUM_HERMITE,
) -> Float[Array, "*levels"]:
    """The loss `L(logsnr; x)` of the process truncated at `logsnr`, by quadrature.

    `L(logsnr; x) = KL(q(z_min | x) || N(0, I))
    + 1/2 Int_{min}^{logsnr} E_eps ||eps - eps_hat(z; logsnr')||^2 dlogsnr'`
    (PAPER.md section 4): the KL from the truncated forward process to the model,
    `-ELBO` of the noisy data `z` up to the entropy of `q(z | x)`. For a schedule,
    `L(t; x)` is `L(schedule.logsnr(t); x)`; `L(min; x)` is the prior KL alone.

    Each level gets its own composite Gauss-Legendre rule of about `num_points`
    nodes on `[logsnr_min, logsnr]`; the expectation over `eps` is Gauss-Hermite
    (`num_hermite` per dimension) or over given nodes `eps` with probabilities
    `eps_prob` (equal by default, for fixed draws).

    **Returns:** `L` at every given level, in nats.
    """
    x = _as_float(x)
    if not math.isfinite(logsnr_min):
        raise ValueError(f"truncated_loss: logsnr_min={logsnr_min} must be finite.")
    levels = _as_float(logsnr)
    if not isinstance(levels, jax.core.Tracer) and bool(jnp.any(levels < logsnr_min)):
        raise ValueError(
            f"truncated_loss: every level must be at least logsnr_min={logsnr_min}; "
            f"got min(logsnr)={float(jnp.min(levels))}."
        )
    eps, prob = _resolve_eps(x.shape, eps, num_hermite, eps_prob)
    return _truncated_loss_rule(model, x, logsnr, logsnr_min, num_points, eps, prob)


def _truncated_loss_rule(model, x, logsnr, logsnr_min, num_points, eps, prob):
    """`truncated_loss` with the rule over `eps` given as nodes and probabilities."""
    levels = _as_float(logsnr)
    unit_nodes, unit_weights = _unit_quadrature(num_points)
    dtype = x.dtype
    flat = levels.reshape(-1).astype(dtype)
    values = _truncated_losses(
        model,
        x,
        flat,
        jnp.asarray(logsnr_min, dtype),
        jnp.asarray(unit_nodes, dtype),
        jnp.asarray(unit_weights, dtype),
        eps.astype(dtype),
        prob.astype(dtype),
    )
    return values.reshape(levels.shape)


class ByParts(eqx.Module):
    """The weighted loss and the terms of its integration by parts, in nats.

    `weighted_loss = integral + endpoint - constant` (PAPER.md section 4), with

    - `weighted_loss`: `L_w(x) = 1/2 Int w E ||eps - eps_hat||^2 dlogsnr
      = 1/2 Int_0^1 w(logsnr_t) (-dlogsnr/dt) E ||eps - eps_hat||^2 dt`;
    - `integral`: `Int_0^1 (dw/dt) L(t; x) dt = Int (-dw/dlogsnr) L(logsnr; x)
      dlogsnr`, the ELBOs of every noise level weighted by `dw/dt`;
    - `endpoint`: `w(max) L(max; x)`, the full `-ELBO` (without reconstruction)
      weighted by `w(max)`;
    - `constant`: `w(min) L(min; x) = w(min) KL(q(z_min | x) || N(0, I))`, which
      does not depend on the model.
    """

    weighted_loss: Float[Array, "*batch"]
    integral: Float[Array, "*batch"]
    endpoint: Float[Array, "*batch"]
    constant: Float[Array, "*batch"]

    @property
    def residual(self) -> Float[Array, "*batch"]:
        """`weighted_loss - (integral + endpoint - constant)`."""
        return self.weighted_loss - (self.integral + self.endpoint - self.constant)

    @property
    def relative_residual(self) -> Float[Array, "*batch"]:
        """`|residual| / |weighted_loss|`."""
        return jnp.abs(self.residual) / jnp.abs(self.weighted_loss)


def by_parts(
    model: Denoiser,
    x: Float[ArrayLike, "*shape"],
    *,
    weighting: Weighting,
    logsnr_min: float,
    logsnr_max: float,
    num_points: int = 256,
    num_inner: int = NUM_INNER,
    eps: Float[ArrayLike, " num_eps *shape"] | None = None,
    eps_prob: Float[ArrayLike, " num_eps"] | None = None,
    num_hermite: int = NUM_HERMITE,
    breakpoints: Sequence[float] | None = None,
    schedule: Schedule | None = None,
) -> ByParts:
    """Both sides of the paper's main identity, each computed independently.

    `L_w(x) = Int (-dw/dlogsnr) L(logsnr; x) dlogsnr + w(max) L(max; x)
    - w(min) L(min; x)` holds for every weighting and every denoiser: it is
    integration by parts, not a property of good models.

    The outer integrals (of `w E||eps - eps_hat||^2` and of `(-dw/dlogsnr) L`)
    share a composite Gauss-Legendre rule of about `num_points` nodes, cut at
    `breakpoints` (by default `weighting_breakpoints(weighting)`). `dw/dlogsnr` is
    `weighting.dweight` (autodiff). `L` at every outer node, and at `logsnr_max`,
    comes from its own nested rule of about `num_inner` nodes (`truncated_loss`),
    never from rearranging the left-hand side; `num_inner` differs from
    `num_points` by default, so that for `w = 1` (where the identity reduces to
    `L_w = L(max) - L(min)`) two different rules meet. The expectation over `eps`
    uses the same nodes or draws everywhere, so it contributes no error to the
    identity.

    With a `schedule` (spanning exactly the range), both outer integrals are taken
    in time instead, by `time_quadrature`: `L_w = 1/2 Int_0^1 w(logsnr_t)
    (-dlogsnr/dt) E||eps - eps_hat||^2 dt` and `Int_0^1 (dw/dt) L(t; x) dt` with
    `dw/dt` from `dweight_dt` and `dlogsnr/dt` by autodiff of the schedule
    (PAPER.md section 4, first form). The result must not depend on the schedule.

    NOTE: near `t = 1` float64 spaces times by 1.1e-16, so a schedule that
    squeezes a stretch of logsnr into a sliver of `t` loses accuracy there: the EDM
    schedule, `N(2.4, 2.4^2)` on `[-12, 12]`, puts its lowest panel `[-12, -11.25]`
    into the last 5e-9 of `t`, where logsnr is then only known to ~4e-8; its time
    form agrees with the logsnr form to about 1e-6 relative (1e-12 for cosine,
    shifted cosine and flow matching).

    **Returns:** a `ByParts` with the four terms and the residual.
    """
    x = _as_float(x)
    _check_range("by_parts", logsnr_min, logsnr_max)
    if breakpoints is None:
        breakpoints = weighting_breakpoints(weighting)
    eps, prob = _resolve_eps(x.shape, eps, num_hermite, eps_prob)
    dtype = x.dtype
    eps, prob = eps.astype(dtype), prob.astype(dtype)
    ends = jnp.asarray([logsnr_min, logsnr_max], dtype)

    if schedule is None:
        nodes, weights = logsnr_quadrature(
            logsnr_min, logsnr_max, num_points=num_points, breakpoints=breakpoints
        )
        nodes, weights = nodes.astype(dtype), weights.astype(dtype)
        weight, slope, weight_ends = _weight_curves(weighting, nodes, ends)
        # In logsnr, both integrands carry the factor 1 and the slope is -dw/dlogsnr.
        mse_factor, loss_factor = weight, -slope
    else:
        check_proposal(schedule, logsnr_min, logsnr_max)
        t, weights = time_quadrature(
            schedule, num_points=num_points, breakpoints=breakpoints
        )
        t, weights = t.astype(dtype), weights.astype(dtype)
        nodes, mse_factor, loss_factor, weight_ends = _time_curves(
            weighting, schedule, t, ends
        )

    # Left-hand side: the weighted loss.
    mse = _mse_curve(model, x, nodes, eps, prob)
    weighted = 0.5 * jnp.sum(weights * mse_factor * mse)

    # Right-hand side: L at every outer node and at the top of the range, each by
    # its own nested rule.
    levels = jnp.concatenate([nodes, jnp.asarray([logsnr_max], dtype)])
    losses = _truncated_loss_rule(model, x, levels, logsnr_min, num_inner, eps, prob)
    integral = jnp.sum(weights * loss_factor * losses[:-1])
    endpoint = weight_ends[1] * losses[-1]
    constant = weight_ends[0] * prior_kl(x, logsnr_min)
    return ByParts(weighted, integral, endpoint, constant)


@eqx.filter_jit
def _time_curves(weighting, schedule, t, ends):
    """Along a schedule: `logsnr(t)`, `w (-dlogsnr/dt)`, `dw/dt` and `w` at the ends."""
    logsnr = jax.vmap(schedule.logsnr)(t)
    slope = jax.vmap(lambda s: process.dlogsnr_dt(schedule, s))(t)
    weight = jax.vmap(weighting)(logsnr)
    dweight = jax.vmap(lambda s: dweight_dt(weighting, schedule, s))(t)
    return logsnr, -weight * slope, dweight, jax.vmap(weighting)(ends)


@eqx.filter_jit
def _weight_values(weighting, nodes):
    return jax.vmap(weighting)(nodes)


@eqx.filter_jit
def _weight_curves(weighting, nodes, ends):
    """`w` and `dw/dlogsnr` at the nodes, and `w` at the two ends."""
    return (
        jax.vmap(weighting)(nodes),
        jax.vmap(weighting.dweight)(nodes),
        jax.vmap(weighting)(ends),
    )


def dweight_dt(weighting: Weighting, schedule: Schedule, t: ScalarLike) -> Scalar:
    """`d w(logsnr(t)) / dt = (dw/dlogsnr) (dlogsnr/dt)` for a schedule.

    Non-negative everywhere exactly when `w` is non-increasing in logsnr; its
    negative parts are the noise levels whose ELBO the objective pushes up.
    """
    logsnr = schedule.logsnr(t)
    return weighting.dweight(logsnr) * process.dlogsnr_dt(schedule, t)


def dweight_masses(
    weighting: Weighting,
    logsnr_min: float,
    logsnr_max: float,
    *,
    num_points: int = DWEIGHT_GRID_POINTS,
) -> dict[str, float]:
    """The masses of the positive and negative parts of `dw/dt` on the range.

    `positive_mass = Int max(0, dw/dt) dt = Int max(0, -dw/dlogsnr) dlogsnr` and
    `negative_mass = Int max(0, -dw/dt) dt`, the same for every schedule. They are
    summed from the increments of `w` over a grid of `num_points` levels, which is
    exact except in the few cells where `dw/dlogsnr` changes sign (an error of the
    order of the squared cell width there).

    **Returns:** a dict with `positive_mass`, `negative_mass`, `negative_fraction`
    (`negative / (positive + negative)`) and the end weights `weight_min`,
    `weight_max`; `positive_mass - negative_mass = weight_min - weight_max`.
    """
    _check_range("dweight_masses", logsnr_min, logsnr_max)
    _check_positive_int("dweight_masses", "num_points", num_points, minimum=2)
    grid = jnp.linspace(logsnr_min, logsnr_max, num_points, dtype=_float_dtype())
    weight = np.asarray(_weight_values(weighting, grid), dtype=float)
    steps = np.diff(weight)  # dw along increasing logsnr, i.e. -dw along t
    negative = float(np.sum(np.maximum(steps, 0.0)))
    positive = float(np.sum(np.maximum(-steps, 0.0)))
    total = positive + negative
    return {
        "positive_mass": positive,
        "negative_mass": negative,
        "negative_fraction": negative / total if total > 0 else 0.0,
        "weight_min": float(weight[0]),
        "weight_max": float(weight[-1]),
    }


# --- monotonic weightings: the ELBO of noise-augmented data -------------------------


def augmentation_constant(
    x: Float[ArrayLike, "*shape"],
    *,
    weighting: Weighting,
    logsnr_min: float,
) -> Scalar:
    """`w(min) L(min; x) = w(min) KL(q(z_min | x) || N(0, I))`: model-independent.

    For a non-increasing `w`, `L_w(x) = w(min) E_{logsnr ~ p_w} [L(logsnr; x)]`
    minus this constant (PAPER.md section 4); `implied_constant` and
    `compare_implied_constants` measure the constant a denoiser's losses imply.
    """
    return weighting(logsnr_min) * prior_kl(x, logsnr_min)


def _check_monotonic(owner: str, weighting: Weighting, logsnr_min, logsnr_max):
    if not _is_monotonic(weighting, logsnr_min, logsnr_max):
        raise ValueError(
            f"{owner}: {type(weighting).__name__} is not non-increasing on "
            f"[{logsnr_min}, {logsnr_max}], so p_w has negative parts and the "
            "weighted loss is not an expected ELBO; use by_parts."
        )


def _is_monotonic(weighting: Weighting, logsnr_min: float, logsnr_max: float) -> bool:
    """`weighting.is_monotonic` on the same grid and tolerance, compiled once."""
    grid = jnp.linspace(logsnr_min, logsnr_max, MONOTONIC_CHECK_POINTS)
    slopes = _log_slopes(weighting, grid.astype(_float_dtype()))
    tolerance = MONOTONIC_SLOPE_ULPS * float(jnp.finfo(_float_dtype()).eps)
    return float(jnp.max(slopes)) <= tolerance


@eqx.filter_jit
def _log_slopes(weighting, grid):
    return jax.vmap(weighting.dlog_weight)(grid)


@eqx.filter_jit
def _augmentation_logsnr(weighting, u, logsnr_min, logsnr_max):
    """`weighting.augmentation_logsnr` at every uniform of `u`."""
    return jax.vmap(weighting.augmentation_logsnr, in_axes=(0, None, None))(
        u, logsnr_min, logsnr_max
    )


def _augmentation_draws(
    weighting, logsnr_min, logsnr_max, num_samples, sampling, num_replicates, key
):
    u = draw_uniforms(
        num_samples, sampling=sampling, num_replicates=num_replicates, key=key
    )
    dtype = u.dtype
    return _augmentation_logsnr(
        weighting, u, jnp.asarray(logsnr_min, dtype), jnp.asarray(logsnr_max, dtype)
    )


@eqx.filter_jit
def _augmented_terms(model, x, levels, logsnr_min, key):
    inner_key, noise_key = jax.random.split(key)
    num_samples = levels.shape[0]
    fractions = jax.random.uniform(inner_key, (num_samples,), x.dtype)
    base = prior_kl(x, logsnr_min)

    def term(level, fraction, noise_key):
        # One-sample estimate of L(level; x): KL + 1/2 (level - min) ||eps - eps_hat||^2
        # at a level drawn uniformly in [min, level].
        inner = logsnr_min + fraction * (level - logsnr_min)
        z, eps = process.sample_q(x, inner, key=noise_key)
        error = jnp.sum((model(z, inner) - eps) ** 2)
        return base + 0.5 * (level - logsnr_min) * error

    keys = jax.random.split(noise_key, num_samples)
    return jax.vmap(term)(levels, fractions, keys)


def _level_losses(model, x, levels, logsnr_min, logsnr_max, num_points, eps, prob):
    """`L(logsnr; x)` by quadrature at each drawn level (`_panel_truncated_losses`)."""
    panel_nodes, panel_weights = logsnr_quadrature(
        logsnr_min, logsnr_max, num_points=num_points
    )
    dtype = x.dtype
    return _panel_truncated_losses(
        model,
        x,
        levels.astype(dtype),
        jnp.asarray(logsnr_min, dtype),
        jnp.asarray(logsnr_max, dtype),
        panel_nodes.astype(dtype),
        panel_weights.astype(dtype),
        eps.astype(dtype),
        prob.astype(dtype),
    )


def expected_truncated_loss(
    model: Denoiser,
    x: Float[ArrayLike, "*shape"],
    *,
    weighting: Weighting,
    logsnr_min: float,
    logsnr_max: float,
    num_samples: int,
    sampling: str = "iid",
    num_replicates: int | None = None,
    num_points: int | None = None,
    eps: Float[ArrayLike, " num_eps *shape"] | None = None,
    eps_prob: Float[ArrayLike, " num_eps"] | None = None,
    num_hermite: int = NUM_HERMITE,
    key: PRNGKeyArray,
) -> MonteCarloEstimate:
    """Monte Carlo `E_{logsnr ~ p_w} [L(logsnr; x)]` for a non-increasing weighting.

    The noise levels are drawn from the augmentation distribution `p_w` with its
    point mass at `logsnr_max`, by mapping uniforms from `draw_uniforms(num_samples,
    sampling=..., num_replicates=...)` through the inverse CDF (so that they can be
    stratified; the standard error is computed as in `weighted_loss`). By the main
    result, `L_w(x) = w(min) E_{p_w}[L] - augmentation_constant(x, ...)`: the
    weighted loss is the ELBO of data augmented with Gaussian noise of level `p_w`.

    `L(logsnr; x)` at each drawn level is

    - with `num_points=None`, a one-draw unbiased estimate, `KL + 1/2 (logsnr -
      min) ||eps - eps_hat(z; l)||^2` at `l` uniform in `[min, logsnr]` (cheap, for
      any model; its distribution is skewed, with rare large values);
    - with `num_points` given, `truncated_loss` by quadrature (Gauss-Legendre with
      about `num_points` nodes, Gauss-Hermite or the given `eps` nodes), so that the
      only randomness is the level.

    **Raises:** `ValueError` when the weighting is not monotonic on the range.
    """
    x = _as_float(x)
    owner = "expected_truncated_loss"
    _check_range(owner, logsnr_min, logsnr_max)
    _check_positive_int(owner, "num_samples", num_samples)
    num_replicates = _check_sampling(owner, sampling, num_samples, num_replicates)
    _check_monotonic(owner, weighting, logsnr_min, logsnr_max)
    level_key, term_key = jax.random.split(key)
    levels = _augmentation_draws(
        weighting,
        logsnr_min,
        logsnr_max,
        num_samples,
        sampling,
        num_replicates,
        level_key,
    ).astype(x.dtype)
    if num_points is None:
        logsnr_low = jnp.asarray(logsnr_min, x.dtype)
        terms = _augmented_terms(model, x, levels, logsnr_low, term_key)
    else:
        eps, prob = _resolve_eps(x.shape, eps, num_hermite, eps_prob)
        terms = _level_losses(
            model, x, levels, logsnr_min, logsnr_max, num_points, eps, prob
        )
    return _estimate(terms, sampling, num_replicates)


@eqx.filter_jit
def _panel_truncated_losses(
    model, x, levels, logsnr_min, logsnr_max, panel_nodes, panel_weights, eps, prob
):
    """`L(logsnr; x)` at many levels from one composite rule on the whole range.

    The integral up to each level is the sum of the full panels below it plus its
    own Gauss-Legendre rule on the partial panel, so many levels cost
    `GAUSS_LEGENDRE_ORDER` evaluations each instead of a whole rule each.
    """
    num_panels = panel_nodes.shape[0] // GAUSS_LEGENDRE_ORDER
    width = (logsnr_max - logsnr_min) / num_panels
    mse = _mse_curve(model, x, panel_nodes, eps, prob)
    panel_integrals = jnp.sum(
        (panel_weights * mse).reshape(num_panels, GAUSS_LEGENDRE_ORDER), axis=1
    )
    below = jnp.concatenate([jnp.zeros(1, x.dtype), jnp.cumsum(panel_integrals)])
    unit_nodes, unit_weights = np.polynomial.legendre.leggauss(GAUSS_LEGENDRE_ORDER)
    unit_nodes = jnp.asarray((unit_nodes + 1) / 2, x.dtype)
    unit_weights = jnp.asarray(unit_weights / 2, x.dtype)
    base = prior_kl(x, logsnr_min)

    def one(level):
        j = jnp.clip(jnp.floor((level - logsnr_min) / width), 0, num_panels - 1)
        start = logsnr_min + j * width
        length = level - start
        inner = start + length * unit_nodes
        partial = jax.vmap(lambda node: _eps_mse(model, x, node, eps, prob))(inner)
        integral = below[j.astype(int)] + length * jnp.sum(unit_weights * partial)
        return base + 0.5 * integral

    return jax.lax.map(one, levels, batch_size=256)


class ImpliedConstant(eqx.Module):
    """The constant a denoiser's losses imply: `w(min) E_{p_w}[L] - L_w(x)`.

    For a non-increasing weighting the main result (PAPER.md section 4) says
    `L_w(x) = w(min) E_{logsnr ~ p_w}[L(logsnr; x)] - w(min) L(min; x)`, so the
    implied `constant` must equal `reference = w(min) KL(q(z_min | x) || N(0, I))`
    (`augmentation_constant`) for every denoiser, good or bad.

    **Fields:**

    - `weighted_loss`: `L_w(x)` by quadrature.
    - `expected_loss`: `E_{p_w}[L(logsnr; x)]`, with `p_w`'s point mass at
      `logsnr_max`, by quadrature or Monte Carlo.
    - `expected_loss_stderr`: its standard error (zero by quadrature).
    - `weight_min`: `w(logsnr_min)`, the normalisation of `p_w`.
    - `reference`: `w(min) KL`, the model-independent value.

    Scalars for one denoiser; arrays over denoisers in a `ConstantComparison`.
    """

    weighted_loss: Float[Array, "*batch"]
    expected_loss: Float[Array, "*batch"]
    expected_loss_stderr: Float[Array, "*batch"]
    weight_min: Float[Array, "*batch"]
    reference: Float[Array, "*batch"]

    @property
    def constant(self) -> Float[Array, "*batch"]:
        """`w(min) E_{p_w}[L] - L_w(x)`."""
        return self.weight_min * self.expected_loss - self.weighted_loss

    @property
    def constant_stderr(self) -> Float[Array, "*batch"]:
        """`w(min)` times the standard error of `expected_loss`."""
        return self.weight_min * self.expected_loss_stderr

    @property
    def z_score(self) -> Float[Array, "*batch"]:
        """`(constant - reference) / constant_stderr` (Monte Carlo only)."""
        return (self.constant - self.reference) / self.constant_stderr


def implied_constant(
    model: Denoiser,
    x: Float[ArrayLike, "*shape"],
    *,
    weighting: Weighting,
    logsnr_min: float,
    logsnr_max: float,
    num_points: int = 256,
    num_inner: int = NUM_INNER,
    eps: Float[ArrayLike, " num_eps *shape"] | None = None,
    eps_prob: Float[ArrayLike, " num_eps"] | None = None,
    num_hermite: int = NUM_HERMITE,
) -> ImpliedConstant:
    """The constant implied by the main result, deterministically by quadrature.

    `E_{p_w}[L] = Int p_w(logsnr) L(logsnr; x) dlogsnr + P L(max; x)` with
    `p_w = weighting.augmentation_density` and its point mass
    `P = weighting.augmentation_point_mass` on a composite Gauss-Legendre rule of
    about `num_points` nodes cut at the weighting's kinks, `L` at every node from
    its own nested rule of about `num_inner` nodes; `L_w(x)` by
    `weighted_loss_quadrature` on the outer rule. The expectation over `eps` is the
    same rule everywhere (Gauss-Hermite, or the given `eps` nodes), so the implied
    constant equals `reference` to quadrature precision for every denoiser.

    **Raises:** `ValueError` when the weighting is not monotonic on the range.
    """
    x = _as_float(x)
    _check_range("implied_constant", logsnr_min, logsnr_max)
    _check_monotonic("implied_constant", weighting, logsnr_min, logsnr_max)
    eps, prob = _resolve_eps(x.shape, eps, num_hermite, eps_prob)
    dtype = x.dtype
    eps, prob = eps.astype(dtype), prob.astype(dtype)
    nodes, weights = logsnr_quadrature(
        logsnr_min,
        logsnr_max,
        num_points=num_points,
        breakpoints=weighting_breakpoints(weighting),
    )
    nodes, weights = nodes.astype(dtype), weights.astype(dtype)
    density, point_mass = _augmentation_curve(
        weighting, nodes, jnp.asarray(logsnr_min, dtype), jnp.asarray(logsnr_max, dtype)
    )

    # E_{p_w}[L]: the density part on the outer rule plus the point mass at max.
    levels = jnp.concatenate([nodes, jnp.asarray([logsnr_max], dtype)])
    losses = _truncated_loss_rule(model, x, levels, logsnr_min, num_inner, eps, prob)
    expected = jnp.sum(weights * density * losses[:-1]) + point_mass * losses[-1]

    weighted = weighted_loss_quadrature(
        model,
        x,
        weighting=weighting,
        logsnr_min=logsnr_min,
        logsnr_max=logsnr_max,
        num_points=num_points,
        eps=eps,
        eps_prob=prob,
    )
    return ImpliedConstant(
        weighted_loss=weighted,
        expected_loss=expected,
        expected_loss_stderr=jnp.zeros_like(expected),
        weight_min=weighting(jnp.asarray(logsnr_min, dtype)),
        reference=augmentation_constant(x, weighting=weighting, logsnr_min=logsnr_min),
    )


@eqx.filter_jit
def _augmentation_curve(weighting, nodes, logsnr_min, logsnr_max):
    density = jax.vmap(
        lambda level: weighting.augmentation_density(level, logsnr_min, logsnr_max)
    )(nodes)
    return density, weighting.augmentation_point_mass(logsnr_min, logsnr_max)


class ConstantComparison(eqx.Module):
    """Implied constants of several denoisers from shared draws of `p_w`.

    **Fields:**

    - `constants`: an `ImpliedConstant` whose fields are arrays over the denoisers
      (Monte Carlo `expected_loss` with its standard error).
    - `difference`: `constant_k - constant_0`, each denoiser's implied constant
      minus the first one's; zero for every denoiser by the main result.
    - `difference_stderr`: its standard error, from the per-draw paired
      differences `w(min) (L_k(logsnr_i) - L_0(logsnr_i))` at the shared levels
      (grouped into independent units as in `MonteCarloEstimate`).
    - `num_independent`: the number of independent units behind the errors.
    """

    constants: ImpliedConstant
    difference: Float[Array, " num_models"]
    difference_stderr: Float[Array, " num_models"]
    num_independent: int = eqx.field(static=True)

    @property
    def difference_z(self) -> Float[Array, " num_models"]:
        """`difference / difference_stderr` (NaN for the first denoiser)."""
        return self.difference / self.difference_stderr


def compare_implied_constants(
    models: Sequence[Denoiser],
    x: Float[ArrayLike, "*shape"],
    *,
    weighting: Weighting,
    logsnr_min: float,
    logsnr_max: float,
    num_samples: int,
    sampling: str = "stratified",
    num_replicates: int | None = None,
    num_points: int = 256,
    eps: Float[ArrayLike, " num_eps *shape"] | None = None,
    eps_prob: Float[ArrayLike, " num_eps"] | None = None,
    num_hermite: int = NUM_HERMITE,
    key: PRNGKeyArray,
) -> ConstantComparison:
    """Monte Carlo check that a monotonic weighted loss is an expected ELBO.

    Draws `num_samples` levels from `p_w` once (`sampling` and `num_replicates` as
    in `expected_truncated_loss`; stratified by default) and, for every denoiser,
    evaluates `L(logsnr; x)` at them by quadrature (about `num_points` nodes) and
    `L_w(x)` by quadrature with the same `eps` rule, so that the only randomness is
    the shared levels. Each implied constant `w(min) E_{p_w}[L] - L_w(x)` is
    compared with the model-independent `reference` (`z_score`), and each with the
    first denoiser's through the paired per-draw differences, whose standard error
    is far smaller than either constant's because the levels are shared.

    **Raises:** `ValueError` when the weighting is not monotonic on the range or no
    denoiser is given.
    """
    x = _as_float(x)
    owner = "compare_implied_constants"
    models = list(models)
    if not models:
        raise ValueError(f"{owner}: models is empty; pass at least one denoiser.")
    _check_range(owner, logsnr_min, logsnr_max)
    _check_positive_int(owner, "num_samples", num_samples)
    num_replicates = _check_sampling(owner, sampling, num_samples, num_replicates)
    _check_monotonic(owner, weighting, logsnr_min, logsnr_max)
    eps, prob = _resolve_eps(x.shape, eps, num_hermite, eps_prob)
    dtype = x.dtype
    levels = _augmentation_draws(
        weighting, logsnr_min, logsnr_max, num_samples, sampling, num_replicates, key
    ).astype(dtype)
    weight_min = weighting(jnp.asarray(logsnr_min, dtype))

    weighted, terms = [], []
    for model in models:
        weighted.append(
            weighted_loss_quadrature(
                model,
                x,
                weighting=weighting,
                logsnr_min=logsnr_min,
                logsnr_max=logsnr_max,
                num_points=num_points,
                eps=eps,
                eps_prob=prob,
            )
        )
        terms.append(
            _level_losses(
                model, x, levels, logsnr_min, logsnr_max, num_points, eps, prob
            )
        )
    estimates = [_estimate(t, sampling, num_replicates) for t in terms]
    paired = [_estimate(t - terms[0], sampling, num_replicates) for t in terms]

    weighted = jnp.stack(weighted)
    constants = ImpliedConstant(
        weighted_loss=weighted,
        expected_loss=jnp.stack([e.mean for e in estimates]),
        expected_loss_stderr=jnp.stack([e.stderr for e in estimates]),
        weight_min=jnp.full(len(models), weight_min),
        reference=jnp.full(
            len(models),
            augmentation_constant(x, weighting=weighting, logsnr_min=logsnr_min),
        ),
    )
    mean_difference = jnp.stack([e.mean for e in paired])
    stderr_difference = jnp.stack([e.stderr for e in paired])
    difference = weight_min * mean_difference - (weighted - weighted[0])
    return ConstantComparison(
        constants=constants,
        difference=difference,
        difference_stderr=weight_min * stderr_difference,
        num_independent=estimates[0].num_independent,
    )


# --- proposals and the variance of the estimator --------------------------------------


def _weighted_loss_batch_terms(
    model, x, weighting, proposal, sampling, num_replicates, key
):
    uniform_key, noise_key = jax.random.split(key)
    logsnr, log_ratio = _importance_levels(
        weighting, proposal, x.shape[0], sampling, num_replicates, uniform_key
    )
    return _importance_terms(model, x, logsnr, log_ratio, noise_key, True)


def weighted_loss_batch(
    model: Denoiser,
    x: Float[ArrayLike, " num_examples *shape"],
    *,
    weighting: Weighting,
    proposal: Schedule,
    logsnr_min: float,
    logsnr_max: float,
    sampling: str = "iid",
    num_replicates: int | None = None,
    key: PRNGKeyArray,
) -> MonteCarloEstimate:
    """Weighted loss of a batch, one noise level per example, drawn across the batch.

    Estimates the batch average of `L_w(x_i)` (or, for examples drawn from the data,
    `E_x L_w(x)`) with one `weighted_loss_term` per example; the levels come from
    `draw_uniforms(num_examples, sampling=..., num_replicates=...)` mapped through
    the proposal, so stratified, low-discrepancy and antithetic draws spread the
    levels over the batch while every term stays unbiased. Antithetic partners are
    examples `i` and `i + num_examples / 2`; the standard error is computed as in
    `weighted_loss`.
    """
    x = _as_float(x)
    check_proposal(proposal, logsnr_min, logsnr_max)
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(
            "weighted_loss_batch: x must have shape (num_examples, ...); got "
            f"{x.shape}."
        )
    num_replicates = _check_sampling(
        "weighted_loss_batch", sampling, x.shape[0], num_replicates
    )
    terms = _weighted_loss_batch_terms(
        model, x, weighting, proposal, sampling, num_replicates, key
    )
    return _estimate(terms, sampling, num_replicates)


class IntegrandMoments(eqx.Module):
    """Moments of the weighted integrand `g = 1/2 w ||eps_hat - eps||^2` per level.

    `mean(logsnr) = E_{x, eps}[g]` and `mean_square(logsnr) = E_{x, eps}[g^2]` at the
    nodes of a Gauss-Legendre rule with `GAUSS_LEGENDRE_ORDER` nodes in each of
    `num_bins` equal bins of the range. The importance-sampling estimator
    `g / p` with `logsnr ~ p` (and `x`, `eps` drawn as in the expectation) has mean
    `L_w = Int mean` for every proposal and per-sample variance

        Var_p = Int mean_square / p dlogsnr - L_w^2,

    which is smallest, `(Int sqrt(mean_square))^2 - L_w^2`, for `p*` proportional
    to the root mean square `sqrt(mean_square)`.
    """

    logsnr: Float[Array, " num_nodes"]
    quad_weights: Float[Array, " num_nodes"]
    mean: Float[Array, " num_nodes"]
    mean_square: Float[Array, " num_nodes"]
    logsnr_min: float = eqx.field(static=True)
    logsnr_max: float = eqx.field(static=True)
    num_bins: int = eqx.field(static=True)

    def loss(self) -> Scalar:
        """`L_w = Int E[g] dlogsnr`."""
        return jnp.sum(self.quad_weights * self.mean)

    def variance(self, proposal: Schedule) -> Scalar:
        """Per-sample variance `Int E[g^2] / p dlogsnr - L_w^2` under `proposal`."""
        check_proposal(proposal, self.logsnr_min, self.logsnr_max)
        return _proposal_variance(self, proposal)

    def optimal_variance(self) -> Scalar:
        """The smallest variance over all proposals, `(Int sqrt(E[g^2]))^2 - L_w^2`."""
        rms_integral = jnp.sum(self.quad_weights * jnp.sqrt(self.mean_square))
        return rms_integral**2 - self.loss() ** 2

    def _per_bin(self, values: Array) -> Array:
        return jnp.sum((self.quad_weights * values).reshape(self.num_bins, -1), axis=1)

    def _proposal(self, bin_weights: Array) -> PiecewiseConstant:
        # NOTE: a bin with (numerically) zero integrand still needs a positive
        # density, or its importance weight is infinite; it gets 1e-12 of the largest.
        floor = 1e-12 * jnp.max(bin_weights)
        return PiecewiseConstant(
            jnp.maximum(bin_weights, floor),
            logsnr_min=self.logsnr_min,
            logsnr_max=self.logsnr_max,
        )

    def optimal_proposal(self) -> PiecewiseConstant:
        """The variance-optimal piecewise-constant proposal on the bins.

        Bin masses proportional to `sqrt(Int_bin E[g^2])`, the root mean square of
        the integrand over each bin: the exact minimiser of `Var_p` among densities
        constant on the bins, and `p*` in the limit of narrow bins.
        """
        return self._proposal(jnp.sqrt(self._per_bin(self.mean_square)))

    def adaptive_proposal(self) -> PiecewiseConstant:
        """The paper's adaptive schedule: bin masses proportional to `Int_bin E[g]`.

        Kingma & Gao (section 5 of PAPER.md) track the mean weighted loss per bin; it
        equals the optimum only where `E[g^2]` is proportional to `E[g]^2`.
        """
        return self._proposal(self._per_bin(self.mean))


@eqx.filter_jit
def _proposal_variance(moments, proposal):
    density = jax.vmap(proposal.density)(moments.logsnr)
    second = jnp.sum(moments.quad_weights * moments.mean_square / density)
    return second - moments.loss() ** 2


@eqx.filter_jit
def _moments(model, weighting, nodes, x, x_prob, eps, eps_prob):
    def at_level(logsnr):
        alpha = process.alpha(logsnr)
        sigma = process.sigma(logsnr)
        half_weight = 0.5 * weighting(logsnr)

        def per_example(example):
            def per_noise(eps_i):
                eps_hat = model(alpha * example + sigma * eps_i, logsnr)
                return half_weight * jnp.sum((eps_hat - eps_i) ** 2)

            g = jax.vmap(per_noise)(eps)
            return jnp.stack([g @ eps_prob, (g**2) @ eps_prob])

        return x_prob @ jax.vmap(per_example)(x)

    return jax.lax.map(at_level, nodes, batch_size=OUTER_BATCH)


def integrand_moments(
    model: Denoiser,
    x: Float[ArrayLike, " num_examples *shape"],
    *,
    weighting: Weighting,
    logsnr_min: float,
    logsnr_max: float,
    x_prob: Float[ArrayLike, " num_examples"] | None = None,
    eps: Float[ArrayLike, " num_eps *shape"] | None = None,
    eps_prob: Float[ArrayLike, " num_eps"] | None = None,
    num_hermite: int = NUM_HERMITE,
    num_bins: int = 100,
) -> IntegrandMoments:
    """`E[g]` and `E[g^2]` of `g = 1/2 w(logsnr) ||eps_hat - eps||^2` over levels.

    The expectation is over the examples `x` (with probabilities `x_prob`, equal by
    default: data draws, or the nodes of `data_quadrature`) times the noise `eps`
    (Gauss-Hermite, or given nodes `eps` with `eps_prob`). Levels are
    `GAUSS_LEGENDRE_ORDER` Gauss-Legendre nodes in each of `num_bins` equal bins (100
    in the paper's adaptive schedule).
    """
    x = _as_float(x)
    _check_range("integrand_moments", logsnr_min, logsnr_max)
    _check_positive_int("integrand_moments", "num_bins", num_bins)
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(
            f"integrand_moments: x must have shape (num_examples, ...); got {x.shape}."
        )
    shape = x.shape[1:]
    if x_prob is None:
        x_prob = jnp.full((x.shape[0],), 1.0 / x.shape[0], x.dtype)
    x_prob = _as_float(x_prob)
    eps, eps_prob = _resolve_eps(shape, eps, num_hermite, eps_prob)
    nodes, weights = logsnr_quadrature(
        logsnr_min, logsnr_max, num_points=num_bins * GAUSS_LEGENDRE_ORDER
    )
    moments = _moments(model, weighting, nodes, x, x_prob, eps, eps_prob)
    return IntegrandMoments(
        nodes,
        weights,
        moments[:, 0],
        moments[:, 1],
        float(logsnr_min),
        float(logsnr_max),
        num_bins,
    )


def data_quadrature(
    mixture: Any, *, num_hermite: int = NUM_HERMITE
) -> tuple[Float[Array, "num_nodes dim"], Float[Array, " num_nodes"]]:
    """Nodes and probabilities for `E_{x ~ mixture}`: Gauss-Hermite per component.

    For `x ~ sum_k pi_k N(mu_k, s_k^2 I)`, `x = mu_k + s_k xi` with `xi` on the
    product Gauss-Hermite grid of `eps_quadrature`; probabilities `pi_k prob(xi)`.
    """
    xi, prob = eps_quadrature((mixture.dim,), num_hermite=num_hermite)
    x = mixture.means[:, None, :] + mixture.stds[:, None, None] * xi[None]
    probs = mixture.weights[:, None] * prob[None]
    return x.reshape(-1, mixture.dim), probs.reshape(-1)


# --- a deliberately wrong denoiser ----------------------------------------------------


class PerturbedDenoiser(eqx.Module):
    """A denoiser made wrong on purpose, for checks that must hold for any model.

    `eps_hat = scale base(z, logsnr) + amplitude alpha sin(frequency z + phase)`.
    The perturbation acts like an error `-amplitude sin(...) / sigma` of a data
    prediction; the factor `alpha` keeps it small at low logsnr, where predicting
    `eps` from `z` is easy, as for a partly trained network.
    """

    base: Denoiser
    scale: float = eqx.field(default=1.0, converter=float)
    amplitude: float = eqx.field(default=0.3, converter=float)
    frequency: float = eqx.field(default=2.0, converter=float)
    phase: float = eqx.field(default=0.5, converter=float)

    def __call__(
        self, z: Float[ArrayLike, "*shape"], logsnr: ScalarLike
    ) -> Float[Array, "*shape"]:
        z = _as_float(z)
        wobble = jnp.sin(self.frequency * z + self.phase)
        return self.scale * self.base(z, logsnr) + (
            self.amplitude * process.alpha(logsnr) * wobble
        )
