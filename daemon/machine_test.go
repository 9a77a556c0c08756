package daemon

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.mqtt.golang/packets"
	"github.com/google/go-cmp/cmp"

	"chatd/client"
	"chatd/codes"
	"chatd/mqtt"
	"chatd/storage"
	"chatd/usersig"
)

// drv drives the pure machine: no goroutines, no sleeps, no real clock.
type drv struct {
	t     testing.TB
	cfg   machineConfig
	m     *machine
	now   Instant
	saved storage.State // what the last Persist wrote
	found bool
	wait  uint64
	// last is the last batch of effects.
	last []Effect
}

func testMachineConfig() machineConfig {
	cfg := DefaultConfig()
	cfg.SDKAppID = appID
	mc := machineConfigFrom(cfg, false, func(n int64) int64 { return n - 1 })
	return mc
}

type dopt func(*drv)

func withHelper() dopt       { return func(d *drv) { d.cfg.Helper = true } }
func withRelogin() dopt      { return func(d *drv) { d.cfg.KickRelogin = true } }
func withUser(u string) dopt { return func(d *drv) { d.cfg.ConfigUserID = u } }
func unsynced() dopt         { return func(d *drv) { d.now.Synced = false } }
func withState(st storage.State) dopt {
	return func(d *drv) { d.saved, d.found = st, true }
}

func newDrv(t testing.TB, opts ...dopt) *drv {
	d := &drv{t: t, cfg: testMachineConfig(), now: Instant{Wall: start, Mono: time.Hour, Synced: true}}
	for _, o := range opts {
		o(d)
	}
	d.boot(usersig.Secret{})
	return d
}

// boot (re)starts the machine from what was persisted, as a restart does.
func (d *drv) boot(initial usersig.Secret) []string {
	m, eff := newMachine(d.cfg, d.saved, d.found, initial, "machine-1", fmt.Sprintf("inst-%d", d.now.Mono), d.now)
	d.m = m
	return d.apply(eff)
}

func (d *drv) apply(eff []Effect) []string {
	d.last = eff
	var out []string
	for _, e := range eff {
		if p, ok := e.(Persist); ok {
			d.saved, d.found = p.State, true
		}
		if s := render(e); s != "" {
			out = append(out, s)
		}
	}
	return out
}

func (d *drv) do(ev Event) []string { return d.apply(d.m.handle(d.now, ev)) }

// advance moves both clocks.
func (d *drv) advance(dur time.Duration) []string {
	d.now.Wall = d.now.Wall.Add(dur)
	d.now.Mono += dur
	return d.do(EvTick{})
}

// step moves the wall clock only (an NTP step).
func (d *drv) step(dur time.Duration) []string {
	d.now.Wall = d.now.Wall.Add(dur)
	return d.do(EvTick{})
}

func (d *drv) waiter() uint64 { d.wait++; return d.wait }

// render is a short form of an effect for table tests; logs and metrics
// are left out.
func render(e Effect) string {
	switch e := e.(type) {
	case Persist:
		return "persist"
	case Dial:
		return fmt.Sprintf("dial c%d %s", e.Conn, e.UserID)
	case Send:
		s := fmt.Sprintf("send c%d %s", e.Conn, e.Msg.Type)
		if e.Msg.Session != "" {
			s += " " + e.Msg.Session
		}
		if e.Msg.Type == mqtt.TypeLogin {
			if t, err := usersig.Decode(e.Msg.UserSig); err == nil {
				s += " exp=" + t.ExpiresAt().UTC().Format("15:04")
			}
		}
		return s
	case CloseConn:
		switch {
		case e.Abort:
			return fmt.Sprintf("abort c%d", e.Conn)
		case e.Goodbye:
			return fmt.Sprintf("close c%d goodbye", e.Conn)
		}
		return fmt.Sprintf("close c%d", e.Conn)
	case RunHelper:
		return "helper"
	case CancelHelper:
		return "cancel helper"
	case Emit:
		s := e.Event.Type
		if e.Event.Type == client.EventLoginStatusChanged {
			s += ":" + e.Event.Status.String()
		}
		if e.Event.Code != 0 {
			s += fmt.Sprintf(":%d", e.Event.Code)
		}
		return "emit " + s
	case Answer:
		return fmt.Sprintf("answer w%d %d", e.Waiter, e.Code)
	}
	return ""
}

// lastSend is the last Send of the last batch.
func (d *drv) lastSend() mqtt.Message {
	d.t.Helper()
	for i := len(d.last) - 1; i >= 0; i-- {
		if s, ok := d.last[i].(Send); ok {
			return s.Msg
		}
	}
	d.t.Fatalf("no send in %v", d.last)
	return mqtt.Message{}
}

func okLogin(session string, sig usersig.Secret, server time.Time) mqtt.Message {
	r := mqtt.Message{Type: mqtt.TypeLoginResult, Session: session, ServerTimeMs: server.UnixMilli()}
	if t, err := usersig.Decode(sig.Reveal()); err == nil {
		r.UserSigExpiresAt = t.ExpiresAt().Unix()
	}
	return r
}

// online drives a fresh machine to Online as user with session s1 on c1.
func (d *drv) online(user string, sig usersig.Secret) {
	d.t.Helper()
	d.do(EvLogin{Waiter: d.waiter(), UserID: user, Sig: sig})
	d.do(EvDialed{Conn: d.m.conn})
	req := d.lastSend()
	d.do(EvAnswered{Conn: d.m.conn, Req: req, Reply: okLogin("s1", sig, d.now.Wall)})
	if d.m.phase != PhaseOnline {
		d.t.Fatalf("not online: %s", d.m.phase)
	}
}

func sig24(t testing.TB, user string, issued time.Time) usersig.Secret {
	return sigFor(t, user, issued, 24*time.Hour)
}

func TestPhaseStrings(t *testing.T) {
	for p := PhaseIdle; p <= PhaseStopped; p++ {
		if strings.HasPrefix(p.String(), "Phase(") {
			t.Errorf("phase %d has no name", p)
		}
	}
}

// The table: (phase, event) -> (phase, effects). Each case builds its
// phase the way the daemon gets there, then applies one event.
type transitionCase struct {
	name      string
	opts      []dopt
	setup     func(d *drv)
	event     func(d *drv) Event
	wantPhase Phase
	want      []string
}

func sig(t testing.TB) usersig.Secret { return sig24(t, "dev-42", start) }

var transitionCases = []transitionCase{
	{
		name:      "Idle + login: dial",
		event:     func(d *drv) Event { return EvLogin{Waiter: 1, UserID: "dev-42", Sig: sig(d.t)} },
		wantPhase: PhaseDialing,
		want:      []string{"emit onLoginStatusChanged:LOGINING", "emit onConnecting", "dial c1 dev-42"},
	},
	{
		name:      "Idle + login with a bad UserSig: refused, nothing changes",
		event:     func(d *drv) Event { return EvLogin{Waiter: 1, UserID: "dev-42", Sig: usersig.NewSecret("garbage")} },
		wantPhase: PhaseIdle,
		want:      []string{"answer w1 70003"},
	},
	{
		name:      "Idle + login with another user's UserSig: 70013",
		event:     func(d *drv) Event { return EvLogin{Waiter: 1, UserID: "dev-42", Sig: sig24(d.t, "someone", start)} },
		wantPhase: PhaseIdle,
		want:      []string{"answer w1 70013"},
	},
	{
		name:      "Idle + logout: nothing to do",
		event:     func(d *drv) Event { return EvLogout{Waiter: 1} },
		wantPhase: PhaseIdle,
		want:      []string{"persist", "answer w1 0"},
	},
	{
		name:      "Dialing + dialed: send login",
		setup:     func(d *drv) { d.do(EvLogin{Waiter: 1, UserID: "dev-42", Sig: sig(d.t)}) },
		event:     func(d *drv) Event { return EvDialed{Conn: 1} },
		wantPhase: PhaseRequesting,
		want:      []string{"send c1 login exp=12:00"},
	},
	{
		name:      "Dialing + refused: retry with backoff",
		setup:     func(d *drv) { d.do(EvLogin{Waiter: 1, UserID: "dev-42", Sig: sig(d.t)}) },
		event:     func(d *drv) Event { return EvDialed{Conn: 1, Err: errors.New("connection refused")} },
		wantPhase: PhaseWaitRetry,
		want:      []string{"emit onConnectFailed:70169"},
	},
	{
		name:      "Dialing + UserSig refused at CONNECT (4): permanent, 70009",
		setup:     func(d *drv) { d.do(EvLogin{Waiter: 1, UserID: "dev-42", Sig: sig(d.t)}) },
		event:     func(d *drv) Event { return EvDialed{Conn: 1, Err: refusal(4)} },
		wantPhase: PhaseIdle,
		want:      []string{"persist", "emit onConnectFailed:70009", "answer w1 70009", "emit onLoginStatusChanged:LOGOUT"},
	},
	{
		name:      "Dialing + UserSig expired long ago at CONNECT (5): 70001",
		setup:     func(d *drv) { d.do(EvLogin{Waiter: 1, UserID: "dev-42", Sig: sig(d.t)}) },
		event:     func(d *drv) Event { return EvDialed{Conn: 1, Err: refusal(5)} },
		wantPhase: PhaseIdle,
		want:      []string{"persist", "emit onConnectFailed:70001", "emit onUserSigExpired:70001", "answer w1 70001", "emit onLoginStatusChanged:LOGOUT"},
	},
	{
		name:      "Dialing + broker unavailable (3, flooding): retry",
		setup:     func(d *drv) { d.do(EvLogin{Waiter: 1, UserID: "dev-42", Sig: sig(d.t)}) },
		event:     func(d *drv) Event { return EvDialed{Conn: 1, Err: refusal(3)} },
		wantPhase: PhaseWaitRetry,
		want:      []string{"emit onConnectFailed:70169"},
	},
	{
		name:  "Requesting + login ok: online, answered after persist",
		setup: func(d *drv) { d.do(EvLogin{Waiter: 1, UserID: "dev-42", Sig: sig(d.t)}); d.do(EvDialed{Conn: 1}) },
		event: func(d *drv) Event {
			return EvAnswered{Conn: 1, Req: d.lastSend(), Reply: okLogin("s1", sig(d.t), d.now.Wall)}
		},
		wantPhase: PhaseOnline,
		want:      []string{"persist", "emit onConnectSuccess", "answer w1 0", "emit onLoginStatusChanged:LOGINED"},
	},
	{
		name:  "Requesting + 70050: wait the minute on the same connection",
		setup: func(d *drv) { d.do(EvLogin{Waiter: 1, UserID: "dev-42", Sig: sig(d.t)}); d.do(EvDialed{Conn: 1}) },
		event: func(d *drv) Event {
			return EvAnswered{Conn: 1, Req: d.lastSend(), Reply: mqtt.Message{Type: mqtt.TypeLoginResult, Code: codes.TooManyFailures}}
		},
		wantPhase: PhaseWaitRetry,
		want:      []string{"emit onConnectFailed:70050"},
	},
	{
		name:  "Requesting + permanent code: LOGOUT",
		setup: func(d *drv) { d.do(EvLogin{Waiter: 1, UserID: "dev-42", Sig: sig(d.t)}); d.do(EvDialed{Conn: 1}) },
		event: func(d *drv) Event {
			return EvAnswered{Conn: 1, Req: d.lastSend(), Reply: mqtt.Message{Type: mqtt.TypeLoginResult, Code: codes.UserSigWrongKey}}
		},
		wantPhase: PhaseIdle,
		want:      []string{"persist", "answer w1 70009", "close c1 goodbye", "emit onLoginStatusChanged:LOGOUT"},
	},
	{
		name:  "Requesting + no answer: abort so the broker publishes the Will",
		setup: func(d *drv) { d.do(EvLogin{Waiter: 1, UserID: "dev-42", Sig: sig(d.t)}); d.do(EvDialed{Conn: 1}) },
		event: func(d *drv) Event {
			return EvAnswered{Conn: 1, Req: d.lastSend(), Err: errors.New("context deadline exceeded")}
		},
		wantPhase: PhaseWaitRetry,
		want:      []string{"abort c1", "emit onConnectFailed:70169"},
	},
	{
		name:      "Online + connection lost: LOGINED, reconnecting",
		setup:     func(d *drv) { d.online("dev-42", sig(d.t)) },
		event:     func(d *drv) Event { return EvConnLost{Conn: 1, Err: errors.New("EOF")} },
		wantPhase: PhaseWaitRetry,
		want:      []string{"emit onConnectFailed:70169"},
	},
	{
		name:      "Online + kick for this session: LOGOUT, no relogin",
		setup:     func(d *drv) { d.online("dev-42", sig(d.t)) },
		event:     func(d *drv) Event { return EvPush{Conn: 1, Msg: mqtt.Message{Type: mqtt.TypeKick, Session: "s1"}} },
		wantPhase: PhaseIdle,
		want:      []string{"persist", "close c1 goodbye", "emit onKickedOffline:6208", "emit onLoginStatusChanged:LOGOUT"},
	},
	{
		name:      "Online + kick with relogin policy: KickedWait",
		opts:      []dopt{withRelogin()},
		setup:     func(d *drv) { d.online("dev-42", sig(d.t)) },
		event:     func(d *drv) Event { return EvPush{Conn: 1, Msg: mqtt.Message{Type: mqtt.TypeKick, Session: "s1"}} },
		wantPhase: PhaseKickedWait,
		want:      []string{"persist", "close c1 goodbye", "emit onKickedOffline:6208", "emit onLoginStatusChanged:LOGOUT"},
	},
	{
		name:      "Online + kick for another session: ignored",
		setup:     func(d *drv) { d.online("dev-42", sig(d.t)) },
		event:     func(d *drv) Event { return EvPush{Conn: 1, Msg: mqtt.Message{Type: mqtt.TypeKick, Session: "s-old"}} },
		wantPhase: PhaseOnline,
	},
	{
		name:  "Online + usersig_expired without helper: LOGOUT 70001",
		setup: func(d *drv) { d.online("dev-42", sig(d.t)) },
		event: func(d *drv) Event {
			return EvPush{Conn: 1, Msg: mqtt.Message{Type: mqtt.TypeUserSigExpire, Session: "s1"}}
		},
		wantPhase: PhaseIdle,
		want:      []string{"persist", "emit onUserSigExpired:70001", "close c1 goodbye", "emit onLoginStatusChanged:LOGOUT"},
	},
	{
		name:  "Online + usersig_expired with helper: fetch, LOGINING",
		opts:  []dopt{withHelper()},
		setup: func(d *drv) { d.online("dev-42", sig(d.t)) },
		event: func(d *drv) Event {
			return EvPush{Conn: 1, Msg: mqtt.Message{Type: mqtt.TypeUserSigExpire, Session: "s1"}}
		},
		wantPhase: PhaseFetching,
		want:      []string{"persist", "emit onUserSigExpired:70001", "helper", "emit onLoginStatusChanged:LOGINING"},
	},
	{
		name:      "Online + logout: persist the pending logout, send it, answer",
		setup:     func(d *drv) { d.online("dev-42", sig(d.t)) },
		event:     func(d *drv) Event { return EvLogout{Waiter: 9} },
		wantPhase: PhaseRequesting,
		want:      []string{"persist", "send c1 logout s1", "answer w9 0", "emit onLoginStatusChanged:LOGOUT"},
	},
	{
		name:      "Online + login as another user: log out first",
		setup:     func(d *drv) { d.online("alice", sig24(d.t, "alice", start)) },
		event:     func(d *drv) Event { return EvLogin{Waiter: 9, UserID: "bob", Sig: sig24(d.t, "bob", start)} },
		wantPhase: PhaseRequesting,
		want:      []string{"persist", "send c1 logout s1", "emit onLoginStatusChanged:LOGINING"},
	},
	{
		name: "WaitRetry + logout: pending logout persisted, answered at once",
		setup: func(d *drv) {
			d.online("dev-42", sig(d.t))
			d.do(EvConnLost{Conn: 1})
		},
		event:     func(d *drv) Event { return EvLogout{Waiter: 9} },
		wantPhase: PhaseDialing,
		want:      []string{"persist", "emit onLoginStatusChanged:LOGOUT", "emit onConnecting", "dial c2 dev-42", "answer w9 0"},
	},
	{
		name: "KickedWait + logout: the relogin is cancelled",
		opts: []dopt{withRelogin()},
		setup: func(d *drv) {
			d.online("dev-42", sig(d.t))
			d.do(EvPush{Conn: 1, Msg: mqtt.Message{Type: mqtt.TypeKick, Session: "s1"}})
		},
		event:     func(d *drv) Event { return EvLogout{Waiter: 9} },
		wantPhase: PhaseIdle,
		want:      []string{"persist", "answer w9 0"},
	},
	{
		name:      "Idle + login without UserSig, helper configured: fetch",
		opts:      []dopt{withHelper()},
		event:     func(d *drv) Event { return EvLogin{Waiter: 1, UserID: "dev-42"} },
		wantPhase: PhaseFetching,
		want:      []string{"helper", "emit onLoginStatusChanged:LOGINING"},
	},
	{
		name:      "Fetching + helper prints a UserSig: dial",
		opts:      []dopt{withHelper()},
		setup:     func(d *drv) { d.do(EvLogin{Waiter: 1, UserID: "dev-42"}) },
		event:     func(d *drv) Event { return EvHelper{Gen: d.m.gen, Sig: sig(d.t)} },
		wantPhase: PhaseDialing,
		want:      []string{"persist", "emit onConnecting", "dial c1 dev-42"},
	},
	{
		name:      "Fetching + helper fails for a login someone asked for: LOGOUT 6206",
		opts:      []dopt{withHelper()},
		setup:     func(d *drv) { d.do(EvLogin{Waiter: 1, UserID: "dev-42"}) },
		event:     func(d *drv) Event { return EvHelper{Gen: d.m.gen, Err: errors.New("exit status 1")} },
		wantPhase: PhaseIdle,
		want:      []string{"persist", "answer w1 6206", "emit onLoginStatusChanged:LOGOUT"},
	},
	{
		name:      "Fetching + logout: the helper is cancelled",
		opts:      []dopt{withHelper()},
		setup:     func(d *drv) { d.do(EvLogin{Waiter: 1, UserID: "dev-42"}) },
		event:     func(d *drv) Event { return EvLogout{Waiter: 9} },
		wantPhase: PhaseIdle,
		want:      []string{"persist", "answer w1 6014", "cancel helper", "answer w9 0", "emit onLoginStatusChanged:LOGOUT"},
	},
	{
		name: "WaitRetry + tick when due: dial again (resume follows)",
		setup: func(d *drv) {
			d.online("dev-42", sig(d.t))
			d.do(EvConnLost{Conn: 1})
			d.now.Mono += time.Second
			d.now.Wall = d.now.Wall.Add(time.Second)
		},
		event:     func(d *drv) Event { return EvTick{} },
		wantPhase: PhaseDialing,
		want:      []string{"emit onConnecting", "dial c2 dev-42"},
	},
	{
		name: "KickedWait + tick when due: log in again",
		opts: []dopt{withRelogin()},
		setup: func(d *drv) {
			d.online("dev-42", sig(d.t))
			d.do(EvPush{Conn: 1, Msg: mqtt.Message{Type: mqtt.TypeKick, Session: "s1"}})
			d.now.Mono += time.Minute
			d.now.Wall = d.now.Wall.Add(time.Minute)
		},
		event:     func(d *drv) Event { return EvTick{} },
		wantPhase: PhaseDialing,
		want:      []string{"emit onLoginStatusChanged:LOGINING", "emit onConnecting", "dial c2 dev-42"},
	},
	{
		name: "Online + tick at renewal time: run the helper, stay online",
		opts: []dopt{withHelper()},
		setup: func(d *drv) {
			d.online("dev-42", sig(d.t))
			d.now.Mono += 23 * time.Hour
			d.now.Wall = d.now.Wall.Add(23 * time.Hour)
		},
		event:     func(d *drv) Event { return EvTick{} },
		wantPhase: PhaseOnline,
		want:      []string{"helper"},
	},
	{
		name:  "Online + a late answer on an old connection: dropped",
		setup: func(d *drv) { d.online("dev-42", sig(d.t)) },
		event: func(d *drv) Event {
			return EvAnswered{Conn: 7, Reply: mqtt.Message{Type: mqtt.TypeLoginResult, Session: "s9"}}
		},
		wantPhase: PhaseOnline,
	},
	{
		name:      "Stopped + anything: nothing",
		setup:     func(d *drv) { d.online("dev-42", sig(d.t)); d.do(EvStop{}) },
		event:     func(d *drv) Event { return EvLogout{Waiter: 9} },
		wantPhase: PhaseStopped,
	},
	{
		name:      "any + stop: goodbye, no logout",
		setup:     func(d *drv) { d.online("dev-42", sig(d.t)) },
		event:     func(d *drv) Event { return EvStop{} },
		wantPhase: PhaseStopped,
		want:      []string{"close c1 goodbye"},
	},
}

func TestTransitions(t *testing.T) {
	for _, c := range transitionCases {
		t.Run(c.name, func(t *testing.T) {
			d := newDrv(t, c.opts...)
			if c.setup != nil {
				c.setup(d)
			}
			got := d.do(c.event(d))
			if d.m.phase != c.wantPhase {
				t.Errorf("phase %s, want %s", d.m.phase, c.wantPhase)
			}
			if diff := cmp.Diff(c.want, got); diff != "" {
				t.Errorf("effects (-want +got):\n%s", diff)
			}
			checkInvariants(t, d.m)
		})
	}
}

// refusal is a CONNACK refusal as chatd/mqtt returns it.
func refusal(rc byte) error {
	return fmt.Errorf("connecting to tcp://x: %w", packets.ConnErrors[rc])
}

// checkInvariants: what must hold after every event.
func checkInvariants(t testing.TB, m *machine) {
	t.Helper()
	if v := violation(m); v != "" {
		t.Fatal(v)
	}
}

func violation(m *machine) string {
	s := m.status()
	if s < client.Logined || s > client.Logout {
		return fmt.Sprintf("status %d is not 1, 2 or 3", s)
	}
	switch m.phase {
	case PhaseOnline:
		if s != client.Logined || m.conn == 0 || !m.ready || m.st.Session == "" {
			return fmt.Sprintf("Online with status %s conn %d ready %v session %q", s, m.conn, m.ready, m.st.Session)
		}
	case PhaseIdle, PhaseKickedWait:
		if s != client.Logout || m.goal {
			return fmt.Sprintf("%s with status %s goal %v", m.phase, s, m.goal)
		}
	case PhaseDialing:
		if m.conn == 0 || m.ready {
			return fmt.Sprintf("Dialing with conn %d ready %v", m.conn, m.ready)
		}
	case PhaseRequesting:
		if m.conn == 0 || !m.ready || m.req == nil {
			return fmt.Sprintf("Requesting with conn %d ready %v req %v", m.conn, m.ready, m.req)
		}
	}
	if m.loginUser() != "" && s != client.Logined {
		return "getLoginUser returns a user while not logged in"
	}
	if len(m.st.PendingLogouts) > maxPendingLogouts {
		return fmt.Sprintf("%d pending logouts", len(m.st.PendingLogouts))
	}
	if m.helper && !m.goal {
		return "the helper runs without a goal"
	}
	return ""
}
