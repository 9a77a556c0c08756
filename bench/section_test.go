package main

import (
	"os"
	"path/filepath"
	"testing"
)

// The suite rewrites only its own section of docs/benchmarks.md.
func TestWriteSectionKeepsTheRest(t *testing.T) {
	p := filepath.Join(t.TempDir(), "b.md")
	os.WriteFile(p, []byte("# Benchmarks\n\n## By hand\n\nkept\n\n"+sectionBegin+"\nold\n"+sectionEnd+"\n\n## After\n\nkept too\n"), 0o644)
	if err := writeSection(p, sectionBegin+"\nnew\n"+sectionEnd+"\n"); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(p)
	want := "# Benchmarks\n\n## By hand\n\nkept\n\n" + sectionBegin + "\nnew\n" + sectionEnd + "\n\n## After\n\nkept too\n"
	if string(b) != want {
		t.Errorf("got\n%s\nwant\n%s", b, want)
	}
}
