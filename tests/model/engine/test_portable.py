"""Kernels compiled for another CPU give the same bits.

Each build runs in a fresh interpreter with its own kernel cache (``NUMBA_CACHE_DIR``), for
the host CPU, for ``haswell`` (AVX2 and FMA, no AVX-512) and for ``generic`` x86-64 (SSE2), and
writes the outputs of the float and popcount kernels on fixed inputs; all must be equal. The
float kernels promise this by construction (a fixed order of float32 operations, no fast-math,
no reduction across vector lanes), the integer ones by being integer.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[3]
# haswell's own features, stated: unset, numba would add the host's (AVX-512 included).
HASWELL = (
    "+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+fxsr,+lzcnt,+mmx,+movbe,+popcnt,"
    "+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave"
)
BUILDS = {"haswell": {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": HASWELL},
          "generic": {"NUMBA_CPU_NAME": "generic"}}  # fmt: skip

KERNEL_OUTPUTS = """
import sys
import numpy as np
from model.engine import kernels
from model.engine.layout import pad_rows
from model.packing import pack_signs

rng = np.random.default_rng(0)
out = {}
signs = np.where(rng.random((70, 300)) < 0.5, -1.0, 1.0)
w = pad_rows(pack_signs(signs))
x = np.zeros((5, 320), np.float32)
x[:, :300] = rng.standard_normal((5, 300)) * 10
out["real_packed_dense"] = np.empty((5, 70), np.float32)
kernels.real_packed_dense(x, w, out["real_packed_dense"])

image = rng.normal(0, 50, (2, 10, 10, 3)).astype(np.float32)
conv_w = rng.normal(size=(27, 75)).astype(np.float32)
bias = rng.normal(size=75).astype(np.float32)
cut = rng.normal(0, 20, 75)
invert = rng.integers(0, 2, 75).astype(np.uint8)
out["real_conv_threshold_pack"] = np.empty((2, 8, 8, 2), np.uint64)
kernels.real_conv_threshold_pack(
    image, conv_w, bias, 3, 3, 1, 1, cut, invert, out["real_conv_threshold_pack"]
)

a = pad_rows(pack_signs(np.where(rng.random((9, 600)) < 0.5, -1.0, 1.0)))
wb = pad_rows(pack_signs(np.where(rng.random((130, 600)) < 0.5, -1.0, 1.0)))
out["xor_popcount_gemm"] = np.empty((9, 130), np.int32)
kernels.xor_popcount_gemm(a, wb, out["xor_popcount_gemm"], 2, np.zeros(1, np.uint8))
cuts = rng.integers(280, 320, 130).astype(np.int64)
inverts = rng.integers(0, 2, 130).astype(np.uint8)
out["dense_threshold_pack"] = np.empty((9, 3), np.uint64)
kernels.dense_threshold_pack(
    a, wb, cuts, inverts, out["dense_threshold_pack"], 64, 2, np.zeros(1, np.uint8)
)
np.savez(sys.argv[1], **out)
"""


def kernel_outputs(tmp_path: Path, name: str, env: dict[str, str]) -> dict[str, np.ndarray]:
    target = tmp_path / f"{name}.npz"
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CPU")},
        "NUMBA_CACHE_DIR": str(tmp_path / f"cache-{name}"),
        "BNN_KERNEL_CACHE_DIR": "",
        **env,
    }
    subprocess.run(
        [sys.executable, "-c", KERNEL_OUTPUTS, str(target)],
        cwd=ROOT,
        env=environment,
        check=True,
        timeout=600,
    )
    with np.load(target) as data:  # our own file, no pickles: allow_pickle stays False
        return dict(data)


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 CPU names")
def test_kernels_compiled_for_other_cpus_give_the_same_bits(tmp_path):
    host = kernel_outputs(tmp_path, "host", {})
    for name, env in BUILDS.items():
        other = kernel_outputs(tmp_path, name, env)
        assert other.keys() == host.keys()
        for kernel, values in host.items():
            np.testing.assert_array_equal(other[kernel], values, err_msg=f"{kernel} on {name}")
