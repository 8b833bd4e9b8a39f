"""GlobalIndex: exact search equals brute force, ivf/hnsw recall, removal, bad input, save/load."""
from __future__ import annotations

import json

import numpy as np
import pytest

from asmk_index.global_index import GlobalIndex
from asmk_index.persistence import IndexFormatError, current_version

DIM = 16


def normalized(array):
    return array / np.linalg.norm(array, axis=1, keepdims=True)


def clustered(rng, n, clusters=40, noise=0.6):
    centers = rng.standard_normal((clusters, DIM))
    points = centers[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, DIM))
    return points.astype(np.float32)


def brute_force(database, ids, queries, k):
    scores = normalized(queries) @ normalized(database).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids[order], np.take_along_axis(scores, order, axis=1)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    database = rng.standard_normal((300, DIM)).astype(np.float32)
    ids = rng.permutation(10_000)[:300].astype(np.int64) * 7
    queries = rng.standard_normal((12, DIM)).astype(np.float32)
    return database, ids, queries


def test_exact_search_equals_brute_force(data):
    database, ids, queries = data
    index = GlobalIndex(DIM)
    index.add(database[:100], ids[:100])
    index.add(database[100:], ids[100:])        # two adds: the same as one
    assert len(index) == 300
    found, scores = index.search(queries, 10)
    expected_ids, expected_scores = brute_force(database, ids, queries, 10)
    assert found.shape == (12, 10) and found.dtype == np.int64
    np.testing.assert_array_equal(found, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)
    single_ids, single_scores = index.search(queries[3], 10)
    np.testing.assert_array_equal(single_ids, expected_ids[3])
    np.testing.assert_allclose(index.score(queries[3], single_ids), single_scores, atol=1e-5)
    np.testing.assert_allclose(index.score(queries[:2], ids[:5]),
                               normalized(queries[:2]) @ normalized(database[:5]).T, atol=1e-5)
    all_ids, _ = index.search(queries[0], 1000)        # k > n returns everything
    assert sorted(all_ids.tolist()) == sorted(ids.tolist())
    np.testing.assert_array_equal(index.image_ids, ids)
    np.testing.assert_array_equal(index.contains([ids[5], -3, ids[7]]), [True, False, True])
    assert index.memory_bytes() >= 300 * DIM * 4


def test_remove_then_search_matches_a_fresh_index(data):
    database, ids, queries = data
    for method, options in [("exact", {}), ("hnsw", {}), ("ivf", {"nlist": 4})]:
        index = GlobalIndex(DIM, method=method, **options)
        index.add(database, ids)
        index.search(queries, 5)                       # build faiss structures before removal
        index.remove(ids[::3])
        assert len(index) == 200
        assert not index.contains(ids[::3]).any() and index.contains(ids[1::3]).all()
        found, _ = index.search(queries, 5)
        assert not set(found.ravel().tolist()) & set(ids[::3].tolist()), method
        if method == "exact":
            expected, _ = brute_force(np.delete(database, np.s_[::3], 0),
                                      np.delete(ids, np.s_[::3]), queries, 5)
            np.testing.assert_array_equal(found, expected)
        index.add(database[:6:3], ids[:6:3])           # removed ids can be added again
        assert index.contains(ids[:6:3]).all() and len(index) == 202


@pytest.mark.parametrize("method, options, minimum_recall", [
    ("ivf", {"nlist": 16, "nprobe": 4}, 0.7), ("hnsw", {"hnsw_m": 16, "ef_search": 32}, 0.85)])
def test_approximate_recall_against_exact(method, options, minimum_recall):
    rng = np.random.default_rng(1)
    database = clustered(rng, 2000)
    ids = np.arange(2000, dtype=np.int64) + 500
    queries = clustered(rng, 50)
    exact = GlobalIndex(DIM)
    exact.add(database, ids)
    approximate = GlobalIndex(DIM, method=method, **options)
    approximate.add(database[:200], ids[:200])
    if method == "ivf":
        assert not approximate.is_trained          # 200 < 39 * 16: not trained, searches exact
        np.testing.assert_array_equal(approximate.search(queries, 5)[0],
                                      brute_force(database[:200], ids[:200], queries, 5)[0])
    approximate.add(database[200:], ids[200:])
    assert approximate.is_trained
    expected, _ = exact.search(queries, 10)
    found, scores = approximate.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, expected)])
    assert minimum_recall <= recall <= 1.0
    if method == "ivf":                              # visiting every list is exact search
        every_list = GlobalIndex(DIM, method="ivf", nlist=16, nprobe=16)
        every_list.add(database, ids)
        np.testing.assert_array_equal(every_list.search(queries, 10)[0], expected)
    for row, row_scores, query in zip(found, scores, queries):    # flat codes: exact scores
        valid = row >= 0
        np.testing.assert_allclose(row_scores[valid], exact.score(query, row[valid]), atol=1e-5)


def test_ivf_training_errors_and_explicit_training():
    rng = np.random.default_rng(2)
    index = GlobalIndex(DIM, method="ivf", nlist=64)
    index.add(rng.standard_normal((20, DIM)), np.arange(20))
    with pytest.raises(ValueError, match="at least nlist=64"):
        index.train()
    assert not index.is_trained and len(index) == 20
    index.add(rng.standard_normal((80, DIM)), np.arange(20, 100))
    index.train()                                   # explicit training with few vectors per list
    assert index.is_trained
    found, _ = index.search(rng.standard_normal(DIM), 3)
    assert found.size <= 3


def test_bad_input_leaves_index_unchanged(data):
    database, ids, queries = data
    index = GlobalIndex(DIM)
    index.add(database[:50], ids[:50])
    before = (index.image_ids.copy(), index.vectors.copy())
    bad_rows = database[50:60].copy()
    bad_rows[3, 2] = np.inf
    cases = [
        (ValueError, "dimensionality", lambda: index.add(database[50:60, :-1], ids[50:60])),
        (ValueError, "NaN or inf", lambda: index.add(bad_rows, ids[50:60])),
        (ValueError, "duplicate", lambda: index.add(database[50:52], [ids[50], ids[50]])),
        (ValueError, "already in the index", lambda: index.add(database[50:52], ids[49:51])),
        (ValueError, "expected 10 ids", lambda: index.add(database[50:60], ids[50:59])),
        (ValueError, "zero vector", lambda: index.add(np.zeros((1, DIM)), ids[50:51])),
        (KeyError, "unknown", lambda: index.remove([ids[0], ids[60]])),
        (ValueError, "duplicate", lambda: index.remove([ids[0], ids[0]])),
        (KeyError, "unknown", lambda: index.score(queries[0], [ids[99]])),
        (ValueError, "dimensionality", lambda: index.search(queries[:, :3], 5)),
        (ValueError, "NaN", lambda: index.search(np.full(DIM, np.nan), 5)),
        (ValueError, "positive integer", lambda: index.search(queries[0], 0)),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
        np.testing.assert_array_equal(index.image_ids, before[0])
        np.testing.assert_array_equal(index.vectors, before[1])
    with pytest.raises(ValueError, match="method"):
        GlobalIndex(DIM, method="lsh")


def test_empty_index_and_unnormalized_mode(data):
    database, ids, queries = data
    index = GlobalIndex(DIM)
    found, scores = index.search(queries[0], 5)
    assert found.shape == (0,) and scores.shape == (0,)
    assert index.search(queries, 5)[0].shape == (12, 0)
    raw = GlobalIndex(DIM, normalize=False)
    raw.add(database, ids)
    found, scores = raw.search(queries[:2], 3)
    expected = queries[:2] @ database.T
    np.testing.assert_allclose(scores, np.sort(expected, axis=1)[:, ::-1][:, :3], rtol=1e-5)


@pytest.mark.parametrize("method, options", [("exact", {}), ("ivf", {"nlist": 8}),
                                             ("hnsw", {}), ("ivf", {"nlist": 64})])
def test_save_load_identical(tmp_path, data, method, options):
    database, ids, queries = data
    index = GlobalIndex(DIM, method=method, nprobe=3, **options)
    index.add(database, ids)
    index.remove(ids[:7])
    expected = index.search(queries, 8)
    index.save(tmp_path / "global")
    loaded = GlobalIndex.load(tmp_path / "global")
    assert loaded.params == index.params and loaded.is_trained == index.is_trained
    np.testing.assert_array_equal(loaded.image_ids, index.image_ids)
    np.testing.assert_array_equal(loaded.vectors, index.vectors)
    found = loaded.search(queries, 8)
    np.testing.assert_array_equal(found[0], expected[0])
    np.testing.assert_array_equal(found[1], expected[1])
    manifest = json.loads((current_version(tmp_path / "global") / "manifest.json").read_text())
    assert manifest["params"]["method"] == method and manifest["counts"]["images"] == 293
    loaded.add(database[:7], ids[:7])               # a loaded index stays usable
    assert len(loaded) == 300


def test_corrupt_directory_is_refused(tmp_path, data):
    database, ids, _ = data
    index = GlobalIndex(DIM, method="ivf", nlist=4)
    index.add(database, ids)
    index.save(tmp_path / "global")
    vectors = current_version(tmp_path / "global") / "vectors.npy"
    content = bytearray(vectors.read_bytes())
    content[-5] ^= 0xFF
    vectors.write_bytes(bytes(content))
    with pytest.raises(IndexFormatError, match="checksum"):
        GlobalIndex.load(tmp_path / "global")
    index.save(tmp_path / "global")                 # overwrite repairs it
    manifest_path = current_version(tmp_path / "global") / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["counts"]["images"] = 12
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="mismatch"):
        GlobalIndex.load(tmp_path / "global")
    manifest_path.write_text("{not json")
    with pytest.raises(IndexFormatError, match="corrupt"):
        GlobalIndex.load(tmp_path / "global")
