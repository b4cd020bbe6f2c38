"""The drop-in entry points of ghostkernels.compat against the loop-based definition of MSDA, with
the argument conventions of Deformable-DETR, mmcv and RT-DETR."""
import pytest
import torch

import ghostkernels
from ghostkernels import compat
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
