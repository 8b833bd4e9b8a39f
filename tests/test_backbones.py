"""backbones: shapes/strides per tap, packaged + checkpoint weights, freezing, GeM/L2N/PCA-whitening."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from backbones import (TAP_CHANNELS, BackboneConfig, GeM, L2N, build_backbone, gem, init_linear_from_pca, l2n,
                       learn_pca_whitening, packaged_weights_path)
from backbones.networks import _load_checkpoint_state_dict
from real_data import require_ukbench


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
@pytest.mark.parametrize("tap", ["stride16", "stride32"])
def test_efficientnet_lite_shapes(name: str, tap: str):
    backbone = build_backbone(name=name, tap=tap).eval()
    height, width = 45, 71  # odd sizes: dynamic SAME padding must give ceil(H / stride)
    with torch.no_grad():
        features = backbone(torch.rand(2, 3, height, width))
    stride = 16 if tap == "stride16" else 32
    assert backbone.stride == stride and backbone.out_channels == TAP_CHANNELS[(name, tap)]
    assert features.shape == (2, backbone.out_channels, math.ceil(height / stride), math.ceil(width / stride))
    assert backbone.output_size(height, width) == tuple(features.shape[-2:])


def test_packaged_weights_are_loaded_not_random():
    backbone = build_backbone()  # default: efficientnet_lite0, stride16, packaged weights
    shipped = torch.load(packaged_weights_path("efficientnet_lite0"), map_location="cpu", weights_only=True)
    assert torch.equal(backbone.stem[0].weight, shipped["_conv_stem.weight"])
    assert torch.equal(backbone.blocks[-1][-1]._project_conv.weight, shipped["_blocks.10._project_conv.weight"])
    random_backbone = build_backbone(weights="random")
    assert not torch.equal(random_backbone.stem[0].weight, shipped["_conv_stem.weight"])


def test_packaged_weights_give_retrieval_features_on_real_photos():
    """Two views of one UKBench object are closer than different objects with ImageNet weights only."""
    root = require_ukbench()
    from imagedata.images import image_to_tensor, load_image
    from imagedata.revisitop import ukbench_ns_score

    images = [image_to_tensor(load_image(root / "jpg" / f"ukbench{i:05d}.jpg", max_size=128)) for i in range(16)]

    def ns_score(backbone):
        with torch.no_grad():
            descriptors = torch.cat([l2n(gem(backbone(x[None]))) for x in images])
        ranks = (descriptors @ descriptors.T).argsort(dim=1, descending=True).numpy()
        return ukbench_ns_score(ranks)

    assert ns_score(build_backbone().eval()) >= 3.5  # measured 3.94 (random init varies 2.6-3.8)


def test_packaged_weights_and_normalisation_classify_a_real_photo():
    """ImageNet sanity: Lite0 + its shipped classifier recognises sklearn's temple photo (china.jpg)."""
    from sklearn.datasets import load_sample_image

    from imagedata.images import image_to_tensor, resize_max_side

    photo = image_to_tensor(resize_max_side(load_sample_image("china.jpg"), 224))[None]
    shipped = torch.load(packaged_weights_path("efficientnet_lite0"), map_location="cpu", weights_only=True)

    def class_probabilities(backbone):
        with torch.no_grad():
            pooled = backbone.eval()(photo).mean(dim=(2, 3))
            return torch.softmax(torch.nn.functional.linear(pooled, shipped["_fc.weight"], shipped["_fc.bias"]), 1)[0]

    probabilities = class_probabilities(build_backbone(tap="stride32"))
    building_classes = {442, 538, 668, 698, 832}  # bell cote, dome, mosque, palace, stupa
    assert int(probabilities.argmax()) in building_classes and float(probabilities.max()) > 0.25
    torch.manual_seed(0)
    assert float(class_probabilities(build_backbone(tap="stride32", weights="random")).max()) < 0.05


def test_resnet_from_checkpoint_file(tmp_path: Path):
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in reference.state_dict().items()}, "epoch": 3}, wrapped)
    backbone = build_backbone(name="resnet50", tap="stride16", weights=wrapped).eval()
    assert backbone.out_channels == 1024 and backbone.stride == 16
    assert torch.equal(backbone.layers[2][0].conv1.weight, reference.layer3[0].conv1.weight)
    x = torch.rand(1, 3, 48, 80)
    with torch.no_grad():
        features = backbone(x)
        normalized = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
            [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        expected = reference.eval()
        y = expected.maxpool(expected.relu(expected.bn1(expected.conv1(normalized))))
        y = expected.layer3(expected.layer2(expected.layer1(y)))
    assert features.shape == (1, 1024, 3, 5) and torch.allclose(features, y, atol=1e-5)

    deep = build_backbone(name="resnet50", tap="stride32", weights=wrapped)
    assert deep.out_channels == 2048 and torch.equal(deep.layers[3][0].conv2.weight, reference.layer4[0].conv2.weight)


def test_resnet_weight_errors(tmp_path: Path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_backbone(name="resnet50", weights=missing)
    with pytest.raises(ValueError, match="weights=PATH"):
        build_backbone(name="resnet101")
    plain = tmp_path / "plain.pth"  # a bare state_dict / {'model': ...} are read too
    torch.save({"a.weight": torch.ones(2)}, plain)
    assert _load_checkpoint_state_dict(plain)["a.weight"].tolist() == [1.0, 1.0]
    torch.save({"model": {"module.a.weight": torch.ones(2)}}, plain)
    assert list(_load_checkpoint_state_dict(plain)) == ["a.weight"]
    wrong = tmp_path / "wrong.pth"
    torch.save({"foo.weight": torch.zeros(3), "conv1.weight": torch.zeros(64, 3, 7, 7)}, wrong)
    with pytest.raises(ValueError, match="missing keys") as info:
        build_backbone(name="resnet50", weights=wrong)
    assert "foo.weight" in str(info.value)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone(name="vgg16")
    with pytest.raises(ValueError, match="unknown tap"):
        build_backbone(tap="stride8")


def test_train_layers_and_freeze_bn():
    backbone = build_backbone(BackboneConfig(train_layers=1, freeze_bn=True))
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("blocks.4.") for n in trainable)  # last stride-16 stage only
    assert not any("_bn" in n for n in trainable)  # BN affine frozen
    backbone.train()
    batch_norms = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert not any(m.training for m in batch_norms)
    frozen = build_backbone(name="resnet50", weights="random", train_layers=0)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in build_backbone(weights="random").parameters())


# ---------------------------------------------------------------- layers -------------------------
def test_gem_matches_definition_and_limits():
    x = torch.rand(2, 5, 4, 3) + 0.1
    assert torch.allclose(gem(x, p=1.0), x.mean(dim=(2, 3)), atol=1e-6)
    assert torch.allclose(gem(x, p=3.0), x.pow(3).mean(dim=(2, 3)).pow(1 / 3), atol=1e-6)
    assert torch.allclose(gem(x, p=60.0), x.amax(dim=(2, 3)), rtol=0.05)
    module = GeM(p=3.0)
    assert isinstance(module.p, nn.Parameter) and module(x).shape == (2, 5)
    module(x).sum().backward()
    assert module.p.grad is not None
    assert not isinstance(GeM(learn_p=False).p, nn.Parameter)
    with pytest.raises(ValueError):
        gem(torch.rand(2, 5))


def test_l2n():
    x = torch.randn(3, 7, 2, 2)
    assert torch.allclose(l2n(x).norm(dim=1), torch.ones(3, 2, 2), atol=1e-5)
    assert torch.allclose(L2N(dim=-1)(x).norm(dim=-1), torch.ones(3, 7, 2), atol=1e-5)
    assert torch.equal(l2n(torch.zeros(2, 4)), torch.zeros(2, 4))


def test_pca_whitening_gives_identity_covariance():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(6, 6))
    features = rng.normal(size=(2000, 6)) * np.array([5, 3, 2, 1, 0.5, 0.1]) @ mixing + 4.0
    weight, bias = learn_pca_whitening(features, out_dim=4)
    assert weight.shape == (4, 6) and bias.shape == (4,)
    projected = torch.as_tensor(features, dtype=torch.float32) @ weight.T + bias
    assert torch.allclose(projected.mean(0), torch.zeros(4), atol=1e-3)
    covariance = np.cov(projected.numpy().T, bias=True)
    assert np.allclose(covariance, np.eye(4), atol=1e-3)
    # PCA only: orthonormal rows, variances sorted descending
    rotation, _ = learn_pca_whitening(torch.as_tensor(features), whiten=False)
    assert torch.allclose(rotation @ rotation.T, torch.eye(6), atol=1e-4)
    variances = (torch.as_tensor(features, dtype=torch.float32) @ rotation.T).var(0)
    assert (variances[:-1] >= variances[1:]).all()

    linear = nn.Linear(6, 4)
    init_linear_from_pca(linear, weight, bias)
    assert torch.allclose(linear(torch.as_tensor(features[:5], dtype=torch.float32)), projected[:5], atol=1e-4)
    conv = nn.Conv2d(6, 4, kernel_size=1)
    init_linear_from_pca(conv, weight, bias)
    maps = torch.as_tensor(features[:6], dtype=torch.float32).T.reshape(1, 6, 2, 3)
    assert torch.allclose(conv(maps).reshape(4, 6).T, projected[:6], atol=1e-4)
    with pytest.raises(ValueError):
        init_linear_from_pca(nn.Linear(6, 3), weight, bias)
    with pytest.raises(ValueError):
        learn_pca_whitening(features, out_dim=7)


def test_backbone_own_state_dict_round_trip(tmp_path: Path):
    """A fine-tuned Backbone saved with its own state_dict() loads back through weights=PATH."""
    torch.manual_seed(1)
    tuned = build_backbone(weights="random")
    path = tmp_path / "tuned.pth"
    torch.save({"model": tuned.state_dict()}, path)
    loaded = build_backbone(weights=path)
    for (name, a), (_, b) in zip(tuned.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="missing keys"):  # a stride16 backbone lacks the stride32 stages
        build_backbone(tap="stride32", weights=path)
