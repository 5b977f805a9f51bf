"""SEN12MS's scene-level label file `labels/IGBP_probability_labels.pkl`: reading it safely,
writing it as published, and deriving it from a patch's IGBP land-cover layer.

As published (schmitt-muc/SEN12MS, used by its `classification/dataset.py`): a pickled dict
keyed by the S2 file name (`ROIs1158_spring_s2_1_p30.tif`), each value a length-17 numpy
vector of IGBP class-coverage fractions (index i = IGBP class i + 1). `satfuse shard --dataset
sen12ms --labels PATH` stores each patch's vector in its sample JSON (`igbp`), and `satfuse
synth sen12ms` writes the file from the patch's `lc` band 0 (IGBP), so the authors' reader
runs on synthetic trees. The 17 -> 10 simplification belongs to the benchmark
(`satfuse.evaluation.sen12ms_igbp`), not to the shards: they keep what was published.

Reading: a pickle may run code, so the unpickler looks up only the few numpy functions that
rebuild an array (and `_codecs.encode`, which protocol-2 pickles use for bytes); every other
global is refused, an array of a non-numeric dtype too, and then the result must be a dict
of str -> 17 finite numbers. Anything else is one SatfuseError naming the file.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import numpy as np

from satfuse.utils import SatfuseError, atomic_write_bytes

N_IGBP = 17  # IGBP classes 1..17 (SEN12MS lc band 0)
LABELS_FILE = "labels/IGBP_probability_labels.pkl"  # where the published tree keeps it
MAX_LABEL_PICKLE_BYTES = 1 << 30  # the published file (180,662 patches) is tens of MB

# (module, name) the unpickler may look up: numpy's array and scalar reconstructors (numpy 1
# spells the module numpy.core, numpy 2 numpy._core), the dtype, and protocol 2's bytes codec.
_ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
})  # fmt: skip


def _numeric_dtype(*args: object) -> np.dtype:
    """`numpy.dtype` for the unpickler: numbers only (an object dtype would hold pickled objects)."""
    dt = np.dtype(*args)  # type: ignore[call-overload]
    if dt.kind not in "biuf":
        raise pickle.UnpicklingError(f"array of dtype {dt} (only numeric arrays are read)")
    return dt


class _PlainData(pickle.Unpickler):
    """Unpickles plain data and numeric numpy arrays; any other global is refused."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refers to {module}.{name}")
        if (module, name) == ("numpy", "dtype"):
            return _numeric_dtype
        with warnings.catch_warnings():  # numpy 2 warns that numpy.core is private
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def read_igbp_labels(path: Path) -> dict[str, np.ndarray]:
    """The label file as {S2 file name: (17,) float64 fractions}; anything else is refused in one line."""
    path = Path(path)
    fix = f"pass SEN12MS's {LABELS_FILE} (a dict: S2 file name -> 17 IGBP fractions)"
    if not path.is_file():
        raise SatfuseError(f"{path}: label file not found; {fix}")
    if path.stat().st_size > MAX_LABEL_PICKLE_BYTES:
        raise SatfuseError(f"{path}: refused: {path.stat().st_size} bytes is far more than a label file; {fix}")
    try:
        data = _PlainData(io.BytesIO(path.read_bytes())).load()
    except Exception as exc:  # any failure of the gate or the stream: not plain data
        raise SatfuseError(f"{path}: refused: not a plain-data pickle ({exc}); satfuse never runs code from "
                           f"a pickle; {fix}") from None
    if not isinstance(data, dict) or not data:
        what = "an empty dict" if isinstance(data, dict) else f"a {type(data).__name__}"
        raise SatfuseError(f"{path}: refused: the pickle holds {what}, not a dict of 17-vectors; {fix}")
    out: dict[str, np.ndarray] = {}
    for key, value in data.items():
        try:
            vec = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            vec = np.zeros(0)
        if not isinstance(key, str) or vec.shape != (N_IGBP,) or not np.isfinite(vec).all():
            raise SatfuseError(f"{path}: refused: entry {key!r} is {_describe(value)}, not 17 finite IGBP "
                               f"fractions keyed by an S2 file name; {fix}")
        out[key] = vec
    return out


def _describe(value: object) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"an array of shape {tuple(shape)}"
    if isinstance(value, list | tuple):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


def write_igbp_labels(path: Path, labels: dict[str, np.ndarray]) -> None:
    """Write the label file as published (a pickled dict of float64 17-vectors), atomically."""
    blob = pickle.dumps({k: np.asarray(v, dtype=np.float64) for k, v in labels.items()}, protocol=4)
    atomic_write_bytes(Path(path), blob)


def igbp_fractions(igbp: np.ndarray) -> np.ndarray:
    """(17,) coverage fraction of each IGBP class 1..17 in a map (values outside 1..17, no
    data, count for no class; all zeros when no pixel has a class)."""
    flat = np.asarray(igbp).astype(np.int64).ravel()
    flat = flat[(flat >= 1) & (flat <= N_IGBP)]
    counts = np.bincount(flat - 1, minlength=N_IGBP)[:N_IGBP].astype(np.float64)
    return counts / max(int(flat.size), 1)
