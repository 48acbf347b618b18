"""Builds fusedformer._C.

The op glue (csrc/fusedformer.cpp, csrc/cpu/*.cpp) is compiled once, for baseline x86-64. The kernel
bodies (csrc/cpu/kernels/*.cpp) include no torch header and are compiled once per CPU capability
(default, AVX2, AVX-512, AVX-512 with BF16), as ATen does; csrc/cpu/dispatch.cpp picks one at run time. Never
-march=native: the wheel must run on any x86-64 with AVX2. The AVX variants are built only when the compiler
targets x86-64; elsewhere (aarch64, macOS on Apple silicon) only the baseline one is, and dispatch runs it.

The torch version _C is compiled against is recorded twice: in _C (``_C.built_with_torch()``) and in the
generated module fusedformer/_build_info.py, which fusedformer.backends reads even when _C cannot load, so that
a torch mismatch is reported by name (see backends._load_extension).
"""

import glob
import os
import subprocess

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
COMMON_FLAGS = ["-O3", "-g0", "-std=c++17", "-fPIC", "-fno-math-errno", "-fopenmp-simd", "-Wall", "-Wno-psabi"]
# index, flags; the index is the capability's slot in KernelStub (csrc/cpu/dispatch.h)
CPU_CAPABILITIES = {
    "default": (0, []),
    "avx2": (1, ["-mavx2", "-mfma", "-mf16c"]),
    "avx512": (2, ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]),
    # AVX-512 with the bf16 conversions (Cooper Lake, Sapphire Rapids and later; AMD Zen 4 and later)
    "avx512bf16": (3, ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-mavx512bf16"]),
}
# The one command that rebuilds _C in place against the torch at hand; named in the mismatch warning.
REBUILD_COMMAND = "pip install --no-build-isolation --force-reinstall --no-deps ."
KERNEL_SOURCES = sorted(glob.glob("csrc/cpu/kernels/*.cpp"))
GLUE_SOURCES = ["csrc/fusedformer.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))


def compiler_targets_x86_64(compiler: list[str]) -> bool:
    """Whether the C++ compiler ``compiler`` (argv) generates x86-64 code: asks its predefined macros, so a
    cross compiler answers for its target, not for the machine it runs on."""
    try:
        macros = subprocess.run(
            [*compiler, "-dM", "-E", "-x", "c++", os.devnull], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"setup.py: could not ask the compiler {compiler} for its target: {e}") from e
    return "#define __x86_64__ 1" in macros


class BuildWithCpuCapabilities(BuildExtension):
    """Compiles every kernel source once per CPU capability the target has, then links them into _C."""

    def run(self):
        self._inplace_requested = bool(self.inplace or getattr(self, "editable_mode", False))
        super().run()

    def build_extensions(self):
        ext = self.extensions[0]
        x86_64 = compiler_targets_x86_64(self.compiler.compiler_so[:1])
        built = {cap: v for cap, v in CPU_CAPABILITIES.items() if x86_64 or cap == "default"}
        self._write_build_header(ext, mask=sum(1 << index for index, _ in built.values()))
        self._write_build_info(ext)
        for cap, (index, flags) in built.items():
            objects = self.compiler.compile(
                KERNEL_SOURCES,
                output_dir=os.path.join(self.build_temp, "cap_" + cap),
                macros=[("FF_CPU_CAPABILITY", "cap_" + cap), ("FF_CPU_CAPABILITY_INDEX", str(index))],
                include_dirs=[os.path.join(ROOT, "csrc")],
                extra_postargs=COMMON_FLAGS + flags,
                depends=glob.glob("csrc/cpu/kernels/*.h") + ["csrc/cpu/dispatch.h"],
            )
            ext.extra_objects.extend(objects)
        super().build_extensions()

    def _write_build_header(self, ext, mask: int):
        """Writes build_info.h for the glue: the capabilities built (a bit per KernelStub slot) and torch's
        version (a header rather than -D flags: no quoting of a string through the build tools)."""
        include = os.path.join(os.path.abspath(self.build_temp), "generated")
        os.makedirs(include, exist_ok=True)
        text = (
            "// Written by setup.py; do not edit.\n#pragma once\n"
            f"#define FF_BUILT_CAPABILITIES {mask}\n"
            f"#define FF_TORCH_VERSION {torch.__version__!r}\n".replace("'", '"')
        )
        path = os.path.join(include, "build_info.h")
        if not os.path.exists(path) or open(path).read() != text:  # unchanged: no rebuild of the glue
            with open(path, "w") as f:
                f.write(text)
        ext.include_dirs = [*ext.include_dirs, include]

    def _write_build_info(self, ext):
        """Writes fusedformer/_build_info.py beside the extension: in the build tree that becomes the wheel,
        and in the source tree too for --inplace and editable builds (where _C is copied there)."""
        # setuptools builds into the build tree and copies _C to the source with --inplace or -e (run() clears
        # self.inplace meanwhile): write to both then
        targets = [os.path.dirname(self.get_ext_fullpath(ext.name))]
        if self._inplace_requested:
            targets.append(os.path.join(ROOT, "fusedformer"))
        for target in targets:
            os.makedirs(target, exist_ok=True)
            with open(os.path.join(target, "_build_info.py"), "w") as f:
                f.write(
                    '"""Written by setup.py when fusedformer._C was built; do not edit."""\n\n'
                    f"TORCH_VERSION = {torch.__version__!r}\n"
                    f"REBUILD_COMMAND = {REBUILD_COMMAND!r}\n"
                )


setup(
    packages=["fusedformer", "fusedformer.ops", "fusedformer.nn", "fusedformer.patching", "fusedformer.bench", "fusedformer.kernels"],
    ext_modules=[
        CppExtension(
            "fusedformer._C",
            GLUE_SOURCES,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": ["-O3", "-g0", "-fopenmp", "-std=c++17"]},
            extra_link_args=["-fopenmp", "-g0"],
        )
    ],
    cmdclass={"build_ext": BuildWithCpuCapabilities},
)
