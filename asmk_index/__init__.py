"""asmk_index: the ASMK* engine and the two-stage index, on descriptors only (numpy, faiss, h5py)."""
