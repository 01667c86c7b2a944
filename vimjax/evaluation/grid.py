"""Image grids as PNG (and as arrays for TensorBoard), with optional captions.

Layout of `make_image_grid`: tiles of `h*upscale` × `w*upscale` pixels in
row-major order, `padding` background pixels around and between tiles. With
captions, every tile is followed by a caption strip of the same height for all
tiles (enough for the longest wrapped caption), so tile (r, c) starts at
  y = padding + r * (tile_h + caption_h + padding),
  x = padding + c * (tile_w + padding).
Background is white, text black (PIL's default font), wrapped to the tile width.
"""
import io

from etils import epath
import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = 255
TEXT_COLOR = (0, 0, 0)
CAPTION_MARGIN = 2  # Pixels between a tile and its caption's first line.
# Longer captions are cut to this many lines ending in "...", so one long prompt
# cannot stretch every caption strip of the grid (the full text is in the JSON).
MAX_CAPTION_LINES = 4


def to_uint8(images) -> np.ndarray:
  """Floats in [0, 1] (clipped, NaN -> 0) or uint8 -> uint8, same shape."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"images must be float in [0, 1] or uint8, got dtype {images.dtype}.")
  images = np.nan_to_num(images.astype(np.float32), nan=0.0)
  return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def side_by_side(originals, reconstructions) -> np.ndarray:
  """Interleaves originals and reconstructions for a reconstruction grid.

  With an even `columns` in `make_image_grid`, each original sits left of its
  reconstruction.

  Args:
    originals: [n, h, w, 3] float in [0, 1] or uint8.
    reconstructions: same shape as `originals` (dtype may differ).

  Returns:
    [2n, h, w, 3] uint8: original 0, reconstruction 0, original 1, ...
  """
  originals, reconstructions = to_uint8(originals), to_uint8(reconstructions)
  if originals.shape != reconstructions.shape:
    raise ValueError(f"side_by_side: originals {originals.shape} and reconstructions "
                     f"{reconstructions.shape} must have the same shape.")
  return np.stack([originals, reconstructions], axis=1).reshape(
      (-1,) + originals.shape[1:])


def wrap_text(text: str, font, width: int) -> list[str]:
  """Greedy word wrap to `width` pixels; words wider than a line are split by character."""
  lines = []
  for paragraph in text.split("\n"):
    line = ""
    for word in paragraph.split():
      candidate = f"{line} {word}" if line else word
      if font.getlength(candidate) <= width:
        line = candidate
        continue
      if line:
        lines.append(line)
      line = ""
      for ch in word:  # Break a word that does not fit on its own line.
        if line and font.getlength(line + ch) > width:
          lines.append(line)
          line = ""
        line += ch
    lines.append(line)
  return lines


def shorten_lines(lines: list[str], font, width: int, max_lines: int) -> list[str]:
  """The first `max_lines` lines, the last ending in "..." (within `width` px) if cut."""
  if len(lines) <= max_lines:
    return lines
  last = lines[max_lines - 1]
  while last and font.getlength(last + "...") > width:
    last = last[:-1]
  return lines[:max_lines - 1] + [last.rstrip() + "..."]


def make_image_grid(images, *, columns: int, captions: list[str] | None = None,
                    upscale: int = 1, padding: int = 2) -> np.ndarray:
  """Tiles images into one picture, with an optional caption under each tile.

  Args:
    images: [n, h, w, 3] float in [0, 1] (clipped) or uint8.
    columns: tiles per row; rows = ceil(n / columns), the last row may be short.
    captions: None or n strings, drawn under their tiles (wrapped to the tile
      width, at most MAX_CAPTION_LINES lines).
    upscale: integer nearest-neighbour factor, e.g. 4 for 32px images.
    padding: background pixels around and between tiles.

  Returns:
    grid: [H', W', 3] uint8.
  """
  images = to_uint8(images)
  if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
    raise ValueError(f"images must be [n, h, w, 3] with n >= 1, got shape {images.shape}.")
  if columns < 1 or upscale < 1 or padding < 0:
    raise ValueError(f"need columns >= 1, upscale >= 1, padding >= 0; got columns={columns}, "
                     f"upscale={upscale}, padding={padding}.")
  n = images.shape[0]
  if captions is not None and len(captions) != n:
    raise ValueError(f"captions has {len(captions)} entries but there are {n} images; "
                     "give one caption per image or None.")
  if upscale > 1:
    images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
  tile_h, tile_w = images.shape[1:3]
  rows = -(-n // columns)

  caption_h, font, wrapped = 0, None, None
  if captions is not None:
    font = ImageFont.load_default()
    ascent, descent = font.getmetrics()
    line_h = ascent + descent
    wrapped = [shorten_lines(wrap_text(str(c), font, tile_w), font, tile_w, MAX_CAPTION_LINES)
               for c in captions]
    caption_h = CAPTION_MARGIN + line_h * max(len(lines) for lines in wrapped)

  cell_h = tile_h + caption_h + padding
  cell_w = tile_w + padding
  grid = np.full((padding + rows * cell_h, padding + columns * cell_w, 3), BACKGROUND, np.uint8)
  for i in range(n):
    y = padding + (i // columns) * cell_h
    x = padding + (i % columns) * cell_w
    grid[y:y + tile_h, x:x + tile_w] = images[i]
  if captions is not None:
    canvas = Image.fromarray(grid)
    draw = ImageDraw.Draw(canvas)
    for i, lines in enumerate(wrapped):
      y = padding + (i // columns) * cell_h + tile_h + CAPTION_MARGIN
      x = padding + (i % columns) * cell_w
      for j, line in enumerate(lines):
        draw.text((x, y + j * line_h), line, fill=TEXT_COLOR, font=font)
    grid = np.asarray(canvas, np.uint8)
  return grid


def write_image_grid(path, images, *, columns: int, captions: list[str] | None = None,
                     upscale: int = 1, padding: int = 2) -> np.ndarray:
  """Writes `make_image_grid(...)` to `path` as PNG and returns it.

  `path` may be local or any `etils.epath` path (e.g. gs://); parent folders
  are created. The returned [H', W', 3] uint8 array can go to TensorBoard
  (clu `writer.write_images(step, {"samples": grid[None]})`).
  """
  grid = make_image_grid(images, columns=columns, captions=captions, upscale=upscale,
                         padding=padding)
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  Image.fromarray(grid).save(buffer, format="PNG")
  path.write_bytes(buffer.getvalue())
  return grid
