// fuzz_replay — runs the fuzz entry (built with g++, no libFuzzer) over files and directories:
//   fuzz_replay <file-or-dir>...       replay every input; exit 0 when none crashed
//   fuzz_replay --make-seeds <dir>     write the seed corpus of valid small stores
// ctest runs the first form over tests/fuzz/corpus on every run (label fuzz-replay).
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "embstore/embstore.h"
#include "fuzz_store.h"

namespace fs = std::filesystem;

namespace {

int make_seeds(const std::string& out_dir) {
  fs::create_directories(out_dir);
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base && *base ? base : "/tmp") + "/embstore-seeds-XXXXXX";
  if (::mkdtemp(tmpl.data()) == nullptr) return 1;
  struct Shape {
    embstore::DType dtype;
    std::uint32_t dim;
    std::uint64_t rows;
    std::uint64_t segment;
    bool sync;
    const char* metadata;
  };
  const Shape shapes[] = {
      {embstore::DType::kFloat32, 4, 0, 4096, false, ""},
      {embstore::DType::kFloat32, 4, 3, 4096, true, "{\"m\":1}"},
      {embstore::DType::kFloat32, 8, 20, 4096, false, ""},
      {embstore::DType::kFloat16, 8, 5, 4096, true, ""},
      {embstore::DType::kBFloat16, 3, 7, 4096, false, ""},
      {embstore::DType::kInt8, 16, 9, 4096, true, ""},
      {embstore::DType::kUInt8, 1, 30, 4096, false, ""},
      {embstore::DType::kFloat64, 2, 6, 8192, true, "{}"},
      {embstore::DType::kFloat32, 1, 200, 4096, false, ""},  // grows past one segment
  };
  int count = 0;
  for (const Shape& s : shapes) {
    const std::string store = tmpl + "/s" + std::to_string(count);
    embstore::CreateOptions co;
    co.dtype = s.dtype;
    co.dim = s.dim;
    co.segment_bytes = s.segment;
    co.metadata = s.metadata;
    embstore::Writer w = embstore::Writer::create(store, co);
    const std::uint64_t row_bytes = std::uint64_t{s.dim} * embstore::dtype_size(s.dtype);
    for (std::uint64_t r = 0; r < s.rows; ++r) {
      std::vector<unsigned char> row(row_bytes);
      for (std::size_t i = 0; i < row.size(); ++i) row[i] = static_cast<unsigned char>(r * 7 + i);
      const std::uint64_t key = 1000 + r;
      w.append(std::span<const std::uint64_t>(&key, 1), r / 3,
               embstore::ConstMatrix{row.data(), s.dtype, 1, s.dim, 0});
      if (s.sync && r == s.rows / 2) w.sync();
    }
    w.close();
    // Flags (fuzz_store.h): none; checksum fixed, same boot; and a writer; and a truncate by
    // rows (15); after a reboot, a truncate from an epoch and a salvage (61); a close and a
    // reopen after a reboot, the writer's open after one too (69) or not (71). A truncate leaves
    // every row durable, so the close is checked on its own.
    for (std::uint8_t flags : {0, 3, 7, 15, 61, 69, 71}) {
      std::ofstream out(out_dir + "/seed-" + std::to_string(count) + "-f" + std::to_string(flags),
                        std::ios::binary);
      const std::string bytes = embstore::fuzz::encode_store(store, flags);
      out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    }
    ++count;
  }
  fs::remove_all(tmpl);
  std::printf("wrote %d seed stores x 3 flag sets to %s\n", count, out_dir.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 3 && std::strcmp(argv[1], "--make-seeds") == 0) return make_seeds(argv[2]);
  std::vector<fs::path> inputs;
  for (int i = 1; i < argc; ++i) {
    fs::path p(argv[i]);
    if (fs::is_directory(p)) {
      for (const auto& e : fs::recursive_directory_iterator(p)) {
        if (e.is_regular_file()) inputs.push_back(e.path());
      }
    } else {
      inputs.push_back(p);
    }
  }
  // Every run also covers the edge inputs the spec names, whatever the corpus holds.
  const std::vector<std::string> builtin = {"", std::string(1, '\0'), std::string(1, '\x07'),
                                            "\x07#EMBFILE#EMBFILE",
                                            "\x03"
                                            "EMBSTORE"};
  for (const std::string& b : builtin) {
    LLVMFuzzerTestOneInput(reinterpret_cast<const std::uint8_t*>(b.data()), b.size());
  }
  std::size_t n = 0;
  for (const auto& path : inputs) {
    std::ifstream in(path, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    LLVMFuzzerTestOneInput(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size());
    ++n;
  }
  std::printf("replayed %zu corpus inputs and %zu built-in edge inputs without a crash\n", n,
              builtin.size());
  if (const char* dir = std::getenv("EMBSTORE_STATS_DIR")) {
    std::ofstream stats(std::string(dir) + "/stats.replay." + std::to_string(::getpid()),
                        std::ios::app);
    stats << "corrupt_inputs " << n + builtin.size() << "\n";
  }
  if (n == 0) {
    std::fprintf(stderr, "no corpus inputs found: the replay would prove nothing\n");
    return 1;
  }
  return 0;
}
