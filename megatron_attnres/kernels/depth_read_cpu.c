/* Fused depth read for CPU, fp32 (megatron_attnres/kernels/depth_read_cpu.py builds and loads it).
 *
 * The math is LeanDepthRead's (attnres/depth_read.py, docs/architecture.md section 3). Per token row t and
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

/* Dot products of a row, in LANES independent partial sums that the compiler keeps in vector
 * registers (portable C, no intrinsics), added pairwise at the end. A single running sum would
 * make every step wait for the previous add: at hidden 64 that latency chain, not memory, was
 * what a read cost (measured ~80 cycles per source row). */
#define LANES 16 /* fold() adds them pairwise: 16 -> 8 -> 4 -> 1 */
#if defined(__GNUC__)
#define INLINE inline __attribute__((always_inline))
#else
#define INLINE inline
#endif

static INLINE float fold(float *s) {
    for (int l = 0; l < 8; ++l) s[l] += s[l + 8];
    for (int l = 0; l < 4; ++l) s[l] += s[l + 4];
    return (s[0] + s[2]) + (s[1] + s[3]);
}

static INLINE float dot(const float *restrict a, const float *restrict b, int64_t n) {
    float s[LANES] = {0.0f};
    int64_t h = 0;
    for (; h + LANES <= n; h += LANES)
        for (int l = 0; l < LANES; ++l) s[l] += a[h + l] * b[h + l];
    float tail = 0.0f;
    for (; h < n; ++h) tail += a[h] * b[h];
    return fold(s) + tail;
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
 * out: [tokens, hidden]. Tiles of TILE tokens: the dot products of every source row of a tile,
 * then the scalar work (rms, softmax) over the tile's tokens, which are contiguous in the
 * [n, tokens] statistics and so run as vector loops instead of one latency chain per row, then
 * the weighted sum, which reads the tile's rows again from cache. */
#define TILE 32
void attnres_depth_read_fwd(const float *const *sources, int64_t n, int64_t tokens,
                            int64_t hidden, const float *w, const float *g, float eps, float *out,
                            float *inv_rms, float *dots, float *alpha) {
    float q[hidden > 0 ? hidden : 1];
    for (int64_t h = 0; h < hidden; ++h) q[h] = w[h] * g[h];
    const float inv_hidden = 1.0f / (float)hidden;
    for (int64_t t0 = 0; t0 < tokens; t0 += TILE) {
        const int64_t width = tokens - t0 < TILE ? tokens - t0 : TILE;
        float best[TILE], total[TILE];
        for (int64_t i = 0; i < width; ++i) {
            best[i] = -INFINITY;
            total[i] = 0.0f;
        }
        for (int64_t j = 0; j < n; ++j) {
            float *restrict r = inv_rms + j * tokens + t0, *restrict d = dots + j * tokens + t0;
            float *restrict score = alpha + j * tokens + t0;
            for (int64_t i = 0; i < width; ++i) {
                const float *v = sources[j] + (t0 + i) * hidden;
                r[i] = dot(v, v, hidden); /* the mean square, until the next loop */
                d[i] = dot(v, q, hidden);
            }
            for (int64_t i = 0; i < width; ++i) {
                r[i] = 1.0f / sqrtf(r[i] * inv_hidden + eps);
                score[i] = r[i] * d[i]; /* the score, until normalised below */
                best[i] = score[i] > best[i] ? score[i] : best[i];
            }
        }
        for (int64_t j = 0; j < n; ++j) {
            float *restrict e = alpha + j * tokens + t0;
            for (int64_t i = 0; i < width; ++i) {
                e[i] = expf(e[i] - best[i]);
                total[i] += e[i];
            }
        }
        for (int64_t j = 0; j < n; ++j) {
            float *restrict a = alpha + j * tokens + t0;
            for (int64_t i = 0; i < width; ++i) a[i] /= total[i];
        }
        for (int64_t i = 0; i < width; ++i)
            weighted_row(sources, n, tokens, hidden, alpha, t0 + i, out + (t0 + i) * hidden);
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
