"""Exceptions raised by embstore, and how the C++ error codes map onto them.

=====================  =======================================================
C++ ErrorCode          Python exception
=====================  =======================================================
kInvalidArgument       ValueError (bad shape, dtype, dim, key, range, option)
kNotFound              FileNotFoundError (an OSError; errno ENOENT); NotAStoreError (an
                       embstore.Error) when the path exists but is not a store
kAlreadyExists         FileExistsError (an OSError; errno EEXIST)
kIO                    OSError with the failed call's errno
kFull                  OSError, errno ENOSPC/EFBIG (disk full, or map_bytes outgrown)
kReadOnly              OSError, errno EROFS/EACCES/EPERM (writing was asked)
kPermissionDenied      PermissionError (an OSError; errno EACCES/EPERM): reading was refused
kCorruption            CorruptionError (an embstore.Error)
kFormatMismatch        FormatMismatchError (an embstore.Error and a ValueError)
kUnsupportedVersion    UnsupportedVersionError (an embstore.Error)
kPoisoned              PoisonedError (an embstore.Error): a sync failed, or an async
                       Writer's background append refused a batch; reopen
kForkedChild           ForkedChildError (an embstore.Error)
kClosed                ClosedError (an embstore.Error and a ValueError, like I/O on a
                       closed Python file)
kInterrupted           what the SIGINT handler raised (KeyboardInterrupt): a Ctrl-C ended
                       a wait for the writer lock (append, truncate; nothing was written) or
                       an async writer's wait for room (not queued), flush or close (written
                       on). Only Python's default SIGINT handler ends such a wait; under
                       a handler of the program's own the wait goes on
=====================  =======================================================

Every exception carries the C++ message (it names the file, field or value) and has a ``code``
attribute with the C++ code's name ("corruption", "io", ...).
"""

import errno as _errno

from . import _embstore

__all__ = [
    "Error",
    "NotAStoreError",
    "CorruptionError",
    "FormatMismatchError",
    "UnsupportedVersionError",
    "PoisonedError",
    "ForkedChildError",
    "ClosedError",
]


class Error(Exception):
    """Base class of embstore's own exceptions (store state, not caller or OS errors).

    Attributes:
        code: the C++ ErrorCode's name, e.g. "corruption".
        errno: the errno of the system call behind it, or 0.
    """

    code = "error"
    errno = 0


class NotAStoreError(Error):
    """The path exists (a file, or a directory) but is not a store (raised by Writer, Reader
    and info; a missing path is FileNotFoundError)."""

    code = "not_a_store"


class CorruptionError(Error):
    """Bytes on disk fail a checksum or a structural check; the message names the file/row."""

    code = "corruption"


class FormatMismatchError(Error, ValueError):
    """The store's dim or dtype differ from what the caller asked for, or the store at a path
    is not the one (or the generation, or the snapshot) a ShardSet or a Dask graph was made of."""

    code = "format_mismatch"


class UnsupportedVersionError(Error):
    """The store was written by a newer, incompatible format version."""

    code = "unsupported_version"


class PoisonedError(Error):
    """A sync failed, or an async Writer's background append failed (a donated array's value
    beyond the store's dtype; a full disk, reported as such once, then as this); the Writer
    refuses writes until the store is reopened."""

    code = "poisoned"


class ForkedChildError(Error):
    """A forked child used a Writer its parent opened; the child must open its own."""

    code = "forked_child"


class ClosedError(Error, ValueError):
    """The Writer or Reader was closed."""

    code = "closed"


_CLASSES = {
    4: CorruptionError,
    5: FormatMismatchError,
    6: UnsupportedVersionError,
    10: PoisonedError,
    11: ForkedChildError,
    12: ClosedError,
}

_DEFAULT_ERRNO = {
    2: _errno.ENOENT,
    3: _errno.EEXIST,
    7: _errno.EIO,
    8: _errno.ENOSPC,
    9: _errno.EROFS,
    13: _errno.EACCES,
    14: _errno.EINTR,
}


for _cls in (Error, NotAStoreError, CorruptionError, FormatMismatchError, UnsupportedVersionError,
             PoisonedError, ForkedChildError, ClosedError):
    _cls.__module__ = "embstore"


def from_code(code: int, message: str, sys_errno: int = 0) -> BaseException:
    """Returns the exception instance for a C++ embstore::Error (used by the C++ module)."""
    name = _embstore.error_code_name(code)  # the one table of names, in C++ (error.cc)
    if code == 1:
        exc = ValueError(message)
    elif code in _DEFAULT_ERRNO:
        # OSError(errno, msg) becomes FileNotFoundError, FileExistsError, ... by errno.
        exc = OSError(sys_errno or _DEFAULT_ERRNO[code], message)
    else:
        exc = _CLASSES.get(code, Error)(message)
        exc.errno = sys_errno
    exc.code = name
    return exc
