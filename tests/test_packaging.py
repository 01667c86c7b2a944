"""A non-editable install runs the packaged configs from any directory."""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> pathlib.Path:
  """The wheel of `pip wheel .` (no deps) unpacked: what `pip install .` puts in site-packages."""
  src = tmp_path_factory.mktemp("src")
  shutil.copy(ROOT / "setup.py", src)
  shutil.copytree(ROOT / "vimjax", src / "vimjax",
                  ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  wheels = tmp_path_factory.mktemp("wheels")
  subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                  "--no-build-isolation", "-q", "-w", str(wheels)], check=True, timeout=300)
  site = tmp_path_factory.mktemp("site")
  with zipfile.ZipFile(next(wheels.glob("vimjax-*.whl"))) as wheel:
    wheel.extractall(site)
  return site


def _run(site, cwd, *args):
  env = {**os.environ, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=600, check=False)


def test_the_wheel_holds_the_configs(installed):
  for name in ("parti.py", "vim.py", "vitvqgan.py", "contrastive.py", "sweeps/parti_shapes.py"):
    assert (installed / "vimjax" / "configs" / name).is_file(), name
  for name in ("cpu_kernels.h", "cpu_attention.cc", "cpu_layer_norm.cc"):  # Built on first use.
    assert (installed / "vimjax" / "models" / name).is_file(), name


def test_configs_paths_and_the_demo_work_outside_a_checkout(installed, tmp_path):
  # From a directory without configs/: `--config=configs/...` is the package's file.
  out = _run(installed, tmp_path, "-m", "vimjax.summary", "--config=configs/vim.py:tiny",
             "--noflops")
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads(out.stdout.strip().splitlines()[-1])["total_params"] > 0
  code = ("import vimjax, vimjax.demo, vimjax.configs.parti as p; "
          "print(vimjax.__file__); print(p.get_config('tiny').task)")
  out = _run(installed, tmp_path, "-c", code)
  assert out.returncode == 0, out.stderr[-2000:]
  where, task = out.stdout.strip().splitlines()[-2:]
  assert where.startswith(str(installed)) and task == "parti"
  missing = _run(installed, tmp_path, "-m", "vimjax.summary", "--config=configs/nope.py")
  assert missing.returncode != 0
