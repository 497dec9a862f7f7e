"""How the drop-in modules say that a call ran torch's path instead of the vlkernels kernels."""
from __future__ import annotations

import warnings

_WARNED: set[tuple[str, str]] = set()


def record_fallback(op: str, reason: str, *, stacklevel: int = 5) -> None:
    """Report that ``op`` ran torch's path instead of the kernels, once per (op, reason):
    through ``vlkernels._coverage.record_fallback`` where the library has it, else a warning
    (stacklevel 5 names the caller of a module's ``__call__``; a function passes 3)."""
    try:
        from vlkernels._coverage import record_fallback as record
    except ImportError:
        record = None
    if record is not None:
        record(op, reason)
    elif (op, reason) not in _WARNED:
        _WARNED.add((op, reason))
        warnings.warn(f"{op}: {reason}, so this call runs torch's path instead of the vlkernels kernels "
                      "(said once per reason)", stacklevel=stacklevel)
