"""embstore merge: shards of a manifest or several stores into one store, row for row; shards that
disagree are refused by name; the inputs are left as they were; a merge killed or failing
part-way leaves no store at the output."""

import json
import os
import resource
import signal
import subprocess

import numpy as np
import pytest

import embstore
from conftest import (CLI, bind_mounted, corrupt_row, hash_tree, kill_when, make_store,
                      partial_dirs, run)

FORMAT_MISMATCH, ALREADY_EXISTS, NOT_FOUND, FULL, CORRUPTION, USAGE = 15, 13, 12, 18, 14, 2


def test_merge_of_two_stores_keeps_every_row_key_and_epoch_in_epoch_order(tmp_path):
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
    # Epoch order: by epoch, then store, each store's own order kept (both are in epoch order).
    order = np.argsort(np.concatenate([ra.epochs, rb.epochs]), kind="stable")
    assert np.array_equal(merged.vectors, np.concatenate([ra.vectors, rb.vectors])[order])
    assert np.array_equal(merged.keys, np.concatenate([ra.keys, rb.keys])[order])
    assert np.array_equal(merged.epochs, np.concatenate([ra.epochs, rb.epochs])[order])
    assert merged.epochs.tolist() == sorted(merged.epochs.tolist())
    assert (hash_tree(a), hash_tree(b)) == before


def test_merge_refuses_a_store_listed_twice(tmp_path):
    a = make_store(tmp_path / "a")
    r = run("merge", tmp_path / "m", a, a)
    assert r.code == 2, r
    assert f"is the same store as shard {a}" in r.err and len(r.err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "m")


def test_merge_refuses_shards_of_another_dim_naming_them_and_leaves_no_output(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make_store(a, dim=4)
    make_store(b, dim=8)
    r = run("merge", tmp_path / "merged", a, b)
    assert r.code == FORMAT_MISMATCH, r
    assert b in r.err and "dim" in r.err and len(r.err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "merged")


def test_merge_of_a_shard_with_a_damaged_row_names_it_once(tmp_path):
    # "embstore merge: merge: .../rows.1: row 12 ...": the library's prefix doubled the tool's.
    a = make_store(tmp_path / "a")
    corrupt_row(a, 12, 4 * 2)  # dim 4 float16
    r = run("merge", tmp_path / "out", a)
    assert r.code == 14, r
    lines = r.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"embstore merge: {a}/rows.1: row 12"), r
    assert lines[0].endswith("; nothing was merged"), r
    assert not os.path.exists(tmp_path / "out") and partial_dirs(tmp_path) == []


def test_merge_of_stores_with_different_metadata_is_refused_unless_a_manifest_gives_it(
        tmp_path):
    """Stores of different metadata (another model, another run's config) were merged under
    the first one's, the others' dropped without a word. Refused naming both; a manifest says
    which metadata the merged store has."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make_store(a, metadata={"model": "A"})
    make_store(b, metadata={"model": "B"})
    r = run("merge", tmp_path / "merged", a, b)
    assert r.code == FORMAT_MISMATCH, r
    assert f"shards {a} and {b} have different metadata" in r.err and '"B"' in r.err, r
    assert not os.path.exists(tmp_path / "merged")
    manifest = {"embstore_manifest": 1, "dim": 4, "dtype": "float16",
                "metadata": '{"models": ["A", "B"]}',
                "shards": [{"path": name, "store_id": embstore.info(tmp_path / name)["store_id"],
                            "rows": 30} for name in ("a", "b")]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    r = run("merge", tmp_path / "merged", tmp_path / "manifest.json")
    assert r.code == 0, r
    assert embstore.Reader(tmp_path / "merged").metadata == {"models": ["A", "B"]}


def test_merge_into_an_existing_path_or_from_a_missing_store_is_an_error(tmp_path):
    a = str(tmp_path / "a")
    make_store(a)
    r = run("merge", a, a)
    assert r.code == ALREADY_EXISTS, r
    r = run("merge", tmp_path / "out", tmp_path / "missing")
    assert r.code == NOT_FOUND, r
    assert "missing" in r.err
    # A symbolic link at the output, dangling or not, is refused before any row is copied.
    os.symlink(tmp_path / "nowhere" / "x", tmp_path / "dangling")
    os.symlink(tmp_path / "target", tmp_path / "dangling2")
    for args, out in ((("merge", tmp_path / "dangling", a), tmp_path / "dangling"),
                      (("salvage", a, tmp_path / "dangling2"), tmp_path / "dangling2")):
        r = run(*args)
        assert r.code == ALREADY_EXISTS, (args, r)
        assert r.err.strip() == f"embstore {args[0]}: {out}: already exists", (args, r)
        assert not [p for p in os.listdir(tmp_path) if ".partial-" in p], args
    assert not os.path.lexists(tmp_path / "target")


def _committed_rows(store):
    """The state page's committed_rows (src/format/FORMAT.md, byte 4096 of the header), or 0
    while the store has no header yet."""
    try:
        with open(os.path.join(store, "header"), "rb") as f:
            f.seek(4096)
            return int.from_bytes(f.read(8), "little")
    except (FileNotFoundError, NotADirectoryError):
        return 0


def test_merge_killed_mid_way_leaves_no_store_at_the_output(tmp_path):
    # Big enough that a merge takes a while: 2 x 30k rows x 256 float32 = 60 MiB.
    inputs = []
    block = np.random.default_rng(5).standard_normal((3000, 256)).astype(np.float32)
    for name in ("a", "b"):
        path = tmp_path / name
        embstore.create(path, dim=256, dtype="float32", segment_mb=16)
        with embstore.Writer(path) as w:
            for i in range(10):
                w.append(keys=np.arange(3000) + i * 3000, vectors=block, epoch=i)
        inputs.append(str(path))
    before = [hash_tree(p) for p in inputs]
    killed_mid_way = 0
    for attempt in range(3):
        out = tmp_path / f"merged{attempt}"
        proc = subprocess.Popen([CLI, "merge", str(out), *inputs, "--quiet"],
                                stdout=subprocess.DEVNULL)
        # Kill as soon as the new store, wherever it is being built, holds a row.
        def holds_a_row():
            building = [out] + [tmp_path / d for d in partial_dirs(tmp_path)
                                if d.startswith(f".merged{attempt}.")]
            return any(_committed_rows(p) > 0 for p in building)
        if kill_when(proc, holds_a_row, 60):
            killed_mid_way += 1
            # Nothing at the output name: no half store can be mistaken for the result.
            assert not os.path.exists(out), attempt
            assert run("info", out).code == NOT_FOUND
            # What is left is hidden and says it is partial.
            left = [d for d in partial_dirs(tmp_path) if d.startswith(f".merged{attempt}.")]
            assert len(left) == 1 and left[0].startswith(f".merged{attempt}.partial-"), left
        else:
            assert proc.returncode == 0 and run("verify", out).code == 0
    assert killed_mid_way >= 1
    assert [hash_tree(p) for p in inputs] == before
    # The leftovers do not block a merge to the same name.
    r = run("merge", tmp_path / "merged0", *inputs, "--quiet")
    assert r.code == 0, r
    assert len(embstore.Reader(tmp_path / "merged0")) == 60000


def test_merge_on_a_full_disk_is_an_error_that_leaves_nothing_at_the_output(tmp_path,
                                                                            small_tmpfs):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make_store(a, dim=256, dtype="float32", epochs=3, rows_per_epoch=1000)
    make_store(b, dim=256, dtype="float32", epochs=3, rows_per_epoch=1000)
    disk = small_tmpfs("4m")  # 6 MiB of rows do not fit
    out = disk / "merged"
    r = run("merge", out, a, b)
    assert r.code == FULL, r
    assert "No space left on device" in r.err and len(r.err.strip().splitlines()) == 1, r
    assert not os.path.exists(out)
    assert os.listdir(disk) == []  # no working directory or lock file left either
    assert run("verify", a).code == 0 and run("verify", b).code == 0


@pytest.mark.parametrize("command", ["merge", "salvage"])
@pytest.mark.parametrize("limit", [4096, 100_000])  # fails making the store / appending to it
def test_merge_and_salvage_errors_name_the_output_not_the_hidden_working_directory(
        tmp_path, command, limit):
    source = make_store(tmp_path / "s", dim=256, dtype="float32", epochs=1, rows_per_epoch=400)
    before = hash_tree(source)
    out = str(tmp_path / "out")
    args = [out, source] if command == "merge" else [source, out]

    def file_size_limit():  # a file may not grow past `limit`: EFBIG, a full disk for the tool
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([CLI, command, *args], capture_output=True, text=True, timeout=120,
                          preexec_fn=file_size_limit)
    assert proc.returncode == FULL, proc
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1, proc
    # The output the user gave comes first; the hidden directory may follow it.
    assert out in err and ".out.partial-" in err, proc
    assert err.index(out) < err.index(".out.partial-"), proc
    assert not os.path.exists(out) and partial_dirs(tmp_path) == []
    assert hash_tree(source) == before


def test_merge_and_salvage_into_the_store_under_a_bind_mount_are_refused(tmp_path):
    """The store's directory under another name (a bind mount) passed the inside-the-store
    check of merge and salvage: their output went into the store they read."""
    store = make_store(tmp_path / "s")
    with bind_mounted(store, tmp_path / "alias") as alias:
        before = hash_tree(store)
        for command in (["merge", alias / "m", store], ["salvage", store, alias / "m"]):
            r = run(*command)
            assert r.code == 2 and "inside the store" in r.err, (command, r)
        assert hash_tree(store) == before


def test_merge_notes_a_shard_whose_epochs_go_down(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make_store(b, epochs=2, rows_per_epoch=3)
    embstore.create(a, dim=4, dtype="float16", metadata=embstore.info(b)["metadata"])
    with embstore.Writer(a) as w:
        w.append([1], np.full((1, 4), 7, np.float32), epoch=7)
        w.append([1], np.full((1, 4), 3, np.float32), epoch=3)
    r = run("merge", tmp_path / "m", a, b)
    assert r.code == 0, r
    assert f"{a}: its epochs go down at row 1 (3 after 7)" in r.err
    assert b not in r.err
    assert "go down" not in run("merge", tmp_path / "m2", b).err


def _manifest_text(tmp_path, names, **fields):
    shards = [{"path": name, "store_id": embstore.info(tmp_path / name)["store_id"],
               "rows": embstore.info(tmp_path / name)["committed_rows"]} for name in names]
    return dict({"embstore_manifest": 1, "dim": 4, "dtype": "float16", "shards": shards},
                **fields)


def test_merge_of_a_manifest_without_metadata_keeps_the_shards_metadata(tmp_path):
    """A manifest with no "metadata" gave the merged store "": the shards' was dropped, exit 0."""
    metadata = {"model": "resnet", "lr": 0.1}
    for name in ("a", "b"):
        make_store(tmp_path / name, metadata=metadata)
    (tmp_path / "md.json").write_text(json.dumps(_manifest_text(tmp_path, ["a", "b"])))
    r = run("merge", tmp_path / "md.emb", tmp_path / "md.json")
    assert r.code == 0, r
    assert embstore.Reader(tmp_path / "md.emb").metadata == metadata
    assert "metadata" not in r.err
    # Shards that disagree: refused as without a manifest, saying how to choose.
    make_store(tmp_path / "c", metadata={"model": "vit"})
    (tmp_path / "mixed.json").write_text(json.dumps(_manifest_text(tmp_path, ["a", "c"])))
    r = run("merge", tmp_path / "mixed.emb", tmp_path / "mixed.json")
    assert r.code == FORMAT_MISMATCH, r
    assert "have different metadata" in r.err and 'give the manifest a "metadata" field' in r.err
    assert not os.path.exists(tmp_path / "mixed.emb")
    # A manifest's metadata is taken, and each shard whose own it replaces is noted.
    (tmp_path / "given.json").write_text(
        json.dumps(_manifest_text(tmp_path, ["a", "c"], metadata='{"model": "vit"}')))
    r = run("merge", tmp_path / "given.emb", tmp_path / "given.json")
    assert r.code == 0, r
    assert embstore.Reader(tmp_path / "given.emb").metadata == {"model": "vit"}
    notes = [line for line in r.err.splitlines() if "metadata" in line]
    assert notes == [f"embstore merge: note: {tmp_path / 'a'}: its metadata "
                     f"'{json.dumps(metadata, sort_keys=True)}' is not the manifest's "
                     "'{\"model\": \"vit\"}'; the merged store gets the manifest's"], r


def test_merge_refuses_a_manifest_field_given_twice(tmp_path):
    """Two "shards" lists: the last was taken, and 1 shard of 2 merged with exit 0."""
    for name in ("a", "b"):
        make_store(tmp_path / name)
    one, two = (json.dumps(_manifest_text(tmp_path, [name])["shards"]) for name in ("a", "b"))
    (tmp_path / "m.json").write_text('{"embstore_manifest": 1, "dim": 4, "dtype": "float16", '
                                     f'"shards": {one}, "shards": {two}}}')
    r = run("merge", tmp_path / "out", tmp_path / "m.json")
    assert r.code == CORRUPTION, r
    assert r.err.strip().startswith(
        f"embstore merge: {tmp_path / 'm.json'}: field 'shards' is given twice"), r
    assert not os.path.exists(tmp_path / "out")


def test_merge_refuses_a_manifest_among_other_inputs_and_an_empty_path(tmp_path):
    os.mkdir(tmp_path / "run1")
    make_store(tmp_path / "run1" / "node-0")
    make_store(tmp_path / "other")
    (tmp_path / "run1" / "manifest.json").write_text(
        json.dumps(_manifest_text(tmp_path / "run1", ["node-0"])))
    manifest = tmp_path / "run1" / "manifest.json"
    r = run("merge", tmp_path / "x.emb", manifest, tmp_path / "other")
    assert r.code == USAGE, r
    assert r.err.strip().startswith(f"embstore merge: {manifest} is a manifest") and \
        "a manifest must be the only input" in r.err, r
    r = run("merge", tmp_path / "x.emb", tmp_path / "other", "")
    assert r.code == USAGE, r
    assert r.err.strip() == ("embstore merge: ShardSet: path 1 of 2 is empty; give a manifest "
                             "or store paths"), r
    assert not os.path.exists(tmp_path / "x.emb")
    assert run("merge", tmp_path / "x.emb", manifest).code == 0
