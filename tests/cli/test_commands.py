"""embstore create/info/verify/head/tail/version/serve/bench: help, happy paths, exit codes, bad
input, and read-only commands leaving every byte of the store as it was."""

import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time

import numpy as np
import pytest

import embstore
from conftest import CLI, Result, hash_tree, make_store, run, corrupt_row

COMMANDS = ["create", "info", "verify", "version", "head", "tail", "get", "export", "import",
            "compact", "merge", "bench"]

# Exit statuses (README "Command-line tool"): 10 + ErrorCode.
NOT_FOUND, ALREADY_EXISTS, CORRUPTION, FORMAT_MISMATCH, UNSUPPORTED_VERSION = 12, 13, 14, 15, 16
READ_ONLY, PERMISSION_DENIED = 19, 23  # kReadOnly = 9, kPermissionDenied = 13


def one_line(text):
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def test_top_level_help_lists_every_command():
    r = run("--help")
    assert r.code == 0
    for command in COMMANDS + ["serve"]:
        assert f"  {command} " in r.out


def test_help_agrees_with_the_readme_on_read_only_commands_signals_and_the_environment():
    # The README lists compact (on its source) among the read-only commands, tail -f's end on
    # SIGTERM, and EMBSTORE_MAP_BYTES, which changes (or, malformed, fails) every command.
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    listed = re.search(r"Read-only commands \(([^)]*)\)", readme).group(1)
    top = run("--help").out
    helped = re.search(r"Read-only commands \(([^)]*)\)", top).group(1)
    assert re.findall(r"[a-z]+", helped) == re.findall(r"[a-z]+", listed.replace("`", "")), (
        helped, listed)
    assert "EMBSTORE_MAP_BYTES" in top and "EMBSTORE_MAP_BYTES" in readme
    assert "SIGTERM" in run("tail", "--help").out


def test_every_dtype_name_the_tool_takes_is_listed_in_its_help(tmp_path):
    # f4, f2, f8, i1, u1 (and half, bf16) were taken by --dtype but listed nowhere.
    help_text = " ".join(run("create", "--help").out.split())
    for dtype, names in (("float32", ["f4"]), ("float16", ["f2", "half"]),
                         ("bfloat16", ["bf16"]), ("int8", ["i1"]), ("uint8", ["u1"]),
                         ("float64", ["f8"])):
        assert f"{dtype} ({', '.join(names)})" in help_text, help_text
        for name in names:
            path = tmp_path / name
            assert run("create", path, "--dim", 2, "--dtype", name).code == 0
            assert json.loads(run("info", path, "--json").out)["dtype"] == dtype
    for command in ("import", "compact"):
        assert "float64 (f8)" in " ".join(run(command, "--help").out.split()), command


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_answers_help(command):
    r = run(command, "--help")
    assert r.code == 0, r
    assert f"Usage: embstore {command}" in r.out
    assert r.err == ""


def test_unknown_command_is_named_in_one_line():
    for args in (["cat"], ["cat", "--help"]):
        r = run(*args)
        assert r.code == 2
        assert one_line(r.err) == "embstore: unknown command cat (see embstore --help)"
        assert r.out == ""


def test_no_command_is_a_usage_error():
    r = run()
    assert r.code == 2
    assert "subcommand" in one_line(r.err)


def test_version_flag_and_command():
    expected = f"embstore {embstore.__version__} (format {embstore.FORMAT_VERSION})"
    assert run("--version").out.strip() == expected
    assert run("version").out.strip() == expected
    assert json.loads(run("version", "--json").out) == {
        "library": embstore.__version__, "format": embstore.FORMAT_VERSION,
        "format_major": int(embstore.FORMAT_VERSION.split(".")[0]),
        "format_minor": int(embstore.FORMAT_VERSION.split(".")[1])}


def test_create_makes_a_store_with_json_metadata(tmp_path):
    path = tmp_path / "new"
    r = run("create", path, "--dim", 8, "--dtype", "bfloat16", "--segment-mb", 1,
            "--metadata", '{"model": "m"}', "--json")
    assert r.code == 0, r
    info = json.loads(r.out)
    assert (info["dim"], info["dtype"], info["segment_bytes"]) == (8, "bfloat16", 1 << 20)
    reader = embstore.Reader(path)
    assert (reader.dim, reader.dtype, reader.metadata) == (8, "bfloat16", {"model": "m"})


def test_create_without_a_key_index_keeps_none_and_get_still_answers(tmp_path):
    path = tmp_path / "small"
    r = run("create", path, "--dim", 8, "--dtype", "float16", "--no-key-index", "--json")
    assert r.code == 0, r
    assert json.loads(r.out)["keeps_key_index"] is False
    with embstore.Writer(path) as w:
        w.append(np.arange(100), np.ones((100, 8), np.float16), 3)
    assert not [f for f in os.listdir(path) if f.startswith("keys.")]
    info = json.loads(run("info", path, "--json").out)
    assert info["keeps_key_index"] is False and info["key_index_used"] is False
    got = run("get", path, 42, "--epoch", 3, "--json")
    assert got.code == 0, got
    assert json.loads(got.out)["row"] == 42
    text = run("info", path)
    assert "created without a key index" in text.out


def test_create_refuses_bad_input_with_one_line_each(tmp_path):
    path = tmp_path / "new"
    cases = [
        (["--dim", 4, "--metadata", "{not json"], 2, "--metadata is not valid JSON"),
        (["--dim", 4, "--dtype", "float99"], 2, 'unknown dtype "float99"'),
        (["--dim", "x"], 2, '--dim: takes a dimension (a non-negative integer), not "x"'),
        (["--dim", 0], 2, "dim"),
        ([], 2, "--dim is required"),
        # Checked before the conversion to bytes, which is undefined for these.
        (["--dim", 4, "--segment-mb", "nan"], 2, "--segment-mb nan is not a size in MiB"),
        (["--dim", 4, "--segment-mb", "1e30"], 2, "--segment-mb 1e+30 is not a size in MiB"),
        (["--dim", 4, "--segment-mb", "-1"], 2, "--segment-mb -1 is not a size in MiB"),
        (["--dim", 4, "--segment-mb", "0.001"], 2, "--segment-mb 0.001 is 1048 bytes"),
        (["--dim", 4, "--segment-mb", "1e-300"], 2, "--segment-mb 1e-300 is 0 bytes"),
    ]
    for extra, code, message in cases:
        r = run("create", path, *extra)
        assert r.code == code, (extra, r)
        assert message in one_line(r.err), (extra, r)
        assert not os.path.exists(path)
    assert run("create", path, "--dim", 4).code == 0
    r = run("create", path, "--dim", 4)
    assert r.code == ALREADY_EXISTS
    assert str(path) in one_line(r.err)


def test_info_shows_the_last_commit_time_the_store_recorded(tmp_path):
    path = str(tmp_path / "s")
    embstore.create(path, dim=4, segment_mb=1 / 16)
    assert "last commit     unknown\n" in run("info", path).out
    assert json.loads(run("info", path, "--json").out)["last_commit_unix_ns"] == 0
    before = time.time_ns()
    with embstore.Writer(path) as w:
        w.append([1, 2], np.ones((2, 4), np.float32))
    after = time.time_ns()
    recorded = json.loads(run("info", path, "--json").out)["last_commit_unix_ns"]
    assert before <= recorded <= after
    assert recorded == embstore.info(path)["last_commit_unix_ns"]
    # The text shows the same instant in UTC, to the second.
    shown = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(recorded // 10**9))
    assert f"last commit     {shown}\n" in run("info", path, "--quiet").out
    # Neither a Reader nor `info` records anything: only a commit moves it.
    embstore.Reader(path).close()
    assert json.loads(run("info", path, "--json").out)["last_commit_unix_ns"] == recorded


def test_info_json_names_every_field_as_python_info_does(store):
    """One name per field: every field of embstore.info() is in `info --json` under the same
    name with the same value (epochs as a list of {epoch, rows}: JSON keys cannot be numbers)."""
    cli = json.loads(run("info", store, "--json").out)
    py = embstore.info(store)
    for name, value in py.items():
        assert name in cli, (name, sorted(cli))
        if name == "epochs":
            assert cli[name] == [{"epoch": e, "rows": n} for e, n in sorted(value.items())]
        else:
            assert cli[name] == value, name
    assert "format" not in cli and (cli["format_major"], cli["format_minor"]) == (1, 4)


def test_info_shows_header_counters_files_and_epochs(store):
    r = run("info", store, "--quiet")
    assert r.code == 0, r
    for text in ("dtype           float16", "committed rows  30", "segments        ",
                 "bytes on disk", "last commit", "distinct keys   12 (key index)",
                 "key index       keys.1, 30 rows indexed", 'tiny \\"q\\"'):
        assert text in r.out or text.replace('\\"', '"') in r.out, (text, r.out)
    # The epochs table from the key index: epoch and rows, aligned.
    assert "  epoch  rows\n      0    10\n" in r.out
    info = json.loads(run("info", store, "--json").out)
    assert info["committed_rows"] == 30 and info["dim"] == 4
    assert info["metadata"] == '{"model": "tiny \\"q\\""}'
    assert info["epochs"] == [{"epoch": e, "rows": 10} for e in range(3)]
    assert info["distinct_keys"] == 12 and info["key_source"] == "key index"
    assert info["key_index"] == "keys.1, 30 rows indexed"
    assert info["segments"] == 1 and info["bytes_on_disk"] > 0
    assert {f["name"] for f in info["files"]} >= {"header", "rows.1", "index.1", "lock"}
    # --scan counts by a scan of the offset index, distinct keys per epoch too.
    r = run("info", store, "--quiet", "--scan")
    assert "distinct keys   12 (scan of the offset index)" in r.out
    assert "  epoch  rows  distinct keys\n      0    10             10\n" in r.out
    scanned = json.loads(run("info", store, "--json", "--scan").out)
    assert scanned["epochs"] == [{"epoch": e, "rows": 10, "distinct_keys": 10} for e in range(3)]
    assert scanned["distinct_keys"] == 12 and scanned["key_source"] == "scan"
    assert run("info", store, "--scan", "--no-scan").code == 2


def test_info_without_a_usable_key_index_scans_and_says_why(store):
    os.remove(os.path.join(store, "keys.1"))
    info = json.loads(run("info", store, "--json").out)
    assert info["key_index"].startswith("damaged (") and "keys.1" in info["key_index"]
    assert info["key_source"] == "scan" and info["distinct_keys"] == 12
    assert info["epochs"] == [{"epoch": e, "rows": 10, "distinct_keys": 10} for e in range(3)]
    assert "epochs" not in json.loads(run("info", store, "--json", "--no-scan").out)


def _zero_key_index_table(store, table):
    """Zeroes one table of keys.1 (its header intact), as a lost write or a bad block would:
    "pair", "key" or "epoch" (FORMAT.md, "keys.K": slots from byte 4096 on, 16-byte pair slots,
    then 8-byte key slots, then 8-byte epoch slots)."""
    path = os.path.join(store, "keys.1")
    with open(path, "r+b") as f:
        f.seek(48)
        pairs, keys, epochs = struct.unpack("<3Q", f.read(24))
        begin = {"pair": 4096, "key": 4096 + 16 * pairs, "epoch": 4096 + 16 * pairs + 8 * keys}
        size = {"pair": 16 * pairs, "key": 8 * keys, "epoch": 8 * epochs}
        f.seek(begin[table])
        f.write(bytes(size[table]))


@pytest.mark.parametrize("table", ["key", "epoch"])
def test_info_with_a_zeroed_key_index_table_says_it_is_damaged_and_scans(store, table):
    # It said "distinct keys 0 (key index)" and "epochs 0" of a 30-row store, exit 0 (a review).
    _zero_key_index_table(store, table)
    info = json.loads(run("info", store, "--json").out)
    assert info["key_index"].startswith("damaged (") and "keys.1" in info["key_index"], info
    assert info["key_source"] == "scan" and info["distinct_keys"] == 12
    assert info["epochs"] == [{"epoch": e, "rows": 10, "distinct_keys": 10} for e in range(3)]
    r = run("info", store)
    assert "key index       damaged (" in r.out and "distinct keys   12 (scan" in r.out, r


def test_get_of_a_key_its_damaged_key_index_misses_is_corruption_not_not_found(store):
    # It said "key 5 is not in ... (30 rows)", exit 12, for a key the store holds (a review).
    _zero_key_index_table(store, "key")
    r = run("get", store, 5)
    assert r.code == CORRUPTION, r
    assert "key 5 is in" in r.err and "row 5" in r.err and "key index is damaged" in r.err
    assert "rebuild-index" in r.err
    r = run("get", store, 500)  # Not in the store: the scan confirms the miss.
    assert r.code == NOT_FOUND and "key 500 is not in" in r.err, r
    assert run("rebuild-index", store).code == 0
    assert run("get", store, 5).code == 0


def test_get_at_an_epoch_its_damaged_key_index_lost_is_corruption_not_not_found(tmp_path):
    # The pair slot of (key 15, epoch 1) zeroed: "key 15 has no row in epoch 1", exit 12, for a
    # row the store holds (the stress review).
    store = str(tmp_path / "s")
    with embstore.Writer(store, dim=4) as w:
        for e in range(3):
            w.append(np.arange(10, 20, dtype=np.uint64), np.full((10, 4), e, np.float32), e)
    path = os.path.join(store, "keys.1")
    data = bytearray(open(path, "rb").read())
    pairs = struct.unpack_from("<Q", data, 48)[0]
    zeroed = 0
    for i in range(pairs):
        key, word = struct.unpack_from("<2Q", data, 4096 + 16 * i)
        if key == 15 and word >> 42 == 1:  # FORMAT.md, "keys.K": the slot's epoch bits
            data[4096 + 16 * i:4096 + 16 * i + 16] = bytes(16)
            zeroed += 1
    assert zeroed == 1
    open(path, "r+b").write(data)
    r = run("get", store, 15, "--epoch", 1)
    assert r.code == CORRUPTION, r
    assert "key 15 at epoch 1 is in" in r.err and "(row 15)" in r.err and "rebuild-index" in r.err
    r = run("get", store, 15, "--epoch", 7)  # not there: the scan confirms it
    assert r.code == NOT_FOUND and "has no row in epoch 7" in r.err, r


def test_info_json_survives_a_quote_in_the_path(tmp_path):
    path = make_store(tmp_path / 'we"ird\\name')
    assert json.loads(run("info", path, "--json").out)["path"] == path


def test_verify_passes_a_sound_store_and_names_bad_rows_with_key_and_epoch(store):
    r = run("verify", store)
    assert r.code == 0 and "0 bad" in r.out
    corrupt_row(store, 17, record_bytes=8)  # epoch 1, key 7 + 1 = 8
    r = run("verify", store)
    assert r.code == 1, r
    assert "1 bad" in r.out
    assert "bad row  key  epoch\n     17    8      1\n" in r.out
    report = json.loads(run("verify", store, "--json").out)
    assert report["bad_rows"] == [{"row": 17, "key": 8, "epoch": 1}]
    assert report["bad_row_count"] == 1 and report["rows_checked"] == 30
    assert run("verify", store, "--from", 18, "--to", 30).code == 0


def test_verify_reports_a_damaged_header_copy_and_a_writer_repairs_it(store):
    # From a review: a flipped byte in either copy of the fixed header went unreported (exit 0)
    # and unrepaired, leaving the store one more damaged byte from unreadable.
    for offset, problem in ((2048 + 16, "the fixed header copy at byte 2048 fails its checks"),
                            (16, "the primary fixed header or its metadata fails its checks")):
        with open(os.path.join(store, "header"), "r+b") as f:
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ 1]))
        r = run("verify", store, "--quiet")
        assert r.code == 1, r
        assert problem in r.out and "rebuild-index" in r.out, r
        r = run("verify", store, "--json", "--quiet")
        assert r.code == 1 and problem in json.loads(r.out)["header_problem"], r
        report = embstore.Reader(store).verify()
        assert not report.ok and problem in report.header_problem
        assert run("rebuild-index", store).code == 0  # a Writer: repairs it
        r = run("verify", store, "--json", "--quiet")
        assert r.code == 0 and json.loads(r.out)["header_problem"] == "", r
        assert embstore.Reader(store).verify().ok


def test_after_a_reboot_info_counts_the_rows_the_next_writer_keeps_and_verify_names_the_cut(
        tmp_path):
    # From a README review: after a reboot info counted rows that recovery cuts, and verify
    # exited 0 without a word about them. 30 rows in 3 batches; a sync covered [0, 10); the
    # power loss in an earlier boot kept [10, 20) and zeros for [20, 30). No key index: its
    # file's boot id cannot be faked here.
    store = str(tmp_path / "s")
    embstore.create(store, dim=4, dtype="float16", segment_mb=1 / 16, key_index=False)
    with embstore.Writer(store) as w:
        for e in range(3):
            w.append(np.arange(10) + 100 * e, np.full((10, 4), e, np.float32), e)
    with open(os.path.join(store, "header"), "r+b") as f:
        f.seek(4160)  # durable_rows (src/format/FORMAT.md, state-page)
        f.write((10).to_bytes(8, "little"))
        f.seek(4288)  # boot_id: an earlier boot's
        f.write(os.urandom(16))
    for name, entry_bytes in (("rows.1", 8), ("index.1", 32)):
        with open(os.path.join(store, name), "r+b") as f:
            f.seek(20 * entry_bytes)
            f.write(bytes(10 * entry_bytes))
    before = hash_tree(store)
    r = run("info", store, "--json")
    assert r.code == 0, r
    info = json.loads(r.out)
    assert (info["committed_rows"], info["durable_rows"], info["rows_to_cut"]) == (20, 10, 10)
    assert [e["rows"] for e in info["epochs"]] == [10, 10]
    r = run("info", store)
    assert "committed rows  20\n" in r.out
    assert "rows to cut     10 (rows [20, 30) did not survive the last reboot whole" in r.out
    r = run("verify", store, "--quiet")
    assert r.code == 1, r
    assert "checked rows [0, 20): 0 bad" in r.out
    assert "10 rows to cut: rows [20, 30)" in r.out and "next writer's open cuts them" in r.out
    r = run("verify", store, "--json", "--quiet")
    assert r.code == 1 and json.loads(r.out)["rows_to_cut"] == 10, r
    assert run("verify", store, "--from", 0, "--to", 10, "--quiet").code == 1
    assert hash_tree(store) == before  # read-only
    with embstore.Writer(store) as w:
        assert w.committed_rows() == 20
    r = run("verify", store, "--json", "--quiet")
    assert r.code == 0 and json.loads(r.out)["rows_to_cut"] == 0, r
    assert json.loads(run("info", store, "--json").out)["committed_rows"] == 20


def test_verify_checks_the_key_index_and_reports_its_damage(store):
    r = run("verify", store)
    assert r.code == 0, r
    assert "key index: consistent with the offset index" in r.out
    report = json.loads(run("verify", store, "--json").out)
    assert report["key_index"] == {"checked": True, "problems": 0, "first_problem": ""}
    # Zero the whole pair table (after the 4 KiB header; pair_slots at header offset 48, 16 bytes
    # a slot): every row loses its slot. Zeroing one page is not enough: a key's epochs share one
    # 256-slot page (FORMAT.md), so with 15 keys in 4 pages, no key lands in a given page in
    # about 1 store of 30.
    before = hash_tree(store)
    with open(os.path.join(store, "keys.1"), "r+b") as f:
        f.seek(48)
        pair_slots = int.from_bytes(f.read(8), "little")
        assert pair_slots >= 1024 and pair_slots & (pair_slots - 1) == 0, pair_slots
        f.seek(4096)
        f.write(bytes(16 * pair_slots))
    damaged = hash_tree(store)
    r = run("verify", store)
    assert r.code == 1, r
    assert "0 bad" in r.out and "key index: " in r.out and "keys.1" in r.out
    report = json.loads(run("verify", store, "--json").out)
    assert report["bad_row_count"] == 0
    assert report["key_index"]["checked"] and report["key_index"]["problems"] > 0
    assert "keys.1" in report["key_index"]["first_problem"]
    # A partial range checks rows only.
    assert run("verify", store, "--to", 10).code == 0
    assert hash_tree(store) == damaged != before
    # Damage inside the tables is not seen at open, but get's miss is contradicted by the key's
    # history (its chain is intact): get takes it as damage and answers by scan; verify says how
    # to repair it.
    r = run("get", store, 3, "--epoch", 1, "--json")
    assert r.code == 0, r
    assert json.loads(r.out)["row"] == 12
    assert f"(repair it: embstore rebuild-index {store})" in run("verify", store).out
    r = run("rebuild-index", store)
    assert r.code == 0, r
    assert one_line(r.out).startswith(f"rebuilt the key index of {store}: keys.2, ")
    assert run("verify", store).code == 0
    assert run("get", store, 3, "--epoch", 1).code == 0
    # A missing key index file the store names is damage too; get still answers (by scan).
    os.remove(os.path.join(store, "keys.2"))
    r = run("verify", store, "--json")
    assert r.code == 1, r
    assert "keys.2" in json.loads(r.out)["key_index"]["first_problem"]
    assert run("get", store, 3, "--epoch", 1).code == 0


def test_verify_reports_one_count_of_key_index_problems(store):
    # It printed "key index: 1 problem: damaged (verify found 30 problems: ...)": the rows'
    # check had found 30 and marked the index damaged, and a second check counted the mark.
    _zero_key_index_table(store, "pair")
    r = run("verify", store)
    assert r.code == 1, r
    line = next(line for line in r.out.splitlines() if line.startswith("key index: "))
    report = json.loads(run("verify", store, "--json").out)["key_index"]
    assert report["problems"] == 30, report  # Every row's lookup fails.
    assert line.startswith("key index: 30 problems: ") and "keys.1" in line, line
    assert "verify found" not in line and "verify found" not in report["first_problem"], r


def test_verify_bad_ranges_get_one_line_not_the_banner(store):
    r = run("verify", store, "--from", 20, "--to", 10)
    assert r.code == 2
    assert one_line(r.err) == "embstore verify: --from 20 is after --to 10"
    r = run("verify", store, "--to", 31)
    assert r.code == 2 and "--to 31 is past the end" in one_line(r.err)
    r = run("verify", store, "--from", -3)
    assert r.code == 2 and '"-3"' in one_line(r.err)


def test_head_and_tail_print_rows_as_table_and_json_lines(store):
    r = run("head", store, "-n", 2)
    assert r.code == 0
    lines = r.out.splitlines()
    assert lines[0].split() == ["row", "key", "epoch"]
    assert lines[1].split() == ["0", "0", "0"] and lines[2].split() == ["1", "1", "0"]
    assert len(lines) == 3
    r = run("tail", store, "-n", 3, "--json", "--vectors")
    rows = [json.loads(line) for line in r.out.splitlines()]
    reader = embstore.Reader(store)
    assert [x["row"] for x in rows] == [27, 28, 29]
    assert [x["key"] for x in rows] == [2 + 7, 2 + 8, 2 + 9]
    assert all(x["epoch"] == 2 for x in rows)
    expected = reader.vectors[27:30].astype(np.float32)
    assert np.array_equal(np.array([x["vector"] for x in rows], dtype=np.float32), expected)
    r = run("head", store, "-n", 100, "--vectors")
    assert len(r.out.splitlines()) == 31 and "[" in r.out.splitlines()[1]
    assert run("head", store, "-n", 0).out.splitlines() == [run("head", store).out.splitlines()[0]]


def test_head_on_a_corrupt_row_names_it_and_exits_with_corruption(store):
    corrupt_row(store, 1, record_bytes=8)
    r = run("head", store, "-n", 3)
    assert r.code == CORRUPTION
    assert "row 1" in r.err and store in r.err


def test_missing_and_non_store_paths_get_not_found_for_every_reading_command(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    for command in (["info"], ["verify"], ["head"], ["tail"], ["export", "_", tmp_path / "o"],
                    ["compact", "_", tmp_path / "c"]):
        for path in (tmp_path / "nope", plain):
            args = [a if a != "_" else path for a in command]
            if len(args) == 1:
                args.append(path)
            r = run(*args)
            assert r.code == NOT_FOUND, (args, r)
            assert str(path) in one_line(r.err), (args, r)
            assert "Traceback" not in r.err and "terminate" not in r.err


def test_a_newer_format_is_refused_with_its_own_exit_code(store):
    with open(os.path.join(store, "header"), "r+b") as f:
        for copy in (0, 2048):  # both copies of the fixed header (src/format/FORMAT.md)
            f.seek(copy + 8)
            f.write(b"\x02")
    for command in ("info", "verify", "head", "tail"):
        r = run(command, store)
        assert r.code == UNSUPPORTED_VERSION, (command, r)
        assert "format_major 2" in one_line(r.err)


def test_read_only_commands_leave_every_byte_alone(store, tmp_path):
    before = hash_tree(store)
    for args in (["info", store], ["info", store, "--json"], ["verify", store],
                 ["verify", store, "--json", "--from", 3], ["head", store, "--vectors"],
                 ["tail", store, "--json"], ["export", store, tmp_path / "npy"],
                 ["export", store, tmp_path / "x.h5"], ["export", store, tmp_path / "x.csv"],
                 ["export", store, tmp_path / "l", "--latest", "--epoch", 1],
                 ["compact", store, tmp_path / "c", "--latest-per-key"]):
        assert run(*args).code == 0, args
    assert hash_tree(store) == before


def test_serve_forwards_its_arguments_to_the_python_module(tmp_path):
    python_dir = os.path.join(os.path.dirname(os.path.realpath(CLI)), "..", "python")
    env = dict(os.environ, PYTHONPATH="")
    r = run("serve", "--help", env=env)
    module = os.path.join(python_dir, "embstore", "serve")
    if os.path.exists(module) or os.path.exists(module + ".py"):
        # --help went to the Python module (CLI11 would have printed "Usage: embstore serve").
        assert r.code == 0, r
        assert "embstore.serve" in r.out or "usage" in r.out.lower()
        assert "Usage: embstore serve" not in r.out
    else:
        # The package on <bindir>/../python was found (the module inside it is what is missing).
        assert r.code != 0
        assert "No module named embstore.serve" in r.err, r


def test_bench_json_parses_with_a_quote_in_the_directory(tmp_path):
    weird = tmp_path / 'di"r\\x'
    weird.mkdir()
    r = run("bench", "--rows", 2000, "--dim", 8, "--batch", 100, "--repeat", 1, "--dir", weird,
            "--keep", "--json", "--quiet")
    assert r.code == 0, r
    report = json.loads(r.out)
    assert report["config"]["dir"] == str(weird)
    assert report["runs"][0]["store"].startswith(str(weird))
    assert report["runs"][0]["embstore"]["rows"] == 2000


def test_bench_gives_every_row_a_new_key_that_says_when_it_was_appended(tmp_path):
    # As sample ids in training: the key index does its whole work, not one insert a batch.
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    r = run("bench", "--rows", 2000, "--dim", 8, "--batch", 100, "--repeat", 1, "--dir",
            tmp_path, "--keep", "--json", "--quiet", "--no-baselines")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    assert r.code == 0, r
    store = json.loads(r.out)["runs"][0]["store"]
    keys = np.array(embstore.Reader(store).keys)
    assert len(keys) == 2000
    assert len(np.unique(keys)) == 2000
    assert ((keys >= before) & (keys <= after)).all()
    batches = keys.reshape(20, 100)
    assert (np.diff(batches, axis=1) == 1).all()  # t + i within a batch
    assert (batches[1:, 0] > batches[:-1, -1]).all()  # later appends, later times
    # Bytes on disk: the key index apart, and the rest within its bound.
    run_report = json.loads(r.out)["runs"][0]
    keys_bytes = sum(os.stat(os.path.join(store, f)).st_blocks * 512
                     for f in os.listdir(store) if f.startswith("keys."))
    assert keys_bytes > 0
    assert run_report["key_index_bytes_on_disk"] == keys_bytes
    assert run_report["bytes_on_disk"] - keys_bytes <= run_report["bytes_on_disk_bound"]


@pytest.mark.parametrize("flags, waits", [
    ((), " \\(it finishes any key index growth in progress\\)"),
    (("--sync", "every"), " \\(it finishes any key index growth in progress, then a last sync\\)"),
    (("--no-key-index",), ""),
    (("--no-key-index", "--sync", "interval"), " \\(it finishes a last sync\\)"),
])
def test_bench_reports_the_writers_close_within_the_phase_it_ends(tmp_path, flags, waits):
    r = run("bench", "--rows", 2000, "--dim", 8, "--batch", 100, "--repeat", 1, "--dir",
            tmp_path, "--json", "--quiet", "--no-baselines", *flags)
    assert r.code == 0, r
    phase = json.loads(r.out)["runs"][0]["embstore"]
    assert 0 < phase["close_ms"] <= phase["seconds"] * 1e3
    text = run("bench", "--rows", 200, "--dim", 8, "--batch", 100, "--repeat", 1, "--dir",
               tmp_path, "--quiet", "--no-baselines", *flags)
    assert text.code == 0, text
    assert re.search(r"^1 +close\(\), the longest of the phase's writers: [0-9.]+ ms of the "
                     r"phase's [0-9.]+ ms" + waits + "$", text.out, re.M), text.out


def test_bench_reports_the_cpu_its_writer_processes_used_in_each_phase(tmp_path):
    # Whether a phase computed or waited: the CPU time of the writer processes (every thread)
    # from the start to the end of their part of the phase, per phase and per row.
    r = run("bench", "--rows", 20000, "--dim", 64, "--batch", 500, "--repeat", 1, "--dir",
            tmp_path, "--json", "--quiet")
    assert r.code == 0, r
    run_report = json.loads(r.out)["runs"][0]
    for name in ("embstore", "pwrite", "pwrite_prealloc", "memcpy"):
        phase = run_report[name]
        ms = phase["seconds"] * 1e3
        assert phase["writer_cpu_ms"] > 0, (name, phase)
        # One writer process: its threads cannot use more than every processor for the phase;
        # the baselines' one thread, not more than the phase itself. The slack is for the two
        # clocks, which disagree by milliseconds on a virtual machine (a thread's CPU clock once
        # counted 3.4 ms inside 1.0 ms of wall time): a wrong unit or another process's CPU
        # counted still lands far past it.
        bound = (ms * (os.cpu_count() if name == "embstore" else 1)) * 1.05 + 5
        assert phase["writer_cpu_ms"] <= bound, (name, phase)
    text = run("bench", "--rows", 2000, "--dim", 8, "--batch", 100, "--repeat", 1, "--dir",
               tmp_path, "--quiet")
    assert text.code == 0, text
    assert re.search(r"^1 +writers' CPU per row \(the median phases\): embstore [0-9]+ ns, "
                     r"[0-9.]+ CPUs busy; pwrite [0-9]+ ns, [0-9.]+; pwrite-pre [0-9]+ ns, "
                     r"[0-9.]+; memcpy [0-9]+ ns, [0-9.]+$", text.out, re.M), text.out
    text = run("bench", "--rows", 2000, "--dim", 8, "--batch", 100, "--repeat", 1, "--dir",
               tmp_path, "--quiet", "--no-baselines")
    assert re.search(r"^1 +writers' CPU per row \(the median phases\): embstore [0-9]+ ns, "
                     r"[0-9.]+ CPUs busy$", text.out, re.M), text.out


def test_bench_reports_the_kernels_own_scaling_beside_embstores(tmp_path):
    # The target "N writers >= 0.9x one" has a floor: N processes pwrite()ing one file. Both
    # scalings, repeat by repeat, and embstore's over the kernel's, from the same phases.
    r = run("bench", "--rows", 4000, "--dim", 8, "--batch", 100, "--repeat", 3, "--writers",
            "1,2", "--dir", tmp_path, "--json", "--quiet", "--page-state", "as-is")
    assert r.code == 0, r
    first, second = json.loads(r.out)["runs"]
    for key in ("ratio_vs_first_run_repeats", "pwrite_ratio_vs_first_run_repeats",
                "pwrite_prealloc_ratio_vs_first_run_repeats",
                "ratio_vs_first_run_over_pwrite_repeats"):
        assert first[key]["all"] == [1.0, 1.0, 1.0], (key, first[key])
        spread = second[key]
        assert len(spread["all"]) == 3, (key, spread)
        assert all(v > 0 for v in spread["all"]), (key, spread)
        assert spread["min"] == min(spread["all"]) and spread["max"] == max(spread["all"])
        assert spread["median"] == sorted(spread["all"])[1]
    ours = second["ratio_vs_first_run_repeats"]["all"]
    kernel = second["pwrite_ratio_vs_first_run_repeats"]["all"]
    over = second["ratio_vs_first_run_over_pwrite_repeats"]["all"]
    assert over == pytest.approx([a / b for a, b in zip(ours, kernel)], rel=1e-9)
    # With one repeat each spread is that repeat's phases: each scaling is its own workload's.
    r = run("bench", "--rows", 4000, "--dim", 8, "--batch", 100, "--repeat", 1, "--writers",
            "1,2", "--dir", tmp_path, "--json", "--quiet", "--page-state", "as-is")
    assert r.code == 0, r
    first, second = json.loads(r.out)["runs"]
    for key, phase in (("ratio_vs_first_run_repeats", "embstore"),
                       ("pwrite_ratio_vs_first_run_repeats", "pwrite"),
                       ("pwrite_prealloc_ratio_vs_first_run_repeats", "pwrite_prealloc")):
        want = second[phase]["rows_per_s"] / first[phase]["rows_per_s"]
        assert second[key]["all"] == [pytest.approx(want, rel=1e-9)], (key, second[key], want)
    text = run("bench", "--rows", 400, "--dim", 8, "--batch", 100, "--repeat", 2, "--writers",
               "1,2", "--dir", tmp_path, "--quiet", "--page-state", "as-is")
    assert text.code == 0, text
    assert re.search(r"^pwrite throughput vs 1 writer \(the kernel alone, N processes writing "
                     r"one file\): 1 -> 1\.00x 2 -> [0-9.]+x$", text.out, re.M), text.out
    for label in ("pwrite x 1 writer\\(s\\)", "pwrite-pre x 1 writer\\(s\\)",
                  "x 1 writer\\(s\\) over pwrite's"):
        assert re.search(r"^2 +" + label + r" +per repeat min [0-9.]+ median [0-9.]+ max [0-9.]+ "
                         r"\(all: [0-9.]+ [0-9.]+\)$", text.out, re.M), (label, text.out)
    text = run("bench", "--rows", 400, "--dim", 8, "--batch", 100, "--repeat", 1, "--writers",
               "1,2", "--dir", tmp_path, "--quiet", "--no-baselines", "--page-state", "as-is")
    assert text.code == 0, text
    assert "pwrite throughput" not in text.out and "over pwrite's" not in text.out, text.out
    assert "x 1 writer(s)" in text.out, text.out


def test_bench_without_a_key_index_creates_its_store_without_one(tmp_path):
    r = run("bench", "--rows", 2000, "--dim", 8, "--batch", 100, "--repeat", 1, "--dir",
            tmp_path, "--keep", "--json", "--quiet", "--no-baselines", "--no-key-index")
    assert r.code == 0, r
    report = json.loads(r.out)
    assert report["config"]["key_index"] is False
    run_report = report["runs"][0]
    store = run_report["store"]
    assert not [f for f in os.listdir(store) if f.startswith("keys.")]
    assert run_report["key_index_bytes_on_disk"] == 0
    assert run_report["embstore"]["rows"] == 2000
    reader = embstore.Reader(store)  # Lookups scan, and still answer.
    assert reader.find(int(reader.keys[1999])) == 1999
    # The table says so too.
    text = run("bench", "--rows", 200, "--dim", 8, "--batch", 100, "--repeat", 1, "--dir",
               tmp_path, "--quiet", "--no-baselines", "--no-key-index")
    assert text.code == 0, text
    assert "no key index" in text.out.splitlines()[0]


def test_bench_expected_rows_reaches_the_writers(tmp_path):
    # --expected-rows: the store's key index is built once for the rows (keys.1), where the
    # same run without it grows its tables (a later keys.K).
    def kept(*flags):
        r = run("bench", "--rows", 20000, "--dim", 8, "--batch", 500, "--repeat", 1, "--dir",
                tmp_path, "--keep", "--json", "--quiet", "--no-baselines", *flags)
        assert r.code == 0, r
        report = json.loads(r.out)
        store = report["runs"][0]["store"]
        return report, sorted(f for f in os.listdir(store) if f.startswith("keys."))

    report, files = kept("--expected-rows", 20000)
    assert report["config"]["expected_rows"] == 20000
    assert files == ["keys.1"]
    report, files = kept()
    assert report["config"]["expected_rows"] == 0
    assert len(files) == 1 and files != ["keys.1"]
    r = run("bench", "--expected-rows", 2**40 + 1, "--dir", tmp_path)
    assert r.code != 0 and "--expected-rows" in r.err, r


def test_python_append_bench_compares_the_binding_with_the_cli_in_the_same_run(tmp_path):
    # bench/python_append.py: Python's synchronous Writer.append against `embstore bench`, rows
    # from a numpy array and from a page-aligned one, each round in a fresh random order.
    import sys
    script = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "python_append.py")
    proc = subprocess.run([sys.executable, script, "--bin", CLI, "--rounds", "2", "--rows", "4096",
                           "--dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    runs = [line for line in lines if line.startswith("round ")]
    assert len(runs) == 6  # 2 rounds x (C++, Python page-aligned, Python numpy)
    assert sum("rows at page offset 0," in line for line in runs) == 2
    # numpy puts a large array 16 bytes into a page (glibc's mmap'd chunk header).
    assert sum("Python, numpy rows" in line and "rows at page offset" in line for line in runs) == 2
    for name in ("Python, page-aligned rows", "Python, numpy rows"):
        summary = [line for line in lines if line.startswith(name + ": MB/s / C++'s")]
        assert len(summary) == 1, lines
        shares = re.findall(r"inside the C\+\+ append: median ([0-9.]+)% of the call", summary[0])
        assert shares and 0 < float(shares[0]) <= 100, summary
    assert os.listdir(tmp_path) == []  # every store removed


def test_bench_warms_the_page_cache_before_every_phase_unless_asked_not_to(tmp_path):
    # Each phase starts from page cache freed a moment ago: a file of the phase's payload is
    # written first and removed as the phase starts (on a VM whose host takes freed memory back,
    # a phase's figure otherwise depends on how long ago the last one freed its pages). Before
    # the removal, a payload as large as the free memory that starts a free page reporting pass
    # (where the kernel makes them) waits for the next pass: these payloads are too small to
    # wait, but each removal is counted.
    r = run("bench", "--rows", 2000, "--dim", 8, "--batch", 100, "--repeat", 2, "--dir",
            tmp_path, "--json", "--quiet")
    assert r.code == 0, r
    report = json.loads(r.out)
    assert report["config"]["page_state"] == "warm"
    warm = report["runs"][0]["page_cache_warm_ms"]
    assert len(warm) == 2 * 4 and all(ms >= 0 for ms in warm)  # 4 phases in each of 2 repeats
    waits = report["runs"][0]["page_reporting_wait_ms"]
    assert len(waits) == 2 * 4 and all(ms >= 0 for ms in waits)
    assert os.listdir(tmp_path) == []  # the warm-up file went with the rest
    text = run("bench", "--rows", 200, "--dim", 8, "--batch", 100, "--repeat", 1, "--dir",
               tmp_path, "--quiet", "--no-baselines")
    assert re.search(r"^page cache warmed before each phase .*: 1 times, ", text.out, re.M), text
    r = run("bench", "--rows", 2000, "--dim", 8, "--batch", 100, "--repeat", 1, "--dir",
            tmp_path, "--json", "--quiet", "--page-state", "as-is")
    assert r.code == 0, r
    report = json.loads(r.out)
    assert report["config"]["page_state"] == "as-is"
    assert report["runs"][0]["page_cache_warm_ms"] == []
    assert report["runs"][0]["page_reporting_wait_ms"] == []


def test_bench_huge_pages_opens_its_writers_with_them_and_says_so(tmp_path):
    r = run("bench", "--rows", 2000, "--dim", 768, "--batch", 500, "--repeat", 1, "--dir",
            tmp_path, "--json", "--quiet", "--no-baselines", "--huge-pages", "--keep")
    assert r.code == 0, r
    report = json.loads(r.out)
    assert report["config"]["huge_pages"] is True
    store = report["runs"][0]["store"]
    reader = embstore.Reader(store)
    assert len(reader) == 2000 and reader.verify().ok
    text = run("bench", "--rows", 200, "--dim", 8, "--batch", 100, "--repeat", 1, "--dir",
               tmp_path, "--quiet", "--no-baselines", "--huge-pages")
    assert text.code == 0, text
    assert " huge pages," in text.out.splitlines()[0]
    assert json.loads(run("bench", "--rows", 200, "--dim", 8, "--batch", 100, "--repeat", 1,
                          "--dir", tmp_path, "--json", "--quiet", "--no-baselines").out
                      )["config"]["huge_pages"] is False


def _open_under(directory):
    """Descriptors of any process that point under ``directory``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(str(directory) + "/"):
                    found.append((pid, fd))
        except OSError:
            continue  # gone, or not ours to look at
    return found


@pytest.mark.parametrize("how", ["SIGTERM to the tool", "SIGINT to its process group"])
def test_bench_stopped_by_a_signal_kills_its_children_and_removes_its_stores(tmp_path, how):
    # It left its work directory (gigabytes of phase stores) behind, and after a SIGTERM its
    # writer child kept appending to it (the CLI review).
    import signal
    work = tmp_path / "bench"
    work.mkdir()
    proc = subprocess.Popen([CLI, "bench", "--rows", "3000000", "--dim", "64", "--repeat", "3",
                             "--dir", str(work), "--quiet"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while not _open_under(work) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # until a phase's files are open: children at work
    sig = signal.SIGTERM if how.startswith("SIGTERM") else signal.SIGINT
    if how.startswith("SIGTERM"):
        proc.send_signal(sig)
    else:
        os.killpg(proc.pid, sig)  # as Ctrl-C: the tool and every child
    err = proc.communicate(timeout=60)[1]
    if proc.returncode == 0:
        pytest.skip("bench finished before the signal came")
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    assert err.strip().splitlines()[-1] == f"embstore bench: interrupted by {sig.name}", err
    assert os.listdir(work) == []
    time.sleep(0.5)  # a surviving child would still hold its files open
    assert _open_under(work) == []


def test_bench_bad_options_are_usage_errors():
    for args in (["--writers", "0"], ["--sync", "sometimes"], ["--dtype", "f64->f8"],
                 ["--page-state", "cold"], ["--frobnicate"]):
        r = run("bench", *args)
        assert r.code == 2, (args, r)
        one_line(r.err)


def test_progress_bar_only_on_a_terminal_and_not_with_quiet(store, tmp_path):
    import pty
    import subprocess

    def stderr_of(*args, tty):
        if not tty:
            return run(*args).err
        master, slave = pty.openpty()
        try:
            proc = subprocess.run([CLI, *map(str, args)], stdout=subprocess.DEVNULL,
                                  stderr=slave, timeout=60)
            assert proc.returncode == 0
            os.close(slave)
            slave = -1
            chunks = []
            while True:
                try:
                    data = os.read(master, 4096)
                except OSError:  # EIO: the writer side is closed and drained
                    break
                if not data:
                    break
                chunks.append(data)
            return b"".join(chunks).decode()
        finally:
            os.close(master)
            if slave >= 0:
                os.close(slave)

    shown = stderr_of("verify", store, tty=True)
    assert "verifying [" in shown and "rows/s" in shown and "ETA" in shown
    assert "exporting [" in stderr_of("export", store, tmp_path / "o1", tty=True)
    assert stderr_of("verify", store, "--quiet", tty=True) == ""
    assert stderr_of("verify", store, tty=False) == ""
    assert stderr_of("export", store, tmp_path / "o2", tty=False) == ""


def test_io_and_full_errors_have_their_exit_codes(store, tmp_path):
    # 17 (I/O): the output's "directory" is a regular file (ENOTDIR).
    (tmp_path / "file").write_text("x")
    r = run("export", store, tmp_path / "file" / "out")
    assert r.code == 17, r
    assert str(tmp_path / "file") in one_line(r.err)
    # 18 (full): the new store outgrows the address space it may reserve.
    np.save(tmp_path / "v.npy", np.zeros((20000, 256), np.float32))
    env = dict(os.environ, EMBSTORE_MAP_BYTES=str(1 << 20))
    r = run("import", tmp_path / "new", tmp_path / "v.npy", "--segment-mb", 1, env=env)
    assert r.code == 18, r
    assert "map_bytes" in one_line(r.err)
    assert not os.path.exists(tmp_path / "new")


@pytest.fixture
def read_only_mount(small_tmpfs):
    """A small tmpfs (conftest.small_tmpfs); the test fills it, then calls the function it gets
    to remount it read-only (as root, chmod alone does not make a write fail)."""
    point = small_tmpfs("16m")

    def make_read_only():
        r = subprocess.run(["mount", "-o", "remount,ro", str(point)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            pytest.skip("remounting the tmpfs read-only is not permitted here: "
                        + (r.stderr.strip().splitlines() or ["?"])[0])
    return point, make_read_only


def test_writes_to_a_read_only_file_system_exit_19_and_change_nothing(read_only_mount, tmp_path):
    point, make_read_only = read_only_mount
    store = make_store(point / "s")
    np.save(tmp_path / "v.npy", np.ones((3, 4), np.float32))
    make_read_only()
    before = hash_tree(store)
    for args, named in ((["import", store, tmp_path / "v.npy", "--epoch", 7], store),
                        (["truncate", store, "--rows", 5, "--yes"], store),
                        (["truncate", store, "--from-epoch", 1, "--yes"], store),
                        (["create", point / "new", "--dim", 4], point / "new"),
                        # New outputs on the read-only mount: their working directory is refused.
                        (["import", point / "imported", tmp_path / "v.npy"], point / "imported"),
                        (["export", store, point / "out"], point / "out"),
                        (["export", store, point / "out.h5"], point / "out.h5"),
                        (["compact", store, point / "small"], point / "small"),
                        (["get", store, 3, "--npy", point / "x.npy"], point / "x.npy"),
                        (["salvage", store, point / "saved"], point),
                        (["merge", point / "merged", store], point)):
        r = run(*args)
        assert r.code == READ_ONLY, (args, r)
        line = one_line(r.err)
        assert str(named) in line and "read-only file system" in line.lower(), (args, r)
    # The tool's own outputs are named with the cause, not a working directory.
    for args, out in ((["export", store, point / "out"], point / "out"),
                      (["get", store, 3, "--npy", point / "x.npy"], point / "x.npy")):
        assert one_line(run(*args).err).endswith(
            f"{out}: cannot write it: its directory {point} is on a read-only file system"), args
    # create names the store asked for first, not only its lock file beside it.
    assert f"{point / 'new'}: cannot create the store: " in one_line(
        run("create", point / "new", "--dim", 4).err)
    assert hash_tree(store) == before
    assert os.listdir(point) == ["s"]
    # Reading needs no write: the reading commands work on the read-only mount, and leave it as is.
    for args in (["info", store], ["verify", store], ["tail", store], ["get", store, 3],
                 ["export", store, tmp_path / "out"]):
        assert run(*args).code == 0, args
    assert hash_tree(store) == before


def test_salvage_and_merge_onto_a_read_only_file_system_name_the_output_and_cause(
        read_only_mount):
    # They named their hidden working directory instead: 'mkdir .../.saved.partial-3f0c...:
    # Read-only file system'.
    point, make_read_only = read_only_mount
    store = make_store(point / "s")
    make_read_only()
    before = hash_tree(store)
    for args, out in ((["salvage", store, point / "saved"], point / "saved"),
                      (["merge", point / "merged", store], point / "merged")):
        r = run(*args)
        assert r.code == READ_ONLY, (args, r)
        assert one_line(r.err) == (f"embstore {args[0]}: {out}: cannot write it: its directory "
                                   f"{point} is on a read-only file system"), (args, r)
    assert hash_tree(store) == before
    assert os.listdir(point) == ["s"]


@pytest.fixture
def as_nobody():
    """A runner of the tool as user nobody (65534), for EACCES, which root never gets; and a
    directory under /tmp that nobody may enter (pytest's tmp_path is under a 0700 directory)."""
    if os.geteuid() != 0:
        pytest.skip("running the tool as another user needs root")
    setpriv, runuser = shutil.which("setpriv"), shutil.which("runuser")
    if setpriv:
        prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    elif runuser:
        prefix = [runuser, "-u", "nobody", "--"]
    else:
        pytest.skip("neither setpriv nor runuser is installed: cannot drop privileges")
    cli = os.path.realpath(CLI)

    def run_as_nobody(*args):
        proc = subprocess.run([*prefix, cli, *map(str, args)], capture_output=True, text=True,
                              timeout=120)
        return Result(proc)

    r = run_as_nobody("version")
    if r.code != 0:
        pytest.skip(f"user nobody cannot run {cli}: {r!r}")
    top = tempfile.mkdtemp(prefix="embstore-cli-nobody-")
    try:
        os.chmod(top, 0o755)
        yield run_as_nobody, top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_files_the_user_may_not_read_exit_23_naming_the_file(as_nobody):
    run_as_nobody, top = as_nobody
    store = make_store(os.path.join(top, "s"))
    out = os.path.join(top, "out")
    os.mkdir(out)
    os.chmod(out, 0o777)  # nobody may write its outputs here: only the store is refused
    for name in os.listdir(store):
        os.chmod(os.path.join(store, name), 0o600)  # owned by root
    before = hash_tree(store)
    header = os.path.join(store, "header")
    for args in (["info", store], ["info", store, "--json"], ["verify", store], ["head", store],
                 ["tail", store], ["get", store, 3], ["export", store, os.path.join(out, "e")],
                 ["compact", store, os.path.join(out, "c")],
                 ["salvage", store, os.path.join(out, "sv")],
                 ["merge", os.path.join(out, "m"), store],
                 ["truncate", store, "--rows", 5, "--yes"]):
        r = run_as_nobody(*args)
        assert r.code == PERMISSION_DENIED, (args, r)
        line = one_line(r.err)
        assert f"open {header} for reading: Permission denied" in line, (args, r)
        assert "Traceback" not in r.err and "terminate" not in r.err
    # The header readable, the rows not: the message names the file refused.
    os.chmod(header, 0o644)
    rows = os.path.join(store, "rows.1")
    for args in (["info", store], ["verify", store], ["get", store, 3],
                 ["export", store, os.path.join(out, "e")]):
        r = run_as_nobody(*args)
        assert r.code == PERMISSION_DENIED, (args, r)
        assert f"open {rows} for reading: Permission denied" in one_line(r.err), (args, r)
    assert os.listdir(out) == []
    assert hash_tree(store) == before


def test_salvage_and_merge_into_a_directory_the_user_may_not_write_name_the_output(as_nobody):
    # As on a read-only file system, they named their hidden working directory, not the output.
    run_as_nobody, top = as_nobody
    store = make_store(os.path.join(top, "s"))  # root's, in a 0755 directory nobody may not write
    before = hash_tree(store)
    for args, out in ((["salvage", store, os.path.join(top, "saved")], "saved"),
                      (["merge", os.path.join(top, "merged"), store], "merged")):
        r = run_as_nobody(*args)
        assert r.code == READ_ONLY, (args, r)
        assert one_line(r.err) == (
            f"embstore {args[0]}: {os.path.join(top, out)}: cannot write it: its directory {top} "
            "does not let this user create files in it (Permission denied)"), (args, r)
    assert hash_tree(store) == before
    assert os.listdir(top) == ["s"]


def test_writes_the_user_may_not_make_exit_19_not_23(as_nobody, tmp_path):
    # EACCES on a file opened for writing is a read-only store to this user (kReadOnly), while
    # reading the same files works.
    run_as_nobody, top = as_nobody
    store = make_store(os.path.join(top, "s"))  # root's, files 0644 in a 0755 directory
    vectors = os.path.join(top, "v.npy")
    np.save(vectors, np.ones((3, 4), np.float32))
    os.chmod(vectors, 0o644)
    before = hash_tree(store)
    for args, named in ((["import", store, vectors, "--epoch", 7], store),
                        (["truncate", store, "--rows", 5, "--yes"], store),
                        (["create", os.path.join(top, "new"), "--dim", 4],
                         os.path.join(top, "new"))):
        r = run_as_nobody(*args)
        assert r.code == READ_ONLY, (args, r)
        line = one_line(r.err)
        assert named in line and "Permission denied" in line, (args, r)
    assert run_as_nobody("info", store).code == 0
    assert run_as_nobody("verify", store).code == 0
    assert hash_tree(store) == before
    assert sorted(os.listdir(top)) == ["s", "v.npy"]


def test_export_and_compact_copy_the_rows_of_a_store_whose_key_index_is_damaged(tmp_path):
    # The rows are whole; only the key index (derived data, rebuilt by the next writer) is
    # damaged. Export and compact check the rows they copy, not the key index: they used to
    # read the first bad row of a report that had none (undefined behaviour).
    store = make_store(tmp_path / "s")
    keys_files = [f for f in os.listdir(store) if f.startswith("keys.")]
    assert len(keys_files) == 1
    with open(os.path.join(store, keys_files[0]), "r+b") as f:
        f.write(b"\xff" * 64)  # its header: no longer a key index of this store
    check = run("verify", store)
    assert check.code == 1 and "key index" in check.out, check  # the damage is seen
    r = run("export", store, tmp_path / "out", "-q")
    assert r.code == 0, r
    vectors = np.load(tmp_path / "out" / "vectors.npy")
    np.testing.assert_array_equal(vectors, embstore.Reader(store).vectors)
    r = run("compact", store, tmp_path / "small", "-q")
    assert r.code == 0, r
    np.testing.assert_array_equal(embstore.Reader(str(tmp_path / "small")).vectors, vectors)


@pytest.fixture
def twelve_epochs(tmp_path):
    """Twelve epochs (0..11) of keys 0..11; row 12 * e + k is key k of epoch e, every value e."""
    path = str(tmp_path / "twelve")
    embstore.create(path, dim=2, segment_mb=1 / 16)
    with embstore.Writer(path) as w:
        for e in range(12):
            w.append(keys=np.arange(12, dtype=np.uint64), vectors=np.full((12, 2), e, np.float32),
                     epoch=e)
    return path


def test_numbers_with_a_leading_zero_are_decimal_in_every_command(twelve_epochs, tmp_path):
    # CLI11 2.1 converts with strtoull(text, 0) once the validator accepted the digits: "010"
    # was octal 8 (key 8, epoch 8, 8 rows) and "09" a "Could not convert".
    store = twelve_epochs
    got = run("get", store, "010", "--epoch", "010", "--json")
    assert got.code == 0, got
    assert json.loads(got.out) == {"row": 130, "key": 10, "epoch": 10, "vector": [10.0, 10.0]}
    got = run("get", store, "09", "--epoch", "09", "--json")
    assert got.code == 0, got
    assert (json.loads(got.out)["key"], json.loads(got.out)["epoch"]) == (9, 9)
    head = run("head", store, "-n", "010", "--json")
    assert head.code == 0, head
    assert [json.loads(line)["row"] for line in head.out.splitlines()] == list(range(10))
    assert run("head", store, "-n", "000").out == run("head", store, "-n", 0).out  # the header
    out = tmp_path / "out"
    exported = run("export", store, out, "--epoch", "010,09", "--from", "0112", "-q")
    assert exported.code == 0, exported
    # Rows 112..119 of epoch 9, and epoch 10.
    assert np.load(out / "epochs.npy").tolist() == [9] * 8 + [10] * 12
    compacted = run("compact", store, tmp_path / "c", "--epochs", "010", "-q")
    assert compacted.code == 0, compacted
    assert set(embstore.Reader(str(tmp_path / "c")).epochs.tolist()) == {10}
    checked = run("verify", store, "--from", "010", "--to", "0020")
    assert checked.code == 0 and "checked rows [10, 20)" in checked.out, checked
    created = run("create", tmp_path / "d", "--dim", "010")
    assert created.code == 0 and embstore.Reader(str(tmp_path / "d")).dim == 10, created
    np.save(tmp_path / "v.npy", np.ones((3, 2), np.float32))
    imported = run("import", tmp_path / "i", tmp_path / "v.npy", "--epoch", "010", "-q")
    assert imported.code == 0, imported
    assert embstore.Reader(str(tmp_path / "i")).epochs.tolist() == [10, 10, 10]


@pytest.mark.parametrize("args, option, value", [
    (["get", "{s}", "0x10"], "key", "0x10"),
    (["get", "{s}", "1", "--epoch", "+9"], "--epoch", "+9"),
    (["head", "{s}", "-n", "1_0"], "--rows", "1_0"),
    (["export", "{s}", "{out}", "--epoch", "1,0x2"], "--epoch", "0x2"),
    # An empty item of a comma list was dropped: "1,,2" ran as "1,2", "3," as "3".
    (["export", "{s}", "{out}", "--epoch", "1,,2"], "--epoch", "1,,2"),
    (["export", "{s}", "{out}", "--epoch", "1", "--epoch", "3,"], "--epoch", "3,"),
    (["compact", "{s}", "{out}", "--epochs", ",4"], "--epochs", ",4"),
    (["compact", "{s}", "{out}", "--epochs", ","], "--epochs", ","),
    (["verify", "{s}", "--from", "0b1"], "--from", "0b1"),
    (["get", "{s}", "000000000000000000018446744073709551616"], "key",
     "000000000000000000018446744073709551616"),
])
def test_a_number_that_is_not_decimal_digits_is_a_usage_error_naming_it(
        twelve_epochs, tmp_path, args, option, value):
    r = run(*[a.format(s=twelve_epochs, out=tmp_path / "out") for a in args])
    assert r.code == 2, r
    line = one_line(r.err)
    assert f"{option}: " in line and f'"{value}"' in line, line
    assert not os.path.exists(tmp_path / "out")


def test_a_range_from_past_the_end_of_an_empty_store_names_its_size_not_a_to(tmp_path):
    # It said "--from 5 is after --to 0", and no --to was given.
    path = str(tmp_path / "empty")
    embstore.create(path, dim=2, segment_mb=1 / 16)
    for command in (["verify", path], ["export", path, tmp_path / "out"]):
        r = run(*command, "--from", 5)
        assert r.code == 2, r
        assert one_line(r.err) == (f"embstore {command[0]}: --from 5 is past the end of {path} "
                                   "(0 rows)")


def test_bench_on_a_full_disk_exits_as_full(small_tmpfs):
    # Every child's failure was reported as an I/O error (exit 17): a full disk is 18, as for
    # every other command. The pwrite baseline fills it first; without baselines, the store.
    point = small_tmpfs("2m")
    for flags in ([], ["--no-baselines"]):
        r = run("bench", "--rows", 20000, "--dim", 64, "--repeat", 1, "--page-state", "as-is",
                "--quiet", "--dir", point, *flags)
        assert r.code == 18, r
        assert "No space left on device" in r.err, r


def test_a_segment_size_of_part_of_a_page_is_refused_naming_the_option(tmp_path):
    # The library's message named its own field and the rounded byte count
    # ("segment_bytes 4194 must be a multiple of 4096").
    r = run("create", tmp_path / "s.emb", "--dim", 4, "--segment-mb", "0.004")
    assert r.code == 2, r
    assert "--segment-mb 0.004 is 4194 bytes, not a whole number of 4 KiB pages" in r.err, r
    assert not os.path.exists(tmp_path / "s.emb")
    assert run("create", tmp_path / "s.emb", "--dim", 4, "--segment-mb", 1 / 256).code == 0


def test_commands_name_a_store_and_the_format_alike_in_json(tmp_path, monkeypatch):
    # truncate and salvage gave only "store" (as typed, relative), where create, info and verify
    # give "path" (absolute); version gave the format only as the text "1.4".
    store = make_store(tmp_path / "s")
    monkeypatch.chdir(tmp_path)
    info = json.loads(run("info", "s", "--json").out)
    version = json.loads(run("version", "--json").out)
    assert (version["format_major"], version["format_minor"]) == \
        (info["format_major"], info["format_minor"])
    assert version["format"] == f"{version['format_major']}.{version['format_minor']}"
    truncated = run("truncate", "s", "--rows", 5, "--yes", "--json")
    assert truncated.code == 0, truncated
    assert json.loads(truncated.out)["path"] == info["path"] == store
    salvaged = run("salvage", "s/", tmp_path / "copy", "--json")  # named as info names it
    assert salvaged.code == 0, salvaged
    assert json.loads(salvaged.out)["path"] == store and json.loads(salvaged.out)["store"] == "s/"


def test_verify_advises_a_repair_that_works_for_a_store_without_a_key_index(tmp_path):
    # A damaged primary header copy: verify advised `embstore rebuild-index`, which refuses a
    # store made without a key index (exit 2).
    store = str(tmp_path / "s")
    assert run("create", store, "--dim", 2, "--no-key-index").code == 0
    with embstore.Writer(store) as w:
        w.append([1], np.ones((1, 2), np.float32))
    with open(os.path.join(store, "header"), "r+b") as f:
        f.seek(40)
        byte = f.read(1)
        f.seek(40)
        f.write(bytes([byte[0] ^ 0xFF]))
    r = run("verify", store)
    assert r.code == 1 and "a writer opening the store repairs it: the next one to append" in \
        r.out and "rebuild-index" not in r.out, r
    r = run("bench", "--seconds", "1e300", "--quiet")  # nanoseconds past an int64 deadline
    assert r.code == 2 and "--seconds" in r.err, r


@pytest.fixture
def nfs_everywhere(tmp_path_factory):
    """The environment of a tool whose every statfs(2) reports NFS's f_type (0x6969), through an
    LD_PRELOAD shim built here: the refusal of network file systems without a network mount (the
    library's own hook, EMBSTORE_FS_MAGIC, is compiled out of the tool)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the statfs shim")
    shim = tmp_path_factory.mktemp("shim")
    source = os.path.join(os.path.dirname(__file__), "..", "support", "statfs_nfs.c")
    subprocess.run([cc, "-shared", "-fPIC", "-o", shim / "nfs.so", source, "-ldl"], check=True)
    return dict(os.environ, LD_PRELOAD=str(shim / "nfs.so"))


def test_create_refuses_a_network_file_system_as_writers_do_unless_forced(tmp_path,
                                                                          nfs_everywhere):
    # From a review: create made a store on NFS or FUSE that every writer then refused ("a time
    # bomb for a training job"). Now it refuses with the writers' message, status and override.
    store = make_store(tmp_path / "s")  # made where writers may write
    np.save(tmp_path / "v.npy", np.ones((3, 4), np.float32))
    imported = run("import", store, tmp_path / "v.npy", env=nfs_everywhere)
    assert imported.code == 2, imported
    refusal = one_line(imported.err)
    assert refusal.startswith(f"embstore import: {store}: refusing to write a store on NFS "
                              "(statfs f_type 0x6969): writers need a local file system")
    assert "EMBSTORE_ALLOW_REMOTE_FS=1" in refusal
    new = tmp_path / "new"
    created = run("create", new, "--dim", 4, env=nfs_everywhere)
    assert created.code == imported.code, created
    assert one_line(created.err) == refusal.replace(f"embstore import: {store}:",
                                                    f"embstore create: {new}:")
    assert sorted(os.listdir(tmp_path)) == ["s", "v.npy"]  # nothing made
    forced = dict(nfs_everywhere, EMBSTORE_ALLOW_REMOTE_FS="1")
    assert run("create", new, "--dim", 4, env=forced).code == 0
    assert run("import", new, tmp_path / "v.npy", env=forced).code == 0
    assert len(embstore.Reader(str(new))) == 3


def test_bench_rows_out_of_range_names_the_option_and_its_range():
    # It gave "--rows: Value 0 not in range 0.000000 to 1797693134862315708145..." (300 digits).
    for rows in (0, (1 << 40) + 1):
        r = run("bench", "--rows", rows)
        assert r.code == 2, r
        assert one_line(r.err) == (f"embstore bench: --rows: Value {rows} not in range 1 to "
                                   "1099511627776 (see embstore bench --help)")


def test_an_unknown_option_before_the_command_is_named():
    # A typo of --version said "A subcommand is required".
    for typo in ("--versoin", "-x", "--verbose=1"):
        for args in ([typo], [typo, "version"]):
            r = run(*args)
            assert r.code == 2, (args, r)
            assert r.out == "" and r.err == f"embstore: unknown option {typo} (see embstore --help)\n"
    assert run("--version").code == 0 and run("--help").code == 0 and run("-h").code == 0


def test_create_on_a_symbolic_link_says_it_is_one(tmp_path):
    # A dangling link was called "a file, not a directory"; so was a link to a directory.
    os.symlink("nowhere", tmp_path / "dangling")
    (tmp_path / "dir").mkdir()
    os.symlink("dir", tmp_path / "link")
    advice = " (a store is not made through a link: give the target's path, or remove the link)"
    for link, what in ((tmp_path / "dangling", "a symbolic link to a missing target (nowhere)"),
                       (tmp_path / "link", "a symbolic link to dir, not a directory")):
        r = run("create", link, "--dim", 4)
        assert r.code == ALREADY_EXISTS, r
        assert one_line(r.err) == f"embstore create: {link}: already exists and is {what}{advice}"
    assert sorted(os.listdir(tmp_path)) == ["dangling", "dir", "link"]
    assert os.listdir(tmp_path / "dir") == []


def test_a_store_past_map_bytes_asks_to_raise_embstore_map_bytes(tmp_path):
    # The hint was "reopen with a larger map_bytes", a C++ option the tool's user cannot give.
    store = make_store(tmp_path / "s", dim=256, dtype="float32", epochs=1, rows_per_epoch=2000)
    env = dict(os.environ, EMBSTORE_MAP_BYTES=str(1 << 20))
    r = run("info", store, env=env)
    assert r.code == 18, r
    line = one_line(r.err)
    assert line.startswith(f"embstore info: {store}/rows.1: the store holds 2000 rows but ")
    assert line.endswith("; raise EMBSTORE_MAP_BYTES (now 1048576)"), line
    np.save(tmp_path / "v.npy", np.zeros((1200, 256), np.float32))
    r = run("import", tmp_path / "new", tmp_path / "v.npy", "--segment-mb", 1, env=env)
    assert r.code == 18, r
    assert one_line(r.err).endswith("rows; raise EMBSTORE_MAP_BYTES (now 1048576)"), r
    # A library caller that gave map_bytes is told to give a larger one.
    with pytest.raises(OSError, match="; reopen with a larger map_bytes$"):
        embstore.Reader(store, map_bytes=1 << 20)


def _column_ends(line, columns=3):
    return [m.end() for m in re.finditer(r"\S+", line)][:columns]


def test_row_tables_stay_aligned_with_an_epoch_of_twenty_digits(tmp_path):
    # The epoch column was {:>10}: a wider epoch pushed the columns after it right.
    store = str(tmp_path / "s")
    embstore.create(store, dim=2)
    with embstore.Writer(store) as w:
        w.append(keys=[1, 2], vectors=np.ones((2, 2), np.float32), epoch=5)
        w.append(keys=[1], vectors=np.ones((1, 2), np.float32), epoch=2**64 - 1)
    for args in (["head", store], ["tail", store, "--vectors"], ["get", store, 1],
                 ["get", store, 1, "--history"]):
        r = run(*args)
        assert r.code == 0, (args, r)
        header, *rows = r.out.splitlines()
        assert rows and all(_column_ends(row) == _column_ends(header) for row in rows), r.out
    assert str(2**64 - 1) in run("tail", store, "-n", 1).out


def test_verify_quotes_the_store_in_the_repair_commands_it_prints(tmp_path):
    # "(repair it: embstore rebuild-index sp ace/s t.emb)" ran on two other paths when pasted.
    (tmp_path / "sp ace").mkdir()
    store = make_store(tmp_path / "sp ace" / "it's $s.emb")
    with open(os.path.join(store, "header"), "r+b") as f:  # the header copy
        f.seek(2048 + 16)
        byte = f.read(1)[0]
        f.seek(2048 + 16)
        f.write(bytes([byte ^ 1]))
    _zero_key_index_table(store, "pair")
    r = run("verify", store)
    assert r.code == 1, r
    quoted = "'" + store.replace("'", "'\\''") + "'"
    hints = re.findall(r"embstore rebuild-index ('(?:[^']|'\\'')*'|\S+)", r.out)
    assert hints == [quoted, quoted], r.out
    # Pasted into a shell, the command names the store.
    shell = subprocess.run(["sh", "-c", f"{CLI} rebuild-index {quoted}"], capture_output=True,
                           text=True)
    assert shell.returncode == 0, shell
    assert run("verify", store).code == 0
