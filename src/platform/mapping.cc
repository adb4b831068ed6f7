#include "platform/mapping.h"

#include "embstore/error.h"
#include "format/format.h"

namespace embstore::detail {
ReservedMapping::ReservedMapping(std::uint64_t reserve_bytes, const std::string& path,
                                 os::Access access)
    : reserved_bytes_(round_up(reserve_bytes, kPageBytes)), path_(path), access_(access) {
  base_ = static_cast<std::byte*>(os::reserve(reserved_bytes_, path));
}

ReservedMapping::~ReservedMapping() { os::unmap(base_, reserved_bytes_); }

namespace {

// `bytes` rounded to whole pages, or kFull past the reservation.
std::uint64_t within(std::uint64_t bytes, std::uint64_t reserved_bytes, const std::string& path) {
  const std::uint64_t target = round_up(bytes, kPageBytes);
  if (target > reserved_bytes) {
    throw Error(ErrorCode::kFull, path + ": the store needs " + std::to_string(target) +
                                      " bytes of address space but map_bytes reserves " +
                                      std::to_string(reserved_bytes) +
                                      "; reopen with a larger map_bytes");
  }
  return target;
}

}  // namespace

void ReservedMapping::map_ahead(int fd, std::uint64_t bytes) {
  if (bytes <= mapped_bytes_) return;
  const std::uint64_t target = within(bytes, reserved_bytes_, path_);
  if (!mapped_ahead_) {
    os::map_fixed(base_ + mapped_bytes_, reserved_bytes_ - mapped_bytes_, fd, mapped_bytes_,
                  access_, path_);
    mapped_ahead_ = true;
  }
  mapped_bytes_ = target;
}

void ReservedMapping::map_to(int fd, std::uint64_t bytes) {
  if (bytes <= mapped_bytes_) return;
  const std::uint64_t target = within(bytes, reserved_bytes_, path_);
  // Mapping over the tail of the reservation replaces it; pages already mapped stay untouched,
  // so pointers into them remain valid.
  os::map_fixed(base_ + mapped_bytes_, target - mapped_bytes_, fd, mapped_bytes_, access_, path_);
  mapped_bytes_ = target;
}

}  // namespace embstore::detail
