// Median, min and max of a benchmark's samples (seconds), shared by the JSON-reporting benchmarks.
#pragma once

#include <algorithm>
#include <vector>

namespace mpt::bench {

struct Stats {
  double median, min, max;
};

/// Summary of `v` (must be non-empty): the median (mean of the two middle values for an even count), min,
/// max.
inline Stats stats(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  const double median = n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
  return {median, v.front(), v.back()};
}

}  // namespace mpt::bench
