//go:build !dynq_static

package dynq

// The default: link libdynq.so, found through pkg-config (PKG_CONFIG_PATH=<prefix>/lib/pkgconfig
// after scripts/install.sh <prefix>). At run time the dynamic loader finds libdynq.so.0.<minor>
// in the usual places (or LD_LIBRARY_PATH).

// #cgo pkg-config: dynq
import "C"
