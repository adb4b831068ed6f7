#include "roles.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "embstore/embstore.h"
#include "platform/testing.h"
#include "support/payload.h"
#include "writer_internals.h"

namespace embstore::torture {
namespace {

std::atomic<bool> g_stop{false};
void on_term(int) { g_stop.store(true); }

void install_term_handler() {
  struct sigaction sa {};
  sa.sa_handler = on_term;
  sigemptyset(&sa.sa_mask);
  ::sigaction(SIGTERM, &sa, nullptr);
  sigset_t term;
  sigemptyset(&term);
  sigaddset(&term, SIGTERM);
  ::sigprocmask(SIG_UNBLOCK, &term, nullptr);
}

struct Batch {
  Schedule::Batch b;
  std::vector<std::uint64_t> keys;
  std::vector<float> values;
};

Batch make_batch(Schedule& s, std::uint64_t writer, std::uint64_t index, std::uint32_t dim) {
  Batch out;
  out.b = s.batch(index);
  for (std::uint64_t i = 0; i < out.b.rows; ++i) {
    out.keys.push_back(test::make_key(writer, out.b.first_seq + i));
  }
  out.values = test::batch_payload(writer, out.b.first_seq, out.b.rows, dim);
  return out;
}

// The float32 store every role creates: --dim, --segment-bytes (default 64 KiB).
CreateOptions create_options(const Args& args, const Params& p) {
  CreateOptions create;
  create.dim = p.dim;
  create.dtype = DType::kFloat32;
  create.segment_bytes = args.num("segment-bytes", 65536);
  return create;
}

}  // namespace

std::string Args::get(const std::string& name, const std::string& fallback) const {
  auto it = values.find(name);
  return it == values.end() ? fallback : it->second;
}

std::uint64_t Args::num(const std::string& name, std::uint64_t fallback) const {
  auto it = values.find(name);
  return it == values.end() ? fallback : std::strtoull(it->second.c_str(), nullptr, 0);
}

Params Args::params() const {
  Params p;
  p.store = get("store");
  p.log_dir = get("log-dir");
  p.seed = num("seed", 1);
  p.dim = static_cast<std::uint32_t>(num("dim", 16));
  p.max_batch = static_cast<std::uint32_t>(num("max-batch", 8));
  return p;
}

Args parse_args(int argc, char** argv, int first) {
  Args a;
  for (int i = first; i < argc; ++i) {
    std::string s = argv[i];
    if (s.rfind("--", 0) != 0) continue;
    s = s.substr(2);
    // insert_or_assign, not operator[] = "...": GCC 12 warns falsely (-Wrestrict) on the latter.
    const bool has_value = i + 1 < argc && std::string(argv[i + 1]).rfind("--", 0) != 0;
    a.values.insert_or_assign(s, has_value ? std::string(argv[++i]) : std::string("1"));
  }
  return a;
}

// ---- writer --------------------------------------------------------------------------------

int role_writer(const Args& args) {
  install_term_handler();
  const Params p = args.params();
  const std::uint64_t w = args.num("writer");
  const std::uint64_t batches = args.num("batches", 0);
  const std::uint64_t sync_every = args.num("sync-every", 0);
  const bool until_full = args.has("until-full");
  if (const std::uint64_t limit = args.num("fsize-limit", 0)) {
    ::signal(SIGXFSZ, SIG_IGN);  // embstore.h: ignore SIGXFSZ to get kFull instead of death.
    struct rlimit rl {
      limit, limit
    };
    ::setrlimit(RLIMIT_FSIZE, &rl);
  }
  WriterOptions options;
  options.map_bytes = args.num("map-bytes", torture_map_bytes());
  // Odd writers keep their rows in 2 MiB pages (WriterOptions::huge_pages: their writes carry
  // zeros past their rows, log/commit.cc), even ones do not: every scenario runs both paths.
  options.huge_pages = w % 2 == 1;
  if (args.has("every-append")) options.sync = SyncPolicy::kEveryAppend;
  if (args.has("unsynced")) options.sync = SyncPolicy::kNone;  // for scenarios that need a tail
  try {
    // --start-fifo: block until the supervisor opens the FIFO, so racers start together.
    if (args.has("start-fifo")) ::close(::open(args.get("start-fifo").c_str(), O_RDONLY));
    Writer writer = args.has("open-or-create")
                        ? Writer::open_or_create(p.store, create_options(args, p), options)
                        : Writer::open(p.store, options);
    // Writers 0 and 1 of every four leave the indexing of every batch to their indexer thread
    // while they look alone (writer.cc, kIndexLaterMinBytes; the others only of batches of 1 MiB,
    // which no scenario appends): every scenario runs both ways of indexing.
    if (w % 4 < 2) detail::WriterInternals::set_index_later_min_bytes(writer, 0);
    AckLog log(p.log_dir, w);
    Schedule schedule(p.seed, w, p.max_batch);
    int full_hits = 0;
    for (std::uint64_t i = 0; (batches == 0 || i < batches) && !g_stop.load(); ++i) {
      Batch batch = make_batch(schedule, w, i, p.dim);
      log.intent(batch.b.first_seq, batch.b.rows);
      try {
        writer.append(batch.keys, batch.b.index, batch.values);
      } catch (const Error& e) {
        if (!until_full || e.code() != ErrorCode::kFull) throw;
        // A clean kFull: nothing of this batch may be visible (the verifier checks). Try a few
        // more batches, each must fail the same clean way, then stop.
        if (++full_hits >= 3) break;
        continue;
      }
      log.acked(batch.b.first_seq, batch.b.rows);
      if (sync_every != 0 && (i + 1) % sync_every == 0) {
        writer.sync();
        log.durable(batch.b.first_seq + batch.b.rows);
      }
    }
    try {
      writer.close();
    } catch (const Error& e) {
      // The key index may be what ran out of room (its growth is reported at close).
      if (!until_full || e.code() != ErrorCode::kFull) throw;
      ++full_hits;
    }
    return full_hits > 0 ? 10 : 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "writer %llu: %s (%s)\n", static_cast<unsigned long long>(w), e.what(),
                 error_code_name(e.code()));
    // A clean kFull while opening (allocating a sparse store's holes) is what was asked too.
    return until_full && e.code() == ErrorCode::kFull ? 10 : 2;
  }
}

// ---- creator -------------------------------------------------------------------------------

int role_creator(const Args& args) {
  const Params p = args.params();
  try {
    Writer writer = Writer::open_or_create(p.store, create_options(args, p), wopts());
    writer.close();
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "creator: %s (%s)\n", e.what(), error_code_name(e.code()));
    return 2;
  }
}

// ---- reader --------------------------------------------------------------------------------

int role_reader(const Args& args) {
  install_term_handler();
  const Params p = args.params();
  const bool hammer = args.has("hammer");
  const bool once = args.has("once");  // Check the snapshot at open, then exit (scenario 23).
  std::map<std::uint64_t, Schedule> schedules;
  std::uint64_t checked = 0, torn = 0, problems = 0;
  auto problem = [&](const std::string& text) {
    if (++problems < 20) std::fprintf(stderr, "reader: %s\n", text.c_str());
  };
  try {
    Reader reader = Reader::open(p.store, ropts());
    auto check_snapshot = [&] {
      const std::uint64_t size = reader.size();
      if (size < checked) problem("snapshot shrank from " + std::to_string(checked));
      for (std::uint64_t row = checked; row < size; ++row) {
        Record rec;
        try {
          rec = reader.record(row);
        } catch (const Error& e) {
          ++torn;
          problem(std::string("torn row visible: ") + e.what());
          continue;
        }
        if (!test::payload_matches(rec.key, p.dim, rec.data)) {
          ++torn;
          problem("row " + std::to_string(row) + " does not hold its derived payload");
        }
        const std::uint64_t w = test::key_writer(rec.key);
        auto [it, fresh] = schedules.try_emplace(w, p.seed, w, p.max_batch);
        (void)fresh;
        const Schedule::Batch b = it->second.containing(test::key_seq(rec.key));
        if (rec.epoch != b.index) problem("row " + std::to_string(row) + " has a wrong epoch");
        if (row + 1 == size && test::key_seq(rec.key) != b.first_seq + b.rows - 1) {
          problem("the snapshot of " + std::to_string(size) + " rows ends inside batch " +
                  std::to_string(b.index) + " of writer " + std::to_string(w) +
                  ": a partial batch is visible");
        }
      }
      if (size > checked) checked = size;
    };
    while (!g_stop.load() && !once) {
      if (hammer) {
        reader.refresh();
      } else {
        reader.wait(checked + 1, std::chrono::milliseconds(20));
      }
      check_snapshot();
    }
    reader.refresh();
    check_snapshot();
  } catch (const Error& e) {
    problem(std::string("reader failed: ") + e.what());
  }
  stat_add("rows_read_by_readers", checked);
  stat_add("torn_rows_seen", torn);
  flush_stats();
  return problems == 0 ? 0 : 1;
}

// ---- verifier ------------------------------------------------------------------------------

int role_verifier(const Args& args) {
  const Params p = args.params();
  CheckOptions options;
  options.power_loss = args.has("power-loss");
  options.fresh_writer = args.num("fresh-writer", 0);
  bool ok = false;
  try {
    ok = report_check(check_invariant(p, options), args.get("context", "verifier"));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "verifier: %s\n", e.what());
  }
  flush_stats();
  return ok ? 0 : 1;
}

// ---- faultrun ------------------------------------------------------------------------------

int role_faultrun(const Args& args) {
  const Params p = args.params();
  const std::uint64_t w = args.num("writer");
  int errors = 0, problems = 0;
  auto problem = [&](const std::string& text) {
    ++problems;
    std::fprintf(stderr, "faultrun (%s): %s\n", std::getenv("EMBSTORE_FAULT"), text.c_str());
  };
  auto attempt = [&](const char* what, const std::function<void()>& fn) {
    try {
      fn();
      return true;
    } catch (const Error& e) {
      ++errors;
      if (args.has("verbose")) std::fprintf(stderr, "  %s: %s\n", what, e.what());
      if (e.code() == ErrorCode::kIO || e.code() == ErrorCode::kFull ||
          e.code() == ErrorCode::kReadOnly || e.code() == ErrorCode::kNotFound ||
          e.code() == ErrorCode::kPoisoned || e.code() == ErrorCode::kCorruption ||
          e.code() == ErrorCode::kAlreadyExists) {
        const std::string msg = e.what();
        // The store path, or the directory holding it (create fsyncs the parent directory).
        const std::string parent = p.store.substr(0, p.store.rfind('/'));
        if (msg.find(p.store) == std::string::npos && msg.find(parent) == std::string::npos &&
            msg.find("address space") == std::string::npos) {
          problem(std::string(what) + ": the message does not name the store path: " + msg);
        }
      } else {
        problem(std::string(what) + ": unexpected error code " + error_code_name(e.code()) + ": " +
                e.what());
      }
      return false;
    } catch (const std::exception& e) {
      problem(std::string(what) + ": not an embstore::Error: " + e.what());
      return false;
    }
  };
  AckLog log(p.log_dir, w);
  Schedule schedule(p.seed, w, p.max_batch);
  std::uint64_t next_batch = 0;
  CreateOptions copts;
  copts.dim = p.dim;
  copts.segment_bytes = args.num("segment-bytes", 4096);
  auto append_one = [&](Writer& writer) {
    Batch batch = make_batch(schedule, w, next_batch++, p.dim);
    log.intent(batch.b.first_seq, batch.b.rows);
    writer.append(batch.keys, batch.b.index, batch.values);
    log.acked(batch.b.first_seq, batch.b.rows);
    return batch.b.first_seq + batch.b.rows;
  };

  std::optional<Writer> writer;
  attempt("create/open", [&] {
    writer.emplace(args.has("create") ? Writer::create(p.store, copts, wopts())
                                      : Writer::open(p.store, wopts()));
  });
  if (!writer)
    attempt("open_or_create",
            [&] { writer.emplace(Writer::open_or_create(p.store, copts, wopts())); });
  if (writer) {
    for (int i = 0; i < 8; ++i) {
      std::uint64_t end = 0;
      attempt("append", [&] { end = append_one(*writer); });
      if (i % 3 != 2) continue;
      if (attempt("sync", [&] { writer->sync(); })) {
        log.durable(end);
        continue;
      }
      // A failed sync poisons the writer: the next append must be refused, never accepted.
      try {
        append_one(*writer);
        problem("an append after a failed sync succeeded (the writer must be poisoned)");
      } catch (const Error& e) {
        if (e.code() != ErrorCode::kPoisoned && e.code() != ErrorCode::kInvalidArgument) {
          problem(std::string("an append after a failed sync threw ") + error_code_name(e.code()) +
                  " instead of poisoned");
        }
      }
      break;
    }
    attempt("close", [&] { writer->close(); });
    writer.reset();
  }
  attempt("read", [&] {
    Reader reader = Reader::open(p.store, ropts());
    VerifyReport report = reader.verify();
    if (!report.ok()) problem("verify found bad rows under faults");
    for (std::uint64_t r = 0; r < reader.size(); ++r) {
      Record rec = reader.record(r);
      if (!test::payload_matches(rec.key, p.dim, rec.data)) problem("a row reads back wrong");
    }
    reader.refresh();
  });
  attempt("reopen", [&] {
    Writer again = Writer::open(p.store, wopts());
    const std::uint64_t end = append_one(again);
    again.sync();
    log.durable(end);
    again.close();  // A key index failure is reported here, never by the destructor.
  });
  attempt("info", [&] { (void)read_info(p.store); });
  const std::uint64_t injected = detail::testing::faults_injected();
  stat_add("faults_injected", injected);
  // The workload called the op fewer than n times: this run tested nothing (counted apart).
  if (injected == 0) stat_add("fault_runs_without_fault");
  // One failed fallocate for lack of space may be absorbed by design: a growth whose step does
  // not fit allocates just the rows of the append (FORMAT.md "File sizes"). Every other fault,
  // and that one made permanent, must surface as an error.
  const std::string spec = std::getenv("EMBSTORE_FAULT") ? std::getenv("EMBSTORE_FAULT") : "";
  const bool absorbable =
      spec.rfind("fallocate:", 0) == 0 && spec.find(',') == std::string::npos &&
      spec.find(":forever") == std::string::npos &&
      (spec.ends_with(":" + std::to_string(ENOSPC)) ||
       spec.ends_with(":" + std::to_string(EFBIG)) || spec.ends_with(":" + std::to_string(EDQUOT)));
  if (injected > 0 && errors == 0 && !absorbable) {
    problem("false success: " + std::to_string(injected) +
            " faults injected but every call succeeded");
  }
  if (args.has("verbose")) {
    std::printf("faultrun %s: %llu injected, %d errors\n", std::getenv("EMBSTORE_FAULT"),
                static_cast<unsigned long long>(injected), errors);
  }
  flush_stats();
  return problems == 0 ? 0 : 1;
}

// ---- memlimit ------------------------------------------------------------------------------

int role_memlimit(const Args& args) {
  const Params p = args.params();
  const std::uint64_t w = args.num("writer");
  int problems = 0;
  auto problem = [&](const std::string& text) {
    ++problems;
    std::fprintf(stderr, "memlimit: %s\n", text.c_str());
  };
  std::uint64_t vm_kb = 0;
  {
    std::ifstream status("/proc/self/status");
    std::string line;
    while (std::getline(status, line)) {
      if (line.rfind("VmSize:", 0) == 0) vm_kb = std::strtoull(line.c_str() + 7, nullptr, 10);
    }
  }
  const std::uint64_t limit = vm_kb * 1024 + (256ull << 20);
  struct rlimit rl {
    limit, limit
  };
  if (::setrlimit(RLIMIT_AS, &rl) != 0) {
    problem("setrlimit(RLIMIT_AS) failed");
    return 1;
  }
  // Reservations follow the store's size, not map_bytes (default 1 TiB): a small store opens
  // under a 256 MiB address-space limit, both as Writer and as Reader, and reads back.
  try {
    Writer writer = Writer::open(p.store);
    Reader reader = Reader::open(p.store);
    if (!reader.verify().ok()) problem("verify failed under RLIMIT_AS");
  } catch (const Error& e) {
    problem(std::string("a small store did not open under a 256 MiB RLIMIT_AS: ") + e.what());
  }
  // A small map_bytes works until the store outgrows it; then kFull, and nothing partial.
  try {
    WriterOptions wo;
    wo.map_bytes = args.num("map-bytes", 1 << 20);
    Writer writer = Writer::open(p.store, wo);
    AckLog log(p.log_dir, w);
    Schedule schedule(p.seed, w, p.max_batch);
    bool full = false;
    for (std::uint64_t i = 0; i < 1'000'000 && !full; ++i) {
      Batch batch = make_batch(schedule, w, i, p.dim);
      const std::uint64_t before = writer.committed_rows();
      log.intent(batch.b.first_seq, batch.b.rows);
      try {
        writer.append(batch.keys, batch.b.index, batch.values);
        log.acked(batch.b.first_seq, batch.b.rows);
      } catch (const Error& e) {
        if (e.code() != ErrorCode::kFull) throw;
        full = true;
        if (writer.committed_rows() != before) problem("a failed append changed committed_rows");
      }
    }
    if (!full) problem("the store never outgrew a small map_bytes");
    writer.sync();
    ReaderOptions ro;
    ro.map_bytes = wo.map_bytes;
    Reader reader = Reader::open(p.store, ro);
    if (!reader.verify().ok()) problem("verify failed after kFull");
  } catch (const Error& e) {
    problem(std::string("unexpected error under RLIMIT_AS: ") + e.what());
  }
  flush_stats();
  return problems == 0 ? 0 : 1;
}

// ---- recover -------------------------------------------------------------------------------

int role_recover(const Args& args) {
  try {
    Writer writer = Writer::open(args.get("store"), wopts());
    // --append N: then append one batch of N rows (dim-1 float32, keys 1 << 60 + i).
    if (const std::uint64_t n = args.num("append", 0)) {
      std::vector<std::uint64_t> keys(n);
      std::vector<float> values(n, 0.25f);
      for (std::uint64_t i = 0; i < n; ++i) keys[i] = (1ull << 60) + i;
      writer.append(keys, 0, values);
    }
    writer.close();
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "recover: %s\n", e.what());
    return 2;
  }
}

// ---- snapshot ------------------------------------------------------------------------------

int role_snapshot(const Args& args) {
  try {
    Reader reader = Reader::open(args.get("store"), ropts());
    std::ofstream(args.get("out")) << reader.size() << "\n";
    return reader.verify().ok() ? 0 : 1;
  } catch (const Error& e) {
    std::fprintf(stderr, "snapshot: %s\n", e.what());
    return 2;
  }
}

}  // namespace embstore::torture
