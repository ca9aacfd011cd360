import pytest
import torch

import flexrope
from flexrope import FlexRopeError, context_parallel_indices, context_parallel_positions, packed_positions


def test_packed_positions_restart_at_each_boundary():
    assert packed_positions(torch.tensor([0, 3, 8, 10])).tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1]
    assert packed_positions(torch.tensor([0, 0, 2, 2, 3])).tolist() == [0, 1, 0]  # empty documents
    assert packed_positions(torch.tensor([0])).tolist() == []


def test_packed_row_equals_rotating_each_document_alone():
    lengths = [3, 5, 2]
    cu = torch.tensor([0, 3, 8, 10])
    x = torch.randn(10, 2, 8)
    cos, sin = flexrope.precompute_rope_params(8, context_length=16)
    packed = flexrope.compute_rope(x, cos, sin, "s h d", positions=packed_positions(cu))
    alone = torch.cat([flexrope.compute_rope(doc, cos, sin, "s h d") for doc in x.split(lengths)])
    assert torch.equal(packed, alone)
    batched = flexrope.compute_rope(x[None], cos, sin, "b s h d", positions=packed_positions(cu))
    assert torch.equal(batched[0], alone)


@pytest.mark.parametrize("cu, match", [
    (torch.tensor([1, 3]), "must start at 0"),
    (torch.tensor([0, 5, 3]), r"decreases at index 2 \(5 -> 3\)"),
    (torch.tensor([[0, 3]]), r"cu_seqlens is a torch.int64 tensor of shape \(1, 2\)"),
    (torch.tensor([0.0, 3.0]), "expected a 1-D integer tensor"),
    ([0, 3], "cu_seqlens is list"),
])
def test_bad_cu_seqlens(cu, match):
    with pytest.raises(FlexRopeError, match=match):
        packed_positions(cu)


def test_load_balanced_dual_chunks():
    assert context_parallel_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert context_parallel_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert context_parallel_positions(16, 4, 1).tolist() == [2, 3, 12, 13]


def test_contiguous_blocks():
    assert context_parallel_positions(8, 2, 1, load_balanced=False).tolist() == [4, 5, 6, 7]


@pytest.mark.parametrize("load_balanced", [True, False])
@pytest.mark.parametrize("cp_size", [1, 2, 3, 4])
def test_ranks_partition_the_sequence(cp_size, load_balanced):
    seq_len = 2 * 3 * 4 * 2
    held = torch.cat([context_parallel_indices(seq_len, cp_size, r, load_balanced=load_balanced)
                      for r in range(cp_size)])
    assert sorted(held.tolist()) == list(range(seq_len))


def test_packed_documents_are_each_split():
    cu = torch.tensor([0, 4, 12])
    assert context_parallel_indices(12, 2, 0, cu_seqlens=cu).tolist() == [0, 3, 4, 5, 10, 11]
    assert context_parallel_positions(12, 2, 0, cu_seqlens=cu).tolist() == [0, 3, 0, 1, 6, 7]
    assert context_parallel_positions(12, 2, 1, cu_seqlens=cu).tolist() == [1, 2, 2, 3, 4, 5]


@pytest.mark.parametrize("args, kwargs, match", [
    ((10, 2, 0), {}, r"the sequence has 10 tokens, not a multiple of 2 \* cp_size = 4"),
    ((9, 2, 0), {"load_balanced": False}, "not a multiple of cp_size = 2"),
    ((12, 2, 0), {"cu_seqlens": torch.tensor([0, 6, 12])}, "document 0 has 6 tokens, not a multiple of 2 \\* cp_size"),
    ((12, 2, 0), {"cu_seqlens": torch.tensor([0, 8])}, "cu_seqlens ends at 8, not at seq_len=12"),
    ((8, 2, 2), {}, r"cp_rank must be an int in \[0, 2\)"),
    ((8, 0, 0), {}, "cp_size must be an int >= 1"),
    ((-8, 2, 0), {}, "seq_len must be an int >= 0"),
])
def test_context_parallel_errors(args, kwargs, match):
    with pytest.raises(FlexRopeError, match=match):
        context_parallel_positions(*args, **kwargs)


INTEGER_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]


@pytest.mark.parametrize("dtype", INTEGER_DTYPES)
def test_positions_of_every_integer_dtype_are_read_as_integers(dtype):
    """uint8 positions used to index as a boolean mask (tokens rotated by 0..7, silently); int8/int16 crashed."""
    cos, sin = flexrope.precompute_rope_params(16, context_length=8)
    x = torch.randn(1, 2, 8, 16)
    positions = [1, 2, 3, 4, 5, 6, 7, 1]
    expected = flexrope.compute_rope(x, cos, sin, positions=torch.tensor(positions))
    assert torch.equal(flexrope.compute_rope(x, cos, sin, positions=torch.tensor(positions, dtype=dtype)), expected)


@pytest.mark.parametrize("dtype", INTEGER_DTYPES)
def test_offsets_of_every_integer_dtype_do_not_overflow(dtype):
    """An int8 offset of 100 plus arange(40) wrapped to -128; a uint8 offset crashed."""
    cos, sin = flexrope.precompute_rope_params(16, context_length=256)
    x = torch.randn(1, 2, 40, 16)
    expected = flexrope.compute_rope(x, cos, sin, offset=100)
    assert torch.equal(flexrope.compute_rope(x, cos, sin, offset=torch.tensor([100], dtype=dtype)), expected)


@pytest.mark.parametrize("seq_len", [3, 100])  # few values read as a list, many by torch.aminmax
@pytest.mark.parametrize("dtype", [torch.int8, torch.int64])
def test_position_values_past_either_end_are_errors_however_many(seq_len, dtype):
    table_len = 120
    cos, sin = flexrope.precompute_rope_params(16, context_length=table_len)
    x = torch.randn(2, 1, seq_len, 16)
    positions = torch.arange(seq_len)
    for bad, match in ((-1, "hold position -1: positions must be >= 0"),
                       (table_len, f"reach position {table_len}, past the table's {table_len} positions")):
        wrong = positions.clone()
        wrong[seq_len // 2] = bad
        with pytest.raises(FlexRopeError, match=match):
            flexrope.compute_rope(x, cos, sin, positions=wrong.to(dtype))
    # row starts: row i holds starts[i] .. starts[i] + s - 1, the last of which must be in the table
    fits = table_len - seq_len
    flexrope.compute_rope(x, cos, sin, offset=torch.tensor([0, fits], dtype=dtype))
    with pytest.raises(FlexRopeError, match=f"offset \\+ arange\\({seq_len}\\) reach position {table_len}, past"):
        flexrope.compute_rope(x, cos, sin, offset=torch.tensor([0, fits + 1], dtype=dtype))
    with pytest.raises(FlexRopeError, match="offset \\+ arange.* hold position -1"):
        flexrope.compute_rope(x, cos, sin, offset=torch.tensor([-1, 0], dtype=dtype))


def test_numpy_integers_are_ints():
    np = pytest.importorskip("numpy")
    cos, sin = flexrope.precompute_rope_params(16, context_length=32)
    x = torch.randn(1, 2, 5, 16)
    rope = flexrope.RotaryEmbedding(16, context_length=32)
    want = flexrope.compute_rope(x, cos, sin, offset=3)
    assert torch.equal(flexrope.compute_rope(x, cos, sin, offset=np.int64(3)), want)
    assert torch.equal(rope(x, offset=np.int32(3)), rope(x, offset=3))


@pytest.mark.parametrize("dtype", INTEGER_DTYPES)
def test_cu_seqlens_of_every_integer_dtype(dtype):
    assert flexrope.packed_positions(torch.tensor([0, 3, 5], dtype=dtype)).tolist() == [0, 1, 2, 0, 1]


def test_decreasing_uint8_cu_seqlens_is_an_error_not_a_heap_corruption():
    """The uint8 difference wrapped around, the decrease check missed it, and repeat_interleave was handed an
    output_size that did not match ('free(): invalid pointer')."""
    with pytest.raises(FlexRopeError, match=r"decreases at index 2 \(5 -> 3\)"):
        flexrope.packed_positions(torch.tensor([0, 5, 3], dtype=torch.uint8))
