// roles.h — what each torture process does. The supervisor (scenarios.cc) starts these as
// separate processes of the same executable: `embstore_torture <role> --store ... --seed ...`.
#pragma once

#include <map>
#include <string>

#include "harness.h"

namespace embstore::torture {

// Parsed `--name value` pairs after the role name; flags without a value map to "1".
struct Args {
  std::map<std::string, std::string> values;
  std::string get(const std::string& name, const std::string& fallback = "") const;
  std::uint64_t num(const std::string& name, std::uint64_t fallback = 0) const;
  bool has(const std::string& name) const { return values.count(name) != 0; }
  Params params() const;
};
Args parse_args(int argc, char** argv, int first);

// Exit codes of roles: 0 fine, 1 an invariant or contract broke, 2 unexpected error,
// 10 the writer stopped at a clean kFull as asked.
int role_writer(const Args& args);    // appends its schedule, logging I/A/D; SIGTERM ends it
int role_reader(const Args& args);    // follows the store, checks every row it can see (--once)
int role_verifier(const Args& args);  // check_invariant; --power-loss, --fresh-writer
int role_faultrun(
    const Args& args);  // a workload under EMBSTORE_FAULT: errors, never false success
int role_memlimit(const Args& args);  // a workload under RLIMIT_AS
int role_recover(const Args& args);   // opens a Writer (recovering), --append N rows, closes
int role_snapshot(const Args& args);  // opens a Reader, writes its size to --out, verifies
int role_creator(const Args& args);   // open_or_create (--segment-bytes), then close

}  // namespace embstore::torture
