// smaps.h — what this process's mappings of a file look like, from /proc/self/smaps.
#pragma once

#include <cstdint>
#include <string>

namespace embstore::test {

// KiB of `path` resident in this process's mappings of it (the sum of their Rss).
std::uint64_t resident_kib(const std::string& path);
// KiB of this process's mappings of `path` mapped with 2 MiB page-table entries (the sum of their
// FilePmdMapped): page-cache pages of 2 MiB mapped in one step.
std::uint64_t pmd_mapped_kib(const std::string& path);
// KiB of this process's mappings of `path` that are its own copies (the sum of their Anonymous):
// pages of a private mapping written since it was made.
std::uint64_t anonymous_kib(const std::string& path);
// This process's mappings (lines of /proc/self/maps) of files whose path starts with `prefix`.
std::uint64_t mappings_of(const std::string& prefix);

}  // namespace embstore::test
