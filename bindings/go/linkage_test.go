package dynq

import (
	"os"
	"strings"
	"testing"
)

// TestLinkage checks how libdynq got into the test binary: as libdynq.so by default, linked
// in (no libdynq.so mapped) with -tags dynq_static.
func TestLinkage(t *testing.T) {
	maps, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		t.Skipf("no /proc/self/maps: %v", err)
	}
	mapped := strings.Contains(string(maps), "/libdynq.so")
	if mapped == linkedStatically {
		t.Fatalf("libdynq.so mapped: %v, built with dynq_static: %v", mapped, linkedStatically)
	}
	t.Logf("libdynq.so mapped: %v (static build: %v)", mapped, linkedStatically)
}
