"""MDA: multiple-dynamic-attention local features (Wu et al., ICCV 2021), our reading in DESIGN.md.

Public API::

    from mda import MdaConfig, ExtractionConfig, MdaModel
    model = MdaModel(MdaConfig())                      # EfficientNet-Lite0 stride16, 4 heads, 128-d
    model.fit_reduction(paths, max_images=1000)        # PCA-whitening init of the 128-d reduction
    model.save("mda.pt"); model = MdaModel.load("mda.pt")
    features = extract_local_features(model, "photo.jpg", config=ExtractionConfig())
    extract_folder(model, "photos/", "local.h5", config=ExtractionConfig())
    visualize_local_features(model, "photo.jpg", "attention.png")

Training: the retrieval model's trainer (``retrieval.training``, ``pipelines/train.py``) trains this
head, alone (``train.global_loss: none``) or with the GLAM head on one backbone.
"""
from .config import ExtractionConfig, MdaConfig, load_yaml, save_yaml
from .extract import LOCAL_FIELDS, LocalFeatures, extract_folder, extract_local_features
from .model import MdaModel, MultipleDynamicAttention
from .visualize import visualize_local_features

__all__ = ["ExtractionConfig", "MdaConfig", "load_yaml", "save_yaml", "LOCAL_FIELDS",
           "LocalFeatures", "extract_folder", "extract_local_features", "MdaModel", "MultipleDynamicAttention",
           "visualize_local_features"]
