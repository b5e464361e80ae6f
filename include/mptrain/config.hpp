// The run configuration of the mptrain executable: every flag of `train`, `eval` and `sample`, parsed with
// CLI11 from the command line on top of an optional JSON config file whose keys are the flag names.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "mptrain/batch_schedule.hpp"
#include "mptrain/engine.hpp"
#include "mptrain/model.hpp"

namespace mpt {

/// Everything a run needs; defaults are the default run of launch/train.sh (byte-level KJV, 2 CPU ranks).
struct RunConfig {
  std::string command;  ///< "train", "eval", "sample" or "export"

  // Model (vocab comes from the data: 256 for text, 50257 for token shards).
  int64_t layers = 4, heads = 4, channels = 128;
  int64_t seq_len = 128;  ///< T, tokens per sequence (also the model's maximum)

  // Batch.
  int64_t global_batch = 32;  ///< sequences per optimizer step, over all ranks
  int64_t micro_batch = 16;   ///< sequences per rank per forward (resolved at start-up when micro_batch_auto)
  bool micro_batch_auto = false;   ///< --micro-batch auto: the largest that fits --memory-budget
  double memory_budget_gib = 0.0;  ///< --memory-budget for auto (GiB per rank); 0 = the default budget
  std::string recompute = "none";  ///< --recompute none|selective|block
  std::string batch_rampup;        ///< "START,INCREMENT,SAMPLES" (Megatron's --rampup-batch-size); "" = none
  std::string sampling = "epoch";  ///< "epoch" (permuted windows) or "random" (hashed window starts)

  // Optimisation.
  int64_t steps = 1500;
  float lr = 6e-3f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, weight_decay = 0.1f;
  int64_t warmup_steps = 100;
  int64_t warmup_samples = 0;  ///< > 0: the warm-up in samples (else the samples of --warmup-steps steps)
  float min_lr_ratio = 0.1f;   ///< cosine decays to lr * min_lr_ratio at the last step
  float grad_clip = 1.0f;
  std::string optimizer = "adamw";  ///< "adamw" or "lamb" (same lr, betas, schedule and clipping)
  /// LAMB's epsilon and weight decay, which default differently from AdamW's (the TF reference's 1e-6 and
  /// You et al.'s 0.01); --eps and --weight-decay stay AdamW's.
  float lamb_eps = 1e-6f, lamb_weight_decay = 0.01f;
  double noise_scale_ema = 0.95;  ///< EMA factor of the gradient noise scale's estimators

  // Mixed precision.
  std::string precision = "fp16";
  float loss_scale_init = 65536.0f, loss_scale_growth = 2.0f, loss_scale_backoff = 0.5f;
  int64_t loss_scale_window = 2000;  ///< growth interval (clean steps)
  int64_t loss_scale_hysteresis = 1;
  bool loss_scale_consecutive_hysteresis = false;
  float loss_scale_min = 1.0f;
  int64_t loss_scale_max_min_overflows = 10;
  float static_loss_scale = 0.0f;       ///< > 0: a static scale instead of the dynamic one
  bool fp32_grad_accumulation = false;  ///< Megatron main_grad: accumulate and reduce gradients in FP32
  std::string grad_sync = "reduce-scatter";
  double bucket_mib = 25.0;
  int zero_stage =
      1;  ///< --zero-stage 1|2: 2 keeps only this rank's gradient shard (EngineConfig::zero_stage)

  // Data and evaluation.
  std::string data = "data/kjv.txt";
  double val_fraction = 0.05;
  int64_t eval_interval = 200, eval_batches = 8;

  // Checkpoints.
  std::string checkpoint_dir;  ///< default runs/<run_name>/checkpoints
  int64_t checkpoint_interval = 200, keep_checkpoints = 2;
  std::string resume = "auto";  ///< "auto", "none" or a checkpoint path
  /// Initial weights of a fresh run (not of a resumed one): a Hugging Face GPT-2 directory or
  /// model.safetensors, or an mptrain checkpoint (weights only); "" = random initialisation.
  std::string init_from;

  // Run.
  uint64_t seed = 1337;
  int64_t log_interval = 20;
  std::string run_name = "default";
  std::string device = "auto";
  int threads = 0;           ///< OpenMP threads per rank; 0 = OMP_NUM_THREADS or 1
  double peak_tflops = 0.0;  ///< per rank, for MFU; 0 = measured (CPU SGEMM) or 989 (CUDA bf16 dense)
  int64_t sample_tokens = 200;
  /// Collective watchdog (seconds; 0 = off): a collective not completed within it aborts the job.
  double collective_timeout = 600.0;

  // Debugging: fault injection.
  /// --inject-overflow "STEP:RANK[:inf|:nan]", "STEP+:RANK[...]" (that step and every later one) or
  /// "every:RANK[...]"; empty = none. STEP counts from 1 like the log. Parsed by inject_overflow_plan().
  std::string inject_overflow;

  // eval / sample.
  std::string checkpoint;  ///< checkpoint to read (eval, sample)
  std::string prompt;      ///< sample: text prompt (text data) or space-separated token ids
  float temperature = 1.0f;
  /// tokenizer.json (byte-level BPE) or llm.c tokenizer .bin of token-shard data: sample prints text and
  /// evaluation reports nats per byte with it. "" = the tokenizer.json beside the shards, when there is one.
  std::string tokenizer;

  // export.
  std::string out;                    ///< output directory
  std::string format = "hf";          ///< only "hf" (transformers' GPT-2)
  std::string export_dtype = "fp32";  ///< fp32, fp16 or bf16 storage of the exported weights

  /// The batch schedule of --global-batch and --batch-rampup; throws mpt::InputError naming the flag.
  BatchSchedule batch_schedule() const;
  /// The engine settings these flags describe (the LR schedule in samples: warm-up from --warmup-samples or
  /// --warmup-steps, decay to the samples of --steps).
  EngineConfig engine_config() const;
  /// The model shape for a vocabulary of `vocab_size`.
  GPTConfig model_config(int64_t vocab_size) const;
  /// Storage dtype of --precision.
  DType dtype() const;
  /// Checks values that do not depend on the world size or the data; throws mpt::InputError naming the flag.
  void validate() const;
  /// The effective configuration (flag names as keys).
  nlohmann::json to_json() const;
};

/// The parsed --inject-overflow: poison one gradient element of `rank` after the backward of step `step`
/// (1-based; with `every_step_from`, of that step and every later one) with +inf or NaN.
struct InjectOverflow {
  int64_t step = 0;  ///< 0 = no injection
  bool every_step_from = false;
  int rank = 0;
  bool nan = false;
  /// True when step `step` (1-based) is poisoned on rank `rank_`.
  bool hits(int64_t step_1based, int rank_) const {
    return step > 0 && rank_ == rank && (every_step_from ? step_1based >= step : step_1based == step);
  }
};

/// Parses --inject-overflow `text` ("" gives no injection). Throws mpt::InputError naming the flag and the
/// expected form for anything else.
InjectOverflow parse_inject_overflow(const std::string& text);

/// Parses argv (`mptrain <train|eval|sample|export> [--config FILE] [flags]`). Returns false after printing
/// --help (the caller exits 0). Throws mpt::InputError with one line for an unknown flag or key, a bad value,
/// a config file that does not parse (with line and column) or holds a key of the wrong type.
bool parse_command_line(int argc, char** argv, RunConfig& config);

}  // namespace mpt
