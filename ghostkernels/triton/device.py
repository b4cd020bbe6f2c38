"""Device facts the Triton launchers size their grids by."""
import functools

import torch


def num_sms(device: torch.device) -> int:
    """SMs of a CUDA device; 1 elsewhere (the interpreter runs programs one after another, so
    fewer, larger programs run fastest there)."""
    if device.type != "cuda":
        return 1
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
