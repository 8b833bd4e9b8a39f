"""mda.model / mda.extract / mda.visualize on tiny images: shapes, gradients, selection and
coordinates, save/load, PCA-whitening init, the visualisation PNG."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from backbones.networks import BackboneConfig
from mda.config import ExtractionConfig, MdaConfig, load_yaml, save_yaml
from mda.extract import extract_local_features
from mda.model import MdaModel, MultipleDynamicAttention
from mda.visualize import visualize_local_features

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class BrightnessBackbone(nn.Module):
    """Deterministic stand-in backbone: every channel is the cell's mean brightness (stride 8)."""

    out_channels = 8
    stride = 8

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))   # models need one parameter for .device

    def forward(self, images):
        brightness = F.avg_pool2d(images.mean(1, keepdim=True), self.stride, ceil_mode=True)
        return brightness.expand(-1, self.out_channels, -1, -1) + 0 * self.unused


def brightness_model(num_heads=2):
    config = MdaConfig(num_heads=num_heads, descriptor_dim=4, smoothing_kernel=0, indicator_init_std=0.0)
    return MdaModel(config, backbone=BrightnessBackbone())


def image_with_blobs(height, width, blobs):
    """uint8 (H, W, 3) black image; blobs = [(x0, y0, size, value)] bright squares."""
    image = np.zeros((height, width, 3), np.uint8)
    for x0, y0, size, value in blobs:
        image[y0:y0 + size, x0:x0 + size] = value
    return image


@pytest.fixture(scope="module")
def lite0():
    """Default model (EfficientNet-Lite0 stride16, packaged weights), shared by tests."""
    return MdaModel(MdaConfig())


def test_head_shapes_and_initial_feature_strength_attention():
    torch.manual_seed(0)
    config = MdaConfig(num_heads=4, descriptor_dim=16, indicator_init_std=0.0, smoothing_kernel=3)
    head = MultipleDynamicAttention(18, config)          # 18 channels: groups of 4, 2 unused
    features = torch.randn(2, 18, 5, 7)
    attention, local = head(features)
    assert attention.shape == (2, 4, 5, 7) and local.shape == (2, 16, 5, 7)
    assert attention.dtype == torch.float32 and (attention >= 0).all()
    # identity mapping + constant indicator: head i = mean of its rectified channels
    expected = torch.relu(features[:, :16]).reshape(2, 4, 4, 5, 7).mean(2)
    torch.testing.assert_close(attention, expected)
    with pytest.raises(ValueError, match="expected"):
        head(torch.randn(2, 17, 5, 7))


def test_model_forward_shapes_and_gradients_reach_every_part(lite0):
    model = MdaModel(MdaConfig(num_heads=4))
    model.train()
    images = torch.rand(2, 3, 64, 80)
    descriptors, attention = model(images)
    assert descriptors.shape == (2, 4, 128) and attention.shape == (2, 4, 4, 5)
    torch.testing.assert_close(descriptors.norm(dim=-1), torch.ones(2, 4))
    from mda.functional import contrastive_loss, diversity_penalty
    loss = contrastive_loss(descriptors[:1], descriptors[1:], torch.tensor([0]), margin=2.0) \
        + diversity_penalty(attention)
    loss.backward()
    head = model.head
    for name, parameter in [("channel_mapping", head.channel_mapping.weight), ("reduction", head.reduction.weight),
                            ("indicator", head.indicator.weight)]:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    # every head's indicator block receives gradient
    per_head = head.indicator.weight.grad.reshape(4, -1).abs().sum(1)
    assert (per_head > 0).all()
    backbone_grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in backbone_grads)
    # BatchNorm statistics stay frozen in train mode
    assert all(not m.training for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))


def test_local_features_shapes_dtypes(lite0):
    image = (np.random.default_rng(0).random((100, 130, 3)) * 255).astype(np.uint8)
    config = ExtractionConfig(scales=(1.414, 1.0, 0.5), max_size=None, top_n=50)
    features = extract_local_features(lite0, image, config=config)
    assert len(features) == 50
    assert features.descriptors.shape == (50, 128) and features.descriptors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(features.descriptors, axis=1), 1.0, rtol=1e-5)
    assert features.head.dtype == np.int64 and set(features.head) <= {0, 1, 2, 3}
    assert np.all(np.diff(features.attention) <= 0)                        # strongest first
    assert set(np.unique(features.scale)) <= {np.float32(1.414), np.float32(1.0), np.float32(0.5)}
    assert (features.x >= 0).all() and (features.x <= 129).all() and (features.y <= 99).all()
    assert features.image_size == (100, 130)
    assert set(features.timings) == {1.414, 1.0, 0.5, "total"}
    # unique locations: no (scale, x, y) twice
    keys = set(zip(features.scale.tolist(), features.x.tolist(), features.y.tolist()))
    assert len(keys) == len(features)
    # a larger top_n than there are locations returns them all
    everything = extract_local_features(lite0, image, config=ExtractionConfig(scales=(1.0,), max_size=None, top_n=10_000))
    assert len(everything) == 7 * 9


def test_top_n_selects_crafted_blobs_with_exact_coordinates():
    model = brightness_model()
    # cells are 8x8; blobs fill cells (row 1, col 2), (row 4, col 9), (row 6, col 0) with decreasing brightness
    image = image_with_blobs(64, 96, [(16, 8, 8, 255), (72, 32, 8, 200), (0, 48, 8, 150)])
    config = ExtractionConfig(scales=(1.0,), max_size=None, top_n=3)
    features = extract_local_features(model, image, config=config)
    np.testing.assert_allclose(features.x, [20.0, 76.0, 4.0])
    np.testing.assert_allclose(features.y, [12.0, 36.0, 52.0])
    np.testing.assert_allclose(features.attention, [1.0, 200 / 255, 150 / 255], rtol=1e-4)
    np.testing.assert_array_equal(features.scale, [1.0, 1.0, 1.0])
    # border_cells 1: the blob in the edge column (col 0) is not selected, nor any edge cell
    inner = ExtractionConfig(scales=(1.0,), max_size=None, top_n=3, border_cells=1)
    features = extract_local_features(model, image, config=inner)
    np.testing.assert_allclose(features.x[:2], [20.0, 76.0])
    assert features.attention[2] < 150 / 255
    everything = extract_local_features(model, image, config=ExtractionConfig(
        scales=(1.0,), max_size=None, top_n=1000, border_cells=1))
    assert len(everything) == (8 - 2) * (12 - 2)
    assert everything.x.min() == 12.0 and everything.x.max() == 84.0
    assert everything.y.min() == 12.0 and everything.y.max() == 52.0


def test_selected_point_follows_a_moving_blob_in_original_pixels():
    model = brightness_model()
    # the image is 2x the extraction size: coordinates must come back in ORIGINAL pixels
    config = ExtractionConfig(scales=(1.0, 0.5), max_size=96, top_n=1)
    for x0, y0 in [(32, 16), (160, 96), (96, 48)]:
        image = image_with_blobs(128, 192, [(x0, y0, 16, 255)])
        features = extract_local_features(model, image, config=config)
        assert features.image_size == (128, 192)
        assert features.x[0] == pytest.approx(x0 + 8) and features.y[0] == pytest.approx(y0 + 8)
        assert features.scale[0] == 1.0


def test_save_load_round_trip(tmp_path, lite0):
    model = MdaModel(MdaConfig(num_heads=2, attention_activation="softplus"))
    with torch.no_grad():
        model.head.reduction.weight.normal_()
    path = tmp_path / "mda.pt"
    model.save(path)
    loaded = MdaModel.load(path)
    assert loaded.config == model.config
    images = torch.rand(1, 3, 64, 64)
    model.eval(), loaded.eval()
    with torch.no_grad():
        for a, b in zip(model(images), loaded(images)):
            torch.testing.assert_close(a, b)
    assert not list(tmp_path.glob("*.tmp"))
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.pt"):
        MdaModel.load(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError):
        MdaModel.load(tmp_path / "missing.pt")


def test_yaml_round_trip(tmp_path):
    config = MdaConfig(backbone=BackboneConfig(tap="stride32"), num_heads=3)
    extraction = ExtractionConfig(scales=(1.0, 0.5), top_n=10)
    save_yaml(tmp_path / "c.yaml", model=config, extraction=extraction)
    loaded = load_yaml(tmp_path / "c.yaml")
    assert loaded["model"] == config and loaded["extraction"] == extraction
    with pytest.raises(ValueError, match="num_heads"):
        MdaConfig(num_heads=0)


def test_fit_reduction_gives_whitened_outputs():
    model = MdaModel(MdaConfig(num_heads=4, descriptor_dim=32))
    rng = np.random.default_rng(0)
    images = [(rng.random((96, 128, 3)) * 255).astype(np.uint8) for _ in range(4)]
    kwargs = dict(features_per_image=40, scales=(1.0, 0.707), max_size=None)
    used = model.fit_reduction(images, **kwargs)
    samples = model.collect_reduction_samples(images, **kwargs)
    assert used == samples.shape[0] > 32
    assert bool(model.head.reduction_fitted)
    with torch.no_grad():
        out = model.head.reduction(samples[:, :, None, None])[:, :, 0, 0].double()
    np.testing.assert_allclose(out.mean(0).numpy(), 0.0, atol=1e-3)
    covariance = (out.T @ (out - out.mean(0))) / out.shape[0]
    np.testing.assert_allclose(covariance.numpy(), np.eye(32), atol=2e-2)


def test_fit_reduction_pads_when_backbone_has_fewer_channels(lite0):
    model = MdaModel(MdaConfig())                       # Lite0 stride16: 112 channels < 128
    rng = np.random.default_rng(1)
    images = [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    model.fit_reduction(images, features_per_image=300, scales=(1.414, 1.0), max_size=None)
    weight = model.head.reduction.weight[:, :, 0, 0]
    assert weight.shape == (128, 112)
    assert weight[112:].abs().sum() == 0 and (weight[:112].abs().sum(1) > 0).all()
    with pytest.raises(ValueError, match="too few"):
        model.fit_reduction([rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)], features_per_image=5,
                            max_size=None)


def test_visualisation_png_written_with_expected_size(tmp_path):
    model = brightness_model(num_heads=2)
    image = Image.fromarray(image_with_blobs(96, 128, [(32, 16, 16, 255)]))
    out = visualize_local_features(model, image, tmp_path / "viz" / "blob.png",
                                   config=ExtractionConfig(scales=(1.0, 0.5), max_size=None, top_n=20),
                                   panel_size=64)
    with Image.open(out) as picture:
        assert picture.format == "PNG"
        assert picture.size == (3 * 64, 48)              # image panel + one per head, each 64x48
        pixels = np.asarray(picture.convert("RGB"))
    # the head panels are hot (red) over the blob, cold (blue) elsewhere: blob centre (40, 24) * 0.5
    for head_panel in (1, 2):
        hot, cold = pixels[12, 64 * head_panel + 20].astype(int), pixels[40, 64 * head_panel + 56].astype(int)
        assert hot[0] > hot[2] + 50 and cold[2] > cold[0] + 50


def test_bad_inputs_give_clear_errors(tmp_path):
    from imagedata.images import ImageLoadError

    model = brightness_model()
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageLoadError, match="nope.jpg"):
        extract_local_features(model, missing)
    with pytest.raises(TypeError, match="unsupported image type"):
        extract_local_features(model, 42)
    with pytest.raises(ValueError, match="too small"):
        extract_local_features(model, np.zeros((4, 4, 3), np.uint8), config=ExtractionConfig(scales=(0.5,)))
    # fit_reduction skips unloadable files (warning) and uses the rest
    good = [image_with_blobs(64, 64, [(8 * i, 8 * i, 8, 255)]) for i in range(6)]
    assert model.fit_reduction([missing, *good], features_per_image=10, max_size=None) == 60
