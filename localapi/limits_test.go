package localapi

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"chatd/client"
)

// roomy are limits that no test below reaches unless it sets a field.
var roomy = Limits{
	MaxConns: 512, MaxConnsPerUID: 512, MaxStreams: 512, MaxStreamsPerUID: 512,
	HeaderTimeout: time.Minute, BodyTimeout: time.Minute, WriteTimeout: time.Minute, IdleTimeout: time.Minute,
}

// startLimited serves the API with limits l over f and returns the socket
// and the server (for its metrics).
func startLimited(t testing.TB, f *fakeBackend, l Limits) (string, *Server) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "chatd.sock")
	ln, err := ListenSocket(sock, -1)
	if err != nil {
		t.Fatal(err)
	}
	var logs syncBuffer
	srv := New(Options{Backend: f, Logger: testLogger(&logs), OperatorGID: -1, DaemonUID: os.Getuid(), Limits: l})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve after cancel = %v, want nil", err)
		}
		if t.Failed() {
			t.Logf("the server's log:\n%s", logs.String())
		}
	})
	return sock, srv
}

// mustStatus checks that GET /v1/status answers 200 now.
func mustStatus(t *testing.T, sock, when string) {
	t.Helper()
	if got := doRequest(t, oneShotClient(sock), "http://chatd", "GET", "/v1/status", ""); got.status != http.StatusOK {
		t.Errorf("%s: GET /v1/status: HTTP %d %s", when, got.status, got.body)
	}
}

// oneShotClient is an HTTP client on sock that keeps no connection open
// after a request (so that it holds no slot).
func oneShotClient(sock string) *http.Client {
	hc := unixClient(sock)
	hc.Transport.(*http.Transport).DisableKeepAlives = true
	hc.Timeout = 5 * time.Second
	return hc
}

// waitFor polls cond (the state it waits for is reached by another
// goroutine of the server) until it holds or 5 s have passed.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestLimitsDefaults(t *testing.T) {
	got := Limits{MaxStreams: 3, IdleTimeout: -1}.withDefaults()
	want := DefaultLimits
	want.MaxStreams = 3
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("withDefaults (-want +got):\n%s", diff)
	}
}

// 200 callers of one uid ask for an event stream at once: exactly the
// per-uid cap get one, every other one a 503 saying which limit it hit and
// what to do; the status answers throughout, and a slot freed is usable.
func TestEventStreamsPerUIDCap(t *testing.T) {
	const attempts, perUID = 200, 8
	f := newFakeBackend()
	l := roomy
	l.MaxStreamsPerUID = perUID
	sock, srv := startLimited(t, f, l)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	type outcome struct {
		err    error
		stream bool
	}
	results := make(chan outcome, attempts)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for range attempts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			for _, err := range client.New(sock).Events(ctx) {
				if err != nil {
					if ctx.Err() == nil {
						results <- outcome{err: err}
					}
					return
				}
				results <- outcome{stream: true}
				<-ctx.Done() // hold the stream until the test ends
				return
			}
		}()
	}
	close(start)
	statusDone := make(chan struct{})
	go func() {
		defer close(statusDone)
		for range 20 {
			mustStatus(t, sock, "during the stream flood")
		}
	}()

	want := streamRefusal(limitPerUID, int64(os.Getuid()), srv.Limits)
	if !strings.Contains(want.Message, "too many event streams for uid") || !strings.Contains(want.Hint, "chatctl watch") {
		t.Fatalf("the refusal %q (%q) does not say the limit and what to do", want.Message, want.Hint)
	}
	var streams, refused int
	for range attempts {
		o := <-results
		var apiErr *client.APIError
		switch {
		case o.stream:
			streams++
		case errors.As(o.err, &apiErr):
			refused++
			if apiErr.HTTPStatus != http.StatusServiceUnavailable || apiErr.Message != want.Message || apiErr.Hint != want.Hint {
				t.Errorf("refusal = %d %q (%q), want 503 %q (%q)", apiErr.HTTPStatus, apiErr.Message, apiErr.Hint, want.Message, want.Hint)
			}
		default:
			t.Errorf("stream attempt failed with %v, want a stream or a 503", o.err)
		}
	}
	<-statusDone
	if streams != perUID || refused != attempts-perUID {
		t.Errorf("%d streams, %d refused; want %d and %d", streams, refused, perUID, attempts-perUID)
	}
	metrics := metricsText(t, sock)
	for _, line := range []string{
		fmt.Sprintf(`chatd_api_event_streams_refused_total{limit="per_uid"} %d`, attempts-perUID),
		`chatd_api_event_streams_refused_total{limit="total"} 0`,
		fmt.Sprintf("chatd_api_event_streams_open %d", perUID),
	} {
		if !strings.Contains(metrics, line+"\n") {
			t.Errorf("metrics lack %q:\n%s", line, metrics)
		}
	}

	cancel()
	wg.Wait()
	waitFor(t, "the streams to be released", func() bool { return srv.streams.open() == 0 })
	r, err := streamOnce(sock)
	if err != nil || r != http.StatusOK {
		t.Errorf("a stream after the others closed: %d, %v; want 200", r, err)
	}
}

// The total cap holds across uids; here every caller is one uid, so the
// per-uid cap is set above it.
func TestEventStreamsTotalCap(t *testing.T) {
	f := newFakeBackend()
	l := roomy
	l.MaxStreams, l.MaxStreamsPerUID = 3, 10
	sock, srv := startLimited(t, f, l)
	var held []io.Closer
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for i := range 3 {
		c, code := openRawStream(t, sock)
		if code != http.StatusOK {
			t.Fatalf("stream %d: HTTP %d, want 200", i, code)
		}
		held = append(held, c)
	}
	got := doRequest(t, unixClient(sock), "http://chatd", "GET", "/v1/events", "")
	want := streamRefusal(limitTotal, 0, srv.Limits)
	if got.status != http.StatusServiceUnavailable {
		t.Errorf("HTTP %d, want 503", got.status)
	}
	if diff := cmp.Diff(asJSONValue(t, want), jsonValue(t, got.body)); diff != "" {
		t.Errorf("body (-want +got):\n%s", diff)
	}
	if !strings.Contains(want.Message, "all 3 that chatd serves are open") {
		t.Errorf("message %q does not name the limit", want.Message)
	}
	mustStatus(t, sock, "with every stream taken")
}

// Connections beyond the caps are answered 503 with the limit's message
// and closed; the slots come back when connections close.
func TestConnectionCaps(t *testing.T) {
	tests := []struct {
		name          string
		total, perUID int
		limit         string
	}{
		{"per uid", 10, 4, limitPerUID},
		{"total", 4, 10, limitTotal},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := roomy
			l.MaxConns, l.MaxConnsPerUID = tt.total, tt.perUID
			sock, srv := startLimited(t, newFakeBackend(), l)
			held := min(tt.total, tt.perUID)
			var conns []net.Conn
			for range held {
				c, err := net.Dial("unix", sock)
				if err != nil {
					t.Fatal(err)
				}
				conns = append(conns, c)
			}
			waitFor(t, "the held connections to be admitted", func() bool { return srv.conns.open() == held })

			want := connRefusal(tt.limit, int64(os.Getuid()), srv.Limits)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_, err := client.New(sock).Status(ctx)
			var apiErr *client.APIError
			if !errors.As(err, &apiErr) || apiErr.HTTPStatus != http.StatusServiceUnavailable {
				t.Fatalf("status over the cap: %v, want a 503", err)
			}
			if diff := cmp.Diff(want, apiErr); diff != "" {
				t.Errorf("refusal (-want +got):\n%s", diff)
			}
			if !strings.Contains(want.Hint, "chatctl watch") {
				t.Errorf("hint %q does not say what to do", want.Hint)
			}

			conns[0].Close()
			waitFor(t, "the closed connection's slot", func() bool { return srv.conns.open() == held-1 })
			mustStatus(t, sock, "after a slot was freed")
			waitFor(t, "the status request's slot", func() bool { return srv.conns.open() == held-1 })
			metrics := metricsText(t, sock)
			if line := fmt.Sprintf(`chatd_api_connections_refused_total{limit=%q} 1`, tt.limit); !strings.Contains(metrics, line+"\n") {
				t.Errorf("metrics lack %q:\n%s", line, metrics)
			}
			for _, c := range conns[1:] {
				c.Close()
			}
			waitFor(t, "every slot back", func() bool { return srv.conns.open() == 0 })
		})
	}
}

// A flood of connections far beyond the cap is answered or closed at once
// (none hangs), the admitted ones are served, and afterwards no slot is
// left taken.
func TestConnectionFlood(t *testing.T) {
	const flood = 500
	l := roomy
	l.MaxConns, l.MaxConnsPerUID = 16, 16
	sock, srv := startLimited(t, newFakeBackend(), l)
	var held []net.Conn
	for range 16 {
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
	}
	waitFor(t, "the cap to be reached", func() bool { return srv.conns.open() == 16 })
	var (
		wg              sync.WaitGroup
		mu              sync.Mutex
		answered, shut  int
		unexpectedFirst []string
	)
	for range flood {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.Dial("unix", sock)
			if err != nil {
				mu.Lock()
				unexpectedFirst = append(unexpectedFirst, "dial: "+err.Error())
				mu.Unlock()
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			io.WriteString(c, "GET /v1/events HTTP/1.1\r\nHost: chatd\r\n\r\n")
			line, err := bufio.NewReader(c).ReadString('\n')
			mu.Lock()
			defer mu.Unlock()
			switch {
			case strings.HasPrefix(line, "HTTP/1.1 503 "):
				answered++
			case line == "" && err != nil && !errors.Is(err, os.ErrDeadlineExceeded):
				shut++ // closed without an answer: every refuser was busy
			default:
				unexpectedFirst = append(unexpectedFirst, fmt.Sprintf("%q %v", line, err))
			}
		}()
	}
	wg.Wait()
	if len(unexpectedFirst) > 0 {
		t.Errorf("%d of %d connections over the cap got neither a 503 nor a close, e.g. %s", len(unexpectedFirst), flood, unexpectedFirst[0])
	}
	if answered == 0 {
		t.Errorf("no connection over the cap got a 503 (%d closed)", shut)
	}
	t.Logf("over the cap: %d answered 503, %d closed at once", answered, shut)
	for _, c := range held {
		c.Close()
	}
	waitFor(t, "every slot back", func() bool { return srv.conns.open() == 0 })
	mustStatus(t, sock, "after the flood")
}

// A slowloris caller that sends its request a byte at a time (here ten
// bytes per header timeout) is cut off after the header timeout, while a normal caller is served meanwhile; one
// that connects and sends nothing is cut off too, and their slots return.
func TestSlowHeadersAreCutOff(t *testing.T) {
	const headerTimeout = 300 * time.Millisecond
	l := roomy
	l.HeaderTimeout = headerTimeout
	sock, srv := startLimited(t, newFakeBackend(), l)

	slow, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	silent, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	start := time.Now()
	req := "GET /v1/status HTTP/1.1\r\nHost: chatd\r\nX-Padding: " + strings.Repeat("a", 200) + "\r\n\r\n"
	sent := make(chan int, 1)
	go func() {
		n := 0
		for ; n < len(req); n++ {
			if _, err := slow.Write([]byte{req[n]}); err != nil {
				break
			}
			time.Sleep(headerTimeout / 10)
		}
		sent <- n
	}()
	mustStatus(t, sock, "while a slowloris caller sends its headers")

	for name, c := range map[string]net.Conn{"slowloris": slow, "silent": silent} {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		// The server closes the connection, after a 400 if a partial
		// request came in (a reset if a byte sent meanwhile is unread).
		b, err := io.ReadAll(c)
		if errors.Is(err, syscall.ECONNRESET) {
			err = nil
		}
		if err != nil || (len(b) != 0 && !strings.HasPrefix(string(b), "HTTP/1.1 400 ")) {
			t.Errorf("%s caller: read %q, %v; want the connection closed (at most with a 400)", name, b, err)
		}
		if d := time.Since(start); d < headerTimeout {
			t.Errorf("%s caller cut off after %v, before the header timeout %v", name, d, headerTimeout)
		}
	}
	slow.Close()
	if n := <-sent; n >= len(req) {
		t.Errorf("the slowloris caller sent its whole request (%d bytes) before being cut off", n)
	}
	waitFor(t, "the slots back", func() bool { return srv.conns.open() == 0 })
}

// A body sent too slowly gets 408 after the body timeout, and the backend
// is never asked.
func TestSlowBodyIsCutOff(t *testing.T) {
	const bodyTimeout = 200 * time.Millisecond
	for _, path := range []string{"/v1/login", "/v1/logout", "/v1/status"} {
		t.Run(strings.TrimPrefix(path, "/v1/"), func(t *testing.T) {
			f := newFakeBackend()
			l := roomy
			l.BodyTimeout = bodyTimeout
			sock, _ := startLimited(t, f, l)
			method := "POST"
			if path == "/v1/status" {
				method = "GET"
			}
			c, err := net.Dial("unix", sock)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			fmt.Fprintf(c, "%s %s HTTP/1.1\r\nHost: chatd\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"user_id\":", method, path)
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			var got client.APIError
			json.Unmarshal(body, &got)
			if resp.StatusCode != http.StatusRequestTimeout || got.Message != "reading the request body timed out" {
				t.Errorf("answer %d %s, want 408 saying the body timed out", resp.StatusCode, body)
			}
			if calls := f.Calls(); len(calls) != 0 {
				t.Errorf("the backend was called (%q) for a request whose body never came", calls)
			}
		})
	}
	// An answer that needs no body (a 404, a 403) is written, and the
	// connection closed, after the body timeout too instead of waiting for
	// the rest of the body.
	t.Run("no such endpoint", func(t *testing.T) {
		l := roomy
		l.BodyTimeout = bodyTimeout
		sock, srv := startLimited(t, newFakeBackend(), l)
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		io.WriteString(c, "POST /v1/nope HTTP/1.1\r\nHost: chatd\r\nContent-Length: 100\r\n\r\n{")
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		br := bufio.NewReader(c)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusNotFound {
			t.Errorf("HTTP %d, want 404", resp.StatusCode)
		}
		if b, err := io.ReadAll(br); err != nil || len(b) != 0 {
			t.Errorf("after the answer: read %q, %v; want the connection closed", b, err)
		}
		waitFor(t, "the slot back", func() bool { return srv.conns.open() == 0 })
	})
}

// A kept-alive connection is closed after the idle timeout, and its slot
// returns.
func TestIdleConnectionIsClosed(t *testing.T) {
	const idle = 200 * time.Millisecond
	l := roomy
	l.IdleTimeout = idle
	sock, srv := startLimited(t, newFakeBackend(), l)
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "GET /v1/status HTTP/1.1\r\nHost: chatd\r\n\r\n")
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("HTTP %d, want 200", resp.StatusCode)
	}
	answered := time.Now()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if b, err := io.ReadAll(br); err != nil || len(b) != 0 {
		t.Errorf("after the answer: read %q, %v; want the idle connection closed", b, err)
	}
	// The server's idle timer starts when it has written the answer, a
	// little before this test has read it: allow for that.
	if d := time.Since(answered); d < idle/2 {
		t.Errorf("closed after %v idle, well before the idle timeout %v", d, idle)
	}
	waitFor(t, "the slot back", func() bool { return srv.conns.open() == 0 })
}

// A stream whose reader stops reading is ended by the write timeout
// instead of holding its handler and slot.
func TestStalledStreamReaderIsCutOff(t *testing.T) {
	f := newFakeBackend()
	l := roomy
	l.WriteTimeout = 200 * time.Millisecond
	sock, srv := startLimited(t, f, l)
	c, code := openRawStream(t, sock)
	defer c.Close()
	if code != http.StatusOK {
		t.Fatalf("HTTP %d, want 200", code)
	}
	// Never read again; send events until the handler gives up.
	ev := client.Event{Type: client.EventConnectFailed, Code: 6206, Desc: strings.Repeat("x", 4096)}
	deadline := time.After(30 * time.Second)
	for sent := 0; ; sent++ {
		select {
		case f.events <- ev:
			continue
		case <-f.unsubscribed:
			t.Logf("the stream ended after %d events were sent to a reader that stopped", sent)
		case <-deadline:
			t.Fatalf("the stream still runs after %d events to a reader that stopped", sent)
		}
		break
	}
	waitFor(t, "the stream's slot back", func() bool { return srv.streams.open() == 0 })
	mustStatus(t, sock, "after the stalled stream")
}

// With one uid at its connection cap, another uid is still served.
func TestConnectionCapIsPerUID(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skipf("running a client as another uid needs root (euid is %d)", os.Geteuid())
	}
	dir := t.TempDir()
	if err := os.Chmod(filepath.Dir(dir), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	helper := filepath.Join(dir, "api.test")
	copyExecutable(t, helper)
	l := roomy
	l.MaxConns, l.MaxConnsPerUID = 8, 2
	sock, srv := startLimited(t, newFakeBackend(), l)
	if err := os.Chmod(filepath.Dir(sock), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(sock, 0o666); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	waitFor(t, "root's connections to be admitted", func() bool { return srv.conns.open() == 2 })
	if got := doRequest(t, unixClient(sock), "http://chatd", "GET", "/v1/status", ""); got.status != http.StatusServiceUnavailable {
		t.Errorf("root over its cap: HTTP %d, want 503", got.status)
	}
	got := runHelper(t, helper, &syscall.Credential{Uid: 65534, Gid: 65534}, sock, "GET", "/v1/status", "")
	if got.Status != http.StatusOK {
		t.Errorf("another uid while root is at its cap: HTTP %d %s, want 200", got.Status, got.Body)
	}
}

// openRawStream opens GET /v1/events on a connection of its own and reads
// the answer's head (and the snapshot line of a stream).
func openRawStream(t *testing.T, sock string) (io.Closer, int) {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(c, "GET /v1/events HTTP/1.1\r\nHost: chatd\r\n\r\n")
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		c.Close()
		t.Fatal(err)
	}
	if resp.StatusCode == http.StatusOK {
		if _, err := bufio.NewReader(resp.Body).ReadString('\n'); err != nil {
			t.Fatalf("reading the snapshot: %v", err)
		}
	}
	c.SetReadDeadline(time.Time{})
	return c, resp.StatusCode
}

// streamOnce opens a stream, reads its first line and closes it.
func streamOnce(sock string) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, err := range client.New(sock).Events(ctx) {
		var apiErr *client.APIError
		if errors.As(err, &apiErr) {
			return apiErr.HTTPStatus, nil
		}
		if err != nil {
			return 0, err
		}
		return http.StatusOK, nil
	}
	return 0, errors.New("no event")
}

func metricsText(t *testing.T, sock string) string {
	t.Helper()
	got := doRequest(t, oneShotClient(sock), "http://chatd", "GET", "/metrics", "")
	if got.status != http.StatusOK {
		t.Fatalf("GET /metrics: HTTP %d %s", got.status, got.body)
	}
	return got.body
}

// BenchmarkEventStreamFlood opens 5,000 connections that each ask for an
// event stream and hold what they get, and reports the memory the process
// holds meanwhile (Go heap and stacks, clients included, which cost the
// same in both cases) over what it held before, with the default limits
// and, as the baseline, with limits too high to matter.
func BenchmarkEventStreamFlood(b *testing.B) {
	const attempts = 5000
	for _, bc := range []struct {
		name   string
		limits Limits
	}{
		{"default limits", Limits{}},
		{"no limits", Limits{MaxConns: 1 << 20, MaxConnsPerUID: 1 << 20, MaxStreams: 1 << 20, MaxStreamsPerUID: 1 << 20}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			for b.Loop() {
				sock, srv := startLimited(b, newFakeBackend(), bc.limits)
				before := memInUse()
				var (
					mu      sync.Mutex
					conns   []net.Conn
					streams int
					wg      sync.WaitGroup
				)
				sem := make(chan struct{}, 100)
				for range attempts {
					wg.Add(1)
					sem <- struct{}{}
					go func() {
						defer wg.Done()
						defer func() { <-sem }()
						c, err := net.Dial("unix", sock)
						if err != nil {
							return
						}
						c.SetDeadline(time.Now().Add(10 * time.Second))
						io.WriteString(c, "GET /v1/events HTTP/1.1\r\nHost: chatd\r\n\r\n")
						var buf [16]byte
						n, _ := io.ReadFull(c, buf[:])
						mu.Lock()
						defer mu.Unlock()
						conns = append(conns, c)
						if string(buf[:n]) == "HTTP/1.1 200 OK\r" {
							streams++
						}
					}()
				}
				wg.Wait()
				held := memInUse() - before
				b.ReportMetric(float64(held)/(1<<20), "MB-held")
				b.ReportMetric(float64(streams), "streams")
				for _, c := range conns {
					c.Close()
				}
				waitFor(b, "the connections to close", func() bool { return srv.conns.open() == 0 })
			}
		})
	}
}

// memInUse is the Go heap and stack memory in use, after a collection.
func memInUse() int64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return int64(ms.HeapInuse + ms.StackInuse)
}

// docs/api.md's table of limits shows DefaultLimits.
func TestDefaultLimitsDocumented(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "docs", "api.md"))
	if err != nil {
		t.Fatal(err)
	}
	d := DefaultLimits
	secs := func(v time.Duration) string { return fmt.Sprintf("%d s", int(v.Seconds())) }
	for _, row := range []string{
		fmt.Sprintf("| open connections, all callers | %d |", d.MaxConns),
		fmt.Sprintf("| open connections of one uid | %d |", d.MaxConnsPerUID),
		fmt.Sprintf("| open `/v1/events` streams, all callers | %d |", d.MaxStreams),
		fmt.Sprintf("| open `/v1/events` streams of one uid | %d |", d.MaxStreamsPerUID),
		fmt.Sprintf("| request line and headers | %s; %d KiB ", secs(d.HeaderTimeout), maxHeaderBytes>>10),
		fmt.Sprintf("| request body | %s after the headers, %d KiB |", secs(d.BodyTimeout), maxLoginBody>>10),
		fmt.Sprintf("| writing one answer, or one event of a stream | %s |", secs(d.WriteTimeout)),
		fmt.Sprintf("| a kept-alive connection waiting for its next request | %s |", secs(d.IdleTimeout)),
		fmt.Sprintf("Connections over a cap are answered by at most %d small goroutines", maxRefusers),
	} {
		if !strings.Contains(string(b), row) {
			t.Errorf("docs/api.md lacks %q", row)
		}
	}
}
