#!/usr/bin/env python
"""Evaluate an index on a revisitop-layout dataset (DIR/jpg/*.jpg + DIR/gnd_NAME.pkl).

    python pipelines/evaluate.py --dataset DIR --index INDEX_DIR [--json OUT] [--shortlist 100]
                                 [--variants global two_stage+sv ...] [--queries all|even|odd]

Reports, side by side for every search variant (global, global+QE, global+DBA(+QE), ASMK*,
two-stage, two-stage + spatial verification, + QE, + verified QE), mAP Easy/Medium/Hard and mP@1/5/10 (queries
cropped to their box, junk ignored), the UKBench N-S score when the ground truth is groups of
four, the median latency per query of extraction and of each stage, and the index size per
image. Build the index from DIR/jpg first (pipelines/index.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    from pipelines._common import add_common_arguments, fail, setup_logging
except ModuleNotFoundError:  # run as a script, the project not installed
    from _common import add_common_arguments, fail, setup_logging

from retrieval.evaluation import QUERY_SPLITS, VARIANTS, evaluate_index, format_evaluation
from retrieval.searcher import Searcher


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, required=True, help="revisitop-layout folder")
    parser.add_argument("--index", type=Path, required=True, help="index of DATASET/jpg")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--shortlist", type=int, help="stage-1 size (default: config, 100)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--queries", choices=QUERY_SPLITS, default="all", help="all queries, or those "
                        "of every other object (to choose settings on one half, report the other)")
    parser.add_argument("--max-queries", type=int, help="evaluate only the first N queries")
    add_common_arguments(parser, extraction=False)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_arguments(argv)
    setup_logging(args.verbose)
    try:
        report = evaluate_index(args.dataset, Searcher(args.index, device=args.device),
                                variants=args.variants, shortlist=args.shortlist, queries=args.queries,
                                max_queries=args.max_queries, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as error:
        return fail(str(error))
    print(format_evaluation(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=float), encoding="utf-8")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
