"""A self-contained HTML report of an evaluation: corpus metrics, then every image with its captions.

:func:`write_report` writes one ``report.html`` that opens anywhere, offline, and can be attached to a run
or mailed: thumbnails are embedded as base64 JPEG data URIs, and the CSS and the small script that sorts
the entries by a per-image score and filters them by text are inline. Nothing is fetched (no external
scripts, stylesheets, fonts or images). Without JavaScript the page still shows every entry, in the
order given, and the sort/filter controls stay hidden rather than sitting there inert.

Everything that comes from the caller (title, metric names, ids, groups, captions, references, score
names, image read errors) is HTML-escaped, so a generated caption such as ``<script>...</script>`` is shown
as text, not run.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from clipcap.data.images import ImageReadError, load_image
from clipcap.files import atomic_write_bytes

logger = logging.getLogger(__name__)

REPORT_FILENAME = "report.html"
"""The file written when :func:`write_report` is given a directory."""

THUMBNAIL_WORKERS = min(8, os.cpu_count() or 1)
"""Threads that read and shrink images: PIL releases the GIL while decoding, resizing and encoding, so a
5,000-image report is made several times faster than one image at a time."""

THUMBNAIL_JPEG_QUALITY = 80
"""JPEG quality of the embedded thumbnails: small enough that 5,000 entries stay in the tens of megabytes,
good enough to recognise what a caption talks about."""


METRIC_ORDER = (
    "Bleu_1",
    "Bleu_2",
    "Bleu_3",
    "Bleu_4",
    "METEOR",
    "ROUGE_L",
    "CIDEr",
    "SPICE",
    "clip_score",
    "ref_clip_score",
    "ref_compare",
    "retrieval_p_at_1",
    "retrieval_p_at_1_random",
)
"""How corpus metrics are listed: the n-gram metrics as papers give them, then the CLIP-based ones; recall@K
follows by K, a metric of one group (``clip_score/out-domain``) right after its corpus value, and any other
name after these, alphabetically."""

_SCALES = {"CIDEr": "0–10", "clip_score": "0–2.5", "ref_clip_score": "0–2.5"}


def metric_sort_key(name: str) -> tuple[int, int, str]:
    """Where ``name`` goes in the metrics table (see :data:`METRIC_ORDER`)."""
    base, _, group = name.partition("/")
    if base in METRIC_ORDER:
        return METRIC_ORDER.index(base), 0, group
    if base.startswith("recall_at_") and base.removeprefix("recall_at_").isdigit():
        return len(METRIC_ORDER), int(base.removeprefix("recall_at_")), group
    return len(METRIC_ORDER) + 1, 0, name


def is_percentage(name: str) -> bool:
    """Retrieval metrics are percentages; the others are fractions or scores."""
    base = name.partition("/")[0]
    return base.startswith("retrieval_p_at_1") or base.startswith("recall_at_")


def metric_scale(name: str) -> str:
    """The range a metric's values lie in, shown beside them: ``%``, ``0–1``, ``0–2.5`` or ``0–10``."""
    base = name.partition("/")[0]
    return "%" if is_percentage(name) else _SCALES.get(base, "0–1")


def format_metric(name: str, value: float) -> str:
    """A percentage with one decimal, anything else with three: the same precision in every row."""
    return f"{value:.1f}" if is_percentage(name) else f"{value:.3f}"


@dataclass
class ReportRow:
    """One evaluated image: what the model said, what people said, and how it scored."""

    image_id: str
    """The image's id in the corpus."""
    caption: str
    """The generated caption."""
    references: Sequence[str] = ()
    """The reference captions (may be empty, e.g. for reference-free evaluation)."""
    scores: dict[str, float] = field(default_factory=dict)
    """Per-image scores by name (``clip_score``, ``ref_clip_score``, ...); any keys, possibly none."""
    image: str | None = None
    """An image file, or ``<shard.tar>::<member>`` for a tar-shard member; None shows a placeholder."""
    group: str | None = None
    """An optional group the image belongs to (e.g. the nocaps domain)."""


def write_report(
    path: str | os.PathLike[str],
    rows: Sequence[ReportRow],
    metrics: Mapping[str, float],
    title: str = "clipcap evaluation",
    thumbnail_size: int = 160,
    about: Mapping[str, str] | None = None,
) -> Path:
    """Writes a self-contained HTML report of an evaluation, atomically.

    The page shows what the evaluation is (``about``: checkpoint, config, split, decoding, date, clipcap
    version, in the given order), the corpus ``metrics`` (in :data:`METRIC_ORDER`, each with its scale, a
    percentage with one decimal and anything else with three) and counts, then one table row per entry of
    ``rows``, in the given order: a thumbnail, the image id and group, the generated caption, the
    references and the per-image scores. A score column's header (or the *sort by* menu) sorts the
    entries by that score, descending first, then ascending; entries without that score sort last either
    way. A text box filters entries by id, group, caption or reference.

    An image that is None, missing or unreadable is shown as a "no image" placeholder (the reason, if any,
    is its tooltip); it never fails the report. Images are read with :func:`~clipcap.data.images.load_image`
    and each distinct source is decoded and encoded once.

    The file is written next to its destination under a temporary name and then moved into place with
    ``os.replace``, so a reader (or a crash) never sees half a report.

    Args:
        path: the HTML file to write, or an existing directory to write ``report.html`` into. Missing
            parent directories are created.
        rows: the evaluated images, in display order.
        metrics: corpus-level metric name → value (e.g. ``CIDEr``, ``Bleu_4``).
        title: the page title and heading.
        thumbnail_size: the longest side of a thumbnail, in pixels (aspect ratio kept, never enlarged).
        about: what was evaluated, label → text, shown first.

    Returns:
        The path of the written report.

    Raises:
        ValueError: ``thumbnail_size`` is not a positive integer.
    """
    if isinstance(thumbnail_size, bool) or not isinstance(thumbnail_size, int) or thumbnail_size < 1:
        raise ValueError(f"thumbnail_size must be a positive integer, got {thumbnail_size!r}")
    target = Path(path)
    if target.is_dir():
        target = target / REPORT_FILENAME
    target.parent.mkdir(parents=True, exist_ok=True)

    page = render_report(rows, metrics, title=title, thumbnail_size=thumbnail_size, about=about)
    # Ids taken from file names may hold lone surrogates (undecodable bytes); they must not fail the write.
    data = page.encode("utf-8", errors="replace")
    atomic_write_bytes(target, data)
    logger.info("Wrote %s: %d entries, %.1f MB", target, len(rows), len(data) / 1e6)
    return target


def render_report(
    rows: Sequence[ReportRow],
    metrics: Mapping[str, float],
    title: str = "clipcap evaluation",
    thumbnail_size: int = 160,
    about: Mapping[str, str] | None = None,
) -> str:
    """The HTML page :func:`write_report` writes (see there for the arguments)."""
    score_names = _score_names(rows)
    score_slugs = _unique_slugs(score_names)
    thumbnails = _ThumbnailCache(thumbnail_size)
    thumbnails.prepare(rows)
    escape = html.escape

    # Entries are rendered first so that the counts at the top can say how many images had no thumbnail.
    entries: list[str] = []
    for row in rows:
        entries.append(_render_entry(row, score_names, score_slugs, thumbnails))

    parts: list[str] = [
        "<!DOCTYPE html>\n",
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n',
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
        f"<title>{escape(title)}</title>\n",
        f"<style>\n{_CSS % {'size': thumbnail_size}}</style>\n",
        "</head>\n<body>\n",
        f"<h1>{escape(title)}</h1>\n",
        _render_about(about or {}),
        '<section class="summary">\n',
        _render_metrics(metrics),
        _render_counts(rows, thumbnails.placeholders),
        "</section>\n",
        _render_controls(score_names, score_slugs),
        '<table id="entries" class="entries">\n<thead>\n<tr>',
        '<th scope="col">image</th><th scope="col">id</th><th scope="col">captions</th>',
    ]
    for name, slug in zip(score_names, score_slugs, strict=True):
        parts.append(
            f'<th scope="col" class="score" data-sort-key="{escape(slug)}">'
            f'<button type="button" disabled>{escape(name)}</button></th>'
        )
    parts.append("</tr>\n</thead>\n<tbody>\n")
    parts.extend(entries)
    parts.append("</tbody>\n</table>\n")
    if not rows:
        parts.append('<p class="muted">No entries.</p>\n')
    parts.append(f"<script>\n{_SCRIPT}</script>\n</body>\n</html>\n")
    return "".join(parts)


# ------------------------------------------------------------------------------------------ pieces


def _format_number(value: float) -> str:
    """Four significant digits: enough to compare runs, short enough to scan a column."""
    return f"{value:.4g}"


def _score_names(rows: Sequence[ReportRow]) -> list[str]:
    """Every score name used by any row, in order of first appearance (the producer's order)."""
    names: dict[str, None] = {}
    for row in rows:
        for name in row.scores:
            names.setdefault(name, None)
    return list(names)


def _unique_slugs(names: Sequence[str]) -> list[str]:
    """Attribute-safe, distinct slugs for score names (``data-score-<slug>``).

    HTML lower-cases attribute names, and score names may hold spaces or punctuation, so names cannot be
    used as attribute names directly.
    """
    slugs: list[str] = []
    seen: set[str] = set()
    for name in names:
        base = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "score"
        slug, suffix = base, 2
        while slug in seen:
            slug, suffix = f"{base}-{suffix}", suffix + 1
        seen.add(slug)
        slugs.append(slug)
    return slugs


class _ThumbnailCache:
    """Thumbnails as data URIs, each distinct image source decoded and encoded once."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.placeholders = 0
        self._by_source: dict[str, tuple[str, int, int] | str] = {}

    def prepare(self, rows: Iterable[ReportRow]) -> None:
        """Makes the thumbnails of every distinct image source of ``rows``, in parallel."""
        pending: dict[str, str] = {}  # source → the first image id that names it, for error messages
        for row in rows:
            if row.image is not None and row.image not in self._by_source:
                pending.setdefault(row.image, row.image_id)
        if not pending:
            return
        with ThreadPoolExecutor(max_workers=min(THUMBNAIL_WORKERS, len(pending))) as pool:
            made = pool.map(self._encode, pending, pending.values())
            self._by_source.update(zip(pending, made, strict=True))

    def render(self, source: str | None, image_id: str) -> str:
        """An ``<img>`` with an embedded thumbnail, or a placeholder box saying "no image"."""
        if source is None:
            return self._placeholder("no image given")
        thumbnail = self._by_source.get(source)
        if thumbnail is None:
            thumbnail = self._by_source[source] = self._encode(source, image_id)
        if isinstance(thumbnail, str):
            return self._placeholder(thumbnail)
        uri, width, height = thumbnail
        return (
            f'<img src="{uri}" width="{width}" height="{height}" '
            f'alt="image {html.escape(image_id)}" loading="lazy">'
        )

    def _encode(self, source: str, image_id: str) -> tuple[str, int, int] | str:
        """(data URI, width, height), or the reason there is none."""
        try:
            image = load_image(source, image_id)
            image.thumbnail((self.size, self.size), Image.Resampling.BICUBIC, reducing_gap=2.0)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=THUMBNAIL_JPEG_QUALITY, optimize=True)
        except ImageReadError as error:
            return error.reason
        except (OSError, ValueError) as error:  # a report is a view: one odd image must not sink it
            return f"cannot make a thumbnail ({type(error).__name__}: {error})"
        encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
        return f"data:image/jpeg;base64,{encoded}", image.width, image.height

    def _placeholder(self, reason: str) -> str:
        self.placeholders += 1
        reason = html.escape(reason)
        return f'<div class="placeholder" role="img" aria-label="no image" title="{reason}">no image</div>'


def _render_entry(
    row: ReportRow, score_names: Sequence[str], score_slugs: Sequence[str], thumbnails: _ThumbnailCache
) -> str:
    escape = html.escape
    attributes = [f'class="entry" data-image-id="{escape(row.image_id)}"']
    if row.group is not None:
        attributes.append(f'data-group="{escape(row.group)}"')
    cells: list[str] = []
    for name, slug in zip(score_names, score_slugs, strict=True):
        value = row.scores.get(name)
        if value is None:
            cells.append('<td class="score missing">–</td>')
            continue
        value = float(value)
        # NaN has no place in an order, so a non-finite score carries no sort attribute and sorts last.
        if math.isfinite(value):
            attributes.append(f'data-score-{slug}="{value!r}"')
        cells.append(f'<td class="score">{escape(_format_number(value))}</td>')

    group = f'<br><span class="group">{escape(row.group)}</span>' if row.group is not None else ""
    if row.references:
        items = "".join(f"<li>{escape(reference)}</li>" for reference in row.references)
        references = f'<ol class="references">{items}</ol>'
    else:
        references = '<p class="muted">no references</p>'
    return (
        f"<tr {' '.join(attributes)}>"
        f'<td class="thumb">{thumbnails.render(row.image, row.image_id)}</td>'
        f'<td class="id"><code>{escape(row.image_id)}</code>{group}</td>'
        f'<td class="captions"><p class="caption">{escape(row.caption)}</p>{references}</td>'
        f"{''.join(cells)}</tr>\n"
    )


def _render_about(about: Mapping[str, str]) -> str:
    if not about:
        return ""
    lines = ['<table class="about">\n<caption>what this evaluates</caption>\n<tbody>\n']
    for label, text in about.items():
        lines.append(
            f'<tr><th scope="row">{html.escape(label)}</th><td><code>{html.escape(str(text))}</code></td></tr>\n'
        )
    lines.append("</tbody>\n</table>\n")
    return "".join(lines)


def _render_metrics(metrics: Mapping[str, float]) -> str:
    if not metrics:
        return '<p class="muted">No corpus metrics.</p>\n'
    lines = ['<table class="metrics">\n<caption>metrics</caption>\n<tbody>\n']
    for name in sorted(metrics, key=metric_sort_key):
        value = format_metric(name, float(metrics[name]))
        lines.append(
            f'<tr><th scope="row">{html.escape(name)}</th><td>{html.escape(value)}</td>'
            f'<td class="scale">{html.escape(metric_scale(name))}</td></tr>\n'
        )
    lines.append("</tbody>\n</table>\n")
    return "".join(lines)


def _render_counts(rows: Sequence[ReportRow], placeholders: int) -> str:
    counts: list[tuple[str, int]] = [("images", len(rows)), ("without image", placeholders)]
    groups: dict[str, int] = {}
    for row in rows:
        if row.group is not None:
            groups[row.group] = groups.get(row.group, 0) + 1
    counts.extend((f"group: {group}", groups[group]) for group in sorted(groups))
    lines = ['<table class="counts">\n<caption>counts</caption>\n<tbody>\n']
    for name, count in counts:
        lines.append(f'<tr><th scope="row">{html.escape(name)}</th><td>{count}</td></tr>\n')
    lines.append("</tbody>\n</table>\n")
    return "".join(lines)


def _render_controls(score_names: Sequence[str], score_slugs: Sequence[str]) -> str:
    """Sort and filter controls, hidden until the script shows them (they do nothing without it)."""
    options = ['<option value="">given order</option>']
    options.extend(
        f'<option value="{html.escape(slug)}">{html.escape(name)}</option>'
        for name, slug in zip(score_names, score_slugs, strict=True)
    )
    return (
        '<div id="controls" class="controls" hidden>\n'
        f'<label>sort by <select id="sort-key">{"".join(options)}</select></label>\n'
        '<label>order <select id="sort-dir"><option value="desc">descending</option>'
        '<option value="asc">ascending</option></select></label>\n'
        '<label>filter <input type="search" id="filter" placeholder="id, group, caption…"></label>\n'
        '<span id="shown" class="muted"></span>\n'
        "</div>\n"
    )


_CSS = """\
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.5em; margin: 0 0 .6em; }
.summary { display: flex; gap: 2em; flex-wrap: wrap; align-items: flex-start; margin-bottom: 1em; }
.summary table { border-collapse: collapse; }
.summary caption { text-align: left; font-weight: 600; padding-bottom: .2em; }
.summary th, .summary td { padding: .15em .8em .15em 0; text-align: left; font-weight: normal; }
.summary td { font-variant-numeric: tabular-nums; text-align: right; }
.summary td.scale { color: #888; text-align: left; }
table.about { border-collapse: collapse; margin-bottom: 1em; }
.about caption { text-align: left; font-weight: 600; padding-bottom: .2em; }
.about th { padding: .1em .8em .1em 0; text-align: left; font-weight: normal; color: #555; }
.about td code { word-break: break-all; }
.controls { display: flex; gap: 1.2em; flex-wrap: wrap; align-items: center; margin: .8em 0; }
.controls[hidden] { display: none; }
table.entries { border-collapse: collapse; width: 100%%; }
.entries th, .entries td { border-bottom: 1px solid #ddd; padding: .4em .6em; vertical-align: top;
  text-align: left; }
.entries thead th { position: sticky; top: 0; background: #f6f6f6; }
.entries th.score button { font: inherit; font-weight: 600; border: 0; background: none; padding: 0;
  cursor: pointer; }
.entries th.score button:disabled { cursor: default; color: inherit; }
.entries th[aria-sort="descending"] button::after { content: " \\25BC"; }
.entries th[aria-sort="ascending"] button::after { content: " \\25B2"; }
td.thumb { width: %(size)dpx; }
td.thumb img { display: block; max-width: %(size)dpx; height: auto; }
.placeholder { width: %(size)dpx; height: %(size)dpx; display: flex; align-items: center;
  justify-content: center; background: #eee; color: #888; border: 1px dashed #bbb; box-sizing: border-box; }
td.id code { word-break: break-all; }
.group { color: #666; font-size: .9em; }
.caption { margin: 0 0 .3em; font-weight: 600; white-space: pre-wrap; }
.references { margin: 0; padding-left: 1.4em; color: #444; }
td.score { font-variant-numeric: tabular-nums; text-align: right; white-space: nowrap; }
.muted, td.score.missing { color: #999; }
"""

# Rows are reordered by moving the existing nodes (no re-rendering), and each row's text is read once, so
# sorting and filtering stay quick with thousands of entries.
_SCRIPT = """\
(function () {
  "use strict";
  var body = document.querySelector("#entries tbody");
  if (!body) { return; }
  var rows = Array.prototype.slice.call(body.rows);
  var texts = rows.map(function (row) { return row.textContent.toLowerCase(); });
  var keySelect = document.getElementById("sort-key");
  var dirSelect = document.getElementById("sort-dir");
  var filter = document.getElementById("filter");
  var shown = document.getElementById("shown");
  var headers = Array.prototype.slice.call(document.querySelectorAll("#entries th[data-sort-key]"));

  function scoreOf(row, key) {
    var value = row.getAttribute("data-score-" + key);
    if (value === null) { return null; }
    value = parseFloat(value);
    return isNaN(value) ? null : value;
  }

  function sort() {
    var key = keySelect.value;
    var sign = dirSelect.value === "asc" ? 1 : -1;
    var order = rows.map(function (row, index) { return index; });
    if (key) {
      var values = rows.map(function (row) { return scoreOf(row, key); });
      order.sort(function (a, b) {
        var x = values[a], y = values[b];
        if (x === null || y === null) {
          return x === y ? a - b : (x === null ? 1 : -1);  // missing scores last, either direction
        }
        return x === y ? a - b : sign * (x - y);
      });
    }
    var fragment = document.createDocumentFragment();
    order.forEach(function (index) { fragment.appendChild(rows[index]); });
    body.appendChild(fragment);
    headers.forEach(function (header) {
      if (key && header.getAttribute("data-sort-key") === key) {
        header.setAttribute("aria-sort", sign > 0 ? "ascending" : "descending");
      } else {
        header.removeAttribute("aria-sort");
      }
    });
  }

  function applyFilter() {
    var query = filter.value.trim().toLowerCase();
    var count = 0;
    rows.forEach(function (row, index) {
      var visible = !query || texts[index].indexOf(query) !== -1;
      row.hidden = !visible;
      if (visible) { count += 1; }
    });
    shown.textContent = count + " of " + rows.length + " shown";
  }

  headers.forEach(function (header) {
    var button = header.querySelector("button");
    button.disabled = false;
    button.addEventListener("click", function () {
      var key = header.getAttribute("data-sort-key");
      if (keySelect.value === key) {
        dirSelect.value = dirSelect.value === "desc" ? "asc" : "desc";
      } else {
        keySelect.value = key;
        dirSelect.value = "desc";
      }
      sort();
    });
  });
  keySelect.addEventListener("change", sort);
  dirSelect.addEventListener("change", sort);
  filter.addEventListener("input", applyFilter);
  applyFilter();
  document.getElementById("controls").hidden = false;
})();
"""
