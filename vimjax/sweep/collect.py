"""Each trial's status and result, with the x axes the fits use, into results.csv.

Status of a trial workdir:
  finished    train_result.json reached config.json's total_steps, not preempted;
  failed      the local launcher recorded a non-zero exit (the log's last error
              line is the reason);
  incomplete  checkpoints but no final result (preempted, killed, still running);
  pending     nothing trained yet.
A finished trial whose metric is missing or not finite is "broken". Only
finished trials enter the fits; every other one stays in results.csv with its
status and reason, and is listed in the final JSON line.

Axes: N = non-embedding parameters (model_stats.py), C = model FLOPs of a train
step (flops.py, as train_result.json records them) x steps, D = tokens seen =
steps x global batch x tokens per example.
"""
import csv
import io
import json
import math

from etils import epath
import ml_collections

STATUSES = ("finished", "failed", "broken", "incomplete", "pending")


def _read_json(path: epath.Path):
  return json.loads(path.read_text()) if path.exists() else None


def _last_error(workdir: epath.Path) -> str:
  log = workdir / "train.log"
  if not log.exists():
    return "no train.log"
  lines = [line.strip() for line in log.read_text().splitlines() if line.strip()]
  errors = [line for line in lines if "Error" in line or "error:" in line]
  return (errors or lines or ["empty train.log"])[-1][:300]


def trial_status(workdir: str) -> tuple[str, str]:
  """(status, reason) of a trial workdir (see the module docstring)."""
  path = epath.Path(workdir)
  result = _read_json(path / "train_result.json")
  config = _read_json(path / "config.json")
  if result is not None and config is not None:
    if result.get("step", 0) >= config["total_steps"] and not result.get("preempted"):
      return "finished", ""
  record = _read_json(path / "sweep_trial.json")
  if record is not None and record["returncode"] != 0:
    return "failed", f"exit {record['returncode']}: {_last_error(path)}"
  if (path / "checkpoints").exists():
    step = result.get("step") if result else None
    return "incomplete", f"stopped at step {step}" if step else "checkpoints, no result"
  return "pending", "not started"


def trial_row(trial: dict, base: str, metric: str, fit_against, extra_overrides: dict) -> dict:
  """One results.csv row: status, metric, N, C, D, the overrides and times."""
  from vimjax import checkpoint  # pylint: disable=g-import-not-at-top
  from vimjax import config_lib  # pylint: disable=g-import-not-at-top
  from vimjax import model_stats  # pylint: disable=g-import-not-at-top
  from vimjax.sweep import spec  # pylint: disable=g-import-not-at-top
  workdir = trial["workdir"]
  status, reason = trial_status(workdir)
  if (epath.Path(workdir) / "config.json").exists():
    config = checkpoint.load_workdir_config(workdir)
  else:  # Never started: the config its command would build.
    config = spec.load_config_file(base, flag="base")
    config = config_lib.override(config, **{**extra_overrides, **trial["overrides"]})
  params = _non_embedding_params(config)
  row = {"trial": trial["name"], "status": status, "reason": reason, "metric": None,
         "non_embedding_params": params, "steps": config.total_steps,
         "global_batch_size": config.global_batch_size,
         "tokens_seen": config.total_steps * config.global_batch_size
         * model_stats.tokens_per_example(config), "train_flops": None}
  for key in fit_against:
    row[key] = _get(config, key)
  for key, value in trial["overrides"].items():
    row.setdefault(key, value if not isinstance(value, (list, tuple)) else str(tuple(value)))
  result = _read_json(epath.Path(workdir) / "train_result.json") or {}
  if status == "finished":
    value = result.get(metric)
    row["train_flops"] = result["flops_per_step"] * result["step"]
    if not isinstance(value, (int, float)) or not math.isfinite(value):
      row["status"] = "broken"
      row["reason"] = (f"{metric}={value!r} is not a finite number" if metric in result else
                       f"train_result.json has no {metric!r} (keys: {sorted(result)[:12]})")
    else:
      row["metric"] = float(value)
  record = _read_json(epath.Path(workdir) / "sweep_trial.json") or {}
  attempts = record.get("attempts", [])
  row["wall_s"] = sum(a["wall_s"] for a in attempts) if attempts else None
  row["cpu_s"] = sum(a["cpu_s"] for a in attempts) if attempts else None
  return row


_PARAM_COUNTS = {}


def _non_embedding_params(config) -> int:
  """Cached by (task, model, data): the trials of a sweep share a handful of sizes."""
  from vimjax import model_stats  # pylint: disable=g-import-not-at-top
  from vimjax import tasks  # pylint: disable=g-import-not-at-top
  key = json.dumps([config.task, config.model.to_dict(), config.data.to_dict()], sort_keys=True,
                   default=str)
  if key not in _PARAM_COUNTS:
    _PARAM_COUNTS[key] = model_stats.count_non_embedding_params(tasks.abstract_params(config))
  return _PARAM_COUNTS[key]


def _get(config: ml_collections.ConfigDict, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def write_csv(rows: list[dict], path: epath.Path) -> None:
  columns = []
  for row in rows:
    columns += [k for k in row if k not in columns]
  out = io.StringIO()
  writer = csv.DictWriter(out, columns)
  writer.writeheader()
  writer.writerows(rows)
  path.write_text(out.getvalue())
