#include "support/checker.h"

#include "support/payload.h"

namespace embstore::test {

std::string StreamChecker::check(const Reader& reader, std::uint64_t end) {
  const auto keys = reader.keys(0, end);
  const RowsView rows = reader.rows(0, end);
  for (std::uint64_t row = next_row_; row < end; ++row) {
    const std::uint64_t key = keys[row];
    const std::uint64_t writer = key_writer(key);
    const std::uint64_t seq = key_seq(key);
    const std::string where = "row " + std::to_string(row) + " (writer " + std::to_string(writer) +
                              ", seq " + std::to_string(seq) + "): ";
    std::uint64_t& expected = next_seq_[writer];
    if (seq != expected) {
      return where + "expected seq " + std::to_string(expected) +
             " (lost, duplicated or reordered)";
    }
    ++expected;
    const bool batch_start = seq % batch_rows(writer) == 0;
    if (!batch_start && (row == 0 || keys[row - 1] != key - 1)) {
      return where + "batch not contiguous";
    }
    if (!payload_matches(key, dim_, rows.row(row))) return where + "payload differs (torn row)";
    try {
      (void)reader.record(row);
    } catch (const std::exception& e) {
      return where + e.what();
    }
  }
  if (end > 0) {
    const std::uint64_t last = keys[end - 1];
    if ((key_seq(last) + 1) % batch_rows(key_writer(last)) != 0) {
      return "snapshot of " + std::to_string(end) + " rows ends inside a batch of writer " +
             std::to_string(key_writer(last)) + " (torn batch visible)";
    }
  }
  next_row_ = end;
  return "";
}

}  // namespace embstore::test
