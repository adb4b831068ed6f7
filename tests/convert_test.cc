// float32 -> float16 / bfloat16 conversion (src/format/convert.h): round to nearest, ties to even.
#include "format/convert.h"

#include <bit>
#include <catch2/catch.hpp>
#include <cmath>
#include <limits>

using namespace embstore::detail;

TEST_CASE("float16 conversion of exactly representable values is exact", "[convert]") {
  CHECK(float_to_half(0.0f) == 0x0000);
  CHECK(float_to_half(-0.0f) == 0x8000);
  CHECK(float_to_half(1.0f) == 0x3c00);
  CHECK(float_to_half(-2.0f) == 0xc000);
  CHECK(float_to_half(65504.0f) == 0x7bff);               // largest half
  CHECK(float_to_half(std::ldexp(1.0f, -14)) == 0x0400);  // smallest normal
  CHECK(float_to_half(std::ldexp(1.0f, -24)) == 0x0001);  // smallest subnormal
}

TEST_CASE("float16 conversion rounds to nearest, ties to even", "[convert]") {
  // 1 + 2^-11 lies halfway between 1 (even) and 1 + 2^-10: rounds down to the even one.
  CHECK(float_to_half(1.0f + std::ldexp(1.0f, -11)) == 0x3c00);
  // 1 + 3 * 2^-11 is halfway between 1 + 2^-10 (odd) and 1 + 2^-9 (even): rounds up.
  CHECK(float_to_half(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3c02);
  // Just above the halfway point rounds up.
  CHECK(float_to_half(std::nextafter(1.0f + std::ldexp(1.0f, -11), 2.0f)) == 0x3c01);
  // Subnormal halfway: 2^-25 is half the smallest subnormal -> 0 (even).
  CHECK(float_to_half(std::ldexp(1.0f, -25)) == 0x0000);
  CHECK(float_to_half(3 * std::ldexp(1.0f, -25)) == 0x0002);
}

TEST_CASE("float16 conversion saturates to infinity and keeps NaN", "[convert]") {
  CHECK(float_to_half(65520.0f) == 0x7c00);  // rounds past the largest half
  CHECK(float_to_half(1e30f) == 0x7c00);
  CHECK(float_to_half(-std::numeric_limits<float>::infinity()) == 0xfc00);
  const std::uint16_t nan = float_to_half(std::numeric_limits<float>::quiet_NaN());
  CHECK((nan & 0x7c00) == 0x7c00);
  CHECK((nan & 0x03ff) != 0);
}

TEST_CASE("Every float16 value survives half -> float -> half", "[convert]") {
  for (std::uint32_t bits = 0; bits < 0x10000; ++bits) {
    const auto h = static_cast<std::uint16_t>(bits);
    const float f = half_to_float(h);
    if (std::isnan(f)) continue;
    REQUIRE(float_to_half(f) == h);
  }
}

TEST_CASE("bfloat16 conversion rounds to nearest even and keeps NaN quiet", "[convert]") {
  CHECK(float_to_bfloat16(1.0f) == 0x3f80);
  CHECK(float_to_bfloat16(-1.0f) == 0xbf80);
  // 1 + 2^-8 is halfway between 1 (even mantissa) and 1 + 2^-7: stays 1.
  CHECK(float_to_bfloat16(1.0f + std::ldexp(1.0f, -8)) == 0x3f80);
  // 1 + 3 * 2^-8 is halfway with an odd lower neighbour: rounds up to even.
  CHECK(float_to_bfloat16(1.0f + 3 * std::ldexp(1.0f, -8)) == 0x3f82);
  CHECK(float_to_bfloat16(std::numeric_limits<float>::infinity()) == 0x7f80);
  const std::uint16_t nan = float_to_bfloat16(std::numeric_limits<float>::quiet_NaN());
  CHECK((nan & 0x7f80) == 0x7f80);
  CHECK((nan & 0x007f) != 0);
  // A signalling NaN whose payload lives only in the dropped bits must not become infinity.
  const float snan = std::bit_cast<float>(0x7f800001u);
  CHECK(float_to_bfloat16(snan) != 0x7f80);
}

TEST_CASE("Every bfloat16 value survives bf16 -> float -> bf16", "[convert]") {
  for (std::uint32_t bits = 0; bits < 0x10000; ++bits) {
    const auto b = static_cast<std::uint16_t>(bits);
    const float f = bfloat16_to_float(b);
    if (std::isnan(f)) continue;
    REQUIRE(float_to_bfloat16(f) == b);
  }
}
