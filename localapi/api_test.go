package localapi

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"chatd/client"
	"chatd/usersig"
)

// fakeBackend is a Backend whose answers the tests set.
type fakeBackend struct {
	mu         sync.Mutex
	status     client.Status
	serverTime client.ServerTime
	loginCode  int
	loginDesc  string
	// loginFunc, if set, replaces the canned login answer.
	loginFunc  func(ctx context.Context) (int, string)
	logoutCode int
	calls      []string // "Status", "Subscribe", "Login alice", "Logout"
	sigs       []string // the UserSigs Login was given

	events       chan client.Event
	unsubscribed chan struct{} // closed by the cancel func of Subscribe
	unsubOnce    sync.Once
}

var (
	testSince   = time.Date(2026, 4, 30, 12, 0, 0, 0, time.UTC)
	testExpires = time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	testNow     = time.Date(2026, 4, 30, 12, 5, 0, 0, time.UTC)
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
	}
}

func newFakeBackend() *fakeBackend {
	return &fakeBackend{
		status:       testStatus(),
		serverTime:   client.ServerTime{ServerTime: 1777550700, ServerTimeMs: 1777550700123, Known: true},
		events:       make(chan client.Event),
		unsubscribed: make(chan struct{}),
	}
}

func (f *fakeBackend) record(call string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, call)
}

func (f *fakeBackend) Calls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.calls...)
}

func (f *fakeBackend) Sigs() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.sigs...)
}

func (f *fakeBackend) Status() client.Status {
	f.record("Status")
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.status
}

func (f *fakeBackend) Login(ctx context.Context, user string, sig usersig.Secret) (int, string) {
	f.record("Login " + user)
	f.mu.Lock()
	f.sigs = append(f.sigs, sig.Reveal())
	fn, code, desc := f.loginFunc, f.loginCode, f.loginDesc
	f.mu.Unlock()
	if fn != nil {
		return fn(ctx)
	}
	return code, desc
}

func (f *fakeBackend) Logout(ctx context.Context) (int, string) {
	f.record("Logout")
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.logoutCode, ""
}

func (f *fakeBackend) Subscribe() (<-chan client.Event, func()) {
	f.record("Subscribe")
	return f.events, func() { f.unsubOnce.Do(func() { close(f.unsubscribed) }) }
}

func (f *fakeBackend) ServerTime() client.ServerTime {
	f.record("ServerTime")
	return f.serverTime
}

func (f *fakeBackend) WriteMetrics(w io.Writer) {
	io.WriteString(w, "chatd_login_status 1\n")
}

// syncBuffer is a bytes.Buffer safe for the server's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// testLogger logs everything, down to DEBUG, into buf.
func testLogger(buf *syncBuffer) *slog.Logger {
	return slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// startUnixAPI serves the API on a Unix socket in a new directory, through
// ListenSocket and Serve, and checks when the test ends that ServeAPI
// returns nil once its context is cancelled.
func startUnixAPI(t *testing.T, o Options) (sock string) {
	t.Helper()
	sock = filepath.Join(t.TempDir(), "chatd.sock")
	ln, err := ListenSocket(sock, -1)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- New(o).Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve after cancel = %v, want nil", err)
		}
	})
	return sock
}

// unixClient is an HTTP client that dials sock.
func unixClient(sock string) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}
}

type response struct {
	status int
	header http.Header
	body   string
}

func doRequest(t *testing.T, hc *http.Client, base, method, path, body string) response {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, base+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return response{resp.StatusCode, resp.Header, string(b)}
}

// jsonValue decodes JSON into a generic value, so that a body compares with
// a Go value by its JSON shape.
func jsonValue(t *testing.T, s string) any {
	t.Helper()
	var v any
	if err := json.Unmarshal([]byte(s), &v); err != nil {
		t.Fatalf("not JSON (%v): %q", err, s)
	}
	return v
}

func asJSONValue(t *testing.T, v any) any {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return jsonValue(t, string(b))
}

const endpointList = "the endpoints are GET /v1/status, GET /v1/login-user, GET /v1/login-status, " +
	"POST /v1/login, POST /v1/logout, GET /v1/events, GET /v1/server-time, GET /metrics"

const loginShape = `send {"user_id": "...", "user_sig": "..."}`

func TestAPIEndpoints(t *testing.T) {
	loggedOut := func(f *fakeBackend) {
		f.status.LoginStatus = client.Logout
		f.status.LoginStatusName = "LOGOUT"
		f.status.UserID = "alice" // a confused backend: login-user must still be ""
	}
	tests := []struct {
		name       string
		setup      func(*fakeBackend)
		method     string
		path       string
		body       string
		wantStatus int
		wantType   string
		want       any      // compared by JSON shape; a string is compared as text
		wantHeader []string // name, value pairs
		wantCalls  []string // nil: not checked
	}{
		{
			name:   "status",
			method: "GET", path: "/v1/status",
			wantStatus: 200, wantType: "application/json",
			want: testStatus(),
		},
		{
			name:   "login user while logged in",
			method: "GET", path: "/v1/login-user",
			wantStatus: 200, wantType: "application/json",
			want: client.Result[string]{Data: "alice"},
		},
		{
			name:   "login user while logged out is empty",
			setup:  loggedOut,
			method: "GET", path: "/v1/login-user",
			wantStatus: 200, wantType: "application/json",
			want: client.Result[string]{Data: ""},
		},
		{
			name:   "login status",
			setup:  loggedOut,
			method: "GET", path: "/v1/login-status",
			wantStatus: 200, wantType: "application/json",
			want: client.Result[int]{Data: 3},
		},
		{
			name:   "server time",
			method: "GET", path: "/v1/server-time",
			wantStatus: 200, wantType: "application/json",
			want: client.Result[client.ServerTime]{Data: client.ServerTime{ServerTime: 1777550700, ServerTimeMs: 1777550700123, Known: true}},
		},
		{
			name:   "metrics",
			method: "GET", path: "/metrics",
			wantStatus: 200, wantType: "text/plain; version=0.0.4",
			// The backend's metrics, then the API's own.
			want: "chatd_login_status 1\n" +
				"# HELP chatd_api_connections_open Connections to the API socket open now.\n" +
				"# TYPE chatd_api_connections_open gauge\n" +
				"chatd_api_connections_open 1\n" +
				"# HELP chatd_api_connections_refused_total Connections to the API socket refused with 503, by the limit reached (total or per_uid).\n" +
				"# TYPE chatd_api_connections_refused_total counter\n" +
				"chatd_api_connections_refused_total{limit=\"per_uid\"} 0\n" +
				"chatd_api_connections_refused_total{limit=\"total\"} 0\n" +
				"# HELP chatd_api_event_streams_open GET /v1/events streams open now.\n" +
				"# TYPE chatd_api_event_streams_open gauge\n" +
				"chatd_api_event_streams_open 0\n" +
				"# HELP chatd_api_event_streams_refused_total GET /v1/events streams refused with 503, by the limit reached (total or per_uid).\n" +
				"# TYPE chatd_api_event_streams_refused_total counter\n" +
				"chatd_api_event_streams_refused_total{limit=\"per_uid\"} 0\n" +
				"chatd_api_event_streams_refused_total{limit=\"total\"} 0\n",
		},
		{
			name:   "login succeeds",
			method: "POST", path: "/v1/login",
			body:       `{"user_id":"alice","user_sig":"sig-1"}`,
			wantStatus: 200, wantType: "application/json",
			want:      client.Result[client.Status]{Data: testStatus()},
			wantCalls: []string{"Login alice", "Status"},
		},
		{
			name:   "login fails with a code",
			setup:  func(f *fakeBackend) { f.loginCode, f.loginDesc = 70001, "UserSig expired" },
			method: "POST", path: "/v1/login",
			body:       `{"user_id":"alice","user_sig":"sig-1"}`,
			wantStatus: 200, wantType: "application/json",
			want: client.Result[client.Status]{Code: 70001, Desc: "UserSig expired", Data: testStatus()},
		},
		{
			name:   "logout",
			method: "POST", path: "/v1/logout",
			wantStatus: 200, wantType: "application/json",
			want:      client.Result[client.Status]{Data: testStatus()},
			wantCalls: []string{"Logout", "Status"},
		},
		{
			name:   "login with an empty body",
			method: "POST", path: "/v1/login",
			wantStatus: 400, wantType: "application/json",
			want:      client.APIError{Message: "the request body is empty", Hint: loginShape},
			wantCalls: []string{},
		},
		{
			name:   "login with truncated JSON",
			method: "POST", path: "/v1/login",
			body:       `{"user_id":"alice",`,
			wantStatus: 400,
			want:       client.APIError{Message: "malformed JSON: the request body ends early", Hint: loginShape},
			wantCalls:  []string{},
		},
		{
			name:   "login with a JSON syntax error",
			method: "POST", path: "/v1/login",
			body:       `{"user_id" "alice"}`,
			wantStatus: 400,
			want:       client.APIError{Message: "malformed JSON at byte 12", Hint: loginShape},
		},
		{
			name:   "login with an array",
			method: "POST", path: "/v1/login",
			body:       `["alice"]`,
			wantStatus: 400,
			want:       client.APIError{Message: "malformed login request: the body must be a JSON object", Hint: loginShape},
		},
		{
			name:   "login with a number for user_id",
			method: "POST", path: "/v1/login",
			body:       `{"user_id":7,"user_sig":"sig-1"}`,
			wantStatus: 400,
			want:       client.APIError{Message: "malformed login request: user_id must be a string", Hint: loginShape},
		},
		{
			name:   "login with an unknown field",
			method: "POST", path: "/v1/login",
			body:       `{"user_id":"alice","usersig":"sig-1"}`,
			wantStatus: 400,
			want:       client.APIError{Message: `unknown field "usersig" in the login request: only user_id and user_sig are accepted`, Hint: loginShape},
			wantCalls:  []string{},
		},
		{
			name:   "login with two JSON values",
			method: "POST", path: "/v1/login",
			body:       `{"user_id":"alice","user_sig":"sig-1"} {}`,
			wantStatus: 400,
			want:       client.APIError{Message: "malformed JSON: more than one value in the request body", Hint: loginShape},
		},
		{
			name:   "login without user_id",
			method: "POST", path: "/v1/login",
			body:       `{"user_sig":"sig-1"}`,
			wantStatus: 400,
			want:       client.APIError{Message: "user_id is missing or empty", Hint: loginShape},
			wantCalls:  []string{},
		},
		{
			name:   "login without user_sig",
			method: "POST", path: "/v1/login",
			body:       `{"user_id":"alice","user_sig":""}`,
			wantStatus: 400,
			want:       client.APIError{Message: "user_sig is missing or empty", Hint: loginShape},
		},
		{
			name:   "login without both",
			method: "POST", path: "/v1/login",
			body:       `{}`,
			wantStatus: 400,
			want:       client.APIError{Message: "user_id and user_sig are missing or empty", Hint: loginShape},
		},
		{
			name:   "login with an oversized body",
			method: "POST", path: "/v1/login",
			body:       `{"user_id":"alice","user_sig":"` + strings.Repeat("A", 17<<10) + `"}`,
			wantStatus: 413,
			want: client.APIError{
				Message: "request body is larger than 16384 bytes",
				Hint:    "a login request is a user_id and a UserSig, far smaller than that",
			},
			wantCalls: []string{},
		},
		{
			name:   "GET on login",
			method: "GET", path: "/v1/login",
			wantStatus: 405, wantType: "application/json",
			want:       client.APIError{Message: "method GET is not allowed on /v1/login", Hint: "use POST"},
			wantHeader: []string{"Allow", "POST"},
			wantCalls:  []string{},
		},
		{
			name:   "POST on status",
			method: "POST", path: "/v1/status",
			wantStatus: 405,
			want:       client.APIError{Message: "method POST is not allowed on /v1/status", Hint: "use GET"},
			wantHeader: []string{"Allow", "GET"},
		},
		{
			name:   "unknown path",
			method: "GET", path: "/v1/nope",
			wantStatus: 404, wantType: "application/json",
			want: client.APIError{Message: "no such endpoint GET /v1/nope", Hint: endpointList},
		},
		{
			name:   "trailing slash",
			method: "GET", path: "/v1/status/",
			wantStatus: 404,
			want:       client.APIError{Message: "no such endpoint GET /v1/status/", Hint: endpointList},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeBackend()
			if tt.setup != nil {
				tt.setup(f)
			}
			sock := startUnixAPI(t, Options{Backend: f, OperatorGID: -1, DaemonUID: os.Getuid()})
			got := doRequest(t, unixClient(sock), "http://chatd", tt.method, tt.path, tt.body)
			if got.status != tt.wantStatus {
				t.Errorf("HTTP status = %d, want %d (body %s)", got.status, tt.wantStatus, got.body)
			}
			if tt.wantType != "" {
				if ct := got.header.Get("Content-Type"); ct != tt.wantType {
					t.Errorf("Content-Type = %q, want %q", ct, tt.wantType)
				}
			}
			for i := 0; i+1 < len(tt.wantHeader); i += 2 {
				if v := got.header.Get(tt.wantHeader[i]); v != tt.wantHeader[i+1] {
					t.Errorf("%s = %q, want %q", tt.wantHeader[i], v, tt.wantHeader[i+1])
				}
			}
			if s, ok := tt.want.(string); ok {
				if diff := cmp.Diff(s, got.body); diff != "" {
					t.Errorf("body (-want +got):\n%s", diff)
				}
			} else if diff := cmp.Diff(asJSONValue(t, tt.want), jsonValue(t, got.body)); diff != "" {
				t.Errorf("body (-want +got):\n%s", diff)
			}
			if tt.wantCalls != nil {
				gotCalls := f.Calls()
				if gotCalls == nil {
					gotCalls = []string{}
				}
				if diff := cmp.Diff(tt.wantCalls, gotCalls); diff != "" {
					t.Errorf("backend calls (-want +got):\n%s", diff)
				}
			}
		})
	}
}

func TestAPILoginPassesTheUserSig(t *testing.T) {
	f := newFakeBackend()
	sock := startUnixAPI(t, Options{Backend: f, OperatorGID: -1, DaemonUID: os.Getuid()})
	doRequest(t, unixClient(sock), "http://chatd", "POST", "/v1/login", `{"user_id":"alice","user_sig":"eJy-sig_*"}`)
	if diff := cmp.Diff([]string{"eJy-sig_*"}, f.Sigs()); diff != "" {
		t.Errorf("UserSigs the backend got (-want +got):\n%s", diff)
	}
}

// A client that goes away cancels the context Backend.Login waits with.
func TestAPILoginClientGoesAway(t *testing.T) {
	f := newFakeBackend()
	started := make(chan struct{})
	loginErr := make(chan error, 1)
	f.loginFunc = func(ctx context.Context) (int, string) {
		close(started)
		<-ctx.Done()
		loginErr <- ctx.Err()
		return 7009, "interrupted"
	}
	sock := startUnixAPI(t, Options{Backend: f, OperatorGID: -1, DaemonUID: os.Getuid()})
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "POST", "http://chatd/v1/login", strings.NewReader(`{"user_id":"alice","user_sig":"s"}`))
	errc := make(chan error, 1)
	go func() {
		resp, err := unixClient(sock).Do(req)
		if err == nil {
			resp.Body.Close()
		}
		errc <- err
	}()
	<-started
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Errorf("client error = %v, want context.Canceled", err)
	}
	if err := <-loginErr; !errors.Is(err, context.Canceled) {
		t.Errorf("the backend's login context ended with %v, want context.Canceled", err)
	}
}

func TestAPIUserSigNeverLeaks(t *testing.T) {
	const sig = "eJyrVkrOz0ULEAKED-SIG_abc*"
	var logs syncBuffer
	f := newFakeBackend()
	f.loginCode, f.loginDesc = 70003, "UserSig check failed"
	opts := Options{Backend: f, Logger: testLogger(&logs), OperatorGID: -1, DaemonUID: os.Getuid()}
	unixSock := startUnixAPI(t, opts)
	// Over TCP nobody may log in: the 403 path.
	tcp := httptest.NewServer(New(opts))
	t.Cleanup(tcp.Close)

	bodies := map[string]string{
		"valid":                 `{"user_id":"alice","user_sig":"` + sig + `"}`,
		"truncated":             `{"user_id":"alice","user_sig":"` + sig,
		"syntax error after it": `{"user_id":"alice","user_sig":"` + sig + `" x}`,
		"syntax error in it":    `{"user_id":"alice","user_sig":"` + sig + "\x01" + `"}`,
		"as a number":           `{"user_id":"alice","user_sig":` + "1" + `, "x":"` + sig + `"}`,
		"unknown field value":   `{"user_id":"alice","usersig":"` + sig + `"}`,
		"no user_id":            `{"user_sig":"` + sig + `"}`,
		"oversized":             `{"user_id":"alice","user_sig":"` + sig + strings.Repeat("A", 20<<10) + `"}`,
		"two values":            `{"user_id":"alice","user_sig":"a"} "` + sig + `"`,
		"wrong type":            `{"user_id":"` + sig + `","user_sig":{"x":"` + sig + `"}}`,
	}
	for name, body := range bodies {
		for _, srv := range []struct {
			name string
			hc   *http.Client
			base string
		}{
			{"unix", unixClient(unixSock), "http://chatd"},
			{"tcp", tcp.Client(), tcp.URL},
		} {
			t.Run(name+" over "+srv.name, func(t *testing.T) {
				got := doRequest(t, srv.hc, srv.base, "POST", "/v1/login", body)
				if strings.Contains(got.body, sig) || strings.Contains(fmt.Sprint(got.header), sig) {
					t.Errorf("the response (%d) contains the UserSig: %v %s", got.status, got.header, got.body)
				}
			})
		}
	}
	if len(f.Sigs()) == 0 || f.Sigs()[0] != sig {
		t.Errorf("the backend got UserSigs %q, want the test's", f.Sigs())
	}
	out := logs.String()
	if strings.Contains(out, sig) {
		t.Errorf("the log contains the UserSig:\n%s", out)
	}
	for _, want := range []string{"outcome=done", "code=70003", "outcome=denied", "outcome=\"bad request\"", fmt.Sprintf("uid=%d", os.Getuid()), "pid="} {
		if !strings.Contains(out, want) {
			t.Errorf("the log lacks %q:\n%s", want, out)
		}
	}
}

func TestAPITrustNonUnix(t *testing.T) {
	tests := []struct {
		name         string
		trust        bool
		method, path string
		body         string
		wantStatus   int
		want         any
	}{
		{"read without peer credentials", false, "GET", "/v1/login-status", "", 200, client.Result[int]{Data: 1}},
		{"login without peer credentials", false, "POST", "/v1/login", `{"user_id":"a","user_sig":"b"}`, 403, client.APIError{
			Message: permissionDenied,
			Hint:    "the caller's identity is unknown (not a Unix socket connection): use chatd's Unix socket",
		}},
		{"logout without peer credentials", false, "POST", "/v1/logout", "", 403, client.APIError{
			Message: permissionDenied,
			Hint:    "the caller's identity is unknown (not a Unix socket connection): use chatd's Unix socket",
		}},
		{"login trusted", true, "POST", "/v1/login", `{"user_id":"a","user_sig":"b"}`, 200, client.Result[client.Status]{Data: testStatus()}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := httptest.NewServer(New(Options{Backend: newFakeBackend(), OperatorGID: -1, DaemonUID: os.Getuid(), TrustNonUnix: tt.trust}))
			defer srv.Close()
			got := doRequest(t, srv.Client(), srv.URL, tt.method, tt.path, tt.body)
			if got.status != tt.wantStatus {
				t.Errorf("HTTP status = %d, want %d", got.status, tt.wantStatus)
			}
			if diff := cmp.Diff(asJSONValue(t, tt.want), jsonValue(t, got.body)); diff != "" {
				t.Errorf("body (-want +got):\n%s", diff)
			}
		})
	}
}

func TestAPIEvents(t *testing.T) {
	openStream := func(t *testing.T, f *fakeBackend) (*bufio.Reader, *http.Response, context.CancelFunc) {
		t.Helper()
		sock := startUnixAPI(t, Options{Backend: f, OperatorGID: -1, DaemonUID: os.Getuid(), Now: func() time.Time { return testNow }})
		ctx, cancel := context.WithCancel(context.Background())
		t.Cleanup(cancel)
		req, _ := http.NewRequestWithContext(ctx, "GET", "http://chatd/v1/events", nil)
		resp, err := unixClient(sock).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { resp.Body.Close() })
		if got, want := resp.Header.Get("Content-Type"), "application/x-ndjson"; got != want {
			t.Errorf("Content-Type = %q, want %q", got, want)
		}
		return bufio.NewReader(resp.Body), resp, cancel
	}
	readEvent := func(t *testing.T, r *bufio.Reader) client.Event {
		t.Helper()
		line, err := r.ReadBytes('\n')
		if err != nil {
			t.Fatalf("reading an event: %v", err)
		}
		var ev client.Event
		if err := json.Unmarshal(line, &ev); err != nil {
			t.Fatalf("event %q: %v", line, err)
		}
		return ev
	}
	st := testStatus()
	snapshot := client.Event{Type: client.EventStatus, Time: testNow, Snapshot: &st}
	later := []client.Event{
		{Type: client.EventConnectFailed, Time: testNow.Add(time.Second), Code: 6206, Desc: "UserSig expired"},
		{Type: client.EventLoginStatusChanged, Time: testNow.Add(2 * time.Second), Status: client.Logout},
	}

	t.Run("snapshot first, then events, until the client goes away", func(t *testing.T) {
		f := newFakeBackend()
		r, _, cancel := openStream(t, f)
		if diff := cmp.Diff(snapshot, readEvent(t, r)); diff != "" {
			t.Errorf("first event (-want +got):\n%s", diff)
		}
		if diff := cmp.Diff([]string{"Subscribe", "Status"}, f.Calls()); diff != "" {
			t.Errorf("backend calls (-want +got): subscribe before the snapshot\n%s", diff)
		}
		for _, want := range later {
			f.events <- want // unbuffered: the handler is listening
			if diff := cmp.Diff(want, readEvent(t, r)); diff != "" {
				t.Errorf("event (-want +got):\n%s", diff)
			}
		}
		cancel()
		<-f.unsubscribed // the handler returned and cancelled its subscription
	})

	t.Run("ends when the backend closes the channel", func(t *testing.T) {
		f := newFakeBackend()
		r, _, _ := openStream(t, f)
		readEvent(t, r)
		close(f.events)
		if rest, err := io.ReadAll(r); err != nil || len(rest) != 0 {
			t.Errorf("after close: read %q, %v; want the stream to end cleanly", rest, err)
		}
		<-f.unsubscribed
	})

	t.Run("lines are one JSON object each", func(t *testing.T) {
		f := newFakeBackend()
		r, _, _ := openStream(t, f)
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		if strings.Count(line, "\n") != 1 || !strings.HasPrefix(line, `{"type":"status"`) {
			t.Errorf("first line = %q, want one compact JSON object", line)
		}
	})
}

// Serve ends open event streams when its context ends and returns nil.
func TestServeShutdownEndsStreams(t *testing.T) {
	f := newFakeBackend()
	sock := filepath.Join(t.TempDir(), "chatd.sock")
	ln, err := ListenSocket(sock, -1)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- New(Options{Backend: f, OperatorGID: -1, DaemonUID: -1}).Serve(ctx, ln) }()
	resp, err := unixClient(sock).Get("http://chatd/v1/events")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if _, err := bufio.NewReader(resp.Body).ReadBytes('\n'); err != nil {
		t.Fatal(err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Serve = %v, want nil", err)
	}
	<-f.unsubscribed
	if _, err := os.Lstat(sock); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("after shutdown, Lstat(socket) = %v, want it removed", err)
	}
}

func TestListenSocket(t *testing.T) {
	t.Run("creates the directory and makes the socket 0660", func(t *testing.T) {
		sock := filepath.Join(t.TempDir(), "run", "chatd", "chatd.sock")
		ln, err := ListenSocket(sock, -1)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		fi, err := os.Lstat(sock)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Type() != fs.ModeSocket || fi.Mode().Perm() != 0o660 {
			t.Errorf("socket mode = %v, want a socket with 0660", fi.Mode())
		}
		di, err := os.Stat(filepath.Dir(sock))
		if err != nil {
			t.Fatal(err)
		}
		if !di.IsDir() || di.Mode().Perm()&0o022 != 0 {
			t.Errorf("directory mode = %v, want a directory only its owner writes", di.Mode())
		}
	})
	t.Run("replaces a stale socket", func(t *testing.T) {
		sock := filepath.Join(t.TempDir(), "chatd.sock")
		old, err := net.Listen("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		old.(*net.UnixListener).SetUnlinkOnClose(false)
		old.Close()
		ln, err := ListenSocket(sock, -1)
		if err != nil {
			t.Fatalf("ListenSocket over a stale socket: %v", err)
		}
		ln.Close()
	})
	t.Run("refuses a socket in use", func(t *testing.T) {
		sock := filepath.Join(t.TempDir(), "chatd.sock")
		live, err := net.Listen("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		defer live.Close()
		if ln, err := ListenSocket(sock, -1); err == nil || !strings.Contains(err.Error(), "already running") {
			if ln != nil {
				ln.Close()
			}
			t.Errorf("ListenSocket over a live socket = %v, want an error saying chatd is already running", err)
		}
	})
	t.Run("refuses what is not a socket", func(t *testing.T) {
		sock := filepath.Join(t.TempDir(), "chatd.sock")
		if err := os.WriteFile(sock, []byte("keep me"), 0o600); err != nil {
			t.Fatal(err)
		}
		if ln, err := ListenSocket(sock, -1); err == nil || !strings.Contains(err.Error(), "not a socket") {
			if ln != nil {
				ln.Close()
			}
			t.Errorf("ListenSocket over a file = %v, want an error saying it is not a socket", err)
		}
		if b, _ := os.ReadFile(sock); string(b) != "keep me" {
			t.Errorf("the file was changed to %q", b)
		}
	})
	t.Run("gives the socket to the group", func(t *testing.T) {
		if os.Geteuid() != 0 {
			t.Skip("changing a socket's group to one we are not in needs root")
		}
		sock := filepath.Join(t.TempDir(), "chatd.sock")
		ln, err := ListenSocket(sock, 65534)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		fi, err := os.Lstat(sock)
		if err != nil {
			t.Fatal(err)
		}
		if gid := fi.Sys().(*syscall.Stat_t).Gid; gid != 65534 {
			t.Errorf("socket gid = %d, want 65534", gid)
		}
	})
}

func TestParseProcStatus(t *testing.T) {
	tests := []struct {
		name       string
		text       string
		wantUID    uint32
		wantGroups []uint32
		wantErr    bool
	}{
		{
			name:       "groups",
			text:       "Name:\tcat\nUid:\t1000\t1001\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\nGroups:\t4 24 1000 \nNgid:\t0\n",
			wantUID:    1001,
			wantGroups: []uint32{4, 24, 1000},
		},
		{
			name:    "no groups",
			text:    "Uid:\t0\t0\t0\t0\nGroups:\t\n",
			wantUID: 0,
		},
		{name: "no Groups line", text: "Uid:\t0\t0\t0\t0\n", wantErr: true},
		{name: "no Uid line", text: "Groups:\t1\n", wantErr: true},
		{name: "garbage in Groups", text: "Uid:\t0\t0\t0\t0\nGroups:\t1 x\n", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			uid, groups, err := parseProcStatus([]byte(tt.text))
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, want error %v", err, tt.wantErr)
			}
			if tt.wantErr {
				return
			}
			if uid != tt.wantUID {
				t.Errorf("uid = %d, want %d", uid, tt.wantUID)
			}
			if diff := cmp.Diff(tt.wantGroups, groups); diff != "" {
				t.Errorf("groups (-want +got):\n%s", diff)
			}
		})
	}
}

func TestPeerInGroup(t *testing.T) {
	dir := t.TempDir()
	orig := procStatusPath
	procStatusPath = func(pid int32) string { return filepath.Join(dir, strconv.Itoa(int(pid))) }
	t.Cleanup(func() { procStatusPath = orig })
	write := func(pid int, text string) {
		if err := os.WriteFile(filepath.Join(dir, strconv.Itoa(pid)), []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(10, "Uid:\t1000\t1000\t1000\t1000\nGroups:\t27 1000\n")
	write(11, "Uid:\t2000\t2000\t2000\t2000\nGroups:\t27\n") // the pid now belongs to someone else
	tests := []struct {
		name string
		pc   PeerCred
		gid  int
		want bool
	}{
		{"primary group", PeerCred{PID: 99, UID: 1000, GID: 27}, 27, true},
		{"supplementary group", PeerCred{PID: 10, UID: 1000, GID: 1000}, 27, true},
		{"not a member", PeerCred{PID: 10, UID: 1000, GID: 1000}, 28, false},
		{"pid reused by another uid", PeerCred{PID: 11, UID: 1000, GID: 1000}, 27, false},
		{"status unreadable", PeerCred{PID: 12, UID: 1000, GID: 1000}, 27, false},
		{"no operator group", PeerCred{PID: 10, UID: 1000, GID: 1000}, -1, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := peerInGroup(tt.pc, tt.gid); got != tt.want {
				t.Errorf("peerInGroup(%+v, %d) = %v, want %v", tt.pc, tt.gid, got, tt.want)
			}
		})
	}
}

func TestAPIPermissionHint(t *testing.T) {
	root, err := user.LookupGroupId("0")
	if err != nil {
		t.Skipf("no name for gid 0: %v", err)
	}
	tests := []struct {
		name string
		gid  int
		want string
	}{
		{"named group", 0, "add yourself to group " + root.Name + ": sudo usermod -aG " + root.Name + " $USER, then log in again"},
		{"no operator group", -1, "no operator group is configured: run it as root (sudo), or set api.operator_group in chatd's config"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := New(Options{OperatorGID: tt.gid})
			if got := a.permissionHint(); got != tt.want {
				t.Errorf("permissionHint() = %q, want %q", got, tt.want)
			}
		})
	}
}

// Environment of the helper process that TestAPIPeerPermissions runs as
// another user.
const (
	helperEnv       = "CHATD_API_TEST_HELPER"
	helperSocketEnv = "CHATD_API_TEST_SOCKET"
	helperMethodEnv = "CHATD_API_TEST_METHOD"
	helperPathEnv   = "CHATD_API_TEST_PATH"
	helperBodyEnv   = "CHATD_API_TEST_BODY"
)

// helperResult is what the helper process prints.
type helperResult struct {
	Status int    `json:"status"`
	Body   string `json:"body"`
}

// TestAPIPeerHelperProcess is not a test: it is the tiny client that
// TestAPIPeerPermissions runs as another uid (a copy of this test binary).
func TestAPIPeerHelperProcess(t *testing.T) {
	if os.Getenv(helperEnv) != "1" {
		return
	}
	var body io.Reader
	if b := os.Getenv(helperBodyEnv); b != "" {
		body = strings.NewReader(b)
	}
	req, err := http.NewRequest(os.Getenv(helperMethodEnv), "http://chatd"+os.Getenv(helperPathEnv), body)
	if err == nil {
		var resp *http.Response
		resp, err = unixClient(os.Getenv(helperSocketEnv)).Do(req)
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			json.NewEncoder(os.Stdout).Encode(helperResult{resp.StatusCode, string(b)})
			os.Exit(0)
		}
	}
	fmt.Fprintln(os.Stderr, "helper:", err)
	os.Exit(1)
}

func TestAPIPeerPermissions(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skipf("running a client as another uid needs root (euid is %d); run the tests as root to check peer-credential permissions", os.Geteuid())
	}
	const (
		nobody    = 65534
		daemonUID = 65533
		opGID     = 64242 // the operator group; need not exist
	)
	dir := t.TempDir()
	// The unprivileged helper must reach the socket and its binary: the
	// test's directory is 0700 (and so is its parent, made by t.TempDir).
	if err := os.Chmod(filepath.Dir(dir), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	helper := filepath.Join(dir, "api.test")
	copyExecutable(t, helper)

	var logs syncBuffer
	f := newFakeBackend()
	opts := Options{Backend: f, Logger: testLogger(&logs), OperatorGID: opGID, DaemonUID: daemonUID}
	sock := filepath.Join(dir, "chatd.sock")
	ln, err := ListenSocket(sock, -1)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(sock, 0o666); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- New(opts).Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve = %v", err)
		}
	})

	denied := client.APIError{Message: permissionDenied, Hint: New(opts).permissionHint()}
	if !strings.Contains(denied.Hint, "sudo usermod -aG") {
		t.Errorf("the hint %q does not say how to join the group", denied.Hint)
	}
	const loginBody = `{"user_id":"alice","user_sig":"sig-1"}`
	ok := client.Result[client.Status]{Data: testStatus()}
	tests := []struct {
		name       string
		cred       *syscall.Credential // nil: this process (root)
		method     string
		path       string
		body       string
		wantStatus int
		want       any
	}{
		{"root may log in", nil, "POST", "/v1/login", loginBody, 200, ok},
		{"root may log out", nil, "POST", "/v1/logout", "", 200, ok},
		{"nobody may read the status", &syscall.Credential{Uid: nobody, Gid: nobody}, "GET", "/v1/status", "", 200, testStatus()},
		{"nobody may read the login status", &syscall.Credential{Uid: nobody, Gid: nobody}, "GET", "/v1/login-status", "", 200, client.Result[int]{Data: 1}},
		{"nobody may not log in", &syscall.Credential{Uid: nobody, Gid: nobody}, "POST", "/v1/login", loginBody, 403, denied},
		{"nobody may not log out", &syscall.Credential{Uid: nobody, Gid: nobody}, "POST", "/v1/logout", "", 403, denied},
		{"nobody in other groups may not log in", &syscall.Credential{Uid: nobody, Gid: nobody, Groups: []uint32{opGID + 1}}, "POST", "/v1/login", loginBody, 403, denied},
		{"a supplementary operator may log in", &syscall.Credential{Uid: nobody, Gid: nobody, Groups: []uint32{100, opGID}}, "POST", "/v1/login", loginBody, 200, ok},
		{"a primary operator may log out", &syscall.Credential{Uid: nobody, Gid: opGID}, "POST", "/v1/logout", "", 200, ok},
		{"the daemon's uid may log in", &syscall.Credential{Uid: daemonUID, Gid: daemonUID}, "POST", "/v1/login", loginBody, 200, ok},
	}
	t.Run("requests", func(t *testing.T) {
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				t.Parallel() // each helper takes a second to start
				var got helperResult
				if tt.cred == nil {
					r := doRequest(t, unixClient(sock), "http://chatd", tt.method, tt.path, tt.body)
					got = helperResult{r.status, r.body}
				} else {
					got = runHelper(t, helper, tt.cred, sock, tt.method, tt.path, tt.body)
				}
				if got.Status != tt.wantStatus {
					t.Errorf("HTTP status = %d, want %d (body %s)", got.Status, tt.wantStatus, got.Body)
				}
				if diff := cmp.Diff(asJSONValue(t, tt.want), jsonValue(t, got.Body)); diff != "" {
					t.Errorf("body (-want +got):\n%s", diff)
				}
			})
		}
	})
	out := logs.String()
	for _, want := range []string{"outcome=denied", fmt.Sprintf("uid=%d", nobody)} {
		if !strings.Contains(out, want) {
			t.Errorf("the log lacks %q:\n%s", want, out)
		}
	}
}

// copyExecutable copies this test binary to path, mode 0755, so that
// another uid can run it (go test's build directory is private).
func copyExecutable(t *testing.T, path string) {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Skipf("cannot find the test binary to re-run as another user: %v", err)
	}
	src, err := os.Open(self)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		dst.Close()
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
}

// runHelper runs the helper process as cred and returns its answer.
func runHelper(t *testing.T, helper string, cred *syscall.Credential, sock, method, path, body string) helperResult {
	t.Helper()
	cmd := exec.Command(helper, "-test.run=^TestAPIPeerHelperProcess$")
	cmd.Dir = filepath.Dir(helper)
	cmd.Env = []string{
		"PATH=/usr/bin:/bin",
		helperEnv + "=1",
		helperSocketEnv + "=" + sock,
		helperMethodEnv + "=" + method,
		helperPathEnv + "=" + path,
		helperBodyEnv + "=" + body,
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		if errors.Is(err, fs.ErrPermission) {
			t.Skipf("cannot run the helper as uid %d (a noexec temp directory?): %v", cred.Uid, err)
		}
		t.Fatalf("helper as uid %d: %v\n%s", cred.Uid, err, stderr.String())
	}
	var res helperResult
	if err := json.Unmarshal(stdout.Bytes(), &res); err != nil {
		t.Fatalf("helper output %q: %v\n%s", stdout.String(), err, stderr.String())
	}
	return res
}
