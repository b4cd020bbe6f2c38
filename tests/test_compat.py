"""The drop-in entry points of ghostkernels.compat against the loop-based definition of MSDA, with
the argument conventions of Deformable-DETR, mmcv and RT-DETR."""
import pytest
import torch

import ghostkernels
from ghostkernels import compat, use_backend
from tests.msda_cases import make_inputs, naive_ms_deform_attn, rel_err

SHAPES = [(6, 5), (3, 3), (1, 2)]


def _inputs(N=3, dtype=torch.float64):
    return make_inputs(N, SHAPES, 2, 4, 7, 3, dtype=dtype)


def test_deformable_detr_function_matches_definition_with_any_im2col_step():
    value, shapes, starts, loc, weights = _inputs(N=3)  # 3 is not a multiple of 64 or 2
    expected = naive_ms_deform_attn(value, shapes, starts, loc, weights).flatten(2)
    for step in (64, 2, 1):
        out = compat.MSDeformAttnFunction.apply(value, shapes, starts, loc, weights, step)
        assert out.shape == (3, 7, 8)
        assert rel_err(out, expected) < 1e-12
    assert compat.MultiScaleDeformableAttnFunction is compat.MSDeformAttnFunction


def test_function_gradients_equal_the_ops():
    value, shapes, starts, loc, weights = _inputs()
    grad = torch.randn(3, 7, 8, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (value, loc, weights)]
    compat.MSDeformAttnFunction.apply(leaves[0], shapes, starts, leaves[1], leaves[2], 64
                                      ).backward(grad)
    ref = [t.clone().requires_grad_() for t in (value, loc, weights)]
    ghostkernels.ms_deform_attn(ref[0], shapes, starts, ref[1], ref[2]).backward(grad)
    for got, want in zip(leaves, ref):
        assert got.grad is not None and torch.equal(got.grad, want.grad)


@pytest.mark.parametrize("shapes_as", ["tensor", "int32", "list"])
def test_pytorch_cores_derive_the_level_offsets(shapes_as):
    value, shapes, starts, loc, weights = _inputs()
    given = {"tensor": shapes, "int32": shapes.int(), "list": [list(s) for s in SHAPES]}[shapes_as]
    expected = naive_ms_deform_attn(value, shapes, starts, loc, weights).flatten(2)
    for fn in (compat.multi_scale_deformable_attn_pytorch, compat.ms_deform_attn_core_pytorch,
               compat.deformable_attention_core_func):
        assert rel_err(fn(value, given, loc, weights), expected) < 1e-12


def test_half_precision_values():
    value, shapes, starts, loc, weights = _inputs(dtype=torch.float32)
    expected = naive_ms_deform_attn(value, shapes, starts, loc, weights).flatten(2)
    out = compat.deformable_attention_core_func(value.bfloat16(), SHAPES, loc,
                                                weights.bfloat16())
    assert out.dtype == torch.bfloat16 and rel_err(out, expected) < 2e-2


def test_float32_weights_with_autocast_half_values():
    """Under torch.autocast the value projection gives half-precision values while the softmaxed
    weights (and the locations) stay float32: the originals accept that (mmcv's function casts
    both to value's dtype, the PyTorch cores' grid_sample runs in float32); so does every entry
    point here (it raised that the weights must have value's dtype)."""
    value, shapes, starts, loc, weights = _inputs(dtype=torch.float32)
    expected = naive_ms_deform_attn(value, shapes, starts, loc, weights).flatten(2)
    leaves = [t.clone().requires_grad_() for t in (value, loc, weights)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half_value = torch.nn.functional.linear(leaves[0], torch.eye(4))  # bfloat16 here
        assert half_value.dtype == torch.bfloat16
        outs = [compat.MSDeformAttnFunction.apply(half_value, shapes, starts, *leaves[1:], 64),
                compat.multi_scale_deformable_attn_pytorch(half_value, shapes, *leaves[1:]),
                compat.deformable_attention_core_func(half_value, SHAPES, *leaves[1:]),
                compat.deformable_attention_core_func_v2(
                    half_value, SHAPES, leaves[1].flatten(3, 4), leaves[2].flatten(3), [3] * 3)]
    for out in outs:
        assert out.dtype == torch.bfloat16 and rel_err(out, expected) < 2e-2
    grads = torch.autograd.grad(sum(o.float().sum() for o in outs), leaves)
    assert [g.dtype for g in grads] == [torch.float32] * 3
    # float64 locations with float32 values: cast as mmcv casts them
    out = compat.multi_scale_deformable_attn_pytorch(value, shapes, loc.double(), weights.double())
    assert out.dtype == torch.float32 and rel_err(out, expected) < 1e-5


def test_bad_arguments_name_what_is_wrong():
    value, shapes, starts, loc, weights = _inputs()
    apply = compat.MSDeformAttnFunction.apply
    for step in (0, -1, 2.5, True, None):
        with pytest.raises(ValueError, match="im2col_step must be a positive int"):
            apply(value, shapes, starts, loc, weights, step)
    with pytest.raises(TypeError, match="value_level_start_index must be a torch.Tensor"):
        apply(value, shapes, [0, 30, 39], loc, weights, 64)
    with pytest.raises(TypeError, match="value_spatial_shapes must hold integer"):
        apply(value, shapes.double(), starts, loc, weights, 64)
    with pytest.raises(ValueError, match="value_spatial_shapes must hold at least one"):
        compat.deformable_attention_core_func(value, [(6, 5, 1)], loc, weights)
    with pytest.raises(TypeError, match="value_spatial_shapes must be"):
        compat.deformable_attention_core_func(value, 7, loc, weights)
    with pytest.raises(ValueError, match="spatial_shapes"):  # the op's own check: sizes vs S
        compat.deformable_attention_core_func(value, [(6, 5), (3, 3), (2, 2)], loc, weights)


def test_compiles_fullgraph():
    value, shapes, starts, loc, weights = _inputs(dtype=torch.float32)
    fn = torch.compile(compat.multi_scale_deformable_attn_pytorch, fullgraph=True,
                       backend="aot_eager")
    expected = naive_ms_deform_attn(value, shapes, starts, loc, weights).flatten(2)
    assert rel_err(fn(value, shapes, loc, weights), expected) < 1e-5


def _v2_reference(value, shapes, loc, weights, counts, core=naive_ms_deform_attn):
    """RT-DETRv2's core from its definition: each level samples its own points (``core``: the
    loop-based definition, or a differentiable single-level MSDA for gradients)."""
    starts = [0]
    for c in counts[:-1]:
        starts.append(starts[-1] + c)
    out = 0
    areas = [h * w for h, w in shapes]
    for lvl, (start, count) in enumerate(zip(starts, counts)):
        first = sum(areas[:lvl])
        level_value = value[:, first:first + areas[lvl]]
        level_shape = torch.tensor([shapes[lvl]])
        out = out + core(
            level_value, level_shape, torch.zeros(1, dtype=torch.int64),
            loc[:, :, :, None, start:start + count], weights[:, :, :, None, start:start + count])
    return out.flatten(2)


@pytest.mark.parametrize("counts", [[3, 3, 3], [4, 2, 1]], ids=["uniform", "per-level"])
def test_rtdetr_v2_core_matches_per_level_definition(counts):
    value, shapes, _, _, _ = _inputs()
    g = torch.Generator().manual_seed(3)
    N, Lq, M = value.shape[0], 7, value.shape[2]
    loc = torch.rand(N, Lq, M, sum(counts), 2, dtype=torch.float64, generator=g) * 1.2 - 0.1
    weights = torch.rand(N, Lq, M, sum(counts), dtype=torch.float64, generator=g)
    leaves = [t.clone().requires_grad_() for t in (value, loc, weights)]
    out = compat.deformable_attention_core_func_v2(*leaves[:1], SHAPES, *leaves[1:], counts)
    expected = _v2_reference(value, SHAPES, loc, weights, counts)
    assert out.shape == (N, Lq, M * value.shape[3]) and rel_err(out, expected) < 1e-12
    grad = torch.randn_like(out)
    out.backward(grad)
    ref = [t.clone().requires_grad_() for t in (value, loc, weights)]
    with use_backend("reference"):  # grid_sample, level by level: no padding involved
        _v2_reference(ref[0], SHAPES, ref[1], ref[2], counts,
                      core=lambda *a: ghostkernels.ms_deform_attn(*a).unflatten(2, (M, -1))
                      ).backward(grad)
    for got, want in zip(leaves, ref):
        assert rel_err(got.grad, want.grad) < 1e-10


def test_rtdetr_v2_core_rejects_what_it_does_not_provide():
    value, shapes, _, loc, weights = _inputs()
    loc2, w2 = loc.flatten(3, 4), weights.flatten(3, 4)
    with pytest.raises(NotImplementedError, match="'discrete'"):
        compat.deformable_attention_core_func_v2(value, SHAPES, loc2, w2, [3, 3, 3], "discrete")
    with pytest.raises(ValueError, match="sum\\(num_points_list\\) = 8"):
        compat.deformable_attention_core_func_v2(value, SHAPES, loc2, w2, [3, 3, 2])
    with pytest.raises(ValueError, match="num_points_list must hold a positive"):
        compat.deformable_attention_core_func_v2(value, SHAPES, loc2, w2, [9, 0, 0])
