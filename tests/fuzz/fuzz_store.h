// fuzz_store.h — the fuzz entry over open / verify / iterate of arbitrary store bytes.
//
// Input format (see README in run.sh): one flags byte, then the store's files separated by the
// 8-byte token "#EMBFILE":  flags  header  #EMBFILE  rows.1  #EMBFILE  index.1
// A file whose part is missing is not created. Flags:
//   bit 0  recompute header_checksum after the fuzzer's mutation (reach past the header check)
//   bit 1  stamp the fuzzer's boot id into the state page (same boot: O(1) open; else recovery)
//   bit 2  also open a Writer (recovery) and append one row, which must read back valid
//   bit 3  then truncate: to half the rows before that one, or with bit 4 from epoch 7 (the
//          appended row's), which must keep exactly that prefix
//   bit 5  salvage the store into a new one (before any writer), which must copy exactly the
//          rows that verify, unchanged, and leave the damaged store as it was
//   bit 6  with bit 2: close the writer (it syncs), then open the store again after a reboot,
//          which must keep every row
// The same entry is linked into libFuzzer (clang, tests/fuzz/run.sh), into the g++ replay driver
// that ctest runs over the committed corpus, and into the torture suite's scenario 13.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);

namespace embstore::fuzz {

inline constexpr char kSeparator[] = "#EMBFILE";  // 8 bytes, no terminator used
inline constexpr std::size_t kSeparatorBytes = 8;

// Serializes the store at `dir` (header, rows.1, index.1) as a fuzz input with `flags`.
std::string encode_store(const std::string& dir, std::uint8_t flags);

}  // namespace embstore::fuzz
