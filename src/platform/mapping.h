// mapping.h — a file mapped inside an address range reserved once, so it can grow in place.
//
// The reservation (PROT_NONE, no backing) is taken at construction; map_to() maps more of the
// file over it with MAP_FIXED (map_ahead() all of it at once). The base address never changes, so
// every pointer handed out stays valid until the ReservedMapping is destroyed. Not thread-safe:
// callers serialize map_to(); base() and mapped_bytes() may be read by the thread that called
// map_to().
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "platform/os.h"

namespace embstore::detail {

class ReservedMapping {
 public:
  ReservedMapping(std::uint64_t reserve_bytes, const std::string& path, os::Access access);
  ~ReservedMapping();
  ReservedMapping(const ReservedMapping&) = delete;
  ReservedMapping& operator=(const ReservedMapping&) = delete;

  std::byte* base() const { return base_; }
  std::uint64_t mapped_bytes() const { return mapped_bytes_; }
  std::uint64_t reserved_bytes() const { return reserved_bytes_; }
  const std::string& path() const { return path_; }

  // Makes at least [0, bytes) of `fd` accessible, rounding up to whole pages. The caller
  // guarantees the file is at least `bytes` long. Throws kFull past the reservation.
  void map_to(int fd, std::uint64_t bytes);
  // As map_to(), for a file that grows and is opened again (another descriptor) each time:
  // the first call maps the whole reservation from `fd`, past the file's end too, and later
  // calls map nothing, only raising mapped_bytes() to `bytes`. So the range stays one mapping
  // (pieces mapped from different descriptors are never merged: two more a growth of a store,
  // without bound), and following a growing file costs no system call. The caller guarantees
  // that every call names the same file, at least `bytes` long, and that nothing touches the
  // mapping past mapped_bytes() (a page past the file's end raises SIGBUS).
  void map_ahead(int fd, std::uint64_t bytes);

 private:
  std::byte* base_ = nullptr;
  std::uint64_t reserved_bytes_ = 0;
  std::uint64_t mapped_bytes_ = 0;
  bool mapped_ahead_ = false;  // map_ahead() has mapped the whole reservation.
  std::string path_;
  os::Access access_;
};

}  // namespace embstore::detail
