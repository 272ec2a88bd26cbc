//go:build dynq_static

package dynq

// With -tags dynq_static: link libdynq.a and the system libraries it needs (pkg-config module
// dynq-static), so the program does not need libdynq.so at run time.

// #cgo pkg-config: dynq-static
import "C"
