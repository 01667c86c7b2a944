"""Log-log PNG of one fit: the trials as points, the law, its 95% bootstrap band."""
import io

from etils import epath
import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # Files only, no display.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from vimjax.sweep import fit as fit_lib  # pylint: disable=g-import-not-at-top,wrong-import-position


def plot_fit(path: str, x, y, result: dict, *, x_label: str, y_label: str,
             labels=None, title: str = "") -> None:
  """Writes the PNG at `path` (local or gs://)."""
  fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
  law = fit_lib.PowerLaw(result["a"], result["alpha"], result["c"])
  if "band" in result:
    grid, lo, hi = (np.asarray(v) for v in result["band"])
    ax.fill_between(grid, lo, hi, color="C0", alpha=0.2, label="95% bootstrap band")
  else:
    grid = np.geomspace(min(x), max(x), 64)
  ci = result.get("alpha_ci")
  ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
  offset = f" + {law.c:.3g}" if result["with_offset"] else ""
  ax.plot(grid, law(grid), color="C0",
          label=f"{law.a:.3g} x^-{law.alpha:.3f}{offset}\nalpha 95%{ci_text}, R^2 {result['r2']:.3f}")
  ax.scatter(x, y, color="C1", zorder=3, label="trials")
  for xi, yi, name in zip(x, y, labels or []):
    ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
  ax.set_xscale("log")
  ax.set_yscale("log")
  # Plain numbers on the (often less than a decade wide) loss axis, not 3 x 10^0.
  ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
  ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
  ax.set_xlabel(x_label)
  ax.set_ylabel(y_label)
  if title:
    ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7)
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  plt.close(fig)
  epath.Path(path).write_bytes(buf.getvalue())
