// The GPT-2 model of DESIGN.md (Model section), written once against the Backend interface.
//
// Token + position embeddings; L pre-LN blocks (LayerNorm -> causal multi-head attention with a fused QKV
// projection and an output projection -> residual; LayerNorm -> MLP 4C with tanh-GELU -> residual); final
// LayerNorm; LM head tied to the token embedding; mean cross-entropy. Parameters are views into the engine's
// flat buffer (ParamLayout); activations are allocated once per (B, T) and reused. With Recompute::selective
// or ::block the backward recomputes what the forward did not keep, block by block, from the same inputs with
// the same ops, so the gradients are bitwise those of Recompute::none.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "mptrain/backend.hpp"
#include "mptrain/layout.hpp"

namespace mpt {

struct GPTConfig {
  int64_t vocab_size = 256;    ///< V: 256 for byte-level text, 50257 for GPT-2 tokens
  int64_t max_seq_len = 1024;  ///< largest T (rows of the position embedding)
  int64_t num_layers = 12;     ///< L
  int64_t num_heads = 12;      ///< NH, must divide channels
  int64_t channels = 768;      ///< C

  /// Vp: vocab_size rounded up to a multiple of 128 (rows of wte, columns of the logits), for the GEMMs.
  int64_t padded_vocab_size() const { return (vocab_size + 127) / 128 * 128; }
  /// Throws mpt::InputError naming the first bad field and its value.
  void validate() const;
};

/// The parameter tensors in registration (forward) order, named as GPT-2 ("wte.weight", "h.0.ln_1.weight",
/// "h.0.attn.c_attn.weight" [3C, C], ..., "ln_f.bias"); weights in torch.nn.Linear layout [out, in]. Matrices
/// and embeddings decay; biases and LayerNorm parameters do not.
std::vector<TensorSpec> gpt_tensors(const GPTConfig& config);

/// Initial FP32 values in registration order (DESIGN.md): N(0, 0.02); attn.c_proj and mlp.c_proj weights
/// N(0, 0.02/sqrt(2L)); biases 0; LayerNorm weight 1 and bias 0; wte's padding rows [V, Vp) 0. Deterministic
/// in `seed`: each value depends only on (seed, tensor, index) (Philox4x32-10 counter blocks + Box-Muller,
/// include/mptrain/random.hpp), so the result is the same at any OpenMP thread count; filled in parallel.
std::vector<float> gpt_init(const GPTConfig& config, uint64_t seed);

/// What the backward keeps from the forward and what it recomputes (no dropout: every mode gives bitwise the
/// same gradients, because the recomputation runs the same deterministic ops on the same inputs).
enum class Recompute : uint8_t {
  none,       ///< keep every activation of every block (llm.c's default)
  selective,  ///< per block keep the QKV projection, the MLP input of GELU and both residual streams;
              ///< recompute the LayerNorm outputs, the attention probabilities and output, and the GELU
              ///< output (cheap, large; llm.c -r, Megatron --recompute-granularity selective)
  block,      ///< per block keep only its input; recompute the block's forward inside its backward
              ///< (Megatron --recompute-granularity full, torch.utils.checkpoint per block)
};
/// "none", "selective" or "block".
const char* recompute_name(Recompute mode);
/// Parses "none", "selective" or "block"; throws mpt::InputError naming --recompute otherwise.
Recompute parse_recompute(const std::string& text);

/// FLOPs per token of one training step (forward + backward): 6N + 12 L C T, N = all parameters (PaLM
/// appendix B's formula with llm.c's choice of N), T the sequence length. For MFU.
double gpt_flops_per_token(const GPTConfig& config, int64_t T);

class GPT {
 public:
  /// `layout` must hold gpt_tensors(config) (throws mpt::Error otherwise); `dtype` is the storage type of
  /// params, grads and activations (f32, f16 or bf16); `recompute` what backward recomputes. Validates the
  /// config (mpt::InputError).
  GPT(const GPTConfig& config, const ParamLayout& layout, Backend& backend, DType dtype,
      Recompute recompute = Recompute::none);
  ~GPT();
  GPT(const GPT&) = delete;
  GPT& operator=(const GPT&) = delete;

  const GPTConfig& config() const { return config_; }
  Recompute recompute() const { return recompute_; }

  /// Runs the model on tokens [B, T] (host int32). With targets [B, T] (host int32) returns the mean
  /// cross-entropy loss over B*T positions (computed in FP64 from FP32 per-position losses); without, NaN.
  /// Returning the loss reads it back: a host synchronisation (use forward_accumulate() to avoid it).
  /// `params` is the flat padded parameter buffer (backend memory). When `backward_factor` > 0 (targets
  /// required), the fused cross-entropy pass also writes dlogits = factor * s * dLoss/dlogits in place of the
  /// logits (llm.c's fused classifier: one pass, no second logits-sized buffer), ready for backward(), where
  /// s = *loss_scale_device when that is given (one FP32 in backend memory, e.g.
  /// MixedPrecisionEngine::loss_scale_device(), read on the backend's stream) and 1 otherwise. So factor is
  /// loss_scale / accumulation_steps with a host scale, or 1 / accumulation_steps with a device scale. Throws
  /// mpt::InputError for B < 1, T outside [1, max_seq_len] or a token/target outside [0, V), naming the
  /// position and value.
  float forward(const void* params, const int32_t* tokens, const int32_t* targets, int64_t B, int64_t T,
                float backward_factor = 0.0f, const float* loss_scale_device = nullptr);

  /// forward() with targets, without reading anything back: adds the FP64 sum of this call's B*T
  /// per-position losses to the model's loss accumulator in backend memory (Backend::sum_losses) instead of
  /// returning the mean. Same arguments and errors as forward(); targets must be non-null.
  void forward_accumulate(const void* params, const int32_t* tokens, const int32_t* targets, int64_t B,
                          int64_t T, float backward_factor = 0.0f, const float* loss_scale_device = nullptr);
  /// The loss accumulator's value (the sum of per-position losses of every forward_accumulate() since the
  /// last take), read back (a host synchronisation) and reset to 0. Divide by the positions for the mean.
  double take_loss_sum();

  /// Accumulates backward_factor * dLoss/dparams of the last forward into `grads` (flat padded buffer).
  /// When `on_grad_done` is set it is called with a tensor's registration index (gpt_tensors() order) right
  /// after the last op that writes that tensor's gradient has been issued to the backend (ordered on its
  /// stream before anything issued later), once per tensor: ln_f first, then each layer from the last down,
  /// and wpe and the tied wte last (wte's gradient gets its final write from the embedding backward, not the
  /// LM head). Throws mpt::Error when the last forward was not run with backward_factor > 0.
  void backward(const void* params, void* grads,
                const std::function<void(size_t tensor_index)>& on_grad_done = {});
  /// Where backward writes a tensor's gradient: called with the registration index right before each op
  /// that accumulates into it (a tensor's first request may come before its last write, e.g. the tied wte's
  /// at the LM head), returning backend memory in the storage dtype. MixedPrecisionEngine::grad_address.
  using GradAddress = std::function<void*(size_t tensor_index)>;
  /// backward() with each tensor's gradient at `grad_address(index)` instead of inside one flat buffer (ZeRO
  /// stage 2's staging buffers). Same order of writes and of on_grad_done calls.
  void backward(const void* params, const GradAddress& grad_address,
                const std::function<void(size_t tensor_index)>& on_grad_done = {});

  /// Logits [B, T, Vp] of the last forward (backend memory; dlogits after a forward with backward_factor).
  const void* logits() const;
  /// Bytes of activation memory currently allocated (forward activations + backward scratch).
  size_t activation_bytes() const;
  /// Bytes of activation memory (Backend::allocate) that a GPT with these arguments allocates for
  /// micro-batch B of T tokens: the same plan the model allocates from, so activation_bytes() equals it
  /// after the first forward. `backend` answers attention_saved_bytes(); nothing is allocated.
  static size_t activation_bytes_for(const GPTConfig& config, DType dtype, Recompute recompute, int64_t B,
                                     int64_t T, Backend& backend);

  /// The activation buffers and one layer's view of them (opaque: model.cpp).
  struct Activations;
  struct LayerActs;

 private:
  void ensure_activations(int64_t B, int64_t T);
  /// Layer l's activation buffers (its own or the shared ones, by recompute mode).
  LayerActs layer(int64_t l) const;
  /// The forward of block l into layer(l). With `full` (the forward pass) ln_1 is already written (by the
  /// previous block's fused residual, or the embedding's LayerNorm for block 0) and the block ends with its
  /// residual fused into the next LayerNorm (block l + 1's ln_1, or ln_f after the last block); without it
  /// (the recomputation) it computes ln_1 and stops after GELU (what backward reads).
  void block_forward(const void* params, int64_t l, bool full);
  /// Recomputes what the recompute mode dropped of block l, before its backward.
  void recompute_block(const void* params, int64_t l);
  /// The shared body of forward() and forward_accumulate(): leaves the per-position losses in acts_->losses
  /// when targets are given.
  void run_forward(const void* params, const int32_t* tokens, const int32_t* targets, int64_t B, int64_t T,
                   float backward_factor, const float* loss_scale_device);
  const void* param(const void* base, size_t index) const;
  void* grad(void* base, size_t index) const;
  void* grad(const GradAddress& at, size_t index) const { return at(index); }

  GPTConfig config_;
  const ParamLayout& layout_;
  Backend& backend_;
  DType dtype_;
  Recompute recompute_;
  std::vector<size_t> offsets_;  // flat offset of every tensor, registration order
  std::unique_ptr<Activations> acts_;
  Buffer loss_sum_;  // one double, backend memory: forward_accumulate's accumulator
  int64_t B_ = 0, T_ = 0;
  bool dlogits_ready_ = false;
  /// The shared buffers still hold the last block's activations from the forward (its recompute is skipped).
  bool last_block_live_ = false;
};

}  // namespace mpt
