#include "platform/testing.h"

#include <unistd.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <mutex>
#include <string>
#include <vector>

#include "platform/os.h"

namespace embstore::detail::testing {

std::string_view op_name(Op op) noexcept {
  switch (op) {
    case Op::kOpen:
      return "open";
    case Op::kFallocate:
      return "fallocate";
    case Op::kFstat:
      return "fstat";
    case Op::kMmap:
      return "mmap";
    case Op::kMsync:
      return "msync";
    case Op::kPwrite:
      return "pwrite";
    case Op::kPread:
      return "pread";
    case Op::kRename:
      return "rename";
    case Op::kMkdir:
      return "mkdir";
    case Op::kLock:
      return "lock";
    case Op::kRandom:
      return "getrandom";
    case Op::kFutex:
      return "futex";
    case Op::kTmpfile:
      return "tmpfile";
    case Op::kAlloc:
      return "alloc";
    case Op::kRenameNoReplace:
      return "rename-noreplace";
    case Op::kCount:
      break;
  }
  return "?";
}

#ifdef EMBSTORE_TESTING
namespace {

struct FaultSlot {
  std::atomic<std::uint64_t> remaining{0};  // Calls left before the failing one; 0 = disarmed.
  std::atomic<int> err{0};
  std::atomic<bool> forever{false};
  std::atomic<bool> tripped{false};
};

struct Hooks {
  std::array<FaultSlot, static_cast<int>(Op::kCount)> faults;
  std::mutex crash_mutex;
  std::string crash_point;
  std::atomic<std::uint64_t> crash_remaining{0};
  std::atomic<std::uint64_t> injected{0};
  std::atomic<int> write_mode{0};  // An index into kWriteModes.
  std::atomic<std::uint64_t> write_calls{0};
  std::atomic<std::size_t> pwrite_cap{0};
  std::atomic<std::uint64_t> fs_magic{0};
  // Pause points (arm_pause), under crash_mutex; pauses_armed says whether any is left.
  struct Pause {
    std::string point;
    std::uint64_t remaining;
    std::string dir;
  };
  std::vector<Pause> pauses;
  std::atomic<bool> pauses_armed{false};
};

constexpr std::string_view kWriteModes[] = {"", "mapping", "syscall", "alternate"};

// A misspelt mode would silently test the default path: refuse it loudly instead.
int parse_write_mode(std::string_view mode) {
  for (int i = 0; i < static_cast<int>(std::size(kWriteModes)); ++i) {
    if (mode == kWriteModes[i]) return i;
  }
  std::fprintf(stderr, "EMBSTORE_WRITE_PATH=%.*s: expected mapping, syscall or alternate\n",
               static_cast<int>(mode.size()), mode.data());
  std::abort();
}

Hooks& hooks() {
  static Hooks* h = [] {
    auto* fresh = new Hooks();
    if (const char* spec = std::getenv("EMBSTORE_CRASH")) {
      std::string s(spec);
      auto colon = s.rfind(':');
      if (colon != std::string::npos) {
        fresh->crash_point = s.substr(0, colon);
        fresh->crash_remaining = std::strtoull(s.c_str() + colon + 1, nullptr, 10);
      }
    }
    if (const char* spec = std::getenv("EMBSTORE_FAULT")) {
      std::string all(spec);
      std::size_t start = 0;
      while (start < all.size()) {
        std::size_t end = all.find(',', start);
        if (end == std::string::npos) end = all.size();
        std::string item = all.substr(start, end - start);
        start = end + 1;
        char name[32] = {};
        unsigned long long nth = 0;
        int err = 0;
        char mode[16] = {};
        int got = std::sscanf(item.c_str(), "%31[^:]:%llu:%d:%15s", name, &nth, &err, mode);
        if (got < 3) continue;
        for (int i = 0; i < static_cast<int>(Op::kCount); ++i) {
          if (op_name(static_cast<Op>(i)) == name) {
            auto& slot = fresh->faults[i];
            slot.err = err;
            slot.forever = std::string(mode) == "forever";
            slot.remaining = nth;
          }
        }
      }
    }
    if (const char* mode = std::getenv("EMBSTORE_WRITE_PATH")) {
      fresh->write_mode = parse_write_mode(mode);
    }
    if (const char* cap = std::getenv("EMBSTORE_PWRITE_CAP")) {
      fresh->pwrite_cap = std::strtoull(cap, nullptr, 10);
    }
    if (const char* magic = std::getenv("EMBSTORE_FS_MAGIC")) {
      fresh->fs_magic = std::strtoull(magic, nullptr, 0);
    }
    return fresh;
  }();
  return *h;
}

}  // namespace

void arm_fault(Op op, std::uint64_t nth, int err, bool forever) {
  auto& slot = hooks().faults[static_cast<int>(op)];
  slot.err = err;
  slot.forever = forever;
  slot.tripped = false;
  slot.remaining = nth;
}

void arm_crash(std::string_view point, std::uint64_t nth) {
  auto& h = hooks();
  std::lock_guard guard(h.crash_mutex);
  h.crash_point = point;
  h.crash_remaining = nth;
}

void arm_pause(std::string_view point, std::uint64_t nth, std::string_view dir) {
  auto& h = hooks();
  std::lock_guard guard(h.crash_mutex);
  h.pauses.push_back({std::string(point), nth, std::string(dir)});
  h.pauses_armed = true;
}

void disarm_all() {
  auto& h = hooks();
  for (auto& slot : h.faults) {
    slot.remaining = 0;
    slot.forever = false;
    slot.tripped = false;
  }
  std::lock_guard guard(h.crash_mutex);
  h.crash_remaining = 0;
  h.pauses.clear();
  h.pauses_armed = false;
}

std::uint64_t faults_injected() noexcept { return hooks().injected.load(); }

int fault_for(Op op) noexcept {
  auto& h = hooks();
  auto& slot = h.faults[static_cast<int>(op)];
  if (slot.tripped.load() && slot.forever.load()) {
    h.injected.fetch_add(1);
    return slot.err.load();
  }
  std::uint64_t left = slot.remaining.load();
  while (left != 0) {
    if (slot.remaining.compare_exchange_weak(left, left - 1)) {
      if (left == 1) {
        slot.tripped = true;
        h.injected.fetch_add(1);
        return slot.err.load();
      }
      return 0;
    }
  }
  return 0;
}

namespace {

// The pause armed for this pass of `point`, if any: its directory ("" if none).
std::string pause_here(Hooks& h, const char* point) {
  std::lock_guard guard(h.crash_mutex);
  for (auto it = h.pauses.begin(); it != h.pauses.end(); ++it) {
    if (it->point != point || --it->remaining != 0) continue;
    std::string dir = std::move(it->dir);
    h.pauses.erase(it);
    h.pauses_armed = !h.pauses.empty();
    return dir;
  }
  return "";
}

}  // namespace

namespace {
std::atomic<SyncObserver> g_sync_observer{nullptr};
}  // namespace

void set_sync_observer(SyncObserver observer) { g_sync_observer.store(observer); }

void synced(const char* path) noexcept {
  if (const SyncObserver observer = g_sync_observer.load(); observer != nullptr) observer(path);
}

void crash_point(const char* point) noexcept {
  auto& h = hooks();
  if (h.pauses_armed.load()) {
    if (const std::string dir = pause_here(h, point); !dir.empty()) {
      const std::string paused = dir + "/paused." + point;
      const std::string resume = dir + "/resume." + point;
      if (FILE* f = std::fopen(paused.c_str(), "w")) std::fclose(f);
      while (!os::exists(resume)) ::usleep(1000);
    }
  }
  if (h.crash_remaining.load() == 0) return;
  std::lock_guard guard(h.crash_mutex);
  if (h.crash_remaining == 0 || h.crash_point != point) return;
  if (--h.crash_remaining == 0) ::kill(::getpid(), SIGKILL);
}

void set_boot_id(std::string_view boot_id_text) { os::override_boot_id(boot_id_text); }

WritePath write_path() noexcept {
  auto& h = hooks();
  switch (h.write_mode.load()) {
    case 1:
      return {true, false, false};
    case 2:
      return {true, true, true};
    case 3: {
      const std::uint64_t turn = h.write_calls.fetch_add(1) % 4;
      return {true, (turn & 1) != 0, (turn & 2) != 0};
    }
    default:
      return {};
  }
}

std::string_view set_write_path(std::string_view mode) {
  return kWriteModes[hooks().write_mode.exchange(parse_write_mode(mode))];
}

std::size_t pwrite_cap() noexcept { return hooks().pwrite_cap.load(); }
void set_pwrite_cap(std::size_t bytes) { hooks().pwrite_cap = bytes; }
std::uint64_t filesystem_magic() noexcept { return hooks().fs_magic.load(); }
void set_filesystem_magic(std::uint64_t f_type) { hooks().fs_magic = f_type; }
#endif

}  // namespace embstore::detail::testing
