"""Tests for vimjax.evaluation.grid: tile placement, upscaling, captions, PNG output."""
import numpy as np
from PIL import Image, ImageFont
import pytest

from vimjax.evaluation import grid as grid_lib


def _solid_tiles(n, h=4, w=5):
  """n uint8 tiles, each a distinct solid colour with one marked corner pixel."""
  rng = np.random.default_rng(n)
  colors = rng.integers(0, 200, size=(n, 3)).astype(np.uint8)
  tiles = np.broadcast_to(colors[:, None, None, :], (n, h, w, 3)).copy()
  tiles[:, 0, 0] = 250  # Orientation check: top-left pixel differs.
  return tiles


def test_exact_tiling_without_padding():
  tiles = _solid_tiles(5)
  grid = grid_lib.make_image_grid(tiles, columns=3, padding=0)
  assert grid.shape == (2 * 4, 3 * 5, 3) and grid.dtype == np.uint8
  for i in range(5):
    r, c = divmod(i, 3)
    np.testing.assert_array_equal(grid[r * 4:(r + 1) * 4, c * 5:(c + 1) * 5], tiles[i])
  assert np.all(grid[4:, 10:] == grid_lib.BACKGROUND)  # Missing 6th tile is background.


def test_padding_and_upscale_placement():
  tiles, pad, up = _solid_tiles(4, h=3, w=2), 2, 3
  grid = grid_lib.make_image_grid(tiles, columns=2, upscale=up, padding=pad)
  th, tw = 3 * up, 2 * up
  assert grid.shape == (pad + 2 * (th + pad), pad + 2 * (tw + pad), 3)
  mask = np.ones(grid.shape[:2], bool)
  for i in range(4):
    r, c = divmod(i, 2)
    y, x = pad + r * (th + pad), pad + c * (tw + pad)
    want = tiles[i].repeat(up, axis=0).repeat(up, axis=1)  # Nearest neighbour.
    np.testing.assert_array_equal(grid[y:y + th, x:x + tw], want)
    mask[y:y + th, x:x + tw] = False
  assert np.all(grid[mask] == grid_lib.BACKGROUND)


def test_float_images_are_clipped_and_rounded():
  images = np.array([0.0, 0.5, 1.0, 2.0, -1.0, np.nan], np.float32)[:, None, None, None]
  images = np.broadcast_to(images, (6, 1, 1, 3))
  grid = grid_lib.make_image_grid(images, columns=6, padding=0)
  np.testing.assert_array_equal(grid[0, :, 0], [0, 128, 255, 255, 0, 0])


def test_write_image_grid_png_roundtrip(tmp_path):
  tiles = _solid_tiles(6, h=8, w=8).astype(np.float32) / 255.0
  path = tmp_path / "sub" / "grid.png"
  grid = grid_lib.write_image_grid(str(path), tiles, columns=4, upscale=2)
  assert path.exists()
  with Image.open(path) as im:
    assert im.format == "PNG" and im.mode == "RGB"
    assert im.size == (grid.shape[1], grid.shape[0]) == (2 + 4 * 18, 2 + 2 * 18)
    np.testing.assert_array_equal(np.asarray(im), grid)


def test_captions_make_grid_taller_and_wrap(tmp_path):
  tiles = _solid_tiles(4, h=8, w=8)
  plain = grid_lib.make_image_grid(tiles, columns=2, upscale=4)
  short = grid_lib.write_image_grid(tmp_path / "c.png", tiles, columns=2, upscale=4,
                                    captions=["red", "blue", "a", "b"])
  long = grid_lib.make_image_grid(
      tiles, columns=2, upscale=4,
      captions=["a red circle above a small blue square"] + ["x"] * 3)
  assert short.shape[1] == plain.shape[1] == long.shape[1]
  assert plain.shape[0] < short.shape[0] < long.shape[0]
  # First row of tiles stays where it was; text (dark pixels) sits below tile 0.
  np.testing.assert_array_equal(short[2:34, 2:34], plain[2:34, 2:34])
  below_tile0 = short[34:34 + (short.shape[0] - plain.shape[0]) // 2, 2:34]
  assert (below_tile0.max(axis=-1) < 100).any()
  with Image.open(tmp_path / "c.png") as im:
    assert im.size == (short.shape[1], short.shape[0])


def test_wrap_text_fits_width():
  font = ImageFont.load_default()
  lines = grid_lib.wrap_text("a red circle above a small blue square", font, 40)
  assert len(lines) > 1
  assert all(font.getlength(line) <= 40 for line in lines)
  assert " ".join(lines) == "a red circle above a small blue square"
  # A word wider than the line is split by characters, nothing is lost.
  assert "".join(grid_lib.wrap_text("abcdefghijklmnopqrstuvwxyz", font, 20)) == (
      "abcdefghijklmnopqrstuvwxyz")


def test_side_by_side_interleaves():
  originals = _solid_tiles(3)
  recon = (255 - originals).astype(np.float32) / 255.0
  pairs = grid_lib.side_by_side(originals, recon)
  assert pairs.shape == (6, 4, 5, 3) and pairs.dtype == np.uint8
  np.testing.assert_array_equal(pairs[0::2], originals)
  np.testing.assert_array_equal(pairs[1::2], 255 - originals)
  grid = grid_lib.make_image_grid(pairs, columns=2, padding=0)
  np.testing.assert_array_equal(grid[4:8, :5], originals[1])  # Row 1: original | recon.
  np.testing.assert_array_equal(grid[4:8, 5:], 255 - originals[1])


def test_bad_arguments():
  tiles = _solid_tiles(2)
  with pytest.raises(ValueError, match="captions has 1"):
    grid_lib.make_image_grid(tiles, columns=2, captions=["x"])
  with pytest.raises(ValueError, match="columns"):
    grid_lib.make_image_grid(tiles, columns=0)
  with pytest.raises(ValueError, match=r"\[n, h, w, 3\]"):
    grid_lib.make_image_grid(tiles[..., :1], columns=2)
  with pytest.raises(ValueError, match="same shape"):
    grid_lib.side_by_side(tiles, tiles[:1])
