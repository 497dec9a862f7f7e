"""bench/gpu_check.sh works the first time it meets a GPU: its dry run takes every step (install,
info, tests, report, bench, summary) on this machine with a tiny budget, so a broken step fails
here instead of on a GPU lease."""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_passes_every_step(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTEST_XDIST_WORKER")}
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=600)
    summary = (tmp_path / "summary.txt").read_text()
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}"
    for step in ("install", "info", "tests", "report", "bench"):
        assert any(line.split()[:2] == [step, "ok"] for line in summary.splitlines()), f"{step}:\n{summary}"
    assert "GPU CHECK: all steps passed" in summary
    assert "passed=" in summary and "passed=0 " not in summary, summary
    assert "_batch_sum_kernel" in (tmp_path / "report.txt").read_text()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8 and {"setup.log", "tests.log", "report.txt", "bench.log", "summary.txt"} <= set(files)
    assert any(name.endswith(".csv") for name in files), files
