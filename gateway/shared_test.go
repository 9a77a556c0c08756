package gateway

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"chatd/codes"
	"chatd/mqtt"
	"chatd/usersig"
)

// syncRecording is a publisher for gateways that run at once: it records
// "user/instance message" pairs.
type syncRecording struct {
	mu   sync.Mutex
	outs []Outbound
}

func (p *syncRecording) Publish(topic string, _ byte, payload []byte) error {
	m, err := mqtt.Decode(payload)
	if err != nil {
		return err
	}
	user, instance, _ := strings.Cut(strings.TrimPrefix(topic, "chat/v1/down/"), "/")
	p.mu.Lock()
	p.outs = append(p.outs, Outbound{UserID: user, Instance: instance, Msg: m})
	p.mu.Unlock()
	return nil
}

// take returns what was sent since the last take.
func (p *syncRecording) take() []Outbound {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := p.outs
	p.outs = nil
	return out
}

// gwFleet is gateways sharing one store, with one fake clock.
type gwFleet struct {
	t   *testing.T
	st  StateStore
	cfg Config
	gs  []*Gateway
	pub []*syncRecording
	mu  sync.Mutex
	now time.Time
}

func newGWFleet(t *testing.T, st StateStore, n int, cfg Config, views ...StateStore) *gwFleet {
	t.Helper()
	f := &gwFleet{t: t, st: st, cfg: cfg, now: t0}
	for i := range n {
		var ids atomic.Int64
		view := st
		if i < len(views) {
			view = views[i]
		}
		g, err := New(Options{Config: cfg, Store: view, Now: f.clock,
			NewID: func() string { return fmt.Sprintf("g%d-%d", i, ids.Add(1)) }})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { g.Close() })
		p := &syncRecording{}
		g.SetPublisher(p)
		f.gs = append(f.gs, g)
		f.pub = append(f.pub, p)
	}
	return f
}

func (f *gwFleet) clock() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.now
}

func (f *gwFleet) advance(d time.Duration) {
	f.mu.Lock()
	f.now = f.now.Add(d)
	f.mu.Unlock()
}

// sent returns what every gateway sent since the last call.
func (f *gwFleet) sent() []Outbound {
	var out []Outbound
	for i, g := range f.gs {
		g.sendQueued()
		out = append(out, f.pub[i].take()...)
	}
	return out
}

func (f *gwFleet) conflicts() uint64 {
	var n uint64
	for _, g := range f.gs {
		n += g.stats.conflicts.Load()
	}
	return n
}

// settle waits until every gateway's cache holds the store's record of
// user.
func (f *gwFleet) settle(user string) {
	f.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		sr, err := f.st.Get(context.Background(), user)
		if err != nil {
			f.t.Fatal(err)
		}
		ok := true
		for _, g := range f.gs {
			g.mu.Lock()
			rev := g.revs[user]
			g.mu.Unlock()
			if rev != sr.Revision {
				ok = false
			}
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			f.t.Fatalf("the gateways' caches did not reach revision %d of %s", sr.Revision, user)
		}
		time.Sleep(time.Millisecond)
	}
}

// event is one thing that happens to a user: a device message or an
// admin kick.
type event struct {
	kind     string // login, logout, resume, offline, kick
	instance string
	platform string
	session  string
	id       string
	sig      string
}

func (ev event) msg(user string) mqtt.Message {
	switch ev.kind {
	case "login":
		return mqtt.Message{Type: mqtt.TypeLogin, ID: ev.id, UserSig: ev.sig, Platform: ev.platform}
	case "logout":
		return mqtt.Message{Type: mqtt.TypeLogout, ID: ev.id, Session: ev.session}
	case "resume":
		return mqtt.Message{Type: mqtt.TypeResume, ID: ev.id, Session: ev.session}
	default:
		return mqtt.Message{Type: mqtt.TypeOffline, Session: ev.session}
	}
}

// on carries out ev on gateway g.
func (ev event) on(t *testing.T, g *Gateway, user string) {
	if ev.kind == "kick" {
		if _, _, err := g.Kick(user); err != nil {
			t.Errorf("kick: %v", err)
		}
		return
	}
	g.HandleMessage("chat/v1/up/"+user+"/"+ev.instance, mqtt.Encode(ev.msg(user)))
}

// onEngine carries out ev on a reference engine.
func (ev event) onEngine(e *engine, now time.Time, user string) []Outbound {
	if ev.kind == "kick" {
		out, _ := e.Kick(now, user)
		return out
	}
	return e.Handle(now, user, ev.instance, ev.msg(user))
}

var testPlatforms = []string{"Linux", "Android", "Web", "Windows"}

// describe turns outbounds into comparable lines: session ids, which
// differ between gateways and the reference, become what the final record
// says about the session.
func describe(out []Outbound, rec *UserRecord, user string) []string {
	byID := map[string]string{}
	if rec != nil {
		for _, s := range rec.Sessions {
			byID[s.ID] = fmt.Sprintf("%s/%s/%s", s.Instance, s.Platform, s.EndReason)
		}
	}
	var lines []string
	for _, o := range out {
		if o.UserID != user {
			continue
		}
		sess := o.Msg.Session
		if d, ok := byID[sess]; ok {
			sess = d
		} else if sess != "" {
			sess = "?"
		}
		lines = append(lines, fmt.Sprintf("%s %s id=%s %s code=%d %s", o.Instance, o.Msg.Type, o.Msg.ID, sess, o.Msg.Code, o.Msg.Reason))
	}
	slices.Sort(lines)
	return lines
}

// shape is a record without its session ids and login times.
func shape(rec *UserRecord) []string {
	if rec == nil {
		return nil
	}
	var lines []string
	for _, s := range rec.Sessions {
		lines = append(lines, fmt.Sprintf("session %s/%s online=%v ended=%q by=%q", s.Instance, s.Platform, s.Online, s.EndReason, s.KickedBy))
	}
	for inst := range rec.KickedOffline {
		lines = append(lines, "kicked offline "+inst)
	}
	if rec.RevokedAt != 0 {
		lines = append(lines, fmt.Sprint("revoked ", rec.RevokedAt))
	}
	slices.Sort(lines)
	return lines
}

// Two gateways on one store, each handling one event of the same user at
// the same moment (logins of two instances, a logout or a resume during a
// login, a revocation racing a login), end exactly where one gateway
// handling the two events one after the other would: the same record, the
// same answers and kicks, in one of the two orders. Many rounds, seeded.
func TestFleetDecidesLikeOneGateway(t *testing.T) {
	rounds := 600
	if testing.Short() {
		rounds = 150 // under emulation (test-arm)
	}
	t.Run("memory", func(t *testing.T) { st := NewMemoryStore(); testFleetLikeOne(t, st, st, rounds) })
	t.Run("kv", func(t *testing.T) {
		if testing.Short() {
			t.Skip("the key-value store under -short")
		}
		js := jsConnect(t, startNATS(t, t.TempDir()))
		st, err := OpenKV(context.Background(), js, KVOptions{Bucket: "race"})
		if err != nil {
			t.Fatal(err)
		}
		defer st.Close()
		testFleetLikeOne(t, st, st, 150)
	})
	t.Run("kv-r3", func(t *testing.T) {
		if testing.Short() {
			t.Skip("the key-value store under -short")
		}
		// The gateways on two nodes of a three-node cluster.
		cluster := startCluster(t, 3)
		st := openKVRetrying(t, jsConnect(t, cluster[0]), KVOptions{Bucket: "race3", Replicas: 3})
		defer st.Close()
		other := openKVRetrying(t, jsConnect(t, cluster[2]), KVOptions{Bucket: "race3", Replicas: 3})
		defer other.Close()
		testFleetLikeOne(t, st, other, 100)
	})
}

// testFleetLikeOne runs two gateways, one on st, the other on other (st
// itself, or the same bucket through another server).
func testFleetLikeOne(t *testing.T, st, other StateStore, rounds int) {
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 9))
	cfg := Config{SDKAppID: testAppID, Key: testKey, Instances: Instances{"Linux": 2, "Android": 1, "Web": 2, "Windows": 1}}
	cfg.setDefaults()
	// The second gateway's watch is held back in some rounds: then it
	// decides on what it knew before the round.
	hw := &heldWatch{StateStore: other}
	f := newGWFleet(t, st, 2, cfg, st, hw)
	req := 0
	newEvent := func(user string, sessions []Session) event {
		req++
		ev := event{id: fmt.Sprint("r", req), instance: fmt.Sprint("i", rng.IntN(3))}
		kinds := []string{"login", "login", "login", "kick"}
		if len(sessions) > 0 {
			kinds = append(kinds, "logout", "resume", "offline")
		}
		ev.kind = kinds[rng.IntN(len(kinds))]
		switch ev.kind {
		case "login":
			ev.platform = testPlatforms[rng.IntN(len(testPlatforms))]
			// Issued before any kick of this round, so that the order
			// of a kick and a login decides.
			sig, err := usersig.Generate(testAppID, testKey, user, 24*time.Hour, f.clock().Add(-10*time.Second))
			if err != nil {
				t.Fatal(err)
			}
			ev.sig = sig
		case "logout", "resume", "offline":
			s := sessions[rng.IntN(len(sessions))]
			ev.session, ev.instance = s.ID, s.Instance
		}
		return ev
	}
	for round := range rounds {
		user := fmt.Sprintf("u%d", round%20)
		f.advance(time.Minute)
		hw.hold(rng.IntN(2) == 0)
		// Some history, through either gateway. The clock moves between
		// events: sessions logged in at the same instant are ordered by
		// id, which the reference engine makes differently.
		for range rng.IntN(3) {
			f.advance(time.Second)
			sr, _ := st.Get(context.Background(), user)
			var ss []Session
			if sr.Record != nil {
				ss = sr.Record.Sessions
			}
			ev := newEvent(user, ss)
			ev.on(t, f.gs[rng.IntN(2)], user)
		}
		if rng.IntN(2) == 0 && !hw.isHeld() {
			f.settle(user) // else the second gateway may not have seen it
		}
		f.sent()
		f.advance(time.Second)
		init, err := st.Get(context.Background(), user)
		if err != nil {
			t.Fatal(err)
		}
		var ss []Session
		if init.Record != nil {
			ss = init.Record.Sessions
		}
		evs := []event{newEvent(user, ss), newEvent(user, ss)}
		var wg sync.WaitGroup
		for i, ev := range evs {
			wg.Go(func() { ev.on(t, f.gs[i], user) })
		}
		wg.Wait()
		got := f.sent()
		final, err := st.Get(context.Background(), user)
		if err != nil {
			t.Fatal(err)
		}

		// The reference: one engine, in either order.
		var tries []string
		ok := false
		for _, order := range [][]event{{evs[0], evs[1]}, {evs[1], evs[0]}} {
			e := newEngine(cfg, func() string { return fmt.Sprint("ref-", rng.Uint64()) }, newStats(f.clock, nil))
			e.setUser(user, init.Record)
			var out []Outbound
			for _, ev := range order {
				out = append(out, ev.onEngine(e, f.clock(), user)...)
			}
			ref := e.record(user)
			d := cmp.Diff(shape(ref), shape(final.Record)) + cmp.Diff(describe(out, ref, user), describe(got, final.Record, user))
			if d == "" {
				ok = true
				break
			}
			tries = append(tries, d)
		}
		if !ok {
			t.Fatalf("round %d (seed %d): %s: %+v and %+v from\n%s\nmatch neither order:\n%s", round, seed, user, evs[0], evs[1], strings.Join(shape(init.Record), "\n"), strings.Join(tries, "\n--- other order:\n"))
		}
		hw.release()
		f.settle(user)
		for i, g := range f.gs {
			if diff := cmp.Diff(activeOf(final.Record), g.Sessions(user)); diff != "" {
				t.Fatalf("round %d: gateway %d's cache differs from the store (-store +cache):\n%s", round, i, diff)
			}
		}
	}
	if f.conflicts() == 0 {
		t.Errorf("in %d rounds no compare-and-set lost: the test did not race", rounds)
	}
	t.Logf("%d rounds, %d compare-and-sets lost and decided again", rounds, f.conflicts())
}

func activeOf(r *UserRecord) []Session {
	if r == nil {
		return nil
	}
	var out []Session
	for _, s := range r.Sessions {
		if s.Active() {
			out = append(out, s)
		}
	}
	return out
}

// heldWatch is a store whose watch delivers nothing until release: a
// gateway on it decides on a stale cache every time.
type heldWatch struct {
	StateStore
	mu     sync.Mutex
	held   bool
	queued []func()
}

func (h *heldWatch) Watch(ctx context.Context, fn func(Change)) (func(), error) {
	return h.StateStore.Watch(ctx, func(c Change) {
		h.mu.Lock()
		if h.held {
			h.queued = append(h.queued, func() { fn(c) })
			h.mu.Unlock()
			return
		}
		h.mu.Unlock()
		fn(c)
	})
}

func (h *heldWatch) hold(v bool) {
	if !v {
		h.release()
		return
	}
	h.mu.Lock()
	h.held = true
	h.mu.Unlock()
}

func (h *heldWatch) isHeld() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.held
}

func (h *heldWatch) release() {
	h.mu.Lock()
	q := h.queued
	h.queued, h.held = nil, false
	h.mu.Unlock()
	for _, fn := range q {
		fn()
	}
}

// A gateway that has not seen another's writes loses its compare-and-set,
// reads the user again and decides again: the second login kicks the
// first (not a lost update that leaves two sessions), the losing attempt's
// answer is not what the device gets, nor what the answer cache replays,
// and a resume of a session only the other gateway knew succeeds.
func TestStaleGatewayDecidesAgain(t *testing.T) {
	mem := NewMemoryStore()
	g1, err := New(Options{Config: Config{SDKAppID: testAppID, Key: testKey}, Store: mem, Now: func() time.Time { return t0 },
		NewID: func() string { return "first" }})
	if err != nil {
		t.Fatal(err)
	}
	defer g1.Close()
	hw := &heldWatch{StateStore: mem, held: true}
	n := 0
	g2, err := New(Options{Config: Config{SDKAppID: testAppID, Key: testKey}, Store: hw, Now: func() time.Time { return t0.Add(time.Second) },
		NewID: func() string { n++; return fmt.Sprint("second-", n) }})
	if err != nil {
		t.Fatal(err)
	}
	defer g2.Close()
	var p1, p2 recording
	g1.SetPublisher(&p1)
	g2.SetPublisher(&p2)
	r := newRig(t, nil)

	g1.HandleMessage("chat/v1/up/alice/a", mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "l1", UserSig: r.sig("alice", time.Hour), Platform: "Linux"}))
	g1.sendQueued()
	first := p1.last(t)
	login2 := mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "l2", UserSig: r.sig("alice", time.Hour), Platform: "Android"})
	g2.HandleMessage("chat/v1/up/alice/b", login2)
	g2.sendQueued()
	if got := g2.stats.conflicts.Load(); got != 1 {
		t.Errorf("%d conflicts, want 1", got)
	}
	want := []string{"alice/a kick first 6208", "alice/b login_result second-2 0"}
	if diff := cmp.Diff(want, p2.sent); diff != "" {
		t.Errorf("the stale gateway sent (-want +got):\n%s", diff)
	}
	sr, _ := mem.Get(context.Background(), "alice")
	if diff := cmp.Diff([]string{"session a/Linux online=false ended=\"kicked\" by=\"other_instance\"", "session b/Android online=true ended=\"\" by=\"\""}, shape(sr.Record)); diff != "" {
		t.Errorf("the record (-want +got):\n%s", diff)
	}
	// The repeated request gets the answer that was written.
	g2.HandleMessage("chat/v1/up/alice/b", login2)
	g2.sendQueued()
	if got := p2.last(t); got.Session != "second-2" || got.Code != 0 {
		t.Errorf("repeated login answered %+v, want session second-2", got)
	}
	if got := g2.stats.logins.Get("0"); got != 1 {
		t.Errorf("chatgw_logins_total{code=\"0\"} = %d on the stale gateway, want 1 (the losing attempt is not counted)", got)
	}

	// A resume on the stale gateway of a session made on the first: the
	// refusal the stale cache gives is checked against the store.
	g1.HandleMessage("chat/v1/up/bob/a", mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "l3", UserSig: r.sig("bob", time.Hour)}))
	g1.sendQueued()
	bob := p1.last(t).Session
	g2.HandleMessage("chat/v1/up/bob/a", mqtt.Encode(mqtt.Message{Type: mqtt.TypeResume, ID: "r1", Session: bob}))
	g2.sendQueued()
	if got := p2.last(t); got.Type != mqtt.TypeResumeResult || got.Code != 0 || got.Session != bob {
		t.Errorf("resume on the stale gateway: %+v", got)
	}
	hw.release()
	_ = first
}

// Every gateway runs the expiry timers over the whole gwFleet; the notice
// goes out once per expiry, from whichever gateway wins the
// compare-and-set.
func TestExpiryNoticeOnce(t *testing.T) {
	for round := range 50 {
		mem := NewMemoryStore()
		f := newGWFleet(t, mem, 2, Config{SDKAppID: testAppID, Key: testKey})
		const users = 5
		for i := range users {
			user := fmt.Sprintf("u%d", i)
			sig, err := usersig.Generate(testAppID, testKey, user, time.Minute, f.clock())
			if err != nil {
				t.Fatal(err)
			}
			f.gs[i%2].HandleMessage("chat/v1/up/"+user+"/a", mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "l", UserSig: sig}))
		}
		if round%2 == 0 {
			for i := range users {
				f.settle(fmt.Sprintf("u%d", i))
			}
		}
		f.sent()
		f.advance(2 * time.Minute)
		var wg sync.WaitGroup
		for _, g := range f.gs {
			wg.Go(func() { g.Tick() })
		}
		wg.Wait()
		notices := map[string]int{}
		for _, o := range f.sent() {
			if o.Msg.Type == mqtt.TypeUserSigExpire {
				notices[o.UserID]++
			}
		}
		for i := range users {
			user := fmt.Sprintf("u%d", i)
			if notices[user] != 1 {
				t.Fatalf("round %d: %s got %d expiry notices, want 1 (%v)", round, user, notices[user], notices)
			}
			sr, _ := mem.Get(context.Background(), user)
			if sr.Record == nil || len(sr.Record.Sessions) != 1 || sr.Record.Sessions[0].EndReason != EndExpired {
				t.Fatalf("round %d: %s's record after the expiry: %+v", round, user, sr.Record)
			}
		}
		var expired uint64
		for _, g := range f.gs {
			expired += g.stats.expired.Load()
		}
		if expired != users {
			t.Fatalf("round %d: chatgw_usersig_expired_total adds up to %d over the gateways, want %d", round, expired, users)
		}
	}
}

// A store that refuses a user's write: the login is never answered with
// success, the kick it decided is held, and both go out once the write
// succeeds; another user's write in the same group is not held back.
func TestFailedWriteNeverSuccess(t *testing.T) {
	mem := newMemoryStore()
	var failing atomic.Value
	failing.Store("")
	mem.failWrites = func(user string) error {
		if user == failing.Load().(string) {
			return errors.New("store unavailable")
		}
		return nil
	}
	now := t0
	g, err := New(Options{Config: Config{SDKAppID: testAppID, Key: testKey}, Store: mem, Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	var pub recording
	g.SetPublisher(&pub)
	r := newRig(t, nil)
	g.HandleMessage("chat/v1/up/alice/a", mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "l1", UserSig: r.sig("alice", time.Hour)}))
	g.sendQueued()
	first := pub.last(t).Session

	failing.Store("alice")
	pub = recording{}
	g.HandleMessages([]inbound{
		{topic: "chat/v1/up/alice/b", payload: mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "l2", UserSig: r.sig("alice", time.Hour), Platform: "Android"})},
		{topic: "chat/v1/up/bob/a", payload: mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "l3", UserSig: r.sig("bob", time.Hour)})},
	})
	g.sendQueued()
	for _, m := range pub.msgs {
		if m.ID == "l2" && m.Code != codes.ServerInternal2 || m.Type == mqtt.TypeKick {
			t.Errorf("while alice's record cannot be written: %v", pub.sent)
		}
		if m.ID == "l3" && m.Code != 0 {
			t.Errorf("bob's login was held back by alice's write: %v", pub.sent)
		}
	}
	if len(pub.msgs) != 2 {
		t.Errorf("sent %v, want the two answers", pub.sent)
	}
	failing.Store("")
	now = now.Add(time.Second)
	g.Tick()
	g.sendQueued()
	if !strings.Contains(pub.sentText(), "alice/a kick "+first) {
		t.Errorf("the held kick did not go out after the write: %v", pub.sent)
	}
}

// What the engine decided takes effect once nothing waits for a write:
// the counters of refused logins (which write nothing) count, and nothing
// is left pending.
func TestEffectsSettle(t *testing.T) {
	g, err := New(Options{Config: Config{SDKAppID: testAppID, Key: testKey}, Now: func() time.Time { return t0 }})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	g.SetPublisher(&recording{})
	r := newRig(t, nil)
	refused := mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "x", UserSig: "junk"})
	g.HandleMessage("chat/v1/up/bob/a", refused)
	g.HandleMessage("chat/v1/up/bob/a", refused) // answered from the cache
	g.HandleMessage("chat/v1/up/alice/a", mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "l", UserSig: r.sig("alice", time.Hour)}))
	if n := len(g.e.pend); n != 0 {
		t.Errorf("%d users' effects left pending", n)
	}
	if got := g.stats.logins.Get("0"); got != 1 {
		t.Errorf("logins with code 0: %d, want 1", got)
	}
	var refusedCount uint64
	g.stats.logins.mu.Lock()
	for code, n := range g.stats.logins.vals {
		if code != "0" {
			refusedCount += n.Load()
		}
	}
	g.stats.logins.mu.Unlock()
	if refusedCount != 1 || g.stats.drops.Get(dropRepeated) != 1 {
		t.Errorf("refused logins counted %d, repeated %d; want 1 and 1", refusedCount, g.stats.drops.Get(dropRepeated))
	}
}

// Gateways sharing a store report the same fleet gauges: the sessions and
// the daily active users come from the shared records.
func TestFleetGaugesAgree(t *testing.T) {
	f := newGWFleet(t, NewMemoryStore(), 2, Config{SDKAppID: testAppID, Key: testKey})
	r := newRig(t, nil)
	for i, user := range []string{"alice", "bob", "carol"} {
		f.gs[i%2].HandleMessage("chat/v1/up/"+user+"/a", mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "l", UserSig: r.sig(user, time.Hour)}))
	}
	f.gs[1].HandleMessage("chat/v1/up/alice/a", mqtt.Encode(mqtt.Message{Type: mqtt.TypeOffline}))
	for _, user := range []string{"alice", "bob", "carol"} {
		f.settle(user)
	}
	want := []string{"chatgw_daily_active_users 3", "chatgw_sessions_active 3", "chatgw_sessions_online 2"}
	for i, g := range f.gs {
		var b strings.Builder
		g.WriteMetrics(&b)
		for _, w := range want {
			if !strings.Contains(b.String(), w+"\n") {
				t.Errorf("gateway %d lacks %q", i, w)
			}
		}
	}
	// The next day nobody has been active yet.
	f.advance(24 * time.Hour)
	for i, g := range f.gs {
		var b strings.Builder
		g.WriteMetrics(&b)
		if !strings.Contains(b.String(), "chatgw_daily_active_users 0\n") {
			t.Errorf("gateway %d: the next day's active users are not 0", i)
		}
	}
}

// A record that becomes empty is deleted, the other gateway's cache
// follows, and the user's next login creates it anew, through either
// gateway (on the bucket: over its delete marker).
func TestDeletedRecordFollows(t *testing.T) {
	stores := map[string]func(t *testing.T) StateStore{"memory": func(*testing.T) StateStore { return NewMemoryStore() }}
	if !testing.Short() {
		stores["kv"] = func(t *testing.T) StateStore {
			st, err := OpenKV(context.Background(), jsConnect(t, startNATS(t, t.TempDir())), KVOptions{Bucket: "del"})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { st.Close() })
			return st
		}
	}
	for name, open := range stores {
		t.Run(name, func(t *testing.T) {
			st := open(t)
			f := newGWFleet(t, st, 2, Config{SDKAppID: testAppID, Key: testKey, TombstoneTTL: time.Hour})
			login := func(g *Gateway, id string) {
				sig, _ := usersig.Generate(testAppID, testKey, "alice", 24*time.Hour, f.clock())
				g.HandleMessage("chat/v1/up/alice/a", mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: id, UserSig: sig}))
			}
			login(f.gs[0], "l1")
			out := f.sent()
			session := out[len(out)-1].Msg.Session
			f.gs[1].HandleMessage("chat/v1/up/alice/a", mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogout, ID: "o1", Session: session}))
			f.settle("alice")
			f.advance(2 * time.Hour)
			f.gs[0].Tick() // forgets the tombstone: nothing left, the record goes
			if sr, _ := st.Get(context.Background(), "alice"); sr.Revision != 0 {
				t.Fatalf("record after the tombstone went: %+v", sr)
			}
			deadline := time.Now().Add(10 * time.Second)
			for {
				f.gs[1].mu.Lock()
				_, cached := f.gs[1].e.users["alice"]
				f.gs[1].mu.Unlock()
				if !cached {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("the other gateway still caches the deleted record")
				}
				time.Sleep(time.Millisecond)
			}
			f.gs[1].Tick()
			login(f.gs[1], "l2")
			f.settle("alice")
			f.advance(time.Second)
			login(f.gs[0], "l3") // a new UserSig: replaces the session made through the other gateway
			got := f.sent()
			sr, _ := st.Get(context.Background(), "alice")
			if diff := cmp.Diff([]string{"session a/Linux online=false ended=\"replaced\" by=\"\"", "session a/Linux online=true ended=\"\" by=\"\""}, shape(sr.Record)); diff != "" {
				t.Errorf("after logins through both gateways (-want +got):\n%s\nsent %v", diff, got)
			}
			f.settle("alice")
			for i, g := range f.gs {
				if diff := cmp.Diff(activeOf(sr.Record), g.Sessions("alice")); diff != "" {
					t.Errorf("gateway %d's cache (-store +cache):\n%s", i, diff)
				}
			}
		})
	}
}

// The notice of an expiry goes out also when the gateway that accepted
// the login is gone: the other one learned the session from the store, and
// its timer is woken for it.
func TestExpiryAfterGatewayGone(t *testing.T) {
	mem := NewMemoryStore()
	f := newGWFleet(t, mem, 2, Config{SDKAppID: testAppID, Key: testKey})
	f.gs[1].Tick() // nothing due: its timer sleeps for an hour
	select {
	case <-f.gs[1].wake:
	default:
	}
	sig, _ := usersig.Generate(testAppID, testKey, "alice", time.Minute, f.clock())
	f.gs[0].HandleMessage("chat/v1/up/alice/a", mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "l", UserSig: sig}))
	f.settle("alice")
	f.gs[0].Close()
	f.sent()
	select {
	case <-f.gs[1].wake:
	case <-time.After(10 * time.Second):
		t.Fatal("the watched session's expiry did not wake the other gateway's timer")
	}
	f.advance(2 * time.Minute)
	f.gs[1].Tick()
	var notices []string
	for _, o := range f.sent() {
		if o.Msg.Type == mqtt.TypeUserSigExpire {
			notices = append(notices, o.UserID+"/"+o.Instance)
		}
	}
	if diff := cmp.Diff([]string{"alice/a"}, notices); diff != "" {
		t.Errorf("expiry notices (-want +got):\n%s", diff)
	}
}

// A request repeated through another gateway (the device's answer was lost
// on the way, and the queue group gave the retry to another member) gets
// the answer that was written with the record, not a second session:
// with the other gateway's cache up to date and with it stale.
func TestRepeatedRequestThroughAnotherGateway(t *testing.T) {
	for _, stale := range []bool{false, true} {
		t.Run(fmt.Sprintf("stale=%v", stale), func(t *testing.T) {
			mem := NewMemoryStore()
			n := 0
			newID := func() string { n++; return fmt.Sprint("s", n) }
			g1, err := New(Options{Config: Config{SDKAppID: testAppID, Key: testKey}, Store: mem, Now: func() time.Time { return t0 }, NewID: newID})
			if err != nil {
				t.Fatal(err)
			}
			defer g1.Close()
			hw := &heldWatch{StateStore: mem, held: stale}
			g2, err := New(Options{Config: Config{SDKAppID: testAppID, Key: testKey}, Store: hw, Now: func() time.Time { return t0.Add(time.Second) }, NewID: newID})
			if err != nil {
				t.Fatal(err)
			}
			defer g2.Close()
			defer hw.release()
			var p1, p2 recording
			g1.SetPublisher(&p1)
			g2.SetPublisher(&p2)
			r := newRig(t, nil)

			login := mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "l1", UserSig: r.sig("alice", time.Hour), Platform: "Linux"})
			g1.HandleMessage("chat/v1/up/alice/a", login)
			g1.sendQueued()
			first := p1.last(t)
			g2.HandleMessage("chat/v1/up/alice/a", login)
			g2.sendQueued()
			if got := p2.last(t); got.Type != mqtt.TypeLoginResult || got.Code != 0 || got.Session != first.Session {
				t.Errorf("the repeated login through the other gateway was answered %+v, want session %s", got, first.Session)
			}
			sr, _ := mem.Get(context.Background(), "alice")
			if diff := cmp.Diff([]string{"session a/Linux online=true ended=\"\" by=\"\""}, shape(sr.Record)); diff != "" {
				t.Errorf("the record (-want +got):\n%s", diff)
			}
			// A new request id is carried out.
			g2.HandleMessage("chat/v1/up/alice/a", mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogout, ID: "o1", Session: first.Session}))
			g2.sendQueued()
			if got := p2.last(t); got.Type != mqtt.TypeLogoutResult || got.Code != 0 {
				t.Errorf("logout answered %+v", got)
			}
			sr, _ = mem.Get(context.Background(), "alice")
			if diff := cmp.Diff([]string{"session a/Linux online=false ended=\"logout\" by=\"\""}, shape(sr.Record)); diff != "" {
				t.Errorf("the record after the logout (-want +got):\n%s", diff)
			}
		})
	}
}
