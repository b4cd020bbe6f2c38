"""Ahead-of-time compilation of Triton kernel launches for a GPU that is not here.

The Triton interpreter (how CI runs the Triton kernels on the CPU) executes kernels as NumPy code
and accepts programs that the real compiler rejects (types, layouts, atomics on unsupported
dtypes, ...). This module closes that gap without a GPU:

- ``record_launches(fn)`` runs ``fn`` with every interpreted kernel launch captured instead of
  executed, and returns each launch as a plain description (kernel module and name, argument
  types, constexpr values, num_warps): exactly the specialisations the launchers produce.
- ``python -m tests.triton_aot FILE`` (run WITHOUT ``TRITON_INTERPRET``, so ``triton.jit`` gives
  real JIT functions) compiles each described launch with ``triton.compile`` for
  ``GPUTarget("cuda", 90, 32)`` (H100) down to a cubin with the ptxas that Triton ships, with the
  specialisation the JIT would give the same arguments (divisibility by 16, the constant 1), and
  prints one JSON line per launch: ok with the registers and stack (spill) bytes per thread and
  the global loads by width, or the compiler's error.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import sys
import traceback

LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas")


def _specialize(value) -> tuple[str, object]:
    """``(type, attribute)`` of one runtime argument, computed by the function that Triton's JIT
    itself calls at launch (``native_specialize_impl``): pointers whose address and ints whose
    value are multiples of 16 get the divisibility attribute ``"D"`` (which lets the compiler
    vectorise loads and prove alignment), and an int equal to 1 becomes the constant 1. Compiling
    with the same specialisation as the JIT gives the code (and registers) a GPU would run."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    return native_specialize_impl(BaseBackend, value, False, True, True)


def describe_launch(kernel, args, kwargs) -> dict:
    """One interpreted launch ``kernel[grid](*args, **kwargs)`` as a JSON-able description."""
    import inspect
    import triton.language as tl
    fn = kernel.fn
    params = list(inspect.signature(fn).parameters.values())
    bound = dict(zip([p.name for p in params], args))
    bound.update({k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS})
    signature, constexprs, attrs = {}, {}, {}
    for p in params:
        value = bound.get(p.name, p.default)
        if p.annotation is tl.constexpr or p.annotation == "tl.constexpr" or value is None:
            signature[p.name] = "constexpr"
            constexprs[p.name] = value
            continue
        kind, attr = _specialize(value)
        if kind == "constexpr":  # the JIT's specialisation of the int 1
            signature[p.name] = "constexpr"
            constexprs[p.name] = attr
            continue
        signature[p.name] = kind
        if attr:
            attrs[p.name] = attr
    return {"module": fn.__module__, "kernel": fn.__name__, "signature": signature,
            "constexprs": constexprs, "attrs": attrs,
            "options": {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}}


@contextlib.contextmanager
def record_launches():
    """Within the block every interpreted Triton launch is recorded (appended to the yielded list)
    and NOT executed; outputs of the launchers are therefore garbage."""
    from triton.runtime.interpreter import InterpretedFunction
    launches: list[dict] = []
    original = InterpretedFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        if not warmup:
            launches.append(describe_launch(self, args, kwargs))

    InterpretedFunction.run = record
    try:
        yield launches
    finally:
        InterpretedFunction.run = original


def compile_launch(launch: dict) -> dict:
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
    kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    names = list(launch["signature"])
    attrs = {(names.index(name),): BaseBackend.parse_attr(desc)
             for name, desc in launch.get("attrs", {}).items()}
    source = ASTSource(fn=kernel, signature=launch["signature"], constexprs=launch["constexprs"],
                       attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=launch["options"] or {})
    return {"ok": True, "cubin_bytes": len(compiled.asm["cubin"]),
            "global_loads": global_loads(compiled.asm["ptx"]),
            **resource_usage(compiled.asm["cubin"])}


def global_loads(ptx: str) -> dict[str, int]:
    """How many global-memory load instructions of each shape the PTX has, as
    ``"<vector length>x<bits>"``: ``ld.global.v4.b32`` (16 bytes per thread) counts as ``"4x32"``,
    ``ld.global.b16`` as ``"1x16"``."""
    import re
    counts: dict[str, int] = {}
    for op in re.findall(r"\bld\.global\.\S+", ptx):
        parts = op.split(".")
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        bits = int(re.fullmatch(r"[bfsu](\d+)", parts[-1]).group(1))
        key = f"{vec}x{bits}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def resource_usage(cubin: bytes) -> dict:
    """Registers and stack (spill) bytes per thread of a cubin, read with the cuobjdump that
    Triton ships ({} when it is missing)."""
    import os
    import re
    import subprocess
    import tempfile
    import triton.backends.nvidia
    tool = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return {"registers": int(found.group(1)), "stack_bytes": int(found.group(2))} if found else {}


def main(path: str) -> int:
    with open(path) as f:
        launches = json.load(f)
    for launch in launches:
        try:
            result = compile_launch(launch)
        except Exception as exc:  # noqa: BLE001 - every launch is reported
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[-3000:],
                      "trace": traceback.format_exc()[-2000:]}
        result["kernel"] = launch["kernel"]
        result["signature"] = launch["signature"]
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
