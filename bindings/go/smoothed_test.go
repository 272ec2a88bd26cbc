package dynq

import (
	"errors"
	"fmt"
	"math"
	"math/rand"
	"testing"
)

// outlierActivations returns m rows of k values whose channels have very different ranges
// (2^-3 to 2^5), as in the layers smoothing is for.
func outlierActivations(r *rand.Rand, m, k int, scale float32) []float32 {
	ranges := make([]float32, k)
	for j := range ranges {
		ranges[j] = float32(math.Exp2(r.Float64()*8-3)) * scale
	}
	a := make([]float32, m*k)
	for i := range a {
		a[i] = (r.Float32()*2 - 1) * ranges[i%k]
	}
	return a
}

// smoothingFactors returns k positive factors in [1/8, 8], not powers of two, so that the
// products round.
func smoothingFactors(r *rand.Rand, k int) []float32 {
	s := make([]float32, k)
	for j := range s {
		s[j] = float32(math.Exp2(r.Float64()*6 - 3))
	}
	return s
}

// smoothed returns the values of a, widened to float32, times smooth[column], each product
// rounded to float32: the activations GemmSmoothed quantizes.
func smoothed(a Slice, smooth []float32) []float32 {
	v := widen(a)
	for i := range v {
		v[i] = float32(v[i] * smooth[i%len(smooth)])
	}
	return v
}

// GemmSmoothed on every pair of element types equals Gemm on the widened activations
// multiplied by the factors in float32, rounded to the output type, bit for bit.
func TestGemmSmoothedMatchesGemm(t *testing.T) {
	cases := []struct {
		name    string
		m, n, k int
		opts    *GemmOptions
		bias    bool
		scaleA  float32
	}{
		{name: "1x1x1", m: 1, n: 1, k: 1, bias: true, scaleA: 1},
		{name: "defaults", m: 3, n: 17, k: 33, bias: true, scaleA: 1},
		{name: "no bias, per-tensor symmetric", m: 5, n: 24, k: 48, scaleA: 2,
			opts: &GemmOptions{ActGranularity: ActPerTensor, ActType: ActSymmetricI8}},
		{name: "relu, two threads", m: 9, n: 40, k: 130, bias: true, scaleA: 0.5,
			opts: &GemmOptions{Epilogue: EpilogueReLU, NumThreads: 2}},
		{name: "gelu", m: 6, n: 24, k: 40, bias: true, scaleA: 1, opts: &GemmOptions{Epilogue: EpilogueGELU}},
		{name: "zero rows", m: 0, n: 8, k: 16, bias: true, scaleA: 1},
	}
	for i, tc := range cases {
		r := rand.New(rand.NewSource(int64(300 + i)))
		p := mustPack(t, randomSlice(r, tc.n*tc.k, 0.5, 0), tc.n, tc.k, LayoutNK, nil)
		a32 := outlierActivations(r, tc.m, tc.k, tc.scaleA)
		smooth := smoothingFactors(r, tc.k)
		var bias []float32
		if tc.bias {
			bias = randomSlice(r, tc.n, 1, 0)
		}
		for _, at := range allDTypes {
			for _, yt := range allDTypes {
				t.Run(fmt.Sprintf("%s/%v->%v", tc.name, at, yt), func(t *testing.T) {
					a := narrowTo(at, a32)
					want32 := make([]float32, tc.m*tc.n)
					if err := p.Gemm(want32, smoothed(a, smooth), bias, tc.opts); err != nil {
						t.Fatalf("Gemm: %v", err)
					}
					want := narrowTo(yt, want32)
					y := zeros(yt, tc.m*tc.n)
					if err := p.GemmSmoothed(y, a, smooth, bias, tc.opts); err != nil {
						t.Fatalf("GemmSmoothed: %v", err)
					}
					if err := sameSlice(y, want); err != nil {
						t.Fatalf("GemmSmoothed differs from Gemm on the activations times the factors: %v", err)
					}
					if tc.m == 0 {
						return
					}
					// The factors are applied: without them the result is another one.
					plain := zeros(yt, tc.m*tc.n)
					if err := p.GemmEx(plain, a, bias, tc.opts); err != nil {
						t.Fatalf("GemmEx: %v", err)
					}
					if sameSlice(plain, y) == nil {
						t.Fatal("GemmSmoothed gave the result of GemmEx without the factors")
					}
				})
			}
		}
	}
}

// Without factors (nil or empty), and with factors all 1, GemmSmoothed is GemmEx.
func TestGemmSmoothedWithoutFactors(t *testing.T) {
	r := rand.New(rand.NewSource(31))
	n, k, m := 12, 40, 4
	p := mustPack(t, randomSlice(r, n*k, 0.5, 0), n, k, LayoutNK, nil)
	a32 := outlierActivations(r, m, k, 1)
	bias := randomSlice(r, n, 1, 0)
	ones := make([]float32, k)
	for j := range ones {
		ones[j] = 1
	}
	opts := &GemmOptions{ActType: ActSymmetricI8}
	for _, at := range []DType{DTypeF32, DTypeF16} {
		for _, yt := range allDTypes {
			a := narrowTo(at, a32)
			want := zeros(yt, m*n)
			if err := p.GemmEx(want, a, bias, opts); err != nil {
				t.Fatalf("GemmEx: %v", err)
			}
			for _, f := range []struct {
				name   string
				smooth []float32
			}{{"nil", nil}, {"empty", []float32{}}, {"all 1", ones}} {
				t.Run(fmt.Sprintf("%s/%v->%v", f.name, at, yt), func(t *testing.T) {
					y := zeros(yt, m*n)
					if err := p.GemmSmoothed(y, a, f.smooth, bias, opts); err != nil {
						t.Fatalf("GemmSmoothed: %v", err)
					}
					if err := sameSlice(y, want); err != nil {
						t.Fatalf("GemmSmoothed with %s factors differs from GemmEx: %v", f.name, err)
					}
				})
			}
		}
	}

	// Factors from the middle of a larger buffer: only those k are read.
	smooth := smoothingFactors(r, k)
	big := make([]float32, k+5)
	for i := range big {
		big[i] = float32(math.NaN())
	}
	copy(big[2:], smooth)
	want := make([]float32, m*n)
	if err := p.GemmSmoothed(F32(want), F32(a32), smooth, bias, nil); err != nil {
		t.Fatal(err)
	}
	y := make([]float32, m*n)
	if err := p.GemmSmoothed(F32(y), F32(a32), big[2:2+k], bias, nil); err != nil {
		t.Fatalf("GemmSmoothed with factors in a subslice: %v", err)
	}
	if err := sameBits(y, want); err != nil {
		t.Fatal(err)
	}
}

func TestGemmSmoothedErrors(t *testing.T) {
	const op = "GemmSmoothed"
	r := rand.New(rand.NewSource(5))
	p := mustPack(t, randomSlice(r, 6*4, 1, 0), 6, 4, LayoutNK, nil) // n = 6, k = 4
	with := func(j int, v float32) []float32 {
		s := []float32{0.5, 2, 1.5, 3}
		s[j] = v
		return s
	}
	const rule = "; smoothing factors must be positive and finite"
	good := []float32{0.5, 2, 1.5, 3}
	f32 := func(count int) Slice { return F32(make([]float32, count)) }
	f16 := func(count int) Slice { return F16(make([]uint16, count)) }
	huge := make([]float32, 8)
	huge[5] = 3e38
	shared := make([]float32, 16)
	cases := []struct {
		name    string
		y, a    Slice
		smooth  []float32
		status  Status
		message string
	}{
		// Refused by the library, with its message.
		{"zero factor", f32(12), f32(8), with(2, 0), StatusInvalidArgument, "smoothing factor [2] is 0" + rule},
		{"NaN factor", f32(12), f32(8), with(1, float32(math.NaN())), StatusInvalidArgument,
			"smoothing factor [1] is NaN" + rule},
		{"negative factor", f32(12), f32(8), with(3, -0.5), StatusInvalidArgument, "smoothing factor [3] is -0.5" + rule},
		{"infinite factor", f32(12), f32(8), with(0, float32(math.Inf(1))), StatusInvalidArgument,
			"smoothing factor [0] is inf" + rule},
		{"zero factor, f16 activations", f16(12), f16(8), with(2, 0), StatusInvalidArgument,
			"smoothing factor [2] is 0" + rule},
		{"NaN factor, bf16 activations", F32(make([]float32, 12)), BF16(make([]uint16, 8)), with(0, float32(math.NaN())),
			StatusInvalidArgument, "smoothing factor [0] is NaN" + rule},
		{"zero factor, zero rows", f32(0), f32(0), with(2, 0), StatusInvalidArgument, "smoothing factor [2] is 0" + rule},
		{"product overflows", f32(12), F32(huge), good, StatusNonFinite, "A[1][1]"},
		{"y overlaps smooth", F32(shared[0:12]), f32(8), shared[8:12], StatusInvalidArgument, "y overlaps smooth"},
		{"unknown a type", f16(12), Slice16(make([]uint16, 8), DType(7)), good, StatusInvalidArgument,
			"a_type=7 is not a dynq_dtype value"},
		// Refused by the binding before calling C.
		{"3 factors for k = 4", f32(12), f32(8), good[:3], StatusInvalidArgument, "len(smooth) = 3, expected 0 or k = 4"},
		{"5 factors for k = 4", f16(12), f16(8), append(with(0, 1), 1), StatusInvalidArgument,
			"len(smooth) = 5, expected 0 or k = 4"},
		{"1 factor, zero rows", f32(0), f32(0), []float32{2}, StatusInvalidArgument, "len(smooth) = 1"},
		{"a not a multiple of k", f32(12), f32(7), good, StatusInvalidArgument, "multiple of k = 4"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			checkOpError(t, op, p.GemmSmoothed(tc.y, tc.a, tc.smooth, nil, nil), tc.status, tc.message)
		})
	}

	// The wrong length is the binding's own error, before the factors' values are looked at.
	err := p.GemmSmoothed(f32(12), f32(8), []float32{0, 0, 0}, nil, nil)
	checkOpError(t, op, err, StatusInvalidArgument, "len(smooth) = 3")
	var de *Error
	if errors.As(err, &de) && de.Message != "len(smooth) = 3, expected 0 or k = 4 (one factor per input channel)" {
		t.Fatalf("binding's message %q", de.Message)
	}

	// y is left untouched by a failing call.
	for _, smooth := range [][]float32{with(2, 0), with(1, float32(math.NaN())), good[:3]} {
		y := make([]uint16, 12)
		for i := range y {
			y[i] = 0x4700
		}
		if err := p.GemmSmoothed(F16(y), f16(8), smooth, nil, nil); err == nil {
			t.Fatalf("factors %v accepted", smooth)
		}
		for _, v := range y {
			if v != 0x4700 {
				t.Fatalf("a failing GemmSmoothed (factors %v) wrote y: %#04x", smooth, y)
			}
		}
	}

	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if err := p.GemmSmoothed(f32(6), f32(4), good, nil, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("GemmSmoothed after Close: %v", err)
	}
}
