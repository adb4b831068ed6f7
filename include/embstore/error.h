// embstore/error.h — the one error type every embstore call throws.
//
// Failures are exceptions of type embstore::Error, including a row asked for outside the
// snapshot (kInvalidArgument). Every message names the file, field or value involved, so it can
// be shown to a user as is.
#pragma once

#include <stdexcept>
#include <string>

namespace embstore {

// Frozen numeric values: bindings and the CLI's exit codes depend on them.
enum class ErrorCode : int {
  kInvalidArgument = 1,     // A caller's argument is wrong (dim, dtype, lengths, ranges, options).
  kNotFound = 2,            // Nothing at the path asked for, or it is not a store.
  kAlreadyExists = 3,       // create() over an existing store.
  kCorruption = 4,          // Bytes on disk fail a checksum or a structural check, or a
                            // file a store's header implies is missing (rows.G, index.G).
  kFormatMismatch = 5,      // The store's dim/dtype differ from what the caller asked for.
  kUnsupportedVersion = 6,  // Written by a newer, incompatible format major version.
  kIO = 7,                  // An operating-system call failed (errno in sys_errno()).
  kFull = 8,                // No space: ENOSPC/EFBIG, or the store outgrew its map_bytes.
  kReadOnly = 9,            // Writing was asked of a read-only file or file system.
  kPoisoned = 10,           // A previous sync failed (or, in the Python binding, an async
                            // background append refused a batch); writes are refused until
                            // the store is reopened.
  kForkedChild = 11,        // A forked child used a Writer its parent opened.
  kClosed = 12,             // The object was closed (or moved from).
  kPermissionDenied = 13,   // The OS refused access to a file (EACCES/EPERM) when reading it.
  kInterrupted = 14,        // A wait for the writer lock was interrupted by a signal the
                            // process asked to act on (the Python binding: Ctrl-C; also its
                            // async queue's waits); nothing was written.
};

// Stable snake_case name of a code ("corruption", "invalid_argument", ...): the one table of
// names; the Python binding's exceptions carry it as `code`.
const char* error_code_name(ErrorCode code) noexcept;

// The code of a failed operating-system call that created or wrote `errno` err: kNotFound
// (ENOENT), kFull (ENOSPC, EFBIG, EDQUOT), kReadOnly (EROFS, EACCES, EPERM), else kIO. The one
// mapping the library and the tools share (opening a file for reading maps EACCES/EPERM to
// kPermissionDenied instead).
ErrorCode error_code_for_write_errno(int err) noexcept;

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message, int sys_errno = 0)
      : std::runtime_error(message), code_(code), sys_errno_(sys_errno) {}

  ErrorCode code() const noexcept { return code_; }
  // The errno of the failed system call for kIO/kFull/kReadOnly/kNotFound/kPermissionDenied,
  // else 0.
  int sys_errno() const noexcept { return sys_errno_; }

 private:
  ErrorCode code_;
  int sys_errno_;
};

}  // namespace embstore
