"""GlamModel: GeM equivalence with attentions off, switches, gradients, whitening, save/load, extraction."""
from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from backbones.layers import gem, l2n
from backbones.networks import BackboneConfig, build_backbone
from glam.config import ATTENTION_SWITCHES, ExtractionConfig, GlamConfig
from glam.extract import extract_global_descriptor, multiscale_descriptor, prepare_image
from glam.model import GlamModel
from real_data import require_ukbench

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SMALL = dict(local_reduced_channels=16, global_reduced_channels=16, conv1d_kernel_size=3)


@pytest.fixture(scope="module")
def backbone():
    return build_backbone(BackboneConfig(name="efficientnet_lite0", tap="stride32")).eval()


def make_model(backbone, **overrides) -> GlamModel:
    config = GlamConfig(backbone=replace(backbone.config), **{**SMALL, **overrides})
    return GlamModel(config, backbone=backbone).eval()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(0)
    return torch.rand(2, 3, 64, 96)


def test_forward_gives_unit_512d_descriptors(backbone, images):
    model = make_model(backbone)
    with torch.no_grad():
        out = model(images)
    assert out.shape == (2, 512) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


def test_all_attentions_off_is_exactly_gem_fc_l2(backbone, images):
    model = make_model(backbone, **{s: False for s in ATTENTION_SWITCHES})
    assert model.config == GlamConfig(backbone=replace(backbone.config), **SMALL).gem_baseline()
    with torch.no_grad():
        expected = l2n(model.fc(gem(backbone(images), model.pool.p, model.config.gem_eps)))
        assert torch.equal(model(images), expected)


def test_untrained_glam_behaves_like_gem(backbone):
    torch.manual_seed(0)
    glam = make_model(backbone)
    gem_model = GlamModel.gem_baseline_of(glam)
    assert gem_model.backbone is glam.backbone and not gem_model.head.uses_local and not gem_model.head.uses_global
    x = torch.rand(3, 3, 96, 128)
    with torch.no_grad():
        cosine = (glam(x) * gem_model(x)).sum(dim=1)
    assert (cosine > 0.99).all(), cosine


@pytest.mark.parametrize("switch", ATTENTION_SWITCHES)
def test_each_switch_changes_the_descriptor(backbone, images, switch):
    torch.manual_seed(0)
    full = make_model(backbone)
    reduced = make_model(backbone, **{switch: False})
    shared = {k: v for k, v in full.state_dict().items() if k in reduced.state_dict()}
    reduced.load_state_dict(shared)
    with torch.no_grad():
        assert not torch.allclose(full(images), reduced(images), atol=1e-7)


def test_gradients_reach_every_attention_parameter_through_the_model(backbone, images):
    torch.manual_seed(0)
    model = make_model(backbone)
    model.train()
    backbone.train()
    try:
        model(images).sum().backward()
        # a loss on the descriptor's direction, as in training
        loss = (model(images) @ torch.randn(512)).sum()
        model.zero_grad()
        loss.backward()
    finally:
        backbone.eval()
    for name, parameter in model.named_parameters():
        if name.startswith("head.") or name in ("pool.p", "fc.weight"):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    model.zero_grad(set_to_none=True)


def test_save_load_round_trip(backbone, images, tmp_path):
    torch.manual_seed(0)
    model = make_model(backbone, output_dim=32)
    with torch.no_grad():
        model.head.fusion_logits.copy_(torch.tensor([0.5, -0.2, 1.0]))  # not the init values
        model.pool.p.fill_(2.5)
    model.whitening_fitted.fill_(True)
    path = model.save(tmp_path / "sub" / "glam.pt")
    assert sorted(p.name for p in path.parent.iterdir()) == ["glam.pt"]  # no temporary left behind
    loaded = GlamModel.load(path)
    assert loaded.config == model.config and bool(loaded.whitening_fitted)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="glam.pt"):
        GlamModel.load(path)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        GlamModel.load(tmp_path / "missing.pt")


def test_fit_whitening_whitens_real_photos(backbone, tmp_path):
    data = require_ukbench()
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in sorted((data / "jpg").glob("*.jpg"))[:40]:
        shutil.copy(path, folder / path.name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")  # skipped, not fatal
    model = make_model(backbone, output_dim=16, whitening_shrinkage=0.0)
    extraction = ExtractionConfig(scales=(1.0,), max_size=96)
    assert not bool(model.whitening_fitted)
    used = model.fit_whitening(folder, max_images=100, extraction=extraction)
    assert used == 40 and bool(model.whitening_fitted)
    with torch.no_grad():
        pooled = torch.cat([model.pooled(prepare_image(p, extraction)) for p in sorted(folder.glob("ukbench*.jpg"))])
        projected = model.fc(pooled).double()
    centred = projected - projected.mean(dim=0)
    covariance = centred.T @ centred / len(projected)
    assert projected.mean(dim=0).abs().max() < 1e-3
    torch.testing.assert_close(covariance, torch.eye(16, dtype=torch.float64), atol=2e-3, rtol=0)


def test_fit_whitening_with_fewer_images_than_dims_stays_finite(backbone):
    torch.manual_seed(0)
    model = make_model(backbone, output_dim=64)  # default shrinkage, 6 images x 2 scales < 64 dims
    images = [torch.rand(3, 64, 80) for _ in range(6)]
    model.fit_whitening(images, extraction=ExtractionConfig(scales=(1.0, 0.5), max_size=80))
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 80))
    assert torch.isfinite(out).all() and torch.isfinite(model.fc.weight).all()
    with pytest.raises(ValueError, match="no readable image"):
        model.fit_whitening(["/nonexistent/a.jpg"], extraction=ExtractionConfig(max_size=80))


def test_extract_global_descriptor_accepts_every_input_type(backbone):
    data = require_ukbench()
    model = make_model(backbone)
    config = ExtractionConfig(max_size=128)
    path = data / "jpg" / "ukbench00000.jpg"
    from_path = extract_global_descriptor(model, path, config=config)
    assert from_path.shape == (512,) and from_path.dtype == np.float32
    assert abs(float(np.linalg.norm(from_path)) - 1.0) < 1e-5
    pil = Image.open(path)
    array = np.asarray(pil.convert("RGB"))
    for other in (pil, array, torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0):
        descriptor = extract_global_descriptor(model, other, config=config)
        assert float(descriptor @ from_path) > 0.999  # same image, resampling may differ slightly
    with pytest.raises(TypeError, match="unsupported image type"):
        extract_global_descriptor(model, 42, config=config)
    with pytest.raises(ValueError, match="does not exist|not found"):
        extract_global_descriptor(model, data / "jpg" / "missing.jpg", config=config)


def test_multiscale_descriptor_is_the_normalised_mean_of_scales(backbone):
    torch.manual_seed(0)
    model = make_model(backbone)
    image = torch.rand(1, 3, 96, 128)
    scales = (1.0, 0.5)
    with torch.no_grad():
        per_scale = [model(image), model(torch.nn.functional.interpolate(
            image, size=(48, 64), mode="bilinear", align_corners=False, antialias=True))]
    expected = l2n(per_scale[0][0] + per_scale[1][0], dim=0)
    torch.testing.assert_close(multiscale_descriptor(model, image, scales), expected)


def test_mates_are_closer_than_other_objects_on_real_photos(backbone):
    data = require_ukbench()
    model = make_model(backbone)
    paths = sorted((data / "jpg").glob("*.jpg"))[:8]  # two objects, four views each
    model.fit_whitening(paths, extraction=ExtractionConfig(max_size=128))
    descriptors = np.stack([extract_global_descriptor(model, p, config=ExtractionConfig(max_size=128)) for p in paths])
    similarity = descriptors @ descriptors.T
    same = np.equal.outer(np.arange(8) // 4, np.arange(8) // 4) & ~np.eye(8, dtype=bool)
    assert similarity[same].mean() > similarity[~np.equal.outer(np.arange(8) // 4, np.arange(8) // 4)].mean() + 0.1


def test_extract_folder_writes_a_global_feature_file_and_skips_bad_images(backbone, tmp_path):
    from asmk_index.feature_file import FeatureFile
    from glam.extract import extract_folder

    data = require_ukbench()
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in sorted((data / "jpg").glob("*.jpg"))[:3]:
        shutil.copy(path, folder / path.name)
    (folder / "broken.jpg").write_bytes(b"not an image")
    model = make_model(backbone)
    config = ExtractionConfig(max_size=96, scales=(1.0, 0.5))
    report = extract_folder(model, folder, tmp_path / "global.h5", config=config, num_workers=0, progress=False,
                            report_path=tmp_path / "failed.txt")
    assert report.extracted == 3 and len(report.failures) == 1
    assert "broken.jpg" in (tmp_path / "failed.txt").read_text()
    with FeatureFile(tmp_path / "global.h5") as features:
        assert features.kind == "global" and features.dim == 512 and features.names == [
            "ukbench00000", "ukbench00001", "ukbench00002"]
        stored = features.get("ukbench00001")["descriptors"]
        assert features.attributes["extraction"]["scales"] == [1.0, 0.5]
    direct = extract_global_descriptor(model, folder / "ukbench00001.jpg", config=config)
    np.testing.assert_allclose(stored[0], direct, atol=1e-5)
