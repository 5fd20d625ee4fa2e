"""Gumbel-CLIP (Jin 2023): captions made differentiable with Gumbel-softmax, scored by CLIP's cosine.

Each step rolls out a caption per image with Gumbel-softmax samples over the LM's vocabulary
(:func:`clipcap.gumbel.gumbel_rollout`), reads it with CLIP's text encoder through the vocabulary bridge
(:class:`clipcap.clip.bridge.SoftClipText`) and minimises ``−cos(v, t)``: v the image's CLIP embedding (the
batch's cached features), t the caption's. Gradients flow through the straight-through samples into the
LM (when trained) and the mapper.

It trains a ``ClipCaptioner`` only: a BLIP captioner (:mod:`clipcap.blip`) is refused at setup and at
the first step, see :data:`NOT_FOR_BLIP`.

Legend for shapes: B images, D CLIP embedding size, L rollout steps, V the LM's vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from clipcap.captioner import Captioner, ClipCaptioner
from clipcap.clip.encoder import ClipEncoder
from clipcap.clip.soft_text import SoftClipText
from clipcap.data.batch import CaptionBatch
from clipcap.frozen import keep_unregistered
from clipcap.gumbel import GumbelRollout, SoftCaption, gumbel_rollout
from clipcap.objectives.base import Objective, ObjectiveOutput, TrainingData
from clipcap.objectives.cross_entropy import CrossEntropy
from clipcap.objectives.reference import reference_lm, start_token_id
from clipcap.objectives.rewards import full_precision
from clipcap.pretrained import checkpoint_model_type

NOT_FOR_BLIP = (
    "GumbelClip trains a ClipCaptioner only: a BLIP captioner would need three pieces that do not exist "
    "here: the images' CLIP embeddings (a BLIP batch carries BLIP's own vision features), a Gumbel rollout "
    "through BLIP's decoder (gumbel_rollout feeds soft embeddings after a mapper prefix to a causal LM, "
    "while BLIP's decoder starts from [DEC] and cross-attends to the image) and a bridge from BERT's "
    "WordPiece vocabulary to CLIP's BPE (the bridge reads byte-level and SentencePiece vocabularies). "
    "Train BLIP with CrossEntropy or DiscriTune (docs/blip.md)"
)
"""Why ``GumbelClip`` refuses a BLIP captioner."""


class GumbelClip(Objective):
    """Self-supervised captioning by CLIP relevance: loss ``−cos(v, t)`` on Gumbel-softmax rollouts.

    Args:
        rollout: the Gumbel-softmax rollout (20 steps, temperature 1, straight-through hard samples, stop
            at EOS; ``checkpoint_steps: true`` trades one more LM forward for the activations of L steps).
        final_temperature: anneal the temperature from ``rollout.temperature`` to this value,
            geometrically over ``anneal_steps`` training steps, then hold it (None: constant).
        anneal_steps: the length of that anneal, in optimizer steps.
        anchor_weight: λ of a cross-entropy anchor on labelled pairs served beside each batch
            (``data.init_args.anchor_batch_size`` with ``labelled_images``), which keeps the text fluent
            when labels are few: training loss ``−cos + λ·CE`` (0 is off); validation reports ``−cos``.
        kl_coefficient: β of a KL term to the frozen, un-prefixed LM along the rollout, ``KL(π_t ‖ p_LM,t)``
            averaged over the steps taken (caption tokens and the stop): another fluency anchor (0 is off).
        clip_model: the CLIP that reads the captions; the data's ``clip_model`` when None. It must be the
            CLIP of the cached features, since the image side of the cosine is the batch's features.
    """

    needs_captions = False

    def __init__(
        self,
        rollout: GumbelRollout | None = None,
        final_temperature: float | None = None,
        anneal_steps: int = 0,
        anchor_weight: float = 0.0,
        kl_coefficient: float = 0.0,
        clip_model: str | None = None,
    ) -> None:
        super().__init__()
        self.rollout = rollout or GumbelRollout()
        if final_temperature is not None and not final_temperature > 0:
            raise ValueError(f"GumbelClip: final_temperature must be > 0, got {final_temperature}")
        if anneal_steps < 0 or (final_temperature is not None and anneal_steps == 0):
            raise ValueError(
                f"GumbelClip: anneal_steps must be ≥ 1 when final_temperature is set (got {anneal_steps})"
            )
        if anchor_weight < 0 or kl_coefficient < 0:
            raise ValueError(
                f"GumbelClip: anchor_weight and kl_coefficient must be ≥ 0, got {anchor_weight}, "
                f"{kl_coefficient}"
            )
        self.final_temperature = final_temperature
        self.anneal_steps = anneal_steps
        self.anchor_weight = anchor_weight
        self.kl_coefficient = kl_coefficient
        self.clip_model = clip_model
        self.anchor = CrossEntropy()
        # Training steps taken, saved in checkpoints so that a resumed anneal continues where it was.
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        keep_unregistered(self, "_clip", None)  # CLIP and its soft text path: frozen, outside the module tree
        keep_unregistered(self, "_text", None)

    @property
    def temperature(self) -> float:
        """The temperature of the next training step."""
        start = self.rollout.temperature
        if self.final_temperature is None:
            return start
        progress = min(int(self.steps) / self.anneal_steps, 1.0)
        return start * math.exp(progress * math.log(self.final_temperature / start))

    # CLIP and the bridge are frozen and large: kept out of the module tree like DiscriTune's receiver.
    def setup(self, data: TrainingData) -> None:
        data_clip = data.clip_model
        if data_clip is not None and checkpoint_model_type(data_clip) not in (None, "clip"):
            raise ValueError(f"{NOT_FOR_BLIP}; the data's features come from {data_clip!r}")
        if self.clip_model is not None and data_clip is not None and self.clip_model != data_clip:
            raise ValueError(
                f"GumbelClip: clip_model={self.clip_model!r} differs from the features' CLIP {data_clip!r}; "
                "the cosine compares the caption with the batch's image features, so both must be one CLIP"
            )
        name = self.clip_model or data_clip
        if name is None and self._clip is None:
            raise ValueError(
                "GumbelClip needs the CLIP of the cached features: set data.init_args.clip_model or "
                "model.objective.init_args.clip_model"
            )
        if self._clip is None:
            self.set_clip(ClipEncoder(name))

    def set_clip(self, encoder) -> None:
        """Uses ``encoder`` (a ``ClipEncoder``) to read captions, e.g. one already loaded."""
        keep_unregistered(self, "_clip", encoder)
        keep_unregistered(self, "_text", None)

    def text_path(self, captioner: ClipCaptioner):
        """The soft CLIP text path for the captioner's LM tokenizer (built on first use, then cached)."""
        text = self._text
        if text is None:
            clip = self._clip
            if clip is None:
                raise RuntimeError("GumbelClip has no CLIP yet: it is loaded in setup() (see clip_model)")

            text = SoftClipText.from_lm_tokenizer(clip, captioner.tokenizer)
            keep_unregistered(self, "_text", text)
        if text.table.device != captioner.device:
            text.to(captioner.device)
        return text

    def forward(self, captioner: Captioner, batch: CaptionBatch) -> ObjectiveOutput:
        if not isinstance(captioner, ClipCaptioner):
            raise TypeError(f"{NOT_FOR_BLIP}; got a {type(captioner).__name__}")
        images = batch.clip_features
        if images.dim() != 2:
            raise ValueError(
                "GumbelClip compares captions with pooled CLIP features (B, D); with grid features the "
                "image embedding is not in the batch"
            )
        text = self.text_path(captioner)
        if images.shape[-1] != text.clip.dim:
            raise ValueError(
                f"GumbelClip: the batch's features have size {images.shape[-1]} but the CLIP reading the "
                f"captions embeds in {text.clip.dim}: they must come from the same CLIP"
            )
        temperature = self.temperature
        caption = gumbel_rollout(captioner, images, self.rollout, temperature=temperature)
        # CLIP's text tower runs under the step's autocast (on the gradient path); the cosine in float32.
        text_embeds = text.encode(caption.weights, caption.token_ids, caption.lengths)
        with full_precision(images.device):
            cosine = F.cosine_similarity(text_embeds.float(), images.float(), dim=-1)
        loss = -cosine.mean()
        terms = {
            "cosine": cosine.detach().mean(),
            "temperature": torch.tensor(temperature),
            "caption_tokens": caption.lengths.float().mean(),
        }
        # The anchor is a training term: validation batches carry no labelled pairs beside them.
        if self.anchor_weight > 0 and self.training:
            if batch.anchor is None:
                raise ValueError(
                    "GumbelClip: anchor_weight > 0 needs labelled pairs beside each batch: set "
                    "data.init_args.unlabelled=true, data.init_args.labelled_images=N and "
                    "data.init_args.anchor_batch_size=K"
                )
            anchor = self.anchor(captioner, batch.anchor).loss
            loss = loss + self.anchor_weight * anchor
            terms["anchor_ce"] = anchor.detach()
        if self.kl_coefficient > 0:
            kl = self._kl_to_reference(captioner, caption)
            loss = loss + self.kl_coefficient * kl
            terms["kl"] = kl.detach()

        if not torch.isfinite(loss):
            return ObjectiveOutput(
                loss=images.new_zeros(()), terms={}, skip=True, skip_reason="GumbelClip: non-finite loss"
            )
        if self.training:
            self.steps += 1
        return ObjectiveOutput(loss=loss, terms=terms)

    def _kl_to_reference(self, captioner: ClipCaptioner, caption: SoftCaption) -> torch.Tensor:
        """Mean over the steps taken of ``KL(π_t ‖ p_LM,t)``, p_LM the frozen LM fed a start token and the
        same sample vectors instead of the image prefix; differentiable through π and the samples."""
        reference = reference_lm(self, captioner)
        batch, steps, _ = caption.weights.shape
        matrix = reference.model.get_input_embeddings().weight
        start = reference.embed(torch.full((batch, 1), start_token_id(reference), device=matrix.device))
        fed = caption.weights[:, :-1].to(matrix.dtype) @ matrix  # what step t saw after the prefix
        embeds = torch.cat([start, fed], dim=1)
        reference_logits = reference(embeds.to(reference.dtype)).float()
        log_pi = caption.logits.float().log_softmax(-1)
        kl = (log_pi.exp() * (log_pi - reference_logits.log_softmax(-1))).sum(-1)  # (B, L)
        positions = torch.arange(steps, device=kl.device)
        taken = (positions[None, :] <= caption.lengths[:, None]).float()  # caption tokens and the stop
        return (kl * taken).sum() / taken.sum()
