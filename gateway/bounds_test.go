package gateway

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"chatd/codes"
	"chatd/mqtt"
)

// A device that invents instance ids (one login each, some going offline
// before the next kicks them) leaves a bounded amount behind.
func TestInventedInstancesStayBounded(t *testing.T) {
	r := newRig(t, func(c *Config) { c.AnswerCacheSize = 1000 })
	sig := r.sig("alice", 24*time.Hour)
	const n = 10000
	for i := range n {
		inst := fmt.Sprintf("made-up-%d", i)
		r.now = r.now.Add(time.Millisecond)
		out := r.send("alice", inst, mqtt.Message{Type: mqtt.TypeLogin, ID: "x", UserSig: sig})
		if res := out[len(out)-1].Msg; res.Code != 0 {
			t.Fatalf("login %d: %d %s", i, res.Code, res.Desc)
		}
		if i%2 == 0 {
			// Offline, so that the next login kicks it while offline: a flag.
			r.send("alice", inst, mqtt.Message{Type: mqtt.TypeOffline})
		}
	}
	maxT := r.e.cfg.MaxTombstones
	if got := len(r.e.sessions); got > 1+maxT {
		t.Errorf("%d sessions remembered after %d invented instances, want at most %d", got, n, 1+maxT)
	}
	if got := len(r.e.users["alice"].sessions); got != len(r.e.sessions) {
		t.Errorf("per-user index has %d sessions, the id index %d", got, len(r.e.sessions))
	}
	if got := len(r.e.insts); got > maxT {
		t.Errorf("%d instance records, want at most %d", got, maxT)
	}
	if got := r.e.replies.len(); got > 1000 {
		t.Errorf("%d cached answers, want at most 1000", got)
	}
	for kind, atLeast := range map[string]uint64{"tombstone": n - 1 - uint64(maxT), "answer": n - 1000, "instance_flag": 1} {
		if got := r.e.stats.evictions.Get(kind); got < atLeast {
			t.Errorf("chatgw_state_evicted_total{kind=%q} = %d, want at least %d", kind, got, atLeast)
		}
	}
	// The one live session is the last one, and still resumes.
	active := r.e.ActiveSessions("alice")
	if len(active) != 1 || active[0].Instance != fmt.Sprintf("made-up-%d", n-1) {
		t.Fatalf("active sessions = %+v", active)
	}
}

func TestFailureCountersBounded(t *testing.T) {
	r := newRig(t, func(c *Config) { c.FailureUsers = 100 })
	for i := range 1000 {
		r.send(fmt.Sprintf("u%d", i), "i", mqtt.Message{Type: mqtt.TypeLogin, UserSig: "garbage"})
	}
	if got := r.e.failed.len(); got != 100 {
		t.Errorf("%d failure counters, want 100", got)
	}
	if got := r.e.stats.evictions.Get("failure_counter"); got != 900 {
		t.Errorf("evicted failure counters = %d, want 900", got)
	}
	// Counters expire with their window too.
	r.now = r.now.Add(2 * time.Minute)
	r.e.Expire(r.now)
	if got := r.e.failed.len(); got != 0 {
		t.Errorf("%d failure counters after the window, want 0", got)
	}
}

func TestLoginCreatesNoInstanceRecord(t *testing.T) {
	r := newRig(t, nil)
	r.login("alice", "a", "Linux")
	r.login("alice", "a", "Linux")
	if rec := r.e.record("alice"); len(r.e.insts) != 0 || rec == nil || len(rec.KickedOffline) != 0 {
		t.Errorf("logins created instance records: %v, record %+v", r.e.insts, rec)
	}
}

func TestReplayedAnswer(t *testing.T) {
	r := newRig(t, nil)
	login := mqtt.Message{Type: mqtt.TypeLogin, ID: "req-1", UserSig: r.sig("alice", time.Hour)}
	first := r.send("alice", "a", login)[0].Msg
	r.now = r.now.Add(5 * time.Second)
	again := r.send("alice", "a", login)[0].Msg
	if again.Session != first.Session || again.ServerTimeMs != r.now.UnixMilli() {
		t.Errorf("replayed answer: session %s (want %s), server_time_ms %d (want the time of the replay, %d)",
			again.Session, first.Session, again.ServerTimeMs, r.now.UnixMilli())
	}
	// After AnswerTTL the id is forgotten: the request is carried out again.
	r.now = r.now.Add(r.e.cfg.AnswerTTL + time.Second)
	login.UserSig = r.sig("alice", time.Hour)
	if late := r.send("alice", "a", login)[0].Msg; late.Session == first.Session {
		t.Errorf("a request id was remembered past AnswerTTL (%s)", r.e.cfg.AnswerTTL)
	}
}

// Presence is per connection: an offline message from an older connection
// does not touch the session of a newer one.
func TestPresencePerConnection(t *testing.T) {
	type step struct {
		inst string
		m    mqtt.Message
	}
	login := func(conn string) mqtt.Message { return mqtt.Message{Type: mqtt.TypeLogin, Conn: conn} }
	offline := func(conn string) mqtt.Message { return mqtt.Message{Type: mqtt.TypeOffline, Conn: conn} }
	for _, tc := range []struct {
		name       string
		steps      []step
		wantOnline bool // the last login's session
	}{
		{"own connection's Will", []step{{"a", login("c1")}, {"a", offline("c1")}}, false},
		{"older connection's Will after a new login", []step{{"a", login("c1")}, {"a", login("c2")}, {"a", offline("c1")}}, true},
		{"older connection's Will after a resume", []step{{"a", login("c1")}, {"a", offline("c1")}, {"a", mqtt.Message{Type: mqtt.TypeResume, Conn: "c2"}}, {"a", offline("c1")}}, true},
		{"a goodbye naming another session", []step{{"a", login("")}, {"a", mqtt.Message{Type: mqtt.TypeOffline, Session: "s-other"}}}, true},
		{"device naming no connection", []step{{"a", login("")}, {"a", offline("")}}, false},
		{"an invalid conn counts as none", []step{{"a", login("c1")}, {"a", offline("bad conn!")}}, false},
		{"another instance's Will", []step{{"a", login("c1")}, {"b", offline("c1")}}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t, func(c *Config) { c.Policy = MultiPlatform })
			var session string
			for _, s := range tc.steps {
				r.now = r.now.Add(time.Second)
				m := s.m
				switch m.Type {
				case mqtt.TypeLogin:
					m.UserSig = r.sig("alice", time.Hour)
				case mqtt.TypeResume:
					m.Session = session
				}
				out := r.send("alice", s.inst, m)
				if m.Type == mqtt.TypeLogin {
					session = out[len(out)-1].Msg.Session
				}
			}
			if got := r.e.sessions[session].Online; got != tc.wantOnline {
				t.Errorf("session online = %v, want %v", got, tc.wantOnline)
			}
		})
	}
}

func TestAllOfflineAtStartup(t *testing.T) {
	path := filepath.Join(t.TempDir(), "gw.db")
	now := t0
	opts := Options{Config: Config{SDKAppID: testAppID, Key: testKey}, StatePath: path, Now: func() time.Time { return now }}
	g, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	r := newRig(t, nil)
	g.HandleMessage("chat/v1/up/alice/a", mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, UserSig: r.sig("alice", time.Hour)}))
	g.Close()
	for _, tc := range []struct {
		noSurvivors bool
		want        bool
	}{{false, true}, {true, false}} {
		opts.NoSurvivors = tc.noSurvivors
		g, err := New(opts)
		if err != nil {
			t.Fatal(err)
		}
		ss := g.Sessions("alice")
		g.Close()
		if len(ss) != 1 || ss[0].Online != tc.want {
			t.Errorf("NoSurvivors=%v: sessions %+v, want one with online=%v", tc.noSurvivors, ss, tc.want)
		}
	}
}

// A state write that fails is never answered with success: the device gets
// a retryable code, the admin an error, the change stays in memory and is
// written once the disk works again; then the held kick goes out and the
// same request id gets its answer.
func TestStateWriteFailure(t *testing.T) {
	path := filepath.Join(t.TempDir(), "gw.db")
	now := t0
	opts := Options{Config: Config{SDKAppID: testAppID, Key: testKey}, StatePath: path, Now: func() time.Time { return now }}
	g, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	var pub recording
	g.SetPublisher(&pub)
	r := newRig(t, nil)
	sig := r.sig("alice", time.Hour)
	g.HandleMessage("chat/v1/up/alice/a", mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "l1", UserSig: sig}))
	g.sendQueued()
	first := pub.last(t)

	diskFull := errors.New("no space left on device")
	g.st.(*boltStore).failWrites = func() error { return diskFull }
	now = now.Add(2 * time.Second)
	login := mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "l2", UserSig: r.sig("alice", time.Hour), Platform: "Android"})
	g.HandleMessage("chat/v1/up/alice/b", login)
	g.sendQueued()
	got := pub.last(t)
	if got.Type != mqtt.TypeLoginResult || got.Code != codes.ServerInternal2 || !codes.Retryable(got.Code) || got.ID != "l2" {
		t.Fatalf("answer while the disk fails: %+v, want a retryable %d for l2", got, codes.ServerInternal2)
	}
	if len(pub.sent) != 2 {
		t.Errorf("the kick of alice/a went out before it was written: %v", pub.sent)
	}
	if _, _, err := g.Kick("bob"); err == nil {
		t.Error("admin kick succeeded while the disk fails")
	}

	g.st.(*boltStore).failWrites = nil
	now = now.Add(time.Second)
	g.Tick() // the retry
	g.sendQueued()
	if !strings.Contains(pub.sentText(), "alice/a kick "+first.Session) {
		t.Errorf("the held kick did not go out after the write: %v", pub.sent)
	}
	// The device retries with the same id and gets the saved answer.
	g.HandleMessage("chat/v1/up/alice/b", login)
	g.sendQueued()
	res := pub.last(t)
	if res.Code != 0 || res.ID != "l2" {
		t.Fatalf("retried login: %+v", res)
	}
	if got := g.stats.writeFails.Load(); got == 0 {
		t.Error("chatgw_state_write_failures_total did not count")
	}
	g.Close()
	g, err = New(opts)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	ss := g.Sessions("alice")
	if len(ss) != 1 || ss[0].ID != res.Session {
		t.Errorf("after a restart: %+v, want the session %s", ss, res.Session)
	}
	if _, ok := g.RevokedBefore("bob"); !ok {
		t.Error("the admin kick of bob, refused while the disk failed, was lost instead of written later")
	}
}

type recording struct {
	sent []string
	msgs []mqtt.Message
}

func (p *recording) Publish(topic string, _ byte, payload []byte) error {
	m, _ := mqtt.Decode(payload)
	who := strings.TrimPrefix(topic, "chat/v1/down/")
	p.sent = append(p.sent, fmt.Sprintf("%s %s %s %d", who, m.Type, m.Session, m.Code))
	p.msgs = append(p.msgs, m)
	return nil
}

func (p *recording) last(t *testing.T) mqtt.Message {
	t.Helper()
	if len(p.msgs) == 0 {
		t.Fatal("nothing was sent")
	}
	return p.msgs[len(p.msgs)-1]
}

func (p *recording) sentText() string { return strings.Join(p.sent, "\n") }

func TestFairQueue(t *testing.T) {
	q := newFairQueue[string](3, 100)
	for i := range 5 {
		q.push("flood", fmt.Sprintf("f%d", i))
	}
	q.push("alice", "a1")
	q.push("bob", "b1")
	q.push("alice", "a2")
	var got []string
	for {
		v, ok := q.tryPop()
		if !ok {
			break
		}
		got = append(got, v)
	}
	// The flooder's share is 3; the others are served between its messages,
	// each device's own messages in order.
	want := []string{"f0", "a1", "b1", "f1", "a2", "f2"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("served (-want +got):\n%s", diff)
	}
}

func TestLimiter(t *testing.T) {
	l := newLimiter(RateLimit{Rate: 10, Burst: 5})
	now := t0
	n := 0
	for range 100 {
		if l.allow("d", now) {
			n++
		}
	}
	if n != 5 {
		t.Errorf("a burst let %d through, want 5", n)
	}
	now = now.Add(time.Second)
	n = 0
	for range 100 {
		if l.allow("d", now) {
			n++
		}
	}
	if n != 5 {
		t.Errorf("after a second %d through, want 5 (the burst; the rate refilled it)", n)
	}
	// Idle buckets are forgotten.
	for i := range 1000 {
		l.allow(fmt.Sprintf("k%d", i), now)
	}
	now = now.Add(time.Minute)
	l.allow("d", now)
	if len(l.m) != 1 {
		t.Errorf("%d buckets kept after a minute of silence, want 1", len(l.m))
	}
}
