// The GPT model against an independent PyTorch implementation (tests/reference/gpt_reference.py) in FP32:
// same weights, same batch -> logits, loss (1e-5 relative) and every parameter gradient (1e-4 relative in
// max-norm); then the losses of 10 AdamW steps on that batch through the mixed-precision engine (1e-4
// relative). Needs Debian's python3-torch (launch/setup.sh installs it); never skipped.
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "mptrain/comm_mpi.hpp"
#include "mptrain/engine.hpp"
#include "mptrain/model.hpp"
#include "mptrain/safetensors.hpp"

namespace mpt {
namespace {

std::vector<float> unpadded_tensor(const ParamLayout& layout, const float* flat, size_t index) {
  const TensorPlacement& t = layout.tensors()[index];
  return std::vector<float>(flat + t.offset, flat + t.offset + t.spec.num_elements());
}

double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, static_cast<double>(std::abs(x)));
  return m;
}

TEST(GptReference, MatchesPyTorchLogitsLossGradientsAndTenAdamWSteps) {
  GPTConfig cfg;
  cfg.vocab_size = 61;  // padded to 128: the padding columns are exercised
  cfg.max_seq_len = 16;
  cfg.num_layers = 2;
  cfg.num_heads = 3;
  cfg.channels = 24;
  const int64_t B = 3, T = 11;
  const int steps = 10;

  MpiCommunicator self(MPI_COMM_SELF);
  auto backend = make_cpu_backend();
  EngineConfig ec;
  ec.dtype = DType::f32;
  ec.adamw.lr = 3e-3f;
  ec.adamw.beta1 = 0.9f;
  ec.adamw.beta2 = 0.95f;
  ec.adamw.eps = 1e-8f;
  ec.adamw.weight_decay = 0.1f;
  MixedPrecisionEngine engine(gpt_tensors(cfg), ec, self, *backend);
  GPT model(cfg, engine.layout(), *backend, DType::f32);

  // DESIGN.md's initialisation, with biases and LayerNorm parameters perturbed so their gradients are
  // generic.
  std::vector<float> values = gpt_init(cfg, 1337);
  std::mt19937 rng(7);
  std::normal_distribution<float> noise(0.0f, 0.05f);
  size_t at = 0;
  for (const TensorPlacement& t : engine.layout().tensors()) {
    const bool perturb = t.spec.name.ends_with(".bias") || t.spec.name.find("ln_") != std::string::npos;
    for (size_t i = 0; i < t.spec.num_elements(); ++i, ++at)
      if (perturb) values[at] += noise(rng);
  }
  engine.set_parameters(values);
  std::vector<int32_t> tokens(B * T), targets(B * T);
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(cfg.vocab_size - 1));
  for (auto& x : tokens) x = token(rng);
  for (auto& x : targets) x = token(rng);

  // mptrain: logits (plain forward), then loss and gradients (forward with backward_factor 1, backward).
  const float* params = static_cast<const float*>(engine.params());
  model.forward(params, tokens.data(), targets.data(), B, T);
  const auto* logits_padded = static_cast<const float*>(model.logits());
  std::vector<float> logits;
  const int64_t Vp = cfg.padded_vocab_size();
  for (int64_t r = 0; r < B * T; ++r)
    for (int64_t j = 0; j < cfg.vocab_size; ++j) logits.push_back(logits_padded[r * Vp + j]);
  engine.zero_grads();
  const float loss = model.forward(params, tokens.data(), targets.data(), B, T, 1.0f);
  model.backward(params, engine.grads());

  // Hand the same weights and batch to PyTorch.
  const auto dir = std::filesystem::temp_directory_path() / ("mptrain_reference_" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  const std::string input = (dir / "input.safetensors").string();
  const std::string output = (dir / "output.safetensors").string();
  std::vector<std::vector<float>> weights;
  std::vector<TensorToWrite> to_write;
  for (size_t k = 0; k < engine.layout().tensors().size(); ++k)
    weights.push_back(unpadded_tensor(engine.layout(), params, k));
  for (size_t k = 0; k < weights.size(); ++k) {
    const TensorSpec& s = engine.layout().tensors()[k].spec;
    to_write.push_back({s.name, DType::f32, s.shape, weights[k].data()});
  }
  to_write.push_back({"tokens", DType::i32, {B, T}, tokens.data()});
  to_write.push_back({"targets", DType::i32, {B, T}, targets.data()});
  write_safetensors(input, to_write,
                    {{"vocab_size", std::to_string(cfg.vocab_size)},
                     {"num_layers", std::to_string(cfg.num_layers)},
                     {"num_heads", std::to_string(cfg.num_heads)},
                     {"channels", std::to_string(cfg.channels)},
                     {"steps", std::to_string(steps)},
                     {"lr", fmt::format("{}", ec.adamw.lr)},
                     {"beta1", fmt::format("{}", ec.adamw.beta1)},
                     {"beta2", fmt::format("{}", ec.adamw.beta2)},
                     {"eps", fmt::format("{}", ec.adamw.eps)},
                     {"weight_decay", fmt::format("{}", ec.adamw.weight_decay)}});
  const std::string command = fmt::format("'{}' '{}' --input '{}' --output '{}'", MPT_REFERENCE_PYTHON,
                                          MPT_REFERENCE_SCRIPT, input, output);
  const int rc = std::system(command.c_str());
  ASSERT_EQ(rc, 0) << "the PyTorch reference failed (is python3-torch installed? run launch/setup.sh): "
                   << command;
  const SafetensorsFile ref = read_safetensors(output);

  const double ref_loss = ref.at("loss").as<float>("loss")[0];
  EXPECT_NEAR(loss, ref_loss, 1e-5 * std::abs(ref_loss)) << "loss";
  const auto ref_logits = ref.at("logits").as<float>("logits");
  ASSERT_EQ(ref_logits.size(), logits.size());
  double logit_diff = 0;
  for (size_t i = 0; i < logits.size(); ++i)
    logit_diff = std::max(logit_diff, std::abs(static_cast<double>(logits[i]) - ref_logits[i]));
  EXPECT_LE(logit_diff, 1e-5 * max_abs(ref_logits)) << "logits";

  const auto* grads = static_cast<const float*>(engine.grads());
  double worst = 0;
  std::string worst_name;
  for (size_t k = 0; k < engine.layout().tensors().size(); ++k) {
    const std::string& name = engine.layout().tensors()[k].spec.name;
    const auto ours = unpadded_tensor(engine.layout(), grads, k);
    const auto theirs = ref.at("grad." + name).as<float>(name);
    ASSERT_EQ(ours.size(), theirs.size()) << name;
    double diff = 0;
    for (size_t i = 0; i < ours.size(); ++i)
      diff = std::max(diff, std::abs(static_cast<double>(ours[i]) - theirs[i]));
    const double scale = max_abs(theirs);
    const double relative = scale > 0 ? diff / scale : diff;
    EXPECT_LE(relative, 1e-4) << "gradient of " << name << " (max |ref| " << scale << ")";
    std::printf("  grad %-26s max-norm relative difference %.3g\n", name.c_str(), relative);
    if (relative > worst) {
      worst = relative;
      worst_name = name;
    }
  }
  std::printf("  loss %.9g vs %.9g; logits max diff %.3g; worst gradient %s %.3g\n", loss, ref_loss,
              logit_diff, worst_name.c_str(), worst);

  // Ten AdamW steps on the same batch, then the loss once more.
  const auto ref_steps = ref.at("step_losses").as<double>("step_losses");
  ASSERT_EQ(ref_steps.size(), static_cast<size_t>(steps + 1));
  for (int s = 0; s <= steps; ++s) {
    float step_loss;
    if (s < steps) {
      engine.zero_grads();
      step_loss = model.forward(engine.params(), tokens.data(), targets.data(), B, T, 1.0f);
      model.backward(engine.params(), engine.grads());
      ASSERT_FALSE(engine.step().skipped);
    } else {
      step_loss = model.forward(engine.params(), tokens.data(), targets.data(), B, T);
    }
    EXPECT_NEAR(step_loss, ref_steps[s], 1e-4 * std::abs(ref_steps[s])) << "loss before step " << s;
  }
  std::printf("  loss after %d AdamW steps: %.9g (PyTorch %.9g)\n", steps,
              model.forward(engine.params(), tokens.data(), targets.data(), B, T), ref_steps.back());
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace mpt
