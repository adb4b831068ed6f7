"""Model-based test (Hypothesis): random appends through sync and async writers, reopened
readers and refreshes, checked against an in-memory oracle."""
import threading

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import embstore  # noqa: E402

DIM = 3

operation = st.one_of(
    st.tuples(st.just("append"), st.integers(0, 40), st.integers(0, 5), st.booleans()),
    st.just(("reopen_writer",)),
    st.just(("refresh",)),
    st.just(("new_reader",)),
)


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(operation, max_size=25), dtype=st.sampled_from(["float32", "float16"]),
       async_mb=st.sampled_from([0, 0.01, 4]))
def test_random_operations_match_an_oracle(tmp_path_factory, ops, dtype, async_mb):
    path = str(tmp_path_factory.mktemp("model") / "store")
    np_dtype = np.float32 if dtype == "float32" else np.float16
    oracle_keys, oracle_epochs, oracle_rows = [], [], []
    w = embstore.Writer(path, dim=DIM, dtype=dtype, async_queue_mb=async_mb, segment_mb=4096 / (1 << 20))
    r = embstore.Reader(path)
    next_key = 0
    seen = 0
    for op in ops:
        if op[0] == "append":
            _, n, epoch, per_row = op
            keys = np.arange(next_key, next_key + n)
            next_key += n
            rows = (np.arange(n * DIM).reshape(n, DIM) + keys[:1].sum()).astype(np.float32)
            epochs = (keys % 7) if per_row else epoch
            w.append(keys, rows, epochs)
            oracle_keys += keys.tolist()
            oracle_epochs += (list(epochs) if per_row else [epoch] * n)
            oracle_rows.append(rows.astype(np_dtype))
        elif op[0] == "reopen_writer":
            w.close()
            w = embstore.Writer(path, async_queue_mb=async_mb)
        elif op[0] == "refresh":
            w.flush()
            assert r.refresh() == len(oracle_keys)
        else:
            w.flush()
            r = embstore.Reader(path)
        n = len(r)
        assert seen <= n <= len(oracle_keys)  # snapshots never shrink, never run ahead
        seen = n
        assert r.keys.tolist() == oracle_keys[:n]
        assert r.epochs.tolist() == [int(e) for e in oracle_epochs[:n]]
        expected = np.concatenate(oracle_rows) if oracle_rows else np.zeros((0, DIM), np_dtype)
        np.testing.assert_array_equal(r.vectors, expected[:n])
    w.close()
    r = embstore.Reader(path)
    assert len(r) == len(oracle_keys) and r.verify().ok


@pytest.mark.parametrize("async_queue_mb", [0, 1])
def test_threads_appending_through_one_writer(store, async_queue_mb):
    w = embstore.Writer(store, dim=4, async_queue_mb=async_queue_mb)
    go = threading.Barrier(4)

    def append(t):
        go.wait()
        for b in range(50):
            keys = np.arange(10) + 1000 * t + 10 * b
            w.append(keys, np.repeat(keys[:, None], 4, axis=1).astype(np.float32), t)

    threads = [threading.Thread(target=append, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w.close()
    r = embstore.Reader(store)
    assert len(r) == 2000 and sorted(r.keys.tolist()) == sorted(
        k for t in range(4) for k in range(1000 * t, 1000 * t + 500))
    np.testing.assert_array_equal(r.vectors, np.repeat(r.keys[:, None], 4, axis=1))
    assert (r.keys.reshape(-1, 10) // 1000 == r.epochs.reshape(-1, 10)).all()
