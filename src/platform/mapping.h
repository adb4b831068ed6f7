// mapping.h — a file mapped inside an address range reserved once, so it can grow in place.
//
// The reservation (PROT_NONE, no backing) is taken at construction; map_to() maps more of the
// file over it with MAP_FIXED. The base address never changes, so every pointer handed out stays
// valid until the ReservedMapping is destroyed. Not thread-safe: callers serialize map_to();
// base() and mapped_bytes() may be read by the thread that called map_to().
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

  // Makes at least [0, bytes) of `fd` accessible, rounding up to whole pages. The caller
  // guarantees the file is at least `bytes` long. Throws kFull past the reservation.
  void map_to(int fd, std::uint64_t bytes);

 private:
  std::byte* base_ = nullptr;
  std::uint64_t reserved_bytes_ = 0;
  std::uint64_t mapped_bytes_ = 0;
  std::string path_;
  os::Access access_;
};

}  // namespace embstore::detail
