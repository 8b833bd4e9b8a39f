"""Multi-scale GLAM global descriptors: one image, or a folder into a feature file.

Protocol (cirtorch / GLAM): the image's longer side is limited to `max_size`; for every scale s in
`scales` the image is resized by s (bilinear, antialiased), the model gives an L2-normalised
descriptor, the descriptors are averaged over scales and L2-normalised again.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as nnf

from backbones.layers import l2n
from glam.config import ExtractionConfig
from imagedata.images import ImageLoadError, list_images, load_image, resize_max_side, resize_short_side

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as PILImage

    from glam.model import GlamModel

logger = logging.getLogger(__name__)

__all__ = [
    "ImageInput",
    "prepare_image",
    "image_pyramid",
    "multiscale_descriptor",
    "extract_global_descriptor",
    "GlobalExtractor",
    "iter_pooled_descriptors",
    "extract_folder",
]

ImageInput = Union[str, os.PathLike, "PILImage.Image", np.ndarray, torch.Tensor]


def _array_to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [0, 1] (copies read-only arrays)."""
    return torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)[None].float().div_(255.0)


def prepare_image(image: ImageInput, config: Optional[ExtractionConfig] = None) -> torch.Tensor:
    """Any supported image -> (1, 3, H, W) float32 in [0, 1], longer side <= config.max_size.

    Accepts a file path, a PIL image, an (H, W, 3) uint8 array, or a (3, H, W) / (1, 3, H, W) float
    tensor in [0, 1]. Raises ImageLoadError (bad file) or ValueError (bad array / tensor).
    """
    config = config or ExtractionConfig()
    if isinstance(image, (str, os.PathLike)):
        return _array_to_tensor(load_image(image, max_size=config.max_size, min_size=config.min_size))
    if isinstance(image, torch.Tensor):
        tensor = image[None] if image.dim() == 3 else image
        if tensor.dim() != 4 or tensor.shape[:2] != (1, 3):
            raise ValueError(f"image tensor must be (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}")
        if not tensor.is_floating_point():
            raise ValueError(f"image tensor must be float in [0, 1], got {tensor.dtype}")
        tensor = tensor.float()
        longest = max(tensor.shape[-2:])
        if longest > config.max_size:
            factor = config.max_size / longest
            size = [max(1, round(d * factor)) for d in tensor.shape[-2:]]
            tensor = nnf.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=True)
        return tensor
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL image
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image array must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        return _array_to_tensor(resize_short_side(resize_max_side(image, config.max_size), config.min_size))
    raise TypeError(f"unsupported image type {type(image).__name__}; use a path, PIL image, uint8 array or tensor")


def image_pyramid(image: torch.Tensor, scales: Sequence[float]) -> list[torch.Tensor]:
    """(1, 3, H, W) -> one resized copy per scale (bilinear, antialiased; scale 1 returns the input)."""
    if image.dim() != 4:
        raise ValueError(f"expected (B, 3, H, W), got {tuple(image.shape)}")
    out = []
    for scale in scales:
        if scale == 1.0:
            out.append(image)
            continue
        size = [max(1, round(d * scale)) for d in image.shape[-2:]]
        out.append(nnf.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True))
    return out


@torch.no_grad()
def multiscale_descriptor(model: "GlamModel", image: torch.Tensor, scales: Sequence[float]) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1] -> (D,) mean over scales of the model's descriptors, L2-normalised."""
    total = None
    for scaled in image_pyramid(image.to(model.device), scales):  # resized on the model's device
        descriptor = model(scaled)[0]
        total = descriptor if total is None else total + descriptor
    return l2n(total.float() / len(scales), dim=0)


def extract_global_descriptor(
    model: "GlamModel",
    image: ImageInput,
    *,
    config: Optional[ExtractionConfig] = None,
    device: Union[str, torch.device, None] = None,
) -> np.ndarray:
    """One image (path | PIL | uint8 array | tensor) -> (D,) float32 L2-normalised descriptor.

    The model is put in eval mode (and moved to `device` when given).
    """
    config = config or ExtractionConfig()
    if device is not None:
        model.to(device)
    model.eval()
    return multiscale_descriptor(model, prepare_image(image, config), config.scales).cpu().numpy().astype(np.float32)


class GlobalExtractor:
    """Callable for imagedata.extraction.extract_to_file: (1, 3, H, W) in [0, 1] -> {"descriptors": (1, D)}."""

    def __init__(self, model: "GlamModel", config: Optional[ExtractionConfig] = None):
        self.model = model.eval()
        self.config = config or ExtractionConfig()

    def __call__(self, image: torch.Tensor) -> dict[str, np.ndarray]:
        image = prepare_image(image, self.config)  # also enforces max_size for tensors
        descriptor = multiscale_descriptor(self.model, image, self.config.scales)
        return {"descriptors": descriptor[None].cpu().numpy().astype(np.float32)}


def _sample(items: Sequence[Any], max_images: int, seed: int) -> Sequence[Any]:
    if len(items) <= max_images:
        return items
    chosen = np.sort(np.random.default_rng(seed).choice(len(items), size=max_images, replace=False))
    return [items[i] for i in chosen]


def _iter_images(images: Any, max_images: int, seed: int) -> Iterator[Any]:
    """Yield single images (paths, PIL, arrays, (3, H, W) tensors) from a folder, a list or an iterable."""
    if isinstance(images, (str, os.PathLike)):
        folder = Path(images)
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder not found: {folder}")
        images = list_images(folder)
        if not images:
            raise ValueError(f"no images found under {folder}")
    if isinstance(images, Sequence) and not isinstance(images, torch.Tensor):
        images = _sample(images, max_images, seed)
    count = 0
    for item in images:
        if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
            item = item[0]  # (images, labels...) batches from a DataLoader
        batch = item if isinstance(item, torch.Tensor) and item.dim() == 4 else [item]
        for single in batch:
            if count >= max_images:
                return
            yield single
            count += 1


@torch.no_grad()
def iter_pooled_descriptors(
    model: "GlamModel",
    images: Any,
    config: Optional[ExtractionConfig] = None,
    *,
    max_images: int = 1000,
    progress: bool = False,
    seed: int = 0,
) -> Iterator[torch.Tensor]:
    """Yield, per readable image, its pooled (pre-FC) GeM descriptors at every scale: (S, C).

    Unreadable images are skipped with a warning naming them (never abort a long run).
    """
    config = config or ExtractionConfig()
    stream: Iterable[Any] = _iter_images(images, max_images, seed)
    if progress:
        from tqdm import tqdm

        stream = tqdm(stream, desc="whitening", unit="img")
    for item in stream:
        try:
            image = prepare_image(item, config)
        except (ImageLoadError, OSError) as error:
            logger.warning("skipping unreadable image: %s", error)
            continue
        yield torch.cat([model.pooled(scaled) for scaled in image_pyramid(image.to(model.device), config.scales)])


def extract_folder(
    model: "GlamModel",
    images: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    out_path: Union[str, os.PathLike],
    *,
    config: Optional[ExtractionConfig] = None,
    device: Union[str, torch.device, None] = None,
    num_workers: int = 2,
    progress: bool = True,
    report_path: Union[str, os.PathLike, None] = None,
    names: Optional[Sequence[str]] = None,
    boxes: Optional[Sequence[Optional[Sequence[float]]]] = None,
    attributes: Optional[dict[str, Any]] = None,
) -> Any:
    """Multi-scale global descriptors of a folder (or list of paths) into the shared feature file.

    Uses imagedata.extraction.extract_to_file(kind="global", dim=D): progress bar, unreadable images
    skipped and reported, resumable, crash-safe. `boxes` crops (revisitop queries); `names` overrides
    the image names. The file's attributes record the model config and the extraction settings.
    Returns extract_to_file's ExtractionReport.
    """
    from imagedata.extraction import extract_to_file, resolve_device

    config = config or ExtractionConfig()
    target = resolve_device(device)
    model.to(target)
    info: dict[str, Any] = {"extractor": "glam", "model_config": model.config.to_dict(),
                            "extraction": config.to_dict()}
    info.update(attributes or {})
    return extract_to_file(
        images, GlobalExtractor(model, config), out_path, kind="global", dim=model.output_dim,
        attributes=info, max_size=config.max_size, num_workers=num_workers, device=target,
        progress=progress, report_path=report_path, names=names, boxes=boxes,
    )
