/* CPU kernels: weight-stationary matrix-vector products over the GGUF block formats the built-in
 * models ship in (decode steps), and attention over a preallocated KV cache: one pass for a few
 * query rows per key/value head (decode steps), flash-style key blocks for many (prefills).
 *
 * Built at first use by attention_store/kernels/__init__.py (cc -O3 -march=native -fopenmp) and
 * called through ctypes; every pointer is the data of a contiguous (or explicitly strided) fp32
 * tensor. No Python or torch headers: the library is plain C.
 *
 * Exactness. A packed row holds exactly the fp32 weights the model holds: a Q4_1 weight is
 * d * q + m (d, m fp16 widened to fp32, q in 0..15), a Q8_0 weight d * q (q in -128..127). d * q is
 * exact in fp32 (11 + 8 significant bits), so d * q + m rounds once whichever instruction computes
 * it, and the value equals what gguf-py's dequantization (and so the converted model) holds; the
 * loader checks that equality for every row before it uses a packed matrix. What differs from
 * torch's matmul is only the order in which the products are summed (as between any two BLAS).
 * The same row gives bitwise the same result for 1 or many input rows and any thread count.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PML_AVX2 1
#endif

#define QK 32 /* weights per block, both formats */
/* Loops over register tiles: unrolled before GCC splits the accumulator arrays into registers
 * (otherwise it keeps a copy of them in memory, stored every iteration). */
#define UNROLL _Pragma("GCC unroll 16")
#define MR 8 /* input rows a weight row is expanded once for (8: a packed batch of 8 in one pass) */

typedef struct { float d, m; uint8_t qs[16]; } q4_1_block;  /* qs[j]: weight j low nibble, j+16 high */
typedef struct { float d; int8_t qs[32]; } q8_0_block;

int pml_kernels_abi(void) { return 4; } /* bumped when a signature changes; the loader checks it */
int pml_q4_1_block_bytes(void) { return (int)sizeof(q4_1_block); }
int pml_q8_0_block_bytes(void) { return (int)sizeof(q8_0_block); }
/* 0: plain C; 1: AVX2 + FMA; 2: also the AVX-512F/VL paths (multi-row matvec, wider tiles). */
int pml_kernels_simd(void) {
#if defined(PML_AVX2) && defined(__AVX512F__) && defined(__AVX512VL__)
  return 2;
#elif defined(PML_AVX2)
  return 1;
#else
  return 0;
#endif
}

/* ---- one block -> 32 weights ----------------------------------------------------------------- */

static inline void q4_1_values(const q4_1_block *b, float *w) {
  for (int j = 0; j < 16; ++j) {
    w[j] = b->d * (float)(b->qs[j] & 0x0F) + b->m;
    w[j + 16] = b->d * (float)(b->qs[j] >> 4) + b->m;
  }
}

static inline void q8_0_values(const q8_0_block *b, float *w) {
  for (int j = 0; j < QK; ++j) w[j] = b->d * (float)b->qs[j];
}

/* ---- dot products in one fixed order: lane l of accumulator a sums elements 32*i + 8*a + l ----- */

#ifdef PML_AVX2
static inline float hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  __m256 s = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

/* The 16 bytes of a Q4_1 block split into its quants: lo[j] = weight j, hi[j] = weight j + 16. */
static inline void q4_1_nibbles(const q4_1_block *b, __m128i *lo, __m128i *hi) {
  const __m128i raw = _mm_loadu_si128((const __m128i *)b->qs);
  const __m128i mask = _mm_set1_epi8(0x0F);
  *lo = _mm_and_si128(raw, mask), *hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
}

/* 32 weights of a Q4_1 block as four vectors of 8 (weights 0-7, 8-15, 16-23, 24-31). */
static inline void q4_1_vectors(const q4_1_block *b, __m256 *w) {
  __m128i lo, hi;
  q4_1_nibbles(b, &lo, &hi);
  const __m256 d = _mm256_set1_ps(b->d), m = _mm256_set1_ps(b->m);
  w[0] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), m);
  w[1] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), m);
  w[2] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), m);
  w[3] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), m);
}

static inline void q8_0_vectors(const q8_0_block *b, __m256 *w) {
  const __m256 d = _mm256_set1_ps(b->d);
  for (int a = 0; a < 4; ++a) {
    const __m128i raw = _mm_loadl_epi64((const __m128i *)(b->qs + 8 * a));
    w[a] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)));
  }
}

/* One weight row against up to MR input rows (x + r * n_in, r < MR; a missing row repeats the last):
 * each block is expanded once in registers and used for every row. Row r's sum runs in the same
 * order whatever the number of rows. */
#define DOT_ROWS(VECTORS, BLOCK_T)                                                                  \
  static inline void dotm_##BLOCK_T(const BLOCK_T *row, const float *x, int64_t n_in, int64_t nb,  \
                                    int rows, float *y, int64_t y_stride) {                         \
    const float *xr[MR];                                                                            \
    for (int r = 0; r < MR; ++r) xr[r] = x + (r < rows ? r : rows - 1) * n_in;                      \
    __m256 a[MR][4], w[4];                                                                          \
    for (int r = 0; r < MR; ++r)                                                                    \
      for (int j = 0; j < 4; ++j) a[r][j] = _mm256_setzero_ps();                                    \
    for (int64_t i = 0; i < nb; ++i) {                                                              \
      VECTORS(row + i, w);                                                                          \
      for (int r = 0; r < MR; ++r)                                                                  \
        for (int j = 0; j < 4; ++j)                                                                 \
          a[r][j] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(xr[r] + QK * i + 8 * j), a[r][j]);        \
    }                                                                                               \
    for (int r = 0; r < MR; ++r) /* the constant bound keeps `a` in registers */                    \
      if (r < rows) y[r * y_stride] = hsum4(a[r][0], a[r][1], a[r][2], a[r][3]);                    \
  }                                                                                                 \
  static inline float dot_##BLOCK_T(const BLOCK_T *row, const float *x, int64_t nb) {              \
    __m256 a[4], w[4];                                                                              \
    for (int j = 0; j < 4; ++j) a[j] = _mm256_setzero_ps();                                         \
    for (int64_t i = 0; i < nb; ++i, x += QK) {                                                     \
      VECTORS(row + i, w);                                                                          \
      for (int j = 0; j < 4; ++j) a[j] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(x + 8 * j), a[j]);   \
    }                                                                                               \
    return hsum4(a[0], a[1], a[2], a[3]);                                                           \
  }
DOT_ROWS(q4_1_vectors, q4_1_block)
DOT_ROWS(q8_0_vectors, q8_0_block)

#ifdef __AVX512F__
/* Several input rows with 16-lane vectors: lanes 0-7 and 8-15 of w[0] are the 8-lane form's w[0]
 * and w[1], of w[1] its w[2] and w[3], and FMAs act per lane, so every row's sums are bitwise
 * those of `dot_` (and of one row alone); half the instructions, and 8 rows' accumulators fit
 * the 32 registers (the 8-lane form needs 32 for them alone). */
static inline void q4_1_vectors16(const q4_1_block *b, __m512 *w) {
  __m128i lo, hi;
  q4_1_nibbles(b, &lo, &hi);
  const __m512 d = _mm512_set1_ps(b->d), m = _mm512_set1_ps(b->m);
  w[0] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), m);
  w[1] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), m);
}

/* The same 32 weights by lookup: a Q4_1 block's 16 possible weights d * q + m (q = 0..15) are one
 * vector, computed with the same fma as one weight at a time, so permuting it by the quants gives
 * bitwise the weights above with half the floating-point work (no conversions, one fma a block).
 * permutexvar reads the low 4 bits of each 32-bit index: byte j zero-extended is weight j,
 * shifted right by 4 weight j + 16. Used for 1 and 4 input rows, whose products wait on the
 * expansion: `scripts/probes/lanes_kernels.py --baseline 30963ff`, 30 products of 1 row at one
 * thread, down projection 2.3 -> 2.0 ms, gate 2.2 -> 2.0, q 1.0 -> 0.9 (the calls' own overhead
 * included). The 8-row tile is bound by its FMAs and ran slower with the permutes' shuffles (gate
 * 6.0 -> 6.3 ms), so it keeps the conversions. */
static inline void q4_1_vectors16_lookup(const q4_1_block *b, __m512 *w) {
  const __m512 q = _mm512_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f, 8.f, 9.f, 10.f, 11.f, 12.f, 13.f, 14.f, 15.f);
  const __m512 table = _mm512_fmadd_ps(_mm512_set1_ps(b->d), q, _mm512_set1_ps(b->m));
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)b->qs));
  w[0] = _mm512_permutexvar_ps(bytes, table);
  w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
}

static inline void q8_0_vectors16(const q8_0_block *b, __m512 *w) {
  const __m512 d = _mm512_set1_ps(b->d);
  w[0] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)b->qs))));
  w[1] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b->qs + 16)))));
}

static inline __m256 high256(__m512 a) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)); }

#define DOT_ROWS16(VECTORS, BLOCK_T, R)                                                             \
  static inline void dotm##R##_##BLOCK_T(const BLOCK_T *row, const float *x, int64_t n_in, int64_t nb, \
                                         int rows, float *y, int64_t y_stride, float *part, int first, \
                                         int last) {                                                \
    const float *xr[R];                                                                             \
    UNROLL for (int r = 0; r < R; ++r) xr[r] = x + (r < rows ? r : rows - 1) * n_in;                \
    __m512 a[R][2], w[2];                                                                           \
    UNROLL for (int r = 0; r < R; ++r) { /* from zero, or where the previous blocks left the sums */ \
      a[r][0] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(part + QK * r);                       \
      a[r][1] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(part + QK * r + 16);                  \
    }                                                                                               \
    for (int64_t i = 0; i < nb; ++i) {                                                              \
      VECTORS(row + i, w);                                                                          \
      UNROLL for (int r = 0; r < R; ++r) {                                                          \
        a[r][0] = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(xr[r] + QK * i), a[r][0]);                  \
        a[r][1] = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(xr[r] + QK * i + 16), a[r][1]);             \
      }                                                                                             \
    }                                                                                               \
    UNROLL for (int r = 0; r < R; ++r)                                                              \
      if (!last) {                                                                                  \
        _mm512_storeu_ps(part + QK * r, a[r][0]);                                                   \
        _mm512_storeu_ps(part + QK * r + 16, a[r][1]);                                              \
      } else if (r < rows) {                                                                        \
        y[r * y_stride] = hsum4(_mm512_castps512_ps256(a[r][0]), high256(a[r][0]),                  \
                                _mm512_castps512_ps256(a[r][1]), high256(a[r][1]));                 \
      }                                                                                             \
  }
DOT_ROWS16(q4_1_vectors16_lookup, q4_1_block, 4)
DOT_ROWS16(q4_1_vectors16, q4_1_block, 8)
DOT_ROWS16(q8_0_vectors16, q8_0_block, 4)
DOT_ROWS16(q8_0_vectors16, q8_0_block, 8)

/* One input row with the 16-lane vectors: bitwise `dot_` (lanes as above). */
#define DOT16(VECTORS, BLOCK_T)                                                                     \
  static inline float dot16_##BLOCK_T(const BLOCK_T *row, const float *x, int64_t nb) {            \
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), w[2];                                \
    for (int64_t i = 0; i < nb; ++i, x += QK) {                                                     \
      VECTORS(row + i, w);                                                                          \
      a0 = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(x), a0);                                          \
      a1 = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(x + 16), a1);                                      \
    }                                                                                               \
    return hsum4(_mm512_castps512_ps256(a0), high256(a0), _mm512_castps512_ps256(a1), high256(a1)); \
  }
DOT16(q4_1_vectors16_lookup, q4_1_block)
DOT16(q8_0_vectors16, q8_0_block)
#endif

#else /* plain C: the same summation order (32 lanes, then the same tree) */
static inline float reduce32(const float *acc) {
  float s[8], h[4];
  for (int l = 0; l < 8; ++l) s[l] = (acc[l] + acc[l + 8]) + (acc[l + 16] + acc[l + 24]);
  for (int l = 0; l < 4; ++l) h[l] = s[l] + s[l + 4];
  return (h[0] + h[2]) + (h[1] + h[3]);
}
#define DOT_ROWS(VALUES, BLOCK_T)                                                                   \
  static inline float dot_##BLOCK_T(const BLOCK_T *row, const float *x, int64_t nb) {              \
    float acc[QK] = {0}, w[QK];                                                                     \
    for (int64_t i = 0; i < nb; ++i, x += QK) {                                                     \
      VALUES(row + i, w);                                                                           \
      for (int l = 0; l < QK; ++l) acc[l] = fmaf(w[l], x[l], acc[l]);                               \
    }                                                                                               \
    return reduce32(acc);                                                                           \
  }                                                                                                 \
  static inline void dotm_##BLOCK_T(const BLOCK_T *row, const float *x, int64_t n_in, int64_t nb,  \
                                    int rows, float *y, int64_t y_stride) {                         \
    for (int r = 0; r < rows; ++r) y[r * y_stride] = dot_##BLOCK_T(row, x + r * n_in, nb);          \
  }
DOT_ROWS(q4_1_values, q4_1_block)
DOT_ROWS(q8_0_values, q8_0_block)
#endif

/* rows (<= MR) input rows through one weight row: with AVX-512F a tile of 4 when that is enough
 * (2-4 rows: speculative checks), else 8; otherwise the 8-lane (or plain C) `dotm_`. */
#if defined(PML_AVX2) && defined(__AVX512F__)
#define MV_CHUNKS 1 /* the 16-lane tiles can continue a sum across passes (see MATVEC) */
#define DOT1(BLOCK_T) dot16_##BLOCK_T /* one input row */
#define ROWS_OF(BLOCK_T)                                                                            \
  static inline void rows_##BLOCK_T(const BLOCK_T *row, const float *x, int64_t n_in, int64_t nb,  \
                                    int rows, float *y, int64_t y_stride, float *part, int first,   \
                                    int last) {                                                     \
    (rows <= 4 ? dotm4_##BLOCK_T : dotm8_##BLOCK_T)(row, x, n_in, nb, rows, y, y_stride, part, first, last); \
  }
#else
#define MV_CHUNKS 0
#define DOT1(BLOCK_T) dot_##BLOCK_T
#define ROWS_OF(BLOCK_T)                                                                            \
  static inline void rows_##BLOCK_T(const BLOCK_T *row, const float *x, int64_t n_in, int64_t nb,  \
                                    int rows, float *y, int64_t y_stride, float *part, int first,   \
                                    int last) {                                                     \
    (void)part, (void)first, (void)last;                                                            \
    dotm_##BLOCK_T(row, x, n_in, nb, rows, y, y_stride);                                            \
  }
#endif
ROWS_OF(q4_1_block)
ROWS_OF(q8_0_block)

/* ---- y[r, n] = sum_k W[n, k] x[r, k] (+ bias[n]) --------------------------------------------- */
/* W: n_out rows of n_in / 32 blocks. x: rows x n_in, y: rows x n_out, both contiguous. Each
 * weight row is read (and expanded) once for every MR input rows. */

#ifndef MV_X_BYTES /* these -D overrides: scripts/probes/lanes_kernels.py */
#define MV_X_BYTES (24 << 10)
#endif
#define MV_GROUP 8
/* Input rows of MR x n_in floats past MV_X_BYTES (a down projection's 8 x 1,536: 48 KB) no longer
 * stay in L1 (32 KB here) while every weight row reads them, so the blocks are taken in chunks that
 * fit, for MV_GROUP weight rows at a time, each row's sums kept between chunks as the fp32 vectors
 * they are (bitwise the one-pass sums), and the next group's weights prefetched (the chunks'
 * strided reads leave the hardware prefetcher behind: without it a scratch build kept little of
 * the gain). The down projection of a batch step, 30 layers: 9.5 -> 7.3 ms at one thread
 * (`scripts/probes/lanes_kernels.py`, `now, one matvec pass` against `now`). */
static int64_t matvec_chunk_blocks(int64_t nb, int64_t rows) {
  const int64_t bytes = (rows < MR ? rows : MR) * nb * QK * (int64_t)sizeof(float);
  if (!MV_CHUNKS || rows == 1 || bytes <= MV_X_BYTES) return nb;
  const int64_t chunks = (bytes + MV_X_BYTES - 1) / MV_X_BYTES;
  return (nb + chunks - 1) / chunks;
}

#define MATVEC(NAME, BLOCK_T)                                                                       \
  void NAME(const BLOCK_T *w, const float *x, const float *bias, float *y, int64_t n_out,          \
            int64_t n_in, int64_t rows, int threads) {                                              \
    const int64_t nb = n_in / QK, kc = matvec_chunk_blocks(nb, rows), group = kc < nb ? MV_GROUP : 1; \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if (threads > 1)")             \
    for (int64_t n0 = 0; n0 < n_out; n0 += group) {                                                 \
      const int64_t n1 = n0 + group < n_out ? n0 + group : n_out;                                   \
      float part[MV_GROUP * MR * QK]; /* each weight row's sums between chunks */                   \
      if (kc < nb && n1 < n_out) { /* chunks leave the streaming prefetcher behind: ask for the next group */ \
        const char *next = (const char *)(w + n1 * nb);                                             \
        const char *end = (const char *)(w + (n1 + group < n_out ? n1 + group : n_out) * nb);         \
        for (; next < end; next += 64) __builtin_prefetch(next, 0, 2);                              \
      }                                                                                             \
      if (rows == 1) {                                                                              \
        for (int64_t n = n0; n < n1; ++n) y[n] = DOT1(BLOCK_T)(w + n * nb, x, nb);                  \
      } else {                                                                                      \
        for (int64_t r0 = 0; r0 < rows; r0 += MR) {                                                 \
          const int rn = rows - r0 < MR ? (int)(rows - r0) : MR;                                    \
          if (kc == nb) /* one pass (constant flags: the tile keeps its one-pass code) */           \
            for (int64_t n = n0; n < n1; ++n)                                                       \
              rows_##BLOCK_T(w + n * nb, x + r0 * n_in, n_in, nb, rn, y + r0 * n_out + n, n_out, NULL, 1, 1); \
          else                                                                                      \
            for (int64_t c0 = 0; c0 < nb; c0 += kc)                                                 \
              for (int64_t n = n0; n < n1; ++n)                                                     \
                rows_##BLOCK_T(w + n * nb + c0, x + r0 * n_in + c0 * QK, n_in, nb - c0 < kc ? nb - c0 : kc, \
                               rn, y + r0 * n_out + n, n_out, part + (n - n0) * MR * QK, c0 == 0, c0 + kc >= nb); \
        }                                                                                           \
      }                                                                                             \
      if (bias)                                                                                     \
        for (int64_t n = n0; n < n1; ++n)                                                           \
          for (int64_t r = 0; r < rows; ++r) y[r * n_out + n] += bias[n];                           \
    }                                                                                               \
  }
MATVEC(pml_q4_1_matvec, q4_1_block)
MATVEC(pml_q8_0_matvec, q8_0_block)

/* Expand a packed matrix into fp32 (the loader's exactness check, and tests). */
void pml_q4_1_dequantize(const q4_1_block *w, float *out, int64_t blocks) {
  for (int64_t i = 0; i < blocks; ++i) q4_1_values(w + i, out + QK * i);
}
void pml_q8_0_dequantize(const q8_0_block *w, float *out, int64_t blocks) {
  for (int64_t i = 0; i < blocks; ++i) q8_0_values(w + i, out + QK * i);
}

/* ---- single-query attention ------------------------------------------------------------------ */
/* For every (batch b, key/value head h): G query rows (the query heads of the group) attend to the
 * head's T cached keys. q, out: [B, KV, G, D] contiguous. k, v: element (b, h, t, d) at
 * b*s_b + h*s_h + t*s_t + d. mask (optional, additive): element (b, h, g, t) at
 * b*m_b + h*m_h + (g % m_period)*m_g + t (a stride 0 broadcasts; m_period < G repeats the rows of
 * one query head's mask over the group's heads without copying it). One pass over K (scores), a
 * softmax, one pass over V. */

#ifdef PML_AVX2
static inline __m256 exp256(__m256 x) { /* e^x, |rel error| < 2e-7 for x in [-87.3, 0] */
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-87.3365447504f);
  const __m256 below = _mm256_cmp_ps(x, lo, _CMP_GE_OQ); /* e^x for x below the range (a masked key): 0 */
  x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), below);
}
#endif

#ifdef PML_AVX2
/* The 8 sums of the lanes of acc[0..7], as one vector. */
static inline __m256 sum8(const __m256 *acc) {
  const __m256 h01 = _mm256_hadd_ps(acc[0], acc[1]), h23 = _mm256_hadd_ps(acc[2], acc[3]);
  const __m256 h45 = _mm256_hadd_ps(acc[4], acc[5]), h67 = _mm256_hadd_ps(acc[6], acc[7]);
  const __m256 h03 = _mm256_hadd_ps(h01, h23), h47 = _mm256_hadd_ps(h45, h67);
  return _mm256_add_ps(_mm256_permute2f128_ps(h03, h47, 0x20), _mm256_permute2f128_ps(h03, h47, 0x31));
}

/* Query rows per score tile: QK_ROWS x 8 accumulators stay in registers (AVX-512VL has 32). */
#ifdef __AVX512VL__
#define QK_ROWS 3
#else
#define QK_ROWS 1
#endif

/* s[g, t0 .. t0 + 8) = q_g . k_t * scale for rows g0 .. g0 + gn (gn <= QK_ROWS): each key vector
 * loaded once for the tile's rows. Rows past gn repeat the last one and are not stored. */
static inline void qk_tile(const float *qh, const float *kh, int64_t k_t, int64_t D, int64_t T, int64_t g0,
                           int gn, int64_t t0, float scale, float *s) {
  const float *qr[QK_ROWS];
  for (int r = 0; r < QK_ROWS; ++r) qr[r] = qh + (g0 + (r < gn ? r : gn - 1)) * D;
  __m256 acc[QK_ROWS][8];
  for (int r = 0; r < QK_ROWS; ++r)
    for (int j = 0; j < 8; ++j) acc[r][j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    __m256 qv[QK_ROWS];
    for (int r = 0; r < QK_ROWS; ++r) qv[r] = _mm256_loadu_ps(qr[r] + d);
    for (int j = 0; j < 8; ++j) {
      const __m256 kv = _mm256_loadu_ps(kh + (t0 + j) * k_t + d);
      for (int r = 0; r < QK_ROWS; ++r) acc[r][j] = _mm256_fmadd_ps(qv[r], kv, acc[r][j]);
    }
  }
  for (int r = 0; r < QK_ROWS; ++r) /* to the constant bound: a runtime one would keep `acc` in memory */
    if (r < gn) _mm256_storeu_ps(s + (g0 + r) * T + t0, _mm256_mul_ps(sum8(acc[r]), _mm256_set1_ps(scale)));
}
#endif

/* s[t] += mask[t] (mask may be NULL); returns the largest s[t]. */
static float masked_max(float *s, const float *mask, int64_t T) {
  float mx = -INFINITY;
  int64_t t = 0;
#ifdef PML_AVX2
  float lanes[8];
  __m256 vm = _mm256_set1_ps(-INFINITY);
  for (; t + 8 <= T; t += 8) {
    __m256 x = _mm256_loadu_ps(s + t);
    if (mask) x = _mm256_add_ps(x, _mm256_loadu_ps(mask + t));
    _mm256_storeu_ps(s + t, x);
    vm = _mm256_max_ps(vm, x);
  }
  _mm256_storeu_ps(lanes, vm);
  for (int l = 0; l < 8; ++l) mx = lanes[l] > mx ? lanes[l] : mx;
#endif
  for (; t < T; ++t) {
    if (mask) s[t] += mask[t];
    mx = s[t] > mx ? s[t] : mx;
  }
  return mx;
}

/* s[t] = exp(s[t] - ref) (a key far below ref, a masked one, gives exactly 0); returns the sum. */
static float exp_sum(float *s, int64_t T, float ref) {
  float z = 0.f;
  int64_t t = 0;
#ifdef PML_AVX2
  float lanes[8];
  __m256 vz = _mm256_setzero_ps();
  const __m256 vm = _mm256_set1_ps(ref);
  for (; t + 8 <= T; t += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + t), vm));
    _mm256_storeu_ps(s + t, e);
    vz = _mm256_add_ps(vz, e);
  }
  _mm256_storeu_ps(lanes, vz);
  for (int l = 0; l < 8; ++l) z += lanes[l];
#endif
  for (; t < T; ++t) { s[t] = expf(s[t] - ref); z += s[t]; }
  return z;
}

/* s[t] = exp(s[t] + mask[t] - max) (mask may be NULL), returns the sum. */
static float softmax_numerators(float *s, const float *mask, int64_t T) {
  return exp_sum(s, T, masked_max(s, mask, T));
}

/* out[g0 + g, d0 .. d0 + DBK) = (first ? 0 : out[..]) + sum_{t0 <= t < t0 + tn} s[g0 + g, t] v[t, d0 ..],
 * then * inv[g] when inv is given (the last key block), for g < gn <= GBK; score (g, t) at
 * s[g * s_g + t * s_t] (row-major for the row tiles, key-major for the lanes). A sum continues in
 * the same order from the fp32 value stored after the previous block, so any blocking gives
 * bitwise the one-pass sum. Few rows per head (a plain decode step): one row, all 64 dims
 * (measured faster here than sharing a pass), keys in blocks of PV_KEYS so that every row of a
 * group uses a block of V while it is in cache; more: PVR rows x PVD dims, all keys in one pass on
 * the row tiles (a speculative check), blocks of LANE_PV_KEYS on the lanes (below). */
#define PV_KEYS 64
#ifdef PML_AVX2
#define PV_BLOCK(GBK, DBK)                                                                          \
  static void pv_##GBK##x##DBK(const float *s, int64_t s_g, int64_t s_t, int64_t t0, int64_t tn,     \
                               const float *vh,                                                     \
                               int64_t v_t, float *oh, int64_t D, int64_t g0, int64_t gn,          \
                               int64_t d0, int first, const float *inv) {                           \
    __m256 acc[GBK][DBK / 8];                                                                       \
    for (int g = 0; g < GBK; ++g) /* rows past gn repeat the last and are not stored */             \
      for (int j = 0; j < DBK / 8; ++j)                                                             \
        acc[g][j] = first ? _mm256_setzero_ps()                                                     \
                          : _mm256_loadu_ps(oh + (g0 + (g < gn ? g : gn - 1)) * D + d0 + 8 * j);    \
    for (int64_t t = t0; t < t0 + tn; ++t) {                                                        \
      const float *vt = vh + t * v_t + d0;                                                          \
      __m256 vv[DBK / 8];                                                                           \
      for (int j = 0; j < DBK / 8; ++j) vv[j] = _mm256_loadu_ps(vt + 8 * j);                        \
      for (int g = 0; g < GBK; ++g) {                                                               \
        const __m256 p = _mm256_set1_ps(s[(g0 + (g < gn ? g : gn - 1)) * s_g + t * s_t]);           \
        for (int j = 0; j < DBK / 8; ++j) acc[g][j] = _mm256_fmadd_ps(p, vv[j], acc[g][j]);         \
      }                                                                                             \
    }                                                                                               \
    for (int g = 0; g < GBK; ++g) /* the constant bound keeps `acc` in registers */                 \
      if (g < gn) {                                                                                 \
        for (int j = 0; j < DBK / 8; ++j)                                                           \
          _mm256_storeu_ps(oh + (g0 + g) * D + d0 + 8 * j,                                          \
                           inv ? _mm256_mul_ps(acc[g][j], _mm256_set1_ps(inv[g])) : acc[g][j]);     \
      }                                                                                             \
  }
#endif
#ifdef __AVX512VL__ /* 24 accumulators: needs the 32 vector registers of AVX-512VL */
#define PVR 6
#define PVD 32
#else
#define PVR 4
#define PVD 16
#endif
#ifdef PML_AVX2
#define PV_MANY_(R, D) PV_BLOCK(R, D)
#define PV_NAME_(R, D) pv_##R##x##D
#define PV_NAME(R, D) PV_NAME_(R, D)
PV_BLOCK(1, 64)
PV_MANY_(PVR, PVD)
#endif

static void pv_plain(const float *s, int64_t s_g, int64_t s_t, int64_t t0, int64_t tn, const float *vh, int64_t v_t,
                     float *oh, int64_t D, int64_t g0, int64_t gn, int64_t d0, int64_t dn, int first, const float *inv) {
  for (int64_t g = 0; g < gn; ++g) {
    float acc[64];
    const float *sg = s + (g0 + g) * s_g;
    float *og = oh + (g0 + g) * D + d0;
    for (int64_t d = 0; d < dn; ++d) acc[d] = first ? 0.f : og[d];
    for (int64_t t = t0; t < t0 + tn; ++t)
      for (int64_t d = 0; d < dn; ++d) acc[d] += sg[t * s_t] * vh[t * v_t + d0 + d];
    for (int64_t d = 0; d < dn; ++d) og[d] = inv ? acc[d] * inv[g] : acc[d];
  }
}

/* Rows of a head per task on the row tiles: all of them, unless the heads alone would leave threads
 * idle or unevenly loaded (3 heads on 2 threads) and there are rows enough to split (a speculative
 * check's 12-15, not a step's 3): then chunks of whole PV tiles, so that the tasks divide evenly
 * among the threads where they can. Every row's arithmetic is the same in any chunk (its QK tile
 * rows, its softmax and its PV accumulators are its own), so results do not depend on this. */
static int64_t decode_rows_per_task(int64_t heads, int64_t G, int threads) {
  if (threads <= 1 || heads % threads == 0 || G < 2 * PVR) return G;
  int64_t chunks = 2;
  while ((heads * chunks) % threads != 0 && heads * chunks < 4 * threads && G / (chunks + 1) >= PVR) ++chunks;
  const int64_t rows = (G + chunks - 1) / chunks;
  return (rows + PVR - 1) / PVR * PVR;
}

#ifdef PML_AVX2
/* r[i] = column i of the 8 x 8 matrix whose rows are r[0..8). */
static inline void transpose8(__m256 *r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20), r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20), r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31), r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31), r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}
#endif

/* ---- many rows of a head: rows in vector lanes ------------------------------------------------ */
/* From LANE_ROWS rows per head (a packed batch's step: 8 prompts x 3 query heads = 24 rows; every
 * prefill) the row tiles above spend their time reloading keys and on horizontal sums (a 24-row
 * step's attention: 2.4 GFLOP in 42.5 ms, 56 GFLOP/s), and panels of transposed keys cost a copy
 * of K per task. Here a task's rows are transposed once (qT: [D][RP], RP the rows rounded up to LW
 * lanes) and each score is one lane of a vector of rows: tiles of up to LV vectors x LK keys of
 * accumulators, each key element broadcast once for all the tile's rows from K as the cache holds
 * it, no horizontal sums. Scores are key-major (sT: [keys][RP]), so the mask (transposed in
 * registers, 8 rows x 8 keys at a time), the maxima, the exponentials and their sums are vertical
 * too. Each score is fma(q[D-1], k[D-1], ... fma(q[0], k[0], 0)) * scale + mask, one rounding per
 * operation, so the plain-C form (a build without AVX2, the last keys short of a tile) gives the
 * same bits, and a row's result depends on neither its lane, its tile nor the thread count. It
 * differs from the row tiles' in the last bits (another summation order), as any two kernels do:
 * decode attention chooses by rows per head, so a plain step (smollm2-135m: 3 rows) and a
 * speculative check of the default 4 drafts (15) keep the row tiles. */
#ifndef LANE_ROWS /* these -D overrides: scripts/probes/lanes_kernels.py */
#define LANE_ROWS 16
#endif
#define LW 8 /* rows per lane vector */
#define LK 8 /* keys per lane tile */
#ifdef __AVX512VL__
#define LV 3 /* lane vectors per tile: 24 accumulators, the 32 registers of AVX-512VL */
#else
#define LV 1
#endif
#ifndef LANE_PV_KEYS /* these -D overrides: scripts/probes/lanes_kernels.py */
#define LANE_PV_KEYS 256 /* keys per PV pass of decode_lanes: V's block stays in L2 for every tile */
#endif

/* qT[d][i] = row i's element d, for RP lanes (lanes past `rows` repeat the last row: their
 * results are computed and never stored). */
static void lanes_rows(const float *qh, int64_t rows, int64_t D, int64_t RP, float *qT) {
  for (int64_t i = 0; i < RP; ++i)
    for (int64_t d = 0; d < D; ++d) qT[d * RP + i] = qh[(i < rows ? i : rows - 1) * D + d];
}

#ifdef PML_AVX2
/* sT[t0 + j][8 * v0 ..] for j < LK, lane vectors v0 .. v0 + NV; mx: running max per lane. */
#define LANES_QK(NV)                                                                                \
  static __attribute__((noinline)) void lanes_qk##NV(const float *qT, int64_t RP, int64_t v0, const float *kh,   \
                                                     int64_t k_t, int64_t D, int64_t t0, float scale,       \
                                                     const float *const *mrow, int64_t moff, float *sT,     \
                                                     float *mx) {                                           \
    __m256 acc[LK][NV];                                                                             \
    UNROLL for (int j = 0; j < LK; ++j) UNROLL for (int v = 0; v < NV; ++v) acc[j][v] = _mm256_setzero_ps(); \
    const float *kt = kh + t0 * k_t;                                                                \
    for (int64_t d = 0; d < D; ++d) {                                                               \
      __m256 qv[NV];                                                                                \
      UNROLL for (int v = 0; v < NV; ++v) qv[v] = _mm256_loadu_ps(qT + d * RP + LW * (v0 + v));     \
      UNROLL for (int j = 0; j < LK; ++j) {                                                         \
        const __m256 kv = _mm256_broadcast_ss(kt + j * k_t + d);                                    \
        UNROLL for (int v = 0; v < NV; ++v) acc[j][v] = _mm256_fmadd_ps(qv[v], kv, acc[j][v]);      \
      }                                                                                             \
    }                                                                                               \
    UNROLL for (int v = 0; v < NV; ++v) {                                                           \
      __m256 m[LW];                                                                                 \
      int masked = 0; /* an all-zero block (the keys every row sees) is not added: x + 0 is x */    \
      if (mrow) {                                                                                   \
        __m256 any = _mm256_setzero_ps();                                                           \
        UNROLL for (int l = 0; l < LW; ++l) {                                                       \
          m[l] = _mm256_loadu_ps(mrow[LW * (v0 + v) + l] + moff + t0);                              \
          any = _mm256_or_ps(any, m[l]);                                                            \
        }                                                                                           \
        masked = !_mm256_testz_si256(_mm256_castps_si256(any), _mm256_castps_si256(any));           \
        if (masked) transpose8(m); /* m[j]: key t0 + j's mask for the vector's 8 rows */           \
      }                                                                                             \
      __m256 top = _mm256_loadu_ps(mx + LW * (v0 + v));                                             \
      UNROLL for (int j = 0; j < LK; ++j) {                                                         \
        __m256 x = _mm256_mul_ps(acc[j][v], _mm256_set1_ps(scale));                                 \
        if (masked) x = _mm256_add_ps(x, m[j]);                                                     \
        _mm256_storeu_ps(sT + (t0 + j) * RP + LW * (v0 + v), x);                                    \
        top = _mm256_max_ps(top, x);                                                                \
      }                                                                                             \
      _mm256_storeu_ps(mx + LW * (v0 + v), top);                                                    \
    }                                                                                               \
  }
LANES_QK(1)
#if LV > 1
LANES_QK(2)
LANES_QK(3)
#endif
#endif

#ifndef LANE_PF_KEYS /* these -D overrides: scripts/probes/lanes_kernels.py (0: no prefetch) */
#define LANE_PF_KEYS 128
#endif
/* Each layer's K and V come from memory, not cache (a step or a prefill reads every layer's in
 * turn), and the hardware prefetcher leaves the score tiles waiting on them: a batch step's
 * decode attention took 35.7 ms without prefetches, 26.9 over one layer's K/V in cache
 * (`scripts/probes/lanes_kernels.py`, `now, no prefetch`, one thread). So each key tile asks L2
 * (not L1, where its operands are) for the V rows of its keys, which the PV pass reads next,
 * before its products, and after them for the K rows LANE_PF_KEYS keys ahead, while within the
 * `ahead` keys the caller will read (both before the products gained nothing in a scratch build).
 * The same probe, `now` against `now, no prefetch`: one prompt's prefill 89.0 against 105.7 ms,
 * a batch's 717 against 779, the batch step 34.4 against 35.7 (48.9 -> 41.5 built without
 * AVX-512). 16 floats: a cache line. */
static inline void lanes_prefetch_v(const float *vh, int64_t v_t, int64_t D, int64_t t) {
  for (int j = 0; j < LK; ++j)
    for (int64_t c = 0; c < D; c += 16) __builtin_prefetch(vh + (t + j) * v_t + c, 0, 1);
}
static inline void lanes_prefetch_k(const float *kh, int64_t k_t, int64_t D, int64_t t, int64_t ahead) {
  if (t + LANE_PF_KEYS + LK <= ahead)
    for (int j = 0; j < LK; ++j)
      for (int64_t c = 0; c < D; c += 16) __builtin_prefetch(kh + (t + LANE_PF_KEYS + j) * k_t + c, 0, 1);
}

/* sT[t][i] = scale * q_i . k_t + mrow[i][moff + t] (mrow NULL: no mask) for t < tn, all RP lanes;
 * mx[i] = max(mx[i], those). vh, v_t, ahead: what the prefetches ask for (V of these keys). */
static void lanes_scores(const float *qT, int64_t RP, const float *kh, int64_t k_t, const float *vh, int64_t v_t,
                         int64_t ahead, int64_t D, int64_t tn, float scale, const float *const *mrow, int64_t moff,
                         float *sT, float *mx) {
  int64_t t0 = 0;
#ifndef PML_AVX2
  (void)vh, (void)v_t, (void)ahead; /* the prefetches go with the vector tiles */
#else
  const int64_t NVT = RP / LW;
  for (; t0 + LK <= tn; t0 += LK) { /* the widest tiles that fit the lane vectors */
    if (LANE_PF_KEYS) lanes_prefetch_v(vh, v_t, D, t0);
    for (int64_t v0 = 0; v0 < NVT;) {
      const int64_t nv = NVT - v0 < LV ? NVT - v0 : LV;
#if LV > 1
      if (nv == 3) lanes_qk3(qT, RP, v0, kh, k_t, D, t0, scale, mrow, moff, sT, mx);
      else if (nv == 2) lanes_qk2(qT, RP, v0, kh, k_t, D, t0, scale, mrow, moff, sT, mx);
      else
#endif
        lanes_qk1(qT, RP, v0, kh, k_t, D, t0, scale, mrow, moff, sT, mx);
      v0 += nv;
    }
    if (LANE_PF_KEYS) lanes_prefetch_k(kh, k_t, D, t0, ahead);
  }
#endif
  for (int64_t t = t0; t < tn; ++t) /* the rest (and plain C), in the same arithmetic */
    for (int64_t i = 0; i < RP; ++i) {
      float acc = 0.f;
      for (int64_t d = 0; d < D; ++d) acc = fmaf(qT[d * RP + i], kh[t * k_t + d], acc);
      const float x = sT[t * RP + i] = acc * scale + (mrow ? mrow[i][moff + t] : 0.f);
      mx[i] = x > mx[i] ? x : mx[i];
    }
}

/* sT[t][i] = e^(sT[t][i] - ref[i]) for t < tn, all RP lanes (a score far below ref, a masked
 * one, gives exactly 0); z[i] = their sum, as four partial sums (keys t = c mod 4). */
static void lanes_exp(float *sT, int64_t RP, int64_t tn, const float *ref, float *z) {
  for (int64_t v = 0; v < RP / LW; ++v) {
    float *sv = sT + LW * v;
#ifdef PML_AVX2
    const __m256 r = _mm256_loadu_ps(ref + LW * v);
    __m256 part[4];
    for (int c = 0; c < 4; ++c) part[c] = _mm256_setzero_ps();
    for (int64_t t = 0; t < tn; ++t) {
      const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sv + t * RP), r));
      _mm256_storeu_ps(sv + t * RP, e);
      part[t % 4] = _mm256_add_ps(part[t % 4], e);
    }
    _mm256_storeu_ps(z + LW * v, _mm256_add_ps(_mm256_add_ps(part[0], part[1]), _mm256_add_ps(part[2], part[3])));
#else
    for (int l = 0; l < LW; ++l) {
      float part[4] = {0.f, 0.f, 0.f, 0.f};
      for (int64_t t = 0; t < tn; ++t) part[t % 4] += (sv[t * RP + l] = expf(sv[t * RP + l] - ref[LW * v + l]));
      z[LW * v + l] = (part[0] + part[1]) + (part[2] + part[3]);
    }
#endif
  }
}

/* One task of decode attention on the lanes path: the `rows` rows of qT (mask rows mrow, or NULL)
 * over tn keys of a head: m = each row's max score, l = the sum of e^(score - m), o = the sum of
 * e^(score - m) v, not normalized (a row whose keys are all at -inf: l and o 0, so that the merge
 * weighs it 0). */
static void decode_lanes(const float *qT, int64_t RP, int64_t rows, const float *kh, const float *vh,
                         const float *const *mrow, int64_t moff, int64_t D, int64_t tn, int64_t k_t, int64_t v_t,
                         float scale, float *sT, float *ref, float *o, float *m, float *l) {
  for (int64_t i = 0; i < RP; ++i) m[i] = -INFINITY;
  lanes_scores(qT, RP, kh, k_t, vh, v_t, tn, D, tn, scale, mrow, moff, sT, m);
  for (int64_t i = 0; i < RP; ++i) ref[i] = m[i] == -INFINITY ? 0.f : m[i];
  lanes_exp(sT, RP, tn, ref, l);
  for (int64_t tb = 0; tb < tn; tb += LANE_PV_KEYS) {
    const int64_t bn = tn - tb < LANE_PV_KEYS ? tn - tb : LANE_PV_KEYS;
    for (int64_t g0 = 0; g0 < rows; g0 += PVR) {
      const int64_t gn = rows - g0 < PVR ? rows - g0 : PVR;
      for (int64_t d0 = 0; d0 < D; d0 += PVD) {
        const int64_t dn = D - d0 < PVD ? D - d0 : PVD;
#ifdef PML_AVX2
        if (dn == PVD) {
          PV_NAME(PVR, PVD)(sT, 1, RP, tb, bn, vh, v_t, o, D, g0, gn, d0, tb == 0, NULL);
          continue;
        }
#endif
        pv_plain(sT, 1, RP, tb, bn, vh, v_t, o, D, g0, gn, d0, dn, tb == 0, NULL);
      }
    }
  }
}

/* pml_decode_attention from LANE_ROWS rows per head: each head's keys in 1 to 4 chunks, one task
 * each with all the head's rows (splitting rows instead reads K and V once per split: at two
 * threads that cost more than 3 heads' imbalance), then the chunks' partial sums merged in chunk
 * order, each rescaled by e^(m_chunk - m). A chunk per LANE_CHUNK_KEYS keys, and at least enough
 * for LANE_MIN_TASKS tasks where chunks stay LANE_MIN_CHUNK keys or more (one K/V head, as in
 * Gemma-3-270m, otherwise leaves a second thread idle): a packed batch of 8 at 4,000 tokens (2
 * chunks) spent 35.2 ms of attention a step against 34.2 in one chunk at one thread, 21.3 against
 * 24.4 at two, where 2 chunks of 3 heads fill the threads evenly (scripts/probes/lanes_kernels.py).
 * The chunks depend on the shape alone, so the result does not depend on the thread count. */
#ifndef LANE_CHUNK_KEYS /* these -D overrides: scripts/probes/lanes_kernels.py */
#define LANE_CHUNK_KEYS 2048
#endif
#ifndef LANE_MIN_TASKS
#define LANE_MIN_TASKS 4
#endif
#define LANE_MIN_CHUNK 256
static int64_t lanes_chunk_keys(int64_t heads, int64_t T) {
  int64_t chunks = T / LANE_CHUNK_KEYS;
  const int64_t fill = (LANE_MIN_TASKS + heads - 1) / heads, most = T / LANE_MIN_CHUNK;
  chunks = chunks > fill ? chunks : fill < most ? fill : most;
  chunks = chunks < 1 ? 1 : chunks > 4 ? 4 : chunks;
  const int64_t keys = ((T + chunks - 1) / chunks + LK - 1) / LK * LK;
  return keys > LK ? keys : LK; /* never 0 (T = 0: no chunk at all) */
}
static void decode_attention_lanes(const float *q, const float *k, const float *v, const float *mask, float *out,
                                   int64_t B, int64_t KV, int64_t G, int64_t D, int64_t T,
                                   int64_t k_b, int64_t k_h, int64_t k_t, int64_t v_b, int64_t v_h, int64_t v_t,
                                   int64_t m_b, int64_t m_h, int64_t m_g, int64_t m_period, float scale, int threads) {
  const int64_t RP = (G + LW - 1) / LW * LW, keys = lanes_chunk_keys(B * KV, T), chunks = (T + keys - 1) / keys;
  const int64_t per_chunk = G * D + 2 * RP; /* a chunk's o [G][D], then m and l [RP] */
  float *part = (float *)malloc(sizeof(float) * B * KV * chunks * per_chunk);
  _Pragma("omp parallel num_threads(threads) if (threads > 1)") {
    float *qT = (float *)malloc(sizeof(float) * RP * (D + keys + 1)), *sT = qT + RP * D, *ref = sT + RP * keys;
    const float **mrow = (const float **)malloc(sizeof(float *) * RP);
    _Pragma("omp for schedule(static)") for (int64_t task = 0; task < B * KV * chunks; ++task) {
      const int64_t bh = task / chunks, b = bh / KV, h = bh % KV, t0 = (task % chunks) * keys;
      const int64_t tn = T - t0 < keys ? T - t0 : keys;
      float *o = part + task * per_chunk;
      lanes_rows(q + bh * G * D, G, D, RP, qT);
      for (int64_t i = 0; i < RP; ++i) /* lanes past the rows repeat the last row */
        mrow[i] = mask ? mask + b * m_b + h * m_h + ((i < G ? i : G - 1) % m_period) * m_g : NULL;
      decode_lanes(qT, RP, G, k + b * k_b + h * k_h + t0 * k_t, v + b * v_b + h * v_h + t0 * v_t, mask ? mrow : NULL,
                   t0, D, tn, k_t, v_t, scale, sT, ref, o, o + G * D, o + G * D + RP);
    }
    _Pragma("omp for schedule(static)") for (int64_t bh = 0; bh < B * KV; ++bh) /* the merge */
      for (int64_t g = 0; g < G; ++g) {
        const float *p0 = part + bh * chunks * per_chunk;
        float top = -INFINITY, l = 0.f, *oh = out + (bh * G + g) * D;
        for (int64_t c = 0; c < chunks; ++c) top = p0[c * per_chunk + G * D + g] > top ? p0[c * per_chunk + G * D + g] : top;
        for (int64_t d = 0; d < D; ++d) oh[d] = 0.f;
        for (int64_t c = 0; c < chunks; ++c) {
          const float *pc = p0 + c * per_chunk;
          const float w = expf(pc[G * D + g] - top);
          l += w * pc[G * D + RP + g];
          for (int64_t d = 0; d < D; ++d) oh[d] += w * pc[g * D + d];
        }
        const float inv = 1.f / l;
        for (int64_t d = 0; d < D; ++d) oh[d] *= inv;
      }
    free(qT), free(mrow);
  }
  free(part);
}

void pml_decode_attention(const float *q, const float *k, const float *v, const float *mask, float *out,
                          int64_t B, int64_t KV, int64_t G, int64_t D, int64_t T,
                          int64_t k_b, int64_t k_h, int64_t k_t, int64_t v_b, int64_t v_h, int64_t v_t,
                          int64_t m_b, int64_t m_h, int64_t m_g, int64_t m_period, float scale, int threads) {
  if (G >= LANE_ROWS) {
    decode_attention_lanes(q, k, v, mask, out, B, KV, G, D, T, k_b, k_h, k_t, v_b, v_h, v_t, m_b, m_h, m_g, m_period,
                           scale, threads);
    return;
  }
  const int64_t per_task = decode_rows_per_task(B * KV, G, threads), chunks = (G + per_task - 1) / per_task;
  _Pragma("omp parallel num_threads(threads) if (threads > 1)") {
    float *s = (float *)malloc(sizeof(float) * G * (T + 1)); /* scores, by the row's place in its head */
    float *inv = s + G * T;                                   /* then 1 / each row's softmax sum */
    _Pragma("omp for schedule(static)") for (int64_t task = 0; task < B * KV * chunks; ++task) {
      const int64_t bh = task / chunks, b = bh / KV, h = bh % KV;
      const int64_t r0 = (task % chunks) * per_task, r1 = r0 + per_task < G ? r0 + per_task : G;
      const float *qh = q + bh * G * D, *kh = k + b * k_b + h * k_h, *vh = v + b * v_b + h * v_h;
      float *oh = out + bh * G * D;
      int64_t t0 = 0;
#ifdef PML_AVX2
      if (D % 8 == 0)
        for (; t0 + 8 <= T; t0 += 8) /* 8 keys at a time, read once for every query row */
          for (int64_t g0 = r0; g0 < r1; g0 += QK_ROWS)
            qk_tile(qh, kh, k_t, D, T, g0, r1 - g0 < QK_ROWS ? (int)(r1 - g0) : QK_ROWS, t0, scale, s);
#endif
      for (int64_t t = t0; t < T; ++t) { /* the rest (and plain C): one key at a time */
        const float *kt = kh + t * k_t;
        for (int64_t g = r0; g < r1; ++g) {
          const float *qg = qh + g * D;
          float acc = 0.f;
          for (int64_t d = 0; d < D; ++d) acc += qg[d] * kt[d];
          s[g * T + t] = acc * scale;
        }
      }
      const int64_t gb = G >= 4 ? PVR : 1, db = G >= 4 ? PVD : 64;
      for (int64_t g = r0; g < r1; ++g)
        inv[g] = 1.f / softmax_numerators(s + g * T, mask ? mask + b * m_b + h * m_h + (g % m_period) * m_g : NULL, T);
      const int64_t keys = gb > 1 ? T : PV_KEYS;
      for (int64_t tb = 0; tb < T; tb += keys) {
        const int64_t tn = T - tb < keys ? T - tb : keys;
        const int first = tb == 0, last = tb + tn == T;
        for (int64_t g0 = r0; g0 < r1; g0 += gb) {
          const int64_t gn = r1 - g0 < gb ? r1 - g0 : gb;
          for (int64_t d0 = 0; d0 < D; d0 += db) {
            const int64_t dn = D - d0 < db ? D - d0 : db;
#ifdef PML_AVX2
            if (dn == db) {
              (gb > 1 ? PV_NAME(PVR, PVD) : pv_1x64)(s, T, 1, tb, tn, vh, v_t, oh, D, g0, gn, d0, first, last ? inv + g0 : NULL);
              continue;
            }
#endif
            pv_plain(s, T, 1, tb, tn, vh, v_t, oh, D, g0, gn, d0, dn, first, last ? inv + g0 : NULL);
          }
        }
      }
    }
    free(s);
  }
}

/* ---- many-row attention (prefills): key blocks with an online softmax ----------------------- */
/* The same contract as pml_decode_attention, for more query rows per key/value head than
 * DECODE_ROWS (a 39-token prefill of a model with 3 query heads per K/V head is 117 rows). The
 * single pass above keeps every row's scores for all T keys, which no longer stays in cache there;
 * here a task of up to FR rows walks the keys in blocks of FK with an online softmax (running max
 * m, sum l, output rescaled by alpha = e^(m_old - m_new)), so its scores and output stay in L2.
 * Scores: with AVX-512VL the lanes tiles above (key-major, K read in place); otherwise FQ rows x 16
 * keys over keys transposed into panels once per block (with AVX2's 16 registers the lanes tile is
 * 1 vector x 8 keys, one broadcast per FMA: a batch's prefill ran 946.5 against 779.4 ms on panels,
 * `scripts/probes/lanes_kernels.py --avx2`, `now, lanes flash` against `now`). The output update is a register tile of FV rows
 * x 32 dims (V read in place). A masked key gives exactly 0, as above. `causal` > 0: row g also
 * sees only keys t <= T - causal + g % causal (the causal mask of `causal` new tokens at the end
 * of the keys, for every head of a group), and key blocks past a task's last visible key are
 * skipped. Needs D % 32 == 0. */

#define FK 128 /* keys per block */
#define FR 120 /* query rows per task: a multiple of LW, FQ and FV */
#ifndef FLASH_LANES /* -DFLASH_LANES=1 without AVX-512VL: scripts/probes/lanes_kernels.py --avx2 */
#ifdef __AVX512VL__
#define FLASH_LANES 1
#else
#define FLASH_LANES 0
#endif
#endif
#ifdef __AVX512VL__ /* 24 accumulators: the 32 vector registers of AVX-512VL */
#define FV 6
#else
#define FV 2
#endif
#if !FLASH_LANES
#define FP 16 /* keys per transposed panel */
#define FQ 6
#endif

/* o[r][0 .. 32) = o[r][..] * alpha[r] + sum_{t < tn} p[r * p_r + t * p_t] v[t][..] for rows r < rn
 * <= FV (v: row stride v_t; o: row stride D). */
static __attribute__((noinline)) void flash_pv(const float *p, int64_t p_r, int64_t p_t, int rn, int64_t tn,
                                               const float *v, int64_t v_t, float *o, int64_t D, const float *alpha) {
#ifdef PML_AVX2
  __m256 a[FV][4];
  const float *pr[FV];
  UNROLL for (int r = 0; r < FV; ++r) {
    const int rr = r < rn ? r : rn - 1;
    const __m256 al = _mm256_set1_ps(alpha[rr]);
    pr[r] = p + rr * p_r;
    for (int j = 0; j < 4; ++j) a[r][j] = _mm256_mul_ps(_mm256_loadu_ps(o + rr * D + 8 * j), al);
  }
  for (int64_t t = 0; t < tn; ++t) {
    const float *vt = v + t * v_t;
    const __m256 v0 = _mm256_loadu_ps(vt), v1 = _mm256_loadu_ps(vt + 8), v2 = _mm256_loadu_ps(vt + 16),
                 v3 = _mm256_loadu_ps(vt + 24);
    UNROLL for (int r = 0; r < FV; ++r) {
      const __m256 w = _mm256_broadcast_ss(pr[r] + t * p_t);
      a[r][0] = _mm256_fmadd_ps(w, v0, a[r][0]);
      a[r][1] = _mm256_fmadd_ps(w, v1, a[r][1]);
      a[r][2] = _mm256_fmadd_ps(w, v2, a[r][2]);
      a[r][3] = _mm256_fmadd_ps(w, v3, a[r][3]);
    }
  }
  UNROLL for (int r = 0; r < FV; ++r)
    if (r < rn)
      for (int j = 0; j < 4; ++j) _mm256_storeu_ps(o + r * D + 8 * j, a[r][j]);
#else
  for (int r = 0; r < rn; ++r) {
    float acc[32];
    for (int j = 0; j < 32; ++j) acc[j] = o[r * D + j] * alpha[r];
    for (int64_t t = 0; t < tn; ++t)
      for (int j = 0; j < 32; ++j) acc[j] += p[r * p_r + t * p_t] * v[t * v_t + j];
    for (int j = 0; j < 32; ++j) o[r * D + j] = acc[j];
  }
#endif
}

#if FLASH_LANES
/* A block's weights for the RP lanes: s[t][i] = e^(score - ref[i]) for the tn keys at kh (key t0
 * of the head), alpha[i] = e^(m_old - ref), m and l updated (see above). seen[i]: the keys of the
 * head row i sees under `causal` (T when not causal). vh, v_t, ahead: as `lanes_scores`. */
static void flash_block(const float *qT, int64_t RP, const float *kh, int64_t k_t, const float *vh, int64_t v_t,
                        int64_t ahead, int64_t D, int64_t t0, int64_t tn, float scale, const float *const *mrow,
                        const int64_t *seen, float *s, float *m, float *l, float *alpha, float *ref, float *top, float *z) {
  for (int64_t i = 0; i < RP; ++i) top[i] = -INFINITY;
  lanes_scores(qT, RP, kh, k_t, vh, v_t, ahead, D, tn, scale, mrow, t0, s, top);
  for (int64_t i = 0; i < RP; ++i)
    if (seen[i] - t0 < tn) { /* keys past row i's own token: -inf, weight 0, and the max without them */
      top[i] = -INFINITY;
      for (int64_t t = 0; t < tn; ++t)
        if (t < seen[i] - t0) top[i] = s[t * RP + i] > top[i] ? s[t * RP + i] : top[i];
        else s[t * RP + i] = -INFINITY;
    }
  for (int64_t i = 0; i < RP; ++i) {
    const float m_new = top[i] > m[i] ? top[i] : m[i];
    ref[i] = m_new == -INFINITY ? 0.f : m_new; /* every key so far at -inf: weights 0 */
    alpha[i] = expf(m[i] - ref[i]);
    m[i] = m_new;
  }
  lanes_exp(s, RP, tn, ref, z);
  for (int64_t i = 0; i < RP; ++i) l[i] = l[i] * alpha[i] + z[i];
}
#else
/* s[r][0 .. FP) = scale * q_r . k_j for the rows of one packed group (qp: [D][FQ], rows past rn
 * repeat the last) and one key panel (kp: [D][FP]); rows r < rn stored, row stride FK. */
static __attribute__((noinline)) void flash_qk(const float *qp, const float *kp, int64_t D, int rn, float scale, float *s) {
#ifdef PML_AVX2
  __m256 a[FQ][2];
  UNROLL for (int r = 0; r < FQ; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m256 k0 = _mm256_loadu_ps(kp + d * FP), k1 = _mm256_loadu_ps(kp + d * FP + 8);
    UNROLL for (int r = 0; r < FQ; ++r) {
      const __m256 q = _mm256_broadcast_ss(qp + d * FQ + r);
      a[r][0] = _mm256_fmadd_ps(q, k0, a[r][0]);
      a[r][1] = _mm256_fmadd_ps(q, k1, a[r][1]);
    }
  }
  const __m256 sc = _mm256_set1_ps(scale);
  UNROLL for (int r = 0; r < FQ; ++r) /* to the constant bound: a runtime one would keep `a` in memory */
    if (r < rn) {
      _mm256_storeu_ps(s + r * FK, _mm256_mul_ps(a[r][0], sc));
      _mm256_storeu_ps(s + r * FK + 8, _mm256_mul_ps(a[r][1], sc));
    }
#else
  for (int r = 0; r < rn; ++r)
    for (int j = 0; j < FP; ++j) {
      float acc = 0.f;
      for (int64_t d = 0; d < D; ++d) acc += qp[d * FQ + r] * kp[d * FP + j];
      s[r * FK + j] = acc * scale;
    }
#endif
}

/* kp[panel][d][j] = k[FP * panel + j][d] for the tn keys of a block (rows of k: stride k_t), zero
 * past tn. */
static void flash_pack_keys(const float *k, int64_t k_t, int64_t D, int64_t tn, float *kp) {
  for (int64_t p0 = 0; p0 < tn; p0 += FP) {
    float *panel = kp + (p0 / FP) * D * FP;
    const int64_t jn = tn - p0 < FP ? tn - p0 : FP;
#ifdef PML_AVX2
    if (jn == FP && D % 8 == 0) {
      for (int64_t d0 = 0; d0 < D; d0 += 8)
        for (int half = 0; half < FP / 8; ++half) {
          __m256 r[8];
          for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(k + (p0 + 8 * half + i) * k_t + d0);
          transpose8(r);
          for (int i = 0; i < 8; ++i) _mm256_storeu_ps(panel + (d0 + i) * FP + 8 * half, r[i]);
        }
      continue;
    }
#endif
    for (int64_t j = 0; j < FP; ++j)
      for (int64_t d = 0; d < D; ++d) panel[d * FP + j] = j < jn ? k[(p0 + j) * k_t + d] : 0.f;
  }
}

/* flash_block on panels: the gn rows of qp (packed [group][D][FQ]), scores row-major s[r][FK]. */
static void flash_block(const float *qp, int64_t gn, const float *kh, int64_t k_t, int64_t D, int64_t t0, int64_t tn,
                        float scale, const float *const *mrow, const int64_t *seen, float *s, float *m, float *l,
                        float *alpha, float *kp) {
  flash_pack_keys(kh, k_t, D, tn, kp);
  for (int64_t j = 0; j < tn; j += FP)
    for (int64_t r0 = 0; r0 < gn; r0 += FQ)
      flash_qk(qp + r0 * D, kp + (j / FP) * D * FP, D, gn - r0 < FQ ? (int)(gn - r0) : FQ, scale, s + r0 * FK + j);
  for (int64_t r = 0; r < gn; ++r) {
    for (int64_t j = seen[r] - t0 > 0 ? seen[r] - t0 : 0; j < tn; ++j) s[r * FK + j] = -INFINITY; /* causal */
    const float mx = masked_max(s + r * FK, mrow ? mrow[r] + t0 : NULL, tn), m_new = mx > m[r] ? mx : m[r];
    const float ref = m_new == -INFINITY ? 0.f : m_new; /* every key so far at -inf: weights 0 */
    alpha[r] = expf(m[r] - ref);
    l[r] = l[r] * alpha[r] + exp_sum(s + r * FK, tn, ref);
    m[r] = m_new;
  }
}
#endif

void pml_flash_attention(const float *q, const float *k, const float *v, const float *mask, float *out,
                         int64_t B, int64_t KV, int64_t G, int64_t D, int64_t T,
                         int64_t k_b, int64_t k_h, int64_t k_t, int64_t v_b, int64_t v_h, int64_t v_t,
                         int64_t m_b, int64_t m_h, int64_t m_g, int64_t m_period, int64_t causal, float scale,
                         int threads) {
  const int64_t row_blocks = (G + FR - 1) / FR;
  _Pragma("omp parallel num_threads(threads) if (threads > 1)") {
    float *qp = (float *)malloc(sizeof(float) * FR * D); /* the task's rows: transposed [D][RP] (lanes), packed [group][D][FQ] */
    float *s = (float *)malloc(sizeof(float) * FK * FR); /* a block's scores, then weights: [key][RP] (lanes), [row][FK] */
    float m[FR], l[FR], alpha[FR];
    int64_t seen[FR]; /* keys of the head each row sees (causal) */
    const float *mrow[FR];
#if FLASH_LANES
    float ref[FR], top[FR], z[FR];
#else
    float *kp = (float *)malloc(sizeof(float) * FK * D); /* a key block, transposed [panel][D][FP] */
#endif
    _Pragma("omp for schedule(static, 1)") for (int64_t task = 0; task < B * KV * row_blocks; ++task) {
      const int64_t bh = task / row_blocks, b = bh / KV, h = bh % KV, g0 = (task % row_blocks) * FR;
      const int64_t gn = G - g0 < FR ? G - g0 : FR;
      const float *qh = q + (bh * G + g0) * D, *kh = k + b * k_b + h * k_h, *vh = v + b * v_b + h * v_h;
      float *oh = out + (bh * G + g0) * D;
#if FLASH_LANES
      const int64_t RP = (gn + LW - 1) / LW * LW, p_r = 1, p_t = RP; /* lanes past the rows repeat the last */
      lanes_rows(qh, gn, D, RP, qp);
#else
      const int64_t RP = gn, p_r = FK, p_t = 1;
      for (int64_t r0 = 0; r0 < gn; r0 += FQ)
        for (int64_t d = 0; d < D; ++d)
          for (int64_t r = 0; r < FQ; ++r)
            qp[r0 * D + d * FQ + r] = qh[(r0 + r < gn ? r0 + r : gn - 1) * D + d];
#endif
      int64_t t_end = 0; /* causal: past the last key any row of the task sees, nothing is read */
      for (int64_t i = 0; i < RP; ++i) {
        const int64_t g = g0 + (i < gn ? i : gn - 1);
        mrow[i] = mask ? mask + b * m_b + h * m_h + (g % m_period) * m_g : NULL;
        seen[i] = causal ? T - causal + g % causal + 1 : T;
        t_end = seen[i] > t_end ? seen[i] : t_end;
        m[i] = -INFINITY, l[i] = 0.f;
      }
      memset(oh, 0, sizeof(float) * gn * D);
      for (int64_t t0 = 0; t0 < t_end; t0 += FK) {
        const int64_t tn = t_end - t0 < FK ? t_end - t0 : FK;
#if FLASH_LANES
        flash_block(qp, RP, kh + t0 * k_t, k_t, vh + t0 * v_t, v_t, t_end - t0, D, t0, tn, scale, mask ? mrow : NULL, seen,
                    s, m, l, alpha, ref, top, z);
#else
        flash_block(qp, gn, kh + t0 * k_t, k_t, D, t0, tn, scale, mask ? mrow : NULL, seen, s, m, l, alpha, kp);
#endif
        for (int64_t r0 = 0; r0 < gn; r0 += FV)
          for (int64_t d0 = 0; d0 < D; d0 += 32)
            flash_pv(s + r0 * p_r, p_r, p_t, gn - r0 < FV ? (int)(gn - r0) : FV, tn, vh + t0 * v_t + d0, v_t,
                     oh + r0 * D + d0, D, alpha + r0);
      }
      for (int64_t r = 0; r < gn; ++r) {
        const float inv = 1.f / l[r];
        for (int64_t d = 0; d < D; ++d) oh[r * D + d] *= inv;
      }
    }
#if !FLASH_LANES
    free(kp);
#endif
    free(qp), free(s);
  }
}
