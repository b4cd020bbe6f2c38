"""Compile csrc/cuda/*.cu with the host C++ compiler into emulated shared libraries (cached).

Each library = the rewritten kernel sources (rewrite.py) + one binding file (bindings/) + the
scheduler (runtime.cpp), compiled with ``-include cuda_emulation.h`` and the shadow CUDA headers of
include/. The cache directory is keyed on the hash of every input (kernel sources, emulation
sources, compiler version, flags), so an edit anywhere rebuilds; concurrent test workers (xdist)
serialise on a lock file and share the result.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.cuda_emulation.rewrite import rewrite

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
KERNEL_DIR = REPO / "csrc" / "cuda"
FLAGS = ["-std=c++20", "-O1", "-fPIC", "-g0", "-fno-strict-aliasing", "-Wall",
         "-Wno-unknown-pragmas", "-Wno-unused-function", "-Wno-unused-variable"]
# Undefined behaviour that a GPU would also punish (a misaligned vector access is a launch failure)
# or that hides an indexing bug; runtime.cpp reports each as a launch failure.
CHECKS = ["-fsanitize=alignment,bounds,signed-integer-overflow,shift,integer-divide-by-zero"]

MSDA = [KERNEL_DIR / "ms_deform_attn_kernel.cu", HERE / "bindings" / "ms_deform_attn.cpp"]
GHOST = [KERNEL_DIR / "ghost_conv_kernel.cu", KERNEL_DIR / "ghost_conv_mma_kernel.cu",
         KERNEL_DIR / "depthwise_conv_kernel.cu", HERE / "bindings" / "ghost_ops.cpp"]
DFC_GATE = [KERNEL_DIR / "dfc_gate_kernel.cu", HERE / "bindings" / "dfc_gate.cpp"]
# name -> (sources: .cu files are rewritten first, __CUDA_ARCH__ the device code sees)
LIBRARIES = {
    "ms_deform_attn_sm90": (MSDA, 900),
    "ms_deform_attn_sm80": (MSDA, 800),
    "ghost_ops": (GHOST, 900),
    "dfc_gate": (DFC_GATE, 900),
    "selftest": ([HERE / "selftest_kernels.cu"], 900),
}


class CompilerMissing(RuntimeError):
    pass


def find_compiler() -> str:
    for name in [os.environ.get("CXX", ""), "g++", "c++", "clang++"]:
        if name and (path := shutil.which(name)):
            return path
    raise CompilerMissing("no C++ compiler found (set CXX, or install g++)")


def _inputs() -> list[Path]:
    kernel_files = sorted(p for p in KERNEL_DIR.iterdir() if p.suffix in (".cu", ".h", ".cuh"))
    own = sorted((HERE / "include").iterdir()) + sorted((HERE / "bindings").iterdir())
    return kernel_files + own + [HERE / "selftest_kernels.cu", HERE / "runtime.cpp",
                                 HERE / "rewrite.py", Path(__file__)]


def _cache_key(compiler: str) -> str:
    h = hashlib.sha256()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             check=True).stdout
    h.update(version.encode())
    h.update(" ".join(FLAGS + CHECKS).encode())
    for path in _inputs():
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:20]


def _run_all(commands: list[list[str]]) -> None:
    """Run compiler commands, as many at a time as there are CPUs; raise on the first failure."""
    pending = list(commands)
    running: list[tuple[list[str], subprocess.Popen]] = []
    jobs = max(1, min(len(os.sched_getaffinity(0)), 4))
    while pending or running:
        while pending and len(running) < jobs:
            cmd = pending.pop(0)
            running.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                  stderr=subprocess.STDOUT, text=True)))
        cmd, proc = running.pop(0)
        output, _ = proc.communicate()
        if proc.returncode != 0:
            for _, other in running:
                other.kill()
            raise RuntimeError(f"emulation build failed: {' '.join(cmd)}\n{output}")


def _build_into(out: Path, compiler: str) -> None:
    src = out / "src"  # rewritten CUDA sources: headers keep their names, x.cu becomes x.cu.cpp
    src.mkdir()
    cuda_files = {p for p in KERNEL_DIR.iterdir() if p.suffix in (".cu", ".h", ".cuh")}
    cuda_files.add(HERE / "selftest_kernels.cu")
    for path in cuda_files:
        name = path.name + (".cpp" if path.suffix == ".cu" else "")
        (src / name).write_text(rewrite(path.read_text(), str(path.relative_to(REPO))))
    base = [compiler, *FLAGS, f"-I{HERE / 'include'}", f"-I{src}", "-include", "cuda_emulation.h"]
    runtime = out / "runtime.o"
    compiles = [base + ["-c", str(HERE / "runtime.cpp"), "-o", str(runtime)]]
    links = []
    for name, (sources, arch) in LIBRARIES.items():
        flags = base + CHECKS + [f"-DGK_EMU_CUDA_ARCH={arch}"]
        objects = [runtime]
        for source in sources:
            if source.suffix == ".cu":
                source = src / (source.name + ".cpp")
            obj = out / f"{name}.{source.stem}.o"
            compiles.append(flags + ["-c", str(source), "-o", str(obj)])
            objects.append(obj)
        links.append([compiler, "-shared", "-Wl,-z,defs", "-o", str(out / f"{name}.so"),
                      *map(str, objects)])
    _run_all(compiles)
    _run_all(links)
    for obj in out.glob("*.o"):
        obj.unlink()


def _prune(root: Path, keep: int = 4) -> None:
    """Drop all but the ``keep`` most recent builds (each source edit makes a new one)."""
    builds = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith("building-")]
    builds.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in builds[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(os.environ.get("GHOSTKERNELS_EMULATION_CACHE", default / "ghostkernels" /
                               "cuda_emulation"))


def build(root: Path | None = None) -> dict[str, Path]:
    """Paths of the emulated libraries (name -> .so), building them unless cached."""
    compiler = find_compiler()
    root = Path(root) if root is not None else cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / _cache_key(compiler)
    paths = {name: final / f"{name}.so" for name in LIBRARIES}
    with open(root / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not final.is_dir():
            work = Path(tempfile.mkdtemp(dir=root, prefix="building-"))
            try:
                _build_into(work, compiler)
                work.rename(final)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            _prune(root)
    return paths
