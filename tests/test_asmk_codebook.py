"""Codebook: k-means training, exact quantization, persistence/corruption, asmk interop."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from asmk_index import codebook as codebook_module
from asmk_index.codebook import Codebook, nearest_centroids
from asmk_index.interop import codebook_from_asmk_state
from asmk_index.persistence import IndexFormatError


@pytest.fixture(scope="module")
def blobs():
    """2000 points around 16 well separated centres in 24-d."""
    rng = np.random.default_rng(0)
    centres = 10 * rng.standard_normal((16, 24)).astype(np.float32)
    labels = rng.integers(0, 16, 2000)
    points = centres[labels] + 0.1 * rng.standard_normal((2000, 24)).astype(np.float32)
    return centres, points.astype(np.float32)


def brute_force_nearest(points, centroids, k):
    distances = ((points[:, None, :].astype(np.float64) - centroids[None]) ** 2).sum(-1)
    return np.argsort(distances, axis=1, kind="stable")[:, :k]


def test_train_recovers_clusters(blobs):
    centres, points = blobs
    codebook = Codebook.train(points, 16, seed=3)
    assert codebook.size == 16 and codebook.dim == 24
    assert codebook.centroids.dtype == np.float32 and not codebook.centroids.flags.writeable
    assignment = codebook.quantize(points)[:, 0]

    def inertia(centroids, words):
        return ((points - centroids[words]) ** 2).sum(1).mean()

    sampled = Codebook.from_centroids(points[np.random.default_rng(3).choice(2000, 16, False)])
    assert inertia(codebook.centroids, assignment) < inertia(sampled.centroids,
                                                            sampled.quantize(points)[:, 0])
    for word in np.unique(assignment):  # a Lloyd fixed point: centroids are their cluster means
        np.testing.assert_allclose(codebook.centroids[word],
                                   points[assignment == word].mean(0), atol=0.05)
    again = Codebook.train(points, 16, seed=3)
    assert again.hash == codebook.hash  # deterministic given the seed


def test_train_subsamples_large_inputs(blobs):
    _, points = blobs
    codebook = Codebook.train(points, 8, seed=1, max_points_per_centroid=20, niter=5)
    assert codebook.size == 8
    assert Codebook.train(points, 8, seed=1, max_points_per_centroid=20, niter=5).hash == codebook.hash


def test_train_rejects_bad_input(blobs):
    _, points = blobs
    with pytest.raises(ValueError, match="at least as many"):
        Codebook.train(points[:10], 16)
    bad = points.copy()
    bad[4, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        Codebook.train(bad, 4)
    with pytest.raises(ValueError):
        Codebook.train(points[:, 0], 4)
    with pytest.raises(ValueError):
        Codebook.train(points, 0)


def test_quantize_is_exact_nearest(blobs):
    _, points = blobs
    rng = np.random.default_rng(2)
    codebook = Codebook.from_centroids(rng.standard_normal((50, 24)))
    words = codebook.quantize(points[:300], 4)
    assert words.shape == (300, 4) and words.dtype == np.int64
    np.testing.assert_array_equal(words, brute_force_nearest(points[:300], codebook.centroids, 4))
    np.testing.assert_array_equal(codebook.quantize(points[:300])[:, 0], words[:, 0])
    assert codebook.quantize(np.zeros((0, 24), np.float32), 2).shape == (0, 2)


@pytest.mark.parametrize("k", [1, 5])
def test_nearest_centroids_equals_faiss_across_blocks(monkeypatch, k):
    """The blocked BLAS + compiled ranking path gives faiss IndexFlatL2's words, also when the
    descriptors and centroids span several blocks (small blocks forced here)."""
    import faiss
    rng = np.random.default_rng(k)
    centroids = rng.standard_normal((1100, 32)).astype(np.float32)
    points = rng.standard_normal((700, 32)).astype(np.float32)
    flat = faiss.IndexFlatL2(32)
    flat.add(centroids)
    expected = flat.search(points, k)[1]
    np.testing.assert_array_equal(nearest_centroids(points, centroids, k), expected)
    monkeypatch.setattr(codebook_module, "NEAREST_ROWS", 128)
    monkeypatch.setattr(codebook_module, "NEAREST_BUFFER", 128 * 300)
    monkeypatch.setattr(codebook_module, "NEAREST_MIN_COLUMNS", 100)
    np.testing.assert_array_equal(nearest_centroids(points, centroids, k), expected)
    np.testing.assert_array_equal(Codebook.from_centroids(centroids).quantize(points, k), expected)
    # large single-assignment batches take faiss itself: the same words
    monkeypatch.setattr(codebook_module, "FAISS_MIN_ROWS", 500)
    np.testing.assert_array_equal(Codebook.from_centroids(centroids).quantize(points, k), expected)


def test_nearest_centroids_ties_and_edges():
    # duplicated centroids tie exactly: the lower id comes first, each id once
    centroids = np.repeat(np.eye(3, dtype=np.float32), 2, axis=0)  # ids 2j and 2j+1 equal
    points = np.array([[1, 0, 0], [0, 0.9, 0.1]], dtype=np.float32)
    np.testing.assert_array_equal(nearest_centroids(points, centroids, 3), [[0, 1, 2], [2, 3, 4]])
    # k equal to the codebook size ranks every centroid
    words = nearest_centroids(points, centroids, 6)
    assert sorted(words[0].tolist()) == list(range(6))
    assert nearest_centroids(points[:0], centroids, 2).shape == (0, 2)
    with pytest.raises(ValueError, match="k must be"):
        nearest_centroids(points, centroids, 7)


def test_quantize_rejects_bad_input(blobs):
    _, points = blobs
    codebook = Codebook.from_centroids(points[:10])
    with pytest.raises(ValueError, match="dimensionality"):
        codebook.quantize(points[:, :20])
    with pytest.raises(ValueError):
        codebook.quantize(points, 11)
    with pytest.raises(ValueError, match="NaN or inf"):
        codebook.quantize(np.full((2, 24), np.inf, np.float32))


def test_approximate_quantizer_opt_in(blobs):
    centres, points = blobs
    codebook = Codebook.from_centroids(centres)
    exact = codebook.quantize(points, 1)
    codebook.use_approximate_quantizer("hnsw")
    assert np.mean(codebook.quantize(points, 1) == exact) > 0.95  # well separated: same words
    codebook.use_approximate_quantizer(None)
    np.testing.assert_array_equal(codebook.quantize(points, 1), exact)
    with pytest.raises(ValueError):
        codebook.use_approximate_quantizer("pq")


def test_from_centroids_copies_and_validates():
    centroids = np.arange(12, dtype=np.float64).reshape(4, 3)
    codebook = Codebook.from_centroids(centroids)
    centroids[0, 0] = 100
    assert codebook.centroids[0, 0] == 0 and codebook.centroids.dtype == np.float32
    with pytest.raises(ValueError):
        Codebook.from_centroids(np.zeros((0, 3)))
    with pytest.raises(ValueError):
        Codebook.from_centroids(np.full((2, 3), np.nan))


def test_save_load_and_state_dict(tmp_path, blobs):
    _, points = blobs
    codebook = Codebook.from_centroids(points[:20])
    codebook.save(tmp_path / "cb.npz")
    loaded = Codebook.load(tmp_path / "cb.npz")
    assert loaded.hash == codebook.hash
    np.testing.assert_array_equal(loaded.centroids, codebook.centroids)
    restored = Codebook.initialize_from_state(codebook.state_dict())
    assert restored.hash == codebook.hash
    with pytest.raises(ValueError):
        Codebook.initialize_from_state({"type": "IVF"})


def test_corrupt_codebook_files(tmp_path, blobs):
    _, points = blobs
    path = tmp_path / "cb.npz"
    Codebook.from_centroids(points[:20]).save(path)
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(IndexFormatError, match="corrupt"):
        Codebook.load(path)
    path.write_bytes(b"not a zip file at all")
    with pytest.raises(IndexFormatError, match="corrupt"):
        Codebook.load(path)
    # a valid npz of another kind
    np.savez(path, centroids=points[:20])
    with pytest.raises(IndexFormatError):
        Codebook.load(path)
    with pytest.raises(FileNotFoundError):
        Codebook.load(tmp_path / "missing.npz")


def test_interop_with_asmk_codebook_state(tmp_path, blobs):
    from asmk import codebook as asmk_codebook
    from asmk import index as asmk_index_factory
    centres, points = blobs
    reference = asmk_codebook.Codebook(asmk_index_factory.initialize_index(None), size=16)
    reference.train(points)
    state = reference.state_dict()
    codebook = codebook_from_asmk_state(state)
    np.testing.assert_array_equal(codebook.centroids, reference.centroids)
    _, reference_words = reference.quantize(points[:200], multiple_assignment=3)[:2]
    np.testing.assert_array_equal(codebook.quantize(points[:200], 3), reference_words)
    path = tmp_path / "codebook.pkl"
    with open(path, "wb") as handle:
        pickle.dump(state, handle)
    assert codebook_from_asmk_state(path).hash == codebook.hash
    assert codebook_from_asmk_state(str(path)).hash == codebook.hash


def test_interop_rejects_other_states(tmp_path):
    with pytest.raises(ValueError, match="wrong type"):
        codebook_from_asmk_state({"type": "IVF", "params": {}, "state": {}})
    with pytest.raises(ValueError, match="no centroids"):
        codebook_from_asmk_state({"type": "Codebook", "params": {"size": 4},
                                  "state": {"centroids": None}})
    with pytest.raises(ValueError, match="4 words"):
        codebook_from_asmk_state({"type": "Codebook", "params": {"size": 4},
                                  "state": {"centroids": np.zeros((3, 8), np.float32)}})
    with pytest.raises(ValueError, match="dict"):
        codebook_from_asmk_state([1, 2])
    path = tmp_path / "garbage.pkl"
    path.write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="not a readable"):
        codebook_from_asmk_state(path)
    with pytest.raises(FileNotFoundError):
        codebook_from_asmk_state(tmp_path / "missing.pkl")
