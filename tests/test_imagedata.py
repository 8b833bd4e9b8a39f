"""imagedata: revisitop protocol, UKBench N-S, datasets, augmentations, extraction loop, training utils."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from imagedata.revisitop import compute_ap, compute_map, evaluate_revisitop, load_revisitop, ukbench_ns_score
from real_data import require_ukbench


# ---------------------------------------------------------------- revisitop protocol ----------
def test_compute_ap_hand_computed():
    # positives at cleaned ranks 0 and 2 of 2 positives: 0.5 * (1 + 1) / 2 + 0.5 * (1/2 + 2/3) / 2
    assert compute_ap(np.array([0, 2]), 2) == pytest.approx(0.5 + 0.5 * (0.5 + 2 / 3) / 2)
    assert compute_ap(np.array([0, 1, 2]), 3) == pytest.approx(1.0)
    assert compute_ap(np.array([]), 4) == 0.0


def test_compute_map_ignores_junk_and_counts_precision():
    ranking = np.array([[1, 2, 0, 3, 4]])  # one query, rows = queries
    gnd = [{"ok": [1, 3], "junk": [2]}]
    m_ap, aps, m_pr, prs = compute_map(ranking, gnd, kappas=(1, 5), query_major=True)
    expected = 0.5 + 0.5 * (0.5 + 2 / 3) / 2  # junk 2 removed -> positives at ranks 0 and 2
    assert m_ap == pytest.approx(expected) and aps[0] == pytest.approx(expected)
    assert m_pr == pytest.approx([1.0, 2 / 3])  # P@5 capped at kq = max positive rank = 3
    # revisitop layout (n_db, n_q) gives the same numbers; a query without positives is excluded
    gnd2 = gnd + [{"ok": [], "junk": []}]
    two = np.stack([ranking[0], ranking[0]], axis=1)  # (5, 2)
    m_ap2, aps2, _, _ = compute_map(two, gnd2, kappas=(1,))
    assert m_ap2 == pytest.approx(expected) and np.isnan(aps2[1])
    with pytest.raises(ValueError, match="ambiguous"):
        compute_map(np.zeros((2, 2), int), [{"ok": [0], "junk": []}] * 2)


def test_evaluate_revisitop_easy_medium_hard():
    gnd = [{"easy": [1], "hard": [3], "junk": [2], "bbx": None}]
    ranking = np.array([[0], [3], [2], [1], [4]])  # (n_db, n_q)
    result = evaluate_revisitop(ranking, gnd)
    # easy: drop 2,3 -> [0,1,4], positive at rank 1: (0 + 1/2) / 2 = 0.25
    # medium: drop 2 -> [0,3,1,4], positives at 1,2: 0.5*(0+1/2)/2 + 0.5*(1/2+2/3)/2
    # hard: drop 2,1 -> [0,3,4], positive at rank 1: 0.25
    assert result["mAP"]["easy"] == pytest.approx(25.0)
    assert result["mAP"]["medium"] == pytest.approx(100 * (0.125 + 0.5 * (0.5 + 2 / 3) / 2))
    assert result["mAP"]["hard"] == pytest.approx(25.0)
    assert result["mP@k"]["medium"][1] == 0.0 and result["n_queries"]["hard"] == 1


def test_ukbench_ns_score():
    perfect = np.array([[q // 4 * 4 + (q + i) % 4 for i in range(4)] + [8] for q in range(8)])
    assert ukbench_ns_score(perfect) == 4.0
    worse = perfect.copy()
    worse[:, 3] = (worse[:, 3] + 4) % 8  # every query loses one mate
    assert ukbench_ns_score(worse) == 3.0
    assert ukbench_ns_score(worse.T, query_major=False) == 3.0


def test_load_revisitop_real_ukbench():
    root = require_ukbench()
    data = load_revisitop(root)
    assert data.name == "ukbench-dev" and len(data.imlist) == 400 and len(data.qimlist) == 400
    assert data.image_path("ukbench00000") == root / "jpg" / "ukbench00000.jpg"
    assert data.image_path(data.imlist[0]).is_file() and data.query_bbox(0) is None
    assert data.positives(0, "easy") == [1, 2, 3]
    # the perfect ranking scores 100 easy/medium; 'hard' has no positives on UKBench -> NaN
    ranks = np.array([[q] + data.positives(q, "easy") + [i for i in range(400) if i // 4 != q // 4]
                      for q in range(400)])
    result = evaluate_revisitop(ranks, data.gnd, query_major=True)
    assert result["mAP"]["easy"] == pytest.approx(100.0) and result["mAP"]["medium"] == pytest.approx(100.0)
    assert np.isnan(result["mAP"]["hard"]) and ukbench_ns_score(ranks) == 4.0


def test_load_revisitop_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        load_revisitop(tmp_path)
    with open(tmp_path / "gnd_bad.pkl", "wb") as handle:
        pickle.dump({"imlist": []}, handle)
    with pytest.raises(ValueError, match="lacks keys"):
        load_revisitop(tmp_path)


# ---------------------------------------------------------------- datasets + augmentation -------
def _write_photo(path: Path, seed: int, size=(48, 40)) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_gldv2_csv_both_layouts_and_missing(tmp_path: Path, caplog):
    from imagedata.datasets import gldv2_image_path, labelled_from_gldv2_csv

    ids = {"abc123": 7, "abd999": 7, "f00baa": 42, "ffff00": 3}
    for layout in ("gldv2", "flat"):
        root = tmp_path / layout
        for i, image_id in enumerate(ids):
            if image_id == "ffff00":
                continue  # listed but missing
            path = gldv2_image_path(root, image_id, layout)
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_photo(path, i)
        csv_path = tmp_path / "train.csv"
        csv_path.write_text("id,url,landmark_id\n" + "".join(f"{k},http://x/{k}.jpg,{v}\n" for k, v in ids.items()))
        data = labelled_from_gldv2_csv(csv_path, root)
        assert [p.stem for p in data.paths] == ["abc123", "abd999", "f00baa"]
        assert data.labels.tolist() == [0, 0, 1] and data.class_ids == [7, 42]
        assert "missing" in caplog.text
    clean = tmp_path / "train_clean.csv"
    clean.write_text("landmark_id,images\n7,abc123 abd999\n42,f00baa\n")
    assert labelled_from_gldv2_csv(clean, tmp_path / "flat", layout="flat").labels.tolist() == [0, 0, 1]
    assert len(labelled_from_gldv2_csv(clean, tmp_path / "flat", min_images_per_class=2)) == 2
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="expected columns"):
        labelled_from_gldv2_csv(tmp_path / "bad.csv", tmp_path / "flat")


def test_revisitop_labels_and_pairs_on_real_ukbench(caplog):
    import torch

    from imagedata.datasets import (ClassificationImages, ImagePairs, LabelledImageList, TrainImageConfig,
                                    hardest_negatives, labelled_from_revisitop)

    data = load_revisitop(require_ukbench())
    labelled = labelled_from_revisitop(data)
    assert labelled.num_classes == 100 and labelled.labels[:8].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    small = LabelledImageList(labelled.paths[:8], labelled.labels[:8])
    config = TrainImageConfig(size=64)
    classification = ClassificationImages(small, config)
    image, label = classification[5]
    assert image.shape == (3, 64, 64) and label == 1 and classification.num_classes == 2
    pairs = ImagePairs(small, config, negatives_per_positive=2, seed=1)
    assert len(pairs) == 8 * 3 and sorted({p[2] for p in pairs.pairs}) == [0, 1]
    for a, b, label in pairs.pairs:
        assert (small.labels[a] == small.labels[b]) == (label == 1) and a != b
    first, second, label = pairs[0]
    assert first.shape == second.shape == (3, 64, 64) and label in (0, 1)
    # hardest in-batch negative: most similar descriptor of another label
    descriptors = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [0.9, 0.1], [0.8, 0.6], [0, 1.0]]), dim=1)
    assert hardest_negatives(descriptors, torch.tensor([0, 0, 1, 1])).tolist() == [2, 2, 1, 1]
    assert hardest_negatives(descriptors[:2], torch.tensor([0, 0])).tolist() == [-1, -1]


def test_datasets_skip_bad_images_and_unlabelled_two_views(tmp_path: Path, caplog):
    import torch

    from imagedata.augment import AugmentConfig, TwoViews
    from imagedata.datasets import ImagePairs, TrainImageConfig, stack_or_list, unlabelled_folder

    for i in range(4):
        _write_photo(tmp_path / f"img{i}.png", i)
    (tmp_path / "broken.jpg").write_text("not an image")
    folder = unlabelled_folder(tmp_path)
    assert len(folder) == 5 and (folder.labels == -1).all()
    pairs = ImagePairs(folder, TrainImageConfig(size=32), seed=0)
    assert len(pairs) == 10  # one positive (same image) + one negative per image
    batch = stack_or_list([pairs[i] for i in range(len(pairs))])  # the broken file is replaced, never raised
    assert batch[0].shape == (10, 3, 32, 32) and batch[2].dtype == torch.int64
    assert "broken.jpg" in caplog.text
    view_a, view_b = TwoViews(AugmentConfig(output_size=24))(batch[0])
    assert view_a.shape == view_b.shape == (10, 3, 24, 24)
    assert float(view_a.min()) >= 0 and float(view_a.max()) <= 1 and not torch.equal(view_a, view_b)


# ---------------------------------------------------------------- extraction loop ---------------
class _TopLocations:
    """A real local extractor: Lite0 stride-16 locations with the largest feature norm."""

    def __init__(self, top: int = 20):
        from backbones import build_backbone

        self.backbone = build_backbone().eval()
        self.top = top
        self.calls = 0
        self.interrupt_at: int | None = None

    def __call__(self, image):
        self.calls += 1
        if self.interrupt_at is not None and self.calls == self.interrupt_at:
            raise KeyboardInterrupt  # a user pressing ctrl-c mid-run
        features = self.backbone(image)[0]  # (C, h, w)
        channels, height, width = features.shape
        flat = features.reshape(channels, -1).T
        norms = flat.norm(dim=1)
        keep = norms.argsort(descending=True)[: self.top]
        return {"descriptors": (flat[keep] / norms[keep, None]).numpy(), "attention": norms[keep].numpy(),
                "x": (keep % width).float().numpy(), "y": (keep // width).float().numpy()}


def test_extract_to_file_with_bad_file_and_resume(tmp_path: Path):
    import shutil

    from asmk_index.feature_file import FeatureFile
    from imagedata.extraction import extract_to_file

    root = require_ukbench()
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i in range(6):
        target = folder / ("sub" if i >= 4 else "") / f"ukbench{i:05d}.jpg"
        shutil.copy(root / "jpg" / f"ukbench{i:05d}.jpg", target)
    (folder / "corrupt.jpg").write_text("definitely not a jpeg")
    extractor = _TopLocations()
    out, report_path = tmp_path / "local.h5", tmp_path / "failures.txt"
    fields = {"attention": "float32", "x": "float32", "y": "float32"}
    options = dict(kind="local", dim=112, fields=fields, attributes={"model": "lite0-top20"}, max_size=128,
                   progress=False, report_path=report_path)

    extractor.interrupt_at = 4  # order: corrupt.jpg (fails), sub/4, sub/5, 00000 stored, ctrl-c on 00001
    with pytest.raises(KeyboardInterrupt):
        extract_to_file(folder, extractor, out, num_workers=0, **options)
    with FeatureFile(out) as partial:
        assert partial.names == ["sub/ukbench00004", "sub/ukbench00005", "ukbench00000"]
        first = partial.get("ukbench00000")

    extractor.interrupt_at = None
    report = extract_to_file(folder, extractor, out, num_workers=1, **options)
    assert report.skipped == 3 and report.extracted == 3 and report.total == 7
    assert [Path(p).name for p, _ in report.failures] == ["corrupt.jpg"]  # failures are retried on resume
    with FeatureFile(out) as stored:
        assert sorted(stored.names) == ["sub/ukbench00004", "sub/ukbench00005", "ukbench00000", "ukbench00001",
                                        "ukbench00002", "ukbench00003"]
        assert [name for name, _ in stored.failures] == ["corrupt"]
        assert "not a recognised image" in stored.failures[0][1]
        descriptors, owners = stored.all_descriptors()
        assert descriptors.shape == (6 * 20, 112) and np.allclose(np.linalg.norm(descriptors, axis=1), 1, atol=1e-4)
        again = stored.get("ukbench00000")
        assert np.array_equal(again["descriptors"], first["descriptors"]) and again["x"].max() < 8
    lines = report_path.read_text().splitlines()
    assert len(lines) == 2 and all(line.startswith(str(folder / "corrupt.jpg") + "\t") for line in lines)
    # a finished file: nothing to do
    assert extract_to_file(folder, extractor, out, num_workers=0, **options).extracted == 0


def test_extract_to_file_errors(tmp_path: Path):
    from imagedata.extraction import extract_to_file, image_names

    assert image_names([tmp_path / "a" / "x.jpg", tmp_path / "b" / "y.png"]) == ["a/x", "b/y"]
    with pytest.raises(ValueError, match="same name"):
        extract_to_file([tmp_path / "x.jpg", tmp_path / "x.png"], lambda im: {}, tmp_path / "f.h5", kind="global",
                        dim=4, progress=False)
    for i in range(5):
        _write_photo(tmp_path / f"p{i}.png", i)

    def broken_extractor(image):
        raise RuntimeError("bug in the model")

    with pytest.raises(RuntimeError, match="in a row"):
        extract_to_file(tmp_path, broken_extractor, tmp_path / "g.h5", kind="global", dim=4, progress=False,
                        num_workers=0, max_consecutive_errors=3)


# ---------------------------------------------------------------- training utilities ------------
def _small_model_and_optimizer():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


def _train_steps(model, optimizer, scheduler, steps: int) -> list[float]:
    import torch

    losses = []
    for _ in range(steps):
        x = torch.randn(16, 4)  # draws from the torch RNG: resume must restore it
        loss = (model(x) - x[:, :2]).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    return losses


def test_checkpoint_resume_round_trip(tmp_path: Path):
    import torch

    from imagedata.training import TrainState, load_checkpoint, save_checkpoint, seed_everything

    seed_everything(0)
    model, optimizer, scheduler = _small_model_and_optimizer()
    _train_steps(model, optimizer, scheduler, 3)
    path = save_checkpoint(tmp_path / "ckpt" / "last.pt", model=model, optimizer=optimizer, scheduler=scheduler,
                           state=TrainState(epoch=1, step=3, best_metric=0.5), config={"dim": 8})
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary left behind
    expected = _train_steps(model, optimizer, scheduler, 4)  # the uninterrupted continuation

    seed_everything(123)  # a fresh process with other RNG state and fresh objects
    model2, optimizer2, scheduler2 = _small_model_and_optimizer()
    state, checkpoint = load_checkpoint(path, model=model2, optimizer=optimizer2, scheduler=scheduler2)
    assert state.epoch == 1 and state.step == 3 and state.best_metric == 0.5 and checkpoint["config"] == {"dim": 8}
    assert scheduler2.last_epoch == 3
    resumed = _train_steps(model2, optimizer2, scheduler2, 4)
    assert resumed == pytest.approx(expected, rel=1e-6)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.allclose(a, b)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "none.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def _ddp_worker(rank: int, world_size: int, port: int, result_dir: str) -> None:
    import torch

    from imagedata.training import (all_reduce_mean, cleanup_distributed, is_main_process, make_sampler,
                                    setup_distributed, wrap_ddp)

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    info = setup_distributed(device="cpu")
    torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
    model = wrap_ddp(torch.nn.Linear(3, 1), info)
    data = torch.arange(8, dtype=torch.float32)
    sampler = make_sampler(data, info, shuffle=False)
    indices = list(sampler)
    x = torch.stack([torch.full((3,), data[i].item()) for i in indices])
    loss = model(x).pow(2).mean()
    loss.backward()
    mean_loss = all_reduce_mean(loss.detach())
    torch.save({"indices": indices, "weight": model.module.weight.detach(), "grad": model.module.weight.grad,
                "main": is_main_process(), "mean_loss": mean_loss}, os.path.join(result_dir, f"{rank}.pt"))
    cleanup_distributed()


def test_two_process_gloo_ddp(tmp_path: Path):
    import torch

    from processes import spawn_on_free_port

    spawn_on_free_port(_ddp_worker, 2, str(tmp_path))
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    assert sorted(results[0]["indices"] + results[1]["indices"]) == list(range(8))  # disjoint shards
    assert torch.equal(results[0]["weight"], results[1]["weight"])  # rank 0's weights broadcast
    assert torch.allclose(results[0]["grad"], results[1]["grad"])  # gradients all-reduced
    assert results[0]["main"] and not results[1]["main"]
    assert torch.allclose(results[0]["mean_loss"], results[1]["mean_loss"])


def test_single_process_world_helpers():
    import torch

    from imagedata.training import is_main_process, make_sampler, setup_distributed, wrap_ddp

    info = setup_distributed(device="cpu")
    assert info.world_size == 1 and not info.is_distributed and is_main_process()
    model = torch.nn.Linear(2, 2)
    assert wrap_ddp(model, info) is model
    assert sorted(make_sampler(list(range(5)), info, seed=1)) == list(range(5))


def test_extract_to_file_query_boxes(tmp_path: Path):
    from asmk_index.feature_file import FeatureFile
    from imagedata.extraction import extract_to_file

    paths = [_write_photo(tmp_path / f"q{i}.png", i, size=(48, 40)) for i in range(3)]

    def size_extractor(image):
        return {"descriptors": np.array([[image.shape[2], image.shape[3], float(image.max()), 0.0]], np.float32)}

    report = extract_to_file(paths, size_extractor, tmp_path / "q.h5", kind="global", dim=4, progress=False,
                             num_workers=0, boxes=[(10, 5, 30, 25), None, (0, 0, 0, 0)], max_size=24)
    assert report.extracted == 2 and "empty" in report.failures[0][1]
    with FeatureFile(tmp_path / "q.h5") as stored:
        assert stored.names == ["q0", "q1"]
        assert stored.get("q0")["descriptors"][0, :2].tolist() == [20, 20]  # 20x20 crop (not upscaled)
        assert stored.get("q1")["descriptors"][0, :2].tolist() == [20, 24]  # 40x48 -> max side 24
        assert stored.get("q1")["descriptors"][0, 2] <= 1.0  # [0, 1] floats


def test_ranks_from_scores():
    from imagedata.revisitop import ranks_from_scores

    scores = np.array([[0.1, 0.9, 0.5], [0.3, 0.3, 0.7]])
    assert ranks_from_scores(scores).tolist() == [[1, 2, 0], [2, 0, 1]]
