/* Body of the fused kernels, included by normlab_kernels.c once per storage type with
     S       storage type of x, y, ∂ℓ/∂y, ∂ℓ/∂x
     T       arithmetic type (statistics, parameters, partial sums)
     LD, ST  conversions S → T and T → S
     FABS    |·| in T
     SFX     the name suffix (_f32, _f64, _bf16)
     NEXTAFTER, TMAX  nextafter and the largest finite value in T
   (undefined again at the end of this file)
   (no include guard: included three times on purpose).

   Notation (see kernels/analytic.py): plain moments μ0, σ0² (centered) or 0, ν²
   (uncentered); mask f = [|x − μ0| r0 ≤ T], r0 = (σ0² + ε)^(-1/2) ([HA20] eq. 4–5;
   all ones when a set would keep nothing); filtered moments over the kept values (eq. 6–7,
   divided by κ when Gaussian-consistent); y = γ (x − μ) r + β (eq. 8), optionally
   z = max(y, τ) ([SK20] eq. 3) or max(y, κ_a y + τ) (affine TLU). Backward, with
   g = γ ∂ℓ/∂y: ∂ℓ/∂x = r (g − f (Σg/M + x̂ Σg x̂/(κM))) (no Σg term when uncentered).

   Two memory layouts: contiguous (bn_*, row_*: a set is one run, or N runs of L values)
   and channels_last (bnc_*, rowc_*: rows of C contiguous channel values; a set is a column
   or a block of columns, and the loops vectorize over channels). */

/* the filter mask f = [lo ≤ x ≤ hi] as 0/1 in T (bounds from filter_bounds); NaN and, with
   finite bounds, ±Inf compare false (dropped), as the reference's |x − μ0| r0 ≤ T */
#define KEEP(v, lo, hi) (((v) >= (lo)) & ((v) <= (hi)) ? (T)1 : (T)0)  /* & : no branch */

/* A double as hi + lo in T (lo = 0 for a non-finite value). */
static inline void SFX(split)(double v, T *hi, T *lo)
{
    T h = (T)v;
    *hi = h;
    *lo = isfinite(v) ? (T)(v - (double)h) : (T)0;
}

/* The filter test |x − μ0| (σ0² + ε)^(-1/2) ≤ T ([HA20] eq. 5) as lo ≤ x ≤ hi: the
   bounds μ0 ∓ T (σ0² + ε)^(1/2) in double, rounded inward to T, so that for every x of type T
   the test decides exactly as in exact arithmetic on the stored μ0 = m0h + m0l and σ0²
   (forward and backward compute them from the same stored values: the same mask). A bound
   at ±∞ becomes the largest finite value (an Inf is dropped, as the reference's NaN z);
   NaN moments give NaN bounds (everything dropped, then the set keeps all values). */
static inline void SFX(filter_bounds)(T m0h, T m0l, T var0, double eps, double thr, T *lo,
                                      T *hi)
{
    double mu = (double)m0h + (double)m0l, half = thr * sqrt((double)var0 + eps);
    double h = mu + half, l = mu - half;
    T th = (T)h, tl = (T)l;
    if ((double)th > h) th = NEXTAFTER(th, -TMAX);
    if ((double)tl < l) tl = NEXTAFTER(tl, TMAX);
    *hi = th > TMAX ? TMAX : th;
    *lo = tl < -TMAX ? -TMAX : tl;
}

/* β − lo·a: the bias of y = (x − hi)·a + b′ when μ = hi + lo (folds the low part of the mean
   into a constant; |lo·a| ≤ ulp(μ)·a/2 is of the size of the outputs, so nothing cancels). */
static inline T SFX(fold)(T beta, T lo, T a)
{
    return (T)((double)beta - (double)lo * (double)a);
}

/* ---- leaf loops over a chunk of nseg runs of len values, stride apart (≤ CHUNK values);
   kept out of line (NOINLINE) so each is vectorized as written. Values of x, y, dy, dx
   are read through LD and written through ST. ------------------------------------------ */

/* The reductions below accumulate into LANES partial sums per quantity (a[l % LANES]), so
   the vectorized loop keeps several independent vector accumulators instead of one chain of
   dependent additions (which bounds a one-accumulator loop by the add latency). */

/* One sweep around a shift: o = {Σ f, Σ f u, Σ f u²}, u = x − sh, f = the mask (filt) or 1. */
static NOINLINE void SFX(leaf_mom)(const S *p, int64_t stride, int64_t nseg, int64_t len,
                                   int filt, T lo, T hi, T sh, double *o)
{
    T c[LANES] = {0}, a[LANES] = {0}, b[LANES] = {0};
    for (int64_t k = 0; k < nseg; ++k) {
        const S *q = p + k * stride;
        int64_t l = 0;
        if (filt) {
            for (; l + LANES <= len; l += LANES) {
                #pragma omp simd
                for (int j = 0; j < LANES; ++j) {
                    T v = LD(q[l + j]);
                    T f = KEEP(v, lo, hi);
                    T u = (v - sh) * f;
                    c[j] += f; a[j] += u; b[j] += u * u;
                }
            }
            for (; l < len; ++l) {
                T v = LD(q[l]);
                T f = KEEP(v, lo, hi);
                T u = (v - sh) * f;
                c[0] += f; a[0] += u; b[0] += u * u;
            }
        } else {
            for (; l + LANES <= len; l += LANES) {
                #pragma omp simd
                for (int j = 0; j < LANES; ++j) {
                    T u = LD(q[l + j]) - sh;
                    a[j] += u; b[j] += u * u;
                }
            }
            for (; l < len; ++l) { T u = LD(q[l]) - sh; a[0] += u; b[0] += u * u; }
        }
    }
    double sc = 0, sa = 0, sb = 0;
    for (int j = 0; j < LANES; ++j) { sc += c[j]; sa += a[j]; sb += b[j]; }
    o[0] = filt ? sc : (double)(nseg * len);
    o[1] = sa; o[2] = sb;
}

/* y = (x − μ) a + β (eq. 8, a = γ r) as (x − mh) a + b with b = β − ml·a (fold), then act 1:
   max(y, t), act 2: max(y, k y + t); a NaN y passes through (y < t ? t : y). */
static NOINLINE void SFX(leaf_affine)(const S *p, S *q, int64_t stride, int64_t nseg,
                                      int64_t len, T mh, T a, T b, int act, T t, T k)
{
    for (int64_t s = 0; s < nseg; ++s) {
        const S *pp = p + s * stride;
        S *qq = q + s * stride;
        if (act == 0) {
            #pragma omp simd
            for (int64_t l = 0; l < len; ++l) qq[l] = ST((LD(pp[l]) - mh) * a + b);
        } else if (act == 1) {
            #pragma omp simd
            for (int64_t l = 0; l < len; ++l) {
                T y = (LD(pp[l]) - mh) * a + b;
                qq[l] = ST(y < t ? t : y);
            }
        } else {
            #pragma omp simd
            for (int64_t l = 0; l < len; ++l) {
                T y = (LD(pp[l]) - mh) * a + b;
                T h = k * y + t;
                qq[l] = ST(y < h ? h : y);
            }
        }
    }
}

/* o: Σ dy, Σ dy (x − mh), Σ dz where the TLU chose τ, Σ dz·y there (affine TLU), with dy
   recovered from dz = ∂ℓ/∂z through the activation (y recomputed from x exactly as in
   forward: (x − mh) a + b). LANES partial sums each. */
static NOINLINE void SFX(leaf_bwd_sums)(const S *p, const S *d, int64_t stride, int64_t nseg,
                                        int64_t len, T mh, int act, T a, T b, T t, T k, T *o)
{
    T s1[LANES] = {0}, s2[LANES] = {0}, s3[LANES] = {0}, s4[LANES] = {0};
    for (int64_t s = 0; s < nseg; ++s) {
        const S *pp = p + s * stride, *dd = d + s * stride;
        int64_t l = 0;
        if (act == 0) {
            for (; l + LANES <= len; l += LANES) {
                #pragma omp simd
                for (int j = 0; j < LANES; ++j) {
                    T g = LD(dd[l + j]);
                    s1[j] += g; s2[j] += g * (LD(pp[l + j]) - mh);
                }
            }
            for (; l < len; ++l) { T g = LD(dd[l]); s1[0] += g; s2[0] += g * (LD(pp[l]) - mh); }
        } else if (act == 1) {
            for (; l + LANES <= len; l += LANES) {
                #pragma omp simd
                for (int j = 0; j < LANES; ++j) {
                    T xm = LD(pp[l + j]) - mh, g = LD(dd[l + j]);
                    T dy = xm * a + b < t ? (T)0 : g;
                    s1[j] += dy; s2[j] += dy * xm; s3[j] += g - dy;
                }
            }
            for (; l < len; ++l) {
                T xm = LD(pp[l]) - mh, g = LD(dd[l]);
                T dy = xm * a + b < t ? (T)0 : g;
                s1[0] += dy; s2[0] += dy * xm; s3[0] += g - dy;
            }
        } else {
            for (; l + LANES <= len; l += LANES) {
                #pragma omp simd
                for (int j = 0; j < LANES; ++j) {
                    T xm = LD(pp[l + j]) - mh, g = LD(dd[l + j]);
                    T y = xm * a + b;
                    T rest = y < k * y + t ? g : (T)0;
                    T dy = (g - rest) + rest * k;
                    s1[j] += dy; s2[j] += dy * xm; s3[j] += rest; s4[j] += rest * y;
                }
            }
            for (; l < len; ++l) {
                T xm = LD(pp[l]) - mh, g = LD(dd[l]);
                T y = xm * a + b;
                T rest = y < k * y + t ? g : (T)0;
                T dy = (g - rest) + rest * k;
                s1[0] += dy; s2[0] += dy * xm; s3[0] += rest; s4[0] += rest * y;
            }
        }
    }
    double r1 = 0, r2 = 0, r3 = 0, r4 = 0;
    for (int j = 0; j < LANES; ++j) { r1 += s1[j]; r2 += s2[j]; r3 += s3[j]; r4 += s4[j]; }
    o[0] = (T)r1; o[1] = (T)r2; o[2] = (T)r3; o[3] = (T)r4;
}

/* dx = A dy − f (B + (x − mh) Cc) (B with the mean's low part folded in), f = the mask
   (filt; else every value is kept: the compiler makes loops without the test) */
static NOINLINE void SFX(leaf_bwd_dx)(const S *p, const S *d, S *q, int64_t stride,
                                      int64_t nseg, int64_t len, int act, T mh, T a, T b,
                                      T t, T k, T A, T B, T Cc, int filt, T lo, T hi)
{
    for (int64_t s = 0; s < nseg; ++s) {
        const S *pp = p + s * stride, *dd = d + s * stride;
        S *qq = q + s * stride;
        if (act == 0) {
            #pragma omp simd
            for (int64_t l = 0; l < len; ++l) {
                T v = LD(pp[l]);
                T fc = !filt || KEEP(v, lo, hi) != 0 ? B + (v - mh) * Cc : (T)0;
                qq[l] = ST(A * LD(dd[l]) - fc);
            }
        } else if (act == 1) {
            #pragma omp simd
            for (int64_t l = 0; l < len; ++l) {
                T v = LD(pp[l]), g = LD(dd[l]);
                T xm = v - mh;
                T dy = xm * a + b < t ? (T)0 : g;
                T fc = !filt || KEEP(v, lo, hi) != 0 ? B + xm * Cc : (T)0;
                qq[l] = ST(A * dy - fc);
            }
        } else {
            #pragma omp simd
            for (int64_t l = 0; l < len; ++l) {
                T v = LD(pp[l]), g = LD(dd[l]);
                T xm = v - mh;
                T y = xm * a + b;
                T dy = y < k * y + t ? k * g : g;
                T fc = !filt || KEEP(v, lo, hi) != 0 ? B + xm * Cc : (T)0;
                qq[l] = ST(A * dy - fc);
            }
        }
    }
}

/* ---- one set: moments chunk by chunk, merged in double ------------------------------- */

/* Merge the moments of one chunk (all values, or those in [lo, hi] when filt) into acc;
   raw collects Σ f x (the mean of a set whose moments are not finite). One sweep sums
   u = x − sh and u² around the shift sh; M2 = Σu² − (Σu)²/n then loses about log2(F) bits
   to cancellation, F = Σu² / M2. When F > 2 (sh more than ~σ from the chunk's mean, e.g. a
   mean dragged by an outlier) or the sums are not finite, a second sweep sums around the
   chunk's own mean (corrected two-pass formula), so the chunk's M2 always keeps the
   precision of its sums. */
static void SFX(chunk_moments)(const S *p, int64_t stride, nl_chunk ch, int centered, int filt,
                               T lo, T hi, T sh, nl_moments *acc, double *raw)
{
    const S *q = p + ch.off;
    double o[3];
    if (!centered) {   /* one sweep around 0, nothing to cancel: Σ f, Σ (f x)² (0·Inf = NaN) */
        SFX(leaf_mom)(q, stride, ch.nseg, ch.len, filt, lo, hi, (T)0, o);
        nl_merge(acc, o[0], 0.0, o[2]);
        return;
    }
    SFX(leaf_mom)(q, stride, ch.nseg, ch.len, filt, lo, hi, sh, o);
    double n = o[0];
    *raw += n * (double)sh + o[1];
    if (n == 0) return;
    double dn = o[1] / n, m2 = o[2] - o[1] * dn, mean = (double)sh + dn;
    if (!(o[2] <= 2 * m2)) {   /* sweep 2: the same sums around c, the chunk's mean in T */
        T c = (T)mean;
        double t[3];
        SFX(leaf_mom)(q, stride, ch.nseg, ch.len, filt, lo, hi, c, t);
        dn = t[1] / n;
        m2 = t[2] - t[1] * dn;
        mean = (double)c + dn;
    }
    nl_merge(acc, n, mean, m2);
}

/* Moments of a set of nseg runs of len values (stride apart); filt: over [lo, hi]. The
   shift of each chunk is the mean merged so far; the first chunk's is sh0 (the filter
   pass: the plain mean) or, when sh0 is NaN, the mean of the set's first few values. */
static void SFX(set_moments)(const S *x, int64_t stride, int64_t nseg, int64_t len,
                             int centered, int filt, T lo, T hi, T sh0, nl_moments *acc,
                             double *raw)
{
    int64_t nch = nl_nchunks(nseg, len);
    acc->n = acc->mean = acc->m2 = 0;
    *raw = 0;
    if (centered && sh0 != sh0) {
        int64_t k = len < 8 ? len : 8;
        double s0 = 0;
        for (int64_t l = 0; l < k; ++l) s0 += (double)LD(x[l]);
        sh0 = (T)(s0 / (double)k);
    }
    for (int64_t i = 0; i < nch; ++i)
        SFX(chunk_moments)(x, stride, nl_chunk_at(i, stride, nseg, len), centered, filt, lo, hi,
                           acc->n > 0 && isfinite(acc->mean) ? (T)acc->mean : sh0, acc, raw);
}

/* Write the plain moments (mean0, var0) to column s of the statistics block st (ns sets);
   returns them in double and the filter's bounds (thr > 0). */
static void SFX(store_plain)(const nl_moments *a, double raw, int centered, double eps,
                             double thr, T *st, int64_t ns, int64_t s, double *mean0,
                             double *var0, T *lo, T *hi)
{
    nl_finish(a, raw, centered, mean0, var0);
    SFX(split)(*mean0, st + ST_MEAN0 * ns + s, st + ST_MEAN0_LO * ns + s);
    st[ST_VAR0 * ns + s] = (T)*var0;
    if (thr > 0)
        SFX(filter_bounds)(st[ST_MEAN0 * ns + s], st[ST_MEAN0_LO * ns + s],
                           st[ST_VAR0 * ns + s], eps, thr, lo, hi);
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
    T lo = 0, hi = 0;
    SFX(set_moments)(x, stride, nseg, len, centered, 0, 0, 0, (T)NAN, &a, &raw);
    SFX(store_plain)(&a, raw, centered, eps, thr, st, ns, s, &mean0, &var0, &lo, &hi);
    if (thr > 0)
        SFX(set_moments)(x, stride, nseg, len, centered, 1, lo, hi, st[ST_MEAN0 * ns + s], &b,
                         &rawb);
    SFX(store_final)(&b, rawb, centered, thr, kap, eps, mean0, var0, (double)nseg * len,
                     st, ns, s);
}

/* Backward sums of one set (chunked: partial sums in T over ≤ CHUNK values, then double):
   o = Σ dy, Σ dy (x − μ) (the mean's low part ml taken out in double), Σ over the TLU's τ
   branch of dz and of dz·y. */
static void SFX(set_bwd_sums)(const S *x, const S *d, int64_t stride, int64_t nseg,
                              int64_t len, T mh, T ml, int act, T a, T b, T t, T k, double *o)
{
    int64_t nch = nl_nchunks(nseg, len);
    double s[4] = {0, 0, 0, 0};
    T tt[4];
    for (int64_t i = 0; i < nch; ++i) {
        nl_chunk ch = nl_chunk_at(i, stride, nseg, len);
        SFX(leaf_bwd_sums)(x + ch.off, d + ch.off, stride, ch.nseg, ch.len, mh, act, a, b, t, k,
                           tt);
        for (int j = 0; j < 4; ++j) s[j] += tt[j];
    }
    o[0] = s[0]; o[1] = s[1] - (double)ml * s[0]; o[2] = s[2]; o[3] = s[3];
}

/* Coefficients of ∂ℓ/∂x = A ∂ℓ/∂y − f (B + (x − mh) Cc) for one set (A = γ r is the caller's):
   Cc = r² Σg x̂ / (κ M), B = r Σg / M − ml Cc (centered; −ml Cc uncentered, ml = 0 there), with
   g = γ ∂ℓ/∂y summed over the whole set of m values, M kept; the mask f = [lo ≤ x ≤ hi] is
   recomputed from the stored plain moments (filt = 0 when nothing was filtered out). */
static void SFX(bwd_coeffs)(double r, double sg, double sgxh, double M, double m, T ml,
                            const T *st, int64_t ns, int64_t s, int centered, double eps,
                            double thr, double kap, T *B, T *Cc, int *filt, T *lo, T *hi)
{
    double kk = thr > 0 ? kap : 1.0, cc = r * r * sgxh / (kk * M);
    *Cc = (T)cc;
    *B = (T)((centered ? r * sg / M : 0.0) - (double)ml * cc);
    *filt = thr > 0 && M < m;
    *lo = -TMAX; *hi = TMAX;
    if (*filt)
        SFX(filter_bounds)(st[ST_MEAN0 * ns + s], st[ST_MEAN0_LO * ns + s], st[ST_VAR0 * ns + s],
                           eps, thr, lo, hi);
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

/* ---- batch norm family, contiguous: x is (N, C, L), statistics per channel c; act as the
   row family's (0 none, 1 TLU/ReLU max(y, τ_c), 2 affine TLU), τ and κ_a per channel ---- */
void SFX(bn_fwd)(const S *x, S *y, const T *w, const T *b, const T *tau, const T *ak,
                 int64_t N, int64_t C, int64_t L, int centered, double eps, double thr,
                 double kap, int act, T *st, T *rm, T *rv, double factor, int nt)
{
    #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t c = 0; c < C; ++c) {
        SFX(set_stats)(x + c * L, C * L, N, L, centered, eps, thr, kap, st, C, c);
        T a = (w ? w[c] : (T)1) * st[ST_RSTD * C + c];
        T bb = SFX(fold)(b ? b[c] : (T)0, st[ST_MEAN_LO * C + c], a);
        SFX(leaf_affine)(x + c * L, y + c * L, C * L, N, L, st[ST_MEAN * C + c], a, bb, act,
                         tau ? tau[c] : (T)0, ak ? ak[c] : (T)0);
    }
    SFX(update_running)(rm, rv, st, C, factor);
}

void SFX(bn_bwd)(const S *x, const S *dz, S *dx, const T *w, const T *b, const T *tau,
                 const T *ak, int64_t N, int64_t C, int64_t L, int centered, double eps,
                 double thr, double kap, int act, const T *st, T *s_dy, T *s_dyxhat,
                 T *s_dtau, T *s_dak, int nt)
{
    double m = (double)N * L;
    #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t c = 0; c < C; ++c) {
        double o[4];
        T mh = st[ST_MEAN * C + c], ml = st[ST_MEAN_LO * C + c];
        T a = (w ? w[c] : (T)1) * st[ST_RSTD * C + c];   /* y recomputed as in bn_fwd */
        T bb = SFX(fold)(b ? b[c] : (T)0, ml, a), tc = tau ? tau[c] : (T)0;
        T kc = ak ? ak[c] : (T)0;
        SFX(set_bwd_sums)(x + c * L, dz + c * L, C * L, N, L, mh, ml, act, a, bb, tc, kc, o);
        double r = st[ST_RSTD * C + c], sd = o[0], sdxh = r * o[1];
        s_dy[c] = (T)sd; s_dyxhat[c] = (T)sdxh;
        if (s_dtau) { s_dtau[c] = (T)o[2]; s_dak[c] = (T)o[3]; }
        if (!dx) continue;
        double wc = w ? w[c] : 1.0, M = st[ST_COUNT * C + c];
        T A = (T)(r * wc), B, Cc, lo, hi;
        int filt;
        SFX(bwd_coeffs)(r, wc * sd, wc * sdxh, M, m, ml, st, C, c, centered, eps, thr, kap,
                        &B, &Cc, &filt, &lo, &hi);
        SFX(leaf_bwd_dx)(x + c * L, dz + c * L, dx + c * L, C * L, N, L, act, mh, a, bb, tc, kc,
                         A, B, Cc, filt, lo, hi);
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
            SFX(leaf_affine)(xr + cg * L, yr + cg * L, 0, 1, L, mh, a,
                             SFX(fold)(b ? b[ch] : (T)0, ml, a), act, tau ? tau[ch] : (T)0,
                             ak ? ak[ch] : (T)0);
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
                              SFX(fold)(b ? b[ch] : (T)0, ml, a), tau ? tau[ch] : (T)0,
                              ak ? ak[ch] : (T)0, o);
            double sdxh = rs * o[1];
            s_dy[r * Cg + cg] = (T)o[0]; s_dyxhat[r * Cg + cg] = (T)sdxh;
            s_dtau[r * Cg + cg] = (T)o[2]; s_dak[r * Cg + cg] = (T)o[3];
            sg += wc * o[0]; sgxh += wc * sdxh;
        }
        s_gxhat[r] = (T)sgxh;
        if (!dx) continue;
        T B, Cc, lo, hi;
        int filt;
        SFX(bwd_coeffs)(rs, sg, sgxh, st[ST_COUNT * R + r], m, ml, st, R, r, centered, eps, thr,
                        kap, &B, &Cc, &filt, &lo, &hi);
        for (int64_t cg = 0; cg < Cg; ++cg) {
            int64_t ch = g * Cg + cg;
            T A = (T)(rs * (w ? (double)w[ch] : 1.0));
            T a = (w ? w[ch] : (T)1) * rst;
            SFX(leaf_bwd_dx)(xr + cg * L, dr + cg * L, dx + r * Cg * L + cg * L, 0, 1, L, act,
                             mh, a, SFX(fold)(b ? b[ch] : (T)0, ml, a), tau ? tau[ch] : (T)0,
                             ak ? ak[ch] : (T)0, A, B, Cc, filt, lo, hi);
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

/* One sweep around per-channel shifts: cnt[c] += f, a[c] += f u, b[c] += f u², u = x − sh[c],
   f = [lo[c] ≤ x ≤ hi[c]] or 1 (unfiltered: cnt is left alone, the caller sets it to nrow).
   Also the second sweep of a block, around the block's own means. */
static NOINLINE void SFX(col_mom)(const S *restrict x, int64_t nrow, int64_t C, int filt,
                                  const T *restrict lo, const T *restrict hi,
                                  const T *restrict sh, T *restrict cnt, T *restrict a,
                                  T *restrict b)
{
    if (filt) {
        for (int64_t r = 0; r < nrow; ++r) {
            const S *restrict p = x + r * C;
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                T v = LD(p[c]);
                T f = KEEP(v, lo[c], hi[c]);
                T u = (v - sh[c]) * f;
                cnt[c] += f; a[c] += u; b[c] += u * u;
            }
        }
    } else {
        for (int64_t r = 0; r < nrow; ++r) {
            const S *restrict p = x + r * C;
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                T u = LD(p[c]) - sh[c];
                a[c] += u; b[c] += u * u;
            }
        }
    }
}

/* Per-channel moments of rows [r0, r1), merged into mom[c] (zeroed here) with raw[c] = Σ f x;
   filt: over [lo[c], hi[c]]. Blocks of rows (in L1) are summed in one sweep around per-channel
   shifts (sh0[c], or for sh0 == NULL the mean of the first rows) and the block sums added in
   double (k, Σu, Σu² per channel: moments around a fixed shift need no merging). A block
   where some channel's cancellation factor Σu²/M2 exceeds 2 (the shift more than ~σ from
   that block's mean; tested as 2 (Σu)² > k Σu², no division) or is NaN ends the run: the sums
   so far are merged (Chan), the block is summed again around its own means and merged, and
   those means become the shifts. tmp: scratch of 9 C doubles. */
static void SFX(col_moments)(const S *x, int64_t r0, int64_t r1, int64_t C, int centered,
                             int filt, const T *lo, const T *hi, const T *sh0, nl_moments *mom,
                             double *raw, double *tmp)
{
    int64_t nb = nl_block_rows(C, sizeof(S));
    double *K = tmp, *A = tmp + C, *B = tmp + 2 * C;              /* run sums around sh */
    T *cnt = (T *)(tmp + 3 * C), *a = (T *)(tmp + 4 * C), *b = (T *)(tmp + 5 * C);
    T *sh = (T *)(tmp + 6 * C), *cm = (T *)(tmp + 7 * C);
    for (int64_t c = 0; c < C; ++c) {
        mom[c].n = mom[c].mean = mom[c].m2 = 0;
        raw[c] = K[c] = A[c] = B[c] = 0;
        sh[c] = 0;
    }
    if (centered && r1 > r0) {
        int64_t k = r1 - r0 < 8 ? r1 - r0 : 8;
        for (int64_t c = 0; c < C; ++c) {
            double s0 = 0;
            if (!sh0)
                for (int64_t r = r0; r < r0 + k; ++r) s0 += (double)LD(x[r * C + c]);
            sh[c] = sh0 ? sh0[c] : (T)(s0 / (double)k);
        }
    }
    for (int64_t r = r0; r < r1; r += nb) {
        int64_t n = r1 - r < nb ? r1 - r : nb;
        const S *p = x + r * C;
        for (int64_t c = 0; c < C; ++c) { cnt[c] = filt ? (T)0 : (T)n; a[c] = 0; b[c] = 0; }
        SFX(col_mom)(p, n, C, filt, lo, hi, sh, cnt, a, b);   /* uncentered: sh = 0 */
        if (!centered)   /* Σ (f x)² around 0 is the moment itself: no mean to carry */
            for (int64_t c = 0; c < C; ++c) a[c] = 0;
        double bad = 0;   /* channels failing the test (uncentered: nothing to cancel) */
        if (centered) {
            #pragma omp simd reduction(+:bad)
            for (int64_t c = 0; c < C; ++c) {
                double d = a[c];
                bad += 2 * d * d <= (double)cnt[c] * (double)b[c] ? 0.0 : 1.0;
            }
        }
        int again = bad != 0;
        if (!again) {
            for (int64_t c = 0; c < C; ++c) {
                K[c] += cnt[c]; A[c] += a[c]; B[c] += b[c];
            }
            continue;
        }
        /* some channel's shift is far from its mean here: merge the run, sum the block
           around its own means, merge it, and shift by those means from now on */
        for (int64_t c = 0; c < C; ++c) {
            double k = cnt[c], dn = k > 0 ? (double)a[c] / k : 0;
            if (K[c] > 0) {
                double an = A[c] / K[c];
                raw[c] += K[c] * (double)sh[c] + A[c];
                nl_merge(mom + c, K[c], (double)sh[c] + an, B[c] - A[c] * an);
            }
            K[c] = A[c] = B[c] = 0;
            cm[c] = (T)((double)sh[c] + dn);
            cnt[c] = filt ? (T)0 : (T)n; a[c] = 0; b[c] = 0;   /* the same count again */
        }
        SFX(col_mom)(p, n, C, filt, lo, hi, cm, cnt, a, b);
        for (int64_t c = 0; c < C; ++c) {
            double k = cnt[c];
            if (k == 0) continue;
            double dn = (double)a[c] / k;
            raw[c] += k * (double)cm[c] + a[c];
            nl_merge(mom + c, k, (double)cm[c] + dn, (double)b[c] - (double)a[c] * dn);
            if (isfinite((double)cm[c])) sh[c] = cm[c];
        }
    }
    for (int64_t c = 0; c < C; ++c) {
        if (K[c] == 0) continue;
        double an = A[c] / K[c];
        raw[c] += K[c] * (double)sh[c] + A[c];
        nl_merge(mom + c, K[c], (double)sh[c] + an, B[c] - A[c] * an);
    }
}

/* The same moments over all R rows: thread t takes rows [R t/nt, R (t+1)/nt) with its own
   area of work (WORK_PER·C doubles), then the thread parts are merged per channel in
   thread order (deterministic) into out, with raw sums. */
static void SFX(col_reduce)(const S *x, int64_t R, int64_t C, int centered, int filt,
                            const T *lo, const T *hi, const T *sh0, double *work, int nt,
                            nl_moments *out, double *raw)
{
    #pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int t = 0; t < nt; ++t) {
        double *wk = work + (int64_t)t * WORK_PER * C;
        SFX(col_moments)(x, R * t / nt, R * (t + 1) / nt, C, centered, filt, lo, hi, sh0,
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

/* x − mh[c], or x where mh == NULL (uncentered: FRN); the test is loop-invariant, so the
   compiler makes one loop for each case */
#define XM(v, c) (mh ? (v) - mh[c] : (v))

/* y = (x − mh[c]) a[c] + b[c] (eq. 8, b with the mean's low part folded in), then act 1:
   max(y, t[c]), act 2: max(y, k[c] y + t[c]); a NaN y passes through */
static NOINLINE void SFX(col_affine)(const S *restrict x, S *restrict y, int64_t nrow, int64_t C,
                                     const T *restrict mh, const T *restrict a,
                                     const T *restrict b, int act, const T *restrict t,
                                     const T *restrict k)
{
    if (act == 0) {
        for (int64_t r = 0; r < nrow; ++r) {
            const S *restrict p = x + r * C;
            S *restrict q = y + r * C;
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) q[c] = ST(XM(LD(p[c]), c) * a[c] + b[c]);
        }
    } else if (act == 1) {
        for (int64_t r = 0; r < nrow; ++r) {
            const S *restrict p = x + r * C;
            S *restrict q = y + r * C;
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                T v = XM(LD(p[c]), c) * a[c] + b[c];
                q[c] = ST(v < t[c] ? t[c] : v);
            }
        }
    } else {
        for (int64_t r = 0; r < nrow; ++r) {
            const S *restrict p = x + r * C;
            S *restrict q = y + r * C;
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                T v = XM(LD(p[c]), c) * a[c] + b[c];
                T h = k[c] * v + t[c];
                q[c] = ST(v < h ? h : v);
            }
        }
    }
}

/* With dy = ∂ℓ/∂y recovered from dz = ∂ℓ/∂z through the activation (recomputed from x):
   o0 += Σ dy, o1 += Σ dy (x − mh[c]), o2 += Σ dz where the TLU chose τ (∂ℓ/∂τ),
   o3 += Σ dz y there (∂ℓ/∂κ of the affine TLU). act 0 leaves o2, o3 alone. */
static NOINLINE void SFX(col_bwd_sums)(const S *restrict x, const S *restrict d, int64_t nrow,
                                       int64_t C, const T *restrict mh, int act,
                                       const T *restrict a, const T *restrict b,
                                       const T *restrict t, const T *restrict k,
                                       T *restrict o0, T *restrict o1, T *restrict o2,
                                       T *restrict o3)
{
    if (act == 0) {
        for (int64_t r = 0; r < nrow; ++r) {
            const S *restrict p = x + r * C, *restrict g = d + r * C;
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                T dd = LD(g[c]);
                o0[c] += dd; o1[c] += dd * XM(LD(p[c]), c);
            }
        }
    } else if (act == 1) {
        for (int64_t r = 0; r < nrow; ++r) {
            const S *restrict p = x + r * C, *restrict g = d + r * C;
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                T xm = XM(LD(p[c]), c), dd = LD(g[c]);
                T dy = xm * a[c] + b[c] < t[c] ? (T)0 : dd;
                o0[c] += dy; o1[c] += dy * xm; o2[c] += dd - dy;
            }
        }
    } else {
        for (int64_t r = 0; r < nrow; ++r) {
            const S *restrict p = x + r * C, *restrict g = d + r * C;
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                T xm = XM(LD(p[c]), c), dd = LD(g[c]);
                T y = xm * a[c] + b[c];
                T low = y < k[c] * y + t[c] ? (T)1 : (T)0;
                T rest = low * dd;
                T dy = (dd - rest) + rest * k[c];
                o0[c] += dy; o1[c] += dy * xm; o2[c] += rest; o3[c] += rest * y;
            }
        }
    }
}

/* dx = A[c] dy − f (B[c] + (x − mh[c]) Cc[c]),  f = [lo[c] ≤ x ≤ hi[c]] (filt) or 1 */
static NOINLINE void SFX(col_bwd_dx)(const S *restrict x, const S *restrict d, S *restrict q,
                                     int64_t nrow, int64_t C, int act, const T *restrict mh,
                                     const T *restrict a, const T *restrict b,
                                     const T *restrict t, const T *restrict k,
                                     const T *restrict A, const T *restrict B,
                                     const T *restrict Cc, int filt, const T *restrict lo,
                                     const T *restrict hi)
{
    if (act == 0 && !filt) {
        for (int64_t r = 0; r < nrow; ++r) {
            const S *restrict p = x + r * C, *restrict g = d + r * C;
            S *restrict o = q + r * C;
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c)
                o[c] = ST(A[c] * LD(g[c]) - (B[c] + XM(LD(p[c]), c) * Cc[c]));
        }
    } else if (act == 0) {
        for (int64_t r = 0; r < nrow; ++r) {
            const S *restrict p = x + r * C, *restrict g = d + r * C;
            S *restrict o = q + r * C;
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                T v = LD(p[c]);
                o[c] = ST(A[c] * LD(g[c]) - KEEP(v, lo[c], hi[c]) * (B[c] + XM(v, c) * Cc[c]));
            }
        }
    } else if (act == 1) {
        for (int64_t r = 0; r < nrow; ++r) {
            const S *restrict p = x + r * C, *restrict g = d + r * C;
            S *restrict o = q + r * C;
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                T v = LD(p[c]), dd = LD(g[c]);
                T xm = XM(v, c);
                T dy = xm * a[c] + b[c] < t[c] ? (T)0 : dd;
                T f = filt ? KEEP(v, lo[c], hi[c]) : (T)1;
                o[c] = ST(A[c] * dy - f * (B[c] + xm * Cc[c]));
            }
        }
    } else {
        for (int64_t r = 0; r < nrow; ++r) {
            const S *restrict p = x + r * C, *restrict g = d + r * C;
            S *restrict o = q + r * C;
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                T v = LD(p[c]), dd = LD(g[c]);
                T xm = XM(v, c);
                T y = xm * a[c] + b[c];
                T dy = y < k[c] * y + t[c] ? k[c] * dd : dd;
                T f = filt ? KEEP(v, lo[c], hi[c]) : (T)1;
                o[c] = ST(A[c] * dy - f * (B[c] + xm * Cc[c]));
            }
        }
    }
}

/* Backward sums over rows [r0, r1) into acc (4 C-vectors of double, zeroed here), partial
   sums in T over one block of rows (tp: 4 C values of T). */
static void SFX(col_bwd_accumulate)(const S *x, const S *d, int64_t r0, int64_t r1, int64_t C,
                                    const T *mh, int act, const T *a, const T *b, const T *t,
                                    const T *k, double *acc, T *tp)
{
    int64_t nb = nl_block_rows(C, sizeof(S));
    for (int64_t i = 0; i < 4 * C; ++i) acc[i] = 0;
    for (int64_t r = r0; r < r1; r += nb) {
        int64_t n = r1 - r < nb ? r1 - r : nb;
        for (int64_t i = 0; i < 4 * C; ++i) tp[i] = 0;
        SFX(col_bwd_sums)(x + r * C, d + r * C, n, C, mh, act, a, b, t, k,
                          tp, tp + C, tp + 2 * C, tp + 3 * C);
        for (int64_t i = 0; i < 4 * C; ++i) acc[i] += tp[i];
    }
}

/* ---- channels_last batch norm: x (N, C, L) with strides (L·C, 1, C), i.e. an (N·L, C)
   matrix; statistics per column. Three passes over the rows, each split among the threads:
   plain moments, filtered moments (thr > 0), y. work: (nt + 1)·WORK_PER·C doubles. ---- */
void SFX(bnc_fwd)(const S *x, S *y, const T *w, const T *b, const T *tau, const T *ak,
                  int64_t N, int64_t C, int64_t L, int centered, double eps, double thr,
                  double kap, int act, T *st, T *rm, T *rv, double factor, double *work, int nt)
{
    int64_t R = N * L;
    double *tail = work + (int64_t)nt * WORK_PER * C;      /* shared, after the thread areas */
    nl_moments *mom = (nl_moments *)tail;                    /* 3C */
    double *raw = tail + 3 * C, *plain = tail + 4 * C;       /* C, 2C (mean0, var0) */
    T *lo = (T *)(tail + 6 * C), *hi = (T *)(tail + 7 * C), *mh = (T *)(tail + 8 * C);
    T *av = (T *)(tail + 9 * C), *bv = (T *)(tail + 10 * C);
    SFX(col_reduce)(x, R, C, centered, 0, NULL, NULL, NULL, work, nt, mom, raw);
    for (int64_t c = 0; c < C; ++c)
        SFX(store_plain)(mom + c, raw[c], centered, eps, thr, st, C, c, plain + c,
                         plain + C + c, lo + c, hi + c);
    if (thr > 0)
        SFX(col_reduce)(x, R, C, centered, 1, lo, hi, st + ST_MEAN0 * C, work, nt, mom, raw);
    for (int64_t c = 0; c < C; ++c) {
        nl_moments none = {0, 0, 0};
        SFX(store_final)(thr > 0 ? mom + c : &none, thr > 0 ? raw[c] : 0, centered, thr, kap,
                         eps, plain[c], plain[C + c], (double)R, st, C, c);
        mh[c] = st[ST_MEAN * C + c];
        av[c] = (w ? w[c] : (T)1) * st[ST_RSTD * C + c];
        bv[c] = SFX(fold)(b ? b[c] : (T)0, st[ST_MEAN_LO * C + c], av[c]);
    }
    #pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int t = 0; t < nt; ++t) {
        int64_t r0 = R * t / nt, r1 = R * (t + 1) / nt;
        SFX(col_affine)(x + r0 * C, y + r0 * C, r1 - r0, C, centered ? mh : NULL, av, bv, act,
                        tau, ak);
    }
    SFX(update_running)(rm, rv, st, C, factor);
}

void SFX(bnc_bwd)(const S *x, const S *dz, S *dx, const T *w, const T *b, const T *tau,
                  const T *ak, int64_t N, int64_t C, int64_t L, int centered, double eps,
                  double thr, double kap, int act, const T *st, T *s_dy, T *s_dyxhat,
                  T *s_dtau, T *s_dak, double *work, int nt)
{
    int64_t R = N * L;
    double m = (double)R;
    double *tail = work + (int64_t)nt * WORK_PER * C, *sums = tail;   /* 4C */
    T *A = (T *)(tail + 4 * C), *B = (T *)(tail + 5 * C), *Cc = (T *)(tail + 6 * C);
    T *lo = (T *)(tail + 7 * C), *hi = (T *)(tail + 8 * C);
    T *av = (T *)(tail + 9 * C), *bv = (T *)(tail + 10 * C);   /* y recomputed as in bnc_fwd */
    const T *mh = centered ? st + ST_MEAN * C : NULL;   /* uncentered: μ = 0 */
    int filt = 0;
    for (int64_t c = 0; c < C; ++c) {
        av[c] = (w ? w[c] : (T)1) * st[ST_RSTD * C + c];
        bv[c] = SFX(fold)(b ? b[c] : (T)0, st[ST_MEAN_LO * C + c], av[c]);
    }
    #pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int t = 0; t < nt; ++t) {
        double *wk = work + (int64_t)t * WORK_PER * C;
        SFX(col_bwd_accumulate)(x, dz, R * t / nt, R * (t + 1) / nt, C, mh, act, av, bv, tau,
                                ak, wk, (T *)(wk + 4 * C));
    }
    for (int64_t i = 0; i < 4 * C; ++i) {
        double s = 0;
        for (int t = 0; t < nt; ++t) s += work[(int64_t)t * WORK_PER * C + i];
        sums[i] = s;
    }
    for (int64_t c = 0; c < C; ++c) {
        T ml = st[ST_MEAN_LO * C + c];
        double r = st[ST_RSTD * C + c], sd = sums[c], sdxh = r * (sums[C + c] - (double)ml * sd);
        s_dy[c] = (T)sd; s_dyxhat[c] = (T)sdxh;
        if (s_dtau) { s_dtau[c] = (T)sums[2 * C + c]; s_dak[c] = (T)sums[3 * C + c]; }
        double wc = w ? w[c] : 1.0, M = st[ST_COUNT * C + c];
        int fc;
        A[c] = (T)(r * wc);
        SFX(bwd_coeffs)(r, wc * sd, wc * sdxh, M, m, ml, st, C, c, centered, eps, thr, kap,
                        B + c, Cc + c, &fc, lo + c, hi + c);
        filt |= fc;   /* a channel that kept everything has lo, hi = ∓TMAX (NaN: see KEEP) */
    }
    if (!dx) return;
    #pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int t = 0; t < nt; ++t) {
        int64_t r0 = R * t / nt, r1 = R * (t + 1) / nt;
        SFX(col_bwd_dx)(x + r0 * C, dz + r0 * C, dx + r0 * C, r1 - r0, C, act, mh, av, bv, tau,
                        ak, A, B, Cc, filt, lo, hi);
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
        double *raw = wk + 3 * C, *tmp = wk + 4 * C;              /* C, 9C */
        double *gp = wk + 13 * C;                                 /* per group mean0, var0 */
        T *lo = (T *)(wk + 15 * C), *hi = (T *)(wk + 16 * C), *mh = (T *)(wk + 17 * C);
        T *av = (T *)(wk + 18 * C), *bv = (T *)(wk + 19 * C);
        for (int64_t n = N * t / nt; n < N * (t + 1) / nt; ++n) {
            const S *xs = x + n * L * C;
            S *ys = y + n * L * C;
            SFX(col_moments)(xs, 0, L, C, centered, 0, NULL, NULL, NULL, mom, raw, tmp);
            for (int64_t g = 0; g < G; ++g) {
                int64_t s = n * G + g;
                nl_moments gm;
                double graw;
                T glo = 0, ghi = 0;
                nl_merge_range(mom, raw, g * Cg, Cg, &gm, &graw);
                SFX(store_plain)(&gm, graw, centered, eps, thr, st, ns, s, gp + g, gp + G + g,
                                 &glo, &ghi);
                for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
                    lo[c] = glo; hi[c] = ghi; mh[c] = st[ST_MEAN0 * ns + s];
                }
            }
            if (thr > 0)   /* mh: the plain means, first shifts of the filtered sums */
                SFX(col_moments)(xs, 0, L, C, centered, 1, lo, hi, mh, mom, raw, tmp);
            for (int64_t g = 0; g < G; ++g) {
                int64_t s = n * G + g;
                nl_moments gm = {0, 0, 0};
                double graw = 0;
                if (thr > 0) nl_merge_range(mom, raw, g * Cg, Cg, &gm, &graw);
                SFX(store_final)(&gm, graw, centered, thr, kap, eps, gp[g], gp[G + g], m, st,
                                 ns, s);
                for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
                    mh[c] = st[ST_MEAN * ns + s];
                    av[c] = (w ? w[c] : (T)1) * st[ST_RSTD * ns + s];
                    bv[c] = SFX(fold)(b ? b[c] : (T)0, st[ST_MEAN_LO * ns + s], av[c]);
                }
            }
            SFX(col_affine)(xs, ys, L, C, centered ? mh : NULL, av, bv, act, tau, ak);
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
        T *mh = (T *)(wk + 8 * C), *av = (T *)(wk + 9 * C), *bv = (T *)(wk + 10 * C);
        T *A = (T *)(wk + 11 * C), *B = (T *)(wk + 12 * C), *Cc = (T *)(wk + 13 * C);
        T *lo = (T *)(wk + 14 * C), *hi = (T *)(wk + 15 * C);
        for (int64_t n = N * t / nt; n < N * (t + 1) / nt; ++n) {
            const S *xs = x + n * L * C, *ds = dz + n * L * C;
            int filt = 0;
            for (int64_t c = 0; c < C; ++c) {
                int64_t s = n * G + c / Cg;
                mh[c] = st[ST_MEAN * ns + s];
                av[c] = (w ? w[c] : (T)1) * st[ST_RSTD * ns + s];
                bv[c] = SFX(fold)(b ? b[c] : (T)0, st[ST_MEAN_LO * ns + s], av[c]);
            }
            const T *mc = centered ? mh : NULL;
            SFX(col_bwd_accumulate)(xs, ds, 0, L, C, mc, act, av, bv, tau, ak, acc, tp);
            for (int64_t g = 0; g < G; ++g) {
                int64_t s = n * G + g;
                T ml = st[ST_MEAN_LO * ns + s];
                double rs = st[ST_RSTD * ns + s], sg = 0, sgxh = 0;
                for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
                    double wc = w ? w[c] : 1.0, sdxh = rs * (acc[C + c] - (double)ml * acc[c]);
                    s_dy[n * C + c] = (T)acc[c]; s_dyxhat[n * C + c] = (T)sdxh;
                    s_dtau[n * C + c] = (T)acc[2 * C + c]; s_dak[n * C + c] = (T)acc[3 * C + c];
                    sg += wc * acc[c]; sgxh += wc * sdxh;
                }
                s_gxhat[s] = (T)sgxh;
                T Bg, Ccg, glo, ghi;
                int fg;
                SFX(bwd_coeffs)(rs, sg, sgxh, st[ST_COUNT * ns + s], m, ml, st, ns, s, centered,
                                eps, thr, kap, &Bg, &Ccg, &fg, &glo, &ghi);
                filt |= fg;
                for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
                    A[c] = (T)(rs * (w ? (double)w[c] : 1.0));
                    B[c] = Bg; Cc[c] = Ccg; lo[c] = glo; hi[c] = ghi;
                }
            }
            if (dx)
                SFX(col_bwd_dx)(xs, ds, dx + n * L * C, L, C, act, mc, av, bv, tau, ak, A, B, Cc,
                                filt, lo, hi);
        }
    }
}

#undef KEEP
#undef XM

/* the parameters of this inclusion: the next one defines its own */
#undef S
#undef T
#undef LD
#undef ST
#undef FABS
#undef NEXTAFTER
#undef TMAX
#undef SFX
