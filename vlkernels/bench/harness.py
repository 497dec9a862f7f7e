"""The benchmark harness: times every provider of an op on each preset, in each mode.

A :class:`Case` is one op at one preset shape: a factory that makes fresh random inputs on a
device and dtype, the providers to time (name -> callable with the op's signature), and the
op's FLOP and minimal-byte counts per mode (for TFLOP/s and % of the roofline).

Modes (inputs that require grad are the ones differentiated):
  forward   one call of the provider, grad enabled (the training forward, saving what backward needs)
  backward  the forward runs once; only ``torch.autograd.grad(out, inputs, grad_out, retain_graph=True)`` is timed
  full      forward + backward

Timing: on CUDA ``triton.testing.do_bench`` (median with 20/80 % quantiles, L2 flushed per
call by do_bench) and peak memory of one call from ``torch.cuda.max_memory_allocated``; on
CPU ``torch.utils.benchmark.Timer.blocked_autorange`` (median and 20/80 % quantiles of its
per-call times). Every measurement becomes rows of a long-format table (:data:`CSV_COLUMNS`).

A provider that cannot run (torch.compile without a C++ compiler, a peer that refuses a
shape, out of memory) is recorded as ``skipped`` with the reason; a failing ``vlkernels``
provider, or one whose output disagrees with the eager reference, is recorded as ``error``
and makes the run fail (:attr:`BenchResult.failures`).
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch

MODES = ("forward", "backward", "full")
METRICS = ("time_ms", "peak_mem_mb", "tflops", "pct_roofline")
# "note" is the one column beyond the design's list: the reason of a skipped or error row.
# "samples" (how many timed samples are behind median/p20/p80) follows it.
CSV_COLUMNS = ("op", "provider", "mode", "shape", "dtype", "metric", "median", "p20", "p80",
               "device", "versions", "commit", "note", "samples")
SUBJECT = "vlkernels"  # the provider whose speed-up over the others the summary reports
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


# ----------------------------------------------------------------------------------------------
# Cases and providers
# ----------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """The arguments of one call: ``provider(*args, **kwargs)``. Tensors that require grad
    (positional first, then keyword in order) are the ones the backward differentiates."""

    args: tuple
    kwargs: dict = field(default_factory=dict)

    def grad_tensors(self) -> list[torch.Tensor]:
        values = list(self.args) + list(self.kwargs.values())
        return [v for v in values if isinstance(v, torch.Tensor) and v.requires_grad]


class Compiled:
    """The ``torch.compile`` provider of a reference function, compiled afresh for each case.

    ``fresh()`` resets dynamo's caches first so that each preset gets its own static-shape
    (``dynamic=False``) graph and the recompile limit is never reached across many presets.
    Compilation itself happens at the first call, inside the harness's warm-up, where a
    failure (e.g. no C++ compiler for inductor's CPU code) is recorded as a skip.

    ``expensive``: compiling takes tens of seconds per preset on a CPU (a forward and a
    backward graph through inductor's C++ codegen), so a budget without expensive baselines
    (--quick) leaves it out unless it is asked for by name.
    """

    expensive = True

    def __init__(self, fn: Callable, **compile_kwargs):
        self.fn = fn
        self.compile_kwargs = {"dynamic": False, **compile_kwargs}

    def fresh(self) -> Callable:
        torch._dynamo.reset()
        # The backward mode replays one graph's backward (retain_graph=True), which compiled
        # graphs refuse while they donate their saved buffers to the backward.
        torch._functorch.config.donated_buffer = False
        return torch.compile(self.fn, **self.compile_kwargs)


def expensive(fn: Callable) -> Callable:
    """Mark a provider as an expensive baseline (like :class:`Compiled`): --quick leaves it out
    unless it is asked for by name. Returns ``fn``."""
    fn.expensive = True
    return fn


def standard_providers(vlkernels_fn: Callable, reference_fn: Callable, peers: Optional[dict] = None) -> dict:
    """The providers every op has: vlkernels, the eager reference, torch.compile(reference), then peers."""
    providers = {SUBJECT: vlkernels_fn, "eager": reference_fn, "torch.compile": Compiled(reference_fn)}
    providers.update(peers or {})
    return providers


@dataclass
class Case:
    """One op at one preset shape.

    make_inputs(device, dtype) -> Inputs: fresh random inputs (never zeros).
    providers: name -> callable(*args, **kwargs) -> Tensor or tuple of Tensors (or a :class:`Compiled`).
    flops(mode) / bytes(mode, dtype): work and minimal memory traffic of one call in that mode,
    for TFLOP/s and % of roofline; None (or a function returning None) leaves those metrics out.
    """

    op: str
    shape: str
    make_inputs: Callable[[torch.device, torch.dtype], Inputs]
    providers: dict
    flops: Optional[Callable[[str], Optional[float]]] = None
    bytes: Optional[Callable[[str, torch.dtype], Optional[float]]] = None
    # Relative error (Frobenius) of a provider's forward output against "eager" beyond which it is wrong.
    tolerance: Optional[Callable[[torch.dtype], float]] = None
    # Whether vlkernels' fp32 dots run in tf32 now (the flag the op follows), for the roofline.
    tf32: Callable[[], bool] = lambda: torch.backends.cuda.matmul.allow_tf32


def default_tolerance(dtype: torch.dtype) -> float:
    # Loose on purpose: a sanity check that the timed code computes the op (tests prove precision).
    # 16-bit outputs round at ~4e-3 (bf16); fp32 GEMMs on GPUs run in tf32 (~1e-3).
    return 3e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-2


# ----------------------------------------------------------------------------------------------
# Environment: device, versions, commit, roofline
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Roofline:
    dense_tflops: dict  # precision ("bf16", "fp16", "tf32", "fp32" = IEEE) -> peak dense TFLOP/s
    hbm_tb_s: float


# Spec-sheet peaks (dense, no sparsity), by the exact name torch.cuda.get_device_name() reports:
# a GH200, an H100 NVL or an H200 NVL has other clocks and memory, so a name not listed gets no
# roofline rather than a neighbour's.
_HOPPER_SXM = {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0}
_ROOFLINES = {
    "NVIDIA H100 80GB HBM3": Roofline(_HOPPER_SXM, 3.35),  # H100 SXM5
    "NVIDIA H100 PCIe": Roofline({"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0}, 2.0),
    "NVIDIA H200": Roofline(_HOPPER_SXM, 4.8),  # H200 SXM
}


def roofline_for(device: torch.device) -> Optional[Roofline]:
    if device.type != "cuda":
        return None
    return _ROOFLINES.get(torch.cuda.get_device_name(device))


def roofline_precision(dtype: torch.dtype, tf32: bool) -> str:
    """The precision a dtype's dots run in: fp32 runs on tf32 tensor cores only where allowed."""
    if dtype == torch.float32:
        return "tf32" if tf32 else "fp32"
    return DTYPE_NAMES[dtype]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {_cpu_model()} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """A folder name for the device: 'nvidia-h100-80gb-hbm3', 'cpu-amd-epyc'."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu {_cpu_model()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or device.type


def versions() -> str:
    parts = [f"torch={torch.__version__.split('+')[0]}"]
    try:
        import triton

        parts.append(f"triton={triton.__version__}")
    except Exception:  # triton missing or broken: the versions string just says so
        parts.append("triton=none")
    if torch.version.cuda:
        parts.append(f"cuda={torch.version.cuda}")
    return " ".join(parts)


def git_commit() -> str:
    """Short HEAD of the repository holding vlkernels (with -dirty when tracked files changed), else 'unknown'."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0 or not head.stdout.strip():
            return "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=here, capture_output=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.returncode == 1 else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TimingBudget:
    """How long to measure each (provider, mode).

    CUDA: do_bench's warmup/rep in ms. CPU: timed samples until both ``cpu_min_samples`` samples
    and ``cpu_min_run_time_s`` are reached (a sample is one call, or the mean of a block of
    calls lasting about ``cpu_block_s`` for calls far shorter than that), stopping early only
    past ``cpu_max_run_time_s`` with at least :data:`MIN_SAMPLES`. Every row has at least
    MIN_SAMPLES samples, so its p20 and p80 are quantiles of real spread, not copies of one
    time. ``expensive_baselines``: whether providers marked expensive (torch.compile, whose
    compile alone takes tens of seconds on a CPU) run when not asked for by name.
    """

    cuda_warmup_ms: int = 25
    cuda_rep_ms: int = 100
    cpu_min_run_time_s: float = 0.5
    cpu_min_samples: int = 20
    cpu_max_run_time_s: float = 10.0
    cpu_block_s: float = 0.002
    expensive_baselines: bool = True


# The fewest samples behind any time (CPU and CUDA): with fewer, p20 and p80 say nothing.
MIN_SAMPLES = 5
FULL_BUDGET = TimingBudget()
QUICK_BUDGET = TimingBudget(cuda_warmup_ms=5, cuda_rep_ms=20, cpu_min_run_time_s=0.05, cpu_min_samples=10,
                            cpu_max_run_time_s=1.5, expensive_baselines=False)


@dataclass(frozen=True)
class Timing:
    """Per-call time of one (provider, mode) in ms: median, 20 % and 80 % quantiles, sample count."""

    median: float
    p20: float
    p80: float
    samples: int


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of sorted values (numpy's default method)."""
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _timing(times_ms: Sequence[float]) -> Timing:
    ordered = sorted(times_ms)
    return Timing(_quantile(ordered, 0.5), _quantile(ordered, 0.2), _quantile(ordered, 0.8), len(ordered))


def cpu_samples_ms(fn: Callable[[], object], budget: TimingBudget) -> list[float]:
    """Per-call times of ``fn`` on the CPU, in ms, after two untimed warm-up calls.

    The warm-up matters: the first calls of a mode pay one-time costs (the allocator growing
    to the mode's working set, lazily built state, a graph's first backward) that would
    otherwise sit in the few samples of a slow call. A plain perf_counter loop rather than
    torch.utils.benchmark's blocked_autorange: that one stops after ``min_run_time`` however
    few samples it has (a 100 ms call gave one sample, p20 = p80 = median), and its timeit
    adds warm-up calls to every block.
    """
    fn()
    begin = time.perf_counter()
    fn()
    once = time.perf_counter() - begin
    number = max(1, int(budget.cpu_block_s / max(once, 1e-9)))
    times: list[float] = []
    start = time.perf_counter()
    while True:
        begin = time.perf_counter()
        for _ in range(number):
            fn()
        end = time.perf_counter()
        times.append((end - begin) / number * 1e3)
        elapsed = end - start
        if len(times) >= budget.cpu_min_samples and elapsed >= budget.cpu_min_run_time_s:
            return times
        if len(times) >= MIN_SAMPLES and elapsed >= budget.cpu_max_run_time_s:
            return times


def time_call(fn: Callable[[], object], device: torch.device, budget: TimingBudget) -> Timing:
    """The per-call :class:`Timing` of ``fn`` in ms (do_bench on CUDA, :func:`cpu_samples_ms` on CPU)."""
    if device.type == "cuda":
        import triton.testing

        rep = budget.cuda_rep_ms
        while True:  # do_bench takes rep / (estimated time) samples: lengthen rep until there are enough
            times = triton.testing.do_bench(fn, warmup=budget.cuda_warmup_ms, rep=rep, return_mode="all")
            if len(times) >= MIN_SAMPLES or rep > 100 * budget.cuda_rep_ms:
                return _timing(times)
            rep *= 2 * MIN_SAMPLES / max(1, len(times))
    return _timing(cpu_samples_ms(fn, budget))


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak allocated CUDA memory during one call, in MiB (inputs and retained graphs included), else None."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    del result
    return torch.cuda.max_memory_allocated(device) / 2**20


def _outputs(result) -> tuple:
    """A provider's result as a tuple of tensors (providers return a tensor or a tuple of them)."""
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def _mode_closure(fn: Callable, inputs: Inputs, mode: str, grad_out: Optional[tuple]) -> Callable[[], object]:
    grads = inputs.grad_tensors()
    if mode == "forward":
        return lambda: fn(*inputs.args, **inputs.kwargs)
    if mode == "backward":
        out = _outputs(fn(*inputs.args, **inputs.kwargs))
        return lambda: torch.autograd.grad(out, grads, grad_out, retain_graph=True)
    if mode == "full":
        return lambda: torch.autograd.grad(_outputs(fn(*inputs.args, **inputs.kwargs)), grads, grad_out)
    raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")


def _reason(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".strip().rstrip(":")
    return text[:300]


def _rel_error(actual: tuple, expected: tuple) -> float:
    """The largest relative error over the outputs (inf when their number or shapes differ)."""
    if len(actual) != len(expected) or any(a.shape != e.shape for a, e in zip(actual, expected)):
        return float("inf")
    errors = [((a.detach().float() - e.detach().float()).norm() / e.detach().float().norm().clamp_min(1e-30)).item()
              for a, e in zip(actual, expected)]
    return max(errors)


# ----------------------------------------------------------------------------------------------
# Running cases
# ----------------------------------------------------------------------------------------------
@dataclass
class BenchResult:
    rows: list = field(default_factory=list)  # dicts with CSV_COLUMNS
    failures: list = field(default_factory=list)  # messages of error rows (a vlkernels failure)
    skipped: list = field(default_factory=list)  # messages of skipped rows


class _Recorder:
    def __init__(self, result: BenchResult, common: dict):
        self.result = result
        self.common = common

    def row(self, case: Case, provider: str, mode: str, metric: str, values=(None, None, None), note: str = "",
            samples: Optional[int] = None):
        median, p20, p80 = values
        self.result.rows.append(dict(self.common, op=case.op, provider=provider, mode=mode, shape=case.shape,
                                     metric=metric, median=median, p20=p20, p80=p80, note=note, samples=samples))

    def skip(self, case: Case, provider: str, mode: str, reason: str, error: Optional[bool] = None):
        if error is None:
            error = provider == SUBJECT  # the subject must run everything it is asked to
        self.row(case, provider, mode, "error" if error else "skipped", note=reason)
        message = f"{case.op} {case.shape} {provider} {mode}: {reason}"
        (self.result.failures if error else self.result.skipped).append(message)


def _free_cuda(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Progress:
    """One progress bar over a whole run: a step per (case, provider, mode) measurement, with
    elapsed time and ETA. tqdm draws it when installed (the [bench] extra); without tqdm, a
    plain line on stderr every few seconds; nothing (and no tqdm import) when disabled."""

    LINE_EVERY_S = 5.0

    def __init__(self, total: int, enabled: bool = True, desc: str = "vlkernels-bench"):
        self.total, self.done, self.enabled, self.desc = total, 0, enabled, desc
        self.started = self.last_line = time.monotonic()
        self._bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)
        self.text = ""

    def describe(self, text: str) -> None:
        self.text = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=True)

    def advance(self, steps: int = 1) -> None:
        self.done += steps
        if self._bar is not None:
            self._bar.update(steps)
        elif self.enabled and time.monotonic() - self.last_line >= self.LINE_EVERY_S:
            self.last_line = time.monotonic()
            elapsed = self.last_line - self.started
            eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
            print(f"{self.desc}: {self.done}/{self.total} steps, {elapsed:.0f} s elapsed, ETA {eta:.0f} s "
                  f"({self.text})", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def count_steps(cases: Iterable[Case], modes: Sequence[str], providers: Optional[Sequence[str]] = None) -> int:
    """The progress steps of running ``cases``: one per (case, provider, mode)."""
    return sum(len(modes) for case in cases for name in case.providers if providers is None or name in providers)


@contextlib.contextmanager
def _quiet_compilers():
    """torch.compile's warnings (graph breaks, recompiles, inductor's autotuning notes) go to
    stderr once per compile and would bury the progress bar: a failed compile is recorded as a
    skip with its reason, so the run keeps them out of the terminal."""
    import logging

    names = ("torch._dynamo", "torch._inductor", "torch.fx.experimental.symbolic_shapes")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"torch\._(dynamo|inductor|functorch)")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def run_cases(
    cases: Iterable[Case],
    *,
    device: torch.device,
    dtype: torch.dtype,
    modes: Sequence[str] = MODES,
    providers: Optional[Sequence[str]] = None,
    budget: TimingBudget = FULL_BUDGET,
    progress: "bool | Progress" = True,
    seed: int = 0,
    deadline: Optional[float] = None,
) -> BenchResult:
    """Time each case's providers (all, or those named in ``providers``) in each mode.

    ``progress``: a :class:`Progress` shared over several calls (the CLI's one bar), or whether
    to show a bar of this call's own. ``deadline`` (a ``time.monotonic()`` value): cases not
    started by then are recorded as skipped ("time limit"), so a run under a fixed budget
    still writes what it measured.
    """
    cases = list(cases)
    own_bar = not isinstance(progress, Progress)
    bar = Progress(count_steps(cases, modes, providers), enabled=bool(progress)) if own_bar else progress
    result = BenchResult()
    recorder = _Recorder(result, dict(dtype=DTYPE_NAMES.get(dtype, str(dtype)), device=device_description(device),
                                      versions=versions(), commit=git_commit()))
    with _quiet_compilers():
        for index, case in enumerate(cases):
            _run_case(case, index, recorder, bar, device=device, dtype=dtype, modes=modes, providers=providers,
                      budget=budget, seed=seed, deadline=deadline)
    if own_bar:
        bar.close()
    return result


def _run_case(case: Case, index: int, recorder: _Recorder, bar: Progress, *, device, dtype, modes, providers,
              budget, seed, deadline) -> None:
    result = recorder.result
    roof = roofline_for(device)
    wanted = [n for n in case.providers if providers is None or n in providers]
    if deadline is not None and time.monotonic() > deadline:
        for name in wanted:
            for mode in modes:
                recorder.skip(case, name, mode, "time limit reached before this case started", error=False)
        bar.advance(len(wanted) * len(modes))
        return
    torch.manual_seed(seed + index)  # reproducible, and different for each case
    bar.describe(f"{case.op} {case.shape} inputs")
    try:
        inputs = case.make_inputs(device, dtype)
        # The eager output is the yardstick every other provider's forward is checked against.
        expected = (tuple(t.detach() for t in _outputs(case.providers["eager"](*inputs.args, **inputs.kwargs)))
                    if "eager" in case.providers else None)
    except Exception as error:  # noqa: BLE001 - e.g. the inputs of the largest preset do not fit
        for name in wanted:
            for mode in modes:
                recorder.skip(case, name, mode, f"inputs/reference failed: {_reason(error)}", error=False)
        bar.advance(len(wanted) * len(modes))
        _free_cuda(device)
        return
    grads = inputs.grad_tensors()
    grad_out = tuple(torch.randn_like(t) for t in expected) if expected is not None and grads else None
    case_modes = [m for m in modes if m == "forward" or grads]  # no backward for an op without grads
    tolerance = (case.tolerance or default_tolerance)(dtype)
    for name in wanted:
        provider = case.providers[name]
        bar.describe(f"{case.op} {case.shape} {name}")
        bar.advance(len(modes) - len(case_modes))
        if getattr(provider, "expensive", False) and not budget.expensive_baselines and providers is None:
            for mode in case_modes:
                recorder.skip(case, name, mode, "left out of --quick (an expensive baseline: the full run times it)",
                              error=False)
            bar.advance(len(case_modes))
            continue
        try:
            fn = provider.fresh() if isinstance(provider, Compiled) else provider
            # Warm-up, grad enabled like the timed calls: compiles Triton kernels and the
            # torch.compile graph (forward and backward) outside the timing.
            out = _outputs(fn(*inputs.args, **inputs.kwargs))
            if grads:
                if grad_out is None:
                    grad_out = tuple(torch.randn_like(t) for t in out)
                torch.autograd.grad(out, grads, grad_out)
            out = tuple(t.detach() for t in out)
        except Exception as error:  # noqa: BLE001 - any failure of a provider is a result, not a crash
            for mode in case_modes:
                recorder.skip(case, name, mode, _reason(error))
            bar.advance(len(case_modes))
            _free_cuda(device)
            continue
        if expected is not None and name != "eager":
            err = _rel_error(out, expected)
            if not err <= tolerance:
                message = f"output differs from eager: relative error {err:.3g} > {tolerance:.3g}"
                recorder.row(case, name, "forward", "error", note=message)
                result.failures.append(f"{case.op} {case.shape} {name}: {message}")
        del out
        for mode in case_modes:
            bar.describe(f"{case.op} {case.shape} {name} {mode}")
            try:
                call = _mode_closure(fn, inputs, mode, grad_out)
                timing = time_call(call, device, budget)
                memory = peak_memory_mb(call, device)
                del call
            except Exception as error:  # noqa: BLE001 - e.g. out of memory at the largest preset
                recorder.skip(case, name, mode, _reason(error))
                bar.advance()
                _free_cuda(device)
                continue
            bar.advance()
            median, p20, p80 = timing.median, timing.p20, timing.p80
            recorder.row(case, name, mode, "time_ms", (median, p20, p80), samples=timing.samples)
            if memory is not None:
                recorder.row(case, name, mode, "peak_mem_mb", (memory, memory, memory), samples=1)
            flops = case.flops(mode) if case.flops else None
            if flops:
                # Throughput quantiles mirror the time quantiles: p20 of TFLOP/s is at p80 of time.
                tflops = tuple(flops / (t * 1e-3) / 1e12 for t in (median, p80, p20))
                recorder.row(case, name, mode, "tflops", tflops, samples=timing.samples)
            nbytes = case.bytes(mode, dtype) if case.bytes else None
            peak = roof.dense_tflops.get(roofline_precision(dtype, case.tf32())) if roof is not None else None
            if peak and flops and nbytes:
                # Roofline time: the larger of compute-bound and bandwidth-bound time at peak.
                ideal_ms = max(flops / (peak * 1e12), nbytes / (roof.hbm_tb_s * 1e12)) * 1e3
                pct = tuple(100 * ideal_ms / t for t in (median, p80, p20))
                recorder.row(case, name, mode, "pct_roofline", pct, samples=timing.samples)
        del fn
    del inputs, expected, grad_out, grads
    _free_cuda(device)


# ----------------------------------------------------------------------------------------------
# Output: CSV and summary
# ----------------------------------------------------------------------------------------------
def write_csv(rows: Sequence[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else (f"{row[k]:.6g}" if isinstance(row[k], float)
                                                                  else row[k])) for k in CSV_COLUMNS})


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in ("median", "p20", "p80"):
            row[key] = float(row[key]) if row.get(key) not in (None, "") else None
        row["samples"] = int(row["samples"]) if row.get("samples") not in (None, "") else None
    return rows


def ordered_unique(values: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for v in values:
        seen.setdefault(v, None)
    return list(seen)


def provider_order(names: Iterable[str]) -> list[str]:
    names = ordered_unique(names)
    first = [n for n in (SUBJECT, "eager", "torch.compile") if n in names]
    return first + [n for n in names if n not in first]


def summary_table(rows: Sequence[dict], modes: Optional[Sequence[str]] = None) -> str:
    """Per op: one line per (shape, mode) with each provider's median ms and vlkernels' speed-up
    over each other provider (other time / vlkernels time; > 1 means vlkernels is faster)."""
    lines = []
    times = [r for r in rows if r["metric"] == "time_ms" and (modes is None or r["mode"] in modes)]
    for op in ordered_unique(r["op"] for r in rows):
        op_rows = [r for r in times if r["op"] == op]
        if not op_rows:
            continue
        providers = provider_order(r["provider"] for r in op_rows)
        others = [p for p in providers if p != SUBJECT]
        median = {(r["shape"], r["mode"], r["provider"]): float(r["median"]) for r in op_rows}
        shape_width = max(len("shape"), *(len(r["shape"]) for r in op_rows))
        header = f"{'shape':<{shape_width}}  {'mode':<8}" + "".join(f"  {p:>13}" for p in providers)
        if SUBJECT in providers:
            header += "  |" + "".join(f"  {'vs ' + p:>16}" for p in others)
        first = op_rows[0]
        lines += ["", f"{op}  [{first['dtype']}, {first['device']}]  median ms; speed-up = other / {SUBJECT}", header,
                  "-" * len(header)]
        for shape in ordered_unique(r["shape"] for r in op_rows):
            for mode in [m for m in MODES if any((shape, m, p) in median for p in providers)]:
                cells = [median.get((shape, mode, p)) for p in providers]
                line = f"{shape:<{shape_width}}  {mode:<8}" + "".join(
                    f"  {c:>13.4g}" if c is not None else f"  {'-':>13}" for c in cells)
                if SUBJECT in providers:
                    mine = median.get((shape, mode, SUBJECT))
                    line += "  |"
                    for p in others:
                        theirs = median.get((shape, mode, p))
                        line += f"  {theirs / mine:>15.2f}x" if mine and theirs else f"  {'-':>16}"
                lines.append(line)
        flagged = unbalanced_full(op_rows)
        if flagged:
            lines.append(f"  ! full far from forward + backward (outside {1 / FULL_SUM_SPREAD:.2f}-"
                         f"{FULL_SUM_SPREAD:.2f}x): a timing to distrust")
            for (shape, provider), (full, parts) in flagged.items():
                lines.append(f"    {shape} {provider}: full {full:.4g} ms, forward + backward {parts:.4g} ms "
                             f"({full / parts:.2f}x)")
    notes = [r for r in rows if r["metric"] in ("skipped", "error") and (modes is None or r["mode"] in modes)]
    if notes:
        lines += ["", "skipped / errors:"]
        seen = set()
        for r in notes:
            key = (r["op"], r["provider"], r["metric"], r["note"])
            shapes = sorted({n["shape"] for n in notes if (n["op"], n["provider"], n["metric"], n["note"]) == key})
            if key not in seen:
                seen.add(key)
                lines.append(f"  {r['metric']}: {r['op']} {r['provider']} ({len(shapes)} shape(s)): {r['note']}")
    return "\n".join(lines).lstrip("\n")


# full = forward + backward holds to within this factor on any timing to trust (the backward
# mode replays a retained graph, which can be a little cheaper than a fresh one).
FULL_SUM_SPREAD = 1.5


def unbalanced_full(rows: Sequence[dict]) -> dict:
    """{(shape, provider): (full ms, forward + backward ms)} for the time rows (of one op) whose
    full time is more than FULL_SUM_SPREAD times away from forward + backward."""
    median = {(r["shape"], r["provider"], r["mode"]): float(r["median"]) for r in rows if r["metric"] == "time_ms"}
    out = {}
    for (shape, provider, mode), full in median.items():
        forward, backward = median.get((shape, provider, "forward")), median.get((shape, provider, "backward"))
        if mode == "full" and forward is not None and backward is not None:
            parts = forward + backward
            if not 1 / FULL_SUM_SPREAD <= full / parts <= FULL_SUM_SPREAD:
                out[(shape, provider)] = (full, parts)
    return out


def speedups(rows: Sequence[dict]) -> dict:
    """{(op, shape, mode, other provider): other median / vlkernels median} from time rows."""
    median = {(r["op"], r["shape"], r["mode"], r["provider"]): float(r["median"])
              for r in rows if r["metric"] == "time_ms"}
    out = {}
    for (op, shape, mode, provider), value in median.items():
        mine = median.get((op, shape, mode, SUBJECT))
        if provider != SUBJECT and mine:
            out[(op, shape, mode, provider)] = value / mine
    return out


__all__ = [
    "BenchResult", "CSV_COLUMNS", "Case", "Compiled", "DTYPES", "FULL_BUDGET", "Inputs", "METRICS", "MODES",
    "FULL_SUM_SPREAD", "MIN_SAMPLES", "Progress", "QUICK_BUDGET", "Roofline", "Timing", "count_steps", "cpu_samples_ms",
    "unbalanced_full", "SUBJECT", "TimingBudget", "default_tolerance", "device_description", "expensive", "device_slug",
    "git_commit", "ordered_unique", "peak_memory_mb", "provider_order", "read_csv", "roofline_for",
    "roofline_precision", "run_cases", "speedups", "standard_providers", "summary_table", "time_call", "versions",
    "write_csv",
]
