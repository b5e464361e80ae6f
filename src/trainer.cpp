// The mptrain subcommands (include/mptrain/trainer.hpp): set-up agreed by every rank, the training loop of
// DESIGN.md's step, logging and metrics, evaluation, checkpoints and resume, evaluation and sampling of a
// checkpoint.
#include "mptrain/trainer.hpp"

#include <omp.h>

#include <charconv>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <random>
#include <sstream>

#include "mptrain/checkpoint.hpp"
#include "mptrain/data.hpp"
#include "mptrain/error.hpp"
#include "mptrain/hash.hpp"
#include "mptrain/hf.hpp"
#include "mptrain/memory_model.hpp"
#include "mptrain/model.hpp"
#include "mptrain/run_lock.hpp"
#include "mptrain/runtime.hpp"
#include "mptrain/stop_signal.hpp"
#include "mptrain/tokenizer.hpp"

namespace mpt {

void agree_on_setup(Communicator& comm, const std::function<void()>& setup) {
  std::string message;
  int32_t mine = 0;  // 0: fine, else the exit code
  try {
    setup();
  } catch (const FileInputError& e) {
    message = e.what();
    mine = kExitBadFile;
  } catch (const InputError& e) {
    message = e.what();
    mine = kExitUsage;
  }
  std::vector<int32_t> failed(static_cast<size_t>(comm.size()));
  comm.all_gather(&mine, failed.data(), 1, DType::i32);
  for (int r = 0; r < comm.size(); ++r) {
    if (!failed[static_cast<size_t>(r)]) continue;
    if (r == comm.rank()) {
      std::fprintf(stderr, "mptrain: error: %s\n", message.c_str());
      std::fflush(stderr);
    }
    throw AgreedExit{failed[static_cast<size_t>(r)]};
  }
}

void check_ranks_agree(Communicator& comm, uint64_t hash, const std::string& what) {
  std::vector<uint64_t> all(static_cast<size_t>(comm.size()));
  const auto h = static_cast<int64_t>(hash);
  comm.all_gather(&h, all.data(), 1, DType::i64);
  for (int r = 0; r < comm.size(); ++r)
    MPT_INPUT_CHECK(
        all[static_cast<size_t>(r)] == all[0],
        "ranks disagree: rank {} has a different {} than rank 0 (hash {:016x} vs {:016x}); start every "
        "rank with the same flags and files",
        r, what, all[static_cast<size_t>(r)], all[0]);
}

namespace {

using Clock = std::chrono::steady_clock;

/// Writes +inf or NaN into one gradient element (the --inject-overflow fault), through the backend so it
/// works wherever the gradients live: stage 1 the first element of the first tensor in the full gradients,
/// after backward; stage 2 the first element of this rank's reduced shard, after the reduction (no full
/// gradient exists there).
void poison_gradient(Backend& backend, const MixedPrecisionEngine& engine, bool nan) {
  const bool stage2 = engine.config().zero_stage == 2;
  const size_t offset = stage2 ? 0 : engine.layout().tensors().front().offset;
  const float value = nan ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  dispatch_float_dtype(stage2 ? engine.grad_dtype() : engine.config().dtype, [&]<typename S>() {
    const S poisoned = from_float<S>(value);
    backend.copy_from_host(static_cast<S*>(stage2 ? engine.reduced_grads() : engine.grads()) + offset,
                           &poisoned, sizeof(S));
  });
}

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

void set_threads(const RunConfig& c) {
  int threads = c.threads;
  if (threads == 0) threads = std::getenv("OMP_NUM_THREADS") ? omp_get_max_threads() : 1;
  omp_set_num_threads(threads);
}

std::string format_duration(double seconds) {
  const auto s = static_cast<int64_t>(seconds + 0.5);
  return fmt::format("{}:{:02d}:{:02d}", s / 3600, (s / 60) % 60, s % 60);
}

/// Writes `text` to `path` atomically (temporary file + rename).
void write_text_file(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << text;
    if (!out) throw Error(fmt::format("cannot write '{}'", tmp));
  }
  std::filesystem::rename(tmp, path);
}

/// The tokenizer.json beside token shards `data` (a path or a glob in one directory), or "" when there is
/// none (or the data is text).
std::string tokenizer_beside(const std::string& data) {
  if (!(data.ends_with(".bin") || data.find_first_of("*?[") != std::string::npos)) return "";
  const std::filesystem::path candidate = std::filesystem::path(data).parent_path() / "tokenizer.json";
  std::error_code ec;
  return std::filesystem::is_regular_file(candidate, ec) ? candidate.string() : "";
}

/// The tokenizer of a model with `vocab_size` tokens trained on `data`: bytes for 256-token text models,
/// else --tokenizer or the tokenizer.json beside the shards (null when neither is there). Throws
/// mpt::InputError naming the file when its vocabulary differs from the model's.
std::unique_ptr<Tokenizer> open_tokenizer(const RunConfig& c, const std::string& data, int64_t vocab_size) {
  const bool text = !(data.ends_with(".bin") || data.find_first_of("*?[") != std::string::npos);
  if (text && vocab_size == Dataset::kTextVocabSize && c.tokenizer.empty())
    return std::make_unique<Tokenizer>(Tokenizer::bytes());
  const std::string path = c.tokenizer.empty() ? tokenizer_beside(data) : c.tokenizer;
  if (path.empty()) return nullptr;
  auto t = std::make_unique<Tokenizer>(about_files([&] { return Tokenizer::load(path); }));
  if (t->vocab_size() != vocab_size)
    throw FileInputError(
        fmt::format("tokenizer {}: {} tokens, the model's vocabulary is {} (another tokenizer?)", path,
                    t->vocab_size(), vocab_size));
  return t;
}

/// The model shape and precision a checkpoint was trained with.
RunConfig config_of_checkpoint(const SafetensorsFile& ckpt, RunConfig c) {
  c.layers = checkpoint_int(ckpt, "layers");
  c.heads = checkpoint_int(ckpt, "heads");
  c.channels = checkpoint_int(ckpt, "channels");
  c.seq_len = checkpoint_int(ckpt, "seq_len");
  return c;
}

/// The --data a checkpoint was trained on (from its config metadata; "" when absent).
std::string trained_on(const SafetensorsFile& ckpt) {
  const auto it = ckpt.metadata.find("config");
  if (it == ckpt.metadata.end()) return "";
  const auto j = nlohmann::json::parse(it->second, nullptr, false);
  return j.is_object() && j.contains("data") && j["data"].is_string() ? j["data"].get<std::string>() : "";
}

/// Everything a run holds: data, engine, model.
struct Session {
  RunConfig config;
  Communicator& comm;
  Runtime runtime;             // the backend and the engine's communicator on its memory (MPI or NCCL)
  Backend* backend = nullptr;  // runtime.backend
  std::unique_ptr<Dataset> data;
  GPTConfig model_config;
  std::unique_ptr<MixedPrecisionEngine> engine;
  std::unique_ptr<GPT> model;
  std::unique_ptr<Tokenizer> tokenizer;  // null: shard data without one (ids printed, no loss per byte)
  std::vector<int32_t> tokens, targets;

  Session(const RunConfig& c, Communicator& comm_) : config(c), comm(comm_) {}

  /// The device and the runtime on it, in two agreed phases: --device and the thread count are checked on
  /// every rank first (local), then every rank builds its runtime over `comm` together (collective:
  /// MPI_Comm_dup, or the node-local GPU choice and the NCCL bootstrap, whose errors are the same on every
  /// rank).
  void start_runtime() {
    const std::string config_device_flag = config.device;
    agree_on_setup(comm, [&] {
      config.device = resolve_device(config.device);
      set_threads(config);
    });
    // --device auto resolves per rank; a rank that sees no GPU must not build a CPU runtime while the others
    // bootstrap NCCL (different collectives: a hang).
    agree_on_setup(comm, [&] {
      check_ranks_agree(
          comm, fnv1a(config.device),
          fmt::format("device (--device {} is {} on rank {}: only where a CUDA device is visible "
                      "does auto mean cuda)",
                      config_device_flag, config.device, comm.rank()));
    });
    agree_on_setup(comm, [&] {
      runtime = make_runtime(config.device, comm, config.collective_timeout);
      backend = runtime.backend.get();
    });
  }

  /// eval and sample: the device and threads from the flags, the model shape from --checkpoint, which is
  /// read and verified.
  SafetensorsFile open_checkpoint() {
    return about_files([&] {
      SafetensorsFile ckpt = read_checkpoint(config.checkpoint);
      config = config_of_checkpoint(ckpt, config);
      return ckpt;
    });
  }

  void build(int64_t vocab_size) {
    model_config = config.model_config(vocab_size);
    engine = std::make_unique<MixedPrecisionEngine>(gpt_tensors(model_config), config.engine_config(),
                                                    *runtime.grad_comm, *backend);
    model = std::make_unique<GPT>(model_config, engine->layout(), *backend, config.dtype(),
                                  parse_recompute(config.recompute));
  }

  /// Validation loss over eval_batches batches of global_batch sequences, averaged over all ranks: per token
  /// (the mean over sequences of each sequence's mean), and in nats per byte of the targets' text (the loss
  /// summed over positions / the bytes the target tokens stand for; NaN without a tokenizer).
  struct Evaluation {
    double loss = 0, loss_per_byte = 0;
  };
  Evaluation evaluate() {
    const int64_t G = config.global_batch, T = config.seq_len, mb = config.micro_batch;
    const int64_t per_rank = G / comm.size();
    double sum[3] = {0.0, 0.0, 0.0};  // loss x sequences, sequences, target bytes
    tokens.resize(static_cast<size_t>(mb * T));
    targets.resize(tokens.size());
    for (int64_t k = 0; k < config.eval_batches; ++k)
      for (int64_t first = 0; first < per_rank; first += mb) {
        const int64_t count = std::min(mb, per_rank - first);
        data->val_batch(k, G, comm.rank() * per_rank + first, count, T, tokens.data(), targets.data());
        sum[0] +=
            static_cast<double>(model->forward(engine->params(), tokens.data(), targets.data(), count, T)) *
            static_cast<double>(count);
        sum[1] += static_cast<double>(count);
        if (tokenizer)
          for (int64_t i = 0; i < count * T; ++i)
            sum[2] += static_cast<double>(tokenizer->text_bytes(targets[static_cast<size_t>(i)]));
      }
    comm.all_reduce(std::span<double>(sum, 3), ReduceOp::sum);
    const double loss = sum[0] / sum[1];
    return {loss, tokenizer ? loss * sum[1] * static_cast<double>(T) / sum[2]
                            : std::numeric_limits<double>::quiet_NaN()};
  }

  /// `n` generated tokens as text: the tokenizer's bytes (printable ASCII, \n and \t kept, other bytes as
  /// \xNN for byte-level text data), else the ids separated by spaces.
  std::string printable_text(const std::vector<int32_t>& out) const {
    if ((data && data->is_text()) || !tokenizer)
      return data ? data->decode(out.data(), static_cast<int64_t>(out.size())) : "";
    return tokenizer->decode(out.data(), static_cast<int64_t>(out.size()));
  }

  /// Generates `n` tokens after `prompt` (rank-local, no communication): a window of seq_len tokens, the
  /// logits of the last real position, softmax with `temperature`, sampled with `rng`.
  std::vector<int32_t> generate(std::vector<int32_t> context, int64_t n, float temperature,
                                std::mt19937_64& rng) {
    const int64_t T = model_config.max_seq_len, V = model_config.vocab_size,
                  Vp = model_config.padded_vocab_size();
    if (context.empty()) context.push_back(data && data->is_text() ? '\n' : 0);
    std::vector<int32_t> window(static_cast<size_t>(T));
    std::vector<float> row(static_cast<size_t>(V));
    std::vector<int32_t> out;
    for (int64_t i = 0; i < n; ++i) {
      const auto len = static_cast<int64_t>(std::min<size_t>(context.size(), static_cast<size_t>(T)));
      std::fill(window.begin(), window.end(), 0);  // positions after `len` cannot influence earlier logits
      std::copy(context.end() - len, context.end(), window.begin());
      model->forward(engine->params(), window.data(), nullptr, 1, T);
      dispatch_float_dtype(config.dtype(), [&]<typename S>() {
        std::vector<S> logits(static_cast<size_t>(V));
        backend->copy_to_host(logits.data(), static_cast<const S*>(model->logits()) + (len - 1) * Vp,
                              logits.size() * sizeof(S));
        for (int64_t j = 0; j < V; ++j)
          row[static_cast<size_t>(j)] = to_float(logits[static_cast<size_t>(j)]);
      });
      const float top = *std::max_element(row.begin(), row.end());
      double total = 0;
      for (float& x : row) {
        x = std::exp((x - top) / temperature);
        total += x;
      }
      double u = std::uniform_real_distribution<double>(0.0, total)(rng);
      int32_t next = static_cast<int32_t>(V - 1);
      for (int64_t j = 0; j < V; ++j) {
        u -= row[static_cast<size_t>(j)];
        if (u <= 0) {
          next = static_cast<int32_t>(j);
          break;
        }
      }
      context.push_back(next);
      out.push_back(next);
    }
    return out;
  }
};

std::map<std::string, std::string> checkpoint_metadata(const Session& s) {
  return {{"layers", std::to_string(s.config.layers)},
          {"heads", std::to_string(s.config.heads)},
          {"channels", std::to_string(s.config.channels)},
          {"seq_len", std::to_string(s.config.seq_len)},
          {"vocab_size", std::to_string(s.model_config.vocab_size)},
          {"precision", s.config.precision},
          {"seed", std::to_string(s.config.seed)},
          {"data_hash", fmt::format("{:016x}", s.data->hash())},
          {"config", s.config.to_json().dump()}};
}

/// Checks that a checkpoint fits this run: model shape, vocabulary and precision.
void check_checkpoint_fits(const SafetensorsFile& ckpt, const Session& s) {
  const auto expect = [&](const char* key, int64_t have) {
    const int64_t value = checkpoint_int(ckpt, key);
    MPT_INPUT_CHECK(value == have,
                    "checkpoint {}: {} is {}, this run has {} (another model shape or vocabulary)", ckpt.path,
                    key, value, have);
  };
  expect("layers", s.config.layers);
  expect("heads", s.config.heads);
  expect("channels", s.config.channels);
  expect("seq_len", s.config.seq_len);
  expect("vocab_size", s.model_config.vocab_size);
  const auto text = [&](const char* key) {
    const auto it = ckpt.metadata.find(key);
    return it == ckpt.metadata.end() ? std::string("?") : it->second;
  };
  MPT_INPUT_CHECK(
      text("data_hash") == fmt::format("{:016x}", s.data->hash()),
      "checkpoint {}: trained on other data (hash {}, --data {} has {:016x}); resume with the same --data",
      ckpt.path, text("data_hash"), s.config.data, s.data->hash());
  MPT_INPUT_CHECK(text("seed") == std::to_string(s.config.seed),
                  "checkpoint {}: trained with --seed {}, this run has {} (the data order follows the seed)",
                  ckpt.path, text("seed"), s.config.seed);
  const auto precision = ckpt.metadata.find("precision");
  MPT_INPUT_CHECK(precision != ckpt.metadata.end() && precision->second == s.config.precision,
                  "checkpoint {}: written by a {} run, this run is {} (--precision)", ckpt.path,
                  precision == ckpt.metadata.end() ? "?" : precision->second, s.config.precision);
}

/// --inject-overflow as a hook of the step: after the last backward of a chosen step, the chosen rank writes
/// +inf or NaN into one gradient element.
struct OverflowInjection {
  InjectOverflow spec;

  /// Whether step `step` (0-based) is poisoned on some rank. Every rank knows it alike, so all ranks take the
  /// same (non-overlapped) bucket order on that step: collectives must be issued in one order everywhere.
  bool poisons(int64_t step) const { return spec.step > 0 && spec.hits(step + 1, spec.rank); }

  /// Poisons this rank's gradients when `step` is chosen for it, and says so on stdout: after the last
  /// backward (stage 1) or after the reduction (stage 2, `reduced`).
  void after_backward(Session& s, int64_t step, bool reduced = false) const {
    if (!poisons(step) || s.comm.rank() != spec.rank) return;
    if (reduced != (s.engine->config().zero_stage == 2)) return;
    poison_gradient(*s.backend, *s.engine, spec.nan);
    std::printf("step %6lld/%lld | rank %d: --inject-overflow: gradient element set to %s\n",
                static_cast<long long>(step + 1), static_cast<long long>(s.config.steps), s.comm.rank(),
                spec.nan ? "NaN" : "inf");
    std::fflush(stdout);
  }
};

/// A training run: the session and what the loop keeps between steps.
struct TrainingRun {
  Session s;
  RunConfig& c;  // s.config
  Communicator& comm;
  const bool root;
  const Clock::time_point start = Clock::now();
  std::string run_dir;
  std::vector<RunLock> locks;  // rank 0: the run's, and the --checkpoint-dir's when that lies elsewhere
  OverflowInjection inject;
  std::optional<BatchSchedule> batches;  // --global-batch with --batch-rampup
  // The step being run (begin_step): its global batch, accumulation steps, and the samples read before it
  // (skipped steps included), which place it in the data order.
  int64_t batch = 0;
  int64_t accumulation = 1;
  int64_t consumed = 0;
  int64_t start_step = 0;
  int64_t start_samples = 0;
  std::string resumed_from;
  nlohmann::json effective;  // the config as run (config.json, the ranks' agreement hash)
  double flops_per_token = 0, peak = 0;
  std::ofstream metrics;  // rank 0 only
  double train_seconds = 0, window_seconds = 0;
  int64_t window_tokens = 0;
  // The memory model: ranks sharing this node's memory, the budget of --micro-batch auto (the lowest of
  // the ranks'), what this rank can use, and the estimate of the chosen micro-batch.
  int ranks_on_node = 1;
  UsableMemory budget, usable;
  MemoryEstimate estimate;

  TrainingRun(const RunConfig& config, Communicator& comm_)
      : s(config, comm_), c(s.config), comm(comm_), root(comm_.rank() == 0) {}

  bool logs_at(int64_t step) const { return (step + 1) % c.log_interval == 0 || step + 1 == c.steps; }
  bool evaluates_at(int64_t step) const {
    return c.eval_batches > 0 &&
           ((c.eval_interval > 0 && (step + 1) % c.eval_interval == 0) || step + 1 == c.steps);
  }
  bool checkpoints_at(int64_t step, const StepResult& r) const {
    return (c.checkpoint_interval > 0 && (step + 1) % c.checkpoint_interval == 0) || step + 1 == c.steps ||
           r.stop_requested;
  }
  /// Sets the batch of step `step` that starts after `consumed` samples, for this run and the engine: its
  /// size and accumulation, and the noise scale's small batches (several ranks: each rank's gradient; one
  /// rank with accumulation: the first micro-batch; else none).
  void begin_step() {
    batch = batches->batch_at(consumed);
    const int64_t N = comm.size();
    accumulation = batch / (N * c.micro_batch);
    StepBatch b;
    b.samples = batch;
    if (N > 1 && (accumulation == 1 || c.zero_stage == 1)) {
      b.small_samples = static_cast<double>(batch / N);
    } else if (accumulation > 1) {  // one rank, or stage 2 (no rank holds its whole local gradient)
      b.small_samples = static_cast<double>(c.micro_batch);
      b.small_grad_factor = static_cast<double>(accumulation);
    }
    s.engine->set_batch(b);
  }
  /// Writes one JSON line to metrics.jsonl (rank 0).
  void log_metrics(const nlohmann::json& line) {
    if (!root) return;
    metrics << line.dump() << "\n";
    metrics.flush();
  }
};

/// The ranks on this node (same host name), for the share of host memory each may use. Collective.
int ranks_on_this_node(Communicator& comm) {
  const auto mine = static_cast<int64_t>(fnv1a(detail::host_name()));
  std::vector<int64_t> all(static_cast<size_t>(comm.size()));
  comm.all_gather(&mine, all.data(), 1, DType::i64);
  return static_cast<int>(std::count(all.begin(), all.end(), mine));
}

/// The ranks' node shares and the memory budget of --micro-batch auto: --memory-budget, or the lowest
/// default budget of all ranks (free device memory differs between GPUs), so every rank picks the same
/// micro-batch. Collective.
void agree_on_memory_budget(TrainingRun& run) {
  run.ranks_on_node = ranks_on_this_node(run.comm);
  const RunConfig& c = run.c;
  run.budget = c.memory_budget_gib > 0
                   ? UsableMemory{static_cast<size_t>(c.memory_budget_gib * 1024.0 * 1024.0 * 1024.0),
                                  "--memory-budget"}
                   : default_memory_budget(*run.s.backend, run.ranks_on_node);
  double lowest = -static_cast<double>(run.budget.bytes);
  run.comm.all_reduce(std::span<double>(&lowest, 1), ReduceOp::max);
  if (static_cast<size_t>(-lowest) < run.budget.bytes) {
    run.budget.bytes = static_cast<size_t>(-lowest);
    run.budget.source += ", the lowest over the ranks";
  }
}

/// Before anything is allocated: --micro-batch auto picks the largest micro-batch that fits the budget and
/// divides this rank's part of the global batch; then this rank's need is compared with what it can use.
/// Throws mpt::InputError (one line) when nothing fits or the need is too large.
void plan_memory(TrainingRun& run) {
  Session& s = run.s;
  RunConfig& c = run.c;
  const int N = run.comm.size();
  const GPTConfig model = c.model_config(s.data->vocab_size());
  const EngineConfig engine = c.engine_config();
  const Recompute mode = parse_recompute(c.recompute);
  const auto estimate = [&](int64_t B) {
    return estimate_memory(model, engine, N, mode, B, c.seq_len, *s.backend);
  };
  if (c.micro_batch_auto) {
    MPT_INPUT_CHECK(c.global_batch % N == 0, "--global-batch {} is not divisible by {} ranks", c.global_batch,
                    N);
    const int64_t per_rank = c.global_batch / N;
    const int64_t B = largest_micro_batch(estimate, run.budget.bytes, per_rank, per_rank);
    const MemoryEstimate one = estimate(1);
    MPT_INPUT_CHECK(
        B > 0,
        "--micro-batch auto: nothing fits the memory budget {} per rank ({}): micro-batch 1 needs "
        "{} (activations {})",
        format_gib(static_cast<double>(run.budget.bytes)), run.budget.source,
        format_gib(static_cast<double>(one.total())), format_gib(static_cast<double>(one.activations)));
    c.micro_batch = B;
  }
  run.usable = usable_memory(*s.backend, run.ranks_on_node);
  run.estimate = estimate(c.micro_batch);
  if (run.estimate.total() <= run.usable.bytes) return;
  const int64_t largest = largest_micro_batch(estimate, run.usable.bytes, c.micro_batch - 1);
  throw InputError(
      memory_refusal(fmt::format("--micro-batch {}{}", c.micro_batch, c.micro_batch_auto ? " (auto)" : ""),
                     run.estimate, run.usable, largest, estimate(1)));
}

/// The flags, data and checkpoint checks, the model and its weights (initial or resumed): everything that
/// may fail on some ranks only, agreed by all of them.
void load_run(TrainingRun& run) {
  Session& s = run.s;
  RunConfig& c = run.c;
  agree_on_setup(run.comm, [&] {
    run.batches = c.batch_schedule();
    if (!c.micro_batch_auto) run.batches->check_divisible(c.micro_batch, run.comm.size());
    MPT_INPUT_CHECK(run.inject.spec.step == 0 || run.inject.spec.rank < run.comm.size(),
                    "--inject-overflow '{}': rank {} does not exist in a run of {} rank(s)",
                    c.inject_overflow, run.inject.spec.rank, run.comm.size());
    about_files([&] {
      s.data = std::make_unique<Dataset>(Dataset::load(c.data, c.val_fraction));
      s.data->check_sequence_length(c.seq_len, c.eval_batches > 0);
    });
    plan_memory(run);  // before the first allocation
    if (c.micro_batch_auto) run.batches->check_divisible(c.micro_batch, run.comm.size());
    s.build(s.data->vocab_size());
    s.tokenizer = open_tokenizer(c, c.data, s.data->vocab_size());
    s.engine->set_parameters(gpt_init(s.model_config, c.seed));
    if (c.resume == "auto")
      run.resumed_from = about_files([&] { return find_latest_checkpoint(c.checkpoint_dir, run.root); });
    else if (c.resume != "none")
      run.resumed_from = c.resume;
    // A fresh run in a directory of older checkpoints would prune them and leave --resume auto to pick
    // them up later in place of this run's.
    MPT_INPUT_CHECK(
        c.resume != "none" || !has_checkpoints(c.checkpoint_dir),
        "--resume none: {} already holds checkpoints of an earlier run; pick another --run-name or "
        "--checkpoint-dir, or resume it",
        c.checkpoint_dir);
    if (!run.resumed_from.empty()) {
      about_files([&] {
        const SafetensorsFile ckpt = read_checkpoint(run.resumed_from);
        check_checkpoint_fits(ckpt, s);
        // A checkpoint written before the schedule counted samples: its position is steps x this batch.
        s.engine->set_batch({run.batches->global_batch(), 0.0, 1.0});
        run.start_step = restore_checkpoint(*s.engine, ckpt);
        run.start_samples = run.batches->samples_before(run.start_step);
        const auto stored = ckpt.metadata.find("samples");
        MPT_INPUT_CHECK(stored == ckpt.metadata.end() || stored->second == std::to_string(run.start_samples),
                        "checkpoint {}: {} samples read by step {}, but --global-batch and --batch-rampup "
                        "give {}; resume with the batch flags it was trained with",
                        run.resumed_from, stored == ckpt.metadata.end() ? "?" : stored->second,
                        run.start_step, run.start_samples);
      });
      MPT_INPUT_CHECK(run.start_step <= c.steps, "--steps {}: checkpoint {} is already at step {}", c.steps,
                      run.resumed_from, run.start_step);
    } else if (!c.init_from.empty()) {
      // A fresh run from given weights; a resumed one continues from its own checkpoint instead.
      s.engine->set_parameters(about_files([&] { return load_init_weights(c.init_from, s.model_config); }));
    }
  });
}

/// `p` is `dir` or lies below it, after resolving ".." and symbolic links.
bool lies_in(const std::filesystem::path& p, const std::filesystem::path& dir) {
  std::error_code ec;
  const std::filesystem::path relative =
      std::filesystem::weakly_canonical(p, ec).lexically_relative(std::filesystem::weakly_canonical(dir, ec));
  return !relative.empty() && *relative.begin() != "..";
}

/// Rank 0 takes `path`'s lock for `what` ("run 'NAME'"); another job holding it is an error naming that job
/// and `flag`, the way to pick another run.
void take_lock(TrainingRun& run, const std::filesystem::path& path, const std::string& what,
               const char* flag) {
  RunLock lock = about_files([&] { return RunLock::try_acquire(path); });
  if (lock.state() == RunLock::State::in_use)
    throw FileInputError(
        fmt::format("{} is in use by another job ({}); use another {} or stop that job", what,
                    lock.holder() ? lock.holder()->describe()
                                  : fmt::format("its lock file {} names no job", path.string()),
                    flag));
  if (lock.state() == RunLock::State::unsupported)
    std::fprintf(
        stderr,
        "mptrain: warning: %s: the file system does not support flock (%s); nothing stops a second job "
        "from using %s\n",
        path.c_str(), lock.unsupported_reason().c_str(), what.c_str());
  else if (lock.previous_holder())
    std::printf("%s: taking over the lock of a job that did not end cleanly (%s)\n", what.c_str(),
                lock.previous_holder()->describe().c_str());
  run.locks.push_back(std::move(lock));
}

/// Rank 0 locks the run (runs/NAME/lock, and DIR/lock for a --checkpoint-dir outside it) before anything of
/// it is read: a second job on the same run stops here with exit 1 on every rank. The locks are undone
/// when the set-up fails (nothing of the run created or changed) and kept once it succeeded.
void lock_run(TrainingRun& run) {
  agree_on_setup(run.comm, [&] {
    const std::string& dir = run.c.checkpoint_dir;
    std::error_code ec;
    MPT_INPUT_CHECK(!std::filesystem::exists(dir, ec) || std::filesystem::is_directory(dir, ec),
                    "--checkpoint-dir {}: exists and is not a directory", dir);
    if (!run.root) return;
    const std::filesystem::path run_lock = std::filesystem::path(run.run_dir) / "lock";
    const std::filesystem::path dir_lock = std::filesystem::path(dir) / "lock";
    take_lock(run, run_lock, fmt::format("run '{}'", run.c.run_name), "--run-name");
    if (!lies_in(dir, run.run_dir))
      take_lock(run, dir_lock, fmt::format("--checkpoint-dir {}", dir), "--checkpoint-dir");
  });
}

/// Set-up in three agreed phases after the run's lock, so that nothing is created before every check passed
/// on every rank (the lock undoes itself otherwise): flags, data and checkpoint checks (load_run); then the
/// ranks compare their configs, layouts and data; only then the checkpoint directory is created.
void set_up_training(TrainingRun& run) {
  RunConfig& c = run.c;
  if (c.checkpoint_dir.empty()) c.checkpoint_dir = fmt::format("runs/{}/checkpoints", c.run_name);
  run.run_dir = fmt::format("runs/{}", c.run_name);
  run.inject.spec = parse_inject_overflow(c.inject_overflow);
  watch_stop_signals();  // SIGUSR1 (SIGTERM under srun): a graceful stop at the next step boundary
  run.s.start_runtime();
  lock_run(run);
  agree_on_memory_budget(run);
  load_run(run);
  run.effective = c.to_json();
  uint64_t hash = fnv1a(run.effective.dump());
  for (const TensorPlacement& t : run.s.engine->layout().tensors())
    hash = fnv1a(fmt::format("{}:{}:{}", t.spec.name, t.offset, t.spec.num_elements()), hash);
  agree_on_setup(run.comm, [&] {
    check_ranks_agree(run.comm, fnv1a(fmt::format("{:016x}", run.s.data->hash()), hash),
                      "config, model layout or data");
  });
  agree_on_setup(run.comm, [&] {
    std::error_code ec;
    std::filesystem::create_directories(c.checkpoint_dir, ec);
    if (ec || !std::filesystem::is_directory(c.checkpoint_dir))
      throw FileInputError(fmt::format("--checkpoint-dir {}: cannot create the directory ({})",
                                       c.checkpoint_dir, ec.message()));
  });
  run.flops_per_token = gpt_flops_per_token(run.s.model_config, c.seq_len);
  run.peak = c.peak_tflops > 0 ? c.peak_tflops * 1e12 : run.s.backend->peak_flops();
  run.s.tokens.resize(static_cast<size_t>(c.micro_batch * c.seq_len));
  run.s.targets.resize(run.s.tokens.size());
  for (RunLock& lock : run.locks) lock.keep();
}

/// Rank 0: the run directory, config.json and metrics.jsonl (a resumed run keeps the lines of the steps
/// before its resume point; a fresh run starts a new file).
void open_run_files(TrainingRun& run) {
  if (!run.root) return;
  std::filesystem::create_directories(run.run_dir);
  write_text_file(run.run_dir + "/config.json", run.effective.dump(2) + "\n");
  std::vector<std::string> kept;
  if (run.start_step > 0) {
    std::ifstream old(run.run_dir + "/metrics.jsonl");
    for (std::string line; std::getline(old, line);) {
      const auto j = nlohmann::json::parse(line, nullptr, false);
      if (!j.is_discarded() && j.value("step", int64_t{-1}) <= run.start_step) kept.push_back(line);
    }
  }
  run.metrics.open(run.run_dir + "/metrics.jsonl", std::ios::trunc);
  for (const auto& line : kept) run.metrics << line << "\n";
}

/// The first step (0-based) that runs at the full global batch.
int64_t first_full_batch_step(const BatchSchedule& b) {
  int64_t step = 0;
  for (int64_t consumed = 0; b.batch_at(consumed) < b.global_batch(); ++step)
    consumed += b.batch_at(consumed);
  return step;
}

/// Rank 0: the run's header: ranks and backend, config, data, model, the memory accounting, batch and MFU
/// definitions, the resume point.
void print_run_header(const TrainingRun& run) {
  if (!run.root) return;
  const RunConfig& c = run.c;
  const Session& s = run.s;
  const int64_t G = c.global_batch, T = c.seq_len, N = run.comm.size();
  const MemoryReport m = s.engine->memory();
  std::printf("mptrain train: %d rank(s) x %d thread(s), backend %s, precision %s\n", static_cast<int>(N),
              omp_get_max_threads(), s.backend->name().c_str(), c.precision.c_str());
  std::printf("config: %s\n", run.effective.dump().c_str());
  std::printf("data: %s\n", s.data->describe().c_str());
  std::printf("model: L=%lld C=%lld NH=%lld T=%lld V=%lld (padded %lld): %zu parameters\n",
              static_cast<long long>(c.layers), static_cast<long long>(c.channels),
              static_cast<long long>(c.heads), static_cast<long long>(T),
              static_cast<long long>(s.model_config.vocab_size),
              static_cast<long long>(s.model_config.padded_vocab_size()), m.num_parameters);
  // The ZeRO contract (MemoryReport::formula_bytes): stage 1 2 x element size x P (weights + gradients) +
  // 12P/N (FP32 master, m, v shard), plus 4P for the FP32 accumulation buffer when it is on; stage 2 element
  // size x P + the gradient shard + 12P/N (2P + 14P/N in fp16), plus the staging pool. The rest is padding.
  const bool main_grad = c.fp32_grad_accumulation;
  const size_t esize = dtype_size(c.dtype());
  const char* formula = c.zero_stage == 2 ? (c.precision == "fp32" ? "4P + 16P/N" : "2P + 14P/N")
                                          : (c.precision == "fp32" ? "8P + 12P/N" : "4P + 12P/N");
  std::printf(
      "memory per rank (ZeRO-%d): weights %zu + grads %zu + FP32 master/m/v shard %zu%s = %zu bytes (%s%s: "
      "%.0f, padding %.0f)\n",
      c.zero_stage, m.params_bytes, m.grads_bytes, m.master_bytes + m.adam_m_bytes + m.adam_v_bytes,
      m.staging_bytes > 0 ? fmt::format(" + staging pool {}", m.staging_bytes).c_str() : "", m.state_bytes(),
      formula, main_grad ? (c.zero_stage == 2 ? " + 2P/N FP32 grad shard" : " + 4P main_grad") : "",
      m.formula_bytes(esize), m.padding_bytes(esize));
  const MemoryEstimate& e = run.estimate;
  std::printf(
      "memory model (--recompute %s, micro-batch %lld%s): engine %zu + activations %zu + model %zu = %zu "
      "bytes allocated per rank, + backend scratch %zu = %s; usable %s (%s)\n",
      c.recompute.c_str(), static_cast<long long>(c.micro_batch), c.micro_batch_auto ? ", auto" : "",
      e.engine.state_bytes() + e.engine.scratch_bytes, e.activations, e.model_scratch, e.allocated(),
      e.workspace, format_gib(static_cast<double>(e.total())).c_str(),
      format_gib(static_cast<double>(run.usable.bytes)).c_str(), run.usable.source.c_str());
  if (c.micro_batch_auto)
    std::printf("micro-batch auto: %lld, the largest dividing %lld sequences per rank within %s (%s)\n",
                static_cast<long long>(c.micro_batch), static_cast<long long>(G / N),
                format_gib(static_cast<double>(run.budget.bytes)).c_str(), run.budget.source.c_str());
  std::printf(
      "batch: global %lld sequences x %lld tokens = %lld tokens/step; micro-batch %lld per rank, %lld "
      "accumulation step(s); %lld steps; %s sampling\n",
      static_cast<long long>(G), static_cast<long long>(T), static_cast<long long>(G * T),
      static_cast<long long>(c.micro_batch), static_cast<long long>(G / (N * c.micro_batch)),
      static_cast<long long>(c.steps), c.sampling.c_str());
  if (run.batches->ramp().enabled())
    std::printf("batch ramp-up: from %lld by %lld over %lld samples (global batch %lld from step %lld)\n",
                static_cast<long long>(run.batches->ramp().start),
                static_cast<long long>(run.batches->ramp().increment),
                static_cast<long long>(run.batches->ramp().samples), static_cast<long long>(G),
                static_cast<long long>(first_full_batch_step(*run.batches) + 1));
  std::printf("optimizer: %s; LR schedule in samples: warm-up %lld, cosine to %lld (the last sample)\n",
              c.optimizer.c_str(), static_cast<long long>(s.engine->config().schedule.warmup_samples),
              static_cast<long long>(s.engine->config().schedule.decay_samples));
  std::printf(
      "MFU = tokens/s x %.4g FLOP/token (6N + 12 L C T, PaLM appendix B) / (%lld ranks x %.3g FLOP/s %s)\n",
      run.flops_per_token, static_cast<long long>(N), run.peak,
      c.peak_tflops > 0 ? "given by --peak-tflops" : "measured SGEMM peak per rank");
  if (!run.resumed_from.empty())
    std::printf("resumed from %s at step %lld\n", run.resumed_from.c_str(),
                static_cast<long long>(run.start_step));
  else if (!c.init_from.empty())
    std::printf("initial weights from %s (no optimizer state)\n", c.init_from.c_str());
  if (s.tokenizer && !s.tokenizer->path().empty())
    std::printf("tokenizer: %s (%lld tokens)\n", s.tokenizer->path().c_str(),
                static_cast<long long>(s.tokenizer->vocab_size()));
  std::fflush(stdout);
}

/// Phase 2 for micro-batch `k` of step `step`: this rank's sequences, forward with the loss scaled where the
/// scale lives (engine->loss_scale_device(): no host read), backward into the gradients. In the last
/// micro-batch each bucket's collective starts as soon as backward has written its last gradient (phase 3
/// overlapped), except with main_grad (the FP32 sums are final only after accumulate_micro_batch) and on a
/// step whose gradient is poisoned after backward.
void micro_batch(TrainingRun& run, int64_t step, int64_t k) {
  Session& s = run.s;
  const RunConfig& c = run.c;
  const int64_t G = run.batch, T = c.seq_len, mb = c.micro_batch;
  const int64_t first = run.comm.rank() * (G / run.comm.size()) + k * mb;
  if (c.sampling == "epoch")
    s.data->epoch_batch(c.seed, run.consumed + first, mb, T, s.tokens.data(), s.targets.data());
  else
    s.data->train_batch(c.seed, step, G, first, mb, T, s.tokens.data(), s.targets.data());
  const float factor = 1.0f / static_cast<float>(run.accumulation);
  s.model->forward_accumulate(s.engine->params(), s.tokens.data(), s.targets.data(), mb, T, factor,
                              s.engine->loss_scale_device());
  const bool last = k + 1 == run.accumulation;
  if (c.zero_stage == 2)  // every micro-batch's buckets are reduced as backward finishes them
    s.model->backward(
        s.engine->params(), [&](size_t tensor) { return s.engine->grad_address(tensor); },
        [&](size_t tensor) { s.engine->grad_done(tensor); });
  else if (last && !c.fp32_grad_accumulation && !run.inject.poisons(step))
    s.model->backward(s.engine->params(), s.engine->grads(),
                      [&](size_t tensor) { s.engine->grad_done(tensor); });
  else
    s.model->backward(s.engine->params(), s.engine->grads());
  if (last) run.inject.after_backward(s, step);
  s.engine->accumulate_micro_batch();
  // One rank: the first of several micro-batches is the noise scale's small batch (begin_step).
  if (k == 0 && !last && run.comm.size() == 1) s.engine->sample_micro_batch();
}

/// One optimizer step: DESIGN.md's seven phases in order. Returns the step's agreed result (one read of the
/// step state at the step boundary; NumericsError, the same on every rank, when the scale is stuck).
StepResult train_step(TrainingRun& run, int64_t step) {
  MixedPrecisionEngine& engine = *run.s.engine;
  run.begin_step();                               // this step's batch (ramp-up) and noise-scale batches
  engine.zero_grads();                            // 1. grads = 0
  for (int64_t k = 0; k < run.accumulation; ++k)  // 2. forward + backward of every micro-batch; the last
    micro_batch(run, step, k);                    //    one starts 3 bucket by bucket as backward fills them
  engine.sync_grads();  // 3. reduce-scatter (or all-reduce) of the buckets not started yet
  run.inject.after_backward(run.s, step, /*reduced=*/true);
  engine.check_grads(stop_signal() != 0);  // 4. found_inf and block sums of my shard (and my stop request)
  engine.agree();                          // 5. found_inf and the stop request agreed by all ranks
  engine.update();                         // 6. norm, clip, AdamW, loss scale (skip on found_inf)
  engine.gather_params();                  // 7. my slices of the weights cast, then all-gathered
  return engine.result();
}

/// The step's messages outside the log interval: a skipped step (rank 0, or every rank under fault
/// injection, to show that all of them skipped it) and, after the first step, the activation memory.
void report_step(const TrainingRun& run, int64_t step, const StepResult& r) {
  if (r.skipped && (run.root || run.inject.spec.step > 0)) {
    std::printf(
        "step %6lld/%lld | rank %d: non-finite gradients on some rank: step skipped on every rank, "
        "loss scale %g -> %g\n",
        static_cast<long long>(step + 1), static_cast<long long>(run.c.steps), run.comm.rank(), r.loss_scale,
        run.s.engine->loss_scale());
    std::fflush(stdout);
  }
  if (run.root && step == run.start_step) {
    const Backend& b = *run.s.backend;
    const MemoryEstimate& e = run.estimate;
    std::printf(
        "activations per rank: %zu bytes (micro-batch %lld x %lld tokens, --recompute %s)\n"
        "memory after the first step: %zu bytes allocated (backend counters), memory model %zu (%+.2f%%); "
        "backend scratch %zu held, model %zu\n",
        run.s.model->activation_bytes(), static_cast<long long>(run.c.micro_batch),
        static_cast<long long>(run.c.seq_len), run.c.recompute.c_str(), b.bytes_in_use(), e.allocated(),
        100.0 * (static_cast<double>(e.allocated()) / static_cast<double>(b.bytes_in_use()) - 1.0),
        b.workspace_bytes_in_use(), e.workspace);
  }
}

/// The log line and metrics.jsonl entry of step `step`: the step's mean loss over all ranks (collective),
/// throughput and MFU over the window since the last log line, elapsed time and ETA.
void log_step(TrainingRun& run, int64_t step, const StepResult& r) {
  const RunConfig& c = run.c;
  const auto N = static_cast<double>(run.comm.size());
  // This step's mean loss on this rank: the device accumulator holds every micro-batch's per-token sums.
  double mean =
      run.s.model->take_loss_sum() / static_cast<double>(run.accumulation * c.micro_batch * c.seq_len);
  run.comm.all_reduce(std::span<double>(&mean, 1), ReduceOp::sum);
  mean /= N;
  const double tokens_per_second = static_cast<double>(run.window_tokens) / run.window_seconds;
  const double mfu = tokens_per_second * run.flops_per_token / (N * run.peak);
  const double elapsed = seconds_since(run.start);
  const double eta = run.train_seconds / static_cast<double>(step + 1 - run.start_step) *
                     static_cast<double>(c.steps - step - 1);
  const int64_t skipped = run.s.engine->scaler().state().skipped_steps;
  const std::string noise = std::isfinite(r.noise_scale) ? fmt::format("{:.3g}", r.noise_scale) : "n/a";
  const std::string epoch =
      c.sampling == "epoch"
          ? fmt::format(" | epoch {}", (run.consumed - 1) / run.s.data->train_windows(c.seq_len))
          : std::string();
  if (run.root)
    std::printf(
        "step %6lld/%lld | loss %.4f | batch %lld | scale %g | skipped %lld | grad norm %.3f | lr %.3e | "
        "noise scale %s%s | %.0f tok/s | MFU %.1f%% | elapsed %s | ETA %s\n",
        static_cast<long long>(step + 1), static_cast<long long>(c.steps), mean,
        static_cast<long long>(run.batch), r.loss_scale, static_cast<long long>(skipped), r.grad_norm, r.lr,
        noise.c_str(), epoch.c_str(), tokens_per_second, 100.0 * mfu, format_duration(elapsed).c_str(),
        format_duration(eta).c_str());
  nlohmann::json line = {{"step", step + 1},
                         {"train_loss", mean},
                         {"loss_scale", r.loss_scale},
                         {"skipped", skipped},
                         {"step_skipped", r.skipped},
                         {"lr", r.lr},
                         {"tokens_per_second", tokens_per_second},
                         {"mfu", mfu},
                         {"elapsed_seconds", elapsed}};
  const auto number = [](double x) { return std::isfinite(x) ? nlohmann::json(x) : nlohmann::json(nullptr); };
  line["grad_norm"] = number(r.grad_norm);
  line["global_batch"] = run.batch;
  line["samples"] = run.consumed;  // read so far, this step's included
  line["noise_scale"] = number(r.noise_scale);
  line["grad_sq_estimate"] = number(r.grad_sq_estimate);
  line["trace_estimate"] = number(r.trace_estimate);
  if (c.sampling == "epoch") line["epoch"] = (run.consumed - 1) / run.s.data->train_windows(c.seq_len);
  run.log_metrics(line);
  std::fflush(stdout);
  run.window_seconds = 0;
  run.window_tokens = 0;
}

/// The validation loss after step `step` (collective; -1: of the initial weights), printed and logged, per
/// token and, with a tokenizer, in nats per byte.
void log_evaluation(TrainingRun& run, int64_t step) {
  const Session::Evaluation val = run.s.evaluate();
  const bool per_byte = std::isfinite(val.loss_per_byte);
  if (run.root)
    std::printf("step %6lld/%lld | val loss %.4f%s\n", static_cast<long long>(step + 1),
                static_cast<long long>(run.c.steps), val.loss,
                per_byte ? fmt::format(" | {:.4f} nats/byte", val.loss_per_byte).c_str() : "");
  nlohmann::json line = {{"step", step + 1}, {"val_loss", val.loss}};
  if (per_byte) line["val_loss_per_byte"] = val.loss_per_byte;
  run.log_metrics(line);
  std::fflush(stdout);
}

/// Writes the checkpoint after step `step` (collective). Returns true when the run stops here: a graceful
/// stop request agreed by all ranks before the last step.
bool checkpoint(TrainingRun& run, int64_t step, const StepResult& r) {
  const RunConfig& c = run.c;
  std::map<std::string, std::string> metadata = checkpoint_metadata(run.s);
  metadata["samples"] = std::to_string(run.consumed);  // the data position after this step
  const std::string path = save_checkpoint(*run.s.engine, c.checkpoint_dir, step + 1,
                                           static_cast<int>(c.keep_checkpoints), metadata);
  if (run.root)
    std::printf("step %6lld/%lld | checkpoint %s\n", static_cast<long long>(step + 1),
                static_cast<long long>(c.steps), path.c_str());
  if (!r.stop_requested || step + 1 == c.steps) return false;
  // Which signal asked (the step agreed only that some rank asked): the largest signal number any rank
  // received, so the line names SIGTERM sent to rank 1 alone too. Every rank gets here at the same step.
  int32_t signal_number = stop_signal();
  run.comm.all_reduce(std::span<int32_t>(&signal_number, 1), ReduceOp::max);
  if (run.root)
    std::printf(
        "step %6lld/%lld | graceful stop (%s): every rank stopped after this step; checkpoint %s "
        "written, continue with --resume auto\n",
        static_cast<long long>(step + 1), static_cast<long long>(c.steps), stop_signal_name(signal_number),
        path.c_str());
  std::fflush(stdout);
  return true;
}

/// Rank 0, after the last step: the training time and throughput, and a text sample.
void print_run_summary(TrainingRun& run) {
  if (!run.root) return;
  const RunConfig& c = run.c;
  const int64_t steps = c.steps - run.start_step;
  std::printf("training: %.1f s for %lld steps (%.0f tokens/s)\n", run.train_seconds,
              static_cast<long long>(steps),
              static_cast<double>((run.consumed - run.start_samples) * c.seq_len) /
                  std::max(run.train_seconds, 1e-9));
  if (c.sample_tokens > 0) {
    std::mt19937_64 rng(c.seed);
    const auto text = run.s.generate({}, c.sample_tokens, 1.0f, rng);
    std::printf("sample:\n%s\n", run.s.printable_text(text).c_str());
  }
  std::fflush(stdout);
}

}  // namespace

int run_train(const RunConfig& config, Communicator& comm) {
  TrainingRun run(config, comm);
  set_up_training(run);
  run.consumed = run.start_samples;
  open_run_files(run);
  print_run_header(run);
  if (run.c.steps == 0 && run.start_step == 0) {
    // --steps 0: the initial weights (random, or --init-from) evaluated and written as the step-0 checkpoint.
    if (run.c.eval_batches > 0) log_evaluation(run, -1);
    checkpoint(run, -1, StepResult{});
    comm.barrier();
    return 0;
  }
  for (int64_t step = run.start_step; step < run.c.steps; ++step) {
    const auto t0 = Clock::now();
    if (run.logs_at(step)) run.s.model->take_loss_sum();  // the logged loss is this step's alone
    // The stop request rides in the step's found_inf all-reduce: every rank stops after the same step.
    const StepResult r = train_step(run, step);
    run.consumed += run.batch;  // the data position moves on skipped steps too
    const double step_seconds = seconds_since(t0);
    run.train_seconds += step_seconds;
    run.window_seconds += step_seconds;
    run.window_tokens += run.batch * run.c.seq_len;
    report_step(run, step, r);
    if (run.logs_at(step)) log_step(run, step, r);
    if (run.evaluates_at(step)) log_evaluation(run, step);
    if (run.checkpoints_at(step, r) && checkpoint(run, step, r)) {
      comm.barrier();
      return 0;
    }
  }
  print_run_summary(run);
  comm.barrier();
  return 0;
}

int run_eval(const RunConfig& config_in, Communicator& comm) {
  Session s(config_in, comm);
  s.start_runtime();
  SafetensorsFile ckpt;
  agree_on_setup(comm, [&] {
    ckpt = s.open_checkpoint();
    MPT_INPUT_CHECK(s.config.global_batch % comm.size() == 0,
                    "--global-batch {} is not divisible by {} ranks", s.config.global_batch, comm.size());
    about_files([&] {
      s.data = std::make_unique<Dataset>(Dataset::load(s.config.data, s.config.val_fraction));
      s.data->check_sequence_length(s.config.seq_len, true);
      MPT_INPUT_CHECK(checkpoint_int(ckpt, "vocab_size") == s.data->vocab_size(),
                      "checkpoint {}: vocab_size {} but --data {} has vocabulary {}", ckpt.path,
                      checkpoint_int(ckpt, "vocab_size"), s.config.data, s.data->vocab_size());
    });
    s.build(s.data->vocab_size());
    s.tokenizer = open_tokenizer(s.config, s.config.data, s.data->vocab_size());
    about_files([&] { restore_checkpoint(*s.engine, ckpt); });
  });
  const Session::Evaluation val = s.evaluate();
  if (comm.rank() == 0) {
    std::printf("val_loss %.9g\n", val.loss);
    nlohmann::json j = {{"checkpoint", s.config.checkpoint},
                        {"val_loss", val.loss},
                        {"eval_batches", s.config.eval_batches},
                        {"global_batch", s.config.global_batch},
                        {"precision", s.config.precision}};
    if (std::isfinite(val.loss_per_byte)) j["val_loss_per_byte"] = val.loss_per_byte;
    std::printf("%s\n", j.dump().c_str());
  }
  return 0;
}

int run_export(const RunConfig& config_in, Communicator& comm) {
  Session s(config_in, comm);
  SafetensorsFile ckpt;
  std::vector<std::vector<float>> weights;
  GPTConfig model;
  std::string tokenizer_json;
  agree_on_setup(comm, [&] {
    ckpt = s.open_checkpoint();
    about_files([&] {
      model = s.config.model_config(checkpoint_int(ckpt, "vocab_size"));
      for (const TensorSpec& spec : gpt_tensors(model)) {
        const LoadedTensor& t = ckpt.at("master." + spec.name);
        MPT_INPUT_CHECK(t.shape == spec.shape,
                        "checkpoint {}: tensor 'master.{}' has another shape than its model", ckpt.path,
                        spec.name);
        weights.push_back(t.as<float>("master." + spec.name));
      }
      // --tokenizer, else the tokenizer.json beside the shards the checkpoint was trained on.
      RunConfig with = s.config;
      if (with.tokenizer.empty() && model.vocab_size != Dataset::kTextVocabSize)
        with.tokenizer = tokenizer_beside(trained_on(ckpt));
      if (!with.tokenizer.empty()) {
        (void)open_tokenizer(with, "", model.vocab_size);  // a byte-level tokenizer of the model's size
        std::ifstream in(with.tokenizer, std::ios::binary);
        tokenizer_json.assign(std::istreambuf_iterator<char>(in), {});
        MPT_INPUT_CHECK(
            tokenizer_json.find_first_not_of(" \t\r\n") != std::string::npos &&
                tokenizer_json[tokenizer_json.find_first_not_of(" \t\r\n")] == '{',
            "--tokenizer {}: export copies a tokenizer.json (transformers does not read llm.c's .bin)",
            with.tokenizer);
      } else if (model.vocab_size == Dataset::kTextVocabSize) {
        tokenizer_json = byte_level_tokenizer_json();
      }
    });
  });
  if (comm.rank() == 0) {
    export_hf(model, weights, s.config.out,
              s.config.export_dtype == "fp16"   ? DType::f16
              : s.config.export_dtype == "bf16" ? DType::bf16
                                                : DType::f32,
              tokenizer_json);
    std::printf("exported %s -> %s (config.json, model.safetensors%s; %s)\n", ckpt.path.c_str(),
                s.config.out.c_str(), tokenizer_json.empty() ? "" : ", tokenizer.json",
                s.config.export_dtype.c_str());
  }
  comm.barrier();
  return 0;
}

int run_sample(const RunConfig& config_in, Communicator& comm) {
  Session s(config_in, comm);
  s.start_runtime();
  SafetensorsFile ckpt;
  agree_on_setup(comm, [&] {
    ckpt = s.open_checkpoint();
    s.build(about_files([&] { return checkpoint_int(ckpt, "vocab_size"); }));
    about_files([&] { restore_checkpoint(*s.engine, ckpt); });
    if (s.model_config.vocab_size != Dataset::kTextVocabSize)
      s.tokenizer = open_tokenizer(s.config, trained_on(ckpt), s.model_config.vocab_size);
  });
  if (comm.rank() != 0) return 0;
  const bool text = s.model_config.vocab_size == 256;
  std::vector<int32_t> prompt;
  if (text) {
    for (unsigned char ch : s.config.prompt) prompt.push_back(ch);
  } else {
    std::istringstream in(s.config.prompt);
    for (std::string word; in >> word;) {
      int64_t id = -1;
      const auto [end, ec] = std::from_chars(word.data(), word.data() + word.size(), id);
      MPT_INPUT_CHECK(ec == std::errc() && end == word.data() + word.size(),
                      "--prompt: '{}' is not a token id (shard checkpoints take ids separated by spaces)",
                      word);
      MPT_INPUT_CHECK(id >= 0 && id < s.model_config.vocab_size, "--prompt: token {} outside [0, {})", id,
                      s.model_config.vocab_size);
      prompt.push_back(static_cast<int32_t>(id));
    }
  }
  std::mt19937_64 rng(s.config.seed);
  const auto out = s.generate(prompt, s.config.sample_tokens, s.config.temperature, rng);
  std::string printed;
  if (text) {
    printed.assign(s.config.prompt);
    for (int32_t t : out) printed.push_back(static_cast<char>(t));
  } else if (s.tokenizer) {
    printed = s.tokenizer->decode(prompt.data(), static_cast<int64_t>(prompt.size())) +
              s.tokenizer->decode(out.data(), static_cast<int64_t>(out.size()));
  } else {
    for (int32_t t : out) printed += fmt::format("{} ", t);
  }
  std::printf("%s\n", printed.c_str());
  return 0;
}

}  // namespace mpt
