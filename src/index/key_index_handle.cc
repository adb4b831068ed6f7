#include "index/key_index_handle.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstdlib>
#include <new>
#include <string>

#include "embstore/error.h"
#include "platform/testing.h"

namespace embstore::detail {
namespace {

std::uint64_t load(const std::uint64_t* word) {
  return std::atomic_ref<std::uint64_t>(*const_cast<std::uint64_t*>(word))
      .load(std::memory_order_acquire);
}
void store(std::uint64_t* word, std::uint64_t value) {
  std::atomic_ref<std::uint64_t>(*word).store(value, std::memory_order_release);
}

// Rows indexed per step of a build, between checks of the stop flag and the table loads.
constexpr std::uint64_t kBuildStepRows = 1 << 16;
// A growth that leaves a tail this short finishes under the key index lock and the Writer's
// mutex, which this handle's appends wait for: 65,536 rows held them 4.6-7.7 ms (at ~75-115 ns
// a row into tables not yet in cache); 4,096 rows take well under a millisecond
// (bench/RESULTS.md, "The key index lock").
constexpr std::uint64_t kTailRows = 1 << 12;
// A growth claim older than this is taken over even if its pid exists (the pid may be reused).
constexpr std::uint64_t kClaimLifetimeSeconds = 3600;

// Each table at the larger of its sizes in `a` and `b`.
KeyIndexSizes larger(const KeyIndexSizes& a, const KeyIndexSizes& b) {
  return {std::max(a.pair_slots, b.pair_slots), std::max(a.key_slots, b.key_slots),
          std::max(a.epoch_slots, b.epoch_slots)};
}

// Whether process `pid` runs (this one, or one /proc lists that is not a zombie:
// os::process_alive(); a reused pid counts as running).
bool process_running(std::uint64_t pid) {
  return pid == static_cast<std::uint64_t>(os::current_pid()) || os::process_alive(pid);
}

}  // namespace

KeyIndexHandle::KeyIndexHandle(std::string dir, const KeyIndexIdentity& identity,
                               std::uint64_t* key_generation, os::Access access,
                               const std::uint64_t* store_generation,
                               std::function<void()> check_at_path)
    : dir_(std::move(dir)),
      check_at_path_(std::move(check_at_path)),
      identity_(identity),
      key_generation_(key_generation),
      store_generation_(store_generation),
      access_(access),
      status_("not opened") {}

std::shared_ptr<const KeyIndexFile> KeyIndexHandle::current() const {
  std::lock_guard guard(mutex_);
  return current_;
}

std::string KeyIndexHandle::status() const {
  std::lock_guard guard(mutex_);
  if (current_) {
    return "keys." + std::to_string(current_->generation()) + ", " +
           std::to_string(current_->indexed_rows()) + " rows indexed";
  }
  return status_;
}

void KeyIndexHandle::set_current(std::shared_ptr<KeyIndexFile> file, std::string status) {
  std::lock_guard guard(mutex_);
  current_ = std::move(file);
  has_current_ = current_ != nullptr;
  status_ = std::move(status);
  damaged_ = false;
}

bool KeyIndexHandle::damaged() const {
  std::lock_guard guard(mutex_);
  return damaged_;
}

void KeyIndexHandle::mark_damaged(const std::string& why) {
  std::lock_guard guard(mutex_);
  if (current_) damaged_generation_ = current_->generation();
  current_.reset();
  has_current_ = false;
  status_ = "damaged (" + why + "): lookups scan until a writer rebuilds it";
  damaged_ = true;
}

void KeyIndexHandle::reset_store_generation(std::uint64_t store_generation) {
  std::lock_guard guard(mutex_);
  identity_.store_generation = store_generation;
  current_.reset();
  has_current_ = false;
  status_ = "not opened";
  damaged_ = false;
  damaged_generation_ = 0;
  claim_file_.reset();
  claimed_ = false;
}

bool KeyIndexHandle::store_moved() const {
  return store_generation_ != nullptr &&
         store_generation_of(load(store_generation_)) != identity_.store_generation;
}

void KeyIndexHandle::replaced() {
  {
    std::lock_guard guard(mutex_);
    if (current_) return;  // The snapshot's own file: frozen by the truncate, still right.
  }
  set_current(nullptr, "for generation " + std::to_string(identity_.store_generation) +
                           " of the store, which a truncate has replaced: lookups scan until "
                           "the Reader refreshes");
}

void KeyIndexHandle::refresh() {
  for (int attempt = 0; attempt < 3; ++attempt) {
    const std::uint64_t generation = load(key_generation_);
    // A Reader's snapshot may predate a truncate, and the word then names a key index of the
    // new generation (whose file names start over at keys.1). Read after key_generation: a
    // truncate moves the store's generation word before any key index of the new generation
    // is named (FORMAT.md, "Truncate"), so an unmoved word means `generation` is this
    // generation's key index, or none. Looked at again if the open fails: the names repeat.
    if (store_moved()) return replaced();
    {
      std::lock_guard guard(mutex_);
      if (current_ && current_->generation() == generation) return;
      // A file marked damaged stays unused until a writer replaces it.
      if (!current_ && status_.rfind("damaged", 0) == 0 && generation == damaged_generation_) {
        return;
      }
    }
    if (generation == 0) {
      set_current(nullptr, "none built yet: lookups scan (a writer builds it when it opens)");
      return;
    }
    try {
      auto file = KeyIndexFile::open(dir_, generation, identity_, access_);
      if (!file->built_in_current_boot()) {
        set_current(nullptr,
                    "built before the last reboot: lookups scan until a writer rebuilds it");
        return;
      }
      set_current(std::move(file), "");
      return;
    } catch (const Error& error) {
      if (store_moved()) return replaced();  // A truncate and a rebuild meanwhile.
      // A growth may have replaced and removed the file between the load and the open.
      if (error.code() == ErrorCode::kNotFound && load(key_generation_) != generation) continue;
      if (error.code() == ErrorCode::kUnsupportedVersion) {
        // Another library version's layout: not damage, just not usable here.
        set_current(nullptr, std::string(error.what()) +
                                 ": lookups scan until a writer of this version rebuilds it");
        return;
      }
      // An I/O error is reported, not papered over by a scan.
      if (error.code() != ErrorCode::kNotFound && error.code() != ErrorCode::kCorruption) throw;
      std::lock_guard guard(mutex_);
      current_.reset();
      has_current_ = false;
      damaged_generation_ = generation;
      status_ =
          "damaged (" + std::string(error.what()) + "): lookups scan until a writer rebuilds it";
      damaged_ = true;
      return;
    }
  }
}

std::shared_ptr<KeyIndexFile> KeyIndexHandle::build(const IndexEntry* entries, std::uint64_t rows,
                                                    KeyIndexSizes sizes, std::uint64_t generation,
                                                    const std::atomic<bool>* stop,
                                                    const std::atomic<std::uint64_t>* final_rows) {
  for (;;) {
    std::shared_ptr<KeyIndexFile> file;
    bool complete = true;
    // A build that fails (a full disk) drops `file`, which gives its space back now.
    check_dir();
    try {
      file = KeyIndexFile::create(dir_, generation, identity_, sizes, rows);
    } catch (const Error& error) {
      // No room for tables sized for a guess, larger than the rows built need: say so, so that
      // the caller can see what to change (WriterOptions::expected_rows). In words every caller
      // knows: the tools pass the rows they will write, and their users never set the option.
      if (error.code() != ErrorCode::kFull || expected_rows_ == 0 ||
          sizes.pair_slots != expected_sizes().pair_slots ||
          sizes.pair_slots <= key_index_slots_for(rows)) {
        throw;
      }
      throw Error(ErrorCode::kFull,
                  std::string(error.what()) + " (its tables were sized for " +
                      std::to_string(expected_rows_) + " expected rows)",
                  error.sys_errno());
    }
    while (complete && file->indexed_rows() < rows) {
      complete = file->index_rows(entries, std::min(rows, file->indexed_rows() + kBuildStepRows));
      EMBSTORE_CRASH_POINT("during-key-index-build");
      if (stop != nullptr && stop->load()) return nullptr;
      if (outgrown(sizes, final_rows)) return nullptr;
    }
    if (complete) return file;
    // A table filled up before the end (appends went on after the sizes were chosen): start
    // again with each full one sized for every row being a new entry, which it cannot outgrow,
    // so a build restarts at most once per table and stays within the file's size bound.
    const KeyIndexSizes next = file->next_sizes();
    const std::uint64_t room = key_index_slots_for(rows);
    if (next.pair_slots != sizes.pair_slots) sizes.pair_slots = std::max(sizes.pair_slots, room);
    if (next.key_slots != sizes.key_slots) sizes.key_slots = std::max(sizes.key_slots, room);
    if (next.epoch_slots != sizes.epoch_slots)
      sizes.epoch_slots = std::max(sizes.epoch_slots, room);
  }
}

void KeyIndexHandle::open_for_writer(const IndexEntry* entries, std::uint64_t committed,
                                     bool rebuild) {
  check_dir();
  const std::uint64_t generation = load(key_generation_);
  std::shared_ptr<KeyIndexFile> file;
  if (generation != 0 && !rebuild) {
    try {
      file = KeyIndexFile::open(dir_, generation, identity_, os::Access::kReadWrite);
      // From another boot any page may be stale; past `committed`, a recovery cut rows it
      // indexed: either way it is rebuilt, never trusted.
      if (!file->built_in_current_boot() || file->indexed_rows() > committed) file.reset();
    } catch (const Error& error) {
      // Missing, damaged or of another layout: rebuilt below. Any other failure (an I/O error)
      // is the caller's.
      if (error.code() != ErrorCode::kNotFound && error.code() != ErrorCode::kCorruption &&
          error.code() != ErrorCode::kUnsupportedVersion) {
        throw;
      }
      file.reset();
    }
  }
  if (file) {
    // Tables too full to take every row (a growth that never finished) are left to the growth
    // the next append claims; readers scan the rest meanwhile. Tables found damaged while the
    // rows a dead writer left are indexed (a slot naming a row past the commit point) are
    // rebuilt below, as a damaged header is: derived data never keeps a writer from the store.
    try {
      file->index_rows(entries, committed);
    } catch (const Error& error) {
      if (error.code() != ErrorCode::kCorruption) throw;
      file.reset();
    }
  }
  remove_stale_builds(file.get());
  if (file) {
    set_current(std::move(file), "");
    return;
  }
  // Room for one pair per row at the most load a table may have; the key and epoch tables start
  // small and a build that fills one restarts with it sized for every row.
  KeyIndexSizes sizes;
  sizes.pair_slots = std::max(sizes.pair_slots, key_index_slots_for(committed));
  sizes.key_slots = std::max(sizes.key_slots, key_index_slots_for(committed / 16));
  sizes = larger(sizes, expected_sizes());
  file = build(entries, committed, sizes, generation + 1, nullptr, nullptr);
  check_dir();
  file->publish_as_current(dir_);
  store(key_generation_, generation + 1);
  if (generation != 0) os::remove_file(dir_ + "/" + key_index_file_name(generation));
  set_current(std::move(file), "");
}

std::optional<bool> KeyIndexHandle::index_current(const IndexEntry* entries,
                                                  std::uint64_t committed, bool claim) {
  std::shared_ptr<KeyIndexFile> file;
  {
    std::lock_guard guard(mutex_);
    file = current_;
  }
  if (!file || file->generation() != load(key_generation_)) return std::nullopt;
  if (EMBSTORE_FAULT(testing::Op::kAlloc) != 0) throw std::bad_alloc();
  bool complete;
  try {
    complete = file->index_rows(entries, committed);
  } catch (const Error& error) {
    if (error.code() != ErrorCode::kCorruption) throw;
    return std::nullopt;  // Damaged: after_publish() rebuilds it.
  }
  if (complete && !file->wants_growth()) return false;
  if (!claim) return !claimed_;
  return try_claim_growth();
}

bool KeyIndexHandle::after_publish(const IndexEntry* entries, std::uint64_t committed) {
  if (const auto claimed = index_current(entries, committed)) return *claimed;
  const auto file = current();
  if (file && file->generation() == load(key_generation_)) {
    // A damaged table: the offset index has everything, build a fresh generation from it.
    open_for_writer(entries, committed, /*rebuild=*/true);
    return false;
  }
  // Another writer replaced the generation (or this handle lost its file): take the new one,
  // which open_for_writer() indexes (or rebuilds, when damaged), then see whether it is full.
  open_for_writer(entries, committed);
  return index_current(entries, committed).value_or(false);
}

bool KeyIndexHandle::outgrown(const KeyIndexSizes& sizes,
                              const std::atomic<std::uint64_t>* final_rows) const {
  if (final_rows == nullptr || claim_file_ == nullptr) return false;
  const std::uint64_t rows = final_rows->load();
  if (rows == 0) return false;
  return larger(sizes, claim_file_->next_sizes(rows)) != sizes;
}

bool KeyIndexHandle::claim_alive(std::uint64_t claim) {
  if (claim == 0) return false;
  const std::uint64_t pid = claim & 0xffffffffull;
  const std::uint64_t since_s = claim >> 32;
  const std::uint64_t now_s = static_cast<std::uint64_t>(os::unix_time_ns() / 1'000'000'000);
  return process_running(pid) && now_s - since_s < kClaimLifetimeSeconds;
}

void KeyIndexHandle::remove_stale_builds(const KeyIndexFile* current) {
  const std::size_t prefix = std::char_traits<char>::length(kKeyIndexBuildFilePrefix);
  for (const std::string& name : os::list_dir(dir_)) {
    if (name.compare(0, prefix, kKeyIndexBuildFilePrefix) == 0) {
      // keys.build.<pid>.<n>: its builder's, while that process runs.
      const std::uint64_t pid = std::strtoull(name.c_str() + prefix, nullptr, 10);
      if (pid > 0 && !process_running(pid)) os::remove_file(dir_ + "/" + name);
    } else if (name == kKeyIndexLegacyBuildFileName &&
               (current == nullptr || !claim_alive(load(current->grow_claim_word())))) {
      // An older library builds it under both locks (held here) or under a live growth claim.
      os::remove_file(dir_ + "/" + name);
    }
  }
}

KeyIndexSizes KeyIndexHandle::expected_sizes() const {
  if (expected_rows_ == 0) return {};
  return {key_index_slots_for(expected_rows_), key_index_slots_for(expected_rows_), kMinSlots};
}

bool KeyIndexHandle::try_claim_growth() {
  if (claimed_) return false;
  std::shared_ptr<KeyIndexFile> file;
  {
    std::lock_guard guard(mutex_);
    file = current_;
  }
  std::uint64_t* word = file->grow_claim_word();
  if (claim_alive(load(word))) return false;
  const std::uint64_t now_s = static_cast<std::uint64_t>(os::unix_time_ns() / 1'000'000'000);
  store(word, (now_s << 32) | static_cast<std::uint32_t>(os::current_pid()));
  claimed_ = true;
  claim_file_ = file;
  growth_sizes_ = larger(file->next_sizes(), expected_sizes());
  return true;
}

std::shared_ptr<KeyIndexFile> KeyIndexHandle::build_next(
    const std::function<Rows()>& source, const std::atomic<bool>& stop,
    const std::atomic<std::uint64_t>& final_rows) {
  const std::uint64_t generation = claim_file_->generation() + 1;
  Rows start = source();
  // Sized for the rows there are now, which may be many more than at the claim.
  KeyIndexSizes sizes = larger(growth_sizes_, claim_file_->next_sizes(start.rows));
  for (;;) {
    auto next = build(start.entries, start.rows, sizes, generation, &stop, &final_rows);
    if (stop.load()) return nullptr;
    if (next) sizes = next->sizes();  // Larger where a table filled up (build()).
    // Catch up without the lock while appends keep coming, so the part done under it is short.
    while (next) {
      const Rows now = source();
      if (stop.load()) return nullptr;
      if (outgrown(sizes, &final_rows)) {
        next.reset();
      } else if (now.rows < next->indexed_rows() + kTailRows ||
                 !next->index_rows(now.entries,
                                   std::min(now.rows, next->indexed_rows() + kBuildStepRows))) {
        return next;
      }
    }
    // Outgrown: again, at the sizes the rows of the end want.
    sizes = larger(sizes, claim_file_->next_sizes(final_rows.load()));
    start = source();
  }
}

bool KeyIndexHandle::finish_growth(std::shared_ptr<KeyIndexFile> next, const IndexEntry* entries,
                                   std::uint64_t committed,
                                   std::shared_ptr<const KeyIndexFile>& retired) {
  const std::uint64_t generation = load(key_generation_);
  bool again = false;
  if (next && claim_file_ && claim_file_->generation() == generation &&
      next->generation() == generation + 1) {
    // Appends went on during the build: the tables may need to grow again right away.
    again = !next->index_rows(entries, committed) || next->wants_growth();
    EMBSTORE_CRASH_POINT("before-key-index-switch");
    check_dir();
    next->publish_as_current(dir_);
    store(key_generation_, generation + 1);
    // Readers that mapped the old file keep it; new ones open the new one.
    os::remove_file(claim_file_->path());
    retired = current();
    set_current(std::move(next), "");
  } else if (claim_file_) {
    store(claim_file_->grow_claim_word(), 0);  // `next`, unpublished, goes with its last owner.
  }
  claimed_ = false;
  claim_file_.reset();
  return again && try_claim_growth();
}

}  // namespace embstore::detail
