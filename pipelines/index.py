#!/usr/bin/env python
"""Index a folder of images (or add to / remove from an index) with a codebook directory.

    python pipelines/index.py --images DIR --codebook CODEBOOK --out INDEX_DIR
    python pipelines/index.py --images NEW_DIR --out INDEX_DIR --append
    python pipelines/index.py --out INDEX_DIR --remove NAME [NAME ...] | --remove-list FILE

Features come from the feature store of the codebook's model (default .CODEBOOK.features beside
the codebook directory, where build_codebook.py left the features of its images): only images not
there are extracted, resumably. Unreadable images are skipped and listed in INDEX_DIR/report.json.
The index directory is written atomically and refers to the codebook directory (no model copy).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

try:
    from pipelines._common import add_common_arguments, fail, setup_logging
except ModuleNotFoundError:  # run as a script, the project not installed
    from _common import add_common_arguments, fail, setup_logging

from asmk_index.persistence import current_version
from retrieval.builder import build_index


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, help="folder of images to index / append")
    parser.add_argument("--codebook", type=Path, help="codebook directory (build_codebook.py)")
    parser.add_argument("--out", type=Path, required=True, help="index directory")
    parser.add_argument("--append", action="store_true", help="add the new images of --images "
                        "to the existing index instead of rebuilding it")
    parser.add_argument("--remove", nargs="+", default=[], metavar="NAME",
                        help="image names (paths relative to the images folder) to take out")
    parser.add_argument("--remove-list", type=Path, help="file with one image name per line "
                        "to take out")
    parser.add_argument("--feature-store", type=Path, help="where extracted features are kept and "
                        "found again (default: the codebook's, .CODEBOOK.features beside it)")
    add_common_arguments(parser, extraction=False)
    args = parser.parse_args(argv)
    if args.images is None and not (args.remove or args.remove_list):
        parser.error("give --images (to build or --append) and/or --remove/--remove-list")
    if args.images is not None and not args.append and args.codebook is None:
        parser.error("a new index needs --codebook (or pass --append to extend an existing one)")
    return args


def main(argv=None) -> int:
    args = parse_arguments(argv)
    setup_logging(args.verbose)
    log = logging.getLogger("pipelines")
    remove = list(args.remove)
    try:
        if args.remove_list is not None:
            remove += [line.strip() for line in
                       args.remove_list.read_text(encoding="utf-8").splitlines() if line.strip()]
        report = build_index(args.out, images=args.images, codebook=args.codebook,
                             append=args.append, remove=remove, feature_store=args.feature_store,
                             device=args.device, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as error:
        return fail(str(error))
    print(f"index {args.out}: {report.images} images "
          f"(+{len(report.added)} added, {len(report.already_indexed)} already indexed, "
          f"-{len(report.removed)} removed; features: {report.extracted} extracted, "
          f"{report.reused} found in the feature store)")
    if report.not_found:
        print(f"not in the index (nothing removed): {', '.join(report.not_found)}")
    if report.failures:
        print(f"{len(report.failures)} image(s) skipped (unreadable):")
        for name, reason in sorted(report.failures.items()):
            print(f"  {name}: {reason}")
    log.info("report: %s", current_version(args.out) / "report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
