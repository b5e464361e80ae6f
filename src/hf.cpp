// Hugging Face GPT-2 export and --init-from (include/mptrain/hf.hpp).
#include "mptrain/hf.hpp"

#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "mptrain/checkpoint.hpp"
#include "mptrain/error.hpp"
#include "mptrain/safetensors.hpp"

namespace mpt {

namespace {

namespace fs = std::filesystem;

/// Conv1D weights in transformers' GPT-2: stored [in, out], the transpose of mptrain's [out, in].
bool is_conv1d(const std::string& name) {
  return name.ends_with("attn.c_attn.weight") || name.ends_with("attn.c_proj.weight") ||
         name.ends_with("mlp.c_fc.weight") || name.ends_with("mlp.c_proj.weight");
}

std::string shape_text(const std::vector<int64_t>& shape) {
  return fmt::format("[{}]", fmt::join(shape, ", "));
}

/// [rows, cols] -> [cols, rows].
std::vector<float> transposed(const float* src, int64_t rows, int64_t cols) {
  std::vector<float> out(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[static_cast<size_t>(c * rows + r)] = src[r * cols + c];
  return out;
}

/// A tensor of the export in transformers' layout: unpadded wte, Conv1D weights transposed.
struct HfTensor {
  std::vector<int64_t> shape;
  std::vector<float> values;
};

HfTensor to_hf(const TensorSpec& spec, const std::vector<float>& w, const GPTConfig& config) {
  if (spec.name == "wte.weight")
    return {{config.vocab_size, config.channels},
            std::vector<float>(w.begin(), w.begin() + config.vocab_size * config.channels)};
  if (is_conv1d(spec.name))
    return {{spec.shape[1], spec.shape[0]}, transposed(w.data(), spec.shape[0], spec.shape[1])};
  return {spec.shape, w};
}

void write_file(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc | std::ios::binary);
    out << text;
    out.flush();
    if (!out) throw Error(fmt::format("cannot write '{}'", tmp));
  }
  fs::rename(tmp, path);
}

std::string hf_config_json(const GPTConfig& c, DType dtype) {
  // GPT-2's <|endoftext|> (50256) is its bos/eos; other vocabularies have none.
  const nlohmann::json special = c.vocab_size == 50257 ? nlohmann::json(50256) : nlohmann::json(nullptr);
  const nlohmann::ordered_json j = {{"architectures", {"GPT2LMHeadModel"}},
                                    {"model_type", "gpt2"},
                                    {"vocab_size", c.vocab_size},
                                    {"n_positions", c.max_seq_len},
                                    {"n_ctx", c.max_seq_len},
                                    {"n_embd", c.channels},
                                    {"n_layer", c.num_layers},
                                    {"n_head", c.num_heads},
                                    {"n_inner", nullptr},
                                    {"activation_function", "gelu_new"},
                                    {"layer_norm_epsilon", 1e-5},
                                    {"resid_pdrop", 0.0},
                                    {"embd_pdrop", 0.0},
                                    {"attn_pdrop", 0.0},
                                    {"initializer_range", 0.02},
                                    {"scale_attn_weights", true},
                                    {"tie_word_embeddings", true},
                                    {"bos_token_id", special},
                                    {"eos_token_id", special},
                                    {"torch_dtype", dtype == DType::f32   ? "float32"
                                                    : dtype == DType::f16 ? "float16"
                                                                          : "bfloat16"}};
  return j.dump(2) + "\n";
}

/// `values` stored as `dtype` (bytes appended to `storage`, which must not reallocate: reserved by the
/// caller).
const void* stored_as(DType dtype, const std::vector<float>& values,
                      std::vector<std::vector<std::byte>>& storage) {
  if (dtype == DType::f32) return values.data();
  storage.emplace_back(values.size() * 2);
  if (dtype == DType::f16)
    convert(values.data(), reinterpret_cast<half*>(storage.back().data()), values.size());
  else
    convert(values.data(), reinterpret_cast<bf16*>(storage.back().data()), values.size());
  return storage.back().data();
}

// ---- --init-from ------------------------------------------------------------------------------------

/// The tensors of an --init-from source by mptrain name, in mptrain's layout except wte (unpadded [V, C])
/// and wpe (any number of rows), with the model fields the source states (-1: not stated).
struct InitSource {
  std::string path;  // the file the tensors come from
  std::map<std::string, const LoadedTensor*> tensors;
  std::map<std::string, std::string> source_names;  // mptrain name -> the name in the file
  /// layers, heads, channels, vocab_size -> (value, where the source states it)
  std::map<std::string, std::pair<int64_t, std::string>> fields;
  SafetensorsFile file;
};

std::vector<float> as_float(const LoadedTensor& t, const std::string& path, const std::string& name) {
  std::vector<float> out(t.num_elements());
  if (t.dtype == DType::f32) {
    std::memcpy(out.data(), t.bytes.data(), out.size() * 4);
  } else if (t.dtype == DType::f16) {
    convert(reinterpret_cast<const half*>(t.bytes.data()), out.data(), out.size());
  } else if (t.dtype == DType::bf16) {
    convert(reinterpret_cast<const bf16*>(t.bytes.data()), out.data(), out.size());
  } else {
    throw InputError(fmt::format("--init-from {}: tensor '{}' has dtype {} (F32, F16 or BF16 expected)", path,
                                 name, dtype_name(t.dtype)));
  }
  return out;
}

void read_hf_config(const std::string& path, InitSource& src) {
  std::ifstream in(path);
  MPT_INPUT_CHECK(static_cast<bool>(in), "--init-from {}: cannot open", path);
  const nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
  MPT_INPUT_CHECK(!j.is_discarded() && j.is_object(), "--init-from {}: not a JSON object", path);
  const std::pair<const char*, const char*> keys[] = {
      {"n_layer", "layers"}, {"n_head", "heads"}, {"n_embd", "channels"}, {"vocab_size", "vocab_size"}};
  for (const auto& [key, field] : keys)
    if (j.contains(key) && j[key].is_number_integer())
      src.fields[field] = {j[key].get<int64_t>(), fmt::format("{}: {}", path, key)};
  const std::string activation = j.value("activation_function", "gelu_new");
  MPT_INPUT_CHECK(activation == "gelu_new" || activation == "gelu_pytorch_tanh",
                  "--init-from {}: activation_function '{}' is not the tanh GELU (gelu_new) of this model",
                  path, activation);
}

void open_hf(const std::string& path, InitSource& src) {
  for (const auto& [name, t] : src.file.tensors) {
    std::string base = name.starts_with("transformer.") ? name.substr(12) : name;
    if (base.ends_with(".attn.bias") || base.ends_with(".attn.masked_bias")) continue;  // mask buffers
    if (base == "lm_head.weight") continue;                                             // checked below
    src.tensors[base] = &t;
    src.source_names[base] = name;
  }
  const auto lm_head = src.file.tensors.find("lm_head.weight");
  if (lm_head != src.file.tensors.end()) {
    const auto wte = src.tensors.find("wte.weight");
    MPT_INPUT_CHECK(
        wte != src.tensors.end() && wte->second->shape == lm_head->second.shape &&
            wte->second->dtype == lm_head->second.dtype && wte->second->bytes == lm_head->second.bytes,
        "--init-from {}: lm_head.weight differs from wte.weight (this model ties its LM head to the "
        "token embedding)",
        path);
  }
}

void open_checkpoint_source(InitSource& src) {
  src.file = read_checkpoint(src.path);
  for (const char* field : {"layers", "heads", "channels", "vocab_size"})
    src.fields[field] = {checkpoint_int(src.file, field), fmt::format("{}: metadata {}", src.path, field)};
  for (const auto& [name, t] : src.file.tensors)
    if (name.starts_with("master.")) {
      src.tensors[name.substr(7)] = &t;
      src.source_names[name.substr(7)] = name;
    }
}

/// The expected shape of tensor `spec` in the source (wte unpadded; wpe checked separately).
std::vector<int64_t> source_shape(const TensorSpec& spec, const GPTConfig& c, bool hf) {
  if (spec.name == "wte.weight") return {c.vocab_size, c.channels};
  if (hf && is_conv1d(spec.name)) return {spec.shape[1], spec.shape[0]};
  return spec.shape;
}

void check_fields(const InitSource& src, const GPTConfig& c) {
  const std::pair<const char*, std::pair<int64_t, const char*>> expect[] = {
      {"layers", {c.num_layers, "--layers"}},
      {"heads", {c.num_heads, "--heads"}},
      {"channels", {c.channels, "--channels"}},
      {"vocab_size", {c.vocab_size, "the data's vocabulary"}}};
  for (const auto& [field, want] : expect) {
    const auto it = src.fields.find(field);
    if (it == src.fields.end()) continue;
    MPT_INPUT_CHECK(it->second.first == want.first, "--init-from {} is {}, {} is {}", it->second.second,
                    it->second.first, want.second, want.first);
  }
}

}  // namespace

void export_hf(const GPTConfig& config, const std::vector<std::vector<float>>& weights,
               const std::string& dir, DType dtype, const std::string& tokenizer_json) {
  MPT_CHECK(dtype == DType::f32 || dtype == DType::f16 || dtype == DType::bf16,
            "export: dtype {} unsupported", dtype_name(dtype));
  const std::vector<TensorSpec> specs = gpt_tensors(config);
  MPT_INPUT_CHECK(weights.size() == specs.size(), "export: {} tensors given, the model has {}",
                  weights.size(), specs.size());
  std::vector<HfTensor> hf;
  hf.reserve(specs.size());
  for (size_t i = 0; i < specs.size(); ++i) {
    MPT_INPUT_CHECK(weights[i].size() == specs[i].num_elements(),
                    "export: tensor '{}' has {} values, expected {}", specs[i].name, weights[i].size(),
                    specs[i].num_elements());
    hf.push_back(to_hf(specs[i], weights[i], config));
  }
  std::error_code ec;
  fs::create_directories(dir, ec);
  MPT_INPUT_CHECK(!ec && fs::is_directory(dir), "--out {}: cannot create the directory ({})", dir,
                  ec.message());
  std::vector<std::vector<std::byte>> storage;
  storage.reserve(specs.size());
  std::vector<TensorToWrite> tensors;
  for (size_t i = 0; i < specs.size(); ++i)
    tensors.push_back(
        {"transformer." + specs[i].name, dtype, hf[i].shape, stored_as(dtype, hf[i].values, storage)});
  write_safetensors(dir + "/model.safetensors", tensors, {{"format", "pt"}});
  write_file(dir + "/config.json", hf_config_json(config, dtype));
  if (!tokenizer_json.empty()) {
    write_file(dir + "/tokenizer.json", tokenizer_json);
    write_file(dir + "/tokenizer_config.json",
               nlohmann::ordered_json({{"tokenizer_class", "PreTrainedTokenizerFast"},
                                       {"model_max_length", config.max_seq_len},
                                       {"clean_up_tokenization_spaces", false}})
                       .dump(2) +
                   "\n");
  }
}

std::vector<float> load_init_weights(const std::string& path, const GPTConfig& config) {
  InitSource src;
  std::error_code ec;
  const bool is_dir = fs::is_directory(path, ec);
  src.path = is_dir ? path + "/model.safetensors" : path;
  MPT_INPUT_CHECK(fs::exists(src.path, ec), "--init-from {}: no such {}", src.path,
                  is_dir ? "file" : "file or directory");
  try {
    src.file = read_safetensors(src.path);
  } catch (const InputError& e) {
    throw InputError(fmt::format("--init-from {}", e.what()));  // the reader's message starts with the path
  }
  const auto format = src.file.metadata.find("format");
  const bool hf = format == src.file.metadata.end() || format->second != "mptrain-checkpoint-v1";
  if (hf) {
    if (is_dir && fs::exists(path + "/config.json", ec)) read_hf_config(path + "/config.json", src);
    open_hf(src.path, src);
  } else {
    open_checkpoint_source(src);
  }
  check_fields(src, config);
  std::vector<float> values;
  std::set<std::string> used;
  for (const TensorSpec& spec : gpt_tensors(config)) {
    const auto it = src.tensors.find(spec.name);
    MPT_INPUT_CHECK(it != src.tensors.end(),
                    "--init-from {}: tensor '{}{}' is missing (a model with --layers {})", src.path,
                    hf ? "transformer." : "master.", spec.name, config.num_layers);
    const LoadedTensor& t = *it->second;
    const std::string& name = src.source_names[spec.name];
    std::vector<int64_t> want = source_shape(spec, config, hf);
    const bool longer_wpe =
        spec.name == "wpe.weight" && t.shape.size() == 2 && t.shape[0] >= want[0] && t.shape[1] == want[1];
    // A checkpoint's wte carries the padding rows of its own vocabulary.
    const bool padded_wte = !hf && spec.name == "wte.weight" && t.shape == spec.shape;
    MPT_INPUT_CHECK(
        t.shape == want || longer_wpe || padded_wte,
        "--init-from {}: tensor '{}' has shape {}, the model (--layers/--heads/--channels/--seq-len "
        "and the data's vocabulary) needs {}",
        src.path, name, shape_text(t.shape), shape_text(want));
    std::vector<float> w = as_float(t, src.path, name);
    if (hf && is_conv1d(spec.name)) w = transposed(w.data(), want[0], want[1]);
    w.resize(spec.num_elements(), 0.0f);  // wte: zero padding rows; wpe: its first max_seq_len rows
    if (spec.name == "wte.weight") std::fill(w.begin() + config.vocab_size * config.channels, w.end(), 0.0f);
    values.insert(values.end(), w.begin(), w.end());
    used.insert(spec.name);
  }
  for (const auto& [base, t] : src.tensors)
    MPT_INPUT_CHECK(used.count(base), "--init-from {}: tensor '{}' is not part of the model (--layers {})",
                    src.path, src.source_names[base], config.num_layers);
  return values;
}

}  // namespace mpt
