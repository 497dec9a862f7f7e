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

import csv
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch

MODES = ("forward", "backward", "full")
METRICS = ("time_ms", "peak_mem_mb", "tflops", "pct_roofline")
# "note" is the one column beyond the design's list: the reason of a skipped or error row.
CSV_COLUMNS = ("op", "provider", "mode", "shape", "dtype", "metric", "median", "p20", "p80",
               "device", "versions", "commit", "note")
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
    """

    def __init__(self, fn: Callable, **compile_kwargs):
        self.fn = fn
        self.compile_kwargs = {"dynamic": False, **compile_kwargs}

    def fresh(self) -> Callable:
        torch._dynamo.reset()
        # The backward mode replays one graph's backward (retain_graph=True), which compiled
        # graphs refuse while they donate their saved buffers to the backward.
        torch._functorch.config.donated_buffer = False
        return torch.compile(self.fn, **self.compile_kwargs)


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
    """How long to measure each (provider, mode): do_bench warmup/rep in ms on CUDA,
    blocked_autorange min_run_time in s on CPU."""

    cuda_warmup_ms: int = 25
    cuda_rep_ms: int = 100
    cpu_min_run_time_s: float = 0.5


FULL_BUDGET = TimingBudget()
QUICK_BUDGET = TimingBudget(cuda_warmup_ms=5, cuda_rep_ms=20, cpu_min_run_time_s=0.1)


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of sorted values (numpy's default method)."""
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def time_call(fn: Callable[[], object], device: torch.device, budget: TimingBudget) -> tuple[float, float, float]:
    """(median, p20, p80) of one call of ``fn``, in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(fn, warmup=budget.cuda_warmup_ms, rep=budget.cuda_rep_ms,
                                                   quantiles=[0.5, 0.2, 0.8])
        return float(median), float(p20), float(p80)
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    times_ms = sorted(t * 1e3 for t in timer.blocked_autorange(min_run_time=budget.cpu_min_run_time_s).times)
    return _quantile(times_ms, 0.5), _quantile(times_ms, 0.2), _quantile(times_ms, 0.8)


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

    def row(self, case: Case, provider: str, mode: str, metric: str, values=(None, None, None), note: str = ""):
        median, p20, p80 = values
        self.result.rows.append(dict(self.common, op=case.op, provider=provider, mode=mode, shape=case.shape,
                                     metric=metric, median=median, p20=p20, p80=p80, note=note))

    def skip(self, case: Case, provider: str, mode: str, reason: str, error: Optional[bool] = None):
        if error is None:
            error = provider == SUBJECT  # the subject must run everything it is asked to
        self.row(case, provider, mode, "error" if error else "skipped", note=reason)
        message = f"{case.op} {case.shape} {provider} {mode}: {reason}"
        (self.result.failures if error else self.result.skipped).append(message)


def _free_cuda(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_cases(
    cases: Iterable[Case],
    *,
    device: torch.device,
    dtype: torch.dtype,
    modes: Sequence[str] = MODES,
    providers: Optional[Sequence[str]] = None,
    budget: TimingBudget = FULL_BUDGET,
    progress: bool = True,
    seed: int = 0,
    deadline: Optional[float] = None,
) -> BenchResult:
    """Time each case's providers (all, or those named in ``providers``) in each mode.

    ``deadline`` (a ``time.monotonic()`` value): cases not started by then are recorded as
    skipped ("time limit"), so a run under a fixed budget still writes what it measured.
    """
    from tqdm.auto import tqdm

    cases = list(cases)
    result = BenchResult()
    recorder = _Recorder(result, dict(dtype=DTYPE_NAMES.get(dtype, str(dtype)), device=device_description(device),
                                      versions=versions(), commit=git_commit()))
    roof = roofline_for(device)
    bar = tqdm(cases, desc="vlkernels-bench", unit="case", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for index, case in enumerate(bar):
        wanted = [n for n in case.providers if providers is None or n in providers]
        if deadline is not None and time.monotonic() > deadline:
            for name in wanted:
                for mode in modes:
                    recorder.skip(case, name, mode, "time limit reached before this case started", error=False)
            continue
        torch.manual_seed(seed + index)  # reproducible, and different for each case
        try:
            inputs = case.make_inputs(device, dtype)
            # The eager output is the yardstick every other provider's forward is checked against.
            expected = (tuple(t.detach() for t in _outputs(case.providers["eager"](*inputs.args, **inputs.kwargs)))
                        if "eager" in case.providers else None)
        except Exception as error:  # noqa: BLE001 - e.g. the inputs of the largest preset do not fit
            inputs = expected = None
            for name in wanted:
                for mode in modes:
                    recorder.skip(case, name, mode, f"inputs/reference failed: {_reason(error)}", error=False)
            _free_cuda(device)
            continue
        grads = inputs.grad_tensors()
        grad_out = tuple(torch.randn_like(t) for t in expected) if expected is not None and grads else None
        case_modes = [m for m in modes if m == "forward" or grads]  # no backward for an op without grads
        tolerance = (case.tolerance or default_tolerance)(dtype)
        for name, provider in case.providers.items():
            if providers is not None and name not in providers:
                continue
            bar.set_postfix_str(f"{case.shape} {name}", refresh=True)
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
                bar.set_postfix_str(f"{case.shape} {name} {mode}", refresh=False)
                try:
                    call = _mode_closure(fn, inputs, mode, grad_out)
                    median, p20, p80 = time_call(call, device, budget)
                    memory = peak_memory_mb(call, device)
                    del call
                except Exception as error:  # noqa: BLE001 - e.g. out of memory at the largest preset
                    recorder.skip(case, name, mode, _reason(error))
                    _free_cuda(device)
                    continue
                recorder.row(case, name, mode, "time_ms", (median, p20, p80))
                if memory is not None:
                    recorder.row(case, name, mode, "peak_mem_mb", (memory, memory, memory))
                flops = case.flops(mode) if case.flops else None
                if flops:
                    # Throughput quantiles mirror the time quantiles: p20 of TFLOP/s is at p80 of time.
                    tflops = tuple(flops / (t * 1e-3) / 1e12 for t in (median, p80, p20))
                    recorder.row(case, name, mode, "tflops", tflops)
                nbytes = case.bytes(mode, dtype) if case.bytes else None
                peak = roof.dense_tflops.get(roofline_precision(dtype, case.tf32())) if roof is not None else None
                if peak and flops and nbytes:
                    # Roofline time: the larger of compute-bound and bandwidth-bound time at peak.
                    ideal_ms = max(flops / (peak * 1e12), nbytes / (roof.hbm_tb_s * 1e12)) * 1e3
                    pct = tuple(100 * ideal_ms / t for t in (median, p80, p20))
                    recorder.row(case, name, mode, "pct_roofline", pct)
            del fn
        del inputs, expected, grad_out, grads
        _free_cuda(device)
    bar.close()
    return result


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
    "QUICK_BUDGET", "Roofline", "SUBJECT", "TimingBudget", "default_tolerance", "device_description", "device_slug",
    "git_commit", "ordered_unique", "peak_memory_mb", "provider_order", "read_csv", "roofline_for",
    "roofline_precision", "run_cases", "speedups", "standard_providers", "summary_table", "time_call", "versions",
    "write_csv",
]
