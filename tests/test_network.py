"""The one-backbone retrieval model: one forward gives both heads' outputs; its features equal the
two-pass path's (MDA model + GLAM model with the same weights); the model file (hash, weights
only, corruption refused); batches, channels-last and mixed precision; device errors."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from backbones.networks import build_backbone
from glam.config import ExtractionConfig as GlobalExtraction
from glam.extract import extract_global_descriptor
from glam.model import GlamModel
from imagedata.extraction import resolve_device
from imagedata.images import image_to_tensor, load_image
from mda.config import ExtractionConfig as LocalExtraction
from mda.extract import extract_local_features
from mda.model import MdaModel
from real_data import require_ukbench
from retrieval.config import ExtractionConfig
from retrieval.extraction import extract_batch, extract_image, mixed_precision_dtype, prepare_network
from retrieval.network import NetworkConfig, RetrievalNet, model_hash

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = NetworkConfig.from_dict({"glam": {"local_reduced_channels": 32, "global_reduced_channels": 32}})
SETTINGS = ExtractionConfig(max_size=160, scales=(1.414, 1.0, 0.7071), top_n=150, device="cpu")


@pytest.fixture(scope="module")
def photos():
    folder = require_ukbench() / "jpg"
    return [load_image(folder / f"ukbench{n:05d}.jpg", max_size=SETTINGS.max_size) for n in (0, 1, 4, 9)]


@pytest.fixture(scope="module")
def net(photos):
    torch.manual_seed(0)
    model = RetrievalNet(SMALL)
    model.fit_to_images((image_to_tensor(p).unsqueeze(0) for p in photos), scales=SETTINGS.scales,
                        features_per_image=100)
    return prepare_network(model, SETTINGS)


def two_pass_models(net: RetrievalNet):
    """MDA and GLAM models alone with the same weights: two backbone copies, as before."""
    def backbone(config):
        copy = build_backbone(config, weights="random")
        own = copy.state_dict()
        copy.load_state_dict({k: v for k, v in net.backbone.state_dict().items() if k in own})
        return copy
    mda = MdaModel(net.config.mda, backbone=backbone(net.config.mda.backbone))
    mda.head.load_state_dict(net.local_head.state_dict())
    glam = GlamModel(net.config.glam, backbone=backbone(net.config.glam.backbone))
    glam.descriptor_head.load_state_dict(net.global_head.state_dict())
    return mda.eval(), glam.eval()


def test_one_forward_gives_both_heads_outputs(net):
    images = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        output = net(images)
    assert output.attention.shape == (2, 4, 6, 8) and (output.attention >= 0).all()
    assert output.local.shape == (2, 128, 6, 8)
    assert output.pooled.shape == (2, 1280) and output.global_descriptor.shape == (2, 512)
    torch.testing.assert_close(output.global_descriptor.norm(dim=1), torch.ones(2))
    assert output.head_descriptors().shape == (2, 4, 128)
    assert net.is_fitted and net.local_stride == 16


def test_resnet_carries_both_heads_on_layer3_and_layer4():
    config = NetworkConfig.from_dict({"backbone": {"name": "resnet50", "weights": "random"},
                                      "glam": {"local_reduced_channels": 16, "global_reduced_channels": 16}})
    model = RetrievalNet(config).eval()
    assert model.local_head.in_channels == 1024 and model.global_head.fc.in_features == 2048
    with torch.no_grad():
        output = model(torch.rand(1, 3, 64, 64))
    assert output.local.shape[-2:] == (4, 4) and output.global_descriptor.shape == (1, 512)


def test_one_pass_features_equal_the_two_pass_path(net, photos):
    mda, glam = two_pass_models(net.to(memory_format=torch.contiguous_format))
    contiguous = ExtractionConfig(**{**SETTINGS.__dict__, "channels_last": False})
    local_config = LocalExtraction(scales=SETTINGS.scales, max_size=SETTINGS.max_size, top_n=SETTINGS.top_n,
                                   border_cells=SETTINGS.border_cells)
    global_config = GlobalExtraction(scales=SETTINGS.scales, max_size=SETTINGS.max_size)
    for photo in photos:
        one = extract_image(net, photo, contiguous)
        local = extract_local_features(mda, photo, config=local_config)
        assert np.array_equal(one.local.x, local.x) and np.array_equal(one.local.scale, local.scale)
        np.testing.assert_allclose(one.local.descriptors, local.descriptors, atol=1e-5)
        np.testing.assert_allclose(one.global_descriptor, extract_global_descriptor(glam, photo, config=global_config),
                                   atol=1e-5)
    # channels-last computes the same features up to float rounding
    net.to(memory_format=torch.channels_last)
    for photo in photos[:2]:
        fast, plain = extract_image(net, photo, SETTINGS), extract_image(net, photo, contiguous)
        np.testing.assert_allclose(fast.global_descriptor, plain.global_descriptor, atol=1e-4)
        assert np.mean(fast.local.x == plain.local.x) > 0.95


def test_a_batch_of_equal_size_images_gives_each_images_features(net, photos):
    batch = torch.stack([image_to_tensor(photo) for photo in photos[:3]])
    together = extract_batch(net, batch, SETTINGS)
    for photo, features in zip(photos[:3], together):
        alone = extract_image(net, photo, SETTINGS)
        np.testing.assert_allclose(features.global_descriptor, alone.global_descriptor, atol=1e-5)
        np.testing.assert_allclose(features.local.descriptors, alone.local.descriptors, atol=1e-4)
    with pytest.raises(ValueError, match="too small"):
        extract_batch(net, torch.rand(1, 3, 8, 8), ExtractionConfig(scales=(1.0,)))


def test_mixed_precision_features_stay_close_to_float32(net, photos):
    if mixed_precision_dtype(torch.device("cpu")) is None:
        pytest.skip("this CPU has no native bfloat16: mixed precision runs in float32 here")
    mixed = ExtractionConfig(**{**SETTINGS.__dict__, "precision": "mixed"})
    for photo in photos:
        exact, approximate = extract_image(net, photo, SETTINGS), extract_image(net, photo, mixed)
        assert float(exact.global_descriptor @ approximate.global_descriptor) > 0.99
        assert approximate.local.descriptors.dtype == np.float32


def test_model_file_round_trip_hash_and_weights_only(net, tmp_path):
    path = tmp_path / "model.pt"
    digest = net.save(path)
    assert digest == net.model_hash() == model_hash(net.config.to_dict(), net.state_dict())
    loaded = RetrievalNet.load(path)
    assert loaded.loaded_hash == digest == loaded.model_hash() and loaded.config == net.config
    for name, tensor in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.cpu()), name
    # training-only switches and the weights' source do not change what the model computes
    other = NetworkConfig.from_dict({**net.config.to_dict(),
                                     "backbone": {**net.config.backbone.to_dict(), "train_layers": 2}})
    assert model_hash(other.to_dict(), net.state_dict()) == digest
    with torch.no_grad():
        loaded.local_head.reduction.bias.add_(1e-3)
    assert loaded.model_hash() != digest


def test_damaged_foreign_or_code_carrying_model_files_are_refused(net, tmp_path):
    path = tmp_path / "model.pt"
    net.save(path)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["global_head.fc.bias"][0] += 1.0          # a changed weight
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(ValueError, match="edited.pt: corrupt model file"):
        RetrievalNet.load(tmp_path / "edited.pt")
    torch.save({"format": "something-else"}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a retrieval model file"):
        RetrievalNet.load(tmp_path / "foreign.pt")
    (tmp_path / "text.pt").write_text("not a model")
    with pytest.raises(ValueError, match="text.pt: not a readable model file"):
        RetrievalNet.load(tmp_path / "text.pt")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    torch.save({"format": "retrieval-model", "version": 1, "config": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt: not a readable model file"):
        RetrievalNet.load(tmp_path / "evil.pt")
    assert not marker.exists()  # weights_only: no code ran
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        RetrievalNet.load(tmp_path / "missing.pt")


def test_asking_for_a_gpu_that_is_not_there_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve_device("auto").type == "cpu" and resolve_device(None).type == "cpu"
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
            resolve_device(name)
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu")
    from pipelines import build_codebook
    with pytest.raises(SystemExit) as exit_info:
        build_codebook.parse_arguments(["--images", "x", "--out", "y", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "torch sees no CUDA GPU" in capsys.readouterr().err


def test_a_model_fitted_twice_to_the_same_photos_is_the_same(photos):
    # the heads' random initial weights come from the seed, not from the global random state
    from retrieval.config import SystemConfig
    from retrieval.models import new_fitted_network

    config = SystemConfig().updated({"network": SMALL.to_dict(), "extraction": {"max_size": SETTINGS.max_size}})
    torch.manual_seed(1)
    first = new_fitted_network(config, photos[:2])
    after_first = torch.rand(3)
    torch.manual_seed(2)
    second = new_fitted_network(config, photos[:2])
    other_seed = new_fitted_network(config, photos[:2], seed=5)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), after_first)          # the global random state is left alone
    assert first.model_hash() == second.model_hash() != other_seed.model_hash()
