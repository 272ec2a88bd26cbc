//go:build !dynq_static

package dynq

const linkedStatically = false
