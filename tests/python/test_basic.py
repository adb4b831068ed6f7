"""Writing and reading through the Python API: values, dtypes, strides, errors, metadata."""
import errno
import os
import threading
import time

import numpy as np
import pytest

import embstore


def test_append_then_read_back_rows_keys_and_epochs(store):
    embstore.create(store, dim=4)
    with embstore.Writer(store) as w:
        assert w.append([10, 11, 12], np.arange(12, dtype=np.float32).reshape(3, 4), 5) == 0
        assert w.append(np.array([20, 21]), np.ones((2, 4), np.float32), [7, 8]) == 3
    r = embstore.Reader(store)
    assert len(r) == 5 and r.dim == 4 and r.dtype == "float32"
    np.testing.assert_array_equal(r.vectors[:3], np.arange(12).reshape(3, 4))
    np.testing.assert_array_equal(r.vectors[3:], 1)
    assert r.keys.tolist() == [10, 11, 12, 20, 21]
    assert r.epochs.tolist() == [5, 5, 5, 7, 8]
    assert r.rows(1, 2).tolist() == [[4, 5, 6, 7]]
    assert r.verify().ok and r.verify().rows_checked == 5


def test_writer_with_dim_creates_or_checks_the_store(store):
    with embstore.Writer(store, dim=8, dtype="float16", metadata={"model": "m"}) as w:
        assert (w.dim, w.dtype) == (8, "float16")
    with embstore.Writer(store, dim=8, dtype=np.float16):
        pass
    with pytest.raises(embstore.FormatMismatchError, match="dim is 8"):
        embstore.Writer(store, dim=9, dtype="float16")
    with pytest.raises(ValueError):  # FormatMismatchError is a ValueError too
        embstore.Writer(store, dtype="float32")
    # dim without dtype expects float32, the dtype it would create: the error says so.
    with pytest.raises(embstore.FormatMismatchError,
                       match="dtype is float16.*float32 is what a Writer given dim= without "
                             "dtype= creates"):
        embstore.Writer(store, dim=8)


def test_writer_refuses_creation_options_an_existing_store_was_not_made_with(tmp_path):
    # metadata=, segment_mb= and key_index= were ignored for an existing store without a word
    # (the store kept its own), though the import of the same metadata is refused.
    store = str(tmp_path / "s")
    with embstore.Writer(store, dim=4, metadata={"model": "m", "lr": 0.1}, segment_mb=1) as w:
        w.append([1], np.ones((1, 4), np.float32))
    # The same values (metadata as the same JSON value, in any key order) open it.
    with embstore.Writer(store, dim=4, metadata='{"lr": 0.1, "model": "m"}', segment_mb=1,
                         key_index=True) as w:
        w.append([2], np.ones((1, 4), np.float32))
    for given, words in [({"metadata": {"model": "other"}}, "metadata"),
                         ({"segment_mb": 2}, "segment_mb=2"),
                         ({"key_index": False}, "key_index=False")]:
        for dim in ({"dim": 4}, {}):  # without dim= too (it opens only an existing store)
            with pytest.raises(embstore.FormatMismatchError, match=words) as error:
                embstore.Writer(store, **dim, **given)
            assert store in str(error.value) and "fixed when a store is created" in str(
                error.value)
    # Nothing changed; the store opens as it is without them.
    info = embstore.info(store)
    assert info["committed_rows"] == 2 and info["keeps_key_index"]
    assert embstore.Reader(store).metadata == {"model": "m", "lr": 0.1}
    with embstore.Writer(store, dim=4) as w:
        assert w.info(key_stats=False)["segment_bytes"] == 1 << 20


def test_metadata_json_comes_back_as_dict_and_text_as_str(tmp_path):
    embstore.create(tmp_path / "a", dim=2, metadata={"lr": 0.1, "name": "x"})
    embstore.create(tmp_path / "b", dim=2, metadata="not json {")
    embstore.create(tmp_path / "c", dim=2)
    assert embstore.Reader(tmp_path / "a").metadata == {"lr": 0.1, "name": "x"}
    assert embstore.Reader(tmp_path / "b").metadata == "not json {"
    assert embstore.Reader(tmp_path / "c").metadata == ""
    assert embstore.info(tmp_path / "a")["metadata"] == '{"lr": 0.1, "name": "x"}'


def test_sync_policies_make_rows_durable(store):
    with embstore.Writer(store, dim=2, sync="every_append") as w:
        w.append([1, 2], np.ones((2, 2), np.float32))
        assert w.durable_rows() == w.committed_rows() == 2
    with embstore.Writer(store, async_queue_mb=1) as w:
        w.append([3], np.ones((1, 2), np.float32))
        w.sync()  # flushes the queue, then syncs
        assert w.durable_rows() == 3
    with pytest.raises(ValueError, match="sync must be"):
        embstore.Writer(store, sync="sometimes")


def test_by_default_close_syncs_and_a_background_thread_syncs_every_interval(store):
    assert embstore.DEFAULT_SYNC_INTERVAL == 5.0
    with embstore.Writer(store, dim=2) as w:
        w.append([1, 2], np.ones((2, 2), np.float32))
    info = embstore.info(store)
    assert info["durable_rows"] == info["committed_rows"] == 2
    with embstore.Writer(store, sync_interval=0.02) as w:
        w.append([3, 4, 5], np.ones((3, 2), np.float32))
        # A condition with a generous deadline, not a timing assertion: no sync() is called.
        deadline = time.monotonic() + 60
        while w.durable_rows() < 5 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert w.durable_rows() == 5


def test_sync_none_opts_out_of_the_sync_at_close(store):
    with embstore.Writer(store, dim=2, sync="none") as w:
        w.append([1, 2], np.ones((2, 2), np.float32))
    info = embstore.info(store)
    assert info["committed_rows"] == 2 and info["durable_rows"] == 0


def test_info_reports_counters(store):
    with embstore.Writer(store, dim=3) as w:
        w.append([1, 2], np.zeros((2, 3), np.float32))
        info = w.info()
    assert info["committed_rows"] == 2 and info["dim"] == 3 and info["dtype"] == "float32"
    assert info["record_bytes"] == 12 and len(info["store_id"]) == 32


def test_info_reports_the_last_commit_time_the_writer_recorded(store):
    embstore.create(store, dim=3)
    assert embstore.info(store)["last_commit_unix_ns"] == 0  # no commit yet: unknown
    with embstore.Writer(store) as w:
        recorded = []
        for rows in (2, 500):
            before = time.time_ns()
            w.append(list(range(rows)), np.zeros((rows, 3), np.float32))
            after = time.time_ns()
            recorded.append(w.info()["last_commit_unix_ns"])
            assert before <= recorded[-1] <= after
    assert recorded[1] >= recorded[0]
    assert embstore.info(store)["last_commit_unix_ns"] == recorded[1]
    with embstore.Reader(store) as r:
        assert r.info()["last_commit_unix_ns"] == recorded[1]


def test_bad_shapes_and_dtypes_raise_value_error_and_write_nothing(store):
    with embstore.Writer(store, dim=4) as w:
        with pytest.raises(ValueError, match="dim 3"):
            w.append([1], np.zeros((1, 3), np.float32))
        with pytest.raises(ValueError, match="float64"):
            w.append([1], np.zeros((1, 4), np.float64))
        with pytest.raises(ValueError, match="2 keys for 1 rows"):
            w.append([1, 2], np.zeros((1, 4), np.float32))
        with pytest.raises(ValueError, match="2-D"):
            w.append([1], np.zeros(4, np.float32))
        with pytest.raises(ValueError, match=">= 0"):
            w.append([-1], np.zeros((1, 4), np.float32))
        with pytest.raises(ValueError, match="epoch"):
            w.append([1], np.zeros((1, 4), np.float32), -3)
        with pytest.raises(ValueError, match="1 epochs for 2 rows"):
            w.append([1, 2], np.zeros((2, 4), np.float32), [1])
        with pytest.raises(ValueError, match="must be an integer"):
            w.append([1.5], np.zeros((1, 4), np.float32))
        assert w.committed_rows() == 0
    with pytest.raises(ValueError, match="unknown dtype"):
        embstore.create(store + "2", dim=4, dtype="complex64")


def test_file_errors_are_oserrors_with_errno(tmp_path):
    with pytest.raises(FileNotFoundError) as missing:
        embstore.Reader(tmp_path / "nothing")
    assert missing.value.errno == errno.ENOENT and "nothing" in str(missing.value)
    embstore.create(tmp_path / "s", dim=2)
    with pytest.raises(FileExistsError):
        embstore.create(tmp_path / "s", dim=2)


def test_map_bytes_outgrown_is_an_oserror_enospc_not_a_crash(store):
    embstore.create(store, dim=1024, segment_mb=1)
    with embstore.Writer(store, map_bytes=2 << 20) as w:
        rows = np.zeros((256, 1024), np.float32)  # exactly one 1 MiB segment
        w.append(range(256), rows)
        w.append(range(256), rows)
        with pytest.raises(OSError) as full:
            w.append(range(256), rows)
        assert full.value.errno == errno.ENOSPC
    assert len(embstore.Reader(store)) == 512


def _pmd_mapped_kib(path):
    """KiB of this process's mappings of `path` mapped in 2 MiB pages (FilePmdMapped, smaps)."""
    kib, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                inside = line.rstrip("\n").endswith(path)
            elif inside and line.startswith("FilePmdMapped:"):
                kib += int(head[1])
    return kib


def _reader_pmd_kib(store):
    """FilePmdMapped of a Reader of `store` in this process, its rows' page tables filled."""
    r = embstore.Reader(store)
    float(r.vectors.sum())
    kib = _pmd_mapped_kib(os.path.join(store, "rows.1"))
    r.close()
    return kib


def test_huge_pages_writer_makes_2mib_pages_and_reads_back(tmp_path):
    store = str(tmp_path / "huge")
    # Writer(huge_pages=True): its writes of 500-row batches (1.5 MB) make each 2 MiB block of
    # rows.1 one 2 MiB page, which a Reader maps in one step; a plain writer's make none. A
    # plain writer and one appending from its async queue share the store; every row reads back.
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((3000, 768)).astype(np.float32)  # 9.2 MB: past 2 MiB pages
    with embstore.Writer(store, dim=768, huge_pages=True, sync="none") as w:
        for first in range(0, 2000, 500):
            w.append(range(first, first + 500), rows[first:first + 500], 1)
    with embstore.Writer(store, huge_pages=False, sync="none") as w:  # the same store, mixed
        w.append(range(2000, 2500), rows[2000:2500], 2)
    with embstore.Writer(store, huge_pages=True, async_queue_mb=16) as w:  # from its queue
        w.append(range(2500, 3000), rows[2500:3000], 3)
    r = embstore.Reader(store)
    np.testing.assert_array_equal(r.vectors, rows)
    assert r.keys.tolist() == list(range(3000))
    assert r.find(2750) == 2750
    assert r.verify().ok and r.verify().rows_checked == 3000
    r.close()
    with pytest.raises(ValueError, match="huge_pages must be True or False; got 'yes'"):
        embstore.Writer(store, huge_pages="yes")
    assert len(embstore.Reader(store)) == 3000  # the refused open changed nothing

    # Whether the kernel keeps a file's writes in 2 MiB pages here at all: one 9.2 MB batch
    # does (the kernel sizes pages by the write), with or without the option.
    def probe_makes_2mib_pages(name):
        probe = str(tmp_path / name)
        with embstore.Writer(probe, dim=768, huge_pages=False, sync="none") as w:
            w.append(range(3000), rows)
        return _reader_pmd_kib(probe) > 0

    if not probe_makes_2mib_pages("probe"):
        pytest.skip("this kernel keeps no file writes in 2 MiB pages here")
    # 30 MB in 1.5 MB batches, with and without the option. The blocks a write entered while
    # the file was allocated to their end become 2 MiB pages (most of them: the files double
    # while small, and a block whose entering write found the file ending inside it stays in
    # small pages); a plain writer's batches make none.
    pmd = {}
    for huge in (True, False):
        path = str(tmp_path / f"thirty-{huge}")
        with embstore.Writer(path, dim=768, huge_pages=huge, sync="none") as w:
            for b in range(20):
                w.append(range(b * 500, b * 500 + 500), rows[:500], 1)
        pmd[huge] = _reader_pmd_kib(path)
    if pmd[True] < 8 * 2048 and not probe_makes_2mib_pages("probe-again"):
        # The kernel fell back to small pages (memory fragmented meanwhile): not the writer's doing.
        pytest.skip(f"no 2 MiB pages for a new probe either ({pmd})")
    assert pmd[True] >= 8 * 2048, pmd  # of its 14 whole blocks
    assert pmd[False] == 0, pmd


def test_corrupted_row_is_named_by_verify(store):
    with embstore.Writer(store, dim=4) as w:
        w.append(range(10), np.arange(40, dtype=np.float32).reshape(10, 4))
    with open(os.path.join(store, "rows.1"), "r+b") as f:
        f.seek(7 * 16 + 3)
        byte = f.read(1)
        f.seek(7 * 16 + 3)
        f.write(bytes([byte[0] ^ 0xFF]))
    report = embstore.Reader(store).verify()
    assert not report and report.bad_rows == [7] and report.bad_row_count == 1


def _as_after_a_power_loss(store):
    """30 rows in 3 batches of 10 (a store without a key index, whose boot id a test cannot fake
    in the key index file too), as a power loss in an earlier boot leaves them: a sync covered
    rows [0, 10); rows [10, 20) reached the disk, rows [20, 30) never did (zeros)."""
    embstore.create(store, dim=4, key_index=False)
    with embstore.Writer(store) as w:
        for e in range(3):
            w.append(np.arange(10) + 100 * e, np.full((10, 4), e, np.float32), e)
    with open(os.path.join(store, "header"), "r+b") as f:
        f.seek(4160)  # the state page's durable_rows (src/format/FORMAT.md)
        f.write((10).to_bytes(8, "little"))
        f.seek(4288)  # boot_id: an earlier boot's
        f.write(os.urandom(16))
    for name, entry_bytes in (("rows.1", 16), ("index.1", 32)):
        with open(os.path.join(store, name), "r+b") as f:
            f.seek(20 * entry_bytes)
            f.write(bytes(10 * entry_bytes))


def test_after_a_reboot_info_counts_the_rows_the_next_writer_keeps_and_verify_names_the_cut(
        store):
    # From a review: info counted rows [20, 30), which no reader shows and the next writer cuts,
    # and verify passed without a word about them.
    _as_after_a_power_loss(store)
    with embstore.Reader(store) as r:
        assert len(r) == 20
        info = r.info()
        assert (info["committed_rows"], info["durable_rows"], info["rows_to_cut"]) == (20, 10, 10)
        report = r.verify()
        assert report.bad_row_count == 0 and report.rows_to_cut == 10 and not report.ok
        assert "rows_to_cut=10" in repr(report)
        assert r.verify(0, 10).ok  # a part of the snapshot: its rows alone
    info = embstore.info(store)
    assert (info["committed_rows"], info["rows_to_cut"]) == (20, 10)
    with embstore.Writer(store) as w:
        assert w.committed_rows() == 20
    with embstore.Reader(store) as r:
        assert r.verify().ok and r.info()["rows_to_cut"] == 0
    assert embstore.info(store)["committed_rows"] == 20


def test_read_with_check_names_a_corrupt_row_and_without_returns_it_as_stored(store):
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    with embstore.Writer(store, dim=4) as w:
        w.append(range(10), x, epoch=3)
    with open(os.path.join(store, "rows.1"), "r+b") as f:
        f.seek(7 * 16)
        f.write(np.float32(-1).tobytes())
    r = embstore.Reader(store)
    np.testing.assert_array_equal(r.read(0, 7, check=True), x[:7])
    with pytest.raises(embstore.CorruptionError, match=r"row 7 \(key 7, epoch 3\)"):
        r.read(2, 9, check=True)
    out = np.zeros((1, 4), np.float32)
    with pytest.raises(embstore.CorruptionError, match="row 7"):
        r.read(7, 8, out=out, check=True)
    assert r.read(7, 8)[0, 0] == -1  # unchecked: the bytes as stored
    with pytest.raises(ValueError, match="check must be True or False"):
        r.read(0, 1, check=1)


def test_corrupted_header_raises_corruption_error(store):
    embstore.create(store, dim=4)
    with open(os.path.join(store, "header"), "r+b") as f:
        for copy in (0, 2048):  # both copies of the fixed header (FORMAT.md)
            f.seek(copy + 16)
            f.write(b"\x05")  # dim 4 -> 5: the header checksum no longer matches
    with pytest.raises(embstore.CorruptionError, match="header") as bad:
        embstore.Reader(store)
    assert isinstance(bad.value, embstore.Error) and bad.value.code == "corruption"


def test_newer_format_version_raises_unsupported_version_error(store):
    embstore.create(store, dim=4)
    with open(os.path.join(store, "header"), "r+b") as f:
        for copy in (0, 2048):  # both copies of the fixed header (FORMAT.md)
            f.seek(copy + 8)  # format_major
            f.write(b"\x02")
    with pytest.raises(embstore.UnsupportedVersionError, match="format_major 2"):
        embstore.Reader(store)
    with pytest.raises(embstore.Error):
        embstore.Writer(store)


def test_rows_with_a_gap_are_written_without_a_copy_and_odd_layouts_with_one(store):
    base = np.arange(10 * 8, dtype=np.float32).reshape(10, 8)
    with embstore.Writer(store, dim=4) as w:
        w.append(range(5), base[::2, :4])  # row stride 64 B, elements contiguous: no copy
        assert w.stats()["copied_batches"] == 0
        w.append(range(4), base[:4, :4].T.copy().T)  # Fortran order: one copy
        w.append(range(4), base[::-1][:4, 2:6])  # negative row stride: one copy
        assert w.stats()["copied_batches"] == 2
    v = embstore.Reader(store).vectors
    np.testing.assert_array_equal(v[:5], base[::2, :4])
    np.testing.assert_array_equal(v[5:9], base[:4, :4])
    np.testing.assert_array_equal(v[9:], base[::-1][:4, 2:6])


def test_float32_input_is_converted_for_a_float16_store(store):
    x = np.random.default_rng(1).standard_normal((6, 5)).astype(np.float32)
    with embstore.Writer(store, dim=5, dtype="float16") as w:
        w.append(range(6), x)
        w.append(range(6), x.astype(np.float16))
    v = embstore.Reader(store).vectors
    assert v.dtype == np.float16
    np.testing.assert_array_equal(v[:6], x.astype(np.float16))
    np.testing.assert_array_equal(v[6:], x.astype(np.float16))


def test_views_are_read_only(store):
    with embstore.Writer(store, dim=2) as w:
        w.append([1], np.ones((1, 2), np.float32))
    r = embstore.Reader(store)
    with pytest.raises(ValueError, match="read-only"):
        r.vectors[0, 0] = 5
    with pytest.raises(ValueError, match="read-only"):
        r.keys[0] = 5


def test_closed_objects_raise_closed_error(store):
    w = embstore.Writer(store, dim=2)
    w.close()
    w.close()  # idempotent
    with pytest.raises(embstore.ClosedError):
        w.append([1], np.ones((1, 2), np.float32))
    r = embstore.Reader(store)
    r.close()
    with pytest.raises(embstore.ClosedError):
        r.vectors


def test_wait_wakes_on_a_commit_from_another_thread(store):
    embstore.create(store, dim=2)
    r = embstore.Reader(store)
    assert not r.wait(1, timeout=0)
    started = threading.Event()

    def write():
        started.wait()
        with embstore.Writer(store) as w:
            w.append([1, 2, 3], np.ones((3, 2), np.float32))

    t = threading.Thread(target=write)
    t.start()
    started.set()
    assert r.wait(3, timeout=60)
    t.join()
    assert len(r) == 3 and r.refresh() == 3


def test_snapshot_grows_only_on_refresh(store):
    with embstore.Writer(store, dim=2) as w:
        w.append([1], np.ones((1, 2), np.float32))
        r = embstore.Reader(store)
        w.append([2], np.ones((1, 2), np.float32))
        assert len(r) == 1 and r.vectors.shape == (1, 2)
        assert r.refresh() == 2 and r.vectors.shape == (2, 2)


def test_help_documents_the_public_names():
    for name in embstore.__all__:
        obj = getattr(embstore, name)
        if callable(obj):
            assert obj.__doc__ and len(obj.__doc__) > 20, name
    for method in ("append", "flush", "sync", "close", "stats"):
        assert getattr(embstore.Writer, method).__doc__, method
    for method in ("refresh", "wait", "verify", "tensor", "close"):
        assert getattr(embstore.Reader, method).__doc__, method


def test_cmake_install_puts_an_importable_package_under_the_prefix(tmp_path):
    import shutil
    import subprocess
    import sys
    build = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(embstore.__file__))))
    if not os.path.exists(os.path.join(build, "CMakeCache.txt")) or not shutil.which("cmake"):
        pytest.skip("embstore was not imported from a CMake build tree")
    prefix = tmp_path / "prefix"
    subprocess.run(["cmake", "--install", build, "--prefix", str(prefix)], check=True,
                   capture_output=True)
    inits = list(prefix.glob("lib/python3*/*-packages/embstore/__init__.py"))
    assert len(inits) == 1, list(prefix.rglob("*"))
    site = str(inits[0].parent.parent)
    out = subprocess.run([sys.executable, "-c", "import embstore, embstore._embstore; "
                          "print(embstore.__file__)"], env={**os.environ, "PYTHONPATH": site},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(inits[0])


def test_a_follower_of_a_run_started_over_at_the_same_path_is_told_not_left_on_the_old_store(
        store):
    # A dashboard follows a run; the run is started over (its directory removed, a store made
    # again there, written to). refresh() kept returning the deleted store's rows and wait()
    # slept on a counter nobody raises (for ever without a timeout).
    import shutil
    with embstore.Writer(store, dim=2) as w:
        w.append(np.arange(10), np.ones((10, 2), np.float32))
    follower = embstore.Reader(store)
    waiting = embstore.Reader(store)
    shutil.rmtree(store)
    with embstore.Writer(store, dim=2) as w:
        w.append(np.arange(100, 150), np.full((50, 2), 7, np.float32))
    with pytest.raises(FileNotFoundError, match="the store opened is no longer at this path"):
        waiting.wait(11, timeout=30)
    time.sleep(0.06)  # past the 50 ms between two looks at the path
    with pytest.raises(FileNotFoundError, match="no longer at this path"):
        follower.refresh()
    assert len(follower) == 10 and follower.keys.tolist() == list(range(10))  # its snapshot
    assert len(embstore.Reader(store)) == 50


def test_a_path_given_as_utf8_bytes_opens_as_text(tmp_path):
    # Paths must be UTF-8 text (other bytes are refused: test_errors.py); bytes that are UTF-8
    # work anywhere a path does, and come back as str.
    path = os.fsencode(str(tmp_path)) + "/é".encode("utf-8")
    embstore.create(path, dim=2)
    with embstore.Writer(path) as w:
        w.append([7], np.ones((1, 2), np.float32))
        assert w.path == str(tmp_path / "é")
    r = embstore.Reader(path)
    assert r.path == str(tmp_path / "é") and r.keys.tolist() == [7]
    assert embstore.info(path)["committed_rows"] == 1


def test_the_readme_python_block_runs_as_written(tmp_path):
    """README.md's "Using it from Python" block, run as it is (its store path moved into
    tmp_path) in a fresh interpreter: it appended one batch of epoch 3 and then read rows 0..4096
    and sample 10 at epoch 5, and used names it never defined (a review)."""
    import re
    import subprocess
    import sys
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    section = readme[readme.index("## Using it from Python"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "/data/run17.emb" in block
    script = block.replace("/data/run17.emb", str(tmp_path / "run17.emb"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    with embstore.Reader(tmp_path / "run17.emb") as r:  # truncated from epoch 5 on, as it says
        assert r.epoch_counts() == {3: 2048, 4: 2048}


def test_create_refuses_a_network_file_system_as_writers_do_unless_forced(tmp_path):
    """embstore.create made a store on NFS or FUSE that every Writer then refused (as the CLI's
    create did: a review). Every statfs of a child interpreter reports NFS (an LD_PRELOAD shim,
    tests/support/statfs_nfs.c); the Writer's refusal and create's name the same rule."""
    import shutil
    import subprocess
    import sys
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the statfs shim")
    shim = tmp_path / "nfs.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(shim),
                    os.path.join(os.path.dirname(__file__), "..", "support", "statfs_nfs.c"),
                    "-ldl"], check=True)
    script = ("import embstore, sys\n"
              "for call in (lambda: embstore.create(sys.argv[1], dim=4),\n"
              "             lambda: embstore.Writer(sys.argv[1], dim=4)):\n"
              "    try:\n"
              "        call(); print('made')\n"
              "    except ValueError as error:\n"
              "        print('refused:', error)\n")
    env = dict(os.environ, LD_PRELOAD=str(shim))
    store = str(tmp_path / "s")
    done = subprocess.run([sys.executable, "-c", script, store], env=env, capture_output=True,
                          text=True, timeout=120)
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("refused: ") for line in lines), done
    assert "EMBSTORE_ALLOW_REMOTE_FS" in lines[0] and store in lines[0]
    assert not os.path.exists(store)
    env["EMBSTORE_ALLOW_REMOTE_FS"] = "1"
    done = subprocess.run([sys.executable, "-c", script, store], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.splitlines()[0] == "made", done
    assert embstore.Reader(store).dim == 4
