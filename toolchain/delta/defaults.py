"""Defaults chosen by measurement (benchmarks/deltas/results/deltas-tune.md), importable without torch
so that the command line can print them."""

# OSD's distillation tune of the kept values (tune.py): steps on the validation windows, and Adam's learning rate.
TUNE_STEPS = 16
TUNE_LR = 1e-3
