"""NLG metrics through pycocoevalcap on PTB-tokenized text, so numbers compare with papers."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence

_SCORERS = ("BLEU", "CIDEr", "ROUGE_L", "METEOR")


def coco_caption_scores(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    metrics: Sequence[str] = ("BLEU", "CIDEr"),
) -> dict[str, float]:
    """Scores one generated caption per image against that image's references.

    Args:
        predictions: image id → generated caption.
        references: image id → reference captions; must cover every predicted id.
        metrics: any of ``BLEU`` (gives Bleu_1..Bleu_4), ``CIDEr``, ``ROUGE_L``, ``METEOR``.

    Returns:
        metric name → score, pycocoevalcap's names (``Bleu_4``, ``CIDEr``, ...).
    """
    unknown = set(metrics) - set(_SCORERS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {_SCORERS}")
    if not predictions:
        raise ValueError("no predictions to score")
    missing = [image_id for image_id in predictions if not references.get(image_id)]
    if missing:
        raise ValueError(f"{len(missing)} predicted image(s) have no references, e.g. {missing[:3]}")
    for image_id, caption in predictions.items():
        if not isinstance(caption, str):
            raise ValueError(f"prediction for image {image_id!r} is not a string: {caption!r}")

    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    # pycocoevalcap prints progress lines; the caller reports the scores.
    with contextlib.redirect_stdout(io.StringIO()):
        gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in predictions})
        res = tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in predictions})
    # An empty caption tokenizes to "", which BLEU/METEOR mishandle; score it as a lone unknown word.
    res = {i: [c if c.strip() else "<empty>" for c in captions] for i, captions in res.items()}

    scores: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):
        if "BLEU" in metrics:
            from pycocoevalcap.bleu.bleu import Bleu

            bleu, _ = Bleu(4).compute_score(gts, res)
            scores.update({f"Bleu_{n + 1}": float(value) for n, value in enumerate(bleu)})
        if "METEOR" in metrics:
            from pycocoevalcap.meteor.meteor import Meteor

            scores["METEOR"] = float(Meteor().compute_score(gts, res)[0])
        if "ROUGE_L" in metrics:
            from pycocoevalcap.rouge.rouge import Rouge

            scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
        if "CIDEr" in metrics:
            from pycocoevalcap.cider.cider import Cider

            scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return scores
