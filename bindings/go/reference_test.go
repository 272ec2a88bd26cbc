package dynq

// A pure-Go reference of the documented semantics (README "What is computed"), mirroring
// tests/c/test_abi.c. Every float32 operation is rounded on its own (explicit conversions
// forbid fused multiply-add), so the results must equal the library's bit for bit.

import "math"

const tinyScale = float32(1e-45) // the smallest positive float32 (a subnormal)

// roundI32 rounds half to even and converts, saturating (C nearbyintf + cast).
func roundI32(x float32) int32 {
	r := math.RoundToEven(float64(x))
	switch {
	case r >= 2147483648.0:
		return math.MaxInt32
	case r < -2147483648.0:
		return math.MinInt32
	}
	return int32(r)
}

func clampI32(v int64, lo, hi int32) int32 {
	if v < int64(lo) {
		return lo
	}
	if v > int64(hi) {
		return hi
	}
	return int32(v)
}

type qparams struct {
	scale float32
	zp    int32
}

// asymParams is ONNX DynamicQuantizeLinear's scale and zero point (lo <= 0 <= hi already).
func asymParams(lo, hi float32) qparams {
	rng := float32(hi - lo)
	if rng == 0 {
		return qparams{}
	}
	var s float32
	if rng <= math.MaxFloat32 {
		s = float32(rng / 255)
	} else {
		s = float32(float32(hi/255) - float32(lo/255))
	}
	if s == 0 {
		s = tinyScale
	}
	return qparams{scale: s, zp: clampI32(int64(roundI32(float32(-lo/s))), 0, 255)}
}

func symmetricScale(amax float32) float32 {
	if amax == 0 {
		return 0
	}
	s := float32(amax / 127)
	if s == 0 {
		return tinyScale
	}
	return s
}

func symParams(lo, hi float32) qparams {
	amax := hi
	if -lo > amax {
		amax = -lo
	}
	return qparams{scale: symmetricScale(amax), zp: 128}
}

func quantizeAct(x float32, p qparams, t ActType) int32 {
	if p.scale == 0 {
		return p.zp
	}
	r := roundI32(float32(x / p.scale))
	if t == ActAsymmetricU8 {
		return clampI32(int64(r)+int64(p.zp), 0, 255)
	}
	return clampI32(int64(r), -127, 127) + 128
}

// refQuantizeWeights: w is [n][k]; returns q [n][k] and n scales (1 per tensor).
func refQuantizeWeights(w []float32, n, k int, perTensor bool) ([]int8, []float32) {
	amax := make([]float32, n)
	var tmax float32
	for j := 0; j < n; j++ {
		for i := 0; i < k; i++ {
			if v := float32(math.Abs(float64(w[j*k+i]))); v > amax[j] {
				amax[j] = v
			}
		}
		if amax[j] > tmax {
			tmax = amax[j]
		}
	}
	var scales []float32
	if perTensor {
		scales = []float32{symmetricScale(tmax)}
	} else {
		scales = make([]float32, n)
		for j := range scales {
			scales[j] = symmetricScale(amax[j])
		}
	}
	q := make([]int8, n*k)
	for j := 0; j < n; j++ {
		s := scales[0]
		if !perTensor {
			s = scales[j]
		}
		for i := 0; i < k; i++ {
			if s != 0 {
				q[j*k+i] = int8(clampI32(int64(roundI32(float32(w[j*k+i]/s))), -127, 127))
			}
		}
	}
	return q, scales
}

// refGemm: a is [m][k], q is [n][k] with 1 or n scales sw; the documented epilogue order
// t = f32(acc - za*colsum) * (sa*sw), then + bias, then ReLU.
func refGemm(a []float32, m, k int, q []int8, sw []float32, n int, bias []float32, o GemmOptions) []float32 {
	lo := make([]float32, m)
	hi := make([]float32, m)
	var glo, ghi float32
	for i := 0; i < m; i++ {
		for _, x := range a[i*k : (i+1)*k] {
			if x < lo[i] {
				lo[i] = x
			}
			if x > hi[i] {
				hi[i] = x
			}
		}
		if lo[i] < glo {
			glo = lo[i]
		}
		if hi[i] > ghi {
			ghi = hi[i]
		}
	}
	colsum := make([]int64, n)
	for j := 0; j < n; j++ {
		for _, v := range q[j*k : (j+1)*k] {
			colsum[j] += int64(v)
		}
	}
	y := make([]float32, m*n)
	for i := 0; i < m; i++ {
		l, h := lo[i], hi[i]
		if o.ActGranularity == ActPerTensor {
			l, h = glo, ghi
		}
		p := asymParams(l, h)
		if o.ActType == ActSymmetricI8 {
			p = symParams(l, h)
		}
		qa := make([]int32, k)
		for kk := range qa {
			qa[kk] = quantizeAct(a[i*k+kk], p, o.ActType)
		}
		for j := 0; j < n; j++ {
			var acc int64
			for kk, v := range q[j*k : (j+1)*k] {
				acc += int64(qa[kk]) * int64(v)
			}
			c := acc - int64(p.zp)*colsum[j]
			if c > math.MaxInt32 || c < math.MinInt32 {
				panic("reference: integer result does not fit int32")
			}
			s := sw[0]
			if len(sw) > 1 {
				s = sw[j]
			}
			s = float32(p.scale * s)
			t := float32(float32(int32(c)) * s)
			if len(bias) > 0 {
				t = float32(t + bias[j])
			}
			if o.Epilogue == EpilogueReLU && !(t > 0) {
				t = 0
			}
			y[i*n+j] = t
		}
	}
	return y
}
