"""Atomic file writing for figures, metrics and run summaries.

A reader of `figures/` or `build/` must never see a half-written file, even when a run
is interrupted. Every writer here renders its content in memory, writes it to a
temporary file in the destination directory, flushes it to disk and renames it over
the destination with `os.replace`, which is atomic on POSIX and Windows.
"""

import json
import math
import os
import secrets
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

import numpy as np

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "to_json_compatible",
    "write_json",
]

_MAX_NAME_ATTEMPTS = 100


def _open_temporary(directory: Path, name: str) -> tuple[int, Path]:
    """Create and open a fresh hidden temporary file next to the destination."""
    for _ in range(_MAX_NAME_ATTEMPTS):
        temporary = directory / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            # NOTE: mode 0o666 lets the umask decide permissions, as for an ordinary
            # file; `tempfile.mkstemp` would leave the destination readable by its
            # owner only.
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
            return os.open(temporary, flags, 0o666), temporary
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file in {directory}")


def _fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically, creating parent directories.

    **Arguments:**

    - `path`: the destination file; an existing file is replaced.
    - `data`: the complete content.

    **Returns:**

    The destination as a `Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = _open_temporary(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def atomic_write_text(
    path: str | os.PathLike, text: str, encoding: str = "utf-8"
) -> Path:
    """Write `text` to `path` atomically; see `atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode(encoding))


def _key_path(parents: tuple[str | int, ...]) -> str:
    """Spell a location in a nested object the way Python indexing would."""
    if not parents:
        return "the top-level value"
    return "obj" + "".join(f"[{part!r}]" for part in parents)


def _convert(obj: Any, allow_nan: bool, parents: tuple[str | int, ...]) -> Any:
    """Recursive worker of `to_json_compatible`; `parents` locates `obj` for errors."""
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if not allow_nan and not math.isfinite(obj):
            raise ValueError(
                f"non-finite value {obj!r} at {_key_path(parents)}: JSON has no NaN "
                "or infinity (pass allow_nan=True to write it anyway)"
            )
        return float(obj)
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, Mapping):
        converted = {}
        for key, value in obj.items():
            if isinstance(key, np.generic):
                key = key.item()
            if isinstance(key, bool) or not isinstance(key, str | int):
                raise TypeError(
                    f"JSON keys must be strings or integers, got {key!r} "
                    f"at {_key_path(parents)}"
                )
            converted[str(key)] = _convert(value, allow_nan, (*parents, str(key)))
        return converted
    if isinstance(obj, list | tuple):
        return [
            _convert(item, allow_nan, (*parents, index))
            for index, item in enumerate(obj)
        ]
    if isinstance(obj, np.generic) or hasattr(obj, "__array__"):
        array = np.asarray(obj)
        if array.dtype.kind not in "biuf":
            raise TypeError(
                f"cannot write an array of dtype {array.dtype} to JSON "
                f"at {_key_path(parents)}"
            )
        return _convert(array.tolist(), allow_nan, parents)
    raise TypeError(
        f"cannot write {type(obj).__name__} to JSON at {_key_path(parents)}"
    )


def to_json_compatible(obj: Any, *, allow_nan: bool = False) -> Any:
    """Convert `obj` to plain Python types that `json` writes.

    Mappings become dicts with string keys, sequences become lists, NumPy and JAX
    scalars and arrays become Python numbers and (nested) lists, paths become strings.

    **Arguments:**

    - `obj`: the object to convert.
    - `allow_nan`: keep NaN and infinities instead of raising.

    **Returns:**

    An object made of dicts, lists, strings, numbers, booleans and `None`.

    **Raises:**

    `ValueError` naming the offending key for a non-finite number when `allow_nan` is
    false; `TypeError` for a key or value that has no JSON form.
    """
    return _convert(obj, allow_nan, ())


def write_json(path: str | os.PathLike, obj: Any, *, allow_nan: bool = False) -> Path:
    """Write `obj` as JSON (sorted keys, indent 2) to `path` atomically.

    **Arguments:**

    - `path`: the destination file; parent directories are created.
    - `obj`: nested dicts and lists of numbers, strings, NumPy/JAX arrays and scalars.
    - `allow_nan`: write NaN and infinities as JavaScript literals instead of raising.

    **Returns:**

    The destination as a `Path`.
    """
    converted = to_json_compatible(obj, allow_nan=allow_nan)
    text = json.dumps(converted, sort_keys=True, indent=2, allow_nan=allow_nan)
    return atomic_write_text(path, text + "\n")
