"""AsmkIndex behaviour: self-match, invariances, incremental add/remove, score() == search(),
persistence and corruption, and that every bad input leaves the index exactly as it was."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asmk_index.asmk import AsmkIndex
from asmk_index.codebook import Codebook
from asmk_index.persistence import IndexFormatError, current_version

DIM = 32
WORDS = 64


def clustered_images(n_images: int, per_image: int, dim: int = DIM, *, seed: int = 0,
                     n_patterns: int = 200, patterns_per_image: int = 6, noise: float = 0.15):
    """Synthetic local descriptors: each image draws from a few random unit 'patterns'.

    Returns (descriptors (n_images * per_image, dim) float32, image index (n,) int64, patterns).
    """
    rng = np.random.default_rng(seed)
    patterns = rng.standard_normal((n_patterns, dim)).astype(np.float32)
    patterns /= np.linalg.norm(patterns, axis=1, keepdims=True)
    chosen = rng.integers(0, n_patterns, (n_images, patterns_per_image))
    which = rng.integers(0, patterns_per_image, (n_images, per_image))
    centers = patterns[np.take_along_axis(chosen, which, axis=1).reshape(-1)]
    descriptors = centers + noise * rng.standard_normal(centers.shape).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    return descriptors.astype(np.float32), np.repeat(np.arange(n_images), per_image), patterns


def perturbed(descriptors: np.ndarray, seed: int, scale: float = 0.02) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (descriptors + scale * rng.standard_normal(descriptors.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def dataset():
    descriptors, image, _ = clustered_images(120, 40)
    ids = 1000 + 7 * image  # user ids are arbitrary integers
    codebook = Codebook.train(descriptors, WORDS, seed=0)
    return codebook, descriptors, ids


@pytest.fixture(params=[True, False], ids=["binary", "real"])
def built(request, dataset):
    codebook, descriptors, ids = dataset
    index = AsmkIndex(codebook, binary=request.param)
    index.add(descriptors, ids)
    return index, descriptors, ids


def snapshot(index: AsmkIndex, probe: np.ndarray):
    """Everything observable about an index, to compare before/after a failed call."""
    ids, scores = index.search(probe, 1000) if len(index) else (np.zeros(0), np.zeros(0))
    return (index.image_ids.tolist(), ids.tolist(), scores.tolist(), index.memory_bytes(),
            index.n_vectors, len(index._segments))


def scores_by_id(index: AsmkIndex, query: np.ndarray) -> dict:
    ids, scores = index.search(query, len(index))
    return dict(zip(ids.tolist(), scores.tolist()))


def test_self_match_scores_highest(built):
    index, descriptors, ids = built
    for image_id in np.unique(ids)[::10]:
        query = perturbed(descriptors[ids == image_id], seed=int(image_id))
        top_ids, top_scores = index.search(query, 5)
        assert top_ids[0] == image_id
        assert top_scores[0] > top_scores[1] and np.all(np.diff(top_scores) <= 0)


def test_search_returns_k_sorted_with_ties_by_lower_id(built):
    index, descriptors, ids = built
    query = descriptors[ids == ids[0]]
    top_ids, top_scores = index.search(query, len(index) + 50)
    assert top_ids.dtype == np.int64 and top_ids.shape == (len(index),)
    assert set(top_ids.tolist()) == set(np.unique(ids).tolist())
    for position in range(len(top_ids) - 1):
        assert (top_scores[position] > top_scores[position + 1]
                or (top_scores[position] == top_scores[position + 1]
                    and top_ids[position] < top_ids[position + 1]))
    assert np.isfinite(top_scores).all()


def test_score_equals_search_scores(built):
    index, descriptors, ids = built
    query = perturbed(descriptors[ids == ids[400]], seed=3)
    all_scores = scores_by_id(index, query)
    candidates = np.unique(ids)[[5, 0, 77, 3, 119, 5]]  # any order, repeats allowed
    scores = index.score(query, candidates)
    assert scores.tolist() == [all_scores[c] for c in candidates.tolist()]  # bit-identical


def test_descriptor_order_within_image_and_image_add_order_do_not_matter(dataset):
    codebook, descriptors, ids = dataset
    reference = AsmkIndex(codebook)
    reference.add(descriptors, ids)
    rng = np.random.default_rng(1)
    shuffled_order = rng.permutation(descriptors.shape[0])  # images interleaved, rows shuffled
    shuffled = AsmkIndex(codebook)
    shuffled.add(descriptors[shuffled_order], ids[shuffled_order])
    query = perturbed(descriptors[ids == ids[-1]], seed=5)
    expected = scores_by_id(reference, query)
    got = scores_by_id(shuffled, query)
    assert got.keys() == expected.keys()
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), rtol=1e-12)
    permuted_query = query[rng.permutation(query.shape[0])]
    np.testing.assert_allclose(reference.search(permuted_query, 20)[1],
                               reference.search(query, 20)[1], rtol=1e-12)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(splits=st.lists(st.integers(min_value=1, max_value=119), max_size=6, unique=True),
       use_idf=st.booleans(), binary=st.booleans())
def test_adding_in_several_calls_equals_one_call(dataset, splits, use_idf, binary):
    codebook, descriptors, ids = dataset
    one = AsmkIndex(codebook, use_idf=use_idf, binary=binary)
    one.add(descriptors, ids)
    several = AsmkIndex(codebook, use_idf=use_idf, binary=binary)
    image_bounds = [0] + sorted(splits) + [120]
    for start, stop in zip(image_bounds[:-1], image_bounds[1:]):
        rows = slice(start * 40, stop * 40)
        several.add(descriptors[rows], ids[rows])
    assert len(several._segments) <= 1 + int(np.log2(len(image_bounds))) + 1
    assert several.image_ids.tolist() == one.image_ids.tolist()
    query = perturbed(descriptors[ids == ids[40 * 17]], seed=9)
    one_ids, one_scores = one.search(query, 30)
    several_ids, several_scores = several.search(query, 30)
    assert one_ids.tolist() == several_ids.tolist()
    np.testing.assert_allclose(several_scores, one_scores, rtol=1e-12)
    candidates = one_ids[::3]
    np.testing.assert_allclose(several.score(query, candidates), one.score(query, candidates),
                               rtol=1e-12)


def test_many_small_adds_keep_few_segments(dataset):
    codebook, descriptors, ids = dataset
    index = AsmkIndex(codebook)
    for image in range(120):
        rows = slice(image * 40, (image + 1) * 40)
        index.add(descriptors[rows], ids[rows])
    assert len(index) == 120 and len(index._segments) <= 8
    one = AsmkIndex(codebook)
    one.add(descriptors, ids)
    query = descriptors[:40]
    assert index.search(query, 120)[0].tolist() == one.search(query, 120)[0].tolist()


def test_remove_purges_images_and_keeps_other_scores(built):
    index, descriptors, ids = built
    query = perturbed(descriptors[ids == ids[0]], seed=11)
    before = scores_by_id(index, query)
    removed = np.unique(ids)[[0, 3, 4, 50, 119]]
    memory_before = index.memory_bytes()
    index.remove(removed)
    assert len(index) == 115 and not index.contains(removed).any()
    after = scores_by_id(index, query)
    assert not set(removed.tolist()) & set(after)
    assert all(after[k] == before[k] for k in after)  # idf off: other scores unchanged
    assert index.memory_bytes() < memory_before
    keep = ~np.isin(ids, removed)
    rebuilt = AsmkIndex(index.codebook, binary=index.params.binary)
    rebuilt.add(descriptors[keep], ids[keep])
    assert rebuilt.search(query, 40)[0].tolist() == index.search(query, 40)[0].tolist()
    assert index.score(query, ids[keep][:50:10]).tolist() == [after[i] for i in ids[keep][:50:10]]


def test_remove_with_idf_matches_rebuilt_index(dataset):
    codebook, descriptors, ids = dataset
    index = AsmkIndex(codebook, use_idf=True)
    index.add(descriptors[:2400], ids[:2400])
    index.add(descriptors[2400:], ids[2400:])
    removed = np.unique(ids)[::4]
    index.remove(removed)
    keep = ~np.isin(ids, removed)
    rebuilt = AsmkIndex(codebook, use_idf=True)
    rebuilt.add(descriptors[keep], ids[keep])
    query = perturbed(descriptors[ids == ids[41]], seed=2)
    got, expected = scores_by_id(index, query), scores_by_id(rebuilt, query)
    assert got.keys() == expected.keys()
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), rtol=1e-10)
    index.remove(index.image_ids)
    assert len(index) == 0 and index.search(query, 5)[0].size == 0


def test_inverse_document_frequency_counts_images_per_word(dataset):
    # log(n_images / df_w) over the images' distinct words, recomputed after a remove
    codebook, descriptors, ids = dataset
    index = AsmkIndex(codebook)
    index.add(descriptors, ids)

    def expected(keep):
        words = codebook.quantize(descriptors[keep], 1)[:, 0]
        pairs = np.unique(np.column_stack([ids[keep], words]), axis=0)
        df = np.bincount(pairs[:, 1], minlength=codebook.size)
        n_images = np.unique(ids[keep]).size
        return np.where(df > 0, np.log(n_images / np.maximum(df, 1)), 0.0)

    np.testing.assert_allclose(index.inverse_document_frequency(), expected(np.ones(ids.size, bool)))
    removed = np.unique(ids)[::3]
    index.remove(removed)
    np.testing.assert_allclose(index.inverse_document_frequency(), expected(~np.isin(ids, removed)))


def test_state_queries(built):
    index, descriptors, ids = built
    unique = np.unique(ids)
    assert len(index) == unique.size and index.image_ids.tolist() == unique.tolist()
    assert index.contains([unique[3], -5]).tolist() == [True, False]
    assert index.memory_bytes() > 0 and index.bytes_per_image() == index.memory_bytes() / len(index)
    assert "AsmkIndex(images=120" in repr(index)


def test_nonzero_norm_guard_with_idf_word_in_every_image(dataset):
    """A word present in every image has idf 0; images made only of it must not give NaN."""
    codebook, _, _ = dataset
    centroid = codebook.centroids[0]
    same = np.repeat(centroid[None] + 0.01, 6, axis=0).astype(np.float32)
    index = AsmkIndex(codebook, use_idf=True)
    index.add(np.concatenate([same, same]), np.repeat([1, 2], 6))
    ids, scores = index.search(same, 2)
    assert np.isfinite(scores).all() and scores.tolist() == [0.0, 0.0]


def test_odd_dimension_codes(dataset):
    descriptors, image, _ = clustered_images(30, 20, dim=40, seed=4)
    codebook = Codebook.train(descriptors, 32, seed=1)
    index = AsmkIndex(codebook)
    index.add(descriptors, image)
    query = perturbed(descriptors[image == 7], seed=1)
    top_ids, top_scores = index.search(query, 3)
    assert top_ids[0] == 7 and top_scores[0] <= 1.0 + 1e-12
    assert index.score(query, top_ids).tolist() == top_scores.tolist()
    assert index._segments[0].codes.shape[1] == 1  # 40 bits in one uint64


def brute_force_binary_scores(index: AsmkIndex, query: np.ndarray) -> dict:
    """ASMK* scores (binary, idf off) straight from the definition: per image, the sum over the
    words it shares with the query of sigma(1 - 2 hamming / D), over sqrt(n_query n_image)."""
    words, codes = index._aggregate_query(query)
    query_code = {int(w): code for w, code in zip(words, codes)}
    table = index._selectivity
    scores = {}
    for segment in index._segments:
        posting_words = segment.posting_words()
        for position in range(segment.n_postings):
            code = query_code.get(int(posting_words[position]))
            if code is None:
                continue
            hamming = sum(bin(int(a) ^ int(b)).count("1") for a, b in zip(code, segment.codes[position]))
            image_id = int(index._doc_ids[segment.docs[position]])
            scores[image_id] = scores.get(image_id, 0.0) + table[hamming]
    sizes = dict(zip(index._doc_ids.tolist(),
                     np.concatenate([np.diff(s.fwd_offsets) for s in index._segments]).tolist()))
    return {i: value / np.sqrt(sizes[i] * words.size) for i, value in scores.items()}


@pytest.mark.parametrize("dim", [64, 128, 200])  # codes of 1, 2 (the specialised scan) and 4 words
def test_binary_scan_equals_the_kernel_definition(dim):
    descriptors, image, _ = clustered_images(40, 30, dim=dim, seed=dim)
    codebook = Codebook.train(descriptors, 48, seed=2)
    index = AsmkIndex(codebook)
    for part in np.array_split(np.arange(40), 3):  # three segments
        rows = np.isin(image, part)
        index.add(descriptors[rows], 500 + image[rows])
    query = perturbed(descriptors[image == 11], seed=dim, scale=0.05)
    expected = brute_force_binary_scores(index, query)
    ids, scores = index.search(query, len(index))
    found = dict(zip(ids.tolist(), scores.tolist()))
    assert ids[0] == 511 and len(expected) > 5
    for image_id in found:
        assert found[image_id] == pytest.approx(expected.get(image_id, 0.0), rel=1e-12, abs=1e-15)
    assert index.score(query, ids).tolist() == scores.tolist()


@pytest.mark.parametrize("use_idf,binary", [(False, True), (True, True), (True, False)])
def test_save_load_round_trip(tmp_path, dataset, use_idf, binary):
    codebook, descriptors, ids = dataset
    index = AsmkIndex(codebook, use_idf=use_idf, binary=binary, alpha=2.0,
                      similarity_threshold=0.1, query_multiple_assignment=3)
    index.add(descriptors[:1600], ids[:1600])
    index.add(descriptors[1600:], ids[1600:])
    index.remove(ids[[0, 2000]])
    index.save(tmp_path / "index")
    loaded = AsmkIndex.load(tmp_path / "index")
    assert loaded.params == index.params and loaded.codebook.hash == codebook.hash
    assert loaded.image_ids.tolist() == index.image_ids.tolist()
    query = perturbed(descriptors[ids == ids[800]], seed=4)
    for got, expected in zip(loaded.search(query, 50), index.search(query, 50)):
        assert got.tolist() == expected.tolist()
    index.save(tmp_path / "index")  # overwrite in place
    assert AsmkIndex.load(tmp_path / "index").image_ids.tolist() == index.image_ids.tolist()


def _saved(tmp_path, dataset) -> tuple:
    codebook, descriptors, ids = dataset
    index = AsmkIndex(codebook)
    index.add(descriptors, ids)
    directory = tmp_path / "index"
    index.save(directory)
    version = current_version(directory)       # the published version's files (damaged below)
    return version, json.loads((version / "manifest.json").read_text())


def _flip_byte(path, offset_from_end=5):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_array_file_is_detected(tmp_path, dataset):
    directory, _ = _saved(tmp_path, dataset)
    _flip_byte(directory / "segment000_codes.npy")
    with pytest.raises(IndexFormatError, match="checksum"):
        AsmkIndex.load(directory)


def test_truncated_codebook_is_detected(tmp_path, dataset):
    directory, _ = _saved(tmp_path, dataset)
    path = directory / "codebook.npz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(IndexFormatError, match="corrupt"):
        AsmkIndex.load(directory)


def test_replaced_codebook_is_detected(tmp_path, dataset):
    directory, _ = _saved(tmp_path, dataset)
    other = Codebook.from_centroids(dataset[0].centroids + 1.0)
    other.save(directory / "codebook.npz")
    with pytest.raises(IndexFormatError, match="mismatch"):
        AsmkIndex.load(directory)


def test_inconsistent_manifest_is_detected(tmp_path, dataset):
    directory, manifest = _saved(tmp_path, dataset)
    manifest["counts"]["images"] += 1
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="mismatch"):
        AsmkIndex.load(directory)
    (directory / "manifest.json").write_text("{not json")
    with pytest.raises(IndexFormatError, match="corrupt"):
        AsmkIndex.load(directory)


def test_missing_array_file_is_detected(tmp_path, dataset):
    directory, _ = _saved(tmp_path, dataset)
    (directory / "segment000_docs.npy").unlink()
    with pytest.raises(IndexFormatError, match="corrupt"):
        AsmkIndex.load(directory)


def test_bad_inputs_leave_index_unchanged(dataset):
    codebook, descriptors, ids = dataset
    index = AsmkIndex(codebook)
    index.add(descriptors[:2400], ids[:2400])
    probe = descriptors[:40]
    before = snapshot(index, probe)
    new_rows = descriptors[2400:2440]
    nan_rows = new_rows.copy()
    nan_rows[3, 5] = np.nan
    inf_rows = new_rows.copy()
    inf_rows[0, 0] = np.inf
    failing_calls = [
        (ValueError, lambda: index.add(new_rows[:, :16], np.full(40, 5))),  # wrong dimension
        (ValueError, lambda: index.add(nan_rows, np.full(40, 5))),
        (ValueError, lambda: index.add(inf_rows, np.full(40, 5))),
        (ValueError, lambda: index.add(np.zeros((0, DIM), np.float32), np.zeros(0, int))),
        (ValueError, lambda: index.add(new_rows, np.full(39, 5))),  # one id per descriptor
        (ValueError, lambda: index.add(new_rows, np.full(40, 0.5))),  # non-integer ids
        (ValueError, lambda: index.add(new_rows, np.full(40, ids[0]))),  # already indexed
        (ValueError, lambda: index.add(new_rows[0], [5])),  # 1-D descriptors
        (ValueError, lambda: index.add(new_rows, np.full(40, 5), words=np.zeros((40, 2)))),
        (ValueError, lambda: index.add(new_rows, np.full(40, 5),
                                       words=np.full((40, 1), WORDS))),
        (KeyError, lambda: index.remove([ids[0], 123456789])),  # one unknown id: nothing removed
        (KeyError, lambda: index.score(probe, [ids[0], -1])),
        (ValueError, lambda: index.search(np.zeros((0, DIM), np.float32), 5)),
        (ValueError, lambda: index.search(probe, 0)),
        (ValueError, lambda: index.search(probe[:, :8], 5)),
        (ValueError, lambda: index.score(np.full((3, DIM), np.nan, np.float32), ids[:1])),
    ]
    for error, call in failing_calls:
        with pytest.raises(error):
            call()
        assert snapshot(index, probe) == before
    with pytest.raises(KeyError, match="123456789"):
        index.remove([123456789])


def test_constructor_rejects_bad_parameters(dataset):
    codebook, _, _ = dataset
    with pytest.raises(ValueError):
        AsmkIndex(codebook, multiple_assignment=0)
    with pytest.raises(ValueError):
        AsmkIndex(codebook, query_multiple_assignment=WORDS + 1)
    with pytest.raises(ValueError):
        AsmkIndex(codebook, alpha=-1.0)
    with pytest.raises(ValueError):
        AsmkIndex(codebook, similarity_threshold=-0.5, alpha=2.5)
    with pytest.raises(TypeError):
        AsmkIndex(codebook.centroids)


def test_codebook_of_another_dimension_is_rejected(dataset):
    _, descriptors, ids = dataset
    small = Codebook.from_centroids(np.eye(16, dtype=np.float32))
    index = AsmkIndex(small)
    with pytest.raises(ValueError, match="dimensionality"):
        index.add(descriptors, ids)
    assert len(index) == 0


def test_empty_index_search_and_round_trip(tmp_path, dataset):
    codebook, descriptors, _ = dataset
    index = AsmkIndex(codebook)
    ids, scores = index.search(descriptors[:10], 5)
    assert ids.size == 0 and scores.size == 0 and len(index) == 0
    assert index.score(descriptors[:10], []).size == 0
    index.save(tmp_path / "empty")
    loaded = AsmkIndex.load(tmp_path / "empty")
    assert len(loaded) == 0 and loaded.search(descriptors[:10], 5)[0].size == 0


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_rows_with_precomputed_words_give_the_same_error(dataset, bad_value):
    """With words= the NaN/inf check runs inside the compiled residual pass: same message (count
    and first bad row), raised before any state change."""
    codebook, descriptors, ids = dataset
    index = AsmkIndex(codebook)
    index.add(descriptors[:2400], ids[:2400])
    probe = descriptors[:40]
    before = snapshot(index, probe)
    rows = descriptors[2400:2480].copy()
    rows[[60, 17], [3, 0]] = bad_value
    words = codebook.quantize(np.nan_to_num(rows, posinf=0.0, neginf=0.0), 1)
    message = r"^descriptors: 2 row\(s\) contain NaN or inf values \(first bad row: 17\)$"
    for precomputed in (words, None):
        with pytest.raises(ValueError, match=message):
            index.add(rows, ids[2400:2480], words=precomputed)
        assert snapshot(index, probe) == before


def test_huge_finite_values_whose_sums_overflow_are_accepted(dataset):
    """A residual sum overflowing to inf is not a non-finite input: the rows are re-checked."""
    codebook, descriptors, _ = dataset
    rows = descriptors[:40].copy()
    rows[:, 0] = 3e38  # finite, but 40 of them summed in one (image, word) group overflow
    index = AsmkIndex(codebook)
    index.add(rows, np.zeros(40, dtype=np.int64), words=np.zeros((40, 1), dtype=np.int64))
    assert len(index) == 1 and index.n_vectors == 1


def test_precomputed_words_with_interleaved_images_equal_quantizing_here(dataset):
    codebook, descriptors, ids = dataset
    order = np.random.default_rng(3).permutation(descriptors.shape[0])
    quantized_here = AsmkIndex(codebook, multiple_assignment=2)
    quantized_here.add(descriptors[order], ids[order])
    given = AsmkIndex(codebook, multiple_assignment=2)
    given.add(descriptors[order], ids[order], words=codebook.quantize(descriptors[order], 2))
    query = perturbed(descriptors[ids == ids[0]], seed=9)
    assert given.image_ids.tolist() == quantized_here.image_ids.tolist()
    assert scores_by_id(given, query) == scores_by_id(quantized_here, query)  # bit-identical


@pytest.mark.parametrize("n_words", [1, 5, 300, 70000])
@pytest.mark.parametrize("assignments", [1, 3])
def test_group_pairs_is_a_stable_sort_by_image_then_word(n_words, assignments):
    """Compiled per-image sort (insertion sort for short images, radix sort for long ones)
    against numpy's lexsort, with empty, short and long images and a descriptor order."""
    from asmk_index import _kernels
    rng = np.random.default_rng(n_words)
    lengths = np.array([0, 3, 16, 17, 200, 0, 1, 90])
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(starts[-1])
    words = np.stack([rng.choice(n_words, assignments, replace=False) if n_words >= assignments
                      else np.zeros(assignments, dtype=np.int64) for _ in range(n)]).astype(np.int64)
    order = rng.permutation(n).astype(np.int64)
    for descriptor_order in (None, order):
        positions = np.arange(n) if descriptor_order is None else descriptor_order
        image_of_position = np.repeat(np.arange(lengths.size), lengths)
        pair_descriptor = np.repeat(positions, assignments)
        pair_image = np.repeat(image_of_position, assignments)
        pair_word = words[pair_descriptor, np.tile(np.arange(assignments), n)]
        expected = np.lexsort((pair_word, pair_image))  # stable: input order breaks ties
        got = _kernels.group_pairs(words, starts, n_words, descriptor_order)
        np.testing.assert_array_equal(got[0], pair_descriptor[expected])
        np.testing.assert_array_equal(got[1], pair_word[expected])
        key = pair_image[expected] * (n_words + 1) + pair_word[expected]
        first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        np.testing.assert_array_equal(got[2], first)
        np.testing.assert_array_equal(got[3], pair_image[expected][first])


def test_segment_from_doc_major_equals_from_postings(dataset):
    from asmk_index import inverted_file as ivf
    from asmk_index.kernel import aggregate
    codebook, descriptors, ids = dataset
    image = np.repeat(np.arange(120), 40)
    aggregated = aggregate(descriptors, codebook.quantize(descriptors, 3), image, 120,
                           codebook.centroids, binary=True)
    arguments = dict(doc_start=7, n_docs=120, size=codebook.size)
    fast = ivf.Segment.from_doc_major(aggregated.word, aggregated.image, aggregated.vectors,
                                      **arguments)
    general = ivf.Segment.from_postings(aggregated.word, aggregated.image + 7, aggregated.vectors,
                                        **arguments)
    for name, array in general.arrays().items():
        np.testing.assert_array_equal(fast.arrays()[name], array, err_msg=name)
        assert fast.arrays()[name].dtype == array.dtype, name


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "real"])
def test_results_do_not_depend_on_the_thread_count(binary):
    """Enough descriptors that the compiled grouping and aggregation share images among threads:
    indexes built with 1 and with 4 threads are bit-identical, and so are their results."""
    import asmk_index
    descriptors, image, _ = clustered_images(2000, 60, 16, seed=5, n_patterns=64,
                                             patterns_per_image=40)
    codebook = Codebook.from_centroids(descriptors[::2000][:64])
    query = perturbed(descriptors[image == 7], 1)
    order = np.random.default_rng(0).permutation(image.size)  # interleaved images
    before = asmk_index.get_num_threads()
    results = []
    try:
        for threads in (1, 4):
            asmk_index.set_num_threads(threads)
            index = AsmkIndex(codebook, binary=binary)
            index.add(descriptors[order], image[order])
            segment = index._segments[0]
            results.append((segment.codes, segment.docs, segment.offsets,
                            *index.search(query, 2000)))
    finally:
        asmk_index.set_num_threads(before)
    for single, multi in zip(*results):
        np.testing.assert_array_equal(single, multi)
    with pytest.raises(ValueError):
        asmk_index.set_num_threads(0)


def test_concurrent_searches_from_several_threads(dataset):
    """Searches release the GIL and share lazily built caches: four threads searching a fresh
    index at once get exactly the sequential results."""
    from concurrent.futures import ThreadPoolExecutor
    codebook, descriptors, ids = dataset
    queries = [perturbed(descriptors[ids == image_id], seed) for seed, image_id in
               enumerate(np.unique(ids)[:24])]
    index = AsmkIndex(codebook, use_idf=True)
    index.add(descriptors, ids)
    expected = [index.search(query, 20) for query in queries]
    fresh = AsmkIndex(codebook, use_idf=True)  # caches not built yet
    fresh.add(descriptors, ids)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda query: (fresh.search(query, 20),
                                           fresh.score(query, ids[::40])), queries))
    for (want_ids, want_scores), ((got_ids, got_scores), shortlist_scores), query in \
            zip(expected, got, queries):
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_array_equal(got_scores, want_scores)
        np.testing.assert_array_equal(shortlist_scores, index.score(query, ids[::40]))


@pytest.mark.parametrize("n, k", [(1, 1), (10, 3), (10, 25), (1000, 100), (5000, 1)])
def test_compiled_top_k_equals_a_full_sort(n, k):
    """top_k: best score first, ties by the lower id, NaN never listed; equal to sorting all."""
    from asmk_index import _kernels
    rng = np.random.default_rng(n + k)
    for _ in range(5):
        scores = np.round(rng.random(n), 2)  # many exact ties
        scores[rng.random(n) < 0.3] = 0.0
        scores[rng.random(n) < 0.05] = np.nan
        ids = rng.permutation(3 * n)[:n].astype(np.int64)
        finite = np.flatnonzero(~np.isnan(scores))
        expected = finite[np.lexsort((ids[finite], -scores[finite]))][:k]
        np.testing.assert_array_equal(_kernels.top_k(scores, ids, k), expected)
    assert _kernels.top_k(scores, ids, 0).size == 0


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "real"])
def test_threaded_scan_gives_the_same_bits(monkeypatch, dataset, binary):
    """A query's two halves of words scanned by two threads at once: the very same scores as
    on one thread, and score() still equals search() bit for bit."""
    import asmk_index
    from asmk_index import _kernels
    from asmk_index import asmk as asmk_module
    codebook, descriptors, ids = dataset
    index = AsmkIndex(codebook, binary=binary, use_idf=True)
    for part in np.array_split(np.unique(ids), 3):  # several segments
        rows = np.isin(ids, part)
        index.add(descriptors[rows], ids[rows])
    query = perturbed(descriptors[ids == ids[5]], 3, scale=0.05)
    monkeypatch.setattr(asmk_module, "SCAN_THREAD_MIN_VECTORS", 1 << 62)
    single = index.search(query, len(index))
    scan = "scan_binary" if binary else "scan_float"
    thread_counts = []
    original = getattr(_kernels, scan)

    def counting_scan(*args):
        thread_counts.append(args[-1])
        return original(*args)

    monkeypatch.setattr(_kernels, scan, counting_scan)
    monkeypatch.setattr(asmk_module, "SCAN_THREAD_MIN_VECTORS", 0)
    monkeypatch.setattr(asmk_module, "SCAN_THREAD_QUANTIZERS", (codebook.quantizer,))
    before = asmk_index.get_num_threads()
    try:
        asmk_index.set_num_threads(2)
        openmp = asmk_index.get_num_threads() == 2  # 1 when the kernels lack OpenMP
        threaded = index.search(query, len(index))
    finally:
        asmk_index.set_num_threads(before)
    assert thread_counts == [2 if openmp else 1] * len(index._segments)
    np.testing.assert_array_equal(threaded[0], single[0])
    np.testing.assert_array_equal(threaded[1], single[1])
    np.testing.assert_array_equal(index.score(query, threaded[0]), threaded[1])
