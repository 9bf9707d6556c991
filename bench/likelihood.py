"""Benchmark of the probability-flow ODE log-likelihood (`elbo_core.likelihood`).

For a 2-D MLP (trained for a few seconds on a Gaussian mixture) and two MNIST-sized
784-D networks, an MLP and the channels-last convolutional denoiser of
`elbo_core.networks` (random initialisation: the cost of a solve depends on the
network's size and on how stiff its flow is, not on what it has learnt; a trained
network usually needs fewer steps), this measures

- function evaluations (NFE) per example, mean and maximum over a batch;
- wall time per example when a batch is solved at once (`vmap`, adaptive steps per
  example), after compilation, the best of a few repeats;
- the solver's overhead ratio: wall time per evaluation of the batched solve (which
  runs as many evaluations as its slowest example needs) over the raw cost of one
  batched evaluation of the vector field with its divergence, measured inside a
  compiled loop (log-SNR moving at every evaluation, as in a solve) so that dispatch
  costs do not count;
- exact against Hutchinson divergence, float32 against float64;
- the same solve done the reference way: scipy's `solve_ivp(method="RK45")` on the
  host, calling a jitted single-example vector field once per evaluation, at the
  same rtol and atol; its wall time per example, and the agreement of the
  log-likelihoods. Beside it, the batched variant of the same reference: one scipy
  solve over the whole batch stacked into one state (shared steps), one jitted call
  per evaluation for every example at once.

Prints a table and writes `bench/results/likelihood.json` (atomically). Run with
`make bench` or `python bench/likelihood.py`; a few minutes on two CPU cores.
`--quick` runs a small version of every measurement (for checking the script;
`tests/test_bench.py` runs it).
"""

import argparse
import math
import os
import platform
import statistics
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import scipy.integrate  # noqa: E402

from elbo_core import (  # noqa: E402
    _io,
    analytic,
    likelihood,
    losses,
    networks,
    process,
    schedules,
    weighting,
)

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "likelihood.json"

LOGSNR_MIN, LOGSNR_MAX = -10.0, 10.0
SCHEDULE = schedules.Cosine(logsnr_min=LOGSNR_MIN, logsnr_max=LOGSNR_MAX)
RTOL = ATOL = 1e-5
# Evaluations per timing of the raw vector field (inside one compiled loop).
RAW_EVALUATIONS = 50
# Timings of each reference solve (the best is kept, as for ours).
REFERENCE_REPEATS = 2
# Tolerance of the yardstick solve against which both solvers' errors are measured.
TIGHT = 1e-10
# Targets of the issue.
TARGET_OVERHEAD = 1.3
TARGET_SPEEDUP = 10.0


def _cast(tree, dtype):
    return jax.tree.map(
        lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, tree
    )


def _finite_or_none(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _machine() -> dict:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": model,
        "logical_cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(device) for device in jax.devices()],
    }


def _mixture() -> analytic.GaussianMixture:
    return analytic.GaussianMixture(
        np.array([[-2.0, 0.5], [1.5, -1.0], [0.5, 2.0]]),
        np.array([0.4, 0.6, 0.3]),
        np.array([0.3, 0.5, 0.2]),
    )


def train_2d_mlp(mixture, num_steps: int, *, key) -> networks.MLPDenoiser:
    """A 2-D MLP trained on the mixture with the ELBO's loss (float32)."""
    init_key, train_key = jax.random.split(key)
    network = networks.MLPDenoiser((2,), width_size=64, depth=2, key=init_key)
    network = _cast(network, jnp.float32)
    optimizer = optax.adam(2e-3)
    proposal = schedules.Linear(logsnr_min=LOGSNR_MIN, logsnr_max=LOGSNR_MAX)
    batch_size = 256

    def loss(model, key):
        data_key, level_key, noise_key = jax.random.split(key, 3)
        x = jax.vmap(lambda k: mixture.sample(key=k))(
            jax.random.split(data_key, batch_size)
        ).astype(jnp.float32)
        logsnr = proposal.logsnr_from_uniform(
            jax.random.uniform(level_key, (batch_size,))
        ).astype(jnp.float32)

        def term(example, level, noise_key):
            return losses.weighted_loss_term(
                model,
                example,
                level,
                weighting=weighting.ELBO(),
                proposal=proposal,
                key=noise_key,
            )

        keys = jax.random.split(noise_key, batch_size)
        return jnp.mean(jax.vmap(term)(x, logsnr, keys))

    @eqx.filter_jit
    def train(network, key):
        params, static = eqx.partition(network, eqx.is_inexact_array)

        def step(carry, key):
            params, state = carry
            grads = jax.grad(lambda p: loss(eqx.combine(p, static), key))(params)
            updates, state = optimizer.update(grads, state)
            return (optax.apply_updates(params, updates), state), None

        carry = (params, optimizer.init(params))
        (params, _), _ = jax.lax.scan(step, carry, jax.random.split(key, num_steps))
        return eqx.combine(params, static)

    return train(network, train_key)


def _images(num_examples: int, *, key) -> jax.Array:
    """MNIST-shaped data: 256 levels in [-1, 1], uniformly dequantised."""
    level_key, noise_key = jax.random.split(key)
    levels = jax.random.randint(level_key, (num_examples, 28, 28, 1), 0, 256)
    x = -1 + 2 * levels / 255
    keys = jax.random.split(noise_key, num_examples)
    return jax.vmap(lambda row, k: likelihood.dequantize(row, num_levels=256, key=k))(
        x, keys
    )


# --- our solve ------------------------------------------------------------------------


def _time(fn) -> tuple[float, float]:
    """Wall-clock and CPU seconds (all threads of this process) of one call."""
    start, start_cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    return time.perf_counter() - start, time.process_time() - start_cpu


def _levels(batch_size: int, dtype) -> jax.Array:
    """One log-SNR per example, as in a batched solve (each lane has its own)."""
    return jnp.linspace(LOGSNR_MAX, LOGSNR_MIN, batch_size + 2, dtype=dtype)[1:-1]


@eqx.filter_jit
def _raw_loop(model, z, probes, num_evaluations):
    """`num_evaluations` chained batched evaluations of the augmented vector field.

    `probes` is `None` for the exact divergence, else one set per example.
    """
    logsnr = _levels(z.shape[0], z.dtype)
    step = jnp.asarray(1e-6, z.dtype)

    def body(i, z):
        # NOTE: the log-SNR moves a little at every evaluation, as it does in a
        # solve. With a fixed log-SNR, XLA hoists the embedding of the noise level
        # (and everything that depends only on it) out of the loop, which made the
        # "raw" evaluation of the 2-D MLP 30 to 40 per cent cheaper than any
        # evaluation a solver can make.
        level = logsnr - step * i

        def one(row, level, probe):
            return likelihood.augmented_drift(model, row, level, probe)

        in_axes = (0, 0, None if probes is None else 0)
        drift, divergence = jax.vmap(one, in_axes=in_axes)(z, level, probes)
        divergence = jnp.reshape(jnp.mean(divergence), (1,) * z.ndim)
        return z + step * drift + step * divergence

    return jax.lax.fori_loop(0, num_evaluations, body, z)


def _raw_runner(model, x, divergence, num_probes):
    """A function running `RAW_EVALUATIONS` batched evaluations of the vector field."""
    probes = None
    if divergence == "hutchinson":
        probe_shape = (x.shape[0], num_probes, math.prod(x.shape[1:]))
        probes = jax.random.rademacher(
            jax.random.key(1), (math.prod(probe_shape),), x.dtype
        ).reshape(probe_shape)
    return lambda: _raw_loop(model, x, probes, RAW_EVALUATIONS)


def _tolerances(norm: str) -> dict:
    """Our default controller (`"split"`), or one with scipy's error norm (`"rms"`)."""
    if norm == "split":
        return dict(rtol=RTOL, atol=ATOL)
    return dict(stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL))


class _FreeField(eqx.Module):
    """A vector field that costs next to nothing, on the state of a likelihood solve.

    It decays `z` and the log-density accumulators smoothly, so that an adaptive
    solve of it takes a few dozen steps; timing it isolates what the solver itself
    costs per step for a batch of this shape (Runge-Kutta stage sums, error norm,
    controller, the per-example selects of a `vmap`ped loop).
    """

    def __call__(self, logsnr, state, args):
        z, delta = state
        rate = 0.5 * jax.nn.sigmoid(-logsnr)
        return rate * z, rate * delta


def solver_arithmetic(x, num_estimates, dtype, norm, repeats) -> dict:
    """Seconds per evaluation that the batched solver spends outside the field."""
    error_norm = likelihood._split_norm if norm == "split" else likelihood._rms_norm
    solver = diffrax.Tsit5()
    controller = diffrax.PIDController(rtol=RTOL, atol=ATOL, norm=error_norm)
    delta_shape = () if num_estimates is None else (num_estimates,)

    @jax.jit
    def solve(x):
        def one(z):
            solution = diffrax.diffeqsolve(
                diffrax.ODETerm(_FreeField()),
                solver,
                t0=LOGSNR_MAX,
                t1=LOGSNR_MIN,
                dt0=None,
                y0=(z, jnp.ones(delta_shape, dtype)),
                stepsize_controller=controller,
                max_steps=likelihood.DEFAULT_MAX_STEPS,
                throw=False,
            )
            return solution.ys, solution.stats["num_steps"]

        return jax.vmap(one)(x)

    x = jnp.asarray(x, dtype)
    _, num_steps = jax.block_until_ready(solve(x))
    best = min(_time(lambda: solve(x))[0] for _ in range(repeats))
    nfe = int(likelihood.count_function_evaluations(solver, np.max(num_steps)))
    return {"free_field_nfe": nfe, "per_evaluation_s": best / nfe}


def measure(name, model, x, *, divergence, num_probes, dtype, norm, repeats) -> dict:
    """One row of the table: our batched solve and its raw evaluation cost."""
    model = _cast(model, dtype)
    x = jnp.asarray(x, dtype)
    options = dict(
        schedule=SCHEDULE,
        divergence=divergence,
        num_probes=num_probes,
        key=jax.random.key(0),
        **_tolerances(norm),
    )

    def solve():
        return likelihood.batch_ode_log_likelihood(model, x, **options)

    start = time.perf_counter()
    log_likelihood, stats = jax.block_until_ready(solve())
    first_call = time.perf_counter() - start
    raw_run = _raw_runner(model, x, divergence, num_probes)
    jax.block_until_ready(raw_run())  # compile

    # NOTE: the solve and the raw loop are timed alternately, so that a burst of
    # load on a shared machine hits both; the best of each is kept.
    times, raw_times = [], []
    for _ in range(repeats):
        times.append(_time(solve))
        raw_times.append(_time(raw_run))
    best, best_cpu = (min(t[i] for t in times) for i in (0, 1))
    raw, raw_cpu = (min(t[i] for t in raw_times) / RAW_EVALUATIONS for i in (0, 1))

    nfe = np.asarray(stats["num_function_evaluations"])
    batch_size = x.shape[0]
    arithmetic = solver_arithmetic(
        x, num_probes if divergence == "hutchinson" else None, dtype, norm, repeats
    )
    row = {
        "name": name,
        "num_dims": int(math.prod(x.shape[1:])),
        "divergence": divergence,
        "num_probes": num_probes if divergence == "hutchinson" else None,
        "dtype": jnp.dtype(dtype).name,
        "error_norm": norm,
        "batch_size": batch_size,
        "nfe_mean": float(nfe.mean()),
        "nfe_max": int(nfe.max()),
        "all_successful": bool(np.all(stats["successful"])),
        "compile_and_first_call_s": first_call,
        "wall_per_batch_s": best,
        "wall_per_batch_all_s": [t[0] for t in times],
        "wall_per_example_s": best / batch_size,
        "wall_per_evaluation_s": best / nfe.max(),
        "raw_evaluation_s": raw,
        "overhead_ratio": best / nfe.max() / raw,
        # What the solver costs per evaluation with a free vector field, and the
        # overhead ratio that this cost alone would give.
        "solver_arithmetic_per_evaluation_s": arithmetic["per_evaluation_s"],
        "overhead_ratio_from_solver_arithmetic": 1
        + arithmetic["per_evaluation_s"] / raw,
        "cpu_per_example_s": best_cpu / batch_size,
        "cpu_per_evaluation_s": best_cpu / nfe.max(),
        "raw_evaluation_cpu_s": raw_cpu,
        "overhead_ratio_cpu": best_cpu / nfe.max() / raw_cpu,
        "log_likelihood_mean": float(np.mean(log_likelihood)),
        "log_likelihoods": np.asarray(log_likelihood, np.float64),
        # Undefined (NaN) for one probe: written as null.
        "std_error_mean": _finite_or_none(np.mean(stats["std_error"])),
    }
    return row


# --- the reference way ----------------------------------------------------------------


def reference_solve(model, x, *, probes, dtype) -> dict:
    """scipy RK45 on the host, one jitted evaluation per call, one example at a time.

    Same ODE, same tolerances, same log-likelihood formula (equation (2) of
    `elbo_core.likelihood`, N(0, I) prior); `probes` are the Hutchinson probes of
    each example (`None`: exact divergence).
    """
    model = _cast(model, dtype)
    shape = x.shape[1:]
    num_dims = math.prod(shape)

    @jax.jit
    def field(logsnr, state, probe):
        z = state[:num_dims].reshape(shape)
        drift, divergence = likelihood.augmented_drift(model, z, logsnr, probe)
        return jnp.concatenate([drift.ravel(), jnp.atleast_1d(divergence)])

    log_alpha_max = 0.5 * float(process.log_alpha2(LOGSNR_MAX))
    results = []
    for i in range(x.shape[0]):
        probe = None if probes is None else jnp.asarray(probes[i], dtype)
        num_estimates = 1 if probe is None else probe.shape[0]
        z_max = math.exp(log_alpha_max) * np.asarray(x[i], np.float64).ravel()
        y0 = np.concatenate([z_max, np.zeros(num_estimates)])

        def fun(logsnr, state, probe=probe):
            out = field(jnp.asarray(logsnr, dtype), jnp.asarray(state, dtype), probe)
            return np.asarray(out, np.float64)

        fun(LOGSNR_MAX, y0)  # compile outside the timing
        walls, cpus = [], []
        for _ in range(REFERENCE_REPEATS):
            start, start_cpu = time.perf_counter(), time.process_time()
            solution = scipy.integrate.solve_ivp(
                fun,
                (LOGSNR_MAX, LOGSNR_MIN),
                y0,
                method="RK45",
                rtol=RTOL,
                atol=ATOL,
            )
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - start_cpu)
        z_min = solution.y[:num_dims, -1]
        delta = solution.y[num_dims:, -1]
        prior = -0.5 * np.sum(z_min**2) - 0.5 * num_dims * math.log(2 * math.pi)
        estimates = prior + delta + num_dims * log_alpha_max
        results.append(
            {
                "wall_s": min(walls),
                "cpu_s": min(cpus),
                "nfe": int(solution.nfev),
                "success": bool(solution.success),
                "log_likelihood": float(np.mean(estimates)),
            }
        )
    return {
        "wall_per_example_s": statistics.mean(r["wall_s"] for r in results),
        "cpu_per_example_s": statistics.mean(r["cpu_s"] for r in results),
        "nfe_mean": statistics.mean(r["nfe"] for r in results),
        "all_successful": all(r["success"] for r in results),
        "log_likelihoods": [r["log_likelihood"] for r in results],
    }


def reference_solve_batched(model, x, *, probes, dtype) -> dict:
    """scipy RK45 on the host over the whole batch as one state, shared steps.

    The batched variant of the reference way: one jitted call evaluates the vector
    field of every example, so dispatch is paid once per evaluation for the batch,
    but all examples share the step sizes of one RMS error norm over the stacked
    state (a looser control per example than a solve of its own).
    """
    model = _cast(model, dtype)
    shape = x.shape[1:]
    num_examples, num_dims = x.shape[0], math.prod(shape)
    num_estimates = 1 if probes is None else probes[0].shape[0]
    stacked = None if probes is None else jnp.stack(probes).astype(dtype)
    width = num_dims + num_estimates

    @jax.jit
    def field(logsnr, state, probes):
        state = state.reshape(num_examples, width)
        z = state[:, :num_dims].reshape((num_examples, *shape))

        def one(row, probe):
            drift, divergence = likelihood.augmented_drift(model, row, logsnr, probe)
            return jnp.concatenate([drift.ravel(), jnp.atleast_1d(divergence)])

        in_axes = (0, None if probes is None else 0)
        return jax.vmap(one, in_axes=in_axes)(z, probes).ravel()

    def fun(logsnr, state):
        out = field(jnp.asarray(logsnr, dtype), jnp.asarray(state, dtype), stacked)
        return np.asarray(out, np.float64)

    log_alpha_max = 0.5 * float(process.log_alpha2(LOGSNR_MAX))
    z_max = math.exp(log_alpha_max) * np.asarray(x, np.float64).reshape(-1, num_dims)
    y0 = np.concatenate([z_max, np.zeros((num_examples, num_estimates))], axis=1)
    y0 = y0.ravel()
    fun(LOGSNR_MAX, y0)  # compile outside the timing
    walls = []
    for _ in range(REFERENCE_REPEATS):
        start = time.perf_counter()
        solution = scipy.integrate.solve_ivp(
            fun, (LOGSNR_MAX, LOGSNR_MIN), y0, method="RK45", rtol=RTOL, atol=ATOL
        )
        walls.append(time.perf_counter() - start)
    final = solution.y[:, -1].reshape(num_examples, width)
    z_min, delta = final[:, :num_dims], final[:, num_dims:]
    prior = -0.5 * np.sum(z_min**2, axis=1) - 0.5 * num_dims * math.log(2 * math.pi)
    estimates = prior[:, None] + delta + num_dims * log_alpha_max
    return {
        "batch_size": num_examples,
        "wall_per_example_s": min(walls) / num_examples,
        "nfe": int(solution.nfev),
        "successful": bool(solution.success),
        "log_likelihoods": np.mean(estimates, axis=1).tolist(),
    }


def _probes_of_batch(x, num_probes, dtype):
    """The probes `batch_ode_log_likelihood(..., key=jax.random.key(0))` draws."""
    keys = jax.random.split(jax.random.key(0), x.shape[0])
    num_dims = math.prod(x.shape[1:])
    return [
        likelihood.draw_probes(
            key, num_probes=num_probes, num_dims=num_dims, dtype=dtype
        )
        for key in keys
    ]


def tight_log_likelihoods(model, x, *, divergence, num_probes, dtype):
    """Our solve at rtol = atol = 1e-10 in float64: the yardstick for both."""
    model = _cast(model, jnp.float64)
    log_likelihood, stats = likelihood.batch_ode_log_likelihood(
        model,
        jnp.asarray(x, jnp.float64),
        schedule=SCHEDULE,
        divergence=divergence,
        num_probes=num_probes,
        rtol=TIGHT,
        atol=TIGHT,
        max_steps=100_000,
        key=jax.random.key(0),
    )
    assert bool(jnp.all(stats["successful"]))
    return np.asarray(log_likelihood)


def compare_with_reference(name, model, x, rows, *, num_examples) -> dict:
    """scipy against our rows (same data, divergence, probes), errors vs tight."""
    first = rows[0]
    dtype = jnp.dtype(first["dtype"])
    divergence, num_probes = first["divergence"], first["num_probes"] or 1
    probes = None
    if divergence == "hutchinson":
        probes = _probes_of_batch(jnp.asarray(x, dtype), num_probes, dtype)
    subset = jnp.asarray(x[:num_examples], dtype)
    reference = reference_solve(model, subset, probes=probes, dtype=dtype)
    # The tight solve uses the same probes: `key=jax.random.key(0)` split per example,
    # so the subset must be drawn as the first examples of the same batch.
    tight_all = tight_log_likelihoods(
        model, x, divergence=divergence, num_probes=num_probes, dtype=dtype
    )
    tight = tight_all[:num_examples]
    theirs = np.asarray(reference["log_likelihoods"])
    batched = reference_solve_batched(
        model, jnp.asarray(x, dtype), probes=probes, dtype=dtype
    )
    batched_errors = np.abs(np.asarray(batched.pop("log_likelihoods")) - tight_all)
    result = {
        "name": name,
        "divergence": divergence,
        "dtype": first["dtype"],
        "num_examples": num_examples,
        "reference_wall_per_example_s": reference["wall_per_example_s"],
        "reference_cpu_per_example_s": reference["cpu_per_example_s"],
        "reference_nfe_mean": reference["nfe_mean"],
        "reference_all_successful": reference["all_successful"],
        "reference_max_abs_error": float(np.max(np.abs(theirs - tight))),
        "batched_reference": {
            **batched,
            "max_abs_error": float(np.max(batched_errors)),
        },
        "ours": [],
    }
    for row in rows:
        ours = np.asarray(row["log_likelihoods"][:num_examples])
        result["ours"].append(
            {
                "error_norm": row["error_norm"],
                "batch_size": row["batch_size"],
                "wall_per_example_s": row["wall_per_example_s"],
                "cpu_per_example_s": row["cpu_per_example_s"],
                "speedup_cpu": reference["cpu_per_example_s"]
                / row["cpu_per_example_s"],
                "nfe_mean": row["nfe_mean"],
                "speedup": reference["wall_per_example_s"] / row["wall_per_example_s"],
                "speedup_over_batched": batched["wall_per_example_s"]
                / row["wall_per_example_s"],
                "max_abs_error": float(np.max(np.abs(ours - tight))),
                "max_abs_difference_to_reference": float(np.max(np.abs(ours - theirs))),
            }
        )
    return result


# --- report ---------------------------------------------------------------------------


def _targets_report(targets) -> str:
    """One line per measured ratio that misses its target; a summary line first."""
    overheads = targets["overhead_ratios"]
    speedups = targets["speedups"]
    missed = [
        f"  overhead {key}: {value:.2f} > {TARGET_OVERHEAD}"
        for key, value in overheads.items()
        if value > TARGET_OVERHEAD
    ] + [
        f"  speed-up {key}: {value:.1f}x < {TARGET_SPEEDUP:g}x"
        for key, value in speedups.items()
        if value < TARGET_SPEEDUP
    ]
    num_overheads_met = sum(value <= TARGET_OVERHEAD for value in overheads.values())
    num_speedups_met = sum(value >= TARGET_SPEEDUP for value in speedups.values())
    summary = (
        f"targets: overhead <= {TARGET_OVERHEAD} in {num_overheads_met} of "
        f"{len(overheads)} rows; speed-up >= {TARGET_SPEEDUP:g}x in "
        f"{num_speedups_met} of {len(speedups)} comparisons"
    )
    return "\n".join([summary, *(["missed:", *missed] if missed else [])])


def _table(rows, references) -> str:
    lines = [
        f"{'model':<8} {'D':>4} {'divergence':<10} {'dtype':<7} {'norm':<5} "
        f"{'batch':>5} {'NFE mean/max':>12} {'ms/example':>10} {'ms/NFE':>8} "
        f"{'raw ms':>8} {'overhead':>8} {'(cpu)':>6} {'(arith)':>7} {'log-lik':>10}"
    ]
    for row in rows:
        divergence = row["divergence"]
        if divergence == "hutchinson":
            divergence = f"hutch x{row['num_probes']}"
        lines.append(
            f"{row['name']:<8} {row['num_dims']:>4} {divergence:<10} "
            f"{row['dtype']:<7} {row['error_norm']:<5} {row['batch_size']:>5} "
            f"{row['nfe_mean']:>6.0f}/{row['nfe_max']:<5d} "
            f"{1e3 * row['wall_per_example_s']:>10.3f} "
            f"{1e3 * row['wall_per_evaluation_s']:>8.3f} "
            f"{1e3 * row['raw_evaluation_s']:>8.3f} "
            f"{row['overhead_ratio']:>8.2f} {row['overhead_ratio_cpu']:>6.2f} "
            f"{row['overhead_ratio_from_solver_arithmetic']:>7.2f} "
            f"{row['log_likelihood_mean']:>10.3f}"
        )
    lines.append("")
    lines.append(
        f"{'against scipy RK45 on the host':<32} {'ms/example':>10} {'NFE':>5} "
        f"{'max |error|':>11} {'speed-up':>8} {'(cpu)':>6} {'vs batch':>8}"
    )
    for ref in references:
        label = f"{ref['name']} {ref['divergence']} {ref['dtype']}: scipy"
        wall = 1e3 * ref["reference_wall_per_example_s"]
        lines.append(
            f"{label:<32} {wall:>10.3f} {ref['reference_nfe_mean']:>5.0f} "
            f"{ref['reference_max_abs_error']:>11.2e}"
        )
        batched = ref["batched_reference"]
        label = f"  scipy, whole batch {batched['batch_size']}"
        lines.append(
            f"{label:<32} {1e3 * batched['wall_per_example_s']:>10.3f} "
            f"{batched['nfe']:>5d} {batched['max_abs_error']:>11.2e}"
        )
        for ours in ref["ours"]:
            tag = f"  ours, {ours['error_norm']} norm, batch {ours['batch_size']}"
            lines.append(
                f"{tag:<32} {1e3 * ours['wall_per_example_s']:>10.3f} "
                f"{ours['nfe_mean']:>5.0f} {ours['max_abs_error']:>11.2e} "
                f"{ours['speedup']:>8.1f} {ours['speedup_cpu']:>6.1f} "
                f"{ours['speedup_over_batched']:>8.1f}"
            )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="small sizes; no JSON unless --output"
    )
    parser.add_argument(
        "--output", type=Path, help=f"where the JSON goes (default {RESULTS_PATH})"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    started = time.perf_counter()
    load_before = os.getloadavg()

    repeats = 1 if quick else 7
    batch_2d = 64 if quick else 512
    batch_784 = 4 if quick else 128
    batch_784_exact = 1 if quick else 2
    batch_conv = 2 if quick else 32

    mixture = _mixture()
    model_2d = train_2d_mlp(mixture, 200 if quick else 3000, key=jax.random.key(0))
    x_2d = jax.vmap(lambda k: mixture.sample(key=k))(
        jax.random.split(jax.random.key(1), batch_2d)
    )
    model_784 = networks.MLPDenoiser(
        (28, 28, 1), width_size=256, depth=2, key=jax.random.key(2)
    )
    x_784 = _images(batch_784, key=jax.random.key(3))
    model_conv = networks.ConvDenoiser(
        (28, 28, 1), channels=32, depth=2, key=jax.random.key(4)
    )
    x_conv = x_784[:batch_conv]

    f32, f64 = jnp.float32, jnp.float64
    # (key, model name, model, data, divergence, probes, dtype, error norm)
    plan = [
        ("2d_exact_f32", "mlp-2d", model_2d, x_2d, "exact", 1, f32, "split"),
        ("2d_exact_f64", "mlp-2d", model_2d, x_2d, "exact", 1, f64, "split"),
        ("2d_exact_f64_rms", "mlp-2d", model_2d, x_2d, "exact", 1, f64, "rms"),
        ("2d_hutch1_f32", "mlp-2d", model_2d, x_2d, "hutchinson", 1, f32, "split"),
        ("2d_hutch16_f32", "mlp-2d", model_2d, x_2d, "hutchinson", 16, f32, "split"),
        ("784_hutch1_f32", "mlp-784", model_784, x_784, "hutchinson", 1, f32, "split"),
        ("784_hutch1_f64", "mlp-784", model_784, x_784, "hutchinson", 1, f64, "split"),
        (
            "784_hutch1_f64_rms",
            "mlp-784",
            model_784,
            x_784,
            "hutchinson",
            1,
            f64,
            "rms",
        ),
        (
            "784_exact_f32",
            "mlp-784",
            model_784,
            x_784[:batch_784_exact],
            "exact",
            1,
            f32,
            "split",
        ),
        (
            "conv_hutch1_f32",
            "conv-784",
            model_conv,
            x_conv,
            "hutchinson",
            1,
            f32,
            "split",
        ),
    ]
    rows = {}
    for key, name, model, x, divergence, num_probes, dtype, norm in plan:
        expensive = name == "conv-784" or (divergence == "exact" and name == "mlp-784")
        row = measure(
            name,
            model,
            x,
            divergence=divergence,
            num_probes=num_probes,
            dtype=dtype,
            norm=norm,
            repeats=min(repeats, 2) if expensive else repeats,
        )
        rows[key] = row
        print(
            f"measured {key}: {row['wall_per_example_s'] * 1e3:.2f} ms/example, "
            f"overhead {row['overhead_ratio']:.2f} "
            f"(cpu {row['overhead_ratio_cpu']:.2f})",
            flush=True,
        )

    # (model name, model, data, rows timed against the reference, examples it solves)
    compared = [
        ("mlp-2d", model_2d, x_2d, ["2d_exact_f64", "2d_exact_f64_rms"], 16),
        ("mlp-784", model_784, x_784, ["784_hutch1_f64", "784_hutch1_f64_rms"], 4),
        ("conv-784", model_conv, x_conv, ["conv_hutch1_f32"], 4),
    ]
    references = [
        compare_with_reference(
            name,
            model,
            x,
            [rows[key] for key in keys],
            num_examples=1 if quick else num_examples,
        )
        for name, model, x, keys, num_examples in compared
    ]

    def values(key):
        return np.asarray(rows[key]["log_likelihoods"])

    exact_784 = values("784_exact_f32")
    exact_2d = values("2d_exact_f64")
    comparisons = {
        "mlp-2d_float32_minus_float64_max_abs": float(
            np.max(np.abs(values("2d_exact_f32") - exact_2d))
        ),
        "mlp-2d_hutchinson1_minus_exact_rms": float(
            np.sqrt(np.mean((values("2d_hutch1_f32") - exact_2d) ** 2))
        ),
        "mlp-2d_hutchinson16_minus_exact_rms": float(
            np.sqrt(np.mean((values("2d_hutch16_f32") - exact_2d) ** 2))
        ),
        "mlp-2d_hutchinson16_mean_std_error": rows["2d_hutch16_f32"]["std_error_mean"],
        "mlp-784_hutchinson1_minus_exact": (
            values("784_hutch1_f32")[: exact_784.shape[0]] - exact_784
        ).tolist(),
        "mlp-784_float32_minus_float64_max_abs": float(
            np.max(np.abs(values("784_hutch1_f32") - values("784_hutch1_f64")))
        ),
    }
    overheads = {key: row["overhead_ratio"] for key, row in rows.items()}
    overheads_cpu = {key: row["overhead_ratio_cpu"] for key, row in rows.items()}
    speedups = {
        f"{ref['name']}_{ours['error_norm']}": ours["speedup"]
        for ref in references
        for ours in ref["ours"]
    }
    speedups_over_batched = {
        f"{ref['name']}_{ours['error_norm']}": ours["speedup_over_batched"]
        for ref in references
        for ours in ref["ours"]
    }
    speedups_cpu = {
        f"{ref['name']}_{ours['error_norm']}": ours["speedup_cpu"]
        for ref in references
        for ours in ref["ours"]
    }
    results = {
        "machine": _machine(),
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "total_wall_s": time.perf_counter() - started,
        "settings": {
            "logsnr_min": LOGSNR_MIN,
            "logsnr_max": LOGSNR_MAX,
            "rtol": RTOL,
            "atol": ATOL,
            "tight_tolerance_for_errors": TIGHT,
            "solver": "Tsit5 + PID controller (ours); RK45 (scipy reference)",
            "error_norms": {
                "split": "ours by default: max of the RMS errors of z and of the "
                "log-density accumulator",
                "rms": "one RMS over the whole state, as scipy's RK45",
            },
            "raw_evaluations_per_timing": RAW_EVALUATIONS,
            "repeats": repeats,
            "timing": "best of the repeats, after compilation; our solve and the "
            "raw evaluation loop timed alternately",
            "models": {
                "mlp-2d": "MLPDenoiser((2,), width 64, depth 2), trained with the "
                "ELBO loss on a 3-component Gaussian mixture",
                "mlp-784": "MLPDenoiser((28, 28, 1), width 256, depth 2), random "
                "initialisation; data: random 8-bit images, dequantised",
                "conv-784": "ConvDenoiser((28, 28, 1), 32 channels, 2 residual "
                "blocks, channels-last), random initialisation; same data",
            },
        },
        "rows": rows,
        "references": references,
        "comparisons": comparisons,
        "targets": {
            "overhead_ratio_at_most": TARGET_OVERHEAD,
            "overhead_ratios": overheads,
            "overhead_ratios_cpu": overheads_cpu,
            "overhead_target_met": max(overheads.values()) <= TARGET_OVERHEAD,
            "overhead_target_met_cpu": max(overheads_cpu.values()) <= TARGET_OVERHEAD,
            "speedup_at_least": TARGET_SPEEDUP,
            "speedups": speedups,
            "speedups_cpu": speedups_cpu,
            "speedup_target_met": min(speedups.values()) >= TARGET_SPEEDUP,
            "speedup_target_met_cpu": min(speedups_cpu.values()) >= TARGET_SPEEDUP,
            "speedups_over_batched_reference": speedups_over_batched,
        },
    }
    print(_table(list(rows.values()), references))
    print(_targets_report(results["targets"]))
    print(f"total {results['total_wall_s']:.0f} s; load average {load_before}")
    output = RESULTS_PATH if args.output is None and not quick else args.output
    if output is not None:
        _io.write_json(output, results)
        print(f"wrote {output}")
    return results


if __name__ == "__main__":
    main()
