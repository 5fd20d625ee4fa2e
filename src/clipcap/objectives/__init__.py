"""Training objectives: strategy objects passed to ``CaptionModule``, chosen in YAML by ``class_path``."""

from clipcap.objectives.base import Objective, ObjectiveOutput
from clipcap.objectives.cross_entropy import CrossEntropy

__all__ = ["CrossEntropy", "Objective", "ObjectiveOutput"]
