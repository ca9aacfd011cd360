import json
import os
import subprocess
import sys

import pytest

from flexrope.__main__ import main


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "rope.png"
    assert main(["plot", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_a_config_file(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "hidden_size": 3072, "num_attention_heads": 32, "max_position_embeddings": 131072, "rope_theta": 10000.0,
        "original_max_position_embeddings": 4096,
        "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [4.0] * 48},
    }))
    out = tmp_path / "phi3.png"
    assert main(["plot", "--config", str(config), "--out", str(out)]) == 0
    assert out.exists() and "wrote" in capsys.readouterr().out


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["plot", "--out", str(tmp_path / "x.png")]) == 2
    assert "pip install 'flexrope[plot]'" in capsys.readouterr().err


def test_plot_of_the_multi_axis_presets(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "axes.png"
    assert main(["plot", "--axes", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_channel_axes_follow_the_assignment_and_pairing():
    from flexrope import MultiAxisRotaryEmbedding, presets
    from flexrope._plot import _channel_axes

    rope = MultiAxisRotaryEmbedding(8, axes={"t": 1, "y": 2, "x": 1}, assignment="round_robin")
    assert _channel_axes(rope) == ["t", "y", "x", "y"] * 2  # half-split: pair i is channels i and i + 4
    assert _channel_axes(presets.flux(axes_dim=(2, 4, 2))) == ["t", "t", "y", "y", "y", "y", "x", "x"]


def test_self_check_with_an_unknown_backend_says_so_without_a_traceback():
    result = subprocess.run([sys.executable, "-m", "flexrope"], capture_output=True, text=True,
                            env={**os.environ, "FLEXROPE_BACKEND": "bogus"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "FLEXROPE_BACKEND='bogus': expected one of auto" in result.stderr and result.stdout == ""
