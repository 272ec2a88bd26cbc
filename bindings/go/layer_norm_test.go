package dynq

import (
	"errors"
	"fmt"
	"math"
	"math/rand"
	"testing"
)

// lnTree is the halving tree of dynq's layer norm over 64 lane sums.
func lnTree(s []float32) float32 {
	for w := 32; w > 0; w /= 2 {
		for l := 0; l < w; l++ {
			s[l] = float32(s[l] + s[l+w])
		}
	}
	return s[0]
}

// layerNormRef is dynq's layer norm definition in Go (explicit float32 conversions: no fused
// operations), in place on one row.
func layerNormRef(x []float32, scale, bias []float32, eps float32) {
	n := len(x)
	s := make([]float32, 64)
	for j, v := range x {
		s[j%64] = float32(s[j%64] + v)
	}
	m0 := float32(lnTree(s) / float32(n))
	s = make([]float32, 64)
	for j, v := range x {
		s[j%64] = float32(s[j%64] + float32(v-m0))
	}
	mean := float32(m0 + float32(lnTree(s)/float32(n)))
	s = make([]float32, 64)
	for j, v := range x {
		d := float32(v - mean)
		s[j%64] = float32(s[j%64] + float32(d*d))
	}
	v := float32(lnTree(s) / float32(n))
	inv := float32(1 / float32(math.Sqrt(float64(float32(v+eps)))))
	for j := range x {
		t := float32(float32(x[j]-mean) * inv)
		t = float32(t * scale[j])
		if bias != nil {
			t = float32(t + bias[j])
		}
		x[j] = t
	}
}

// GemmLayerNorm equals GemmResidual followed by the layer norm's definition on each row (the
// stored, rounded values widened), rounded to y's type, bit for bit, on every output type,
// with and without a residual and a bias; bad parameters fail with y untouched.
func TestGemmLayerNormMatchesDefinition(t *testing.T) {
	r := rand.New(rand.NewSource(77))
	for _, sh := range []struct{ m, n, k int }{{1, 16, 32}, {7, 130, 40}, {33, 200, 64}} {
		p := mustPack(t, randomSlice(r, sh.n*sh.k, 0.5, 0), sh.n, sh.k, LayoutNK, nil)
		a := F32(outlierActivations(r, sh.m, sh.k, 1))
		bias := randomSlice(r, sh.n, 1, 0)
		scale := randomSlice(r, sh.n, 0.5, 1)
		lb := randomSlice(r, sh.n, 1, 0)
		r32 := randomSlice(r, sh.m*sh.n, 3, 0)
		for _, yt := range allDTypes {
			for _, withRes := range []bool{true, false} {
				for _, withBias := range []bool{true, false} {
					name := fmt.Sprintf("%dx%dx%d/%v/res=%v/bias=%v", sh.m, sh.n, sh.k, yt, withRes, withBias)
					t.Run(name, func(t *testing.T) {
						res := Slice{}
						if withRes {
							res = narrowTo(yt, r32)
						}
						ln := LayerNorm{Scale: scale, Epsilon: 1e-5}
						if withBias {
							ln.Bias = lb
						}
						base := zeros(yt, sh.m*sh.n)
						opts := &GemmOptions{Epilogue: EpilogueGELU, NumThreads: 2}
						if err := p.GemmResidual(base, a, res, nil, bias, opts); err != nil {
							t.Fatal(err)
						}
						want32 := widen(base)
						for i := 0; i < sh.m; i++ {
							layerNormRef(want32[i*sh.n:(i+1)*sh.n], ln.Scale, ln.Bias, ln.Epsilon)
						}
						y := zeros(yt, sh.m*sh.n)
						if err := p.GemmLayerNorm(y, a, res, ln, nil, bias, opts); err != nil {
							t.Fatal(err)
						}
						if err := sameSlice(y, narrowTo(yt, want32)); err != nil {
							t.Fatalf("GemmLayerNorm differs from its definition: %v", err)
						}
					})
				}
			}
		}
	}
	// Refusals, y untouched.
	p := mustPack(t, randomSlice(r, 8*16, 0.5, 0), 8, 16, LayoutNK, nil)
	a := F32(randomSlice(r, 2*16, 1, 0))
	ones := []float32{1, 1, 1, 1, 1, 1, 1, 1}
	nan := []float32{1, float32(math.NaN()), 1, 1, 1, 1, 1, 1}
	for _, tc := range []struct {
		name string
		ln   LayerNorm
		want Status
	}{
		{"short scale", LayerNorm{Scale: ones[:7], Epsilon: 1e-5}, StatusInvalidArgument},
		{"short bias", LayerNorm{Scale: ones, Bias: ones[:3], Epsilon: 1e-5}, StatusInvalidArgument},
		{"NaN scale", LayerNorm{Scale: nan, Epsilon: 1e-5}, StatusNonFinite},
		{"negative epsilon", LayerNorm{Scale: ones, Epsilon: -1}, StatusInvalidArgument},
	} {
		y := make([]float32, 16)
		for i := range y {
			y[i] = 7
		}
		err := p.GemmLayerNorm(F32(y), a, Slice{}, tc.ln, nil, nil, nil)
		var de *Error
		if !errors.As(err, &de) || de.Status != tc.want {
			t.Fatalf("%s: got %v, want status %v", tc.name, err, tc.want)
		}
		for _, v := range y {
			if v != 7 {
				t.Fatalf("%s: y written after an error", tc.name)
			}
		}
	}
}
