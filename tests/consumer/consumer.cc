// Creates a store, appends two rows and reads them back through the installed headers.
#include <cstdio>
#include <string>
#include <vector>

#include "embstore/embstore.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: consumer <store path>\n");
    return 2;
  }
  embstore::CreateOptions options;
  options.dim = 4;
  embstore::Writer writer = embstore::Writer::create(argv[1], options);
  const std::vector<float> values = {1, 2, 3, 4, 5, 6, 7, 8};
  const std::vector<std::uint64_t> keys = {10, 20};
  writer.append(keys, 0, std::span<const float>(values));
  writer.close();
  embstore::Reader reader = embstore::Reader::open(argv[1]);
  if (reader.size() != 2 || reader.record(1).key != 20) {
    std::fprintf(stderr, "consumer: read back %llu rows\n",
                 static_cast<unsigned long long>(reader.size()));
    return 1;
  }
  std::printf("consumer: ok\n");
  return 0;
}
