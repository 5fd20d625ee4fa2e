"""CIDEr-D in process (``clipcap.metrics.cider``) against pycocoevalcap's ``Cider`` on the same tokenized
captions: pycocoevalcap takes the document frequencies from the scored reference sets, so ``CiderD`` is given
those same sets as its corpus."""

from __future__ import annotations

import random

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from clipcap.metrics.cider import CiderD

WORDS = [
    "a",
    "an",
    "the",
    "red",
    "blue",
    "green",
    "small",
    "large",
    "circle",
    "square",
    "triangle",
    "on",
    "left",
    "right",
    "of",
    "and",
    "two",
    "is",
]


def caption(rng: random.Random) -> str:
    """A tokenized caption of 0 to 14 words from a small vocabulary, so that n-grams recur across sets."""
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 14)))


def caption_sets(seed: int, images: int) -> tuple[list[str], list[list[str]]]:
    rng = random.Random(seed)
    references = [[caption(rng) or "a" for _ in range(rng.randint(1, 6))] for _ in range(images)]
    # Some candidates copy a reference or share its start: high scores and partial n-gram overlaps.
    candidates = []
    for refs in references:
        kind = rng.random()
        if kind < 0.2:
            candidates.append(rng.choice(refs))
        elif kind < 0.4:
            words = rng.choice(refs).split()
            candidates.append(" ".join(words[: len(words) // 2] + caption(rng).split()[:3]))
        else:
            candidates.append(caption(rng))
    return candidates, references


def pycocoevalcap_cider(candidates: list[str], references: list[list[str]]) -> np.ndarray:
    gts = {index: refs for index, refs in enumerate(references)}
    res = {index: [candidate] for index, candidate in enumerate(candidates)}
    return np.asarray(Cider().compute_score(gts, res)[1], dtype=np.float64)


@pytest.mark.parametrize("seed", range(6))
def test_equals_pycocoevalcap_on_the_same_captions(seed: int) -> None:
    """60 caption sets a call, 360 in all, with empty and repeated candidates among them."""
    candidates, references = caption_sets(seed, images=60)
    candidates[0] = ""  # no n-grams at all
    ours = CiderD(references).score(candidates, references)
    theirs = pycocoevalcap_cider(candidates, references)
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    assert ours.max() > 1.0 and ours[0] == 0.0


def test_kept_reference_vectors_give_the_same_scores() -> None:
    candidates, references = caption_sets(7, images=20)
    scorer = CiderD(references)
    plain = scorer.score(candidates, references)
    keys = list(range(20))
    assert np.array_equal(scorer.score(candidates, references, keys=keys), plain)
    assert np.array_equal(scorer.score(candidates, references, keys=keys), plain)  # from the kept vectors
    # Five samples of each image against its kept references: each as scored alone.
    samples = [c for c in candidates for _ in range(5)]
    by_sample = [refs for refs in references for _ in range(5)]
    np.testing.assert_array_equal(
        scorer.score(samples, by_sample, keys=[k for k in keys for _ in range(5)]), np.repeat(plain, 5)
    )


def test_a_fixed_corpus_makes_a_score_independent_of_the_batch() -> None:
    """Self-critical training takes the document frequencies from the training references: an image's
    reward is then the same whichever batch it is in, which pycocoevalcap's per-call frequencies are not."""
    candidates, references = caption_sets(8, images=40)
    corpus = CiderD(references)
    whole = corpus.score(candidates, references)
    halves = np.concatenate(
        [corpus.score(candidates[:13], references[:13]), corpus.score(candidates[13:], references[13:])]
    )
    np.testing.assert_allclose(halves, whole, rtol=1e-12)
    per_call = pycocoevalcap_cider(candidates[:13], references[:13])
    assert not np.allclose(per_call, whole[:13])


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="corpus of reference sets is empty"):
        CiderD([])
    scorer = CiderD([["a red circle"]])
    with pytest.raises(ValueError, match="candidate 0 has no reference captions"):
        scorer.score(["a red circle"], [[]])
    with pytest.raises(ValueError, match="2 candidates, 1 reference sets"):
        scorer.score(["a", "b"], [["a"]])
