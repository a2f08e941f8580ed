/* The small steps of the CPU lean forward (offload/cpu_forward.py) between its kernel calls, one
 * C loop each instead of ~20 torch operator calls a layer: RMSNorm into the kernels' bf16 input,
 * the rotary embedding written straight into the query buffer and the cache, SiLU(gate) * up.
 *
 * The arithmetic is torch's, operation for operation (built with -ffp-contract=off: no fused
 * multiply-adds, so every product and sum rounds to float32 as torch's do); only RMSNorm's sum of
 * squares runs in another order than torch's vectorised one, which moves a bf16 input by one
 * unit now and then (2 of 36864 values in a test). Matmul outputs come in bf16 (one 4-bit
 * kernel's output as it is) or float32 (a sum of terms, a bias), `bf` says which. */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline uint16_t to_bf16(float f) { /* round to nearest even, as torch does; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float load(const void *p, int64_t i, int bf) {
    return bf ? from_bf16(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* out [n, h] bf16 = x * (1 / sqrt(mean(x^2) + eps)) * w, row by row (torch.rms_norm's order of
 * operations; the sum of squares in double, then rounded: closer to exact than any float32 order,
 * and to torch's). */
void specexec_rms_bf16(const float *x, const float *w, uint16_t *out, int n, int h, float eps) {
    for (int r = 0; r < n; r++) {
        const float *xr = x + (int64_t)r * h;
        uint16_t *o = out + (int64_t)r * h;
        double s = 0.0;
        for (int i = 0; i < h; i++) s += (double)xr[i] * xr[i];
        float inv = 1.f / sqrtf((float)s / (float)h + eps);
        for (int i = 0; i < h; i++) o[i] = to_bf16(xr[i] * inv * w[i]);
    }
}

/* x [n, h] += y; then, with w, out = specexec_rms_bf16(x) (the next norm). */
void specexec_add_rms_bf16(float *x, const void *y, int bf, const float *w, uint16_t *out, int n,
                           int h, float eps) {
    for (int64_t i = 0; i < (int64_t)n * h; i++) x[i] += load(y, i, bf);
    if (w) specexec_rms_bf16(x, w, out, n, h, eps);
}

/* y [n, (heads + 2 kv) d], q, k and v side by side: q and k rotated (t * cos + rotate_half(t) *
 * sin, cos and sin [n, d]) into q [heads, n, d] and the key cache k [kv, room, d] at positions
 * past.., values widened into v [kv, room, d] there. */
void specexec_rope_write(const void *y, int bf, const float *cos, const float *sin, float *q,
                         float *k, float *v, int n, int heads, int kv, int d, int room, int past) {
    int half = d / 2, width = (heads + 2 * kv) * d;
    for (int r = 0; r < n; r++) {
        int64_t row = (int64_t)r * width;
        const float *c = cos + (int64_t)r * d, *s = sin + (int64_t)r * d;
        for (int hh = 0; hh < heads + kv; hh++) {
            int64_t t = row + (int64_t)hh * d;
            float *dst = hh < heads ? q + ((int64_t)hh * n + r) * d
                                    : k + ((int64_t)(hh - heads) * room + past + r) * d;
            for (int i = 0; i < d; i++) {
                float rot = i < half ? -load(y, t + i + half, bf) : load(y, t + i - half, bf);
                float a = load(y, t + i, bf) * c[i], b = rot * s[i];
                dst[i] = a + b;
            }
        }
        for (int hh = 0; hh < kv; hh++) {
            int64_t t = row + (int64_t)(heads + kv + hh) * d;
            float *dst = v + ((int64_t)hh * room + past + r) * d;
            for (int i = 0; i < d; i++) dst[i] = load(y, t + i, bf);
        }
    }
}

/* gu [n, 2 inter], gate then up -> out [n, inter] bf16 = silu(gate) * up (silu(g) = g / (1 +
 * exp(-g)), as torch's). */
void specexec_silu_mul_bf16(const void *gu, int bf, uint16_t *out, int n, int inter) {
    for (int r = 0; r < n; r++) {
        int64_t row = (int64_t)r * 2 * inter;
        uint16_t *o = out + (int64_t)r * inter;
        for (int i = 0; i < inter; i++) {
            float g = load(gu, row + i, bf);
            float silu = g / (1.f + expf(-g));
            o[i] = to_bf16(silu * load(gu, row + inter + i, bf));
        }
    }
}
