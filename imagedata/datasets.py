"""Training image sets shared by MDA and GLAM.

Sources (all give a :class:`LabelledImageList`: paths + integer labels, -1 = unlabelled):
  * :func:`labelled_from_revisitop` - a revisitop-layout set; each query and its positives
    (easy, + hard for 'medium') form a group; connected groups share a label (UKBench: the object).
  * :func:`labelled_from_gldv2_csv` - a GLDv2 ``train.csv``-style file with columns ``id`` and
    ``landmark_id`` (extra columns such as ``url`` ignored) or ``train_clean.csv`` style
    (``landmark_id,images`` with space-separated ids). Image paths: ``layout="gldv2"`` =
    ``ROOT/i/d/x/idx...jpg`` (first three characters of the id as folders, the GLDv2 download
    layout), ``layout="flat"`` = ``ROOT/<id>.jpg``, ``"auto"`` picks the one that exists.
    Missing files are skipped with one warning (count + first few).
  * :func:`unlabelled_folder` - every image under a folder, label -1 (``labels_from_subfolders``:
    the first-level folder name is the class).

Datasets (torch): :class:`ClassificationImages` ``(image, class)`` for ArcFace;
:class:`ImagePairs` ``(image_a, image_b, label)`` with label 1 for a positive pair and 0 for a
negative (labelled mode: same/different label; unlabelled mode: ``image_a``/``image_b`` are the same
picture, augmented twice by the caller's :class:`imagedata.augment.TwoViews`, or another picture
for negatives). Images come resized per :class:`TrainImageConfig`. A file that fails to load is
skipped with a warning and replaced by another item, so a bad image never stops training.
:func:`hardest_negatives` mines the hardest in-batch negative for each anchor.
"""
from __future__ import annotations

import csv
import logging
import os
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import ImageLoadError, image_to_tensor, list_images, load_image, resize_max_side

logger = logging.getLogger(__name__)

UNLABELLED = -1


@dataclass
class TrainImageConfig:
    """How training images are sized.

    size: square side when ``square`` (resized, aspect not kept, so batches stack; augmentations
        then crop), else the longer side (aspect kept; batches are lists).
    load_max_size: decoding limit passed to load_image (JPEG draft decoding keeps big files cheap).
    """

    size: int = 256
    square: bool = True
    load_max_size: int = 1024


@dataclass
class LabelledImageList:
    """Image paths with integer labels (``-1``: unlabelled) and optional original class ids."""

    paths: list[Path]
    labels: np.ndarray
    class_ids: list[Any] = field(default_factory=list)  # class_ids[label] = original id (e.g. landmark_id)

    def __post_init__(self) -> None:
        self.paths = [Path(p) for p in self.paths]
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.labels.shape != (len(self.paths),):
            raise ValueError(f"{len(self.paths)} paths but labels of shape {self.labels.shape}")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        labelled = self.labels[self.labels >= 0]
        return int(labelled.max()) + 1 if labelled.size else 0

    def labelled_only(self) -> "LabelledImageList":
        keep = self.labels >= 0
        return LabelledImageList([p for p, k in zip(self.paths, keep) if k], self.labels[keep], self.class_ids)


def _contiguous(raw_labels: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
    """Map arbitrary class ids to 0..K-1 in sorted order of first appearance-independent ids."""
    classes = sorted(set(raw_labels), key=lambda v: (str(type(v)), v))
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[c] for c in raw_labels], dtype=np.int64), classes


def labelled_from_revisitop(dataset, setting: str = "medium") -> LabelledImageList:
    """Database images of a :class:`~imagedata.revisitop.RevisitopDataset` labelled by query groups.

    Each query's positives (and the query image itself when it is in the database, which the
    revisitop convention marks as junk of its own query) are joined (union-find); images in no
    group get -1. Labels are 0..K-1.
    """
    n = len(dataset.imlist)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    in_group = np.zeros(n, dtype=bool)
    db_index = {name: i for i, name in enumerate(dataset.imlist)}
    for q, name in enumerate(dataset.qimlist):
        members = list(dataset.positives(q, setting))
        if name in db_index:
            members.append(db_index[name])
        if not members:
            continue
        in_group[members] = True
        root = find(members[0])
        for m in members[1:]:
            parent[find(m)] = root
    roots = [find(i) if in_group[i] else None for i in range(n)]
    unique_roots = sorted({r for r in roots if r is not None})
    mapping = {r: k for k, r in enumerate(unique_roots)}
    labels = np.array([mapping[r] if r is not None else UNLABELLED for r in roots], dtype=np.int64)
    return LabelledImageList(dataset.database_paths(), labels, class_ids=unique_roots)


def gldv2_image_path(root: Path, image_id: str, layout: str, extension: str = ".jpg") -> Path:
    """Path of a GLDv2 image: ``gldv2`` layout ``root/a/b/c/abc....jpg`` or ``flat`` ``root/<id>.jpg``."""
    if layout == "gldv2":
        return root / image_id[0] / image_id[1] / image_id[2] / f"{image_id}{extension}"
    if layout == "flat":
        return root / f"{image_id}{extension}"
    raise ValueError(f"unknown GLDv2 layout {layout!r}; use 'gldv2', 'flat' or 'auto'")


def _read_gldv2_rows(csv_path: Path) -> list[tuple[str, str]]:
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or [])
        rows: list[tuple[str, str]] = []
        if {"id", "landmark_id"} <= columns:
            for row in reader:
                rows.append((row["id"].strip(), row["landmark_id"].strip()))
        elif {"landmark_id", "images"} <= columns:
            for row in reader:
                rows.extend((image_id, row["landmark_id"].strip()) for image_id in row["images"].split())
        else:
            raise ValueError(f"{csv_path}: expected columns 'id,landmark_id' (train.csv) or 'landmark_id,images' "
                             f"(train_clean.csv), found {sorted(columns)}")
    return rows


def labelled_from_gldv2_csv(csv_path: str | os.PathLike, images_root: str | os.PathLike, *, layout: str = "auto",
                            extension: str = ".jpg", min_images_per_class: int = 1) -> LabelledImageList:
    """Images listed in a GLDv2-style csv (see module docstring), labels = contiguous landmark classes.

    Classes with fewer than ``min_images_per_class`` existing images are dropped.
    """
    csv_path, root = Path(csv_path), Path(images_root)
    if not csv_path.is_file():
        raise FileNotFoundError(f"GLDv2 csv not found: {csv_path}")
    if not root.is_dir():
        raise FileNotFoundError(f"GLDv2 image folder not found: {root}")
    rows = _read_gldv2_rows(csv_path)
    if layout == "auto":
        layout = "flat"
        for image_id, _ in rows[:50]:
            if len(image_id) >= 3 and gldv2_image_path(root, image_id, "gldv2", extension).is_file():
                layout = "gldv2"
                break
    paths, raw_labels, missing = [], [], []
    for image_id, landmark in rows:
        path = gldv2_image_path(root, image_id, layout, extension)
        if path.is_file():
            paths.append(path)
            raw_labels.append(int(landmark) if landmark.lstrip("-").isdigit() else landmark)
        else:
            missing.append(path)
    if missing:
        logger.warning("%s: %d of %d listed images are missing (skipped), e.g. %s", csv_path, len(missing), len(rows),
                       [str(p) for p in missing[:3]])
    counts: dict[Any, int] = defaultdict(int)
    for label in raw_labels:
        counts[label] += 1
    keep = [counts[label] >= min_images_per_class for label in raw_labels]
    paths = [p for p, k in zip(paths, keep) if k]
    raw_labels = [lab for lab, k in zip(raw_labels, keep) if k]
    if not paths:
        raise ValueError(f"{csv_path}: no usable images under {root} (layout {layout!r})")
    labels, classes = _contiguous(raw_labels)
    return LabelledImageList(paths, labels, class_ids=classes)


def unlabelled_folder(folder: str | os.PathLike, *, labels_from_subfolders: bool = False) -> LabelledImageList:
    """Every image under ``folder`` (recursive); label -1, or the first-level subfolder as class."""
    folder = Path(folder)
    paths = list_images(folder)
    if not paths:
        raise ValueError(f"no images found under {folder}")
    if not labels_from_subfolders:
        return LabelledImageList(paths, np.full(len(paths), UNLABELLED, dtype=np.int64))
    raw = [p.relative_to(folder).parts[0] if len(p.relative_to(folder).parts) > 1 else None for p in paths]
    keep = [r is not None for r in raw]
    labels, classes = _contiguous([r for r in raw if r is not None])
    return LabelledImageList([p for p, k in zip(paths, keep) if k], labels, class_ids=classes)


def load_train_image(path: Path, config: TrainImageConfig) -> torch.Tensor:
    """Load and size one training image -> ``(3, S, S)`` (square) or ``(3, H, W)`` float in [0, 1]."""
    image = load_image(path, max_size=config.load_max_size)
    if config.square:
        tensor = image_to_tensor(image)[None]
        tensor = torch.nn.functional.interpolate(tensor, size=(config.size, config.size), mode="bilinear",
                                                 align_corners=False, antialias=True)
        return tensor[0].clamp_(0, 1)
    return image_to_tensor(resize_max_side(image, config.size, upscale=True))


class _RobustImages(Dataset):
    """Base: loads images by index, remembering and skipping files that fail (with a warning)."""

    def __init__(self, images: LabelledImageList, config: TrainImageConfig | None,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None, seed: int):
        self.images = images
        self.config = config or TrainImageConfig()
        self.transform = transform
        self.bad: set[int] = set()
        self.rng = random.Random(seed)

    def _load(self, index: int) -> torch.Tensor | None:
        if index in self.bad:
            return None
        try:
            tensor = load_train_image(self.images.paths[index], self.config)
        except ImageLoadError as error:
            logger.warning("skipping training image: %s", error)
            self.bad.add(index)
            return None
        return self.transform(tensor) if self.transform is not None else tensor

    def _give_up(self) -> RuntimeError:
        return RuntimeError(f"no loadable images left ({len(self.bad)} bad files, e.g. "
                            f"{[str(self.images.paths[i]) for i in list(self.bad)[:3]]})")


class ClassificationImages(_RobustImages):
    """``(image (3, S, S) float [0, 1], class index)`` for classification (ArcFace) training.

    Unlabelled entries (-1) are dropped. ``num_classes`` = number of classes.
    """

    MAX_RETRIES = 50

    def __init__(self, images: LabelledImageList, config: TrainImageConfig | None = None,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None, seed: int = 0):
        super().__init__(images.labelled_only(), config, transform, seed)
        if len(self.images) == 0:
            raise ValueError("ClassificationImages needs labelled images (all labels are -1)")
        self.num_classes = self.images.num_classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for _ in range(self.MAX_RETRIES):
            tensor = self._load(index)
            if tensor is not None:
                return tensor, int(self.images.labels[index])
            index = self.rng.randrange(len(self.images))
        raise self._give_up()


class ImagePairs(_RobustImages):
    """Image pairs for contrastive training: ``(image_a, image_b, label)``, label 1 = positive, 0 = negative.

    Labelled mode (some labels >= 0): per anchor with at least one same-label mate, one positive
    pair (a random mate) and ``negatives_per_positive`` negative pairs (random images of other
    labels). Unlabelled mode (all -1): the positive pair is the same image twice (the caller
    augments the two sides differently, e.g. :class:`imagedata.augment.TwoViews`), negatives are
    other images. :meth:`resample` draws new pairs (call once per epoch; deterministic per seed+epoch).
    """

    MAX_RETRIES = 50

    def __init__(self, images: LabelledImageList, config: TrainImageConfig | None = None, *,
                 negatives_per_positive: int = 1, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 seed: int = 0):
        super().__init__(images, config, transform, seed)
        if len(images) < 2:
            raise ValueError("ImagePairs needs at least two images")
        self.negatives_per_positive = int(negatives_per_positive)
        self.seed = seed
        self.unlabelled = bool((images.labels < 0).all())
        by_label: dict[int, list[int]] = defaultdict(list)
        for i, label in enumerate(images.labels):
            if label >= 0:
                by_label[int(label)].append(i)
        self.by_label = dict(by_label)
        if not self.unlabelled and not any(len(v) > 1 for v in self.by_label.values()):
            raise ValueError("labelled ImagePairs needs at least one label with two images")
        self.pairs: list[tuple[int, int, int]] = []
        self.resample(0)

    def resample(self, epoch: int) -> None:
        """Draw this epoch's pairs: list of (index_a, index_b, label)."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        n = len(self.images)
        labels = self.images.labels
        pairs: list[tuple[int, int, int]] = []
        for anchor in range(n):
            label = int(labels[anchor])
            if self.unlabelled:
                pairs.append((anchor, anchor, 1))
            else:
                mates = [m for m in self.by_label.get(label, []) if m != anchor] if label >= 0 else []
                if not mates:
                    continue
                pairs.append((anchor, rng.choice(mates), 1))
            for _ in range(self.negatives_per_positive):
                for _attempt in range(100):
                    other = rng.randrange(n)
                    if other != anchor and (self.unlabelled or labels[other] != label):
                        pairs.append((anchor, other, 0))
                        break
        rng.shuffle(pairs)
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        for _ in range(self.MAX_RETRIES):
            a, b, label = self.pairs[index]
            image_a = self._load(a)
            image_b = image_a if (a == b and image_a is not None) else self._load(b)
            if image_a is not None and image_b is not None:
                return image_a, (image_b.clone() if a == b else image_b), label
            index = self.rng.randrange(len(self.pairs))
        raise self._give_up()


def hardest_negatives(descriptors: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Index of the most similar descriptor with a different label, per row.

    Args:
        descriptors: ``(B, D)`` (L2-normalised for cosine similarity).
        labels: ``(B,)`` integer labels; in unlabelled mode use distinct ids per image.
    Returns:
        ``(B,)`` int64 indices; -1 where a row has no negative in the batch.
    """
    if descriptors.ndim != 2 or labels.shape != (descriptors.shape[0],):
        raise ValueError(f"expected descriptors (B, D) and labels (B,), got {tuple(descriptors.shape)} and "
                         f"{tuple(labels.shape)}")
    with torch.no_grad():
        similarity = descriptors @ descriptors.T
        same = labels[:, None] == labels[None, :]
        similarity = similarity.masked_fill(same, float("-inf"))
        best = similarity.argmax(dim=1)
        has_negative = (~same).any(dim=1)
        return torch.where(has_negative, best, torch.full_like(best, -1))


def stack_or_list(batch: Sequence[Any]) -> Any:
    """DataLoader collate for variable-size images: stacks equal-size tensors, else keeps lists."""
    first = batch[0]
    if isinstance(first, tuple):
        return tuple(stack_or_list([item[i] for item in batch]) for i in range(len(first)))
    if isinstance(first, torch.Tensor):
        if all(t.shape == first.shape for t in batch):
            return torch.stack(list(batch))
        return list(batch)
    if isinstance(first, (int, np.integer)):
        return torch.tensor([int(v) for v in batch], dtype=torch.int64)
    return list(batch)
