// shard_set_internals.h — ShardSet's rules for the shards a manifest lists, in one place for
// ShardSet::open and refresh() (src/shard_set.cc) and for the Python ShardSet's
// follow_manifest() (src/python/module.cc), which holds Readers of its own.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "embstore/shard_set.h"

namespace embstore::detail {

// Where the shard of `entry` is: its path joined to the directory of the manifest file at
// `manifest_file`.
std::string listed_shard_path(const std::string& manifest_file, const ManifestShard& entry);

// refresh()'s check of a manifest read again: kFormatMismatch, naming `manifest_path`, unless
// `now` keeps the dim and dtype of the shards held (`dim`, `dtype`).
void check_manifest_unchanged(const std::string& manifest_path, const Manifest& now,
                              std::uint32_t dim, DType dtype);

// Opens the shard a manifest (`manifest_path` in messages, of dim `dim` and dtype `dtype`) lists
// as `entry`, at `path` (listed_shard_path), with `options`, and checks it as ShardSet::open
// checks each one: kNotFound naming the manifest and the entry when it is missing or there but
// no store; kFormatMismatch when it holds another dim or dtype, or is another store than the
// entry's; kCorruption when it holds fewer rows than the entry recorded and was not truncated
// since (a newer generation), or is of an older generation (a stale copy). Then, as for any
// shard of a set, kInvalidArgument when it is the same store as one held (`held_store_ids`,
// whose shards are at `held_paths`, one path for each id). Returns its Reader.
Reader open_listed_shard(const std::string& manifest_path, std::uint32_t dim, DType dtype,
                         const ManifestShard& entry, const std::string& path,
                         const ReaderOptions& options,
                         const std::vector<std::string>& held_store_ids,
                         const std::vector<std::string>& held_paths);

}  // namespace embstore::detail
