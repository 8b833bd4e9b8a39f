"""Untrained GLAM vs plain GeM (same backbone, same whitening) on ukbench-dev: mAP, N-S, time per image.

Both models share one backbone instance (identical weights). Per image and scale we extract the
pooled (pre-FC) vectors once per model and derive:
  * "+ L2"      : mean over scales of L2(pooled), L2 (no FC),
  * "+ PCA-w pP sS": the model's FC (whitening power P, shrinkage S; the first row is GlamConfig's
                  default) fitted by `fit_whitening_from_descriptors` on all images' per-scale vectors
                  (the user's own database, as HOW does), per-scale FC + L2, mean, L2
                  (exactly what `extract_global_descriptor` returns after `fit_whitening`).
Usage: python benchmarks/glam_ukbench.py [--data DIR] [--max-size 320] [--limit N] [--threads 1] [--whitening P:S ...]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backbones.layers import l2n  # noqa: E402
from glam.config import ExtractionConfig, GlamConfig  # noqa: E402
from glam.extract import image_pyramid, prepare_image  # noqa: E402
from glam.model import GlamModel  # noqa: E402
from imagedata.revisitop import evaluate_revisitop, load_revisitop, ukbench_ns_score  # noqa: E402


@torch.no_grad()
def pooled_per_scale(gem: GlamModel, glam: GlamModel, paths, extraction: ExtractionConfig):
    """Pooled vectors (N, S, C) of both models (which share one backbone) and seconds per image.

    The backbone map is computed once per image and scale and fed to both heads; GeM's time is
    load + backbone + pooling, GLAM's adds its head's time.
    """
    assert gem.backbone is glam.backbone and not gem.head.uses_local and not gem.head.uses_global
    gem_out, glam_out, shared_seconds, head_seconds = [], [], 0.0, 0.0
    for path in paths:
        start = time.perf_counter()
        image = prepare_image(path, extraction)
        maps = [gem.backbone(x) for x in image_pyramid(image, extraction.scales)]
        gem_out.append(torch.cat([gem.pool(gem.head(m)) for m in maps]))
        middle = time.perf_counter()
        glam_out.append(torch.cat([glam.pool(glam.head(m)) for m in maps]))
        shared_seconds += middle - start
        head_seconds += time.perf_counter() - middle
    n = len(paths)
    return (torch.stack(gem_out), shared_seconds / n), (torch.stack(glam_out), (shared_seconds + head_seconds) / n)


def evaluate(descriptors: np.ndarray, dataset) -> tuple[float, float]:
    similarity = descriptors @ descriptors.T
    ranks = np.argsort(-similarity, axis=1, kind="stable")
    result = evaluate_revisitop(ranks, dataset.gnd, query_major=True)
    return result["mAP"]["easy"], ukbench_ns_score(ranks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "ukbench-dev"))
    parser.add_argument("--max-size", type=int, default=320)
    parser.add_argument("--limit", type=int, default=0, help="use the first N images (multiple of 4)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 avoids OpenMP spinning on a shared 2-core machine)")
    parser.add_argument("--whitening", nargs="*", default=[],
                        help="extra FC initialisations to compare, as POWER:SHRINKAGE (e.g. 0.5:1 0:0)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dataset = load_revisitop(args.data)
    if args.limit:
        n = args.limit - args.limit % 4
        dataset.imlist, dataset.qimlist = dataset.imlist[:n], dataset.qimlist[:n]
        dataset.gnd = [{k: [i for i in v if i < n] if isinstance(v, list) else v for k, v in g.items()}
                       for g in dataset.gnd[:n]]
    paths = dataset.database_paths()
    extraction = ExtractionConfig(max_size=args.max_size)

    torch.manual_seed(args.seed)
    config = GlamConfig()
    settings = [(config.whitening_power, config.whitening_shrinkage)]
    settings += [tuple(float(v) for v in item.split(":")) for item in args.whitening]
    glam = GlamModel(config).eval()
    gem = GlamModel.gem_baseline_of(glam).eval()
    print(f"ukbench-dev: {len(paths)} images, backbone {glam.config.backbone.name} {glam.config.backbone.tap}, "
          f"max side {extraction.max_size}, scales {tuple(round(s, 3) for s in extraction.scales)}, "
          f"{torch.get_num_threads()} threads; fusion weights (w_l, w_g, w) = "
          f"{tuple(round(float(w), 3) for w in glam.head.fusion_weights().detach())}")

    rows = []
    results = pooled_per_scale(gem, glam, paths, extraction)
    for (name, model), (pooled, seconds) in zip((("GeM", gem), ("GLAM (untrained)", glam)), results):
        n, s, c = pooled.shape
        plain = l2n(l2n(pooled, dim=2).mean(dim=1)).numpy()
        rows.append((f"{name} + L2 ({c}-d)", *evaluate(plain, dataset), 1000.0 * seconds))
        for power, shrinkage in settings:
            model.config.whitening_power, model.config.whitening_shrinkage = power, shrinkage
            model.fit_whitening_from_descriptors(pooled.reshape(n * s, c))
            with torch.no_grad():
                whitened = l2n(model.project(pooled.reshape(n * s, c)).reshape(n, s, -1).mean(dim=1)).numpy()
            label = f"{name} + PCA-w p{power:g} s{shrinkage:g} ({model.output_dim}-d)"
            rows.append((label, *evaluate(whitened, dataset), 1000.0 * seconds))
        model.config.whitening_power, model.config.whitening_shrinkage = settings[0]

    print(f"\n{'descriptor':44s} {'mAP':>7s} {'N-S':>6s} {'ms/img':>8s}")
    for variant, m_ap, ns, ms in rows:
        print(f"{variant:44s} {m_ap:7.2f} {ns:6.3f} {ms:8.1f}")
    gem_w, glam_w = rows[1], rows[2 + len(settings)]  # the default whitening of each model
    print(f"\nGLAM / GeM (PCA-w): mAP {glam_w[1] - gem_w[1]:+.2f} points, N-S {glam_w[2] - gem_w[2]:+.3f}, "
          f"time x{glam_w[3] / gem_w[3]:.2f}")


if __name__ == "__main__":
    main()
