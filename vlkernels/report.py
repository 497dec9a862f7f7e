"""Ahead-of-time sm_90a report of every Triton kernel configuration, from a machine without a GPU.

    python -m vlkernels.report [--json] [--arch 90] [--match REGEX]

Compiles each kernel variant that a launcher can pick (``all_variants()``, from every op's
``aot_variants()``) exactly as a launch specializes it, then reads what the compiler says:
``ptxas -v`` on the kernel's PTX (registers, stack frame, spill stores and loads, and every
performance advisory it prints, such as C7515 "wgmma.mma_async instructions are serialized"),
the cubin through cuobjdump (registers again, the HGMMA count of the SASS and the instruction
count of each loop that holds HGMMA), Triton's shared
memory, and the occupancy all of it implies on an H100 / H200. A variant that spills, carries
an advisory or misses HGMMA is a problem unless EXCEPTIONS names it with the reason.
Run it with TRITON_INTERPRET unset: the interpreter replaces kernels with Python functions.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

from vlkernels.ops._variants import KernelVariant

# Hopper's per-SM limits (H100 / H200, compute capability 9.0).
SM_REGISTERS = 65536
SM_MAX_WARPS = 64
SM_MAX_CTAS = 32
SM_SHARED_BYTES = 233472  # 228 KB per SM ...
CTA_RESERVED_SHARED_BYTES = 1024  # ... of which the driver reserves 1 KB for each resident CTA
REGISTER_ALLOCATION_UNIT = 256  # registers are handed to warps in units of 256 (8 per thread)


@dataclass(frozen=True)
class KnownProblem:
    """A variant allowed to fail the gates for now: what it does and what will fix it."""

    reason: str
    fix: str


# The one table of variants that may fail the gates (spills, ptxas advisories), keyed by
# (kernel, variant label). Each entry says why and which piece of work removes it; an entry
# that is no longer needed is itself a test failure (tests/test_report.py).
def _known(kernel: str, labels: str, reason: str, fix: str) -> dict:
    return {(kernel, label): KnownProblem(reason, fix) for label in labels.split()}


EXCEPTIONS: dict[tuple[str, str], KnownProblem] = {}


def all_variants() -> list[KernelVariant]:
    """Every kernel configuration the launchers can pick (the public enumeration other tools use)."""
    from vlkernels import ops

    return [variant for module in ops.KERNEL_MODULES for variant in module.aot_variants()]


def _nvidia_tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def occupancy(registers: int, warps: int, shared_bytes: int) -> tuple[int, str]:
    """Resident CTAs per SM on Hopper, and which resource limits it (registers, shared, warps)."""
    registers_per_warp = -(-registers * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    limits = {
        "registers": (SM_REGISTERS // registers_per_warp) // warps,
        "shared": SM_SHARED_BYTES // (shared_bytes + CTA_RESERVED_SHARED_BYTES),
        "warps": min(SM_MAX_WARPS // warps, SM_MAX_CTAS),
    }
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


def parse_ptxas(log: str) -> dict:
    """Registers, stack frame, spill stores / loads and the performance advisories of a ptxas -v log."""
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    registers = re.search(r"Used (\d+) registers", log)
    if not frame or not registers:
        raise ValueError(f"unexpected ptxas -v output:\n{log}")
    # Advisories come as "ptxas info : (C7515) Potential Performance Loss: ..." and as warnings.
    advisories = [line.split(":", 1)[1].strip() for line in log.splitlines()
                  if line.startswith("ptxas warning") or re.match(r"ptxas info\s*:\s*\(C\d+\)", line)]
    return dict(ptxas_registers=int(registers.group(1)), stack_bytes=int(frame.group(1)),
                spill_stores=int(frame.group(2)), spill_loads=int(frame.group(3)), advisories=advisories)


_SASS_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_SASS_BRANCH = re.compile(r"\bBRA(?:\.\S+)?\s+(?:`\()?0x([0-9a-f]+)")


def sass_loops(sass: str) -> list[dict]:
    """The loops of one kernel's SASS (cuobjdump -sass), in address order: each backward branch
    closes a loop from its target to itself (several branches back to one target are one loop;
    a branch back into the middle of a loop from past its end closes none).
    Each loop: start and end addresses, its instruction count and its HGMMA count."""
    instructions = [(int(address, 16), text.strip()) for address, text in _SASS_INSTRUCTION.findall(sass)]
    ends: dict[int, int] = {}
    for address, text in instructions:
        branch = _SASS_BRANCH.search(text)
        if branch and int(branch.group(1), 16) < address:
            start = int(branch.group(1), 16)
            ends[start] = max(ends.get(start, address), address)
    # A branch from past a loop's end back into its middle is the return of an out-of-line stub
    # that the loop jumped to (the retry of a TMA barrier wait, SYNCS.PHASECHK.TRANS64.TRYWAIT),
    # not a loop of its own.
    ends = {start: end for start, end in ends.items()
            if not any(other < start <= other_end < end for other, other_end in ends.items())}
    loops = []
    for start, end in sorted(ends.items()):
        body = [text for address, text in instructions if start <= address <= end]
        loops.append(dict(start=start, end=end, instructions=len(body),
                          hgmma=sum(1 for text in body if re.search(r"\bHGMMA\b", text))))
    return loops


def dot_loops(sass: str) -> list[int]:
    """Instruction counts of the kernel's tensor-core loops, in address order: the innermost loops
    holding HGMMA. The attention kernels run their fully visible tiles in the first of them (the
    hot loop) and the tiles that evaluate a mask in the second."""
    loops = [loop for loop in sass_loops(sass) if loop["hgmma"]]
    innermost = [loop for loop in loops if not any(other is not loop and loop["start"] <= other["start"]
                                                   and other["end"] <= loop["end"] for other in loops)]
    return [loop["instructions"] for loop in innermost]


def _specialize(variant: KernelVariant, backend):
    """Signature, constexprs, attributes and options exactly as Triton's launcher derives them
    from these arguments (ints equal to 1 become constants; 16-divisible ints and aligned
    pointers carry tt.divisibility)."""
    from triton.runtime.jit import create_function_from_signature

    kernel = variant.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(**variant.launch_arguments(), **variant.options)
    return kernel._pack_args(backend, dict(variant.options), bound, specialization, options)


def _compile_with_ptxas_log(source, target, options):
    """triton.compile, and the log of the ptxas -v run it makes (empty when the kernel came from
    Triton's cache): Triton prints that log when its dump_ptxas_log knob is set."""
    import triton
    from triton import knobs

    printed, dump = io.StringIO(), knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(printed):
            compiled = triton.compile(source, target=target, options=options.__dict__)
    finally:
        knobs.nvidia.dump_ptxas_log = dump
    return compiled, printed.getvalue()


def compile_variant(variant: KernelVariant, arch: int = 90) -> dict:
    """Compile one variant for sm_<arch> (sm_90a for 90) and read its resources."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    row = {"kernel": variant.name, "variant": variant.label, "gemm_shaped": variant.gemm_shaped,
           "expects_hgmma": variant.expects_hgmma, "num_warps": variant.options.get("num_warps", 4),
           "num_stages": variant.options.get("num_stages", 3)}
    target = GPUTarget("cuda", arch, 32)
    try:
        backend = make_backend(target)
        options, signature, constexprs, attrs = _specialize(variant, backend)
        compiled, triton_log = _compile_with_ptxas_log(ASTSource(variant.kernel, signature, constexprs, attrs),
                                                       target, options)
    except Exception as error:  # reported per variant: one broken kernel must not hide the others
        row["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        return row
    # Scalars the launch turned into constants (ints equal to 1, such as a unit stride; an absent
    # optional argument, None, is a constant by nature and not listed).
    row["constants"] = [name for name, kind in signature.items()
                        if kind == "constexpr" and variant.scalars.get(name, None) is not None]
    arch_name = f"sm_{arch}{'a' if arch == 90 else ''}"
    # Tensor-core instructions come only from dot ops: a kernel with none in its IR has no HGMMA
    # and no dot loop, and is not disassembled (cuobjdump -sass takes ~0.4 s a call, whatever the size).
    has_dot = bool(re.search(r"\b(tt\.dot|tt\.dot_scaled|ttng\.warp_group_dot)\b", compiled.asm["ttgir"]))
    with tempfile.TemporaryDirectory() as folder:
        ptx, cubin = os.path.join(folder, "kernel.ptx"), os.path.join(folder, "kernel.cubin")
        with open(ptx, "w") as file:
            file.write(compiled.asm["ptx"])
        with open(cubin, "wb") as file:
            file.write(compiled.asm["cubin"])
        log = triton_log
        if "Used " not in log:  # the kernel came from Triton's cache: no ptxas ran, so run it as Triton does
            fmad = [] if options.enable_fp_fusion else ["--fmad=false"]  # (compiler.py make_cubin's flags)
            run = subprocess.run([_nvidia_tool("ptxas"), "-lineinfo", *fmad, "-v", f"--gpu-name={arch_name}", ptx,
                                  "-o", os.path.join(folder, "check.o")], capture_output=True, text=True, check=True)
            log = run.stderr + run.stdout
        usage = subprocess.run([_nvidia_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_nvidia_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout if has_dot else ""
    row.update(parse_ptxas(log))
    row.update(registers=int(re.search(r"REG:(\d+)", usage).group(1)), shared_bytes=compiled.metadata.shared,
               hgmma=len(re.findall(r"\bHGMMA\b", sass)), dot_loops=dot_loops(sass))
    row["ctas_per_sm"], row["occupancy_limit"] = occupancy(row["registers"], row["num_warps"], row["shared_bytes"])
    row["warps_per_sm"] = row["ctas_per_sm"] * row["num_warps"]
    return row


def problems(row: dict) -> list[str]:
    """What fails the gates in a compiled variant: errors, spills, advisories, a GEMM without HGMMA."""
    if "error" in row:
        return [row["error"]]
    found = []
    if row["spill_stores"] or row["spill_loads"]:
        found.append(f"spills ({row['spill_stores']} B stored, {row['spill_loads']} B loaded)")
    found += [f"ptxas: {advisory}" for advisory in row["advisories"]]
    if row["expects_hgmma"] and not row["hgmma"]:
        found.append("GEMM-shaped but its SASS has no HGMMA")
    return found


def exception_for(row: dict) -> Optional[KnownProblem]:
    return EXCEPTIONS.get((row["kernel"], row["variant"]))


def unexcepted_problems(row: dict) -> list[str]:
    """The problems of a variant that the exceptions table does not cover (errors never are)."""
    found = problems(row)
    return found if "error" in row or exception_for(row) is None else []


LEGEND = """\
regs: registers per thread (ptxas -v, equal to the cubin's); stack: stack frame bytes; spill: bytes
spilled (stores/loads); smem: shared memory bytes; warps/stages: launch options; HGMMA: warpgroup
MMA instructions in the SASS; CTA/SM: resident CTAs per SM on H100/H200 and what limits them
(registers of the 64K file, shared memory of 228 KB, warps of 64); loops: instructions in each
HGMMA loop of the SASS, in address order (attention: the hot loop over fully visible tiles, then
the loop over the tiles that evaluate a mask). Status: ok, the problems that
fail the gates, or 'excepted' (vlkernels.report.EXCEPTIONS says why and what will fix it)."""


def _table(rows: list[dict]) -> str:
    header = (f"{'kernel':<36} {'variant':<22} {'regs':>4} {'stack':>5} {'spill':>9} {'smem':>7} {'warps':>5} "
              f"{'stages':>6} {'HGMMA':>5} {'CTA/SM':>14} {'loops':>9}  status")
    lines = [header, "-" * len(header)]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['kernel']:<36} {row['variant']:<22} {'compile error':>62}  {row['error']}")
            continue
        status = "; ".join(problems(row)) or "ok"
        if problems(row) and exception_for(row):
            status = f"excepted: {status}"
        spill = f"{row['spill_stores']}/{row['spill_loads']}"
        lines.append(f"{row['kernel']:<36} {row['variant']:<22} {row['registers']:>4} {row['stack_bytes']:>5} "
                     f"{spill:>9} {row['shared_bytes']:>7} {row['num_warps']:>5} {row['num_stages']:>6} "
                     f"{row['hgmma']:>5} {row['ctas_per_sm']:>3} ({row['occupancy_limit']:<9}) "
                     f"{'/'.join(map(str, row['dot_loops'])) or '-':>9}  {status}")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """One line: how many variants, how many pass, and what the others have."""
    count = lambda test: sum(1 for row in rows if "error" not in row and test(row))  # noqa: E731
    errors = sum(1 for row in rows if "error" in row)
    spilling = count(lambda row: row["spill_stores"] or row["spill_loads"])
    advised = count(lambda row: row["advisories"])
    no_hgmma = count(lambda row: row["expects_hgmma"] and not row["hgmma"])
    excepted = count(lambda row: problems(row) and exception_for(row))
    clean = len(rows) - sum(1 for row in rows if problems(row))
    return (f"{len(rows)} variants: {clean} ok, {spilling} spill, {advised} with ptxas advisories, "
            f"{no_hgmma} GEMM without HGMMA, {errors} compile errors; {excepted} of the failing excepted")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="vlkernels-report", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object per variant instead of a table")
    parser.add_argument("--arch", type=int, default=90, help="compute capability to compile for (90 = sm_90a)")
    parser.add_argument("--match", default=None, metavar="REGEX",
                        help="only the variants whose 'kernel[label]' matches REGEX (e.g. attention)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the interpreter has no kernels to compile")
    variants = [v for v in all_variants() if args.match is None or re.search(args.match, f"{v.name}[{v.label}]")]
    if not variants:
        parser.error(f"--match {args.match!r}: no kernel variant matches")
    rows, start = [], time.time()
    for index, variant in enumerate(variants, 1):
        print(f"[{index}/{len(variants)} {time.time() - start:5.0f}s] {variant.name} {variant.label}",
              file=sys.stderr, flush=True)
        rows.append(compile_variant(variant, args.arch))
    if args.json:
        print("\n".join(json.dumps(row) for row in rows))
    else:
        print(f"Triton kernels compiled for sm_{args.arch}{'a' if args.arch == 90 else ''}:")
        print(_table(rows))
        print()
        print(LEGEND)
        for (kernel, label), exception in EXCEPTIONS.items():
            print(f"excepted {kernel}[{label}]: {exception.reason} (fix: {exception.fix})")
    print(summary(rows), file=sys.stderr if args.json else sys.stdout)
    return 1 if any(unexcepted_problems(row) for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
