"""Build script: the compiled ASMK* kernels of ``asmk_index`` (Cython, no numpy C API needed)."""
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "asmk_index._kernels",
        ["asmk_index/_kernels.pyx"],
        extra_compile_args=["-O3"],
    )
]

setup(ext_modules=cythonize(extensions, language_level=3))
