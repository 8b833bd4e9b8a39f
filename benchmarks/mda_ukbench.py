"""MDA local features on ukbench-dev: ASMK* retrieval quality (revisitop mAP, N-S) and extraction time.

For each model variant (backbone tap x number of heads), untrained heads (feature-strength
initialisation) with the reduction PCA-whitened on the same photos:
  1. fit_reduction on the photos (scale 1, top features per image),
  2. extract multi-scale top-n local features of every photo (time per image and per scale),
  3. k-means codebook on all descriptors, binarized ASMK* index (asmk_index) of all photos,
  4. every photo queries the index; revisitop mAP (easy/medium) and UKBench N-S score.

Usage: .venv/bin/python benchmarks/mda_ukbench.py [--max-size 384] [--scales 1.414 1 0.707]
       [--codebook 1024] [--variants stride16:4 stride32:4 stride16:1] [--limit N]
The codebook is learned on the evaluated photos themselves (no separate training set here).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from asmk_index.asmk import AsmkIndex  # noqa: E402
from asmk_index.codebook import Codebook  # noqa: E402
from backbones.networks import BackboneConfig  # noqa: E402
from imagedata.revisitop import evaluate_revisitop, load_revisitop, ukbench_ns_score  # noqa: E402
from mda.config import ExtractionConfig, MdaConfig  # noqa: E402
from mda.extract import extract_local_features  # noqa: E402
from mda.model import MdaModel  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ukbench-dev"


def run_variant(tap: str, heads: int, scale_factor: float, paths: list[Path], gnd, args) -> dict:
    torch.manual_seed(0)
    model = MdaModel(MdaConfig(backbone=BackboneConfig(tap=tap), num_heads=heads))
    extraction = ExtractionConfig(scales=tuple(s * scale_factor for s in args.scales), max_size=args.max_size,
                                  top_n=args.top_n)
    tick = time.perf_counter()
    used = model.fit_reduction(paths, max_images=args.fit_images, features_per_image=args.fit_features,
                               scales=(scale_factor,), max_size=args.max_size)
    fit_s = time.perf_counter() - tick
    descriptors, ids, per_image, per_scale = [], [], [], {s: [] for s in extraction.scales}
    counts = []
    for image_id, path in enumerate(paths):
        features = extract_local_features(model, path, config=extraction)
        descriptors.append(features.descriptors)
        ids.append(np.full(len(features), image_id, dtype=np.int64))
        counts.append(len(features))
        per_image.append(features.timings["total"])
        for scale in extraction.scales:
            if scale in features.timings:
                per_scale[scale].append(features.timings[scale])
    all_desc = np.concatenate(descriptors)
    all_ids = np.concatenate(ids)
    tick = time.perf_counter()
    codebook = Codebook.train(all_desc, args.codebook, seed=0)
    codebook_s = time.perf_counter() - tick
    index = AsmkIndex(codebook, binary=True)
    index.add(all_desc, all_ids)
    ranks = np.zeros((len(paths), len(paths)), dtype=np.int64)
    tick = time.perf_counter()
    for query_id, query in enumerate(descriptors):
        found, _ = index.search(query, len(paths))
        ranks[query_id, : found.size] = found
    search_s = time.perf_counter() - tick
    result = evaluate_revisitop(ranks, gnd, query_major=True)
    return {
        "variant": f"lite0 {tap} N={heads}" + (f" scales x{scale_factor:g}" if scale_factor != 1 else ""), "C_s": model.head.in_channels,
        "features": float(np.mean(counts)), "mAP_E": result["mAP"]["easy"], "mAP_M": result["mAP"]["medium"],
        "mP@1_E": result["mP@k"]["easy"][1],
        "NS": ukbench_ns_score(ranks, 4, query_major=True),
        "ms_image": 1000 * float(np.median(per_image)),
        "ms_scale": {s / scale_factor: 1000 * float(np.median(v)) for s, v in per_scale.items() if v},
        "fit_s": fit_s, "fit_vectors": used, "codebook_s": codebook_s, "search_ms": 1000 * search_s / len(paths),
    }


def time_variants(variants: list[str], paths: list[Path], args) -> None:
    """Extraction time only: per image the minimum of ``--repeats`` runs (robust to a shared CPU),
    then the median over images; per scale likewise."""
    print(f"\ntiming only: {len(paths)} photos, min of {args.repeats} runs per image, median over images")
    header = "| variant | ms/img | ratio | " + " | ".join(f"ms @{s} (x factor)" for s in args.scales) + " |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    base = None
    for item in variants:
        tap, heads, *factor = item.split(":")
        factor = float(factor[0]) if factor else 1.0
        model = MdaModel(MdaConfig(backbone=BackboneConfig(tap=tap), num_heads=int(heads)))
        extraction = ExtractionConfig(scales=tuple(s * factor for s in args.scales), max_size=args.max_size,
                                      top_n=args.top_n)
        extract_local_features(model, paths[0], config=extraction)            # warm-up
        totals, per_scale = [], {s: [] for s in extraction.scales}
        for path in paths:
            runs = [extract_local_features(model, path, config=extraction).timings for _ in range(args.repeats)]
            totals.append(min(r["total"] for r in runs))
            for scale in extraction.scales:
                if scale in runs[0]:
                    per_scale[scale].append(min(r[scale] for r in runs))
        total = 1000 * float(np.median(totals))
        base = base or total
        cells = " | ".join(f"{1000 * float(np.median(v)):.1f}" if v else "-" for v in per_scale.values())
        name = f"lite0 {tap} N={heads}" + (f" scales x{factor:g}" if factor != 1 else "")
        print(f"| {name} | {total:.1f} | {total / base:.2f} | {cells} |", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--max-size", type=int, default=384)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.414, 1.0, 0.707])
    parser.add_argument("--top-n", type=int, default=1000)
    parser.add_argument("--codebook", type=int, default=1024)
    parser.add_argument("--fit-images", type=int, default=400)
    parser.add_argument("--fit-features", type=int, default=100)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N photos (multiple of 4)")
    parser.add_argument("--variants", nargs="+", default=["stride16:4", "stride32:4", "stride16:1", "stride16:8"],
                        help="TAP:HEADS[:SCALE_FACTOR] items (SCALE_FACTOR multiplies every pyramid scale, "
                             "e.g. stride32:4:2 gives stride 32 the feature grid of stride 16)")
    parser.add_argument("--timing-only", type=int, default=0, metavar="N",
                        help="only time extraction on the first N photos (no retrieval)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per image in --timing-only")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch/faiss CPU threads (1 is far faster on a shared, oversubscribed machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)

    dataset = load_revisitop(args.data)
    paths = dataset.database_paths()
    gnd = dataset.gnd
    if args.limit:
        paths, gnd = paths[: args.limit], [
            {k: ([i for i in v if i < args.limit] if isinstance(v, list) else v) for k, v in g.items()}
            for g in gnd[: args.limit]]
    if args.timing_only:
        time_variants(args.variants, paths[: args.timing_only], args)
        return
    print(f"ukbench-dev: {len(paths)} photos, max side {args.max_size}, scales {args.scales}, top-n {args.top_n}, "
          f"codebook {args.codebook} words, binarized ASMK* (alpha 3, tau 0, query MA 5), untrained heads, "
          f"reduction PCA-whitened on {min(args.fit_images, len(paths))} photos x {args.fit_features} features, "
          f"{args.threads} CPU thread(s) (shared machine)", flush=True)
    rows = []
    for item in args.variants:
        tap, heads, *factor = item.split(":")
        row = run_variant(tap, int(heads), float(factor[0]) if factor else 1.0, paths, gnd, args)
        rows.append(row)
        print(f"done {row['variant']}: {row}", flush=True)
    base = rows[0]
    scales = args.scales
    header = ("| variant | C_s | feats/img | mAP E | mAP M | mP@1 E | N-S | ms/img | ratio | "
              + " | ".join(f"ms @{s} (x factor)" for s in scales) + " |")
    print()
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for row in rows:
        per_scale = " | ".join(f"{row['ms_scale'].get(s, float('nan')):.1f}" for s in scales)
        print(f"| {row['variant']} | {row['C_s']} | {row['features']:.0f} | {row['mAP_E']:.2f} | {row['mAP_M']:.2f} | "
              f"{row['mP@1_E']:.2f} | {row['NS']:.3f} | {row['ms_image']:.1f} | {row['ms_image'] / base['ms_image']:.2f} | "
              f"{per_scale} |")
    print("\n(fit/codebook/search: " + "; ".join(
        f"{r['variant']}: fit {r['fit_s']:.0f}s ({r['fit_vectors']} vectors), k-means {r['codebook_s']:.0f}s, "
        f"search {r['search_ms']:.1f} ms/query" for r in rows) + ")")


if __name__ == "__main__":
    main()
