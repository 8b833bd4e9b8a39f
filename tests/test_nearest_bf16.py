"""Exact nearest centroids with the bfloat16 prefilter (asmk_index/_nearest_bf16.c).

The words must be the exact k nearest (squared L2 in double precision, ties to the lower id)
whatever the prefilter's rounding: checked against a float64 brute force on data made to defeat a
careless bound (centroids closer together than bfloat16 can tell apart, duplicates, exact
midpoints, huge and tiny magnitudes). The portable kernel runs everywhere; the AMX kernel where
the CPU has it, and elsewhere the tests check that it is refused and never chosen.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import asmk_index
from asmk_index import _kernels
from asmk_index.codebook import Bf16Centroids, Codebook, amx_usable, nearest_centroids_bf16

AMX = amx_usable()
KERNELS = [False, True] if AMX else [False]


def exact_nearest(points, centroids, k, chunk=64):
    """(N, k) ids of the k smallest float64 squared distances, ties to the lower id."""
    words = np.empty((points.shape[0], k), dtype=np.int64)
    for start in range(0, points.shape[0], chunk):
        block = points[start:start + chunk, None, :].astype(np.float64)
        distances = ((block - centroids[None].astype(np.float64)) ** 2).sum(-1)
        words[start:start + chunk] = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return words


def bf16_round(values):
    """float32 -> nearest bfloat16 (ties to even), as float32."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.astype(np.uint32).view(np.float32)


def adversarial_set(dim, size, n, seed):
    """Centroids and descriptors where bfloat16 alone would pick wrong words."""
    rng = np.random.default_rng(seed)
    centroids = rng.standard_normal((size, dim)).astype(np.float32)
    centroids[0] = bf16_round(centroids[0])                         # a bfloat16 value, so that
    centroids[1] = centroids[0]                                     # exact duplicate
    step = np.abs(centroids[0]) * 2.0 ** -12                         # ... this, far below half
                                                                     # a bfloat16 step (2^-9),
    centroids[2] = centroids[0] + step.astype(np.float32)            # keeps its bfloat16 values
    centroids[3] = centroids[0] - step.astype(np.float32)
    np.testing.assert_array_equal(bf16_round(centroids[2]), bf16_round(centroids[0]))
    labels = rng.integers(0, size, n)
    points = (centroids[labels] + 0.3 * rng.standard_normal((n, dim))).astype(np.float32)
    points[:8] = centroids[0] + rng.standard_normal((8, dim)).astype(np.float32) * 1e-3
    points[8:12] = centroids[2]                                      # exactly on a centroid
    middle = np.round(rng.standard_normal(dim) * 64) / 64            # exact float32 sums:
    offset = rng.choice([-1.0, 1.0], dim) / 64
    centroids[5], centroids[6] = middle + offset, middle - offset
    points[12] = middle                                              # an exact tie of 5 and 6
    points[13] = 1e-20 * points[13]                                  # tiny
    return centroids, np.ascontiguousarray(points)


@pytest.mark.parametrize("use_amx", KERNELS)
@pytest.mark.parametrize("dim,size,n,k", [
    (128, 300, 333, 1), (128, 300, 333, 5),  # the usual shapes; blocks of 64 rows and a rest
    (40, 77, 130, 3), (7, 33, 65, 2), (256, 64, 70, 2),  # dimensions padded to steps of 32
    (128, 1000, 200, 10), (24, 200, 90, 20),  # k above the 16 lanes: no lane bound
    (16, 4200, 100, 3),  # the AMX path: seed centroids in two passes (256 for k = 1, 1024
    (40, 700, 130, 1),  # for k > 1), the rest in one (here with padded dimensions and a
    (32, 1300, 150, 20)])  # partial last row group); k above the lanes past the seed
def test_equals_exact_brute_force(use_amx, dim, size, n, k):
    centroids, points = adversarial_set(dim, size, n, seed=dim + size + k)
    # the set's exact tie really is one
    np.testing.assert_array_equal(((points[12] - centroids[5]) ** 2).sum(),
                                  ((points[12] - centroids[6]) ** 2).sum())
    packed = Bf16Centroids.pack(centroids)
    words = nearest_centroids_bf16(points, packed, k, use_amx=use_amx)
    assert words.shape == (n, k) and words.dtype == np.int64
    np.testing.assert_array_equal(words, exact_nearest(points, centroids, k))
    # the duplicates and the sub-bfloat16 neighbours are told apart and ordered exactly
    assert words[8, 0] == 2 and words[0, 0] in (0, 1, 2, 3)
    assert words[12, :2].tolist() == [5, 6][:k]  # equal distances: the lower id first


@pytest.mark.parametrize("use_amx", KERNELS)
@pytest.mark.parametrize("k", [1, 5])
def test_adversarial_centroids_past_the_seed(use_amx, k):
    """The same hard cases with the centroid order reversed, so that the duplicates, the
    sub-bfloat16 neighbours and the exact tie lie past the AMX path's seed centroids (256 for
    k = 1, 1024 for k > 1), where each tile block is scanned once."""
    centroids, points = adversarial_set(128, 1300, 333, seed=5 + k)
    centroids = np.ascontiguousarray(centroids[::-1])
    words = nearest_centroids_bf16(points, Bf16Centroids.pack(centroids), k, use_amx=use_amx)
    np.testing.assert_array_equal(words, exact_nearest(points, centroids, k))
    assert words[8, 0] == 1297                                # old id 2, exactly on it
    assert words[12, :2].tolist() == [1293, 1294][:k]         # the tie, lower id first


def test_kernels_agree_and_the_bound_leaves_few_candidates():
    """On clustered data most centroids are ruled out by the bound: about one candidate per
    descriptor and word asked for; the AMX kernel (where present) gives the portable words."""
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((512, 64)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    points = centres[rng.integers(0, 512, 2000)] + 0.05 * rng.standard_normal((2000, 64))
    points = np.ascontiguousarray(points / np.linalg.norm(points, axis=1, keepdims=True),
                                  dtype=np.float32)
    packed = Bf16Centroids.pack(centres)
    for k in (1, 5):
        results = [_kernels.bf16_nearest(points, packed.centroids, packed.packed,
                                         packed.half_norms, packed.stats, k, use_amx)
                   for use_amx in KERNELS]
        for words, exact_rows, candidates in results:
            np.testing.assert_array_equal(words, exact_nearest(points, centres, k))
            assert exact_rows == 0
            assert k <= candidates / len(points) < k + 2
        np.testing.assert_array_equal(results[0][0], results[-1][0])


@pytest.mark.parametrize("use_amx", KERNELS)
@pytest.mark.parametrize("first", [20, 1100])  # within the seed centroids, and past them
def test_rows_with_too_many_near_equal_centroids_are_ranked_exactly(use_amx, first):
    """200 copies of one centroid (more than a row keeps as candidates) and a row whose error
    bound overflows: ranked over every centroid, still exact."""
    rng = np.random.default_rng(3)
    centroids = rng.standard_normal((first + 240, 16)).astype(np.float32)
    centroids[first:first + 200] = centroids[first]
    points = np.ascontiguousarray(np.vstack([centroids[first] + 1e-3,
                                             rng.standard_normal((5, 16)),
                                             np.full((1, 16), 1e38)]), dtype=np.float32)
    packed = Bf16Centroids.pack(centroids)
    words, exact_rows, _ = _kernels.bf16_nearest(points, packed.centroids, packed.packed,
                                                 packed.half_norms, packed.stats, 3, use_amx)
    np.testing.assert_array_equal(words, exact_nearest(points, centroids, 3))
    assert words[0].tolist() == [first, first + 1, first + 2]
    assert exact_rows >= 2


def test_thread_count_does_not_change_words():
    rng = np.random.default_rng(11)
    centroids = rng.standard_normal((2048, 32)).astype(np.float32)
    points = rng.standard_normal((1100, 32)).astype(np.float32)  # 2 threads' worth of work
    packed = Bf16Centroids.pack(centroids)
    previous = asmk_index.get_num_threads()
    try:
        asmk_index.set_num_threads(1)
        one = nearest_centroids_bf16(points, packed, 4, use_amx=AMX)
        asmk_index.set_num_threads(4)
        four = nearest_centroids_bf16(points, packed, 4, use_amx=AMX)
    finally:
        asmk_index.set_num_threads(previous)
    np.testing.assert_array_equal(one, four)
    np.testing.assert_array_equal(one, exact_nearest(points, centroids, 4))


def test_codebook_quantizer_paths():
    """"auto" takes AMX exactly where it is usable; every exact path gives the same words (on
    data without float32 near-ties, which the BLAS path cannot resolve)."""
    rng = np.random.default_rng(5)
    centroids = rng.standard_normal((100, 24)).astype(np.float32)
    points = rng.standard_normal((400, 24)).astype(np.float32)
    codebook = Codebook.from_centroids(centroids)
    assert codebook.quantizer == ("amx-bf16" if AMX else "blas")  # no GPU in the tests' faiss
    expected = exact_nearest(points, centroids, 5)
    np.testing.assert_array_equal(codebook.quantize(points, 5), expected)
    codebook.use_quantizer("blas")
    assert codebook.quantizer == "blas"
    np.testing.assert_array_equal(codebook.quantize(points, 5), expected)
    if AMX:
        codebook.use_quantizer("amx-bf16")
        np.testing.assert_array_equal(codebook.quantize(points, 1), expected[:, :1])
    else:
        with pytest.raises(ValueError, match="AMX"):
            codebook.use_quantizer("amx-bf16")
        with pytest.raises(RuntimeError, match="AMX is not usable"):
            nearest_centroids_bf16(points, Bf16Centroids.pack(centroids), 1, use_amx=True)
    with pytest.raises(ValueError, match="unknown quantizer"):
        codebook.use_quantizer("int4")


def test_bad_arguments():
    rng = np.random.default_rng(1)
    centroids = rng.standard_normal((40, 8)).astype(np.float32)
    packed = Bf16Centroids.pack(centroids)
    points = rng.standard_normal((10, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="k must be"):
        nearest_centroids_bf16(points, packed, 41, use_amx=False)
    with pytest.raises(ValueError, match="dimensions"):
        nearest_centroids_bf16(points[:, :6].copy(), packed, 1, use_amx=False)
    other = Bf16Centroids.pack(centroids[:20])
    with pytest.raises(ValueError, match="do not match"):
        _kernels.bf16_nearest(points, centroids, other.packed, other.half_norms, other.stats,
                              1, False)
    assert nearest_centroids_bf16(points[:0], packed, 2, use_amx=False).shape == (0, 2)


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 300), dim=st.integers(1, 70), n=st.integers(1, 150),
       k=st.integers(1, 20), scale=st.sampled_from([1e-12, 1e-3, 1.0, 1e3, 1e15]),
       duplicates=st.integers(0, 40), seed=st.integers(0, 2 ** 32 - 1))
def test_property_words_are_the_exact_nearest(size, dim, n, k, scale, duplicates, seed):
    """Any shapes, scales and runs of duplicated or nearly equal centroids: both kernels give the
    float64 brute force's words."""
    rng = np.random.default_rng(seed)
    k = min(k, size)
    centroids = (scale * rng.standard_normal((size, dim))).astype(np.float32)
    copies = rng.integers(0, size, (duplicates, 2))
    centroids[copies[:, 0]] = centroids[copies[:, 1]] * np.float32(1 + 1e-6 * rng.random())
    labels = rng.integers(0, size, n)
    points = (centroids[labels] + scale * rng.random() * rng.standard_normal((n, dim)))
    points = np.ascontiguousarray(points, dtype=np.float32)
    packed = Bf16Centroids.pack(centroids)
    expected = exact_nearest(points, centroids, k)
    for use_amx in KERNELS:
        np.testing.assert_array_equal(nearest_centroids_bf16(points, packed, k, use_amx=use_amx),
                                      expected)
