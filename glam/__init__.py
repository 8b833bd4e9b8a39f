"""GLAM global descriptors (global-local, spatial-channel attention) for the first-stage shortlist.

Main entry points:
    GlamConfig, ExtractionConfig, TrainConfig      (glam.config)
    GlamModel(config).fit_whitening(images) / .save(path) / GlamModel.load(path)   (glam.model)
    extract_global_descriptor(model, image, config=...) -> (D,) float32            (glam.extract)
    extract_folder(model, folder_or_paths, out_path, config=...)                   (glam.extract)
    python -m glam.train --help                                                    (glam.train)
"""
from glam.config import ExtractionConfig, GlamConfig, TrainConfig
from glam.extract import extract_folder, extract_global_descriptor
from glam.model import GlamModel

__all__ = ["GlamConfig", "ExtractionConfig", "TrainConfig", "GlamModel", "extract_global_descriptor",
           "extract_folder"]
