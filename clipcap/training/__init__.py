"""The Lightning layer: it wires the plain-PyTorch core into a trainer and imports Lightning."""

from clipcap.training.callbacks import CaptionWriter, ProgressBar, RichProgress, SampleCaptions
from clipcap.training.data import (
    CaptionDataModule,
    CocoCaptions,
    CocoKarpathy,
    Concadia,
    ConceptualCaptions,
    Flickr30k,
    NoCaps,
    SyntheticCaptions,
)
from clipcap.training.evaluation import CaptionEvaluation
from clipcap.training.module import CaptionModule
from clipcap.training.schedules import WarmupLinearDecay

__all__ = [
    "CaptionDataModule",
    "CaptionEvaluation",
    "CaptionModule",
    "CaptionWriter",
    "CocoCaptions",
    "CocoKarpathy",
    "Concadia",
    "ConceptualCaptions",
    "Flickr30k",
    "NoCaps",
    "ProgressBar",
    "RichProgress",
    "SampleCaptions",
    "SyntheticCaptions",
    "WarmupLinearDecay",
]
