"""Re-run the notebooks at a chosen scale with papermill and collect their outputs.

Notebooks live in `notebooks/NN_name.ipynb`; a notebook's name is its file stem, such
as `01_weighting_functions`. Each preset, `notebooks/presets/<preset>.yaml`, maps
notebook names to parameter values; a notebook the preset does not name runs with the
defaults of its `parameters` cell, which are the `quick` preset.

The runner injects two parameters into every notebook: `preset`, the preset's name,
and `output_dir`, an absolute path where the notebook writes its figures and its
`metrics.json`. For `cpu` and `gpu` that is `figures/<name>` (the committed figures);
for `quick` it is `build/quick/<name>`. The executed notebook is saved as
`build/<preset>/<name>.ipynb` and a run summary as `build/<preset>/summary.json`.

Command line (see `--help`):

    python -m elbo_core.reproduce --preset cpu
    python -m elbo_core.reproduce --preset quick --notebooks 01_weighting_functions
    python -m elbo_core.reproduce --list

From Python, `run(preset, notebooks)` does the same and returns one `Result` per
notebook; it prints nothing unless asked for progress bars.
"""

import argparse
import dataclasses
import datetime
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ._io import write_json

__all__ = [
    "INJECTED_PARAMETERS",
    "PRESETS",
    "ConfigurationError",
    "Result",
    "find_notebooks",
    "format_summary",
    "load_preset",
    "main",
    "notebook_parameters",
    "repo_root",
    "resolve_output_dir",
    "run",
]

PRESETS = ("quick", "cpu", "gpu")
# Presets whose outputs are the committed figures; the others write under build/.
FIGURE_PRESETS = frozenset({"cpu", "gpu"})
INJECTED_PARAMETERS = ("output_dir", "preset")
KERNEL_NAME = "python3"
PARAMETERS_TAG = "parameters"
METRICS_FILE = "metrics.json"
SUMMARY_FILE = "summary.json"
NOTEBOOK_PATTERN = re.compile(r"^(?P<name>[0-9]{2}_[A-Za-z0-9_]+)\.ipynb$")


class ConfigurationError(ValueError):
    """A preset, notebook or parameter name that the runner cannot use."""


@dataclasses.dataclass(frozen=True)
class Result:
    """Outcome of executing one notebook.

    **Fields:**

    - `name`: the notebook's name, e.g. `01_weighting_functions`.
    - `ok`: whether it ran to the end and wrote its `metrics.json`.
    - `wall_s`: wall-clock seconds, kernel start-up included.
    - `executed`: the executed copy of the notebook, outputs included.
    - `output_dir`: where the notebook wrote its figures and `metrics.json`.
    - `parameters`: every parameter injected, `output_dir` and `preset` included.
    - `error`: the last line of the error for a failed notebook, else `None`.
    """

    name: str
    ok: bool
    wall_s: float
    executed: Path
    output_dir: Path
    parameters: dict[str, Any]
    error: str | None = None

    @property
    def status(self) -> str:
        """`"ok"` or `"failed"`."""
        return "ok" if self.ok else "failed"

    @property
    def metrics_path(self) -> Path:
        """The `metrics.json` the notebook wrote."""
        return self.output_dir / METRICS_FILE


@dataclasses.dataclass(frozen=True)
class _Job:
    """One notebook to execute, fully resolved."""

    name: str
    source: Path
    executed: Path
    output_dir: Path
    parameters: dict[str, Any]


def repo_root() -> Path:
    """The checkout that holds this package (an editable install is assumed)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise FileNotFoundError(
            f"{root} is not the elbo_core repository (no pyproject.toml); install the "
            "package in editable mode (`pip install -e .`) or pass the directories "
            "explicitly"
        )
    return root


def resolve_output_dir(output_dir: str | os.PathLike) -> Path:
    """Turn a notebook's `output_dir` parameter into an absolute, existing directory.

    The runner always injects an absolute path. A relative default, as written in a
    notebook's `parameters` cell, is taken relative to the repository root, so that a
    notebook opened in JupyterLab (whose working directory is `notebooks/`) writes to
    the same place as the runner.
    """
    path = Path(output_dir)
    if not path.is_absolute():
        path = repo_root() / path
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_metrics(output_dir: str | os.PathLike, metrics: Mapping[str, Any]) -> Path:
    """Write a notebook's `metrics.json` into `output_dir`, atomically.

    The runner reads this file to decide that a notebook finished. Arrays and numpy
    scalars become lists and numbers; a NaN or infinity is an error naming its key.

    **Returns:** the path written.
    """
    return write_json(Path(output_dir) / METRICS_FILE, metrics)


def _names(names: Sequence[str]) -> str:
    """Comma-separated names for an error message."""
    return ", ".join(names) if names else "(none)"


def find_notebooks(notebooks_dir: str | os.PathLike) -> dict[str, Path]:
    """Map notebook names to paths for every `NN_name.ipynb` in `notebooks_dir`."""
    notebooks_dir = Path(notebooks_dir)
    if not notebooks_dir.is_dir():
        return {}
    found = {}
    for path in sorted(notebooks_dir.iterdir()):
        match = NOTEBOOK_PATTERN.match(path.name)
        if match and path.is_file():
            found[match["name"]] = path
    return found


def _preset_path(preset: str, notebooks_dir: Path) -> Path:
    return notebooks_dir / "presets" / f"{preset}.yaml"


def load_preset(
    preset: str, notebooks_dir: str | os.PathLike
) -> dict[str, dict[str, Any]]:
    """Read `presets/<preset>.yaml` as {notebook name: {parameter: value}}.

    Only the file's structure is checked here; `run` checks the names against the
    notebooks.
    """
    if preset not in PRESETS:
        raise ConfigurationError(
            f"unknown preset {preset!r}; valid presets: {_names(PRESETS)}."
        )
    path = _preset_path(preset, Path(notebooks_dir))
    if not path.is_file():
        raise ConfigurationError(
            f"preset {preset!r} has no file {path}; create it (an empty mapping `{{}}` "
            "is fine)."
        )
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        detail = " ".join(str(error).split())
        raise ConfigurationError(f"{path} is not valid YAML: {detail}") from None

    if content is None:
        return {}
    if not isinstance(content, Mapping):
        raise ConfigurationError(
            f"{path} must be a mapping from notebook name to parameters, "
            f"got a {type(content).__name__}."
        )
    entries = {}
    for name, parameters in content.items():
        if parameters is None:
            parameters = {}
        if not isinstance(parameters, Mapping) or not all(
            isinstance(key, str) for key in parameters
        ):
            raise ConfigurationError(
                f"{path}: the entry for {name!r} must be a mapping from parameter "
                f"name to value, got {parameters!r}."
            )
        entries[str(name)] = dict(parameters)
    return entries


def notebook_parameters(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The parameters that a notebook's `parameters` cell defines, by name.

    A thin wrapper of `papermill.inspect_notebook`: each value holds `name`,
    `inferred_type_name`, `default` (as source text) and `help`. Empty when the
    notebook has no cell tagged `parameters`.
    """
    import papermill

    try:
        return papermill.inspect_notebook(str(path))
    except Exception as error:
        raise ConfigurationError(
            f"cannot read the parameters of {path}: {type(error).__name__}: {error}"
        ) from None


def _has_parameters_cell(path: Path) -> bool:
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    return any(
        PARAMETERS_TAG in cell.get("metadata", {}).get("tags", [])
        for cell in notebook.cells
    )


def _plan(
    preset: str,
    notebooks: Sequence[str] | None,
    notebooks_dir: Path,
    build_dir: Path,
    figures_dir: Path,
) -> list[_Job]:
    """Check every name against the files and resolve the jobs; execute nothing."""
    # Names: preset, requested notebooks, notebooks named by the preset.
    entries = load_preset(preset, notebooks_dir)
    available = find_notebooks(notebooks_dir)
    valid = _names(list(available))
    if notebooks is None:
        selected = list(available)
    else:
        selected = list(dict.fromkeys(notebooks))
        unknown = [name for name in selected if name not in available]
        if unknown:
            raise ConfigurationError(
                f"unknown notebook {_names(unknown)} in {notebooks_dir}; "
                f"valid notebooks: {valid}."
            )
    unknown = [name for name in entries if name not in available]
    if unknown:
        raise ConfigurationError(
            f"preset {preset!r} ({_preset_path(preset, notebooks_dir)}) names "
            f"notebook {_names(unknown)}, which does not exist in {notebooks_dir}; "
            f"valid notebooks: {valid}."
        )

    # Parameters: the injected ones must exist, the preset's must be declared.
    problems = []
    declared = {
        name: notebook_parameters(available[name])
        for name in dict.fromkeys([*selected, *entries])
    }
    for name in selected:
        missing = [p for p in INJECTED_PARAMETERS if p not in declared[name]]
        if not missing:
            continue
        if _has_parameters_cell(available[name]):
            found = f"it defines: {_names(list(declared[name]))}"
        else:
            found = f"it has no cell tagged {PARAMETERS_TAG!r}"
        problems.append(
            f"notebook {name!r} ({available[name]}) must define "
            f"{_names(missing)} in its parameters cell; {found}."
        )
    for name, parameters in entries.items():
        reserved = [p for p in parameters if p in INJECTED_PARAMETERS]
        if reserved:
            problems.append(
                f"preset {preset!r} sets {_names(reserved)} for notebook {name!r}, "
                f"but the runner sets {_names(INJECTED_PARAMETERS)} itself."
            )
        unknown = [p for p in parameters if p not in declared[name]]
        if unknown:
            settable = [p for p in declared[name] if p not in INJECTED_PARAMETERS]
            problems.append(
                f"preset {preset!r} sets parameter {_names(unknown)} for notebook "
                f"{name!r}, which its parameters cell does not define; valid "
                f"parameters: {_names(settable)}."
            )
    if problems:
        raise ConfigurationError(" ".join(problems))

    # Paths: executed copies under build/, outputs under figures/ or build/.
    jobs = []
    for name in selected:
        if preset in FIGURE_PRESETS:
            output_dir = figures_dir / name
        else:
            output_dir = build_dir / preset / name
        parameters = {
            **entries.get(name, {}),
            "output_dir": str(output_dir),
            "preset": preset,
        }
        jobs.append(
            _Job(
                name=name,
                source=available[name],
                executed=build_dir / preset / f"{name}.ipynb",
                output_dir=output_dir,
                parameters=parameters,
            )
        )
    return jobs


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _error_line(error: Exception) -> str:
    """The one line that says what went wrong, as Python's traceback ends."""
    from papermill.exceptions import PapermillExecutionError

    if isinstance(error, PapermillExecutionError):
        evalue = _last_line(str(error.evalue))
        return f"{error.ename}: {evalue}" if evalue else str(error.ename)
    message = _last_line(str(error))
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _file_state(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def _execute(
    job: _Job, *, cwd: Path, kernel_name: str, start_timeout: int, progress: bool
) -> Result:
    """Execute one notebook, catching its failure into the result."""
    import papermill

    job.output_dir.mkdir(parents=True, exist_ok=True)
    job.executed.parent.mkdir(parents=True, exist_ok=True)
    metrics_path = job.output_dir / METRICS_FILE
    metrics_before = _file_state(metrics_path)

    start = time.perf_counter()
    error = None
    try:
        papermill.execute_notebook(
            str(job.source),
            str(job.executed),
            parameters=job.parameters,
            kernel_name=kernel_name,
            progress_bar={"desc": job.name, "leave": False} if progress else False,
            cwd=str(cwd),
            start_timeout=start_timeout,
        )
    except Exception as exception:
        error = _error_line(exception)
    wall_s = time.perf_counter() - start

    # A notebook that finished without (re)writing its metrics has not done its job.
    metrics_after = _file_state(metrics_path)
    if error is None and (metrics_after is None or metrics_after == metrics_before):
        error = (
            f"the notebook finished without writing {METRICS_FILE} to its output_dir "
            f"({job.output_dir})"
        )
    return Result(
        name=job.name,
        ok=error is None,
        wall_s=wall_s,
        executed=job.executed,
        output_dir=job.output_dir,
        parameters=job.parameters,
        error=error,
    )


def _write_summary(
    path: Path, preset: str, started: str, results: Sequence[Result]
) -> None:
    write_json(
        path,
        {
            "preset": preset,
            "started": started,
            "python": sys.version.split()[0],
            "num_ok": sum(result.ok for result in results),
            "num_failed": sum(not result.ok for result in results),
            "wall_s": sum(result.wall_s for result in results),
            "notebooks": [
                {
                    **dataclasses.asdict(result),
                    "status": result.status,
                    "metrics": result.metrics_path,
                }
                for result in results
            ],
        },
    )


def run(
    preset: str,
    notebooks: Sequence[str] | None = None,
    *,
    notebooks_dir: str | os.PathLike | None = None,
    build_dir: str | os.PathLike | None = None,
    figures_dir: str | os.PathLike | None = None,
    cwd: str | os.PathLike | None = None,
    kernel_name: str = KERNEL_NAME,
    start_timeout: int = 60,
    progress: bool = False,
) -> list[Result]:
    """Execute notebooks under a preset and return one result per notebook.

    Every name is checked before anything runs. A failing notebook does not stop the
    others; its result carries the error. `build/<preset>/summary.json` is rewritten
    after each notebook.

    **Arguments:**

    - `preset`: `"quick"`, `"cpu"` or `"gpu"`.
    - `notebooks`: names to run, in this order; all notebooks when `None`.
    - `notebooks_dir`: defaults to `notebooks/` in the repository root.
    - `build_dir`: defaults to `build/`; executed notebooks, summaries and the
      `quick` outputs go here.
    - `figures_dir`: defaults to `figures/`; outputs of `cpu` and `gpu` go here.
    - `cwd`: the working directory of the kernels; defaults to the repository root.
    - `kernel_name`: the Jupyter kernel to execute with.
    - `start_timeout`: seconds to wait for a kernel to start.
    - `progress`: show a progress bar over notebooks and papermill's bar over cells.

    **Returns:**

    A list of `Result`, in execution order.

    **Raises:**

    `ConfigurationError` for an unknown preset, notebook or parameter, a notebook
    whose parameters cell lacks `output_dir` or `preset`, or a malformed preset file.
    """
    # The repository root is needed only for a directory left to its default.
    root = None
    if None in (notebooks_dir, build_dir, figures_dir, cwd):
        root = repo_root()
    notebooks_dir = Path(notebooks_dir or root / "notebooks").resolve()
    build_dir = Path(build_dir or root / "build").resolve()
    figures_dir = Path(figures_dir or root / "figures").resolve()
    cwd = Path(cwd or root).resolve()

    jobs = _plan(preset, notebooks, notebooks_dir, build_dir, figures_dir)

    from tqdm.auto import tqdm

    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    summary_path = build_dir / preset / SUMMARY_FILE
    results = []
    bar = tqdm(jobs, desc=f"preset {preset}", unit="notebook", disable=not progress)
    for job in bar:
        bar.set_postfix_str(job.name)
        results.append(
            _execute(
                job,
                cwd=cwd,
                kernel_name=kernel_name,
                start_timeout=start_timeout,
                progress=progress,
            )
        )
        _write_summary(summary_path, preset, started, results)
    bar.close()
    if not jobs:
        _write_summary(summary_path, preset, started, results)
    return results


def format_summary(results: Sequence[Result]) -> str:
    """A plain-text table of status and wall time per notebook, failures explained."""
    width = max([len("notebook"), *(len(result.name) for result in results)])
    lines = [f"{'notebook':<{width}}  status  wall time"]
    for result in results:
        status = "ok" if result.ok else "FAILED"
        lines.append(f"{result.name:<{width}}  {status:<6}  {result.wall_s:7.1f} s")
        if not result.ok:
            lines.append(f"    executed notebook: {result.executed}")
            lines.append(f"    {result.error}")
    num_failed = sum(not result.ok for result in results)
    total_s = sum(result.wall_s for result in results)
    lines.append(
        f"{len(results)} notebook(s): {len(results) - num_failed} ok, "
        f"{num_failed} failed, {total_s:.1f} s in all"
    )
    return "\n".join(lines)


def _listing(notebooks_dir: Path, build_dir: Path, figures_dir: Path) -> str:
    """The text that `--list` prints: notebooks with parameters, then presets."""
    lines = [f"notebooks in {notebooks_dir}:"]
    available = find_notebooks(notebooks_dir)
    for name, path in available.items():
        declared = notebook_parameters(path)
        extra = [p for p in declared if p not in INJECTED_PARAMETERS]
        lines.append(f"  {name}  (parameters: {_names(extra)})")
    if not available:
        lines.append("  (none)")

    lines.append(f"presets in {notebooks_dir / 'presets'}:")
    for preset in PRESETS:
        if preset in FIGURE_PRESETS:
            destination = figures_dir / "<name>"
        else:
            destination = build_dir / preset / "<name>"
        try:
            configured = _names(list(load_preset(preset, notebooks_dir)))
        except ConfigurationError as error:
            configured = f"unusable: {error}"
        lines.append(
            f"  {preset:<5}  outputs to {destination}; overrides for: {configured}"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m elbo_core.reproduce",
        description=(
            "Execute the notebooks with papermill under a preset and regenerate "
            "their figures and metrics.json files."
        ),
    )
    parser.add_argument(
        "--preset",
        help=f"scale to run at: {', '.join(PRESETS)} (required unless --list)",
    )
    parser.add_argument(
        "--notebooks",
        nargs="+",
        metavar="NAME",
        help="notebooks to run, such as 01_weighting_functions (default: all)",
    )
    parser.add_argument(
        "--notebooks-dir", type=Path, help="default: notebooks/ in the repository"
    )
    parser.add_argument(
        "--build-dir", type=Path, help="default: build/ in the repository"
    )
    parser.add_argument(
        "--figures-dir", type=Path, help="default: figures/ in the repository"
    )
    parser.add_argument(
        "--list", action="store_true", help="list notebooks and presets, then exit"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for a usage error)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.list:
            root = None
            if None in (args.notebooks_dir, args.build_dir, args.figures_dir):
                root = repo_root()
            print(
                _listing(
                    (args.notebooks_dir or root / "notebooks").resolve(),
                    (args.build_dir or root / "build").resolve(),
                    (args.figures_dir or root / "figures").resolve(),
                )
            )
            return 0
        if args.preset is None:
            parser.error(f"--preset is required: one of {', '.join(PRESETS)}")
        results = run(
            args.preset,
            args.notebooks,
            notebooks_dir=args.notebooks_dir,
            build_dir=args.build_dir,
            figures_dir=args.figures_dir,
            progress=True,
        )
    except (ConfigurationError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    print(format_summary(results))
    build_dir = (args.build_dir or repo_root() / "build").resolve()
    print(f"summary: {build_dir / args.preset / SUMMARY_FILE}")
    return 0 if all(result.ok for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
