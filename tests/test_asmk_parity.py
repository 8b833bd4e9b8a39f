"""Parity with the reference ``asmk`` package (0.1.1) on the same centroids: identical aggregated
bits, identical rankings and scores within 1e-5, for binary/real vectors and idf on/off."""
from __future__ import annotations

import numpy as np
import pytest

from asmk_index.asmk import AsmkIndex
from asmk_index.codebook import Codebook
from asmk_index.kernel import aggregate
from test_asmk_index import clustered_images, perturbed

asmk_method = pytest.importorskip("asmk.asmk_method")
from asmk import codebook as asmk_codebook  # noqa: E402
from asmk import index as asmk_index_factory  # noqa: E402
from asmk import kernel as asmk_kernel  # noqa: E402

N_IMAGES = 200
PER_IMAGE = 50
DIM = 64
WORDS = 128
TOP = 100
TOLERANCE = 1e-5  # on scores
TIE = 1e-6  # scores closer than this may swap places (both engines differ by ~1e-8)


@pytest.fixture(scope="module")
def data():
    descriptors, image, _ = clustered_images(N_IMAGES, PER_IMAGE, DIM, seed=7, n_patterns=60,
                                             patterns_per_image=8)
    codebook = Codebook.train(descriptors, WORDS, seed=0)
    queries = [perturbed(descriptors[image == q][::2], seed=q, scale=0.05) for q in range(0, 200, 25)]
    return codebook, descriptors, image, queries


def reference_codebook(codebook: Codebook):
    reference = asmk_codebook.Codebook(asmk_index_factory.initialize_index(None), size=codebook.size)
    reference.index(np.array(codebook.centroids))
    return reference


def reference_method(codebook, descriptors, image, *, binary, use_idf, multiple_assignment=1,
                     query_multiple_assignment=5, alpha=3.0, similarity_threshold=0.0):
    params = {"index": {"gpu_id": None}, "train_codebook": {"codebook": {"size": codebook.size}},
              "build_ivf": {"kernel": {"binary": binary}, "ivf": {"use_idf": use_idf},
                            "quantize": {"multiple_assignment": multiple_assignment},
                            "aggregate": {}},
              "query_ivf": {"quantize": {"multiple_assignment": query_multiple_assignment},
                            "aggregate": {}, "search": {"topk": None},
                            "similarity": {"similarity_threshold": similarity_threshold,
                                           "alpha": alpha}}}
    method = asmk_method.ASMKMethod(params, {}, codebook=reference_codebook(codebook))
    return method.build_ivf(descriptors, image.copy())


def assert_same_results(ours: AsmkIndex, reference, queries, user_ids):
    for query in queries:
        _, _, ranks, scores = reference.query_ivf(query, np.zeros(query.shape[0], dtype=np.int64))
        reference_scores = np.zeros(N_IMAGES)
        reference_scores[ranks[0]] = scores[0]
        ids, our_scores = ours.search(query, TOP)
        expected = reference_scores[np.searchsorted(user_ids, ids)]
        np.testing.assert_allclose(our_scores, expected, atol=TOLERANCE, rtol=0)
        # identical top-100: same ids in the same order wherever scores are not (near-)tied
        reference_order = np.argsort(-reference_scores, kind="stable")[: TOP + 1]
        sorted_scores = reference_scores[reference_order]
        np.testing.assert_allclose(our_scores, sorted_scores[:TOP], atol=TOLERANCE, rtol=0)
        gaps = np.abs(np.diff(sorted_scores)) > TIE  # gaps[i]: between i and i + 1
        distinct = gaps[:TOP].copy()
        distinct[1:] &= gaps[:TOP - 1]
        assert distinct.mean() > 0.6  # the data gives mostly distinct scores
        np.testing.assert_array_equal(ids[distinct], user_ids[reference_order[:TOP]][distinct])
        assert our_scores[0] > 0


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "real"])
@pytest.mark.parametrize("use_idf", [False, True], ids=["tf", "idf"])
def test_search_matches_reference(data, binary, use_idf):
    codebook, descriptors, image, queries = data
    reference = reference_method(codebook, descriptors, image, binary=binary, use_idf=use_idf)
    user_ids = 10 * np.arange(N_IMAGES) + 3  # sorted, so searchsorted maps back to 0..n-1
    ours = AsmkIndex(codebook, binary=binary, use_idf=use_idf)
    ours.add(descriptors, user_ids[image])
    assert_same_results(ours, reference, queries, user_ids)


def test_multiple_assignment_and_kernel_parameters_match_reference(data):
    codebook, descriptors, image, queries = data
    settings = dict(multiple_assignment=2, query_multiple_assignment=3, alpha=2.0,
                    similarity_threshold=0.1)
    reference = reference_method(codebook, descriptors, image, binary=True, use_idf=True,
                                 **settings)
    ours = AsmkIndex(codebook, binary=True, use_idf=True, **settings)
    ours.add(descriptors, image)
    assert_same_results(ours, reference, queries, np.arange(N_IMAGES))


@pytest.mark.parametrize("interleaved", [False, True], ids=["grouped", "interleaved"])
@pytest.mark.parametrize("assignments", [1, 5])
def test_aggregated_bits_match_reference(data, assignments, interleaved):
    """Interleaved: rows of different images mixed; ours groups them by image keeping their order,
    the reference gets them grouped (it needs each image contiguous)."""
    codebook, descriptors, image, _ = data
    rows = np.flatnonzero(image < 20)
    if interleaved:
        rows = np.random.default_rng(4).permutation(rows)
    words = codebook.quantize(descriptors[rows], assignments)
    ours = aggregate(descriptors[rows], words, image[rows], 20, codebook.centroids, binary=True)
    grouped = np.argsort(image[rows], kind="stable")
    reference_kernel = asmk_kernel.ASMKKernel(reference_codebook(codebook), binary=True)
    reference_codes, reference_words, reference_images = reference_kernel.aggregate(
        descriptors[rows][grouped], words[grouped], image[rows][grouped])
    np.testing.assert_array_equal(ours.word, reference_words)
    np.testing.assert_array_equal(ours.image, reference_images)
    our_bits = np.unpackbits(ours.vectors.astype(">u8").view(np.uint8), axis=1)[:, :DIM]
    reference_bits = np.unpackbits(reference_codes.astype(">u4").view(np.uint8), axis=1)[:, :DIM]
    np.testing.assert_array_equal(our_bits, reference_bits)


def test_memory_per_image_not_above_reference(data):
    codebook, descriptors, image, _ = data
    reference = reference_method(codebook, descriptors, image, binary=True, use_idf=False)
    ivf = reference.inverted_file
    reference_bytes = np.asarray(ivf.norm_factor).nbytes + sum(
        vecs.nbytes + ids.nbytes for vecs, ids in zip(ivf.ivf_vecs, ivf.ivf_image_ids)
        if vecs is not None)
    ours = AsmkIndex(codebook)
    ours.add(descriptors, image)
    assert ours.bytes_per_image() <= reference_bytes / N_IMAGES
