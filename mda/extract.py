"""Test-time MDA local features: multi-scale pyramid, top-n over all heads and scales.

A location's score is its attention in a head; the top ``top_n`` over every head and scale are kept
(with ``unique_locations`` each location once, under its strongest head). Every kept feature has
its L2-normalised descriptor, attention, head, scale and (x, y) in ORIGINAL image pixels: the centre
of its feature cell, ``(j + 0.5) * stride`` in the resized image, divided by the resize factor.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from imagedata.images import ImageLoadError, image_to_tensor, load_image

from . import functional as MF
from .config import ExtractionConfig, to_dict

logger = logging.getLogger(__name__)

LOCAL_FIELDS: dict[str, str] = {"attention": "float32", "head": "int16", "x": "float32", "y": "float32",
                                "scale": "float32"}


@dataclass
class LocalFeatures:
    """Local features of one image (n rows, strongest first).

    descriptors (n, D) float32 L2-normalised; attention (n,) float32; head (n,) int64;
    x, y (n,) float32 in original image pixels; scale (n,) float32 (pyramid scale).
    image_size: (height, width) of the original image; timings: seconds per pyramid scale
    (network forward), and ``"total"`` for the whole call.
    """

    descriptors: np.ndarray
    attention: np.ndarray
    head: np.ndarray
    x: np.ndarray
    y: np.ndarray
    scale: np.ndarray
    image_size: tuple[int, int]
    timings: dict[Any, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.descriptors.shape[0])

    def fields(self) -> dict[str, np.ndarray]:
        """The per-feature fields stored in feature files (:data:`LOCAL_FIELDS`)."""
        return {name: getattr(self, name).astype(dtype) for name, dtype in LOCAL_FIELDS.items()}


# --- image input ----------------------------------------------------------------------------------

def _downscale(tensor: torch.Tensor, max_size: int | None) -> torch.Tensor:
    height, width = tensor.shape[-2:]
    longest = max(height, width)
    if max_size is None or longest <= max_size:
        return tensor
    factor = max_size / longest
    size = (max(1, round(height * factor)), max(1, round(width * factor)))
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=True)


def prepare_image(image: Any, *, max_size: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Any supported image -> ((1, 3, h, w) float32 in [0, 1] downscaled to ``max_size``,
    (height, width) of the original image).

    image: a path (str / PathLike), a PIL image, an (H, W, 3) uint8 array, or a (3, H, W) /
    (1, 3, H, W) float tensor in [0, 1]. Every input is downscaled the same way (antialiased
    bilinear in torch). Raises ImageLoadError (bad file) or ValueError/TypeError.
    """
    if isinstance(image, (str, os.PathLike)):
        # decoded at full size and downscaled here, exactly as extract_folder's images are, so a
        # query path and the same file in an index give identical features
        image = load_image(Path(image))
    if isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        tensor = image_to_tensor(image).unsqueeze(0)
    elif isinstance(image, torch.Tensor):
        tensor = image.unsqueeze(0) if image.ndim == 3 else image
        if tensor.ndim != 4 or tensor.shape[0] != 1 or tensor.shape[1] != 3:
            raise ValueError(f"expected a (3, H, W) or (1, 3, H, W) image tensor, got {tuple(image.shape)}")
        if not tensor.is_floating_point():
            raise ValueError(f"expected a float image tensor in [0, 1], got dtype {tensor.dtype}")
        tensor = tensor.float()
    else:
        raise TypeError(f"unsupported image type {type(image).__name__}: give a path, PIL image, "
                        "(H, W, 3) uint8 array or (3, H, W) float tensor")
    original = (int(tensor.shape[-2]), int(tensor.shape[-1]))
    return _downscale(tensor, max_size), original


def iter_image_tensors(images: Iterable[Any], *, max_size: int | None = None,
                       skip_errors: bool = True) -> Iterator[torch.Tensor]:
    """Yield (1, 3, h, w) tensors from paths / arrays / PIL images / tensors, or from a DataLoader's
    (B, 3, H, W) batches (split into single images; (batch, ...) tuples use their first item).
    Unloadable files are skipped with a warning when ``skip_errors``."""
    for item in images:
        if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
            item = item[0]
        if isinstance(item, torch.Tensor) and item.ndim == 4:
            for single in item:
                yield prepare_image(single, max_size=max_size)[0]
            continue
        try:
            yield prepare_image(item, max_size=max_size)[0]
        except ImageLoadError as error:
            if not skip_errors:
                raise
            logger.warning("skipping image: %s", error)


def pyramid(tensor: torch.Tensor, scales: Sequence[float], *, min_side: int = 1) -> Iterator[tuple[float, torch.Tensor]]:
    """Yield (scale, resized (1, 3, round(h*s), round(w*s))) for each scale whose shorter side is
    at least ``min_side`` pixels (antialiased bilinear when shrinking)."""
    height, width = tensor.shape[-2:]
    for scale in scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        if min(size) < min_side:
            continue
        if size == (height, width):
            yield float(scale), tensor
        else:
            yield float(scale), F.interpolate(tensor, size=size, mode="bilinear", align_corners=False,
                                              antialias=scale < 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- extraction ----------------------------------------------------------------------------------

@dataclass
class PyramidLevel:
    """One pyramid level's MDA maps of one image: attention (N, h, w), local (C_T, h, w)
    unnormalised, its scale and ``factor`` = (original pixels per resized pixel along x, along y)."""

    attention: torch.Tensor
    local: torch.Tensor
    scale: float
    factor: tuple[float, float]


def level_factor(original_size: tuple[int, int], resized: torch.Tensor) -> tuple[float, float]:
    """(x, y) original pixels per pixel of ``resized`` (1, 3, h, w); ``original_size`` = (H, W)."""
    return original_size[1] / resized.shape[-1], original_size[0] / resized.shape[-2]


def local_features_from_levels(levels: Sequence[PyramidLevel], *, stride: int, config: ExtractionConfig,
                               image_size: tuple[int, int]) -> LocalFeatures:
    """The top ``config.top_n`` features over every head and pyramid level (see the module
    docstring); ``image_size`` = (height, width) of the original image."""
    if not levels:
        raise ValueError("no pyramid level to select local features from")
    orig_h, orig_w = image_size
    chosen = MF.select_top_locations([level.attention for level in levels], config.top_n,
                                     unique_locations=config.unique_locations,
                                     border_cells=config.border_cells)
    count = chosen.score.numel()
    first = levels[0].local
    descriptors = torch.empty(count, first.shape[0], device=first.device, dtype=torch.float32)
    x = torch.empty(count, device=first.device)
    y = torch.empty(count, device=first.device)
    for index in chosen.scale_index.unique().tolist():
        rows = torch.nonzero(chosen.scale_index == index).squeeze(1)
        cols, lines = chosen.x[rows], chosen.y[rows]
        level = levels[index]
        descriptors[rows] = level.local[:, lines, cols].T.float()
        fx, fy = level.factor
        x[rows] = ((cols.float() + 0.5) * stride * fx).clamp(0, orig_w - 1)
        y[rows] = ((lines.float() + 0.5) * stride * fy).clamp(0, orig_h - 1)
    descriptors = F.normalize(descriptors, p=2, dim=1)
    scale_values = torch.tensor([level.scale for level in levels], dtype=torch.float32)[chosen.scale_index.cpu()]
    return LocalFeatures(
        descriptors=descriptors.cpu().numpy(),
        attention=chosen.score.float().cpu().numpy(),
        head=chosen.head.cpu().numpy().astype(np.int64),
        x=x.cpu().numpy().astype(np.float32),
        y=y.cpu().numpy().astype(np.float32),
        scale=scale_values.numpy(),
        image_size=(orig_h, orig_w),
    )


def too_small_error(tensor: torch.Tensor, config: ExtractionConfig, stride: int) -> ValueError:
    height, width = tensor.shape[-2:]
    return ValueError(f"image of {width}x{height} pixels is too small for every scale {config.scales} "
                      f"(stride {stride}, min_feature_side {config.min_feature_side})")


@torch.no_grad()
def extract_local_features(model, image: Any, *, config: ExtractionConfig | None = None,
                           device: torch.device | str | None = None) -> LocalFeatures:
    """Multi-scale top-n MDA local features of one image.

    model: an :class:`mda.model.MdaModel` (anything with ``features(images)``, ``stride``).
    image: path, PIL image, (H, W, 3) uint8 array or (3, H, W) float tensor in [0, 1].
    device: where to run (default: the model's device; the model is moved there if needed).
    Returns :class:`LocalFeatures` with at most ``config.top_n`` rows.
    """
    config = config if config is not None else ExtractionConfig()
    start = time.perf_counter()
    if device is not None:
        model = model.to(device)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        tensor, original = prepare_image(image, max_size=config.max_size)
        tensor = tensor.to(device)
        stride = int(model.stride)
        levels, timings = [], {}
        for scale, resized in pyramid(tensor, config.scales, min_side=stride * config.min_feature_side):
            _sync(device)
            tick = time.perf_counter()
            attention, local = model.features(resized)
            _sync(device)
            timings[scale] = time.perf_counter() - tick
            levels.append(PyramidLevel(attention[0], local[0], scale, level_factor(original, resized)))
        if not levels:
            raise too_small_error(tensor, config, stride)
        features = local_features_from_levels(levels, stride=stride, config=config, image_size=original)
        timings["total"] = time.perf_counter() - start
        features.timings = timings
        return features
    finally:
        model.train(was_training)


class LocalFeatureExtractor:
    """Callable for :func:`imagedata.extraction.extract_to_file`: (1, 3, H, W) [0, 1] image at
    its original size -> {"descriptors", "attention", "head", "x", "y", "scale"} (numpy)."""

    def __init__(self, model, config: ExtractionConfig):
        self.model = model
        self.config = config

    def __call__(self, image: torch.Tensor) -> dict[str, np.ndarray]:
        features = extract_local_features(self.model, image, config=self.config)
        return {"descriptors": features.descriptors, **features.fields()}


def extract_folder(model, images: Sequence[str | os.PathLike] | str | os.PathLike, out_path: str | os.PathLike, *,
                   config: ExtractionConfig | None = None, num_workers: int = 2,
                   device: torch.device | str | None = None, progress: bool = True,
                   report_path: str | os.PathLike | None = None, names: Sequence[str] | None = None,
                   attributes: dict[str, Any] | None = None):
    """Extract MDA local features of a folder (recursive) or a list of image files into an h5py
    feature file (``kind="local"``, ``dim = model.descriptor_dim``, fields :data:`LOCAL_FIELDS`),
    resumable, bad images skipped and reported (see :func:`imagedata.extraction.extract_to_file`).

    Images reach the extractor at full size and are downscaled to ``config.max_size`` here, so the
    stored x, y are in original image pixels. The file's attributes record the model and
    extraction configs (plus ``attributes``). Returns the ExtractionReport.
    """
    from imagedata.extraction import extract_to_file, resolve_device

    config = config if config is not None else ExtractionConfig()
    model = model.to(resolve_device(device)).eval()
    stored = {"extractor": "mda", "model": to_dict(model.config), "extraction": to_dict(config),
              "reduction_fitted": bool(model.head.reduction_fitted), **(attributes or {})}
    return extract_to_file(images, LocalFeatureExtractor(model, config), out_path, kind="local",
                           dim=model.descriptor_dim, fields=LOCAL_FIELDS, attributes=stored, max_size=None,
                           num_workers=num_workers, device=device, progress=progress,
                           report_path=report_path, names=names)
