"""Experiments, demos and ablations: they import the mechanism files at the top level; no mechanism file
imports them. Run one as `python experiments/NAME.py` (or `python -m experiments.NAME`) from the repository."""
