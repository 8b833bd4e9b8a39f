#!/usr/bin/env python
"""Train the retrieval model (backbone + GLAM global head + MDA local head) on your photos.

    python pipelines/train.py --out RUN (--revisitop DIR | --gldv2-csv CSV --images-root DIR
                              | --folder DIR [--labels-from-subfolders]) [--model START.pt]
                              [--config FILE] [--epochs N] [--device cpu|cuda|cuda:N]
    torchrun --nproc_per_node N pipelines/train.py ...       # one process per GPU (DDP)

Labelled photos (a revisitop-layout dataset, a GLDv2 csv, or a folder per class) train with the
classes; an unlabelled folder trains with two augmented views of each photo. Settings: the
`train:` section of the config (losses and their weights, frozen or trainable backbone, batch
size...). A new model starts from the packaged ImageNet weights with its reduction and whitening
learned from the training photos; --model (or `model:` in the config) continues a trained one.
RUN/checkpoint.pt is written as training goes; the same command resumes it. The result is
RUN/model.pt: pass it to build_codebook.py --model.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

try:
    from pipelines._common import add_common_arguments, config_from_arguments, fail, setup_logging
except ModuleNotFoundError:  # run as a script, the project not installed
    from _common import add_common_arguments, config_from_arguments, fail, setup_logging

from imagedata.images import ImageLoadError
from imagedata.training import cleanup_distributed
from retrieval.builder import sample_fit_images
from retrieval.models import new_fitted_network
from retrieval.network import RetrievalNet
from retrieval.training import CHECKPOINT_FILE, Trainer, TrainingImages


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_argument_group("training photos (one source)")
    source.add_argument("--revisitop", type=Path, help="revisitop-layout folder (jpg/ + gnd_*.pkl): "
                        "classes from the query groups")
    source.add_argument("--gldv2-csv", type=Path, help="GLDv2-style csv (id,landmark_id)")
    source.add_argument("--images-root", type=Path, help="image folder of --gldv2-csv")
    source.add_argument("--folder", type=Path, help="a folder of photos: unlabelled (two augmented "
                        "views of each photo), or one class per subfolder with --labels-from-subfolders")
    source.add_argument("--labels-from-subfolders", action="store_true")
    parser.add_argument("--out", type=Path, required=True, help="run directory (checkpoint.pt, model.pt)")
    parser.add_argument("--model", type=Path, help="a model file to continue training (default: the "
                        "config's `model`, else a new model)")
    parser.add_argument("--epochs", type=int, help="epochs (default: the config's train.epochs)")
    parser.add_argument("--log-every", type=int, help="steps between log lines (default: the config's)")
    parser.add_argument("--no-resume", action="store_true", help="ignore RUN/checkpoint.pt")
    add_common_arguments(parser)
    return parser.parse_args(argv)


def training_images(args: argparse.Namespace) -> TrainingImages:
    """The photos and classes the arguments name."""
    from imagedata import datasets

    if args.revisitop:
        from imagedata.revisitop import load_revisitop
        return TrainingImages.from_list(datasets.labelled_from_revisitop(load_revisitop(args.revisitop)))
    if args.gldv2_csv:
        if not args.images_root:
            raise ValueError("--gldv2-csv needs --images-root")
        return TrainingImages.from_list(datasets.labelled_from_gldv2_csv(args.gldv2_csv, args.images_root))
    if args.folder:
        return TrainingImages.from_list(datasets.unlabelled_folder(
            args.folder, labels_from_subfolders=args.labels_from_subfolders))
    raise ValueError("give the training photos: --revisitop DIR, --gldv2-csv CSV --images-root DIR, or --folder DIR")


def main(argv=None) -> int:
    args = parse_arguments(argv)
    setup_logging(args.verbose)
    log = logging.getLogger("pipelines")
    try:
        config = config_from_arguments(args)
        overrides = {name: value for name, value in (("epochs", args.epochs), ("log_every", args.log_every))
                     if value is not None}
        if overrides:
            config = config.updated({"train": overrides})
        images = training_images(args)
        start = args.model if args.model is not None else config.model
        resuming = (args.out / CHECKPOINT_FILE).is_file() and not args.no_resume
        if start is not None:
            net = RetrievalNet.load(start)
        elif resuming:  # the weights come from the checkpoint
            net = RetrievalNet(config.network)
        else:
            fit_images = sample_fit_images(images.paths, config.train.fit_images, config.extraction.max_size,
                                           config.train.seed)
            net = new_fitted_network(config, fit_images, config.train.seed)
        log.info("training on %d photos of %d classes%s", len(images), len(np.unique(images.labels)),
                 " (unlabelled: two views of each)" if images.unlabelled else "")
        trainer = Trainer(net, images, config.train, args.out, device=args.device,
                          progress=not args.no_progress)
        result = trainer.fit(resume=not args.no_resume)
    except (FileNotFoundError, ValueError, ImageLoadError) as error:
        return fail(str(error))
    finally:
        cleanup_distributed()
    if trainer.info.is_main:
        print(json.dumps({"model": str(result.model_path), "model_sha256": result.model_sha256,
                          "epochs": result.epochs, "steps": result.steps,
                          "last_loss": result.losses[-1] if result.losses else None}, indent=2))
        log.info("next: build_codebook.py --images PHOTOS --out CODEBOOK --model %s", result.model_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
