/*
 * Self-checking test of the dynq C ABI: uses only include/dynq.h and libdynq.
 *
 * Valid C99 and C++11 (tests/c/run.sh compiles it both ways). Compile with -ffp-contract=off:
 * the reference GEMM below must not fuse multiply-add, or it would round differently from
 * dynq, whose results it checks bit for bit.
 *
 * Prints one line per check and, last, "N passed, M failed"; exits non-zero if any failed.
 *
 * Without arguments it runs the full suite. With one argument it runs the checks of an
 * environment-variable mode instead (the environment is read once per process by dynq, so
 * these need their own process; run.sh starts them):
 *   env-isa-invalid      DYNQ_ISA names no ISA
 *   env-isa-unsupported  DYNQ_ISA names an ISA this CPU or build lacks
 *   env-isa-scalar       DYNQ_ISA=scalar
 *   env-threads-invalid  DYNQ_NUM_THREADS is not a valid thread count
 *   env-threads-2        DYNQ_NUM_THREADS=2
 */

#if defined(__linux__) && !defined(_DEFAULT_SOURCE)
#define _DEFAULT_SOURCE 1 /* mmap, MAP_ANONYMOUS, sysconf under -std=c99 */
#endif

#include "dynq.h"

#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__unix__) || defined(__APPLE__)
#define DYNQ_TEST_PTHREADS 1
#include <pthread.h>
#endif

#if defined(__linux__)
#define DYNQ_TEST_GUARD_PAGES 1
#include <sys/mman.h>
#include <unistd.h>
#endif

/* ========================================================================================== */
/* Check harness                                                                               */
/* ========================================================================================== */

static int g_passed = 0;
static int g_failed = 0;

static void check(int ok, const char *fmt, ...)
{
    va_list ap;
    printf("%s ", ok ? "PASS" : "FAIL");
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
    if (ok) {
        g_passed++;
    } else {
        g_failed++;
    }
}

static const char *sname(int s)
{
    static const char *const names[] = {
        "DYNQ_STATUS_OK",          "DYNQ_STATUS_NULL_POINTER", "DYNQ_STATUS_INVALID_ARGUMENT",
        "DYNQ_STATUS_SIZE_OVERFLOW", "DYNQ_STATUS_NON_FINITE", "DYNQ_STATUS_UNSUPPORTED",
        "DYNQ_STATUS_CORRUPT_DATA", "DYNQ_STATUS_BUFFER_TOO_SMALL", "DYNQ_STATUS_OUT_OF_MEMORY",
        "DYNQ_STATUS_INTERNAL",
    };
    if (s >= 0 && s < (int)(sizeof names / sizeof names[0])) {
        return names[s];
    }
    return "(unknown status)";
}

static void *xcalloc(size_t count, size_t size)
{
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (p == NULL) {
        fprintf(stderr, "test_abi: out of memory allocating %zu x %zu bytes\n", count, size);
        exit(2);
    }
    return p;
}
#define ALLOC(T, count) ((T *)xcalloc((count), sizeof(T)))

/* The message a primer call leaves, so that a stale message is never mistaken for a new one
 * (successful calls leave the last message as is). */
static char g_primer[512];

static void prime(const char *desc)
{
    /* Two primers with different messages, so that each primer call can itself be tested. */
    if (strstr(desc, "dynq_active_isa") != NULL) {
        (void)(dynq_pack_config_init)(NULL);
    } else {
        (void)dynq_active_isa(NULL);
    }
    (void)dynq_last_error_message(g_primer, sizeof g_primer);
}

/* Checks a status; for an expected failure also checks dynq_last_error_message: a new,
 * non-empty message (containing `needle` if given), whose full length is reported
 * consistently with and without a buffer, and which truncates correctly. */
static void expect_status(const char *desc, dynq_status got, dynq_status want, const char *needle)
{
    check((int)got == (int)want, "%s -> %s (expected %s)", desc, sname((int)got), sname((int)want));
    if ((int)want != (int)DYNQ_STATUS_OK) {
        char buf[2048];
        char small[8];
        char one[1] = {'x'};
        char none[1] = {'y'};
        size_t len0 = dynq_last_error_message(NULL, 0);
        size_t len = dynq_last_error_message(buf, sizeof buf);
        size_t len_small = dynq_last_error_message(small, sizeof small);
        size_t len_one = dynq_last_error_message(one, 1);
        size_t len_none = dynq_last_error_message(none, 0);
        size_t expect_small = len < sizeof small - 1 ? len : sizeof small - 1;
        int ok = len0 > 0 && len == len0 && len < sizeof buf && strlen(buf) == len;
        int fresh = strcmp(buf, g_primer) != 0;
        int trunc_ok = len_small == len && strlen(small) == expect_small &&
                       memcmp(small, buf, expect_small) == 0 && len_one == len && one[0] == '\0' &&
                       len_none == len && none[0] == 'y';
        int has = needle == NULL || strstr(buf, needle) != NULL;
        check(ok && fresh && trunc_ok && has, "%s: message \"%s\" (length %zu%s%s%s%s%s)", desc, buf,
              len, fresh ? "" : ", STALE", trunc_ok ? "" : ", BAD TRUNCATION",
              needle ? ", must contain \"" : "", needle ? needle : "", needle ? "\"" : "");
    }
}

#define EXPECT(want, needle, desc, call)                                                        \
    do {                                                                                       \
        dynq_status st_;                                                                       \
        prime(desc);                                                                           \
        st_ = (call);                                                                          \
        expect_status((desc), st_, (want), (needle));                                         \
    } while (0)

#define EXPECT_OK(desc, call) EXPECT(DYNQ_STATUS_OK, NULL, desc, call)

/* ========================================================================================== */
/* Small utilities                                                                              */
/* ========================================================================================== */

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;

static uint32_t rnd_u32(void)
{
    g_rng = g_rng * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(g_rng >> 32);
}

/* Uniform in [-1, 1), exactly representable. */
static float rnd_f(void)
{
    return (float)(rnd_u32() >> 8) / 8388608.0f - 1.0f;
}

static float f_from_bits(uint32_t b)
{
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

static uint32_t bits_of(float f)
{
    uint32_t b;
    memcpy(&b, &f, sizeof b);
    return b;
}

#define SENTINEL_BITS 0x7FA5A5A5u /* a NaN with a recognisable payload */

static void fill_sentinel(float *p, size_t count)
{
    size_t i;
    float s = f_from_bits(SENTINEL_BITS);
    for (i = 0; i < count; i++) {
        p[i] = s;
    }
}

static int all_sentinel(const float *p, size_t count)
{
    size_t i;
    for (i = 0; i < count; i++) {
        if (bits_of(p[i]) != SENTINEL_BITS) {
            return 0;
        }
    }
    return 1;
}

/* Compares the m x n window of two strided matrices bit for bit, and checks that y's padding
 * (columns n..ldy of every row but the last) still holds the sentinel. */
static int same_matrix(const float *y, size_t ldy, const float *ref, size_t ldr, size_t m, size_t n,
                       char *why, size_t why_len)
{
    size_t i, j;
    for (i = 0; i < m; i++) {
        for (j = 0; j < n; j++) {
            if (bits_of(y[i * ldy + j]) != bits_of(ref[i * ldr + j])) {
                snprintf(why, why_len, "y[%zu][%zu] = %.9g (0x%08x), expected %.9g (0x%08x)", i, j,
                         (double)y[i * ldy + j], (unsigned)bits_of(y[i * ldy + j]),
                         (double)ref[i * ldr + j], (unsigned)bits_of(ref[i * ldr + j]));
                return 0;
            }
        }
        if (i + 1 < m) {
            for (j = n; j < ldy; j++) {
                if (bits_of(y[i * ldy + j]) != SENTINEL_BITS) {
                    snprintf(why, why_len, "padding y[%zu][%zu] was overwritten", i, j);
                    return 0;
                }
            }
        }
    }
    snprintf(why, why_len, "bit-identical");
    return 1;
}

/* CRC-32/IEEE (reflected, polynomial 0xEDB88320), as the blob format specifies. */
static uint32_t crc32_ieee(const uint8_t *p, size_t len)
{
    uint32_t c = 0xFFFFFFFFu;
    size_t i;
    int b;
    for (i = 0; i < len; i++) {
        c ^= p[i];
        for (b = 0; b < 8; b++) {
            c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
        }
    }
    return ~c;
}

static uint32_t get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get_u64(const uint8_t *p)
{
    return (uint64_t)get_u32(p) | (uint64_t)get_u32(p + 4) << 32;
}

static void put_u32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static void put_u64(uint8_t *p, uint64_t v)
{
    put_u32(p, (uint32_t)v);
    put_u32(p + 4, (uint32_t)(v >> 32));
}

static void fix_crc(uint8_t *blob, size_t len)
{
    put_u32(blob + len - 4, crc32_ieee(blob, len - 4));
}

/* ---- buffers ending at a PROT_NONE page, so reading one element too far faults ---------- */

#ifdef DYNQ_TEST_GUARD_PAGES
#define MAX_GUARDED 64
static void *g_guard_base[MAX_GUARDED];
static size_t g_guard_len[MAX_GUARDED];
static int g_guard_count = 0;
#endif

static void *guarded(size_t bytes)
{
#ifdef DYNQ_TEST_GUARD_PAGES
    size_t ps = (size_t)sysconf(_SC_PAGESIZE);
    size_t body = (bytes + ps - 1) / ps * ps;
    size_t total = body + ps;
    unsigned char *base;
    if (g_guard_count < MAX_GUARDED) {
        base = (unsigned char *)mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                                     -1, 0);
        if (base != (unsigned char *)MAP_FAILED) {
            if (mprotect(base + body, ps, PROT_NONE) == 0) {
                g_guard_base[g_guard_count] = base;
                g_guard_len[g_guard_count] = total;
                g_guard_count++;
                return base + body - bytes;
            }
            munmap(base, total);
        }
    }
#endif
    return xcalloc(1, bytes); /* leaked on purpose if ever used: rare fallback */
}

static void free_guarded_all(void)
{
#ifdef DYNQ_TEST_GUARD_PAGES
    int i;
    for (i = 0; i < g_guard_count; i++) {
        munmap(g_guard_base[i], g_guard_len[i]);
    }
    g_guard_count = 0;
#endif
}

/* ========================================================================================== */
/* Reference implementation of the documented arithmetic                                       */
/* ========================================================================================== */

#define TINY_SCALE 1e-45f /* the smallest positive float (a subnormal) */

/* Round half to even (nearbyintf in the default rounding mode) and convert, saturating. */
static int32_t round_i32(float x)
{
    float r = nearbyintf(x);
    if (r >= 2147483648.0f) {
        return INT32_MAX;
    }
    if (r < -2147483648.0f) {
        return INT32_MIN;
    }
    return (int32_t)r;
}

static int32_t clamp_i32(int64_t v, int32_t lo, int32_t hi)
{
    return (int32_t)(v < lo ? lo : v > hi ? hi : v);
}

typedef struct {
    float scale;
    int32_t zp;
} qparams;

/* ONNX DynamicQuantizeLinear, src/quant/activations.rs (lo <= 0 <= hi already). */
static qparams asym_params(float lo, float hi)
{
    qparams p;
    float range = hi - lo;
    if (range == 0.0f) {
        p.scale = 0.0f;
        p.zp = 0;
        return p;
    }
    if (range <= FLT_MAX) {
        p.scale = range / 255.0f;
    } else {
        p.scale = hi / 255.0f - lo / 255.0f;
    }
    if (p.scale == 0.0f) {
        p.scale = TINY_SCALE;
    }
    p.zp = clamp_i32(round_i32(-lo / p.scale), 0, 255);
    return p;
}

static float symmetric_scale(float amax)
{
    float s;
    if (amax == 0.0f) {
        return 0.0f;
    }
    s = amax / 127.0f;
    return s == 0.0f ? TINY_SCALE : s;
}

static qparams sym_params(float lo, float hi)
{
    qparams p;
    float amax = hi > -lo ? hi : -lo;
    p.scale = symmetric_scale(amax);
    p.zp = 128;
    return p;
}

static uint8_t quantize_act(float x, qparams p, uint32_t type)
{
    int32_t r;
    if (p.scale == 0.0f) {
        return (uint8_t)p.zp;
    }
    r = round_i32(x / p.scale);
    if (type == DYNQ_ACT_TYPE_ASYMMETRIC_U8) {
        return (uint8_t)clamp_i32((int64_t)r + p.zp, 0, 255);
    }
    return (uint8_t)(clamp_i32(r, -127, 127) + 128);
}

/* Symmetric int8 weight quantization (src/quant/weights.rs). */
static int8_t quantize_weight(float w, float scale, int qmax)
{
    if (scale == 0.0f) {
        return 0;
    }
    return (int8_t)clamp_i32(round_i32(w / scale), -qmax, qmax);
}

/* The weight scale for weights quantized to [-qmax, qmax]. */
static float weight_scale(float amax, int qmax)
{
    float s;
    if (amax == 0.0f) {
        return 0.0f;
    }
    s = amax / (float)qmax;
    return s == 0.0f ? TINY_SCALE : s;
}

/* Weights w[n][k] (NK) -> q[n][k] in [-qmax, qmax] and scales (n, or 1 for per-tensor). */
static void ref_quantize_weights(const float *w, size_t n, size_t k, int per_tensor, int qmax, int8_t *q,
                                 float *scales)
{
    size_t j, kk;
    float tmax = 0.0f;
    for (j = 0; j < n; j++) {
        float amax = 0.0f;
        for (kk = 0; kk < k; kk++) {
            float v = fabsf(w[j * k + kk]);
            amax = v > amax ? v : amax;
        }
        if (per_tensor) {
            tmax = amax > tmax ? amax : tmax;
        } else {
            scales[j] = weight_scale(amax, qmax);
        }
    }
    if (per_tensor) {
        scales[0] = weight_scale(tmax, qmax);
    }
    for (j = 0; j < n; j++) {
        float s = per_tensor ? scales[0] : scales[j];
        for (kk = 0; kk < k; kk++) {
            q[j * k + kk] = quantize_weight(w[j * k + kk], s, qmax);
        }
    }
}

/* GELU as the README defines it: h = x * 0.5, fma(h, erf(x * (1/sqrt 2)), h), with erf evaluated
 * as z = clamp(z, -4, 4); s = z*z; P, Q by Horner from the highest coefficient (one fused
 * multiply-add per step); erf = clamp((z * P) / Q, -1, 1). Written from the documentation, not
 * from dynq's code. */
static float ref_gelu(float x)
{
    static const float P[6] = {1.1283787f, 0.2099698f, 0.055328526f, 0.004603963f, 0.000303493f, 1.895347e-6f};
    static const float Q[6] = {1.0f, 0.51940846f, 0.122190706f, 0.016645646f, 0.0013655274f, 3.746484e-5f};
    float z = x * 0.70710677f;
    float s, p, q, e, h;
    int i;
    z = z > -4.0f ? z : -4.0f;
    z = z < 4.0f ? z : 4.0f;
    s = z * z;
    p = P[5];
    q = Q[5];
    for (i = 4; i >= 0; i--) {
        p = fmaf(p, s, P[i]);
        q = fmaf(q, s, Q[i]);
    }
    e = (z * p) / q;
    e = e > -1.0f ? e : -1.0f;
    e = e < 1.0f ? e : 1.0f;
    h = x * 0.5f;
    return fmaf(h, e, h);
}

/* dynq's tanh: tanh(u) ~= u * P(u^2) / Q(u^2) with u clamped to [-10, 10] and the quotient to
 * [-1, 1]. */
static float ref_tanh(float u)
{
    static const float P[5] = {0.99999976f, 0.13304606f, 0.00340612f, 1.9191817e-5f, 1.1503483e-8f};
    static const float Q[5] = {1.0f, 0.4663785f, 0.025533244f, 0.0003141641f, 6.994529e-7f};
    float s, p, q, t;
    int i;
    u = u > -10.0f ? u : -10.0f;
    u = u < 10.0f ? u : 10.0f;
    s = u * u;
    p = P[4];
    q = Q[4];
    for (i = 3; i >= 0; i--) {
        p = fmaf(p, s, P[i]);
        q = fmaf(q, s, Q[i]);
    }
    t = (u * p) / q;
    t = t > -1.0f ? t : -1.0f;
    return t < 1.0f ? t : 1.0f;
}

/* The epilogues built on it, as dynq documents them: h = x/2, then h + h * tanh(u), fused, with
 * u = x * fma(B, x*x, A) (tanh GELU), h (SiLU) or 0.851 * x (QuickGELU). */
static float ref_gelu_tanh(float x)
{
    float h = x * 0.5f;
    return fmaf(h, ref_tanh(x * fmaf(0.035677407f, x * x, 0.7978846f)), h);
}

static float ref_silu(float x)
{
    float h = x * 0.5f;
    return fmaf(h, ref_tanh(h), h);
}

static float ref_quick_gelu(float x)
{
    float h = x * 0.5f;
    return fmaf(h, ref_tanh(x * 0.851f), h);
}

/* y = dequant(quant(A) x W^T) + bias, then the epilogue, in the documented order:
 *   c = acc - za * colsum (exact integer);  t = (float)c * (sa * sw);  t = t + bias;  relu.
 * q is [n][k] int8; sw has n scales. */
static void ref_gemm(const float *a, size_t m, size_t k, size_t lda, const int8_t *q, const float *sw,
                     size_t n, const float *bias, uint32_t gran, uint32_t type, uint32_t epi, float *y,
                     size_t ldy)
{
    size_t i, j, kk;
    qparams *par = ALLOC(qparams, m);
    uint8_t *qa = ALLOC(uint8_t, m * k);
    int64_t *colsum = ALLOC(int64_t, n);
    float glo = 0.0f, ghi = 0.0f;
    float *lo = ALLOC(float, m);
    float *hi = ALLOC(float, m);
    for (i = 0; i < m; i++) {
        float l = 0.0f, h = 0.0f;
        for (kk = 0; kk < k; kk++) {
            float x = a[i * lda + kk];
            l = x < l ? x : l;
            h = x > h ? x : h;
        }
        lo[i] = l;
        hi[i] = h;
        glo = l < glo ? l : glo;
        ghi = h > ghi ? h : ghi;
    }
    for (i = 0; i < m; i++) {
        float l = gran == DYNQ_ACT_GRANULARITY_PER_TENSOR ? glo : lo[i];
        float h = gran == DYNQ_ACT_GRANULARITY_PER_TENSOR ? ghi : hi[i];
        par[i] = type == DYNQ_ACT_TYPE_ASYMMETRIC_U8 ? asym_params(l, h) : sym_params(l, h);
        for (kk = 0; kk < k; kk++) {
            qa[i * k + kk] = quantize_act(a[i * lda + kk], par[i], type);
        }
    }
    for (j = 0; j < n; j++) {
        int64_t s = 0;
        for (kk = 0; kk < k; kk++) {
            s += q[j * k + kk];
        }
        colsum[j] = s;
    }
    for (i = 0; i < m; i++) {
        for (j = 0; j < n; j++) {
            int64_t acc = 0;
            int64_t c;
            float cf, s, t;
            for (kk = 0; kk < k; kk++) {
                acc += (int64_t)qa[i * k + kk] * q[j * k + kk];
            }
            c = acc - (int64_t)par[i].zp * colsum[j];
            if (c > INT32_MAX || c < INT32_MIN) {
                fprintf(stderr, "reference: integer result %lld does not fit int32\n", (long long)c);
                exit(2);
            }
            cf = (float)(int32_t)c;
            s = par[i].scale * sw[j];
            t = cf * s;
            if (bias != NULL) {
                t = t + bias[j];
            }
            if (epi == DYNQ_EPILOGUE_GELU) {
                t = ref_gelu(t);
            }
            if (epi == DYNQ_EPILOGUE_GELU_TANH) {
                t = ref_gelu_tanh(t);
            }
            if (epi == DYNQ_EPILOGUE_SILU) {
                t = ref_silu(t);
            }
            if (epi == DYNQ_EPILOGUE_QUICK_GELU) {
                t = ref_quick_gelu(t);
            }
            if (epi == DYNQ_EPILOGUE_RELU) {
                t = t > 0.0f ? t : 0.0f;
            }
            y[i * ldy + j] = t;
        }
    }
    free(par);
    free(qa);
    free(colsum);
    free(lo);
    free(hi);
}

/* ========================================================================================== */
/* dynq helpers                                                                                 */
/* ========================================================================================== */

static dynq_pack_config pack_cfg(uint32_t granularity, uint32_t isa)
{
    dynq_pack_config c;
    memset(&c, 0xAB, sizeof c);
    if (dynq_pack_config_init(&c) != DYNQ_STATUS_OK) {
        fprintf(stderr, "dynq_pack_config_init failed\n");
        exit(2);
    }
    c.granularity = granularity;
    c.isa = isa;
    return c;
}

static dynq_gemm_config gemm_cfg(uint32_t gran, uint32_t type, uint32_t epi, uint32_t threads)
{
    dynq_gemm_config c;
    memset(&c, 0xAB, sizeof c);
    if (dynq_gemm_config_init(&c) != DYNQ_STATUS_OK) {
        fprintf(stderr, "dynq_gemm_config_init failed\n");
        exit(2);
    }
    c.act_granularity = gran;
    c.act_type = type;
    c.epilogue = epi;
    c.num_threads = threads;
    return c;
}

static dynq_packed_weights_info get_info(const dynq_packed_weights *p, dynq_status *st)
{
    dynq_packed_weights_info info;
    memset(&info, 0, sizeof info);
    info.struct_size = (uint32_t)sizeof info;
    *st = dynq_packed_weights_get_info(p, &info);
    return info;
}

/* Packs q[n][k] (NK) with the given scales; exits on failure (callers check statuses of the
 * interesting calls explicitly). */
static dynq_packed_weights *pack_q(const int8_t *q, size_t n, size_t k, const float *scales,
                                   size_t num_scales)
{
    dynq_packed_weights *p = NULL;
    dynq_status st = dynq_pack_quantized_weights(q, n, k, DYNQ_WEIGHT_LAYOUT_NK, scales, num_scales,
                                                 NULL, &p);
    if (st != DYNQ_STATUS_OK || p == NULL) {
        char msg[512];
        dynq_last_error_message(msg, sizeof msg);
        fprintf(stderr, "dynq_pack_quantized_weights(n=%zu, k=%zu) failed: %s: %s\n", n, k,
                sname((int)st), msg);
        exit(2);
    }
    return p;
}

static dynq_status gemm_run(const dynq_packed_weights *p, const float *a, size_t m, size_t lda,
                            const float *bias, float *y, size_t ldy, uint32_t gran, uint32_t type,
                            uint32_t epi, uint32_t threads)
{
    dynq_gemm_config c = gemm_cfg(gran, type, epi, threads);
    return dynq_gemm(p, a, m, lda, bias, y, ldy, &c);
}

/* Serializes into a new buffer; *len receives its size. */
static uint8_t *serialize_new(const dynq_packed_weights *p, size_t *len)
{
    size_t need = 0, written = 0;
    uint8_t *buf;
    if (dynq_packed_weights_serialize(p, NULL, 0, &need) != DYNQ_STATUS_OK) {
        fprintf(stderr, "size query failed\n");
        exit(2);
    }
    buf = ALLOC(uint8_t, need);
    if (dynq_packed_weights_serialize(p, buf, need, &written) != DYNQ_STATUS_OK || written != need) {
        fprintf(stderr, "serialize failed\n");
        exit(2);
    }
    *len = need;
    return buf;
}

static void random_q(int8_t *q, size_t count)
{
    size_t i;
    for (i = 0; i < count; i++) {
        q[i] = (int8_t)((int32_t)(rnd_u32() % 256u) - 128); /* full range, -128 included */
    }
}

/* Random activations, m rows of k at stride lda; padding columns get NaN (never to be read).
 * With `extremes`, the first rows exercise the degenerate cases of the quantizer. */
static void random_a(float *a, size_t m, size_t k, size_t lda, int extremes)
{
    size_t i, kk;
    for (i = 0; i < m; i++) {
        float mag = (float)(1u << (rnd_u32() % 8)) * 0.25f;
        for (kk = 0; kk < lda; kk++) {
            float v;
            if (kk >= k) {
                a[i * lda + kk] = f_from_bits(0x7FC00000u);
                continue;
            }
            v = rnd_f() * mag;
            if (extremes) {
                switch (i) {
                case 0: v = 0.0f; break;                                         /* zero row */
                case 1: v = fabsf(v) + 0.01f; break;                             /* lo = 0 */
                case 2: v = -fabsf(v) - 0.01f; break;                            /* hi = 0 */
                case 3: v = (kk % 2 ? 1e30f : -3e29f) * rnd_f(); break;           /* huge */
                case 4: v = (kk % 3 == 0 ? 5e-44f : -4e-44f); break;            /* scale underflow */
                case 5: v = kk == 0 ? FLT_MAX : kk == 1 ? -FLT_MAX : v; break;  /* range overflows */
                case 6: /* scale 1: exact ties 0.5, 1.5, 2.5 ... */
                    v = kk == 0 ? 255.0f : (float)(kk % 7) + 0.5f;
                    break;
                case 7: v = (kk % 2) ? -0.0f : 0.0f; break;                    /* signed zeros */
                default: break;
                }
            }
            a[i * lda + kk] = v;
        }
    }
}

/* ========================================================================================== */
/* Tests                                                                                        */
/* ========================================================================================== */

static void test_version(void)
{
    char built[64];
    const char *v = dynq_version();
    snprintf(built, sizeof built, "%d.%d.%d", (int)DYNQ_VERSION_MAJOR, (int)DYNQ_VERSION_MINOR,
             (int)DYNQ_VERSION_PATCH);
    check(v != NULL && strcmp(v, DYNQ_VERSION_STRING) == 0,
          "dynq_version() \"%s\" equals DYNQ_VERSION_STRING \"%s\"", v ? v : "(null)",
          DYNQ_VERSION_STRING);
    check(strcmp(built, DYNQ_VERSION_STRING) == 0,
          "MAJOR.MINOR.PATCH from the macros \"%s\" equals DYNQ_VERSION_STRING", built);
    check(v != NULL && strcmp(v, built) == 0, "dynq_version() equals \"%s\"", built);
    check(v == dynq_version(), "dynq_version() returns a static string (same pointer twice)");
    check(dynq_abi_version() == DYNQ_ABI_VERSION, "dynq_abi_version() = %u == DYNQ_ABI_VERSION %u",
          (unsigned)dynq_abi_version(), (unsigned)DYNQ_ABI_VERSION);
}

static void test_status_str(void)
{
    const char *s[10];
    uint32_t i, j;
    static const uint32_t unknown[] = {10u, 11u, 255u, 0x80000000u, 0xFFFFFFFFu};
    for (i = 0; i < 10; i++) {
        s[i] = dynq_status_str(i);
        check(s[i] != NULL && s[i][0] != '\0' && strcmp(s[i], "unknown status") != 0,
              "dynq_status_str(%s = %u) = \"%s\"", sname((int)i), (unsigned)i, s[i] ? s[i] : "(null)");
    }
    {
        int distinct = 1;
        for (i = 0; i < 10; i++) {
            for (j = i + 1; j < 10; j++) {
                if (s[i] && s[j] && strcmp(s[i], s[j]) == 0) {
                    distinct = 0;
                }
            }
        }
        check(distinct, "dynq_status_str: the 10 statuses have distinct descriptions");
    }
    check(strcmp(dynq_status_str(DYNQ_STATUS_OK), "ok") == 0, "dynq_status_str(DYNQ_STATUS_OK) is \"ok\"");
    for (i = 0; i < sizeof unknown / sizeof unknown[0]; i++) {
        const char *u = dynq_status_str(unknown[i]);
        check(u != NULL && strcmp(u, "unknown status") == 0, "dynq_status_str(%u) = \"%s\"",
              (unsigned)unknown[i], u ? u : "(null)");
    }
    check(dynq_status_str(DYNQ_STATUS_INTERNAL) == dynq_status_str(9u),
          "dynq_status_str returns static strings");
}

static uint32_t g_unavailable_isa = 0; /* an ISA with dynq_isa_available() == 0, if any */
static uint32_t g_active_isa = 0;

static void test_isa(void)
{
    static const char *const names[] = {"auto", "scalar", "avx2", "avx_vnni", "avx512_vnni",
                                        "neon", "neon_dotprod", "neon_i8mm", "amx_int8"};
    static const uint32_t values[] = {DYNQ_ISA_AUTO, DYNQ_ISA_SCALAR, DYNQ_ISA_AVX2,
                                      DYNQ_ISA_AVX_VNNI, DYNQ_ISA_AVX512_VNNI, DYNQ_ISA_NEON,
                                      DYNQ_ISA_NEON_DOTPROD, DYNQ_ISA_NEON_I8MM, DYNQ_ISA_AMX_INT8};
    uint32_t i;
    uint32_t isa = 0xDEADu;
    for (i = 0; i < 9; i++) {
        const char *n = dynq_isa_name(values[i]);
        int avail = dynq_isa_available(values[i]);
        check(values[i] == i && n != NULL && strcmp(n, names[i]) == 0,
              "dynq_isa_name(%u) = \"%s\" (expected \"%s\")", (unsigned)values[i], n ? n : "(null)",
              names[i]);
        check(avail == 0 || avail == 1, "dynq_isa_available(%s) = %d", names[i], (int)avail);
        if (avail == 0 && g_unavailable_isa == 0) {
            g_unavailable_isa = values[i];
        }
    }
    check(dynq_isa_available(DYNQ_ISA_AUTO) == 1, "dynq_isa_available(DYNQ_ISA_AUTO) == 1");
    check(dynq_isa_available(DYNQ_ISA_SCALAR) == 1, "dynq_isa_available(DYNQ_ISA_SCALAR) == 1");
    check(dynq_isa_available(9u) == 0 && dynq_isa_available(0xFFFFFFFFu) == 0,
          "dynq_isa_available of non-ISA values (9, 0xFFFFFFFF) == 0");
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
    check(dynq_isa_available(DYNQ_ISA_NEON) == 0 && dynq_isa_available(DYNQ_ISA_NEON_DOTPROD) == 0 &&
              dynq_isa_available(DYNQ_ISA_NEON_I8MM) == 0,
          "x86: no NEON ISA is available");
#endif
#if defined(__aarch64__)
    check(dynq_isa_available(DYNQ_ISA_AVX2) == 0 && dynq_isa_available(DYNQ_ISA_AVX512_VNNI) == 0 &&
              dynq_isa_available(DYNQ_ISA_AMX_INT8) == 0,
          "aarch64: no x86 ISA is available");
#endif
    check(strcmp(dynq_isa_name(9u), "unknown") == 0 && strcmp(dynq_isa_name(0xFFFFFFFFu), "unknown") == 0,
          "dynq_isa_name of non-ISA values (9, 0xFFFFFFFF) = \"unknown\"");
    check(g_unavailable_isa != 0, "found an ISA this CPU/build lacks: %s",
          dynq_isa_name(g_unavailable_isa));

    EXPECT_OK("dynq_active_isa(&isa)", dynq_active_isa(&isa));
    g_active_isa = isa;
    check(isa >= 1 && isa <= 8 && dynq_isa_available(isa) == 1,
          "dynq_active_isa = %u (%s): a concrete, available ISA", (unsigned)isa, dynq_isa_name(isa));
    {
        /* A run with DYNQ_ISA set (tests/c/run.sh, scripts/under-bochs.sh) tests that kernel: the
           library must have taken it, not another. */
        const char *forced = getenv("DYNQ_ISA");
        for (i = 1; forced != NULL && i < 8; i++) {
            if (strcmp(forced, names[i]) == 0) {
                check(isa == values[i], "the active ISA is DYNQ_ISA's: %s (DYNQ_ISA=%s)", dynq_isa_name(isa),
                      forced);
            }
        }
    }
}

static void test_configs(void)
{
    dynq_pack_config pc;
    dynq_gemm_config gc;
    memset(&pc, 0xAB, sizeof pc);
    memset(&gc, 0xAB, sizeof gc);
    EXPECT_OK("dynq_pack_config_init(&pc)", dynq_pack_config_init(&pc));
    check(pc.struct_size == sizeof pc && pc.granularity == DYNQ_WEIGHT_GRANULARITY_PER_CHANNEL &&
              pc.isa == DYNQ_ISA_AUTO && pc.weight_qmax == 0,
          "dynq_pack_config defaults: struct_size=%u granularity=%u isa=%u weight_qmax=%u",
          (unsigned)pc.struct_size, (unsigned)pc.granularity, (unsigned)pc.isa, (unsigned)pc.weight_qmax);
    {
        /* A program built before weight_qmax calls the exported function itself, on a 12-byte
         * struct: it fills those 12 bytes only (here followed by 4 bytes that must stay). */
        unsigned char raw[sizeof(dynq_pack_config)];
        dynq_pack_config v1;
        memset(raw, 0xAB, sizeof raw);
        EXPECT_OK("(dynq_pack_config_init)(12-byte struct)", (dynq_pack_config_init)((dynq_pack_config *)(void *)raw));
        memcpy(&v1, raw, sizeof v1);
        check(v1.struct_size == 12 && v1.granularity == 0 && v1.isa == 0 && raw[12] == 0xAB && raw[15] == 0xAB,
              "the first-layout init: struct_size=%u, bytes 12..15 untouched", (unsigned)v1.struct_size);
        EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "size=8", "dynq_pack_config_init_sized(&pc, 8)",
               dynq_pack_config_init_sized(&pc, 8));
    }
    EXPECT_OK("dynq_gemm_config_init(&gc)", dynq_gemm_config_init(&gc));
    check(gc.struct_size == sizeof gc && gc.act_granularity == DYNQ_ACT_GRANULARITY_PER_ROW &&
              gc.act_type == DYNQ_ACT_TYPE_ASYMMETRIC_U8 && gc.epilogue == DYNQ_EPILOGUE_NONE &&
              gc.num_threads == 0,
          "dynq_gemm_config defaults: struct_size=%u act_granularity=%u act_type=%u epilogue=%u "
          "num_threads=%u",
          (unsigned)gc.struct_size, (unsigned)gc.act_granularity, (unsigned)gc.act_type,
          (unsigned)gc.epilogue, (unsigned)gc.num_threads);
    EXPECT(DYNQ_STATUS_NULL_POINTER, "config", "dynq_pack_config_init(NULL)", (dynq_pack_config_init)(NULL));
    EXPECT(DYNQ_STATUS_NULL_POINTER, "config", "dynq_pack_config_init_sized(NULL, sizeof)",
           dynq_pack_config_init_sized(NULL, sizeof(dynq_pack_config)));
    EXPECT(DYNQ_STATUS_NULL_POINTER, "config", "dynq_gemm_config_init(NULL)", dynq_gemm_config_init(NULL));
    EXPECT(DYNQ_STATUS_NULL_POINTER, "isa", "dynq_active_isa(NULL)", dynq_active_isa(NULL));
}

/* Packing in both layouts and granularities, info, and the f32 weight quantization formula. */
static void test_pack_and_info(void)
{
    const size_t n = 19, k = 45, m = 9;
    float *w_nk = ALLOC(float, n * k);
    float *w_kn = ALLOC(float, n * k);
    int8_t *q_nk = ALLOC(int8_t, n * k);
    int8_t *q_kn = ALLOC(int8_t, n * k);
    float *scales = ALLOC(float, n);
    float *a = ALLOC(float, m * k);
    float *y1 = ALLOC(float, m * n);
    float *y2 = ALLOC(float, m * n);
    float *yr = ALLOC(float, m * n);
    size_t j, kk;
    int variant;
    char why[256];

    for (j = 0; j < n; j++) {
        float mag = j == 2 ? 0.0f : j == 4 ? 1e-44f : (float)(j + 1) * 0.37f;
        for (kk = 0; kk < k; kk++) {
            float v = rnd_f() * mag;
            w_nk[j * k + kk] = v;
            w_kn[kk * n + j] = v;
        }
    }
    /* Channel 6: amax 127 -> scale exactly 1, so 0.5 and 2.5 are exact ties. */
    for (kk = 0; kk < k; kk++) {
        float v = kk == 0 ? -127.0f : (float)((int)(kk % 9) - 4) + 0.5f;
        w_nk[6 * k + kk] = v;
        w_kn[kk * n + 6] = v;
    }
    random_a(a, m, k, k, 0);

    /* Per-channel and per-tensor, each with 8-bit weights (weight_qmax 0: 127) and with
     * weight_qmax 64 (narrow weights: AVX2 CPUs without VNNI run another kernel for them). */
    for (variant = 0; variant < 4; variant++) {
        const int per_tensor = variant % 2;
        const int qmax = variant >= 2 ? 64 : 127;
        const char *gname = per_tensor ? (qmax == 64 ? "per-tensor, qmax 64" : "per-tensor")
                                           : (qmax == 64 ? "per-channel, qmax 64" : "per-channel");
        dynq_pack_config cfg =
            pack_cfg(per_tensor ? DYNQ_WEIGHT_GRANULARITY_PER_TENSOR : DYNQ_WEIGHT_GRANULARITY_PER_CHANNEL,
                     DYNQ_ISA_AUTO);
        dynq_packed_weights *p_nk = NULL, *p_kn = NULL, *p_ref;
        dynq_packed_weights_info info;
        dynq_status st;
        size_t ns = per_tensor ? 1 : n;
        uint8_t *blob;
        size_t blob_len;
        char desc[200];

        cfg.weight_qmax = qmax == 127 ? 0 : (uint32_t)qmax;

        snprintf(desc, sizeof desc, "dynq_pack_weights(NK, %s)", gname);
        EXPECT_OK(desc, dynq_pack_weights(w_nk, n, k, DYNQ_WEIGHT_LAYOUT_NK, &cfg, &p_nk));
        snprintf(desc, sizeof desc, "dynq_pack_weights(KN, %s)", gname);
        EXPECT_OK(desc, dynq_pack_weights(w_kn, n, k, DYNQ_WEIGHT_LAYOUT_KN, &cfg, &p_kn));
        if (p_nk == NULL || p_kn == NULL) {
            check(0, "dynq_pack_weights returned a handle");
            continue;
        }
        info = get_info(p_nk, &st);
        expect_status("dynq_packed_weights_info", st, DYNQ_STATUS_OK, NULL);
        check(info.struct_size == sizeof info && info.n == n && info.k == k &&
                  info.granularity == (per_tensor ? 1u : 0u) && info.isa == g_active_isa &&
                  info.nr > 0 && info.kr > 0 && info.mr > 0 && info.layout_version > 0 &&
                  info.reserved == 0 && info.kernel_name != NULL && info.kernel_name[0] != '\0' &&
                  info.bytes >= n * k && info.serialized_bytes == 48 + 4 * ns + n * k + 4,
              "info(%s): n=%zu k=%zu granularity=%u isa=%u(%s) layout_version=%u mr=%u nr=%u kr=%u "
              "bytes=%zu serialized_bytes=%zu kernel_name=\"%s\"",
              gname, info.n, info.k, (unsigned)info.granularity, (unsigned)info.isa,
              dynq_isa_name(info.isa), (unsigned)info.layout_version, (unsigned)info.mr,
              (unsigned)info.nr, (unsigned)info.kr, info.bytes, info.serialized_bytes,
              info.kernel_name ? info.kernel_name : "(null)");

        /* Identical GEMM results from both layouts. */
        fill_sentinel(y1, m * n);
        fill_sentinel(y2, m * n);
        st = gemm_run(p_nk, a, m, k, NULL, y1, n, 0, 0, 0, 1);
        expect_status("dynq_gemm on NK-packed weights", st, DYNQ_STATUS_OK, NULL);
        st = gemm_run(p_kn, a, m, k, NULL, y2, n, 0, 0, 0, 1);
        expect_status("dynq_gemm on KN-packed weights", st, DYNQ_STATUS_OK, NULL);
        check(memcmp(y1, y2, m * n * sizeof(float)) == 0, "NK and KN layouts give identical GEMM (%s)",
              gname);

        /* The documented weight quantization, done here, packed as pre-quantized weights,
         * gives the same GEMM output and the same blob. */
        ref_quantize_weights(w_nk, n, k, per_tensor, qmax, q_nk, scales);
        p_ref = pack_q(q_nk, n, k, scales, ns);
        fill_sentinel(yr, m * n);
        st = gemm_run(p_ref, a, m, k, NULL, yr, n, 0, 0, 0, 1);
        check(st == DYNQ_STATUS_OK && memcmp(y1, yr, m * n * sizeof(float)) == 0,
              "f32 weights quantize as documented (%s): same GEMM as the C-quantized weights", gname);
        {
            float *sw = ALLOC(float, n);
            float *yref = ALLOC(float, m * n);
            for (j = 0; j < n; j++) {
                sw[j] = per_tensor ? scales[0] : scales[j];
            }
            ref_gemm(a, m, k, k, q_nk, sw, n, NULL, 0, 0, 0, yref, n);
            check(same_matrix(y1, n, yref, n, m, n, why, sizeof why),
                  "dynq_gemm on f32-packed weights equals the C reference (%s): %s", gname, why);
            free(sw);
            free(yref);
        }
        blob = serialize_new(p_nk, &blob_len);
        {
            int ok = blob_len == info.serialized_bytes;
            size_t s;
            for (s = 0; ok && s < ns; s++) {
                ok = get_u32(blob + 48 + 4 * s) == bits_of(scales[s]);
            }
            ok = ok && memcmp(blob + 48 + 4 * ns, q_nk, n * k) == 0;
            check(ok, "blob of f32-packed weights holds the documented scales and int8 values (%s)",
                  gname);
        }
        free(blob);
        dynq_packed_weights_free(p_nk);
        dynq_packed_weights_free(p_kn);
        dynq_packed_weights_free(p_ref);
    }

    /* Pre-quantized weights: 1 and n scales, both layouts; config->granularity ignored. */
    {
        dynq_packed_weights *pa = NULL, *pb = NULL, *pc = NULL;
        dynq_pack_config cfg_pt = pack_cfg(DYNQ_WEIGHT_GRANULARITY_PER_TENSOR, DYNQ_ISA_AUTO);
        dynq_pack_config cfg_pc = pack_cfg(DYNQ_WEIGHT_GRANULARITY_PER_CHANNEL, DYNQ_ISA_AUTO);
        dynq_packed_weights_info info;
        dynq_status st;
        uint8_t *b1, *b2;
        size_t l1, l2;
        float one = 0.0125f;
        random_q(q_nk, n * k);
        for (j = 0; j < n; j++) {
            for (kk = 0; kk < k; kk++) {
                q_kn[kk * n + j] = q_nk[j * k + kk];
            }
            scales[j] = 0.001f * (float)(j + 1);
        }
        EXPECT_OK("dynq_pack_quantized_weights(NK, n scales, config says per-tensor)",
                  dynq_pack_quantized_weights(q_nk, n, k, DYNQ_WEIGHT_LAYOUT_NK, scales, n, &cfg_pt, &pa));
        EXPECT_OK("dynq_pack_quantized_weights(KN, n scales, config NULL)",
                  dynq_pack_quantized_weights(q_kn, n, k, DYNQ_WEIGHT_LAYOUT_KN, scales, n, NULL, &pb));
        EXPECT_OK("dynq_pack_quantized_weights(NK, 1 scale, config says per-channel)",
                  dynq_pack_quantized_weights(q_nk, n, k, DYNQ_WEIGHT_LAYOUT_NK, &one, 1, &cfg_pc, &pc));
        if (pa && pb && pc) {
            info = get_info(pa, &st);
            check(st == DYNQ_STATUS_OK && info.granularity == DYNQ_WEIGHT_GRANULARITY_PER_CHANNEL &&
                      info.serialized_bytes == 48 + 4 * n + n * k + 4 && info.n == n && info.k == k,
                  "n scales give per-channel weights (granularity=%u, serialized_bytes=%zu)",
                  (unsigned)info.granularity, info.serialized_bytes);
            info = get_info(pc, &st);
            check(st == DYNQ_STATUS_OK && info.granularity == DYNQ_WEIGHT_GRANULARITY_PER_TENSOR &&
                      info.serialized_bytes == 48 + 4 + n * k + 4,
                  "1 scale gives per-tensor weights (granularity=%u, serialized_bytes=%zu)",
                  (unsigned)info.granularity, info.serialized_bytes);
            b1 = serialize_new(pa, &l1);
            b2 = serialize_new(pb, &l2);
            check(l1 == l2 && memcmp(b1, b2, l1) == 0,
                  "pre-quantized NK and KN weights serialize to identical blobs");
            check(memcmp(b1 + 48 + 4 * n, q_nk, n * k) == 0,
                  "the blob holds the given int8 values unchanged (-128..127)");
            free(b1);
            free(b2);
            fill_sentinel(y1, m * n);
            fill_sentinel(y2, m * n);
            gemm_run(pa, a, m, k, NULL, y1, n, 0, 0, 0, 0);
            gemm_run(pb, a, m, k, NULL, y2, n, 0, 0, 0, 0);
            check(memcmp(y1, y2, m * n * sizeof(float)) == 0,
                  "pre-quantized NK and KN weights give identical GEMM");
        }
        dynq_packed_weights_free(pa);
        dynq_packed_weights_free(pb);
        dynq_packed_weights_free(pc);
    }
    {
        /* Forcing the scalar kernel (always available) and the active ISA explicitly. */
        dynq_pack_config cs = pack_cfg(0, DYNQ_ISA_SCALAR);
        dynq_pack_config ca = pack_cfg(0, g_active_isa);
        dynq_packed_weights *ps = NULL, *pa = NULL;
        dynq_status st;
        dynq_packed_weights_info info;
        EXPECT_OK("dynq_pack_weights(config isa=SCALAR)",
                  dynq_pack_weights(w_nk, n, k, DYNQ_WEIGHT_LAYOUT_NK, &cs, &ps));
        EXPECT_OK("dynq_pack_weights(config isa=active ISA)",
                  dynq_pack_weights(w_nk, n, k, DYNQ_WEIGHT_LAYOUT_NK, &ca, &pa));
        if (ps && pa) {
            info = get_info(ps, &st);
            check(st == DYNQ_STATUS_OK && info.isa == DYNQ_ISA_SCALAR,
                  "forced scalar: info.isa = %s, kernel %s", dynq_isa_name(info.isa), info.kernel_name);
            fill_sentinel(y1, m * n);
            fill_sentinel(y2, m * n);
            gemm_run(ps, a, m, k, NULL, y1, n, 0, 0, 0, 1);
            gemm_run(pa, a, m, k, NULL, y2, n, 0, 0, 0, 1);
            check(memcmp(y1, y2, m * n * sizeof(float)) == 0,
                  "scalar and active-ISA (%s) kernels give bit-identical GEMM", dynq_isa_name(g_active_isa));
        }
        dynq_packed_weights_free(ps);
        dynq_packed_weights_free(pa);
    }
    dynq_packed_weights_free(NULL);
    check(1, "dynq_packed_weights_free(NULL) is a no-op");

    free(w_nk);
    free(w_kn);
    free(q_nk);
    free(q_kn);
    free(scales);
    free(a);
    free(y1);
    free(y2);
    free(yr);
}

/* Serialize / deserialize and the blob format. */
static void test_serialize(void)
{
    const size_t n = 3, k = 5, m = 4;
    int8_t q[15];
    float scales[3] = {0.5f, 0.03125f, 2.0f};
    float a[20];
    float y1[12], y2[12], yr[12];
    dynq_packed_weights *p, *p2 = NULL;
    size_t need = 0, written = 0, len, i;
    uint8_t *blob, *blob2, *work;
    dynq_status st;
    dynq_packed_weights_info info;
    char why[256];

    random_q(q, n * k);
    q[0] = -128;
    q[1] = 127;
    random_a(a, m, k, k, 0);
    p = pack_q(q, n, k, scales, n);
    info = get_info(p, &st);

    EXPECT_OK("dynq_packed_weights_serialize(buf=NULL) size query",
              dynq_packed_weights_serialize(p, NULL, 0, &need));
    check(need == info.serialized_bytes && need == 48 + 4 * n + n * k + 4,
          "size query gives %zu bytes (info says %zu, format says %zu)", need, info.serialized_bytes,
          48 + 4 * n + n * k + 4);
    EXPECT_OK("dynq_packed_weights_serialize(buf=NULL, buf_len=1000) size query",
              dynq_packed_weights_serialize(p, NULL, 1000, &written));
    check(written == need, "size query ignores buf_len when buf is NULL (%zu)", written);

    blob = ALLOC(uint8_t, need + 16);
    memset(blob, 0xEE, need + 16);
    written = 0;
    EXPECT(DYNQ_STATUS_BUFFER_TOO_SMALL, NULL, "dynq_packed_weights_serialize(buf_len = need - 1)",
           dynq_packed_weights_serialize(p, blob, need - 1, &written));
    check(written == need, "BUFFER_TOO_SMALL reports the required size in *written (%zu)", written);
    {
        int untouched = 1;
        for (i = 0; i < need + 16; i++) {
            untouched = untouched && blob[i] == 0xEE;
        }
        check(untouched, "BUFFER_TOO_SMALL leaves the buffer untouched");
    }
    written = 0;
    EXPECT(DYNQ_STATUS_BUFFER_TOO_SMALL, NULL, "dynq_packed_weights_serialize(buf_len = 0)",
           dynq_packed_weights_serialize(p, blob, 0, &written));
    check(written == need, "buf_len 0: *written = %zu", written);
    written = 0;
    EXPECT_OK("dynq_packed_weights_serialize(buf_len = need + 16)",
              dynq_packed_weights_serialize(p, blob, need + 16, &written));
    check(written == need && blob[need] == 0xEE, "full write: *written = %zu, nothing written past it",
          written);
    len = need;

    /* Header fields as documented. */
    check(memcmp(blob, "DYNQPWT\0", 8) == 0 && get_u32(blob + 8) == 1 && get_u32(blob + 12) == 48 &&
              get_u64(blob + 16) == len && get_u64(blob + 24) == n && get_u64(blob + 32) == k &&
              get_u32(blob + 40) == 0 && get_u32(blob + 44) == 0,
          "blob header: magic, version 1, header length 48, total length, n, k, granularity, flags");
    check(crc32_ieee((const uint8_t *)"123456789", 9) == 0xCBF43926u &&
              get_u32(blob + len - 4) == crc32_ieee(blob, len - 4),
          "blob ends with the CRC-32/IEEE of the bytes before it (0x%08x)", (unsigned)get_u32(blob + len - 4));
    check(get_u32(blob + 48) == bits_of(scales[0]) && get_u32(blob + 52) == bits_of(scales[1]) &&
              get_u32(blob + 56) == bits_of(scales[2]) && memcmp(blob + 60, q, n * k) == 0,
          "blob body: the scales, then the int8 weights [N][K]");

    /* Round trip. */
    {
        uint8_t *exact = (uint8_t *)guarded(len);
        memcpy(exact, blob, len);
        EXPECT_OK("dynq_packed_weights_deserialize(blob)",
                  dynq_packed_weights_deserialize(exact, len, NULL, &p2));
    }
    if (p2 != NULL) {
        float sw[3];
        dynq_packed_weights_info info2 = get_info(p2, &st);
        check(st == DYNQ_STATUS_OK && info2.n == n && info2.k == k && info2.granularity == info.granularity &&
                  info2.serialized_bytes == info.serialized_bytes && info2.isa == g_active_isa,
              "deserialized info matches (n=%zu k=%zu granularity=%u isa=%s)", info2.n, info2.k,
              (unsigned)info2.granularity, dynq_isa_name(info2.isa));
        fill_sentinel(y1, 12);
        fill_sentinel(y2, 12);
        gemm_run(p, a, m, k, scales, y1, n, 0, 0, 0, 1);
        gemm_run(p2, a, m, k, scales, y2, n, 0, 0, 0, 1);
        check(memcmp(y1, y2, sizeof y1) == 0, "GEMM after serialize/deserialize is bit-identical (memcmp)");
        memcpy(sw, scales, sizeof sw);
        ref_gemm(a, m, k, k, q, sw, n, scales, 0, 0, 0, yr, n);
        check(same_matrix(y2, n, yr, n, m, n, why, sizeof why), "deserialized GEMM equals the C reference: %s",
              why);
        blob2 = serialize_new(p2, &written);
        check(written == len && memcmp(blob, blob2, len) == 0, "re-serializing gives the same blob");
        free(blob2);
        dynq_packed_weights_free(p2);
    }
    {
        dynq_pack_config cs = pack_cfg(DYNQ_WEIGHT_GRANULARITY_PER_TENSOR, DYNQ_ISA_SCALAR);
        p2 = NULL;
        EXPECT_OK("dynq_packed_weights_deserialize(config isa=SCALAR; granularity ignored)",
                  dynq_packed_weights_deserialize(blob, len, &cs, &p2));
        if (p2) {
            dynq_packed_weights_info i2 = get_info(p2, &st);
            check(i2.isa == DYNQ_ISA_SCALAR && i2.granularity == DYNQ_WEIGHT_GRANULARITY_PER_CHANNEL,
                  "deserialized for scalar: isa=%s granularity=%u", dynq_isa_name(i2.isa),
                  (unsigned)i2.granularity);
            fill_sentinel(y2, 12);
            gemm_run(p2, a, m, k, scales, y2, n, 0, 0, 0, 1);
            check(memcmp(y1, y2, sizeof y1) == 0, "scalar-deserialized GEMM is bit-identical");
            dynq_packed_weights_free(p2);
        }
    }

    /* A blob written here from the format description alone loads and computes as expected. */
    {
        size_t hl = 48 + 4 + n * k + 4;
        uint8_t *mine = ALLOC(uint8_t, hl);
        float s1 = 0.0078125f, swv[3];
        memcpy(mine, "DYNQPWT\0", 8);
        put_u32(mine + 8, 1);
        put_u32(mine + 12, 48);
        put_u64(mine + 16, hl);
        put_u64(mine + 24, n);
        put_u64(mine + 32, k);
        put_u32(mine + 40, 1); /* per tensor */
        put_u32(mine + 44, 0);
        put_u32(mine + 48, bits_of(s1));
        memcpy(mine + 52, q, n * k);
        fix_crc(mine, hl);
        p2 = NULL;
        EXPECT_OK("dynq_packed_weights_deserialize(hand-written per-tensor blob)",
                  dynq_packed_weights_deserialize(mine, hl, NULL, &p2));
        if (p2) {
            swv[0] = swv[1] = swv[2] = s1;
            fill_sentinel(y2, 12);
            gemm_run(p2, a, m, k, NULL, y2, n, 0, 0, 0, 1);
            ref_gemm(a, m, k, k, q, swv, n, NULL, 0, 0, 0, yr, n);
            check(same_matrix(y2, n, yr, n, m, n, why, sizeof why),
                  "hand-written blob: GEMM equals the C reference: %s", why);
            blob2 = serialize_new(p2, &written);
            check(written == hl && memcmp(blob2, mine, hl) == 0,
                  "hand-written blob re-serializes byte for byte");
            free(blob2);
            dynq_packed_weights_free(p2);
        }
        free(mine);
    }

    /* Corruption. */
    work = ALLOC(uint8_t, len + 1);
    {
        size_t byte;
        int bit, all = 1, nulled = 1;
        size_t bad_byte = 0;
        int bad_bit = 0;
        dynq_status bad_st = DYNQ_STATUS_CORRUPT_DATA;
        for (byte = 0; byte < len; byte++) {
            for (bit = 0; bit < 8; bit++) {
                dynq_packed_weights *o = (dynq_packed_weights *)(void *)work; /* non-NULL */
                memcpy(work, blob, len);
                work[byte] ^= (uint8_t)(1u << bit);
                st = dynq_packed_weights_deserialize(work, len, NULL, &o);
                if (st != DYNQ_STATUS_CORRUPT_DATA && all) {
                    all = 0;
                    bad_byte = byte;
                    bad_bit = bit;
                    bad_st = st;
                }
                if (o != NULL) {
                    nulled = 0;
                    if (st == DYNQ_STATUS_OK) {
                        dynq_packed_weights_free(o);
                    }
                }
            }
        }
        check(all, "each of the %zu single-bit flips gives DYNQ_STATUS_CORRUPT_DATA%s", len * 8,
              all ? "" : " -- NOT ALL");
        if (!all) {
            check(0, "bit flip at byte %zu bit %d gave %s", bad_byte, bad_bit, sname((int)bad_st));
        }
        check(nulled, "*out is NULL after each failed deserialize");
    }
    memcpy(work, blob, len);
    work[60] ^= 0x10;
    EXPECT(DYNQ_STATUS_CORRUPT_DATA, "checksum", "dynq_packed_weights_deserialize(weight bit flipped)",
           dynq_packed_weights_deserialize(work, len, NULL, &p2));
    {
        size_t l;
        int all = 1;
        size_t bad = 0;
        for (l = 0; l < len; l++) {
            uint8_t *t = (uint8_t *)guarded(l ? l : 1);
            dynq_packed_weights *o = NULL;
            memcpy(t, blob, l);
            st = dynq_packed_weights_deserialize(t, l, NULL, &o);
            if (st != DYNQ_STATUS_CORRUPT_DATA && all) {
                all = 0;
                bad = l;
            }
            if (st == DYNQ_STATUS_OK) {
                dynq_packed_weights_free(o);
            }
            if (l > 8 && l + 8 < len) {
                l += 6; /* guard pages are finite: sample the middle lengths */
            }
        }
        check(all, "truncated blobs (lengths 0..%zu) give DYNQ_STATUS_CORRUPT_DATA%s", len - 1,
              all ? "" : " -- NOT ALL");
        if (!all) {
            check(0, "truncation to %zu bytes was not reported as corrupt", bad);
        }
    }
    EXPECT(DYNQ_STATUS_CORRUPT_DATA, NULL, "dynq_packed_weights_deserialize(blob truncated by 1 byte)",
           dynq_packed_weights_deserialize(blob, len - 1, NULL, &p2));
    EXPECT(DYNQ_STATUS_CORRUPT_DATA, NULL, "dynq_packed_weights_deserialize(len 0)",
           dynq_packed_weights_deserialize(blob, 0, NULL, &p2));
    memcpy(work, blob, len);
    work[len] = 0;
    EXPECT(DYNQ_STATUS_CORRUPT_DATA, NULL, "dynq_packed_weights_deserialize(blob + 1 padding byte)",
           dynq_packed_weights_deserialize(work, len + 1, NULL, &p2));
    memcpy(work, blob, len);
    work[0] = 'X';
    fix_crc(work, len);
    EXPECT(DYNQ_STATUS_CORRUPT_DATA, "magic", "dynq_packed_weights_deserialize(wrong magic)",
           dynq_packed_weights_deserialize(work, len, NULL, &p2));
    {
        static const char text[] = "this is not a dynq blob, just some text";
        EXPECT(DYNQ_STATUS_CORRUPT_DATA, NULL, "dynq_packed_weights_deserialize(foreign data)",
               dynq_packed_weights_deserialize((const uint8_t *)text, sizeof text, NULL, &p2));
    }

    /* Valid checksum, bad or newer content. */
    memcpy(work, blob, len);
    put_u32(work + 8, 2);
    fix_crc(work, len);
    p2 = (dynq_packed_weights *)(void *)work;
    EXPECT(DYNQ_STATUS_UNSUPPORTED, "version 2",
           "dynq_packed_weights_deserialize(format version 2, CRC recomputed)",
           dynq_packed_weights_deserialize(work, len, NULL, &p2));
    check(p2 == NULL, "*out is NULL after UNSUPPORTED");
    memcpy(work, blob, len);
    put_u32(work + 8, 0);
    fix_crc(work, len);
    EXPECT(DYNQ_STATUS_CORRUPT_DATA, NULL, "dynq_packed_weights_deserialize(format version 0, CRC recomputed)",
           dynq_packed_weights_deserialize(work, len, NULL, &p2));
    memcpy(work, blob, len);
    put_u32(work + 44, 1);
    fix_crc(work, len);
    EXPECT(DYNQ_STATUS_UNSUPPORTED, "flags", "dynq_packed_weights_deserialize(unknown flag, CRC recomputed)",
           dynq_packed_weights_deserialize(work, len, NULL, &p2));
    memcpy(work, blob, len);
    put_u32(work + 12, 52);
    fix_crc(work, len);
    EXPECT(DYNQ_STATUS_CORRUPT_DATA, NULL, "dynq_packed_weights_deserialize(header length 52, CRC recomputed)",
           dynq_packed_weights_deserialize(work, len, NULL, &p2));
    memcpy(work, blob, len);
    put_u64(work + 24, 0);
    fix_crc(work, len);
    EXPECT(DYNQ_STATUS_CORRUPT_DATA, NULL, "dynq_packed_weights_deserialize(n = 0, CRC recomputed)",
           dynq_packed_weights_deserialize(work, len, NULL, &p2));
    memcpy(work, blob, len);
    put_u64(work + 32, 65537);
    fix_crc(work, len);
    EXPECT(DYNQ_STATUS_CORRUPT_DATA, NULL, "dynq_packed_weights_deserialize(k = 65537, CRC recomputed)",
           dynq_packed_weights_deserialize(work, len, NULL, &p2));
    memcpy(work, blob, len);
    put_u64(work + 24, (uint64_t)1 << 62);
    put_u64(work + 32, 8);
    fix_crc(work, len);
    EXPECT(DYNQ_STATUS_CORRUPT_DATA, NULL, "dynq_packed_weights_deserialize(n = 2^62, CRC recomputed)",
           dynq_packed_weights_deserialize(work, len, NULL, &p2));
    memcpy(work, blob, len);
    put_u64(work + 24, 5);
    put_u64(work + 32, 3);
    fix_crc(work, len);
    EXPECT(DYNQ_STATUS_CORRUPT_DATA, NULL,
           "dynq_packed_weights_deserialize(shape 5x3 instead of 3x5, CRC recomputed)",
           dynq_packed_weights_deserialize(work, len, NULL, &p2));
    memcpy(work, blob, len);
    put_u32(work + 40, 7);
    fix_crc(work, len);
    EXPECT(DYNQ_STATUS_CORRUPT_DATA, NULL, "dynq_packed_weights_deserialize(granularity 7, CRC recomputed)",
           dynq_packed_weights_deserialize(work, len, NULL, &p2));
    memcpy(work, blob, len);
    put_u32(work + 40, 1);
    fix_crc(work, len);
    EXPECT(DYNQ_STATUS_CORRUPT_DATA, NULL,
           "dynq_packed_weights_deserialize(granularity per-tensor with n scales, CRC recomputed)",
           dynq_packed_weights_deserialize(work, len, NULL, &p2));
    memcpy(work, blob, len);
    put_u32(work + 52, bits_of(-1.0f));
    fix_crc(work, len);
    EXPECT(DYNQ_STATUS_CORRUPT_DATA, "scale 1", "dynq_packed_weights_deserialize(negative scale, CRC recomputed)",
           dynq_packed_weights_deserialize(work, len, NULL, &p2));
    memcpy(work, blob, len);
    put_u32(work + 48, 0x7FC00000u);
    fix_crc(work, len);
    EXPECT(DYNQ_STATUS_CORRUPT_DATA, "scale 0", "dynq_packed_weights_deserialize(NaN scale, CRC recomputed)",
           dynq_packed_weights_deserialize(work, len, NULL, &p2));
    memcpy(work, blob, len);
    put_u64(work + 16, len + 1);
    fix_crc(work, len);
    EXPECT(DYNQ_STATUS_CORRUPT_DATA, NULL, "dynq_packed_weights_deserialize(length field + 1, CRC recomputed)",
           dynq_packed_weights_deserialize(work, len, NULL, &p2));

    free(work);
    free(blob);
    dynq_packed_weights_free(p);
}

/* The GEMM against the C reference, for every option combination. */
static void test_gemm_reference(void)
{
    const size_t m = 13, n = 21, k = 37, lda = 41, ldy = 26;
    int8_t *q = ALLOC(int8_t, n * k);
    float *sw = ALLOC(float, n);
    float *bias = ALLOC(float, n);
    float *a = (float *)guarded(((m - 1) * lda + k) * sizeof(float));
    float *y = (float *)guarded(((m - 1) * ldy + n) * sizeof(float));
    float *yc = ALLOC(float, m * n);
    float *ref = ALLOC(float, m * n);
    float *a_compact = ALLOC(float, m * k);
    dynq_packed_weights *p;
    size_t i, j;
    int ext, combo;
    char why[256];

    random_q(q, n * k);
    for (j = 0; j < k; j++) {
        q[0 * k + j] = -128; /* extreme columns */
        q[1 * k + j] = 127;
    }
    for (j = 0; j < n; j++) {
        sw[j] = 0.001f * (float)(j + 1) + 0.0001f * rnd_f();
        bias[j] = rnd_f() * 2.0f;
    }
    sw[3] = 0.0f;     /* zero scale is allowed */
    sw[5] = 1e-40f;   /* subnormal scale */
    bias[7] = -0.0f;
    p = pack_q(q, n, k, sw, n);

    for (ext = 0; ext < 2; ext++) {
        /* Allocate a exactly (m-1)*lda + k floats: the last row has no padding. */
        float *aa = (float *)ALLOC(float, m * lda);
        random_a(aa, m, k, lda, ext);
        memcpy(a, aa, ((m - 1) * lda + k) * sizeof(float));
        free(aa);
        for (combo = 0; combo < 48; combo++) {
            /* combo >> 3: 0 and 1 none or ReLU (bias by bit 3), then GELU, tanh GELU, SiLU,
             * QuickGELU, each with the bias. */
            static const uint32_t later[4] = {DYNQ_EPILOGUE_GELU, DYNQ_EPILOGUE_GELU_TANH, DYNQ_EPILOGUE_SILU,
                                              DYNQ_EPILOGUE_QUICK_GELU};
            uint32_t gran = (combo & 1) ? DYNQ_ACT_GRANULARITY_PER_TENSOR : DYNQ_ACT_GRANULARITY_PER_ROW;
            uint32_t type = (combo & 2) ? DYNQ_ACT_TYPE_SYMMETRIC_I8 : DYNQ_ACT_TYPE_ASYMMETRIC_U8;
            uint32_t epi = (combo >> 3) >= 2 ? later[(combo >> 3) - 2]
                           : (combo & 4)     ? DYNQ_EPILOGUE_RELU
                                             : DYNQ_EPILOGUE_NONE;
            const float *b = (combo & 8) || (combo >> 3) >= 2 ? bias : NULL;
            dynq_status st;
            fill_sentinel(y, (m - 1) * ldy + n);
            st = gemm_run(p, a, m, lda, b, y, ldy, gran, type, epi, 1);
            ref_gemm(a, m, k, lda, q, sw, n, b, gran, type, epi, ref, n);
            check(st == DYNQ_STATUS_OK && same_matrix(y, ldy, ref, n, m, n, why, sizeof why),
                  "dynq_gemm == C reference, %s activations, %s, %s, %s, %s, lda=%zu ldy=%zu: %s (%s)",
                  ext ? "extreme" : "random", gran ? "per-tensor" : "per-row",
                  type ? "symmetric int8" : "asymmetric uint8",
                  epi == DYNQ_EPILOGUE_QUICK_GELU ? "QuickGELU" : epi == DYNQ_EPILOGUE_SILU ? "SiLU"
                  : epi == DYNQ_EPILOGUE_GELU_TANH  ? "tanh GELU" : epi == DYNQ_EPILOGUE_GELU ? "GELU"
                  : epi                             ? "ReLU"      : "no epilogue",
                  b ? "bias" : "bias NULL", lda, ldy, st == DYNQ_STATUS_OK ? why : "call failed",
                  sname((int)st));
        }
        /* Compact strides give the same result as padded ones. */
        for (i = 0; i < m; i++) {
            memcpy(a_compact + i * k, a + i * lda, k * sizeof(float));
        }
        fill_sentinel(y, (m - 1) * ldy + n);
        fill_sentinel(yc, m * n);
        gemm_run(p, a, m, lda, bias, y, ldy, 0, 0, 0, 1);
        gemm_run(p, a_compact, m, k, bias, yc, n, 0, 0, 0, 1);
        check(same_matrix(y, ldy, yc, n, m, n, why, sizeof why),
              "lda=%zu/ldy=%zu and lda=k/ldy=n give the same output (%s activations): %s", lda, ldy,
              ext ? "extreme" : "random", why);
    }
    {
        /* ReLU output has no negative values and no -0.0. */
        int ok = 1;
        fill_sentinel(y, (m - 1) * ldy + n);
        gemm_run(p, a, m, lda, bias, y, ldy, 0, 0, DYNQ_EPILOGUE_RELU, 1);
        for (i = 0; i < m; i++) {
            for (j = 0; j < n; j++) {
                float v = y[i * ldy + j];
                if (!(v >= 0.0f) || bits_of(v) == 0x80000000u) {
                    ok = 0;
                }
            }
        }
        check(ok, "ReLU output is >= 0 everywhere (and never -0.0)");
    }
    dynq_packed_weights_free(p);

    /* K = 65536 (the maximum): the exactness bound 255 * 128 * K < 2^31. */
    {
        const size_t kk = 65536, nn = 2;
        int8_t *qq = ALLOC(int8_t, nn * kk);
        float s2[2] = {1.0f, 0.5f};
        float *aa = ALLOC(float, 2 * 65536);
        float yy[4], rr[4];
        dynq_packed_weights *pp;
        dynq_status st;
        size_t t;
        for (t = 0; t < kk; t++) {
            qq[t] = -128;
            qq[kk + t] = 127;
            aa[t] = 1.0f;
            aa[kk + t] = -1.0f;
        }
        pp = pack_q(qq, nn, kk, s2, 2);
        fill_sentinel(yy, 4);
        st = gemm_run(pp, aa, 2, kk, NULL, yy, 2, 0, 0, 0, 0);
        ref_gemm(aa, 2, kk, kk, qq, s2, nn, NULL, 0, 0, 0, rr, 2);
        check(st == DYNQ_STATUS_OK && memcmp(yy, rr, sizeof yy) == 0,
              "k=65536 at the int32 bound: y = {%.9g, %.9g, %.9g, %.9g} equals the reference", (double)yy[0],
              (double)yy[1], (double)yy[2], (double)yy[3]);
        dynq_packed_weights_free(pp);
        free(qq);
        free(aa);
    }

    free(q);
    free(sw);
    free(bias);
    free(yc);
    free(ref);
    free(a_compact);
}

/* Thread counts, m == 0, and misc GEMM behaviour. */
static void test_gemm_threads(void)
{
    const size_t m = 150, n = 100, k = 64;
    int8_t *q = ALLOC(int8_t, n * k);
    float *sw = ALLOC(float, n);
    float *bias = ALLOC(float, n);
    float *a = ALLOC(float, m * k);
    float *y1 = ALLOC(float, m * n), *y2 = ALLOC(float, m * n), *y0 = ALLOC(float, m * n);
    float *y3 = ALLOC(float, m * n), *ref = ALLOC(float, m * n);
    dynq_packed_weights *p;
    size_t j;
    dynq_status st;
    char why[256];
    random_q(q, n * k);
    for (j = 0; j < n; j++) {
        sw[j] = 0.002f * (float)(j % 17 + 1);
        bias[j] = rnd_f();
    }
    random_a(a, m, k, k, 1);
    p = pack_q(q, n, k, sw, n);
    fill_sentinel(y1, m * n);
    fill_sentinel(y2, m * n);
    fill_sentinel(y0, m * n);
    fill_sentinel(y3, m * n);
    st = gemm_run(p, a, m, k, bias, y1, n, 0, 0, 0, 1);
    expect_status("dynq_gemm(m=150, n=100, num_threads=1)", st, DYNQ_STATUS_OK, NULL);
    st = gemm_run(p, a, m, k, bias, y2, n, 0, 0, 0, 2);
    expect_status("dynq_gemm(m=150, n=100, num_threads=2)", st, DYNQ_STATUS_OK, NULL);
    st = gemm_run(p, a, m, k, bias, y3, n, 0, 0, 0, 3);
    expect_status("dynq_gemm(m=150, n=100, num_threads=3)", st, DYNQ_STATUS_OK, NULL);
    st = gemm_run(p, a, m, k, bias, y0, n, 0, 0, 0, 0);
    expect_status("dynq_gemm(m=150, n=100, num_threads=0 default)", st, DYNQ_STATUS_OK, NULL);
    check(memcmp(y1, y2, m * n * sizeof(float)) == 0, "num_threads 1 and 2 give bit-identical output");
    check(memcmp(y1, y3, m * n * sizeof(float)) == 0, "num_threads 1 and 3 give bit-identical output");
    check(memcmp(y1, y0, m * n * sizeof(float)) == 0, "num_threads 1 and default give bit-identical output");
    ref_gemm(a, m, k, k, q, sw, n, bias, 0, 0, 0, ref, n);
    check(same_matrix(y2, n, ref, n, m, n, why, sizeof why), "2-thread output equals the C reference: %s",
          why);
    {
        dynq_gemm_config c = gemm_cfg(0, 0, 0, 2);
        fill_sentinel(y0, m * n);
        EXPECT_OK("dynq_gemm(config=NULL)", dynq_gemm(p, a, m, k, bias, y0, n, NULL));
        check(memcmp(y1, y0, m * n * sizeof(float)) == 0, "config NULL gives the default result");
        EXPECT_OK("dynq_gemm(m=0, a=NULL, y=NULL)", dynq_gemm(p, NULL, 0, k, NULL, NULL, n, &c));
        EXPECT_OK("dynq_gemm(m=0, a=NULL, y=NULL, bias=NULL, config=NULL)",
                  dynq_gemm(p, NULL, 0, k, NULL, NULL, n, NULL));
        EXPECT_OK("dynq_gemm(m=0, non-NULL buffers)", dynq_gemm(p, a, 0, k, bias, y0, n, &c));
        /* y right after a, and a right after y: adjacent but not overlapping. */
        {
            size_t a_len = 2 * k, y_len = 2 * n;
            float *buf = ALLOC(float, a_len + y_len);
            memcpy(buf, a, a_len * sizeof(float));
            EXPECT_OK("dynq_gemm(y starts right after a)", dynq_gemm(p, buf, 2, k, NULL, buf + a_len, n, &c));
            memcpy(buf + y_len, a, a_len * sizeof(float));
            EXPECT_OK("dynq_gemm(a starts right after y)", dynq_gemm(p, buf + y_len, 2, k, NULL, buf, n, &c));
            free(buf);
        }
    }
    dynq_packed_weights_free(p);
    free(q);
    free(sw);
    free(bias);
    free(a);
    free(y0);
    free(y1);
    free(y2);
    free(y3);
    free(ref);
}

/* dynq_gemm_smoothed: exactly dynq_gemm on A multiplied by the factors (one float
   multiplication per element), NULL factors = dynq_gemm_ex; bad factors refused, y untouched. */
static void test_gemm_smoothed(void)
{
    const size_t m = 37, n = 50, k = 72;
    int8_t *q = ALLOC(int8_t, n * k);
    float *sw = ALLOC(float, n), *bias = ALLOC(float, n), *sm = ALLOC(float, k);
    float *a = ALLOC(float, m * k), *pre = ALLOC(float, m * k);
    float *y1 = ALLOC(float, m * n), *y2 = ALLOC(float, m * n);
    dynq_gemm_config c = gemm_cfg(0, 0, 0, 2);
    dynq_packed_weights *p;
    size_t i, j;
    random_q(q, n * k);
    for (j = 0; j < n; j++) {
        sw[j] = 0.002f * (float)(j % 13 + 1);
        bias[j] = rnd_f();
    }
    for (j = 0; j < k; j++) {
        sm[j] = (j % 5 == 0) ? 0.02f * (float)(j + 1) : 1.0f + 0.25f * (float)(j % 7);
    }
    random_a(a, m, k, k, 0);
    for (i = 0; i < m; i++) {
        for (j = 0; j < k; j++) {
            pre[i * k + j] = a[i * k + j] * sm[j];
        }
    }
    p = pack_q(q, n, k, sw, n);
    fill_sentinel(y1, m * n);
    fill_sentinel(y2, m * n);
    EXPECT_OK("dynq_gemm(pre-multiplied A)", dynq_gemm(p, pre, m, k, bias, y1, n, &c));
    EXPECT_OK("dynq_gemm_smoothed(f32)",
              dynq_gemm_smoothed(p, a, DYNQ_DTYPE_F32, m, k, sm, bias, y2, DYNQ_DTYPE_F32, n, &c));
    check(memcmp(y1, y2, m * n * sizeof(float)) == 0, "dynq_gemm_smoothed equals dynq_gemm on A * smooth");
    EXPECT_OK("dynq_gemm(plain A)", dynq_gemm(p, a, m, k, bias, y1, n, &c));
    EXPECT_OK("dynq_gemm_smoothed(smooth=NULL)",
              dynq_gemm_smoothed(p, a, DYNQ_DTYPE_F32, m, k, NULL, bias, y2, DYNQ_DTYPE_F32, n, &c));
    check(memcmp(y1, y2, m * n * sizeof(float)) == 0, "dynq_gemm_smoothed with NULL factors equals dynq_gemm");
    EXPECT_OK("dynq_gemm_smoothed(m=0)",
              dynq_gemm_smoothed(p, NULL, DYNQ_DTYPE_F32, 0, k, sm, NULL, NULL, DYNQ_DTYPE_F32, n, &c));
    {
        float saved = sm[5];
        fill_sentinel(y2, m * n);
        sm[5] = 0.0f;
        EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "smoothing factor [5] is 0", "dynq_gemm_smoothed(factor 0)",
               dynq_gemm_smoothed(p, a, DYNQ_DTYPE_F32, m, k, sm, bias, y2, DYNQ_DTYPE_F32, n, &c));
        EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "smoothing factor [5] is 0", "dynq_gemm_smoothed(m=0, factor 0)",
               dynq_gemm_smoothed(p, NULL, DYNQ_DTYPE_F32, 0, k, sm, NULL, NULL, DYNQ_DTYPE_F32, n, &c));
        sm[5] = -1.0f;
        EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "positive and finite", "dynq_gemm_smoothed(factor -1)",
               dynq_gemm_smoothed(p, a, DYNQ_DTYPE_F32, m, k, sm, bias, y2, DYNQ_DTYPE_F32, n, &c));
        sm[5] = saved;
        check(all_sentinel(y2, m * n), "y untouched after refused factors");
        a[3 * k + 10] = 3e38f;
        sm[10] = 4.0f;
        EXPECT(DYNQ_STATUS_NON_FINITE, "A[3][10]", "dynq_gemm_smoothed(product overflows)",
               dynq_gemm_smoothed(p, a, DYNQ_DTYPE_F32, m, k, sm, bias, y2, DYNQ_DTYPE_F32, n, &c));
        check(all_sentinel(y2, m * n), "y untouched after an overflowing product");
        EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "y overlaps smooth", "dynq_gemm_smoothed(y overlaps smooth)",
               dynq_gemm_smoothed(p, pre, DYNQ_DTYPE_F32, 1, k, y2, NULL, y2, DYNQ_DTYPE_F32, n, &c));
    }
    dynq_packed_weights_free(p);
    free(q);
    free(sw);
    free(bias);
    free(sm);
    free(a);
    free(pre);
    free(y1);
    free(y2);
}

/* dynq_gemm_residual: exactly dynq_gemm_smoothed followed by one float addition per element
   (in C, with FLT_EVAL_METHOD 0), at a residual stride above n; NULL residual =
   dynq_gemm_smoothed; a residual overlapping y, a stride below n and a NULL y refused. */
static void test_gemm_residual(void)
{
    const size_t m = 29, n = 45, k = 66, ldr = 51;
    int8_t *q = ALLOC(int8_t, n * k);
    float *sw = ALLOC(float, n), *bias = ALLOC(float, n), *sm = ALLOC(float, k);
    float *a = ALLOC(float, m * k), *r = ALLOC(float, m * ldr);
    float *y1 = ALLOC(float, m * n), *y2 = ALLOC(float, m * n);
    dynq_gemm_config c = gemm_cfg(0, 0, 2 /* GELU */, 2);
    dynq_packed_weights *p;
    size_t i, j;
    int same = 1;
    random_q(q, n * k);
    for (j = 0; j < n; j++) {
        sw[j] = 0.003f * (float)(j % 11 + 1);
        bias[j] = rnd_f();
    }
    for (j = 0; j < k; j++) {
        sm[j] = 0.5f + 0.125f * (float)(j % 9);
    }
    for (i = 0; i < m * ldr; i++) {
        r[i] = 4.0f * rnd_f();
    }
    random_a(a, m, k, k, 0);
    p = pack_q(q, n, k, sw, n);
    EXPECT_OK("dynq_gemm_smoothed", dynq_gemm_smoothed(p, a, DYNQ_DTYPE_F32, m, k, sm, bias, y1, DYNQ_DTYPE_F32, n, &c));
    EXPECT_OK("dynq_gemm_residual",
              dynq_gemm_residual(p, a, DYNQ_DTYPE_F32, m, k, sm, bias, r, ldr, y2, DYNQ_DTYPE_F32, n, &c));
    for (i = 0; i < m; i++) {
        for (j = 0; j < n; j++) {
            float want = y1[i * n + j] + r[i * ldr + j];
            same &= memcmp(&want, &y2[i * n + j], sizeof want) == 0;
        }
    }
    check(same, "dynq_gemm_residual equals dynq_gemm_smoothed plus the residual, bit for bit");
    EXPECT_OK("dynq_gemm_residual(residual=NULL)",
              dynq_gemm_residual(p, a, DYNQ_DTYPE_F32, m, k, sm, bias, NULL, 0, y2, DYNQ_DTYPE_F32, n, &c));
    check(memcmp(y1, y2, m * n * sizeof(float)) == 0, "dynq_gemm_residual with no residual equals dynq_gemm_smoothed");
    EXPECT_OK("dynq_gemm_residual(m=0)",
              dynq_gemm_residual(p, NULL, DYNQ_DTYPE_F32, 0, k, NULL, NULL, NULL, n, NULL, DYNQ_DTYPE_F32, n, &c));
    fill_sentinel(y2, m * n);
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "row stride 44 is smaller", "dynq_gemm_residual(ldr < n)",
           dynq_gemm_residual(p, a, DYNQ_DTYPE_F32, m, k, sm, bias, r, n - 1, y2, DYNQ_DTYPE_F32, n, &c));
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "y overlaps residual", "dynq_gemm_residual(residual = y)",
           dynq_gemm_residual(p, a, DYNQ_DTYPE_F32, m, k, sm, bias, y2, n, y2, DYNQ_DTYPE_F32, n, &c));
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "y overlaps residual", "dynq_gemm_residual(residual overlaps y)",
           dynq_gemm_residual(p, a, DYNQ_DTYPE_F32, 2, k, sm, bias, y2 + n, n, y2, DYNQ_DTYPE_F32, n, &c));
    check(all_sentinel(y2, m * n), "y untouched after a refused residual");
    EXPECT(DYNQ_STATUS_NULL_POINTER, "y", "dynq_gemm_residual(y=NULL)",
           dynq_gemm_residual(p, a, DYNQ_DTYPE_F32, m, k, sm, bias, r, ldr, NULL, DYNQ_DTYPE_F32, n, &c));
    dynq_packed_weights_free(p);
    free(q);
    free(sw);
    free(bias);
    free(sm);
    free(a);
    free(r);
    free(y1);
    free(y2);
}

/* dynq's layer norm, its documented definition in C (FLT_EVAL_METHOD 0, no contraction): 64 lane
   sums in order, a halving tree, the mean m0, the same for the deviations from m0 (mean = m0 +
   their sum / n), the same for the squared deviations from mean, then
   ((x - mean) * inv) * scale + bias with inv = 1 / sqrt(var + eps). */
static float ln_lane_tree(float *s)
{
    size_t w, l;
    for (w = 32; w > 0; w /= 2) {
        for (l = 0; l < w; l++) {
            s[l] = s[l] + s[l + w];
        }
    }
    return s[0];
}

static void ln_reference(float *x, size_t n, const float *scale, const float *bias, float eps)
{
    float s[64], m0, mean, var, inv;
    size_t j;
    memset(s, 0, sizeof s);
    for (j = 0; j < n; j++) {
        s[j % 64] = s[j % 64] + x[j];
    }
    m0 = ln_lane_tree(s) / (float)n;
    memset(s, 0, sizeof s);
    for (j = 0; j < n; j++) {
        s[j % 64] = s[j % 64] + (x[j] - m0);
    }
    mean = m0 + ln_lane_tree(s) / (float)n;
    memset(s, 0, sizeof s);
    for (j = 0; j < n; j++) {
        float d = x[j] - mean;
        s[j % 64] = s[j % 64] + d * d;
    }
    var = ln_lane_tree(s) / (float)n;
    inv = 1.0f / sqrtf(var + eps);
    for (j = 0; j < n; j++) {
        float t = (x[j] - mean) * inv;
        t = t * scale[j];
        x[j] = bias ? t + bias[j] : t;
    }
}

/* dynq_gemm_layer_norm: exactly dynq_gemm_residual followed by the layer norm's definition on
   each row (a C re-implementation), with and without a bias and a residual, at an output stride
   above n (the padding untouched); bad parameters refused with y untouched. */
static void test_gemm_layer_norm(void)
{
    const size_t m = 37, n = 200, k = 48, ldr = 203, ldy = 205;
    int8_t *q = ALLOC(int8_t, n * k);
    float *sw = ALLOC(float, n), *bias = ALLOC(float, n), *g = ALLOC(float, n), *b = ALLOC(float, n);
    float *a = ALLOC(float, m * k), *r = ALLOC(float, m * ldr);
    float *y1 = ALLOC(float, m * ldy), *y2 = ALLOC(float, m * ldy);
    dynq_gemm_config c = gemm_cfg(0, 0, 2 /* GELU */, 2);
    dynq_packed_weights *p;
    size_t i, j, v;
    random_q(q, n * k);
    for (j = 0; j < n; j++) {
        sw[j] = 0.003f * (float)(j % 11 + 1);
        bias[j] = rnd_f();
        g[j] = 1.0f + 0.5f * rnd_f();
        b[j] = rnd_f();
    }
    for (i = 0; i < m * ldr; i++) {
        r[i] = 4.0f * rnd_f();
    }
    random_a(a, m, k, k, 0);
    p = pack_q(q, n, k, sw, n);
    for (v = 0; v < 2; v++) {
        const float *res = v == 0 ? r : NULL;
        const float *lb = v == 0 ? b : NULL;
        int same = 1, pad = 1;
        EXPECT_OK("dynq_gemm_residual",
                  dynq_gemm_residual(p, a, DYNQ_DTYPE_F32, m, k, NULL, bias, res, ldr, y1, DYNQ_DTYPE_F32, ldy, &c));
        for (i = 0; i < m; i++) {
            ln_reference(y1 + i * ldy, n, g, lb, 1e-5f);
        }
        fill_sentinel(y2, m * ldy);
        EXPECT_OK("dynq_gemm_layer_norm", dynq_gemm_layer_norm(p, a, DYNQ_DTYPE_F32, m, k, NULL, bias, res, ldr, g, lb, 1e-5f,
                                                              y2, DYNQ_DTYPE_F32, ldy, &c));
        for (i = 0; i < m; i++) {
            same &= memcmp(y1 + i * ldy, y2 + i * ldy, n * sizeof(float)) == 0;
            pad &= all_sentinel(y2 + i * ldy + n, ldy - n);
        }
        check(same, v == 0 ? "dynq_gemm_layer_norm equals dynq_gemm_residual then the layer norm's definition, bit for bit"
                           : "dynq_gemm_layer_norm without residual and bias equals its definition, bit for bit");
        check(pad, "dynq_gemm_layer_norm leaves the stride padding alone");
    }
    fill_sentinel(y2, m * ldy);
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "ln_scale is NULL", "dynq_gemm_layer_norm(ln_scale=NULL)",
           dynq_gemm_layer_norm(p, a, DYNQ_DTYPE_F32, m, k, NULL, bias, r, ldr, NULL, b, 1e-5f, y2, DYNQ_DTYPE_F32, ldy, &c));
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "epsilon", "dynq_gemm_layer_norm(ln_epsilon=-1)",
           dynq_gemm_layer_norm(p, a, DYNQ_DTYPE_F32, m, k, NULL, bias, r, ldr, g, b, -1.0f, y2, DYNQ_DTYPE_F32, ldy, &c));
    g[3] = (float)INFINITY;
    EXPECT(DYNQ_STATUS_NON_FINITE, "gamma[3]", "dynq_gemm_layer_norm(ln_scale with infinity)",
           dynq_gemm_layer_norm(p, a, DYNQ_DTYPE_F32, m, k, NULL, bias, r, ldr, g, b, 1e-5f, y2, DYNQ_DTYPE_F32, ldy, &c));
    g[3] = 1.0f;
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "y overlaps ln_scale", "dynq_gemm_layer_norm(ln_scale inside y)",
           dynq_gemm_layer_norm(p, a, DYNQ_DTYPE_F32, m, k, NULL, bias, r, ldr, y2 + ldy, b, 1e-5f, y2, DYNQ_DTYPE_F32, ldy, &c));
    check(all_sentinel(y2, m * ldy), "y untouched after a refused layer norm");
    /* An empty batch still has its parameters checked. */
    g[0] = (float)NAN;
    EXPECT(DYNQ_STATUS_NON_FINITE, "gamma[0]", "dynq_gemm_layer_norm(m=0, NaN in ln_scale)",
           dynq_gemm_layer_norm(p, NULL, DYNQ_DTYPE_F32, 0, k, NULL, NULL, NULL, n, g, NULL, 1e-5f, NULL, DYNQ_DTYPE_F32, n, &c));
    g[0] = 1.0f;
    EXPECT_OK("dynq_gemm_layer_norm(m=0)",
              dynq_gemm_layer_norm(p, NULL, DYNQ_DTYPE_F32, 0, k, NULL, NULL, NULL, n, g, NULL, 1e-5f, NULL, DYNQ_DTYPE_F32, n, &c));
    dynq_packed_weights_free(p);
    free(q);
    free(sw);
    free(bias);
    free(g);
    free(b);
    free(a);
    free(r);
    free(y1);
    free(y2);
}

/* dynq_gemm_split: each output holds exactly its columns of dynq_gemm_smoothed (widths off the
   kernels' panel widths, strides above the widths, f32 and f16 outputs); bad widths, strides,
   overlapping or NULL outputs refused with every output untouched. */
static void test_gemm_split(void)
{
    const size_t m = 23, n = 61, k = 40;
    const size_t w0 = 5, w1 = 39, w2 = 17;
    int8_t *q = ALLOC(int8_t, n * k);
    float *sw = ALLOC(float, n), *bias = ALLOC(float, n), *sm = ALLOC(float, k);
    float *a = ALLOC(float, m * k), *whole = ALLOC(float, m * n);
    float *y0 = ALLOC(float, m * (w0 + 1)), *y1 = ALLOC(float, m * (w1 + 2)), *y2 = ALLOC(float, m * w2);
    uint16_t *h = ALLOC(uint16_t, m * n), *h0 = ALLOC(uint16_t, m * 30), *h1 = ALLOC(uint16_t, m * 31);
    dynq_gemm_config c = gemm_cfg(0, 0, 2 /* GELU */, 2);
    dynq_packed_weights *p;
    dynq_output outs[3];
    size_t i, j;
    int same = 1;
    random_q(q, n * k);
    for (j = 0; j < n; j++) {
        sw[j] = 0.003f * (float)(j % 7 + 1);
        bias[j] = rnd_f();
    }
    for (j = 0; j < k; j++) {
        sm[j] = 0.75f + 0.125f * (float)(j % 5);
    }
    random_a(a, m, k, k, 0);
    p = pack_q(q, n, k, sw, n);
    EXPECT_OK("dynq_gemm_smoothed", dynq_gemm_smoothed(p, a, DYNQ_DTYPE_F32, m, k, sm, bias, whole, DYNQ_DTYPE_F32, n, &c));
    outs[0].y = y0; outs[0].ldy = w0 + 1; outs[0].cols = w0;
    outs[1].y = y1; outs[1].ldy = w1 + 2; outs[1].cols = w1;
    outs[2].y = y2; outs[2].ldy = w2; outs[2].cols = w2;
    EXPECT_OK("dynq_gemm_split", dynq_gemm_split(p, a, DYNQ_DTYPE_F32, m, k, sm, bias, outs, 3, DYNQ_DTYPE_F32, &c));
    for (i = 0; i < m; i++) {
        for (j = 0; j < n; j++) {
            const float *src = j < w0 ? &y0[i * (w0 + 1) + j] : j < w0 + w1 ? &y1[i * (w1 + 2) + j - w0] : &y2[i * w2 + j - w0 - w1];
            same &= memcmp(src, &whole[i * n + j], sizeof(float)) == 0;
        }
    }
    check(same, "dynq_gemm_split outputs are the columns of dynq_gemm_smoothed, bit for bit");
    /* f16 output in two halves. */
    EXPECT_OK("dynq_gemm_smoothed(f16)", dynq_gemm_smoothed(p, a, DYNQ_DTYPE_F32, m, k, sm, bias, h, DYNQ_DTYPE_F16, n, &c));
    outs[0].y = h0; outs[0].ldy = 30; outs[0].cols = 30;
    outs[1].y = h1; outs[1].ldy = 31; outs[1].cols = 31;
    EXPECT_OK("dynq_gemm_split(f16)", dynq_gemm_split(p, a, DYNQ_DTYPE_F32, m, k, sm, bias, outs, 2, DYNQ_DTYPE_F16, &c));
    same = 1;
    for (i = 0; i < m; i++) {
        for (j = 0; j < n; j++) {
            same &= (j < 30 ? h0[i * 30 + j] : h1[i * 31 + j - 30]) == h[i * n + j];
        }
    }
    check(same, "dynq_gemm_split f16 outputs are the columns of dynq_gemm_smoothed");
    /* Refused, outputs untouched. */
    fill_sentinel(y0, m * (w0 + 1));
    fill_sentinel(y1, m * (w1 + 2));
    outs[0].y = y0; outs[0].ldy = w0 + 1; outs[0].cols = w0;
    outs[1].y = y1; outs[1].ldy = w1 + w2 - 1; outs[1].cols = w1 + w2 - 1; /* refused before any write */
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "must add up to n = 61", "dynq_gemm_split(widths 5 + 55)",
           dynq_gemm_split(p, a, DYNQ_DTYPE_F32, m, k, sm, bias, outs, 2, DYNQ_DTYPE_F32, &c));
    outs[1].cols = 0;
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "outputs[1].cols is 0", "dynq_gemm_split(width 0)",
           dynq_gemm_split(p, a, DYNQ_DTYPE_F32, m, k, sm, bias, outs, 2, DYNQ_DTYPE_F32, &c));
    outs[1].cols = n - w0;
    outs[1].ldy = n - w0 - 1;
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "outputs[1]: row stride", "dynq_gemm_split(ldy < cols)",
           dynq_gemm_split(p, a, DYNQ_DTYPE_F32, m, k, sm, bias, outs, 2, DYNQ_DTYPE_F32, &c));
    outs[1].ldy = n - w0;
    outs[1].y = y0 + 2;
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "outputs[1].y overlaps outputs[0].y", "dynq_gemm_split(overlapping outputs)",
           dynq_gemm_split(p, a, DYNQ_DTYPE_F32, 1, k, sm, bias, outs, 2, DYNQ_DTYPE_F32, &c));
    outs[1].y = NULL;
    EXPECT(DYNQ_STATUS_NULL_POINTER, "outputs[1].y", "dynq_gemm_split(NULL y)",
           dynq_gemm_split(p, a, DYNQ_DTYPE_F32, m, k, sm, bias, outs, 2, DYNQ_DTYPE_F32, &c));
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "num_outputs is 0", "dynq_gemm_split(no outputs)",
           dynq_gemm_split(p, a, DYNQ_DTYPE_F32, m, k, sm, bias, outs, 0, DYNQ_DTYPE_F32, &c));
    EXPECT(DYNQ_STATUS_NULL_POINTER, "outputs", "dynq_gemm_split(outputs=NULL)",
           dynq_gemm_split(p, a, DYNQ_DTYPE_F32, m, k, sm, bias, NULL, 2, DYNQ_DTYPE_F32, &c));
    check(all_sentinel(y0, m * (w0 + 1)) && all_sentinel(y1, m * (w1 + 2)), "outputs untouched after refused calls");
    dynq_packed_weights_free(p);
    free(q);
    free(sw);
    free(bias);
    free(sm);
    free(a);
    free(whole);
    free(y0);
    free(y1);
    free(y2);
    free(h);
    free(h0);
    free(h1);
}

/* dynq_gemm_split_heads: Q, K and V side by side (12 heads of 16, 3 of 12 and a plain output),
   written as [batch, heads, seq, d], [batch, heads, d, seq] and rows: every element is the bit
   pattern of dynq_gemm_smoothed at its place; NULL heads is dynq_gemm_split; bad layouts refused
   with every output untouched. */
static void test_gemm_split_heads(void)
{
    const size_t batch = 3, seq = 7, m = batch * seq, k = 40;
    const size_t w0 = 192, w1 = 36, w2 = 29, n = w0 + w1 + w2;
    const size_t hd0 = 12, hd1 = 3;
    int8_t *q = ALLOC(int8_t, n * k);
    float *sw = ALLOC(float, n), *bias = ALLOC(float, n), *sm = ALLOC(float, k);
    float *a = ALLOC(float, m * k), *whole = ALLOC(float, m * n);
    float *y0 = ALLOC(float, m * w0), *y1 = ALLOC(float, m * w1), *y2 = ALLOC(float, m * w2);
    dynq_gemm_config c = gemm_cfg(0, 0, 2 /* GELU */, 2);
    dynq_packed_weights *p;
    dynq_output outs[3];
    dynq_heads hs[3];
    size_t i, j;
    int same = 1;
    random_q(q, n * k);
    for (j = 0; j < n; j++) {
        sw[j] = 0.002f * (float)(j % 9 + 1);
        bias[j] = rnd_f();
    }
    for (j = 0; j < k; j++) {
        sm[j] = 0.5f + 0.25f * (float)(j % 3);
    }
    random_a(a, m, k, k, 0);
    p = pack_q(q, n, k, sw, n);
    EXPECT_OK("dynq_gemm_smoothed", dynq_gemm_smoothed(p, a, DYNQ_DTYPE_F32, m, k, sm, bias, whole, DYNQ_DTYPE_F32, n, &c));
    outs[0].y = y0; outs[0].ldy = w0; outs[0].cols = w0;
    outs[1].y = y1; outs[1].ldy = w1; outs[1].cols = w1;
    outs[2].y = y2; outs[2].ldy = w2; outs[2].cols = w2;
    memset(hs, 0, sizeof hs);
    hs[0].heads = hd0; hs[0].seq = seq; hs[0].transposed = 0;
    hs[1].heads = hd1; hs[1].seq = seq; hs[1].transposed = 1;
    EXPECT_OK("dynq_gemm_split_heads", dynq_gemm_split_heads(p, a, DYNQ_DTYPE_F32, m, k, sm, bias, outs, hs, 3, DYNQ_DTYPE_F32, &c));
    for (i = 0; i < m; i++) {
        const size_t b = i / seq, t = i % seq;
        for (j = 0; j < n; j++) {
            const float *src;
            if (j < w0) {
                const size_t d = w0 / hd0, h = j / d, e = j % d;
                src = &y0[((b * hd0 + h) * seq + t) * d + e];
            } else if (j < w0 + w1) {
                const size_t d = w1 / hd1, h = (j - w0) / d, e = (j - w0) % d;
                src = &y1[((b * hd1 + h) * d + e) * seq + t];
            } else {
                src = &y2[i * w2 + j - w0 - w1];
            }
            same &= memcmp(src, &whole[i * n + j], sizeof(float)) == 0;
        }
    }
    check(same, "dynq_gemm_split_heads outputs hold dynq_gemm_smoothed's bits at their head-layout places");
    /* NULL heads: the plain layouts of dynq_gemm_split. */
    EXPECT_OK("dynq_gemm_split_heads(heads=NULL)", dynq_gemm_split_heads(p, a, DYNQ_DTYPE_F32, m, k, sm, bias, outs, NULL, 3, DYNQ_DTYPE_F32, &c));
    same = 1;
    for (i = 0; i < m; i++) {
        same &= memcmp(&y0[i * w0], &whole[i * n], w0 * sizeof(float)) == 0;
    }
    check(same, "dynq_gemm_split_heads with heads=NULL writes rows");
    /* Refused, outputs untouched. */
    fill_sentinel(y0, m * w0);
    fill_sentinel(y1, m * w1);
    hs[0].seq = 5;
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "not whole sequences of 5", "dynq_gemm_split_heads(seq not dividing m)",
           dynq_gemm_split_heads(p, a, DYNQ_DTYPE_F32, m, k, sm, bias, outs, hs, 3, DYNQ_DTYPE_F32, &c));
    hs[0].seq = 0;
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "must be positive", "dynq_gemm_split_heads(seq 0)",
           dynq_gemm_split_heads(p, a, DYNQ_DTYPE_F32, m, k, sm, bias, outs, hs, 3, DYNQ_DTYPE_F32, &c));
    hs[0].seq = seq;
    hs[0].heads = 5;
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "do not split into 5 heads", "dynq_gemm_split_heads(heads not dividing cols)",
           dynq_gemm_split_heads(p, a, DYNQ_DTYPE_F32, m, k, sm, bias, outs, hs, 3, DYNQ_DTYPE_F32, &c));
    hs[0].heads = hd0;
    hs[1].transposed = 2;
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "transposed must be 0 or 1", "dynq_gemm_split_heads(transposed 2)",
           dynq_gemm_split_heads(p, a, DYNQ_DTYPE_F32, m, k, sm, bias, outs, hs, 3, DYNQ_DTYPE_F32, &c));
    hs[1].transposed = 1;
    hs[1].reserved = 1;
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "reserved 0", "dynq_gemm_split_heads(reserved 1)",
           dynq_gemm_split_heads(p, a, DYNQ_DTYPE_F32, m, k, sm, bias, outs, hs, 3, DYNQ_DTYPE_F32, &c));
    hs[1].reserved = 0;
    outs[0].ldy = w0 + 1;
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "must equal cols", "dynq_gemm_split_heads(ldy != cols)",
           dynq_gemm_split_heads(p, a, DYNQ_DTYPE_F32, m, k, sm, bias, outs, hs, 3, DYNQ_DTYPE_F32, &c));
    outs[0].ldy = w0;
    check(all_sentinel(y0, m * w0) && all_sentinel(y1, m * w1), "head-layout outputs untouched after refused calls");
    dynq_packed_weights_free(p);
    free(q);
    free(sw);
    free(bias);
    free(sm);
    free(a);
    free(whole);
    free(y0);
    free(y1);
    free(y2);
}

/* Every pointer argument NULL. */
static void test_null_pointers(void)
{
    float w[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    int8_t q[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    float s[2] = {0.5f, 0.25f};
    float a[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    float y[4];
    dynq_packed_weights *p = NULL;
    dynq_packed_weights *out = (dynq_packed_weights *)(void *)w; /* non-NULL garbage */
    dynq_packed_weights_info info;
    size_t written = 12345;
    uint8_t blob[256];
    dynq_gemm_config gc = gemm_cfg(0, 0, 0, 1);

    EXPECT(DYNQ_STATUS_NULL_POINTER, "w", "dynq_pack_weights(w=NULL)",
           dynq_pack_weights(NULL, 2, 4, DYNQ_WEIGHT_LAYOUT_NK, NULL, &out));
    check(out == NULL, "dynq_pack_weights(w=NULL) sets *out = NULL");
    EXPECT(DYNQ_STATUS_NULL_POINTER, "out", "dynq_pack_weights(out=NULL)",
           dynq_pack_weights(w, 2, 4, DYNQ_WEIGHT_LAYOUT_NK, NULL, NULL));
    EXPECT_OK("dynq_pack_weights(config=NULL)", dynq_pack_weights(w, 2, 4, DYNQ_WEIGHT_LAYOUT_NK, NULL, &p));
    check(p != NULL, "config NULL: a handle was returned");

    out = (dynq_packed_weights *)(void *)w;
    EXPECT(DYNQ_STATUS_NULL_POINTER, "q", "dynq_pack_quantized_weights(q=NULL)",
           dynq_pack_quantized_weights(NULL, 2, 4, DYNQ_WEIGHT_LAYOUT_NK, s, 2, NULL, &out));
    check(out == NULL, "dynq_pack_quantized_weights(q=NULL) sets *out = NULL");
    EXPECT(DYNQ_STATUS_NULL_POINTER, "scales", "dynq_pack_quantized_weights(scales=NULL)",
           dynq_pack_quantized_weights(q, 2, 4, DYNQ_WEIGHT_LAYOUT_NK, NULL, 2, NULL, &out));
    EXPECT(DYNQ_STATUS_NULL_POINTER, "out", "dynq_pack_quantized_weights(out=NULL)",
           dynq_pack_quantized_weights(q, 2, 4, DYNQ_WEIGHT_LAYOUT_NK, s, 2, NULL, NULL));
    {
        dynq_packed_weights *p2 = NULL;
        EXPECT_OK("dynq_pack_quantized_weights(config=NULL)",
                  dynq_pack_quantized_weights(q, 2, 4, DYNQ_WEIGHT_LAYOUT_NK, s, 2, NULL, &p2));
        dynq_packed_weights_free(p2);
    }

    memset(&info, 0, sizeof info);
    info.struct_size = (uint32_t)sizeof info;
    EXPECT(DYNQ_STATUS_NULL_POINTER, "packed", "dynq_packed_weights_get_info(packed=NULL)",
           dynq_packed_weights_get_info(NULL, &info));
    EXPECT(DYNQ_STATUS_NULL_POINTER, "info", "dynq_packed_weights_get_info(info=NULL)",
           dynq_packed_weights_get_info(p, NULL));

    EXPECT(DYNQ_STATUS_NULL_POINTER, "packed", "dynq_packed_weights_serialize(packed=NULL)",
           dynq_packed_weights_serialize(NULL, blob, sizeof blob, &written));
    EXPECT(DYNQ_STATUS_NULL_POINTER, "written", "dynq_packed_weights_serialize(written=NULL)",
           dynq_packed_weights_serialize(p, blob, sizeof blob, NULL));
    EXPECT(DYNQ_STATUS_NULL_POINTER, "written", "dynq_packed_weights_serialize(buf=NULL, written=NULL)",
           dynq_packed_weights_serialize(p, NULL, 0, NULL));

    out = (dynq_packed_weights *)(void *)w;
    EXPECT(DYNQ_STATUS_NULL_POINTER, "buf", "dynq_packed_weights_deserialize(buf=NULL)",
           dynq_packed_weights_deserialize(NULL, 100, NULL, &out));
    check(out == NULL, "dynq_packed_weights_deserialize(buf=NULL) sets *out = NULL");
    EXPECT(DYNQ_STATUS_NULL_POINTER, "buf", "dynq_packed_weights_deserialize(buf=NULL, len=0)",
           dynq_packed_weights_deserialize(NULL, 0, NULL, &out));
    EXPECT(DYNQ_STATUS_NULL_POINTER, "out", "dynq_packed_weights_deserialize(out=NULL)",
           dynq_packed_weights_deserialize(blob, sizeof blob, NULL, NULL));

    fill_sentinel(y, 4);
    EXPECT(DYNQ_STATUS_NULL_POINTER, "packed", "dynq_gemm(packed=NULL)",
           dynq_gemm(NULL, a, 2, 4, NULL, y, 2, &gc));
    EXPECT(DYNQ_STATUS_NULL_POINTER, "a", "dynq_gemm(a=NULL, m=2)", dynq_gemm(p, NULL, 2, 4, NULL, y, 2, &gc));
    EXPECT(DYNQ_STATUS_NULL_POINTER, "y", "dynq_gemm(y=NULL, m=2)", dynq_gemm(p, a, 2, 4, NULL, NULL, 2, &gc));
    EXPECT(DYNQ_STATUS_NULL_POINTER, "packed", "dynq_gemm(packed=NULL, m=0)",
           dynq_gemm(NULL, NULL, 0, 4, NULL, NULL, 2, &gc));
    check(all_sentinel(y, 4), "y untouched by the failed calls");
    EXPECT_OK("dynq_gemm(bias=NULL, config=NULL)", dynq_gemm(p, a, 2, 4, NULL, y, 2, NULL));

    EXPECT(DYNQ_STATUS_NULL_POINTER, "isa", "dynq_active_isa(NULL)", dynq_active_isa(NULL));
    EXPECT(DYNQ_STATUS_NULL_POINTER, "config", "dynq_pack_config_init(NULL)", (dynq_pack_config_init)(NULL));
    EXPECT(DYNQ_STATUS_NULL_POINTER, "config", "dynq_pack_config_init_sized(NULL, sizeof)",
           dynq_pack_config_init_sized(NULL, sizeof(dynq_pack_config)));
    EXPECT(DYNQ_STATUS_NULL_POINTER, "config", "dynq_gemm_config_init(NULL)", dynq_gemm_config_init(NULL));
    {
        size_t l1 = dynq_last_error_message(NULL, 0);
        size_t l2 = dynq_last_error_message(NULL, 100);
        check(l1 > 0 && l1 == l2, "dynq_last_error_message(NULL, 100) only returns the length (%zu)", l2);
    }
    dynq_packed_weights_free(p);
}

static void test_invalid_arguments(void)
{
    const size_t n = 4, k = 6;
    float w[24];
    int8_t q[24];
    float s[4] = {0.1f, 0.2f, 0.3f, 0.4f};
    float a[3 * 8];
    float y[3 * 6];
    float big[64];
    dynq_packed_weights *p, *out = NULL;
    dynq_pack_config pc;
    dynq_gemm_config gc;
    dynq_packed_weights_info info;
    uint8_t *blob;
    size_t blob_len, i;

    for (i = 0; i < 24; i++) {
        w[i] = rnd_f();
        q[i] = (int8_t)((int)(i * 7 % 255) - 127);
        a[i] = rnd_f();
    }
    p = pack_q(q, n, k, s, n);
    blob = serialize_new(p, &blob_len);

    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "n=0", "dynq_pack_weights(n=0)",
           dynq_pack_weights(w, 0, k, DYNQ_WEIGHT_LAYOUT_NK, NULL, &out));
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "k=0", "dynq_pack_weights(k=0)",
           dynq_pack_weights(w, n, 0, DYNQ_WEIGHT_LAYOUT_NK, NULL, &out));
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "layout", "dynq_pack_weights(layout=2)",
           dynq_pack_weights(w, n, k, 2u, NULL, &out));
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "layout", "dynq_pack_weights(layout=0xFFFFFFFF)",
           dynq_pack_weights(w, n, k, 0xFFFFFFFFu, NULL, &out));
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "n=0", "dynq_pack_quantized_weights(n=0)",
           dynq_pack_quantized_weights(q, 0, k, DYNQ_WEIGHT_LAYOUT_NK, s, 1, NULL, &out));
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "k=0", "dynq_pack_quantized_weights(k=0)",
           dynq_pack_quantized_weights(q, n, 0, DYNQ_WEIGHT_LAYOUT_NK, s, n, NULL, &out));
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "layout", "dynq_pack_quantized_weights(layout=2)",
           dynq_pack_quantized_weights(q, n, k, 2u, s, n, NULL, &out));

    pc = pack_cfg(2u, 0);
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "granularity", "dynq_pack_weights(config granularity=2)",
           dynq_pack_weights(w, n, k, DYNQ_WEIGHT_LAYOUT_NK, &pc, &out));
    pc = pack_cfg(0, 9u);
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "isa", "dynq_pack_weights(config isa=9)",
           dynq_pack_weights(w, n, k, DYNQ_WEIGHT_LAYOUT_NK, &pc, &out));
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "isa", "dynq_pack_quantized_weights(config isa=9)",
           dynq_pack_quantized_weights(q, n, k, DYNQ_WEIGHT_LAYOUT_NK, s, n, &pc, &out));
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "isa", "dynq_packed_weights_deserialize(config isa=9)",
           dynq_packed_weights_deserialize(blob, blob_len, &pc, &out));
    pc = pack_cfg(0, 0);
    pc.weight_qmax = 128;
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "weight_qmax", "dynq_pack_weights(config weight_qmax=128)",
           dynq_pack_weights(w, n, k, DYNQ_WEIGHT_LAYOUT_NK, &pc, &out));
    pc = pack_cfg(0, 0);
    /* sizeof - 4 is the struct's first layout (12 bytes), still accepted: - 8 is no layout. */
    pc.struct_size = (uint32_t)sizeof pc - 8;
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "struct_size", "dynq_pack_weights(config struct_size too small)",
           dynq_pack_weights(w, n, k, DYNQ_WEIGHT_LAYOUT_NK, &pc, &out));
    pc.struct_size = (uint32_t)sizeof pc + 4;
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "struct_size", "dynq_pack_weights(config struct_size too large)",
           dynq_pack_weights(w, n, k, DYNQ_WEIGHT_LAYOUT_NK, &pc, &out));
    pc.struct_size = 0;
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "struct_size", "dynq_pack_quantized_weights(config struct_size=0)",
           dynq_pack_quantized_weights(q, n, k, DYNQ_WEIGHT_LAYOUT_NK, s, n, &pc, &out));
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "struct_size", "dynq_packed_weights_deserialize(config struct_size=0)",
           dynq_packed_weights_deserialize(blob, blob_len, &pc, &out));

    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "num_scales", "dynq_pack_quantized_weights(num_scales=2, n=4)",
           dynq_pack_quantized_weights(q, n, k, DYNQ_WEIGHT_LAYOUT_NK, s, 2, NULL, &out));
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "num_scales", "dynq_pack_quantized_weights(num_scales=0)",
           dynq_pack_quantized_weights(q, n, k, DYNQ_WEIGHT_LAYOUT_NK, s, 0, NULL, &out));
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "num_scales", "dynq_pack_quantized_weights(num_scales=n+1)",
           dynq_pack_quantized_weights(q, n, k, DYNQ_WEIGHT_LAYOUT_NK, s, n + 1, NULL, &out));
    {
        float neg[4] = {0.1f, -0.2f, 0.3f, 0.4f};
        float negone = -1.0f;
        EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "scale 1", "dynq_pack_quantized_weights(scales[1] = -0.2)",
               dynq_pack_quantized_weights(q, n, k, DYNQ_WEIGHT_LAYOUT_NK, neg, n, NULL, &out));
        EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "scale 0", "dynq_pack_quantized_weights(1 scale = -1)",
               dynq_pack_quantized_weights(q, n, k, DYNQ_WEIGHT_LAYOUT_NK, &negone, 1, NULL, &out));
    }

    /* Misaligned pointers (an address one byte off; never dereferenced by this program). */
    {
        const float *mis = (const float *)(const void *)((const char *)big + 1);
        EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "align", "dynq_pack_weights(w misaligned)",
               dynq_pack_weights(mis, 2, 2, DYNQ_WEIGHT_LAYOUT_NK, NULL, &out));
        fill_sentinel(y, 18);
        gc = gemm_cfg(0, 0, 0, 1);
        EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "align", "dynq_gemm(a misaligned)",
               dynq_gemm(p, mis, 1, k, NULL, y, n, &gc));
        EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "align", "dynq_gemm(y misaligned)",
               dynq_gemm(p, a, 1, k, NULL, (float *)(void *)((char *)big + 1), n, &gc));
        check(all_sentinel(y, 18), "y untouched");
    }

    memset(&info, 0, sizeof info);
    info.struct_size = (uint32_t)sizeof info - 8;
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "struct_size", "dynq_packed_weights_get_info(struct_size wrong)",
           dynq_packed_weights_get_info(p, &info));
    check(info.n == 0 && info.kernel_name == NULL, "info untouched on failure");
    info.struct_size = 0;
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "struct_size", "dynq_packed_weights_get_info(struct_size=0)",
           dynq_packed_weights_get_info(p, &info));

    /* GEMM argument checks; y must stay untouched. */
    fill_sentinel(y, 18);
    gc = gemm_cfg(2u, 0, 0, 1);
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "act_granularity", "dynq_gemm(config act_granularity=2)",
           dynq_gemm(p, a, 3, 8, NULL, y, 6, &gc));
    gc = gemm_cfg(0, 2u, 0, 1);
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "act_type", "dynq_gemm(config act_type=2)",
           dynq_gemm(p, a, 3, 8, NULL, y, 6, &gc));
    gc = gemm_cfg(0, 0, 6u, 1);
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "epilogue", "dynq_gemm(config epilogue=6)",
           dynq_gemm(p, a, 3, 8, NULL, y, 6, &gc));
    gc = gemm_cfg(0, 0, 0, 1025u);
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "num_threads", "dynq_gemm(config num_threads=1025)",
           dynq_gemm(p, a, 3, 8, NULL, y, 6, &gc));
    gc = gemm_cfg(0, 0, 0, 0xFFFFFFFFu);
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "num_threads", "dynq_gemm(config num_threads=0xFFFFFFFF)",
           dynq_gemm(p, a, 3, 8, NULL, y, 6, &gc));
    gc = gemm_cfg(0, 0, 0, 1);
    gc.struct_size = 0;
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "struct_size", "dynq_gemm(config struct_size=0)",
           dynq_gemm(p, a, 3, 8, NULL, y, 6, &gc));
    gc.struct_size = (uint32_t)sizeof gc + 4;
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "struct_size", "dynq_gemm(config struct_size too large)",
           dynq_gemm(p, a, 3, 8, NULL, y, 6, &gc));
    gc = gemm_cfg(0, 0, 0, 1);
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "stride", "dynq_gemm(lda=5 < k=6)",
           dynq_gemm(p, a, 3, 5, NULL, y, 6, &gc));
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "stride", "dynq_gemm(ldy=3 < n=4)",
           dynq_gemm(p, a, 3, 8, NULL, y, 3, &gc));
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "stride", "dynq_gemm(lda < k with m=0)",
           dynq_gemm(p, NULL, 0, 5, NULL, NULL, 6, &gc));
    EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "stride", "dynq_gemm(lda=0)", dynq_gemm(p, a, 1, 0, NULL, y, 6, &gc));
    check(all_sentinel(y, 18), "y untouched by the failed GEMM calls");
    {
        /* Overlaps: a = buf[0..22), y = buf + 2 / the last element of a / bias inside y. */
        float *buf = ALLOC(float, 64);
        float *bias = ALLOC(float, 4);
        for (i = 0; i < 64; i++) {
            buf[i] = 0.5f;
        }
        EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "overlap", "dynq_gemm(y = a + 2, overlapping a)",
               dynq_gemm(p, buf, 3, 8, NULL, buf + 2, 6, &gc));
        EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "overlap", "dynq_gemm(y starts at the last element of a)",
               dynq_gemm(p, buf, 3, 8, NULL, buf + 2 * 8 + k - 1, 6, &gc));
        EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "overlap", "dynq_gemm(a starts at the last element of y)",
               dynq_gemm(p, buf + 2 * 6 + n - 1, 3, 8, NULL, buf, 6, &gc));
        EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "overlap", "dynq_gemm(y == a)", dynq_gemm(p, buf, 1, k, NULL, buf, n, &gc));
        EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "bias", "dynq_gemm(bias inside y)",
               dynq_gemm(p, a, 3, 8, buf + 30, buf + 28, 6, &gc));
        for (i = 0; i < 64; i++) {
            if (buf[i] != 0.5f) {
                break;
            }
        }
        check(i == 64, "overlapping buffers untouched by the failed calls");
        free(buf);
        free(bias);
    }

    free(blob);
    dynq_packed_weights_free(p);
}

static void test_size_overflow(void)
{
    float w[16] = {0};
    int8_t q[16] = {0};
    float s = 1.0f;
    float a[16] = {0};
    float y[16];
    uint8_t blob[64] = {0};
    dynq_packed_weights *out = (dynq_packed_weights *)(void *)w, *p;
    dynq_gemm_config gc = gemm_cfg(0, 0, 0, 1);
    const size_t huge = SIZE_MAX / 2;

    EXPECT(DYNQ_STATUS_SIZE_OVERFLOW, NULL, "dynq_pack_weights(n=SIZE_MAX/2, k=8)",
           dynq_pack_weights(w, huge, 8, DYNQ_WEIGHT_LAYOUT_NK, NULL, &out));
    check(out == NULL, "*out = NULL after SIZE_OVERFLOW");
    EXPECT(DYNQ_STATUS_SIZE_OVERFLOW, NULL, "dynq_pack_weights(n=SIZE_MAX/8, k=8: bytes overflow)",
           dynq_pack_weights(w, SIZE_MAX / 8, 8, DYNQ_WEIGHT_LAYOUT_NK, NULL, &out));
    EXPECT(DYNQ_STATUS_SIZE_OVERFLOW, NULL, "dynq_pack_quantized_weights(n=SIZE_MAX/2, k=8, 1 scale)",
           dynq_pack_quantized_weights(q, huge, 8, DYNQ_WEIGHT_LAYOUT_NK, &s, 1, NULL, &out));
    EXPECT(DYNQ_STATUS_SIZE_OVERFLOW, NULL, "dynq_packed_weights_deserialize(len=SIZE_MAX)",
           dynq_packed_weights_deserialize(blob, SIZE_MAX, NULL, &out));

    p = pack_q(q, 2, 8, &s, 1);
    fill_sentinel(y, 16);
    EXPECT(DYNQ_STATUS_SIZE_OVERFLOW, "a", "dynq_gemm(m=SIZE_MAX/2, lda=16)",
           dynq_gemm(p, a, huge, 16, NULL, y, 2, &gc));
    EXPECT(DYNQ_STATUS_SIZE_OVERFLOW, "a", "dynq_gemm(m=SIZE_MAX/16, lda=8: bytes overflow)",
           dynq_gemm(p, a, SIZE_MAX / 16, 8, NULL, y, 2, &gc));
    EXPECT(DYNQ_STATUS_SIZE_OVERFLOW, "a", "dynq_gemm(m=2, lda=SIZE_MAX/2)",
           dynq_gemm(p, a, 2, huge, NULL, y, 2, &gc));
    EXPECT(DYNQ_STATUS_SIZE_OVERFLOW, "y", "dynq_gemm(m=2, ldy=SIZE_MAX/2)",
           dynq_gemm(p, a, 2, 8, NULL, y, huge, &gc));
    check(all_sentinel(y, 16), "y untouched");
    dynq_packed_weights_free(p);
}

static void test_non_finite(void)
{
    const size_t n = 5, k = 7, m = 3, lda = 9, ldy = 6;
    float w[35], wkn[35];
    int8_t q[35];
    float s[5] = {0.1f, 0.2f, 0.3f, 0.4f, 0.5f};
    float a[3 * 9], bias[5];
    float y[3 * 6], yok[3 * 6];
    dynq_packed_weights *p, *out = NULL;
    dynq_gemm_config gc = gemm_cfg(0, 0, 0, 1);
    size_t i, j;
    const float fnan = f_from_bits(0x7FC00000u);
    const float finf = f_from_bits(0x7F800000u);

    for (i = 0; i < 35; i++) {
        w[i] = rnd_f();
        q[i] = (int8_t)((int)(i * 11 % 200) - 100);
    }
    for (j = 0; j < n; j++) {
        bias[j] = rnd_f();
    }
    random_a(a, m, k, lda, 0); /* padding columns hold NaN: must be ignored */
    p = pack_q(q, n, k, s, n);
    fill_sentinel(yok, 18);
    EXPECT_OK("dynq_gemm(NaN in the lda padding of a is ignored)", dynq_gemm(p, a, m, lda, bias, yok, ldy, &gc));

    w[2 * k + 1] = fnan;
    out = (dynq_packed_weights *)(void *)w;
    EXPECT(DYNQ_STATUS_NON_FINITE, "output channel 2, input 1", "dynq_pack_weights(NaN weight W[2][1], NK)",
           dynq_pack_weights(w, n, k, DYNQ_WEIGHT_LAYOUT_NK, NULL, &out));
    check(out == NULL, "*out = NULL after NON_FINITE");
    w[2 * k + 1] = 0.5f;
    for (i = 0; i < n; i++) {
        for (j = 0; j < k; j++) {
            wkn[j * n + i] = w[i * k + j];
        }
    }
    wkn[4 * n + 3] = -finf; /* W[3][4] */
    EXPECT(DYNQ_STATUS_NON_FINITE, "output channel 3, input 4", "dynq_pack_weights(-Inf weight W[3][4], KN)",
           dynq_pack_weights(wkn, n, k, DYNQ_WEIGHT_LAYOUT_KN, NULL, &out));
    {
        float s2[5] = {0.1f, fnan, 0.3f, 0.4f, 0.5f};
        EXPECT(DYNQ_STATUS_NON_FINITE, "scale 1", "dynq_pack_quantized_weights(NaN scale[1])",
               dynq_pack_quantized_weights(q, n, k, DYNQ_WEIGHT_LAYOUT_NK, s2, n, NULL, &out));
        s2[1] = 0.2f;
        s2[4] = finf;
        EXPECT(DYNQ_STATUS_NON_FINITE, "scale 4", "dynq_pack_quantized_weights(Inf scale[4])",
               dynq_pack_quantized_weights(q, n, k, DYNQ_WEIGHT_LAYOUT_NK, s2, n, NULL, &out));
        EXPECT(DYNQ_STATUS_NON_FINITE, "scale 0", "dynq_pack_quantized_weights(1 scale = NaN)",
               dynq_pack_quantized_weights(q, n, k, DYNQ_WEIGHT_LAYOUT_NK, &fnan, 1, NULL, &out));
    }

    a[1 * lda + 2] = finf;
    fill_sentinel(y, 18);
    EXPECT(DYNQ_STATUS_NON_FINITE, "A[1][2]", "dynq_gemm(Inf activation at A[1][2])",
           dynq_gemm(p, a, m, lda, bias, y, ldy, &gc));
    check(all_sentinel(y, 18), "y untouched after the Inf activation");
    gc = gemm_cfg(DYNQ_ACT_GRANULARITY_PER_TENSOR, DYNQ_ACT_TYPE_SYMMETRIC_I8, DYNQ_EPILOGUE_RELU, 2);
    EXPECT(DYNQ_STATUS_NON_FINITE, "A[1][2]", "dynq_gemm(Inf activation, per-tensor symmetric ReLU 2 threads)",
           dynq_gemm(p, a, m, lda, bias, y, ldy, &gc));
    check(all_sentinel(y, 18), "y untouched");
    a[1 * lda + 2] = 0.25f;
    a[2 * lda + 6] = -finf;
    gc = gemm_cfg(0, 0, 0, 1);
    EXPECT(DYNQ_STATUS_NON_FINITE, "A[2][6]", "dynq_gemm(-Inf activation at A[2][6], last element)",
           dynq_gemm(p, a, m, lda, bias, y, ldy, &gc));
    a[2 * lda + 6] = 0.25f;
    a[0] = fnan;
    EXPECT(DYNQ_STATUS_NON_FINITE, "A[0][0]", "dynq_gemm(NaN activation at A[0][0])",
           dynq_gemm(p, a, m, lda, bias, y, ldy, &gc));
    a[0] = 0.25f;
    check(all_sentinel(y, 18), "y untouched");
    bias[3] = fnan;
    EXPECT(DYNQ_STATUS_NON_FINITE, "bias[3]", "dynq_gemm(NaN bias[3])", dynq_gemm(p, a, m, lda, bias, y, ldy, &gc));
    bias[3] = 0.0f;
    bias[0] = -finf;
    EXPECT(DYNQ_STATUS_NON_FINITE, "bias[0]", "dynq_gemm(-Inf bias[0])", dynq_gemm(p, a, m, lda, bias, y, ldy, &gc));
    check(all_sentinel(y, 18), "y untouched after the non-finite bias");
    dynq_packed_weights_free(p);
}

static void test_unsupported_and_oom(void)
{
    float *w = ALLOC(float, 65537);
    int8_t *q = ALLOC(int8_t, 65537);
    float s = 0.5f;
    float tiny[8] = {0};
    int8_t tinyq[8] = {0};
    dynq_packed_weights *out = NULL, *p;
    dynq_pack_config pc;
    uint8_t *blob;
    size_t blob_len;
    char desc[200];

    EXPECT(DYNQ_STATUS_UNSUPPORTED, "65536", "dynq_pack_weights(n=1, k=65537)",
           dynq_pack_weights(w, 1, 65537, DYNQ_WEIGHT_LAYOUT_NK, NULL, &out));
    EXPECT(DYNQ_STATUS_UNSUPPORTED, "65536", "dynq_pack_quantized_weights(n=1, k=65537)",
           dynq_pack_quantized_weights(q, 1, 65537, DYNQ_WEIGHT_LAYOUT_NK, &s, 1, NULL, &out));
    EXPECT_OK("dynq_pack_weights(n=1, k=65536) (the maximum)",
              dynq_pack_weights(w, 1, 65536, DYNQ_WEIGHT_LAYOUT_KN, NULL, &out));
    dynq_packed_weights_free(out);
    out = NULL;

    p = pack_q(tinyq, 2, 4, &s, 1);
    blob = serialize_new(p, &blob_len);
    if (g_unavailable_isa != 0) {
        pc = pack_cfg(0, g_unavailable_isa);
        snprintf(desc, sizeof desc, "dynq_pack_weights(config isa=%s, unavailable here)",
                 dynq_isa_name(g_unavailable_isa));
        EXPECT(DYNQ_STATUS_UNSUPPORTED, dynq_isa_name(g_unavailable_isa), desc,
               dynq_pack_weights(tiny, 2, 4, DYNQ_WEIGHT_LAYOUT_NK, &pc, &out));
        snprintf(desc, sizeof desc, "dynq_pack_quantized_weights(config isa=%s)", dynq_isa_name(g_unavailable_isa));
        EXPECT(DYNQ_STATUS_UNSUPPORTED, dynq_isa_name(g_unavailable_isa), desc,
               dynq_pack_quantized_weights(tinyq, 2, 4, DYNQ_WEIGHT_LAYOUT_NK, &s, 1, &pc, &out));
        snprintf(desc, sizeof desc, "dynq_packed_weights_deserialize(config isa=%s)", dynq_isa_name(g_unavailable_isa));
        EXPECT(DYNQ_STATUS_UNSUPPORTED, dynq_isa_name(g_unavailable_isa), desc,
               dynq_packed_weights_deserialize(blob, blob_len, &pc, &out));
    }
    {
        /* An ISA of the other architecture family, explicitly. */
#if defined(__aarch64__) || defined(__arm__)
        uint32_t foreign = DYNQ_ISA_AVX512_VNNI;
#else
        uint32_t foreign = DYNQ_ISA_NEON_I8MM;
#endif
        if (dynq_isa_available(foreign) == 0) {
            pc = pack_cfg(0, foreign);
            snprintf(desc, sizeof desc, "dynq_pack_weights(config isa=%s, foreign ISA)", dynq_isa_name(foreign));
            out = (dynq_packed_weights *)(void *)w;
            EXPECT(DYNQ_STATUS_UNSUPPORTED, dynq_isa_name(foreign), desc,
                   dynq_pack_weights(tiny, 2, 4, DYNQ_WEIGHT_LAYOUT_NK, &pc, &out));
            check(out == NULL, "*out = NULL after UNSUPPORTED");
            snprintf(desc, sizeof desc, "dynq_packed_weights_deserialize(config isa=%s)", dynq_isa_name(foreign));
            EXPECT(DYNQ_STATUS_UNSUPPORTED, dynq_isa_name(foreign), desc,
                   dynq_packed_weights_deserialize(blob, blob_len, &pc, &out));
        }
    }
    {
        /* Every ISA: available ones pack, the others are refused with UNSUPPORTED. */
        uint32_t isa;
        int ok = 1;
        for (isa = 1; isa <= 7; isa++) {
            dynq_packed_weights *h = NULL;
            dynq_status st;
            pc = pack_cfg(0, isa);
            st = dynq_pack_weights(tiny, 2, 4, DYNQ_WEIGHT_LAYOUT_NK, &pc, &h);
            if (dynq_isa_available(isa) ? st != DYNQ_STATUS_OK : st != DYNQ_STATUS_UNSUPPORTED) {
                ok = 0;
                printf("  isa %s: available=%d but status %s\n", dynq_isa_name(isa),
                       (int)dynq_isa_available(isa), sname((int)st));
            }
            if (st == DYNQ_STATUS_OK) {
                dynq_status st2;
                dynq_packed_weights_info info = get_info(h, &st2);
                if (info.isa != isa) {
                    ok = 0;
                }
            }
            dynq_packed_weights_free(h);
        }
        check(ok, "forcing each ISA 1..7: OK exactly when dynq_isa_available() says 1, else UNSUPPORTED");
    }
    free(blob);
    dynq_packed_weights_free(p);

#if SIZE_MAX > 0xFFFFFFFFu
    /* 4 TiB: dynq reserves memory before reading the input, so the tiny buffers are never read. */
    out = (dynq_packed_weights *)(void *)w;
    EXPECT(DYNQ_STATUS_OUT_OF_MEMORY, NULL, "dynq_pack_weights(n=2^26, k=65536, tiny w)",
           dynq_pack_weights(tiny, (size_t)1 << 26, 65536, DYNQ_WEIGHT_LAYOUT_NK, NULL, &out));
    check(out == NULL, "*out = NULL after OUT_OF_MEMORY");
    EXPECT(DYNQ_STATUS_OUT_OF_MEMORY, NULL, "dynq_pack_quantized_weights(n=2^26, k=65536, tiny q, 1 scale)",
           dynq_pack_quantized_weights(tinyq, (size_t)1 << 26, 65536, DYNQ_WEIGHT_LAYOUT_KN, &s, 1, NULL, &out));
#endif
    free(w);
    free(q);
}

/* ---- threads ----------------------------------------------------------------------------- */

#ifdef DYNQ_TEST_PTHREADS
typedef struct {
    const dynq_packed_weights *p;
    const float *a;
    const float *bias;
    const float *expected;
    size_t m, n, k;
    int index;
    int iterations;
    int mismatches;
    int failures;
    size_t initial_msg_len;
    int own_message_ok;
    char message[256];
} worker_args;

static void *worker(void *arg)
{
    worker_args *w = (worker_args *)arg;
    float *y = ALLOC(float, w->m * w->n);
    float *bad = ALLOC(float, w->m * w->k);
    char needle[32];
    int it;
    w->initial_msg_len = dynq_last_error_message(NULL, 0);
    for (it = 0; it < w->iterations; it++) {
        dynq_gemm_config c = gemm_cfg(0, 0, 0, (uint32_t)(it % 3)); /* 0 (pool), 1, 2 */
        dynq_status st;
        fill_sentinel(y, w->m * w->n);
        st = dynq_gemm(w->p, w->a, w->m, w->k, w->bias, y, w->n, &c);
        if (st != DYNQ_STATUS_OK) {
            w->failures++;
        } else if (memcmp(y, w->expected, w->m * w->n * sizeof(float)) != 0) {
            w->mismatches++;
        }
    }
    /* A per-thread error message: each thread fails on its own element. */
    memcpy(bad, w->a, w->m * w->k * sizeof(float));
    bad[(size_t)w->index * w->k + (size_t)w->index] = f_from_bits(0x7F800000u);
    snprintf(needle, sizeof needle, "A[%d][%d]", w->index, w->index);
    {
        dynq_gemm_config c = gemm_cfg(0, 0, 0, 1);
        dynq_status st = dynq_gemm(w->p, bad, w->m, w->k, NULL, y, w->n, &c);
        dynq_last_error_message(w->message, sizeof w->message);
        w->own_message_ok = st == DYNQ_STATUS_NON_FINITE && strstr(w->message, needle) != NULL;
    }
    free(y);
    free(bad);
    return NULL;
}
#endif

static void test_threads(void)
{
#ifdef DYNQ_TEST_PTHREADS
    const size_t m = 67, n = 70, k = 33;
    int8_t *q = ALLOC(int8_t, n * k);
    float *sw = ALLOC(float, n);
    float *bias = ALLOC(float, n);
    float *a = ALLOC(float, m * k);
    float *expected = ALLOC(float, m * n);
    dynq_packed_weights *p;
    pthread_t th[4];
    worker_args args[4];
    char before[512], after[512];
    int t, created = 0;
    size_t j;

    random_q(q, n * k);
    for (j = 0; j < n; j++) {
        sw[j] = 0.003f * (float)(j % 5 + 1);
        bias[j] = rnd_f();
    }
    random_a(a, m, k, k, 0);
    p = pack_q(q, n, k, sw, n);
    ref_gemm(a, m, k, k, q, sw, n, bias, 0, 0, 0, expected, n);

    (void)dynq_gemm_config_init(NULL); /* main thread's message: "config is NULL" */
    dynq_last_error_message(before, sizeof before);
    for (t = 0; t < 4; t++) {
        memset(&args[t], 0, sizeof args[t]);
        args[t].p = p;
        args[t].a = a;
        args[t].bias = bias;
        args[t].expected = expected;
        args[t].m = m;
        args[t].n = n;
        args[t].k = k;
        args[t].index = t + 1;
        args[t].iterations = 30;
        if (pthread_create(&th[t], NULL, worker, &args[t]) != 0) {
            break;
        }
        created++;
    }
    for (t = 0; t < created; t++) {
        pthread_join(th[t], NULL);
    }
    check(created == 4, "started 4 threads sharing one handle");
    for (t = 0; t < created; t++) {
        check(args[t].failures == 0 && args[t].mismatches == 0,
              "thread %d: %d concurrent dynq_gemm calls (num_threads 0/1/2) match the reference "
              "(%d failed, %d differed)",
              t, args[t].iterations, args[t].failures, args[t].mismatches);
        check(args[t].initial_msg_len == 0, "thread %d: last error message starts empty (length %zu)", t,
              args[t].initial_msg_len);
        check(args[t].own_message_ok, "thread %d: its own error message: \"%s\"", t, args[t].message);
    }
    dynq_last_error_message(after, sizeof after);
    check(strcmp(before, after) == 0, "main thread's last error message unaffected by the threads (\"%s\")",
          after);
    dynq_packed_weights_free(p);
    free(q);
    free(sw);
    free(bias);
    free(a);
    free(expected);
#else
    check(1, "threads: skipped (no pthreads on this platform)");
#endif
}

static void test_last_error_semantics(void)
{
    char buf[256], buf2[256];
    dynq_pack_config pc;
    size_t l1, l2;
    (void)dynq_active_isa(NULL);
    l1 = dynq_last_error_message(buf, sizeof buf);
    (void)dynq_pack_config_init(&pc); /* a successful call */
    (void)dynq_isa_name(1);
    l2 = dynq_last_error_message(buf2, sizeof buf2);
    check(l1 == l2 && strcmp(buf, buf2) == 0, "successful calls leave the last message as is (\"%s\")", buf2);
}

/* ---- environment-variable modes ----------------------------------------------------------- */

static int run_env_mode(const char *mode)
{
    float w[8] = {1, -2, 3, -4, 5, -6, 7, -8};
    float a[8] = {0.5f, 1, -1, 2, 0.25f, 0, 3, -3};
    float y[4], yr[4];
    int8_t q[8];
    float sc[2];
    uint32_t isa = 0xDEADu;
    dynq_packed_weights *p = NULL;
    dynq_pack_config scalar = pack_cfg(0, DYNQ_ISA_SCALAR);
    dynq_gemm_config gc1 = gemm_cfg(0, 0, 0, 1);
    dynq_gemm_config gc0 = gemm_cfg(0, 0, 0, 0);
    const char *env_isa = getenv("DYNQ_ISA");
    const char *env_thr = getenv("DYNQ_NUM_THREADS");
    printf("mode %s: DYNQ_ISA=%s DYNQ_NUM_THREADS=%s\n", mode, env_isa ? env_isa : "(unset)",
           env_thr ? env_thr : "(unset)");
    ref_quantize_weights(w, 2, 4, 0, 127, q, sc);
    ref_gemm(a, 2, 4, 4, q, sc, 2, NULL, 0, 0, 0, yr, 2);

    if (strcmp(mode, "env-isa-invalid") == 0) {
        EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "DYNQ_ISA", "dynq_active_isa with DYNQ_ISA naming no ISA",
               dynq_active_isa(&isa));
        EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "DYNQ_ISA", "dynq_pack_weights(isa AUTO) with bad DYNQ_ISA",
               dynq_pack_weights(w, 2, 4, DYNQ_WEIGHT_LAYOUT_NK, NULL, &p));
    } else if (strcmp(mode, "env-isa-unsupported") == 0) {
        EXPECT(DYNQ_STATUS_UNSUPPORTED, "DYNQ_ISA", "dynq_active_isa with DYNQ_ISA naming a missing ISA",
               dynq_active_isa(&isa));
        EXPECT(DYNQ_STATUS_UNSUPPORTED, "DYNQ_ISA", "dynq_pack_weights(isa AUTO) with that DYNQ_ISA",
               dynq_pack_weights(w, 2, 4, DYNQ_WEIGHT_LAYOUT_NK, NULL, &p));
    } else if (strcmp(mode, "env-isa-scalar") == 0) {
        EXPECT_OK("dynq_active_isa with DYNQ_ISA=scalar", dynq_active_isa(&isa));
        check(isa == DYNQ_ISA_SCALAR, "active ISA is scalar (%s)", dynq_isa_name(isa));
    } else if (strcmp(mode, "env-threads-invalid") == 0) {
        p = pack_q(q, 2, 4, sc, 2);
        fill_sentinel(y, 4);
        EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "DYNQ_NUM_THREADS", "dynq_gemm(num_threads=0) with bad DYNQ_NUM_THREADS",
               dynq_gemm(p, a, 2, 4, NULL, y, 2, &gc0));
        EXPECT(DYNQ_STATUS_INVALID_ARGUMENT, "DYNQ_NUM_THREADS", "dynq_gemm(config NULL) with bad DYNQ_NUM_THREADS",
               dynq_gemm(p, a, 2, 4, NULL, y, 2, NULL));
        check(all_sentinel(y, 4), "y untouched");
        EXPECT_OK("dynq_gemm(num_threads=1) ignores DYNQ_NUM_THREADS", dynq_gemm(p, a, 2, 4, NULL, y, 2, &gc1));
        check(memcmp(y, yr, sizeof y) == 0, "output equals the reference");
        dynq_packed_weights_free(p);
        p = NULL;
    } else if (strcmp(mode, "env-threads-2") == 0) {
        p = pack_q(q, 2, 4, sc, 2);
        EXPECT_OK("dynq_gemm(num_threads=0) with DYNQ_NUM_THREADS=2", dynq_gemm(p, a, 2, 4, NULL, y, 2, &gc0));
        check(memcmp(y, yr, sizeof y) == 0, "output equals the reference");
        dynq_packed_weights_free(p);
        p = NULL;
    } else {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }
    if (p != NULL) {
        dynq_packed_weights_free(p);
        p = NULL;
    }
    /* A forced ISA does not depend on DYNQ_ISA. */
    EXPECT_OK("dynq_pack_weights(config isa=SCALAR) whatever DYNQ_ISA says",
              dynq_pack_weights(w, 2, 4, DYNQ_WEIGHT_LAYOUT_NK, &scalar, &p));
    if (p != NULL) {
        fill_sentinel(y, 4);
        EXPECT_OK("dynq_gemm on the scalar-packed weights", dynq_gemm(p, a, 2, 4, NULL, y, 2, &gc1));
        check(memcmp(y, yr, sizeof y) == 0, "output equals the reference");
        dynq_packed_weights_free(p);
    }
    printf("%d passed, %d failed\n", g_passed, g_failed);
    return g_failed ? 1 : 0;
}

int main(int argc, char **argv)
{
    {
        /* Before any failure on this thread the message is empty. */
        char buf[16] = "garbage";
        size_t l0 = dynq_last_error_message(NULL, 0);
        size_t l1 = dynq_last_error_message(buf, sizeof buf);
        check(l0 == 0 && l1 == 0 && buf[0] == '\0', "last error message is empty before any failure");
    }
    if (argc > 1) {
        return run_env_mode(argv[1]);
    }
#if defined(FLT_EVAL_METHOD)
    check(FLT_EVAL_METHOD == 0, "FLT_EVAL_METHOD == 0 (float arithmetic in float precision)");
#endif
    test_version();
    test_status_str();
    test_isa();
    test_configs();
    test_last_error_semantics();
    test_pack_and_info();
    test_serialize();
    test_gemm_reference();
    test_gemm_threads();
    test_gemm_smoothed();
    test_gemm_residual();
    test_gemm_layer_norm();
    test_gemm_split();
    test_gemm_split_heads();
    test_null_pointers();
    test_invalid_arguments();
    test_size_overflow();
    test_non_finite();
    test_unsupported_and_oom();
    test_threads();
    free_guarded_all();
    printf("%d passed, %d failed\n", g_passed, g_failed);
    return g_failed ? 1 : 0;
}
