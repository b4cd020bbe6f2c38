"""rtdetr: the RT-DETR real-time detector built on ghostkernels."""

__version__ = "0.1.0"
