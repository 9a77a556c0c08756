package daemon

import (
	"chatd/codes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"chatd/client"
	"chatd/mqtt"
	"chatd/storage"
	"chatd/usersig"
)

// fakeClock moves only when a test says so.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	mono   time.Duration
	timers []*fakeTimer
}

type fakeTimer struct {
	c       chan time.Time
	at      time.Duration
	stopped bool
	clock   *fakeClock
}

func (t *fakeTimer) C() <-chan time.Time { return t.c }
func (t *fakeTimer) Stop() bool {
	t.clock.mu.Lock()
	defer t.clock.mu.Unlock()
	was := !t.stopped
	t.stopped = true
	return was
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Mono() time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.mono
}

// Step moves the wall clock only, as an NTP step does.
func (c *fakeClock) Step(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

func (c *fakeClock) NewTimer(d time.Duration) Timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &fakeTimer{c: make(chan time.Time, 1), at: c.mono + d, clock: c}
	if d <= 0 {
		t.c <- c.now
		t.stopped = true
		return t
	}
	c.timers = slices.DeleteFunc(c.timers, func(t *fakeTimer) bool { return t.stopped })
	c.timers = append(c.timers, t)
	return t
}

// Advance moves the clock and fires the timers that are due.
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	c.mono += d
	for _, t := range c.timers {
		if !t.stopped && t.at <= c.mono {
			t.stopped = true
			t.c <- c.now
		}
	}
}

// fakeGateway answers like chatgw, with codes the test chooses.
type fakeGateway struct {
	mu         sync.Mutex
	t          *testing.T
	requests   []string // "login dev-42", "resume s1", "logout s1"
	loginCode  []int    // answers for the next logins (then 0)
	resumeCode []int    // answers for the next resumes (then 0)
	hold       chan struct{}
	n          int
	expires    time.Time
	conns      []*fakeConn
	dialErr    error
	dials      int
	serverTime func() time.Time
	inflight   int // requests received, answered or not
}

func (g *fakeGateway) received() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.inflight
}

func (g *fakeGateway) Dial(ctx context.Context, p DialParams) (Conn, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.dials++
	if g.dialErr != nil {
		return nil, g.dialErr
	}
	c := &fakeConn{g: g, pushes: make(chan mqtt.Message, 8), lost: make(chan struct{})}
	g.conns = append(g.conns, c)
	return c, nil
}

func (g *fakeGateway) log() []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.requests)
}

func (g *fakeGateway) dialCount() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.dials
}

func (g *fakeGateway) setDialErr(err error) {
	g.mu.Lock()
	g.dialErr = err
	g.mu.Unlock()
}

func (g *fakeGateway) last() *fakeConn {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.conns[len(g.conns)-1]
}

type fakeConn struct {
	g      *fakeGateway
	pushes chan mqtt.Message
	lost   chan struct{}
	once   sync.Once
}

func (c *fakeConn) Request(ctx context.Context, m mqtt.Message) (mqtt.Message, error) {
	g := c.g
	g.mu.Lock()
	g.inflight++
	g.mu.Unlock()
	if g.hold != nil && m.Type == mqtt.TypeLogin {
		select {
		case <-g.hold:
		case <-ctx.Done():
			return mqtt.Message{}, ctx.Err()
		}
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	r := mqtt.Message{ID: m.ID, ServerTimeMs: g.serverTime().UnixMilli()}
	switch m.Type {
	case mqtt.TypeLogin:
		tk, err := usersig.Decode(m.UserSig)
		who := m.UserID
		if err == nil {
			who += " exp=" + tk.ExpiresAt().UTC().Format("15:04")
		}
		g.requests = append(g.requests, "login "+who)
		r.Type = mqtt.TypeLoginResult
		if len(g.loginCode) > 0 {
			r.Code, g.loginCode = g.loginCode[0], g.loginCode[1:]
		}
		if r.Code == 0 {
			g.n++
			r.Session = fmt.Sprintf("s%d", g.n)
			if err == nil {
				r.UserSigExpiresAt = tk.ExpiresAt().Unix()
			}
		}
	case mqtt.TypeResume:
		g.requests = append(g.requests, "resume "+m.Session)
		r.Type = mqtt.TypeResumeResult
		r.Session = m.Session
		if len(g.resumeCode) > 0 {
			r.Code, g.resumeCode = g.resumeCode[0], g.resumeCode[1:]
		}
	case mqtt.TypeLogout:
		g.requests = append(g.requests, "logout "+m.Session)
		r.Type = mqtt.TypeLogoutResult
	}
	if r.Code != 0 {
		r.Desc = codes.Text(r.Code)
		r.ServerTimeMs = 0
	}
	return r, nil
}
func (c *fakeConn) Pushes() <-chan mqtt.Message { return c.pushes }
func (c *fakeConn) Lost() <-chan struct{}       { return c.lost }
func (c *fakeConn) Err() error                  { return errors.New("EOF") }
func (c *fakeConn) Close(bool)                  { c.drop() }
func (c *fakeConn) Abort()                      { c.drop() }
func (c *fakeConn) drop()                       { c.once.Do(func() { close(c.lost) }) }

const appID = 1400000001

var (
	key   = usersig.NewSecret("test-key")
	start = time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC)
)

func sigFor(t testing.TB, user string, issued time.Time, life time.Duration) usersig.Secret {
	t.Helper()
	s, err := usersig.Generate(appID, key, user, life, issued)
	if err != nil {
		t.Fatal(err)
	}
	return usersig.NewSecret(s)
}

// harness runs a Daemon against the fake gateway and clock.
type harness struct {
	t      *testing.T
	d      *Daemon
	gw     *fakeGateway
	clock  *fakeClock
	store  storage.Store
	cancel context.CancelFunc
	done   chan error
	events <-chan client.Event
	synced bool
	cmdSig []usersig.Secret // what usersig_command prints next
	cmdErr error
	cmdMu  sync.Mutex
	cmds   int
}

type hopt func(*Config, *harness)

func withCommand() hopt {
	return func(c *Config, h *harness) { c.UserSigCommand = "fake" }
}

func newHarness(t *testing.T, store storage.Store, opts ...hopt) *harness {
	t.Helper()
	cfg := DefaultConfig()
	cfg.SDKAppID = appID
	cfg.UserID = ""
	h := &harness{t: t, clock: &fakeClock{now: start}, store: store, synced: true}
	h.gw = &fakeGateway{t: t, serverTime: h.clock.Now}
	for _, o := range opts {
		o(&cfg, h)
	}
	if h.store == nil {
		h.store = storage.NewMemory()
	}
	var cmd func(context.Context, string) (usersig.Secret, error)
	if cfg.UserSigCommand != "" {
		cmd = func(ctx context.Context, user string) (usersig.Secret, error) {
			h.cmdMu.Lock()
			defer h.cmdMu.Unlock()
			h.cmds++
			if h.cmdErr != nil {
				return usersig.Secret{}, h.cmdErr
			}
			if len(h.cmdSig) > 0 {
				s := h.cmdSig[0]
				h.cmdSig = h.cmdSig[1:]
				return s, nil
			}
			return sigFor(t, user, h.clock.Now(), 2*time.Hour), nil
		}
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	d, err := New(Options{Config: cfg, Store: h.store, Dialer: h.gw, Clock: h.clock, Logger: log,
		ClockSynced: func() bool { return h.synced }, UserSigCommand: cmd,
		Rand: func(n int64) int64 { return n - 1 }, // the longest delay: deterministic
	})
	if err != nil {
		t.Fatal(err)
	}
	h.d = d
	h.events, _ = d.Subscribe()
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	h.done = make(chan error, 1)
	go func() { h.done <- d.Run(ctx) }()
	t.Cleanup(h.stop)
	return h
}

func (h *harness) stop() {
	if h.cancel == nil {
		return
	}
	h.cancel()
	select {
	case err := <-h.done:
		if err != nil {
			h.t.Errorf("Run: %v", err)
		}
	case <-time.After(5 * time.Second):
		h.t.Error("Run did not return")
	}
	h.cancel = nil
}

// until waits (in real time, bounded) for cond on the status.
func (h *harness) until(what string, cond func(client.Status) bool) client.Status {
	h.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		s := h.d.Status()
		if cond(s) {
			return s
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("waiting for %s; status is %+v; gateway saw %v", what, s, h.gw.log())
		}
		time.Sleep(time.Millisecond)
	}
}

func (h *harness) untilStatus(st client.LoginStatus, connected bool) client.Status {
	h.t.Helper()
	return h.until(fmt.Sprintf("%s connected=%v", st, connected), func(s client.Status) bool {
		return s.LoginStatus == st && s.Connected == connected
	})
}

// settle lets the state goroutine finish what it was told.
func (h *harness) settle() {
	h.t.Helper()
	for range 3 {
		reply := make(chan loginReply, 1)
		// A no-op round trip through the inbox (an invalid login).
		select {
		case h.d.inbox <- waiterEvent{id: 1 << 60, reply: reply, ev: EvLogin{Waiter: 1 << 60}}:
			<-reply
		case <-time.After(5 * time.Second):
			h.t.Fatal("state goroutine stuck")
		}
	}
}

func (h *harness) login(user string, sig usersig.Secret) (int, string) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return h.d.Login(ctx, user, sig)
}

func (h *harness) eventTypes() []string {
	var out []string
	for {
		select {
		case e := <-h.events:
			s := e.Type
			if e.Type == client.EventLoginStatusChanged {
				s += ":" + e.Status.String()
			}
			if e.Code != 0 {
				s += fmt.Sprintf(":%d", e.Code)
			}
			out = append(out, s)
		default:
			return out
		}
	}
}

func TestLoginAndStatus(t *testing.T) {
	h := newHarness(t, nil)
	code, desc := h.login("dev-42", sigFor(t, "dev-42", start, 24*time.Hour))
	if code != 0 {
		t.Fatalf("login: %d %s", code, desc)
	}
	s := h.untilStatus(client.Logined, true)
	if s.UserID != "dev-42" || s.Session != "s1" || s.UserSigExpiresAt == nil || !s.UserSigExpiresAt.Equal(start.Add(24*time.Hour)) {
		t.Errorf("status = %+v", s)
	}
	want := []string{"onLoginStatusChanged:LOGINING", "onConnecting", "onConnectSuccess", "onLoginStatusChanged:LOGINED"}
	if diff := cmp.Diff(want, h.eventTypes()); diff != "" {
		t.Errorf("events (-want +got):\n%s", diff)
	}
	// Logging in again as the same user while logged in is done at once.
	if code, _ := h.login("dev-42", sigFor(t, "dev-42", start, 24*time.Hour)); code != 0 {
		t.Errorf("second login: %d", code)
	}
	if diff := cmp.Diff([]string{"login dev-42 exp=12:00"}, h.gw.log()); diff != "" {
		t.Errorf("gateway requests (-want +got):\n%s", diff)
	}
}

func TestLoginValidation(t *testing.T) {
	for _, tc := range []struct {
		name string
		user string
		sig  usersig.Secret
		want int
	}{
		{"empty user", "", usersig.NewSecret("x"), 7003},
		{"user too long", strings.Repeat("x", 33), usersig.NewSecret("x"), 7003},
		{"user with slash", "a/b", usersig.NewSecret("x"), 7003},
		{"no usersig", "dev-42", usersig.Secret{}, 6017},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, nil)
			if code, _ := h.login(tc.user, tc.sig); code != tc.want {
				t.Errorf("code %d, want %d", code, tc.want)
			}
			h.settle()
			if n := h.gw.dialCount(); n != 0 {
				t.Errorf("dialled %d times for an invalid login", n)
			}
		})
	}
}

func TestConcurrentLoginsJoin(t *testing.T) {
	h := newHarness(t, nil)
	h.gw.hold = make(chan struct{})
	sig := sigFor(t, "dev-42", start, time.Hour)
	codes := make(chan int, 2)
	for range 2 {
		go func() { c, _ := h.login("dev-42", sig); codes <- c }()
	}
	h.until("LOGINING", func(s client.Status) bool { return s.LoginStatus == client.Logining })
	h.settle()
	close(h.gw.hold)
	for range 2 {
		if c := <-codes; c != 0 {
			t.Errorf("code %d", c)
		}
	}
	if diff := cmp.Diff([]string{"login dev-42 exp=13:00"}, h.gw.log()); diff != "" {
		t.Errorf("a joined login was sent twice (-want +got):\n%s", diff)
	}
}

func TestAccountSwitch(t *testing.T) {
	h := newHarness(t, nil)
	h.login("alice", sigFor(t, "alice", start, time.Hour))
	if code, _ := h.login("bob", sigFor(t, "bob", start, time.Hour)); code != 0 {
		t.Fatalf("login bob: %d", code)
	}
	s := h.untilStatus(client.Logined, true)
	if s.UserID != "bob" {
		t.Errorf("user = %q", s.UserID)
	}
	h.until("alice logged out", func(client.Status) bool { return len(h.gw.log()) == 3 })
	if diff := cmp.Diff([]string{"login alice exp=13:00", "logout s1", "login bob exp=13:00"}, h.gw.log()); diff != "" {
		t.Errorf("gateway requests (-want +got):\n%s", diff)
	}
}

func TestReconnectResumes(t *testing.T) {
	h := newHarness(t, nil)
	h.login("dev-42", sigFor(t, "dev-42", start, 24*time.Hour))
	h.untilStatus(client.Logined, true)
	h.gw.setDialErr(errors.New("connection refused"))
	h.gw.last().drop()
	// Still logged in, honestly not connected, while it reconnects.
	s := h.untilStatus(client.Logined, false)
	if s.Connection != connReconnecting || s.UserID != "dev-42" || s.NextRetryAt == nil {
		t.Errorf("while reconnecting: %+v", s)
	}
	// Backoff with full jitter (Rand gives the longest delay here): 1s, 2s, 4s, ...
	var delays []time.Duration
	for range 4 {
		s = h.until("a retry scheduled", func(s client.Status) bool { return s.NextRetryAt != nil && s.NextRetryAt.After(h.clock.Now()) })
		d := s.NextRetryAt.Sub(h.clock.Now())
		delays = append(delays, d)
		n := h.gw.dialCount()
		h.clock.Advance(d)
		h.until("the next dial", func(client.Status) bool { return h.gw.dialCount() > n })
	}
	if diff := cmp.Diff([]time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second}, delays); diff != "" {
		t.Errorf("backoff delays (-want +got):\n%s", diff)
	}
	h.gw.setDialErr(nil)
	s = h.until("a retry scheduled", func(s client.Status) bool { return s.NextRetryAt != nil })
	h.clock.Advance(s.NextRetryAt.Sub(h.clock.Now()))
	h.untilStatus(client.Logined, true)
	if diff := cmp.Diff([]string{"login dev-42 exp=12:00", "resume s1"}, h.gw.log()); diff != "" {
		t.Errorf("gateway requests (-want +got):\n%s", diff)
	}
	// A connection that drops at once does not reset the backoff ...
	h.gw.setDialErr(errors.New("refused"))
	h.gw.last().drop()
	s = h.until("a retry scheduled", func(s client.Status) bool { return s.NextRetryAt != nil })
	if d := s.NextRetryAt.Sub(h.clock.Now()); d != 32*time.Second {
		t.Errorf("backoff after a short connection: %s, want 32s (not reset)", d)
	}
	// ... one that stayed up does.
	h.gw.setDialErr(nil)
	h.clock.Advance(s.NextRetryAt.Sub(h.clock.Now()))
	h.untilStatus(client.Logined, true)
	h.clock.Advance(time.Minute)
	h.settle()
	h.gw.last().drop()
	s = h.until("a retry scheduled", func(s client.Status) bool { return s.NextRetryAt != nil })
	if d := s.NextRetryAt.Sub(h.clock.Now()); d != time.Second {
		t.Errorf("backoff after a stable connection: %s, want 1s", d)
	}
}

func TestKickedLive(t *testing.T) {
	h := newHarness(t, nil)
	h.login("dev-42", sigFor(t, "dev-42", start, 24*time.Hour))
	h.untilStatus(client.Logined, true)
	h.eventTypes()
	c := h.gw.last()
	// A kick for another session is ignored.
	c.pushes <- mqtt.Message{Type: mqtt.TypeKick, Session: "s-old", Code: 6208}
	h.settle()
	if s := h.d.Status(); s.LoginStatus != client.Logined {
		t.Fatalf("a stale kick logged the device out: %+v", s)
	}
	c.pushes <- mqtt.Message{Type: mqtt.TypeKick, Session: "s1", Code: 6208, Desc: "kicked by Android"}
	s := h.untilStatus(client.Logout, false)
	if s.UserID != "" || s.LastError.Code != 6208 {
		t.Errorf("after kick: %+v", s)
	}
	if diff := cmp.Diff([]string{"onKickedOffline:6208", "onLoginStatusChanged:LOGOUT"}, h.eventTypes()); diff != "" {
		t.Errorf("events (-want +got):\n%s", diff)
	}
	// No login loop: nothing happens however long we wait.
	n := h.gw.dialCount()
	h.clock.Advance(24 * time.Hour)
	h.settle()
	if h.gw.dialCount() != n {
		t.Error("the daemon logged in again after a kick")
	}
}

func TestKickedWhileOffline(t *testing.T) {
	h := newHarness(t, nil)
	h.login("dev-42", sigFor(t, "dev-42", start, 24*time.Hour))
	h.untilStatus(client.Logined, true)
	h.gw.resumeCode = []int{6208}
	h.gw.last().drop()
	s := h.until("a retry", func(s client.Status) bool { return s.NextRetryAt != nil })
	h.clock.Advance(s.NextRetryAt.Sub(h.clock.Now()))
	s = h.untilStatus(client.Logout, false)
	if s.LastError.Code != 6208 {
		t.Errorf("status %+v", s)
	}
	h.clock.Advance(time.Hour)
	h.settle()
	if diff := cmp.Diff([]string{"login dev-42 exp=12:00", "resume s1"}, h.gw.log()); diff != "" {
		t.Errorf("gateway requests (-want +got):\n%s", diff)
	}
}

func TestKickReloginPolicy(t *testing.T) {
	h := newHarness(t, nil, func(c *Config, h *harness) { c.Kick.After = "relogin" })
	h.login("dev-42", sigFor(t, "dev-42", start, 24*time.Hour))
	h.untilStatus(client.Logined, true)
	var waits []time.Duration
	for i := range 3 {
		h.gw.last().pushes <- mqtt.Message{Type: mqtt.TypeKick, Session: fmt.Sprintf("s%d", i+1)}
		h.untilStatus(client.Logout, false)
		before := h.clock.Now()
		h.clock.Advance(time.Second)
		for h.d.Status().LoginStatus == client.Logout {
			h.clock.Advance(time.Second)
			h.settle()
		}
		waits = append(waits, h.clock.Now().Sub(before))
		h.untilStatus(client.Logined, true)
	}
	if diff := cmp.Diff([]time.Duration{time.Minute, 2 * time.Minute, 4 * time.Minute}, waits); diff != "" {
		t.Errorf("relogin delays (-want +got):\n%s", diff)
	}
}

func TestPermanentAndRetryableErrors(t *testing.T) {
	for _, tc := range []struct {
		name      string
		codes     []int
		want      client.LoginStatus
		wantCode  int
		wantLogin int
	}{
		{"wrong key is permanent", []int{70009}, client.Logout, 70009, 1},
		{"user mismatch is permanent", []int{70013}, client.Logout, 70013, 1},
		{"expired without usersig_command", []int{70001}, client.Logout, 70001, 1},
		{"revoked without usersig_command", []int{70052}, client.Logout, 70052, 1},
		{"server timeout is retried", []int{70169, 70169}, client.Logined, 0, 3},
		{"too many failures is retried", []int{70050}, client.Logined, 0, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, nil)
			h.gw.loginCode = tc.codes
			done := make(chan int, 1)
			go func() { c, _ := h.login("dev-42", sigFor(t, "dev-42", start, 24*time.Hour)); done <- c }()
			for {
				s := h.d.Status()
				if s.LoginStatus == tc.want && (tc.want != client.Logined || s.Connected) {
					break
				}
				h.clock.Advance(time.Second)
				h.settle()
			}
			code := <-done
			if code != tc.wantCode {
				t.Errorf("login answered %d, want %d", code, tc.wantCode)
			}
			h.clock.Advance(time.Hour)
			h.settle()
			if n := len(h.gw.log()); n != tc.wantLogin {
				t.Errorf("%d logins sent, want %d: %v", n, tc.wantLogin, h.gw.log())
			}
		})
	}
}

func TestExpiredNoticeRenewsWithCommand(t *testing.T) {
	h := newHarness(t, nil, withCommand())
	h.login("dev-42", sigFor(t, "dev-42", start, 24*time.Hour))
	h.untilStatus(client.Logined, true)
	h.eventTypes()
	h.gw.last().pushes <- mqtt.Message{Type: mqtt.TypeUserSigExpire, Session: "s1", Code: 70001}
	h.until("a new session", func(s client.Status) bool { return s.LoginStatus == client.Logined && s.Session == "s2" })
	got := h.eventTypes()
	if !slices.Contains(got, "onUserSigExpired:70001") {
		t.Errorf("events %v lack onUserSigExpired", got)
	}
	if diff := cmp.Diff([]string{"login dev-42 exp=12:00", "login dev-42 exp=14:00"}, h.gw.log()); diff != "" {
		t.Errorf("gateway requests (-want +got):\n%s", diff)
	}
}

func TestProactiveRenewal(t *testing.T) {
	h := newHarness(t, nil, withCommand())
	h.login("dev-42", sigFor(t, "dev-42", start, 2*time.Hour))
	h.untilStatus(client.Logined, true)
	h.eventTypes()
	// Renewal is due one hour (the margin) before expiry.
	h.clock.Advance(59 * time.Minute)
	h.settle()
	if len(h.gw.log()) != 1 {
		t.Fatalf("renewed too early: %v", h.gw.log())
	}
	h.clock.Advance(time.Minute)
	s := h.until("the renewed session", func(s client.Status) bool { return s.Session == "s2" })
	if s.LoginStatus != client.Logined || !s.UserSigExpiresAt.Equal(start.Add(3*time.Hour)) {
		t.Errorf("after renewal: %+v", s)
	}
	// A healthy device never dropped: no status change, no expiry event.
	if got := h.eventTypes(); len(got) != 0 {
		t.Errorf("renewal produced events %v", got)
	}
	// The session is checked first (a missed kick would show), then renewed.
	if diff := cmp.Diff([]string{"login dev-42 exp=14:00", "resume s1", "login dev-42 exp=15:00"}, h.gw.log()); diff != "" {
		t.Errorf("gateway requests (-want +got):\n%s", diff)
	}
}

func TestUntrustedClockMakesNoExpiryDecision(t *testing.T) {
	// The board booted in 1970... or rather: its clock runs a year ahead,
	// so by its clock the UserSig expired. Without sync it must still try.
	for _, tc := range []struct {
		name      string
		synced    bool
		wantCode  int
		wantDials int
	}{
		{"untrusted clock: the gateway decides", false, 0, 1},
		{"trusted clock: 6206 without a dial", true, 6206, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, nil, func(c *Config, h *harness) { h.synced = tc.synced })
			issued := start
			h.gw.serverTime = func() time.Time { return issued.Add(time.Minute) }
			h.clock.Advance(365 * 24 * time.Hour)
			code, _ := h.login("dev-42", sigFor(t, "dev-42", issued, 24*time.Hour))
			if code != tc.wantCode {
				t.Errorf("code %d, want %d", code, tc.wantCode)
			}
			if n := h.gw.dialCount(); n != tc.wantDials {
				t.Errorf("%d dials, want %d", n, tc.wantDials)
			}
			if tc.wantCode == 0 {
				s := h.untilStatus(client.Logined, true)
				if !s.ClockTrusted || s.ServerTimeOffset > -364*24*3600*1000 {
					t.Errorf("offset not learned: %+v", s)
				}
			}
		})
	}
}

func TestRestartResumesFromPersistedState(t *testing.T) {
	store := storage.NewMemory()
	h := newHarness(t, store)
	h.login("dev-42", sigFor(t, "dev-42", start, 24*time.Hour))
	h.untilStatus(client.Logined, true)
	h.stop()

	h2 := newHarness(t, store)
	h2.gw.n = 1
	s := h2.untilStatus(client.Logined, true)
	if s.UserID != "dev-42" || s.Session != "s1" {
		t.Errorf("after restart: %+v", s)
	}
	if diff := cmp.Diff([]string{"resume s1"}, h2.gw.log()); diff != "" {
		t.Errorf("gateway requests (-want +got):\n%s", diff)
	}
}

func TestRestartAfterKickStaysOut(t *testing.T) {
	store := storage.NewMemory()
	h := newHarness(t, store)
	h.login("dev-42", sigFor(t, "dev-42", start, 24*time.Hour))
	h.untilStatus(client.Logined, true)
	h.gw.last().pushes <- mqtt.Message{Type: mqtt.TypeKick, Session: "s1"}
	h.untilStatus(client.Logout, false)
	h.stop()

	h2 := newHarness(t, store, func(c *Config, h *harness) { c.UserID = "dev-42"; c.UserSigCommand = "fake" })
	h2.clock.Advance(time.Hour)
	h2.settle()
	if s := h2.d.Status(); s.LoginStatus != client.Logout || s.LastError.Code != 6208 {
		t.Errorf("after restart: %+v", s)
	}
	if n := h2.gw.dialCount(); n != 0 {
		t.Errorf("dialled %d times after a restart following a kick", n)
	}
}

func TestLogout(t *testing.T) {
	h := newHarness(t, nil)
	h.login("dev-42", sigFor(t, "dev-42", start, 24*time.Hour))
	h.untilStatus(client.Logined, true)
	ctx := context.Background()
	if code, _ := h.d.Logout(ctx); code != 0 {
		t.Fatalf("logout: %d", code)
	}
	s := h.untilStatus(client.Logout, false)
	if s.UserID != "" || s.LastError.Code != 0 {
		t.Errorf("after logout: %+v", s)
	}
	if code, _ := h.d.Logout(ctx); code != 0 {
		t.Errorf("second logout: %d", code)
	}
	h.until("logout sent", func(client.Status) bool { return len(h.gw.log()) == 2 })
	if diff := cmp.Diff([]string{"login dev-42 exp=12:00", "logout s1"}, h.gw.log()); diff != "" {
		t.Errorf("gateway requests (-want +got):\n%s", diff)
	}
	st, _ := h.store.Load()
	if st.UserID != "" || !st.UserSig.IsZero() || st.Status != int(client.Logout) {
		t.Errorf("persisted after logout: %+v", st)
	}
}

func TestLogoutCancelsLogin(t *testing.T) {
	h := newHarness(t, nil)
	h.gw.hold = make(chan struct{})
	done := make(chan int, 1)
	go func() { c, _ := h.login("dev-42", sigFor(t, "dev-42", start, time.Hour)); done <- c }()
	h.until("the login at the gateway", func(client.Status) bool { return h.gw.received() == 1 })
	h.d.Logout(context.Background())
	if c := <-done; c != 6014 {
		t.Errorf("the cancelled login answered %d, want 6014", c)
	}
	close(h.gw.hold) // the gateway's late success must not log the device in
	h.until("the late session is logged out", func(client.Status) bool { return len(h.gw.log()) == 2 })
	if s := h.d.Status(); s.LoginStatus != client.Logout {
		t.Errorf("status %+v", s)
	}
	if diff := cmp.Diff([]string{"login dev-42 exp=13:00", "logout s1"}, h.gw.log()); diff != "" {
		t.Errorf("gateway requests (-want +got):\n%s", diff)
	}
}

func TestSteadyStateWritesNothing(t *testing.T) {
	h := newHarness(t, nil)
	h.login("dev-42", sigFor(t, "dev-42", start, 24*time.Hour))
	h.untilStatus(client.Logined, true)
	h.settle()
	before := h.store.Writes()
	for range 100 {
		h.clock.Advance(Heartbeat)
	}
	h.settle()
	if got := h.store.Writes() - before; got != 0 {
		t.Errorf("%d writes while nothing changed", got)
	}
}

func TestAutoLoginFromConfig(t *testing.T) {
	h := newHarness(t, nil, withCommand(), func(c *Config, h *harness) { c.UserID = "dev-7" })
	s := h.untilStatus(client.Logined, true)
	if s.UserID != "dev-7" || h.cmds != 1 {
		t.Errorf("status %+v after %d command runs", s, h.cmds)
	}
}

func TestBadCommandOutput(t *testing.T) {
	h := newHarness(t, nil, withCommand(), func(c *Config, h *harness) {
		c.UserID = "dev-7"
		h.cmdSig = []usersig.Secret{usersig.NewSecret("garbage"), sigFor(t, "someone-else", start, time.Hour)}
	})
	_ = h
	s := h.until("a clear error", func(s client.Status) bool { return s.LastError.Code != 0 })
	if !strings.Contains(s.LastError.Message, "not a UserSig") {
		t.Errorf("last error %+v", s.LastError)
	}
}

// Run returns only after every goroutine it started has ended: once it
// has returned, no goroutine runs the daemon's code.
//
// It runs in a process of its own, so that no other test's goroutines are
// counted.
func TestRunEndsEveryGoroutine(t *testing.T) {
	if os.Getenv("CHATD_GOROUTINE_CHILD") == "" {
		cmd := exec.Command(os.Args[0], "-test.run=^TestRunEndsEveryGoroutine$", "-test.count=1")
		cmd.Env = append(os.Environ(), "CHATD_GOROUTINE_CHILD=1")
		out, err := cmd.CombinedOutput()
		if err != nil || !strings.Contains(string(out), "PASS") {
			t.Fatalf("in its own process: %v\n%s", err, out)
		}
		return
	}
	h := newHarness(t, nil, withCommand())
	h.login("dev-42", sigFor(t, "dev-42", start, 2*time.Hour))
	h.untilStatus(client.Logined, true)
	h.gw.hold = make(chan struct{}) // a request that never gets its answer
	h.cmdMu.Lock()                  // and a helper that hangs
	h.gw.last().drop()
	s := h.until("a retry", func(s client.Status) bool { return s.NextRetryAt != nil })
	h.clock.Advance(s.NextRetryAt.Sub(h.clock.Now()) + time.Hour)
	h.until("the login request in flight", func(client.Status) bool { return h.gw.received() >= 2 })
	go func() { time.Sleep(100 * time.Millisecond); h.cmdMu.Unlock() }()
	h.stop() // returns when Run has returned
	// A tracked goroutine may still be returning from its wrapper (it has
	// told Run it is done); anything else of the daemon's is a leak.
	deadline := time.Now().Add(time.Second)
	for {
		buf := make([]byte, 1<<20)
		stacks := string(buf[:runtime.Stack(buf, true)])
		ending := 0
		for _, g := range strings.Split(stacks, "\n\n") {
			if !strings.Contains(g, "chatd/daemon.(*Daemon)") || strings.Contains(g, "TestRunEndsEveryGoroutine") {
				continue
			}
			// Its innermost frame of the daemon's, under any of the
			// WaitGroup's own (Done telling Run, still on its way out);
			// none at all when only the runtime's exit is left (seen under
			// qemu on armv7: runtime.goexit1, created by goTracked).
			lines := strings.Split(g, "\n")
			top := ""
			for i := 1; i < len(lines); i += 2 {
				f := strings.TrimSpace(lines[i])
				if strings.HasPrefix(f, "created by ") {
					break
				}
				if !strings.HasPrefix(f, "sync.") && !strings.HasPrefix(f, "runtime.") && !strings.HasPrefix(f, "internal/") {
					top = f
					break
				}
			}
			if top == "" || strings.HasPrefix(top, "chatd/daemon.(*Daemon).goTracked.func1(") {
				ending++
				continue
			}
			t.Fatalf("a goroutine of the daemon outlives Run:\n%s", g)
		}
		if ending == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d tracked goroutines did not end:\n%s", ending, stacks)
		}
		time.Sleep(time.Millisecond)
	}
}

// /v1/server-time is anchored on the monotonic clock: a step of the wall
// clock after login does not move it; a persisted offset is not "known".
func TestServerTimeSurvivesClockSteps(t *testing.T) {
	store := storage.NewMemory()
	store.Save(storage.State{InstanceID: "i", Status: int(client.Logout), ServerTimeOffset: time.Hour})
	h := newHarness(t, store)
	if st := h.d.ServerTime(); st.Known {
		t.Errorf("known before any answer in this run: %+v", st)
	}
	h.login("dev-42", sigFor(t, "dev-42", start, 24*time.Hour))
	h.untilStatus(client.Logined, true)
	before := h.d.ServerTime()
	if !before.Known || before.ServerTimeMs != start.UnixMilli() {
		t.Fatalf("after login: %+v", before)
	}
	h.clock.Step(200 * 24 * time.Hour)
	h.settle()
	if after := h.d.ServerTime(); after.ServerTimeMs != before.ServerTimeMs {
		t.Errorf("a wall-clock step moved the server time by %s", time.Duration(after.ServerTimeMs-before.ServerTimeMs)*time.Millisecond)
	}
	if s := h.d.Status(); s.LoginStatus != client.Logined || !s.Connected {
		t.Errorf("after the step: %+v", s)
	}
}

// Restarted without its usersig_file, chatd logs in from the state.
func TestUserSigFileRemovedAfterFirstLogin(t *testing.T) {
	dir := t.TempDir()
	file := dir + "/usersig"
	os.WriteFile(file, []byte(sigFor(t, "dev-7", start, 24*time.Hour).Reveal()+"\n"), 0o600)
	store := storage.NewMemory()
	cfgf := func(c *Config, h *harness) { c.UserID = "dev-7"; c.UserSigFile = file }
	h := newHarness(t, store, cfgf)
	h.untilStatus(client.Logined, true)
	h.stop()
	os.Remove(file)
	cfg := DefaultConfig()
	cfg.SDKAppID, cfg.UserID, cfg.UserSigFile = appID, "dev-7", file
	for _, p := range cfg.Check() {
		if p.Key == "usersig_file" && p.Fatal {
			t.Errorf("a removed usersig_file is an error: %s", p)
		}
	}
	h2 := newHarness(t, store, cfgf)
	h2.gw.n = 1
	s := h2.untilStatus(client.Logined, true)
	if s.Session != "s1" {
		t.Errorf("after restart: %+v", s)
	}
}

// A failing state directory: chatd runs on, says so in the status, and a
// logout that could not be persisted says so in its answer.
func TestStateWriteFailureIsSurfaced(t *testing.T) {
	store := storage.NewMemory()
	h := newHarness(t, store)
	h.login("dev-42", sigFor(t, "dev-42", start, 24*time.Hour))
	h.untilStatus(client.Logined, true)
	if s := h.d.Status(); !s.StatePersisted {
		t.Fatalf("healthy store reported as not persisted: %+v", s)
	}
	store.FailWrites(errors.New("read-only file system"))
	code, desc := h.d.Logout(context.Background())
	if code != 0 || !strings.Contains(desc, "not persisted") || !strings.Contains(desc, "read-only file system") {
		t.Errorf("logout answered %d %q", code, desc)
	}
	s := h.d.Status()
	if s.StatePersisted || !strings.Contains(s.StateError, "read-only") || s.LoginStatus != client.Logout {
		t.Errorf("status %+v", s)
	}
	var b strings.Builder
	h.d.WriteMetrics(&b)
	if !strings.Contains(b.String(), "chatd_state_persisted 0") || strings.Contains(b.String(), "chatd_state_write_failures_total 0") {
		t.Errorf("metrics:\n%s", b.String())
	}
	store.FailWrites(nil)
	h.login("dev-42", sigFor(t, "dev-42", start, 24*time.Hour))
	if s := h.d.Status(); !s.StatePersisted {
		t.Errorf("after the store healed: %+v", s)
	}
}

// The watchdog's Probe makes the idle loop turn at once (Alive moves with
// the loop's clock), without the loop waking up on its own.
func TestProbeTurnsTheIdleLoop(t *testing.T) {
	h := newHarness(t, nil)
	h.login("dev-42", sigFor(t, "dev-42", start, 24*time.Hour))
	h.untilStatus(client.Logined, true)
	h.settle()
	before := h.d.Alive()
	h.clock.mu.Lock()
	h.clock.now = h.clock.now.Add(time.Second) // moves Alive's clock, fires no timer
	h.clock.mu.Unlock()
	got := h.d.Probe(context.Background(), 10*time.Second)
	if want := before.Add(time.Second); !got.Equal(want) {
		t.Errorf("Probe returned Alive %v, want %v (the loop turned at the clock's new time)", got, want)
	}
}
