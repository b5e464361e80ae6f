// GPT model tests on the CPU backend: config validation, initialisation, input checks, gradient accumulation
// equivalence, bitwise determinism, activation memory reuse, and the fp16/bf16 model against fp32.
#include <cmath>
#include <cstring>
#include <random>
#include <set>
#include <vector>

#include <gtest/gtest.h>
#include <omp.h>

#include "mptrain/error.hpp"
#include "mptrain/model.hpp"
#include "mptrain/random.hpp"

namespace mpt {
namespace {

GPTConfig tiny() {
  GPTConfig c;
  c.vocab_size = 37;
  c.max_seq_len = 9;
  c.num_layers = 2;
  c.num_heads = 3;
  c.channels = 12;
  return c;
}

/// A model with its flat parameter and gradient buffers (one rank, no engine).
struct ModelSetup {
  GPTConfig config;
  DType dtype;
  std::unique_ptr<Backend> backend = make_cpu_backend();
  ParamLayout layout;
  Buffer params, grads;
  std::unique_ptr<GPT> model;

  ModelSetup(const GPTConfig& c, DType dt, uint64_t seed = 42, Recompute recompute = Recompute::none)
      : config(c), dtype(dt), layout(gpt_tensors(c), LayoutOptions{}, 1) {
    const size_t es = dtype_size(dt);
    params = backend->allocate(layout.padded_elements() * es);
    grads = backend->allocate(layout.padded_elements() * es);
    const auto values = gpt_init(c, seed);
    size_t at = 0;
    dispatch_float_dtype(dt, [&]<typename T>() {
      for (const TensorPlacement& t : layout.tensors())
        for (size_t i = 0; i < t.spec.num_elements(); ++i)
          params.as<T>()[t.offset + i] = from_float<T>(values[at++]);
    });
    model = std::make_unique<GPT>(c, layout, *backend, dt, recompute);
  }
  std::vector<float> grads_as_float() const {
    std::vector<float> out;
    dispatch_float_dtype(dtype, [&]<typename T>() {
      for (const TensorPlacement& t : layout.tensors())
        for (size_t i = 0; i < t.spec.num_elements(); ++i)
          out.push_back(to_float(grads.as<T>()[t.offset + i]));
    });
    return out;
  }
  void zero_grads() { backend->fill_zero(grads.data(), grads.num_bytes()); }
};

std::vector<int32_t> random_tokens(size_t n, int64_t V, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = static_cast<int32_t>(rng() % static_cast<uint32_t>(V));
  return t;
}

double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, static_cast<double>(std::abs(x)));
  return m;
}

TEST(GptConfig, RejectsBadShapesWithClearErrors) {
  auto expect_error = [](GPTConfig c, const std::string& needle) {
    try {
      c.validate();
      ADD_FAILURE() << "no error for " << needle;
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  GPTConfig c = tiny();
  c.num_heads = 5;
  expect_error(c, "num_heads (5) must divide channels (12)");
  c = tiny();
  c.channels = 0;
  expect_error(c, "channels");
  c = tiny();
  c.num_layers = -1;
  expect_error(c, "num_layers");
  c = tiny();
  c.vocab_size = 0;
  expect_error(c, "vocab_size");
  c = tiny();
  c.max_seq_len = 0;
  expect_error(c, "max_seq_len");
  EXPECT_EQ(tiny().padded_vocab_size(), 128);
  GPTConfig gpt2;
  gpt2.vocab_size = 50257;
  EXPECT_EQ(gpt2.padded_vocab_size(), 50304);
}

TEST(GptInit, FollowsTheDesign) {
  GPTConfig c = tiny();
  c.channels = 48;
  c.num_heads = 4;
  c.num_layers = 3;
  const auto specs = gpt_tensors(c);
  ASSERT_EQ(specs.size(), 2 + 12 * 3 + 2u);
  const auto v = gpt_init(c, 5);
  EXPECT_EQ(v, gpt_init(c, 5));
  EXPECT_NE(v, gpt_init(c, 6));
  size_t at = 0;
  for (const TensorSpec& t : specs) {
    const size_t n = t.num_elements();
    double sum = 0, sq = 0;
    for (size_t i = 0; i < n; ++i) {
      sum += v[at + i];
      sq += static_cast<double>(v[at + i]) * v[at + i];
    }
    if (t.name.ends_with(".bias")) {
      EXPECT_EQ(sq, 0.0) << t.name;
    } else if (t.name.ends_with("ln_1.weight") || t.name.ends_with("ln_2.weight") ||
               t.name == "ln_f.weight") {
      EXPECT_EQ(sum, static_cast<double>(n)) << t.name;
    } else {
      size_t real = n;
      if (t.name == "wte.weight") {
        real = static_cast<size_t>(c.vocab_size * c.channels);
        for (size_t i = real; i < n; ++i) EXPECT_EQ(v[at + i], 0.0f) << "wte padding row";
      }
      const double expected = t.name.ends_with("c_proj.weight") ? 0.02 / std::sqrt(6.0) : 0.02;
      EXPECT_NEAR(std::sqrt(sq / static_cast<double>(real)), expected, 0.15 * expected) << t.name;
      EXPECT_EQ(t.decay, true) << t.name;
    }
    at += n;
  }
}

// Random123's known-answer vectors for Philox4x32-10 (kat_vectors: counter, key -> output).
TEST(Philox, MatchesTheKnownAnswers) {
  using W4 = std::array<uint32_t, 4>;
  EXPECT_EQ(philox4x32_10({0, 0, 0, 0}, {0, 0}), (W4{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}));
  EXPECT_EQ(philox4x32_10({~0u, ~0u, ~0u, ~0u}, {~0u, ~0u}),
            (W4{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}));
  EXPECT_EQ(philox4x32_10({0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, {0xa4093822u, 0x299f31d0u}),
            (W4{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}));
}

TEST(GptInit, SameValuesAtAnyThreadCount) {
  GPTConfig c = tiny();
  c.channels = 64;
  c.num_heads = 4;
  c.num_layers = 2;
  c.vocab_size = 301;  // padding rows and a tensor size that is not a multiple of 4
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const auto one = gpt_init(c, 11);
  for (int n : {2, 3, 7}) {
    omp_set_num_threads(n);
    EXPECT_EQ(gpt_init(c, 11), one) << n << " threads";
  }
  omp_set_num_threads(threads);
}

TEST(GptInit, AValueDependsOnlyOnSeedTensorAndIndex) {
  // Two models that share a tensor name but not its position or size: wte's first rows are equal only when
  // the stream (seed, tensor 0) and the index agree, whatever the vocabulary size.
  GPTConfig a = tiny(), b = tiny();
  b.vocab_size = a.vocab_size + 5;
  const auto va = gpt_init(a, 3), vb = gpt_init(b, 3);
  const size_t first_rows = static_cast<size_t>(a.vocab_size * a.channels);
  for (size_t i = 0; i < first_rows; ++i) ASSERT_EQ(va[i], vb[i]) << i;
  EXPECT_NE(gpt_init(a, 4)[0], va[0]);
}

TEST(GptForward, RejectsBadInput) {
  ModelSetup s(tiny(), DType::f32);
  auto tokens = random_tokens(2 * 9, 37, 1);
  EXPECT_THROW(s.model->forward(s.params.data(), tokens.data(), tokens.data(), 2, 10), InputError);
  EXPECT_THROW(s.model->forward(s.params.data(), tokens.data(), tokens.data(), 0, 9), InputError);
  tokens[5] = 37;
  try {
    s.model->forward(s.params.data(), tokens.data(), nullptr, 2, 9);
    ADD_FAILURE() << "no error for a token >= vocab";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("token 37 at position 5"), std::string::npos) << e.what();
  }
  EXPECT_THROW(s.model->backward(s.params.data(), s.grads.data()), Error);  // no forward prepared a backward
}

// K micro-batches of B sequences with factor 1/K give the gradients of one batch of K*B with factor 1.
TEST(GptBackward, GradientAccumulationEqualsOneLargeBatch) {
  const int64_t K = 3, B = 2, T = 9;
  ModelSetup big(tiny(), DType::f32), small(tiny(), DType::f32);
  const auto tokens = random_tokens(K * B * T, 37, 2), targets = random_tokens(K * B * T, 37, 3);
  big.zero_grads();
  const float big_loss = big.model->forward(big.params.data(), tokens.data(), targets.data(), K * B, T, 1.0f);
  big.model->backward(big.params.data(), big.grads.data());
  small.zero_grads();
  double mean = 0;
  for (int64_t k = 0; k < K; ++k) {
    mean += small.model->forward(small.params.data(), tokens.data() + k * B * T, targets.data() + k * B * T,
                                 B, T, 1.0f / K) /
            K;
    small.model->backward(small.params.data(), small.grads.data());
  }
  EXPECT_NEAR(mean, big_loss, 1e-6 * big_loss);
  const auto a = big.grads_as_float(), b = small.grads_as_float();
  double diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff = std::max(diff, std::abs(static_cast<double>(a[i]) - b[i]));
  EXPECT_LE(diff, 1e-5 * max_abs(a));
}

// Same binary, same thread count, same seed: bitwise identical loss and gradients, in every dtype.
TEST(GptBackward, TwoRunsAreBitwiseIdentical) {
  for (DType dt : {DType::f32, DType::f16, DType::bf16}) {
    const auto tokens = random_tokens(4 * 9, 37, 4), targets = random_tokens(4 * 9, 37, 5);
    std::vector<float> losses;
    std::vector<std::vector<float>> grads;
    for (int run = 0; run < 2; ++run) {
      ModelSetup s(tiny(), dt);
      s.zero_grads();
      losses.push_back(s.model->forward(s.params.data(), tokens.data(), targets.data(), 4, 9, 256.0f));
      s.model->backward(s.params.data(), s.grads.data());
      grads.push_back(s.grads_as_float());
    }
    EXPECT_EQ(std::memcmp(&losses[0], &losses[1], sizeof(float)), 0) << dtype_name(dt);
    EXPECT_EQ(std::memcmp(grads[0].data(), grads[1].data(), grads[0].size() * sizeof(float)), 0)
        << dtype_name(dt);
  }
}

// Activation memory is allocated once per (B, T) and reused.
TEST(GptForward, ActivationsAllocatedOncePerShape) {
  ModelSetup s(tiny(), DType::f16);
  const auto tokens = random_tokens(2 * 9, 37, 6);
  s.model->forward(s.params.data(), tokens.data(), tokens.data(), 2, 9, 1.0f);
  s.model->backward(s.params.data(), s.grads.data());
  const size_t in_use = s.backend->bytes_in_use();
  const size_t activations = s.model->activation_bytes();
  EXPECT_GT(activations, 0u);
  for (int i = 0; i < 3; ++i) {
    s.model->forward(s.params.data(), tokens.data(), tokens.data(), 2, 9, 1.0f);
    s.model->backward(s.params.data(), s.grads.data());
    EXPECT_EQ(s.backend->bytes_in_use(), in_use);
  }
  s.model->forward(s.params.data(), tokens.data(), tokens.data(), 1, 7);  // a new shape replaces the set
  EXPECT_LT(s.model->activation_bytes(), activations);
}

// fp16 and bf16 models track the fp32 one; fp16 gradients carry the factor (loss scale).
TEST(GptMixedPrecision, HalfAndBf16TrackFp32) {
  const auto tokens = random_tokens(2 * 9, 37, 8), targets = random_tokens(2 * 9, 37, 9);
  ModelSetup ref(tiny(), DType::f32);
  ref.zero_grads();
  const float ref_loss = ref.model->forward(ref.params.data(), tokens.data(), targets.data(), 2, 9, 1.0f);
  ref.model->backward(ref.params.data(), ref.grads.data());
  const auto g32 = ref.grads_as_float();
  for (auto [dt, rel] : {std::pair{DType::f16, 1e-2}, std::pair{DType::bf16, 5e-2}}) {
    ModelSetup s(tiny(), dt);
    s.zero_grads();
    const float scale = dt == DType::f16 ? 1024.0f : 1.0f;
    const float loss = s.model->forward(s.params.data(), tokens.data(), targets.data(), 2, 9, scale);
    s.model->backward(s.params.data(), s.grads.data());
    EXPECT_NEAR(loss, ref_loss, rel * ref_loss) << dtype_name(dt);
    const auto g = s.grads_as_float();
    double diff = 0;
    for (size_t i = 0; i < g.size(); ++i)
      diff = std::max(diff, std::abs(g[i] / scale - static_cast<double>(g32[i])));
    EXPECT_LE(diff, 10 * rel * max_abs(g32)) << dtype_name(dt);
  }
}

// on_grad_done fires once per tensor per backward, ln_f first, layers from the last down, wpe and the tied
// wte last, and each tensor's gradient is already final when its index is reported (the snapshot taken in the
// callback equals the gradient after backward, bitwise), over two accumulated micro-batches.
TEST(GptBackward, OnGradDoneReportsEachTensorOnceWithItsFinalGradient) {
  ModelSetup s(tiny(), DType::f16);
  const auto specs = gpt_tensors(s.config);
  const size_t es = dtype_size(s.dtype);
  s.zero_grads();
  for (int micro = 0; micro < 2; ++micro) {
    const auto tokens = random_tokens(2 * 9, 37, 10 + micro), targets = random_tokens(2 * 9, 37, 20 + micro);
    s.model->forward(s.params.data(), tokens.data(), targets.data(), 2, 9, 512.0f);
    std::vector<size_t> order;
    std::vector<std::vector<std::byte>> snapshot(specs.size());
    s.model->backward(s.params.data(), s.grads.data(), [&](size_t index) {
      order.push_back(index);
      const TensorPlacement& t = s.layout.tensors()[index];
      const auto* g = static_cast<const std::byte*>(s.grads.data()) + t.offset * es;
      snapshot[index].assign(g, g + t.spec.num_elements() * es);
    });
    ASSERT_EQ(order.size(), specs.size());
    EXPECT_EQ(std::set<size_t>(order.begin(), order.end()).size(), specs.size()) << "a tensor reported twice";
    EXPECT_EQ(specs[order.front()].name, "ln_f.weight");
    EXPECT_EQ(specs[order[order.size() - 2]].name, "wpe.weight");
    EXPECT_EQ(specs[order.back()].name, "wte.weight");
    // Layer tensors arrive layer by layer from the last: their registration index never increases by a layer.
    for (size_t k = 3; k + 2 < order.size(); ++k)
      EXPECT_LE((order[k] - 2) / 12, (order[k - 1] - 2) / 12) << specs[order[k]].name;
    for (size_t index = 0; index < specs.size(); ++index) {
      const TensorPlacement& t = s.layout.tensors()[index];
      const auto* g = static_cast<const std::byte*>(s.grads.data()) + t.offset * es;
      ASSERT_EQ(std::memcmp(snapshot[index].data(), g, snapshot[index].size()), 0)
          << specs[index].name << " changed after it was reported (micro-batch " << micro << ")";
    }
  }
}

// The loss scale read from backend memory gives the gradients of the same scale passed as a host factor
// (bitwise for a power of two); forward_accumulate's loss sum equals forward()'s loss without a read-back.
TEST(GptForward, DeviceLossScaleAndAccumulatedLoss) {
  ModelSetup host(tiny(), DType::f16), device(tiny(), DType::f16);
  const auto tokens = random_tokens(3 * 9, 37, 7), targets = random_tokens(3 * 9, 37, 8);
  Buffer scale = device.backend->allocate(sizeof(float));
  *scale.as<float>() = 1024.0f;  // CPU backend: backend memory is host memory
  host.zero_grads();
  device.zero_grads();
  const float loss = host.model->forward(host.params.data(), tokens.data(), targets.data(), 3, 9, 1024.0f);
  host.model->backward(host.params.data(), host.grads.data());
  device.model->forward_accumulate(device.params.data(), tokens.data(), targets.data(), 3, 9, 1.0f,
                                   scale.as<float>());
  device.model->backward(device.params.data(), device.grads.data());
  const auto a = host.grads_as_float(), b = device.grads_as_float();
  EXPECT_GT(max_abs(a), 0.0);
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0);
  device.model->forward_accumulate(device.params.data(), tokens.data(), targets.data(), 3, 9);
  const double sum = device.model->take_loss_sum();
  EXPECT_EQ(static_cast<float>(sum / (2 * 27)), loss);
  EXPECT_EQ(device.model->take_loss_sum(), 0.0) << "take_loss_sum clears the accumulator";
}

// ---- activation recomputation ----------------------------------------------------------------------------

/// The raw bytes of a backend buffer (CPU backend: host memory).
std::vector<unsigned char> raw(const Buffer& b) {
  const auto* p = b.as<unsigned char>();
  return std::vector<unsigned char>(p, p + b.num_bytes());
}

TEST(GptRecompute, GradientsBitwiseEqualToKeepingEverything) {
  GPTConfig c = tiny();
  c.num_layers = 3;
  const int64_t B = 2, T = 7;
  const auto tokens = random_tokens(static_cast<size_t>(B * T), c.vocab_size, 5);
  const auto targets = random_tokens(static_cast<size_t>(B * T), c.vocab_size, 6);
  const auto tokens2 = random_tokens(static_cast<size_t>(B * T), c.vocab_size, 7);
  const auto eval_tokens = random_tokens(static_cast<size_t>(3 * T), c.vocab_size, 8);
  for (DType dt : {DType::f32, DType::f16, DType::bf16}) {
    std::vector<unsigned char> reference;
    std::vector<size_t> reference_order;
    float reference_loss = 0;
    for (Recompute mode : {Recompute::none, Recompute::selective, Recompute::block}) {
      SCOPED_TRACE(fmt::format("{} {}", dtype_name(dt), recompute_name(mode)));
      ModelSetup m(c, dt, 42, mode);
      m.zero_grads();
      // Two accumulated micro-batches, the second after an evaluation forward of another shape (the
      // activations are reallocated in between) and the first loss-scaled like fp16 training.
      const float loss1 = m.model->forward(m.params.data(), tokens.data(), targets.data(), B, T, 512.0f);
      m.model->backward(m.params.data(), m.grads.data());
      m.model->forward(m.params.data(), eval_tokens.data(), nullptr, 3, T);
      m.model->forward(m.params.data(), tokens2.data(), targets.data(), B, T, 256.0f);
      std::vector<size_t> order;
      m.model->backward(m.params.data(), m.grads.data(), [&](size_t i) { order.push_back(i); });
      const auto grads = raw(m.grads);
      if (mode == Recompute::none) {
        reference = grads;
        reference_order = order;
        reference_loss = loss1;
        EXPECT_GT(max_abs(m.grads_as_float()), 0.0);
        continue;
      }
      EXPECT_EQ(loss1, reference_loss);
      EXPECT_EQ(order, reference_order);
      ASSERT_EQ(grads.size(), reference.size());
      size_t first_diff = grads.size();
      for (size_t i = 0; i < grads.size() && first_diff == grads.size(); ++i)
        if (grads[i] != reference[i]) first_diff = i;
      EXPECT_EQ(first_diff, grads.size()) << "first differing gradient byte " << first_diff;
    }
  }
}

TEST(GptRecompute, EveryTensorReportedOnceWithTheTiedWeightLast) {
  for (Recompute mode : {Recompute::none, Recompute::selective, Recompute::block}) {
    SCOPED_TRACE(recompute_name(mode));
    ModelSetup m(tiny(), DType::f32, 42, mode);
    const auto tokens = random_tokens(18, 37, 3);
    m.model->forward(m.params.data(), tokens.data(), tokens.data(), 2, 9, 1.0f);
    std::vector<size_t> order;
    // wte's gradient must be final when it is reported: snapshot it at that moment.
    std::vector<float> wte_at_report;
    m.model->backward(m.params.data(), m.grads.data(), [&](size_t i) {
      order.push_back(i);
      if (i == 0) wte_at_report = m.grads_as_float();
    });
    const size_t n = m.layout.tensors().size();
    ASSERT_EQ(order.size(), n);
    EXPECT_EQ(std::set<size_t>(order.begin(), order.end()).size(), n);
    EXPECT_EQ(order.back(), 0u);  // the tied embedding / LM head weight, after its last contribution
    EXPECT_EQ(wte_at_report, m.grads_as_float());
  }
}

TEST(GptRecompute, ActivationPlanMatchesTheAllocationAndShrinks) {
  GPTConfig c = tiny();
  c.num_layers = 4;
  const auto backend = make_cpu_backend();
  for (DType dt : {DType::f32, DType::f16}) {
    size_t previous = SIZE_MAX;
    for (Recompute mode : {Recompute::none, Recompute::selective, Recompute::block}) {
      SCOPED_TRACE(fmt::format("{} {}", dtype_name(dt), recompute_name(mode)));
      ModelSetup m(c, dt, 42, mode);
      const auto tokens = random_tokens(27, 37, 3);
      const size_t before = m.backend->bytes_in_use();
      m.model->forward(m.params.data(), tokens.data(), tokens.data(), 3, 9, 1.0f);
      m.model->backward(m.params.data(), m.grads.data());
      const size_t planned = GPT::activation_bytes_for(c, dt, mode, 3, 9, *backend);
      EXPECT_EQ(m.model->activation_bytes(), planned);
      EXPECT_EQ(m.backend->bytes_in_use() - before, planned);
      EXPECT_LT(planned, previous);
      previous = planned;
    }
  }
}

TEST(GptRecompute, ParsesTheModeNames) {
  for (Recompute mode : {Recompute::none, Recompute::selective, Recompute::block})
    EXPECT_EQ(parse_recompute(recompute_name(mode)), mode);
  try {
    parse_recompute("full");
    ADD_FAILURE() << "no error";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("--recompute"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("'full'"), std::string::npos);
  }
}

}  // namespace
}  // namespace mpt
