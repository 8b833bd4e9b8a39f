"""GLAM losses (ArcFace margin, contrastive, two-view) and a tiny real training run with resume."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from backbones.networks import BackboneConfig
from glam.config import GlamConfig, TrainConfig
from glam.losses import ArcFaceLoss, arcface_logits, contrastive_loss, two_view_contrastive_loss
from glam.model import GlamModel
from glam.train import CHECKPOINT_NAME, GlamTrainer, build_training_data, configs_from_args, _parser, train
from imagedata.datasets import LabelledImageList
from imagedata.training import load_checkpoint
from real_data import require_ukbench

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_arcface_reduces_only_the_correct_class_logit_by_the_angular_margin():
    torch.manual_seed(0)
    embeddings, centres = torch.randn(5, 8), torch.randn(3, 8)
    labels = torch.tensor([0, 1, 2, 1, 0])
    scale, margin = 30.0, 0.2
    logits = arcface_logits(embeddings, centres, labels, scale, margin)
    cosine = torch.nn.functional.normalize(embeddings, dim=1) @ torch.nn.functional.normalize(centres, dim=1).T
    target = torch.zeros_like(cosine, dtype=torch.bool).scatter(1, labels[:, None], True)
    torch.testing.assert_close(logits[~target], scale * cosine[~target])  # other classes untouched
    theta = torch.arccos(cosine[target].clamp(-1, 1))
    expected = torch.where(theta < math.pi - margin, torch.cos(theta + margin),
                           cosine[target] - math.sin(math.pi - margin) * margin)
    torch.testing.assert_close(logits[target], scale * expected, atol=1e-4, rtol=1e-4)
    assert (logits[target] < scale * cosine[target]).all()  # the margin makes the true class harder
    torch.testing.assert_close(arcface_logits(embeddings, centres, labels, scale, 0.0), scale * cosine)
    loss = ArcFaceLoss(8, 3, scale, margin)
    with torch.no_grad():
        loss.class_weights.copy_(centres)
    no_margin = torch.nn.functional.cross_entropy(scale * cosine, labels)
    assert loss(embeddings, labels) > no_margin
    with pytest.raises(ValueError, match="labels must lie"):
        loss(embeddings, torch.tensor([0, 1, 2, 3, 0]))


def test_contrastive_loss_by_hand():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.6, 0.8]])  # distances sqrt2, sqrt2, sqrt(0.8)
    labels = torch.tensor([1, 0, 0])
    expected = 0.5 * (2.0 + 0.0 + 0.0) / 3  # positive: d^2 = 2; negatives beyond the margin cost nothing
    torch.testing.assert_close(contrastive_loss(a, b, labels, margin=0.7), torch.tensor(expected))
    expected_margin_1 = 0.5 * (2.0 + 0.0 + (1.0 - math.sqrt(0.8)) ** 2) / 3
    torch.testing.assert_close(contrastive_loss(a, b, labels, margin=1.0), torch.tensor(expected_margin_1))


def test_two_view_loss_uses_the_hardest_in_batch_negative():
    # images 0 and 1 close together, image 2 far: views identical -> only 0<->1 negatives cost
    base = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1, 0.0], [1.0, -0.1, 0.0], [0.0, 0.0, 1.0]]), dim=1)
    loss = two_view_contrastive_loss(base, base.clone(), margin=0.7)
    d01 = float((base[0] - base[1]).norm())
    d2 = float((base[2] - base[0]).norm())  # nearest other image of image 2
    expected = 0.5 * (4 * max(0.0, 0.7 - d01) ** 2 + 2 * max(0.0, 0.7 - d2) ** 2) / 9
    torch.testing.assert_close(loss, torch.tensor(expected))
    with pytest.raises(ValueError, match="B >= 2"):
        two_view_contrastive_loss(base[:1], base[:1])


def tiny_configs(mode: str, epochs: int = 1) -> tuple[GlamConfig, TrainConfig]:
    model_config = GlamConfig(backbone=BackboneConfig(name="efficientnet_lite0", tap="stride32", freeze_bn=True),
                              local_reduced_channels=16, global_reduced_channels=16, output_dim=32)
    train_config = TrainConfig(mode=mode, epochs=epochs, batch_size=4, image_size=64, lr=1e-3, num_workers=0,
                               whitening_images=8, log_every=1, amp=False)
    return model_config, train_config


@pytest.fixture()
def eight_photos(tmp_path) -> LabelledImageList:
    data = require_ukbench()
    paths = sorted((data / "jpg").glob("*.jpg"))[:8]  # two objects x four views
    return LabelledImageList(paths, np.arange(8) // 4)


def test_arcface_training_runs_checkpoints_and_resumes(eight_photos, tmp_path):
    model_config, train_config = tiny_configs("arcface", epochs=1)
    data = build_training_data("arcface", eight_photos, train_config)
    assert data.num_classes == 2
    out = tmp_path / "run"
    trainer = GlamTrainer(model_config, train_config, data, out, progress=False)
    initial_logits = trainer.model.head.fusion_logits.detach().clone()
    path = trainer.fit()
    state, checkpoint = load_checkpoint(out / CHECKPOINT_NAME, restore_rng=False)
    assert (state.epoch, state.step) == (1, 2) and math.isfinite(state.extra["last_loss"])
    assert checkpoint["config"]["train"]["mode"] == "arcface"
    trained = GlamModel.load(path)
    assert bool(trained.whitening_fitted)  # FC initialised from the training images
    assert not torch.equal(trained.head.fusion_logits, initial_logits)  # the head was trained
    # resume: a second run with more epochs continues from the checkpoint
    model_config, train_config = tiny_configs("arcface", epochs=2)
    resumed = GlamTrainer(model_config, train_config, data, out, progress=False)
    resumed.fit()
    assert (resumed.state.epoch, resumed.state.step) == (2, 4)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "glam.pt"]


def test_unlabelled_and_contrastive_modes_take_a_step(eight_photos, tmp_path):
    for mode in ("unlabelled", "contrastive"):
        model_config, train_config = tiny_configs(mode)
        train_config.whitening_images = 0
        images = eight_photos if mode == "contrastive" else LabelledImageList(eight_photos.paths[:4], -np.ones(4))
        data = build_training_data(mode, images, train_config)
        path = train(model_config, train_config, data, tmp_path / mode, progress=False)
        state, _ = load_checkpoint(tmp_path / mode / CHECKPOINT_NAME, restore_rng=False)
        assert state.epoch == 1 and state.step >= 1 and math.isfinite(state.extra["last_loss"]), mode
        assert path.is_file()


def test_cli_arguments_build_the_configs():
    args = _parser().parse_args(["--mode", "unlabelled", "--folder", "x", "--out", "y", "--no-global-spatial",
                                 "--epochs", "3", "--lr", "0.01", "--tap", "stride32", "--no-amp"])
    model_config, train_config = configs_from_args(args)
    assert model_config.global_spatial is False and model_config.local_channel is True
    assert (train_config.mode, train_config.epochs, train_config.lr, train_config.amp) == ("unlabelled", 3, 0.01, False)
    with pytest.raises(ValueError, match="unknown training mode"):
        TrainConfig(mode="triplet")


def test_an_interrupted_run_resumes_mid_epoch(eight_photos, tmp_path):
    model_config, train_config = tiny_configs("arcface")
    train_config.whitening_images, train_config.checkpoint_every = 0, 1
    data = build_training_data("arcface", eight_photos, train_config)
    trainer = GlamTrainer(model_config, train_config, data, tmp_path, progress=False)
    original_loss, calls = trainer.loss, []

    def crash_on_second_batch(batch):
        calls.append(len(batch[0]))
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        return original_loss(batch)

    trainer.loss = crash_on_second_batch
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    state, _ = load_checkpoint(tmp_path / CHECKPOINT_NAME, restore_rng=False)
    assert (state.epoch, state.step) == (0, 1)
    assert not (tmp_path / "glam.pt").exists()
    resumed = GlamTrainer(model_config, train_config, data, tmp_path, progress=False)
    batches = []
    original = resumed.loss
    resumed.loss = lambda batch: (batches.append(len(batch[0])), original(batch))[1]
    resumed.fit()
    assert batches == [4] and (resumed.state.epoch, resumed.state.step) == (1, 2)  # only the missing batch
    assert (tmp_path / "glam.pt").is_file()
