"""embstore merge: shards of a manifest or several stores into one store, row for row; shards that
disagree are refused by name; the inputs are left as they were."""

import json
import os

import numpy as np

import embstore
from conftest import hash_tree, make_store, run

FORMAT_MISMATCH, ALREADY_EXISTS, NOT_FOUND = 15, 13, 12


def test_merge_of_two_stores_keeps_every_row_key_and_epoch_in_order(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make_store(a, epochs=2, rows_per_epoch=5)
    make_store(b, epochs=3, rows_per_epoch=4)
    before = hash_tree(a), hash_tree(b)
    out = tmp_path / "merged"
    r = run("merge", out, a, b, "--json")
    assert r.code == 0, r
    info = json.loads(r.out)
    assert info["committed_rows"] == 22 and info["shards"] == 2
    merged, ra, rb = embstore.Reader(out), embstore.Reader(a), embstore.Reader(b)
    assert merged.verify().ok
    assert np.array_equal(merged.vectors, np.concatenate([ra.vectors, rb.vectors]))
    assert np.array_equal(merged.keys, np.concatenate([ra.keys, rb.keys]))
    assert np.array_equal(merged.epochs, np.concatenate([ra.epochs, rb.epochs]))
    assert (hash_tree(a), hash_tree(b)) == before


def test_merge_refuses_shards_of_another_dim_naming_them_and_leaves_no_output(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make_store(a, dim=4)
    make_store(b, dim=8)
    r = run("merge", tmp_path / "merged", a, b)
    assert r.code == FORMAT_MISMATCH, r
    assert b in r.err and "dim" in r.err and len(r.err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "merged")


def test_merge_into_an_existing_path_or_from_a_missing_store_is_an_error(tmp_path):
    a = str(tmp_path / "a")
    make_store(a)
    r = run("merge", a, a)
    assert r.code == ALREADY_EXISTS, r
    r = run("merge", tmp_path / "out", tmp_path / "missing")
    assert r.code == NOT_FOUND, r
    assert "missing" in r.err
