"""The native backend: the rotation as one C loop (``_loop.c``), for CPU calls in place and out of place.

The loop reads each element of x once and writes each result once, in place without any scratch, so it runs
at the cost of a copy. It is built on first use by the C compiler (``$CC``, else ``cc``) with
``-O3 -march=native -ffp-contract=off -fopenmp``, cached under ``$XDG_CACHE_HOME/flexrope`` (one file per
source, compiler and CPU), loaded with ``ctypes`` (which releases the GIL during the call). Its OpenMP library
is the one torch has already loaded (the same soname), so large calls run on torch's own threads,
``torch.get_num_threads()`` of them, and never compete with torch's operations for cores (a thread pool of its
own ran 20-40% slower next to them: torch's idle threads spin). A compiler without OpenMP builds a loop on one
thread. Building takes about a second. A machine without a working compiler turns this backend off for the
process, with one warning; the other backends run instead.
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

import torch

from ._errors import warn
from ._pairs import as_dtype, broadcast_to, compute_dtype, memory_order

SOURCE = Path(__file__).with_name("_loop.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC"]
OPENMP = ["-fopenmp"]
# From this many elements a call runs on torch.get_num_threads() threads.
THREADED_MIN_ELEMENTS = 1 << 16
# Rows rotated together where they share their angles along the dim outside the innermost one (the heads of
# one position in "b h s d"): the tables are read once per group. Reading them once per row, bfloat16
# "b h s d" in place ran at 2.0x a copy (the tables are twice x's bytes per row). As in _loop.c.
GROUP = 4
_FUNCTIONS = {torch.float32: "rotate_float32", torch.float64: "rotate_float64", torch.bfloat16: "rotate_bfloat16",
              torch.float16: "rotate_float16"}

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


def _build() -> ctypes.CDLL:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC)")
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(FLAGS + OPENMP).encode(), _cpu().encode()]))
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flexrope"
    path = cache / f"loop-{key.hexdigest()[:24]}.so"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as work:  # built aside, then moved: processes may race
            built = Path(work) / path.name
            for extra in (OPENMP, []):  # without OpenMP where the compiler has none (Apple's clang)
                result = subprocess.run([compiler, *FLAGS, *extra, str(SOURCE), "-o", str(built)],
                                        capture_output=True, text=True)
                if result.returncode == 0:
                    break
            else:
                raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[:500]}")
            os.replace(built, path)
    library = ctypes.CDLL(str(path))
    for name in _FUNCTIONS.values():
        function = getattr(library, name)
        function.restype = None
        function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 6
    return library


def _loaded() -> ctypes.CDLL | None:
    global _library, unavailable
    if _library is None and not unavailable:
        try:
            _library = _build()
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            unavailable = True
            warn(f"the native CPU loop could not be built ({error}); CPU calls use the other backends from now "
                 f"on", RuntimeWarning)
    return _library


def applies(x: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether the loop can rotate ``x`` into ``out`` (canonical views): CPU tensors with values (no fake
    tensors or modes that must see eager operations), contiguous channels."""
    return (
        not unavailable
        and x.device.type == "cpu"
        and x.dtype in _FUNCTIONS
        and torch._C._len_torch_dispatch_stack() == 0
        and x.stride(-1) == 1
        and out.stride(-1) == 1
    )


def rotate(x: torch.Tensor, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, rotary_dim: int,
           interleaved: bool) -> bool:
    """Write the rotation of canonical view ``x`` into canonical view ``out`` (which may be ``x``); ``cos`` and
    ``sin`` hold the r/2 angles per position, broadcastable to x's rows. False, writing nothing, where the loop
    could not be built."""
    library = _loaded()
    if library is None:
        return False
    order = memory_order(x)
    x_m, out_m = x.permute(order), out.permute(order)
    compute = compute_dtype(x.dtype)
    # contiguous before broadcasting: cos and sin share their strides, 0 on the dims they broadcast over
    cos_m, sin_m = (as_dtype(broadcast_to(t, x.ndim).permute(order), compute).contiguous()
                    .expand(*x_m.shape[:-1], rotary_dim // 2) for t in (cos, sin))
    dims = [d for d in range(x_m.ndim - 1) if x_m.shape[d] != 1] or [0]  # unit dims move no pointer
    sizes = [x_m.shape[d] for d in dims]
    geometry = torch.tensor([*sizes, *(t.stride(d) for t in (x_m, out_m, cos_m) for d in dims)], dtype=torch.int64)
    group = GROUP if len(sizes) >= 2 and cos_m.stride(dims[-2]) == 0 and sizes[-2] >= GROUP else 1
    outer = math.prod(sizes[:-2]) * -(-sizes[-2] // group) if len(sizes) >= 2 else 1
    threads = torch.get_num_threads() if x.numel() >= THREADED_MIN_ELEMENTS else 1
    # a unit of work is a run of the innermost dim at one group of outer indices; where there are fewer of
    # those than threads, a run is a tile of the innermost dim
    tile = sizes[-1] if outer >= threads else -(-sizes[-1] // threads)
    getattr(library, _FUNCTIONS[x.dtype])(
        x_m.data_ptr(), out_m.data_ptr(), cos_m.data_ptr(), sin_m.data_ptr(), len(sizes), geometry.data_ptr(),
        geometry.data_ptr() + 8 * len(sizes), tile, group, rotary_dim, x.shape[-1], int(interleaved), threads)
    return True
