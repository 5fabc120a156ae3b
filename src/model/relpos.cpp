#include "model/relpos.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>

namespace switcht5 {

int relative_position_bucket(int relative_position, bool bidirectional, int num_buckets,
                             int max_distance) {
  int bucket = 0;
  int n = relative_position;
  if (bidirectional) {
    num_buckets /= 2;
    if (n > 0) bucket += num_buckets;
    n = std::abs(n);
  } else {
    n = std::max(-n, 0);
  }
  const int max_exact = num_buckets / 2;
  if (n < max_exact) return bucket + n;
  const float scaled = std::log(static_cast<float>(n) / static_cast<float>(max_exact)) /
                       static_cast<float>(std::log(static_cast<double>(max_distance) / max_exact)) *
                       static_cast<float>(num_buckets - max_exact);
  const int large = std::min(max_exact + static_cast<int>(scaled), num_buckets - 1);
  return bucket + large;
}

std::vector<int32_t> relative_position_buckets(int Tq, int Tk, bool bidirectional, int num_buckets,
                                               int max_distance) {
  std::vector<int32_t> out(static_cast<size_t>(Tq) * Tk);
  for (int i = 0; i < Tq; ++i)
    for (int j = 0; j < Tk; ++j)
      out[static_cast<size_t>(i) * Tk + j] =
          relative_position_bucket(j - i, bidirectional, num_buckets, max_distance);
  return out;
}

}  // namespace switcht5
