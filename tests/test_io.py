"""Atomic writers and JSON conversion in `elbo_core._io`."""

import json
import math
import os
import stat

import jax.numpy as jnp
import numpy as np
import pytest

from elbo_core._io import (
    atomic_write_bytes,
    atomic_write_text,
    to_json_compatible,
    write_json,
)


def test_atomic_write_bytes_creates_parents_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a" / "b" / "data.bin"
    assert atomic_write_bytes(path, b"\x00\x01") == path
    assert path.read_bytes() == b"\x00\x01"

    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert os.listdir(path.parent) == ["data.bin"]


def test_atomic_write_respects_umask(tmp_path):
    old_umask = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "x.txt", "x")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_failed_write_keeps_old_file_and_removes_temporary(tmp_path):
    path = atomic_write_text(tmp_path / "note.txt", "old")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["note.txt"]


def test_atomic_write_text_encodes_utf8(tmp_path):
    path = atomic_write_text(tmp_path / "t.txt", "λ = log α²/σ²")
    assert path.read_bytes().decode("utf-8") == "λ = log α²/σ²"


def test_write_json_sorted_indented_and_converted(tmp_path):
    metrics = {
        "b": np.float32(0.5),
        "a": {"count": np.int64(3), "flag": np.bool_(True)},
        "array": np.arange(3.0),
        "jax": jnp.array([[1.0, 2.0]]),
        "scalar": jnp.asarray(2.5),
        "tuple": (1, "x", None),
        "path": tmp_path,
        7: "integer key",
    }
    path = write_json(tmp_path / "m" / "metrics.json", metrics)
    text = path.read_text()
    loaded = json.loads(text)

    assert loaded == {
        "7": "integer key",
        "a": {"count": 3, "flag": True},
        "array": [0.0, 1.0, 2.0],
        "b": 0.5,
        "jax": [[1.0, 2.0]],
        "path": str(tmp_path),
        "scalar": 2.5,
        "tuple": [1, "x", None],
    }
    assert type(loaded["a"]["count"]) is int
    assert text.endswith("}\n")
    assert text.index('"7"') < text.index('"a"') < text.index('"tuple"')
    assert '\n  "a": {\n    "count": 3,' in text
    assert os.listdir(path.parent) == ["metrics.json"]


@pytest.mark.parametrize(
    ("obj", "location"),
    [
        ({"nll": float("nan")}, "obj['nll']"),
        ({"bpd": {"diff": np.float64(np.inf)}}, "obj['bpd']['diff']"),
        ({"curve": [0.0, 1.0, -math.inf]}, "obj['curve'][2]"),
        ({"losses": jnp.array([1.0, jnp.nan])}, "obj['losses'][1]"),
    ],
)
def test_write_json_rejects_non_finite_and_names_the_key(tmp_path, obj, location):
    path = tmp_path / "metrics.json"
    with pytest.raises(ValueError, match="non-finite value") as error_info:
        write_json(path, obj)
    assert f" at {location}:" in str(error_info.value)
    assert not path.exists()
    assert os.listdir(tmp_path) == []


def test_write_json_allows_nan_on_request(tmp_path):
    path = write_json(tmp_path / "m.json", {"x": float("nan")}, allow_nan=True)
    assert math.isnan(json.loads(path.read_text())["x"])


@pytest.mark.parametrize(
    "obj", [{"x": object()}, {("a", "b"): 1}, {"s": np.array(["a"])}, {1j: 1}]
)
def test_to_json_compatible_rejects_what_json_cannot_hold(obj):
    with pytest.raises(TypeError):
        to_json_compatible(obj)
