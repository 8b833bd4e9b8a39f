"""imagedata.images: every awkward image kind loads correctly or fails with a clear ImageLoadError."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagedata.images import (ImageLoadError, ImageLoadLimits, crop_to_box, image_to_tensor, list_images,
                              load_image, resize_max_side)


def _gradient(width: int, height: int) -> np.ndarray:
    """An RGB test picture with distinct left/right and top/bottom content."""
    xs = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    ys = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    r = np.broadcast_to(xs, (height, width))
    g = np.broadcast_to(ys, (height, width))
    b = np.full((height, width), 60.0, np.float32)
    return np.stack([r, g, b], axis=2).astype(np.uint8)


def test_plain_rgb_jpeg_roundtrip(tmp_path: Path):
    path = tmp_path / "plain.jpg"
    Image.fromarray(_gradient(64, 48)).save(path, quality=95)
    image = load_image(path)
    assert image.shape == (48, 64, 3) and image.dtype == np.uint8
    assert np.abs(image.astype(int) - _gradient(64, 48).astype(int)).mean() < 4


def test_exif_orientation_is_applied(tmp_path: Path):
    path = tmp_path / "rotated.jpg"
    pixels = _gradient(80, 40)  # stored landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    image = load_image(path)
    assert image.shape == (80, 40, 3)  # displayed portrait
    expected = np.rot90(pixels, k=-1)  # 90 degrees clockwise
    assert np.abs(image.astype(int) - expected.astype(int)).mean() < 4


def test_grayscale_palette_cmyk(tmp_path: Path):
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((20, 30), 77, np.uint8), mode="L").save(gray)
    image = load_image(gray)
    assert image.shape == (20, 30, 3) and (image == 77).all()

    palette = tmp_path / "palette.gif"
    Image.fromarray(_gradient(32, 32)).convert("P").save(palette)
    assert load_image(palette).shape == (32, 32, 3)

    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (24, 20), (0, 255, 255, 0)).save(cmyk, quality=95)  # pure red in CMYK
    red = load_image(cmyk)
    assert red.shape == (20, 24, 3)
    assert red[..., 0].mean() > 200 and red[..., 1].mean() < 60 and red[..., 2].mean() < 60


def test_alpha_is_composited_on_white(tmp_path: Path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 255  # red
    rgba[:, :8, 3] = 0  # left half transparent
    rgba[:, 8:, 3] = 255
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    image = load_image(path)
    assert (image[:, :8] == 255).all()  # white where transparent
    assert (image[:, 8:] == [255, 0, 0]).all()

    la = tmp_path / "la.png"
    Image.fromarray(np.stack([np.full((16, 16), 0, np.uint8), np.full((16, 16), 0, np.uint8)], 2), mode="LA").save(la)
    assert (load_image(la) == 255).all()  # fully transparent black -> white


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path):
    values = np.array([[0, 32768, 65535, 1000]], np.uint16).repeat(16, 0).repeat(4, 1)  # (16, 16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as opened:
        assert opened.mode.startswith("I")
    image = load_image(path)
    assert image.shape == (16, 16, 3)
    row = image[0, ::4, 0]
    assert row.tolist() == [0, 128, 255, 4]  # 65535 -> 255, 32768 -> 128, 1000 -> 4 (not saturated)


def test_very_large_jpeg_is_draft_decoded_and_downscaled(tmp_path: Path):
    path = tmp_path / "huge.jpg"
    Image.new("RGB", (12000, 9000), (10, 200, 30)).save(path, quality=50)
    image = load_image(path, max_size=1024)
    assert max(image.shape[:2]) == 1024 and image.shape[:2] == (768, 1024)
    assert np.abs(image.mean(axis=(0, 1)) - [10, 200, 30]).max() < 6


def test_decompression_bomb_limit_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "bomb.png"
    Image.new("L", (4000, 3000)).save(path)
    with pytest.raises(ImageLoadError, match="over the limit"):
        load_image(path, limits=ImageLoadLimits(max_pixels=1_000_000))


def test_tiny_image_is_upscaled(tmp_path: Path):
    path = tmp_path / "tiny.png"
    Image.fromarray(np.full((3, 3, 3), 200, np.uint8)).save(path)
    image = load_image(path, min_size=16)
    assert image.shape == (16, 16, 3) and (image == 200).all()
    wide = tmp_path / "wide.png"
    Image.fromarray(np.full((2, 10, 3), 9, np.uint8)).save(wide)
    assert load_image(wide, min_size=16).shape == (16, 80, 3)


@pytest.mark.parametrize("kind", ["truncated", "text", "empty", "missing", "garbage_png"])
def test_broken_files_raise_image_load_error(tmp_path: Path, kind: str, monkeypatch):
    path = tmp_path / f"{kind}.jpg"
    if kind == "truncated":
        from PIL import ImageFile

        monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # other code switched it on: still refused
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(
            buffer, format="JPEG", quality=90)
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    elif kind == "text":
        path.write_text("this is not an image\n" * 10)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage_png":
        path = tmp_path / "garbage.png"
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert str(path) in str(info.value)
    expected = {"truncated": "truncated", "text": "not a recognised image", "empty": "empty",
                "missing": "does not exist", "garbage_png": "image"}[kind]
    assert expected in str(info.value)


def test_list_images_sorted_case_insensitive(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    for name in ["b.JPG", "a.png", "sub/c.jpeg", "notes.txt", ".hidden.jpg", "d.WebP"]:
        (tmp_path / name).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == ["a.png", "b.JPG", "d.WebP",
                                                                                  "sub/c.jpeg"]
    assert len(list_images(tmp_path, recursive=False)) == 3
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "nope")


def test_tensor_resize_crop_helpers():
    image = _gradient(40, 20)
    tensor = image_to_tensor(image)
    assert tensor.shape == (3, 20, 40) and tensor.dtype == torch.float32
    assert float(tensor.max()) <= 1.0 and torch.allclose(tensor[0, 0, -1], torch.tensor(1.0))
    assert resize_max_side(image, 10).shape == (5, 10, 3)
    assert resize_max_side(image, 100).shape == (20, 40, 3)  # no upscaling by default
    assert resize_max_side(image, 80, upscale=True).shape == (40, 80, 3)
    crop = crop_to_box(image, (10.5, 2, 20, 12.2))
    assert crop.shape == (11, 10, 3) and (crop == image[2:13, 10:20]).all()
    assert crop_to_box(image, None) is image
    with pytest.raises(ValueError):
        crop_to_box(image, (50, 0, 60, 10))


def test_image_pyramid():
    from imagedata.images import image_pyramid, resize_tensor

    images = torch.rand(2, 3, 40, 60)
    levels = image_pyramid(images, (0.5, 1.0, 1 / 1.414))
    assert [tuple(level.shape[-2:]) for level in levels] == [(20, 30), (40, 60), (28, 42)]
    assert levels[1] is images and float(levels[0].max()) <= 1.0
    constant = torch.full((1, 3, 9, 9), 0.25)
    assert torch.allclose(resize_tensor(constant, 2.0), torch.full((1, 3, 18, 18), 0.25))
    with pytest.raises(ValueError):
        resize_tensor(images[0], 0.5)


# ---------------------------------------------------------------- scanning folders -------
def _write_png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_gradient(20, 16)).save(path)
    return path


def test_scan_follows_links_and_reports_what_it_skips(tmp_path: Path):
    from imagedata.images import scan_images

    root, outside = tmp_path / "photos", tmp_path / "elsewhere"
    _write_png(root / "a.png")
    _write_png(outside / "album" / "b.png")
    _write_png(outside / "single.png")
    (root / "album").symlink_to(outside / "album", target_is_directory=True)  # linked folder
    (root / "linked.png").symlink_to(outside / "single.png")                   # linked file
    (root / "album2").symlink_to(outside / "album", target_is_directory=True)  # the same again
    (root / "sub").mkdir()
    (root / "sub" / "up").symlink_to(root, target_is_directory=True)           # a loop
    (root / "self.jpg").symlink_to(root / "self.jpg")                          # a link to itself
    (root / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")                   # dangling
    (root / "gone.txt").symlink_to(tmp_path / "deleted.txt")                   # not image-like
    for name in ["IMG_0001.HEIC", "shot.heif", "raw.CR2", "raw.nef", "raw.dng", "art.jxl",
                 "notes.txt", ".hidden.png"]:
        (root / name).write_bytes(b"x")

    paths, skipped = scan_images(root)
    assert [p.relative_to(root).as_posix() for p in paths] == ["a.png", "album/b.png", "linked.png"]
    assert all(str(p).startswith(str(root)) for p in paths)          # links are not resolved
    reasons = {p.relative_to(root).as_posix(): reason for p, reason in skipped}
    assert sorted(reasons) == ["IMG_0001.HEIC", "album2", "art.jxl", "gone.jpg", "raw.CR2",
                               "raw.dng", "raw.nef", "self.jpg", "shot.heif", "sub/up"]
    assert "unsupported image format (.heic" in reasons["IMG_0001.HEIC"]
    assert "pillow-heif" in reasons["IMG_0001.HEIC"]
    assert "camera raw" in reasons["raw.CR2"] and "camera raw" in reasons["raw.dng"]
    assert reasons["sub/up"].startswith("symbolic link loop")
    assert reasons["self.jpg"] == "symbolic link loop"
    assert reasons["gone.jpg"].startswith("dangling symbolic link")
    assert "already scanned" in reasons["album2"]
    from imagedata.images import list_images

    assert list_images(root) == paths                               # the same list, still working
    assert [p.name for p in scan_images(root, recursive=False).paths] == ["a.png", "linked.png"]


def test_scan_lists_the_formats_this_pillow_decodes(tmp_path: Path):
    """AVIF and JPEG 2000 are listed when the installed Pillow decodes them (and load), else
    reported as unsupported."""
    from PIL import features

    from imagedata.images import scan_images, supported_image_extensions

    for extension, feature in [(".avif", "avif"), (".jp2", "jpg_2000")]:
        if features.check(feature):
            Image.fromarray(_gradient(24, 16)).save(tmp_path / f"photo{extension}")
        else:
            (tmp_path / f"photo{extension}").write_bytes(b"x")
    paths, skipped = scan_images(tmp_path)
    listed = {p.suffix for p in paths}
    assert listed | {p.suffix for p, _ in skipped} == {".avif", ".jp2"}
    assert (".avif" in listed) == features.check("avif") == (".avif" in supported_image_extensions())
    assert (".jp2" in listed) == features.check("jpg_2000")
    for path in paths:
        assert load_image(path).shape == (16, 24, 3)


# ---------------------------------------------------------------- clear reasons -------
@pytest.mark.parametrize("bbox, expected", [
    ((float("nan"), 0, 10, 10), "non-finite coordinates (x0=nan)"),
    ((0, 0, float("inf"), 10), "non-finite coordinates (x1=inf)"),
    ((0, 0, 10), "must be 4 numbers (x0, y0, x1, y1), got 3"),
    ((0, 0, "ten", 10), "must be 4 numbers"),
    ((10, 0, 5, 10), "inverted or empty: x1 (5) <= x0 (10)"),
    ((0, 8, 10, 8), "inverted or empty: y1 (8) <= y0 (8)"),
    ((50, 0, 60, 10), "lies outside the 40x20 image"),
])
def test_crop_to_box_says_which_box_and_what_is_wrong(bbox, expected):
    with pytest.raises(ValueError) as error:
        crop_to_box(_gradient(40, 20), bbox, source="query.jpg")
    message = str(error.value)
    assert expected in message and message.startswith("query.jpg: bbox ")
    assert "cannot convert" not in message


def test_unreadable_file_is_not_called_corrupt(tmp_path: Path, monkeypatch):
    """Tests run as root (chmod 000 does not stop root), so the refusal is simulated at open()."""
    import builtins

    path = tmp_path / "locked.jpg"
    Image.fromarray(_gradient(32, 32)).save(path)
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    with pytest.raises(ImageLoadError) as error:
        load_image(path)
    assert "permission denied" in str(error.value) and "corrupt" not in str(error.value)
    monkeypatch.setattr(builtins, "open", real_open)
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(tmp_path)                                   # a directory
    loop = tmp_path / "loop.jpg"
    loop.symlink_to(loop)
    with pytest.raises(ImageLoadError, match="symbolic link loop"):
        load_image(loop)
