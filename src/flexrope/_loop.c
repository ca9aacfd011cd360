/* The rotation as one loop over x in memory order, for CPU tensors (flexrope's "native" backend).

   Each pair (a, b) becomes (a cos - b sin, b cos + a sin), every product and sum rounded in the compute type
   (float32 for half precision, float64 for float64): the rounded operations of the other backends, so the
   bits are theirs. Built with -ffp-contract=off, so no multiply-add is fused.

   x and out are viewed as rows (every dim but the channels, in x's memory order) of `channels` contiguous
   elements; the tables as rows of rotary/2 contiguous angles, found through strides (0 where they broadcast)
   and, where the caller has positions in a tensor, through those positions. out may be x (in place):
   iteration j reads and writes only its own pair, so there is no dependence between iterations, which
   `ivdep` tells the vectoriser. */

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float float_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float bf16_load(uint16_t v) { return float_bits((uint32_t)v << 16); }

/* float32 -> bfloat16, rounding to nearest even (torch's rule); NaN stays NaN */
static inline uint16_t bf16_store(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0 : (uint16_t)rounded;
}

/* float16 bits -> float32, exactly: normal numbers rebiased on the bits, subnormal ones as their integer
   mantissa times 2^-24, infinities and NaNs with their mantissa kept. Integer operations and selects by
   masks, which the compiler vectorises (a cast of _Float16 it may not, and not every compiler has the type;
   selects by ?: around the float product it did not, floating-point operations being allowed to trap). */
static inline float f16_load(uint16_t v) {
    const uint32_t sign = (uint32_t)(v & 0x8000u) << 16, magnitude = v & 0x7fffu;
    const float scaled = (float)(int32_t)magnitude * 0x1p-24f; /* exact: at most 15 significant bits */
    uint32_t subnormal;
    memcpy(&subnormal, &scaled, sizeof subnormal);
    const uint32_t normal = (magnitude << 13) + ((uint32_t)(127 - 15) << 23);
    const uint32_t special = (magnitude << 13) | 0x7f800000u; /* a NaN's payload kept; arithmetic quietens it */
    const uint32_t is_special = -(uint32_t)(magnitude >= 0x7c00u), is_normal = -(uint32_t)(magnitude >= 0x0400u);
    const uint32_t u = sign | (special & is_special) | (normal & is_normal & ~is_special) | (subnormal & ~is_normal);
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* float32 -> float16 bits, rounding to nearest even (torch's rule): past the largest half, infinity; NaN
   stays NaN; below the smallest normal half, rounded at 2^-24 by adding 0.5, whose ulp that is. */
static inline uint16_t f16_store(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t sign = u & 0x80000000u, magnitude = u ^ sign;
    float small;
    memcpy(&small, &magnitude, sizeof small);
    small += 0.5f;
    uint32_t subnormal;
    memcpy(&subnormal, &small, sizeof subnormal);
    subnormal -= 0x3f000000u; /* the bits of 0.5f */
    const uint32_t normal = (magnitude + ((uint32_t)(15 - 127) << 23) + 0xfffu + ((magnitude >> 13) & 1u)) >> 13;
    const uint32_t is_nan = -(uint32_t)(magnitude > 0x7f800000u); /* quietened, the payload's top bits kept */
    const uint32_t special = 0x7c00u | (is_nan & (0x0200u | ((magnitude >> 13) & 0x03ffu)));
    const uint32_t is_special = -(uint32_t)(magnitude >= 0x47800000u);
    const uint32_t is_normal = -(uint32_t)(magnitude >= 0x38800000u);
    const uint32_t half = (special & is_special) | (normal & is_normal & ~is_special) | (subnormal & ~is_normal);
    return (uint16_t)(half | (sign >> 16));
}

#define IDENTITY(v) (v)

/* A pair normalised and rotated, as ((a (ga c) - b (gb s)) scale, (b (gb c) + a (ga s)) scale): the gains folded
   into the angles (bf16x_fold makes the same products once for the rows that share them), a (ga c) and b (gb c)
   rounded once with the sum (fused multiply-adds); in the compute type C. */
#define FUSED(C, a, b, c) _Generic((C)0, double: fma, default: fmaf)(a, b, c)
#define NORM_FIRST(C, a, b, ga, gb, cj, sj) (FUSED(C, a, (ga) * (cj), -((b) * ((gb) * (sj)))) * scale)
#define NORM_SECOND(C, a, b, ga, gb, cj, sj) (FUSED(C, b, (gb) * (cj), (a) * ((ga) * (sj))) * scale)

/* The pairs (first, second), j < n, of G rows that share their angles (row g at xr + g * x_step, its result
   at o + g * out_step): the angles come from memory for the first row and from L1 for the next ones. Row by
   row, with the channels innermost: with the rows innermost, float16's conversions were not vectorised and
   float32 "b s h d" ran 1.6x slower. n and G are constants where the caller can make them ones (the loops
   then unroll). */
#define PAIRS(T, C, LOAD, STORE, G, n, first, second)                                                         \
    for (int64_t g = 0; g < (G); ++g) {                                                                     \
        const T *xg = xr + g * x_step;                                                                      \
        T *og = o + g * out_step;                                                                           \
        _Pragma("GCC ivdep") for (int64_t j = 0; j < (n); ++j) {                                              \
            const C cj = c[j], sj = s[j] * (C)sign; /* sign -1 (inverse): exact */                        \
            const C a = LOAD(xg[first]), b = LOAD(xg[second]);                                              \
            const C ca = a * cj, sb = b * sj, cb = b * cj, sa = a * sj;                                     \
            og[first] = STORE(ca - sb);                                                                     \
            og[second] = STORE(cb + sa);                                                                    \
        }                                                                                                   \
    }

/* Pairs side by side (interleaved): channels 2j and 2j + 1. */
#define SIDE_BY_SIDE(T, C, LOAD, STORE, G, n) PAIRS(T, C, LOAD, STORE, G, n, 2 * j, 2 * j + 1)

/* bfloat16 pairs side by side: a pair is one 32-bit word whose low half is its first channel (little-endian),
   so each channel is the word shifted or masked, already the float32 bits: no shuffles of a stride-2 loop
   (which ran 1.2x slower than the half-split pairs). */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define BF16_WORDS(T, C, LOAD, STORE, G, n)                                                                   \
    for (int64_t g = 0; g < (G); ++g) {                                                                     \
        const uint16_t *xg = xr + g * x_step;                                                               \
        uint16_t *og = o + g * out_step;                                                                    \
        _Pragma("GCC ivdep") for (int64_t j = 0; j < (n); ++j) {                                              \
            const float cj = c[j], sj = s[j] * (float)sign;                                                 \
            uint32_t word;                                                                                  \
            memcpy(&word, xg + 2 * j, sizeof word);                                                         \
            const float a = float_bits(word << 16), b = float_bits(word & 0xffff0000u);                    \
            const float ca = a * cj, sb = b * sj, cb = b * cj, sa = a * sj;                                 \
            word = (uint32_t)bf16_store(ca - sb) | (uint32_t)bf16_store(cb + sa) << 16;                    \
            memcpy(og + 2 * j, &word, sizeof word);                                                         \
        }                                                                                                   \
    }
#else
#define BF16_WORDS SIDE_BY_SIDE
#endif

/* Pairs of halves (half-split): channels j and j + n. */
#define HALVES(T, C, LOAD, STORE, G, n) PAIRS(T, C, LOAD, STORE, G, n, j, j + (n))

#define PAIRING(SIDE_BY_SIDE_PAIRS, HALVES_PAIRS, T, C, LOAD, STORE, G, n)                                    \
    if (interleaved)                                                                                        \
        SIDE_BY_SIDE_PAIRS(T, C, LOAD, STORE, G, n)                                                         \
    else                                                                                                    \
        HALVES_PAIRS(T, C, LOAD, STORE, G, n)

/* G rows whose angles are the tables' at table_at: the first at x + x_at (its result at out + out_at), the
   next ones step_x (step_out) further; the channels past `rotary` are copied out of place. Pairs side by side
   are rotated by SIDE_BY_SIDE_PAIRS, pairs of halves by HALVES_PAIRS. */
#define ROWS_PAIRED(SIDE_BY_SIDE_PAIRS, HALVES_PAIRS, T, C, LOAD, STORE, G, x_at, out_at, table_at, step_x,     \
                    step_out)                                                                               \
    {                                                                                                       \
        const C *c = cos + (table_at), *s = sin + (table_at);                                               \
        const T *xr = x + (x_at);                                                                           \
        T *o = out + (out_at);                                                                              \
        const int64_t x_step = (step_x), out_step = (step_out);                                             \
        if (half == 64)                                                                                     \
            PAIRING(SIDE_BY_SIDE_PAIRS, HALVES_PAIRS, T, C, LOAD, STORE, G, 64)                             \
        else                                                                                                \
            PAIRING(SIDE_BY_SIDE_PAIRS, HALVES_PAIRS, T, C, LOAD, STORE, G, half)                           \
        if (o != xr && rotary < channels)                                                                   \
            for (int64_t g = 0; g < (G); ++g)                                                               \
                memcpy(o + g * out_step + rotary, xr + g * x_step + rotary,                                 \
                       (size_t)(channels - rotary) * sizeof(T));                                            \
    }
#define ROWS(...) ROWS_PAIRED(SIDE_BY_SIDE, HALVES, __VA_ARGS__)
#define BF16_ROWS(...) ROWS_PAIRED(BF16_WORDS, HALVES, __VA_ARGS__)

/* rotate(x, out, cos, sin, plan, positions, out_index), the plan being one array of a geometry's integers (made
   once per geometry, so that a call passes seven arguments): ndim, tile, group, rotary, channels, interleaved,
   sign, threads, table_row, then sizes, x_strides, out_strides, table_strides, positions_strides and
   index_strides, six arrays of ndim, then out_seq. Where out_index is given (NULL otherwise; group is then 1),
   each row is written at out's sequence index it holds (OUT_AT), or skipped where that is negative.

   The rows are the dims `sizes` (ndim >= 1, memory order, outermost first) with the strides of x, out and
   the tables. A row's angles are the tables' at the sum of its indices times table_strides, plus, where
   `positions` is given (int64 values, checked by the caller), table_row times the value at the sum of its
   indices times positions_strides: positions (b, s) or (s,), or the first position of each row of b (row
   starts, with table_strides advancing along s). The innermost dim is cut into tiles of `tile` rows and,
   where `group` is GROUP (ndim >= 2, the angles the same along dim ndim - 2, as on the heads of "b h s d"),
   that dim into groups of GROUP indices; a unit of work is one tile at one group of outer indices, and the
   units go tile by tile (every group of outer indices at the first tile, then at the next), so that where
   the caller makes tiles short, the rows of every group read a tile's table rows from the nearest caches.
   Rows that share their angles are rotated GROUP at a time, so the tables come from memory once per GROUP
   rows (once per row, bfloat16 "b h s d" ran at 2x a copy: the tables are twice x's bytes per row).
   The units are shared among `threads` OpenMP threads: those of torch's own pool where the library is built
   with -fopenmp (the process has loaded torch's libgomp), so the loop and torch's operations never compete
   for cores. sign is 1, or -1 to rotate by the negated angles. */
/* The plan's integers, as both loops read them (see _native._plan). */
#define READ_PLAN                                                                                              \
    const int64_t ndim = plan[0], tile = plan[1], rotary = plan[3], channels = plan[4];                       \
    const int64_t interleaved = plan[5], sign = plan[6], threads = plan[7], table_row = plan[8];              \
    const int64_t *sizes = plan + 9, *x_strides = sizes + ndim, *out_strides = x_strides + ndim;              \
    const int64_t *table_strides = out_strides + ndim, *positions_strides = table_strides + ndim;             \
    const int64_t inner = ndim - 1, half = rotary / 2;                                                        \
    const int64_t x_in = x_strides[inner], out_in = out_strides[inner], table_in = table_strides[inner];       \
    const int64_t positions_in = positions_strides[inner];                                                    \
    const int64_t *index_strides = positions_strides + ndim, out_seq = index_strides[ndim];                   \
    const int64_t index_in = index_strides[inner];

/* A unit's offsets into x, out, the tables, the positions and the out_index, moved by index i along dim d. */
#define ADVANCE(i, d)                                                                                          \
    x_at += (i) * x_strides[d];                                                                              \
    out_at += (i) * out_strides[d];                                                                          \
    table_at += (i) * table_strides[d];                                                                      \
    positions_at += (i) * positions_strides[d];                                                              \
    index_at += (i) * index_strides[d];

/* The plan's units: `units` of them, `outer` groups of outer indices at each tile (a group of `group` indices of
   the grouped dim counting as one), and the grouped dim's size and strides (mids, x_mid, out_mid) */
#define READ_UNITS                                                                                            \
    const int64_t group = plan[2];                                                                            \
    const int64_t mids = group > 1 ? sizes[inner - 1] : 1, per_mid = (mids + group - 1) / group;             \
    const int64_t x_mid = group > 1 ? x_strides[inner - 1] : 0;                                               \
    const int64_t out_mid = group > 1 ? out_strides[inner - 1] : 0;                                           \
    int64_t outer = 1;                                                                                        \
    for (int64_t d = 0; d < inner; ++d)                                                                       \
        outer *= d == inner - 1 && group > 1 ? per_mid : sizes[d];                                            \
    const int64_t units = outer * ((sizes[inner] + tile - 1) / tile);

/* Unit `unit`: its first row along the innermost dim and its count there, its rows along the grouped dim (`rows`,
   1 where there is no group) and its offsets into x, out, the tables, the positions and the out_index */
#define UNIT_AT(unit)                                                                                         \
    const int64_t first = (unit) / outer * tile;                                                              \
    const int64_t count = sizes[inner] - first < tile ? sizes[inner] - first : tile;                         \
    int64_t rest = (unit) % outer, rows = 1;                                                                  \
    int64_t x_at = first * x_in, out_at = first * out_in, table_at = first * table_in;                        \
    int64_t positions_at = first * positions_in, index_at = first * index_in;                                 \
    for (int64_t d = inner - 1; d >= 0; --d) {                                                               \
        int64_t i;                                                                                            \
        if (d == inner - 1 && group > 1) {                                                                    \
            i = rest % per_mid * group;                                                                       \
            rows = mids - i < group ? mids - i : group;                                                       \
            rest /= per_mid;                                                                                  \
        } else {                                                                                              \
            i = rest % sizes[d];                                                                              \
            rest /= sizes[d];                                                                                 \
        }                                                                                                     \
        ADVANCE(i, d)                                                                                         \
    }

#define GROUP 4
#define DEFINE_ROTATE(NAME, T, C, LOAD, STORE, ROWS)                                                           \
    void NAME(const T *x, T *out, const C *cos, const C *sin, const int64_t *plan, const int64_t *positions,   \
              const int64_t *out_index) {                                                                     \
        READ_PLAN                                                                                           \
        READ_UNITS                                                                                          \
        (void)threads;                                                                                      \
        _Pragma("omp parallel for schedule(static) num_threads(threads) if (threads > 1)")                  \
        for (int64_t unit = 0; unit < units; ++unit) {                                                      \
            UNIT_AT(unit)                                                                                   \
            int64_t row = 0;                                                                                \
            if (rows == GROUP) /* GROUP indices of the grouped dim at each index of the innermost */         \
                for (; row < count; ++row)                                                                  \
                    ROWS(T, C, LOAD, STORE, GROUP, x_at + row * x_in, out_at + row * out_in,                \
                         ANGLES_AT(row), x_mid, out_mid)                                                    \
            else if (table_in == 0 && positions_in == 0 && !out_index) /* rows that share their angles */    \
                for (; row + GROUP <= count; row += GROUP)                                                  \
                    ROWS(T, C, LOAD, STORE, GROUP, x_at + row * x_in, out_at + row * out_in, ANGLES_AT(0),  \
                         x_in, out_in)                                                                      \
            for (; row < count; ++row) {                                                                    \
                if (SKIPPED(row))                                                                           \
                    continue;                                                                               \
                for (int64_t r = 0; r < rows; ++r)                                                          \
                    ROWS(T, C, LOAD, STORE, 1, x_at + row * x_in + r * x_mid, OUT_AT(row) + r * out_mid,    \
                         ANGLES_AT(row), 0, 0)                                                              \
            }                                                                                               \
        }                                                                                                   \
    }

#define NORM_BLOCK 8 /* the norm's rows at a time (see DEFINE_NORM_ROTATE) */

/* Where in out the unit's row `row` goes: with out_index (int64, values checked by the caller), at the
   sequence index it holds for the row (out_seq, out's stride along the sequence, times it; out_strides are 0
   along the sequence then), and a negative index skips the row. */
#define OUT_AT(row) (out_at + (row) * out_in + (out_index ? out_index[index_at + (row) * index_in] * out_seq : 0))
#define SKIPPED(row) (out_index && out_index[index_at + (row) * index_in] < 0)

/* Where in the tables the angles of the unit's row `row` (along the innermost dim) are. */
#define ANGLES_AT(row)                                                                                        \
    (table_at + (row) * table_in + (positions ? positions[positions_at + (row) * positions_in] * table_row : 0))

#ifdef __F16C__ /* the CPU converts float16 eight at a time */
#include <immintrin.h>

static inline __m256 f16x8_load(const uint16_t *h) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h)); }

static inline void f16x8_store(uint16_t *h, __m256 f) {
    _mm_storeu_si128((__m128i *)h, _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT));
}

/* float16 pairs of halves with those instructions (what torch's own conversions use, so the same bits): eight
   pairs converted, rotated and converted back at a time, the products and sums rounded as on every path
   (multiplies and adds by intrinsics are never contracted); the last n % 8 on the bits. Element by element on
   the bits, the conversions cost three times the rotation. */
#define F16C_HALVES(T, C, LOAD, STORE, G, n)                                                                  \
    for (int64_t g = 0; g < (G); ++g) {                                                                     \
        const uint16_t *xg = xr + g * x_step;                                                               \
        uint16_t *og = o + g * out_step;                                                                    \
        int64_t j = 0;                                                                                      \
        for (; j + 8 <= (n); j += 8) {                                                                      \
            const __m256 cj = _mm256_loadu_ps(c + j);                                                       \
            const __m256 sj = _mm256_mul_ps(_mm256_loadu_ps(s + j), _mm256_set1_ps((float)sign));           \
            const __m256 a = f16x8_load(xg + j), b = f16x8_load(xg + j + (n));                              \
            f16x8_store(og + j, _mm256_sub_ps(_mm256_mul_ps(a, cj), _mm256_mul_ps(b, sj)));                 \
            f16x8_store(og + j + (n), _mm256_add_ps(_mm256_mul_ps(b, cj), _mm256_mul_ps(a, sj)));           \
        }                                                                                                   \
        for (; j < (n); ++j) {                                                                              \
            const float cj = c[j], sj = s[j] * (float)sign, a = f16_load(xg[j]), b = f16_load(xg[j + (n)]);  \
            og[j] = f16_store(a * cj - b * sj);                                                             \
            og[j + (n)] = f16_store(b * cj + a * sj);                                                       \
        }                                                                                                   \
    }

/* float16 pairs side by side: four pairs (eight channels) at a time in one register. A channel's partner is
   its neighbour (a swap within each pair), and each angle goes to both channels of its pair, the sine negated
   for the first: (a c + b (-s), b c + a s), the roundings of (a c - b s, b c + a s). The angles are spread so
   once for the G rows. Through a float32 buffer of the rows, in place took 1.3x as long. */
#define F16C_SIDE_BY_SIDE(T, C, LOAD, STORE, G, n)                                                            \
    {                                                                                                       \
        float spread_c[2 * (n)], spread_s[2 * (n)];                                                         \
        for (int64_t j = 0; j < (n); ++j) {                                                                 \
            spread_c[2 * j] = spread_c[2 * j + 1] = c[j];                                                   \
            spread_s[2 * j + 1] = s[j] * (float)sign;                                                       \
            spread_s[2 * j] = -spread_s[2 * j + 1];                                                         \
        }                                                                                                   \
        for (int64_t g = 0; g < (G); ++g) {                                                                 \
            const uint16_t *xg = xr + g * x_step;                                                           \
            uint16_t *og = o + g * out_step;                                                                \
            int64_t j = 0;                                                                                  \
            for (; j + 8 <= 2 * (n); j += 8) {                                                              \
                const __m256 v = f16x8_load(xg + j), partners = _mm256_permute_ps(v, 0xb1);                 \
                f16x8_store(og + j, _mm256_add_ps(_mm256_mul_ps(v, _mm256_loadu_ps(spread_c + j)),          \
                                                  _mm256_mul_ps(partners, _mm256_loadu_ps(spread_s + j))));  \
            }                                                                                               \
            for (; j < 2 * (n); j += 2) {                                                                   \
                const float a = f16_load(xg[j]), b = f16_load(xg[j + 1]);                                   \
                og[j] = f16_store(a * spread_c[j] + b * spread_s[j]);                                       \
                og[j + 1] = f16_store(b * spread_c[j + 1] + a * spread_s[j + 1]);                           \
            }                                                                                               \
        }                                                                                                   \
    }
#define F16_ROWS(...) ROWS_PAIRED(F16C_SIDE_BY_SIDE, F16C_HALVES, __VA_ARGS__)
#else
#define F16_ROWS ROWS
#endif

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
/* bfloat16 with AVX-512 BF16: the CPU rounds sixteen float32 to bfloat16 in one instruction (vcvtneps2bf16), to
   nearest even as torch's rule, except that it reads subnormal float32 as zero: a subnormal comes out as a zero
   where the rule may give a bfloat16 subnormal, so the lanes that come out zero (one test for thirty-two lanes)
   are rounded on the bits instead, and the result is every other path's, bit for bit. A NaN stays a NaN, quiet,
   with its sign and the top of its payload (torch's own CPU kernels write 0xffff, its scalar conversion 0x7fc0:
   a NaN's bits are no path's promise). Rounding on the bits took about ten operations per vector, more than the
   rotation itself: with the instruction, the rotation of bfloat16 rows held in cache (one core, 16 tokens of 32
   heads of 128) went from 0.117 to 0.075 ns an element (to 0.083 while each float32 vector was classified,
   subnormal or NaN, rather than the zeros tested). */
#include <immintrin.h>
#define ALWAYS_INLINE __attribute__((always_inline)) /* where constants make them short: n, sign, gain_a */

static inline __m512 bf16x16_load(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* torch's rule on the bits, as bf16_store, for finite and infinite numbers: lanes the instruction flushed */
static inline __m256i bf16x16_round_bits(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i biased = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd);
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(biased, 16));
}

/* sixteen float32 -> sixteen bfloat16 */
static inline __m256i bf16x16_round(__m512 v) {
    const __m256i fast = (__m256i)_mm512_cvtneps_pbh(v);
    const __mmask16 zeros = _mm256_testn_epi16_mask(fast, _mm256_set1_epi16(0x7fff));
    if (__builtin_expect(zeros != 0, 0))
        return _mm256_mask_mov_epi16(fast, zeros, bf16x16_round_bits(v));
    return fast;
}

/* thirty-two float32 (low, then high) -> thirty-two bfloat16 in that order */
static inline __m512i bf16x32_round(__m512 low, __m512 high) {
    const __m512i fast = (__m512i)_mm512_cvtne2ps_pbh(high, low);
    const __mmask32 zeros = _mm512_testn_epi16_mask(fast, _mm512_set1_epi16(0x7fff));
    if (__builtin_expect(zeros != 0, 0)) {
        const __m512i bits = _mm512_inserti64x4(_mm512_castsi256_si512(bf16x16_round_bits(low)),
                                                bf16x16_round_bits(high), 1);
        return _mm512_mask_mov_epi16(fast, zeros, bits);
    }
    return fast;
}

/* bfloat16 rows' sums of squares (bf16x_sums): sixty-four channels at a time in two vectors of sixteen partial sums
   by bfloat16 dot products (vdpbf16ps: each lane adds the squares of two channels, the products exact, each sum
   rounded to float32 as a fused multiply-add rounds it), each row's partials folded to eight, and the eight rows'
   added across in one vector (horizontal adds): the same order for a row whatever the rows beside it, so a
   result's bits do not depend on where its row falls in a block. The dot products read subnormal numbers as zero
   and flush subnormal sums to zero: the squares of subnormal bfloat16 numbers are below float32's smallest, but a
   sum made only of tiny squares could lose a flushed partial, so a row whose sum is below 2^-90 (above it, the
   flushed partials, each below 2^-126, are under the sum's rounding) is summed again as sum_squares_bfloat16 sums
   it. */
static inline float sum_squares_bfloat16(const uint16_t *xr, int64_t channels);

/* Eight rows' partial sums (eight each) added across, in one vector of horizontal adds: sums[k], row k's */
static inline ALWAYS_INLINE void sums_across(const __m256 *partial, float *sums) {
    const __m256 quarters01 = _mm256_hadd_ps(partial[0], partial[1]);
    const __m256 quarters23 = _mm256_hadd_ps(partial[2], partial[3]);
    const __m256 quarters45 = _mm256_hadd_ps(partial[4], partial[5]);
    const __m256 quarters67 = _mm256_hadd_ps(partial[6], partial[7]);
    const __m256 halves0123 = _mm256_hadd_ps(quarters01, quarters23);
    const __m256 halves4567 = _mm256_hadd_ps(quarters45, quarters67);
    _mm256_storeu_ps(sums, _mm256_add_ps(_mm256_permute2f128_ps(halves0123, halves4567, 0x20),
                                         _mm256_permute2f128_ps(halves0123, halves4567, 0x31)));
}

/* A bfloat16 row's two vectors of partial sums of squares; then the channels past whole vectors of thirty-two, and
   the sum made again where it is below 2^-90 */
static inline ALWAYS_INLINE void bf16x_row_partials(const uint16_t *xr, int64_t channels, __m512 *even, __m512 *odd) {
    int64_t j = 0;
    for (; j + 64 <= channels; j += 64) {
        const __m512bh low = (__m512bh)_mm512_loadu_si512(xr + j), high = (__m512bh)_mm512_loadu_si512(xr + j + 32);
        *even = _mm512_dpbf16_ps(*even, low, low);
        *odd = _mm512_dpbf16_ps(*odd, high, high);
    }
    if (j + 32 <= channels) {
        const __m512bh low = (__m512bh)_mm512_loadu_si512(xr + j);
        *even = _mm512_dpbf16_ps(*even, low, low);
    }
}

static inline ALWAYS_INLINE void bf16x_row_rest(const uint16_t *xr, int64_t channels, float *sum) {
    for (int64_t j = channels / 32 * 32; j < channels; ++j) {
        const float v = bf16_load(xr[j]);
        *sum += v * v;
    }
    if (*sum < 0x1p-90f)
        *sum = sum_squares_bfloat16(xr, channels);
}

/* float32 rows' sums of squares, as bf16x_sums adds them: thirty-two channels at a time in two vectors of sixteen
   partial sums by fused multiply-adds, each row's folded to eight, the rows' added across (the sum's order its own:
   the last bit of the norm may differ from torch's, as in every dtype) */
static inline ALWAYS_INLINE void f32x_row_partials(const float *xr, int64_t channels, __m512 *even, __m512 *odd) {
    int64_t j = 0;
    for (; j + 32 <= channels; j += 32) {
        const __m512 low = _mm512_loadu_ps(xr + j), high = _mm512_loadu_ps(xr + j + 16);
        *even = _mm512_fmadd_ps(low, low, *even);
        *odd = _mm512_fmadd_ps(high, high, *odd);
    }
    if (j + 16 <= channels) {
        const __m512 low = _mm512_loadu_ps(xr + j);
        *even = _mm512_fmadd_ps(low, low, *even);
    }
}

static inline ALWAYS_INLINE void f32x_row_rest(const float *xr, int64_t channels, float *sum) {
    for (int64_t j = channels / 16 * 16; j < channels; ++j)
        *sum += xr[j] * xr[j];
}

/* NAME(x, stride, rows, channels, sums): the sums of squares of up to eight rows (row k at x + k * stride), each
   row's two vectors of partial sums (PARTIALS) added and folded to eight, the eight rows' added across
   (sums_across), then the rest of each row (REST); unrolled for head dim 128 (and a whole block of rows) */
#define DEFINE_X_SUMS(NAME, T, PARTIALS, REST)                                                                \
    static inline ALWAYS_INLINE void NAME##_of(const T *x, int64_t stride, int64_t rows, int64_t channels,    \
                                               float *sums) {                                                \
        __m256 partial[8];                                                                                  \
        for (int k = 0; k < 8; ++k)                                                                         \
            partial[k] = _mm256_setzero_ps();                                                               \
        for (int64_t k = 0; k < rows; ++k) {                                                                \
            __m512 even = _mm512_setzero_ps(), odd = even;                                                  \
            PARTIALS(x + k * stride, channels, &even, &odd);                                                \
            const __m512 both = _mm512_add_ps(even, odd);                                                   \
            partial[k] = _mm256_add_ps(_mm512_castps512_ps256(both), _mm512_extractf32x8_ps(both, 1));      \
        }                                                                                                   \
        sums_across(partial, sums);                                                                         \
        for (int64_t k = 0; k < rows; ++k)                                                                  \
            REST(x + k * stride, channels, sums + k);                                                       \
    }                                                                                                       \
    static inline void NAME(const T *x, int64_t stride, int64_t rows, int64_t channels, float *sums) {       \
        if (channels == 128 && rows == NORM_BLOCK)                                                          \
            NAME##_of(x, stride, NORM_BLOCK, 128, sums);                                                    \
        else if (channels == 128)                                                                           \
            NAME##_of(x, stride, rows, 128, sums);                                                          \
        else                                                                                                \
            NAME##_of(x, stride, rows, channels, sums);                                                     \
    }
DEFINE_X_SUMS(bf16x_sums, uint16_t, bf16x_row_partials, bf16x_row_rest)
DEFINE_X_SUMS(f32x_sums, float, f32x_row_partials, f32x_row_rest)

/* What a row's pairs are rotated by: the angles (c, s), and for the fused norm the gains of each pair's first and
   second channel and the row's scale. The norm's rotation is (a (ga c) - b (gb s), b (gb c) + a (ga s)) times
   the scale, the gains folded into the angles: four products, made once for the rows that share their angles
   (`folded`: the heads of one token), or per row in the same roundings (NULL), so a result's bits are the same
   whatever the layout. Its bits are its own (its sum of squares is added in its own order) and it rounds a (ga c)
   and b (gb c) once with the sum (fused multiply-adds); the rotation alone rounds each product and sum, as every
   path does. Folded, a vector of pairs is normalised and rotated in six operations, as the rotation alone takes,
   not ten. */
typedef struct {
    const float *c, *s, *gain_a, *gain_b, *folded;
    float scale;
} bf16x_angles;

#define BF16X_FOLDED 128 /* the most pairs whose folded angles a unit keeps (head dims up to 256) */

/* folded = ga c, gb s, gb c, ga s (each n long), the sines times sign */
static inline void bf16x_fold(const bf16x_angles *r, int64_t n, float sign, float *folded) {
    for (int64_t j = 0; j < n; ++j) {
        const float s = r->s[j] * sign;
        folded[j] = r->gain_a[j] * r->c[j];
        folded[n + j] = r->gain_b[j] * s;
        folded[2 * n + j] = r->gain_b[j] * r->c[j];
        folded[3 * n + j] = r->gain_a[j] * s;
    }
}

/* Sixteen pairs (a, b) from j rotated, sign 1 or -1 (a constant where inlined: the rotation spends nothing on it) */
static inline ALWAYS_INLINE void bf16x_rotate16(__m512 a, __m512 b, const bf16x_angles *r, int64_t n, int64_t j,
                                               float sign, __m512 *first, __m512 *second) {
    const __m512 c = _mm512_loadu_ps(r->c + j);
    __m512 s = _mm512_loadu_ps(r->s + j);
    if (sign != 1.0f)
        s = _mm512_mul_ps(s, _mm512_set1_ps(sign));
    if (!r->gain_a) {
        *first = _mm512_sub_ps(_mm512_mul_ps(a, c), _mm512_mul_ps(b, s));
        *second = _mm512_add_ps(_mm512_mul_ps(b, c), _mm512_mul_ps(a, s));
        return;
    }
    __m512 ac, bs, bc, as;
    if (r->folded) {
        ac = _mm512_loadu_ps(r->folded + j), bs = _mm512_loadu_ps(r->folded + n + j);
        bc = _mm512_loadu_ps(r->folded + 2 * n + j), as = _mm512_loadu_ps(r->folded + 3 * n + j);
    } else {
        const __m512 ga = _mm512_loadu_ps(r->gain_a + j), gb = _mm512_loadu_ps(r->gain_b + j);
        ac = _mm512_mul_ps(ga, c), bs = _mm512_mul_ps(gb, s), bc = _mm512_mul_ps(gb, c), as = _mm512_mul_ps(ga, s);
    }
    const __m512 scale = _mm512_set1_ps(r->scale);
    *first = _mm512_mul_ps(_mm512_fmsub_ps(a, ac, _mm512_mul_ps(b, bs)), scale);
    *second = _mm512_mul_ps(_mm512_fmadd_ps(b, bc, _mm512_mul_ps(a, as)), scale);
}

/* One pair, as bf16x_rotate16 rotates each of its sixteen */
static inline ALWAYS_INLINE void bf16x_rotate1(float a, float b, const bf16x_angles *r, int64_t j, float sign,
                                              uint16_t *first, uint16_t *second) {
    const float c = r->c[j], s = r->s[j] * sign;
    if (!r->gain_a) {
        *first = bf16_store(a * c - b * s);
        *second = bf16_store(b * c + a * s);
        return;
    }
    const float ga = r->gain_a[j], gb = r->gain_b[j], scale = r->scale;
    *first = bf16_store(NORM_FIRST(float, a, b, ga, gb, c, s));
    *second = bf16_store(NORM_SECOND(float, a, b, ga, gb, c, s));
}

/* One row's pairs (j, j + n), n of them, thirty-two and sixteen at a time. Rows are read before they are
   written, so o may be xr. */
static inline ALWAYS_INLINE void bf16x_halves(const uint16_t *xr, uint16_t *o, int64_t n, const bf16x_angles *r,
                                             float sign) {
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) {
        __m512 first0, second0, first1, second1;
        bf16x_rotate16(bf16x16_load(xr + j), bf16x16_load(xr + j + n), r, n, j, sign, &first0, &second0);
        bf16x_rotate16(bf16x16_load(xr + j + 16), bf16x16_load(xr + j + 16 + n), r, n, j + 16, sign, &first1,
                       &second1);
        _mm512_storeu_si512(o + j, bf16x32_round(first0, first1));
        _mm512_storeu_si512(o + j + n, bf16x32_round(second0, second1));
    }
    for (; j + 16 <= n; j += 16) {
        __m512 first, second;
        bf16x_rotate16(bf16x16_load(xr + j), bf16x16_load(xr + j + n), r, n, j, sign, &first, &second);
        _mm256_storeu_si256((__m256i *)(o + j), bf16x16_round(first));
        _mm256_storeu_si256((__m256i *)(o + j + n), bf16x16_round(second));
    }
    for (; j < n; ++j)
        bf16x_rotate1(bf16_load(xr[j]), bf16_load(xr[j + n]), r, j, sign, o + j, o + j + n);
}

/* One row's pairs side by side (2j, 2j + 1), sixteen at a time: each pair a 32-bit word, its channels the word
   shifted or masked (as BF16_WORDS), the results rounded into one vector of first channels then second ones and
   put back side by side by one permutation. */
static inline ALWAYS_INLINE void bf16x_words(const uint16_t *xr, uint16_t *o, int64_t n, const bf16x_angles *r,
                                            float sign) {
    const __m512i side_by_side = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                  23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        const __m512i words = _mm512_loadu_si512(xr + 2 * j);
        const __m512 a = _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));
        const __m512 b = _mm512_castsi512_ps(_mm512_and_si512(words, _mm512_set1_epi32((int)0xffff0000u)));
        __m512 first, second;
        bf16x_rotate16(a, b, r, n, j, sign, &first, &second);
        _mm512_storeu_si512(o + 2 * j, _mm512_permutexvar_epi16(side_by_side, bf16x32_round(first, second)));
    }
    for (; j < n; ++j)
        bf16x_rotate1(bf16_load(xr[2 * j]), bf16_load(xr[2 * j + 1]), r, j, sign, o + 2 * j, o + 2 * j + 1);
}

/* float32 pairs of halves of a row of head dim 128, normalised and rotated (bf16x_halves's, without conversions) */
static inline ALWAYS_INLINE void f32x_halves(const float *xr, float *o, int64_t n, const bf16x_angles *r, float sign) {
    for (int64_t j = 0; j < n; j += 16) {
        __m512 first, second;
        bf16x_rotate16(_mm512_loadu_ps(xr + j), _mm512_loadu_ps(xr + j + n), r, n, j, sign, &first, &second);
        _mm512_storeu_ps(o + j, first);
        _mm512_storeu_ps(o + j + n, second);
    }
}

/* The norm's common unit (below) asks for the lines of x a row's bytes at PREFETCH_AHEAD past each
   row it starts (a prefetch: never a fault, past the end of x or not). The CPU's own stream prefetchers stop at
   each 4 KiB page; asked a page ahead, the next page is on its way while this one is rotated: Qwen3's q and k in
   bfloat16 at 2,048 tokens, two threads, in C, 1.11-1.28x -> 1.03-1.06x a copy, with any offsets of q, k and
   their outs modulo 4 KiB (2 KiB ahead: 1.09-1.10x; 8 KiB: 1.06x). The general loop, asking the same, ran no
   faster: its per-row work, not memory, held it. */
#define PREFETCH_AHEAD 4096
static inline void prefetch_ahead(const void *row, int64_t bytes) {
    for (int64_t line = 0; line < bytes; line += 64)
        __builtin_prefetch((const char *)row + PREFETCH_AHEAD + line, 0, 3);
}

/* NAME(x, x_in, out, out_in, count, folded, folded_in, eps): `count` rows of head dim 128, their pairs those of
   HALVES (bf16x_halves, f32x_halves: pairs of halves; bf16x_words: side by side), row r written at
   out + r * out_in, rotated by the folded angles (bf16x_fold) at folded + r * folded_in: the common cases, as
   DEFINE_NORM_ROTATE runs them, without its per-row lookups of positions, out_index, angles and pairing: the same
   operations, so the same bits, in less time. folded_in 0: rows that share their angles (a token's heads,
   "b s h d"; one core, bfloat16: Qwen3's q held in cache 0.129 -> 0.102 ns an element, at 2,048 tokens 5-10%
   less); 256: a run of tokens of one head ("b h s d"), their angles folded once for all the unit's heads
   (X_NORM_UNIT). The scales of up to NORM_BLOCK rows, 1 / sqrt(sum / 128 + eps), as SCALES computes them, the
   next block's before this block's pairs. */
#define DEFINE_NORM_UNIT128(NAME, T, SUMS, HALVES)                                                            \
    static inline ALWAYS_INLINE void NAME##_scales(const T *x, int64_t stride, int64_t rows, float eps,       \
                                                   float *scales) {                                          \
        for (int r = 0; r < NORM_BLOCK; ++r)                                                                \
            scales[r] = 0;                                                                                  \
        SUMS(x, stride, rows, 128, scales);                                                                 \
        for (int r = 0; r < NORM_BLOCK; ++r)                                                                \
            scales[r] = 1.0f / sqrtf(scales[r] / 128.0f + eps);                                             \
    }                                                                                                       \
    static void NAME(const T *x, int64_t x_in, T *out, int64_t out_in, int64_t count, const float *folded,    \
                     int64_t folded_in, float eps) {                                                        \
        float scales[NORM_BLOCK], next[NORM_BLOCK];                                                         \
        bf16x_angles angles = {folded, folded, folded, folded, folded, 1.0f};                               \
        NAME##_scales(x, x_in, count < NORM_BLOCK ? count : NORM_BLOCK, eps, next);                         \
        for (int64_t block = 0; block < count; block += NORM_BLOCK) {                                       \
            const int64_t rows = count - block < NORM_BLOCK ? count - block : NORM_BLOCK;                   \
            const int64_t from = block + NORM_BLOCK;                                                        \
            memcpy(scales, next, sizeof scales);                                                            \
            if (from < count)                                                                               \
                NAME##_scales(x + from * x_in, x_in, count - from < NORM_BLOCK ? count - from : NORM_BLOCK, eps, \
                              next);                                                                        \
            for (int64_t r = 0; r < rows; ++r) {                                                            \
                prefetch_ahead(x + (block + r) * x_in, 128 * sizeof(T));                                     \
                angles.folded = folded + (block + r) * folded_in;                                           \
                angles.scale = scales[r];                                                                   \
                HALVES(x + (block + r) * x_in, out + (block + r) * out_in, 64, &angles, 1.0f);               \
            }                                                                                               \
        }                                                                                                   \
    }
DEFINE_NORM_UNIT128(bf16x_norm_unit128, uint16_t, bf16x_sums, bf16x_halves)
DEFINE_NORM_UNIT128(bf16x_norm_unit128_words, uint16_t, bf16x_sums, bf16x_words)
DEFINE_NORM_UNIT128(f32x_norm_unit128, float, f32x_sums, f32x_halves)

/* The folded angles (bf16x_fold) of 64 pairs at c, s */
static inline void fold64(const float *c, const float *s, const float *gain_a, const float *gain_b, float sign,
                          float *folded) {
    const bf16x_angles angles = {c, s, gain_a, gain_b, NULL, 1.0f};
    bf16x_fold(&angles, 64, sign, folded);
}

/* DEFINE_NORM_ROTATE's unit, where it is a common case (head dim 128, no out_index; pairs side by side where there
   is a unit for them, WORDS128: bfloat16, 1.50x -> 1.17x a copy at Qwen3's prefill), by HALVES128 or WORDS128:
   rows that share their angles (a token's heads, "b s h d"), their angles folded once; or rows along the innermost
   dim with angles of their own at each of the unit's `rows` indices of the grouped dim (a tile of tokens at every
   head, "b h s d"), the angles of TILE_FOLDED tokens folded once for all the heads. Folding each row's own angles,
   as the general loop does, Qwen3's q and k in bfloat16 "b h s d" at 2,048 tokens, two threads, in C, took
   1.66-1.72x a copy; folded once per tile of 16 tokens, 1.15-1.17x (32: 1.22-1.25x; the folded angles of a tile,
   1 KiB a token, are read again for every head, from L1 where they fit). */
#define TILE_FOLDED 16
#define X_NORM_UNIT(HALVES128, WORDS128)                                                                      \
    __typeof__(&HALVES128) const unit128 = interleaved ? WORDS128 : HALVES128;                              \
    if (unit128 && !out_index && half == 64 && channels == 128) {                                            \
        if (table_in == 0 && positions_in == 0) {                                                           \
            float folded[4 * 64];                                                                           \
            fold64(cos + ANGLES_AT(0), sin + ANGLES_AT(0), gain_a, gain_b, (float)sign, folded);            \
            for (int64_t g = 0; g < rows; ++g)                                                              \
                unit128(x + x_at + g * x_mid, x_in, out + out_at + g * out_mid, out_in, count, folded, 0,   \
                        (float)eps);                                                                        \
            continue;                                                                                       \
        }                                                                                                   \
        float folded[TILE_FOLDED * 4 * 64];                                                                 \
        for (int64_t from = 0; from < count; from += TILE_FOLDED) {                                         \
            const int64_t tokens = count - from < TILE_FOLDED ? count - from : TILE_FOLDED;                 \
            for (int64_t t = 0; t < tokens; ++t)                                                            \
                fold64(cos + ANGLES_AT(from + t), sin + ANGLES_AT(from + t), gain_a, gain_b, (float)sign,   \
                       folded + t * 4 * 64);                                                                \
            for (int64_t g = 0; g < rows; ++g)                                                              \
                unit128(x + x_at + g * x_mid + from * x_in, x_in, out + out_at + g * out_mid + from * out_in, \
                        out_in, tokens, folded, 4 * 64, (float)eps);                                        \
        }                                                                                                   \
        continue;                                                                                           \
    }

/* ROW with sign a constant */
#define BF16X_SIGNED(ROW, ...)                                                                                \
    if (sign == 1)                                                                                          \
        ROW(__VA_ARGS__, 1.0f);                                                                             \
    else                                                                                                    \
        ROW(__VA_ARGS__, -1.0f);

/* G rows, as PAIRS */
#define BF16X_ROWS_OF(ROW, G, n)                                                                              \
    {                                                                                                       \
        const bf16x_angles angles = {c, s, NULL, NULL, NULL, 1.0f};                                         \
        for (int64_t g = 0; g < (G); ++g) {                                                                 \
            BF16X_SIGNED(ROW, xr + g * x_step, o + g * out_step, n, &angles)                                 \
        }                                                                                                   \
    }
#define BF16X_HALVES(T, C, LOAD, STORE, G, n) BF16X_ROWS_OF(bf16x_halves, G, n)
#define BF16X_WORDS(T, C, LOAD, STORE, G, n) BF16X_ROWS_OF(bf16x_words, G, n)
#undef BF16_ROWS
#define BF16_ROWS(...) ROWS_PAIRED(BF16X_WORDS, BF16X_HALVES, __VA_ARGS__)

/* A normalised row (as NORM_PAIRS), its angles folded once for the unit's rows where they all share them */
#define BF16X_NORM_STATE                                                                                      \
    float folded[4 * BF16X_FOLDED];                                                                         \
    const float *folded_from = NULL;                                                                        \
    const int fold_once = table_in == 0 && positions_in == 0 && half <= BF16X_FOLDED;
#define BF16X_NORM_ROW(ROW, n)                                                                                \
    {                                                                                                       \
        bf16x_angles angles = {c, s, gain_a, gain_b, NULL, scale};                                          \
        if (fold_once) {                                                                                    \
            if (folded_from != c) {                                                                         \
                bf16x_fold(&angles, half, (float)sign, folded);                                             \
                folded_from = c;                                                                            \
            }                                                                                               \
            angles.folded = folded;                                                                         \
        }                                                                                                   \
        BF16X_SIGNED(ROW, xr, o, n, &angles)                                                                 \
    }
#define BF16_NORM_HALVES(T, C, LOAD, STORE, n) BF16X_NORM_ROW(bf16x_halves, n)
#define BF16_NORM_SIDE_BY_SIDE(T, C, LOAD, STORE, n) BF16X_NORM_ROW(bf16x_words, n)
#define BF16_NORM_STATE BF16X_NORM_STATE
#define BF16_NORM_UNIT X_NORM_UNIT(bf16x_norm_unit128, bf16x_norm_unit128_words)
#define F32_NORM_UNIT X_NORM_UNIT(f32x_norm_unit128, NULL)
#define F32_SUMS f32x_sums
#define BF16_SUMS bf16x_sums
#endif

DEFINE_ROTATE(rotate_float32, float, float, IDENTITY, IDENTITY, ROWS)
DEFINE_ROTATE(rotate_float64, double, double, IDENTITY, IDENTITY, ROWS)
DEFINE_ROTATE(rotate_bfloat16, uint16_t, float, bf16_load, bf16_store, BF16_ROWS)
DEFINE_ROTATE(rotate_float16, uint16_t, float, f16_load, f16_store, F16_ROWS)

/* The norm's weight, read where the caller keeps it in its own dtype (kind 0 float32, 1 float64, 2 bfloat16, 3
   float16), as a double (exact for each). */
static double weight_at(const void *weight, int64_t kind, int64_t i) {
    switch (kind) {
    case 0:
        return ((const float *)weight)[i];
    case 1:
        return ((const double *)weight)[i];
    case 2:
        return bf16_load(((const uint16_t *)weight)[i]);
    default:
        return f16_load(((const uint16_t *)weight)[i]);
    }
}

/* norm_rotate(x, out, cos, sin, plan, positions, out_index, weight, weight_kind, offset, eps): the QK-norm then the
   rotation, one pass over each row: its sum of squares in the compute type (sum_squares_*, added in a fixed
   order), scale = 1 / sqrt(sum / channels + eps), then each pair's channels loaded again (from L1), times scale
   times their gain (offset + weight, in the compute type), rotated (a c - b s, b c + a s) and rounded once; the
   tail past `rotary` is stored normalised. The plan is rotate's, with group 1. The sum's order is not torch's,
   so the norm's last bit may differ from the eager path's.

   The gains are split once per call into those of each pair's first and second channel, so that the pairs read them
   at unit stride as they read the angles: the loop over pairs is then the rotation's, which the compiler
   vectorises (through a float buffer of the normalised row, with the gains read two apart where pairs sit side
   by side, bfloat16 ran at 3x a copy). */
#define NORM_PAIRS(T, C, LOAD, STORE, n, first, second)                                                       \
    _Pragma("GCC ivdep") for (int64_t j = 0; j < (n); ++j) {                                                  \
        const C cj = c[j], sj = s[j] * (C)sign, ga = gain_a[j], gb = gain_b[j];                             \
        const C a = LOAD(xr[first]), b = LOAD(xr[second]);                                                  \
        o[first] = STORE(NORM_FIRST(C, a, b, ga, gb, cj, sj));                                              \
        o[second] = STORE(NORM_SECOND(C, a, b, ga, gb, cj, sj));                                            \
    }
#define NORM_SIDE_BY_SIDE(T, C, LOAD, STORE, n) NORM_PAIRS(T, C, LOAD, STORE, n, 2 * j, 2 * j + 1)
#define NORM_HALVES(T, C, LOAD, STORE, n) NORM_PAIRS(T, C, LOAD, STORE, n, j, j + (n))

/* bfloat16 pairs side by side as 32-bit words, as BF16_WORDS reads them. */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define BF16_NORM_WORDS(T, C, LOAD, STORE, n)                                                                 \
    _Pragma("GCC ivdep") for (int64_t j = 0; j < (n); ++j) {                                                  \
        const float cj = c[j], sj = s[j] * (float)sign;                                                     \
        uint32_t word;                                                                                      \
        memcpy(&word, xr + 2 * j, sizeof word);                                                             \
        const float a = float_bits(word << 16), b = float_bits(word & 0xffff0000u), ga = gain_a[j], gb = gain_b[j]; \
        word = (uint32_t)bf16_store(NORM_FIRST(float, a, b, ga, gb, cj, sj)) |                              \
               (uint32_t)bf16_store(NORM_SECOND(float, a, b, ga, gb, cj, sj)) << 16;                        \
        memcpy(o + 2 * j, &word, sizeof word);                                                              \
    }
#else
#define BF16_NORM_WORDS NORM_SIDE_BY_SIDE
#endif
#ifndef BF16_NORM_HALVES /* without AVX-512 BF16 (which has its own, above) */
#define BF16_NORM_HALVES NORM_HALVES
#define BF16_NORM_SIDE_BY_SIDE BF16_NORM_WORDS
#define BF16_SUMS sums_bfloat16
#define BF16_NORM_STATE
#define BF16_NORM_UNIT
#define F32_NORM_UNIT
#define F32_SUMS sums_float32
#endif

#define NORM_PAIRING(SIDE_BY_SIDE_PAIRS, HALVES_PAIRS, T, C, LOAD, STORE, n)                                  \
    if (interleaved)                                                                                        \
        SIDE_BY_SIDE_PAIRS(T, C, LOAD, STORE, n)                                                            \
    else                                                                                                    \
        HALVES_PAIRS(T, C, LOAD, STORE, n)

/* A row's sum of squares in the compute type. float32 compute (float32, bfloat16, float16 rows): sixteen
   partial sums in two vectors of eight lanes, added in a fixed order (one chain of vector additions, or
   partials the compiler split into four-lane halves, held the row at half the speed); bfloat16 rows are read
   as 32-bit words of two channels, whose halves shifted or masked are the float32 bits (widening eight
   channels at a time is a shuffle, on the port the stores' packing needs too: 10% slower); float64: eight
   partial sums. */
#if defined(__GNUC__) && !defined(__clang__) /* static functions: no ABI to keep, whatever the vector flags */
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
typedef float f32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

static inline f32x8 float_load8(const float *p) {
    f32x8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline f32x8 f16_load8(const uint16_t *p) {
#ifdef __F16C__
    const __m256 converted = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    f32x8 v;
    memcpy(&v, &converted, sizeof v);
    return v;
#else
    f32x8 v;
    for (int k = 0; k < 8; ++k)
        v[k] = f16_load(p[k]);
    return v;
#endif
}

#define DEFINE_SUM_SQUARES(NAME, T, LOAD, LOAD8)                                                              \
    static inline float NAME(const T *xr, int64_t channels) {                                               \
        f32x8 first = {0, 0, 0, 0, 0, 0, 0, 0}, second = first;                                            \
        int64_t j = 0;                                                                                      \
        for (; j + 16 <= channels; j += 16) {                                                              \
            const f32x8 a = LOAD8(xr + j), b = LOAD8(xr + j + 8);                                           \
            first += a * a;                                                                                 \
            second += b * b;                                                                                \
        }                                                                                                   \
        if (j + 8 <= channels) {                                                                            \
            const f32x8 a = LOAD8(xr + j);                                                                  \
            first += a * a;                                                                                 \
            j += 8;                                                                                         \
        }                                                                                                   \
        first += second;                                                                                    \
        float sum = ((first[0] + first[1]) + (first[2] + first[3])) + ((first[4] + first[5]) + (first[6] + first[7])); \
        for (; j < channels; ++j) {                                                                         \
            const float v = LOAD(xr[j]);                                                                    \
            sum += v * v;                                                                                   \
        }                                                                                                   \
        return sum;                                                                                         \
    }
DEFINE_SUM_SQUARES(sum_squares_float32, float, IDENTITY, float_load8)
DEFINE_SUM_SQUARES(sum_squares_float16, uint16_t, f16_load, f16_load8)

static inline f32x8 float_bits8(const u32x8 *bits) {
    f32x8 v;
    memcpy(&v, bits, sizeof v);
    return v;
}

static inline float sum_squares_bfloat16(const uint16_t *xr, int64_t channels) {
    f32x8 even = {0, 0, 0, 0, 0, 0, 0, 0}, odd = even;
    int64_t j = 0;
    for (; j + 16 <= channels; j += 16) {
        u32x8 words;
        memcpy(&words, xr + j, sizeof words);
        const u32x8 first = words << 16, second = words & 0xffff0000u;
        const f32x8 a = float_bits8(&first), b = float_bits8(&second);
        even += a * a;
        odd += b * b;
    }
    even += odd;
    float sum = ((even[0] + even[1]) + (even[2] + even[3])) + ((even[4] + even[5]) + (even[6] + even[7]));
    for (; j < channels; ++j) {
        const float v = bf16_load(xr[j]);
        sum += v * v;
    }
    return sum;
}

static inline double sum_squares_float64(const double *xr, int64_t channels) {
    double partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t j = 0;
    for (; j + 8 <= channels; j += 8)
        for (int k = 0; k < 8; ++k)
            partial[k] += xr[j + k] * xr[j + k];
    for (; j < channels; ++j)
        partial[0] += xr[j] * xr[j];
    return ((partial[0] + partial[1]) + (partial[2] + partial[3])) + ((partial[4] + partial[5]) + (partial[6] + partial[7]));
}

/* The sums of squares of `rows` rows (at most eight; row k at x + k * stride), one after the other. */
#define DEFINE_SUMS(NAME, T, C, SUM_SQUARES)                                                                  \
    static inline void NAME(const T *x, int64_t stride, int64_t rows, int64_t channels, C *sums) {         \
        for (int64_t k = 0; k < rows; ++k)                                                                  \
            sums[k] = SUM_SQUARES(x + k * stride, channels);                                                \
    }
DEFINE_SUMS(sums_float32, float, float, sum_squares_float32)
DEFINE_SUMS(sums_float64, double, double, sum_squares_float64)
DEFINE_SUMS(sums_bfloat16, uint16_t, float, sum_squares_bfloat16)
DEFINE_SUMS(sums_float16, uint16_t, float, sum_squares_float16)

/* offset + weight in the compute type, as torch computes it (the weight converted, then the offset added): made at
   each call from the weight itself, so nothing of it is remembered between calls; and each pair's first and
   second channel's (gain_a, gain_b) */
#define GAINS(C, weight, weight_kind, offset, channels, half, interleaved, gain, gain_a, gain_b)                \
    for (int64_t j = 0; j < (channels); ++j)                                                                \
        gain[j] = (C)weight_at(weight, weight_kind, j) + (C)(offset);                                       \
    for (int64_t j = 0; j < (half); ++j) {                                                                  \
        gain_a[j] = gain[(interleaved) ? 2 * j : j];                                                        \
        gain_b[j] = gain[(interleaved) ? 2 * j + 1 : j + (half)];                                           \
    }

/* Rows are taken eight at a time: their sums first, then their eight scales in one vector (a square root and a
   division per row, one after the other, held each row for their latency), then their pairs; the next block's
   scales are computed before this block's pairs, so that their chain of latencies (the sums' reductions, a
   division, a square root and a division) runs beside the pairs' work instead of holding it (bfloat16, one core,
   2,048 tokens of 32 heads of 128: 0.23 -> 0.19 ns an element). */
/* The scales of the NORM_BLOCK rows of the unit from `from` (those past its count made from zero sums) */
#define SCALES(C, SQRT, SUMS, from, scales)                                                                   \
    {                                                                                                       \
        const int64_t first_row = (from);                                                                   \
        const int64_t block_rows = count - first_row < NORM_BLOCK ? count - first_row : NORM_BLOCK;         \
        for (int r = 0; r < NORM_BLOCK; ++r)                                                                \
            scales[r] = 0;                                                                                  \
        SUMS(x + x_at + first_row * x_in, x_in, block_rows, channels, scales);                              \
        for (int r = 0; r < NORM_BLOCK; ++r)                                                                \
            scales[r] = (C)1 / SQRT(scales[r] / (C)channels + (C)eps);                                      \
    }
#define DEFINE_NORM_ROTATE(NAME, T, C, LOAD, STORE, SQRT, SIDE_BY_SIDE_PAIRS, HALVES_PAIRS, SUMS, STATE, UNIT) \
    void NAME(const T *x, T *out, const C *cos, const C *sin, const int64_t *plan, const int64_t *positions,   \
              const int64_t *out_index, const void *weight, int64_t weight_kind, double offset, double eps) {    \
        READ_PLAN                                                                                           \
        READ_UNITS                                                                                          \
        C gain[channels], gain_a[half + 1], gain_b[half + 1];                                               \
        GAINS(C, weight, weight_kind, offset, channels, half, interleaved, gain, gain_a, gain_b)             \
        (void)threads;                                                                                      \
        _Pragma("omp parallel for schedule(static) num_threads(threads) if (threads > 1)")                  \
        for (int64_t unit = 0; unit < units; ++unit) {                                                      \
            UNIT_AT(unit)                                                                                   \
            UNIT                                                                                            \
            for (int64_t g = 0; g < rows; ++g, x_at += x_mid, out_at += out_mid) {                          \
                C scales[NORM_BLOCK], next[NORM_BLOCK];                                                     \
                STATE                                                                                       \
                SCALES(C, SQRT, SUMS, 0, next)                                                              \
                for (int64_t block = 0; block < count; block += NORM_BLOCK) {                               \
                    const int64_t in_block = count - block < NORM_BLOCK ? count - block : NORM_BLOCK;       \
                    memcpy(scales, next, sizeof scales);                                                    \
                    if (block + NORM_BLOCK < count)                                                         \
                        SCALES(C, SQRT, SUMS, block + NORM_BLOCK, next)                                     \
                    for (int64_t r = 0; r < in_block; ++r) {                                                \
                        const int64_t row = block + r;                                                      \
                        if (SKIPPED(row))                                                                   \
                            continue;                                                                       \
                        const T *xr = x + x_at + row * x_in;                                                \
                        T *o = out + OUT_AT(row);                                                           \
                        const C *c = cos + ANGLES_AT(row), *s = sin + ANGLES_AT(row), scale = scales[r];    \
                        if (half == 64)                                                                     \
                            NORM_PAIRING(SIDE_BY_SIDE_PAIRS, HALVES_PAIRS, T, C, LOAD, STORE, 64)           \
                        else                                                                                \
                            NORM_PAIRING(SIDE_BY_SIDE_PAIRS, HALVES_PAIRS, T, C, LOAD, STORE, half)         \
                        for (int64_t j = rotary; j < channels; ++j)                                         \
                            o[j] = STORE(LOAD(xr[j]) * scale * gain[j]);                                    \
                    }                                                                                       \
                }                                                                                           \
            }                                                                                               \
        }                                                                                                   \
    }

DEFINE_NORM_ROTATE(norm_rotate_float32, float, float, IDENTITY, IDENTITY, sqrtf, NORM_SIDE_BY_SIDE, NORM_HALVES,
                   F32_SUMS, , F32_NORM_UNIT)
DEFINE_NORM_ROTATE(norm_rotate_float64, double, double, IDENTITY, IDENTITY, sqrt, NORM_SIDE_BY_SIDE, NORM_HALVES,
                   sums_float64, , )
DEFINE_NORM_ROTATE(norm_rotate_bfloat16, uint16_t, float, bf16_load, bf16_store, sqrtf, BF16_NORM_SIDE_BY_SIDE,
                   BF16_NORM_HALVES, BF16_SUMS, BF16_NORM_STATE, BF16_NORM_UNIT)
DEFINE_NORM_ROTATE(norm_rotate_float16, uint16_t, float, f16_load, f16_store, sqrtf, NORM_SIDE_BY_SIDE, NORM_HALVES,
                   sums_float16, , )

/* norm_rotate_pair_*(the eleven arguments of a norm_rotate_* call, then those of a second): both calls in one, so
   that q and k, say, cost one call and (where they run threaded) one parallel region. bfloat16, where both are
   the common case of bf16x_norm_unit128 with one unit per token (a tile of every head) and as many tokens: each
   token's q heads, then its k heads, so the tables' row of a token is read from memory once for both. The
   same units as the two calls, so the same bits. */
#define NORM_ARGUMENTS(T, C, s)                                                                                 \
    const T *x##s, T *out##s, const C *cos##s, const C *sin##s, const int64_t *plan##s, const int64_t *positions##s, \
        const int64_t *out_index##s, const void *weight##s, int64_t weight_kind##s, double offset##s, double eps##s
#define NORM_CALL(s)                                                                                          \
    x##s, out##s, cos##s, sin##s, plan##s, positions##s, out_index##s, weight##s, weight_kind##s, offset##s, eps##s
#define DEFINE_NORM_ROTATE_PAIR(NAME, T, C, TOGETHER)                                                         \
    void NAME##_pair(NORM_ARGUMENTS(T, C, _a), NORM_ARGUMENTS(T, C, _b)) {                                   \
        TOGETHER                                                                                            \
        NAME(NORM_CALL(_a));                                                                                \
        NAME(NORM_CALL(_b));                                                                                \
    }

#ifdef BF16X_FOLDED
/* Whether a plan's call is the common case of DEFINE_NORM_UNIT128, a unit per token: the count of its units, else 0
   (pairs side by side only where `words`, there being a unit for them) */
static int64_t unit128_tokens(const int64_t *plan, const int64_t *out_index, int words) {
    const int64_t ndim = plan[0], inner = ndim - 1, *sizes = plan + 9, *table_strides = sizes + 3 * ndim;
    const int64_t *positions_strides = table_strides + ndim;
    if (out_index || plan[3] != 128 || plan[4] != 128 || (plan[5] && !words) || plan[1] != sizes[inner] ||
        table_strides[inner] || positions_strides[inner])
        return 0;
    int64_t outer = 1;
    for (int64_t d = 0; d < inner; ++d)
        outer *= sizes[d];
    return outer;
}

/* A token's unit of one of the two calls, its pairs of halves by HALVES128, side by side by words128 */
#define PAIR_UNIT128(HALVES128, s)                                                                          \
    {                                                                                                       \
        const int64_t ndim = plan##s[0], inner = ndim - 1, table_row = plan##s[8], *sizes = plan##s + 9;    \
        const int64_t *x_strides = sizes + ndim, *out_strides = x_strides + ndim;                           \
        const int64_t *table_strides = out_strides + ndim, *positions_strides = table_strides + ndim;       \
        int64_t rest = unit, x_at = 0, out_at = 0, table_at = 0, positions_at = 0;                          \
        for (int64_t d = inner - 1; d >= 0; --d) {                                                          \
            const int64_t i = rest % sizes[d];                                                              \
            rest /= sizes[d];                                                                               \
            x_at += i * x_strides[d], out_at += i * out_strides[d], table_at += i * table_strides[d];       \
            positions_at += i * positions_strides[d];                                                       \
        }                                                                                                   \
        if (positions##s)                                                                                   \
            table_at += positions##s[positions_at] * table_row;                                             \
        float folded[4 * 64];                                                                               \
        fold64(cos##s + table_at, sin##s + table_at, gain_a##s, gain_b##s, (float)plan##s[6], folded);      \
        (plan##s[5] ? words128 : HALVES128)(x##s + x_at, x_strides[inner], out##s + out_at, out_strides[inner], \
                                            sizes[inner], folded, 0, (float)eps##s);                        \
    }
#define X_TOGETHER(HALVES128, WORDS128)                                                                     \
    __typeof__(&HALVES128) const words128 = WORDS128;                                                      \
    const int64_t tokens = unit128_tokens(plan_a, out_index_a, words128 != NULL), threads = plan_a[7];     \
    if (tokens && tokens == unit128_tokens(plan_b, out_index_b, words128 != NULL) && threads == plan_b[7]) { \
        float gain_ab[128], gain_a_a[64], gain_b_a[64], gain_bb[128], gain_a_b[64], gain_b_b[64];           \
        GAINS(float, weight_a, weight_kind_a, offset_a, 128, 64, plan_a[5], gain_ab, gain_a_a, gain_b_a)    \
        GAINS(float, weight_b, weight_kind_b, offset_b, 128, 64, plan_b[5], gain_bb, gain_a_b, gain_b_b)    \
        (void)threads;                                                                                      \
        _Pragma("omp parallel for schedule(static) num_threads(threads) if (threads > 1)")                  \
        for (int64_t unit = 0; unit < tokens; ++unit) {                                                     \
            PAIR_UNIT128(HALVES128, _a)                                                                     \
            PAIR_UNIT128(HALVES128, _b)                                                                     \
        }                                                                                                   \
        return;                                                                                             \
    }
#define BF16_TOGETHER X_TOGETHER(bf16x_norm_unit128, bf16x_norm_unit128_words)
#define F32_TOGETHER X_TOGETHER(f32x_norm_unit128, NULL)
#else
#define BF16_TOGETHER
#define F32_TOGETHER
#endif

DEFINE_NORM_ROTATE_PAIR(norm_rotate_float32, float, float, F32_TOGETHER)
DEFINE_NORM_ROTATE_PAIR(norm_rotate_float64, double, double, )
DEFINE_NORM_ROTATE_PAIR(norm_rotate_bfloat16, uint16_t, float, BF16_TOGETHER)
DEFINE_NORM_ROTATE_PAIR(norm_rotate_float16, uint16_t, float, )

/* tables_float32(inv_freq, n, first, rows, cos, sin): the half-width float32 tables of the positions first ..
   first + rows - 1 (rows x n each, row-major): the float64 angles position * inv_freq[i], their cos and sin
   each rounded once to float32, as tables_at's tensor operations compute them (the same bits on 32 million
   angles), in one call: dynamic NTK computes the angles of a decoding step's position on every call. */
void tables_float32(const double *inv_freq, int64_t n, int64_t first, int64_t rows, float *cos_out,
                    float *sin_out) {
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t i = 0; i < n; ++i) {
            const double angle = (double)(first + r) * inv_freq[i];
            cos_out[r * n + i] = (float)cos(angle);
            sin_out[r * n + i] = (float)sin(angle);
        }
}
