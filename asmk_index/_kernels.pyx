# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled ASMK* hot loops (placeholder, replaced by the real kernels)."""
def version():
    return 0
