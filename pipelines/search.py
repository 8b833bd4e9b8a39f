#!/usr/bin/env python
"""Search an index with one or more query images; print a table, JSON, and/or an HTML page.

    python pipelines/search.py --index INDEX_DIR --query IMAGE [IMAGE ...] [--k 10]
                               [--shortlist 100] [--bbox X0 Y0 X1 Y1] [--json] [--html OUT.html]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    from pipelines._common import device_argument, fail, setup_logging
except ModuleNotFoundError:  # run as a script, the project not installed
    from _common import device_argument, fail, setup_logging

from imagedata.images import ImageLoadError
from retrieval.config import FUSIONS
from retrieval.searcher import MODES, Searcher


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=Path, required=True, help="index directory")
    parser.add_argument("--query", type=Path, nargs="+", required=True, help="query image(s)")
    parser.add_argument("--k", type=int, default=10, help="results per query")
    parser.add_argument("--shortlist", type=int, default=None,
                        help="stage-1 shortlist size (default: the index's config, 100)")
    parser.add_argument("--mode", choices=MODES, default=None, help="default two_stage")
    parser.add_argument("--fusion", choices=FUSIONS, help="how the stages rank the shortlist "
                        "(default: the index's config)")
    parser.add_argument("--verify-top", type=int, help="spatially verify the top R of the shortlist "
                        "(0: off; default: the index's config)")
    parser.add_argument("--query-expansion", type=int, help="alpha-QE neighbours of stage 1 (0: off)")
    parser.add_argument("--verified-expansion", type=int, help="verified query expansion: the top N "
                        "verified results expand the global query after stage 3 (0: off)")
    parser.add_argument("--bbox", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"),
                        help="query region in pixels of the query image (all queries)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--html", type=Path, help="write a self-contained HTML page here")
    parser.add_argument("--device", type=device_argument, help="auto | cpu | cuda | cuda:N")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def format_table(results) -> str:
    timings = results.timings
    lines = [f"query: {results.query}  (mode {results.mode}, shortlist {results.shortlist}; "
             f"extraction {1000 * timings['extraction']:.0f} ms, stage 1 {1000 * timings['stage1']:.1f} ms, "
             f"stage 2 {1000 * timings['stage2']:.1f} ms, stage 3 {1000 * timings['stage3']:.1f} ms)",
             f"{'rank':>4}  {'score':>8}  {'global':>8}  {'ASMK*':>8}  {'inliers':>7}  image"]
    for hit in results:
        inliers = "-" if hit.inliers < 0 else str(hit.inliers)
        lines.append(f"{hit.rank:>4}  {hit.score:8.4f}  {hit.global_score:8.4f}  "
                     f"{hit.asmk_score:8.4f}  {inliers:>7}  {hit.name}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_arguments(argv)
    setup_logging(args.verbose)
    try:
        searcher = Searcher(args.index, device=args.device)
        results = searcher.search(list(args.query), k=args.k, shortlist=args.shortlist,
                                  mode=args.mode, bbox=[args.bbox] * len(args.query)
                                  if args.bbox else None, with_matches=args.html is not None,
                                  fusion=args.fusion, verify_top=args.verify_top,
                                  query_expansion=args.query_expansion,
                                  verified_expansion=args.verified_expansion)
    except (FileNotFoundError, ValueError, ImageLoadError) as error:
        return fail(str(error))
    if args.json:
        print(json.dumps([result.to_dict() for result in results], indent=2))
    else:
        print("\n\n".join(format_table(result) for result in results))
    if args.html is not None:
        path = searcher.write_html(args.html, results)
        print(f"HTML page: {path.resolve()}", file=sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
