// Package dynq is the Go binding of dynq, dynamic int8 quantization for the linear layers of
// neural networks: weights are quantized to int8 once (Pack), activations are quantized from
// the range seen in each call (Gemm), and the product runs as exact integer dot products,
// dequantized to float32 with a fused bias and activation. Results are bit-identical on
// every CPU and thread count. GemmEx takes and returns float16 and bfloat16 too, as uint16
// bit patterns (Float16bits, BFloat16bits); GemmSmoothed adds per-input-channel smoothing
// factors (SmoothQuant), GemmResidual a residual added to the result (a skip connection), and
// GemmSplit sends the result's columns to several outputs (Q, K and V in one call).
//
// The package is a thin layer over the C ABI of libdynq (dynq.h), linked through pkg-config:
// module dynq by default, dynq-static with the build tag dynq_static.
//
// Memory: C never keeps a Go pointer. Slices are only read or written during the call that
// receives them (GemmSplit pins its outputs for that call, with runtime.Pinner); the packed
// weights live in C memory, owned by a PackedWeights and released by Close (or, as a safety
// net, by a finalizer).
//
// Errors are *Error values carrying the library's status and detailed message;
// errors.Is(err, dynq.StatusCorruptData) tests the status.
package dynq

/*
#include <stdlib.h>
#include <dynq.h>
*/
import "C"

import (
	"errors"
	"fmt"
	"math"
	"runtime"
	"sync"
	"unsafe"
)

// HeaderABIVersion is the C ABI version of the dynq.h this package was compiled against.
const HeaderABIVersion = int(C.DYNQ_ABI_VERSION)

// Version is the library's version, e.g. "0.1.0".
func Version() string { return C.GoString(C.dynq_version()) }

// ABIVersion is the C ABI version the linked library implements; it equals HeaderABIVersion
// unless the program loaded a libdynq other than the one it was built against.
func ABIVersion() int { return int(C.dynq_abi_version()) }

// Layout is the memory layout of a weight matrix.
type Layout uint32

const (
	// LayoutNK is [N][K] row-major, one row per output channel (PyTorch Linear, ONNX Gemm transB=1).
	LayoutNK Layout = C.DYNQ_WEIGHT_LAYOUT_NK
	// LayoutKN is [K][N] row-major, one row per input feature (ONNX MatMul).
	LayoutKN Layout = C.DYNQ_WEIGHT_LAYOUT_KN
)

// WeightGranularity selects one weight scale per output channel or one for the matrix.
type WeightGranularity uint32

const (
	WeightPerChannel WeightGranularity = C.DYNQ_WEIGHT_GRANULARITY_PER_CHANNEL // the default
	WeightPerTensor  WeightGranularity = C.DYNQ_WEIGHT_GRANULARITY_PER_TENSOR
)

// ActGranularity selects the range over which activations are quantized.
type ActGranularity uint32

const (
	ActPerRow    ActGranularity = C.DYNQ_ACT_GRANULARITY_PER_ROW    // per token, the default
	ActPerTensor ActGranularity = C.DYNQ_ACT_GRANULARITY_PER_TENSOR // as ONNX DynamicQuantizeLinear
)

// ActType is the activation quantization scheme.
type ActType uint32

const (
	ActAsymmetricU8 ActType = C.DYNQ_ACT_TYPE_ASYMMETRIC_U8 // uint8 with a zero point, the default
	ActSymmetricI8  ActType = C.DYNQ_ACT_TYPE_SYMMETRIC_I8  // int8 in [-127, 127], no zero point
)

// Epilogue is the operation fused after the bias.
type Epilogue uint32

const (
	EpilogueNone Epilogue = C.DYNQ_EPILOGUE_NONE // the default
	EpilogueReLU Epilogue = C.DYNQ_EPILOGUE_RELU // max(y, 0)
	// EpilogueGELU is GELU in its erf form, 0.5 * y * (1 + erf(y / sqrt(2))), with dynq's own
	// erf approximation (error below 3.5e-7), identical on every CPU.
	EpilogueGELU Epilogue = C.DYNQ_EPILOGUE_GELU
	// EpilogueGELUTanh is GELU in its tanh form (GPT-2's gelu_new, ONNX Runtime's FastGelu),
	// 0.5 * y * (1 + tanh(sqrt(2/pi) * (y + 0.044715 * y^3))), with dynq's own tanh
	// approximation (error below 3.5e-7), identical on every CPU.
	EpilogueGELUTanh Epilogue = C.DYNQ_EPILOGUE_GELU_TANH
	// EpilogueSiLU is y * sigmoid(y) (SiLU or Swish, the gate of LLaMA's MLP), computed as
	// y/2 + y/2 * tanh(y/2) with the same tanh, identical on every CPU.
	EpilogueSiLU Epilogue = C.DYNQ_EPILOGUE_SILU
	// EpilogueQuickGELU is y * sigmoid(1.702 * y) (CLIP's QuickGELU), computed the same way.
	EpilogueQuickGELU Epilogue = C.DYNQ_EPILOGUE_QUICK_GELU
)

// ISA is a kernel family.
type ISA uint32

const (
	ISAAuto        ISA = C.DYNQ_ISA_AUTO // the best the CPU has, or the DYNQ_ISA environment variable
	ISAScalar      ISA = C.DYNQ_ISA_SCALAR
	ISAAVX2        ISA = C.DYNQ_ISA_AVX2
	ISAAVXVNNI     ISA = C.DYNQ_ISA_AVX_VNNI
	ISAAVX512VNNI  ISA = C.DYNQ_ISA_AVX512_VNNI
	ISANEON        ISA = C.DYNQ_ISA_NEON
	ISANEONDotprod ISA = C.DYNQ_ISA_NEON_DOTPROD
	ISANEONI8MM    ISA = C.DYNQ_ISA_NEON_I8MM
	ISAAMXINT8     ISA = C.DYNQ_ISA_AMX_INT8
)

// String is the library's name of the ISA ("avx2", ...), or "unknown".
func (i ISA) String() string { return C.GoString(C.dynq_isa_name(C.uint32_t(i))) }

// Available reports whether this CPU and build can run the ISA.
func (i ISA) Available() bool { return C.dynq_isa_available(C.uint32_t(i)) != 0 }

// ActiveISA is the ISA used when none is forced. It fails when the DYNQ_ISA environment
// variable names an ISA this CPU lacks, or none at all.
func ActiveISA() (ISA, error) {
	var isa C.uint32_t
	err := call("ActiveISA", func() C.dynq_status { return C.dynq_active_isa(&isa) })
	return ISA(isa), err
}

// PackOptions are the options of Pack, PackQuantized and Load. The zero value (and nil)
// means the defaults: per-channel scales, automatic ISA, 8-bit weights.
type PackOptions struct {
	Granularity WeightGranularity // ignored by PackQuantized and Load
	ISA         ISA               // the kernel family to pack for; ISAAuto by default
	// WeightQmax is the largest quantized weight magnitude for Pack, 1..127, or 0 for the
	// default 127. 64 (ONNX Runtime's reduce_range) halves the weights' resolution and lets
	// AVX2 CPUs without VNNI run a faster kernel, with the same results on every CPU.
	WeightQmax int
}

// GemmOptions are the options of Gemm. The zero value (and nil) means the defaults: per-row
// asymmetric uint8 activations, no epilogue, the default thread count.
type GemmOptions struct {
	ActGranularity ActGranularity
	ActType        ActType
	Epilogue       Epilogue
	// NumThreads: 0 = default (DYNQ_NUM_THREADS, else all cores), 1 = the calling thread only.
	NumThreads int
}

func (o *PackOptions) toC(op string) (C.dynq_pack_config, error) {
	var c C.dynq_pack_config
	// The sized init: writes exactly the struct this package was built with.
	if err := call(op, func() C.dynq_status {
		return C.dynq_pack_config_init_sized(&c, C.size_t(unsafe.Sizeof(c)))
	}); err != nil {
		return c, err
	}
	if o != nil {
		if o.WeightQmax < 0 || o.WeightQmax > 127 {
			return c, invalid(op, "WeightQmax = %d is out of range (1..127, or 0 for the default)", o.WeightQmax)
		}
		c.granularity = C.uint32_t(o.Granularity)
		c.isa = C.uint32_t(o.ISA)
		c.weight_qmax = C.uint32_t(o.WeightQmax)
	}
	return c, nil
}

func (o *GemmOptions) toC(op string) (C.dynq_gemm_config, error) {
	var c C.dynq_gemm_config
	if err := call(op, func() C.dynq_status { return C.dynq_gemm_config_init(&c) }); err != nil {
		return c, err
	}
	if o != nil {
		if o.NumThreads < 0 || int64(o.NumThreads) > math.MaxUint32 {
			return c, invalid(op, "NumThreads = %d is out of range", o.NumThreads)
		}
		c.act_granularity = C.uint32_t(o.ActGranularity)
		c.act_type = C.uint32_t(o.ActType)
		c.epilogue = C.uint32_t(o.Epilogue)
		c.num_threads = C.uint32_t(o.NumThreads)
	}
	return c, nil
}

// ErrClosed is returned by the methods of a PackedWeights after Close.
var ErrClosed = errors.New("dynq: packed weights used after Close")

// PackedWeights are quantized, packed weights: an n x k matrix W of a linear layer, ready for
// Gemm. Safe for concurrent use by many goroutines; Close waits for running calls.
type PackedWeights struct {
	mu   sync.RWMutex
	h    *C.dynq_packed_weights // nil after Close
	n, k int
}

func newPackedWeights(h *C.dynq_packed_weights) (*PackedWeights, error) {
	p := &PackedWeights{h: h}
	runtime.SetFinalizer(p, (*PackedWeights).finalize)
	info, err := p.Info()
	if err != nil {
		p.Close()
		return nil, err
	}
	p.n, p.k = info.N, info.K
	return p, nil
}

// finalize frees the handle of weights that were never closed. Unreachable, so unused.
func (p *PackedWeights) finalize() {
	if p.h != nil {
		C.dynq_packed_weights_free(p.h)
		p.h = nil
	}
}

// Close releases the packed weights. It waits for calls in progress; later calls return
// ErrClosed. Closing twice is a no-op.
func (p *PackedWeights) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.h != nil {
		C.dynq_packed_weights_free(p.h)
		p.h = nil
		runtime.SetFinalizer(p, nil)
	}
	return nil
}

// N is the number of output channels (rows of W).
func (p *PackedWeights) N() int { return p.n }

// K is the number of inputs per output channel (columns of W).
func (p *PackedWeights) K() int { return p.k }

// Pack quantizes float32 weights to int8 and packs them. w holds n*k values in layout
// (LayoutNK: n rows of k). NaN or infinite weights fail with StatusNonFinite, n or k zero
// with StatusInvalidArgument, k above 65536 with StatusUnsupported. opts may be nil.
func Pack(w []float32, n, k int, layout Layout, opts *PackOptions) (*PackedWeights, error) {
	const op = "Pack"
	if err := checkShape(op, "w", len(w), n, k); err != nil {
		return nil, err
	}
	cfg, err := opts.toC(op)
	if err != nil {
		return nil, err
	}
	var h *C.dynq_packed_weights
	err = call(op, func() C.dynq_status {
		return C.dynq_pack_weights(f32ptr(w), C.size_t(n), C.size_t(k), C.uint32_t(layout), &cfg, &h)
	})
	runtime.KeepAlive(w)
	if err != nil {
		return nil, err
	}
	return newPackedWeights(h)
}

// PackQuantized packs weights that are already quantized: q holds n*k int8 values in layout
// and scales has 1 (per tensor) or n (per channel) finite non-negative values, such that
// W[j][i] ~= scales[j] * q[j][i]. opts may be nil; its Granularity is ignored.
func PackQuantized(q []int8, n, k int, layout Layout, scales []float32, opts *PackOptions) (*PackedWeights, error) {
	const op = "PackQuantized"
	if err := checkShape(op, "q", len(q), n, k); err != nil {
		return nil, err
	}
	cfg, err := opts.toC(op)
	if err != nil {
		return nil, err
	}
	qp := (*C.int8_t)(unsafe.Pointer(&zeroI8))
	if len(q) > 0 {
		qp = (*C.int8_t)(unsafe.Pointer(&q[0]))
	}
	var h *C.dynq_packed_weights
	err = call(op, func() C.dynq_status {
		return C.dynq_pack_quantized_weights(qp, C.size_t(n), C.size_t(k), C.uint32_t(layout), f32ptr(scales),
			C.size_t(len(scales)), &cfg, &h)
	})
	runtime.KeepAlive(q)
	runtime.KeepAlive(scales)
	if err != nil {
		return nil, err
	}
	return newPackedWeights(h)
}

// Load reads weights serialized by MarshalBinary (on any machine) and packs them for this CPU
// (or opts.ISA). A truncated, altered or foreign blob fails with StatusCorruptData, a newer
// format version with StatusUnsupported. opts may be nil.
func Load(blob []byte, opts *PackOptions) (*PackedWeights, error) {
	const op = "Load"
	cfg, err := opts.toC(op)
	if err != nil {
		return nil, err
	}
	bp := (*C.uint8_t)(unsafe.Pointer(&zeroU8))
	if len(blob) > 0 {
		bp = (*C.uint8_t)(unsafe.Pointer(&blob[0]))
	}
	var h *C.dynq_packed_weights
	err = call(op, func() C.dynq_status {
		return C.dynq_packed_weights_deserialize(bp, C.size_t(len(blob)), &cfg, &h)
	})
	runtime.KeepAlive(blob)
	if err != nil {
		return nil, err
	}
	return newPackedWeights(h)
}

// MarshalBinary serializes the weights to a portable blob (the canonical int8 weights and
// scales, checksummed) that Load reads on any CPU. It implements encoding.BinaryMarshaler.
func (p *PackedWeights) MarshalBinary() ([]byte, error) {
	const op = "MarshalBinary"
	p.mu.RLock()
	defer p.mu.RUnlock()
	if p.h == nil {
		return nil, ErrClosed
	}
	var size C.size_t
	if err := call(op, func() C.dynq_status { return C.dynq_packed_weights_serialize(p.h, nil, 0, &size) }); err != nil {
		return nil, err
	}
	blob := make([]byte, int(size))
	var written C.size_t
	err := call(op, func() C.dynq_status {
		return C.dynq_packed_weights_serialize(p.h, (*C.uint8_t)(unsafe.Pointer(&blob[0])), size, &written)
	})
	if err != nil {
		return nil, err
	}
	return blob[:int(written)], nil
}

// Info describes packed weights.
type Info struct {
	N, K            int
	Granularity     WeightGranularity
	ISA             ISA    // the kernel family the weights are packed for
	Kernel          string // the kernel's name
	LayoutVersion   int    // version of that kernel's packed layout
	Bytes           int    // heap bytes held
	SerializedBytes int    // length of MarshalBinary's blob
	MR, NR, KR      int    // tile geometry: rows of A, columns of W, K group
}

// Info describes the packed weights.
func (p *PackedWeights) Info() (Info, error) {
	p.mu.RLock()
	defer p.mu.RUnlock()
	if p.h == nil {
		return Info{}, ErrClosed
	}
	var ci C.dynq_packed_weights_info
	ci.struct_size = C.uint32_t(unsafe.Sizeof(ci))
	if err := call("Info", func() C.dynq_status { return C.dynq_packed_weights_get_info(p.h, &ci) }); err != nil {
		return Info{}, err
	}
	return Info{
		N: int(ci.n), K: int(ci.k),
		Granularity:     WeightGranularity(ci.granularity),
		ISA:             ISA(ci.isa),
		Kernel:          C.GoString(ci.kernel_name),
		LayoutVersion:   int(ci.layout_version),
		Bytes:           int(ci.bytes),
		SerializedBytes: int(ci.serialized_bytes),
		MR:              int(ci.mr), NR: int(ci.nr), KR: int(ci.kr),
	}, nil
}

// Gemm computes y = dequant(quant(a) x W^T) + bias, then the epilogue, with the activations
// quantized from the range seen in this call.
//
// a holds m rows of K() values (m = len(a) / K(), zero allowed), y receives m rows of N()
// values and must have exactly m*N() elements, bias is nil (or empty) or N() values. A shape
// mismatch fails with StatusInvalidArgument before anything is computed; NaN or infinity in
// a or bias fails with StatusNonFinite naming the element, leaving y untouched. opts may be
// nil. Safe to call from many goroutines at once.
func (p *PackedWeights) Gemm(y, a, bias []float32, opts *GemmOptions) error {
	const op = "Gemm"
	p.mu.RLock()
	defer p.mu.RUnlock()
	if p.h == nil {
		return ErrClosed
	}
	n, k := p.n, p.k
	m, err := gemmShape(op, len(a), len(y), len(bias), n, k)
	if err != nil {
		return err
	}
	cfg, err := opts.toC(op)
	if err != nil {
		return err
	}
	var ap, yp, bp *C.float
	if m > 0 {
		ap = (*C.float)(unsafe.Pointer(&a[0]))
		yp = (*C.float)(unsafe.Pointer(&y[0]))
	}
	if len(bias) > 0 {
		bp = (*C.float)(unsafe.Pointer(&bias[0]))
	}
	err = call(op, func() C.dynq_status {
		return C.dynq_gemm(p.h, ap, C.size_t(m), C.size_t(k), bp, yp, C.size_t(n), &cfg)
	})
	runtime.KeepAlive(a)
	runtime.KeepAlive(y)
	runtime.KeepAlive(bias)
	return err
}

// --- helpers -------------------------------------------------------------------------------

// Pointed to for empty inputs, so that the library reports the shape rather than a NULL.
var (
	zeroF32 float32
	zeroI8  int8
	zeroU8  uint8
)

func f32ptr(s []float32) *C.float {
	if len(s) == 0 {
		return (*C.float)(unsafe.Pointer(&zeroF32))
	}
	return (*C.float)(unsafe.Pointer(&s[0]))
}

// gemmShape checks the lengths of a, y and bias (in elements) against the weights' n and k and
// returns m, the number of rows.
func gemmShape(op string, lenA, lenY, lenBias, n, k int) (int, error) {
	if lenA%k != 0 {
		return 0, invalid(op, "len(a) = %d is not a multiple of k = %d", lenA, k)
	}
	m := lenA / k
	if lenY != m*n {
		return 0, invalid(op, "len(y) = %d, expected m*n = %d*%d = %d", lenY, m, n, m*n)
	}
	if lenBias != 0 && lenBias != n {
		return 0, invalid(op, "len(bias) = %d, expected 0 or n = %d", lenBias, n)
	}
	return m, nil
}

// checkShape checks what only Go can: that the slice has n*k elements. Zero dimensions are
// left to the library, which refuses them with its own message.
func checkShape(op, name string, length, n, k int) error {
	if n < 0 || k < 0 {
		return invalid(op, "negative shape n=%d x k=%d", n, k)
	}
	if k != 0 && n > math.MaxInt/k {
		return &Error{Op: op, Status: StatusSizeOverflow, Message: fmt.Sprintf("n=%d x k=%d overflows int", n, k)}
	}
	if length != n*k {
		return invalid(op, "len(%s) = %d, expected n*k = %d*%d = %d", name, length, n, k, n*k)
	}
	return nil
}

// call runs one C function and turns a failure into an *Error with the library's message. The
// message is kept per OS thread, so the goroutine stays on its thread from the call until
// the message is read.
func call(op string, f func() C.dynq_status) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	st := f()
	if st == C.DYNQ_STATUS_OK {
		return nil
	}
	return &Error{Op: op, Status: Status(st), Message: lastErrorMessage()}
}

func lastErrorMessage() string {
	n := C.dynq_last_error_message(nil, 0)
	buf := make([]byte, int(n)+1)
	C.dynq_last_error_message((*C.char)(unsafe.Pointer(&buf[0])), C.size_t(len(buf)))
	return string(buf[:int(n)])
}
