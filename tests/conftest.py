"""Shared test configuration.

Numerical checks run in 64-bit precision: tolerances in the tests are derived from
the numerics (quadrature order, solver tolerance, Monte Carlo standard error), and
float32 rounding would swamp them. Float32 behaviour is tested explicitly with
`dtype=jnp.float32` arrays, which stay 32-bit with x64 enabled.

Notebook smoke tests use the `run_quick_notebook` fixture, which executes a notebook
through the reproduction runner under the `quick` preset and returns its metrics.
"""

import json
from collections.abc import Callable
from pathlib import Path

import jax
import pytest

jax.config.update("jax_enable_x64", True)


class NotebookMetrics(dict):
    """A notebook's parsed `metrics.json`; `output_dir` is where it wrote files."""

    output_dir: Path


@pytest.fixture(scope="session")
def run_quick_notebook(tmp_path_factory) -> Callable[..., dict]:
    """Return `run(name, *, notebooks_dir=None) -> metrics` for notebook smoke tests.

    The notebook runs on a real kernel through `elbo_core.reproduce.run("quick",
    [name])`, into a temporary build directory (never the repository's `build/`). A
    failure fails the calling test with the notebook's error and the path of the
    executed copy. Each notebook runs at most once per session; later calls read its
    metrics again.
    """
    from elbo_core import reproduce

    build_dir = tmp_path_factory.mktemp("build")
    results = {}

    def run(name: str, *, notebooks_dir: str | Path | None = None) -> dict:
        key = (name, None if notebooks_dir is None else str(notebooks_dir))
        if key not in results:
            # One build directory per run, so that equal names never collide.
            [results[key]] = reproduce.run(
                "quick",
                [name],
                notebooks_dir=notebooks_dir,
                build_dir=build_dir / f"run{len(results)}",
            )
        result = results[key]
        if not result.ok:
            pytest.fail(
                f"notebook {name} failed under the quick preset: {result.error}\n"
                f"executed notebook: {result.executed}",
                pytrace=False,
            )
        metrics = NotebookMetrics(json.loads(result.metrics_path.read_text()))
        metrics.output_dir = result.metrics_path.parent
        return metrics

    return run
