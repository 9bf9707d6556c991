"""The benchmark scripts run end to end at their smoke-test size and agree with the
references they time ours against (timings themselves are not tested: see bench/)."""

import json
import math
import subprocess
import sys

import pytest

from elbo_core import reproduce

ROOT = reproduce.repo_root()
# Both solvers run at rtol = atol = 1e-5 (local error per step). In the committed full
# run (bench/results/likelihood.json) every solve was within 3.7e-3 nats of a solve
# at 1e-10 and ours within 4.7e-3 of scipy's, on log-likelihoods of up to 4600 nats
# in magnitude; 1e-2 nats leaves a factor of two for the quick run's other probes.
AGREEMENT_NATS = 1e-2
# A smoke run compiles every solve once; on two cores it takes about 100 s.
TIMEOUT_S = 900


@pytest.mark.slow
def test_likelihood_benchmark_quick_run(tmp_path):
    output = tmp_path / "likelihood.json"
    process = subprocess.run(
        [sys.executable, "bench/likelihood.py", "--quick", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert process.returncode == 0, process.stderr[-4000:]
    assert "targets:" in process.stdout
    results = json.loads(output.read_text(encoding="utf-8"))

    assert results["machine"]["logical_cores"] >= 1
    names = {row["name"] for row in results["rows"].values()}
    assert names == {"mlp-2d", "mlp-784", "conv-784"}
    for key, row in results["rows"].items():
        assert row["all_successful"], key
        assert all(math.isfinite(value) for value in row["log_likelihoods"]), key
        assert row["nfe_max"] >= row["nfe_mean"] > 0, key
        assert row["overhead_ratio"] > 0, key

    assert {ref["name"] for ref in results["references"]} == names
    for ref in results["references"]:
        assert ref["reference_all_successful"], ref["name"]
        assert ref["reference_max_abs_error"] < AGREEMENT_NATS, ref["name"]
        assert ref["batched_reference"]["successful"], ref["name"]
        for ours in ref["ours"]:
            assert ours["max_abs_error"] < AGREEMENT_NATS, ref["name"]
            assert ours["max_abs_difference_to_reference"] < AGREEMENT_NATS
