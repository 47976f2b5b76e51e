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
#include <cstring>
#include <vector>

// The rows' new K (or V) columns into a layer's cache buffer: query row r's head h (src [Q, 1, heads, D] viewed as
// [Q, hk, 1, D] by its strides, D contiguous) into buf[own(r), h, col(r)], own(r) = own_of[r] or r / T and col(r)
// = at_col[r] or n + r % T; ragged, the step's columns no query writes are zeroed first. Raw copies of D elements:
// torch's strided copy_ (or zero_ and index_put_, ragged) cost ~10 us a call, 60-120 calls a step.
inline void write_columns(const torch::Tensor& buf, const torch::Tensor& src, int64_t n, int64_t T,
                          const int64_t* own_of, const int64_t* at_col, int64_t hk, int64_t D) {
  TORCH_CHECK(buf.stride(3) == 1 && src.stride(3) == 1 && buf.scalar_type() == src.scalar_type() && src.size(1) == hk &&
              src.size(3) == D, "write_columns: K/V [Q, hk, 1, D] with D contiguous into a buffer of its dtype");
  const int64_t Q = src.size(0), es = buf.element_size(), bytes = D * es;
  char* bp = (char*)buf.data_ptr();
  const char* sp = (const char*)src.data_ptr();
  const int64_t b0 = buf.stride(0) * es, b1 = buf.stride(1) * es, b2 = buf.stride(2) * es;
  const int64_t s0 = src.stride(0) * es, s1 = src.stride(1) * es;
  if (own_of != nullptr)
    for (int64_t b = 0; b < buf.size(0); ++b)
      for (int64_t h = 0; h < hk; ++h)
        for (int64_t t = 0; t < T; ++t) std::memset(bp + b * b0 + h * b1 + (n + t) * b2, 0, bytes);
  for (int64_t r = 0; r < Q; ++r) {
    const int64_t b = own_of ? own_of[r] : r / T, c = own_of ? at_col[r] : n + r % T;
    for (int64_t h = 0; h < hk; ++h) std::memcpy(bp + b * b0 + h * b1 + c * b2, sp + r * s0 + h * s1, bytes);
  }
}

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
  torch::Tensor owner, at_col;  // ragged: each query row's own row, and its column n + col
  if (ragged) {
    owner = own_of.to(at::kLong).contiguous();
    at_col = (col.to(at::kLong) + n).contiguous();
    for (int64_t r = 0; r < Q; ++r)
      TORCH_CHECK(owner.data_ptr<int64_t>()[r] >= 0 && owner.data_ptr<int64_t>()[r] < cache_k[0].size(0) &&
                  at_col.data_ptr<int64_t>()[r] >= n && at_col.data_ptr<int64_t>()[r] < n + T,
                  "decode_layers: own_of or col out of range");
  }
  const int64_t* op = ragged ? owner.data_ptr<int64_t>() : nullptr;
  const int64_t* cp = ragged ? at_col.data_ptr<int64_t>() : nullptr;
  TORCH_CHECK(weights.size() == 10 * layers && cache_v.size() == layers && prompt_k.size() == layers &&
              prompt_v.size() == layers, "decode_layers: 10 weights, a K and V buffer and a prompt K/V per layer");
  for (size_t i = 0; i < layers; ++i) {
    const torch::Tensor* w = &weights[10 * i];
    TORCH_CHECK(cache_k[i].size(2) >= n + T && cache_v[i].size(2) >= n + T, "KV buffer out of room: ", n, " + ", T,
                " > ", cache_k[i].size(2));
    TORCH_CHECK(cache_v[i].size(0) == cache_k[i].size(0) && (ragged || cache_k[i].size(0) == B),
                "decode_layers: a K and V buffer row per own row");
    auto q = qkv(x, w);  // q, k, v [Q, heads, 1, D]
    write_columns(cache_k[i], q[1], n, T, op, cp, hk, D);
    write_columns(cache_v[i], q[2], n, T, op, cp, hk, D);
    x = rest(i, x, q[0], cache_k[i].narrow(2, 0, n + T), cache_v[i].narrow(2, 0, n + T), w);
  }
  return x;
}
