"""experiments/grpo_demo.py: the held-out split (questions unseen by SFT and GRPO)."""
import pytest
from toy import tiny_checkpoint

from experiments import grpo_demo as GD


def test_demo_held_out_questions_are_unseen_and_many():
    """The demo's default split: at least 500 held-out problems, every question distinct, none of them in
    the SFT or GRPO data (the held-out gain must be on unseen problems)."""
    dcfg = GD.DemoConfig()
    splits = GD.demo_problems(dcfg)
    ov = GD.split_overlap(splits)
    assert len(splits["held"]) == dcfg.eval_problems >= 500
    assert ov["distinct_questions"]["held"] == len(splits["held"])
    assert ov["held_in_sft"] == 0 and ov["held_in_grpo"] == 0
    seen = {p["question"] for p in splits["sft"] + splits["grpo"]}
    assert not any(p["question"] in seen for p in splits["held"])  # split_overlap counts what it claims
    leaky = dict(splits, grpo=splits["grpo"] + splits["held"][:3])
    assert GD.split_overlap(leaky)["held_in_grpo"] == 3


@pytest.mark.slow
def test_demo_end_to_end_on_a_tiny_child(tmp_path, one_thread):
    """SFT, GRPO, the held-out scores before and after and the table, on a tiny random child; a rerun reuses SFT."""
    import json

    child = tiny_checkpoint(tmp_path / "child")
    argv = ["--child", child, "--out", str(tmp_path / "g"), "--sft-steps", "1", "--sft-problems", "40",
            "--grpo-problems", "16", "--eval-problems", "8", "--steps", "1", "--batch-size", "16",
            "--micro-batch-size", "16", "--group-size", "4", "--max-new-tokens", "8", "--l-cache", "2"]
    assert GD.main(argv) == 0
    res = json.loads((tmp_path / "g" / "results.json").read_text())
    assert res["held_out_before"]["n"] == 8 and res["split_overlap"]["held_in_grpo"] == 0
    assert len(res["rollouts"]) == 1 and (tmp_path / "g" / "curves.png").stat().st_size > 0
    assert "after GRPO" in (tmp_path / "g" / "table.md").read_text()
