/* Fused depth read for CPU, fp32 (megatron_attnres/kernels/depth_read_cpu.py builds and loads it).
 *
 * The math is LeanDepthRead's (attnres/depth_read.py, DESIGN section 3). Per token row t and
 * source j (v_j = sources[j] + t * H, N sources, hidden H):
 *     r_j = 1 / sqrt(mean(v_j^2) + eps),  t_j = v_j . q,  alpha = softmax_j(r_j t_j)
 *     out = sum_j alpha_j v_j                                  (accumulated in source order)
 * backward, with G the output gradient row:
 *     u_j = v_j . G,  ubar = sum_j alpha_j u_j,  ds_j = alpha_j (u_j - ubar)
 *     dv_j = alpha_j G + (ds_j r_j) q - (ds_j t_j r_j^3 / H) v_j,  dq += (ds_j r_j) v_j
 * One pass over each row of every source per direction (the row is re-read from cache for the
 * second loop). Single-threaded: the calls are small (see depth_read_cpu.py).
 */
#include <math.h>
#include <stdint.h>

/* `omp simd reduction` (with -fopenmp-simd: no OpenMP runtime) lets the compiler vectorise these
 * sums, i.e. add in lanes rather than strictly left to right. */
static float dot(const float *restrict a, const float *restrict b, int64_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t h = 0; h < n; ++h) s += a[h] * b[h];
    return s;
}

/* Both v . v and v . q in one pass over v. */
static void dot2(const float *restrict v, const float *restrict q, int64_t n, float *vv,
                 float *vq) {
    float sv = 0.0f, sq = 0.0f;
#pragma omp simd reduction(+ : sv, sq)
    for (int64_t h = 0; h < n; ++h) {
        sv += v[h] * v[h];
        sq += v[h] * q[h];
    }
    *vv = sv;
    *vq = sq;
}

/* Row t of out = sum_j alpha[j, t] v_j[t], accumulated in source order. The forward and the
 * recomputation both use it, so a recomputed result is bitwise the first one. */
static void weighted_row(const float *const *sources, int64_t n, int64_t tokens, int64_t hidden,
                         const float *alpha, int64_t t, float *restrict o) {
    const float a0 = alpha[t];
    const float *restrict v0 = sources[0] + t * hidden;
    for (int64_t h = 0; h < hidden; ++h) o[h] = a0 * v0[h];
    for (int64_t j = 1; j < n; ++j) {
        const float a = alpha[j * tokens + t];
        const float *restrict v = sources[j] + t * hidden;
        for (int64_t h = 0; h < hidden; ++h) o[h] += a * v[h];
    }
}

void attnres_weighted_sum(const float *const *sources, int64_t n, int64_t tokens, int64_t hidden,
                          const float *alpha, float *out) {
    for (int64_t t = 0; t < tokens; ++t)
        weighted_row(sources, n, tokens, hidden, alpha, t, out + t * hidden);
}

/* w, g: the pseudo-query and the key-norm gain, [hidden]; inv_rms, dots, alpha: [n, tokens];
 * out: [tokens, hidden]. Row by row, so that the second pass over a row (the weighted sum)
 * reads it from cache. */
void attnres_depth_read_fwd(const float *const *sources, int64_t n, int64_t tokens,
                            int64_t hidden, const float *w, const float *g, float eps, float *out,
                            float *inv_rms, float *dots, float *alpha) {
    float q[hidden > 0 ? hidden : 1];
    for (int64_t h = 0; h < hidden; ++h) q[h] = w[h] * g[h];
    for (int64_t t = 0; t < tokens; ++t) {
        float best = -INFINITY;
        for (int64_t j = 0; j < n; ++j) {
            const float *v = sources[j] + t * hidden;
            float vv, d;
            dot2(v, q, hidden, &vv, &d);
            const float r = 1.0f / sqrtf(vv / (float)hidden + eps);
            inv_rms[j * tokens + t] = r;
            dots[j * tokens + t] = d;
            alpha[j * tokens + t] = r * d; /* the score, until normalised below */
            if (r * d > best) best = r * d;
        }
        float total = 0.0f;
        for (int64_t j = 0; j < n; ++j) {
            const float e = expf(alpha[j * tokens + t] - best);
            alpha[j * tokens + t] = e;
            total += e;
        }
        for (int64_t j = 0; j < n; ++j) alpha[j * tokens + t] /= total;
        weighted_row(sources, n, tokens, hidden, alpha, t, out + t * hidden);
    }
}

/* grads[j] may be NULL (no gradient wanted for source j); grad_w, grad_g: [hidden], written
 * (dq * g and dq * w). dq = sum over tokens and sources of (ds_j r_j) v_j is accumulated in fp32
 * over FLUSH tokens and those partial sums in fp64, so that long sequences do not lose its small
 * terms. */
#define FLUSH 64
void attnres_depth_read_bwd(const float *const *sources, float *const *grads, int64_t n,
                            int64_t tokens, int64_t hidden, const float *w, const float *g,
                            const float *grad_out, const float *inv_rms, const float *dots,
                            const float *alpha, float *grad_w, float *grad_g) {
    const int64_t width = hidden > 0 ? hidden : 1;
    float u[n > 0 ? n : 1], q[width], dq_part[width];
    double dq[width];
    for (int64_t h = 0; h < hidden; ++h) {
        q[h] = w[h] * g[h];
        dq_part[h] = 0.0f;
        dq[h] = 0.0;
    }
    for (int64_t t = 0; t < tokens; ++t) {
        const float *go = grad_out + t * hidden;
        float ubar = 0.0f;
        for (int64_t j = 0; j < n; ++j) {
            u[j] = dot(sources[j] + t * hidden, go, hidden);
            ubar += alpha[j * tokens + t] * u[j];
        }
        for (int64_t j = 0; j < n; ++j) {
            const int64_t k = j * tokens + t;
            const float a = alpha[k], r = inv_rms[k];
            const float ds = a * (u[j] - ubar);
            const float coef_r = ds * r;
            const float coef_v = ds * dots[k] * r * r * r / (float)hidden;
            const float *restrict v = sources[j] + t * hidden;
            float *restrict part = dq_part;
            if (grads[j] != 0) {
                float *restrict dv = grads[j] + t * hidden;
                for (int64_t h = 0; h < hidden; ++h) {
                    dv[h] = a * go[h] + coef_r * q[h] - coef_v * v[h];
                    part[h] += coef_r * v[h];
                }
            } else {
                for (int64_t h = 0; h < hidden; ++h) part[h] += coef_r * v[h];
            }
        }
        if ((t + 1) % FLUSH == 0 || t + 1 == tokens) {
            for (int64_t h = 0; h < hidden; ++h) {
                dq[h] += (double)dq_part[h];
                dq_part[h] = 0.0f;
            }
        }
    }
    for (int64_t h = 0; h < hidden; ++h) {
        const float d = (float)dq[h];
        grad_w[h] = d * g[h];
        grad_g[h] = d * w[h];
    }
}
