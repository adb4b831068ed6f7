#include "support/payload.h"

#include <cstring>

namespace embstore::test {
namespace {
std::uint64_t splitmix(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
}  // namespace

void payload_for(std::uint64_t key, std::uint32_t dim, float* out) {
  std::uint64_t state = key * 0x2545f4914f6cdd1dull + 17;
  for (std::uint32_t i = 0; i < dim; ++i) {
    out[i] = static_cast<float>(static_cast<std::int32_t>(splitmix(state) >> 40)) / 1024.0f;
  }
}

std::vector<float> batch_payload(std::uint64_t writer, std::uint64_t first_seq, std::uint64_t rows,
                                 std::uint32_t dim) {
  std::vector<float> values(rows * dim);
  for (std::uint64_t i = 0; i < rows; ++i) {
    payload_for(make_key(writer, first_seq + i), dim, values.data() + i * dim);
  }
  return values;
}

bool payload_matches(std::uint64_t key, std::uint32_t dim, const void* row) {
  std::vector<float> expected(dim);
  payload_for(key, dim, expected.data());
  return std::memcmp(expected.data(), row, dim * sizeof(float)) == 0;
}

}  // namespace embstore::test
