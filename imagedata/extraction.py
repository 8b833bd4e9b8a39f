"""The batched folder/list -> feature-file extraction loop shared by MDA (local) and GLAM (global).

A torch DataLoader (optionally with worker processes) loads each image with :func:`load_image`; a
bad image becomes an error item (the worker never raises). The caller's ``extractor`` turns a
batch of equal-size images ``(B, 3, H, W)`` float in [0, 1] (on ``device``; B = 1 unless
``batch_size`` asks for more) into one ``{"descriptors": (n, dim) float32, <field>: (n,) ...,
<image field>: value}`` per image, each appended to an
:class:`asmk_index.feature_file.FeatureFileWriter`.

* Image names: the path relative to the folder, POSIX separators, without extension
  (``folder/sub/a.jpg`` -> ``"sub/a"``). For a list of paths, relative to their common parent
  directory (or pass ``names=``). Two files giving the same name are an error.
* Resume: names already stored in the file are skipped; failures are retried; every finished image
  is committed as soon as it is written, so an interrupted run loses at most the image in flight.
* Bad images: a warning per file, a line ``<path>\\t<reason>`` appended to ``report_path`` and a
  failure record in the feature file. Extractor errors on one image are recorded the same way,
  but ``max_consecutive_errors`` extractor errors in a row abort the run (that is a bug, not data).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .images import ImageLoadError, crop_to_box, list_images, load_image, resize_max_side

logger = logging.getLogger(__name__)

Extractor = Callable[[torch.Tensor], "Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]]"]
BoundingBox = Sequence[float]


@dataclass
class ExtractionReport:
    """What one :func:`extract_to_file` run did."""

    out_path: Path
    total: int                      # images asked for
    skipped: int                    # already in the file (resume)
    extracted: int                  # stored by this run
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of this run
    descriptors: int = 0            # rows stored by this run
    seconds: float = 0.0
    device: str = "cpu"

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def images_per_second(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        return (f"{self.out_path}: {self.extracted} extracted, {self.skipped} already done, {self.failed} failed "
                f"of {self.total}; {self.descriptors} descriptors; {self.images_per_second:.2f} img/s on {self.device}")


def image_names(paths: Sequence[Path], root: Path | None = None) -> list[str]:
    """Names of image files: path relative to ``root`` (default: common parent), no extension, POSIX."""
    paths = [Path(p) for p in paths]
    if not paths:
        return []
    if root is None:
        parents = [str(p.resolve().parent) for p in paths]
        root = Path(os.path.commonpath(parents))
    root = root.resolve()
    names = []
    for path in paths:
        resolved = path.resolve()
        try:
            relative = resolved.relative_to(root)
        except ValueError:
            raise ValueError(f"image {path} is not under {root}") from None
        names.append(relative.with_suffix("").as_posix())
    return names


def _check_unique(names: Sequence[str], paths: Sequence[Path]) -> None:
    seen: dict[str, Path] = {}
    for name, path in zip(names, paths):
        if name in seen:
            raise ValueError(f"two images get the same name {name!r}: {seen[name]} and {path}; rename one or pass names=")
        seen[name] = path


class _ImageItems(Dataset):
    """Loads image i -> {'index', 'image' (3, H, W) uint8 or None, 'error' str or None}."""

    def __init__(self, paths: Sequence[Path], max_size: int | None, boxes: Sequence[BoundingBox | None] | None):
        self.paths = list(paths)
        self.max_size = max_size
        self.boxes = boxes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        box = self.boxes[index] if self.boxes is not None else None
        try:
            if box is None:
                image = load_image(path, max_size=self.max_size)
            else:  # crop in original pixels first, then resize (revisitop query protocol)
                image = crop_to_box(load_image(path), box)
                if self.max_size is not None:
                    image = resize_max_side(image, self.max_size)
            # uint8 crosses the worker boundary (4x less than float); converted on the device.
            return {"index": index, "image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1),
                    "error": None}
        except ImageLoadError as error:
            return {"index": index, "image": None, "error": error.reason}
        except ValueError as error:  # e.g. an empty box
            return {"index": index, "image": None, "error": str(error)}
        except Exception as error:  # never let a worker die on one file
            return {"index": index, "image": None, "error": f"{type(error).__name__}: {error}"}


def _first_item(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return batch[0]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"`` -> CUDA when torch sees a GPU, else the CPU; ``"cpu"``, ``"cuda"``,
    ``"cuda:N"`` are checked: asking for a GPU this machine does not have is a ValueError saying so."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device}: torch sees no CUDA GPU on this machine "
                             "(use --device cpu, or auto to take a GPU when there is one)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type != "cpu":
        raise ValueError(f"device {device}: only cpu and cuda devices are supported")
    return device


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def extract_to_file(
    images: Sequence[str | os.PathLike] | str | os.PathLike,
    extractor: Extractor,
    out_path: str | os.PathLike,
    *,
    kind: str,
    dim: int,
    fields: Mapping[str, str] | None = None,
    image_fields: Mapping[str, tuple[str, tuple[int, ...]]] | None = None,
    attributes: Mapping[str, Any] | None = None,
    max_size: int | None = 1024,
    num_workers: int = 2,
    device: str | torch.device | None = None,
    progress: bool = True,
    report_path: str | os.PathLike | None = None,
    names: Sequence[str] | None = None,
    boxes: Sequence[BoundingBox | None] | None = None,
    batch_size: int = 1,
    max_consecutive_errors: int = 5,
) -> ExtractionReport:
    """Extract every image to a feature file, resuming an earlier run.

    Args:
        images: a folder (searched recursively, :func:`list_images`) or a list of image paths.
        extractor: ``f((B, 3, H, W) float [0, 1] on device)`` -> one mapping per image
            ``{"descriptors": (n, dim), field: (n,), image_field: value}`` (a list of B mappings;
            with ``batch_size`` 1 a single mapping may be returned); called under
            ``torch.no_grad()``. An ``nn.Module`` extractor is moved to ``device`` and put in eval
            mode; any other callable must handle devices itself.
        out_path: the feature file (created or resumed; see FeatureFileWriter).
        kind, dim, fields, image_fields, attributes: passed to ``FeatureFileWriter``; ``fields`` maps
            each extra per-descriptor output of the extractor to its dtype, ``image_fields`` each
            per-image output to (dtype, shape) (other outputs are ignored).
        max_size: longer image side given to the extractor (None: original size).
        num_workers: DataLoader worker processes loading images (0: in this process).
        device: torch device; None = CUDA when present, else CPU.
        progress: show a tqdm bar.
        report_path: text file; one ``<path>\t<reason>`` line is appended per failed image.
        names: image names (default: see module docstring); must be unique.
        boxes: optional per-image crop box (x0, y0, x1, y1) in original pixels (revisitop queries).
        batch_size: up to this many consecutive images of the same size go through the extractor
            together (one forward per pyramid level for all of them).
        max_consecutive_errors: abort (RuntimeError) after this many extractor errors in a row.

    Returns:
        :class:`ExtractionReport`.
    """
    from asmk_index.feature_file import FeatureFileWriter

    started = time.perf_counter()
    if isinstance(images, (str, os.PathLike)) and Path(images).is_dir():
        folder = Path(images)
        paths = list_images(folder)
        default_names = image_names(paths, folder)
    elif isinstance(images, (str, os.PathLike)):
        raise FileNotFoundError(f"image folder does not exist: {images}")
    else:
        paths = [Path(p) for p in images]
        default_names = image_names(paths) if names is None else []
    names = list(names) if names is not None else default_names
    if len(names) != len(paths):
        raise ValueError(f"{len(names)} names for {len(paths)} images")
    if boxes is not None and len(boxes) != len(paths):
        raise ValueError(f"{len(boxes)} boxes for {len(paths)} images")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_unique(names, paths)
    target = resolve_device(device)
    if isinstance(extractor, nn.Module):
        extractor.to(target).eval()
    fields = dict(fields or {})
    image_fields = dict(image_fields or {})
    report = ExtractionReport(out_path=Path(out_path), total=len(paths), skipped=0, extracted=0, device=str(target))
    report_file = None
    if report_path is not None:
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        report_file = open(report_path, "a", encoding="utf-8", errors="surrogateescape")
    try:
        with FeatureFileWriter(out_path, kind=kind, dim=dim, fields=fields, image_fields=image_fields,
                               attributes=attributes) as writer:
            todo = [i for i, name in enumerate(names) if name not in writer.done]
            report.skipped = len(paths) - len(todo)
            if report.skipped:
                logger.info("%s: resuming, %d of %d images already done", out_path, report.skipped, len(paths))
            dataset = _ImageItems([paths[i] for i in todo], max_size,
                                  None if boxes is None else [boxes[i] for i in todo])
            workers = max(0, int(num_workers)) if len(todo) > 1 else 0
            loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=workers,
                                collate_fn=_first_item, pin_memory=target.type == "cuda",
                                prefetch_factor=max(4, batch_size) if workers else None)

            def record_failure(position: int, reason: str) -> None:
                path, name = paths[todo[position]], names[todo[position]]
                logger.warning("skipping image %s: %s", path, reason)
                writer.add_failure(name, reason)
                report.failures.append((str(path), reason))
                if report_file is not None:
                    report_file.write(f"{path}\t{reason}\n")
                    report_file.flush()

            def store(position: int, output: Mapping[str, Any]) -> None:
                descriptors = _as_numpy(output["descriptors"]).astype(np.float32, copy=False)
                if descriptors.ndim == 1 and kind == "global":
                    descriptors = descriptors[None]
                values = {f: _as_numpy(output[f]) for f in fields}
                image_values = {f: _as_numpy(output[f]) for f in image_fields}
                writer.add(names[todo[position]], descriptors, image_values=image_values, **values)
                report.extracted += 1
                report.descriptors += int(descriptors.shape[0])

            def extract(batch: list[dict[str, Any]]) -> list[Mapping[str, Any]]:
                with torch.no_grad():
                    stacked = torch.stack([item["image"] for item in batch]).to(target, non_blocking=True)
                    outputs = extractor(stacked.float().div_(255.0))
                if isinstance(outputs, Mapping):
                    outputs = [outputs]
                if len(outputs) != len(batch):
                    raise ValueError(f"the extractor gave {len(outputs)} results for {len(batch)} images")
                return list(outputs)

            consecutive_errors = 0

            def fail(item: dict[str, Any], error: Exception) -> None:
                nonlocal consecutive_errors
                consecutive_errors += 1
                reason = f"extractor failed: {type(error).__name__}: {error}"
                record_failure(item["index"], reason)
                if consecutive_errors >= max_consecutive_errors:
                    raise RuntimeError(
                        f"{consecutive_errors} images in a row failed in the extractor (last: "
                        f"{paths[todo[item['index']]]}: {reason}); stopping: this looks like a bug, "
                        "not bad data") from error

            def run(batch: list[dict[str, Any]]) -> None:
                """Extract and store a batch; after an error, each image alone (to find the bad one)."""
                nonlocal consecutive_errors
                try:
                    outputs = extract(batch)
                except Exception as error:  # noqa: BLE001 - recorded, counted, re-raised when systematic
                    if len(batch) == 1:
                        fail(batch[0], error)
                    else:
                        for item in batch:
                            run([item])
                    return
                for item, output in zip(batch, outputs):
                    try:
                        store(item["index"], output)
                    except Exception as error:  # noqa: BLE001 - as above
                        fail(item, error)
                        continue
                    consecutive_errors = 0

            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(todo), desc=f"extract {Path(out_path).name}", unit="img", dynamic_ncols=True)
            pending: list[dict[str, Any]] = []
            try:
                for item in loader:
                    if bar is not None:
                        bar.update(1)
                    if item["error"] is not None:
                        record_failure(item["index"], item["error"])
                        continue
                    if pending and (len(pending) == batch_size or pending[0]["image"].shape != item["image"].shape):
                        run(pending)
                        pending = []
                    pending.append(item)
                if pending:
                    run(pending)
            finally:
                if bar is not None:
                    bar.close()
    finally:
        if report_file is not None:
            report_file.close()
    report.seconds = time.perf_counter() - started
    logger.info(report.summary())
    return report


def default_num_workers() -> int:
    """A sensible DataLoader worker count: CPUs - 1, at most 8 (0 on a single core)."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


__all__ = ["ExtractionReport", "extract_to_file", "image_names", "resolve_device", "default_num_workers"]

