"""The transformers versions the HF integrations support, and the check every apply/revert makes.

The patched forwards follow each version's module signatures (transformers 4.57 passes
``head_mask`` to the BERT-style attention and computes ViT's attention in ``ViTSelfAttention``;
transformers 5 drops ``head_mask`` and moves it into ``ViTAttention``), so a version outside the
range, whose modules may differ again, is refused rather than patched blindly. CI runs
tests/test_integrations.py on the newest release of each supported minor (see .ci/run).
"""
from __future__ import annotations

import re

# (lowest, highest) supported (major, minor), both included: the last 4.x minor and 5.x.
TRANSFORMERS_VERSIONS = (((4, 57), (4, 57)), ((5, 0), (5, 999)))
# The same range as users read it (README, error messages).
TRANSFORMERS_RANGE = "transformers 4.57.x or 5.x (>=4.57,<4.58 or >=5.0,<6)"


def parse(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "4.57.6" or "5.24.0.dev0"."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"vlkernels.integrations: cannot read the transformers version {version!r}")
    return int(match.group(1)), int(match.group(2))


def supported(version: str) -> bool:
    """Whether ``version`` of transformers is in :data:`TRANSFORMERS_VERSIONS`."""
    minor = parse(version)
    return any(low <= minor <= high for low, high in TRANSFORMERS_VERSIONS)


def installed() -> str:
    """The version of the transformers that imports (imported here, on the first apply/revert)."""
    import transformers

    return transformers.__version__


def check_transformers(function: str) -> None:
    """Raise an ImportError naming ``function`` and the supported range unless the installed
    transformers is in it."""
    version = installed()
    if not supported(version):
        raise ImportError(f"{function} supports {TRANSFORMERS_RANGE}; transformers {version} is installed "
                          f"(pip install 'transformers>=4.57,<6')")
