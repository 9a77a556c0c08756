package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"chatd/internal/proctest"
	"chatd/mqtt"
	"chatd/mqtt/mosquittotest"
	"chatd/usersig"
)

const appID = 1400000001

var chatgwBin string

// TestMain builds the real chatgw binary once; the tests run it.
func TestMain(m *testing.M) {
	code := m.Run()
	proctest.Cleanup()
	os.Exit(code)
}

func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

const testKeyText = "5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e"

func chatgw(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	chatgwBin = proctest.Binary(t, "chatgw")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, chatgwBin, args...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		return o.String(), e.String(), ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return o.String(), e.String(), 0
}

func TestUserSigCommands(t *testing.T) {
	keyFile := writeFile(t, "key", testKeyText+"\n")
	out, errOut, code := chatgw(t, "usersig", "gen", "--sdkappid", "1400000001", "--key-file", keyFile, "--user", "dev-42", "--expire", "3600")
	if code != 0 {
		t.Fatalf("gen: exit %d: %s", code, errOut)
	}
	sig := strings.TrimSpace(out)
	tk, err := usersig.Verify(sig, appID, usersig.NewSecret(testKeyText), "dev-42", time.Now())
	if err != nil || tk.Expire != 3600 {
		t.Fatalf("generated UserSig does not verify: %v %+v", err, tk)
	}

	for _, tc := range []struct {
		name     string
		args     []string
		wantCode int
		wantOut  string
	}{
		{"verify valid", []string{"usersig", "verify", "--sdkappid", "1400000001", "--key-file", keyFile, "--user", "dev-42", sig}, 0, "0 OK"},
		{"verify other user", []string{"usersig", "verify", "--sdkappid", "1400000001", "--key-file", keyFile, "--user", "dev-43", sig}, 1, "70013"},
		{"verify other app", []string{"usersig", "verify", "--sdkappid", "1400000002", "--key-file", keyFile, "--user", "dev-42", sig}, 1, "70014"},
		{"verify garbage", []string{"usersig", "verify", "--sdkappid", "1400000001", "--key-file", keyFile, "--user", "dev-42", "xyz"}, 1, "70003"},
		{"verify without key", []string{"usersig", "verify", "--sdkappid", "1400000001", "--user", "dev-42", sig}, 2, ""},
		{"decode", []string{"usersig", "decode", sig}, 0, `"identifier": "dev-42"`},
		{"decode garbage", []string{"usersig", "decode", "!!"}, 1, ""},
		{"version", []string{"--version"}, 0, "chatgw "},
		{"unknown command", []string{"frobnicate"}, 2, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, errOut, code := chatgw(t, tc.args...)
			if code != tc.wantCode || !strings.Contains(out, tc.wantOut) {
				t.Errorf("exit %d, stdout %q, stderr %q; want exit %d and %q", code, out, errOut, tc.wantCode, tc.wantOut)
			}
			if strings.Contains(errOut, testKeyText) || strings.Contains(out, testKeyText) {
				t.Error("the key was printed")
			}
		})
	}
	// The key never goes on the command line.
	if _, errOut, code := chatgw(t, "usersig", "gen", "--sdkappid", "1", "--key", testKeyText, "--user", "x"); code != 2 || !strings.Contains(errOut, "key-file") {
		t.Errorf("--key: exit %d %q", code, errOut)
	}
}

func TestServeConfigErrors(t *testing.T) {
	keyFile := writeFile(t, "key", testKeyText)
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"no sdkappid", []string{"serve", "--key-file", keyFile, "--embedded-broker", "127.0.0.1:0"}, "--sdkappid is required"},
		{"no key", []string{"serve", "--sdkappid", "1", "--embedded-broker", "127.0.0.1:0"}, "--key-file is required"},
		{"missing key file", []string{"serve", "--sdkappid", "1", "--key-file", "/nonexistent/key", "--embedded-broker", "127.0.0.1:0"}, "/nonexistent/key"},
		{"no broker", []string{"serve", "--sdkappid", "1", "--key-file", keyFile}, "--embedded-broker"},
		{"bad policy", []string{"serve", "--sdkappid", "1", "--key-file", keyFile, "--embedded-broker", "127.0.0.1:0", "--policy", "quad"}, "single, dual, triple or multi"},
		{"too many instances", []string{"serve", "--sdkappid", "1", "--key-file", keyFile, "--embedded-broker", "127.0.0.1:0", "--max-instances", "Linux=5"}, "1 to 3"},
		{"admin not loopback", []string{"serve", "--sdkappid", "1", "--key-file", keyFile, "--embedded-broker", "127.0.0.1:0", "--admin", "0.0.0.0:9000"}, "not loopback"},
		{"guessable client id", []string{"serve", "--sdkappid", "1", "--key-file", keyFile, "--broker", "tcp://127.0.0.1:1", "--broker-client-id", "chatgw"}, "guessable"},
		{"client id on the embedded broker", []string{"serve", "--sdkappid", "1", "--key-file", keyFile, "--embedded-broker", "127.0.0.1:0", "--broker-client-id", "chatgw-0123456789abcdef"}, "external broker only"},
		{"grace on an external broker", []string{"serve", "--sdkappid", "1", "--key-file", keyFile, "--broker", "tcp://127.0.0.1:1", "--expired-usersig-grace", "1h"}, "embedded broker only"},
		{"bad grace", []string{"serve", "--sdkappid", "1", "--key-file", keyFile, "--embedded-broker", "127.0.0.1:0", "--expired-usersig-grace", "soon"}, "positive duration"},
		{"bad device rate", []string{"serve", "--sdkappid", "1", "--key-file", keyFile, "--embedded-broker", "127.0.0.1:0", "--device-rate", "-1"}, "messages per second"},
		{"unknown config key", []string{"serve", "--config", writeFile(t, "gw.toml", "sdkappid = 1\nkey_fiel = \"x\"\n")}, "key_fiel"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, errOut, code := chatgw(t, tc.args...)
			if code == 0 || !strings.Contains(errOut, tc.want) {
				t.Errorf("exit %d, stderr %q; want failure mentioning %q", code, errOut, tc.want)
			}
		})
	}
}

// dialRetry connects a device, retrying while the broker or gateway starts.
func dialRetry(t *testing.T, o mqtt.DialOptions) *mqtt.Conn {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, err := mqtt.Dial(ctx, o)
		cancel()
		if err == nil {
			t.Cleanup(func() { c.Close(false) })
			return c
		}
		if time.Now().After(deadline) {
			t.Fatalf("device %s/%s could not connect: %v", o.UserID, o.Instance, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// requestRetry sends a request until the gateway answers (it may still be
// subscribing).
func requestRetry(t *testing.T, c *mqtt.Conn, m mqtt.Message) mqtt.Message {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		r, err := c.Request(ctx, m)
		cancel()
		if err == nil {
			return r
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: no answer: %v", m.Type, err)
		}
	}
}

func waitPush(t *testing.T, c *mqtt.Conn) mqtt.Message {
	t.Helper()
	select {
	case m := <-c.Pushes():
		return m
	case <-time.After(10 * time.Second):
		t.Fatal("no push within 10s")
	}
	return mqtt.Message{}
}

func sigFor(t *testing.T, user string, lifetime time.Duration) string {
	t.Helper()
	s, err := usersig.Generate(appID, usersig.NewSecret(testKeyText), user, lifetime, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// scenario runs login, kick by a second instance, broker restart and resume
// against whatever broker dial reaches; restart restarts the broker.
func scenario(t *testing.T, dial func(user, instance, sig string) *mqtt.Conn, restart func()) {
	sig := sigFor(t, "dev-42", time.Hour)
	a := dial("dev-42", "inst-a", sig)
	ra := requestRetry(t, a, mqtt.Message{Type: mqtt.TypeLogin, UserID: "dev-42", UserSig: sig, Platform: "Linux"})
	if ra.Code != 0 {
		t.Fatalf("login: %+v", ra)
	}
	b := dial("dev-42", "inst-b", sig)
	rb := requestRetry(t, b, mqtt.Message{Type: mqtt.TypeLogin, UserID: "dev-42", UserSig: sig, Platform: "Linux"})
	if rb.Code != 0 {
		t.Fatalf("second login: %+v", rb)
	}
	if k := waitPush(t, a); k.Type != mqtt.TypeKick || k.Session != ra.Session {
		t.Fatalf("first instance got %+v, want a kick naming %s", k, ra.Session)
	}
	restart()
	select {
	case <-b.Lost():
	case <-time.After(10 * time.Second):
		t.Fatal("device did not notice the broker restart")
	}
	b2 := dial("dev-42", "inst-b", sig)
	if r := requestRetry(t, b2, mqtt.Message{Type: mqtt.TypeResume, UserID: "dev-42", Session: rb.Session}); r.Code != 0 {
		t.Fatalf("resume after broker restart: %+v", r)
	}
}

func TestServeEmbeddedBroker(t *testing.T) {
	keyFile := writeFile(t, "key", testKeyText)
	broker := proctest.FreePort(t)
	admin := proctest.FreePort(t)
	state := filepath.Join(t.TempDir(), "state.db")
	g := proctest.Start(t, proctest.Binary(t, "chatgw"), "serve", "--sdkappid", "1400000001", "--key-file", keyFile, "--embedded-broker", broker, "--admin", admin, "--state", state)
	dial := func(user, instance, sig string) *mqtt.Conn {
		return dialRetry(t, mqtt.DialOptions{Brokers: []string{"tcp://" + broker}, UserID: user, Instance: instance, UserSig: sig})
	}
	scenario(t, dial, func() {
		if code := g.Stop(); code != 0 {
			t.Errorf("chatgw exited %d on SIGTERM, want 0", code)
		}
		g.Start()
	})
	if strings.Contains(g.Log(), testKeyText) {
		t.Error("the key reached the log")
	}
	// docs/admin-api.md: how to tell chatgw serve is ready.
	if !strings.Contains(g.Log(), `msg="gateway ready: subscribed to the device topics"`) {
		t.Errorf("no readiness line in the log:\n%s", g.Log())
	}
	if resp, err := http.Get("http://" + admin + "/readyz"); err != nil || resp.StatusCode != 200 {
		t.Errorf("GET /readyz: %v %v", resp, err)
	} else {
		resp.Body.Close()
	}
	var sessions struct {
		Sessions []json.RawMessage `json:"sessions"`
	}
	resp, err := http.Get("http://" + admin + "/v1/sessions")
	if err != nil {
		t.Fatalf("admin API: %v", err)
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(&sessions); err != nil || len(sessions.Sessions) != 1 {
		t.Errorf("admin API lists %d sessions, want 1 (%v)", len(sessions.Sessions), err)
	}
}

func TestServeMosquitto(t *testing.T) {
	keyFile := writeFile(t, "key", testKeyText)
	passFile := writeFile(t, "gwpass", "gw-secret\n")
	b := mosquittotest.Start(t, mosquittotest.Config{
		ACLFile: mosquittotest.ACLTemplate(t),
		Users:   map[string]string{"chatgw": "gw-secret", "dev-42": "dev-pass"},
	})
	state := filepath.Join(t.TempDir(), "state.db")
	proctest.Start(t, proctest.Binary(t, "chatgw"), "serve", "--sdkappid", "1400000001", "--key-file", keyFile, "--broker", b.URL(),
		"--broker-username", "chatgw", "--broker-password-file", passFile, "--state", state)
	dial := func(user, instance, sig string) *mqtt.Conn {
		return dialRetry(t, mqtt.DialOptions{Brokers: []string{b.URL()}, UserID: user, Instance: instance, Username: user, Password: "dev-pass"})
	}
	scenario(t, dial, func() { b.Stop(); b.Start() })
	if t.Failed() {
		t.Logf("mosquitto log:\n%s", b.Log())
	}
}

// A gateway on Mosquitto that is killed loses nothing a device sent: its
// persistent session queues what arrives while it is down, and it
// acknowledges a message only once handled. After the restart it learns
// that the device said goodbye while it was away.
func TestServeMosquittoKilled(t *testing.T) {
	keyFile := writeFile(t, "key", testKeyText)
	passFile := writeFile(t, "gwpass", "gw-secret\n")
	b := mosquittotest.Start(t, mosquittotest.Config{
		ACLFile: mosquittotest.ACLTemplate(t),
		Users:   map[string]string{"chatgw": "gw-secret", "dev-42": "dev-pass"},
		Shipped: true,
	})
	state := filepath.Join(t.TempDir(), "state.db")
	admin := proctest.FreePort(t)
	g := proctest.Start(t, proctest.Binary(t, "chatgw"), "serve", "--sdkappid", "1400000001", "--key-file", keyFile, "--broker", b.URL(),
		"--broker-username", "chatgw", "--broker-password-file", passFile, "--state", state, "--admin", admin)
	sig := sigFor(t, "dev-42", time.Hour)
	a := dialRetry(t, mqtt.DialOptions{Brokers: []string{b.URL()}, UserID: "dev-42", Instance: "inst-a", Username: "dev-42", Password: "dev-pass"})
	if r := requestRetry(t, a, mqtt.Message{Type: mqtt.TypeLogin, UserSig: sig}); r.Code != 0 {
		t.Fatalf("login: %+v", r)
	}
	online := func() (bool, int) {
		resp, err := http.Get("http://" + admin + "/v1/users/dev-42")
		if err != nil {
			return false, -1
		}
		defer resp.Body.Close()
		var u struct {
			Sessions []struct {
				Online bool `json:"online"`
			} `json:"sessions"`
		}
		json.NewDecoder(resp.Body).Decode(&u)
		if len(u.Sessions) != 1 {
			return false, len(u.Sessions)
		}
		return u.Sessions[0].Online, 1
	}
	if on, n := online(); !on || n != 1 {
		t.Fatalf("before the kill: online=%v sessions=%d", on, n)
	}
	g.Kill()
	a.Close(true) // the goodbye reaches only the broker
	g.Start()
	proctest.Wait(t, 15*time.Second, "the goodbye sent while the gateway was down to be applied", func() bool {
		on, n := online()
		return n == 1 && !on
	})
	if !strings.Contains(g.Log(), "gateway ready") {
		t.Error("no readiness line after the restart")
	}
}
