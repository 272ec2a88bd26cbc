package dynq

/*
#include <dynq.h>
*/
import "C"

import (
	"fmt"
	"runtime"
	"unsafe"
)

// DType is the element type of the activations and outputs of GemmEx.
type DType uint32

const (
	DTypeF32  DType = C.DYNQ_DTYPE_F32  // IEEE binary32, as []float32
	DTypeF16  DType = C.DYNQ_DTYPE_F16  // IEEE binary16, as []uint16 bit patterns (Float16bits)
	DTypeBF16 DType = C.DYNQ_DTYPE_BF16 // bfloat16, as []uint16 bit patterns (BFloat16bits)
)

// String is "f32", "f16", "bf16", or "DType(n)" for other values.
func (d DType) String() string {
	switch d {
	case DTypeF32:
		return "f32"
	case DTypeF16:
		return "f16"
	case DTypeBF16:
		return "bf16"
	}
	return fmt.Sprintf("DType(%d)", uint32(d))
}

// known reports whether this binding knows the element size of d.
func (d DType) known() bool { return d == DTypeF32 || d == DTypeF16 || d == DTypeBF16 }

// Slice is a Go slice of activations or outputs tagged with its element type, for GemmEx:
// F32(s), F16(s) or BF16(s), or Slice16(s, t) when the 16-bit type is chosen at run time. The
// zero Slice is an empty float32 slice.
type Slice struct {
	dtype  DType
	bits16 bool // u16 holds the elements, else f32
	f32    []float32
	u16    []uint16
}

// F32 tags float32 elements.
func F32(s []float32) Slice { return Slice{dtype: DTypeF32, f32: s} }

// F16 tags float16 elements, as bit patterns (see Float16bits and Float16frombits).
func F16(s []uint16) Slice { return Slice{dtype: DTypeF16, bits16: true, u16: s} }

// BF16 tags bfloat16 elements, as bit patterns (see BFloat16bits and BFloat16frombits).
func BF16(s []uint16) Slice { return Slice{dtype: DTypeBF16, bits16: true, u16: s} }

// Slice16 tags 16-bit elements with a type known at run time (say, read from a model's
// configuration): DTypeF16 or DTypeBF16. GemmEx refuses DTypeF32 (float32 elements need F32)
// with StatusInvalidArgument, and values that are no element type with the library's message.
func Slice16(s []uint16, t DType) Slice { return Slice{dtype: t, bits16: true, u16: s} }

// DType is the element type.
func (s Slice) DType() DType { return s.dtype }

// Len is the number of elements.
func (s Slice) Len() int {
	if s.bits16 {
		return len(s.u16)
	}
	return len(s.f32)
}

// ptr is the address of the first element; nil when empty.
func (s Slice) ptr() unsafe.Pointer {
	switch {
	case s.bits16 && len(s.u16) > 0:
		return unsafe.Pointer(&s.u16[0])
	case !s.bits16 && len(s.f32) > 0:
		return unsafe.Pointer(&s.f32[0])
	}
	return nil
}

// checkTag refuses 16-bit elements tagged f32 (Slice16(s, DTypeF32)): the library would read
// 4 bytes for each.
func (s Slice) checkTag(op, name string) error {
	if s.bits16 && s.dtype == DTypeF32 {
		return invalid(op, "%s holds 16-bit elements tagged %v; float32 elements need F32", name, s.dtype)
	}
	return nil
}

// GemmEx is Gemm with activations and outputs of other element types: y and a are each
// float32, float16 or bfloat16 (F32, F16, BF16), in any combination; the bias stays float32.
// The inputs are widened to float32 exactly and the float32 result is rounded to y's type
// (to nearest, ties to even, as Float16bits and BFloat16bits do), so the result equals Gemm
// on the widened inputs, rounded, on every CPU.
//
// a holds m rows of K() elements (m = a.Len() / K(), zero allowed), y receives exactly m*N()
// elements, bias is nil (or empty) or N() values. Element types and lengths are checked
// before anything is computed: a shape mismatch, or float32 elements tagged otherwise, fails
// with StatusInvalidArgument; an unknown element type with the library's message. NaN or
// infinity in a or bias fails with StatusNonFinite naming the element, leaving y untouched.
// opts may be nil. Safe to call from many goroutines at once.
func (p *PackedWeights) GemmEx(y, a Slice, bias []float32, opts *GemmOptions) error {
	return p.gemmTyped("GemmEx", cGemmEx, y, a, nil, bias, Slice{}, opts)
}

// GemmSmoothed is GemmEx with per-input-channel smoothing factors (SmoothQuant): row i of a is
// quantized as a[i][j] * smooth[j], one float32 multiplication of the widened element, so the
// result is bit for bit GemmEx (or Gemm) on float32 activations multiplied by smooth. Quantize
// the weights with column j of W[N][K] (row j of W[K][N]) divided by smooth[j]: the product
// is the same, but channels of a with very different ranges share one quantization range
// better.
//
// smooth is nil (or empty), which makes this GemmEx, or K() positive finite values; other
// lengths fail with StatusInvalidArgument before any C call. Factors that are zero, negative,
// NaN or infinite fail with StatusInvalidArgument and the library's message ("smoothing factor
// [j] is NaN; ..."), a product that overflows float32 with StatusNonFinite; y is then left
// untouched. smooth must not share memory with y. Everything else as GemmEx.
func (p *PackedWeights) GemmSmoothed(y, a Slice, smooth, bias []float32, opts *GemmOptions) error {
	return p.gemmTyped("GemmSmoothed", cGemmSmoothed, y, a, smooth, bias, Slice{}, opts)
}

// GemmResidual is GemmSmoothed with a residual added to the result (the skip connection
// x + Linear(h) of a transformer block, fused into the product; dynq_gemm_residual):
// y[i][j] = act(product + bias[j]) + residual[i][j], the epilogue first, then one float32
// addition of the residual element widened exactly, then the rounding to y's type. The result
// is bit for bit GemmSmoothed with float32 outputs followed by that addition, rounded to y's
// type as Float16bits and BFloat16bits do.
//
// residual has y's element type and y's length: m rows of N() elements (m*N() in all), read
// at stride N(). An empty residual (the zero Slice, or any Slice of length 0) is none, which
// makes this GemmSmoothed. Another length, another element type than y's, or 16-bit elements
// tagged DTypeF32 fail with StatusInvalidArgument before any C call. residual must not share
// memory with y: to accumulate into y, copy it first; the library refuses an overlap with
// StatusInvalidArgument ("y overlaps residual; ..."), leaving y untouched. NaN or infinity in
// residual is added as it is (NaN or infinity in that element only). Everything else as
// GemmSmoothed.
func (p *PackedWeights) GemmResidual(y, a, residual Slice, smooth, bias []float32, opts *GemmOptions) error {
	return p.gemmTyped("GemmResidual", cGemmResidual, y, a, smooth, bias, residual, opts)
}

// LayerNorm is the layer normalization GemmLayerNorm applies to each output row: Scale and
// Bias (nil: none) hold N() finite values, Epsilon is finite and >= 0 (1e-5 is ONNX's default).
type LayerNorm struct {
	Scale   []float32
	Bias    []float32
	Epsilon float32
}

// GemmLayerNorm is GemmResidual followed by a layer norm of each output row
// (dynq_gemm_layer_norm): y[i] = LayerNorm(act(product + bias) + residual)[i] * ln.Scale +
// ln.Bias over the row's N() values, the post-LN transformer block (BERT's
// LayerNorm(x + Linear(h))) in one call. The arithmetic has one fixed order (64 lane sums, a
// halving tree, a two-pass variance, one float32 operation per step), so the result is the
// same bits on every CPU and thread count; 16-bit outputs normalize the rounded sums and are
// rounded again. residual may be empty (none). ln.Scale of another length than N(), or
// ln.Bias neither nil nor N() values, fail with StatusInvalidArgument before any C call; NaN
// or infinity in them with StatusNonFinite, a bad epsilon with StatusInvalidArgument (the
// library's messages), y untouched. They must not share memory with y. Everything else as
// GemmResidual.
func (p *PackedWeights) GemmLayerNorm(y, a, residual Slice, ln LayerNorm, smooth, bias []float32,
	opts *GemmOptions) error {
	return p.gemmTypedLN("GemmLayerNorm", cGemmLayerNorm, y, a, smooth, bias, residual, &ln, opts)
}

// cFunction selects the C function of gemmTyped.
type cFunction int

const (
	cGemmEx        cFunction = iota // dynq_gemm_ex: no smooth, no residual
	cGemmSmoothed                   // dynq_gemm_smoothed: smooth nil or K() values
	cGemmResidual                   // dynq_gemm_residual: smooth as above, residual empty or m*N()
	cGemmLayerNorm                  // dynq_gemm_layer_norm: as dynq_gemm_residual, plus the layer norm
)

// gemmTyped holds the checks and the C call of GemmEx (dynq_gemm_ex), GemmSmoothed
// (dynq_gemm_smoothed, with smooth nil or K() values) and GemmResidual (dynq_gemm_residual,
// with residual empty or m*N() elements of y's type).
func (p *PackedWeights) gemmTyped(op string, fn cFunction, y, a Slice, smooth, bias []float32, residual Slice,
	opts *GemmOptions) error {
	return p.gemmTypedLN(op, fn, y, a, smooth, bias, residual, nil, opts)
}

// gemmTypedLN is gemmTyped with the layer norm of GemmLayerNorm (ln non-nil with
// cGemmLayerNorm).
func (p *PackedWeights) gemmTypedLN(op string, fn cFunction, y, a Slice, smooth, bias []float32, residual Slice,
	ln *LayerNorm, opts *GemmOptions) error {
	p.mu.RLock()
	defer p.mu.RUnlock()
	if p.h == nil {
		return ErrClosed
	}
	n, k := p.n, p.k
	cfg, err := opts.toC(op)
	if err != nil {
		return err
	}
	// cgemm calls the C function of op; smooth is nil or K() values, residual nil or m*N()
	// elements of y's type at stride N().
	cgemm := func(ap unsafe.Pointer, m int, sp, bp *C.float, rp, yp unsafe.Pointer) C.dynq_status {
		switch fn {
		case cGemmLayerNorm:
			var gp, lbp *C.float
			if len(ln.Scale) > 0 {
				gp = (*C.float)(unsafe.Pointer(&ln.Scale[0]))
			}
			if len(ln.Bias) > 0 {
				lbp = (*C.float)(unsafe.Pointer(&ln.Bias[0]))
			}
			return C.dynq_gemm_layer_norm(p.h, ap, C.uint32_t(a.dtype), C.size_t(m), C.size_t(k), sp, bp, rp,
				C.size_t(n), gp, lbp, C.float(ln.Epsilon), yp, C.uint32_t(y.dtype), C.size_t(n), &cfg)
		case cGemmResidual:
			return C.dynq_gemm_residual(p.h, ap, C.uint32_t(a.dtype), C.size_t(m), C.size_t(k), sp, bp, rp,
				C.size_t(n), yp, C.uint32_t(y.dtype), C.size_t(n), &cfg)
		case cGemmSmoothed:
			return C.dynq_gemm_smoothed(p.h, ap, C.uint32_t(a.dtype), C.size_t(m), C.size_t(k), sp, bp, yp,
				C.uint32_t(y.dtype), C.size_t(n), &cfg)
		}
		return C.dynq_gemm_ex(p.h, ap, C.uint32_t(a.dtype), C.size_t(m), C.size_t(k), bp, yp, C.uint32_t(y.dtype),
			C.size_t(n), &cfg)
	}
	if !a.dtype.known() || !y.dtype.known() {
		// The library names the bad value. It gets no buffers and m = 0, so nothing can be
		// read or written whatever size it gives the type; should a newer library know the
		// type, this binding still does not.
		err := call(op, func() C.dynq_status { return cgemm(nil, 0, nil, nil, nil, nil) })
		if err != nil {
			return err
		}
		return invalid(op, "element types a=%v, y=%v: this binding knows f32, f16 and bf16 only", a.dtype, y.dtype)
	}
	if err := a.checkTag(op, "a"); err != nil {
		return err
	}
	if err := y.checkTag(op, "y"); err != nil {
		return err
	}
	m, err := gemmShape(op, a.Len(), y.Len(), len(bias), n, k)
	if err != nil {
		return err
	}
	if len(smooth) != 0 && len(smooth) != k {
		return invalid(op, "len(smooth) = %d, expected 0 or k = %d (one factor per input channel)", len(smooth), k)
	}
	if ln != nil {
		if len(ln.Scale) != n {
			return invalid(op, "len(ln.Scale) = %d, expected n = %d", len(ln.Scale), n)
		}
		if ln.Bias != nil && len(ln.Bias) != n {
			return invalid(op, "len(ln.Bias) = %d, expected nil or n = %d", len(ln.Bias), n)
		}
	}
	if residual.Len() != 0 {
		if err := residual.checkTag(op, "residual"); err != nil {
			return err
		}
		if residual.dtype != y.dtype {
			return invalid(op, "residual is %v, expected y's element type %v", residual.dtype, y.dtype)
		}
		if residual.Len() != y.Len() {
			return invalid(op, "len(residual) = %d, expected 0 (none) or len(y) = m*n = %d*%d = %d", residual.Len(),
				m, n, m*n)
		}
	}
	var ap, yp, rp unsafe.Pointer
	if m > 0 {
		ap, yp, rp = a.ptr(), y.ptr(), residual.ptr()
	}
	var sp, bp *C.float
	if len(smooth) > 0 {
		sp = (*C.float)(unsafe.Pointer(&smooth[0]))
	}
	if len(bias) > 0 {
		bp = (*C.float)(unsafe.Pointer(&bias[0]))
	}
	err = call(op, func() C.dynq_status { return cgemm(ap, m, sp, bp, rp, yp) })
	runtime.KeepAlive(a)
	runtime.KeepAlive(y)
	runtime.KeepAlive(residual)
	runtime.KeepAlive(ln)
	runtime.KeepAlive(smooth)
	runtime.KeepAlive(bias)
	return err
}
