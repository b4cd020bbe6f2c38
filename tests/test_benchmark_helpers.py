"""Benchmark helpers that can be checked without timing: operator counting, table output."""
import json

import torch

from ghostkernels.benchmark import Row, count_ops, write_outputs


def test_count_ops_counts_kernels_not_views():
    x = torch.randn(4, 6)
    assert count_ops(lambda: (torch.relu(x).view(-1).unsqueeze(0) + 1).sum()) == 3
    assert count_ops(lambda: x.view(2, 12).t()) == 0
    assert count_ops(lambda: x.view(2, 12).t().reshape(-1)) == 1  # not viewable: one copy


def test_write_outputs_writes_markdown_and_json(tmp_path, capsys):
    rows = [Row("g", "case", "impl", 2.0, floor_ms=1.0, ratios={"base": 1.5}, note="n")]
    write_outputs(rows, "# header", str(tmp_path), "t", echo=False)
    assert capsys.readouterr().out == ""
    assert "| g | case | impl | 2.0000 | 1.0000 | 2.0x | base 1.50x | n |" in \
        (tmp_path / "t.md").read_text()
    assert json.loads((tmp_path / "t.json").read_text())["rows"][0]["ms"] == 2.0
