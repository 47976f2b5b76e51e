// decode_layers' loop, shared by both kernel sets (decode.cpp in bf16, avx2.cpp in fp32): every decoder layer of a
// decode step in one call. Per layer `qkv(x, w)` (that set's decode_qkv: q, k, v), the rows' T new K/V columns
// written at column n of the cache's buffers (kv.py's _RoomyLayer.update), then `rest(i, x, q, k, v, w)` (its
// decode_rest over columns [0, n + T)). The same kernels in the same order as fast_llama's Python loop over
// decode_qkv / decode_rest, so the same numbers, without the loop's Python (the cache update, the reshapes,
// 60 calls: 6-7% of a step on a Zen 5 in bf16, ~2 of a batch-1 step's ~20 ms on a Zen 3 in fp32).
// x [B * T, 1, H]; w: the layer's 10 weights (norm1, qkv, qkv bias, o, o bias, norm2, gate_up, its bias, down,
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
                         int64_t n, int64_t T, int64_t hk, int64_t D, Qkv qkv, Rest rest) {
  const size_t layers = cache_k.size();
  const int64_t B = x.size(0) / T;
  TORCH_CHECK(weights.size() == 10 * layers && cache_v.size() == layers && prompt_k.size() == layers &&
              prompt_v.size() == layers, "decode_layers: 10 weights, a K and V buffer and a prompt K/V per layer");
  for (size_t i = 0; i < layers; ++i) {
    const torch::Tensor* w = &weights[10 * i];
    TORCH_CHECK(cache_k[i].size(2) >= n + T && cache_v[i].size(2) >= n + T, "KV buffer out of room: ", n, " + ", T,
                " > ", cache_k[i].size(2));
    auto q = qkv(x, w);
    cache_k[i].narrow(2, n, T).copy_(q[1].reshape({B, T, hk, D}).transpose(1, 2));
    cache_v[i].narrow(2, n, T).copy_(q[2].reshape({B, T, hk, D}).transpose(1, 2));
    x = rest(i, x, q[0], cache_k[i].narrow(2, 0, n + T), cache_v[i].narrow(2, 0, n + T), w);
  }
  return x;
}
