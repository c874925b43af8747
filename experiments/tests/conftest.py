"""The experiments' tests (at the smoke size): the repository root (mechanism files, the experiments
package) and tests/ (shared helpers and fixtures) on the path."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from toy import one_thread  # noqa: E402,F401
