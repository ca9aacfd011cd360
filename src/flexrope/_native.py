"""The native backend: the rotation as one C loop (``_loop.c``), for CPU calls in place and out of place.

The loop reads each element of x once and writes each result once, in place without any scratch, so it runs at the
cost of a copy. It is built on first use by the C compiler (``$CC``, split as a shell would, e.g. ``CC="ccache
gcc"``; else ``cc``) with ``-O3 -march=native -mprefer-vector-width=512 -ffp-contract=off -fopenmp`` and loaded with
``ctypes`` (which releases the GIL during the call). Its OpenMP library is the one torch has already loaded (the
same soname), so large calls run on torch's own threads, ``torch.get_num_threads()`` of them, and never compete with
torch's operations for cores (a thread pool of its own ran 25-60% slower next to them: torch's idle threads spin). A
compiler without OpenMP builds a loop on one thread. The first build takes about 2 s on a 2-core x86_64 machine
(1.9-2.3 s in five cold builds, nearly all of it ``cc``; 8-11 s on the same machine while other work kept its cores
busy); later processes load the built file in about 2 ms. A machine without a working compiler turns this backend
off for the process, with one warning; the other backends run instead. The library also computes the float32 tables
of a range of positions (dynamic NTK's rows at each decoding step) in one call.

Whatever library sits in the cache runs inside the process, so the cache is trusted only where nobody else could
have written it. It is ``$XDG_CACHE_HOME/flexrope`` (a relative ``XDG_CACHE_HOME`` is ignored, as the XDG spec
says: ``~/.cache/flexrope``), else, where that cannot be created or written and holds no build,
``<tempdir>/flexrope-<uid>``; one file per source, compiler, flags and CPU. The directory is created with mode
0700. Before anything is loaded, the directory and the file are opened without following symbolic links and
checked through those descriptors: a directory and a regular file, owned by this user, not writable by its
group or others; the file is then loaded through the descriptor that was checked (``/proc/self/fd``), so it
cannot be swapped in between. A cache that fails is never loaded from: one warning names it and what was wrong,
and the loop is built for this process alone in a fresh private directory (``tempfile.mkdtemp``, removed at
exit). Builds are written aside in a private directory next to the file, made unwritable by others, then
renamed into place, so no process ever sees a part of one. A library that is cut short (which the loader
would map and die on), does not load or lacks a function is built again once; if that fails too, the backend
is off for the process with one warning.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import hashlib
import math
import operator
import os
import platform
import shlex
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

from ._errors import warn
from ._kinds import plain
from ._pairs import as_dtype, compute_dtype, memory_order
from ._positions import RowStarts, Where, angles_at, position_tensor

SOURCE = Path(__file__).with_name("_loop.c")
# No contraction: the other backends' rounding. No errno from sqrt: the norm's square roots of a block of rows
# then run as one vector (sqrtf's errno held them one at a time: the fused bfloat16 norm 6% slower).
FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC"]
# Tried in order: a compiler without OpenMP (Apple's clang) builds a loop on one thread; one that does not know
# -march=native builds for the baseline of its target. Where the CPU has AVX-512, vectors of 512 bits (as torch's
# own AVX-512 kernels there): GCC and clang default to 256 bits even then; at 512, the fused norm ran 15-20%
# faster in bfloat16 and float32 and the rotation in place 5-25% (16 of 18 layout, dtype and pairing cases,
# none more than 4% slower). A compiler that does not know the option takes the next variant.
NATIVE = ["-march=native", "-mprefer-vector-width=512"]
VARIANTS = ([*NATIVE, "-fopenmp"], [*NATIVE], ["-march=native", "-fopenmp"], ["-march=native"], ["-fopenmp"], [])
# The most channels (the head dim) the loop takes: it keeps arrays of them on its stack (the norm's gains per pair,
# float16's angles spread per channel), which a head dim of 2^21 overflowed (the process died of SIGSEGV); past
# this, the eager kernels.
MAX_CHANNELS = 1 << 16
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
_COMPUTE = {dtype: compute_dtype(dtype) for dtype in _FUNCTIONS}
_WEIGHT_KINDS = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}  # as _loop.c reads them
library_path: Path | None = None  # the library this process loaded

unavailable = sys.platform == "win32"  # cc and -march=native: Linux and macOS
_library = None


def _compiler() -> list[str] | None:
    """The compiler's command: ``$CC`` split as a shell splits it (``CC="ccache gcc"``), else cc, gcc or clang."""
    command = shlex.split(os.environ.get("CC", ""))
    found = command or [shutil.which("cc") or shutil.which("gcc") or shutil.which("clang") or ""]
    return found if found[0] else None


def _cpu() -> str:
    """What -march=native compiles for: the CPU's model and flags where Linux says, else the platform."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() + platform.machine()


class _Refused(Exception):
    """A cache directory or library that someone else could have written: nothing is loaded from there."""


class _Broken(Exception):
    """A library that does not load, or lacks one of the loop's functions."""


def _checked(path: Path, kind: str, directory: int | None = None) -> int:
    """An open descriptor of ``path`` (its last part, opened in ``directory`` where given), a ``kind``
    ("directory" or "regular file") owned by this user that nobody else can write; _Refused where it is not.
    The checks read the open file itself (and a symbolic link is never followed), so what is checked is what
    is then read."""
    where = {"dir_fd": directory} if directory is not None else {}
    name = path.name if directory is not None else path
    directory_kind = kind == "directory"
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(name, flags | (os.O_DIRECTORY if directory_kind else 0), **where)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.EMLINK) or (directory_kind and error.errno == errno.ENOTDIR):
            kind_now = os.lstat(name, **where).st_mode
            raise _Refused(f"{path} is {'a symbolic link' if stat.S_ISLNK(kind_now) else f'not a {kind}'}"
                           ) from None
        raise
    status = os.fstat(fd)
    problem = (f"is not a {kind}" if not (stat.S_ISDIR if directory_kind else stat.S_ISREG)(status.st_mode)
               else f"is owned by uid {status.st_uid}, not by this user (uid {os.getuid()})"
               if status.st_uid != os.getuid()
               else f"can be written by its group or others (mode {stat.S_IMODE(status.st_mode):04o})"
               if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH) else None)
    if problem is not None:
        os.close(fd)
        raise _Refused(f"{path} {problem}")
    return fd


def _caches() -> list[Path]:
    """$XDG_CACHE_HOME/flexrope (~/.cache/flexrope: a relative XDG_CACHE_HOME is ignored, as the XDG spec says),
    then the user's own directory in the temporary directory (for a read-only home)."""
    caches = [Path(tempfile.gettempdir()) / f"flexrope-{os.getuid()}"]
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    try:
        home = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    except RuntimeError:  # no home directory
        return caches
    return [home / "flexrope", *caches] if home.is_absolute() else caches


def _cache(name: str = "") -> Path:
    """Where built loops live: the first of _caches() that exists or can be created (mode 0700), that is
    checked (_checked), and that can be written or already holds the library ``name``. _Refused where the first
    one there is fails the check; OSError where none is usable."""
    for cache in _caches():
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            try:
                cache.mkdir(mode=0o700)
            except FileExistsError:
                pass
            os.close(_checked(cache, "directory"))
        except OSError:
            continue  # a file in the way, or a read-only parent
        if os.access(cache, os.W_OK) or (name and (cache / name).exists()):
            return cache
    raise OSError(f"no writable directory for the built loop in {[str(c) for c in _caches()]} (set XDG_CACHE_HOME)")


def _declare(library: ctypes.CDLL) -> None:
    for name in _FUNCTIONS.values():
        function = getattr(library, name)
        function.restype = None
        function.argtypes = [ctypes.c_void_p] * 7
        norm = [ctypes.c_void_p] * 8 + [ctypes.c_int64, ctypes.c_double, ctypes.c_double]
        for function, argtypes in ((getattr(library, "norm_" + name), norm),
                                   (getattr(library, "norm_" + name + "_pair"), norm * 2)):
            function.restype = None
            function.argtypes = argtypes
    library.tables_float32.restype = None
    library.tables_float32.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2


_held: list[int] = []  # descriptors of the loaded libraries: their /proc names are never reused for another


def _whole(fd: int) -> bool:
    """Whether an ELF file holds every byte its headers point to: mapping a library cut short (a build or a copy
    interrupted) kills the process with SIGBUS when the loader touches its missing pages. Other files (Mach-O,
    garbage) are left to the loader, which refuses what it cannot read."""
    size, header = os.fstat(fd).st_size, os.pread(fd, 64, 0)
    if header[:4] != b"\x7fELF" or len(header) < 6 or header[4] not in (1, 2):
        return True
    order, wide = "<" if header[5] == 1 else ">", header[4] == 2
    if len(header) < (64 if wide else 52):
        return False
    phoff, shoff = struct.unpack_from(order + ("QQ" if wide else "II"), header, 32 if wide else 28)
    phentsize, phnum, shentsize, shnum = struct.unpack_from(order + "HHHH", header, 54 if wide else 42)
    if phoff + phnum * phentsize > size or shoff + shnum * shentsize > size:
        return False
    table = os.pread(fd, phnum * phentsize, phoff)
    for i in range(phnum):  # each segment's bytes in the file: p_offset and p_filesz
        offset, length = (struct.unpack_from(order + "QxxxxxxxxxxxxxxxxQ", table, i * phentsize + 8) if wide else
                          struct.unpack_from(order + "IxxxxxxxxI", table, i * phentsize + 4))
        if offset + length > size:
            return False
    return True


def _load(path: Path) -> ctypes.CDLL:
    """The library at ``path``, its directory and itself checked (_checked) first; on Linux, loaded through the
    descriptor that was checked. FileNotFoundError where there is none, _Broken where it does not load or lacks a
    function."""
    directory = _checked(path.parent, "directory")
    try:
        fd = _checked(path, "regular file", directory)
    finally:
        os.close(directory)
    if not _whole(fd):
        os.close(fd)
        raise _Broken(f"{path} is cut short")
    checked = f"/proc/self/fd/{fd}"
    if not os.path.exists(checked):  # no /proc: the path, if it is still the file that was checked
        checked = str(path)
        if not os.path.samestat(os.fstat(fd), os.lstat(path)):
            os.close(fd)
            raise _Refused(f"{path} changed while it was checked")
    try:
        library = ctypes.CDLL(checked)
    except OSError as error:
        os.close(fd)
        raise _Broken(f"{path} does not load ({error})") from None
    _held.append(fd)  # loaded: kept open, so that no later library is ever known by the same name
    try:
        _declare(library)
    except AttributeError as error:
        raise _Broken(f"{path} is not the loop ({error})") from None
    return library


def _compile(compiler: list[str], path: Path) -> None:
    """Build the loop into ``path``: aside in a private directory next to it, then renamed (processes may race,
    and nobody ever sees a part of the file), without write permission for anyone else."""
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        staged = Path(work) / path.name
        for variant in VARIANTS:
            result = subprocess.run([*compiler, *FLAGS, *variant, str(SOURCE), "-o", str(staged), "-lm"],
                                    capture_output=True, text=True)
            if result.returncode == 0:
                break
        else:
            raise RuntimeError(f"{shlex.join(compiler)} failed: {result.stderr.strip()[:500]}")
        os.chmod(staged, 0o700)
        os.replace(staged, path)


def _load_or_build(compiler: list[str], path: Path) -> ctypes.CDLL:
    """The library at ``path``; built there where there is none, built again (once) where it is broken."""
    try:
        return _load(path)
    except (FileNotFoundError, _Broken):
        pass
    _compile(compiler, path)
    try:
        return _load(path)
    except _Broken as error:
        raise RuntimeError(f"{error}, even once built again") from None


def _name(compiler: list[str]) -> str:
    """The library's file name: one per source, compiler, recipe and CPU."""
    source = SOURCE.read_bytes()
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, check=True).stdout
    recipe = repr((FLAGS, VARIANTS)).encode()
    key = hashlib.sha256(b"\0".join([source, version.encode(), recipe, _cpu().encode()]))
    return f"loop-{key.hexdigest()[:24]}.so"


def _build() -> tuple[ctypes.CDLL, Path]:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC)")
    name = _name(compiler)
    try:
        path = _cache(name) / name
        return _load_or_build(compiler, path), path
    except _Refused as error:
        refused = str(error)
    except OSError:  # no cache directory to be had: built for this process alone
        refused = None
    try:
        work = Path(tempfile.mkdtemp(prefix="flexrope-"))  # a fresh directory of this user's, mode 0700
        atexit.register(shutil.rmtree, work, ignore_errors=True)
        library = _load_or_build(compiler, work / name)
    except (OSError, RuntimeError, subprocess.SubprocessError, _Refused) as error:
        raise RuntimeError(f"{refused}, so nothing was loaded from there, and building in a private temporary "
                           f"directory failed too: {error}" if refused else str(error)) from None
    if refused:
        warn(f"the C loop was not loaded from the cache: {refused}, so someone else could have put code there. It "
             f"was built for this process alone in {work} instead. Make the cache yours alone (owned by you, mode "
             f"0700, no symbolic link) or remove it, to cache the loop again", RuntimeWarning)
    return library, work / name


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
          table_row: int, rotary_dim: int, interleaved: bool, inverse: bool, threads: int, norm: bool = False,
          index_strides: list[int] | None = None) -> tuple[Callable, torch.Tensor, int, Callable | None]:
    """The loop for x's dtype, its plan (the array of integers _loop.c reads), the plan's address and (for the
    norm) the loop that runs two calls in one (``*_pair``), for one
    geometry: the rows (x's dims but the channels, in memory order, unit dims dropped) with the strides of x,
    out, the tables, the positions and the out_index (``index_strides``, where rows go to out at the sequence
    indices it holds) along each dim of x."""
    out_strides, out_seq = list(out.stride()), 0
    if index_strides is not None:  # along the sequence, out is reached through the index
        out_seq, out_strides[x.ndim - 2] = out_strides[x.ndim - 2], 0
    else:
        index_strides = [0] * x.ndim
    order = memory_order(x)[:-1]
    dims = [d for d in order if x.shape[d] != 1] or [0]  # unit dims move no pointer
    sizes = [x.shape[d] for d in dims]
    varies = [table_strides[d] != 0 or positions_strides[d] != 0 for d in dims]  # the angles, along each dim
    # rows that share their angles along the innermost dim go in groups there (contiguous rows); else along
    # the dim outside it, where they share them there: GROUP of them for the rotation, all of them for the norm,
    # whose unit folds the norm's gains into each row's angles once for them all
    shared = len(sizes) >= 2 and varies[-1] and not varies[-2] and not any(index_strides) and not out_seq
    group = (sizes[-2] if norm else GROUP if sizes[-2] >= GROUP else 1) if shared else 1
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
                         *(strides[d] for strides in (x.stride(), out_strides, table_strides, positions_strides,
                                                      index_strides) for d in dims), out_seq], dtype=torch.int64)
    name = ("norm_" if norm else "") + _FUNCTIONS[x.dtype]
    return getattr(_library, name), plan, plan.data_ptr(), getattr(_library, name + "_pair") if norm else None


def _aligned(t: torch.Tensor, ndim: int) -> list[int]:
    """The strides of ``t`` over the last dims of an ``ndim``-dim tensor, 0 where t has none or broadcasts."""
    return [0] * (ndim - t.ndim) + [0 if size == 1 else stride for size, stride in zip(t.shape, t.stride())]


_plans: dict[tuple, tuple] = {}
_pickers: dict[tuple, Callable] = {}  # a layout's permutation of a tuple's items (an itemgetter, as fast as it gets)


def rotate(x: torch.Tensor, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, where: Where, *,
           rotary_dim: int, interleaved: bool, inverse: bool, weight: torch.Tensor | None = None, offset: float = 0.0,
           eps: float = 0.0, out_index: torch.Tensor | None = None) -> bool:
    """Write the rotation of ``x`` into ``out`` by the C loop: ``prepared``'s call, run. False, writing nothing,
    where the loop does not apply."""
    call = prepared(x, out, cos, sin, where, rotary_dim=rotary_dim, interleaved=interleaved, inverse=inverse,
                    weight=weight, offset=offset, eps=eps, out_index=out_index)
    if call is None:
        return False
    run([call])
    return True


def run(calls: list[tuple]) -> None:
    """Run ``prepared`` calls, in order: two calls of the norm's loop for one dtype (q's and k's) as one call of
    the library (its ``_pair`` function: one parallel region, and a token's table row read once for both where
    each is a unit per token), any others one by one."""
    calls = [call for call in calls if call]
    if len(calls) == 2 and calls[0][2] is not None and calls[0][2] is calls[1][2]:
        calls[0][2](*calls[0][1], *calls[1][1])
        return
    for function, arguments, _, _ in calls:
        function(*arguments)


def prepared(x: torch.Tensor, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, where: Where, *,
             rotary_dim: int, interleaved: bool, inverse: bool, weight: torch.Tensor | None = None,
             offset: float = 0.0, eps: float = 0.0, out_index: torch.Tensor | None = None,
             permutation: tuple[int, ...] | None = None) -> tuple | None:
    """The C loop's call that writes the rotation of canonical view ``x`` (*lead, b, h, s, d) into canonical view
    ``out`` (which may be ``x``) by the angles of the tables ``cos``, ``sin`` (context, >= r/2) at ``where`` (an
    int start, positions (s,) or (b, s), or RowStarts; their values already checked), negated where
    ``inverse``, made but not run (``run`` runs it): (function, arguments, the norm's two-call function or None,
    the tensors its arguments point into that nothing else may hold, held until it runs: the plan's array, tables
    or positions converted for the call), or () where x is empty. None where the loop does not
    apply: tensors off the CPU or not plain (subclasses such as fake tensors,
    vmap or grad wrappers: ``_kinds.plain``), a dispatch mode that must see eager operations, channels not
    contiguous or more than MAX_CHANNELS, or a loop that could not be built.

    The loop reads the tables where they are, at the positions where they are: a geometry seen before costs a
    dict lookup and the call. Tables of another dtype than the computation's (or whose strides differ) are
    converted, their rows at the positions first.

    With ``weight`` (the QK-norm's, checked by the caller: (d,) on the CPU), each row is first RMS-normalised
    (``eps``) and scaled by ``offset + weight`` in the compute dtype, in the same pass. The loop reads the weight
    where it is, at each call: nothing of it is remembered (a write through ``.data`` changes neither its address
    nor its version).

    With ``out_index`` (int64 (b, s), its values checked: each below out's sequence length, none repeated in a
    row), ``out`` may differ from x in its sequence length, and each token's row is written at the sequence
    index it holds there, or skipped where that is negative.

    With ``permutation``, x and out are as a layout has them, and the permutation of their dims that makes their
    canonical views: the views are then made only where a new plan needs them (a decoding step's four views
    cost more than the rest of this function)."""
    x_shape, x_stride, out_stride = x.shape, x.stride(), out.stride()
    if permutation is not None:
        pick = _pickers.get(permutation)
        if pick is None:
            pick = _pickers[permutation] = operator.itemgetter(*permutation)
        x_shape, x_stride, out_stride = pick(x_shape), pick(x_stride), pick(out_stride)
    if not (x.is_cpu and x.dtype in _FUNCTIONS and x_stride[-1] == 1 and out_stride[-1] == 1
            and x_shape[-1] <= MAX_CHANNELS and torch._C._len_torch_dispatch_stack() == 0
            ) or _library is None and _loaded() is None:
        return None
    if not (plain(x) and plain(cos) and plain(sin) and (isinstance(where, int) or plain(
            where.starts if isinstance(where, RowStarts) else where))):
        return None
    if not (out is x or plain(out)) or out_index is not None and not plain(out_index):  # (a caller's out too)
        return None
    if weight is not None and not plain(weight):  # (its shape and device checked by the caller)
        return None
    if x.numel() == 0:
        return ()
    compute, table_stride, first, positions = _COMPUTE[x.dtype], cos.stride(), 0, None
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
        where = position_tensor(where, x_shape[-2])
        cos, sin = (as_dtype(angles_at(t, where, x_shape[-2], rotary_dim // 2), compute) for t in (cos, sin))
        if cos.stride(-1) != 1 or cos.stride() != sin.stride():  # the loop reads both through one set of strides
            cos, sin = cos.contiguous(), sin.contiguous()
        geometry = (cos.shape, cos.stride(), None)
    threads = torch.get_num_threads()
    norm = weight is not None
    if norm:  # read by the loop in its own dtype where it can be, else converted for this call
        if weight.dtype not in _WEIGHT_KINDS or not weight.is_contiguous():
            weight = as_dtype(weight.detach(), compute).contiguous()
    if out_index is not None and out_index.dtype != torch.int64:
        out_index = out_index.to(torch.int64)
    indexed = out_index is not None and (out_index.shape, out_index.stride())
    key = (x_shape, x_stride, out_stride, geometry, x.dtype, rotary_dim, interleaved, inverse, threads, norm, indexed)
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= 256:
            _plans.clear()
        if permutation is not None:
            x, out = x.permute(permutation), out.permute(permutation)
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
        index_strides = None
        if out_index is not None:  # (b, s), over the b and s dims
            index_strides = [0] * ndim
            index_strides[seq_dim - 2], index_strides[seq_dim] = _aligned(out_index, 2)
        plan = _plans[key] = _plan(x, out, table_strides, positions_strides, row, rotary_dim, interleaved, inverse,
                                   threads, norm, index_strides)
    function, plan_array, address, pair = plan
    arguments = (x.data_ptr(), out.data_ptr(), cos.data_ptr() + first, sin.data_ptr() + first, address,
                 None if positions is None else positions.data_ptr(),
                 None if out_index is None else out_index.data_ptr())
    if norm:
        arguments += (weight.data_ptr(), _WEIGHT_KINDS[weight.dtype], offset, eps)
    # held with the call: the plan's array too (the cache of plans may drop it, full, before the call runs)
    return function, arguments, pair, (plan_array, cos, sin, positions, out_index, weight)


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
