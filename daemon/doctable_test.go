package daemon

import (
	"flag"
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the transition table in doc.go from the code")

const (
	tableStart = "//\t| from"
	tableEnd   = "// End of the table."
)

// docEffect is the table's form of an effect: no connection, waiter or
// session ids.
var idWord = regexp.MustCompile(`^(c\d+|w\d+|s\d+|exp=.*|dev-\d+|alice|bob)$`)

func docEffects(effects []string) string {
	var out []string
	for _, e := range effects {
		var kept []string
		for _, w := range strings.Fields(e) {
			if !idWord.MatchString(w) {
				kept = append(kept, strings.TrimPrefix(w, "onLoginStatusChanged:"))
			}
		}
		out = append(out, strings.Join(kept, " "))
	}
	if len(out) == 0 {
		return "-"
	}
	return strings.Join(out, ", ")
}

// transitionTable runs every case of TestTransitions and writes its row.
func transitionTable(t *testing.T) string {
	var b strings.Builder
	fmt.Fprintf(&b, "//\t| %-10s | %-58s | %-10s | %s\n", "from", "event", "to", "effects, in order")
	fmt.Fprintf(&b, "//\t|%s|%s|%s|%s\n", strings.Repeat("-", 12), strings.Repeat("-", 60), strings.Repeat("-", 12), strings.Repeat("-", 20))
	for _, c := range transitionCases {
		d := newDrv(t, c.opts...)
		if c.setup != nil {
			c.setup(d)
		}
		from := d.m.phase
		got := d.do(c.event(d))
		_, ev, _ := strings.Cut(c.name, " + ")
		fmt.Fprintf(&b, "//\t| %-10s | %-58s | %-10s | %s\n", from, ev, d.m.phase, docEffects(got))
	}
	return b.String()
}

// The table in doc.go is what the code does.
func TestDocTransitionTable(t *testing.T) {
	src, err := os.ReadFile("doc.go")
	if err != nil {
		t.Fatal(err)
	}
	s := string(src)
	i := strings.Index(s, tableStart)
	j := strings.Index(s, tableEnd)
	if i < 0 || j < i {
		t.Fatalf("doc.go has no transition table (%q ... %q)", tableStart, tableEnd)
	}
	// The comment line before the end marker ends the table.
	j = strings.LastIndex(s[:j], "//\n")
	want := transitionTable(t)
	if *update {
		s = s[:i] + want + s[j:]
		if err := os.WriteFile("doc.go", []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	if got := s[i:j]; got != want {
		t.Errorf("doc.go's transition table is not what the code does; run go test ./daemon -run TestDocTransitionTable -update\n got:\n%s\nwant:\n%s", got, want)
	}
}
