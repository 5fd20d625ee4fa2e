"""Deterministic scenes of simple shapes: sampling, rendering, a precise description and human-like captions.

A scene is one to three shapes, each in its own cell of a 3×3 grid (so they never overlap), on a plain
background. Every scene has one exact ``description`` (every object with its size, colour, kind and
position, and the background) and several reference captions written the way people write them: a few
precise, most vague or naming only the most salient object (the largest; ties go to the object sampled
first). Objects are stored in salience order, so ``scene.objects[0]`` is always the salient one.

Everything is driven by explicitly seeded ``random.Random`` instances whose seeds are strings (hashed with
SHA-512 by ``random``), so scenes, images and captions are identical across runs, machines and
``PYTHONHASHSEED`` values.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
"""Shape kinds; chosen to stay distinct at 64×64 and after a bicubic resize."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 190),
    "orange": (250, 130, 10),
    "pink": (250, 130, 200),
}
"""Object colours (name → RGB); all differ from every background."""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
"""Background colours (name → RGB)."""

SIZES: dict[str, float] = {"large": 0.44, "small": 0.25}
"""Shape radius as a fraction of a grid cell's side."""

POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "at the top left",
    (0, 1): "at the top",
    (0, 2): "at the top right",
    (1, 0): "on the left",
    (1, 1): "in the centre",
    (1, 2): "on the right",
    (2, 0): "at the bottom left",
    (2, 1): "at the bottom",
    (2, 2): "at the bottom right",
}
"""Position phrases of the 3×3 grid cells, keyed by (row, column)."""

KIND_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round shape"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "cross": ("cross", "plus sign"),
}
"""Words the captions use for each kind (the first is the one the description uses)."""

SIZE_SYNONYMS: dict[str, tuple[str, ...]] = {"large": ("large", "big"), "small": ("small", "little")}
"""Words the captions use for each size."""

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")
MAX_OBJECTS = 3
CAPTIONS_PER_IMAGE = 5
_SUPERSAMPLE = 4  # draw at 4× then downsample: anti-aliased edges without any extra dependency


@dataclass(frozen=True)
class SceneObject:
    """One shape of a scene.

    Attributes:
        kind: one of ``KINDS``.
        colour: a key of ``COLOURS``.
        size: ``"large"`` or ``"small"``.
        row: grid row, 0 (top) to 2 (bottom).
        col: grid column, 0 (left) to 2 (right).
        offset_x: horizontal jitter of the centre, as a fraction of a cell.
        offset_y: vertical jitter of the centre, as a fraction of a cell.
        scale: size jitter, multiplies the radius.
        rotation: rotation in degrees (small, so that kinds stay upright and recognisable).
    """

    kind: str
    colour: str
    size: str
    row: int
    col: int
    offset_x: float = 0.0
    offset_y: float = 0.0
    scale: float = 1.0
    rotation: float = 0.0

    @property
    def position(self) -> str:
        """The position phrase, e.g. ``"at the top left"``."""
        return POSITIONS[(self.row, self.col)]

    def phrase(self, with_size: bool = True, with_position: bool = False) -> str:
        """A noun phrase such as ``"a large red circle at the top left"``."""
        words = [self.size, self.colour, self.kind] if with_size else [self.colour, self.kind]
        text = f"{_article(words[0])} {' '.join(words)}"
        return f"{text} {self.position}" if with_position else text


@dataclass(frozen=True)
class Scene:
    """A background and one to three shapes in salience order (``objects[0]`` is the salient one)."""

    objects: tuple[SceneObject, ...]
    background: str

    @property
    def salient(self) -> SceneObject:
        """The most salient object: the largest, ties broken by sampling order."""
        return self.objects[0]


def scene_rng(seed: int | str, index: int, purpose: str) -> random.Random:
    """A generator seeded from ``(seed, index, purpose)``, reproducible on every machine.

    Args:
        seed: the split's base seed.
        index: the scene's index within the split.
        purpose: what the stream is for (``"scene"``, ``"captions"``), so streams are independent.
    """
    return random.Random(f"clipcap-synthetic:{seed}:{index}:{purpose}")


def sample_scene(rng: random.Random) -> Scene:
    """Samples a scene: 1–3 shapes in distinct grid cells on a background.

    Args:
        rng: the generator to draw from.
    """
    num_objects = rng.choices((1, 2, 3), weights=(0.3, 0.4, 0.3))[0]
    cells = rng.sample(sorted(POSITIONS), num_objects)
    objects = []
    for row, col in cells:
        objects.append(
            SceneObject(
                kind=rng.choice(KINDS),
                colour=rng.choice(sorted(COLOURS)),
                size=rng.choice(("large", "small")),
                row=row,
                col=col,
                offset_x=rng.uniform(-0.06, 0.06),
                offset_y=rng.uniform(-0.06, 0.06),
                scale=rng.uniform(0.92, 1.08),
                rotation=rng.uniform(-12.0, 12.0),
            )
        )
    # A stable sort keeps the sampling order among objects of the same size.
    objects.sort(key=lambda obj: obj.size != "large")
    return Scene(objects=tuple(objects), background=rng.choice(sorted(BACKGROUNDS)))


def generate_scene(seed: int | str, index: int) -> Scene:
    """The ``index``-th scene of the split seeded by ``seed``."""
    return sample_scene(scene_rng(seed, index, "scene"))


# ----------------------------------------------------------------------------------------------- rendering


def _rotate(
    points: list[tuple[float, float]], cx: float, cy: float, degrees: float
) -> list[tuple[float, float]]:
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * cos - (y - cy) * sin, cy + (x - cx) * sin + (y - cy) * cos) for x, y in points]


def _shape_polygon(kind: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    """Polygon vertices of a non-circular kind centred at (cx, cy); sized so that kinds look equally big."""
    if kind == "square":
        half = radius * 0.85
        return [
            (cx - half, cy - half),
            (cx + half, cy - half),
            (cx + half, cy + half),
            (cx - half, cy + half),
        ]
    if kind == "triangle":
        # Centroid-centred, pointing up.
        return [
            (cx + radius * math.cos(math.radians(angle)), cy - radius * math.sin(math.radians(angle)))
            for angle in (90.0, 210.0, 330.0)
        ]
    if kind == "star":
        points = []
        for k in range(10):
            r = radius if k % 2 == 0 else radius * 0.45
            angle = math.radians(90.0 + 36.0 * k)
            points.append((cx + r * math.cos(angle), cy - r * math.sin(angle)))
        return points
    if kind == "cross":
        arm, half = radius * 0.95, radius * 0.32
        return [
            (cx - half, cy - arm),
            (cx + half, cy - arm),
            (cx + half, cy - half),
            (cx + arm, cy - half),
            (cx + arm, cy + half),
            (cx + half, cy + half),
            (cx + half, cy + arm),
            (cx - half, cy + arm),
            (cx - half, cy + half),
            (cx - arm, cy + half),
            (cx - arm, cy - half),
            (cx - half, cy - half),
        ]
    raise ValueError(f"unknown shape kind {kind!r}; expected one of {KINDS}")


def render_scene(scene: Scene, image_size: int = 64) -> Image.Image:
    """Draws ``scene`` as an RGB image of ``image_size``×``image_size`` pixels.

    Args:
        scene: the scene to draw.
        image_size: side of the output image in pixels.
    """
    canvas_size = image_size * _SUPERSAMPLE
    canvas = Image.new("RGB", (canvas_size, canvas_size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(canvas)
    cell = canvas_size / 3.0
    for obj in scene.objects:
        cx = (obj.col + 0.5 + obj.offset_x) * cell
        cy = (obj.row + 0.5 + obj.offset_y) * cell
        radius = SIZES[obj.size] * obj.scale * cell
        fill = COLOURS[obj.colour]
        if obj.kind == "circle":
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        else:
            polygon = _rotate(_shape_polygon(obj.kind, cx, cy, radius), cx, cy, obj.rotation)
            draw.polygon(polygon, fill=fill)
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


# ------------------------------------------------------------------------------------------------ language


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _with_article(phrase: str) -> str:
    return f"{_article(phrase)} {phrase}"


def _plural(noun: str) -> str:
    return f"{noun}es" if noun.endswith(("x", "s")) else f"{noun}s"


def _join(phrases: Sequence[str]) -> str:
    """``["a", "b", "c"]`` → ``"a, b and c"``."""
    if len(phrases) == 1:
        return phrases[0]
    return f"{', '.join(phrases[:-1])} and {phrases[-1]}"


def describe_scene(scene: Scene) -> str:
    """The precise description: every object with size, colour, kind and position, then the background.

    Example: ``"a large red circle at the top left and a small blue square in the centre, on a grey
    background."``
    """
    objects = _join([obj.phrase(with_size=True, with_position=True) for obj in scene.objects])
    return f"{objects}, on a {scene.background} background."


def _kind_word(rng: random.Random, kind: str) -> str:
    # The plain word most of the time: references share a small vocabulary, as real ones mostly do.
    return kind if rng.random() < 0.75 else rng.choice(KIND_SYNONYMS[kind])


def _size_word(rng: random.Random, size: str) -> str:
    return size if rng.random() < 0.6 else rng.choice(SIZE_SYNONYMS[size])


def _object_words(rng: random.Random, obj: SceneObject, size: bool, colour: bool) -> str:
    words = []
    if size:
        words.append(_size_word(rng, obj.size))
    if colour:
        words.append(obj.colour)
    words.append(_kind_word(rng, obj.kind))
    return " ".join(words)


def _shape_count(rng: random.Random, scene: Scene) -> str:
    count = len(scene.objects)
    if count == 1:
        return rng.choice(("a single shape", "one shape", "a shape"))
    noun = rng.choice(("shapes", "shapes", "objects"))
    return f"{NUMBER_WORDS[count]} {noun}"


# Precise references: every object, or the salient one with everything about it.
def _precise_all_positions(rng: random.Random, scene: Scene) -> str:
    parts = [f"{_with_article(_object_words(rng, obj, True, True))} {obj.position}" for obj in scene.objects]
    return f"{_join(parts)}."


def _precise_all_background(rng: random.Random, scene: Scene) -> str:
    parts = [_with_article(_object_words(rng, obj, True, True)) for obj in scene.objects]
    return f"{_join(parts)} on a {scene.background} background."


def _precise_salient(rng: random.Random, scene: Scene) -> str:
    obj = scene.salient
    text = f"{_with_article(_object_words(rng, obj, True, True))} {obj.position}"
    if rng.random() < 0.4:
        text += f" on a {scene.background} background"
    return f"{text}."


def _precise_there_is(rng: random.Random, scene: Scene) -> str:
    obj = scene.salient
    return f"there is {_with_article(_object_words(rng, obj, True, True))} {obj.position}."


# Vague references: the salient object only, counts, kinds, colours, exclamations.
def _vague_salient(rng: random.Random, scene: Scene) -> str:
    obj = scene.salient
    text = _with_article(_object_words(rng, obj, size=rng.random() < 0.3, colour=True))
    if rng.random() < 0.4:
        text += f" on a {scene.background} background"
    return f"{text}."


def _vague_two_salient(rng: random.Random, scene: Scene) -> str:
    first, *rest = scene.objects[:2]
    if rest and (rest[0].colour, rest[0].kind) == (first.colour, first.kind):
        # "a pink star and a pink star" is not how anyone writes it.
        return f"two {first.colour} {_plural(_kind_word(rng, first.kind))}."
    parts = [_with_article(_object_words(rng, obj, False, True)) for obj in scene.objects[:2]]
    return f"{_join(parts)}."


def _vague_count(rng: random.Random, scene: Scene) -> str:
    count = _shape_count(rng, scene)
    if rng.random() < 0.7:
        return f"{count} on a {scene.background} background."
    return f"{rng.choice(('a picture of', 'an image of', 'a drawing of'))} {count}."


def _vague_kinds(rng: random.Random, scene: Scene) -> str:
    kinds = list(dict.fromkeys(obj.kind for obj in scene.objects))[: rng.choice((1, 2))]
    lead = rng.choice(("a picture of", "an image of", "a drawing of", "a picture with", "an image with"))
    return f"{lead} {_join([_with_article(_kind_word(rng, kind)) for kind in kinds])}."


def _vague_colours(rng: random.Random, scene: Scene) -> str:
    colours = list(dict.fromkeys(obj.colour for obj in scene.objects))
    if len(scene.objects) == 1:
        return f"{_with_article(colours[0])} shape on a {scene.background} background."
    if len(colours) == 1:
        return f"{colours[0]} shapes on a {scene.background} background."
    return f"{_join(colours)} shapes."


def _vague_exclamation(rng: random.Random, scene: Scene) -> str:
    obj = scene.salient
    lead = rng.choice(("look, ", "wow, ", ""))
    words = _object_words(rng, obj, size=rng.random() < 0.5, colour=True)
    return f"{lead}{_with_article(words)}!"


def _vague_generic(rng: random.Random, scene: Scene) -> str:
    return rng.choice(
        (
            f"some shapes on a {scene.background} background.",
            "a simple drawing of shapes.",
            "a few coloured shapes.",
            f"a {scene.background} picture with shapes.",
        )
    )


CaptionTemplate = Callable[[random.Random, Scene], str]

PRECISE_TEMPLATES: dict[str, tuple[CaptionTemplate, float]] = {
    "all_positions": (_precise_all_positions, 1.0),
    "all_background": (_precise_all_background, 1.0),
    "salient": (_precise_salient, 1.5),
    "there_is": (_precise_there_is, 0.5),
}
"""Precise caption templates and their sampling weights."""

VAGUE_TEMPLATES: dict[str, tuple[CaptionTemplate, float]] = {
    "salient": (_vague_salient, 2.0),
    "two_salient": (_vague_two_salient, 0.8),
    "count": (_vague_count, 1.5),
    "kinds": (_vague_kinds, 1.5),
    "colours": (_vague_colours, 0.8),
    "exclamation": (_vague_exclamation, 0.8),
    "generic": (_vague_generic, 0.6),
}
"""Vague caption templates and their sampling weights."""


def _weighted_sample(
    rng: random.Random, table: dict[str, tuple[CaptionTemplate, float]], k: int
) -> list[str]:
    """``k`` distinct template names drawn without replacement, proportionally to their weights."""
    names = list(table)
    chosen: list[str] = []
    for _ in range(min(k, len(names))):
        remaining = [name for name in names if name not in chosen]
        chosen.append(rng.choices(remaining, weights=[table[name][1] for name in remaining])[0])
    return chosen


def caption_scene(scene: Scene, rng: random.Random, num_captions: int = CAPTIONS_PER_IMAGE) -> list[str]:
    """Reference captions as people write them: one or two precise, the rest vague.

    Captions are distinct, lower-case, and end with "." or (for exclamations) "!". Every caption that names
    a shape names the salient object (first, when it names several).

    Args:
        scene: the scene to caption.
        rng: the generator to draw from.
        num_captions: how many captions to return.
    """
    num_precise = rng.choice((1, 1, 2))
    names = [("precise", name) for name in _weighted_sample(rng, PRECISE_TEMPLATES, num_precise)]
    names += [("vague", name) for name in _weighted_sample(rng, VAGUE_TEMPLATES, len(VAGUE_TEMPLATES))]
    captions: list[str] = []
    for group, name in names:
        table = PRECISE_TEMPLATES if group == "precise" else VAGUE_TEMPLATES
        caption = table[name][0](rng, scene)
        if caption not in captions:
            captions.append(caption)
        if len(captions) == num_captions:
            break
    # Templates can coincide on tiny scenes; fall back on more vague draws, then on plain variants.
    attempts = 0
    while len(captions) < num_captions and attempts < 100:
        name = rng.choice(list(VAGUE_TEMPLATES))
        caption = VAGUE_TEMPLATES[name][0](rng, scene)
        if caption not in captions:
            captions.append(caption)
        attempts += 1
    rng.shuffle(captions)
    return captions


def generate_captions(scene: Scene, seed: int | str, index: int) -> list[str]:
    """The reference captions of the ``index``-th scene of the split seeded by ``seed``."""
    return caption_scene(scene, scene_rng(seed, index, "captions"))
