// error_code.h — what embstore::Error a call throws, for Catch2 tests.
#pragma once

#include <catch2/catch.hpp>
#include <functional>
#include <string>

#include "embstore/error.h"

namespace embstore::test {

// Runs `f`, which must throw embstore::Error; returns its code (and its message, if asked).
inline ErrorCode code_of(const std::function<void()>& f, std::string* message = nullptr) {
  try {
    f();
  } catch (const Error& e) {
    if (message) *message = e.what();
    return e.code();
  }
  FAIL("expected an embstore::Error");
  return ErrorCode::kIO;
}

}  // namespace embstore::test
