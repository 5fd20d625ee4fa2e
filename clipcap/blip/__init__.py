"""BLIP behind the captioner interface: its frozen vision encoder is cached like CLIP features, and its
text decoder is trained by the same objectives (see docs/blip.md).

``model.captioner.class_path: clipcap.blip.BlipCaptioner`` selects it in YAML.
"""

from clipcap.blip.captioner import BlipCaptioner, BlipTextDecoder
from clipcap.blip.encoder import BlipImageEncoder
from clipcap.blip.preprocess import BlipImagePreprocessor

__all__ = ["BlipCaptioner", "BlipImageEncoder", "BlipImagePreprocessor", "BlipTextDecoder"]
