"""Every `python -m bench.<module> ...` command of bench/gpu_check parses: a typo in an option
would otherwise cost a step of a (rare, minutes-long) GPU session."""
import argparse
import importlib
import pathlib
import re
import shlex

import pytest

GPU_CHECK = pathlib.Path(__file__).resolve().parents[1] / "bench" / "gpu_check"


def _commands():
    """(module, argv) of each bench module run by gpu_check, shell variables filled in."""
    text = GPU_CHECK.read_text().replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        match = re.search(r"\$PY -m (bench\.\w+)(.*)$", line)
        if not match:
            continue
        args = match.group(2).replace('"$RESULTS', '"/tmp/results').replace("$secs", "60")
        found.append((match.group(1), shlex.split(args, comments=True)))
    return found


COMMANDS = _commands()


class _Parsed(Exception):
    pass


def test_gpu_check_runs_the_bench_modules():
    modules = {module for module, _ in COMMANDS}
    assert {"bench.bench_msda", "bench.bench_ghost", "bench.bench_ghost_depthwise",
            "bench.bench_backbone",
            "bench.bench_detector", "bench.sweep_triton", "bench.profile_kernels"} <= modules


@pytest.mark.parametrize("module, argv", COMMANDS, ids=[" ".join([m] + a)[:60] for m, a in COMMANDS])
def test_gpu_check_command_parses(module, argv, monkeypatch):
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(parse(self, args, namespace))  # SystemExit(2) on an unknown option

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(_Parsed):
        importlib.import_module(module).main(argv)
