"""Every example runs, and the examples agree with each other."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest
import torch

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.py")), ids=lambda p: p.name)
def test_example_runs_as_a_script(path):
    result = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_bshd_attention_equals_the_book_style_bhsd_attention():
    bhsd, bshd = _load("attention_bhsd"), _load("attention_bshd")
    torch.manual_seed(1)
    book = bhsd.MultiHeadAttention(d_model=64, num_heads=4)
    ours = bshd.MultiHeadAttention(d_model=64, num_heads=4)
    ours.load_state_dict(book.state_dict())
    x = torch.randn(3, 12, 64)
    torch.testing.assert_close(ours(x), book(x), atol=1e-5, rtol=1e-5)


def test_kv_cache_decoding_equals_the_full_sequence():
    tokens, worst = _load("kv_cache_decoding").main(steps=6)
    assert tokens.shape == (1, 9)
    assert worst < 1e-5
