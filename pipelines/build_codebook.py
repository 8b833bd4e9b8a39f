#!/usr/bin/env python
"""Set up the retrieval model for a collection and train its visual-word codebook.

    python pipelines/build_codebook.py --images DIR --out CODEBOOK [--model MODEL.pt] [--size N]
                                       [--config FILE] [--feature-store DIR]

Without --model (or `model:` in the config) a new model starts from the packaged ImageNet weights,
its MDA reduction and GLAM whitening learned from the collection (PCA-whitening); with it, the
trained model (pipelines/train.py) is used as it is. CODEBOOK is a directory (written atomically):
model.pt, codebook.npz, config.yaml and a manifest with their hashes; index.py and search use
exactly this model. The features extracted here stay in the feature store (default
.CODEBOOK.features beside CODEBOOK), where index.py finds them again.
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
    parser.add_argument("--size", type=int, help="visual words (default: one per "
                        "codebook.min_descriptors_per_word descriptors of the collection, at most "
                        "codebook.size)")
    parser.add_argument("--model", type=Path, help="a trained model file (pipelines/train.py); "
                        "default: the config's `model`, else a new model (ImageNet weights)")
    parser.add_argument("--feature-store", type=Path, help="where extracted features are kept and "
                        "found again (default .OUT.features beside OUT; resumable)")
    add_common_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_arguments(argv)
    setup_logging(args.verbose)
    try:
        config = config_from_arguments(args)
        report = build_codebook(args.images, args.out, size=args.size, config=config,
                                model=args.model, feature_store=args.feature_store,
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
