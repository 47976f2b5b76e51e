// decode_layers' loop, shared by both kernel sets (decode.cpp in bf16, avx2.cpp in fp32): every decoder layer of a
// decode step in one call. Per layer `qkv(x, w)` (that set's decode_qkv: q, k, v), the rows' T new K/V columns
// written at column n of the cache's buffers (kv.py's _RoomyLayer.update), then `rest(i, x, q, k, v, w)` (its
// decode_rest over columns [0, n + T)). Query row r writes own row r / T's column n + r % T, or, where own_of and
// col are given (a ragged step: each row fed its last token and its own draft, no padding), own row own_of[r]'s
// column n + col[r]; the step's columns no query row writes are zeros (masked, but 0 * value must be finite).
// The same kernels in the same order as fast_llama's Python loop over
// decode_qkv / decode_rest, so the same numbers, without the loop's Python (the cache update, the reshapes,
// 60 calls: 6-7% of a step on a Zen 5 in bf16, ~2 of a batch-1 step's ~20 ms on a Zen 3 in fp32).
// x [Q, 1, H]; w: the layer's 10 weights (norm1, qkv, qkv bias, o, o bias, norm2, gate_up, its bias, down,
// its bias; a bias may be empty); cache_k/v [B, hk, >= n + T, D] per layer; a prompt K/V per layer.
// extension.py folds this file's hash into the build flags, so editing it rebuilds both modules.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

template <class Qkv, class Rest>
torch::Tensor layer_loop(torch::Tensor x, const std::vector<torch::Tensor>& weights,
                         const std::vector<torch::Tensor>& cache_k, const std::vector<torch::Tensor>& cache_v,
                         const std::vector<torch::Tensor>& prompt_k, const std::vector<torch::Tensor>& prompt_v,
                         int64_t n, int64_t T, const torch::Tensor& own_of, const torch::Tensor& col, int64_t hk,
                         int64_t D, Qkv qkv, Rest rest) {
  const size_t layers = cache_k.size();
  const int64_t Q = x.size(0), B = Q / T;
  const bool ragged = own_of.numel() > 0;
  TORCH_CHECK(ragged ? own_of.numel() == Q && col.numel() == Q : Q % T == 0, "decode_layers: own_of and col [Q]");
  torch::Tensor at_col;  // n + col: each query row's column
  if (ragged) at_col = col.to(at::kLong) + n;
  TORCH_CHECK(weights.size() == 10 * layers && cache_v.size() == layers && prompt_k.size() == layers &&
              prompt_v.size() == layers, "decode_layers: 10 weights, a K and V buffer and a prompt K/V per layer");
  for (size_t i = 0; i < layers; ++i) {
    const torch::Tensor* w = &weights[10 * i];
    TORCH_CHECK(cache_k[i].size(2) >= n + T && cache_v[i].size(2) >= n + T, "KV buffer out of room: ", n, " + ", T,
                " > ", cache_k[i].size(2));
    auto q = qkv(x, w);
    if (ragged) {
      using torch::indexing::Slice;
      cache_k[i].narrow(2, n, T).zero_();
      cache_v[i].narrow(2, n, T).zero_();
      torch::Tensor ck = cache_k[i], cv = cache_v[i];  // handles to the same buffers
      ck.index_put_({own_of, Slice(), at_col}, q[1].reshape({Q, hk, D}));
      cv.index_put_({own_of, Slice(), at_col}, q[2].reshape({Q, hk, D}));
    } else {
      cache_k[i].narrow(2, n, T).copy_(q[1].reshape({B, T, hk, D}).transpose(1, 2));
      cache_v[i].narrow(2, n, T).copy_(q[2].reshape({B, T, hk, D}).transpose(1, 2));
    }
    x = rest(i, x, q[0], cache_k[i].narrow(2, 0, n + T), cache_v[i].narrow(2, 0, n + T), w);
  }
  return x;
}
