#include "fuzz_store.h"

#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "embstore/embstore.h"
#include "format/checksum.h"
#include "format/format.h"
#include "platform/os.h"
#include "platform/testing.h"

namespace embstore::fuzz {
namespace {

constexpr const char* kFuzzBootId = "f0220000-0000-4000-8000-00000000f022";
constexpr const char* kOtherBootId = "f0220000-0000-4000-8000-00000000f023";  // "after a reboot"
constexpr const char* kFiles[] = {"header", "rows.1", "index.1"};

// Ends the process on a broken promise, saying which: a fuzzer or scenario 13 that aborts with
// no word leaves nothing to start from but the input.
[[noreturn]] void fail(const char* what, const char* detail = "") {
  std::fprintf(stderr, "fuzz_store: %s%s%s\n", what, *detail ? ": " : "", detail);
  std::abort();
}

const std::string& work_dir() {
  static const std::string dir = [] {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/embstore-fuzz-XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr) fail("mkdtemp failed", tmpl.c_str());
    detail::testing::set_boot_id(kFuzzBootId);
    return tmpl;
  }();
  static const bool cleanup_registered = [] {
    // libFuzzer and the replay driver leave through exit(): remove the work directory then.
    std::atexit([] {
      std::error_code ignored;
      std::filesystem::remove_all(work_dir(), ignored);
    });
    return true;
  }();
  (void)cleanup_registered;
  return dir;
}

void put_file(const std::string& path, std::string_view bytes) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail("cannot create", path.c_str());
  std::size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n <= 0) fail("cannot write", path.c_str());
    done += static_cast<std::size_t>(n);
  }
  ::close(fd);
}

std::uint64_t u64_at(const std::string& s, std::size_t off) {
  std::uint64_t v = 0;
  if (off + 8 <= s.size()) std::memcpy(&v, s.data() + off, 8);
  return v;
}

std::string file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// Whether row `row` of the reader's snapshot passes its checksum (record() raises kCorruption
// when it does not; anything else is a broken promise of its own and propagates).
bool row_verifies(const Reader& reader, std::uint64_t row) {
  try {
    (void)reader.record(row);
    return true;
  } catch (const Error& e) {
    if (e.code() != ErrorCode::kCorruption) throw;
    return false;
  }
}

// Lookups answer exactly as a scan of the snapshot's offset index would, whether through a key
// index (after the writer below, one built from whatever the entries hold) or by scan: a key index
// may refuse with kCorruption, never answer with a wrong row.
void check_lookups(const Reader& reader, std::uint64_t n) {
  const auto keys = reader.keys(0, n);
  const auto epochs = reader.epochs(0, n);
  try {
    std::map<std::uint64_t, std::uint64_t> per_epoch;
    for (std::uint64_t r = 0; r < n; ++r) ++per_epoch[epochs[r]];
    const std::vector<EpochRows> listed = reader.epochs();
    if (listed.size() != per_epoch.size()) fail("epochs() lists other epochs than the scan");
    std::size_t at = 0;
    for (const auto& [epoch, rows] : per_epoch) {
      if (listed[at].epoch != epoch || listed[at].rows != rows) {
        fail("epochs() counts other rows than the scan");
      }
      ++at;
    }
    // Keys of rows spread over the snapshot, and two that may be absent.
    std::vector<std::pair<std::uint64_t, std::uint64_t>> probes = {{42, 7}, {~0ull, 0}};
    for (std::uint64_t i = 0; i < std::min<std::uint64_t>(n, 24); ++i) {
      const std::uint64_t r = i * n / std::min<std::uint64_t>(n, 24);
      probes.emplace_back(keys[r], epochs[r]);
    }
    std::vector<std::uint64_t> many_keys, many_epochs;
    std::vector<std::int64_t> expected_many;
    for (const auto& [key, epoch] : probes) {
      std::vector<KeyVersion> versions;
      std::optional<std::uint64_t> at_epoch;
      std::vector<std::uint64_t> of_epoch;
      for (std::uint64_t r = 0; r < n; ++r) {
        if (keys[r] == key) {
          versions.push_back({r, epochs[r]});
          if (epochs[r] == epoch) at_epoch = r;
        }
        if (epochs[r] == epoch) of_epoch.push_back(r);
      }
      const std::vector<KeyVersion> history = reader.history(key);
      if (history.size() != versions.size()) fail("history() lists other rows than the scan");
      for (std::size_t v = 0; v < versions.size(); ++v) {
        if (history[v].row != versions[v].row || history[v].epoch != versions[v].epoch) {
          fail("history() differs from the scan");
        }
      }
      std::optional<std::uint64_t> latest;
      if (!versions.empty()) latest = versions.back().row;
      if (reader.find(key) != latest) fail("find(key) differs from the scan");
      if (reader.find(key, epoch) != at_epoch) fail("find(key, epoch) differs from the scan");
      if (reader.epoch_rows(epoch) != of_epoch) fail("epoch_rows() differs from the scan");
      many_keys.push_back(key);
      many_epochs.push_back(epoch);
      expected_many.push_back(at_epoch ? static_cast<std::int64_t>(*at_epoch) : -1);
    }
    std::vector<std::int64_t> found(many_keys.size());
    reader.find_many(many_keys, many_epochs, found);
    if (found != expected_many) fail("find_many() differs from the scan");
  } catch (const Error& e) {
    if (e.code() != ErrorCode::kCorruption) {
      fail("a lookup raised other than kCorruption", e.what());
    }
  }
}

void exercise_reader(const std::string& store) {
  ReaderOptions ro;
  ro.map_bytes = 64ull << 20;
  try {
    Reader reader = Reader::open(store, ro);
    const std::uint64_t n = reader.size();
    VerifyReport report = reader.verify();
    (void)report;
    RowsView all = reader.rows();
    std::uint64_t sum = 0;
    for (std::uint64_t i = 0; i < all.size_bytes(); i += 64)
      sum += static_cast<std::uint8_t>(all.data[i]);
    auto keys = reader.keys(0, n);
    auto epochs = reader.epochs(0, n);
    for (std::uint64_t row = 0; row < n; ++row) {
      sum += keys[row] ^ epochs[row];
      try {
        Record rec = reader.record(row);
        sum += static_cast<std::uint8_t>(rec.data[0]);
      } catch (const Error& e) {
        if (e.code() != ErrorCode::kCorruption) {
          fail("record() raised other than kCorruption", e.what());
        }
      }
    }
    check_lookups(reader, n);
    (void)reader.info();
    reader.refresh();
    if (reader.size() < n) fail("refresh() shrank the snapshot");
    if (sum == 0x123456789abcdefull) std::fputs("", stderr);
  } catch (const Error&) {
  }
}

// Salvages the store into a new one and checks what salvage() promises: the damaged store is
// not changed, the new one verifies and holds exactly the rows the report says were kept, each
// equal (key, epoch, bytes) to its row in the damaged store, and every row a Reader of the
// damaged store finds valid is among them (in order): a row lost must fail its checksum.
void exercise_salvage(const std::string& store) {
  const std::string out = work_dir() + "/salvaged";
  std::error_code ignored;
  std::filesystem::remove_all(out, ignored);
  std::vector<std::string> before;
  for (const char* f : kFiles) before.push_back(file_bytes(store + "/" + f));
  SalvageReport report;
  bool salvaged = false;
  try {
    report = salvage(store, out);
    salvaged = true;
  } catch (const Error&) {
  }
  for (std::size_t i = 0; i < before.size(); ++i) {
    if (file_bytes(store + "/" + kFiles[i]) != before[i]) {
      fail("salvage changed the store it read", kFiles[i]);
    }
  }
  if (!salvaged) return;
  std::uint64_t lost = 0, end = 0;
  for (const auto& [first, last] : report.lost_ranges) {
    if (first < end || last <= first || last > report.rows_scanned) {
      fail("salvage reports lost ranges out of order or past the rows scanned");
    }
    lost += last - first;
    end = last;
  }
  if (lost != report.rows_lost || report.rows_copied + report.rows_lost != report.rows_scanned) {
    fail("salvage's counts do not add up");
  }
  ReaderOptions ro;
  ro.map_bytes = 64ull << 20;
  Reader saved = Reader::open(out, ro);
  if (saved.size() != report.rows_copied) fail("the salvaged store holds other rows than copied");
  if (!saved.verify().ok()) fail("the salvaged store fails verify()");
  // When the damaged store opens as a Reader (salvage is for stores that may not), every row it
  // has is compared.
  std::optional<Reader> opened;
  try {
    opened.emplace(Reader::open(store, ro));
  } catch (const Error&) {
    return;
  }
  const Reader& damaged = *opened;
  const std::uint64_t row_bytes = std::uint64_t{damaged.dim()} * dtype_size(damaged.dtype());
  if (saved.dim() != damaged.dim() || saved.dtype() != damaged.dtype()) {
    fail("the salvaged store has another shape");
  }
  std::size_t range = 0;
  std::uint64_t copied = 0;
  const std::uint64_t n = damaged.size();
  for (std::uint64_t row = 0; row < std::max(n, report.rows_scanned); ++row) {
    while (range < report.lost_ranges.size() && report.lost_ranges[range].second <= row) ++range;
    const bool lost_here = row >= report.rows_scanned || (range < report.lost_ranges.size() &&
                                                          report.lost_ranges[range].first <= row);
    if (lost_here) {
      if (row < n && row_verifies(damaged, row)) fail("salvage lost a row that verifies");
      continue;
    }
    const std::uint64_t at = copied++;
    if (row >= n) continue;  // Past the damaged store's counter: no Reader row to compare.
    if (!row_verifies(damaged, row)) fail("salvage copied a row that fails its checksum");
    const Record a = damaged.record(row);
    const Record b = saved.record(at);
    if (a.key != b.key || a.epoch != b.epoch || std::memcmp(a.data, b.data, row_bytes) != 0) {
      fail("a salvaged row differs from the row it was copied from");
    }
  }
}

enum class Truncate { kNone, kRows, kFromEpoch };

// Truncates the store `writer` holds (`appended` is the row it just appended, at epoch 7) and
// checks that exactly the asked prefix is left: its keys and epochs unchanged, lookups as a scan.
void exercise_truncate(Writer& writer, const std::string& store, const ReaderOptions& ro,
                       std::uint64_t appended, Truncate how) {
  Reader before = Reader::open(store, ro);
  const std::uint64_t n = before.size();
  const auto keys = before.keys(0, n);
  const auto epochs = before.epochs(0, n);
  std::vector<bool> verifies(n);
  for (std::uint64_t r = 0; r < n; ++r) verifies[r] = row_verifies(before, r);
  std::uint64_t expected = n;
  std::uint64_t kept = 0;
  try {
    if (how == Truncate::kRows) {
      expected = (appended + 1) / 2;
      kept = writer.truncate(expected);
    } else {
      for (std::uint64_t r = 0; r < n && expected == n; ++r) {
        if (epochs[r] >= 7) expected = r;
      }
      kept = writer.truncate_from_epoch(7);
    }
  } catch (const Error& e) {
    // A damaged row in the way (log/truncate.h), or a cut row whose epoch fails its checksum
    // (Writer::truncate_from_epoch), is refused before anything is written.
    const std::string what = e.what();
    const bool cut_refused = how == Truncate::kFromEpoch &&
                             what.find("truncate from epoch 7: row ") != std::string::npos;
    if (e.code() != ErrorCode::kCorruption ||
        (what.find("truncate to") == std::string::npos && !cut_refused)) {
      throw;
    }
    if (cut_refused && (expected >= n || verifies[expected])) {
      fail("truncate from an epoch refused a cut row that verifies", e.what());
    }
    if (writer.committed_rows() != n || Reader::open(store, ro).size() != n) {
      fail("a refused truncate changed the store", e.what());
    }
    return;
  }
  const std::string counts = "expected " + std::to_string(expected) + " of " + std::to_string(n);
  if (kept != expected) fail("truncate kept other rows than asked", counts.c_str());
  if (writer.committed_rows() != expected) {
    fail("the writer counts other rows after truncate",
         (counts + ", counts " + std::to_string(writer.committed_rows())).c_str());
  }
  Reader after = Reader::open(store, ro);
  if (after.size() != expected) {
    fail("a Reader after truncate sees other rows than kept",
         (counts + ", sees " + std::to_string(after.size())).c_str());
  }
  const auto keys_after = after.keys(0, expected);
  const auto epochs_after = after.epochs(0, expected);
  for (std::uint64_t r = 0; r < expected; ++r) {
    if (keys_after[r] != keys[r] || epochs_after[r] != epochs[r]) {
      fail("a row kept by truncate changed its key or epoch");
    }
    if (row_verifies(after, r) != verifies[r]) {
      fail("truncate changed whether a row it kept verifies");
    }
  }
  check_lookups(after, expected);
  // The snapshot taken before is unchanged.
  if (before.size() != n) fail("truncate changed an open Reader's snapshot");
}

// Closes `writer` (its policy syncs first) and opens the store again after a reboot: every row
// committed at the close was durable, so the recovery that re-checks [durable, committed) after
// a reboot must keep them all, and a store this library just closed must open.
void exercise_reopen(Writer& writer, const std::string& store, const WriterOptions& wo,
                     const ReaderOptions& ro) {
  const std::uint64_t committed = writer.committed_rows();
  writer.close();
  const StoreInfo info = Reader::open(store, ro).info(InfoDetail::kState);
  if (info.committed_rows != committed || info.durable_rows != committed) {
    const std::string counts = "committed " + std::to_string(committed) + ", then " +
                               std::to_string(info.committed_rows) + " committed and " +
                               std::to_string(info.durable_rows) + " durable";
    fail("close() left other rows committed or durable", counts.c_str());
  }
  detail::testing::set_boot_id(kOtherBootId);
  try {
    Writer again = Writer::open(store, wo);
    if (again.committed_rows() != committed) fail("a recovery after a reboot cut durable rows");
  } catch (const Error& e) {
    fail("a store closed by this library does not open after a reboot", e.what());
  }
  detail::testing::set_boot_id(kFuzzBootId);
}

void exercise_writer(const std::string& store, bool rebooted, Truncate truncate, bool reopen) {
  WriterOptions wo;
  wo.map_bytes = 16ull << 20;
  try {
    Writer writer = Writer::open(store, wo);
    if (rebooted) {
      // Recovery re-checked [durable, committed) and kept only rows that validate.
      const StoreInfo info = writer.info();
      ReaderOptions check_options;
      check_options.map_bytes = wo.map_bytes;
      Reader check = Reader::open(store, check_options);
      if (check.size() != info.committed_rows) fail("a Reader sees other than the committed rows");
      if (!check.verify(std::min(info.durable_rows, check.size()), check.size()).ok()) {
        fail("a row recovery kept fails verify()");
      }
    }
    const std::uint64_t row_bytes = std::uint64_t{writer.dim()} * dtype_size(writer.dtype());
    std::vector<std::byte> row(row_bytes, std::byte{0x41});
    const std::uint64_t key = 42;
    const std::uint64_t first =
        writer.append(std::span<const std::uint64_t>(&key, 1), 7,
                      ConstMatrix{row.data(), writer.dtype(), 1, writer.dim(), 0});
    ReaderOptions ro;
    ro.map_bytes = wo.map_bytes;
    Reader reader = Reader::open(store, ro);
    if (reader.size() <= first) fail("an acked row is not visible");
    Record rec = reader.record(first);  // and valid (throws otherwise: caught below)
    if (rec.key != key || rec.epoch != 7) fail("an acked row reads back with another key or epoch");
    if (truncate != Truncate::kNone) exercise_truncate(writer, store, ro, first, truncate);
    if (reopen) exercise_reopen(writer, store, wo, ro);
  } catch (const Error& e) {
    // A row the writer appended must never fail its checksum afterwards.
    if (e.code() == ErrorCode::kCorruption &&
        std::string(e.what()).find("fails its checksum") != std::string::npos) {
      fail("an appended row fails its checksum", e.what());
    }
  }
}

}  // namespace

std::string encode_store(const std::string& dir, std::uint8_t flags) {
  std::string out(1, static_cast<char>(flags));
  for (int i = 0; i < 3; ++i) {
    if (i > 0) out.append(kSeparator, kSeparatorBytes);
    out.append(file_bytes(dir + "/" + kFiles[i]));
  }
  return out;
}

}  // namespace embstore::fuzz

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace embstore;
  using namespace embstore::fuzz;
  const std::string store = work_dir() + "/store";
  // Every input starts from an empty directory: a key index, or the files of a truncate's
  // generation, left by the input before would belong to other rows under the same store id.
  std::error_code ignored;
  std::filesystem::remove_all(store, ignored);
  ::mkdir(store.c_str(), 0755);
  put_file(store + "/lock", "");

  const std::uint8_t flags = size > 0 ? data[0] : 0;
  std::string_view rest(reinterpret_cast<const char*>(data), size);
  if (!rest.empty()) rest.remove_prefix(1);
  std::vector<std::string> parts;
  while (parts.size() < 3) {
    const std::size_t at = rest.find(std::string_view(kSeparator, kSeparatorBytes));
    if (at == std::string_view::npos) {
      if (!rest.empty() || parts.empty()) parts.emplace_back(rest);
      break;
    }
    parts.emplace_back(rest.substr(0, at));
    rest.remove_prefix(at + kSeparatorBytes);
  }
  if (size == 0) parts.clear();  // The empty input: a directory with only the lock file.
  if (!parts.empty()) {
    std::string& header = parts[0];
    if ((flags & 1) && header.size() >= sizeof(detail::FixedHeader)) {
      const std::uint64_t metadata_bytes = u64_at(header, 64);
      if (metadata_bytes <= kMaxMetadataBytes &&
          header.size() >= detail::kMetadataOffset + metadata_bytes) {
        const std::uint64_t sum =
            detail::header_hash(header.data(), offsetof(detail::FixedHeader, header_checksum),
                                header.data() + detail::kMetadataOffset, metadata_bytes);
        std::memcpy(header.data() + offsetof(detail::FixedHeader, header_checksum), &sum, 8);
      }
    }
    if ((flags & 2) && header.size() >= detail::kStateOffset + 512) {
      std::uint64_t boot[2];
      detail::os::boot_id(boot);
      std::memcpy(header.data() + detail::kStateOffset + offsetof(detail::StatePage, boot_id), boot,
                  16);
    }
  }
  for (std::size_t i = 0; i < parts.size(); ++i) put_file(store + "/" + kFiles[i], parts[i]);

  try {
    (void)read_info(store);
  } catch (const Error&) {
  }
  exercise_reader(store);
  // Salvage creates a store with the header's segment size (either copy's): small ones only.
  if ((flags & 32) && !parts.empty() && u64_at(parts[0], 32) <= (64u << 10) &&
      u64_at(parts[0], detail::kHeaderCopyOffset + 32) <= (64u << 10)) {
    exercise_salvage(store);
  }
  // The writer path allocates up to a segment at a time: only for small ones, to keep runs fast.
  if ((flags & 4) && !parts.empty() && u64_at(parts[0], 32) <= (64u << 10)) {
    const Truncate truncate = (flags & 8) == 0    ? Truncate::kNone
                              : (flags & 16) == 0 ? Truncate::kRows
                                                  : Truncate::kFromEpoch;
    exercise_writer(store, (flags & 2) == 0, truncate, (flags & 64) != 0);
    exercise_reader(store);
  }
  return 0;
}
