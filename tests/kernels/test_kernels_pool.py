"""The output-buffer pool of the native kernels (normmatters.kernels.pool): a buffer anything still refers to
is never handed out again; an idle one is; the size limit, the switch-off and empty_cache."""

import pytest
import torch

import normmatters as nm
from normmatters.kernels import native, pool

# the buffer pool serves the native CPU kernels' outputs (CPU memory only): CPU whatever the test device
pytestmark = pytest.mark.cpu_only

BIG = (4, 8, 64, 64)  # 512 KB float32: pooled


@pytest.fixture(autouse=True)
def _clean_pool(monkeypatch):
    monkeypatch.delenv(pool.ENV, raising=False)
    before = pool.limit()
    pool.set_limit(None)
    pool.empty_cache()
    yield
    pool.set_limit(before)
    pool.empty_cache()


def test_buffer_in_use_is_not_handed_out():
    x = torch.randn(BIG)
    a = pool.empty_like(x)
    b = pool.empty_like(x)
    assert a.data_ptr() != b.data_ptr()
    view = a[1:]
    del a
    c = pool.empty_like(x)  # a's storage is still referred to by its view
    assert c.data_ptr() not in (view.untyped_storage().data_ptr(), b.data_ptr())


def test_idle_buffer_is_reused_with_shape_and_strides():
    x = torch.randn(BIG).to(memory_format=torch.channels_last)
    a = pool.empty_like(x)
    ptr = a.data_ptr()
    del a
    b = pool.empty_like(x)
    assert b.data_ptr() == ptr
    assert b.shape == x.shape and b.stride() == x.stride() and b.dtype == x.dtype
    assert b.is_contiguous(memory_format=torch.channels_last)
    held_storage = b.untyped_storage()  # a storage object outside the pool also keeps it in use
    del b
    assert pool.empty_like(x).data_ptr() != ptr
    del held_storage


def test_small_buffers_and_limit_zero_are_not_pooled(monkeypatch):
    small = torch.randn(2, 3, 4, 4)
    before = pool.pooled_bytes()
    pool.empty_like(small)
    assert pool.pooled_bytes() == before
    monkeypatch.setenv(pool.ENV, "0")
    assert pool.set_limit(None) == 0
    pool.empty_like(torch.randn(BIG))
    assert pool.pooled_bytes() == before


def test_limit_caps_pooled_bytes(monkeypatch):
    x = torch.randn(BIG)
    nbytes = x.numel() * x.element_size()
    pool.set_limit(pool.pooled_bytes() + nbytes)
    held = [pool.empty_like(x) for _ in range(3)]  # all in use: only the first fits under the limit
    assert pool.pooled_bytes() <= int(pool.limit())
    assert len({t.data_ptr() for t in held}) == 3


@pytest.mark.parametrize("value", ["lots", "-1"])
def test_bad_limit_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(pool.ENV, value)
    with pytest.raises(ValueError, match=pool.ENV):
        pool.set_limit(None)
    with pytest.raises(ValueError, match="set_limit"):
        pool.set_limit(-1)


def test_empty_cache_releases_only_idle_buffers():
    x = torch.randn(BIG)
    nbytes = x.numel() * x.element_size()
    start = pool.pooled_bytes()  # buffers other tests still hold, if any
    kept = pool.empty_like(x)
    pool.empty_like(x)  # dropped at once: idle
    assert pool.idle_bytes() == nbytes
    assert pool.empty_cache() == nbytes
    assert pool.pooled_bytes() == start + nbytes and pool.idle_bytes() == 0
    del kept
    assert pool.empty_cache() == nbytes and pool.pooled_bytes() == start


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable (no C compiler)")
def test_training_steps_never_overwrite_outputs_the_user_keeps():
    m = nm.LpBatchNorm2d(8, norm="range", impl="native")
    x0 = torch.randn(BIG)
    kept = []
    for step in range(4):
        x = (x0 + step).requires_grad_()
        y = m(x)
        y.backward(torch.randn_like(y))
        if step % 2 == 0:  # keep every other step's output and gradient; drop the rest
            kept.append((y.detach(), x.grad, y.detach().clone(), x.grad.clone()))
    for y, gx, y_copy, gx_copy in kept:
        assert torch.equal(y, y_copy) and torch.equal(gx, gx_copy)
    assert pool.idle_bytes() > 0  # the dropped steps' buffers came back to the pool


def test_disabled_hands_out_nothing_and_restores_the_limit():
    """What ``normmatters bench`` measures peak memory under: a reused buffer would be no allocation event."""
    x = torch.randn(BIG)
    a = pool.empty_like(x)
    ptr = a.data_ptr()
    del a
    before = pool.limit()
    with pool.disabled():
        assert pool.limit() == 0
        fresh = pool.empty_like(x)
        assert fresh.data_ptr() != ptr
    assert pool.limit() == before
    assert pool.empty_like(x).data_ptr() == ptr


def test_numpy_and_dlpack_views_keep_a_buffer_in_use():
    x = torch.randn(BIG)
    a = pool.empty_like(x)
    ptr = a.data_ptr()
    arr = a.numpy()  # shares the memory; its base keeps the tensor alive
    capsule = torch.utils.dlpack.to_dlpack(a)
    del a
    assert pool.empty_like(x).data_ptr() != ptr
    del arr
    assert pool.empty_like(x).data_ptr() != ptr  # the capsule still refers to it
    del capsule
    assert pool.empty_like(x).data_ptr() == ptr


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable (no C compiler)")
def test_layers_in_two_threads_agree_with_one_thread():
    """Two Python threads training their own layers share the pool (and the OpenMP runtime): every output and
    gradient equals the single-threaded run's."""
    import threading

    xs = [torch.randn(BIG) for _ in range(2)]
    gs = [torch.randn(BIG) for _ in range(2)]

    def run(i, out):
        m = nm.LpBatchNorm2d(8, norm="range", impl="native")
        res = []
        for step in range(8):
            x = (xs[i] + step).requires_grad_()
            y = m(x)
            y.backward(gs[i])
            res.append((y.detach().clone(), x.grad.clone()))
        out[i] = res

    sequential, parallel = {}, {}
    run(0, sequential)
    run(1, sequential)
    threads = [threading.Thread(target=run, args=(i, parallel)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        for (y, gx), (py, pgx) in zip(sequential[i], parallel[i], strict=True):
            assert torch.equal(y, py) and torch.equal(gx, pgx)
