"""Caption metrics: CLIP scores by hand on embeddings with known cosines, NLG against direct pycocoevalcap
calls, and the torchmetrics wrappers' de-duplication, ordering, groups and autocast behaviour.

METEOR's Java start-up (several seconds) happens once: the comparison test shares one METEOR process
between the direct call and ours; every other NLG test uses BLEU/CIDEr/ROUGE only or never reaches Java.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clipcap.metrics import (
    EMPTY_CAPTION,
    ClipCaptionScores,
    NLGScores,
    clip_score,
    coco_caption_scores,
    first_occurrences,
    max_reference_similarity,
    ref_clip_score,
    ref_compare,
    retrieval_p_at_1_blocks,
    retrieval_p_at_1_random,
    retrieval_ranks,
    retrieval_recall_at_k,
    sanitize_caption,
)
from clipcap.metrics import clip_scores as clip_scores_module
from clipcap.metrics import nlg as nlg_module

FAST_METRICS = ("BLEU", "CIDEr")


def basis(dim: int, *weights: tuple[int, float]) -> torch.Tensor:
    """A (dim,) vector with the given (axis, weight) entries."""
    vector = torch.zeros(dim)
    for axis, weight in weights:
        vector[axis] = weight
    return vector


# ----------------------------------------------------------------------------------------------------------
# CLIP scores on constructed embeddings
# ----------------------------------------------------------------------------------------------------------


def test_clip_score_by_hand() -> None:
    images = torch.stack([basis(4, (0, 3.0)), basis(4, (1, 1.0)), basis(4, (2, 2.0))])  # unnormalised
    texts = torch.stack(
        [basis(4, (0, 0.6), (1, 0.8)), basis(4, (1, -0.6), (3, 0.8)), basis(4, (2, 5.0))]
    )  # cosines 0.6, -0.6 (clamped to 0), 1.0
    scores = clip_score(images, texts)
    assert scores.dtype == torch.float32
    assert scores.tolist() == pytest.approx([1.5, 0.0, 2.5], abs=1e-6)
    assert clip_score(images, texts, weight=1.0).tolist() == pytest.approx([0.6, 0.0, 1.0], abs=1e-6)
    half = clip_score(images.bfloat16(), texts.bfloat16())
    assert half.dtype == torch.float32 and half.tolist() == pytest.approx([1.5, 0.0, 2.5], abs=2e-2)
    with pytest.raises(ValueError, match="same shape"):
        clip_score(images, texts[:2])


def test_max_reference_similarity_ragged_and_single_reference() -> None:
    candidates = torch.stack([basis(4, (0, 2.0)), basis(4, (1, 1.0))])
    references = torch.stack(
        [
            basis(4, (0, 0.6), (1, 0.8)),  # image 0: 0.6
            basis(4, (1, -4.0)),  # image 1, its ONLY reference: -1
            basis(4, (1, 1.0)),  # image 0: 0
            basis(4, (0, 0.8), (2, 0.6)),  # image 0: 0.8, the max
        ]
    )
    owner = torch.tensor([0, 1, 0, 0])
    assert max_reference_similarity(candidates, references, owner).tolist() == pytest.approx(
        [0.8, -1.0], abs=1e-6
    )
    with pytest.raises(ValueError, match=r"no reference captions, e.g. image\(s\) \[1\]"):
        max_reference_similarity(candidates, references[[0, 2]], torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="outside"):
        max_reference_similarity(candidates, references, torch.tensor([0, 1, 2, 0]))


def test_ref_clip_score_harmonic_mean() -> None:
    clip_scores = torch.tensor([1.5, 1.5, 0.0, 2.5])
    max_ref_sims = torch.tensor([0.5, -0.3, 0.0, 1.0])
    # 2·1.5·0.5/(1.5+0.5) = 0.75; a negative reference part counts as 0; both 0 gives 0, not NaN.
    expected = [0.75, 0.0, 0.0, 2 * 2.5 * 1.0 / 3.5]
    assert ref_clip_score(clip_scores, max_ref_sims).tolist() == pytest.approx(expected, abs=1e-6)


def test_ref_compare_counts_strictly_lower_references() -> None:
    images = torch.stack([basis(4, (0, 1.0)), basis(4, (1, 2.0))])
    candidates = torch.stack([basis(4, (0, 0.6), (1, 0.8)), basis(4, (1, 0.6), (2, 0.8))])
    references = torch.stack(
        [
            basis(4, (0, 0.5), (2, math.sqrt(0.75))),  # image 0, cos 0.5: lower
            candidates[0].clone(),  # image 0, the same embedding: a tie, not lower
            basis(4, (0, 0.8), (3, 0.6)),  # image 0, cos 0.8: higher
            basis(4, (1, 0.8), (2, 0.6)),  # image 1's ONLY reference, cos 0.8 > 0.6: not lower
            basis(4, (0, -0.2), (3, math.sqrt(0.96))),  # image 0, cos -0.2: lower
        ]
    )
    owner = torch.tensor([0, 0, 0, 1, 0])
    assert ref_compare(images, candidates, references, owner).tolist() == [0.5, 0.0]
    # Image 1's single reference below its candidate: all of its references are beaten.
    lower = references.clone()
    lower[3] = basis(4, (1, 0.1), (3, math.sqrt(0.99)))
    assert ref_compare(images, candidates, lower, owner).tolist() == [0.5, 1.0]


def planted_retrieval_world(num_images: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot images; captions equal to their image except planted cases (see the test)."""
    images = torch.eye(num_images)
    texts = images.clone()
    texts[3] = images[7]  # block 0: retrieves another image of its block, a miss
    texts[120] = images[120] + images[150]  # block 1: a tie with image 150, a miss
    texts[10] = 0.6 * images[10] + 0.8 * images[150]  # prefers image 150 of ANOTHER block: a hit here
    texts[230] = images[231]  # in the dropped partial block: never scored
    return texts, images


def test_retrieval_p_at_1_blocks_drops_partial_block_and_counts_ties_as_misses() -> None:
    texts, images = planted_retrieval_world()
    p_at_1, num_scored = retrieval_p_at_1_blocks(texts, images, block_size=100)
    assert num_scored == 200
    assert p_at_1 == pytest.approx(100 * 198 / 200)
    # Against the full set, caption 10 misses too, and caption 230 is scored.
    assert retrieval_recall_at_k(texts, images, ks=(1,))[1] == pytest.approx(100 * 246 / 250)


def test_retrieval_p_at_1_blocks_needs_one_full_block() -> None:
    images = torch.eye(99)
    texts = images.clone()
    with pytest.raises(ValueError, match=r"blocks of 100 images needs at least 100 images; there are 99"):
        retrieval_p_at_1_blocks(texts, images, block_size=100)


def test_retrieval_p_at_1_random_is_seeded_and_skips_the_own_image() -> None:
    num_images = 150
    images = torch.eye(num_images)
    # Caption i prefers image i+1: a miss exactly when image i+1 is among its drawn distractors.
    texts = 0.6 * images + 0.8 * images.roll(-1, dims=0)
    first = retrieval_p_at_1_random(texts, images, num_distractors=99, seed=0)
    assert first == retrieval_p_at_1_random(texts, images, num_distractors=99, seed=0)
    assert first != retrieval_p_at_1_random(texts, images, num_distractors=99, seed=1)
    assert 15 < first < 55  # about 50/149 of captions keep image i+1 out of their 99 draws
    # With every other image as a distractor it is full-set P@1 (the own image is never a distractor).
    everything = retrieval_p_at_1_random(texts, images, num_distractors=num_images - 1, seed=3)
    assert everything == retrieval_recall_at_k(texts, images, ks=(1,))[1] == 0.0
    assert retrieval_p_at_1_random(images, images, num_distractors=num_images - 1) == 100.0
    with pytest.raises(ValueError, match="at least 151 images; there are 150"):
        retrieval_p_at_1_random(texts, images, num_distractors=150)


def test_retrieval_recall_matches_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(0)
    num_images = 60
    images = torch.randn(num_images, 8, generator=generator)
    texts = images + 1.5 * torch.randn(num_images, 8, generator=generator)
    images[5] = images[17]  # captions 5 and 17 each tie with the other's image
    texts[40] = images[41]  # caption 40 prefers image 41
    # Small chunks exercise the chunk boundaries.
    monkeypatch.setattr(clip_scores_module, "_MAX_CHUNK_ELEMENTS", 7 * num_images)
    similarities = F.normalize(texts, dim=-1) @ F.normalize(images, dim=-1).T
    brute_ranks = [
        1 + sum(1 for j in range(num_images) if j != i and similarities[i, j] >= similarities[i, i])
        for i in range(num_images)
    ]
    assert retrieval_ranks(texts, images).tolist() == brute_ranks
    assert brute_ranks[5] >= 2 and brute_ranks[17] >= 2 and brute_ranks[40] >= 2
    ks = (1, 5, 10)
    expected = {k: 100 * sum(rank <= k for rank in brute_ranks) / num_images for k in ks}
    assert retrieval_recall_at_k(texts, images, ks) == pytest.approx(expected)


def test_scores_ignore_bf16_autocast() -> None:
    generator = torch.Generator().manual_seed(1)
    images, texts = torch.randn(2, 120, 16, generator=generator)
    references = torch.randn(240, 16, generator=generator)
    owner = torch.arange(120).repeat(2)

    def everything() -> list[torch.Tensor]:
        scores = clip_score(images, texts)
        max_ref = max_reference_similarity(texts, references, owner)
        return [
            scores,
            max_ref,
            ref_clip_score(scores, max_ref),
            ref_compare(images, texts, references, owner),
            retrieval_ranks(texts, images),
            torch.tensor(retrieval_p_at_1_blocks(texts, images, block_size=50)),
            torch.tensor(retrieval_p_at_1_random(texts, images, num_distractors=20)),
        ]

    plain = everything()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = everything()
    for expected, actual in zip(plain, autocast, strict=True):
        assert actual.dtype == expected.dtype
        assert torch.equal(actual, expected)


def test_first_occurrences_sorted_by_index() -> None:
    indices = torch.tensor([4, 2, 9, 2, 4, 0])
    assert first_occurrences(indices).tolist() == [5, 1, 0, 2]


# ----------------------------------------------------------------------------------------------------------
# NLG metrics
# ----------------------------------------------------------------------------------------------------------

PREDICTIONS = {
    "img1": "A dog runs across the green grass.",
    "img2": "Two people riding bikes down a street!",
    "img3": "a red bus parked near the station",
}
REFERENCES = {
    "img1": ["A brown dog running on grass.", "The dog is running in a field", "dog runs\r\non the lawn"],
    "img2": ["Two cyclists ride along a city street.", "People biking down the road |||| fast"],
    "img3": ["A red double-decker bus at a stop.", "A bus parked by a train station.", "red bus"],
}


def direct_tokenize(references: dict, predictions: dict) -> tuple[dict, dict]:
    """pycocoevalcap's own tokenization, as COCOEvalCap does it (references and results separately)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    with contextlib.redirect_stdout(io.StringIO()):
        gts = PTBTokenizer().tokenize({i: [{"caption": c} for c in refs] for i, refs in references.items()})
        res = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in predictions.items()})
    return gts, res


def test_nlg_equals_direct_pycocoevalcap(monkeypatch: pytest.MonkeyPatch) -> None:
    import pycocoevalcap.meteor.meteor as meteor_module
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    # pycocoevalcap would read the \r\n as a line break; the direct call gets what we sanitise it to.
    clean_references = {i: [sanitize_caption(c) for c in refs] for i, refs in REFERENCES.items()}
    assert clean_references["img1"][2] == "dog runs on the lawn"
    gts, res = direct_tokenize(clean_references, PREDICTIONS)
    shared_meteor = meteor_module.Meteor()  # one Java start-up for both computations
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, _ = Bleu(4).compute_score(gts, res)
        expected = {f"Bleu_{n + 1}": value for n, value in enumerate(bleu)}
        expected["METEOR"] = shared_meteor.compute_score(gts, res)[0]
        expected["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
        expected["CIDEr"] = Cider().compute_score(gts, res)[0]
    monkeypatch.setattr(meteor_module, "Meteor", lambda: shared_meteor)

    scores = coco_caption_scores(PREDICTIONS, REFERENCES)
    assert scores == expected
    assert 0 < scores["Bleu_1"] < 1 and scores["CIDEr"] > 0
    assert shared_meteor.meteor_p.poll() is not None  # our call stopped the Java process


def test_nlg_groups_equal_separate_runs() -> None:
    groups = {"img1": "in", "img2": "out", "img3": "in"}
    scores = coco_caption_scores(PREDICTIONS, REFERENCES, FAST_METRICS, groups=groups)
    inside = coco_caption_scores({i: PREDICTIONS[i] for i in ("img1", "img3")}, REFERENCES, FAST_METRICS)
    assert {k: v for k, v in scores.items() if "/" not in k} == coco_caption_scores(
        PREDICTIONS, REFERENCES, FAST_METRICS
    )
    assert {k.removesuffix("/in"): v for k, v in scores.items() if k.endswith("/in")} == inside
    assert set(scores) == {f"{m}{g}" for m in inside for g in ("", "/in", "/out")}


def fail_if_java_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    import pycocoevalcap.meteor.meteor as meteor_module
    import pycocoevalcap.tokenizer.ptbtokenizer as tokenizer_module

    def refuse(*args, **kwargs):
        raise AssertionError("Java started before the inputs were validated")

    monkeypatch.setattr(meteor_module, "Meteor", refuse)
    monkeypatch.setattr(tokenizer_module.PTBTokenizer, "tokenize", refuse)


@pytest.mark.parametrize(
    ("predictions", "references", "message"),
    [
        ({"a": "a dog", "b": ""}, {"a": ["a dog"], "b": ["a cat"]}, r"prediction for image 'b' is empty"),
        ({"a": "a dog", "b": "  \n "}, {"a": ["a dog"], "b": ["a cat"]}, r"image 'b' is empty"),
        ({"a": "a dog", "b": "a cat"}, {"a": ["a dog"]}, r"image 'b' has a prediction but no references"),
        (
            {"a": "a dog", "b": "a cat"},
            {"a": ["a dog"], "b": []},
            r"image 'b' has no \(non-blank\) references",
        ),
        ({"a": "a dog", "b": "a cat"}, {"a": ["a dog"], "b": [" "]}, r"image 'b' has no \(non-blank\)"),
        (
            {"a": "a dog", "b": None},
            {"a": ["a dog"], "b": ["x"]},
            r"prediction for image 'b' is not a string",
        ),
        ({"a": "a dog"}, {"a": ["a dog", 3]}, r"a reference of image 'a' is not a string"),
        ({"a": "a dog"}, {"a": "a dog"}, r"references of image 'a' must be a list"),
        ({}, {}, r"no predictions"),
    ],
)
def test_nlg_rejects_bad_inputs_before_java(
    monkeypatch: pytest.MonkeyPatch, predictions: dict, references: dict, message: str
) -> None:
    fail_if_java_starts(monkeypatch)
    with pytest.raises(ValueError, match=message):
        coco_caption_scores(predictions, references, metrics=("BLEU", "METEOR", "CIDEr"))


def test_nlg_scores_allowed_empty_caption_as_a_miss() -> None:
    references = {"a": ["a dog on grass"], "b": ["a cat on a sofa"]}
    scores = coco_caption_scores({"a": "a dog on grass", "b": " "}, references, ("BLEU",), allow_empty=True)
    perfect = coco_caption_scores({"a": "a dog on grass", "b": "a cat on a sofa"}, references, ("BLEU",))
    # The same as a caption that tokenizes to the lone unmatched word.
    as_word = coco_caption_scores({"a": "a dog on grass", "b": "xyzzy"}, references, ("BLEU",))
    assert scores == as_word and scores["Bleu_1"] < perfect["Bleu_1"]
    assert EMPTY_CAPTION == "<empty>"


def test_meteor_failure_releases_lock_and_stops_java(monkeypatch: pytest.MonkeyPatch) -> None:
    import pycocoevalcap.meteor.meteor as meteor_module

    class BrokenMeteor:
        """Stands in for pycocoevalcap's Meteor: fails inside compute_score while holding its lock."""

        def __init__(self) -> None:
            self.meteor_p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            self.lock = threading.Lock()

        def compute_score(self, gts, res):
            self.lock.acquire()
            raise AssertionError("METEOR's own assertion")

    created: list[BrokenMeteor] = []
    monkeypatch.setattr(meteor_module, "Meteor", lambda: created.append(BrokenMeteor()) or created[-1])
    with pytest.raises(AssertionError, match="METEOR's own assertion"):
        coco_caption_scores({"a": "a dog"}, {"a": ["a dog"]}, ("METEOR",))
    assert not created[0].lock.locked()
    assert created[0].meteor_p.poll() is not None


def test_spice_skipped_with_one_warning_when_jars_absent(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    import pycocoevalcap.spice.get_stanford_models as download_module

    missing = [tmp_path / "spice-1.0.jar", tmp_path / "lib" / "stanford-corenlp-3.6.0-models.jar"]
    monkeypatch.setattr(nlg_module, "spice_required_files", lambda: missing)
    monkeypatch.setattr(nlg_module, "_spice_warning_logged", False)
    monkeypatch.setattr(download_module, "urlretrieve", lambda *a, **k: pytest.fail("attempted a download"))
    assert not nlg_module.spice_available()
    with caplog.at_level(logging.WARNING, logger=nlg_module.__name__):
        for _ in range(2):
            scores = coco_caption_scores({"a": "a dog"}, {"a": ["a dog"]}, ("BLEU", "SPICE"))
            assert "SPICE" not in scores and "Bleu_4" in scores
    warnings = [r for r in caplog.records if "SPICE skipped" in r.getMessage()]
    assert len(warnings) == 1
    assert "stanford-corenlp-3.6.0-models.jar" in warnings[0].getMessage()


def test_spice_runs_without_download_when_available(monkeypatch: pytest.MonkeyPatch) -> None:
    import pycocoevalcap.spice.spice as spice_module

    monkeypatch.setattr(nlg_module, "spice_available", lambda: True)
    monkeypatch.setattr(spice_module, "get_stanford_models", lambda: pytest.fail("attempted a download"))
    per_image = {"a": 0.5, "b": 0.25, "c": 1.0}

    def fake_compute_score(self, gts, res):
        ids = sorted(gts)
        return 0.0, [{"All": {"f": per_image[i]}} for i in ids]

    monkeypatch.setattr(spice_module.Spice, "compute_score", fake_compute_score)
    predictions = {"a": "a dog", "b": "a cat", "c": "a cow"}
    references = {i: ["an animal"] for i in predictions}
    scores = coco_caption_scores(predictions, references, ("SPICE",), groups={"a": "x", "b": "x", "c": None})
    assert scores == {"SPICE": pytest.approx(1.75 / 3), "SPICE/x": pytest.approx(0.375)}


# ----------------------------------------------------------------------------------------------------------
# torchmetrics wrappers
# ----------------------------------------------------------------------------------------------------------

NLG_CAPTIONS = [
    "a dog runs on grass",
    "a cat sleeps on a sofa",
    "a red bus on the street",
    "two people ride bikes",
    "a bowl of fruit on a table",
    "a man surfing a wave",
]
NLG_REFERENCES = [
    ["a dog running on the grass", "the dog runs"],
    ["a cat asleep on a couch", "cat on sofa"],
    ["a red bus in the street", "a bus"],
    ["two cyclists on bikes", "people riding bicycles"],
    ["fruit in a bowl on a table", "a bowl of apples"],
    ["a surfer riding a wave", "a man on a surfboard"],
]
NLG_GROUPS = ["in-domain", "out-domain", "in-domain", None, "out-domain", "in-domain"]


def nlg_metric(**kwargs) -> NLGScores:
    return NLGScores({"": NLG_REFERENCES}, metrics=FAST_METRICS, **kwargs)


def test_nlg_scores_equal_coco_caption_scores_and_deduplicate() -> None:
    expected = coco_caption_scores(
        dict(enumerate(NLG_CAPTIONS)), dict(enumerate(NLG_REFERENCES)), FAST_METRICS
    )
    whole = nlg_metric()
    whole.update(torch.arange(6), NLG_CAPTIONS)
    assert whole.compute() == expected

    # Two halves in reversed order, then the distributed sampler's repeats (with a different caption,
    # which is ignored: the first entry of an index is kept).
    halves = nlg_metric()
    halves.update(torch.tensor([3, 4, 5]), NLG_CAPTIONS[3:])
    halves.update(torch.tensor([0, 1, 2]), NLG_CAPTIONS[:3])
    halves.update(torch.tensor([3, 0]), ["ignored", "ignored"])
    assert halves.compute() == expected
    assert halves.captions() == dict(enumerate(NLG_CAPTIONS))


def test_nlg_scores_sets_and_groups_keys() -> None:
    descriptions = [[f"a long description of image {i}: {refs[0]}"] for i, refs in enumerate(NLG_REFERENCES)]
    metric = NLGScores(
        {"caption": NLG_REFERENCES, "description": descriptions}, metrics=FAST_METRICS, groups=NLG_GROUPS
    )
    metric.update(torch.arange(6), NLG_CAPTIONS)
    scores = metric.compute()
    names = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr")
    assert set(scores) == {
        f"{set_name}/{name}{group}"
        for set_name in ("caption", "description")
        for name in names
        for group in ("", "/in-domain", "/out-domain")
    }
    out_domain = coco_caption_scores(
        {i: NLG_CAPTIONS[i] for i in (1, 4)}, {i: NLG_REFERENCES[i] for i in (1, 4)}, FAST_METRICS
    )
    assert scores["caption/CIDEr/out-domain"] == out_domain["CIDEr"]

    unnamed = nlg_metric(groups=NLG_GROUPS)
    unnamed.update(torch.arange(6), NLG_CAPTIONS)
    assert {"Bleu_4", "CIDEr", "CIDEr/out-domain", "Bleu_4/in-domain"} <= set(unnamed.compute())


def test_nlg_scores_unicode_empty_and_unknown_index() -> None:
    metric = nlg_metric()
    metric.update(torch.tensor([0, 1]), ["un café près du lac ☕", ""])
    assert metric.captions() == {0: "un café près du lac ☕", 1: ""}
    assert "CIDEr" in metric.compute()  # the empty caption is scored as a miss (allow_empty=True)
    with pytest.raises(ValueError, match="unknown dataset index 6: the references cover 6 images"):
        metric.update(torch.tensor([2, 6]), ["a", "b"])
    with pytest.raises(ValueError, match="2 captions for 3 indices"):
        metric.update(torch.tensor([2, 3, 4]), ["a", "b"])
    strict = nlg_metric(allow_empty=False)
    strict.update(torch.tensor([0, 1]), ["a dog", ""])
    with pytest.raises(ValueError, match="prediction for image 1 is empty"):
        strict.compute()


def test_states_start_with_typed_empties_so_an_idle_rank_can_gather(tiny_world: Path) -> None:
    from clipcap.clip.encoder import ClipEncoder

    nlg = nlg_metric()
    clip = ClipCaptionScores(ClipEncoder(str(tiny_world / "clip")), NLG_REFERENCES)
    for metric in (nlg, clip):
        for name, (dtype, trailing) in metric._gathered_specs.items():
            state = getattr(metric, name)
            assert len(state) == 1 and state[0].dtype == dtype and state[0].shape == (0, *trailing)
            assert metric._reductions[name] is not None  # "cat"
    nlg.update(torch.tensor([0]), ["a dog"])
    nlg.reset()
    assert [tuple(t.shape) for t in nlg.indices] == [(0,)]


@pytest.fixture(scope="module")
def scoring_clip(tiny_world: Path):
    from clipcap.clip.encoder import ClipEncoder

    return ClipEncoder(str(tiny_world / "clip"))


def clip_batch(scoring_clip, num_images: int = 12) -> tuple[list[list[str]], torch.Tensor, list[str]]:
    generator = torch.Generator().manual_seed(0)
    colors = ["red", "green", "blue", "yellow"]
    shapes = ["circle", "square", "triangle"]
    references = [
        [f"a {colors[i % 4]} {shapes[i % 3]}", f"one {colors[i % 4]} {shapes[i % 3]} in the middle"]
        for i in range(num_images)
    ]
    image_embeds = torch.randn(num_images, scoring_clip.dim, generator=generator)
    captions = [f"a {colors[(i * 7) % 4]} {shapes[i % 3]}" for i in range(num_images)]
    captions[0] = references[0][0]  # identical to a reference: a tie for RefCompare
    return references, image_embeds, captions


def clip_metric(scoring_clip, references, **kwargs) -> ClipCaptionScores:
    groups = ["in-domain" if i % 3 else "out-domain" for i in range(len(references))]
    return ClipCaptionScores(
        scoring_clip, references, groups=groups, block_size=5, num_distractors=3, recall_ks=(1, 5), **kwargs
    )


def test_clip_caption_scores_by_hand(scoring_clip) -> None:
    references, image_embeds, captions = clip_batch(scoring_clip)
    metric = clip_metric(scoring_clip, references)
    metric.update(torch.arange(12), image_embeds, captions)
    scores = metric.compute()
    assert set(scores) == {
        "clip_score",
        "ref_clip_score",
        "ref_compare",
        "retrieval_p_at_1",
        "retrieval_p_at_1_random",
        "recall_at_1",
        "recall_at_5",
        *(
            f"{name}/{group}"
            for name in ("clip_score", "ref_clip_score", "ref_compare")
            for group in ("in-domain", "out-domain")
        ),
    }

    # The same numbers from the pure functions on embeddings computed here.
    prompted = [f"A photo depicts {c}" for c in captions]
    flat_references = [f"A photo depicts {r}" for refs in references for r in refs]
    texts = scoring_clip.encode_text(prompted)
    reference_embeds = scoring_clip.encode_text(flat_references)
    owner = torch.arange(12).repeat_interleave(2)
    expected_clip = clip_score(image_embeds, texts)
    expected_ref = ref_clip_score(expected_clip, max_reference_similarity(texts, reference_embeds, owner))
    expected_compare = ref_compare(image_embeds, texts, reference_embeds, owner)
    assert scores["clip_score"] == pytest.approx(float(expected_clip.mean()), rel=1e-5)
    assert scores["ref_clip_score"] == pytest.approx(float(expected_ref.mean()), rel=1e-5)
    assert scores["ref_compare"] == pytest.approx(float(expected_compare.mean()), abs=1e-6)
    out_domain = torch.tensor([0, 3, 6, 9])
    assert scores["clip_score/out-domain"] == pytest.approx(float(expected_clip[out_domain].mean()), rel=1e-5)
    assert scores["retrieval_p_at_1"] == pytest.approx(retrieval_p_at_1_blocks(texts, image_embeds, 5)[0])
    assert scores["recall_at_5"] == pytest.approx(retrieval_recall_at_k(texts, image_embeds, (5,))[5])

    per_image = metric.per_image()
    assert sorted(per_image) == list(range(12))
    # Caption 0 equals a reference: that reference ties and is not "lower"; at most the other one is.
    assert per_image[0]["ref_compare"] in (0.0, 0.5)
    assert per_image[0]["clip_score"] == pytest.approx(float(expected_clip[0]), rel=1e-5)


def test_clip_caption_scores_deduplicate_and_ignore_order(scoring_clip) -> None:
    references, image_embeds, captions = clip_batch(scoring_clip)
    whole = clip_metric(scoring_clip, references)
    whole.update(torch.arange(12), image_embeds, captions)
    expected = whole.compute()

    padded = clip_metric(scoring_clip, references)
    padded.update(torch.arange(12), image_embeds, captions)
    padded.update(torch.tensor([0, 1]), image_embeds[:2].flip(0), ["padding", "padding"])  # sampler repeats
    assert padded.compute() == expected

    # Reversed halves encode in other batches, which moves the last float bits only.
    halves = clip_metric(scoring_clip, references)
    halves.update(torch.arange(6, 12), image_embeds[6:], captions[6:])
    halves.update(torch.arange(6), image_embeds[:6], captions[:6])
    halves.update(torch.tensor([11]), image_embeds[:1], ["padding"])
    assert halves.compute() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    halves_per_image, whole_per_image = halves.per_image(), whole.per_image()
    assert sorted(halves_per_image) == list(range(12))
    for index, values in whole_per_image.items():
        assert halves_per_image[index] == pytest.approx(values, rel=1e-5, abs=1e-6)


def test_clip_caption_scores_identical_under_bf16_autocast(scoring_clip) -> None:
    references, image_embeds, captions = clip_batch(scoring_clip)
    plain = clip_metric(scoring_clip, references)
    plain.update(torch.arange(12), image_embeds, captions)
    autocast = clip_metric(scoring_clip, references)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast.update(torch.arange(12), image_embeds.bfloat16().float(), captions)
        autocast_scores = autocast.compute()
    plain_bf16_inputs = clip_metric(scoring_clip, references)
    plain_bf16_inputs.update(torch.arange(12), image_embeds.bfloat16().float(), captions)
    assert autocast_scores == plain_bf16_inputs.compute()
    assert autocast.per_image() == plain_bf16_inputs.per_image()
    assert plain.compute()["clip_score"] == pytest.approx(autocast_scores["clip_score"], rel=1e-2)


def test_clip_caption_scores_omit_retrieval_with_too_few_images(
    scoring_clip, caplog: pytest.LogCaptureFixture
) -> None:
    references, image_embeds, captions = clip_batch(scoring_clip)
    metric = ClipCaptionScores(scoring_clip, references)  # blocks of 100, 99 distractors
    metric.update(torch.arange(12), image_embeds, captions)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            scores = metric.compute()
            metric._computed = None  # recompute rather than return the cached value
    assert "retrieval_p_at_1" not in scores and "retrieval_p_at_1_random" not in scores
    assert {"recall_at_1", "recall_at_5", "recall_at_10"} <= set(scores)
    messages = [r.getMessage() for r in caplog.records if "omitted" in r.getMessage()]
    assert len(messages) == 2
    assert "fewer than one block of 100" in messages[0]
    with pytest.raises(ValueError, match="no reference captions, e.g. indices \\[1\\]"):
        ClipCaptionScores(scoring_clip, [["a"], []])
    with pytest.raises(ValueError, match="unknown dataset index 12"):
        metric.update(torch.tensor([12]), image_embeds[:1], ["a"])
    with pytest.raises(ValueError, match="image_embeds must be"):
        metric.update(torch.tensor([1]), image_embeds[:1, :4], ["a"])
