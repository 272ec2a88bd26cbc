package dynq

/*
#include <dynq.h>
*/
import "C"

import "fmt"

// Status is a status code of the C ABI. The numbers are stable and never reused. A Status is
// also an error, so errors.Is(err, dynq.StatusCorruptData) tests what went wrong.
type Status uint32

const (
	StatusOK              Status = C.DYNQ_STATUS_OK
	StatusNullPointer     Status = C.DYNQ_STATUS_NULL_POINTER
	StatusInvalidArgument Status = C.DYNQ_STATUS_INVALID_ARGUMENT
	StatusSizeOverflow    Status = C.DYNQ_STATUS_SIZE_OVERFLOW
	StatusNonFinite       Status = C.DYNQ_STATUS_NON_FINITE
	StatusUnsupported     Status = C.DYNQ_STATUS_UNSUPPORTED
	StatusCorruptData     Status = C.DYNQ_STATUS_CORRUPT_DATA
	StatusBufferTooSmall  Status = C.DYNQ_STATUS_BUFFER_TOO_SMALL
	StatusOutOfMemory     Status = C.DYNQ_STATUS_OUT_OF_MEMORY
	StatusInternal        Status = C.DYNQ_STATUS_INTERNAL
)

// String is the library's description of the status ("corrupt or truncated data", ...).
func (s Status) String() string { return C.GoString(C.dynq_status_str(C.uint32_t(s))) }

// Error makes a Status usable as an error target for errors.Is.
func (s Status) Error() string { return "dynq: " + s.String() }

// Error is a failed call: which operation, the status, and the detailed message of the
// library (for example "activation A[1][2] is inf; activations must be finite"). Argument
// checks that only Go can make (slice lengths) produce an Error with StatusInvalidArgument
// and a message of the binding.
type Error struct {
	Op      string // the method or function of this package, e.g. "Gemm"
	Status  Status
	Message string
}

func (e *Error) Error() string {
	// Status.String, not Status.Error (which %s would pick), so that "dynq: " comes once.
	if e.Message == "" {
		return fmt.Sprintf("dynq: %s: %s", e.Op, e.Status.String())
	}
	return fmt.Sprintf("dynq: %s: %s: %s", e.Op, e.Status.String(), e.Message)
}

// Unwrap returns the Status, so errors.Is(err, dynq.StatusX) works.
func (e *Error) Unwrap() error { return e.Status }

func invalid(op, format string, args ...any) error {
	return &Error{Op: op, Status: StatusInvalidArgument, Message: fmt.Sprintf(format, args...)}
}
