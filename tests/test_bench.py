"""The benchmark harness and CLI: a quick patch_embed run writes a valid CSV and PNG, the
torch.compile provider runs or is cleanly skipped, timings have the right units, and failures
of the vlkernels provider are reported (never hidden)."""
import csv
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from vlkernels.bench import OPS, load_cases
from vlkernels.bench import harness
from vlkernels.bench import patch_embed as patch_embed_bench
from vlkernels.bench.harness import CSV_COLUMNS, Case, Compiled, Inputs, QUICK_BUDGET, run_cases

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# The CLI with tqdm made unimportable (None in sys.modules makes `import tqdm` raise ImportError).
WITHOUT_TQDM = ("import sys; sys.modules.update({'tqdm': None, 'tqdm.auto': None}); "
                "from vlkernels.bench.cli import main; raise SystemExit(main(sys.argv[1:]))")


def run_cli(*args, timeout=300, hide_tqdm=False):
    """python -m vlkernels.bench ARGS from the repository root (without tqdm importable when
    hide_tqdm); returns the CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = ["-c", WITHOUT_TQDM] if hide_tqdm else ["-m", "vlkernels.bench"]
    return subprocess.run([sys.executable, *command, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def read_rows(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def check_quantiles(row):
    median, p20, p80 = (float(row[k]) for k in ("median", "p20", "p80"))
    where = f"{row['provider']} {row['mode']} {row['shape']} {row['metric']}"
    assert math.isfinite(median) and median > 0, f"{where}: median {median}"
    assert p20 <= median <= p80, f"{where}: p20 {p20} <= median {median} <= p80 {p80} fails"


@pytest.mark.parametrize("device", DEVICES)
def test_quick_cli_writes_csv_and_png(tmp_path, device):
    out = tmp_path / "results"
    # --no-progress needs no tqdm (the [bench] extra's): the run never imports it.
    proc = run_cli("--op", "patch_embed", "--quick", "--device", device, "--providers", "vlkernels,eager",
                   "--no-progress", "--out", str(out), "--min-samples", str(harness.MIN_SAMPLES), hide_tqdm=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "steps" not in proc.stderr, proc.stderr  # no progress lines either

    columns, rows = read_rows(out / "patch_embed.csv")
    assert columns == list(CSV_COLUMNS)
    assert not [r for r in rows if r["metric"] in ("error", "skipped")], rows
    shapes = {r["shape"] for r in rows}
    expected_presets = patch_embed_bench.GPU_QUICK_PRESETS if device == "cuda" else patch_embed_bench.CPU_QUICK_PRESETS
    assert shapes == {preset.label(batch) for preset, batch in expected_presets}
    times = [r for r in rows if r["metric"] == "time_ms"]
    # Every (shape, provider, mode) was timed exactly once.
    keys = [(r["shape"], r["provider"], r["mode"]) for r in times]
    assert sorted(keys) == sorted({(s, p, m) for s in shapes for p in ("vlkernels", "eager") for m in harness.MODES})
    for row in rows:
        assert row["op"] == "patch_embed" and row["dtype"] == ("bf16" if device == "cuda" else "fp32")
        assert row["versions"].startswith("torch=") and "triton=" in row["versions"]
        assert row["commit"] and row["device"]
        check_quantiles(row)
        if row["metric"] == "time_ms":  # enough samples behind every time for p20/p80 to be quantiles
            assert int(row["samples"]) >= harness.MIN_SAMPLES, row
    metrics = {r["metric"] for r in rows}
    assert {"time_ms", "tflops"} <= metrics
    if device == "cuda":
        assert "peak_mem_mb" in metrics
        if harness.roofline_for(torch.device("cuda")) is not None:
            pct = [float(r["median"]) for r in rows if r["metric"] == "pct_roofline"]
            assert pct and all(0 < p <= 100 for p in pct), pct  # spec-sheet peaks cannot be beaten

    png = out / "patch_embed.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    # The summary: each shape and mode with vlkernels' speed-up over eager.
    assert "vs eager" in proc.stdout
    for shape in shapes:
        assert sum(line.startswith(shape + " ") for line in proc.stdout.splitlines()) == len(harness.MODES), proc.stdout

    # --summarize reads the CSV back and prints the same table for the chosen modes.
    again = run_cli("--summarize", str(out / "patch_embed.csv"), "--modes", "forward,full")
    assert again.returncode == 0, again.stderr
    assert "forward" in again.stdout and "full" in again.stdout and "backward" not in again.stdout


def vit_quick_case():
    (case,) = [c for c in load_cases("patch_embed", torch.device("cpu"), quick=True) if c.shape.startswith("vit")]
    return case


def test_torch_compile_provider_runs_or_is_skipped_cleanly():
    case = vit_quick_case()
    result = run_cases([case], device=torch.device("cpu"), dtype=torch.float32, modes=["forward", "full"],
                       providers=["torch.compile"], budget=QUICK_BUDGET, progress=False)
    assert result.failures == []
    times = [r for r in result.rows if r["metric"] == "time_ms"]
    skipped = [r for r in result.rows if r["metric"] == "skipped"]
    if times:  # compiled (a C++ compiler is present): timed in both modes, matching eager
        assert not skipped
        assert sorted(r["mode"] for r in times) == ["forward", "full"]
        assert {r["provider"] for r in times} == {"torch.compile"}
        for row in times:
            check_quantiles(row)
    else:
        assert len(skipped) == 2 and all(r["note"] for r in skipped)


def test_compile_failure_is_recorded_as_skipped(monkeypatch):
    def broken_compile(self):
        def fail(*args, **kwargs):
            raise RuntimeError("InductorError: no working C++ compiler found\ndetails ...")
        return fail

    monkeypatch.setattr(Compiled, "fresh", broken_compile)
    result = run_cases([vit_quick_case()], device=torch.device("cpu"), dtype=torch.float32, modes=harness.MODES,
                       providers=["torch.compile", "eager"], budget=QUICK_BUDGET, progress=False)
    assert result.failures == []
    skipped = [r for r in result.rows if r["metric"] == "skipped"]
    assert [r["mode"] for r in skipped] == list(harness.MODES)
    assert all(r["provider"] == "torch.compile" and "no working C++ compiler" in r["note"] for r in skipped)
    assert len([r for r in result.rows if r["metric"] == "time_ms" and r["provider"] == "eager"]) == 3


def scale_case(providers, sleep_s=0.0):
    """A tiny op (y = 2x) whose providers can sleep, fail or be wrong."""
    def make(device, dtype):
        return Inputs((torch.randn(64, device=device, dtype=dtype).requires_grad_(),))

    def slow(x):
        time.sleep(sleep_s)
        return x * 2

    all_providers = {"vlkernels": slow, "eager": lambda x: x * 2, "wrong": lambda x: x * 3,
                     "broken": lambda x: (_ for _ in ()).throw(ValueError("refused this shape"))}
    return Case("scale", "N64", make, {name: all_providers[name] for name in providers},
                flops=lambda mode: 64.0, bytes=lambda mode, dtype: 512.0)


def test_timing_is_in_milliseconds():
    result = run_cases([scale_case(["vlkernels", "eager"], sleep_s=0.005)], device=torch.device("cpu"),
                       dtype=torch.float32, modes=["forward"], budget=QUICK_BUDGET, progress=False)
    times = {r["provider"]: r for r in result.rows if r["metric"] == "time_ms"}
    assert 4.5 <= times["vlkernels"]["median"] < 200, times["vlkernels"]  # a 5 ms sleep
    assert times["eager"]["median"] < times["vlkernels"]["median"]
    for row in times.values():
        check_quantiles(row)
    tflops = next(r for r in result.rows if r["metric"] == "tflops" and r["provider"] == "vlkernels")
    assert tflops["median"] == pytest.approx(64.0 / (times["vlkernels"]["median"] * 1e-3) / 1e12)
    check_quantiles(tflops)


def test_vlkernels_failures_are_errors_and_peer_failures_are_skips():
    case = scale_case(["eager", "broken"])
    case.providers["vlkernels"] = case.providers.pop("broken")  # the subject itself fails
    case.providers["wrong"] = lambda x: x * 3
    result = run_cases([case], device=torch.device("cpu"), dtype=torch.float32, modes=["forward"],
                       budget=QUICK_BUDGET, progress=False)
    by_provider = {(r["provider"], r["metric"]): r for r in result.rows}
    assert "refused this shape" in by_provider[("vlkernels", "error")]["note"]
    assert "differs from eager" in by_provider[("wrong", "error")]["note"]
    assert len(result.failures) == 2

    peer = scale_case(["vlkernels", "eager", "broken"])
    result = run_cases([peer], device=torch.device("cpu"), dtype=torch.float32, modes=["forward"],
                       budget=QUICK_BUDGET, progress=False)
    assert result.failures == [] and len(result.skipped) == 1
    assert any(r["provider"] == "broken" and r["metric"] == "skipped" for r in result.rows)


def test_summary_speedups():
    def row(provider, mode, ms):
        return dict(op="op", provider=provider, mode=mode, shape="S", dtype="bf16", metric="time_ms", median=ms,
                    p20=ms, p80=ms, device="dev", versions="v", commit="c", note="")

    rows = [row("vlkernels", "forward", 1.0), row("eager", "forward", 2.0), row("torch.compile", "forward", 1.5),
            row("vlkernels", "full", 4.0), row("eager", "full", 2.0)]
    assert harness.speedups(rows) == {("op", "S", "forward", "eager"): 2.0,
                                      ("op", "S", "forward", "torch.compile"): 1.5,
                                      ("op", "S", "full", "eager"): 0.5}
    table = harness.summary_table(rows)
    assert "2.00x" in table and "1.50x" in table and "0.50x" in table


def test_patch_embed_presets_and_flops():
    assert "patch_embed" in OPS
    labels = {preset.label(batch) for preset, batch in patch_embed_bench.GPU_PRESETS}
    for batch in (32, 128, 256):
        assert {f"vilt-b32-384x384-cls-pos-B{batch}", f"vilt-b32-384x640-cls-pos-B{batch}",
                f"vit-b16-224x224-B{batch}"} <= labels
    for preset, batch in patch_embed_bench.CPU_PRESETS + patch_embed_bench.CPU_QUICK_PRESETS:
        assert 2 <= batch <= 8

    vilt = patch_embed_bench.VILT_384
    case = Case("patch_embed", "x", patch_embed_bench._make_inputs(vilt, 2), {},
                flops=patch_embed_bench._flops(vilt, 2))
    inputs = case.make_inputs(torch.device("cpu"), torch.float32)
    images, weight, bias = inputs.args
    assert images.shape == (2, 3, 384, 384) and weight.shape == (768, 3, 32, 32) and bias.shape == (768,)
    assert inputs.kwargs["pos_embed"].shape == (1, 1 + 144, 768) and inputs.kwargs["cls_token"].shape == (1, 1, 768)
    assert len(inputs.grad_tensors()) == 5
    assert all(t.std() > 0 for t in inputs.grad_tensors())  # fresh random values, not a zero-filled tensor
    forward = 2 * 2 * 144 * 768 * 3 * 32 * 32
    assert case.flops("forward") == forward and case.flops("backward") == 2 * forward
    assert case.flops("full") == 3 * forward

    vit_inputs = patch_embed_bench._make_inputs(patch_embed_bench.VIT_224, 2)(torch.device("cpu"), torch.float32)
    assert vit_inputs.kwargs == {} and len(vit_inputs.grad_tensors()) == 3


def test_gpu_check_script_parses():
    script = os.path.join(REPO, "bench", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0


def test_model_step_cases_time_every_model_with_kernels_and_references():
    from vlkernels.bench import models as model_bench
    from vlkernels.models import MODELS

    cases = load_cases("model_step", torch.device("cpu"), quick=True)
    assert [case.shape for case in cases] == [f"{name}-tiny-B4" for name in MODELS]
    fewest = harness.TimingBudget(cpu_min_samples=harness.MIN_SAMPLES, cpu_min_run_time_s=0.0)
    result = run_cases(cases[:2], device=torch.device("cpu"), dtype=torch.float32, modes=("full",),
                       providers=("vlkernels", "eager"), budget=fewest, progress=False)
    assert not result.failures and not result.skipped, result.failures + result.skipped
    timed = {(r["shape"], r["provider"]) for r in result.rows if r["metric"] == "time_ms"}
    assert timed == {(case.shape, provider) for case in cases[:2] for provider in ("vlkernels", "eager")}
    assert model_bench.OP == "model_step"


def test_attention_flops_count_only_visible_pairs():
    from vlkernels.bench.attention import _visible_pairs

    key_mask = torch.tensor([[True, True, False, False], [True, True, True, False]])
    assert _visible_pairs(4, key_mask=key_mask) == (2 + 3) * 4  # every query sees the real keys
    # PrefixLM over 4 tokens: query i sees max(prefix, i + 1) keys; a prefix past the end is all of them.
    assert _visible_pairs(4, prefix_len=torch.tensor([0, 2, 9])) == (1 + 2 + 3 + 4) + (2 + 2 + 3 + 4) + 4 * 4


def test_roofline_matches_device_names_exactly(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    cuda = torch.device("cuda")
    for name, hbm in (("NVIDIA H100 80GB HBM3", 3.35), ("NVIDIA H200", 4.8), ("NVIDIA H100 PCIe", 2.0)):
        assert harness.roofline_for(cuda).hbm_tb_s == hbm
    for name in ("NVIDIA GH200 480GB", "NVIDIA H100 NVL", "NVIDIA H200 NVL", "NVIDIA A100-SXM4-80GB"):
        assert harness.roofline_for(cuda) is None, name
    assert harness.roofline_precision(torch.float32, tf32=True) == "tf32"
    assert harness.roofline_precision(torch.float32, tf32=False) == "fp32"
    assert harness.roofline_precision(torch.bfloat16, tf32=False) == "bf16"


def test_quick_budget_leaves_expensive_baselines_out_unless_named(monkeypatch):
    def no_compile(self):
        raise AssertionError("--quick must not compile an expensive baseline")

    monkeypatch.setattr(Compiled, "fresh", no_compile)
    case = scale_case(["vlkernels", "eager"])
    case.providers["torch.compile"] = Compiled(lambda x: x * 2)
    result = run_cases([case], device=torch.device("cpu"), dtype=torch.float32, modes=harness.MODES,
                       budget=QUICK_BUDGET, progress=False)
    assert result.failures == []
    skipped = [r for r in result.rows if r["metric"] == "skipped"]
    assert [(r["provider"], r["mode"]) for r in skipped] == [("torch.compile", m) for m in harness.MODES]
    assert all("left out of --quick" in r["note"] for r in skipped)
    timed = {(r["provider"], r["mode"]) for r in result.rows if r["metric"] == "time_ms"}
    assert timed == {(p, m) for p in ("vlkernels", "eager") for m in harness.MODES}
    # The full budget runs it; so does --quick when it is named (test_torch_compile_provider_runs_...).
    assert harness.FULL_BUDGET.expensive_baselines and not QUICK_BUDGET.expensive_baselines


def test_cpu_timing_warms_up_and_takes_enough_samples():
    calls = []

    def first_calls_slow():  # a one-time cost in the first calls (allocator growth, a first backward)
        calls.append(None)
        time.sleep(0.2 if len(calls) <= 2 else 0.004)

    timing = harness.time_call(first_calls_slow, torch.device("cpu"), QUICK_BUDGET)
    assert timing.samples >= max(QUICK_BUDGET.cpu_min_samples, harness.MIN_SAMPLES)
    assert 0.004 * 1e3 <= timing.median < 0.1 * 1e3 and timing.p80 < 0.1 * 1e3, timing  # warm-up not timed
    assert timing.p20 <= timing.median <= timing.p80

    slow = harness.TimingBudget(cpu_min_samples=50, cpu_min_run_time_s=10.0, cpu_max_run_time_s=0.01)
    start = time.perf_counter()
    timing = harness.time_call(lambda: time.sleep(0.01), torch.device("cpu"), slow)
    assert timing.samples == harness.MIN_SAMPLES and time.perf_counter() - start < 1.0  # capped, never below 5

    fast = harness.time_call(lambda: None, torch.device("cpu"), QUICK_BUDGET)
    assert fast.samples >= QUICK_BUDGET.cpu_min_samples and fast.median < 0.01  # blocks of calls: per-call ms


def test_summary_flags_full_far_from_forward_plus_backward():
    def row(provider, mode, ms, shape="S"):
        return dict(op="op", provider=provider, mode=mode, shape=shape, dtype="fp32", metric="time_ms",
                    median=ms, p20=ms, p80=ms, device="dev", versions="v", commit="c", note="", samples=9)

    rows = [row("vlkernels", "forward", 69.0), row("vlkernels", "backward", 5.7), row("vlkernels", "full", 800.0),
            row("eager", "forward", 10.0), row("eager", "backward", 20.0), row("eager", "full", 33.0)]
    assert harness.unbalanced_full(rows) == {("S", "vlkernels"): (800.0, 74.7)}
    table = harness.summary_table(rows)
    assert "full far from forward + backward" in table and "S vlkernels: full 800 ms" in table
    assert "S eager" not in table
    assert "far from" not in harness.summary_table(rows[3:])


def test_progress_without_tqdm_prints_plain_lines(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    monkeypatch.setattr(harness.Progress, "LINE_EVERY_S", 0.0)
    bar = harness.Progress(4)
    bar.describe("op S vlkernels forward")
    bar.advance(2)
    bar.close()
    assert "2/4 steps" in capsys.readouterr().err
    quiet = harness.Progress(4, enabled=False)
    quiet.advance(4)
    assert capsys.readouterr().err == ""
    cases = [scale_case(["vlkernels", "eager"]), scale_case(["vlkernels"])]
    assert harness.count_steps(cases, harness.MODES) == 9
    assert harness.count_steps(cases, ["forward"], providers=["eager"]) == 1


def test_plot_panels_stack_and_legend_clears_every_bar():
    from vlkernels.bench import plot

    shapes = [f"model{i}-tiny-B4" for i in range(9)]
    rows = [dict(op="model_step", provider=p, mode=m, shape=s, dtype="fp32", metric="time_ms", median=ms, p20=ms * 0.9,
                 p80=ms * 1.1, device="cpu AMD EPYC (2 threads)", versions="torch=2.13.0 triton=3.6.0",
                 commit="abcdef0-dirty", note="", samples=9)
            for s in shapes for m, ms in zip(harness.MODES, (5.0, 3.0, 9.0)) for p in ("vlkernels", "eager", "peer")]
    fig = plot.figure(rows)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        width, height = fig.get_size_inches() * plot.DPI
        assert width <= plot.PANEL_WIDTH_IN[1] * plot.DPI and height <= width * 1.5  # not a 5000 px strip
        assert len(fig.axes) == len(harness.MODES)
        legend = fig.legends[0].get_window_extent(renderer)
        title = fig._suptitle.get_window_extent(renderer)
        for ax in fig.axes:
            assert not legend.overlaps(ax.get_window_extent(renderer))
            assert not title.overlaps(ax.get_window_extent(renderer))
        assert not legend.overlaps(title)
        assert title.x0 >= 0 and title.x1 <= width  # the (wrapped) title fits the figure
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_quick_results_default_is_git_ignored():
    from vlkernels.bench import cli

    if subprocess.run(["git", "rev-parse"], cwd=REPO, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    folder = os.path.join(cli._results_root(), harness.device_slug(torch.device("cpu")) + "-quick")
    probe = subprocess.run(["git", "check-ignore", "-q", os.path.join(folder, "patch_embed.csv")], cwd=REPO)
    assert probe.returncode == 0, f"{folder} is not git-ignored"


def test_busy_machine_is_called_out(monkeypatch):
    from vlkernels.bench import cli

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.8, 3.0, 2.0))
    assert "load average 3.8 on 2 cores" in cli._busy_cpu(torch.device("cpu"))
    monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 0.3, 0.3))
    assert cli._busy_cpu(torch.device("cpu")) == ""


def test_min_samples_below_the_floor_is_refused(capsys):
    from vlkernels.bench import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--op", "patch_embed", "--quick", "--min-samples", str(harness.MIN_SAMPLES - 1)])
    assert exit_info.value.code == 2 and "too few for p20/p80" in capsys.readouterr().err
