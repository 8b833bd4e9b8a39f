#!/usr/bin/env python
"""Extraction speed: the one-pass retrieval model against the two-pass path it replaced.

    python benchmarks/extraction.py [--images 60] [--queries 15] [--dataset DIR]
                                    [--map ukbench-dev grocery-dev] [--out outputs/extraction]

One run, on real photos of ../shared/data at the default settings (SystemConfig()), the same
weights everywhere (a model fitted to the photos), every path run in the same process and
interleaved:

(a) two passes, as before the one-pass model: the MDA model (its own copy of the backbone, cut at
    stride 16) and the GLAM model (a second copy up to stride 32) each run the shared extraction
    loop over the photos (each photo decoded twice) and, for a query, each runs its own pyramid;
    the GLAM head computes its formulas as written then (the global channel attention as a C x C
    matrix, the local spatial branches before the fuse; `reference_head_forms`);
(a') the same two passes with today's GLAM head (series channel attention, composed branches), to
    show what the one pass alone gives;
(b) the one-pass model: each photo decoded once, one forward per pyramid level for both heads
    (retrieval.extraction), channels-last; (b') the same in the contiguous memory format; (b'')
    with batches of equal-size photos (indexing; its query column is (b)'s);
(c) the floor: each photo decoded once and the bare backbone forward over the same pyramid.

Each at float32 and with mixed precision (bfloat16 autocast on CPUs with native bfloat16,
float16 on CUDA). Printed: indexing images/s, median query extraction ms (a photo file to both
kinds of features), ratios to (a) and to (c), and the largest difference between the float32
features of (a) and (b). ``--map`` also builds an index per precision on each named dataset and
prints its mAP (global, ASMK*, two-stage), to state what mixed precision changes.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from glam.extract import GlobalExtractor, extract_global_descriptor  # noqa: E402
from glam.model import GlamModel  # noqa: E402
from glam.modules import GlobalChannelAttention, LocalSpatialAttention  # noqa: E402
from imagedata.extraction import extract_to_file  # noqa: E402
from imagedata.images import image_to_tensor, load_image  # noqa: E402
from mda.extract import LOCAL_FIELDS, LocalFeatureExtractor, extract_local_features, pyramid  # noqa: E402
from mda.model import MdaModel  # noqa: E402
from pipelines._common import setup_logging  # noqa: E402
from retrieval.builder import sample_fit_images  # noqa: E402
from retrieval.config import SystemConfig  # noqa: E402
from retrieval.extraction import (FeatureStore, extract_image, inference, mixed_precision_dtype,  # noqa: E402
                                  prepare_network)
from retrieval.models import new_fitted_network  # noqa: E402
from retrieval.network import RetrievalNet  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
PRECISIONS = ("float32", "mixed")
BATCH = 4                     # images of one size per forward in the batched row


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, default=DATA / "ukbench-dev", help="photos (DIR/jpg)")
    parser.add_argument("--images", type=int, default=60, help="photos indexed per path")
    parser.add_argument("--queries", type=int, default=15, help="query photos per path")
    parser.add_argument("--repeats", type=int, default=2, help="indexing runs per path (best kept)")
    parser.add_argument("--map", nargs="*", default=[], metavar="DATASET",
                        help="also measure the mAP of both precisions on these datasets of ../shared/data")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "extraction")
    parser.add_argument("--device", default="auto")
    return parser.parse_args(argv)


def two_pass_models(net: RetrievalNet) -> tuple[MdaModel, GlamModel]:
    """The MDA and GLAM models alone, with the one-pass model's weights (two backbone copies)."""
    config = net.config
    mda = MdaModel(config.mda, backbone=_backbone_copy(net, config.mda.backbone))
    mda.head.load_state_dict(net.local_head.state_dict())
    glam = GlamModel(config.glam, backbone=_backbone_copy(net, config.glam.backbone))
    glam.descriptor_head.load_state_dict(net.global_head.state_dict())
    return mda.to(net.device).eval(), glam.to(net.device).eval()


def reference_head_forms(model: torch.nn.Module) -> torch.nn.Module:
    """Switch a model's GLAM head to the formulas as written (the head as it was before the one-pass model)."""
    for module in model.modules():
        if isinstance(module, GlobalChannelAttention):
            module.method = "matrix"
        elif isinstance(module, LocalSpatialAttention):
            module.composed = False
    return model


def _backbone_copy(net: RetrievalNet, config):
    from backbones.networks import build_backbone
    backbone = build_backbone(config, weights="random")
    own = backbone.state_dict()
    backbone.load_state_dict({name: value for name, value in net.backbone.state_dict().items() if name in own})
    return backbone


def autocast(precision: str, device: torch.device):
    dtype = mixed_precision_dtype(device) if precision == "mixed" else None
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


# ---------------------------------------------------------------------- the three paths
def index_two_pass(models, paths, config, precision, work: Path) -> float:
    mda, glam = models
    extraction = config.extraction
    from mda.config import ExtractionConfig as LocalConfig
    from glam.config import ExtractionConfig as GlobalConfig
    local_config = LocalConfig(scales=tuple(extraction.scales), max_size=extraction.max_size, top_n=extraction.top_n)
    global_config = GlobalConfig(scales=tuple(extraction.scales), max_size=extraction.max_size)
    start = time.perf_counter()
    with autocast(precision, mda.device):
        extract_to_file(paths, LocalFeatureExtractor(mda, local_config), work / "local.h5", kind="local",
                        dim=mda.descriptor_dim, fields=LOCAL_FIELDS, max_size=extraction.max_size,
                        num_workers=1, device=mda.device, progress=False)
        extract_to_file(paths, GlobalExtractor(glam, global_config), work / "global.h5", kind="global",
                        dim=glam.output_dim, max_size=extraction.max_size, num_workers=1, device=glam.device,
                        progress=False)
    return time.perf_counter() - start


def index_one_pass(net, paths, config, work: Path) -> float:
    store = FeatureStore(work, net.model_hash(), config.extraction)
    start = time.perf_counter()
    store.extract(paths, net, config.extraction, progress=False, num_workers=1)
    return time.perf_counter() - start


class _BackboneFloor(torch.nn.Module):
    """Callable for extract_to_file: the backbone over the pyramid, no heads (the floor)."""

    def __init__(self, net: RetrievalNet, config):
        super().__init__()
        self.net, self.config = net, config

    def __call__(self, images):
        memory = torch.channels_last if self.config.channels_last else torch.contiguous_format
        with inference(self.net.device, self.config.precision):
            for _scale, resized in pyramid(images, self.config.scales):
                self.net.backbone.forward_taps(resized.contiguous(memory_format=memory))
        return {"descriptors": np.zeros((0, 1), np.float32)}


def index_floor(net, paths, config, work: Path) -> float:
    start = time.perf_counter()
    extract_to_file(paths, _BackboneFloor(net, config.extraction), work / "floor.h5", kind="local", dim=1,
                    max_size=config.extraction.max_size, num_workers=1, device=net.device, progress=False)
    return time.perf_counter() - start


def query_two_pass(models, path, config, precision) -> float:
    mda, glam = models
    extraction = config.extraction
    from mda.config import ExtractionConfig as LocalConfig
    from glam.config import ExtractionConfig as GlobalConfig
    start = time.perf_counter()
    image = load_image(path, max_size=extraction.max_size)
    with autocast(precision, mda.device):
        extract_local_features(mda, image, config=LocalConfig(scales=tuple(extraction.scales),
                                                               max_size=extraction.max_size, top_n=extraction.top_n))
        extract_global_descriptor(glam, image, config=GlobalConfig(scales=tuple(extraction.scales),
                                                                   max_size=extraction.max_size))
    return time.perf_counter() - start


def query_one_pass(net, path, config) -> float:
    start = time.perf_counter()
    extract_image(net, load_image(path, max_size=config.extraction.max_size), config.extraction)
    return time.perf_counter() - start


def query_floor(net, path, config) -> float:
    start = time.perf_counter()
    image = image_to_tensor(load_image(path, max_size=config.extraction.max_size)).unsqueeze(0)
    _BackboneFloor(net, config.extraction)(image)
    return time.perf_counter() - start


def feature_difference(models, net, paths, config) -> tuple[float, float, int]:
    """Largest |difference| of the local descriptors and of the global descriptors between (a)
    and (b) at float32, and how many images selected different locations."""
    mda, glam = models
    extraction = config.extraction
    from mda.config import ExtractionConfig as LocalConfig
    from glam.config import ExtractionConfig as GlobalConfig
    local_diff = global_diff = 0.0
    differing = 0
    for path in paths:
        image = load_image(path, max_size=extraction.max_size)
        one = extract_image(net, image, extraction)
        local = extract_local_features(mda, image, config=LocalConfig(scales=tuple(extraction.scales),
                                                                       max_size=extraction.max_size,
                                                                       top_n=extraction.top_n))
        global_ = extract_global_descriptor(glam, image, config=GlobalConfig(scales=tuple(extraction.scales),
                                                                            max_size=extraction.max_size))
        same = (len(local) == len(one.local) and np.array_equal(local.x, one.local.x)
                and np.array_equal(local.y, one.local.y) and np.array_equal(local.scale, one.local.scale))
        if same:
            local_diff = max(local_diff, float(np.abs(local.descriptors - one.local.descriptors).max()))
        differing += int(not same)
        global_diff = max(global_diff, float(np.abs(global_ - one.global_descriptor).max()))
    return local_diff, global_diff, differing


# ---------------------------------------------------------------------- mAP per precision
def map_per_precision(net: RetrievalNet, config: SystemConfig, dataset: Path, out: Path) -> dict:
    """Codebook (float32 features) and one index per precision on ``dataset``; mAP of each mode."""
    from retrieval.builder import build_codebook, build_index
    from retrieval.evaluation import evaluate_index

    model_file = out / "model.pt"
    net.save(model_file)
    figures = {}
    for precision in PRECISIONS:
        run_config = config.updated({"extraction": {"precision": precision}})
        codebook = out / f"codebook-{dataset.name}"
        if precision == "float32":
            build_codebook(dataset / "jpg", codebook, config=run_config, model=model_file, progress=False)
        else:
            _retarget_codebook_precision(codebook, out / f"codebook-{dataset.name}-{precision}", precision)
            codebook = out / f"codebook-{dataset.name}-{precision}"
        index = out / f"index-{dataset.name}-{precision}"
        build_index(index, images=dataset / "jpg", codebook=codebook, progress=False,
                    feature_store=out / "features")
        report = evaluate_index(dataset, index, progress=False)
        figures[precision] = {mode: entry["mAP"]["medium"] for mode, entry in report["modes"].items()}
    return figures


def _retarget_codebook_precision(codebook: Path, target: Path, precision: str) -> None:
    """A copy of a codebook directory whose config extracts with ``precision`` (same model, same
    words: only the query and database features change)."""
    from retrieval.models import ModelBundle
    bundle = ModelBundle.load(codebook)
    bundle.config = bundle.config.updated({"extraction": {"precision": precision}})
    bundle.save(target)


# ---------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_arguments(argv)
    setup_logging()
    logging.getLogger("imagedata.extraction").setLevel(logging.WARNING)
    logging.getLogger("retrieval").setLevel(logging.WARNING)
    photos = sorted((args.dataset / "jpg").glob("*.jpg"))
    if not photos:
        print(f"no photos in {args.dataset}/jpg", file=sys.stderr)
        return 2
    config = SystemConfig().updated({"extraction": {"device": args.device}})
    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    print(f"device: {device} ({_cpu_name() if device.type == 'cpu' else torch.cuda.get_device_name(device)}); "
          f"torch threads {torch.get_num_threads()}; mixed precision = "
          f"{mixed_precision_dtype(device) or 'float32 (no native bfloat16 here)'}")
    print(f"settings: {json.dumps(config.extraction.feature_settings())}, channels_last "
          f"{config.extraction.channels_last}")
    rng = np.random.default_rng(0)
    chosen = [photos[i] for i in rng.permutation(len(photos))]
    index_paths = chosen[:args.images]
    query_paths = chosen[args.images:args.images + args.queries]
    fit = sample_fit_images(chosen[:40], 40, config.extraction.max_size, seed=0)
    net = prepare_network(new_fitted_network(config, fit), config.extraction)
    models = two_pass_models(net)
    models_before = tuple(reference_head_forms(copy.deepcopy(model)) for model in models)
    contiguous = copy.deepcopy(net).to(memory_format=torch.contiguous_format)

    contiguous_config = config.updated({"extraction": {"channels_last": False}})
    local_diff, global_diff, differing = feature_difference(models_before, contiguous, query_paths, contiguous_config)
    print(f"float32 features, (b') one pass vs (a) two passes (both contiguous), {len(query_paths)} photos: "
          f"max |local diff| {local_diff:.2e}, max |global diff| {global_diff:.2e}, photos with other "
          f"selected locations {differing}")
    local_diff, global_diff, differing = feature_difference(models_before, net, query_paths, config)
    print(f"float32 features, (b) one pass channels-last vs (a): max |local diff| {local_diff:.2e}, max "
          f"|global diff| {global_diff:.2e}, photos with other selected locations {differing}")

    rows = {}
    for precision in PRECISIONS:
        run = config.updated({"extraction": {"precision": precision}})
        run_contiguous = run.updated({"extraction": {"channels_last": False}})
        run_batched = run.updated({"extraction": {"batch_size": BATCH}})
        paths = {
            "(a) two passes": (lambda w: index_two_pass(models_before, index_paths, run, precision, w),
                               lambda p: query_two_pass(models_before, p, run, precision)),
            "(a') two passes, new head": (lambda w: index_two_pass(models, index_paths, run, precision, w),
                                          lambda p: query_two_pass(models, p, run, precision)),
            "(b) one pass": (lambda w: index_one_pass(net, index_paths, run, w),
                             lambda p: query_one_pass(net, p, run)),
            "(b') one pass, contiguous": (lambda w: index_one_pass(contiguous, index_paths, run_contiguous, w),
                                          lambda p: query_one_pass(contiguous, p, run_contiguous)),
            f"(b'') one pass, batches {BATCH}": (lambda w: index_one_pass(net, index_paths, run_batched, w),
                                                 lambda p: query_one_pass(net, p, run)),
            "(c) backbone only": (lambda w: index_floor(net, index_paths, run, w),
                                  lambda p: query_floor(net, p, run)),
        }
        index_seconds = {name: [] for name in paths}
        query_seconds = {name: [] for name in paths}
        for _repeat in range(args.repeats):            # interleaved: the machine's load hits all alike
            for name, (index_run, _query) in paths.items():
                with tempfile.TemporaryDirectory() as work:
                    index_seconds[name].append(index_run(Path(work)))
        for path in query_paths:
            for name, (_index, query_run) in paths.items():
                query_seconds[name].append(query_run(path))
        for name in paths:
            rows[(name, precision)] = (len(index_paths) / min(index_seconds[name]),
                                       1000 * statistics.median(query_seconds[name][1:] or query_seconds[name]))

    base = {precision: rows[("(a) two passes", precision)] for precision in PRECISIONS}
    floor = {precision: rows[("(c) backbone only", precision)] for precision in PRECISIONS}
    print(f"\n{len(index_paths)} photos indexed (best of {args.repeats}), {len(query_paths)} queries "
          f"(median), {args.dataset.name}")
    print(f"{'path':<28} {'precision':<9} {'index img/s':>11} {'x (a)':>7} {'/ (c)':>7} "
          f"{'query ms':>9} {'x (a)':>7} {'/ (c)':>7}")
    for (name, precision), (rate, query_ms) in rows.items():
        print(f"{name:<28} {precision:<9} {rate:11.2f} {rate / base[precision][0]:7.2f} "
              f"{floor[precision][0] / rate:7.2f} {query_ms:9.1f} {base[precision][1] / query_ms:7.2f} "
              f"{query_ms / floor[precision][1]:7.2f}")
    print("x (a): speed-up over the two-pass path; / (c): time over the backbone-only floor")

    for name in args.map:
        args.out.mkdir(parents=True, exist_ok=True)
        figures = map_per_precision(net, config, DATA / name, args.out / name)
        print(f"\nmAP (medium) on {name}: " + "; ".join(
            f"{precision}: " + ", ".join(f"{mode} {value:.2f}" for mode, value in modes.items())
            for precision, modes in figures.items()))
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                flags = Path("/proc/cpuinfo").read_text()
                extras = [flag for flag in ("amx_tile", "avx512_bf16", "avx512f") if f" {flag}" in flags]
                return f"{line.split(':', 1)[1].strip()}, {' '.join(extras) or 'no AVX-512'}"
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
