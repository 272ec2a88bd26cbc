package dynq

import (
	"math"
	"math/rand"
	"testing"
)

func f32(bits uint32) float32 { return math.Float32frombits(bits) }

// sameFloat32 compares bits, except that any NaN equals any NaN.
func sameFloat32(got, want float32) bool {
	if want != want {
		return got != got
	}
	return math.Float32bits(got) == math.Float32bits(want)
}

// isNaN16 reports whether a float16 (mantissa 10 bits) or bfloat16 (7 bits) pattern is a NaN.
func isNaN16(b uint16, bf bool) bool {
	if bf {
		return b&0x7f80 == 0x7f80 && b&0x7f != 0
	}
	return b&0x7c00 == 0x7c00 && b&0x3ff != 0
}

func TestFloat16bits(t *testing.T) {
	cases := []struct {
		name string
		f    float32
		want uint16
	}{
		{"one", 1, 0x3c00},
		{"minus two", -2, 0xc000},
		{"zero", 0, 0x0000},
		{"negative zero", f32(0x80000000), 0x8000},
		{"0.1 rounds down", 0.1, 0x2e66},
		{"1/3", 1.0 / 3, 0x3555},
		{"max", 65504, 0x7bff},
		{"just below the overflow tie", math.Nextafter32(65520, 0), 0x7bff},
		{"overflow tie goes to infinity (even)", 65520, 0x7c00},
		{"overflow", 1e6, 0x7c00},
		{"negative overflow", -1e30, 0xfc00},
		{"infinity", float32(math.Inf(1)), 0x7c00},
		{"negative infinity", float32(math.Inf(-1)), 0xfc00},
		{"smallest normal", 1.0 / (1 << 14), 0x0400},
		{"largest subnormal", 1023.0 / (1 << 24), 0x03ff},
		{"smallest subnormal", 1.0 / (1 << 24), 0x0001},
		{"negative smallest subnormal", -1.0 / (1 << 24), 0x8001},
		{"tie between subnormal and normal goes up (even)", 1023.5 / (1 << 24), 0x0400},
		{"half the smallest subnormal ties to zero", 1.0 / (1 << 25), 0x0000},
		{"just above half the smallest subnormal", math.Nextafter32(1.0/(1<<25), 1), 0x0001},
		{"1.5 smallest subnormals ties to 2", 3.0 / (1 << 25), 0x0002},
		{"2.5 smallest subnormals ties to 2", 5.0 / (1 << 25), 0x0002},
		{"float32 subnormal underflows", f32(0x00000001), 0x0000},
		{"negative float32 subnormal underflows", f32(0x80000001), 0x8000},
		{"tie above 1 goes down (even)", 1 + 1.0/(1<<11), 0x3c00},
		{"tie above 1+ulp goes up (even)", 1 + 3.0/(1<<11), 0x3c02},
		{"just above the tie", math.Nextafter32(1+1.0/(1<<11), 2), 0x3c01},
		{"carry into the exponent", math.Nextafter32(2, 0), 0x4000},
		{"quiet NaN", f32(0x7fc00000), 0x7e00},
		{"negative NaN", f32(0xffc00000), 0xfe00},
		{"NaN payload only in the low bits stays NaN", f32(0x7f800001), 0x7e00},
		{"NaN keeps its leading payload", f32(0x7fa02000), 0x7f01},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := Float16bits(tc.f); got != tc.want {
				t.Fatalf("Float16bits(%v = %#08x) = %#04x, expected %#04x", tc.f, math.Float32bits(tc.f), got, tc.want)
			}
		})
	}
}

func TestBFloat16bits(t *testing.T) {
	cases := []struct {
		name string
		f    float32
		want uint16
	}{
		{"one", 1, 0x3f80},
		{"minus two", -2, 0xc000},
		{"negative zero", f32(0x80000000), 0x8000},
		{"pi rounds down", math.Pi, 0x4049},
		{"0.1 rounds up", 0.1, 0x3dcd},
		{"max", f32(0x7f7f0000), 0x7f7f},
		{"max float32 overflows", math.MaxFloat32, 0x7f80},
		{"overflow tie goes to infinity (even)", f32(0x7f7f8000), 0x7f80},
		{"just below the overflow tie", f32(0x7f7f7fff), 0x7f7f},
		{"infinity", float32(math.Inf(1)), 0x7f80},
		{"negative infinity", float32(math.Inf(-1)), 0xff80},
		{"tie above 1 goes down (even)", 1 + 1.0/(1<<8), 0x3f80},
		{"tie above 1+ulp goes up (even)", 1 + 3.0/(1<<8), 0x3f82},
		{"just above the tie", math.Nextafter32(1+1.0/(1<<8), 2), 0x3f81},
		{"smallest subnormal", f32(0x00010000), 0x0001},
		{"subnormal tie to zero", f32(0x00008000), 0x0000},
		{"subnormal tie to 2", f32(0x00018000), 0x0002},
		{"largest subnormal rounds to the smallest normal", f32(0x007fffff), 0x0080},
		{"quiet NaN", f32(0x7fc00000), 0x7fc0},
		{"negative NaN", f32(0xffc00000), 0xffc0},
		{"NaN payload only in the low bits stays NaN", f32(0x7f800001), 0x7fc0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := BFloat16bits(tc.f); got != tc.want {
				t.Fatalf("BFloat16bits(%v = %#08x) = %#04x, expected %#04x", tc.f, math.Float32bits(tc.f), got, tc.want)
			}
		})
	}
}

func TestFrombits(t *testing.T) {
	nan := float32(math.NaN())
	cases := []struct {
		name string
		fn   func(uint16) float32
		b    uint16
		want float32
	}{
		{"f16 one", Float16frombits, 0x3c00, 1},
		{"f16 minus two", Float16frombits, 0xc000, -2},
		{"f16 max", Float16frombits, 0x7bff, 65504},
		{"f16 smallest normal", Float16frombits, 0x0400, 1.0 / (1 << 14)},
		{"f16 largest subnormal", Float16frombits, 0x03ff, 1023.0 / (1 << 24)},
		{"f16 smallest subnormal", Float16frombits, 0x0001, 1.0 / (1 << 24)},
		{"f16 negative subnormal", Float16frombits, 0x8201, -513.0 / (1 << 24)},
		{"f16 negative zero", Float16frombits, 0x8000, f32(0x80000000)},
		{"f16 infinity", Float16frombits, 0x7c00, float32(math.Inf(1))},
		{"f16 negative infinity", Float16frombits, 0xfc00, float32(math.Inf(-1))},
		{"f16 quiet NaN", Float16frombits, 0x7e00, nan},
		{"f16 signaling NaN stays NaN", Float16frombits, 0x7c01, nan},
		{"bf16 one", BFloat16frombits, 0x3f80, 1},
		{"bf16 max", BFloat16frombits, 0x7f7f, f32(0x7f7f0000)},
		{"bf16 smallest subnormal", BFloat16frombits, 0x0001, f32(0x00010000)},
		{"bf16 negative infinity", BFloat16frombits, 0xff80, float32(math.Inf(-1))},
		{"bf16 NaN", BFloat16frombits, 0x7fc1, nan},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.fn(tc.b); !sameFloat32(got, tc.want) {
				t.Fatalf("%#04x widens to %v (%#08x), expected %v (%#08x)", tc.b, got, math.Float32bits(got), tc.want,
					math.Float32bits(tc.want))
			}
		})
	}
}

// Every float16 and bfloat16 pattern: widening gives the value of its fields, and narrowing
// the result gives the pattern back (a NaN a NaN).
func TestFloat16AllPatterns(t *testing.T) {
	for i := 0; i < 1<<16; i++ {
		h := uint16(i)
		exp, man := int(h>>10)&0x1f, float64(h&0x3ff)
		var want float64
		switch {
		case exp == 0x1f && man == 0:
			want = math.Inf(1)
		case exp == 0x1f:
			want = math.NaN()
		case exp == 0:
			want = math.Ldexp(man, -24)
		default:
			want = math.Ldexp(1024+man, exp-25)
		}
		if h&0x8000 != 0 {
			want = -want
		}
		got := Float16frombits(h)
		if !sameFloat32(got, float32(want)) {
			t.Fatalf("Float16frombits(%#04x) = %v, expected %v", h, got, want)
		}
		back := Float16bits(got)
		if isNaN16(h, false) {
			if !isNaN16(back, false) || back&0x8000 != h&0x8000 {
				t.Fatalf("f16 NaN %#04x came back as %#04x", h, back)
			}
		} else if back != h {
			t.Fatalf("Float16bits(Float16frombits(%#04x)) = %#04x", h, back)
		}

		got = BFloat16frombits(h)
		back = BFloat16bits(got)
		if isNaN16(h, true) {
			if got == got || !isNaN16(back, true) || back&0x8000 != h&0x8000 {
				t.Fatalf("bf16 NaN %#04x widened to %v, came back as %#04x", h, got, back)
			}
		} else if back != h {
			t.Fatalf("BFloat16bits(BFloat16frombits(%#04x)) = %#04x", h, back)
		}
	}
}

// refRound rounds x to mantBits fraction bits and exponents down to minExp (subnormals below)
// in float64, ties to even, giving infinity above maxFinite: an independent reference.
func refRound(x float32, mantBits, minExp int, maxFinite float64) float64 {
	ax := math.Abs(float64(x))
	if ax != 0 && !math.IsInf(ax, 0) {
		_, e := math.Frexp(ax) // ax = f * 2^e, f in [0.5, 1)
		if e-1 < minExp {
			e = minExp + 1
		}
		ulp := math.Ldexp(1, e-1-mantBits)
		ax = math.RoundToEven(ax/ulp) * ulp
		if ax > maxFinite {
			ax = math.Inf(1)
		}
	}
	return math.Copysign(ax, float64(x))
}

// Narrowing against refRound on the values around every rounding boundary and on random
// values of every magnitude.
func TestNarrowingMatchesReference(t *testing.T) {
	type format struct {
		name             string
		narrow           func(float32) uint16
		widen            func(uint16) float32
		mantBits, minExp int
		maxBits          uint16 // the largest finite pattern
	}
	for _, f := range []format{
		{"f16", Float16bits, Float16frombits, 10, -14, 0x7bff},
		{"bf16", BFloat16bits, BFloat16frombits, 7, -126, 0x7f7f},
	} {
		t.Run(f.name, func(t *testing.T) {
			maxFinite := float64(f.widen(f.maxBits))
			check := func(x float32) {
				want := refRound(x, f.mantBits, f.minExp, maxFinite)
				got := f.widen(f.narrow(x))
				if float64(got) != want || math.Signbit(float64(got)) != math.Signbit(want) {
					t.Fatalf("%s(%v = %#08x) = %v, reference %v", f.name, x, math.Float32bits(x), got, want)
				}
			}
			// Midpoints between neighbours (exact in float32) and the floats either side; the
			// last one is the overflow boundary, half a unit above the largest finite value.
			for b := uint16(0); b <= f.maxBits; b++ {
				lo, hi := float64(f.widen(b)), float64(f.widen(b+1))
				if b == f.maxBits {
					hi = lo + (lo - float64(f.widen(b-1)))
				}
				mid := float32((lo + hi) / 2)
				for _, x := range []float32{mid, math.Nextafter32(mid, 0), math.Nextafter32(mid, float32(math.Inf(1)))} {
					check(x)
					check(-x)
				}
			}
			r := rand.New(rand.NewSource(42))
			for i := 0; i < 200000; i++ {
				if x := math.Float32frombits(r.Uint32()); x == x { // any float32 but NaN
					check(x)
				}
				// and magnitudes around the format's range
				e := r.Intn(2*(f.mantBits-f.minExp+20)) - (f.mantBits - f.minExp + 10)
				check(float32(math.Ldexp(1+r.Float64(), e)))
			}
		})
	}
}
