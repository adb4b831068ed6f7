// smaps.h — what this process's mappings of a file look like, from /proc/self/smaps.
#pragma once

#include <cstdint>
#include <string>

namespace embstore::test {

// KiB of `path` resident in this process's mappings of it (the sum of their Rss).
std::uint64_t resident_kib(const std::string& path);
// The VmFlags of every mapping of `path` this process has, one line per mapping ("rd wr sh mr mw
// me ms hg ..."; "hg": advised for huge pages), or "" when it maps none of it.
std::string mapping_flags(const std::string& path);

}  // namespace embstore::test
