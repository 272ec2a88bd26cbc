package dynq

import (
	"errors"
	"fmt"
	"math"
	"math/rand"
	"strings"
	"testing"
)

var allDTypes = []DType{DTypeF32, DTypeF16, DTypeBF16}

// narrowTo rounds float32 values to t and tags them.
func narrowTo(t DType, v []float32) Slice {
	if t == DTypeF32 {
		return F32(append([]float32(nil), v...))
	}
	conv := Float16bits
	if t == DTypeBF16 {
		conv = BFloat16bits
	}
	b := make([]uint16, len(v))
	for i, x := range v {
		b[i] = conv(x)
	}
	return Slice16(b, t)
}

// widen returns the values of s as float32, exactly.
func widen(s Slice) []float32 {
	if s.DType() == DTypeF32 {
		return append([]float32(nil), s.f32...)
	}
	conv := Float16frombits
	if s.DType() == DTypeBF16 {
		conv = BFloat16frombits
	}
	v := make([]float32, len(s.u16))
	for i, b := range s.u16 {
		v[i] = conv(b)
	}
	return v
}

func zeros(t DType, count int) Slice {
	if t == DTypeF32 {
		return F32(make([]float32, count))
	}
	return Slice16(make([]uint16, count), t)
}

// sameSlice reports the first element where got and want differ in their bits.
func sameSlice(got, want Slice) error {
	if got.DType() != want.DType() || got.Len() != want.Len() {
		return fmt.Errorf("%v[%d] and %v[%d]", got.DType(), got.Len(), want.DType(), want.Len())
	}
	if got.DType() == DTypeF32 {
		return sameBits(got.f32, want.f32)
	}
	for i := range got.u16 {
		if got.u16[i] != want.u16[i] {
			return fmt.Errorf("element %d: %#04x, expected %#04x (%v rounded from the f32 result)", i, got.u16[i],
				want.u16[i], widen(want)[i])
		}
	}
	return nil
}

// GemmEx on every pair of element types equals Gemm on the widened activations, rounded to
// the output type by Float16bits / BFloat16bits, bit for bit.
func TestGemmExMatchesGemm(t *testing.T) {
	cases := []struct {
		name        string
		m, n, k     int
		opts        *GemmOptions
		bias        bool
		scaleW      float32
		scaleA      float32
		skew        float32
		wantInf16   bool // some f16 outputs overflow to infinity
		wantSubnorm bool // some f16 outputs are subnormal
	}{
		{name: "1x1x1", m: 1, n: 1, k: 1, bias: true, scaleW: 1, scaleA: 1},
		{name: "defaults", m: 3, n: 17, k: 33, bias: true, scaleW: 0.5, scaleA: 3},
		{name: "no bias, per-tensor symmetric", m: 5, n: 24, k: 48, scaleW: 0.5, scaleA: 2,
			opts: &GemmOptions{ActGranularity: ActPerTensor, ActType: ActSymmetricI8}},
		{name: "relu, skewed, two threads", m: 9, n: 40, k: 130, bias: true, scaleW: 0.5, scaleA: 1, skew: 1,
			opts: &GemmOptions{Epilogue: EpilogueReLU, NumThreads: 2}},
		{name: "gelu", m: 6, n: 24, k: 40, bias: true, scaleW: 1, scaleA: 2, opts: &GemmOptions{Epilogue: EpilogueGELU}},
		{name: "large outputs overflow f16", m: 4, n: 16, k: 64, scaleW: 1, scaleA: 30000, wantInf16: true},
		{name: "tiny outputs are f16 subnormals", m: 4, n: 16, k: 32, scaleW: 0.01, scaleA: 1e-3, wantSubnorm: true},
		{name: "zero rows", m: 0, n: 8, k: 16, bias: true, scaleW: 1, scaleA: 1},
	}
	for i, tc := range cases {
		r := rand.New(rand.NewSource(int64(200 + i)))
		p := mustPack(t, randomSlice(r, tc.n*tc.k, tc.scaleW, 0), tc.n, tc.k, LayoutNK, nil)
		a32 := randomSlice(r, tc.m*tc.k, tc.scaleA, tc.skew)
		var bias []float32
		if tc.bias {
			bias = randomSlice(r, tc.n, 1, 0)
		}
		for _, at := range allDTypes {
			for _, yt := range allDTypes {
				t.Run(fmt.Sprintf("%s/%v->%v", tc.name, at, yt), func(t *testing.T) {
					a := narrowTo(at, a32)
					want32 := make([]float32, tc.m*tc.n)
					if err := p.Gemm(want32, widen(a), bias, tc.opts); err != nil {
						t.Fatalf("Gemm: %v", err)
					}
					want := narrowTo(yt, want32)
					y := zeros(yt, tc.m*tc.n)
					if err := p.GemmEx(y, a, bias, tc.opts); err != nil {
						t.Fatalf("GemmEx: %v", err)
					}
					if err := sameSlice(y, want); err != nil {
						t.Fatalf("GemmEx differs from Gemm on the widened inputs, rounded: %v", err)
					}
					if yt != DTypeF16 {
						return
					}
					var inf, sub int
					for _, b := range y.u16 {
						if b&0x7fff == 0x7c00 {
							inf++
						}
						if b&0x7c00 == 0 && b&0x3ff != 0 {
							sub++
						}
					}
					if tc.wantInf16 && inf == 0 || tc.wantSubnorm && sub == 0 {
						t.Fatalf("expected infinite (%v) or subnormal (%v) f16 outputs, got %d and %d",
							tc.wantInf16, tc.wantSubnorm, inf, sub)
					}
				})
			}
		}
	}
}

// Spans of larger buffers: only the given elements are read and written.
func TestGemmExSubslices(t *testing.T) {
	r := rand.New(rand.NewSource(9))
	n, k, m := 10, 12, 3
	p := mustPack(t, randomSlice(r, n*k, 1, 0), n, k, LayoutNK, nil)
	a := narrowTo(DTypeBF16, randomSlice(r, m*k, 1, 0))
	want := zeros(DTypeF16, m*n)
	if err := p.GemmEx(want, a, nil, nil); err != nil {
		t.Fatal(err)
	}
	bigA := make([]uint16, m*k+8)
	copy(bigA[3:], a.u16)
	bigY := make([]uint16, m*n+6)
	for i := range bigY {
		bigY[i] = 0xabcd
	}
	if err := p.GemmEx(F16(bigY[2:2+m*n]), BF16(bigA[3:3+m*k]), nil, nil); err != nil {
		t.Fatal(err)
	}
	if err := sameSlice(F16(bigY[2:2+m*n]), want); err != nil {
		t.Fatal(err)
	}
	for _, i := range []int{0, 1, m*n + 2, m*n + 5} {
		if bigY[i] != 0xabcd {
			t.Fatalf("GemmEx wrote bigY[%d] outside its slice", i)
		}
	}
}

func checkError(t *testing.T, err error, status Status, message string) {
	t.Helper()
	checkOpError(t, "GemmEx", err, status, message)
}

// checkOpError checks that err is a *dynq.Error of op with the status and a message containing
// message.
func checkOpError(t *testing.T, op string, err error, status Status, message string) {
	t.Helper()
	if err == nil {
		t.Fatal("no error")
	}
	var de *Error
	if !errors.As(err, &de) {
		t.Fatalf("error %v (%T) is not a *dynq.Error", err, err)
	}
	if !errors.Is(err, status) || de.Status != status {
		t.Fatalf("status %v, expected %v (%v)", de.Status, status, err)
	}
	if de.Message == "" || !strings.Contains(de.Message, message) {
		t.Fatalf("message %q should contain %q", de.Message, message)
	}
	if want := "dynq: " + op + ": " + status.String() + ": " + de.Message; de.Op != op || err.Error() != want {
		t.Fatalf("Error() = %q, expected %q", err.Error(), want)
	}
}

func TestGemmExErrors(t *testing.T) {
	r := rand.New(rand.NewSource(4))
	p := mustPack(t, randomSlice(r, 6*4, 1, 0), 6, 4, LayoutNK, nil) // n = 6, k = 4
	f16 := func(count int) Slice { return F16(make([]uint16, count)) }
	infA := make([]uint16, 8)
	infA[6] = 0x7c00
	nanA := make([]uint16, 8)
	nanA[1] = 0x7fc1
	shared := make([]uint16, 16)
	cases := []struct {
		name    string
		y, a    Slice
		bias    []float32
		opts    *GemmOptions
		status  Status
		message string
	}{
		// Refused by the binding before calling C.
		{"a not a multiple of k", f16(12), f16(7), nil, nil, StatusInvalidArgument, "multiple of k = 4"},
		{"y of the wrong length", f16(11), BF16(make([]uint16, 8)), nil, nil, StatusInvalidArgument, "len(y) = 11"},
		{"f32 y of the wrong length", F32(make([]float32, 13)), f16(8), nil, nil, StatusInvalidArgument, "len(y) = 13"},
		{"bias of the wrong length", f16(12), f16(8), make([]float32, 5), nil, StatusInvalidArgument, "len(bias) = 5"},
		{"16-bit activations tagged f32", f16(12), Slice16(make([]uint16, 8), DTypeF32), nil, nil,
			StatusInvalidArgument, "a holds 16-bit elements tagged f32"},
		{"16-bit outputs tagged f32", Slice16(make([]uint16, 12), DTypeF32), f16(8), nil, nil,
			StatusInvalidArgument, "y holds 16-bit elements tagged f32"},
		{"negative threads", f16(6), f16(4), nil, &GemmOptions{NumThreads: -1}, StatusInvalidArgument, "NumThreads"},
		// Element types that are none, refused by the library with its message (whatever
		// the lengths: the library gets no buffers).
		{"unknown a type", f16(12), Slice16(make([]uint16, 8), DType(7)), nil, nil, StatusInvalidArgument,
			"a_type=7 is not a dynq_dtype value"},
		{"unknown y type", Slice16(make([]uint16, 12), DType(9)), F32(make([]float32, 8)), nil, nil,
			StatusInvalidArgument, "y_type=9 is not a dynq_dtype value"},
		{"unknown type, lengths fitting nothing", Slice16(make([]uint16, 1), DType(3)), f16(3), nil, nil,
			StatusInvalidArgument, "y_type=3"},
		// Values refused by the library.
		{"infinite f16 activation", f16(12), F16(infA), nil, nil, StatusNonFinite, "A[1][2]"},
		{"NaN bf16 activation", F32(make([]float32, 12)), BF16(nanA), nil, nil, StatusNonFinite, "A[0][1]"},
		{"NaN bias", f16(12), f16(8), []float32{0, 0, float32(math.NaN()), 0, 0, 0}, nil, StatusNonFinite, "bias"},
		{"y overlaps a", F16(shared[4:16]), F16(shared[0:8]), nil, nil, StatusInvalidArgument, "overlaps"},
		{"unknown epilogue", f16(6), f16(4), nil, &GemmOptions{Epilogue: 9}, StatusInvalidArgument, "epilogue"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			checkError(t, p.GemmEx(tc.y, tc.a, tc.bias, tc.opts), tc.status, tc.message)
		})
	}

	// y is left untouched by a failing call.
	y := make([]uint16, 12)
	for i := range y {
		y[i] = 0x4700
	}
	checkError(t, p.GemmEx(F16(y), F16(infA), nil, nil), StatusNonFinite, "inf")
	for _, v := range y {
		if v != 0x4700 {
			t.Fatalf("a failing GemmEx wrote y: %#04x", y)
		}
	}

	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if err := p.GemmEx(f16(6), f16(4), nil, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("GemmEx after Close: %v", err)
	}
}

func TestSliceAccessors(t *testing.T) {
	var zero Slice
	cases := []struct {
		name   string
		s      Slice
		dtype  DType
		length int
		str    string
	}{
		{"zero value", zero, DTypeF32, 0, "f32"},
		{"F32", F32(make([]float32, 3)), DTypeF32, 3, "f32"},
		{"F16", F16(make([]uint16, 5)), DTypeF16, 5, "f16"},
		{"BF16", BF16(make([]uint16, 2)), DTypeBF16, 2, "bf16"},
		{"Slice16", Slice16(make([]uint16, 4), DTypeBF16), DTypeBF16, 4, "bf16"},
		{"Slice16 of an unknown type", Slice16(nil, 5), DType(5), 0, "DType(5)"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.s.DType() != tc.dtype || tc.s.Len() != tc.length || tc.s.DType().String() != tc.str {
				t.Fatalf("DType() = %v, Len() = %d; expected %v (%q), %d", tc.s.DType(), tc.s.Len(), tc.dtype, tc.str,
					tc.length)
			}
		})
	}
}
