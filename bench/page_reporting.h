// page_reporting.h — the kernel's free page reporting as the append benchmarks meet it: one
// rule, shared by `embstore bench` (tools/cli/bench_command.cc) and compare_native. (The Python
// benchmarks, bench/python_append.py and bench/compare/compare_py.py, follow the same rule.)
//
// Where a VM's kernel reports free pages to its host (/sys/module/page_reporting), a pass comes
// ~2 s after a free of at least `max_waiting_mib` and hands the free pages over; writing into
// them then runs 5-8x slower while the host backs them again. A benchmark that frees its warm-up
// file right before a pass writes part of its payload into such pages (about a third of all
// phases here: bench/RESULTS.md, "Phases that met a reporting pass"). Freed right after a pass,
// the pages stay the VM's until the next one, ~2 s later. Header-only; reads sysfs, nothing else.
#pragma once

#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

namespace embstore::bench {

// A parameter of the kernel's free page reporting, or -1 where it has none: `passes` (made so
// far), `max_waiting_mib` (the free memory that starts one), `reported_kib` (handed over so far).
inline long long page_reporting(const char* parameter) {
  const std::string path = std::string("/sys/module/page_reporting/parameters/") + parameter;
  std::FILE* f = std::fopen(path.c_str(), "r");
  if (f == nullptr) return -1;
  long long value = -1;
  if (std::fscanf(f, "%lld", &value) != 1) value = -1;
  std::fclose(f);
  return value;
}

// Call before freeing `bytes` of warm-up pages that a timed phase is to reuse: where the kernel
// reports free pages and `bytes` are enough to start a pass, waits for the next pass to end (at
// most 4 s). A smaller free starts no pass and does not wait: a wait would only let earlier
// frees start one. Returns the milliseconds waited.
inline double wait_for_reporting_pass(std::uint64_t bytes) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  const auto waited_ms = [&] {
    return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  };
  const long long threshold_mib = page_reporting("max_waiting_mib");
  const long long before = page_reporting("passes");
  if (threshold_mib < 0 || before < 0 || bytes < static_cast<std::uint64_t>(threshold_mib) << 20) {
    return 0;
  }
  while (page_reporting("passes") == before && waited_ms() < 4000) ::usleep(2000);
  return waited_ms();
}

}  // namespace embstore::bench
