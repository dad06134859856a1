/* The CPU float32 engine's C kernels (trainer/engine.py, _NativeStep). ncs_decode_one: one token of
 * one sequence through the whole model in one call (Engine._decode_torch without a torch op per norm,
 * rotation, cache write, attention and activation). For steps of many rows: ncs_layer_rows (norms,
 * rotation, cache writes and decode attention of one layer), ncs_unit_rows, ncs_relu2, and products
 * on a strip-major copy of the weights (ncs_pack_strips, ncs_mm_strips; the engine times them against
 * torch's); where both of those won, a step of up to 32 rows (streams decoding, prompts) is one call
 * too (ncs_decode_rows).
 * Built and loaded by trainer/native.py (the system C compiler, ctypes);
 * the engine falls back to its torch ops when that is not possible.
 *
 * Same arithmetic as the engine's CPU float32 path (the tests hold its logits to the model's forward
 * within 1e-4): norms feeding a product are unit vectors, their sqrt(width) folded into the weights;
 * the query/key rows of the QKV weight are permuted so rotary pairs sit side by side; the head's
 * weights carry 1/softcap. Matrices are in the (in, out) layout, row-major. The KV cache is the
 * engine's (layer, max_len, slots, kv_head, head_dim) tensor.
 *
 * dims:  n_layer, width, heads, kv_heads, head_dim, vocab, mlp_width, max_len
 * consts: softcap, attention scale, eps (the model's RMSNorm epsilon)
 * ptrs:  wte (vocab, width), head (width, vocab), rotary (max_len, head_dim/2, [cos, sin]), then per
 *        layer: qkv (width, (heads + 2 kv_heads) head_dim), out (heads head_dim, width),
 *        fc (width, mlp_width), down (mlp_width, width)
 * work:  scratch of ncs_work_floats(dims) floats
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 2048 /* output columns a pass keeps in L1 */

enum { N_LAYER, WIDTH, HEADS, KV_HEADS, HEAD_DIM, VOCAB, MLP, MAX_LEN };

void ncs_relu2(float *h, int64_t n);
int ncs_layer_rows(const int64_t *dims, const float *consts, const float *rot, int64_t layer, float *qkv,
                   int64_t n, const int64_t *slot, const int64_t *pos, int64_t n_attend, const int64_t *attend_rows,
                   float *k_cache, float *v_cache, int64_t slots, float *y, float *work);

static float sum_squares(const float *x, int64_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += x[i] * x[i];
    return s;
}

/* out = x / max(|x|, sqrt(n eps)): the model's RMSNorm over sqrt(n) (engine._unit) */
static void unit(const float *x, float *out, int64_t n, float eps) {
    float norm = sqrtf(sum_squares(x, n));
    float floor = sqrtf((float)n * eps);
    float inv = 1.0f / (norm > floor ? norm : floor);
#pragma omp simd
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * inv;
}

/* y (+)= x W for W (in, out) row-major; accumulate keeps what y holds (a residual add) */
static void matvec(const float *restrict x, const float *restrict w, float *restrict y, int64_t in, int64_t out,
                   int accumulate) {
    if (!accumulate) memset(y, 0, (size_t)out * sizeof(float));
    for (int64_t j0 = 0; j0 < out; j0 += BLOCK) {
        int64_t j1 = j0 + BLOCK < out ? j0 + BLOCK : out;
        int64_t i = 0;
        for (; i + 4 <= in; i += 4) {
            const float *w0 = w + i * out, *w1 = w0 + out, *w2 = w1 + out, *w3 = w2 + out;
            float x0 = x[i], x1 = x[i + 1], x2 = x[i + 2], x3 = x[i + 3];
#pragma omp simd
            for (int64_t j = j0; j < j1; j++) y[j] += x0 * w0[j] + x1 * w1[j] + x2 * w2[j] + x3 * w3[j];
        }
        for (; i < in; i++) {
            const float *w0 = w + i * out;
            float x0 = x[i];
#pragma omp simd
            for (int64_t j = j0; j < j1; j++) y[j] += x0 * w0[j];
        }
    }
}

int64_t ncs_work_floats(const int64_t *dims) {
    int64_t qkv = (dims[HEADS] + 2 * dims[KV_HEADS]) * dims[HEAD_DIM];
    return 2 * dims[WIDTH] + qkv + dims[HEADS] * dims[HEAD_DIM] + dims[MLP] + dims[MAX_LEN];
}

/* each query/key head of one row of qkv a unit vector, then rotated pair by pair at position pos */
static void norm_rotate(float *qkv, int64_t qk_heads, int64_t d, const float *rot, float eps) {
    for (int64_t hd = 0; hd < qk_heads; hd++) {
        float *v = qkv + hd * d;
        unit(v, v, d, eps);
        for (int64_t i = 0; i < d / 2; i++) {
            float re = v[2 * i], im = v[2 * i + 1], c = rot[2 * i], s = rot[2 * i + 1];
            v[2 * i] = re * c - im * s;
            v[2 * i + 1] = re * s + im * c;
        }
    }
}

/* y (heads * d) = attention of one row's queries q (heads * d) over cached positions 0..pos of one
 * sequence: kc, vc at position 0 of its slot, positions `row` floats apart; p: pos + 1 floats */
static void attend(const float *q, const float *kc, const float *vc, int64_t row, int64_t pos, int64_t H,
                   int64_t group, int64_t d, float scale, float *p, float *y) {
    for (int64_t hd = 0; hd < H; hd++) {
        const float *qh = q + hd * d;
        int64_t off = (hd / group) * d;
        float top = -INFINITY;
        for (int64_t t = 0; t <= pos; t++) {
            const float *k = kc + t * row + off;
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int64_t i = 0; i < d; i++) s += qh[i] * k[i];
            p[t] = s * scale;
            if (p[t] > top) top = p[t];
        }
        float total = 0.0f;
        for (int64_t t = 0; t <= pos; t++) {
            p[t] = expf(p[t] - top);
            total += p[t];
        }
        float *out = y + hd * d;
        memset(out, 0, (size_t)d * sizeof(float));
        for (int64_t t = 0; t <= pos; t++) {
            const float *v = vc + t * row + off;
            float pt = p[t];
#pragma omp simd
            for (int64_t i = 0; i < d; i++) out[i] += pt * v[i];
        }
        float inv = 1.0f / total;
#pragma omp simd
        for (int64_t i = 0; i < d; i++) out[i] *= inv;
    }
}

/* x = the embedding row of `token` after the model's first RMSNorm, as the engine's _Norm:
 * e * rsqrt(sum(e^2) / n + eps) */
static void embed(const float *wte, int64_t token, float *x, int64_t C, float eps) {
    const float *e = wte + token * C;
    float r = 1.0f / sqrtf(sum_squares(e, C) * (1.0f / (float)C) + eps);
    for (int64_t i = 0; i < C; i++) x[i] = e[i] * r;
}

/* the head's products (its weights carry 1/softcap) to logits: softcap * tanh */
static void cap(float *logits, int64_t n, float softcap) {
    for (int64_t i = 0; i < n; i++) logits[i] = tanhf(logits[i]) * softcap;
}

/* Returns 0, or -1 for arguments out of range (nothing is written then). */
int ncs_decode_one(const int64_t *dims, const float *consts, const float *const *ptrs, float *k_cache,
                   float *v_cache, int64_t slots, int64_t slot, int64_t pos, int64_t token, float *logits, float *work) {
    int64_t L = dims[N_LAYER], C = dims[WIDTH], H = dims[HEADS], Hkv = dims[KV_HEADS], d = dims[HEAD_DIM];
    int64_t V = dims[VOCAB], F = dims[MLP], max_len = dims[MAX_LEN];
    float softcap = consts[0], eps = consts[2];
    if (token < 0 || token >= V || pos < 0 || pos >= max_len || slot < 0 || slot >= slots) return -1;
    int64_t q_dim = H * d, kv_dim = Hkv * d;
    float *x = work, *a = x + C, *qkv = a + C, *y = qkv + q_dim + 2 * kv_dim, *h = y + q_dim, *p = h + F;

    embed(ptrs[0], token, x, C, eps);
    for (int64_t l = 0; l < L; l++) {
        const float *const *w = ptrs + 3 + 4 * l;
        unit(x, a, C, eps);
        matvec(a, w[0], qkv, C, q_dim + 2 * kv_dim, 0);
        /* norms, rotation, the cache writes and the attention of this one row */
        ncs_layer_rows(dims, consts, ptrs[2], l, qkv, 1, &slot, &pos, 1, NULL, k_cache, v_cache, slots, y, p);
        matvec(y, w[1], x, q_dim, C, 1);  /* x += attention out */
        unit(x, a, C, eps);
        matvec(a, w[2], h, C, F, 0);
        ncs_relu2(h, F);
        matvec(h, w[3], x, F, C, 1);  /* x += mlp out */
    }
    unit(x, a, C, eps);
    matvec(a, ptrs[1], logits, C, V, 0);
    cap(logits, V, softcap);
    return 0;
}

/* One layer of a step of many rows, between its QKV product and its output product: every row's
 * queries and keys of qkv (n, (heads + 2 kv_heads) head_dim) normed and rotated in place at its
 * position, its key and value written to the cache at (pos[r], slot[r]) (layer `layer`), then for
 * n_attend rows, attention over their sequence's cached positions 0..pos[r] into y (n_attend, heads
 * head_dim): the rows attend_rows, or the first n_attend where that is NULL. Every key and value is
 * written before any row attends, so the rows of a prompt (consecutive positions of one slot) attend
 * as the model does. work: max_len floats. Returns -1 (nothing written) for a row out of range. */
int ncs_layer_rows(const int64_t *dims, const float *consts, const float *rot, int64_t layer, float *qkv,
                   int64_t n, const int64_t *slot, const int64_t *pos, int64_t n_attend, const int64_t *attend_rows,
                   float *k_cache, float *v_cache, int64_t slots, float *y, float *work) {
    int64_t H = dims[HEADS], Hkv = dims[KV_HEADS], d = dims[HEAD_DIM], max_len = dims[MAX_LEN];
    float scale = consts[1], eps = consts[2];
    int64_t q_dim = H * d, kv_dim = Hkv * d, width = q_dim + 2 * kv_dim, row = slots * kv_dim;
    if (n_attend < 0 || n_attend > n || layer < 0 || layer >= dims[N_LAYER]) return -1;
    for (int64_t r = 0; r < n; r++)
        if (pos[r] < 0 || pos[r] >= max_len || slot[r] < 0 || slot[r] >= slots) return -1;
    if (attend_rows)
        for (int64_t j = 0; j < n_attend; j++)
            if (attend_rows[j] < 0 || attend_rows[j] >= n) return -1;
    float *kl = k_cache + layer * max_len * row, *vl = v_cache + layer * max_len * row;
    for (int64_t r = 0; r < n; r++) {
        float *x = qkv + r * width;
        norm_rotate(x, H + Hkv, d, rot + pos[r] * d, eps);
        memcpy(kl + pos[r] * row + slot[r] * kv_dim, x + q_dim, (size_t)kv_dim * sizeof(float));
        memcpy(vl + pos[r] * row + slot[r] * kv_dim, x + q_dim + kv_dim, (size_t)kv_dim * sizeof(float));
    }
    for (int64_t j = 0; j < n_attend; j++) {
        int64_t r = attend_rows ? attend_rows[j] : j;
        attend(qkv + r * width, kl + slot[r] * kv_dim, vl + slot[r] * kv_dim, row, pos[r], H, H / Hkv, d,
               scale, work, y + j * q_dim);
    }
    return 0;
}

/* out = each of n rows of x (n, width) as a unit vector (engine._unit) */
void ncs_unit_rows(const float *x, float *out, int64_t n, int64_t width, float eps) {
    for (int64_t r = 0; r < n; r++) unit(x + r * width, out + r * width, width, eps);
}

/* h = relu(h)^2 in place, n floats */
void ncs_relu2(float *h, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) h[i] = h[i] > 0.0f ? h[i] * h[i] : 0.0f;
}

/* --- products of several rows on strip-major weights ---------------------------------------------
 * A step of 2-32 rows spends most of its time in its products. Library GEMMs reorder the weights on
 * every call (at 16 rows that copy is not paid back) or walk the (in, out) layout a page apart per
 * input. Here each matrix is copied once into strips of STRIP_W output columns, every strip's
 * (in, STRIP_W) block contiguous, so a product streams the weights front to back, one cache line an
 * input, and up to STRIP_ROWS rows accumulate in registers (their inputs broadcast from a transposed
 * copy). Each output is one sum over the inputs in order, in float32. */
#if defined(__AVX512F__)
#define STRIP_W 16
#define STRIP_ROWS 16
#elif defined(__AVX__)
#define STRIP_W 8
#define STRIP_ROWS 8
#else
#define STRIP_W 4
#define STRIP_ROWS 4
#endif
#define STRIP_AHEAD 32 /* cache lines of weights asked for ahead of their use */

typedef float strip_vec __attribute__((vector_size(STRIP_W * sizeof(float)), aligned(4)));

/* out[0] = STRIP_W (columns a strip), out[1] = STRIP_ROWS (rows a pass) */
void ncs_strip_dims(int64_t *out) {
    out[0] = STRIP_W;
    out[1] = STRIP_ROWS;
}

/* p[s][i][c] = w[i][s STRIP_W + c] for w (in, out) row-major; the last strip's missing columns 0.
 * p: ceil(out / STRIP_W) * in * STRIP_W floats */
void ncs_pack_strips(const float *w, float *p, int64_t in, int64_t out) {
    int64_t strips = (out + STRIP_W - 1) / STRIP_W;
    for (int64_t s = 0; s < strips; s++)
        for (int64_t i = 0; i < in; i++)
            for (int64_t c = 0; c < STRIP_W; c++) {
                int64_t j = s * STRIP_W + c;
                p[(s * in + i) * STRIP_W + c] = j < out ? w[i * out + j] : 0.0f;
            }
}

/* acc[r] += sum over i of xt[i][r] * strip[i], for `rows` rows (a constant where it is inlined) */
static inline __attribute__((always_inline)) void strip_pass(int rows, const float *xt, const float *strip,
                                                             int64_t in, strip_vec *acc) {
    for (int64_t i = 0; i < in; i++) {
        __builtin_prefetch(strip + (i + STRIP_AHEAD) * STRIP_W);
        strip_vec w = *(const strip_vec *)(strip + i * STRIP_W);
        const float *xi = xt + i * STRIP_ROWS;
        for (int r = 0; r < rows; r++) acc[r] += xi[r] * w;
    }
}

/* y (rows, out) = x (rows, in) W (+ add (rows, out) where add is not NULL; add may be y), W packed by
 * ncs_pack_strips. xt: scratch of in * STRIP_ROWS floats. */
void ncs_mm_strips(const float *x, const float *p, const float *add, float *y, int64_t rows, int64_t in,
                   int64_t out, float *xt) {
    int64_t strips = (out + STRIP_W - 1) / STRIP_W;
    for (int64_t r0 = 0; r0 < rows; r0 += STRIP_ROWS) {
        int n = rows - r0 < STRIP_ROWS ? (int)(rows - r0) : STRIP_ROWS;
        for (int64_t i = 0; i < in; i++)
            for (int r = 0; r < n; r++) xt[i * STRIP_ROWS + r] = x[(r0 + r) * in + i];
        for (int64_t s = 0; s < strips; s++) {
            int64_t j = s * STRIP_W, cols = out - j < STRIP_W ? out - j : STRIP_W;
            strip_vec acc[STRIP_ROWS];
            for (int r = 0; r < n; r++) {
                const float *a = add ? add + (r0 + r) * out + j : NULL;
                if (a && cols == STRIP_W) acc[r] = *(const strip_vec *)a;
                else {
                    acc[r] = (strip_vec){0};
                    if (a) for (int64_t c = 0; c < cols; c++) acc[r][c] = a[c];
                }
            }
            const float *strip = p + s * in * STRIP_W;
            switch (n) { /* the row count a constant, so the accumulators stay in registers */
#define STRIP_CASE(k) case k: strip_pass(k, xt, strip, in, acc); break;
                STRIP_CASE(1) STRIP_CASE(2) STRIP_CASE(3) STRIP_CASE(4)
#if STRIP_ROWS > 4
                STRIP_CASE(5) STRIP_CASE(6) STRIP_CASE(7) STRIP_CASE(8)
#endif
#if STRIP_ROWS > 8
                STRIP_CASE(9) STRIP_CASE(10) STRIP_CASE(11) STRIP_CASE(12)
                STRIP_CASE(13) STRIP_CASE(14) STRIP_CASE(15) STRIP_CASE(16)
#endif
#undef STRIP_CASE
            }
            for (int r = 0; r < n; r++) {
                float *o = y + (r0 + r) * out + j;
                if (cols == STRIP_W) *(strip_vec *)o = acc[r];
                else for (int64_t c = 0; c < cols; c++) o[c] = acc[r][c];
            }
        }
    }
}

/* The scratch ncs_decode_rows needs for n rows, in floats */
int64_t ncs_decode_rows_floats(const int64_t *dims, int64_t n) {
    int64_t C = dims[WIDTH], q_dim = dims[HEADS] * dims[HEAD_DIM];
    int64_t width = q_dim + 2 * dims[KV_HEADS] * dims[HEAD_DIM], F = dims[MLP];
    int64_t widest = F > C ? F : C; /* the most inputs a product has (C, q_dim or F) */
    if (q_dim > widest) widest = q_dim;
    return n * (2 * C + width + q_dim + F) + dims[MAX_LEN] + widest * STRIP_ROWS;
}

/* A step of n rows through the whole model in one call, ncs_decode_one's arithmetic with every
 * product on the strips (ptrs as for ncs_decode_one; strips: per layer qkv, out, fc, down packed by
 * ncs_pack_strips, then the head), so a step pays no call per op. Row r is token[r] at position pos[r]
 * of slot slot[r]: one-token rows of streams decoding, and the rows of prompts (or pieces of them), one
 * chunk of consecutive positions per slot. In each layer every row's key and value are written before
 * any row attends, so a prompt's row sees its own sequence up to itself. logits: (n_out, vocab) for
 * the rows out_rows (increasing); past its cache writes, the last layer carries only those rows (the
 * others' outputs would feed nothing). Returns 0, or -1 for arguments out of range (nothing is
 * written then). */
int ncs_decode_rows(const int64_t *dims, const float *consts, const float *const *ptrs, const float *const *strips,
                    float *k_cache, float *v_cache, int64_t slots, int64_t n, const int64_t *slot,
                    const int64_t *pos, const int64_t *token, int64_t n_out, const int64_t *out_rows,
                    float *logits, float *work) {
    int64_t L = dims[N_LAYER], C = dims[WIDTH], H = dims[HEADS], Hkv = dims[KV_HEADS], d = dims[HEAD_DIM];
    int64_t V = dims[VOCAB], F = dims[MLP], max_len = dims[MAX_LEN];
    float softcap = consts[0], eps = consts[2];
    int64_t q_dim = H * d, width = q_dim + 2 * Hkv * d;
    if (n < 1 || n_out < 0 || n_out > n) return -1;
    for (int64_t r = 0; r < n; r++)
        if (token[r] < 0 || token[r] >= V || pos[r] < 0 || pos[r] >= max_len || slot[r] < 0 || slot[r] >= slots)
            return -1;
    for (int64_t j = 0; j < n_out; j++)
        if (out_rows[j] < 0 || out_rows[j] >= n || (j > 0 && out_rows[j] <= out_rows[j - 1])) return -1;
    float *x = work, *a = x + n * C, *qkv = a + n * C, *y = qkv + n * width, *h = y + n * q_dim;
    float *p = h + n * F, *xt = p + max_len;

    for (int64_t r = 0; r < n; r++) embed(ptrs[0], token[r], x + r * C, C, eps);
    for (int64_t l = 0; l < L; l++) {
        const float *const *s = strips + 4 * l;
        int last = l == L - 1;
        int64_t m = last ? n_out : n; /* the rows this layer carries past its attention */
        ncs_unit_rows(x, a, n, C, eps);
        ncs_mm_strips(a, s[0], NULL, qkv, n, C, width, xt);
        /* norms, rotation, every row's cache writes, then the attention of the rows going on: in the
         * last layer only those whose logits are wanted, their residuals moved to the front (out_rows
         * increasing: j <= out_rows[j]) */
        ncs_layer_rows(dims, consts, ptrs[2], l, qkv, n, slot, pos, m, last ? out_rows : NULL, k_cache, v_cache,
                       slots, y, p);
        if (last)
            for (int64_t j = 0; j < n_out; j++)
                if (out_rows[j] != j) memcpy(x + j * C, x + out_rows[j] * C, (size_t)C * sizeof(float));
        ncs_mm_strips(y, s[1], x, x, m, q_dim, C, xt); /* x += attention out */
        ncs_unit_rows(x, a, m, C, eps);
        ncs_mm_strips(a, s[2], NULL, h, m, C, F, xt);
        ncs_relu2(h, m * F);
        ncs_mm_strips(h, s[3], x, x, m, F, C, xt); /* x += mlp out */
    }
    ncs_unit_rows(x, a, n_out, C, eps);
    ncs_mm_strips(a, strips[4 * L], NULL, logits, n_out, C, V, xt);
    cap(logits, n_out * V, softcap);
    return 0;
}
