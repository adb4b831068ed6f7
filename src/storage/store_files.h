// store_files.h — one open store: its validated header, shared state page, and the current
// Generation (generation.h), the data and index files mapped inside a reservation sized to the
// store. Shared by Writer and Reader.
//
// Address space: a Generation reserves about twice the rows the files hold (a power of two),
// capped by map_bytes, so thousands of stores fit in one process. A store that outgrows it is
// mapped again at a larger Generation; for a Reader the new one pins the old (views taken before
// stay valid), a Writer hands out no pointers and drops it.
// Descriptors: a Writer keeps its three files open; a Reader keeps none (it maps the state page,
// then opens the data and index files by path only while it maps or sizes them), so RLIMIT_NOFILE
// does not bound the number of open Readers.
//
// Lifetime: the mappings live as long as the StoreFiles object; Readers hold it in a shared_ptr
// so views can outlive the Reader. Not thread-safe for map_rows(), grow_to() and
// follow_generation() (which changes file_generation() and the files' paths and descriptors);
// callers serialize them with every other call (the Writer under its mutex, the Reader by
// contract: refresh() runs alone). The layout, the state page and pin_generation() are safe
// from any thread.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "embstore/options.h"
#include "embstore/store.h"
#include "format/checksum.h"
#include "format/format.h"
#include "platform/os.h"
#include "storage/generation.h"
#include "storage/state.h"

namespace embstore::detail {

// The address-space budget for a store's mappings: `requested`, or $EMBSTORE_MAP_BYTES, or
// kDefaultMapBytes. Throws kInvalidArgument for an unparsable environment value.
std::uint64_t resolve_map_bytes(std::uint64_t requested, const std::string& where);
// What a kFull error past that budget asks to raise, as the caller set it: "reopen with a larger
// map_bytes" for a `requested` other than 0; "raise EMBSTORE_MAP_BYTES (now N)" for a budget
// read from it (the command-line tool's only way); both for the default.
std::string map_bytes_advice(std::uint64_t requested);

// The first allocation of a new store's data and index files together (FORMAT.md "File sizes").
inline constexpr std::uint64_t kFirstAllocationBytes = 64 << 10;

// The capacity, in rows, to allocate when at least `rows` rows must fit (FORMAT.md "File
// sizes"): the two files together double from kFirstAllocationBytes up to one segment, then grow
// to the rows needed plus a step of about one segment, less the header file (`header_bytes`) and
// four pages. At least max(rows, 1); no allocation or overflow check.
std::uint64_t capacity_for(std::uint64_t rows, std::uint64_t record_bytes,
                           std::uint64_t segment_bytes, std::uint64_t header_bytes);

// `path` without trailing slashes ("/" stays "/"): the store's name in every message.
std::string strip_trailing_slashes(std::string path);

// An error's `message` (errno `err`, 0 if none) met while making `subject`, said with `subject`
// and the cause first: "SUBJECT: DOING: CAUSE (MESSAGE without its ': CAUSE')", CAUSE the
// errno's text, or "SUBJECT: DOING: MESSAGE" without an errno. The one wording of an error about
// a hidden file the user never named (create_store's staging directory, a StagedOutput's
// working directory): the path the user asked for first, that file only in parentheses.
std::string cause_first(const std::string& subject, const std::string& doing,
                        const std::string& message, int err);

// What StoreFiles::open does when the state page's `generation` is damaged: outside 1..10^9, or
// naming files rows.G and index.G of which neither exists.
enum class DamagedGeneration {
  kRefuse,  // kCorruption naming the field.
  // For salvage: opens the files of the one generation the directory holds, when it holds
  // exactly one rows.X/index.X pair, and says so in generation_damage(); refuses otherwise.
  kUseOnlyPair,
};

class StoreFiles {
 public:
  // Opens and validates `dir`. Maps nothing of the data files yet. Throws kNotFound for a path
  // that is not a store, kUnsupportedVersion, kCorruption naming the file and field.
  static std::unique_ptr<StoreFiles> open(
      const std::string& dir, os::Access access, std::uint64_t map_bytes,
      DamagedGeneration damaged_generation = DamagedGeneration::kRefuse);
  ~StoreFiles();
  StoreFiles(const StoreFiles&) = delete;
  StoreFiles& operator=(const StoreFiles&) = delete;

  const Layout& layout() const { return layout_; }
  const RowHashKey& hash_key() const { return hash_key_; }
  SharedState& state() { return state_; }
  const SharedState& state() const { return state_; }
  // The store's directory as opened, made absolute (relative to the working directory then).
  const std::string& dir() const { return dir_; }
  const std::string& data_path() const { return data_path_; }
  const std::string& index_path() const { return index_path_; }
  const std::string& header_path() const { return header_path_; }
  // Throws kNotFound unless the store at dir() is still the one opened: not deleted and created
  // again, moved away, or replaced by another renamed onto it, which has files of the same
  // names. Decided by the header file's identity (the state page's mapping keeps the opened
  // one in existence, so no other file can have it). Called before every use of a file of the
  // store by its name after open (the one rule; DESIGN-NOTES "What a handle holds by name"):
  // a Reader's opens (open_by_path()), and a Writer's opens, creates and removes (a truncate,
  // its stale files, the key index's builds and publishes through KeyIndexHandle), so that a
  // handle of a store removed under it never reads, replaces or removes another store's files.
  void check_at_path() const;
  // The test check_at_path() makes, without the exception (a Writer's sync() and close()).
  bool at_path() const;
  // Opens one of the store's files by path (a Reader keeps no descriptor of them), refusing it
  // with kNotFound (check_at_path(), after the open) when the store at the path is no longer
  // the one opened.
  int open_by_path(const std::string& path) const;
  // Writer only (a Reader's are closed: -1).
  int data_fd() const { return data_fd_; }
  int index_fd() const { return index_fd_; }
  int header_fd() const { return header_fd_; }

  // The most rows map_bytes lets the store's mappings hold.
  std::uint64_t budget_rows() const { return budget_rows_; }
  // The generation whose files (rows.<G>, index.<G>) this object opened; the state page may
  // name a newer one after a truncate (follow_generation()).
  std::uint64_t file_generation() const { return file_generation_; }
  // Rows the current mappings of file_generation()'s files cover.
  std::uint64_t mapped_rows() const {
    return generation_ && generation_->number() == file_generation_ ? generation_->mapped_rows()
                                                                    : 0;
  }
  // The current mappings (null before the first map_rows()); changes when map_rows() remaps.
  const Generation* generation() const { return generation_.get(); }
  // The current mappings, kept mapped for as long as the caller holds them. Safe from any
  // thread, beside map_rows() on another: a Writer's key index growth reads entries without the
  // Writer's mutex while its appends map more rows or a larger Generation (it takes
  // pin_mutex_, which the appends hold only for the moment they replace the pointer).
  std::shared_ptr<const Generation> pin_generation() const;
  // Maps both files far enough to cover `rows` rows, at a larger Generation if the current
  // reservation is too small. Checks the files really are that long first (kCorruption naming
  // the file otherwise), so no access can fault past EOF.
  void map_rows(std::uint64_t rows);
  // Writer only, writer lock held: allocates capacity_for(rows) rows in both files (at most
  // the budget of map_bytes), maps them and publishes the new capacity. kFull on ENOSPC/EFBIG or
  // past map_bytes; on failure no counter changes. Pointers from row_ptr()/entry_ptr() taken before
  // may then be stale.
  void grow_to(std::uint64_t rows);
  // Writer only, writer lock held: the allocation grow_to() makes, alone. The files are taken to
  // hold `capacity` rows; allocates both up to capacity_for(rows) (or just `rows` when that step
  // does not fit) and returns the rows they now hold. Changes no counter and maps nothing.
  std::uint64_t allocate_rows(std::uint64_t capacity, std::uint64_t rows);
  // When the state page names another generation than file_generation() (a truncate switched
  // the store, or is switching it), takes that generation's files: a Writer opens them (keeping
  // the old descriptors open until close_retired_fds(), so a sync in flight never sees a reused
  // one), a
  // Reader only takes their paths. Maps nothing: the next map_rows() maps the new files at a
  // new Generation, which for a Reader pins the old one (views stay valid). True if it switched.
  bool follow_generation();
  // Writer only: closes the descriptors follow_generation() kept (the caller knows no flush
  // still uses them). Until then the old files, unlinked, keep their disk space.
  void close_retired_fds();
  // Writer only, writer lock held: writes the files of generation file_generation() + 1 holding
  // copies of rows [0, rows) (mapped), the last one flagged as a batch end, sized for
  // capacity_for(rows), and flushes them and the directory. Replaces any leftover files of that
  // generation first (an interrupted truncate). Throws with the partial files removed, and
  // kNotFound before touching any file when the store is no longer at its path.
  void write_next_generation(std::uint64_t rows);
  // Writer only, writer lock and key index lock held: removes rows.<X> and index.<X> for every X
  // other than file_generation(), and keys.<X> for every X other than `key_generation` (leftovers
  // of a truncate or of a crash; Readers that mapped them keep their mappings). kNotFound, with
  // nothing removed, when the store is no longer at its path.
  void remove_stale_files(std::uint64_t key_generation) const;
  // Rows the files on disk can hold right now (from their sizes).
  std::uint64_t rows_files_hold() const;
  // Rows the data file and the index file each hold right now (from their sizes): {data, index}.
  std::pair<std::uint64_t, std::uint64_t> rows_each_file_holds() const;
  // The generation the state page of the store at `dir` names now (SharedState::generation()),
  // without opening the store: one open of the header and one mapping of its state page.
  // kNotFound without a header file, kCorruption when it is too short for the state page.
  static std::uint64_t read_generation(const std::string& dir);

  // Writer only: its writes make 2 MiB pages of the rows (WriterOptions::huge_pages;
  // log/commit.cc, rows_write_end()).
  void set_huge_pages(bool on) { huge_pages_ = on; }
  bool huge_pages() const { return huge_pages_; }

  // Rows must be mapped.
  std::byte* row_ptr(std::uint64_t row) const { return generation_->row_ptr(row); }
  IndexEntry* entry_ptr(std::uint64_t row) const { return generation_->entry_ptr(row); }
  bool row_valid(std::uint64_t row) const;
  // The last row before `row` that verifies, looking past at most 1,024 that do not (whose eras
  // cannot be trusted): its era bounds the eras of the rows after it (FORMAT.md "era").
  std::optional<std::uint64_t> last_valid_row_before(std::uint64_t row) const;
  // Whether `bytes` (record_bytes of them) are row `row` as its entry records it.
  bool row_valid(std::uint64_t row, const std::byte* bytes) const;
  // The end of the longest run of whole, valid batches starting at `begin` (a batch boundary)
  // within [begin, end): a batch counts only if all its rows, up to the one flagged
  // kEntryBatchEnd, validate. Rows must be mapped.
  std::uint64_t valid_batch_prefix(std::uint64_t begin, std::uint64_t end) const;

  bool same_boot() const;  // The state's boot id is the machine's current boot id.
  // Which fixed header verified: "primary", or "copy" when the primary failed its checks.
  const char* header_source() const { return layout_.from_copy ? "copy" : "primary"; }
  // After open() with DamagedGeneration::kUseOnlyPair: the damage to `generation` it worked
  // around (naming the header, the field and the files used), or "".
  const std::string& generation_damage() const { return generation_damage_; }
  // Writer only, writer lock held: gives a store older than format 1.2 its header copy, a
  // store whose primary failed its checks the primary back from the copy, or one whose copy
  // failed its checks (or differs) the copy back from the primary (Layout::copy_problem), and
  // flushes the header. The copy is written and flushed before the primary is touched, so an
  // interruption leaves one verified copy and the next writer finishes the job.
  void upgrade_header();
  // The header file read again and decoded: its Layout::copy_problem now ("" when both copies
  // hold), or that neither holds; "" when the file at the path is no longer the one this
  // handle opened (the store deleted, or another made there). Throws when it cannot be read.
  std::string header_copy_problem() const;
  StoreInfo info() const;

 private:
  StoreFiles() = default;

  std::string dir_, header_path_, data_path_, index_path_;
  std::uint64_t file_generation_ = 0;
  std::string generation_damage_;
  std::vector<int> retired_fds_;  // A Writer's descriptors of older generations' files.
  os::Access access_ = os::Access::kReadOnly;
  bool huge_pages_ = false;  // set_huge_pages().
  Layout layout_{};
  RowHashKey hash_key_{0};  // From layout_.seed.
  int header_fd_ = -1, data_fd_ = -1, index_fd_ = -1;
  std::optional<os::FileId> header_id_;  // The header file opened (open_by_path()).
  void* state_map_ = nullptr;
  SharedState state_;
  std::uint64_t header_bytes_ = 0;  // The header file's size at open.
  std::uint64_t budget_rows_ = 0;   // The most rows map_bytes lets one Generation reserve.
  std::string map_bytes_advice_;    // map_bytes_advice() of the map_bytes opened with.
  // Null until the first map_rows(). Replaced (and reset) under pin_mutex_ by the thread that
  // maps (the callers' serialization, see the top), which reads it without the mutex; a thread
  // that reads beside it holds its own reference from pin_generation().
  std::shared_ptr<Generation> generation_;
  mutable std::mutex pin_mutex_;
  void set_generation(std::shared_ptr<Generation> generation);
};

// Copies committed rows of `files`' current Generation to memory: with pread from its data file
// (the kernel copies out of the page cache, where a first pass through a new mapping pays a
// page-table entry per 4 KiB page: bench/RESULTS.md, "A fresh process's scan"), or from the
// mapping for copies under kMinBytes and wherever the file cannot be used. The copier holds one
// descriptor for its life: the Writer's, or for a Reader (whose StoreFiles keeps none) one it
// opens at its first large copy and uses only if it is the file mapped (Generation::
// maps_data_file(): the path could name another file by now). No open failure is an error: the
// mapping holds the same bytes. A failed read is (kIO, or kCorruption for a file shorter than
// its rows, naming the file). Used by one thread; `files` outlives it and is not remapped
// meanwhile (Reader: no refresh() during a const call).
class RowCopier {
 public:
  static constexpr std::uint64_t kMinBytes = 256 * 1024;

  explicit RowCopier(const StoreFiles& files) : files_(files) {}
  ~RowCopier();
  RowCopier(const RowCopier&) = delete;
  RowCopier& operator=(const RowCopier&) = delete;

  // Rows [begin, begin + count) to `out` (count * record_bytes bytes).
  void copy(std::uint64_t begin, std::uint64_t count, std::byte* out);
  // A descriptor of the data file the current Generation maps, opened by path and checked to be
  // that file (-1 when it cannot be: copy from the mapping instead); closed with this object.
  int descriptor();

 private:
  const StoreFiles& files_;
  int fd_ = -1;
  bool own_fd_ = false;
  bool looked_ = false;
};

}  // namespace embstore::detail
