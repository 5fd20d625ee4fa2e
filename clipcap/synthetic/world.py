"""Building and locating the synthetic world: images, captions, a tiny CLIP, a tiny LM and CLIP features.

The world is the embedded default in which the demo, the tests and the benchmarks run with no downloads.
It mirrors the real setting: a CLIP trained contrastively on images and their full descriptions plays
the pretrained CLIP, and a small GPT-2 pretrained on the captions' language plays the pretrained LM. Both
are saved in Hugging Face format, so they load through exactly the code paths real checkpoints use.

Layout of a world folder (readers depend on it)::

    <world>/world.json                 spec, version, metrics and timings; written last (completion marker)
    <world>/annotations.json           {"images": [{"image_id", "split", "file_name", "description",
                                                    "captions"}]}
    <world>/images/<split>/<image_id>.png
    <world>/clip/                      CLIPModel + preprocessor_config.json + CLIP tokenizer
    <world>/lm/                        GPT2LMHeadModel + its byte-level BPE tokenizer
    <world>/features/<split>/          FeatureCache of the world CLIP's image features

A world is built in a temporary sibling folder and renamed into place when complete, so an interrupted
build never leaves a half world under the final name; concurrent builders serialise on a lock file.

Usage::

    clipcap world [--dir DIR] [--tiny] [--force]     (clipcap.commands.world)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CLIPConfig, CLIPModel, GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
from transformers.utils import logging as transformers_logging

from clipcap.clip import ClipEncoder, ClipImagePreprocessor, load_clip_tokenizer
from clipcap.data.records import ImageEntry
from clipcap.features.extract import extract_entries, write_summary
from clipcap.files import replace_folder
from clipcap.synthetic.location import (  # noqa: F401 - the locating names are also this module's
    WORLD_DIR_NAME,
    WORLD_FILE,
    WORLD_VERSION,
    default_world_dir,
    is_complete_world,
    read_world_info,
)
from clipcap.synthetic.scenes import Scene, describe_scene, generate_captions, generate_scene, render_scene

if TYPE_CHECKING:
    from transformers import CLIPConfig, CLIPModel, GPT2TokenizerFast

    from clipcap.clip import ClipTokenizer

logger = logging.getLogger(__name__)


ANNOTATIONS_FILE = "annotations.json"
IMAGES_DIR = "images"
CLIP_DIR = "clip"
LM_DIR = "lm"
FEATURES_DIR = "features"
SPLITS: tuple[str, ...] = ("train", "val", "test")
DATASET_NAME = "synthetic"
"""The ``dataset`` recorded in the world's feature caches."""
LM_EOS_TOKEN = "<|endoftext|>"
RETRIEVAL_BLOCK = 100
"""Images per block when the world's CLIP is scored on text→image retrieval (the DiscriTune protocol)."""


@dataclass
class WorldSpec:
    """Everything that determines a synthetic world; saved in ``world.json``.

    Use :meth:`default` (the demo's world) or :meth:`tiny` (tests).
    """

    version: int = WORLD_VERSION
    """Format version of the world; a world of another version is rebuilt."""
    num_train: int = 4000
    """Training images."""
    num_val: int = 250
    """Validation images."""
    num_test: int = 250
    """Test images."""
    image_size: int = 64
    """Side of the rendered images in pixels."""
    seed: int = 0
    """Base seed of scenes, captions and model training."""

    clip_image_size: int = 64
    """Input size of the CLIP vision encoder (the preprocessor resizes images to it)."""
    clip_patch_size: int = 16
    """ViT patch size."""
    clip_width: int = 96
    """Hidden size of both CLIP towers."""
    clip_vision_layers: int = 3
    """Vision transformer layers."""
    clip_text_layers: int = 2
    """Text transformer layers."""
    clip_heads: int = 4
    """Attention heads in both towers."""
    clip_projection_dim: int = 96
    """Size of the joint embedding space (the image feature size the captioner sees)."""
    clip_steps: int = 400
    """Contrastive training steps."""
    clip_batch_size: int = 128
    """Image-text pairs per step (the in-batch negatives of InfoNCE)."""
    clip_lr: float = 1e-3
    """Peak AdamW learning rate (linear warm-up, cosine decay)."""
    clip_description_prob: float = 0.5
    """Chance that a training pair uses the full description rather than one of the reference captions."""

    lm_vocab_size: int = 768
    """Target size of the LM's byte-level BPE vocabulary (it stops early when no pair is left to merge)."""
    lm_layers: int = 3
    """GPT-2 layers."""
    lm_width: int = 128
    """GPT-2 hidden size."""
    lm_heads: int = 4
    """GPT-2 attention heads."""
    lm_positions: int = 128
    """GPT-2 context length."""
    lm_steps: int = 300
    """LM pretraining steps."""
    lm_batch_size: int = 32
    """Sequences per LM step."""
    lm_block_size: int = 64
    """Tokens per LM training sequence (captions are packed, each followed by ``<|endoftext|>``)."""
    lm_lr: float = 2e-3
    """Peak AdamW learning rate of the LM."""

    feature_batch_size: int = 256
    """Images per forward pass when extracting features."""
    num_threads: int | None = None
    """Torch CPU threads during the build; None keeps torch's setting (all physical cores by default)."""

    @classmethod
    def default(cls) -> WorldSpec:
        """The demo's world: a few thousand images; builds in about three minutes on two CPU cores."""
        return cls()

    @classmethod
    def tiny(cls) -> WorldSpec:
        """A world for tests: a hundred images and a few training steps; builds in seconds."""
        return cls(
            num_train=64,
            num_val=16,
            num_test=16,
            clip_vision_layers=1,
            clip_text_layers=1,
            clip_width=64,
            clip_projection_dim=64,
            clip_steps=8,
            clip_batch_size=32,
            lm_vocab_size=384,
            lm_layers=1,
            lm_width=64,
            lm_steps=20,
            lm_batch_size=16,
            feature_batch_size=64,
        )

    def split_sizes(self) -> dict[str, int]:
        """Number of images of each split."""
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}

    def split_seed(self, split: str) -> str:
        """The seed of a split's scenes and captions (splits draw from independent streams)."""
        return f"{self.seed}:{split}"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> WorldSpec:
        """Builds a spec from :func:`dataclasses.asdict` output, ignoring unknown keys."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})


@dataclass(frozen=True)
class SceneRecord:
    """One image of the world as ``annotations.json`` lists it.

    Attributes:
        image_id: unique id such as ``train_000001``.
        split: ``train``, ``val`` or ``test``.
        file_name: image path relative to the world folder.
        description: the precise description (every object and the background).
        captions: the human-like reference captions.
    """

    image_id: str
    split: str
    file_name: str
    description: str
    captions: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """The record as written in ``annotations.json``."""
        return {
            "image_id": self.image_id,
            "split": self.split,
            "file_name": self.file_name,
            "description": self.description,
            "captions": list(self.captions),
        }


# ---------------------------------------------------------------------------------------------- locating


def ensure_world(world_dir: str | os.PathLike[str] | None = None) -> Path:
    """Returns the world folder, building the default world there first if it is absent.

    A complete world (any spec, e.g. a tiny test world) is reused as it is. Concurrent callers, such as
    the ranks of a DDP job, wait for the first one's build instead of repeating it.

    Args:
        world_dir: the folder; :func:`default_world_dir` if None.
    """
    world_dir = Path(world_dir) if world_dir is not None else default_world_dir()
    if is_complete_world(world_dir):
        return world_dir
    with _build_lock(world_dir) as exclusive:
        if is_complete_world(world_dir):  # another process built it while we waited for the lock
            return world_dir
        if exclusive:
            _remove_leftovers(world_dir)
        # A warning, not info: it must be visible without logging configured, since the user waits.
        logger.warning(
            "No complete synthetic world (version %d) at %s; building it now (a few minutes on a CPU, done once)",
            WORLD_VERSION,
            world_dir,
        )
        _build_and_install(world_dir, WorldSpec.default(), replace=False)
    return world_dir


def build_world(world_dir: str | os.PathLike[str], spec: WorldSpec, force: bool = False) -> Path:
    """Builds a world with ``spec`` at ``world_dir`` unless a complete one is already there.

    Completeness is checked after taking the build lock, so concurrent first uses build once: the others
    wait (saying so) and then find the world complete.

    Args:
        world_dir: the final folder; it appears only once the build is complete.
        spec: what to build.
        force: build even over a complete world (which is replaced only once the new one is complete).

    Returns:
        ``world_dir``.
    """
    world_dir = Path(world_dir)
    with _build_lock(world_dir) as exclusive:
        if not force and is_complete_world(world_dir):
            logger.info("a complete world is already at %s (use --force to rebuild)", world_dir)
            return world_dir
        if exclusive:
            _remove_leftovers(world_dir)
        _build_and_install(world_dir, spec, replace=True)
    return world_dir


def load_annotations(world_dir: str | os.PathLike[str], split: str | None = None) -> list[SceneRecord]:
    """Reads the image records of a world, in file order.

    Args:
        world_dir: the world folder.
        split: keep only this split; all splits if None.
    """
    data = json.loads((Path(world_dir) / ANNOTATIONS_FILE).read_text(encoding="utf-8"))
    records = [
        SceneRecord(
            image_id=item["image_id"],
            split=item["split"],
            file_name=item["file_name"],
            description=item["description"],
            captions=tuple(item["captions"]),
        )
        for item in data["images"]
    ]
    return [record for record in records if split is None or record.split == split]


@contextlib.contextmanager
def _build_lock(world_dir: Path) -> Iterator[bool]:
    """Holds an exclusive lock on ``.<name>.lock`` beside ``world_dir`` where ``fcntl`` exists.

    Yields:
        Whether the lock is really exclusive (False where the platform has no ``fcntl``).
    """
    world_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: builders may race; the rename in _install still keeps worlds whole
        yield False
        return
    lock = world_dir.parent / f".{world_dir.name}.lock"
    with open(lock, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # A warning, not info: it must be visible without logging configured, since the user waits.
            logger.warning(
                "waiting for another process to finish building the synthetic world at %s", world_dir
            )
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(world_dir: Path) -> None:
    """Deletes staging and retired folders of earlier builds that were killed before cleaning up.

    Only called under the exclusive build lock: any such folder then belongs to a build that is dead.
    """
    for pattern in (f".{world_dir.name}.tmp-*", f".{world_dir.name}.old-*"):
        for leftover in world_dir.parent.glob(pattern):
            logger.info("removing %s, left by an interrupted build", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def _build_and_install(world_dir: Path, spec: WorldSpec, replace: bool) -> None:
    """Builds into a unique temporary sibling, then renames it to ``world_dir``.

    Args:
        world_dir: the final folder.
        spec: what to build.
        replace: replace a complete world already at ``world_dir``; if False, keep it and drop ours.
    """
    staging = world_dir.parent / f".{world_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _build_into(staging, spec, final_dir=world_dir)
        _install(staging, world_dir, replace=replace)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _install(staging: Path, world_dir: Path, replace: bool) -> None:
    """Renames the complete ``staging`` folder to ``world_dir``."""
    try:
        os.rename(staging, world_dir)
        return
    except OSError:
        if not world_dir.exists():
            raise
    if not replace and is_complete_world(world_dir):
        logger.info("another process finished %s first; using that world", world_dir)
        return
    replace_folder(staging, world_dir)


# ---------------------------------------------------------------------------------------------- building


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Silences transformers' per-file progress bars (saving, loading) during a build, then restores them."""
    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def _build_into(folder: Path, spec: WorldSpec, final_dir: Path) -> None:
    """Builds every part of a world into ``folder``, writing ``world.json`` last.

    Args:
        folder: the (staging) folder to fill.
        spec: what to build.
        final_dir: where the world will live; recorded in the feature caches as the CLIP's location.
    """
    if spec.version != WORLD_VERSION:
        raise ValueError(f"this clipcap builds worlds of version {WORLD_VERSION}, not {spec.version}")
    previous_threads = torch.get_num_threads()
    if spec.num_threads is not None:
        torch.set_num_threads(spec.num_threads)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    try:
        with _quiet_progress_bars():
            folder.mkdir(parents=True, exist_ok=True)
            clock = time.perf_counter()
            records = write_scenes(folder, spec)
            timings["scenes_s"] = time.perf_counter() - clock
            logger.info("rendered %d images in %.1f s", len(records), timings["scenes_s"])

            clock = time.perf_counter()
            clip_metrics = train_clip(folder / CLIP_DIR, folder, records, spec)
            timings["clip_s"] = time.perf_counter() - clock

            clock = time.perf_counter()
            lm_metrics = train_lm(folder / LM_DIR, records, spec)
            timings["lm_s"] = time.perf_counter() - clock

            clock = time.perf_counter()
            write_features(folder, records, spec, clip_name=str(final_dir / CLIP_DIR))
            timings["features_s"] = time.perf_counter() - clock
            timings["total_s"] = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous_threads)

    info = {
        "version": WORLD_VERSION,
        "complete": True,
        "dataset": DATASET_NAME,
        "spec": dataclasses.asdict(spec),
        "splits": spec.split_sizes(),
        "metrics": {**clip_metrics, **lm_metrics},
        "timings": {key: round(value, 2) for key, value in timings.items()},
        "torch_threads": spec.num_threads or previous_threads,
    }
    # Written last: its presence is what marks the world complete.
    (folder / WORLD_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    logger.info(
        "synthetic world built in %.0f s (scenes %.0f, CLIP %.0f, LM %.0f, features %.0f)",
        timings["total_s"],
        timings["scenes_s"],
        timings["clip_s"],
        timings["lm_s"],
        timings["features_s"],
    )


def iter_scenes(spec: WorldSpec) -> Iterator[tuple[SceneRecord, Scene]]:
    """Every image of a world as its record and scene, all splits, in file order (nothing is rendered)."""
    for split, count in spec.split_sizes().items():
        seed = spec.split_seed(split)
        for index in range(count):
            scene = generate_scene(seed, index)
            image_id = f"{split}_{index + 1:06d}"
            record = SceneRecord(
                image_id=image_id,
                split=split,
                file_name=f"{IMAGES_DIR}/{split}/{image_id}.png",
                description=describe_scene(scene),
                captions=tuple(generate_captions(scene, seed, index)),
            )
            yield record, scene


def write_scenes(folder: Path, spec: WorldSpec) -> list[SceneRecord]:
    """Renders every image into ``folder/images/<split>/`` and writes ``folder/annotations.json``.

    Returns:
        The records, in file order.
    """
    records = []
    for split in SPLITS:
        (folder / IMAGES_DIR / split).mkdir(parents=True, exist_ok=True)
    for record, scene in iter_scenes(spec):
        render_scene(scene, spec.image_size).save(folder / record.file_name)
        records.append(record)
    annotations = {"dataset": DATASET_NAME, "images": [record.to_json() for record in records]}
    (folder / ANNOTATIONS_FILE).write_text(json.dumps(annotations, indent=1) + "\n", encoding="utf-8")
    return records


def _cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def _clip_config(spec: WorldSpec, tokenizer: ClipTokenizer) -> CLIPConfig:
    """The tiny CLIP's config: openai's 49408-token text vocabulary, small towers."""
    text_config = {
        "vocab_size": tokenizer.vocab_size,
        "hidden_size": spec.clip_width,
        "intermediate_size": 4 * spec.clip_width,
        "num_hidden_layers": spec.clip_text_layers,
        "num_attention_heads": spec.clip_heads,
        "max_position_embeddings": 77,
        # transformers pools at the first occurrence of eos_token_id (unless it is the legacy 2, when it
        # takes the argmax id); CLIP's EOT makes native get_text_features pool where clipcap does.
        "eos_token_id": tokenizer.eot_token_id,
        "bos_token_id": tokenizer.sot_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "image_size": spec.clip_image_size,
        "patch_size": spec.clip_patch_size,
        "hidden_size": spec.clip_width,
        "intermediate_size": 4 * spec.clip_width,
        "num_hidden_layers": spec.clip_vision_layers,
        "num_attention_heads": spec.clip_heads,
    }
    return CLIPConfig(
        text_config=text_config, vision_config=vision_config, projection_dim=spec.clip_projection_dim
    )


def _encode_texts(
    model: CLIPModel, token_rows: Sequence[Sequence[int]], pad_id: int, chunks: int = 2
) -> torch.Tensor:
    """Text embeddings pooled at EOT, in length-sorted chunks so that short captions are not padded to
    the longest description (the text tower's cost is proportional to padded tokens).

    Args:
        model: a ``CLIPModel``.
        token_rows: B token lists, each ``[SOT, ..., EOT]``.
        pad_id: id written after EOT.
        chunks: how many length groups to encode separately.

    Returns:
        (B, D) projected, unnormalised text embeddings in the order of ``token_rows``.
    """
    order = sorted(range(len(token_rows)), key=lambda row: len(token_rows[row]))
    size = math.ceil(len(order) / chunks)
    embeddings: list[torch.Tensor] = []
    for start in range(0, len(order), size):
        group = [token_rows[row] for row in order[start : start + size]]
        length = max(len(row) for row in group)
        input_ids = torch.full((len(group), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(group), length), dtype=torch.long)
        for index, row in enumerate(group):
            input_ids[index, : len(row)] = torch.tensor(row)
            attention_mask[index, : len(row)] = 1
        hidden = model.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        eot_positions = attention_mask.sum(dim=1) - 1
        pooled = hidden[torch.arange(len(group)), eot_positions]
        embeddings.append(model.text_projection(pooled))
    stacked = torch.cat(embeddings)
    return stacked[torch.argsort(torch.tensor(order))]


def _tokenize_rows(tokenizer: ClipTokenizer, texts: Sequence[str]) -> list[list[int]]:
    """``[SOT, ..., EOT]`` token lists of ``texts`` (truncated to CLIP's 77-token context)."""
    batch = tokenizer(list(texts), context_length=77, truncate=True)
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    return [row[:length] for row, length in zip(batch["input_ids"].tolist(), lengths, strict=True)]


@torch.no_grad()
def text_to_image_recall(
    image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, block: int = RETRIEVAL_BLOCK
) -> float:
    """Text→image recall@1 within consecutive blocks of images (the last partial block is dropped,
    unless there is only one).

    Args:
        image_embeddings: (N, D) image embeddings.
        text_embeddings: (N, D) embeddings of one text per image, row-aligned.
        block: images per block.

    Returns:
        The fraction of texts whose own image scores highest in their block.
    """
    count = image_embeddings.shape[0]
    block = min(block, count)
    images = F.normalize(image_embeddings.float(), dim=-1)
    texts = F.normalize(text_embeddings.float(), dim=-1)
    hits, total = 0, 0
    for start in range(0, count - block + 1, block):
        scores = texts[start : start + block] @ images[start : start + block].T
        hits += int((scores.argmax(dim=1) == torch.arange(block)).sum())
        total += block
    return hits / max(1, total)


def train_clip(
    clip_dir: Path, world_folder: Path, records: Sequence[SceneRecord], spec: WorldSpec
) -> dict[str, float]:
    """Trains the tiny CLIP contrastively on train images and their texts, evaluates and saves it.

    Each training pair is an image with its full description (probability ``clip_description_prob``) or
    one of its reference captions; the loss is the symmetric InfoNCE over the batch. Pixels come from the
    same :class:`~clipcap.clip.ClipImagePreprocessor` that feature extraction uses.

    Args:
        clip_dir: where to save the model, preprocessor config and tokenizer.
        world_folder: the folder holding the images.
        records: every image record (the train split trains, the test split evaluates).
        spec: sizes and training settings.

    Returns:
        ``clip_loss`` (mean of the last steps), ``clip_description_r1`` and ``clip_caption_r1``
        (text→image recall@1 within blocks of 100 test images, from descriptions and from the reference
        captions).
    """
    tokenizer = load_clip_tokenizer()
    preprocess = ClipImagePreprocessor(
        image_size=spec.clip_image_size, resize_shortest_edge=spec.clip_image_size
    )
    train = [record for record in records if record.split == "train"]
    test = [record for record in records if record.split == "test"]

    def load_pixels(subset: Sequence[SceneRecord]) -> torch.Tensor:
        pixels = []
        for start in range(0, len(subset), 256):
            images = []
            for record in subset[start : start + 256]:
                with Image.open(world_folder / record.file_name) as image:
                    images.append(image.convert("RGB"))
            pixels.append(preprocess(images))
        return torch.cat(pixels)

    train_pixels = load_pixels(train)
    description_tokens = _tokenize_rows(tokenizer, [record.description for record in train])
    caption_tokens = [_tokenize_rows(tokenizer, record.captions) for record in train]

    torch.manual_seed(spec.seed)
    model = CLIPModel(_clip_config(spec, tokenizer))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.clip_lr, weight_decay=0.1)
    batch_generator = torch.Generator().manual_seed(spec.seed)
    text_rng = random.Random(f"clipcap-world-clip:{spec.seed}")
    batch_size = min(spec.clip_batch_size, len(train))
    warmup = max(1, spec.clip_steps // 10)
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(spec.clip_steps):
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, spec.clip_steps, spec.clip_lr, warmup)
        rows = torch.randperm(len(train), generator=batch_generator)[:batch_size]
        texts = [
            description_tokens[row]
            if text_rng.random() < spec.clip_description_prob
            else text_rng.choice(caption_tokens[row])
            for row in rows.tolist()
        ]
        image_embeddings = F.normalize(
            model.get_image_features(pixel_values=train_pixels[rows]).pooler_output, dim=-1
        )
        text_embeddings = F.normalize(_encode_texts(model, texts, tokenizer.pad_token_id), dim=-1)
        logits = model.logit_scale.exp() * text_embeddings @ image_embeddings.T
        targets = torch.arange(len(rows))
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # CLIP's clamp: a temperature above 100 destabilises training
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == spec.clip_steps:
            logger.info(
                "CLIP step %d/%d loss %.3f (%.0f s)",
                step + 1,
                spec.clip_steps,
                sum(losses[-50:]) / len(losses[-50:]),
                time.perf_counter() - started,
            )

    model.eval()
    with torch.no_grad():
        test_images = model.get_image_features(pixel_values=load_pixels(test)).pooler_output
        descriptions = _encode_texts(
            model, _tokenize_rows(tokenizer, [r.description for r in test]), tokenizer.pad_token_id
        )
        description_r1 = text_to_image_recall(test_images, descriptions)
        caption_r1s = []
        for caption_index in range(min(len(record.captions) for record in test)):
            captions = _tokenize_rows(tokenizer, [record.captions[caption_index] for record in test])
            caption_r1s.append(
                text_to_image_recall(test_images, _encode_texts(model, captions, tokenizer.pad_token_id))
            )
    block = min(RETRIEVAL_BLOCK, len(test))
    metrics = {
        "clip_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
        "clip_description_r1": description_r1,
        "clip_caption_r1": sum(caption_r1s) / max(1, len(caption_r1s)),
        "clip_retrieval_block": block,
        "clip_logit_scale": model.logit_scale.exp().item(),
    }
    logger.info(
        "CLIP text→image R@1 among %d test images: %.1f%% from descriptions, %.1f%% from reference captions "
        "(chance %.1f%%)",
        block,
        100 * description_r1,
        100 * metrics["clip_caption_r1"],
        100 / block,
    )

    clip_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(clip_dir)
    preprocess.save_pretrained(clip_dir)
    tokenizer.save_pretrained(clip_dir)
    return metrics


def _lm_texts(records: Sequence[SceneRecord], split: str) -> list[str]:
    texts = []
    for record in records:
        if record.split == split:
            texts.extend(record.captions)
            texts.append(record.description)
    return texts


def train_lm_tokenizer(texts: Sequence[str], vocab_size: int, model_max_length: int) -> GPT2TokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer trained on ``texts``.

    Like GPT-2's: no prefix space is added (a leading word has no ``Ġ``), ``<|endoftext|>`` is bos, eos and
    unk, and there is no pad token.

    Returns:
        A ``GPT2TokenizerFast``.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[LM_EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer)
    return GPT2TokenizerFast(
        tokenizer_object=backend,
        bos_token=LM_EOS_TOKEN,
        eos_token=LM_EOS_TOKEN,
        unk_token=LM_EOS_TOKEN,
        add_prefix_space=False,
        model_max_length=model_max_length,
    )


def _packed_stream(tokenizer: GPT2TokenizerFast, texts: Sequence[str], rng: random.Random) -> torch.Tensor:
    """Shuffled ``text<|endoftext|>`` token ids, concatenated as GPT-2 was trained."""
    shuffled = list(texts)
    rng.shuffle(shuffled)
    encoded = tokenizer(shuffled)["input_ids"]
    stream: list[int] = []
    for ids in encoded:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    return torch.tensor(stream, dtype=torch.long)


def train_lm(lm_dir: Path, records: Sequence[SceneRecord], spec: WorldSpec) -> dict[str, float]:
    """Trains the LM's tokenizer and pretrains a small GPT-2 on the world's language, then saves both.

    The LM learns train captions and descriptions as plain text, never the images, as pretrained GPT-2
    knows English but not COCO's pictures.

    Args:
        lm_dir: where to save the model and tokenizer.
        records: every image record (train texts train, val texts evaluate).
        spec: sizes and training settings.

    Returns:
        ``lm_loss`` (mean training loss of the last steps), ``lm_val_loss`` (per token on the val texts)
        and ``lm_vocab_size``.
    """
    train_texts = _lm_texts(records, "train")
    tokenizer = train_lm_tokenizer(train_texts, spec.lm_vocab_size, spec.lm_positions)
    rng = random.Random(f"clipcap-world-lm:{spec.seed}")
    train_stream = _packed_stream(tokenizer, train_texts, rng)
    val_stream = _packed_stream(tokenizer, _lm_texts(records, "val"), rng)
    block = min(spec.lm_block_size, spec.lm_positions, len(train_stream) - 1)

    torch.manual_seed(spec.seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=spec.lm_positions,
        n_embd=spec.lm_width,
        n_layer=spec.lm_layers,
        n_head=spec.lm_heads,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lm_lr, weight_decay=0.01)
    batch_generator = torch.Generator().manual_seed(spec.seed)
    warmup = max(1, spec.lm_steps // 10)
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(spec.lm_steps):
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, spec.lm_steps, spec.lm_lr, warmup)
        starts = torch.randint(0, len(train_stream) - block, (spec.lm_batch_size,), generator=batch_generator)
        input_ids = torch.stack([train_stream[start : start + block] for start in starts.tolist()])
        loss = model(input_ids=input_ids, labels=input_ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == spec.lm_steps:
            logger.info(
                "LM step %d/%d loss %.3f (%.0f s)",
                step + 1,
                spec.lm_steps,
                sum(losses[-100:]) / len(losses[-100:]),
                time.perf_counter() - started,
            )

    model.eval()
    with torch.no_grad():
        usable = (len(val_stream) // block) * block
        val_blocks = val_stream[:usable].view(-1, block)
        val_losses = [
            model(input_ids=chunk, labels=chunk).loss.item() * chunk.shape[0]
            for chunk in val_blocks.split(64)
        ]
        val_loss = sum(val_losses) / max(1, val_blocks.shape[0])
    metrics = {
        "lm_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
        "lm_val_loss": val_loss,
        "lm_vocab_size": len(tokenizer),
    }
    logger.info(
        "LM: %d-token vocabulary, train loss %.3f, val loss %.3f per token",
        len(tokenizer),
        metrics["lm_loss"],
        val_loss,
    )
    lm_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(lm_dir)
    tokenizer.save_pretrained(lm_dir)
    return metrics


def write_features(folder: Path, records: Sequence[SceneRecord], spec: WorldSpec, clip_name: str) -> None:
    """Extracts the world CLIP's image features of every split into ``folder/features/<split>``.

    This is the code path of ``clipcap features`` (``extract_entries`` on :class:`ImageEntry` records, then
    ``summary.json``), and the CLIP is loaded back from ``folder/clip``, so the saved checkpoint is what
    the features come from.

    Args:
        folder: the world folder being built.
        records: every image record.
        spec: the world's spec (batch size).
        clip_name: the name recorded in the caches (the CLIP's final location; only informational).
    """
    clip_dir = folder / CLIP_DIR
    encoder = ClipEncoder.from_model(
        CLIPModel.from_pretrained(clip_dir), ClipImagePreprocessor.from_pretrained(clip_dir), name=clip_name
    )
    reports = []
    for split in SPLITS:
        entries = [
            ImageEntry(record.image_id, str(folder / record.file_name), record.captions, split)
            for record in records
            if record.split == split
        ]
        reports.append(
            extract_entries(
                encoder,
                entries,
                folder / FEATURES_DIR / split,
                dataset=DATASET_NAME,
                split=split,
                batch_size=spec.feature_batch_size,
                progress=False,
            )
        )
        if reports[-1].skipped:
            raise RuntimeError(f"the world's own images failed to load: {reports[-1].skipped[:3]}")
    write_summary(folder / FEATURES_DIR, reports, dropped_empty_captions={split: 0 for split in SPLITS})
