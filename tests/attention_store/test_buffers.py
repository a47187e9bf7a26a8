"""Huge-page backed read buffers: right size, writable, and alive as long as a tensor views them."""

import gc

import torch

from attention_store import buffers


def test_small_and_large_buffers_are_writable_uint8_of_the_asked_size():
    for n in (0, 10, buffers.HUGE_MIN_BYTES + 123):
        b = buffers.empty_bytes(n)
        assert b.dtype.name == "uint8" and b.shape == (n,) and b.flags.writeable
        b[:] = 7
        assert n == 0 or int(b[-1]) == 7


def test_a_tensor_view_keeps_the_mapping_alive():
    n = buffers.HUGE_MIN_BYTES * 2
    b = buffers.empty_bytes(n)
    b[:] = 3
    t = torch.frombuffer(memoryview(b), dtype=torch.uint8, count=n)
    del b
    gc.collect()
    junk = [bytearray(n) for _ in range(3)]  # reuse of freed memory would show as changed values
    assert int(t.sum()) == 3 * n and len(junk) == 3


def test_empty_tensor_has_the_shape_and_dtype_and_is_writable():
    t = buffers.empty_tensor((1, 3, buffers.HUGE_MIN_BYTES // 64, 8), torch.float32)
    assert t.shape == (1, 3, buffers.HUGE_MIN_BYTES // 64, 8) and t.dtype == torch.float32
    t.fill_(1.5)
    assert float(t.sum()) == 1.5 * t.numel()
    assert buffers.empty_tensor((0, 4), torch.float16).shape == (0, 4)
