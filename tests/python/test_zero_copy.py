"""Zero-copy: views point into the mapping, and keep it alive after the Reader is gone."""
import gc
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import embstore


def _base_chain(array):
    chain = []
    obj = array
    while obj is not None:
        chain.append(obj)
        obj = getattr(obj, "base", None)
    return chain


def test_views_share_memory_with_the_mapping_and_each_other(store):
    x = np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32)
    with embstore.Writer(store, dim=8) as w:
        w.append(np.arange(100), x)
    r = embstore.Reader(store)
    a, b = r.vectors, r.vectors
    assert np.shares_memory(a, b)  # two calls: the same mapped bytes, no copy
    assert np.shares_memory(r.rows(10, 20), a)
    assert a.ctypes.data == r.rows(0, 1).ctypes.data
    assert r.rows(10, 11).ctypes.data == a.ctypes.data + 10 * 8 * 4
    chain = _base_chain(a)
    assert type(chain[-1]).__name__ == "_Mapping" and chain[-1].path == r.path
    # keys/epochs are strided views into the 32-byte index entries, not copies.
    assert r.keys.strides == (32,) and r.epochs.strides == (32,)
    assert type(_base_chain(r.keys)[-1]).__name__ == "_Mapping"
    assert r.epochs.ctypes.data == r.keys.ctypes.data + 8
    assert not np.shares_memory(a, x)
    np.testing.assert_array_equal(a, x)


def _private_kib_at(address):
    """(Rss, Anonymous) KiB of this process's mapping that holds `address` (/proc/self/smaps)."""
    rss = anonymous = None
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split(maxsplit=1)[0]
            if "-" in first and all(c in "0123456789abcdef-" for c in first):
                low, high = (int(x, 16) for x in first.split("-"))
                inside = low <= address < high
            elif inside and line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif inside and line.startswith("Anonymous:"):
                anonymous = int(line.split()[1])
    return rss, anonymous


def test_torch_tensor_from_reader_maps_the_store_pages_privately(store):
    import torch
    with embstore.Writer(store, dim=4, dtype="bfloat16") as w:
        w.append([1, 2], torch.randn(2, 4, dtype=torch.bfloat16))
    r = embstore.Reader(store)
    t = r.tensor()
    assert t.dtype == torch.bfloat16 and r.vectors.dtype == np.uint16
    assert np.array_equal(t.view(torch.int16).numpy(), r.vectors.view(np.int16))
    # The store's pages, not a copy: nothing of the mapping is this process's own yet.
    t.sum()
    assert _private_kib_at(t.data_ptr()) == (4, 0)


def test_a_tensor_out_of_the_snapshot_is_refused_naming_tensor(store):
    """It named the native call (private_rows) the user never made."""
    pytest.importorskip("torch")
    with embstore.Writer(store, dim=4) as w:
        w.append([1, 2, 3], np.zeros((3, 4), np.float32))
    r = embstore.Reader(store)
    with pytest.raises(ValueError, match=r": tensor\(1, 9\) is outside the snapshot of 3 rows$"):
        r.tensor(1, 9)
    with pytest.raises(ValueError, match=r": tensor\(4, 3\) is outside the snapshot of 3 rows$"):
        r.tensor(4)
    assert r.tensor(3).shape == (0, 4) and r.tensor(1, 3).shape == (2, 4)


def test_a_tensor_of_a_reader_may_be_changed_in_place_and_the_store_stays(store):
    """torch has no read-only tensors: tensor() shared the Reader's PROT_READ mapping, and the
    first in-place op on it (or read(out=) into it) killed the interpreter with SIGSEGV (a
    review). A child process, so a crash fails this test instead of killing pytest."""
    x = np.random.default_rng(1).standard_normal((3000, 64)).astype(np.float32)
    with embstore.Writer(store, dim=64) as w:
        w.append(np.arange(3000), x)
    script = textwrap.dedent(f"""
        import numpy as np, embstore, torch
        r = embstore.Reader({store!r})
        t = r.tensor()
        t /= t.norm(dim=1, keepdim=True)          # in place, over the whole store
        u = r.tensor(100, 200)
        u.mul_(2)
        u[0] = 0
        r.read(0, 3000, out=r.tensor())          # read() into a tensor of the store itself
        tail = r.tensor(2990)
        r.close()
        tail.add_(1)                               # after the Reader is closed
        x = np.load({store + ".npy"!r})
        assert np.allclose(t.numpy(), x / np.linalg.norm(x, axis=1, keepdims=True), atol=1e-6)
        assert float(u[0].abs().sum()) == 0 and np.allclose(u[1:].numpy(), 2 * x[101:200])
        assert np.array_equal(tail.numpy(), x[2990:] + 1)
        print("ok")
        """)
    np.save(store + ".npy", x)
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=120)
    assert child.returncode == 0 and child.stdout == "ok\n", child.stderr[-2000:]
    r = embstore.Reader(store)
    np.testing.assert_array_equal(r.vectors, x)  # nothing written reached the store
    assert r.verify().ok


def test_views_outlive_reader_while_store_grows_under_faulthandler(store, tmp_path):
    # A child process, so a segfault fails this test instead of killing pytest.
    script = textwrap.dedent(f"""
        import faulthandler, gc, sys
        faulthandler.enable()
        import numpy as np, embstore
        path = {store!r}
        embstore.create(path, dim=256, segment_mb=0.25)   # 256 rows of 1 KiB per segment
        w = embstore.Writer(path)
        w.append(np.arange(100), np.full((100, 256), 7, np.float32))
        r = embstore.Reader(path)
        vectors, keys, epochs = r.vectors, r.keys, r.epochs
        rows = r.rows(50, 60)
        import torch
        tensor = r.tensor()
        r.close()
        del r
        gc.collect()
        for i in range(40):                               # grow by ~40 segments
            w.append(np.arange(256) + 1000 * i, np.full((256, 256), i, np.float32), i)
        w.close()
        del w
        gc.collect()
        assert vectors.shape == (100, 256) and float(vectors.sum()) == 7 * 100 * 256
        assert keys.tolist() == list(range(100)) and epochs.tolist() == [0] * 100
        assert float(rows.sum()) == 7 * 10 * 256
        assert float(tensor.sum()) == 7 * 100 * 256
        r2 = embstore.Reader(path)
        assert len(r2) == 100 + 40 * 256 and r2.verify().ok
        print("views ok")
    """)
    result = subprocess.run([sys.executable, "-X", "faulthandler", "-c", script],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "views ok" in result.stdout


def test_views_keep_mapping_alive_in_process(store):
    with embstore.Writer(store, dim=4) as w:
        w.append(range(3), np.arange(12, dtype=np.float32).reshape(3, 4))
    r = embstore.Reader(store)
    v = r.vectors
    r.close()
    del r
    gc.collect()
    assert v.sum() == sum(range(12))


def _mapped_files(store):
    """Names of the store's files this process maps now (/proc/self/maps)."""
    with open("/proc/self/maps") as maps:
        return sorted({line.split()[-1].rsplit("/", 1)[-1] for line in maps
                       if str(store) + "/" in line})


def test_a_closed_reader_maps_nothing_and_its_views_keep_only_what_they_need(store):
    with embstore.Writer(store, dim=4) as w:
        w.append(range(3), np.arange(12, dtype=np.float32).reshape(3, 4))
    r = embstore.Reader(store)
    assert r.find(1) == 1  # Maps the key index too.
    assert "keys.1" in _mapped_files(store) and "rows.1" in _mapped_files(store)
    r.close()
    assert _mapped_files(store) == []  # Without views nothing stays mapped, keys.1 neither.
    r = embstore.Reader(store)
    v = r.vectors
    r.close()
    assert "rows.1" in _mapped_files(store) and "keys.1" not in _mapped_files(store)
    assert v.sum() == sum(range(12))
    del v
    gc.collect()
    assert _mapped_files(store) == []
    assert r.closed


def test_read_copies_the_rows_the_view_shows_into_a_new_array_or_out(store):
    # Reader.read: a copy (the kernel's, from the page cache, for 256 KiB and more), for one
    # pass over rows a process has not touched yet.
    x = np.random.default_rng(1).standard_normal((3000, 64)).astype(np.float32)  # 768,000 B
    with embstore.Writer(store, dim=64) as w:
        for b in range(0, 3000, 500):
            w.append(np.arange(b, b + 500), x[b:b + 500])
    r = embstore.Reader(store)
    whole = r.read()
    assert whole.shape == (3000, 64) and whole.dtype == np.float32
    assert not np.shares_memory(whole, r.vectors)
    np.testing.assert_array_equal(whole, x)
    np.testing.assert_array_equal(r.read(1, 2999), x[1:2999])
    np.testing.assert_array_equal(r.read(1000, 1100), x[1000:1100])  # under 256 KiB
    assert r.read(7, 7).shape == (0, 64)
    # Into the caller's buffer, piece by piece, as a scan would.
    out = np.empty((1000, 64), np.float32)
    total = np.zeros(64, np.float64)
    for b in range(0, 3000, 1000):
        assert r.read(b, b + 1000, out=out) is out
        total += out.sum(axis=0, dtype=np.float64)
    np.testing.assert_allclose(total, x.sum(axis=0, dtype=np.float64))
    # What does not fit is refused, naming it, and nothing is written.
    for bad, says in [(np.empty((1000, 64), np.float64), "out has dtype float64; the store's "
                       "rows are float32"),
                      (np.empty((999, 64), np.float32), "out has shape (999, 64); rows [0, "
                       "1000) need (1000, 64)"),
                      (np.empty((64, 1000), np.float32).T, "must be C-contiguous")]:
        with pytest.raises(ValueError) as info:
            r.read(0, 1000, out=bad)
        assert says in str(info.value)
    with pytest.raises(TypeError, match="out must be a numpy array or a torch tensor; got list"):
        r.read(0, 1000, out=[[0.0] * 64] * 1000)
    frozen = np.zeros((10, 64), np.float32)
    frozen.setflags(write=False)
    with pytest.raises(ValueError, match="writeable"):
        r.read(0, 10, out=frozen)
    assert not frozen.any()
    with pytest.raises(ValueError, match=r"read\(2990, 3010\) is outside the snapshot of 3000"):
        r.read(2990, 3010)
    with pytest.raises(ValueError, match=r"read\(0, 1000000000000\) is outside the snapshot"):
        r.read(0, 10**12)  # refused before anything is allocated
    with pytest.raises(ValueError, match="end 5 is before begin 9"):
        r.read(9, 5)
