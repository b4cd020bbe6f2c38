"""Input generators and an independent, loop-based definition of multi-scale deformable
attention, shared by the MSDA tests."""
import math

import torch

from tests.backend_params import rel_err  # noqa: F401 - re-exported for the MSDA tests


def make_inputs(N, shapes, M, D, Lq, P, dtype=torch.float64, device="cpu", loc_range=(-0.1, 1.1),
                generator=None):
    """Random inputs: value ~ N(0,1), locations uniform in loc_range, weights softmaxed."""
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64, device=device)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S = int(areas.sum())
    L = len(shapes)
    lo, hi = loc_range
    value = torch.randn(N, S, M, D, dtype=torch.float64, generator=generator)
    loc = lo + (hi - lo) * torch.rand(N, Lq, M, L, P, 2, dtype=torch.float64, generator=generator)
    logits = torch.randn(N, Lq, M, L * P, dtype=torch.float64, generator=generator)
    weights = logits.softmax(-1).view(N, Lq, M, L, P)
    return (value.to(device=device, dtype=dtype), spatial_shapes, level_start_index,
            loc.to(device=device, dtype=dtype), weights.to(device=device, dtype=dtype))


def away_from_pixel_boundaries(loc, spatial_shapes, margin: float = 1e-3):
    """``loc`` with every coordinate moved at least ``margin`` pixels away from the integer pixel
    coordinates (``loc * size - 0.5`` integral), where bilinear sampling has a kink in the
    location: a finite-difference gradcheck (eps 1e-6) straddling one fails although the
    analytical gradient is right. Coordinates already clear of them are unchanged."""
    sizes = spatial_shapes.flip(-1).to(loc.dtype)  # (w, h) per level, matching loc's (x, y)
    sizes = sizes.view(1, 1, 1, -1, 1, 2)
    pix = loc.detach() * sizes - 0.5
    nearest = pix.round()
    offset = pix - nearest
    close = offset.abs() < margin
    moved = nearest + torch.where(offset >= 0, 2 * margin, -2 * margin)
    return torch.where(close, (moved + 0.5) / sizes, loc.detach())


def naive_ms_deform_attn(value, spatial_shapes, level_start_index, loc, weights):
    """Straight from the definition (kernels.md §1.2), one point at a time, in float64. Only the
    value rows it reads are copied (value may be a multi-GB GPU tensor)."""
    loc, weights = loc.double().cpu(), weights.double().cpu()
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    out = torch.zeros(N, Lq, M, D, dtype=torch.float64)
    for lvl in range(L):
        H, W = (int(v) for v in spatial_shapes[lvl])
        start = int(level_start_index[lvl])
        for n in range(N):
            for q in range(Lq):
                for m in range(M):
                    for p in range(P):
                        x = float(loc[n, q, m, lvl, p, 0]) * W - 0.5
                        y = float(loc[n, q, m, lvl, p, 1]) * H - 0.5
                        if not (-1 < y < H and -1 < x < W):
                            continue
                        y0, x0 = math.floor(y), math.floor(x)
                        ly, lx = y - y0, x - x0
                        acc = torch.zeros(D, dtype=torch.float64)
                        for dy, wy in ((0, 1 - ly), (1, ly)):
                            for dx, wx in ((0, 1 - lx), (1, lx)):
                                yy, xx = y0 + dy, x0 + dx
                                if 0 <= yy < H and 0 <= xx < W:
                                    row = value[n, start + yy * W + xx, m]
                                    acc += wy * wx * row.double().cpu()
                        out[n, q, m] += weights[n, q, m, lvl, p] * acc
    return out.view(N, Lq, M * D)


