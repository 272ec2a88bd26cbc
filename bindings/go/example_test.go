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
