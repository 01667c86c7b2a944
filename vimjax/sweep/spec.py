"""Sweep files and their trials.

A sweep file is an ml-collections file under configs/sweeps/ whose
`get_config()` returns:

  base       the experiment config every trial starts from, "FILE.py[:variant]"
             (relative to the repository root, as `--config` takes it).
  overrides  {dotted key: value} applied to every trial (a list of one dict,
             because ConfigDict field names cannot hold dots).
  trials     a list of override dicts, one per point (several keys at once, e.g.
             a model size); an optional "name" entry labels the point.
  grid       a list of (dotted key, values) pairs; their product is crossed with
             `trials` (an empty `trials` = one point with no overrides).
  metric     the key of the trial's train_result.json to fit, e.g.
             "eval_bits_per_token", "eval_psnr".
  fit_against  extra x axes to fit besides N, C, D: dotted config keys (e.g.
             "model.patch_size").
  with_offset  fit L = a x^-alpha + c (True) or a pure power law (False).
  prepare    "" or the name of a stage in prepare.STAGES run once before the
             trials (its outputs become overrides of every trial).
  prepare_args  keyword arguments of that stage.

Trial i's workdir is WORKDIR/trials/NNN-label (label: the point's name and
grid values), a normal training workdir. Points are numbered in order, so add
new points at the end of `trials` (or of a grid axis's values only when it is
the last axis) to keep the existing trials' workdirs.
"""
import dataclasses
import importlib.util
import itertools
import json
import os
import re
import shlex

import ml_collections

from vimjax import config_lib
from vimjax import configs

REQUIRED = ("base", "overrides", "trials", "grid", "metric", "fit_against", "with_offset",
            "prepare", "prepare_args")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Trial:
  index: int
  name: str
  overrides: dict  # Dotted key -> value, the sweep-wide ones included.
  workdir: str


def load_config_file(spec: str, flag: str = "--sweep") -> ml_collections.ConfigDict:
  """Calls get_config([variant]) of "FILE.py[:variant]" (a relative FILE is tried from the repo)."""
  path, _, variant = configs.find(spec).partition(":")
  if not os.path.exists(path) and os.path.exists(os.path.join(REPO, path)):
    path = os.path.join(REPO, path)
  if not path.endswith(".py") or not os.path.exists(path):
    raise ValueError(f"{flag}={spec!r}: no such python config file (FILE.py[:variant]).")
  module_spec = importlib.util.spec_from_file_location(
      "vimjax_config_" + re.sub(r"\W", "_", path), path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def load_sweep(path: str) -> ml_collections.ConfigDict:
  """Loads and checks a sweep file: required keys, override keys present in the base."""
  sweep = load_config_file(path)
  for key in REQUIRED:
    if key not in sweep:
      raise ValueError(f"--sweep={path!r} is missing {key!r}; a sweep file defines "
                       f"{', '.join(REQUIRED)}.")
  from vimjax.sweep import prepare  # pylint: disable=g-import-not-at-top
  if sweep.prepare and sweep.prepare not in prepare.STAGES:
    raise ValueError(f"prepare={sweep.prepare!r}; valid: '' or {tuple(prepare.STAGES)}.")
  if not isinstance(sweep.metric, str) or not sweep.metric:
    raise ValueError(f"metric={sweep.metric!r} must name a key of train_result.json.")
  base = load_config_file(sweep.base, flag="base")
  for point in expand(sweep):
    overrides = {k: v for k, v in point.items() if k != "name"}
    config_lib.override(base.copy_and_resolve_references(), **overrides)
    for key in overrides:
      if _get(base, key) is None:  # config_flags cannot type a None field.
        raise ValueError(f"The sweep overrides {key!r}, which is None in base={sweep.base!r}: "
                         f"`--config.{key}=` cannot set a None field; use a base variant "
                         "where it has a value.")
  for key in sweep.fit_against:
    _get(base, key)
  return sweep


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    if part not in node:
      raise ValueError(f"{dotted!r} is not a key of the base config.")
    node = node[part]
  return node


def expand(sweep) -> list[dict]:
  """The trials' override dicts (sweep-wide overrides first), "name" entries kept."""
  shared = {}
  for entry in sweep.overrides:
    shared.update(entry)
  points = [dict(p) for p in sweep.trials] or [{}]
  keys = [key for key, _ in sweep.grid]
  if len(set(keys)) != len(keys):
    raise ValueError(f"grid repeats a key: {keys}.")
  combos = list(itertools.product(*(tuple(values) for _, values in sweep.grid)))
  out = []
  for point, combo in itertools.product(points, combos):
    trial = {**shared, **point, **dict(zip(keys, combo))}
    out.append(trial)
  if not out:
    raise ValueError("The sweep has no trials (a grid axis with no values?).")
  return out


def _label(point: dict, keys: list[str]) -> str:
  parts = [str(point["name"])] if "name" in point else []
  parts += [f"{key.split('.')[-1]}={point[key]}" for key in keys]
  return re.sub(r"[^A-Za-z0-9_.=+-]", "", "-".join(parts))


def trials(sweep, workdir: str) -> list[Trial]:
  """Trial i of the sweep: NNN-label, its overrides and WORKDIR/trials/NNN-label."""
  keys = [key for key, _ in sweep.grid]
  out = []
  for i, point in enumerate(expand(sweep)):
    label = _label(point, keys)
    name = f"{i:03d}" + (f"-{label}" if label else "")
    overrides = {k: v for k, v in point.items() if k != "name"}
    out.append(Trial(i, name, overrides, os.path.join(workdir, "trials", name)))
  return out


def format_value(value) -> str:
  """A config override as `--config.KEY=` parses it back (tuples as (a, b))."""
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, (list, tuple)):
    return "(" + ", ".join(format_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def train_args(sweep, trial: Trial, extra: dict | None = None) -> list[str]:
  """`python -m vimjax.train` arguments of `trial` (extra: e.g. prepare's overrides)."""
  args = [f"--config={sweep.base}", f"--workdir={trial.workdir}"]
  for key, value in {**(extra or {}), **trial.overrides}.items():
    args.append(f"--config.{key}={format_value(value)}")
  return args


def shell_line(words) -> str:
  return " ".join(shlex.quote(w) for w in words)


def trial_config(sweep, trial: Trial, extra: dict | None = None) -> ml_collections.ConfigDict:
  """The trial's config as its train command builds it (without running anything)."""
  config = load_config_file(sweep.base, flag="base")
  return config_lib.override(config, **{**(extra or {}), **trial.overrides})


def write_manifest(sweep, workdir: str, sweep_path: str, trial_list: list[Trial]) -> None:
  """WORKDIR/sweep.json: the sweep file and its trials, for --collect without --sweep."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  manifest = {"sweep": sweep_path, "config": json.loads(sweep.to_json()),
              "trials": [dataclasses.asdict(t) for t in trial_list]}
  (epath.Path(workdir) / "sweep.json").write_text(json.dumps(manifest, indent=2))


def read_manifest(workdir: str) -> dict:
  from etils import epath  # pylint: disable=g-import-not-at-top
  path = epath.Path(workdir) / "sweep.json"
  if not path.exists():
    raise ValueError(f"--workdir={workdir!r} has no sweep.json; run "
                     "`python -m vimjax.sweep --sweep=FILE --workdir=DIR` first.")
  return json.loads(path.read_text())
