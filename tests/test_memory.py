"""kernels._runtime.memory: the flat buffers' huge-page advice and the per-parameter aliases."""

import pytest
import torch

from optadvisor.kernels._runtime import memory as _memory

HUGE = 2 << 20


@pytest.fixture
def advised(monkeypatch):
    calls = []
    monkeypatch.setattr(_memory, "_madvise", lambda start, length, advice: calls.append((start, length, advice)) or 0)
    return calls


@pytest.mark.parametrize("numel,dtype", [((8 << 20) // 4, torch.float32), (3_000_001, torch.float64),
                                         (5 << 20, torch.bfloat16)])
def test_large_cpu_buffers_are_advised_as_huge_pages_within_their_bytes(advised, numel, dtype):
    """From 8 MiB: one madvise(MADV_HUGEPAGE = 14) of the largest 2 MiB-aligned range inside the buffer."""
    t = _memory.flat_buffer(numel, torch.device("cpu"), dtype, zero=True)
    assert t.shape == (numel,) and t.dtype == dtype and not t.any()
    (start, length, advice), = advised
    lo, hi = t.data_ptr(), t.data_ptr() + numel * t.element_size()
    assert advice == 14 and start % HUGE == 0 and length % HUGE == 0 and length > 0
    assert lo <= start and start - lo < HUGE  # the first aligned address in the buffer
    assert start + length <= hi and hi - (start + length) < HUGE  # up to the last whole huge page


def test_small_buffers_and_no_madvise_take_ordinary_pages(advised, monkeypatch):
    t = _memory.flat_buffer((8 << 20) // 4 - 1, torch.device("cpu"), torch.float32, zero=False)
    assert t.numel() == (8 << 20) // 4 - 1 and advised == []  # just under 8 MiB
    monkeypatch.setattr(_memory, "_madvise", None)
    assert not _memory.flat_buffer(3 << 20, torch.device("cpu"), torch.float32, zero=True).any()


def test_alias_is_a_view_of_the_range_with_its_own_storage():
    """Writes go both ways; torch.save of the alias writes only its bytes; it outlives the flat buffer."""
    import io
    flat = torch.arange(100_000, dtype=torch.float32)
    a = _memory.alias(flat, 5, 6, torch.Size([2, 3]))
    assert a.shape == (2, 3) and torch.equal(a.flatten(), torch.arange(5, 11, dtype=torch.float32))
    a[1, 2] = -1.0
    flat[5] = -2.0
    assert flat[10] == -1.0 and a[0, 0] == -2.0
    assert a.untyped_storage().nbytes() == 6 * 4 and a.untyped_storage().data_ptr() == flat[5:].data_ptr()
    saved, whole = io.BytesIO(), io.BytesIO()
    torch.save(a, saved)
    torch.save(flat[5:11].view(2, 3), whole)  # a plain view writes its whole storage
    assert saved.tell() < 4000 < 400_000 < whole.tell()
    assert torch.equal(torch.load(io.BytesIO(saved.getvalue())), a)
    del flat
    assert a.flatten().tolist() == [-2.0, 6.0, 7.0, 8.0, 9.0, -1.0]
    empty = _memory.alias(torch.zeros(4), 4, 0, torch.Size([0]))
    assert empty.shape == (0,)
