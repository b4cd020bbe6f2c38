"""The public ops. Importing this package registers every custom op with torch.library."""
from ghostkernels.ops.ms_deform_attn import ms_deform_attn, ms_deform_attn_softmax
from ghostkernels.ops.ghost_conv import ghost_conv
from ghostkernels.ops.ghost_conv_depthwise import ghost_conv_depthwise
from ghostkernels.ops.depthwise_conv import depthwise_conv
from ghostkernels.ops.dfc_gate import dfc_gate
from ghostkernels.ops.se_excitation import se_excitation

__all__ = ["ms_deform_attn", "ms_deform_attn_softmax", "ghost_conv", "ghost_conv_depthwise",
           "depthwise_conv", "dfc_gate", "se_excitation"]
