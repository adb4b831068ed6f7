"""Bad arguments get errors that name the argument and the rule; nothing is written for them."""
import errno
import math
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import embstore

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def rows(n, dim=4, dtype=np.float32):
    return np.zeros((n, dim), dtype)


# Keys and rows as numpy arrays take Writer.append's short way into the C++ module (its checks of
# the epoch written inline); as a list, the helpers' way. Both refuse the same.
@pytest.mark.parametrize("as_array", [False, True], ids=["list", "ndarray"])
def test_epoch_is_an_integer_in_0_to_2_pow_64(store, as_array):
    def key(k):
        return np.array([k], np.uint64) if as_array else [k]
    with embstore.Writer(store, dim=4) as w:
        w.append(key(1), rows(1), 2**63)  # a valid uint64 epoch, not a cast error
        w.append(key(2), rows(1), 2**64 - 1)
        for bad in (2**64, -1, -(2**63)):
            message = f"epoch is {bad}; it must be in [0, 2**64)"
            with pytest.raises(ValueError, match=re.escape(message)):
                w.append(key(3), rows(1), bad)
        assert w.committed_rows() == 2
    assert embstore.Reader(store).epochs.tolist() == [2**63, 2**64 - 1]


@pytest.mark.parametrize("async_queue_mb", [0, 4])
def test_big_endian_keys_or_epochs_are_refused_not_stored_byte_swapped(store, async_queue_mb):
    with embstore.Writer(store, dim=4, async_queue_mb=async_queue_mb) as w:
        with pytest.raises(ValueError, match=re.escape(f"{store}: append: keys are big-endian")):
            w.append(np.array([1, 2], dtype=">u8"), rows(2))
        with pytest.raises(ValueError, match=re.escape(f"{store}: append: epochs are big-endian")) \
                as refused:
            w.append(np.array([1, 2], np.uint64), rows(2), np.array([3, 4], dtype=">i8"))
        assert "keys.astype" not in str(refused.value)  # the hint named keys for epochs (a review)
        w.append(np.array([1, 2], dtype="<u8"), rows(2), np.array([3, 4], dtype="<i8"))
    r = embstore.Reader(store)
    assert r.keys.tolist() == [1, 2] and r.epochs.tolist() == [3, 4]


def test_the_native_append_call_checks_its_arguments_and_keeps_its_writer_alive(store):
    w = embstore.Writer(store, dim=4)
    append = w._native.appender()  # what Writer.append calls, outside pybind11's dispatcher
    keys = np.arange(2, dtype=np.uint64)
    assert append(keys, 7, rows(2), None, True) == 0  # the first row's number
    with pytest.raises(TypeError, match="takes 5 arguments; got 4"):
        append(keys, 7, rows(2), None)
    with pytest.raises(TypeError, match="keys and vectors must be numpy arrays"):
        append([1, 2], 7, rows(2), None, True)
    with pytest.raises(TypeError, match="as_dtype must be a str or None"):
        append(keys, 7, rows(2), 5, True)
    with pytest.raises(ValueError, match="truth value of an array"):  # Python's own error
        append(keys, 7, rows(2), None, np.array([True, False]))
    # The module's errors arrive as the same Python exceptions, naming the store.
    with pytest.raises(ValueError, match=re.escape(f"{store}: append: rows have dim 3 but the "
                                                   "store's dim is 4")):
        append(keys, 7, rows(2, dim=3), None, True)
    with pytest.raises(ValueError, match=re.escape(f"{store}: append: keys[1] is -1")):
        append(np.array([1, -1]), 7, rows(2), None, True)
    # Keys that numpy placed off 8-byte alignment are read whole too.
    raw = np.frombuffer(bytearray(8 * 3), dtype=np.uint8)[1:17]
    unaligned = raw.view(np.uint64)
    unaligned[:] = [5, 6]
    assert unaligned.ctypes.data % 8 != 0
    assert append(unaligned, 7, rows(2), None, True) == 2
    import gc
    import weakref
    native = weakref.ref(w._native)
    w.close()
    del w
    gc.collect()
    # The call holds the native writer: it stays alive and, closed, raises instead of crashing.
    assert native() is not None
    with pytest.raises(embstore.ClosedError, match=re.escape(f"{store}: the Writer is closed")):
        append(keys, 7, rows(2), None, True)
    del append
    gc.collect()
    assert native() is None  # and lets it go with the call
    assert embstore.Reader(store).keys.tolist() == [0, 1, 5, 6]


@pytest.mark.parametrize("bad", [2.7, 2.0, "3", True, np.float64(1.0), np.bool_(True), b"1"])
def test_an_epoch_that_is_not_an_integer_is_refused_like_a_non_integer_key(store, bad):
    with embstore.Writer(store, dim=4) as w:
        with pytest.raises(ValueError, match=r"epoch must be an integer in \[0, 2\*\*64\); got"):
            w.append([1], rows(1), bad)
        with pytest.raises(ValueError, match="epoch"):
            w.append([1], rows(1), np.array(bad))  # as a 0-d array too
        assert w.committed_rows() == 0


@pytest.mark.parametrize("keys, message", [
    ([2**64], "keys[0] is 18446744073709551616; it must be in [0, 2**64)"),
    ([5, -1], "keys[1] is -1; keys and epochs must be >= 0"),  # an int64 array: C++ checks
    ([-1, 2**63], "keys[0] is -1; it must be in [0, 2**64)"),  # numpy would make floats
    ([1, True], "keys[1] must be an integer in [0, 2**64); got bool True"),
    ([1.5], "keys[0] must be an integer in [0, 2**64); got float 1.5"),
    ("12", "keys must be integers; got str '12'"),
])
def test_keys_out_of_range_or_not_integers_name_the_key(store, keys, message):
    # Each names the store and the call, whether Python or the C++ module refused it (the
    # Python checks named neither).
    with embstore.Writer(store, dim=4) as w:
        with pytest.raises(ValueError) as error:
            w.append(keys, rows(len(keys)))
        assert str(error.value) == f"{store}: append: {message}"
        w.append([2**64 - 1, 2**63], rows(2))  # the extremes of the range are keys
    assert embstore.Reader(store).keys.tolist() == [2**64 - 1, 2**63]


def test_row_numbers_of_reads_are_checked_with_a_message(store):
    with embstore.Writer(store, dim=4) as w:
        w.append(range(10), rows(10))
    r = embstore.Reader(store)
    with pytest.raises(ValueError, match=r"rows: row -5 is negative; rows are numbered from 0 "
                                         r"\(use r.vectors\[-k:\] for the last k rows\)"):
        r.rows(-5)
    with pytest.raises(ValueError, match="rows: end 2 is before begin 3"):
        r.rows(3, 2)
    with pytest.raises(ValueError, match="rows: row numbers are integers; got float 1.5"):
        r.rows(1.5)
    with pytest.raises(ValueError, match="11"):
        r.rows(0, 11)  # beyond the snapshot: the core names the range
    with pytest.raises(ValueError, match="verify: row -1 is negative"):
        r.verify(-1)
    assert r.rows(8).shape == (2, 4)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64", "int8", "uint8"])
def test_lists_of_rows_are_converted_to_the_stores_dtype(store, dtype):
    values = [[1, 2, 3, 4], [5, 6, 7, 8]]
    with embstore.Writer(store, dim=4, dtype=dtype) as w:
        w.append([1, 2], values)
        w.append([3], ((0.5, 1.5, 2.5, 3.5),) if dtype[0] in "fb" else ((0, 1, 2, 3),))
    r = embstore.Reader(store)
    got = r.tensor().float().numpy() if dtype == "bfloat16" else r.vectors
    np.testing.assert_array_equal(got[:2], values)
    assert len(r) == 3


@pytest.mark.parametrize("async_queue_mb", [0, 1])
@pytest.mark.parametrize("dtype, too_large, largest", [
    ("float16", 65520, 65504), ("bfloat16", 3.4e38, 3.38e38), ("float32", 1e39, 3.4e38)])
def test_float_values_beyond_the_stores_range_are_refused_not_stored_as_infinity(
        store, async_queue_mb, dtype, too_large, largest):
    # numpy, torch and the library's own conversion make such a value infinity without a word.
    w = embstore.Writer(store, dim=3, dtype=dtype, async_queue_mb=async_queue_mb)
    w.append([1], [[largest, -largest, float("inf")]])  # in range, or infinite already
    # A list is converted before it is queued: refused by the call in both modes.
    with pytest.raises(ValueError, match=rf"vectors: row 1, column 2: .* beyond {dtype}'s range"):
        w.append([2, 3], [[1, 2, 3], [4, 5, -too_large]])
    w.flush()
    assert w.committed_rows() == 1
    if dtype != "float32":
        # A float32 array is converted by the append, or in async mode as the call copies it
        # into the queue: refused by the call in both modes, and the writer goes on.
        rows = np.ones((2, 3), dtype=np.float32)
        rows[1, 2] = too_large
        message = rf"row 1 of the batch, column 2: .* beyond {dtype}'s range"
        with pytest.raises(ValueError, match=message):
            w.append([2, 3], rows)
        w.flush()
        assert w.committed_rows() == 1
    w.close()
    r = embstore.Reader(store)
    assert len(r) == 1
    got = r.tensor().float().numpy()
    assert np.isinf(got[0, 2]) and np.isfinite(got[0, :2]).all()


@pytest.mark.parametrize("async_queue_mb", [0, 1])
def test_list_values_for_a_bfloat16_store_are_rounded_once(store, async_queue_mb):
    # Through float32 first this value lands on the tie between bfloat16's largest value and
    # infinity, and the store's rounding made it infinity (refused); once, it is the largest.
    # 1 + 2^-8 + 2^-40 is just above the tie between 1 and 1 + 2^-7: rounded up, not to even.
    below_infinity = (2 - 2.0**-8) * 2.0**127 - 2.0**100
    with embstore.Writer(store, dim=2, dtype="bfloat16", async_queue_mb=async_queue_mb) as w:
        w.append([1], [[below_infinity, 1 + 2**-8 + 2**-40]])
    bits = embstore.Reader(store).vectors[0].tolist()
    assert bits == [0x7F7F, 0x3F81]


def test_list_values_an_integer_store_cannot_hold_are_refused(store):
    with embstore.Writer(store, dim=2, dtype="int8") as w:
        # The value and where it is are named (the message named neither).
        with pytest.raises(ValueError, match=r"1\.5 at row 0, column 0 is not an integer in "
                                             r"\[-128, 127\], .* int8 store"):
            w.append([1], [[1.5, 2]])
        with pytest.raises(ValueError, match=r"300 at row 1, column 1 is not an integer in "
                                             r"\[-128, 127\]"):
            w.append([1, 2], [[1, 2], [3, 300]])
        assert w.committed_rows() == 0


@pytest.mark.parametrize("dtype", ["float32", "int8", "uint8"])
def test_lists_of_bools_are_refused_as_vectors_as_bool_arrays_are(store, dtype):
    with embstore.Writer(store, dim=3, dtype=dtype) as w:
        with pytest.raises(ValueError, match="a list of bool values; rows must hold numbers"):
            w.append([1], [[True, False, True]])
        assert w.committed_rows() == 0


@pytest.mark.parametrize("async_queue_mb", [0, 1])
@pytest.mark.parametrize("rows, shapes", [
    ([[1, 2, 3, 4], [1, 2, 3]], "(3,), (4,)"),
    ([[1, 2, 3, 4], 5], "(), (4,)"),
    ([[1, 2, 3, 4], [3, [4, 5], 6, 7]], "(4,), ragged"),
], ids=["short row", "a number for a row", "a row holding a list"])
def test_a_ragged_list_of_rows_is_refused_naming_vectors(store, async_queue_mb, rows, shapes):
    # numpy's own words ("setting an array element with a sequence") named nothing.
    with embstore.Writer(store, dim=4, async_queue_mb=async_queue_mb) as w:
        with pytest.raises(ValueError) as error:
            w.append([1, 2], rows)
        assert str(error.value) == (f"{store}: append: vectors: rows of different shapes "
                                    f"({shapes}); every row must be dim numbers")
        w.flush()
        assert w.committed_rows() == 0


@pytest.mark.parametrize("async_queue_mb", [0, 1])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("row_dtype", ["float32", "bfloat16", "float64"])
def test_a_list_of_torch_row_tensors_is_appended_as_a_list_of_numpy_rows_is(
        store, async_queue_mb, dtype, row_dtype):
    # [model(x) for x in xs]: refused as "rows of different shapes (torch.Size([4]))" although
    # every row was (4,), after numpy's FutureWarning about the tensors.
    import warnings
    import torch
    values = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.5], [-0.5, 0.25, 9.0, 1e3]]
    tensors = [torch.tensor(v, dtype=getattr(torch, row_dtype), requires_grad=i == 2)
               for i, v in enumerate(values)]
    with embstore.Writer(store, dim=4, dtype=dtype, async_queue_mb=async_queue_mb) as w:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy's FutureWarning, torch's, none
            w.append([1, 2], tensors[:2])
            w.append([3], (tensors[2],), epoch=4)  # a tuple too
        # A ragged list of tensors is still refused, naming the shapes it holds.
        with pytest.raises(ValueError, match=re.escape(
                "vectors: rows of different shapes ((3,), (4,)); every row must be dim numbers")):
            w.append([5, 6], [tensors[0], torch.tensor([1.0, 2.0, 3.0])])
    tensors[0].mul_(0)  # the rows were copied: the store keeps what was passed
    r = embstore.Reader(store)
    got = r.tensor().float().numpy() if dtype == "bfloat16" else r.vectors
    np.testing.assert_array_equal(got, values)  # every value is exact in each dtype
    assert r.keys.tolist() == [1, 2, 3] and r.epochs.tolist() == [0, 0, 4]
    assert r.verify().ok and r.verify().rows_checked == 3


@pytest.mark.parametrize("keys, epoch, message", [
    ({5, 6}, 0, "keys must be integers, one per row (a list, tuple, range, array or tensor); "
                "got set {5, 6}, which has no order: which row would get which value?"),
    (frozenset({5, 6}), 0, "got frozenset frozenset({5, 6}), which has no order"),
    ((k for k in (5, 6)), 0, "keys must be integers, one per row (a list, tuple, range, array "
                             "or tensor); got generator, which is no sequence: pass list(...) "
                             "of it"),
    (None, 0, "keys must be integers, one per row (a list, tuple, range, array or tensor); got "
              "NoneType None"),
    ([5, 6], None, "epoch must be an integer in [0, 2**64) for every row, or one per row; got "
                   "None"),
    ([5, 6], {1, 2}, "epoch must be integers, one per row (a list, tuple, range, array or "
                     "tensor); got set {1, 2}, which has no order"),
], ids=["set", "frozenset", "generator", "no keys", "epoch None", "epochs set"])
def test_keys_or_epochs_that_are_no_sequence_are_named_for_what_they_are(store, keys, epoch,
                                                                          message):
    # They were "keys must be 1-D; got 0 dims" (and "epochs must be 1-D" for epoch=None): numpy
    # made one object of each, and the message named a shape the caller never gave.
    with embstore.Writer(store, dim=4) as w:
        with pytest.raises(ValueError) as error:
            w.append(keys, rows(2), epoch)
        assert message in str(error.value)
        assert str(error.value).startswith(f"{store}: append: ")
        assert "dims" not in str(error.value)
        assert w.committed_rows() == 0


def test_an_array_of_another_dtype_is_refused_not_converted(store):
    with embstore.Writer(store, dim=4) as w:
        with pytest.raises(ValueError, match="cannot append float64 rows to a float32 store"):
            w.append([1], np.zeros((1, 4)))  # numpy's default float64
        assert w.committed_rows() == 0


def test_an_existing_directory_that_is_not_a_store_is_named_as_such(tmp_path):
    not_a_store = tmp_path / "photos"
    not_a_store.mkdir()
    (not_a_store / "cat.jpg").write_bytes(b"meow")
    for open_it in (lambda: embstore.Writer(not_a_store, dim=8),
                    lambda: embstore.Writer(not_a_store),
                    lambda: embstore.Reader(not_a_store),
                    lambda: embstore.info(not_a_store)):
        with pytest.raises(embstore.NotAStoreError) as error:
            open_it()
        assert not isinstance(error.value, FileNotFoundError)
        assert isinstance(error.value, embstore.Error) and error.value.code == "not_a_store"
        assert f"{not_a_store}: is a directory but not an embstore store" in str(error.value)
    assert os.listdir(not_a_store) == ["cat.jpg"]  # untouched
    a_file = not_a_store / "cat.jpg"
    for open_it in (lambda: embstore.Writer(a_file, dim=8), lambda: embstore.Reader(a_file)):
        with pytest.raises(embstore.NotAStoreError, match="is a file, not an embstore store") \
                as error:
            open_it()
        assert error.value.errno == errno.ENOTDIR  # was ENOENT: the file is there
    assert a_file.read_bytes() == b"meow"
    with pytest.raises(FileNotFoundError):  # a missing path stays FileNotFoundError
        embstore.Writer(tmp_path / "missing")
    # A path under a file is no file itself: the core's error stands (it was called a file when
    # the check first looked at the path with one os.stat).
    with pytest.raises(FileNotFoundError, match="cat.jpg/sub: no store here"):
        embstore.Reader(a_file / "sub")
    with pytest.raises(NotADirectoryError, match="cat.jpg is not a directory"):
        embstore.Writer(a_file / "sub", dim=8)



def test_a_store_another_process_is_creating_is_never_called_a_file(tmp_path):
    """A Reader opened while another process created the store at its path: the check after the
    core's FileNotFoundError looked at the path twice (a directory? then: anything there?), and
    a store renamed into place between the two was called a file (NotAStoreError, not an
    OSError: a loop waiting for the store with `except FileNotFoundError` ended; a review saw
    5 in 20 creations). Each open must find the store, or nothing (FileNotFoundError)."""
    script = textwrap.dedent("""
        import sys, embstore
        for i in range(int(sys.argv[2])):
            path = f"{sys.argv[1]}/s{i}"
            embstore.Writer(path, dim=4).close()
        """)
    rounds = 30
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(rounds)])
    seen = {"found": 0, "missing": 0}
    wrong = []
    try:
        for i in range(rounds):
            path = tmp_path / f"s{i}"
            while True:
                try:
                    embstore.Reader(path).close()
                    seen["found"] += 1
                    break
                except FileNotFoundError:
                    seen["missing"] += 1
                    if child.poll() is not None and not path.exists():
                        break  # the child ended (failed): its error is checked below
                except embstore.NotAStoreError as error:
                    wrong.append(str(error))
                    break
    finally:
        assert child.wait(timeout=120) == 0
    assert not wrong, wrong
    assert seen["found"] == rounds and seen["missing"] > 0, seen


@pytest.mark.parametrize("lost", ["rows.1", "index.1"])
def test_a_store_that_lost_a_file_other_than_its_header_names_that_file(tmp_path, lost):
    store = tmp_path / "s"
    with embstore.Writer(store, dim=2) as w:
        w.append([1], np.ones((1, 2), np.float32))
    os.remove(store / lost)
    # Damage to the store, not a path with nothing there (FileNotFoundError).
    for open_it in (lambda: embstore.Reader(store), lambda: embstore.info(store),
                    lambda: embstore.Writer(store), lambda: embstore.Writer(store, dim=2)):
        with pytest.raises(embstore.CorruptionError, match=f"{store / lost}: missing") as error:
            open_it()
        assert not isinstance(error.value, (FileNotFoundError, embstore.NotAStoreError))
    assert lost not in os.listdir(store)  # nothing recreated


def _store_info_fields():
    header = open(os.path.join(REPO, "include", "embstore", "store.h")).read()
    body = header[header.index("struct StoreInfo {"):]
    body = body[:body.index("};")]
    return re.findall(r"^\s+[\w:<>]+\s+(\w+)(?:\s*=[^;]*)?;", body, re.M)


def test_info_keys_are_the_field_names_of_the_cpp_store_info(store):
    fields = _store_info_fields()
    assert "format_major" in fields and "committed_rows" in fields
    with embstore.Writer(store, dim=4) as w:
        w.append([1], rows(1))
        assert list(w.info()) == fields
    assert list(embstore.info(store)) == fields
    info = embstore.Reader(store).info()
    assert list(info) == fields
    assert f"{info['format_major']}.{info['format_minor']}" == embstore.FORMAT_VERSION
    assert all(name in embstore.info.__doc__ for name in fields)  # documented


def test_record_checks_the_checksum_and_names_row_key_and_epoch(store):
    with embstore.Writer(store, dim=4) as w:
        w.append(np.arange(10) + 100, np.arange(40, dtype=np.float32).reshape(10, 4), 3)
    with open(os.path.join(store, "rows.1"), "r+b") as f:
        f.seek(7 * 16 + 3)
        byte = f.read(1)
        f.seek(7 * 16 + 3)
        f.write(bytes([byte[0] ^ 0xFF]))
    r = embstore.Reader(store)
    good = r.record(6)
    assert (good.row, good.key, good.epoch) == (6, 106, 3)
    np.testing.assert_array_equal(good.vector, [24, 25, 26, 27])
    assert not good.vector.flags.writeable
    with pytest.raises(embstore.CorruptionError, match=r"row 7 \(key 107, epoch 3\) fails its "
                                                       r"checksum"):
        r.record(7)
    with pytest.raises(ValueError, match="outside the snapshot"):
        r.record(10)
    with pytest.raises(ValueError, match="record: row -1 is negative"):
        r.record(-1)


APPEND_LATER = """
    import sys, time
    import numpy as np
    import embstore
    sys.stdin.readline()
    time.sleep(1.0)  # the scenario: rows arrive after more than wait's 0.2 s slices
    with embstore.Writer(sys.argv[1]) as w:
        w.append([1, 2], np.ones((2, 4), np.float32))
"""


@pytest.mark.parametrize("timeout", [math.inf, 1e300, 9.3e9, 2.0**63])
def test_wait_with_an_infinite_or_huge_timeout_waits_until_rows_arrive(store, timeout):
    embstore.create(store, dim=4)
    r = embstore.Reader(store)
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(APPEND_LATER), store],
                             stdin=subprocess.PIPE, text=True)
    child.stdin.write("go\n")
    child.stdin.close()
    try:
        assert r.wait(2, timeout=timeout) is True
        assert len(r) == 2
    finally:
        assert child.wait(60) == 0


def test_wait_refuses_a_negative_or_nan_timeout(store):
    embstore.create(store, dim=4)
    r = embstore.Reader(store)
    for bad in (-1, -math.inf, math.nan):
        with pytest.raises(ValueError, match=r"wait: timeout is .*; use seconds >= 0, or None"):
            r.wait(1, timeout=bad)
    with pytest.raises(ValueError, match="wait: n is -1"):
        r.wait(-1)
    assert r.wait(0, timeout=0) is True
    assert r.wait(1, timeout=0) is False


@pytest.mark.parametrize("make, message", [
    (lambda p: embstore.create(p, dim=4.7), "dim must be an integer; got float 4.7"),
    (lambda p: embstore.create(p, dim=True), "dim must be an integer; got bool True"),
    (lambda p: embstore.create(p, dim=np.bool_(True)), "dim must be an integer; got bool_ True"),
    (lambda p: embstore.Writer(p, dim="4"), "dim must be an integer; got str '4'"),
    (lambda p: embstore.create(p, dim=np.float32(4)), "dim must be an integer; got float32 4.0"),
    (lambda p: embstore.create(p, dim=-1), r"dim -1 is outside 1\.\.16777216"),
    (lambda p: embstore.Writer(p, dim=2**32 + 4), r"dim 4294967300 is outside 1\.\.16777216"),
    (lambda p: embstore.create(p, dim=4, segment_mb=-1), "segment_mb is -1; it must be a"),
    (lambda p: embstore.Writer(p, dim=4, segment_mb="1"), "segment_mb must be a number"),
    (lambda p: embstore.Writer(p, dim=4, segment_mb=1e30), "segment_mb is 1e.30: too large"),
    (lambda p: embstore.create(p, dim=4, segment_mb=0.004),
     "segment_mb is 0.004: 4194 bytes, not a whole number of 4 KiB pages"),
    (lambda p: embstore.create(p, dim=4, metadata=b"\xff"), "metadata must be UTF-8 text"),
    (lambda p: embstore.create(p, dim=4, metadata={1, 2}), "metadata must be text, UTF-8"),
    (lambda p: embstore.Writer(p, dim=4, map_bytes=-1), "map_bytes is -1"),
    (lambda p: embstore.Writer(p, dim=4, map_bytes=1.5), "map_bytes must be an integer"),
    (lambda p: embstore.Writer(p, dim=4, sync_interval=1e30), r"sync_interval is 1e\+30 s"),
    (lambda p: embstore.Writer(p, dim=4, sync_interval=-1), r"sync_interval is -1.0 s"),
    (lambda p: embstore.Writer(p, dim=4, sync_interval=float("nan")), "sync_interval is nan"),
    (lambda p: embstore.Writer(p, dim=4, sync_interval="5"), "sync_interval must be a number"),
    (lambda p: embstore.Writer(p, dim=4, async_queue_mb=float("inf")), "async_queue_mb is inf"),
    (lambda p: embstore.Writer(p, dim=4, async_queue_mb=float("nan")), "async_queue_mb is nan"),
    (lambda p: embstore.Writer(p, dim=4, async_queue_mb=-1), "async_queue_mb is -1"),
])
def test_bad_constructor_arguments_are_named_and_create_nothing(tmp_path, make, message):
    with pytest.raises(ValueError, match=message):
        make(tmp_path / "s")
    assert not os.path.exists(tmp_path / "s")


def test_dim_may_be_any_python_or_numpy_integer(tmp_path):
    for i, dim in enumerate((4, np.uint8(4), np.int64(4))):
        embstore.create(tmp_path / str(i), dim=dim)
        assert embstore.Reader(tmp_path / str(i)).dim == 4


def test_reader_map_bytes_is_checked_and_small_sync_interval_or_queue_round_up(tmp_path):
    embstore.create(tmp_path / "r", dim=4)
    with pytest.raises(ValueError, match="map_bytes is -1"):
        embstore.Reader(tmp_path / "r", map_bytes=-1)
    with embstore.Writer(tmp_path / "s", dim=4, sync_interval=0.0001) as w:  # 1 ms, not 0
        w.append([1], np.ones((1, 4), np.float32))
    with embstore.Writer(tmp_path / "s", async_queue_mb=1e-9) as w:  # a tiny queue, not none
        assert "async" in repr(w) and w.append([2], np.ones((1, 4), np.float32)) is None
    assert embstore.Reader(tmp_path / "s").keys.tolist() == [1, 2]


@pytest.mark.parametrize("async_queue_mb", [0, 1])
def test_an_empty_batch_of_another_dim_or_dtype_is_refused_as_a_full_one(store, async_queue_mb):
    # A batch of 0 rows is valid, but its shape and dtype are checked as any batch's: a caller
    # whose first batch is empty hears of a wrong one then (a review: both were returned 0).
    w = embstore.Writer(store, dim=4, async_queue_mb=async_queue_mb)
    with pytest.raises(ValueError, match="rows have dim 5 but the store's dim is 4"):
        w.append([], np.zeros((0, 5), np.float32))
    with pytest.raises(ValueError, match="cannot append float64 rows to a float32 store"):
        w.append([], np.zeros((0, 4), np.float64))
    w.append([], np.zeros((0, 4), np.float32))  # still valid
    w.append([], [])  # an empty list has no dim to be wrong: no rows (it was refused as 1-D)
    w.append((), ())
    w.close()
    assert len(embstore.Reader(store)) == 0


def _not_utf8_path(tmp_path, as_bytes):
    """A path under tmp_path whose name is not UTF-8: bytes, or os.fsdecode's str of them (with
    a lone surrogate), as os.listdir gives it for such a name."""
    path = os.fsencode(str(tmp_path)) + b"/x\xff"
    return path if as_bytes else os.fsdecode(path)


def _entry_points():
    def torch_recorder(bad, good, out):
        torch = pytest.importorskip("torch")
        from embstore.torch import EmbeddingRecorder
        EmbeddingRecorder(torch.nn.Sequential(torch.nn.Linear(4, 4)), "0", bad, dim=4)

    def torch_dataset(bad, good, out):
        pytest.importorskip("torch")
        from embstore.torch import EmbeddingDataset
        EmbeddingDataset(bad)

    def dask_arrays(bad, good, out, listed=False):
        pytest.importorskip("dask.array")
        from embstore.dask import from_store
        from_store([good, bad] if listed else bad)

    def export_hdf5(bad, good, out):
        pytest.importorskip("h5py")
        embstore.export_hdf5(good, bad)

    def write_manifest(bad, good, out):
        store_id = embstore.info(good)["store_id"]
        embstore.shards.write_manifest(bad, {"dim": 4, "dtype": "float32", "shards": [
            {"path": os.path.basename(good), "store_id": store_id, "rows": 2}]})

    rows = np.zeros((2, 4), np.float32)
    return {
        "create": lambda bad, good, out: embstore.create(bad, dim=4),
        "info": lambda bad, good, out: embstore.info(bad),
        "salvage-store": lambda bad, good, out: embstore.salvage(bad, out),
        "salvage-out": lambda bad, good, out: embstore.salvage(good, bad),
        "compact-store": lambda bad, good, out: embstore.compact(bad, out),
        "compact-out": lambda bad, good, out: embstore.compact(good, bad),
        "merge-out": lambda bad, good, out: embstore.merge(bad, [good]),
        "merge-input": lambda bad, good, out: embstore.merge(out, [good, bad]),
        "merge-manifest": lambda bad, good, out: embstore.merge(out, bad),
        "Writer": lambda bad, good, out: embstore.Writer(bad, dim=4, dtype="float16",
                                                         async_queue_mb=4),
        "Reader": lambda bad, good, out: embstore.Reader(bad),
        "export_npy-out": lambda bad, good, out: embstore.export_npy(good, bad),
        "export_npy-store": lambda bad, good, out: embstore.export_npy(bad, out),
        "export_hdf5": export_hdf5,
        "import_npy": lambda bad, good, out: embstore.import_npy(bad, rows),
        "ShardSet": lambda bad, good, out: embstore.ShardSet(bad),
        "ShardSet-list": lambda bad, good, out: embstore.ShardSet([good, bad]),
        "read_manifest": lambda bad, good, out: embstore.shards.read_manifest(bad),
        "write_manifest": write_manifest,
        "EmbeddingRecorder": torch_recorder,
        "EmbeddingDataset": torch_dataset,
        "dask": dask_arrays,
        "dask-list": lambda bad, good, out: dask_arrays(bad, good, out, listed=True),
    }


@pytest.mark.parametrize("as_bytes", [True, False], ids=["bytes", "surrogate-str"])
@pytest.mark.parametrize("entry", list(_entry_points()))
def test_a_path_that_is_not_utf8_is_refused_by_every_entry_point_before_anything_is_made(
        tmp_path, entry, as_bytes):
    # A Writer at b".../x\xff" stored its rows, then lost them all at exit with only an
    # "Exception ignored" UnicodeDecodeError (the core hands paths back as UTF-8 text); Reader,
    # info and create raised UnicodeDecodeError or pybind11's "incompatible function arguments".
    good = str(tmp_path / "good")
    with embstore.Writer(good, dim=4) as w:
        w.append([1, 2], np.ones((2, 4), np.float32))
    bad = _not_utf8_path(tmp_path, as_bytes)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match=re.escape(repr(bad)) + r" is not UTF-8 text; "
                       "embstore paths must be UTF-8"):
        _entry_points()[entry](bad, good, str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == before


def test_a_relative_path_in_a_working_directory_that_is_not_utf8_is_refused(tmp_path,
                                                                             monkeypatch):
    # The core makes a relative path absolute by the working directory: its path came back
    # undecodable, as a path given so would (Writer.path, and the rows lost at exit).
    where = os.fsencode(str(tmp_path)) + b"/d\xff"
    os.mkdir(where)
    monkeypatch.chdir(where)
    for make in (lambda: embstore.Writer("s", dim=4), lambda: embstore.create(b"s", dim=4)):
        with pytest.raises(ValueError, match=r"'s' is relative to the working directory .* "
                           "which is not UTF-8 text; embstore paths must be UTF-8"):
            make()
    assert os.listdir(where) == []


def test_a_manifest_shard_path_that_is_not_utf8_is_named(tmp_path):
    with pytest.raises(ValueError, match=re.escape(r"manifest shards[0]['path'] 'x\udcff' is "
                                                   "not UTF-8 text")):
        embstore.shards.write_manifest(tmp_path / "manifest.json", {
            "dim": 4, "dtype": "float32",
            "shards": [{"path": os.fsdecode(b"x\xff"), "store_id": "0" * 32, "rows": 0}]})
    assert os.listdir(tmp_path) == []


class _WithArray:
    """An object numpy reads through __array__ (as pandas, xarray and others are read)."""

    def __init__(self, array):
        self.array = array

    def __array__(self, dtype=None):
        return self.array if dtype is None else self.array.astype(dtype)


class _WithArrayInterface:
    def __init__(self, array):
        self.array = array
        self.__array_interface__ = array.__array_interface__


@pytest.mark.parametrize("wrap", [
    memoryview,
    lambda a: memoryview(__import__("array").array(a.dtype.char, a.ravel().tolist())).cast(
        "B").cast(a.dtype.char, a.shape),
    _WithArray,
    _WithArrayInterface,
], ids=["memoryview", "array.array", "__array__", "__array_interface__"])
@pytest.mark.parametrize("async_queue_mb", [0, 1])
def test_typed_buffers_of_another_dtype_are_refused_not_narrowed(store, wrap, async_queue_mb):
    # A memoryview of float64 rows was narrowed to float32 (16777217.0 stored as 16777216.0) and
    # one of int64 converted, without a word, where the same ndarray is refused.
    import array
    w = embstore.Writer(store, dim=2, async_queue_mb=async_queue_mb)
    with pytest.raises(ValueError, match="cannot append float64 rows to a float32 store"):
        w.append([1], wrap(np.array([[0.1, 16777217.0]])))
    with pytest.raises(ValueError, match=re.escape(f"{store}: append: vectors have dtype int64")):
        w.append([2], wrap(np.array([[16777217, 1]], np.int64)))
    with pytest.raises(ValueError, match=re.escape(f"{store}: append: vectors must be 2-D")):
        w.append([3], array.array("d", [0.1, 16777217.0]))
    w.append([4], wrap(np.array([[0.1, 16777217.0]], np.float32)))  # the store's dtype: stored
    w.append([5], [[0.5, 16777217.0]])  # a list has no dtype: converted, as documented
    w.close()
    r = embstore.Reader(store)
    assert r.keys.tolist() == [4, 5]
    assert r.vectors.tolist() == [[np.float32(0.1), 16777216.0], [0.5, 16777216.0]]


def test_copying_a_writer_or_reader_is_refused(store):
    # copy.copy shared the native Writer: when the copy was garbage-collected its __del__ closed
    # it under the original (ClosedError); a copied Reader's close() closed the original's.
    import copy
    import gc
    w = embstore.Writer(store, dim=2)
    r = embstore.Reader(store)
    for original, kind in ((w, "Writer"), (r, "Reader")):
        for copier in (copy.copy, copy.deepcopy):
            with pytest.raises(TypeError, match=f"a {kind} cannot be copied"):
                copier(original)
    gc.collect()
    assert w.append([1], np.ones((1, 2), np.float32)) == 0
    w.close()
    assert r.wait(1, timeout=60) and r.keys.tolist() == [1]


def test_pickling_a_writer_or_reader_is_refused_naming_the_store_and_what_to_send(store):
    # It failed inside the native object ("cannot pickle 'embstore._embstore.NativeReader'
    # object"), what client.submit(f, reader) meets, naming neither the store nor a remedy.
    import pickle
    w = embstore.Writer(store, dim=2)
    r = embstore.Reader(store)
    with pytest.raises(TypeError, match=f"a Writer of {store} cannot be pickled: .* send the "
                                        "store's path, and open a Writer there"):
        pickle.dumps(w)
    with pytest.raises(TypeError, match=f"a Reader of {store} cannot be pickled: .* or an "
                                        "embstore.ShardSet of it"):
        pickle.dumps(r)
    r.close()
    with pytest.raises(TypeError, match="a Reader of a closed store cannot be pickled"):
        pickle.dumps(r)
    assert w.append([1], np.ones((1, 2), np.float32)) == 0


def test_wait_timeout_is_a_number_not_a_bool_or_str(store):
    embstore.create(store, dim=4)
    r = embstore.Reader(store)
    for bad in ("0.1", True, np.bool_(False), b"1", [1]):
        with pytest.raises(ValueError, match="wait: timeout must be a number of seconds; got "):
            r.wait(1, timeout=bad)
    assert r.wait(1, timeout=np.float32(0)) is False and r.wait(0, timeout=np.int64(1)) is True
    assert r.wait(0, timeout=math.inf) is True and r.wait(0) is True


@pytest.mark.parametrize("async_queue_mb", [0, 1])
def test_copied_batches_counts_only_batches_that_were_taken(store, async_queue_mb):
    # A transposed array needs a contiguous copy first; one refused afterwards (another width
    # than the store's) stored nothing, and is not counted as a copied batch.
    w = embstore.Writer(store, dim=4, async_queue_mb=async_queue_mb)
    with pytest.raises(ValueError, match="dim"):
        w.append(range(3), np.ones((5, 3), np.float32).T)  # 3 rows of 5 values
    assert w.stats()["copied_batches"] == 0
    w.append(range(3), np.ones((4, 3), np.float32).T)
    w.flush()
    assert w.stats()["copied_batches"] == 1 and w.stats()["rows"] == 3
    w.close()


@pytest.mark.parametrize("method", ["find_many", "get_many"])
def test_lookups_of_many_name_the_method_called_when_keys_and_epochs_disagree(store, method):
    """get_many's error named find_many and an internal "2 outputs" (a review)."""
    with embstore.Writer(store, dim=4) as w:
        w.append(np.array([1, 2]), rows(2), 0)
    r = embstore.Reader(store)
    message = (f"{store}: {method}: 2 keys and 3 epochs: give one epoch per key, one for every "
               "key, or none (the latest)")
    with pytest.raises(ValueError, match=re.escape(message)):
        getattr(r, method)([1, 2], epochs=[0, 0, 0])
    assert getattr(r, method)([1, 2], epochs=[0]).shape[0] == 2
    assert getattr(r, method)([1, 2], epochs=[]).shape[0] == 2  # none: the latest
