// convert_check — src/format/convert_fast.h must give bit-for-bit convert.h's results. Checks every
// 2^32 float32 bit pattern with --exhaustive, else every pattern whose low 8 bits are 0x00, 0x7f,
// 0x80 or 0xff (2^26 of them: every exponent, sign and rounding boundary) plus special values.
// Prints the first mismatch and exits 1. Registered as a ctest (label bench-smoke).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "format/convert.h"
#include "format/convert_fast.h"

namespace {

int check(const std::vector<std::uint32_t>& bits, std::uint64_t& checked) {
  const std::size_t n = bits.size();
  std::vector<float> in(n);
  std::memcpy(in.data(), bits.data(), n * 4);
  std::vector<std::uint16_t> want(n), got(n);
  using Scalar = void (*)(const float*, std::uint16_t*, std::size_t) noexcept;
  using Fast = bool (*)(const float*, std::uint16_t*, std::size_t) noexcept;
  const struct {
    const char* name;
    Scalar scalar;
    Fast fast;
    std::uint16_t infinity;
  } pairs[] = {{"float16", embstore::detail::convert_to_half,
                embstore::detail::convert_to_half_fast, embstore::detail::kHalfInfinity},
               {"bfloat16", embstore::detail::convert_to_bfloat16,
                embstore::detail::convert_to_bfloat16_fast, embstore::detail::kBFloat16Infinity}};
  for (const auto& p : pairs) {
    p.scalar(in.data(), want.data(), n);
    // Pieces of 19: two vector steps and a scalar tail each, and the flag "some element written
    // is an infinity" checked for every piece (a whole batch of patterns always has one).
    constexpr std::size_t kPiece = 19;
    for (std::size_t at = 0; at < n; at += kPiece) {
      const std::size_t count = std::min(kPiece, n - at);
      const bool flagged = p.fast(in.data() + at, got.data() + at, count);
      bool infinite = false;
      for (std::size_t i = at; i < at + count; ++i) infinite |= (want[i] & 0x7fff) == p.infinity;
      if (flagged != infinite) {
        std::printf("MISMATCH %s: infinity flag %d for inputs %zu..%zu, want %d\n", p.name,
                    int{flagged}, at, at + count, int{infinite});
        return 1;
      }
    }
    for (std::size_t i = 0; i < n; ++i) {
      if (want[i] != got[i]) {
        std::printf("MISMATCH %s: input 0x%08x: scalar 0x%04x, fast 0x%04x\n", p.name, bits[i],
                    want[i], got[i]);
        return 1;
      }
    }
  }
  checked += n;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const bool exhaustive = argc > 1 && std::strcmp(argv[1], "--exhaustive") == 0;
  std::uint64_t checked = 0;
  std::vector<std::uint32_t> bits;
  bits.reserve(1 << 20);
  auto add = [&](std::uint32_t x) {
    bits.push_back(x);
    if (bits.size() == bits.capacity()) {
      if (check(bits, checked) != 0) return false;
      bits.clear();
    }
    return true;
  };
  for (std::uint64_t high = 0; high < (1ull << 24); ++high) {
    if (exhaustive) {
      for (std::uint32_t low = 0; low < 256; ++low) {
        if (!add(static_cast<std::uint32_t>(high << 8 | low))) return 1;
      }
    } else {
      for (std::uint32_t low : {0x00u, 0x7fu, 0x80u, 0xffu}) {
        if (!add(static_cast<std::uint32_t>(high << 8 | low))) return 1;
      }
    }
  }
  for (std::uint32_t special : {0x7f800000u, 0xff800000u, 0x7fc00000u, 0x7f800001u, 0xffffffffu,
                                0x477ff000u, 0x477fefffu, 0x38800000u, 0x387fffffu, 0x33000000u,
                                0x33000001u, 0x80000000u, 0x00000001u, 0x3f800000u}) {
    bits.push_back(special);
  }
  while (bits.size() < 8) bits.push_back(0);
  if (check(bits, checked) != 0) return 1;
  std::printf("convert_fast matches convert on %llu float32 bit patterns\n",
              static_cast<unsigned long long>(checked));
  return 0;
}
