"""Benchmark: our ASMK* engine (asmk_index) against the reference ``asmk`` package (0.1.1).

Both get the same synthetic clustered 128-d descriptors (generated in chunks from a seed) and the
same centroids, and each quantizes them with its own exact search (ours: Codebook.quantize by the
path --quantizers names, "auto" being AMX bfloat16 tiles with exact re-ranking where the CPU has
AMX and BLAS blocks / faiss IndexFlatL2 elsewhere; the reference: faiss IndexFlatL2). Per configuration (codebook size x number of
images) it prints build time (quantize + aggregate + invert, and the part after quantization:
the median of --build-repeats builds from the words of one quantization, for both engines),
median query latency (full search, and without the query's own quantization; ours also score() of
a 100-image shortlist), bytes per image and ours/reference ratios.

The reference is pure Python per image/word/posting; with ``--reference-images N`` it indexes only
the first N images, which the table states (rows are never extrapolated).

    .venv/bin/python benchmarks/asmk_vs_reference.py --quick
    .venv/bin/python benchmarks/asmk_vs_reference.py --codebooks 4096 65536 --images 10000 100000 \\
        --reference-images 10000
    .venv/bin/python benchmarks/asmk_vs_reference.py --codebooks 4096 --images 10000 100000 \\
        --distinct-images 10000 --reference-images 10000   # 100k = the 10k quantized once, x10
    .venv/bin/python benchmarks/asmk_vs_reference.py --quantizers auto blas ...  # with and without AMX
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asmk_index  # noqa: E402
from asmk_index.asmk import AsmkIndex  # noqa: E402
from asmk_index import codebook as codebook_module  # noqa: E402
from asmk_index.codebook import Codebook  # noqa: E402


@dataclass(frozen=True)
class SyntheticData:
    """Images made of a few 'patterns' (unit vectors) each, descriptors = pattern + noise."""

    dim: int = 128
    per_image: int = 300
    n_patterns: int = 50000
    patterns_per_image: int = 30
    noise: float = 0.06  # per dimension (noise norm ~0.7 against unit patterns)
    seed: int = 0
    chunk_images: int = 2000

    def patterns(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 0])
        patterns = rng.standard_normal((self.n_patterns, self.dim)).astype(np.float32)
        return patterns / np.linalg.norm(patterns, axis=1, keepdims=True)

    def chunk(self, patterns: np.ndarray, first_image: int, n_images: int):
        """(descriptors (n*per_image, D) float32, image ids) of images first..first+n-1."""
        rng = np.random.default_rng([self.seed, 1, first_image])
        chosen = rng.integers(0, self.n_patterns, (n_images, self.patterns_per_image))
        which = rng.integers(0, self.patterns_per_image, (n_images, self.per_image))
        centers = patterns[np.take_along_axis(chosen, which, axis=1).reshape(-1)]
        descriptors = centers + self.noise * rng.standard_normal(centers.shape).astype(np.float32)
        descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
        ids = np.repeat(np.arange(first_image, first_image + n_images), self.per_image)
        return descriptors.astype(np.float32), ids

    def chunks(self, patterns, n_images):
        for first in range(0, n_images, self.chunk_images):
            yield self.chunk(patterns, first, min(self.chunk_images, n_images - first))


def make_queries(data: SyntheticData, patterns, n_queries: int, seed: int):
    """Perturbed, subsampled copies of the first database images."""
    descriptors, ids = data.chunk(patterns, 0, n_queries)
    rng = np.random.default_rng([seed, 2])
    queries = []
    for image in range(n_queries):
        own = descriptors[ids == image]
        keep = own[rng.random(own.shape[0]) < 0.8]
        noisy = keep + 0.05 * rng.standard_normal(keep.shape).astype(np.float32)
        queries.append((noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32))
    return queries


def sample_codebook(data: SyntheticData, patterns, size: int, train: bool, seed: int) -> Codebook:
    descriptors, _ = data.chunk(patterns, 10 ** 9, max(size * 4 // data.per_image + 1, 50))
    if train:
        return Codebook.train(descriptors, size, seed=seed, max_points_per_centroid=4, niter=5)
    rng = np.random.default_rng([seed, 3])
    return Codebook.from_centroids(descriptors[rng.choice(descriptors.shape[0], size, replace=False)])


class MethodTimer:
    """Adds up the seconds spent in ``obj.name(...)`` (wraps the bound method on the instance)."""

    def __init__(self, obj, name: str):
        self.seconds = 0.0
        self._method = getattr(obj, name)
        setattr(obj, name, self)

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._method(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def timed_queries(run_query, quantize_timer, queries):
    """Median seconds per query: (total, total minus the query's own quantization)."""
    totals, engine = [], []
    for query in queries:
        quantize_timer.seconds = 0.0
        start = time.perf_counter()
        run_query(query)
        totals.append(time.perf_counter() - start)
        engine.append(totals[-1] - quantize_timer.seconds)
    return statistics.median(totals), statistics.median(engine)


def quantized_chunks(codebook, data, patterns, n_images):
    """Yield (descriptors, ids, words, seconds to quantize) with our exact quantizer."""
    for descriptors, ids in data.chunks(patterns, n_images):
        start = time.perf_counter()
        words = codebook.quantize(descriptors, 1)
        yield descriptors, ids, words, time.perf_counter() - start


class RepeatedChunks:
    """The first ``distinct`` images, quantized once (cached), repeated under new ids.

    ``chunks(n)`` yields n images: copy r of image i gets id ``i + r * distinct``; only the first
    copy carries its quantization seconds, so the build time counts the quantization of the
    distinct images once (the table says so). Exact words for every descriptor, no extrapolation.
    """

    def __init__(self, codebook, data, patterns, distinct: int):
        self.cache = list(quantized_chunks(codebook, data, patterns, distinct))
        self.distinct = distinct
        self.quantize_seconds = sum(chunk[3] for chunk in self.cache)

    def chunks(self, n_images):
        if n_images % self.distinct and n_images > self.distinct:
            raise SystemExit(f"--images {n_images} must be a multiple of --distinct-images "
                             f"{self.distinct}")
        for copy in range(max(n_images // self.distinct, 1)):
            for descriptors, ids, words, seconds in self.cache:
                keep = ids < n_images
                if not keep.any():
                    return
                if not keep.all():
                    descriptors, ids, words = descriptors[keep], ids[keep], words[keep]
                    seconds *= float(keep.mean())
                yield descriptors, ids + copy * self.distinct, words, seconds if copy == 0 else 0.0


def run_ours(codebook, chunks, queries, build_repeats: int):
    """Build (the chunks' quantization, then ``build_repeats`` index builds from those words:
    the median counts), then time full searches and score() of random 100-image shortlists."""
    chunks = list(chunks)
    quantize_time = sum(chunk[3] for chunk in chunks)
    build_times = []
    for _ in range(build_repeats):
        index = AsmkIndex(codebook, binary=True, use_idf=False)
        start = time.perf_counter()
        for descriptors, ids, words, _ in chunks:
            index.add(descriptors, ids, words=words)
        build_times.append(time.perf_counter() - start)
    rest_time = statistics.median(build_times)
    rng = np.random.default_rng(5)
    timer = MethodTimer(codebook, "quantize")
    query_time, engine_time = timed_queries(lambda query: index.search(query, 100), timer, queries)
    shortlists = iter([rng.choice(index.image_ids, min(100, len(index)), replace=False)
                       for _ in queries])
    score_time, _ = timed_queries(lambda query: index.score(query, next(shortlists)), timer,
                                  queries)
    del codebook.quantize  # unwrap
    return {"images": len(index), "quantize": quantize_time,
            "build": quantize_time + rest_time, "after_quantize": rest_time,
            "query": query_time, "query_engine": engine_time,
            "score100": score_time,
            "bytes_per_image": index.bytes_per_image(), "index": index}


class RecordedQuantizer:
    """Stands in for the reference codebook's quantize(): replays the results of its first build
    in call order, so that a repeated build times only the reference's aggregation and inversion."""

    def __init__(self, cdb):
        self.results, self._replay = [], None
        self._quantize = cdb.quantize

    def record(self, *args, **kwargs):
        result = self._quantize(*args, **kwargs)
        self.results.append(result)
        return result

    def replay(self, *args, **kwargs):
        return next(self._replay)

    def rewind(self):
        self._replay = iter(self.results)


def reference_bytes(ivf) -> int:
    total = np.asarray(ivf.norm_factor).nbytes + ivf.counts.nbytes + ivf.idf.nbytes
    for vecs, imids in zip(ivf.ivf_vecs, ivf.ivf_image_ids):
        if vecs is not None:
            total += vecs.nbytes + imids.nbytes
    return total


def run_reference(codebook, chunks, queries, build_repeats: int):
    from asmk import asmk_method
    from asmk import codebook as reference_codebook
    from asmk import index as reference_index
    params = {"index": {"gpu_id": None}, "train_codebook": {"codebook": {"size": codebook.size}},
              "build_ivf": {"kernel": {"binary": True}, "ivf": {"use_idf": False},
                            "quantize": {"multiple_assignment": 1}, "aggregate": {}},
              "query_ivf": {"quantize": {"multiple_assignment": 5}, "aggregate": {},
                            "search": {"topk": 100},
                            "similarity": {"similarity_threshold": 0.0, "alpha": 3.0}}}
    cdb = reference_codebook.Codebook(reference_index.initialize_index(None), size=codebook.size)
    cdb.index(np.array(codebook.centroids))
    method = asmk_method.ASMKMethod(params, {}, codebook=cdb)
    recorder = RecordedQuantizer(cdb)
    cdb.quantize = recorder.record
    build_quantize = MethodTimer(cdb, "quantize")
    build_times, n_images = [], 0
    for repeat in range(build_repeats):
        # first build: its own quantize (faiss), aggregate, invert; later ones replay the words
        builder = method.create_ivf_builder()
        start = time.perf_counter()
        for descriptors, ids in chunks:
            builder.add(descriptors, ids)
            n_images = int(ids.max()) + 1
        build_times.append(time.perf_counter() - start)
        if repeat == 0:
            quantize_time = build_quantize.seconds
            del cdb.quantize  # unwrap the timer and the recorder
            build_times[0] -= quantize_time
            cdb.quantize = recorder.replay
        recorder.rewind()
    if "quantize" in vars(cdb):
        del cdb.quantize
    rest_time = statistics.median(build_times)
    method = method.add_ivf_builder(builder)
    timer = MethodTimer(cdb, "quantize")
    query_time, engine_time = timed_queries(
        lambda query: method.query_ivf(query, np.zeros(query.shape[0], dtype=np.int64)), timer,
        queries)
    return {"images": n_images, "quantize": quantize_time,
            "build": quantize_time + rest_time, "after_quantize": rest_time,
            "query": query_time, "query_engine": engine_time,
            "bytes_per_image": reference_bytes(builder.ivf) / n_images}


def format_table(rows) -> str:
    header = ("| codebook | our quantizer | images ours / ref | build quantization s ours / ref "
              "| ASMK* build after quantization s ours / ref (x) "
              "| build incl. quantization s ours / ref (x) "
              "| query ms ours / ref (x) | query without its quantization ms ours / ref (x) "
              "| score(100) ms ours | bytes/image ours / ref (x) |")
    lines = [header, "|" + "---|" * 10]
    for row in rows:
        ours, ref = row["ours"], row.get("ref")
        distinct = row.get("distinct")
        images = f"{ours['images']}" + (f" ({distinct} distinct x{ours['images'] // distinct})"
                                        if distinct and distinct < ours["images"] else "")
        if ref is None:
            lines.append(f"| {row['size']} | {row['quantizer']} | {images} / not run | {ours['quantize']:.1f} / - | "
                         f"{ours['after_quantize']:.2f} / - | {ours['build']:.1f} / - | "
                         f"{ours['query'] * 1e3:.2f} / - | {ours['query_engine'] * 1e3:.2f} / - | "
                         f"{ours['score100'] * 1e3:.2f} | {ours['bytes_per_image']:.0f} / - |")
            continue
        # ratios are per image when the reference indexed a subset (stated in the images column)
        scale = ours["images"] / ref["images"]
        per_image = " per image" if scale != 1 else ""
        engine_ours, engine_ref = ours["query_engine"], ref["query_engine"]
        lines.append(
            f"| {row['size']} | {row['quantizer']} | {images} / {ref['images']}{' (subset)' if scale > 1 else ''} | "
            f"{ours['quantize']:.1f} / {ref['quantize']:.1f} | "
            f"{ours['after_quantize']:.2f} / {ref['after_quantize']:.1f} "
            f"({ref['after_quantize'] * scale / max(ours['after_quantize'], 1e-9):.0f}x{per_image}) | "
            + (f"{ours['build']:.1f} / {ref['build']:.1f} (n/a: copies not re-quantized) | "
               if distinct and distinct < ours["images"] else
               f"{ours['build']:.1f} / {ref['build']:.1f} ({ref['build'] * scale / ours['build']:.1f}x"
               f"{per_image}) | ") +
            f"{ours['query'] * 1e3:.2f} / {ref['query'] * 1e3:.1f} ({ref['query'] / ours['query']:.1f}x"
            f"{', ref on fewer images' if scale > 1 else ''}) | {engine_ours * 1e3:.2f} / "
            f"{engine_ref * 1e3:.1f} ({engine_ref / max(engine_ours, 1e-9):.0f}x) | "
            f"{ours['score100'] * 1e3:.2f} | "
            f"{ours['bytes_per_image']:.0f} / {ref['bytes_per_image']:.0f} "
            f"({ours['bytes_per_image'] / ref['bytes_per_image']:.2f}) |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--codebooks", type=int, nargs="+", default=[4096, 65536])
    parser.add_argument("--images", type=int, nargs="+", default=[10000, 100000])
    parser.add_argument("--reference-images", type=int, default=10000,
                        help="the reference indexes at most this many images (0: skip it)")
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--build-repeats", type=int, default=3,
                        help="index builds from the same words per engine (after one "
                             "quantization); the table gives the median")
    parser.add_argument("--distinct-images", type=int, default=0,
                        help="quantize only this many distinct images (once per codebook) and "
                             "repeat them under new ids up to --images (0: every image distinct)")
    parser.add_argument("--train-codebook", action="store_true",
                        help="k-means codebook (slow on 2 cores); default: sampled descriptors")
    parser.add_argument("--quantizers", nargs="+", default=["auto"],
                        choices=list(codebook_module.QUANTIZER_CHOICES),
                        help="our quantization path(s), each run in turn (see Codebook.use_quantizer)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1k words, 500 images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.build_repeats < 1:
        parser.error("--build-repeats must be at least 1")
    if args.quick:
        args.codebooks, args.images, args.reference_images, args.queries = [1024], [500], 500, 5
    data = SyntheticData(seed=args.seed)
    patterns = data.patterns()
    queries = make_queries(data, patterns, args.queries, args.seed)
    rows = []
    reference_runs = {}  # (words, images) -> result: a row whose reference subset was run reuses it
    for size, quantizer in [(size, quantizer) for size in args.codebooks
                            for quantizer in args.quantizers]:
        codebook = sample_codebook(data, patterns, size, args.train_codebook, args.seed)
        codebook.use_quantizer(quantizer)
        repeated = (RepeatedChunks(codebook, data, patterns, args.distinct_images)
                    if args.distinct_images else None)
        for n_images in args.images:
            n_reference = min(n_images, args.reference_images)
            reference_chunks = []
            run_reference_here = n_reference > 0 and (size, n_reference) not in reference_runs

            def keep_for_reference(chunks):
                # the reference indexes the descriptors of the first n_reference images
                for descriptors, ids, words, seconds in chunks:
                    first = ids < n_reference
                    if first.any() and run_reference_here:
                        reference_chunks.append((descriptors[first], ids[first]))
                    yield descriptors, ids, words, seconds

            source = (repeated.chunks(n_images) if repeated else
                      quantized_chunks(codebook, data, patterns, n_images))
            ours = run_ours(codebook, keep_for_reference(source), queries, args.build_repeats)
            row = {"size": size, "quantizer": codebook.quantizer, "ours": ours,
                   "distinct": args.distinct_images}
            print(f"ours  K={size} ({codebook.quantizer}) images={n_images}: "
                  f"{ours['build']:.1f}s build, "
                  f"{ours['after_quantize']:.2f}s after quantize, {ours['query'] * 1e3:.2f} ms query "
                  f"({ours['query_engine'] * 1e3:.2f} ms without its quantization), "
                  f"{ours['bytes_per_image']:.0f} B/image ({ours['index']})", flush=True)
            del ours["index"]
            if n_reference > 0:
                if run_reference_here:
                    reference_runs[size, n_reference] = run_reference(
                        codebook, reference_chunks, queries, args.build_repeats)
                del reference_chunks
                ref = row["ref"] = reference_runs[size, n_reference]
                print(f"ref   K={size} images={ref['images']}"
                      f"{'' if run_reference_here else ' (same run as above)'}: "
                      f"{ref['build']:.1f}s build, "
                      f"{ref['after_quantize']:.1f}s after quantize, {ref['query'] * 1e3:.1f} ms query "
                      f"({ref['query_engine'] * 1e3:.1f} ms without its quantization), "
                      f"{ref['bytes_per_image']:.0f} B/image", flush=True)
            rows.append(row)
    print()
    print("quantizers, all exact: ours (Codebook.quantize; amx-bf16: AMX bfloat16 tile products "
          "with a proven error bound, then exact re-ranking of the few candidates; blas: faiss "
          "IndexFlatL2 for building, BLAS blocks + compiled k-smallest ranking for queries) and the "
          "reference's (faiss IndexFlatL2 search), each timed inside its own build and query; "
          + (f"images beyond {args.distinct_images} are copies of the first {args.distinct_images} "
             "under new ids (quantized once: our quantize column is for the distinct images); "
             if args.distinct_images else "") +
          f"codebook: {'k-means' if args.train_codebook else 'sampled descriptors'}; "
          f"{data.per_image} descriptors/image, {data.dim}-d; queries: {args.queries}; "
          f"our compiled loops: {asmk_index.get_num_threads()} OpenMP thread(s) for index building")
    print(f"build after quantization: median of {args.build_repeats} builds per engine from the "
          "words of its first build (the reference's later builds replay its recorded quantize() "
          "results)")
    print("'x per image': reference time scaled by (our images / its images) when it ran on a "
          "subset; query latency of the reference is measured on its (smaller) index.")
    print(format_table(rows))


if __name__ == "__main__":
    main()
