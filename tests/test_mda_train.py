"""mda.train on tiny images: the loss falls, checkpoint + resume continues exactly, unlabelled mode."""
import math
import os

import pytest
import torch

from imagedata.augment import AugmentConfig, TwoViews
from imagedata.training import seed_everything
from mda.config import MdaConfig, TrainConfig
from mda.model import MdaModel
from mda.train import CHECKPOINT_NAME, mined_loss, train
from real_data import UKBENCH

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 64


def textures(count, seed):
    """Distinct smooth random colour textures (count, 3, SIZE, SIZE) in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 8, 8, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


def pair_batches(count, seed=0):
    """Batches (images_a, images_b, labels): 2 matching pairs (shifted, brightened) + 2 non-matching."""
    batches = []
    for index in range(count):
        objects = textures(4, seed + index)
        views = torch.roll(objects, shifts=(4, -3), dims=(2, 3)).mul(0.9).add(0.05)
        images_a = objects
        images_b = torch.stack([views[0], views[1], objects[3], objects[2]])
        batches.append((images_a, images_b, torch.tensor([1, 1, 0, 0])))
    return batches


def new_model(seed=0):
    seed_everything(seed)
    return MdaModel(MdaConfig(num_heads=2))


CONFIG = TrainConfig(margin=0.8, diversity_weight=0.5, lr=1e-4, head_lr_multiplier=10.0, batch_size=4,
                     epochs=100, train_backbone=False, lr_gamma=1.0)


def test_training_decreases_the_loss(tmp_path):
    model = new_model()
    batch = pair_batches(1)
    result = train(model, batch * 3, CONFIG, run_dir=tmp_path, max_steps=6, log_every=0)
    assert result.step == 6 and len(result.losses) == 6
    assert all(math.isfinite(v) for v in result.losses)
    assert sum(result.losses[-2:]) / 2 < 0.8 * result.losses[0]
    assert (tmp_path / CHECKPOINT_NAME).is_file()


def test_checkpoint_resume_continues_from_the_same_step(tmp_path):
    batches = pair_batches(2)
    config = TrainConfig(**{**CONFIG.__dict__, "epochs": 2})
    straight = train(new_model(), batches, config, run_dir=tmp_path / "straight", max_steps=4, log_every=0)
    first = train(new_model(), batches, config, run_dir=tmp_path / "resumed", max_steps=1, log_every=0)
    assert first.step == 1 and first.epoch == 0
    resumed_model = new_model(seed=123)           # different init: everything must come from the checkpoint
    # resumes mid-epoch 0 (skips the batch done), crosses into epoch 1
    second = train(resumed_model, batches, config, run_dir=tmp_path / "resumed", max_steps=4, log_every=0)
    assert second.step == 4 and len(second.losses) == 3 and second.epoch == 2
    torch.testing.assert_close(torch.tensor(second.losses), torch.tensor(straight.losses[1:]), rtol=1e-4, atol=1e-5)
    # a finished run resumes to nothing
    done = train(new_model(), batches, config, run_dir=tmp_path / "straight", max_steps=4, log_every=0)
    assert done.losses == [] and done.step == 4


def test_unlabelled_two_views_step_and_mining(tmp_path):
    model = new_model()
    images = textures(3, seed=7)
    augment = TwoViews(AugmentConfig(output_size=SIZE))
    result = train(model, [images], TrainConfig(**{**CONFIG.__dict__, "epochs": 1}), run_dir=tmp_path,
                   augment=augment, log_every=0)
    assert result.step == 1 and math.isfinite(result.losses[0])
    # mining: the hardest negative is the other group's most similar descriptor
    g = torch.nn.functional.normalize(torch.tensor([[[1.0, 0.0]], [[0.9, 0.1]], [[0.0, 1.0]]]), dim=-1)
    maps = torch.rand(3, 1, 2, 2)
    parts = mined_loss((g, maps), (g, maps), torch.tensor([0, 1, 2]), CONFIG)
    # positives identical -> distance 0; negatives: 0<->1 (close), 2<->1 (closest other)
    assert parts.positive_distance == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="two groups"):
        mined_loss((g, maps), (g, maps), torch.tensor([0, 0, 0]), CONFIG)


@pytest.mark.skipif(not UKBENCH.is_dir() and os.environ.get("CI") != "true",
                    reason=f"real photos not available at {UKBENCH}")
def test_cli_trains_on_revisitop_pairs_and_saves_a_model(tmp_path):
    from mda.train import main

    main(["--revisitop", str(UKBENCH), "--out", str(tmp_path), "--epochs", "1", "--steps-per-epoch", "1",
          "--batch-size", "2", "--image-size", "96", "--fit-reduction-images", "8", "--num-workers", "0",
          "--freeze-backbone", "--heads", "2"])
    model = MdaModel.load(tmp_path / "model.pt")
    assert model.config.num_heads == 2 and bool(model.head.reduction_fitted)
    assert (tmp_path / CHECKPOINT_NAME).is_file()
