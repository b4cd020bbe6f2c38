"""Build ghostkernels._C: C++ CPU kernels always, CUDA kernels when torch and nvcc allow.

Environment:
  GHOSTKERNELS_CUDA=auto|0|1   auto (default): build CUDA when torch has CUDA and nvcc is found;
                               0: never; 1: always (fail loudly if it cannot).
  GHOSTKERNELS_NO_EXTENSION=1  install the pure-Python package only (reference/Triton backends).
  TORCH_CUDA_ARCH_LIST         as usual for torch extensions (e.g. "9.0").
  MAX_JOBS                     parallel compile jobs (ninja).
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _want_cuda(torch_has_cuda: bool, cuda_home) -> bool:
    mode = os.environ.get("GHOSTKERNELS_CUDA", "auto").strip().lower()
    if mode in ("0", "off", "false", "no"):
        return False
    found = torch_has_cuda and cuda_home is not None
    if mode in ("1", "on", "true", "yes"):
        if not found:
            sys.exit(
                "GHOSTKERNELS_CUDA=1 but the CUDA build is impossible: "
                f"torch CUDA build={torch_has_cuda}, CUDA_HOME={cuda_home!r}. "
                "Install a CUDA build of torch and set CUDA_HOME=/usr/local/cuda."
            )
        return True
    if mode != "auto":
        sys.exit(f"GHOSTKERNELS_CUDA must be auto, 0 or 1, got {mode!r}")
    return found


def extensions():
    if os.environ.get("GHOSTKERNELS_NO_EXTENSION", "0") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cpu_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) +
                       glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    link_flags = ["-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _want_cuda(torch.version.cuda is not None, cpp_extension.CUDA_HOME):
        cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")) +
                            glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        ext = cpp_extension.CUDAExtension(
            "ghostkernels._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("GHOSTKERNELS_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-std=c++20", "-lineinfo",
                         "--expt-relaxed-constexpr"],
            },
            extra_link_args=link_flags,
        )
    else:
        ext = cpp_extension.CppExtension(
            "ghostkernels._C",
            cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = extensions()

setup(
    name="ghostkernels",
    version="0.1.0",
    description="Fused GPU kernels (Triton, CUDA C++, C++ CPU) for deformable attention and "
                "re-parameterised Ghost ops, and the RT-DETR detector built on them",
    packages=find_packages(include=["ghostkernels", "ghostkernels.*", "rtdetr", "rtdetr.*"]),
    package_data={"rtdetr": ["configs/*.yaml"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "pyyaml", "scipy", "tqdm", "pillow"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "pytest-benchmark", "ninja", "timm", "pycocotools", "onnx",
                 "onnxruntime"],
        "eval": ["pycocotools"],
        "export": ["onnx", "onnxruntime"],
    },
    entry_points={"console_scripts": ["rtdetr=rtdetr.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
