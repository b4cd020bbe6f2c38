"""The pytest-benchmark suite (bench/test_benchmarks.py) runs: every case once, as a plain test
(``--benchmark-disable``), so a broken case shows up in CI rather than when someone times it."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_benchmark_suite_runs_every_case_once():
    pytest.importorskip("pytest_benchmark", reason="the suite needs pytest-benchmark "
                        "(scripts/setup_env.sh installs it)")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "pytest", "bench/test_benchmarks.py",
                           "--benchmark-disable", "-q", "-p", "no:cacheprovider", "-p",
                           "no:xdist"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    passed = re.search(r"(\d+) passed", proc.stdout)
    # MSDA fwd and fwd+bwd, Ghost op, depthwise, DFC gate, SE: at least the reference and (with
    # the extension) the C++ backend of each, at one case each on the CPU
    assert passed and int(passed.group(1)) >= 6, proc.stdout[-2000:]
    assert "failed" not in proc.stdout and "error" not in proc.stdout.lower(), proc.stdout[-2000:]
