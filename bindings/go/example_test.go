package dynq_test

import (
	"fmt"

	"dynq"
)

func ExamplePackedWeights_Gemm() {
	// W: 2 output channels x 3 inputs ([N][K]); y[1][2] = a[1][3] x W^T.
	w, err := dynq.Pack([]float32{1, 0, -1, 0.5, 0.5, 0.5}, 2, 3, dynq.LayoutNK, nil)
	if err != nil {
		panic(err)
	}
	defer w.Close()
	y := make([]float32, 2)
	if err := w.Gemm(y, []float32{3, 2, 1}, nil, nil); err != nil {
		panic(err)
	}
	fmt.Printf("%.2f\n", y)
	// Output: [2.00 3.00]
}

func ExamplePackedWeights_GemmEx() {
	w, err := dynq.Pack([]float32{1, 0, -1, 0.5, 0.5, 0.5}, 2, 3, dynq.LayoutNK, nil)
	if err != nil {
		panic(err)
	}
	defer w.Close()
	// float16 activations in, bfloat16 outputs out, as bit patterns.
	a := []uint16{dynq.Float16bits(3), dynq.Float16bits(2), dynq.Float16bits(1)}
	y := make([]uint16, 2)
	if err := w.GemmEx(dynq.BF16(y), dynq.F16(a), nil, nil); err != nil {
		panic(err)
	}
	fmt.Printf("%#04x = %.2f, %.2f\n", y, dynq.BFloat16frombits(y[0]), dynq.BFloat16frombits(y[1]))
	// Output: [0x4000 0x4040] = 2.00, 3.00
}

func ExampleFloat16bits() {
	fmt.Printf("%#04x %#04x %#04x\n", dynq.Float16bits(1), dynq.Float16bits(65504), dynq.Float16bits(1e5))
	fmt.Printf("%#04x %v\n", dynq.BFloat16bits(1), dynq.Float16frombits(0x3555))
	// Output:
	// 0x3c00 0x7bff 0x7c00
	// 0x3f80 0.33325195
}

func ExamplePackedWeights_GemmSmoothed() {
	// Smoothing factors s move range from the activations into the weights: column j of W is
	// divided by s[j] before packing, and a[j] is multiplied by s[j] before quantizing.
	w := []float32{2, 0, -1, 2, 0.5, 1} // [N=2][K=3]
	s := []float32{2, 0.5, 1}
	for i := range w {
		w[i] /= s[i%3]
	}
	packed, err := dynq.Pack(w, 2, 3, dynq.LayoutNK, nil)
	if err != nil {
		panic(err)
	}
	defer packed.Close()
	a := []float32{3, 4, 4}
	y := make([]float32, 2)
	if err := packed.GemmSmoothed(dynq.F32(y), dynq.F32(a), s, nil, nil); err != nil {
		panic(err)
	}
	fmt.Printf("%.2f\n", y)
	fmt.Println(packed.GemmSmoothed(dynq.F32(y), dynq.F32(a), []float32{2, 0, 1}, nil, nil))
	// Output:
	// [2.00 12.00]
	// dynq: GemmSmoothed: invalid argument: smoothing factor [1] is 0; smoothing factors must be positive and finite
}

func ExamplePackedWeights_GemmResidual() {
	// The skip connection of a transformer block, x + Linear(h), fused into the product: the
	// residual x is added to each output in float32, after the bias and the epilogue.
	w, err := dynq.Pack([]float32{1, 0, -1, 0.5, 0.5, 0.5}, 2, 3, dynq.LayoutNK, nil)
	if err != nil {
		panic(err)
	}
	defer w.Close()
	h := []float32{3, 2, 1}
	x := []float32{10, -1}
	y := make([]float32, 2)
	if err := w.GemmResidual(dynq.F32(y), dynq.F32(h), dynq.F32(x), nil, nil, nil); err != nil {
		panic(err)
	}
	fmt.Printf("%.2f\n", y)
	// The output must be a separate buffer: to accumulate into x, copy it first.
	fmt.Println(w.GemmResidual(dynq.F32(x), dynq.F32(h), dynq.F32(x), nil, nil, nil))
	// Output:
	// [12.00 2.00]
	// dynq: GemmResidual: invalid argument: y overlaps residual; the output must be a separate buffer (to accumulate into y, copy it first)
}
