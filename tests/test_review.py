"""Defects found by an adversarial review, one test each."""

import os
import re

import pytest
import torch

import flexrope
from flexrope import FlexRopeError, RotaryEmbedding
from flexrope.testing import check_rope


def test_config_json_head_dim_under_the_family_name_of_it():
    # JetMoe keeps the head dim in kv_channels, Zamba 2 in attention_head_dim (its kv_channels is another
    # number): the config objects map head_dim onto them, a plain config.json does not; hidden / heads differs
    jetmoe = {"model_type": "jetmoe", "hidden_size": 2048, "num_attention_heads": 32, "kv_channels": 128,
              "max_position_embeddings": 64}
    zamba2 = {"model_type": "zamba2", "hidden_size": 2560, "num_attention_heads": 32, "kv_channels": 80,
              "attention_head_dim": 160, "max_position_embeddings": 64}
    assert RotaryEmbedding.from_hf_config(jetmoe).head_dim == 128
    assert RotaryEmbedding.from_hf_config(zamba2).head_dim == 160


def test_check_rope_counts_nan_outputs_as_off():
    # a RoPE writing NaN into one channel: the diagnosis located it but said "(0 elements of ... off)"
    cos, sin = flexrope.precompute_rope_params(16, context_length=64)

    def nan_channel(x):
        y = flexrope.compute_rope(x, cos, sin, "b h s d")
        y[..., 0] = float("nan")
        return y

    with pytest.raises(AssertionError) as caught:
        check_rope(nan_channel, "b h s d", head_dim=16)
    off = re.search(r"\((\d+) elements? of (\d+) off", str(caught.value))
    assert off is not None and int(off.group(1)) == int(off.group(2)) // 16, str(caught.value)


def test_norm_weight_cast_per_call_is_not_served_a_stale_gain():
    # norm_weight=w.float() makes a temporary each call; a freed one leaves its address and version 0 to the next,
    # whose values (after an optimizer step) differ: a gain cached on (address, version) was served stale
    cos, sin = flexrope.precompute_rope_params(16, context_length=8)
    x = torch.randn(1, 1, 4, 16, generator=torch.Generator().manual_seed(0))
    unit = flexrope.compute_rope(x, cos, sin, norm_weight=torch.ones(16))
    weight = torch.ones(16, dtype=torch.bfloat16)
    for step in range(1, 25):
        with torch.no_grad():
            weight.fill_(step % 5 + 1)
        y = flexrope.compute_rope(x, cos, sin, norm_weight=weight.float())
        torch.testing.assert_close(y, unit * (step % 5 + 1), msg=f"step {step}")


def test_fused_norm_keeps_the_memory_order_of_x_with_gradients():
    # with a partial rotation the norm's autograd path returned the canonical (b h s d) memory order for a
    # contiguous (b s h d) x, so a training step's q.view(b, s, h * d) failed where it works without norm_weight
    cos, sin = flexrope.precompute_rope_params(16, context_length=8, rotary_dim=8)
    x = torch.randn(2, 5, 3, 16, requires_grad=True)
    weight = torch.randn(16, requires_grad=True)
    y = flexrope.compute_rope(x, cos, sin, "b s h d", rotary_dim=8, norm_weight=weight)
    assert y.stride() == x.stride()
    y.view(2, 5, 48).sum().backward()
    assert x.grad is not None and weight.grad is not None


@pytest.mark.parametrize("bad", [{"num_attention_heads": 0}, {"num_attention_heads": "4"}, {"rope_scaling": [1, 2]},
                                 {"rope_parameters": "linear"}])
def test_malformed_config_values_raise_flexrope_error(bad):
    # were ZeroDivisionError, TypeError and ValueError from inside the reader
    config = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 32,
              **bad}
    with pytest.raises(flexrope.FlexRopeError, match=repr(next(iter(bad.values()))).replace("[", r"\[")):
        RotaryEmbedding.from_hf_config(config)


@pytest.mark.parametrize("flag", ["interleaved", "inplace", "inverse"])
def test_flags_given_as_strings_are_refused(flag):
    # interleaved="false" is truthy: it silently paired the other channels
    cos, sin = flexrope.precompute_rope_params(16, context_length=8)
    x = torch.randn(1, 2, 4, 16)
    before = x.clone()
    with pytest.raises(flexrope.FlexRopeError, match=f"{flag}='false'"):
        flexrope.compute_rope(x, cos, sin, **{flag: "false"})
    assert torch.equal(x, before)


@pytest.mark.parametrize("shape", [(2, 0, 3, 16), (2, 5, 0, 16)])
def test_triton_backend_takes_an_empty_sequence_or_head_axis(monkeypatch, shape):
    # the default CUDA path raised ZeroDivisionError planning a launch for an empty chunk
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton runs CPU tensors only under TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setenv("FLEXROPE_BACKEND", "triton")
    cos, sin = flexrope.precompute_rope_params(16, context_length=8, device=device)
    x = torch.randn(shape, device=device)
    assert flexrope.compute_rope(x, cos, sin, "b s h d").shape == shape
    rope = RotaryEmbedding(16, layout="b s h d", context_length=8).to(device)
    q, k = rope(x, torch.randn(2, shape[1], 1, 16, device=device))
    assert q.shape == shape


def test_module_interleaved_must_be_a_bool():
    with pytest.raises(FlexRopeError, match=r"interleaved='false': expected True or False"):
        flexrope.RotaryEmbedding(head_dim=16, context_length=8, interleaved="false")
    assert flexrope.RotaryEmbedding(head_dim=16, context_length=8, interleaved=1).interleaved is True


def test_norm_weight_written_through_data_is_not_served_a_stale_gain():
    # w.data.mul_() (init code, EMA updates) writes the weight without bumping its version (.data has a counter of
    # its own): the gain cached on (address, version), and the module's remembered norm, were served stale
    cos, sin = flexrope.precompute_rope_params(16, context_length=8)
    x = torch.randn(1, 3, 2, 16, generator=torch.Generator().manual_seed(0))
    unit = flexrope.compute_rope(x, cos, sin, norm_weight=torch.ones(16))
    for dtype in (torch.float32, torch.bfloat16):  # the gain as the weight itself, and as a float32 copy of it
        weight = torch.ones(16, dtype=dtype)
        flexrope.compute_rope(x, cos, sin, norm_weight=weight)
        weight.data.mul_(3.0)
        torch.testing.assert_close(flexrope.compute_rope(x, cos, sin, norm_weight=weight), unit * 3)
    rope = RotaryEmbedding(16, layout="b h s d", context_length=8)
    norm = torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        first = rope(x, q_norm=norm)
        norm.weight.data.mul_(3.0)
        torch.testing.assert_close(rope(x, q_norm=norm), first * 3)


def test_module_norm_whose_class_changes_is_read_again():
    # a norm given another class between calls, one that scales by 1 + weight, was served the offset
    # remembered for the one before
    class OnePlusRMSNorm(torch.nn.RMSNorm):
        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)

    rope = RotaryEmbedding(16, layout="b h s d", context_length=8)
    cos, sin = flexrope.precompute_rope_params(16, context_length=8)
    x = torch.randn(1, 3, 2, 16, generator=torch.Generator().manual_seed(0))
    norm = torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        rope(x, q_norm=norm)
        norm.__class__ = OnePlusRMSNorm
        got = rope(x, q_norm=norm)
    expected = flexrope.compute_rope(x, cos, sin, norm_weight=torch.ones(16), norm_eps=1e-6, norm_weight_offset=1.0)
    torch.testing.assert_close(got, expected)


def _rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class _ClassEps(torch.nn.Module):
    eps = 1.0  # a class attribute, not in the instance's __dict__

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(16))

    def forward(self, x):
        return _rms(x, self.weight, self.eps)


class _SlotsEps:
    __slots__ = ("weight", "eps", "__weakref__")  # no __dict__ at all

    def __init__(self):
        self.weight, self.eps = torch.ones(16), 1.0

    def __call__(self, x):
        return _rms(x, self.weight, self.eps)


class _PropertyEps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(16))

    @property
    def variance_epsilon(self):
        return 1.0

    def forward(self, x):
        return _rms(x, self.weight, self.variance_epsilon)


@pytest.mark.parametrize("norm_class", [_ClassEps, _SlotsEps, _PropertyEps])
@pytest.mark.parametrize("grad", [False, True])
def test_module_norm_eps_outside_the_instance_dict_is_read(norm_class, grad):
    # the norm's eps was read from its __dict__ alone: one on its class, in a slot or a property was taken for
    # eps=None and replaced by the dtype's machine epsilon, silently
    rope = RotaryEmbedding(16, layout="b h s d", context_length=8)
    cos, sin = flexrope.precompute_rope_params(16, context_length=8)
    x = torch.randn(1, 3, 2, 16, generator=torch.Generator().manual_seed(0)) * 1e-2
    expected = flexrope.compute_rope(x, cos, sin, norm_weight=torch.ones(16), norm_eps=1.0)
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(rope(x, q_norm=norm_class()), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_rmsnorm_without_eps_in_half_precision_uses_the_computation_epsilon(dtype):
    # torch.nn.RMSNorm(eps=None) adds the epsilon of the dtype it computes in (float32 for half-precision input),
    # not finfo(bfloat16).eps = 2^-7, which was taken from the weight's dtype and swamped small heads' mean square
    rope = RotaryEmbedding(16, layout="b h s d", context_length=8)
    cos, sin = flexrope.precompute_rope_params(16, context_length=8)
    norm = torch.nn.RMSNorm(16).to(dtype)
    x = (torch.randn(1, 3, 2, 16, generator=torch.Generator().manual_seed(0)) * 1e-2).to(dtype)
    with torch.no_grad():
        got = rope(x, q_norm=norm)
        theirs = flexrope.compute_rope(norm(x), cos, sin)  # torch's norm, rounded to dtype, then rotated
    expected = flexrope.compute_rope(x, cos, sin, norm_weight=norm.weight, norm_eps=torch.finfo(torch.float32).eps)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got, theirs, rtol=0, atol=4 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("length", ["4096", [4096]])
def test_config_max_position_embeddings_not_a_number_is_a_flexrope_error(length):
    # the size guard multiplied it first: "4096" * 1024 is a string, and comparing it with the limit raised TypeError
    config = {"model_type": "llama", "hidden_size": 256, "num_attention_heads": 2, "max_position_embeddings": length}
    with pytest.raises(FlexRopeError, match=re.escape(repr(length))):
        RotaryEmbedding.from_hf_config(config)


def test_head_dim_past_the_loop_stack_arrays_does_not_kill_the_process():
    # the C loop holds arrays of the head dim on its stack (the norm's gains per pair, float16's spread angles):
    # a head dim of 2^22 overflowed it and the process died of SIGSEGV; such a call goes to the eager kernels
    import subprocess
    import sys

    script = (
        "import torch, flexrope\n"
        "d = 2 ** 22\n"
        "cos, sin = flexrope.precompute_rope_params(d, context_length=2)\n"
        "x = torch.ones(1, 1, 1, d)\n"
        "y = flexrope.compute_rope(x.half(), cos, sin, interleaved=True)\n"
        "assert torch.equal(y, x.half())\n"
        "y = flexrope.compute_rope(x, cos, sin, norm_weight=torch.full((d,), 2.0), norm_eps=0.0)\n"
        "assert torch.equal(y, 2 * x)\n"
    )
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])


def test_module_norm_does_not_keep_a_dropped_norm_weight_storage_alive():
    # the module remembered each norm with its weight held strongly: a weight that is a view of a large flat buffer
    # (as flattened-parameter wrappers make them) kept the whole buffer alive after the model was dropped
    import gc
    import weakref

    rope = RotaryEmbedding(16, layout="b h s d", context_length=8)
    flat = torch.ones(1 << 20)
    norm = torch.nn.RMSNorm(16)
    norm.weight = torch.nn.Parameter(flat[:16])  # shares flat's storage
    dropped = weakref.ref(norm.weight)
    with torch.no_grad():
        rope(torch.randn(1, 2, 3, 16), q_norm=norm)
    del norm, flat
    gc.collect()
    assert dropped() is None
