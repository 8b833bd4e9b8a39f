"""TwoStageIndex: modes agree with the component indexes, atomic add, persistence, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest

from asmk_index.asmk import AsmkIndex
from asmk_index.codebook import Codebook
from asmk_index.global_index import GlobalIndex
import shutil

from asmk_index.persistence import IndexFormatError, current_version, sha256_of_file, write_arrays
from asmk_index.two_stage import SearchResult, TwoStageIndex

LOCAL_DIM, GLOBAL_DIM, WORDS, IMAGES = 32, 16, 24, 40


class Collection:
    """Synthetic images: each has a global vector and 10-30 local descriptors; queries are noisy
    copies of a database image's descriptors (so the right image should score best)."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.ids = rng.permutation(1000)[:IMAGES].astype(np.int64) + 10
        self.global_descriptors = rng.standard_normal((IMAGES, GLOBAL_DIM)).astype(np.float32)
        counts = rng.integers(10, 30, IMAGES)
        self.local = [rng.standard_normal((c, LOCAL_DIM)).astype(np.float32) for c in counts]
        self.local_descriptors = np.concatenate(self.local)
        self.local_ids = np.repeat(self.ids, counts)
        self.codebook = Codebook.train(self.local_descriptors, WORDS, seed=0)

    def query(self, image, noise=0.6):
        local = self.local[image] + noise * self.rng.standard_normal(self.local[image].shape)
        global_ = self.global_descriptors[image] + 2 * noise * self.rng.standard_normal(GLOBAL_DIM)
        return global_.astype(np.float32), local.astype(np.float32)

    def index(self, images=slice(None), **options):
        index = TwoStageIndex.create(self.codebook, GLOBAL_DIM, **options)
        ids = self.ids[images]
        keep = np.isin(self.local_ids, ids)
        index.add(self.global_descriptors[images], ids, self.local_descriptors[keep],
                  self.local_ids[keep])
        return index


@pytest.fixture(scope="module")
def collection():
    return Collection()


def assert_same_state(index, global_ids, asmk_ids):
    np.testing.assert_array_equal(np.sort(index.global_index.image_ids), np.sort(global_ids))
    np.testing.assert_array_equal(np.sort(index.asmk_index.image_ids), np.sort(asmk_ids))


def assert_results_equal(a: SearchResult, b: SearchResult):
    np.testing.assert_array_equal(a.ids, b.ids)
    for name in ("scores", "global_scores", "asmk_scores"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_two_stage_with_full_shortlist_equals_full_asmk_ranking(collection):
    index = collection.index()
    for image in range(0, IMAGES, 7):
        global_query, local_query = collection.query(image)
        full = index.search(global_query, local_query, k=IMAGES, shortlist=IMAGES,
                            mode="two_stage")
        asmk = index.search(global_query, local_query, k=IMAGES, mode="asmk")
        assert full.shortlist_size == IMAGES and len(full) == len(asmk) == IMAGES
        np.testing.assert_allclose(full.scores, asmk.scores, rtol=1e-12)
        assert sorted(full.ids.tolist()) == sorted(asmk.ids.tolist())
        distinct = np.r_[True, np.diff(asmk.scores) != 0] & np.r_[np.diff(asmk.scores) != 0, True]
        np.testing.assert_array_equal(full.ids[distinct], asmk.ids[distinct])
        assert full.ids[0] == collection.ids[image]          # the right image wins
        assert full.asmk_scores[0] > full.asmk_scores[1]


def test_modes_give_consistent_scores(collection):
    index = collection.index()
    global_query, local_query = collection.query(3)
    two_stage = index.search(global_query, local_query, k=5, shortlist=12)
    asmk = index.search(global_query, local_query, k=5, mode="asmk")
    global_only = index.search(global_query, local_query, k=12, mode="global")
    for result in (two_stage, asmk, global_only):
        assert isinstance(result, SearchResult) and result.ids.dtype == np.int64
        np.testing.assert_allclose(result.global_scores,
                                   index.global_index.score(global_query, result.ids), atol=1e-6)
        assert result.stage1_seconds >= 0 and result.stage2_seconds >= 0
    for result in (two_stage, asmk):
        np.testing.assert_allclose(result.asmk_scores,
                                   index.asmk_index.score(local_query, result.ids), rtol=1e-12)
        np.testing.assert_array_equal(result.scores, result.asmk_scores)
        assert np.all(np.diff(result.scores) <= 0)
    # two-stage re-ranks exactly the global top-12
    assert set(two_stage.ids) <= set(global_only.ids.tolist())
    rescored = index.asmk_index.score(local_query, global_only.ids)
    order = np.lexsort((-global_only.global_scores, -rescored))[:5]
    np.testing.assert_array_equal(two_stage.ids, global_only.ids[order])
    np.testing.assert_array_equal(global_only.scores, global_only.global_scores)
    assert np.isnan(global_only.asmk_scores).all() and global_only.stage2_seconds == 0
    expected_ids, _ = index.global_index.search(global_query, 12)
    np.testing.assert_array_equal(global_only.ids, expected_ids)
    assert index.search(global_query, None, k=3, mode="global").ids.size == 3
    # a shortlist smaller than k is raised to k
    assert len(index.search(global_query, local_query, k=6, shortlist=2)) == 6


def test_global_weight_fuses_the_two_scores(collection):
    index = collection.index()
    global_query, local_query = collection.query(5)
    plain = index.search(global_query, local_query, k=15, shortlist=15)
    fused = index.search(global_query, local_query, k=15, shortlist=15, global_weight=0.5)
    # the same shortlist, scored by asmk + 0.5 * global and ranked by that
    assert set(plain.ids.tolist()) == set(fused.ids.tolist())
    np.testing.assert_allclose(fused.scores, fused.asmk_scores + 0.5 * fused.global_scores)
    assert np.all(np.diff(fused.scores) <= 0)
    # a dominant weight gives the global order of the shortlist
    dominant = index.search(global_query, local_query, k=15, shortlist=15, global_weight=1e6)
    np.testing.assert_array_equal(dominant.ids, index.search(global_query, k=15, mode="global").ids)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="global_weight"):
            index.search(global_query, local_query, global_weight=bad)


def test_image_without_local_descriptors(collection):
    index = collection.index(slice(0, 10))
    new_id = 5000
    index.add(collection.global_descriptors[20:21], [new_id], np.zeros((0, LOCAL_DIM)), [])
    assert len(index) == 11 and len(index.asmk_index) == 10
    assert index.contains([new_id])[0] and not index.asmk_index.contains([new_id])[0]
    global_query, local_query = collection.global_descriptors[20], collection.local[0]
    result = index.search(global_query, local_query, k=11, shortlist=11)
    position = result.ids.tolist().index(new_id)
    assert result.asmk_scores[position] == 0.0
    assert result.global_scores[position] == pytest.approx(1.0, abs=1e-5)
    assert new_id not in index.search(global_query, local_query, k=11, mode="asmk").ids
    assert index.search(global_query, None, k=1, mode="global").ids[0] == new_id
    empty_query = index.search(global_query, np.zeros((0, LOCAL_DIM)), k=3)
    np.testing.assert_array_equal(empty_query.asmk_scores, 0)
    assert empty_query.ids[0] == new_id                    # global order kept
    index.remove([new_id, collection.ids[0]])
    assert_same_state(index, collection.ids[1:10], collection.ids[1:10])


def test_atomic_add_rolls_back_the_global_add(collection, monkeypatch):
    index = collection.index(slice(0, 20))
    query = collection.query(2)
    before = index.search(*query, k=20, shortlist=20)
    keep = np.isin(collection.local_ids, collection.ids[20:25])
    arguments = (collection.global_descriptors[20:25], collection.ids[20:25],
                 collection.local_descriptors[keep], collection.local_ids[keep])

    def failing_add(descriptors, image_ids):
        raise MemoryError("simulated failure inside the ASMK* add")

    monkeypatch.setattr(index.asmk_index, "add", failing_add)
    with pytest.raises(MemoryError, match="simulated"):
        index.add(*arguments)
    assert_same_state(index, collection.ids[:20], collection.ids[:20])
    monkeypatch.undo()
    index.add(*arguments)                                   # the same add now succeeds
    assert_same_state(index, collection.ids[:25], collection.ids[:25])
    index.remove(collection.ids[20:25])
    after = index.search(*query, k=20, shortlist=20)
    np.testing.assert_array_equal(after.ids, before.ids)
    np.testing.assert_allclose(after.scores, before.scores, rtol=1e-12)


def test_bad_input_leaves_both_indexes_unchanged(collection):
    index = collection.index(slice(0, 10))
    ids, descriptors = collection.ids, collection.global_descriptors
    keep = np.isin(collection.local_ids, ids[10:12])
    local, local_ids = collection.local_descriptors[keep], collection.local_ids[keep]
    nan_local = local.copy()
    nan_local[0, 0] = np.nan
    global_query, local_query = collection.query(1)
    cases = [
        (ValueError, "dimensionality", lambda: index.add(descriptors[10:12, :-1], ids[10:12],
                                                         local, local_ids)),
        (ValueError, "dimensionality", lambda: index.add(descriptors[10:12], ids[10:12],
                                                         local[:, :-1], local_ids)),
        (ValueError, "NaN", lambda: index.add(descriptors[10:12], ids[10:12], nan_local,
                                              local_ids)),
        (ValueError, "not being added", lambda: index.add(descriptors[10:11], ids[10:11], local,
                                                          local_ids)),
        (ValueError, "already in the index", lambda: index.add(
            descriptors[9:12], ids[9:12], local, local_ids)),
        (ValueError, "duplicate", lambda: index.add(descriptors[10:12], [ids[10], ids[10]],
                                                    local, np.full(local_ids.shape, ids[10]))),
        (ValueError, "expected 3 ids", lambda: index.add(descriptors[10:13], ids[10:12], local,
                                                         local_ids)),
        (ValueError, "expected", lambda: index.add(descriptors[10:12], ids[10:12], local,
                                                   local_ids[:-1])),
        (KeyError, "unknown", lambda: index.remove([ids[0], ids[30]])),
        (ValueError, "duplicate", lambda: index.remove([ids[0], ids[0]])),
        (ValueError, "mode", lambda: index.search(global_query, local_query, mode="fast")),
        (ValueError, "needs local", lambda: index.search(global_query, None)),
        (ValueError, "dimensionality", lambda: index.search(global_query[:-1], local_query)),
        (ValueError, "dimensionality", lambda: index.search(global_query, local_query[:, :5])),
        (ValueError, "positive integer", lambda: index.search(global_query, local_query, k=0)),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
        assert_same_state(index, ids[:10], ids[:10])
    stray = AsmkIndex(collection.codebook)
    stray.add(collection.local[0], np.full(len(collection.local[0]), 99999))
    with pytest.raises(ValueError, match="global index lacks"):
        TwoStageIndex(GlobalIndex(GLOBAL_DIM), stray)


def test_save_load_identical_and_refuses_corruption(tmp_path, collection):
    index = collection.index(method="ivf", nlist=2, nprobe=2)
    index.add(collection.rng.standard_normal((1, GLOBAL_DIM)), [7777], np.zeros((0, LOCAL_DIM)),
              [])
    index.remove(collection.ids[:3])
    queries = [collection.query(image) for image in (4, 9, 30)]
    expected = [index.search(g, l, k=8, shortlist=15, mode=mode)
                for g, l in queries for mode in ("two_stage", "asmk", "global")]
    target = tmp_path / "index"
    index.save(target)
    assert sorted(p.name for p in current_version(target).iterdir()) == [
        "asmk", "asmk_image_ids.npy", "global", "image_ids.npy", "manifest.json"]
    loaded = TwoStageIndex.load(target)
    assert len(loaded) == IMAGES - 2 and loaded.global_index.params == index.global_index.params
    found = [loaded.search(g, l, k=8, shortlist=15, mode=mode)
             for g, l in queries for mode in ("two_stage", "asmk", "global")]
    for a, b in zip(found, expected):
        assert_results_equal(a, b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]      # no temporary left

    # a corrupt component file
    vectors = current_version(target) / "global" / "vectors.npy"
    content = bytearray(vectors.read_bytes())
    content[-3] ^= 0x55
    vectors.write_bytes(bytes(content))
    with pytest.raises(IndexFormatError, match="checksum"):
        TwoStageIndex.load(target)

    # a component replaced by another index's: its manifest checksum no longer matches
    index.save(target)
    other = GlobalIndex(GLOBAL_DIM)
    other.add(collection.global_descriptors[:5], collection.ids[:5])
    other.save(tmp_path / "other")
    version = current_version(target)
    shutil.rmtree(version / "global")
    shutil.copytree(current_version(tmp_path / "other"), version / "global")
    with pytest.raises(IndexFormatError, match="checksum"):
        TwoStageIndex.load(target)

    # consistent checksums (CURRENT's record of the top manifest's included) but components
    # over other images: an id mismatch
    manifest = json.loads((version / "manifest.json").read_text())
    write_arrays(version, kind=manifest["kind"], params=manifest["params"],
                 counts=manifest["counts"],
                 arrays={name: np.load(version / f"{name}.npy")
                         for name in ("image_ids", "asmk_image_ids")},
                 components={"global": version / "global", "asmk": version / "asmk"})
    pointer = json.loads((target / "CURRENT").read_text())
    pointer["manifest_sha256"] = sha256_of_file(version / "manifest.json")
    (target / "CURRENT").write_text(json.dumps(pointer))
    with pytest.raises(IndexFormatError, match="image id mismatch"):
        TwoStageIndex.load(target)
    (version / "manifest.json").write_text("{truncated")
    with pytest.raises(IndexFormatError, match="corrupt"):
        TwoStageIndex.load(target)
