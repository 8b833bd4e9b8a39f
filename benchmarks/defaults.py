#!/usr/bin/env python
"""How the defaults and presets were chosen: the whole pipeline on the development photos.

    python benchmarks/defaults.py [--datasets ukbench-dev grocery-dev] [--queries even]
                                  [--configs NAME ...] [--fusion] [--out outputs/defaults]

Development data only (../shared/data/ukbench-dev and grocery-dev). One model for every setting
(packaged ImageNet weights, its MDA reduction and GLAM whitening fitted once to a sample of both
sets), so the settings are compared on the same network. For each named configuration
(:data:`CONFIGS`: max side, pyramid scales including upscaling, top-n, codebook size, query
multiple assignment) and dataset: the codebook, the index (pipelines' build functions) and
evaluate.py's variants on the ``--queries`` split (default "even": every other object's queries,
the half settings are chosen on; "odd" is the other half, for reporting), plus the median
extraction time per image and the index size per image. ``--fusion`` then sweeps the ranking of
the shortlist on the first configuration given (fusion rule and weights, verified images R,
alpha-QE / DBA neighbours) without rebuilding anything. Tables are printed and written to
OUT/results.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imagedata.images import load_image  # noqa: E402
from pipelines._common import setup_logging  # noqa: E402
from retrieval.builder import build_codebook, build_index, sample_fit_images  # noqa: E402
from retrieval.config import SystemConfig  # noqa: E402
from retrieval.evaluation import evaluate_index  # noqa: E402
from retrieval.extraction import collect_images, extract_image, prepare_network  # noqa: E402
from retrieval.models import new_fitted_network  # noqa: E402
from retrieval.searcher import Searcher  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
# the settings every configuration changes one thing of (pinned, not the defaults they chose)
BASE = {"extraction": {"max_size": 512, "scales": [1.414, 1.0, 0.7071], "top_n": 1000, "precision": "float32"},
        "codebook": {"size": 4096, "min_descriptors_per_word": 30}, "asmk": {"query_multiple_assignment": 5},
        "search": {"shortlist": 100, "fusion": "minmax", "global_weight": 1.0, "asmk_weight": 1.0,
                   "inlier_weight": 1.0, "verify_top": 20, "query_expansion": 0, "dba_neighbors": 0}}


def _with(**changes) -> dict:
    """BASE with some sections' keys changed, e.g. _with(extraction={"top_n": 500})."""
    merged = json.loads(json.dumps(BASE))
    for section, values in changes.items():
        merged.setdefault(section, {}).update(values)
    return merged


CONFIGS: dict[str, dict | str] = {   # overrides of the defaults, or a preset name
    "base": BASE,
    "scales 1 .71 .5": _with(extraction={"scales": [1.0, 0.7071, 0.5]}),
    "scales 2 1.4 1 .71 .5": _with(extraction={"scales": [2.0, 1.414, 1.0, 0.7071, 0.5]}),
    "scales 1.4 1": _with(extraction={"scales": [1.414, 1.0]}),
    "max side 240": _with(extraction={"max_size": 240}),
    "top-n 500": _with(extraction={"top_n": 500}),
    "top-n 1500": _with(extraction={"top_n": 1500}),
    "words 1024": _with(codebook={"size": 1024}),
    "words 16384": _with(codebook={"size": 16384}),
    "query MA 1": _with(asmk={"query_multiple_assignment": 1}),
    "query MA 3": _with(asmk={"query_multiple_assignment": 3}),
    "mixed precision": _with(extraction={"precision": "mixed"}),
    "top-n 500 words 512": _with(extraction={"top_n": 500}, codebook={"size": 512}),
    "top-n 500 words 1024": _with(extraction={"top_n": 500}, codebook={"size": 1024}),
    "top-n 500 words 2048": _with(extraction={"top_n": 500}, codebook={"size": 2048}),
    "top-n 500 words 256": _with(extraction={"top_n": 500}, codebook={"size": 256}),
    "top-n 1000 words 512": _with(codebook={"size": 512}),
    "top-n 500, 1000 per word": _with(extraction={"top_n": 500}, codebook={"size": 65536,
                                                                          "min_descriptors_per_word": 1000}),
    "top-n 500, 2000 per word": _with(extraction={"top_n": 500}, codebook={"size": 65536,
                                                                          "min_descriptors_per_word": 2000}),
    "fast preset": "fast",            # the presets as they ship (retrieval/presets/*.yaml)
    "accurate preset": "accurate",
}
# the global weight stays 1: the rules rank by weighted sums, so only the weights' ratios matter
FUSION_GRID = {"fusion": ["minmax", "zscore"], "asmk_weight": [2.0, 4.0, 8.0, 16.0],
               "inlier_weight": [1.0, 2.0, 4.0], "shortlist": [100, 300]}
VERIFY_TOP = [20, 100]
EXPANSION = [0, 1, 2, 3]
MODEL_FIT_IMAGES = 100        # per dataset, for the one model every setting shares
EXTRACTION_SAMPLE = 12        # photos timed per setting


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["ukbench-dev", "grocery-dev"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--queries", choices=["even", "odd", "all"], default="even")
    parser.add_argument("--fusion", action="store_true", help="sweep the shortlist's ranking too")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "defaults")
    return parser.parse_args(argv)


def shared_model(out: Path, datasets: list[str]) -> Path:
    """One model for every setting: fitted once to a sample of every dataset's photos."""
    path = out / "model.pt"
    if not path.is_file():
        config = SystemConfig().updated(BASE)
        photos = []
        for name in datasets:
            paths = collect_images(DATA / name / "jpg").paths
            photos += sample_fit_images(paths, MODEL_FIT_IMAGES, config.extraction.max_size, seed=0)
        new_fitted_network(config, photos).save(path)
    return path


def extraction_ms(config: SystemConfig, model: Path, dataset: str) -> float:
    """Median milliseconds to extract one photo's features (the query path) at these settings."""
    from retrieval.network import RetrievalNet
    net = prepare_network(RetrievalNet.load(model), config.extraction)
    paths = collect_images(DATA / dataset / "jpg").paths
    images = [load_image(path, max_size=config.extraction.max_size) for path in paths[:EXTRACTION_SAMPLE + 1]]
    seconds = []
    for image in images:
        start = time.perf_counter()
        extract_image(net, image, config.extraction)
        seconds.append(time.perf_counter() - start)
    return 1000 * statistics.median(seconds[1:])


def stored_queries(searcher: Searcher, store_root: Path, dataset: str) -> dict:
    """Every query's features read from the feature store the index was built from (the queries
    of these sets are whole database photos, and the store holds exactly the features a query
    extraction gives), so a configuration's evaluation does not extract every photo again; the
    extraction time is measured apart (:func:`extraction_ms`)."""
    from imagedata.revisitop import load_revisitop
    from mda.extract import LocalFeatures
    from retrieval.extraction import GLOBAL_FIELD, record_key
    from retrieval.searcher import QueryFeatures

    data = load_revisitop(DATA / dataset)
    store = searcher.models.feature_store(store_root)
    from asmk_index.feature_file import FeatureFile
    prepared = {}
    with FeatureFile(store.path) as features:
        for query, name in enumerate(data.qimlist):
            if data.query_bbox(query) is not None:
                continue                   # a cropped query is extracted by the evaluation
            record = features.get(record_key(data.image_path(name)))
            local = LocalFeatures(descriptors=record["descriptors"], attention=record["attention"],
                                  head=record["head"].astype("int64"), x=record["x"], y=record["y"],
                                  scale=record["scale"], image_size=(0, 0))
            prepared[query] = QueryFeatures(label=name, image=None, local=local,
                                            global_descriptor=record[GLOBAL_FIELD], extraction_seconds=0.0)
    return prepared


def run_config(name: str, overrides: dict, dataset: str, model: Path, out: Path, queries: str) -> dict:
    config = SystemConfig.load(overrides) if isinstance(overrides, str) else SystemConfig().updated(overrides)
    work = out / dataset / name.replace(" ", "_")
    store = out / dataset / "features"
    build_codebook(DATA / dataset / "jpg", work / "codebook", config=config, model=model, feature_store=store,
                   progress=False)
    build_index(work / "index", images=DATA / dataset / "jpg", codebook=work / "codebook", feature_store=store,
                progress=False)
    searcher = Searcher(work / "index")
    report = evaluate_index(DATA / dataset, searcher, queries=queries, progress=False,
                            prepared=stored_queries(searcher, store, dataset))
    report["extraction_ms_per_image"] = extraction_ms(config, model, dataset)
    return report


def fusion_sweep(index: Path, dataset: str, queries: str) -> tuple[list[dict], list[dict]]:
    """mAP of the two-stage variants for each ranking of the shortlist (no rebuilding): first the
    fusion rule, weights and shortlist size (20 verified images), then, with the best of those,
    the images verified and the alpha-QE / DBA neighbours."""
    searcher = Searcher(index)
    base = searcher.config.search
    prepared = stored_queries(searcher, index.parent.parent / "features", dataset)
    rankings = []
    for fusion, a, i, shortlist in itertools.product(*FUSION_GRID.values()):
        searcher.config.search = replace(base, fusion=fusion, global_weight=1.0, asmk_weight=a, inlier_weight=i,
                                         shortlist=shortlist, verify_top=20, query_expansion=0, dba_neighbors=0)
        report = evaluate_index(DATA / dataset, searcher, queries=queries, progress=False,
                                variants=["two_stage", "two_stage+sv"], prepared=prepared)
        rankings.append({"fusion": fusion, "weights": (1.0, a, i), "shortlist": shortlist,
                         **{v: report["modes"][v]["mAP"]["medium"] for v in report["modes"]},
                         "stage2_ms": report["latency_ms"]["two_stage+sv"]["stage2"]})
    best = max(rankings, key=lambda row: row["two_stage+sv"])
    expansions = []
    for verify_top, expansion in itertools.product(VERIFY_TOP, EXPANSION):
        _, a, i = best["weights"]
        searcher.config.search = replace(base, fusion=best["fusion"], global_weight=1.0, asmk_weight=a,
                                         inlier_weight=i, shortlist=best["shortlist"], verify_top=verify_top,
                                         query_expansion=expansion, dba_neighbors=expansion)
        report = evaluate_index(DATA / dataset, searcher, queries=queries, progress=False, prepared=prepared,
                                variants=["global+qe", "global+dba+qe", "two_stage+sv", "two_stage+sv+qe"])
        expansions.append({"verify_top": verify_top, "expansion": expansion,
                           **{v: report["modes"][v]["mAP"]["medium"] for v in report["modes"]},
                           "stage3_ms": report["latency_ms"]["two_stage+sv"]["stage3"]})
    searcher.config.search = base
    return rankings, expansions


def main(argv=None) -> int:
    args = parse_arguments(argv)
    setup_logging()
    for noisy in ("retrieval", "imagedata", "asmk_index", "mda", "glam"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    model = shared_model(args.out, args.datasets)
    results = {}
    variants = ["global", "asmk", "two_stage", "two_stage+sv"]
    header = (f"{'configuration':<22} {'dataset':<12} " + " ".join(f"{v:>13}" for v in variants)
              + f" {'extract ms':>10} {'index KiB':>9}")
    print(f"queries: {args.queries}; mAP (medium protocol)\n{header}")
    for name in args.configs:
        for dataset in args.datasets:
            report = run_config(name, CONFIGS[name], dataset, model, args.out, args.queries)
            results[f"{name} | {dataset}"] = report
            print(f"{name:<22} {dataset:<12} "
                  + " ".join(f"{report['modes'][v]['mAP']['medium']:13.2f}" for v in variants)
                  + f" {report['extraction_ms_per_image']:10.0f} {report['index_bytes_per_image'] / 1024:9.1f}",
                  flush=True)
            (args.out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    if args.fusion:
        first = args.configs[0].replace(" ", "_")
        for dataset in args.datasets:
            rankings, expansions = fusion_sweep(args.out / dataset / first / "index", dataset, args.queries)
            results[f"fusion | {dataset}"] = {"rankings": rankings, "expansions": expansions}
            print(f"\nranking of the shortlist on {dataset} ({args.configs[0]}), best 12 of {len(rankings)}:")
            for row in sorted(rankings, key=lambda r: -r["two_stage+sv"])[:12]:
                print(f"  {row['fusion']:<7} weights g/a/i {row['weights']} shortlist {row['shortlist']}: "
                      f"two_stage {row['two_stage']:.2f}, +sv {row['two_stage+sv']:.2f}, "
                      f"stage 2 {row['stage2_ms']:.1f} ms")
            for rule in FUSION_GRID["fusion"]:
                best = max((r for r in rankings if r["fusion"] == rule), key=lambda r: r["two_stage+sv"])
                print(f"  best {rule}: {best['two_stage+sv']:.2f} ({best['weights']}, shortlist {best['shortlist']})")
            for row in expansions:
                print(f"  verify top {row['verify_top']:>3}, QE/DBA {row['expansion']}: global+qe "
                      f"{row['global+qe']:.2f}, global+dba+qe {row['global+dba+qe']:.2f}, two_stage+sv "
                      f"{row['two_stage+sv']:.2f}, +qe {row['two_stage+sv+qe']:.2f}, stage 3 {row['stage3_ms']:.1f} ms")
            (args.out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
