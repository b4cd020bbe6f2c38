"""The public ops. Importing this package registers every custom op with torch.library."""
from ghostkernels.ops.ms_deform_attn import ms_deform_attn

__all__ = ["ms_deform_attn"]
from ghostkernels.ops.ghost_conv import ghost_conv  # noqa: E402
from ghostkernels.ops.depthwise_conv import depthwise_conv  # noqa: E402

__all__ += ["ghost_conv", "depthwise_conv"]
