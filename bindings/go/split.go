//go:build go1.21

// GemmSplit and GemmSplitHeads need Go 1.21 (runtime.Pinner): the table of outputs handed to C
// holds a pointer to each output, which the cgo rules allow only for pinned memory. With an
// older Go the rest of the binding builds and works; GemmSplit and GemmSplitHeads are absent.

package dynq

/*
#include <dynq.h>
*/
import "C"

import (
	"fmt"
	"math"
	"runtime"
	"unsafe"
)

// GemmSplit is GemmSmoothed with the columns of the result sent to several outputs
// (dynq_gemm_split): ys[0] receives the first widths[0] columns of the product, ys[1] the next
// widths[1], and so on; the widths must add up to N(). Each element is bit for bit that column
// of GemmSmoothed. This is how layers that read one input (a transformer's Q, K and V, packed
// as one matrix with their weights side by side) run as one call: a is quantized and read
// once, and each layer gets a matrix of its own, with no copy.
//
// ys[g] holds m rows of widths[g] values (dense, at stride widths[g]: m*widths[g] elements in
// all), with m = a.Len() / K() as in GemmEx; every ys[g] has the same element type, F32, F16 or
// BF16. The binding checks before any C call that there is one width per output, that no
// width is negative, that the outputs share one element type, that no 16-bit output is tagged
// DTypeF32, and each length, failing with StatusInvalidArgument. The library refuses, with
// StatusInvalidArgument and its message, no outputs at all ("num_outputs is 0; ..."), a zero
// width ("outputs[1].cols is 0"), widths that do not add up to N() ("output widths [5, 55] must
// add up to n = 61"), and outputs that share memory with each other, a, smooth or bias
// ("outputs[1].y overlaps outputs[0].y; ..."). On any error every output is left untouched.
// Everything else (a, smooth, bias, opts) as GemmSmoothed.
//
// C never keeps the pointers: the outputs are pinned (runtime.Pinner) for the duration of the
// call only, since the table of outputs handed to C holds a pointer to each.
func (p *PackedWeights) GemmSplit(ys []Slice, widths []int, a Slice, smooth, bias []float32, opts *GemmOptions) error {
	return p.gemmSplit("GemmSplit", ys, widths, nil, a, smooth, bias, opts)
}

// Heads is the attention-head layout of one output of GemmSplitHeads. The zero value is the
// dense layout of GemmSplit. Otherwise the output's m rows are m/Seq sequences of Seq tokens
// and its width columns are Heads heads of d = width/Heads values: row b*Seq+s, column h*d+e
// goes to y[((b*Heads+h)*Seq+s)*d+e] ([batch, heads, seq, d], the reshape and transpose of
// attention's queries and values) or, with Transposed, to y[((b*Heads+h)*d+e)*Seq+s]
// ([batch, heads, d, seq], transposed keys). The values are the dense layout's bits.
type Heads struct {
	Heads, Seq int
	Transposed bool
}

// GemmSplitHeads is GemmSplit with output g in the layout heads[g] (dynq_gemm_split_heads):
// a transformer's Q, K and V written straight into the tensors attention reads. heads has one
// entry per output (or is nil: GemmSplit). Besides GemmSplit's errors, the library refuses with
// StatusInvalidArgument a Seq of 0 or not dividing m ("... rows are not whole sequences of 5")
// and a head count not dividing the width ("... columns do not split into 5 heads"); the
// binding refuses negative Heads or Seq and a heads slice of another length.
func (p *PackedWeights) GemmSplitHeads(ys []Slice, widths []int, heads []Heads, a Slice, smooth, bias []float32,
	opts *GemmOptions) error {
	const op = "GemmSplitHeads"
	if heads != nil && len(heads) != len(ys) {
		return invalid(op, "len(heads) = %d, len(ys) = %d: one layout per output", len(heads), len(ys))
	}
	for g, h := range heads {
		if h.Heads < 0 || h.Seq < 0 {
			return invalid(op, "heads[%d] = %+v: Heads and Seq must not be negative", g, h)
		}
	}
	return p.gemmSplit(op, ys, widths, heads, a, smooth, bias, opts)
}

// gemmSplit is GemmSplit (heads nil) and GemmSplitHeads.
func (p *PackedWeights) gemmSplit(op string, ys []Slice, widths []int, heads []Heads, a Slice, smooth, bias []float32,
	opts *GemmOptions) error {
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
	if len(ys) != len(widths) {
		return invalid(op, "len(ys) = %d, len(widths) = %d: one width per output", len(ys), len(widths))
	}
	yt := DTypeF32 // no outputs: the library refuses num_outputs 0
	if len(ys) > 0 {
		yt = ys[0].dtype
	}
	for g, y := range ys {
		if widths[g] < 0 {
			return invalid(op, "widths[%d] = %d is negative", g, widths[g])
		}
		if y.dtype != yt {
			return invalid(op, "ys[%d] is %v, expected ys[0]'s element type %v (the outputs share one type)", g,
				y.dtype, yt)
		}
	}
	// The table of outputs, in Go memory: it holds Go pointers (to the outputs' elements), which
	// the cgo rules allow in memory passed to C only when they are pinned (below).
	outs := make([]C.dynq_output, len(ys)+1) // +1: &outs[0] exists without outputs too
	for g, w := range widths {
		outs[g].ldy = C.size_t(w)
		outs[g].cols = C.size_t(w)
	}
	// The layouts, in Go memory without Go pointers (C may read them for the call).
	var hs []C.dynq_heads
	if heads != nil {
		hs = make([]C.dynq_heads, len(ys)+1)
		for g, h := range heads {
			hs[g].heads = C.size_t(h.Heads)
			hs[g].seq = C.size_t(h.Seq)
			if h.Transposed {
				hs[g].transposed = 1
			}
		}
	}
	cgemm := func(ap unsafe.Pointer, m int, sp, bp *C.float) C.dynq_status {
		if hs != nil {
			return C.dynq_gemm_split_heads(p.h, ap, C.uint32_t(a.dtype), C.size_t(m), C.size_t(k), sp, bp, &outs[0],
				&hs[0], C.size_t(len(ys)), C.uint32_t(yt), &cfg)
		}
		return C.dynq_gemm_split(p.h, ap, C.uint32_t(a.dtype), C.size_t(m), C.size_t(k), sp, bp, &outs[0],
			C.size_t(len(ys)), C.uint32_t(yt), &cfg)
	}
	if !a.dtype.known() || !yt.known() {
		// The library names the bad value, with m = 0 and no buffers, as in GemmEx.
		err := call(op, func() C.dynq_status { return cgemm(nil, 0, nil, nil) })
		if err != nil {
			return err
		}
		return invalid(op, "element types a=%v, ys=%v: this binding knows f32, f16 and bf16 only", a.dtype, yt)
	}
	if err := a.checkTag(op, "a"); err != nil {
		return err
	}
	for g, y := range ys {
		if err := y.checkTag(op, fmt.Sprintf("ys[%d]", g)); err != nil {
			return err
		}
	}
	if a.Len()%k != 0 {
		return invalid(op, "len(a) = %d is not a multiple of k = %d", a.Len(), k)
	}
	m := a.Len() / k
	if len(bias) != 0 && len(bias) != n {
		return invalid(op, "len(bias) = %d, expected 0 or n = %d", len(bias), n)
	}
	if len(smooth) != 0 && len(smooth) != k {
		return invalid(op, "len(smooth) = %d, expected 0 or k = %d (one factor per input channel)", len(smooth), k)
	}
	for g, y := range ys {
		w := widths[g]
		if m > 0 && w > math.MaxInt/m {
			return invalid(op, "widths[%d] = %d: m*widths[%d] = %d*%d overflows int", g, w, g, m, w)
		}
		if y.Len() != m*w {
			return invalid(op, "len(ys[%d]) = %d, expected m*widths[%d] = %d*%d = %d", g, y.Len(), g, m, w, m*w)
		}
	}
	var pinner runtime.Pinner
	defer pinner.Unpin()
	var ap unsafe.Pointer
	if m > 0 {
		ap = a.ptr()
		for g, y := range ys {
			if yp := y.ptr(); yp != nil { // nil for a zero width, which the library refuses
				pinner.Pin(yp)
				outs[g].y = yp
			}
		}
	}
	var sp, bp *C.float
	if len(smooth) > 0 {
		sp = (*C.float)(unsafe.Pointer(&smooth[0]))
	}
	if len(bias) > 0 {
		bp = (*C.float)(unsafe.Pointer(&bias[0]))
	}
	err = call(op, func() C.dynq_status { return cgemm(ap, m, sp, bp) })
	runtime.KeepAlive(a)
	runtime.KeepAlive(ys)
	runtime.KeepAlive(smooth)
	runtime.KeepAlive(bias)
	return err
}
