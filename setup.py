"""Build script: the compiled ASMK* kernels of ``asmk_index`` (Cython, no numpy C API needed).

The kernels use OpenMP threads when the compiler supports ``-fopenmp`` (GCC, and clang with
libomp); otherwise they build single-threaded, with the same results.
"""
import os
import tempfile

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP_FLAG = "-fopenmp"


def compiler_supports_openmp(compiler) -> bool:
    """Compile and link a tiny OpenMP program with the build's own compiler."""
    with tempfile.TemporaryDirectory() as directory:
        source = os.path.join(directory, "probe.c")
        with open(source, "w") as handle:
            handle.write("#include <omp.h>\nint main(void) { return omp_get_max_threads() < 1; }\n")
        try:
            objects = compiler.compile([source], output_dir=directory, extra_postargs=[OPENMP_FLAG])
            compiler.link_executable(objects, os.path.join(directory, "probe"),
                                     extra_postargs=[OPENMP_FLAG])
        except Exception:  # any compile or link error: build without OpenMP
            return False
    return True


class BuildExtWithOpenMP(build_ext):
    def build_extensions(self):
        if os.environ.get("ASMK_INDEX_NO_OPENMP") != "1" and compiler_supports_openmp(self.compiler):
            for extension in self.extensions:
                extension.extra_compile_args.append(OPENMP_FLAG)
                extension.extra_link_args.append(OPENMP_FLAG)
        else:
            print("asmk_index: building the kernels without OpenMP (single-threaded)")
        super().build_extensions()


extensions = [
    Extension(
        "asmk_index._kernels",
        ["asmk_index/_kernels.pyx"],
        extra_compile_args=["-O3"],
    )
]

setup(ext_modules=cythonize(extensions, language_level=3), cmdclass={"build_ext": BuildExtWithOpenMP})
