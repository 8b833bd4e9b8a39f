"""LocalFeatureStore: grouping by image and word, remove, save/load memory-mapped, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest

from asmk_index.local_store import (LocalFeatureStore, binary_signatures, check_geometry,
                                    signature_bytes)
from asmk_index.persistence import IndexFormatError, current_version, write_arrays

DIM = 16


def features(rng, ids_per_feature):
    n = len(ids_per_feature)
    words = rng.integers(0, 50, n)
    signatures = rng.integers(0, 256, (n, signature_bytes(DIM)), dtype=np.uint8)
    geometry = rng.uniform(0, 300, (n, 3)).astype(np.float32)
    return np.asarray(ids_per_feature), words, signatures, geometry


def expected_rows(ids, words, image):
    """Rows of ``image`` in the stored order: by word, ties in input order."""
    rows = np.flatnonzero(ids == image)
    return rows[np.argsort(words[rows], kind="stable")]


def assert_image(store, image, ids, words, signatures, geometry):
    rows = expected_rows(ids, words, image)
    stored = store.get(image)
    np.testing.assert_array_equal(stored.words, words[rows])
    np.testing.assert_array_equal(stored.signatures, signatures[rows])
    np.testing.assert_array_equal(stored.xy, geometry[rows, :2])
    np.testing.assert_array_equal(stored.scale, geometry[rows, 2])


def test_binary_signatures_are_packed_residual_signs():
    rng = np.random.default_rng(0)
    descriptors = rng.standard_normal((5, 12)).astype(np.float32)
    centroids = rng.standard_normal((3, 12)).astype(np.float32)
    words = np.array([[0, 2], [1, 0], [2, 1], [0, 1], [1, 2]])
    signatures = binary_signatures(descriptors, words, centroids)
    assert signatures.shape == (5, 2, 2) and signatures.dtype == np.uint8
    for i in range(5):
        for a in range(2):
            bits = np.unpackbits(signatures[i, a], bitorder="little")[:12]
            np.testing.assert_array_equal(bits, descriptors[i] - centroids[words[i, a]] > 0)
    np.testing.assert_array_equal(binary_signatures(descriptors, words[:, 0], centroids),
                                  signatures[:, 0])


def test_interleaved_images_are_grouped_and_sorted_by_word():
    rng = np.random.default_rng(1)
    ids, words, signatures, geometry = features(rng, [7, 3, 7, 9, 3, 7, 9, 9, 3, 7])
    store = LocalFeatureStore(DIM)
    store.add(ids, words, signatures, geometry)
    assert len(store) == 3 and store.n_features == 10
    np.testing.assert_array_equal(store.image_ids, [7, 3, 9])            # first appearance
    np.testing.assert_array_equal(store.counts([3, 7, 9, 100]), [3, 4, 3, 0])
    for image in (3, 7, 9):
        assert_image(store, image, ids, words, signatures, geometry)
        assert np.all(np.diff(store.get(image).words) >= 0)
    with pytest.raises(KeyError, match="100"):
        store.get(100)


def test_add_remove_save_load_memory_mapped(tmp_path):
    rng = np.random.default_rng(2)
    first = features(rng, np.repeat([1, 2, 3], [5, 0, 6])[:11])
    second = features(rng, np.repeat([4, 5], [4, 3]))
    store = LocalFeatureStore(DIM)
    store.add(*first)
    store.add(*second)
    store.remove([3, 4])
    np.testing.assert_array_equal(store.image_ids, [1, 5])
    store.save(tmp_path / "store")
    loaded = LocalFeatureStore.load(tmp_path / "store")
    assert isinstance(loaded.get(1).words.base, np.memmap) or isinstance(loaded.get(1).words,
                                                                          np.memmap)
    assert loaded.memory_bytes() < store.memory_bytes()
    np.testing.assert_array_equal(loaded.image_ids, [1, 5])
    assert_image(loaded, 1, *first)
    assert_image(loaded, 5, *second)
    # append and remove on the loaded (memory-mapped) store, then save again
    third = features(rng, np.repeat([6], 4))
    loaded.add(*third)
    loaded.remove([1])
    loaded.save(tmp_path / "store2")
    again = LocalFeatureStore.load(tmp_path / "store2", mmap=False)
    np.testing.assert_array_equal(again.image_ids, [5, 6])
    assert_image(again, 5, *second)
    assert_image(again, 6, *third)
    again.remove([5, 6])                                  # empty store saves and loads
    again.save(tmp_path / "empty")
    empty = LocalFeatureStore.load(tmp_path / "empty")
    assert len(empty) == 0 and empty.n_features == 0
    np.testing.assert_array_equal(empty.counts([5, 6]), [0, 0])
    assert not empty.contains([5]).any()


def test_corrupt_store_is_refused(tmp_path):
    rng = np.random.default_rng(3)
    store = LocalFeatureStore(DIM)
    store.add(*features(rng, [1, 1, 2]))
    store.save(tmp_path / "store")
    manifest_path = current_version(tmp_path / "store") / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["counts"]["features"] = 4
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="manifest"):
        LocalFeatureStore.load(tmp_path / "store", verify=False)
    # a plain (unversioned) directory whose offsets do not cover the features
    arrays = store.arrays()
    arrays["offsets"] = arrays["offsets"] - np.array([0, 0, 1])
    (tmp_path / "plain").mkdir()
    write_arrays(tmp_path / "plain", kind="local_feature_store", params={"dim": DIM},
                 counts={"images": 2, "features": 3}, arrays=arrays)
    with pytest.raises(IndexFormatError, match="offsets"):
        LocalFeatureStore.load(tmp_path / "plain")
    store.save(tmp_path / "store")
    with open(current_version(tmp_path / "store") / "xy.npy", "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x00\xc0\x7f")
    with pytest.raises(IndexFormatError, match="checksum"):
        LocalFeatureStore.load(tmp_path / "store")


def test_bad_input_leaves_the_store_unchanged():
    rng = np.random.default_rng(4)
    ids, words, signatures, geometry = features(rng, [1, 1, 2])
    store = LocalFeatureStore(DIM)
    store.add(ids, words, signatures, geometry)
    with pytest.raises(ValueError, match="already"):
        store.add(*features(rng, [2, 3]))
    with pytest.raises(ValueError, match="signatures"):
        store.add(np.array([5]), np.array([1]), np.zeros((1, 3), np.uint8), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="local_geometry"):
        store.add(np.array([5]), np.array([1]), np.zeros((1, 2), np.uint8), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="NaN"):
        check_geometry(np.array([[1.0, np.nan, 1.0]]), 1)
    with pytest.raises(KeyError, match="without stored"):
        store.remove([1, 99])
    with pytest.raises(ValueError, match="duplicate"):
        store.remove([1, 1])
    np.testing.assert_array_equal(store.image_ids, [1, 2])
    assert_image(store, 1, ids, words, signatures, geometry)
