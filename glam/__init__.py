"""GLAM global descriptors (global-local, spatial-channel attention) for the first-stage shortlist.

Main entry points:
    GlamConfig, ExtractionConfig                   (glam.config)
    GlamDescriptorHead(channels, config): backbone map -> descriptor (the retrieval model's head)
    GlamModel(config).fit_whitening(images) / .save(path) / GlamModel.load(path)   (glam.model)
    extract_global_descriptor(model, image, config=...) -> (D,) float32            (glam.extract)
    extract_folder(model, folder_or_paths, out_path, config=...)                   (glam.extract)
    losses: ArcFace, contrastive, paired / two-view contrastive                     (glam.losses)
Training: the retrieval model's trainer (retrieval.training, pipelines/train.py) trains this head,
alone (train.local_loss: none) or with the MDA head on one backbone.
"""
from glam.config import ExtractionConfig, GlamConfig
from glam.extract import extract_folder, extract_global_descriptor
from glam.model import GlamDescriptorHead, GlamModel

__all__ = ["GlamConfig", "ExtractionConfig", "GlamModel", "GlamDescriptorHead", "extract_global_descriptor",
           "extract_folder"]
