// serve: runs the Python server module, `python3 -m embstore.serve ARGS...`, in this process.
#include <limits.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>

#include "cli.h"

namespace embstore::cli {
namespace {

// The interpreter the Python package is built for (Debian's python3-* packages).
constexpr const char* kPython = "/usr/bin/python3";

// <bindir>/../python, where the build puts the embstore package, when it exists.
std::string build_python_dir() {
  std::error_code ec;
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) return {};
  const std::filesystem::path dir = self.parent_path().parent_path() / "python";
  return std::filesystem::is_directory(dir / "embstore", ec) ? dir.string() : std::string();
}

int run_serve(const std::vector<std::string>& args) {
  const std::string python_dir = build_python_dir();
  if (!python_dir.empty()) {
    const char* old = std::getenv("PYTHONPATH");
    const std::string path = old && *old ? python_dir + ":" + old : python_dir;
    ::setenv("PYTHONPATH", path.c_str(), 1);
  }
  std::vector<char*> argv;
  argv.push_back(const_cast<char*>(kPython));
  argv.push_back(const_cast<char*>("-m"));
  argv.push_back(const_cast<char*>("embstore.serve"));
  for (const std::string& arg : args) argv.push_back(const_cast<char*>(arg.c_str()));
  argv.push_back(nullptr);
  flush_stdout();
  ::execv(kPython, argv.data());
  const int err = errno;
  throw Error(ErrorCode::kNotFound,
              std::string("cannot run ") + kPython + ": " + std::strerror(err), err);
}

}  // namespace

void add_serve_command(CLI::App& app, Registry& registry) {
  auto args = std::make_shared<std::vector<std::string>>();
  CLI::App* cmd = app.add_subcommand(
      "serve",
      "Serve stores over the network: runs python3 -m embstore.serve with every argument "
      "after `serve` (its --help lists them)");
  // Every argument, --help included, belongs to the Python module.
  cmd->prefix_command();
  cmd->set_help_flag();
  cmd->allow_extras();
  registry.add(cmd, [cmd, args] { return run_serve(cmd->remaining()); });
}

}  // namespace embstore::cli
