package dynq

import (
	"errors"
	"fmt"
	"math"
	"math/rand"
	"testing"
)

// plusResidual returns the float32 result y32 plus the residual widened to float32, one
// float32 addition per element, rounded to the residual's type: what GemmResidual stores.
func plusResidual(y32 []float32, residual Slice) Slice {
	r := widen(residual)
	sum := make([]float32, len(y32))
	for i := range sum {
		sum[i] = y32[i] + r[i]
	}
	return narrowTo(residual.DType(), sum)
}

// GemmResidual on every pair of element types equals GemmSmoothed with float32 outputs
// followed by the float32 addition of the widened residual, rounded to y's type, bit for bit.
func TestGemmResidualMatchesGemmSmoothed(t *testing.T) {
	cases := []struct {
		name     string
		m, n, k  int
		opts     *GemmOptions
		bias     bool
		smooth   bool
		scaleA   float32
		scaleR   float32
		negAfter bool // some f32 outputs are negative: the residual is added after the ReLU
	}{
		{name: "1x1x1", m: 1, n: 1, k: 1, bias: true, smooth: true, scaleA: 1, scaleR: 1},
		{name: "defaults", m: 3, n: 17, k: 33, bias: true, smooth: true, scaleA: 1, scaleR: 2},
		{name: "no factors", m: 4, n: 20, k: 36, bias: true, scaleA: 1, scaleR: 1},
		{name: "no bias, per-tensor symmetric", m: 5, n: 24, k: 48, smooth: true, scaleA: 2, scaleR: 0.5,
			opts: &GemmOptions{ActGranularity: ActPerTensor, ActType: ActSymmetricI8}},
		{name: "relu, two threads", m: 9, n: 40, k: 130, bias: true, smooth: true, scaleA: 0.5, scaleR: 4,
			opts: &GemmOptions{Epilogue: EpilogueReLU, NumThreads: 2}, negAfter: true},
		{name: "gelu", m: 6, n: 24, k: 40, bias: true, smooth: true, scaleA: 1, scaleR: 1,
			opts: &GemmOptions{Epilogue: EpilogueGELU}},
		{name: "large residual", m: 4, n: 16, k: 32, bias: true, smooth: true, scaleA: 1, scaleR: 3e4},
		{name: "zero rows", m: 0, n: 8, k: 16, bias: true, smooth: true, scaleA: 1, scaleR: 1},
	}
	for i, tc := range cases {
		r := rand.New(rand.NewSource(int64(400 + i)))
		p := mustPack(t, randomSlice(r, tc.n*tc.k, 0.5, 0), tc.n, tc.k, LayoutNK, nil)
		a32 := outlierActivations(r, tc.m, tc.k, tc.scaleA)
		var smooth, bias []float32
		if tc.smooth {
			smooth = smoothingFactors(r, tc.k)
		}
		if tc.bias {
			bias = randomSlice(r, tc.n, 1, 0)
		}
		r32 := randomSlice(r, tc.m*tc.n, tc.scaleR, 0)
		for _, at := range allDTypes {
			for _, yt := range allDTypes {
				t.Run(fmt.Sprintf("%s/%v->%v", tc.name, at, yt), func(t *testing.T) {
					a := narrowTo(at, a32)
					res := narrowTo(yt, r32)
					want32 := make([]float32, tc.m*tc.n)
					if err := p.GemmSmoothed(F32(want32), a, smooth, bias, tc.opts); err != nil {
						t.Fatalf("GemmSmoothed: %v", err)
					}
					want := plusResidual(want32, res)
					y := zeros(yt, tc.m*tc.n)
					if err := p.GemmResidual(y, a, res, smooth, bias, tc.opts); err != nil {
						t.Fatalf("GemmResidual: %v", err)
					}
					if err := sameSlice(y, want); err != nil {
						t.Fatalf("GemmResidual differs from GemmSmoothed plus the residual in float32: %v", err)
					}
					if tc.m == 0 {
						return
					}
					// The residual is added: without it the result is another one.
					plain := zeros(yt, tc.m*tc.n)
					if err := p.GemmSmoothed(plain, a, smooth, bias, tc.opts); err != nil {
						t.Fatalf("GemmSmoothed: %v", err)
					}
					if sameSlice(plain, y) == nil {
						t.Fatal("GemmResidual gave the result of GemmSmoothed without the residual")
					}
					if tc.negAfter && yt == DTypeF32 {
						negative := false
						for _, v := range y.f32 {
							negative = negative || v < 0
						}
						if !negative {
							t.Fatal("no negative output: the residual should be added after the ReLU")
						}
					}
				})
			}
		}
	}
}

// Without a residual (the zero Slice, empty slices of any type), GemmResidual is GemmSmoothed;
// with a residual of negative zeros, whose addition changes no value, too.
func TestGemmResidualWithoutResidual(t *testing.T) {
	r := rand.New(rand.NewSource(41))
	n, k, m := 12, 40, 4
	p := mustPack(t, randomSlice(r, n*k, 0.5, 0), n, k, LayoutNK, nil)
	a32 := outlierActivations(r, m, k, 1)
	smooth := smoothingFactors(r, k)
	bias := randomSlice(r, n, 1, 0)
	opts := &GemmOptions{ActType: ActSymmetricI8, Epilogue: EpilogueReLU} // ReLU: +0 outputs
	negZeros := make([]float32, m*n)
	for i := range negZeros {
		negZeros[i] = float32(math.Copysign(0, -1))
	}
	for _, at := range allDTypes {
		for _, yt := range allDTypes {
			a := narrowTo(at, a32)
			want := zeros(yt, m*n)
			if err := p.GemmSmoothed(want, a, smooth, bias, opts); err != nil {
				t.Fatalf("GemmSmoothed: %v", err)
			}
			for _, none := range []struct {
				name     string
				residual Slice
			}{
				{"zero Slice", Slice{}},
				{"F32(nil)", F32(nil)},
				{"empty F16", F16([]uint16{})},
				{"empty BF16", BF16(nil)},
				{"negative zeros", narrowTo(yt, negZeros)},
			} {
				t.Run(fmt.Sprintf("%s/%v->%v", none.name, at, yt), func(t *testing.T) {
					y := zeros(yt, m*n)
					if err := p.GemmResidual(y, a, none.residual, smooth, bias, opts); err != nil {
						t.Fatalf("GemmResidual: %v", err)
					}
					if err := sameSlice(y, want); err != nil {
						t.Fatalf("GemmResidual with residual %s differs from GemmSmoothed: %v", none.name, err)
					}
				})
			}
		}
	}

	// Without factors nor residual, GemmResidual is GemmEx.
	a16 := narrowTo(DTypeF16, a32)
	want := make([]uint16, m*n)
	if err := p.GemmEx(BF16(want), a16, bias, nil); err != nil {
		t.Fatal(err)
	}
	y := make([]uint16, m*n)
	if err := p.GemmResidual(BF16(y), a16, Slice{}, nil, bias, nil); err != nil {
		t.Fatalf("GemmResidual without factors nor residual: %v", err)
	}
	if err := sameSlice(BF16(y), BF16(want)); err != nil {
		t.Fatalf("GemmResidual without factors nor residual differs from GemmEx: %v", err)
	}
}

// A residual in the middle of a larger buffer: only its m*N elements are read. NaN and
// infinity in the residual give NaN and infinity in their element only.
func TestGemmResidualSubslicesAndNonFinite(t *testing.T) {
	r := rand.New(rand.NewSource(42))
	n, k, m := 10, 24, 3
	p := mustPack(t, randomSlice(r, n*k, 0.5, 0), n, k, LayoutNK, nil)
	a := F32(randomSlice(r, m*k, 1, 0))
	res := narrowTo(DTypeF16, randomSlice(r, m*n, 1, 0))
	want := zeros(DTypeF16, m*n)
	if err := p.GemmResidual(want, a, res, nil, nil, nil); err != nil {
		t.Fatal(err)
	}
	big := make([]uint16, m*n+7)
	for i := range big {
		big[i] = 0x7e00 // NaN
	}
	copy(big[3:], res.u16)
	y := zeros(DTypeF16, m*n)
	if err := p.GemmResidual(y, a, F16(big[3:3+m*n]), nil, nil, nil); err != nil {
		t.Fatalf("GemmResidual with the residual in a subslice: %v", err)
	}
	if err := sameSlice(y, want); err != nil {
		t.Fatalf("GemmResidual read outside the residual's subslice: %v", err)
	}

	plain := make([]float32, m*n)
	if err := p.GemmEx(F32(plain), a, nil, nil); err != nil {
		t.Fatal(err)
	}
	special := make([]float32, m*n)
	special[4] = float32(math.NaN())
	special[7] = float32(math.Inf(1))
	special[m*n-1] = float32(math.Inf(-1))
	y32 := make([]float32, m*n)
	if err := p.GemmResidual(F32(y32), a, F32(special), nil, nil, nil); err != nil {
		t.Fatalf("GemmResidual with NaN and infinity in the residual: %v", err)
	}
	for i, v := range y32 {
		switch i {
		case 4:
			if !math.IsNaN(float64(v)) {
				t.Fatalf("y[4] = %v, expected NaN", v)
			}
		case 7, m*n - 1:
			if !math.IsInf(float64(v), int(math.Copysign(1, float64(special[i])))) {
				t.Fatalf("y[%d] = %v, expected %v", i, v, special[i])
			}
		default:
			if math.Float32bits(v) != math.Float32bits(plain[i]+special[i]) {
				t.Fatalf("y[%d] = %v, expected %v", i, v, plain[i]+special[i])
			}
		}
	}
}

func TestGemmResidualErrors(t *testing.T) {
	const op = "GemmResidual"
	r := rand.New(rand.NewSource(6))
	p := mustPack(t, randomSlice(r, 6*4, 1, 0), 6, 4, LayoutNK, nil) // n = 6, k = 4
	good := []float32{0.5, 2, 1.5, 3}
	f32 := func(count int) Slice { return F32(make([]float32, count)) }
	f16 := func(count int) Slice { return F16(make([]uint16, count)) }
	bf16 := func(count int) Slice { return BF16(make([]uint16, count)) }
	shared := make([]float32, 24)
	nanA := make([]float32, 8)
	nanA[5] = float32(math.NaN())
	cases := []struct {
		name        string
		y, a, resid Slice
		smooth      []float32
		status      Status
		message     string
	}{
		// Refused by the binding before calling C.
		{"11 residual values for m*n = 12", f32(12), f32(8), f32(11), good, StatusInvalidArgument,
			"len(residual) = 11, expected 0 (none) or len(y) = m*n = 2*6 = 12"},
		{"13 residual values, f16", f16(12), f16(8), f16(13), nil, StatusInvalidArgument, "len(residual) = 13"},
		{"residual for zero rows", f32(0), f32(0), f32(6), nil, StatusInvalidArgument,
			"len(residual) = 6, expected 0 (none) or len(y) = m*n = 0*6 = 0"},
		{"f16 residual, bf16 y", bf16(12), f32(8), f16(12), good, StatusInvalidArgument,
			"residual is f16, expected y's element type bf16"},
		{"f32 residual, f16 y", f16(12), f16(8), f32(12), nil, StatusInvalidArgument,
			"residual is f32, expected y's element type f16"},
		{"bf16 residual, f32 y", f32(12), bf16(8), bf16(12), nil, StatusInvalidArgument,
			"residual is bf16, expected y's element type f32"},
		{"unknown residual type", f16(12), f16(8), Slice16(make([]uint16, 12), DType(7)), nil,
			StatusInvalidArgument, "residual is DType(7), expected y's element type f16"},
		{"16-bit residual tagged f32", f32(12), f32(8), Slice16(make([]uint16, 12), DTypeF32), nil,
			StatusInvalidArgument, "residual holds 16-bit elements tagged f32"},
		{"3 factors", f32(12), f32(8), f32(12), good[:3], StatusInvalidArgument, "len(smooth) = 3"},
		// Refused by the library, with its message.
		{"residual overlaps y", F32(shared[0:12]), f32(8), F32(shared[6:18]), good, StatusInvalidArgument,
			"y overlaps residual; the output must be a separate buffer"},
		{"zero factor", f32(12), f32(8), f32(12), []float32{0.5, 0, 1.5, 3}, StatusInvalidArgument,
			"smoothing factor [1] is 0"},
		{"NaN activation", f32(12), F32(nanA), f32(12), nil, StatusNonFinite, "A[1][1] is NaN"},
		{"unknown a type", f16(12), Slice16(make([]uint16, 8), DType(9)), f16(12), nil, StatusInvalidArgument,
			"a_type=9 is not a dynq_dtype value"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			checkOpError(t, op, p.GemmResidual(tc.y, tc.a, tc.resid, tc.smooth, nil, nil), tc.status, tc.message)
		})
	}

	// A residual that is y itself is refused by the library, for every element type, and y is
	// left untouched.
	for _, yt := range allDTypes {
		t.Run(fmt.Sprintf("residual is y/%v", yt), func(t *testing.T) {
			pattern := make([]float32, 12)
			for i := range pattern {
				pattern[i] = float32(i) + 0.25
			}
			y := narrowTo(yt, pattern)
			before := narrowTo(yt, pattern)
			err := p.GemmResidual(y, f32(8), y, good, nil, nil)
			checkOpError(t, op, err, StatusInvalidArgument, "y overlaps residual")
			var de *Error
			if errors.As(err, &de) && de.Message !=
				"y overlaps residual; the output must be a separate buffer (to accumulate into y, copy it first)" {
				t.Fatalf("library's message %q", de.Message)
			}
			if err := sameSlice(y, before); err != nil {
				t.Fatalf("a refused GemmResidual wrote y: %v", err)
			}
		})
	}

	// y is left untouched by the other failing calls too.
	for _, bad := range []struct {
		a, resid Slice
		smooth   []float32
	}{
		{f16(8), f16(11), nil},
		{f16(8), bf16(12), nil},
		{F32(nanA), f16(12), nil},
		{f16(8), f16(12), []float32{1, 1, -1, 1}},
	} {
		y := make([]uint16, 12)
		for i := range y {
			y[i] = 0x4700
		}
		if err := p.GemmResidual(F16(y), bad.a, bad.resid, bad.smooth, nil, nil); err == nil {
			t.Fatalf("GemmResidual accepted a=%v[%d], residual=%v[%d], smooth=%v", bad.a.DType(), bad.a.Len(),
				bad.resid.DType(), bad.resid.Len(), bad.smooth)
		}
		for _, v := range y {
			if v != 0x4700 {
				t.Fatalf("a failing GemmResidual wrote y: %#04x", y)
			}
		}
	}

	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if err := p.GemmResidual(f32(6), f32(4), f32(6), good, nil, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("GemmResidual after Close: %v", err)
	}
}
