"""rtdetr.benchmark_parts: the forward's prefixes and the backbone budget of `rtdetr bench
--breakdown`."""
import json
import math
import re

import pytest
import torch

from ghostkernels.benchmark import Row
from rtdetr.benchmark_parts import PARTS, DetectorPrefix, backbone_budget, part_label
from tests.rtdetr.detector_cases import SIZE, tiny_detector


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("deployed", [False, True])
def test_prefixes_are_the_stages_of_the_forward(deployed):
    torch.manual_seed(0)
    model, _ = tiny_detector()
    if deployed:
        model.deploy()
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        features = model.backbone(images)
        memory = model.encoder(features)
        assert _same(DetectorPrefix(model, "backbone")(images), features)
        assert _same(DetectorPrefix(model, "backbone + encoder")(images), memory)
        assert _same(DetectorPrefix(model, "model")(images), model(images))
    assert not DetectorPrefix(model, "model").training  # follows the model's mode


def test_prefix_rejects_bad_arguments():
    model, _ = tiny_detector()
    with pytest.raises(ValueError, match="part must be one of .*got 'decoder'"):
        DetectorPrefix(model, "decoder")
    with pytest.raises(ValueError, match="part must be one of"):
        DetectorPrefix(model, "model + postprocessor")  # that one is EndToEndDetector
    with pytest.raises(TypeError, match="must have a backbone module .*got Linear"):
        DetectorPrefix(torch.nn.Linear(2, 2), "backbone")


def test_backbone_budget_is_reference_over_factor_minus_the_rest():
    rows = [Row("A", "c", part_label("m", "backbone"), 3.0, note="x=1"),
            Row("A", "c", "m", 9.0),
            Row("A", "d", part_label("m", "backbone"), 3.0),  # no reference in case d
            Row("A", "c", part_label("n", "backbone"), 1.0),  # no full row of mode n
            Row("B", "c", part_label("m", "backbone"), 2.0),  # the reference's own backbone
            Row("B", "c", "m", 15.0),
            Row("C", "c", part_label("m", "backbone"), math.nan),
            Row("C", "c", "m", 5.0)]
    backbone_budget(rows, "B", 1.5)
    # 15 / 1.5 - (9 - 3) = 4
    assert rows[0].note == ("x=1; 1.5x faster than B (15.000 ms) needs this backbone <= 4.000 ms "
                            "(rest of the model 6.000 ms)")
    assert [r.note for r in rows[1:]] == [""] * 7


def test_bench_breakdown_rows(tmp_path):
    """`rtdetr bench --breakdown`: every part of both models, and the budget note computed from
    the timed rows."""
    from rtdetr import benchmark
    assert benchmark.main(["--device", "cpu", "--models", "ghost100", "r18", "--size", "160",
                           "--quick", "--modes", "folded + fused", "--breakdown",
                           "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "detector.json").read_text())["rows"]
    ms = {(r["group"], r["implementation"]): r["ms"] for r in rows}
    for group in ("RT-DETR-GhostNetV3-1.0", "RT-DETR-R18"):
        for part in PARTS:
            assert ms[(group, part_label("folded + fused", part))] > 0
    ghost = "RT-DETR-GhostNetV3-1.0"
    (note,) = [r["note"] for r in rows
               if r["group"] == ghost and r["implementation"].endswith("[backbone]")]
    budget = float(re.search(r"backbone <= (-?[0-9.]+) ms", note).group(1))
    backbone = ms[(ghost, "folded + fused [backbone]")]
    expected = (ms[("RT-DETR-R18", "folded + fused")] / 1.5
                - (ms[(ghost, "folded + fused")] - backbone))
    assert budget == pytest.approx(expected, abs=1e-3)


def test_part_label_and_budget_reject_bad_arguments():
    with pytest.raises(ValueError, match="part must be one of .*got 'head'"):
        part_label("m", "head")
    for factor in (0, -1.5, "1.5", True):
        with pytest.raises(ValueError, match="factor must be a number > 0"):
            backbone_budget([], "B", factor)


def test_bench_detector_script_exits_with_the_status_of_rtdetr_bench(monkeypatch):
    """`python -m bench.bench_detector` is `rtdetr bench`: exit status 1 when a row failed."""
    import runpy
    from rtdetr import benchmark
    monkeypatch.setattr(benchmark, "main", lambda argv=None: 1)
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("bench.bench_detector", run_name="__main__")
    assert exit_.value.code == 1


def test_bench_times_the_unfolded_baseline_unfolded_whatever_the_order_of_modes(monkeypatch):
    """--modes "folded eager" "unfolded eager": the baseline row must not time the model that
    the earlier mode folded (deploy() cannot be undone)."""
    from rtdetr import benchmark
    monkeypatch.setattr(benchmark, "build", lambda config: tiny_detector())
    seen = []

    def run_mode(mode, model, *args):
        seen.append((mode, model.backbone.deployed))
        return [(PARTS[-1], 1.0, "")]

    monkeypatch.setattr(benchmark, "run_mode", run_mode)
    assert benchmark.main(["--device", "cpu", "--models", "ghost100", "--size", str(SIZE),
                           "--modes", "folded eager", "unfolded eager"]) == 0
    assert sorted(seen) == [("folded eager", True), ("unfolded eager", False)]
