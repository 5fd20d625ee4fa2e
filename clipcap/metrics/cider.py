"""CIDEr-D in process: the score pycocoevalcap's ``Cider`` computes, with document frequencies fixed once.

pycocoevalcap's ``Cider`` is CIDEr-D (Vedantam et al. 2015): n-grams of 1 to 4 words weighted by tf-idf,
the hypothesis's vector against each reference's, each n-gram's weight clipped to the reference's
(``min(hyp, ref) · ref``), the cosine scaled by a Gaussian length penalty (σ = 6), averaged over n and over
the references, times 10. Two details of its code are kept exactly: the document frequency of an n-gram is
the number of *reference sets* holding it (its log, floored at log 1), and the "length" in the penalty is
the number of bigrams, not words.

pycocoevalcap computes the document frequencies from the very captions it scores, in one call, and runs
no faster than Python dictionaries allow. :class:`CiderD` takes them from a corpus given once (self-critical
training uses the training split's references, as Rennie et al. 2017 do), keeps each reference set's
vectors, and scores any number of candidates against them without Java or a new scorer per call. With the
corpus equal to the scored reference sets it gives pycocoevalcap's numbers (``tests/test_cider.py``).

Captions are compared as given: tokenize them first (lower case, punctuation split off) as the evaluation
does with the PTB tokenizer.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

NGRAM_ORDER = 4
SIGMA = 6.0


def ngram_counts(caption: str, order: int = NGRAM_ORDER) -> Counter[tuple[str, ...]]:
    """Every n-gram of 1 to ``order`` words of a tokenized caption, with its count."""
    words = caption.split()
    return Counter(tuple(words[i : i + n]) for n in range(1, order + 1) for i in range(len(words) - n + 1))


@dataclass(frozen=True)
class _Vector:
    """A caption's tf-idf weights split by n-gram order, their norms, and its length as CIDEr-D counts it."""

    weights: tuple[dict[tuple[str, ...], float], ...]
    norms: tuple[float, ...]
    length: int


class CiderD:
    """CIDEr-D of candidate captions against reference sets, document frequencies from a fixed corpus.

    Args:
        corpus: the reference sets the document frequencies come from, one sequence of tokenized captions
            per image (an n-gram counts once per set).
        order: the longest n-gram (4).
        sigma: the length penalty's standard deviation (6).

    Raises:
        ValueError: an empty corpus.
    """

    def __init__(
        self, corpus: Iterable[Sequence[str]], order: int = NGRAM_ORDER, sigma: float = SIGMA
    ) -> None:
        self.order = order
        self.sigma = sigma
        frequency: Counter[tuple[str, ...]] = Counter()
        sets = 0
        for references in corpus:
            sets += 1
            frequency.update({gram for caption in references for gram in ngram_counts(caption, order)})
        if sets == 0:
            raise ValueError("CiderD: the corpus of reference sets is empty")
        self._log_sets = math.log(float(sets))
        self._log_frequency = {gram: math.log(count) for gram, count in frequency.items() if count > 1}
        self.kept: dict[Hashable, list[_Vector]] = {}
        """Reference vectors kept by :meth:`score`'s keys; clear it to free them."""

    def _vector(self, caption: str) -> _Vector:
        weights: tuple[dict[tuple[str, ...], float], ...] = tuple({} for _ in range(self.order))
        squares = [0.0] * self.order
        length = 0
        for gram, count in ngram_counts(caption, self.order).items():
            n = len(gram) - 1
            weight = float(count) * (self._log_sets - self._log_frequency.get(gram, 0.0))
            weights[n][gram] = weight
            squares[n] += weight * weight
            if n == 1:  # pycocoevalcap counts bigrams as the caption's length
                length += count
        return _Vector(weights, tuple(math.sqrt(s) for s in squares), length)

    def _similarity(self, hypothesis: _Vector, reference: _Vector) -> float:
        """The mean over n-gram orders of the clipped, length-penalised cosine."""
        penalty = math.exp(-((hypothesis.length - reference.length) ** 2) / (2 * self.sigma**2))
        total = 0.0
        for n in range(self.order):
            ref_weights = reference.weights[n]
            value = 0.0
            for gram, weight in hypothesis.weights[n].items():
                ref_weight = ref_weights.get(gram, 0.0)
                value += min(weight, ref_weight) * ref_weight
            if hypothesis.norms[n] != 0 and reference.norms[n] != 0:
                value /= hypothesis.norms[n] * reference.norms[n]
            total += value * penalty
        return total / self.order

    def reference_vectors(self, key: Hashable, references: Sequence[str]) -> list[_Vector]:
        """The vectors of one image's references, computed on first use and kept under ``key``."""
        vectors = self.kept.get(key)
        if vectors is None:
            vectors = self.kept[key] = self._vectors_of(references, key)
        return vectors

    def _vectors_of(self, references: Sequence[str], what: object) -> list[_Vector]:
        if not references:
            raise ValueError(f"CiderD: {what} has no reference captions")
        return [self._vector(caption) for caption in references]

    def score(
        self,
        candidates: Sequence[str],
        references: Sequence[Sequence[str]],
        keys: Sequence[Hashable] | None = None,
    ) -> np.ndarray:
        """(N,) the CIDEr-D of each candidate against its image's references.

        Args:
            candidates: N tokenized captions.
            references: per candidate, its image's tokenized references.
            keys: per candidate, the image it describes: its references' vectors are then kept under it and
                reused (several samples of one image, the same image in a later step), and the references
                of a key already kept are not read. None: computed for this call only.

        Raises:
            ValueError: the lengths differ, or a candidate has no references.
        """
        if len(references) != len(candidates) or (keys is not None and len(keys) != len(candidates)):
            raise ValueError(
                f"CiderD.score: {len(candidates)} candidates, {len(references)} reference sets"
                + ("" if keys is None else f", {len(keys)} keys")
            )
        scores = np.empty(len(candidates), dtype=np.float64)
        for index, (candidate, refs) in enumerate(zip(candidates, references, strict=True)):
            vectors = (
                self.reference_vectors(keys[index], refs)
                if keys is not None
                else self._vectors_of(refs, f"candidate {index}")
            )
            hypothesis = self._vector(candidate)
            scores[index] = 10.0 * sum(self._similarity(hypothesis, ref) for ref in vectors) / len(vectors)
        return scores
