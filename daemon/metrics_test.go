package daemon

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"strings"
	"testing"

	"chatd/internal/proctest"
	"chatd/internal/promtext"
	"chatd/localapi"
)

// metricsPage is GET /metrics as the local API serves it over d: the
// daemon's families, then the API's.
func metricsPage(t *testing.T, d *Daemon) string {
	t.Helper()
	api := localapi.New(localapi.Options{Backend: d, OperatorGID: -1, DaemonUID: -1})
	rec := httptest.NewRecorder()
	api.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	if rec.Code != http.StatusOK {
		t.Fatalf("GET /metrics: HTTP %d %s", rec.Code, rec.Body)
	}
	return rec.Body.String()
}

// checkExposition checks the text format's conventions that promtool
// checks too: each family one block, headed by # HELP (with a text) and
// # TYPE. It returns the families in order.
func checkExposition(t *testing.T, text string) []string {
	t.Helper()
	var (
		fams       []string
		seen       = map[string]bool{}
		help, typ  string
		prevFamily string
	)
	for _, line := range strings.Split(strings.TrimSuffix(text, "\n"), "\n") {
		switch {
		case strings.HasPrefix(line, "# HELP "):
			f := strings.SplitN(strings.TrimPrefix(line, "# HELP "), " ", 2)
			if len(f) != 2 || f[1] == "" {
				t.Errorf("HELP without a text: %q", line)
			}
			help = f[0]
		case strings.HasPrefix(line, "# TYPE "):
			typ = strings.Fields(strings.TrimPrefix(line, "# TYPE "))[0]
		case strings.HasPrefix(line, "#") || line == "":
			t.Errorf("unexpected line %q", line)
		default:
			fam := line[:strings.IndexAny(line, "{ ")]
			if fam == prevFamily {
				continue
			}
			if seen[fam] {
				t.Errorf("family %s is split in two blocks", fam)
			}
			if help != fam || typ != fam {
				t.Errorf("family %s has no # HELP and # TYPE right before it (help %q, type %q)", fam, help, typ)
			}
			seen[fam], prevFamily = true, fam
			fams = append(fams, fam)
		}
	}
	return fams
}

func TestMetricsExposition(t *testing.T) {
	h := newHarness(t, nil)
	m := h.d.metrics
	if missing := promtext.Undocumented(m.set, families); len(missing) > 0 {
		t.Errorf("families without HELP and TYPE: %q", missing)
	}

	// Before anything happened: every family, the labelled ones with the
	// labels known in advance, at 0.
	fresh := metricsPage(t, h.d)
	present := map[string]bool{}
	for _, f := range checkExposition(t, fresh) {
		present[f] = true
	}
	for _, f := range families {
		if !present[f.Name] {
			t.Errorf("family %s is missing at the start", f.Name)
		}
	}
	for _, line := range []string{
		`chatd_logins_total{code="0"} 0`,
		`chatd_resumes_total{code="0"} 0`,
		`chatd_usersig_renewals_total{result="ok"} 0`,
		`chatd_usersig_renewals_total{result="failed"} 0`,
		`chatd_kicks_total 0`,
		`chatd_api_connections_refused_total{limit="total"} 0`,
		`chatd_api_event_streams_refused_total{limit="per_uid"} 0`,
	} {
		if !strings.Contains(fresh, "\n"+line+"\n") {
			t.Errorf("at the start, the metrics lack %q:\n%s", line, fresh)
		}
	}

	m.login(70001)
	m.login(0)
	m.resume(6017)
	m.renewal(false)
	m.kicks.Inc()
	later := metricsPage(t, h.d)
	checkExposition(t, later)
	for _, line := range []string{
		`chatd_logins_total{code="0"} 1`,
		`chatd_logins_total{code="70001"} 1`,
		`chatd_resumes_total{code="0"} 0`,
		`chatd_resumes_total{code="6017"} 1`,
		`chatd_usersig_renewals_total{result="failed"} 1`,
		`chatd_usersig_renewals_total{result="ok"} 0`,
		`chatd_kicks_total 1`,
	} {
		if !strings.Contains(later, "\n"+line+"\n") {
			t.Errorf("the metrics lack %q:\n%s", line, later)
		}
	}

	t.Run("promtool check metrics", func(t *testing.T) {
		promtool := proctest.Tool(t, "promtool", "prometheus")
		for name, text := range map[string]string{"at the start": fresh, "later": later} {
			cmd := exec.Command(promtool, "check", "metrics")
			cmd.Stdin = strings.NewReader(text)
			var out bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, &out
			if err := cmd.Run(); err != nil || out.Len() != 0 {
				t.Errorf("%s: promtool check metrics: %v\n%s\non:\n%s", name, err, out.String(), text)
			}
		}
	})
}
