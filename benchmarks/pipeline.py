#!/usr/bin/env python
"""The whole system on one development dataset, as a user runs it (default: ukbench-dev).

    python benchmarks/pipeline.py [--dataset ../shared/data/grocery-dev] [--config fast|accurate|FILE]
                              [--queries all|even|odd] [--out DIR]

With the given configuration (default: the defaults, which are the "fast" preset): a new model
fitted to the collection (ImageNet weights; MDA reduction and GLAM whitening learned on a sample),
the codebook trained on the collection, the index, then every search variant evaluated on the
chosen queries: mAP (revisitop protocol, the query itself junk) and mP@k, the UKBench N-S score
(out of 4) where objects come in groups of four, the median latency per query of extraction and of
each stage, and the index size per image. The defaults were chosen on the "even" queries
(benchmarks/defaults.py); the "odd" ones are the other half, for reporting.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines._common import add_common_arguments, config_from_arguments, setup_logging  # noqa: E402
from retrieval.builder import build_codebook, build_index  # noqa: E402
from retrieval.evaluation import QUERY_SPLITS, evaluate_index, format_evaluation  # noqa: E402

UKBENCH = ROOT.parent / "shared" / "data" / "ukbench-dev"


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, default=UKBENCH, help="revisitop-layout folder")
    parser.add_argument("--queries", choices=QUERY_SPLITS, default="all")
    parser.add_argument("--out", type=Path, help="default: outputs/pipeline_<dataset>")
    parser.add_argument("--max-queries", type=int)
    parser.add_argument("--reuse", action="store_true", help="reuse an existing codebook/index")
    add_common_arguments(parser)   # --config (a preset or YAML file; default: the defaults), --device, ...
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_arguments(argv)
    setup_logging(args.verbose)
    if not (args.dataset / "jpg").is_dir():
        print(f"dataset not found: {args.dataset}", file=sys.stderr)
        return 2
    config = config_from_arguments(args)
    out = args.out or ROOT / "outputs" / f"pipeline_{args.dataset.name}"
    timings = {}
    codebook_dir, index_dir, store = out / "codebook", out / "index", out / "features"
    start = time.perf_counter()
    if not (args.reuse and codebook_dir.is_dir()):
        report = build_codebook(args.dataset / "jpg", codebook_dir, config=config, feature_store=store,
                                progress=not args.no_progress)
        print(f"codebook: {report.size} words from {report.training_descriptors} descriptors of "
              f"{report.images} images")
    timings["codebook_s"] = time.perf_counter() - start
    start = time.perf_counter()
    if not (args.reuse and index_dir.is_dir()):
        build_index(index_dir, images=args.dataset / "jpg", codebook=codebook_dir, feature_store=store,
                    progress=not args.no_progress)
    timings["index_s"] = time.perf_counter() - start
    start = time.perf_counter()
    report = evaluate_index(args.dataset, index_dir, queries=args.queries, max_queries=args.max_queries,
                            progress=not args.no_progress)
    timings["evaluate_s"] = time.perf_counter() - start
    e = config.extraction
    print(f"\nsettings: {args.config or 'defaults'}: max_size {e.max_size}, scales {list(e.scales)}, "
          f"top_n {e.top_n}, precision {e.precision}")
    print(format_evaluation(report))
    print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    report["timings"] = timings
    report["settings"] = {"config": args.config or "defaults", "dataset": str(args.dataset),
                          "queries": args.queries, "out": str(out)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
