// state.h — lock-free access to the shared state page (FORMAT.md "state-page").
//
// Every counter is a 64-bit word in a MAP_SHARED mapping, read and written only through
// std::atomic_ref: release stores publish, acquire loads observe. Safe from any thread of any
// process. Readers map the page read-only and only load.
#pragma once

#include <atomic>
#include <cstdint>

#include "format/format.h"

namespace embstore::detail {

static_assert(std::atomic_ref<std::uint64_t>::is_always_lock_free,
              "cross-process counters must be lock-free 64-bit atomics");

class SharedState {
 public:
  SharedState() = default;
  explicit SharedState(StatePage* page) : page_(page) {}

  std::uint64_t committed() const { return load(page_->committed_rows); }
  std::uint64_t durable() const { return load(page_->durable_rows); }
  std::uint64_t capacity() const { return load(page_->capacity_rows); }
  // The generation whose files hold the store: G, or G+1 while a truncate switches from G to
  // G+1 (the word carries kGenerationSwitching).
  std::uint64_t generation() const { return store_generation_of(generation_word()); }
  // The generation word as stored, flag included.
  std::uint64_t generation_word() const { return load(page_->generation); }
  bool switching() const { return (generation_word() & kGenerationSwitching) != 0; }
  std::uint64_t era() const { return load(page_->era); }
  std::uint64_t key_generation() const { return load(page_->key_generation); }
  // Wall-clock ns of the latest commit (format 1.3); 0 when unknown.
  std::int64_t last_commit_unix_ns() const {
    return static_cast<std::int64_t>(load(page_->last_commit_unix_ns));
  }
  void boot_id(std::uint64_t out[2]) const {
    out[0] = load(page_->boot_id[0]);
    out[1] = load(page_->boot_id[1]);
  }

  // Writers only, under the writer lock.
  void publish_committed(std::uint64_t rows) { store(page_->committed_rows, rows); }
  void set_capacity(std::uint64_t rows) { store(page_->capacity_rows, rows); }
  void set_durable(std::uint64_t rows) { store(page_->durable_rows, rows); }
  void set_era(std::uint64_t era) { store(page_->era, era); }
  void set_generation_word(std::uint64_t word) { store(page_->generation, word); }
  void set_key_generation(std::uint64_t k) { store(page_->key_generation, k); }
  void set_last_commit_unix_ns(std::int64_t ns) {
    store(page_->last_commit_unix_ns, static_cast<std::uint64_t>(ns));
  }
  void set_boot_id(const std::uint64_t id[2]) {
    store(page_->boot_id[0], id[0]);
    store(page_->boot_id[1], id[1]);
  }
  // Raises durable to `rows` unless it is already higher (syncs may finish out of order).
  void raise_durable(std::uint64_t rows) {
    std::atomic_ref<std::uint64_t> ref(page_->durable_rows);
    std::uint64_t current = ref.load(std::memory_order_acquire);
    while (current < rows && !ref.compare_exchange_weak(current, rows, std::memory_order_acq_rel)) {
    }
  }

  // The key_generation word, for the key index (src/index/key_index_handle.h).
  std::uint64_t* key_generation_word() const { return &page_->key_generation; }
  // The generation word, for a Reader's key index (src/index/key_index_handle.h).
  const std::uint64_t* store_generation_word() const { return &page_->generation; }

  // The low 32 bits of committed_rows, the word futex waiters sleep on.
  std::uint32_t* committed_word() const {
    return reinterpret_cast<std::uint32_t*>(&page_->committed_rows);
  }

 private:
  static std::uint64_t load(std::uint64_t& word) {
    return std::atomic_ref<std::uint64_t>(word).load(std::memory_order_acquire);
  }
  static void store(std::uint64_t& word, std::uint64_t value) {
    std::atomic_ref<std::uint64_t>(word).store(value, std::memory_order_release);
  }

  StatePage* page_ = nullptr;
};

}  // namespace embstore::detail
