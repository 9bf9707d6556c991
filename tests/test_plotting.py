"""The shared figure style and atomic figure saving in `elbo_core.plotting`."""

import os

import matplotlib
import pytest

from elbo_core import plotting

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def figure():
    import matplotlib.pyplot as plt

    with plotting.style():
        fig, ax = plt.subplots()
        ax.plot([0.0, 1.0, 2.0], [1.0, 0.5, 0.25], label="w")
        ax.set_xlabel("logsnr")
        ax.legend()
    yield fig
    plt.close(fig)


def test_save_figure_writes_pdf_and_png_atomically(tmp_path, figure):
    directory = tmp_path / "figures" / "01_test"
    paths = plotting.save_figure(figure, directory, "weighting")

    assert paths == [directory / "weighting.pdf", directory / "weighting.png"]
    assert sorted(os.listdir(directory)) == ["weighting.pdf", "weighting.png"]
    assert paths[0].read_bytes().startswith(b"%PDF-")
    assert paths[1].read_bytes().startswith(PNG_SIGNATURE)


def test_png_resolution_and_reproducible_bytes(tmp_path, figure):
    first = [path.read_bytes() for path in plotting.save_figure(figure, tmp_path, "f")]
    second = [path.read_bytes() for path in plotting.save_figure(figure, tmp_path, "f")]
    assert first == second

    # PNG header: width and height in pixels, big-endian, after the IHDR tag.
    png = first[1]
    width = int.from_bytes(png[16:20], "big")
    height = int.from_bytes(png[20:24], "big")
    expected = [round(size * plotting.DPI) for size in figure.get_size_inches()]
    assert [width, height] == expected


@pytest.mark.parametrize("name", ["", "a/b", "..", "sub/../x"])
def test_save_figure_rejects_paths_as_names(tmp_path, figure, name):
    with pytest.raises(ValueError, match="plain file name"):
        plotting.save_figure(figure, tmp_path, name)
    assert os.listdir(tmp_path) == []


def test_style_is_scoped_and_apply_style_is_global():
    before = matplotlib.rcParams["axes.grid"]
    with plotting.style():
        assert matplotlib.rcParams["figure.constrained_layout.use"] is True
        assert matplotlib.rcParams["axes.prop_cycle"].by_key()["color"] == list(
            plotting.COLORS
        )
    assert matplotlib.rcParams["axes.grid"] == before

    with matplotlib.rc_context():
        plotting.apply_style()
        assert matplotlib.rcParams["font.size"] == plotting.STYLE["font.size"]


def test_headless_backend_is_non_interactive():
    if os.environ.get("DISPLAY") or os.environ.get("MPLBACKEND"):
        pytest.skip("a display or an explicit backend is configured")
    assert matplotlib.get_backend().lower() == "agg"
