r"""python -m vimjax.fid --stats_a=A.npz --stats_b=B.npz

FID and friends (the ADM suite: FID, sFID, Inception Score, precision/recall).

  Two statistics files (pytorch-fid / ADM `mu`, `sigma` .npz, e.g. ADM's
  VIRTUAL_imagenet256_labeled.npz) -> their Fréchet distance (and sFID when
  both have `mu_s` / `sigma_s`):
    python -m vimjax.fid --stats_a=A.npz --stats_b=B.npz

  Images (a folder of PNG/JPEG, an .npz of uint8 `arr_0`, or a data source's
  eval split: `shapes`, `tfds:NAME[:SPLIT]`, `folder:PATH` with --image_size,
  prepared as the eval data of a run) -> statistics,
  saved with --out, and the Inception Score; with --ref_stats also FID and
  sFID against it, and precision/recall when the reference holds images (an
  ADM reference batch, `arr_0`) or `pool` features (--save_features):
    python -m vimjax.fid --images=DIR --inception_weights=inception_fid.npz \
      --out=STATS.npz [--ref_stats=VIRTUAL_imagenet256_labeled.npz]

Features are computed sharded over all devices (batch split over a data-
parallel mesh). The last stdout line is JSON with `fid` (when there is
something to compare with), `sfid`, `inception_score`, `precision`, `recall`,
`num_images`, `out`.
"""
from absl import app
from absl import flags
import ml_collections

from vimjax import errors
from vimjax import parallel
from vimjax import runtime
from vimjax.evaluation import inception_features
from vimjax.evaluation import inception_metrics
from vimjax.models import inception


def compare_stats(path_a: str, path_b: str) -> dict:
  a, b = inception_metrics.load_stats(path_a), inception_metrics.load_stats(path_b)
  a.pop("pool", None)  # Statistics only: both must have features for P/R.
  b.pop("pool", None)
  return inception_metrics.compare(a, b)


def images_metrics(images: str, weights: str, out: str | None, ref: str | None, *,
                   batch_size: int, size: int, save_features: bool, image_size: int = 256,
                   num_images: int = 0) -> dict:
  """Features of `images`; saves their stats; compares with `ref` when given."""
  mesh = parallel.create_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
  ref_stats = inception_metrics.load_stats(ref) if ref else None  # Fail before compiling.
  extractor = inception_features.Extractor(inception.load_inception_params(weights), mesh,
                                           size=size, batch_size=batch_size)
  batches, total = inception_features.image_batches(images, extractor.batch_size, image_size,
                                                    num_images)
  features = extractor.extract(batches, total, name=images)
  stats = inception_metrics.stats_from_features(features)
  result = {"num_images": len(features["pool"]),
            "inception_score": inception_metrics.inception_score(features["logits"])}
  if out:
    extra = {"pool": features["pool"]} if save_features else {}
    inception_metrics.save_stats(out, stats, **extra)
    result["out"] = out
  if ref_stats is not None:
    ref_stats = inception_features.with_reference_features(ref_stats, extractor)
    sample = {**stats, "pool": features["pool"]}
    result.update(inception_metrics.compare(sample, ref_stats))
    result["num_ref_images"] = len(ref_stats["pool"]) if "pool" in ref_stats else None
  return result


def _define_flags():
  """Flags of the binary (defined only when run as a program: names like --out are shared)."""
  flags.DEFINE_string("stats_a", None, "Statistics .npz (mu, sigma).")
  flags.DEFINE_string("stats_b", None, "Statistics .npz to compare with --stats_a.")
  flags.DEFINE_string("images", None, "Folder of images, .npz of uint8 images, or a data "
                      "source (shapes, tfds:NAME[:SPLIT], folder:PATH).")
  flags.DEFINE_string("inception_weights", None,
                      ".npz from `python -m vimjax.convert_inception`.")
  flags.DEFINE_string("out", None, "Where to save the statistics of --images.")
  flags.DEFINE_string("ref_stats", None,
                      "Reference statistics / ADM reference batch to compare --images with.")
  flags.DEFINE_bool("save_features", False,
                    "Also save the pool features in --out (for precision/recall).")
  flags.DEFINE_integer("batch_size", 256, "Images per sharded Inception call.")
  flags.DEFINE_integer("image_size", 256, "Crop size when --images is a data source.")
  flags.DEFINE_integer("num_images", 0, "Use the first N images (0 = all).")
  flags.DEFINE_integer("inception_size", inception.FID_SIZE,
                       "Resize target; 299 for comparable numbers (tests use less).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  runtime.initialize()
  try:
    if f.stats_a or f.stats_b:
      if not (f.stats_a and f.stats_b) or f.images:
        raise ValueError("--stats_a and --stats_b go together (and without --images).")
      result = compare_stats(f.stats_a, f.stats_b)
    elif f.images:
      if not f.inception_weights:
        raise ValueError(f"--images needs --inception_weights=PATH.npz; "
                         f"{inception.CONVERT_HINT}.")
      if not f.out and not f.ref_stats:
        raise ValueError("--images needs --out=STATS.npz and/or --ref_stats=REF.npz.")
      if f.inception_size < inception.MIN_SIZE:
        raise ValueError(f"--inception_size={f.inception_size} must be >= {inception.MIN_SIZE} "
                         f"({inception.FID_SIZE} for comparable numbers).")
      result = images_metrics(f.images, f.inception_weights, f.out, f.ref_stats,
                              batch_size=f.batch_size, size=f.inception_size,
                              save_features=f.save_features, image_size=f.image_size,
                              num_images=f.num_images)
    else:
      raise ValueError("Pass --stats_a=A.npz --stats_b=B.npz, or --images=DIR|NPZ "
                       "--inception_weights=W.npz --out=STATS.npz.")
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from None
  runtime.emit_result(result, None, "fid_result")


if __name__ == "__main__":
  _define_flags()
  errors.run(main)
