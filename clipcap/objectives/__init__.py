"""Training objectives: strategy objects passed to ``CaptionModule``, chosen in YAML by ``class_path``.

The reward-based ones are one objective, :class:`PolicyGradient`, whose rewards and advantage estimator are
objects too; :class:`DiscriTune` and :class:`SCST` are its presets.
"""

from clipcap.objectives.advantages import (
    Advantage,
    Baseline,
    CumulativeMeanBaseline,
    GroupNormalisedAdvantage,
    LeaveOneOutBaseline,
    MovingAverageBaseline,
    SelfCriticalBaseline,
)
from clipcap.objectives.base import Objective, ObjectiveOutput
from clipcap.objectives.cross_entropy import CrossEntropy
from clipcap.objectives.discritune import DiscriTune
from clipcap.objectives.gumbel_clip import GumbelClip
from clipcap.objectives.policy_gradient import SCST, PolicyGradient
from clipcap.objectives.reward_functions import (
    CiderReward,
    ClipScoreReward,
    LengthReward,
    RetrievalReward,
    Reward,
)

__all__ = [
    "SCST",
    "Advantage",
    "Baseline",
    "CiderReward",
    "ClipScoreReward",
    "CrossEntropy",
    "CumulativeMeanBaseline",
    "DiscriTune",
    "GroupNormalisedAdvantage",
    "GumbelClip",
    "LeaveOneOutBaseline",
    "LengthReward",
    "MovingAverageBaseline",
    "Objective",
    "ObjectiveOutput",
    "PolicyGradient",
    "RetrievalReward",
    "Reward",
    "SelfCriticalBaseline",
]
