"""Robust image loading and small image helpers shared by the whole project.

Every image enters the system through :func:`load_image`, which returns an ``(H, W, 3) uint8`` RGB
array or raises :class:`ImageLoadError` naming the file and what is wrong. It handles EXIF
orientation, every PIL mode (grayscale, palette, CMYK, LA/RGBA/PA alpha composited on white,
16-bit and 32-bit integer/float images scaled to 8 bit), very large images (JPEG draft decoding
and a decompression-bomb limit) and tiny images (upscaled so the short side reaches ``min_size``).
A truncated or non-image file is always an error, never a silently half-decoded picture.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import io
import logging
import math
import os
import stat
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

logger = logging.getLogger(__name__)

# A truncated file must never decode into a partially grey image: load_image enforces
# ImageFile.LOAD_TRUNCATED_IMAGES = False while it decodes (see _strict_pil_settings).


@dataclass(frozen=True)
class ImageLoadLimits:
    """Limits applied by :func:`load_image` (one place for the numbers).

    max_pixels: refuse images whose header declares more pixels than this (decompression bomb
        protection; 250 MP covers 16k x 15k photos). For JPEGs with ``max_size`` set the limit is
        checked against the draft-reduced size, so huge JPEGs that will be downscaled still load.
    """

    max_pixels: int = 250_000_000


DEFAULT_LIMITS = ImageLoadLimits()

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif"}
)
# Image-like extensions that Pillow decodes only in some builds or with a plugin: each is listed when
# the installed Pillow decodes it (see supported_image_extensions) and named in the scan's skipped
# list otherwise, with the reason. Camera raw formats need a raw developer, never Pillow.
OPTIONAL_IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".heic", ".heif", ".avif", ".avifs", ".jxl", ".jp2", ".j2k", ".jpx", ".jpf", ".psd", ".jpe"}
)
RAW_IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".raw", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".dng", ".orf", ".rw2",
     ".raf", ".pef", ".srw", ".x3f", ".3fr", ".erf", ".kdc", ".mrw", ".iiq", ".rwl"}
)
OTHER_IMAGE_LIKE_EXTENSIONS: frozenset[str] = frozenset({".svg", ".exr", ".hdr"})
_LOGGED_SKIPS = 10   # skipped files named in list_images' warning
_PROBE_SIZE = 8      # side of the tiny picture encoded and decoded to test a Pillow format

_WHITE = (255, 255, 255)


_pixel_limit_lock = threading.Lock()
_pixel_limit_users = 0
_saved_pil_settings: tuple[int | None, bool] = (None, False)


@contextlib.contextmanager
def _strict_pil_settings():
    """While loading: PIL's own decompression-bomb check off (we apply ours after JPEG draft) and
    truncated images refused even if other code switched ``LOAD_TRUNCATED_IMAGES`` on.

    Thread-safe: the PIL globals are restored when the last concurrent load finishes.
    """
    global _pixel_limit_users, _saved_pil_settings
    with _pixel_limit_lock:
        if _pixel_limit_users == 0:
            _saved_pil_settings = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
            Image.MAX_IMAGE_PIXELS = None
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        _pixel_limit_users += 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        with _pixel_limit_lock:
            _pixel_limit_users -= 1
            if _pixel_limit_users == 0:
                Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = _saved_pil_settings


@functools.lru_cache(maxsize=None)
def _register_optional_plugins() -> None:
    """Register Pillow plugins that are installed but not built in (``pillow-heif`` for HEIC/HEIF);
    once per process (DataLoader workers started by spawn register their own)."""
    try:
        import pillow_heif  # type: ignore[import-not-found]
    except ImportError:
        return
    pillow_heif.register_heif_opener()


@functools.lru_cache(maxsize=None)
def _pillow_decodes(extension: str) -> bool:
    """Whether the installed Pillow opens files with ``extension``: the format must be registered
    with an opener, and (where Pillow can also write it) a tiny picture must survive an encode and
    decode round trip, which catches formats whose codec library is missing from this build."""
    _register_optional_plugins()
    Image.init()
    image_format = Image.registered_extensions().get(extension)
    if image_format is None or image_format not in Image.OPEN:
        return False
    if image_format not in Image.SAVE:
        return True
    buffer = io.BytesIO()
    try:
        Image.new("RGB", (_PROBE_SIZE, _PROBE_SIZE), (200, 40, 90)).save(buffer, format=image_format)
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            decoded.load()
            return decoded.size == (_PROBE_SIZE, _PROBE_SIZE)
    except Exception:  # noqa: BLE001 - any failure means this build cannot round-trip the format
        return False


@functools.lru_cache(maxsize=None)
def supported_image_extensions() -> frozenset[str]:
    """Extensions :func:`scan_images` lists: :data:`IMAGE_EXTENSIONS` plus each of
    :data:`OPTIONAL_IMAGE_EXTENSIONS` that the installed Pillow (and its plugins) decodes."""
    return IMAGE_EXTENSIONS | frozenset(e for e in OPTIONAL_IMAGE_EXTENSIONS if _pillow_decodes(e))


def _unsupported_reason(extension: str) -> str | None:
    """Why a file with this image-like extension is not indexed, or None (not image-like)."""
    if extension in RAW_IMAGE_EXTENSIONS:
        return (f"unsupported image format ({extension}: camera raw); convert it to JPEG, PNG or "
                f"TIFF")
    if extension in OPTIONAL_IMAGE_EXTENSIONS | OTHER_IMAGE_LIKE_EXTENSIONS:
        hint = " or install pillow-heif" if extension in (".heic", ".heif") else ""
        return (f"unsupported image format ({extension}: the installed Pillow cannot decode it); "
                f"convert it to JPEG or PNG{hint}")
    return None


class ImageLoadError(ValueError):
    """An image file could not be loaded; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot load image {self.path!s}: {reason}")


def _to_rgb8(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha composited on white, high bit depths rescaled)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        # Palette images may carry transparency; go through RGBA so it is composited.
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F") or mode.startswith("I;"):
        array = np.asarray(img)
        return Image.fromarray(_scale_to_uint8(array, mode), mode="L").convert("RGB")
    if mode == "CMYK":
        return img.convert("RGB")
    # "L", "1", "YCbCr", "LAB", "HSV": PIL converts them correctly.
    return img.convert("RGB")


def _scale_to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """Map a high-bit-depth single-channel array to uint8.

    Integer images are scaled by their nominal range (16-bit: /257, i.e. 65535 -> 255), so a dark
    16-bit image stays dark; an "I"/"F" image whose values exceed 16 bits is scaled by its own
    maximum. Float images already in [0, 1] are scaled by 255.
    """
    values = array.astype(np.float64)
    if mode == "F":
        top = 1.0 if values.size and np.nanmax(values) <= 1.0 else float(np.nanmax(values)) or 1.0
    elif values.size and values.max() > 65535:
        top = float(values.max())
    elif mode == "I" and values.size and values.max() <= 255:
        top = 255.0
    else:
        top = 65535.0
    values = np.nan_to_num(values, nan=0.0)
    return np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8)


def load_image(
    path: str | os.PathLike,
    *,
    max_size: int | None = None,
    min_size: int = 16,
    limits: ImageLoadLimits = DEFAULT_LIMITS,
) -> np.ndarray:
    """Load an image file as an ``(H, W, 3) uint8`` RGB array.

    Args:
        path: image file.
        max_size: if given, the longer side is downscaled to at most this many pixels (JPEGs are
            decoded at a reduced scale first with ``Image.draft``, so a 100 MP photo is cheap).
        min_size: the short side is upscaled (bilinear, aspect kept) to at least this many pixels
            so every backbone gets a usable input; a debug log line notes it.
        limits: decompression-bomb limit (see :class:`ImageLoadLimits`).

    Raises:
        ImageLoadError: missing/empty/non-image/truncated/corrupt file, an unreadable file ("permission
            denied" / "cannot read the file": the system refused, the data may be fine), or an image
            over the limit.
    """
    path = Path(path)
    _register_optional_plugins()
    try:
        status = path.stat()
    except FileNotFoundError:
        reason = "dangling symbolic link" if path.is_symlink() else "file does not exist"
        raise ImageLoadError(path, reason) from None
    except OSError as error:
        raise ImageLoadError(path, _access_reason(error)) from None
    if not stat.S_ISREG(status.st_mode):
        raise ImageLoadError(path, "not a regular file" + (" (a directory)" if stat.S_ISDIR(status.st_mode)
                                                           else ""))
    if status.st_size == 0:
        raise ImageLoadError(path, "file is empty (0 bytes)")
    try:
        handle = open(path, "rb")
    except OSError as error:
        raise ImageLoadError(path, _access_reason(error)) from None
    try:
        with handle, _strict_pil_settings():
            with Image.open(handle) as img:
                image = _decode(img, path, max_size, limits)
    except ImageLoadError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageLoadError(path, "not a recognised image format (corrupt or not an image file)") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        if isinstance(error, OSError) and error.errno is not None:    # the system, not the decoder
            raise ImageLoadError(path, _access_reason(error)) from None
        reason = str(error) or type(error).__name__
        if "truncated" in reason.lower() or isinstance(error, EOFError):
            reason = f"truncated or incomplete image data ({reason})"
        else:
            reason = f"corrupt image data ({reason})"
        raise ImageLoadError(path, reason) from None
    except MemoryError:
        raise ImageLoadError(path, "out of memory while decoding (image too large)") from None

    array = np.array(image, dtype=np.uint8)  # a writable copy
    if array.ndim != 3 or array.shape[2] != 3:
        raise ImageLoadError(path, f"decoded to unexpected shape {array.shape}")
    short_side = min(array.shape[:2])
    if short_side < min_size:
        logger.debug("upscaling tiny image %s (%dx%d) to short side %d", path, array.shape[1],
                     array.shape[0], min_size)
        array = resize_short_side(array, min_size)
    return np.ascontiguousarray(array)


def _access_reason(error: OSError) -> str:
    """The reason a file could not be opened or read (permissions, I/O), never "corrupt"."""
    if isinstance(error, PermissionError):
        return f"permission denied (cannot read the file: {error.strerror or error})"
    if error.errno == errno.ELOOP:
        return "symbolic link loop"
    return f"cannot read the file ({error.strerror or error})"


def _decode(img: Image.Image, path: Path, max_size: int | None, limits: ImageLoadLimits) -> Image.Image:
    """Decode an opened PIL image fully (draft, limit check, load, EXIF transpose, RGB, max_size)."""
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageLoadError(path, f"invalid image size {width}x{height}")
    if max_size is not None and img.format == "JPEG" and max(width, height) > max_size:
        # Decode at 1/2, 1/4 or 1/8 scale directly in libjpeg, keeping at least max_size pixels.
        scale = max(width, height) / max_size
        img.draft("RGB", (math.ceil(width / scale), math.ceil(height / scale)))
        width, height = img.size
    if width * height > limits.max_pixels:
        raise ImageLoadError(
            path,
            f"image has {width}x{height} = {width * height / 1e6:.0f} MP, over the limit of "
            f"{limits.max_pixels / 1e6:.0f} MP (possible decompression bomb; raise ImageLoadLimits.max_pixels "
            f"if the file is genuine)",
        )
    img.load()  # forces full decoding; truncated data raises here
    img = ImageOps.exif_transpose(img) or img
    rgb = _to_rgb8(img)
    if max_size is not None and max(rgb.size) > max_size:
        scale = max_size / max(rgb.size)
        new_size = (max(1, round(rgb.size[0] * scale)), max(1, round(rgb.size[1] * scale)))
        rgb = rgb.resize(new_size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return rgb


class ImageScan(NamedTuple):
    """What :func:`scan_images` found: ``paths`` (sorted image files, under the folder, symbolic links
    not resolved) and ``skipped`` (sorted ``(path, reason)``: image-like files that cannot be decoded,
    dangling links, link loops, folders that cannot be listed)."""

    paths: list[Path]
    skipped: list[tuple[Path, str]]


def scan_images(folder: str | os.PathLike, *, recursive: bool = True) -> ImageScan:
    """Image files under ``folder`` and what was left out, with the reason.

    Listed: files whose extension (any case) is in :func:`supported_image_extensions`. Symbolic links
    to files and to folders are followed (their paths stay under ``folder``). Skipped and reported:
    files with an image-like extension the installed Pillow cannot decode (``.heic`` without
    pillow-heif, camera raw ``.cr2``/``.nef``/``.dng``...), dangling links, links that loop (to a
    folder being scanned, or to themselves), a second link to a folder already scanned, folders
    that cannot be listed, non-regular files with an image extension (broken links are reported
    when their name has an image-like extension or none). Hidden files and folders (names starting
    with '.') and other extensions are left out silently. Raises FileNotFoundError for a missing
    folder.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder does not exist or is not a directory: {root}")
    extensions = supported_image_extensions()
    paths: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    root_status = root.stat()
    scanned: dict[tuple[int, int], Path] = {(root_status.st_dev, root_status.st_ino): root}
    # depth-first, each entry: (folder, identities of the folders above it and itself)
    pending: list[tuple[Path, tuple[tuple[int, int], ...]]] = [
        (root, ((root_status.st_dev, root_status.st_ino),))]
    while pending:
        directory, ancestors = pending.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError as error:
            skipped.append((directory, f"cannot list the folder ({_access_reason(error)})"))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = directory / entry.name
            link = entry.is_symlink()
            try:
                status = os.stat(entry.path)            # follows links
            except OSError as error:
                # a broken link is reported when it could have been an image or a folder
                extension = os.path.splitext(entry.name)[1].lower()
                if not (extension in extensions or extension == "" or _unsupported_reason(extension)):
                    continue
                if isinstance(error, FileNotFoundError):
                    if link:
                        skipped.append((path, f"dangling symbolic link (to {os.readlink(entry.path)})"))
                else:
                    skipped.append((path, _access_reason(error)))
                continue
            if stat.S_ISDIR(status.st_mode):
                if not recursive:
                    continue
                identity = (status.st_dev, status.st_ino)
                if identity in ancestors:
                    skipped.append((path, f"symbolic link loop (leads back to "
                                          f"{scanned.get(identity, directory)})"))
                elif identity in scanned:
                    skipped.append((path, f"the same folder as {scanned[identity]} (already scanned)"))
                else:
                    scanned[identity] = path
                    pending.append((path, ancestors + (identity,)))
                continue
            extension = os.path.splitext(entry.name)[1].lower()
            if extension in extensions:
                if stat.S_ISREG(status.st_mode):
                    paths.append(path)
                else:
                    skipped.append((path, "not a regular file"))
                continue
            reason = _unsupported_reason(extension)
            if reason is not None:
                skipped.append((path, reason))
    return ImageScan(sorted(paths), sorted(skipped))


def list_images(folder: str | os.PathLike, *, recursive: bool = True) -> list[Path]:
    """Sorted image files under ``folder``: :func:`scan_images`'s paths (what it skipped is logged
    as one warning; call :func:`scan_images` to report it). Raises FileNotFoundError for a missing
    folder."""
    paths, skipped = scan_images(folder, recursive=recursive)
    if skipped:
        shown = "; ".join(f"{path}: {reason}" for path, reason in skipped[:_LOGGED_SKIPS])
        more = f" (and {len(skipped) - _LOGGED_SKIPS} more)" if len(skipped) > _LOGGED_SKIPS else ""
        logger.warning("%s: %d file(s) not listed as images: %s%s", folder, len(skipped), shown, more)
    return paths


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3) uint8`` -> ``(3, H, W) float32`` tensor in [0, 1]."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if not image.flags.writeable:
        image = image.copy()
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


def _resize_array(image: np.ndarray, width: int, height: int) -> np.ndarray:
    pil = Image.fromarray(image)
    return np.array(pil.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=2.0))


def resize_max_side(image: np.ndarray, max_size: int, *, upscale: bool = False) -> np.ndarray:
    """Resize an ``(H, W, 3) uint8`` image so its longer side is ``max_size`` (aspect kept).

    Images already smaller are returned unchanged unless ``upscale`` is True.
    """
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    height, width = image.shape[:2]
    longest = max(height, width)
    if longest == max_size or (longest < max_size and not upscale):
        return image
    scale = max_size / longest
    return _resize_array(image, max(1, round(width * scale)), max(1, round(height * scale)))


def resize_short_side(image: np.ndarray, min_size: int) -> np.ndarray:
    """Upscale an ``(H, W, 3) uint8`` image so its shorter side is at least ``min_size`` (aspect kept)."""
    height, width = image.shape[:2]
    shortest = min(height, width)
    if shortest >= min_size:
        return image
    scale = min_size / shortest
    return _resize_array(image, max(min_size, round(width * scale)), max(min_size, round(height * scale)))


def _check_bbox(bbox: object, source: str) -> tuple[float, float, float, float]:
    """``bbox`` as four finite floats with x0 < x1 and y0 < y1, or ValueError saying what is wrong."""
    where = f"{source}: " if source else ""
    try:
        values = [float(v) for v in bbox]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"{where}bbox {bbox!r} must be 4 numbers (x0, y0, x1, y1)") from None
    if len(values) != 4:
        raise ValueError(f"{where}bbox {bbox!r} must be 4 numbers (x0, y0, x1, y1), got {len(values)}")
    bad = [f"{axis}={value}" for axis, value in zip(("x0", "y0", "x1", "y1"), values)
           if not math.isfinite(value)]
    if bad:
        raise ValueError(f"{where}bbox {tuple(values)} has non-finite coordinates ({', '.join(bad)})")
    x0, y0, x1, y1 = values
    inverted = [f"{high} ({b:g}) <= {low} ({a:g})" for low, high, a, b in (("x0", "x1", x0, x1),
                                                                           ("y0", "y1", y0, y1)) if b <= a]
    if inverted:
        raise ValueError(f"{where}bbox {tuple(values)} is inverted or empty: {', '.join(inverted)} "
                         f"(expected x0 < x1 and y0 < y1)")
    return x0, y0, x1, y1


def crop_to_box(image: np.ndarray, bbox: Sequence[float] | None, *, source: str = "") -> np.ndarray:
    """Crop ``(H, W, C)`` to ``bbox = (x0, y0, x1, y1)`` in pixels (revisitop query boxes).

    Coordinates are clipped to the image; fractional values are floored/ceiled outward.
    ``None`` returns the whole image. A box with other than 4 values, a NaN/inf coordinate, an
    inverted box (x1 <= x0 or y1 <= y0) or one outside the image raises ValueError naming the box
    and what is wrong (prefixed by ``source``, e.g. the image path, when given).
    """
    if bbox is None:
        return image
    x0, y0, x1, y1 = _check_bbox(bbox, source)
    height, width = image.shape[:2]
    left, top = max(0, math.floor(x0)), max(0, math.floor(y0))
    right, bottom = min(width, math.ceil(x1)), min(height, math.ceil(y1))
    if right <= left or bottom <= top:
        where = f"{source}: " if source else ""
        raise ValueError(f"{where}bbox {(x0, y0, x1, y1)} lies outside the {width}x{height} image")
    return image[top:bottom, left:right]


def resize_tensor(images: torch.Tensor, scale: float) -> torch.Tensor:
    """Rescale ``(B, 3, H, W)`` images by ``scale`` (bilinear, antialiased when shrinking; sides >= 1)."""
    if images.ndim != 4:
        raise ValueError(f"expected (B, C, H, W) images, got shape {tuple(images.shape)}")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if scale == 1.0:
        return images
    height, width = images.shape[-2:]
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return torch.nn.functional.interpolate(images, size=size, mode="bilinear", align_corners=False,
                                           antialias=scale < 1.0).clamp_(0.0, 1.0)


def image_pyramid(images: torch.Tensor, scales: Sequence[float]) -> list[torch.Tensor]:
    """Multi-scale inputs: ``[resize_tensor(images, s) for s in scales]`` (e.g. scales 0.5..2 for MDA/GLAM)."""
    return [resize_tensor(images, float(s)) for s in scales]
