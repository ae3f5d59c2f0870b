"""The native kernels' AVX2 and baseline code paths, checked on a machine that would never run them.

The extension's vector kernels are compiled for three targets (``target_clones``: x86-64-v4,
x86-64-v3, baseline) and the loader picks the host's; on an AVX-512 machine the tests only ever
exercise the v4 clones, yet most desktop CPUs (Intel's consumer parts) run the AVX2 ones. This
module builds the extension twice more with one target each (``-DFLASHTIER_SINGLE_TARGET`` and
``-march=x86-64-v3`` / the baseline; native/common.h) and reruns the kernel test modules against
each build, in a subprocess that installs the build as ``flashtier._native`` before anything
imports it. The GGUF kernels choose their level at run time instead (``q_set_isa``, tested in
test_quant_kernels.py), so they are not repeated here.
"""

from __future__ import annotations

import ast
import platform
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted((ROOT / "native").glob("*.c"))
"""The extension's translation units (setup.py compiles every one of them into flashtier._native)."""


def _setup_flags() -> list[str]:
    """setup.py's compile flags (read from its FLAGS assignment: importing setup.py would run setup())."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "FLAGS" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError("setup.py has no FLAGS assignment")


FLAGS = [*_setup_flags(), "-fPIC", "-shared"]
TARGETS = {"x86-64-v3": ["-march=x86-64-v3"], "baseline": ["-march=x86-64"]}
KERNEL_TESTS = ["tests/runtime/test_decode_ops.py", "tests/runtime/test_kernels.py",
                "tests/retrieval/test_cluster_batch.py", "tests/runtime/weights/test_sparse_ffn_kernel.py",
                *(f"tests/runtime/test_native_steps.py::{t}" for t in (
                    "test_attention_step_is_the_separate_calls", "test_ffn_step_is_the_separate_calls",
                    "test_experts_step_is_the_separate_calls",
                    "test_native_activation_is_the_function_to_fp32_rounding"))]

RUNNER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("flashtier._native", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.modules["flashtier._native"] = module
import flashtier
flashtier._native = module
from flashtier.runtime import decode_ops
from flashtier.retrieval import cluster_batch
assert decode_ops._rms_norm is module.rms_norm and cluster_batch._cluster_search is module.cluster_search
import pytest


class Count:
    passed = 0

    def pytest_runtest_logreport(self, report):
        if report.when == "call" and report.passed:
            Count.passed += 1


code = pytest.main(["-q", "-x", "-p", "no:cacheprovider", *sys.argv[2:]], plugins=[Count()])
print(f"KERNEL TESTS PASSED: {Count.passed}")
sys.exit(code)
"""


def _host_has_avx2() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2 " in flags and " fma " in flags


needs_gcc_x86 = pytest.mark.skipif(
    platform.machine() != "x86_64" or shutil.which("gcc") is None or not _host_has_avx2(),
    reason="builds the extension's x86-64 targets with gcc (and runs the AVX2 one)")


@needs_gcc_x86
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_kernels_of_each_target(target: str, tmp_path: Path) -> None:
    so = tmp_path / "_native.so"
    build = subprocess.run(["gcc", *FLAGS, *TARGETS[target], "-DFLASHTIER_SINGLE_TARGET",
                            f"-I{sysconfig.get_paths()['include']}", *map(str, SOURCES),
                            "-o", str(so)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([sys.executable, "-c", RUNNER, str(so), *KERNEL_TESTS], cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    passed = int(run.stdout.rsplit("KERNEL TESTS PASSED: ", 1)[1].split()[0])
    assert passed >= 40, run.stdout[-2000:]
