// Hugging Face interop: GPT-2 weights in transformers' names and layouts, both ways.
//
// transformers' GPT2LMHeadModel names its tensors "transformer.<mptrain name>" (wte, wpe, h.<l>.ln_1, ...,
// ln_f), stores the four projection matrices as Conv1D weights [in, out] (mptrain keeps torch.nn.Linear's
// [out, in], so they are transposed), has an unpadded vocabulary (wte [V, C]; mptrain pads it to Vp rows) and
// ties lm_head to wte. Its GPT2Config with activation_function "gelu_new" (the tanh GELU), layer_norm_epsilon
// 1e-5, no dropout and tied embeddings computes the same function as mptrain's model (DESIGN.md "Model").
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "mptrain/dtype.hpp"
#include "mptrain/model.hpp"

namespace mpt {

/// Writes a directory that transformers' GPT2LMHeadModel.from_pretrained(`dir`) loads with no missing or
/// unexpected keys: `dir`/config.json (GPT2Config: n_embd, n_layer, n_head, n_positions = max_seq_len, the
/// unpadded vocab_size, gelu_new, layer_norm_epsilon 1e-5, dropouts 0) and `dir`/model.safetensors (metadata
/// format "pt") with `weights` (FP32, gpt_tensors(config) order and shapes: wte [Vp, C], its padding rows
/// dropped) stored as `dtype` (f32, f16 or bf16, round to nearest even). When `tokenizer_json` is not empty
/// it is written as `dir`/tokenizer.json, with a tokenizer_config.json naming PreTrainedTokenizerFast.
/// Creates `dir`; each file is written atomically. Throws mpt::InputError for weights that do not fit
/// `config`, mpt::Error on an I/O failure.
void export_hf(const GPTConfig& config, const std::vector<std::vector<float>>& weights,
               const std::string& dir, DType dtype, const std::string& tokenizer_json);

/// Initial FP32 weights for a model of shape `config` (gpt_tensors order, wte padded to Vp rows with zeros,
/// the layout gpt_init returns) from `path`:
///  - a directory with model.safetensors (and config.json, whose n_layer, n_embd, n_head and vocab_size must
///    equal the model's when present), or such a model.safetensors file: transformers' GPT-2 names with or
///    without the "transformer." prefix, F32, F16 or BF16; the attention-mask buffers are ignored and an
///    lm_head.weight must equal wte (tied);
///  - an mptrain checkpoint (metadata format mptrain-checkpoint-v1, checksum verified): its master weights
///    only, the optimizer state is not read.
/// wpe may have more rows than config.max_seq_len (GPT-2's 1024 positions for a shorter --seq-len): its first
/// max_seq_len rows are used. Throws mpt::InputError with one
/// line naming `path` and the tensor for a missing or unexpected tensor, a shape that does not fit the
/// model, an unsupported dtype, or a config.json/metadata field that disagrees with the flags.
std::vector<float> load_init_weights(const std::string& path, const GPTConfig& config);

}  // namespace mpt
