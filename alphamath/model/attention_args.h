// decode_attention's arguments, checked once for both kernel sets (decode.cpp in bf16, avx2.cpp in fp32):
// q [B, Hk, g, D]; own_k/own_v [R, Hk, W, D]: the own rows, query row b continuing own row own_of[b] (a draft's
// positions are query rows of one own row; own_of empty: rows b * per .. b * per + per - 1 continue own row b,
// per = B / R); own_valid [B, W] bool or empty; prompt_k/prompt_v [G, Hk, L, D]; prompt_len [G]; group_of [B].
// It also groups the query rows by the prompt they continue, which both kernels parallelise over.
// extension.py folds this file's hash into the build flags, so editing it rebuilds both modules.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

struct AttentionArgs {
  int64_t B, Hk, g, D, G, W;
  torch::Tensor lengths, mask, owner;  // prompt_len, own_valid as bool, own_of (kept alive for the raw pointers)
  std::vector<int64_t> per_row;  // without own_of: b / per for each query row b (no tensor on the hot path)
  const int64_t* own() const {  // [B]: each query row's own row
    return owner.defined() ? owner.data_ptr<int64_t>() : per_row.data();
  }
  const int64_t* plen;          // [G]
  const bool* valid;            // [B, W], or null: every own column in use
  std::vector<std::vector<int64_t>> rows;  // the query rows of each prompt
};

inline AttentionArgs attention_args(const torch::Tensor& q, const torch::Tensor& own_k, const torch::Tensor& own_v,
                                    const torch::Tensor& own_valid, const torch::Tensor& prompt_k,
                                    const torch::Tensor& prompt_v, const torch::Tensor& prompt_len,
                                    const torch::Tensor& group_of, const torch::Tensor& own_of) {
  AttentionArgs a;
  a.B = q.size(0), a.Hk = q.size(1), a.g = q.size(2), a.D = q.size(3), a.G = prompt_k.size(0), a.W = own_k.size(2);
  const int64_t B = a.B, Hk = a.Hk, D = a.D, G = a.G;
  TORCH_CHECK(D == 64 || D == 128, "head_dim must be 64 or 128, got ", D);
  TORCH_CHECK(q.stride(3) == 1, "q's last dim must be contiguous");
  const int64_t R = own_k.size(0);
  TORCH_CHECK(R > 0 && own_k.size(1) == Hk && own_k.size(3) == D && own_k.stride(3) == 1, "own_k shape");
  if (own_of.numel()) {
    TORCH_CHECK(own_of.numel() == B, "own_of [B]");
    a.owner = own_of.to(at::kLong).contiguous();
    const int64_t* own = a.own();
    for (int64_t b = 0; b < B; ++b) TORCH_CHECK(own[b] >= 0 && own[b] < R, "own_of out of range");
  } else {
    TORCH_CHECK(B % R == 0, "without own_of, the query rows must be a multiple of the own rows");
    a.per_row.resize(B);
    for (int64_t b = 0; b < B; ++b) a.per_row[b] = b / (B / R);
  }
  TORCH_CHECK(own_v.sizes() == own_k.sizes() && own_v.strides() == own_k.strides(), "own_v must be laid out as own_k");
  TORCH_CHECK(prompt_k.size(1) == Hk && prompt_k.size(3) == D && prompt_k.stride(3) == 1, "prompt_k shape");
  TORCH_CHECK(prompt_v.sizes() == prompt_k.sizes() && prompt_v.strides() == prompt_k.strides(), "prompt_v layout");
  TORCH_CHECK(prompt_len.numel() == G && group_of.numel() == B, "prompt_len [G], group_of [B]");
  a.lengths = prompt_len.to(at::kLong).contiguous();
  a.plen = a.lengths.data_ptr<int64_t>();
  for (int64_t i = 0; i < G; ++i) TORCH_CHECK(a.plen[i] >= 0 && a.plen[i] <= prompt_k.size(2), "prompt_len out of range");
  auto grp = group_of.to(at::kLong).contiguous();
  const int64_t* go = grp.data_ptr<int64_t>();
  a.rows.assign(G, {});
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(go[b] >= 0 && go[b] < G, "group_of out of range");
    a.rows[go[b]].push_back(b);
  }
  a.valid = nullptr;
  if (own_valid.numel()) {
    a.mask = own_valid.to(at::kBool).contiguous();
    TORCH_CHECK(a.mask.size(0) == B && a.mask.size(1) == a.W, "own_valid [B, W]");
    a.valid = a.mask.data_ptr<bool>();
  }
  return a;
}

// Both kernels' tasks: a prompt's query rows, or a span of them, under one KV head (task t: span t / Hk, head
// t % Hk). With fewer (prompt, head) pairs than twice the threads (one or two prompts: batch 1 with drafts, an
// MCTS step of one leaf), each prompt's rows are split into spans so that no thread waits on another's second
// task (decode.cpp, 1 prompt x 5 / 20 rows: 1.13x / 1.31x, s45); a row's numbers do not depend on its neighbours.
struct RowSpan {  // a run of one prompt's query rows, viewing AttentionArgs::rows (no copy per call)
  int64_t group;    // the prompt
  const int64_t* p;
  int64_t n;
  int64_t size() const { return n; }
  int64_t operator[](int64_t i) const { return p[i]; }
};

inline std::vector<RowSpan> row_spans(const std::vector<std::vector<int64_t>>& rows, int64_t Hk) {
  const int64_t G = (int64_t)rows.size(), threads = at::get_num_threads();
  const int64_t parts = G * Hk < 2 * threads ? (2 * threads + G * Hk - 1) / (G * Hk) : 1;
  std::vector<RowSpan> spans;
  for (int64_t gi = 0; gi < G; ++gi) {
    const int64_t n = (int64_t)rows[gi].size(), k = std::min(parts, n);
    for (int64_t j = 0; j < k; ++j) spans.push_back({gi, rows[gi].data() + j * n / k, (j + 1) * n / k - j * n / k});
  }
  return spans;
}
