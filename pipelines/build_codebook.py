#!/usr/bin/env python
"""Initialise the models on a collection and train its visual-word codebook.

    python pipelines/build_codebook.py --images DIR --out CODEBOOK [--size N] [--config FILE]
                                       [--features FILE]

CODEBOOK is a directory (written atomically): codebook.npz, mda.pt, glam.pt, config.yaml and a
manifest; index.py and search use exactly these models.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

try:
    from pipelines._common import add_common_arguments, config_from_arguments, fail, setup_logging
except ModuleNotFoundError:  # run as a script, the project not installed
    from _common import add_common_arguments, config_from_arguments, fail, setup_logging

from retrieval.builder import build_codebook


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True, help="folder of training images")
    parser.add_argument("--out", type=Path, required=True, help="codebook directory to write")
    parser.add_argument("--size", type=int, help="visual words (default: the config's, 65536; "
                        "capped for small collections)")
    parser.add_argument("--features", type=Path, help="an existing local feature file to train "
                        "on instead of extracting (must come from these models)")
    parser.add_argument("--work-dir", type=Path, help="feature cache (default .OUT.work beside "
                        "OUT; resumable)")
    add_common_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_arguments(argv)
    setup_logging(args.verbose)
    try:
        config = config_from_arguments(args)
        report = build_codebook(args.images, args.out, size=args.size, config=config,
                                features=args.features, work_dir=args.work_dir,
                                progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as error:
        return fail(str(error))
    print(json.dumps({key: value for key, value in report.to_dict().items()
                      if key != "failures"}, indent=2))
    if report.failures:
        print(f"{len(report.failures)} image(s) could not be read:")
        for name, reason in sorted(report.failures.items()):
            print(f"  {name}: {reason}")
    logging.getLogger("pipelines").info("codebook directory written: %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
