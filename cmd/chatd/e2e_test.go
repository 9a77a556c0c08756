package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"chatd/client"
	"chatd/internal/proctest"
	"chatd/mqtt/mosquittotest"
	"chatd/usersig"
)

// These tests run the real chatd against the real chatgw, on the gateway's
// embedded broker and on a real Mosquitto.

const (
	appID   = "1400000001"
	keyText = "e2e-secret-key-0123456789abcdef"
)

func TestMain(m *testing.M) {
	code := m.Run()
	proctest.Cleanup()
	os.Exit(code)
}

// env is one gateway and the files devices need.
type env struct {
	t       *testing.T
	dir     string
	key     string
	broker  string // tcp://127.0.0.1:port
	adminS  string // gateway admin socket
	gw      *proctest.Proc
	helper  string // usersig_command script
	mosq    *mosquittotest.Broker
	mqttCfg string // extra [mqtt] lines for chatd
}

func newEnv(t *testing.T) *env {
	t.Helper()
	dir := t.TempDir()
	// Other users (the permission test's "nobody") must reach the sockets.
	os.Chmod(filepath.Dir(dir), 0o755)
	os.Chmod(dir, 0o755)
	e := &env{t: t, dir: dir, key: filepath.Join(dir, "key"), adminS: filepath.Join(dir, "gw.sock")}
	if err := os.WriteFile(e.key, []byte(keyText), 0o600); err != nil {
		t.Fatal(err)
	}
	// The credential helper; its UserSig lifetime comes from a file the
	// test can change.
	e.helper = filepath.Join(dir, "get-usersig")
	script := fmt.Sprintf("#!/bin/sh\nlife=$(cat %s/lifetime 2>/dev/null || echo 86400)\nexec %s usersig gen --sdkappid %s --key-file %s --user \"$CHATD_USER_ID\" --expire \"$life\"\n",
		dir, proctest.Binary(t, "chatgw"), appID, e.key)
	if err := os.WriteFile(e.helper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return e
}

func (e *env) setLifetime(seconds int) {
	os.WriteFile(filepath.Join(e.dir, "lifetime"), []byte(fmt.Sprint(seconds)), 0o644)
}

// embedded starts chatgw with its embedded broker.
func (e *env) embedded() {
	addr := proctest.FreePort(e.t)
	e.broker = "tcp://" + addr
	e.gw = proctest.Start(e.t, proctest.Binary(e.t, "chatgw"), "serve", "--sdkappid", appID, "--key-file", e.key,
		"--embedded-broker", addr, "--admin", e.adminS, "--state", filepath.Join(e.dir, "gw.db"), "--log-level", "debug")
	proctest.Wait(e.t, 10*time.Second, "the gateway's admin socket", func() bool { _, err := os.Stat(e.adminS); return err == nil })
}

// mosquitto starts a real Mosquitto with the ACL template and chatgw on it.
func (e *env) mosquitto(users ...string) {
	pw := map[string]string{"chatgw": "gw-pass"}
	for _, u := range users {
		pw[u] = u + "-pass"
		os.WriteFile(filepath.Join(e.dir, u+".pass"), []byte(u+"-pass\n"), 0o600)
	}
	e.mosq = mosquittotest.Start(e.t, mosquittotest.Config{ACLFile: mosquittotest.ACLTemplate(e.t), Users: pw})
	e.broker = e.mosq.URL()
	gwPass := filepath.Join(e.dir, "gw.pass")
	os.WriteFile(gwPass, []byte("gw-pass\n"), 0o600)
	e.gw = proctest.Start(e.t, proctest.Binary(e.t, "chatgw"), "serve", "--sdkappid", appID, "--key-file", e.key,
		"--broker", e.broker, "--broker-username", "chatgw", "--broker-password-file", gwPass,
		"--admin", e.adminS, "--state", filepath.Join(e.dir, "gw.db"))
	proctest.Wait(e.t, 10*time.Second, "the gateway's admin socket", func() bool { _, err := os.Stat(e.adminS); return err == nil })
}

// device is one chatd.
type device struct {
	t    *testing.T
	name string
	dir  string
	cfg  string
	p    *proctest.Proc
	c    *client.Client
}

func (e *env) device(name, user string, extra string) *device {
	e.t.Helper()
	dir := filepath.Join(e.dir, name)
	os.MkdirAll(dir, 0o755)
	d := &device{t: e.t, name: name, dir: dir, cfg: filepath.Join(dir, "chatd.toml")}
	mqttSection := ""
	if e.mosq != nil {
		mqttSection = fmt.Sprintf("username = %q\npassword_file = %q\n", user, filepath.Join(e.dir, user+".pass"))
	}
	mqttSection += e.mqttCfg
	cfg := fmt.Sprintf(`sdkappid = %s
user_id = %q
broker = %q
usersig_command = %q
state_db = %q
socket = %q
%s
[mqtt]
keepalive = "10s"
%s
[reconnect]
min_delay = "200ms"
max_delay = "1s"
stable_after = "5s"

[log]
level = "debug"
`, appID, user, e.broker, e.helper, filepath.Join(dir, "state.db"), filepath.Join(dir, "chatd.sock"), "", mqttSection)
	cfg = strings.Replace(cfg, "[mqtt]\n", "[mqtt]\n", 1) + extra
	if err := os.WriteFile(d.cfg, []byte(cfg), 0o644); err != nil {
		e.t.Fatal(err)
	}
	d.c = client.New(filepath.Join(dir, "chatd.sock"))
	d.p = proctest.Start(e.t, proctest.Binary(e.t, "chatd"), "--config", d.cfg)
	return d
}

func (d *device) status() client.Status {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	s, _ := d.c.Status(ctx)
	return s
}

func (d *device) waitFor(what string, cond func(client.Status) bool) client.Status {
	d.t.Helper()
	var s client.Status
	proctest.Wait(d.t, 20*time.Second, d.name+": "+what, func() bool { s = d.status(); return cond(s) })
	return s
}

func (d *device) waitLogined() client.Status {
	d.t.Helper()
	return d.waitFor("LOGINED and connected", func(s client.Status) bool { return s.LoginStatus == client.Logined && s.Connected })
}

func (e *env) gatewaySessions(user string) string {
	resp, err := proctest.UnixHTTP(e.adminS).Get("http://chatgw/v1/users/" + user)
	if err != nil {
		e.t.Fatalf("gateway admin API: %v", err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return string(out)
}

func TestE2EEmbedded(t *testing.T) {
	e := newEnv(t)
	e.embedded()
	scenario(t, e)
}

func TestE2EMosquitto(t *testing.T) {
	e := newEnv(t)
	e.mosquitto("dev-42", "bob")
	scenario(t, e)
}

// stopBroker stops the broker devices connect to (on the embedded broker,
// the gateway itself) and returns a function that starts it again.
func (e *env) stopBroker(t *testing.T) (restart func()) {
	if e.mosq != nil {
		e.mosq.Stop()
		return e.mosq.Start
	}
	if code := e.gw.Stop(); code != 0 {
		t.Errorf("chatgw exited %d on SIGTERM", code)
	}
	return e.gw.Start
}

// scenario is the life of a device: login, broker restart, daemon restart
// and power cut, UserSig renewal, a second instance, account switch, logout.
func scenario(t *testing.T, e *env) {
	a := e.device("a", "dev-42", "")
	s := a.waitLogined()
	if s.UserID != "dev-42" || s.Session == "" || s.UserSigExpiresAt == nil {
		t.Fatalf("status %+v", s)
	}
	session := s.Session

	t.Run("broker restart resumes the session", func(t *testing.T) {
		restart := e.stopBroker(t)
		a.waitFor("reconnecting", func(s client.Status) bool { return !s.Connected })
		if s := a.status(); s.LoginStatus != client.Logined || s.Connection != "reconnecting" {
			t.Errorf("while the broker is down: %+v", s)
		}
		restart()
		s := a.waitLogined()
		if s.Session != session {
			t.Errorf("session %s after the restart, want the resumed %s", s.Session, session)
		}
		proctest.Wait(t, 10*time.Second, "the gateway to log the resume", func() bool { return strings.Contains(e.gw.Log(), "msg=resume") })
	})

	t.Run("daemon restart and power cut come back from the persisted state", func(t *testing.T) {
		for _, stop := range []func() int{a.p.Stop, a.p.Kill} {
			stop()
			a.p.Start()
			s := a.waitLogined()
			if s.Session != session {
				t.Errorf("session %s after a restart, want %s resumed", s.Session, session)
			}
		}
	})

	t.Run("usersig expiry is renewed with usersig_command", func(t *testing.T) {
		// Short UserSigs from now on; the daemon renews at half their life.
		e.setLifetime(4)
		ctx := context.Background()
		sig := runHelper(t, e, "dev-42")
		// A login as the same user while logged in is a no-op (as in the
		// SDK), so log out first.
		if r, err := a.c.Logout(ctx); err != nil || r.Code != 0 {
			t.Fatalf("logout: %+v %v", r, err)
		}
		if r, err := a.c.Login(ctx, "dev-42", sig); err != nil || r.Code != 0 {
			t.Fatalf("login with a short UserSig: %+v %v", r, err)
		}
		first := a.waitFor("a session with the short UserSig", func(s client.Status) bool {
			return s.UserSigExpiresAt != nil && time.Until(*s.UserSigExpiresAt) < time.Minute && s.Connected
		})
		a.waitFor("a renewed session", func(s client.Status) bool {
			return s.Session != first.Session && s.Session != "" && s.UserSigExpiresAt.After(*first.UserSigExpiresAt)
		})
		if s := a.status(); s.LoginStatus != client.Logined {
			t.Errorf("status after renewal: %+v", s)
		}
		e.setLifetime(86400)
		a.waitFor("a long UserSig again", func(s client.Status) bool {
			return s.UserSigExpiresAt != nil && time.Until(*s.UserSigExpiresAt) > time.Hour && s.LoginStatus == client.Logined
		})
	})

	t.Run("a second instance kicks the first", func(t *testing.T) {
		b := e.device("b", "dev-42", "")
		b.waitLogined()
		s := a.waitFor("kicked", func(s client.Status) bool { return s.LoginStatus == client.Logout })
		if s.LastError.Code != 6208 || s.UserID != "" {
			t.Errorf("kicked device: %+v", s)
		}
		// No login loop.
		time.Sleep(2 * time.Second)
		if s := a.status(); s.LoginStatus != client.Logout {
			t.Errorf("the kicked device logged in again: %+v", s)
		}
		if s := b.status(); s.LoginStatus != client.Logined {
			t.Errorf("the kicking device: %+v", s)
		}
		b.p.Stop()
	})

	t.Run("account switch and logout", func(t *testing.T) {
		if e.mosq != nil {
			// Under the ACL template the broker username is the UserID, and
			// chatd has one broker account: switching accounts needs the
			// new user's account, which this setup does not configure.
			t.Skip("account switch needs a broker account per user on Mosquitto; covered on the embedded broker")
		}
		ctx := context.Background()
		sig := runHelper(t, e, "dev-42")
		if r, err := a.c.Login(ctx, "dev-42", sig); err != nil || r.Code != 0 {
			t.Fatalf("login: %+v %v", r, err)
		}
		a.waitLogined()
		bob := runHelper(t, e, "bob")
		r, err := a.c.Login(ctx, "bob", bob)
		if err != nil || r.Code != 0 || r.Data.UserID != "bob" {
			t.Fatalf("switch to bob: %+v %v", r, err)
		}
		proctest.Wait(t, 10*time.Second, "dev-42 gone from the gateway", func() bool {
			return strings.Contains(e.gatewaySessions("dev-42"), `"state": "offline"`) && strings.Contains(e.gatewaySessions("dev-42"), `"sessions": []`)
		})
		if !strings.Contains(e.gatewaySessions("bob"), `"state": "online"`) {
			t.Errorf("bob is not online at the gateway: %s", e.gatewaySessions("bob"))
		}
		if r, err := a.c.Logout(ctx); err != nil || r.Code != 0 || r.Data.LoginStatus != client.Logout {
			t.Fatalf("logout: %+v %v", r, err)
		}
		proctest.Wait(t, 10*time.Second, "bob gone from the gateway", func() bool {
			return strings.Contains(e.gatewaySessions("bob"), `"sessions": []`)
		})
	})

	t.Run("a logout while the broker is down reaches the gateway when it is back", func(t *testing.T) {
		ctx := context.Background()
		if r, err := a.c.Login(ctx, "dev-42", runHelper(t, e, "dev-42")); err != nil || r.Code != 0 {
			t.Fatalf("login: %+v %v", r, err)
		}
		session := a.waitLogined().Session
		if !strings.Contains(e.gatewaySessions("dev-42"), session) {
			t.Fatalf("the gateway does not show %s: %s", session, e.gatewaySessions("dev-42"))
		}
		restart := e.stopBroker(t)
		a.waitFor("disconnected", func(s client.Status) bool { return !s.Connected })
		r, err := a.c.Logout(ctx)
		if err != nil || r.Code != 0 || r.Data.LoginStatus != client.Logout || r.Data.PendingLogouts != 1 {
			t.Fatalf("logout while disconnected: %+v %v", r, err)
		}
		// chatd restarts before the broker is back: the logout is kept.
		a.p.Stop()
		a.p.Start()
		if s := a.waitFor("restarted", func(s client.Status) bool { return s.Instance != "" }); s.PendingLogouts != 1 || s.LoginStatus != client.Logout {
			t.Errorf("after the restart: %+v", s)
		}
		restart()
		a.waitFor("the logout delivered", func(s client.Status) bool { return s.PendingLogouts == 0 })
		proctest.Wait(t, 10*time.Second, "the session gone from the gateway", func() bool {
			return !strings.Contains(e.gatewaySessions("dev-42"), session)
		})
		if s := a.status(); s.LoginStatus != client.Logout {
			t.Errorf("after delivery: %+v", s)
		}
	})

	t.Run("nothing logs a UserSig", func(t *testing.T) {
		sig := runHelper(t, e, "dev-42")
		tk, _ := usersig.Decode(sig)
		for name, log := range map[string]string{"chatd": a.p.Log(), "chatgw": e.gw.Log()} {
			if strings.Contains(log, tk.Sig) || strings.Contains(log, keyText) {
				t.Errorf("%s's log holds a secret", name)
			}
			if strings.Contains(log, "eJ") && strings.Contains(log, "user_sig") {
				t.Errorf("%s's log may hold a UserSig", name)
			}
		}
	})
}

func runHelper(t *testing.T, e *env, user string) string {
	t.Helper()
	cmd := exec.Command(e.helper)
	cmd.Env = append(os.Environ(), "CHATD_USER_ID="+user)
	out, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(out))
}

func TestE2ESocketPermissions(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to run a client as another user")
	}
	curl := proctest.Tool(t, "curl", "curl")
	e := newEnv(t)
	e.embedded()
	a := e.device("a", "dev-42", "\n[api]\nsocket_group = \"nogroup\"\n")
	a.waitLogined()
	sock := filepath.Join(a.dir, "chatd.sock")
	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o660 {
		t.Errorf("socket mode %v, want 0660", fi.Mode().Perm())
	}
	asNobody := func(args ...string) (string, int) {
		cmd := exec.Command(curl, append([]string{"-s", "-w", "\n%{http_code}", "--unix-socket", sock}, args...)...)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("curl as nobody: %v", err)
		}
		i := strings.LastIndex(string(out), "\n")
		var code int
		fmt.Sscan(string(out[i+1:]), &code)
		return string(out[:max(i, 0)]), code
	}
	if body, code := asNobody("http://chatd/v1/status"); code != http.StatusOK || !strings.Contains(body, `"login_status": 1`) && !strings.Contains(body, `"login_status":1`) {
		t.Errorf("a socket-group member reading status: %d %s", code, body)
	}
	body, code := asNobody("-X", "POST", "http://chatd/v1/logout")
	if code != http.StatusForbidden || !strings.Contains(body, "permission denied") {
		t.Errorf("a socket-group member logging out: %d %s", code, body)
	}
	if s := a.status(); s.LoginStatus != client.Logined {
		t.Errorf("the refused logout logged the device out: %+v", s)
	}
	// Bad requests get a 4xx with a reason and change nothing.
	for _, tc := range []struct{ name, body string }{
		{"not JSON", "{"},
		{"no user_sig", `{"user_id":"x"}`},
		{"unknown field", `{"user_id":"x","user_sig":"y","z":1}`},
	} {
		out, _ := exec.Command(curl, "-s", "-w", "\n%{http_code}", "--unix-socket", sock, "-X", "POST", "-d", tc.body, "http://chatd/v1/login").Output()
		if !strings.HasSuffix(strings.TrimSpace(string(out)), "400") || !strings.Contains(string(out), "error") {
			t.Errorf("%s: %s", tc.name, out)
		}
	}
	if s := a.status(); s.LoginStatus != client.Logined {
		t.Errorf("bad requests changed the status: %+v", s)
	}
}

func TestE2EStateDatabase(t *testing.T) {
	e := newEnv(t)
	e.embedded()

	t.Run("a second chatd on the same database fails fast", func(t *testing.T) {
		a := e.device("a", "dev-42", "")
		a.waitLogined()
		// Same config, another socket: only the database is shared.
		cfg, _ := os.ReadFile(a.cfg)
		other := filepath.Join(a.dir, "second.toml")
		os.WriteFile(other, []byte(strings.Replace(string(cfg), "chatd.sock", "second.sock", 1)), 0o644)
		start := time.Now()
		out, err := exec.Command(proctest.Binary(t, "chatd"), "--config", other).CombinedOutput()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 1 {
			t.Fatalf("second chatd: %v\n%s", err, out)
		}
		if !strings.Contains(string(out), "another chatd") {
			t.Errorf("the message does not say why:\n%s", out)
		}
		if d := time.Since(start); d > 10*time.Second {
			t.Errorf("took %s to give up", d)
		}
		if s := a.status(); s.LoginStatus != client.Logined {
			t.Errorf("the first chatd suffered: %+v", s)
		}
		a.p.Stop()
	})

	t.Run("an unreadable database is moved aside and chatd starts clean", func(t *testing.T) {
		dir := filepath.Join(e.dir, "b")
		os.MkdirAll(dir, 0o755)
		garbage := make([]byte, 64<<10)
		for i := range garbage {
			garbage[i] = byte(i*7 + 3)
		}
		os.WriteFile(filepath.Join(dir, "state.db"), garbage, 0o600)
		b := e.device("b", "dev-43", "")
		s := b.waitLogined() // logs in again with usersig_command
		if s.UserID != "dev-43" {
			t.Errorf("status %+v", s)
		}
		moved, _ := filepath.Glob(filepath.Join(dir, "state.db.corrupt-*"))
		if len(moved) != 1 {
			t.Errorf("moved-aside files: %v", moved)
		}
		if !strings.Contains(b.p.Log(), "MOVED ASIDE") {
			t.Errorf("no loud log line:\n%s", b.p.Log())
		}
	})

	t.Run("a read-only state directory: chatd runs on in memory and says so", func(t *testing.T) {
		if os.Geteuid() != 0 {
			t.Skip("needs root to mount a read-only tmpfs")
		}
		dir := filepath.Join(e.dir, "ro")
		ro := filepath.Join(dir, "state")
		os.MkdirAll(ro, 0o755)
		if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", ro).CombinedOutput(); err != nil {
			t.Skipf("cannot mount a tmpfs here: %v %s", err, out)
		}
		t.Cleanup(func() { exec.Command("umount", ro).Run() })
		cfg := fmt.Sprintf("sdkappid = %s\nuser_id = \"dev-44\"\nbroker = %q\nusersig_command = %q\nstate_db = %q\nsocket = %q\n",
			appID, e.broker, e.helper, filepath.Join(ro, "state.db"), filepath.Join(dir, "chatd.sock"))
		os.WriteFile(filepath.Join(dir, "chatd.toml"), []byte(cfg), 0o644)
		p := proctest.Start(t, proctest.Binary(t, "chatd"), "--config", filepath.Join(dir, "chatd.toml"))
		c := client.New(filepath.Join(dir, "chatd.sock"))
		var s client.Status
		proctest.Wait(t, 20*time.Second, "LOGINED on in-memory state", func() bool {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			s, _ = c.Status(ctx)
			return s.LoginStatus == client.Logined && s.Connected
		})
		if s.StatePersisted || !strings.Contains(s.StateError, "read-only") {
			t.Errorf("status does not say the state is not persisted: %+v", s)
		}
		if !strings.Contains(p.Log(), "CANNOT BE WRITTEN") {
			t.Errorf("no loud log line:\n%s", p.Log())
		}
	})
}

// notifyListener stands in for systemd's notify socket.
func notifyListener(t *testing.T, dir string) (string, <-chan string) {
	t.Helper()
	path := filepath.Join(dir, "notify.sock")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	ch := make(chan string, 256)
	go func() {
		b := make([]byte, 4096)
		for {
			n, err := c.Read(b)
			if err != nil {
				close(ch)
				return
			}
			ch <- string(b[:n])
		}
	}()
	return path, ch
}

func expectNotify(t *testing.T, ch <-chan string, what string, match func(string) bool) {
	t.Helper()
	timeout := time.After(20 * time.Second)
	for {
		select {
		case m, ok := <-ch:
			if !ok {
				t.Fatalf("notify socket closed before %s", what)
			}
			if match(m) {
				return
			}
		case <-timeout:
			t.Fatalf("no %s from chatd", what)
		}
	}
}

func TestE2ESystemdProtocol(t *testing.T) {
	e := newEnv(t)
	e.embedded()
	notify, ch := notifyListener(t, e.dir)
	dir := filepath.Join(e.dir, "sd")
	os.MkdirAll(dir, 0o755)
	sock := filepath.Join(dir, "chatd.sock")
	cfg := filepath.Join(dir, "chatd.toml")
	os.WriteFile(cfg, []byte(fmt.Sprintf("sdkappid = %s\nuser_id = \"dev-42\"\nbroker = %q\nusersig_command = %q\nstate_db = %q\nsocket = %q\n",
		appID, e.broker, e.helper, filepath.Join(dir, "state.db"), sock)), 0o644)

	t.Run("notify, status, watchdog, stopping", func(t *testing.T) {
		p := proctest.New(t, proctest.Binary(t, "chatd"), "--config", cfg)
		p.Env = []string{"NOTIFY_SOCKET=" + notify, "WATCHDOG_USEC=1000000"}
		p.Start()
		expectNotify(t, ch, "READY=1", func(m string) bool {
			if m != "READY=1" {
				return false
			}
			if _, err := os.Stat(sock); err != nil {
				t.Errorf("READY=1 before the socket exists: %v", err)
			}
			return true
		})
		expectNotify(t, ch, "STATUS=LOGINED as dev-42", func(m string) bool { return m == "STATUS=LOGINED as dev-42" })
		expectNotify(t, ch, "WATCHDOG=1", func(m string) bool { return m == "WATCHDOG=1" })
		if code := p.Stop(); code != 0 {
			t.Errorf("exit %d on SIGTERM", code)
		}
		expectNotify(t, ch, "STOPPING=1", func(m string) bool { return m == "STOPPING=1" })
		if _, err := os.Stat(sock); !os.IsNotExist(err) {
			t.Errorf("the socket it made is still there after a clean stop: %v", err)
		}
	})

	t.Run("socket activation", func(t *testing.T) {
		activate, err := exec.LookPath("systemd-socket-activate")
		if err != nil {
			t.Skip("systemd-socket-activate not installed (Debian package systemd)")
		}
		act := filepath.Join(dir, "activated.sock")
		p := proctest.Start(t, activate, "-l", act, proctest.Binary(t, "chatd"), "--config", cfg, "--socket", filepath.Join(dir, "unused.sock"))
		c := client.New(act)
		var s client.Status
		proctest.Wait(t, 20*time.Second, "LOGINED through the passed socket", func() bool {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			s, _ = c.Status(ctx)
			return s.LoginStatus == client.Logined
		})
		if _, err := os.Stat(filepath.Join(dir, "unused.sock")); !os.IsNotExist(err) {
			t.Errorf("chatd made its own socket although one was passed: %v", err)
		}
		p.Stop()
	})

	t.Run("journald format", func(t *testing.T) {
		// systemd tells a service its stderr is the journal with
		// JOURNAL_STREAM=dev:inode of that stream.
		logf := filepath.Join(dir, "journal.log")
		f, _ := os.Create(logf)
		fi, _ := f.Stat()
		st := fi.Sys().(*syscall.Stat_t)
		cmd := exec.Command(proctest.Binary(t, "chatd"), "--config", cfg)
		cmd.Stderr = f
		cmd.Env = append(os.Environ(), fmt.Sprintf("JOURNAL_STREAM=%d:%d", st.Dev, st.Ino))
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		c := client.New(sock)
		proctest.Wait(t, 20*time.Second, "LOGINED and connected", func() bool {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			s, _ := c.Status(ctx)
			return s.LoginStatus == client.Logined && s.Connected
		})
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
		f.Close()
		b, _ := os.ReadFile(logf)
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		for _, l := range lines {
			if !strings.HasPrefix(l, "<") || strings.Contains(l, "time=") {
				t.Errorf("not a journald line: %q", l)
			}
		}
		// The earlier subtests left a session: this start resumes it (the
		// status stays LOGINED throughout, as while reconnecting).
		if !strings.Contains(string(b), "<6>level=INFO msg=\"resuming the persisted login\"") {
			t.Errorf("no resume at info priority:\n%s", b)
		}
	})
}
