// bench_command.h — `embstore bench`: the I/O throughput tool users run on their own disks.
//
// N writer processes (fork) append batches of `dim` x `dtype` rows to one fresh store for a row
// count or a duration while M reader processes follow it; then the same workload (same process
// count, same bytes) goes through pwrite() into the page cache and through memcpy into memory,
// in the same run, and the report gives embstore's figures as ratios to those two.
// Uses only the public headers plus POSIX (fork, pwrite) for the baselines.
#pragma once

namespace embstore::cli {

// argv[0] is "bench". Returns the process exit status (0, or 2 for a usage error).
int bench_command(int argc, char** argv);

}  // namespace embstore::cli
