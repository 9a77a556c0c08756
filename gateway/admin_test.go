package gateway

import (
	"encoding/json"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"chatd/mqtt"
)

// The admin API answers as docs/admin-api.md says.
func TestAdminAPIAsDocumented(t *testing.T) {
	w := startWorld(t, nil)
	a, session := loginVictim(t, w)
	do := func(method, path string) (int, string, map[string]any) {
		t.Helper()
		req, _ := http.NewRequest(method, w.admin+path, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		var v map[string]any
		json.Unmarshal(b, &v)
		return resp.StatusCode, resp.Header.Get("Content-Type"), v
	}
	keys := func(v any) []string {
		m, _ := v.(map[string]any)
		var out []string
		for k := range m {
			out = append(out, k)
		}
		slices.Sort(out)
		return out
	}
	code, ctype, v := do("GET", "/v1/sessions")
	ss, _ := v["sessions"].([]any)
	if code != 200 || ctype != "application/json" || len(ss) != 1 {
		t.Fatalf("GET /v1/sessions: %d %s %v", code, ctype, v)
	}
	// The embedded broker names the connection (conn).
	if diff := cmp.Diff([]string{"conn", "id", "instance", "last_seen", "login_at", "online", "platform", "user_id", "usersig_expires_at"}, keys(ss[0])); diff != "" {
		t.Errorf("session fields (-want +got):\n%s", diff)
	}
	code, _, v = do("GET", "/v1/users/alice")
	if code != 200 || v["state"] != "online" || v["user_id"] != "alice" {
		t.Errorf("GET /v1/users/alice: %d %v", code, v)
	}
	code, _, v = do("GET", "/v1/users/nobody")
	if code != 200 || v["state"] != "offline" || len(v["sessions"].([]any)) != 0 {
		t.Errorf("GET /v1/users/nobody: %d %v", code, v)
	}
	code, _, v = do("POST", "/v1/users/a+b/kick")
	if code != 400 || !strings.Contains(v["error"].(string), "UserID") {
		t.Errorf("kick of an invalid UserID: %d %v", code, v)
	}
	time.Sleep(1100 * time.Millisecond)
	code, _, v = do("POST", "/v1/users/alice/kick")
	if code != 200 || v["kicked_sessions"] != float64(1) || v["usersigs_revoked_before"] == nil {
		t.Errorf("kick: %d %v", code, v)
	}
	if k := push(t, a, 5*time.Second); k.Type != mqtt.TypeKick || k.Session != session || k.Reason != mqtt.KickAdmin || k.ByPlatform != "" || k.Code != 6208 {
		t.Errorf("admin kick message: %+v (by_platform is for other_instance kicks only)", k)
	}
	code, _, v = do("GET", "/v1/users/alice")
	if code != 200 || v["usersigs_revoked_before"] == nil || v["state"] != "offline" {
		t.Errorf("after the kick: %d %v", code, v)
	}
	for _, path := range []string{"/healthz", "/readyz"} {
		code, _, v = do("GET", path)
		if diff := cmp.Diff(map[string]any{"ok": true, "ready": true, "broker_connected": true, "state_unwritten": false}, v); code != 200 || diff != "" {
			t.Errorf("GET %s: %d (-want +got):\n%s", path, code, diff)
		}
	}
	code, ctype, _ = do("GET", "/metrics")
	if code != 200 || !strings.HasPrefix(ctype, "text/plain; version=0.0.4") {
		t.Errorf("GET /metrics: %d %s", code, ctype)
	}
	code, _, v = do("DELETE", "/v1/sessions")
	if code != 404 || !strings.Contains(v["error"].(string), "GET /readyz") {
		t.Errorf("unknown endpoint: %d %v", code, v)
	}
}
