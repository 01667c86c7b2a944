"""perf/allocator.py: the binaries re-execute once with TCMalloc preloaded."""
import os
import subprocess
import sys
import textwrap

import pytest

from vimjax.perf import allocator

# A binary in miniature: errors.run is every binary's start-up.
_BINARY = textwrap.dedent("""
    import os, sys
    from vimjax import errors
    from vimjax.perf import allocator

    def main(argv):
      print("argv", argv[1:])
      print("allocator", allocator.loaded())
      print("preload", os.environ.get("LD_PRELOAD", ""))

    errors.run(main)
""")


def _run(tmp_path, **env):
  script = tmp_path / "binary.py"
  script.write_text(_BINARY)
  environ = {k: v for k, v in os.environ.items()
             if k not in ("LD_PRELOAD", allocator.MODE_ENV, allocator.LIBRARY_ENV,
                          allocator._REEXEC_ENV)}
  environ.update(env)
  out = subprocess.run([sys.executable, str(script), "--", "x", "--y=1"], env=environ,
                       capture_output=True, text=True, timeout=120)
  return out


def test_preload_environment_prepends_and_sets_the_guard():
  env = allocator.preload_environment({"LD_PRELOAD": "/a.so", "HOME": "/h"}, "/t.so")
  assert env["LD_PRELOAD"] == "/t.so:/a.so" and env["HOME"] == "/h"
  assert env[allocator._REEXEC_ENV] == "1"
  assert env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == str(100 << 30)
  kept = allocator.preload_environment({"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "5"}, "/t.so")
  assert kept["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == "5"
  assert allocator.preload_environment({}, "/t.so")["LD_PRELOAD"] == "/t.so"


def test_mode_and_library_errors_name_the_value(tmp_path):
  assert allocator.mode({}) == "tcmalloc"
  assert allocator.mode({allocator.MODE_ENV: "system"}) == "system"
  with pytest.raises(ValueError, match=r"VIMJAX_MALLOC='jemalloc' must be one of"):
    allocator.mode({allocator.MODE_ENV: "jemalloc"})
  with pytest.raises(ValueError, match=r"VIMJAX_TCMALLOC='/no/such.so' is not a file"):
    allocator.find_tcmalloc({allocator.LIBRARY_ENV: "/no/such.so"})
  lib = tmp_path / "libtcmalloc_minimal.so.4"
  lib.write_bytes(b"")
  assert allocator.find_tcmalloc({allocator.LIBRARY_ENV: str(lib)}) == str(lib)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_binary_runs_with_tcmalloc_where_installed_and_keeps_its_argv(tmp_path):
  out = _run(tmp_path)
  assert out.returncode == 0, out.stderr
  assert "argv ['x', '--y=1']" in out.stdout
  expected = "tcmalloc" if allocator.find_tcmalloc({}) else "system"
  assert f"allocator {expected}" in out.stdout, out.stdout


def test_system_mode_keeps_the_system_malloc(tmp_path):
  out = _run(tmp_path, **{allocator.MODE_ENV: "system"})
  assert out.returncode == 0, out.stderr
  assert "allocator system" in out.stdout and "preload \n" in out.stdout


def test_bad_mode_is_a_one_line_error(tmp_path):
  out = _run(tmp_path, **{allocator.MODE_ENV: "jemalloc"})
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1].startswith("error: $VIMJAX_MALLOC='jemalloc'")
