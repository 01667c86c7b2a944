"""The embedded procedural "shapes" dataset, its caption grammar and its checker.

Example `i` of a split is a pure function of `(split, i)`: one to three shapes
(circle, square, triangle) in distinct cells of a 3x3 grid, each with one of six
saturated colours and a size (small/large), anti-aliased on a black background.
Shapes are stored in reading order (by cell), so "the first shape" is the one
nearest the top left; the class label is `kind * NUM_COLORS + color` of it.

Captions come from a small grammar (round-tripped by `parse_caption`):

  caption := phrase | phrase " and " phrase | phrase ", " phrase " and " phrase
  phrase  := "a " ["small "] COLOR " " KIND " at the " POSITION

e.g. "a red circle at the top left and a small blue square at the center"
(no size word means large).

The analytic checker reads each grid cell of an image independently: the cell's
brightness (max over RGB, which on black equals a shape's coverage) is matched
against rendered templates of every (kind, size), sharp and blurred, and an
empty template; the colour is the majority vote of bright pixels' nearest
palette chromaticity.
It is robust to blur because both colour and template distances average over
the whole cell. `score_image` is all-or-nothing: 1.0 iff the set of occupied
cells equals the scene's positions and every shape has its colour and kind.
Size is scored only with `check_size=True` (the prompt-adherence metric asks
for "what, where, which colour"; size reads as reliably as kind, see tests).
"""
import functools
import re
from typing import Any, Mapping

import numpy as np

KINDS = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan")
PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0],
                    [255, 0, 255], [0, 255, 255]], np.uint8)
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
SIZES = ("small", "large")
MAX_SHAPES = 3
NUM_CLASSES = len(KINDS) * len(COLORS)
SCENE_KEYS = ("shape_kind", "color", "position", "size")

# Half the extent of a shape as a fraction of half a cell (small, large). Small
# shapes stay ~6 px wide at 32 px so kinds remain tellable apart.
_HALF_EXTENT = (0.55, 0.85)
_SPLIT_SEEDS = {"train": 0, "validation": 1}
_SALT = 0x5A4E  # Keeps these streams apart from other users of (split, i) seeds.
_SUPERSAMPLE = 4


def class_name(label: int) -> str:
  """Human-readable name of a class id, e.g. 'red circle'."""
  if not 0 <= int(label) < NUM_CLASSES:
    raise ValueError(f"Class label {label} out of range; valid: 0..{NUM_CLASSES - 1}.")
  kind, color = divmod(int(label), len(COLORS))
  return f"{COLORS[color]} {KINDS[kind]}"


# ---------------------------------------------------------------------------
# Scenes and captions.


def _empty_scene() -> dict[str, np.ndarray]:
  scene = {k: np.full((MAX_SHAPES,), -1, np.int32) for k in SCENE_KEYS}
  scene["num_shapes"] = np.int32(0)
  return scene


def sample_scene(split: str, index: int) -> dict[str, np.ndarray]:
  """The scene of example `index` of `split` (deterministic)."""
  if split not in _SPLIT_SEEDS:
    raise ValueError(f"Unknown shapes split {split!r}; valid: {sorted(_SPLIT_SEEDS)}.")
  rng = np.random.default_rng([_SALT, _SPLIT_SEEDS[split], int(index)])
  n = int(rng.integers(1, MAX_SHAPES + 1))
  scene = _empty_scene()
  scene["num_shapes"] = np.int32(n)
  scene["position"][:n] = np.sort(rng.choice(len(POSITIONS), n, replace=False))
  scene["shape_kind"][:n] = rng.integers(0, len(KINDS), n)
  scene["color"][:n] = rng.integers(0, len(COLORS), n)
  scene["size"][:n] = rng.integers(0, len(SIZES), n)
  return scene


def scene_label(scene: Mapping[str, Any]) -> np.int32:
  """Class id of a scene: kind and colour of its first (reading-order) shape."""
  return np.int32(int(scene["shape_kind"][0]) * len(COLORS) + int(scene["color"][0]))


def caption_from_scene(scene: Mapping[str, Any]) -> str:
  """Renders a scene as a caption of the grammar in the module docstring."""
  phrases = []
  for j in range(int(scene["num_shapes"])):
    small = "small " if int(scene["size"][j]) == 0 else ""
    phrases.append(f"a {small}{COLORS[int(scene['color'][j])]} "
                   f"{KINDS[int(scene['shape_kind'][j])]} at the "
                   f"{POSITIONS[int(scene['position'][j])]}")
  if len(phrases) == 1:
    return phrases[0]
  return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _alternation(words) -> str:
  # Longest first so "top left" wins over "top".
  return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_PHRASE = (rf"a (?:(small) )?({_alternation(COLORS)}) ({_alternation(KINDS)}) "
           rf"at the ({_alternation(POSITIONS)})")
_CAPTION_RE = re.compile(rf"{_PHRASE}(?:, {_PHRASE})?(?: and {_PHRASE})?")


def parse_caption(caption: str) -> dict[str, np.ndarray]:
  """Inverse of `caption_from_scene`; shapes are returned in reading order.

  Args:
    caption: text of the grammar (case and surrounding spaces are ignored).

  Returns:
    Scene dict: `shape_kind`, `color`, `position`, `size` int32 [3] padded with
    -1, and `num_shapes` int32 [].

  Raises:
    ValueError: if the text is outside the grammar or two shapes share a cell.
  """
  text = " ".join(caption.strip().lower().split())
  match = _CAPTION_RE.fullmatch(text)
  groups = match.groups() if match else ()
  shapes = [groups[i:i + 4] for i in range(0, len(groups), 4) if groups[i + 1]]
  # Grammar: one phrase, two joined by "and", or three as "A, B and C".
  if not match or (groups[5] and not groups[9]):
    raise ValueError(
        f"Caption {caption!r} is outside the shapes grammar; expected e.g. "
        "'a red circle at the top left and a small blue square at the center' "
        f"(colors {COLORS}, kinds {KINDS}, positions {POSITIONS}).")
  shapes.sort(key=lambda s: POSITIONS.index(s[3]))
  positions = [s[3] for s in shapes]
  if len(set(positions)) != len(positions):
    raise ValueError(f"Caption {caption!r} puts two shapes in one cell; at most one "
                     "shape per position is allowed.")
  scene = _empty_scene()
  scene["num_shapes"] = np.int32(len(shapes))
  for j, (small, color, kind, position) in enumerate(shapes):
    scene["size"][j] = 0 if small else 1
    scene["color"][j] = COLORS.index(color)
    scene["shape_kind"][j] = KINDS.index(kind)
    scene["position"][j] = POSITIONS.index(position)
  return scene


# ---------------------------------------------------------------------------
# Rendering.


def _cell_bounds(image_size: int, position: int) -> tuple[int, int, int, int]:
  """Pixel bounds (y0, y1, x0, x1) of a grid cell."""
  row, col = divmod(position, 3)
  edges = [round(image_size * k / 3) for k in range(4)]
  return edges[row], edges[row + 1], edges[col], edges[col + 1]


def _coverage(image_size: int, position: int, kind: int, size: int) -> np.ndarray:
  """Anti-aliased coverage in [0, 1] of one shape: float32 [S, S]."""
  row, col = divmod(position, 3)
  cell = image_size / 3
  cy, cx = (row + 0.5) * cell, (col + 0.5) * cell
  h = _HALF_EXTENT[size] * cell / 2
  # Sub-pixel sample centres, only inside the cell (shapes never leave it).
  y0, y1, x0, x1 = _cell_bounds(image_size, position)
  ss = _SUPERSAMPLE
  ys = y0 + (np.arange((y1 - y0) * ss) + 0.5) / ss
  xs = x0 + (np.arange((x1 - x0) * ss) + 0.5) / ss
  dy, dx = ys[:, None] - cy, xs[None, :] - cx
  if KINDS[kind] == "circle":
    inside = dy**2 + dx**2 <= h**2
  elif KINDS[kind] == "square":
    inside = (np.abs(dy) <= h) & (np.abs(dx) <= h)
  else:  # Upward triangle: apex (cy - h), base at cy + h, half-width h there.
    inside = (np.abs(dy) <= h) & (np.abs(dx) <= (dy + h) / 2)
  sub = inside.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))
  full = np.zeros((image_size, image_size), np.float32)
  full[y0:y1, x0:x1] = sub
  return full


def render_scene(scene: Mapping[str, Any], image_size: int) -> np.ndarray:
  """Draws a scene: uint8 [image_size, image_size, 3] on black."""
  image = np.zeros((image_size, image_size, 3), np.float32)
  for j in range(int(scene["num_shapes"])):
    cov = _coverage(image_size, int(scene["position"][j]),
                    int(scene["shape_kind"][j]), int(scene["size"][j]))
    image += cov[..., None] * PALETTE[int(scene["color"][j])].astype(np.float32)
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


class ShapesSource:
  """grain RandomAccessDataSource of procedurally generated shape scenes.

  Each element is a dict: `image` uint8 [S, S, 3], `label` int32 [],
  `caption` str, scene arrays `shape_kind`/`color`/`position`/`size` int32 [3]
  (padded with -1) and `num_shapes` int32 [].
  """

  def __init__(self, split: str, image_size: int, num_examples: int):
    if split not in _SPLIT_SEEDS:
      raise ValueError(f"Unknown shapes split {split!r}; valid: {sorted(_SPLIT_SEEDS)}.")
    if image_size < 12:
      raise ValueError(f"shapes image_size={image_size} is too small; use >= 12 px.")
    if num_examples <= 0:
      raise ValueError(f"shapes num_examples={num_examples} must be positive.")
    self.split, self.image_size, self.num_examples = split, int(image_size), int(num_examples)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"Index {index} out of range for {self!r}.")
    scene = sample_scene(self.split, index)
    return {"image": render_scene(scene, self.image_size),
            "label": scene_label(scene),
            "caption": caption_from_scene(scene),
            **scene}

  def __repr__(self) -> str:
    return (f"ShapesSource(split={self.split!r}, image_size={self.image_size}, "
            f"num_examples={self.num_examples})")


# ---------------------------------------------------------------------------
# The analytic checker.


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
  """Separable Gaussian blur of [..., H, W], zero outside."""
  if sigma <= 0:
    return x
  radius = int(np.ceil(3 * sigma))
  taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma**2))
  taps /= taps.sum()
  pad = [(0, 0)] * (x.ndim - 2)
  y = np.pad(x, pad + [(radius, radius), (0, 0)])
  y = sum(t * y[..., i:i + x.shape[-2], :] for i, t in enumerate(taps))
  y = np.pad(y, pad + [(0, 0), (radius, radius)])
  return sum(t * y[..., i:i + x.shape[-1]] for i, t in enumerate(taps))


# Template blur levels in pixels at 32 px (scaled with image size): matching
# against blurred templates too keeps kinds readable in soft reconstructions.
_TEMPLATE_BLURS = (0.0, 0.75, 1.5)


@functools.lru_cache(maxsize=8)
def _templates(image_size: int) -> tuple[np.ndarray, ...]:
  """Per cell: float32 [1 + kinds*sizes*blurs, h, w]; index 0 is empty.

  Index 1 + (kind * len(SIZES) + size) * len(_TEMPLATE_BLURS) + blur.
  """
  out = []
  for position in range(len(POSITIONS)):
    y0, y1, x0, x1 = _cell_bounds(image_size, position)
    temps = [np.zeros((y1 - y0, x1 - x0), np.float32)]
    for kind in range(len(KINDS)):
      for size in range(len(SIZES)):
        # Coverage is zero outside its cell, so blurring the crop is exact.
        cov = _coverage(image_size, position, kind, size)[y0:y1, x0:x1]
        for blur in _TEMPLATE_BLURS:
          temps.append(_gaussian_blur(cov, blur * image_size / 32))
    out.append(np.stack(temps).astype(np.float32))
  return tuple(out)


def _to_unit(images: np.ndarray) -> np.ndarray:
  images = np.asarray(images)
  if images.shape[-1] != 3 or images.ndim not in (3, 4) or images.shape[-2] != images.shape[-3]:
    raise ValueError(f"Expected square RGB images [n, S, S, 3] or [S, S, 3]; got {images.shape}.")
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 255.0
  return np.clip(images.astype(np.float32), 0.0, 1.0)


def analyze_cells(images: np.ndarray) -> dict[str, np.ndarray]:
  """Reads every grid cell of a batch of images.

  Args:
    images: [n, S, S, 3] uint8, or float in [0, 1].

  Returns:
    Dict of int32 [n, 9] arrays indexed by position: `occupied` (0/1), `color`,
    `shape_kind`, `size` (-1 where the cell is empty).
  """
  images = _to_unit(images)
  if images.ndim == 3:
    images = images[None]
  n, s = images.shape[0], images.shape[1]
  palette = PALETTE.astype(np.float32) / 255.0
  out = {k: np.full((n, len(POSITIONS)), -1, np.int32)
         for k in ("occupied", "color", "shape_kind", "size")}
  for position, temps in enumerate(_templates(s)):
    y0, y1, x0, x1 = _cell_bounds(s, position)
    patch = images[:, y0:y1, x0:x1]                       # [n, h, w, 3]
    bright = patch.max(axis=-1)                           # [n, h, w]
    # Mean squared distance to every template, expanded to avoid [n, T, h, w].
    dist = ((bright**2).sum(axis=(1, 2))[:, None]
            - 2 * np.einsum("nhw,thw->nt", bright, temps)
            + (temps**2).sum(axis=(1, 2))[None])                 # [n, T]
    best = dist.argmin(axis=1)
    occupied = best > 0
    kind, size = divmod(np.maximum(best - 1, 0) // len(_TEMPLATE_BLURS), len(SIZES))
    # Colour: vote of bright pixels by nearest palette chromaticity.
    chroma = patch / np.maximum(bright, 1e-3)[..., None]
    # argmin_c |chroma - p_c|^2 without materialising [n, h, w, colors, 3].
    nearest = ((palette**2).sum(-1) - 2 * chroma @ palette.T).argmin(-1)  # [n, h, w]
    weight = np.where(bright > 0.3, bright, 0.0)
    votes = np.stack([(weight * (nearest == c)).sum(axis=(1, 2))
                      for c in range(len(COLORS))], axis=-1)
    out["occupied"][:, position] = occupied
    out["color"][:, position] = np.where(occupied, votes.argmax(-1), -1)
    out["shape_kind"][:, position] = np.where(occupied, kind, -1)
    out["size"][:, position] = np.where(occupied, size, -1)
  return out


def _scene_batch(scenes: Mapping[str, Any], n: int) -> dict[str, np.ndarray]:
  batch = {k: np.asarray(scenes[k], np.int32).reshape(n, MAX_SHAPES) for k in SCENE_KEYS}
  batch["num_shapes"] = np.asarray(scenes["num_shapes"], np.int32).reshape(n)
  return batch


def stack_scenes(scenes: list[Mapping[str, Any]]) -> dict[str, np.ndarray]:
  """parse_caption / sample_scene dicts -> the batched scenes `adherence` takes."""
  return {k: np.stack([s[k] for s in scenes]) for k in scenes[0]}


def adherence(images: np.ndarray, scenes: Mapping[str, Any], *,
              check_kind: bool = True, check_size: bool = False) -> np.ndarray:
  """Per-image prompt adherence, all-or-nothing.

  Args:
    images: [n, S, S, 3] uint8, or float in [0, 1].
    scenes: dict with `shape_kind`, `color`, `position`, `size` [n, 3] and
      `num_shapes` [n] (e.g. a pipeline batch, or stacked `parse_caption`s).
    check_kind: also require each shape's kind (colour and position always are).
    check_size: also require each shape's size.

  Returns:
    float32 [n]: 1.0 iff exactly the scene's cells are occupied and each holds a
    shape of the scene's colour (and kind / size), else 0.0.
  """
  cells = analyze_cells(images)
  n = cells["occupied"].shape[0]
  scenes = _scene_batch(scenes, n)
  ok = np.ones((n,), bool)
  expected = np.zeros((n, len(POSITIONS)), bool)
  for j in range(MAX_SHAPES):
    present = j < scenes["num_shapes"]
    pos = np.where(present, scenes["position"][:, j], 0)
    checked = ("color",) + ("shape_kind",) * check_kind + ("size",) * check_size
    match = np.ones((n,), bool)
    for key in checked:
      found = np.take_along_axis(cells[key], pos[:, None], axis=1)[:, 0]
      match &= found == scenes[key][:, j]
    ok &= ~present | match
    expected[np.arange(n)[present], pos[present]] = True
  ok &= (cells["occupied"].astype(bool) == expected).all(axis=1)
  return ok.astype(np.float32)


def shape_recall(images: np.ndarray, scenes: Mapping[str, Any], *,
                 check_kind: bool = False) -> np.ndarray:
  """Per-image fraction of the scene's shapes found at their cell in their colour.

  A partial-credit companion of `adherence`: extra shapes elsewhere are not
  penalised, so it separates "follows the prompt loosely" from "ignores it".

  Returns:
    float32 [n] in [0, 1].
  """
  cells = analyze_cells(images)
  n = cells["occupied"].shape[0]
  scenes = _scene_batch(scenes, n)
  hits = np.zeros((n,), np.float32)
  for j in range(MAX_SHAPES):
    present = j < scenes["num_shapes"]
    pos = np.where(present, scenes["position"][:, j], 0)
    match = np.ones((n,), bool)
    for key in ("color",) + ("shape_kind",) * check_kind:
      match &= np.take_along_axis(cells[key], pos[:, None], axis=1)[:, 0] == scenes[key][:, j]
    hits += present & match
  return hits / np.maximum(scenes["num_shapes"], 1)


def score_image(image: np.ndarray, scene: Mapping[str, Any], *, check_kind: bool = True,
                check_size: bool = False) -> float:
  """Prompt adherence of one image [S, S, 3] to one scene; see `adherence`."""
  return float(adherence(np.asarray(image)[None], scene, check_kind=check_kind,
                         check_size=check_size)[0])


def classify_images(images: np.ndarray) -> np.ndarray:
  """Predicted class ids int32 [n] of images [n, S, S, 3]; -1 where no shape is seen.

  The class is read from the first occupied cell in reading order.
  """
  cells = analyze_cells(images)
  occupied = cells["occupied"].astype(bool)
  first = occupied.argmax(axis=1)[:, None]
  kind = np.take_along_axis(cells["shape_kind"], first, axis=1)[:, 0]
  color = np.take_along_axis(cells["color"], first, axis=1)[:, 0]
  return np.where(occupied.any(axis=1), kind * len(COLORS) + color, -1).astype(np.int32)


def classify_image(image: np.ndarray) -> int:
  """Predicted class id of one image [S, S, 3], or -1 if no shape is seen."""
  return int(classify_images(np.asarray(image)[None])[0])
