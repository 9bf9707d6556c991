"""Smoke test of notebook 01: Table 1 and the weighting figures, quick preset."""

import math

import pytest

# Log-weights of a recipe and its closed form differ by a constant up to float64
# rounding of a handful of log/exp evaluations at |logsnr| <= 15.
LOG_WEIGHT_SPREAD_TOLERANCE = 1e-10
# Masses integrated by composite 8-node Gauss-Legendre on half-unit panels, a panel
# edge at every kink: the quadrature error is far below this; the bound allows
# rounding.
MASS_TOLERANCE = 1e-9
# The shifted-cosine ratio reaches its plateaus to within exp(-|logsnr| / 2) ~ 2e-9
# at the +-40 ends of the wide grid.
SPAN_TOLERANCE = 1e-6
# EDM's peak in PAPER.md section 5, quoted to three decimals.
EDM_PEAK = -3.308
EDM_PEAK_TOLERANCE = 5e-4

FIGURES = (
    "weightings",
    "schedule_densities",
    "augmentation_densities",
    "shifted_cosine_discrepancy",
)


@pytest.mark.notebook
def test_weighting_functions_notebook(run_quick_notebook):
    metrics = run_quick_notebook("01_weighting_functions")

    table = metrics["table_1"]
    assert len(table) == 8
    assert metrics["monotonicity_matches_paper"] is True
    assert metrics["max_log_weight_spread"] < LOG_WEIGHT_SPREAD_TOLERANCE
    for name, row in table.items():
        assert row["log_weight_spread"] < LOG_WEIGHT_SPREAD_TOLERANCE, name
        assert row["monotonic_computed"] == row["paper_monotonic"], name
    monotonic = {name for name, row in table.items() if row["monotonic_computed"]}
    assert {name.split(" ")[0] for name in monotonic} == {
        "ELBO",
        "v-MSE,",
        "Flow",
        "InDI",
    }

    assert abs(metrics["edm_monotonic_peak"] - EDM_PEAK) < EDM_PEAK_TOLERANCE

    for name, mass in metrics["schedule_mass"].items():
        assert abs(mass - 1) < MASS_TOLERANCE, name
    for name, entry in metrics["augmentation"].items():
        assert abs(entry["total_mass"] - 1) < MASS_TOLERANCE, name
        assert 0 <= entry["point_mass"] <= 1, name
    # The ELBO's weighting is flat: all of its augmentation is the point mass at
    # logsnr_max, i.e. no noise is added.
    assert metrics["augmentation"]["elbo"]["point_mass"] == pytest.approx(1.0)
    # Chosen by computed monotonicity: PAPER.md section 3 with the derived rows.
    assert set(metrics["monotonic_weightings"]) == {
        "elbo",
        "v_cosine",
        "fm_ot",
        "indi",
        "edm_monotonic",
        *(f"sigmoid, b={b}" for b in metrics["sigmoid_biases"]),
    }
    densities = {row["training_density"] for row in table.values()}
    assert {"sech(λ/2) / (2π)", "N(λ; 2.4, 2.4²)"} <= densities

    discrepancy = metrics["shifted_cosine_discrepancy"]
    assert set(discrepancy) == {"64", "128", "256", "512"}
    for resolution, entry in discrepancy.items():
        expected = (int(resolution) / 64) ** 2
        assert math.isclose(entry["ratio_span"], expected, rel_tol=SPAN_TOLERANCE)


@pytest.mark.notebook
def test_weighting_functions_figures(run_quick_notebook):
    metrics = run_quick_notebook("01_weighting_functions")
    assert metrics["preset"] == "quick"
    for name in FIGURES:
        png = metrics.output_dir / f"{name}.png"
        pdf = metrics.output_dir / f"{name}.pdf"
        assert png.read_bytes().startswith(b"\x89PNG"), png
        assert pdf.read_bytes().startswith(b"%PDF"), pdf
