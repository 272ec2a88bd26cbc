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
	const op = "GemmEx"
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
	if !a.dtype.known() || !y.dtype.known() {
		// The library names the bad value. It gets no buffers and m = 0, so nothing can be
		// read or written whatever size it gives the type; should a newer library know the
		// type, this binding still does not.
		err := call(op, func() C.dynq_status {
			return C.dynq_gemm_ex(p.h, nil, C.uint32_t(a.dtype), 0, C.size_t(k), nil, nil, C.uint32_t(y.dtype),
				C.size_t(n), &cfg)
		})
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
	var ap, yp unsafe.Pointer
	if m > 0 {
		ap, yp = a.ptr(), y.ptr()
	}
	var bp *C.float
	if len(bias) > 0 {
		bp = (*C.float)(unsafe.Pointer(&bias[0]))
	}
	err = call(op, func() C.dynq_status {
		return C.dynq_gemm_ex(p.h, ap, C.uint32_t(a.dtype), C.size_t(m), C.size_t(k), bp, yp, C.uint32_t(y.dtype),
			C.size_t(n), &cfg)
	})
	runtime.KeepAlive(a)
	runtime.KeepAlive(y)
	runtime.KeepAlive(bias)
	return err
}
