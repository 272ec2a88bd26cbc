/*
 * Robustness of the dynq C ABI from C, meant to run under AddressSanitizer and
 * UndefinedBehaviorSanitizer (scripts/sanitize.sh builds it with -fsanitize=address,undefined):
 *
 *  1. a large serialized blob (256 x 1024, 263 KB): a sample of single-bit flips, every
 *     truncation in the first and last KB of lengths and a sample between, appended bytes;
 *     each must give DYNQ_STATUS_CORRUPT_DATA and leave *out NULL;
 *  2. many threads on one shared handle, each with its own thread count (0..4), comparing
 *     every result with a single-threaded run byte for byte, loading and freeing private
 *     copies from the blob meanwhile; the last user frees the shared handle (under ASan a
 *     use after that free would be reported).
 *
 * Valid C99 and C++11. Prints one line per check and "N passed, M failed".
 */

#include "dynq.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int g_passed = 0, g_failed = 0;

static void check(int ok, const char *what)
{
    printf("%s %s\n", ok ? "PASS" : "FAIL", what);
    fflush(stdout);
    if (ok) {
        g_passed++;
    } else {
        g_failed++;
    }
}

static uint64_t g_rng = 0x2545F4914F6CDD1Dull;
static uint32_t rnd(void)
{
    g_rng = g_rng * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(g_rng >> 33);
}
static float rnd_f(void)
{
    return (float)(rnd() >> 8) / 4194304.0f - 1.0f; /* [-1, 1) */
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (p == NULL) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

/* Loads `len` bytes of `b`; returns the status, and checks that a failure leaves *out NULL. */
static dynq_status load(const uint8_t *b, size_t len, int *out_ok)
{
    dynq_packed_weights *o = (dynq_packed_weights *)(uintptr_t)0x10; /* non-NULL garbage */
    dynq_status st = dynq_packed_weights_deserialize(b, len, NULL, &o);
    if (st == DYNQ_STATUS_OK) {
        dynq_packed_weights_free(o);
    } else if (o != NULL) {
        *out_ok = 0;
    }
    return st;
}

static void test_large_blob(void)
{
    const size_t n = 256, k = 1024;
    float *w = (float *)xmalloc(n * k * sizeof(float));
    dynq_packed_weights *p = NULL;
    size_t need = 0, i, tried = 0, refused = 0;
    uint8_t *blob, *copy;
    int out_ok = 1;
    char line[256];

    for (i = 0; i < n * k; i++) {
        w[i] = rnd_f() * 0.1f;
    }
    check(dynq_pack_weights(w, n, k, DYNQ_WEIGHT_LAYOUT_NK, NULL, &p) == DYNQ_STATUS_OK, "pack 256 x 1024");
    check(dynq_packed_weights_serialize(p, NULL, 0, &need) == DYNQ_STATUS_OK && need == 48 + 4 * n + n * k + 4,
          "size query");
    blob = (uint8_t *)xmalloc(need);
    check(dynq_packed_weights_serialize(p, blob, need, &need) == DYNQ_STATUS_OK, "serialize");
    check(load(blob, need, &out_ok) == DYNQ_STATUS_OK, "the intact blob loads");

    /* Single-bit flips: the whole header and scales, then a sample. */
    for (i = 0; i < (48 + 4 * n) * 8 + 20000; i++) {
        size_t bit = i < (48 + 4 * n) * 8 ? i : ((size_t)rnd() * 65536u + rnd() % 65536u) % (need * 8);
        blob[bit / 8] ^= (uint8_t)(1u << (bit % 8));
        tried++;
        refused += load(blob, need, &out_ok) == DYNQ_STATUS_CORRUPT_DATA;
        blob[bit / 8] ^= (uint8_t)(1u << (bit % 8));
    }
    snprintf(line, sizeof line, "%zu of %zu single-bit flips refused with CORRUPT_DATA", refused, tried);
    check(refused == tried, line);

    /* Truncations, each in a buffer of exactly that length (ASan catches a read past it). */
    tried = refused = 0;
    for (i = 0; i < 1024 + 1024 + 500; i++) {
        size_t len = i < 1024 ? i : i < 2048 ? need - 1 - (i - 1024) : (size_t)rnd() % need;
        uint8_t *t = (uint8_t *)xmalloc(len);
        memcpy(t, blob, len);
        tried++;
        refused += load(t, len, &out_ok) == DYNQ_STATUS_CORRUPT_DATA;
        free(t);
    }
    snprintf(line, sizeof line, "%zu of %zu truncations refused with CORRUPT_DATA", refused, tried);
    check(refused == tried, line);

    /* Appended bytes. */
    copy = (uint8_t *)xmalloc(need + 64);
    memcpy(copy, blob, need);
    memset(copy + need, 0, 64);
    tried = refused = 0;
    for (i = 1; i <= 64; i++) {
        tried++;
        refused += load(copy, need + i, &out_ok) == DYNQ_STATUS_CORRUPT_DATA;
    }
    check(refused == tried, "1..64 appended bytes refused with CORRUPT_DATA");
    check(out_ok, "*out is NULL after every failed load");
    check(load(blob, need, &out_ok) == DYNQ_STATUS_OK, "the blob was restored and loads");
    free(copy);
    free(blob);
    free(w);
    dynq_packed_weights_free(p);
}

/* ---- threads ------------------------------------------------------------------------- */

#define THREADS 8
#define ITERATIONS 40
#define M 19
#define N 96
#define K 160

typedef struct {
    dynq_packed_weights *p;
    int users;
    pthread_mutex_t lock;
    const float *a;
    const float *bias;
    const float *expected;
    const uint8_t *blob;
    size_t blob_len;
} shared_t;

typedef struct {
    shared_t *s;
    int index;
    int mismatches;
    int failures;
    int private_loads;
} worker_t;

static void release(shared_t *s)
{
    int last;
    pthread_mutex_lock(&s->lock);
    last = --s->users == 0;
    pthread_mutex_unlock(&s->lock);
    if (last) {
        dynq_packed_weights_free(s->p); /* the last user frees */
        s->p = NULL;
    }
}

static void *worker(void *arg)
{
    worker_t *w = (worker_t *)arg;
    shared_t *s = w->s;
    float *y = (float *)xmalloc(M * N * sizeof(float));
    int it;
    for (it = 0; it < ITERATIONS; it++) {
        dynq_gemm_config c;
        dynq_packed_weights *h = s->p;
        dynq_gemm_config_init(&c);
        c.num_threads = (uint32_t)((w->index + it) % 5); /* 0 = default, 1..4 */
        c.epilogue = DYNQ_EPILOGUE_GELU;
        if (it % 8 == 0) {
            /* a private copy, used and freed at once */
            h = NULL;
            if (dynq_packed_weights_deserialize(s->blob, s->blob_len, NULL, &h) != DYNQ_STATUS_OK) {
                w->failures++;
                continue;
            }
            w->private_loads++;
        }
        memset(y, 0xA5, M * N * sizeof(float));
        if (dynq_gemm(h, s->a, M, K, s->bias, y, N, &c) != DYNQ_STATUS_OK) {
            w->failures++;
        } else if (memcmp(y, s->expected, M * N * sizeof(float)) != 0) {
            w->mismatches++;
        }
        if (h != s->p) {
            dynq_packed_weights_free(h);
        }
    }
    free(y);
    release(s);
    return NULL;
}

static void test_threads(void)
{
    shared_t s;
    worker_t w[THREADS];
    pthread_t th[THREADS];
    float *wt = (float *)xmalloc(N * K * sizeof(float));
    float *a = (float *)xmalloc(M * K * sizeof(float));
    float *bias = (float *)xmalloc(N * sizeof(float));
    float *expected = (float *)xmalloc(M * N * sizeof(float));
    uint8_t *blob;
    size_t need = 0;
    dynq_gemm_config c;
    int t, created = 0, bad = 0, loads = 0;
    char line[256];

    for (t = 0; t < N * K; t++) {
        wt[t] = rnd_f() * 0.2f;
    }
    for (t = 0; t < M * K; t++) {
        a[t] = rnd_f() * 2.0f;
    }
    for (t = 0; t < N; t++) {
        bias[t] = rnd_f();
    }
    memset(&s, 0, sizeof s);
    check(dynq_pack_weights(wt, N, K, DYNQ_WEIGHT_LAYOUT_NK, NULL, &s.p) == DYNQ_STATUS_OK, "pack the shared handle");
    dynq_gemm_config_init(&c);
    c.num_threads = 1;
    c.epilogue = DYNQ_EPILOGUE_GELU;
    check(dynq_gemm(s.p, a, M, K, bias, expected, N, &c) == DYNQ_STATUS_OK, "single-threaded reference run");
    dynq_packed_weights_serialize(s.p, NULL, 0, &need);
    blob = (uint8_t *)xmalloc(need);
    dynq_packed_weights_serialize(s.p, blob, need, &need);
    s.a = a;
    s.bias = bias;
    s.expected = expected;
    s.blob = blob;
    s.blob_len = need;
    s.users = THREADS;
    pthread_mutex_init(&s.lock, NULL);
    for (t = 0; t < THREADS; t++) {
        memset(&w[t], 0, sizeof w[t]);
        w[t].s = &s;
        w[t].index = t;
        if (pthread_create(&th[t], NULL, worker, &w[t]) != 0) {
            break;
        }
        created++;
    }
    for (t = 0; t < created; t++) {
        pthread_join(th[t], NULL);
        bad += w[t].mismatches + w[t].failures;
        loads += w[t].private_loads;
    }
    snprintf(line, sizeof line,
             "%d threads x %d GEMMs (%dx%dx%d, num_threads 0..4, %d private copies loaded and freed): "
             "%d failed or differed from the single-threaded run",
             created, ITERATIONS, M, N, K, loads, bad);
    check(created == THREADS && bad == 0, line);
    check(s.p == NULL, "the last user freed the shared handle");
    pthread_mutex_destroy(&s.lock);
    free(blob);
    free(wt);
    free(a);
    free(bias);
    free(expected);
}

int main(void)
{
    test_large_blob();
    test_threads();
    printf("%d passed, %d failed\n", g_passed, g_failed);
    return g_failed ? 1 : 0;
}
