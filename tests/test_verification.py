"""Spatial verification: tentative correspondences, robust fits on synthetic points, a planted
homography between two real photos, and stage 3 of TwoStageIndex through append, remove and
save/load."""
from __future__ import annotations

import numpy as np
import pytest

from asmk_index.codebook import Codebook
from asmk_index.fusion import Fusion
from asmk_index.local_store import ImageFeatures, binary_signatures
from asmk_index.verification import (QueryFeatures, VerificationConfig, hamming_distances,
                                     tentative_matches, verify, verify_images, weigh_inliers)

BYTES = 4                                 # 32-bit signatures in the synthetic tests


def flip_bits(signature: np.ndarray, count: int) -> np.ndarray:
    """``signature`` (BYTES,) uint8 with its first ``count`` bits flipped."""
    bits = np.unpackbits(signature, bitorder="little")
    bits[:count] ^= 1
    return np.packbits(bits, bitorder="little")


# ---------------------------------------------------------------------- correspondences
@pytest.mark.parametrize("width", [16, 8, 4, 3])
def test_hamming_distances_count_differing_bits(width):
    rng = np.random.default_rng(width)
    a, b = rng.integers(0, 256, (2, 50, width), dtype=np.uint8)
    expected = np.unpackbits(a ^ b, axis=1).sum(axis=1)
    np.testing.assert_array_equal(hamming_distances(a, b), expected)


def test_tentative_matches_need_a_shared_word_and_a_small_hamming_distance():
    rng = np.random.default_rng(0)
    query_words = np.array([[3, 8], [5, 1], [9, 2]])              # two words per descriptor
    query_signatures = rng.integers(0, 256, (3, 2, BYTES), dtype=np.uint8)
    db_words = np.array([8, 5, 7, 2, 5])
    db_signatures = np.stack([
        flip_bits(query_signatures[0, 1], 3),     # query 0's 2nd word, distance 3: match
        flip_bits(query_signatures[1, 0], 9),     # query 1's 1st word, distance 9: too far
        query_signatures[2, 0],                   # word 7 is no query word: no match
        flip_bits(query_signatures[2, 1], 0),     # query 2's 2nd word, distance 0: match
        flip_bits(query_signatures[1, 0], 8),     # query 1's 1st word, distance 8: match
    ])
    pairs, hamming = tentative_matches(query_words, query_signatures, db_words, db_signatures,
                                       max_hamming=8)
    np.testing.assert_array_equal(pairs, [[0, 0], [2, 3], [1, 4]])
    np.testing.assert_array_equal(hamming, [3, 0, 8])
    none, _ = tentative_matches(query_words, query_signatures, db_words, db_signatures,
                                max_hamming=2)
    np.testing.assert_array_equal(none, [[2, 3]])


def test_one_to_one_keeps_the_closest_partner():
    rng = np.random.default_rng(1)
    d0 = rng.integers(0, 256, BYTES, dtype=np.uint8)
    d1 = flip_bits(d0, 3)                                 # bits 0-2 differ
    q0 = d1.copy()
    q0[0] ^= 1                                            # distance 1 to d1, 2 to d0
    q1 = d0.copy()                                        # distance 0 to d0, 3 to d1
    words, signatures = np.array([[4], [4]]), np.stack([q0, q1])[:, None]
    pairs, hamming = tentative_matches(words, signatures, np.array([4, 4]), np.stack([d0, d1]),
                                       max_hamming=32, one_to_one=False)
    assert dict(zip(map(tuple, pairs.tolist()), hamming.tolist())) == {
        (0, 0): 2, (0, 1): 1, (1, 0): 0, (1, 1): 3}
    pairs, hamming = tentative_matches(words, signatures, np.array([4, 4]), np.stack([d0, d1]),
                                       max_hamming=32)
    assert dict(zip(map(tuple, pairs.tolist()), hamming.tolist())) == {(1, 0): 0, (0, 1): 1}
    # both query features closest to d0: d0 keeps the closer one, the other keeps nothing
    signatures = np.stack([flip_bits(d0, 1), d0])[:, None]
    pairs, _ = tentative_matches(words, signatures, np.array([4, 4]), np.stack([d0, d1]),
                                 max_hamming=32)
    assert pairs.tolist() == [[1, 0]]


# ---------------------------------------------------------------------- robust fits
def planted_points(rng, matrix, inliers=60, outliers=60, noise=1.0):
    source = rng.uniform(0, 400, (inliers + outliers, 2)).astype(np.float32)
    homogeneous = np.column_stack([source, np.ones(len(source))]) @ matrix.T
    target = homogeneous[:, :2] / homogeneous[:, 2:]
    target[:inliers] += rng.normal(0, noise, (inliers, 2))
    target[inliers:] = rng.uniform(0, 400, (outliers, 2))
    pairs = np.stack([np.arange(len(source)), np.arange(len(source))], 1)
    return source, target.astype(np.float32), pairs


@pytest.mark.parametrize("model", ["affine", "homography"])
@pytest.mark.parametrize("estimator", ["magsac", "ransac"])
def test_verify_recovers_a_planted_model_among_outliers(model, estimator):
    rng = np.random.default_rng(2)
    matrix = np.array([[0.9, -0.2, 30], [0.15, 1.05, -10], [0, 0, 1]])
    if model == "homography":
        matrix[2, :2] = [2e-4, -1e-4]
    source, target, pairs = planted_points(rng, matrix)
    result = verify(source, target, pairs, model=model, threshold_px=4, estimator=estimator)
    assert 55 <= result.inliers <= 64
    assert result.verified and result.tentative == len(pairs)
    assert set(result.pairs[:, 0]) >= set(range(5)) and result.pairs[:, 0].max() < 64
    np.testing.assert_array_equal(result.query_xy, source[result.pairs[:, 0]])
    np.testing.assert_array_equal(result.db_xy, target[result.pairs[:, 1]])
    corners = np.array([[0, 0], [400, 0], [400, 400], [0, 400]], np.float64)
    error = np.linalg.norm(project(result.model, corners) - project(matrix, corners), axis=1)
    assert error.max() < 3.0


def test_verify_rejects_unrelated_points_and_too_few_matches():
    rng = np.random.default_rng(3)
    source = rng.uniform(0, 400, (80, 2)).astype(np.float32)
    target = rng.uniform(0, 400, (80, 2)).astype(np.float32)
    pairs = np.stack([np.arange(80), np.arange(80)], 1)
    rejected = verify(source, target, pairs, model="homography", threshold_px=4, min_inliers=8)
    assert not rejected.verified and rejected.inliers == 0 and rejected.model is None
    assert rejected.pairs.shape == (0, 2) and rejected.db_xy.shape == (0, 2)
    few = verify(source, target, pairs[:5], min_inliers=6)
    assert few.inliers == 0 and few.tentative == 5
    assert verify(source, target, pairs[:2], min_inliers=1).inliers == 0   # affine needs 3
    with pytest.raises(ValueError, match="model"):
        verify(source, target, pairs, model="similarity")
    with pytest.raises(ValueError, match="estimator"):
        VerificationConfig(estimator="lmeds")
    with pytest.raises(ValueError, match="threshold_px"):
        VerificationConfig(threshold_px=0)


def project(matrix, points):
    homogeneous = np.column_stack([points, np.ones(len(points))]) @ np.asarray(matrix).T
    return homogeneous[:, :2] / homogeneous[:, 2:]


def test_verify_images_matches_per_image_verification():
    rng = np.random.default_rng(4)
    centroids = rng.standard_normal((6, 32)).astype(np.float32)
    matrix = np.array([[1.0, 0.1, 20], [-0.1, 1.0, 5], [0, 0, 1]])
    query_descriptors = rng.standard_normal((50, 32)).astype(np.float32)
    query_words = rng.integers(0, 6, (50, 2))
    query_xy = rng.uniform(0, 300, (50, 2)).astype(np.float32)
    images = []
    for shift in range(3):   # image 0, 1: a transformed copy of 40 query features; 2: noise
        rows = rng.permutation(50)[:40]
        xy = project(matrix, query_xy[rows]) + shift
        words = query_words[rows, 0]
        descriptors = query_descriptors[rows]
        if shift == 2:
            descriptors = rng.standard_normal((40, 32)).astype(np.float32)
        order = np.argsort(words, kind="stable")
        images.append(ImageFeatures(words[order].astype(np.int32),
                                    binary_signatures(descriptors, words, centroids)[order],
                                    xy[order].astype(np.float32),
                                    np.ones(40, np.float32)))
    query = QueryFeatures.from_descriptors(query_descriptors, query_words, centroids, query_xy)
    config = VerificationConfig(threshold_px=3, max_hamming=2)
    batched = verify_images(query, images, config)
    assert [r.inliers >= 35 for r in batched] == [True, True, False]
    for image, result in zip(images, batched):
        pairs, _ = tentative_matches(query_words, binary_signatures(query_descriptors,
                                                                    query_words, centroids),
                                     image.words, image.signatures, config.max_hamming)
        assert result.tentative == len(pairs)
        if result.verified:
            np.testing.assert_allclose(project(result.model, result.query_xy), result.db_xy,
                                       atol=config.threshold_px)
    assert verify_images(query, [], config) == []


def test_inliers_are_weighed_by_the_idf_of_their_words():
    # image 0 holds 40 of the query's features, all on word 0, which every indexed image holds
    # (idf 0); image 1 holds 20, on rare words (idf 2). Counted, image 0 scores higher; weighed by
    # idf or its square, image 1 does, and image 0 scores nothing.
    rng = np.random.default_rng(7)
    centroids = rng.standard_normal((6, 32)).astype(np.float32)
    idf = np.array([0.0, 2.0, 2.0, 2.0, 2.0, 2.0])
    matrix = np.array([[0.9, 0.1, 15], [-0.1, 0.9, 8], [0, 0, 1]])
    descriptors = rng.standard_normal((60, 32)).astype(np.float32)
    words = np.concatenate([np.zeros(40, np.int64), rng.integers(1, 6, 20)])
    xy = rng.uniform(0, 300, (60, 2)).astype(np.float32)
    images = []
    for rows in (np.arange(40), np.arange(40, 60)):
        order = rows[np.argsort(words[rows], kind="stable")]
        images.append(ImageFeatures(words[order].astype(np.int32),
                                    binary_signatures(descriptors[order], words[order], centroids),
                                    project(matrix, xy[order]).astype(np.float32),
                                    np.ones(order.size, np.float32)))
    query = QueryFeatures.from_descriptors(descriptors, words, centroids, xy)
    scores = {}
    for weighting, power in (("count", 0), ("idf", 1), ("squared_idf", 2)):
        results = verify_images(query, images, VerificationConfig(inlier_weighting=weighting,
                                                                  threshold_px=2), idf)
        assert [r.inliers for r in results] == [40, 20]
        for image, result in zip(images, results):
            assert result.score == pytest.approx((idf[image.words[result.pairs[:, 1]]] ** power).sum())
        scores[weighting] = [r.score for r in results]
    assert scores == {"count": [40, 20], "idf": [0, 40], "squared_idf": [0, 80]}
    assert weigh_inliers(results[1], images[1].words, None).score == 20
    with pytest.raises(ValueError, match="needs the index's idf"):
        verify_images(query, images, VerificationConfig(inlier_weighting="idf"))
    with pytest.raises(ValueError, match="inlier_weighting"):
        VerificationConfig(inlier_weighting="tf-idf")


# ---------------------------------------------------------------------- real photos
PHOTOS = 12                    # ukbench00000-11: objects 0, 1, 2 (four views each)
MAX_SIZE = 320
CODEBOOK_WORDS = 256
PLANTED_ROTATION_DEG, PLANTED_SCALE, PLANTED_PERSPECTIVE = 20.0, 0.9, (2e-4, 2e-4)


def planted_homography(width: int, height: int) -> np.ndarray:
    """A rotation and shrink about the image centre with a perspective term, (3, 3)."""
    angle = np.deg2rad(PLANTED_ROTATION_DEG)
    cos, sin = PLANTED_SCALE * np.cos(angle), PLANTED_SCALE * np.sin(angle)
    centre = np.array([[1, 0, width / 2], [0, 1, height / 2], [0, 0, 1]])
    about_origin = np.array([[cos, -sin, 0], [sin, cos, 0], [*PLANTED_PERSPECTIVE, 1]])
    return centre @ about_origin @ np.linalg.inv(centre)


@pytest.fixture(scope="module")
def photos(one_torch_thread):
    """MDA features (untrained heads, reduction fitted on 4 photos) of 12 real photos, a small
    codebook, and photo 0 warped by a planted homography with its features."""
    import torch
    from kornia.geometry.transform import warp_perspective
    from PIL import Image

    from mda import ExtractionConfig, MdaConfig, MdaModel, extract_local_features
    from real_data import require_ukbench

    root = require_ukbench() / "jpg"
    paths = [str(root / f"ukbench{i:05d}.jpg") for i in range(PHOTOS)]
    torch.manual_seed(0)
    model = MdaModel(MdaConfig())
    model.eval()
    model.fit_reduction(paths[::3], max_images=4, features_per_image=300, scales=(1.0,),
                        max_size=MAX_SIZE)
    config = ExtractionConfig(scales=(1.0, 0.7071, 0.5), max_size=MAX_SIZE, top_n=600)
    image = np.asarray(Image.open(paths[0]).convert("RGB"))
    height, width = image.shape[:2]
    planted = planted_homography(width, height)
    warped = warp_perspective(torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float(),
                              torch.from_numpy(planted)[None].float(), (height, width))
    warped = warped[0].permute(1, 2, 0).clamp(0, 255).round().byte().numpy()
    with torch.no_grad():
        features = [extract_local_features(model, path, config=config) for path in paths]
        warped_features = extract_local_features(model, warped, config=config)
    codebook = Codebook.train(np.concatenate([f.descriptors for f in features]),
                              CODEBOOK_WORDS, seed=0)
    return {"features": features, "warped": warped_features, "planted": planted,
            "codebook": codebook}


def xy_of(features):
    return np.stack([features.x, features.y], 1).astype(np.float32)


def match_photos(codebook, a, b, config):
    words_a = codebook.quantize(a.descriptors, config.query_assignment)
    words_b = codebook.quantize(b.descriptors, 1)[:, 0]
    pairs, _ = tentative_matches(
        words_a, binary_signatures(a.descriptors, words_a, codebook.centroids), words_b,
        binary_signatures(b.descriptors, words_b, codebook.centroids), config.max_hamming,
        one_to_one=config.one_to_one)
    return verify(xy_of(a), xy_of(b), pairs, model=config.model,
                  threshold_px=config.threshold_px, min_inliers=config.min_inliers,
                  estimator=config.estimator)


def test_planted_homography_between_real_photos_is_found(photos):
    # MDA features sit on the feature map's grid (16 px cells at scale 1 here, 32 px at 0.5), so
    # the planted transform is recovered to within a cell where the features are: well within
    # a scale-1 cell and well below the planted displacement itself
    config = VerificationConfig(model="homography")
    result = match_photos(photos["codebook"], photos["features"][0], photos["warped"], config)
    planted = photos["planted"]
    error = np.linalg.norm(project(result.model, result.query_xy)
                           - project(planted, result.query_xy), axis=1)
    identity_error = np.linalg.norm(result.query_xy - project(planted, result.query_xy), axis=1)
    assert result.inliers >= 40, result.inliers
    assert error.mean() < 10 and error.mean() < identity_error.mean() / 2, (
        error.mean(), identity_error.mean())
    np.testing.assert_allclose(project(result.model, result.query_xy), result.db_xy,
                               atol=config.threshold_px + 1e-3)


def test_unrelated_real_photos_are_rejected(photos):
    config = VerificationConfig()
    features = photos["features"]
    for other in (4, 5, 8, 9):                  # views of two other objects
        result = match_photos(photos["codebook"], features[0], features[other], config)
        assert result.inliers == 0 and result.model is None, (other, result.inliers)


# ---------------------------------------------------------------------- stage 3 of TwoStageIndex
WARPED_ID = 100


def add_photos(index, photos, numbers, ids=None):
    """Add photos (features) with their global stand-in (the mean local descriptor)."""
    features = [photos["features"][n] if n != WARPED_ID else photos["warped"] for n in numbers]
    ids = np.asarray(numbers if ids is None else ids)
    index.add(np.stack([f.descriptors.mean(0) for f in features]), ids,
              np.concatenate([f.descriptors for f in features]),
              np.repeat(ids, [len(f.descriptors) for f in features]),
              local_geometry=np.concatenate([np.column_stack([f.x, f.y, f.scale])
                                             for f in features]))


EXPANSION_INLIERS = 20         # verified query expansion's threshold in these tests


def verified_search(index, photos, weighting="count", **options):
    query = photos["features"][0]
    return index.search(query.descriptors.mean(0), query.descriptors, k=20, shortlist=20,
                        verify_top=8, query_geometry=np.column_stack([query.x, query.y,
                                                                      query.scale]),
                        verification=VerificationConfig(model="homography",
                                                        inlier_weighting=weighting), **options)


def check_inliers(index, result, query):
    """Every verified result's inlier coordinates are real feature positions of the query and of
    the stored image, related by the returned model."""
    query_xy = xy_of(query)
    for image, inliers, verification in zip(result.ids, result.inliers, result.verifications):
        if inliers <= 0:           # not verified (-1) or rejected (0): nothing to draw
            assert verification is None or not verification.verified
            continue
        assert verification.inliers == inliers
        stored = index.local_store.get(image)
        np.testing.assert_array_equal(verification.query_xy, query_xy[verification.pairs[:, 0]])
        np.testing.assert_array_equal(verification.db_xy, stored.xy[verification.pairs[:, 1]])
        np.testing.assert_allclose(project(verification.model, verification.query_xy),
                                   verification.db_xy, atol=VerificationConfig.threshold_px + 1)


def test_verified_search_after_append_remove_and_save_load(photos, tmp_path):
    from asmk_index.two_stage import TwoStageIndex

    codebook, query = photos["codebook"], photos["features"][0]
    index = TwoStageIndex.create(codebook, codebook.dim, local_features=True)
    add_photos(index, photos, range(4, PHOTOS))                   # two other objects
    before = verified_search(index, photos)
    assert before.inliers.max() == 0 and before.stage3_seconds > 0
    add_photos(index, photos, [1, 2, WARPED_ID])                  # --append
    appended = verified_search(index, photos)
    assert appended.ids[0] == WARPED_ID and appended.inliers[0] >= 40
    assert set(appended.ids[appended.inliers > 0]) <= {1, 2, WARPED_ID}
    assert np.all(appended.inliers[8:] == -1)                     # beyond verify_top
    check_inliers(index, appended, query)
    # verified first, by inlier count; then the others in the ASMK* order
    verified = appended.inliers > 0
    count = int(verified.sum())
    assert verified[:count].all() and np.all(np.diff(appended.inliers[:count]) <= 0)
    plain = index.search(query.descriptors.mean(0), query.descriptors, k=20, shortlist=20)
    assert plain.inliers is None and set(plain.ids) == set(appended.ids)
    np.testing.assert_array_equal(appended.ids[count:], [i for i in plain.ids
                                                         if i not in appended.ids[:count]])
    # a fusion rule takes the inlier counts as a third stage over the whole shortlist
    fused = verified_search(index, photos, fusion="rrf")
    assert fused.ids[0] == WARPED_ID
    np.testing.assert_allclose(fused.scores, Fusion(rule="rrf")(
        fused.global_scores, fused.asmk_scores, np.maximum(fused.inliers, 0)))
    index.remove([WARPED_ID, 5])                                  # --remove
    removed = verified_search(index, photos)
    assert WARPED_ID not in removed.ids and 5 not in removed.ids
    assert not index.local_store.contains([WARPED_ID, 5]).any()
    check_inliers(index, removed, query)
    index.save(tmp_path / "index")
    loaded = TwoStageIndex.load(tmp_path / "index")
    assert loaded.has_local_features and len(loaded.local_store) == len(index.local_store)
    # memory-mapped: only the look-up table is in RAM
    assert loaded.local_store.memory_bytes() < index.local_store.memory_bytes() / 10
    reloaded = verified_search(loaded, photos)
    np.testing.assert_array_equal(reloaded.ids, removed.ids)
    np.testing.assert_array_equal(reloaded.inliers, removed.inliers)
    # append and remove on the loaded (memory-mapped) index
    add_photos(loaded, photos, [WARPED_ID, 3])
    loaded.remove([1])
    again = verified_search(loaded, photos)
    assert again.ids[0] == WARPED_ID and 1 not in again.ids
    check_inliers(loaded, again, query)
    loaded.save(tmp_path / "index")
    final = TwoStageIndex.load(tmp_path / "index")
    np.testing.assert_array_equal(verified_search(final, photos).inliers, again.inliers)


def test_local_geometry_is_required_exactly_when_features_are_kept(photos):
    from asmk_index.two_stage import TwoStageIndex

    codebook, features = photos["codebook"], photos["features"][4]
    arguments = (features.descriptors.mean(0)[None], [4], features.descriptors,
                 np.full(len(features.descriptors), 4))
    geometry = np.column_stack([features.x, features.y, features.scale])
    kept = TwoStageIndex.create(codebook, codebook.dim, local_features=True)
    with pytest.raises(ValueError, match="local_geometry"):
        kept.add(*arguments)
    with pytest.raises(ValueError, match="local_geometry"):
        kept.add(*arguments, local_geometry=geometry[:-1])
    assert len(kept) == 0 and len(kept.asmk_index) == 0          # nothing half-added
    kept.add(*arguments, local_geometry=geometry)
    assert kept.local_store.counts([4])[0] == len(features.descriptors)
    plain = TwoStageIndex.create(codebook, codebook.dim)
    with pytest.raises(ValueError, match="local_features=True"):
        plain.add(*arguments, local_geometry=geometry)
    plain.add(*arguments)
    query = photos["features"][0]
    with pytest.raises(ValueError, match="local features"):
        plain.search(query.descriptors.mean(0), query.descriptors, verify_top=3,
                     query_geometry=np.column_stack([query.x, query.y]))
    with pytest.raises(ValueError, match="query_geometry"):
        kept.search(query.descriptors.mean(0), query.descriptors, verify_top=3)
    with pytest.raises(ValueError, match="query_geometry"):
        kept.search(query.descriptors.mean(0), query.descriptors, verify_top=3,
                    query_geometry=np.zeros((3, 2)))


def index_with_global_vectors(photos, global_vectors: dict):
    """A two-stage index of the photos numbered as ``global_vectors``' keys (WARPED_ID: the warped
    view) with the local features and geometry of each and the given (16,) global descriptors."""
    from asmk_index.two_stage import TwoStageIndex

    numbers = list(global_vectors)
    index = TwoStageIndex.create(photos["codebook"], 16, local_features=True)
    features = [photos["warped"] if n == WARPED_ID else photos["features"][n] for n in numbers]
    index.add(np.stack([global_vectors[n] for n in numbers]), numbers,
              np.concatenate([f.descriptors for f in features]),
              np.repeat(numbers, [len(f.descriptors) for f in features]),
              local_geometry=np.concatenate([np.column_stack([f.x, f.y, f.scale]) for f in features]))
    return index


def test_verified_query_expansion_pulls_up_what_the_verified_image_resembles(photos):
    # global descriptors set by hand: the warped view of the query photo resembles the query and
    # an unrelated photo ("hidden", orthogonal to the query); the other photos resemble the query
    # a little. Verified, the warped view expands the query, and "hidden" overtakes the others.
    numbers, hidden = [WARPED_ID, *range(4, PHOTOS)], 8
    axes = np.eye(16, dtype=np.float32)
    global_vectors = {n: 0.3 * axes[0] + axes[n] for n in numbers if n not in (WARPED_ID, hidden)}
    global_vectors.update({WARPED_ID: axes[0] + axes[1], hidden: axes[1]})
    query = photos["features"][0]
    index = index_with_global_vectors(photos, global_vectors)

    def search(expansion, min_inliers=EXPANSION_INLIERS):
        return index.search(axes[0], query.descriptors, k=len(numbers), shortlist=len(numbers),
                            fusion="global", verify_top=1, verified_expansion=expansion,
                            verified_expansion_inliers=min_inliers,
                            query_geometry=np.column_stack([query.x, query.y]),
                            verification=VerificationConfig(model="homography"))

    plain, expanded = search(0), search(3)
    assert plain.ids[0] == expanded.ids[0] == WARPED_ID and plain.inliers[0] >= EXPANSION_INLIERS
    assert plain.ids[-1] == hidden and expanded.ids[1] == hidden
    expected = (axes[0] + (axes[0] + axes[1]) / np.sqrt(2))
    expected /= np.linalg.norm(expected)
    np.testing.assert_allclose(expanded.global_scores[1], expected[1], atol=1e-5)
    # a threshold the verified image does not reach: nothing expands the query
    unchanged = search(3, min_inliers=int(plain.inliers[0]) + 1)
    np.testing.assert_array_equal(unchanged.ids, plain.ids)
    with pytest.raises(ValueError, match="verify_top"):
        index.search(axes[0], query.descriptors, verified_expansion=3)


def test_asmk_shortlist_brings_in_the_view_the_global_descriptor_misses(photos):
    # global descriptors set by hand: the warped view of the query photo is orthogonal to the
    # query, so a global shortlist of 2 misses it; the ASMK* top 1 over the whole collection is
    # that view, and joining the shortlist it is verified and ranked first.
    numbers = [WARPED_ID, *range(4, PHOTOS)]
    axes = np.eye(16, dtype=np.float32)
    global_vectors = {n: 0.3 * axes[0] + axes[n] for n in numbers if n != WARPED_ID}
    global_vectors[WARPED_ID] = axes[1]
    query = photos["features"][0]
    index = index_with_global_vectors(photos, global_vectors)

    def search(asmk_shortlist):
        return index.search(axes[0], query.descriptors, k=2, shortlist=2, asmk_shortlist=asmk_shortlist,
                            fusion=Fusion("minmax", 1.0, 4.0, 4.0), verify_top=3,
                            query_geometry=np.column_stack([query.x, query.y]),
                            verification=VerificationConfig(model="homography"))

    plain, joined = search(0), search(1)
    assert WARPED_ID not in plain.ids and plain.shortlist_size == 2
    assert joined.shortlist_size == 3 and joined.ids[0] == WARPED_ID
    assert joined.global_scores[0] == 0.0 and joined.inliers[0] >= VerificationConfig().min_inliers
    assert joined.ids[1] in plain.ids
    with pytest.raises(ValueError, match="asmk_shortlist"):
        index.search(axes[0], query.descriptors, mode="global", asmk_shortlist=1)


@pytest.mark.parametrize("fusion,weighting,expansion", [
    (Fusion("zscore", 1.0, 4.0, 4.0), "count", 0), ("asmk", "count", 0),
    (Fusion("zscore", 1.0, 4.0, 4.0), "squared_idf", 0), (Fusion("zscore", 1.0, 4.0, 4.0), "count", 5)])
def test_ranking_replayed_on_stored_scores_equals_the_search(photos, fusion, weighting, expansion):
    # benchmarks/defaults.py scores and verifies each shortlist once, then replays rankings with
    # rank_shortlist / rank_verified / rank_expanded: they must give exactly what the search gives.
    from asmk_index.global_index import l2_normalize
    from asmk_index.two_stage import TwoStageIndex, rank_expanded, rank_shortlist, rank_verified

    codebook, query = photos["codebook"], photos["features"][0]
    index = TwoStageIndex.create(codebook, codebook.dim, local_features=True)
    add_photos(index, photos, [1, 2, WARPED_ID, *range(4, PHOTOS)])
    result = verified_search(index, photos, weighting, fusion=fusion, verified_expansion=expansion,
                             verified_expansion_inliers=EXPANSION_INLIERS)
    shortlist, global_scores = index.global_index.search(query.descriptors.mean(0), 20)
    asmk_scores = index.asmk_index.score(query.descriptors, shortlist)
    every = index.verify(query.descriptors, np.column_stack([query.x, query.y, query.scale]), shortlist,
                         VerificationConfig(model="homography", inlier_weighting=weighting))
    scores, order = rank_shortlist(fusion, global_scores.astype(np.float64), np.asarray(asmk_scores, np.float64))
    inliers = np.full(shortlist.size, -1, np.int64)
    inliers[order[:8]] = [every[i].inliers for i in order[:8]]
    inlier_scores = inliers.astype(np.float64)
    inlier_scores[order[:8]] = [every[i].score for i in order[:8]]
    scores, order = rank_verified(fusion, global_scores.astype(np.float64), np.asarray(asmk_scores, np.float64),
                                  scores, order, inlier_scores)
    if expansion:
        query_vector = l2_normalize(query.descriptors.mean(0, keepdims=True), "query")[0]
        expanded = rank_expanded(fusion, query_vector, index.global_index.get_vectors(shortlist, searched=True),
                                 np.asarray(asmk_scores, np.float64), inliers, inlier_scores, order, expansion,
                                 EXPANSION_INLIERS)
        assert expanded is not None            # the warped photo qualifies: the query was expanded
        global_scores, scores, order = expanded
        assert not np.allclose(np.sort(result.global_scores), np.sort(index.global_index.score(
            query.descriptors.mean(0), shortlist)))      # the results carry the expanded query's scores
    np.testing.assert_allclose(result.global_scores, global_scores[order], rtol=1e-5)
    assert result.ids[0] == WARPED_ID and {-1, 0} < set(inliers.tolist())   # unverified, rejected, verified
    np.testing.assert_array_equal(shortlist[order], result.ids)
    np.testing.assert_array_equal(inliers[order], result.inliers)
    np.testing.assert_array_equal(inlier_scores[order], [v.score if v is not None else -1.0 if n < 0 else 0.0
                                                         for v, n in zip(result.verifications, result.inliers)])
    if weighting != "count":       # the search weighed the inliers by the index's idf
        idf = index.asmk_index.inverse_document_frequency()
        top = result.verifications[0]
        assert top.score == pytest.approx((idf[index.local_store.get(WARPED_ID).words[top.pairs[:, 1]]] ** 2).sum())
        assert top.score != top.inliers
