// Command-line and JSON-config parsing of the mptrain executable (include/mptrain/config.hpp).
//
// A JSON config file is turned into "--key=value" arguments placed before the command line's own, and every
// option keeps the LAST value it is given, so flags override the file. A key that names no flag of the
// subcommand is an error, as is a value CLI11 cannot convert or validate.
#include "mptrain/config.hpp"

#include <cctype>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <CLI/CLI.hpp>

#include "mptrain/error.hpp"

namespace mpt {

EngineConfig RunConfig::engine_config() const {
  EngineConfig e;
  e.dtype = dtype();
  e.grad_sync = grad_sync == "all-reduce" ? GradSync::all_reduce : GradSync::reduce_scatter;
  e.bucket_bytes = static_cast<size_t>(bucket_mib * 1024.0 * 1024.0);
  e.optimizer = optimizer == "lamb" ? OptimizerKind::lamb : OptimizerKind::adamw;
  if (e.optimizer == OptimizerKind::lamb)
    e.adamw = {lr, beta1, beta2, lamb_eps, lamb_weight_decay};
  else
    e.adamw = {lr, beta1, beta2, eps, weight_decay};
  // The schedule counts samples, so it ends exactly at the last sample whatever the batch ramp does.
  const BatchSchedule batches = batch_schedule();
  e.schedule.warmup_samples = warmup_samples > 0 ? warmup_samples : batches.samples_before(warmup_steps);
  const int64_t total = batches.samples_before(steps);
  e.schedule.decay_samples = total > e.schedule.warmup_samples ? total : 0;
  e.schedule.min_lr = lr * min_lr_ratio;
  e.noise_scale_ema = noise_scale_ema;
  e.grad_clip = grad_clip;
  e.fp32_grad_accumulation = fp32_grad_accumulation;
  e.zero_stage = zero_stage;
  LossScalerConfig& s = e.scaler;
  s.dynamic = static_loss_scale <= 0.0f;
  s.init_scale = s.dynamic ? loss_scale_init : static_loss_scale;
  s.growth_factor = loss_scale_growth;
  s.backoff_factor = loss_scale_backoff;
  s.growth_interval = loss_scale_window;
  s.hysteresis = loss_scale_hysteresis;
  s.consecutive_hysteresis = loss_scale_consecutive_hysteresis;
  s.min_scale = loss_scale_min;
  s.max_overflows_at_min_scale = loss_scale_max_min_overflows;
  return e;
}

BatchSchedule RunConfig::batch_schedule() const {
  return BatchSchedule(global_batch, parse_batch_rampup(batch_rampup));
}

GPTConfig RunConfig::model_config(int64_t vocab_size) const {
  GPTConfig g;
  g.vocab_size = vocab_size;
  g.max_seq_len = seq_len;
  g.num_layers = layers;
  g.num_heads = heads;
  g.channels = channels;
  return g;
}

DType RunConfig::dtype() const {
  if (precision == "fp32") return DType::f32;
  if (precision == "bf16") return DType::bf16;
  return DType::f16;
}

namespace {

/// `message` with the internal field names of the model, engine, optimizer and scaler checks replaced by
/// the flags that set them.
std::string with_flag_names(std::string message) {
  static const std::pair<const char*, const char*> kNames[] = {
      {"model: num_layers (--layers)", "--layers"},
      {"model: channels (--channels)", "--channels"},
      {"model: max_seq_len (--seq-len)", "--seq-len"},
      {"model: num_layers", "--layers"},
      {"model: num_heads", "--heads"},
      {"model: channels", "--channels"},
      {"model: max_seq_len", "--seq-len"},
      {"adamw: lr", "--lr"},
      {"adamw: beta1", "--beta1"},
      {"adamw: beta2", "--beta2"},
      {"adamw: eps", "--eps"},
      {"adamw: weight_decay", "--weight-decay"},
      {"lr schedule: the warm-up", "--warmup-steps / --warmup-samples: the warm-up"},
      {"engine: noise_scale_ema", "--noise-scale-ema"},
      {"lr schedule: min_lr", "--min-lr-ratio x --lr"},
      {"engine: grad_clip", "--grad-clip"},
      {"engine: bucket size", "--bucket-mib"},
      {"loss scaler: init_scale", "--loss-scale-init (or --static-loss-scale)"},
      {"loss scaler: growth_factor", "--loss-scale-growth"},
      {"loss scaler: backoff_factor", "--loss-scale-backoff"},
      {"loss scaler: growth_interval", "--loss-scale-window"},
      {"loss scaler: hysteresis", "--loss-scale-hysteresis"},
      {"loss scaler: min_scale", "--loss-scale-min"},
      {"loss scaler: max_overflows_at_min_scale", "--loss-scale-max-min-overflows"},
  };
  for (const auto& [internal, flag] : kNames)
    if (message.starts_with(internal)) return flag + message.substr(std::strlen(internal));
  return message;
}

}  // namespace

void RunConfig::validate() const {
  MPT_INPUT_CHECK(global_batch >= 1, "--global-batch must be >= 1, got {}", global_batch);
  MPT_INPUT_CHECK(micro_batch >= 1, "--micro-batch must be >= 1, got {}", micro_batch);
  // The ceiling keeps the budget in bytes within size_t (1 PiB is far above any node's memory).
  MPT_INPUT_CHECK(
      std::isfinite(memory_budget_gib) && memory_budget_gib >= 0.0 && memory_budget_gib <= 1048576.0,
      "--memory-budget must be a finite number of GiB from 0 to 1048576 (0: the default), got {}",
      memory_budget_gib);
  MPT_INPUT_CHECK(memory_budget_gib == 0.0 || micro_batch_auto,
                  "--memory-budget {} is only used with --micro-batch auto", memory_budget_gib);
  (void)parse_recompute(recompute);
  MPT_INPUT_CHECK(seq_len >= 1, "--seq-len must be >= 1, got {}", seq_len);
  MPT_INPUT_CHECK(steps >= 0, "--steps must be >= 0 (0: evaluate and checkpoint the initial weights), got {}",
                  steps);
  MPT_INPUT_CHECK(min_lr_ratio >= 0.0f && min_lr_ratio <= 1.0f, "--min-lr-ratio must be in [0, 1], got {}",
                  min_lr_ratio);
  MPT_INPUT_CHECK(val_fraction >= 0.0 && val_fraction < 1.0, "--val-fraction must be in [0, 1), got {}",
                  val_fraction);
  MPT_INPUT_CHECK(eval_interval >= 0, "--eval-interval must be >= 0, got {}", eval_interval);
  MPT_INPUT_CHECK(eval_batches >= 0, "--eval-batches must be >= 0, got {}", eval_batches);
  MPT_INPUT_CHECK(checkpoint_interval >= 0, "--checkpoint-interval must be >= 0, got {}",
                  checkpoint_interval);
  MPT_INPUT_CHECK(keep_checkpoints >= 1, "--keep-checkpoints must be >= 1, got {}", keep_checkpoints);
  MPT_INPUT_CHECK(log_interval >= 1, "--log-interval must be >= 1, got {}", log_interval);
  MPT_INPUT_CHECK(bucket_mib > 0.0 && bucket_mib <= 65536.0, "--bucket-mib must be in (0, 65536], got {}",
                  bucket_mib);
  MPT_INPUT_CHECK(zero_stage == 1 || zero_stage == 2, "--zero-stage must be 1 or 2, got {}", zero_stage);
  MPT_INPUT_CHECK(zero_stage == 1 || grad_sync == "reduce-scatter",
                  "--zero-stage 2 needs --grad-sync reduce-scatter (all-reduce keeps every gradient on every "
                  "rank), got --grad-sync {}",
                  grad_sync);
  MPT_INPUT_CHECK(threads >= 0, "--threads must be >= 0, got {}", threads);
  MPT_INPUT_CHECK(peak_tflops >= 0.0, "--peak-tflops must be >= 0, got {}", peak_tflops);
  MPT_INPUT_CHECK(std::isfinite(temperature) && temperature > 0.0f, "--temperature must be > 0, got {}",
                  temperature);
  MPT_INPUT_CHECK(sample_tokens >= 0, "--sample-tokens must be >= 0, got {}", sample_tokens);
  MPT_INPUT_CHECK(std::isfinite(collective_timeout) && collective_timeout >= 0.0,
                  "--collective-timeout must be a finite number of seconds >= 0 (0: off), got {}",
                  collective_timeout);
  (void)parse_inject_overflow(inject_overflow);
  const bool name_ok =
      !run_name.empty() && run_name != "." && run_name != ".." &&
      run_name.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") ==
          std::string::npos;
  MPT_INPUT_CHECK(name_ok, "--run-name must be letters, digits, '.', '_' or '-' (not '.' or '..'), got '{}'",
                  run_name);
  MPT_INPUT_CHECK(command != "eval" || eval_batches >= 1, "--eval-batches must be >= 1 for eval, got {}",
                  eval_batches);
  MPT_INPUT_CHECK(command == "train" || !checkpoint.empty(), "{}: --checkpoint is required", command);
  MPT_INPUT_CHECK(command != "export" || !out.empty(), "export: --out is required");
  // The model and engine validate their own fields with messages naming them.
  if (command == "train") {
    // The model's own checks name its fields; these name the flags first. The bounds are GPTConfig's.
    MPT_INPUT_CHECK(layers >= 1 && layers <= 4096, "--layers must be in [1, 4096], got {}", layers);
    MPT_INPUT_CHECK(heads >= 1, "--heads must be >= 1, got {}", heads);
    MPT_INPUT_CHECK(channels >= 1 && channels <= 65536, "--channels must be in [1, 65536], got {}", channels);
    MPT_INPUT_CHECK(channels % heads == 0, "--heads {} does not divide --channels {}", heads, channels);
    MPT_INPUT_CHECK(seq_len <= (int64_t{1} << 20),
                    "--seq-len {} is longer than the model's maximum sequence length 1048576 (2^20)",
                    seq_len);
    MPT_INPUT_CHECK(lr > 0.0f && std::isfinite(lr), "--lr must be a finite number > 0, got {}", lr);
    (void)parse_optimizer(optimizer, "--optimizer");
    MPT_INPUT_CHECK(warmup_steps >= 0, "--warmup-steps must be >= 0, got {}", warmup_steps);
    MPT_INPUT_CHECK(warmup_samples >= 0, "--warmup-samples must be >= 0, got {}", warmup_samples);
    MPT_INPUT_CHECK(sampling == "random" || sampling == "epoch",
                    "--sampling must be random or epoch, got '{}'", sampling);
    (void)batch_schedule();
    MPT_INPUT_CHECK(std::isfinite(lamb_eps) && lamb_eps > 0.0f, "--lamb-eps must be finite and > 0, got {}",
                    lamb_eps);
    MPT_INPUT_CHECK(std::isfinite(lamb_weight_decay) && lamb_weight_decay >= 0.0f,
                    "--lamb-weight-decay must be finite and >= 0, got {}", lamb_weight_decay);
    // The engine, optimizer and loss scaler name their fields; say which flag set each.
    try {
      model_config(256).validate();
      engine_config().validate();
    } catch (const InputError& e) {
      throw InputError(with_flag_names(e.what()));
    }
  }
}

InjectOverflow parse_inject_overflow(const std::string& text) {
  InjectOverflow plan;
  if (text.empty()) return plan;
  const auto bad = [&](const char* why) {
    return InputError(fmt::format(
        "--inject-overflow '{}': {}; expected STEP:RANK, STEP+:RANK or every:RANK, optionally followed by "
        ":inf or :nan (STEP >= 1 as in the log)",
        text, why));
  };
  std::vector<std::string> parts;
  for (size_t start = 0;;) {
    const size_t colon = text.find(':', start);
    parts.push_back(text.substr(start, colon == std::string::npos ? std::string::npos : colon - start));
    if (colon == std::string::npos) break;
    start = colon + 1;
  }
  if (parts.size() < 2 || parts.size() > 3) throw bad("wrong number of ':'-separated fields");
  const auto integer = [&](const std::string& s, int64_t& out) {
    const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
    return !s.empty() && ec == std::errc() && end == s.data() + s.size();
  };
  std::string step = parts[0];
  if (step == "every") {
    plan.step = 1;
    plan.every_step_from = true;
  } else {
    if (!step.empty() && step.back() == '+') {
      plan.every_step_from = true;
      step.pop_back();
    }
    if (!integer(step, plan.step) || plan.step < 1) throw bad("STEP is not an integer >= 1");
  }
  int64_t rank = -1;
  if (!integer(parts[1], rank) || rank < 0 || rank > INT32_MAX) throw bad("RANK is not an integer >= 0");
  plan.rank = static_cast<int>(rank);
  if (parts.size() == 3) {
    if (parts[2] != "inf" && parts[2] != "nan") throw bad("the kind is neither inf nor nan");
    plan.nan = parts[2] == "nan";
  }
  return plan;
}

namespace {
/// A float as the JSON number of its shortest decimal form (0.9, not 0.8999999761581421).
double shortest(float x) {
  return std::stod(fmt::format("{}", x));
}
}  // namespace

nlohmann::json RunConfig::to_json() const {
  return {{"command", command},
          {"layers", layers},
          {"heads", heads},
          {"channels", channels},
          {"seq-len", seq_len},
          {"global-batch", global_batch},
          {"micro-batch", micro_batch},
          {"memory-budget", memory_budget_gib},
          {"recompute", recompute},
          {"steps", steps},
          {"lr", shortest(lr)},
          {"beta1", shortest(beta1)},
          {"beta2", shortest(beta2)},
          {"eps", shortest(eps)},
          {"weight-decay", shortest(weight_decay)},
          {"warmup-steps", warmup_steps},
          {"warmup-samples", warmup_samples},
          {"batch-rampup", batch_rampup},
          {"sampling", sampling},
          {"noise-scale-ema", noise_scale_ema},
          {"min-lr-ratio", shortest(min_lr_ratio)},
          {"grad-clip", shortest(grad_clip)},
          {"optimizer", optimizer},
          {"lamb-eps", shortest(lamb_eps)},
          {"lamb-weight-decay", shortest(lamb_weight_decay)},
          {"precision", precision},
          {"loss-scale-init", shortest(loss_scale_init)},
          {"loss-scale-growth", shortest(loss_scale_growth)},
          {"loss-scale-backoff", shortest(loss_scale_backoff)},
          {"loss-scale-window", loss_scale_window},
          {"loss-scale-hysteresis", loss_scale_hysteresis},
          {"loss-scale-consecutive-hysteresis", loss_scale_consecutive_hysteresis},
          {"loss-scale-min", shortest(loss_scale_min)},
          {"loss-scale-max-min-overflows", loss_scale_max_min_overflows},
          {"static-loss-scale", shortest(static_loss_scale)},
          {"fp32-grad-accumulation", fp32_grad_accumulation},
          {"grad-sync", grad_sync},
          {"bucket-mib", bucket_mib},
          {"zero-stage", zero_stage},
          {"data", data},
          {"val-fraction", val_fraction},
          {"eval-interval", eval_interval},
          {"eval-batches", eval_batches},
          {"checkpoint-dir", checkpoint_dir},
          {"checkpoint-interval", checkpoint_interval},
          {"keep-checkpoints", keep_checkpoints},
          {"resume", resume},
          {"init-from", init_from},
          {"seed", seed},
          {"log-interval", log_interval},
          {"run-name", run_name},
          {"device", device},
          {"threads", threads},
          {"peak-tflops", peak_tflops},
          {"sample-tokens", sample_tokens},
          {"collective-timeout", collective_timeout},
          {"inject-overflow", inject_overflow},
          {"checkpoint", checkpoint},
          {"prompt", prompt},
          {"temperature", shortest(temperature)},
          {"tokenizer", tokenizer},
          {"out", out},
          {"format", format},
          {"dtype", export_dtype}};
}

namespace {

void add_common(CLI::App* app, RunConfig& c) {
  app->add_option("--device", c.device,
                  "where to run: auto (CUDA when built and present, else CPU), cpu, cuda")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}))
      ->capture_default_str();
  app->add_option("--threads", c.threads, "OpenMP threads per rank (0: OMP_NUM_THREADS, else 1)")
      ->capture_default_str();
  app->add_option("--precision", c.precision, "storage precision of weights, activations and gradients")
      ->check(CLI::IsMember({"fp16", "bf16", "fp32"}))
      ->capture_default_str();
  app->add_option("--seed", c.seed, "seed of initialisation, data order and sampling")->capture_default_str();
}

void add_data(CLI::App* app, RunConfig& c, std::string& micro_batch_text) {
  app->add_option("--data", c.data,
                  "text file (bytes, vocab 256) or llm.c .bin token shard(s), a glob allowed")
      ->capture_default_str();
  app->add_option("--val-fraction", c.val_fraction, "fraction of the data (its end) held out for validation")
      ->capture_default_str();
  app->add_option("--eval-batches", c.eval_batches,
                  "validation batches (of --global-batch sequences) per eval")
      ->capture_default_str();
  app->add_option("--global-batch", c.global_batch, "sequences per optimizer step, summed over ranks")
      ->capture_default_str();
  micro_batch_text = std::to_string(c.micro_batch);
  app->add_option("--micro-batch", micro_batch_text,
                  "sequences per rank per forward pass, or auto (train: the largest that fits "
                  "--memory-budget and divides the batch per rank)")
      ->type_name("INT|auto")
      ->capture_default_str();
}

/// The large-batch flags of `train`: batch ramp-up, sampling order, LAMB, warm-up in samples, noise scale.
void add_large_batch(CLI::App* app, RunConfig& c) {
  app->add_option(
         "--batch-rampup", c.batch_rampup,
         "START,INCREMENT,SAMPLES: grow the global batch from START by INCREMENT up to --global-batch "
         "over SAMPLES samples (Megatron's --rampup-batch-size)")
      ->capture_default_str();
  app->add_option("--sampling", c.sampling,
                  "data order: epoch (a seeded permutation of non-overlapping windows, each read once per "
                  "epoch) or random (window starts hashed from seed and step)")
      ->check(CLI::IsMember({"random", "epoch"}))
      ->capture_default_str();
  app->add_option("--optimizer", c.optimizer,
                  "update rule: adamw, or lamb (layer-wise trust ratios ||w|| / ||r|| per tensor; biases and "
                  "LayerNorm get no decay and trust 1)")
      ->check(CLI::IsMember({"adamw", "lamb"}))
      ->capture_default_str();
  app->add_option("--lamb-eps", c.lamb_eps, "LAMB epsilon (with --optimizer lamb; --eps is AdamW's)")
      ->capture_default_str();
  app->add_option("--lamb-weight-decay", c.lamb_weight_decay,
                  "LAMB decoupled weight decay inside the update direction (with --optimizer lamb)")
      ->capture_default_str();
  app->add_option("--warmup-samples", c.warmup_samples,
                  "warm-up in samples (sequences); > 0 overrides --warmup-steps")
      ->capture_default_str();
  app->add_option("--noise-scale-ema", c.noise_scale_ema,
                  "EMA factor of the gradient noise scale's estimators (McCandlish et al. 2018), in [0, 1)")
      ->capture_default_str();
}

void add_train(CLI::App* app, RunConfig& c, std::string& micro_batch_text) {
  add_common(app, c);
  add_data(app, c, micro_batch_text);
  add_large_batch(app, c);
  app->add_option("--recompute", c.recompute,
                  "activations recomputed in backward: none, selective (LayerNorm, attention, GELU outputs) "
                  "or block (each block's forward; keeps only block inputs)")
      ->check(CLI::IsMember({"none", "selective", "block"}))
      ->capture_default_str();
  app->add_option("--memory-budget", c.memory_budget_gib,
                  "GiB per rank for --micro-batch auto (0: free device memory, or on the CPU half the RAM "
                  "divided by the ranks on the node)")
      ->capture_default_str();
  app->add_option("--layers", c.layers, "transformer blocks L")->capture_default_str();
  app->add_option("--heads", c.heads, "attention heads NH (must divide --channels)")->capture_default_str();
  app->add_option("--channels", c.channels, "model width C")->capture_default_str();
  app->add_option("--seq-len", c.seq_len, "tokens per sequence T (also the model's maximum)")
      ->capture_default_str();
  app->add_option("--steps", c.steps, "optimizer steps to train (skipped steps count)")
      ->capture_default_str();
  app->add_option("--lr", c.lr, "peak learning rate (AdamW or LAMB)")->capture_default_str();
  app->add_option("--beta1", c.beta1, "AdamW beta1")->capture_default_str();
  app->add_option("--beta2", c.beta2, "AdamW beta2")->capture_default_str();
  app->add_option("--eps", c.eps, "AdamW epsilon")->capture_default_str();
  app->add_option("--weight-decay", c.weight_decay, "AdamW decoupled weight decay (matrices and embeddings)")
      ->capture_default_str();
  app->add_option("--warmup-steps", c.warmup_steps,
                  "linear warm-up over the samples of this many steps, then cosine decay to the last sample")
      ->capture_default_str();
  app->add_option("--min-lr-ratio", c.min_lr_ratio, "final learning rate as a fraction of --lr")
      ->capture_default_str();
  app->add_option("--grad-clip", c.grad_clip, "max global gradient norm after unscaling (0: no clipping)")
      ->capture_default_str();
  app->add_option("--loss-scale-init", c.loss_scale_init, "fp16: initial dynamic loss scale")
      ->capture_default_str();
  app->add_option("--loss-scale-growth", c.loss_scale_growth, "fp16: growth factor of the loss scale")
      ->capture_default_str();
  app->add_option("--loss-scale-backoff", c.loss_scale_backoff, "fp16: backoff factor on overflow")
      ->capture_default_str();
  app->add_option("--loss-scale-window", c.loss_scale_window,
                  "fp16: growth interval, consecutive clean steps")
      ->capture_default_str();
  app->add_option("--loss-scale-hysteresis", c.loss_scale_hysteresis,
                  "fp16: overflows tolerated before a backoff")
      ->capture_default_str();
  app->add_flag("--loss-scale-consecutive-hysteresis", c.loss_scale_consecutive_hysteresis,
                "fp16: refill the hysteresis on every clean step (DeepSpeed)");
  app->add_option("--loss-scale-min", c.loss_scale_min, "fp16: minimum loss scale")->capture_default_str();
  app->add_option("--loss-scale-max-min-overflows", c.loss_scale_max_min_overflows,
                  "fp16: consecutive overflows at the minimum scale before the run stops with an error")
      ->capture_default_str();
  app->add_option("--static-loss-scale", c.static_loss_scale, "fp16: a fixed loss scale (0: dynamic)")
      ->capture_default_str();
  app->add_flag(
      "--fp32-grad-accumulation", c.fp32_grad_accumulation,
      "accumulate micro-batch gradients and reduce them in FP32 (Megatron main_grad; 4P more bytes)");
  app->add_option("--grad-sync", c.grad_sync, "gradient reduction per bucket")
      ->check(CLI::IsMember({"reduce-scatter", "all-reduce"}))
      ->capture_default_str();
  app->add_option("--bucket-mib", c.bucket_mib, "gradient bucket size in MiB")->capture_default_str();
  app->add_option("--zero-stage", c.zero_stage, "ZeRO: 1 shards the optimizer state, 2 the gradients too")
      ->capture_default_str();
  app->add_option("--eval-interval", c.eval_interval,
                  "optimizer steps between validations (0: only at the end)")
      ->capture_default_str();
  app->add_option("--checkpoint-dir", c.checkpoint_dir,
                  "checkpoint directory (default runs/<run-name>/checkpoints)");
  app->add_option("--checkpoint-interval", c.checkpoint_interval,
                  "steps between checkpoints (0: only at the end)")
      ->capture_default_str();
  app->add_option("--keep-checkpoints", c.keep_checkpoints, "newest checkpoints kept")->capture_default_str();
  app->add_option("--resume", c.resume, "auto (newest valid checkpoint, if any), none, or a checkpoint file")
      ->capture_default_str();
  app->add_option(
      "--init-from", c.init_from,
      "initial weights of a fresh run: a Hugging Face GPT-2 directory (config.json + "
      "model.safetensors) or .safetensors file, or an mptrain checkpoint (weights only, no optimizer "
      "state); a resumable checkpoint in the run's directory takes precedence");
  app->add_option("--tokenizer", c.tokenizer,
                  "tokenizer.json or llm.c tokenizer .bin of shard data (default: tokenizer.json beside the "
                  "shards): text samples and validation loss per byte");
  app->add_option("--log-interval", c.log_interval, "steps between log lines")->capture_default_str();
  app->add_option("--run-name", c.run_name, "name of the run: outputs go to runs/<run-name>/")
      ->capture_default_str();
  app->add_option(
         "--peak-tflops", c.peak_tflops,
         "peak TFLOP/s per rank for MFU = tokens/s x (6N + 12 L C T) / (ranks x peak) (PaLM appendix B); "
         "0: CUDA 989 (H100/H200 dense bf16), CPU the SGEMM rate measured at start-up")
      ->capture_default_str();
  app->add_option("--sample-tokens", c.sample_tokens, "tokens of text sampled at the end of training")
      ->capture_default_str();
  app->add_option(
         "--collective-timeout", c.collective_timeout,
         "seconds a collective may take before the job is aborted (a frozen or dead rank); keep it above "
         "the longest checkpoint write, which the other ranks wait for; 0: off")
      ->capture_default_str();
  app->add_option("--inject-overflow", c.inject_overflow,
                  "debugging: poison one gradient element on RANK after backward of STEP (1-based), "
                  "STEP:RANK[:inf|:nan]; STEP+ or 'every' repeats it on every later step");
}

/// Line and column (1-based) of byte `offset` of `text`.
std::pair<size_t, size_t> line_column(const std::string& text, size_t offset) {
  size_t line = 1, column = 1;
  for (size_t i = 0; i < offset && i < text.size(); ++i) {
    if (text[i] == '\n') {
      ++line;
      column = 1;
    } else {
      ++column;
    }
  }
  return {line, column};
}

/// "line L, column C" of the top-level key `key` in the JSON object `text` (its opening quote), found by
/// a scan that tracks strings and nesting depth; "" when not found (e.g. written with escapes).
std::string key_position(const std::string& text, const std::string& key) {
  const std::string quoted = nlohmann::json(key).dump();
  int depth = 0;
  for (size_t i = 0; i < text.size(); ++i) {
    const char ch = text[i];
    if (ch == '{' || ch == '[') {
      ++depth;
    } else if (ch == '}' || ch == ']') {
      --depth;
    } else if (ch == '"') {
      const size_t start = i;
      for (++i; i < text.size() && text[i] != '"'; ++i)
        if (text[i] == '\\') ++i;
      if (depth != 1 || text.compare(start, quoted.size(), quoted) != 0 || i + 1 != start + quoted.size())
        continue;
      size_t j = i + 1;
      while (j < text.size() && std::isspace(static_cast<unsigned char>(text[j]))) ++j;
      if (j < text.size() && text[j] == ':') {
        const auto [line, column] = line_column(text, start);
        return fmt::format("line {}, column {}", line, column);
      }
    }
  }
  return "";
}

/// The value of JSON key `key` as CLI11 would read it from the command line, after checking that its JSON
/// type fits the flag `opt` (a number for numeric flags, a string for text flags, a boolean for switches).
std::string json_value_for(const nlohmann::json& v, const CLI::Option* opt, const std::string& file,
                           const std::string& text, const std::string& key) {
  const std::string type = opt->get_type_name();
  std::string expected;
  bool ok = false;
  if (opt->get_type_size() == 0) {
    expected = "a boolean (true or false)";
    ok = v.is_boolean();
  } else if (type == "INT|auto") {
    expected = "an integer or \"auto\"";
    ok = v.is_number_integer() || (v.is_string() && v.get<std::string>() == "auto");
  } else if (type.starts_with("INT") || type.starts_with("UINT")) {
    expected = "an integer";
    ok = v.is_number_integer() && (!type.starts_with("UINT") || v.is_number_unsigned());
  } else if (type.starts_with("FLOAT")) {
    expected = "a number";
    ok = v.is_number();
  } else {
    expected = "a string";
    ok = v.is_string();
  }
  if (!ok) {
    const std::string where = key_position(text, key);
    throw InputError(fmt::format("config {}{}: key '{}' must be {}, got {} {}", file,
                                 where.empty() ? "" : " (" + where + ")", key, expected, v.type_name(),
                                 v.dump()));
  }
  if (v.is_string()) return v.get<std::string>();
  if (v.is_boolean()) return v.get<bool>() ? "true" : "false";
  return v.dump();
}

/// --micro-batch: an integer, or "auto" for train.
void parse_micro_batch(const std::string& text, RunConfig& c) {
  if (text == "auto") {
    MPT_INPUT_CHECK(c.command == "train", "--micro-batch auto is for train; {} takes a number", c.command);
    c.micro_batch_auto = true;
    return;
  }
  int64_t value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  MPT_INPUT_CHECK(!text.empty() && ec == std::errc() && end == text.data() + text.size(),
                  "--micro-batch must be an integer or auto, got '{}'", text);
  c.micro_batch = value;
}

std::vector<std::string> config_arguments(const std::string& file, CLI::App* sub) {
  std::error_code ec;
  MPT_INPUT_CHECK(!std::filesystem::is_directory(file, ec), "config {}: is a directory, not a JSON file",
                  file);
  std::ifstream in(file, std::ios::binary);
  MPT_INPUT_CHECK(static_cast<bool>(in), "config {}: cannot open ({})", file, std::strerror(errno));
  const std::string text((std::istreambuf_iterator<char>(in)), {});
  MPT_INPUT_CHECK(!in.bad(), "config {}: read error", file);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    // nlohmann reports the byte offset (1-based, of the character that failed); give line and column.
    const auto [line, column] = line_column(text, e.byte > 0 ? e.byte - 1 : 0);
    std::string what = e.what();
    if (const auto nl = what.find('\n'); nl != std::string::npos) what.resize(nl);
    // nlohmann's text repeats a position of its own ("parse error at line L, column C: ..."): keep the
    // reason.
    if (const auto at = what.find("column "); at != std::string::npos)
      if (const auto colon = what.find(": ", at); colon != std::string::npos) what = what.substr(colon + 2);
    throw InputError(
        fmt::format("config {}: JSON syntax error at line {}, column {}: {}", file, line, column, what));
  } catch (const nlohmann::json::exception& e) {  // a number out of range (e.g. 1E666) while parsing
    throw InputError(fmt::format("config {}: {}", file, e.what()));
  }
  MPT_INPUT_CHECK(j.is_object(), "config {}: must be a JSON object of flag names", file);
  std::vector<std::string> args;
  for (const auto& [key, value] : j.items()) {
    const CLI::Option* opt = key == "config" ? nullptr : sub->get_option_no_throw("--" + key);
    if (opt == nullptr) {
      const std::string where = key_position(text, key);
      throw InputError(
          fmt::format("config {}{}: unknown key '{}' (keys are the flag names of 'mptrain {}', see --help)",
                      file, where.empty() ? "" : " (" + where + ")", key, sub->get_name()));
    }
    args.push_back("--" + key + "=" + json_value_for(value, opt, file, text, key));
  }
  return args;
}

}  // namespace

bool parse_command_line(int argc, char** argv, RunConfig& c) {
  CLI::App app{"mptrain: data-parallel mixed-precision GPT training (launch with mpirun/srun)", "mptrain"};
  app.require_subcommand(1);
  app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  std::string config_file;
  CLI::App* train =
      app.add_subcommand("train", "train a GPT on --data (resumes from checkpoints with --resume)");
  CLI::App* eval = app.add_subcommand("eval", "validation loss of a checkpoint on --data");
  CLI::App* sample = app.add_subcommand("sample", "generate text from a checkpoint");
  CLI::App* export_ =
      app.add_subcommand("export", "write a checkpoint's weights for Hugging Face transformers");
  for (CLI::App* sub : {train, eval, sample, export_})
    sub->add_option("--config", config_file,
                    "JSON file of flag values (keys are flag names; flags override it)");
  std::string micro_batch_text;
  add_train(train, c, micro_batch_text);
  add_common(eval, c);
  add_data(eval, c, micro_batch_text);
  eval->add_option("--checkpoint", c.checkpoint, "checkpoint file to evaluate")->required();
  eval->add_option("--tokenizer", c.tokenizer,
                   "tokenizer.json or llm.c tokenizer .bin of shard data (default: tokenizer.json beside the "
                   "shards): validation loss per byte");
  export_->add_option("--checkpoint", c.checkpoint, "mptrain checkpoint to export")->required();
  export_->add_option("--out", c.out, "output directory (config.json, model.safetensors, tokenizer)")
      ->required();
  export_->add_option("--format", c.format, "hf: transformers' GPT2LMHeadModel")
      ->check(CLI::IsMember({"hf"}))
      ->capture_default_str();
  export_->add_option("--dtype", c.export_dtype, "storage dtype of the exported weights")
      ->check(CLI::IsMember({"fp32", "fp16", "bf16"}))
      ->capture_default_str();
  export_->add_option("--tokenizer", c.tokenizer,
                      "tokenizer.json to copy beside the weights (byte-level models get theirs written)");
  add_common(sample, c);
  sample->add_option("--checkpoint", c.checkpoint, "checkpoint file to sample from")->required();
  sample->add_option("--prompt", c.prompt, "start of the text (token ids separated by spaces for shards)");
  sample->add_option("--sample-tokens", c.sample_tokens, "tokens to generate")->capture_default_str();
  sample->add_option("--temperature", c.temperature, "softmax temperature")->capture_default_str();
  sample->add_option("--tokenizer", c.tokenizer,
                     "tokenizer.json or llm.c tokenizer .bin to print shard tokens as text (default: the "
                     "tokenizer.json beside the checkpoint's training shards, when there is one)");

  std::vector<std::string> args(argv + 1, argv + argc);
  // Find the subcommand and --config before parsing, so the file's values can go in front of the flags.
  if (!args.empty()) {
    CLI::App* sub = args[0] == "train"    ? train
                    : args[0] == "eval"   ? eval
                    : args[0] == "sample" ? sample
                    : args[0] == "export" ? export_
                                          : nullptr;
    for (size_t i = 1; sub && i < args.size(); ++i) {
      std::string file;
      if (args[i] == "--config" && i + 1 < args.size())
        file = args[i + 1];
      else if (args[i].rfind("--config=", 0) == 0)
        file = args[i].substr(9);
      if (file.empty()) continue;
      const auto extra = config_arguments(file, sub);
      args.insert(args.begin() + 1, extra.begin(), extra.end());
      break;
    }
  }
  std::reverse(args.begin(), args.end());  // CLI11 takes the vector in reverse order
  try {
    app.parse(args);
  } catch (const CLI::CallForHelp&) {
    std::printf("%s", app.help().c_str());
    return false;
  } catch (const CLI::CallForAllHelp&) {
    std::printf("%s", app.help("", CLI::AppFormatMode::All).c_str());
    return false;
  } catch (const CLI::ParseError& e) {
    std::string what = e.what();
    const std::string sub = argc > 1 ? argv[1] : "";
    const bool known = sub == "train" || sub == "eval" || sub == "sample" || sub == "export";
    throw InputError(fmt::format("{} (see 'mptrain {}--help')", what, known ? sub + " " : ""));
  }
  for (CLI::App* sub : {train, eval, sample, export_})
    if (sub->parsed()) c.command = sub->get_name();
  if (c.command != "sample") parse_micro_batch(micro_batch_text, c);
  return true;
}

}  // namespace mpt
