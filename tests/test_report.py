"""The HTML evaluation report: well-formed, self-contained, escaped, one sortable entry per image."""

from __future__ import annotations

import base64
import io
import math
import os
import shutil
import subprocess
import tarfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

import clipcap.metrics.report as report_module
from clipcap.metrics.report import ReportRow, write_report

VOID_ELEMENTS = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
)
HOSTILE_CAPTION = "a cat <script>alert(1)</script> & a \"dog\" 'here'"
HOSTILE_ID = "id with \"double\" & 'single' quotes <b>"


class ReportParser(HTMLParser):
    """Collects what the tests check: nesting errors, entries, links, captions, tables and scripts."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.doctype: str | None = None
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.entries: list[dict[str, str | None]] = []
        self.captions: list[str] = []
        self.references: list[list[str]] = []
        self.placeholders: list[str] = []  # image id of the entry each placeholder is in
        self.images: list[tuple[str, str]] = []  # (image id of the entry, src)
        self.summary_rows: dict[str, dict[str, str]] = {}  # table caption → row header → first cell
        self.summary_cells: dict[str, dict[str, list[str]]] = {}  # table caption → row header → cells
        self.title = ""
        self.scripts: list[str] = []
        self.options: dict[str, list[str]] = {}  # select id → option values
        self._capture: str | None = None  # what the text being read belongs to
        self._capture_tag = ""  # the end tag that finishes it
        self._text: list[str] = []
        self._table_caption = ""
        self._row_header = ""

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        classes = (attributes.get("class") or "").split()
        if tag not in VOID_ELEMENTS:
            self.stack.append(tag)
        entry_id = self.entries[-1]["data-image-id"] if self.entries else None
        if tag == "tr" and "entry" in classes:
            if "tr" in self.stack[:-1]:
                self.errors.append("entry inside a row")
            self.entries.append(attributes)
        elif tag == "select":
            self.options[attributes.get("id") or ""] = []
        elif tag == "option":
            self.options[list(self.options)[-1]].append(attributes.get("value") or "")
        elif tag == "img":
            self.images.append((str(entry_id), attributes.get("src") or ""))
        elif tag == "div" and "placeholder" in classes:
            self.placeholders.append(str(entry_id))
        elif tag == "p" and "caption" in classes:
            self._start_capture("caption")
        elif tag == "ol" and "references" in classes:
            self.references.append([])
        elif tag == "li" and self.stack[-2:-1] == ["ol"]:
            self._start_capture("reference")
        elif tag in ("title", "script", "caption", "th", "td"):
            self._start_capture(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in VOID_ELEMENTS:
            self.errors.append(f"self-closing non-void <{tag}/>")
        self.handle_starttag(tag, attrs)
        if tag not in VOID_ELEMENTS:
            self.stack.pop()

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID_ELEMENTS:
            self.errors.append(f"end tag for void element </{tag}>")
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()
        if self._capture is not None and tag == self._capture_tag:
            self._finish_capture()

    def handle_data(self, data: str) -> None:
        if self._capture is not None:
            self._text.append(data)

    def _start_capture(self, kind: str) -> None:
        self._capture = kind
        self._capture_tag = {"caption": "p", "reference": "li"}.get(kind, kind)
        if kind == "caption" and self.stack[-2:] == ["table", "caption"]:
            self._capture_tag = "caption"
            kind = self._capture = "table-caption"
        self._text = []

    def _finish_capture(self) -> None:
        text, kind = "".join(self._text), self._capture
        self._capture = None
        if kind == "caption":
            self.captions.append(text)
        elif kind == "reference":
            self.references[-1].append(text)
        elif kind == "title":
            self.title = text
        elif kind == "script":
            self.scripts.append(text)
        elif kind == "table-caption":
            self._table_caption = text
        elif kind == "th" and "tbody" in self.stack:
            self._row_header = text
        elif kind == "td" and self._table_caption and not self.entries:
            cells = self.summary_cells.setdefault(self._table_caption, {}).setdefault(self._row_header, [])
            cells.append(text)
            self.summary_rows.setdefault(self._table_caption, {})[self._row_header] = cells[0]


def parse(path: Path) -> tuple[ReportParser, str]:
    text = path.read_text(encoding="utf-8")
    parser = ReportParser()
    parser.feed(text)
    parser.close()
    return parser, text


@pytest.fixture
def rows(tmp_path: Path) -> list[ReportRow]:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 20), (200, 30, 30)).save(images / "wide.png")
    Image.new("RGBA", (10, 30), (0, 0, 255, 128)).save(images / "rgba.png")
    Image.new("L", (24, 24), 90).save(images / "gray.jpg")
    member = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 160, 10)).save(member, format="JPEG")
    with tarfile.open(images / "shard-000.tar", "w") as shard:
        info = tarfile.TarInfo("000001.jpg")
        info.size = len(member.getvalue())
        shard.addfile(info, io.BytesIO(member.getvalue()))
    return [
        ReportRow(
            "wide",
            "a red rectangle",
            ["a red box", "something red"],
            {"clip_score": 0.75, "ref_clip_score": 0.8, "ref_compare": 1.0},
            str(images / "wide.png"),
            "in-domain",
        ),
        ReportRow("rgba", "a blue tall thing", ["blue"], {"clip_score": 0.5}, str(images / "rgba.png")),
        ReportRow("gray", "a grey square", [], {}, str(images / "gray.jpg"), "out-domain"),
        ReportRow(HOSTILE_ID, HOSTILE_CAPTION, ["<i>ref</i> & co"], {"clip_score": 0.9}, None, "near-domain"),
        ReportRow("gone", "a missing image", ["x"], {"clip_score": 0.1}, str(images / "missing.jpg")),
        ReportRow(
            "tarred",
            "a green square",
            ["green"],
            {"clip_score": 0.6, "ref_compare": -0.5},
            f"{images / 'shard-000.tar'}::000001.jpg",
        ),
    ]


METRICS = {"CIDEr": 1.234567, "Bleu_4": 0.3456789, "BERTScore": 0.91, "clip_score": 0.7}


def test_report_is_valid_well_nested_html(tmp_path: Path, rows: list[ReportRow]) -> None:
    path = write_report(tmp_path / "out" / "report.html", rows, METRICS, title="run <7> & co")
    parser, text = parse(path)

    assert path == tmp_path / "out" / "report.html"
    assert text.startswith("<!DOCTYPE html>")
    assert parser.doctype == "DOCTYPE html"
    assert parser.errors == []
    assert parser.stack == [], "unclosed elements"
    assert ("html", {"lang": "en"}) in parser.tags
    assert ("meta", {"charset": "utf-8"}) in parser.tags
    assert parser.title == "run <7> & co"
    assert [tag for tag, _ in parser.tags][:2] == ["html", "head"]


def test_report_is_self_contained(tmp_path: Path, rows: list[ReportRow]) -> None:
    parser, text = parse(write_report(tmp_path / "report.html", rows, METRICS))

    for tag, attributes in parser.tags:
        assert tag not in ("link", "iframe", "object", "embed", "base"), tag
        for name in ("src", "href", "srcset", "poster", "action"):
            value = attributes.get(name)
            if value is not None:
                assert value.startswith("data:"), f"<{tag} {name}={value[:40]!r}>"
        if tag == "script":
            assert "src" not in attributes
    lowered = text.lower()
    assert "@import" not in lowered and "url(" not in lowered and "@font-face" not in lowered
    assert len(parser.scripts) == 1, "only the report's own inline script"


def test_one_entry_per_row_carrying_its_scores(tmp_path: Path, rows: list[ReportRow]) -> None:
    parser, _ = parse(write_report(tmp_path / "report.html", rows, METRICS))

    assert [entry["data-image-id"] for entry in parser.entries] == [row.image_id for row in rows]
    slugs = {"clip_score": "clip-score", "ref_clip_score": "ref-clip-score", "ref_compare": "ref-compare"}
    for entry, row in zip(parser.entries, rows, strict=True):
        carried = {name: value for name, value in entry.items() if name.startswith("data-score-")}
        expected = {f"data-score-{slugs[name]}": value for name, value in row.scores.items()}
        assert {name: float(value) for name, value in carried.items()} == expected, row.image_id
        assert entry.get("data-group") == row.group
    assert not any(name.startswith("data-score-") for name in parser.entries[2]), "row without scores"

    # The script sorts by the key a header or option names, reading "data-score-" + key from the entries.
    header_keys = [
        attributes["data-sort-key"]
        for tag, attributes in parser.tags
        if tag == "th" and "data-sort-key" in attributes
    ]
    option_keys = [key for key in parser.options["sort-key"] if key]  # "" is the given order
    assert header_keys == option_keys == list(slugs.values())
    assert '"data-score-" + key' in parser.scripts[0]


def test_user_text_is_escaped_and_round_trips(tmp_path: Path, rows: list[ReportRow]) -> None:
    parser, text = parse(write_report(tmp_path / "report.html", rows, METRICS))

    assert "<script>alert(1)</script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert parser.captions == [row.caption for row in rows]
    assert parser.entries[3]["data-image-id"] == HOSTILE_ID
    referenced = [row for row in rows if row.references]
    assert parser.references == [list(row.references) for row in referenced]
    assert "no references" in text, "the row without references says so"


def test_thumbnails_are_embedded_jpegs_and_missing_images_are_placeholders(
    tmp_path: Path, rows: list[ReportRow]
) -> None:
    parser, _ = parse(write_report(tmp_path / "report.html", rows, METRICS, thumbnail_size=16))

    assert sorted(parser.placeholders) == sorted([HOSTILE_ID, "gone"])
    sizes = {}
    for image_id, src in parser.images:
        prefix = "data:image/jpeg;base64,"
        assert src.startswith(prefix)
        with Image.open(io.BytesIO(base64.b64decode(src[len(prefix) :], validate=True))) as thumbnail:
            assert thumbnail.format == "JPEG" and thumbnail.mode == "RGB"
            sizes[image_id] = thumbnail.size
    # Longest side fits 16 px, aspect kept (40x20 → 16x8, 10x30 → 5x16 after rounding).
    assert sizes == {"wide": (16, 8), "rgba": (5, 16), "gray": (16, 16), "tarred": (16, 16)}
    assert parser.summary_rows["counts"]["without image"] == "2"


def test_the_report_says_what_it_evaluates_and_orders_its_metrics(
    tmp_path: Path, rows: list[ReportRow]
) -> None:
    metrics = {
        **METRICS,
        "METEOR": 0.25,
        "retrieval_p_at_1": 41.5,
        "recall_at_10": 80.0,
        "recall_at_5": 70.25,
        "clip_score/out-domain": 0.65,
    }
    about = {"checkpoint": "runs/<x>/best.ckpt", "split": "test", "decoding": "beam 5, up to 40 tokens"}
    parser, _ = parse(write_report(tmp_path / "report.html", rows, metrics, about=about))

    assert parser.summary_rows["what this evaluates"] == about  # in the given order, escaped
    assert list(parser.summary_rows["what this evaluates"]) == list(about)
    cells = parser.summary_cells["metrics"]
    assert list(cells) == [
        "Bleu_4", "METEOR", "CIDEr", "clip_score", "clip_score/out-domain", "retrieval_p_at_1", "recall_at_5",
        "recall_at_10", "BERTScore",
    ]  # fmt: skip
    assert cells == {
        "Bleu_4": ["0.346", "0–1"],
        "METEOR": ["0.250", "0–1"],
        "CIDEr": ["1.235", "0–10"],
        "clip_score": ["0.700", "0–2.5"],
        "clip_score/out-domain": ["0.650", "0–2.5"],
        "retrieval_p_at_1": ["41.5", "%"],
        "recall_at_5": ["70.2", "%"],
        "recall_at_10": ["80.0", "%"],
        "BERTScore": ["0.910", "0–1"],
    }
    counts = parser.summary_rows["counts"]
    assert counts["images"] == str(len(rows))
    assert counts["group: in-domain"] == counts["group: out-domain"] == counts["group: near-domain"] == "1"


def test_odd_score_names_and_values(tmp_path: Path) -> None:
    rows = [ReportRow("a", "x", scores={"Bleu 4": 1.0, "bleu-4": 2.0, "NaN score": math.nan})]
    parser, text = parse(write_report(tmp_path / "report.html", rows, {}))

    (entry,) = parser.entries
    # Names clash after lower-casing, so they get distinct slugs; NaN cannot be ordered and carries none.
    assert entry["data-score-bleu-4"] == "1.0" and entry["data-score-bleu-4-2"] == "2.0"
    assert "data-score-nan-score" not in entry
    assert "nan" in text and parser.errors == []


def test_writes_into_a_directory_atomically(tmp_path: Path, rows: list[ReportRow], monkeypatch) -> None:
    first = write_report(tmp_path, rows[:1], METRICS)
    assert first == tmp_path / "report.html"
    before = first.read_bytes()

    def failing_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_report(tmp_path, rows, METRICS)
    assert first.read_bytes() == before, "a failed write must leave the old report in place"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "report.html"], "temporary file left"


def test_each_image_source_is_decoded_once(tmp_path: Path, rows: list[ReportRow], monkeypatch) -> None:
    calls: list[str] = []
    real_load_image = report_module.load_image

    def counting_load_image(source, image_id, *args, **kwargs):
        calls.append(source)
        return real_load_image(source, image_id, *args, **kwargs)

    monkeypatch.setattr(report_module, "load_image", counting_load_image)
    many = [ReportRow(f"copy-{index}", "same image", [], {}, rows[0].image) for index in range(50)]
    parser, _ = parse(write_report(tmp_path / "report.html", many, {}))

    assert calls == [rows[0].image]
    assert len(parser.images) == 50


def test_empty_report_and_bad_thumbnail_size(tmp_path: Path) -> None:
    parser, _ = parse(write_report(tmp_path / "report.html", [], {}))
    assert parser.entries == [] and parser.errors == [] and parser.stack == []
    assert parser.summary_rows["counts"]["images"] == "0"
    with pytest.raises(ValueError, match="thumbnail_size"):
        write_report(tmp_path / "report.html", [], {}, thumbnail_size=0)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_script_is_valid_javascript(tmp_path: Path, rows: list[ReportRow]) -> None:
    parser, _ = parse(write_report(tmp_path / "report.html", rows, METRICS))
    script = tmp_path / "report.js"
    script.write_text(parser.scripts[0], encoding="utf-8")
    subprocess.run(["node", "--check", str(script)], check=True, capture_output=True, timeout=30)
