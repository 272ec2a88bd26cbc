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
