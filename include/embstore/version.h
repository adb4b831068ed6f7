// embstore/version.h — library and on-disk format versions.
#pragma once

namespace embstore {

inline constexpr int kLibraryVersionMajor = 0;
inline constexpr int kLibraryVersionMinor = 1;
inline constexpr int kLibraryVersionPatch = 0;
inline constexpr const char* kLibraryVersion = "0.1.0";

// The on-disk format (src/format/FORMAT.md). A reader refuses a store whose major version is newer
// than kFormatVersionMajor; minor versions only add fields that older readers may ignore.
inline constexpr int kFormatVersionMajor = 1;
// Minor 1 added the key index (keys.K and the state page's key_generation); 1.0 stores open
// unchanged and are answered by scan until a writer builds their key index. Minor 2 added a
// second copy of the fixed header and the metadata (FORMAT.md). Minor 3 added the state page's
// last_commit_unix_ns (0 in older stores: unknown). Minor 4 added the fixed header's flags
// (0 in older stores: a store with a key index).
inline constexpr int kFormatVersionMinor = 4;
// The first minor whose header file holds a second copy of the fixed header (FORMAT.md); a
// Writer upgrades older stores to it, readers read both.
inline constexpr int kFormatMinorHeaderCopy = 2;

}  // namespace embstore
