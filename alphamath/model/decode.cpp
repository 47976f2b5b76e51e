// A decode step's hot spots beside the matmuls, for CPUs with AVX512-BF16 (decode.py says why
// they exist and how they are built and checked):
//   decode_attention  attention over shared prompts and each row's own columns (bf16);
//   rms_norm          transformers' LlamaRMSNorm of bf16 rows in one pass (torch: ~10 ops per call);
//   rope              rotary embedding of the q and k heads of a bf16 qkv projection (torch: ~8 ops);
//   linear            x w^T of bf16 rows, the weight laid out in vdpbf16ps pairs (pack_linear), which is
//                     also AMX's B-tile layout: with AMX, linear_tiles multiplies the same weights in tiles;
//   decode_qkv/rest   a decode step's decoder layer from the kernels above, in two calls;
//   lay_tiles         a prompt's K/V into its decode batch's prompt slab, as prompt_tiles lays them out.
//
// decode_attention: a task is one (prompt group, KV head). Its queries are the g folded query heads of every row that
// continues the prompt, M = rows * g. For each query i
//     s_ij = scale * q_i . k_j     over the root's keys (if the prompt continues the batch's root), the prompt's
//                                  keys j < len(group) and the row's valid own keys
//     o_i  = sum_j softmax(s_i)_j v_j
// in three passes over a scratch row of scores (root keys, prompt keys, own keys): scores, softmax, P.V.
// The prompt's keys are read once per task whatever M is: they are laid out as bf16 pairs by key
// (Kt[p][j] = k_j[2p:2p+2]) so one vdpbf16ps multiplies a query pair into 16 keys at once.
#include <torch/extension.h>
#include "attention_args.h"
#include "decode_layers.h"
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using bf16 = at::BFloat16;
constexpr int QC = 16;  // queries per block of the score kernel (up to 16 accumulators)

inline __m512 load16(const bf16* p) {  // 16 bf16 -> 16 fp32 (exact: bf16 is fp32's upper half)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

inline __m512 exp16(__m512 x) {  // e^x for x <= 0: 2^n * 2^f, n = round(x log2 e), |f| <= 1/2, degree-7 Taylor
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5252733804059840e-05f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381609e-04f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// r[i] lane j -> r[j] lane i: a 16 x 16 transpose of 32-bit elements (unpack 32, unpack 64, two 128-bit shuffles).
// Laying the prompt's keys out by pair this way took about half the time of a scalar loop's whole task.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + 4 + j], 0x88);
      t[i + 4 + j] = _mm512_shuffle_i32x4(r[i + j], r[i + 4 + j], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd);
  }
}

// ---- AMX tiles (CPUs with AMX-BF16): the same pack_linear layout is AMX's B-tile layout ----
// A B tile is 16 pairs (32 k) x 16 outputs, 64 bytes a row: rows 16 c .. 16 c + 15 of a block's pairs,
// contiguous. An A tile is up to 16 rows x 32 k of x. TDPBF16PS adds A.B into an fp32 C tile of
// rows x 16 outputs, over k in pair order, as vdpbf16ps does.
struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool g_amx = false;          // linear multiplies with tiles (set_tiles)
int g_amx_granted = -1;      // Linux grants the tile state once per process: -1 not asked yet

// One layout for every tile kernel here: tiles 0-3 (C) and 4-5 (A) of m rows, 6-7 (B) of 16 rows (pairs).
void tile_config(int64_t m) {
  TileConfig c;
  for (int t = 0; t < 6; ++t) { c.rows[t] = (uint8_t)m; c.colsb[t] = 64; }
  for (int t = 6; t < 8; ++t) { c.rows[t] = 16; c.colsb[t] = 64; }
  _tile_loadconfig(&c);
}

// n keys (key j at k + j * stride, D = 2P bf16 dims) laid out by pair, zeros up to cols (a multiple of 16):
// out[p * cols + j] = key j's dims 2p, 2p + 1, 16 keys x 16 pairs at a time, transposed in registers.
// The next 16 keys are prefetched while these are transposed: the slab's and own columns' K/V are read from memory
// once per step and layer, and the loads' latency, not the shuffles, had been most of this loop's time.
template <int P>
inline void keys_by_pair(const bf16* k, int64_t stride, int64_t n, int64_t cols, uint32_t* out) {
  for (int64_t j0 = 0; j0 < cols; j0 += 16) {
    for (int64_t i = j0 + 16; i < std::min<int64_t>(j0 + 32, n); ++i)
      for (int64_t b = 0; b < P * 4; b += 64) _mm_prefetch((const char*)(k + i * stride) + b, _MM_HINT_T0);
    for (int p0 = 0; p0 < P; p0 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = j0 + i < n ? _mm512_loadu_si512((const uint32_t*)(k + (j0 + i) * stride) + p0) : _mm512_setzero_si512();
      transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(&out[(p0 + i) * cols + j0], r[i]);
    }
  }
}

// C queries' scores against `cols` keys laid out by pair (keys[p * stride + j] = key j's dims 2p, 2p + 1): for
// each 16 keys, C accumulators over the P pairs in order, scaled, -inf from key `len` on; out[c * S + j].
template <int C, int P>
inline void score_block(const uint32_t* qp, const uint32_t* keys, int64_t stride, int64_t cols, int64_t len,
                        __m512 vscale, float* out, int64_t S) {
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  for (int64_t j0 = 0; j0 < cols; j0 += 16) {
    __m512 acc[C];
    for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
    for (int p = 0; p < P; ++p) {
      __m512bh kv = (__m512bh)_mm512_loadu_si512(&keys[p * stride + j0]);
      for (int c = 0; c < C; ++c)
        acc[c] = _mm512_dpbf16_ps(acc[c], (__m512bh)_mm512_set1_epi32((int)qp[c * P + p]), kv);
    }
    const __mmask16 in = (j0 + 16 <= len) ? (__mmask16)0xFFFF : (__mmask16)((1u << std::max<int64_t>(len - j0, 0)) - 1);
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(&out[c * S + j0], _mm512_mask_mul_ps(ninf, in, acc[c], vscale));
  }
}

// score_block over M queries (query i's pairs at qp[i * P]), in as few blocks of at most QC as M allows, of near
// equal size: each accumulator is a chain of P dependent vdpbf16ps, so a block of fewer queries than the pipeline holds
// in flight waits on their latency. A task of 3 rows x 3 heads scores its 9 queries in one block, where 8 + 1 had cost
// the lone query's chain nearly as much again as the other 8 (s49); out[i * S + j].
template <int P>
inline void score_rows(const uint32_t* qp, int64_t M, const uint32_t* keys, int64_t stride, int64_t cols,
                       int64_t len, __m512 vscale, float* out, int64_t S) {
  const int64_t blocks = (M + QC - 1) / QC;
  for (int64_t b = 0, i0 = 0; b < blocks; ++b) {
    const int64_t c = (M - i0) / (blocks - b);  // the rest split evenly, the larger blocks last
    const uint32_t* qb = qp + i0 * P;
    float* o = out + i0 * S;
    switch (c) {
      case 16: score_block<16, P>(qb, keys, stride, cols, len, vscale, o, S); break;
      case 15: score_block<15, P>(qb, keys, stride, cols, len, vscale, o, S); break;
      case 14: score_block<14, P>(qb, keys, stride, cols, len, vscale, o, S); break;
      case 13: score_block<13, P>(qb, keys, stride, cols, len, vscale, o, S); break;
      case 12: score_block<12, P>(qb, keys, stride, cols, len, vscale, o, S); break;
      case 11: score_block<11, P>(qb, keys, stride, cols, len, vscale, o, S); break;
      case 10: score_block<10, P>(qb, keys, stride, cols, len, vscale, o, S); break;
      case 9: score_block<9, P>(qb, keys, stride, cols, len, vscale, o, S); break;
      case 8: score_block<8, P>(qb, keys, stride, cols, len, vscale, o, S); break;
      case 7: score_block<7, P>(qb, keys, stride, cols, len, vscale, o, S); break;
      case 6: score_block<6, P>(qb, keys, stride, cols, len, vscale, o, S); break;
      case 5: score_block<5, P>(qb, keys, stride, cols, len, vscale, o, S); break;
      case 4: score_block<4, P>(qb, keys, stride, cols, len, vscale, o, S); break;
      case 3: score_block<3, P>(qb, keys, stride, cols, len, vscale, o, S); break;
      case 2: score_block<2, P>(qb, keys, stride, cols, len, vscale, o, S); break;
      default: score_block<1, P>(qb, keys, stride, cols, len, vscale, o, S); break;
    }
    i0 += c;
  }
}

template <int D>
void task(int64_t grp, int64_t h, const RowSpan& rows, int64_t g, float scale,
          const bf16* q, const int64_t* qs,                       // q [B, Hk, g, D] contiguous
          const bf16* pk, const bf16* pv, const int64_t* ps, int64_t plen,  // prompt K/V [G, Hk, L, D]
          const bf16* ok, const bf16* ov, const int64_t* os, int64_t W,     // own K/V [R, Hk, W, D]
          const int64_t* own,                                   // query row b continues own row own[b]
          const bool* valid, int64_t vs,                        // own columns in use [B, W] or null
          const bf16* kt, const bf16* vt, int64_t Lq,           // prompt_tiles' kt / vt of this task, or null
          const bf16* rkt, const bf16* rvt, int64_t Lrq, int64_t rlen,  // the root's tiles of this head, its length
          bf16* out) {
  constexpr int P = D / 2, V16 = D / 16, VC = D == 64 ? 6 : 2;  // VC queries per P.V pass: VC * V16 accumulators
  const int64_t R = (int64_t)rows.size(), M = R * g, Mp = (M + QC - 1) / QC * QC;
  // Score columns: the root's keys (rlen > 0), the prompt's, the row's own.
  const int64_t Lr = (rlen + 31) / 32 * 32, Lp = (plen + 15) / 16 * 16, Wp = (W + 15) / 16 * 16, S = Lr + Lp + Wp;
  // Scratch kept per thread across tasks and steps (a step runs G * Hk tasks per layer): sized, not
  // reallocated; qp is zeroed and kt's padding written as zeros, because their padding is read.
  thread_local std::vector<uint32_t> ks, qp, pp;
  thread_local std::vector<float> sc, o, inv_l;
  if (!kt) ks.resize((size_t)P * Lp);  // every column up to Lp is written below (zeros past plen)
  qp.assign((size_t)Mp * P, 0);
  sc.resize((size_t)M * S);
  o.resize((size_t)M * D);
  inv_l.resize(M);
  pp.resize((size_t)M * ((Lr + Lp) / 2));
  auto qrow = [&](int64_t i) { return q + rows[i / g] * qs[0] + h * qs[1] + (i % g) * qs[2]; };
  for (int64_t i = 0; i < M; ++i) std::memcpy(&qp[i * P], qrow(i), D * sizeof(bf16));
  const __m512 vscale = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-INFINITY);
  const bool tiles = kt != nullptr && D == 64;
  if (tiles) {
    // ---- AMX: the prompt's scores as [16 queries x 32 dims] . [32 dims x 16 keys] tiles, from the
    // keys laid out by pair once per batch (prompt_tiles); tiles 0: C, 4-5: A (dims 0-31, 32-63), 6-7: B.
    // keys: [P][stride] pairs; the root's (rkt) are read from cache by every task after the first
    auto scores = [&](const uint32_t* keys, int64_t stride, int64_t cols, int64_t i0, int64_t at) {
      for (int64_t j0 = 0; j0 < cols; j0 += 16) {
        _tile_zero(0);
        _tile_loadd(6, keys + j0, stride * 4);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(7, keys + 16 * stride + j0, stride * 4);
        _tile_dpbf16ps(0, 5, 7);
        _tile_stored(0, &sc[i0 * S + at + j0], S * 4);
      }
    };
    for (int64_t i0 = 0; i0 < M; i0 += 16) {
      tile_config(std::min<int64_t>(16, M - i0));
      _tile_loadd(4, &qp[i0 * P], P * 4);
      _tile_loadd(5, &qp[i0 * P + 16], P * 4);
      scores((const uint32_t*)rkt, Lrq, Lr, i0, 0);
      scores((const uint32_t*)kt, Lq, Lp, i0, Lr);
    }
    auto scale_cols = [&](int64_t from, int64_t cols, int64_t len) {  // scale, -inf past len
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j0 = 0; j0 < cols; j0 += 16) {
          const __mmask16 in = (j0 + 16 <= len) ? (__mmask16)0xFFFF : (__mmask16)((1u << std::max<int64_t>(len - j0, 0)) - 1);
          float* x = &sc[i * S + from + j0];
          _mm512_storeu_ps(x, _mm512_mask_mul_ps(ninf, in, _mm512_loadu_ps(x), vscale));
        }
    };
    scale_cols(0, Lr, rlen);
    scale_cols(Lr, Lp, plen);
  } else {
  // ---- scores against the prompt: Kt laid out by pair, 16 keys per vdpbf16ps ----
  keys_by_pair<P>(pk + grp * ps[0] + h * ps[1], ps[2], plen, Lp, ks.data());
  // keys [P][stride] pairs: the root's (rkt, laid out once per batch, read from cache) and the prompt's (ks)
  score_rows<P>(qp.data(), M, (const uint32_t*)rkt, Lrq, Lr, rlen, vscale, &sc[0], S);
  score_rows<P>(qp.data(), M, ks.data(), Lp, Lp, plen, vscale, &sc[Lr], S);
  }
  // ---- scores against each row's own columns: its keys laid out by pair, as the prompt's, once per run of query
  // rows that continue it (a decode step's row, a draft's positions, a prefill's new tokens), then every query of
  // the run through score_block. Plain dot products with a horizontal sum per key had cost a 48-row step's
  // attention half as much again at 64 own columns (s46); a prefill's new tokens are all own columns. ----
  if (W > 0) {
    thread_local std::vector<uint32_t> ko;
    ko.resize((size_t)P * Wp);
    for (int64_t r = 0; r < R;) {
      const int64_t ob = own[rows[r]];
      int64_t r1 = r + 1;
      while (r1 < R && own[rows[r1]] == ob) ++r1;
      keys_by_pair<P>(ok + ob * os[0] + h * os[1], os[2], W, Wp, ko.data());
      score_rows<P>(&qp[r * g * P], (r1 - r) * g, ko.data(), Wp, Wp, W, vscale, &sc[r * g * S + Lr + Lp], S);
      if (valid != nullptr)  // columns a query row does not see (padding, a draft's later positions, holes)
        for (int64_t rr = r; rr < r1; ++rr) {
          const bool* vb = valid + rows[rr] * vs;
          for (int64_t w = 0; w < W; ++w)
            if (!vb[w])
              for (int64_t qi = 0; qi < g; ++qi) sc[(rr * g + qi) * S + Lr + Lp + w] = -INFINITY;
        }
      r = r1;
    }
  }
  // ---- softmax, in place; l = the normaliser ----
  for (int64_t i = 0; i < M; ++i) {
    float* s = &sc[i * S];
    __m512 m = ninf;
    for (int64_t j = 0; j < S; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + j));
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    __m512 l = _mm512_setzero_ps();
    for (int64_t j = 0; j < S; j += 16) {
      __m512 x = _mm512_loadu_ps(s + j);
      __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, ninf, _CMP_NEQ_OQ), exp16(_mm512_sub_ps(x, mx)));
      _mm512_storeu_ps(s + j, e);
      l = _mm512_add_ps(l, e);
    }
    inv_l[i] = 1.0f / _mm512_reduce_add_ps(l);
  }
  // ---- P.V over the prompt: bf16 pairs of keys, so one vdpbf16ps adds two keys' values into 16 dims ----
  // Interleaving rows v_j, v_j+1 with unpack{lo,hi}_epi16 (within 128-bit lanes) makes lane 4k+m of
  // `lo` hold dim 8k+m and of `hi` dim 8k+4+m (per 32 dims); the permutes at the end undo that.
  if (tiles) {
    // ---- AMX: [16 queries x 32 keys] . [32 keys x 16 dims] tiles over the prompt, from the values laid
    // out by pair of keys once per batch; probabilities past the prompt are zeros, so are those values.
    // Tiles 0-3: C (dims 0-15 .. 48-63), 4: A, 6-7: B.
    // pp row: the root's probabilities (Lr / 2 pairs, zeros past rlen), then the prompt's (La / 2 pairs).
    const int64_t La = (plen + 31) / 32 * 32, Lh = (Lr + La) / 2;
    pp.resize((size_t)M * Lh);
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t j = 0; j < Lr + Lp; j += 16)
        _mm256_storeu_si256((__m256i*)&pp[i * Lh + j / 2], (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(&sc[i * S + j])));
      if (La > Lp) _mm256_storeu_si256((__m256i*)&pp[i * Lh + (Lr + Lp) / 2], _mm256_setzero_si256());
    }
    for (int64_t i0 = 0; i0 < M; i0 += 16) {
      const int64_t m = std::min<int64_t>(16, M - i0);
      tile_config(m);
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t c = 0; c < (Lr + La) / 32; ++c) {  // the root's key pairs, then the prompt's
        _tile_loadd(4, &pp[i0 * Lh + 16 * c], Lh * 4);
        const bf16* vb = c < Lr / 32 ? rvt + 16 * c * D * 2 : vt + 16 * (c - Lr / 32) * D * 2;  // 16 pairs, [D][2] each
        _tile_loadd(6, vb, D * 4);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(7, vb + 32, D * 4);
        _tile_dpbf16ps(1, 4, 7);
        _tile_loadd(6, vb + 64, D * 4);
        _tile_dpbf16ps(2, 4, 6);
        _tile_loadd(7, vb + 96, D * 4);
        _tile_dpbf16ps(3, 4, 7);
      }
      for (int t = 0; t < 4; ++t) {
        switch (t) {
          case 0: _tile_stored(0, &o[i0 * D], D * 4); break;
          case 1: _tile_stored(1, &o[i0 * D + 16], D * 4); break;
          case 2: _tile_stored(2, &o[i0 * D + 32], D * 4); break;
          default: _tile_stored(3, &o[i0 * D + 48], D * 4); break;
        }
      }
    }
    _tile_release();
  } else {
  const int64_t Lh = (Lr + Lp) / 2;  // pp row: the root's pairs, then the prompt's
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < Lr + Lp; j += 16)  // 16 probabilities -> 8 pairs (key j in the low half)
      _mm256_storeu_si256((__m256i*)&pp[i * Lh + j / 2], (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(&sc[i * S + j])));
  static const bf16 zeros[D] = {};
  const __m512i ia = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i ib = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  const bf16* pvb = pv + grp * ps[0] + h * ps[1];
  const uint32_t* rv = (const uint32_t*)rvt;  // the root's values: [Lrq / 2][D] pairs of keys, dims in order
  for (int64_t i0 = 0; i0 < M; i0 += VC) {
    const int C = (int)std::min<int64_t>(VC, M - i0);
    __m512 acc[VC][V16];
    for (int c = 0; c < VC; ++c)
      for (int v = 0; v < V16; ++v) acc[c][v] = _mm512_setzero_ps();
    if (Lr) {  // the root first, into o in dim order; the prompt's sums are added to it below
      for (int64_t jp = 0; jp < Lr / 2; ++jp) {
        __m512i vv[V16];
        for (int v = 0; v < V16; ++v) vv[v] = _mm512_loadu_si512(&rv[jp * D + 16 * v]);
        for (int c = 0; c < VC; ++c) {
          if (c >= C) break;
          const __m512bh pj = (__m512bh)_mm512_set1_epi32((int)pp[(i0 + c) * Lh + jp]);
          for (int v = 0; v < V16; ++v) acc[c][v] = _mm512_dpbf16_ps(acc[c][v], pj, (__m512bh)vv[v]);
        }
      }
      for (int c = 0; c < C; ++c)
        for (int v = 0; v < V16; ++v) {
          _mm512_storeu_ps(&o[(i0 + c) * D + 16 * v], acc[c][v]);
          acc[c][v] = _mm512_setzero_ps();
        }
    }
    for (int64_t j = 0; j < plen; j += 2) {
      const bf16* va = pvb + j * ps[2];
      if (i0 == 0 && j + 8 < plen)  // the values 4 pairs on, on the first pass over them (see keys_by_pair)
        for (int64_t b = 0; b < D * 2; b += 64) {
          _mm_prefetch((const char*)(va + 8 * ps[2]) + b, _MM_HINT_T0);
          if (j + 9 < plen) _mm_prefetch((const char*)(va + 9 * ps[2]) + b, _MM_HINT_T0);
        }
      const bf16* vb = j + 1 < plen ? va + ps[2] : zeros;
      __m512i vv[V16];
      for (int hh = 0; hh < V16 / 2; ++hh) {
        const __m512i x = _mm512_loadu_si512(va + 32 * hh), y = _mm512_loadu_si512(vb + 32 * hh);
        vv[2 * hh] = _mm512_unpacklo_epi16(x, y);
        vv[2 * hh + 1] = _mm512_unpackhi_epi16(x, y);
      }
      for (int c = 0; c < VC; ++c) {
        if (c >= C) break;
        const __m512bh pj = (__m512bh)_mm512_set1_epi32((int)pp[(i0 + c) * Lh + Lr / 2 + j / 2]);
        for (int v = 0; v < V16; ++v) acc[c][v] = _mm512_dpbf16_ps(acc[c][v], pj, (__m512bh)vv[v]);
      }
    }
    for (int c = 0; c < C; ++c)
      for (int hh = 0; hh < V16 / 2; ++hh) {
        float* oo = &o[(i0 + c) * D + 32 * hh];
        const __m512 a = _mm512_permutex2var_ps(acc[c][2 * hh], ia, acc[c][2 * hh + 1]);
        const __m512 b = _mm512_permutex2var_ps(acc[c][2 * hh], ib, acc[c][2 * hh + 1]);
        _mm512_storeu_ps(oo, Lr ? _mm512_add_ps(a, _mm512_loadu_ps(oo)) : a);
        _mm512_storeu_ps(oo + 16, Lr ? _mm512_add_ps(b, _mm512_loadu_ps(oo + 16)) : b);
      }
  }
  }
  // ---- P.V over each row's own columns, normalise, write bf16 ----
  // The sums are kept in registers, OB queries of the row at a time, over its columns in order (the same fp32 sums
  // as adding into o column by column); the next row's values are prefetched meanwhile.
  constexpr int OB = D == 64 ? 4 : 2;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t b = rows[r];
    const bf16* ovb = ov + own[b] * os[0] + h * os[1];
    if (r + 1 < R && W > 0) {
      const bf16* nv = ov + own[rows[r + 1]] * os[0] + h * os[1];
      for (int64_t w = 0; w < std::min<int64_t>(W, 8); ++w)
        for (int64_t c = 0; c < D * 2; c += 64) _mm_prefetch((const char*)(nv + w * os[2]) + c, _MM_HINT_T0);
    }
    for (int64_t q0 = 0; q0 < g; q0 += OB) {
      const int C = (int)std::min<int64_t>(OB, g - q0);
      __m512 acc[OB][V16];
      for (int c = 0; c < C; ++c)
        for (int v = 0; v < V16; ++v) acc[c][v] = _mm512_loadu_ps(&o[(r * g + q0 + c) * D + 16 * v]);
      for (int64_t w = 0; w < W; ++w) {
        if (valid != nullptr && !valid[b * vs + w]) continue;
        __m512 vf[V16];
        for (int v = 0; v < V16; ++v) vf[v] = load16(ovb + w * os[2] + 16 * v);
        for (int c = 0; c < OB; ++c) {
          if (c >= C) break;
          const __m512 pj = _mm512_set1_ps(sc[(r * g + q0 + c) * S + Lr + Lp + w]);
          for (int v = 0; v < V16; ++v) acc[c][v] = _mm512_fmadd_ps(pj, vf[v], acc[c][v]);
        }
      }
      for (int c = 0; c < C; ++c)
        for (int v = 0; v < V16; ++v) _mm512_storeu_ps(&o[(r * g + q0 + c) * D + 16 * v], acc[c][v]);
    }
    for (int64_t qi = 0; qi < g; ++qi) {
      const int64_t i = r * g + qi;
      bf16* dst = out + b * qs[0] + h * qs[1] + qi * qs[2];  // out is laid out as q
      const __m512 il = _mm512_set1_ps(inv_l[i]);
      for (int v = 0; v < V16; ++v)
        _mm256_storeu_si256((__m256i*)(dst + 16 * v), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(&o[i * D + 16 * v]), il)));
    }
  }
}

// One tile of `linear`: R rows x NB blocks of 16 outputs, accumulated over the K/2 pairs in order.
template <int R, int NB>
inline void linear_tile(const bf16* x, int64_t K, const bf16* w, int64_t P, const float* bias, bf16* out,
                        int64_t N, const char* pf = nullptr, int64_t pf_lines = 0, int pf_per = 0) {
  __m512 acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_ps();
  const int32_t* xi[R];
  for (int r = 0; r < R; ++r) xi[r] = (const int32_t*)(x + r * K);
  for (int64_t p = 0; p < P; ++p) {
    for (int i = 0; i < pf_per; ++i)  // the next blocks' weights into L2, pf_per lines a pair (linear_blocks)
      if (pf_per * p + i < pf_lines) _mm_prefetch(pf + 64 * (pf_per * p + i), _MM_HINT_T1);
    __m512bh wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = (__m512bh)_mm512_loadu_si512((const void*)(w + (j * P + p) * 32));
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(xi[r][p]);  // the row's pair (x[2p], x[2p + 1])
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], wv[j], xv);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) {
      __m512 v = acc[r][j];
      if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + 16 * j));
      _mm256_storeu_si256((__m256i*)(out + r * N + 16 * j), (__m256i)_mm512_cvtneps_pbh(v));
    }
}

// Every row of x [M, K] through NB blocks (w: the first block's pairs): rows 4 at a time, so a block read
// from memory once is re-read from cache by the other row tiles.
//
// `next`/`next_bytes`: the weights this thread multiplies next. The first row tile reads the blocks from memory
// at the rate its products consume them; the other row tiles re-read them from cache and share the prefetching
// of the next blocks (up to 4 lines a pair), so that reading memory overlaps the arithmetic of many rows.
template <int NB>
void linear_blocks(const bf16* x, int64_t M, int64_t K, const bf16* w, const float* bias, bf16* out, int64_t N,
                   const bf16* next = nullptr, int64_t next_bytes = 0) {
  const int64_t P = K / 2;
  int64_t r = 0;
  if (r + 4 <= M) {
    linear_tile<4, NB>(x, K, w, P, bias, out, N);
    r = 4;
  }
  const char* pf = (const char*)next;
  int64_t pf_lines = next ? next_bytes / 64 : 0;
  const int64_t later = M / 4 - 1;  // row tiles that prefetch
  const int per = later > 0 ? (int)std::min<int64_t>(4, (pf_lines + later * P - 1) / (later * P)) : 0;
  for (; r + 4 <= M; r += 4) {
    linear_tile<4, NB>(x + r * K, K, w, P, bias, out + r * N, N, pf, pf_lines, per);
    pf += per * 64 * P;
    pf_lines -= per * P;
  }
  switch (M - r) {
    case 3: linear_tile<3, NB>(x + r * K, K, w, P, bias, out + r * N, N); break;
    case 2: linear_tile<2, NB>(x + r * K, K, w, P, bias, out + r * N, N); break;
    case 1: linear_tile<1, NB>(x + r * K, K, w, P, bias, out + r * N, N); break;
    default: break;
  }
}


// m (<= 16) rows of x [.., K] through NB (<= 4) blocks of 16 outputs, w: the first block's pairs.
template <int NB>
void amx_tile(const bf16* x, int64_t m, int64_t K, const bf16* w, int64_t P, const float* bias, bf16* out,
              int64_t N, float* buf) {
  _tile_zero(0);
  if (NB > 1) _tile_zero(1);
  if (NB > 2) _tile_zero(2);
  if (NB > 3) _tile_zero(3);
  const int64_t xs = K * (int64_t)sizeof(bf16);
  for (int64_t c = 0; c < K / 32; ++c) {
    _tile_loadd(4, x + 32 * c, xs);
    const bf16* wc = w + 16 * c * 32;
    _tile_loadd(6, wc, 64);
    _tile_dpbf16ps(0, 4, 6);
    if (NB > 1) { _tile_loadd(7, wc + P * 32, 64); _tile_dpbf16ps(1, 4, 7); }
    if (NB > 2) { _tile_loadd(6, wc + 2 * P * 32, 64); _tile_dpbf16ps(2, 4, 6); }
    if (NB > 3) { _tile_loadd(7, wc + 3 * P * 32, 64); _tile_dpbf16ps(3, 4, 7); }
  }
  _tile_stored(0, buf, 256);
  if (NB > 1) _tile_stored(1, buf + 16, 256);
  if (NB > 2) _tile_stored(2, buf + 32, 256);
  if (NB > 3) _tile_stored(3, buf + 48, 256);
  for (int64_t r = 0; r < m; ++r)
    for (int j = 0; j < NB; ++j) {
      __m512 v = _mm512_loadu_ps(buf + r * 64 + 16 * j);
      if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + 16 * j));
      _mm256_storeu_si256((__m256i*)(out + r * N + 16 * j), (__m256i)_mm512_cvtneps_pbh(v));
    }
}
}  // namespace

// q [B, Hk, g, D]; own_k/own_v [R, Hk, W, D] (last dim contiguous); own_valid [B, W] bool (per query row) or
// empty; prompt_k/prompt_v [G, Hk, L, D]; prompt_len [G]; group_of [B]; own_of [B] (query row b continues own
// row own_of[b]: a draft's positions continue one row) or empty (attention_args.h). Returns [B, Hk, g, D], bf16.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor own_k, torch::Tensor own_v, torch::Tensor own_valid,
                               torch::Tensor prompt_k, torch::Tensor prompt_v, torch::Tensor prompt_len,
                               torch::Tensor group_of, torch::Tensor own_of, double scale, torch::Tensor prompt_kt,
                               torch::Tensor prompt_vt, torch::Tensor root_kt, torch::Tensor root_vt,
                               torch::Tensor root_len) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && own_k.scalar_type() == at::kBFloat16 &&
              prompt_k.scalar_type() == at::kBFloat16, "decode_attention computes bf16");
  TORCH_CHECK(own_v.scalar_type() == at::kBFloat16 && prompt_v.scalar_type() == at::kBFloat16, "bf16 values");
  q = q.contiguous();
  const AttentionArgs a = attention_args(q, own_k, own_v, own_valid, prompt_k, prompt_v, prompt_len, group_of, own_of);
  const int64_t Hk = a.Hk, g = a.g, D = a.D, G = a.G, W = a.W;
  const int64_t *pl = a.plen, *own = a.own();
  const auto& rows = a.rows;
  const bool* valid = a.valid;
  const int64_t vs = valid ? W : 0;
  // prompt_tiles' layouts (tiles on, D = 64): kt [G, Hk, D / 2, Lq, 2], vt [G, Hk, Lq / 2, D, 2].
  const bool tiles = g_amx && D == 64 && prompt_kt.numel() > 0;
  int64_t Lq = 0;
  if (tiles) {
    Lq = prompt_kt.size(3);
    TORCH_CHECK(prompt_kt.is_contiguous() && prompt_vt.is_contiguous() && prompt_kt.dim() == 5 &&
                prompt_kt.size(0) == G && prompt_kt.size(1) == Hk && prompt_kt.size(2) == D / 2 &&
                Lq % 32 == 0 && Lq >= prompt_k.size(2) && prompt_vt.size(2) == Lq / 2 && prompt_vt.size(3) == D,
                "prompt_kt / prompt_vt must be prompt_tiles of prompt_k / prompt_v");
  }
  // The root (a prefix every rooted prompt shares, held once: kv.py's _Batch): root_kt [Hk, D / 2, Lrq, 2] and
  // root_vt [Hk, Lrq / 2, D, 2] in prompt_tiles' layouts, which both paths read as they are (the AMX tiles, and
  // the pairs vdpbf16ps multiplies: no transposing per step); root_len [G]: its length for each prompt, 0 where
  // a prompt holds its whole KV in its slot.
  const bool rooted = root_len.numel() > 0;
  int64_t Lrq = 0;
  torch::Tensor rl;
  if (rooted) {
    Lrq = root_kt.size(2);
    TORCH_CHECK(root_kt.is_contiguous() && root_vt.is_contiguous() && root_kt.dim() == 4 && root_kt.size(0) == Hk &&
                root_kt.size(1) == D / 2 && Lrq % 32 == 0 && root_vt.dim() == 4 && root_vt.size(0) == Hk &&
                root_vt.size(1) == Lrq / 2 && root_vt.size(2) == D && root_len.numel() == G,
                "root_kt / root_vt must be prompt_tiles of one prompt's K/V, root_len [G]");
    rl = root_len.to(at::kLong).contiguous();
    for (int64_t i = 0; i < G; ++i)
      TORCH_CHECK(rl.data_ptr<int64_t>()[i] >= 0 && rl.data_ptr<int64_t>()[i] <= Lrq, "root_len out of range");
  }
  const int64_t* rlp = rooted ? rl.data_ptr<int64_t>() : nullptr;
  const bf16* rktp = rooted ? root_kt.data_ptr<bf16>() : nullptr;
  const bf16* rvtp = rooted ? root_vt.data_ptr<bf16>() : nullptr;
  const bf16* ktp = tiles ? prompt_kt.data_ptr<bf16>() : nullptr;
  const bf16* vtp = tiles ? prompt_vt.data_ptr<bf16>() : nullptr;
  auto out = torch::empty_like(q);
  const int64_t qs[3] = {q.stride(0), q.stride(1), q.stride(2)};
  const int64_t ps[3] = {prompt_k.stride(0), prompt_k.stride(1), prompt_k.stride(2)};
  const int64_t os[3] = {own_k.stride(0), own_k.stride(1), own_k.stride(2)};
  const bf16 *qp = q.data_ptr<bf16>(), *pk = prompt_k.data_ptr<bf16>(), *pv = prompt_v.data_ptr<bf16>();
  const bf16 *ok = own_k.data_ptr<bf16>(), *ov = own_v.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  const std::vector<RowSpan> spans = row_spans(rows, Hk);
  // Tasks differ in cost (rows x keys: a prompt of 1 row beside one of 4, prompts of 40 and 160 tokens), so they are
  // handed out one at a time, the dearest first, rather than as each thread's fixed half of the range: each
  // thread's wait for the other at the end had been a tenth of a decode step (libgomp's spin) at 16 searches.
  const int64_t ntask = (int64_t)spans.size() * Hk;
  std::vector<int64_t> order(ntask);
  {
    std::vector<int64_t> cost(spans.size());
    for (size_t i = 0; i < spans.size(); ++i)
      cost[i] = (int64_t)spans[i].size() * ((rooted ? rlp[spans[i].group] : 0) + pl[spans[i].group] + W + 16);
    for (int64_t t = 0; t < ntask; ++t) order[t] = t;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a / Hk] > cost[b / Hk]; });
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), ntask), 1, [&](int64_t, int64_t) {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < ntask;) {
      const int64_t t = order[i];
      const RowSpan& span = spans[t / Hk];
      const int64_t gi = span.group, h = t % Hk;
      const int64_t tile = (gi * Hk + h) * (D / 2) * Lq * 2;  // elements per (group, head) in kt and in vt
      const int64_t rlen = rooted ? rlp[gi] : 0, root = h * D * Lrq;  // the root's elements per head
      if (D == 64)
        task<64>(gi, h, span, g, (float)scale, qp, qs, pk, pv, ps, pl[gi], ok, ov, os, W, own, valid, vs,
                 tiles ? ktp + tile : nullptr, tiles ? vtp + tile : nullptr, Lq, rlen ? rktp + root : nullptr,
                 rlen ? rvtp + root : nullptr, Lrq, rlen, op);
      else
        task<128>(gi, h, span, g, (float)scale, qp, qs, pk, pv, ps, pl[gi], ok, ov, os, W, own, valid, vs,
                  nullptr, nullptr, 0, rlen ? rktp + root : nullptr, rlen ? rvtp + root : nullptr, Lrq, rlen, op);
    }
  });
  return out;
}

// y = bf16(w * bf16(x * rsqrt(mean(x^2) + eps))): LlamaRMSNorm's two roundings (normalise in fp32, cast
// to bf16, scale in bf16), both round-to-nearest-even as torch rounds. The squares are summed in fp64
// (a bf16 square is exact there), where the order of the sum changes nothing at fp32 precision; torch
// sums in fp32, in an order that depends on the CPU's vector width, so a few elements round one
// bf16 step the other way than transformers' LlamaRMSNorm (5 in 10^6 of the embedded model's). Rows are few in a
// decode step (one thread: OpenMP's fork costs more than the row); prefills split rows over threads.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16, "rms_norm takes bf16");
  const int64_t H = x.size(-1);
  TORCH_CHECK(weight.numel() == H && H % 16 == 0, "weight [H] with H a multiple of 16");
  x = x.contiguous();
  weight = weight.contiguous();
  auto out = torch::empty_like(x);
  const int64_t N = x.numel() / H;
  const bf16* xp = x.data_ptr<bf16>();
  const bf16* wp = weight.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  auto rows = [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const bf16* xr = xp + r * H;
      __m512d acc = _mm512_setzero_pd();
      for (int64_t i = 0; i < H; i += 16) {
        const __m512 v = load16(xr + i);
        const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
        const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
        acc = _mm512_fmadd_pd(lo, lo, _mm512_fmadd_pd(hi, hi, acc));
      }
      const float inv = (float)(1.0 / std::sqrt(_mm512_reduce_add_pd(acc) / (double)H + eps));
      const __m512 vinv = _mm512_set1_ps(inv);
      for (int64_t i = 0; i < H; i += 16) {
        const __m256bh y = _mm512_cvtneps_pbh(_mm512_mul_ps(load16(xr + i), vinv));
        const __m512 yf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)y), 16));
        const __m256bh o = _mm512_cvtneps_pbh(_mm512_mul_ps(load16(wp + i), yf));
        _mm256_storeu_si256((__m256i*)(op + r * H + i), (__m256i)o);
      }
    }
  };
  if (N <= 32) {
    rows(0, N);
  } else {
    at::parallel_for(0, N, 16, rows);
  }
  return out;
}

inline __m512 round16(__m512 v) {  // fp32 -> bf16 (round to nearest even, as torch) -> fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

// qk = x * cos + rotate_half(x) * sin for the first `heads` heads of qkv [B, S, H, D] (the q and k heads
// of a q|k|v projection), cos/sin [B, S, D], as torch computes it in bf16: each product rounded, then
// the sum; rotate_half(x) = cat(-x[D/2:], x[:D/2]). Returns [B, S, heads, D].
torch::Tensor rope(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t heads) {
  TORCH_CHECK(qkv.scalar_type() == at::kBFloat16 && cos.scalar_type() == at::kBFloat16 &&
              sin.scalar_type() == at::kBFloat16 && qkv.dim() == 4, "rope takes bf16 qkv [B, S, H, D]");
  const int64_t B = qkv.size(0), S = qkv.size(1), H = qkv.size(2), D = qkv.size(3), half = D / 2;
  TORCH_CHECK(heads <= H && half % 16 == 0 && cos.numel() == B * S * D && sin.numel() == B * S * D,
              "cos/sin [B, S, D], D a multiple of 32");
  qkv = qkv.contiguous();
  cos = cos.contiguous();
  sin = sin.contiguous();
  auto out = torch::empty({B, S, heads, D}, qkv.options());
  const bf16* xp = qkv.data_ptr<bf16>();
  const bf16* cp = cos.data_ptr<bf16>();
  const bf16* sp = sin.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  auto rows = [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const bf16* c = cp + r * D;
      const bf16* s = sp + r * D;
      for (int64_t h = 0; h < heads; ++h) {
        const bf16* x = xp + (r * H + h) * D;
        bf16* o = op + (r * heads + h) * D;
        for (int64_t i = 0; i < half; i += 16) {
          const __m512 x1 = load16(x + i), x2 = load16(x + half + i);
          const __m512 lo = _mm512_add_ps(round16(_mm512_mul_ps(x1, load16(c + i))),
                                          round16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2), load16(s + i))));
          const __m512 hi = _mm512_add_ps(round16(_mm512_mul_ps(x2, load16(c + half + i))),
                                          round16(_mm512_mul_ps(x1, load16(s + half + i))));
          _mm256_storeu_si256((__m256i*)(o + i), (__m256i)_mm512_cvtneps_pbh(lo));
          _mm256_storeu_si256((__m256i*)(o + half + i), (__m256i)_mm512_cvtneps_pbh(hi));
        }
      }
    }
  };
  if (B * S <= 32) {
    rows(0, B * S);
  } else {
    at::parallel_for(0, B * S, 16, rows);
  }
  return out;
}

// One head's n keys and values (key j at k + j * ks, value j at v + j * vs, D = 2P dims) in prompt_tiles' layouts:
// kt [P][Lq] pairs of dims (keys_by_pair's transposes) and vt [Lq / 2][D][2] values by pair of keys (two permutes
// per 32 dims interleave a pair's rows), zeros from column n to Lq (a multiple of 32). lay_tiles and past_tiles.
template <int P>
void tile_head(const bf16* k, int64_t ks, const uint16_t* v, int64_t vs, int64_t n, int64_t Lq, uint32_t* kt,
               uint16_t* vt) {
  // output word 2i: a's word i, 2i + 1: b's (b's words are 32-63); lo: the 32 dims' first 16, hi: the next 16
  alignas(64) static const uint16_t lo_idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                  8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t hi_idx[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                  24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_load_si512(hi_idx);
  constexpr int64_t D = 2 * P;
  keys_by_pair<P>(k, ks, n, Lq, kt);
  for (int64_t j = 0; j < Lq; j += 2, vt += 2 * D)
    for (int64_t d = 0; d < D; d += 32) {
      const __m512i a = j < n ? _mm512_loadu_si512(v + j * vs + d) : _mm512_setzero_si512();
      const __m512i b = j + 1 < n ? _mm512_loadu_si512(v + (j + 1) * vs + d) : _mm512_setzero_si512();
      _mm512_storeu_si512(vt + 2 * d, _mm512_permutex2var_epi16(a, lo, b));
      _mm512_storeu_si512(vt + 2 * d + 32, _mm512_permutex2var_epi16(a, hi, b));
    }
}

// One prompt's K/V [Hk, n, D] into its slot of a decode batch's prompt slab, in prompt_tiles' layouts:
// kt [Hk, D / 2, Lq, 2] (keys by pair of dims: the B tiles of q.k) and vt [Hk, Lq / 2, D, 2] (values by
// pair of keys: the B tiles of p.v), zeros from column n on (the slot may hold an older prompt). torch's
// strided copies of 4-byte pairs took ~1-3 ms per layer and prompt, most of an admission's cost.
void lay_tiles(torch::Tensor k, torch::Tensor v, torch::Tensor kt, torch::Tensor vt) {
  TORCH_CHECK(k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16 && kt.scalar_type() == at::kBFloat16 &&
              vt.scalar_type() == at::kBFloat16, "lay_tiles takes bf16");
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.stride(2) == 1 && v.stride(2) == 1, "k, v [Hk, n, D], dims contiguous");
  const int64_t Hk = k.size(0), n = k.size(1), D = k.size(2), Lq = kt.size(2);
  TORCH_CHECK(kt.is_contiguous() && vt.is_contiguous() && kt.dim() == 4 && vt.dim() == 4 && kt.size(0) == Hk &&
              kt.size(1) == D / 2 && kt.size(3) == 2 && vt.size(0) == Hk && vt.size(1) == Lq / 2 && vt.size(2) == D &&
              vt.size(3) == 2 && (D == 64 || D == 128) && Lq % 32 == 0 && n <= Lq,
              "kt [Hk, D/2, Lq, 2], vt [Hk, Lq/2, D, 2], D 64 or 128, Lq a multiple of 32, n <= Lq");
  const bf16* kp = k.data_ptr<bf16>();
  const uint16_t* vp = (const uint16_t*)v.data_ptr<bf16>();
  uint32_t* ktp = (uint32_t*)kt.data_ptr<bf16>();
  uint16_t* vtp = (uint16_t*)vt.data_ptr<bf16>();
  for (int64_t h = 0; h < Hk; ++h) {  // ~56 KB per head: one thread (a fork costs more)
    uint32_t* kh = ktp + h * (D / 2) * Lq;
    uint16_t* vh = vtp + h * (Lq / 2) * D * 2;
    if (D == 64) tile_head<32>(kp + h * k.stride(0), k.stride(1), vp + h * v.stride(0), v.stride(1), n, Lq, kh, vh);
    else tile_head<64>(kp + h * k.stride(0), k.stride(1), vp + h * v.stride(0), v.stride(1), n, Lq, kh, vh);
  }
}

// A prefill's pasts laid out as prompt_tiles lays a decode batch's prompts out (its reference definition), in one
// pass: k, v [G, Hk, n, D = 64], the last dim contiguous (a slice of the cache) -> kt [G, Hk, D/2, Lq, 2], vt [G,
// Hk, Lq/2, D, 2], Lq = n rounded up to 32, zeros past n (tile_head per head). torch's pad and permute had cost a
// prefill over cached pasts as much as its attention (s48).
std::vector<torch::Tensor> past_tiles(torch::Tensor k, torch::Tensor v) {
  TORCH_CHECK(k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16 && k.dim() == 4 &&
              v.sizes() == k.sizes() && k.size(3) == 64 && k.stride(3) == 1 && v.stride(3) == 1,
              "past_tiles takes bf16 k, v [G, Hk, n, 64], dims contiguous");
  constexpr int64_t D = 64, P = D / 2;
  const int64_t G = k.size(0), Hk = k.size(1), n = k.size(2), Lq = (n + 31) / 32 * 32;
  auto kt = torch::empty({G, Hk, P, Lq, 2}, k.options()), vt = torch::empty({G, Hk, Lq / 2, D, 2}, k.options());
  const bf16* kp = k.data_ptr<bf16>();
  const uint16_t* vp = (const uint16_t*)v.data_ptr<bf16>();
  uint32_t* ktp = (uint32_t*)kt.data_ptr<bf16>();
  uint16_t* vtp = (uint16_t*)vt.data_ptr<bf16>();
  at::parallel_for(0, G * Hk, 2, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / Hk, h = t % Hk;
      tile_head<P>(kp + g * k.stride(0) + h * k.stride(1), k.stride(2), vp + g * v.stride(0) + h * v.stride(1),
                   v.stride(2), n, Lq, ktp + t * P * Lq, vtp + t * (Lq / 2) * D * 2);
    }
  });
  return {kt, vt};
}

// w [N, K] bf16 -> [N / 16, K / 2, 16, 2]: block b, pair p holds w[16 b + i][2p : 2p + 2] for i < 16, the
// layout vdpbf16ps multiplies: one 64-byte load is 16 outputs' next two weights. Each block is contiguous.
torch::Tensor pack_linear(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16, "pack_linear takes a bf16 weight [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(N % 16 == 0 && K % 2 == 0, "pack_linear needs N a multiple of 16 and K even, got ", N, " x ", K);
  return w.contiguous().view({N / 16, 16, K / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

void linear_tiles(const bf16* xp, int64_t M, int64_t K, const bf16* w, int64_t B, const float* bp, bf16* op);

// y = x w^T (+ bias) for bf16 x [..., K] and a pack_linear weight: fp32 sums over k in pair order, rounded
// to bf16 once (+ an fp32 bias before the rounding). A row's result never depends on the other rows. The
// threads split the output blocks, each streaming its blocks' weights once. With tiles on (set_tiles) and
// K a multiple of 32, AMX computes it (linear_tiles).
static torch::Tensor linear_impl(torch::Tensor x, torch::Tensor wp, torch::Tensor bias, torch::Tensor into) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && wp.scalar_type() == at::kBFloat16 && wp.dim() == 4 &&
              wp.size(2) == 16 && wp.size(3) == 2, "linear takes bf16 x and a pack_linear weight");
  const int64_t B = wp.size(0), P = wp.size(1), K = 2 * P, N = 16 * B;
  TORCH_CHECK(x.size(-1) == K, "x [..., ", K, "], got last dim ", x.size(-1));
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  x = x.reshape({-1, K}).contiguous();
  wp = wp.contiguous();
  const int64_t M = x.size(0);
  torch::Tensor out;
  if (into.defined()) {
    TORCH_CHECK(into.scalar_type() == at::kBFloat16 && into.dim() == 2 && into.is_contiguous() && into.size(1) == N &&
                into.size(0) >= M, "linear_into writes the first rows of a contiguous bf16 [>= ", M, ", ", N, "]");
    out = into.narrow(0, 0, M);
  } else {
    out = torch::empty({M, N}, x.options());
  }
  torch::Tensor b32;
  const float* bp = nullptr;
  if (bias.numel()) {
    TORCH_CHECK(bias.numel() == N, "bias [", N, "]");
    b32 = bias.to(at::kFloat).contiguous();
    bp = b32.data_ptr<float>();
  }
  const bf16* xp = x.data_ptr<bf16>();
  const bf16* w = wp.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  if (M == 0) return out.view(sizes);
  if (g_amx && K % 32 == 0) {
    linear_tiles(xp, M, K, w, B, bp, op);
    return out.view(sizes);
  }
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b += 4) {
      const bf16* wb = w + b * P * 32;
      const float* bb = bp ? bp + 16 * b : nullptr;
      const bf16* nx = b + 4 < end ? wb + 4 * P * 32 : nullptr;  // this thread's next blocks
      const int64_t nb = nx ? std::min<int64_t>(4, end - b - 4) * P * 64 : 0;
      switch (std::min<int64_t>(4, end - b)) {
        case 4: linear_blocks<4>(xp, M, K, wb, bb, op + 16 * b, N, nx, nb); break;
        case 3: linear_blocks<3>(xp, M, K, wb, bb, op + 16 * b, N); break;
        case 2: linear_blocks<2>(xp, M, K, wb, bb, op + 16 * b, N); break;
        default: linear_blocks<1>(xp, M, K, wb, bb, op + 16 * b, N); break;
      }
    }
  });
  return out.view(sizes);
}

torch::Tensor linear(torch::Tensor x, torch::Tensor wp, torch::Tensor bias) {
  return linear_impl(x, wp, bias, torch::Tensor());
}

// linear's numbers written into the first rows of `into` (a buffer its caller reuses: a decode step's logits, 4.7 MB
// at 48 rows, cost ~1.5 ms of page faults a step when allocated afresh, since tensors of 1 MB and more are mmap-ed).
torch::Tensor linear_into(torch::Tensor x, torch::Tensor wp, torch::Tensor bias, torch::Tensor into) {
  return linear_impl(x, wp, bias, into);
}

// Whether linear multiplies with AMX tiles from now on: `on` and Linux grants this process the tile state
// (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA; asked once). The caller checked cpuid for AMX-BF16.
bool set_tiles(bool on) {
  if (on && g_amx_granted < 0) g_amx_granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  g_amx = on && g_amx_granted == 1;
  return g_amx;
}

// linear's numbers from AMX tiles (linear calls it with tiles on and K a multiple of 32): each thread takes 4 output blocks at a time and
// runs every 16-row chunk of x through them, so a block's weights come from memory once per 512 rows.
// TDPBF16PS sums a C element over k in pair order in fp32, as oneDNN's AMX matmul does: on an AMX Xeon
// its outputs equal oneDNN's bit for bit (rows 1-40, every shape of the embedded model), and it reads the
// weights at the memory's bandwidth from 1 to 16 rows, where oneDNN read at ~0.6 of it.
void linear_tiles(const bf16* xp, int64_t M, int64_t K, const bf16* w, int64_t B, const float* bp, bf16* op) {
  const int64_t P = K / 2, N = 16 * B;
  // Rows in spans of 512 (x's span stays in L2 while every block group passes over it; the weights are
  // then read once per span: at 2048 rows one pass over all rows was 1.14x slower than oneDNN).
  for (int64_t r0 = 0; r0 < M; r0 += 512) {
  const int64_t r1 = std::min<int64_t>(M, r0 + 512);
  at::parallel_for(0, (B + 3) / 4, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float buf[16 * 64];
    int64_t configured = -1;
    for (int64_t g = begin; g < end; ++g) {
      const int64_t b = 4 * g, nb = std::min<int64_t>(4, B - b);
      const bf16* wb = w + b * P * 32;
      const float* bb = bp ? bp + 16 * b : nullptr;
      for (int64_t r = r0; r < r1; r += 16) {
        const int64_t m = std::min<int64_t>(16, r1 - r);
        if (m != configured) { tile_config(m); configured = m; }
        const bf16* xr = xp + r * K;
        bf16* orow = op + r * N + 16 * b;
        switch (nb) {
          case 4: amx_tile<4>(xr, m, K, wb, P, bb, orow, N, buf); break;
          case 3: amx_tile<3>(xr, m, K, wb, P, bb, orow, N, buf); break;
          case 2: amx_tile<2>(xr, m, K, wb, P, bb, orow, N, buf); break;
          default: amx_tile<1>(xr, m, K, wb, P, bb, orow, N, buf); break;
        }
      }
    }
    if (configured >= 0) _tile_release();
  });
  }
}

// torch's exp for 16 floats (ATen's Vectorized<float>::exp on AVX512 calls it; libtorch_cpu exports it), so
// silu_mul's SiLU rounds as at::silu does.
extern "C" __m512 Sleef_expf16_u10(__m512);

// y = x + y for bf16 [.., H] of one shape, y contiguous and written in place: each sum in fp32 rounded once, as
// torch's bf16 add computes it. The residual adds of a decode step's layer: in place of torch's add (a
// TensorIterator and an allocation per call, ~10 us; a few-row step ran 60 of them).
void add_into(torch::Tensor y, const torch::Tensor& x) {
  TORCH_CHECK(y.is_contiguous() && x.is_contiguous() && x.numel() == y.numel() && y.numel() % 16 == 0 &&
              x.scalar_type() == at::kBFloat16 && y.scalar_type() == at::kBFloat16, "add_into: bf16, one shape");
  bf16* yp = y.data_ptr<bf16>();
  const bf16* xp = x.data_ptr<bf16>();
  for (int64_t i = 0; i < y.numel(); i += 16)
    _mm256_storeu_si256((__m256i*)(yp + i), (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(load16(xp + i), load16(yp + i))));
}

// silu(gate) * up for gate|up [.., 2I] bf16 -> [.., I]: SiLU rounded to bf16, then the product rounded, as
// at::silu(gate) * up computes them in bf16 (x / (1 + e^-x) with torch's own exp), in one pass.
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  TORCH_CHECK(gate_up.is_contiguous() && gate_up.scalar_type() == at::kBFloat16 && gate_up.size(-1) % 32 == 0,
              "silu_mul: contiguous bf16 gate|up, I a multiple of 16");
  const int64_t I = gate_up.size(-1) / 2, rows = gate_up.numel() / (2 * I);
  auto sizes = gate_up.sizes().vec();
  sizes.back() = I;
  auto out = torch::empty(sizes, gate_up.options());
  const bf16* g = gate_up.data_ptr<bf16>();
  bf16* o = out.data_ptr<bf16>();
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512i sign = _mm512_set1_epi32(INT32_MIN);
  // rows split over threads from 8 on (a decode step of many rows, a prefill); fewer run here, where a fork costs more
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t i = 0; i < I; i += 16) {
        const __m512 x = load16(g + r * 2 * I + i);
        const __m512 neg = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x), sign));  // -x
        const __m512 act = round16(_mm512_div_ps(x, _mm512_add_ps(one, Sleef_expf16_u10(neg))));
        _mm256_storeu_si256((__m256i*)(o + r * I + i),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(act, load16(g + r * 2 * I + I + i))));
      }
  });
  return out;
}

// A decoder layer of a decode step over shared prompts (S = 1), as fast_llama.FastLlama.hidden's layer loop
// computes it, in two calls around the cache update (Python's per-operation dispatch was ~1.5 ms of a
// 10 ms batch-1 step): the same operations in the same order, so the same numbers (the residual adds and
// SiLU * up as raw loops that round as torch's bf16 ops do: add_into, silu_mul).
// decode_qkv: x [B, 1, H] -> q [B, hq, 1, D], k and v [B, hk, 1, D] of rope(qkv(norm(x))).
std::vector<torch::Tensor> decode_qkv(torch::Tensor x, torch::Tensor norm, torch::Tensor qkv_w, torch::Tensor qkv_b,
                                      torch::Tensor cos, torch::Tensor sin, int64_t hq, int64_t hk, double eps) {
  const int64_t B = x.size(0), D = cos.size(-1);
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "decode_qkv takes one new token per row: x [B, 1, H]");
  auto qkv = linear(rms_norm(x, norm, eps), qkv_w, qkv_b).view({B, 1, hq + 2 * hk, D});
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
                          torch::Tensor down_w, torch::Tensor down_b, double eps, torch::Tensor prompt_kt,
                          torch::Tensor prompt_vt, torch::Tensor root_kt, torch::Tensor root_vt,
                          torch::Tensor root_len) {
  const int64_t B = x.size(0), hq = q.size(1), D = q.size(3), hk = k.size(1);
  x = x.contiguous();  // add_into's operand
  auto o = decode_attention(q.reshape({B, hk, hq / hk, D}), k, v, own_valid, prompt_k, prompt_v, prompt_len, group_of,
                            own_of, scale, prompt_kt, prompt_vt, root_kt, root_vt, root_len);
  auto h = linear(o.reshape({B, 1, hq * D}), o_w, o_b);
  add_into(h, x);  // x + o(attention)
  auto y = linear(silu_mul(linear(rms_norm(h, norm2, eps), gate_up_w, gate_up_b)), down_w, down_b);
  add_into(y, h);
  return y;
}

// decode_layers: every decoder layer of a decode step and the final norm in one call (decode_layers.h's loop
// over decode_qkv and decode_rest); prompt_kt/vt per layer, or empty lists (no AMX tiles).
torch::Tensor decode_layers(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, torch::Tensor own_valid,
                            std::vector<torch::Tensor> weights, std::vector<torch::Tensor> cache_k,
                            std::vector<torch::Tensor> cache_v, int64_t n, int64_t T,
                            std::vector<torch::Tensor> prompt_k, std::vector<torch::Tensor> prompt_v,
                            torch::Tensor prompt_len, torch::Tensor group_of, torch::Tensor own_of, torch::Tensor col,
                            std::vector<torch::Tensor> prompt_kt, std::vector<torch::Tensor> prompt_vt,
                            std::vector<torch::Tensor> root_kt, std::vector<torch::Tensor> root_vt,
                            torch::Tensor root_len, double scale, int64_t hq, int64_t hk, double eps,
                            torch::Tensor final_norm) {
  const bool tiles = !prompt_kt.empty(), rooted = root_len.numel() > 0;
  TORCH_CHECK(!tiles || (prompt_kt.size() == cache_k.size() && prompt_vt.size() == cache_k.size()),
              "decode_layers: prompt tiles for every layer or none");
  TORCH_CHECK(!rooted || (root_kt.size() == cache_k.size() && root_vt.size() == cache_k.size()),
              "decode_layers: a root's tiles for every layer");
  x = layer_loop(
      x, weights, cache_k, cache_v, prompt_k, prompt_v, n, T, own_of, col, hk, cos.size(-1),
      [&](const torch::Tensor& h, const torch::Tensor* w) {
        return decode_qkv(h, w[0], w[1], w[2], cos, sin, hq, hk, eps);
      },
      [&](size_t i, const torch::Tensor& h, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
          const torch::Tensor* w) {
        return decode_rest(h, q, k, v, own_valid, prompt_k[i], prompt_v[i], prompt_len, group_of, own_of, scale, w[3],
                           w[4], w[5], w[6], w[7], w[8], w[9], eps, tiles ? prompt_kt[i] : torch::empty({0}),
                           tiles ? prompt_vt[i] : torch::empty({0}), rooted ? root_kt[i] : torch::empty({0}),
                           rooted ? root_vt[i] : torch::empty({0}), root_len);
      });
  return rms_norm(x, final_norm, eps);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The kernels touch only tensors, so they release the GIL: a decode step spends most of its time in
  // them, and holding the GIL there stalled every other Python thread of the process (a service's gRPC
  // handlers; in-process, the concurrent searches and the value model's scoring).
  const auto nogil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("decode_qkv", &decode_qkv, "a decode step's q, k, v of one decoder layer (AVX512-BF16)", nogil);
  m.def("decode_rest", &decode_rest, "a decode step's attention and MLP of one decoder layer (AVX512-BF16)", nogil);
  m.def("decode_layers", &decode_layers, "a decode step's decoder layers, cache writes and final norm (AVX512-BF16)",
        nogil);
  m.def("pack_linear", &pack_linear, "a bf16 weight [N, K] laid out for linear (vdpbf16ps pairs)", nogil);
  m.def("set_tiles", &set_tiles, "linear with AMX tiles from now on (if the CPU and kernel allow); true if on");
  m.def("linear", &linear, "x w^T (+ bias) of bf16 rows and a pack_linear weight (AVX512-BF16)", nogil);
  m.def("linear_into", &linear_into, "linear, written into the first rows of a reused buffer", nogil);
  m.def("rope", &rope, "rotary embedding of the q and k heads of a bf16 qkv projection (AVX512-BF16)", nogil);
  m.def("rms_norm", &rms_norm, "LlamaRMSNorm of bf16 rows (AVX512-BF16)", nogil);
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a bf16 gate|up projection, rounded as torch rounds", nogil);
  m.def("decode_attention", &decode_attention, "shared-prompt decode attention (bf16, AVX512-BF16)", nogil);
  m.def("past_tiles", &past_tiles, "a prefill's pasts [G, Hk, n, 64] as prompt_tiles' layouts, in one pass", nogil);
  m.def("lay_tiles", &lay_tiles, "a prompt's K/V into its slab slot in prompt_tiles' layouts, zeros after", nogil);
}
