"""A kernel cache built for one CPU is never used on another.

The serving image compiles its kernel cache at build time (``python -m model.engine.warm``),
possibly on a machine other than the one that serves. numba keys every cached kernel by its
signature and by the CPU it was compiled for (LLVM's CPU name and feature string), so a process
targeting another CPU misses that entry and compiles its own, next to it in the same index. Here
one cache directory is used by four fresh interpreters in turn, built for ``haswell`` (AVX2, as
``NUMBA_CPU_NAME`` would make the image's build) and for the host; each reports numba's cache
hits and misses for one kernel and the CPUs the cache's index holds entries for.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from llvmlite import binding as llvm

from model.engine.warm import CPU_BUILDS as BUILDS

ROOT = Path(__file__).resolve().parents[3]

REPORT = """
import json, sys
import numpy as np
from numba.core import config
from llvmlite import binding as llvm
from model.engine import kernels, runtime
from model.engine.options import EngineOptions

runtime.apply(EngineOptions(kernel_cache_dir=sys.argv[1]))
kernel = kernels.SERIAL.pool_bits
out = np.empty((1, 1, 1, 1), np.uint64)
kernel(np.ones((1, 2, 2, 1), np.uint64), 2, 2, 2, 2, np.zeros(1, np.uint64), out)
index = kernel._cache._cache_file._load_index()  # numba's own file, written in this test
print(json.dumps({
    "cpu": config.CPU_NAME or llvm.get_host_cpu_name(),
    "hits": sum(kernel.stats.cache_hits.values()),
    "misses": sum(kernel.stats.cache_misses.values()),
    "index": sorted(key[1][1] for key in index),  # key: (signature, (triple, cpu, features))
}))
"""


def report(script: str, *args: str, env: dict[str, str] | None = None) -> dict:
    """Run ``script`` in a fresh interpreter (no NUMBA_CPU*/BNN_* settings but ``env``) and
    return the JSON it prints."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_CPU", "BNN_"))}
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        env=clean | (env or {}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def compile_for(cache: Path, build: str) -> dict:
    return report(REPORT, str(cache), env=BUILDS.get(build, {}))


@pytest.mark.slow  # four fresh interpreters, two compiles
@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or llvm.get_host_cpu_name() == "haswell",
    reason="needs an x86 host that is not itself a haswell",
)
def test_a_cache_built_for_another_cpu_is_not_used(tmp_path):
    host = llvm.get_host_cpu_name()
    both = sorted(["haswell", host])
    built = compile_for(tmp_path, "haswell")
    assert built == {"cpu": "haswell", "hits": 0, "misses": 1, "index": ["haswell"]}
    # the host finds the haswell entry, does not load it, and adds its own
    assert compile_for(tmp_path, "host") == {"cpu": host, "hits": 0, "misses": 1, "index": both}
    # each loads its own entry from then on
    assert compile_for(tmp_path, "haswell") == {
        "cpu": "haswell",
        "hits": 1,
        "misses": 0,
        "index": both,
    }
    assert compile_for(tmp_path, "host") == {"cpu": host, "hits": 1, "misses": 0, "index": both}


STAMPED = """
import json, sys
import numpy as np
from model.engine import kernels, runtime
from model.engine.options import EngineOptions

runtime.ENGINE_SOURCES = sys.argv[2]  # stands for the digest of edited engine sources
runtime.apply(EngineOptions(kernel_cache_dir=sys.argv[1]))
kernel = kernels.SERIAL.pool_bits
out = np.empty((1, 1, 1, 1), np.uint64)
kernel(np.ones((1, 2, 2, 1), np.uint64), 2, 2, 2, 2, np.zeros(1, np.uint64), out)
print(json.dumps({
    "cache": type(kernel._cache).__name__,
    "hits": sum(kernel.stats.cache_hits.values()),
    "misses": sum(kernel.stats.cache_misses.values()),
}))
"""


def compile_with_sources(cache: Path, sources: str) -> dict:
    return report(STAMPED, str(cache), sources)


@pytest.mark.slow  # four fresh interpreters, three compiles
def test_a_kernel_cached_from_other_engine_sources_compiles_again(tmp_path):
    """numba stamps a cached kernel with its own file only; a kernel inlines intrinsics from
    other files, so the engine adds the digest of all its sources: when they differ (an edited
    intrinsic, another version sharing the cache directory) the cached code is not used."""
    miss = {"cache": "EngineKernelCache", "hits": 0, "misses": 1}
    hit = {"cache": "EngineKernelCache", "hits": 1, "misses": 0}
    assert compile_with_sources(tmp_path, "sources-a") == miss
    assert compile_with_sources(tmp_path, "sources-a") == hit
    assert compile_with_sources(tmp_path, "sources-b") == miss
    assert compile_with_sources(tmp_path, "sources-b") == hit


def test_the_source_digest_follows_contents_not_mtimes(tmp_path):
    from model.engine.runtime import ENGINE_SOURCES, source_digest

    (tmp_path / "kernels.py").write_text("def k(): return 1\n")
    (tmp_path / "intrinsics.py").write_text("X = 1\n")
    (tmp_path / "notes.txt").write_text("not a source\n")
    before = source_digest(tmp_path)
    os.utime(tmp_path / "kernels.py", (0, 0))
    (tmp_path / "notes.txt").write_text("edited\n")
    assert source_digest(tmp_path) == before
    (tmp_path / "intrinsics.py").write_text("X = 2\n")
    assert source_digest(tmp_path) != before
    engine = Path(__file__).resolve().parents[3] / "model" / "engine"
    assert source_digest(engine) == ENGINE_SOURCES
