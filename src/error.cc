#include "embstore/error.h"

#include <cerrno>

namespace embstore {

const char* error_code_name(ErrorCode code) noexcept {
  switch (code) {
    case ErrorCode::kInvalidArgument:
      return "invalid_argument";
    case ErrorCode::kNotFound:
      return "not_found";
    case ErrorCode::kAlreadyExists:
      return "already_exists";
    case ErrorCode::kCorruption:
      return "corruption";
    case ErrorCode::kFormatMismatch:
      return "format_mismatch";
    case ErrorCode::kUnsupportedVersion:
      return "unsupported_version";
    case ErrorCode::kIO:
      return "io";
    case ErrorCode::kFull:
      return "full";
    case ErrorCode::kReadOnly:
      return "read_only";
    case ErrorCode::kPoisoned:
      return "poisoned";
    case ErrorCode::kForkedChild:
      return "forked_child";
    case ErrorCode::kClosed:
      return "closed";
    case ErrorCode::kPermissionDenied:
      return "permission_denied";
    case ErrorCode::kInterrupted:
      return "interrupted";
  }
  return "unknown";
}

ErrorCode error_code_for_write_errno(int err) noexcept {
  switch (err) {
    case ENOENT:
      return ErrorCode::kNotFound;
    case ENOSPC:
    case EFBIG:
    case EDQUOT:
      return ErrorCode::kFull;
    case EROFS:
    case EACCES:
    case EPERM:
      return ErrorCode::kReadOnly;
    default:
      return ErrorCode::kIO;
  }
}

}  // namespace embstore
