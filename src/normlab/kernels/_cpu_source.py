"""C source of the fused CPU kernels (compiled at first use by :mod:`normlab.kernels.cpu`).

One body, instantiated once per storage dtype by text substitution (``INSTANCES``): ``S`` is
the type of the big tensors (x, y, ∂ℓ/∂y, ∂ℓ/∂x), ``T`` the arithmetic type (statistics,
parameters, partial sums), ``LD``/``ST`` convert one value S → T / T → S, ``SFX`` names the
functions: ``_f32`` and ``_f64`` (S = T, LD/ST are no-ops) and ``_bf16`` (S = 16-bit storage,
T = float, bit conversions in ``HALF``: a shift to load, round-to-nearest-even to store), so
bfloat16 tensors are read and written in place with float arithmetic. Sums accumulate in
double. float16 has no kernels here (the caller upcasts it to float32): gcc 12's ``_Float16``
(F16C) conversions stay scalar inside these loops (not vectorized), and branch-free bit-level
float16 conversions, which do vectorize, cost about four times the bfloat16 ones (a load,
affine, store loop: 2.4 vs 0.6 ns per value here); both made the kernels slower than
upcasting with torch's vectorized conversions. Every kernel is one OpenMP loop over independent
reduction sets (a BN channel, or a GN/FRN/IN/LN row), so a set's values are read from memory
once and then re-read from cache by the later passes of the same set.

Notation (see ``analytic.py``): plain moments μ0, σ0² (centered) or 0, ν² (uncentered);
mask ``f = |x − μ0| · rsqrt(σ0² + ε) ≤ T`` (filtered-BN seed eq. 4–5; all ones when a set
would keep nothing); filtered moments over kept values (eq. 6–7, divided by κ when
Gaussian-consistent); ``y = γ (x − μ) r + β`` (eq. 8), optionally ``z = max(y, τ)`` (FRN seed
eq. 3) or ``max(y, κ_a y + τ)`` (affine TLU). Backward, with ``g = γ ∂ℓ/∂y``:
``∂ℓ/∂x = r (g − f (Σg/M + x̂ Σg x̂/(κM)))`` (no ``Σg`` term when uncentered).

Two memory layouts: contiguous (``bn_*``, ``row_*``: a set's values are contiguous runs) and
channels_last (``bnc_*``, ``rowc_*``: rows of C contiguous channel values, a set is a column
or a block of columns; the loops vectorize over channels with per-channel constant vectors).
The channels_last kernels take a scratch buffer of ``(nt + 1) · WORK_PER · C`` doubles.
"""

# doubles of scratch per thread (and once more, shared) per channel in the channels_last kernels
WORK_PER = 24

BODY = r"""
/* ---- leaf loops: one contiguous run of at most CHUNK values, accumulating in T. They are
   kept out of line (NOINLINE) so the compiler vectorizes each one as written. Every value of
   x, y, dy, dx is read through LD and written through ST (storage S, arithmetic T). ------ */
static NOINLINE void SFX(leaf_sums)(const S *p, int64_t n, T shift, T *o)
{
    T a = 0, b = 0;
    #pragma omp simd reduction(+:a,b)
    for (int64_t l = 0; l < n; ++l) { T u = LD(p[l]) - shift; a += u; b += u * u; }
    o[0] = a; o[1] = b;
}

static NOINLINE void SFX(leaf_filter)(const S *p, int64_t n, T mean0, T r0, T th, T shift, T *o)
{
    T a = 0, b = 0, c = 0;
    #pragma omp simd reduction(+:a,b,c)
    for (int64_t l = 0; l < n; ++l) {
        T v = LD(p[l]);
        T f = FABS((v - mean0) * r0) <= th ? (T)1 : (T)0;
        T u = (v - shift) * f;
        a += f; b += u; c += u * u;
    }
    o[0] = a; o[1] = b; o[2] = c;
}

static NOINLINE void SFX(leaf_affine)(const S *p, S *q, int64_t n, T a, T b, int act, T t, T k)
{
    if (act == 0) {
        #pragma omp simd
        for (int64_t l = 0; l < n; ++l) q[l] = ST(LD(p[l]) * a + b);
    } else if (act == 1) {
        #pragma omp simd
        for (int64_t l = 0; l < n; ++l) { T y = LD(p[l]) * a + b; q[l] = ST(y >= t ? y : t); }
    } else {
        #pragma omp simd
        for (int64_t l = 0; l < n; ++l) { T y = LD(p[l]) * a + b; T h = k * y + t; q[l] = ST(y >= h ? y : h); }
    }
}

/* o: sum dy, sum dy (x - mu), sum of dz where TLU passed to tau, sum dz*y there (affine) */
static NOINLINE void SFX(leaf_bwd_sums)(const S *p, const S *d, int64_t n, T mu, int act,
                                        T a, T b, T t, T k, T *o)
{
    T s1 = 0, s2 = 0, s3 = 0, s4 = 0;
    if (act == 0) {
        #pragma omp simd reduction(+:s1,s2)
        for (int64_t l = 0; l < n; ++l) { T dd = LD(d[l]); s1 += dd; s2 += dd * (LD(p[l]) - mu); }
    } else if (act == 1) {
        #pragma omp simd reduction(+:s1,s2,s3)
        for (int64_t l = 0; l < n; ++l) {
            T v = LD(p[l]), dd = LD(d[l]);
            T keep = (v * a + b) >= t ? (T)1 : (T)0;
            T dy = keep * dd;
            s1 += dy; s2 += dy * (v - mu); s3 += dd - dy;
        }
    } else {
        #pragma omp simd reduction(+:s1,s2,s3,s4)
        for (int64_t l = 0; l < n; ++l) {
            T v = LD(p[l]), dd = LD(d[l]);
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
static NOINLINE void SFX(leaf_bwd_dx)(const S *p, const S *d, S *q, int64_t n, int act, T a,
                                      T b, T t, T k, T A, T B, T Cc, T mu, T m0, T r0, T th)
{
    int filt = th < (T)INFINITY;   /* else f = 1: the compiler makes a loop without the test */
    if (act == 0) {
        #pragma omp simd
        for (int64_t l = 0; l < n; ++l) {
            T v = LD(p[l]);
            T fc = !filt || FABS((v - m0) * r0) <= th ? B + (v - mu) * Cc : (T)0;
            q[l] = ST(A * LD(d[l]) - fc);
        }
    } else if (act == 1) {
        #pragma omp simd
        for (int64_t l = 0; l < n; ++l) {
            T v = LD(p[l]), dd = LD(d[l]);
            T dy = (v * a + b) >= t ? dd : (T)0;
            T fc = !filt || FABS((v - m0) * r0) <= th ? B + (v - mu) * Cc : (T)0;
            q[l] = ST(A * dy - fc);
        }
    } else {
        #pragma omp simd
        for (int64_t l = 0; l < n; ++l) {
            T v = LD(p[l]), dd = LD(d[l]);
            T y = v * a + b;
            T dy = y >= k * y + t ? dd : k * dd;
            T fc = !filt || FABS((v - m0) * r0) <= th ? B + (v - mu) * Cc : (T)0;
            q[l] = ST(A * dy - fc);
        }
    }
}

/* ---- chunked sums over runs: nseg runs of seg_len values, seg_stride apart ------------ */
static void SFX(run_sums)(const S *x, int64_t nseg, int64_t seg_stride, int64_t seg_len,
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

/* Plain moments from sums s = Σ (x − shift), ss = Σ (x − shift)² over m values:
   μ0 = shift + s/m, σ0² = ss/m − (s/m)² (centered) or μ0 = 0, ν² = ss/m (uncentered);
   also r0 = (σ0² + ε)^(-1/2), the scale of the filter test. */
static void SFX(plain_moments)(double s, double ss, double m, T shift, int centered, double eps,
                               T *mean0, T *var0, T *r0)
{
    double d0 = s / m;
    double mu0 = centered ? shift + d0 : 0.0;
    double v0 = centered ? ss / m - d0 * d0 : ss / m;
    if (v0 < 0) v0 = 0;
    *mean0 = (T)mu0; *var0 = (T)v0;
    *r0 = (T)1 / (T)sqrt((double)(*var0 + (T)eps));
}

/* Moments used to normalize. Without a filter (thr <= 0): the plain sums (s, ss, shifted by
   `shift`, m values). With one: the kept count M and kept sums sf = Σ f (x − μ0),
   sff = Σ f (x − μ0)² (eq. 6–7); a set that kept nothing (M = 0) keeps all m values (its plain
   sums re-shifted to μ0). The filtered variance is divided by kap (κ(T), or 1). */
static void SFX(final_moments)(double s, double ss, double m, T shift, T mean0,
                               double M, double sf, double sff, int centered, double eps,
                               double thr, double kap, T *mean_o, T *var_o, T *rstd_o, T *cnt_o)
{
    double sh = shift;
    if (thr > 0) {
        if (M == 0) {
            double dm = (double)mean0 - shift;
            M = m; sf = s - m * dm; sff = ss - 2 * dm * s + m * dm * dm;
        }
        sh = mean0;
    } else {
        M = m; sf = s; sff = ss;
    }
    double d = sf / M;
    double mu = centered ? sh + d : 0.0;
    double var = centered ? sff / M - d * d : sff / M;
    if (var < 0) var = 0;
    if (thr > 0) var /= kap;
    *mean_o = (T)mu; *var_o = (T)var; *cnt_o = (T)M;
    *rstd_o = (T)1 / (T)sqrt((double)((T)var + (T)eps));
}

/* Statistics of one set (plain, then filtered), written to the six outputs. */
static void SFX(set_stats)(const S *x, int64_t nseg, int64_t seg_stride, int64_t seg_len,
                           int centered, double eps, double thr, double kap,
                           T *mean0_o, T *var0_o, T *mean_o, T *var_o, T *rstd_o, T *cnt_o)
{
    double m = (double)nseg * seg_len, ps[2];
    T shift = centered ? LD(x[0]) : (T)0;   /* shifted sums: no cancellation for large means */
    SFX(run_sums)(x, nseg, seg_stride, seg_len, shift, ps);
    T mean0, var0, r0;
    SFX(plain_moments)(ps[0], ps[1], m, shift, centered, eps, &mean0, &var0, &r0);
    double M = 0, sf = 0, sff = 0;
    if (thr > 0) {
        T t[3];
        for (int64_t k = 0; k < nseg; ++k)
            for (int64_t c0 = 0; c0 < seg_len; c0 += CHUNK) {
                int64_t n = seg_len - c0 < CHUNK ? seg_len - c0 : CHUNK;
                SFX(leaf_filter)(x + k * seg_stride + c0, n, mean0, r0, (T)thr, mean0, t);
                M += t[0]; sf += t[1]; sff += t[2];
            }
    }
    *mean0_o = mean0; *var0_o = var0;
    SFX(final_moments)(ps[0], ps[1], m, shift, mean0, M, sf, sff, centered, eps, thr, kap,
                       mean_o, var_o, rstd_o, cnt_o);
}

static void SFX(run_affine)(const S *x, S *y, int64_t nseg, int64_t seg_stride, int64_t seg_len,
                            T a, T b, int act, T t, T k)
{
    for (int64_t s = 0; s < nseg; ++s)
        for (int64_t c0 = 0; c0 < seg_len; c0 += CHUNK) {
            int64_t n = seg_len - c0 < CHUNK ? seg_len - c0 : CHUNK;
            SFX(leaf_affine)(x + s * seg_stride + c0, y + s * seg_stride + c0, n, a, b, act, t, k);
        }
}

static void SFX(run_bwd_sums)(const S *x, const S *d, int64_t nseg, int64_t seg_stride,
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

static void SFX(run_bwd_dx)(const S *x, const S *d, S *q, int64_t nseg, int64_t seg_stride,
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
/* Coefficients of ∂ℓ/∂x = A ∂ℓ/∂y − f (B + (x − μ) Cc) for one set (A = γ r is the caller's):
   B = r Σg / M (centered; 0 uncentered), Cc = r² Σg x̂ / (κ M), with g = γ ∂ℓ/∂y summed over
   the whole set of m values, M kept; the mask f = [|x − μ0| r0 ≤ th] is recomputed from the
   plain variance (th = ∞ when nothing was filtered out). */
static void SFX(bwd_coeffs)(double r, double sg, double sgxh, double M, double m, T var0,
                            int centered, double eps, double thr, double kap,
                            T *B, T *Cc, T *r0, T *th)
{
    double kk = thr > 0 ? kap : 1.0;
    *B = (T)(centered ? r * sg / M : 0.0);
    *Cc = (T)(r * r * sgxh / (kk * M));
    *r0 = (T)1 / (T)sqrt((double)(var0 + (T)eps));
    *th = thr > 0 && M < m ? (T)thr : (T)INFINITY;
}

/* Running averages of a batch norm (rm == NULL: none): running ← running + a (batch − running),
   the variance unbiased over the kept count, σ′² M / (M − 1) (as torch's BatchNorm). */
static void SFX(update_running)(T *rm, T *rv, const T *mean, const T *var, const T *cnt,
                                int64_t C, double a)
{
    if (!rm) return;
    for (int64_t c = 0; c < C; ++c) {
        double M = cnt[c], unbiased = (double)var[c] * (M / (M > 1 ? M - 1 : 1));
        rm[c] = (T)(rm[c] + a * ((double)mean[c] - rm[c]));
        rv[c] = (T)(rv[c] + a * (unbiased - rv[c]));
    }
}

void SFX(bn_fwd)(const S *x, S *y, const T *w, const T *b, int64_t N, int64_t C, int64_t L,
                 int centered, double eps, double thr, double kap,
                 T *mean0, T *var0, T *mean, T *var, T *rstd, T *cnt, T *rm, T *rv,
                 double factor, int nt)
{
    #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t c = 0; c < C; ++c) {
        SFX(set_stats)(x + c * L, N, C * L, L, centered, eps, thr, kap,
                       mean0 + c, var0 + c, mean + c, var + c, rstd + c, cnt + c);
        T a = (w ? w[c] : (T)1) * rstd[c];
        T bb = (b ? b[c] : (T)0) - mean[c] * a;
        SFX(run_affine)(x + c * L, y + c * L, N, C * L, L, a, bb, 0, (T)0, (T)0);
    }
    SFX(update_running)(rm, rv, mean, var, cnt, C, factor);
}

void SFX(bn_bwd)(const S *x, const S *dy, S *dx, const T *w, int64_t N, int64_t C, int64_t L,
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
        T A = (T)(r * wc), B, Cc, r0, th;
        SFX(bwd_coeffs)(r, wc * sd, wc * sdxh, M, m, var0[c], centered, eps, thr, kap,
                        &B, &Cc, &r0, &th);
        SFX(run_bwd_dx)(x + c * L, dy + c * L, dx + c * L, N, C * L, L, 0, 0, 0, 0, 0,
                        A, B, Cc, mean[c], mean0[c], r0, th);
    }
}

/* ---- row family: x is (R, Cg * L) contiguous, statistics per row; row r has group
   g = r % G, and channel (g, cg) owns the contiguous run [cg * L, (cg + 1) * L).
   act: 0 none, 1 TLU max(y, tau), 2 affine TLU max(y, ak * y + tau). ----------------- */
void SFX(row_fwd)(const S *x, S *y, const T *w, const T *b, const T *tau, const T *ak,
                  int64_t R, int64_t G, int64_t Cg, int64_t L, int centered, double eps,
                  double thr, double kap, int act,
                  T *mean0, T *var0, T *mean, T *var, T *rstd, T *cnt, int nt)
{
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < R; ++r) {
        const S *xr = x + r * Cg * L;
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

void SFX(row_bwd)(const S *x, const S *dz, S *dx, const T *w, const T *b, const T *tau,
                  const T *ak, int64_t R, int64_t G, int64_t Cg, int64_t L, int centered,
                  double eps, double thr, double kap, int act,
                  const T *mean0, const T *var0, const T *mean, const T *rstd, const T *cnt,
                  T *s_dy, T *s_dyxhat, T *s_dtau, T *s_dak, T *s_gxhat, int nt)
{
    double m = (double)Cg * L;
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < R; ++r) {
        const S *xr = x + r * Cg * L, *dr = dz + r * Cg * L;
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
        T B, Cc, r0, th;
        SFX(bwd_coeffs)(rs, sg, sgxh, M, m, var0[r], centered, eps, thr, kap, &B, &Cc, &r0, &th);
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

/* ==== channels_last layout ===========================================================
   x is stored as rows of C contiguous values (row stride C), one row per (sample, position):
   BN's (N, C, L) with strides (L·C, 1, C) is an (N·L, C) matrix, and sample n of the row
   family is an (L, C) block. Channel c is column c, so every leaf loop below runs over the C
   channels of one row (vectorized) with per-channel C-vectors for the shift, mask and affine
   constants, and adds into per-channel partial sums in T (at most CHUNK rows each, then
   added into double, as in the contiguous kernels). */

/* o0[c] += Σ (x − s[c]),  o1[c] += Σ (x − s[c])²  (plain shifted sums) */
static NOINLINE void SFX(col_sums)(const S *restrict x, int64_t nrow, int64_t C,
                                   const T *restrict s, T *restrict o0, T *restrict o1)
{
    for (int64_t r = 0; r < nrow; ++r) {
        const S *restrict p = x + r * C;
        #pragma omp simd
        for (int64_t c = 0; c < C; ++c) { T u = LD(p[c]) - s[c]; o0[c] += u; o1[c] += u * u; }
    }
}

/* f = [|x − m0[c]| r0[c] ≤ th];  o0 += f,  o1 += f (x − m0),  o2 += f (x − m0)²  (eq. 5–7) */
static NOINLINE void SFX(col_filter)(const S *restrict x, int64_t nrow, int64_t C,
                                     const T *restrict m0, const T *restrict r0, T th,
                                     T *restrict o0, T *restrict o1, T *restrict o2)
{
    for (int64_t r = 0; r < nrow; ++r) {
        const S *restrict p = x + r * C;
        #pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
            T u = LD(p[c]) - m0[c];
            T f = FABS(u * r0[c]) <= th ? (T)1 : (T)0;
            u = u * f;
            o0[c] += f; o1[c] += u; o2[c] += u * u;
        }
    }
}

/* y = x a[c] + b[c] (eq. 8), then act 1: max(y, t[c]), act 2: max(y, k[c] y + t[c]) */
static NOINLINE void SFX(col_affine)(const S *restrict x, S *restrict y, int64_t nrow, int64_t C,
                                     const T *restrict a, const T *restrict b, int act,
                                     const T *restrict t, const T *restrict k)
{
    for (int64_t r = 0; r < nrow; ++r) {
        const S *restrict p = x + r * C;
        S *restrict q = y + r * C;
        if (act == 0) {
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) q[c] = ST(LD(p[c]) * a[c] + b[c]);
        } else if (act == 1) {
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) { T v = LD(p[c]) * a[c] + b[c]; q[c] = ST(v >= t[c] ? v : t[c]); }
        } else {
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                T v = LD(p[c]) * a[c] + b[c]; T h = k[c] * v + t[c]; q[c] = ST(v >= h ? v : h);
            }
        }
    }
}

/* With dy = ∂ℓ/∂y recovered from dz = ∂ℓ/∂z through the activation (recomputed from x):
   o0 += Σ dy, o1 += Σ dy (x − mu[c]), o2 += Σ dz where the TLU chose τ (∂ℓ/∂τ),
   o3 += Σ dz y there (∂ℓ/∂κ of the affine TLU). act 0 leaves o2, o3 alone. */
static NOINLINE void SFX(col_bwd_sums)(const S *restrict x, const S *restrict d, int64_t nrow,
                                       int64_t C, const T *restrict mu, int act,
                                       const T *restrict a, const T *restrict b,
                                       const T *restrict t, const T *restrict k,
                                       T *restrict o0, T *restrict o1, T *restrict o2,
                                       T *restrict o3)
{
    for (int64_t r = 0; r < nrow; ++r) {
        const S *restrict p = x + r * C, *restrict g = d + r * C;
        if (act == 0) {
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) { T dd = LD(g[c]); o0[c] += dd; o1[c] += dd * (LD(p[c]) - mu[c]); }
        } else if (act == 1) {
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                T v = LD(p[c]), dd = LD(g[c]);
                T keep = (v * a[c] + b[c]) >= t[c] ? (T)1 : (T)0;
                T dy = keep * dd;
                o0[c] += dy; o1[c] += dy * (v - mu[c]); o2[c] += dd - dy;
            }
        } else {
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                T v = LD(p[c]), dd = LD(g[c]);
                T y = v * a[c] + b[c];
                T keep = y >= k[c] * y + t[c] ? (T)1 : (T)0;
                T dy = keep * dd + ((T)1 - keep) * k[c] * dd;
                T rest = ((T)1 - keep) * dd;
                o0[c] += dy; o1[c] += dy * (v - mu[c]); o2[c] += rest; o3[c] += rest * y;
            }
        }
    }
}

/* dx = A[c] dy − f (B[c] + (x − mu[c]) Cc[c]),  f = [|x − m0[c]| r0[c] ≤ th[c]] */
static NOINLINE void SFX(col_bwd_dx)(const S *restrict x, const S *restrict d, S *restrict q,
                                     int64_t nrow, int64_t C, int act, const T *restrict a,
                                     const T *restrict b, const T *restrict t,
                                     const T *restrict k, const T *restrict A,
                                     const T *restrict B, const T *restrict Cc,
                                     const T *restrict mu, const T *restrict m0,
                                     const T *restrict r0, const T *restrict th)
{
    for (int64_t r = 0; r < nrow; ++r) {
        const S *restrict p = x + r * C, *restrict g = d + r * C;
        S *restrict o = q + r * C;
        if (act == 0) {
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                T v = LD(p[c]);
                T f = FABS((v - m0[c]) * r0[c]) <= th[c] ? (T)1 : (T)0;
                o[c] = ST(A[c] * LD(g[c]) - f * (B[c] + (v - mu[c]) * Cc[c]));
            }
        } else if (act == 1) {
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                T v = LD(p[c]), dd = LD(g[c]);
                T dy = (v * a[c] + b[c]) >= t[c] ? dd : (T)0;
                T f = FABS((v - m0[c]) * r0[c]) <= th[c] ? (T)1 : (T)0;
                o[c] = ST(A[c] * dy - f * (B[c] + (v - mu[c]) * Cc[c]));
            }
        } else {
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                T v = LD(p[c]), dd = LD(g[c]);
                T y = v * a[c] + b[c];
                T dy = y >= k[c] * y + t[c] ? dd : k[c] * dd;
                T f = FABS((v - m0[c]) * r0[c]) <= th[c] ? (T)1 : (T)0;
                o[c] = ST(A[c] * dy - f * (B[c] + (v - mu[c]) * Cc[c]));
            }
        }
    }
}

/* Per-channel sums over rows [lo, hi) of x (and d), into acc (nacc C-vectors of double):
   mode 0 plain sums (v = {shift}), mode 1 filter sums (v = {m0, r0}, th),
   mode 2 backward sums (v = {mu, a, b, t, k}, act). tp: nacc·C values of T scratch. */
static void SFX(col_accumulate)(int mode, const S *x, const S *d, int64_t lo, int64_t hi,
                                int64_t C, const T *const *v, int act, T th, int nacc,
                                double *acc, T *tp)
{
    int64_t nv = nacc * C;
    for (int64_t i = 0; i < nv; ++i) acc[i] = 0;
    for (int64_t r = lo; r < hi; r += CHUNK) {
        int64_t n = hi - r < CHUNK ? hi - r : CHUNK;
        for (int64_t i = 0; i < nv; ++i) tp[i] = 0;
        if (mode == 0)
            SFX(col_sums)(x + r * C, n, C, v[0], tp, tp + C);
        else if (mode == 1)
            SFX(col_filter)(x + r * C, n, C, v[0], v[1], th, tp, tp + C, tp + 2 * C);
        else
            SFX(col_bwd_sums)(x + r * C, d + r * C, n, C, v[0], act, v[1], v[2], v[3], v[4],
                              tp, tp + C, tp + 2 * C, tp + 3 * C);
        for (int64_t i = 0; i < nv; ++i) acc[i] += tp[i];
    }
}

/* The same sums over all R rows: thread t takes rows [R t/nt, R (t+1)/nt) with its own
   accumulators (work + t·WORK_PER·C), then the thread sums are added per channel into out. */
static void SFX(col_reduce)(int mode, const S *x, const S *d, int64_t R, int64_t C,
                            const T *const *v, int act, T th, int nacc, double *work, int nt,
                            double *out)
{
    #pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int t = 0; t < nt; ++t) {
        double *wk = work + (int64_t)t * WORK_PER * C;
        SFX(col_accumulate)(mode, x, d, R * t / nt, R * (t + 1) / nt, C, v, act, th, nacc,
                            wk, (T *)(wk + 4 * C));
    }
    for (int64_t i = 0; i < nacc * C; ++i) {
        double s = 0;
        for (int t = 0; t < nt; ++t) s += work[(int64_t)t * WORK_PER * C + i];
        out[i] = s;
    }
}

/* ---- channels_last batch norm: x (N, C, L) with strides (L·C, 1, C), i.e. an (N·L, C)
   matrix; statistics per column. Three passes over the rows, each split among the threads:
   plain sums, filter sums (thr > 0), y = x a + b. work: (nt + 1)·WORK_PER·C doubles. ---- */
void SFX(bnc_fwd)(const S *x, S *y, const T *w, const T *b, int64_t N, int64_t C, int64_t L,
                  int centered, double eps, double thr, double kap,
                  T *mean0, T *var0, T *mean, T *var, T *rstd, T *cnt, T *rm, T *rv,
                  double factor, double *work, int nt)
{
    int64_t R = N * L;
    double m = (double)R;
    double *tail = work + (int64_t)nt * WORK_PER * C;      /* shared after the thread areas */
    double *fs = tail, *ps = tail + 4 * C;                 /* filter sums (3C), plain (2C) */
    T *sh = (T *)(tail + 6 * C), *r0 = sh + C, *av = r0 + C, *bv = av + C;
    for (int64_t c = 0; c < C; ++c) sh[c] = centered ? LD(x[c]) : (T)0;   /* row 0: x[0, c, 0] */
    const T *v0[1] = {sh};
    SFX(col_reduce)(0, x, NULL, R, C, v0, 0, (T)0, 2, work, nt, ps);
    for (int64_t c = 0; c < C; ++c)
        SFX(plain_moments)(ps[c], ps[C + c], m, sh[c], centered, eps, mean0 + c, var0 + c, r0 + c);
    if (thr > 0) {
        const T *v1[2] = {mean0, r0};
        SFX(col_reduce)(1, x, NULL, R, C, v1, 0, (T)thr, 3, work, nt, fs);
    }
    for (int64_t c = 0; c < C; ++c) {
        double M = thr > 0 ? fs[c] : 0, sf = thr > 0 ? fs[C + c] : 0, sff = thr > 0 ? fs[2 * C + c] : 0;
        SFX(final_moments)(ps[c], ps[C + c], m, sh[c], mean0[c], M, sf, sff, centered, eps,
                           thr, kap, mean + c, var + c, rstd + c, cnt + c);
        av[c] = (w ? w[c] : (T)1) * rstd[c];
        bv[c] = (b ? b[c] : (T)0) - mean[c] * av[c];
    }
    #pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int t = 0; t < nt; ++t) {
        int64_t lo = R * t / nt, hi = R * (t + 1) / nt;
        SFX(col_affine)(x + lo * C, y + lo * C, hi - lo, C, av, bv, 0, NULL, NULL);
    }
    SFX(update_running)(rm, rv, mean, var, cnt, C, factor);
}

void SFX(bnc_bwd)(const S *x, const S *dy, S *dx, const T *w, int64_t N, int64_t C, int64_t L,
                  int centered, double eps, double thr, double kap,
                  const T *mean0, const T *var0, const T *mean, const T *rstd, const T *cnt,
                  T *s_dy, T *s_dyxhat, double *work, int nt)
{
    int64_t R = N * L;
    double m = (double)R;
    double *tail = work + (int64_t)nt * WORK_PER * C, *sums = tail;   /* 4C */
    T *A = (T *)(tail + 4 * C), *B = A + C, *Cc = B + C, *r0 = Cc + C, *th = r0 + C;
    const T *v[5] = {mean, NULL, NULL, NULL, NULL};
    SFX(col_reduce)(2, x, dy, R, C, v, 0, (T)0, 4, work, nt, sums);
    for (int64_t c = 0; c < C; ++c) {
        double r = rstd[c], sd = sums[c], sdxh = r * sums[C + c];
        s_dy[c] = (T)sd; s_dyxhat[c] = (T)sdxh;
        double wc = w ? w[c] : 1.0, M = cnt[c];
        A[c] = (T)(r * wc);
        SFX(bwd_coeffs)(r, wc * sd, wc * sdxh, M, m, var0[c], centered, eps, thr, kap,
                        B + c, Cc + c, r0 + c, th + c);
    }
    if (!dx) return;
    #pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int t = 0; t < nt; ++t) {
        int64_t lo = R * t / nt, hi = R * (t + 1) / nt;
        SFX(col_bwd_dx)(x + lo * C, dy + lo * C, dx + lo * C, hi - lo, C, 0, NULL, NULL, NULL,
                        NULL, A, B, Cc, mean, mean0, r0, th);
    }
}

/* ---- channels_last row family: x read as (N, G, Cg, L) stored in the order (N, L, G, Cg);
   sample n is an (L, C) block (C = G·Cg) and set (n, g) is its columns [g·Cg, (g+1)·Cg).
   Threads split the samples; a sample's block is read from memory by the first pass and
   re-read from cache by the others. Per-channel sums are combined into group sums.
   work: (nt + 1)·WORK_PER·C doubles. ---- */
void SFX(rowc_fwd)(const S *x, S *y, const T *w, const T *b, const T *tau, const T *ak,
                   int64_t N, int64_t G, int64_t Cg, int64_t L, int centered, double eps,
                   double thr, double kap, int act,
                   T *mean0, T *var0, T *mean, T *var, T *rstd, T *cnt, double *work, int nt)
{
    int64_t C = G * Cg;
    double m = (double)Cg * L;
    #pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int t = 0; t < nt; ++t) {
        double *wk = work + (int64_t)t * WORK_PER * C;
        double *acc = wk, *gs = wk + 8 * C;                /* 3C sums; group plain sums 2G */
        T *tp = (T *)(wk + 4 * C);
        T *m0 = (T *)(wk + 10 * C), *r0 = m0 + C, *av = r0 + C, *bv = av + C;
        for (int64_t n = N * t / nt; n < N * (t + 1) / nt; ++n) {
            const S *xs = x + n * L * C;
            S *ys = y + n * L * C;
            for (int64_t c = 0; c < C; ++c) m0[c] = centered ? LD(xs[c / Cg * Cg]) : (T)0;
            const T *v0[1] = {m0};                          /* the shift: first value of the set */
            SFX(col_accumulate)(0, xs, NULL, 0, L, C, v0, 0, (T)0, 2, acc, tp);
            for (int64_t g = 0; g < G; ++g) {
                int64_t s = n * G + g;
                double a0 = 0, a1 = 0;
                for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) { a0 += acc[c]; a1 += acc[C + c]; }
                gs[g] = a0; gs[G + g] = a1;
                T r0g;
                SFX(plain_moments)(a0, a1, m, m0[g * Cg], centered, eps, mean0 + s, var0 + s, &r0g);
                for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) { m0[c] = mean0[s]; r0[c] = r0g; }
            }
            if (thr > 0) {
                const T *v1[2] = {m0, r0};
                SFX(col_accumulate)(1, xs, NULL, 0, L, C, v1, 0, (T)thr, 3, acc, tp);
            }
            for (int64_t g = 0; g < G; ++g) {
                int64_t s = n * G + g;
                double M = 0, sf = 0, sff = 0;
                if (thr > 0)
                    for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
                        M += acc[c]; sf += acc[C + c]; sff += acc[2 * C + c];
                    }
                T shift = centered ? LD(xs[g * Cg]) : (T)0;
                SFX(final_moments)(gs[g], gs[G + g], m, shift, mean0[s], M, sf, sff, centered,
                                   eps, thr, kap, mean + s, var + s, rstd + s, cnt + s);
                for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
                    av[c] = (w ? w[c] : (T)1) * rstd[s];
                    bv[c] = (b ? b[c] : (T)0) - mean[s] * av[c];
                }
            }
            SFX(col_affine)(xs, ys, L, C, av, bv, act, tau, ak);
        }
    }
}

void SFX(rowc_bwd)(const S *x, const S *dz, S *dx, const T *w, const T *b, const T *tau,
                   const T *ak, int64_t N, int64_t G, int64_t Cg, int64_t L, int centered,
                   double eps, double thr, double kap, int act,
                   const T *mean0, const T *var0, const T *mean, const T *rstd, const T *cnt,
                   T *s_dy, T *s_dyxhat, T *s_dtau, T *s_dak, T *s_gxhat, double *work, int nt)
{
    int64_t C = G * Cg;
    double m = (double)Cg * L;
    #pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int t = 0; t < nt; ++t) {
        double *wk = work + (int64_t)t * WORK_PER * C, *acc = wk;     /* 4C sums */
        T *tp = (T *)(wk + 4 * C);
        T *muv = (T *)(wk + 8 * C), *av = muv + C, *bv = av + C, *A = bv + C, *B = A + C;
        T *Cc = B + C, *m0 = Cc + C, *r0 = m0 + C, *th = r0 + C;
        for (int64_t n = N * t / nt; n < N * (t + 1) / nt; ++n) {
            const S *xs = x + n * L * C, *ds = dz + n * L * C;
            for (int64_t c = 0; c < C; ++c) {
                int64_t s = n * G + c / Cg;
                muv[c] = mean[s];
                av[c] = (w ? w[c] : (T)1) * rstd[s];
                bv[c] = (b ? b[c] : (T)0) - mean[s] * av[c];
            }
            const T *v[5] = {muv, av, bv, tau, ak};
            SFX(col_accumulate)(2, xs, ds, 0, L, C, v, act, (T)0, 4, acc, tp);
            for (int64_t g = 0; g < G; ++g) {
                int64_t s = n * G + g;
                double rs = rstd[s], sg = 0, sgxh = 0;
                for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
                    double wc = w ? w[c] : 1.0, sdxh = rs * acc[C + c];
                    s_dy[n * C + c] = (T)acc[c]; s_dyxhat[n * C + c] = (T)sdxh;
                    s_dtau[n * C + c] = (T)acc[2 * C + c]; s_dak[n * C + c] = (T)acc[3 * C + c];
                    sg += wc * acc[c]; sgxh += wc * sdxh;
                }
                s_gxhat[s] = (T)sgxh;
                double M = cnt[s];
                T Bg, Ccg, r0g, thg;
                SFX(bwd_coeffs)(rs, sg, sgxh, M, m, var0[s], centered, eps, thr, kap,
                                &Bg, &Ccg, &r0g, &thg);
                for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
                    A[c] = (T)(rs * (w ? (double)w[c] : 1.0));
                    B[c] = Bg; Cc[c] = Ccg; m0[c] = mean0[s]; r0[c] = r0g; th[c] = thg;
                }
            }
            if (dx)
                SFX(col_bwd_dx)(xs, ds, dx + n * L * C, L, C, act, av, bv, tau, ak, A, B, Cc,
                                muv, m0, r0, th);
        }
    }
}
"""

HEADER = ("#include <stdint.h>\n#include <math.h>\n#include <stddef.h>\n#define CHUNK 1024\n"
            f"#define WORK_PER {WORK_PER}\n"
            "#if defined(__GNUC__) && !defined(__clang__)\n#define NOINLINE __attribute__((noinline, noipa))\n"
            "#else\n#define NOINLINE __attribute__((noinline))\n#endif\n")

# Loads and stores of bfloat16 storage. Arithmetic stays in float (the kernels' T); only the
# values read from / written to x, y, ∂ℓ/∂y and ∂ℓ/∂x pass through these helpers.
HALF = r"""
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
"""

# (suffix, storage type S, arithmetic type T, load S → T, store T → S). The float/double
# kernels store what they compute; the bfloat16 ones compute in float.
INSTANCES = (
    ("f32", "float", "float", "(v)", "(v)"),
    ("f64", "double", "double", "(v)", "(v)"),
    ("bf16", "uint16_t", "float", "bf16_ld(v)", "bf16_st(v)"),
)


def source() -> str:
    """The full translation unit: the body once per storage type (``_f32``, ``_f64``,
    ``_bf16``; bfloat16 with float arithmetic)."""
    parts = [HEADER, HALF]
    for suffix, storage, ctype, load, store in INSTANCES:
        fabs = "fabsf" if ctype == "float" else "fabs"
        parts.append(f"#define T {ctype}\n#define S {storage}\n#define LD(v) {load}\n"
                     f"#define ST(v) {store}\n#define FABS {fabs}\n"
                     f"#define SFX(name) name##_{suffix}\n"
                     f"{BODY}\n#undef T\n#undef S\n#undef LD\n#undef ST\n#undef FABS\n#undef SFX\n")
    return "".join(parts)
