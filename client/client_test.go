package client

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// serveUnix serves h on a Unix socket in a new directory and returns the
// socket's path.
func serveUnix(t *testing.T, h http.Handler) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "chatd.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(h)
	srv.Listener.Close()
	srv.Listener = ln
	srv.Start()
	t.Cleanup(srv.Close)
	return sock
}

var (
	testSince   = time.Date(2026, 4, 30, 12, 0, 0, 0, time.UTC)
	testExpires = time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
)

func testStatus() Status {
	exp := testExpires
	return Status{
		LoginStatus:      Logined,
		LoginStatusName:  "LOGINED",
		UserID:           "alice",
		Connected:        true,
		Connection:       "connected",
		UserSigExpiresAt: &exp,
		ServerTimeOffset: -40,
		ClockTrusted:     true,
		LastError:        ErrorInfo{Code: 6206, Message: "UserSig expired"},
		Since:            testSince,
		Instance:         "inst-1",
	}
}

// fakeAPI answers like chatd, with canned values, and records the login
// requests it gets.
type fakeAPI struct {
	mu     sync.Mutex
	logins []LoginRequest
}

func (f *fakeAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	write := func(code int, v any) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(code)
		json.NewEncoder(w).Encode(v)
	}
	switch r.Method + " " + r.URL.Path {
	case "GET /v1/status":
		write(200, testStatus())
	case "GET /v1/login-user":
		write(200, Result[string]{Data: "alice"})
	case "GET /v1/login-status":
		write(200, Result[int]{Data: 2})
	case "GET /v1/server-time":
		write(200, Result[ServerTime]{Data: ServerTime{ServerTime: 1777550700, ServerTimeMs: 1777550700123, Known: true}})
	case "GET /metrics":
		w.Header().Set("Content-Type", "text/plain; version=0.0.4")
		io.WriteString(w, "chatd_up 1\n")
	case "POST /v1/login":
		var req LoginRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			write(400, APIError{Message: err.Error()})
			return
		}
		f.mu.Lock()
		f.logins = append(f.logins, req)
		f.mu.Unlock()
		if req.UserID == "mallory" {
			write(403, APIError{Message: "permission denied", Hint: "add yourself to group chatd-operators"})
			return
		}
		code, desc := 0, ""
		if req.UserSig == "expired" {
			code, desc = 70001, "UserSig expired"
		}
		write(200, Result[Status]{Code: code, Desc: desc, Data: testStatus()})
	case "POST /v1/logout":
		st := testStatus()
		st.LoginStatus, st.UserID = Logout, ""
		write(200, Result[Status]{Data: st})
	case "GET /v1/broken":
		w.WriteHeader(http.StatusBadGateway)
		io.WriteString(w, "<html>proxy says no</html>\n")
	default:
		write(404, APIError{Message: "no such endpoint", Hint: "see docs/api.md"})
	}
}

func TestClientCalls(t *testing.T) {
	f := &fakeAPI{}
	c := New(serveUnix(t, f))
	ctx := context.Background()
	loggedOut := testStatus()
	loggedOut.LoginStatus, loggedOut.UserID = Logout, ""
	tests := []struct {
		name string
		call func() (any, error)
		want any
	}{
		{"Status", func() (any, error) { return c.Status(ctx) }, testStatus()},
		{"LoginUser", func() (any, error) { return c.LoginUser(ctx) }, "alice"},
		{"LoginStatus", func() (any, error) { return c.LoginStatus(ctx) }, Logining},
		{"ServerTime", func() (any, error) { return c.ServerTime(ctx) }, ServerTime{ServerTime: 1777550700, ServerTimeMs: 1777550700123, Known: true}},
		{"Metrics", func() (any, error) { return c.Metrics(ctx) }, "chatd_up 1\n"},
		{"Login", func() (any, error) { return c.Login(ctx, "alice", "good") }, Result[Status]{Data: testStatus()}},
		{"Login failing is a result, not an error", func() (any, error) { return c.Login(ctx, "alice", "expired") },
			Result[Status]{Code: 70001, Desc: "UserSig expired", Data: testStatus()}},
		{"Logout", func() (any, error) { return c.Logout(ctx) }, Result[Status]{Data: loggedOut}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.call()
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
	wantLogins := []LoginRequest{{UserID: "alice", UserSig: "good"}, {UserID: "alice", UserSig: "expired"}}
	if diff := cmp.Diff(wantLogins, f.logins); diff != "" {
		t.Errorf("login requests (-want +got):\n%s", diff)
	}
}

func TestClientAPIErrors(t *testing.T) {
	c := New(serveUnix(t, &fakeAPI{}))
	ctx := context.Background()
	tests := []struct {
		name string
		call func() error
		want *APIError
	}{
		{"403 with a hint", func() error { _, err := c.Login(ctx, "mallory", "x"); return err },
			&APIError{HTTPStatus: 403, Message: "permission denied", Hint: "add yourself to group chatd-operators"}},
		{"404", func() error { return c.call(ctx, readTimeout, "GET", "/v1/nope", nil, new(any)) },
			&APIError{HTTPStatus: 404, Message: "no such endpoint", Hint: "see docs/api.md"}},
		{"not JSON", func() error { return c.call(ctx, readTimeout, "GET", "/v1/broken", nil, new(any)) },
			&APIError{HTTPStatus: 502, Message: "502 Bad Gateway: <html>proxy says no</html>"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.call()
			var got *APIError
			if !errors.As(err, &got) {
				t.Fatalf("error = %v (%T), want an *APIError", err, err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

func TestClientConnErrors(t *testing.T) {
	dir := t.TempDir()
	stale := filepath.Join(dir, "stale.sock")
	ln, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	missing := filepath.Join(dir, "missing.sock")
	tests := []struct {
		name     string
		sock     string
		wantHint string
	}{
		{"socket missing", missing, "is chatd running? (socket " + missing + " not found)"},
		{"nobody listening", stale, "is chatd running? (nothing is listening on " + stale + ")"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := New(tt.sock).Status(context.Background())
			var ce *ConnError
			if !errors.As(err, &ce) {
				t.Fatalf("error = %v (%T), want a *ConnError", err, err)
			}
			if ce.Hint != tt.wantHint || ce.Socket != tt.sock {
				t.Errorf("ConnError = {Socket %q, Hint %q}, want {%q, %q}", ce.Socket, ce.Hint, tt.sock, tt.wantHint)
			}
			if !strings.HasSuffix(err.Error(), tt.wantHint) {
				t.Errorf("Error() = %q, want it to end with the hint", err)
			}
		})
	}
}

// Root opens any socket, so the permission case is checked on the error
// the dialer returns.
func TestConnErrorPermissionHint(t *testing.T) {
	c := New("/run/chatd/chatd.sock")
	dial := &net.OpError{Op: "dial", Net: "unix", Err: os.NewSyscallError("connect", syscall.EACCES)}
	err := c.connError(dial)
	var ce *ConnError
	if !errors.As(err, &ce) {
		t.Fatalf("connError = %v, want a *ConnError", err)
	}
	want := "no permission to open /run/chatd/chatd.sock: add yourself to the socket's group (see `ls -l /run/chatd/chatd.sock`)"
	if ce.Hint != want {
		t.Errorf("hint = %q, want %q", ce.Hint, want)
	}
	if !errors.Is(err, syscall.EACCES) {
		t.Errorf("the ConnError does not wrap EACCES")
	}
	other := errors.New("read: connection reset")
	if got := c.connError(other); got != other {
		t.Errorf("connError(%v) = %v, want it unchanged (not a dial error)", other, got)
	}
}

func TestClientEvents(t *testing.T) {
	st := testStatus()
	events := []Event{
		{Type: EventStatus, Time: testSince, Snapshot: &st},
		{Type: EventConnectFailed, Time: testSince.Add(time.Second), Code: 6206, Desc: "expired"},
		{Type: EventLoginStatusChanged, Time: testSince.Add(2 * time.Second), Status: Logout},
	}
	more := make(chan struct{}) // closed: the handler may end the stream
	sock := serveUnix(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/x-ndjson")
		enc := json.NewEncoder(w)
		for _, ev := range events {
			enc.Encode(ev)
		}
		w.(http.Flusher).Flush()
		select {
		case <-more:
		case <-r.Context().Done():
		}
	}))
	c := New(sock)

	t.Run("decodes, and ends without error when cancelled", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		var got []Event
		for ev, err := range c.Events(ctx) {
			if err != nil {
				t.Fatalf("Events: %v", err)
			}
			got = append(got, ev)
			if len(got) == len(events) {
				cancel()
			}
		}
		if diff := cmp.Diff(events, got); diff != "" {
			t.Errorf("events (-want +got):\n%s", diff)
		}
	})
	t.Run("raw lines", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		var got []string
		for line, err := range c.EventLines(ctx) {
			if err != nil {
				t.Fatalf("EventLines: %v", err)
			}
			got = append(got, string(line))
			if len(got) == len(events) {
				break
			}
		}
		var want []string
		for _, ev := range events {
			b, _ := json.Marshal(ev)
			want = append(want, string(b))
		}
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("lines (-want +got):\n%s", diff)
		}
	})
	t.Run("the daemon ending the stream is an error", func(t *testing.T) {
		close(more)
		var n int
		var last error
		for _, err := range c.Events(context.Background()) {
			if err != nil {
				last = err
				break
			}
			n++
		}
		if n != len(events) || !errors.Is(last, io.ErrUnexpectedEOF) {
			t.Errorf("got %d events, then %v; want %d, then io.ErrUnexpectedEOF", n, last, len(events))
		}
	})
	t.Run("socket missing", func(t *testing.T) {
		var last error
		for _, err := range New(filepath.Join(t.TempDir(), "none.sock")).Events(context.Background()) {
			last = err
		}
		var ce *ConnError
		if !errors.As(last, &ce) {
			t.Errorf("error = %v, want a *ConnError", last)
		}
	})
}
