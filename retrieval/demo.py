"""The end-to-end demo (``pipelines/demo.py``): collection, codebook, index, searches, HTML page."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

from .builder import build_codebook, build_index
from .config import SystemConfig
from .demo_collection import make_demo_collection
from .searcher import Searcher

logger = logging.getLogger(__name__)

#: Settings for a small collection on a CPU (the codebook size is capped to the collection).
#: GLAM's FC starts as a PCA rotation without whitening: whitening 512 dims learned from a few
#: dozen images amplifies noise (views of one object: cosine 0.75 unwhitened vs ~0 whitened).
DEMO_CONFIG_OVERRIDES = {
    "extraction": {"max_size": 320, "scales": [1.0, 0.7071, 0.5], "top_n": 400},
    "codebook": {"fit_images": 40},
    "network": {"glam": {"whitening_power": 0.0}},
    "search": {"shortlist": 100},
}


def demo_config(max_size: int | None = None) -> SystemConfig:
    config = SystemConfig().updated(DEMO_CONFIG_OVERRIDES)
    if max_size is not None:
        config = config.updated({"extraction": {"max_size": int(max_size)}})
    return config


def run_demo(out: str | os.PathLike, *, max_size: int | None = None, k: int = 6,
             progress: bool = True, views_per_object: int = 4, distractors: int = 12,
             printer: Callable[[str], None] = print) -> dict:
    """Run the demo into ``out``; returns a summary (paths, rank-1 hits, precision)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    collection = make_demo_collection(out / "collection", views_per_object=views_per_object,
                                      distractors=distractors)
    printer(f"demo collection: {len(list(collection.database.iterdir()))} database images, "
            f"{len(collection.groundtruth)} queries in {collection.root}")
    config = demo_config(max_size)
    config.save(out / "config.yaml")
    codebook_report = build_codebook(collection.database, out / "codebook", config=config,
                                     progress=progress)
    printer(f"codebook: {codebook_report.size} visual words from "
            f"{codebook_report.training_descriptors} descriptors -> {out / 'codebook'}")
    # the index finds every image's features in the store the codebook run filled
    index_report = build_index(out / "index", images=collection.database,
                               codebook=out / "codebook", progress=progress)
    printer(f"index: {index_report.images} images ({index_report.reused} found in the feature "
            f"store, {index_report.extracted} extracted) -> {out / 'index'}")
    searcher = Searcher(out / "index")
    results = searcher.search([str(path) for path in collection.query_paths], k=k,
                              with_matches=True)
    first_hit_correct, precisions, records = 0, [], []
    for path, result in zip(collection.query_paths, results):
        relevant = set(collection.groundtruth[path.name])
        result.query = path.name
        first_hit_correct += int(bool(result.hits) and result.hits[0].name in relevant)
        top = result.names[:views_per_object]
        precisions.append(sum(name in relevant for name in top) / views_per_object)
        printer("")
        printer(f"query {path.name}  (extraction {1000 * result.timings['extraction']:.0f} ms, "
                f"stage 1 {1000 * result.timings['stage1']:.1f} ms, stage 2 "
                f"{1000 * result.timings['stage2']:.1f} ms, stage 3 {1000 * result.timings['stage3']:.1f} ms)")
        printer(f"  {'rank':>4}  {'score':>7}  {'global':>7}  {'ASMK*':>7}  {'inliers':>7}  image")
        for hit in result:
            mark = "*" if hit.name in relevant else " "
            printer(f"  {hit.rank:>4}  {hit.score:7.4f}  {hit.global_score:7.4f}  "
                    f"{hit.asmk_score:7.4f}  {max(hit.inliers, 0):>7}  {hit.name} {mark}")
        records.append(result.to_dict())
    printer("\n(* = a view of the query's object)")
    html = searcher.write_html(out / "results.html", results,
                               title="Demo: GLAM shortlist, MDA + ASMK* re-scoring, spatial verification")
    (out / "results.json").write_text(json.dumps(records, indent=2), encoding="utf-8")
    return {"html": str(html), "queries": len(results), "first_hit_correct": first_hit_correct,
            "precision_at_views": sum(precisions) / max(1, len(precisions)),
            "views": views_per_object, "codebook_size": codebook_report.size,
            "index": str(out / "index")}


__all__ = ["run_demo", "demo_config", "DEMO_CONFIG_OVERRIDES"]
