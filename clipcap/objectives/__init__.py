"""Training objectives: strategy objects passed to ``CaptionModule``, chosen in YAML by ``class_path``."""

from clipcap.objectives.base import Objective, ObjectiveOutput
from clipcap.objectives.cross_entropy import CrossEntropy
from clipcap.objectives.discritune import DiscriTune
from clipcap.objectives.gumbel_clip import GumbelClip
from clipcap.objectives.rewards import (
    Baseline,
    CumulativeMeanBaseline,
    LeaveOneOutBaseline,
    MovingAverageBaseline,
    SelfCriticalBaseline,
)

__all__ = [
    "Baseline",
    "CrossEntropy",
    "CumulativeMeanBaseline",
    "DiscriTune",
    "GumbelClip",
    "LeaveOneOutBaseline",
    "MovingAverageBaseline",
    "Objective",
    "ObjectiveOutput",
    "SelfCriticalBaseline",
]
