// ShardSet, the manifest and merge_stores: several stores read as one
// (include/embstore/shard_set.h).
#include "embstore/shard_set.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string_view>
#include <utility>

#include "embstore/error.h"
#include "embstore/staged_output.h"
#include "embstore/store.h"
#include "embstore/writer.h"
#include "format/format.h"
#include "log/batch.h"
#include "platform/os.h"
#include "shard_set_internals.h"

namespace embstore {
namespace {

using Json = nlohmann::json;

// A shard path may only name something inside the manifest's directory, so that a manifest
// copied along with its shards (rsync of the directory) still means the same stores, and a
// hostile manifest cannot point a merge or a ShardSet at arbitrary files.
void check_shard_path(const std::string& manifest, const std::string& path) {
  auto bad = [&](const char* why) {
    std::string shown = path;  // A NUL would end the message where C strings read it.
    for (std::size_t at = shown.find('\0'); at != std::string::npos; at = shown.find('\0', at)) {
      shown.replace(at, 1, "\\0");
    }
    throw Error(ErrorCode::kInvalidArgument,
                manifest + ": shard path '" + shown + "' " + why +
                    "; shard paths must be relative to the manifest's directory and stay inside "
                    "it");
  };
  if (path.empty()) bad("is empty");
  if (path.front() == '/') bad("is absolute");
  // No file name holds one: the path would name another file than the manifest says.
  if (path.find('\0') != std::string::npos) bad("holds a NUL byte");
  std::size_t start = 0;
  while (start <= path.size()) {
    std::size_t end = path.find('/', start);
    if (end == std::string::npos) end = path.size();
    if (std::string_view(path).substr(start, end - start) == "..") bad("goes through '..'");
    start = end + 1;
  }
}

// A shard path (checked by check_shard_path) without its empty and "." parts: "a", "./a" and
// "a/" name one directory.
std::string plain_path(const std::string& path) {
  std::string out;
  std::size_t start = 0;
  while (start <= path.size()) {
    std::size_t end = path.find('/', start);
    if (end == std::string::npos) end = path.size();
    const std::string_view part = std::string_view(path).substr(start, end - start);
    if (!part.empty() && part != ".") {
      if (!out.empty()) out += '/';
      out += part;
    }
    start = end + 1;
  }
  return out;
}

// JSON text is Unicode, and nlohmann's dump() throws its own type_error for a string that is not
// UTF-8. Refused by field rather than written with the bytes replaced: the manifest would not
// read back as written (metadata a merge gives its store, a path that names no shard).
void check_utf8(const std::string& manifest, const std::string& field, const std::string& text) {
  try {
    (void)Json(text).dump();
  } catch (const Json::type_error& e) {
    throw Error(ErrorCode::kInvalidArgument, manifest + ": " + field + " is not UTF-8 (" +
                                                 e.what() + "); a manifest holds JSON text");
  }
}

std::string directory_of(const std::string& path) {
  const auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

bool ends_with(const std::string& text, std::string_view suffix) {
  return text.size() >= suffix.size() &&
         std::string_view(text).substr(text.size() - suffix.size()) == suffix;
}

[[noreturn]] void too_large_manifest(const std::string& path, std::uint64_t bytes) {
  throw Error(ErrorCode::kInvalidArgument,
              path + ": the manifest would be " + std::to_string(bytes) +
                  " bytes or more, beyond a manifest's limit of " +
                  std::to_string(kMaxManifestBytes) + " (read_manifest reads no more)");
}

// Metadata text for a message: quoted, at most 80 characters of it.
std::string clip(const std::string& text) {
  return "'" + (text.size() <= 80 ? text : text.substr(0, 77) + "...") + "'";
}

// A field of a manifest's object or of a shard entry, as read: its value when it is a scalar;
// of an array or object only which it is (ManifestParser keeps no contents of one).
struct FieldValue {
  enum class Kind { kScalar, kArray, kObject };
  Json scalar;
  Kind kind = Kind::kScalar;

  std::string shown() const {
    return kind == Kind::kArray ? "an array" : kind == Kind::kObject ? "an object" : scalar.dump();
  }
};
using Fields = std::map<std::string, FieldValue, std::less<>>;

[[noreturn]] void wrong_type(const std::string& where, const std::string& name,
                             const FieldValue& value) {
  throw Error(ErrorCode::kCorruption,
              where + ": field '" + name + "' has the wrong type (" + value.shown() + ")");
}

const FieldValue& required(const Fields& fields, const char* name, const std::string& where) {
  auto it = fields.find(name);
  if (it == fields.end()) {
    throw Error(ErrorCode::kCorruption, where + ": field '" + name + "' is missing");
  }
  return it->second;
}

std::string text_of(const FieldValue& value, const std::string& name, const std::string& where) {
  if (value.kind != FieldValue::Kind::kScalar || !value.scalar.is_string()) {
    wrong_type(where, name, value);
  }
  return value.scalar.get<std::string>();
}

// An integer of type T, whole and in T's range. nlohmann's get<T>() casts whatever number it
// finds: -1 would be 2^64-1 rows, a dim of 2^32+4 a dim of 4 (matching a shard of dim 4), 4.7
// a dim of 4.
template <typename T>
T integer_of(const FieldValue& field, const std::string& name, const std::string& where) {
  const Json& value = field.scalar;
  if (field.kind != FieldValue::Kind::kScalar || !value.is_number_integer()) {
    wrong_type(where, name, field);
  }
  const bool in_range = value.is_number_unsigned() ? std::in_range<T>(value.get<std::uint64_t>())
                                                   : std::in_range<T>(value.get<std::int64_t>());
  if (!in_range) {
    throw Error(ErrorCode::kCorruption, where + ": field '" + name + "' is " + value.dump() +
                                            ", outside " +
                                            std::to_string(std::numeric_limits<T>::min()) + ".." +
                                            std::to_string(std::numeric_limits<T>::max()));
  }
  return value.get<T>();
}

bool is_manifest_field(std::string_view name) {
  return name == "embstore_manifest" || name == "dim" || name == "dtype" || name == "metadata" ||
         name == "shards";
}

bool is_shard_field(std::string_view name) {
  return name == "path" || name == "store_id" || name == "rows" || name == "epochs" ||
         name == "generation";
}

// Reads a manifest's text through nlohmann's SAX interface straight into a Manifest, building
// no document tree: a tree takes 16 bytes and more per value (a 100 MB manifest listing 50
// million epochs took 3.6 GB to read), a Manifest 8 bytes per epoch listed. Kept while parsing:
// the scalar fields of the manifest's object and of the shard entry being read, and that
// entry's epochs as they come; of a field this version does not read, nothing, and of nested
// values it skips, only their depth.
//
// A field it reads given twice in one object stops the parse, named: a JSON reader keeps one
// of the two (nlohmann's the last, others the first), so the manifest would mean one thing here
// and another elsewhere. Other errors are kept (the first one) and thrown by finish(), after
// the parse, in the order of the fields' checks: a newer version is kUnsupportedVersion whatever
// its shard entries hold, and text that is no JSON says so whatever came before the fault.
class ManifestParser final : public nlohmann::json_sax<Json> {
 public:
  explicit ManifestParser(const std::string& path) : path_(path) {}

  // The manifest read, after a parse that returned true; else throws what the text holds wrong.
  Manifest finish();
  // The error that stopped a parse that returned false (invalid JSON, a field given twice).
  const Error& stopped() const { return *stop_; }

  bool null() override { return scalar(Json(nullptr)); }
  bool boolean(bool value) override { return scalar(Json(value)); }
  bool number_integer(std::int64_t value) override { return scalar(Json(value)); }
  bool number_unsigned(std::uint64_t value) override { return scalar(Json(value)); }
  bool number_float(double value, const std::string&) override { return scalar(Json(value)); }
  bool string(std::string& value) override { return scalar(Json(std::move(value))); }
  bool binary(Json::binary_t&) override { return scalar(Json()); }  // Not in JSON text.
  bool start_object(std::size_t) override { return open(FieldValue::Kind::kObject); }
  bool start_array(std::size_t) override { return open(FieldValue::Kind::kArray); }
  bool end_object() override { return close(); }
  bool end_array() override { return close(); }
  bool key(std::string& name) override;
  bool parse_error(std::size_t, const std::string&,
                   const nlohmann::detail::exception& error) override {
    stop_.emplace(ErrorCode::kCorruption,
                  path_ + ": not a manifest (invalid JSON: " + std::string(error.what()) + ")");
    return false;
  }

 private:
  // An open value read: the manifest's object, its list of shards, one shard's entry (always
  // frames_[0], [1] and [2]), or that entry's epochs.
  enum class Role { kManifest, kShards, kShard, kEpochs };
  struct Frame {
    Role role = Role::kManifest;
    std::string key;             // kManifest, kShard: whose value comes next.
    std::uint64_t next = 0;      // kShards, kEpochs: the index of the next element.
    std::set<std::string> seen;  // kManifest, kShard: the fields read so far.
  };

  bool scalar(Json value);
  bool open(FieldValue::Kind kind);
  bool close();
  void keep(const Error& error) {
    if (!error_) error_ = error;
  }
  std::uint64_t shard_index() const { return frames_[1].next - 1; }  // Of the entry open.
  std::string shard_where(std::uint64_t index) const {
    return path_ + ": shards[" + std::to_string(index) + "]";
  }
  void add_epoch(const FieldValue& value);
  void finish_shard();

  const std::string& path_;
  std::vector<Frame> frames_;
  std::uint64_t skipped_depth_ = 0;  // Arrays and objects open inside one not read.
  bool object_ = false;              // The text is a JSON object.
  bool shards_listed_ = false;       // Its "shards" is an array.
  Fields manifest_fields_;
  Fields shard_fields_;                // Of the entry open.
  std::vector<std::uint64_t> epochs_;  // Of the entry open.
  std::optional<Error> epochs_error_;  // Of the entry open: the first of its epochs'.
  std::optional<Error> error_;
  std::optional<Error> stop_;
  Manifest manifest_;
};

bool ManifestParser::key(std::string& name) {
  if (skipped_depth_ > 0) return true;
  Frame& top = frames_.back();
  const bool read = top.role == Role::kManifest ? is_manifest_field(name)
                                                : top.role == Role::kShard && is_shard_field(name);
  if (read && !top.seen.insert(name).second) {
    stop_.emplace(ErrorCode::kCorruption,
                  (top.role == Role::kManifest ? path_ : shard_where(shard_index())) + ": field '" +
                      name +
                      "' is given twice; a manifest gives each field once (JSON readers keep "
                      "either one)");
    return false;
  }
  top.key = std::move(name);
  return true;
}

bool ManifestParser::scalar(Json value) {
  if (skipped_depth_ > 0) return true;
  if (frames_.empty()) {  // The whole text is one scalar.
    keep(Error(ErrorCode::kCorruption, path_ + ": not a JSON object"));
    return true;
  }
  Frame& top = frames_.back();
  switch (top.role) {
    case Role::kManifest:
      if (is_manifest_field(top.key)) manifest_fields_[top.key] = FieldValue{std::move(value)};
      break;
    case Role::kShard:
      if (is_shard_field(top.key)) shard_fields_[top.key] = FieldValue{std::move(value)};
      break;
    case Role::kShards:
      keep(Error(ErrorCode::kCorruption,
                 shard_where(top.next) + ": not an object (" + value.dump() + ")"));
      ++top.next;
      break;
    case Role::kEpochs:
      add_epoch(FieldValue{std::move(value)});
      ++top.next;
      break;
  }
  return true;
}

bool ManifestParser::open(FieldValue::Kind kind) {
  if (skipped_depth_ > 0) {
    ++skipped_depth_;
    return true;
  }
  const bool array = kind == FieldValue::Kind::kArray;
  std::optional<Role> role;  // None: not read.
  if (frames_.empty()) {
    object_ = !array;
    if (array) keep(Error(ErrorCode::kCorruption, path_ + ": not a JSON object"));
    if (!array) role = Role::kManifest;
  } else {
    Frame& top = frames_.back();
    switch (top.role) {
      case Role::kManifest:
        if (is_manifest_field(top.key)) manifest_fields_[top.key] = FieldValue{Json(), kind};
        if (top.key == "shards" && array) {
          shards_listed_ = true;
          role = Role::kShards;
        }
        break;
      case Role::kShards:
        if (array) {
          keep(Error(ErrorCode::kCorruption, shard_where(top.next) + ": not an object (an array)"));
        } else {
          shard_fields_.clear();
          epochs_.clear();
          epochs_error_.reset();
          role = Role::kShard;
        }
        ++top.next;
        break;
      case Role::kShard:
        if (is_shard_field(top.key)) shard_fields_[top.key] = FieldValue{Json(), kind};
        if (top.key == "epochs" && array) role = Role::kEpochs;
        break;
      case Role::kEpochs:
        add_epoch(FieldValue{Json(), kind});
        ++top.next;
        break;
    }
  }
  if (role) {
    frames_.emplace_back().role = *role;
  } else {
    skipped_depth_ = 1;
  }
  return true;
}

bool ManifestParser::close() {
  if (skipped_depth_ > 0) {
    --skipped_depth_;
    return true;
  }
  const Role role = frames_.back().role;
  if (role == Role::kShard) finish_shard();
  if (role == Role::kEpochs) epochs_.shrink_to_fit();
  frames_.pop_back();
  return true;
}

void ManifestParser::add_epoch(const FieldValue& value) {
  if (epochs_error_ || error_) return;  // Not kept: only the first error is said.
  const std::uint64_t index = frames_.back().next;
  const std::string where = shard_where(shard_index());
  try {
    const auto epoch =
        integer_of<std::uint64_t>(value, "epochs[" + std::to_string(index) + "]", where);
    // Ascending, each once: the recorder lists the epochs present so, and a list in any other
    // order (or with repeats) is not one the library wrote.
    if (!epochs_.empty() && epoch <= epochs_.back()) {
      throw Error(ErrorCode::kCorruption,
                  where + ": field 'epochs' lists " + std::to_string(epoch) + " after " +
                      std::to_string(epochs_.back()) + " (epochs[" + std::to_string(index) +
                      "]); a shard's epochs are listed ascending, each once");
    }
    epochs_.push_back(epoch);
  } catch (const Error& error) {
    epochs_error_ = error;
  }
}

void ManifestParser::finish_shard() {
  if (error_) return;  // Entries after an error are not kept.
  const std::string where = shard_where(shard_index());
  try {
    ManifestShard shard;
    shard.path = text_of(required(shard_fields_, "path", where), "path", where);
    check_shard_path(path_, shard.path);
    shard.store_id = text_of(required(shard_fields_, "store_id", where), "store_id", where);
    shard.rows = integer_of<std::uint64_t>(required(shard_fields_, "rows", where), "rows", where);
    const auto epochs = shard_fields_.find("epochs");
    if (epochs != shard_fields_.end() && epochs->second.kind != FieldValue::Kind::kArray) {
      wrong_type(where, "epochs", epochs->second);
    }
    if (epochs_error_) throw *epochs_error_;
    shard.epochs = std::move(epochs_);
    if (const auto it = shard_fields_.find("generation"); it != shard_fields_.end()) {
      shard.generation = integer_of<std::uint64_t>(it->second, "generation", where);
    }
    manifest_.shards.push_back(std::move(shard));
  } catch (const Error& error) {
    keep(error);
  }
  epochs_ = {};
}

Manifest ManifestParser::finish() {
  if (!object_) throw *error_;
  const auto version = integer_of<std::int64_t>(
      required(manifest_fields_, "embstore_manifest", path_), "embstore_manifest", path_);
  if (version > kManifestVersion) {
    throw Error(ErrorCode::kUnsupportedVersion,
                path_ + ": manifest version " + std::to_string(version) +
                    " is newer than this library's " + std::to_string(kManifestVersion));
  }
  if (version < 1) {
    throw Error(ErrorCode::kCorruption, path_ + ": field 'embstore_manifest' is " +
                                            std::to_string(version) + ", not a manifest version");
  }
  manifest_.dim = integer_of<std::uint32_t>(required(manifest_fields_, "dim", path_), "dim", path_);
  if (manifest_.dim == 0 || manifest_.dim > kMaxDim) {
    throw Error(ErrorCode::kCorruption, path_ + ": field 'dim' is " +
                                            std::to_string(manifest_.dim) + ", outside 1.." +
                                            std::to_string(kMaxDim));
  }
  const auto dtype_text = text_of(required(manifest_fields_, "dtype", path_), "dtype", path_);
  const auto dtype = parse_dtype(dtype_text);
  if (!dtype) throw Error(ErrorCode::kCorruption, path_ + ": unknown dtype '" + dtype_text + "'");
  manifest_.dtype = *dtype;
  if (const auto it = manifest_fields_.find("metadata"); it != manifest_fields_.end()) {
    manifest_.metadata = text_of(it->second, "metadata", path_);
  }
  required(manifest_fields_, "shards", path_);
  if (!shards_listed_) throw Error(ErrorCode::kCorruption, path_ + ": 'shards' is not a list");
  if (error_) throw *error_;
  return std::move(manifest_);
}

struct Shard {
  Shard(std::string shard_path, Reader shard_reader)
      : path(std::move(shard_path)), reader(std::move(shard_reader)) {}

  std::string path;
  Reader reader;
  std::uint64_t first_row = 0;
};

// The global row of each of n lookups, through each shard's Reader (its key index), kNoRow
// where no shard has it. Shards are searched last to first, so the first found is the latest.
template <typename FindMany>
std::vector<std::uint64_t> find_in_shards(const std::vector<std::unique_ptr<Shard>>& shards,
                                          std::size_t n, FindMany&& find_many) {
  std::vector<std::uint64_t> out(n, ShardSet::kNoRow);
  std::vector<std::int64_t> rows(n);
  for (auto it = shards.rbegin(); it != shards.rend(); ++it) {
    find_many((*it)->reader, std::span<std::int64_t>(rows));
    for (std::size_t i = 0; i < n; ++i) {
      if (out[i] == ShardSet::kNoRow && rows[i] >= 0) {
        out[i] = (*it)->first_row + static_cast<std::uint64_t>(rows[i]);
      }
    }
  }
  return out;
}

std::optional<std::uint64_t> found(std::uint64_t row) {
  return row == ShardSet::kNoRow ? std::nullopt : std::optional<std::uint64_t>(row);
}

}  // namespace

namespace {
// `text` parsed as JSON, or discarded when it is not JSON or its value would not hold all the
// text says: a key twice in one object (the parser keeps the last) or a number of magnitude
// 2^53 or more that is no 64-bit integer (read as a double: 10^20 and 10^20 + 1 would be one).
Json parsed_exactly(const std::string& text) {
  std::vector<std::set<std::string>> keys;  // Of each object open at the point parsed.
  bool lossy = false;
  Json parsed = Json::parse(
      text,
      [&](int, Json::parse_event_t event, Json& value) {
        switch (event) {
          case Json::parse_event_t::object_start:
            keys.emplace_back();
            break;
          case Json::parse_event_t::object_end:
            if (!keys.empty()) keys.pop_back();
            break;
          case Json::parse_event_t::key:
            if (!keys.empty() && !keys.back().insert(value.get<std::string>()).second) {
              lossy = true;
            }
            break;
          case Json::parse_event_t::value:
            if (value.is_number_float() && std::fabs(value.get<double>()) >= 0x1p53) lossy = true;
            break;
          default:
            break;
        }
        return true;
      },
      /*allow_exceptions=*/false);
  return lossy ? Json(Json::value_t::discarded) : parsed;
}
}  // namespace

bool same_metadata(const std::string& a, const std::string& b) {
  if (a == b) return true;
  const Json parsed_a = parsed_exactly(a);
  const Json parsed_b = parsed_exactly(b);
  return !parsed_a.is_discarded() && !parsed_b.is_discarded() && parsed_a == parsed_b;
}

std::optional<std::string> manifest_file(const std::string& path) {
  // "" names nothing: not the root's manifest.json.
  if (path.empty()) return std::nullopt;
  if (ends_with(path, ".json") && !detail::os::is_directory(path)) return path;
  const std::string inside = path + "/" + kManifestFileName;
  if (detail::os::exists(inside)) return inside;
  return std::nullopt;
}

Manifest read_manifest(const std::string& path) {
  const int fd = detail::os::open_file(path, detail::os::Access::kReadOnly);
  std::string text;
  try {
    // Read whole, then parsed into the Manifest (ManifestParser builds no tree): bounded, as the
    // size of a file that is no manifest (a 1 TiB sparse one, say) must not become an allocation.
    const std::uint64_t bytes = detail::os::file_size(fd, path);
    if (bytes > kMaxManifestBytes) {
      throw Error(ErrorCode::kCorruption, path + ": not a manifest (" + std::to_string(bytes) +
                                              " bytes, more than a manifest's limit of " +
                                              std::to_string(kMaxManifestBytes) + ")");
    }
    text.resize(bytes);
    detail::os::read_exact(fd, text.data(), text.size(), 0, path);
  } catch (...) {
    detail::os::close_fd(fd);
    throw;
  }
  detail::os::close_fd(fd);

  ManifestParser parser(path);
  if (!Json::sax_parse(text, &parser)) throw parser.stopped();
  return parser.finish();
}

void write_manifest(const std::string& path, const Manifest& manifest) {
  // What read_manifest() would refuse is not written: a manifest nothing can read back.
  if (manifest.dim == 0 || manifest.dim > kMaxDim) {
    throw Error(ErrorCode::kInvalidArgument, path + ": dim is " + std::to_string(manifest.dim) +
                                                 ", outside 1.." + std::to_string(kMaxDim));
  }
  if (!parse_dtype(dtype_name(manifest.dtype))) {
    throw Error(ErrorCode::kInvalidArgument, path + ": dtype " +
                                                 std::to_string(static_cast<int>(manifest.dtype)) +
                                                 " is not one of the store's types");
  }
  // The text holds at least these bytes: refused before it is built (gigabytes, and seconds).
  std::uint64_t least_bytes = manifest.metadata.size();
  for (const ManifestShard& shard : manifest.shards) {
    least_bytes += shard.path.size() + shard.store_id.size() + shard.epochs.size();
  }
  if (least_bytes > kMaxManifestBytes) too_large_manifest(path, least_bytes);
  check_utf8(path, "metadata", manifest.metadata);
  // ShardSet::open refuses a manifest of no shards, and one listing a store twice (by its id, or
  // by its path: the second entry would be checked against the first one's store).
  if (manifest.shards.empty()) {
    throw Error(ErrorCode::kInvalidArgument,
                path + ": the manifest lists no shards; a ShardSet needs at least one");
  }
  std::map<std::string, std::size_t> ids;
  std::map<std::string, std::size_t> paths;
  Json shards = Json::array();
  for (std::size_t i = 0; i < manifest.shards.size(); ++i) {
    const ManifestShard& shard = manifest.shards[i];
    const std::string where = path + ": shards[" + std::to_string(i) + "]";
    check_utf8(path, "shards[" + std::to_string(i) + "].path", shard.path);
    check_utf8(path, "shards[" + std::to_string(i) + "].store_id", shard.store_id);
    check_shard_path(path, shard.path);
    const auto [same_id, new_id] = ids.emplace(shard.store_id, i);
    if (!new_id) {
      throw Error(ErrorCode::kInvalidArgument, where + " lists store " + shard.store_id +
                                                   " again (shards[" +
                                                   std::to_string(same_id->second) +
                                                   "] does): a manifest lists each store once");
    }
    const auto [same_path, new_path] = paths.emplace(plain_path(shard.path), i);
    if (!new_path) {
      throw Error(ErrorCode::kInvalidArgument, where + ": path '" + shard.path +
                                                   "' names the shard of shards[" +
                                                   std::to_string(same_path->second) + "] ('" +
                                                   manifest.shards[same_path->second].path +
                                                   "'): a manifest lists each store once");
    }
    for (std::size_t e = 1; e < shard.epochs.size(); ++e) {
      if (shard.epochs[e] <= shard.epochs[e - 1]) {
        throw Error(ErrorCode::kInvalidArgument,
                    where + ": epochs[" + std::to_string(e) + "] is " +
                        std::to_string(shard.epochs[e]) + " after " +
                        std::to_string(shard.epochs[e - 1]) +
                        "; a shard's epochs are listed ascending, each once");
      }
    }
    Json entry = {{"path", shard.path},
                  {"store_id", shard.store_id},
                  {"rows", shard.rows},
                  {"epochs", shard.epochs}};
    if (shard.generation != 0) entry["generation"] = shard.generation;
    shards.push_back(std::move(entry));
  }
  Json json = {{"embstore_manifest", kManifestVersion},
               {"dim", manifest.dim},
               {"dtype", std::string(dtype_name(manifest.dtype))},
               {"metadata", manifest.metadata}};
  json["shards"] = std::move(shards);
  const std::string text = json.dump(1) + "\n";
  if (text.size() > kMaxManifestBytes) too_large_manifest(path, text.size());

  std::uint64_t nonce[2];
  detail::os::random_bytes(nonce, sizeof nonce, path);
  const std::string temp = path + ".tmp-" + std::to_string(nonce[0] ^ nonce[1]);
  const int fd = detail::os::create_file(temp);
  try {
    detail::os::write_all(fd, text.data(), text.size(), 0, temp);
    detail::os::datasync(fd, temp);
  } catch (...) {
    detail::os::close_fd(fd);
    detail::os::remove_file(temp);
    throw;
  }
  detail::os::close_fd(fd);
  if (int err = detail::os::rename_path(temp, path)) {
    detail::os::remove_file(temp);
    throw Error(ErrorCode::kIO, "rename " + temp + " -> " + path + ": " + std::strerror(err), err);
  }
  detail::os::sync_dir(directory_of(path));
}

namespace {

// `path` joined to the working directory if relative; not resolved further (symbolic links,
// ".."), as the kernel resolves them at each use (StoreFiles::open() makes a store's so).
std::string absolute_path(const std::string& path) {
  if (path.empty() || path.front() == '/') return path;
  std::error_code ec;
  const std::string cwd = std::filesystem::current_path(ec).string();
  return ec ? path : (cwd == "/" ? "" : cwd) + "/" + path;
}

}  // namespace

class ShardSet::Impl {
 public:
  std::vector<std::unique_ptr<Shard>> shards;
  std::vector<std::string> store_ids;  // shards[i]'s.
  std::string metadata;
  ReaderOptions options;
  // Opened from a manifest: its file as given (errors name it), the same made absolute when
  // the set was opened (refresh() reads it again once it changed, whatever the working
  // directory is by then), how it stood when last read, and the manifest path of each shard.
  std::optional<Manifest> manifest;
  std::string manifest_path;
  std::string manifest_file;
  std::optional<detail::os::FileStamp> manifest_stamp;
  std::vector<std::string> listed_paths;
  std::uint64_t size = 0;

  bool metadata_from_manifest() const { return manifest && !manifest->metadata.empty(); }

  void renumber() {
    size = 0;
    for (auto& shard : shards) {
      shard->first_row = size;
      size += shard->reader.size();
    }
  }

  const Shard& shard(std::size_t index) const {
    if (index >= shards.size()) {
      throw Error(
          ErrorCode::kInvalidArgument,
          "shard " + std::to_string(index) + " of a ShardSet of " + std::to_string(shards.size()));
    }
    return *shards[index];
  }

  // Opens the shard at `path` (the manifest's `entry`, or without a manifest a store path
  // given), checks it against the manifest, or without one against shard 0, and against the
  // shards held, and appends it (open()'s rules, shard_set.h).
  void add_shard(const std::string& path, const ManifestShard* entry);
  // Reads the manifest again if its file changed since it was last read, and adds the shards it
  // lists that the set does not hold (by store id), in its order.
  void add_shards_listed_since();
};

namespace {

// Shards of one set hold one dim and dtype: the manifest's, or without one the first shard's.
void check_format(const std::string& path, const Reader& reader, const std::string& against,
                  std::uint32_t want_dim, DType want_dtype) {
  if (reader.dim() != want_dim || reader.dtype() != want_dtype) {
    throw Error(ErrorCode::kFormatMismatch,
                "shard " + path + " holds dim " + std::to_string(reader.dim()) + " " +
                    std::string(dtype_name(reader.dtype())) + " but " + against + " says dim " +
                    std::to_string(want_dim) + " " + std::string(dtype_name(want_dtype)) +
                    ": shards of one set must agree");
  }
}

// The same store twice (two paths, or a copy) would count its rows twice, in a merge too.
// `held_path(j)`: where the shard of held_ids[j] is.
template <typename HeldPath>
void check_not_held(const std::string& path, const std::string& id,
                    const std::vector<std::string>& held_ids, HeldPath&& held_path) {
  for (std::size_t j = 0; j < held_ids.size(); ++j) {
    if (held_ids[j] == id) {
      throw Error(ErrorCode::kInvalidArgument, "shard " + path + " is the same store as shard " +
                                                   held_path(j) + " (store id " + id +
                                                   "): a set lists each store once");
    }
  }
}

// open_listed_shard() but the check against the shards held; `id` gets the shard's store id.
Reader open_entry(const std::string& manifest_path, std::uint32_t dim, DType dtype,
                  const ManifestShard& entry, const std::string& path, const ReaderOptions& options,
                  std::string& id) {
  Reader reader = [&] {
    try {
      return Reader::open(path, options);
    } catch (const Error& error) {
      if (error.code() != ErrorCode::kNotFound) throw;
      // There but no store (an empty directory, a copy that never finished) is not "missing".
      const bool there = detail::os::exists(path);
      throw Error(ErrorCode::kNotFound,
                  manifest_path + ": shard '" + entry.path +
                      (there ? "' is not a store (" : "' is missing (") + error.what() +
                      "); copy every node's store next to the manifest",
                  error.sys_errno());
    }
  }();
  check_format(path, reader, "the manifest " + manifest_path, dim, dtype);
  id = reader.info(InfoDetail::kState).store_id;
  if (id != entry.store_id) {
    throw Error(ErrorCode::kFormatMismatch,
                manifest_path + ": shard '" + entry.path + "' is store " + id + ", not the store " +
                    entry.store_id + " the manifest lists (replaced or copied from another run?)");
  }
  // Fewer rows than recorded: a stale copy of the shard, unless a truncate (a resume from a
  // checkpoint) moved it to a newer generation since the manifest was written. Generations
  // only grow: an older one is a stale copy (a backup from before a truncate) whatever rows
  // it holds. The snapshot's generation, the one its size() is of.
  const std::uint64_t generation = reader.generation();
  const bool truncated_since = entry.generation != 0 && generation > entry.generation;
  const bool older = entry.generation != 0 && generation < entry.generation;
  // A snapshot cut short by options.max_rows says nothing of what the shard holds: its
  // committed rows do (of the snapshot's generation, or a newer one: truncated since).
  const std::uint64_t held = reader.size() < options.max_rows
                                 ? reader.size()
                                 : reader.info(InfoDetail::kState).committed_rows;
  if ((held < entry.rows && !truncated_since) || older) {
    throw Error(
        ErrorCode::kCorruption,
        manifest_path + ": shard '" + entry.path + "' holds " + std::to_string(held) + " rows" +
            (older ? ", against the " : ", fewer than the ") + std::to_string(entry.rows) +
            " the manifest recorded" +
            (entry.generation == 0 ? " (a stale copy? a manifest that records no generation cannot "
                                     "tell a truncate since: write the manifest again)"
                                   : " in generation " + std::to_string(entry.generation) +
                                         (generation == entry.generation
                                              ? ", the shard's too"
                                              : "; the shard is of generation " +
                                                    std::to_string(generation) + ", older") +
                                         " (a stale copy?)"));
  }
  return reader;
}

}  // namespace

std::string detail::listed_shard_path(const std::string& manifest_file,
                                      const ManifestShard& entry) {
  return directory_of(manifest_file) + "/" + entry.path;
}

void detail::check_manifest_unchanged(const std::string& manifest_path, const Manifest& now,
                                      std::uint32_t dim, DType dtype) {
  if (now.dim != dim || now.dtype != dtype) {
    throw Error(ErrorCode::kFormatMismatch,
                manifest_path + ": the manifest now says dim " + std::to_string(now.dim) + " " +
                    std::string(dtype_name(now.dtype)) + ", not the dim " + std::to_string(dim) +
                    " " + std::string(dtype_name(dtype)) +
                    " of the shards this set holds: open a new ShardSet");
  }
}

Reader detail::open_listed_shard(const std::string& manifest_path, std::uint32_t dim, DType dtype,
                                 const ManifestShard& entry, const std::string& path,
                                 const ReaderOptions& options,
                                 const std::vector<std::string>& held_store_ids,
                                 const std::vector<std::string>& held_paths) {
  if (held_paths.size() != held_store_ids.size()) {
    throw Error(ErrorCode::kInvalidArgument,
                "open_listed_shard: " + std::to_string(held_paths.size()) + " paths for " +
                    std::to_string(held_store_ids.size()) + " store ids held");
  }
  std::string id;
  Reader reader = open_entry(manifest_path, dim, dtype, entry, path, options, id);
  check_not_held(path, id, held_store_ids,
                 [&](std::size_t j) -> const std::string& { return held_paths[j]; });
  return reader;
}

void ShardSet::Impl::add_shard(const std::string& path, const ManifestShard* entry) {
  std::string id;
  std::optional<Reader> reader;
  if (entry) {
    // The manifest's rules (detail::open_listed_shard, which the Python ShardSet calls too).
    reader.emplace(
        open_entry(manifest_path, manifest->dim, manifest->dtype, *entry, path, options, id));
  } else {
    reader.emplace(Reader::open(path, options));
    // Every shard must match the first.
    if (!shards.empty()) {
      check_format(path, *reader, "shard " + shards[0]->path, shards[0]->reader.dim(),
                   shards[0]->reader.dtype());
    }
    id = reader->info(InfoDetail::kState).store_id;
  }
  check_not_held(path, id, store_ids,
                 [&](std::size_t j) -> const std::string& { return shards[j]->path; });
  store_ids.push_back(id);
  shards.push_back(std::make_unique<Shard>(path, std::move(*reader)));
}

void ShardSet::Impl::add_shards_listed_since() {
  const std::optional<detail::os::FileStamp> stamp = detail::os::file_stamp_at(manifest_file);
  // A manifest removed since lists nothing new: the shards held stay as they are.
  if (!stamp || stamp == manifest_stamp) return;
  // Stamped before the read: a manifest replaced again meanwhile stamps differently, and is
  // read again at the next refresh.
  Manifest now = read_manifest(manifest_file);
  detail::check_manifest_unchanged(manifest_path, now, manifest->dim, manifest->dtype);
  for (const ManifestShard& entry : now.shards) {
    if (std::find(store_ids.begin(), store_ids.end(), entry.store_id) != store_ids.end()) continue;
    // Another store at the path of a shard held (deleted and made again: a run started over):
    // not a shard to add beside the old one, whose Reader still maps the deleted files.
    const auto held = std::find(listed_paths.begin(), listed_paths.end(), entry.path);
    if (held != listed_paths.end()) {
      throw Error(ErrorCode::kFormatMismatch,
                  manifest_path + ": shard '" + entry.path + "' is now listed as store " +
                      entry.store_id + ", not the store " +
                      store_ids[static_cast<std::size_t>(held - listed_paths.begin())] +
                      " this set holds there (deleted and made again?): open a new ShardSet");
    }
    add_shard(detail::listed_shard_path(manifest_file, entry), &entry);
    listed_paths.push_back(entry.path);
  }
  manifest_stamp = stamp;
}

ShardSet::ShardSet(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ShardSet::ShardSet(ShardSet&&) noexcept = default;
ShardSet& ShardSet::operator=(ShardSet&&) noexcept = default;
ShardSet::~ShardSet() = default;

ShardSet::Impl& ShardSet::impl() const {
  // A moved-from ShardSet has no Impl: its calls are refused rather than dereference null.
  if (!impl_) {
    throw Error(ErrorCode::kClosed,
                "this ShardSet was moved from; use the ShardSet it was moved to");
  }
  return *impl_;
}

ShardSet ShardSet::open(const std::vector<std::string>& manifest_or_stores,
                        const ReaderOptions& options) {
  if (manifest_or_stores.empty()) {
    throw Error(ErrorCode::kInvalidArgument, "ShardSet: no manifest and no store given");
  }
  for (std::size_t i = 0; i < manifest_or_stores.size(); ++i) {
    const std::string& path = manifest_or_stores[i];
    if (path.empty()) {
      throw Error(ErrorCode::kInvalidArgument, "ShardSet: path " + std::to_string(i) + " of " +
                                                   std::to_string(manifest_or_stores.size()) +
                                                   " is empty; give a manifest or store paths");
    }
    // A manifest lists its shards: beside other paths it would be opened as a store.
    if (manifest_or_stores.size() > 1 && manifest_file(path)) {
      throw Error(ErrorCode::kInvalidArgument,
                  path + " is a manifest (a .json file, or a directory holding " +
                      kManifestFileName +
                      "), given with other paths; a manifest must be the only input: it lists "
                      "its shards");
    }
  }
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  if (manifest_or_stores.size() == 1) {
    if (auto file = manifest_file(manifest_or_stores[0])) {
      impl->manifest_path = *file;
      impl->manifest_file = absolute_path(*file);
      impl->manifest_stamp = detail::os::file_stamp_at(impl->manifest_file);
      impl->manifest = read_manifest(impl->manifest_file);
    }
  }
  if (impl->manifest) {
    if (impl->manifest->shards.empty()) {
      throw Error(ErrorCode::kInvalidArgument,
                  impl->manifest_path + ": the manifest lists no shards");
    }
    for (const ManifestShard& entry : impl->manifest->shards) {
      impl->add_shard(detail::listed_shard_path(impl->manifest_path, entry), &entry);
      impl->listed_paths.push_back(entry.path);
    }
  } else {
    for (const std::string& path : manifest_or_stores) impl->add_shard(path, nullptr);
  }
  // A manifest with no metadata (none given, or "": a manifest written without it) gives none:
  // the set's is its shards', as without a manifest, and merge_stores checks they agree.
  impl->metadata = impl->metadata_from_manifest() ? impl->manifest->metadata
                                                  : impl->shards[0]->reader.metadata();
  impl->renumber();
  return ShardSet(std::move(impl));
}

std::uint64_t ShardSet::size() const { return impl().size; }

std::uint64_t ShardSet::refresh() {
  // When a shard's refresh throws, the shards before it have taken their new snapshots: left
  // numbered as before, find() would name rows that record() puts in another shard. Renumbered
  // for the snapshots the Readers hold, the set stays consistent (shard_set.h).
  try {
    for (auto& shard : impl().shards) shard->reader.refresh();
    if (impl().manifest) impl().add_shards_listed_since();
  } catch (...) {
    impl().renumber();
    throw;
  }
  impl().renumber();
  return impl().size;
}

std::size_t ShardSet::shard_count() const { return impl().shards.size(); }
const Reader& ShardSet::shard(std::size_t index) const { return impl().shard(index).reader; }
const std::string& ShardSet::shard_path(std::size_t index) const {
  return impl().shard(index).path;
}
std::uint64_t ShardSet::shard_first_row(std::size_t index) const {
  return impl().shard(index).first_row;
}

ShardSet::Location ShardSet::locate(std::uint64_t row) const {
  if (row >= impl().size) {
    throw Error(ErrorCode::kInvalidArgument, "row " + std::to_string(row) +
                                                 " is past the ShardSet's " +
                                                 std::to_string(impl().size) + " rows");
  }
  const auto& shards = impl().shards;
  // The last shard starting at or before `row` (empty shards share their successor's start).
  auto it = std::upper_bound(shards.begin(), shards.end(), row,
                             [](std::uint64_t r, const auto& s) { return r < s->first_row; });
  std::size_t index = static_cast<std::size_t>(it - shards.begin()) - 1;
  return {index, row - shards[index]->first_row};
}

std::uint64_t ShardSet::global_row(std::size_t shard, std::uint64_t row) const {
  const Shard& s = impl().shard(shard);
  if (row >= s.reader.size()) {
    throw Error(ErrorCode::kInvalidArgument, s.path + ": row " + std::to_string(row) +
                                                 " is past the snapshot's " +
                                                 std::to_string(s.reader.size()) + " rows");
  }
  return s.first_row + row;
}

Record ShardSet::record(std::uint64_t row) const {
  const Location at = locate(row);
  Record record = impl().shards[at.shard]->reader.record(at.row);
  record.row = row;
  return record;
}

std::optional<std::uint64_t> ShardSet::find(std::uint64_t key, std::uint64_t epoch) const {
  return found(find_many(std::span<const std::uint64_t>(&key, 1), epoch)[0]);
}

std::optional<std::uint64_t> ShardSet::find(std::uint64_t key) const {
  return found(find_many(std::span<const std::uint64_t>(&key, 1))[0]);
}

std::vector<ShardSet::Version> ShardSet::history(std::uint64_t key) const {
  std::vector<Version> out;
  for (const auto& shard : impl().shards) {
    for (const KeyVersion& v : shard->reader.history(key)) {
      out.push_back({shard->first_row + v.row, v.epoch});
    }
  }
  return out;
}

std::vector<std::uint64_t> ShardSet::epoch_rows(std::uint64_t epoch) const {
  std::vector<std::uint64_t> out;
  for (const auto& shard : impl().shards) {
    for (const std::uint64_t row : shard->reader.epoch_rows(epoch)) {
      out.push_back(shard->first_row + row);
    }
  }
  return out;
}

std::vector<std::uint64_t> ShardSet::find_many(std::span<const std::uint64_t> keys,
                                               std::span<const std::uint64_t> epochs) const {
  if (epochs.size() != keys.size()) {
    throw Error(ErrorCode::kInvalidArgument, "find_many: " + std::to_string(epochs.size()) +
                                                 " epochs for " + std::to_string(keys.size()) +
                                                 " keys");
  }
  return find_in_shards(
      impl().shards, keys.size(),
      [&](const Reader& r, std::span<std::int64_t> rows) { r.find_many(keys, epochs, rows); });
}

std::vector<std::uint64_t> ShardSet::find_many(std::span<const std::uint64_t> keys,
                                               std::uint64_t epoch) const {
  return find_in_shards(impl().shards, keys.size(),
                        [&](const Reader& r, std::span<std::int64_t> rows) {
                          r.find_many(keys, std::span<const std::uint64_t>(&epoch, 1), rows);
                        });
}

std::vector<std::uint64_t> ShardSet::find_many(std::span<const std::uint64_t> keys) const {
  // Of each shard's latest row of a key, the one of the highest epoch; ties: the later shard.
  std::vector<std::uint64_t> out(keys.size(), kNoRow);
  std::vector<std::uint64_t> best(keys.size(), 0);
  std::vector<std::int64_t> rows(keys.size());
  for (const auto& shard : impl().shards) {
    shard->reader.find_many(keys, {}, rows);
    for (std::size_t i = 0; i < keys.size(); ++i) {
      if (rows[i] < 0) continue;
      const auto row = static_cast<std::uint64_t>(rows[i]);
      const std::uint64_t epoch = shard->reader.epochs(row, row + 1)[0];
      if (out[i] == kNoRow || epoch >= best[i]) {
        out[i] = shard->first_row + row;
        best[i] = epoch;
      }
    }
  }
  return out;
}

std::uint32_t ShardSet::dim() const { return impl().shards[0]->reader.dim(); }
DType ShardSet::dtype() const { return impl().shards[0]->reader.dtype(); }
const std::string& ShardSet::metadata() const { return impl().metadata; }
bool ShardSet::from_manifest() const { return impl().manifest.has_value(); }
bool ShardSet::metadata_from_manifest() const { return impl().metadata_from_manifest(); }

std::vector<EpochDrop> epoch_drops(const ShardSet& shards) {
  std::vector<EpochDrop> drops;
  for (std::size_t s = 0; s < shards.shard_count(); ++s) {
    const Reader& reader = shards.shard(s);
    const auto epochs = reader.epochs(0, reader.size());
    for (std::uint64_t row = 1; row < epochs.size; ++row) {
      if (epochs[row] < epochs[row - 1]) {
        drops.push_back({s, row, epochs[row], epochs[row - 1]});
        break;
      }
    }
  }
  return drops;
}

std::vector<std::size_t> metadata_overrides(const ShardSet& shards) {
  std::vector<std::size_t> out;
  if (!shards.metadata_from_manifest()) return out;
  for (std::size_t s = 0; s < shards.shard_count(); ++s) {
    if (!same_metadata(shards.shard(s).metadata(), shards.metadata())) out.push_back(s);
  }
  return out;
}

StoreInfo merge_stores(const std::string& out, const ShardSet& shards,
                       const std::function<void(const MergeProgress&)>& progress,
                       std::string* warning) {
  CreateOptions create;
  create.dim = shards.dim();
  create.dtype = shards.dtype();
  create.metadata = shards.metadata();
  // The default segment, or the largest shard's: a row larger than the default (a dim of
  // millions) fits a segment of the shard that holds it, and the merged store takes it.
  // A key index unless no shard keeps one: shards created without one to stay small make a
  // merged store without one too, as compact and salvage keep a store's choice.
  create.key_index = false;
  for (std::size_t s = 0; s < shards.shard_count(); ++s) {
    const StoreInfo shard = shards.shard(s).info(InfoDetail::kState);
    create.segment_bytes = std::max(create.segment_bytes, shard.segment_bytes);
    create.key_index = create.key_index || shard.keeps_key_index;
  }
  if (create.metadata.size() > kMaxMetadataBytes) {
    // Only a manifest's can be (a store's is within the limit); refused here, before the build,
    // where the error can name the output.
    throw Error(ErrorCode::kInvalidArgument, out + ": the shards' manifest gives metadata of " +
                                                 std::to_string(create.metadata.size()) +
                                                 " bytes; a store holds at most " +
                                                 std::to_string(kMaxMetadataBytes));
  }
  // One metadata for the merged store: the manifest's, else every shard's. Shards of other
  // metadata (another model, another run's config) were merged under the first one's; so were
  // shards of a manifest without metadata, under none.
  if (!shards.metadata_from_manifest()) {
    for (std::size_t s = 1; s < shards.shard_count(); ++s) {
      if (!same_metadata(shards.shard(s).metadata(), create.metadata)) {
        throw Error(
            ErrorCode::kFormatMismatch,
            out + ": shards " + shards.shard_path(0) + " and " + shards.shard_path(s) +
                " have different metadata (" + clip(create.metadata) + " and " +
                clip(shards.shard(s).metadata()) + "); a merged store has one: " +
                (shards.from_manifest() ? "give the manifest a \"metadata\" field saying which"
                                        : "merge from a manifest that gives it"));
      }
    }
  }
  // Built aside and renamed into place when complete: a merge that fails, or is killed, leaves
  // no store at `out`.
  for (std::size_t s = 0; s < shards.shard_count(); ++s) {
    refuse_output_inside(out, shards.shard_path(s));
  }
  StagedOutput build(out);
  StoreInfo info;
  try {
    // Its rows are known: the key index is built once for them, not grown on the way (more
    // than a store holds are refused at the append that passes them).
    WriterOptions writing;
    writing.expected_rows = std::min(shards.size(), detail::kMaxRows);
    Writer writer = build.create_writer(create, writing);
    // Chunks as large as an append stages whole before the lock (log/batch.h): large appends
    // written by system call, with bounded key/epoch copies.
    const std::uint64_t row_bytes = writer.info().record_bytes;
    const std::uint64_t chunk_rows = std::max<std::uint64_t>(1, detail::kStageBytes / row_bytes);
    MergeProgress done;
    done.rows_total = shards.size();
    std::vector<std::uint64_t> keys;
    std::vector<std::uint64_t> epochs;
    std::vector<std::byte> run;
    // Epoch order: the shards' rows merged as sorted sequences by (epoch, shard), each shard's
    // own order kept. Shards are written side by side, so one shard after another would put a
    // sample's epoch-0 row of a later shard after its epoch-2 row of an earlier one, and the
    // merged store's latest row of the key (its last) would be the older one.
    const std::size_t count = shards.shard_count();
    std::vector<std::uint64_t> next(count, 0);  // Each shard's first row not yet copied.
    auto head = [&](std::size_t s) { return shards.shard(s).epochs(next[s], next[s] + 1)[0]; };
    for (;;) {
      // The shard whose next row comes first, and the first of the others it must not pass.
      std::size_t s = count;
      for (std::size_t t = 0; t < count; ++t) {
        if (next[t] < shards.shard(t).size() && (s == count || head(t) < head(s))) s = t;
      }
      if (s == count) break;
      std::size_t rival = count;
      for (std::size_t t = 0; t < count; ++t) {
        if (t != s && next[t] < shards.shard(t).size() &&
            (rival == count || head(t) < head(rival))) {
          rival = t;
        }
      }
      const Reader& reader = shards.shard(s);
      // Rows of s come first while their epoch is below the rival's next one, or equal to it
      // with s the earlier shard.
      std::uint64_t run_end = reader.size();
      if (rival != count) {
        const std::uint64_t bound = head(rival);
        const auto all = reader.epochs(next[s], reader.size());
        for (std::uint64_t i = 0; i < all.size; ++i) {
          if (all[i] > bound || (all[i] == bound && rival < s)) {
            run_end = next[s] + i;
            break;
          }
        }
      }
      done.shard = s;
      done.shard_path = &shards.shard_path(s);
      for (std::uint64_t begin = next[s]; begin < run_end; begin += chunk_rows) {
        const std::uint64_t end = std::min(run_end, begin + chunk_rows);
        // Copied with Reader::read(), each row checked against its checksum over the copy (a row
        // that fails is named, and nothing is published); a key index problem of the shard is no
        // reason to refuse its rows.
        const std::uint64_t n = end - begin;
        run.resize(n * row_bytes);
        try {
          reader.read(begin, end, run.data(), run.size(), ReadCheck::kChecksums);
        } catch (const Error& e) {
          if (e.code() != ErrorCode::kCorruption) throw;
          // The message names the shard's rows file, the row, its key and epoch.
          throw Error(ErrorCode::kCorruption, std::string(e.what()) + "; nothing was merged");
        }
        const auto key_view = reader.keys(begin, end);
        const auto epoch_view = reader.epochs(begin, end);
        keys.resize(n);
        epochs.resize(n);
        for (std::uint64_t i = 0; i < n; ++i) {
          keys[i] = key_view[i];
          epochs[i] = epoch_view[i];
        }
        writer.append(keys, epochs, ConstMatrix{run.data(), reader.dtype(), n, reader.dim(), 0});
        done.rows_done += n;
        if (progress) progress(done);
      }
      next[s] = run_end;
    }
    writer.sync();
    info = writer.info();
    info.path = build.out();
    const std::string closed = build.close_writer(writer, done.rows_done);
    if (warning != nullptr) *warning = closed;
  } catch (...) {
    build.rethrow_naming_out();
  }
  build.publish();
  return info;
}

}  // namespace embstore
