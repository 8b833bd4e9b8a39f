"""imagedata: robust image loading, revisitop data + evaluation, datasets, augmentations, the shared
folder -> feature-file extraction loop and training utilities.

Submodules are imported lazily by callers (``from imagedata.images import load_image``) so that the
numpy-only parts (revisitop) do not pull in torch.
"""
