package main

import (
	"context"
	"debug/elf"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// --- the arm64 binary's size and what each dependency costs ---

// benchSize builds chatd and the bare paho client for linux/arm64 as
// `make build` does (static, stripped) and breaks chatd's symbols down by
// where they come from (an unstripped build of the same code, read with
// `go tool nm -size`).
func benchSize(ctx context.Context, o options) (table, error) {
	t := table{title: "chatd's arm64 binary: size and what each dependency costs",
		note: "`CGO_ENABLED=0 GOOS=linux GOARCH=arm64 go build -trimpath -ldflags '-s -w'` (as `make build` and the packages build it). " +
			"The breakdown reads the ELF symbol table of the same build without `-s -w` (what `go tool nm -size` shows), the sizes of the symbols that take room in the file summed by module (the standard library by package); " +
			"the rest of the file (symbol tables, pclntab beyond each function, relocations) is not attributed. " +
			"The baseline is the bare paho client of the idle figures (`bench/bareclient`), built the same way.",
		header: []string{"", "bytes", "share of the attributed"}}
	dir, err := os.MkdirTemp("", "chatd-bench-size-")
	if err != nil {
		return t, err
	}
	defer os.RemoveAll(dir)
	root, err := moduleRoot(ctx)
	if err != nil {
		return t, err
	}
	build := func(out, pkg string, strip bool) (int64, error) {
		args := []string{"build", "-trimpath", "-o", out}
		if strip {
			args = append(args, "-ldflags", "-s -w")
		}
		cmd := exec.CommandContext(ctx, "go", append(args, pkg)...)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=arm64")
		if b, err := cmd.CombinedOutput(); err != nil {
			return 0, fmt.Errorf("building %s: %w\n%s", pkg, err, b)
		}
		fi, err := os.Stat(out)
		if err != nil {
			return 0, err
		}
		return fi.Size(), nil
	}
	chatd, err := build(filepath.Join(dir, "chatd"), "./cmd/chatd", true)
	if err != nil {
		return t, err
	}
	bare, err := build(filepath.Join(dir, "bareclient"), "./bench/bareclient", true)
	if err != nil {
		return t, err
	}
	if _, err := build(filepath.Join(dir, "chatd.syms"), "./cmd/chatd", false); err != nil {
		return t, err
	}
	by, total, err := symbolSizes(filepath.Join(dir, "chatd.syms"))
	if err != nil {
		return t, err
	}
	t.rows = append(t.rows,
		[]string{"**chatd, stripped**", strconv.FormatInt(chatd, 10), ""},
		[]string{"bare paho client, stripped (baseline)", strconv.FormatInt(bare, 10), ""},
		[]string{"ratio", fmt.Sprintf("%.2fx", float64(chatd)/float64(bare)), ""},
		[]string{"attributed to symbols (unstripped build)", strconv.FormatInt(total, 10), "100 %"})
	groups := make([]string, 0, len(by))
	for g := range by {
		groups = append(groups, g)
	}
	slices.SortFunc(groups, func(a, b string) int { return int(by[b] - by[a]) })
	var rest int64
	for i, g := range groups {
		// Every module and chatd package; the standard library's biggest.
		std := strings.HasPrefix(g, "std: ") || strings.HasPrefix(g, "Go tables") || g == "runtime" ||
			strings.ContainsAny(g, " {") || strings.HasPrefix(g, ".") || strings.HasPrefix(g, "go.shape") // compiler-made names
		if std && (i >= 25 || by[g] < 16<<10) {
			rest += by[g]
			continue
		}
		t.rows = append(t.rows, []string{"`" + g + "`", strconv.FormatInt(by[g], 10), fmt.Sprintf("%.1f %%", 100*float64(by[g])/float64(total))})
	}
	t.rows = append(t.rows, []string{"everything else", strconv.FormatInt(rest, 10), fmt.Sprintf("%.1f %%", 100*float64(rest)/float64(total))})
	return t, nil
}

// symbolSizes sums the sizes of a binary's symbols by symbolGroup,
// leaving out what takes no room in the file (.bss, .noptrbss).
func symbolSizes(path string) (map[string]int64, int64, error) {
	f, err := elf.Open(path)
	if err != nil {
		return nil, 0, err
	}
	defer f.Close()
	syms, err := f.Symbols()
	if err != nil {
		return nil, 0, fmt.Errorf("%s: %w", path, err)
	}
	by := map[string]int64{}
	var total int64
	for _, s := range syms {
		if s.Size == 0 || int(s.Section) >= len(f.Sections) || s.Section == elf.SHN_UNDEF {
			continue
		}
		if f.Sections[s.Section].Type == elf.SHT_NOBITS {
			continue
		}
		by[symbolGroup(s.Name)] += int64(s.Size)
		total += int64(s.Size)
	}
	return by, total, nil
}

// symbolGroup is where a symbol comes from: the module of a dependency
// (github.com/owner/repo, golang.org/x/name, go.etcd.io/bbolt), chatd's
// own package, or the standard library's package (its first two path
// elements); runtime tables and type data go under their own names.
func symbolGroup(sym string) string {
	for _, p := range []string{"type:", "go:itab.", ".eq.", ".gcmask.", "*"} {
		sym = strings.TrimPrefix(sym, p)
	}
	if i := strings.IndexAny(sym, "[,"); i >= 0 {
		sym = sym[:i] // a generic's type arguments or an itab's interface name other packages
	}
	switch {
	case strings.HasPrefix(sym, "go:"), strings.HasPrefix(sym, "runtime."), sym == "runtime":
		if strings.HasPrefix(sym, "runtime.") {
			return "runtime"
		}
		return "Go tables (" + strings.SplitN(sym, ".", 2)[0] + ")"
	}
	// The package path ends at the first dot after the last slash.
	path := sym
	if i := strings.LastIndex(path, "/"); i >= 0 {
		if j := strings.Index(path[i:], "."); j >= 0 {
			path = path[:i+j]
		}
	} else if j := strings.Index(path, "."); j >= 0 {
		path = path[:j]
	}
	path = strings.ReplaceAll(path, "%2e", ".")
	el := strings.Split(path, "/")
	switch {
	case el[0] == "chatd":
		return path
	case el[0] == "vendor":
		return "std: vendor/" + strings.Join(el[1:min(len(el), 4)], "/")
	case strings.Contains(el[0], "."):
		n := 3
		if el[0] == "go.etcd.io" || el[0] == "golang.org" && len(el) > 1 && el[1] == "x" {
			n = map[bool]int{true: 3, false: 2}[el[0] == "golang.org"]
		}
		if len(el) > n && strings.HasPrefix(el[n], "v") && len(el[n]) <= 3 {
			n++ // a major version suffix: github.com/coreos/go-systemd/v22
		}
		return strings.Join(el[:min(len(el), n)], "/")
	}
	return "std: " + strings.Join(el[:min(len(el), 2)], "/")
}
