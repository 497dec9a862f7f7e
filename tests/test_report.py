"""Every registered Triton kernel configuration compiles for sm_90a with no spills, and the
GEMM-shaped ones use Hopper's warpgroup MMA (HGMMA)."""
import json
import os
import subprocess
import sys

import pytest

from vlkernels.report import problems


@pytest.fixture(scope="module")
def report_rows():
    # A fresh process without TRITON_INTERPRET: the interpreter has no kernels to compile.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "vlkernels.report", "--json"], env=env,
                         capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert rows, f"the report printed no rows:\n{run.stdout}\n{run.stderr}"
    return rows


def test_every_kernel_is_reported(report_rows):
    kernels = {row["kernel"] for row in report_rows}
    assert {"_patch_embed_fwd_kernel", "_patch_embed_bwd_images_kernel", "_patch_embed_bwd_weight_kernel",
            "_batch_sum_kernel"} <= kernels


def test_no_kernel_spills_or_misses_hgmma(report_rows):
    bad = {f"{row['kernel']}[{row['variant']}]": problems(row) for row in report_rows if problems(row)}
    assert not bad, bad
    assert all(row["hgmma"] > 0 for row in report_rows if row["expects_hgmma"])


def test_problems_flags_spills_and_missing_hgmma():
    row = dict(kernel="k", variant="v", spill_bytes=8, expects_hgmma=True, hgmma=0)
    assert problems(row) == ["8 bytes spilled to local memory", "GEMM-shaped but its SASS has no HGMMA"]
