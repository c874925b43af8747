"""experiments/sft_demo.py: plain SFT against distillation SFT, end to end on tiny random checkpoints."""
import json

import pytest
from toy import tiny_checkpoint

from experiments import sft_demo as SD


@pytest.mark.slow
def test_demo_end_to_end_on_tiny_checkpoints(tmp_path):
    """The demo's whole path (parent SFT, child plain and KL SFT, every measure, the table) on two tiny
    random checkpoints; a rerun reuses the finished stages."""
    parent = tiny_checkpoint(tmp_path / "parent", dim=96, n_layers=3, hidden_dim=192)
    child = tiny_checkpoint(tmp_path / "child")
    argv = ["--parent", parent, "--child", child, "--out", str(tmp_path / "out"), "--steps", "3", "--batch", "4",
            "--math", "12", "--qa", "4", "--held-math", "4", "--held-qa", "2", "--seq-len", "160"]
    assert SD.main(argv) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    names = list(res["models"])
    assert len(names) == 5 and "KL" in names[-1]
    for m in res["models"].values():
        assert m["math"]["n"] == 4 and m["qa"]["n"] == 2 and m["held_out_ce"] > 0
    assert res["models"][names[-1]]["train"]["teacher"] and not res["models"][names[-2]]["train"]["teacher"]
    assert (tmp_path / "out" / "table.md").read_text().count("\n") == 7
    assert SD.main(argv) == 0  # finished stages are reused
