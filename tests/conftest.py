"""Shared fixtures (defined in toy.py, which the experiments' tests import too)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from toy import one_thread  # noqa: E402,F401
