// The embstore command-line tool: info and verify, their exit codes and JSON, named errors, and
// that read-only commands never change a byte.
#include <catch2/catch.hpp>
#include <cstdlib>
#include <vector>

#include "embstore/embstore.h"
#include "support/payload.h"
#include "support/temp_dir.h"

using namespace embstore;
using embstore::test::TempDir;

namespace {

std::string cli() {
  const char* dir = std::getenv("EMBSTORE_TEST_BIN_DIR");
  REQUIRE(dir != nullptr);
  return std::string(dir) + "/embstore";
}

// Runs the tool; returns its exit status and fills `out` with stdout+stderr.
int run(const TempDir& dir, const std::string& args, std::string* out) {
  const std::string log = dir / "cli.out";
  const int status = test::run_shell(cli() + " " + args + " > '" + log + "' 2>&1");
  *out = test::read_file(log);
  return status;
}

std::string make_store(const TempDir& dir) {
  const std::string path = dir / "s";
  CreateOptions o;
  o.dim = 4;
  o.dtype = DType::kFloat16;
  o.segment_bytes = 4096;
  o.metadata = R"({"model":"tiny"})";
  Writer w = Writer::create(path, o);
  const auto values = test::batch_payload(0, 0, 20, 4);
  std::vector<std::uint64_t> keys(20);
  for (int i = 0; i < 20; ++i) keys[i] = i;
  w.append(keys, 3, std::span<const float>(values));
  w.sync();
  return path;
}

std::string all_bytes(const std::string& path) {
  return test::read_file(path + "/header") + test::read_file(path + "/rows.1") +
         test::read_file(path + "/index.1");
}

}  // namespace

TEST_CASE("embstore info prints the header and counters, as text and JSON", "[cli]") {
  TempDir dir;
  const std::string path = make_store(dir);
  std::string out;
  CHECK(run(dir, "info '" + path + "'", &out) == 0);
  CHECK_THAT(out, Catch::Contains("float16") && Catch::Contains("committed rows  20") &&
                      Catch::Contains("durable rows    20") && Catch::Contains("\"model\""));
  CHECK(run(dir, "info '" + path + "' --json", &out) == 0);
  CHECK_THAT(out, Catch::Contains("\"committed_rows\":20") && Catch::Contains("\"dim\":4") &&
                      Catch::Contains(R"("metadata":"{\"model\":\"tiny\"}")"));
}

TEST_CASE("embstore verify exits 0 on a sound store and 1 naming bad rows", "[cli]") {
  TempDir dir;
  const std::string path = make_store(dir);
  std::string out;
  CHECK(run(dir, "verify '" + path + "'", &out) == 0);
  CHECK_THAT(out, Catch::Contains("0 bad"));
  test::write_bytes(path + "/rows.1", 7 * 8 + 1, "\x7f");
  CHECK(run(dir, "verify '" + path + "'", &out) == 1);
  CHECK_THAT(out, Catch::Contains("bad row 7"));
  CHECK(run(dir, "verify '" + path + "' --json", &out) == 1);
  CHECK_THAT(out, Catch::Contains("\"bad_rows\":[7]"));
  CHECK(run(dir, "verify '" + path + "' --from 8 --to 20", &out) == 0);
}

TEST_CASE("Read-only commands never change a byte", "[cli][read-only]") {
  TempDir dir;
  const std::string path = make_store(dir);
  const std::string before = all_bytes(path);
  std::string out;
  run(dir, "info '" + path + "'", &out);
  run(dir, "info '" + path + "' --json", &out);
  run(dir, "verify '" + path + "'", &out);
  CHECK(all_bytes(path) == before);
}

TEST_CASE("Bad paths and arguments get named errors and distinct exit codes", "[cli][errors]") {
  TempDir dir;
  std::string out;
  CHECK(run(dir, "info '" + (dir / "nope") + "'", &out) == 10 + int(ErrorCode::kNotFound));
  CHECK_THAT(out, Catch::Contains(dir / "nope"));
  test::run_shell("mkdir '" + (dir / "plain") + "'");
  CHECK(run(dir, "verify '" + (dir / "plain") + "'", &out) == 10 + int(ErrorCode::kNotFound));
  CHECK_THAT(out, Catch::Contains("not an embstore store"));
  CHECK(run(dir, "frobnicate x", &out) == 2);
  CHECK_THAT(out, Catch::Contains("unknown command \"frobnicate\""));
  CHECK(run(dir, "info", &out) == 2);
  CHECK(run(dir, "verify x --from -3", &out) == 2);
  CHECK_THAT(out, Catch::Contains("--from takes a row number"));
  CHECK(run(dir, "--help", &out) == 0);
  CHECK_THAT(out, Catch::Contains("usage: embstore"));
}
