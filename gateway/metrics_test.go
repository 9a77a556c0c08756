package gateway

import (
	"bytes"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	"chatd/internal/proctest"
	"chatd/mqtt"
)

// metricsText is a gateway's metrics after a login, a failed login and a
// bad message, so that every kind of family has samples.
func metricsText(t *testing.T) string {
	t.Helper()
	g, err := New(Options{Config: Config{SDKAppID: testAppID, Key: testKey}, Now: func() time.Time { return t0 }})
	if err != nil {
		t.Fatal(err)
	}
	r := newRig(t, nil)
	g.HandleMessage("chat/v1/up/alice/a", mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, UserSig: r.sig("alice", time.Hour)}))
	g.HandleMessage("chat/v1/up/bob/b", mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, UserSig: "junk"}))
	g.HandleMessage("chat/v1/up/bob/b", []byte("{{"))
	var b bytes.Buffer
	g.WriteMetrics(&b)
	return b.String()
}

// Every family has # HELP and # TYPE before its samples, and the labelled
// families show their known label values from the start, at 0.
func TestMetricsExposition(t *testing.T) {
	text := metricsText(t)
	help := map[string]bool{}
	typ := map[string]bool{}
	sample := regexp.MustCompile(`^([a-z_]+)(\{[a-z_]+="[^"]*"\})? [0-9.e+-]+$`)
	for _, line := range strings.Split(strings.TrimSpace(text), "\n") {
		switch f := strings.Fields(line); {
		case strings.HasPrefix(line, "# HELP "):
			if len(f) < 4 {
				t.Errorf("HELP without text: %q", line)
			}
			help[f[2]] = true
		case strings.HasPrefix(line, "# TYPE "):
			typ[f[2]] = true
		default:
			m := sample.FindStringSubmatch(line)
			if m == nil {
				t.Errorf("not a sample line: %q", line)
				continue
			}
			if !help[m[1]] || !typ[m[1]] {
				t.Errorf("%s has a sample before its # HELP and # TYPE", m[1])
			}
		}
	}
	for _, want := range []string{
		`chatgw_logins_total{code="0"} 1`,
		`chatgw_logins_total{code="70052"} 0`,
		`chatgw_resumes_total{code="0"} 0`,
		`chatgw_kicks_total{reason="admin"} 0`,
		`chatgw_messages_dropped_total{reason="rate_limited"} 0`,
		`chatgw_messages_dropped_total{reason="malformed"} 1`,
		`chatgw_state_evicted_total{kind="tombstone"} 0`,
		`chatgw_broker_refused_total{reason="bad_will"} 0`,
		`chatgw_rate_limited_total{where="gateway"} 0`,
		`chatgw_broker_disconnects_total{reason="flood"} 0`,
		"chatgw_sessions_active 1",
	} {
		if !strings.Contains(text, want+"\n") {
			t.Errorf("metrics lack %q", want)
		}
	}
}

// promtool (Debian package prometheus) agrees the exposition is clean.
func TestMetricsPromtool(t *testing.T) {
	promtool := proctest.Tool(t, "promtool", "prometheus")
	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = strings.NewReader(metricsText(t))
	out, err := cmd.CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) != 0 {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
}

// docs/admin-api.md lists every metric family the gateway writes.
func TestMetricsDocumented(t *testing.T) {
	doc, err := os.ReadFile("../docs/admin-api.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(metricsText(t), "\n") {
		if name, ok := strings.CutPrefix(line, "# TYPE "); ok {
			name, _, _ = strings.Cut(name, " ")
			if !bytes.Contains(doc, []byte("`"+name)) {
				t.Errorf("docs/admin-api.md does not list %s", name)
			}
		}
	}
}
