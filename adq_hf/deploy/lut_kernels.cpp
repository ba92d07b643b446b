// Look-up-table kernels for adq_hf deploy mode (adq_hf/deploy/kernels.py builds and loads this file).
//
// A deployed layer holds its weight as b-bit codes in one LSB-first bit stream (docs/format.md: code i
// of the row-major flattened weight occupies stream bits [i*b, (i+1)*b)) and a float table per group:
// element (n, c) of the [N, K] weight is table[n * row_stride + (c / group_size) * 2**b + code]
// (row_stride 0: one table for the whole tensor; 2**b: one per row; groups_per_row * 2**b: groups of
// group_size consecutive columns in each row).
//
//   adq_lut_decode        codes -> float weight rows [n0, n1); exact (table entries are copied).
//   adq_lut_linear        y = x @ W^T + bias for a few rows of x without materialising W: each block
//                         of codes is unpacked into vector registers, looked up in the group's table
//                         held in registers and multiplied into the accumulators in the same loop.
//                         Equal to x @ W^T up to float reassociation.
//   adq_count_thresholds  N2UQ's deploy form, scale * (zero_point + #{t <= x}); exact.
//
// Plain C ABI (called through ctypes), no torch headers: the build takes seconds. Threads: OpenMP
// from the process's runtime (torch's libgomp), so torch.set_num_threads applies.

#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define ADQ_AVX2 1
#else
#define ADQ_AVX2 0
#endif

namespace {

struct Weight {
  const uint8_t* packed;
  int64_t nbytes;
  int bits;
  const float* table;
  int64_t row_stride;  // floats between the tables of consecutive rows (0: one shared table)
  int64_t group_size;  // columns per table within a row
  int64_t N, K;
  int levels() const { return 1 << bits; }
  const float* row_table(int64_t n) const { return table + n * row_stride; }
};

inline uint32_t scalar_code(const Weight& w, int64_t bit) {
  const int64_t byte = bit >> 3;
  uint32_t v = w.packed[byte];
  if (byte + 1 < w.nbytes) v |= static_cast<uint32_t>(w.packed[byte + 1]) << 8;
  return (v >> (bit & 7)) & ((1u << w.bits) - 1);
}

inline float scalar_weight(const Weight& w, int64_t n, int64_t c) {
  const uint32_t code = scalar_code(w, (n * w.K + c) * w.bits);
  return w.row_table(n)[(c / w.group_size) * w.levels() + code];
}

bool valid(const Weight& w) {
  return w.bits >= 1 && w.bits <= 8 && w.N >= 0 && w.K > 0 && w.group_size > 0 && w.K % w.group_size == 0 &&
         w.nbytes >= (w.N * w.K * w.bits + 7) / 8;
}

#ifdef _OPENMP
inline bool parallel_worth(int64_t work) { return omp_get_max_threads() > 1 && work >= (1 << 15); }
#endif

void decode_rows_scalar(const Weight& w, int64_t n0, int64_t n1, float* out) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t c = 0; c < w.K; ++c) out[(n - n0) * w.K + c] = scalar_weight(w, n, c);
}

#if ADQ_AVX2

// ---------------------------------------------------------------------------------------------------
// Blocks. The dot-product kernel reads a row as whole blocks of codes; each block kind unpacks its
// bytes into NV vectors of 8 weights in an order of its own (src(i): the column, within the block, of
// element i of the unpacked block), and x is permuted to that order once per call.

inline __m256 lut8(__m256 t, __m256i codes) { return _mm256_permutevar8x32_ps(t, codes); }

// Up to 8 entries (1, 2, 3 bits): one vpermps per 8 weights.
struct RegTable {
  __m256 t;
  inline void load(const float* table, int levels) {
    alignas(32) float tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    memcpy(tmp, table, sizeof(float) * levels);
    t = _mm256_load_ps(tmp);
  }
};

// 1 and 2 bits: 8 bytes; byte j holds codes j*P .. j*P+P-1 (P = 8/BITS); vector q lane j: code j*P+q.
template <int BITS>
struct ByteBlock {
  static constexpr int NV = 8 / BITS, CODES = 64 / BITS, BYTES = 8;
  using Table = RegTable;
  static int src(int i) { return (i % 8) * NV + i / 8; }
  template <class F>
  static inline void run(const uint8_t* p, const Table& t, F&& f) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
    for (int q = 0; q < NV; ++q) f(q, lut8(t.t, _mm256_and_si256(_mm256_srli_epi32(v, q * BITS), mask)));
  }
};

// 3 bits: 24 bytes = 8 groups of 8 codes, group k (3 bytes) moved into dword k; vector j lane k: code 8k+j.
struct Block3 {
  static constexpr int NV = 8, CODES = 64, BYTES = 24;
  using Table = RegTable;
  static int src(int i) { return (i % 8) * 8 + i / 8; }
  template <class F>
  static inline void run(const uint8_t* p, const Table& t, F&& f) {
    const __m256i ctrl = _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1,
                                          0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1);
    const __m256i d = _mm256_shuffle_epi8(
        _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(p + 12), reinterpret_cast<const __m128i*>(p)), ctrl);
    const __m256i mask = _mm256_set1_epi32(7);
    for (int j = 0; j < NV; ++j) f(j, lut8(t.t, _mm256_and_si256(_mm256_srli_epi32(d, 3 * j), mask)));
  }
  static constexpr int READ = 28;  // bytes the loads touch
};

// 4 bits: the 16-entry table as 4 byte planes (byte p of every entry), each a vpshufb table; 16 bytes
// = 32 codes (low nibbles: even columns, high: odd) give 4 vectors after 4 shuffles and 8 unpacks.
struct PlaneTable {
  __m256i plane[4];
  inline void load(const float* table, int) {
    const __m128i ctrl = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    __m128 a[4];
    for (int i = 0; i < 4; ++i)
      a[i] = _mm_castsi128_ps(_mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(table + 4 * i)), ctrl));
    _MM_TRANSPOSE4_PS(a[0], a[1], a[2], a[3]);
    for (int i = 0; i < 4; ++i) plane[i] = _mm256_broadcastsi128_si256(_mm_castps_si128(a[i]));
  }
};

struct Block4 {
  static constexpr int NV = 4, CODES = 32, BYTES = 16;
  using Table = PlaneTable;
  static int src(int i) {
    const int q = i / 8, j = i % 8;
    return j < 4 ? 8 * q + 2 * j : 8 * q + 2 * (j - 4) + 1;
  }
  template <class F>
  static inline void run(const uint8_t* p, const Table& t, F&& f) {
    const __m128i m = _mm_set1_epi8(15), v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m256i idx = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
    const __m256i b0 = _mm256_shuffle_epi8(t.plane[0], idx), b1 = _mm256_shuffle_epi8(t.plane[1], idx);
    const __m256i b2 = _mm256_shuffle_epi8(t.plane[2], idx), b3 = _mm256_shuffle_epi8(t.plane[3], idx);
    const __m256i l01 = _mm256_unpacklo_epi8(b0, b1), h01 = _mm256_unpackhi_epi8(b0, b1);
    const __m256i l23 = _mm256_unpacklo_epi8(b2, b3), h23 = _mm256_unpackhi_epi8(b2, b3);
    f(0, _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23)));
    f(1, _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23)));
    f(2, _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23)));
    f(3, _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23)));
  }
};

// 32 entries and more (5-8 bits): a gather from the table in L1.
struct GatherTable {
  const float* base;
  inline void load(const float* table, int) { base = table; }
};

// The 8 codes that start at a byte, in order: the bytes holding each code (pshufb), shifted (any width).
struct StreamConsts {
  int8_t ctrl[16];
  int32_t shift[8];
};

constexpr StreamConsts stream_consts(int bits) {
  StreamConsts s{};
  for (int j = 0; j < 8; ++j) {
    const int first = (j * bits) / 8, sh = (j * bits) % 8;
    s.ctrl[2 * j] = static_cast<int8_t>(first);
    s.ctrl[2 * j + 1] = static_cast<int8_t>(sh + bits > 8 ? first + 1 : -1);  // -1 (0x80): a zero byte
    s.shift[j] = sh;
  }
  return s;
}

struct StreamUnpack {
  __m128i ctrl;
  __m256i shift, mask;
  explicit StreamUnpack(int bits) {
    const StreamConsts s = stream_consts(bits);
    ctrl = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s.ctrl));
    shift = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.shift));
    mask = _mm256_set1_epi32((1 << bits) - 1);
  }
  inline __m256i operator()(__m128i bytes) const {
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu16_epi32(_mm_shuffle_epi8(bytes, ctrl)), shift), mask);
  }
};

// 5, 6, 7 bits (BITS bytes per 8 codes, in order) and 8 bits (one byte per code).
template <int BITS>
struct GatherBlock {
  static constexpr int NV = 1, CODES = 8, BYTES = BITS;
  using Table = GatherTable;
  static int src(int i) { return i; }
  template <class F>
  static inline void run(const uint8_t* p, const Table& t, F&& f) {
    __m256i codes;
    if constexpr (BITS == 8) {
      codes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    } else {
      static constexpr StreamConsts s = stream_consts(BITS);
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
      const __m256i v = _mm256_cvtepu16_epi32(_mm_shuffle_epi8(bytes, _mm_loadu_si128(reinterpret_cast<const __m128i*>(s.ctrl))));
      codes = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.shift))),
                               _mm256_set1_epi32((1 << BITS) - 1));
    }
    f(0, _mm256_i32gather_ps(t.base, codes, 4));
  }
  static constexpr int READ = 8;
};

template <class B, class = void>
struct ReadBytes { static constexpr int value = B::BYTES; };
template <class B>
struct ReadBytes<B, decltype(void(B::READ))> { static constexpr int value = B::READ; };

// Runs block kind B on the block at `byte`, from a zero-padded copy when its loads would pass the end.
template <class B, class F>
inline void run_block(const Weight& w, int64_t byte, const typename B::Table& t, F&& f) {
  constexpr int read = ReadBytes<B>::value;
  if (byte + read <= w.nbytes) return B::run(w.packed + byte, t, f);
  alignas(32) uint8_t tmp[32] = {0};
  memcpy(tmp, w.packed + byte, static_cast<size_t>(std::min<int64_t>(B::BYTES, w.nbytes - byte)));
  B::run(tmp, t, f);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One weight row against MB rows of x: out[m] = sum_c W[n, c] x[m, c]. xp: x rows in block order, x:
// natural order (the scalar tail). Accumulators: NA per x row, taken in turn with compile-time indices.
template <class B, int MB>
void dot_row(const Weight& w, int64_t n, const float* const* xp, const float* const* x, float* out) {
  constexpr int NA = MB == 1 ? 4 : 2;
  constexpr int U = B::NV >= NA ? 1 : NA / B::NV;  // blocks per iteration
  constexpr int64_t CODES = B::CODES;
  const int64_t K = w.K, gs = std::min(w.group_size, K), bytes_per_row = K * w.bits / 8;
  const int levels = w.levels();
  const uint8_t* row = w.packed + n * bytes_per_row;
  const float* table = w.row_table(n);
  __m256 acc[MB][NA];
  for (int m = 0; m < MB; ++m)
    for (int a = 0; a < NA; ++a) acc[m][a] = _mm256_setzero_ps();
  typename B::Table lut;
  for (int64_t g0 = 0; g0 < K; g0 += gs) {
    lut.load(table + (g0 / gs) * levels, levels);
    const int64_t end = g0 + (gs / CODES) * CODES;
    int64_t c = g0;
    for (; c + U * CODES <= end; c += U * CODES) {
      for (int u = 0; u < U; ++u) {
        const int64_t cu = c + u * CODES;
        run_block<B>(w, (row - w.packed) + cu * w.bits / 8, lut, [&](int q, __m256 wv) {
          for (int m = 0; m < MB; ++m) {
            __m256& a = acc[m][(u * B::NV + q) % NA];
            a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp[m] + cu + 8 * q), a);
          }
        });
      }
    }
    for (; c < end; c += CODES) {
      run_block<B>(w, (row - w.packed) + c * w.bits / 8, lut, [&](int q, __m256 wv) {
        for (int m = 0; m < MB; ++m) acc[m][q % NA] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp[m] + c + 8 * q), acc[m][q % NA]);
      });
    }
  }
  float tail[MB] = {0};
  for (int64_t c = (K / CODES) * CODES; gs == K && c < K; ++c) {  // row tail (one table per row only)
    const float wv = table[scalar_code(w, (n * K + c) * w.bits)];
    for (int m = 0; m < MB; ++m) tail[m] += wv * x[m][c];
  }
  for (int m = 0; m < MB; ++m) {
    __m256 s = acc[m][0];
    for (int a = 1; a < NA; ++a) s = _mm256_add_ps(s, acc[m][a]);
    out[m] = hsum(s) + tail[m];
  }
}

using DotRow = void (*)(const Weight&, int64_t, const float* const*, const float* const*, float*);
using Src = int (*)(int);

struct Kernel {
  DotRow dot[4];  // MB = 1..4
  Src src;
  int64_t codes;  // per block
};

template <class B>
Kernel make_kernel() {
  return {{dot_row<B, 1>, dot_row<B, 2>, dot_row<B, 3>, dot_row<B, 4>}, B::src, B::CODES};
}

Kernel kernel_for(int bits) {
  switch (bits) {
    case 1: return make_kernel<ByteBlock<1>>();
    case 2: return make_kernel<ByteBlock<2>>();
    case 3: return make_kernel<Block3>();
    case 4: return make_kernel<Block4>();
    case 5: return make_kernel<GatherBlock<5>>();
    case 6: return make_kernel<GatherBlock<6>>();
    case 7: return make_kernel<GatherBlock<7>>();
    default: return make_kernel<GatherBlock<8>>();
  }
}

// The vector kernel needs rows that start on a byte and groups made of whole blocks (or one group per
// row: a scalar tail after the last whole block).
bool vector_ok(const Weight& w, int64_t codes) {
  return (w.K * w.bits) % 8 == 0 && (w.group_size == w.K || w.group_size % codes == 0);
}

// x row in the kernel's block order; the tail after the last whole block stays in natural order.
void permute_row(const float* x, float* xp, int64_t K, const Kernel& k) {
  const int64_t full = (K / k.codes) * k.codes;
  std::vector<int> src(static_cast<size_t>(k.codes));
  for (int i = 0; i < k.codes; ++i) src[i] = k.src(i);
  for (int64_t b = 0; b < full; b += k.codes)
    for (int i = 0; i < k.codes; ++i) xp[b + i] = x[b + src[i]];
  memcpy(xp + full, x + full, sizeof(float) * (K - full));
}

// Decoding (exact, natural order): 8 codes at a time through the stream unpacker.
void decode_rows_vector(const Weight& w, int64_t n0, int64_t n1, float* out) {
  const int levels = w.levels();
  const int64_t gs = std::min(w.group_size, w.K), K = w.K;
  const StreamUnpack unpack(w.bits);
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t row_bit = n * K * w.bits;
    const float* table = w.row_table(n);
    float* o = out + (n - n0) * K;
    for (int64_t g0 = 0; g0 < K; g0 += gs) {
      const float* t = table + (g0 / gs) * levels;
      RegTable reg;
      if (levels <= 8) reg.load(t, levels);
      for (int64_t c = g0, end = g0 + (gs / 8) * 8; c < end; c += 8) {
        const int64_t byte = (row_bit + c * w.bits) >> 3;
        __m128i bytes;
        if (byte + 8 <= w.nbytes) {
          bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.packed + byte));
        } else {
          alignas(16) uint8_t tmp[16] = {0};
          memcpy(tmp, w.packed + byte, static_cast<size_t>(w.nbytes - byte));
          bytes = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
        }
        const __m256i codes = unpack(bytes);
        __m256 v;
        if (levels <= 8) {
          v = lut8(reg.t, codes);
        } else if (levels == 16) {  // two halves of the table, chosen by bit 3
          const __m256 lo = lut8(_mm256_loadu_ps(t), codes), hi = lut8(_mm256_loadu_ps(t + 8), codes);
          v = _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));
        } else {
          v = _mm256_i32gather_ps(t, codes, 4);
        }
        _mm256_storeu_ps(o + c, v);
      }
    }
    for (int64_t c = (K / 8) * 8; gs == K && c < K; ++c) o[c] = table[scalar_code(w, row_bit + c * w.bits)];
  }
}

#endif  // ADQ_AVX2

}  // namespace

extern "C" {

// 1 when the vector (AVX2) kernels were compiled in.
int adq_lut_simd(void) { return ADQ_AVX2; }

// 1 when adq_lut_linear runs its vector kernel for this width, row length and group size (otherwise a
// scalar loop: correct, slower).
int adq_lut_linear_vectorized(int bits, int64_t K, int64_t group_size) {
#if ADQ_AVX2
  if (bits < 1 || bits > 8 || K <= 0 || group_size <= 0) return 0;
  const Weight w{nullptr, 0, bits, nullptr, 0, group_size, 1, K};
  return vector_ok(w, kernel_for(bits).codes) ? 1 : 0;
#else
  (void)bits, (void)K, (void)group_size;
  return 0;
#endif
}

// Rows [n0, n1) of the float weight into out ([n1 - n0, K], row-major). 0 on success.
int adq_lut_decode(const uint8_t* packed, int64_t nbytes, int bits, const float* table, int64_t row_stride,
                   int64_t group_size, int64_t N, int64_t K, int64_t n0, int64_t n1, float* out) {
  const Weight w{packed, nbytes, bits, table, row_stride, group_size, N, K};
  if (!valid(w) || n0 < 0 || n1 > N || n0 > n1) return 1;
  const int64_t rows = n1 - n0, chunk = std::max<int64_t>(1, 8192 / K);
  // blocks of 8 codes start on a byte when rows do; each must lie in one group
  const bool vector = ADQ_AVX2 && (K * bits) % 8 == 0 && (group_size == K || group_size % 8 == 0);
#pragma omp parallel for schedule(static) if (parallel_worth(rows * K))
  for (int64_t r = n0; r < n1; r += chunk) {
    const int64_t r1 = std::min(n1, r + chunk);
#if ADQ_AVX2
    if (vector) {
      decode_rows_vector(w, r, r1, out + (r - n0) * K);
      continue;
    }
#endif
    decode_rows_scalar(w, r, r1, out + (r - n0) * K);
  }
  (void)vector;
  return 0;
}

// y [M, N] = x [M, K] @ W^T (+ bias [N]), x and y row-major and contiguous. 0 on success.
int adq_lut_linear(const float* x, int64_t M, const uint8_t* packed, int64_t nbytes, int bits, const float* table,
                   int64_t row_stride, int64_t group_size, int64_t N, int64_t K, const float* bias, float* y) {
  const Weight w{packed, nbytes, bits, table, row_stride, group_size, N, K};
  if (!valid(w) || M < 0) return 1;
#if ADQ_AVX2
  const Kernel kernel = kernel_for(bits);
  if (vector_ok(w, kernel.codes)) {
    std::vector<float> xp(static_cast<size_t>(M * K));
    for (int64_t m = 0; m < M; ++m) permute_row(x + m * K, xp.data() + m * K, K, kernel);
    constexpr int MBMAX = 4;
    for (int64_t m0 = 0; m0 < M; m0 += MBMAX) {
      const int mb = static_cast<int>(std::min<int64_t>(MBMAX, M - m0));
      const float* xps[MBMAX];
      const float* xs[MBMAX];
      for (int m = 0; m < mb; ++m) {
        xps[m] = xp.data() + (m0 + m) * K;
        xs[m] = x + (m0 + m) * K;
      }
      const DotRow dot = kernel.dot[mb - 1];
#pragma omp parallel for schedule(static) if (parallel_worth(N * K * mb))
      for (int64_t n = 0; n < N; ++n) {
        float out[MBMAX];
        dot(w, n, xps, xs, out);
        for (int m = 0; m < mb; ++m) y[(m0 + m) * N + n] = out[m] + (bias ? bias[n] : 0.0f);
      }
    }
    return 0;
  }
#endif
#pragma omp parallel for schedule(static) if (parallel_worth(N * K * M))
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t m = 0; m < M; ++m) {
      float s = 0.0f;
      for (int64_t c = 0; c < K; ++c) s += scalar_weight(w, n, c) * x[m * K + c];
      y[m * N + n] = s + (bias ? bias[n] : 0.0f);
    }
  }
  return 0;
}

// out[i] = *scale * (count_i + zero_point), count_i = #{j : thresholds[j] <= x[i]} (thresholds sorted):
// the same float operations as the PyTorch form (an exact integer count, one add, one multiply), so the
// same bits. Up to 15 thresholds they are compared one by one (NaN counts none, as there); beyond, a
// binary search (NaN counts all, as torch.searchsorted).
int adq_count_thresholds(const float* x, int64_t n, const float* thresholds, int T, float zero_point,
                         const float* scale_ptr, float* out) {
  constexpr int64_t CHUNK = 4096;
  const float scale = *scale_ptr;
#pragma omp parallel for schedule(static) if (parallel_worth(n * T))
  for (int64_t i0 = 0; i0 < n; i0 += CHUNK) {
    const int64_t i1 = std::min(n, i0 + CHUNK);
    int64_t i = i0;
#if ADQ_AVX2
    if (T <= 15) {  // 8 inputs at a time: the count as a float, 1.0 per threshold passed (exact)
      const __m256 one = _mm256_set1_ps(1.0f), zp = _mm256_set1_ps(zero_point), sc = _mm256_set1_ps(scale);
      for (; i + 8 <= i1; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        __m256 count = _mm256_setzero_ps();
        for (int j = 0; j < T; ++j)  // ordered >=: NaN passes none
          count = _mm256_add_ps(count, _mm256_and_ps(_mm256_cmp_ps(v, _mm256_set1_ps(thresholds[j]), _CMP_GE_OQ), one));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(sc, _mm256_add_ps(count, zp)));
      }
    }
#endif
    for (; i < i1; ++i) {
      int count = 0;
      if (T <= 15) {
        for (int j = 0; j < T; ++j) count += thresholds[j] <= x[i];
      } else {
        count = static_cast<int>(std::upper_bound(thresholds, thresholds + T, x[i]) - thresholds);
      }
      out[i] = scale * (static_cast<float>(count) + zero_point);
    }
  }
  return 0;
}

}  // extern "C"
