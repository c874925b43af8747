"""experiments/odpo_demo.py end to end on a tiny random child: SFT, the PWRM (trained and calibrated),
online DPO, the held-out scores; a rerun reuses the SFT and PWRM stages."""
import json

import pytest
from toy import tiny_checkpoint

from experiments import odpo_demo as OD


@pytest.mark.slow
def test_demo_end_to_end_on_a_tiny_child(tmp_path, one_thread):
    child = tiny_checkpoint(tmp_path / "child")
    argv = ["--child", child, "--out", str(tmp_path / "o"), "--sft-steps", "1", "--pwrm-steps", "1",
            "--pwrm-problems", "4", "--calib-problems", "4", "--odpo-prompts", "4", "--eval-prompts", "4",
            "--steps", "1", "--batch-size", "4", "--micro-batch-size", "4", "--max-new-tokens", "8",
            "--max-prompt-tokens", "48", "--level", "easy"]
    assert OD.main(argv) == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["sft_model"]["win_rate_vs_start"] == 0.5 and 0 <= res["after_odpo"]["win_rate_vs_start"] <= 1
    assert res["calibration"]["temperature"] > 0 and len(res["odpo_steps"]) == 1
    done = json.loads((tmp_path / "o" / "pwrm" / "done.json").read_text())
    assert done["pairs"] > 0 and done["calibration"] == res["calibration"]
    assert OD.main(argv) == 0  # SFT and PWRM reused
