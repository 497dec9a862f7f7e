"""Drop-in nn.Modules over the vlkernels ops, state-dict compatible with the modules users already have."""
from vlkernels.nn.patch_embed import PatchEmbed
from vlkernels.nn.visual_dictionary import VisualDictionary, mvm_mask

__all__ = ["PatchEmbed", "VisualDictionary", "mvm_mask"]
