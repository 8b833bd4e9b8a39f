#!/usr/bin/env python
"""End-to-end benchmark on ukbench-dev (400 real photos, 100 objects x 4 views).

    python benchmarks/pipeline_ukbench.py [--max-size 320] [--scales 1 0.7071 0.5] [--top-n 400]
                                          [--size 65536] [--out outputs/pipeline_ukbench]

Initialises the models and trains the codebook on the collection itself (the size asked is capped
to descriptors / 30), indexes it, and evaluates every image as a query: mAP (revisitop protocol,
the query itself junk) and mP@k of the three modes, the UKBench N-S score (out of 4), the median
search latency per query split into extraction, stage 1 and stage 2, and the index size per image.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines._common import setup_logging  # noqa: E402
from retrieval.builder import build_codebook, build_index  # noqa: E402
from retrieval.config import SystemConfig  # noqa: E402
from retrieval.evaluation import evaluate_index, format_evaluation  # noqa: E402

UKBENCH = ROOT.parent / "shared" / "data" / "ukbench-dev"


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, default=UKBENCH)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "pipeline_ukbench")
    parser.add_argument("--max-size", type=int, default=320)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.7071, 0.5])
    parser.add_argument("--top-n", type=int, default=400)
    parser.add_argument("--size", type=int, default=65536, help="codebook words asked for")
    parser.add_argument("--shortlist", type=int, default=100)
    parser.add_argument("--fit-images", type=int, default=200)
    parser.add_argument("--whitening-power", type=float, default=0.0,
                        help="GLAM FC init: 0 = PCA rotation, 0.5 = PCA whitening")
    parser.add_argument("--max-queries", type=int)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--reuse", action="store_true", help="reuse an existing codebook/index")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_arguments(argv)
    setup_logging()
    if not (args.dataset / "jpg").is_dir():
        print(f"dataset not found: {args.dataset}", file=sys.stderr)
        return 2
    config = SystemConfig().updated({
        "extraction": {"max_size": args.max_size, "scales": args.scales, "top_n": args.top_n,
                       "device": args.device},
        "codebook": {"fit_images": args.fit_images},
        "network": {"glam": {"whitening_power": args.whitening_power}},
        "search": {"shortlist": args.shortlist}})
    out = args.out
    timings = {}
    codebook_dir, index_dir, store = out / "codebook", out / "index", out / "features"
    start = time.perf_counter()
    if not (args.reuse and codebook_dir.is_dir()):
        report = build_codebook(args.dataset / "jpg", codebook_dir, size=args.size, config=config,
                                feature_store=store, progress=False)
        print(f"codebook: {report.size} words (asked {report.requested_size}) from "
              f"{report.training_descriptors} descriptors of {report.images} images")
    timings["codebook_s"] = time.perf_counter() - start
    start = time.perf_counter()
    if not (args.reuse and index_dir.is_dir()):
        build_index(index_dir, images=args.dataset / "jpg", codebook=codebook_dir, feature_store=store,
                    progress=False)
    timings["index_s"] = time.perf_counter() - start
    start = time.perf_counter()
    report = evaluate_index(args.dataset, index_dir, max_queries=args.max_queries,
                            progress=False)
    timings["evaluate_s"] = time.perf_counter() - start
    print()
    print(f"settings: max_size {args.max_size}, scales {args.scales}, top_n {args.top_n}, "
          f"codebook asked {args.size}, shortlist {args.shortlist}, GLAM whitening power "
          f"{args.whitening_power}")
    print(format_evaluation(report))
    global_map = report["modes"]["global"]["mAP"]["medium"]
    for mode in ("two_stage", "asmk"):
        ratio = report["modes"][mode]["mAP"]["medium"] / global_map if global_map else float("nan")
        latency = report["latency_ms"][mode]["stage1"] + report["latency_ms"][mode]["stage2"]
        base = (report["latency_ms"]["global"]["stage1"] + report["latency_ms"]["global"]["stage2"])
        print(f"{mode}: mAP ratio to global {ratio:.3f}; search time (stages 1+2) ratio to "
              f"global {latency / base:.2f}x")
    print("wall time: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    report["timings"] = timings
    report["settings"] = vars(args) | {"dataset": str(args.dataset), "out": str(args.out)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
