"""The C loop's cache: nothing is loaded from a place someone else could have written. Libraries that announce
themselves when loaded (a constructor writes a marker file) are planted under the exact name the real loop would
have, in every place another user could reach; none may run, and every result equals the eager kernels'."""

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import flexrope
from flexrope import _native, compute_rope

REAL_COMPILE = _native._compile

PLANTED_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void announce(void) {
    const char *marker = getenv("FLEXROPE_PLANTED_MARKER");
    FILE *f = marker ? fopen(marker, "a") : NULL;
    if (f) { fputs("planted library ran\n", f); fclose(f); }
}
void rotate_float32(void) {}
void rotate_float64(void) {}
void rotate_bfloat16(void) {}
void rotate_float16(void) {}
void norm_rotate_float32(void) {}
void norm_rotate_float64(void) {}
void norm_rotate_bfloat16(void) {}
void norm_rotate_float16(void) {}
#ifndef WITHOUT_TABLES
void tables_float32(void) {}
#endif
"""


def _cc(source: Path, out: Path, *flags: str) -> Path:
    subprocess.run([*_native._compiler(), "-shared", "-fPIC", *flags, str(source), "-o", str(out)], check=True)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One real build of the loop, a planted library, and one lacking a function, with the loop's file name."""
    root = tmp_path_factory.mktemp("built")
    compiler = _native._compiler()
    good = root / "good" / _native._name(compiler)
    good.parent.mkdir()
    _native._compile(compiler, good)
    (root / "planted.c").write_text(PLANTED_C)
    planted = _cc(root / "planted.c", root / "planted.so")
    lacking = _cc(root / "planted.c", root / "lacking.so", "-DWITHOUT_TABLES")
    return {"good": good, "planted": planted, "lacking": lacking, "name": good.name}


@pytest.fixture
def private(monkeypatch, tmp_path, built):
    """A process state of its own (no loop loaded yet, restored after), caches under tmp_path, and compiling
    replaced by copying the one real build (counted)."""
    for name, value in (("_library", None), ("unavailable", False), ("library_path", None), ("_plans", {})):
        monkeypatch.setattr(_native, name, value)
    home, temp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    temp.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setenv("FLEXROPE_PLANTED_MARKER", str(tmp_path / "marker"))
    state = {**built, "home": home / ".cache" / "flexrope", "temp": temp, "marker": tmp_path / "marker",
             "compiled": [], "root": tmp_path, "source": built["good"]}

    def copy(compiler, path):
        state["compiled"].append(path)
        with tempfile.TemporaryDirectory(dir=path.parent) as work:  # as _compile: aside, then renamed
            staged = Path(work) / path.name
            shutil.copyfile(state["source"], staged)
            os.chmod(staged, 0o700)
            os.replace(staged, path)

    monkeypatch.setattr(_native, "_compile", copy)
    return state


def _plant(directory: Path, library: Path, name: str, mode: int = 0o700) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    shutil.copyfile(library, target)
    os.chmod(target, mode)
    return target


def _calls_equal_eager(monkeypatch) -> None:
    """Native calls (out of place and in place, and the tables of a range of positions) equal the eager ones."""
    cos, sin = flexrope.precompute_rope_params(16, context_length=64)
    x = torch.randn(2, 3, 40, 16)
    results = {}
    for backend in ("native", "eager"):
        monkeypatch.setenv("FLEXROPE_BACKEND", backend)
        inplace = x.clone()
        compute_rope(inplace, cos, sin, "b h s d", offset=5, inplace=True)
        results[backend] = (compute_rope(x, cos, sin, "b h s d", offset=5), inplace)
    assert all(torch.equal(a, b) for a, b in zip(results["native"], results["eager"]))
    inv_freq = 10_000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    tables = _native.tables(inv_freq, range(3, 40))
    if tables is not None:
        angles = torch.arange(3, 40, dtype=torch.float64)[:, None] * inv_freq
        assert torch.allclose(tables[0].double(), angles.cos(), atol=1e-6)


def _refused_and_private(private, monkeypatch, refused: str) -> None:
    """One warning naming the refused place; the loop built in a fresh private directory, never loaded from
    there; the planted library never ran; the results the eager kernels'."""
    with pytest.warns(RuntimeWarning) as caught:
        assert _native._loaded() is not None
    messages = [str(w.message) for w in caught if "C loop" in str(w.message)]
    assert len(messages) == 1 and refused in messages[0] and "was not loaded from the cache" in messages[0], messages
    assert caught[0].filename == __file__
    work = _native.library_path.parent
    assert work.parent == private["temp"] and work.name.startswith("flexrope-")
    assert work.name != f"flexrope-{os.getuid()}"  # a fresh directory, not the shared fallback
    status = work.lstat()
    assert stat.S_ISDIR(status.st_mode) and stat.S_IMODE(status.st_mode) == 0o700
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _calls_equal_eager(monkeypatch)
    assert not private["marker"].exists(), "a planted library ran"


def test_the_cache_is_created_private_and_used(private, monkeypatch):
    assert _native._loaded() is not None
    assert _native.library_path == private["home"] / private["name"]
    assert stat.S_IMODE(private["home"].stat().st_mode) == 0o700
    assert stat.S_IMODE(_native.library_path.stat().st_mode) & 0o022 == 0
    assert [p.name for p in private["home"].iterdir()] == [private["name"]]  # nothing left aside
    _calls_equal_eager(monkeypatch)
    assert len(private["compiled"]) == 1


def _other_user(path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("giving a directory to another user needs root")
    os.chown(path, 65534, 65534)


def _open_to_all(path: Path) -> None:
    os.chmod(path, 0o777)


def _symlink_to_theirs(path: Path) -> None:
    theirs = path.parent / "theirs"
    path.rename(theirs)
    path.symlink_to(theirs)


PLACES = {"open to all (0777)": (_open_to_all, "can be written by its group or others (mode 0777)"),
          "owned by another user": (_other_user, "is owned by uid 65534"),
          "a symbolic link": (_symlink_to_theirs, "is a symbolic link")}


@pytest.mark.parametrize("place", PLACES)
def test_a_home_cache_someone_else_could_write_is_refused(private, monkeypatch, place):
    spoil, problem = PLACES[place]
    planted = _plant(private["home"], private["planted"], private["name"])
    spoil(private["home"])
    _refused_and_private(private, monkeypatch, f"{private['home']} {problem}")
    assert planted.read_bytes() == private["planted"].read_bytes()  # left alone


@pytest.mark.parametrize("place", PLACES)
def test_the_temporary_fallback_made_first_by_someone_else_is_refused(private, monkeypatch, place):
    """A home cache that cannot be created (a file in the way) sends the loop to <tempdir>/flexrope-<uid>,
    which another user can make first."""
    blocked = private["root"] / "blocked"
    blocked.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    fallback = private["temp"] / f"flexrope-{os.getuid()}"
    _plant(fallback, private["planted"], private["name"])
    spoil, problem = PLACES[place]
    spoil(fallback)
    _refused_and_private(private, monkeypatch, f"{fallback} {problem}")


def test_a_symbolic_link_as_the_library_is_refused(private, monkeypatch):
    theirs = _plant(private["root"] / "theirs", private["planted"], private["name"])
    private["home"].mkdir(parents=True, mode=0o700)
    (private["home"] / private["name"]).symlink_to(theirs)
    _refused_and_private(private, monkeypatch, f"{private['home'] / private['name']} is a symbolic link")


def test_a_library_its_group_can_write_is_refused(private, monkeypatch):
    private["home"].mkdir(parents=True, mode=0o700)
    _plant(private["home"], private["planted"], private["name"], mode=0o770)
    _refused_and_private(private, monkeypatch, f"{private['home'] / private['name']} can be written by its group or "
                                               f"others (mode 0770)")


def test_a_directory_in_place_of_the_library_is_refused(private, monkeypatch):
    (private["home"] / private["name"]).mkdir(parents=True, mode=0o700)
    _refused_and_private(private, monkeypatch, f"{private['home'] / private['name']} is not a regular file")


def test_a_relative_xdg_cache_home_is_ignored(private, monkeypatch):
    """A cloned repository shipping flexrope/ under the working directory is never the cache: ~/.cache is."""
    repository = private["root"] / "repository"
    _plant(repository / "flexrope", private["planted"], private["name"])
    (repository / "flexrope").chmod(0o700)
    monkeypatch.chdir(repository)
    monkeypatch.setenv("XDG_CACHE_HOME", ".")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _native._loaded() is not None
        _calls_equal_eager(monkeypatch)
    assert _native.library_path == private["root"] / "home" / ".cache" / "flexrope" / private["name"]
    assert not private["marker"].exists()


def test_a_read_only_home_cache_holding_a_build_is_used(private, monkeypatch):
    cache = private["home"]
    _plant(cache, private["good"], private["name"])
    cache.chmod(0o500)
    access = os.access  # root may write anywhere: the directory reads as read-only, as for any other user

    def read_only(path, mode, **kwargs):
        return False if Path(path) == cache and mode & os.W_OK else access(path, mode, **kwargs)

    monkeypatch.setattr(_native.os, "access", read_only)
    try:
        assert _native._loaded() is not None
        assert _native.library_path == cache / private["name"] and private["compiled"] == []
        _calls_equal_eager(monkeypatch)
    finally:
        cache.chmod(0o700)


@pytest.mark.parametrize("broken", ["garbage", "lacking a function"])
def test_a_broken_library_is_built_again_once(private, monkeypatch, broken):
    cache = private["home"]
    cache.mkdir(parents=True, mode=0o700)
    if broken == "garbage":
        (cache / private["name"]).write_bytes(b"\x7fELF not really" * 10)
    else:
        _plant(cache, private["lacking"], private["name"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _native._loaded() is not None
        _calls_equal_eager(monkeypatch)
    assert private["compiled"] == [cache / private["name"]]
    assert (cache / private["name"]).read_bytes() == private["good"].read_bytes()


def test_a_library_broken_again_once_rebuilt_turns_the_loop_off_with_one_warning(private, monkeypatch):
    private["home"].mkdir(parents=True, mode=0o700)
    _plant(private["home"], private["lacking"], private["name"])
    private["source"] = private["lacking"]  # the rebuild makes the same broken library
    cos, sin = flexrope.precompute_rope_params(16, context_length=64)
    x = torch.randn(2, 3, 40, 16)
    monkeypatch.setenv("FLEXROPE_BACKEND", "native")
    with pytest.warns(RuntimeWarning, match="could not be built .*tables_float32.*even once built again") as caught:
        first = compute_rope(x, cos, sin, "b h s d", offset=5)
    assert len(caught) == 1 and _native.unavailable and len(private["compiled"]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = compute_rope(x, cos, sin, "b h s d", offset=5)
    monkeypatch.setenv("FLEXROPE_BACKEND", "eager")
    assert torch.equal(first, compute_rope(x, cos, sin, "b h s d", offset=5)) and torch.equal(again, first)


def test_a_library_cut_short_is_built_again(private):
    """Mapping a library cut short kills a process with SIGBUS: in a process of its own, cut at several
    places (in its headers, its code, its last byte)."""
    path = private["home"] / private["name"]
    path.parent.mkdir(parents=True, mode=0o700)
    whole = private["good"].read_bytes()
    script = textwrap.dedent(f"""
        import os, shutil, warnings
        from pathlib import Path
        import torch, flexrope
        from flexrope import _native, compute_rope
        warnings.simplefilter("error")
        _native._compile = lambda compiler, path: shutil.copyfile({str(private["good"])!r}, path)
        cos, sin = flexrope.precompute_rope_params(16, context_length=64)
        x = torch.randn(2, 3, 40, 16)
        path, whole = Path({str(path)!r}), Path({str(private["good"])!r}).read_bytes()
        for length in (40, 100, len(whole) // 3, len(whole) - 1):
            Path(f"{{path}}.cut").write_bytes(whole[:length])  # a file of its own: the loaded one stays mapped
            os.replace(f"{{path}}.cut", path)
            _native._library, _native._plans = None, {{}}
            os.environ["FLEXROPE_BACKEND"] = "native"
            fast = compute_rope(x, cos, sin, "b h s d", offset=5)
            assert _native.library_path == path and path.read_bytes() == whole, length
            os.environ["FLEXROPE_BACKEND"] = "eager"
            assert torch.equal(fast, compute_rope(x, cos, sin, "b h s d", offset=5))
        print("rebuilt each time")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "rebuilt each time"
    assert path.read_bytes() == whole


def test_cc_is_split_as_a_shell_would(monkeypatch):
    monkeypatch.setenv("CC", "'/opt/my compilers/gcc' -m64")
    assert _native._compiler() == ["/opt/my compilers/gcc", "-m64"]
    monkeypatch.setenv("CC", "")
    assert _native._compiler() == [shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")]


def test_a_compiler_command_with_arguments_builds_the_loop(private, monkeypatch):
    """CC="ccache gcc" and the like: a real build, through a launcher (env) in front of the compiler."""
    monkeypatch.setenv("CC", f"env {shutil.which('cc') or shutil.which('gcc')}")
    monkeypatch.setattr(_native, "_compile", REAL_COMPILE)
    umask = os.umask(0o002)  # the compiler would leave its output writable by the group
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _native._loaded() is not None
    finally:
        os.umask(umask)
    _calls_equal_eager(monkeypatch)
    assert _native.library_path.parent == private["home"]
    assert stat.S_IMODE(private["home"].stat().st_mode) == 0o700
    assert stat.S_IMODE(_native.library_path.stat().st_mode) & 0o022 == 0


def test_the_self_check_builds_the_loop_and_says_where(private, monkeypatch, capsys):
    """``python -m flexrope`` pre-builds the loop: it is in the cache afterwards, and the output says where."""
    from flexrope import _selfcheck

    monkeypatch.setattr(_selfcheck, "SHAPE", {"b": 2, "h": 8, "s": 16, "d": 8})  # the build is what is tested
    assert _selfcheck.run()
    built = private["home"] / private["name"]
    assert built.is_file() and private["compiled"] == [built]
    out = capsys.readouterr().out
    assert f"built by your C compiler: {built}\n(cached there: later processes load it without building)" in out
