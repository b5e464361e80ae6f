// safetensors reading and atomic writing (include/mptrain/safetensors.hpp), header through nlohmann/json.
#include "mptrain/safetensors.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>

#include <nlohmann/json.hpp>

#include "mptrain/error.hpp"

namespace mpt {

namespace {

DType parse_dtype(const std::string& s, const std::string& path, const std::string& name) {
  if (s == "F32") return DType::f32;
  if (s == "F16") return DType::f16;
  if (s == "BF16") return DType::bf16;
  if (s == "F64") return DType::f64;
  if (s == "I32") return DType::i32;
  if (s == "I64") return DType::i64;
  if (s == "U8") return DType::u8;
  throw InputError(fmt::format("{}: tensor '{}' has unsupported dtype '{}'", path, name, s));
}

size_t product(const std::vector<int64_t>& shape) {
  size_t n = 1;
  for (int64_t d : shape) n *= static_cast<size_t>(d);
  return n;
}

/// The integers of the header field `field` of tensor `name`: a JSON array of integers that fit T. nlohmann's
/// get<> would cast a float (12e32) or an out-of-range integer with static_cast, which is undefined.
template <typename T>
std::vector<T> header_integers(const nlohmann::json& entry, const char* field, const std::string& path,
                               const std::string& name) {
  const nlohmann::json& array = entry.at(field);
  const auto bad = [&] {
    return InputError(fmt::format("{}: tensor '{}' has a malformed {} (not an array of integers in range)",
                                  path, name, field));
  };
  if (!array.is_array()) throw bad();
  std::vector<T> values;
  for (const nlohmann::json& v : array) {
    if (v.is_number_unsigned()) {
      const auto u = v.get<uint64_t>();
      if (u > static_cast<uint64_t>(std::numeric_limits<T>::max())) throw bad();
      values.push_back(static_cast<T>(u));
    } else if (v.is_number_integer()) {
      const auto i = v.get<int64_t>();
      if (i < 0) throw bad();  // sizes and offsets are never negative
      values.push_back(static_cast<T>(i));
    } else {
      throw bad();
    }
  }
  return values;
}

[[noreturn]] void io_error(const std::string& what, const std::string& path) {
  throw Error(fmt::format("{} '{}': {}", what, path, std::strerror(errno)));
}

void write_all(int fd, const void* data, size_t n, const std::string& path) {
  const auto* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      io_error("cannot write", path);
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
}

/// Test hook for the kill-during-checkpoint test (tests/reliability): when the environment variable
/// MPTRAIN_DEBUG_PAUSE_BEFORE_RENAME is set and `path` ends with its value, the writer announces itself on
/// stderr and sleeps between the complete temporary file and the rename, until it is killed. Never set in
/// normal use; unset, it costs one getenv per file written.
void pause_before_rename_for_tests(const std::string& tmp, const std::string& path) {
  const char* suffix = std::getenv("MPTRAIN_DEBUG_PAUSE_BEFORE_RENAME");
  if (suffix == nullptr || *suffix == '\0' || !path.ends_with(suffix)) return;
  std::fprintf(stderr, "mptrain: debug: pid %d paused before renaming %s to %s\n",
               static_cast<int>(::getpid()), tmp.c_str(), path.c_str());
  std::fflush(stderr);
  for (;;) ::pause();
}

}  // namespace

std::string safetensors_dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32:
      return "F32";
    case DType::f16:
      return "F16";
    case DType::bf16:
      return "BF16";
    case DType::f64:
      return "F64";
    case DType::i32:
      return "I32";
    case DType::i64:
      return "I64";
    case DType::u8:
      return "U8";
  }
  return "?";
}

size_t LoadedTensor::num_elements() const {
  return product(shape);
}

const LoadedTensor& SafetensorsFile::at(const std::string& name) const {
  auto it = tensors.find(name);
  if (it == tensors.end()) throw InputError(fmt::format("{}: no tensor named '{}'", path, name));
  return it->second;
}

void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header;
  if (!metadata.empty()) header["__metadata__"] = metadata;
  size_t offset = 0;
  for (const TensorToWrite& t : tensors) {
    const size_t bytes = product(t.shape) * dtype_size(t.dtype);
    header[t.name] = {{"dtype", safetensors_dtype_name(t.dtype)},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // keep the data 8-byte aligned, as the reference writer does
  const uint64_t length = text.size();
  unsigned char prefix[8];
  for (int i = 0; i < 8; ++i) prefix[i] = static_cast<unsigned char>(length >> (8 * i));

  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) io_error("cannot create", tmp);
  try {
    write_all(fd, prefix, 8, tmp);
    write_all(fd, text.data(), text.size(), tmp);
    for (const TensorToWrite& t : tensors) write_all(fd, t.data, product(t.shape) * dtype_size(t.dtype), tmp);
    if (::fsync(fd) != 0) io_error("cannot fsync", tmp);
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  if (::close(fd) != 0) {
    ::unlink(tmp.c_str());
    io_error("cannot close", tmp);
  }
  pause_before_rename_for_tests(tmp, path);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    ::unlink(tmp.c_str());
    io_error("cannot rename to", path);
  }
  // The rename is durable only once the directory entry is.
  std::filesystem::path parent = std::filesystem::path(path).parent_path();
  if (parent.empty()) parent = ".";
  const std::string dir = parent.string();
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) io_error("cannot open directory", dir);
  const int rc = ::fsync(dfd);
  ::close(dfd);
  if (rc != 0) io_error("cannot fsync directory", dir);
}

SafetensorsFile read_safetensors(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec))
    throw InputError(fmt::format("{}: is a directory, not a file", path));
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError(fmt::format("{}: cannot open ({})", path, std::strerror(errno)));
  in.seekg(0, std::ios::end);
  const auto file_size = static_cast<uint64_t>(in.tellg());
  in.seekg(0);
  if (file_size < 8)
    throw InputError(fmt::format("{}: truncated ({} bytes, no header length)", path, file_size));
  unsigned char prefix[8];
  in.read(reinterpret_cast<char*>(prefix), 8);
  uint64_t header_length = 0;
  for (int i = 0; i < 8; ++i) header_length |= static_cast<uint64_t>(prefix[i]) << (8 * i);
  if (header_length > file_size - 8)
    throw InputError(fmt::format("{}: truncated or not safetensors (header length {} > {} bytes left)", path,
                                 header_length, file_size - 8));
  std::string text(header_length, '\0');
  in.read(text.data(), static_cast<std::streamsize>(header_length));
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {  // syntax errors, and numbers out of range (e.g. 1E666)
    throw InputError(fmt::format("{}: malformed safetensors header: {}", path, e.what()));
  }
  if (!header.is_object()) throw InputError(fmt::format("{}: safetensors header is not a JSON object", path));

  SafetensorsFile file;
  file.path = path;
  const uint64_t data_size = file_size - 8 - header_length;
  std::vector<std::byte> data(data_size);
  in.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(data_size));
  if (!in) throw InputError(fmt::format("{}: read error", path));
  try {
    for (const auto& [name, entry] : header.items()) {
      if (name == "__metadata__") {
        for (const auto& [key, value] : entry.items()) file.metadata[key] = value.get<std::string>();
        continue;
      }
      LoadedTensor t;
      t.dtype = parse_dtype(entry.at("dtype").get<std::string>(), path, name);
      t.shape = header_integers<int64_t>(entry, "shape", path, name);
      uint64_t elements = 1;  // checked so that elements x 8 bytes fits uint64_t
      for (int64_t d : t.shape) {
        const auto n = static_cast<uint64_t>(d);
        if (n != 0 && elements > std::numeric_limits<uint64_t>::max() / 8 / n)
          throw InputError(fmt::format("{}: tensor '{}' has a shape too large to address", path, name));
        elements *= n;
      }
      const auto offsets = header_integers<uint64_t>(entry, "data_offsets", path, name);
      if (offsets.size() != 2 || offsets[0] > offsets[1])
        throw InputError(fmt::format("{}: tensor '{}' has malformed data offsets", path, name));
      if (offsets[1] > data_size)
        throw InputError(
            fmt::format("{}: truncated: tensor '{}' needs data bytes up to {}, the file holds {}", path, name,
                        offsets[1], data_size));
      const uint64_t expected = product(t.shape) * dtype_size(t.dtype);
      if (offsets[1] - offsets[0] != expected)
        throw InputError(fmt::format("{}: tensor '{}' holds {} bytes, its shape and dtype need {}", path,
                                     name, offsets[1] - offsets[0], expected));
      t.bytes.assign(data.begin() + static_cast<std::ptrdiff_t>(offsets[0]),
                     data.begin() + static_cast<std::ptrdiff_t>(offsets[1]));
      file.tensors.emplace(name, std::move(t));
    }
  } catch (const nlohmann::json::exception& e) {
    throw InputError(fmt::format("{}: malformed safetensors header entry: {}", path, e.what()));
  }
  return file;
}

}  // namespace mpt
