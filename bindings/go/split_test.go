//go:build go1.21

package dynq

import (
	"errors"
	"fmt"
	"math"
	"math/rand"
	"strings"
	"testing"
)

// columns returns columns [from, from+w) of the m x n matrix s, as a dense m x w matrix.
func columns(s Slice, m, n, from, w int) Slice {
	if s.bits16 {
		c := make([]uint16, 0, m*w)
		for i := 0; i < m; i++ {
			c = append(c, s.u16[i*n+from:i*n+from+w]...)
		}
		return Slice16(c, s.dtype)
	}
	c := make([]float32, 0, m*w)
	for i := 0; i < m; i++ {
		c = append(c, s.f32[i*n+from:i*n+from+w]...)
	}
	return F32(c)
}

// splitOutputs returns outputs of type t for m rows and the widths, as subslices of one buffer
// with gap sentinel elements before, between and after them, and the buffer.
func splitOutputs(t DType, m int, widths []int, gap int) ([]Slice, Slice) {
	total := gap
	for _, w := range widths {
		total += m*w + gap
	}
	buf := sentinels(t, total)
	ys := make([]Slice, len(widths))
	at := gap
	for g, w := range widths {
		ys[g] = sub(buf, at, at+m*w)
		at += m*w + gap
	}
	return ys, buf
}

// sentinels returns count elements of type t that no GEMM here gives (7.5 or its 16-bit bits).
func sentinels(t DType, count int) Slice {
	v := make([]float32, count)
	for i := range v {
		v[i] = 7.5
	}
	return narrowTo(t, v)
}

// sub is s[from:to] with s's element type.
func sub(s Slice, from, to int) Slice {
	if s.bits16 {
		return Slice16(s.u16[from:to], s.dtype)
	}
	return F32(s.f32[from:to])
}

// clone is a copy of s, with its element type and representation.
func clone(s Slice) Slice {
	c := s
	c.f32 = append([]float32(nil), s.f32...)
	c.u16 = append([]uint16(nil), s.u16...)
	return c
}

// GemmSplit on every pair of element types gives, in each output, exactly the columns of
// GemmSmoothed, bit for bit, and writes nothing outside its outputs.
func TestGemmSplitMatchesGemmSmoothed(t *testing.T) {
	cases := []struct {
		name   string
		m, k   int
		widths []int
		opts   *GemmOptions
		bias   bool
		smooth bool
	}{
		{name: "5+39+17", m: 7, k: 70, widths: []int{5, 39, 17}, bias: true, smooth: true},
		{name: "1x1x1", m: 1, k: 1, widths: []int{1}, bias: true, smooth: true},
		{name: "no factors, no bias, 13+35", m: 4, k: 36, widths: []int{13, 35}},
		{name: "relu, two threads, 17+5+39+3", m: 9, k: 130, widths: []int{17, 5, 39, 3}, bias: true, smooth: true,
			opts: &GemmOptions{Epilogue: EpilogueReLU, NumThreads: 2}},
		{name: "gelu, per-tensor symmetric, 1+22+1", m: 5, k: 40, widths: []int{1, 22, 1}, bias: true, smooth: true,
			opts: &GemmOptions{Epilogue: EpilogueGELU, ActGranularity: ActPerTensor, ActType: ActSymmetricI8}},
		{name: "one output, 61", m: 3, k: 33, widths: []int{61}, bias: true, smooth: true},
		{name: "zero rows, 5+3", m: 0, k: 16, widths: []int{5, 3}, bias: true, smooth: true},
	}
	for i, tc := range cases {
		n := 0
		for _, w := range tc.widths {
			n += w
		}
		r := rand.New(rand.NewSource(int64(500 + i)))
		p := mustPack(t, randomSlice(r, n*tc.k, 0.5, 0), n, tc.k, LayoutNK, nil)
		a32 := outlierActivations(r, tc.m, tc.k, 1)
		var smooth, bias []float32
		if tc.smooth {
			smooth = smoothingFactors(r, tc.k)
		}
		if tc.bias {
			bias = randomSlice(r, n, 1, 0)
		}
		for _, at := range allDTypes {
			for _, yt := range allDTypes {
				t.Run(fmt.Sprintf("%s/%v->%v", tc.name, at, yt), func(t *testing.T) {
					a := narrowTo(at, a32)
					want := zeros(yt, tc.m*n)
					if err := p.GemmSmoothed(want, a, smooth, bias, tc.opts); err != nil {
						t.Fatalf("GemmSmoothed: %v", err)
					}
					const gap = 3
					ys, buf := splitOutputs(yt, tc.m, tc.widths, gap)
					if err := p.GemmSplit(ys, tc.widths, a, smooth, bias, tc.opts); err != nil {
						t.Fatalf("GemmSplit: %v", err)
					}
					from := 0
					for g, w := range tc.widths {
						if err := sameSlice(ys[g], columns(want, tc.m, n, from, w)); err != nil {
							t.Fatalf("output %d (columns %d to %d) differs from GemmSmoothed: %v", g, from, from+w-1, err)
						}
						from += w
					}
					// The gaps around the outputs keep their sentinels.
					untouched := sentinels(yt, gap)
					at := 0
					for g := 0; g <= len(tc.widths); g++ {
						if err := sameSlice(sub(buf, at, at+gap), untouched); err != nil {
							t.Fatalf("GemmSplit wrote outside its outputs, before output %d: %v", g, err)
						}
						if g < len(tc.widths) {
							at += gap + tc.m*tc.widths[g]
						}
					}
				})
			}
		}
	}
}

// One output of width N() is GemmSmoothed, hence Gemm without factors; outputs of width 1 are
// the columns one by one.
func TestGemmSplitOneOutputAndNarrowOutputs(t *testing.T) {
	r := rand.New(rand.NewSource(51))
	n, k, m := 7, 24, 3
	p := mustPack(t, randomSlice(r, n*k, 0.5, 0), n, k, LayoutNK, nil)
	a := randomSlice(r, m*k, 1, 0)
	bias := randomSlice(r, n, 1, 0)
	opts := &GemmOptions{ActType: ActSymmetricI8}
	want := make([]float32, m*n)
	if err := p.Gemm(want, a, bias, opts); err != nil {
		t.Fatal(err)
	}
	y := make([]float32, m*n)
	if err := p.GemmSplit([]Slice{F32(y)}, []int{n}, F32(a), nil, bias, opts); err != nil {
		t.Fatalf("GemmSplit with one output: %v", err)
	}
	if err := sameBits(y, want); err != nil {
		t.Fatalf("GemmSplit with one output of width N differs from Gemm: %v", err)
	}

	ys := make([]Slice, n)
	widths := make([]int, n)
	for j := range ys {
		ys[j] = zeros(DTypeBF16, m)
		widths[j] = 1
	}
	if err := p.GemmSplit(ys, widths, F32(a), nil, bias, opts); err != nil {
		t.Fatalf("GemmSplit with %d outputs of width 1: %v", n, err)
	}
	want16 := narrowTo(DTypeBF16, want)
	for j := range ys {
		if err := sameSlice(ys[j], columns(want16, m, n, j, 1)); err != nil {
			t.Fatalf("output %d of width 1 is not column %d of Gemm: %v", j, j, err)
		}
	}
}

func TestGemmSplitErrors(t *testing.T) {
	const op = "GemmSplit"
	r := rand.New(rand.NewSource(7))
	p := mustPack(t, randomSlice(r, 6*4, 1, 0), 6, 4, LayoutNK, nil) // n = 6, k = 4
	good := []float32{0.5, 2, 1.5, 3}
	f32 := func(count int) Slice { return sentinels(DTypeF32, count) }
	f16 := func(count int) Slice { return sentinels(DTypeF16, count) }
	bf16 := func(count int) Slice { return sentinels(DTypeBF16, count) }
	a := F32(randomSlice(r, 8, 1, 0)) // m = 2
	nanA := randomSlice(r, 8, 1, 0)
	nanA[5] = float32(math.NaN())
	shared := sentinels(DTypeF32, 12)
	inputs := randomSlice(r, 20, 1, 0) // a in [0, 8), then outputs
	for i := 8; i < len(inputs); i++ {
		inputs[i] = 7.5
	}
	cases := []struct {
		name    string
		ys      []Slice
		widths  []int
		a       Slice
		smooth  []float32
		bias    []float32
		status  Status
		message string
	}{
		// Refused by the binding before calling C.
		{"3 widths for 2 outputs", []Slice{f32(4), f32(8)}, []int{2, 4, 0}, a, good, nil, StatusInvalidArgument,
			"len(ys) = 2, len(widths) = 3: one width per output"},
		{"7 values for 2 rows of 4", []Slice{f32(4), f32(7)}, []int{2, 4}, a, good, nil, StatusInvalidArgument,
			"len(ys[1]) = 7, expected m*widths[1] = 2*4 = 8"},
		{"9 values for 2 rows of 4, f16", []Slice{f16(4), f16(9)}, []int{2, 4}, a, nil, nil, StatusInvalidArgument,
			"len(ys[1]) = 9, expected m*widths[1] = 2*4 = 8"},
		{"values for zero rows", []Slice{bf16(0), bf16(4)}, []int{2, 4}, F32(nil), nil, nil, StatusInvalidArgument,
			"len(ys[1]) = 4, expected m*widths[1] = 0*4 = 0"},
		{"f32 and f16 outputs", []Slice{f32(4), f16(8)}, []int{2, 4}, a, good, nil, StatusInvalidArgument,
			"ys[1] is f16, expected ys[0]'s element type f32"},
		{"bf16, bf16 and f16 outputs", []Slice{bf16(2), bf16(2), f16(8)}, []int{1, 1, 4}, a, nil, nil,
			StatusInvalidArgument, "ys[2] is f16, expected ys[0]'s element type bf16"},
		{"16-bit output tagged f32", []Slice{f32(4), Slice16(make([]uint16, 8), DTypeF32)}, []int{2, 4}, a, nil, nil,
			StatusInvalidArgument, "ys[1] holds 16-bit elements tagged f32"},
		{"negative width", []Slice{f32(16), f32(0)}, []int{8, -2}, a, nil, nil, StatusInvalidArgument,
			"widths[1] = -2 is negative"},
		{"3 factors", []Slice{f32(4), f32(8)}, []int{2, 4}, a, good[:3], nil, StatusInvalidArgument,
			"len(smooth) = 3, expected 0 or k = 4"},
		{"5 bias values", []Slice{f32(4), f32(8)}, []int{2, 4}, a, nil, make([]float32, 5), StatusInvalidArgument,
			"len(bias) = 5, expected 0 or n = 6"},
		{"a not a multiple of k", []Slice{f32(4), f32(8)}, []int{2, 4}, F32(make([]float32, 7)), nil, nil,
			StatusInvalidArgument, "len(a) = 7 is not a multiple of k = 4"},
		// Refused by the library, with its message.
		{"widths 2+3 for n = 6", []Slice{f32(4), f32(6)}, []int{2, 3}, a, good, nil, StatusInvalidArgument,
			"output widths [2, 3] must add up to n = 6"},
		{"widths 4+4 for n = 6, bf16", []Slice{bf16(8), bf16(8)}, []int{4, 4}, a, nil, nil, StatusInvalidArgument,
			"output widths [4, 4] must add up to n = 6"},
		{"widths 2+3, zero rows", []Slice{f32(0), f32(0)}, []int{2, 3}, F32(nil), nil, nil, StatusInvalidArgument,
			"output widths [2, 3] must add up to n = 6"},
		{"zero width", []Slice{f32(12), f32(0)}, []int{6, 0}, a, good, nil, StatusInvalidArgument,
			"outputs[1].cols is 0"},
		{"zero width, zero rows", []Slice{f16(0), f16(0)}, []int{0, 6}, F16(nil), nil, nil, StatusInvalidArgument,
			"outputs[0].cols is 0"},
		{"no outputs", nil, nil, a, good, nil, StatusInvalidArgument, "num_outputs is 0"},
		{"outputs overlap", []Slice{F32(shared.f32[0:6]), F32(shared.f32[4:10])}, []int{3, 3}, a, good, nil,
			StatusInvalidArgument, "outputs[1].y overlaps outputs[0].y; outputs must be separate buffers"},
		{"output overlaps a", []Slice{f32(6), F32(inputs[6:12])}, []int{3, 3}, F32(inputs[0:8]), nil, nil,
			StatusInvalidArgument, "outputs[1].y overlaps a"},
		{"output overlaps smooth", []Slice{F32(inputs[8:14]), f32(6)}, []int{3, 3}, a, inputs[10:14], nil,
			StatusInvalidArgument, "outputs[0].y overlaps smooth"},
		{"zero factor", []Slice{f32(4), f32(8)}, []int{2, 4}, a, []float32{0.5, 0, 1.5, 3}, nil, StatusInvalidArgument,
			"smoothing factor [1] is 0"},
		{"NaN activation", []Slice{f16(4), f16(8)}, []int{2, 4}, F32(nanA), nil, nil, StatusNonFinite,
			"A[1][1] is NaN"},
		{"unknown a type", []Slice{f16(4), f16(8)}, []int{2, 4}, Slice16(make([]uint16, 8), DType(7)), nil, nil,
			StatusInvalidArgument, "a_type=7 is not a dynq_dtype value"},
		{"unknown output type", []Slice{Slice16(make([]uint16, 4), DType(9)), Slice16(make([]uint16, 8), DType(9))},
			[]int{2, 4}, a, nil, nil, StatusInvalidArgument, "y_type=9 is not a dynq_dtype value"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := make([]Slice, len(tc.ys))
			for g, y := range tc.ys {
				before[g] = clone(y)
			}
			checkOpError(t, op, p.GemmSplit(tc.ys, tc.widths, tc.a, tc.smooth, tc.bias, nil), tc.status, tc.message)
			// Every output is left untouched.
			for g, y := range tc.ys {
				if err := sameSlice(y, before[g]); err != nil {
					t.Fatalf("a refused GemmSplit wrote output %d: %v", g, err)
				}
			}
		})
	}

	// The same slice twice: refused by the library for every element type, untouched.
	for _, yt := range allDTypes {
		t.Run(fmt.Sprintf("one slice twice/%v", yt), func(t *testing.T) {
			y := sentinels(yt, 6)
			err := p.GemmSplit([]Slice{y, y}, []int{3, 3}, a, good, nil, nil)
			checkOpError(t, op, err, StatusInvalidArgument, "outputs[1].y overlaps outputs[0].y")
			var de *Error
			if errors.As(err, &de) && de.Message != "outputs[1].y overlaps outputs[0].y; outputs must be separate buffers" {
				t.Fatalf("library's message %q", de.Message)
			}
			if err := sameSlice(y, sentinels(yt, 6)); err != nil {
				t.Fatalf("a refused GemmSplit wrote its output: %v", err)
			}
		})
	}

	// The binding's messages in full.
	err := p.GemmSplit([]Slice{f32(4), f16(8)}, []int{2, 4}, a, nil, nil, nil)
	var de *Error
	if !errors.As(err, &de) ||
		de.Message != "ys[1] is f16, expected ys[0]'s element type f32 (the outputs share one type)" {
		t.Fatalf("mixed element types: %v", err)
	}

	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if err := p.GemmSplit([]Slice{f32(2), f32(4)}, []int{2, 4}, F32(make([]float32, 4)), nil, nil, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("GemmSplit after Close: %v", err)
	}
}

// GemmSplitHeads writes each element of GemmSmoothed at its place in the head layouts (heads of
// 16 and 12, transposed or not, beside a dense output), for f32 and f16 outputs, and refuses
// bad layouts with every output untouched.
func TestGemmSplitHeadsPlacesGemmSmoothed(t *testing.T) {
	const batch, seq, k = 2, 5, 40
	m := batch * seq
	widths := []int{64, 36, 20}
	heads := []Heads{{Heads: 4, Seq: seq}, {Heads: 3, Seq: seq, Transposed: true}, {}}
	n := 0
	for _, w := range widths {
		n += w
	}
	rng := rand.New(rand.NewSource(11))
	w := make([]float32, n*k)
	for i := range w {
		w[i] = float32(rng.NormFloat64())
	}
	p := mustPack(t, w, n, k, LayoutKN, nil)
	a := make([]float32, m*k)
	for i := range a {
		a[i] = float32(rng.NormFloat64())
	}
	for _, yt := range []DType{DTypeF32, DTypeF16} {
		whole := zeros(yt, m*n)
		if err := p.GemmSmoothed(whole, F32(a), nil, nil, nil); err != nil {
			t.Fatal(err)
		}
		ys, _ := splitOutputs(yt, m, widths, 0)
		if err := p.GemmSplitHeads(ys, widths, heads, F32(a), nil, nil, nil); err != nil {
			t.Fatal(err)
		}
		from := 0
		for g, wd := range widths {
			h := heads[g]
			for i := 0; i < m; i++ {
				for j := 0; j < wd; j++ {
					at := i*wd + j
					if h.Heads > 0 {
						d := wd / h.Heads
						b, s, hh, e := i/seq, i%seq, j/d, j%d
						at = ((b*h.Heads+hh)*seq+s)*d + e
						if h.Transposed {
							at = ((b*h.Heads+hh)*d+e)*seq + s
						}
					}
					if got, want := elemBits(ys[g], at), elemBits(whole, i*n+from+j); got != want {
						t.Fatalf("%v output %d (%+v) row %d col %d: %#x, want %#x", yt, g, h, i, j, got, want)
					}
				}
			}
			from += wd
		}
	}
	for _, c := range []struct {
		heads []Heads
		want  string
	}{
		{[]Heads{{Heads: 5, Seq: seq}, {}, {}}, "do not split into 5 heads"},
		{[]Heads{{Heads: 4, Seq: 3}, {}, {}}, "not whole sequences of 3"},
		{[]Heads{{Heads: 4}, {}, {}}, "must be positive"},
		{[]Heads{{Heads: -1, Seq: seq}, {}, {}}, "must not be negative"},
		{[]Heads{{}, {}}, "one layout per output"},
	} {
		ys, buf := splitOutputs(DTypeF32, m, widths, 1)
		before := clone(buf)
		err := p.GemmSplitHeads(ys, widths, c.heads, F32(a), nil, nil, nil)
		var de *Error
		if !errors.As(err, &de) || de.Status != StatusInvalidArgument || !strings.Contains(err.Error(), c.want) {
			t.Errorf("heads %+v: got %v, want StatusInvalidArgument with %q", c.heads, err, c.want)
		}
		for i := 0; i < buf.Len(); i++ {
			if elemBits(buf, i) != elemBits(before, i) {
				t.Fatalf("heads %+v: output element %d written after an error", c.heads, i)
			}
		}
	}
}

// elemBits is the bit pattern of element i of s (f32 bits, or the 16-bit value).
func elemBits(s Slice, i int) uint32 {
	if s.bits16 {
		return uint32(s.u16[i])
	}
	return math.Float32bits(s.f32[i])
}
