"""Spatial verification (stage 3) on real photos: robust estimators compared, thresholds swept,
stage 2 + 3 latency.

Steps (one run):
  1. MDA local features (untrained heads, PCA-whitened reduction fitted on 20 of the photos) of the
     photos of a revisitop-layout dataset (default ukbench-dev), a k-means codebook on them, and a
     :class:`asmk_index.LocalFeatureStore` of every photo (word, signature, x, y, scale).
  2. True pairs (a query and each of its positives) and as many unrelated pairs (a query and a
     random photo of another object): tentative correspondences by word + Hamming distance, then
     each estimator -- OpenCV (estimateAffine2D / findHomography with USAC_MAGSAC, USAC_ACCURATE,
     RANSAC) and kornia.geometry.ransac.RANSAC -- fits them. Table: ms per pair (fit only),
     mean inliers of true / unrelated pairs, AUC of the inlier count (true vs unrelated), recall of
     true pairs at the smallest inlier count that at most 1% of unrelated pairs reach; first,
     the share of true and unrelated pairs that the default VerificationConfig verifies.
  3. Planted homographies: photos warped by random homographies (kornia warp_perspective), features
     of both, and the estimated transform against the planted one (mean corner error in pixels).
  4. Sweep of the match thresholds (max Hamming distance, pixel threshold, query words used) with
     the chosen estimator: AUC and recall at 1% unrelated.
  5. Stage 2 + 3 latency per query through TwoStageIndex.search (shortlist 100, verify_top R) and
     the mAP of the ASMK*-only ranking with and without stage 3.

Usage: .venv/bin/python benchmarks/verification.py [--data ../shared/data/ukbench-dev]
       [--images 400] [--max-size 512] [--codebook 1024] [--cache /tmp/features.npz] [--quick]
``--cache`` keeps the extracted features in a file outside the repository between runs.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from asmk_index import Codebook, LocalFeatureStore, TwoStageIndex  # noqa: E402
from asmk_index.local_store import binary_signatures  # noqa: E402
from asmk_index.verification import (VerificationConfig, _fit,  # noqa: E402
                                     tentative_matches)
from imagedata.revisitop import evaluate_revisitop, load_revisitop  # noqa: E402
from mda import ExtractionConfig, MdaConfig, MdaModel, extract_local_features  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ukbench-dev"
QUERY_ASSIGNMENT = 5           # words per query descriptor quantized (ASMK*'s default)
FPR_TARGET = 0.01              # recall is reported where at most this share of unrelated pairs pass
# planted homographies: rotation (degrees), scale range, shift (share of the side), perspective
PLANTED_ROTATION_DEG, PLANTED_SCALES, PLANTED_SHIFT, PLANTED_PERSPECTIVE = 20.0, (0.8, 1.1), 0.05, 3e-4
# a recovered homography within one feature-map cell at scale 1 (stride 16 px, photos at most
# max_size wide) of the planted one, on average at the photo's features, is a success
PLANTED_SUCCESS_PX = 16.0
LATENCY_REPEATS = 3            # runs per query in the latency table (the best one counts)


# --------------------------------------------------------------------- features
def make_model(paths, args):
    """Untrained MDA heads, the reduction PCA-whitened on 20 photos spread over ``paths``
    (deterministic, so cached features and a later extraction agree)."""
    torch.manual_seed(0)
    model = MdaModel(MdaConfig())
    model.eval()
    model.fit_reduction([str(p) for p in paths[::max(1, len(paths) // 20)]][:20],
                        max_images=20, features_per_image=300, scales=(1.0,),
                        max_size=args.max_size)
    return model


def extract_all(paths, model, args):
    """Per photo: (descriptors (n, 128), xy (n, 2), scale (n,))."""
    config = ExtractionConfig(scales=(1.0, 0.7071, 0.5), max_size=args.max_size, top_n=args.top_n)
    features = []
    with torch.no_grad():
        for path in paths:
            f = extract_local_features(model, path, config=config)
            features.append((f.descriptors, np.stack([f.x, f.y], 1).astype(np.float32),
                             f.scale.astype(np.float32)))
    return features


def load_features(paths, model, args):
    if args.cache and Path(args.cache).is_file():
        with np.load(args.cache) as data:
            data = {name: data[name] for name in data.files}     # each array read once
        if data["n"] == len(paths) and data["max_size"] == args.max_size:
            bounds = data["bounds"]
            return [(data["desc"][a:b], data["xy"][a:b], data["scale"][a:b])
                    for a, b in zip(bounds[:-1], bounds[1:])]
    features = extract_all(paths, model, args)
    if args.cache:
        bounds = np.concatenate([[0], np.cumsum([len(f[0]) for f in features])])
        np.savez(args.cache, n=len(paths), max_size=args.max_size, bounds=bounds,
                 desc=np.concatenate([f[0] for f in features]),
                 xy=np.concatenate([f[1] for f in features]),
                 scale=np.concatenate([f[2] for f in features]))
    return features


class Prepared:
    """Codebook, per-photo query words (n, QUERY_ASSIGNMENT) and signatures, and the store."""

    def __init__(self, features, codebook):
        self.features, self.codebook = features, codebook
        self._matches = {}                      # (query, image, matching options) -> pairs
        self.store = LocalFeatureStore(codebook.dim)
        self.query_words, self.query_signatures = [], []
        for number, (descriptors, xy, scale) in enumerate(features):
            words = codebook.quantize(descriptors, QUERY_ASSIGNMENT)
            self.query_words.append(words)
            self.query_signatures.append(binary_signatures(descriptors, words,
                                                           codebook.centroids))
            self.store.add(np.full(len(xy), number), words[:, 0],
                           self.query_signatures[-1][:, 0], np.column_stack([xy, scale]))

    def matches(self, query, image, config):
        """(pairs (k, 2), query xy, db xy) for one photo pair (matches cached: the fit's
        parameters do not change them)."""
        stored = self.store.get(image)
        assignment = config.query_assignment
        key = (query, image, assignment, config.max_hamming, config.one_to_one)
        if key not in self._matches:
            self._matches[key], _ = tentative_matches(
                self.query_words[query][:, :assignment],
                self.query_signatures[query][:, :assignment], stored.words, stored.signatures,
                config.max_hamming, one_to_one=config.one_to_one)
        return self._matches[key], self.features[query][1], np.asarray(stored.xy)


def subset_gnd(gnd, n_images):
    """Ground truth of the first ``n_images`` photos as queries and database."""
    return [{**entry, **{key: [i for i in entry[key] if i < n_images]
                         for key in ("easy", "hard", "junk")}} for entry in gnd[:n_images]]


def photo_pairs(gnd, n_images, rng):
    """(true pairs, unrelated pairs) as (query, image) tuples among the first n_images photos."""
    true, unrelated = [], []
    for query, entry in enumerate(gnd[:n_images]):
        positives = [p for p in list(entry["easy"]) + list(entry["hard"]) if p < n_images]
        true += [(query, p) for p in positives]
        excluded = set(positives) | set(entry["junk"]) | {query}
        candidates = [i for i in range(n_images) if i not in excluded]
        unrelated += [(query, int(i)) for i in rng.choice(candidates, len(positives),
                                                          replace=False)]
    return true, unrelated


# --------------------------------------------------------------------- estimators
class KorniaEstimator:
    """kornia.geometry.ransac.RANSAC on CPU tensors, same threshold/minimum inliers."""

    def __init__(self, model_type, config):
        from kornia.geometry.ransac import RANSAC
        self.ransac = RANSAC(model_type=model_type, inl_th=config.threshold_px,
                             max_iter=10, confidence=config.confidence, seed=0)
        self.config = config

    def __call__(self, pairs, query_xy, db_xy):
        if len(pairs) < max(self.config.min_inliers, 4):
            return 0, None
        source = torch.from_numpy(query_xy[pairs[:, 0]].astype(np.float64))
        target = torch.from_numpy(db_xy[pairs[:, 1]].astype(np.float64))
        model, inliers = self.ransac(source, target)
        count = int(inliers.sum())
        return (count, model.numpy()) if count >= self.config.min_inliers else (0, None)


def opencv_estimator(config):
    def estimate(pairs, query_xy, db_xy):
        result = _fit(query_xy, db_xy, pairs, config)
        return result.inliers, result.model
    return estimate


def auc(positive, negative):
    """Probability that a true pair has more inliers than an unrelated one (ties count half)."""
    positive, negative = np.asarray(positive, float), np.asarray(negative, float)
    greater = (positive[:, None] > negative[None]).mean()
    ties = (positive[:, None] == negative[None]).mean()
    return float(greater + 0.5 * ties)


def recall_at_fpr(positive, negative, target=FPR_TARGET):
    """(recall of true pairs, threshold): the smallest inlier count t >= 1 that at most ``target``
    of the unrelated pairs reach, and the share of true pairs reaching it."""
    positive, negative = np.asarray(positive), np.asarray(negative)
    for threshold in range(1, int(max(positive.max(initial=0), negative.max(initial=0))) + 2):
        if (negative >= threshold).mean() <= target:
            return float((positive >= threshold).mean()), threshold
    return 0.0, None


def evaluate_estimator(prepared, true, unrelated, config, estimate):
    timings, counts = [], {"true": [], "unrelated": []}
    for label, pairs_list in (("true", true), ("unrelated", unrelated)):
        for query, image in pairs_list:
            pairs, query_xy, db_xy = prepared.matches(query, image, config)
            tick = time.perf_counter()
            inliers, _ = estimate(pairs, query_xy, db_xy)
            timings.append(time.perf_counter() - tick)
            counts[label].append(inliers)
    recall, threshold = recall_at_fpr(counts["true"], counts["unrelated"])
    return {"ms": 1000 * float(np.mean(timings)), "true": float(np.mean(counts["true"])),
            "unrelated": float(np.mean(counts["unrelated"])),
            "auc": auc(counts["true"], counts["unrelated"]), "recall": recall,
            "threshold": threshold}


def print_header(title):
    print(f"\n{title}")
    print(f"{'variant':44s} {'ms/pair':>8s} {'inl true':>9s} {'inl unrel':>9s} {'AUC':>6s} "
          f"{'R@1%':>6s} {'t@1%':>5s}", flush=True)


def print_row(name, r):
    print(f"{name:44s} {r['ms']:8.3f} {r['true']:9.2f} {r['unrelated']:9.2f} {r['auc']:6.3f} "
          f"{r['recall']:6.3f} {str(r['threshold']):>5s}", flush=True)


def compare_estimators(prepared, true, unrelated, base):
    # min_inliers 1 here: the table shows the raw inlier counts; R@1% then picks the cut-off
    base = replace(base, min_inliers=1)
    print_header(f"Estimators (max_hamming {base.max_hamming}, threshold {base.threshold_px} px, "
                 f"query words {base.query_assignment})")
    for model in ("affine", "homography"):
        for estimator in ("magsac", "accurate", "ransac"):
            config = replace(base, model=model, estimator=estimator)
            print_row(f"opencv {model} {estimator}", evaluate_estimator(
                prepared, true, unrelated, config, opencv_estimator(config)))
        config = replace(base, model=model)
        print_row(f"kornia {model} RANSAC", evaluate_estimator(
            prepared, true, unrelated, config, KorniaEstimator(model, config)))


def operating_point(prepared, true, unrelated, config):
    """Share of true and of unrelated pairs that ``config`` (its min_inliers included) verifies."""
    verified = {}
    for label, pairs_list in (("true", true), ("unrelated", unrelated)):
        verified[label] = np.mean([_fit(*reorder(prepared.matches(q, i, config)), config).verified
                                   for q, i in pairs_list])
    print(f"\nDefaults {config}:\n  verified: {verified['true']:.3f} of true pairs, "
          f"{verified['unrelated']:.3f} of unrelated pairs", flush=True)


def reorder(matches):
    """(pairs, query xy, db xy) -> the argument order of ``_fit``: (query xy, db xy, pairs)."""
    pairs, query_xy, db_xy = matches
    return query_xy, db_xy, pairs


def sweep(prepared, true, unrelated, base, quick):
    base = replace(base, min_inliers=1)
    hammings = (32, 48, 64) if quick else (32, 40, 48, 56, 64)
    thresholds = (8.0, 16.0) if quick else (8.0, 12.0, 16.0, 24.0, 32.0)
    print_header(f"Threshold sweep ({base.model} {base.estimator})")
    for assignment in ((1,) if quick else (1, 3)):
        for hamming in hammings:
            for threshold in thresholds:
                config = replace(base, max_hamming=hamming, threshold_px=threshold,
                                 query_assignment=assignment)
                print_row(f"words {assignment} hamming {hamming} px {threshold:g}",
                          evaluate_estimator(prepared, true, unrelated, config,
                                             opencv_estimator(config)))


# --------------------------------------------------------------------- planted homographies
def random_homography(rng, height, width):
    """A rotation, scaling and shift about the image centre with a perspective term, (3, 3)."""
    angle = np.deg2rad(rng.uniform(-PLANTED_ROTATION_DEG, PLANTED_ROTATION_DEG))
    scale = rng.uniform(*PLANTED_SCALES)
    cos, sin = scale * np.cos(angle), scale * np.sin(angle)
    shift = rng.uniform(-PLANTED_SHIFT, PLANTED_SHIFT, 2) * [width, height]
    perspective = rng.uniform(-PLANTED_PERSPECTIVE, PLANTED_PERSPECTIVE, 2)
    centre = np.array([[1, 0, width / 2], [0, 1, height / 2], [0, 0, 1]])
    about_origin = np.array([[cos, -sin, shift[0]], [sin, cos, shift[1]], [*perspective, 1]])
    return centre @ about_origin @ np.linalg.inv(centre)


def planted(paths, model, codebook, args, base, rng):
    """Each photo and a copy warped by a random homography: the homography fitted by each
    estimator against the planted one, as the mean transfer error at the photo's features."""
    from kornia.geometry.transform import warp_perspective
    from PIL import Image
    extraction = ExtractionConfig(scales=(1.0, 0.7071, 0.5), max_size=args.max_size,
                                  top_n=args.top_n)
    estimators = ("magsac", "accurate", "ransac")
    errors = {name: [] for name in estimators}
    inliers = {name: [] for name in estimators}
    timings = {name: [] for name in estimators}
    identity = []
    for path in paths:
        image = np.asarray(Image.open(path).convert("RGB"))
        height, width = image.shape[:2]
        planted_h = random_homography(rng, height, width)
        tensor = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float()
        warped = warp_perspective(tensor, torch.from_numpy(planted_h)[None].float(),
                                  (height, width))
        warped = warped[0].permute(1, 2, 0).clamp(0, 255).round().byte().numpy()
        with torch.no_grad():
            a = extract_local_features(model, image, config=extraction)
            b = extract_local_features(model, warped, config=extraction)
        words_a = codebook.quantize(a.descriptors, base.query_assignment)
        words_b = codebook.quantize(b.descriptors, 1)[:, 0]
        pairs, _ = tentative_matches(words_a, query_signatures(a.descriptors, words_a, codebook),
                                     words_b, query_signatures(b.descriptors, words_b, codebook),
                                     base.max_hamming, one_to_one=base.one_to_one)
        points = np.stack([a.x, a.y], 1).astype(np.float32)
        truth = project(planted_h, points)
        identity.append(float(np.linalg.norm(points - truth, axis=1).mean()))
        for name in estimators:
            config = replace(base, estimator=name)
            tick = time.perf_counter()
            result = _fit(points, np.stack([b.x, b.y], 1).astype(np.float32), pairs, config)
            timings[name].append(time.perf_counter() - tick)
            inliers[name].append(result.inliers)
            errors[name].append(np.inf if result.model is None else float(
                np.linalg.norm(project(result.model, points) - truth, axis=1).mean()))
    print(f"\nPlanted homographies ({len(paths)} photos; rotation up to "
          f"{PLANTED_ROTATION_DEG:g} deg, scale {PLANTED_SCALES}, perspective up to "
          f"{PLANTED_PERSPECTIVE:g}; {base.model}, {base.threshold_px:g} px): mean transfer "
          f"error at the photo's features; the identity's median {np.median(identity):.1f} px")
    print(f"{'estimator':10s} {'median px':>10s} {f'< {PLANTED_SUCCESS_PX:g} px':>9s} "
          f"{'inliers':>8s} {'fit ms':>7s}")
    for name in estimators:
        error = np.asarray(errors[name])
        print(f"{name:10s} {np.median(error):10.1f} {np.mean(error < PLANTED_SUCCESS_PX):9.2f} "
              f"{np.mean(inliers[name]):8.1f} {1000 * np.mean(timings[name]):7.2f}")


def query_signatures(descriptors, words, codebook):
    return binary_signatures(descriptors, words, codebook.centroids)


def project(matrix, points):
    homogeneous = np.column_stack([points, np.ones(len(points))]) @ np.asarray(matrix).T
    return homogeneous[:, :2] / homogeneous[:, 2:]


# --------------------------------------------------------------------- stages 2 + 3
def latency_and_map(prepared, gnd, config, args):
    """TwoStageIndex over the photos (global descriptors: the mean local descriptor, a stand-in
    so stage 1 returns a plausible shortlist); per query, stage 2 (ASMK* of 100) + stage 3."""
    n = len(prepared.features)
    descriptors = [f[0] for f in prepared.features]
    global_descriptors = np.stack([d.mean(0) for d in descriptors])
    index = TwoStageIndex.create(prepared.codebook, global_descriptors.shape[1],
                                 local_features=True)
    index.add(global_descriptors, np.arange(n), np.concatenate(descriptors),
              np.repeat(np.arange(n), [len(d) for d in descriptors]),
              local_geometry=np.concatenate([np.column_stack([f[1], f[2]])
                                             for f in prepared.features]))
    print(f"\nStage 2 + 3 per query (shortlist {args.shortlist}, {n} images, "
          f"{config.model} {config.estimator}; ranking: ASMK* then verified re-rank)")
    print(f"{'verify_top':>10s} {'stage2 ms':>10s} {'stage3 ms':>10s} {'2+3 ms':>8s} "
          f"{'mAP E':>7s} {'mAP M':>7s}")
    for top in [0] + list(args.verify_top):
        ranks = np.zeros((n, n), np.int64)
        stage2, stage3 = [], []
        for query in range(n):
            xy = prepared.features[query][1]
            geometry = np.column_stack([xy, prepared.features[query][2]])
            result = index.search(global_descriptors[query], descriptors[query], k=n,
                                  shortlist=n, mode="two_stage", fusion="asmk",
                                  verify_top=top, query_geometry=geometry,
                                  verification=config)
            order = result.ids
            ranks[query, :order.size] = order
            stage2.append(result.stage2_seconds)
            stage3.append(result.stage3_seconds)
        quality = evaluate_revisitop(ranks, subset_gnd(gnd, n), query_major=True)
        # latency with the shortlist the goal names (the mAP run above ranks every image); the
        # best of LATENCY_REPEATS runs per query (the machine is shared), median over queries
        latency2, latency3 = [], []
        for query in range(min(n, args.latency_queries)):
            geometry = np.column_stack([prepared.features[query][1], prepared.features[query][2]])
            runs = [index.search(global_descriptors[query], descriptors[query], k=10,
                                 shortlist=args.shortlist, fusion="asmk", verify_top=top,
                                 query_geometry=geometry, verification=config)
                    for _ in range(LATENCY_REPEATS)]
            latency2.append(min(run.stage2_seconds for run in runs))
            latency3.append(min(run.stage3_seconds for run in runs))
        s2, s3 = 1000 * np.median(latency2), 1000 * np.median(latency3)
        print(f"{top:10d} {s2:10.2f} {s3:10.2f} {s2 + s3:8.2f} {quality['mAP']['easy']:7.2f} "
              f"{quality['mAP']['medium']:7.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--max-size", type=int, default=512)
    parser.add_argument("--top-n", type=int, default=600)
    parser.add_argument("--codebook", type=int, default=1024)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--planted", type=int, default=30, help="photos for planted homographies")
    parser.add_argument("--shortlist", type=int, default=100)
    parser.add_argument("--verify-top", type=int, nargs="+", default=[20, 50, 100])
    parser.add_argument("--latency-queries", type=int, default=100)
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["estimators", "sweep", "planted", "latency"])
    parser.add_argument("--model", default=VerificationConfig.model, choices=["affine", "homography"],
                        help="model of the sweep and latency steps (planted: homography)")
    parser.add_argument("--estimator", default=VerificationConfig.estimator)
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.planted, args.codebook = min(args.images, 40), 4, 256
        args.verify_top, args.latency_queries = [20], 10
    torch.set_num_threads(2)
    dataset = load_revisitop(args.data)
    paths = [Path(path) for path in dataset.database_paths()][:args.images]
    import cv2
    import os
    print(f"{len(paths)} photos of {args.data.name}, max side {args.max_size}, top {args.top_n} "
          f"features, codebook {args.codebook}; OpenCV {cv2.__version__} "
          f"({cv2.getNumThreads()} threads), torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs")
    tick = time.perf_counter()
    model = make_model(paths, args)
    features = load_features(paths, model, args)
    print(f"features: {np.mean([len(f[0]) for f in features]):.0f} per photo "
          f"({time.perf_counter() - tick:.1f} s)")
    codebook = Codebook.train(np.concatenate([f[0] for f in features]), args.codebook, seed=0)
    prepared = Prepared(features, codebook)
    rng = np.random.default_rng(0)
    true, unrelated = photo_pairs(dataset.gnd, len(paths), rng)
    print(f"{len(true)} true pairs, {len(unrelated)} unrelated pairs")
    base = VerificationConfig(model=args.model, estimator=args.estimator)
    operating_point(prepared, true, unrelated, base)
    if "estimators" not in args.skip:
        compare_estimators(prepared, true, unrelated, base)
    if "sweep" not in args.skip:
        sweep(prepared, true, unrelated, base, args.quick)
    if "planted" not in args.skip:
        planted(paths[:args.planted], model, codebook, args, replace(base, model="homography"), rng)
    if "latency" not in args.skip:
        latency_and_map(prepared, dataset.gnd, base, args)


if __name__ == "__main__":
    main()
