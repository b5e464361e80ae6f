// oneDNN matmul behind kernels/cpu/onednn_gemm.hpp. Each call builds the primitive descriptor for its shape
// and takes the primitive from oneDNN's own primitive cache (built once per shape and thread count), then
// runs it on a stream over the caller's memory (no copies).
#include "cpu/onednn_gemm.hpp"

#include <cstdlib>
#include <optional>
#include <string_view>
#include <type_traits>
#include <unordered_map>

#include <oneapi/dnnl/dnnl.hpp>

#include "cpu/ops.hpp"
#include "mptrain/error.hpp"

namespace mpt::cpu {

namespace {

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

/// This thread's oneDNN scratchpad, grown to at least `bytes` (64-byte aligned; kept for the thread's life).
void* thread_scratchpad(size_t bytes) {
  struct Buffer {
    void* data = nullptr;
    size_t size = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buffer;
  if (buffer.size < bytes) {
    const size_t rounded = (bytes + 63) / 64 * 64;
    void* grown = std::aligned_alloc(64, rounded);
    MPT_CHECK(grown != nullptr, "onednn_gemm: out of host memory allocating a {}-byte scratchpad", rounded);
    std::free(buffer.data);
    buffer.data = grown;
    buffer.size = rounded;
  }
  return buffer.data;
}

/// The on/off switch in environment variable `name`: nullopt (the run-time choice) when it is unset, empty
/// or "auto", false for "0", true for "1". Throws mpt::InputError naming the variable for anything else.
std::optional<bool> environment_switch(const char* name) {
  const char* env = std::getenv(name);
  if (env == nullptr) return std::nullopt;
  const std::string_view value(env);
  if (value.empty() || value == "auto") return std::nullopt;
  if (value == "0" || value == "1") return value == "1";
  throw InputError(MPT_FORMAT("{}={} is not one of 0, 1, auto", name, value));
}

}  // namespace

bool onednn_native_bf16() {
  static const bool native = [] {
    const std::optional<bool> forced = environment_switch("MPTRAIN_ONEDNN_BF16");
    if (forced == false) return false;
    const dnnl::cpu_isa isa = dnnl::get_effective_cpu_isa();
    const bool native_isa = isa == dnnl::cpu_isa::avx512_core_bf16 || isa == dnnl::cpu_isa::avx512_core_amx;
    MPT_INPUT_CHECK(
        forced != true || native_isa,
        "MPTRAIN_ONEDNN_BF16=1, but oneDNN finds no native BF16 (AVX512_BF16 or AMX) on this CPU; "
        "unset it, or set 0 or auto");
    return native_isa;
  }();
  return native;
}

bool onednn_f32_preferred() {
  static const bool preferred = [] {
    const std::optional<bool> forced = environment_switch("MPTRAIN_ONEDNN_F32");
    if (forced.has_value()) return *forced;
    const dnnl::cpu_isa isa = dnnl::get_effective_cpu_isa();
    return isa == dnnl::cpu_isa::avx512_core || isa == dnnl::cpu_isa::avx512_core_vnni ||
           isa == dnnl::cpu_isa::avx512_core_bf16 || isa == dnnl::cpu_isa::avx512_core_amx;
  }();
  return preferred;
}

template <typename S>
void onednn_gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const S* A, int64_t lda,
                 const S* B, int64_t ldb, float beta, float* C, int64_t ldc, const float* bias) {
  using dnnl::memory;
  MPT_CHECK(M > 0 && N > 0 && K > 0, "onednn_gemm: sizes must be positive (M = {}, N = {}, K = {})", M, N, K);
  MPT_CHECK(beta == 0.0f || beta == 1.0f, "onednn_gemm: beta must be 0 or 1, got {}", beta);
  constexpr memory::data_type dt =
      std::is_same_v<S, float> ? memory::data_type::f32 : memory::data_type::bf16;
  try {
    dnnl::engine& engine = cpu_engine();
    const memory::desc a_md({M, K}, dt, trans_a ? memory::dims{1, lda} : memory::dims{lda, 1});
    const memory::desc b_md({K, N}, dt, trans_b ? memory::dims{1, ldb} : memory::dims{ldb, 1});
    const memory::desc c_md({M, N}, memory::data_type::f32, memory::dims{ldc, 1});
    dnnl::primitive_attr attr;
    // The caller's scratchpad (a per-thread buffer below): matmul.cpp runs this from several OpenMP threads
    // at once, so each execution gets memory no other thread uses, whatever oneDNN's build chose for its
    // library-managed scratchpad (shared unless built with DNNL_ENABLE_CONCURRENT_EXEC). (The heap corruption
    // once blamed on sharing was a signal handler running inside oneDNN's kernels: mptrain/stop_signal.hpp.)
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    if (beta != 0.0f) {
      dnnl::post_ops ops;
      ops.append_sum(beta);
      attr.set_post_ops(ops);
    }
    const memory::desc bias_md({1, N}, memory::data_type::f32, memory::dims{N, 1});
    const dnnl::matmul::primitive_desc pd(bias != nullptr ? dnnl::matmul::desc(a_md, b_md, bias_md, c_md)
                                                          : dnnl::matmul::desc(a_md, b_md, c_md),
                                          attr, engine);
    const dnnl::matmul prim(pd);  // from oneDNN's primitive cache after the first call with this shape
    dnnl::stream stream(engine);
    std::unordered_map<int, memory> args{{DNNL_ARG_SRC, memory(a_md, engine, const_cast<S*>(A))},
                                         {DNNL_ARG_WEIGHTS, memory(b_md, engine, const_cast<S*>(B))},
                                         {DNNL_ARG_DST, memory(c_md, engine, C)}};
    if (bias != nullptr) args.emplace(DNNL_ARG_BIAS, memory(bias_md, engine, const_cast<float*>(bias)));
    const memory::desc scratch_md = pd.scratchpad_desc();
    if (scratch_md.get_size() > 0)
      args.emplace(DNNL_ARG_SCRATCHPAD, memory(scratch_md, engine, thread_scratchpad(scratch_md.get_size())));
    prim.execute(stream, args);
    stream.wait();
  } catch (const dnnl::error& e) {
    MPT_CHECK(false, "onednn_gemm: oneDNN failed for M = {}, N = {}, K = {}: {}", M, N, K, e.what());
  }
}

template void onednn_gemm<float>(bool, bool, int64_t, int64_t, int64_t, const float*, int64_t, const float*,
                                 int64_t, float, float*, int64_t, const float*);
template void onednn_gemm<bf16>(bool, bool, int64_t, int64_t, int64_t, const bf16*, int64_t, const bf16*,
                                int64_t, float, float*, int64_t, const float*);

}  // namespace mpt::cpu
