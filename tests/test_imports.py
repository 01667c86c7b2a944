"""The package's import structure: no cycles (function-level imports included),
task names only in vimjax/tasks/, binaries importable together.
"""
import ast
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "vimjax"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, modules) -> str | None:
  """The vimjax module `name` refers to (a module, else its package), or None."""
  while name and name not in modules:
    name = name.rpartition(".")[0]
  return name or None


def import_graph(modules) -> dict[str, set[str]]:
  """module -> the vimjax modules it imports anywhere in its body (functions too).

  `from P import x` counts P.x when that is a module, else P. Parent packages a
  submodule import initialises implicitly are not edges: only what the code names.
  """
  graph = {}
  for name, path in modules.items():
    edges = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
          base = f"{anchor}.{base}" if base else anchor
        targets = [f"{base}.{a.name}" for a in node.names]
      for target in targets:
        resolved = _resolve(target, modules) if target.startswith("vimjax") else None
        if resolved and resolved != name:
          edges.add(resolved)
    graph[name] = edges
  return graph


def find_cycle(graph) -> list[str] | None:
  """One import cycle [a, b, ..., a] of `graph`, or None (iterative DFS)."""
  state = {}  # 1: on the stack, 2: done.
  for start in sorted(graph):
    if state.get(start):
      continue
    stack = [(start, iter(sorted(graph[start])))]
    path = [start]
    state[start] = 1
    while stack:
      node, children = stack[-1]
      child = next(children, None)
      if child is None:
        stack.pop()
        path.pop()
        state[node] = 2
      elif state.get(child) == 1:
        return path[path.index(child):] + [child]
      elif not state.get(child):
        state[child] = 1
        path.append(child)
        stack.append((child, iter(sorted(graph.get(child, ())))))
  return None


def test_the_cycle_finder_finds_a_function_level_cycle(tmp_path):
  # The checker itself: a cycle through an import inside a function is found.
  graph = {"vimjax.a": {"vimjax.b"}, "vimjax.b": {"vimjax.c"}, "vimjax.c": {"vimjax.a"},
           "vimjax.d": {"vimjax.a"}}
  assert find_cycle(graph) == ["vimjax.a", "vimjax.b", "vimjax.c", "vimjax.a"]
  assert find_cycle({"vimjax.a": {"vimjax.b"}, "vimjax.b": set()}) is None
  pkg = tmp_path / "vimjax"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from vimjax import b\n")
  (pkg / "b.py").write_text("def f():\n  from vimjax import a\n  return a\n")
  modules = {_module_name_under(tmp_path, p): p for p in pkg.rglob("*.py")}
  assert find_cycle(import_graph(modules)) in (["vimjax.a", "vimjax.b", "vimjax.a"],
                                               ["vimjax.b", "vimjax.a", "vimjax.b"])


def _module_name_under(root, path) -> str:
  parts = path.relative_to(root).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycles():
  modules = _modules()
  graph = import_graph(modules)
  assert "vimjax.tasks" in graph["vimjax.train.loop"]  # The graph sees real edges.
  cycle = find_cycle(graph)
  assert cycle is None, " -> ".join(cycle)


def test_training_code_imports_no_binary():
  # Library modules never import an entry point (a module with a __main__ block).
  modules = _modules()
  binaries = {n for n, p in modules.items() if "__name__ == \"__main__\"" in p.read_text()}
  graph = import_graph(modules)
  for name, edges in graph.items():
    assert not edges & binaries, (name, sorted(edges & binaries))


# `config.task == "vim"`, `config.get("task") in (...)`, `("vim", "parti")`.
TASK_NAME = re.compile(r"""(\.task|get\(["']task["']\))\s*((==|!=)\s*["']|(not\s+)?in\b)"""
                       r"""|\(\s*["'](tokenizer|vim|parti|contrastive)["']\s*,""")


def test_no_task_name_branches_outside_the_tasks_package():
  offenders = []
  for name, path in _modules().items():
    if name.startswith(("vimjax.tasks", "vimjax.configs")):
      continue
    for i, line in enumerate(path.read_text().splitlines(), 1):
      if TASK_NAME.search(line.split("#")[0]):
        offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
  assert not offenders, "\n".join(offenders)


@pytest.mark.slow
def test_every_module_imports_in_a_fresh_interpreter_binaries_together():
  # One process importing every module, binaries' __main__ included: an import
  # that only works in some order, or two modules defining the same flag at
  # import, fails here.
  names = sorted(_modules(), key=lambda n: (n.count("."), n), reverse=True)
  code = "import importlib\nfor n in %r:\n  importlib.import_module(n)\nprint('ok')" % names
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, timeout=600, check=False)
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
