"""NLG metrics through pycocoevalcap on PTB-tokenized text, so numbers compare with papers.

Inputs are validated in Python before any Java process starts: an assertion inside pycocoevalcap's METEOR
wrapper leaves its lock held, and its ``__del__`` then waits on that lock forever when the interpreter
exits.

pycocoevalcap is imported where a score is computed, never when this module is: every objective, the
training layer and the CLI import ``clipcap.metrics``, and a machine without pycocoevalcap (our GPU machines,
where its 104 MB wheel cannot travel) must still train, generate and compute the CLIP metrics
(``CaptionEvaluation(nlg_metrics=[])``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_METRICS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr")
"""What :func:`coco_caption_scores` computes unless told otherwise; SPICE is opt-in (slow, 8 GB Java heap)."""

SUPPORTED_METRICS = (*DEFAULT_METRICS, "SPICE")
"""Metric names accepted by :func:`coco_caption_scores`; ``BLEU`` gives ``Bleu_1`` .. ``Bleu_4``."""

EMPTY_CAPTION = "<empty>"
"""What an empty caption is scored as when allowed: a lone word that matches no reference."""

SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
"""The Stanford CoreNLP jars SPICE needs in pycocoevalcap's ``spice/lib/`` (it would download them)."""

_CORENLP_ZIP_URL = "http://nlp.stanford.edu/software/stanford-corenlp-full-2015-12-09.zip"

_spice_warning_logged = False


def _spice_folder() -> Path:
    import pycocoevalcap.spice

    return Path(pycocoevalcap.spice.__file__).parent


def spice_required_files() -> list[Path]:
    """The files SPICE needs: pycocoevalcap's ``spice-1.0.jar`` and the two CoreNLP jars in its ``lib/``."""
    folder = _spice_folder()
    return [folder / "spice-1.0.jar", *(folder / "lib" / jar for jar in SPICE_CORENLP_JARS)]


def spice_available() -> bool:
    """Whether SPICE can run offline: Java is on the PATH and every file of :func:`spice_required_files`
    is present (pycocoevalcap would otherwise try to download CoreNLP)."""
    return shutil.which("java") is not None and all(path.is_file() for path in spice_required_files())


def _warn_spice_unavailable() -> None:
    global _spice_warning_logged
    if _spice_warning_logged:
        return
    _spice_warning_logged = True
    missing = [str(path) for path in spice_required_files() if not path.is_file()]
    logger.warning(
        "SPICE skipped: missing %s. No download is attempted. To enable SPICE, take %s from %s (inside its "
        "stanford-corenlp-full-2015-12-09/ folder) and put them in %s%s.",
        ", ".join(missing) or "nothing",
        " and ".join(SPICE_CORENLP_JARS),
        _CORENLP_ZIP_URL,
        _spice_folder() / "lib",
        "" if shutil.which("java") else "; SPICE also needs `java` on the PATH",
    )


def sanitize_caption(text: str) -> str:
    """Makes a caption safe for pycocoevalcap's line-based Java protocols.

    The PTB tokenizer reads one caption per line and METEOR reads one request per line with fields split on
    ``|||``: a line break inside a caption would shift every later caption onto the wrong image (or leave
    METEOR waiting for a line that never comes), and ``|||`` inside a reference would split it into several
    references. Line breaks of any kind become spaces and ``|||`` becomes ``| | |`` (which the PTB
    tokenizer produces from ``|||`` anyway).
    """
    text = " ".join(text.splitlines())
    while "|||" in text:
        text = text.replace("|||", "| | |")
    return text


def _validated(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    allow_empty: bool,
) -> tuple[dict[Hashable, str], dict[Hashable, list[str]]]:
    """Checks and sanitises the inputs; returns predictions (blank ones as "") and references."""
    if not predictions:
        raise ValueError("no predictions to score")
    clean_predictions: dict[Hashable, str] = {}
    clean_references: dict[Hashable, list[str]] = {}
    for image_id, caption in predictions.items():
        if not isinstance(caption, str):
            raise ValueError(f"prediction for image {image_id!r} is not a string: {caption!r}")
        caption = sanitize_caption(caption)
        if not caption.strip():
            if not allow_empty:
                raise ValueError(
                    f"prediction for image {image_id!r} is empty ({caption!r}); pass allow_empty=True to "
                    f"score empty captions as the word {EMPTY_CAPTION!r}"
                )
            caption = ""
        clean_predictions[image_id] = caption

        image_references = references.get(image_id)
        if image_references is None:
            raise ValueError(f"image {image_id!r} has a prediction but no references")
        if isinstance(image_references, str):
            raise ValueError(
                f"references of image {image_id!r} must be a list of strings, got one string "
                f"{image_references!r}"
            )
        kept = []
        for reference in image_references:
            if not isinstance(reference, str):
                raise ValueError(f"a reference of image {image_id!r} is not a string: {reference!r}")
            reference = sanitize_caption(reference)
            # A blank reference would reach the tokenizer as an empty line; it carries no words to match.
            if reference.strip():
                kept.append(reference)
        if not kept:
            raise ValueError(f"image {image_id!r} has no (non-blank) references")
        clean_references[image_id] = kept
    return clean_predictions, clean_references


def _tokenize(
    predictions: dict[Hashable, str], references: dict[Hashable, list[str]]
) -> tuple[dict[Hashable, list[str]], dict[Hashable, list[str]]]:
    """PTB-tokenizes references and non-empty predictions in one Java run.

    Returns ``(gts, res)`` as pycocoevalcap's scorers take them; a prediction that is empty, or that
    tokenizes to nothing (e.g. only punctuation), becomes :data:`EMPTY_CAPTION`.
    """
    inputs: dict[tuple[str, Hashable], list[dict[str, str]]] = {
        ("ref", image_id): [{"caption": reference} for reference in image_references]
        for image_id, image_references in references.items()
    }
    inputs.update(
        {("res", image_id): [{"caption": caption}] for image_id, caption in predictions.items() if caption}
    )
    # pycocoevalcap prints progress lines, and its Java tokenizer a speed line on the process's stderr;
    # the caller reports the scores.
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    with contextlib.redirect_stdout(io.StringIO()), _without_java_progress():
        tokenized = PTBTokenizer().tokenize(inputs)
    for key, captions in inputs.items():
        if len(tokenized.get(key, ())) != len(captions):
            raise RuntimeError(
                f"the PTB tokenizer lost captions of image {key[1]!r}; its output is misaligned"
            )
    gts = {image_id: tokenized[("ref", image_id)] for image_id in references}
    res = {}
    for image_id in predictions:
        caption = tokenized.get(("res", image_id), [""])[0]
        res[image_id] = [caption if caption.strip() else EMPTY_CAPTION]
    return gts, res


_JAVA_PROGRESS = re.compile(r"^PTBTokenizer tokenized \d+ tokens at [\d.]+ tokens per second\.$")


@contextlib.contextmanager
def _without_java_progress() -> Iterator[None]:
    """Runs the block with the process's stderr (file descriptor 2, which Java children inherit) captured,
    then writes back everything captured but the PTB tokenizer's speed line, so no error is lost."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not _JAVA_PROGRESS.match(line.strip()))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


@contextlib.contextmanager
def _meteor_scorer() -> Iterator[Any]:
    """pycocoevalcap's METEOR, whose Java process is stopped even if scoring fails."""
    # The module, not its Meteor class: Meteor is looked up now, so tests can patch it.
    from pycocoevalcap.meteor import meteor as pycocoevalcap_meteor

    meteor = pycocoevalcap_meteor.Meteor()
    try:
        yield meteor
    finally:
        # Meteor.__del__ acquires the lock before stopping Java; a failure inside compute_score leaves it
        # held, which would hang the interpreter at exit. Release it and stop the process now.
        if meteor.lock.locked():
            meteor.lock.release()
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()


def _spice_per_image(gts: dict[Hashable, list[str]], res: dict[Hashable, list[str]]) -> dict[Hashable, float]:
    from pycocoevalcap.spice.spice import Spice

    # Spice.__init__ only fetches CoreNLP (a download when absent); compute_score needs no state from it,
    # so skipping it guarantees that no download is ever attempted.
    spice = Spice.__new__(Spice)
    with contextlib.redirect_stdout(io.StringIO()):
        _, per_image = spice.compute_score(gts, res)
    image_ids = sorted(gts.keys())  # the order compute_score returns them in
    return {image_id: float(s["All"]["f"]) for image_id, s in zip(image_ids, per_image, strict=True)}


def _score(
    gts: dict[Hashable, list[str]],
    res: dict[Hashable, list[str]],
    metrics: Sequence[str],
    meteor: Any,
    spice: dict[Hashable, float] | None,
) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    scores: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):
        if "BLEU" in metrics:
            bleu, _ = Bleu(4).compute_score(gts, res)
            scores.update({f"Bleu_{n + 1}": float(value) for n, value in enumerate(bleu)})
        if meteor is not None:
            scores["METEOR"] = float(meteor.compute_score(gts, res)[0])
        if "ROUGE_L" in metrics:
            scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
        if "CIDEr" in metrics:
            scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if spice is not None:
        # pycocoevalcap's SPICE is the plain mean of the per-image F-scores.
        scores["SPICE"] = float(np.mean([spice[image_id] for image_id in gts]))
    return scores


def coco_caption_scores(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    allow_empty: bool = False,
    groups: Mapping[Hashable, str | None] | None = None,
) -> dict[str, float]:
    """Scores one generated caption per image against that image's references.

    Every input is checked before any Java process starts. Captions and references are sanitised with
    :func:`sanitize_caption`; blank references are dropped.

    Args:
        predictions: image id → generated caption.
        references: image id → reference captions; must cover every predicted id.
        metrics: any of :data:`SUPPORTED_METRICS`. ``SPICE`` runs only when :func:`spice_available`;
            otherwise it is skipped with one warning per process (no download is attempted). None (an
            empty sequence) checks the inputs and returns no score, without importing pycocoevalcap.
        allow_empty: score an empty or whitespace-only caption as :data:`EMPTY_CAPTION` instead of raising.
        groups: image id → subset name (e.g. nocaps ``out-domain``) or None; each subset is also scored on
            its own (CIDEr's document frequencies then come from that subset, as in a separate run).

    Returns:
        metric name → score with pycocoevalcap's names (``Bleu_4``, ``METEOR``, ``ROUGE_L``, ``CIDEr``,
        ``SPICE``), plus ``<name>/<group>`` for each group.

    Raises:
        ValueError: unknown metric, no predictions, a non-string or (unless allowed) empty caption, an
            image without references. The message names the image.
    """
    unknown = set(metrics) - set(SUPPORTED_METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {SUPPORTED_METRICS}")
    clean_predictions, clean_references = _validated(predictions, references, allow_empty)
    if not metrics:  # nothing to score: no Java process, no pycocoevalcap (CaptionEvaluation(nlg_metrics=[]))
        return {}
    group_members: dict[str, list[Hashable]] = {}
    if groups is not None:
        for image_id in clean_predictions:
            group = groups.get(image_id)
            if group is not None:
                group_members.setdefault(group, []).append(image_id)
    run_spice = "SPICE" in metrics and spice_available()
    if "SPICE" in metrics and not run_spice:
        _warn_spice_unavailable()

    gts, res = _tokenize(clean_predictions, clean_references)
    spice = _spice_per_image(gts, res) if run_spice else None
    with _meteor_scorer() if "METEOR" in metrics else contextlib.nullcontext() as meteor:
        scores = _score(gts, res, metrics, meteor, spice)
        for group, members in group_members.items():
            group_scores = _score(
                {i: gts[i] for i in members}, {i: res[i] for i in members}, metrics, meteor, spice
            )
            scores.update({f"{name}/{group}": value for name, value in group_scores.items()})
    return scores
