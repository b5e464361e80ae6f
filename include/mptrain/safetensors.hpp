// safetensors files (https://github.com/huggingface/safetensors format): an 8-byte little-endian header
// length, a JSON header mapping tensor names to {dtype, shape, data_offsets} plus a "__metadata__" map of
// strings, then the raw little-endian tensor bytes. Used for checkpoints and for exchanging tensors with the
// PyTorch reference checks. Writes are atomic: temporary file, fsync, rename, fsync of the directory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "mptrain/dtype.hpp"

namespace mpt {

/// A tensor to write: `data` points at num_elements(shape) elements of `dtype` in host memory.
struct TensorToWrite {
  std::string name;
  DType dtype = DType::f32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
};

/// A tensor read back: its bytes are owned.
struct LoadedTensor {
  DType dtype = DType::f32;
  std::vector<int64_t> shape;
  std::vector<std::byte> bytes;
  /// Product of the shape.
  size_t num_elements() const;
  /// The data as T; throws mpt::InputError naming `name` when dtype is not T.
  template <typename T>
  std::vector<T> as(const std::string& name) const;
};

struct SafetensorsFile {
  std::map<std::string, LoadedTensor> tensors;
  std::map<std::string, std::string> metadata;
  /// The tensor `name`; throws mpt::InputError naming the file's tensor and `path` when absent.
  const LoadedTensor& at(const std::string& name) const;
  std::string path;
};

/// Writes `tensors` (in the given order) and `metadata` to `path` atomically (path + ".tmp", fsync, rename,
/// fsync of the directory). Throws mpt::Error naming the path and the failing step on any I/O error; the
/// previous file at `path`, if any, is then untouched. Test hook: with the environment variable
/// MPTRAIN_DEBUG_PAUSE_BEFORE_RENAME set to a suffix of `path`, the writer prints its pid on stderr and
/// sleeps between the complete temporary file and the rename until killed (tests/reliability/faults.py).
void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata);

/// Reads a whole safetensors file. Throws mpt::InputError with the path and what is wrong for a missing or
/// unreadable file, a truncated file, a malformed header, an unknown dtype, or offsets that disagree with the
/// shapes or the file size.
SafetensorsFile read_safetensors(const std::string& path);

/// safetensors dtype string ("F32", "F16", "BF16", "F64", "I32", "I64", "U8").
std::string safetensors_dtype_name(DType dtype);

}  // namespace mpt

template <typename T>
std::vector<T> mpt::LoadedTensor::as(const std::string& name) const {
  if (dtype != dtype_of<T>())
    throw InputError(MPT_FORMAT("tensor '{}' has dtype {}, expected {}", name, dtype_name(dtype),
                                dtype_name(dtype_of<T>())));
  std::vector<T> out(num_elements());
  if (!out.empty()) std::memcpy(out.data(), bytes.data(), out.size() * sizeof(T));
  return out;
}
