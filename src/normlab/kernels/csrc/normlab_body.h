/* Body of the fused kernels, included by normlab_kernels.c once per storage type with
     S       storage type of x, y, ∂ℓ/∂y, ∂ℓ/∂x
     T       arithmetic type (statistics, parameters, partial sums)
     LD, ST  conversions S → T and T → S
     FABS    |·| in T
     SFX     the name suffix (_f32, _f64, _bf16)
   (no include guard: included three times on purpose).

   Notation (see kernels/analytic.py): plain moments μ0, σ0² (centered) or 0, ν²
   (uncentered); mask f = [|x − μ0| r0 ≤ T], r0 = (σ0² + ε)^(-1/2) (filtered-BN seed eq. 4–5;
   all ones when a set would keep nothing); filtered moments over the kept values (eq. 6–7,
   divided by κ when Gaussian-consistent); y = γ (x − μ) r + β (eq. 8), optionally
   z = max(y, τ) (FRN seed eq. 3) or max(y, κ_a y + τ) (affine TLU). Backward, with
   g = γ ∂ℓ/∂y: ∂ℓ/∂x = r (g − f (Σg/M + x̂ Σg x̂/(κM))) (no Σg term when uncentered).

   Two memory layouts: contiguous (bn_*, row_*: a set is one run, or N runs of L values)
   and channels_last (bnc_*, rowc_*: rows of C contiguous channel values; a set is a column
   or a block of columns, and the loops vectorize over channels). */

/* x − μ for μ = mh + ml (see "Exactness rule" in normlab_kernels.c) */
#define CENTER(v, mh, ml) (((v) - (mh)) - (ml))
/* the filter mask f = [|x − μ0| r0 ≤ th] as 0/1 in T; NaN compares false (dropped) */
#define KEEP(v, mh, ml, r0, th) (FABS(CENTER(v, mh, ml) * (r0)) <= (th) ? (T)1 : (T)0)

/* A double as hi + lo in T (lo = 0 for a non-finite value). */
static inline void SFX(split)(double v, T *hi, T *lo)
{
    T h = (T)v;
    *hi = h;
    *lo = isfinite(v) ? (T)(v - (double)h) : (T)0;
}

/* r0, the scale of the filter test, from the stored plain variance (forward and backward
   compute it from the same stored value, so both see the same mask). */
static inline T SFX(filter_scale)(T var0, double eps)
{
    return (T)(1.0 / sqrt((double)var0 + eps));
}

/* ---- leaf loops over a chunk of nseg runs of len values, stride apart (≤ CHUNK values);
   kept out of line (NOINLINE) so each is vectorized as written. Values of x, y, dy, dx
   are read through LD and written through ST. ------------------------------------------ */

/* Sweep 1: o = {count, Σ f x} (the sum in double), f = 1 or the mask (filt). */
static NOINLINE void SFX(leaf_sum)(const S *p, int64_t stride, int64_t nseg, int64_t len,
                                   int filt, T m0h, T m0l, T r0, T th, double *o)
{
    double s = 0;
    T c = 0;
    for (int64_t k = 0; k < nseg; ++k) {
        const S *q = p + k * stride;
        if (filt) {
            #pragma omp simd reduction(+:s, c)
            for (int64_t l = 0; l < len; ++l) {
                T v = LD(q[l]);
                T f = KEEP(v, m0h, m0l, r0, th);
                c += f;
                s += (double)(f * v);
            }
        } else {
            #pragma omp simd reduction(+:s)
            for (int64_t l = 0; l < len; ++l) s += (double)LD(q[l]);
        }
    }
    o[0] = filt ? (double)c : (double)(nseg * len);
    o[1] = s;
}

/* Sweep 2 (centered): o = {Σ f u, Σ f u²}, u = x − c with c = ch + cl the chunk's mean. */
static NOINLINE void SFX(leaf_dev)(const S *p, int64_t stride, int64_t nseg, int64_t len,
                                   int filt, T m0h, T m0l, T r0, T th, T ch, T cl, T *o)
{
    T a = 0, b = 0;
    for (int64_t k = 0; k < nseg; ++k) {
        const S *q = p + k * stride;
        if (filt) {
            #pragma omp simd reduction(+:a, b)
            for (int64_t l = 0; l < len; ++l) {
                T v = LD(q[l]);
                T u = CENTER(v, ch, cl) * KEEP(v, m0h, m0l, r0, th);
                a += u; b += u * u;
            }
        } else {
            #pragma omp simd reduction(+:a, b)
            for (int64_t l = 0; l < len; ++l) {
                T u = CENTER(LD(q[l]), ch, cl);
                a += u; b += u * u;
            }
        }
    }
    o[0] = a; o[1] = b;
}

/* Uncentered (one sweep, nothing to cancel): o = {Σ f, Σ (f x)²}; 0·Inf = NaN as in the
   reference's mask product. */
static NOINLINE void SFX(leaf_sq)(const S *p, int64_t stride, int64_t nseg, int64_t len,
                                  int filt, T r0, T th, T *o)
{
    T c = 0, b = 0;
    for (int64_t k = 0; k < nseg; ++k) {
        const S *q = p + k * stride;
        if (filt) {
            #pragma omp simd reduction(+:c, b)
            for (int64_t l = 0; l < len; ++l) {
                T v = LD(q[l]);
                T f = KEEP(v, (T)0, (T)0, r0, th);
                T u = f * v;
                c += f; b += u * u;
            }
        } else {
            #pragma omp simd reduction(+:b)
            for (int64_t l = 0; l < len; ++l) { T v = LD(q[l]); b += v * v; }
        }
    }
    o[0] = filt ? c : (T)(nseg * len);
    o[1] = b;
}

/* y = (x − μ) a + b (eq. 8, a = γ r), then act 1: max(y, t), act 2: max(y, k y + t); a NaN
   y passes through (y < t ? t : y). */
static NOINLINE void SFX(leaf_affine)(const S *p, S *q, int64_t stride, int64_t nseg,
                                      int64_t len, T mh, T ml, T a, T b, int act, T t, T k)
{
    for (int64_t s = 0; s < nseg; ++s) {
        const S *pp = p + s * stride;
        S *qq = q + s * stride;
        if (act == 0) {
            #pragma omp simd
            for (int64_t l = 0; l < len; ++l) qq[l] = ST(CENTER(LD(pp[l]), mh, ml) * a + b);
        } else if (act == 1) {
            #pragma omp simd
            for (int64_t l = 0; l < len; ++l) {
                T y = CENTER(LD(pp[l]), mh, ml) * a + b;
                qq[l] = ST(y < t ? t : y);
            }
        } else {
            #pragma omp simd
            for (int64_t l = 0; l < len; ++l) {
                T y = CENTER(LD(pp[l]), mh, ml) * a + b;
                T h = k * y + t;
                qq[l] = ST(y < h ? h : y);
            }
        }
    }
}

/* o: Σ dy, Σ dy (x − μ), Σ dz where the TLU chose τ, Σ dz·y there (affine TLU), with dy
   recovered from dz = ∂ℓ/∂z through the activation (recomputed from x as in forward). */
static NOINLINE void SFX(leaf_bwd_sums)(const S *p, const S *d, int64_t stride, int64_t nseg,
                                        int64_t len, T mh, T ml, int act, T a, T b, T t, T k,
                                        T *o)
{
    T s1 = 0, s2 = 0, s3 = 0, s4 = 0;
    for (int64_t s = 0; s < nseg; ++s) {
        const S *pp = p + s * stride, *dd = d + s * stride;
        if (act == 0) {
            #pragma omp simd reduction(+:s1, s2)
            for (int64_t l = 0; l < len; ++l) {
                T g = LD(dd[l]);
                s1 += g; s2 += g * CENTER(LD(pp[l]), mh, ml);
            }
        } else if (act == 1) {
            #pragma omp simd reduction(+:s1, s2, s3)
            for (int64_t l = 0; l < len; ++l) {
                T xm = CENTER(LD(pp[l]), mh, ml), g = LD(dd[l]);
                T dy = xm * a + b < t ? (T)0 : g;
                s1 += dy; s2 += dy * xm; s3 += g - dy;
            }
        } else {
            #pragma omp simd reduction(+:s1, s2, s3, s4)
            for (int64_t l = 0; l < len; ++l) {
                T xm = CENTER(LD(pp[l]), mh, ml), g = LD(dd[l]);
                T y = xm * a + b;
                T low = y < k * y + t ? (T)1 : (T)0;
                T rest = low * g;
                T dy = (g - rest) + rest * k;
                s1 += dy; s2 += dy * xm; s3 += rest; s4 += rest * y;
            }
        }
    }
    o[0] = s1; o[1] = s2; o[2] = s3; o[3] = s4;
}

/* dx = A dy − f (B + (x − μ) Cc), f = the mask (th < ∞; else every value is kept) */
static NOINLINE void SFX(leaf_bwd_dx)(const S *p, const S *d, S *q, int64_t stride,
                                      int64_t nseg, int64_t len, int act, T mh, T ml, T a, T b,
                                      T t, T k, T A, T B, T Cc, T m0h, T m0l, T r0, T th)
{
    int filt = th < (T)INFINITY;   /* else f = 1: the compiler makes a loop without the test */
    for (int64_t s = 0; s < nseg; ++s) {
        const S *pp = p + s * stride, *dd = d + s * stride;
        S *qq = q + s * stride;
        if (act == 0) {
            #pragma omp simd
            for (int64_t l = 0; l < len; ++l) {
                T v = LD(pp[l]);
                T fc = !filt || KEEP(v, m0h, m0l, r0, th) != 0 ? B + CENTER(v, mh, ml) * Cc : (T)0;
                qq[l] = ST(A * LD(dd[l]) - fc);
            }
        } else if (act == 1) {
            #pragma omp simd
            for (int64_t l = 0; l < len; ++l) {
                T v = LD(pp[l]), g = LD(dd[l]);
                T xm = CENTER(v, mh, ml);
                T dy = xm * a + b < t ? (T)0 : g;
                T fc = !filt || KEEP(v, m0h, m0l, r0, th) != 0 ? B + xm * Cc : (T)0;
                qq[l] = ST(A * dy - fc);
            }
        } else {
            #pragma omp simd
            for (int64_t l = 0; l < len; ++l) {
                T v = LD(pp[l]), g = LD(dd[l]);
                T xm = CENTER(v, mh, ml);
                T y = xm * a + b;
                T dy = y < k * y + t ? k * g : g;
                T fc = !filt || KEEP(v, m0h, m0l, r0, th) != 0 ? B + xm * Cc : (T)0;
                qq[l] = ST(A * dy - fc);
            }
        }
    }
}

/* ---- one set: moments chunk by chunk, merged in double ------------------------------- */

/* Merge the moments of one chunk (all values, or the kept ones when filt) into acc; raw
   collects Σ f x (the mean of a set whose moments are not finite). */
static void SFX(chunk_moments)(const S *p, int64_t stride, nl_chunk ch, int centered, int filt,
                               T m0h, T m0l, T r0, T th, nl_moments *acc, double *raw)
{
    const S *q = p + ch.off;
    if (!centered) {
        T o[2];
        SFX(leaf_sq)(q, stride, ch.nseg, ch.len, filt, r0, th, o);
        nl_merge(acc, (double)o[0], 0.0, (double)o[1]);
        return;
    }
    double s[2];
    SFX(leaf_sum)(q, stride, ch.nseg, ch.len, filt, m0h, m0l, r0, th, s);
    *raw += s[1];
    if (s[0] == 0) return;
    double c = s[1] / s[0];
    T chh, chl, o[2];
    SFX(split)(c, &chh, &chl);
    SFX(leaf_dev)(q, stride, ch.nseg, ch.len, filt, m0h, m0l, r0, th, chh, chl, o);
    double d = o[0], dn = d / s[0];
    nl_merge(acc, s[0], c + dn, (double)o[1] - d * dn);
}

/* Moments of a set of nseg runs of len values (stride apart); filt: over the kept values. */
static void SFX(set_moments)(const S *x, int64_t stride, int64_t nseg, int64_t len,
                             int centered, int filt, T m0h, T m0l, T r0, T th,
                             nl_moments *acc, double *raw)
{
    int64_t nch = nl_nchunks(nseg, len);
    acc->n = acc->mean = acc->m2 = 0;
    *raw = 0;
    for (int64_t i = 0; i < nch; ++i)
        SFX(chunk_moments)(x, stride, nl_chunk_at(i, stride, nseg, len), centered, filt,
                           m0h, m0l, r0, th, acc, raw);
}

/* Write the plain moments (mean0, var0 from n, mean, m2) to column s of the statistics
   block st (ns sets); returns them in double and r0 for the filter. */
static void SFX(store_plain)(const nl_moments *a, double raw, int centered, double eps, T *st,
                             int64_t ns, int64_t s, double *mean0, double *var0, T *r0)
{
    nl_finish(a, raw, centered, mean0, var0);
    SFX(split)(*mean0, st + ST_MEAN0 * ns + s, st + ST_MEAN0_LO * ns + s);
    st[ST_VAR0 * ns + s] = (T)*var0;
    *r0 = SFX(filter_scale)(st[ST_VAR0 * ns + s], eps);
}

/* Write the moments used to normalize: the kept values' (b, rawb) when filtering kept any,
   else the plain ones (mean0, var0 over m values); the filtered variance divided by kap. */
static void SFX(store_final)(const nl_moments *b, double rawb, int centered, double thr,
                             double kap, double eps, double mean0, double var0, double m,
                             T *st, int64_t ns, int64_t s)
{
    double mean = mean0, var = var0, M = m;
    if (thr > 0 && b->n > 0) {
        nl_finish(b, rawb, centered, &mean, &var);
        M = b->n;
    }
    if (thr > 0) var /= kap;
    SFX(split)(mean, st + ST_MEAN * ns + s, st + ST_MEAN_LO * ns + s);
    st[ST_VAR * ns + s] = (T)var;
    st[ST_RSTD * ns + s] = (T)(1.0 / sqrt(var + eps));
    st[ST_COUNT * ns + s] = (T)M;
}

/* Statistics of one set (plain, then filtered when thr > 0) into column s of st. */
static void SFX(set_stats)(const S *x, int64_t stride, int64_t nseg, int64_t len,
                           int centered, double eps, double thr, double kap, T *st,
                           int64_t ns, int64_t s)
{
    nl_moments a, b = {0, 0, 0};
    double raw, rawb = 0, mean0, var0;
    T r0;
    SFX(set_moments)(x, stride, nseg, len, centered, 0, 0, 0, 0, 0, &a, &raw);
    SFX(store_plain)(&a, raw, centered, eps, st, ns, s, &mean0, &var0, &r0);
    if (thr > 0)
        SFX(set_moments)(x, stride, nseg, len, centered, 1, st[ST_MEAN0 * ns + s],
                         st[ST_MEAN0_LO * ns + s], r0, (T)thr, &b, &rawb);
    SFX(store_final)(&b, rawb, centered, thr, kap, eps, mean0, var0, (double)nseg * len,
                     st, ns, s);
}

/* Backward sums of one set (chunked: partial sums in T over ≤ CHUNK values, then double). */
static void SFX(set_bwd_sums)(const S *x, const S *d, int64_t stride, int64_t nseg,
                              int64_t len, T mh, T ml, int act, T a, T b, T t, T k, double *o)
{
    int64_t nch = nl_nchunks(nseg, len);
    double s[4] = {0, 0, 0, 0};
    T tt[4];
    for (int64_t i = 0; i < nch; ++i) {
        nl_chunk ch = nl_chunk_at(i, stride, nseg, len);
        SFX(leaf_bwd_sums)(x + ch.off, d + ch.off, stride, ch.nseg, ch.len, mh, ml, act,
                           a, b, t, k, tt);
        for (int j = 0; j < 4; ++j) s[j] += tt[j];
    }
    for (int j = 0; j < 4; ++j) o[j] = s[j];
}

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
    *r0 = SFX(filter_scale)(var0, eps);
    *th = thr > 0 && M < m ? (T)thr : (T)INFINITY;
}

/* Running averages of a batch norm (rm == NULL: none): running ← running + a (batch − running),
   the variance unbiased over the kept count, σ′² M / (M − 1) (as torch's BatchNorm); a NaN
   or Inf batch statistic goes in as torch's batch norm puts it. */
static void SFX(update_running)(T *rm, T *rv, const T *st, int64_t C, double a)
{
    if (!rm) return;
    for (int64_t c = 0; c < C; ++c) {
        double M = st[ST_COUNT * C + c];
        double mean = (double)st[ST_MEAN * C + c] + (double)st[ST_MEAN_LO * C + c];
        double unbiased = (double)st[ST_VAR * C + c] * (M / (M > 1 ? M - 1 : 1));
        rm[c] = (T)(rm[c] + a * (mean - rm[c]));
        rv[c] = (T)(rv[c] + a * (unbiased - rv[c]));
    }
}

/* ---- batch norm family, contiguous: x is (N, C, L), statistics per channel c ---------- */
void SFX(bn_fwd)(const S *x, S *y, const T *w, const T *b, int64_t N, int64_t C, int64_t L,
                 int centered, double eps, double thr, double kap, T *st, T *rm, T *rv,
                 double factor, int nt)
{
    #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t c = 0; c < C; ++c) {
        SFX(set_stats)(x + c * L, C * L, N, L, centered, eps, thr, kap, st, C, c);
        T a = (w ? w[c] : (T)1) * st[ST_RSTD * C + c];
        SFX(leaf_affine)(x + c * L, y + c * L, C * L, N, L, st[ST_MEAN * C + c],
                         st[ST_MEAN_LO * C + c], a, b ? b[c] : (T)0, 0, (T)0, (T)0);
    }
    SFX(update_running)(rm, rv, st, C, factor);
}

void SFX(bn_bwd)(const S *x, const S *dy, S *dx, const T *w, int64_t N, int64_t C, int64_t L,
                 int centered, double eps, double thr, double kap, const T *st,
                 T *s_dy, T *s_dyxhat, int nt)
{
    double m = (double)N * L;
    #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t c = 0; c < C; ++c) {
        double o[4];
        T mh = st[ST_MEAN * C + c], ml = st[ST_MEAN_LO * C + c];
        SFX(set_bwd_sums)(x + c * L, dy + c * L, C * L, N, L, mh, ml, 0, 0, 0, 0, 0, o);
        double r = st[ST_RSTD * C + c], sd = o[0], sdxh = r * o[1];
        s_dy[c] = (T)sd; s_dyxhat[c] = (T)sdxh;
        if (!dx) continue;
        double wc = w ? w[c] : 1.0, M = st[ST_COUNT * C + c];
        T A = (T)(r * wc), B, Cc, r0, th;
        SFX(bwd_coeffs)(r, wc * sd, wc * sdxh, M, m, st[ST_VAR0 * C + c], centered, eps, thr,
                        kap, &B, &Cc, &r0, &th);
        SFX(leaf_bwd_dx)(x + c * L, dy + c * L, dx + c * L, C * L, N, L, 0, mh, ml, 0, 0, 0, 0,
                         A, B, Cc, st[ST_MEAN0 * C + c], st[ST_MEAN0_LO * C + c], r0, th);
    }
}

/* ---- row family, contiguous: x is (R, Cg·L), statistics per row; row r has group
   g = r % G, and channel (g, cg) owns the contiguous run [cg·L, (cg + 1)·L).
   act: 0 none, 1 TLU max(y, τ), 2 affine TLU max(y, κ_a y + τ). ----------------------- */
void SFX(row_fwd)(const S *x, S *y, const T *w, const T *b, const T *tau, const T *ak,
                  int64_t R, int64_t G, int64_t Cg, int64_t L, int centered, double eps,
                  double thr, double kap, int act, T *st, int nt)
{
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < R; ++r) {
        const S *xr = x + r * Cg * L;
        S *yr = y + r * Cg * L;
        int64_t g = r % G;
        SFX(set_stats)(xr, 0, 1, Cg * L, centered, eps, thr, kap, st, R, r);
        T mh = st[ST_MEAN * R + r], ml = st[ST_MEAN_LO * R + r], rs = st[ST_RSTD * R + r];
        for (int64_t cg = 0; cg < Cg; ++cg) {
            int64_t ch = g * Cg + cg;
            T a = (w ? w[ch] : (T)1) * rs;
            SFX(leaf_affine)(xr + cg * L, yr + cg * L, 0, 1, L, mh, ml, a, b ? b[ch] : (T)0,
                             act, tau ? tau[ch] : (T)0, ak ? ak[ch] : (T)0);
        }
    }
}

void SFX(row_bwd)(const S *x, const S *dz, S *dx, const T *w, const T *b, const T *tau,
                  const T *ak, int64_t R, int64_t G, int64_t Cg, int64_t L, int centered,
                  double eps, double thr, double kap, int act, const T *st,
                  T *s_dy, T *s_dyxhat, T *s_dtau, T *s_dak, T *s_gxhat, int nt)
{
    double m = (double)Cg * L;
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < R; ++r) {
        const S *xr = x + r * Cg * L, *dr = dz + r * Cg * L;
        int64_t g = r % G;
        T mh = st[ST_MEAN * R + r], ml = st[ST_MEAN_LO * R + r], rst = st[ST_RSTD * R + r];
        double rs = rst, sg = 0, sgxh = 0;
        for (int64_t cg = 0; cg < Cg; ++cg) {
            int64_t ch = g * Cg + cg;
            double wc = w ? w[ch] : 1.0, o[4];
            T a = (w ? w[ch] : (T)1) * rst;
            SFX(set_bwd_sums)(xr + cg * L, dr + cg * L, 0, 1, L, mh, ml, act, a,
                              b ? b[ch] : (T)0, tau ? tau[ch] : (T)0, ak ? ak[ch] : (T)0, o);
            double sdxh = rs * o[1];
            s_dy[r * Cg + cg] = (T)o[0]; s_dyxhat[r * Cg + cg] = (T)sdxh;
            s_dtau[r * Cg + cg] = (T)o[2]; s_dak[r * Cg + cg] = (T)o[3];
            sg += wc * o[0]; sgxh += wc * sdxh;
        }
        s_gxhat[r] = (T)sgxh;
        if (!dx) continue;
        double M = st[ST_COUNT * R + r];
        T B, Cc, r0, th;
        SFX(bwd_coeffs)(rs, sg, sgxh, M, m, st[ST_VAR0 * R + r], centered, eps, thr, kap,
                        &B, &Cc, &r0, &th);
        for (int64_t cg = 0; cg < Cg; ++cg) {
            int64_t ch = g * Cg + cg;
            T A = (T)(rs * (w ? (double)w[ch] : 1.0));
            T a = (w ? w[ch] : (T)1) * rst;
            SFX(leaf_bwd_dx)(xr + cg * L, dr + cg * L, dx + r * Cg * L + cg * L, 0, 1, L, act,
                             mh, ml, a, b ? b[ch] : (T)0, tau ? tau[ch] : (T)0,
                             ak ? ak[ch] : (T)0, A, B, Cc, st[ST_MEAN0 * R + r],
                             st[ST_MEAN0_LO * R + r], r0, th);
        }
    }
}

/* ==== channels_last layout ===========================================================
   x is stored as rows of C contiguous values (row stride C), one row per (sample, position):
   BN's (N, C, L) with strides (L·C, 1, C) is an (N·L, C) matrix, and sample n of the row
   family is an (L, C) block. Channel c is column c, so every leaf loop below runs over the C
   channels of one row (vectorized) with per-channel C-vectors for the means, mask and affine
   constants. Moments: per chunk of nl_block_rows rows (in L1), per channel, the same two
   sweeps and Chan merge as the contiguous kernels. */

/* Sweep 1: cnt[c] += f, sum[c] += f x (double) */
static NOINLINE void SFX(col_sum)(const S *restrict x, int64_t nrow, int64_t C, int filt,
                                  const T *restrict m0h, const T *restrict m0l,
                                  const T *restrict r0, T th, T *restrict cnt,
                                  double *restrict sum)
{
    for (int64_t r = 0; r < nrow; ++r) {
        const S *restrict p = x + r * C;
        if (filt) {
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                T v = LD(p[c]);
                T f = KEEP(v, m0h[c], m0l[c], r0[c], th);
                cnt[c] += f; sum[c] += (double)(f * v);
            }
        } else {
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) sum[c] += (double)LD(p[c]);
        }
    }
}

/* Sweep 2: d[c] += f u, q[c] += f u², u = x − (ch[c] + cl[c]) */
static NOINLINE void SFX(col_dev)(const S *restrict x, int64_t nrow, int64_t C, int filt,
                                  const T *restrict m0h, const T *restrict m0l,
                                  const T *restrict r0, T th, const T *restrict ch,
                                  const T *restrict cl, T *restrict d, T *restrict q)
{
    for (int64_t r = 0; r < nrow; ++r) {
        const S *restrict p = x + r * C;
        if (filt) {
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                T v = LD(p[c]);
                T u = CENTER(v, ch[c], cl[c]) * KEEP(v, m0h[c], m0l[c], r0[c], th);
                d[c] += u; q[c] += u * u;
            }
        } else {
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                T u = CENTER(LD(p[c]), ch[c], cl[c]);
                d[c] += u; q[c] += u * u;
            }
        }
    }
}

/* Uncentered: cnt[c] += f, q[c] += (f x)² */
static NOINLINE void SFX(col_sq)(const S *restrict x, int64_t nrow, int64_t C, int filt,
                                 const T *restrict r0, T th, T *restrict cnt, T *restrict q)
{
    for (int64_t r = 0; r < nrow; ++r) {
        const S *restrict p = x + r * C;
        if (filt) {
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                T v = LD(p[c]);
                T f = KEEP(v, (T)0, (T)0, r0[c], th);
                T u = f * v;
                cnt[c] += f; q[c] += u * u;
            }
        } else {
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) { T v = LD(p[c]); q[c] += v * v; }
        }
    }
}

/* Per-channel moments of rows [lo, hi), merged into mom[c] (zeroed here) with raw[c] = Σ f x.
   tmp: scratch of 6 C doubles. */
static void SFX(col_moments)(const S *x, int64_t lo, int64_t hi, int64_t C, int centered,
                             int filt, const T *m0h, const T *m0l, const T *r0, T th,
                             nl_moments *mom, double *raw, double *tmp)
{
    int64_t nb = nl_block_rows(C, sizeof(S));
    double *sum = tmp;
    T *cnt = (T *)(tmp + C), *chh = (T *)(tmp + 2 * C), *chl = (T *)(tmp + 3 * C);
    T *d = (T *)(tmp + 4 * C), *q = (T *)(tmp + 5 * C);
    for (int64_t c = 0; c < C; ++c) { mom[c].n = mom[c].mean = mom[c].m2 = 0; raw[c] = 0; }
    for (int64_t r = lo; r < hi; r += nb) {
        int64_t n = hi - r < nb ? hi - r : nb;
        const S *p = x + r * C;
        for (int64_t c = 0; c < C; ++c) { cnt[c] = 0; q[c] = 0; d[c] = 0; sum[c] = 0; }
        if (!centered) {
            SFX(col_sq)(p, n, C, filt, r0, th, cnt, q);
            for (int64_t c = 0; c < C; ++c)
                nl_merge(mom + c, filt ? (double)cnt[c] : (double)n, 0.0, (double)q[c]);
            continue;
        }
        SFX(col_sum)(p, n, C, filt, m0h, m0l, r0, th, cnt, sum);
        for (int64_t c = 0; c < C; ++c) {
            double k = filt ? (double)cnt[c] : (double)n;
            raw[c] += sum[c];
            SFX(split)(k > 0 ? sum[c] / k : 0.0, chh + c, chl + c);
        }
        SFX(col_dev)(p, n, C, filt, m0h, m0l, r0, th, chh, chl, d, q);
        for (int64_t c = 0; c < C; ++c) {
            double k = filt ? (double)cnt[c] : (double)n;
            if (k == 0) continue;
            double dd = d[c], dn = dd / k;
            nl_merge(mom + c, k, sum[c] / k + dn, (double)q[c] - dd * dn);
        }
    }
}

/* The same moments over all R rows: thread t takes rows [R t/nt, R (t+1)/nt) with its own
   area of work (WORK_PER·C doubles), then the thread parts are merged per channel in
   thread order (deterministic) into out, with raw sums. */
static void SFX(col_reduce)(const S *x, int64_t R, int64_t C, int centered, int filt,
                            const T *m0h, const T *m0l, const T *r0, T th, double *work,
                            int nt, nl_moments *out, double *raw)
{
    #pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int t = 0; t < nt; ++t) {
        double *wk = work + (int64_t)t * WORK_PER * C;
        SFX(col_moments)(x, R * t / nt, R * (t + 1) / nt, C, centered, filt, m0h, m0l, r0, th,
                         (nl_moments *)wk, wk + 3 * C, wk + 4 * C);
    }
    for (int64_t c = 0; c < C; ++c) {
        out[c].n = out[c].mean = out[c].m2 = 0;
        raw[c] = 0;
        for (int t = 0; t < nt; ++t) {
            double *wk = work + (int64_t)t * WORK_PER * C;
            nl_moments part = ((nl_moments *)wk)[c];
            nl_merge(out + c, part.n, part.mean, part.m2);
            raw[c] += wk[3 * C + c];
        }
    }
}

/* y = (x − μ[c]) a[c] + b[c] (eq. 8), then act 1: max(y, t[c]), act 2: max(y, k[c] y + t[c]) */
static NOINLINE void SFX(col_affine)(const S *restrict x, S *restrict y, int64_t nrow, int64_t C,
                                     const T *restrict mh, const T *restrict ml,
                                     const T *restrict a, const T *restrict b, int act,
                                     const T *restrict t, const T *restrict k)
{
    for (int64_t r = 0; r < nrow; ++r) {
        const S *restrict p = x + r * C;
        S *restrict q = y + r * C;
        if (act == 0) {
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) q[c] = ST(CENTER(LD(p[c]), mh[c], ml[c]) * a[c] + b[c]);
        } else if (act == 1) {
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                T v = CENTER(LD(p[c]), mh[c], ml[c]) * a[c] + b[c];
                q[c] = ST(v < t[c] ? t[c] : v);
            }
        } else {
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                T v = CENTER(LD(p[c]), mh[c], ml[c]) * a[c] + b[c];
                T h = k[c] * v + t[c];
                q[c] = ST(v < h ? h : v);
            }
        }
    }
}

/* With dy = ∂ℓ/∂y recovered from dz = ∂ℓ/∂z through the activation (recomputed from x):
   o0 += Σ dy, o1 += Σ dy (x − μ[c]), o2 += Σ dz where the TLU chose τ (∂ℓ/∂τ),
   o3 += Σ dz y there (∂ℓ/∂κ of the affine TLU). act 0 leaves o2, o3 alone. */
static NOINLINE void SFX(col_bwd_sums)(const S *restrict x, const S *restrict d, int64_t nrow,
                                       int64_t C, const T *restrict mh, const T *restrict ml,
                                       int act, const T *restrict a, const T *restrict b,
                                       const T *restrict t, const T *restrict k,
                                       T *restrict o0, T *restrict o1, T *restrict o2,
                                       T *restrict o3)
{
    for (int64_t r = 0; r < nrow; ++r) {
        const S *restrict p = x + r * C, *restrict g = d + r * C;
        if (act == 0) {
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                T dd = LD(g[c]);
                o0[c] += dd; o1[c] += dd * CENTER(LD(p[c]), mh[c], ml[c]);
            }
        } else if (act == 1) {
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                T xm = CENTER(LD(p[c]), mh[c], ml[c]), dd = LD(g[c]);
                T dy = xm * a[c] + b[c] < t[c] ? (T)0 : dd;
                o0[c] += dy; o1[c] += dy * xm; o2[c] += dd - dy;
            }
        } else {
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                T xm = CENTER(LD(p[c]), mh[c], ml[c]), dd = LD(g[c]);
                T y = xm * a[c] + b[c];
                T low = y < k[c] * y + t[c] ? (T)1 : (T)0;
                T rest = low * dd;
                T dy = (dd - rest) + rest * k[c];
                o0[c] += dy; o1[c] += dy * xm; o2[c] += rest; o3[c] += rest * y;
            }
        }
    }
}

/* dx = A[c] dy − f (B[c] + (x − μ[c]) Cc[c]),  f = [|x − μ0[c]| r0[c] ≤ th[c]] (th = ∞: 1) */
static NOINLINE void SFX(col_bwd_dx)(const S *restrict x, const S *restrict d, S *restrict q,
                                     int64_t nrow, int64_t C, int act, const T *restrict mh,
                                     const T *restrict ml, const T *restrict a,
                                     const T *restrict b, const T *restrict t,
                                     const T *restrict k, const T *restrict A,
                                     const T *restrict B, const T *restrict Cc,
                                     const T *restrict m0h, const T *restrict m0l,
                                     const T *restrict r0, const T *restrict th)
{
    for (int64_t r = 0; r < nrow; ++r) {
        const S *restrict p = x + r * C, *restrict g = d + r * C;
        S *restrict o = q + r * C;
        if (act == 0) {
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                T v = LD(p[c]);
                T f = th[c] == (T)INFINITY ? (T)1 : KEEP(v, m0h[c], m0l[c], r0[c], th[c]);
                o[c] = ST(A[c] * LD(g[c]) - f * (B[c] + CENTER(v, mh[c], ml[c]) * Cc[c]));
            }
        } else if (act == 1) {
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                T v = LD(p[c]), dd = LD(g[c]);
                T xm = CENTER(v, mh[c], ml[c]);
                T dy = xm * a[c] + b[c] < t[c] ? (T)0 : dd;
                T f = th[c] == (T)INFINITY ? (T)1 : KEEP(v, m0h[c], m0l[c], r0[c], th[c]);
                o[c] = ST(A[c] * dy - f * (B[c] + xm * Cc[c]));
            }
        } else {
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                T v = LD(p[c]), dd = LD(g[c]);
                T xm = CENTER(v, mh[c], ml[c]);
                T y = xm * a[c] + b[c];
                T dy = y < k[c] * y + t[c] ? k[c] * dd : dd;
                T f = th[c] == (T)INFINITY ? (T)1 : KEEP(v, m0h[c], m0l[c], r0[c], th[c]);
                o[c] = ST(A[c] * dy - f * (B[c] + xm * Cc[c]));
            }
        }
    }
}

/* Backward sums over rows [lo, hi) into acc (4 C-vectors of double, zeroed here), partial
   sums in T over ≤ CHUNK rows (tp: 4 C values of T). */
static void SFX(col_bwd_accumulate)(const S *x, const S *d, int64_t lo, int64_t hi, int64_t C,
                                    const T *mh, const T *ml, int act, const T *a, const T *b,
                                    const T *t, const T *k, double *acc, T *tp)
{
    for (int64_t i = 0; i < 4 * C; ++i) acc[i] = 0;
    for (int64_t r = lo; r < hi; r += CHUNK) {
        int64_t n = hi - r < CHUNK ? hi - r : CHUNK;
        for (int64_t i = 0; i < 4 * C; ++i) tp[i] = 0;
        SFX(col_bwd_sums)(x + r * C, d + r * C, n, C, mh, ml, act, a, b, t, k,
                          tp, tp + C, tp + 2 * C, tp + 3 * C);
        for (int64_t i = 0; i < 4 * C; ++i) acc[i] += tp[i];
    }
}

/* ---- channels_last batch norm: x (N, C, L) with strides (L·C, 1, C), i.e. an (N·L, C)
   matrix; statistics per column. Three passes over the rows, each split among the threads:
   plain moments, filtered moments (thr > 0), y. work: (nt + 1)·WORK_PER·C doubles. ---- */
void SFX(bnc_fwd)(const S *x, S *y, const T *w, const T *b, int64_t N, int64_t C, int64_t L,
                  int centered, double eps, double thr, double kap, T *st, T *rm, T *rv,
                  double factor, double *work, int nt)
{
    int64_t R = N * L;
    double *tail = work + (int64_t)nt * WORK_PER * C;      /* shared, after the thread areas */
    nl_moments *mom = (nl_moments *)tail;                    /* 3C */
    double *raw = tail + 3 * C, *plain = tail + 4 * C;       /* C, 2C (mean0, var0) */
    T *m0h = (T *)(tail + 6 * C), *m0l = (T *)(tail + 7 * C), *r0 = (T *)(tail + 8 * C);
    T *mh = (T *)(tail + 9 * C), *ml = (T *)(tail + 10 * C), *av = (T *)(tail + 11 * C);
    T *bv = (T *)(tail + 12 * C);
    SFX(col_reduce)(x, R, C, centered, 0, NULL, NULL, NULL, 0, work, nt, mom, raw);
    for (int64_t c = 0; c < C; ++c) {
        SFX(store_plain)(mom + c, raw[c], centered, eps, st, C, c, plain + c, plain + C + c,
                         r0 + c);
        m0h[c] = st[ST_MEAN0 * C + c]; m0l[c] = st[ST_MEAN0_LO * C + c];
    }
    if (thr > 0)
        SFX(col_reduce)(x, R, C, centered, 1, m0h, m0l, r0, (T)thr, work, nt, mom, raw);
    for (int64_t c = 0; c < C; ++c) {
        nl_moments none = {0, 0, 0};
        SFX(store_final)(thr > 0 ? mom + c : &none, thr > 0 ? raw[c] : 0, centered, thr, kap,
                         eps, plain[c], plain[C + c], (double)R, st, C, c);
        mh[c] = st[ST_MEAN * C + c]; ml[c] = st[ST_MEAN_LO * C + c];
        av[c] = (w ? w[c] : (T)1) * st[ST_RSTD * C + c];
        bv[c] = b ? b[c] : (T)0;
    }
    #pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int t = 0; t < nt; ++t) {
        int64_t lo = R * t / nt, hi = R * (t + 1) / nt;
        SFX(col_affine)(x + lo * C, y + lo * C, hi - lo, C, mh, ml, av, bv, 0, NULL, NULL);
    }
    SFX(update_running)(rm, rv, st, C, factor);
}

void SFX(bnc_bwd)(const S *x, const S *dy, S *dx, const T *w, int64_t N, int64_t C, int64_t L,
                  int centered, double eps, double thr, double kap, const T *st,
                  T *s_dy, T *s_dyxhat, double *work, int nt)
{
    int64_t R = N * L;
    double m = (double)R;
    double *tail = work + (int64_t)nt * WORK_PER * C, *sums = tail;   /* 4C */
    T *A = (T *)(tail + 4 * C), *B = (T *)(tail + 5 * C), *Cc = (T *)(tail + 6 * C);
    T *r0 = (T *)(tail + 7 * C), *th = (T *)(tail + 8 * C);
    const T *mh = st + ST_MEAN * C, *ml = st + ST_MEAN_LO * C;
    const T *m0h = st + ST_MEAN0 * C, *m0l = st + ST_MEAN0_LO * C;
    #pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int t = 0; t < nt; ++t) {
        double *wk = work + (int64_t)t * WORK_PER * C;
        SFX(col_bwd_accumulate)(x, dy, R * t / nt, R * (t + 1) / nt, C, mh, ml, 0, NULL, NULL,
                                NULL, NULL, wk, (T *)(wk + 4 * C));
    }
    for (int64_t i = 0; i < 4 * C; ++i) {
        double s = 0;
        for (int t = 0; t < nt; ++t) s += work[(int64_t)t * WORK_PER * C + i];
        sums[i] = s;
    }
    for (int64_t c = 0; c < C; ++c) {
        double r = st[ST_RSTD * C + c], sd = sums[c], sdxh = r * sums[C + c];
        s_dy[c] = (T)sd; s_dyxhat[c] = (T)sdxh;
        double wc = w ? w[c] : 1.0, M = st[ST_COUNT * C + c];
        A[c] = (T)(r * wc);
        SFX(bwd_coeffs)(r, wc * sd, wc * sdxh, M, m, st[ST_VAR0 * C + c], centered, eps, thr,
                        kap, B + c, Cc + c, r0 + c, th + c);
    }
    if (!dx) return;
    #pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int t = 0; t < nt; ++t) {
        int64_t lo = R * t / nt, hi = R * (t + 1) / nt;
        SFX(col_bwd_dx)(x + lo * C, dy + lo * C, dx + lo * C, hi - lo, C, 0, mh, ml, NULL, NULL,
                        NULL, NULL, A, B, Cc, m0h, m0l, r0, th);
    }
}

/* ---- channels_last row family: x read as (N, G, Cg, L) stored in the order (N, L, G, Cg);
   sample n is an (L, C) block (C = G·Cg) and set (n, g) is its columns [g·Cg, (g+1)·Cg).
   Threads split the samples; a sample's block is read from memory by the first pass and
   re-read from cache by the others. Per-channel moments are merged into group moments.
   work: (nt + 1)·WORK_PER·C doubles. ---- */
void SFX(rowc_fwd)(const S *x, S *y, const T *w, const T *b, const T *tau, const T *ak,
                   int64_t N, int64_t G, int64_t Cg, int64_t L, int centered, double eps,
                   double thr, double kap, int act, T *st, double *work, int nt)
{
    int64_t C = G * Cg, ns = N * G;
    double m = (double)Cg * L;
    #pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int t = 0; t < nt; ++t) {
        double *wk = work + (int64_t)t * WORK_PER * C;
        nl_moments *mom = (nl_moments *)wk;                       /* 3C */
        double *raw = wk + 3 * C, *tmp = wk + 4 * C;              /* C, 6C */
        double *gp = wk + 10 * C;                                 /* per group mean0, var0 */
        T *m0h = (T *)(wk + 12 * C), *m0l = (T *)(wk + 13 * C), *r0 = (T *)(wk + 14 * C);
        T *mh = (T *)(wk + 15 * C), *ml = (T *)(wk + 16 * C), *av = (T *)(wk + 17 * C);
        T *bv = (T *)(wk + 18 * C);
        for (int64_t n = N * t / nt; n < N * (t + 1) / nt; ++n) {
            const S *xs = x + n * L * C;
            S *ys = y + n * L * C;
            SFX(col_moments)(xs, 0, L, C, centered, 0, NULL, NULL, NULL, 0, mom, raw, tmp);
            for (int64_t g = 0; g < G; ++g) {
                int64_t s = n * G + g;
                nl_moments gm;
                double graw;
                T r0g;
                nl_merge_range(mom, raw, g * Cg, Cg, &gm, &graw);
                SFX(store_plain)(&gm, graw, centered, eps, st, ns, s, gp + g, gp + G + g, &r0g);
                for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
                    m0h[c] = st[ST_MEAN0 * ns + s]; m0l[c] = st[ST_MEAN0_LO * ns + s];
                    r0[c] = r0g;
                }
            }
            if (thr > 0)
                SFX(col_moments)(xs, 0, L, C, centered, 1, m0h, m0l, r0, (T)thr, mom, raw, tmp);
            for (int64_t g = 0; g < G; ++g) {
                int64_t s = n * G + g;
                nl_moments gm = {0, 0, 0};
                double graw = 0;
                if (thr > 0) nl_merge_range(mom, raw, g * Cg, Cg, &gm, &graw);
                SFX(store_final)(&gm, graw, centered, thr, kap, eps, gp[g], gp[G + g], m, st,
                                 ns, s);
                for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
                    mh[c] = st[ST_MEAN * ns + s]; ml[c] = st[ST_MEAN_LO * ns + s];
                    av[c] = (w ? w[c] : (T)1) * st[ST_RSTD * ns + s];
                    bv[c] = b ? b[c] : (T)0;
                }
            }
            SFX(col_affine)(xs, ys, L, C, mh, ml, av, bv, act, tau, ak);
        }
    }
}

void SFX(rowc_bwd)(const S *x, const S *dz, S *dx, const T *w, const T *b, const T *tau,
                   const T *ak, int64_t N, int64_t G, int64_t Cg, int64_t L, int centered,
                   double eps, double thr, double kap, int act, const T *st,
                   T *s_dy, T *s_dyxhat, T *s_dtau, T *s_dak, T *s_gxhat, double *work, int nt)
{
    int64_t C = G * Cg, ns = N * G;
    double m = (double)Cg * L;
    #pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int t = 0; t < nt; ++t) {
        double *wk = work + (int64_t)t * WORK_PER * C, *acc = wk;     /* 4C sums */
        T *tp = (T *)(wk + 4 * C);                                     /* 4C partial sums */
        T *mh = (T *)(wk + 8 * C), *ml = (T *)(wk + 9 * C), *av = (T *)(wk + 10 * C);
        T *bv = (T *)(wk + 11 * C), *A = (T *)(wk + 12 * C), *B = (T *)(wk + 13 * C);
        T *Cc = (T *)(wk + 14 * C), *m0h = (T *)(wk + 15 * C), *m0l = (T *)(wk + 16 * C);
        T *r0 = (T *)(wk + 17 * C), *th = (T *)(wk + 18 * C);
        for (int64_t n = N * t / nt; n < N * (t + 1) / nt; ++n) {
            const S *xs = x + n * L * C, *ds = dz + n * L * C;
            for (int64_t c = 0; c < C; ++c) {
                int64_t s = n * G + c / Cg;
                mh[c] = st[ST_MEAN * ns + s]; ml[c] = st[ST_MEAN_LO * ns + s];
                av[c] = (w ? w[c] : (T)1) * st[ST_RSTD * ns + s];
                bv[c] = b ? b[c] : (T)0;
            }
            SFX(col_bwd_accumulate)(xs, ds, 0, L, C, mh, ml, act, av, bv, tau, ak, acc, tp);
            for (int64_t g = 0; g < G; ++g) {
                int64_t s = n * G + g;
                double rs = st[ST_RSTD * ns + s], sg = 0, sgxh = 0;
                for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
                    double wc = w ? w[c] : 1.0, sdxh = rs * acc[C + c];
                    s_dy[n * C + c] = (T)acc[c]; s_dyxhat[n * C + c] = (T)sdxh;
                    s_dtau[n * C + c] = (T)acc[2 * C + c]; s_dak[n * C + c] = (T)acc[3 * C + c];
                    sg += wc * acc[c]; sgxh += wc * sdxh;
                }
                s_gxhat[s] = (T)sgxh;
                T Bg, Ccg, r0g, thg;
                SFX(bwd_coeffs)(rs, sg, sgxh, st[ST_COUNT * ns + s], m, st[ST_VAR0 * ns + s],
                                centered, eps, thr, kap, &Bg, &Ccg, &r0g, &thg);
                for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
                    A[c] = (T)(rs * (w ? (double)w[c] : 1.0));
                    B[c] = Bg; Cc[c] = Ccg; r0[c] = r0g; th[c] = thg;
                    m0h[c] = st[ST_MEAN0 * ns + s]; m0l[c] = st[ST_MEAN0_LO * ns + s];
                }
            }
            if (dx)
                SFX(col_bwd_dx)(xs, ds, dx + n * L * C, L, C, act, mh, ml, av, bv, tau, ak, A, B,
                                Cc, m0h, m0l, r0, th);
        }
    }
}
