"""Process-wide numba settings of the CPU engine: kernel cache directory and threading layer.

Import this before any kernel module (``model.engine.kernels`` does).

Kernel cache
    Kernels are compiled with ``cache=True``: the machine code is written next to the sources
    (``model/engine/__pycache__``) or, when that is not writable (a read-only install in a
    container), under numba's user-wide cache. Set ``BNN_KERNEL_CACHE_DIR`` (or numba's own
    ``NUMBA_CACHE_DIR``, which it takes precedence over) to a writable directory to choose
    where, e.g. a volume shared by the service's containers so that only the first start pays
    for compilation.

Threading layer
    Several threads may call ``predict`` at once. numba's default ``workqueue`` layer is not
    thread-safe (concurrent parallel regions abort the process), so the engine asks for a
    thread-safe layer: ``omp`` (GNU OpenMP, ``libgomp1`` from the OS), else ``tbb`` (the
    ``tbb`` wheel). When neither library loads it falls back to ``workqueue`` and serializes
    kernel calls with one process-wide lock (:data:`KERNEL_LOCK`). ``NUMBA_THREADING_LAYER``
    set in the environment is respected.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading

CACHE_DIR_ENV = "BNN_KERNEL_CACHE_DIR"

if os.environ.get(CACHE_DIR_ENV) and not os.environ.get("NUMBA_CACHE_DIR"):
    os.environ["NUMBA_CACHE_DIR"] = os.environ[CACHE_DIR_ENV]

import numba  # noqa: E402  (the cache directory must be in the environment first)
from numba.core import config as numba_config  # noqa: E402

if os.environ.get(CACHE_DIR_ENV) and os.environ["NUMBA_CACHE_DIR"] != numba_config.CACHE_DIR:
    # numba was imported before us and read its environment already.
    numba_config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]


def _loadable(layer: str) -> bool:
    module = {"omp": "numba.np.ufunc.omppool", "tbb": "numba.np.ufunc.tbbpool"}[layer]
    try:
        importlib.import_module(module)
    except (ImportError, OSError):
        return False
    return True


def _choose_threading_layer() -> str:
    if os.environ.get("NUMBA_THREADING_LAYER"):
        return os.environ["NUMBA_THREADING_LAYER"]
    for layer in ("omp", "tbb"):
        if _loadable(layer):
            return layer
    return "workqueue"


REQUESTED_THREADING_LAYER = _choose_threading_layer()
numba_config.THREADING_LAYER = REQUESTED_THREADING_LAYER

# Held around every kernel call when the layer is not thread-safe.
KERNEL_LOCK = threading.Lock()
_THREAD_SAFE_LAYERS = frozenset({"omp", "tbb", "threadsafe", "safe"})


def kernel_guard() -> contextlib.AbstractContextManager:
    """A context to run kernels in: the global lock under ``workqueue``, else nothing.

    Decided by the layer numba actually runs once it has started one (another library may have
    launched a parallel region before this module set its choice), else by the requested one.
    """
    if threading_layer() in _THREAD_SAFE_LAYERS:
        return contextlib.nullcontext()
    return KERNEL_LOCK


def threading_layer() -> str:
    """The layer numba actually runs (after the first parallel kernel), else the requested one."""
    try:
        return numba.threading_layer()
    except ValueError:
        return REQUESTED_THREADING_LAYER


def cache_dir() -> str | None:
    """Where compiled kernels are cached (None: next to the sources / numba's default)."""
    return numba_config.CACHE_DIR or None
