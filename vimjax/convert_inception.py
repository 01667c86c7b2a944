r"""Converts pytorch-fid's Inception weights into the .npz `vimjax.fid` loads.

One-off, needs PyTorch (not a vimjax dependency: `pip install torch==2.13.0`):

  wget https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
  python -m vimjax.convert_inception \
    --pytorch_fid_weights=pt_inception-2015-12-05-6726825d.pth --out=inception_fid.npz

The input is pytorch-fid's port of the TF `inception-2015-12-05` graph (the
network of the original FID code and of the ADM suite): a torchvision
Inception-v3 state dict with 1008 classes, keys like
`Mixed_6d.branch1x1.conv.weight` [out, in, kh, kw] and `.bn.{weight, bias,
running_mean, running_var}`. The classifier bias `fc.bias` is dropped: the
Inception Score uses unbiased logits (models/inception.py). The last stdout
line is JSON: {"out": path, "num_arrays": n}.
"""
import json

from absl import app
from absl import flags
import numpy as np

from vimjax import errors
from vimjax.models import inception

# Our leaf name -> (torch suffix, layout change).
_BN = {"bn_scale": "bn.weight", "bn_bias": "bn.bias", "bn_mean": "bn.running_mean",
       "bn_var": "bn.running_var"}


def torch_key(name: str) -> str:
  """Flat vimjax name ('Mixed_6d/branch1x1/conv/kernel') -> torch state-dict key."""
  if name == "fc_kernel":
    return "fc.weight"
  *path, leaf = name.split("/")
  if leaf == "kernel":  # .../conv/kernel
    return ".".join(path) + ".weight"
  return ".".join(path + [_BN[leaf]])


def convert_state_dict(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Maps a pytorch-fid Inception state dict (NumPy) to `InceptionV3`'s flat params.

  Returns:
    {"Conv2d_1a_3x3/conv/kernel": [3, 3, 3, 32] (HWIO), ".../bn_scale": [32], ...,
     "fc_kernel": [2048, 1008]} float32.

  Raises:
    ValueError: a key is missing or has the wrong shape.
  """
  out = {}
  for name, shape in inception.expected_param_shapes().items():
    key = torch_key(name)
    if key not in state:
      raise ValueError(f"The state dict lacks {key!r} (for {name}); is it pytorch-fid's "
                       "pt_inception-2015-12-05 file?")
    x = np.asarray(state[key], np.float32)
    if x.ndim == 4:
      x = x.transpose(2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out].
    elif x.ndim == 2:
      x = x.T  # fc [classes, 2048] -> [2048, classes].
    if x.shape != shape:
      raise ValueError(f"{key!r} has shape {x.shape} after transposing, expected {shape}.")
    out[name] = np.ascontiguousarray(x)
  return out


def _load_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("convert_inception needs PyTorch to read the .pth: "
                      "`pip install torch==2.13.0` (only for this one-off conversion).") from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, "detach")}


def _define_flags():
  """Flags of the binary (defined only when run as a program: --out is shared)."""
  flags.DEFINE_string("pytorch_fid_weights", None,
                      "pytorch-fid's pt_inception-2015-12-05-6726825d.pth.")
  flags.DEFINE_string("out", "inception_fid.npz", "Output .npz path.")


def main(argv):
  del argv
  f = flags.FLAGS
  if not f.pytorch_fid_weights:
    raise app.UsageError("Set --pytorch_fid_weights=pt_inception-2015-12-05-6726825d.pth.")
  out = f.out if f.out.endswith(".npz") else f.out + ".npz"  # As np.savez.
  arrays = convert_state_dict(_load_torch(f.pytorch_fid_weights))
  np.savez(out, **arrays)
  inception.load_inception_params(out)  # Fails loudly if the layout drifted.
  print(json.dumps({"out": out, "num_arrays": len(arrays)}))


if __name__ == "__main__":
  _define_flags()
  errors.run(main)
