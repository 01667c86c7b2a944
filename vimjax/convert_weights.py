r"""Converts public VGG16 + LPIPS PyTorch weights into vimjax's LPIPS .npz.

One-off, needs PyTorch (not a vimjax dependency): `pip install torch`, then

  python -m vimjax.convert_weights \
    --torchvision_vgg16=vgg16-397923af.pth --lpips_vgg=vgg.pth --out=vgg16_lpips.npz

Inputs: torchvision's ImageNet `vgg16` state dict
(https://download.pytorch.org/models/vgg16-397923af.pth; keys
features.{0,2,5,...,28}.{weight,bias}, weights [out, in, kh, kw]) and the LPIPS
repo's `lpips/weights/v0.1/vgg.pth` (keys lin{0..4}.model.1.weight [1, C, 1, 1]).
The output is read by `vimjax.models.perceptual.load_lpips_params`. The last
stdout line is JSON: {"out": path, "num_arrays": n}.
"""
import json

from absl import app
from absl import flags
import numpy as np

from vimjax import errors
from vimjax.models import perceptual

FLAGS = flags.FLAGS


def _define_flags():
  """Flags of the binary, defined when it runs."""
  flags.DEFINE_string("torchvision_vgg16", None, "torchvision vgg16 ImageNet .pth.")
  flags.DEFINE_string("lpips_vgg", None, "LPIPS weights/v0.1/vgg.pth.")
  flags.DEFINE_string("out", "vgg16_lpips.npz", "Output .npz path.")


# torchvision `features` indices of the 13 convs, in order (ReLUs/pools between).
TORCHVISION_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def _conv_names() -> list[str]:
  return [f"conv{s + 1}_{i + 1}" for s, stage in enumerate(perceptual.VGG16_STAGES)
          for i in range(len(stage))]


def _take(state: dict[str, np.ndarray], key: str, shape: tuple[int, ...],
          source: str) -> np.ndarray:
  if key not in state:
    raise ValueError(f"{source} state dict lacks {key!r}; is it the right file?")
  x = np.asarray(state[key], np.float32)
  if x.shape != shape:
    raise ValueError(f"{source} {key!r} has shape {x.shape}, expected {shape}.")
  return x


def convert_state_dicts(vgg_state: dict[str, np.ndarray],
                        lpips_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Maps torch names/layouts to the flat names of `perceptual.LPIPS` params.

  Args:
    vgg_state: torchvision vgg16 state dict as NumPy (extra keys such as
      classifier.* are ignored).
    lpips_state: LPIPS vgg.pth state dict as NumPy.

  Returns:
    {"vgg/conv1_1/kernel": [3, 3, in, out] (HWIO), "vgg/conv1_1/bias": [out], ...,
     "lin_0/kernel": [1, 1, C, 1], ...} float32.
  """
  out = {}
  cin = 3
  couts = [c for stage in perceptual.VGG16_STAGES for c in stage]
  for name, idx, cout in zip(_conv_names(), TORCHVISION_CONV_INDICES, couts):
    w = _take(vgg_state, f"features.{idx}.weight", (cout, cin, 3, 3), "torchvision vgg16")
    out[f"vgg/{name}/kernel"] = np.ascontiguousarray(w.transpose(2, 3, 1, 0))
    out[f"vgg/{name}/bias"] = _take(vgg_state, f"features.{idx}.bias", (cout,),
                                    "torchvision vgg16")
    cin = cout
  for i, c in enumerate(perceptual.TAP_CHANNELS):
    w = _take(lpips_state, f"lin{i}.model.1.weight", (1, c, 1, 1), "LPIPS vgg")
    out[f"lin_{i}/kernel"] = np.ascontiguousarray(w.transpose(2, 3, 1, 0))
  return out


def _load_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("convert_weights needs PyTorch to read .pth files: "
                      "`pip install torch` (only for this one-off conversion).") from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  if "state_dict" in state and isinstance(state["state_dict"], dict):
    state = state["state_dict"]
  return {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, "detach")}


def main(argv):
  del argv
  if not FLAGS.torchvision_vgg16 or not FLAGS.lpips_vgg:
    raise app.UsageError("Set both --torchvision_vgg16 and --lpips_vgg.")
  out = FLAGS.out if FLAGS.out.endswith(".npz") else FLAGS.out + ".npz"  # As np.savez.
  arrays = convert_state_dicts(_load_torch(FLAGS.torchvision_vgg16), _load_torch(FLAGS.lpips_vgg))
  np.savez(out, **arrays)
  perceptual.load_lpips_params(out)  # Fails loudly if the layout drifted.
  print(json.dumps({"out": out, "num_arrays": len(arrays)}))


if __name__ == "__main__":
  _define_flags()
  errors.run(main)
