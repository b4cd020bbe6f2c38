"""Static resource check of the CUDA C++ kernels for an H100 (sm_90), without a GPU.

Each torch-free kernel file (csrc/cuda/*_kernel.cu) is compiled by nvcc with the flags setup.py
and torch's extension builder use, with ``-Xptxas -v``; every instantiated kernel must keep its
register spills small. Not a timing: what it guards against is a change that makes a kernel spill
hundreds of bytes per thread to local memory, which only a GPU benchmark would otherwise show.
"""
import os
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNEL_FILES = sorted((ROOT / "csrc" / "cuda").glob("*_kernel.cu"))
# setup.py's nvcc flags, plus the defines torch's CUDAExtension adds
NVCC_FLAGS = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__",
              "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-D__CUDA_NO_HALF2_OPERATORS__", "-gencode=arch=compute_90,code=sm_90"]
# Spill stores per thread tolerated (bytes): the MSDA kernels spill 4-40 B in some
# instantiations (a few values around the int64 index arithmetic), which L1 absorbs.
MAX_SPILL_STORES = 64


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    candidate = os.path.join(home, "bin", "nvcc")
    return candidate if os.path.exists(candidate) else shutil.which("nvcc")


def parse_ptxas_report(text: str) -> dict[str, dict[str, int]]:
    """``{kernel: {"registers", "spill_stores", "spill_loads"[, "smem"]}}`` from ``ptxas -v``."""
    kernels, current = {}, None
    for line in text.splitlines():
        entry = re.search(r"Compiling entry function '([^']+)'", line)
        if entry:
            current = entry.group(1)
            kernels[current] = {"registers": 0, "spill_stores": 0, "spill_loads": 0}
            continue
        if current is None:
            continue
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spills:
            kernels[current]["spill_stores"] = int(spills.group(1))
            kernels[current]["spill_loads"] = int(spills.group(2))
        regs = re.search(r"Used (\d+) registers", line)
        if regs:
            kernels[current]["registers"] = int(regs.group(1))
        smem = re.search(r"(\d+) bytes smem", line)
        if smem:
            kernels[current]["smem"] = int(smem.group(1))
    return kernels


def test_parse_ptxas_report():
    text = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    24 bytes stack frame, 20 bytes spill stores, 28 bytes spill loads
ptxas info    : Used 56 registers, used 1 barriers, 24 bytes cumulative stack size, 46080 bytes smem
ptxas info    : Compiling entry function '_Z3barv' for 'sm_90'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers"""
    assert parse_ptxas_report(text) == {
        "_Z3fooPf": {"registers": 56, "spill_stores": 20, "spill_loads": 28, "smem": 46080},
        "_Z3barv": {"registers": 12, "spill_stores": 0, "spill_loads": 0}}


def _ptxas_reports(tmp_path) -> dict[str, dict[str, int]]:
    """``{"file.cu:mangled kernel name": report}`` for every csrc/cuda/*_kernel.cu, compiled
    once per test session (in parallel: the MSDA file alone takes ~20 s)."""
    if _REPORTS:
        return _REPORTS
    assert KERNEL_FILES, "no csrc/cuda/*_kernel.cu found"
    procs = [subprocess.Popen([_nvcc(), *NVCC_FLAGS, f"-I{ROOT / 'csrc'}", "-Xptxas", "-v", "-c",
                               str(path), "-o", str(tmp_path / f"{path.stem}.o")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for path in KERNEL_FILES]
    for path, proc in zip(KERNEL_FILES, procs):
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{path.name}:\n{out[-3000:]}"
        kernels = parse_ptxas_report(out)
        assert kernels, f"{path.name}: no kernel in the ptxas report:\n{out[-2000:]}"
        _REPORTS.update({f"{path.name}:{name}": r for name, r in kernels.items()})
    return _REPORTS


_REPORTS: dict[str, dict[str, int]] = {}


@pytest.mark.skipif(_nvcc() is None, reason="needs nvcc (CUDA_HOME or PATH)")
def test_cuda_kernels_compile_for_sm90_without_large_spills(tmp_path):
    reports = _ptxas_reports(tmp_path)
    spilling = {k: r for k, r in reports.items() if r["spill_stores"] > MAX_SPILL_STORES}
    assert not spilling, spilling
    assert max(r["registers"] for r in reports.values()) <= 255


@pytest.mark.skipif(_nvcc() is None, reason="needs nvcc (CUDA_HOME or PATH)")
def test_tensor_core_ghost_kernel_fits_three_blocks_per_sm(tmp_path):
    """ghost_conv_mma_kernel.cu is designed for 3 blocks of 320 threads per SM (30 warps to hide
    the latency of its load, multiply and store phases): <= 64 registers, <= 48 KB of static
    shared memory, and no register spilled."""
    mma = {k: r for k, r in _ptxas_reports(tmp_path).items()
           if k.startswith("ghost_conv_mma_kernel.cu:")}
    assert len(mma) == 4, sorted(mma)  # float16 / bfloat16 x NCHW / channels_last
    for name, r in mma.items():
        assert r["registers"] <= 64 and r["smem"] <= 48 * 1024, (name, r)
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (name, r)
