/*
 * dynq.hpp: a thin C++11 RAII wrapper over the C ABI of dynq.h. Header only; it adds no
 * behaviour of its own beyond ownership, exceptions and size checks of std::vector arguments.
 *
 *   dynq::packed_weights w = dynq::packed_weights::pack(weights.data(), n, k);
 *   std::vector<float> y = w.gemm(a, bias);          // a: m * k floats, y: m * n floats
 *   std::vector<uint8_t> blob = w.serialize();
 *   dynq::packed_weights w2 = dynq::packed_weights::deserialize(blob);
 *
 * Every failure throws dynq::error (a std::runtime_error) whose what() carries the library's
 * detailed message and whose status() is the dynq_status. Handles are move-only and freed by
 * the destructor. A packed_weights may be used by many threads at once (gemm is const).
 */
#ifndef DYNQ_HPP
#define DYNQ_HPP

#include "dynq.h"

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace dynq {

/* A failed call: the status and the library's message for it. */
class error : public std::runtime_error {
public:
    error(dynq_status status, const std::string &message)
        : std::runtime_error(message), status_(status)
    {
    }
    dynq_status status() const noexcept { return status_; }

private:
    dynq_status status_;
};

/* The calling thread's last error message (see dynq_last_error_message). */
inline std::string last_error_message()
{
    std::size_t len = dynq_last_error_message(NULL, 0);
    std::string msg(len + 1, '\0');
    dynq_last_error_message(&msg[0], msg.size());
    msg.resize(len);
    return msg;
}

/* Throws dynq::error unless st is DYNQ_STATUS_OK. Call it right after the failing call, on
 * the same thread: the message is per thread. */
inline void check(dynq_status st, const char *what)
{
    if (st != DYNQ_STATUS_OK) {
        throw error(st, std::string(what) + ": " + dynq_status_str(st) + ": " + last_error_message());
    }
}

inline const char *version() { return dynq_version(); }

inline dynq_pack_config pack_config()
{
    dynq_pack_config c;
    check(dynq_pack_config_init(&c), "dynq_pack_config_init");
    return c;
}

inline dynq_gemm_config gemm_config()
{
    dynq_gemm_config c;
    check(dynq_gemm_config_init(&c), "dynq_gemm_config_init");
    return c;
}

/* Owns a dynq_packed_weights handle. */
class packed_weights {
public:
    packed_weights() noexcept : p_(NULL) {}
    /* Takes ownership of a handle from the C API. */
    explicit packed_weights(dynq_packed_weights *p) noexcept : p_(p) {}
    ~packed_weights() { dynq_packed_weights_free(p_); }
    packed_weights(packed_weights &&o) noexcept : p_(o.p_) { o.p_ = NULL; }
    packed_weights &operator=(packed_weights &&o) noexcept
    {
        std::swap(p_, o.p_);
        return *this;
    }
    packed_weights(const packed_weights &) = delete;
    packed_weights &operator=(const packed_weights &) = delete;

    /* f32 weights, n x k in `layout` (DYNQ_WEIGHT_LAYOUT_NK: n rows of k). */
    static packed_weights pack(const float *w, std::size_t n, std::size_t k,
                               uint32_t layout = DYNQ_WEIGHT_LAYOUT_NK,
                               const dynq_pack_config *config = NULL)
    {
        dynq_packed_weights *p = NULL;
        check(dynq_pack_weights(w, n, k, layout, config, &p), "dynq_pack_weights");
        return packed_weights(p);
    }

    /* Already quantized int8 weights with 1 or n scales. */
    static packed_weights pack_quantized(const int8_t *q, std::size_t n, std::size_t k,
                                         const float *scales, std::size_t num_scales,
                                         uint32_t layout = DYNQ_WEIGHT_LAYOUT_NK,
                                         const dynq_pack_config *config = NULL)
    {
        dynq_packed_weights *p = NULL;
        check(dynq_pack_quantized_weights(q, n, k, layout, scales, num_scales, config, &p),
              "dynq_pack_quantized_weights");
        return packed_weights(p);
    }

    /* Loads a blob written by serialize(), on any CPU. */
    static packed_weights deserialize(const uint8_t *blob, std::size_t len,
                                      const dynq_pack_config *config = NULL)
    {
        dynq_packed_weights *p = NULL;
        check(dynq_packed_weights_deserialize(blob, len, config, &p), "dynq_packed_weights_deserialize");
        return packed_weights(p);
    }
    static packed_weights deserialize(const std::vector<uint8_t> &blob, const dynq_pack_config *config = NULL)
    {
        static const uint8_t empty = 0;
        return deserialize(blob.empty() ? &empty : blob.data(), blob.size(), config);
    }

    std::vector<uint8_t> serialize() const
    {
        std::size_t len = 0;
        check(dynq_packed_weights_serialize(p_, NULL, 0, &len), "dynq_packed_weights_serialize");
        std::vector<uint8_t> blob(len);
        check(dynq_packed_weights_serialize(p_, blob.data(), blob.size(), &len),
              "dynq_packed_weights_serialize");
        blob.resize(len);
        return blob;
    }

    dynq_packed_weights_info info() const
    {
        dynq_packed_weights_info i = dynq_packed_weights_info();
        i.struct_size = sizeof i;
        check(dynq_packed_weights_get_info(p_, &i), "dynq_packed_weights_get_info");
        return i;
    }
    std::size_t n() const { return info().n; }
    std::size_t k() const { return info().k; }

    /* The C call as it is: y[m][ldy] = a[m][lda] x W^T + bias (bias may be NULL). */
    void gemm(const float *a, std::size_t m, std::size_t lda, const float *bias, float *y, std::size_t ldy,
              const dynq_gemm_config *config = NULL) const
    {
        check(dynq_gemm(p_, a, m, lda, bias, y, ldy, config), "dynq_gemm");
    }

    /* Dense rows: a holds m * k floats, the result m * n; bias is empty or n floats. */
    std::vector<float> gemm(const std::vector<float> &a, const std::vector<float> &bias = std::vector<float>(),
                            const dynq_gemm_config *config = NULL) const
    {
        dynq_packed_weights_info i = info();
        if (a.size() % i.k != 0) {
            throw error(DYNQ_STATUS_INVALID_ARGUMENT, "dynq::packed_weights::gemm: a has " +
                                                          std::to_string(a.size()) +
                                                          " floats, not a multiple of k = " +
                                                          std::to_string(i.k));
        }
        if (!bias.empty() && bias.size() != i.n) {
            throw error(DYNQ_STATUS_INVALID_ARGUMENT, "dynq::packed_weights::gemm: bias has " +
                                                          std::to_string(bias.size()) + " floats, expected n = " +
                                                          std::to_string(i.n));
        }
        std::size_t m = a.size() / i.k;
        std::vector<float> y(m * i.n);
        gemm(m ? a.data() : NULL, m, i.k, bias.empty() ? NULL : bias.data(), m ? y.data() : NULL, i.n, config);
        return y;
    }

    /* With per-input-channel smoothing factors (dynq_gemm_smoothed): row i of a is quantized as
       a[i][j] * smooth[j]; smooth is empty (then this is gemm) or k positive finite floats. */
    std::vector<float> gemm_smoothed(const std::vector<float> &a, const std::vector<float> &smooth,
                                     const std::vector<float> &bias = std::vector<float>(),
                                     const dynq_gemm_config *config = NULL) const
    {
        dynq_packed_weights_info i = info();
        if (!smooth.empty() && smooth.size() != i.k) {
            throw error(DYNQ_STATUS_INVALID_ARGUMENT, "dynq::packed_weights::gemm_smoothed: smooth has " +
                                                          std::to_string(smooth.size()) + " floats, expected k = " +
                                                          std::to_string(i.k));
        }
        if (a.size() % i.k != 0 || (!bias.empty() && bias.size() != i.n)) {
            return gemm(a, bias, config); /* the same messages */
        }
        std::size_t m = a.size() / i.k;
        std::vector<float> y(m * i.n);
        check(dynq_gemm_smoothed(p_, m ? a.data() : NULL, DYNQ_DTYPE_F32, m, i.k, smooth.empty() ? NULL : smooth.data(),
                                 bias.empty() ? NULL : bias.data(), m ? y.data() : NULL, DYNQ_DTYPE_F32, i.n, config),
              "dynq_gemm_smoothed");
        return y;
    }

    /* Plus a residual (dynq_gemm_residual): y = act(product + bias) + residual, one float
       addition per element after the epilogue (a transformer's skip connection, fused).
       residual is empty (then this is gemm_smoothed) or m * n floats; smooth and bias as in
       gemm_smoothed. */
    std::vector<float> gemm_residual(const std::vector<float> &a, const std::vector<float> &residual,
                                     const std::vector<float> &smooth = std::vector<float>(),
                                     const std::vector<float> &bias = std::vector<float>(),
                                     const dynq_gemm_config *config = NULL) const
    {
        dynq_packed_weights_info i = info();
        if (residual.empty() || a.size() % i.k != 0 || (!smooth.empty() && smooth.size() != i.k) ||
            (!bias.empty() && bias.size() != i.n)) {
            return gemm_smoothed(a, smooth, bias, config); /* no residual, or it throws the same messages */
        }
        std::size_t m = a.size() / i.k;
        if (residual.size() != m * i.n) {
            throw error(DYNQ_STATUS_INVALID_ARGUMENT, "dynq::packed_weights::gemm_residual: residual has " +
                                                          std::to_string(residual.size()) + " floats, expected m * n = " +
                                                          std::to_string(m * i.n));
        }
        std::vector<float> y(m * i.n);
        check(dynq_gemm_residual(p_, m ? a.data() : NULL, DYNQ_DTYPE_F32, m, i.k, smooth.empty() ? NULL : smooth.data(),
                                 bias.empty() ? NULL : bias.data(), m ? residual.data() : NULL, i.n, m ? y.data() : NULL,
                                 DYNQ_DTYPE_F32, i.n, config),
              "dynq_gemm_residual");
        return y;
    }

    /* Plus a layer norm of each output row (dynq_gemm_layer_norm): y = LayerNorm(act(product +
       bias) + residual) * ln_scale + ln_bias over each row's n values, with dynq's fixed
       arithmetic (the same bits on every CPU). residual is empty or m * n floats, ln_scale n
       floats, ln_bias empty or n floats; smooth and bias as in gemm_smoothed. */
    std::vector<float> gemm_layer_norm(const std::vector<float> &a, const std::vector<float> &residual,
                                       const std::vector<float> &ln_scale,
                                       const std::vector<float> &ln_bias = std::vector<float>(),
                                       float ln_epsilon = 1e-5f,
                                       const std::vector<float> &smooth = std::vector<float>(),
                                       const std::vector<float> &bias = std::vector<float>(),
                                       const dynq_gemm_config *config = NULL) const
    {
        dynq_packed_weights_info i = info();
        const char *fn = "dynq::packed_weights::gemm_layer_norm: ";
        if (a.size() % i.k != 0) {
            throw error(DYNQ_STATUS_INVALID_ARGUMENT, std::string(fn) + "a has " + std::to_string(a.size()) +
                                                          " floats, not a multiple of k = " + std::to_string(i.k));
        }
        std::size_t m = a.size() / i.k;
        if (!residual.empty() && residual.size() != m * i.n) {
            throw error(DYNQ_STATUS_INVALID_ARGUMENT, std::string(fn) + "residual has " + std::to_string(residual.size()) +
                                                          " floats, expected m * n = " + std::to_string(m * i.n));
        }
        if (ln_scale.size() != i.n || (!ln_bias.empty() && ln_bias.size() != i.n) ||
            (!smooth.empty() && smooth.size() != i.k) || (!bias.empty() && bias.size() != i.n)) {
            throw error(DYNQ_STATUS_INVALID_ARGUMENT, std::string(fn) + "ln_scale (and ln_bias, bias if given) must have n = " +
                                                          std::to_string(i.n) + " floats, smooth k = " + std::to_string(i.k));
        }
        std::vector<float> y(m * i.n);
        check(dynq_gemm_layer_norm(p_, m ? a.data() : NULL, DYNQ_DTYPE_F32, m, i.k, smooth.empty() ? NULL : smooth.data(),
                                   bias.empty() ? NULL : bias.data(), (m && !residual.empty()) ? residual.data() : NULL, i.n,
                                   ln_scale.data(), ln_bias.empty() ? NULL : ln_bias.data(), ln_epsilon,
                                   m ? y.data() : NULL, DYNQ_DTYPE_F32, i.n, config),
              "dynq_gemm_layer_norm");
        return y;
    }

    /* The product's columns in several outputs (dynq_gemm_split): output g holds widths[g]
       columns (dense rows), the widths adding up to n; smooth and bias as in gemm_smoothed. */
    std::vector<std::vector<float> > gemm_split(const std::vector<float> &a, const std::vector<std::size_t> &widths,
                                                const std::vector<float> &smooth = std::vector<float>(),
                                                const std::vector<float> &bias = std::vector<float>(),
                                                const dynq_gemm_config *config = NULL) const
    {
        return split(a, widths, NULL, smooth, bias, config);
    }

    /* gemm_split with output g in the attention-head layout heads[g] (dynq_gemm_split_heads;
       heads[g].heads == 0: dense rows; heads empty: all dense): [batch, heads, seq, d], or
       [batch, heads, d, seq] when transposed, with m = batch * seq rows. */
    std::vector<std::vector<float> > gemm_split_heads(const std::vector<float> &a, const std::vector<std::size_t> &widths,
                                                      const std::vector<dynq_heads> &heads,
                                                      const std::vector<float> &smooth = std::vector<float>(),
                                                      const std::vector<float> &bias = std::vector<float>(),
                                                      const dynq_gemm_config *config = NULL) const
    {
        if (!heads.empty() && heads.size() != widths.size()) {
            throw error(DYNQ_STATUS_INVALID_ARGUMENT, "dynq::packed_weights::gemm_split_heads: heads must be empty or have one entry per output");
        }
        return split(a, widths, &heads, smooth, bias, config);
    }

    const dynq_packed_weights *get() const noexcept { return p_; }
    /* Gives up ownership; the caller frees the handle with dynq_packed_weights_free. */
    dynq_packed_weights *release() noexcept
    {
        dynq_packed_weights *p = p_;
        p_ = NULL;
        return p;
    }
    explicit operator bool() const noexcept { return p_ != NULL; }

private:
    /* gemm_split (heads NULL: dynq_gemm_split) and gemm_split_heads (dynq_gemm_split_heads). */
    std::vector<std::vector<float> > split(const std::vector<float> &a, const std::vector<std::size_t> &widths,
                                           const std::vector<dynq_heads> *heads, const std::vector<float> &smooth,
                                           const std::vector<float> &bias, const dynq_gemm_config *config) const
    {
        dynq_packed_weights_info i = info();
        if (a.size() % i.k != 0 || (!smooth.empty() && smooth.size() != i.k) || (!bias.empty() && bias.size() != i.n)) {
            gemm_smoothed(a, smooth, bias, config); /* throws the same messages */
        }
        std::size_t m = a.size() / i.k;
        std::vector<std::vector<float> > ys(widths.size());
        std::vector<dynq_output> outs(widths.size());
        for (std::size_t g = 0; g < widths.size(); g++) {
            ys[g].resize(m * widths[g]);
            outs[g].y = (m && widths[g]) ? ys[g].data() : NULL;
            outs[g].ldy = widths[g];
            outs[g].cols = widths[g];
        }
        const float *ap = m ? a.data() : NULL, *sp = smooth.empty() ? NULL : smooth.data();
        const float *bp = bias.empty() ? NULL : bias.data();
        dynq_output *op = outs.empty() ? NULL : outs.data();
        if (heads == NULL) {
            check(dynq_gemm_split(p_, ap, DYNQ_DTYPE_F32, m, i.k, sp, bp, op, outs.size(), DYNQ_DTYPE_F32, config),
                  "dynq_gemm_split");
        } else {
            check(dynq_gemm_split_heads(p_, ap, DYNQ_DTYPE_F32, m, i.k, sp, bp, op, heads->empty() ? NULL : heads->data(),
                                        outs.size(), DYNQ_DTYPE_F32, config),
                  "dynq_gemm_split_heads");
        }
        return ys;
    }

    dynq_packed_weights *p_;
};

} // namespace dynq

#endif /* DYNQ_HPP */
