package dynq

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"math/rand"
	"runtime"
	"strings"
	"sync"
	"testing"
)

func randomSlice(r *rand.Rand, count int, scale, offset float32) []float32 {
	v := make([]float32, count)
	for i := range v {
		v[i] = (r.Float32()*2-1)*scale + offset
	}
	return v
}

func transpose(w []float32, rows, cols int) []float32 {
	t := make([]float32, len(w))
	for r := 0; r < rows; r++ {
		for c := 0; c < cols; c++ {
			t[c*rows+r] = w[r*cols+c]
		}
	}
	return t
}

// sameBits reports the first element where got and want differ in their bits.
func sameBits(got, want []float32) error {
	if len(got) != len(want) {
		return fmt.Errorf("lengths %d and %d", len(got), len(want))
	}
	for i := range got {
		if math.Float32bits(got[i]) != math.Float32bits(want[i]) {
			return fmt.Errorf("element %d: %v (%#08x), reference %v (%#08x)", i, got[i],
				math.Float32bits(got[i]), want[i], math.Float32bits(want[i]))
		}
	}
	return nil
}

func mustPack(t *testing.T, w []float32, n, k int, layout Layout, opts *PackOptions) *PackedWeights {
	t.Helper()
	p, err := Pack(w, n, k, layout, opts)
	if err != nil {
		t.Fatalf("Pack(n=%d, k=%d): %v", n, k, err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func TestVersion(t *testing.T) {
	if Version() == "" || ABIVersion() != HeaderABIVersion {
		t.Fatalf("Version() = %q, ABIVersion() = %d, header ABI %d", Version(), ABIVersion(), HeaderABIVersion)
	}
	isa, err := ActiveISA()
	if err != nil || isa == ISAAuto || !isa.Available() || isa.String() == "unknown" {
		t.Fatalf("ActiveISA() = %v (%d), %v", isa, isa, err)
	}
	if StatusCorruptData.String() == "" || Status(999).String() != "unknown status" {
		t.Fatalf("status strings: %q, %q", StatusCorruptData, Status(999))
	}
}

func TestGemmMatchesReference(t *testing.T) {
	cases := []struct {
		name       string
		m, n, k    int
		layout     Layout
		weights    WeightGranularity
		opts       *GemmOptions
		bias       bool
		skew       float32 // offset of the activations: one-sided inputs as after GELU
		activation float32
	}{
		{name: "1x1x1", m: 1, n: 1, k: 1, bias: true, activation: 1},
		{name: "defaults nil options", m: 3, n: 17, k: 33, bias: true, activation: 3},
		{name: "no bias", m: 4, n: 9, k: 64, activation: 1},
		{name: "skewed per row", m: 7, n: 40, k: 130, skew: 2, activation: 1, bias: true},
		{name: "KN layout", m: 5, n: 24, k: 48, layout: LayoutKN, activation: 2, bias: true},
		{name: "per-tensor weights", m: 6, n: 31, k: 65, weights: WeightPerTensor, activation: 1},
		{name: "per-tensor activations", m: 8, n: 16, k: 96, opts: &GemmOptions{ActGranularity: ActPerTensor},
			activation: 4, bias: true},
		{name: "symmetric int8 activations", m: 9, n: 33, k: 77, opts: &GemmOptions{ActType: ActSymmetricI8},
			activation: 1, bias: true},
		{name: "relu", m: 5, n: 20, k: 40, opts: &GemmOptions{Epilogue: EpilogueReLU}, activation: 1, bias: true},
		{name: "everything non-default, one thread", m: 12, n: 50, k: 200, layout: LayoutKN, weights: WeightPerTensor,
			opts: &GemmOptions{ActGranularity: ActPerTensor, ActType: ActSymmetricI8, Epilogue: EpilogueReLU,
				NumThreads: 1}, skew: -1, activation: 2, bias: true},
		{name: "two threads, larger", m: 33, n: 96, k: 512, opts: &GemmOptions{NumThreads: 2}, activation: 1,
			bias: true},
		{name: "zero rows", m: 0, n: 8, k: 16, activation: 1, bias: true},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := rand.New(rand.NewSource(int64(i + 1)))
			wNK := randomSlice(r, tc.n*tc.k, 0.5, 0)
			w := wNK
			if tc.layout == LayoutKN {
				w = transpose(wNK, tc.n, tc.k)
			}
			p := mustPack(t, w, tc.n, tc.k, tc.layout, &PackOptions{Granularity: tc.weights})
			if p.N() != tc.n || p.K() != tc.k {
				t.Fatalf("N(), K() = %d, %d", p.N(), p.K())
			}
			a := randomSlice(r, tc.m*tc.k, tc.activation, tc.skew)
			var bias []float32
			if tc.bias {
				bias = randomSlice(r, tc.n, 1, 0)
			}
			y := make([]float32, tc.m*tc.n)
			if err := p.Gemm(y, a, bias, tc.opts); err != nil {
				t.Fatalf("Gemm: %v", err)
			}
			var o GemmOptions
			if tc.opts != nil {
				o = *tc.opts
			}
			q, sw := refQuantizeWeights(wNK, tc.n, tc.k, tc.weights == WeightPerTensor)
			if err := sameBits(y, refGemm(a, tc.m, tc.k, q, sw, tc.n, bias, o)); err != nil {
				t.Fatalf("Gemm differs from the reference: %v", err)
			}
		})
	}
}

// GELU, SiLU and QuickGELU use dynq's own erf and tanh approximations, so each is compared
// with its formula in float64 within a tolerance, applied to the output without epilogue (the value the epilogue
// receives).
func TestGELU(t *testing.T) {
	r := rand.New(rand.NewSource(5))
	n, k, m := 24, 40, 6
	p := mustPack(t, randomSlice(r, n*k, 1, 0), n, k, LayoutNK, nil)
	a := randomSlice(r, m*k, 2, 0)
	bias := randomSlice(r, n, 1, 0)
	plain := make([]float32, m*n)
	if err := p.Gemm(plain, a, bias, nil); err != nil {
		t.Fatal(err)
	}
	forms := []struct {
		name string
		ep   Epilogue
		f    func(x float64) float64
	}{
		{"erf", EpilogueGELU, func(x float64) float64 { return 0.5 * x * (1 + math.Erf(x/math.Sqrt2)) }},
		{"tanh", EpilogueGELUTanh, func(x float64) float64 {
			return 0.5 * x * (1 + math.Tanh(math.Sqrt(2/math.Pi)*(x+0.044715*x*x*x)))
		}},
		{"silu", EpilogueSiLU, func(x float64) float64 { return x / (1 + math.Exp(-x)) }},
		{"quick", EpilogueQuickGELU, func(x float64) float64 { return x / (1 + math.Exp(-1.702*x)) }},
	}
	for _, form := range forms {
		gelu := make([]float32, m*n)
		if err := p.Gemm(gelu, a, bias, &GemmOptions{Epilogue: form.ep}); err != nil {
			t.Fatal(err)
		}
		maxOther := 0.0
		for i, x := range plain {
			want := form.f(float64(x))
			if diff := math.Abs(float64(gelu[i]) - want); diff > 2e-6*(1+math.Abs(want)) {
				t.Fatalf("GELU %s form (%v) = %v, expected %v (difference %g)", form.name, x, gelu[i], want, diff)
			}
			for _, other := range forms {
				if other.ep != form.ep {
					maxOther = math.Max(maxOther, math.Abs(float64(gelu[i])-other.f(float64(x))))
				}
			}
		}
		// The forms differ (the two GELUs by up to 4.7e-4): the epilogue is the one asked for.
		if maxOther < 5e-5 {
			t.Fatalf("GELU %s form is within %g of the other form everywhere", form.name, maxOther)
		}
	}
}

func TestPackQuantized(t *testing.T) {
	cases := []struct {
		name    string
		n, k    int
		layout  Layout
		nScales int // 1 or n
	}{
		{"per channel NK", 13, 29, LayoutNK, 13},
		{"per tensor NK", 8, 64, LayoutNK, 1},
		{"per channel KN", 21, 17, LayoutKN, 21},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := rand.New(rand.NewSource(int64(100 + i)))
			qNK := make([]int8, tc.n*tc.k)
			for j := range qNK {
				qNK[j] = int8(r.Intn(256) - 128) // the full range, -128 included
			}
			scales := randomSlice(r, tc.nScales, 0.01, 0.02)
			q := qNK
			if tc.layout == LayoutKN {
				q = make([]int8, len(qNK))
				for j := 0; j < tc.n; j++ {
					for kk := 0; kk < tc.k; kk++ {
						q[kk*tc.n+j] = qNK[j*tc.k+kk]
					}
				}
			}
			p, err := PackQuantized(q, tc.n, tc.k, tc.layout, scales, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			m := 6
			a := randomSlice(r, m*tc.k, 1, 0.3)
			y := make([]float32, m*tc.n)
			if err := p.Gemm(y, a, nil, nil); err != nil {
				t.Fatal(err)
			}
			if err := sameBits(y, refGemm(a, m, tc.k, qNK, scales, tc.n, nil, GemmOptions{})); err != nil {
				t.Fatalf("Gemm on pre-quantized weights differs from the reference: %v", err)
			}
		})
	}
}

func TestSerializeAndLoad(t *testing.T) {
	r := rand.New(rand.NewSource(7))
	n, k, m := 33, 70, 5
	p := mustPack(t, randomSlice(r, n*k, 1, 0), n, k, LayoutNK, nil)
	blob, err := p.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	info, err := p.Info()
	if err != nil {
		t.Fatal(err)
	}
	if len(blob) != info.SerializedBytes || !bytes.HasPrefix(blob, []byte("DYNQPWT\x00")) {
		t.Fatalf("blob of %d bytes (info says %d), prefix %q", len(blob), info.SerializedBytes, blob[:8])
	}
	if info.Kernel == "" || info.MR <= 0 || info.NR <= 0 || info.KR <= 0 || info.Bytes <= 0 {
		t.Fatalf("Info() = %+v", info)
	}
	p2, err := Load(blob, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer p2.Close()
	// Loading for the portable scalar kernel gives the same bits too.
	p3, err := Load(blob, &PackOptions{ISA: ISAScalar})
	if err != nil {
		t.Fatal(err)
	}
	defer p3.Close()
	if i3, _ := p3.Info(); i3.ISA != ISAScalar {
		t.Fatalf("loaded for %v, asked for scalar", i3.ISA)
	}
	a := randomSlice(r, m*k, 2, 0)
	want := make([]float32, m*n)
	if err := p.Gemm(want, a, nil, nil); err != nil {
		t.Fatal(err)
	}
	for _, q := range []*PackedWeights{p2, p3} {
		got := make([]float32, m*n)
		if err := q.Gemm(got, a, nil, nil); err != nil {
			t.Fatal(err)
		}
		if err := sameBits(got, want); err != nil {
			t.Fatalf("loaded weights: %v", err)
		}
		again, err := q.MarshalBinary()
		if err != nil || !bytes.Equal(again, blob) {
			t.Fatalf("MarshalBinary(Load(blob)) != blob (%v)", err)
		}
	}
}

func TestErrors(t *testing.T) {
	r := rand.New(rand.NewSource(3))
	p := mustPack(t, randomSlice(r, 6*4, 1, 0), 6, 4, LayoutNK, nil)
	blob, err := p.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	flip := func(pos int) []byte {
		b := append([]byte(nil), blob...)
		b[pos] ^= 0x10
		return b
	}
	nanW := randomSlice(r, 6*4, 1, 0)
	nanW[5] = float32(math.NaN())
	infA := make([]float32, 8)
	infA[6] = float32(math.Inf(1))
	pack := func(w []float32, n, k int, l Layout) func() error {
		return func() error {
			p, err := Pack(w, n, k, l, nil)
			if err == nil {
				p.Close()
			}
			return err
		}
	}
	load := func(b []byte) func() error {
		return func() error {
			p, err := Load(b, nil)
			if err == nil {
				p.Close()
			}
			return err
		}
	}
	gemm := func(y, a, bias []float32, o *GemmOptions) func() error {
		return func() error { return p.Gemm(y, a, bias, o) }
	}
	cases := []struct {
		name    string
		run     func() error
		status  Status
		message string // a part of the message; "" = any non-empty message
	}{
		// Shapes refused by the library, with its message.
		{"pack n = 0", pack(nil, 0, 4, LayoutNK), StatusInvalidArgument, "n=0"},
		{"pack k above 65536", pack(make([]float32, 65537), 1, 65537, LayoutNK), StatusUnsupported, "65536"},
		{"pack NaN weights", pack(nanW, 6, 4, LayoutNK), StatusNonFinite, ""},
		{"pack unknown layout", pack(make([]float32, 4), 2, 2, Layout(7)), StatusInvalidArgument, "layout"},
		{"pack quantized, wrong scale count", func() error {
			_, err := PackQuantized(make([]int8, 6), 2, 3, LayoutNK, []float32{1, 2, 3}, nil)
			return err
		}, StatusInvalidArgument, "num_scales"},
		{"pack for an unknown ISA", func() error {
			_, err := Pack(make([]float32, 4), 2, 2, LayoutNK, &PackOptions{ISA: 99})
			return err
		}, StatusInvalidArgument, "isa"},
		// Shapes refused by the binding before calling C.
		{"pack slice shorter than n*k", pack(make([]float32, 5), 2, 3, LayoutNK), StatusInvalidArgument, "len(w) = 5"},
		{"pack negative shape", pack(nil, -1, 3, LayoutNK), StatusInvalidArgument, "negative"},
		{"gemm a not a multiple of k", gemm(make([]float32, 12), make([]float32, 7), nil, nil),
			StatusInvalidArgument, "multiple of k = 4"},
		{"gemm y of the wrong length", gemm(make([]float32, 11), make([]float32, 8), nil, nil),
			StatusInvalidArgument, "len(y) = 11"},
		{"gemm bias of the wrong length", gemm(make([]float32, 12), make([]float32, 8), make([]float32, 5), nil),
			StatusInvalidArgument, "len(bias) = 5"},
		{"gemm negative threads", gemm(make([]float32, 6), make([]float32, 4), nil, &GemmOptions{NumThreads: -1}),
			StatusInvalidArgument, "NumThreads"},
		// Values refused by the library.
		{"gemm infinite activation", gemm(make([]float32, 12), infA, nil, nil), StatusNonFinite, "A[1][2]"},
		{"gemm unknown epilogue", gemm(make([]float32, 6), make([]float32, 4), nil, &GemmOptions{Epilogue: 9}),
			StatusInvalidArgument, "epilogue"},
		// Corrupt blobs.
		{"load flipped magic", load(flip(0)), StatusCorruptData, ""},
		{"load flipped header", load(flip(30)), StatusCorruptData, ""},
		{"load flipped weights", load(flip(len(blob) / 2)), StatusCorruptData, ""},
		{"load flipped checksum", load(flip(len(blob) - 1)), StatusCorruptData, ""},
		{"load truncated", load(blob[:len(blob)-1]), StatusCorruptData, ""},
		{"load empty", load(nil), StatusCorruptData, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.run()
			if err == nil {
				t.Fatal("no error")
			}
			var de *Error
			if !errors.As(err, &de) {
				t.Fatalf("error %v (%T) is not a *dynq.Error", err, err)
			}
			if !errors.Is(err, tc.status) || de.Status != tc.status {
				t.Fatalf("status %v, expected %v (%v)", de.Status, tc.status, err)
			}
			if de.Message == "" || !strings.Contains(de.Message, tc.message) {
				t.Fatalf("message %q should contain %q", de.Message, tc.message)
			}
			if !strings.Contains(err.Error(), de.Message) || !strings.Contains(err.Error(), tc.status.String()) {
				t.Fatalf("Error() = %q lacks the message or the status", err.Error())
			}
		})
	}

	// y is left untouched by a failing call.
	y := []float32{7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7}
	_ = p.Gemm(y, infA, nil, nil)
	for _, v := range y {
		if v != 7 {
			t.Fatalf("a failing Gemm wrote y: %v", y)
		}
	}
}

func TestClose(t *testing.T) {
	p, err := Pack([]float32{1, 2, 3, 4}, 2, 2, LayoutNK, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := p.Gemm(make([]float32, 2), []float32{1, 1}, nil, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("Gemm after Close: %v", err)
	}
	if _, err := p.MarshalBinary(); !errors.Is(err, ErrClosed) {
		t.Fatalf("MarshalBinary after Close: %v", err)
	}
	if _, err := p.Info(); !errors.Is(err, ErrClosed) {
		t.Fatalf("Info after Close: %v", err)
	}
}

func TestConcurrentGemm(t *testing.T) {
	r := rand.New(rand.NewSource(11))
	n, k, m := 64, 128, 9
	p := mustPack(t, randomSlice(r, n*k, 1, 0), n, k, LayoutNK, nil)
	a := randomSlice(r, m*k, 1, 0.5)
	want := make([]float32, m*n)
	if err := p.Gemm(want, a, nil, &GemmOptions{NumThreads: 1}); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for it := 0; it < 20; it++ {
				y := make([]float32, m*n)
				if err := p.Gemm(y, a, nil, &GemmOptions{NumThreads: g % 3}); err != nil {
					errs <- err
					return
				}
				if err := sameBits(y, want); err != nil {
					errs <- err
					return
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// A handle dropped without Close is freed by the finalizer; this only checks that doing so
// does not crash (the C side is not observable from here).
func TestFinalizer(t *testing.T) {
	for i := 0; i < 100; i++ {
		if _, err := Pack(make([]float32, 64*64), 64, 64, LayoutNK, nil); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 3; i++ {
		runtime.GC()
	}
}

// WeightQmax 64 quantizes to [-64, 64] as the documented formula does with 64 for 127, runs
// the narrow-weight kernel where the CPU's ISA has one (AVX2 without VNNI), and gives the bits
// of the same int8 weights packed for the portable scalar kernel.
func TestWeightQmax(t *testing.T) {
	const n, k, m = 37, 90, 5
	r := rand.New(rand.NewSource(64))
	w := randomSlice(r, n*k, 0.7, 0)
	p := mustPack(t, w, n, k, LayoutNK, &PackOptions{WeightQmax: 64})
	defer p.Close()
	blob, err := p.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	// The blob: 48-byte header, n scales, then the [n][k] int8 weights.
	q := blob[48+4*n : 48+4*n+n*k]
	for j := 0; j < n; j++ {
		max := 0
		for i := 0; i < k; i++ {
			v := int(int8(q[j*k+i]))
			if v < 0 {
				v = -v
			}
			if v > max {
				max = v
			}
		}
		if max != 64 {
			t.Fatalf("channel %d: largest |q| = %d, want 64", j, max)
		}
	}
	info, err := p.Info()
	if err != nil {
		t.Fatal(err)
	}
	if info.ISA == ISAAVX2 && !strings.HasSuffix(info.Kernel, "_narrow") {
		t.Fatalf("AVX2 packed 7-bit weights for %s, not its narrow-weight kernel", info.Kernel)
	}
	scalar, err := Load(blob, &PackOptions{ISA: ISAScalar})
	if err != nil {
		t.Fatal(err)
	}
	defer scalar.Close()
	a := randomSlice(r, m*k, 2, 0)
	want, got := make([]float32, m*n), make([]float32, m*n)
	if err := scalar.Gemm(want, a, nil, nil); err != nil {
		t.Fatal(err)
	}
	if err := p.Gemm(got, a, nil, nil); err != nil {
		t.Fatal(err)
	}
	if err := sameBits(got, want); err != nil {
		t.Fatalf("%s against scalar: %v", info.Kernel, err)
	}
	for _, bad := range []int{-1, 128, 1000} {
		if _, err := Pack(w, n, k, LayoutNK, &PackOptions{WeightQmax: bad}); err == nil {
			t.Fatalf("WeightQmax %d accepted", bad)
		}
	}
}
