#!/usr/bin/env python
"""The whole job on a built-in demo collection: no download, no GPU, a few minutes on 2 cores.

    python pipelines/demo.py [--out demo_output]

Builds a small collection from the real photos scikit-learn ships (objects cut from them, each
with generated views: crop/scale, rotation, perspective, colour and lighting changes; plus
distractors), initialises the models on it, trains the codebook, indexes the collection, searches
it with an unseen view of every object, prints the ranked results and writes an HTML page with
the matched local features drawn between query and results.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

try:
    from pipelines._common import setup_logging
except ModuleNotFoundError:  # run as a script, the project not installed
    from _common import setup_logging

from retrieval.demo import DEMO_CONFIG_OVERRIDES, run_demo


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo_output"),
                        help="output folder (default ./demo_output)")
    parser.add_argument("--max-size", type=int,
                        default=DEMO_CONFIG_OVERRIDES["extraction"]["max_size"],
                        help="longest image side for extraction")
    parser.add_argument("--k", type=int, default=6, help="results shown per query")
    parser.add_argument("--views", type=int, default=4, help="database views per object")
    parser.add_argument("--distractors", type=int, default=12, help="distractor images")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_arguments(argv)
    setup_logging(args.verbose)
    start = time.perf_counter()
    summary = run_demo(args.out, max_size=args.max_size, k=args.k, progress=not args.no_progress,
                       views_per_object=args.views, distractors=args.distractors, printer=print)
    print(f"\nretrieval of the unseen views: {summary['first_hit_correct']}/{summary['queries']} "
          f"queries have a view of their object at rank 1; mean precision@{summary['views']} "
          f"{summary['precision_at_views']:.2f}")
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    print(f"HTML page with the results: {Path(summary['html']).resolve()}")
    logging.getLogger("pipelines").info("outputs in %s", Path(args.out).resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
