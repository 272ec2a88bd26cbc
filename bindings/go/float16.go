package dynq

import "math"

// Go has no 16-bit float types: float16 and bfloat16 values are carried as their uint16 bit
// patterns, and these functions convert them the way the library does (the half crate):
// widening is exact, narrowing rounds to nearest with ties to even, overflows to infinity,
// keeps subnormals, and keeps NaN a NaN (quiet, with the sign and the leading payload bits).

// Float16bits returns the IEEE binary16 (float16) bit pattern of f rounded to nearest, ties
// to even. Magnitudes of 65520 and above become infinity, those up to 2^-25 zero (signed).
func Float16bits(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int(b>>23) & 0xff
	man := b & 0x7fffff
	if exp == 0xff { // infinity or NaN
		if man == 0 {
			return sign | 0x7c00
		}
		return sign | 0x7e00 | uint16(man>>13)
	}
	e := exp - 127 + 15 // the float16 biased exponent
	switch {
	case e >= 0x1f:
		return sign | 0x7c00
	case e >= 1: // normal: drop 13 mantissa bits; a carry may reach the exponent (or infinity)
		h := uint32(e)<<10 | man>>13
		if rest := man & 0x1fff; rest > 0x1000 || rest == 0x1000 && h&1 == 1 {
			h++
		}
		return sign | uint16(h)
	case e < -10: // below 2^-25: rounds to zero
		return sign
	}
	// Subnormal float16 (units of 2^-24); rounding up from the largest gives the smallest normal.
	m := man | 0x800000
	shift := uint(14 - e)
	h := m >> shift
	rest, half := m&(1<<shift-1), uint32(1)<<(shift-1)
	if rest > half || rest == half && h&1 == 1 {
		h++
	}
	return sign | uint16(h)
}

// Float16frombits returns the float32 value of the IEEE binary16 (float16) bit pattern b,
// exactly (a NaN stays a NaN, with its sign and payload).
func Float16frombits(b uint16) float32 {
	sign := uint32(b&0x8000) << 16
	exp := uint32(b>>10) & 0x1f
	man := uint32(b & 0x3ff)
	switch {
	case exp == 0x1f:
		return math.Float32frombits(sign | 0x7f800000 | man<<13)
	case exp != 0:
		return math.Float32frombits(sign | (exp+127-15)<<23 | man<<13)
	}
	v := float32(man) * (1.0 / (1 << 24)) // zero or subnormal: exact
	if sign != 0 {
		return -v
	}
	return v
}

// BFloat16bits returns the bfloat16 bit pattern of f (the upper half of a float32) rounded to
// nearest, ties to even. Magnitudes above the largest bfloat16 (about 3.39e38) by half a unit
// or more become infinity.
func BFloat16bits(f float32) uint16 {
	b := math.Float32bits(f)
	if b&0x7fffffff > 0x7f800000 { // NaN: keep it one when the payload is in the low half
		return uint16(b>>16) | 0x40
	}
	h := b >> 16
	if rest := b & 0xffff; rest > 0x8000 || rest == 0x8000 && h&1 == 1 {
		h++
	}
	return uint16(h)
}

// BFloat16frombits returns the float32 value of the bfloat16 bit pattern b, exactly.
func BFloat16frombits(b uint16) float32 {
	return math.Float32frombits(uint32(b) << 16)
}
