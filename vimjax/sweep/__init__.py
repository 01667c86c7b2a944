"""Scaling-law sweeps: sweep file -> trials -> launcher -> results -> fits -> plots.

spec.py      the sweep file format, its trials and their train commands
prepare.py   stages a sweep runs once before its trials (e.g. tokenizer + tokens)
run.py       launch(): skip finished trials, run the prepare stage, start the rest
launchers.py local (subprocesses), tpu_vm and slurm (through launch/*.sh)
collect.py   each trial's status, result, parameter count, FLOPs and tokens
report.py    results.csv, the fits, fit.json and the plots
fit.py       L(x) = a x^-alpha + c in log space, bootstrap intervals
plot.py      log-log PNGs: points, fit, interval band
"""
