"""Pictures of what MDA looks at: each head's attention over the image and the selected points.

PIL only (no matplotlib). :func:`visualize_local_features` writes one PNG laid out as
``[image + selected points | head 0 attention | head 1 attention | ...]``, every panel the image
resized so its longer side is ``panel_size`` (so the PNG is ``(N + 1) * w`` x ``h``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from .config import ExtractionConfig
from .extract import LocalFeatures, extract_local_features, prepare_image

# Distinct point colours per head (cycled for more heads).
HEAD_COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180), (70, 240, 240),
    (245, 130, 48), (240, 50, 230))


def jet_colormap(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 'jet' colours (blue low, red high)."""
    t = np.clip(values, 0.0, 1.0)[..., None]
    channels = np.concatenate([1.5 - np.abs(4 * t - 3), 1.5 - np.abs(4 * t - 2), 1.5 - np.abs(4 * t - 1)], -1)
    return (np.clip(channels, 0.0, 1.0) * 255).astype(np.uint8)


def attention_overlay(image: Image.Image, attention: np.ndarray, *, alpha: float = 0.55) -> Image.Image:
    """Blend a (h, w) non-negative attention map (normalised by its max, upsampled) over ``image``."""
    peak = float(attention.max())
    normalised = attention / peak if peak > 0 else np.zeros_like(attention)
    heat = Image.fromarray(jet_colormap(normalised.astype(np.float32))).resize(image.size, Image.Resampling.BILINEAR)
    return Image.blend(image.convert("RGB"), heat, alpha)


def draw_points(image: Image.Image, x: np.ndarray, y: np.ndarray, head: np.ndarray, *,
                factor: float, radius: int = 3) -> Image.Image:
    """Draw circles at (x, y) * factor coloured by head."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    for px, py, h in zip(np.asarray(x) * factor, np.asarray(y) * factor, np.asarray(head)):
        colour = HEAD_COLOURS[int(h) % len(HEAD_COLOURS)]
        draw.ellipse((px - radius, py - radius, px + radius, py + radius), outline=colour, width=2)
    return out


@torch.no_grad()
def visualize_local_features(model, image: Any, out_path: str | os.PathLike, *,
                             config: ExtractionConfig | None = None, panel_size: int = 256,
                             max_points: int = 200, features: LocalFeatures | None = None,
                             heads: Sequence[int] | None = None) -> Path:
    """Write the attention/points PNG of one image and return its path.

    The attention panels show each head's map at pyramid scale 1 (the image after ``max_size``);
    the first panel shows the ``max_points`` strongest selected features (all scales), coloured
    by head. ``features`` reuses an extraction already done. The PNG is written atomically.
    """
    config = config if config is not None else ExtractionConfig()
    tensor, (orig_h, orig_w) = prepare_image(image, max_size=config.max_size)
    if features is None:
        features = extract_local_features(model, tensor, config=config)
        factor_to_tensor = 1.0  # features are in the tensor's pixels when extracted from it
    else:
        factor_to_tensor = tensor.shape[-1] / orig_w
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        attention = model.features(tensor.to(device))[0][0].float().cpu().numpy()   # (N, h, w)
    finally:
        model.train(was_training)
    height, width = tensor.shape[-2:]
    panel_factor = panel_size / max(height, width)
    panel_w, panel_h = max(1, round(width * panel_factor)), max(1, round(height * panel_factor))
    picture = (tensor[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    base = Image.fromarray(picture).resize((panel_w, panel_h), Image.Resampling.BILINEAR)
    keep = slice(0, max_points)
    panels = [draw_points(base, features.x[keep], features.y[keep], features.head[keep],
                          factor=factor_to_tensor * panel_w / width)]
    for index in (heads if heads is not None else range(attention.shape[0])):
        panels.append(attention_overlay(base, attention[index]))
    sheet = Image.new("RGB", (panel_w * len(panels), panel_h))
    for position, panel in enumerate(panels):
        sheet.paste(panel, (position * panel_w, 0))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    sheet.save(tmp, format="PNG")
    os.replace(tmp, out_path)
    return out_path
