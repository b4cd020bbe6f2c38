"""`rtdetr demo`, shrunken (tiny model, 64 px, a handful of images): the whole pipeline runs, the
summary has its fields, and the wall-clock budget stops training early but still evaluates."""
import json
import os

import pytest
import torch

from rtdetr import cli
from tests.rtdetr.test_cli import TINY


@pytest.fixture(autouse=True)
def restore_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def run_demo(tmp_path, capsys, *extra):
    out = tmp_path / "demo"
    tiny = [o for o in TINY if not o.startswith("train.max_steps")]
    assert cli.main(["demo", "--output-dir", str(out), *extra, *tiny,
                     "data.synthetic_num_train=9", "data.synthetic_num_val=4"]) == 0
    text = capsys.readouterr().out
    summary = json.load(open(out / "summary.json"))
    return out, text, summary


def test_demo_pipeline_and_time_budget(tmp_path, capsys):
    # A budget that every step overruns: training stops after its first step (of 3 per epoch).
    out, text, summary = run_demo(tmp_path, capsys, "--time-budget", "1e-9")
    assert torch.get_num_threads() == cli.DEMO_THREADS
    for key in ("AP", "AP50", "AP75", "train steps", "epochs", "train time s", "data time s",
                "fold rel diff", "total time s", "picture"):
        assert key in summary and key in text
    assert summary["train steps"] == 1 and summary["epochs"] == pytest.approx(1 / 3, abs=0.01)
    assert all(0.0 <= summary[k] <= 1.0 for k in ("AP", "AP50", "AP75"))
    assert float(summary["fold rel diff"]) < 1e-4
    assert os.path.isfile(summary["picture"]) and os.path.isfile(out / "run" / "last.pth")
    state = torch.load(out / "run" / "last.pth", weights_only=False)
    assert state["global_step"] == 1 and state["config"]["train"]["max_steps"] == 1
    assert state["metrics"]["AP50"] == summary["AP50"]


def test_demo_without_budget_runs_the_configured_epochs(tmp_path, capsys):
    _, _, summary = run_demo(tmp_path, capsys, "--time-budget", "0", "--threads", "1")
    assert summary["train steps"] == 3 and summary["epochs"] == 1.0


def test_demo_rejects_a_negative_budget(tmp_path):
    with pytest.raises(ValueError, match="--time-budget must be >= 0"):
        cli.main(["demo", "--output-dir", str(tmp_path), "--time-budget", "-1", *TINY])
