// T5 relative position buckets (Raffel et al. 2020, Mesh TensorFlow / HF
// `_relative_position_bucket`). relative_position = key_position - query_position.
//   bidirectional (encoder): half the buckets for keys after the query, half for keys before.
//   causal (decoder): only keys at or before the query; later keys share bucket 0.
// Within each half, distances below max_exact = buckets/2 get their own bucket; larger ones are
// spaced logarithmically up to max_distance, beyond which they share the last bucket:
//   bucket = max_exact + floor( log(d / max_exact) / log(max_distance / max_exact)
//                                * (buckets - max_exact) )            (computed in float32,
// as HF does, so the buckets match exactly), clamped to buckets - 1.
#pragma once
#include <cstdint>
#include <vector>

namespace switcht5 {

int relative_position_bucket(int relative_position, bool bidirectional, int num_buckets,
                             int max_distance);

// [Tq, Tk] bucket table, row-major: entry (i, j) is the bucket of relative position j - i.
std::vector<int32_t> relative_position_buckets(int Tq, int Tk, bool bidirectional, int num_buckets,
                                               int max_distance);

}  // namespace switcht5
