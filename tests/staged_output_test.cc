// StagedOutput (embstore/staged_output.h): a new output appears at its path whole or not at all,
// never replaces anything, and its errors name the output the user asked for.
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "embstore/embstore.h"
#include "platform/os.h"
#include "platform/testing.h"
#include "support/temp_dir.h"

namespace embstore {
namespace {

using test::TempDir;

std::vector<std::string> names_in(const std::string& dir) {
  std::vector<std::string> names = detail::os::list_dir(dir);
  std::sort(names.begin(), names.end());
  return names;
}

mode_t mode_of(const std::string& path) {
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  return st.st_mode & 07777;
}

mode_t current_umask() {
  const mode_t mask = ::umask(0);
  ::umask(mask);
  return mask;
}

Error error_of(const std::function<void()>& call) {
  try {
    call();
  } catch (const Error& e) {
    return e;
  }
  FAIL("no error");
  return Error(ErrorCode::kIO, "");
}

// A closed one-row store built in `staged` , its files listed.
std::vector<std::string> build_store(const StagedOutput& staged) {
  CreateOptions create;
  create.dim = 4;
  Writer writer = Writer::create(staged.path(), create);
  const float row[4] = {1, 2, 3, 4};
  writer.append(std::vector<std::uint64_t>{7}, 0, ConstMatrix{row, DType::kFloat32, 1, 4, 0});
  writer.sync();
  REQUIRE(staged.close_writer(writer, 1).empty());
  return names_in(staged.path());
}

TEST_CASE("A staged directory is hidden beside its output until published", "[staged]") {
  TempDir dir;
  const std::string out = dir / "out";
  std::string working;
  {
    StagedOutput staged(out + "//");  // Trailing slashes name the same output.
    CHECK(staged.out() == out);
    working = staged.path();
    CHECK(staged.working_dir() == working);
    CHECK(working.rfind(dir / ".out.partial-", 0) == 0);
    CHECK(working.size() == (dir / ".out.partial-").size() + 12);
    // mkdir(1)'s mode, not mkdtemp's 0700: readers of the output are other users too.
    CHECK(mode_of(working) == (0777 & ~current_umask()));
    std::ofstream(working + "/file") << "x";
    CHECK_FALSE(detail::os::entry_exists(out));
  }  // Destroyed unpublished: removed with what it held.
  CHECK_FALSE(detail::os::entry_exists(working));
  CHECK(names_in(dir.path()).empty());

  StagedOutput staged(out);
  std::ofstream(staged.path() + "/file") << "x";
  staged.publish();
  CHECK(staged.published());
  CHECK(names_in(dir.path()) == std::vector<std::string>{"out"});
  CHECK(names_in(out) == std::vector<std::string>{"file"});
}

TEST_CASE("A staged output never replaces anything at its path", "[staged]") {
  TempDir dir;
  const std::string out = dir / "out";
  SECTION("something there before") {
    std::ofstream(out) << "mine";
    Error e = error_of([&] { StagedOutput staged(out); });
    CHECK(e.code() == ErrorCode::kAlreadyExists);
    CHECK(std::string(e.what()) == out + ": already exists");
    REQUIRE(::unlink(out.c_str()) == 0);
    REQUIRE(::symlink("nowhere", out.c_str()) == 0);  // Dangling: the rename would fail on it.
    CHECK(error_of([&] { StagedOutput staged(out, OutputShape::kFile); }).code() ==
          ErrorCode::kAlreadyExists);
    CHECK(names_in(dir.path()) == std::vector<std::string>{"out"});
  }
  SECTION("something made there while it was built") {
    for (const OutputShape shape : {OutputShape::kDirectory, OutputShape::kFile}) {
      StagedOutput staged(out, shape);
      if (shape == OutputShape::kFile) std::ofstream(staged.path()) << "new";
      REQUIRE(::mkdir(out.c_str(), 0755) == 0);
      std::ofstream(out + "/theirs") << "theirs";
      Error e = error_of([&] { staged.publish(); });
      CHECK(e.code() == ErrorCode::kAlreadyExists);
      CHECK(std::string(e.what()) == out + ": already exists (the new output was removed)");
      CHECK_FALSE(staged.published());
      CHECK(names_in(dir.path()) == std::vector<std::string>{"out"});  // Working dir removed.
      CHECK(names_in(out) == std::vector<std::string>{"theirs"});
      detail::os::remove_tree(out);
    }
  }
}

TEST_CASE("Outputs are published where rename takes no flags, never replacing anything",
          "[staged]") {
  // NFS and most FUSE file systems answer renameat2's RENAME_NOREPLACE with EINVAL: every new
  // output (export, get --npy, compact, merge, salvage, import) failed there with "Invalid
  // argument". os::rename_no_replace now claims the name with mkdir or link instead.
  if (!detail::testing::kEnabled) return;
  TempDir dir;
  detail::testing::arm_fault(detail::testing::Op::kRenameNoReplace, 1, EINVAL, /*forever=*/true);
  {
    StagedOutput staged(dir / "d");
    std::ofstream(staged.path() + "/f") << "rows";
    staged.publish();
    CHECK(names_in(dir / "d") == std::vector<std::string>{"f"});
  }
  {
    StagedOutput staged(dir / "x.npy", OutputShape::kFile);
    std::ofstream(staged.path()) << "rows";
    staged.publish();
    CHECK(test::read_file(dir / "x.npy") == "rows");
  }
  {
    REQUIRE(::mkdir((dir / "volume").c_str(), 0755) == 0);
    StagedOutput staged(dir / "volume", OutputShape::kStoreInside);
    build_store(staged);
    staged.publish();
    CHECK(Reader::open(dir / "volume").size() == 1);
  }
  CHECK(names_in(dir.path()) == std::vector<std::string>{"d", "volume", "x.npy"});
  // Something made at the output while it was built: refused, theirs kept, ours removed.
  for (const OutputShape shape : {OutputShape::kDirectory, OutputShape::kFile}) {
    for (const bool empty : {true, false}) {
      const std::string out = dir / "out";
      StagedOutput staged(out, shape);
      if (shape == OutputShape::kFile) std::ofstream(staged.path()) << "new";
      REQUIRE(::mkdir(out.c_str(), 0755) == 0);
      if (!empty) std::ofstream(out + "/theirs") << "theirs";
      CHECK(error_of([&] { staged.publish(); }).code() == ErrorCode::kAlreadyExists);
      CHECK(names_in(out) ==
            (empty ? std::vector<std::string>{} : std::vector<std::string>{"theirs"}));
      detail::os::remove_tree(out);
    }
  }
  detail::testing::disarm_all();
  CHECK(names_in(dir.path()) == std::vector<std::string>{"d", "volume", "x.npy"});
}

TEST_CASE("A staged output that cannot be made says why, naming the output", "[staged]") {
  TempDir dir;
  const std::string missing = dir / "nodir/out";
  Error e = error_of([&] { StagedOutput staged(missing); });
  CHECK(e.code() == ErrorCode::kNotFound);
  CHECK(e.sys_errno() == ENOENT);
  CHECK(std::string(e.what()) ==
        missing + ": cannot write it: its directory " + dir / "nodir" + " does not exist");
  std::ofstream(dir / "afile") << "";
  e = error_of([&] { StagedOutput staged(dir / "afile/out", OutputShape::kFile); });
  CHECK(std::string(e.what()) ==
        dir / "afile/out" + ": cannot write it: " + dir / "afile" + " is not a directory");
  CHECK(error_of([] { StagedOutput staged(""); }).code() == ErrorCode::kInvalidArgument);
  CHECK(names_in(dir.path()) == std::vector<std::string>{"afile"});
}

TEST_CASE("A staged file is renamed to its output, its directory removed", "[staged]") {
  TempDir dir;
  const std::string out = dir / "x.npy";
  StagedOutput staged(out, OutputShape::kFile);
  CHECK(staged.path() == staged.working_dir() + "/x.npy");
  std::ofstream(staged.path()) << "rows";
  CHECK(names_in(dir.path()).size() == 1);  // The working directory only.
  staged.publish();
  CHECK(names_in(dir.path()) == std::vector<std::string>{"x.npy"});
  CHECK(test::read_file(out) == "rows");
}

TEST_CASE("A store staged inside an empty directory appears there whole", "[staged]") {
  TempDir dir;
  const std::string out = dir / "volume";
  REQUIRE(::mkdir(out.c_str(), 0755) == 0);
  StagedOutput staged(out, OutputShape::kStoreInside);
  CHECK(staged.path().rfind(out + "/.store.partial-", 0) == 0);
  build_store(staged);
  CHECK_THROWS(Reader::open(out));  // Nothing but the working directory yet.
  staged.publish();
  const std::vector<std::string> names = names_in(out);
  CHECK(std::none_of(names.begin(), names.end(),
                     [](const std::string& n) { return n.find(".partial-") != n.npos; }));
  const Reader reader = Reader::open(out);
  CHECK(reader.size() == 1);
  CHECK(reader.find(7).has_value());
}

TEST_CASE("A store made in the directory meanwhile leaves it as it was", "[staged]") {
  // The moves' roll-back removed files with remove_tree, which removes directories only: the
  // new store's lock, rows.1 and index.1 stayed in the user's directory beside the other
  // store's header, and the error said they were not moved.
  TempDir dir;
  const std::string out = dir / "volume";
  REQUIRE(::mkdir(out.c_str(), 0755) == 0);
  StagedOutput staged(out, OutputShape::kStoreInside);
  build_store(staged);
  std::ofstream(out + "/header") << "theirs";  // Another store's, made while this one was built.
  Error e = error_of([&] { staged.publish(); });
  CHECK(e.code() == ErrorCode::kAlreadyExists);
  CHECK_THAT(e.what(), Catch::Contains("another store was made in this directory meanwhile"));
  CHECK_FALSE(staged.published());
  CHECK(names_in(out) == std::vector<std::string>{"header"});
  CHECK(test::read_file(out + "/header") == "theirs");
}

TEST_CASE("A store whose header was moved in is kept when a flush then fails", "[staged]") {
  // It was reported as a bare "fsync ... Input/output error", and a retry appended every row
  // to the whole store a second time.
  TempDir dir;
  const std::string out = dir / "volume";
  REQUIRE(::mkdir(out.c_str(), 0755) == 0);
  StagedOutput staged(out, OutputShape::kStoreInside);
  const std::size_t files = build_store(staged).size();
  SECTION("the flush after the header's move") {
    // One flush of `out` after each file's move, the header's last.
    detail::testing::arm_fault(detail::testing::Op::kMsync, files, EIO, false);
    Error e = error_of([&] { staged.publish(); });
    detail::testing::disarm_all();
    CHECK(e.code() == ErrorCode::kIO);
    CHECK_THAT(e.what(), Catch::StartsWith(out + ": the store was made, but flushing") &&
                             Catch::Contains("it may vanish after a power loss"));
    CHECK(staged.published());
    CHECK(Reader::open(out).size() == 1);
    const std::vector<std::string> names = names_in(out);
    CHECK(names.size() == files);  // The working directory is gone.
  }
  SECTION("the flush after an earlier move") {
    detail::testing::arm_fault(detail::testing::Op::kMsync, 1, EIO, false);
    Error e = error_of([&] { staged.publish(); });
    detail::testing::disarm_all();
    CHECK(e.code() == ErrorCode::kIO);
    CHECK_THAT(e.what(), Catch::StartsWith(out + ": cannot write it: Input/output error ("));
    CHECK_FALSE(staged.published());
    CHECK(names_in(out).empty());  // Left as it was: empty.
  }
}

TEST_CASE("A failed rename names the output first and removes the new output", "[staged]") {
  TempDir dir;
  const std::string out = dir / "out";
  StagedOutput staged(out);
  detail::testing::arm_fault(detail::testing::Op::kRename, 1, EIO, false);
  Error e = error_of([&] { staged.publish(); });
  detail::testing::disarm_all();
  CHECK(e.code() == ErrorCode::kIO);
  CHECK_THAT(e.what(), Catch::StartsWith(out + ": cannot write it: Input/output error (rename "));
  CHECK(names_in(dir.path()).empty());
}

TEST_CASE("Any name an output may have can be staged", "[staged]") {
  TempDir dir;
  // 255 bytes, the most a name may have; its working directory's name keeps 200 of them, cut
  // before a UTF-8 character's continuation bytes.
  const std::string name = std::string(199, 'a') + "\xc3\xa9" + std::string(54, 'b');
  REQUIRE(name.size() == 255);
  StagedOutput staged(dir / name, OutputShape::kFile);
  const std::string hidden = staged.working_dir().substr(dir.path().size() + 1);
  CHECK(hidden.rfind("." + std::string(199, 'a') + ".partial-", 0) == 0);
  std::ofstream(staged.path()) << "x";
  staged.publish();
  CHECK(names_in(dir.path()) == std::vector<std::string>{name});
}

TEST_CASE("Errors met while building name the output first", "[staged]") {
  TempDir dir;
  const std::string out = dir / "out";
  StagedOutput staged(out);
  const std::string w = staged.working_dir();
  // A message that starts with the working directory names the output in its place.
  CHECK(staged.naming_out(w + ": cannot create the store: No space left on device", ENOSPC) ==
        out + ": cannot create the store: No space left on device");
  // Any other: the output and the cause first, the hidden file only in parentheses.
  CHECK(staged.naming_out("fallocate " + w + "/rows.1: No space left on device", ENOSPC) ==
        out + ": cannot write it: No space left on device (fallocate " + w + "/rows.1)");
  CHECK(staged.naming_out("the row is bad in " + w, 0) ==
        out + ": cannot write it: the row is bad in " + w);
  CHECK(staged.naming_out("nothing of ours", EIO).empty());
  try {
    try {
      throw Error(ErrorCode::kFull, "write " + w + "/index.1: No space left on device", ENOSPC);
    } catch (...) {
      staged.rethrow_naming_out();
    }
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kFull);
    CHECK(e.sys_errno() == ENOSPC);
    CHECK(std::string(e.what()) ==
          out + ": cannot write it: No space left on device (write " + w + "/index.1)");
  }
}

TEST_CASE("A new store is kept when close() fails after every row was synced", "[staged]") {
  TempDir dir;
  StagedOutput staged(dir / "out");
  const std::string w = staged.working_dir();
  const auto failing = [&] {
    throw Error(ErrorCode::kIO, w + ": the key index could not be maintained (keys.2)", EMFILE);
  };
  // Whole: the error's message comes back as a warning, naming the output.
  CHECK(staged.close_store(10, 10, 10, failing) ==
        dir / "out" + ": the key index could not be maintained (keys.2)");
  // Rows not committed, or not on the device: the error is thrown, for the output to go.
  CHECK_THROWS_AS(staged.close_store(10, 9, 9, failing), Error);
  CHECK_THROWS_AS(staged.close_store(10, 10, 4, failing), Error);
  CHECK(staged.close_store(10, 0, 0, [] {}).empty());
}

}  // namespace
}  // namespace embstore
