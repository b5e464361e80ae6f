// Fused causal attention through cuDNN's scaled-dot-product attention (SDPA, flash-attention style), built
// with the header-only cuDNN frontend's graph API (cudnn_frontend::graph::Graph::sdpa / sdpa_backward).
//
// Layout: qkv[B,T,3C] is [B, T, 3, NH, hs], so q, k and v are each read in place as [B, NH, T, hs] tensors
// with strides {T*3C, hs, 3C, 1} starting at qkv, qkv + C and qkv + 2C: no gather copies. The output is
// written with strides {T*C, hs, C, 1} straight into out[B,T,C], and dout is read the same way. The forward
// saves only the softmax statistics, FP32 [B, NH, T, 1]: each query row's log-sum-exp of the scaled scores
// (natural log), from which cuDNN's backward recomputes the probabilities. Scale 1/sqrt(hs), causal mask
// with the diagonal at the top left (query t sees keys 0..t), FP32 intermediates and compute, fp16/bf16 I/O.
//
// Backward: cuDNN overwrites dq, dk, dv, but the Backend contract accumulates into dqkv. They are written, in
// the same [B, T, 3, NH, hs] strides, into a dqkv-shaped scratch buffer (the three views tile it exactly,
// so every element is written) and then added into dqkv in FP32 with one rounding (cuda::accumulate).
// The gradients are therefore rounded twice (cuDNN's store, then the add) where the unfused path rounds
// once. The backward graph asks for cuDNN's deterministic algorithm (no atomic dQ accumulation; run-to-run
// bitwise reproducible, at the cost of a dP workspace of about B*NH*T*T elements on Hopper); where cuDNN
// refuses that, the default algorithm is used instead.
//
// Graphs are built once per (direction, B, T, NH, hs, dtype) and kept in the BlasContext, together with
// refusals, so attention_supported is a map lookup after the first call for a shape. A shape is supported
// only when cuDNN takes both directions (cuDNN 9.19's backward refuses T = 1, so T = 1 runs unfused).
// Workspace comes from the context's grow-only scratch. The same graph descriptions can be validated
// without a device for a given compute capability (cudnn_attention_validate_offline, used by the tests).
// Built only with MPTRAIN_WITH_CUDNN; otherwise every shape is refused.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "cuda/attention_cudnn.cuh"
#include "cuda/blas_context.cuh"
#include "mptrain/cuda_check.hpp"
#include "mptrain/cuda_kernels.hpp"
#include "mptrain/error.hpp"

#if defined(MPTRAIN_WITH_CUDNN)
// The frontend's shim (1.32.0) calls std::strlen without including <cstring> itself.
#include <cstring>
// The frontend's JSON (de)serialisation is unused; skipping it also keeps its bundled nlohmann::json away
// from the one mptrain links.
#define CUDNN_FRONTEND_SKIP_JSON_LIB 1
#include <cudnn.h>
#include <cudnn_frontend.h>
#endif

namespace mpt::cuda {

#if defined(MPTRAIN_WITH_CUDNN)

namespace fe = cudnn_frontend;

namespace {

/// Variant-pack uids of the graphs' non-virtual tensors.
enum Uid : int64_t { kQ = 1, kK, kV, kO, kStats, kDO, kDQ, kDK, kDV };

/// cuDNN requires 16-byte aligned tensor pointers.
constexpr uintptr_t kAlignmentBytes = 16;

/// One built graph, or cuDNN's reason for refusing the shape.
struct CachedGraph {
  std::shared_ptr<fe::graph::Graph> graph;  ///< null when refused
  int64_t workspace_bytes = 0;
  std::string failure;  ///< why `graph` is null
};

/// (backward, B, T, NH, hs, dtype)
using GraphKey = std::tuple<bool, int64_t, int64_t, int64_t, int64_t, int>;

}  // namespace

struct CudnnAttention {
  cudnnHandle_t handle = nullptr;
  std::string handle_failure;  ///< non-empty when cudnnCreate failed: every shape is refused
  std::map<GraphKey, CachedGraph> graphs;
};

void CudnnAttentionDeleter::operator()(CudnnAttention* p) const noexcept {
  if (p == nullptr) return;
  p->graphs.clear();  // the plans before the handle they were built with
  if (p->handle != nullptr) {
    const cudnnStatus_t rc = cudnnDestroy(p->handle);
    if (rc != CUDNN_STATUS_SUCCESS)
      std::fprintf(stderr, "mptrain: cudnnDestroy failed: %s\n", cudnnGetErrorString(rc));
  }
  delete p;
}

namespace {

fe::DataType_t fe_type(DType dtype) {
  return dtype == DType::bf16 ? fe::DataType_t::BFLOAT16 : fe::DataType_t::HALF;
}

/// The attention state, created on first use. A cudnnCreate failure (no cuDNN-capable device, library load
/// failure) is remembered as the reason the path is unsupported rather than thrown.
CudnnAttention& attention_state(BlasContext::State& state) {
  if (!state.cudnn) {
    std::unique_ptr<CudnnAttention, CudnnAttentionDeleter> created(new CudnnAttention);
    const cudnnStatus_t rc = cudnnCreate(&created->handle);
    if (rc != CUDNN_STATUS_SUCCESS) {
      created->handle = nullptr;
      created->handle_failure = std::string("cudnnCreate failed: ") + cudnnGetErrorString(rc);
    }
    state.cudnn = std::move(created);
  }
  return *state.cudnn;
}

/// Strides of q, k, v (and dq, dk, dv) as [B, NH, T, hs] views of a [B, T, 3, NH, hs] buffer.
std::vector<int64_t> qkv_strides(int64_t T, int64_t NH, int64_t hs) {
  const int64_t C = NH * hs;
  return {T * 3 * C, hs, 3 * C, 1};
}

/// Strides of out and dout as [B, NH, T, hs] views of a [B, T, NH, hs] buffer.
std::vector<int64_t> bthd_strides(int64_t T, int64_t NH, int64_t hs) {
  const int64_t C = NH * hs;
  return {T * C, hs, C, 1};
}

std::shared_ptr<fe::graph::Tensor_attributes> input(fe::graph::Graph& g, const char* name, Uid uid,
                                                    const std::vector<int64_t>& dims,
                                                    const std::vector<int64_t>& strides) {
  return g.tensor(
      fe::graph::Tensor_attributes().set_name(name).set_uid(uid).set_dim(dims).set_stride(strides));
}

/// Lowers a described graph to an executable plan (validation, cuDNN operation graph, heuristics A then
/// fallback, support check, plan build) and reads its workspace size. Returns the failing step and cuDNN's
/// message, or an empty string on success.
std::string lower(fe::graph::Graph& g, cudnnHandle_t handle, int64_t* workspace_bytes) {
  const auto fail = [](const char* step, fe::error_t rc) {
    return std::string(step) + ": " + rc.get_message();
  };
  if (auto rc = g.validate(); rc.is_bad()) return fail("validate", rc);
  if (auto rc = g.build_operation_graph(handle); rc.is_bad()) return fail("build_operation_graph", rc);
  if (auto rc = g.create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK}); rc.is_bad())
    return fail("create_execution_plans", rc);
  if (auto rc = g.check_support(); rc.is_bad()) return fail("check_support", rc);
  if (auto rc = g.build_plans(fe::BuildPlanPolicy_t::HEURISTICS_CHOICE); rc.is_bad())
    return fail("build_plans", rc);
  if (auto rc = g.get_workspace_size(*workspace_bytes); rc.is_bad()) return fail("get_workspace_size", rc);
  return {};
}

/// An empty graph for `dtype` I/O with FP32 intermediates and compute. sm_version 0: the frontend reads the
/// compute capability from the current device; otherwise it validates for that one (no device needed).
std::shared_ptr<fe::graph::Graph> new_graph(DType dtype, int sm_version) {
  auto g = std::make_shared<fe::graph::Graph>();
  g->set_io_data_type(fe_type(dtype))
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  if (sm_version > 0) g->set_sm_version(sm_version);
  return g;
}

float attention_scale(int64_t hs) {
  return 1.0f / std::sqrt(static_cast<float>(hs));
}

/// Forward graph, described but not lowered: (q, k, v) -> (o, stats).
std::shared_ptr<fe::graph::Graph> describe_forward(int64_t B, int64_t T, int64_t NH, int64_t hs, DType dtype,
                                                   int sm_version) {
  auto g = new_graph(dtype, sm_version);
  const std::vector<int64_t> dims{B, NH, T, hs};
  const auto in_strides = qkv_strides(T, NH, hs);
  auto q = input(*g, "q", kQ, dims, in_strides);
  auto k = input(*g, "k", kK, dims, in_strides);
  auto v = input(*g, "v", kV, dims, in_strides);
  auto attributes = fe::graph::SDPA_attributes()
                        .set_name("mptrain_attention_forward")
                        .set_generate_stats(true)
                        .set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT)
                        .set_diagonal_band_right_bound(0)  // causal: no key after the query
                        .set_attn_scale(attention_scale(hs));
  auto [o, stats] = g->sdpa(q, k, v, attributes);
  o->set_output(true).set_uid(kO).set_dim(dims).set_stride(bthd_strides(T, NH, hs));
  stats->set_output(true)
      .set_uid(kStats)
      .set_data_type(fe::DataType_t::FLOAT)
      .set_dim({B, NH, T, 1})
      .set_stride({NH * T, T, 1, 1});
  return g;
}

/// Backward graph, described but not lowered: (q, k, v, o, do, stats) -> (dq, dk, dv).
std::shared_ptr<fe::graph::Graph> describe_backward(int64_t B, int64_t T, int64_t NH, int64_t hs, DType dtype,
                                                    bool deterministic, int sm_version) {
  auto g = new_graph(dtype, sm_version);
  const std::vector<int64_t> dims{B, NH, T, hs};
  const auto in_strides = qkv_strides(T, NH, hs);
  const auto out_strides = bthd_strides(T, NH, hs);
  auto q = input(*g, "q", kQ, dims, in_strides);
  auto k = input(*g, "k", kK, dims, in_strides);
  auto v = input(*g, "v", kV, dims, in_strides);
  auto o = input(*g, "o", kO, dims, out_strides);
  auto d_o = input(*g, "do", kDO, dims, out_strides);
  auto stats = g->tensor(fe::graph::Tensor_attributes()
                             .set_name("stats")
                             .set_uid(kStats)
                             .set_data_type(fe::DataType_t::FLOAT)
                             .set_dim({B, NH, T, 1})
                             .set_stride({NH * T, T, 1, 1}));
  auto attributes = fe::graph::SDPA_backward_attributes()
                        .set_name("mptrain_attention_backward")
                        .set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT)
                        .set_diagonal_band_right_bound(0)
                        .set_attn_scale(attention_scale(hs))
                        .set_deterministic_algorithm(deterministic);
  auto [dq, dk, dv] = g->sdpa_backward(q, k, v, o, d_o, stats, attributes);
  dq->set_output(true).set_uid(kDQ).set_dim(dims).set_stride(in_strides);
  dk->set_output(true).set_uid(kDK).set_dim(dims).set_stride(in_strides);
  dv->set_output(true).set_uid(kDV).set_dim(dims).set_stride(in_strides);
  return g;
}

/// Lowers a described graph for the current device; on failure keeps the reason instead of the graph.
CachedGraph lowered(std::shared_ptr<fe::graph::Graph> g, cudnnHandle_t handle) {
  CachedGraph entry;
  entry.failure = lower(*g, handle, &entry.workspace_bytes);
  if (entry.failure.empty()) entry.graph = std::move(g);
  return entry;
}

/// The forward graph (backward == false) or the backward graph, deterministic where cuDNN accepts that and
/// its default algorithm otherwise: `make(deterministic)` returns a CachedGraph.
template <typename Make>
CachedGraph build_with_fallback(bool backward, Make&& make) {
  if (!backward) return make(false);
  CachedGraph entry = make(true);
  if (entry.graph) return entry;
  CachedGraph fallback = make(false);
  if (fallback.graph) return fallback;
  entry.failure += " (deterministic); " + fallback.failure + " (default algorithm)";
  return entry;
}

/// The cached graph for a shape, built on first use. The frontend reports through error_t but may also
/// throw (library loading, allocation); either way the shape is recorded as refused with the message.
const CachedGraph& graph_for(BlasContext::State& state, bool backward, int64_t B, int64_t T, int64_t NH,
                             int64_t hs, DType dtype) {
  CudnnAttention& ca = attention_state(state);
  const GraphKey key{backward, B, T, NH, hs, static_cast<int>(dtype)};
  if (auto it = ca.graphs.find(key); it != ca.graphs.end()) return it->second;
  CachedGraph entry;
  if (ca.handle == nullptr) {
    entry.failure = ca.handle_failure;
  } else {
    try {
      entry = build_with_fallback(backward, [&](bool deterministic) {
        return lowered(backward ? describe_backward(B, T, NH, hs, dtype, deterministic, 0)
                                : describe_forward(B, T, NH, hs, dtype, 0),
                       ca.handle);
      });
    } catch (const std::exception& e) {
      entry = CachedGraph{};
      entry.failure = std::string("cuDNN frontend threw: ") + e.what();
    }
  }
  return ca.graphs.emplace(key, std::move(entry)).first->second;
}

void check_aligned(const void* p, const char* op, const char* name) {
  MPT_CHECK(reinterpret_cast<uintptr_t>(p) % kAlignmentBytes == 0,
            "{}: {} must be {}-byte aligned for cuDNN SDPA", op, name, kAlignmentBytes);
}

/// The built graph for a shape; throws mpt::Error with cuDNN's reason where it was refused.
const CachedGraph& require_graph(BlasContext::State& state, bool backward, int64_t B, int64_t T, int64_t NH,
                                 int64_t hs, DType dtype, const char* op) {
  MPT_CHECK(dtype == DType::f16 || dtype == DType::bf16, "{}: cuDNN SDPA needs f16 or bf16, not {}", op,
            std::string(dtype_name(dtype)));
  const CachedGraph& entry = graph_for(state, backward, B, T, NH, hs, dtype);
  MPT_CHECK(entry.graph != nullptr, "{}: cuDNN SDPA does not support B = {}, T = {}, NH = {}, hs = {}: {}",
            op, B, T, NH, hs, entry.failure);
  return entry;
}

const void* offset_bytes(const void* p, int64_t num_bytes) {
  return static_cast<const char*>(p) + num_bytes;
}

}  // namespace

bool cudnn_attention_supported(BlasContext::State& state, int64_t B, int64_t T, int64_t NH, int64_t hs,
                               DType dtype, std::string* why_not) {
  const auto refuse = [why_not](std::string reason) {
    if (why_not != nullptr) *why_not = std::move(reason);
    return false;
  };
  if (dtype != DType::f16 && dtype != DType::bf16)
    return refuse("cuDNN SDPA runs f16 and bf16 only, not " + std::string(dtype_name(dtype)));
  if (hs < 8 || hs % 8 != 0 || hs > 128)
    return refuse("head size " + std::to_string(hs) + " is not a multiple of 8 in [8, 128]");
  if (B == 0 || T == 0) return true;  // nothing to compute; both paths return at once
  if (const CachedGraph& fwd = graph_for(state, false, B, T, NH, hs, dtype); !fwd.graph)
    return refuse("forward graph: " + fwd.failure);
  if (const CachedGraph& bwd = graph_for(state, true, B, T, NH, hs, dtype); !bwd.graph)
    return refuse("backward graph: " + bwd.failure);
  return true;
}

void cudnn_attention_forward(BlasContext::State& state, void* out, float* stats, const void* qkv, int64_t B,
                             int64_t T, int64_t NH, int64_t hs, DType dtype, cudaStream_t stream) {
  const char* op = "cuda::attention_forward (cuDNN)";
  const CachedGraph& entry = require_graph(state, false, B, T, NH, hs, dtype, op);
  check_aligned(qkv, op, "qkv");
  check_aligned(out, op, "out");
  check_aligned(stats, op, "att (softmax statistics)");
  const int64_t C_bytes = NH * hs * static_cast<int64_t>(dtype_size(dtype));
  void* workspace = entry.workspace_bytes > 0
                        ? state.scratch_for(static_cast<size_t>(entry.workspace_bytes), stream)
                        : nullptr;
  // The variant pack holds non-const pointers; cuDNN only reads the inputs.
  std::unordered_map<int64_t, void*> pack{
      {kQ, const_cast<void*>(qkv)},
      {kK, const_cast<void*>(offset_bytes(qkv, C_bytes))},
      {kV, const_cast<void*>(offset_bytes(qkv, 2 * C_bytes))},
      {kO, out},
      {kStats, stats},
  };
  CudnnAttention& ca = *state.cudnn;
  MPT_CUDNN_CHECK(cudnnSetStream(ca.handle, stream));
  MPT_CUDNN_FE_CHECK(entry.graph->execute(ca.handle, pack, workspace));
}

void cudnn_attention_backward(BlasContext::State& state, void* dqkv, const void* dout, const void* qkv,
                              const float* stats, const void* out, int64_t B, int64_t T, int64_t NH,
                              int64_t hs, DType dtype, cudaStream_t stream) {
  const char* op = "cuda::attention_backward (cuDNN)";
  const CachedGraph& entry = require_graph(state, true, B, T, NH, hs, dtype, op);
  check_aligned(dqkv, op, "dqkv");
  check_aligned(dout, op, "dout");
  check_aligned(qkv, op, "qkv");
  check_aligned(stats, op, "att (softmax statistics)");
  check_aligned(out, op, "out");
  const int64_t es = static_cast<int64_t>(dtype_size(dtype));
  const int64_t C_bytes = NH * hs * es;
  const int64_t n_qkv = B * T * 3 * NH * hs;
  // Scratch: the dqkv-shaped gradient buffer, then cuDNN's workspace at the next 256-byte boundary.
  const int64_t grad_bytes = (n_qkv * es + 255) / 256 * 256;
  void* base = state.scratch_for(static_cast<size_t>(grad_bytes + entry.workspace_bytes), stream);
  void* grad = base;
  void* workspace = entry.workspace_bytes > 0 ? static_cast<char*>(base) + grad_bytes : nullptr;
  std::unordered_map<int64_t, void*> pack{
      {kQ, const_cast<void*>(qkv)},
      {kK, const_cast<void*>(offset_bytes(qkv, C_bytes))},
      {kV, const_cast<void*>(offset_bytes(qkv, 2 * C_bytes))},
      {kO, const_cast<void*>(out)},
      {kDO, const_cast<void*>(dout)},
      {kStats, const_cast<float*>(stats)},
      {kDQ, grad},
      {kDK, static_cast<char*>(grad) + C_bytes},
      {kDV, static_cast<char*>(grad) + 2 * C_bytes},
  };
  CudnnAttention& ca = *state.cudnn;
  MPT_CUDNN_CHECK(cudnnSetStream(ca.handle, stream));
  MPT_CUDNN_FE_CHECK(entry.graph->execute(ca.handle, pack, workspace));
  if (dtype == DType::bf16)
    accumulate(static_cast<bf16*>(dqkv), static_cast<const bf16*>(grad), n_qkv, stream);
  else
    accumulate(static_cast<half*>(dqkv), static_cast<const half*>(grad), n_qkv, stream);
}

bool cudnn_attention_built() {
  return true;
}

std::string cudnn_attention_validate_offline(int64_t B, int64_t T, int64_t NH, int64_t hs, DType dtype,
                                             int sm_version) {
  MPT_CHECK(sm_version > 0, "cudnn_attention_validate_offline: sm_version {} must be positive", sm_version);
  const auto validated = [](std::shared_ptr<fe::graph::Graph> g) {
    CachedGraph entry;
    if (auto rc = g->validate(); rc.is_bad())
      entry.failure = "validate: " + rc.get_message();
    else
      entry.graph = std::move(g);
    return entry;
  };
  try {
    for (const bool backward : {false, true}) {
      const CachedGraph entry = build_with_fallback(backward, [&](bool deterministic) {
        return validated(backward ? describe_backward(B, T, NH, hs, dtype, deterministic, sm_version)
                                  : describe_forward(B, T, NH, hs, dtype, sm_version));
      });
      if (!entry.graph) return std::string(backward ? "backward graph: " : "forward graph: ") + entry.failure;
    }
  } catch (const std::exception& e) {
    return std::string("cuDNN frontend threw: ") + e.what();
  }
  return {};
}

#else  // !MPTRAIN_WITH_CUDNN

struct CudnnAttention {};

void CudnnAttentionDeleter::operator()(CudnnAttention* p) const noexcept {
  delete p;
}

namespace {
constexpr const char* kNotBuilt =
    "mptrain was built without cuDNN SDPA (MPTRAIN_WITH_CUDNN off: the cuDNN frontend headers or libcudnn "
    "were not found at configure time; see launch/cudnn_frontend.sh)";
}  // namespace

bool cudnn_attention_supported(BlasContext::State& /*state*/, int64_t /*B*/, int64_t /*T*/, int64_t /*NH*/,
                               int64_t /*hs*/, DType /*dtype*/, std::string* why_not) {
  if (why_not != nullptr) *why_not = kNotBuilt;
  return false;
}

void cudnn_attention_forward(BlasContext::State& /*state*/, void* /*out*/, float* /*stats*/,
                             const void* /*qkv*/, int64_t /*B*/, int64_t /*T*/, int64_t /*NH*/,
                             int64_t /*hs*/, DType /*dtype*/, cudaStream_t /*stream*/) {
  throw Error(std::string("cuda::attention_forward: ") + kNotBuilt);
}

void cudnn_attention_backward(BlasContext::State& /*state*/, void* /*dqkv*/, const void* /*dout*/,
                              const void* /*qkv*/, const float* /*stats*/, const void* /*out*/, int64_t /*B*/,
                              int64_t /*T*/, int64_t /*NH*/, int64_t /*hs*/, DType /*dtype*/,
                              cudaStream_t /*stream*/) {
  throw Error(std::string("cuda::attention_backward: ") + kNotBuilt);
}

bool cudnn_attention_built() {
  return false;
}

std::string cudnn_attention_validate_offline(int64_t /*B*/, int64_t /*T*/, int64_t /*NH*/, int64_t /*hs*/,
                                             DType /*dtype*/, int /*sm_version*/) {
  return kNotBuilt;
}

#endif  // MPTRAIN_WITH_CUDNN

}  // namespace mpt::cuda
