"""benchmark / aot_compile stand-in files (throwaway vocabulary, zero LPIPS
weights: 59 MB) live in temporary directories removed when the process exits."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = """
import json, os
from vimjax.configs import parti, vitvqgan
from vimjax.perf import synthetic
p, t = parti.get_config("tiny"), vitvqgan.get_config("tiny")
for c in (p, t):
  c.unlock()
t.loss.perceptual_weight = 0.1
synthetic.prepare_config(p, 8, 1)  # Placeholder data.text_tokenizer: a throwaway vocabulary.
synthetic.prepare_config(t, 8, 1)  # No perceptual_weights: zero weights stand in.
paths = [p.data.text_tokenizer, t.loss.perceptual_weights]
print(json.dumps({"paths": paths, "exist": [os.path.exists(x) for x in paths]}))
"""


@pytest.mark.slow  # A Python subprocess that imports the binaries (~7 s CPU).
def test_stand_in_files_are_removed_at_exit(tmp_path):
  scratch = tmp_path / "tmp"
  scratch.mkdir()
  env = dict(os.environ, TMPDIR=str(scratch), PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["exist"] == [True, True]
  assert all(path.startswith(str(scratch)) for path in result["paths"]), result
  assert os.listdir(scratch) == []  # Before: vimjax_benchmark_spm_* and vimjax_aot_lpips_*.
