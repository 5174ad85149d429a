"""The demo model's world: a scene grammar, the renderer that draws it, and the checker that reads it back.

A scene is a background colour and one or two flat-coloured shapes. Its prompt says what is drawn
("a small red circle on the left and a blue square on a yellow background"); a part the prompt
leaves out is drawn at random. The demo model (celery_bridge/demo_model.py) is trained on these
scenes, and `check` scores what any model drew against a prompt, by reading the pixels: the
background's and the object's dominant colours, the object's position and size, and its shape by
comparison with the renderer's own templates. Numpy and Pillow only; no torch.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (245, 220, 30),
    "purple": (140, 50, 180), "orange": (250, 140, 20), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS: Dict[str, Tuple[float, float]] = {  # the object's centre, as fractions of the side (x, y)
    "left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "centre": (0.5, 0.5),
}
SIZES: Dict[str, float] = {"small": 0.34, "large": 0.48}  # the extent, as a fraction of the side: small is
# as small as the 8x VAE keeps corners of (3 latent cells); large two on opposite sides just do not touch
PAIRS = (("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top"))  # two objects: opposite sides
_POSITION_WORDS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                   "centre": "in the centre"}
EXAMPLE_PROMPTS = (
    "a large red circle in the centre on a white background",
    "a small blue triangle on the left on a yellow background",
    "a green square at the top and an orange cross at the bottom on a black background",
)


@dataclass(frozen=True)
class Thing:
    """One shape of a scene; None where the prompt leaves that part out (the renderer chooses)."""

    colour: Optional[str] = None
    shape: Optional[str] = None
    position: Optional[str] = None
    size: Optional[str] = None

    def words(self) -> str:
        noun = " ".join(w for w in (self.size, self.colour, self.shape or "shape") if w)
        place = f" {_POSITION_WORDS[self.position]}" if self.position else ""
        return f"{_article(noun)} {noun}{place}"


@dataclass(frozen=True)
class Scene:
    """A background and one or two things: what a prompt asks for, or (all parts set) what was drawn."""

    things: Tuple[Thing, ...]
    background: Optional[str] = None

    def prompt(self) -> str:
        text = " and ".join(thing.words() for thing in self.things)
        return f"{text} on {_article(self.background)} {self.background} background" if self.background else text


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ---------------------------------------------------------------- the grammar

_THING = re.compile(
    r"an? (?:(?P<size>small|large) )?(?:(?P<colour>%s) )?(?P<shape>%s|shape)"
    r"(?: (?P<position>on the left|on the right|at the top|at the bottom|in the centre))?$"
    % ("|".join(COLOURS), "|".join(SHAPES)))


def parse(prompt: str) -> Optional[Scene]:
    """The scene a prompt of the grammar asks for, or None if the prompt is not of the grammar."""
    text = " ".join(prompt.lower().replace(",", " ").split())
    background = None
    match = re.search(r" on an? (%s) background$" % "|".join(COLOURS), text)
    if match:
        background, text = match.group(1), text[:match.start()]
    things = []
    for part in text.split(" and "):
        found = _THING.match(part.strip())
        if not found:
            return None
        place = found.group("position")
        position = next((p for p, words in _POSITION_WORDS.items() if words == place), None)
        shape = found.group("shape")
        things.append(Thing(found.group("colour"), None if shape == "shape" else shape, position,
                            found.group("size")))
    if not 1 <= len(things) <= 2:
        return None
    return Scene(tuple(things), background)


def held_out(colour: str, shape: str, position: str, background: str) -> bool:
    """Whether a single object's combination is kept out of training (for the evaluation): 1 in 6."""
    digest = hashlib.sha256(f"{colour}|{shape}|{position}|{background}".encode()).digest()
    return digest[0] % 6 == 0


def complete(asked: Scene, rng: random.Random) -> Scene:
    """`asked` with every part it leaves out drawn at random (colours all distinct)."""
    things: List[Thing] = []
    if len(asked.things) == 2:
        pair = [t.position for t in asked.things]
        options = [p for p in PAIRS if all(a in (None, b) for a, b in zip(pair, p))] or list(PAIRS)
        positions = rng.choice(options)
    else:
        positions = (asked.things[0].position or rng.choice(list(POSITIONS)),)
    taken = {asked.background} | {t.colour for t in asked.things}
    for thing, position in zip(asked.things, positions):
        colour = thing.colour or rng.choice([c for c in COLOURS if c not in taken])
        taken.add(colour)
        things.append(Thing(colour, thing.shape or rng.choice(SHAPES), position,
                            thing.size or rng.choice(list(SIZES))))
    background = asked.background or rng.choice([c for c in COLOURS if c not in taken])
    return Scene(tuple(things), background)


def training_scene(rng: random.Random) -> Scene:
    """A fully drawn scene for training: one object (3 in 4) or two; never a held-out combination."""
    while True:
        drawn = complete(Scene(tuple(Thing() for _ in range(2 if rng.random() < 0.25 else 1))), rng)
        t = drawn.things[0]
        if len(drawn.things) == 2 or not held_out(t.colour, t.shape, t.position, drawn.background):
            return drawn


def training_prompt(drawn: Scene, rng: random.Random, omit: float = 0.15) -> str:
    """A prompt that `drawn` satisfies: each part of it left out with probability `omit`."""
    things = tuple(Thing(*(None if rng.random() < omit else getattr(t, part)
                           for part in ("colour", "shape", "position", "size"))) for t in drawn.things)
    return Scene(things, None if rng.random() < omit else drawn.background).prompt()


def evaluation_scenes(count: int, seed: int = 0) -> List[Scene]:
    """Fully specified single-object scenes from the held-out combinations (never trained on)."""
    combos = [(c, s, p, b) for c in COLOURS for s in SHAPES for p in POSITIONS for b in COLOURS
              if b != c and held_out(c, s, p, b)]
    rng = random.Random(seed)
    rng.shuffle(combos)
    return [Scene((Thing(c, s, p, rng.choice(list(SIZES))),), b) for c, s, p, b in
            (combos * (count // len(combos) + 1))[:count]]


# ---------------------------------------------------------------- the renderer

def draw(scene: Scene, side: int = 64, rng: Optional[random.Random] = None) -> Image.Image:
    """The scene drawn at `side` x `side` (every part must be set); `rng` jitters places and sizes."""
    jitter = (lambda spread: rng.uniform(-spread, spread)) if rng else (lambda spread: 0.0)
    scale = 4  # drawn 4x larger, then reduced: smooth edges, as a photograph's
    big = side * scale
    image = Image.new("RGB", (big, big), COLOURS[scene.background])
    pen = ImageDraw.Draw(image)
    for thing in scene.things:
        x, y = POSITIONS[thing.position]
        extent = SIZES[thing.size] * (1 + jitter(0.08))
        box = ((x + jitter(0.03)) * big, (y + jitter(0.03)) * big, extent * big)
        _draw_shape(pen, thing.shape, box, COLOURS[thing.colour])
    return image.resize((side, side), Image.LANCZOS)


def _draw_shape(pen: ImageDraw.ImageDraw, shape: str, box: Tuple[float, float, float], fill) -> None:
    cx, cy, extent = box
    half = extent / 2
    left, top, right, bottom = cx - half, cy - half, cx + half, cy + half
    if shape == "circle":
        pen.ellipse((left, top, right, bottom), fill=fill)
    elif shape == "square":
        pen.rectangle((left, top, right, bottom), fill=fill)
    elif shape == "triangle":
        pen.polygon(((cx, top), (right, bottom), (left, bottom)), fill=fill)
    elif shape == "cross":
        arm = extent / 6
        pen.rectangle((cx - arm, top, cx + arm, bottom), fill=fill)
        pen.rectangle((left, cy - arm, right, cy + arm), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}: one of {', '.join(SHAPES)}")


def _templates(side: int = 32) -> Dict[str, np.ndarray]:
    out = {}
    for shape in SHAPES:
        image = Image.new("L", (side * 4, side * 4), 0)
        _draw_shape(ImageDraw.Draw(image), shape, (side * 2, side * 2, side * 4 - 1), 255)
        out[shape] = np.asarray(image.resize((side, side), Image.BILINEAR)) > 127
    return out


_TEMPLATES = _templates()


# ---------------------------------------------------------------- the checker

@dataclass(frozen=True)
class Reading:
    """What the checker reads in an image: the background, and the largest object's parts."""

    background: str
    colour: Optional[str]
    shape: Optional[str]
    position: Optional[str]
    size: Optional[str]


_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
_CLEAR = 60.0  # RGB distance within which a pixel counts as showing a palette colour
_NAMES = list(COLOURS)


def read(image: Image.Image) -> Reading:
    """The background colour (the commonest along the border) and the object: the commonest other
    palette colour among pixels near a palette colour (soft edges, which blend two colours, do not
    vote), the region of pixels nearer that colour than the background's, where its centre is, how
    big it is and which of the renderer's templates it fits best."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    side = pixels.shape[0]
    distances = ((pixels[:, :, None, :] - _PALETTE) ** 2).sum(-1)
    labels = np.argmin(distances, axis=-1)
    clear = distances.min(axis=-1) < _CLEAR ** 2
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    background = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    votes = labels[clear & (labels != background)]
    if votes.size < (side * side) * 0.003:
        return Reading(_NAMES[background], None, None, None, None)
    colour = int(np.bincount(votes, minlength=len(_NAMES)).argmax())
    mask = _largest_region(distances[:, :, colour] < distances[:, :, background])
    ys, xs = np.nonzero(mask)
    centre = ((xs.min() + xs.max() + 1) / 2 / side, (ys.min() + ys.max() + 1) / 2 / side)
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - centre[0]) ** 2 + (POSITIONS[p][1] - centre[1]) ** 2)
    extent = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / side
    size = "small" if extent < (SIZES["small"] + SIZES["large"]) / 2 else "large"
    crop = Image.fromarray((mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1] * 255).astype(np.uint8))
    fitted = np.asarray(crop.resize((32, 32), Image.BILINEAR)) > 127
    shape = max(SHAPES, key=lambda s: (fitted & _TEMPLATES[s]).sum() / max(1, (fitted | _TEMPLATES[s]).sum()))
    return Reading(_NAMES[background], _NAMES[colour], shape, position, size)


def _largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of `mask` (stray pixels of the object's colour elsewhere dropped)."""
    seen = np.zeros_like(mask)
    best: List[Tuple[int, int]] = []
    height, width = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        region, stack = [], [(y0, x0)]
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            region.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask)
    ys, xs = zip(*best)
    out[list(ys), list(xs)] = True
    return out


def score(scenes: Sequence[Scene], images: Sequence[Image.Image]) -> Dict[str, float]:
    """Accuracies (fractions of 1) of `images` against the single-object `scenes` they were asked for."""
    hits = {"colour": 0, "background": 0, "position": 0, "shape": 0, "size": 0}
    for scene, image in zip(scenes, images):
        reading, asked = read(image), scene.things[0]
        hits["colour"] += reading.colour == asked.colour
        hits["background"] += reading.background == scene.background
        hits["position"] += reading.position == asked.position
        hits["shape"] += reading.shape == asked.shape
        hits["size"] += reading.size == asked.size
    return {name: round(count / max(1, len(scenes)), 4) for name, count in hits.items()}


def full(scene: Scene) -> bool:
    """Whether every part of the scene is set (so it can be drawn)."""
    return scene.background is not None and all(None not in (t.colour, t.shape, t.position, t.size)
                                                for t in scene.things)


__all__ = ["COLOURS", "SHAPES", "POSITIONS", "SIZES", "EXAMPLE_PROMPTS", "Thing", "Scene", "Reading", "parse",
           "complete", "training_scene", "training_prompt", "evaluation_scenes", "held_out", "draw", "read", "score", "full"]


def verdict(prompt: str, image: Image.Image) -> Tuple[bool, str]:
    """Whether `image` shows what `prompt` asks of its first object and background, and the checker's words."""
    asked = parse(prompt)
    if asked is None:
        return False, "the prompt is not of the demo model's grammar (see celery_bridge/demo_world.py)"
    seen = read(image)
    thing = asked.things[0]
    checks = [(part, getattr(thing, part), getattr(seen, part)) for part in ("colour", "shape", "position", "size")]
    checks.append(("background", asked.background, seen.background))
    wrong = [f"{part} {got} (asked {want})" for part, want, got in checks if want is not None and want != got]
    described = Scene((Thing(seen.colour, seen.shape, seen.position, seen.size),), seen.background).prompt()
    return not wrong, f"the checker reads: {described}" + (f"; wrong: {', '.join(wrong)}" if wrong else
                                                           "; it matches the prompt")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m celery_bridge.demo_world PROMPT IMAGE`: what the checker reads in IMAGE against PROMPT."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m celery_bridge.demo_world PROMPT IMAGE", file=sys.stderr)
        return 2
    matches, words = verdict(args[0], Image.open(args[1]))
    print(words)
    return 0 if matches else 1


if __name__ == "__main__":
    raise SystemExit(main())
