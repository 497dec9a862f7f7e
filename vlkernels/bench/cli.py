"""``vlkernels-bench`` (also ``python -m vlkernels.bench``): time the ops, write CSV + PNG per op.

    vlkernels-bench                                  # every op, full presets, default device
    vlkernels-bench --op patch_embed --quick         # small shapes, few reps (a CPU finishes in well under 2 min)
    vlkernels-bench --modes forward,full --providers vlkernels,eager --dtype fp16 --out /tmp/b
    vlkernels-bench --summarize bench/results/x/patch_embed.csv --modes forward,full

Writes ``<out>/<op>.csv`` (long format, see vlkernels.bench.harness.CSV_COLUMNS) and
``<out>/<op>.png`` and prints a summary table. Exit status 1 when a vlkernels provider failed
or disagreed with the eager reference (other providers that cannot run are recorded as
skipped), 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Optional, Sequence

import torch

from vlkernels.bench import OPS, load_cases
from vlkernels.bench import harness


def _csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _results_root() -> str:
    """bench/results of the repository checkout holding vlkernels, else bench/results under the
    working directory (an installed, non-editable vlkernels). Full runs are the results the
    repository commits; quick runs go to ``<device>-quick`` folders, which .gitignore ignores."""
    import vlkernels

    repo = os.path.dirname(os.path.dirname(os.path.abspath(vlkernels.__file__)))
    base = repo if os.path.isdir(os.path.join(repo, "bench")) else os.getcwd()
    return os.path.join(base, "bench", "results")


def _busy_cpu(device: torch.device) -> str:
    """A warning when other processes load this machine's CPUs before the run starts, else ''.
    Other work inflates CPU times far beyond its share: torch's and the extension's OpenMP
    regions wait at each barrier for a thread the scheduler has parked (a 5 ms call measured
    40 ms at a load average of 3.7 on 2 cores), and by different amounts for columns timed at
    different moments."""
    if device.type != "cpu" or not hasattr(os, "getloadavg"):
        return ""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load <= 0.5 * cores:
        return ""
    return (f"the machine was busy when the run started (1-minute load average {load:.1f} on {cores} cores): "
            "CPU times are inflated and noisy; compare columns of one run only, rerun when it is idle")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlkernels-bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", type=_csv_list, default=None,
                        help=f"comma-separated ops (default: all registered: {', '.join(OPS)})")
    parser.add_argument("--quick", action="store_true",
                        help="small shapes, short timings, no expensive baselines (torch.compile: name it in "
                             "--providers to time it anyway); about a minute on a 2-core CPU")
    parser.add_argument("--modes", type=_csv_list, default=list(harness.MODES),
                        help=f"comma-separated subset of {','.join(harness.MODES)} (default: all)")
    parser.add_argument("--dtype", choices=sorted(harness.DTYPES), default=None,
                        help="input dtype (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--providers", type=_csv_list, default=None,
                        help="comma-separated providers to time (default: all of each op's)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: <repo>/bench/results/<device-slug>; with --quick "
                             "<device-slug>-quick, git-ignored)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="start no new case after this many seconds (the rest are recorded as skipped)")
    parser.add_argument("--min-samples", type=int, default=None, metavar="N",
                        help=f"at least N (>= {harness.MIN_SAMPLES}) timed samples per CPU time "
                             f"(default: {harness.QUICK_BUDGET.cpu_min_samples} with --quick, "
                             f"{harness.FULL_BUDGET.cpu_min_samples} without)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--schedule", choices=("ops", "rounds"), default="ops",
                        help="ops: every case of one op, then the next op; rounds: the first case of every op "
                             "(in --op order), then the second of each, ... (with --time-limit, every op gets "
                             "timed before any op gets its second preset)")
    parser.add_argument("--summarize", nargs="+", metavar="CSV", default=None,
                        help="print the summary of existing result CSVs (restricted to --modes) and exit")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    bad_modes = [m for m in args.modes if m not in harness.MODES]
    if bad_modes or not args.modes:
        parser.error(f"--modes: unknown {', '.join(bad_modes) or '(empty)'}; choose from {', '.join(harness.MODES)}")

    if args.summarize:
        rows = []
        for path in args.summarize:
            try:
                rows += harness.read_csv(path)
            except OSError as error:
                print(f"vlkernels-bench: cannot read {path}: {error}", file=sys.stderr)
                return 2
        print(harness.summary_table(rows, args.modes))
        return 0

    ops = args.op or list(OPS)
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        parser.error(f"--op: unknown {', '.join(unknown)}; registered: {', '.join(OPS)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if device.type not in ("cuda", "cpu"):
        parser.error(f"--device: {device} is not supported (cuda or cpu)")
    dtype = harness.DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    out_dir = args.out or os.path.join(_results_root(), harness.device_slug(device) + ("-quick" if args.quick else ""))
    budget = harness.QUICK_BUDGET if args.quick else harness.FULL_BUDGET
    if args.min_samples is not None:
        if args.min_samples < harness.MIN_SAMPLES:
            parser.error(f"--min-samples: {args.min_samples} is below {harness.MIN_SAMPLES}, too few for p20/p80")
        budget = dataclasses.replace(budget, cpu_min_samples=args.min_samples)

    cases = {op: load_cases(op, device, args.quick) for op in ops}
    if args.providers:
        known = {name for op_cases in cases.values() for case in op_cases for name in case.providers}
        missing = [p for p in args.providers if p not in known]
        if missing:
            parser.error(f"--providers: unknown {', '.join(missing)}; these ops have {', '.join(sorted(known))}")

    started = time.perf_counter()
    deadline = time.monotonic() + args.time_limit if args.time_limit is not None else None
    print(f"vlkernels-bench: {', '.join(ops)} on {harness.device_description(device)}, "
          f"{harness.DTYPE_NAMES[dtype]}, modes {','.join(args.modes)}{' (quick)' if args.quick else ''}; "
          f"{harness.versions()}; commit {harness.git_commit()}", flush=True)
    busy = _busy_cpu(device)
    if busy:
        print(f"vlkernels-bench: {busy}", file=sys.stderr, flush=True)
    os.makedirs(out_dir, exist_ok=True)
    if args.schedule == "rounds":
        longest = max((len(op_cases) for op_cases in cases.values()), default=0)
        batches = [(op, [cases[op][i]]) for i in range(longest) for op in ops if i < len(cases[op])]
    else:
        batches = [(op, cases[op]) for op in ops]
    rows = {op: [] for op in ops}
    failures = []
    # One bar over the whole run (every op's every measurement), so its ETA is the run's.
    progress = harness.Progress(sum(harness.count_steps(op_cases, args.modes, args.providers)
                                    for _, op_cases in batches), enabled=not args.no_progress)
    for op, op_cases in batches:
        result = harness.run_cases(op_cases, device=device, dtype=dtype, modes=args.modes, providers=args.providers,
                                   budget=budget, progress=progress, deadline=deadline)
        rows[op] += result.rows
        failures += result.failures
        harness.write_csv(rows[op], os.path.join(out_dir, f"{op}.csv"))  # kept current: a killed run keeps its rows
        late = sum("time limit" in message for message in result.skipped)
        if late:
            print(f"vlkernels-bench: {op}: time limit reached; {late} measurement(s) not taken", file=sys.stderr)
    progress.close()
    for op in ops:
        written = [os.path.join(out_dir, f"{op}.csv")]
        if any(r["metric"] == "time_ms" for r in rows[op]):
            from vlkernels.bench.plot import plot_op

            written.append(os.path.join(out_dir, f"{op}.png"))
            plot_op(rows[op], written[-1])
        elif not all("time limit" in row.get("note", "") for row in rows[op]):  # not merely out of time
            failures.append(f"{op}: no provider could be timed")
        print(f"wrote {', '.join(written)}", flush=True)
    all_rows = [row for op in ops for row in rows[op]]

    print()
    print(harness.summary_table(all_rows, args.modes))
    print(f"\nvlkernels-bench: {time.perf_counter() - started:.1f} s")
    if busy:
        print(f"vlkernels-bench: {busy}", flush=True)
    if failures:
        print(f"vlkernels-bench: {len(failures)} failure(s):", file=sys.stderr)
        for message in failures:
            print(f"  {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
