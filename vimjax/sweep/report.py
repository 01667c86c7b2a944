"""WORKDIR/sweep.json -> results.csv, fit.json and fit_*.png.

Fits (each only where its axis varies over enough finished trials):
  L(N)  metric vs non-embedding params (at the largest D when D is swept too);
  L(C)  metric vs training FLOPs over the compute frontier (the trials no
        cheaper trial beats, as Kaplan et al. fit L(C_min));
  L(D)  metric vs tokens seen (at the largest N when N is swept too);
  N_opt(C), D_opt(C)  pure power laws over the frontier when N and D are both
        swept (the compute-optimal allocation);
  L(key) for every `fit_against` config key (e.g. model.patch_size).
A fit that cannot be made (too few distinct points) is listed with its reason.
"""
import json

from absl import logging
from etils import epath
import numpy as np

from vimjax.sweep import collect
from vimjax.sweep import fit as fit_lib
from vimjax.sweep import plot
from vimjax.sweep import spec

AXES = {"N": ("non_embedding_params", "non-embedding parameters N"),
        "C": ("train_flops", "training FLOPs C"),
        "D": ("tokens_seen", "tokens seen D")}


def _fit_and_plot(out: epath.Path, name: str, rows: list[dict], x_key: str, y_key: str,
                  x_label: str, y_label: str, with_offset: bool, bootstrap: int) -> dict:
  x = np.array([r[x_key] for r in rows], np.float64)
  y = np.array([r[y_key] for r in rows], np.float64)
  try:
    result = fit_lib.fit_power_law(x, y, with_offset=with_offset, bootstrap=bootstrap)
  except ValueError as e:
    logging.warning("fit %s skipped: %s", name, e)
    return {"skipped": str(e), "trials": [r["trial"] for r in rows]}
  png = out / f"fit_{name}.png"
  plot.plot_fit(str(png), x, y, result, x_label=x_label, y_label=y_label,
                labels=[r["trial"].split("-", 1)[-1] for r in rows],
                title=f"{y_label} vs {x_label}")
  result = {k: v for k, v in result.items() if k != "band"}
  return {**result, "x": x_key, "y": y_key, "trials": [r["trial"] for r in rows],
          "plot": str(png)}


def _at_max(rows: list[dict], key: str) -> list[dict]:
  top = max(r[key] for r in rows)
  return [r for r in rows if r[key] == top]


def collect_and_fit(workdir: str, bootstrap: int = 1000) -> dict:
  """Writes results.csv, fit.json and the plots; returns the final JSON line's dict."""
  manifest = spec.read_manifest(workdir)
  config = manifest["config"]
  out = epath.Path(workdir)
  extra = {}
  from vimjax.sweep import prepare  # pylint: disable=g-import-not-at-top
  if config["prepare"]:
    extra = prepare.planned_overrides(config["prepare"], workdir)
  rows = [collect.trial_row(t, config["base"], config["metric"], config["fit_against"], extra)
          for t in manifest["trials"]]
  collect.write_csv(rows, out / "results.csv")
  done = [r for r in rows if r["status"] == "finished"]
  excluded = [{"trial": r["trial"], "status": r["status"], "reason": r["reason"]}
              for r in rows if r["status"] != "finished"]
  for e in excluded:
    logging.warning("trial %s excluded from the fits: %s (%s)", e["trial"], e["status"],
                    e["reason"])
  metric, with_offset = config["metric"], config["with_offset"]
  fits = {}
  if done:
    swept = {axis: len({r[key] for r in done}) > 1 for axis, (key, _) in AXES.items()}
    both = swept["N"] and swept["D"]
    for axis, (key, label) in AXES.items():
      if axis == "C":
        front = [done[i] for i in fit_lib.pareto_frontier(
            np.array([r[key] for r in done]), np.array([r["metric"] for r in done]))]
        fits["L(C)"] = _fit_and_plot(out, "L_C", front, key, "metric", label, metric,
                                     with_offset, bootstrap)
      elif swept[axis]:
        other = "tokens_seen" if axis == "N" else "non_embedding_params"
        subset = _at_max(done, other) if both else done
        fits[f"L({axis})"] = _fit_and_plot(out, f"L_{axis}", subset, key, "metric", label,
                                           metric, with_offset, bootstrap)
    if both:
      front = [done[i] for i in fit_lib.pareto_frontier(
          np.array([r["train_flops"] for r in done]), np.array([r["metric"] for r in done]))]
      for axis in ("N", "D"):
        key, label = AXES[axis]
        # N_opt = k C^b is a pure power law: fit C -> 1/N so alpha reads as b.
        inverted = [{**r, "inverse": 1.0 / r[key]} for r in front]
        result = _fit_and_plot(out, f"{axis}_opt_C", inverted, "train_flops", "inverse",
                               "training FLOPs C", f"1 / compute-optimal {axis}", False,
                               bootstrap)
        if "alpha" in result:
          result["exponent"] = result["alpha"]  # N_opt ∝ C^exponent.
          result["exponent_ci"] = result.get("alpha_ci")
        fits[f"{axis}_opt(C)"] = result
    for key in config["fit_against"]:
      fits[f"L({key})"] = _fit_and_plot(out, f"L_{key.replace('.', '_')}", done, key, "metric",
                                        key, metric, with_offset, bootstrap)
  (out / "fit.json").write_text(json.dumps(
      {"metric": metric, "num_runs": len(done), "fits": fits, "excluded": excluded}, indent=2))
  summary = {"num_runs": len(done), "num_trials": len(rows), "excluded": excluded,
             "results": str(out / "results.csv"), "fit": str(out / "fit.json")}
  for name, result in fits.items():
    if "alpha" in result:
      summary[f"alpha_{name}"] = result["alpha"]
      summary[f"alpha_{name}_ci"] = result.get("alpha_ci")
      summary[f"r2_{name}"] = result["r2"]
  return summary
