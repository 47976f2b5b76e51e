// A decode step's kernels for CPUs that compute fp32 (AVX2 + FMA + F16C, no native bf16); avx2.py says
// why they exist and how they are built and checked:
//   linear_f16        x w^T of fp32 rows, w held as fp16 panels of 16 outputs (pack_f16), fp32 sums;
//   rms_norm          transformers' LlamaRMSNorm of fp32 rows in one pass (torch: ~6 ops per call);
//   rope              rotary embedding of the q and k heads of a qkv projection (torch: ~8 ops);
//   decode_attention  attention over a batch's root, shared prompts and each row's own columns;
//   decode_qkv/rest   a decode step's decoder layer from the kernels above, in two calls;
//   decode_layers     every layer of a decode step, its cache writes and the final norm, in one call;
//   sample            one token per row from softmax(logits / T) by inverse CDF, and its log-prob.
//
// linear_f16: output panel b (16 outputs) of row r is sum_k x[r][k] * w[16 b + i][k]. A tile is up to 6
// rows x 16 outputs: 12 fp32 accumulators; per k the panel's 16 weights and 6 broadcasts of x feed 12
// FMAs. At up to 6 rows the tile reads the fp16 weights and converts them (F16C), and each thread
// streams its own contiguous run of panels, as fast as memory reads them. With more than 12 rows the call
// is compute-bound, and each chunk of a panel is converted to fp32 once for all its row tiles: converting
// it in every tile had spent FMA-port cycles on conversions. On a Zen 3 (s44, the trunk's 120 matmuls and
// the head, both builds alternated in one process) 24 / 48 / 96 / 150 / 255 rows ran 1.17 / 1.28 / 1.34 /
// 1.35 / 1.33x faster, 70-84 GMAC/s, at or above torch's fp32 F.linear there; 7-12 rows showed no gain. The
// numbers do not change: the conversion is exact and the sums' order the same.
#include <torch/extension.h>
#include "attention_args.h"
#include "decode_layers.h"
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t PANEL = 16;
constexpr int TR = 6;  // rows per tile: 12 accumulators, 2 weights and a broadcast in 16 ymm registers

// R rows of x [.., kc] (row stride ldx) through one chunk of a panel w [kc, 16] (fp16), into out (row
// stride N), added to what out holds unless `first`; `bias` (or null) is added at the end. Each output
// is one chain of sums in k order, so a row's result never depends on the other rows of the call.
template <int R, typename Wt>
inline void tile(const float* x, int64_t ldx, int64_t kc, const Wt* w, bool first, const float* bias,
                 float* out, int64_t N) {
  __m256 acc[R][2];
  _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  if (!first)  // (a conditional load per accumulator instead made gcc keep them on the stack)
    _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
      acc[r][0] = _mm256_loadu_ps(out + r * N);
      acc[r][1] = _mm256_loadu_ps(out + r * N + 8);
    }
  for (int64_t k = 0; k < kc; ++k) {
    // the weights 1 KB ahead: at a few rows a thread otherwise waits on each line (1 row: 12.0 -> 9.3 ms
    // for the trunk's 120 matmuls on a Zen 2)
    __m256 b0, b1;
    if constexpr (std::is_same_v<Wt, float>) {  // a chunk panel_rows converted once for all its row tiles
      b0 = _mm256_loadu_ps(w + k * PANEL);
      b1 = _mm256_loadu_ps(w + k * PANEL + 8);
    } else {
      if ((k & 1) == 0) _mm_prefetch((const char*)(w + (k + 32) * PANEL), _MM_HINT_T0);
      const __m256i h = _mm256_loadu_si256((const __m256i*)(w + k * PANEL));
      b0 = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
      b1 = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * ldx + k);
      acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
    }
  }
  _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
    __m256 v0 = acc[r][0], v1 = acc[r][1];
    if (bias) {
      v0 = _mm256_add_ps(v0, _mm256_loadu_ps(bias));
      v1 = _mm256_add_ps(v1, _mm256_loadu_ps(bias + 8));
    }
    _mm256_storeu_ps(out + r * N, v0);
    _mm256_storeu_ps(out + r * N + 8, v1);
  }
}

// Every row of x [M, K] through one panel, TR rows at a time, in chunks of KC k: a chunk of the panel
// (8 KB) and of a row tile (6 KB) stay in L1 while every row tile reads them. Without the chunks, a
// whole panel (18 KB, 48 KB for down's K = 1536) and the row tile did not fit L1 together, and 20 rows
// took twice fbgemm's time.
constexpr int64_t KC = 256;

// kc rows of a panel's fp16 weights -> fp32 (exact).
inline void convert_chunk(const uint16_t* w, int64_t kc, float* wf) {
  for (int64_t i = 0; i < kc * PANEL; i += 8)
    _mm256_storeu_ps(wf + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w + i))));
}

// Every row of x [M, .] (row stride K) through one chunk of kc k of a panel, TR rows at a time.
template <typename Wt>
void row_tiles(const float* xk, int64_t M, int64_t K, int64_t kc, const Wt* wk, bool first, const float* b,
               float* out, int64_t N) {
  int64_t r = 0;
  for (; r + TR <= M; r += TR) tile<TR>(xk + r * K, K, kc, wk, first, b, out + r * N, N);
  switch (M - r) {
    case 5: tile<5>(xk + r * K, K, kc, wk, first, b, out + r * N, N); break;
    case 4: tile<4>(xk + r * K, K, kc, wk, first, b, out + r * N, N); break;
    case 3: tile<3>(xk + r * K, K, kc, wk, first, b, out + r * N, N); break;
    case 2: tile<2>(xk + r * K, K, kc, wk, first, b, out + r * N, N); break;
    case 1: tile<1>(xk + r * K, K, kc, wk, first, b, out + r * N, N); break;
    default: break;
  }
}

void panel_rows(const float* x, int64_t M, int64_t K, const uint16_t* w, const float* bias, float* out, int64_t N) {
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kc = std::min(KC, K - k0);
    const bool first = k0 == 0;
    const float* b = k0 + kc == K ? bias : nullptr;
    const float* xk = x + k0;
    if (M > 2 * TR) {
      thread_local std::vector<float> wf;
      wf.resize((size_t)KC * PANEL);
      convert_chunk(w + k0 * PANEL, kc, wf.data());
      row_tiles(xk, M, K, kc, wf.data(), first, b, out, N);
    } else {
      row_tiles(xk, M, K, kc, w + k0 * PANEL, first, b, out, N);
    }
  }
}


inline __m256 exp8(__m256 x) {  // e^x for x <= 0: 2^n * 2^f, n = round(x log2 e), |f| <= 1/2, degree-7 Taylor
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(1.5252733804059840e-05f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.5403530393381609e-04f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-02f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650695910071e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718055994531e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline __m256 hsum8x8(const __m256 a[8]) {  // lane j = the sum of a[j]'s lanes
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// sc[i][j] = scale * q_i . k_j for the M queries q_i (D floats each, contiguous) and n keys (stride ks),
// -inf where use(j) is false; 8 keys at a time, each key block read once for all M queries.
template <int D, typename Use>
void scores(const float* q, int64_t M, const float* k, int64_t ks, int64_t n, float scale, Use use, float* sc,
            int64_t S) {
  constexpr int C = D / 8;
  int64_t j0 = 0;
  for (; j0 + 8 <= n; j0 += 8)
    for (int64_t i = 0; i < M; ++i) {
      __m256 acc[8];
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
      for (int c = 0; c < C; ++c) {
        const __m256 qv = _mm256_loadu_ps(q + i * D + 8 * c);
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + (j0 + j) * ks + 8 * c), acc[j]);
      }
      _mm256_storeu_ps(sc + i * S + j0, _mm256_mul_ps(hsum8x8(acc), _mm256_set1_ps(scale)));
    }
  for (; j0 < n; ++j0)
    for (int64_t i = 0; i < M; ++i) {
      __m256 acc = _mm256_setzero_ps();
      for (int c = 0; c < C; ++c)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i * D + 8 * c), _mm256_loadu_ps(k + j0 * ks + 8 * c), acc);
      sc[i * S + j0] = hsum(acc) * scale;
    }
  for (int64_t j = 0; j < n; ++j)
    if (!use(j))
      for (int64_t i = 0; i < M; ++i) sc[i * S + j] = -INFINITY;
}

// o += sum_j p_j v_j over n values (stride vs), D floats. `masked`: skip p_j = 0 (a row's own columns: a masked
// one's value may be stale, and 0 * inf is not 0); the root's and the prompt's values are all real, so they go
// without a test per key.
template <int D, bool masked>
inline void weighted_sum(const float* p, const float* v, int64_t vs, int64_t n, __m256* o) {
  for (int64_t j = 0; j < n; ++j) {
    if (masked && p[j] == 0.0f) continue;
    const __m256 pj = _mm256_set1_ps(p[j]);
    for (int c = 0; c < D / 8; ++c) o[c] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + j * vs + 8 * c), o[c]);
  }
}

// One (prompt group, KV head): the g query heads of every row continuing the prompt attend to the root's
// rlen keys (rk/rv, this head's [rlen, D]; rlen 0: the slot holds the prompt whole), the prompt's plen keys
// and the row's own valid columns, one softmax over all three. The root's keys come first, so a rooted
// prompt's scores are in the order its whole prompt's would be.
template <int D>
void task(int64_t grp, int64_t h, const RowSpan& rows, int64_t g, float scale,
          const float* q, const int64_t* qs, const float* pk, const float* pv, const int64_t* ps, int64_t plen,
          const float* ok, const float* ov, const int64_t* os, int64_t W, const int64_t* own, const bool* valid,
          const float* rk, const float* rv, int64_t rlen, float* out, const int64_t* outs) {
  const int64_t R = (int64_t)rows.size(), M = R * g, P = rlen + plen, S = P + W;
  auto all = [](int64_t) { return true; };
  thread_local std::vector<float> qf, sc;
  qf.resize((size_t)M * D);
  sc.resize((size_t)M * S);
  for (int64_t i = 0; i < M; ++i)
    std::memcpy(&qf[i * D], q + rows[i / g] * qs[0] + h * qs[1] + (i % g) * qs[2], D * sizeof(float));
  const float* pkb = pk + grp * ps[0] + h * ps[1];
  const float* pvb = pv + grp * ps[0] + h * ps[1];
  if (rlen) scores<D>(qf.data(), M, rk, D, rlen, scale, all, sc.data(), S);
  scores<D>(qf.data(), M, pkb, ps[2], plen, scale, all, sc.data() + rlen, S);
  for (int64_t r = 0; r < R; ++r) {  // own columns: each row's own keys
    const int64_t b = rows[r];
    scores<D>(&qf[r * g * D], g, ok + own[b] * os[0] + h * os[1], os[2], W, scale,
              [&](int64_t w) { return valid == nullptr || valid[b * W + w]; }, &sc[r * g * S + P], S);
  }
  for (int64_t i = 0; i < M; ++i) {
    float* si = &sc[i * S];
    // the row's max, 8 at a time (a scalar loop kept the running max in memory: a third of this task's time)
    __m256 mx8 = _mm256_set1_ps(-INFINITY);
    int64_t jm = 0;
    for (; jm + 8 <= S; jm += 8) mx8 = _mm256_max_ps(mx8, _mm256_loadu_ps(si + jm));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, mx8);
    float mx = lanes[0];
    for (int k = 1; k < 8; ++k) mx = std::max(mx, lanes[k]);
    for (; jm < S; ++jm) mx = std::max(mx, si[jm]);
    __m256 l8 = _mm256_setzero_ps();
    const __m256 m8 = _mm256_set1_ps(mx);
    int64_t j = 0;
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    for (; j + 8 <= S; j += 8) {
      const __m256 s8 = _mm256_loadu_ps(si + j);  // a masked column (-inf) weighs exactly 0, not e^-87
      const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(s8, m8)), _mm256_cmp_ps(s8, ninf, _CMP_NEQ_OQ));
      _mm256_storeu_ps(si + j, e);
      l8 = _mm256_add_ps(l8, e);
    }
    float l = hsum(l8);
    for (; j < S; ++j) {
      si[j] = si[j] == -INFINITY ? 0.0f : std::exp(si[j] - mx);
      l += si[j];
    }
    __m256 o[D / 8];
    for (int c = 0; c < D / 8; ++c) o[c] = _mm256_setzero_ps();
    const int64_t b = rows[i / g];
    if (rlen) weighted_sum<D, false>(si, rv, D, rlen, o);
    weighted_sum<D, false>(si + rlen, pvb, ps[2], plen, o);
    weighted_sum<D, true>(si + P, ov + own[b] * os[0] + h * os[1], os[2], W, o);
    const __m256 inv = _mm256_set1_ps(1.0f / l);
    float* oi = out + b * outs[0] + h * outs[1] + (i % g) * outs[2];
    for (int c = 0; c < D / 8; ++c) _mm256_storeu_ps(oi + 8 * c, _mm256_mul_ps(o[c], inv));
  }
}

}  // namespace

// w [N, K] (float) -> fp16 [N / 16, K, 16]: panel b, row k holds w[16 b + i][k] for i < 16 (round to nearest even).
torch::Tensor pack_f16(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.size(0) % PANEL == 0, "pack_f16 takes a weight [N, K] with N a multiple of 16");
  const int64_t N = w.size(0), K = w.size(1);
  return w.to(at::kHalf).reshape({N / PANEL, PANEL, K}).transpose(1, 2).contiguous();
}

// x [..., K] fp32, wp = pack_f16(w), bias [N] fp32 or empty -> x w^T + bias [..., N] fp32.
torch::Tensor linear_f16(torch::Tensor x, torch::Tensor wp, torch::Tensor bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && wp.scalar_type() == at::kHalf && wp.dim() == 3 &&
              wp.size(2) == PANEL, "linear_f16 takes fp32 x and a pack_f16 weight");
  const int64_t B = wp.size(0), K = wp.size(1), N = PANEL * B;
  TORCH_CHECK(x.size(-1) == K, "x [..., ", K, "], got last dim ", x.size(-1));
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  x = x.reshape({-1, K}).contiguous();
  wp = wp.contiguous();
  const int64_t M = x.size(0);
  auto out = torch::empty({M, N}, x.options());
  torch::Tensor b32;
  const float* bp = nullptr;
  if (bias.numel()) {
    TORCH_CHECK(bias.numel() == N, "bias [", N, "]");
    b32 = bias.to(at::kFloat).contiguous();
    bp = b32.data_ptr<float>();
  }
  if (M == 0) return out.view(sizes);
  const float* xp = x.data_ptr<float>();
  const uint16_t* w = (const uint16_t*)wp.data_ptr<at::Half>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      panel_rows(xp, M, K, w + b * K * PANEL, bp ? bp + PANEL * b : nullptr, op + PANEL * b, N);
  });
  return out.view(sizes);
}

// y = w * (x * rsqrt(mean(x^2) + eps)) of fp32 rows x [..., H], w [H] fp32: F.rms_norm's numbers (the
// sum of squares in fp64, so its order does not matter at fp32 precision), in one pass per row.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "rms_norm takes fp32");
  const int64_t H = x.size(-1);
  TORCH_CHECK(weight.numel() == H && H % 8 == 0, "weight [", H, "], H a multiple of 8");
  auto xc = x.contiguous();
  auto wc = weight.contiguous();
  auto out = torch::empty_like(xc);
  const int64_t rows = xc.numel() / H;
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  auto norm_rows = [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * H;
      __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
      for (int64_t i = 0; i < H; i += 8) {
        const __m256 v = _mm256_loadu_ps(xr + i);
        const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
        s0 = _mm256_fmadd_pd(lo, lo, s0);
        s1 = _mm256_fmadd_pd(hi, hi, s1);
      }
      double part[4];
      _mm256_storeu_pd(part, _mm256_add_pd(s0, s1));
      const double mean = (part[0] + part[1] + part[2] + part[3]) / (double)H;
      const __m256 inv = _mm256_set1_ps((float)(1.0 / std::sqrt((double)(float)mean + eps)));
      for (int64_t i = 0; i < H; i += 8)
        _mm256_storeu_ps(op + r * H + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + i), inv),
                                                       _mm256_loadu_ps(wp + i)));
    }
  };
  if (rows <= 16) norm_rows(0, rows);  // a decode step's few rows: one thread (a fork costs more than a row)
  else at::parallel_for(0, rows, 16, norm_rows);
  return out;
}

// q [B, Hk, g, D]; own_k/own_v [R, Hk, W, D] (last dim contiguous); own_valid [B, W] bool (per query row) or
// empty; prompt_k/prompt_v [G, Hk, L, D]; prompt_len [G]; group_of [B]; own_of [B] (query row b continues own
// row own_of[b]: a draft's positions continue one row) or empty (attention_args.h). The root (kv.py's _Batch: a
// prefix its rooted prompts share, held once): root_k/root_v [Hk, Lr, D] contiguous, root_len [G] its length
// for each prompt, 0 where the slot holds the prompt whole; all three empty: no root. Returns [B, Hk, g, D], fp32.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor own_k, torch::Tensor own_v, torch::Tensor own_valid,
                               torch::Tensor prompt_k, torch::Tensor prompt_v, torch::Tensor prompt_len,
                               torch::Tensor group_of, torch::Tensor own_of, double scale, torch::Tensor root_k,
                               torch::Tensor root_v, torch::Tensor root_len) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && own_k.scalar_type() == at::kFloat && own_v.scalar_type() == at::kFloat &&
              prompt_k.scalar_type() == at::kFloat && prompt_v.scalar_type() == at::kFloat,
              "decode_attention (avx2) computes fp32");
  const AttentionArgs a = attention_args(q, own_k, own_v, own_valid, prompt_k, prompt_v, prompt_len, group_of, own_of);
  const int64_t B = a.B, Hk = a.Hk, g = a.g, D = a.D, G = a.G, W = a.W;
  const int64_t *pl = a.plen, *own = a.own();
  const auto& rows = a.rows;
  const bool* valid = a.valid;
  const bool rooted = root_len.numel() > 0;
  torch::Tensor rl;
  int64_t Lr = 0;
  if (rooted) {
    TORCH_CHECK(root_k.scalar_type() == at::kFloat && root_v.scalar_type() == at::kFloat && root_k.dim() == 3 &&
                root_k.is_contiguous() && root_v.is_contiguous() && root_k.sizes() == root_v.sizes() &&
                root_k.size(0) == Hk && root_k.size(2) == D && root_len.numel() == G,
                "root_k / root_v must be one prompt's fp32 K/V [Hk, Lr, D], contiguous; root_len [G]");
    Lr = root_k.size(1);
    rl = root_len.to(at::kLong).contiguous();
    for (int64_t i = 0; i < G; ++i)
      TORCH_CHECK(rl.data_ptr<int64_t>()[i] >= 0 && rl.data_ptr<int64_t>()[i] <= Lr, "root_len out of range");
  }
  const int64_t* rlp = rooted ? rl.data_ptr<int64_t>() : nullptr;
  const float *rkp = rooted ? root_k.data_ptr<float>() : nullptr, *rvp = rooted ? root_v.data_ptr<float>() : nullptr;
  auto out = torch::empty({B, Hk, g, D}, q.options());
  const int64_t qs[3] = {q.stride(0), q.stride(1), q.stride(2)};
  const int64_t ps[3] = {prompt_k.stride(0), prompt_k.stride(1), prompt_k.stride(2)};
  const int64_t os[3] = {own_k.stride(0), own_k.stride(1), own_k.stride(2)};
  const int64_t outs[3] = {out.stride(0), out.stride(1), out.stride(2)};
  const float *qp = q.data_ptr<float>(), *pk = prompt_k.data_ptr<float>(), *pv = prompt_v.data_ptr<float>();
  const float *ok = own_k.data_ptr<float>(), *ov = own_v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const std::vector<RowSpan> spans = row_spans(rows, Hk);
  at::parallel_for(0, (int64_t)spans.size() * Hk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const RowSpan& span = spans[t / Hk];
      const int64_t gi = span.group, h = t % Hk;
      const int64_t rlen = rooted ? rlp[gi] : 0;
      const float *rk = rlen ? rkp + h * Lr * D : nullptr, *rv = rlen ? rvp + h * Lr * D : nullptr;
      if (D == 64)
        task<64>(gi, h, span, g, (float)scale, qp, qs, pk, pv, ps, pl[gi], ok, ov, os, W, own, valid, rk, rv, rlen,
                 op, outs);
      else
        task<128>(gi, h, span, g, (float)scale, qp, qs, pk, pv, ps, pl[gi], ok, ov, os, W, own, valid, rk, rv,
                  rlen, op, outs);
    }
  });
  return out;
}

// qk = x * cos + rotate_half(x) * sin for the first `heads` heads of qkv [B, S, H, D], cos/sin [B, S, D];
// rotate_half(x) = cat(-x[D/2:], x[:D/2]). Returns [B, S, heads, D].
torch::Tensor rope(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t heads) {
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "rope (avx2) takes fp32");
  const int64_t B = qkv.size(0), S = qkv.size(1), H = qkv.size(2), D = qkv.size(3), half = D / 2;
  TORCH_CHECK(D % 16 == 0 && heads <= H && cos.size(-1) == D, "rope: D a multiple of 16, heads <= H");
  auto x = qkv.contiguous();
  auto c = cos.expand({B, S, D}).contiguous();
  auto s = sin.expand({B, S, D}).contiguous();
  auto out = torch::empty({B, S, heads, D}, x.options());
  const float *xp = x.data_ptr<float>(), *cp = c.data_ptr<float>(), *sp = s.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t bs = 0; bs < B * S; ++bs) {
    const float *cb = cp + bs * D, *sb = sp + bs * D;
    for (int64_t h = 0; h < heads; ++h) {
      const float* xh = xp + (bs * H + h) * D;
      float* oh = op + (bs * heads + h) * D;
      for (int64_t i = 0; i < half; i += 8) {
        const __m256 lo = _mm256_loadu_ps(xh + i), hi = _mm256_loadu_ps(xh + half + i);
        // out[i] = x[i] cos[i] - x[i + half] sin[i];  out[i + half] = x[i + half] cos[i + half] + x[i] sin[i + half]
        _mm256_storeu_ps(oh + i, _mm256_sub_ps(_mm256_mul_ps(lo, _mm256_loadu_ps(cb + i)),
                                               _mm256_mul_ps(hi, _mm256_loadu_ps(sb + i))));
        _mm256_storeu_ps(oh + half + i, _mm256_add_ps(_mm256_mul_ps(hi, _mm256_loadu_ps(cb + half + i)),
                                                      _mm256_mul_ps(lo, _mm256_loadu_ps(sb + half + i))));
      }
    }
  }
  return out;
}

// decode_qkv: a decode step's q, k, v of one decoder layer: rope(qkv(rms_norm(x))), x [B, 1, H].
std::vector<torch::Tensor> decode_qkv(torch::Tensor x, torch::Tensor norm, torch::Tensor qkv_w, torch::Tensor qkv_b,
                                      torch::Tensor cos, torch::Tensor sin, int64_t hq, int64_t hk, double eps) {
  const int64_t B = x.size(0), D = cos.size(-1);
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "decode_qkv takes one new token per row: x [B, 1, H]");
  auto qkv = linear_f16(rms_norm(x, norm, eps), qkv_w, qkv_b).view({B, 1, hq + 2 * hk, D});
  auto qk = rope(qkv, cos, sin, hq + hk);
  return {qk.narrow(2, 0, hq).transpose(1, 2), qk.narrow(2, hq, hk).transpose(1, 2),
          qkv.narrow(2, hq + hk, hk).transpose(1, 2)};
}

// decode_rest: x + o(attention), then + down(silu(gate) * up) with gate|up = gate_up(norm2(x)); k/v are the
// rows' own columns after the update [B, hk, W, D].
torch::Tensor decode_rest(torch::Tensor x, torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor own_valid,
                          torch::Tensor prompt_k, torch::Tensor prompt_v, torch::Tensor prompt_len,
                          torch::Tensor group_of, torch::Tensor own_of, double scale, torch::Tensor o_w,
                          torch::Tensor o_b, torch::Tensor norm2, torch::Tensor gate_up_w, torch::Tensor gate_up_b,
                          torch::Tensor down_w, torch::Tensor down_b, double eps, torch::Tensor root_k,
                          torch::Tensor root_v, torch::Tensor root_len) {
  const int64_t B = x.size(0), hq = q.size(1), D = q.size(3), hk = k.size(1);
  auto o = decode_attention(q.reshape({B, hk, hq / hk, D}), k, v, own_valid, prompt_k, prompt_v, prompt_len, group_of,
                            own_of, scale, root_k, root_v, root_len);
  x = x + linear_f16(o.reshape({B, 1, hq * D}), o_w, o_b);
  auto gate_up = linear_f16(rms_norm(x, norm2, eps), gate_up_w, gate_up_b);
  const int64_t I = gate_up.size(-1) / 2;
  return x + linear_f16(at::silu(gate_up.narrow(-1, 0, I)) * gate_up.narrow(-1, I, I), down_w, down_b);
}

// 8 logits as fp32: bf16 is fp32's upper half, so the conversion is exact.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

template <typename T>
void sample_rows(const T* x0, int64_t B, int64_t V, const float* up, float inv_t, int64_t* tp, float* lp) {
  const int64_t V8 = V / 8 * 8;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const T* x = x0 + b * V;
      __m256 mv = _mm256_set1_ps(-INFINITY);
      for (int64_t j = 0; j < V8; j += 8) mv = _mm256_max_ps(mv, load8(x + j));
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, mv);
      float m = *std::max_element(lanes, lanes + 8);
      for (int64_t j = V8; j < V; ++j) m = std::max(m, (float)x[j]);
      const __m256 vm = _mm256_set1_ps(m), vt = _mm256_set1_ps(inv_t);
      auto block = [&](int64_t j) { return exp8(_mm256_mul_ps(_mm256_sub_ps(load8(x + j), vm), vt)); };
      auto one = [&](int64_t j) { return std::exp(((float)x[j] - m) * inv_t); };
      double total = 0;
      for (int64_t j = 0; j < V8; j += 8) total += hsum(block(j));
      for (int64_t j = V8; j < V; ++j) total += one(j);
      const double target = (double)up[b] * total;
      double run = 0;
      int64_t tok = -1;
      for (int64_t j = 0; j < V8 && tok < 0; j += 8) {
        const __m256 e = block(j);
        const double s = hsum(e);
        if (run + s <= target) { run += s; continue; }
        alignas(32) float ev[8];
        _mm256_store_ps(ev, e);
        for (int k = 0; k < 8; ++k) {
          run += ev[k];
          if (run > target) { tok = j + k; break; }
        }
        if (tok < 0) tok = j + 7;  // rounding: the block's sum passed the target, its elements did not
      }
      for (int64_t j = V8; j < V && tok < 0; ++j) {
        run += one(j);
        if (run > target) tok = j;
      }
      if (tok < 0) tok = V - 1;  // u * total rounded past the last boundary (as torch's clamp)
      tp[b] = tok;
      lp[b] = (float)(((float)x[tok] - m) * inv_t - std::log(total));
    }
  });
}

// logits [B, V] fp32 or bf16, u [B] uniforms in [0, 1), temperature > 0 -> (tokens [B] int64, log-probs [B] fp32).
// Row b's token is the first j whose cumulative probability exceeds u_b (torch.searchsorted(cdf, u *
// cdf[-1], right=True) over softmax(logits / T)), in three passes over the row: max, sum of
// exp((x - max) / T), then the scan, 8 at a time, recomputing the same exps. log p = (x - max) / T - log sum.
// The engine's one sampler on every CPU with AVX2. bf16 logits (a bf16 model's head) are read as they are,
// converted exactly as they load: the same draws as their fp32 copy, without making one (a 48-row step's was
// 9.4 MB, written and then read again). The torch path (softmax, cumsum, searchsorted, log over the 49k
// vocabulary) took 0.18 ms a row, this 0.04 (Zen 3).
std::vector<torch::Tensor> sample(torch::Tensor logits, torch::Tensor u, double temperature) {
  TORCH_CHECK(logits.dim() == 2 && (logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16),
              "logits must be [B, V] fp32 or bf16");
  TORCH_CHECK(temperature > 0, "sample needs temperature > 0 (greedy picks the argmax)");
  logits = logits.contiguous();
  auto uu = u.to(at::kFloat).contiguous();
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(uu.numel() == B && V > 0, "one uniform per row");
  auto tokens = torch::empty({B}, at::kLong);
  auto logp = torch::empty({B}, at::kFloat);
  const float inv_t = (float)(1.0 / temperature);
  if (logits.scalar_type() == at::kFloat)
    sample_rows(logits.data_ptr<float>(), B, V, uu.data_ptr<float>(), inv_t, tokens.data_ptr<int64_t>(),
                logp.data_ptr<float>());
  else
    sample_rows(logits.data_ptr<at::BFloat16>(), B, V, uu.data_ptr<float>(), inv_t, tokens.data_ptr<int64_t>(),
                logp.data_ptr<float>());
  return {tokens, logp};
}

// decode_layers: every decoder layer of a decode step and the final norm in one call (decode_layers.h's loop
// over decode_qkv and decode_rest), as decode.cpp's is for bf16; matmul weights as pack_f16 panels.
torch::Tensor decode_layers(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, torch::Tensor own_valid,
                            std::vector<torch::Tensor> weights, std::vector<torch::Tensor> cache_k,
                            std::vector<torch::Tensor> cache_v, int64_t n, int64_t T,
                            std::vector<torch::Tensor> prompt_k, std::vector<torch::Tensor> prompt_v,
                            torch::Tensor prompt_len, torch::Tensor group_of, torch::Tensor own_of, torch::Tensor col,
                            std::vector<torch::Tensor> root_k, std::vector<torch::Tensor> root_v,
                            torch::Tensor root_len, double scale, int64_t hq, int64_t hk, double eps,
                            torch::Tensor final_norm) {
  const bool rooted = root_len.numel() > 0;
  TORCH_CHECK(!rooted || (root_k.size() == cache_k.size() && root_v.size() == cache_k.size()),
              "decode_layers: a root's K/V for every layer");
  x = layer_loop(
      x, weights, cache_k, cache_v, prompt_k, prompt_v, n, T, own_of, col, hk, cos.size(-1),
      [&](const torch::Tensor& h, const torch::Tensor* w) {
        return decode_qkv(h, w[0], w[1], w[2], cos, sin, hq, hk, eps);
      },
      [&](size_t i, const torch::Tensor& h, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
          const torch::Tensor* w) {
        return decode_rest(h, q, k, v, own_valid, prompt_k[i], prompt_v[i], prompt_len, group_of, own_of, scale, w[3],
                           w[4], w[5], w[6], w[7], w[8], w[9], eps, rooted ? root_k[i] : torch::empty({0}),
                           rooted ? root_v[i] : torch::empty({0}), root_len);
      });
  return rms_norm(x, final_norm, eps);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("pack_f16", &pack_f16, "a weight [N, K] as fp16 panels of 16 outputs [N / 16, K, 16], for linear_f16", nogil);
  m.def("linear_f16", &linear_f16, "x w^T (+ bias) of fp32 rows and a pack_f16 weight (AVX2, F16C)", nogil);
  m.def("rms_norm", &rms_norm, "LlamaRMSNorm of fp32 rows, in one pass (AVX2)", nogil);
  m.def("rope", &rope, "rotary embedding of the q and k heads of an fp32 qkv projection (AVX2)", nogil);
  m.def("decode_attention", &decode_attention, "shared-prompt decode attention (fp32, AVX2)", nogil);
  m.def("decode_qkv", &decode_qkv, "a decode step's q, k, v of one decoder layer (fp32, AVX2)", nogil);
  m.def("decode_rest", &decode_rest, "a decode step's attention and MLP of one decoder layer (fp32, AVX2)", nogil);
  m.def("decode_layers", &decode_layers, "a decode step's decoder layers, cache writes and final norm (fp32, AVX2)",
        nogil);
  m.def("sample", &sample, "inverse-CDF sampling from softmax(logits / T), with the token's log-prob (AVX2)", nogil);
}
