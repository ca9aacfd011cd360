"""out_index=: the rotation (and the fused QK-norm) written at each token's sequence index of out, by the C loop
in the same pass (no temporary), against index_copy_ of the unfused result, bitwise; negative indices skipped."""

import pytest
import torch

import flexrope
from flexrope import RotaryEmbedding, _dispatch, _qknorm, compute_rope

# (layout, x shape, cache shape, how the cache is seen in the layout)
CASES = [
    ("b s h d", (2, 4, 3, 8), (2, 7, 3, 8), lambda c: c),
    ("b h s d", (2, 3, 4, 8), (2, 3, 7, 8), lambda c: c),
    ("s b h d", (4, 2, 3, 8), (7, 2, 3, 8), lambda c: c),
    ("b s h d", (2, 4, 3, 8), (2, 3, 7, 8), lambda c: c.transpose(1, 2)),  # a "b h s d" cache
    ("b s (h d)", (2, 4, 24), (2, 7, 24), lambda c: c),
    ("b s h d", (2, 1, 3, 8), (2, 7, 3, 8), lambda c: c),  # a decoding step
]
INDICES = {4: torch.tensor([[6, 0, -1, 2], [1, -3, 5, 3]]), 1: torch.tensor([[4], [-1]])}


def _no_temporary(monkeypatch):
    """Any write through a temporary fails the test: the loop must write at the indices itself."""
    def refuse(*args, **kwargs):
        raise AssertionError("out_index went through a temporary")
    monkeypatch.setattr(_dispatch, "write_at", refuse)
    monkeypatch.setattr(_qknorm, "write_at", refuse)


def _expected(layout, rotated, cache, view, index, lengths):
    """index_copy_ of the unfused result into a copy of the cache, token by token of each row."""
    expected = cache.clone()
    seq = layout.replace("(h d)", "hd").split().index("s")
    target_all = view(expected)
    for row in range(index.shape[0]):
        keep = (index[row] >= 0).nonzero().flatten()
        b = layout.split().index("b")
        target, source = target_all.select(b, row), rotated.select(b, row)
        target.index_copy_(seq - (b < seq), index[row][keep], source.index_select(seq - (b < seq), keep))
    return expected


@pytest.mark.parametrize("layout, shape, cache_shape, view", CASES)
@pytest.mark.parametrize("dtype, interleaved, rotary_dim", [(torch.float32, False, None), (torch.bfloat16, True, 6),
                                                           (torch.float16, False, 4), (torch.float64, False, None)])
@pytest.mark.parametrize("norm", [False, True])
def test_loop_writes_at_the_indices(monkeypatch, layout, shape, cache_shape, view, dtype, interleaved, rotary_dim,
                                    norm):
    cos, sin = flexrope.precompute_rope_params(8, context_length=32, rotary_dim=rotary_dim)
    lengths = {"h": 3} if "(" in layout else {}
    x = torch.randn(shape).to(dtype)
    s = shape[layout.split().index("s")]
    index = INDICES[s]
    kwargs = dict(positions=torch.tensor([[5, 1, 9, 2][:s], [0, 2, 3, 7][:s]]), interleaved=interleaved,
                  rotary_dim=rotary_dim, **lengths)
    if norm:
        kwargs.update(norm_weight=torch.randn(8), norm_eps=1e-5, norm_weight_offset=1.0)
    cache = torch.randn(cache_shape).to(dtype)
    expected = _expected(layout, compute_rope(x, cos, sin, layout, **kwargs), cache, view, index, lengths)
    before = x.clone()
    _no_temporary(monkeypatch)
    assert compute_rope(x, cos, sin, layout, out=view(cache), out_index=index, **kwargs).data_ptr() == \
        view(cache).data_ptr()
    assert torch.equal(cache, expected)
    assert torch.equal(x, before)


def test_inverse_and_one_index_for_every_row(monkeypatch):
    cos, sin = flexrope.precompute_rope_params(8, context_length=32)
    x, cache = torch.randn(2, 4, 3, 8), torch.randn(2, 6, 3, 8)
    index = torch.tensor([5, -1, 0, 3], dtype=torch.int32)
    expected = _expected("b s h d", compute_rope(x, cos, sin, "b s h d", offset=2, inverse=True), cache,
                         lambda c: c, index.long().expand(2, 4), {})
    _no_temporary(monkeypatch)
    compute_rope(x, cos, sin, "b s h d", offset=2, inverse=True, out=cache, out_index=index)
    assert torch.equal(cache, expected)


def test_threaded_loop_at_the_indices():
    """Enough elements for the loop's threads: every row still lands at its index."""
    cos, sin = flexrope.precompute_rope_params(64, context_length=256)
    x, cache = torch.randn(1, 8, 160, 64), torch.zeros(1, 8, 200, 64)
    index = torch.randperm(200)[:160]
    index[::7] = -1
    compute_rope(x, cos, sin, "b h s d", out=cache, out_index=index)
    rotated = compute_rope(x, cos, sin, "b h s d")
    expected = torch.zeros_like(cache)
    keep = (index >= 0).nonzero().flatten()
    expected.index_copy_(2, index[keep], rotated[:, :, keep])
    assert torch.equal(cache, expected)


@pytest.mark.parametrize("norm", [False, True])
def test_module_k_out_index_into_a_ring_buffer(monkeypatch, norm):
    rope = flexrope.RotaryEmbedding(8, layout="b s h d", context_length=32)
    q, k = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 2, 8)
    cache, q_out = torch.randn(2, 5, 2, 8), torch.zeros(2, 6, 4, 8)
    index = torch.tensor([[4, 0, 1], [-1, 2, 3]])
    norms = dict(q_norm=torch.nn.RMSNorm(8, eps=1e-6), k_norm=torch.nn.RMSNorm(8, eps=1e-6)) if norm else {}
    if norm:
        for module in norms.values():
            torch.nn.init.normal_(module.weight)
    with torch.no_grad():
        q_rot, k_rot = rope(q, k, offset=7, **norms)
        expected_k = _expected("b s h d", k_rot, cache, lambda c: c, index, {})
        expected_q = _expected("b s h d", q_rot, q_out, lambda c: c, torch.tensor([[5, 1, 0]] * 2), {})
        _no_temporary(monkeypatch)
        got_q, got_k = rope(q, k, offset=7, k_out=cache, k_out_index=index, q_out=q_out,
                            q_out_index=torch.tensor([5, 1, 0]), **norms)
    assert got_k is cache and got_q is q_out
    assert torch.equal(cache, expected_k) and torch.equal(q_out, expected_q)


def test_module_bad_out_index_names_it_with_nothing_written():
    rope = flexrope.RotaryEmbedding(8, layout="b s h d", context_length=32)
    q, k, cache = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 2, 8), torch.randn(1, 5, 2, 8)
    kept = cache.clone()
    with pytest.raises(flexrope.FlexRopeError, match="k_out_index holds 5, past out's sequence length 5"):
        rope(q, k, k_out=cache, k_out_index=torch.tensor([0, 5]))
    with pytest.raises(flexrope.FlexRopeError, match="k_out_index= needs k_out="):
        rope(q, k, k_out_index=torch.tensor([0, 1]))
    with pytest.raises(flexrope.FlexRopeError, match="is k itself with an out_index"):
        rope(q, k, k_out=k, k_out_index=torch.tensor([1, 0]))
    with pytest.raises(flexrope.FlexRopeError, match="k_out has shape"):
        rope(q, k, k_out=cache[..., :4], k_out_index=torch.tensor([0, 1]))
    assert torch.equal(cache, kept)


@pytest.mark.parametrize("norm", [False, True])
def test_eager_backend_writes_the_same_through_a_temporary(monkeypatch, norm):
    cos, sin = flexrope.precompute_rope_params(8, context_length=32)
    x, cache = torch.randn(2, 4, 3, 8), torch.randn(2, 7, 3, 8)
    kwargs = dict(offset=3, **(dict(norm_weight=torch.randn(8)) if norm else {}))
    looped = cache.clone()
    compute_rope(x, cos, sin, "b s h d", out=looped, out_index=INDICES[4], **kwargs)
    monkeypatch.setenv("FLEXROPE_BACKEND", "eager")
    compute_rope(x, cos, sin, "b s h d", out=cache, out_index=INDICES[4], **kwargs)
    expected = _expected("b s h d", compute_rope(x, cos, sin, "b s h d", **kwargs), cache, lambda c: c,
                         INDICES[4], {})
    assert torch.equal(cache, expected)
    if not norm:  # the norm's sum runs in another order in the loop: its last bit may differ from eager's
        assert torch.equal(looped, cache)


def test_module_norm_step_without_gradients_equals_the_general_path():
    """The direct loop call of a no-grad normed step (q and k) against the general path, bitwise, also where k's
    channels are not contiguous (the loop does not take k: the general path does, and q stays on the loop)."""
    rope = flexrope.RotaryEmbedding(8, layout="b s h d", context_length=32)
    q = torch.randn(2, 1, 4, 8)
    k = torch.randn(2, 1, 2, 8)
    k_strided = torch.randn(2, 1, 2, 16)[..., ::2]  # channel stride 2
    norms = dict(q_norm=torch.nn.RMSNorm(8, eps=1e-6), k_norm=(torch.randn(8), 1e-5, 1.0))
    torch.nn.init.normal_(norms["q_norm"].weight)
    for keys in (k, k_strided):
        cache = torch.zeros(2, 5, 2, 8)
        with torch.no_grad():  # compute_rope: the general path (normed_rotation)
            expected_q = compute_rope(q, rope.cos, rope.sin, "b s h d", offset=3,
                                      norm_weight=norms["q_norm"].weight, norm_eps=1e-6)
            expected_k = compute_rope(keys, rope.cos, rope.sin, "b s h d", offset=3, norm_weight=norms["k_norm"][0],
                                      norm_eps=1e-5, norm_weight_offset=1.0)
            got_q, got_k = rope(q, keys, offset=3, k_out=cache[:, 3:4], **norms)
        assert torch.equal(got_q, expected_q) and torch.equal(cache[:, 3:4], expected_k)
        assert torch.equal(cache[:, :3], torch.zeros(2, 3, 2, 8))


def test_out_index_under_torch_compile_fullgraph():
    """out_index= traced by torch.compile (fullgraph: its values are not known while tracing, so an index past the
    end is an assert when the graph runs, as on a GPU): the same cache as eagerly."""
    rope = RotaryEmbedding(16, layout="b s h d", context_length=32)
    q, k = torch.randn(2, 3, 4, 16), torch.randn(2, 3, 2, 16)
    cache = torch.zeros(2, 8, 2, 16)
    index = torch.tensor([[0, 5, -1], [7, 1, 2]])
    step = torch.compile(lambda q, k, index: rope(q, k, offset=2, k_out=cache, k_out_index=index), fullgraph=True,
                         backend="eager")
    with torch.no_grad():
        q_rot, _ = step(q, k, index)
        compiled = cache.clone()
        cache.zero_()
        expected_q, _ = rope(q, k, offset=2, k_out=cache, k_out_index=index)
        assert torch.equal(compiled, cache) and torch.equal(q_rot, expected_q)
        with pytest.raises(RuntimeError, match="out_index holds an index >= out's sequence length 8"):
            step(q, k, torch.tensor([[0, 5, -1], [8, 1, 2]]))
