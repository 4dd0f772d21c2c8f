/* normlab fused normalization kernels for the CPU (built by normlab/kernels/cpu.py, called
   through ctypes; no torch headers).

   One body (normlab_body.h) is compiled three times, once per storage type of the big
   tensors x, y, ∂ℓ/∂y, ∂ℓ/∂x:
     _f32   storage float,    arithmetic float
     _f64   storage double,   arithmetic double
     _bf16  storage bfloat16, arithmetic float (a load is a shift, a store rounds to nearest
            even; statistics and parameter vectors are float)
   float16 has no kernels: the caller upcasts it to float32 (gcc's _Float16 conversions stay
   scalar in these loops, and bit-level ones cost four times the bfloat16 ones; both measured
   slower than torch's vectorized upcast).

   Exactness rule (every kernel; see docs/performance.md):
   * moments are accumulated per chunk of at most CHUNK values (a chunk sits in L1 cache):
     sweep 1 sums the chunk in double and gives its mean c, sweep 2 sums the deviations
     u = x − c and u² in the arithmetic type, and the chunk's (count, mean, M2) =
     (n, c + Σu/n, Σu² − (Σu)²/n) (the corrected two-pass formula) is merged into the set's
     running (count, mean, M2) in double with Chan's update. No sum of squares is ever
     shifted by a value far from the data, so nothing cancels: an outlier neither drags a
     shift nor loses the other values' digits. The filtered moments repeat this over the kept
     values, centred on their own mean.
   * a mean μ (double) is handed to the loops as two numbers of the arithmetic type,
     μ = hi + lo, and values are centred as (x − hi) − lo: x − hi is exact for x near μ, so
     |μ|/σ up to ~1e8 keeps the digits float32 input has; y = (x − μ)·(γ r) + β, never
     x·a + b with a cancelling b.
   * NaN and Inf follow the reference (kernels/analytic.py), as torch: a NaN in a set, or an
     Inf that makes its moments NaN, gives NaN for the whole set (mean = Σx/m, variance NaN,
     as torch's batch norm puts them into the running statistics); TLU, affine TLU and ReLU
     pass NaN through (max(y, τ) is written y < τ ? τ : y). Masked values enter the sums as
     f·x, so an excluded Inf still gives NaN (0·Inf), as the reference's mask product does.

   Statistics of each kernel are one (NSTATS, sets) block of the arithmetic type, rows:
   mean0, var0 (plain moments), mean, var (moments used), rstd = (var + ε)^(-1/2), count
   (kept count M), mean0_lo, mean_lo (the low parts: mean0 + mean0_lo is the plain mean in
   more than float precision). */

#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#define CHUNK 1024        /* values per chunk of a contiguous run: 4 KB of float */
#define LANES 32          /* partial sums per reduction (independent vector accumulators) */
#define CL_BLOCK 16384    /* channels_last: bytes of x per chunk of rows (rows × C values) */
#define WORK_PER 24       /* channels_last scratch: doubles per channel per thread (+1 shared) */
#define NSTATS 8

enum { ST_MEAN0, ST_VAR0, ST_MEAN, ST_VAR, ST_RSTD, ST_COUNT, ST_MEAN0_LO, ST_MEAN_LO };

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 8
#define NOINLINE __attribute__((noinline, noipa))
#else
#define NOINLINE __attribute__((noinline))
#endif

/* Layout constants, read by cpu.py after loading (one definition, here). */
int normlab_work_per(void) { return WORK_PER; }
int normlab_nstats(void) { return NSTATS; }

/* ---- moments of a set, merged chunk by chunk ----------------------------------------- */

/* count n, mean, and M2 = Σ (x − mean)² of the values merged so far */
typedef struct { double n, mean, m2; } nl_moments;

/* Chan, Golub & LeVeque's pairwise update: merge a part (n, mean, m2) into acc. */
static inline void nl_merge(nl_moments *acc, double n, double mean, double m2)
{
    if (n == 0) return;
    if (acc->n == 0) { acc->n = n; acc->mean = mean; acc->m2 = m2; return; }
    double tot = acc->n + n, d = mean - acc->mean;
    acc->mean += d * (n / tot);
    acc->m2 += m2 + d * d * (acc->n * n / tot);
    acc->n = tot;
}

/* Merge parts [c0, c0 + k) of mom (and their raw sums) into one: channels into a group. */
static inline void nl_merge_range(const nl_moments *mom, const double *raw, int64_t c0,
                                  int64_t k, nl_moments *out, double *out_raw)
{
    out->n = out->mean = out->m2 = 0;
    *out_raw = 0;
    for (int64_t c = c0; c < c0 + k; ++c) {
        nl_merge(out, mom[c].n, mom[c].mean, mom[c].m2);
        *out_raw += raw[c];
    }
}

/* Mean and variance from merged moments (uncentered: 0 and ν² = Σx²/n). A centered set
   whose moments are not finite (a NaN or an Inf in it) gets mean Σx/n (NaN, or ±Inf as
   torch's batch norm gives) and variance NaN, as the reference's var_mean. */
static inline void nl_finish(const nl_moments *a, double raw, int centered, double *mean,
                             double *var)
{
    if (!centered) { *mean = 0; *var = a->m2 / a->n; return; }
    if (isfinite(a->mean) && isfinite(a->m2)) {
        *mean = a->mean;
        *var = a->m2 > 0 ? a->m2 / a->n : 0;
    } else {
        *mean = raw / a->n;
        *var = NAN;
    }
}

/* A set of nseg runs of len values, stride apart, is walked in chunks of at most CHUNK
   values: a piece of one run (len ≥ CHUNK) or a group of whole runs. */
typedef struct { int64_t off, nseg, len; } nl_chunk;

static inline int64_t nl_nchunks(int64_t nseg, int64_t len)
{
    if (len >= CHUNK) return nseg * ((len + CHUNK - 1) / CHUNK);
    int64_t per = CHUNK / len;
    return (nseg + per - 1) / per;
}

static inline nl_chunk nl_chunk_at(int64_t i, int64_t stride, int64_t nseg, int64_t len)
{
    nl_chunk ch;
    if (len >= CHUNK) {
        int64_t per = (len + CHUNK - 1) / CHUNK, k = i / per, j = (i % per) * CHUNK;
        ch.off = k * stride + j; ch.nseg = 1; ch.len = len - j < CHUNK ? len - j : CHUNK;
    } else {
        int64_t per = CHUNK / len, k = i * per;
        ch.off = k * stride; ch.nseg = nseg - k < per ? nseg - k : per; ch.len = len;
    }
    return ch;
}

/* channels_last: rows per block for C channels of `size` bytes: the block stays in L1, and
   each channel's partial sums (one chain of additions per channel) cover at most 128 rows */
static inline int64_t nl_block_rows(int64_t C, size_t size)
{
    int64_t r = CL_BLOCK / (C * (int64_t)size);
    return r < 8 ? 8 : r > 128 ? 128 : r;
}

/* ---- bfloat16 storage ------------------------------------------------------------------ */
typedef union { uint32_t u; float f; } nl_bits32;

/* bfloat16 = the high 16 bits of a float32 (sign, 8-bit exponent, 7-bit mantissa).
   Load: shift into the high half. Store: round the 16 dropped bits to nearest-even by adding
   0x7fff plus the lowest kept bit (a carry into the exponent is the correct rounding, up to
   inf); a NaN, which the add could carry into inf or the sign, keeps its high half with the
   quiet bit set. The NaN test (f != f) and select act on the 32-bit lanes before narrowing:
   the cheapest NaN-safe form measured. */
static inline float bf16_ld(uint16_t h) { nl_bits32 v; v.u = (uint32_t)h << 16; return v.f; }
static inline uint16_t bf16_st(float f)
{
    nl_bits32 v; v.f = f;
    uint32_t u = v.u;
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    r = f != f ? (u >> 16) | 0x40u : r;
    return (uint16_t)r;
}

/* For the tests: both conversions over n values, h → hf (load) and f → fh (store). */
void bf16_convert(const uint16_t *h, float *hf, const float *f, uint16_t *fh, int64_t n)
{
    for (int64_t i = 0; i < n; ++i) { hf[i] = bf16_ld(h[i]); fh[i] = bf16_st(f[i]); }
}

/* ---- the three instances ---------------------------------------------------------------- */
#define S float
#define T float
#define LD(v) (v)
#define ST(v) (v)
#define FABS fabsf
#define NEXTAFTER nextafterf
#define TMAX FLT_MAX
#define SFX(name) name##_f32
#include "normlab_body.h"   /* undefines its parameters at its end */

#define S double
#define T double
#define LD(v) (v)
#define ST(v) (v)
#define FABS fabs
#define NEXTAFTER nextafter
#define TMAX DBL_MAX
#define SFX(name) name##_f64
#include "normlab_body.h"   /* undefines its parameters at its end */

#define S uint16_t
#define T float
#define LD(v) bf16_ld(v)
#define ST(v) bf16_st(v)
#define FABS fabsf
#define NEXTAFTER nextafterf
#define TMAX FLT_MAX
#define SFX(name) name##_bf16
#include "normlab_body.h"   /* undefines its parameters at its end */
