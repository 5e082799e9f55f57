/* The combine stage's loops on the CPU (decoding/combine/), one pass of a few loops per row where
 * the torch code makes several passes over full-size float32 temporaries.
 *
 * Contrastive decoding's combined logits:
 *
 *   log p_E = z_E − max z_E − ln Σ e^(z_E − max z_E)
 *   s = (z_A − max z_A) / τ,  log p_A,τ = max(s − ln Σ e^s, LOG_FLOOR)
 *   c = log p_E − β · log p_A,τ  where z_E ≥ max z_E + ln α (the plausibility head), −inf elsewhere
 *
 * the head test being the torch code's own float32 comparison, so the head is the same set of
 * tokens. The entropy of each row's softmax, which ACD weighs its two streams by:
 *
 *   H = −Σ p ln p = ln S − Σ e·(z − max z) / S,  e = e^(z − max z), S = Σ e  (0·ln 0 = 0)
 *
 * And the Jensen-Shannon divergence of two rows' softmaxes, AdaCAD's weight, with the
 * probabilities clamped at PROB_FLOOR before the logs as adacad.py clamps them:
 *
 *   JSD = ½ Σ p (ln p − ln m) + ½ Σ q (ln q − ln m),  m = (p + q) / 2
 *
 * Logits are rows of bfloat16 or float32 (elem_size 2 or 4), each row `stride` elements after the
 * last; vocab a multiple of LANES. Sums and products in float32. Built by serving/native.py for
 * the CPU it runs on.
 */
#include <math.h>
#include <stdint.h>

#include "../native_vec.h"

#define LOG_FLOOR -1.0e4f /* as contrastive.py: log-probabilities below it are 0 in float32 anyway */
#define PROB_FLOOR 1e-9f /* as adacad.py */

/* vector c of a row */
static inline vfloat at(const char *row, int64_t c, int64_t elem_size) {
    return load_vec(row + c * LANES * elem_size, elem_size);
}

static float row_max(const char *row, int64_t chunks, int64_t elem_size) {
    vfloat m = at(row, 0, elem_size);
    for (int64_t c = 1; c < chunks; c++) m = vmax(m, at(row, c, elem_size));
    return max_lanes(m);
}

static void combine_row(const char *z_e, const char *z_a, float log_alpha, float beta, float tau, float *out,
                        int64_t chunks, int64_t elem_size) {
    const float max_e = row_max(z_e, chunks, elem_size), max_a = row_max(z_a, chunks, elem_size);
    vfloat sum_e = {0}, sum_a = {0};
    for (int64_t c = 0; c < chunks; c++) {
        sum_e += exp_neg(at(z_e, c, elem_size) - max_e);
        sum_a += exp_neg((at(z_a, c, elem_size) - max_a) / tau);
    }
    const float log_sum_e = logf(sum_lanes(sum_e)), log_sum_a = logf(sum_lanes(sum_a));
    const float head = max_e + log_alpha;
    for (int64_t c = 0; c < chunks; c++) {
        const vfloat e = at(z_e, c, elem_size);
        vfloat log_p_a = (at(z_a, c, elem_size) - max_a) / tau - log_sum_a;
        log_p_a = vmax(log_p_a, (vfloat){0} + LOG_FLOOR);
        const vfloat combined = (e - max_e - log_sum_e) - beta * log_p_a;
        const vfloat v = vselect(e >= head, combined, (vfloat){0} - INFINITY);
        __builtin_memcpy(out + c * LANES, &v, sizeof v);
    }
}

/* log_alpha, beta, tau: one value per row; out (rows, vocab) float32, contiguous */
void contrastive_rows(const char *z_e, const char *z_a, int64_t e_stride, int64_t a_stride, const float *log_alpha,
                      const float *beta, const float *tau, float *out, int64_t rows, int64_t vocab,
                      int64_t elem_size) {
    const int64_t chunks = vocab / LANES;
#pragma omp parallel for if (rows >= 2) schedule(static)
    for (int64_t r = 0; r < rows; r++)
        combine_row(z_e + r * e_stride * elem_size, z_a + r * a_stride * elem_size, log_alpha[r], beta[r], tau[r],
                    out + r * vocab, chunks, elem_size);
}

static float row_entropy(const char *z, int64_t chunks, int64_t elem_size) {
    const float top = row_max(z, chunks, elem_size);
    vfloat sum = {0}, weighted = {0};
    for (int64_t c = 0; c < chunks; c++) {
        const vfloat shifted = at(z, c, elem_size) - top, e = exp_neg(shifted);
        sum += e;
        weighted += vselect(e > 0, e * shifted, (vfloat){0}); /* where z = −inf, e·(z − max) would be 0·−inf */
    }
    const float total = sum_lanes(sum);
    return logf(total) - sum_lanes(weighted) / total;
}

/* h (rows,) float32: the entropy of each row's softmax, in nats */
void entropy_rows(const char *z, int64_t stride, float *h, int64_t rows, int64_t vocab, int64_t elem_size) {
#pragma omp parallel for if (rows >= 2) schedule(static)
    for (int64_t r = 0; r < rows; r++) h[r] = row_entropy(z + r * stride * elem_size, vocab / LANES, elem_size);
}

static float row_jsd(const char *z_p, const char *z_q, int64_t chunks, int64_t elem_size) {
    const float max_p = row_max(z_p, chunks, elem_size), max_q = row_max(z_q, chunks, elem_size);
    vfloat sum_p = {0}, sum_q = {0};
    for (int64_t c = 0; c < chunks; c++) {
        sum_p += exp_neg(at(z_p, c, elem_size) - max_p);
        sum_q += exp_neg(at(z_q, c, elem_size) - max_q);
    }
    const float inv_p = 1.0f / sum_lanes(sum_p), inv_q = 1.0f / sum_lanes(sum_q);
    vfloat total = {0};
    for (int64_t c = 0; c < chunks; c++) {
        const vfloat p = vmax(exp_neg(at(z_p, c, elem_size) - max_p) * inv_p, (vfloat){0} + PROB_FLOOR);
        const vfloat q = vmax(exp_neg(at(z_q, c, elem_size) - max_q) * inv_q, (vfloat){0} + PROB_FLOOR);
        const vfloat log_m = log_pos((p + q) * 0.5f);
        total += p * (log_pos(p) - log_m) + q * (log_pos(q) - log_m);
    }
    return 0.5f * sum_lanes(total);
}

/* d (rows,) float32: the Jensen-Shannon divergence of each pair of rows' softmaxes, in nats */
void jsd_rows(const char *z_p, const char *z_q, int64_t p_stride, int64_t q_stride, float *d, int64_t rows,
              int64_t vocab, int64_t elem_size) {
#pragma omp parallel for if (rows >= 2) schedule(static)
    for (int64_t r = 0; r < rows; r++)
        d[r] = row_jsd(z_p + r * p_stride * elem_size, z_q + r * q_stride * elem_size, vocab / LANES, elem_size);
}
