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
// Pages of bytes [from, to) of `path` (4 KiB-aligned) in the page cache now (mincore through a
// mapping of its own, which touches none of them).
std::uint64_t cached_pages(const std::string& path, std::uint64_t from, std::uint64_t to);

}  // namespace embstore::test
