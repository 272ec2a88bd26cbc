// A C++ program that uses dynq only through its installed package (find_package(dynq) and
// dynq.hpp). Built twice, against dynq::dynq (shared) and dynq::dynq_static, and run by ctest.
//
// It packs weights, runs GEMMs in every configuration against a bit-exact reference of the
// documented semantics (README "What is computed"), round-trips the serialized blob, and
// checks that each error path throws dynq::error with the library's status and message.
// Prints "consumer: N passed, N failed" and exits non-zero on any failure.
#include <dynq.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace {

int g_passed = 0;
int g_failed = 0;

void check(bool ok, const std::string &what)
{
    if (ok) {
        ++g_passed;
    } else {
        ++g_failed;
        std::printf("FAIL %s\n", what.c_str());
    }
}

// ---- reference (mirrors tests/c/test_abi.c; compiled with -ffp-contract=off) ----------------

const float kTinyScale = 1e-45f;

int32_t round_i32(float x)
{
    float r = std::nearbyint(x);
    if (r >= 2147483648.0f) {
        return std::numeric_limits<int32_t>::max();
    }
    if (r < -2147483648.0f) {
        return std::numeric_limits<int32_t>::min();
    }
    return static_cast<int32_t>(r);
}

int32_t clamp_i32(int64_t v, int32_t lo, int32_t hi)
{
    return static_cast<int32_t>(v < lo ? lo : v > hi ? hi : v);
}

struct qparams {
    float scale;
    int32_t zp;
};

qparams asym_params(float lo, float hi)
{
    qparams p = {0.0f, 0};
    float range = hi - lo;
    if (range == 0.0f) {
        return p;
    }
    p.scale = range <= std::numeric_limits<float>::max() ? range / 255.0f : hi / 255.0f - lo / 255.0f;
    if (p.scale == 0.0f) {
        p.scale = kTinyScale;
    }
    p.zp = clamp_i32(round_i32(-lo / p.scale), 0, 255);
    return p;
}

float symmetric_scale(float amax)
{
    if (amax == 0.0f) {
        return 0.0f;
    }
    float s = amax / 127.0f;
    return s == 0.0f ? kTinyScale : s;
}

qparams sym_params(float lo, float hi)
{
    qparams p;
    p.scale = symmetric_scale(std::max(hi, -lo));
    p.zp = 128;
    return p;
}

int32_t quantize_act(float x, qparams p, uint32_t type)
{
    if (p.scale == 0.0f) {
        return p.zp;
    }
    int32_t r = round_i32(x / p.scale);
    if (type == DYNQ_ACT_TYPE_ASYMMETRIC_U8) {
        return clamp_i32(static_cast<int64_t>(r) + p.zp, 0, 255);
    }
    return clamp_i32(r, -127, 127) + 128;
}

// w is [n][k]; q gets [n][k], scales n (or 1 per tensor).
void ref_quantize_weights(const std::vector<float> &w, size_t n, size_t k, bool per_tensor, std::vector<int8_t> &q,
                          std::vector<float> &scales)
{
    q.assign(n * k, 0);
    scales.assign(per_tensor ? 1 : n, 0.0f);
    float tmax = 0.0f;
    for (size_t j = 0; j < n; j++) {
        float amax = 0.0f;
        for (size_t kk = 0; kk < k; kk++) {
            amax = std::max(amax, std::fabs(w[j * k + kk]));
        }
        tmax = std::max(tmax, amax);
        if (!per_tensor) {
            scales[j] = symmetric_scale(amax);
        }
    }
    if (per_tensor) {
        scales[0] = symmetric_scale(tmax);
    }
    for (size_t j = 0; j < n; j++) {
        float s = per_tensor ? scales[0] : scales[j];
        for (size_t kk = 0; kk < k; kk++) {
            q[j * k + kk] = s == 0.0f ? 0 : static_cast<int8_t>(clamp_i32(round_i32(w[j * k + kk] / s), -127, 127));
        }
    }
}

std::vector<float> ref_gemm(const std::vector<float> &a, size_t m, size_t k, const std::vector<int8_t> &q,
                            const std::vector<float> &sw, size_t n, const std::vector<float> &bias,
                            const dynq_gemm_config &cfg)
{
    std::vector<float> lo(m, 0.0f), hi(m, 0.0f);
    float glo = 0.0f, ghi = 0.0f;
    for (size_t i = 0; i < m; i++) {
        for (size_t kk = 0; kk < k; kk++) {
            lo[i] = std::min(lo[i], a[i * k + kk]);
            hi[i] = std::max(hi[i], a[i * k + kk]);
        }
        glo = std::min(glo, lo[i]);
        ghi = std::max(ghi, hi[i]);
    }
    std::vector<float> y(m * n);
    for (size_t i = 0; i < m; i++) {
        bool per_tensor = cfg.act_granularity == DYNQ_ACT_GRANULARITY_PER_TENSOR;
        float l = per_tensor ? glo : lo[i], h = per_tensor ? ghi : hi[i];
        qparams p = cfg.act_type == DYNQ_ACT_TYPE_ASYMMETRIC_U8 ? asym_params(l, h) : sym_params(l, h);
        for (size_t j = 0; j < n; j++) {
            int64_t acc = 0, colsum = 0;
            for (size_t kk = 0; kk < k; kk++) {
                acc += static_cast<int64_t>(quantize_act(a[i * k + kk], p, cfg.act_type)) * q[j * k + kk];
                colsum += q[j * k + kk];
            }
            int64_t c = acc - static_cast<int64_t>(p.zp) * colsum;
            float s = p.scale * sw[sw.size() == 1 ? 0 : j];
            float t = static_cast<float>(static_cast<int32_t>(c)) * s;
            if (!bias.empty()) {
                t = t + bias[j];
            }
            if (cfg.epilogue == DYNQ_EPILOGUE_RELU) {
                t = t > 0.0f ? t : 0.0f;
            }
            y[i * n + j] = t;
        }
    }
    return y;
}

// ---- data ---------------------------------------------------------------------------------

uint64_t g_rng = 0x9E3779B97F4A7C15ull;

float rnd()
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return static_cast<float>(static_cast<int32_t>(g_rng >> 40) - (1 << 23)) / static_cast<float>(1 << 23);
}

std::vector<float> random_vec(size_t count, float scale, float offset = 0.0f)
{
    std::vector<float> v(count);
    for (float &x : v) {
        x = rnd() * scale + offset;
    }
    return v;
}

bool same_bits(const std::vector<float> &x, const std::vector<float> &y, std::string &why)
{
    if (x.size() != y.size()) {
        why = "sizes " + std::to_string(x.size()) + " and " + std::to_string(y.size());
        return false;
    }
    for (size_t i = 0; i < x.size(); i++) {
        if (std::memcmp(&x[i], &y[i], sizeof(float)) != 0) {
            why = "element " + std::to_string(i) + ": " + std::to_string(x[i]) + " vs reference " +
                  std::to_string(y[i]);
            return false;
        }
    }
    return true;
}

template <typename F> void expect_error(const std::string &what, dynq_status want, F f, const char *needle = "")
{
    try {
        f();
        check(false, what + ": no exception");
    } catch (const dynq::error &e) {
        std::string msg = e.what();
        check(e.status() == want, what + ": status " + dynq_status_str(e.status()) + ", expected " +
                                      dynq_status_str(want) + " (" + msg + ")");
        check(msg.find(needle) != std::string::npos && msg.size() > std::strlen(dynq_status_str(want)) + 2,
              what + ": message \"" + msg + "\" should carry the library's detail" +
                  (*needle ? std::string(" and contain \"") + needle + "\"" : std::string()));
    }
}

// ---- tests --------------------------------------------------------------------------------

void test_version()
{
    check(std::string(dynq::version()) == DYNQ_VERSION_STRING, "dynq_version() equals DYNQ_VERSION_STRING");
    check(dynq_abi_version() == DYNQ_ABI_VERSION, "dynq_abi_version() equals DYNQ_ABI_VERSION");
}

void test_gemm_configs()
{
    struct shape {
        size_t m, n, k;
    };
    const shape shapes[] = {{1, 1, 1}, {3, 17, 33}, {7, 40, 130}, {16, 64, 256}};
    for (const shape &s : shapes) {
        for (int layout = 0; layout < 2; layout++) {
            for (int wgran = 0; wgran < 2; wgran++) {
                std::vector<float> w_nk = random_vec(s.n * s.k, 0.5f);
                std::vector<float> w_in = w_nk;
                if (layout == DYNQ_WEIGHT_LAYOUT_KN) {
                    for (size_t j = 0; j < s.n; j++) {
                        for (size_t kk = 0; kk < s.k; kk++) {
                            w_in[kk * s.n + j] = w_nk[j * s.k + kk];
                        }
                    }
                }
                dynq_pack_config pc = dynq::pack_config();
                pc.granularity = static_cast<uint32_t>(wgran);
                dynq::packed_weights w = dynq::packed_weights::pack(w_in.data(), s.n, s.k, layout, &pc);
                std::vector<int8_t> q;
                std::vector<float> sw;
                ref_quantize_weights(w_nk, s.n, s.k, wgran == DYNQ_WEIGHT_GRANULARITY_PER_TENSOR, q, sw);
                check(w.n() == s.n && w.k() == s.k, "info reports n and k");

                for (int cfg_i = 0; cfg_i < 8; cfg_i++) {
                    dynq_gemm_config gc = dynq::gemm_config();
                    gc.act_granularity = static_cast<uint32_t>(cfg_i & 1);
                    gc.act_type = static_cast<uint32_t>((cfg_i >> 1) & 1);
                    gc.epilogue = static_cast<uint32_t>((cfg_i >> 2) & 1);
                    gc.num_threads = cfg_i % 3 == 0 ? 1 : 0;
                    // Skewed activations (as after GELU) in half the cases.
                    std::vector<float> a = random_vec(s.m * s.k, 3.0f, cfg_i % 2 ? 2.0f : 0.0f);
                    std::vector<float> bias = cfg_i % 3 == 1 ? std::vector<float>() : random_vec(s.n, 1.0f);
                    std::vector<float> y = w.gemm(a, bias, &gc);
                    std::vector<float> want = ref_gemm(a, s.m, s.k, q, sw, s.n, bias, gc);
                    std::string why;
                    char desc[160];
                    std::snprintf(desc, sizeof desc, "gemm m=%zu n=%zu k=%zu layout=%d wgran=%d config=%d",
                                  s.m, s.n, s.k, layout, wgran, cfg_i);
                    check(same_bits(y, want, why), std::string(desc) + " equals the reference bit for bit: " + why);
                }
            }
        }
    }
}

void test_defaults_and_raw_call()
{
    // The README example: 768 x 3072 is large; a smaller layer with the same calls.
    const size_t m = 4, n = 48, k = 96;
    std::vector<float> wv = random_vec(n * k, 0.2f);
    dynq::packed_weights w = dynq::packed_weights::pack(wv.data(), n, k);
    std::vector<int8_t> q;
    std::vector<float> sw;
    ref_quantize_weights(wv, n, k, false, q, sw);
    std::vector<float> a = random_vec(m * k, 1.0f, 0.5f);
    std::vector<float> bias = random_vec(n, 0.1f);
    // Strided output through the raw-pointer overload: columns n..ldy-1 stay untouched.
    const size_t ldy = n + 3;
    std::vector<float> y(m * ldy, -7.0f);
    w.gemm(a.data(), m, k, bias.data(), y.data(), ldy);
    std::vector<float> dense(m * n);
    bool pad_ok = true;
    for (size_t i = 0; i < m; i++) {
        std::copy(y.begin() + static_cast<std::ptrdiff_t>(i * ldy),
                  y.begin() + static_cast<std::ptrdiff_t>(i * ldy + n), dense.begin() + static_cast<std::ptrdiff_t>(i * n));
        for (size_t j = n; j < ldy; j++) {
            pad_ok = pad_ok && y[i * ldy + j] == -7.0f;
        }
    }
    std::string why;
    check(same_bits(dense, ref_gemm(a, m, k, q, sw, n, bias, dynq::gemm_config()), why),
          "default config (per-row asymmetric u8) equals the reference: " + why);
    check(pad_ok, "elements between n and ldy are untouched");
    check(w.gemm(std::vector<float>()).empty(), "m = 0 is an empty batch");

    // Smoothing factors: the same bits as gemm on a multiplied by them; wrong length or a zero
    // factor throws dynq::error with the status.
    std::vector<float> smooth(k);
    for (size_t j = 0; j < k; j++) {
        smooth[j] = 0.25f + 0.125f * static_cast<float>(j % 9);
    }
    std::vector<float> pre(a);
    for (size_t i = 0; i < m; i++) {
        for (size_t j = 0; j < k; j++) {
            pre[i * k + j] = a[i * k + j] * smooth[j];
        }
    }
    check(same_bits(w.gemm_smoothed(a, smooth, bias), w.gemm(pre, bias), why),
          "gemm_smoothed equals gemm on the multiplied activations: " + why);
    check(same_bits(w.gemm_smoothed(a, std::vector<float>(), bias), w.gemm(a, bias), why),
          "gemm_smoothed without factors equals gemm: " + why);
    bool threw = false;
    try {
        w.gemm_smoothed(a, std::vector<float>(k - 1, 1.0f));
    } catch (const dynq::error &e) {
        threw = e.status() == DYNQ_STATUS_INVALID_ARGUMENT;
    }
    check(threw, "gemm_smoothed with k - 1 factors throws INVALID_ARGUMENT");
    threw = false;
    smooth[3] = 0.0f;
    try {
        w.gemm_smoothed(a, smooth);
    } catch (const dynq::error &e) {
        threw = e.status() == DYNQ_STATUS_INVALID_ARGUMENT && std::string(e.what()).find("[3] is 0") != std::string::npos;
    }
    check(threw, "gemm_smoothed with a zero factor throws the library's message");
    smooth[3] = 1.5f;

    // A residual: the same bits as gemm_smoothed followed by one float addition per element.
    std::vector<float> res(m * n);
    for (size_t e = 0; e < m * n; e++) {
        res[e] = 0.5f * static_cast<float>(static_cast<int>(e % 23) - 11);
    }
    std::vector<float> base = w.gemm_smoothed(a, smooth, bias);
    for (size_t e = 0; e < m * n; e++) {
        base[e] += res[e];
    }
    check(same_bits(w.gemm_residual(a, res, smooth, bias), base, why),
          "gemm_residual equals gemm_smoothed plus the residual: " + why);
    check(same_bits(w.gemm_residual(a, std::vector<float>(), smooth, bias), w.gemm_smoothed(a, smooth, bias), why),
          "gemm_residual without a residual equals gemm_smoothed: " + why);
    threw = false;
    try {
        w.gemm_residual(a, std::vector<float>(m * n - 1, 1.0f));
    } catch (const dynq::error &e) {
        threw = e.status() == DYNQ_STATUS_INVALID_ARGUMENT && std::string(e.what()).find("residual") != std::string::npos;
    }
    check(threw, "gemm_residual with m * n - 1 values throws INVALID_ARGUMENT");

    // A layer norm after the residual: each row of gemm_residual normalized (checked against
    // double arithmetic; the bits are checked by the C and Rust tests), and a bad size throws.
    {
        std::vector<float> lns(n), lnb(n);
        for (size_t j = 0; j < n; j++) {
            lns[j] = 1.0f + 0.25f * static_cast<float>(j % 5);
            lnb[j] = 0.125f * static_cast<float>(static_cast<int>(j % 7) - 3);
        }
        std::vector<float> sum = w.gemm_residual(a, res, smooth, bias);
        std::vector<float> got = w.gemm_layer_norm(a, res, lns, lnb, 1e-5f, smooth, bias);
        bool close = got.size() == m * n;
        for (size_t i = 0; close && i < m; i++) {
            double mean = 0, var = 0;
            for (size_t j = 0; j < n; j++) mean += sum[i * n + j];
            mean /= static_cast<double>(n);
            for (size_t j = 0; j < n; j++) var += (sum[i * n + j] - mean) * (sum[i * n + j] - mean);
            var /= static_cast<double>(n);
            for (size_t j = 0; j < n; j++) {
                double want = (sum[i * n + j] - mean) / std::sqrt(var + 1e-5) * lns[j] + lnb[j];
                close = close && std::fabs(got[i * n + j] - want) <= 1e-4 * (1.0 + std::fabs(want));
            }
        }
        check(close, "gemm_layer_norm normalizes each row of gemm_residual");
        threw = false;
        try {
            w.gemm_layer_norm(a, res, std::vector<float>(n - 1, 1.0f));
        } catch (const dynq::error &e) {
            threw = e.status() == DYNQ_STATUS_INVALID_ARGUMENT && std::string(e.what()).find("ln_scale") != std::string::npos;
        }
        check(threw, "gemm_layer_norm with n - 1 scale values throws INVALID_ARGUMENT");
    }

    // Split outputs: each holds its columns of gemm_smoothed.
    std::vector<float> full = w.gemm_smoothed(a, smooth, bias);
    std::vector<size_t> widths;
    widths.push_back(1);
    widths.push_back(n - 1);
    std::vector<std::vector<float> > parts = w.gemm_split(a, widths, smooth, bias);
    std::vector<float> joined(m * n);
    for (size_t i = 0; i < m; i++) {
        joined[i * n] = parts[0][i];
        for (size_t j = 1; j < n; j++) {
            joined[i * n + j] = parts[1][i * (n - 1) + j - 1];
        }
    }
    check(parts.size() == 2 && same_bits(joined, full, why), "gemm_split outputs are the columns of gemm_smoothed: " + why);
    threw = false;
    widths[1] = n;
    try {
        w.gemm_split(a, widths);
    } catch (const dynq::error &e) {
        threw = e.status() == DYNQ_STATUS_INVALID_ARGUMENT && std::string(e.what()).find("add up") != std::string::npos;
    }
    check(threw, "gemm_split with widths adding up to n + 1 throws INVALID_ARGUMENT");

    // Head layouts: m = 4 rows as 2 sequences of 2; n = 48 columns as 3 heads of 16, or
    // transposed as 2 heads of 24 beside a dense output.
    std::vector<dynq_heads> hs(1);
    hs[0].heads = 3;
    hs[0].seq = 2;
    hs[0].transposed = 0;
    hs[0].reserved = 0;
    widths.assign(1, n);
    std::vector<std::vector<float> > hp = w.gemm_split_heads(a, widths, hs, smooth, bias);
    bool same = hp.size() == 1 && hp[0].size() == m * n;
    for (size_t i = 0; same && i < m; i++) {
        for (size_t j = 0; j < n; j++) {
            size_t b = i / 2, s = i % 2, h = j / 16, e = j % 16;
            same = same && std::memcmp(&hp[0][((b * 3 + h) * 2 + s) * 16 + e], &full[i * n + j], sizeof(float)) == 0;
        }
    }
    check(same, "gemm_split_heads writes [batch, heads, seq, d] with gemm_smoothed's bits");
    hs.resize(2);
    hs[0].heads = 2;
    hs[0].transposed = 1;
    hs[1].heads = 0;
    hs[1].seq = 0;
    hs[1].transposed = 0;
    hs[1].reserved = 0;
    widths.assign(1, 24);
    widths.push_back(24);
    hp = w.gemm_split_heads(a, widths, hs, smooth, bias);
    same = hp.size() == 2;
    for (size_t i = 0; same && i < m; i++) {
        for (size_t j = 0; j < 24; j++) {
            size_t b = i / 2, s = i % 2, h = j / 12, e = j % 12;
            same = same && std::memcmp(&hp[0][((b * 2 + h) * 12 + e) * 2 + s], &full[i * n + j], sizeof(float)) == 0;
            same = same && std::memcmp(&hp[1][i * 24 + j], &full[i * n + 24 + j], sizeof(float)) == 0;
        }
    }
    check(same, "gemm_split_heads writes [batch, heads, d, seq] beside a dense output");
    threw = false;
    hs[0].seq = 3;
    try {
        w.gemm_split_heads(a, widths, hs);
    } catch (const dynq::error &e) {
        threw = e.status() == DYNQ_STATUS_INVALID_ARGUMENT && std::string(e.what()).find("sequences of 3") != std::string::npos;
    }
    check(threw, "gemm_split_heads with seq not dividing m throws INVALID_ARGUMENT");
}

void test_serialize()
{
    const size_t m = 5, n = 33, k = 70;
    std::vector<float> wv = random_vec(n * k, 1.0f);
    dynq::packed_weights w = dynq::packed_weights::pack(wv.data(), n, k);
    std::vector<uint8_t> blob = w.serialize();
    check(blob.size() == w.info().serialized_bytes, "serialize() writes serialized_bytes");
    check(blob.size() > 8 && std::memcmp(blob.data(), "DYNQPWT", 8) == 0, "blob starts with the magic");
    dynq::packed_weights w2 = dynq::packed_weights::deserialize(blob);
    check(w2.n() == n && w2.k() == k, "loaded weights have n and k");
    std::vector<float> a = random_vec(m * k, 2.0f);
    std::string why;
    check(same_bits(w2.gemm(a), w.gemm(a), why), "loaded weights give the same bits: " + why);
    check(w2.serialize() == blob, "serialize(deserialize(blob)) == blob");

    // Ownership: moves transfer the handle, release() hands it to the caller.
    dynq::packed_weights moved(std::move(w2));
    check(!w2 && static_cast<bool>(moved), "move leaves the source empty");
    dynq_packed_weights *raw = moved.release();
    check(raw != NULL && !moved, "release() gives up the handle");
    dynq::packed_weights readopted(raw);
    check(readopted.k() == k, "a released handle can be adopted again");
}

void test_errors()
{
    std::vector<float> wv = random_vec(6 * 4, 1.0f);
    expect_error("pack with n = 0", DYNQ_STATUS_INVALID_ARGUMENT,
                 [&] { dynq::packed_weights::pack(wv.data(), 0, 4); });
    std::vector<float> wide(65537, 0.5f);
    expect_error("pack with k above 65536", DYNQ_STATUS_UNSUPPORTED,
                 [&] { dynq::packed_weights::pack(wide.data(), 1, wide.size()); });
    std::vector<float> nan_w = wv;
    nan_w[5] = std::numeric_limits<float>::quiet_NaN();
    expect_error("pack NaN weights", DYNQ_STATUS_NON_FINITE, [&] { dynq::packed_weights::pack(nan_w.data(), 6, 4); });
    expect_error("pack with a bad layout", DYNQ_STATUS_INVALID_ARGUMENT,
                 [&] { dynq::packed_weights::pack(wv.data(), 6, 4, 7); });

    dynq::packed_weights w = dynq::packed_weights::pack(wv.data(), 6, 4);
    expect_error("gemm with a row of the wrong length", DYNQ_STATUS_INVALID_ARGUMENT,
                 [&] { w.gemm(std::vector<float>(7, 1.0f)); }, "multiple of k = 4");
    expect_error("gemm with a bias of the wrong length", DYNQ_STATUS_INVALID_ARGUMENT,
                 [&] { w.gemm(std::vector<float>(8, 1.0f), std::vector<float>(5, 0.0f)); }, "expected n = 6");
    std::vector<float> y(12);
    std::vector<float> a(8, 1.0f);
    expect_error("gemm with lda < k", DYNQ_STATUS_INVALID_ARGUMENT,
                 [&] { w.gemm(a.data(), 2, 3, NULL, y.data(), 6); });
    a[6] = std::numeric_limits<float>::infinity();
    expect_error("gemm with infinite activations", DYNQ_STATUS_NON_FINITE, [&] { w.gemm(a); }, "A[1][2]");
    dynq_gemm_config bad = dynq::gemm_config();
    bad.epilogue = 9;
    expect_error("gemm with an unknown epilogue", DYNQ_STATUS_INVALID_ARGUMENT,
                 [&] { w.gemm(std::vector<float>(4, 1.0f), std::vector<float>(), &bad); });

    std::vector<uint8_t> blob = w.serialize();
    for (size_t pos : {size_t(0), size_t(30), blob.size() / 2, blob.size() - 1}) {
        std::vector<uint8_t> corrupt = blob;
        corrupt[pos] ^= 0x10;
        expect_error("deserialize a blob with byte " + std::to_string(pos) + " flipped", DYNQ_STATUS_CORRUPT_DATA,
                     [&] { dynq::packed_weights::deserialize(corrupt); });
    }
    std::vector<uint8_t> truncated(blob.begin(), blob.end() - 1);
    expect_error("deserialize a truncated blob", DYNQ_STATUS_CORRUPT_DATA,
                 [&] { dynq::packed_weights::deserialize(truncated); });
    expect_error("deserialize an empty blob", DYNQ_STATUS_CORRUPT_DATA,
                 [&] { dynq::packed_weights::deserialize(std::vector<uint8_t>()); });
    dynq::packed_weights empty;
    expect_error("use an empty handle", DYNQ_STATUS_NULL_POINTER, [&] { empty.serialize(); });
}

} // namespace

int main()
{
    try {
        test_version();
        test_gemm_configs();
        test_defaults_and_raw_call();
        test_serialize();
        test_errors();
    } catch (const dynq::error &e) {
        std::printf("FAIL unexpected dynq::error (%s): %s\n", dynq_status_str(e.status()), e.what());
        ++g_failed;
    }
    std::printf("dynq %s\nconsumer: %d passed, %d failed\n", dynq::version(), g_passed, g_failed);
    return g_failed == 0 ? 0 : 1;
}
