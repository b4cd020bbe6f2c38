"""The public ops. Importing this package registers every custom op with torch.library."""
from ghostkernels.ops.ms_deform_attn import ms_deform_attn

__all__ = ["ms_deform_attn"]
