// Scenario 16: damaged counters after a reboot. A store is written in "boot A"; then its state
// page's counters (capacity, committed, durable), its file sizes and single bytes of its rows are
// damaged at random, and it is opened in "boot B" (or, for contrast, in boot A again).
//
// What must hold, every round:
//   - A Reader and a Writer opened one after the other agree: the same rows, or the same named
//     error (kCorruption naming the field); a refused open writes nothing.
//   - The outcome is the one the loader's rules promise (src/log/recovery.h), computed here from
//     what the round wrote and damaged: a cut only at a counter, at the end of the files, or at
//     the first unsynced batch that does not verify — never elsewhere (no silent cut).
//   - No row inside a live Reader's snapshot changes while the Writer recovers and appends.
//   - verify() names exactly the rows inside the snapshot that do not verify (damaged rows, or
//     rows a damaged durable counter vouches for), and record() refuses each of them.
//   - The recovered store reopens as it was left (in the same boot and after another reboot),
//     and takes and reads back a fresh batch.
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "embstore/embstore.h"
#include "format/format.h"
#include "platform/testing.h"
#include "scenarios.h"
#include "support/payload.h"

namespace embstore::torture {
namespace {

constexpr std::uint32_t kDim = 16;
constexpr std::uint64_t kRowBytes = kDim * sizeof(float);
constexpr std::uint64_t kStoredWriter = 1;  // Rows written before the damage.
constexpr std::uint64_t kFreshWriter = 2;   // Rows the recovering Writer appends.
constexpr std::uint64_t kCommittedAt =
    detail::kStateOffset + offsetof(detail::StatePage, committed_rows);
constexpr std::uint64_t kDurableAt =
    detail::kStateOffset + offsetof(detail::StatePage, durable_rows);
constexpr std::uint64_t kCapacityAt =
    detail::kStateOffset + offsetof(detail::StatePage, capacity_rows);

bool fail(const std::string& text) {
  std::fprintf(stderr, "FAIL: %s\n", text.c_str());
  return false;
}

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

std::uint64_t get_u64(const std::string& path, std::uint64_t offset) {
  std::ifstream in(path, std::ios::binary);
  in.seekg(static_cast<std::streamoff>(offset));
  std::uint64_t value = 0;
  in.read(reinterpret_cast<char*>(&value), sizeof(value));
  return value;
}

void put_bytes(const std::string& path, std::uint64_t offset, const void* bytes, std::size_t n) {
  std::fstream f(path, std::ios::binary | std::ios::in | std::ios::out);
  f.seekp(static_cast<std::streamoff>(offset));
  f.write(static_cast<const char*>(bytes), static_cast<std::streamsize>(n));
}

void put_u64(const std::string& path, std::uint64_t offset, std::uint64_t value) {
  put_bytes(path, offset, &value, sizeof(value));
}

struct Counters {
  std::uint64_t durable = 0, committed = 0, capacity = 0;
};

std::string describe(const Counters& c) {
  return "durable " + std::to_string(c.durable) + ", committed " + std::to_string(c.committed) +
         ", capacity " + std::to_string(c.capacity);
}

// The store one round works on, and what the round did to it.
struct Round {
  std::string store, header, data, index;
  std::uint64_t rows = 0;               // Rows written before the damage (all valid then).
  std::set<std::uint64_t> batch_last;   // The last row of every batch.
  Counters written;                     // The counters as the writer left them.
  Counters damaged;                     // The counters the Reader and the Writer find.
  std::set<std::uint64_t> broken_rows;  // Rows (below `rows`) whose bytes or entry were flipped.
  std::uint64_t hold = 0;               // Rows the files hold after the damage.
  bool reboot = true;
  std::string damage;  // For messages: what was done.
  // After the first recovery: rows from `recovered` to `fresh_end` are the recovering Writer's
  // one fresh batch.
  std::uint64_t recovered = ~0ull, fresh_end = 0;
};

// What the loader's rules (src/log/recovery.h) promise for this round.
struct Expected {
  bool refused = false;
  std::string field;  // The refusal names it ("capacity_rows 10").
  std::uint64_t rows = 0;
  std::vector<std::uint64_t> bad_rows;  // Rows of the snapshot that do not verify.
};

bool row_verifies(const Round& r, std::uint64_t row) {
  if (row >= r.recovered) return row < r.fresh_end;
  return row < r.rows && row < r.hold && r.broken_rows.count(row) == 0;
}

bool ends_batch(const Round& r, std::uint64_t row) {
  return row >= r.recovered ? row + 1 == r.fresh_end : r.batch_last.count(row) != 0;
}

// The rows a recovery after a reboot keeps: all below durable; past it, whole valid batches.
std::uint64_t reboot_cut(const Round& r, std::uint64_t durable, std::uint64_t committed) {
  std::uint64_t row = durable;
  while (row < committed && row_verifies(r, row)) ++row;
  while (row > durable && !ends_batch(r, row - 1)) --row;
  return row;
}

std::vector<std::uint64_t> bad_rows_below(const Round& r, std::uint64_t rows) {
  std::vector<std::uint64_t> bad;
  for (std::uint64_t row = 0; row < rows; ++row) {
    if (!row_verifies(r, row)) bad.push_back(row);
  }
  return bad;
}

Expected expect(const Round& r) {
  Expected e;
  const Counters& c = r.damaged;
  auto refuse = [&](const std::string& field) {
    e.refused = true;
    e.field = field;
    return e;
  };
  if (c.capacity == 0) return refuse("capacity_rows 0");
  if (c.committed > c.capacity) return refuse("committed_rows " + std::to_string(c.committed));
  if (c.durable > c.committed) return refuse("durable_rows " + std::to_string(c.durable));
  if (!r.reboot) {
    // Same boot: the page cache holds every committed row, so the counters are the truth, as
    // long as the files are as long as they say.
    if (c.capacity > r.hold) return refuse("capacity_rows " + std::to_string(c.capacity));
    e.rows = c.committed;
  } else {
    // Synced rows the files no longer hold: cut since, never clamped away.
    if (c.durable > r.hold) return refuse("durable_rows " + std::to_string(c.durable));
    const std::uint64_t capacity = std::min(c.capacity, r.hold);
    const std::uint64_t committed = std::min(c.committed, capacity);
    e.rows = reboot_cut(r, std::min(c.durable, committed), committed);
  }
  e.bad_rows = bad_rows_below(r, e.rows);
  return e;
}

std::uint64_t pick_counter(Rng& rng, const Round& r, std::uint64_t current) {
  const std::uint64_t n = r.rows;
  switch (rng.below(14)) {
    case 0:
      return 0;
    case 1:
      return 1;
    case 2:
      return n / 2;
    case 3:
      return n == 0 ? 0 : n - 1;
    case 4:
      return n + 1;
    case 5:
      return r.written.capacity;
    case 6:
      return r.written.capacity + 1;
    case 7:
      return r.written.capacity == 0 ? 0 : r.written.capacity - 1;
    case 8:
      return r.hold + rng.range(1, 200);
    case 9:
      return rng.below(r.written.capacity + 1);
    case 10:
      return 10;  // The reproducer's capacity.
    case 11:
      return rng.chance(0.5) ? detail::kMaxRows + 1 : ~0ull;
    case 12: {  // A batch boundary
      auto it = r.batch_last.begin();
      std::advance(it, static_cast<long>(rng.below(r.batch_last.size())));
      return *it + 1;
    }
    default:
      return current;
  }
}

std::string file_of(const std::string& store, const char* stem, std::uint64_t generation) {
  return store + "/" + stem + "." + std::to_string(generation);
}

// Writes the store in boot A: random batches, random syncs.
Round build(Rng& rng, const std::string& dir, std::uint64_t index) {
  Round r;
  r.store = dir + "/s" + std::to_string(index);
  CreateOptions o;
  o.dim = kDim;
  o.segment_bytes = 4096 * rng.range(1, 3);  // 64 to 192 rows per segment
  {
    Writer w = Writer::create(r.store, o, wopts());
    const std::uint64_t batches = rng.range(1, 40);
    for (std::uint64_t b = 0; b < batches; ++b) {
      const std::uint64_t n = rng.range(1, 12);
      std::vector<std::uint64_t> keys(n);
      for (std::uint64_t i = 0; i < n; ++i) keys[i] = test::make_key(kStoredWriter, r.rows + i);
      w.append(keys, b, test::batch_payload(kStoredWriter, r.rows, n, kDim));
      r.rows += n;
      r.batch_last.insert(r.rows - 1);
      if (rng.chance(0.2)) w.sync();
    }
    const StoreInfo info = w.info();
    r.header = r.store + "/header";
    r.data = file_of(r.store, "rows", info.generation);
    r.index = file_of(r.store, "index", info.generation);
  }
  r.written = {get_u64(r.header, kDurableAt), get_u64(r.header, kCommittedAt),
               get_u64(r.header, kCapacityAt)};
  return r;
}

std::uint64_t files_hold(const Round& r) {
  return std::min(std::filesystem::file_size(r.data) / kRowBytes,
                  std::filesystem::file_size(r.index) / sizeof(detail::IndexEntry));
}

void damage(Rng& rng, Round& r) {
  r.hold = files_hold(r);
  Counters c = r.written;
  if (rng.chance(0.5)) c.capacity = pick_counter(rng, r, c.capacity);
  if (rng.chance(0.7)) c.committed = pick_counter(rng, r, c.committed);
  if (rng.chance(0.5)) c.durable = pick_counter(rng, r, c.durable);
  r.damaged = c;
  put_u64(r.header, kCapacityAt, c.capacity);
  put_u64(r.header, kCommittedAt, c.committed);
  put_u64(r.header, kDurableAt, c.durable);
  r.damage = describe(r.written) + " -> " + describe(c);
  if (rng.chance(0.3)) {  // A file cut short, or grown with a hole (a growth half on disk).
    const bool data = rng.chance(0.5);
    const std::string& file = data ? r.data : r.index;
    const std::uint64_t unit = data ? kRowBytes : sizeof(detail::IndexEntry);
    const std::uint64_t size = std::filesystem::file_size(file);
    std::uint64_t to = rng.chance(0.5) ? rng.below(r.rows + 1) * unit : rng.below(size + 1);
    if (rng.chance(0.25)) to = size + rng.range(1, 8192);
    std::filesystem::resize_file(file, to);
    r.damage += "; " + file + " resized from " + std::to_string(size) + " to " + std::to_string(to);
  }
  r.hold = files_hold(r);
  const std::uint64_t flips = rng.chance(0.4) ? rng.range(1, 3) : 0;
  // Each byte at most once: a second flip of the same bit would mend it (seed 8717117475961099
  // flipped entry 83 twice, and expect() cut a store whose every row verifies).
  std::set<std::pair<bool, std::uint64_t>> flipped;
  for (std::uint64_t i = 0; i < flips && r.rows > 0; ++i) {
    const std::uint64_t row = rng.below(r.rows);
    const bool in_entry = rng.chance(0.3);
    const std::string& file = in_entry ? r.index : r.data;
    // A byte of the entry's key or checksum (not of its row field, where a flip can also move
    // the batch end, which expect() does not model).
    const std::uint64_t offset = in_entry
                                     ? row * sizeof(detail::IndexEntry) + (rng.chance(0.5) ? 3 : 25)
                                     : row * kRowBytes + rng.below(kRowBytes);
    if (offset >= std::filesystem::file_size(file)) continue;
    if (!flipped.insert({in_entry, offset}).second) continue;
    std::ifstream in(file, std::ios::binary);
    in.seekg(static_cast<std::streamoff>(offset));
    char byte = 0;
    in.get(byte);
    byte = static_cast<char>(byte ^ (1 << rng.below(8)));
    put_bytes(file, offset, &byte, 1);
    r.broken_rows.insert(row);
    r.damage += "; flipped " + std::string(in_entry ? "entry" : "row") + " " + std::to_string(row);
  }
}

// What one open gave: the rows of its snapshot, or the error it threw.
struct Outcome {
  std::optional<ErrorCode> error;
  std::string message;
  std::uint64_t rows = 0;
  std::string describe() const {
    return error ? std::string(error_code_name(*error)) + " (" + message + ")"
                 : std::to_string(rows) + " rows";
  }
};

std::string store_bytes(const Round& r) {
  return read_all(r.header) + read_all(r.data) + read_all(r.index);
}

// Everything a Reader's snapshot shows: rows, keys and epochs.
std::string snapshot_bytes(const Reader& reader, std::uint64_t rows) {
  std::string out;
  if (rows == 0) return out;
  const RowsView view = reader.rows(0, rows);
  out.assign(reinterpret_cast<const char*>(view.data), view.size_bytes());
  const auto keys = reader.keys(0, rows);
  const auto epochs = reader.epochs(0, rows);
  for (std::uint64_t i = 0; i < rows; ++i) {
    const std::uint64_t ke[2] = {keys[i], epochs[i]};
    out.append(reinterpret_cast<const char*>(ke), sizeof(ke));
  }
  return out;
}

// The Reader's view against what the round wrote: `rows` rows; every row that verifies is the
// row written there; verify() and record() name exactly the others.
bool check_reader(const Reader& reader, const Round& r, std::uint64_t rows,
                  const std::string& ctx) {
  if (reader.size() != rows) {
    return fail(ctx + ": the Reader sees " + std::to_string(reader.size()) + " rows, expected " +
                std::to_string(rows));
  }
  bool ok = true;
  const std::vector<std::uint64_t> expected_bad = bad_rows_below(r, rows);
  const VerifyReport report = reader.verify();
  if (report.bad_rows != expected_bad) {
    std::string got, want;
    for (auto row : report.bad_rows) got += " " + std::to_string(row);
    for (auto row : expected_bad) want += " " + std::to_string(row);
    ok = fail(ctx + ": verify names rows [" + got + " ] as bad, expected [" + want + " ]");
  }
  for (std::uint64_t row = 0; row < rows && ok; ++row) {
    stat_add("rows_checked");
    if (!row_verifies(r, row)) {
      try {
        (void)reader.record(row);
        ok = fail(ctx + ": record(" + std::to_string(row) + ") of a bad row did not throw");
      } catch (const Error& error) {
        if (error.code() != ErrorCode::kCorruption) {
          ok = fail(ctx + ": record(" + std::to_string(row) + ") threw " + error.what());
        }
      }
      continue;
    }
    const Record rec = reader.record(row);
    const std::uint64_t want =
        test::make_key(row < r.recovered ? kStoredWriter : kFreshWriter, row);
    if (rec.key != want || !test::payload_matches(rec.key, kDim, rec.data)) {
      ok = fail(ctx + ": row " + std::to_string(row) + " holds key " + std::to_string(rec.key) +
                ", expected the row written with key " + std::to_string(want));
    }
  }
  return ok;
}

template <typename F>
Outcome attempt(F&& open) {
  Outcome out;
  try {
    out.rows = open();
  } catch (const Error& error) {
    out.error = error.code();
    out.message = error.what();
  }
  return out;
}

bool same_outcome(const Outcome& a, const Outcome& b) {
  return a.error == b.error && (a.error || a.rows == b.rows);
}

// Appends a fresh batch of `n` rows after row `at` through `w`.
void append_fresh(Writer& w, std::uint64_t at, std::uint64_t n) {
  std::vector<std::uint64_t> keys(n);
  for (std::uint64_t i = 0; i < n; ++i) keys[i] = test::make_key(kFreshWriter, at + i);
  std::vector<float> values(n * kDim);
  for (std::uint64_t i = 0; i < n; ++i) test::payload_for(keys[i], kDim, values.data() + i * kDim);
  w.append(keys, 7, values);
}

struct Tally {
  std::uint64_t refused = 0, whole = 0, cut = 0;
};

bool run_round(Rng& rng, const std::string& dir, std::uint64_t index, Tally& tally,
               std::string& ctx) {
  const std::string boot_a = random_boot_id(rng), boot_b = random_boot_id(rng);
  detail::testing::set_boot_id(boot_a);
  Round r = build(rng, dir, index);
  damage(rng, r);
  r.reboot = rng.chance(0.85);
  const Expected e = expect(r);
  ctx = "round " + std::to_string(index) + " (" + (r.reboot ? "after a reboot" : "same boot") +
        "; " + r.damage + ")";
  stat_add("corrupt_inputs");
  if (r.reboot) detail::testing::set_boot_id(boot_b);

  const std::string before = store_bytes(r);
  const bool reader_first = rng.chance(0.8);
  std::optional<Reader> reader;
  std::optional<Writer> writer;
  auto open_reader = [&] {
    return attempt([&] {
      reader.emplace(Reader::open(r.store, ropts()));
      return reader->size();
    });
  };
  auto open_writer = [&] {
    return attempt([&] {
      writer.emplace(Writer::open(r.store, wopts()));
      return writer->committed_rows();
    });
  };
  Outcome first, second;
  std::string held;  // The live Reader's snapshot before the Writer opened.
  if (reader_first) {
    first = open_reader();
    if (reader) held = snapshot_bytes(*reader, reader->size());
    if (store_bytes(r) != before) return fail(ctx + ": opening a Reader changed the store");
    second = open_writer();
  } else {
    first = open_writer();
    second = open_reader();
    if (reader) held = snapshot_bytes(*reader, reader->size());
  }
  const std::string order = reader_first ? "Reader then Writer" : "Writer then Reader";
  if (!same_outcome(first, second)) {
    return fail(ctx + ": " + order + " disagree: " + first.describe() + " vs " + second.describe());
  }
  if (e.refused) {
    if (!first.error || *first.error != ErrorCode::kCorruption ||
        first.message.find(e.field) == std::string::npos) {
      return fail(ctx + ": expected kCorruption naming \"" + e.field + "\", got " +
                  first.describe());
    }
    if (store_bytes(r) != before) return fail(ctx + ": a refused open changed the store");
    ++tally.refused;
    return true;
  }
  if (first.error)
    return fail(ctx + ": expected " + std::to_string(e.rows) + " rows, got " + first.describe());
  if (first.rows != e.rows) {
    return fail(ctx + ": " + std::to_string(first.rows) + " rows, but the rules keep " +
                std::to_string(e.rows) +
                " (a cut where no rule cuts, or a row kept that "
                "does not verify)");
  }
  ++(e.rows >= r.rows ? tally.whole : tally.cut);
  bool ok = true;
  // The Writer recovered; now it appends, while the Reader still holds its snapshot.
  const std::uint64_t fresh = rng.chance(0.7) ? rng.range(1, 150) : 0;
  if (fresh > 0) append_fresh(*writer, e.rows, fresh);
  r.recovered = e.rows;
  r.fresh_end = e.rows + fresh;
  if (rng.chance(0.3)) writer->sync();
  if (snapshot_bytes(*reader, e.rows) != held) {
    ok = fail(ctx +
              ": a row inside the live Reader's snapshot changed while the Writer "
              "recovered and appended");
  }
  reader->refresh();
  ok &= check_reader(*reader, r, r.fresh_end, ctx + ", refreshed");
  writer.reset();
  reader.reset();
  // Recovery is done once: the same boot reopens what it left. A later reboot re-checks only
  // the rows past durable (the recovery made the rows it kept durable) by the same rules.
  std::uint64_t rows = r.fresh_end;
  for (const bool reboot_again : {false, true}) {
    const std::string when =
        reboot_again ? "reopened after another reboot" : "reopened in the same boot";
    if (reboot_again) {
      detail::testing::set_boot_id(random_boot_id(rng));
      rows = reboot_cut(r, std::min(get_u64(r.header, kDurableAt), rows), rows);
    }
    const Outcome again = open_writer();
    if (again.error || again.rows != rows) {
      ok = fail(ctx + ": " + when + ": the Writer finds " + again.describe() + ", expected " +
                std::to_string(rows) + " rows");
      break;
    }
    writer.reset();
    reader.emplace(Reader::open(r.store, ropts()));
    ok &= check_reader(*reader, r, rows, ctx + ", " + when);
    reader.reset();
  }
  if (ok) {
    writer.emplace(Writer::open(r.store, wopts()));
    append_fresh(*writer, rows, 3);
    writer.reset();
    Reader last = Reader::open(r.store, ropts());
    if (last.size() != rows + 3 || !last.verify(rows, rows + 3).ok()) {
      ok = fail(ctx + ": a fresh batch did not read back");
    }
  }
  return ok;
}

}  // namespace

bool scenario_counters(std::uint64_t seed) {
  const std::string dir = make_temp_dir("counters");
  const std::uint64_t rounds = scaled(300, 25);
  bool ok = true;
  Tally tally;
  std::uint64_t round = 0;
  for (; round < rounds && ok; ++round) {
    Rng rng(mix(seed, round));
    std::string ctx = "round " + std::to_string(round);
    try {
      ok = run_round(rng, dir, round, tally, ctx);
    } catch (const std::exception& e) {
      ok = fail(ctx + ": threw " + e.what());
    }
    remove_all(dir + "/s" + std::to_string(round));
  }
  detail::testing::set_boot_id("");
  remove_all(dir);
  std::printf(
      "scenario 16: %llu rounds of damaged counters, files and rows: %llu refused by both "
      "(named), %llu opened with every written row, %llu cut back by the rules\n",
      static_cast<unsigned long long>(round), static_cast<unsigned long long>(tally.refused),
      static_cast<unsigned long long>(tally.whole), static_cast<unsigned long long>(tally.cut));
  return ok;
}

}  // namespace embstore::torture
