/* The rotation as one loop over x in memory order, for CPU tensors (flexrope's "native" backend).

   Each pair (a, b) becomes (a cos - b sin, b cos + a sin), every product and sum rounded in the compute type
   (float32 for half precision, float64 for float64): the rounded operations of the other backends, so the
   bits are theirs. Built with -ffp-contract=off, so no multiply-add is fused.

   x and out are viewed as rows (every dim but the channels, in x's memory order) of `channels` contiguous
   elements; the tables as rows of rotary/2 contiguous angles, strides 0 where they broadcast. out may be x
   (in place): iteration j reads and writes only its own pair, so there is no dependence between iterations,
   which `ivdep` tells the vectoriser. */

#include <stdint.h>
#include <string.h>

static inline float bf16_load(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* float32 -> bfloat16, rounding to nearest even (torch's rule); NaN stays NaN */
static inline uint16_t bf16_store(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0 : (uint16_t)rounded;
}

#define IDENTITY(v) (v)
#define TO_FLOAT(v) ((float)(v))
#define TO_HALF(v) ((_Float16)(v))

/* pairs (first, second) for j < n; n a constant where the caller can make it one (then fully unrolled) */
#define ROTATE_PAIRS(C, LOAD, STORE, n, first, second)                                                                      \
    {                                                                                                       \
        _Pragma("GCC ivdep") for (int64_t j = 0; j < (n); ++j) {                                            \
            C a = LOAD(xr[first]), b = LOAD(xr[second]);                                                    \
            C ca = a * c[j], sb = b * s[j], cb = b * c[j], sa = a * s[j];                                   \
            o[first] = STORE(ca - sb);                                                                      \
            o[second] = STORE(cb + sa);                                                                     \
        }                                                                                                   \
    }

/* rotate(x, out, cos, sin, ndim, sizes, strides, tile, rotary, channels, interleaved, threads)

   The rows are the dims `sizes` (ndim >= 1, memory order, outermost first) with the strides of x, out and
   the tables (x_strides, out_strides, table_strides: three arrays of ndim). The innermost dim is cut into
   tiles of `tile` rows; a unit of work is one tile at one index of the outer dims. The units are shared
   among `threads` OpenMP threads: those of torch's own pool where the library is built with -fopenmp (the
   process has loaded torch's libgomp), so the loop and torch's operations never compete for cores. */
#define DEFINE_ROTATE(NAME, T, C, LOAD, STORE)                                                                 \
    void NAME(const T *x, T *out, const C *cos, const C *sin, int64_t ndim, const int64_t *sizes,             \
              const int64_t *strides, int64_t tile, int64_t rotary, int64_t channels, int64_t interleaved,  \
              int64_t threads) {                                                                             \
        const int64_t *x_strides = strides, *out_strides = strides + ndim, *table_strides = strides + 2 * ndim; \
        const int64_t inner = ndim - 1, half = rotary / 2;                                                  \
        int64_t outer = 1;                                                                                  \
        for (int64_t d = 0; d < inner; ++d)                                                                 \
            outer *= sizes[d];                                                                              \
        const int64_t units = outer * ((sizes[inner] + tile - 1) / tile);                                   \
        (void)threads;                                                                                      \
        _Pragma("omp parallel for schedule(static) num_threads(threads) if (threads > 1)")                  \
        for (int64_t unit = 0; unit < units; ++unit) {                                                      \
            const int64_t first = unit / outer * tile;                                                      \
            const int64_t count = sizes[inner] - first < tile ? sizes[inner] - first : tile;               \
            int64_t rest = unit % outer, x_at = first * x_strides[inner], out_at = first * out_strides[inner]; \
            int64_t table_at = first * table_strides[inner];                                                \
            for (int64_t d = inner - 1; d >= 0; --d) {                                                     \
                const int64_t i = rest % sizes[d];                                                          \
                rest /= sizes[d];                                                                           \
                x_at += i * x_strides[d];                                                                   \
                out_at += i * out_strides[d];                                                               \
                table_at += i * table_strides[d];                                                           \
            }                                                                                               \
            for (int64_t row = 0; row < count; ++row) {                                                     \
                const T *xr = x + x_at + row * x_strides[inner];                                            \
                T *o = out + out_at + row * out_strides[inner];                                             \
                const C *c = cos + table_at + row * table_strides[inner];                                   \
                const C *s = sin + table_at + row * table_strides[inner];                                   \
                if (interleaved) {                                                                          \
                    if (half == 64) ROTATE_PAIRS(C, LOAD, STORE, 64, 2 * j, 2 * j + 1)                      \
                    else ROTATE_PAIRS(C, LOAD, STORE, half, 2 * j, 2 * j + 1)                               \
                } else {                                                                                    \
                    if (half == 64) ROTATE_PAIRS(C, LOAD, STORE, 64, j, j + 64)                             \
                    else if (half == 32) ROTATE_PAIRS(C, LOAD, STORE, 32, j, j + 32)                        \
                    else ROTATE_PAIRS(C, LOAD, STORE, half, j, j + half)                                    \
                }                                                                                           \
                if (o != xr && rotary < channels)                                                           \
                    memcpy(o + rotary, xr + rotary, (size_t)(channels - rotary) * sizeof(T));               \
            }                                                                                               \
        }                                                                                                   \
    }

DEFINE_ROTATE(rotate_float32, float, float, IDENTITY, IDENTITY)
DEFINE_ROTATE(rotate_float64, double, double, IDENTITY, IDENTITY)
DEFINE_ROTATE(rotate_bfloat16, uint16_t, float, bf16_load, bf16_store)
DEFINE_ROTATE(rotate_float16, _Float16, float, TO_FLOAT, TO_HALF)
