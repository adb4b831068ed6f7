#include "embstore/writer.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string_view>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "embstore/error.h"
#include "format/format.h"
#include "index/background_indexer.h"
#include "index/store_keys.h"
#include "log/batch.h"
#include "log/commit.h"
#include "log/recovery.h"
#include "log/truncate.h"
#include "platform/lock.h"
#include "platform/os.h"
#include "platform/testing.h"
#include "platform/thread.h"
#include "storage/store_files.h"
#include "writer_internals.h"

namespace embstore {

using detail::IndexEntry;
using detail::StoreFiles;

// The smallest batch (bytes of rows) whose indexing an append leaves to its indexer thread
// (Writer::Impl::append()). Measured: batches of 1.5 MiB (512 x 768 float32) appended with p50
// ~20% lower; of 128 KiB (512 x 64) with p50 up to 2x higher. Between them, unmeasured.
inline constexpr std::uint64_t kIndexLaterMinBytes = 1024 * 1024;
// Such appends hand their rows to the indexer thread this many at a time: each post wakes the
// thread, and on these VMs a wake-up and the sleep after it cost about as much CPU as indexing
// the batch (bench/RESULTS.md, "The indexer woken every fourth append"). Lookups stay exact
// (rows past the watermark are scanned): at most 2 x 4 - 1 appends' rows past it.
inline constexpr std::uint64_t kIndexLaterAppends = 4;
// The sync thread waits at most this long between syncs, whatever sync_interval says (a longer
// one means none but close()'s, and its deadline would overflow the clock).
inline constexpr std::chrono::hours kLongestSyncInterval{24 * 365 * 100};

class Writer::Impl {
 public:
  Impl(std::unique_ptr<StoreFiles> files, const WriterOptions& options)
      : files_(std::move(files)),
        path_(files_->dir()),
        lock_(std::make_unique<detail::WriterLock>(path_ + "/" + detail::kLockFileName)),
        keys_lock_(std::make_unique<detail::WriterLock>(path_ + "/" + detail::kLockFileName,
                                                        detail::LockByte::kKeyIndex)),
        options_(options),
        owner_pid_(detail::os::current_pid()) {
    {
      detail::LockGuard guard(*lock_);
      const KeysGuard keys_guard(*this);
      // A truncate killed after deciding its switch: finish it before anything else; and the
      // files opened before the lock may be of a generation a truncate replaced since.
      detail::finish_switch(*files_);
      files_->follow_generation();
      followed_generation_ = files_->file_generation();
      allocate_files();
      files_->upgrade_header();
      keys_ = detail::make_key_index_handle(*files_, detail::os::Access::kReadWrite);
      keys_->set_expected_rows(std::min(options_.expected_rows, files_->budget_rows()));
      recover();
      files_->map_rows(files_->state().capacity());
      open_key_index();
      files_->remove_stale_files(files_->state().key_generation());
      last_end_.store(files_->state().committed(), std::memory_order_relaxed);
    }
    if (options_.sync == SyncPolicy::kInterval) {
      sync_thread_ = std::make_unique<std::thread>(detail::start_thread(
          path_ + ": the sync thread (SyncPolicy::kInterval)", [this] { sync_loop(); }));
    }
  }

  // Never runs in a forked child: Writer leaks its Impl there (release_impl below).
  ~Impl() {
    try {
      close();
    } catch (...) {
      // Destructors never throw; call close() to see a final sync's error.
    }
  }

  std::uint64_t append(std::span<const std::uint64_t> keys, const std::uint64_t* epochs,
                       std::uint64_t single_epoch, const ConstMatrix& rows,
                       detail::RowMemory memory = detail::RowMemory::kCallers);
  // Keeps rows [0, rows), or with `from_epoch`, the rows before the first whose epoch is at
  // least `rows`; returns the rows kept.
  std::uint64_t truncate(std::uint64_t rows, bool from_epoch);
  // `check_path`: throws check_still_at_path()'s error after the flush (an explicit sync()); the
  // sync thread's own syncs go on flushing whatever the path holds (a store moved away and
  // back, a retargeted symbolic link): no one would hear that error, and it is no failure.
  void sync(bool check_path = true);
  void close();
  // kNotFound unless the store opened is still at its path (StoreFiles::check_at_path()): an
  // explicit sync() and close() say so, since the rows they made durable are then in files
  // that path no longer reaches (deleted with the directory, or moved with it).
  void check_still_at_path() const;
  void rebuild_key_index() {
    std::shared_lock life(lifetime_);
    check_usable();
    with_writer_lock(Growth::kStop, [this] { rebuild_key_index_locked(); });
  }
  void rebuild_key_index_locked() {
    const KeysGuard keys_guard(*this);
    if (!files_->layout().key_index) {
      throw Error(ErrorCode::kInvalidArgument,
                  path_ +
                      ": the store was created without a key index (create --no-key-index, "
                      "key_index=False): there is none to rebuild; lookups scan the offset index");
    }
    const std::uint64_t committed = files_->state().committed();
    files_->map_rows(committed);
    keys_->open_for_writer(files_->entry_ptr(0), committed, /*rebuild=*/true);
    keys_usable_ = true;
  }
  // Runs f(files) with the store kept open for the call: a concurrent close() waits. For
  // accessors: a poisoned writer still reports its counters.
  template <typename F>
  auto with_files(F&& f) const {
    std::shared_lock life(lifetime_);
    check_open();
    return f(static_cast<const StoreFiles&>(*files_));
  }
  const std::string& path() const { return path_; }
  StoreInfo info(InfoDetail detail) {
    std::shared_lock life(lifetime_);
    check_open();
    if (detail == InfoDetail::kState) return files_->info();
    // The statistics count the rows this handle's appends left to the indexer as indexed.
    post_unposted(true);
    // The key statistics read the offset index through the mappings, which an append may
    // replace, and rows other processes committed may lie past them: under mutex_.
    const auto in_process = lock_ahead_of_appends();
    StoreInfo info = files_->info();
    if (keys_) {
      if (files_->mapped_rows() < info.committed_rows) files_->map_rows(info.committed_rows);
      detail::fill_key_info(*keys_, *files_, info.committed_rows, info);
    }
    return info;
  }
  bool in_owner_process() const { return detail::os::current_pid() == owner_pid_; }
  // Whether this handle looks like the store's one active writer, `committed` read now: its
  // last taking of the locks did not wait, nothing was committed since its last append, and no
  // thread of this handle and no other handle waits for the lock now. A hint, asked before the
  // lock by the two choices an append makes by it: where its rows are hashed (hash_at()) and who
  // indexes them (append()). The last check is a system call, made last.
  bool looks_alone(std::uint64_t committed) const {
    return !lock_waited_.load(std::memory_order_relaxed) &&
           committed == last_end_.load(std::memory_order_relaxed) &&
           waiting_threads_.load(std::memory_order_relaxed) == 0 && !lock_->others_waiting();
  }
  // Where the next append of the caller's large packed rows is hashed (log/batch.h, HashAt),
  // `alone` what looks_alone() says: read back from the page cache under the lock only while
  // the handle looks alone. Else before the lock, as writers that share the lock must: hashing
  // under it would serialize their hashes, and a writer that skips the copy is back for the
  // lock before a woken waiter can take it, starving the others (bench/RESULTS.md, "Hashing
  // what was written"). Hints only: either way stores the same bytes under checksums of them.
  static detail::HashAt hash_at(bool alone) {
    return alone ? detail::HashAt::kPageCache : detail::HashAt::kStaged;
  }
  // Where an append of `rows` is hashed: hash_at(), when HashAt decides for them at all
  // (hash_at_applies); else staged. Wherever the rows start in a page: from a source a few bytes
  // off where they land, the kernel's copy runs up to 10% slower, but staging them costs more
  // (bench/RESULTS.md, "Rows a few bytes into a page are read back too").
  detail::HashAt hash_at_for(const ConstMatrix& rows, detail::RowMemory memory, bool alone) const {
    return detail::hash_at_applies(files_->layout(), rows, memory) ? hash_at(alone)
                                                                   : detail::HashAt::kStaged;
  }
  // WriterInternals::set_index_later_min_bytes().
  void set_index_later_min_bytes(std::uint64_t bytes) { index_later_min_bytes_ = bytes; }
  // Asks the indexer thread to index the rows of the appends that left it their indexing but
  // did not post it yet (kIndexLaterAppends), and with `wait` waits until it has.
  void post_unposted(bool wait) {
    detail::BackgroundIndexer* indexer = indexer_.load();
    if (indexer == nullptr) return;
    if (appends_unposted_.exchange(0) > 0) indexer->post();
    if (wait) indexer->wait_idle();
  }
  // WriterInternals::background_index_runs().
  std::uint64_t background_index_runs() const {
    const detail::BackgroundIndexer* indexer = indexer_.load();
    return indexer != nullptr ? indexer->runs() : 0;
  }
  detail::HashAt next_hash_at() const {
    return with_files(
        [this](const StoreFiles& f) { return hash_at(looks_alone(f.state().committed())); });
  }
  detail::HashAt next_hash_at(const ConstMatrix& rows) const {
    return with_files([&](const StoreFiles& f) {
      return hash_at_for(rows, detail::RowMemory::kCallers, looks_alone(f.state().committed()));
    });
  }

 private:
  void check_open() const;    // Same process, not closed.
  void check_usable() const;  // check_open() and not poisoned.
  void flush();               // The sync itself; callers hold lifetime_ and have checked usability.
  void allocate_files();
  void recover();
  // How index_keys() takes the key index lock.
  enum class KeysWait {
    kBlock,       // Waits for it.
    kUnlessHeld,  // Not at all while another thread or handle holds it (index_keys()).
  };
  // What with_writer_lock() does with a key index growth running on growth_thread_.
  enum class Growth {
    kStop,         // Stops it: the call resets the key index handle (truncate, rebuild).
    kStopIfMoved,  // Leaves it running unless another handle truncated the store (append).
  };
  // Runs f() with mutex_ and the writer lock held, this handle on the store's current generation
  // (follow_truncate()) and no growth thread left that `growth` stops; returns what f returns.
  // f may release the writer lock early (lock_->release(): an append, before it indexes).
  // The caller holds lifetime_ shared and has called check_usable().
  template <typename F>
  std::invoke_result_t<F&> with_writer_lock(Growth growth, F&& f);
  // mutex_ and the writer lock held, no key index growth running: when another handle
  // truncated the store (or was killed switching it), finishes the switch and takes the new
  // generation's files and key index. True if the generation changed. A failure finishing the
  // switch (the header's flush) poisons this handle, as in truncate_locked(); any other failure
  // leaves the follow to be done again by the next call (followed_generation_).
  bool follow_truncate();
  // sync() and close(): follows another handle's truncate, so that a flush covers the rows
  // committed in the new generation's files, and the old files are let go.
  void follow_truncate_to_flush();
  // truncate() with mutex_ and the writer lock held and no key index growth running.
  std::uint64_t truncate_locked(std::uint64_t rows, bool from_epoch);
  // True when the state page names another generation than this handle's files, or when this
  // handle has not wholly taken its files' generation (a follow_truncate() that failed midway).
  bool generation_moved() const {
    const std::uint64_t files = files_->file_generation();
    return files_->state().generation_word() != files || followed_generation_.load() != files;
  }
  // Writer and key index locks held: opens, rebuilds or catches up the key index
  // (index/key_index_handle.h).
  // kFull leaves the store usable (this handle stops indexing, close() reports it); other
  // errors fail the open, unless `after_switch` (a truncate was done: its rows are in place,
  // so any error only stops this handle's indexing, as kFull does).
  void open_key_index(bool after_switch = false);
  // Records the first key index failure; this handle stops indexing (close() reports it).
  void key_index_failed(const Error& error);
  // The same for another exception (std::bad_alloc), as kIO; never throws (after a publish).
  void key_index_failed_noexcept(const std::exception& error) noexcept;
  // mutex_ held, the writer lock not: takes the key index lock and indexes every row committed
  // so far (this handle's appends' and any other writer's not indexed yet); true when a growth
  // was claimed. Opens or rebuilds the key index when another writer switched it or it is
  // damaged (index/key_index_handle.h, after_publish()).
  // With KeysWait::kUnlessHeld (an append) it returns at once, indexing nothing, while another
  // thread of this handle or another handle holds the key index lock. The rows are then indexed
  // by the next append of any handle, or by a close() (every indexing starts from the
  // watermark); sooner, as a rule: a call of this function that indexed every row it saw looks
  // at `committed` again after releasing the lock, and indexes once more what it finds.
  bool index_keys(KeysWait wait);
  // Every committed row is indexed in this handle's key index file (read without the lock: a
  // hint, for close()).
  bool all_indexed() const {
    const std::shared_ptr<const detail::KeyIndexFile> file = keys_->current();
    return file != nullptr && file->indexed_rows() >= files_->state().committed();
  }
  // The job of indexer_ (index/background_indexer.h), after an append: indexes every committed
  // row under the key index lock alone, as long as this handle's files and key index are the
  // store's current ones and the rows are mapped; anything else (rows another writer committed
  // past this handle's mappings, another generation, a damaged file, a growth to start) is done
  // by index_keys() and start_growth() under mutex_, as an append did before indexing left its
  // path. Never throws: a failure stops this handle's indexing (key_index_failed()).
  void index_in_background() noexcept;
  // mutex_ held, a growth claimed by this handle: starts growth_thread_ on grow_key_index().
  // Never throws (it runs after a commit, which must not): a thread that cannot start stops
  // this handle's indexing (key_index_failed()).
  void start_growth() noexcept;
  // Runs on growth_thread_: builds the larger key index without the lock, then switches to it.
  void grow_key_index();
  // Waits for the growth thread; `abandon` makes it stop early (drops the claim, builds nothing).
  void join_growth(bool abandon);
  // mutex_ for a short job beside the appends (the growth's switch, a flush's bookkeeping): an
  // append waits for it before it takes mutex_ (with_writer_lock()). std::mutex is not fair,
  // and a thread appending back to back holds mutex_ for all of each append but the moment
  // between two: a waiter woken by the unlock found it taken again, and a growth then switched
  // only when the appends ended (bench/RESULTS.md, "A growth no longer waits for the appends").
  std::unique_lock<std::mutex> lock_ahead_of_appends();
  void sync_loop();
  [[noreturn]] void poison(const Error& error);

  // Lock order, outermost first; a thread holding one may take only those after it:
  //   close_mutex_ -> sync_mutex_ -> lifetime_ -> mutex_ -> the OFD writer lock (lock_) ->
  //   keys_mutex_ -> the OFD key index lock (keys_lock_) -> poison_mutex_.
  // keys_mutex_ and keys_lock_ are always taken together (KeysGuard). An append commits under
  // mutex_ and lock_ and releases lock_; then it indexes under mutex_, keys_mutex_ and keys_lock_
  // (index_keys(); for an append only if both are free, else a later call indexes), or, for
  // a large batch of a writer alone, releases mutex_ too and hands the indexing to indexer_, whose
  // thread indexes under keys_mutex_ and keys_lock_ alone (index_in_background()). Either way the
  // indexing overlaps other writers' commits; the thread's overlaps this handle's next commit too.
  // The indexer's thread holds no lock when it takes mutex_ (through lock_ahead_of_appends(), for
  // what only index_keys() can do), and an append waits for the indexer (wait_idle()) holding
  // lifetime_ shared only. Whatever replaces key index files or changes key_generation (open,
  // truncate, following a truncate, rebuild, a growth's switch, an append that finds another
  // generation or a damaged file) holds both, lock_ first, as libraries before keys_lock_ did lock_
  // alone; a holder of keys_lock_ alone never waits for lock_ (index_keys() releases it first).
  // sync_loop holds sync_mutex_ across sync() (lifetime_ shared); close() releases sync_mutex_
  // and joins the sync thread before it takes lifetime_ exclusively. poison() runs from under
  // mutex_ and the OFD lock (a failed era flush) or under lifetime_ alone (a failed sync).
  // The key index growth thread takes mutex_ -> lock_ -> keys_lock_ to finish; close() joins it
  // before it takes lifetime_, and again after (an append in flight may have claimed another).
  // Appends, truncates and rebuilds take mutex_ -> lock_ through with_writer_lock(), which stops
  // a growth in their way before taking either. The growth reads the mappings without mutex_,
  // through StoreFiles::pin_generation(), whose own mutex is the innermost of all.
  // lock_ahead_of_appends() is taken holding at most lifetime_ (shared, or exclusive in close())
  // and sync_mutex_, never mutex_ or what an append holds: with_writer_lock() waits for it
  // holding lifetime_ shared only.
  std::unique_ptr<StoreFiles> files_;  // Released by close().
  std::string path_;
  std::unique_ptr<detail::WriterLock> lock_;       // Released by close().
  std::unique_ptr<detail::WriterLock> keys_lock_;  // Released by close().
  // Serializes this handle's threads on keys_lock_ (an OFD lock is its open file description's:
  // two threads of one handle would both hold it) and on the writer calls of keys_.
  std::mutex keys_mutex_;
  // keys_mutex_, then keys_lock_: the key index lock for one thread of this handle. With
  // KeysWait::kUnlessHeld, each only if free now (held() says): another thread of this handle
  // (its indexer) or another handle holds it otherwise.
  class KeysGuard {
   public:
    explicit KeysGuard(Impl& impl, KeysWait wait = KeysWait::kBlock)
        : in_process_(impl.keys_mutex_, std::defer_lock), across_(*impl.keys_lock_) {
      if (wait == KeysWait::kBlock) {
        in_process_.lock();
        across_.acquire();
        held_ = true;
      } else {
        held_ = in_process_.try_lock() && across_.try_acquire();
      }
    }
    ~KeysGuard() {
      if (held_) across_.release();
    }
    KeysGuard(const KeysGuard&) = delete;
    KeysGuard& operator=(const KeysGuard&) = delete;
    bool held() const { return held_; }

   private:
    std::unique_lock<std::mutex> in_process_;
    detail::WriterLock& across_;
    bool held_ = false;
  };
  WriterOptions options_;
  int owner_pid_;
  // Held shared by every call that uses files_, exclusively by close() to release them.
  mutable std::shared_mutex lifetime_;
  std::mutex close_mutex_;  // Serializes close() calls.
  std::mutex mutex_;        // Serializes appends of this handle's threads; the OFD lock serializes
                            // this handle against every other handle and process.
  // The last with_writer_lock() had to wait for mutex_ or the OFD lock (hash_at()).
  std::atomic<bool> lock_waited_{false};
  // The commit counter after this handle's last append (or at open): hash_at().
  std::atomic<std::uint64_t> last_end_{0};
  // Threads of this handle waiting in with_writer_lock() for mutex_ or the OFD lock: hash_at().
  std::atomic<int> waiting_threads_{0};
  std::atomic<bool> closed_{false};
  // Set by close() while it joins a growth and waits for lifetime_: calls begun meanwhile throw
  // kClosed instead of taking lifetime_ shared. The shared_mutex lets a new shared holder in
  // while close() waits for the exclusive one, so three threads appending back to back kept
  // close() waiting for as long as they appended.
  std::atomic<bool> closing_{false};
  std::atomic<bool> poisoned_{false};
  std::mutex poison_mutex_;
  std::string poison_message_;    // Written once, under poison_mutex_, before poisoned_ is set.
  std::uint64_t synced_era_ = 0;  // Highest era this handle has seen durable. Under mutex_.
  // The generation whose files, mapping and key index this handle has wholly taken (at open, by
  // a truncate, or by follow_truncate()). Written under mutex_ and the writer lock; read by
  // the sync thread without them.
  std::atomic<std::uint64_t> followed_generation_{0};
  int flushes_in_flight_ = 0;  // flush() calls using descriptors they took. Under mutex_.
  std::unique_ptr<detail::KeyIndexHandle> keys_;
  std::atomic<bool> keys_usable_{false};
  std::optional<Error> key_index_error_;        // Under poison_mutex_.
  std::unique_ptr<std::thread> growth_thread_;  // Under mutex_.
  // Threads in join_growth() that took growth_thread_ and have not seen it end. Under mutex_;
  // growth_joined_ is notified when it falls.
  int growth_joiners_ = 0;
  std::condition_variable growth_joined_;
  std::atomic<bool> stop_growth_{false};
  // 0 while this handle appends; close() sets it to the rows committed then, which a growth in
  // progress sizes itself for (KeyIndexHandle::build_next()).
  std::atomic<std::uint64_t> growth_final_rows_{0};
  // Threads that take mutex_ through lock_ahead_of_appends() and do not hold it yet.
  std::atomic<int> ahead_of_appends_{0};
  std::unique_ptr<std::thread> sync_thread_;
  std::mutex sync_mutex_;
  std::condition_variable sync_cv_;
  bool stop_sync_ = false;
  // Indexes the rows of appends on a thread of its own (index/background_indexer.h). Made by the
  // first append that leaves its indexing to it (under mutex_), published in indexer_ for the
  // threads that wait for it without mutex_; stopped by close() once the appends have ended.
  std::unique_ptr<detail::BackgroundIndexer> indexer_owner_;
  std::atomic<std::uint64_t> index_later_min_bytes_{kIndexLaterMinBytes};
  std::atomic<detail::BackgroundIndexer*> indexer_{nullptr};
  // Appends that left their rows to indexer_ since the last post (kIndexLaterAppends).
  std::atomic<std::uint64_t> appends_unposted_{0};
};

void Writer::Impl::check_usable() const {
  check_open();
  if (poisoned_.load(std::memory_order_acquire)) {
    throw Error(ErrorCode::kPoisoned, poison_message_);
  }
}

void Writer::Impl::check_open() const {
  if (detail::os::current_pid() != owner_pid_) {
    throw Error(ErrorCode::kForkedChild, path_ + ": this Writer was opened by process " +
                                             std::to_string(owner_pid_) +
                                             "; a forked child must open its own Writer");
  }
  if (closed_.load()) throw Error(ErrorCode::kClosed, path_ + ": the Writer is closed");
  if (closing_.load()) throw Error(ErrorCode::kClosed, path_ + ": the Writer is being closed");
}

// Runs under the writer lock at open, before anything is written through a mapping. A store
// copied or restored sparse (cp --sparse, rsync -S, tar -S, backup tools) has holes where rows
// and entries will be written; on a full disk a store through the mapping into a hole raises
// SIGBUS. Allocating every byte of the files now turns that into kFull here. posix_fallocate
// over ranges already allocated changes nothing and costs one extent walk.
void Writer::Impl::allocate_files() {
  const std::pair<int, const std::string*> files[] = {{files_->header_fd(), &files_->header_path()},
                                                      {files_->data_fd(), &files_->data_path()},
                                                      {files_->index_fd(), &files_->index_path()}};
  for (const auto& [fd, path] : files) {
    const std::uint64_t bytes = detail::os::file_size(fd, *path);
    if (bytes != 0) detail::os::allocate(fd, 0, bytes, *path);
  }
}

// Runs under the writer lock at open: the one recovery loader (log/recovery.h), applied. After
// a reboot the key index is rebuilt for the recovered rows before the boot id is stored.
void Writer::Impl::recover() {
  const detail::LoadedLog log = detail::load_log(*files_);
  auto rebuild_keys = [this](StoreFiles& files, std::uint64_t rows) {
    if (!files.layout().key_index) return;
    try {
      keys_->open_for_writer(files.entry_ptr(0), rows, /*rebuild=*/true);
    } catch (const Error& error) {
      if (error.code() != ErrorCode::kFull) throw;
      key_index_failed(error);  // Readers scan; the next writer rebuilds.
    }
  };
  if (detail::apply_recovery(*files_, log, rebuild_keys)) synced_era_ = files_->state().era();
}

bool Writer::Impl::follow_truncate() {
  if (!generation_moved()) return false;
  const KeysGuard keys_guard(*this);
  try {
    detail::finish_switch(*files_);  // Its truncating handle was killed after deciding it.
  } catch (const Error& error) {
    // The switch was decided: the header may say so on disk or not, and a later flush of it
    // would not prove the earlier one reached the disk.
    poison(error);
  }
  files_->follow_generation();
  if (flushes_in_flight_ == 0) files_->close_retired_fds();  // Else the last flush does.
  files_->map_rows(files_->state().capacity());
  keys_->reset_store_generation(files_->file_generation());
  open_key_index(/*after_switch=*/true);
  followed_generation_ = files_->file_generation();
  return true;
}

void Writer::Impl::follow_truncate_to_flush() {
  // The state page's word (a switching flag included) against what this handle followed: no
  // read of the files' fields, which another thread's follow changes under mutex_.
  if (files_->state().generation_word() != followed_generation_.load()) {
    with_writer_lock(Growth::kStopIfMoved, [] {});
  }
}

// Appends, truncates and rebuilds take the locks here, in the one order: mutex_, then the writer
// lock (a WriterLock is one thread's at a time: mutex_ serializes this handle's threads, the OFD
// lock every handle). A growth thread must not run while the key index handle is reset under it
// (a truncate, a rebuild, following another handle's truncate), and it is stopped before either
// lock is taken: it takes mutex_ and both locks to finish, so joining it under them would
// deadlock. Between that join and mutex_, another thread's append may claim a new growth:
// then the locks are dropped and the join is done again.
template <typename F>
std::invoke_result_t<F&> Writer::Impl::with_writer_lock(Growth growth, F&& f) {
  for (bool stop = growth == Growth::kStop;; stop = true) {
    if (stop) join_growth(/*abandon=*/true);
    class Waiting {  // Counted in waiting_threads_ until the locks are held (or a throw).
     public:
      explicit Waiting(std::atomic<int>& count) : count_(count) { ++count_; }
      Waiting(const Waiting&) = delete;
      Waiting& operator=(const Waiting&) = delete;
      ~Waiting() { done(); }
      void done() {
        if (counted_) --count_;
        counted_ = false;
      }

     private:
      std::atomic<int>& count_;
      bool counted_ = true;
    };
    Waiting waiting(waiting_threads_);
    for (int ahead; (ahead = ahead_of_appends_.load()) != 0;) ahead_of_appends_.wait(ahead);
    std::unique_lock in_process(mutex_, std::try_to_lock);
    const bool waited_here = !in_process.owns_lock();
    if (waited_here) in_process.lock();
    check_usable();
    // Interruptible: nothing is changed before f() runs (a Ctrl-C in Python ends the wait).
    detail::LockGuard across_processes(*lock_, /*interruptible=*/true);
    waiting.done();
    lock_waited_.store(waited_here || across_processes.waited(), std::memory_order_relaxed);
    if ((growth_thread_ || growth_joiners_ > 0) &&
        (growth == Growth::kStop || generation_moved())) {
      continue;
    }
    follow_truncate();
    return f();
  }
}

std::uint64_t Writer::Impl::truncate(std::uint64_t rows, bool from_epoch) {
  std::shared_lock life(lifetime_);
  check_usable();
  // A growth of this generation is of no use after the truncate.
  return with_writer_lock(Growth::kStop, [&] { return truncate_locked(rows, from_epoch); });
}

std::uint64_t Writer::Impl::truncate_locked(std::uint64_t rows, bool from_epoch) {
  // Held across the switch: the key_generation word and keys.K change with the generation.
  const KeysGuard keys_guard(*this);
  const std::uint64_t committed = files_->state().committed();
  std::uint64_t keep = rows;
  if (from_epoch) {
    files_->map_rows(committed);
    keep = committed;
    for (std::uint64_t row = 0; row < committed; ++row) {
      if (files_->entry_ptr(row)->epoch >= rows) {
        keep = row;
        break;
      }
    }
    // The cut row's epoch decides what is dropped: damaged (a flipped bit) into a later epoch,
    // every good row after it would go, and with them the evidence; checked before anything
    // changes. (A bit that makes an earlier row's epoch smaller keeps rows: nothing is lost,
    // and verify() names the row.)
    if (keep < committed && !files_->row_valid(keep)) {
      throw Error(ErrorCode::kCorruption,
                  path_ + ": truncate from epoch " + std::to_string(rows) + ": row " +
                      std::to_string(keep) + " (epoch " +
                      std::to_string(files_->entry_ptr(keep)->epoch) +
                      " in its index entry, the first row at or past that epoch) fails its "
                      "checksum, so its epoch cannot be trusted; nothing was dropped (embstore "
                      "verify and salvage name the damage)");
    }
  } else if (rows > committed) {
    throw Error(ErrorCode::kInvalidArgument, path_ + ": truncate to " + std::to_string(rows) +
                                                 " rows: the store holds only " +
                                                 std::to_string(committed) + " rows");
  }
  if (keep >= committed) return committed;
  files_->map_rows(committed);
  try {
    detail::truncate_log(*files_, keep);
  } catch (const Error& error) {
    // Before the switch was decided the store is unchanged, and the error is only reported;
    // after, a failed flush of the header poisons this handle (the next writer finishes it).
    if (files_->state().switching() || generation_moved()) poison(error);
    throw;
  }
  synced_era_ = files_->state().era();
  // The old files' descriptors: their disk space goes now, not at this handle's next sync or
  // close (a store truncated to reclaim space kept all of it). A flush using them closes them.
  if (flushes_in_flight_ == 0) files_->close_retired_fds();
  keys_->reset_store_generation(files_->file_generation());
  open_key_index(/*after_switch=*/true);
  followed_generation_ = files_->file_generation();
  return keep;
}

void Writer::Impl::open_key_index(bool after_switch) {
  if (!files_->layout().key_index) {  // Created without one: lookups scan; nothing to keep.
    keys_usable_ = false;
    return;
  }
  try {
    keys_->open_for_writer(files_->entry_ptr(0), files_->state().committed());
    keys_usable_ = true;
  } catch (const Error& error) {
    // No room to rebuild the key index: the store itself is fine, so the writer opens; lookups
    // scan, close() reports it, and the next writer rebuilds. Any other failure fails the open;
    // after a truncate's switch, whose rows are in place, it is reported as kFull is.
    if (error.code() != ErrorCode::kFull && !after_switch) throw;
    key_index_failed(error);
  }
}

void Writer::Impl::key_index_failed_noexcept(const std::exception& error) noexcept {
  try {
    key_index_failed(Error(ErrorCode::kIO, path_ + ": indexing keys: " + error.what()));
  } catch (...) {  // No memory for the message: indexing stops all the same.
    keys_usable_ = false;
  }
}

void Writer::Impl::key_index_failed(const Error& error) {
  keys_usable_ = false;
  std::lock_guard guard(poison_mutex_);
  if (!key_index_error_) key_index_error_.emplace(error);
}

bool Writer::Impl::index_keys(KeysWait wait) {
  if (!keys_usable_) return false;
  // Every committed row, not only this append's: a writer killed indexing may have left slots
  // naming rows up to its own commit, which index_rows() refuses past its bound; and rows of
  // writers that found this lock held are done once, here. The counter is read before the
  // generation word: a truncate stores the word (its switching flag) before the counters, so an
  // unchanged word means a counter of this handle's files. A truncate by this library holds the
  // key index lock; one by a library before it, the writer lock alone. If the store was
  // truncated, the truncating writer indexed the new generation; this handle follows at its next
  // append and indexes nothing now.
  auto committed_here = [this]() -> std::optional<std::uint64_t> {
    const std::uint64_t committed = files_->state().committed();
    if (generation_moved()) return std::nullopt;
    files_->map_rows(committed);
    return committed;
  };
  try {
    // Pass 2 indexes rows committed during pass 1 by handles that found the lock held and
    // returned (KeysWait::kUnlessHeld). Such a handle published its rows before its attempt
    // failed, which came before this release: the kernel orders both under the lock file's
    // lock, so the load of `committed` after the release sees them. (Other holders do not look
    // again: this handle's indexer thread, a pass stopped by a full table or a growth claim,
    // a writer of an earlier library. Their rows wait for the next append or close().)
    for (int pass = 1;; ++pass) {
      std::uint64_t indexed_to = 0;
      {
        const KeysGuard keys_guard(*this, pass == 1 ? wait : KeysWait::kUnlessHeld);
        if (!keys_guard.held()) return false;
        const std::optional<std::uint64_t> committed = committed_here();
        if (!committed) return false;
        const auto claimed = keys_->index_current(files_->entry_ptr(0), *committed);
        if (!claimed) break;  // Another generation, or a damaged file: below.
        if (*claimed) return true;
        indexed_to = *committed;
      }
      // Again only after pass 1, when more were committed meanwhile and this pass indexed every
      // row it saw (not stopped by a full table: the growth catches up then).
      if (pass == 2 || files_->state().committed() <= indexed_to) return false;
      const auto file = keys_->current();
      if (file == nullptr || file->indexed_rows() < indexed_to) return false;
    }
    // Another writer switched key index generations, or the file is damaged: opening or
    // rebuilding one replaces files, which is done under the writer lock too.
    detail::LockGuard across_processes(*lock_);
    const KeysGuard keys_guard(*this);
    const std::optional<std::uint64_t> committed = committed_here();
    if (!committed) return false;
    return keys_->after_publish(files_->entry_ptr(0), *committed);
  } catch (const Error& error) {
    // The rows are published: the append succeeded and must not throw (a retry would store them
    // twice). This handle stops indexing; close() reports it; the next writer indexes the rows.
    key_index_failed(error);
    return false;
  } catch (const std::exception& error) {  // std::bad_alloc, say: the same.
    key_index_failed_noexcept(error);
    return false;
  }
}

void Writer::Impl::index_in_background() noexcept {
  try {
    if (!keys_usable_) return;
    // Empty: not indexed here; true: indexed, and the tables want a growth nobody claimed.
    std::optional<bool> wants_more;
    {
      const KeysGuard keys_guard(*this);
      // Under the key index lock no truncate of this library switches generations, and this
      // handle follows one only holding keys_mutex_: the files, their mapping and keys_ agree.
      // The counter is read before the generation word (index_keys() says why).
      const std::shared_ptr<const detail::Generation> pinned = files_->pin_generation();
      const std::uint64_t committed = files_->state().committed();
      // Only every committed row at once: a writer killed indexing may have left slots naming
      // rows up to its commit, which index_rows() would take for damage below it.
      if (pinned && pinned->number() == files_->file_generation() && !generation_moved() &&
          pinned->mapped_rows() >= committed) {
        wants_more = keys_->index_current(pinned->entry_ptr(0), committed, /*claim=*/false);
      }
    }
    if (wants_more && !*wants_more) return;
    // A growth is claimed only here, under mutex_, by the call that starts it: a claim made
    // without mutex_ could be dropped by a truncate or rebuild, or followed by another, before
    // its thread was started.
    const auto in_process = lock_ahead_of_appends();
    if (index_keys(KeysWait::kBlock)) start_growth();
  } catch (const Error& error) {
    key_index_failed(error);  // Readers scan; the next writer indexes the rows.
  } catch (const std::exception& error) {
    key_index_failed_noexcept(error);
  }
}

void Writer::Impl::start_growth() noexcept {
  try {
    // A new claim means the last growth passed finish_growth() (under mutex_, held here): its
    // thread is exiting, at most releasing the file it replaced (1-2 ms) first.
    if (growth_thread_) growth_thread_->join();
    stop_growth_ = false;
    growth_thread_ = std::make_unique<std::thread>(
        detail::start_thread(path_ + ": a key index growth", [this] { grow_key_index(); }));
  } catch (const Error& error) {
    // Readers scan; close() reports it; the next writer indexes the rows.
    key_index_failed(error);
  } catch (const std::exception& error) {
    key_index_failed(
        Error(ErrorCode::kIO, path_ + ": starting a key index growth: " + error.what()));
  }
}

void Writer::Impl::grow_key_index() {
  for (bool again = true; again;) {
    // An append may map the files again at a larger Generation meanwhile: each call pins the
    // current one, and the build reads the entries of the one it holds, never more rows than
    // committed and mapped in it. (This handle follows no truncate while the growth runs:
    // with_writer_lock() stops it first.) Without mutex_, which a writer appending back to back
    // holds nearly all the time: a growth waiting for it started only when the appends ended
    // (at 768 floats a row, 240,000 rows after its claim), and close() waited for all of it.
    std::shared_ptr<const detail::Generation> pinned;
    auto source = [this, &pinned] {
      pinned = files_->pin_generation();
      return detail::KeyIndexHandle::Rows{
          pinned->entry_ptr(0), std::min(files_->state().committed(), pinned->mapped_rows())};
    };
    std::shared_ptr<detail::KeyIndexFile> next;
    // Released after the locks below (finish_growth()).
    std::shared_ptr<const detail::KeyIndexFile> retired;
    try {
      next = keys_->build_next(source, stop_growth_, growth_final_rows_);
    } catch (const Error& error) {
      key_index_failed(error);  // finish_growth(null) drops the claim.
      next.reset();
    }
    // The switch replaces files: under the writer lock too, as in every library version (the
    // part of it under the lock indexes at most a few thousand rows: build_next()).
    const auto in_process = lock_ahead_of_appends();
    try {
      detail::LockGuard across_processes(*lock_);
      const KeysGuard keys_guard(*this);
      if (generation_moved()) {
        // Truncated meanwhile: what was built indexes dropped rows. The next append follows.
        keys_->finish_growth(nullptr, nullptr, 0, retired);
        again = false;
        continue;
      }
      const std::uint64_t committed = files_->state().committed();
      files_->map_rows(committed);
      again = keys_->finish_growth(std::move(next), files_->entry_ptr(0), committed, retired) &&
              !stop_growth_;
    } catch (const Error& error) {
      key_index_failed(error);
      again = false;
    }
  }
}

std::unique_lock<std::mutex> Writer::Impl::lock_ahead_of_appends() {
  struct Ahead {  // Counted until mutex_ is held, or the lock throws.
    std::atomic<int>& count;
    explicit Ahead(std::atomic<int>& c) : count(c) { ++count; }
    ~Ahead() {
      --count;
      count.notify_all();
    }
  };
  const Ahead ahead(ahead_of_appends_);
  EMBSTORE_CRASH_POINT("ahead-of-appends");
  return std::unique_lock(mutex_);
}

void Writer::Impl::join_growth(bool abandon) {
  std::unique_ptr<std::thread> thread;
  {
    auto in_process = lock_ahead_of_appends();
    if (!growth_thread_) {
      // Another thread may be joining it: the growth runs until that join returns, and nothing
      // that it could be reading (the mappings, the key index handle) may change before.
      growth_joined_.wait(in_process, [this] { return growth_joiners_ == 0; });
      return;
    }
    thread = std::move(growth_thread_);
    stop_growth_ = abandon;
    ++growth_joiners_;
  }
  thread->join();
  {
    std::lock_guard in_process(mutex_);
    --growth_joiners_;
  }
  growth_joined_.notify_all();
}

std::uint64_t Writer::Impl::append(std::span<const std::uint64_t> keys, const std::uint64_t* epochs,
                                   std::uint64_t single_epoch, const ConstMatrix& rows,
                                   detail::RowMemory memory) {
  std::shared_lock life(lifetime_);
  check_usable();
  // Everything that does not need the row number happens before the lock; so does the hash,
  // unless this handle looks like the store's one active writer (hash_at_for()). Its indexing is
  // left to indexer_'s thread when the batch is large and the handle looks alone (and did not
  // wait for the locks below); else it indexes after the commit, as before that thread existed:
  // for short batches, and with several writers on few cores, the thread's wake-ups and polls
  // cost more than the overlap gains (bench/RESULTS.md, "Indexing off the append's path"). One
  // look (looks_alone(), a system call) serves both choices, made only for batches they concern.
  const bool may_index_later =
      files_->layout().key_index &&
      rows.rows * files_->layout().record_bytes >= index_later_min_bytes_.load();
  const bool alone = (may_index_later || detail::hash_at_applies(files_->layout(), rows, memory)) &&
                     looks_alone(files_->state().committed());
  const detail::PreparedBatch batch =
      detail::prepare_batch(files_->layout(), files_->hash_key(), files_->dir(), keys, epochs,
                            single_epoch, rows, memory, hash_at_for(rows, memory, alone));
  if (batch.rows == 0) return files_->state().committed();
  // A growth of this generation keeps running beside the append; with_writer_lock() follows
  // another handle's truncate first, so rows never go into the old generation's files.
  bool index_later = false;
  const std::uint64_t first = with_writer_lock(Growth::kStopIfMoved, [&] {
    // The thread is made before the commit: once the rows are published the append must not
    // throw (a retry would store them twice).
    index_later = may_index_later && alone && !lock_waited_.load(std::memory_order_relaxed);
    if (index_later && !indexer_owner_) {
      try {
        indexer_owner_ = std::make_unique<detail::BackgroundIndexer>(
            path_ + ": the indexer thread", [this] { index_in_background(); });
        indexer_.store(indexer_owner_.get());
      } catch (const Error&) {
        // A thread only saves the appending thread the indexing: it indexes these rows itself,
        // as it does a short batch's (and asks again at the next large batch).
        index_later = false;
      }
    }
    const std::uint64_t at = detail::commit_batch(*files_, batch, synced_era_,
                                                  [this](const Error& error) { poison(error); });
    last_end_.store(at + batch.rows, std::memory_order_relaxed);
    // The rows are published: other writers may commit while this one's are indexed, and
    // readers waiting for rows need not wait for it.
    lock_->release();
    detail::os::futex_wake_all(files_->state().committed_word());
    if (!index_later && index_keys(KeysWait::kUnlessHeld)) start_growth();
    return at;
  });
  if (index_later && keys_usable_.load() &&
      appends_unposted_.fetch_add(1) + 1 >= kIndexLaterAppends) {
    // Every kIndexLaterAppends-th such append: the rows of the run posted before are indexed
    // by now, so the indexing never falls further behind than 2 x kIndexLaterAppends - 1
    // appends; these are indexed while the caller goes on (index/background_indexer.h). Outside
    // mutex_, which the indexer's run may take. sync(), info() and close() post what is left.
    appends_unposted_.store(0);
    detail::BackgroundIndexer* indexer = indexer_.load();
    indexer->wait_idle();
    indexer->post();
  }
  // Outside the locks: this writer's flush need not hold other writers up.
  if (options_.sync == SyncPolicy::kEveryAppend) flush();
  return first;
}

void Writer::Impl::poison(const Error& error) {
  std::lock_guard guard(poison_mutex_);
  if (!poisoned_.load()) {
    poison_message_ =
        path_ + ": writer refuses further writes until reopened: " + std::string(error.what());
    poisoned_.store(true, std::memory_order_release);
  }
  throw Error(ErrorCode::kPoisoned, poison_message_, error.sys_errno());
}

void Writer::Impl::sync(bool check_path) {
  std::shared_lock life(lifetime_);
  check_usable();
  // The key index is never flushed; the rows left to the indexer are indexed soon after.
  post_unposted(false);
  follow_truncate_to_flush();
  flush();
  if (check_path) check_still_at_path();
}

void Writer::Impl::check_still_at_path() const {
  if (files_->at_path()) return;
  throw Error(ErrorCode::kNotFound,
              path_ +
                  ": the store this Writer appends to is no longer at this path (deleted, moved "
                  "away, or replaced by another): its rows are in its files, wherever they are "
                  "now, and gone with them if they were deleted",
              ENOENT);
}

void Writer::Impl::flush() {
  auto& state = files_->state();
  // The files of this handle's generation as of now: a truncate (followed by an append of this
  // handle) may switch them, but keeps the old descriptors open, so these stay valid.
  int data_fd, index_fd;
  std::string data_path, index_path;
  std::uint64_t generation;
  // The descriptors of generations followed meanwhile are closed when no flush uses them.
  struct InFlight {
    Impl& impl;
    ~InFlight() {
      const auto in_process = impl.lock_ahead_of_appends();
      if (--impl.flushes_in_flight_ == 0) impl.files_->close_retired_fds();
    }
  };
  {
    const auto in_process = lock_ahead_of_appends();
    ++flushes_in_flight_;
    generation = files_->file_generation();
    data_fd = files_->data_fd();
    index_fd = files_->index_fd();
    data_path = files_->data_path();
    index_path = files_->index_path();
  }
  const InFlight in_flight{*this};
  const std::uint64_t committed = state.committed();
  try {
    // The index file's writeback is started first, so that it runs while the data file is
    // flushed (5-10% more appends with sync on every append, in same-moment ratios:
    // bench/RESULTS.md, "Sync on every append"). Both flushes finish before durable is raised
    // and the header flushed: the order a power cut can observe is unchanged.
    detail::os::start_writeback(index_fd);
    detail::os::datasync(data_fd, data_path);
    detail::os::datasync(index_fd, index_path);
    EMBSTORE_CRASH_POINT("mid-sync");
    {
      // Rows counted in `committed` are durable only if they are in the files just flushed:
      // the generation must not have changed since this began (it only grows), which a
      // truncate, holding the writer lock, cannot do while this holds it.
      const auto in_process = lock_ahead_of_appends();
      detail::LockGuard across_processes(*lock_);
      if (state.generation_word() == generation) state.raise_durable(committed);
    }
    detail::os::datasync(files_->header_fd(), files_->header_path());
  } catch (const Error& error) {
    // Never retried: after a failed flush the kernel may have dropped the dirty pages, so a
    // later success would not mean the rows are on disk.
    poison(error);
  }
}

void Writer::Impl::sync_loop() {
  std::unique_lock guard(sync_mutex_);
  while (!stop_sync_) {
    // At most a century: wait_for() adds the interval to the clock's now, which overflows for
    // an interval near milliseconds::max() (a deadline in the past: the thread spun).
    sync_cv_.wait_for(
        guard, std::min<std::chrono::milliseconds>(options_.sync_interval, kLongestSyncInterval),
        [this] { return stop_sync_; });
    if (stop_sync_) break;
    try {
      // An idle store costs nothing: no flush when every committed row is already durable.
      // Nor when another handle's truncate left this one on the old files: it follows then,
      // letting their disk space go.
      const bool idle = with_files([this](const StoreFiles& files) {
        return files.state().durable() >= files.state().committed() &&
               files.state().generation_word() == followed_generation_.load();
      });
      if (!idle) sync(/*check_path=*/false);
    } catch (const Error&) {
      // Poisoned: the next append or close reports it. Else (following another handle's
      // truncate failed: a mapping, a descriptor) the next interval tries again.
      if (poisoned_.load()) return;
    }
  }
}

void Writer::Impl::close() {
  if (!in_owner_process()) return;
  std::lock_guard closing(close_mutex_);
  if (closed_.load()) return;
  if (sync_thread_) {
    {
      std::lock_guard guard(sync_mutex_);
      stop_sync_ = true;
    }
    sync_cv_.notify_all();
    sync_thread_->join();  // Before lifetime_ is taken: its sync() holds lifetime_ shared.
    sync_thread_.reset();
  }
  // Calls from here on throw kClosed; those in flight finish first. Before the growth is joined:
  // a growth catching up with threads that go on appending never finished (seen under TSan).
  closing_ = true;
  // A growth in progress is finished, so the next writer does not redo it under the lock; at the
  // size the rows stored now want (one build, not one at the size claimed and then a larger).
  growth_final_rows_ = std::max<std::uint64_t>(files_->state().committed(), 1);
  EMBSTORE_CRASH_POINT("close-joins-growth");
  join_growth(/*abandon=*/false);
  std::unique_lock life(lifetime_);  // Waits for appends and syncs in flight.
  // Calls that come now wait for lifetime_ and then find closed_; the flush below runs
  // with_writer_lock(), whose check must not take this close() for another.
  closing_ = false;
  // Indexes what the last appends left to it (its run may take mutex_, free now).
  if (indexer_owner_) indexer_owner_->stop();
  if (!poisoned_.load() && keys_usable_.load() && !all_indexed()) {
    // Rows appends left unindexed because another thread or handle held the key index lock
    // (this handle's, or another's while this one held it: index_keys()).
    const auto in_process = lock_ahead_of_appends();
    if (index_keys(KeysWait::kBlock)) start_growth();
  }
  // The indexer, or the call above, may have claimed another growth meanwhile (the indexer
  // never takes lifetime_).
  join_growth(/*abandon=*/false);
  std::exception_ptr final_error;
  if (options_.sync != SyncPolicy::kNone) {
    try {
      if (poisoned_.load()) throw Error(ErrorCode::kPoisoned, poison_message_);
      follow_truncate_to_flush();
      flush();
    } catch (...) {
      final_error = std::current_exception();
    }
  }
  if (!final_error) {
    try {
      check_still_at_path();
    } catch (...) {
      final_error = std::current_exception();
    }
  }
  {
    std::lock_guard guard(poison_mutex_);
    if (!final_error && key_index_error_) {
      final_error = std::make_exception_ptr(
          Error(key_index_error_->code(),
                path_ + ": the key index could not be maintained (" + key_index_error_->what() +
                    "); every row is stored, lookups scan the unindexed ones until the next "
                    "writer indexes them",
                key_index_error_->sys_errno()));
    }
  }
  closed_ = true;
  keys_.reset();
  keys_lock_.reset();
  lock_.reset();
  files_.reset();
  if (final_error) std::rethrow_exception(final_error);
}

// ---- Writer -------------------------------------------------------------------------------

int current_process_id() noexcept { return detail::os::current_pid(); }

Writer::Writer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Writer::Writer(Writer&&) noexcept = default;

namespace {
// In a forked child the Impl is leaked, never destroyed: its mutexes, condition variable and
// threads are the parent's copies (a copied waiter makes pthread_cond_destroy hang), and the
// parent's lock must not be touched. The child's copy of the lock descriptor is already closed.
void release_impl(std::unique_ptr<Writer::Impl>& impl) noexcept;
}  // namespace

Writer& Writer::operator=(Writer&& other) noexcept {
  if (this != &other) {
    release_impl(impl_);
    impl_ = std::move(other.impl_);
  }
  return *this;
}

Writer::~Writer() { release_impl(impl_); }

Writer::Impl& Writer::impl() const {
  // A moved-from Writer has no Impl: its calls are refused rather than dereference null.
  if (!impl_) {
    throw Error(ErrorCode::kClosed, "this Writer was moved from; use the Writer it was moved to");
  }
  return *impl_;
}

namespace {
void check_epoch_count(const std::string& path, std::uint64_t epochs, std::uint64_t rows) {
  if (epochs != rows) {
    throw Error(ErrorCode::kInvalidArgument, path + ": append: " + std::to_string(epochs) +
                                                 " epochs for " + std::to_string(rows) + " rows");
  }
}

void release_impl(std::unique_ptr<Writer::Impl>& impl) noexcept {
  if (impl && !impl->in_owner_process()) {
    (void)impl.release();
    return;
  }
  impl.reset();
}
}  // namespace

namespace {
struct RemoteFileSystem {
  std::uint64_t magic;
  const char* name;
};
// statfs f_type values (linux/magic.h and the vendors' own) of file systems whose pages are
// not one page cache shared by every process that maps them.
constexpr RemoteFileSystem kRemoteFileSystems[] = {
    {0x6969, "NFS"},          {0x517B, "SMB"},      {0xFF534D42, "CIFS"},   {0xFE534D42, "SMB2"},
    {0x65735546, "FUSE"},     {0x01021997, "9p"},   {0x0BD00BD0, "Lustre"}, {0x47504653, "GPFS"},
    {0x00C36400, "CephFS"},   {0x5346414F, "AFS"},  {0x6B414653, "AFS"},    {0x73757245, "Coda"},
    {0x7461636F, "OCFS2"},    {0x01161970, "GFS2"}, {0x19830326, "BeeGFS"}, {0xAAD7AAEA, "PanFS"},
    {0x20030528, "OrangeFS"}, {0x564C, "NCP"},
};
}  // namespace

// Writers publish rows through shared mappings, a shared futex and OFD locks: on these file
// systems another machine (or the FUSE daemon) sees none of them coherently, so concurrent
// writers could corrupt the store and readers could see torn rows.
void Writer::check_filesystem(const std::string& path, const WriterOptions& options) {
  if (options.allow_remote_filesystem) return;
  const char* allow = std::getenv("EMBSTORE_ALLOW_REMOTE_FS");
  if (allow != nullptr && std::string_view(allow) == "1") return;
  const std::uint64_t magic = detail::os::filesystem_magic(path);
  for (const auto& fs : kRemoteFileSystems) {
    if (fs.magic != magic) continue;
    char hex[32];
    std::snprintf(hex, sizeof hex, "0x%llx", static_cast<unsigned long long>(magic));
    throw Error(ErrorCode::kInvalidArgument,
                path + ": refusing to write a store on " + fs.name + " (statfs f_type " + hex +
                    "): writers need a local file system, because shared mappings, futexes and "
                    "OFD locks are not coherent across machines. Put each node's store on "
                    "node-local disk (read them together with ShardSet), or force with "
                    "WriterOptions::allow_remote_filesystem / EMBSTORE_ALLOW_REMOTE_FS=1 if "
                    "only this machine ever writes or maps it.");
  }
}

namespace {
void check_writer_options(const std::string& path, const WriterOptions& options) {
  // An enum from an integer (a binding, a cast) can hold any value: one the policy switches do
  // not know would silently sync like none of them.
  if (options.sync != SyncPolicy::kNone && options.sync != SyncPolicy::kEveryAppend &&
      options.sync != SyncPolicy::kInterval) {
    throw Error(ErrorCode::kInvalidArgument,
                path + ": WriterOptions::sync " + std::to_string(static_cast<int>(options.sync)) +
                    " is not a SyncPolicy (0 kNone, 1 kEveryAppend, 2 kInterval)");
  }
  if (options.sync == SyncPolicy::kInterval && options.sync_interval.count() <= 0) {
    throw Error(ErrorCode::kInvalidArgument,
                path + ": sync_interval must be positive with SyncPolicy::kInterval");
  }
  (void)detail::resolve_map_bytes(options.map_bytes, path);  // Throws naming what is wrong.
  if (options.expected_rows > detail::kMaxRows) {
    throw Error(ErrorCode::kInvalidArgument, path + ": WriterOptions::expected_rows " +
                                                 std::to_string(options.expected_rows) +
                                                 " exceeds the 2^40 rows a store can hold");
  }
}

// create() and open_or_create(): the dim and dtype a caller expects must be those it creates.
void check_expectations(const std::string& path, const CreateOptions& create_options,
                        const WriterOptions& options) {
  if (options.expect_dim && *options.expect_dim != create_options.dim) {
    throw Error(ErrorCode::kInvalidArgument,
                path + ": WriterOptions::expect_dim " + std::to_string(*options.expect_dim) +
                    " but CreateOptions::dim " + std::to_string(create_options.dim));
  }
  if (options.expect_dtype && *options.expect_dtype != create_options.dtype) {
    throw Error(ErrorCode::kInvalidArgument, path + ": WriterOptions::expect_dtype " +
                                                 std::string(dtype_name(*options.expect_dtype)) +
                                                 " but CreateOptions::dtype " +
                                                 std::string(dtype_name(create_options.dtype)));
  }
}
}  // namespace

Writer Writer::create(const std::string& path, const CreateOptions& create_options,
                      const WriterOptions& options) {
  // Before the store is made: options open() would refuse must not leave a new store behind.
  check_writer_options(path, options);
  check_expectations(path, create_options, options);
  check_filesystem(path, options);
  create_store(path, create_options);
  try {
    return open(path, options);
  } catch (const Error& error) {
    // Not removed: another process may have opened it already. A retry of create() would
    // find it there (kAlreadyExists) without this.
    throw Error(error.code(),
                std::string(error.what()) + " (the store was created at " +
                    detail::strip_trailing_slashes(path) +
                    ", empty, but not opened: Writer::open() or open_or_create() opens it)",
                error.sys_errno());
  }
}

Writer Writer::open(const std::string& path, const WriterOptions& options) {
  check_writer_options(path, options);
  check_filesystem(path, options);
  auto files = StoreFiles::open(path, detail::os::Access::kReadWrite, options.map_bytes);
  files->set_huge_pages(options.huge_pages);
  // Its zeros (log/commit.cc) made now, on the opening thread, not first by an append that a
  // fork on another thread could catch half-way.
  if (options.huge_pages) (void)detail::os::zeros();
  const auto& layout = files->layout();
  if (layout.format_minor > detail::kFormatMinor) {
    // Read, but not written: a later minor may add rules its writers keep (FORMAT.md).
    throw Error(ErrorCode::kUnsupportedVersion,
                files->dir() + ": the store is of format 1." + std::to_string(layout.format_minor) +
                    ", newer than this library's 1." + std::to_string(detail::kFormatMinor) +
                    ": it reads the store but does not write to it (open it with a newer library)");
  }
  if (options.expect_dim && *options.expect_dim != layout.dim) {
    throw Error(ErrorCode::kFormatMismatch, files->dir() + ": the store's dim is " +
                                                std::to_string(layout.dim) + ", not the expected " +
                                                std::to_string(*options.expect_dim));
  }
  if (options.expect_dtype && *options.expect_dtype != layout.dtype) {
    throw Error(ErrorCode::kFormatMismatch,
                files->dir() + ": the store's dtype is " + std::string(dtype_name(layout.dtype)) +
                    ", not the expected " + std::string(dtype_name(*options.expect_dtype)));
  }
  return Writer(std::make_unique<Impl>(std::move(files), options));
}

Writer Writer::open_or_create(const std::string& path, const CreateOptions& create_options,
                              const WriterOptions& options) {
  check_expectations(path, create_options, options);
  WriterOptions checked = options;
  checked.expect_dim = create_options.dim;
  checked.expect_dtype = create_options.dtype;
  // Racing processes: create_store serializes them on the path's create lock; the first
  // creates, the others find the store there and open it.
  for (int attempt = 0;; ++attempt) {
    try {
      return open(path, checked);
    } catch (const Error& error) {
      if (error.code() != ErrorCode::kNotFound || attempt >= 2) throw;
    }
    try {
      create_store(path, create_options);
    } catch (const Error& error) {
      // Whatever failed (a full disk, say), a store that exists now is one to open. "Already
      // exists" goes back to open() too, which names what is there if it is not a store.
      if (error.code() != ErrorCode::kAlreadyExists &&
          !detail::os::exists(detail::strip_trailing_slashes(path) + "/" +
                              detail::kHeaderFileName)) {
        throw;
      }
    }
  }
}

std::uint64_t Writer::append(std::span<const std::uint64_t> keys, std::uint64_t epoch,
                             const ConstMatrix& rows) {
  return impl().append(keys, nullptr, epoch, rows);
}

std::uint64_t Writer::append(std::span<const std::uint64_t> keys,
                             std::span<const std::uint64_t> epochs, const ConstMatrix& rows) {
  check_epoch_count(impl().path(), epochs.size(), rows.rows);
  return impl().append(keys, epochs.data(), 0, rows);
}

std::uint64_t detail::WriterInternals::append_private(Writer& writer,
                                                      std::span<const std::uint64_t> keys,
                                                      std::span<const std::uint64_t> epochs,
                                                      std::uint64_t epoch,
                                                      const ConstMatrix& rows) {
  if (!epochs.empty()) check_epoch_count(writer.path(), epochs.size(), rows.rows);
  return writer.impl().append(keys, epochs.empty() ? nullptr : epochs.data(), epoch, rows,
                              RowMemory::kPrivate);
}

bool detail::WriterInternals::hashes_before_lock(const Writer& writer) {
  return writer.impl().next_hash_at() == HashAt::kStaged;
}

bool detail::WriterInternals::hashes_before_lock(const Writer& writer, const ConstMatrix& rows) {
  return writer.impl().next_hash_at(rows) == HashAt::kStaged;
}

std::uint64_t detail::WriterInternals::background_index_runs(const Writer& writer) {
  return writer.impl().background_index_runs();
}

void detail::WriterInternals::set_index_later_min_bytes(Writer& writer, std::uint64_t bytes) {
  writer.impl().set_index_later_min_bytes(bytes);
}

std::uint64_t Writer::append(std::span<const std::uint64_t> keys, std::uint64_t epoch,
                             std::span<const float> values) {
  const std::uint32_t d = impl().with_files([](const StoreFiles& f) { return f.layout().dim; });
  // Not values.size() != keys.size() * d: the product wraps (2^40 keys of dim 2^24 would match
  // 0 floats). d is at least 1.
  if (values.size() % d != 0 || values.size() / d != keys.size()) {
    throw Error(ErrorCode::kInvalidArgument,
                impl().path() + ": append: " + std::to_string(values.size()) + " floats is not " +
                    std::to_string(keys.size()) + " keys x dim " + std::to_string(d));
  }
  return impl().append(keys, nullptr, epoch,
                       ConstMatrix{values.data(), DType::kFloat32, keys.size(), d, 0});
}

void Writer::sync() { impl().sync(); }
void Writer::rebuild_key_index() { impl().rebuild_key_index(); }
void Writer::close() {
  if (impl_) impl_->close();  // Moved from: holds nothing to close.
}
std::uint64_t Writer::committed_rows() const {
  return impl().with_files([](const StoreFiles& f) { return f.state().committed(); });
}
std::uint64_t Writer::truncate(std::uint64_t rows) { return impl().truncate(rows, false); }
std::uint64_t Writer::truncate_from_epoch(std::uint64_t epoch) {
  return impl().truncate(epoch, true);
}
std::uint64_t Writer::durable_rows() const {
  return impl().with_files([](const StoreFiles& f) { return f.state().durable(); });
}
std::uint32_t Writer::dim() const {
  return impl().with_files([](const StoreFiles& f) { return f.layout().dim; });
}
DType Writer::dtype() const {
  return impl().with_files([](const StoreFiles& f) { return f.layout().dtype; });
}
const std::string& Writer::path() const { return impl().path(); }
StoreInfo Writer::info(InfoDetail detail) const { return impl().info(detail); }

}  // namespace embstore
