// GPT-2 forward and backward over the Backend ops (include/mptrain/model.hpp). The op sequence follows the
// model definition; the backward runs it in reverse, with one running residual-stream gradient that every
// branch adds into (Backend backward ops accumulate).
#include "mptrain/model.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <numbers>

#include "mptrain/error.hpp"
#include "mptrain/random.hpp"

namespace mpt {

void GPTConfig::validate() const {
  MPT_INPUT_CHECK(vocab_size >= 1, "model: vocab_size must be >= 1, got {}", vocab_size);
  MPT_INPUT_CHECK(max_seq_len >= 1, "model: max_seq_len must be >= 1, got {}", max_seq_len);
  MPT_INPUT_CHECK(num_layers >= 1, "model: num_layers must be >= 1, got {}", num_layers);
  MPT_INPUT_CHECK(num_heads >= 1, "model: num_heads must be >= 1, got {}", num_heads);
  MPT_INPUT_CHECK(channels >= 1, "model: channels must be >= 1, got {}", channels);
  // Bounds far above any trainable model, so an absurd value is an error, not an allocation storm.
  MPT_INPUT_CHECK(vocab_size <= (int64_t{1} << 24), "model: vocab_size must be <= 2^24, got {}", vocab_size);
  MPT_INPUT_CHECK(max_seq_len <= (int64_t{1} << 20), "model: max_seq_len (--seq-len) must be <= 2^20, got {}",
                  max_seq_len);
  MPT_INPUT_CHECK(num_layers <= 4096, "model: num_layers (--layers) must be <= 4096, got {}", num_layers);
  MPT_INPUT_CHECK(channels <= (int64_t{1} << 16), "model: channels (--channels) must be <= 65536, got {}",
                  channels);
  MPT_INPUT_CHECK(channels % num_heads == 0, "model: num_heads ({}) must divide channels ({})", num_heads,
                  channels);
}

namespace {

constexpr size_t kPerLayer = 12;
enum LayerTensor : size_t {
  kLn1W,
  kLn1B,
  kQkvW,
  kQkvB,
  kAttProjW,
  kAttProjB,
  kLn2W,
  kLn2B,
  kFcW,
  kFcB,
  kFcProjW,
  kFcProjB
};
size_t layer_index(int64_t l, LayerTensor k) {
  return 2 + kPerLayer * static_cast<size_t>(l) + k;
}

}  // namespace

std::vector<TensorSpec> gpt_tensors(const GPTConfig& c) {
  c.validate();
  const int64_t C = c.channels;
  std::vector<TensorSpec> t = {{"wte.weight", {c.padded_vocab_size(), C}, true},
                               {"wpe.weight", {c.max_seq_len, C}, true}};
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string h = fmt::format("h.{}.", l);
    t.push_back({h + "ln_1.weight", {C}, false});
    t.push_back({h + "ln_1.bias", {C}, false});
    t.push_back({h + "attn.c_attn.weight", {3 * C, C}, true});
    t.push_back({h + "attn.c_attn.bias", {3 * C}, false});
    t.push_back({h + "attn.c_proj.weight", {C, C}, true});
    t.push_back({h + "attn.c_proj.bias", {C}, false});
    t.push_back({h + "ln_2.weight", {C}, false});
    t.push_back({h + "ln_2.bias", {C}, false});
    t.push_back({h + "mlp.c_fc.weight", {4 * C, C}, true});
    t.push_back({h + "mlp.c_fc.bias", {4 * C}, false});
    t.push_back({h + "mlp.c_proj.weight", {C, 4 * C}, true});
    t.push_back({h + "mlp.c_proj.bias", {C}, false});
  }
  t.push_back({"ln_f.weight", {C}, false});
  t.push_back({"ln_f.bias", {C}, false});
  return t;
}

namespace {

/// out[i] = N(0, stddev) for i < n_random, 0 for n_random <= i < n. Element i takes Philox block i/4 of the
/// stream (seed, tensor), counter {i/4 low, i/4 high, tensor, 0}: the four 32-bit words are two pairs of
/// uniforms in (0, 1), (w + 1/2) 2^-32, and Box-Muller turns pair p into elements 4(i/4) + 2p (r cos) and
/// 4(i/4) + 2p + 1 (r sin). So a value depends only on (seed, tensor, i), never on the thread count.
void fill_normal(float* out, size_t n, size_t n_random, double stddev, uint64_t seed, uint32_t tensor) {
  const std::array<uint32_t, 2> key = {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
  const size_t blocks = (n_random + 3) / 4;
#pragma omp parallel for schedule(static)
  for (size_t b = 0; b < blocks; ++b) {
    const std::array<uint32_t, 4> w =
        philox4x32_10({static_cast<uint32_t>(b), static_cast<uint32_t>(uint64_t{b} >> 32), tensor, 0}, key);
    float z[4];
    for (int p = 0; p < 2; ++p) {
      const double u1 = (static_cast<double>(w[2 * p]) + 0.5) * 0x1.0p-32;
      const double u2 = (static_cast<double>(w[2 * p + 1]) + 0.5) * 0x1.0p-32;
      const double r = stddev * std::sqrt(-2.0 * std::log(u1));
      const double theta = 2.0 * std::numbers::pi * u2;
      z[2 * p] = static_cast<float>(r * std::cos(theta));
      z[2 * p + 1] = static_cast<float>(r * std::sin(theta));
    }
    const size_t first = 4 * b;
    for (size_t k = 0; k < 4 && first + k < n_random; ++k) out[first + k] = z[k];
  }
  std::fill(out + n_random, out + n, 0.0f);
}

}  // namespace

std::vector<float> gpt_init(const GPTConfig& c, uint64_t seed) {
  const std::vector<TensorSpec> specs = gpt_tensors(c);
  size_t total = 0;
  for (const TensorSpec& t : specs) total += t.num_elements();
  std::vector<float> values(total);
  const double residual_std = 0.02 / std::sqrt(2.0 * static_cast<double>(c.num_layers));
  size_t at = 0;
  for (size_t k = 0; k < specs.size(); ++k) {
    const TensorSpec& t = specs[k];
    const size_t n = t.num_elements();
    float* out = values.data() + at;
    at += n;
    const bool is_ln_weight =
        t.name.ends_with("ln_1.weight") || t.name.ends_with("ln_2.weight") || t.name == "ln_f.weight";
    const bool is_residual_proj =
        t.name.ends_with("attn.c_proj.weight") || t.name.ends_with("mlp.c_proj.weight");
    if (t.name.ends_with(".bias")) {
      std::fill(out, out + n, 0.0f);
    } else if (is_ln_weight) {
      std::fill(out, out + n, 1.0f);
    } else {
      // wte's padding rows [V, Vp) are 0.
      const size_t n_random = t.name == "wte.weight" ? static_cast<size_t>(c.vocab_size * c.channels) : n;
      fill_normal(out, n, n_random, is_residual_proj ? residual_std : 0.02, seed, static_cast<uint32_t>(k));
    }
  }
  return values;
}

double gpt_flops_per_token(const GPTConfig& c, int64_t T) {
  double n = 0;
  for (const TensorSpec& t : gpt_tensors(c)) n += static_cast<double>(t.num_elements());
  return 6.0 * n + 12.0 * static_cast<double>(c.num_layers * c.channels * T);
}

const char* recompute_name(Recompute mode) {
  switch (mode) {
    case Recompute::none:
      return "none";
    case Recompute::selective:
      return "selective";
    case Recompute::block:
      return "block";
  }
  return "?";
}

Recompute parse_recompute(const std::string& text) {
  if (text == "none") return Recompute::none;
  if (text == "selective") return Recompute::selective;
  if (text == "block") return Recompute::block;
  throw InputError(fmt::format("--recompute must be none, selective or block, got '{}'", text));
}

// ---- activations ----------------------------------------------------------------------------------------

// Each per-layer kind holds L buffers (kept for every layer) or 1 (shared by all layers, refilled by the
// recomputation before each layer's backward), by recompute mode:
//   none:      every kind per layer; backward scratch of its own.
//   selective: per layer qkv, residual2, fch, residual3 and the LayerNorm statistics; shared ln1, atty, att,
//              attproj (also holding fcproj), ln2, fch_gelu.
//   block:     per layer residual3 (the next block's input); everything else shared.
// In the recompute modes backward writes its gradients into the shared buffers that are dead by then
// (GPT::backward names them), so only dresidual is scratch of its own. The GELU's input gradient needs no
// buffer: the c_proj backward applies GELU' to it as it writes dfch (Backend::matmul_backward_gelu).
struct GPT::Activations {
  Buffer tokens, targets;  // int32 [B,T]
  Buffer encoded;          // [B,T,C]
  std::vector<Buffer> ln1, ln1_mean, ln1_rstd, qkv, atty, att, attproj, residual2, ln2, ln2_mean, ln2_rstd,
      fch, fch_gelu, fcproj, residual3;
  Buffer lnf, lnf_mean, lnf_rstd;  // [B,T,C], [B,T], [B,T]
  Buffer logits;                   // [B,T,Vp] (dlogits in place)
  Buffer losses;                   // FP32 [B,T]
  // Backward scratch, reused by every layer (dln, datty, dqkv, dfch only with Recompute::none).
  Buffer dresidual, dln, datty, dqkv, dfch;
  size_t bytes = 0;
};

/// Layer l's view of the activations.
struct GPT::LayerActs {
  const void* input;  // the block's input: encoded or the previous block's residual3
  void *ln1, *qkv, *atty, *att, *attproj, *residual2, *ln2, *fch, *fch_gelu, *fcproj, *residual3;
  float *ln1_mean, *ln1_rstd, *ln2_mean, *ln2_rstd;
};

namespace {

/// Fills `a` with the buffers of the plan described above, each from `alloc(bytes)`.
void plan_activations(GPT::Activations& a, const GPTConfig& config, DType dtype, Recompute mode, int64_t B,
                      int64_t T, size_t att_bytes, const std::function<Buffer(size_t)>& alloc_bytes) {
  const size_t es = dtype_size(dtype);
  const auto BT = static_cast<size_t>(B * T);
  const auto C = static_cast<size_t>(config.channels);
  const auto Vp = static_cast<size_t>(config.padded_vocab_size());
  const auto L = static_cast<size_t>(config.num_layers);
  auto alloc = [&](size_t bytes) {
    a.bytes += bytes;
    return alloc_bytes(bytes);
  };
  const bool none = mode == Recompute::none, selective = mode == Recompute::selective;
  // `kept`: one buffer per layer, else one shared.
  auto kind = [&](std::vector<Buffer>& v, bool kept, size_t bytes) {
    for (size_t l = 0; l < (kept ? L : 1); ++l) v.push_back(alloc(bytes));
  };
  a.tokens = alloc(BT * sizeof(int32_t));
  a.targets = alloc(BT * sizeof(int32_t));
  a.encoded = alloc(BT * C * es);
  kind(a.ln1, none, BT * C * es);
  kind(a.ln1_mean, none || selective, BT * sizeof(float));
  kind(a.ln1_rstd, none || selective, BT * sizeof(float));
  kind(a.qkv, none || selective, BT * 3 * C * es);
  kind(a.atty, none, BT * C * es);
  kind(a.att, none, att_bytes);
  kind(a.attproj, none, BT * C * es);
  kind(a.residual2, none || selective, BT * C * es);
  kind(a.ln2, none, BT * C * es);
  kind(a.ln2_mean, none || selective, BT * sizeof(float));
  kind(a.ln2_rstd, none || selective, BT * sizeof(float));
  kind(a.fch, none || selective, BT * 4 * C * es);
  kind(a.fch_gelu, none, BT * 4 * C * es);
  if (none) kind(a.fcproj, true, BT * C * es);  // else fcproj shares attproj's buffer
  kind(a.residual3, true, BT * C * es);
  a.lnf = alloc(BT * C * es);
  a.lnf_mean = alloc(BT * sizeof(float));
  a.lnf_rstd = alloc(BT * sizeof(float));
  a.logits = alloc(BT * Vp * es);
  a.losses = alloc(BT * sizeof(float));
  a.dresidual = alloc(BT * C * es);
  if (none) {
    a.dln = alloc(BT * C * es);
    a.datty = alloc(BT * C * es);
    a.dqkv = alloc(BT * 3 * C * es);
    a.dfch = alloc(BT * 4 * C * es);
  }
}

/// The buffer of layer l of a kind that is per layer (L buffers) or shared (1).
void* of_layer(const std::vector<Buffer>& v, int64_t l) {
  return v[v.size() == 1 ? 0 : static_cast<size_t>(l)].data();
}

}  // namespace

GPT::GPT(const GPTConfig& config, const ParamLayout& layout, Backend& backend, DType dtype,
         Recompute recompute)
    : config_(config), layout_(layout), backend_(backend), dtype_(dtype), recompute_(recompute) {
  config_.validate();
  MPT_CHECK(dtype == DType::f32 || dtype == DType::f16 || dtype == DType::bf16,
            "GPT: storage dtype must be f32, f16 or bf16, got {}", dtype_name(dtype));
  const auto specs = gpt_tensors(config_);
  MPT_CHECK(specs.size() == layout.tensors().size(), "GPT: layout has {} tensors, the model {}",
            layout.tensors().size(), specs.size());
  for (size_t i = 0; i < specs.size(); ++i) {
    const TensorSpec& have = layout.tensors()[i].spec;
    MPT_CHECK(have.name == specs[i].name && have.shape == specs[i].shape,
              "GPT: layout tensor {} is '{}', expected '{}'", i, have.name, specs[i].name);
    offsets_.push_back(layout.tensors()[i].offset);
  }
  loss_sum_ = backend_.allocate(sizeof(double));  // zeroed
}

GPT::~GPT() = default;

const void* GPT::param(const void* base, size_t index) const {
  return static_cast<const std::byte*>(base) + offsets_[index] * dtype_size(dtype_);
}
void* GPT::grad(void* base, size_t index) const {
  return static_cast<std::byte*>(base) + offsets_[index] * dtype_size(dtype_);
}

void GPT::ensure_activations(int64_t B, int64_t T) {
  if (acts_ && B == B_ && T == T_) return;
  acts_.reset();  // free the old set first: peak memory is one set
  auto a = std::make_unique<Activations>();
  plan_activations(*a, config_, dtype_, recompute_, B, T,
                   backend_.attention_saved_bytes(B, T, config_.channels, config_.num_heads, dtype_),
                   [&](size_t bytes) { return backend_.allocate(bytes); });
  acts_ = std::move(a);
  B_ = B;
  T_ = T;
}

size_t GPT::activation_bytes_for(const GPTConfig& config, DType dtype, Recompute recompute, int64_t B,
                                 int64_t T, Backend& backend) {
  Activations a;
  plan_activations(a, config, dtype, recompute, B, T,
                   backend.attention_saved_bytes(B, T, config.channels, config.num_heads, dtype),
                   [](size_t) { return Buffer(); });
  return a.bytes;
}

GPT::LayerActs GPT::layer(int64_t l) const {
  const Activations& a = *acts_;
  LayerActs x{};
  x.input = l == 0 ? a.encoded.data() : a.residual3[static_cast<size_t>(l - 1)].data();
  x.ln1 = of_layer(a.ln1, l);
  x.ln1_mean = static_cast<float*>(of_layer(a.ln1_mean, l));
  x.ln1_rstd = static_cast<float*>(of_layer(a.ln1_rstd, l));
  x.qkv = of_layer(a.qkv, l);
  x.atty = of_layer(a.atty, l);
  x.att = of_layer(a.att, l);
  x.attproj = of_layer(a.attproj, l);
  x.residual2 = of_layer(a.residual2, l);
  x.ln2 = of_layer(a.ln2, l);
  x.ln2_mean = static_cast<float*>(of_layer(a.ln2_mean, l));
  x.ln2_rstd = static_cast<float*>(of_layer(a.ln2_rstd, l));
  x.fch = of_layer(a.fch, l);
  x.fch_gelu = of_layer(a.fch_gelu, l);
  x.fcproj = a.fcproj.empty() ? x.attproj : of_layer(a.fcproj, l);
  x.residual3 = of_layer(a.residual3, l);
  return x;
}

void GPT::block_forward(const void* params, int64_t l, bool full) {
  const auto p = [&](LayerTensor k) { return param(params, layer_index(l, k)); };
  const LayerActs x = layer(l);
  const int64_t B = B_, T = T_, BT = B * T, C = config_.channels, NH = config_.num_heads;
  const DType dt = dtype_;
  if (!full)
    backend_.layernorm_forward(x.ln1, x.ln1_mean, x.ln1_rstd, x.input, p(kLn1W), p(kLn1B), BT, C, dt);
  backend_.matmul_forward(x.qkv, x.ln1, p(kQkvW), p(kQkvB), BT, C, 3 * C, dt);
  backend_.attention_forward(x.atty, x.att, x.qkv, B, T, C, NH, dt);
  backend_.matmul_forward(x.attproj, x.atty, p(kAttProjW), p(kAttProjB), BT, C, C, dt);
  backend_.residual_layernorm_forward(x.residual2, x.ln2, x.ln2_mean, x.ln2_rstd, x.input, x.attproj,
                                      p(kLn2W), p(kLn2B), BT, C, dt);
  backend_.matmul_gelu_forward(x.fch, x.fch_gelu, x.ln2, p(kFcW), p(kFcB), BT, C, 4 * C, dt);
  if (!full) return;  // backward reads nothing after GELU
  backend_.matmul_forward(x.fcproj, x.fch_gelu, p(kFcProjW), p(kFcProjB), BT, 4 * C, C, dt);
  // residual3, fused with the LayerNorm that reads it: the next block's ln_1, or ln_f after the last block.
  // (The next block's ln_1 may be a shared buffer: this block no longer reads its own.)
  if (l + 1 < config_.num_layers) {
    const LayerActs next = layer(l + 1);
    const size_t ln1 = layer_index(l + 1, kLn1W);
    backend_.residual_layernorm_forward(x.residual3, next.ln1, next.ln1_mean, next.ln1_rstd, x.residual2,
                                        x.fcproj, param(params, ln1), param(params, ln1 + 1), BT, C, dt);
  } else {
    Activations& a = *acts_;
    const size_t lnf = layer_index(config_.num_layers, kLn1W);  // ln_f.weight follows the last layer
    backend_.residual_layernorm_forward(x.residual3, a.lnf.data(), a.lnf_mean.as<float>(),
                                        a.lnf_rstd.as<float>(), x.residual2, x.fcproj, param(params, lnf),
                                        param(params, lnf + 1), BT, C, dt);
  }
}

void GPT::recompute_block(const void* params, int64_t l) {
  if (recompute_ == Recompute::none) return;
  // Right after the forward the shared buffers still hold the last block.
  if (l == config_.num_layers - 1 && last_block_live_) return;
  if (recompute_ == Recompute::block) {
    block_forward(params, l, /*full=*/false);
    return;
  }
  // Selective: the same ops as the forward, on the kept qkv, residual2 and fch.
  const auto p = [&](LayerTensor k) { return param(params, layer_index(l, k)); };
  const LayerActs x = layer(l);
  const int64_t B = B_, T = T_, BT = B * T, C = config_.channels, NH = config_.num_heads;
  const DType dt = dtype_;
  backend_.layernorm_forward(x.ln1, x.ln1_mean, x.ln1_rstd, x.input, p(kLn1W), p(kLn1B), BT, C, dt);
  backend_.attention_forward(x.atty, x.att, x.qkv, B, T, C, NH, dt);
  backend_.layernorm_forward(x.ln2, x.ln2_mean, x.ln2_rstd, x.residual2, p(kLn2W), p(kLn2B), BT, C, dt);
  backend_.gelu_forward(x.fch_gelu, x.fch, BT * 4 * C, dt);  // bitwise what matmul_gelu_forward wrote
}

size_t GPT::activation_bytes() const {
  return acts_ ? acts_->bytes : 0;
}

const void* GPT::logits() const {
  MPT_CHECK(acts_ != nullptr, "GPT::logits: no forward has run");
  return acts_->logits.data();
}

float GPT::forward(const void* params, const int32_t* tokens, const int32_t* targets, int64_t B, int64_t T,
                   float backward_factor, const float* loss_scale_device) {
  run_forward(params, tokens, targets, B, T, backward_factor, loss_scale_device);
  if (!targets) return std::nanf("");
  const int64_t BT = B * T;
  std::vector<float> losses(static_cast<size_t>(BT));
  backend_.copy_to_host(losses.data(), acts_->losses.data(), losses.size() * sizeof(float));
  double sum = 0.0;  // FP64, in position order: deterministic
  for (float x : losses) sum += x;
  return static_cast<float>(sum / static_cast<double>(BT));
}

void GPT::forward_accumulate(const void* params, const int32_t* tokens, const int32_t* targets, int64_t B,
                             int64_t T, float backward_factor, const float* loss_scale_device) {
  MPT_CHECK(targets != nullptr, "GPT::forward_accumulate: needs targets");
  run_forward(params, tokens, targets, B, T, backward_factor, loss_scale_device);
  backend_.sum_losses(loss_sum_.as<double>(), acts_->losses.as<float>(), B * T);
}

double GPT::take_loss_sum() {
  double sum = 0.0;
  backend_.copy_to_host(&sum, loss_sum_.data(), sizeof sum);
  backend_.fill_zero(loss_sum_.data(), sizeof(double));
  return sum;
}

void GPT::run_forward(const void* params, const int32_t* tokens, const int32_t* targets, int64_t B, int64_t T,
                      float backward_factor, const float* loss_scale_device) {
  MPT_INPUT_CHECK(B >= 1, "model: batch size must be >= 1, got {}", B);
  MPT_INPUT_CHECK(T >= 1 && T <= config_.max_seq_len, "model: sequence length {} outside [1, max_seq_len={}]",
                  T, config_.max_seq_len);
  MPT_CHECK(!(backward_factor > 0.0f) || targets != nullptr, "GPT::forward: backward_factor needs targets");
  const int64_t V = config_.vocab_size;
  for (int64_t i = 0; i < B * T; ++i) {
    MPT_INPUT_CHECK(tokens[i] >= 0 && tokens[i] < V,
                    "model: token {} at position {} outside [0, vocab_size={})", tokens[i], i, V);
    if (targets)
      MPT_INPUT_CHECK(targets[i] >= 0 && targets[i] < V,
                      "model: target {} at position {} outside [0, vocab_size={})", targets[i], i, V);
  }
  ensure_activations(B, T);
  Activations& a = *acts_;
  const int64_t C = config_.channels, Vp = config_.padded_vocab_size();
  const int64_t BT = B * T;
  const DType dt = dtype_;
  backend_.copy_from_host(a.tokens.data(), tokens, static_cast<size_t>(BT) * sizeof(int32_t));

  backend_.embedding_forward(a.encoded.data(), a.tokens.as<int32_t>(), param(params, 0), param(params, 1), B,
                             T, C, dt);
  {
    const LayerActs x = layer(0);
    const size_t ln1 = layer_index(0, kLn1W);
    backend_.layernorm_forward(x.ln1, x.ln1_mean, x.ln1_rstd, x.input, param(params, ln1),
                               param(params, ln1 + 1), BT, C, dt);
  }
  // Each block writes the next LayerNorm's output (the last one ln_f's) with its residual.
  for (int64_t l = 0; l < config_.num_layers; ++l) block_forward(params, l, /*full=*/true);
  last_block_live_ = true;
  backend_.matmul_forward(a.logits.data(), a.lnf.data(), param(params, 0), nullptr, BT, C, Vp, dt);

  dlogits_ready_ = false;
  if (!targets) return;
  backend_.copy_from_host(a.targets.data(), targets, static_cast<size_t>(BT) * sizeof(int32_t));
  const bool train = backward_factor > 0.0f;
  const float dloss =
      train ? static_cast<float>(static_cast<double>(backward_factor) / static_cast<double>(BT)) : 0.0f;
  backend_.crossentropy_forward_backward(train ? a.logits.data() : nullptr, a.losses.as<float>(),
                                         a.logits.data(), a.targets.as<int32_t>(), BT, V, Vp, dloss,
                                         train ? loss_scale_device : nullptr, dt);
  dlogits_ready_ = train;
}

void GPT::backward(const void* params, void* grads, const std::function<void(size_t)>& on_grad_done) {
  backward(params, GradAddress([&](size_t index) { return grad(grads, index); }), on_grad_done);
}

void GPT::backward(const void* params, const GradAddress& grads,
                   const std::function<void(size_t)>& on_grad_done) {
  MPT_CHECK(dlogits_ready_,
            "GPT::backward: the last forward did not prepare a backward (backward_factor > 0)");
  dlogits_ready_ = false;  // dlogits are consumed: a second backward would need a new forward
  Activations& a = *acts_;
  const int64_t B = B_, T = T_, BT = B * T;
  const int64_t C = config_.channels, NH = config_.num_heads, Vp = config_.padded_vocab_size();
  const DType dt = dtype_;
  const size_t es = dtype_size(dt);
  const bool own_scratch = recompute_ == Recompute::none;
  const auto bytes = [&](int64_t elements) { return static_cast<size_t>(elements) * es; };
  const auto done = [&](size_t index) {
    if (on_grad_done) on_grad_done(index);
  };

  // LM head (tied to wte): d(lnf) and dwte from dlogits. Without scratch of its own, d(lnf) goes into the
  // last block's attproj/fcproj buffer, which backward never reads.
  void* dlnf = own_scratch ? a.dln.data() : layer(config_.num_layers - 1).attproj;
  backend_.fill_zero(dlnf, bytes(BT * C));
  backend_.matmul_backward(dlnf, grad(grads, 0), nullptr, a.logits.data(), a.lnf.data(), param(params, 0), BT,
                           C, Vp, dt);
  const size_t lnf = layer_index(config_.num_layers, kLn1W);
  backend_.fill_zero(a.dresidual.data(), bytes(BT * C));
  backend_.layernorm_backward(a.dresidual.data(), grad(grads, lnf), grad(grads, lnf + 1), dlnf,
                              a.residual3.back().data(), param(params, lnf), a.lnf_mean.as<float>(),
                              a.lnf_rstd.as<float>(), BT, C, dt);
  done(lnf);
  done(lnf + 1);

  for (int64_t l = config_.num_layers - 1; l >= 0; --l) {
    const auto p = [&](LayerTensor k) { return param(params, layer_index(l, k)); };
    const auto g = [&](LayerTensor k) { return grad(grads, layer_index(l, k)); };
    const auto finished = [&](LayerTensor w, LayerTensor b) {
      done(layer_index(l, w));
      done(layer_index(l, b));
    };
    recompute_block(params, l);
    const LayerActs x = layer(l);
    // Gradient buffers: scratch of their own (none), else activations of this block that are dead when the
    // gradient is written: fch_gelu after the c_proj backward, attproj (never read), ln2 after the c_fc
    // backward, fch after the GELU backward.
    void* dfch = own_scratch ? a.dfch.data() : x.fch_gelu;  // the c_proj backward reads fch_gelu first
    void* dln_mlp = own_scratch ? a.dln.data() : x.attproj;
    void* datty = own_scratch ? a.datty.data() : x.ln2;
    void* dqkv = own_scratch ? a.dqkv.data() : x.fch;
    void* dln_attn = dln_mlp;
    // residual3 = residual2 + fcproj(gelu(fc(ln2(residual2)))): dresidual flows to both terms. The c_proj
    // backward overwrites dfch with the GELU's input gradient.
    backend_.matmul_backward_gelu(dfch, g(kFcProjW), g(kFcProjB), a.dresidual.data(), x.fch_gelu, p(kFcProjW),
                                  x.fch, BT, 4 * C, C, dt);
    finished(kFcProjW, kFcProjB);
    backend_.fill_zero(dln_mlp, bytes(BT * C));
    backend_.matmul_backward(dln_mlp, g(kFcW), g(kFcB), dfch, x.ln2, p(kFcW), BT, C, 4 * C, dt);
    finished(kFcW, kFcB);
    backend_.layernorm_backward(a.dresidual.data(), g(kLn2W), g(kLn2B), dln_mlp, x.residual2, p(kLn2W),
                                x.ln2_mean, x.ln2_rstd, BT, C, dt);
    finished(kLn2W, kLn2B);
    // residual2 = residual + attproj(attention(qkv(ln1(residual)))).
    backend_.fill_zero(datty, bytes(BT * C));
    backend_.matmul_backward(datty, g(kAttProjW), g(kAttProjB), a.dresidual.data(), x.atty, p(kAttProjW), BT,
                             C, C, dt);
    finished(kAttProjW, kAttProjB);
    backend_.fill_zero(dqkv, bytes(BT * 3 * C));
    backend_.attention_backward(dqkv, datty, x.qkv, x.att, x.atty, B, T, C, NH, dt);
    backend_.fill_zero(dln_attn, bytes(BT * C));
    backend_.matmul_backward(dln_attn, g(kQkvW), g(kQkvB), dqkv, x.ln1, p(kQkvW), BT, C, 3 * C, dt);
    finished(kQkvW, kQkvB);
    backend_.layernorm_backward(a.dresidual.data(), g(kLn1W), g(kLn1B), dln_attn, x.input, p(kLn1W),
                                x.ln1_mean, x.ln1_rstd, BT, C, dt);
    finished(kLn1W, kLn1B);
  }
  // The shared buffers now hold gradients and the first block: the next backward needs a new forward.
  last_block_live_ = false;
  backend_.embedding_backward(grad(grads, 0), grad(grads, 1), a.dresidual.data(), a.tokens.as<int32_t>(), B,
                              T, C, dt);
  done(1);  // wpe
  done(0);  // wte: the LM head wrote it first, the embedding backward last
}

}  // namespace mpt
