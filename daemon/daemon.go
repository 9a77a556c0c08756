// Package daemon is chatd's core: one goroutine owns the login state and
// keeps the device's chat identity logged in to the gateway, through
// network drops, broker restarts, power cuts, UserSig expiry and kicks, the
// way the Tencent Chat SDK's login API defines them. Everything else (the
// local API, MQTT callbacks, timers, the credential helper) sends it
// messages.
package daemon

import (
	"chatd/codes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"chatd/client"
	"chatd/mqtt"
	"chatd/storage"
	"chatd/usersig"
)

// Conn is one connection to the gateway; *mqtt.Conn is the real one.
type Conn interface {
	Request(ctx context.Context, m mqtt.Message) (mqtt.Message, error)
	Pushes() <-chan mqtt.Message
	Lost() <-chan struct{}
	Err() error
	Close(goodbye bool)
}

// Dialer opens connections; the real one is MQTTDialer.
type Dialer interface {
	Dial(ctx context.Context, p DialParams) (Conn, error)
}

// DialParams is what a connection needs from the login state.
type DialParams struct {
	UserID   string
	Instance string
	UserSig  usersig.Secret
}

// Options are a Daemon's collaborators; zero values get real ones.
type Options struct {
	Config Config
	Store  storage.Store
	Dialer Dialer
	Logger *slog.Logger
	Clock  Clock
	// ClockSynced reports whether the system clock is synchronised (NTP);
	// default: the kernel's answer (adjtimex).
	ClockSynced func() bool
	// UserSigCommand runs usersig_command; default: through /bin/sh.
	UserSigCommand func(ctx context.Context, userID string) (usersig.Secret, error)
	// Rand is uniform in [0, n); default math/rand/v2.
	Rand func(n int64) int64
	// OnStatus is called (from the state goroutine) with a line for systemd's
	// STATUS= on every change of what the daemon is doing.
	OnStatus func(line string)
}

// connection phases, beside the login status.
const (
	connIdle         = "idle"
	connConnecting   = "connecting"
	connConnected    = "connected"
	connReconnecting = "reconnecting"
)

// Daemon keeps one chat identity logged in. Create it with New, run it
// with Run; its methods are safe for concurrent use.
type Daemon struct {
	cfg    Config
	store  storage.Store
	dialer Dialer
	log    *slog.Logger
	clock  Clock
	synced func() bool
	sigCmd func(ctx context.Context, userID string) (usersig.Secret, error)
	onStat func(string)
	topics mqtt.Topics

	inbox chan any      // everything the state goroutine is told
	done  chan struct{} // closed when Run returns
	ctx   context.Context

	// Owned by the state goroutine.
	st       storage.State
	sigExp   time.Time // expiry of st.UserSig (decoded; zero when unknown)
	sigTime  time.Time // when st.UserSig was issued (zero when unknown)
	goal     bool      // the user wants to be logged in
	gen      uint64    // bumped whenever the goal changes; stale results are dropped
	conn     Conn
	phase    string
	busy     bool // a dial or request is under way
	waiters  []chan loginReply
	bo       *backoff
	retryAt  time.Time // next connection attempt
	stableAt time.Time // when the backoff resets, if the connection lasts
	renewAt  time.Time // when to fetch a new UserSig
	renewing bool
	relogin  bool          // after the renewal: log in with the new UserSig instead of resuming
	closing  chan struct{} // closed when the last session's logout is done
	offset   time.Duration
	offKnown bool
	fetchTry int // usersig_command runs for the current expiry

	mu   sync.Mutex
	snap client.Status
	subs map[chan client.Event]struct{}

	alive   atomic.Int64 // Unix nanoseconds of the last loop turn
	metrics *metrics
}

type loginReply struct {
	code int
	desc string
}

// New prepares a daemon; nothing runs until Run.
func New(o Options) (*Daemon, error) {
	if o.Store == nil {
		return nil, errors.New("daemon: no store")
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if o.Clock == nil {
		o.Clock = realClock{}
	}
	if o.ClockSynced == nil {
		o.ClockSynced = systemClockSynced
	}
	topics, err := mqtt.NewTopics(o.Config.MQTT.TopicPrefix)
	if err != nil {
		return nil, err
	}
	if o.Dialer == nil {
		d, err := NewMQTTDialer(o.Config, topics)
		if err != nil {
			return nil, err
		}
		o.Dialer = d
	}
	cfg := o.Config
	if o.UserSigCommand == nil && cfg.UserSigCommand != "" {
		o.UserSigCommand = func(ctx context.Context, user string) (usersig.Secret, error) {
			return runUserSigCommand(ctx, cfg.UserSigCommand, user, cfg.SDKAppID, cfg.UserSig.CommandTimeout.Duration)
		}
	}
	d := &Daemon{
		cfg:    cfg,
		store:  o.Store,
		dialer: o.Dialer,
		log:    o.Logger,
		clock:  o.Clock,
		synced: o.ClockSynced,
		sigCmd: o.UserSigCommand,
		onStat: o.OnStatus,
		topics: topics,
		inbox:  make(chan any, 64),
		done:   make(chan struct{}),
		phase:  connIdle,
		subs:   map[chan client.Event]struct{}{},
	}
	d.bo = newBackoff(cfg.Reconnect.MinDelay.Duration, cfg.Reconnect.MaxDelay.Duration)
	if o.Rand != nil {
		d.bo.rand = o.Rand
	}
	d.metrics = newMetrics(d)
	return d, nil
}

// Messages to the state goroutine.
type (
	cmdLogin struct {
		user  string
		sig   usersig.Secret
		reply chan loginReply
	}
	cmdLogout struct{ reply chan loginReply }
	// dialed: a connection attempt ended.
	dialed struct {
		gen  uint64
		conn Conn
		err  error
	}
	// answered: the gateway answered a login or resume (or did not).
	answered struct {
		gen   uint64
		conn  Conn
		req   mqtt.Message
		reply mqtt.Message
		err   error
	}
	connLost struct {
		conn Conn
		err  error
	}
	pushed struct {
		conn Conn
		msg  mqtt.Message
	}
	fetched struct {
		gen uint64
		sig usersig.Secret
		err error
	}
)

// send hands a message to the state goroutine, unless it has stopped.
func (d *Daemon) send(m any) {
	select {
	case d.inbox <- m:
	case <-d.done:
	}
}

// Alive is when the state goroutine last turned; the watchdog pings only
// while it moves.
func (d *Daemon) Alive() time.Time { return time.Unix(0, d.alive.Load()) }

// Heartbeat bounds how long the state loop sleeps, so Alive stays fresh.
const Heartbeat = 5 * time.Second

// Run loads the state and keeps the identity logged in until ctx ends.
func (d *Daemon) Run(ctx context.Context) error {
	defer close(d.done)
	d.ctx = ctx
	if err := d.restore(); err != nil {
		return err
	}
	var timer Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
		d.shutdown()
	}()
	for {
		d.alive.Store(d.clock.Now().UnixNano())
		d.step()
		d.publish()
		wait := Heartbeat
		if at := d.nextWake(); !at.IsZero() {
			wait = min(wait, max(at.Sub(d.clock.Now()), 0))
		}
		if timer != nil {
			timer.Stop()
		}
		timer = d.clock.NewTimer(wait)
		select {
		case <-ctx.Done():
			return nil
		case <-timer.C():
		case m := <-d.inbox:
			d.handle(m)
		}
	}
}

// restore loads the persisted state and decides the goal.
func (d *Daemon) restore() error {
	st, err := d.store.Load()
	switch {
	case errors.Is(err, storage.ErrNotFound):
		st = storage.State{Status: int(client.Logout)}
	case err != nil:
		return fmt.Errorf("loading state: %w", err)
	}
	if st.InstanceID == "" {
		b := make([]byte, 8)
		rand.Read(b)
		st.InstanceID = "chatd-" + hex.EncodeToString(b)
	}
	if st.Since.IsZero() {
		st.Since = d.clock.Now()
	}
	d.st = st
	d.offset = st.ServerTimeOffset
	d.noteSig()
	switch client.LoginStatus(st.Status) {
	case client.Logined, client.Logining:
		if st.UserID == d.cfg.UserID || d.cfg.UserID == "" {
			// Back after a restart or a power cut: resume.
			d.log.Info("resuming the persisted login", "user", st.UserID, "session", st.Session)
			d.goal = true
			d.gen++
			d.retryAt = d.clock.Now()
			d.phase = connConnecting
			d.setStatus(client.Logining, "restarting")
			break
		}
		d.log.Info("the configured user_id changed; switching accounts", "from", st.UserID, "to", d.cfg.UserID)
		d.autoLogin()
	default:
		if st.UserID == "" && d.cfg.UserID != "" {
			// First start: log in as the configured identity.
			d.autoLogin()
		} else if st.UserID != "" && d.cfg.UserID != "" && st.UserID != d.cfg.UserID {
			d.autoLogin()
		} else {
			d.log.Info("logged out; waiting for a login", "last_error", st.LastError.Message)
		}
	}
	d.save()
	return nil
}

// autoLogin logs in as the configured user with the configured credential.
func (d *Daemon) autoLogin() {
	sig := usersig.Secret{}
	if d.cfg.UserSigFile != "" {
		s, err := readUserSigFile(d.cfg.UserSigFile)
		if err != nil {
			d.log.Warn("cannot read the initial UserSig", "err", err)
		} else {
			sig = s
		}
	}
	if sig.IsZero() && d.sigCmd == nil {
		d.st.UserID = ""
		d.st.UserSig = usersig.Secret{}
		d.st.Session = ""
		d.setError(codes.NotInitialized, "no UserSig: set usersig_file or usersig_command, or log in with chatctl login")
		d.setStatus(client.Logout, "no credential")
		return
	}
	d.startLogin(d.cfg.UserID, sig)
}

// startLogin sets the goal to be logged in as user with sig (an empty sig
// is fetched with usersig_command first).
func (d *Daemon) startLogin(user string, sig usersig.Secret) {
	d.gen++
	d.goal = true
	if d.st.UserID != user {
		d.st.KickCount = 0
	}
	d.st.UserID = user
	d.st.UserSig = sig
	d.st.Session = ""
	d.relogin = false
	d.fetchTry = 0
	d.noteSig()
	d.bo.reset()
	d.retryAt = d.clock.Now()
	d.phase = connConnecting
	d.setError(0, "")
	d.setStatus(client.Logining, "logging in as "+user)
	d.save()
}

// noteSig decodes the current UserSig's issue and expiry times.
func (d *Daemon) noteSig() {
	d.sigExp = time.Time{}
	d.sigTime = time.Time{}
	d.renewAt = time.Time{}
	if d.st.UserSig.IsZero() {
		return
	}
	t, err := usersig.Decode(d.st.UserSig.Reveal())
	if err != nil {
		return
	}
	d.sigExp = t.ExpiresAt()
	d.sigTime = time.Unix(t.Time, 0)
	d.st.UserSigExpiresAt = d.sigExp
	d.scheduleRenewal()
}

// scheduleRenewal sets when to fetch the next UserSig: renew_margin before
// the expiry (server clock), but never before half the UserSig's life has
// passed, so that a helper handing out short-lived UserSigs does not make a
// renewal loop. A margin of 0 turns proactive renewal off.
func (d *Daemon) scheduleRenewal() {
	d.renewAt = time.Time{}
	issued := d.sigTime
	margin := d.cfg.UserSig.RenewMargin.Duration
	if d.sigCmd == nil || margin <= 0 || d.sigExp.IsZero() {
		return
	}
	at := d.sigExp.Add(-margin)
	if half := issued.Add(d.sigExp.Sub(issued) / 2); !issued.IsZero() && at.Before(half) {
		at = half
	}
	d.renewAt = at
}

// serverNow is the gateway's clock as far as the daemon knows it.
func (d *Daemon) serverNow() time.Time { return d.clock.Now().Add(d.offset) }

// clockTrusted: the daemon heard the gateway's clock in this run, or the
// system clock is synchronised. Without either, no expiry decision is made
// locally: a board without RTC boots in the past (or at the last saved
// time) and would think its UserSig expired or not yet valid.
func (d *Daemon) clockTrusted() bool { return d.offKnown || d.synced() }

// localTime converts a server-clock time to the local clock.
func (d *Daemon) localTime(server time.Time) time.Time { return server.Add(-d.offset) }

func (d *Daemon) nextWake() time.Time {
	var at time.Time
	consider := func(t time.Time) {
		if !t.IsZero() && (at.IsZero() || t.Before(at)) {
			at = t
		}
	}
	if d.goal && d.conn == nil && !d.busy {
		consider(d.retryAt)
	}
	if d.conn != nil {
		consider(d.stableAt)
	}
	if d.goal && !d.renewing && !d.renewAt.IsZero() && d.clockTrusted() {
		consider(d.localTime(d.renewAt))
	}
	if !d.goal && d.cfg.Kick.After == "relogin" && client.LoginStatus(d.st.Status) == client.Logout && d.st.LastError.Code == codes.KickedOffline {
		consider(d.retryAt)
	}
	return at
}

// step starts whatever is due. It never blocks: network work runs in
// goroutines that report back through the inbox.
func (d *Daemon) step() {
	now := d.clock.Now()
	if d.conn != nil && !d.stableAt.IsZero() && !now.Before(d.stableAt) {
		d.bo.reset()
		d.stableAt = time.Time{}
	}
	// After a kick, with kick.after = "relogin": log in again when due.
	if !d.goal && d.cfg.Kick.After == "relogin" && client.LoginStatus(d.st.Status) == client.Logout &&
		d.st.LastError.Code == codes.KickedOffline && d.st.UserID != "" && !d.retryAt.IsZero() && !now.Before(d.retryAt) {
		d.log.Info("logging in again after the kick", "kicks", d.st.KickCount)
		kicks := d.st.KickCount
		d.startLogin(d.st.UserID, d.st.UserSig)
		d.st.KickCount = kicks
	}
	if !d.goal || d.busy {
		return
	}
	// Renew the UserSig before it expires.
	if !d.renewing && !d.renewAt.IsZero() && d.clockTrusted() && !now.Before(d.localTime(d.renewAt)) {
		d.fetchUserSig("renewal: the UserSig expires at " + d.sigExp.UTC().Format(time.RFC3339))
		return
	}
	if d.renewing {
		return
	}
	if d.st.UserSig.IsZero() {
		d.fetchUserSig("no UserSig yet")
		return
	}
	if d.conn == nil {
		if now.Before(d.retryAt) {
			return
		}
		// 6206: expired by a trusted clock; don't even try.
		if d.clockTrusted() && !d.sigExp.IsZero() && d.serverNow().After(d.sigExp) {
			d.expired(codes.UserSigExpiredLocal, "the UserSig expired at "+d.sigExp.UTC().Format(time.RFC3339))
			return
		}
		d.dial()
		return
	}
}

func (d *Daemon) dial() {
	d.busy = true
	gen := d.gen
	if d.phase != connReconnecting {
		d.phase = connConnecting
	}
	d.emit(client.Event{Type: client.EventConnecting})
	d.status("connecting to " + d.cfg.Broker[0])
	p := DialParams{UserID: d.st.UserID, Instance: d.st.InstanceID, UserSig: d.st.UserSig}
	session := d.st.Session
	if d.relogin {
		session = ""
	}
	req := mqtt.Message{Type: mqtt.TypeLogin, UserID: p.UserID, UserSig: p.UserSig.Reveal(), Platform: d.cfg.Platform}
	if session != "" {
		req = mqtt.Message{Type: mqtt.TypeResume, UserID: p.UserID, Session: session}
	}
	ctx, closing := d.ctx, d.closing
	go func() {
		if closing != nil {
			// Account switch: the old identity logs out first.
			select {
			case <-closing:
			case <-ctx.Done():
			}
		}
		cctx, cancel := context.WithTimeout(ctx, d.cfg.MQTT.ConnectTimeout.Duration+time.Second)
		conn, err := d.dialer.Dial(cctx, p)
		cancel()
		d.send(dialed{gen: gen, conn: conn, err: err})
		if err != nil {
			return
		}
		d.request(gen, conn, req)
	}()
}

// request sends a login or resume on conn and reports the answer.
func (d *Daemon) request(gen uint64, conn Conn, req mqtt.Message) {
	ctx, cancel := context.WithTimeout(d.ctx, d.cfg.MQTT.RequestTimeout.Duration)
	defer cancel()
	reply, err := conn.Request(ctx, req)
	d.send(answered{gen: gen, conn: conn, req: req, reply: reply, err: err})
}

// watch forwards a connection's pushes and its loss to the state goroutine.
func (d *Daemon) watch(conn Conn) {
	for {
		select {
		case m := <-conn.Pushes():
			d.send(pushed{conn: conn, msg: m})
		case <-conn.Lost():
			d.send(connLost{conn: conn, err: conn.Err()})
			return
		case <-d.done:
			return
		}
	}
}

func (d *Daemon) handle(m any) {
	switch m := m.(type) {
	case cmdLogin:
		d.onLogin(m)
	case cmdLogout:
		d.onLogout(m)
	case dialed:
		d.onDialed(m)
	case answered:
		d.onAnswered(m)
	case connLost:
		d.onConnLost(m)
	case pushed:
		d.onPush(m)
	case fetched:
		d.onFetched(m)
	}
}

func (d *Daemon) onLogin(c cmdLogin) {
	if err := mqtt.ValidateUserID(c.user); err != nil {
		c.reply <- loginReply{codes.InvalidUserID, err.Error()}
		return
	}
	if c.sig.IsZero() && d.sigCmd == nil {
		c.reply <- loginReply{codes.InvalidParams, "user_sig is empty (and no usersig_command is configured to fetch one)"}
		return
	}
	status := client.LoginStatus(d.st.Status)
	if d.goal && c.user == d.st.UserID {
		// A login while one runs joins it; while logged in, it is done.
		if !c.sig.IsZero() && !c.sig.Equal(d.st.UserSig) {
			d.adoptSig(c.sig)
		}
		if status == client.Logined {
			c.reply <- loginReply{0, "already logged in as " + c.user}
			return
		}
		d.waiters = append(d.waiters, c.reply)
		return
	}
	if d.goal || d.conn != nil {
		// Account switch: only one identity at a time.
		d.log.Info("account switch: logging out first", "from", d.st.UserID, "to", c.user)
		d.endSession("switching to "+c.user, true)
	}
	d.startLogin(c.user, c.sig)
	d.waiters = append(d.waiters, c.reply)
}

// adoptSig takes a newer UserSig for the current user: it is used from the
// next login on (a renewal, or the next reconnect).
func (d *Daemon) adoptSig(sig usersig.Secret) {
	t, err := usersig.Decode(sig.Reveal())
	if err != nil || t.Identifier != d.st.UserID {
		return
	}
	if !d.sigExp.IsZero() && !t.ExpiresAt().After(d.sigExp) {
		return
	}
	d.st.UserSig = sig
	d.noteSig()
	if d.st.Session != "" {
		d.relogin = true
		if d.conn != nil && !d.busy {
			d.loginOn(d.conn)
		}
	}
	d.save()
}

func (d *Daemon) onLogout(c cmdLogout) {
	if !d.goal && d.conn == nil {
		// Logging out when logged out is not an error.
		c.reply <- loginReply{0, "not logged in"}
		return
	}
	d.endSession("logout", true)
	d.st.UserID = ""
	d.st.UserSig = usersig.Secret{}
	d.noteSig()
	d.setError(0, "")
	d.setStatus(client.Logout, "logged out")
	d.save()
	d.publish()
	c.reply <- loginReply{0, ""}
}

// endSession drops the goal and the connection; with logout, the gateway is
// told (best effort, in the background).
func (d *Daemon) endSession(why string, logout bool) {
	d.gen++
	d.goal = false
	d.busy = false
	d.renewing = false
	d.relogin = false
	d.failWaiters(codes.NotLoggedIn, "login cancelled: "+why)
	session, user := d.st.Session, d.st.UserID
	d.st.Session = ""
	if conn := d.conn; conn != nil {
		d.conn = nil
		closed := make(chan struct{})
		d.closing = closed
		go func() {
			defer close(closed)
			if logout && session != "" {
				ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
				conn.Request(ctx, mqtt.Message{Type: mqtt.TypeLogout, UserID: user, Session: session})
				cancel()
			}
			conn.Close(true)
		}()
	}
	d.phase = connIdle
	d.stableAt = time.Time{}
}

// failWaiters answers every waiting Login (with code 0 too: the name says
// what it usually does). The snapshot is refreshed first, so a caller that
// reads the status after its answer sees the state that answered it.
func (d *Daemon) failWaiters(code int, desc string) {
	if len(d.waiters) > 0 {
		d.publish()
	}
	for _, w := range d.waiters {
		w <- loginReply{code, desc}
	}
	d.waiters = nil
}

func (d *Daemon) onDialed(m dialed) {
	if m.gen != d.gen {
		if m.conn != nil {
			go m.conn.Close(false)
		}
		return
	}
	if m.err != nil {
		d.busy = false
		d.connectFailed(m.err)
		return
	}
	d.conn = m.conn
	d.stableAt = d.clock.Now().Add(d.cfg.Reconnect.StableAfter.Duration)
	go d.watch(m.conn)
}

// connectFailed schedules the next attempt with jittered backoff.
func (d *Daemon) connectFailed(err error) {
	code, desc := classifyConnErr(err)
	d.emit(client.Event{Type: client.EventConnectFailed, Code: code, Desc: desc})
	if code == codes.InvalidParams {
		// The broker refused our credentials: retrying changes nothing.
		d.stop(code, desc)
		return
	}
	delay := d.bo.next()
	d.retryAt = d.clock.Now().Add(delay)
	d.phase = connReconnecting
	d.setError(code, desc)
	d.status(fmt.Sprintf("reconnecting in %s: %s", delay.Round(100*time.Millisecond), desc))
	d.log.Info("connection failed; retrying", "in", delay.Round(time.Millisecond), "err", desc)
}

// stop gives up the goal after a permanent failure.
func (d *Daemon) stop(code int, desc string) {
	d.log.Warn("login stopped: the failure is permanent", "code", code, "desc", desc)
	d.failWaiters(code, desc)
	user := d.st.UserID
	d.endSession(desc, false)
	d.st.UserID = user // kept for a deliberate retry; getLoginUser is empty anyway
	d.setError(code, desc)
	d.setStatus(client.Logout, fmt.Sprintf("stopped: %d %s", code, desc))
	d.save()
}

func (d *Daemon) onAnswered(m answered) {
	if m.gen != d.gen || m.conn != d.conn {
		// The goal changed meanwhile: a late success must not linger.
		if m.err == nil && m.reply.Code == 0 && m.reply.Session != "" {
			go func() {
				ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
				m.conn.Request(ctx, mqtt.Message{Type: mqtt.TypeLogout, Session: m.reply.Session})
				cancel()
				m.conn.Close(true)
			}()
		}
		return
	}
	d.busy = false
	if m.err != nil {
		// No answer in time: the gateway may be down; start over.
		d.log.Info("no answer from the gateway", "request", m.req.Type, "err", m.err)
		d.conn = nil
		go m.conn.Close(false)
		d.connectFailed(fmt.Errorf("no answer to %s: %w", m.req.Type, m.err))
		return
	}
	r := m.reply
	if r.ServerTimeMs != 0 {
		d.offset = time.UnixMilli(r.ServerTimeMs).Sub(d.clock.Now())
		d.offKnown = true
		d.st.ServerTimeOffset = d.offset
	}
	switch m.req.Type {
	case mqtt.TypeResume:
		d.metrics.resume(r.Code)
		switch {
		case r.Code == 0:
			d.online(r, "resumed session "+r.Session)
		case r.Code == codes.KickedOffline:
			d.kicked(r.Code, r.Desc)
		case codes.NeedsNewUserSig(r.Code):
			d.expired(r.Code, r.Desc)
		default:
			// The session is gone (6014): log in again with the UserSig.
			d.log.Info("session cannot be resumed; logging in", "code", r.Code, "desc", r.Desc)
			d.st.Session = ""
			d.setStatus(client.Logining, "session ended; logging in again")
			d.loginOn(d.conn)
		}
	case mqtt.TypeLogin:
		d.metrics.login(r.Code)
		switch {
		case r.Code == 0:
			d.relogin = false
			d.fetchTry = 0
			d.online(r, "logged in as "+d.st.UserID)
		case r.Code == codes.KickedOffline:
			d.kicked(r.Code, r.Desc)
		case codes.NeedsNewUserSig(r.Code):
			d.expired(r.Code, r.Desc)
		case codes.Retryable(r.Code):
			d.conn = nil
			go m.conn.Close(true)
			d.connectFailed(&gatewayError{r.Code, r.Desc})
		default:
			d.stop(r.Code, r.Desc)
		}
	}
}

type gatewayError struct {
	code int
	desc string
}

func (e *gatewayError) Error() string { return fmt.Sprintf("%d %s", e.code, e.desc) }

// loginOn sends a login on an open connection.
func (d *Daemon) loginOn(conn Conn) {
	d.busy = true
	gen := d.gen
	req := mqtt.Message{Type: mqtt.TypeLogin, UserID: d.st.UserID, UserSig: d.st.UserSig.Reveal(), Platform: d.cfg.Platform}
	go d.request(gen, conn, req)
}

// online: a login or resume succeeded.
func (d *Daemon) online(r mqtt.Message, why string) {
	if r.Session != "" {
		d.st.Session = r.Session
	}
	if r.UserSigExpiresAt != 0 {
		exp := time.Unix(r.UserSigExpiresAt, 0)
		if !exp.Equal(d.sigExp) {
			d.sigExp = exp
			d.st.UserSigExpiresAt = exp
			d.scheduleRenewal()
		}
	}
	if d.phase != connConnected {
		// Not on a renewal over a connection that was up all along.
		d.emit(client.Event{Type: client.EventConnectSuccess})
	}
	d.phase = connConnected
	d.setError(0, "")
	d.setStatus(client.Logined, "LOGINED as "+d.st.UserID)
	d.status("LOGINED as " + d.st.UserID)
	d.failWaiters(0, "")
	d.save()
}

// kicked: the session was kicked (live, or while the device was away).
func (d *Daemon) kicked(code int, desc string) {
	d.log.Warn("kicked offline", "user", d.st.UserID, "desc", desc)
	d.metrics.kicks.Inc()
	now := d.clock.Now()
	if client.LoginStatus(d.st.Status) == client.Logined && now.Sub(d.st.Since) > d.cfg.Kick.MaxDelay.Duration {
		d.st.KickCount = 0 // the last login lasted: not a kick loop
	}
	d.st.KickCount++
	d.failWaiters(code, desc)
	user, sig := d.st.UserID, d.st.UserSig
	d.endSession("kicked", false)
	d.st.UserID, d.st.UserSig = user, sig
	d.setError(code, desc)
	d.emit(client.Event{Type: client.EventKickedOffline, Code: code, Desc: desc})
	d.setStatus(client.Logout, "kicked offline at "+now.UTC().Format(time.RFC3339))
	if d.cfg.Kick.After == "relogin" {
		delay := d.cfg.Kick.Delay.Duration
		for i := 1; i < d.st.KickCount && delay < d.cfg.Kick.MaxDelay.Duration; i++ {
			delay *= 2
		}
		delay = min(delay, d.cfg.Kick.MaxDelay.Duration)
		d.retryAt = now.Add(delay)
		d.status(fmt.Sprintf("kicked offline at %s; logging in again in %s", now.UTC().Format(time.RFC3339), delay))
	}
	d.save()
}

// expired: the UserSig is no longer usable (6206, 70001, 70052).
func (d *Daemon) expired(code int, desc string) {
	d.log.Warn("UserSig expired or invalidated", "code", code, "desc", desc)
	d.emit(client.Event{Type: client.EventUserSigExpired, Code: code, Desc: desc})
	d.setError(code, desc)
	if d.sigCmd == nil || d.fetchTry >= 2 {
		if d.sigCmd != nil {
			desc += " (usersig_command gave no usable UserSig)"
		}
		d.stop(code, desc+"; log in with a new UserSig")
		return
	}
	d.st.Session = ""
	d.relogin = true
	d.setStatus(client.Logining, "getting a new UserSig")
	d.fetchUserSig(desc)
}

// fetchUserSig runs usersig_command in the background.
func (d *Daemon) fetchUserSig(why string) {
	if d.sigCmd == nil {
		d.stop(codes.NotInitialized, "no UserSig and no usersig_command to get one")
		return
	}
	d.renewing = true
	d.fetchTry++
	gen, user, ctx := d.gen, d.st.UserID, d.ctx
	d.log.Info("running usersig_command", "why", why)
	d.status("getting a new UserSig: " + why)
	go func() {
		sig, err := d.sigCmd(ctx, user)
		d.send(fetched{gen: gen, sig: sig, err: err})
	}()
}

func (d *Daemon) onFetched(m fetched) {
	if m.gen != d.gen {
		return
	}
	d.renewing = false
	if m.err == nil {
		if t, err := usersig.Decode(m.sig.Reveal()); err != nil {
			m.err = fmt.Errorf("usersig_command printed something that is not a UserSig: %v", err)
		} else if t.Identifier != d.st.UserID {
			m.err = fmt.Errorf("usersig_command printed a UserSig for %q, not %q", t.Identifier, d.st.UserID)
		} else if d.clockTrusted() && !t.ExpiresAt().After(d.serverNow()) {
			m.err = fmt.Errorf("usersig_command printed a UserSig that expired at %s", t.ExpiresAt().UTC().Format(time.RFC3339))
		}
	}
	if m.err != nil {
		d.metrics.renewal(false)
		d.log.Warn("getting a new UserSig failed", "err", m.err)
		d.setError(codes.UserSigExpiredLocal, m.err.Error())
		if d.st.UserSig.IsZero() || d.sigExp.IsZero() || (d.clockTrusted() && d.serverNow().After(d.sigExp)) || d.fetchTry >= 5 {
			if client.LoginStatus(d.st.Status) != client.Logined || d.fetchTry >= 5 {
				d.stop(codes.UserSigExpiredLocal, m.err.Error())
				return
			}
		}
		// Still valid for a while: try again later.
		d.renewAt = d.serverNow().Add(d.bo.next() + d.cfg.Reconnect.MinDelay.Duration)
		return
	}
	d.metrics.renewal(true)
	d.log.Info("got a new UserSig", "expires", "later")
	d.st.UserSig = m.sig
	d.noteSig()
	d.fetchTry = 0
	if d.st.Session != "" || client.LoginStatus(d.st.Status) == client.Logined {
		// Renew the session: a re-login of this instance kicks nobody.
		d.relogin = true
	}
	if d.conn != nil && !d.busy {
		d.loginOn(d.conn)
	}
	d.save()
}

func (d *Daemon) onConnLost(m connLost) {
	if m.conn != d.conn {
		return
	}
	d.conn = nil
	d.busy = false
	d.stableAt = time.Time{}
	d.metrics.reconnects.Inc()
	if !d.goal {
		d.phase = connIdle
		return
	}
	d.log.Warn("lost the connection to the broker", "err", m.err)
	d.phase = connReconnecting
	d.connectFailed(fmt.Errorf("connection lost: %v", m.err))
}

func (d *Daemon) onPush(m pushed) {
	if m.conn != d.conn {
		return
	}
	msg := m.msg
	if msg.Session == "" || msg.Session != d.st.Session {
		// A stale or replayed push names another session: harmless.
		d.log.Debug("ignored a push for another session", "type", msg.Type, "session", msg.Session)
		return
	}
	switch msg.Type {
	case mqtt.TypeKick:
		d.kicked(codes.KickedOffline, msg.Desc)
	case mqtt.TypeUserSigExpire:
		if msg.ServerTimeMs != 0 {
			d.offset = time.UnixMilli(msg.ServerTimeMs).Sub(d.clock.Now())
			d.offKnown = true
		}
		d.expired(codes.UserSigExpired, msg.Desc)
	}
}

// shutdown leaves the session resumable: no logout, just a goodbye.
func (d *Daemon) shutdown() {
	if d.conn != nil {
		d.conn.Close(true)
		d.conn = nil
	}
	d.failWaiters(codes.Interrupted, "chatd is shutting down")
	d.save()
	d.mu.Lock()
	for ch := range d.subs {
		close(ch)
		delete(d.subs, ch)
	}
	d.mu.Unlock()
}

// classifyConnErr maps a connection error to a code: refused credentials
// are permanent (6017), everything else is temporary.
func classifyConnErr(err error) (int, string) {
	var ge *gatewayError
	if errors.As(err, &ge) {
		return ge.code, ge.desc
	}
	msg := err.Error()
	if lower := strings.ToLower(msg); strings.Contains(lower, "not authori") || strings.Contains(lower, "bad user name or password") {
		return codes.InvalidParams, "the broker refused the credentials (" + msg + "): check [mqtt] username and password_file, or the UserSig on the gateway's embedded broker"
	}
	return codes.ServerTimeout, msg
}
