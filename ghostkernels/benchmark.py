"""Timing and table helpers shared by the benchmark scripts (benchmark-protocol.md).

GPU: ``triton.testing.do_bench`` medians (CUDA events, warm-up 25 ms, 200 ms of repeats) after one
untimed call. CPU: the median of at least 5 ``time.perf_counter`` runs after a warm-up.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch


def time_ms(fn, device: str, cpu_runs: int = 5) -> float:
    """Median milliseconds of ``fn()`` on ``device``."""
    fn()  # compile / autotune / warm caches
    if device == "cuda":
        import triton.testing
        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    times = []
    for _ in range(max(cpu_runs, 5)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def cuda_graph_replay(fn, warmup: int = 3):
    """``fn`` (a call on static CUDA tensors) captured in a CUDA graph, after ``warmup`` calls on
    a side stream; returns the graph's ``replay``. Timing replays measures the GPU work without
    the host's launch overhead."""
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):  # outside the capture (JIT compilation, caches, allocator)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


# Ops that only make a new view (no kernel launch): not counted by count_ops.
VIEW_OPS = frozenset({"view", "_unsafe_view", "reshape", "unsqueeze", "squeeze", "flatten",
                      "permute", "transpose", "t", "expand", "as_strided", "alias", "detach",
                      "slice", "select"})


def count_ops(fn) -> int:
    """How many operators ``fn()`` dispatches, views excluded (each is at least one kernel launch
    on a GPU): a device-independent measure of launch overhead, which dominates small batches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in VIEW_OPS:
                Counter.count += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Counter():
        fn()
    return Counter.count


def copy_bandwidth_gbs(device: str) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (2 GiB copy on a GPU)."""
    n = (2 << 30) // 4 if device == "cuda" else (256 << 20) // 4
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def machine_description(device: str) -> str:
    parts = [f"torch {torch.__version__}"]
    try:
        import triton
        parts.append(f"triton {triton.__version__}")
    except Exception:  # noqa: BLE001 - triton is optional on CPU
        pass
    if device == "cuda":
        parts.insert(0, torch.cuda.get_device_name())
        parts.append(f"CUDA {torch.version.cuda}")
    else:
        parts.insert(0, f"{platform.processor() or platform.machine()} CPU, "
                        f"{torch.get_num_threads()} threads")
    return ", ".join(parts)


@dataclass
class Row:
    group: str
    case: str
    implementation: str
    ms: float
    floor_ms: float | None = None
    ratios: dict = field(default_factory=dict)  # baseline name -> baseline_ms / ms
    note: str = ""


def markdown_table(rows: list[Row]) -> str:
    lines = ["| group | case | implementation | median ms | floor ms | time/floor | speed-up vs baselines | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        floor = f"{r.floor_ms:.4f}" if r.floor_ms else ""
        over = f"{r.ms / r.floor_ms:.1f}x" if r.floor_ms else ""
        ratios = ", ".join(f"{k} {v:.2f}x" for k, v in r.ratios.items())
        lines.append(f"| {r.group} | {r.case} | {r.implementation} | {r.ms:.4f} | {floor} | "
                     f"{over} | {ratios} | {r.note} |")
    return "\n".join(lines)


def write_outputs(rows: list[Row], header: str, out_dir: str | None, name: str,
                  echo: bool = True) -> None:
    """``name``.md and ``name``.json under ``out_dir`` (if given); ``echo`` also prints the table.
    Benchmarks call it with ``echo=False`` after each case too, so a run stopped at a time limit
    keeps the rows it has."""
    text = f"{header}\n\n{markdown_table(rows)}\n"
    if echo:
        print(text, flush=True)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
            f.write(text)
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump({"header": header, "rows": [asdict(r) for r in rows]}, f, indent=1)
