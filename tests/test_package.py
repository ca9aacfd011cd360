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


def test_self_check_fails_when_a_case_is_off():
    from flexrope import _selfcheck

    assert _selfcheck.run(tolerance=0.0) is False
