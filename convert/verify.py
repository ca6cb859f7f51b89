"""`mixtral-jax verify SRC DST`: every parameter of a converted checkpoint against its source, bit for bit.

The source is read exactly as the converter reads it (same rule table, same transforms), one parameter
at a time; the checkpoint is restored one parameter at a time as numpy. Checked: the config, the set of
parameters, and for each its shape, its dtype (the source's, or the `--dtype` the conversion cast to) and
its bytes. The first mismatch raises `VerificationError` naming the parameter, the source tensor(s) and
the first differing element.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from mixtral_jax.errors import VerificationError
from mixtral_jax.model.quant import SCALE_SUFFIX
from mixtral_jax.progress import progress

from . import orbax_io
from .converter import open_source, prepare_conversion


@dataclasses.dataclass
class VerifyReport:
    src: str
    dst: str
    description: str
    n_params: int
    bytes_checked: int
    seconds: float

    def __str__(self):
        return (f"OK: all {self.n_params} parameters of {self.dst} ({self.bytes_checked / 1e9:.2f} GB) equal "
                f"{self.description} at {self.src} bit for bit ({self.seconds:.1f} s)")


def verify(src, dst, format: str | None = None, show_progress: bool = True) -> VerifyReport:
    t0 = time.perf_counter()
    info = orbax_io.read_info(dst)
    source = open_source(src, format)
    if source.config != info.config:
        a, b = info.config.to_dict(), source.config.to_dict()
        diff = [f"{k}: checkpoint {a[k]!r} vs source {b[k]!r}" for k in a if a[k] != b[k]]
        raise VerificationError(f"config differs from the source's: {'; '.join(diff)}")
    cast = info.metadata.get("source", {}).get("cast_to")
    p = prepare_conversion(source, cast, info.quantize)
    orbax_io.check_specs(info, p.specs)
    stored = orbax_io.stored_tree(dst)
    if set(stored) != set(p.specs):
        missing = sorted(set(p.specs) - set(stored))
        extra = sorted(set(stored) - set(p.specs))
        what = f"lacks {missing[:3]}" if missing else f"has extra {extra[:3]}"
        raise VerificationError(f"the Orbax tree of {dst} {what}")
    checked = 0
    bar = progress(total=len(p.specs), description="verifying", unit="tensors", enabled=show_progress)
    with bar:
        for name in p.specs:
            expected = p.build(name)
            actual = orbax_io.restore(dst, {name: stored[name]}, partial=True)[name]
            parts = p.by_target.get(name) or p.by_target[name.removesuffix(SCALE_SUFFIX)]  # scales: their weight's
            _compare(name, [k for k, _ in parts], np.asarray(actual), expected)
            checked += expected.nbytes
            del expected, actual
            source.release()
            bar.advance()
    return VerifyReport(source.path, str(dst), source.description, len(p.specs), checked, time.perf_counter() - t0)


def _compare(name: str, keys: list[str], actual: np.ndarray, expected: np.ndarray):
    src = keys[0] if len(keys) == 1 else f"{keys[0]} ... ({len(keys)} tensors)"
    if actual.shape != expected.shape:
        raise VerificationError(f"{name}: shape {actual.shape} in the checkpoint, {expected.shape} from {src}")
    if actual.dtype != expected.dtype:
        raise VerificationError(f"{name}: dtype {actual.dtype} in the checkpoint, {expected.dtype} from {src}")
    if actual.ndim == 0:
        actual, expected = actual.reshape(1), expected.reshape(1)
    bits = np.dtype(f"u{actual.dtype.itemsize}")
    for i in range(actual.shape[0]):  # a slice at a time: no full-size temporaries
        a, e = actual[i:i + 1].view(bits), np.ascontiguousarray(expected[i:i + 1]).view(bits)
        if not np.array_equal(a, e):
            diff = a != e
            where = (i,) + tuple(int(j) for j in np.argwhere(diff)[0][1:])
            n = int(np.count_nonzero(diff))
            raise VerificationError(
                f"{name}: value mismatch at index {where}: checkpoint {actual[where]!r} vs source {expected[where]!r} "
                f"(from {src}; {n} element(s) differ in slice {i})")
