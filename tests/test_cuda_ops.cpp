// The CUDA backend (kernels/cuda/backend_cuda.cu) against the CPU backend: every model op on the same random
// inputs for fp32, fp16 and bf16, with odd sizes (rows 37, C 72, V 61 padded to 128, T 13, NH 3) and
// misaligned element offsets where the op allows them; matmul and both attention paths through the backend;
// the optimizer-side ops; and a whole GPT forward + backward (loss and every parameter gradient). Tolerances
// are dtype-aware (abs + rel * |ref|) and the first mismatch is printed with its index. Every test skips with
// "no CUDA device" where there is none (CI, the build machines).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <gtest/gtest.h>

#include "cuda_test_support.hpp"
#include "mptrain/backend.hpp"
#include "mptrain/cuda_ops.hpp"
#include "mptrain/cuda_raii.hpp"
#include "mptrain/error.hpp"
#include "mptrain/layout.hpp"
#include "mptrain/model.hpp"

namespace mpt {
namespace {

struct Tol {
  double abs;
  double rel;
};

/// Elementwise tolerance of one rounding in T (a few ulp: the two backends may round an FP32 value that
/// differs in its last bits to neighbouring T values).
template <typename T>
Tol elem_tol() {
  if constexpr (std::is_same_v<T, float>)
    return {5e-6, 1e-5};
  else if constexpr (std::is_same_v<T, half>)
    return {1e-4, 2e-3};
  else
    return {1e-3, 1.6e-2};
}

/// Tolerance of a reduction (sums over rows or columns in a different order, FP32).
template <typename T>
Tol sum_tol() {
  if constexpr (std::is_same_v<T, float>)
    return {1e-5, 1e-4};
  else if constexpr (std::is_same_v<T, half>)
    return {1e-3, 4e-3};
  else
    return {8e-3, 2e-2};
}

template <typename T>
double as_double(T x) {
  return static_cast<double>(to_float(x));
}
inline double as_double(double x) {
  return x;
}

/// Compares got with ref element by element; reports the first mismatch (index, both values) and the count.
template <typename T>
void expect_close(const std::vector<T>& got, const std::vector<T>& ref, Tol tol, const std::string& what) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = as_double(got[i]), r = as_double(ref[i]);
    const bool both_nan = std::isnan(g) && std::isnan(r);
    if (both_nan) continue;
    if (!(std::abs(g - r) <= tol.abs + tol.rel * std::abs(r))) {
      if (bad == 0) first = i;
      ++bad;
    }
  }
  if (bad) {
    ADD_FAILURE() << what << ": " << bad << " of " << got.size() << " elements differ; first at index "
                  << first << ": cuda " << as_double(got[first]) << " vs cpu " << as_double(ref[first])
                  << " (tolerance " << tol.abs << " + " << tol.rel << " * |ref|)";
  }
}

template <typename T>
std::vector<T> random_vector(size_t n, uint32_t seed, float scale = 1.0f, float shift = 0.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<T> v(n);
  for (T& x : v) x = from_float<T>(shift + scale * normal(rng));
  return v;
}

std::vector<int32_t> random_ints(size_t n, int32_t bound, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> v(n);
  for (auto& x : v) x = static_cast<int32_t>(rng() % static_cast<uint32_t>(bound));
  return v;
}

/// A host vector mirrored in CUDA backend memory.
template <typename E>
struct Mirror {
  std::vector<E> host;
  Buffer device;
  Mirror(Backend& cuda, std::vector<E> values) : host(std::move(values)) {
    device = cuda.allocate(host.size() * sizeof(E));
    cuda.copy_from_host(device.data(), host.data(), host.size() * sizeof(E));
  }
  E* dev(size_t offset = 0) const { return device.as<E>() + offset; }
  E* cpu(size_t offset = 0) { return host.data() + offset; }
  std::vector<E> download(Backend& cuda) const {
    std::vector<E> out(host.size());
    cuda.copy_to_host(out.data(), device.data(), host.size() * sizeof(E));
    return out;
  }
};

/// Test fixture: one CPU and one CUDA backend.
template <typename T>
class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda::device_count() == 0) return;
    cpu_backend = make_cpu_backend();
    gpu_backend = make_cuda_backend(0);
  }
  std::unique_ptr<Backend> cpu_backend, gpu_backend;
};

using FloatTypes = ::testing::Types<float, half, bf16>;
TYPED_TEST_SUITE(CudaOps, FloatTypes);

void CUDART_CB wait_for_flag(void* flag) {
  while (!static_cast<std::atomic<bool>*>(flag)->load()) std::this_thread::yield();
}

// An event behind a host function that waits for the test: the query says "not ready", and that answer is
// not left as the thread's last error for the next launch check to report.
TEST(CudaQuery, NotReadyIsNotLeftAsTheLastError) {
  MPT_REQUIRE_GPU();
  MPT_CUDA_CHECK(cudaSetDevice(0));
  cuda::Stream stream = cuda::Stream::create();
  cuda::Event done = cuda::Event::create(false);
  std::atomic<bool> release{false};
  MPT_CUDA_CHECK(cudaLaunchHostFunc(stream.get(), wait_for_flag, &release));
  MPT_CUDA_CHECK(cudaEventRecord(done.get(), stream.get()));
  const bool completed = cuda::query_completed(cudaEventQuery(done.get()), "cudaEventQuery");
  const cudaError_t last = cudaGetLastError();
  release = true;
  MPT_CUDA_CHECK(cudaStreamSynchronize(stream.get()));
  EXPECT_FALSE(completed);
  EXPECT_EQ(last, cudaSuccess) << cudaGetErrorString(last);
  EXPECT_TRUE(cuda::query_completed(cudaEventQuery(done.get()), "cudaEventQuery"));
}

TEST(CudaBackend, MemoryAccountingZeroingCopiesAndErrors) {
  MPT_REQUIRE_GPU();
  auto gpu = make_cuda_backend(0);
  EXPECT_EQ(gpu->name(), "cuda");
  EXPECT_NE(gpu->native_stream(), nullptr);
  EXPECT_EQ(gpu->bytes_in_use(), 0u);
  {
    Buffer a = gpu->allocate(1001);
    Buffer b = gpu->allocate(77);
    EXPECT_EQ(gpu->bytes_in_use(), 1078u);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(a.data()) % 256, 0u);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(b.data()) % 256, 0u);
    std::vector<unsigned char> host(1001, 0xff);
    gpu->copy_to_host(host.data(), a.data(), host.size());
    EXPECT_TRUE(std::all_of(host.begin(), host.end(), [](unsigned char c) { return c == 0; }));
    std::vector<unsigned char> pattern(1001);
    for (size_t i = 0; i < pattern.size(); ++i) pattern[i] = static_cast<unsigned char>(i * 7 + 1);
    gpu->copy_from_host(a.data(), pattern.data(), pattern.size());
    gpu->fill_zero(static_cast<unsigned char*>(a.data()) + 100, 50);
    gpu->copy_to_host(host.data(), a.data(), host.size());
    for (size_t i = 0; i < host.size(); ++i)
      ASSERT_EQ(host[i], (i >= 100 && i < 150) ? 0 : pattern[i]) << "byte " << i;
    a.reset();
    EXPECT_EQ(gpu->bytes_in_use(), 77u);
  }
  EXPECT_EQ(gpu->bytes_in_use(), 0u);
  // Far beyond any GPU: a clear mpt::Error naming the size, and the backend keeps working.
  const size_t huge = size_t{1} << 52;
  try {
    Buffer too_big = gpu->allocate(huge);
    ADD_FAILURE() << "no error allocating " << huge << " bytes";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(std::to_string(huge)), std::string::npos) << e.what();
  }
  Buffer after = gpu->allocate(16);
  gpu->synchronize();
  EXPECT_EQ(gpu->bytes_in_use(), 16u);
  EXPECT_GT(gpu->peak_flops(), 1e12);
}

TYPED_TEST(CudaOps, EmbeddingForwardBackwardWithRepeatedTokens) {
  MPT_REQUIRE_GPU();
  using T = TypeParam;
  Backend& cpu = *this->cpu_backend;
  Backend& gpu = *this->gpu_backend;
  const int64_t B = 3, T_ = 13, C = 72, V = 61;
  const DType dt = dtype_of<T>();
  // A small token range so that tokens repeat often (the scatter-add must sum every repeat).
  Mirror<int32_t> tokens(gpu, random_ints(B * T_, 7, 1));
  tokens.host[5] = 60;  // and one at the end of the vocabulary
  gpu.copy_from_host(tokens.dev(), tokens.cpu(), tokens.host.size() * sizeof(int32_t));
  const size_t off = 3;  // misaligned element offset of every float buffer
  Mirror<T> wte(gpu, random_vector<T>(off + V * C, 2));
  Mirror<T> wpe(gpu, random_vector<T>(off + T_ * C, 3));
  Mirror<T> out(gpu, std::vector<T>(off + B * T_ * C));
  cpu.embedding_forward(out.cpu(off), tokens.cpu(), wte.cpu(off), wpe.cpu(off), B, T_, C, dt);
  gpu.embedding_forward(out.dev(off), tokens.dev(), wte.dev(off), wpe.dev(off), B, T_, C, dt);
  expect_close(out.download(gpu), out.host, elem_tol<T>(), "embedding_forward out");

  Mirror<T> dout(gpu, random_vector<T>(off + B * T_ * C, 4));
  Mirror<T> dwte(gpu, random_vector<T>(off + V * C, 5, 0.1f));  // non-zero: the op accumulates
  Mirror<T> dwpe(gpu, random_vector<T>(off + T_ * C, 6, 0.1f));
  for (int rep = 0; rep < 2; ++rep) {  // twice: the second pass accumulates onto the first
    cpu.embedding_backward(dwte.cpu(off), dwpe.cpu(off), dout.cpu(off), tokens.cpu(), B, T_, C, dt);
    gpu.embedding_backward(dwte.dev(off), dwpe.dev(off), dout.dev(off), tokens.dev(), B, T_, C, dt);
  }
  expect_close(dwte.download(gpu), dwte.host, sum_tol<T>(), "embedding_backward dwte");
  expect_close(dwpe.download(gpu), dwpe.host, sum_tol<T>(), "embedding_backward dwpe");
  // Deterministic: the same inputs give bitwise the same gradient.
  Mirror<T> again(gpu, std::vector<T>(off + V * C));
  Mirror<T> wpe_scratch(gpu, std::vector<T>(off + T_ * C));
  Mirror<T> again2(gpu, std::vector<T>(off + V * C));
  gpu.embedding_backward(again.dev(off), wpe_scratch.dev(off), dout.dev(off), tokens.dev(), B, T_, C, dt);
  gpu.embedding_backward(again2.dev(off), wpe_scratch.dev(off), dout.dev(off), tokens.dev(), B, T_, C, dt);
  const auto a1 = again.download(gpu), a2 = again2.download(gpu);
  EXPECT_EQ(std::memcmp(a1.data(), a2.data(), a1.size() * sizeof(T)), 0);
}

TYPED_TEST(CudaOps, LayerNormForwardBackward) {
  MPT_REQUIRE_GPU();
  using T = TypeParam;
  Backend& cpu = *this->cpu_backend;
  Backend& gpu = *this->gpu_backend;
  const DType dt = dtype_of<T>();
  // 37 rows: one reduction block; 2000 rows: many blocks of the dweight/dbias partial sums.
  for (const int64_t rows : {int64_t{37}, int64_t{2000}}) {
    SCOPED_TRACE("rows " + std::to_string(rows));
    const int64_t C = 72;
    const size_t off = 1;
    Mirror<T> inp(gpu, random_vector<T>(off + rows * C, 10, 2.0f, 0.5f));
    Mirror<T> weight(gpu, random_vector<T>(off + C, 11, 0.3f, 1.0f));
    Mirror<T> bias(gpu, random_vector<T>(off + C, 12, 0.3f));
    Mirror<T> out(gpu, std::vector<T>(off + rows * C));
    Mirror<float> mean(gpu, std::vector<float>(rows)), rstd(gpu, std::vector<float>(rows));
    cpu.layernorm_forward(out.cpu(off), mean.cpu(), rstd.cpu(), inp.cpu(off), weight.cpu(off), bias.cpu(off),
                          rows, C, dt);
    gpu.layernorm_forward(out.dev(off), mean.dev(), rstd.dev(), inp.dev(off), weight.dev(off), bias.dev(off),
                          rows, C, dt);
    expect_close(out.download(gpu), out.host, sum_tol<T>(), "layernorm_forward out");
    expect_close(mean.download(gpu), mean.host, {1e-6, 1e-5}, "layernorm_forward mean");
    expect_close(rstd.download(gpu), rstd.host, {1e-6, 1e-5}, "layernorm_forward rstd");

    Mirror<T> dout(gpu, random_vector<T>(off + rows * C, 13));
    Mirror<T> dinp(gpu, random_vector<T>(off + rows * C, 14, 0.1f));
    Mirror<T> dweight(gpu, random_vector<T>(off + C, 15, 0.1f));
    Mirror<T> dbias(gpu, random_vector<T>(off + C, 16, 0.1f));
    // Both read the CPU's statistics, so only the backward is compared.
    gpu.copy_from_host(mean.dev(), mean.cpu(), mean.host.size() * sizeof(float));
    gpu.copy_from_host(rstd.dev(), rstd.cpu(), rstd.host.size() * sizeof(float));
    cpu.layernorm_backward(dinp.cpu(off), dweight.cpu(off), dbias.cpu(off), dout.cpu(off), inp.cpu(off),
                           weight.cpu(off), mean.cpu(), rstd.cpu(), rows, C, dt);
    gpu.layernorm_backward(dinp.dev(off), dweight.dev(off), dbias.dev(off), dout.dev(off), inp.dev(off),
                           weight.dev(off), mean.dev(), rstd.dev(), rows, C, dt);
    expect_close(dinp.download(gpu), dinp.host, sum_tol<T>(), "layernorm_backward dinp");
    // dweight/dbias sum `rows` terms of size ~1: scale the absolute part with sqrt(rows).
    const Tol t = sum_tol<T>();
    const Tol reduce{t.abs * std::sqrt(static_cast<double>(rows)), t.rel};
    expect_close(dweight.download(gpu), dweight.host, reduce, "layernorm_backward dweight");
    expect_close(dbias.download(gpu), dbias.host, reduce, "layernorm_backward dbias");
  }
}

TYPED_TEST(CudaOps, ElementwiseOps) {
  MPT_REQUIRE_GPU();
  using T = TypeParam;
  Backend& cpu = *this->cpu_backend;
  Backend& gpu = *this->gpu_backend;
  const DType dt = dtype_of<T>();
  const int64_t n = 1001;
  const size_t off = 1;
  Mirror<T> x(gpu, random_vector<T>(off + n, 20, 2.0f));
  Mirror<T> y(gpu, random_vector<T>(off + n, 21));

  Mirror<T> out(gpu, std::vector<T>(off + n));
  cpu.gelu_forward(out.cpu(off), x.cpu(off), n, dt);
  gpu.gelu_forward(out.dev(off), x.dev(off), n, dt);
  expect_close(out.download(gpu), out.host, elem_tol<T>(), "gelu_forward");

  Mirror<T> dinp(gpu, random_vector<T>(off + n, 22, 0.5f));
  cpu.gelu_backward(dinp.cpu(off), x.cpu(off), y.cpu(off), n, dt);
  gpu.gelu_backward(dinp.dev(off), x.dev(off), y.dev(off), n, dt);
  expect_close(dinp.download(gpu), dinp.host, elem_tol<T>(), "gelu_backward");

  Mirror<T> sum(gpu, std::vector<T>(off + n));
  cpu.residual_forward(sum.cpu(off), x.cpu(off), y.cpu(off), n, dt);
  gpu.residual_forward(sum.dev(off), x.dev(off), y.dev(off), n, dt);
  expect_close(sum.download(gpu), sum.host, elem_tol<T>(), "residual_forward");

  Mirror<T> acc(gpu, random_vector<T>(off + n, 23));
  cpu.accumulate(acc.cpu(off), x.cpu(off), n, dt);
  gpu.accumulate(acc.dev(off), x.dev(off), n, dt);
  expect_close(acc.download(gpu), acc.host, elem_tol<T>(), "accumulate");

  Mirror<float> acc32(gpu, random_vector<float>(off + n, 24));
  cpu.accumulate_f32(acc32.cpu(off), x.cpu(off), n, dt);
  gpu.accumulate_f32(acc32.dev(off), x.dev(off), n, dt);
  expect_close(acc32.download(gpu), acc32.host, {0.0, 0.0}, "accumulate_f32");  // one FP32 add: exact
}

TYPED_TEST(CudaOps, CrossEntropyFusedForwardBackward) {
  MPT_REQUIRE_GPU();
  using T = TypeParam;
  Backend& cpu = *this->cpu_backend;
  Backend& gpu = *this->gpu_backend;
  const DType dt = dtype_of<T>();
  struct Shape {
    int64_t rows, V, Vp;
  };
  // V 61 padded to 128 (fewer columns than threads), and 1000 padded to 1024 (several columns per thread).
  for (const Shape s : {Shape{37, 61, 128}, Shape{5, 1000, 1024}}) {
    SCOPED_TRACE("V " + std::to_string(s.V));
    const size_t n = static_cast<size_t>(s.rows * s.Vp);
    Mirror<T> logits(gpu, random_vector<T>(n, 30, 3.0f));
    Mirror<int32_t> targets(gpu, random_ints(s.rows, static_cast<int32_t>(s.V), 31));
    const float scale = 1024.0f;
    Mirror<float> d_scale(gpu, std::vector<float>{scale});
    const float dloss = 1.0f / static_cast<float>(s.rows);

    // Losses only.
    Mirror<float> losses(gpu, std::vector<float>(s.rows));
    cpu.crossentropy_forward_backward(nullptr, losses.cpu(), logits.cpu(), targets.cpu(), s.rows, s.V, s.Vp,
                                      0.0f, nullptr, dt);
    gpu.crossentropy_forward_backward(nullptr, losses.dev(), logits.dev(), targets.dev(), s.rows, s.V, s.Vp,
                                      0.0f, nullptr, dt);
    expect_close(losses.download(gpu), losses.host, {1e-5, 1e-5}, "losses");

    // Separate gradient buffer pre-filled with garbage: the padding must come back zero. Scale read from
    // backend memory (the CPU reads its host copy).
    Mirror<T> dlogits(gpu, random_vector<T>(n, 32, 5.0f));
    cpu.crossentropy_forward_backward(dlogits.cpu(), losses.cpu(), logits.cpu(), targets.cpu(), s.rows, s.V,
                                      s.Vp, dloss, d_scale.cpu(), dt);
    gpu.crossentropy_forward_backward(dlogits.dev(), losses.dev(), logits.dev(), targets.dev(), s.rows, s.V,
                                      s.Vp, dloss, d_scale.dev(), dt);
    const auto got = dlogits.download(gpu);
    const Tol e = elem_tol<T>();
    expect_close(got, dlogits.host, {e.abs * scale * dloss, e.rel}, "dlogits");
    for (int64_t r = 0; r < s.rows; ++r)
      for (int64_t j = s.V; j < s.Vp; ++j)
        ASSERT_EQ(as_double(got[static_cast<size_t>(r * s.Vp + j)]), 0.0) << "padding at " << r << ", " << j;
    expect_close(losses.download(gpu), losses.host, {1e-5, 1e-5}, "losses with dlogits");

    // In place (dlogits aliases logits), no scale pointer.
    Mirror<T> inplace(gpu, logits.host);
    cpu.crossentropy_forward_backward(inplace.cpu(), losses.cpu(), inplace.cpu(), targets.cpu(), s.rows, s.V,
                                      s.Vp, dloss, nullptr, dt);
    gpu.crossentropy_forward_backward(inplace.dev(), losses.dev(), inplace.dev(), targets.dev(), s.rows, s.V,
                                      s.Vp, dloss, nullptr, dt);
    expect_close(inplace.download(gpu), inplace.host, {e.abs * dloss, e.rel}, "dlogits in place");
    expect_close(losses.download(gpu), losses.host, {1e-5, 1e-5}, "losses in place");
  }
}

TYPED_TEST(CudaOps, MatmulThroughTheBackend) {
  MPT_REQUIRE_GPU();
  using T = TypeParam;
  Backend& cpu = *this->cpu_backend;
  Backend& gpu = *this->gpu_backend;
  const DType dt = dtype_of<T>();
  const int64_t rows = 37, IC = 72, OC = 40;
  Mirror<T> inp(gpu, random_vector<T>(rows * IC, 40));
  Mirror<T> weight(gpu, random_vector<T>(OC * IC, 41, 0.1f));
  Mirror<T> bias(gpu, random_vector<T>(OC, 42));
  const Tol t = sum_tol<T>();
  const Tol gemm{t.abs * std::sqrt(static_cast<double>(IC)), t.rel};
  for (const bool with_bias : {true, false}) {
    Mirror<T> out(gpu, std::vector<T>(rows * OC));
    cpu.matmul_forward(out.cpu(), inp.cpu(), weight.cpu(), with_bias ? bias.cpu() : nullptr, rows, IC, OC,
                       dt);
    gpu.matmul_forward(out.dev(), inp.dev(), weight.dev(), with_bias ? bias.dev() : nullptr, rows, IC, OC,
                       dt);
    expect_close(out.download(gpu), out.host, gemm, with_bias ? "matmul_forward bias" : "matmul_forward");
  }
  Mirror<T> dout(gpu, random_vector<T>(rows * OC, 43));
  Mirror<T> dinp(gpu, random_vector<T>(rows * IC, 44, 0.1f));
  Mirror<T> dweight(gpu, random_vector<T>(OC * IC, 45, 0.1f));
  Mirror<T> dbias(gpu, random_vector<T>(OC, 46, 0.1f));
  cpu.matmul_backward(dinp.cpu(), dweight.cpu(), dbias.cpu(), dout.cpu(), inp.cpu(), weight.cpu(), rows, IC,
                      OC, dt);
  gpu.matmul_backward(dinp.dev(), dweight.dev(), dbias.dev(), dout.dev(), inp.dev(), weight.dev(), rows, IC,
                      OC, dt);
  const Tol over_rows{t.abs * std::sqrt(static_cast<double>(rows)), t.rel};
  expect_close(dinp.download(gpu), dinp.host, gemm, "matmul_backward dinp");
  expect_close(dweight.download(gpu), dweight.host, over_rows, "matmul_backward dweight");
  expect_close(dbias.download(gpu), dbias.host, over_rows, "matmul_backward dbias");
}

/// Bitwise equality of two downloads (the fused CUDA ops against the CUDA op sequences they replace).
template <typename T>
void expect_same_bits(const std::vector<T>& got, const std::vector<T>& ref, const std::string& what) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  for (size_t i = 0; i < got.size(); ++i)
    if (std::memcmp(&got[i], &ref[i], sizeof(T)) != 0) {
      ADD_FAILURE() << what << ": first difference at index " << i << ": fused " << as_double(got[i])
                    << " vs unfused " << as_double(ref[i]);
      return;
    }
}

TYPED_TEST(CudaOps, FusedOpsAreTheUnfusedSequencesAndMatchCpu) {
  MPT_REQUIRE_GPU();
  using T = TypeParam;
  Backend& cpu = *this->cpu_backend;
  Backend& gpu = *this->gpu_backend;
  const DType dt = dtype_of<T>();
  const int64_t rows = 39, C = 37, H = 4 * C;  // T = 13, B = 3; odd channels
  const Tol t = sum_tol<T>();
  const Tol gemm{t.abs * std::sqrt(static_cast<double>(H)), t.rel};

  // residual + LayerNorm
  Mirror<T> a(gpu, random_vector<T>(rows * C, 90, 2.0f)), b(gpu, random_vector<T>(rows * C, 91));
  Mirror<T> lnw(gpu, random_vector<T>(C, 92, 0.2f, 1.0f)), lnb(gpu, random_vector<T>(C, 93, 0.2f));
  Mirror<T> res(gpu, std::vector<T>(rows * C)), ln(gpu, std::vector<T>(rows * C));
  Mirror<T> res_ref(gpu, std::vector<T>(rows * C)), ln_ref(gpu, std::vector<T>(rows * C));
  Mirror<float> mean(gpu, std::vector<float>(rows)), rstd(gpu, std::vector<float>(rows));
  Mirror<float> mean_ref(gpu, std::vector<float>(rows)), rstd_ref(gpu, std::vector<float>(rows));
  gpu.residual_layernorm_forward(res.dev(), ln.dev(), mean.dev(), rstd.dev(), a.dev(), b.dev(), lnw.dev(),
                                 lnb.dev(), rows, C, dt);
  gpu.residual_forward(res_ref.dev(), a.dev(), b.dev(), rows * C, dt);
  gpu.layernorm_forward(ln_ref.dev(), mean_ref.dev(), rstd_ref.dev(), res_ref.dev(), lnw.dev(), lnb.dev(),
                        rows, C, dt);
  expect_same_bits(res.download(gpu), res_ref.download(gpu), "residual_layernorm_forward residual");
  expect_same_bits(ln.download(gpu), ln_ref.download(gpu), "residual_layernorm_forward out");
  expect_same_bits(mean.download(gpu), mean_ref.download(gpu), "residual_layernorm_forward mean");
  expect_same_bits(rstd.download(gpu), rstd_ref.download(gpu), "residual_layernorm_forward rstd");
  cpu.residual_layernorm_forward(res.cpu(), ln.cpu(), mean.cpu(), rstd.cpu(), a.cpu(), b.cpu(), lnw.cpu(),
                                 lnb.cpu(), rows, C, dt);
  expect_close(res.download(gpu), res.host, elem_tol<T>(), "residual_layernorm_forward residual vs cpu");
  expect_close(ln.download(gpu), ln.host, sum_tol<T>(), "residual_layernorm_forward out vs cpu");

  // c_fc + GELU
  Mirror<T> w(gpu, random_vector<T>(H * C, 94, 0.2f)), bias(gpu, random_vector<T>(H, 95));
  Mirror<T> pre(gpu, std::vector<T>(rows * H)), act(gpu, std::vector<T>(rows * H));
  Mirror<T> pre_ref(gpu, std::vector<T>(rows * H)), act_ref(gpu, std::vector<T>(rows * H));
  gpu.matmul_gelu_forward(pre.dev(), act.dev(), ln.dev(), w.dev(), bias.dev(), rows, C, H, dt);
  gpu.matmul_forward(pre_ref.dev(), ln.dev(), w.dev(), bias.dev(), rows, C, H, dt);
  gpu.gelu_forward(act_ref.dev(), pre_ref.dev(), rows * H, dt);
  expect_same_bits(pre.download(gpu), pre_ref.download(gpu), "matmul_gelu_forward pre");
  expect_same_bits(act.download(gpu), act_ref.download(gpu), "matmul_gelu_forward out");
  ln.host = ln.download(gpu);  // the CPU reads the same inputs
  cpu.matmul_gelu_forward(pre.cpu(), act.cpu(), ln.cpu(), w.cpu(), bias.cpu(), rows, C, H, dt);
  expect_close(pre.download(gpu), pre.host, gemm, "matmul_gelu_forward pre vs cpu");

  // c_proj backward through the GELU, dpre over inp as the recompute modes use it
  act.host = act.download(gpu);
  pre.host = pre.download(gpu);
  Mirror<T> w2(gpu, random_vector<T>(C * H, 96, 0.1f)), dout(gpu, random_vector<T>(rows * C, 97, 4.0f));
  Mirror<T> dw(gpu, random_vector<T>(C * H, 98, 0.1f)), db(gpu, random_vector<T>(C, 99, 0.1f));
  Mirror<T> dw_ref(gpu, dw.host), db_ref(gpu, db.host);
  Mirror<T> dpre(gpu, act.host);  // overwritten; also the layer input it aliases
  Mirror<T> g(gpu, std::vector<T>(rows * H)), dpre_ref(gpu, std::vector<T>(rows * H));
  gpu.matmul_backward_gelu(dpre.dev(), dw.dev(), db.dev(), dout.dev(), dpre.dev(), w2.dev(), pre.dev(), rows,
                           H, C, dt);
  gpu.matmul_backward(g.dev(), dw_ref.dev(), db_ref.dev(), dout.dev(), act.dev(), w2.dev(), rows, H, C, dt);
  gpu.gelu_backward(dpre_ref.dev(), pre.dev(), g.dev(), rows * H, dt);
  expect_same_bits(dpre.download(gpu), dpre_ref.download(gpu), "matmul_backward_gelu dpre");
  expect_same_bits(dw.download(gpu), dw_ref.download(gpu), "matmul_backward_gelu dweight");
  expect_same_bits(db.download(gpu), db_ref.download(gpu), "matmul_backward_gelu dbias");
  cpu.matmul_backward_gelu(dpre.cpu(), dw.cpu(), db.cpu(), dout.cpu(), dpre.cpu(), w2.cpu(), pre.cpu(), rows,
                           H, C, dt);
  expect_close(dpre.download(gpu), dpre.host, gemm, "matmul_backward_gelu dpre vs cpu");
  const Tol over_rows{t.abs * std::sqrt(static_cast<double>(rows)), t.rel};
  expect_close(dw.download(gpu), dw.host, over_rows, "matmul_backward_gelu dweight vs cpu");
  expect_close(db.download(gpu), db.host, over_rows, "matmul_backward_gelu dbias vs cpu");
}

/// Sets MPTRAIN_ATTENTION for the lifetime of the object (the backend reads it when constructed).
struct ScopedAttentionEnv {
  explicit ScopedAttentionEnv(const char* value) {
    if (value)
      setenv("MPTRAIN_ATTENTION", value, 1);
    else
      unsetenv("MPTRAIN_ATTENTION");
  }
  ~ScopedAttentionEnv() { unsetenv("MPTRAIN_ATTENTION"); }
};

TYPED_TEST(CudaOps, AttentionBothPathsThroughTheBackend) {
  MPT_REQUIRE_GPU();
  using T = TypeParam;
  Backend& cpu = *this->cpu_backend;
  const DType dt = dtype_of<T>();
  const int64_t B = 2, T_ = 13, C = 72, NH = 3;
  const std::vector<T> qkv_host = random_vector<T>(B * T_ * 3 * C, 50);
  const std::vector<T> dout_host = random_vector<T>(B * T_ * C, 51);
  const std::vector<T> dqkv_init = random_vector<T>(B * T_ * 3 * C, 52, 0.1f);

  // CPU reference.
  std::vector<T> qkv = qkv_host, out(B * T_ * C), att(B * NH * T_ * T_), dqkv = dqkv_init;
  cpu.attention_forward(out.data(), att.data(), qkv.data(), B, T_, C, NH, dt);
  std::vector<T> dout = dout_host;
  cpu.attention_backward(dqkv.data(), dout.data(), qkv.data(), att.data(), out.data(), B, T_, C, NH, dt);

  const Tol t = sum_tol<T>();
  const Tol tol{t.abs * 4, t.rel * 2};
  for (const char* env : {"unfused", static_cast<const char*>(nullptr)}) {
    SCOPED_TRACE(env ? "MPTRAIN_ATTENTION=unfused" : "default path");
    ScopedAttentionEnv scoped(env);
    auto gpu = make_cuda_backend(0);
    const size_t saved = gpu->attention_saved_bytes(B, T_, C, NH, dt);
    // Sized for the path this shape takes: the probabilities (unfused) or only cuDNN's softmax statistics.
    const size_t probabilities = static_cast<size_t>(B * NH * T_ * T_) * sizeof(T);
    const size_t statistics = static_cast<size_t>(B * NH * T_) * sizeof(float);
    if (env || std::is_same_v<T, float>)
      ASSERT_EQ(saved, probabilities);
    else
      ASSERT_TRUE(saved == probabilities || saved == statistics) << saved;
    Mirror<T> g_qkv(*gpu, qkv_host), g_out(*gpu, std::vector<T>(B * T_ * C)), g_dout(*gpu, dout_host),
        g_dqkv(*gpu, dqkv_init);
    Buffer g_att = gpu->allocate(saved);
    gpu->attention_forward(g_out.dev(), g_att.data(), g_qkv.dev(), B, T_, C, NH, dt);
    expect_close(g_out.download(*gpu), out, tol, "attention_forward out");
    if (env) {  // the unfused path saves the probabilities, like the CPU
      std::vector<T> g_att_host(att.size());
      gpu->copy_to_host(g_att_host.data(), g_att.data(), g_att_host.size() * sizeof(T));
      expect_close(g_att_host, att, elem_tol<T>(), "attention_forward att");
    }
    gpu->attention_backward(g_dqkv.dev(), g_dout.dev(), g_qkv.dev(), g_att.data(), g_out.dev(), B, T_, C, NH,
                            dt);
    expect_close(g_dqkv.download(*gpu), dqkv, tol, "attention_backward dqkv");
  }
}

TYPED_TEST(CudaOps, OptimizerOpsThroughTheBackend) {
  MPT_REQUIRE_GPU();
  using T = TypeParam;
  Backend& cpu = *this->cpu_backend;
  Backend& gpu = *this->gpu_backend;
  const DType dt = dtype_of<T>();
  const size_t block = 37, n = block * 41 + 5;
  Mirror<T> grads(gpu, random_vector<T>(n, 60, 3.0f));
  const std::vector<ElementRange> ranges = {{block * 2, block * 10}, {block * 20, block * 15}};
  // The mixed-precision state and the block sums live in each backend's memory (host for the CPU).
  Buffer cpu_state = cpu.allocate(sizeof(common::AmpState)),
         gpu_state = gpu.allocate(sizeof(common::AmpState));
  Buffer cpu_sums_buf = cpu.allocate(25 * sizeof(double)), gpu_sums_buf = gpu.allocate(25 * sizeof(double));
  auto* cpu_amp = cpu_state.as<common::AmpState>();
  auto* gpu_amp = gpu_state.as<common::AmpState>();
  const auto read_gpu_state = [&] {
    common::AmpState host;
    gpu.copy_to_host(&host, gpu_amp, sizeof(host));
    return host;
  };
  std::vector<double> gpu_sums(25, -1.0);
  // Each backend holds its own registration of the tables; a table of the other backend is refused.
  const Table<ElementRange> cpu_ranges = cpu.register_table<ElementRange>(ranges);
  const Table<ElementRange> gpu_ranges = gpu.register_table<ElementRange>(ranges);
  EXPECT_THROW(gpu.grad_check(grads.dev(), dt, cpu_ranges, block, gpu_sums_buf.as<double>(), gpu_amp, false),
               Error);
  EXPECT_THROW(cpu.grad_check(grads.cpu(), dt, gpu_ranges, block, cpu_sums_buf.as<double>(), cpu_amp, false),
               Error);
  for (int rep = 0; rep < 2; ++rep) {  // the second call reuses the block starts derived by the first
    cpu.grad_check(grads.cpu(), dt, cpu_ranges, block, cpu_sums_buf.as<double>(), cpu_amp, rep == 1);
    gpu.grad_check(grads.dev(), dt, gpu_ranges, block, gpu_sums_buf.as<double>(), gpu_amp, rep == 1);
    gpu.copy_to_host(gpu_sums.data(), gpu_sums_buf.data(), gpu_sums.size() * sizeof(double));
    const common::AmpState g = read_gpu_state();
    EXPECT_EQ(cpu_amp->flags[common::kFoundInf], 0.0f);
    EXPECT_EQ(g.flags[common::kFoundInf], 0.0f);
    EXPECT_EQ(g.flags[common::kStopRequested], rep == 1 ? 1.0f : 0.0f);
    for (size_t k = 0; k < gpu_sums.size(); ++k)
      ASSERT_NEAR(gpu_sums[k], cpu_sums_buf.as<double>()[k], 1e-12 * cpu_sums_buf.as<double>()[k])
          << "block " << k;
  }
  grads.host[block * 25 + 3] = from_float<T>(NAN);
  gpu.copy_from_host(grads.dev(), grads.cpu(), n * sizeof(T));
  cpu.grad_check(grads.cpu(), dt, cpu_ranges, block, cpu_sums_buf.as<double>(), cpu_amp, false);
  gpu.grad_check(grads.dev(), dt, gpu_ranges, block, gpu_sums_buf.as<double>(), gpu_amp, false);
  EXPECT_EQ(cpu_amp->flags[common::kFoundInf], 1.0f);
  EXPECT_EQ(read_gpu_state().flags[common::kFoundInf], 1.0f);
  grads.host[block * 25 + 3] = from_float<T>(0.5f);
  gpu.copy_from_host(grads.dev(), grads.cpu(), n * sizeof(T));

  // AdamW over two segments of a 700-element shard with the constants in the state, then the cast back.
  const size_t shard = 700;
  Mirror<float> master(gpu, random_vector<float>(shard, 61)), m(gpu, random_vector<float>(shard, 62, 0.01f)),
      v(gpu, std::vector<float>(shard, 0.02f));
  const std::vector<AdamWSegment> segments = {{0, 100, 300, true}, {300, 1000, 400, false}};
  common::AmpState state;
  state.step = common::make_adamw_step(1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, 3, 0.25f);
  *cpu_amp = state;
  gpu.copy_from_host(gpu_amp, &state, sizeof(state));
  cpu.adamw(master.cpu(), m.cpu(), v.cpu(), grads.cpu(), dt, cpu.register_table<AdamWSegment>(segments),
            cpu_amp);
  gpu.adamw(master.dev(), m.dev(), v.dev(), grads.dev(), dt, gpu.register_table<AdamWSegment>(segments),
            gpu_amp);
  expect_close(master.download(gpu), master.host, {1e-6, 1e-5}, "adamw master");
  expect_close(m.download(gpu), m.host, {1e-7, 1e-5}, "adamw m");
  expect_close(v.download(gpu), v.host, {1e-7, 1e-5}, "adamw v");

  const std::vector<ElementRange> cast_ranges = {{100, 300}, {1000, 400}};
  Mirror<T> params(gpu, std::vector<T>(n));
  cpu.cast_master(params.cpu(), dt, master.cpu(), cpu.register_table<ElementRange>(cast_ranges), cpu_amp);
  gpu.cast_master(params.dev(), dt, master.dev(), gpu.register_table<ElementRange>(cast_ranges), gpu_amp);
  expect_close(params.download(gpu), params.host, elem_tol<T>(), "cast_master");
}

/// The GPT-2 model of src/model.cpp on one backend with its flat parameter and gradient buffers.
struct GptOn {
  Backend& backend;
  ParamLayout layout;
  Buffer params, grads;
  std::unique_ptr<GPT> model;

  GptOn(Backend& b, const GPTConfig& c, DType dt, const std::vector<float>& init,
        Recompute recompute = Recompute::none)
      : backend(b), layout(gpt_tensors(c), LayoutOptions{}, 1) {
    const size_t bytes = layout.padded_elements() * dtype_size(dt);
    params = backend.allocate(bytes);
    grads = backend.allocate(bytes);
    std::vector<unsigned char> host(bytes);
    size_t at = 0;
    dispatch_float_dtype(dt, [&]<typename S>() {
      auto* p = reinterpret_cast<S*>(host.data());
      for (const TensorPlacement& t : layout.tensors())
        for (size_t i = 0; i < t.spec.num_elements(); ++i) p[t.offset + i] = from_float<S>(init[at++]);
    });
    backend.copy_from_host(params.data(), host.data(), bytes);
    model = std::make_unique<GPT>(c, layout, backend, dt, recompute);
  }
  /// The gradient of every tensor, as float, in registration order.
  std::vector<std::vector<float>> gradients(DType dt) {
    std::vector<unsigned char> host(grads.num_bytes());
    backend.copy_to_host(host.data(), grads.data(), host.size());
    std::vector<std::vector<float>> out;
    dispatch_float_dtype(dt, [&]<typename S>() {
      const auto* g = reinterpret_cast<const S*>(host.data());
      for (const TensorPlacement& t : layout.tensors()) {
        std::vector<float> v(t.spec.num_elements());
        for (size_t i = 0; i < v.size(); ++i) v[i] = to_float(g[t.offset + i]);
        out.push_back(std::move(v));
      }
    });
    return out;
  }
};

TYPED_TEST(CudaOps, WholeGptForwardBackwardMatchesCpu) {
  MPT_REQUIRE_GPU();
  using T = TypeParam;
  const DType dt = dtype_of<T>();
  GPTConfig c;
  c.vocab_size = 61;  // padded to 128
  c.max_seq_len = 16;
  c.num_layers = 2;
  c.num_heads = 3;
  c.channels = 72;
  const int64_t B = 2, T_ = 13;
  const auto init = gpt_init(c, 7);
  GptOn cpu(*this->cpu_backend, c, dt, init);
  GptOn gpu(*this->gpu_backend, c, dt, init);
  const auto tokens = random_ints(B * T_, static_cast<int32_t>(c.vocab_size), 70);
  const auto targets = random_ints(B * T_, static_cast<int32_t>(c.vocab_size), 71);
  const float factor = std::is_same_v<T, half> ? 256.0f : 1.0f;  // fp16 keeps small gradients normal
  const float cpu_loss = cpu.model->forward(cpu.params.data(), tokens.data(), targets.data(), B, T_, factor);
  const float gpu_loss = gpu.model->forward(gpu.params.data(), tokens.data(), targets.data(), B, T_, factor);
  const double loss_rel = std::is_same_v<T, float> ? 1e-5 : (std::is_same_v<T, half> ? 5e-3 : 2e-2);
  EXPECT_NEAR(gpu_loss, cpu_loss, loss_rel * std::abs(cpu_loss));
  EXPECT_TRUE(std::isfinite(gpu_loss));
  cpu.model->backward(cpu.params.data(), cpu.grads.data());
  gpu.model->backward(gpu.params.data(), gpu.grads.data());
  const auto g_cpu = cpu.gradients(dt), g_gpu = gpu.gradients(dt);
  ASSERT_EQ(g_cpu.size(), g_gpu.size());
  // Per tensor: the absolute part scales with the tensor's largest gradient (errors propagate through the
  // whole backward, so a fixed absolute bound would not fit every tensor).
  const double abs_frac = std::is_same_v<T, float> ? 1e-4 : (std::is_same_v<T, half> ? 1e-2 : 4e-2);
  const double rel = std::is_same_v<T, float> ? 1e-3 : (std::is_same_v<T, half> ? 2e-2 : 6e-2);
  for (size_t k = 0; k < g_cpu.size(); ++k) {
    double max_abs = 0;
    for (float x : g_cpu[k]) max_abs = std::max(max_abs, static_cast<double>(std::abs(x)));
    expect_close(g_gpu[k], g_cpu[k], {abs_frac * max_abs + 1e-12, rel},
                 "gradient of " + cpu.layout.tensors()[k].spec.name);
  }
}

// --recompute on the device: the recomputed activations (cuBLASLt GEMMs, the attention kernels, LayerNorm,
// GELU) are bitwise those of the forward, so the gradients are bitwise those of keeping everything.
TYPED_TEST(CudaOps, RecomputedGptGradientsBitwiseEqual) {
  MPT_REQUIRE_GPU();
  const DType dt = dtype_of<TypeParam>();
  GPTConfig c;
  c.vocab_size = 61;
  c.max_seq_len = 16;
  c.num_layers = 3;
  c.num_heads = 3;
  c.channels = 72;
  const int64_t B = 2, T_ = 13;
  const auto init = gpt_init(c, 7);
  const auto tokens = random_ints(B * T_, static_cast<int32_t>(c.vocab_size), 72);
  std::vector<unsigned char> reference;
  for (Recompute mode : {Recompute::none, Recompute::selective, Recompute::block}) {
    SCOPED_TRACE(recompute_name(mode));
    GptOn gpu(*this->gpu_backend, c, dt, init, mode);
    gpu.model->forward(gpu.params.data(), tokens.data(), tokens.data(), B, T_, 256.0f);
    gpu.model->backward(gpu.params.data(), gpu.grads.data());
    std::vector<unsigned char> grads(gpu.grads.num_bytes());
    gpu.backend.copy_to_host(grads.data(), gpu.grads.data(), grads.size());
    if (mode == Recompute::none)
      reference = grads;
    else
      EXPECT_TRUE(grads == reference) << "gradients differ from --recompute none";
  }
}

}  // namespace
}  // namespace mpt
