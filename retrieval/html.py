"""A self-contained HTML page of search results (images embedded as base64 JPEG thumbnails).

Each result row shows the query and the result side by side in one inline SVG, with a line between
the two ends of every inlier correspondence that spatial verification kept, and the inlier count.
"""
from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

THUMBNAIL_HEIGHT = 220        # pixels of each image in a result row
THUMBNAIL_GAP = 16            # pixels between the query and the result in a row
JPEG_QUALITY = 85
LINE_COLOURS = ("#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0",
                "#f032e6", "#bcf60c", "#fabebe", "#008080", "#e6beff")


@dataclass
class HtmlResult:
    """One row of the page: the result image (H, W, 3) uint8, its scores and verified inliers.

    inliers: spatial verification's inlier count (-1: not verified, 0: rejected); matches: (m, 4)
    float array of the inliers' (query x, query y, result x, result y) in the pixel frames of the
    query image and ``image``.
    """
    rank: int
    name: str
    image: np.ndarray
    score: float
    global_score: float | None = None
    asmk_score: float | None = None
    inliers: int = -1
    matches: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))


def image_to_data_uri(image: np.ndarray, height: int) -> tuple[str, int, int]:
    """JPEG ``data:`` URI of ``image`` resized to ``height`` pixels; returns (uri, width, height)."""
    pil = Image.fromarray(np.asarray(image, dtype=np.uint8))
    scale = height / pil.height
    width = max(1, round(pil.width * scale))
    pil = pil.resize((width, height), Image.BICUBIC)
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), width, height


def _score(value: float | None) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.4f}"


def _inliers(count: int) -> str:
    return "not verified" if count < 0 else ("rejected" if count == 0 else str(count))


def _pair_svg(query: np.ndarray, result: HtmlResult) -> str:
    query_uri, query_width, _ = image_to_data_uri(query, THUMBNAIL_HEIGHT)
    result_uri, result_width, _ = image_to_data_uri(result.image, THUMBNAIL_HEIGHT)
    query_scale = THUMBNAIL_HEIGHT / query.shape[0]
    result_scale = THUMBNAIL_HEIGHT / result.image.shape[0]
    offset = query_width + THUMBNAIL_GAP
    total_width = offset + result_width
    lines = []
    matches = np.asarray(result.matches, dtype=np.float64).reshape(-1, 4)
    for number, (qx, qy, rx, ry) in enumerate(matches):
        colour = LINE_COLOURS[number % len(LINE_COLOURS)]
        x1, y1 = qx * query_scale, qy * query_scale
        x2, y2 = offset + rx * result_scale, ry * result_scale
        lines.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
                     f'stroke="{colour}" stroke-width="1.2" stroke-opacity="0.85"/>'
                     f'<circle cx="{x1:.1f}" cy="{y1:.1f}" r="2.5" fill="{colour}"/>'
                     f'<circle cx="{x2:.1f}" cy="{y2:.1f}" r="2.5" fill="{colour}"/>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_width}" '
            f'height="{THUMBNAIL_HEIGHT}" viewBox="0 0 {total_width} {THUMBNAIL_HEIGHT}">'
            f'<image href="{query_uri}" x="0" y="0" width="{query_width}" '
            f'height="{THUMBNAIL_HEIGHT}"/>'
            f'<image href="{result_uri}" x="{offset}" y="0" width="{result_width}" '
            f'height="{THUMBNAIL_HEIGHT}"/>' + "".join(lines) + "</svg>")


_STYLE = """
body { font-family: sans-serif; margin: 24px; background: #fafafa; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 17px; margin-top: 32px; }
.query img { height: 260px; border: 3px solid #4363d8; }
table { border-collapse: collapse; margin-top: 12px; }
td, th { padding: 6px 10px; border-bottom: 1px solid #ddd; vertical-align: middle; text-align: left; }
th { background: #eee; } td.num { font-family: monospace; text-align: right; }
.note { color: #666; font-size: 13px; }
"""


def render_results_page(queries: Sequence[tuple[str, np.ndarray, Sequence[HtmlResult]]], *,
                        title: str = "Search results", note: str = "") -> str:
    """HTML text for one or more queries: ``[(query name, query image, results)]``."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    if note:
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
    for query_name, query_image, results in queries:
        query_uri, _, _ = image_to_data_uri(query_image, 260)
        parts.append(f"<h2>Query: {html.escape(query_name)}</h2>"
                     f"<div class='query'><img src='{query_uri}' alt='query'></div>")
        parts.append("<table><tr><th>rank</th><th>image</th><th>score</th><th>global</th>"
                     "<th>ASMK*</th><th>inliers</th><th>query &harr; result (verified inlier "
                     "correspondences)</th></tr>")
        for result in results:
            parts.append(
                f"<tr><td class='num'>{result.rank}</td><td>{html.escape(result.name)}</td>"
                f"<td class='num'>{_score(result.score)}</td>"
                f"<td class='num'>{_score(result.global_score)}</td>"
                f"<td class='num'>{_score(result.asmk_score)}</td>"
                f"<td class='num'>{_inliers(result.inliers)}</td>"
                f"<td>{_pair_svg(query_image, result)}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "".join(parts)


def write_results_page(path: str | os.PathLike, queries, **kwargs) -> Path:
    """Write :func:`render_results_page` to ``path`` (atomically); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(render_results_page(queries, **kwargs), encoding="utf-8")
    os.replace(temporary, path)
    return path


__all__ = ["HtmlResult", "render_results_page", "write_results_page", "image_to_data_uri"]
