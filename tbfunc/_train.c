/* tbfunc's CPU training kernels: the element-wise passes of a Bayes-by-Backprop step, each one
 * pass over memory instead of the dozen tensor ops (and as many temporaries) they replace.
 *
 *   tb_draw_grad  the draw's backward: w_s = mu + sigma * eps_s, sigma = softplus(rho), so
 *                 d/d mu = sum_s g_s and d/d rho = (sum_s g_s * eps_s) * sigmoid(rho);
 *   tb_kl         the closed-form KL(N(mu, sigma^2) || N(m, s^2)) summed, in float64;
 *   tb_kl_grad    its gradient, scaled by the incoming gradient c:
 *                 d/d mu = c (mu - m) / s^2,
 *                 d/d rho = c (sigma / s^2) sigmoid(rho) - c d log(sigma) / d rho;
 *   tb_adam       torch.optim.Adam's update (no amsgrad), in its order of operations;
 *   tb_von        the variational-online-Newton update of tbfunc.optim (its docstring has the
 *                 equations);
 *   tb_bbb_adam   the draw's backward with the KL's gradient and Adam over mu and rho, in one
 *                 pass, writing the next draw's sigma (tb.optim.Adam.sampled);
 *   tb_finite     whether every element of a list of tensors is finite (the per-call check of a
 *                 posterior that an optimizer step has just rewritten).
 *
 * Every kernel sees the virtual concatenation of its nodes' elements and handles [begin, end),
 * so callers split one call over threads. float32 uses the polynomials of _cephes.h; float64
 * uses libm.
 *
 * Unlike the noise kernel, these contract a * b + c into FMAs where the CPU has them (the
 * pragma below; the build passes -ffp-contract=off for the noise's sake). Nothing here must
 * match tensor ops bit for bit, only to rounding, and the polynomials' chains of dependent
 * operations, which bound these loops, get half as long: the VON update ran 30% faster. The
 * results are still the same for any thread count (the vectorised and scalar parts of a loop
 * contract alike); across CPUs with and without FMA they agree to rounding. */

#if defined(__clang__)
#pragma clang fp contract(fast)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=fast")
#endif

#include <math.h>
#include <stdint.h>

#include "_cephes.h"
#include "_parts.h"

#define CHUNK 256         /* elements per block of the multi-sample reduction: stays in L1 */
#define SMALL_RHO -20.0   /* below it log(softplus(rho)) is rho to float64 precision */

typedef const int64_t *table; /* per node: an address or a count */

/* One division per element, not one per side of the select: a vectorised select computes both
 * sides, and divisions bound these loops. */
static inline float sigmoid32(float r) {
    float t = exp32(-__builtin_fabsf(r));
    float inv = 1.0f / (1.0f + t);
    return r >= 0.0f ? inv : t * inv;
}

static inline double sigmoid64(double r) {
    double t = exp(-fabs(r));
    double inv = 1.0 / (1.0 + t);
    return r >= 0.0 ? inv : t * inv;
}

/* Runs the block given (with l, a, b in scope) for the part [a, b) of node l that lies in [begin, end). */
#define FOR_NODES(nodes, numels, begin, end, ...)                                     \
    do {                                                                              \
        int64_t start_ = 0;                                                           \
        for (int64_t l = 0; l < (nodes) && start_ < (end); start_ += (numels)[l], l++) { \
            int64_t a = (begin) > start_ ? (begin) - start_ : 0;                      \
            int64_t b = (end) < start_ + (numels)[l] ? (end) - start_ : (numels)[l];  \
            if (a < b) __VA_ARGS__;                                                   \
        }                                                                             \
    } while (0)

/* ------------------------------------------------------------------------------------------ */
/* The draw's backward, with the KL's gradient added where a KL rides along (tb.nelbo): with
 * c the KL's incoming gradient and N(m, s^2) the node's prior,
 *   d/d mu  = sum_s g_s + c (mu - m) / s^2,
 *   d/d rho = (sum_s g_s eps_s + c sigma / s^2) sigmoid(rho) - c d log(sigma) / d rho.
 * grads[l], eps[l]: (samples, numels[l]) contiguous. Without a KL (mus NULL) grad_mus[l] may be
 * 0 when samples == 1: mu's gradient is then the weight gradient itself. Priors per node:
 * prior_mus[l] / prior_sigmas[l] the address of a tensor shaped like mu, or 0 for the scalar
 * in prior_mu_values[l] / prior_sigma_values[l]. */

/* The KL's gradient at element K added to the data term's G (for mu) and GE (sum_s g_s eps_s,
 * for rho): the one formula tb_draw_grad and tb_kl_grad share. */
#define KL_GRAD_AT(T, SIGMOID, K, MEAN, SCALE, G, GE)                                          \
    {                                                                                         \
        T sig = SIGMOID(rho[K]);                                                              \
        T mean = MEAN, scale = SCALE;                                                         \
        T precision = (T)1 / (scale * scale); /* hoisted out of the loop for a scalar scale */   \
        T dlog = rho[K] < (T)SMALL_RHO ? (T)1 : sig / sigma[K];                               \
        gm[K] = (G) + c * (mu[K] - mean) * precision;                                         \
        gr[K] = ((GE) + c * sigma[K] * precision) * sig - c * dlog;                           \
    }

#define DRAW_FINISH(T, SIGMOID, MEAN, SCALE)                                                   \
    for (int64_t i = 0; i < m; i++) {                                                         \
        int64_t k = lo + i;                                                                   \
        KL_GRAD_AT(T, SIGMOID, k, MEAN, SCALE, sum_g[i], sum_ge[i])                           \
    }

#define DRAW_GRAD(T, SIGMOID)                                                                  \
    static void draw_grad_##T(int64_t n, int64_t samples, int64_t a, int64_t b, const T *g,  \
                              const T *e, const T *rho, T *gm, T *gr, T c, const T *mu,        \
                              const T *sigma, const T *pm, T pm_value, const T *ps,            \
                              T ps_value) {                                                   \
        if (samples == 1 && !mu) {                                                            \
            for (int64_t i = a; i < b; i++) gr[i] = (g[i] * e[i]) * SIGMOID(rho[i]);         \
            return;                                                                           \
        }                                                                                     \
        T sum_g[CHUNK], sum_ge[CHUNK];                                                        \
        for (int64_t lo = a; lo < b; lo += CHUNK) {                                           \
            int64_t m = b - lo < CHUNK ? b - lo : CHUNK;                                      \
            for (int64_t i = 0; i < m; i++) {                                                 \
                sum_g[i] = g[lo + i];                                                         \
                sum_ge[i] = g[lo + i] * e[lo + i];                                            \
            }                                                                                 \
            for (int64_t s = 1; s < samples; s++) {                                           \
                const T *gs = g + s * n + lo, *es = e + s * n + lo;                           \
                for (int64_t i = 0; i < m; i++) {                                             \
                    sum_g[i] = sum_g[i] + gs[i];                                              \
                    sum_ge[i] = sum_ge[i] + gs[i] * es[i];                                    \
                }                                                                             \
            }                                                                                 \
            if (!mu) {                                                                        \
                for (int64_t i = 0; i < m; i++) {                                             \
                    gm[lo + i] = sum_g[i];                                                    \
                    gr[lo + i] = sum_ge[i] * SIGMOID(rho[lo + i]);                            \
                }                                                                             \
            } else if (pm && ps) {                                                            \
                DRAW_FINISH(T, SIGMOID, pm[k], ps[k])                                         \
            } else if (pm) {                                                                  \
                DRAW_FINISH(T, SIGMOID, pm[k], ps_value)                                      \
            } else if (ps) {                                                                  \
                DRAW_FINISH(T, SIGMOID, pm_value, ps[k])                                      \
            } else {                                                                          \
                DRAW_FINISH(T, SIGMOID, pm_value, ps_value)                                   \
            }                                                                                 \
        }                                                                                     \
    }

DRAW_GRAD(float, sigmoid32)
DRAW_GRAD(double, sigmoid64)

void tb_draw_grad(int32_t dtype, int64_t nodes, table numels, int64_t samples, table grads,
                  table eps, table rhos, table grad_mus, table grad_rhos, double c, table mus,
                  table sigmas, table prior_mus, const double *prior_mu_values,
                  table prior_sigmas, const double *prior_sigma_values, int64_t begin,
                  int64_t end) {
    FOR_NODES(nodes, numels, begin, end, {
        int kl = mus != 0;
        if (dtype == 0)
            draw_grad_float(numels[l], samples, a, b, (const float *)grads[l],
                            (const float *)eps[l], (const float *)rhos[l], (float *)grad_mus[l],
                            (float *)grad_rhos[l], (float)c,
                            kl ? (const float *)mus[l] : 0, kl ? (const float *)sigmas[l] : 0,
                            kl ? (const float *)prior_mus[l] : 0,
                            kl ? (float)prior_mu_values[l] : 0.0f,
                            kl ? (const float *)prior_sigmas[l] : 0,
                            kl ? (float)prior_sigma_values[l] : 1.0f);
        else
            draw_grad_double(numels[l], samples, a, b, (const double *)grads[l],
                             (const double *)eps[l], (const double *)rhos[l],
                             (double *)grad_mus[l], (double *)grad_rhos[l], c,
                             kl ? (const double *)mus[l] : 0, kl ? (const double *)sigmas[l] : 0,
                             kl ? (const double *)prior_mus[l] : 0,
                             kl ? prior_mu_values[l] : 0.0,
                             kl ? (const double *)prior_sigmas[l] : 0,
                             kl ? prior_sigma_values[l] : 1.0);
    });
}

/* ------------------------------------------------------------------------------------------ */
/* The Gaussian KL. Priors per node: prior_mus[l] / prior_sigmas[l] the address of a tensor
 * shaped like mu, or 0 for the scalar in prior_mu_values[l] / prior_sigma_values[l]. */

static inline float log_sigma32(float rho, float sigma) {
    return rho < (float)SMALL_RHO ? rho : ln32(rho < (float)SMALL_RHO ? 1.0f : sigma);
}

static inline double log_sigma64(double rho, double sigma) {
    return rho < SMALL_RHO ? rho : log(sigma);
}

#define KL_TERMS(T, LOG_SIGMA, MEAN, SCALE, LOG_SCALE)                                       \
    for (int64_t i = 0; i < m; i++) {                                                         \
        int64_t k = lo + i;                                                                   \
        T mean = MEAN, scale = SCALE;                                                         \
        T d = mu[k] - mean;                                                                   \
        T spread = sigma[k] * sigma[k] + d * d;                                               \
        terms[i] = (LOG_SCALE - LOG_SIGMA(rho[k], sigma[k])) +                                \
                   (spread / ((T)2 * scale * scale) - (T)0.5);                                \
    }

#define KL(T, LOG_SIGMA, LOG)                                                                 \
    static double kl_##T(int64_t a, int64_t b, const T *mu, const T *rho, const T *sigma,      \
                         const T *pm, T pm_value, const T *ps, T ps_value) {                  \
        double total[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                           \
        T terms[CHUNK];                                                                       \
        T log_scale = ps ? (T)0 : LOG(ps_value);                                              \
        for (int64_t lo = a; lo < b; lo += CHUNK) {                                           \
            int64_t m = b - lo < CHUNK ? b - lo : CHUNK;                                      \
            if (pm && ps)                                                                     \
                KL_TERMS(T, LOG_SIGMA, pm[k], ps[k], LOG(scale))                              \
            else if (pm)                                                                      \
                KL_TERMS(T, LOG_SIGMA, pm[k], ps_value, log_scale)                            \
            else if (ps)                                                                      \
                KL_TERMS(T, LOG_SIGMA, pm_value, ps[k], LOG(scale))                           \
            else                                                                              \
                KL_TERMS(T, LOG_SIGMA, pm_value, ps_value, log_scale)                         \
            int64_t i = 0;                                                                    \
            for (; i + 8 <= m; i += 8)                                                        \
                for (int j = 0; j < 8; j++) total[j] += (double)terms[i + j];                 \
            for (; i < m; i++) total[0] += (double)terms[i];                                  \
        }                                                                                     \
        return ((total[0] + total[1]) + (total[2] + total[3])) +                              \
               ((total[4] + total[5]) + (total[6] + total[7]));                               \
    }

static inline float log_positive32(float x) { return ln32(x); }

KL(float, log_sigma32, log_positive32)
KL(double, log_sigma64, log)

/* out[0] += the sum over [begin, end) */
void tb_kl(int32_t dtype, int64_t nodes, table numels, table mus, table rhos, table sigmas,
           table prior_mus, const double *prior_mu_values, table prior_sigmas,
           const double *prior_sigma_values, int64_t begin, int64_t end, double *out) {
    double sum = 0.0;
    FOR_NODES(nodes, numels, begin, end, {
        if (dtype == 0)
            sum += kl_float(a, b, (const float *)mus[l], (const float *)rhos[l],
                            (const float *)sigmas[l], (const float *)prior_mus[l],
                            (float)prior_mu_values[l], (const float *)prior_sigmas[l],
                            (float)prior_sigma_values[l]);
        else
            sum += kl_double(a, b, (const double *)mus[l], (const double *)rhos[l],
                             (const double *)sigmas[l], (const double *)prior_mus[l],
                             prior_mu_values[l], (const double *)prior_sigmas[l],
                             prior_sigma_values[l]);
    });
    out[0] += sum;
}

/* One loop per kind of prior (a tensor or a scalar for each of m and s), so that each
 * vectorises. */
#define KL_GRAD_LOOP(T, SIGMOID, MEAN, SCALE)                                                 \
    for (int64_t k = a; k < b; k++) KL_GRAD_AT(T, SIGMOID, k, MEAN, SCALE, (T)0, (T)0)

#define KL_GRAD(T, SIGMOID)                                                                   \
    static void kl_grad_##T(int64_t a, int64_t b, T c, const T *mu, const T *rho,             \
                            const T *sigma, const T *pm, T pm_value, const T *ps, T ps_value,  \
                            T *gm, T *gr) {                                                   \
        if (pm && ps)                                                                         \
            KL_GRAD_LOOP(T, SIGMOID, pm[k], ps[k])                                            \
        else if (pm)                                                                          \
            KL_GRAD_LOOP(T, SIGMOID, pm[k], ps_value)                                         \
        else if (ps)                                                                          \
            KL_GRAD_LOOP(T, SIGMOID, pm_value, ps[k])                                         \
        else                                                                                  \
            KL_GRAD_LOOP(T, SIGMOID, pm_value, ps_value)                                      \
    }

KL_GRAD(float, sigmoid32)
KL_GRAD(double, sigmoid64)

void tb_kl_grad(int32_t dtype, int64_t nodes, table numels, double c, table mus, table rhos,
                table sigmas, table prior_mus, const double *prior_mu_values, table prior_sigmas,
                const double *prior_sigma_values, table grad_mus, table grad_rhos, int64_t begin,
                int64_t end) {
    FOR_NODES(nodes, numels, begin, end, {
        if (dtype == 0)
            kl_grad_float(a, b, (float)c, (const float *)mus[l], (const float *)rhos[l],
                          (const float *)sigmas[l], (const float *)prior_mus[l],
                          (float)prior_mu_values[l], (const float *)prior_sigmas[l],
                          (float)prior_sigma_values[l], (float *)grad_mus[l],
                          (float *)grad_rhos[l]);
        else
            kl_grad_double(a, b, c, (const double *)mus[l], (const double *)rhos[l],
                           (const double *)sigmas[l], (const double *)prior_mus[l],
                           prior_mu_values[l], (const double *)prior_sigmas[l],
                           prior_sigma_values[l], (double *)grad_mus[l], (double *)grad_rhos[l]);
    });
}

/* ------------------------------------------------------------------------------------------ */
/* Adam, as torch.optim.Adam's single-tensor route computes it (amsgrad off), op for op:
 *   g = grad + weight_decay * p;  m = lerp(m, g, 1 - beta1);  v = v beta2 + ((1 - beta2) g) g;
 *   p = p + ((-step_size) m) / (sqrt(v) / bc2_sqrt + eps),
 * with step_size = lr / (1 - beta1^t) and bc2_sqrt = sqrt(1 - beta2^t) per node (each tensor
 * keeps its own step count). */

#define ADAM(T, SQRT)                                                                          \
    static void adam_##T(int64_t a, int64_t b, T *p, const T *grad, T *m, T *v, T step_size,   \
                         T bc2_sqrt, T w1, T beta2, T w2, T eps, T decay) {                    \
        for (int64_t k = a; k < b; k++) {                                                      \
            T g = decay != (T)0 ? grad[k] + decay * p[k] : grad[k];                            \
            T mk = w1 < (T)0.5 ? m[k] + w1 * (g - m[k]) : g - (g - m[k]) * ((T)1 - w1);        \
            T vk = v[k] * beta2 + (w2 * g) * g;                                                \
            T denom = SQRT(vk) / bc2_sqrt + eps;                                               \
            m[k] = mk;                                                                         \
            v[k] = vk;                                                                         \
            p[k] = p[k] + ((-step_size) * mk) / denom;                                         \
        }                                                                                      \
    }

ADAM(float, __builtin_sqrtf)
ADAM(double, sqrt)

/* hyper: per node (step_size, bc2_sqrt); then 1 - beta1, beta2, 1 - beta2, eps, weight_decay */
void tb_adam(int32_t dtype, int64_t nodes, table numels, table params, table grads,
             table exp_avgs, table exp_avg_sqs, const double *per_node, const double *hyper,
             int64_t begin, int64_t end) {
    FOR_NODES(nodes, numels, begin, end, {
        double step_size = per_node[2 * l], bc2_sqrt = per_node[2 * l + 1];
        if (dtype == 0)
            adam_float(a, b, (float *)params[l], (const float *)grads[l], (float *)exp_avgs[l],
                       (float *)exp_avg_sqs[l], (float)step_size, (float)bc2_sqrt,
                       (float)hyper[0], (float)hyper[1], (float)hyper[2], (float)hyper[3],
                       (float)hyper[4]);
        else
            adam_double(a, b, (double *)params[l], (const double *)grads[l],
                        (double *)exp_avgs[l], (double *)exp_avg_sqs[l], step_size, bc2_sqrt,
                        hyper[0], hyper[1], hyper[2], hyper[3], hyper[4]);
    });
}

/* ------------------------------------------------------------------------------------------ */
/* Variational online Newton (tbfunc.optim's docstring has the equations), in place, from
 * mu.grad = g and rho.grad = g eps sigmoid(rho):
 *   sigma = softplus(rho), h_hat = (rho.grad / sigmoid(rho)) / sigma;
 *   gbar = lerp(gbar, g, 1 - beta1);
 *   h = lerp(h, h_hat, 1 - beta2) + ((1 - beta2)^2 / 2) (h - h_hat)^2 / (h + delta)  (old h);
 *   d = ((mu - centre) delta + gbar / (1 - beta1^t)) / (h + delta), clipped to [-clip, clip];
 *   mu = mu - lr d;  sigma' = 1 / sqrt(N (h + delta));  rho = sigma' + log(-expm1(-sigma')).
 * hyper: 1 - beta1, 1 - beta2, (1 - beta2)^2 / 2, 1 / (1 - beta1^t), lr, N, clip (inf: none). */

static inline float log1p32(float t) {
    /* ln(1 + t) for t in [0, 1]: ln(u) t / (u - 1) with u = 1 + t corrects u's rounding */
    float u = 1.0f + t;
    float d = u - 1.0f;
    return d == 0.0f ? t : ln32(u) * (t / d);
}

/* softplus(r), and sigmoid(r) written to *gate, from one exp(-|r|) shared by both: the VON
 * update needs the two, and an exp per element is a fifth of its arithmetic. The sigmoid has
 * the bits of sigmoid32 (sigmoid64), the same operations on the same t. */
static inline float softplus_gate32(float r, float *gate) {
    float t = exp32(-__builtin_fabsf(r));
    float inv = 1.0f / (1.0f + t);
    *gate = r >= 0.0f ? inv : t * inv;
    return (r > 0.0f ? r : 0.0f) + log1p32(t);
}

static inline double softplus_gate64(double r, double *gate) {
    double t = exp(-fabs(r));
    double inv = 1.0 / (1.0 + t);
    *gate = r >= 0.0 ? inv : t * inv;
    return (r > 0.0 ? r : 0.0) + log1p(t);
}

static inline float inverse_softplus32(float s) {
    /* s + ln(1 - e^-s), s > 0: 1 - e^-s by its series below 1/2 (no cancellation) */
    float z = s * s;
    float p = 1.0f / 720 - s * (1.0f / 5040);
    p = 1.0f / 120 - s * p;
    p = 1.0f / 24 - s * p;
    p = 1.0f / 6 - s * p;
    float series = s - z * (0.5f - s * p);
    float direct = 1.0f - exp32(-s);
    /* sigma' = 0 (h overflowed): -inf, as log(-expm1(-0)) gives, so the next step's finiteness
     * check reports the divergence instead of ln32 returning a finite ln(0) */
    float value = s + ln32(s < 0.5f ? series : direct);
    return s == 0.0f ? -__builtin_inff() : value;
}

static inline double inverse_softplus64(double s) { return s + log(-expm1(-s)); }

/* ORs into `bad` whether an element of the new mu or rho in [LO, LO + COUNT) is not finite
 * (x - x is 0 for a finite x, NaN for inf or NaN): the update kernels' own check, so that a
 * clean step needs no finiteness pass before the next draw. A loop of its own after the
 * writes: inside VON's inverse-softplus loop it kept that loop from vectorising (5x slower). */
#define FLAG_NONFINITE(T, LO, COUNT)                                                         \
    for (int64_t i = 0; i < (COUNT); i++)                                                    \
        bad |= (mu[(LO) + i] - mu[(LO) + i] != (T)0) | (rho[(LO) + i] - rho[(LO) + i] != (T)0);

/* Three loops per block of CHUNK elements: softplus with sigmoid, the update, then the inverse
 * softplus. Each is a short chain of dependent operations, so the out-of-order core overlaps many
 * elements of it; one loop doing all three was bound by the chain's latency (14% slower, the
 * same bits). NOISE (a constant per instance) is VON.sampled's route: sigma is read from the
 * draw's (sig) instead of softplus(rho), h_hat is g eps / sigma, and the new sigma is written
 * back to sig for the next draw. */
#define VON_LOOP(T, SOFTPLUS_GATE, INVERSE, SQRT, PULL, NOISE)                                 \
    for (int64_t lo = a; lo < b; lo += CHUNK) {                                                \
        int64_t count = b - lo < CHUNK ? b - lo : CHUNK;                                       \
        T buffer[CHUNK], gate[CHUNK];                                                          \
        if (NOISE)                                                                             \
            for (int64_t i = 0; i < count; i++) buffer[i] = sig[lo + i];                       \
        else                                                                                   \
            for (int64_t i = 0; i < count; i++)                                                \
                buffer[i] = SOFTPLUS_GATE(rho[lo + i], gate + i);                              \
        for (int64_t i = 0; i < count; i++) {                                                  \
            int64_t k = lo + i;                                                                \
            T sigma = buffer[i];                                                               \
            T h_hat = ((NOISE) ? gm[k] * gr[k] : gr[k] / gate[i]) / sigma;                     \
            T g = gm[k], m = gbar[k], old = h[k];                                              \
            m = m + w1 * (g - m);                                                              \
            T gap = old - h_hat;                                                               \
            T fresh = old + w2 * (h_hat - old) + correction * ((gap * gap) / (old + delta));   \
            T precision = fresh + delta;                                                       \
            T d = ((PULL) * delta + m * bc1) / precision;                                      \
            d = d < -clip ? -clip : (d > clip ? clip : d);                                     \
            gbar[k] = m;                                                                       \
            h[k] = fresh;                                                                      \
            mu[k] = mu[k] - lr * d;                                                            \
            buffer[i] = (T)1 / SQRT(precision * n); /* the new sigma */                        \
        }                                                                                      \
        for (int64_t i = 0; i < count; i++) rho[lo + i] = INVERSE(buffer[i]);                  \
        FLAG_NONFINITE(T, lo, count)                                                           \
        if (NOISE)                                                                             \
            for (int64_t i = 0; i < count; i++) sig[lo + i] = buffer[i];                       \
    }

/* a loop per route (rho's gradient, or the noise with sig) and centre or none, so that each
 * vectorises; no clip: clip = inf */
#define VON(T, SOFTPLUS_GATE, INVERSE, SQRT)                                                   \
    static int von_##T(int64_t a, int64_t b, T *restrict mu, T *restrict rho,                  \
                        const T *restrict gm, const T *restrict gr, T *restrict gbar,          \
                        T *restrict h, const T *restrict centre, T *restrict sig, T delta,     \
                        const double *hyper) {                                                 \
        T w1 = (T)hyper[0], w2 = (T)hyper[1], correction = (T)hyper[2];                        \
        T bc1 = (T)hyper[3], lr = (T)hyper[4], n = (T)hyper[5], clip = (T)hyper[6];            \
        int bad = 0;                                                                           \
        if (!sig && centre)                                                                    \
            VON_LOOP(T, SOFTPLUS_GATE, INVERSE, SQRT, mu[k] - centre[k], 0)                    \
        else if (!sig)                                                                         \
            VON_LOOP(T, SOFTPLUS_GATE, INVERSE, SQRT, mu[k], 0)                                \
        else if (centre)                                                                       \
            VON_LOOP(T, SOFTPLUS_GATE, INVERSE, SQRT, mu[k] - centre[k], 1)                    \
        else                                                                                   \
            VON_LOOP(T, SOFTPLUS_GATE, INVERSE, SQRT, mu[k], 1)                                \
        return bad;                                                                            \
    }

VON(float, softplus_gate32, inverse_softplus32, __builtin_sqrtf)
VON(double, softplus_gate64, inverse_softplus64, sqrt)

/* sigmas: NULL, or VON.sampled's route: grad_rhos holds the draw's eps and sigmas[l] its sigma
 * (read, then overwritten with the new sigma). out[0] = 1 if a new mu or rho in [begin, end)
 * is not finite, else left as it is (as tb_finite). */
void tb_von(int32_t dtype, int64_t nodes, table numels, table mus, table rhos, table grad_mus,
            table grad_rhos, table gbars, table hs, table centres, table sigmas,
            const double *deltas, const double *hyper, int64_t begin, int64_t end,
            int64_t *out) {
    FOR_NODES(nodes, numels, begin, end, {
        int bad;
        if (dtype == 0)
            bad = von_float(a, b, (float *)mus[l], (float *)rhos[l],
                            (const float *)grad_mus[l], (const float *)grad_rhos[l],
                            (float *)gbars[l], (float *)hs[l],
                            centres ? (const float *)centres[l] : 0,
                            sigmas ? (float *)sigmas[l] : 0, (float)deltas[l], hyper);
        else
            bad = von_double(a, b, (double *)mus[l], (double *)rhos[l],
                             (const double *)grad_mus[l], (const double *)grad_rhos[l],
                             (double *)gbars[l], (double *)hs[l],
                             centres ? (const double *)centres[l] : 0,
                             sigmas ? (double *)sigmas[l] : 0, deltas[l], hyper);
        if (bad) out[0] = 1;
    });
}

/* ------------------------------------------------------------------------------------------ */
/* Bayes-by-Backprop and Adam in one pass (tb.optim.Adam.sampled): from one draw's weight
 * gradient g and noise eps, with sigma the draw's,
 *   d/d mu  = g + c (mu - m) / s^2,
 *   d/d rho = (g eps + c sigma / s^2) sigmoid(rho) - c d log(sigma) / d rho   (KL_GRAD_AT's),
 * then torch.optim.Adam's update of mu and of rho (tb_adam's operations) at the node's step,
 * and softplus of the new rho written to sigma: the next draw's, so that no softplus pass runs
 * before it. Four loops per block of CHUNK elements (the gradients, the two updates, the new
 * sigma), each a short chain that the core overlaps across elements. */

#define ADAM_AT(T, SQRT, P, G, M, V)                                                           \
    {                                                                                         \
        T grad_ = decay != (T)0 ? (G) + decay * (P)[k] : (G);                                 \
        T m_ = w1 < (T)0.5 ? (M)[k] + w1 * (grad_ - (M)[k])                                  \
                           : grad_ - (grad_ - (M)[k]) * ((T)1 - w1);                          \
        T v_ = (V)[k] * beta2 + (w2 * grad_) * grad_;                                         \
        T denom_ = SQRT(v_) / bc2_sqrt + eps;                                                 \
        (M)[k] = m_;                                                                          \
        (V)[k] = v_;                                                                          \
        (P)[k] = (P)[k] + ((-step_size) * m_) / denom_;                                       \
    }

#define BBB_ADAM_LOOP(T, SIGMOID, SOFTPLUS_GATE, SQRT, MEAN, SCALE)                           \
    for (int64_t lo = a; lo < b; lo += CHUNK) {                                               \
        int64_t count = b - lo < CHUNK ? b - lo : CHUNK;                                      \
        T gmu[CHUNK], grho[CHUNK];                                                            \
        for (int64_t i = 0; i < count; i++) {                                                 \
            int64_t k = lo + i;                                                               \
            T gate = SIGMOID(rho[k]);                                                         \
            T mean = MEAN, scale = SCALE;                                                     \
            T precision = (T)1 / (scale * scale);                                             \
            T dlog = rho[k] < (T)SMALL_RHO ? (T)1 : gate / sigma[k];                          \
            gmu[i] = g[k] + c * (mu[k] - mean) * precision;                                   \
            grho[i] = (g[k] * e[k] + c * sigma[k] * precision) * gate - c * dlog;             \
        }                                                                                     \
        for (int64_t i = 0; i < count; i++) {                                                 \
            int64_t k = lo + i;                                                               \
            ADAM_AT(T, SQRT, mu, gmu[i], m_mu, v_mu)                                          \
        }                                                                                     \
        for (int64_t i = 0; i < count; i++) {                                                 \
            int64_t k = lo + i;                                                               \
            ADAM_AT(T, SQRT, rho, grho[i], m_rho, v_rho)                                      \
        }                                                                                     \
        for (int64_t i = 0; i < count; i++) {                                                 \
            T unused;                                                                         \
            sigma[lo + i] = SOFTPLUS_GATE(rho[lo + i], &unused);                              \
        }                                                                                     \
        FLAG_NONFINITE(T, lo, count)                                                          \
    }

#define BBB_ADAM(T, SIGMOID, SOFTPLUS_GATE, SQRT)                                              \
    static int bbb_adam_##T(int64_t a, int64_t b, T *restrict mu, T *restrict rho,            \
                             const T *restrict g, const T *restrict e, T *restrict sigma,      \
                             T *restrict m_mu, T *restrict v_mu, T *restrict m_rho,            \
                             T *restrict v_rho, const T *pm, T pm_value, const T *ps,          \
                             T ps_value, T step_size, T bc2_sqrt, const double *hyper) {       \
        T c = (T)hyper[0], w1 = (T)hyper[1], beta2 = (T)hyper[2], w2 = (T)hyper[3];           \
        T eps = (T)hyper[4], decay = (T)hyper[5];                                             \
        int bad = 0;                                                                          \
        if (pm && ps)                                                                         \
            BBB_ADAM_LOOP(T, SIGMOID, SOFTPLUS_GATE, SQRT, pm[k], ps[k])                      \
        else if (pm)                                                                          \
            BBB_ADAM_LOOP(T, SIGMOID, SOFTPLUS_GATE, SQRT, pm[k], ps_value)                   \
        else if (ps)                                                                          \
            BBB_ADAM_LOOP(T, SIGMOID, SOFTPLUS_GATE, SQRT, pm_value, ps[k])                   \
        else                                                                                  \
            BBB_ADAM_LOOP(T, SIGMOID, SOFTPLUS_GATE, SQRT, pm_value, ps_value)                \
        return bad;                                                                           \
    }

BBB_ADAM(float, sigmoid32, softplus_gate32, __builtin_sqrtf)
BBB_ADAM(double, sigmoid64, softplus_gate64, sqrt)

/* per_node: (step_size, bc2_sqrt) per node; hyper: c (the KL's scale), 1 - beta1, beta2,
 * 1 - beta2, eps, weight_decay. Priors per node as tb_draw_grad takes them. out[0] = 1 if a
 * new mu or rho in [begin, end) is not finite, else left as it is (as tb_finite): the caller
 * then knows the posterior's finiteness without another pass. */
void tb_bbb_adam(int32_t dtype, int64_t nodes, table numels, table mus, table rhos, table grads,
                 table eps, table sigmas, table m_mus, table v_mus, table m_rhos, table v_rhos,
                 table prior_mus, const double *prior_mu_values, table prior_sigmas,
                 const double *prior_sigma_values, const double *per_node, const double *hyper,
                 int64_t begin, int64_t end, int64_t *out) {
    FOR_NODES(nodes, numels, begin, end, {
        double step_size = per_node[2 * l], bc2_sqrt = per_node[2 * l + 1];
        int bad;
        if (dtype == 0)
            bad = bbb_adam_float(a, b, (float *)mus[l], (float *)rhos[l],
                                 (const float *)grads[l], (const float *)eps[l],
                                 (float *)sigmas[l], (float *)m_mus[l], (float *)v_mus[l],
                                 (float *)m_rhos[l], (float *)v_rhos[l],
                                 (const float *)prior_mus[l], (float)prior_mu_values[l],
                                 (const float *)prior_sigmas[l], (float)prior_sigma_values[l],
                                 (float)step_size, (float)bc2_sqrt, hyper);
        else
            bad = bbb_adam_double(a, b, (double *)mus[l], (double *)rhos[l],
                                  (const double *)grads[l], (const double *)eps[l],
                                  (double *)sigmas[l], (double *)m_mus[l], (double *)v_mus[l],
                                  (double *)m_rhos[l], (double *)v_rhos[l],
                                  (const double *)prior_mus[l], prior_mu_values[l],
                                  (const double *)prior_sigmas[l], prior_sigma_values[l],
                                  step_size, bc2_sqrt, hyper);
        if (bad) out[0] = 1;
    });
}

/* ------------------------------------------------------------------------------------------ */
/* Finiteness: out[0] = 1 if some element of [begin, end) is inf or nan, else left as it is.
 * kinds[l]: 0 float32, 1 float64 (a list may mix them). An element is not finite when its
 * exponent bits are all ones; the loops OR those tests together without branching, so they
 * vectorise, and read each tensor once. */

static int64_t any_nonfinite32(int64_t a, int64_t b, const uint32_t *restrict x) {
    uint32_t bad = 0;
    for (int64_t i = a; i < b; i++) bad |= (x[i] & 0x7F800000u) == 0x7F800000u;
    return bad != 0;
}

static int64_t any_nonfinite64(int64_t a, int64_t b, const uint64_t *restrict x) {
    uint64_t bad = 0;
    for (int64_t i = a; i < b; i++)
        bad |= (x[i] & 0x7FF0000000000000ull) == 0x7FF0000000000000ull;
    return bad != 0;
}

void tb_finite(int64_t nodes, table kinds, table numels, table values, int64_t begin,
               int64_t end, int64_t *out) {
    FOR_NODES(nodes, numels, begin, end, {
        int64_t bad = kinds[l] == 0 ? any_nonfinite32(a, b, (const uint32_t *)values[l])
                                    : any_nonfinite64(a, b, (const uint64_t *)values[l]);
        if (bad) out[0] = 1;
    });
}

/* ------------------------------------------------------------------------------------------ */
/* Each kernel over `parts` parts of [0, total) (_parts.h); tb_kl and tb_finite write part p's
 * result to out[p] (out zeroed by the caller), so the caller combines them as it does the
 * pool's parts. */

void tb_draw_grad_parts(int32_t dtype, int64_t nodes, table numels, int64_t samples,
                        table grads, table eps, table rhos, table grad_mus, table grad_rhos,
                        double c, table mus, table sigmas, table prior_mus,
                        const double *prior_mu_values, table prior_sigmas,
                        const double *prior_sigma_values, int64_t total, int64_t parts) {
    OVER_PARTS(total, parts,
               tb_draw_grad(dtype, nodes, numels, samples, grads, eps, rhos, grad_mus, grad_rhos,
                            c, mus, sigmas, prior_mus, prior_mu_values, prior_sigmas,
                            prior_sigma_values, begin, end));
}

void tb_kl_parts(int32_t dtype, int64_t nodes, table numels, table mus, table rhos,
                 table sigmas, table prior_mus, const double *prior_mu_values,
                 table prior_sigmas, const double *prior_sigma_values, int64_t total,
                 int64_t parts, double *out) {
    OVER_PARTS(total, parts,
               tb_kl(dtype, nodes, numels, mus, rhos, sigmas, prior_mus, prior_mu_values,
                     prior_sigmas, prior_sigma_values, begin, end, out + part));
}

void tb_kl_grad_parts(int32_t dtype, int64_t nodes, table numels, double c, table mus,
                      table rhos, table sigmas, table prior_mus, const double *prior_mu_values,
                      table prior_sigmas, const double *prior_sigma_values, table grad_mus,
                      table grad_rhos, int64_t total, int64_t parts) {
    OVER_PARTS(total, parts,
               tb_kl_grad(dtype, nodes, numels, c, mus, rhos, sigmas, prior_mus,
                          prior_mu_values, prior_sigmas, prior_sigma_values, grad_mus,
                          grad_rhos, begin, end));
}

void tb_adam_parts(int32_t dtype, int64_t nodes, table numels, table params, table grads,
                   table exp_avgs, table exp_avg_sqs, const double *per_node,
                   const double *hyper, int64_t total, int64_t parts) {
    OVER_PARTS(total, parts,
               tb_adam(dtype, nodes, numels, params, grads, exp_avgs, exp_avg_sqs, per_node,
                       hyper, begin, end));
}

void tb_von_parts(int32_t dtype, int64_t nodes, table numels, table mus, table rhos,
                  table grad_mus, table grad_rhos, table gbars, table hs, table centres,
                  table sigmas, const double *deltas, const double *hyper, int64_t total,
                  int64_t parts, int64_t *out) {
    OVER_PARTS(total, parts,
               tb_von(dtype, nodes, numels, mus, rhos, grad_mus, grad_rhos, gbars, hs, centres,
                      sigmas, deltas, hyper, begin, end, out + part));
}

void tb_bbb_adam_parts(int32_t dtype, int64_t nodes, table numels, table mus, table rhos,
                       table grads, table eps, table sigmas, table m_mus, table v_mus,
                       table m_rhos, table v_rhos, table prior_mus, const double *prior_mu_values,
                       table prior_sigmas, const double *prior_sigma_values,
                       const double *per_node, const double *hyper, int64_t total,
                       int64_t parts, int64_t *out) {
    OVER_PARTS(total, parts,
               tb_bbb_adam(dtype, nodes, numels, mus, rhos, grads, eps, sigmas, m_mus, v_mus,
                           m_rhos, v_rhos, prior_mus, prior_mu_values, prior_sigmas,
                           prior_sigma_values, per_node, hyper, begin, end, out + part));
}

void tb_finite_parts(int64_t nodes, table kinds, table numels, table values, int64_t total,
                     int64_t parts, int64_t *out) {
    OVER_PARTS(total, parts, tb_finite(nodes, kinds, numels, values, begin, end, out + part));
}
