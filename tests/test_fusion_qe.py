"""Fusion rules (scale-free, every stage can move a result), the two-stage fusion option, and
alpha-QE / alpha-DBA of the global index."""
from __future__ import annotations

import numpy as np
import pytest

from asmk_index.codebook import Codebook
from asmk_index.fusion import RULES, Fusion, fuse, normalize
from asmk_index.global_index import GlobalIndex
from asmk_index.two_stage import TwoStageIndex


# ---------------------------------------------------------------------- fusion rules
@pytest.mark.parametrize("rule", RULES)
def test_fusion_is_invariant_to_the_scale_of_a_stage(rule):
    rng = np.random.default_rng(0)
    global_scores, asmk_scores = rng.uniform(0.2, 0.9, 30), rng.uniform(0, 0.02, 30)
    inliers = rng.integers(0, 80, 30).astype(float)
    reference = fuse([global_scores, asmk_scores, inliers], [1, 2, 0.5], rule)
    for transformed in ([10 * global_scores + 3, asmk_scores, inliers],
                        [global_scores, 1000 * asmk_scores, inliers],
                        [global_scores, asmk_scores, 0.01 * inliers - 7]):
        np.testing.assert_allclose(fuse(transformed, [1, 2, 0.5], rule), reference, atol=1e-12)
    if rule == "rrf":   # rank fusion: any strictly increasing map
        np.testing.assert_allclose(
            fuse([np.exp(global_scores), asmk_scores ** 3, np.sqrt(inliers)], [1, 2, 0.5], rule),
            reference, atol=1e-12)


@pytest.mark.parametrize("rule", RULES)
def test_every_stage_can_move_a_result(rule):
    # scores on the scales of the issue: global 0.15-0.9, ASMK* 0-0.02, inliers 0-80
    rng = np.random.default_rng(1)
    stages = [rng.uniform(0.15, 0.9, 20), rng.uniform(0, 0.02, 20), rng.uniform(0, 80, 20)]
    fusion = Fusion(rule=rule)
    for stage in range(3):
        # images 0 and 1 equal on the other stages: this stage alone orders them, both ways
        scores = [s.copy() for s in stages]
        for other in set(range(3)) - {stage}:
            scores[other][1] = scores[other][0]
        low, high = np.sort(scores[stage])[[2, -2]]
        for winner in (0, 1):
            scores[stage][winner], scores[stage][1 - winner] = high, low
            fused = fusion(*scores)
            assert fused[winner] > fused[1 - winner], (stage, winner)
        # raising one image's score in a stage never lowers its fused value
        before = fusion(*scores)
        scores[stage][5] = scores[stage].max() * 2
        assert fusion(*scores)[5] >= before[5]
    # the raw sum the issue describes (ASMK* + 0.1 x global) is decided by the global stage
    # alone here, while every rule lets the stronger ASMK* score win
    global_scores, asmk_scores = np.array([0.9, 0.6, 0.3]), np.array([0.001, 0.004, 0.0])
    assert np.argmax(asmk_scores + 0.1 * global_scores) == 0
    assert np.argmax(Fusion(rule=rule, global_weight=1.0, asmk_weight=2.0)(
        global_scores, asmk_scores)) == 1
    # a stage with weight 0 cannot move anything
    muted = Fusion(rule=rule, asmk_weight=0.0)
    scores = asmk_scores.copy()
    scores[2] = 5.0
    np.testing.assert_array_equal(muted(global_scores, scores), muted(global_scores, asmk_scores))


def test_normalisations_and_ties():
    np.testing.assert_allclose(normalize([2.0, 4.0, 3.0], "minmax"), [0, 1, 0.5])
    np.testing.assert_array_equal(normalize([5.0, 5.0], "minmax"), [0, 0])
    np.testing.assert_allclose(normalize([1.0, 3.0], "zscore"), [-1, 1])
    # rank fusion: ties share the best rank (1 + number of strictly greater scores)
    np.testing.assert_allclose(normalize([3.0, 7.0, 3.0, 1.0], "rrf", rrf_k=0),
                               [1 / 2, 1 / 1, 1 / 2, 1 / 4])
    assert normalize([], "minmax").shape == (0,)
    with pytest.raises(ValueError, match="NaN"):
        normalize([1.0, np.nan], "minmax")
    with pytest.raises(ValueError, match="rule"):
        normalize([1.0], "max")
    with pytest.raises(ValueError, match="weights"):
        fuse([[1.0], [2.0]], [1.0])
    with pytest.raises(ValueError, match=">= 0"):
        fuse([[1.0]], [-1.0])
    with pytest.raises(ValueError, match="same images"):
        fuse([[1.0], [1.0, 2.0]], [1, 1])
    with pytest.raises(ValueError, match="asmk_weight"):
        Fusion(asmk_weight=float("nan"))


# ---------------------------------------------------------------------- two-stage option
LOCAL_DIM, GLOBAL_DIM = 16, 8


@pytest.fixture(scope="module")
def small_index():
    rng = np.random.default_rng(5)
    counts = rng.integers(5, 15, 30)
    local = rng.standard_normal((counts.sum(), LOCAL_DIM)).astype(np.float32)
    local_ids = np.repeat(np.arange(30), counts)
    codebook = Codebook.train(local, 12, seed=0)
    index = TwoStageIndex.create(codebook, GLOBAL_DIM)
    index.add(rng.standard_normal((30, GLOBAL_DIM)).astype(np.float32), np.arange(30), local,
              local_ids)
    query = (rng.standard_normal(GLOBAL_DIM).astype(np.float32),
             local[local_ids == 4] + 0.3 * rng.standard_normal((counts[4], LOCAL_DIM)).astype(
                 np.float32))
    return index, query


def test_two_stage_fusion_option_ranks_the_shortlist_by_the_rule(small_index):
    index, (global_query, local_query) = small_index
    plain = index.search(global_query, local_query, k=30, shortlist=30, fusion="asmk")
    legacy = index.search(global_query, local_query, k=30, shortlist=30)
    np.testing.assert_array_equal(plain.ids, legacy.ids)
    by_global = index.search(global_query, local_query, k=30, shortlist=30, fusion="global")
    assert np.all(np.diff(by_global.global_scores) <= 0)
    for rule in RULES:
        fusion = Fusion(rule=rule, global_weight=1.0, asmk_weight=2.0)
        result = index.search(global_query, local_query, k=30, shortlist=30, fusion=fusion)
        expected = fusion(result.global_scores, result.asmk_scores)
        np.testing.assert_allclose(result.scores, expected)
        assert np.all(np.diff(result.scores) <= 0)
        assert set(result.ids) == set(legacy.ids)
    short = index.search(global_query, local_query, k=3, shortlist=10, fusion="rrf")
    assert len(short) == 3 and short.inliers is None and short.verifications is None
    with pytest.raises(ValueError, match="fusion"):
        index.search(global_query, local_query, fusion="best")
    with pytest.raises(ValueError, match="global_weight"):
        index.search(global_query, local_query, fusion="minmax", global_weight=0.1)
    with pytest.raises(ValueError, match="two_stage"):
        index.search(global_query, local_query, mode="asmk", fusion="minmax")
    with pytest.raises(ValueError, match="local features"):
        index.search(global_query, local_query, verify_top=5,
                     query_geometry=np.zeros((len(local_query), 2)))


# ---------------------------------------------------------------------- QE and DBA
def clustered(seed=0, clusters=20, per_cluster=6, dim=32, spread=0.6):
    """Unit vectors in clusters: (vectors, cluster of each)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    labels = np.repeat(np.arange(clusters), per_cluster)
    vectors = centres[labels] + spread * rng.standard_normal((labels.size, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32), labels


def noisy_queries(vectors, noise=0.3, every=6):
    """One query per cluster: a database vector plus Gaussian noise."""
    rng = np.random.default_rng(1)
    picked = vectors[::every]
    return picked + noise * rng.standard_normal(picked.shape).astype(np.float32)


def mean_average_precision(index, queries, query_labels, labels, **options):
    ids, _ = index.search(queries, len(labels), **options)
    aps = []
    for row, label in zip(ids, query_labels):
        relevant = labels[row] == label
        hits = np.cumsum(relevant)
        aps.append(float((hits[relevant] / (np.flatnonzero(relevant) + 1)).mean()))
    return float(np.mean(aps))


def test_query_expansion_moves_true_neighbours_up():
    vectors, labels = clustered(spread=0.5)
    index = GlobalIndex(vectors.shape[1])
    index.add(vectors, np.arange(labels.size))
    queries = noisy_queries(vectors)
    plain = mean_average_precision(index, queries, labels[::6], labels)
    expanded = mean_average_precision(index, queries, labels[::6], labels, query_expansion=3)
    assert expanded > plain + 0.05, (plain, expanded)
    # the expanded query is the normalised weighted sum, and search(query_expansion=) uses it
    query = queries[0]
    ids, scores = index.search(query, 2)
    weights = np.maximum(scores, 0) ** 3.0
    q = query / np.linalg.norm(query)
    expected = q + weights @ index.get_vectors(ids)
    expected /= np.linalg.norm(expected)
    np.testing.assert_allclose(index.expand_query(query, 2, 3.0), expected, atol=1e-5)
    found, found_scores = index.search(query, 5, query_expansion=2, qe_alpha=3.0)
    direct, direct_scores = index.search(expected, 5)
    np.testing.assert_array_equal(found, direct)
    np.testing.assert_allclose(found_scores, direct_scores, atol=1e-5)
    np.testing.assert_allclose(index.score(query, found, query_expansion=2), direct_scores,
                               atol=1e-5)
    # the index option is the default of search(); 0 switches it off for a call
    index.use_expansion(query_expansion=2)
    np.testing.assert_array_equal(index.search(query, 5)[0], found)
    np.testing.assert_array_equal(index.search(query, 5, query_expansion=0)[0],
                                  index.search(q, 5, query_expansion=0)[0])
    with pytest.raises(ValueError, match="query_expansion"):
        index.use_expansion(query_expansion=-1)
    with pytest.raises(ValueError, match="normalize"):
        GlobalIndex(4, normalize=False, query_expansion=2)


def test_expand_with_averages_the_query_and_the_chosen_vectors():
    from asmk_index.global_index import expand_with

    rng = np.random.default_rng(5)
    query = rng.normal(size=8).astype(np.float32)
    query /= np.linalg.norm(query)
    chosen = rng.normal(size=(3, 8)).astype(np.float32)
    chosen /= np.linalg.norm(chosen, axis=1, keepdims=True)
    chosen[chosen @ query <= 0] *= -1                 # all positively similar to the query
    average = (query + chosen.sum(0)) / np.linalg.norm(query + chosen.sum(0))
    np.testing.assert_allclose(expand_with(query, chosen), average, atol=1e-6)
    weights = (chosen @ query) ** 3.0
    weighted = query + weights @ chosen
    np.testing.assert_allclose(expand_with(query, chosen, 3.0), weighted / np.linalg.norm(weighted),
                               atol=1e-6)
    # a vector the query is not positively similar to weighs 0; no vectors: the query itself
    np.testing.assert_allclose(expand_with(query, np.concatenate([chosen, -query[None]])), average, atol=1e-6)
    np.testing.assert_allclose(expand_with(query, np.zeros((0, 8))), query, atol=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        expand_with(query, chosen, -1.0)


def dba_reference(vectors, neighbours, alpha):
    similarities = vectors @ vectors.T
    result = np.empty_like(vectors)
    for i, row in enumerate(similarities):
        top = np.argsort(-row, kind="stable")[:neighbours + 1]
        weights = np.where(row[top] > 0, np.maximum(row[top], 0) ** alpha, 0)
        summed = weights @ vectors[top]
        result[i] = summed / np.linalg.norm(summed)
    return result


@pytest.mark.parametrize("method", ["exact", "hnsw"])
def test_dba_augments_the_database_and_is_recomputed_after_add_and_remove(method):
    vectors, labels = clustered(seed=3)
    index = GlobalIndex(vectors.shape[1], method=method, dba_neighbors=3, dba_alpha=2.0)
    index.add(vectors[:60], np.arange(60))
    np.testing.assert_allclose(index.search_vectors, dba_reference(vectors[:60], 3, 2.0),
                               atol=1e-5)
    np.testing.assert_allclose(index.vectors, vectors[:60], atol=1e-6)     # originals kept
    first = index.search(vectors[0], 5)
    np.testing.assert_allclose(first[1], index.search_vectors[
        np.searchsorted(index.image_ids, first[0])] @ vectors[0], atol=1e-5)
    index.add(vectors[60:], np.arange(60, labels.size))
    np.testing.assert_allclose(index.search_vectors, dba_reference(vectors, 3, 2.0), atol=1e-5)
    _, scores = index.search(vectors[70], 10)           # faiss structures hold the new vectors
    expected = np.sort(dba_reference(vectors, 3, 2.0) @ vectors[70])[::-1][:10]
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    removed = np.arange(0, labels.size, 4)
    index.remove(removed)
    kept = np.setdiff1d(np.arange(labels.size), removed)
    np.testing.assert_allclose(index.search_vectors, dba_reference(vectors[kept], 3, 2.0),
                               atol=1e-5)
    ids, scores = index.search(vectors[1], 10)
    expected = dba_reference(vectors[kept], 3, 2.0) @ vectors[1]
    np.testing.assert_allclose(np.sort(scores)[::-1], np.sort(expected)[::-1][:10], atol=1e-5)
    np.testing.assert_allclose(index.score(vectors[1], ids), scores, atol=1e-5)
    # switched off: the original vectors are searched again
    index.use_expansion(dba_neighbors=0)
    np.testing.assert_allclose(index.search_vectors, vectors[kept], atol=1e-6)
    np.testing.assert_allclose(index.search(vectors[1], 1)[1], [1.0], atol=1e-5)


def test_dba_improves_retrieval_of_clustered_data():
    vectors, labels = clustered(spread=0.5)
    plain = GlobalIndex(vectors.shape[1])
    plain.add(vectors, np.arange(labels.size))
    augmented = GlobalIndex(vectors.shape[1], dba_neighbors=2)
    augmented.add(vectors, np.arange(labels.size))
    queries = noisy_queries(vectors)
    before = mean_average_precision(plain, queries, labels[::6], labels)
    after = mean_average_precision(augmented, queries, labels[::6], labels)
    assert after > before + 0.03, (before, after)


def test_two_stage_search_expands_the_global_query(small_index):
    index, (global_query, local_query) = small_index
    expanded = index.global_index.expand_query(global_query, 3, 3.0)
    for mode in ("two_stage", "global", "asmk"):
        with_qe = index.search(global_query, local_query, k=10, shortlist=10, mode=mode,
                               query_expansion=3, qe_alpha=3.0)
        direct = index.search(expanded, local_query, k=10, shortlist=10, mode=mode)
        np.testing.assert_array_equal(with_qe.ids, direct.ids)
        np.testing.assert_allclose(with_qe.global_scores, direct.global_scores, atol=1e-6)
    plain = index.search(global_query, local_query, k=10, mode="global")
    with_qe = index.search(global_query, local_query, k=10, mode="global", query_expansion=3)
    assert not np.allclose(plain.global_scores, with_qe.global_scores)


def test_adaptive_fusion_weighs_each_stage_by_how_few_images_it_singles_out():
    # 10 shortlisted images; the global stage ramps down evenly (area 0.5), ASMK* singles out
    # image 6 (area 0.1): per query, ASMK* gets 5x the say of the global stage
    global_scores = np.linspace(1.0, 0.1, 10)
    asmk_scores = np.zeros(10)
    asmk_scores[6] = 0.02
    ramp = normalize(global_scores, "minmax")
    fused = fuse([global_scores, asmk_scores], [1.0, 1.0], "adaptive")
    np.testing.assert_allclose(fused, ramp / 0.5 + (asmk_scores > 0) / 0.1)
    assert np.argmax(fused) == 6
    # a stage that scores every image alike cannot rank this query: it is left out, no NaN
    np.testing.assert_allclose(fuse([global_scores, np.ones(10)], [1.0, 3.0], "adaptive"), ramp / 0.5)
