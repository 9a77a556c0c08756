// Package man holds the manual pages (roff, written by hand) that the
// Debian packages install, and the test that keeps them in step with the
// programs: every flag a program's --help lists and every key its config
// file takes is described in its page, and the packaged config files show
// every key.
package man

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"chatd/daemon"
	"chatd/internal/proctest"
)

func TestMain(m *testing.M) {
	code := m.Run()
	proctest.Cleanup()
	os.Exit(code)
}

// help runs a binary with args and returns what it printed on both streams
// (Go's flag package prints --help on standard error).
func help(t *testing.T, bin string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, proctest.Binary(t, bin), args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.Env = append(os.Environ(), "CHATD_SOCKET=/nonexistent")
	_ = cmd.Run() // some print --help and exit 0, some exit 2
	if out.Len() == 0 {
		t.Fatalf("%s %s printed nothing", bin, strings.Join(args, " "))
	}
	return out.String()
}

// flagsIn lists the flags a --help text shows: lines "  -name ..." (Go's
// flag package) or "  --name ..." (chatgw serve's own usage).
func flagsIn(text string) []string {
	re := regexp.MustCompile(`(?m)^ {2}-{1,2}([a-z][a-z0-9-]*)`)
	seen := map[string]bool{}
	var out []string
	for _, m := range re.FindAllStringSubmatch(text, -1) {
		if f := m[1]; !seen[f] && f != "h" && f != "help" {
			seen[f] = true
			out = append(out, f)
		}
	}
	return out
}

func page(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// roffFlag is how a page writes --name: "\-\-name" in bold.
func roffFlag(f string) string { return `\-\-` + strings.ReplaceAll(f, "-", `\-`) }

func TestEveryFlagIsInItsPage(t *testing.T) {
	for _, tc := range []struct {
		page string
		bin  string
		// Each command line prints (part of) the program's flags.
		helps [][]string
		min   int // at least this many flags, so an empty parse cannot pass
	}{
		{"chatd.8", "chatd", [][]string{{"--help"}}, 8},
		{"chatctl.1", "chatctl", [][]string{
			{"-socket", "x", "-h"}, {"status", "--help"}, {"login", "--help"}, {"logout", "--help"},
			{"watch", "--help"}, {"wait", "--help"},
		}, 7},
		{"chatgw.8", "chatgw", [][]string{
			{"serve", "--help"}, {"usersig", "gen", "--help"}, {"usersig", "verify", "--help"},
			{"nats-accounts", "--help"}, {"mosquitto-dynsec", "--help"},
		}, 20},
	} {
		t.Run(tc.page, func(t *testing.T) {
			p := page(t, tc.page)
			var all []string
			for _, args := range tc.helps {
				fs := flagsIn(help(t, tc.bin, args...))
				if len(fs) == 0 && args[0] != "-socket" {
					t.Errorf("%s %s: found no flags in its help", tc.bin, strings.Join(args, " "))
				}
				all = append(all, fs...)
			}
			if tc.bin == "chatctl" {
				// chatctl's top level: --socket and --version.
				all = append(all, "socket", "version")
			}
			n := 0
			for _, f := range dedup(all) {
				n++
				if !strings.Contains(p, roffFlag(f)) {
					t.Errorf("%s --%s is not in %s", tc.bin, f, tc.page)
				}
			}
			if n < tc.min {
				t.Errorf("found %d flags of %s, want at least %d: %v", n, tc.bin, tc.min, all)
			}
		})
	}
}

func dedup(s []string) []string {
	sort.Strings(s)
	var out []string
	for i, v := range s {
		if i == 0 || v != s[i-1] {
			out = append(out, v)
		}
	}
	return out
}

// pageKeys reads a config page's keys: ".B key" paragraphs (after .TP),
// under the section headers ".SH [section]" (top-level keys come before
// the first such header).
func pageKeys(p string) []string {
	var keys []string
	section := ""
	lines := strings.Split(p, "\n")
	for i, l := range lines {
		if strings.HasPrefix(l, ".SH [") {
			section = strings.TrimPrefix(l, ".SH ")
		}
		if l == ".TP" && i+1 < len(lines) && strings.HasPrefix(lines[i+1], ".B ") {
			k := strings.TrimPrefix(lines[i+1], ".B ")
			if regexp.MustCompile(`^[a-z][a-z0-9_]*$`).MatchString(k) {
				keys = append(keys, join(section, k))
			}
		}
	}
	return keys
}

// fileKeys reads a packaged config file's keys, set or commented out
// ("key =" or "#key ="), under "[section]" headers.
func fileKeys(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	key := regexp.MustCompile(`^#?([a-z][a-z0-9_]*) = `)
	sect := regexp.MustCompile(`^#?(\[[a-z_]+\])$`)
	seen := map[string]bool{}
	var keys []string
	section := ""
	for _, l := range strings.Split(string(b), "\n") {
		if m := sect.FindStringSubmatch(l); m != nil {
			section = m[1]
		}
		if m := key.FindStringSubmatch(l); m != nil && !seen[join(section, m[1])] {
			seen[join(section, m[1])] = true
			keys = append(keys, join(section, m[1]))
		}
	}
	return keys
}

func join(section, key string) string {
	if section == "" {
		return key
	}
	return section + " " + key
}

// tomlKeys lists the keys a config struct takes: "key" at the top level,
// "[section] key" in a section (a struct field that is not a value type).
func tomlKeys(rt reflect.Type, section string) []string {
	var keys []string
	for i := 0; i < rt.NumField(); i++ {
		f := rt.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
		if name == "" || name == "-" {
			continue
		}
		if f.Type.Kind() == reflect.Struct && !isValue(f.Type) && section == "" {
			keys = append(keys, tomlKeys(f.Type, "["+name+"]")...)
			continue
		}
		keys = append(keys, join(section, name))
	}
	return keys
}

// isValue reports whether a struct type is one TOML value (a duration):
// it decodes itself from text.
func isValue(rt reflect.Type) bool {
	return reflect.PointerTo(rt).Implements(reflect.TypeOf((*interface{ UnmarshalText([]byte) error })(nil)).Elem())
}

// compare says which keys one list has that the other lacks.
func compare(t *testing.T, want []string, wantWhat string, got []string, gotWhat string) {
	t.Helper()
	have := map[string]bool{}
	for _, k := range got {
		have[k] = true
	}
	for _, k := range want {
		if !have[k] {
			t.Errorf("%s %q is not in %s", wantWhat, k, gotWhat)
		}
	}
}

func TestEveryConfigKeyIsDocumented(t *testing.T) {
	t.Run("chatd.toml", func(t *testing.T) {
		keys := tomlKeys(reflect.TypeOf(daemon.Config{}), "")
		if len(keys) < 20 {
			t.Fatalf("found only %d keys in daemon.Config: %v", len(keys), keys)
		}
		pk := pageKeys(page(t, "chatd.toml.5"))
		compare(t, keys, "chatd's config key", pk, "chatd.toml(5)")
		compare(t, pk, "chatd.toml(5) documents", keys, "chatd's config (no such key)")
		fk := fileKeys(t, filepath.Join("..", "..", "build", "package", "chatd.toml"))
		compare(t, keys, "chatd's config key", fk, "the packaged chatd.toml")
		compare(t, fk, "the packaged chatd.toml shows", keys, "chatd's config (no such key)")
	})
	t.Run("chatgw.toml", func(t *testing.T) {
		// chatgw serve --help names each option's key: "(key NAME)".
		var keys []string
		for _, m := range regexp.MustCompile(`\(key ([a-z_]+)\)`).FindAllStringSubmatch(help(t, "chatgw", "serve", "--help"), -1) {
			keys = append(keys, m[1])
		}
		if len(keys) < 15 {
			t.Fatalf("found only %d keys in chatgw serve --help: %v", len(keys), keys)
		}
		pk := pageKeys(page(t, "chatgw.toml.5"))
		compare(t, keys, "chatgw serve's key", pk, "chatgw.toml(5)")
		compare(t, pk, "chatgw.toml(5) documents", keys, "chatgw serve (no such key)")
		fk := fileKeys(t, filepath.Join("..", "..", "build", "package", "chatgw.toml"))
		compare(t, keys, "chatgw serve's key", fk, "the packaged chatgw.toml")
		compare(t, fk, "the packaged chatgw.toml shows", keys, "chatgw serve (no such key)")
	})
}
