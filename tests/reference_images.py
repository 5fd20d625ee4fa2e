"""Images prepared for the Hugging Face reference processors, whatever the installed transformers.

clipcap composites transparency onto white before preprocessing (``clipcap.clip.preprocess``), as
transformers' ``convert_to_rgb`` does from 5.21; up to 5.20 it called ``image.convert("RGB")``, which drops
alpha. The references are therefore given images already composited here, so the comparison checks the
resize, crop and normalisation on every supported release; the compositing rule is written out below.
"""

from __future__ import annotations

from PIL import Image


def on_white(image: Image.Image) -> Image.Image:
    """``image`` in RGB, any transparency (an alpha band or a ``transparency`` entry) composited onto white."""
    if "A" not in image.getbands() and image.info.get("transparency") is None:
        return image.convert("RGB")
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")


def all_on_white(images: list[Image.Image]) -> list[Image.Image]:
    return [on_white(image) for image in images]
