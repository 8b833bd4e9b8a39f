"""Build script: the compiled ASMK* kernels of ``asmk_index`` (Cython, no numpy C API needed).

The kernels use OpenMP threads when the compiler supports ``-fopenmp`` (GCC, and clang with
libomp); otherwise they build single-threaded, with the same results. The AMX kernel of the exact
nearest-centroid search is built when the compiler knows the AMX intrinsics (GCC 11+, clang 12+);
without it, quantization uses BLAS products, with the same results up to float32 near-ties.
``ASMK_INDEX_NO_OPENMP=1`` and ``ASMK_INDEX_NO_AMX=1`` leave either out.
"""
import os
import tempfile

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP_FLAG = "-fopenmp"
# the AMX kernel of the bfloat16 prefilter (asmk_index/_nearest_bf16.c) is compiled when the
# compiler knows the AMX intrinsics; whether the CPU and OS allow it is checked at run time
AMX_PROBE = """
#include <immintrin.h>
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512dq,avx512vl")))
void probe(float *out, const void *a) {
    _tile_zero(0);
    _tile_loadd(1, a, 64);
    _tile_loadd(2, a, 64);
    _tile_dpbf16ps(0, 1, 2);
    _tile_stored(0, out, 64);
    _tile_release();
}
int main(void) { return 0; }
"""


def compiler_builds(compiler, program: str, flags: list[str]) -> bool:
    """Whether the build's own compiler compiles and links ``program`` (C) with ``flags``."""
    with tempfile.TemporaryDirectory() as directory:
        source = os.path.join(directory, "probe.c")
        with open(source, "w") as handle:
            handle.write(program)
        try:
            objects = compiler.compile([source], output_dir=directory, extra_postargs=flags)
            compiler.link_executable(objects, os.path.join(directory, "probe"),
                                     extra_postargs=flags)
        except Exception:  # any compile or link error: the feature is left out
            return False
    return True


class BuildKernels(build_ext):
    """build_ext with OpenMP and the AMX kernel where the compiler supports them."""

    def build_extensions(self):
        openmp_program = "#include <omp.h>\nint main(void) { return omp_get_max_threads() < 1; }\n"
        if os.environ.get("ASMK_INDEX_NO_OPENMP") != "1" and compiler_builds(
                self.compiler, openmp_program, [OPENMP_FLAG]):
            for extension in self.extensions:
                extension.extra_compile_args.append(OPENMP_FLAG)
                extension.extra_link_args.append(OPENMP_FLAG)
        else:
            print("asmk_index: building the kernels without OpenMP (single-threaded)")
        if os.environ.get("ASMK_INDEX_NO_AMX") != "1" and compiler_builds(self.compiler,
                                                                          AMX_PROBE, []):
            for extension in self.extensions:
                extension.define_macros.append(("ASMK_HAVE_AMX", "1"))
        else:
            print("asmk_index: building without the AMX kernel (quantization uses BLAS products)")
        super().build_extensions()


extensions = [
    Extension(
        "asmk_index._kernels",
        ["asmk_index/_kernels.pyx", "asmk_index/_nearest_bf16.c"],
        include_dirs=["asmk_index"],
        # no FMA contraction: the exact distances of _nearest_bf16.c must round the same way in
        # its portable and AVX-512 versions
        extra_compile_args=["-O3", "-ffp-contract=off"],
    )
]

setup(ext_modules=cythonize(extensions, language_level=3), cmdclass={"build_ext": BuildKernels})
