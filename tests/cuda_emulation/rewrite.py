"""Source rewriting that lets g++ compile a .cu file against the emulation headers.

Three CUDA constructs are not C++ even with the keyword macros of ``cuda_emulation.h``:

* ``kernel<<<grid, block[, shmem[, stream]]>>>(args)`` becomes
  ``::cuda_emu::launch(::cuda_emu::launch_config(grid, block, shmem, stream), kernel, args)``;
* ``extern __shared__ T name[];`` becomes a ``T*`` to the block's dynamic shared memory;
* ``__shared__ T name[N];`` becomes a reference to one ``T[N]`` object shared by the block
  (aligned as ``__align__(n)`` asks, if it does).

Line numbers are preserved (the rewritten file starts with a ``#line`` directive naming the
original), so compiler messages and the emulator's barrier sites point into csrc/.
"""
from __future__ import annotations

import re

_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([A-Za-z_][\w:<>, ]*?)\s+(\w+)\s*\[\s*\]\s*;")
_STATIC_SHARED = re.compile(
    r"__shared__\s+(?:__align__\((\d+)\)\s+)?([A-Za-z_][\w:<>, ]*?)\s+(\w+)\s*"
    r"((?:\[[^\];]+\]\s*)+);")


def _match_back(text: str, end: int, open_char: str, close_char: str) -> int:
    """Index of the ``open_char`` that balances the ``close_char`` at ``text[end]``."""
    depth = 0
    for i in range(end, -1, -1):
        if text[i] == close_char:
            depth += 1
        elif text[i] == open_char:
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced {close_char!r} before offset {end}")


def _match_forward(text: str, start: int, open_char: str, close_char: str) -> int:
    """Index of the ``close_char`` that balances the ``open_char`` at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_char:
            depth += 1
        elif text[i] == close_char:
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced {open_char!r} after offset {start}")


def _rewrite_one_launch(text: str, open_at: int) -> str:
    # The kernel expression: an identifier (with ::) and optional template arguments, before <<<.
    end = open_at
    while text[end - 1].isspace():
        end -= 1
    start = end
    if text[start - 1] == ">":
        start = _match_back(text, start - 1, "<", ">")
    while start > 0 and (text[start - 1].isalnum() or text[start - 1] in "_:"):
        start -= 1
    kernel = text[start:end]
    if not re.match(r"[A-Za-z_:]", kernel):
        raise ValueError(f"cannot find the kernel name of the launch at offset {open_at}")
    close_at = text.index(">>>", open_at)
    config = text[open_at + 3:close_at]
    paren = close_at + 3
    while text[paren].isspace():
        paren += 1
    if text[paren] != "(":
        raise ValueError(f"expected '(' after '>>>' at offset {paren}")
    paren_end = _match_forward(text, paren, "(", ")")
    args = text[paren + 1:paren_end]
    gap = text[end:open_at] + text[close_at + 3:paren]  # whitespace: keeps the line count
    call = f"::cuda_emu::launch(::cuda_emu::launch_config({config}), {kernel}"
    call += f",{args})" if args.strip() else ")"
    return text[:start] + call + gap + text[paren_end + 1:]


def rewrite(source: str, original_path: str) -> str:
    """The emulation-ready text of the CUDA source ``source`` (read from ``original_path``)."""
    text = source
    while (open_at := text.find("<<<")) != -1:
        text = _rewrite_one_launch(text, open_at)
    text = _EXTERN_SHARED.sub(
        lambda m: f"{m[1]}* {m[2]} = static_cast<{m[1]}*>(::cuda_emu::dynamic_shared());", text)
    text = _STATIC_SHARED.sub(
        lambda m: (f"auto& {m[3]} = ::cuda_emu::block_shared<{m[2]}{m[4].strip()}, "
                   f"{m[1] or 0}>();"), text)
    if text.count("\n") != source.count("\n"):
        raise AssertionError("the rewrite changed the line count")
    return f'#line 1 "{original_path}"\n' + text
