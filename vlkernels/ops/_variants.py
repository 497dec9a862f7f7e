"""KernelVariant: one configuration of a Triton kernel that a launcher can pick, as each op's
``aot_variants()`` lists it for the sm_90a report (vlkernels.report). It lives below both the
ops and the report, so neither imports the other to name it."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KernelVariant:
    """One compiled configuration of a Triton kernel.

    constexprs: the constexpr arguments; pointers: the dtype of each pointer argument; scalars:
    the value of each scalar argument in a typical call. Triton specializes a launch on its
    arguments (an int equal to 1 becomes a constant, ints and pointers divisible by 16 are
    marked so, which decides vector widths and pipelining), so the report compiles each variant
    from these values through Triton's own launch-time specialization. options: num_warps /
    num_stages; gemm_shaped: the kernel's work is tl.dot, so its tensor-core SASS must use HGMMA
    (unless it asks for IEEE fp32 dots, which have no tensor-core form).
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

    def launch_arguments(self) -> dict:
        """The kernel's arguments by name, as a launch passes them: a 16-byte aligned tensor of
        the pointer's dtype (torch's allocations are), the scalars and the constexprs."""
        values = {**self.scalars, **self.constexprs,
                  **{name: torch.empty(1, dtype=dtype) for name, dtype in self.pointers.items()}}
        missing = [name for name in self.kernel.arg_names if name not in values]
        if missing:
            raise ValueError(f"{self.name}[{self.label}]: no value for argument(s) {', '.join(missing)}")
        return {name: values[name] for name in self.kernel.arg_names}
