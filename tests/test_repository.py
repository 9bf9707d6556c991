"""Repository invariants: environments agree, notebooks are clean, presets are valid.

These checks hold for any number of notebooks, zero included, and keep holding as
notebooks and preset entries are added.
"""

import ast
import os
import re
import shutil
import subprocess
import tomllib

import nbformat
import papermill
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from elbo_core import likelihood, reproduce

ROOT = reproduce.repo_root()
NOTEBOOKS_DIR = ROOT / "notebooks"
NOTEBOOK_PATHS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
PRESET_PATHS = [NOTEBOOKS_DIR / "presets" / f"{p}.yaml" for p in reproduce.PRESETS]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _dependency_names(project: dict) -> set[str]:
    """Canonical names of every dependency, optional extras included."""
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements.extend(extra)
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def test_environment_yml_installs_the_package_from_pyproject():
    project = _pyproject()["project"]
    environment = yaml.safe_load((ROOT / "environment.yml").read_text("utf-8"))
    assert "conda-forge" in environment["channels"]

    conda = [d for d in environment["dependencies"] if isinstance(d, str)]
    pip_sections = [
        d["pip"] for d in environment["dependencies"] if isinstance(d, dict)
    ]
    assert len(pip_sections) == 1, "environment.yml needs exactly one pip section"
    [pip] = pip_sections

    # Conda supplies Python and pip; pip installs the package with its dev extra.
    conda_names = {re.split(r"[=<>!~ ]", d, maxsplit=1)[0]: d for d in conda}
    assert {"python", "pip"} <= set(conda_names)
    normalised_pip = [re.sub(r"[\s'\"]", "", entry) for entry in pip]
    assert "-e.[dev]" in normalised_pip, "the pip section must install -e .[dev]"

    # Anything else listed must be a dependency that pyproject.toml already declares.
    declared = _dependency_names(project)
    extra_conda = {canonicalize_name(n) for n in conda_names} - {"python", "pip"}
    extra_pip = {
        canonicalize_name(Requirement(entry).name)
        for entry in pip
        if not entry.lstrip().startswith("-")
    }
    assert extra_conda <= declared, f"not in pyproject.toml: {extra_conda - declared}"
    assert extra_pip <= declared, f"not in pyproject.toml: {extra_pip - declared}"

    # The pinned Python satisfies requires-python.
    match = re.fullmatch(r"python\s*=+\s*([0-9.]+)\*?", conda_names["python"])
    assert match, f"pin Python to a version, got {conda_names['python']!r}"
    assert SpecifierSet(project["requires-python"]).contains(match[1] + ".0")


def test_notebooks_follow_the_naming_scheme():
    for path in NOTEBOOK_PATHS:
        assert reproduce.NOTEBOOK_PATTERN.match(path.name), (
            f"{path.name} must be named NN_name.ipynb to be found by the runner"
        )


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=lambda path: path.stem)
def test_notebook_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert "papermill" not in notebook.metadata, "this is an executed copy"
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        assert cell.outputs == [], f"cell {index} of {path.name} carries outputs"
        assert cell.execution_count is None, (
            f"cell {index} of {path.name} carries an execution count"
        )


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=lambda path: path.stem)
def test_notebook_has_parameters_cell_with_injected_names(path):
    notebook = nbformat.read(path, as_version=4)
    assert notebook.metadata.get("kernelspec", {}).get("name") == reproduce.KERNEL_NAME
    tagged = [
        cell
        for cell in notebook.cells
        if "parameters" in cell.get("metadata", {}).get("tags", [])
    ]
    assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
    assert tagged[0].cell_type == "code"

    parameters = papermill.inspect_notebook(str(path))
    for name in reproduce.INJECTED_PARAMETERS:
        assert name in parameters, f"{path.name} must define {name} in its parameters"

    # The defaults are the quick preset, writing where the runner's quick run writes.
    assert ast.literal_eval(parameters["preset"]["default"]) == "quick"
    output_dir = ast.literal_eval(parameters["output_dir"]["default"])
    assert output_dir == f"build/quick/{path.stem}"


@pytest.mark.parametrize("path", PRESET_PATHS, ids=lambda path: path.stem)
def test_preset_names_existing_notebooks_and_parameters(path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#"), f"{path.name} must open with a comment on the preset"
    entries = reproduce.load_preset(path.stem, NOTEBOOKS_DIR)

    notebooks = reproduce.find_notebooks(NOTEBOOKS_DIR)
    for name, parameters in entries.items():
        assert name in notebooks, f"{path.name} names a missing notebook {name!r}"
        declared = papermill.inspect_notebook(str(notebooks[name]))
        for parameter in parameters:
            assert parameter in declared, (
                f"{path.name}: {name} has no parameter {parameter!r}; "
                f"it has {sorted(declared)}"
            )
            assert parameter not in reproduce.INJECTED_PARAMETERS


def test_ci_runs_the_readme_test_command():
    script = ROOT / ".ci" / "run"
    text = script.read_text(encoding="utf-8")
    assert os.access(script, os.X_OK), ".ci/run must be executable"
    assert text.startswith("#!") and "bash" in text.splitlines()[0]
    assert "set -euo pipefail" in text
    assert re.search(r"^\s*make test\s*$", text, re.MULTILINE)
    assert "make test" in (ROOT / "README.md").read_text(encoding="utf-8")


def _dry_run(target: str) -> str:
    """What `make` would run for `target` on a fresh checkout (nothing is run)."""
    process = subprocess.run(
        ["make", "--dry-run", "--always-make", target],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert process.returncode == 0, process.stderr
    return process.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
@pytest.mark.parametrize(
    "target", ["test", "figures", "quick", "lab", "lint", "format", "bench", "clean"]
)
def test_makefile_defines_target(target):
    # A dry run parses the Makefile and resolves the target without running it.
    _dry_run(target)


@pytest.mark.skipif(
    shutil.which("git") is None or not (ROOT / ".git").exists(),
    reason="not a git checkout",
)
@pytest.mark.parametrize(
    ("path", "ignored"),
    [
        (".venv/bin/python", True),
        ("build/quick/01_x.ipynb", True),
        ("build/cpu/summary.json", True),
        ("data/cache/mnist.zip", True),
        ("elbo_core/__pycache__/x.pyc", True),
        ("figures/01_x/metrics.json", False),
        ("figures/01_x/weighting.pdf", False),
        ("notebooks/01_x.ipynb", False),
        ("notebooks/presets/cpu.yaml", False),
        ("data/README.md", False),
    ],
)
def test_gitignore(path, ignored):
    process = subprocess.run(
        ["git", "check-ignore", "--quiet", "--no-index", path],
        cwd=ROOT,
        capture_output=True,
        timeout=30,
    )
    assert process.returncode in (0, 1), process.stderr
    assert (process.returncode == 0) == ignored, (
        f"{path} should {'' if ignored else 'not '}be ignored"
    )


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
@pytest.mark.parametrize(
    ("target", "command"),
    [
        ("test", "-m pytest tests/"),
        ("figures", "-m elbo_core.reproduce --preset cpu"),
    ],
)
def test_readme_commands_install_then_run(target, command):
    # Each of the README's two commands builds .venv and installs the package with
    # its dev extra before it runs, so that it works on a fresh clone.
    lines = _dry_run(target).splitlines()
    install = [i for i, line in enumerate(lines) if "pip install -e '.[dev]'" in line]
    run = [i for i, line in enumerate(lines) if command in line]
    assert install and run, lines
    assert install[0] < run[0], "the package must be installed before it runs"
    assert any("-m venv .venv" in line for line in lines[: install[0]])


def _committed_figures() -> set[str]:
    return {
        str(path.relative_to(ROOT / "figures").with_suffix(""))
        for path in (ROOT / "figures").glob("*/*.png")
    }


def test_every_committed_figure_has_a_pdf_and_a_place_in_the_gallery():
    figures = _committed_figures()
    assert figures, "figures/ holds the committed cpu-preset figures"
    gallery = (ROOT / "figures" / "README.md").read_text(encoding="utf-8")
    shown = set(re.findall(r"\]\(([0-9]{2}_\w+/\w+)\.png\)", gallery))
    assert shown == figures, (
        f"missing from figures/README.md: {sorted(figures - shown)}; "
        f"shown there but not committed: {sorted(shown - figures)}"
    )
    for figure in figures:
        assert (ROOT / "figures" / f"{figure}.pdf").is_file(), figure
    for folder in {figure.split("/")[0] for figure in figures}:
        assert (ROOT / "figures" / folder / "metrics.json").is_file(), folder


def test_readme_names_every_notebook_and_its_figures():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for path in NOTEBOOK_PATHS:
        assert f"`{path.stem}`" in readme, f"README.md does not name {path.stem}"
    for figure in _committed_figures():
        folder, name = figure.split("/")
        row = next(line for line in readme.splitlines() if f"`{folder}`" in line)
        assert f"`{name}`" in row, f"README's row of {folder} does not list {name}"


def test_data_readme_exists():
    assert (ROOT / "data" / "README.md").is_file()


# Solver error allowed for the README's likelihood at the default tolerances.
README_SOLVER_TOLERANCE = 1e-3


def _readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)


def test_readme_python_example_runs_and_says_what_it_shows():
    """The README's library example runs as written, and its comments are true."""
    [source] = _readme_python_blocks()
    namespace: dict = {}
    exec(compile(source, "README.md", "exec"), namespace)

    # "True: computed from d log w / dlogsnr" for the example's softplus weighting.
    assert namespace["w"].is_monotonic()
    # The Monte Carlo estimate agrees with the quadrature within 4 standard errors.
    estimate, exact = namespace["estimate"], float(namespace["exact"])
    assert abs(float(estimate.mean) - exact) < 4 * float(estimate.stderr)
    stats = namespace["stats"]
    assert bool(stats["successful"]) and int(stats["num_function_evaluations"]) > 0

    # The ODE log-likelihood is the exact density of x read off z_max, up to the
    # error of the N(0, I) prior at z_min (known exactly for the oracle) and the
    # solver's error at the default rtol = atol = 1e-5 (below 2e-4 nats on the
    # oracle in notebook 04; README_SOLVER_TOLERANCE leaves a factor of 5).
    data, x, z_min = namespace["data"], namespace["x"], stats["z_min"]
    exact = data.perturbed_log_prob(x, 10.0)
    prior_error = likelihood.StandardNormal().log_prob(
        z_min, -10.0
    ) - data.marginal_log_prob(z_min, -10.0)
    residual = float(namespace["log_p"] - exact - prior_error)
    assert abs(residual) < README_SOLVER_TOLERANCE, residual
