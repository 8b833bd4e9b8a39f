"""backbones: CNN feature extractors (EfficientNet-Lite0/1/2 with packaged weights, ResNet-50/101
from local checkpoints) and shared layers (GeM, L2N, PCA-whitening init)."""
from .layers import GeM, L2N, gem, init_linear_from_pca, l2n, learn_pca_whitening
from .networks import (BACKBONE_NAMES, TAP_CHANNELS, Backbone, BackboneConfig, build_backbone,
                       packaged_weights_path, trainable_parameters)

__all__ = [
    "BACKBONE_NAMES", "TAP_CHANNELS", "Backbone", "BackboneConfig", "build_backbone", "packaged_weights_path",
    "trainable_parameters", "GeM", "L2N", "gem", "l2n", "learn_pca_whitening", "init_linear_from_pca",
]
