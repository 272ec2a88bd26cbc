package dynq

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// fencedBlock returns the first ``` block of the given language after offset, and the offset
// following it.
func fencedBlock(t *testing.T, doc string, lang string, offset int) (string, int) {
	t.Helper()
	open := "```" + lang + "\n"
	i := strings.Index(doc[offset:], open)
	if i < 0 {
		t.Fatalf("README.md has no ```%s block after byte %d", lang, offset)
	}
	start := offset + i + len(open)
	end := strings.Index(doc[start:], "```")
	if end < 0 {
		t.Fatalf("README.md: unterminated ```%s block", lang)
	}
	return doc[start : start+end], start + end + 3
}

// TestReadmeExample runs the README's example program with `go run` against this package and
// compares its output with the README's ```text block that follows it.
func TestReadmeExample(t *testing.T) {
	doc, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	program, next := fencedBlock(t, string(doc), "go", 0)
	want, _ := fencedBlock(t, string(doc), "text", next)

	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("the go command is needed to run the README example: %v", err)
	}
	here, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	mod := "module example\n\ngo 1.19\n\nrequire dynq v0.0.0\n\nreplace dynq => " + here + "\n"
	if err := os.WriteFile(filepath.Join(dir, "go.mod"), []byte(mod), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "main.go"), []byte(program), 0o644); err != nil {
		t.Fatal(err)
	}
	args := []string{"run"}
	if linkedStatically {
		args = append(args, "-tags", "dynq_static")
	}
	cmd := exec.Command(goBin, append(args, ".")...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOPROXY=off", "GOFLAGS=-mod=mod", "GOWORK=off")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	got, err := cmd.Output()
	if err != nil {
		t.Fatalf("go run of the README example: %v\n%s", err, stderr.String())
	}
	if string(got) != want {
		t.Fatalf("the README example printed\n%s\nthe README says\n%s", got, want)
	}
}
