package daemon

import (
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"chatd/client"
	"chatd/codes"
	"chatd/mqtt"
	"chatd/usersig"
)

var (
	propSeeds = flag.Int("prop.seeds", 200, "random sequences TestMachineProperties runs")
	propSteps = flag.Int("prop.steps", 400, "events per sequence")
	propSeed  = flag.Uint64("prop.seed", 0, "run only this seed")
	propTrace = flag.Bool("prop.trace", false, "log every step")
)

// gwSession is a session in the gateway model.
type gwSession struct {
	id, user, instance string
	expires            time.Time
	active             bool
	ended              string // "kicked", "logout", "expired", "replaced"
}

// gwModel is a small model of chatgw with the single-platform policy.
type gwModel struct {
	now      time.Time // the gateway's clock
	sessions map[string]*gwSession
	n        int
}

func (g *gwModel) answer(instance string, m mqtt.Message) mqtt.Message {
	switch m.Type {
	case mqtt.TypeLogin:
		r := mqtt.Message{Type: mqtt.TypeLoginResult, ID: m.ID}
		t, err := usersig.Decode(m.UserSig)
		switch {
		case err != nil:
			r.Code = codes.UserSigInvalid
		case t.Identifier != m.UserID:
			r.Code = codes.UserSigWrongUser
		case g.now.After(t.ExpiresAt()):
			r.Code = codes.UserSigExpired
		}
		if r.Code != 0 {
			return r
		}
		for _, s := range g.sessions {
			if s.active && s.user == m.UserID && s.instance == instance {
				s.active, s.ended = false, "replaced"
			}
		}
		g.n++
		s := &gwSession{id: fmt.Sprintf("s%d", g.n), user: m.UserID, instance: instance, expires: t.ExpiresAt(), active: true}
		g.sessions[s.id] = s
		r.Session, r.ServerTimeMs, r.UserSigExpiresAt = s.id, g.now.UnixMilli(), s.expires.Unix()
		return r
	case mqtt.TypeResume:
		r := mqtt.Message{Type: mqtt.TypeResumeResult, ID: m.ID, Session: m.Session}
		s := g.sessions[m.Session]
		switch {
		case s == nil || s.user != m.UserID || s.instance != instance:
			r.Code = codes.NotLoggedIn
		case s.active && g.now.After(s.expires):
			s.active, s.ended = false, "expired"
			r.Code = codes.UserSigExpired
		case s.active:
			r.ServerTimeMs, r.UserSigExpiresAt = g.now.UnixMilli(), s.expires.Unix()
		case s.ended == "kicked":
			r.Code = codes.KickedOffline
		case s.ended == "expired":
			r.Code = codes.UserSigExpired
		default:
			r.Code = codes.NotLoggedIn
		}
		return r
	case mqtt.TypeLogout:
		if s := g.sessions[m.Session]; s != nil && s.user == m.UserID && s.active {
			s.active, s.ended = false, "logout"
		}
		return mqtt.Message{Type: mqtt.TypeLogoutResult, ID: m.ID}
	}
	return mqtt.Message{Type: mqtt.TypeError, ID: m.ID, Code: codes.InvalidParams}
}

// kickOthers: another instance of user logs in; the device's sessions of
// that user are kicked. It returns the kicked ids.
func (g *gwModel) kickOthers(user, instance string) []string {
	var out []string
	for _, s := range g.sessions {
		if s.active && s.user == user && s.instance == instance {
			s.active, s.ended = false, "kicked"
			out = append(out, s.id)
		}
	}
	return out
}

type propRun struct {
	t    *testing.T
	rnd  *rand.Rand
	d    *drv
	gw   *gwModel
	skew time.Duration // wall clock minus the gateway's clock
	// what the runner would have in flight
	dial       *Dial
	req        *Send
	helper     *RunHelper
	conn       uint64 // the model's open connection (dialled successfully)
	connUser   string
	kickedBy   bool // the device's session was kicked; no login until a command
	restarted  bool // chatd restarted since the last command
	step       int
	lastEvent  string
	violations int
}

func (p *propRun) fail(format string, a ...any) {
	p.t.Helper()
	p.violations++
	if p.violations <= 3 {
		p.t.Errorf("step %d (%s): %s", p.step, p.lastEvent, fmt.Sprintf(format, a...))
	}
}

func (p *propRun) sig(user string) usersig.Secret {
	life := []time.Duration{2 * time.Hour, 24 * time.Hour, 48 * time.Hour}[p.rnd.IntN(3)]
	return sigFor(p.t, user, p.gw.now, life)
}

// apply feeds one event and executes the effects as the runner would.
func (p *propRun) apply(name string, ev Event) {
	p.lastEvent = name
	before := p.d.m.status()
	d := p.d
	d.now.Wall = p.gw.now.Add(p.skew)
	effects := d.m.handle(d.now, ev)
	p.exec(effects)
	if *propTrace {
		var r []string
		for _, e := range effects {
			if s := render(e); s != "" {
				r = append(r, s)
			}
		}
		p.t.Logf("%d %s -> %s %s err=%+v %v", p.step, name, d.m.phase, d.m.status(), d.m.lastErr, r)
	}
	after := d.m.status()
	if v := violation(d.m); v != "" {
		p.fail("%s", v)
	}
	if before != client.Logout && after == client.Logout {
		ok := false
		switch ev.(type) {
		case EvLogout, EvLogin:
			ok = true // a logout, or an account switch's first step
		}
		for _, e := range effects {
			if em, isEmit := e.(Emit); isEmit && (em.Event.Type == client.EventKickedOffline || em.Event.Type == client.EventUserSigExpired) {
				ok = true
			}
		}
		if c := d.m.st.LastError.Code; c != 0 && !codes.Retryable(c) {
			ok = true // a permanent code
		}
		if !ok {
			p.fail("LOGOUT without an allowed reason; last error %+v", d.m.lastErr)
		}
	}
}

func (p *propRun) exec(effects []Effect) {
	for _, e := range effects {
		switch e := e.(type) {
		case Persist:
			p.d.saved, p.d.found = e.State, true
		case Dial:
			p.dial = &e
		case Send:
			if e.Msg.Type == mqtt.TypeLogin && p.kickedBy && !p.d.cfg.KickRelogin {
				// A fresh login after being kicked, with no command since:
				// this is how two instances kick each other forever.
				p.fail("logged in again by itself after a kick")
			}
			p.req = &e
		case CloseConn:
			if e.Conn == p.conn {
				p.conn, p.connUser = 0, ""
			}
			if p.req != nil && p.req.Conn == e.Conn {
				p.req = nil
			}
			if p.dial != nil && p.dial.Conn == e.Conn {
				p.dial = nil
			}
		case RunHelper:
			p.helper = &e
		case CancelHelper:
			p.helper = nil
		}
	}
}

// randomStep picks an adversity or a delivery.
func (p *propRun) randomStep() {
	d := p.d
	switch r := p.rnd.IntN(100); {
	case r < 12 && p.dial != nil:
		dl := *p.dial
		p.dial = nil
		if p.rnd.IntN(3) == 0 {
			p.apply("dial fails", EvDialed{Conn: dl.Conn, Err: errors.New("connection refused")})
			return
		}
		p.conn, p.connUser = dl.Conn, dl.UserID
		p.apply("dialled", EvDialed{Conn: dl.Conn})
	case r < 30 && p.req != nil:
		rq := *p.req
		p.req = nil
		if rq.Conn != p.conn {
			return
		}
		if p.rnd.IntN(8) == 0 {
			p.apply("request times out", EvAnswered{Conn: rq.Conn, Req: rq.Msg, Err: errors.New("timeout")})
			return
		}
		reply := p.gw.answer(d.m.st.InstanceID, rq.Msg)
		if rq.Msg.Type == mqtt.TypeLogin && reply.Code == 0 {
			p.kickedBy = false
		}
		p.apply("answered "+rq.Msg.Type, EvAnswered{Conn: rq.Conn, Req: rq.Msg, Reply: reply})
	case r < 38 && p.conn != 0:
		c := p.conn
		p.conn, p.connUser = 0, ""
		p.apply("connection lost", EvConnLost{Conn: c, Err: errors.New("EOF")})
		if p.req != nil && p.req.Conn == c {
			rq := *p.req
			p.req = nil
			p.apply("request lost", EvAnswered{Conn: c, Req: rq.Msg, Err: mqtt.ErrConnLost})
		}
	case r < 46:
		dur := time.Duration(p.rnd.IntN(120)) * time.Second
		if p.rnd.IntN(10) == 0 {
			dur = time.Duration(p.rnd.IntN(30)) * time.Hour
		}
		p.gw.now = p.gw.now.Add(dur)
		d.now.Mono += dur
		p.expireSessions()
		p.apply("time passes", EvTick{})
	case r < 50:
		steps := []time.Duration{-365 * 24 * time.Hour, -time.Hour, time.Hour, 200 * 24 * time.Hour}
		p.skew += steps[p.rnd.IntN(len(steps))]
		d.now.Synced = p.rnd.IntN(2) == 0 && p.skew == 0
		p.apply("clock step", EvTick{})
	case r < 56:
		user := "dev-42"
		if p.rnd.IntN(5) == 0 {
			user = "dev-43"
		}
		sig := p.sig(user)
		if d.cfg.Helper && p.rnd.IntN(3) == 0 {
			sig = usersig.Secret{}
		}
		p.kickedBy, p.restarted = false, false
		d.wait++
		p.apply("login command "+user, EvLogin{Waiter: d.wait, UserID: user, Sig: sig})
	case r < 60:
		d.wait++
		p.restarted = false
		p.apply("logout command", EvLogout{Waiter: d.wait})
	case r < 64:
		// Another instance of the user logs in: the device is kicked.
		kicked := p.gw.kickOthers(d.m.st.UserID, d.m.st.InstanceID)
		for _, id := range kicked {
			if id == d.m.st.Session && d.m.goal {
				p.kickedBy = true // the session the device means to keep
			}
		}
		for _, id := range kicked {
			if p.conn == 0 || p.connUser != d.m.st.UserID {
				continue // the device hears it when it resumes
			}
			if p.rnd.IntN(4) == 0 {
				// The push is lost with the connection (QoS 1 on a live
				// connection is not lost otherwise).
				c := p.conn
				p.conn, p.connUser = 0, ""
				p.apply("kick lost with the connection", EvConnLost{Conn: c, Err: errors.New("EOF")})
				continue
			}
			p.apply("kick pushed", EvPush{Conn: p.conn, Msg: mqtt.Message{Type: mqtt.TypeKick, Session: id, Code: codes.KickedOffline}})
		}
	case r < 72 && p.helper != nil:
		h := *p.helper
		p.helper = nil
		if p.rnd.IntN(3) == 0 {
			p.apply("helper fails", EvHelper{Gen: h.Gen, Err: errors.New("usersig_command failed: exit status 1")})
			return
		}
		p.apply("helper prints a UserSig", EvHelper{Gen: h.Gen, Sig: p.sig(h.UserID)})
	case r < 75:
		// The gateway restarts: requests in flight are lost.
		if p.req != nil {
			rq := *p.req
			p.req = nil
			p.apply("gateway restarted", EvAnswered{Conn: rq.Conn, Req: rq.Msg, Err: errors.New("timeout")})
		}
	case r < 78:
		p.restart()
	default:
		p.gw.now = p.gw.now.Add(time.Second)
		d.now.Mono += time.Second
		p.apply("tick", EvTick{})
	}
}

// restart: chatd dies (any moment) and starts again from what it persisted.
func (p *propRun) restart() {
	p.lastEvent = "restart"
	p.restarted = true
	p.dial, p.req, p.helper = nil, nil, nil
	p.conn, p.connUser = 0, ""
	d := p.d
	d.now.Wall = p.gw.now.Add(p.skew)
	d.now.Mono += time.Second
	m, eff := newMachine(d.cfg, d.saved, d.found, usersig.Secret{}, "machine-1", "inst-x", d.now)
	d.m = m
	p.exec(eff)
	if v := violation(d.m); v != "" {
		p.fail("after a restart: %s", v)
	}
}

// expireSessions: the gateway ends expired sessions and tells the device.
func (p *propRun) expireSessions() {
	for _, s := range p.gw.sessions {
		if s.active && p.gw.now.After(s.expires) {
			s.active, s.ended = false, "expired"
			if p.conn != 0 && s.id == p.d.m.st.Session {
				p.apply("usersig_expired pushed", EvPush{Conn: p.conn, Msg: mqtt.Message{Type: mqtt.TypeUserSigExpire, Session: s.id, ServerTimeMs: p.gw.now.UnixMilli()}})
			}
		}
	}
}

// settle: the adversities stop and the network returns; everything in
// flight is delivered until the machine is quiet.
func (p *propRun) settle() {
	d := p.d
	for i := 0; i < 2000; i++ {
		switch {
		case p.dial != nil:
			dl := *p.dial
			p.dial = nil
			p.conn, p.connUser = dl.Conn, dl.UserID
			p.apply("settle: dialled", EvDialed{Conn: dl.Conn})
		case p.req != nil:
			rq := *p.req
			p.req = nil
			if rq.Conn == p.conn {
				p.apply("settle: answered", EvAnswered{Conn: rq.Conn, Req: rq.Msg, Reply: p.gw.answer(d.m.st.InstanceID, rq.Msg)})
			}
		case p.helper != nil:
			h := *p.helper
			p.helper = nil
			p.apply("settle: helper", EvHelper{Gen: h.Gen, Sig: p.sig(h.UserID)})
		default:
			if d.m.phase == PhaseOnline || d.m.phase == PhaseIdle {
				if len(d.m.st.PendingLogouts) == 0 && d.m.req == nil {
					return
				}
			}
			p.gw.now = p.gw.now.Add(5 * time.Second)
			d.now.Mono += 5 * time.Second
			p.apply("settle: time passes", EvTick{})
		}
	}
	p.fail("did not settle: phase %s", d.m.phase)
}

// converged: LOGINED with a session the gateway knows, or LOGOUT with a
// reason, and no orphan session at the gateway.
func (p *propRun) converged() {
	m := p.d.m
	switch m.status() {
	case client.Logined:
		s := p.gw.sessions[m.st.Session]
		if m.phase != PhaseOnline || s == nil || !s.active || s.instance != m.st.InstanceID || s.user != m.st.UserID {
			p.fail("LOGINED with session %q the gateway does not hold (%+v), phase %s", m.st.Session, s, m.phase)
		}
	case client.Logout:
		// A login that a restart interrupted before it was answered is not
		// owed (unless the config names the identity: then chatd logs in).
		interrupted := p.restarted && p.d.cfg.ConfigUserID == ""
		if m.st.LastError.Code == 0 && !m.st.LoggedOut && m.st.UserID != "" && m.phase != PhaseKickedWait && !interrupted {
			p.fail("LOGOUT with no reason: %+v", m.st)
		}
	default:
		if m.phase != PhaseFetching {
			p.fail("settled in %s (%s)", m.status(), m.phase)
		}
	}
	for _, s := range p.gw.sessions {
		if s.active && s.instance == m.st.InstanceID && (m.status() != client.Logined || s.id != m.st.Session) {
			p.fail("orphan session %s of %s at the gateway (device: %s %q)", s.id, s.user, m.status(), m.st.Session)
		}
	}
}

// TestMachineProperties drives the machine with long seeded random
// sequences of commands, connection losses, gateway restarts, kicks,
// expiries, helper failures, clock steps both ways, restarts and timer
// ticks against a model of the gateway, and checks the invariants after
// every step and convergence at the end. A failure names its seed:
// go test ./daemon -run TestMachineProperties -prop.seed=N.
func TestMachineProperties(t *testing.T) {
	seeds := *propSeeds
	if testing.Short() {
		seeds = 20
	}
	first := uint64(1)
	if *propSeed != 0 {
		first, seeds = *propSeed, 1
	}
	for seed := first; seed < first+uint64(seeds); seed++ {
		rnd := rand.New(rand.NewPCG(seed, 12))
		var opts []dopt
		if rnd.IntN(2) == 0 {
			opts = append(opts, withHelper())
		}
		if rnd.IntN(4) == 0 {
			opts = append(opts, withRelogin())
		}
		if rnd.IntN(3) == 0 {
			opts = append(opts, withUser("dev-42"))
		}
		d := newDrv(t, opts...)
		d.cfg.Rand = func(n int64) int64 { return rnd.Int64N(n) }
		d.m.cfg.Rand = d.cfg.Rand
		p := &propRun{t: t, rnd: rnd, d: d, gw: &gwModel{now: start, sessions: map[string]*gwSession{}}}
		d.now.Wall = start
		for p.step = 0; p.step < *propSteps && p.violations == 0; p.step++ {
			p.randomStep()
		}
		if p.violations == 0 {
			p.kickedBy = false
			p.settle()
			p.converged()
		}
		if p.violations > 0 {
			t.Fatalf("seed %d failed (rerun: go test ./daemon -run TestMachineProperties -prop.seed=%d -v)", seed, seed)
		}
	}
	t.Logf("%d sequences x %d steps", seeds, *propSteps)
}
