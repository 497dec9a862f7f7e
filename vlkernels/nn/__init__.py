"""Drop-in nn.Modules over the vlkernels ops, state-dict compatible with the modules users already have."""
from vlkernels.nn.patch_embed import PatchEmbed

__all__ = ["PatchEmbed"]
