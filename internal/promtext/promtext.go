// Package promtext writes a VictoriaMetrics set in the Prometheus text
// exposition format with a "# HELP" and a "# TYPE" line before every
// family, as the exposition conventions (and promtool check metrics) want.
package promtext

import (
	"bufio"
	"bytes"
	"io"
	"strings"

	vm "github.com/VictoriaMetrics/metrics"
)

// Family describes one metric family: its name (without labels), its type
// (counter, gauge) and its help text.
type Family struct {
	Name, Type, Help string
}

// Write writes the metrics of s to w, each family headed by its HELP and
// TYPE lines from fams. A family fams lacks is written without them;
// Undocumented lists such families (a test should check it is empty).
func Write(w io.Writer, s *vm.Set, fams []Family) {
	byName := make(map[string]Family, len(fams))
	for _, f := range fams {
		byName[f.Name] = f
	}
	var raw, out bytes.Buffer
	s.WritePrometheus(&raw)
	prev := ""
	sc := bufio.NewScanner(&raw)
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		// The library's own metadata (ExposeMetadata) carries no help
		// text: ours replaces it.
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if fam := family(line); fam != prev {
			prev = fam
			if f, ok := byName[fam]; ok {
				out.WriteString("# HELP " + fam + " " + escapeHelp(f.Help) + "\n")
				out.WriteString("# TYPE " + fam + " " + f.Type + "\n")
			}
		}
		out.WriteString(line + "\n")
	}
	_, _ = w.Write(out.Bytes())
}

// Undocumented returns the families of s that fams does not describe.
func Undocumented(s *vm.Set, fams []Family) []string {
	known := make(map[string]bool, len(fams))
	for _, f := range fams {
		known[f.Name] = true
	}
	var raw bytes.Buffer
	s.WritePrometheus(&raw)
	var missing []string
	seen := map[string]bool{}
	for _, line := range strings.Split(raw.String(), "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if fam := family(line); !known[fam] && !seen[fam] {
			seen[fam] = true
			missing = append(missing, fam)
		}
	}
	return missing
}

// family is the metric name of a sample line.
func family(line string) string {
	if i := strings.IndexAny(line, "{ "); i >= 0 {
		return line[:i]
	}
	return line
}

// escapeHelp escapes a help text as the text format wants.
func escapeHelp(s string) string {
	return strings.NewReplacer(`\`, `\\`, "\n", `\n`).Replace(s)
}
