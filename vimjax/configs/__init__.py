"""The experiment configs, packaged: one file per family, `get_config(variant)`.

The repository's top-level `configs` is a link to this directory, so README
commands (`--config=configs/parti.py:tiny`) work in a checkout; `find` maps the
same `configs/...` paths to the installed files elsewhere.
"""
import os

PREFIX = "configs/"


def find(path: str) -> str:
  """`configs/X.py[:variant]` -> this package's X.py when no such file is in the working
  directory (a non-editable install run from anywhere); other paths unchanged."""
  file, sep, variant = path.partition(":")
  if not file.startswith(PREFIX) or os.path.exists(file):
    return path
  packaged = os.path.join(os.path.dirname(os.path.abspath(__file__)), file[len(PREFIX):])
  return packaged + sep + variant if os.path.exists(packaged) else path
