package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"chatd/client"
	"chatd/localapi"
	"chatd/usersig"
)

var (
	testNow     = time.Date(2026, 4, 30, 12, 5, 0, 0, time.UTC)
	testSince   = time.Date(2026, 4, 30, 12, 0, 0, 0, time.UTC)
	testExpires = time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
)

func testStatus() client.Status {
	exp := testExpires
	return client.Status{
		LoginStatus:      client.Logined,
		LoginStatusName:  "LOGINED",
		UserID:           "alice",
		Connected:        true,
		Connection:       "connected",
		UserSigExpiresAt: &exp,
		ServerTimeOffset: 12,
		ClockTrusted:     true,
		Since:            testSince,
		Session:          "s-1",
		Instance:         "inst-1",
		Broker:           "tcp://gw:1883",
		Phase:            "Online",
		StatePersisted:   true,
	}
}

// fakeBackend is a localapi.Backend with canned answers.
type fakeBackend struct {
	mu        sync.Mutex
	status    client.Status
	loginCode int
	loginDesc string
	logins    []string // "user sig"

	events     chan client.Event
	subscribed chan struct{} // gets a value for each Subscribe
}

func newFakeBackend() *fakeBackend {
	return &fakeBackend{
		status:     testStatus(),
		events:     make(chan client.Event),
		subscribed: make(chan struct{}, 16),
	}
}

func (f *fakeBackend) Status() client.Status {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.status
}

func (f *fakeBackend) setStatus(s client.LoginStatus) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.status.LoginStatus, f.status.LoginStatusName = s, s.String()
}

func (f *fakeBackend) Login(ctx context.Context, user string, sig usersig.Secret) (int, string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.logins = append(f.logins, user+" "+sig.Reveal())
	return f.loginCode, f.loginDesc
}

func (f *fakeBackend) Logins() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.logins...)
}

func (f *fakeBackend) Logout(ctx context.Context) (int, string) {
	f.setStatus(client.Logout)
	f.mu.Lock()
	f.status.UserID = ""
	f.mu.Unlock()
	return 0, ""
}

func (f *fakeBackend) Subscribe() (<-chan client.Event, func()) {
	f.subscribed <- struct{}{}
	return f.events, func() {}
}

func (f *fakeBackend) ServerTime() client.ServerTime { return client.ServerTime{} }

func (f *fakeBackend) WriteMetrics(w io.Writer) {}

// startDaemon serves the real local API over a fake backend on a Unix
// socket, with peer credentials (TrustNonUnix false).
func startDaemon(t *testing.T, f *fakeBackend) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "chatd.sock")
	ln, err := localapi.ListenSocket(sock, -1)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	api := localapi.New(localapi.Options{Backend: f, OperatorGID: -1, DaemonUID: os.Getuid(), Now: func() time.Time { return testNow }})
	go func() { done <- api.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return sock
}

type result struct {
	code           int
	stdout, stderr string
}

// chatctl runs the command in-process, as main would, with CHATD_SOCKET
// set to envSocket.
func chatctl(ctx context.Context, envSocket, stdin string, args ...string) result {
	var stdout, stderr bytes.Buffer
	e := &env{
		stdin:  strings.NewReader(stdin),
		stdout: &stdout,
		stderr: &stderr,
		getenv: func(k string) string {
			if k == "CHATD_SOCKET" {
				return envSocket
			}
			return ""
		},
		now: func() time.Time { return testNow },
		loc: time.UTC,
	}
	err := run(ctx, args, e)
	code := exitCode(err, &stderr)
	return result{code, stdout.String(), stderr.String()}
}

func TestStatus(t *testing.T) {
	sock := startDaemon(t, newFakeBackend())
	tests := []struct {
		name       string
		env        string
		args       []string
		wantCode   int
		wantStdout string
	}{
		{
			name: "text",
			args: []string{"--socket", sock, "status"},
			wantStdout: `status:      LOGINED (1)
user:        alice
connection:  connected to tcp://gw:1883
usersig:     expires 2026-05-01 12:00:00 UTC (in 23h55m)
clock:       trusted
server time: +12 ms from this device's clock
last error:  none
since:       2026-04-30 12:00:00 UTC (5m0s ago)
session:     s-1
instance:    inst-1
`,
		},
		{
			name: "json, socket from the environment",
			env:  sock,
			args: []string{"status", "--json"},
			wantStdout: `{
  "login_status": 1,
  "login_status_name": "LOGINED",
  "user_id": "alice",
  "connected": true,
  "connection": "connected",
  "usersig_expires_at": "2026-05-01T12:00:00Z",
  "server_time_offset": 12,
  "clock_trusted": true,
  "last_error": {
    "code": 0,
    "message": ""
  },
  "since": "2026-04-30T12:00:00Z",
  "session": "s-1",
  "instance": "inst-1",
  "broker": "tcp://gw:1883",
  "phase": "Online",
  "state_persisted": true
}
`,
		},
		{
			name:     "socket flag after the command",
			args:     []string{"status", "--socket", sock, "--json"},
			wantCode: 0,
		},
		{
			name:     "extra argument",
			args:     []string{"--socket", sock, "status", "now"},
			wantCode: exitUsage,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := chatctl(context.Background(), tt.env, "", tt.args...)
			if got.code != tt.wantCode {
				t.Errorf("exit code = %d, want %d (stderr %q)", got.code, tt.wantCode, got.stderr)
			}
			if tt.wantStdout != "" {
				if diff := cmp.Diff(tt.wantStdout, got.stdout); diff != "" {
					t.Errorf("stdout (-want +got):\n%s", diff)
				}
			}
		})
	}
}

func TestStatusTextDetails(t *testing.T) {
	f := newFakeBackend()
	f.status = client.Status{
		LoginStatus:      client.Logout,
		LoginStatusName:  "LOGOUT",
		Connection:       "reconnecting",
		NextRetryAt:      ptr(testNow.Add(4 * time.Second)),
		UserSigExpiresAt: ptr(testNow.Add(-3 * time.Hour)),
		ServerTimeOffset: -1500,
		LastError:        client.ErrorInfo{Code: 70001, Message: "the UserSig expired at 09:05"},
		Since:            testNow.Add(-50 * time.Hour),
		Instance:         "inst-1",
	}
	sock := startDaemon(t, f)
	got := chatctl(context.Background(), sock, "", "status")
	want := `status:      LOGOUT (3)
user:        -
connection:  reconnecting (next try in 4s)
usersig:     EXPIRED 2026-04-30 09:05:00 UTC (3h0m ago)
clock:       not trusted yet (no expiry decisions until chatd hears the gateway's clock or the system clock is synchronised)
server time: -1500 ms from this device's clock
last error:  70001 (UserSig expired): the UserSig expired at 09:05; get a NEW UserSig, then log in
since:       2026-04-28 10:05:00 UTC (2d2h ago)
instance:    inst-1
`
	if diff := cmp.Diff(want, got.stdout); diff != "" {
		t.Errorf("stdout (-want +got):\n%s", diff)
	}
}

func ptr[T any](v T) *T { return &v }

func TestLogin(t *testing.T) {
	sigFile := filepath.Join(t.TempDir(), "usersig")
	if err := os.WriteFile(sigFile, []byte("sig-from-file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name        string
		code        int // the backend's answer
		desc        string
		stdin       string
		args        []string
		wantCode    int
		wantStdout  string
		wantStderr  []string // substrings
		wantLogins  []string
		wantNoLogin bool
	}{
		{
			name:       "from a file",
			args:       []string{"login", "--user", "alice", "--usersig-file", sigFile},
			wantStdout: "logged in as alice: LOGINED (1)\n",
			wantLogins: []string{"alice sig-from-file"},
		},
		{
			name:       "from standard input",
			stdin:      "sig-from-stdin\n",
			args:       []string{"login", "--user", "alice", "--usersig", "-"},
			wantStdout: "logged in as alice: LOGINED (1)\n",
			wantLogins: []string{"alice sig-from-stdin"},
		},
		{
			name:       "from the command line",
			args:       []string{"login", "--user", "alice", "--usersig", "sig-arg"},
			wantStdout: "logged in as alice: LOGINED (1)\n",
			wantLogins: []string{"alice sig-arg"},
		},
		{
			name:       "refused by the gateway",
			code:       70001,
			desc:       "UserSig expired at 09:05",
			args:       []string{"login", "--user", "alice", "--usersig", "sig-old"},
			wantCode:   exitFailure,
			wantStderr: []string{"login failed: code 70001 (UserSig expired): UserSig expired at 09:05", "hint: get a NEW UserSig, then log in"},
			wantLogins: []string{"alice sig-old"},
		},
		{
			name:       "refused, as JSON",
			code:       6208,
			desc:       "kicked",
			args:       []string{"login", "--json", "--user", "alice", "--usersig", "sig-xyz"},
			wantCode:   exitFailure,
			wantStderr: []string{"code 6208"},
			wantLogins: []string{"alice sig-xyz"},
		},
		{
			name:        "no user",
			args:        []string{"login", "--usersig", "sig-xyz"},
			wantCode:    exitUsage,
			wantStderr:  []string{"login needs --user"},
			wantNoLogin: true,
		},
		{
			name:        "no UserSig",
			args:        []string{"login", "--user", "alice"},
			wantCode:    exitUsage,
			wantStderr:  []string{"login needs the UserSig"},
			wantNoLogin: true,
		},
		{
			name:        "two UserSigs",
			args:        []string{"login", "--user", "alice", "--usersig", "sig-xyz", "--usersig-file", sigFile},
			wantCode:    exitUsage,
			wantNoLogin: true,
		},
		{
			name:        "empty standard input",
			stdin:       "\n",
			args:        []string{"login", "--user", "alice", "--usersig", "-"},
			wantCode:    exitUsage,
			wantStderr:  []string{"the UserSig is empty"},
			wantNoLogin: true,
		},
		{
			name:        "missing file",
			args:        []string{"login", "--user", "alice", "--usersig-file", sigFile + ".nope"},
			wantCode:    exitFailure,
			wantNoLogin: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeBackend()
			f.loginCode, f.loginDesc = tt.code, tt.desc
			sock := startDaemon(t, f)
			got := chatctl(context.Background(), sock, tt.stdin, tt.args...)
			if got.code != tt.wantCode {
				t.Errorf("exit code = %d, want %d (stderr %q)", got.code, tt.wantCode, got.stderr)
			}
			if tt.wantStdout != "" && got.stdout != tt.wantStdout {
				t.Errorf("stdout = %q, want %q", got.stdout, tt.wantStdout)
			}
			for _, s := range tt.wantStderr {
				if !strings.Contains(got.stderr, s) {
					t.Errorf("stderr %q lacks %q", got.stderr, s)
				}
			}
			if tt.wantNoLogin {
				tt.wantLogins = nil
			}
			if diff := cmp.Diff(tt.wantLogins, f.Logins()); diff != "" {
				t.Errorf("logins (-want +got):\n%s", diff)
			}
			for _, l := range f.Logins() {
				sig := strings.SplitN(l, " ", 2)[1]
				if strings.Contains(got.stdout+got.stderr, sig) {
					t.Errorf("the output shows the UserSig %q:\n%s%s", sig, got.stdout, got.stderr)
				}
			}
		})
	}
}

func TestLoginJSON(t *testing.T) {
	f := newFakeBackend()
	f.loginCode, f.loginDesc = 6208, "kicked"
	got := chatctl(context.Background(), startDaemon(t, f), "", "login", "--json", "--user", "alice", "--usersig", "s")
	var res client.Result[client.Status]
	if err := json.Unmarshal([]byte(got.stdout), &res); err != nil {
		t.Fatalf("stdout %q: %v", got.stdout, err)
	}
	if diff := cmp.Diff(client.Result[client.Status]{Code: 6208, Desc: "kicked", Data: testStatus()}, res); diff != "" {
		t.Errorf("result (-want +got):\n%s", diff)
	}
}

func TestLogout(t *testing.T) {
	got := chatctl(context.Background(), startDaemon(t, newFakeBackend()), "", "logout")
	if got.code != 0 || got.stdout != "logged out: LOGOUT (3)\n" {
		t.Errorf("logout = %d, %q, %q; want 0, \"logged out: LOGOUT (3)\\n\"", got.code, got.stdout, got.stderr)
	}
}

func TestWait(t *testing.T) {
	t.Run("already there", func(t *testing.T) {
		got := chatctl(context.Background(), startDaemon(t, newFakeBackend()), "", "wait", "--status", "logined")
		if got.code != 0 || got.stdout != "LOGINED (1)\n" {
			t.Errorf("wait = %d, %q, %q; want 0, \"LOGINED (1)\\n\"", got.code, got.stdout, got.stderr)
		}
	})
	t.Run("reaches the status by an event", func(t *testing.T) {
		f := newFakeBackend()
		f.setStatus(client.Logining)
		sock := startDaemon(t, f)
		done := make(chan result)
		go func() { done <- chatctl(context.Background(), sock, "", "wait", "--status", "1", "--timeout", "1m") }()
		<-f.subscribed
		f.setStatus(client.Logined)
		f.events <- client.Event{Type: client.EventLoginStatusChanged, Time: testNow, Status: client.Logined}
		got := <-done
		if got.code != 0 || got.stdout != "LOGINED (1)\n" {
			t.Errorf("wait = %d, %q, %q; want 0, \"LOGINED (1)\\n\"", got.code, got.stdout, got.stderr)
		}
	})
	t.Run("times out", func(t *testing.T) {
		f := newFakeBackend()
		f.setStatus(client.Logout)
		got := chatctl(context.Background(), startDaemon(t, f), "", "wait", "--status", "LOGINED", "--timeout", "300ms")
		want := "chatctl: timed out after 300ms waiting for LOGINED: the status is LOGOUT (3)\n"
		if got.code != exitFailure || !strings.HasPrefix(got.stderr, want) {
			t.Errorf("wait = %d, stderr %q; want %d, stderr starting %q", got.code, got.stderr, exitFailure, want)
		}
	})
	t.Run("daemon never reachable", func(t *testing.T) {
		sock := filepath.Join(t.TempDir(), "chatd.sock")
		got := chatctl(context.Background(), sock, "", "wait", "--status", "LOGINED", "--timeout", "300ms")
		if got.code != exitUnreachable || !strings.Contains(got.stderr, "is chatd running?") {
			t.Errorf("wait = %d, stderr %q; want %d and a hint", got.code, got.stderr, exitUnreachable)
		}
	})
	t.Run("bad status", func(t *testing.T) {
		got := chatctl(context.Background(), "", "", "wait", "--status", "ONLINE")
		if got.code != exitUsage {
			t.Errorf("exit code = %d, want %d", got.code, exitUsage)
		}
	})
}

func TestWatch(t *testing.T) {
	events := []client.Event{
		{Type: client.EventConnectFailed, Time: testNow.Add(time.Second), Code: 6206, Desc: "expired"},
		{Type: client.EventLoginStatusChanged, Time: testNow.Add(2 * time.Second), Status: client.Logout},
	}
	tests := []struct {
		name string
		args []string
		want string
	}{
		{
			name: "text",
			args: []string{"watch"},
			want: `2026-04-30 12:05:00 status LOGINED (1) user=alice connection=connected
2026-04-30 12:05:01 onConnectFailed code=6206 (UserSig expired (noticed on the device)) desc="expired"
2026-04-30 12:05:02 onLoginStatusChanged LOGOUT (3)
`,
		},
		{
			name: "json",
			args: []string{"watch", "--json"},
			want: `{"type":"status","time":"2026-04-30T12:05:00Z","status":{"login_status":1,"login_status_name":"LOGINED","user_id":"alice","connected":true,"connection":"connected","usersig_expires_at":"2026-05-01T12:00:00Z","server_time_offset":12,"clock_trusted":true,"last_error":{"code":0,"message":""},"since":"2026-04-30T12:00:00Z","session":"s-1","instance":"inst-1","broker":"tcp://gw:1883","phase":"Online","state_persisted":true}}
{"type":"onConnectFailed","time":"2026-04-30T12:05:01Z","code":6206,"desc":"expired"}
{"type":"onLoginStatusChanged","time":"2026-04-30T12:05:02Z","login_status":3}
`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeBackend()
			sock := startDaemon(t, f)
			done := make(chan result)
			go func() { done <- chatctl(context.Background(), sock, "", tt.args...) }()
			<-f.subscribed
			for _, ev := range events {
				f.events <- ev
			}
			close(f.events) // the daemon stops: the stream ends
			got := <-done
			if diff := cmp.Diff(tt.want, got.stdout); diff != "" {
				t.Errorf("stdout (-want +got):\n%s", diff)
			}
			if got.code != exitFailure || !strings.Contains(got.stderr, "the stream ended") {
				t.Errorf("exit code %d, stderr %q; want %d and a word that the stream ended", got.code, got.stderr, exitFailure)
			}
		})
	}
}

func TestUnreachable(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "chatd.sock")
	for _, args := range [][]string{{"status"}, {"logout"}, {"login", "--user", "a", "--usersig", "sig-xyz"}, {"watch"}} {
		t.Run(args[0], func(t *testing.T) {
			got := chatctl(context.Background(), sock, "", args...)
			wantHint := "chatctl: hint: is chatd running? (socket " + sock + " not found)\n"
			if got.code != exitUnreachable || !strings.HasSuffix(got.stderr, wantHint) {
				t.Errorf("exit code %d, stderr %q; want %d, stderr ending %q", got.code, got.stderr, exitUnreachable, wantHint)
			}
			if got.stdout != "" {
				t.Errorf("stdout = %q, want nothing", got.stdout)
			}
		})
	}
}

func TestUserSigDecode(t *testing.T) {
	key := usersig.NewSecret("test-key")
	sig, err := usersig.Generate(1400000001, key, "alice", 24*time.Hour, testNow.Add(-time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	wantJSON := `{
  "version": "2.0",
  "identifier": "alice",
  "sdkappid": 1400000001,
  "time": 1777547100,
  "issued_at": "2026-04-30T11:05:00Z",
  "expire": 86400,
  "expires_at": "2026-05-01T11:05:00Z",
  "expired": false
}
`
	tests := []struct {
		name       string
		stdin      string
		args       []string
		wantCode   int
		wantStdout string
		wantStderr string
	}{
		{name: "argument", args: []string{"usersig", "decode", sig}, wantStdout: wantJSON},
		{name: "standard input", stdin: sig + "\n", args: []string{"usersig", "decode", "-"}, wantStdout: wantJSON},
		{name: "after --", args: []string{"usersig", "decode", "--", sig}, wantStdout: wantJSON},
		{name: "malformed", args: []string{"usersig", "decode", "not-a-usersig"}, wantCode: exitFailure, wantStderr: "70003"},
		{name: "missing", args: []string{"usersig", "decode"}, wantCode: exitUsage},
		{name: "no subcommand", args: []string{"usersig"}, wantCode: exitUsage},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// No daemon: decoding is local.
			got := chatctl(context.Background(), filepath.Join(t.TempDir(), "none.sock"), tt.stdin, tt.args...)
			if got.code != tt.wantCode {
				t.Errorf("exit code = %d, want %d (stderr %q)", got.code, tt.wantCode, got.stderr)
			}
			if diff := cmp.Diff(tt.wantStdout, got.stdout); diff != "" {
				t.Errorf("stdout (-want +got):\n%s", diff)
			}
			if !strings.Contains(got.stderr, tt.wantStderr) {
				t.Errorf("stderr %q lacks %q", got.stderr, tt.wantStderr)
			}
			if strings.Contains(got.stdout, sig) {
				t.Errorf("the output holds the UserSig")
			}
		})
	}
}

func TestUsage(t *testing.T) {
	tests := []struct {
		name       string
		args       []string
		wantCode   int
		wantStdout string
	}{
		{"version", []string{"--version"}, 0, "chatctl devel\n"},
		{"no command", nil, exitUsage, ""},
		{"unknown command", []string{"frobnicate"}, exitUsage, ""},
		{"unknown flag", []string{"status", "--verbose"}, exitUsage, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := chatctl(context.Background(), "", "", tt.args...)
			if got.code != tt.wantCode || got.stdout != tt.wantStdout {
				t.Errorf("= %d, %q; want %d, %q (stderr %q)", got.code, got.stdout, tt.wantCode, tt.wantStdout, got.stderr)
			}
		})
	}
}
