"""sortselect.c (TIES' selection and combine, the linear weighted sum), compiled on first use with the system C compiler and loaded with ctypes.

It is plain portable C (no -march), built once into the mlc cache under a name keyed by its source,
the flags and the compiler, so a shared cache never loads a stale build. Without a compiler (or with
MLC_NATIVE_KERNELS=0) `library()` is None and callers sort with torch: the same picks, slower.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path

from mlc.kernels.cbuild import cached_library, find_compiler

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("sortselect.c")
# No traps assumed: lets the loops vectorise, results unchanged (torch builds so too). No FMA contraction:
# a multiply-add fuses only where torch's kernel fuses it (fmaf), so the bits are torch's on every CPU.
FLAGS = ["-O3", "-fno-trapping-math", "-ffp-contract=off", "-shared", "-fPIC"]
LIBS = ["-lm"]

_lock = threading.Lock()
_state: dict[str, object] = {}


def _load() -> ctypes.CDLL | None:
    if os.environ.get("MLC_NATIVE_KERNELS", "1") == "0":
        _state["reason"] = "disabled by MLC_NATIVE_KERNELS=0"
        return None
    compiler = find_compiler()
    if compiler is None:
        _state["reason"] = "no C compiler (cc or gcc) on PATH"
        return None
    try:
        target = cached_library(compiler, "sortselect", [SOURCE], FLAGS, LIBS)
        lib = ctypes.CDLL(str(target))  # a CDLL call releases the GIL: merge workers select in parallel
    except (OSError, RuntimeError) as e:
        _state["reason"] = f"could not build {SOURCE.name}: {e}"
        log.warning("merge selection kernel unavailable, sorting with torch: %s", _state["reason"])
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.mlc_sort_select.argtypes = [p, ctypes.c_int, p, p, i64, i64, i64, ctypes.c_int, p]
    lib.mlc_sort_select.restype = ctypes.c_int
    lib.mlc_apply_keep.argtypes = [p, ctypes.c_int, p, i64]
    lib.mlc_apply_keep.restype = None
    lib.mlc_combine.argtypes = [ctypes.c_int, p, ctypes.c_int, p, p, p, i64, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_int, ctypes.c_float]
    lib.mlc_combine.restype = i64
    lib.mlc_linear.argtypes = [ctypes.c_int, p, ctypes.c_int, p, p, i64, ctypes.c_int, ctypes.c_float]
    lib.mlc_linear.restype = i64
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (the reason is in `unavailable_reason()`)."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _state["lib"] = _load()
    return _state["lib"]  # type: ignore[return-value]


def unavailable_reason() -> str | None:
    library()
    return _state.get("reason")  # type: ignore[return-value]
