"""The build off x86-64: the kernel sources and the capability dispatch compile for aarch64 (baseline
variant only, as setup.py builds them there), checked with Debian's cross compiler ``aarch64-linux-gnu-g++``
(``apt-get install g++-aarch64-linux-gnu``). Without it the compile tests skip, saying so: a skip here
is not a pass, and .ci/run installs the compiler where it can.

The glue (csrc/fusedformer.cpp, csrc/cpu/*.cpp other than dispatch.cpp) includes torch's headers, which
need an aarch64 torch to check; it uses no x86 intrinsics.
"""

from __future__ import annotations

import ast
import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CROSS = os.environ.get("FUSEDFORMER_CROSS_CXX", "aarch64-linux-gnu-g++")

needs_cross = pytest.mark.skipif(
    shutil.which(CROSS) is None,
    reason=f"NOT CHECKED: the aarch64 cross compiler {CROSS!r} is not installed "
    "(apt-get install g++-aarch64-linux-gnu)",
)


def _setup_py() -> ast.Module:
    with open(os.path.join(ROOT, "setup.py")) as f:
        return ast.parse(f.read())


def _setup_constant(name: str):
    for node in _setup_py().body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError(f"setup.py defines no {name}")


def _setup_function(name: str):
    for node in _setup_py().body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            scope = {"os": os, "subprocess": subprocess}
            exec(compile(ast.Module(body=[node], type_ignores=[]), "setup.py", "exec"), scope)
            return scope[name]
    raise LookupError(f"setup.py defines no {name}")


@needs_cross
def test_setup_builds_only_the_baseline_variant_for_aarch64():
    targets_x86_64 = _setup_function("compiler_targets_x86_64")
    assert not targets_x86_64([CROSS])
    assert targets_x86_64([shutil.which("c++") or "g++"]) == (os.uname().machine == "x86_64")


@needs_cross
@pytest.mark.parametrize("source", sorted(glob.glob(os.path.join(ROOT, "csrc/cpu/kernels/*.cpp"))), ids=os.path.basename)
def test_kernel_sources_compile_for_aarch64(source, tmp_path):
    flags = _setup_constant("COMMON_FLAGS")
    index, extra = _setup_constant("CPU_CAPABILITIES")["default"]
    cmd = [
        CROSS, "-c", source, "-o", str(tmp_path / "k.o"), *flags, *extra, "-Werror",
        "-DFF_CPU_CAPABILITY=cap_default", f"-DFF_CPU_CAPABILITY_INDEX={index}", "-I" + os.path.join(ROOT, "csrc"),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stderr[-4000:]}"
    header = (tmp_path / "k.o").read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183, "not an AArch64 object"


@needs_cross
def test_dispatch_compiles_for_aarch64_with_only_the_baseline(tmp_path):
    (tmp_path / "build_info.h").write_text(
        '#pragma once\n#define FF_BUILT_CAPABILITIES 1\n#define FF_TORCH_VERSION "0"\n'
    )
    cmd = [
        CROSS, "-c", os.path.join(ROOT, "csrc/cpu/dispatch.cpp"), "-o", str(tmp_path / "d.o"), "-std=c++17",
        "-O2", "-Wall", "-Werror", "-I" + os.path.join(ROOT, "csrc"), "-I" + str(tmp_path),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]


def test_the_build_reports_its_capabilities():
    from fusedformer import _C

    built = _C.built_cpu_capabilities()
    assert built[0] == "default"
    if os.uname().machine == "x86_64":
        assert built == ["default", "avx2", "avx512", "avx512bf16"]
    else:
        assert built == ["default"]
    assert _C.best_cpu_capability() in built
