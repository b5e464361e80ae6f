// CPU backend op templates (internal): instantiated for float, half and bf16 storage, computing in FP32/FP64.
#pragma once

#include <span>

#include "mptrain/backend.hpp"

namespace mpt::cpu {

/// See Backend::grad_check. Blocks are processed in parallel; each block's sum runs in element order, so the
/// result does not depend on the thread count.
template <typename T>
bool grad_check(const T* grads, std::span<const ElementRange> ranges, size_t block_elements,
                std::span<double> block_sums_out);

/// See Backend::adamw.
template <typename T>
void adamw(float* master, float* m, float* v, const T* grads, std::span<const AdamWSegment> segments,
           const common::AdamWStep& step);

/// See Backend::cast_master.
template <typename T>
void cast_master(T* params, const float* master, std::span<const ElementRange> ranges);

}  // namespace mpt::cpu
