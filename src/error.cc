#include "embstore/error.h"

namespace embstore {

const char* error_code_name(ErrorCode code) noexcept {
  switch (code) {
    case ErrorCode::kInvalidArgument:
      return "invalid-argument";
    case ErrorCode::kNotFound:
      return "not-found";
    case ErrorCode::kAlreadyExists:
      return "already-exists";
    case ErrorCode::kCorruption:
      return "corruption";
    case ErrorCode::kFormatMismatch:
      return "format-mismatch";
    case ErrorCode::kUnsupportedVersion:
      return "unsupported-version";
    case ErrorCode::kIO:
      return "io";
    case ErrorCode::kFull:
      return "full";
    case ErrorCode::kReadOnly:
      return "read-only";
    case ErrorCode::kPoisoned:
      return "poisoned";
    case ErrorCode::kForkedChild:
      return "forked-child";
    case ErrorCode::kClosed:
      return "closed";
  }
  return "unknown";
}

}  // namespace embstore
