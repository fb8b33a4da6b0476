"""Defaults chosen by measurement (benchmarks/deltas/results/deltas-tune.md), importable without torch
so that the command line can print them."""

# OSD's distillation tune of the kept values (tune.py): steps on the validation windows, and Adam's learning rate.
TUNE_STEPS = 16
TUNE_LR = 3e-4  # 1e-3 and 3e-4 gained alike on code r = 1; 3e-3 overfit the 8 windows (test worse)
