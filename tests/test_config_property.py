"""Property: every invalid `--config.*` override, in every section, is exit code 1 and one line.

Hypothesis draws a family, a key from any section, and a way to break it:
an unknown key next to it, a value of the wrong type, a value out of the
key's range (config_checks' tables) or a name outside its closed set. The
override goes through the binaries' own path in-process (`errors.parse_flags`
on real ml_collections config flags, then `errors.guarded` around validation
and the data-source check), so each example costs milliseconds; two real
subprocesses check the same path end to end.
"""
import contextlib
import io
import os
import re
import string
import subprocess
import sys

from absl import flags
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
from ml_collections import config_flags
import pytest

from vimjax.configs import vim
from vimjax.configs import vitvqgan
from vimjax import config_checks
from vimjax import config_lib
from vimjax import tasks
from vimjax import errors
from vimjax.train import preflight

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = {"tokenizer": vitvqgan.get_config("tiny"), "vim": vim.get_config("tiny")}
# Stage 2 without encoded tokens: a valid-looking token source (the files are not read here).
STAGE2_SOURCE = "array_record:/nonexistent/tokens-{split}-*.array_record"
ENUMS = {"task": tuple(tasks.TASKS), "model.quantizer": ("factorized", "fsq"),
         "model.dtype": config_lib.COMPUTE_DTYPES, "model.param_dtype": ("float32", "bfloat16"),
         "model.remat_policy": ("none", "dots", "full"), "optimizer.name": (),
         "disc_optimizer.name": (), "optimizer.schedule": (), "disc_optimizer.schedule": (),
         "model.output": (), "sampling.dtype": ("float32", "bfloat16")}


def _leaves(config, prefix=""):
  out = {}
  for name in config.keys():
    value = config[name]
    if hasattr(value, "keys") and not isinstance(value, dict):
      out.update(_leaves(value, f"{prefix}{name}."))
    else:
      out[f"{prefix}{name}"] = value
  return out


def _out_of_range(key, value):
  """A strategy of values outside `key`'s range, or None if it has no numeric range."""
  name = key.split(".")[-1]
  if key.startswith("mesh.") and name in ("data", "fsdp", "tensor"):
    return st.integers(-100, -2) | st.just(0)
  if name in config_checks.POSITIVE_INTS:
    return st.integers(-10**6, 0)
  if name in config_checks.NON_NEGATIVE_INTS:
    return st.integers(-10**6, -1)
  if name in config_checks.NON_NEGATIVE_FLOATS or name.endswith("_weight"):
    return st.floats(max_value=-1e-6, allow_nan=False) | st.just(float("inf"))
  if name in config_checks.POSITIVE_FLOATS:
    return st.floats(max_value=0.0, allow_nan=False) | st.sampled_from(
        [float("inf"), float("nan")])
  if name in config_checks.PROBABILITIES:
    return st.floats(min_value=1.0001, max_value=1e6) | st.floats(max_value=-1e-6,
                                                                   allow_nan=False)
  if name in config_checks.DECAYS:
    return st.floats(min_value=1.0, max_value=1e6) | st.floats(max_value=-1e-6,
                                                                allow_nan=False)
  return None


@st.composite
def invalid_overrides(draw):
  """(family, [argv override], what the error line must name)."""
  family = draw(st.sampled_from(sorted(FAMILIES)))
  leaves = _leaves(FAMILIES[family])
  key = draw(st.sampled_from(sorted(leaves)))
  value = leaves[key]
  kinds = ["unknown"]
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    kinds.append("type")
  if isinstance(value, (int, float)) and not isinstance(value, bool) and _out_of_range(key, value) is not None:
    kinds.append("range")
  if key in ENUMS:
    kinds.append("enum")
  kind = draw(st.sampled_from(kinds))
  if kind == "unknown":
    section = key.rpartition(".")[0]
    bad = draw(st.text(string.ascii_lowercase + "_", min_size=1, max_size=12))
    bad_key = f"{section}.{bad}" if section else bad
    if bad_key in leaves or any(k.startswith(bad_key + ".") for k in leaves):
      bad_key += "_x"
    return family, [f"--config.{bad_key}=1"], f"'{bad_key}' is not a config key"
  if kind == "type":
    word = draw(st.sampled_from(["abc", "1.5.2", "[1]", "none!", "--", "0x"]))
    return family, [f"--config.{key}={word}"], f"--config.{key}"
  if kind == "enum":
    word = draw(st.text(string.ascii_lowercase, min_size=1, max_size=8))
    if word in {"none", "true", "false"} or word in ENUMS[key] + (str(value),):
      word += "zz"
    return family, [f"--config.{key}={word}"], f"{key}="
  number = draw(_out_of_range(key, value))
  if isinstance(value, int):
    number = int(number)
  return family, [f"--config.{key}={number}"], f"{key}="


def _config_file(family):
  return {"tokenizer": "configs/vitvqgan.py:tiny", "vim": "configs/vim.py:tiny"}[family]


def run_in_process(family, overrides):
  """The train binary's flag parsing and start-up checks; (exit code, stderr)."""
  stage2 = [f"--config.data.source={STAGE2_SOURCE}"] if family == "vim" else []
  argv = ["train", f"--config={os.path.join(REPO, _config_file(family))}", *stage2, *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv)

  def main(argv):
    del argv
    config = flag_values.config
    config_lib.validate(config, jax.device_count(), 1)
    if family == "tokenizer":
      preflight.check_sources(config)

  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr):
    try:
      errors.parse_flags(argv, flag_values)
      errors.guarded(main)(argv)
      code = 0
    except SystemExit as e:
      code = e.code
  return code, stderr.getvalue()


def test_the_unmodified_configs_pass():
  for family in FAMILIES:
    code, stderr = run_in_process(family, [])
    assert (code, stderr) == (0, ""), stderr


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(invalid_overrides())
def test_every_invalid_override_is_one_line_and_exit_1(case):
  family, overrides, names = case
  code, stderr = run_in_process(family, overrides)
  lines = stderr.splitlines()
  assert code == 1, (overrides, stderr)
  assert len(lines) == 1 and lines[0].startswith("error: "), (overrides, stderr)
  assert "Traceback" not in stderr
  assert names in lines[0], (overrides, lines[0])


@pytest.mark.parametrize("override,says", [
    ("--config.optimizer.b1=1.5", "error: optimizer.b1=1.5; valid: a number in [0, 1)."),
    ("--config.model.encoder.num_layers=-2",
     "error: model.encoder.num_layers=-2; valid: an integer >= 1."),
])
def test_the_real_binary_agrees(tmp_path, override, says):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  proc = subprocess.run(
      [sys.executable, "-m", "vimjax.train", "--config=configs/vitvqgan.py:tiny",
       f"--workdir={tmp_path}/run", override], cwd=REPO, capture_output=True, text=True,
      timeout=240, env=env)
  lines = [l for l in proc.stderr.splitlines()
           if l.strip() and not re.match(r"[IWE]\d{4} ", l)
           and "oneDNN" not in l and "absl::InitializeLog" not in l]
  assert proc.returncode == 1 and lines == [says], proc.stderr[-2000:]
  assert not os.path.exists(f"{tmp_path}/run")
