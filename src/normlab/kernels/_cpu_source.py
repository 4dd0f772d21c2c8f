"""C source of the fused CPU kernels (compiled at first use by :mod:`normlab.kernels.cpu`).

One body, instantiated for ``float`` and ``double`` by text substitution of ``T`` and
``SFX``. Sums accumulate in double. Every kernel is one OpenMP loop over independent
reduction sets (a BN channel, or a GN/FRN/IN/LN row), so a set's values are read from memory
once and then re-read from cache by the later passes of the same set.

Notation (see ``analytic.py``): plain moments μ0, σ0² (centered) or 0, ν² (uncentered);
mask ``f = |x − μ0| · rsqrt(σ0² + ε) ≤ T`` (filtered-BN seed eq. 4–5; all ones when a set
would keep nothing); filtered moments over kept values (eq. 6–7, divided by κ when
Gaussian-consistent); ``y = γ (x − μ) r + β`` (eq. 8), optionally ``z = max(y, τ)`` (FRN seed
eq. 3) or ``max(y, κ_a y + τ)`` (affine TLU). Backward, with ``g = γ ∂ℓ/∂y``:
``∂ℓ/∂x = r (g − f (Σg/M + x̂ Σg x̂/(κM)))`` (no ``Σg`` term when uncentered).
"""

BODY = r"""
/* ---- leaf loops: one contiguous run of at most CHUNK values, accumulating in T. They are
   kept out of line (NOINLINE) so the compiler vectorizes each one as written. ---------- */
static NOINLINE void SFX(leaf_sums)(const T *p, int64_t n, T shift, T *o)
{
    T a = 0, b = 0;
    #pragma omp simd reduction(+:a,b)
    for (int64_t l = 0; l < n; ++l) { T u = p[l] - shift; a += u; b += u * u; }
    o[0] = a; o[1] = b;
}

static NOINLINE void SFX(leaf_filter)(const T *p, int64_t n, T mean0, T r0, T th, T shift, T *o)
{
    T a = 0, b = 0, c = 0;
    #pragma omp simd reduction(+:a,b,c)
    for (int64_t l = 0; l < n; ++l) {
        T v = p[l];
        T f = FABS((v - mean0) * r0) <= th ? (T)1 : (T)0;
        T u = (v - shift) * f;
        a += f; b += u; c += u * u;
    }
    o[0] = a; o[1] = b; o[2] = c;
}

static NOINLINE void SFX(leaf_affine)(const T *p, T *q, int64_t n, T a, T b, int act, T t, T k)
{
    if (act == 0) {
        #pragma omp simd
        for (int64_t l = 0; l < n; ++l) q[l] = p[l] * a + b;
    } else if (act == 1) {
        #pragma omp simd
        for (int64_t l = 0; l < n; ++l) { T y = p[l] * a + b; q[l] = y >= t ? y : t; }
    } else {
        #pragma omp simd
        for (int64_t l = 0; l < n; ++l) { T y = p[l] * a + b; T h = k * y + t; q[l] = y >= h ? y : h; }
    }
}

/* o: sum dy, sum dy (x - mu), sum of dz where TLU passed to tau, sum dz*y there (affine) */
static NOINLINE void SFX(leaf_bwd_sums)(const T *p, const T *d, int64_t n, T mu, int act,
                                        T a, T b, T t, T k, T *o)
{
    T s1 = 0, s2 = 0, s3 = 0, s4 = 0;
    if (act == 0) {
        #pragma omp simd reduction(+:s1,s2)
        for (int64_t l = 0; l < n; ++l) { T dd = d[l]; s1 += dd; s2 += dd * (p[l] - mu); }
    } else if (act == 1) {
        #pragma omp simd reduction(+:s1,s2,s3)
        for (int64_t l = 0; l < n; ++l) {
            T v = p[l], dd = d[l];
            T keep = (v * a + b) >= t ? (T)1 : (T)0;
            T dy = keep * dd;
            s1 += dy; s2 += dy * (v - mu); s3 += dd - dy;
        }
    } else {
        #pragma omp simd reduction(+:s1,s2,s3,s4)
        for (int64_t l = 0; l < n; ++l) {
            T v = p[l], dd = d[l];
            T y = v * a + b;
            T keep = y >= k * y + t ? (T)1 : (T)0;
            T dy = keep * dd + ((T)1 - keep) * k * dd;
            T rest = ((T)1 - keep) * dd;
            s1 += dy; s2 += dy * (v - mu); s3 += rest; s4 += rest * y;
        }
    }
    o[0] = s1; o[1] = s2; o[2] = s3; o[3] = s4;
}

/* dx = A dy - f (B + (x - mu) Cc), f = [|x - m0| r0 <= th] */
static NOINLINE void SFX(leaf_bwd_dx)(const T *p, const T *d, T *q, int64_t n, int act, T a,
                                      T b, T t, T k, T A, T B, T Cc, T mu, T m0, T r0, T th)
{
    if (act == 0) {
        #pragma omp simd
        for (int64_t l = 0; l < n; ++l) {
            T v = p[l];
            T f = FABS((v - m0) * r0) <= th ? (T)1 : (T)0;
            q[l] = A * d[l] - f * (B + (v - mu) * Cc);
        }
    } else if (act == 1) {
        #pragma omp simd
        for (int64_t l = 0; l < n; ++l) {
            T v = p[l], dd = d[l];
            T dy = (v * a + b) >= t ? dd : (T)0;
            T f = FABS((v - m0) * r0) <= th ? (T)1 : (T)0;
            q[l] = A * dy - f * (B + (v - mu) * Cc);
        }
    } else {
        #pragma omp simd
        for (int64_t l = 0; l < n; ++l) {
            T v = p[l], dd = d[l];
            T y = v * a + b;
            T dy = y >= k * y + t ? dd : k * dd;
            T f = FABS((v - m0) * r0) <= th ? (T)1 : (T)0;
            q[l] = A * dy - f * (B + (v - mu) * Cc);
        }
    }
}

/* ---- chunked sums over runs: nseg runs of seg_len values, seg_stride apart ------------ */
static void SFX(run_sums)(const T *x, int64_t nseg, int64_t seg_stride, int64_t seg_len,
                          T shift, double *o)
{
    double s = 0, ss = 0; T t[2];
    for (int64_t k = 0; k < nseg; ++k)
        for (int64_t c0 = 0; c0 < seg_len; c0 += CHUNK) {
            int64_t n = seg_len - c0 < CHUNK ? seg_len - c0 : CHUNK;
            SFX(leaf_sums)(x + k * seg_stride + c0, n, shift, t);
            s += t[0]; ss += t[1];
        }
    o[0] = s; o[1] = ss;
}

/* Statistics of one set (plain, then filtered), written to the six outputs. */
static void SFX(set_stats)(const T *x, int64_t nseg, int64_t seg_stride, int64_t seg_len,
                           int centered, double eps, double thr, double kap,
                           T *mean0_o, T *var0_o, T *mean_o, T *var_o, T *rstd_o, T *cnt_o)
{
    double m = (double)nseg * seg_len, ps[2];
    T shift = centered ? x[0] : (T)0;   /* shifted sums: no cancellation for large means */
    SFX(run_sums)(x, nseg, seg_stride, seg_len, shift, ps);
    double d0 = ps[0] / m;
    double mu0 = centered ? shift + d0 : 0.0;
    double v0 = centered ? ps[1] / m - d0 * d0 : ps[1] / m;
    if (v0 < 0) v0 = 0;
    T mean0 = (T)mu0, var0 = (T)v0;
    T r0 = (T)1 / (T)sqrt((double)(var0 + (T)eps));
    double M = m, sf = ps[0], sff = ps[1];
    if (thr > 0) {
        M = 0; sf = 0; sff = 0;
        T t[3];
        for (int64_t k = 0; k < nseg; ++k)
            for (int64_t c0 = 0; c0 < seg_len; c0 += CHUNK) {
                int64_t n = seg_len - c0 < CHUNK ? seg_len - c0 : CHUNK;
                SFX(leaf_filter)(x + k * seg_stride + c0, n, mean0, r0, (T)thr, mean0, t);
                M += t[0]; sf += t[1]; sff += t[2];
            }
        double dm = (double)mean0 - shift;   /* filter sums are shifted by mean0 */
        if (M == 0) {                        /* kept nothing: keep all */
            M = m; sf = ps[0] - m * dm; sff = ps[1] - 2 * dm * ps[0] + m * dm * dm;
        }
        shift = mean0;
    }
    double d = sf / M;
    double mu = centered ? shift + d : 0.0;
    double var = centered ? sff / M - d * d : sff / M;
    if (var < 0) var = 0;
    if (thr > 0) var /= kap;
    *mean0_o = mean0; *var0_o = var0;
    *mean_o = (T)mu; *var_o = (T)var; *cnt_o = (T)M;
    *rstd_o = (T)1 / (T)sqrt((double)((T)var + (T)eps));
}

static void SFX(run_affine)(const T *x, T *y, int64_t nseg, int64_t seg_stride, int64_t seg_len,
                            T a, T b, int act, T t, T k)
{
    for (int64_t s = 0; s < nseg; ++s)
        for (int64_t c0 = 0; c0 < seg_len; c0 += CHUNK) {
            int64_t n = seg_len - c0 < CHUNK ? seg_len - c0 : CHUNK;
            SFX(leaf_affine)(x + s * seg_stride + c0, y + s * seg_stride + c0, n, a, b, act, t, k);
        }
}

static void SFX(run_bwd_sums)(const T *x, const T *d, int64_t nseg, int64_t seg_stride,
                              int64_t seg_len, T mu, int act, T a, T b, T t, T k, double *o)
{
    double s[4] = {0, 0, 0, 0}; T tt[4];
    for (int64_t g = 0; g < nseg; ++g)
        for (int64_t c0 = 0; c0 < seg_len; c0 += CHUNK) {
            int64_t n = seg_len - c0 < CHUNK ? seg_len - c0 : CHUNK;
            int64_t off = g * seg_stride + c0;
            SFX(leaf_bwd_sums)(x + off, d + off, n, mu, act, a, b, t, k, tt);
            for (int j = 0; j < 4; ++j) s[j] += tt[j];
        }
    for (int j = 0; j < 4; ++j) o[j] = s[j];
}

static void SFX(run_bwd_dx)(const T *x, const T *d, T *q, int64_t nseg, int64_t seg_stride,
                            int64_t seg_len, int act, T a, T b, T t, T k, T A, T B, T Cc,
                            T mu, T m0, T r0, T th)
{
    for (int64_t g = 0; g < nseg; ++g)
        for (int64_t c0 = 0; c0 < seg_len; c0 += CHUNK) {
            int64_t n = seg_len - c0 < CHUNK ? seg_len - c0 : CHUNK;
            int64_t off = g * seg_stride + c0;
            SFX(leaf_bwd_dx)(x + off, d + off, q + off, n, act, a, b, t, k, A, B, Cc, mu, m0, r0, th);
        }
}

/* ---- batch norm family: x is (N, C, L) contiguous, statistics per channel c ---------- */
void SFX(bn_fwd)(const T *x, T *y, const T *w, const T *b, int64_t N, int64_t C, int64_t L,
                 int centered, double eps, double thr, double kap,
                 T *mean0, T *var0, T *mean, T *var, T *rstd, T *cnt, int nt)
{
    #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t c = 0; c < C; ++c) {
        SFX(set_stats)(x + c * L, N, C * L, L, centered, eps, thr, kap,
                       mean0 + c, var0 + c, mean + c, var + c, rstd + c, cnt + c);
        T a = (w ? w[c] : (T)1) * rstd[c];
        T bb = (b ? b[c] : (T)0) - mean[c] * a;
        SFX(run_affine)(x + c * L, y + c * L, N, C * L, L, a, bb, 0, (T)0, (T)0);
    }
}

void SFX(bn_bwd)(const T *x, const T *dy, T *dx, const T *w, int64_t N, int64_t C, int64_t L,
                 int centered, double eps, double thr, double kap,
                 const T *mean0, const T *var0, const T *mean, const T *rstd, const T *cnt,
                 T *s_dy, T *s_dyxhat, int nt)
{
    double m = (double)N * L;
    #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t c = 0; c < C; ++c) {
        double o[4];
        SFX(run_bwd_sums)(x + c * L, dy + c * L, N, C * L, L, mean[c], 0, 0, 0, 0, 0, o);
        double r = rstd[c], sd = o[0], sdxh = r * o[1];
        s_dy[c] = (T)sd; s_dyxhat[c] = (T)sdxh;
        if (!dx) continue;
        double wc = w ? w[c] : 1.0, M = cnt[c];
        int filt = thr > 0 && M < m;
        double kk = thr > 0 ? kap : 1.0;
        T A = (T)(r * wc);
        T B = (T)(centered ? r * wc * sd / M : 0.0);
        T Cc = (T)(r * r * wc * sdxh / (kk * M));
        T r0 = (T)1 / (T)sqrt((double)(var0[c] + (T)eps));
        T th = filt ? (T)thr : (T)INFINITY;
        SFX(run_bwd_dx)(x + c * L, dy + c * L, dx + c * L, N, C * L, L, 0, 0, 0, 0, 0,
                        A, B, Cc, mean[c], mean0[c], r0, th);
    }
}

/* ---- row family: x is (R, Cg * L) contiguous, statistics per row; row r has group
   g = r % G, and channel (g, cg) owns the contiguous run [cg * L, (cg + 1) * L).
   act: 0 none, 1 TLU max(y, tau), 2 affine TLU max(y, ak * y + tau). ----------------- */
void SFX(row_fwd)(const T *x, T *y, const T *w, const T *b, const T *tau, const T *ak,
                  int64_t R, int64_t G, int64_t Cg, int64_t L, int centered, double eps,
                  double thr, double kap, int act,
                  T *mean0, T *var0, T *mean, T *var, T *rstd, T *cnt, int nt)
{
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < R; ++r) {
        const T *xr = x + r * Cg * L;
        int64_t g = r % G;
        SFX(set_stats)(xr, 1, 0, Cg * L, centered, eps, thr, kap,
                       mean0 + r, var0 + r, mean + r, var + r, rstd + r, cnt + r);
        for (int64_t cg = 0; cg < Cg; ++cg) {
            int64_t ch = g * Cg + cg;
            T a = (w ? w[ch] : (T)1) * rstd[r];
            T bb = (b ? b[ch] : (T)0) - mean[r] * a;
            SFX(run_affine)(xr + cg * L, y + r * Cg * L + cg * L, 1, 0, L, a, bb, act,
                            tau ? tau[ch] : (T)0, ak ? ak[ch] : (T)0);
        }
    }
}

void SFX(row_bwd)(const T *x, const T *dz, T *dx, const T *w, const T *b, const T *tau,
                  const T *ak, int64_t R, int64_t G, int64_t Cg, int64_t L, int centered,
                  double eps, double thr, double kap, int act,
                  const T *mean0, const T *var0, const T *mean, const T *rstd, const T *cnt,
                  T *s_dy, T *s_dyxhat, T *s_dtau, T *s_dak, T *s_gxhat, int nt)
{
    double m = (double)Cg * L;
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < R; ++r) {
        const T *xr = x + r * Cg * L, *dr = dz + r * Cg * L;
        int64_t g = r % G;
        double rs = rstd[r], sg = 0, sgxh = 0;
        for (int64_t cg = 0; cg < Cg; ++cg) {
            int64_t ch = g * Cg + cg;
            double wc = w ? w[ch] : 1.0, o[4];
            T a = (w ? w[ch] : (T)1) * rstd[r];
            T bb = (b ? b[ch] : (T)0) - mean[r] * a;
            SFX(run_bwd_sums)(xr + cg * L, dr + cg * L, 1, 0, L, mean[r], act, a, bb,
                              tau ? tau[ch] : (T)0, ak ? ak[ch] : (T)0, o);
            double sdxh = rs * o[1];
            s_dy[r * Cg + cg] = (T)o[0]; s_dyxhat[r * Cg + cg] = (T)sdxh;
            s_dtau[r * Cg + cg] = (T)o[2]; s_dak[r * Cg + cg] = (T)o[3];
            sg += wc * o[0]; sgxh += wc * sdxh;
        }
        s_gxhat[r] = (T)sgxh;
        if (!dx) continue;
        double M = cnt[r];
        int filt = thr > 0 && M < m;
        double kk = thr > 0 ? kap : 1.0;
        T B = (T)(centered ? rs * sg / M : 0.0);
        T Cc = (T)(rs * rs * sgxh / (kk * M));
        T r0 = (T)1 / (T)sqrt((double)(var0[r] + (T)eps));
        T th = filt ? (T)thr : (T)INFINITY;
        for (int64_t cg = 0; cg < Cg; ++cg) {
            int64_t ch = g * Cg + cg;
            T A = (T)(rs * (w ? (double)w[ch] : 1.0));
            T a = (w ? w[ch] : (T)1) * rstd[r];
            T bb = (b ? b[ch] : (T)0) - mean[r] * a;
            SFX(run_bwd_dx)(xr + cg * L, dr + cg * L, dx + r * Cg * L + cg * L, 1, 0, L, act,
                            a, bb, tau ? tau[ch] : (T)0, ak ? ak[ch] : (T)0,
                            A, B, Cc, mean[r], mean0[r], r0, th);
        }
    }
}
"""

HEADER = ("#include <stdint.h>\n#include <math.h>\n#include <stddef.h>\n#define CHUNK 1024\n"
            "#if defined(__GNUC__) && !defined(__clang__)\n#define NOINLINE __attribute__((noinline, noipa))\n"
            "#else\n#define NOINLINE __attribute__((noinline))\n#endif\n")


def source() -> str:
    """The full translation unit: the body for ``float`` (``_f32``) and ``double`` (``_f64``)."""
    parts = [HEADER]
    for ctype, suffix in (("float", "f32"), ("double", "f64")):
        fabs = "fabsf" if ctype == "float" else "fabs"
        parts.append(f"#define T {ctype}\n#define FABS {fabs}\n#define SFX(name) name##_{suffix}\n"
                     f"{BODY}\n#undef T\n#undef FABS\n#undef SFX\n")
    return "".join(parts)
