"""The built-in demo collection: real photos shipped by an installed package, with generated views.

The only real photographs every installation carries are scikit-learn's two sample images
(``china.jpg``: a temple by a lake, ``flower.jpg``: a dahlia; 640 x 427 each). Each photo is cut
into non-overlapping regions; every region is one *object*. For each object the collection holds several
generated *views* (crop + rescale, rotation, perspective, colour/lighting change) in the database
and one further, unseen view as the query. *Distractors* (generated scenes of shapes and
gradients, and the photos' other parts mirrored and blurred beyond recognition) fill the database.

The result is written in two folders plus a ground truth, so the demo and the tests can score the
ranking::

    ROOT/database/<object>_v<i>.jpg, ROOT/database/distractor_<j>.jpg
    ROOT/queries/<object>_query.jpg
    ROOT/groundtruth.json   {query name: [database names of the same object]}
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

#: (photo, box left/top/right/bottom as fractions of the photo) of every demo object.
DEMO_OBJECTS: dict[str, tuple[str, tuple[float, float, float, float]]] = {
    "temple_top": ("china.jpg", (0.10, 0.05, 0.55, 0.50)),
    "temple_base": ("china.jpg", (0.08, 0.52, 0.52, 0.95)),
    "lake_island": ("china.jpg", (0.52, 0.40, 0.82, 0.72)),
    "trees_right": ("china.jpg", (0.82, 0.30, 1.00, 1.00)),
    "dahlia": ("flower.jpg", (0.25, 0.15, 0.70, 0.85)),
}


@dataclass
class DemoCollection:
    """Where the demo images are and which database images show each query's object."""
    root: Path
    database: Path
    queries: Path
    groundtruth: dict[str, list[str]] = field(default_factory=dict)

    @property
    def query_paths(self) -> list[Path]:
        return [self.queries / name for name in sorted(self.groundtruth)]


def sample_photo_paths() -> dict[str, Path]:
    """The real photos shipped with scikit-learn (``name -> path``)."""
    import sklearn.datasets
    folder = Path(sklearn.datasets.__file__).parent / "images"
    paths = {path.name: path for path in sorted(folder.glob("*.jpg"))}
    if not paths:
        raise FileNotFoundError(f"scikit-learn's sample photos are missing from {folder}")
    return paths


def _crop_fraction(image: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    width, height = image.size
    left, top, right, bottom = box
    return image.crop((round(left * width), round(top * height),
                       round(right * width), round(bottom * height)))


def _perspective_coefficients(source: list[tuple[float, float]],
                              target: list[tuple[float, float]]) -> list[float]:
    """PIL PERSPECTIVE coefficients mapping output points ``target`` to input points ``source``."""
    rows = []
    for (x, y), (u, v) in zip(target, source):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    rhs = np.asarray(source, dtype=np.float64).reshape(-1)
    return np.linalg.solve(np.asarray(rows, dtype=np.float64), rhs).tolist()


def make_view(image: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """One generated view of ``image``: ``kind`` in crop, rotate, perspective, light, mixed."""
    width, height = image.size
    view = image
    if kind in ("crop", "mixed"):
        keep = rng.uniform(0.7, 0.85)
        cw, ch = int(width * keep), int(height * keep)
        x0, y0 = int(rng.integers(0, width - cw + 1)), int(rng.integers(0, height - ch + 1))
        scale = rng.uniform(0.8, 1.3)
        view = view.crop((x0, y0, x0 + cw, y0 + ch)).resize(
            (max(32, int(cw * scale)), max(32, int(ch * scale))), Image.BICUBIC)
    if kind in ("rotate", "mixed"):
        angle = float(rng.uniform(10, 25) * rng.choice([-1, 1]))
        view = view.rotate(angle, resample=Image.BICUBIC, expand=True, fillcolor=(128, 128, 128))
    if kind in ("perspective", "mixed"):
        w, h = view.size
        jitter = lambda: float(rng.uniform(0.0, 0.15))  # noqa: E731 (fraction of the side)
        corners = [(0, 0), (w, 0), (w, h), (0, h)]
        moved = [(jitter() * w, jitter() * h), (w - jitter() * w, jitter() * h),
                 (w - jitter() * w, h - jitter() * h), (jitter() * w, h - jitter() * h)]
        view = view.transform((w, h), Image.PERSPECTIVE, _perspective_coefficients(corners, moved),
                              resample=Image.BICUBIC, fillcolor=(128, 128, 128))
    if kind in ("light", "mixed"):
        view = ImageEnhance.Brightness(view).enhance(float(rng.uniform(0.6, 1.4)))
        view = ImageEnhance.Contrast(view).enhance(float(rng.uniform(0.7, 1.3)))
        view = ImageEnhance.Color(view).enhance(float(rng.uniform(0.5, 1.5)))
    return view.convert("RGB")


def make_distractor(photos: list[Image.Image], index: int, rng: np.random.Generator,
                    size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A distractor: a generated scene of shapes on a gradient, or a heavily altered photo part."""
    if index % 3 == 2:  # a photo region mirrored, blurred and recoloured: same statistics, no match
        photo = photos[index % len(photos)]
        left, top = rng.uniform(0.0, 0.4), rng.uniform(0.0, 0.4)
        region = _crop_fraction(photo, (left, top, left + 0.6, top + 0.6))
        region = region.transpose(Image.FLIP_TOP_BOTTOM).filter(ImageFilter.GaussianBlur(6))
        return ImageEnhance.Color(region).enhance(0.2).resize(size, Image.BICUBIC).convert("RGB")
    width, height = size
    ramp = np.linspace(0.0, 1.0, width)[None, :, None] * np.ones((height, 1, 1))
    start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    canvas = Image.fromarray((start + (end - start) * ramp).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(8, 20))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        radius = rng.uniform(8, 60)
        shape = rng.integers(0, 3)
        if shape == 0:
            draw.ellipse((x0 - radius, y0 - radius, x0 + radius, y0 + radius), fill=colour)
        elif shape == 1:
            draw.rectangle((x0, y0, x0 + radius * 1.5, y0 + radius), fill=colour)
        else:
            points = [(x0 + radius * math.cos(a), y0 + radius * math.sin(a))
                      for a in np.sort(rng.uniform(0, 2 * math.pi, 5))]
            draw.polygon(points, fill=colour)
    return canvas


def make_demo_collection(root: str | os.PathLike, *, views_per_object: int = 4,
                         distractors: int = 12, max_side: int = 320, seed: int = 0,
                         objects: dict | None = None) -> DemoCollection:
    """Write the demo collection under ``root`` (idempotent: same seed, same files).

    ``views_per_object`` database views per object (the first is the plain region), one more
    generated view per object is the query; ``max_side`` is the longest side of every image.
    """
    root = Path(root)
    database, queries = root / "database", root / "queries"
    database.mkdir(parents=True, exist_ok=True)
    queries.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photo_paths = sample_photo_paths()
    photos = {name: Image.open(path).convert("RGB") for name, path in photo_paths.items()}
    view_kinds = ["crop", "rotate", "perspective", "light", "mixed"]

    def save(image: Image.Image, path: Path) -> None:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.BICUBIC)
        image.save(path, quality=92)

    groundtruth: dict[str, list[str]] = {}
    for name, (photo_name, box) in (objects or DEMO_OBJECTS).items():
        region = _crop_fraction(photos[photo_name], box)
        members = []
        for view_index in range(views_per_object):
            view = region if view_index == 0 else make_view(
                region, view_kinds[(view_index - 1) % len(view_kinds)], rng)
            filename = f"{name}_v{view_index}.jpg"
            save(view, database / filename)
            members.append(filename)
        save(make_view(region, "mixed", rng), queries / f"{name}_query.jpg")
        groundtruth[f"{name}_query.jpg"] = members
    photo_list = list(photos.values())
    for index in range(distractors):
        save(make_distractor(photo_list, index, rng), database / f"distractor_{index:02d}.jpg")
    (root / "groundtruth.json").write_text(json.dumps(groundtruth, indent=2), encoding="utf-8")
    return DemoCollection(root=root, database=database, queries=queries, groundtruth=groundtruth)


__all__ = ["DemoCollection", "DEMO_OBJECTS", "make_demo_collection", "make_view",
           "make_distractor", "sample_photo_paths"]
