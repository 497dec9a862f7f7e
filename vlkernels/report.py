"""Ahead-of-time sm_90a report of every Triton kernel configuration, from a machine without a GPU.

    python -m vlkernels.report [--json] [--arch 90]

Compiles each registered kernel variant with Triton for the given architecture and reads its
cubin with the cuobjdump that ships inside the triton wheel: registers, spilled (LOCAL) bytes,
shared memory, and the number of HGMMA (Hopper warpgroup MMA) instructions in the SASS.
Run it with TRITON_INTERPRET unset: the interpreter replaces kernels with Python functions.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Optional

import torch

_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                  torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8"}


@dataclass
class KernelVariant:
    """One compiled configuration of a Triton kernel.

    constexprs: the constexpr arguments; pointers: dtype of each pointer argument; scalars:
    the value of each scalar argument in a typical call (int -> i32, float -> fp32), since
    Triton specializes on them (an int multiple of 16 compiles as such, and so do 16-byte
    aligned pointers, as torch allocates them): that decides vector widths and pipelining,
    so the report must see the same; options: num_warps / num_stages; gemm_shaped: the
    kernel's work is tl.dot, so its tensor-core SASS must use HGMMA (unless it asks for
    IEEE fp32 dots, which have no tensor-core form).
    """

    kernel: object
    label: str
    constexprs: dict
    pointers: dict
    scalars: dict
    options: dict = field(default_factory=dict)
    gemm_shaped: bool = False

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    @property
    def expects_hgmma(self) -> bool:
        return self.gemm_shaped and self.constexprs.get("DOT_PRECISION") != "ieee"

    def signature(self) -> dict:
        signature = {}
        for arg in self.kernel.arg_names:
            if arg in self.constexprs:
                signature[arg] = "constexpr"
            elif arg in self.pointers:
                signature[arg] = "*" + _TRITON_DTYPES[self.pointers[arg]]
            else:
                signature[arg] = "fp32" if isinstance(self.scalars[arg], float) else "i32"
        return signature

    def attributes(self) -> dict:
        """Triton's divisibility-by-16 specialization, as a launch with these arguments gets it."""
        divisible = [index for index, arg in enumerate(self.kernel.arg_names)
                     if arg in self.pointers or (isinstance(self.scalars.get(arg), int) and self.scalars[arg] % 16 == 0)]
        return {(index,): [["tt.divisibility", 16]] for index in divisible}


def all_variants() -> list[KernelVariant]:
    from vlkernels import ops

    return [variant for module in ops.KERNEL_MODULES for variant in module.aot_variants()]


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_variant(variant: KernelVariant, arch: int = 90) -> dict:
    """Compile one variant for sm_<arch> (sm_90a for 90) and read its resources off the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {"kernel": variant.name, "variant": variant.label, "gemm_shaped": variant.gemm_shaped,
           "expects_hgmma": variant.expects_hgmma}
    try:
        source = ASTSource(variant.kernel, variant.signature(), variant.constexprs, variant.attributes())
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=variant.options)
    except Exception as error:  # reported per variant: one broken kernel must not hide the others
        row["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        return row
    with tempfile.TemporaryDirectory() as folder:
        cubin = os.path.join(folder, "kernel.cubin")
        with open(cubin, "wb") as file:
            file.write(compiled.asm["cubin"])
        usage = subprocess.run([_cuobjdump(), "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", usage))
    row.update(registers=int(fields["REG"]), spill_bytes=int(fields["LOCAL"]), stack_bytes=int(fields["STACK"]),
               shared_bytes=compiled.metadata.shared, hgmma=len(re.findall(r"\bHGMMA\b", sass)),
               num_warps=variant.options.get("num_warps", 4), num_stages=variant.options.get("num_stages"))
    return row


def problems(row: dict) -> list[str]:
    """What is wrong with a compiled variant: errors, spills, a GEMM without HGMMA."""
    if "error" in row:
        return [row["error"]]
    found = []
    if row["spill_bytes"]:
        found.append(f"{row['spill_bytes']} bytes spilled to local memory")
    if row["expects_hgmma"] and not row["hgmma"]:
        found.append("GEMM-shaped but its SASS has no HGMMA")
    return found


def _table(rows: list[dict]) -> str:
    header = f"{'kernel':<34} {'variant':<18} {'regs':>4} {'spill':>5} {'smem':>7} {'warps':>5} {'HGMMA':>5}  status"
    lines = [header, "-" * len(header)]
    for row in rows:
        status = "; ".join(problems(row)) or "ok"
        if "error" in row:
            lines.append(f"{row['kernel']:<34} {row['variant']:<18} {'-':>4} {'-':>5} {'-':>7} {'-':>5} {'-':>5}  {status}")
            continue
        lines.append(f"{row['kernel']:<34} {row['variant']:<18} {row['registers']:>4} {row['spill_bytes']:>5} "
                     f"{row['shared_bytes']:>7} {row['num_warps']:>5} {row['hgmma']:>5}  {status}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="vlkernels-report", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object per variant instead of a table")
    parser.add_argument("--arch", type=int, default=90, help="compute capability to compile for (90 = sm_90a)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the interpreter has no kernels to compile")
    rows = [compile_variant(variant, args.arch) for variant in all_variants()]
    if args.json:
        print("\n".join(json.dumps(row) for row in rows))
    else:
        print(f"Triton kernels compiled for sm_{args.arch}{'a' if args.arch == 90 else ''}:")
        print(_table(rows))
    return 1 if any(problems(row) for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
