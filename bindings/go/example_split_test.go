//go:build go1.21

package dynq_test

import (
	"fmt"

	"dynq"
)

func ExamplePackedWeights_GemmSplit() {
	// Two layers that read the same input, packed as one weight matrix side by side (as a
	// transformer's Q, K and V): one call quantizes a once and writes each layer's output.
	w, err := dynq.Pack([]float32{
		1, 0, -1, // layer 1: 1 output channel
		0.5, 0.5, 0.5, // layer 2: 2 output channels
		0, 1, 0,
	}, 3, 3, dynq.LayoutNK, nil)
	if err != nil {
		panic(err)
	}
	defer w.Close()
	a := []float32{3, 2, 1, 1, 2, 3} // 2 rows
	y1 := make([]float32, 2*1)
	y2 := make([]float32, 2*2)
	if err := w.GemmSplit([]dynq.Slice{dynq.F32(y1), dynq.F32(y2)}, []int{1, 2}, dynq.F32(a), nil, nil, nil); err != nil {
		panic(err)
	}
	fmt.Printf("%.2f %.2f\n", y1, y2)
	// The widths must add up to N().
	y3 := make([]float32, 2*1)
	fmt.Println(w.GemmSplit([]dynq.Slice{dynq.F32(y1), dynq.F32(y3)}, []int{1, 1}, dynq.F32(a), nil, nil, nil))
	// Output:
	// [2.00 -2.00] [3.00 2.00 3.00 2.00]
	// dynq: GemmSplit: invalid argument: output widths [1, 1] must add up to n = 3
}
