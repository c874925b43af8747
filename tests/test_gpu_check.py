"""benchmarks/gpu_check.sh: its CPU dry run goes through every step, writes the summary and the records
under OUT, and leaves the repository's records.jsonl as it was."""
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("install", "fetch", "tests", "kl", "train", "decode", "sft_fp8", "cascade")


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    records = os.path.join(ROOT, "benchmarks", "records.jsonl")
    before = open(records).read()
    r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry-run", str(tmp_path)],
                       capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in summary.splitlines()
            if line.startswith("| ") and not line.startswith("| step")}
    assert list(rows) == list(STEPS), summary
    may_skip = {"fetch"}  # the SmolLM2 file is fetched once with network; CI may not have it
    for name, status in rows.items():
        assert status == "ok" or (name in may_skip and status == "skipped"), (name, status, summary)
    new = [line for line in (tmp_path / "records.jsonl").read_text().splitlines() if line.strip()]
    assert len(new) == 4  # kl, train, decode, sft_fp8
    assert open(records).read() == before


@pytest.mark.slow
def test_a_step_past_its_budget_is_stopped(tmp_path):
    """The script's step() under a 1-second budget: the step is killed, reported as a timeout, and the
    summary is still written."""
    script = open(os.path.join(ROOT, "benchmarks", "gpu_check.sh")).read()
    head = script.split('if [ "$DRY" = 1 ]; then\n    step install')[0]
    probe = tmp_path / "probe.sh"
    head = head.replace('cd "$(dirname "$0")/.."', f'cd "{ROOT}"')
    probe.write_text(head + 'step sleepy 1 "echo none" -- sleep 60\nstep quick 5 "echo fine" -- true\n')
    r = subprocess.run(["bash", str(probe), "--dry-run", str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| sleepy | timeout |" in summary and "| quick | ok |" in summary
