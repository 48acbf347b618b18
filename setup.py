"""Builds fusedformer._C.

The op glue (csrc/fusedformer.cpp, csrc/cpu/*.cpp) is compiled once, for baseline x86-64. The kernel
bodies (csrc/cpu/kernels/*.cpp) include no torch header and are compiled once per CPU capability
(default, AVX2, AVX-512, AVX-512 with BF16), as ATen does; csrc/cpu/dispatch.cpp picks one at run time. Never
-march=native: the wheel must run on any x86-64 with AVX2.
"""

import glob
import os

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
KERNEL_SOURCES = sorted(glob.glob("csrc/cpu/kernels/*.cpp"))
GLUE_SOURCES = ["csrc/fusedformer.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))


class BuildWithCpuCapabilities(BuildExtension):
    """Compiles every kernel source once per CPU capability, then links them into _C."""

    def build_extensions(self):
        ext = self.extensions[0]
        for cap, (index, flags) in CPU_CAPABILITIES.items():
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


setup(
    packages=["fusedformer", "fusedformer.ops", "fusedformer.nn", "fusedformer.patching", "fusedformer.bench", "fusedformer.kernels"],
    package_dir={"fusedformer.kernels": "kernels"},
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
