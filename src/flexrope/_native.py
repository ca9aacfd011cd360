"""The native backend: the rotation as one C loop (``_loop.c``), for CPU calls in place and out of place.

The loop reads each element of x once and writes each result once, in place without any scratch, so it runs
at the cost of a copy. It is built on first use by the C compiler (``$CC``, else ``cc``) with
``-O3 -march=native -ffp-contract=off -fopenmp``, cached under ``$XDG_CACHE_HOME/flexrope`` (one file per
source, compiler and CPU), loaded with ``ctypes`` (which releases the GIL during the call). Its OpenMP library
is the one torch has already loaded (the same soname), so large calls run on torch's own threads,
``torch.get_num_threads()`` of them, and never compete with torch's operations for cores (a thread pool of its
own ran 25-60% slower next to them: torch's idle threads spin). A compiler without OpenMP builds a loop on one
thread. Building takes 0.3-1 s. A machine without a working compiler turns this backend off for the
process, with one warning; the other backends run instead. The library also computes the float32 tables of a
range of positions (dynamic NTK's rows at each decoding step) in one call.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

from ._errors import warn
from ._pairs import as_dtype, compute_dtype, memory_order
from ._positions import RowStarts, Where, angles_at, position_tensor

SOURCE = Path(__file__).with_name("_loop.c")
FLAGS = ["-O3", "-ffp-contract=off", "-shared", "-fPIC"]  # no contraction: the other backends' rounding
# Tried in order: a compiler without OpenMP (Apple's clang) builds a loop on one thread; one that does not know
# -march=native builds for the baseline of its target.
VARIANTS = (["-march=native", "-fopenmp"], ["-march=native"], ["-fopenmp"], [])
# From this many elements a call runs on torch.get_num_threads() threads.
THREADED_MIN_ELEMENTS = 1 << 16
# Rows rotated together where they share their angles along the dim outside the innermost one (the heads of
# one position in "b h s d"): the tables come from memory once per group. Reading them once per row, bfloat16
# "b h s d" in place ran at 2.0x a copy (the tables are twice x's bytes per row). As in _loop.c.
GROUP = 4
# Grouped rows walk the innermost dim (the tokens of "b h s d") in tiles whose table rows, at most this many
# bytes of cos and sin, stay in the nearest caches while every group of the dim outside it (all the heads) is
# rotated by them. With a whole sequence per group, the tables came back from far caches or memory once per
# group: bfloat16 "b h s d" in place ran 1.6x slower than "b s h d", whose heads share each table row in turn.
TABLE_TILE_BYTES = 32 * 1024
_FUNCTIONS = {torch.float32: "rotate_float32", torch.float64: "rotate_float64", torch.bfloat16: "rotate_bfloat16",
              torch.float16: "rotate_float16"}
library_path: Path | None = None  # the library this process loaded

unavailable = sys.platform == "win32"  # cc and -march=native: Linux and macOS
_library = None


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cpu() -> str:
    """What -march=native compiles for: the CPU's model and flags where Linux says, else the platform."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() + platform.machine()


def _cache() -> Path:
    """Where built loops live: $XDG_CACHE_HOME/flexrope (~/.cache/flexrope), else the user's own directory
    in the temporary directory (a read-only home)."""
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flexrope"
    for cache in (home, Path(tempfile.gettempdir()) / f"flexrope-{os.getuid()}"):
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(cache, os.W_OK):
            return cache
    raise RuntimeError(f"no writable directory for the built loop ({home} is not; set XDG_CACHE_HOME)")


def _build() -> tuple[ctypes.CDLL, Path]:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC)")
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    recipe = repr((FLAGS, VARIANTS)).encode()
    key = hashlib.sha256(b"\0".join([source, version.encode(), recipe, _cpu().encode()]))
    path = _cache() / f"loop-{key.hexdigest()[:24]}.so"
    if not path.exists():
        with tempfile.TemporaryDirectory(dir=path.parent) as work:  # built aside, then moved: processes may race
            staged = Path(work) / path.name
            for variant in VARIANTS:
                result = subprocess.run([compiler, *FLAGS, *variant, str(SOURCE), "-o", str(staged), "-lm"],
                                        capture_output=True, text=True)
                if result.returncode == 0:
                    break
            else:
                raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[:500]}")
            os.replace(staged, path)
    library = ctypes.CDLL(str(path))
    for name in _FUNCTIONS.values():
        function = getattr(library, name)
        function.restype = None
        function.argtypes = [ctypes.c_void_p] * 6
        function = getattr(library, "norm_" + name)
        function.restype = None
        function.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_double]
    library.tables_float32.restype = None
    library.tables_float32.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2
    return library, path


def _loaded() -> ctypes.CDLL | None:
    global _library, library_path, unavailable
    if _library is None and not unavailable:
        try:
            _library, library_path = _build()
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            unavailable = True
            warn(f"the C loop for CPU calls could not be built ({error}); CPU calls use the eager kernels from "
                 f"now on", RuntimeWarning)
    return _library


def _plan(x: torch.Tensor, out: torch.Tensor, table_strides: list[int], positions_strides: list[int],
          table_row: int, rotary_dim: int, interleaved: bool, inverse: bool, threads: int, norm: bool = False
          ) -> tuple[Callable, torch.Tensor, int]:
    """The loop for x's dtype, its plan (the array of integers _loop.c reads) and the plan's address, for one
    geometry: the rows (x's dims but the channels, in memory order, unit dims dropped) with the strides of x,
    out, the tables and the positions along each dim of x."""
    order = memory_order(x)[:-1]
    dims = [d for d in order if x.shape[d] != 1] or [0]  # unit dims move no pointer
    sizes = [x.shape[d] for d in dims]
    varies = [table_strides[d] != 0 or positions_strides[d] != 0 for d in dims]  # the angles, along each dim
    # rows that share their angles along the innermost dim go in groups there (contiguous rows); else along
    # the dim outside it, where they share them there
    group = GROUP if len(sizes) >= 2 and varies[-1] and not varies[-2] and sizes[-2] >= GROUP and not norm else 1
    outer = math.prod(sizes[:-2]) * -(-sizes[-2] // group) if len(sizes) >= 2 else 1
    threads = threads if x.numel() >= THREADED_MIN_ELEMENTS else 1
    # a unit of work is a run of the innermost dim at one group of outer indices; where there are fewer of
    # those than threads, a run is a tile of the innermost dim, and grouped rows take short tiles (the loop
    # runs every group of outer indices through one tile before the next tile)
    tile = sizes[-1] if outer >= threads else -(-sizes[-1] // threads)
    if group > 1:
        tile = min(tile, max(8, TABLE_TILE_BYTES // (rotary_dim * compute_dtype(x.dtype).itemsize)))
    plan = torch.tensor([len(sizes), tile, group, rotary_dim, x.shape[-1], int(interleaved), -1 if inverse else 1,
                         threads, table_row, *sizes,
                         *(strides[d] for strides in (x.stride(), out.stride(), table_strides, positions_strides)
                           for d in dims)], dtype=torch.int64)
    return getattr(_library, ("norm_" if norm else "") + _FUNCTIONS[x.dtype]), plan, plan.data_ptr()


def _aligned(t: torch.Tensor, ndim: int) -> list[int]:
    """The strides of ``t`` over the last dims of an ``ndim``-dim tensor, 0 where t has none or broadcasts."""
    return [0] * (ndim - t.ndim) + [0 if size == 1 else stride for size, stride in zip(t.shape, t.stride())]


_plans: dict[tuple, tuple] = {}


def rotate(x: torch.Tensor, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, where: Where, *,
           rotary_dim: int, interleaved: bool, inverse: bool, gain: torch.Tensor | None = None, eps: float = 0.0
           ) -> bool:
    """Write the rotation of canonical view ``x`` (*lead, b, h, s, d) into canonical view ``out`` (which may be
    ``x``) by the angles of the tables ``cos``, ``sin`` (context, >= r/2) at ``where`` (an int start, positions
    (s,) or (b, s), or RowStarts; their values already checked), negated where ``inverse``. False, writing
    nothing, where the loop does not apply: tensors off the CPU or without values (fake tensors, or a dispatch
    mode that must see eager operations), channels not contiguous, or a loop that could not be built.

    The loop reads the tables where they are, at the positions where they are: a geometry seen before costs a
    dict lookup and the call. Tables of another dtype than the computation's (or whose strides differ) are
    converted, their rows at the positions first.

    With ``gain`` (the QK-norm's offset + weight, (d,) contiguous in the compute dtype), each row is first
    RMS-normalised (``eps``) and scaled by it, in the same pass."""
    x_stride, out_stride = x.stride(), out.stride()
    if not (x.is_cpu and x.dtype in _FUNCTIONS and x_stride[-1] == 1 and out_stride[-1] == 1
            and torch._C._len_torch_dispatch_stack() == 0) or _loaded() is None:
        return False
    if x.numel() == 0:
        return True
    compute, table_stride, first, positions = compute_dtype(x.dtype), cos.stride(), 0, None
    converted = not (cos.dtype == compute and table_stride[-1] == 1 and table_stride == sin.stride())
    if not converted:
        if isinstance(where, int):
            first = where * table_stride[0] * cos.element_size()  # rows where.. of the whole tables
        else:
            positions = where.starts if isinstance(where, RowStarts) else where
            if positions.dtype != torch.int64 or not positions.is_cpu:
                positions = positions.to("cpu", torch.int64)
        geometry = (table_stride, type(where), positions is not None and (positions.shape, positions.stride()))
    else:
        where = position_tensor(where, x.shape[-2])
        cos, sin = (as_dtype(angles_at(t, where, x.shape[-2], rotary_dim // 2), compute) for t in (cos, sin))
        if cos.stride(-1) != 1 or cos.stride() != sin.stride():  # the loop reads both through one set of strides
            cos, sin = cos.contiguous(), sin.contiguous()
        geometry = (cos.shape, cos.stride(), None)
    threads = torch.get_num_threads()
    norm = gain is not None
    key = (x.shape, x_stride, out_stride, geometry, x.dtype, rotary_dim, interleaved, inverse, threads, norm)
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= 256:
            _plans.clear()
        seq_dim, ndim = x.ndim - 2, x.ndim
        table_strides, positions_strides, row = [0] * ndim, [0] * ndim, cos.stride(0)
        if converted:  # the rows of each token, over x's dims
            table_strides, row = _aligned(cos, ndim), 0
        elif positions is None or isinstance(where, RowStarts):  # rows start.., along s
            table_strides[seq_dim] = row
        if isinstance(where, RowStarts):
            positions_strides[seq_dim - 2] = _aligned(positions, 1)[0]
        elif positions is not None:  # (s,) or (b, s), over the b and s dims
            aligned = _aligned(positions, 2)
            positions_strides[seq_dim - 2], positions_strides[seq_dim] = aligned
        plan = _plans[key] = _plan(x, out, table_strides, positions_strides, row, rotary_dim, interleaved, inverse,
                                   threads, norm)
    function, _, address = plan
    arguments = (x.data_ptr(), out.data_ptr(), cos.data_ptr() + first, sin.data_ptr() + first, address,
                 None if positions is None else positions.data_ptr())
    if norm:
        function(*arguments, gain.data_ptr(), eps)
    else:
        function(*arguments)
    return True


def tables(inv_freq: torch.Tensor, positions: range) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Half-width float32 cos and sin tables (len(positions), n) of a range of positions, from float64
    ``inv_freq`` (n,) on the CPU, in one call of the C library; None where that does not apply (the library
    not built, a dispatch mode or torch.compile that must see tensor operations)."""
    if (torch.compiler.is_compiling() or positions.step != 1 or inv_freq.dtype != torch.float64
            or not inv_freq.is_cpu or torch._C._len_torch_dispatch_stack() != 0 or _loaded() is None):
        return None
    inv_freq = inv_freq.contiguous()
    cos, sin = torch.empty(2, len(positions), inv_freq.numel()).unbind(0)
    _library.tables_float32(inv_freq.data_ptr(), inv_freq.numel(), positions.start, len(positions), cos.data_ptr(),
                            sin.data_ptr())
    return cos, sin
