import os
import subprocess
import sys

import flexrope


def test_public_api_is_small_and_explicit():
    assert set(flexrope.__all__) >= {"compute_rope", "precompute_rope_params", "FlexRopeError", "LayoutError"}
    assert all(hasattr(flexrope, name) for name in flexrope.__all__)


def test_import_pulls_in_nothing_optional():
    code = (
        "import sys, flexrope; heavy = {'transformers', 'hypothesis', 'matplotlib', 'numpy.testing', 'pytest'};"
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_self_check_passes_and_prints_every_layout():
    result = subprocess.run([sys.executable, "-m", "flexrope"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all layouts agree with the reference" in result.stdout
    for layout in ("b h s d", "s b h d", "b s (h d)", "... s h d"):
        assert f"\n{layout} " in result.stdout
    assert "CPU calls ran the C loop, built by your C compiler: " in result.stdout


def test_self_check_without_a_compiler_says_the_eager_kernels_ran(tmp_path):
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "XDG_CACHE_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "flexrope"], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CPU calls ran the eager kernels: the C loop could not be built here" in result.stdout
    assert "the C loop for CPU calls could not be built" in result.stderr


def test_self_check_fails_when_one_case_in_the_middle_is_off(monkeypatch, capsys):
    from flexrope import _selfcheck

    def off_in_one_layout(x, cos, sin, layout, **kwargs):
        y = flexrope.compute_rope(x, cos, sin, layout, **kwargs)
        return y * 1.001 if layout == "h s b d" and not kwargs["interleaved"] else y

    monkeypatch.setattr(_selfcheck, "compute_rope", off_in_one_layout)
    assert _selfcheck.run() is False
    lines = capsys.readouterr().out.splitlines()
    failed = [line for line in lines if line.endswith("FAIL")]
    assert len(failed) == 1 and failed[0].startswith("h s b d      half-split")
    assert any(line.startswith("SOME CASES FAILED") for line in lines)
