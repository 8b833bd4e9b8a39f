"""The one trainer on real photos (ukbench-dev, tiny images): pair batches, training brings views
of one object together, exact resume, a partly trainable backbone, two DDP processes, and the
whole path a user runs: train -> build_codebook --model -> index -> search with the trained model."""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from processes import spawn_on_free_port
from real_data import UKBENCH, require_ukbench
from retrieval.config import SystemConfig, TrainConfig
from retrieval.network import NetworkConfig, RetrievalNet
from retrieval.training import CACHE_DIR, Trainer, TrainingImages, epoch_batches, pick_views

require_ukbench(module_level=True)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

OBJECTS = 6
SMALL = {"glam": {"local_reduced_channels": 16, "global_reduced_channels": 16}}
TRAIN = dict(batch_size=8, image_size=96, views_per_image=3, num_workers=0, log_every=0, lr=1e-3,
             warmup_epochs=0.0)


def photo_paths(objects=range(OBJECTS)) -> list[Path]:
    return [UKBENCH / "jpg" / f"ukbench{4 * o + v:05d}.jpg" for o in objects for v in range(4)]


def labelled_photos() -> TrainingImages:
    paths = photo_paths()
    return TrainingImages(paths, np.repeat(np.arange(OBJECTS), 4), unlabelled=False)


def new_net(seed: int = 0) -> RetrievalNet:
    torch.manual_seed(seed)
    return RetrievalNet(NetworkConfig.from_dict(SMALL))


def test_epoch_batches_are_pairs_of_one_class_with_no_class_twice():
    labels = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4])
    batches = epoch_batches(labels, 3, seed=1, epoch=0)
    anchors = [batch[k] for batch in batches for k in range(0, len(batch), 2)]
    assert sorted(anchors) == sorted(set(anchors)) and len(anchors) >= len(labels) - 1
    for batch in batches:
        pairs = np.asarray(batch).reshape(-1, 2)
        assert (labels[pairs[:, 0]] == labels[pairs[:, 1]]).all()
        assert len(set(labels[pairs[:, 0]])) == len(pairs) >= 2
        assert all(a != p for a, p in pairs if (labels == labels[a]).sum() > 1)  # a mate when there is one
        assert all(a == p for a, p in pairs if (labels == labels[a]).sum() == 1)  # alone: itself twice
    assert epoch_batches(labels, 3, seed=1, epoch=0) == batches
    assert epoch_batches(labels, 3, seed=1, epoch=1) != batches
    views = pick_views(np.array([5, 6, 5, 7]), 3, np.random.default_rng(0))
    assert views[0] != views[2]  # one photo twice: two different views


def _mean_average_precision(net: RetrievalNet, trainer: Trainer) -> float:
    """mAP of every photo as a query for its object's 3 other photos among the others, with the
    global descriptors of the photos themselves (view 0 of the cached maps)."""
    count = 4 * OBJECTS
    maps = trainer.cache.maps(np.arange(count), np.zeros(count, np.int64), torch.device("cpu"))
    with torch.no_grad():
        descriptors = net.eval().heads(maps).global_descriptor
    net.train()
    similarity, objects = (descriptors @ descriptors.T).numpy(), np.arange(count) // 4
    precisions = []
    for query in range(count):
        order = [i for i in np.argsort(-similarity[query], kind="stable") if i != query]
        relevant = objects[order] == objects[query]
        precisions.append(np.mean(np.cumsum(relevant)[relevant] / (np.flatnonzero(relevant) + 1)))
    return float(np.mean(precisions))


def test_training_brings_views_of_an_object_together_and_resumes_exactly(tmp_path):
    config = TrainConfig(**TRAIN, epochs=3, global_loss="contrastive")   # 6 batches an epoch
    straight = Trainer(new_net(), labelled_photos(), config, tmp_path / "straight", progress=False)
    result = straight.fit(max_steps=6)
    assert result.steps == 6 and result.epochs == 1 and (tmp_path / "straight" / "model.pt").is_file()
    assert any((tmp_path / "straight" / CACHE_DIR).glob("*/complete"))
    before = _mean_average_precision(new_net(), straight)
    after = _mean_average_precision(straight.net, straight)
    assert before < 0.99 <= after, (before, after)  # trained on these photos: mates ranked first
    assert straight.fit(max_steps=9).steps == 9     # on into the second epoch (its own order)

    # interrupted in the first epoch and again in the second, resumed each time by a new trainer:
    # exactly the weights of the straight run
    for stop in (3, 8, 9):   # later trainers start from other weights: the checkpoint replaces them
        resumed = Trainer(new_net(seed=0 if stop == 3 else stop), labelled_photos(), config, tmp_path / "resumed",
                          progress=False)
        assert resumed.fit(max_steps=stop).steps == stop
    for name, tensor in straight.net.state_dict().items():
        assert torch.equal(resumed.net.state_dict()[name], tensor), name
    assert (RetrievalNet.load(tmp_path / "resumed" / "model.pt").loaded_hash
            == RetrievalNet.load(tmp_path / "straight" / "model.pt").loaded_hash != result.model_sha256)


def test_the_last_backbone_stage_trains_on_augmented_photos_and_resumes_exactly(tmp_path):
    config = TrainConfig(**TRAIN, epochs=1, trainable_stages=1, global_loss="arcface", local_weight=0.5)
    initial = new_net().state_dict()
    straight = Trainer(new_net(), labelled_photos(), config, tmp_path / "straight", progress=False)
    assert not straight.frozen_backbone
    straight.fit(max_steps=2)
    trained = straight.net.state_dict()
    last_stage = {id(p) for p in straight.net.backbone.stage_modules()[-1].parameters()}
    last_stage_names = {f"backbone.{name}" for name, p in straight.net.backbone.named_parameters()
                        if id(p) in last_stage}
    changed = {n for n in trained if not torch.equal(trained[n], initial[n])}
    assert changed & last_stage_names                                  # the last stage trained
    frozen_changed = {n for n in changed if n.startswith("backbone.") and n not in last_stage_names
                      and not n.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert not frozen_changed, sorted(frozen_changed)[:5]               # the other stages did not
    assert {"global_head.fc.weight", "local_head.reduction.weight"} <= changed
    first = Trainer(new_net(), labelled_photos(), config, tmp_path / "resumed", progress=False)
    first.fit(max_steps=1)
    second = Trainer(new_net(), labelled_photos(), config, tmp_path / "resumed", progress=False)
    second.fit(max_steps=2)
    for name, tensor in trained.items():
        assert torch.allclose(second.net.state_dict()[name], tensor, atol=1e-6), name


def _ddp_rank(rank: int, world: int, port: int, run: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    from imagedata.training import cleanup_distributed
    try:
        config = TrainConfig(**TRAIN, epochs=1, global_loss="contrastive")
        trainer = Trainer(new_net(), labelled_photos(), config, run, device="cpu", progress=False)
        result = trainer.fit(max_steps=2)
        torch.save({"state": trainer.net.state_dict(), "steps": result.steps}, Path(run) / f"rank{rank}.pt")
    finally:
        cleanup_distributed()


def test_two_ddp_processes_train_one_model(tmp_path):
    spawn_on_free_port(_ddp_rank, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 2
    initial = new_net().state_dict()
    assert not torch.equal(ranks[0]["state"]["global_head.fc.weight"], initial["global_head.fc.weight"])
    for name, tensor in ranks[0]["state"].items():
        assert torch.allclose(ranks[1]["state"][name], tensor, atol=1e-6), name  # gradients all-reduced
    written = RetrievalNet.load(tmp_path / "model.pt").state_dict()  # by rank 0 only
    for name, tensor in ranks[0]["state"].items():
        assert torch.equal(written[name], tensor), name


def test_train_then_build_codebook_with_the_model_index_and_search(tmp_path, capsys):
    """The README's path: pipelines/train.py -> build_codebook.py --model -> index.py -> search.py."""
    from asmk_index.persistence import current_version
    from pipelines import build_codebook, index, search, train
    from retrieval.models import ModelBundle

    dataset = tmp_path / "photos"
    (dataset / "jpg").mkdir(parents=True)
    for path in photo_paths():
        shutil.copyfile(path, dataset / "jpg" / path.name)
    stems = [path.stem for path in photo_paths()]
    gnd = [{"easy": [j for j in range(4 * (i // 4), 4 * (i // 4) + 4) if j != i], "hard": [], "junk": [i],
            "bbx": None} for i in range(len(stems))]
    with open(dataset / "gnd_photos.pkl", "wb") as handle:
        pickle.dump({"imlist": stems, "qimlist": stems, "gnd": gnd}, handle)
    config = tmp_path / "config.yaml"
    SystemConfig().updated({
        "extraction": {"max_size": 128, "scales": [1.0, 0.7071], "top_n": 150, "device": "cpu"},
        "codebook": {"fit_images": 12}, "network": SMALL,
        "train": {**TRAIN, "epochs": 1, "fit_images": 12}}).save(config)

    run = tmp_path / "run"
    assert train.main(["--revisitop", str(dataset), "--out", str(run), "--config", str(config),
                       "--no-progress", "--log-every", "5"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["steps"] > 0 and Path(trained["model"]) == run / "model.pt"

    assert build_codebook.main(["--images", str(dataset / "jpg"), "--out", str(tmp_path / "codebook"),
                                "--model", trained["model"], "--config", str(config), "--size", "48",
                                "--no-progress"]) == 0
    codebook_report, _ = json.JSONDecoder().raw_decode(capsys.readouterr().out)
    assert codebook_report["model_sha256"] == trained["model_sha256"]
    bundle = ModelBundle.load(tmp_path / "codebook")
    assert bundle.model_hash == trained["model_sha256"]  # the trained weights, not a new model
    trained_net = RetrievalNet.load(run / "model.pt")
    for name, tensor in trained_net.state_dict().items():
        assert torch.equal(bundle.net.state_dict()[name].cpu(), tensor), name

    assert index.main(["--images", str(dataset / "jpg"), "--codebook", str(tmp_path / "codebook"),
                       "--out", str(tmp_path / "index"), "--no-progress"]) == 0
    assert "0 extracted" in capsys.readouterr().out  # the codebook run's features were reused
    manifest = json.loads((current_version(tmp_path / "index") / "manifest.json").read_text())
    assert manifest["params"]["model_sha256"] == trained["model_sha256"]

    hits_of_group = []
    for number in (1, 6, 13, 22):
        assert search.main(["--index", str(tmp_path / "index"), "--query",
                            str(dataset / "jpg" / f"ukbench{number:05d}.jpg"), "--k", "4", "--json"]) == 0
        names = [hit["name"] for hit in json.loads(capsys.readouterr().out)[0]["results"]]
        assert names[0] == f"ukbench{number:05d}.jpg"  # the query itself first
        group = {f"ukbench{4 * (number // 4) + j:05d}.jpg" for j in range(4)}
        hits_of_group.append(len(group & set(names)))
    assert np.mean(hits_of_group) >= 2.5, hits_of_group  # its object's views come next
