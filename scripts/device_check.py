#!/usr/bin/env python
"""The checks that need a GPU, as one short run for a machine whose faiss sees a CUDA GPU.

    .venv/bin/python scripts/device_check.py                    # on the GPU machine (~5 min)
    .venv/bin/python scripts/device_check.py --allow-cpu --quick  # the same steps, CPU paths only

Steps (each prints a line; a failed check exits with status 1 and says what differed):

1. environment: GPUs seen by faiss and by torch;
2. quantization: ``Codebook.quantize`` on its automatic path ("faiss-gpu" there) against another
   exact CPU path ("amx-bf16" where the CPU has AMX, else "blas"): words that differ must be
   float32 near-ties (squared distances within 1e-5 relative), and the time per descriptor of both;
3. k-means: ``Codebook.train`` (on the GPU there): its time, and its mean squared quantization
   error must be below that of a codebook of sampled descriptors;
4. ASMK*: an index built from the automatic path's words searches like one built from the exact
   CPU words (top-10 overlap, scores of common ids within 1e-5);
5. global index: exact ``GlobalIndex`` search with and without the GPU gives the same ids;
6. the engine benchmark ``benchmarks/asmk_vs_reference.py`` (4096 words, 10k images; ``--quick``:
   its smoke size) with the automatic and the exact CPU quantizers against the ``asmk`` package.

Without a GPU it stops at step 1 unless ``--allow-cpu`` is given, which runs every step on the CPU
paths (so the script itself is tested: tests/test_device_check.py).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from asmk_index import AsmkIndex, Codebook, GlobalIndex  # noqa: E402
from asmk_index.codebook import amx_usable  # noqa: E402
from asmk_vs_reference import SyntheticData, make_queries  # noqa: E402

NEAR_TIE = 1e-5  # relative gap of squared distances under which float32 products may disagree
SCORE_TOLERANCE = 1e-5


class CheckFailed(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def exact_quantizer(automatic: str) -> str:
    """The exact CPU path to compare the automatic one with: another path than it."""
    choices = (["amx-bf16"] if amx_usable() else []) + ["blas"]
    return next((choice for choice in choices if choice != automatic), choices[0])


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def squared_distances(descriptors, centroids, words):
    """(N,) float64 squared distances of each descriptor to its word's centroid."""
    return ((descriptors.astype(np.float64) - centroids[words].astype(np.float64)) ** 2).sum(1)


def step_quantization(data, patterns, size, n_images):
    descriptors, _ = data.chunk(patterns, 0, n_images)
    sample, _ = data.chunk(patterns, 10 ** 9, max(size * 2 // data.per_image + 1, 4))
    centroids = sample[np.random.default_rng(1).choice(len(sample), size, replace=False)]
    automatic, exact = Codebook.from_centroids(centroids), Codebook.from_centroids(centroids)
    exact.use_quantizer(exact_quantizer(automatic.quantizer))
    automatic.quantize(descriptors[:1000])  # builds and uploads its index
    exact.quantize(descriptors[:1000])
    words, automatic_seconds = timed(automatic.quantize, descriptors, 1)
    exact_words, exact_seconds = timed(exact.quantize, descriptors, 1)
    differ = np.flatnonzero(words[:, 0] != exact_words[:, 0])
    if differ.size:
        ours = squared_distances(descriptors[differ], centroids, words[differ, 0])
        best = squared_distances(descriptors[differ], centroids, exact_words[differ, 0])
        gap = np.abs(ours - best) / np.maximum(best, 1e-30)
        check(bool((gap <= NEAR_TIE).all()),
              f"quantization: {int((gap > NEAR_TIE).sum())} of {len(descriptors)} words of "
              f"'{automatic.quantizer}' are not near-ties of the exact ones (largest relative "
              f"gap {gap.max():.2e})")
    rows, ratio = len(descriptors), exact_seconds / automatic_seconds
    ties = ", all float32 near-ties" if differ.size else ""
    print(f"2. quantization, {size} words, {rows} descriptors: '{automatic.quantizer}' "
          f"{automatic_seconds / rows * 1e6:.3f} us/descriptor, exact '{exact.quantizer}' "
          f"{exact_seconds / rows * 1e6:.3f} us/descriptor ({ratio:.1f}x); {differ.size} words "
          f"differ{ties}")
    return automatic, exact


def step_kmeans(data, patterns, size):
    training, _ = data.chunk(patterns, 10 ** 8, size * 40 // data.per_image + 1)
    codebook, seconds = timed(lambda: Codebook.train(training, size, seed=0, niter=10))
    sampled = training[np.random.default_rng(2).choice(len(training), size, replace=False)]
    trained_error = squared_distances(training, codebook.centroids,
                                      codebook.quantize(training)[:, 0]).mean()
    sampled_codebook = Codebook.from_centroids(sampled)
    sampled_error = squared_distances(training, sampled,
                                      sampled_codebook.quantize(training)[:, 0]).mean()
    check(bool(np.isfinite(codebook.centroids).all()), "k-means: centroids are not finite")
    check(trained_error < sampled_error,
          f"k-means: mean squared error {trained_error:.4f} is not below that of sampled "
          f"descriptors ({sampled_error:.4f})")
    where = "GPU" if faiss.get_num_gpus() > 0 else "CPU"
    print(f"3. k-means on the {where}: {size} words from {len(training)} descriptors in "
          f"{seconds:.1f} s; mean squared error {trained_error:.4f} against {sampled_error:.4f} "
          "for sampled descriptors")


def step_asmk(data, patterns, automatic, exact, n_images):
    indexes = []
    for codebook in (automatic, exact):
        index = AsmkIndex(codebook)
        for descriptors, ids in data.chunks(patterns, n_images):
            index.add(descriptors, ids)
        indexes.append(index)
    overlaps, largest = [], 0.0
    for query in make_queries(data, patterns, 10, seed=3):
        (ids_a, scores_a), (ids_b, scores_b) = (index.search(query, 10) for index in indexes)
        common, where_a, where_b = np.intersect1d(ids_a, ids_b, return_indices=True)
        overlaps.append(len(common) / 10)
        if len(common):
            largest = max(largest, float(np.abs(scores_a[where_a] - scores_b[where_b]).max()))
    check(min(overlaps) >= 0.9 and largest <= SCORE_TOLERANCE,
          f"ASMK*: '{automatic.quantizer}' and '{exact.quantizer}' indexes differ (top-10 "
          f"overlap {min(overlaps):.2f}, largest score difference {largest:.2e})")
    print(f"4. ASMK* over {n_images} images: '{automatic.quantizer}' and '{exact.quantizer}' "
          f"words give top-10 overlap >= {min(overlaps):.2f}, scores within {largest:.1e}")


def step_global(n_images, dim=512):
    rng = np.random.default_rng(4)
    vectors = rng.standard_normal((n_images, dim)).astype(np.float32)
    queries = vectors[:50] + 0.1 * rng.standard_normal((50, dim)).astype(np.float32)
    results = []
    for use_gpu in (True, False):
        index = GlobalIndex(dim, use_gpu=use_gpu)
        index.add(vectors, np.arange(n_images))
        results.append((index.use_gpu, index.search(queries, 10)[0]))
    (gpu_used, gpu_ids), (_, cpu_ids) = results
    check(np.array_equal(gpu_ids, cpu_ids), "global index: GPU and CPU searches differ")
    print(f"5. global index, {n_images} x {dim}: GPU used {gpu_used}; the same top-10 ids as "
          "the CPU for 50 queries")


def step_benchmark(quick: bool, automatic: str):
    command = [sys.executable, str(ROOT / "benchmarks" / "asmk_vs_reference.py"),
               "--quantizers", "auto", exact_quantizer(automatic)]
    command += ["--quick"] if quick else ["--codebooks", "4096", "--images", "10000",
                                          "--reference-images", "10000"]
    print("6. " + " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run every step on the CPU paths when faiss sees no GPU")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--skip-benchmark", action="store_true")
    args = parser.parse_args(argv)

    import torch

    gpus = faiss.get_num_gpus()
    print(f"1. faiss {faiss.__version__} sees {gpus} GPU(s); torch {torch.__version__}, CUDA "
          f"{torch.cuda.is_available()}; AMX usable {amx_usable()}", flush=True)
    if gpus == 0 and not args.allow_cpu:
        print("no GPU: faiss sees none, so there is nothing to check here "
              "(--allow-cpu runs the steps on the CPU paths)", file=sys.stderr)
        return 2
    size, rows, images = (256, 20000, 60) if args.quick else (4096, 600000, 2000)
    data = SyntheticData()
    patterns = data.patterns()
    try:
        automatic, exact = step_quantization(data, patterns, size, rows // data.per_image)
        step_kmeans(data, patterns, size)
        step_asmk(data, patterns, automatic, exact, images)
        step_global(images * 10)
        if not args.skip_benchmark:
            step_benchmark(args.quick, automatic.quantizer)
    except CheckFailed as failure:
        print(f"FAILED: {failure}", file=sys.stderr)
        return 1
    print("all device checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
