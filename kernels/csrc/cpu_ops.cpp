// The compiled CPU ops (kernels/cpu_ext.py builds and loads this file).
//
// Ops where torch's own CPU kernels, or the dispatch of many small torch
// calls, left most of the machine unused in a decode step or an adapter load:
//
//   paged_decode_attention  one query token per sequence, keys and values
//                           read in place from the paged cache through the
//                           block table (no gather into a padded copy)
//   lora_apply              every short segment's shrink and expand of one
//                           layer and projection group in one call
//   lora_apply_long         the same for long bf16 segments (prefill) on the
//                           CPU's bf16 matrix unit (AMX), through ATen's
//                           brgemm micro-kernel: torch's own bf16 GEMM spends
//                           more in each call's set-up than in the math at
//                           LoRA's sizes (rank-wide shrinks, rank-deep expands)
//   small_linear            x @ W^T for a few rows of x (one sequence or a
//                           few decoding alone): a pass over W that streams
//                           it at memory speed, where torch's GEMM at M=1
//                           reaches about a third of that
//   rms_norm, rope_         HF Llama's RMSNorm and rotary embedding, one
//                           pass each, rounding where torch's ops round
//   pool_write_group        an adapter's rows into a CPU pool's pages
//   set_thread_parallelism  the calling thread's OpenMP team size
//
// All compute in float32 whatever the storage dtype (bf16 or float32) and
// round once into the output. Loops are written so that -O3 vectorizes them
// without -ffast-math: each inner loop runs over LANES independent lanes,
// and reductions are summed across lanes at the end.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

namespace {

constexpr int64_t LANES = 16;

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(c10::Half v) { return static_cast<float>(v); }

template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

// bf16 is the top half of a float32: a shift, which -O3 vectorizes (the
// generic conversion above does not)
inline void load_row(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(bits[i]) << 16;
}

// GCC/Clang vector types, so that a weight row is converted and multiplied
// 16 lanes at a time on any target (AVX-512, AVX2 as two halves, or scalar
// code) with no intrinsics to choose between; a loop over a runtime number
// of rows with plain arrays is not vectorized as well.
typedef float vfloat __attribute__((vector_size(LANES * 4)));
typedef uint32_t vuint __attribute__((vector_size(LANES * 4)));
typedef uint16_t vhalfword __attribute__((vector_size(LANES * 2)));

inline vfloat load_lanes(const float* w) {
  vfloat v;
  std::memcpy(&v, w, sizeof v);
  return v;
}
template <typename T>
inline vfloat load_lanes(const T* w) {  // any other dtype (float16): element by element
  float f[LANES];
  for (int64_t l = 0; l < LANES; ++l) f[l] = to_float(w[l]);
  return load_lanes(static_cast<const float*>(f));
}
inline vfloat load_lanes(const c10::BFloat16* w) {  // bf16 -> float32: the bits moved to the top half
  vhalfword h;
  std::memcpy(&h, w, sizeof h);
  vuint bits = __builtin_convertvector(h, vuint) << 16;
  vfloat v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// float32 -> bf16 bits, rounded to nearest even as c10::BFloat16 rounds (NaN stays a NaN)
inline vuint bf16_bits(vfloat v) {
  vuint bits;
  std::memcpy(&bits, &v, sizeof bits);
  const vuint rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return v != v ? vuint{} + 0x7FC0u : rounded;
}

// the lanes stored in dst's dtype, each rounded once
inline void store_lanes(float* dst, vfloat v) { std::memcpy(dst, &v, sizeof v); }
inline void store_lanes(c10::BFloat16* dst, vfloat v) {
  const vhalfword h = __builtin_convertvector(bf16_bits(v), vhalfword);
  std::memcpy(dst, &h, sizeof h);
}
template <typename T>
inline void store_lanes(T* dst, vfloat v) {  // any other dtype (float16): element by element
  for (int64_t l = 0; l < LANES; ++l) dst[l] = static_cast<T>(v[l]);
}

// the lanes rounded to T and back: what a torch op in T leaves between two steps
inline vfloat round_lanes(vfloat v, const float*) { return v; }
inline vfloat round_lanes(vfloat v, const c10::BFloat16*) {
  const vuint bits = bf16_bits(v) << 16;
  vfloat r;
  std::memcpy(&r, &bits, sizeof r);
  return r;
}
template <typename T>
inline vfloat round_lanes(vfloat v, const T*) {
  for (int64_t l = 0; l < LANES; ++l) v[l] = to_float(static_cast<T>(v[l]));
  return v;
}
template <typename T>
inline float round_to(float v) { return to_float(static_cast<T>(v)); }

constexpr int64_t SMALL_M = 4;  // rows of x one pass over W serves (python: base_linear.SMALL_LINEAR_ROWS)

// the vector types' lane sum, as a tree (a sequential sum of 16 lanes is a
// chain of dependent adds that costs more than a 64-wide dot product)
inline float lane_sum(vfloat v) {
  static_assert(LANES == 16, "the shuffles below halve 16 lanes");
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
}

// sums[j] = x[j] . w for the M rows of x (float32, [M, K]); U independent
// accumulators per row, so that fewer rows still keep the FMA units busy
template <typename T, int M>
inline void rows_dot(const float* x, int64_t K, const T* w, float* sums) {
  constexpr int U = M == 1 ? 4 : (M == 2 ? 2 : 1);
  vfloat acc[M][U];
  for (int j = 0; j < M; ++j)
    for (int u = 0; u < U; ++u) acc[j][u] = vfloat{};
  int64_t i = 0;
  for (; i + U * LANES <= K; i += U * LANES) {
    // the same columns of the next row: callers walk the rows of W (or A) in order, and the
    // hardware's prefetch alone left the loads waiting (16 adapters x 2 tokens over 30 layers:
    // 18.7 -> 13.5 ms; with expand_tile's prefetch too, 10.9-12.5)
    __builtin_prefetch(w + K + i);
    if (U * LANES * sizeof(T) > 64) __builtin_prefetch(w + K + i + 64 / sizeof(T));
    for (int u = 0; u < U; ++u) {
      const vfloat wv = load_lanes(w + i + u * LANES);
      for (int j = 0; j < M; ++j) acc[j][u] += load_lanes(x + j * K + i + u * LANES) * wv;
    }
  }
  for (int j = 0; j < M; ++j) {
    vfloat a = acc[j][0];
    for (int u = 1; u < U; ++u) a += acc[j][u];
    float s = lane_sum(a);
    for (int64_t k = i; k < K; ++k) s += x[j * K + k] * to_float(w[k]);
    sums[j] = s;
  }
}

// rows_dot for 1..SMALL_M rows chosen at run time
template <typename W>
inline void rows_dot_n(const float* x, int64_t m, int64_t K, const W* w, float* sums) {
  switch (m) {
    case 1: rows_dot<W, 1>(x, K, w, sums); break;
    case 2: rows_dot<W, 2>(x, K, w, sums); break;
    case 3: rows_dot<W, 3>(x, K, w, sums); break;
    default: rows_dot<W, 4>(x, K, w, sums); break;
  }
}

typedef int32_t vint __attribute__((vector_size(LANES * 4)));

// exp of 16 lanes: exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 in
// [-ln2/2, ln2/2] (ln 2 split in two so r is exact), exp(r) by Cephes' degree-6
// polynomial: about 1 ulp of float32 over the softmax's range (x <= 0; below
// -87 the result is the smallest normal float, not 0, which no sum notices)
inline vfloat exp_lanes(vfloat x) {
  const vfloat lo = vfloat{} - 87.3365448f, hi = vfloat{} + 88.3762626f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vfloat fx = x * 1.44269504088896341f + 0.5f;
  vint n = __builtin_convertvector(fx, vint);  // truncation: one too many where fx < 0 and not whole
  vfloat fn = __builtin_convertvector(n, vfloat);
  const vint over = fn > fx;
  n += over;  // -1 where truncation rounded up
  fn = __builtin_convertvector(n, vfloat);
  const vfloat r = x - fn * 0.693359375f - fn * -2.12194440e-4f;
  vfloat p = vfloat{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vint bits = (n + 127) << 23;
  vfloat scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// s[i] = exp(s[i] - shift) for i < n; returns their sum
inline float exp_shifted_sum(float* s, int64_t n, float shift) {
  vfloat total = vfloat{};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES) {
    vfloat v = exp_lanes(load_lanes(s + i) - shift);
    std::memcpy(s + i, &v, sizeof v);
    total += v;
  }
  float sum = lane_sum(total);
  for (; i < n; ++i) {
    s[i] = std::exp(s[i] - shift);
    sum += s[i];
  }
  return sum;
}

// out lane j = the sum of v[j]'s lanes, for 16 vectors at once: lane_sum's
// tree shared by all of them (30 shuffles and adds, not 16 x 8)
inline vfloat lane_sums(const vfloat* v) {
  static_assert(LANES == 16, "the shuffles below halve 16 lanes");
  // fed in bit-reversed order, the tree leaves vector j's sum in lane j
  constexpr int BITREV[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
  vfloat l1[8], l2[4], l3[2];
  for (int i = 0; i < 8; ++i) {
    const vfloat a = v[BITREV[2 * i]], b = v[BITREV[2 * i + 1]];
    l1[i] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
            __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int i = 0; i < 4; ++i) {
    const vfloat a = l1[2 * i], b = l1[2 * i + 1];
    l2[i] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
            __builtin_shufflevector(a, b, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  }
  for (int i = 0; i < 2; ++i) {
    const vfloat a = l2[2 * i], b = l2[2 * i + 1];
    l3[i] = __builtin_shufflevector(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
            __builtin_shufflevector(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  }
  return __builtin_shufflevector(l3[0], l3[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         __builtin_shufflevector(l3[0], l3[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}

constexpr int64_t KEYS = LANES;  // keys scored together: one vector of scores per query head

// scores[j] = q . k[j] for the KEYS rows of k (float32, rows ld apart, those
// past the tile's end zero), of which the first nk are stored
inline void score_tile(const float* q, const float* k, int64_t ld, int64_t D, int64_t nk, float* scores) {
  vfloat acc[KEYS];
  for (int64_t j = 0; j < KEYS; ++j) acc[j] = vfloat{};
  int64_t d = 0;
  for (; d + LANES <= D; d += LANES) {
    const vfloat qv = load_lanes(q + d);
    for (int64_t j = 0; j < KEYS; ++j) acc[j] += qv * load_lanes(k + j * ld + d);
  }
  float sums[KEYS];
  const vfloat total = lane_sums(acc);
  std::memcpy(sums, &total, sizeof sums);
  for (int64_t j = 0; j < nk; ++j) {
    for (int64_t r = d; r < D; ++r) sums[j] += q[r] * k[j * ld + r];
    scores[j] = sums[j];
  }
}

// acc += sum_j p[j] * v[j] over the nk rows of v (float32, rows ld apart)
inline void weigh_tile(const float* p, const float* v, int64_t ld, int64_t D, int64_t nk, float* acc) {
  int64_t d = 0;
  for (; d + LANES <= D; d += LANES) {
    vfloat a0 = load_lanes(acc + d), a1 = vfloat{};  // two chains: half the FMA latency per key
    int64_t j = 0;
    for (; j + 2 <= nk; j += 2) {
      a0 += p[j] * load_lanes(v + j * ld + d);
      a1 += p[j + 1] * load_lanes(v + (j + 1) * ld + d);
    }
    if (j < nk) a0 += p[j] * load_lanes(v + j * ld + d);
    a0 += a1;
    std::memcpy(acc + d, &a0, sizeof a0);
  }
  for (; d < D; ++d)
    for (int64_t j = 0; j < nk; ++j) acc[d] += p[j] * v[j * ld + d];
}

template <typename T>
void decode_attention_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_table, const at::Tensor& ctx_lens, int64_t block_size,
                           double scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KV = k_cache.size(1), G = H / KV;
  const int64_t max_blocks = block_table.size(1);
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int64_t* table = block_table.data_ptr<int64_t>();
  const int64_t* lens = ctx_lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const int64_t slot_stride = KV * D;  // elements between consecutive slots
  const float fscale = static_cast<float>(scale);
  // A work item is a sequence and a run of its kv heads: all of them (each cache row read whole,
  // one contiguous run) where the sequences alone keep every thread busy, else one (more items).
  const int64_t heads_per_item = B >= 4 * at::get_num_threads() ? KV : 1;
  const int64_t items_per_seq = KV / heads_per_item, width = heads_per_item * D, nq = heads_per_item * G;

  at::parallel_for(0, B * items_per_seq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(nq * D), acc(nq * D), scores, denom(nq), tile(KEYS * width);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / items_per_seq, h0 = item % items_per_seq * heads_per_item;  // first kv head
      const int64_t n = lens[b];
      TORCH_CHECK(n >= 1 && n <= max_blocks * block_size, "context length ", n, " outside the block table");
      scores.resize(nq * n);
      // query heads h0 * G .. (h0 + heads_per_item) * G: contiguous in q
      load_row(qp + (b * H + h0 * G) * D, qf.data(), nq * D);
      for (auto& x : qf) x *= fscale;
      auto row = [&](const T* cache, int64_t t) {
        return cache + (table[b * max_blocks + t / block_size] * block_size + t % block_size) * slot_stride + h0 * D;
      };
      // rows t0 .. t1 on their way from memory while this tile is computed: a decode step's
      // cache rows are cold, and a block's rows for a run of heads lie slot_stride apart
      auto prefetch = [&](const T* cache, int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < std::min(n, t1); ++t)
          for (int64_t off = 0; off < width * static_cast<int64_t>(sizeof(T)); off += 64)
            __builtin_prefetch(reinterpret_cast<const char*>(row(cache, t)) + off);
      };
      // the cache rows of keys t0 .. t0 + nk, converted to float32 into `tile` (the rest zero)
      auto load_tile = [&](const T* cache, int64_t t0, int64_t nk) {
        for (int64_t j = 0; j < nk; ++j) load_row(row(cache, t0 + j), tile.data() + j * width, width);
        std::fill(tile.begin() + nk * width, tile.end(), 0.f);
        // none
      };
      for (int64_t t0 = 0; t0 < n; t0 += KEYS) {
        const int64_t nk = std::min(KEYS, n - t0);
        load_tile(kp, t0, nk);
        for (int64_t h = 0; h < nq; ++h)  // query head h reads kv head h / G of the run
          score_tile(qf.data() + h * D, tile.data() + h / G * D, width, D, nk, scores.data() + h * n + t0);
      }
      for (int64_t h = 0; h < nq; ++h) {
        float* s = scores.data() + h * n;
        denom[h] = exp_shifted_sum(s, n, *std::max_element(s, s + n));
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t0 = 0; t0 < n; t0 += KEYS) {
        const int64_t nk = std::min(KEYS, n - t0);
        load_tile(vp, t0, nk);
        for (int64_t h = 0; h < nq; ++h)
          weigh_tile(scores.data() + h * n + t0, tile.data() + h / G * D, width, D, nk, acc.data() + h * D);
      }
      T* o = op + (b * H + h0 * G) * D;
      for (int64_t h = 0; h < nq; ++h) {
        const float inv = 1.f / denom[h];
        for (int64_t d = 0; d < D; ++d) o[h * D + d] = static_cast<T>(acc[h * D + d] * inv);
      }
    }
  });
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_table, const at::Tensor& ctx_lens, int64_t block_size,
                                  double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), "q [B,H,D], caches [slots,KV,D]");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(), "one dtype");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous tensors");
  TORCH_CHECK(q.size(2) == k_cache.size(2) && q.size(1) % k_cache.size(1) == 0, "head shapes");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && ctx_lens.scalar_type() == at::kLong, "int64 tables");
  TORCH_CHECK(block_table.is_contiguous() && block_table.size(0) == q.size(0) && ctx_lens.size(0) == q.size(0),
              "a block table row and a length per sequence");
  auto out = at::empty_like(q);
  AT_DISPATCH_SWITCH(q.scalar_type(), "paged_decode_attention",
      AT_DISPATCH_CASE(at::kFloat, [&] { decode_attention_impl<float>(q, k_cache, v_cache, block_table, ctx_lens, block_size, scale, out); })
      AT_DISPATCH_CASE(at::kBFloat16, [&] { decode_attention_impl<c10::BFloat16>(q, k_cache, v_cache, block_table, ctx_lens, block_size, scale, out); })
      AT_DISPATCH_CASE(at::kHalf, [&] { decode_attention_impl<c10::Half>(q, k_cache, v_cache, block_table, ctx_lens, block_size, scale, out); }));
  return out;
}

// Tokens processed together against one row of A (each row read once per tile).
constexpr int64_t TILE = SMALL_M;

// delta[j, c] = sum of h[j, k] * b[k, c] over the rows k of column c's slice (k % num_slices),
// for the nt tokens of a tile (h: [TILE, rn], rows past nt zero): each chunk of 16 columns keeps
// its TILE sums in registers over k, so one load of b's row serves every token of the tile (a
// pass over delta per row of b cost a load and a store per multiply-add; for a lone token,
// memory-bound either way, the two measured the same)
template <typename W>
inline void expand_tile(const float* h, int64_t nt, int64_t rn, const W* b, int64_t out_total, int64_t num_slices,
                        const std::vector<int64_t>& slice_offsets, float* delta) {
  for (int64_t sl = 0; sl < num_slices; ++sl) {
    const int64_t lo = slice_offsets[sl], hi = slice_offsets[sl + 1];
    int64_t c = lo;
    // four chunks at a time: each row of b is read 128 bytes at a time (two cache lines of bf16)
    for (; c + 4 * LANES <= hi; c += 4 * LANES) {
      vfloat acc[4][TILE] = {};
      for (int64_t k = sl; k < rn; k += num_slices) {
        const W* row = b + k * out_total + c;
        // this row's next block of columns: the loop walks down the rows, a pattern the
        // hardware does not prefetch (with rows_dot's prefetch: 13.5 -> 10.9-12.5 ms, see
        // there; two blocks ahead 11.9, four 11.4)
        __builtin_prefetch(row + 4 * LANES);
        __builtin_prefetch(row + 4 * LANES + 64 / sizeof(W));
        const vfloat b0 = load_lanes(row), b1 = load_lanes(row + LANES), b2 = load_lanes(row + 2 * LANES),
                     b3 = load_lanes(row + 3 * LANES);
        for (int64_t j = 0; j < TILE; ++j) {
          const float hk = h[j * rn + k];
          acc[0][j] += hk * b0;
          acc[1][j] += hk * b1;
          acc[2][j] += hk * b2;
          acc[3][j] += hk * b3;
        }
      }
      for (int64_t j = 0; j < nt; ++j)
        for (int64_t q = 0; q < 4; ++q) std::memcpy(delta + j * out_total + c + q * LANES, &acc[q][j], sizeof(vfloat));
    }
    for (; c + LANES <= hi; c += LANES) {
      vfloat acc[TILE] = {};
      for (int64_t k = sl; k < rn; k += num_slices) {
        const vfloat bv = load_lanes(b + k * out_total + c);
        for (int64_t j = 0; j < TILE; ++j) acc[j] += h[j * rn + k] * bv;
      }
      for (int64_t j = 0; j < nt; ++j) std::memcpy(delta + j * out_total + c, &acc[j], sizeof(vfloat));
    }
    for (; c < hi; ++c)
      for (int64_t j = 0; j < nt; ++j) {
        float sum = 0.f;
        for (int64_t k = sl; k < rn; k += num_slices) sum += h[j * rn + k] * to_float(b[k * out_total + c]);
        delta[j * out_total + c] = sum;
      }
  }
}

// DoRA's row scales: token t in [lo, hi) has its output row multiplied by row rows[t - lo] of
// table ([rows, out_total] float32: the pool's per-slot scales; none when table is null)
struct RowScale {
  const float* table = nullptr;
  const int64_t* rows = nullptr;
  int64_t lo = 0, hi = 0;
};

// The checked RowScale of an op's optional (table, rows, lo) arguments.
RowScale row_scale_of(const at::Tensor& out, const c10::optional<at::Tensor>& scale_table,
                      const c10::optional<at::Tensor>& scale_rows, int64_t scale_lo) {
  if (!scale_table.has_value()) return RowScale{};
  TORCH_CHECK(scale_table->scalar_type() == at::kFloat && scale_table->is_contiguous() && scale_table->dim() == 2
              && scale_table->size(1) == out.size(1), "scale table [rows, out_total] float32");
  TORCH_CHECK(scale_rows.has_value() && scale_rows->scalar_type() == at::kLong && scale_rows->is_contiguous()
              && scale_rows->dim() == 1, "a scale row per token");
  const int64_t* rows = scale_rows->data_ptr<int64_t>();
  for (int64_t i = 0; i < scale_rows->size(0); ++i)
    TORCH_CHECK(rows[i] >= 0 && rows[i] < scale_table->size(0), "scale row outside the table");
  TORCH_CHECK(scale_lo >= 0 && scale_lo + scale_rows->size(0) <= out.size(0), "scaled tokens outside the batch");
  return RowScale{scale_table->data_ptr<float>(), rows, scale_lo, scale_lo + scale_rows->size(0)};
}

// T: the activations' dtype; W: the pool's (float32, or bf16 for a bf16 model: half the bytes a step streams)
template <typename T, typename W>
void lora_apply_impl(const at::Tensor& x, at::Tensor& out, const std::vector<int64_t>& starts,
                     const std::vector<int64_t>& ends, const std::vector<at::Tensor>& a_rows,
                     const std::vector<at::Tensor>& b_rows, int64_t num_slices,
                     const std::vector<int64_t>& slice_offsets, const RowScale& scale) {
  const int64_t in = x.size(1), out_total = out.size(1);
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  // work items: (segment, tile of TILE tokens), so a long segment spreads over threads too
  std::vector<std::pair<int64_t, int64_t>> items;
  for (size_t s = 0; s < starts.size(); ++s)
    for (int64_t t = starts[s]; t < ends[s]; t += TILE) items.emplace_back(static_cast<int64_t>(s), t);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xf(TILE * in), h, delta(TILE * out_total);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t s = items[it].first, t0 = items[it].second;
      const int64_t nt = std::min(TILE, ends[s] - t0);
      const W* a = a_rows[s].data_ptr<W>();  // [rn, in], row k of slice k % num_slices
      const W* bm = b_rows[s].data_ptr<W>();  // [rn, out_total], scale folded in
      const int64_t rn = a_rows[s].size(0);
      for (int64_t j = 0; j < nt; ++j) load_row(xp + (t0 + j) * in, xf.data() + j * in, in);
      h.assign(TILE * rn, 0.f);
      for (int64_t k = 0; k < rn; ++k) {  // row k of A read once for the tile's tokens
        float sums[TILE];
        rows_dot_n(xf.data(), nt, in, a + k * in, sums);
        for (int64_t j = 0; j < nt; ++j) h[j * rn + k] = sums[j];
      }
      expand_tile(h.data(), nt, rn, bm, out_total, num_slices, slice_offsets, delta.data());
      for (int64_t j = 0; j < nt; ++j) {
        const int64_t t = t0 + j;
        T* o = op + t * out_total;
        const float* dl = delta.data() + j * out_total;
        if (scale.table != nullptr && t >= scale.lo && t < scale.hi) {
          const float* sc = scale.table + scale.rows[t - scale.lo] * out_total;
          for (int64_t c = 0; c < out_total; ++c) o[c] = static_cast<T>((to_float(o[c]) + dl[c]) * sc[c]);
        } else {
          for (int64_t c = 0; c < out_total; ++c) o[c] = static_cast<T>(to_float(o[c]) + dl[c]);
        }
      }
    }
  });
}

void lora_apply(const at::Tensor& x, at::Tensor& out, std::vector<int64_t> starts, std::vector<int64_t> ends,
                std::vector<at::Tensor> a_rows, std::vector<at::Tensor> b_rows, int64_t num_slices,
                std::vector<int64_t> slice_offsets, c10::optional<at::Tensor> scale_table,
                c10::optional<at::Tensor> scale_rows, int64_t scale_lo) {
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && x.size(0) == out.size(0), "x [T,in], out [T,out_total]");
  TORCH_CHECK(x.scalar_type() == out.scalar_type() && x.is_contiguous() && out.is_contiguous(), "x, out: one dtype, contiguous");
  TORCH_CHECK(starts.size() == ends.size() && a_rows.size() == starts.size() && b_rows.size() == starts.size(), "one A and B per segment");
  TORCH_CHECK(static_cast<int64_t>(slice_offsets.size()) == num_slices + 1 && slice_offsets.back() == out.size(1), "slice offsets");
  for (size_t s = 0; s < starts.size(); ++s) {
    TORCH_CHECK(0 <= starts[s] && starts[s] < ends[s] && ends[s] <= x.size(0), "segment outside the batch");
    TORCH_CHECK(a_rows[s].scalar_type() == a_rows[0].scalar_type() && b_rows[s].scalar_type() == a_rows[0].scalar_type()
                && (a_rows[0].scalar_type() == at::kFloat || a_rows[0].scalar_type() == at::kBFloat16),
                "A and B rows: one dtype, float32 or bfloat16");
    TORCH_CHECK(a_rows[s].is_contiguous() && a_rows[s].size(1) == x.size(1), "A rows [rn,in]");
    TORCH_CHECK(b_rows[s].is_contiguous() && b_rows[s].size(1) == out.size(1) && b_rows[s].size(0) == a_rows[s].size(0),
                "B rows [rn,out_total]");
  }
  const RowScale scale = row_scale_of(out, scale_table, scale_rows, scale_lo);
  if (starts.empty()) return;
  const bool bf16_pool = a_rows[0].scalar_type() == at::kBFloat16;
  AT_DISPATCH_SWITCH(x.scalar_type(), "lora_apply",
      AT_DISPATCH_CASE(at::kFloat, [&] {
        if (bf16_pool) lora_apply_impl<float, c10::BFloat16>(x, out, starts, ends, a_rows, b_rows, num_slices, slice_offsets, scale);
        else lora_apply_impl<float, float>(x, out, starts, ends, a_rows, b_rows, num_slices, slice_offsets, scale);
      })
      AT_DISPATCH_CASE(at::kBFloat16, [&] {
        if (bf16_pool) lora_apply_impl<c10::BFloat16, c10::BFloat16>(x, out, starts, ends, a_rows, b_rows, num_slices, slice_offsets, scale);
        else lora_apply_impl<c10::BFloat16, float>(x, out, starts, ends, a_rows, b_rows, num_slices, slice_offsets, scale);
      }));
}

// -- long bf16 segments through brgemm ------------------------------------------------------

using bf16 = c10::BFloat16;

// The brgemm micro-kernel's B operand in VNNI-2 order: element (k, n) of a [K, N] matrix at
// [(k / 2) * N + n] * 2 + k % 2, K padded to even with zeros (pairs of rows interleaved).

// 16 rows of 16 32-bit words transposed in place: four rounds of swapping the off-diagonal
// blocks (8 x 8, 4 x 4, 2 x 2, 1 x 1), each row pair one two-input shuffle per row (a permute of
// two registers on AVX-512); word (i, j) ends at (j, i) as each round swaps one bit of i and j
inline void transpose_words_16(vuint* v) {
#define LORAMUX_SWAP(S, LO, HI)                                            \
  for (int i = 0; i < 16; ++i)                                             \
    if (!(i & S)) {                                                        \
      const vuint a = v[i], b = v[i + S];                                  \
      v[i] = __builtin_shufflevector(a, b, LO);                            \
      v[i + S] = __builtin_shufflevector(a, b, HI);                        \
    }
#define LORAMUX_L(...) __VA_ARGS__
  LORAMUX_SWAP(8, LORAMUX_L(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
               LORAMUX_L(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31))
  LORAMUX_SWAP(4, LORAMUX_L(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27),
               LORAMUX_L(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31))
  LORAMUX_SWAP(2, LORAMUX_L(0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29),
               LORAMUX_L(2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31))
  LORAMUX_SWAP(1, LORAMUX_L(0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30),
               LORAMUX_L(1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31))
#undef LORAMUX_L
#undef LORAMUX_SWAP
}

// A^T [in, rn] from A's rows [rn, in], in even: elements (2kk, n) and (2kk + 1, n) of A^T are
// one 32-bit word of row n, so packing is a transpose of words, 16 x 16 at a time (a word at a
// time: 8 x 128 tokens over 30 layers 41-42 ms, against 39.5-40). Row n (of slice
// n % num_slices) becomes column (n % num_slices) * r + n / num_slices: slice-major, so that
// the shrink leaves each slice's h in one run of r columns
void pack_transposed_rows(const bf16* rows, int64_t rn, int64_t in, int64_t num_slices, bf16* packed) {
  const int64_t pairs = in / 2, r = rn / num_slices;
  const char* src = reinterpret_cast<const char*>(rows);
  char* dst = reinterpret_cast<char*>(packed);
  std::vector<int64_t> row_of(rn);  // the row of A that column c of A^T is
  for (int64_t n = 0; n < rn; ++n) row_of[(n % num_slices) * r + n / num_slices] = n;
  auto word = [&](int64_t kk, int64_t c) { std::memcpy(dst + (kk * rn + c) * 4, src + (row_of[c] * pairs + kk) * 4, 4); };
  int64_t c0 = 0;
  for (; c0 + LANES <= rn; c0 += LANES) {
    int64_t kk0 = 0;
    for (; kk0 + LANES <= pairs; kk0 += LANES) {
      vuint v[LANES];
      for (int64_t i = 0; i < LANES; ++i) std::memcpy(&v[i], src + (row_of[c0 + i] * pairs + kk0) * 4, sizeof(vuint));
      transpose_words_16(v);
      for (int64_t w = 0; w < LANES; ++w) std::memcpy(dst + ((kk0 + w) * rn + c0) * 4, &v[w], sizeof(vuint));
    }
    for (; kk0 < pairs; ++kk0)
      for (int64_t c = c0; c < c0 + LANES; ++c) word(kk0, c);
  }
  for (; c0 < rn; ++c0)
    for (int64_t kk = 0; kk < pairs; ++kk) word(kk, c0);
}

// a [K, N] matrix whose row k is row(k) (N contiguous elements)
template <typename Row>
void pack_row_pairs(int64_t K, int64_t N, Row row, bf16* packed) {
  for (int64_t kk = 0; kk < (K + 1) / 2; ++kk) {
    const uint16_t* r0 = reinterpret_cast<const uint16_t*>(row(2 * kk));
    uint16_t* d = reinterpret_cast<uint16_t*>(packed) + kk * N * 2;
    if (2 * kk + 1 < K) {
      const uint16_t* r1 = reinterpret_cast<const uint16_t*>(row(2 * kk + 1));
      for (int64_t n = 0; n < N; ++n) {
        d[2 * n] = r0[n];
        d[2 * n + 1] = r1[n];
      }
    } else {
      for (int64_t n = 0; n < N; ++n) {
        d[2 * n] = r0[n];
        d[2 * n + 1] = 0;
      }
    }
  }
}

constexpr int64_t LONG_TOKENS = 32;   // tokens of one brgemm call (a work item)
constexpr int64_t LONG_COLUMNS = 64;  // output columns of one expand call: its float32 sums stay in L1
constexpr int64_t PREFETCH_ROWS = 4;  // how far ahead the expand's epilogue prefetches out's rows (8: the same)

bool brgemm_bf16_available() { return at::native::cpublas::could_pack(at::kBFloat16); }

// Every segment's A^T [in, rn] packed whole, and each slice's nonzero block of B (its r rows, its
// columns) packed per block of LONG_COLUMNS, so the expand skips the zero blocks of b_rows.
// (new bf16[n]: uninitialized, as the packing writes every element; a zeroed vector cost a
// pass over ~300 KB per segment, layer and group)
struct PackedLora {
  std::unique_ptr<bf16[]> a, b;
};

PackedLora pack_segment(const at::Tensor& a_rows, const at::Tensor& b_rows, int64_t num_slices,
                        const std::vector<int64_t>& slice_offsets) {
  const int64_t rn = a_rows.size(0), in = a_rows.size(1), out_total = b_rows.size(1);
  const int64_t r = rn / num_slices, r2 = (r + 1) / 2 * 2;
  const bf16* a = a_rows.data_ptr<bf16>();
  const bf16* bm = b_rows.data_ptr<bf16>();
  PackedLora p{std::unique_ptr<bf16[]>(new bf16[in * rn]), std::unique_ptr<bf16[]>(new bf16[r2 * out_total])};
  pack_transposed_rows(a, rn, in, num_slices, p.a.get());
  for (int64_t sl = 0; sl < num_slices; ++sl)
    for (int64_t c0 = slice_offsets[sl]; c0 < slice_offsets[sl + 1]; c0 += LONG_COLUMNS) {
      const int64_t nb = std::min(LONG_COLUMNS, slice_offsets[sl + 1] - c0);
      pack_row_pairs(r, nb, [&](int64_t k) { return bm + (k * num_slices + sl) * out_total + c0; },
                     p.b.get() + r2 * c0);
    }
  return p;
}

void lora_apply_long(const at::Tensor& x, at::Tensor& out, std::vector<int64_t> starts, std::vector<int64_t> ends,
                     std::vector<at::Tensor> a_rows, std::vector<at::Tensor> b_rows, int64_t num_slices,
                     std::vector<int64_t> slice_offsets, c10::optional<at::Tensor> scale_table,
                     c10::optional<at::Tensor> scale_rows, int64_t scale_lo) {
  namespace cpublas = at::native::cpublas;
  TORCH_CHECK(brgemm_bf16_available(), "this CPU has no bf16 brgemm (lora_apply serves it)");
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && x.size(0) == out.size(0), "x [T,in], out [T,out_total]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16 && x.is_contiguous()
              && out.is_contiguous(), "x, out: bf16, contiguous");
  TORCH_CHECK(x.size(1) % 2 == 0, "an even input width (VNNI pairs)");
  TORCH_CHECK(starts.size() == ends.size() && a_rows.size() == starts.size() && b_rows.size() == starts.size(),
              "one A and B per segment");
  TORCH_CHECK(num_slices >= 1 && static_cast<int64_t>(slice_offsets.size()) == num_slices + 1
              && slice_offsets.front() == 0 && slice_offsets.back() == out.size(1), "slice offsets");
  for (size_t s = 0; s < starts.size(); ++s) {
    TORCH_CHECK(0 <= starts[s] && starts[s] < ends[s] && ends[s] <= x.size(0), "segment outside the batch");
    TORCH_CHECK(a_rows[s].scalar_type() == at::kBFloat16 && a_rows[s].is_contiguous() && a_rows[s].dim() == 2
                && a_rows[s].size(1) == x.size(1) && a_rows[s].size(0) % num_slices == 0, "A rows [r*n,in], bf16");
    TORCH_CHECK(b_rows[s].scalar_type() == at::kBFloat16 && b_rows[s].is_contiguous() && b_rows[s].dim() == 2
                && b_rows[s].size(1) == out.size(1) && b_rows[s].size(0) == a_rows[s].size(0), "B rows [r*n,out_total], bf16");
  }
  const RowScale scale = row_scale_of(out, scale_table, scale_rows, scale_lo);
  const int64_t in = x.size(1), out_total = out.size(1), S = static_cast<int64_t>(starts.size());
  std::vector<PackedLora> packed(S);
  at::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) packed[s] = pack_segment(a_rows[s], b_rows[s], num_slices, slice_offsets);
  });
  std::vector<std::pair<int64_t, int64_t>> items;  // (segment, first token): a long segment spreads over threads
  for (int64_t s = 0; s < S; ++s)
    for (int64_t t = starts[s]; t < ends[s]; t += LONG_TOKENS) items.emplace_back(s, t);
  const bf16* xp = x.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> h, sums(LONG_TOKENS * LONG_COLUMNS);
    std::vector<bf16> hs;  // h rounded to bf16, slice by slice: [slice][token][r2] (the expand's A operand)
    for (int64_t it = begin; it < end; ++it) {
      const int64_t s = items[it].first, t0 = items[it].second, nt = std::min(LONG_TOKENS, ends[s] - t0);
      const int64_t rn = a_rows[s].size(0), r = rn / num_slices, r2 = (r + 1) / 2 * 2;
      h.resize(LONG_TOKENS * rn);
      cpublas::brgemm(nt, rn, in, in, rn, rn, false, xp + t0 * in, packed[s].a.get(), h.data());
      // bf16 h, as torch's bf16 shrink leaves it, each slice's run of r columns (slice-major, see
      // pack_transposed_rows) to its own rows; an odd rank's padding column zero. (Scattering
      // h's columns by k % num_slices, k / num_slices instead cost two divisions an element:
      // a quarter of the op's time.) The expand reads the first nt rows only.
      hs.resize(num_slices * LONG_TOKENS * r2);
      for (int64_t sl = 0; sl < num_slices; ++sl)
        for (int64_t j = 0; j < nt; ++j) {
          const float* src = h.data() + j * rn + sl * r;
          bf16* dst = hs.data() + (sl * LONG_TOKENS + j) * r2;
          int64_t kk = 0;
          for (; kk + LANES <= r; kk += LANES) store_lanes(dst + kk, load_lanes(src + kk));
          for (; kk < r; ++kk) dst[kk] = bf16(src[kk]);
          if (r2 > r) dst[r] = bf16(0.f);
        }
      for (int64_t sl = 0; sl < num_slices; ++sl)
        for (int64_t c0 = slice_offsets[sl]; c0 < slice_offsets[sl + 1]; c0 += LONG_COLUMNS) {
          const int64_t nb = std::min(LONG_COLUMNS, slice_offsets[sl + 1] - c0);
          cpublas::brgemm(nt, nb, r2, r2, nb, nb, false, hs.data() + sl * LONG_TOKENS * r2,
                          packed[s].b.get() + r2 * c0, sums.data());
          for (int64_t j = 0; j < nt; ++j) {  // out + delta (times a DoRA row's scales), rounded once
            const int64_t t = t0 + j;
            bf16* o = op + t * out_total + c0;
            const float* d = sums.data() + j * nb;
            // rows of out lie out_total apart, a stride the hardware does not follow; the base
            // GEMM wrote them a while ago (out of L1 and L2 for a long batch)
            __builtin_prefetch(o + PREFETCH_ROWS * out_total);
            __builtin_prefetch(o + PREFETCH_ROWS * out_total + 64 / sizeof(bf16));
            int64_t q = 0;
            if (scale.table != nullptr && t >= scale.lo && t < scale.hi) {
              const float* sc = scale.table + scale.rows[t - scale.lo] * out_total + c0;
              for (; q + LANES <= nb; q += LANES)
                store_lanes(o + q, (load_lanes(o + q) + load_lanes(d + q)) * load_lanes(sc + q));
              for (; q < nb; ++q) o[q] = bf16((to_float(o[q]) + d[q]) * sc[q]);
            } else {
              for (; q + LANES <= nb; q += LANES) store_lanes(o + q, load_lanes(o + q) + load_lanes(d + q));
              for (; q < nb; ++q) o[q] = bf16(to_float(o[q]) + d[q]);
            }
          }
        }
    }
    cpublas::brgemm_release();  // the thread's matrix-unit state
  });
}

template <typename T, int M>
void small_linear_rows(const float* xf, const T* w, const float* bias, int64_t K, int64_t N, T* out) {
  at::parallel_for(0, N, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) {
      float sums[M];
      rows_dot<T, M>(xf, K, w + n * K, sums);
      for (int j = 0; j < M; ++j) out[j * N + n] = static_cast<T>(bias != nullptr ? sums[j] + bias[n] : sums[j]);
    }
  });
}

template <typename T>
void small_linear_impl(const at::Tensor& xf, const at::Tensor& w, const float* bias, at::Tensor& out) {
  const int64_t K = w.size(1), N = w.size(0);
  const float* xp = xf.data_ptr<float>();
  const T* wp = w.data_ptr<T>();
  T* op = out.data_ptr<T>();
  switch (xf.size(0)) {
    case 1: small_linear_rows<T, 1>(xp, wp, bias, K, N, op); break;
    case 2: small_linear_rows<T, 2>(xp, wp, bias, K, N, op); break;
    case 3: small_linear_rows<T, 3>(xp, wp, bias, K, N, op); break;
    default: small_linear_rows<T, 4>(xp, wp, bias, K, N, op); break;
  }
}

// F.linear(x, w, bias) for x [M, K] with 1 <= M <= SMALL_M, w [N, K] (x's dtype), bias [N] or none
at::Tensor small_linear(const at::Tensor& x, const at::Tensor& w, c10::optional<at::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x [M,K], w [N,K]");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= SMALL_M, "small_linear takes 1 to ", SMALL_M, " rows");
  TORCH_CHECK(x.scalar_type() == w.scalar_type() && w.is_contiguous(), "x and w: one dtype, w contiguous");
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0), "bias [N]");
    bias_f = bias->to(at::kFloat).contiguous();
  }
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  auto out = at::empty({x.size(0), w.size(0)}, x.options());
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  AT_DISPATCH_SWITCH(x.scalar_type(), "small_linear",
      AT_DISPATCH_CASE(at::kFloat, [&] { small_linear_impl<float>(xf, w, bp, out); })
      AT_DISPATCH_CASE(at::kBFloat16, [&] { small_linear_impl<c10::BFloat16>(xf, w, bp, out); }));
  return out;
}

// HF Llama's RMSNorm of each row: y = w * round(x * rsqrt(mean(x^2) + eps)), float32 math, the
// normalized row rounded to x's dtype before the weight multiplies it, the product rounded again
template <typename T>
void rms_norm_impl(const T* x, const T* w, T* y, int64_t rows, int64_t N, float eps) {
  at::parallel_for(0, rows, 8, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const T* xr = x + r * N;
      T* yr = y + r * N;
      vfloat acc = vfloat{};
      int64_t i = 0;
      for (; i + LANES <= N; i += LANES) {
        const vfloat v = load_lanes(xr + i);
        acc += v * v;
      }
      float sq = lane_sum(acc);
      for (int64_t k = i; k < N; ++k) sq += to_float(xr[k]) * to_float(xr[k]);
      const float inv = 1.f / std::sqrt(sq / static_cast<float>(N) + eps);
      for (i = 0; i + LANES <= N; i += LANES)
        store_lanes(yr + i, load_lanes(w + i) * round_lanes(load_lanes(xr + i) * inv, xr));
      for (; i < N; ++i) yr[i] = static_cast<T>(to_float(w[i]) * round_to<T>(to_float(xr[i]) * inv));
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x [T, N] contiguous");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous()
              && weight.scalar_type() == x.scalar_type(), "weight [N], x's dtype");
  auto y = at::empty_like(x);
  AT_DISPATCH_SWITCH(x.scalar_type(), "rms_norm",
      AT_DISPATCH_CASE(at::kFloat, [&] { rms_norm_impl(x.data_ptr<float>(), weight.data_ptr<float>(), y.data_ptr<float>(), x.size(0), x.size(1), static_cast<float>(eps)); })
      AT_DISPATCH_CASE(at::kBFloat16, [&] { rms_norm_impl(x.data_ptr<c10::BFloat16>(), weight.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(), x.size(0), x.size(1), static_cast<float>(eps)); })
      AT_DISPATCH_CASE(at::kHalf, [&] { rms_norm_impl(x.data_ptr<c10::Half>(), weight.data_ptr<c10::Half>(), y.data_ptr<c10::Half>(), x.size(0), x.size(1), static_cast<float>(eps)); }));
  return y;
}

// HF Llama's rotary embedding in place, rotate-half layout: with x = [x1, x2] halves of a head,
//   x <- x * cos + [-x2, x1] * sin
// each product and the sum rounded to x's dtype, as the three torch ops in it round
template <typename T>
void rope_impl(T* x, int64_t tokens, int64_t row_stride, int64_t heads, int64_t D, const T* cos, const T* sin) {
  const int64_t half = D / 2;
  at::parallel_for(0, tokens, 8, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const T* c = cos + t * D;
      const T* s = sin + t * D;
      for (int64_t h = 0; h < heads; ++h) {
        T* p = x + t * row_stride + h * D;
        int64_t i = 0;
        for (; i + LANES <= half; i += LANES) {
          const vfloat x1 = load_lanes(p + i), x2 = load_lanes(p + half + i);
          const vfloat y1 = round_lanes(x1 * load_lanes(c + i), p) - round_lanes(x2 * load_lanes(s + i), p);
          const vfloat y2 = round_lanes(x2 * load_lanes(c + half + i), p) + round_lanes(x1 * load_lanes(s + half + i), p);
          store_lanes(p + i, y1);
          store_lanes(p + half + i, y2);
        }
        for (; i < half; ++i) {
          const float x1 = to_float(p[i]), x2 = to_float(p[half + i]);
          p[i] = static_cast<T>(round_to<T>(x1 * to_float(c[i])) - round_to<T>(x2 * to_float(s[i])));
          p[half + i] = static_cast<T>(round_to<T>(x2 * to_float(c[half + i])) + round_to<T>(x1 * to_float(s[half + i])));
        }
      }
    }
  });
}

// x [T, heads, D]: heads D apart, D contiguous, rows anywhere (a view of the fused qkv output);
// cos, sin [T, D] contiguous, x's dtype
void rope_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2) && x.size(2) % 2 == 0,
              "x [T, heads, D]: heads D apart, D contiguous and even");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == x.size(0) && cos.size(1) == x.size(2)
              && cos.is_contiguous() && sin.is_contiguous(), "cos, sin [T, D] contiguous");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(), "one dtype");
  AT_DISPATCH_SWITCH(x.scalar_type(), "rope_",
      AT_DISPATCH_CASE(at::kFloat, [&] { rope_impl(x.data_ptr<float>(), x.size(0), x.stride(0), x.size(1), x.size(2), cos.data_ptr<float>(), sin.data_ptr<float>()); })
      AT_DISPATCH_CASE(at::kBFloat16, [&] { rope_impl(x.data_ptr<c10::BFloat16>(), x.size(0), x.stride(0), x.size(1), x.size(2), cos.data_ptr<c10::BFloat16>(), sin.data_ptr<c10::BFloat16>()); })
      AT_DISPATCH_CASE(at::kHalf, [&] { rope_impl(x.data_ptr<c10::Half>(), x.size(0), x.stride(0), x.size(1), x.size(2), cos.data_ptr<c10::Half>(), sin.data_ptr<c10::Half>()); }));
}

// One adapter's rows of one layer and projection group written into a CPU pool's pages (the
// layout of adapters_store/device_pool.py), module s of the group into slice s:
//   a_pages [P, n, in]         row (page j, s) = row j of A_s, zero for rank_s <= j < r
//   b_block [P, n, out_total]  row (page j, s), slice s's columns = scale_s * column j of B_s
//                              (zero past rank_s); the other slices' columns are left as they are
// pages: the slot's r pages; a[s]: A_s [rank_s, in], b[s]: B_s [out_s, rank_s] (float32 or bf16; no
// rows where the adapter leaves the module out). One call per layer and group: a Python loop over
// modules and rows made a rank-16 adapter's write about 15 ms, this makes it about 2.
template <typename W>
void pool_write_impl(at::Tensor& a_pages, at::Tensor& b_block, const std::vector<int64_t>& pages,
                     const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b,
                     const std::vector<double>& scales, const std::vector<int64_t>& slice_offsets) {
  const int64_t n = a_pages.size(1), in = a_pages.size(2), out_total = b_block.size(2);
  const int64_t r = static_cast<int64_t>(pages.size());
  W* ap = a_pages.data_ptr<W>();
  W* bp = b_block.data_ptr<W>();
  // float32 sources, converted before the parallel loops (a conversion allocates)
  std::vector<at::Tensor> as(n), bs(n);
  for (int64_t s = 0; s < n; ++s) {
    as[s] = a[s].to(at::kFloat).contiguous();
    bs[s] = b[s].to(at::kFloat).contiguous();  // [width, k]
  }
  // Rows of A (and, past the module's rank, zeros in A and B), one task a slice and row; then
  // B transposed, one task a slice and block of columns. Split over the calling thread's team:
  // a step's loads run on the engine thread, which has the whole machine then; the prefetch
  // worker's team is one thread, and the loops run inline there.
  at::parallel_for(0, n * r, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = t / r, j = t % r;
      const int64_t k = as[s].size(0), lo = slice_offsets[s], width = slice_offsets[s + 1] - lo;
      const float* asrc = as[s].data_ptr<float>();
      W* arow = ap + (pages[j] * n + s) * in;
      if (j < k) {
        int64_t i = 0;
        for (; i + LANES <= in; i += LANES) store_lanes(arow + i, load_lanes(asrc + j * in + i));
        for (; i < in; ++i) arow[i] = static_cast<W>(asrc[j * in + i]);
      } else {
        std::fill(arow, arow + in, static_cast<W>(0.f));
        W* brow = bp + (pages[j] * n + s) * out_total + lo;
        std::fill(brow, brow + width, static_cast<W>(0.f));
      }
    }
  });
  // B_s transposed into rows 0 .. k-1, a block of BLOCK columns at a time: the block's rows of
  // B_s (BLOCK x k floats, a few KB) stay in L1 while every row j gathers its column j from
  // them, 16 at a time. Gathering whole columns instead read all of B_s (up to hundreds of KB,
  // from L2) once per row.
  constexpr int64_t BLOCK = 4 * LANES;
  std::vector<std::pair<int64_t, int64_t>> blocks;  // (slice, first column)
  for (int64_t s = 0; s < n; ++s)
    for (int64_t c0 = 0; c0 < slice_offsets[s + 1] - slice_offsets[s]; c0 += BLOCK) blocks.emplace_back(s, c0);
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const auto [s, c0] = blocks[t];
      const int64_t k = bs[s].size(1), lo = slice_offsets[s], width = slice_offsets[s + 1] - lo;
      const int64_t c1 = std::min(width, c0 + BLOCK);
      const float scale = static_cast<float>(scales[s]);
      const float* bsrc = bs[s].data_ptr<float>();
      for (int64_t j = 0; j < k; ++j) {
        W* brow = bp + (pages[j] * n + s) * out_total + lo;
        int64_t c = c0;
        for (; c + LANES <= c1; c += LANES) {
          float column[LANES];
          for (int64_t l = 0; l < LANES; ++l) column[l] = bsrc[(c + l) * k + j];
          store_lanes(brow + c, load_lanes(static_cast<const float*>(column)) * scale);
        }
        for (; c < c1; ++c) brow[c] = static_cast<W>(scale * bsrc[c * k + j]);
      }
    }
  });
}

void pool_write_group(at::Tensor& a_pages, at::Tensor& b_block, std::vector<int64_t> pages, std::vector<at::Tensor> a,
                      std::vector<at::Tensor> b, std::vector<double> scales, std::vector<int64_t> slice_offsets) {
  TORCH_CHECK(a_pages.dim() == 3 && b_block.dim() == 3 && a_pages.size(0) == b_block.size(0)
              && a_pages.size(1) == b_block.size(1) && a_pages.is_contiguous() && b_block.is_contiguous(),
              "a_pages [P, n, in], b_block [P, n, out_total], contiguous");
  TORCH_CHECK(a_pages.scalar_type() == b_block.scalar_type()
              && (a_pages.scalar_type() == at::kFloat || a_pages.scalar_type() == at::kBFloat16),
              "pool: one dtype, float32 or bfloat16");
  const int64_t n = a_pages.size(1);
  TORCH_CHECK(static_cast<int64_t>(a.size()) == n && static_cast<int64_t>(b.size()) == n
              && static_cast<int64_t>(scales.size()) == n, "an A, a B and a scale per slice");
  TORCH_CHECK(static_cast<int64_t>(slice_offsets.size()) == n + 1 && slice_offsets[0] == 0
              && slice_offsets[n] == b_block.size(2), "slice offsets");
  for (int64_t p : pages) TORCH_CHECK(p >= 0 && p < a_pages.size(0), "page outside the pool");
  for (int64_t s = 0; s < n; ++s) {
    const int64_t k = a[s].size(0);
    TORCH_CHECK(k <= static_cast<int64_t>(pages.size()), "module rank above the slot's pages");
    TORCH_CHECK(a[s].dim() == 2 && a[s].size(1) == a_pages.size(2), "A [rank, in]");
    TORCH_CHECK(b[s].dim() == 2 && b[s].size(1) == k && b[s].size(0) == slice_offsets[s + 1] - slice_offsets[s],
                "B [out, rank]");
  }
  if (a_pages.scalar_type() == at::kFloat) pool_write_impl<float>(a_pages, b_block, pages, a, b, scales, slice_offsets);
  else pool_write_impl<c10::BFloat16>(a_pages, b_block, pages, a, b, scales, slice_offsets);
}

// The calling thread's OpenMP team size from now on (torch's own setter is process-wide: new
// threads start from it). A server's helper threads take 1, so that only the engine thread
// keeps a team of workers (server/compute_threads.py says why).
void set_thread_parallelism(int64_t n) {
  TORCH_CHECK(n >= 1, "at least one thread");
  omp_set_num_threads(static_cast<int>(n));
}

}  // namespace

// Every op runs without the GIL (its arguments are converted before, its result after): the
// server's event loop answers requests while the engine thread is inside an op, instead of
// waiting for Python's switch interval (5 ms) on every token of every stream.
using nogil = py::call_guard<py::gil_scoped_release>;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over the paged KV cache", nogil());
  m.def("lora_apply", &lora_apply, "every short segment's LoRA delta of one layer and group", nogil());
  m.def("lora_apply_long", &lora_apply_long, "long bf16 segments' LoRA delta through brgemm (AMX)", nogil());
  m.def("brgemm_bf16_available", &brgemm_bf16_available, "whether lora_apply_long runs on this CPU");
  m.def("small_linear", &small_linear, "x @ w^T (+ bias) for 1 to 4 rows of x, streaming w once", nogil());
  m.def("rms_norm", &rms_norm, "HF Llama's RMSNorm of each row of x", nogil());
  m.def("rope_", &rope_, "HF Llama's rotary embedding of x [T, heads, D], in place", nogil());
  m.def("pool_write_group", &pool_write_group, "one adapter's rows of one layer and group into a CPU pool's pages", nogil());
  m.def("set_thread_parallelism", &set_thread_parallelism, "the calling thread's OpenMP team size");
}
