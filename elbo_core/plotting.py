"""One figure style for the repository, and atomic saving of figures as PDF and PNG.

Notebooks draw inside `with style():` (or call `apply_style()` once) and save with
`save_figure(fig, output_dir, "name")`, which writes `name.pdf` and `name.png` next to
the notebook's `metrics.json`.
"""

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from io import BytesIO
from pathlib import Path

import matplotlib


def _use_agg_without_display() -> None:
    """Select the non-interactive Agg backend on a Linux machine with no display."""
    # NOTE: an explicit MPLBACKEND (Jupyter's inline backend sets one) or an already
    # imported pyplot wins; only a bare headless process is switched.
    if os.environ.get("MPLBACKEND") or "matplotlib.pyplot" in sys.modules:
        return
    headless = not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    if sys.platform.startswith("linux") and headless:
        matplotlib.use("Agg")


_use_agg_without_display()

from matplotlib.figure import Figure  # noqa: E402

from ._io import atomic_write_bytes  # noqa: E402

__all__ = ["COLORS", "DPI", "FORMATS", "STYLE", "apply_style", "save_figure", "style"]

# Okabe & Ito's colour-blind-safe palette, yellow last because it fades on white.
COLORS = (
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#000000",  # black
    "#F0E442",  # yellow
)

DPI = 150
FORMATS = ("pdf", "png")

STYLE = {
    # Sizes read well at 100% in a notebook and in a two-column paper.
    "figure.figsize": (6.0, 3.8),
    "figure.dpi": 100,
    "figure.constrained_layout.use": True,
    "font.size": 10.0,
    "axes.titlesize": 11.0,
    "axes.labelsize": 10.0,
    "xtick.labelsize": 9.0,
    "ytick.labelsize": 9.0,
    "legend.fontsize": 9.0,
    "legend.frameon": False,
    # Colours and lines.
    "axes.prop_cycle": matplotlib.cycler(color=COLORS),
    "image.cmap": "viridis",
    "lines.linewidth": 1.6,
    "lines.markersize": 4.0,
    # A light grid on every axis, behind the data; no top or right spines.
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.color": "#d0d0d0",
    "grid.linewidth": 0.6,
    "grid.alpha": 1.0,
    "axes.spines.top": False,
    "axes.spines.right": False,
    # Output: embeddable TrueType fonts, fixed resolution, no timestamp in PDFs.
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "savefig.dpi": DPI,
    "savefig.format": "png",
}


def apply_style() -> None:
    """Apply the repository's figure style to matplotlib's global settings."""
    matplotlib.rcParams.update(STYLE)


@contextlib.contextmanager
def style() -> Iterator[None]:
    """Context manager that draws with the repository's figure style inside it."""
    with matplotlib.rc_context(STYLE):
        yield


def save_figure(
    fig: Figure,
    directory: str | os.PathLike,
    name: str,
    *,
    formats: Sequence[str] = FORMATS,
    dpi: int = DPI,
) -> list[Path]:
    """Save `fig` as `directory/name.pdf` and `directory/name.png`, each atomically.

    Each format is rendered to memory first and then written with
    `elbo_core._io.atomic_write_bytes`, so a figure file is either the old one or the
    complete new one. The PDF carries no creation date, so re-running an unchanged
    notebook leaves the committed files unchanged.

    **Arguments:**

    - `fig`: the matplotlib figure.
    - `directory`: where to write; created if missing.
    - `name`: the file name without extension.
    - `formats`: the formats to write, in order.
    - `dpi`: resolution of raster formats.

    **Returns:**

    The written paths, one per format.
    """
    if not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"figure name must be a plain file name, got {name!r}")
    directory = Path(directory)

    paths = []
    for fmt in formats:
        # Render in memory, then replace the file in one step.
        buffer = BytesIO()
        metadata = {"CreationDate": None} if fmt == "pdf" else None
        fig.savefig(buffer, format=fmt, dpi=dpi, metadata=metadata)
        paths.append(atomic_write_bytes(directory / f"{name}.{fmt}", buffer.getvalue()))
    return paths
