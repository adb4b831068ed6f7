// Scenarios 1-9: real writer, reader and verifier processes, kill -9, crash points, simulated
// power loss, full disks, injected I/O errors and address-space limits.
#include <fcntl.h>
#include <linux/falloc.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "embstore/embstore.h"
#include "platform/testing.h"
#include "scenarios.h"
#include "support/payload.h"

namespace embstore::torture {
namespace {

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void write_all(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

bool fail(const std::string& text) {
  std::fprintf(stderr, "FAIL: %s\n", text.c_str());
  return false;
}

bool expect_kill(pid_t pid, const std::string& what) {
  ExitStatus st = wait_child(pid);
  if (!st.exited && st.signal == SIGKILL) return true;
  return fail(what + ": expected SIGKILL at the crash point, got " + st.describe());
}

bool expect_exit(pid_t pid, const std::string& what, int code = 0) {
  ExitStatus st = wait_child(pid);
  if (st.exited && st.code == code) return true;
  return fail(what + ": expected exit code " + std::to_string(code) + ", got " + st.describe());
}

}  // namespace

// ---- Setup ---------------------------------------------------------------------------------

Setup::Setup(const std::string& tag, std::uint64_t seed, std::uint32_t dim, std::uint32_t max_batch)
    : dir_(make_temp_dir(tag)) {
  p_.store = dir_ + "/store";
  p_.log_dir = dir_ + "/logs";
  p_.seed = seed;
  p_.dim = dim;
  p_.max_batch = max_batch;
  std::filesystem::create_directories(p_.log_dir);
}

Setup::~Setup() { remove_all(dir_); }

void Setup::create(std::uint64_t segment_bytes) {
  create_f32_store(p_.store, p_.dim, segment_bytes);
}

pid_t Setup::start_writer(const std::vector<std::string>& extra,
                          const std::vector<std::string>& env) {
  auto args = role_args("writer", p_);
  args.push_back("--writer");
  args.push_back(std::to_string(new_writer()));
  args.insert(args.end(), extra.begin(), extra.end());
  return spawn_self(args, env);
}

pid_t Setup::start_reader(bool hammer, const std::vector<std::string>& env) {
  auto args = role_args("reader", p_);
  if (hammer) args.push_back("--hammer");
  return spawn_self(args, env);
}

bool Setup::verify(const std::string& context, bool power_loss,
                   const std::vector<std::string>& env) {
  return verify_store(p_.store, context, power_loss, env);
}

bool Setup::verify_store(const std::string& store, const std::string& context, bool power_loss,
                         const std::vector<std::string>& env, const std::string& log_dir) {
  Params p = p_;
  p.store = store;
  if (!log_dir.empty()) p.log_dir = log_dir;
  auto args = role_args("verifier", p);
  args.insert(args.end(), {"--fresh-writer", std::to_string(new_writer()), "--context", context});
  if (power_loss) args.push_back("--power-loss");
  ExitStatus st = wait_child(spawn_self(args, env));
  if (st.exited && st.code == 0) return true;
  return fail(context + ": the invariant does not hold (verifier " + st.describe() + ")");
}

bool stop_child(pid_t pid, const std::string& what) {
  ::kill(pid, SIGTERM);
  return expect_exit(pid, what);
}

// ---- 1. kill -9 a random writer among 3 (plus a reader), many rounds; restart it --------------

bool scenario_kill9(std::uint64_t seed) {
  Rng rng(seed);
  Setup s("kill9", seed);
  s.create(16384);
  bool ok = true;
  const pid_t reader = s.start_reader();
  auto start = [&]() -> pid_t {
    if (rng.chance(0.1)) return s.start_writer({"--every-append"});  // SyncPolicy::kEveryAppend
    return s.start_writer({"--sync-every", std::to_string(rng.below(6))});
  };
  std::vector<pid_t> writers = {start(), start(), start()};
  const std::uint64_t rounds = scaled(1000, 40);
  for (std::uint64_t r = 0; r < rounds; ++r) {
    const std::size_t slot = rng.below(writers.size());
    sleep_us(rng.range(200, 12000));  // The random moment of the kill.
    ::kill(writers[slot], SIGKILL);
    ExitStatus st = wait_child(writers[slot]);
    if (st.exited ? st.code != 0 : st.signal != SIGKILL) {
      ok = fail("a writer died of something other than our kill -9: " + st.describe());
    }
    stat_add("kill9_rounds");
    writers[slot] = start();
  }
  for (pid_t w : writers) ok &= stop_child(w, "writer");
  ok &= stop_child(reader, "reader");
  ok &= s.verify("kill9");
  return ok;
}

// ---- 2 / 3. Crash points -------------------------------------------------------------------

namespace {

const std::vector<std::string> kCrashPoints = {
    "after-grow-data", "after-grow-index", "after-copy", "mid-index-write",
    "before-publish",  "after-publish",    "mid-sync",   "during-recovery"};

struct FileSizes {
  std::uint64_t data = 0, index = 0, capacity = 0, record = 0, generation = 0;
};
FileSizes sizes_of(const std::string& store) {
  StoreInfo info = read_info(store);
  return {info.data_file_bytes, info.index_file_bytes, info.capacity_rows, info.record_bytes,
          info.generation};
}

// FORMAT.md "File sizes": whole pages, long enough for capacity_rows, and allocated to the end
// (a hole is a range a mapping could fault in, SIGBUS on a full disk, instead of an error).
bool sizes_valid(const std::string& store, const std::string& when) {
  FileSizes f = sizes_of(store);
  bool ok = true;
  if (f.data % 4096 != 0) ok = fail(when + ": data file is not whole pages");
  if (f.index % 4096 != 0) ok = fail(when + ": index file is not whole pages");
  if (f.data < f.capacity * f.record || f.index < f.capacity * 32) {
    ok = fail(when + ": files are shorter than capacity_rows " + std::to_string(f.capacity));
  }
  const std::string g = std::to_string(f.generation);
  for (const std::string& file : {store + "/rows." + g, store + "/index." + g}) {
    struct stat st {};
    if (::stat(file.c_str(), &st) != 0 || st.st_blocks * 512 < st.st_size) {
      ok = fail(when + ": " + file + " has " + std::to_string(st.st_blocks * 512) +
                " bytes allocated of " + std::to_string(st.st_size));
    }
  }
  return ok;
}

// One crash run: a reader follows, a writer dies at `point`:`n`, the next writer carries on.
bool crash_run(std::uint64_t seed, const std::string& point, std::uint64_t n, bool growth_checks) {
  Setup s("crash", seed);
  s.create(4096);  // 64 rows of 64 bytes per segment: growth every few batches.
  const std::string what = point + ":" + std::to_string(n);
  std::vector<std::string> env;
  bool ok = true;
  if (point == "during-recovery") {
    // A store last written in another boot, with unsynced rows: the next open must recover.
    ok &= expect_exit(s.start_writer({"--batches", "40", "--sync-every", "7"},
                                     {"EMBSTORE_BOOT_ID=11111111-1111-1111-1111-111111111111"}),
                      "writer before the reboot");
    env.push_back("EMBSTORE_BOOT_ID=22222222-2222-2222-2222-222222222222");
  }
  const pid_t reader = s.start_reader(false, env);
  std::vector<std::string> crash_env = env;
  crash_env.push_back("EMBSTORE_CRASH=" + what);
  ok &= expect_kill(
      s.start_writer({"--batches", std::to_string(400 + 24 * n), "--sync-every", "4"}, crash_env),
      what);
  stat_add("crash_point_kills");
  FileSizes before = sizes_of(s.params().store);
  if (growth_checks) ok &= sizes_valid(s.params().store, what + " after the crash");
  // The next writer must work, through more growth.
  ok &= expect_exit(s.start_writer({"--batches", "60", "--sync-every", "9"}, env),
                    "writer after " + what);
  if (growth_checks) {
    ok &= sizes_valid(s.params().store, what + " after the next growth");
    if (sizes_of(s.params().store).capacity <= before.capacity) {
      ok = fail(what + ": the next writer did not grow the store");
    }
  }
  ok &= stop_child(reader, "reader");
  ok &= s.verify("crash " + what, false, env);
  return ok;
}

}  // namespace

bool scenario_crash_points(std::uint64_t seed) {
  const std::uint64_t k = scaled(15, 10);
  bool ok = true;
  for (const std::string& point : kCrashPoints) {
    const std::uint64_t passes = point == "during-recovery" ? 1 : k;
    for (std::uint64_t n = 1; n <= passes; ++n) {
      if (!crash_run(mix(seed, n * 131 + point.size()), point, n, false)) {
        ok = fail("crash point " + point + ":" + std::to_string(n));
      }
    }
  }
  return ok;
}

bool scenario_growth(std::uint64_t seed) {
  const std::uint64_t k = scaled(10, 10);
  Rng rng(seed);
  bool ok = true;
  for (const std::string point : {"after-grow-data", "after-grow-index"}) {
    for (std::uint64_t n = 1; n <= k; ++n) {
      ok &= crash_run(rng.next(), point, n * 2 - 1, true);
    }
  }
  return ok;
}

// ---- 4. Crash during recovery, then recover again: same final state --------------------------

namespace {
bool reboot_reader_race(std::uint64_t seed);
}  // namespace

bool scenario_recovery_crash(std::uint64_t seed) {
  Rng rng(seed);
  bool ok = true;
  const std::uint64_t rounds = scaled(15, 20);
  for (std::uint64_t round = 0; round < rounds; ++round) {
    Setup s("recovery", rng.next());
    s.create(16384);
    const Params& p = s.params();
    const std::string boot_a = "EMBSTORE_BOOT_ID=" + random_boot_id(rng);
    const std::string boot_b = "EMBSTORE_BOOT_ID=" + random_boot_id(rng);
    // Synced rows, then unsynced ones, written in "boot A".
    ok &= expect_exit(
        s.start_writer({"--batches", "150", "--sync-every", "100", "--unsynced"}, {boot_a}),
        "writer");
    StoreInfo info = read_info(p.store);
    if (info.committed_rows <= info.durable_rows) return fail("no unsynced rows to recover");
    // A torn row past the durable point: recovery must cut back.
    const std::uint64_t bad =
        info.durable_rows + rng.below(info.committed_rows - info.durable_rows);
    {
      std::fstream f(p.store + "/rows.1", std::ios::binary | std::ios::in | std::ios::out);
      const auto at =
          static_cast<std::streamoff>(bad * info.record_bytes + rng.below(info.record_bytes));
      f.seekg(at);
      const int old = f.get();
      f.seekp(at);
      f.put(static_cast<char>(old ^ static_cast<int>(rng.range(1, 255))));  // a real change
    }
    const std::string control = s.dir() + "/control";
    std::filesystem::copy(p.store, control, std::filesystem::copy_options::recursive);
    auto recover = [&](const std::string& store, std::vector<std::string> env) {
      auto args = std::vector<std::string>{"recover", "--store", store};
      return spawn_self(args, env);
    };
    ok &= expect_exit(recover(control, {boot_b}), "recovering the control copy");
    // The real store: crash at the named point, and kill -9 at random moments, several times.
    // (The named point comes before recovery writes anything, so it can fire again and again;
    // the random kills may land anywhere, including after recovery finished.)
    for (int i = 0; i < 3; ++i) {
      ok &= expect_kill(recover(p.store, {boot_b, "EMBSTORE_CRASH=during-recovery:1"}),
                        "during-recovery");
      stat_add("crash_point_kills");
    }
    for (int i = 0; i < 3; ++i) {
      const pid_t pid = recover(p.store, {boot_b});
      sleep_us(rng.below(3000));
      ::kill(pid, SIGKILL);
      wait_child(pid);
      stat_add("kill9_rounds");
    }
    ok &= expect_exit(recover(p.store, {boot_b}), "recovering after the crashes");
    StoreInfo a = read_info(control), b = read_info(p.store);
    if (a.committed_rows != b.committed_rows || a.durable_rows != b.durable_rows ||
        a.capacity_rows != b.capacity_rows) {
      ok = fail("recovery is not idempotent: committed/durable/capacity " +
                std::to_string(a.committed_rows) + "/" + std::to_string(a.durable_rows) + "/" +
                std::to_string(a.capacity_rows) + " vs " + std::to_string(b.committed_rows) + "/" +
                std::to_string(b.durable_rows) + "/" + std::to_string(b.capacity_rows));
    }
    if (b.committed_rows > bad) ok = fail("recovery kept the torn row " + std::to_string(bad));
    if (b.committed_rows < info.durable_rows) ok = fail("recovery cut below the durable point");
    const std::uint64_t data_bytes = b.committed_rows * b.record_bytes;
    if (read_all(control + "/rows.1").substr(0, data_bytes) !=
            read_all(p.store + "/rows.1").substr(0, data_bytes) ||
        read_all(control + "/index.1").substr(0, b.committed_rows * 32) !=
            read_all(p.store + "/index.1").substr(0, b.committed_rows * 32)) {
      ok = fail("recovered rows differ from the control copy");
    }
    ok &= s.verify("recovery-crash", true, {boot_b});
  }
  for (std::uint64_t round = 0; round < scaled(4, 10); ++round)
    ok &= reboot_reader_race(rng.next());
  return ok;
}

// A Reader opened after a reboot verifies the unsynced range itself. If a writer recovers the
// store and appends while that Reader is still scanning, the Reader must not take rows nobody
// published (a batch whose writer died before publishing) into its snapshot.
namespace {
bool reboot_reader_race(std::uint64_t seed) {
  Rng rng(seed);
  Setup s("rebootrace", seed, 1);
  const std::string store = s.params().store;
  CreateOptions o;
  o.dim = 1;
  o.segment_bytes = 1 << 20;
  create_store(store, o);
  const std::string boot_a = random_boot_id(rng), boot_b = random_boot_id(rng);
  std::uint64_t committed = 0;
  {
    detail::testing::set_boot_id(boot_a);
    Writer w = Writer::open(store, wopts_unsynced());
    const std::uint64_t n = 100'000;
    std::vector<std::uint64_t> keys(n);
    std::vector<float> values(n, 1.0f);
    for (int b = 0; b < 30; ++b) {
      for (std::uint64_t i = 0; i < n; ++i) keys[i] = b * n + i;
      w.append(keys, 0, values);
    }
    committed = w.committed_rows();
    detail::testing::set_boot_id("");
  }
  {  // A torn row near the end: recovery must cut back to the start of the last batch.
    std::fstream f(store + "/rows.1", std::ios::binary | std::ios::in | std::ios::out);
    f.seekp(static_cast<std::streamoff>((committed - 5) * 4));
    f.put('\x7f');
  }
  const std::string out = s.dir() + "/snapshot";
  const std::string env_b = "EMBSTORE_BOOT_ID=" + boot_b;
  const pid_t reader = spawn_self({"snapshot", "--store", store, "--out", out}, {env_b});
  sleep_us(rng.range(2000, 15000));  // somewhere in its scan of 3M rows (or before, or after)
  ::kill(reader, SIGSTOP);
  bool ok = expect_exit(spawn_self({"recover", "--store", store, "--append", "100"}, {env_b}),
                        "recovering writer");
  ok &= expect_kill(spawn_self({"recover", "--store", store, "--append", "300"},
                               {env_b, "EMBSTORE_CRASH=before-publish:1"}),
                    "writer dying before publish");
  stat_add("crash_point_kills");
  ::kill(reader, SIGCONT);
  ok &= expect_exit(reader, "reader scanning across the recovery");
  std::uint64_t seen = 0;
  std::ifstream(out) >> seen;
  const std::uint64_t published = read_info(store).committed_rows;
  if (seen > published) {
    ok = fail("a Reader opened after a reboot took " + std::to_string(seen - published) +
              " rows nobody published into its snapshot (" + std::to_string(seen) + " > " +
              std::to_string(published) + ")");
  }
  return ok;
}
}  // namespace

// ---- 5. No row visible before commit: stalled writers, hammering readers -------------------

bool scenario_stall(std::uint64_t seed) {
  Rng rng(seed);
  Setup s("stall", seed);
  s.create(8192);
  bool ok = true;
  std::vector<pid_t> readers = {s.start_reader(true), s.start_reader(true)};
  std::vector<pid_t> writers = {s.start_writer({"--sync-every", "5"}), s.start_writer()};
  const std::uint64_t rounds = scaled(300, 40);
  for (std::uint64_t r = 0; r < rounds; ++r) {
    const pid_t w = writers[rng.below(writers.size())];
    sleep_us(rng.range(100, 5000));
    // Stopped anywhere, including between copy and publish while it holds the lock: readers
    // keep going and must see nothing of its unpublished batch.
    ::kill(w, SIGSTOP);
    sleep_us(rng.range(500, 5000));
    ::kill(w, SIGCONT);
  }
  for (pid_t w : writers) ok &= stop_child(w, "writer");
  for (pid_t r : readers) ok &= stop_child(r, "reader");
  ok &= s.verify("stall");
  // The threaded variant (what TSan checks): writer threads and hammering reader threads.
  ok &= scenario_threads(mix(seed, 5));
  return ok;
}

// ---- 6. Simulated power loss ---------------------------------------------------------------

namespace {

using Image = std::map<std::string, std::string>;  // file name -> bytes

Image snapshot(const std::string& store) {
  Image out;
  for (const auto& e : std::filesystem::directory_iterator(store)) {
    out[e.path().filename().string()] = read_all(e.path().string());
  }
  return out;
}

// The disk after a power cut: every page synced before the cut (the shadow); each page written
// since holds any one of the versions it had in the page cache since then (writeback may have
// happened after any of them, or not at all); one page may be torn at a 512-byte sector.
// `versions` are snapshots taken after the sync, the last one at the moment of the cut.
Image crash_image(const Image& shadow, const std::vector<Image>& versions, Rng& rng, int mode) {
  constexpr std::size_t kPage = 4096;
  const Image& live = versions.back();
  Image out;
  bool torn_done = false;
  // Mode 3: every data and index page from one version, the header from another.
  const std::size_t files_version = rng.below(versions.size());
  const std::size_t header_version = rng.below(versions.size());
  for (const auto& [name, now] : live) {
    auto it = shadow.find(name);
    const std::string old = it == shadow.end() ? std::string() : it->second;
    // A file's size is durable after a completed fdatasync; a later extension may or may not be.
    std::size_t size = now.size();
    if (old.size() != now.size() && rng.chance(0.5)) size = old.size();
    std::string img = old;
    img.resize(size, '\0');
    const bool is_header = name == "header";
    for (std::size_t off = 0; off < size; off += kPage) {
      const std::size_t len = std::min(kPage, size - off);
      const std::string_view before = std::string_view(img).substr(off, len);
      // Which later version of this page reached the disk.
      const Image& version = mode == 0   ? versions[rng.below(versions.size())]
                             : mode == 3 ? versions[is_header ? header_version : files_version]
                                         : live;
      auto vit = version.find(name);
      if (vit == version.end()) continue;
      const std::string& vbytes = vit->second;
      const std::string_view after =
          off < vbytes.size() ? std::string_view(vbytes).substr(off, len) : "";
      if (after.size() != len || before == after) continue;
      int choice;  // 0 old, 1 new, 2 torn
      if (mode == 3) {
        choice = 1;
      } else if (mode == 1) {
        choice = is_header ? 0 : 1;  // data and index reached the disk, the header did not
      } else if (mode == 2) {
        choice = is_header ? 1 : 0;  // the header (committed counter) ahead of the data
      } else {
        choice = static_cast<int>(rng.below(2));
        if (!torn_done && rng.chance(0.15)) choice = 2;
      }
      if (choice == 1) {
        img.replace(off, len, after);
      } else if (choice == 2) {
        torn_done = true;
        const std::size_t cut = std::min<std::size_t>(len, 512 * rng.range(1, 7));
        img.replace(off, cut, after.substr(0, cut));
      }
    }
    out[name] = std::move(img);
  }
  return out;
}

// The disk as the store's own fdatasync calls leave it (testing.h, set_sync_observer): when an
// fdatasync of one of the store's files returns, the disk holds that file as it is then (the
// shadow), and no earlier version of it can surface after a power cut. Rather than assume the
// store flushes what it promised in the order it promised, the model follows the calls the
// store makes. Some of those moments are also kept as cuts: the power fails right after that
// fdatasync (images are made of them after the run, when nothing is being written).
struct SyncModel {
  std::string store;
  Image* shadow = nullptr;
  std::vector<Image>* versions = nullptr;
  std::string log_dir;   // The writers' ack logs,
  std::string cuts_dir;  // copied here at each cut: what was acked and durable then.
  struct Cut {
    Image shadow;
    std::vector<Image> versions;
    std::string log_dir;
  };
  std::vector<Cut> cuts;
  std::size_t max_cuts = 0;
  Rng rng{1};
};
SyncModel* g_sync_model = nullptr;

void observe_sync(const char* path) {
  SyncModel* model = g_sync_model;
  if (model == nullptr) return;
  const std::filesystem::path file(path);
  if (file.parent_path() != std::filesystem::path(model->store)) return;
  const std::string name = file.filename().string();
  (*model->shadow)[name] = read_all(path);
  for (Image& v : *model->versions) v.erase(name);
  if (model->cuts.size() < model->max_cuts && model->rng.chance(0.3)) {
    std::vector<Image> versions = *model->versions;
    versions.push_back(snapshot(model->store));
    const std::string logs = model->cuts_dir + "/logs" + std::to_string(model->cuts.size());
    std::filesystem::create_directories(logs);
    std::filesystem::copy(model->log_dir, logs,
                          std::filesystem::copy_options::recursive |
                              std::filesystem::copy_options::overwrite_existing);
    model->cuts.push_back({*model->shadow, std::move(versions), logs});
  }
}

// Installs the model for one writer's run, and removes it when the run ends.
class SyncModelScope {
 public:
  explicit SyncModelScope(SyncModel& model) {
    g_sync_model = &model;
    detail::testing::set_sync_observer(&observe_sync);
  }
  ~SyncModelScope() {
    detail::testing::set_sync_observer(nullptr);
    g_sync_model = nullptr;
  }
  SyncModelScope(const SyncModelScope&) = delete;
  SyncModelScope& operator=(const SyncModelScope&) = delete;
};

}  // namespace

namespace {

// The store's promise the power-loss model relies on: an append that finds a dead writer's
// entries past the commit point flushes something (the header with a raised era) before writing
// over them, and an ordinary append flushes nothing. Probed with a one-shot fdatasync fault.
bool probe_stale_tail_flush(std::uint64_t seed) {
  Setup s("probe", seed);
  s.create(8192);
  bool ok = true;
  Writer writer = Writer::open(s.params().store, wopts_unsynced());
  std::vector<std::uint64_t> keys = {1, 2};
  std::vector<float> values(2 * s.params().dim, 0.5f);
  detail::testing::arm_fault(detail::testing::Op::kMsync, 1, EIO, false);
  writer.append(keys, 0, values);  // no stale tail: must not flush
  detail::testing::disarm_all();
  ok &= expect_kill(s.start_writer({"--batches", "2"}, {"EMBSTORE_CRASH=before-publish:1"}),
                    "probe helper");
  detail::testing::arm_fault(detail::testing::Op::kMsync, 1, EIO, false);
  try {
    writer.append(keys, 0, values);
    ok = fail("an append over a dead writer's entries flushed nothing first");
  } catch (const Error& e) {
    if (e.code() != ErrorCode::kPoisoned) ok = fail(std::string("probe: ") + e.what());
  }
  detail::testing::disarm_all();
  Writer again = Writer::open(s.params().store, wopts_unsynced());
  again.append(keys, 0, values);
  Reader reader = Reader::open(s.params().store, ropts());
  if (reader.size() != 4 || !reader.verify().ok()) ok = fail("probe: store after the probe");
  return ok;
}

}  // namespace

bool scenario_power_loss(std::uint64_t seed) {
  Rng rng(seed);
  bool ok = probe_stale_tail_flush(seed);
  const std::uint64_t runs = scaled(80, 50);
  const std::uint64_t images_per_run = scaled(16, 4);
  for (std::uint64_t run = 0; run < runs; ++run) {
    Setup s("powerloss", rng.next(), 16, 12);
    s.create(8192);
    const Params& p = s.params();
    const std::uint64_t w = s.new_writer();
    Image shadow = snapshot(p.store);
    std::vector<Image> versions;
    SyncModel model;
    model.store = p.store;
    model.shadow = &shadow;
    model.versions = &versions;
    model.max_cuts = 2;
    model.log_dir = p.log_dir;
    model.cuts_dir = s.dir() + "/cuts";
    model.rng = Rng(rng.next());
    const char* kill_points[] = {"before-publish", "mid-index-write", "after-copy"};
    {
      const SyncModelScope observing(model);
      Writer writer = Writer::open(p.store, wopts_unsynced());
      AckLog log(p.log_dir, w);
      Schedule schedule(p.seed, w, p.max_batch);
      const std::uint64_t batches = rng.range(5, 60);
      bool after_crash = false;
      for (std::uint64_t i = 0; i < batches; ++i) {
        if (rng.chance(0.1)) {
          // Another writer process dies before publishing: its rows and entries sit past the
          // commit point, in the page cache, until the next append writes over them.
          const std::string point = kill_points[rng.below(3)];
          ok &= expect_kill(s.start_writer({"--batches", "3"}, {"EMBSTORE_CRASH=" + point + ":1"}),
                            "power-loss helper at " + point);
          stat_add("crash_point_kills");
          versions.push_back(snapshot(p.store));
          after_crash = true;
          // Before writing its entries the helper flushed the header if the era it writes with
          // was not on disk yet; it published nothing, so that header is today's. (Treating it
          // as flushed even when it was not only makes the images less adversarial.)
          for (Image& v : versions) v.erase("header");
          shadow["header"] = snapshot(p.store).at("header");
        }
        Schedule::Batch b = schedule.batch(i);
        std::vector<std::uint64_t> keys;
        for (std::uint64_t j = 0; j < b.rows; ++j)
          keys.push_back(test::make_key(w, b.first_seq + j));
        log.intent(b.first_seq, b.rows);
        // An append over the dead writer's entries (past the commit point) raises the store's
        // era and flushes the header before writing over them, then flushes its rows and
        // entries before publishing (FORMAT.md "Append over an unpublished tail"; the probe
        // above checks that a flush happens): the sync model records each file when its
        // fdatasync returns. Until then the index keeps every version: the dead writer's
        // entries may still surface there, and recovery must tell them apart by their older era.
        writer.append(keys, b.index, test::batch_payload(w, b.first_seq, b.rows, p.dim));
        log.acked(b.first_seq, b.rows);
        if (rng.chance(0.2) && i + 1 < batches) {
          writer.sync();  // The sync model recorded what each of its fdatasyncs left on disk.
          log.durable(b.first_seq + b.rows);
        } else if (after_crash || rng.chance(0.3)) {
          versions.push_back(snapshot(p.store));
        }
        after_crash = false;
      }
      // The power fails here: the writer never closes.
    }
    versions.push_back(snapshot(p.store));
    // The images of the end of the run, then one of each cut (right after an fdatasync of the
    // store's: data and index pages as old as the disk allows with the header as new, or any).
    const std::uint64_t images = images_per_run + model.cuts.size();
    for (std::uint64_t i = 0; i < images; ++i) {
      const bool at_cut = i >= images_per_run;
      const SyncModel::Cut* cut = at_cut ? &model.cuts[i - images_per_run] : nullptr;
      const int mode = at_cut            ? (rng.chance(0.7) ? 2 : 0)
                       : i == 0          ? 1
                       : i == 1          ? 2
                       : rng.chance(0.5) ? 3
                                         : 0;
      const Image img = cut != nullptr ? crash_image(cut->shadow, cut->versions, rng, mode)
                                       : crash_image(shadow, versions, rng, mode);
      const std::string dir = s.dir() + "/image" + std::to_string(i);
      std::filesystem::create_directories(dir);
      for (const auto& [name, bytes] : img) write_all(dir + "/" + name, bytes);
      stat_add("powerloss_images");
      const std::string context =
          (at_cut ? "power-loss image (a cut after an fdatasync) " : "power-loss image ") +
          std::to_string(i) + " of run " + std::to_string(run);
      if (!s.verify_store(dir, context, true, {"EMBSTORE_BOOT_ID=" + random_boot_id(rng)},
                          cut != nullptr ? cut->log_dir : "")) {
        ok = false;
        std::fprintf(stderr, "  (image kept for inspection would be %s)\n", dir.c_str());
      }
      remove_all(dir);
    }
  }
  return ok;
}

// ---- 7. Full disk --------------------------------------------------------------------------

namespace {

bool fill_file(const std::string& path, std::size_t bytes) {
  std::ofstream out(path, std::ios::binary);
  std::string chunk(4096, 'x');
  for (std::size_t done = 0; done < bytes; done += chunk.size()) out.write(chunk.data(), 4096);
  out.flush();
  return static_cast<bool>(out);
}

}  // namespace

bool scenario_full_disk(std::uint64_t seed) {
  bool ok = true;
  // (a) A small tmpfs.
  {
    Setup s("fulldisk", seed);
    const std::string mnt = s.dir() + "/mnt";
    std::filesystem::create_directories(mnt);
    if (::mount("tmpfs", mnt.c_str(), "tmpfs", 0, "size=1m") != 0) {
      scenario_part_skipped(std::string("scenario 7: cannot mount a tmpfs (") +
                            std::strerror(errno) + "); the RLIMIT_FSIZE half still runs");
    } else {
      Params p = s.params();
      // The store lives on the small file system; the logs stay outside.
      p.store = mnt + "/store";
      create_f32_store(p.store, p.dim, 65536);
      fill_file(mnt + "/filler1", 256 << 10);
      fill_file(mnt + "/filler2", 128 << 10);
      auto writer_args = [&](std::uint64_t w) {
        auto a = role_args("writer", p);
        a.insert(a.end(), {"--writer", std::to_string(w), "--until-full", "--sync-every", "3"});
        return a;
      };
      auto reader_args = role_args("reader", p);
      const pid_t reader = spawn_self(reader_args);
      // Appends until the disk is full: a clean kFull (exit 10), never SIGBUS.
      ok &= expect_exit(spawn_self(writer_args(1)), "writer filling the tmpfs", 10);
      std::filesystem::remove(mnt + "/filler1");
      // Space is back: appends resume (and fill it again).
      ok &= expect_exit(spawn_self(writer_args(2)), "writer after space was freed", 10);
      auto logs = read_logs(p.log_dir);
      if (logs[2].acked.empty()) ok = fail("no append succeeded after space was freed");
      ok &= stop_child(reader, "reader on the full tmpfs");
      std::filesystem::remove(mnt + "/filler2");
      ok &= s.verify_store(p.store, "tmpfs after freeing space", false, {});
      ::umount2(mnt.c_str(), MNT_DETACH);
    }
  }
  // (b) RLIMIT_FSIZE: the writer's files may not grow past the limit; SIGXFSZ ignored.
  {
    Setup s("fsize", seed);
    s.create(65536);
    const pid_t reader = s.start_reader();
    ok &= expect_exit(s.start_writer({"--until-full", "--fsize-limit", std::to_string(512 << 10)}),
                      "writer under RLIMIT_FSIZE", 10);
    ok &= expect_exit(s.start_writer({"--batches", "50"}), "writer without the limit");
    ok &= stop_child(reader, "reader");
    ok &= s.verify("RLIMIT_FSIZE");
  }
  return ok;
}

// ---- 17. Sparse copies on a full disk ----------------------------------------------------

namespace {

// Mounts a tmpfs of `size` ("1m") at `mnt`; if it cannot (not root, no mount namespace), says
// why and marks the scenario skipped (scenario_skipped).
bool mount_tmpfs(const std::string& mnt, const char* size, const char* scenario) {
  std::filesystem::create_directories(mnt);
  const std::string options = std::string("size=") + size;
  if (::mount("tmpfs", mnt.c_str(), "tmpfs", 0, options.c_str()) == 0) return true;
  scenario_skipped(std::string("scenario ") + scenario + ": cannot mount a tmpfs (" +
                   std::strerror(errno) + "); skipped");
  return false;
}

std::uint64_t free_bytes(const std::string& mnt) {
  struct statvfs st;
  if (::statvfs(mnt.c_str(), &st) != 0) return 0;
  return std::uint64_t{st.f_bavail} * st.f_frsize;
}

// Fills `mnt` with `path` until about `leave` bytes stay free.
void fill_to(const std::string& mnt, const std::string& path, std::uint64_t leave) {
  const std::uint64_t now = free_bytes(mnt);
  if (now > leave) fill_file(path, (now - leave) / 4096 * 4096);
}

// Bytes of the files under `dir` that are holes (size beyond the allocated blocks).
std::uint64_t hole_bytes(const std::string& dir) {
  std::uint64_t holes = 0;
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir)) {
    struct stat st;
    if (!e.is_regular_file() || ::stat(e.path().c_str(), &st) != 0) continue;
    const std::uint64_t allocated = std::uint64_t(st.st_blocks) * 512;
    if (std::uint64_t(st.st_size) > allocated) holes += std::uint64_t(st.st_size) - allocated;
  }
  return holes;
}

// Punches a hole over every all-zero page of every file under `dir`, as fallocate --dig-holes
// and backup tools do.
bool dig_holes(const std::string& dir) {
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    const int fd = ::open(e.path().c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) return fail("open " + e.path().string() + ": " + std::strerror(errno));
    char page[4096];
    const char zeros[4096] = {};
    off_t at = 0;
    for (ssize_t n; (n = ::pread(fd, page, sizeof page, at)) > 0; at += n) {
      if (n == sizeof page && std::memcmp(page, zeros, sizeof page) == 0 &&
          ::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, at, n) != 0) {
        ::close(fd);
        return fail("punching a hole in " + e.path().string() + ": " + std::strerror(errno));
      }
    }
    ::close(fd);
  }
  return true;
}

// Runs a system tool (cp) to the end; true if it exited 0.
bool run_tool(const std::vector<std::string>& argv) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execvp(args[0], args.data());
    ::_exit(127);
  }
  const ExitStatus st = wait_child(pid);
  return st.exited && st.code == 0 ? true : fail(argv[0] + " " + st.describe());
}

// The invariant for a store of `p` with its own log directory; a fresh batch as `fresh_writer`.
bool verify_params(const Params& p, std::uint64_t fresh_writer, const std::string& context) {
  auto args = role_args("verifier", p);
  args.insert(args.end(), {"--fresh-writer", std::to_string(fresh_writer), "--context", context});
  return expect_exit(spawn_self(args), context + ": the invariant");
}

}  // namespace

bool scenario_sparse_full(std::uint64_t seed) {
  Rng rng(seed);
  Setup s("sparse", seed);
  const std::string mnt = s.dir() + "/mnt";
  if (!mount_tmpfs(mnt, "4m", "17")) return true;
  bool ok = true;
  constexpr std::uint64_t kSegment = 65536;
  // The source store, on the ordinary disk: a few segments of acked rows.
  s.create(kSegment);
  ok &= expect_exit(s.start_writer({"--batches", "500"}), "writer of the source store");
  const std::uint64_t rounds = scaled(12, 20);
  std::uint64_t full_at_open = 0, full_after_appending = 0;
  for (std::uint64_t round = 0; round < rounds && ok; ++round) {
    const bool punch = round % 2 == 1;
    const std::string how = punch ? "holes punched" : "cp --sparse=always";
    const std::string context = "sparse copy (" + how + ") round " + std::to_string(round);
    Params p = s.params();
    p.store = mnt + "/copy";
    p.log_dir = s.dir() + "/logs" + std::to_string(round);
    std::filesystem::create_directories(p.log_dir);
    for (const auto& e : std::filesystem::directory_iterator(s.params().log_dir)) {
      std::filesystem::copy_file(e.path(), p.log_dir + "/" + e.path().filename().string());
    }
    if (punch) {
      std::filesystem::copy(s.params().store, p.store, std::filesystem::copy_options::recursive);
      ok &= dig_holes(p.store);
    } else {
      ok &= run_tool({"cp", "-r", "--sparse=always", s.params().store, p.store});
    }
    const std::uint64_t holes = hole_bytes(p.store);
    if (holes == 0) ok = fail(context + ": the copy has no holes");
    // Free space from none to the holes plus two segments: the writer's open or a later
    // growth runs out.
    fill_to(mnt, mnt + "/filler", rng.below(holes + 2 * kSegment));
    const pid_t reader = spawn_self(role_args("reader", p));
    const std::uint64_t w = s.new_writer();
    auto writer = role_args("writer", p);
    writer.insert(writer.end(), {"--writer", std::to_string(w), "--until-full"});
    // Exit 10: a clean kFull at open or at an append. SIGBUS would show here as a signal.
    ok &= expect_exit(spawn_self(writer), context + ": writer on the full tmpfs", 10);
    ok &= stop_child(reader, context + ": reader");
    (read_logs(p.log_dir)[w].acked.empty() ? full_at_open : full_after_appending) += 1;
    std::filesystem::remove(mnt + "/filler");
    ok &= verify_params(p, s.new_writer(), context);
    remove_all(p.store);
    remove_all(p.log_dir);
  }
  std::printf(
      "scenario 17: %llu sparse copies on a full tmpfs: %llu writers stopped by kFull "
      "before appending, %llu after appending\n",
      static_cast<unsigned long long>(rounds), static_cast<unsigned long long>(full_at_open),
      static_cast<unsigned long long>(full_after_appending));
  ::umount2(mnt.c_str(), MNT_DETACH);
  return ok;
}

// ---- 18. Creation under stress --------------------------------------------------------------

namespace {

// Names in `dir` other than `keep`: what a create left behind.
std::vector<std::string> leftovers(const std::string& dir, const std::set<std::string>& keep) {
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (keep.count(name) == 0) names.push_back(name);
  }
  return names;
}

std::string joined(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

// kill -9 at a named crash point of create or at a random moment; the next create must leave
// nothing but the store behind. On a 1 MiB tmpfs (about two stores), leaked staging
// directories would soon make every create fail with kFull.
bool create_kills(Rng& rng, Setup& s, const std::string& mnt) {
  bool ok = true;
  Params p = s.params();
  p.store = mnt + "/store";
  auto creator = role_args("creator", p);
  creator.insert(creator.end(), {"--segment-bytes", "262144"});
  const char* points[] = {"create-staged", "create-allocated", "create-before-rename"};
  const std::uint64_t rounds = scaled(30, 20);
  std::uint64_t left_by_kills = 0;
  for (std::uint64_t round = 0; round < rounds && ok; ++round) {
    const std::string context = "create kill round " + std::to_string(round);
    if (round % 4 < 3) {
      const std::string point = points[round % 4];
      stat_add("crash_point_kills");
      ok &= expect_kill(spawn_self(creator, {"EMBSTORE_CRASH=" + point + ":1"}),
                        context + " at " + point);
    } else {
      const pid_t pid = spawn_self(creator);
      sleep_us(rng.below(20000));
      ::kill(pid, SIGKILL);
      stat_add("kill9_rounds");
      const ExitStatus st = wait_child(pid);
      if (!(st.signal == SIGKILL || (st.exited && st.code == 0))) {
        ok = fail(context + ": creator " + st.describe());
      }
    }
    if (!leftovers(mnt, {"store"}).empty()) ++left_by_kills;
    if (std::filesystem::exists(p.store)) {
      // The rename is the commit point: a store that appeared is whole.
      try {
        if (!Reader::open(p.store, ropts()).verify().ok()) ok = fail(context + ": store damaged");
      } catch (const Error& e) {
        ok = fail(context + ": the store a killed create left does not open: " + e.what());
      }
      remove_all(p.store);
    }
    ok &= expect_exit(spawn_self(creator), context + ": the next create");
    const auto left = leftovers(mnt, {"store"});
    if (!left.empty()) ok = fail(context + ": the next create left " + joined(left));
    remove_all(p.store);
  }
  std::printf(
      "scenario 18: %llu creates killed, %llu left staging files that the next create "
      "removed\n",
      static_cast<unsigned long long>(rounds), static_cast<unsigned long long>(left_by_kills));
  return ok;
}

// Racers call open_or_create on one path at once with room for one store and a quarter: all
// must succeed (the losers open what the winner created) and append.
bool create_races(Rng& rng, Setup& s, const std::string& mnt) {
  bool ok = true;
  const std::string segment = "262144";
  constexpr int kMaxRacers = 10;
  constexpr int kBatches = 20;
  // "One store" is the store after the race: its files and the key index its writers build for
  // every row the racers can append (distinct keys, the worst case for the index).
  std::uint64_t store_bytes = 0;
  {
    const std::uint64_t before = free_bytes(mnt);
    CreateOptions o;
    o.dim = s.params().dim;
    o.segment_bytes = std::stoull(segment);
    Writer w = Writer::create(mnt + "/probe", o);
    const std::uint64_t rows = std::uint64_t{kMaxRacers} * kBatches * s.params().max_batch;
    std::vector<std::uint64_t> keys(rows);
    for (std::uint64_t i = 0; i < rows; ++i) keys[i] = i;
    const std::vector<float> values(rows * o.dim, 1.0f);
    w.append(keys, 0, std::span<const float>(values));
    w.close();
    store_bytes = before - free_bytes(mnt);
    remove_all(mnt + "/probe");
  }
  const std::uint64_t rounds = scaled(4, 20);
  for (std::uint64_t round = 0; round < rounds && ok; ++round) {
    const std::string context = "open_or_create race round " + std::to_string(round);
    Params p = s.params();
    p.store = mnt + "/race";
    p.log_dir = s.dir() + "/racelogs" + std::to_string(round);
    std::filesystem::create_directories(p.log_dir);
    fill_to(mnt, mnt + "/filler", store_bytes + store_bytes / 4 + rng.below(store_bytes / 8));
    const std::string fifo = s.dir() + "/start" + std::to_string(round);
    if (::mkfifo(fifo.c_str(), 0600) != 0) return fail("mkfifo " + fifo);
    const int racers = static_cast<int>(rng.range(6, kMaxRacers));
    std::vector<pid_t> pids;
    for (int i = 0; i < racers; ++i) {
      auto args = role_args("writer", p);
      args.insert(args.end(), {"--writer", std::to_string(s.new_writer()), "--open-or-create",
                               "--segment-bytes", segment, "--batches", std::to_string(kBatches),
                               "--start-fifo", fifo});
      pids.push_back(spawn_self(args));
    }
    // Opening the FIFO read-write never blocks and releases every racer waiting on it.
    const int gate = ::open(fifo.c_str(), O_RDWR | O_CLOEXEC);
    for (pid_t pid : pids) ok &= expect_exit(pid, context + ": a racer");
    ::close(gate);
    const auto left = leftovers(mnt, {"race", "filler"});
    if (!left.empty()) ok = fail(context + ": the race left " + joined(left));
    std::filesystem::remove(mnt + "/filler");
    ok &= verify_params(p, s.new_writer(), context);
    remove_all(p.store);
  }
  return ok;
}

}  // namespace

bool scenario_create_stress(std::uint64_t seed) {
  Rng rng(seed);
  Setup s("create", seed);
  const std::string mnt = s.dir() + "/mnt";
  if (!mount_tmpfs(mnt, "1m", "18")) return true;
  bool ok = create_kills(rng, s, mnt);
  ok = ok && create_races(rng, s, mnt);
  ::umount2(mnt.c_str(), MNT_DETACH);
  return ok;
}

// ---- 8. I/O error countdown ----------------------------------------------------------------

bool scenario_faults(std::uint64_t seed) {
  Rng rng(seed);
  bool ok = true;
  struct OpErr {
    const char* op;
    int err;
  };
  const OpErr ops[] = {{"open", EIO},     {"fallocate", ENOSPC}, {"fstat", EIO}, {"mmap", ENOMEM},
                       {"msync", EIO},    {"pwrite", EIO},       {"pread", EIO}, {"rename", EIO},
                       {"mkdir", EACCES}, {"fallocate", EIO},    {"mmap", EIO},  {"open", EACCES},
                       {"lock", ENOLCK},  {"getrandom", EIO}};
  // The futex fails silently by design (a spurious or lost wake-up): reader_test covers it.
  const std::uint64_t k = scaled(8, 8);
  for (const OpErr& oe : ops) {
    for (std::uint64_t n = 1; n <= k; ++n) {
      for (bool forever : {false, true}) {
        Setup s("fault", rng.next());
        const bool create = rng.chance(0.5);
        if (!create) s.create(4096);
        std::string spec = std::string(oe.op) + ":" + std::to_string(n) + ":" +
                           std::to_string(oe.err) + (forever ? ":forever" : "");
        auto args = role_args("faultrun", s.params());
        args.insert(args.end(), {"--writer", std::to_string(s.new_writer())});
        if (create) args.push_back("--create");
        stat_add("fault_runs");
        ExitStatus st = wait_child(spawn_self(args, {"EMBSTORE_FAULT=" + spec}));
        if (!st.exited || st.code != 0) {
          ok = fail("fault " + spec + (create ? " (create)" : "") + ": workload " + st.describe());
          continue;
        }
        // No staging directory may be left behind by a failed create.
        for (const auto& e : std::filesystem::directory_iterator(s.dir())) {
          if (e.path().filename().string().find(".creating.") != std::string::npos) {
            ok = fail("fault " + spec + ": a failed create left " + e.path().string());
          }
        }
        if (!std::filesystem::exists(s.params().store)) {
          auto logs = read_logs(s.params().log_dir);
          for (auto& [w, h] : logs) {
            if (!h.acked.empty()) ok = fail("fault " + spec + ": acked rows but no store");
          }
          continue;
        }
        ok &= s.verify("after fault " + spec);
      }
    }
  }
  return ok;
}

// ---- 9. Address-space limits ---------------------------------------------------------------

bool scenario_memory(std::uint64_t seed) {
  if (under_sanitizer()) {
    scenario_skipped(
        "scenario 9: skipped under a sanitizer (its shadow memory needs RLIMIT_AS "
        "unlimited); the plain build runs it");
    return true;
  }
  bool ok = true;
  const std::uint64_t rounds = scaled(5, 10);
  Rng rng(seed);
  for (std::uint64_t r = 0; r < rounds; ++r) {
    Setup s("memlimit", rng.next());
    s.create(65536);
    ok &= expect_exit(s.start_writer({"--batches", "20"}), "writer");
    auto args = role_args("memlimit", s.params());
    args.insert(args.end(), {"--writer", std::to_string(s.new_writer()), "--map-bytes",
                             std::to_string((1u << 20) + 65536 * rng.below(8))});
    ok &= expect_exit(spawn_self(args), "memlimit workload");
    ok &= s.verify("after RLIMIT_AS");
  }
  return ok;
}

}  // namespace embstore::torture
