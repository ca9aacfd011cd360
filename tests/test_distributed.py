"""Context parallelism and packing on a real torch.distributed group (gloo, spawned here, meeting through a
file store: no port to pick, so no race for one)."""

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flexrope
from flexrope import FlexRopeError, RotaryEmbedding, compute_rope, context_parallel_indices, context_parallel_positions

TIMEOUT_S = 90
try:
    import torch.distributed.tensor  # noqa: F401

    HAS_DTENSOR = True
except ImportError:
    HAS_DTENSOR = False


def _gather_sequence(shard, indices, seq_len, world, seq_dim):
    """All-gather each rank's shard and put every token back at its index along ``seq_dim``."""
    shards = [torch.empty_like(shard) for _ in range(world)]
    all_indices = [torch.empty_like(indices) for _ in range(world)]
    dist.all_gather(shards, shard.contiguous())
    dist.all_gather(all_indices, indices)
    full = torch.empty(*shard.shape[:seq_dim], seq_len, *shard.shape[seq_dim + 1 :], dtype=shard.dtype)
    full.index_copy_(seq_dim, torch.cat(all_indices), torch.cat(shards, dim=seq_dim))
    return full


def _check_context_parallel(rank, world):
    gen = torch.Generator().manual_seed(0)
    seq_len = 8 * world * 3
    x = torch.randn(2, seq_len, 3, 16, generator=gen)  # (b s h d), the same on every rank
    cos, sin = flexrope.precompute_rope_params(16, context_length=256)
    rope = RotaryEmbedding(16, layout="b s h d", context_length=256)
    expected = compute_rope(x, cos, sin, "b s h d")
    for load_balanced in (True, False):
        indices = context_parallel_indices(seq_len, world, rank, load_balanced=load_balanced)
        positions = context_parallel_positions(seq_len, world, rank, load_balanced=load_balanced)
        shard = x.index_select(1, indices)
        by_function = compute_rope(shard, cos, sin, "b s h d", positions=positions)
        by_module = rope(shard, positions=positions)
        assert torch.equal(_gather_sequence(by_function, indices, seq_len, world, 1), expected)
        assert torch.equal(_gather_sequence(by_module, indices, seq_len, world, 1), expected)


def _check_packed_context_parallel(rank, world):
    gen = torch.Generator().manual_seed(1)
    lengths = [2 * world * n for n in (1, 3, 2)]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    total = int(cu_seqlens[-1])
    packed = torch.randn(total, 4, 8, generator=gen)  # (s h d): three documents in one row
    cos, sin = flexrope.precompute_rope_params(8, context_length=64)
    expected = torch.cat([compute_rope(doc, cos, sin, "s h d") for doc in packed.split(lengths)])
    assert torch.equal(compute_rope(packed, cos, sin, "s h d", positions=flexrope.packed_positions(cu_seqlens)),
                       expected)
    indices = context_parallel_indices(total, world, rank, cu_seqlens=cu_seqlens)
    positions = context_parallel_positions(total, world, rank, cu_seqlens=cu_seqlens)
    shard = compute_rope(packed.index_select(0, indices), cos, sin, "s h d", positions=positions)
    assert torch.equal(_gather_sequence(shard, indices, total, world, 0), expected)


def _check_dtensor(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(world, 2 * world, 10, 8, generator=gen)  # (b h s d)
    cos, sin = flexrope.precompute_rope_params(8, context_length=32)
    expected = compute_rope(x, cos, sin, offset=3)
    for dim in (0, 1):  # batch, heads
        sharded = distribute_tensor(x, mesh, [Shard(dim)])
        out = compute_rope(sharded, cos, sin, offset=3)
        assert out.placements == (Shard(dim),)
        assert torch.equal(out.to_local(), expected.chunk(world, dim)[rank])
        assert torch.equal(out.full_tensor(), expected)
    from torch.distributed.tensor import DTensor, Partial

    refused = [
        (distribute_tensor(x, mesh, [Shard(2)]), "sharded along dim 2, which holds s (sequence)"),
        (distribute_tensor(x, mesh, [Shard(3)]), "sharded along dim 3, which holds d (head dim)"),
        (DTensor.from_local(x, mesh, [Partial()]), "with a partial placement"),
    ]
    for dtensor, message in refused:
        try:
            compute_rope(dtensor, cos, sin)
        except FlexRopeError as error:
            assert message in str(error), str(error)
        else:
            raise AssertionError(f"a DTensor was rotated without an error: expected {message!r}")


def _worker(rank, world, store):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    _check_context_parallel(rank, world)
    _check_packed_context_parallel(rank, world)
    if HAS_DTENSOR:
        _check_dtensor(rank, world)
    dist.barrier()
    dist.destroy_process_group()
    # Leave without the interpreter's teardown: there, a gloo/store thread still being joined aborted a
    # rank now and then ("terminate called without an active exception", SIGABRT) after every check passed.
    # A failed check raises above and reaches the parent through torch.multiprocessing as usual.
    os._exit(0)


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_rotation_gathers_to_the_single_process_result(world, tmp_path):
    context = mp.spawn(_worker, args=(world, str(tmp_path / "store")), nprocs=world, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world} ranks did not finish within {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
