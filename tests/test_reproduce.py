"""The reproduction runner on tiny real notebooks executed by a real kernel.

Kernel start-up costs about 2.5 s, so the notebook runs are shared through
module-scoped fixtures: one command-line run of three notebooks under `quick` and one
library run under `cpu`.
"""

import contextlib
import io
import json
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest

from elbo_core import reproduce

PARAMETERS = 'output_dir = "build/quick/test"\npreset = "quick"\nscale = 1\n'
WRITE_METRICS = """\
import json, os, pathlib, sys
metrics = {
    "scale": scale,
    "preset": preset,
    "output_dir": output_dir,
    "sys_prefix": sys.prefix,
    "cwd": os.getcwd(),
}
(pathlib.Path(output_dir) / "metrics.json").write_text(json.dumps(metrics))
"""


def make_notebook(parameters: str | None, *cells: str) -> nbformat.NotebookNode:
    """A notebook with an optional `parameters`-tagged cell followed by `cells`."""
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    notebook.metadata["language_info"] = {"name": "python"}
    notebook.cells.append(nbformat.v4.new_markdown_cell("# A test notebook"))
    if parameters is not None:
        cell = nbformat.v4.new_code_cell(parameters)
        cell.metadata["tags"] = ["parameters"]
        notebook.cells.append(cell)
    notebook.cells.extend(nbformat.v4.new_code_cell(source) for source in cells)
    return notebook


GOOD = make_notebook(PARAMETERS, WRITE_METRICS)
BAD = make_notebook(PARAMETERS, "x = 1 / 0", WRITE_METRICS)
SILENT = make_notebook(PARAMETERS, "y = scale + 1")


def make_tree(
    root: Path,
    notebooks: dict[str, nbformat.NotebookNode],
    presets: dict[str, str] | None = None,
) -> dict[str, Path]:
    """Write notebooks and presets under `root`; return the runner's directories."""
    notebooks_dir = root / "notebooks"
    (notebooks_dir / "presets").mkdir(parents=True)
    for name, notebook in notebooks.items():
        nbformat.write(notebook, notebooks_dir / f"{name}.ipynb")
    presets = {
        "quick": "{}\n",
        "cpu": "# cpu\n{}\n",
        "gpu": "# empty\n",
        **(presets or {}),
    }
    for preset, text in presets.items():
        (notebooks_dir / "presets" / f"{preset}.yaml").write_text(text)
    return {
        "notebooks_dir": notebooks_dir,
        "build_dir": root / "build",
        "figures_dir": root / "figures",
    }


def cli_arguments(dirs: dict[str, Path]) -> list[str]:
    return [
        "--notebooks-dir",
        str(dirs["notebooks_dir"]),
        "--build-dir",
        str(dirs["build_dir"]),
        "--figures-dir",
        str(dirs["figures_dir"]),
    ]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """Run a failing, a good and a silent notebook through the command line."""
    root = tmp_path_factory.mktemp("quick")
    dirs = make_tree(
        root,
        {"01_bad": BAD, "02_good": GOOD, "03_silent": SILENT},
        {"quick": "# quick\n02_good:\n  scale: 3\n"},
    )
    # In this process, to spare a second interpreter start-up and import of JAX.
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = reproduce.main(["--preset", "quick", *cli_arguments(dirs)])
    return dirs, status, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """Run the good notebook through the library under the `cpu` preset."""
    dirs = make_tree(tmp_path_factory.mktemp("cpu"), {"02_good": GOOD, "01_bad": BAD})
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        results = reproduce.run("cpu", ["02_good"], **dirs)
    # The library is silent unless asked for progress bars.
    assert stdout.getvalue() == stderr.getvalue() == ""
    return dirs, results


@pytest.mark.notebook
def test_good_notebook_writes_metrics_under_quick_build_dir(quick_run):
    dirs, *_ = quick_run
    output_dir = dirs["build_dir"] / "quick" / "02_good"
    metrics = json.loads((output_dir / "metrics.json").read_text())

    # Preset values override the defaults; the runner injects preset and output_dir.
    assert metrics["scale"] == 3
    assert metrics["preset"] == "quick"
    assert Path(metrics["output_dir"]) == output_dir.resolve()
    # The kernel runs this interpreter's environment, in the repository root.
    assert metrics["sys_prefix"] == sys.prefix
    assert Path(metrics["cwd"]) == reproduce.repo_root()

    executed = nbformat.read(dirs["build_dir"] / "quick" / "02_good.ipynb", 4)
    tags = [cell.metadata.get("tags", []) for cell in executed.cells]
    assert ["injected-parameters"] in tags
    assert not (dirs["figures_dir"]).exists()


@pytest.mark.notebook
def test_failing_notebook_fails_the_run_but_not_the_others(quick_run):
    dirs, status, stdout, stderr = quick_run
    assert status == 1, stderr

    # The failure is reported with its executed notebook and the error's last line.
    executed = dirs["build_dir"] / "quick" / "01_bad.ipynb"
    assert executed.is_file()
    assert "FAILED" in stdout
    assert str(executed.resolve()) in stdout
    assert "ZeroDivisionError: division by zero" in stdout
    assert "Traceback" not in stdout
    assert "summary: " in stdout
    # Progress over notebooks goes to stderr.
    assert "preset quick" in stderr

    summary = json.loads((dirs["build_dir"] / "quick" / "summary.json").read_text())
    statuses = {entry["name"]: entry["status"] for entry in summary["notebooks"]}
    assert statuses == {"01_bad": "failed", "02_good": "ok", "03_silent": "failed"}
    assert summary["num_failed"] == 2
    errors = {entry["name"]: entry["error"] for entry in summary["notebooks"]}
    assert errors["01_bad"] == "ZeroDivisionError: division by zero"
    assert errors["02_good"] is None
    assert all(entry["wall_s"] > 0 for entry in summary["notebooks"])


@pytest.mark.notebook
def test_notebook_without_metrics_fails(quick_run):
    dirs, _, stdout, _ = quick_run
    summary = json.loads((dirs["build_dir"] / "quick" / "summary.json").read_text())
    [entry] = [e for e in summary["notebooks"] if e["name"] == "03_silent"]
    assert "metrics.json" in entry["error"]
    assert "03_silent" in stdout


@pytest.mark.notebook
def test_cpu_preset_writes_to_figures_dir(cpu_run):
    dirs, results = cpu_run
    [result] = results
    assert result.ok, result.error
    assert result.output_dir == dirs["figures_dir"].resolve() / "02_good"
    assert result.executed == dirs["build_dir"].resolve() / "cpu" / "02_good.ipynb"
    assert result.executed.is_file()

    metrics = json.loads(result.metrics_path.read_text())
    assert metrics["preset"] == "cpu"
    assert metrics["scale"] == 1
    assert not (dirs["build_dir"] / "cpu" / "01_bad.ipynb").exists()
    assert (dirs["build_dir"] / "cpu" / "summary.json").is_file()
    assert "\n02_good" in reproduce.format_summary(results)


@pytest.mark.notebook
def test_run_quick_notebook_fixture(run_quick_notebook, cpu_run):
    dirs, _ = cpu_run
    metrics = run_quick_notebook("02_good", notebooks_dir=dirs["notebooks_dir"])
    assert metrics["preset"] == "quick"
    assert Path(metrics["output_dir"]) == metrics.output_dir
    assert metrics.output_dir.parent.name == "quick"
    assert not metrics.output_dir.is_relative_to(reproduce.repo_root())
    assert run_quick_notebook("02_good", notebooks_dir=dirs["notebooks_dir"]) == metrics

    with pytest.raises(pytest.fail.Exception, match="ZeroDivisionError"):
        run_quick_notebook("01_bad", notebooks_dir=dirs["notebooks_dir"])


def run_cli(capsys, dirs: dict[str, Path], *arguments: str) -> tuple[int, str]:
    """Run `main` in this process; return its status and what it wrote to stderr."""
    status = reproduce.main([*arguments, *cli_arguments(dirs)])
    return status, capsys.readouterr().err


@pytest.mark.parametrize(
    ("notebooks", "presets", "arguments", "expected"),
    [
        pytest.param(
            {"01_good": GOOD},
            {},
            ["--preset", "paper"],
            ["unknown preset 'paper'", "quick, cpu, gpu"],
            id="unknown-preset",
        ),
        pytest.param(
            {"01_good": GOOD, "02_good": GOOD},
            {},
            ["--preset", "quick", "--notebooks", "01_good", "03_missing"],
            ["unknown notebook 03_missing", "01_good, 02_good"],
            id="unknown-notebook",
        ),
        pytest.param(
            {"01_good": GOOD},
            {"cpu": "01_good: {}\n09_gone: {scale: 2}\n"},
            ["--preset", "cpu"],
            ["09_gone", "valid notebooks: 01_good"],
            id="preset-names-missing-notebook",
        ),
        pytest.param(
            {"01_good": GOOD},
            {"quick": "01_good:\n  sclae: 2\n"},
            ["--preset", "quick"],
            ["sclae", "01_good", "valid parameters: scale."],
            id="unknown-parameter",
        ),
        pytest.param(
            {"01_good": GOOD},
            {"gpu": "01_good:\n  output_dir: /tmp/elsewhere\n"},
            ["--preset", "gpu"],
            ["output_dir", "the runner sets output_dir, preset itself"],
            id="preset-sets-injected-parameter",
        ),
        pytest.param(
            {"01_good": GOOD, "02_plain": make_notebook("scale = 1\n", WRITE_METRICS)},
            {},
            ["--preset", "quick"],
            ["'02_plain'", "must define output_dir, preset", "it defines: scale"],
            id="notebook-without-injected-parameters",
        ),
        pytest.param(
            {"01_untagged": make_notebook(None, WRITE_METRICS)},
            {},
            ["--preset", "quick"],
            ["'01_untagged'", "no cell tagged 'parameters'"],
            id="notebook-without-parameters-cell",
        ),
        pytest.param(
            {"01_good": GOOD},
            {"quick": "01_good: [1, 2\n"},
            ["--preset", "quick"],
            ["quick.yaml is not valid YAML"],
            id="malformed-preset",
        ),
        pytest.param(
            {"01_good": GOOD},
            {"cpu": "- 01_good\n"},
            ["--preset", "cpu"],
            ["must be a mapping from notebook name"],
            id="preset-not-a-mapping",
        ),
    ],
)
def test_invalid_names_exit_2_before_anything_runs(
    tmp_path, capsys, notebooks, presets, arguments, expected
):
    dirs = make_tree(tmp_path, notebooks, presets)
    status, stderr = run_cli(capsys, dirs, *arguments)
    assert status == 2
    for text in expected:
        assert text in stderr
    assert "Traceback" not in stderr
    assert not dirs["build_dir"].exists()
    assert not dirs["figures_dir"].exists()


def test_library_raises_configuration_error(tmp_path):
    dirs = make_tree(tmp_path, {"01_good": GOOD})
    with pytest.raises(reproduce.ConfigurationError, match="valid notebooks: 01_good"):
        reproduce.run("quick", ["02_other"], **dirs)


def test_empty_notebooks_dir_runs_nothing(tmp_path):
    dirs = make_tree(tmp_path, {})
    assert reproduce.run("quick", **dirs) == []
    summary = json.loads((dirs["build_dir"] / "quick" / "summary.json").read_text())
    assert summary["notebooks"] == []


def test_list_shows_notebooks_and_presets(tmp_path, capsys):
    dirs = make_tree(tmp_path, {"01_good": GOOD}, {"cpu": "01_good: {scale: 4}\n"})
    assert reproduce.main(["--list", *cli_arguments(dirs)]) == 0
    out = capsys.readouterr().out
    assert "01_good  (parameters: scale)" in out
    assert "overrides for: 01_good" in out
    for preset in reproduce.PRESETS:
        assert f"  {preset}" in out


def test_missing_preset_argument_is_a_usage_error(tmp_path, capsys):
    dirs = make_tree(tmp_path, {"01_good": GOOD})
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(cli_arguments(dirs))
    assert exit_info.value.code == 2
    assert "--preset is required" in capsys.readouterr().err


def test_resolve_output_dir_is_relative_to_repo_root(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "repo_root", lambda: tmp_path / "repo")
    assert reproduce.resolve_output_dir(tmp_path / "a") == tmp_path / "a"
    assert reproduce.resolve_output_dir("build/x") == tmp_path / "repo" / "build" / "x"
    assert (tmp_path / "a").is_dir()
    assert (tmp_path / "repo" / "build" / "x").is_dir()


def test_write_metrics_is_what_the_runner_reads(tmp_path):
    path = reproduce.write_metrics(tmp_path, {"error": np.float64(2.5e-10), "n": 3})
    assert path == tmp_path / reproduce.METRICS_FILE
    assert json.loads(path.read_text(encoding="utf-8")) == {"error": 2.5e-10, "n": 3}
    assert [p.name for p in tmp_path.iterdir()] == [reproduce.METRICS_FILE]

    # A NaN is refused before anything is written over the old file.
    with pytest.raises(ValueError, match="residual"):
        reproduce.write_metrics(tmp_path, {"residual": float("nan")})
    assert json.loads(path.read_text(encoding="utf-8"))["n"] == 3
