// Package daemon is chatd's core: it keeps the device's chat identity
// logged in to the gateway, through network drops, broker restarts, power
// cuts, clock steps, UserSig expiry and kicks, the way the Tencent Chat
// SDK's login API defines them.
//
// The login core is a pure state machine (machine.go, its table in
// doc.go); the Daemon here is its runner: one goroutine feeds it events
// and carries out the effects it returns (dial, send, persist, run the
// helper, answer callers), and every goroutine it starts reports back
// through the inbox and ends before Run returns.
package daemon

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"chatd/client"
	"chatd/codes"
	"chatd/mqtt"
	"chatd/storage"
	"chatd/usersig"

	mrand "math/rand/v2"
)

// Conn is one connection to the gateway; *mqtt.Conn is the real one.
type Conn interface {
	Request(ctx context.Context, m mqtt.Message) (mqtt.Message, error)
	Pushes() <-chan mqtt.Message
	Lost() <-chan struct{}
	Err() error
	// Close ends the connection; with goodbye the gateway is told first.
	Close(goodbye bool)
	// Abort cuts the network connection without an MQTT DISCONNECT, so
	// that the broker publishes the Will.
	Abort()
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
	// MachineID is /etc/machine-id; default: read from there.
	MachineID func() string
	// StateNotPersisted says why the state is kept in memory only (the
	// state directory failed at start); "" when it is persisted.
	StateNotPersisted string
}

// connection values of the API's "connection" field.
const (
	connIdle         = "idle"
	connConnecting   = "connecting"
	connConnected    = "connected"
	connReconnecting = "reconnecting"
)

// Daemon keeps one chat identity logged in. Create it with New, run it
// with Run; its methods are safe for concurrent use.
type Daemon struct {
	cfg       Config
	store     storage.Store
	dialer    Dialer
	log       *slog.Logger
	clock     Clock
	synced    func() bool
	sigCmd    func(ctx context.Context, userID string) (usersig.Secret, error)
	onStat    func(string)
	rand      func(int64) int64
	machineID func() string

	inbox    chan Event
	stopping chan struct{} // closed when Run starts to shut down
	done     chan struct{} // closed when Run has returned
	wg       sync.WaitGroup

	// Owned by the state goroutine.
	m          *machine
	conns      map[uint64]Conn
	closing    []chan struct{} // closes under way, which the next dial waits for
	helperStop context.CancelFunc
	waiters    map[uint64]chan loginReply
	waiterSeq  atomic.Uint64
	persistErr error
	persistLog time.Time // when a persistence failure was last logged
	notPersist string
	statusLine string

	mu           sync.Mutex
	snap         client.Status
	serverAnchor serverAnchor
	subs         map[chan client.Event]struct{}

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
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Clock == nil {
		o.Clock = newRealClock()
	}
	if o.ClockSynced == nil {
		o.ClockSynced = systemClockSynced
	}
	if o.Rand == nil {
		o.Rand = mrand.Int64N
	}
	if o.MachineID == nil {
		o.MachineID = readMachineID
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
		cfg:        cfg,
		store:      o.Store,
		dialer:     o.Dialer,
		log:        o.Logger,
		clock:      o.Clock,
		synced:     o.ClockSynced,
		sigCmd:     o.UserSigCommand,
		onStat:     o.OnStatus,
		rand:       o.Rand,
		machineID:  o.MachineID,
		notPersist: o.StateNotPersisted,
		inbox:      make(chan Event, 64),
		stopping:   make(chan struct{}),
		done:       make(chan struct{}),
		conns:      map[uint64]Conn{},
		waiters:    map[uint64]chan loginReply{},
		subs:       map[chan client.Event]struct{}{},
	}
	d.metrics = newMetrics(d)
	return d, nil
}

// send hands an event to the state goroutine, unless it is stopping.
func (d *Daemon) send(e Event) {
	select {
	case d.inbox <- e:
	case <-d.stopping:
	}
}

// Alive is when the state goroutine last turned; the watchdog pings only
// while it moves.
func (d *Daemon) Alive() time.Time { return time.Unix(0, d.alive.Load()) }

// Heartbeat bounds how long the state loop sleeps, so Alive stays fresh.
const Heartbeat = 5 * time.Second

func (d *Daemon) instant() Instant {
	return Instant{Wall: d.clock.Now(), Mono: d.clock.Mono(), Synced: d.synced()}
}

// Run loads the state and keeps the identity logged in until ctx ends.
// It returns only after every goroutine it started has ended.
func (d *Daemon) Run(ctx context.Context) error {
	defer close(d.done)
	st, err := d.store.Load()
	found := err == nil
	if err != nil && !errors.Is(err, storage.ErrNotFound) {
		close(d.stopping)
		return fmt.Errorf("loading state: %w", err)
	}
	initial := usersig.Secret{}
	if d.cfg.UserSigFile != "" {
		s, err := readUserSigFile(d.cfg.UserSigFile)
		if err != nil {
			if found && st.UserID == d.cfg.UserID && !st.UserSig.IsZero() {
				d.log.Warn("cannot read usersig_file; using the UserSig kept in the state database", "err", err)
			} else {
				d.log.Warn("cannot read the initial UserSig", "err", err)
			}
		} else {
			initial = s
		}
	}
	b := make([]byte, 8)
	rand.Read(b)
	mcfg := machineConfigFrom(d.cfg, d.sigCmd != nil, d.rand)
	m, effects := newMachine(mcfg, st, found, initial, d.machineID(), "chatd-"+hex.EncodeToString(b), d.instant())
	d.m = m
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	d.exec(runCtx, effects)

	var timer Timer
	for {
		now := d.instant()
		d.alive.Store(now.Wall.UnixNano())
		d.publish()
		wait := Heartbeat
		if at := d.m.nextWake(); at > 0 {
			wait = min(wait, max(at-now.Mono, 0))
		}
		if timer != nil {
			timer.Stop()
		}
		deadline := now.Mono + wait
		timer = d.clock.NewTimer(wait)
		var ev Event
		if d.clock.Mono() >= deadline {
			// The clock passed the deadline while the timer was being made
			// (a test's clock jumps; a loaded machine): tick now.
			select {
			case <-ctx.Done():
				timer.Stop()
				d.shutdown(runCtx, cancel)
				return nil
			default:
			}
			ev = EvTick{}
		} else {
			select {
			case <-ctx.Done():
				timer.Stop()
				d.shutdown(runCtx, cancel)
				return nil
			case <-timer.C():
				ev = EvTick{}
			case ev = <-d.inbox:
			}
		}
		d.exec(runCtx, d.m.handle(d.instant(), d.unwrap(ev)))
	}
}

// shutdown leaves the session resumable (a goodbye, no logout), ends every
// goroutine and closes the event streams.
func (d *Daemon) shutdown(ctx context.Context, cancel context.CancelFunc) {
	d.exec(ctx, d.m.handle(d.instant(), EvStop{}))
	close(d.stopping)
	cancel()
	d.wg.Wait()
	for id, c := range d.conns {
		c.Close(false)
		delete(d.conns, id)
	}
	for w, ch := range d.waiters {
		ch <- loginReply{codes.Interrupted, "chatd is shutting down"}
		delete(d.waiters, w)
	}
	d.publish()
	d.mu.Lock()
	for ch := range d.subs {
		close(ch)
		delete(d.subs, ch)
	}
	d.mu.Unlock()
}

// go starts a tracked goroutine.
func (d *Daemon) goTracked(f func()) {
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		f()
	}()
}

// exec carries out effects in order. Persist comes first in a batch, so
// that what follows is durable. Callers are answered last, after the
// snapshot is refreshed and the batch's events are out, so that a caller
// sees everything that led to its answer.
func (d *Daemon) exec(ctx context.Context, effects []Effect) {
	persistNote := ""
	var answers []Answer
	for _, e := range effects {
		switch e := e.(type) {
		case Persist:
			persistNote = d.persist(e.State)
		case Dial:
			d.dial(ctx, e)
		case Send:
			if c := d.conns[e.Conn]; c != nil {
				d.request(ctx, e.Conn, c, e.Msg)
			} else {
				d.goTracked(func() { d.send(EvAnswered{Conn: e.Conn, Req: e.Msg, Err: mqtt.ErrConnLost}) })
			}
		case CloseConn:
			if c := d.conns[e.Conn]; c != nil {
				delete(d.conns, e.Conn)
				closed := make(chan struct{})
				d.closing = append(d.closing, closed)
				d.goTracked(func() {
					defer close(closed)
					if e.Abort {
						c.Abort()
					} else {
						c.Close(e.Goodbye)
					}
				})
			}
		case RunHelper:
			d.runHelper(ctx, e)
		case CancelHelper:
			if d.helperStop != nil {
				d.helperStop()
				d.helperStop = nil
			}
		case Emit:
			d.emit(e.Event)
		case Answer:
			answers = append(answers, e)
		case SetStatus:
			if e.Line != d.statusLine {
				d.statusLine = e.Line
				if d.onStat != nil {
					d.onStat(e.Line)
				}
			}
		case Log:
			d.log.Log(ctx, e.Level, e.Msg, e.Args...)
		case Count:
			d.metrics.count(e.Name, e.Code)
		}
	}
	if len(answers) == 0 {
		return
	}
	d.publish()
	for _, a := range answers {
		if ch := d.waiters[a.Waiter]; ch != nil {
			delete(d.waiters, a.Waiter)
			desc := a.Desc
			if persistNote != "" {
				desc += " (" + persistNote + ")"
			}
			ch <- loginReply{a.Code, desc}
		}
	}
}

// persist commits st. A failure is surfaced (status, metrics, a log line
// every few minutes) and the state lives on in memory; the next change
// tries again.
func (d *Daemon) persist(st storage.State) string {
	wrote, err := d.store.Save(st)
	if err != nil {
		now := d.clock.Now()
		if d.persistErr == nil || now.Sub(d.persistLog) >= 5*time.Minute || now.Before(d.persistLog) {
			d.log.Error("saving state failed; running on in memory, the state will not survive a restart", "err", err)
			d.persistLog = now
		}
		d.persistErr = err
		d.metrics.persistFailures.Inc()
		return "not persisted: " + err.Error()
	}
	if d.persistErr != nil {
		d.log.Info("saving state works again")
		d.persistErr = nil
	}
	if wrote {
		d.metrics.writes.Inc()
	}
	return ""
}

func (d *Daemon) dial(ctx context.Context, e Dial) {
	p := DialParams{UserID: e.UserID, Instance: e.Instance, UserSig: e.Sig}
	timeout := d.cfg.MQTT.ConnectTimeout.Duration + time.Second
	// The connections being closed use the same client id: the broker
	// must have let go of them first (an account switch would otherwise
	// be refused as a takeover of another user's client id).
	closing := d.closing
	d.closing = nil
	d.goTracked(func() {
		for _, c := range closing {
			select {
			case <-c:
			case <-ctx.Done():
				return
			}
		}
		cctx, cancel := context.WithTimeout(ctx, timeout)
		conn, err := d.dialer.Dial(cctx, p)
		cancel()
		if err == nil && ctx.Err() != nil {
			conn.Close(false)
			return
		}
		if err == nil {
			d.goTracked(func() { d.watch(e.Conn, conn) })
		}
		d.send(dialedConn{EvDialed{Conn: e.Conn, Err: err}, conn})
	})
}

// dialedConn carries the connection with EvDialed; the runner keeps it,
// the machine sees only its id.
type dialedConn struct {
	EvDialed
	conn Conn
}

// request sends m on conn and reports the answer.
func (d *Daemon) request(ctx context.Context, id uint64, conn Conn, m mqtt.Message) {
	timeout := d.cfg.MQTT.RequestTimeout.Duration
	d.goTracked(func() {
		rctx, cancel := context.WithTimeout(ctx, timeout)
		reply, err := conn.Request(rctx, m)
		cancel()
		d.send(EvAnswered{Conn: id, Req: m, Reply: reply, Err: err})
	})
}

// watch forwards a connection's pushes, in order, and its loss.
func (d *Daemon) watch(id uint64, conn Conn) {
	for {
		select {
		case m := <-conn.Pushes():
			d.send(EvPush{Conn: id, Msg: m})
		case <-conn.Lost():
			// Pushes that arrived before the loss go first.
			for {
				select {
				case m := <-conn.Pushes():
					d.send(EvPush{Conn: id, Msg: m})
					continue
				default:
				}
				break
			}
			d.send(EvConnLost{Conn: id, Err: conn.Err()})
			return
		case <-d.stopping:
			return
		}
	}
}

func (d *Daemon) runHelper(ctx context.Context, e RunHelper) {
	if d.sigCmd == nil {
		d.goTracked(func() { d.send(EvHelper{Gen: e.Gen, Err: errors.New("no usersig_command configured")}) })
		return
	}
	if d.helperStop != nil {
		d.helperStop()
	}
	hctx, cancel := context.WithCancel(ctx)
	d.helperStop = cancel
	d.goTracked(func() {
		defer cancel()
		sig, err := d.sigCmd(hctx, e.UserID)
		if hctx.Err() != nil && ctx.Err() == nil {
			return // cancelled: the goal changed
		}
		d.send(EvHelper{Gen: e.Gen, Sig: sig, Err: err})
	})
}

// unwrap takes what only the runner needs (the connection of
// a dial) before the machine sees the event.
func (d *Daemon) unwrap(ev Event) Event {
	if we, ok := ev.(waiterEvent); ok {
		d.waiters[we.id] = we.reply
		return we.ev
	}
	if dc, ok := ev.(dialedConn); ok {
		if dc.Err == nil {
			d.conns[dc.Conn] = dc.conn
		}
		return dc.EvDialed
	}
	return ev
}

func (dialedConn) isEvent() {}

// readMachineID reads /etc/machine-id ("" when there is none).
func readMachineID() string {
	b, err := os.ReadFile("/etc/machine-id")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// classifyDialErr maps a failed connection to a code and says whether
// retrying can help. The broker's CONNACK refusals are typed (paho's
// packets errors, wrapped by chatd/mqtt); docs/protocol.md says what the
// embedded broker means by each. With a broker account of its own
// (brokerAccount), a refusal is about that account, not the UserSig.
func classifyDialErr(err error, brokerAccount bool, user string, sig usersig.Secret) (code int, desc string, permanent bool) {
	rc, refused := mqtt.RefusalCode(err)
	if !refused {
		return codes.ServerTimeout, err.Error(), false
	}
	if brokerAccount && (rc == mqtt.RefusedBadUsernameOrPassword || rc == mqtt.RefusedNotAuthorized) {
		return codes.InvalidParams, "the broker refused the account (" + err.Error() + "): check [mqtt] username and password_file, and client_id where the broker binds client ids to accounts", true
	}
	switch rc {
	case mqtt.RefusedBadUsernameOrPassword:
		// The UserSig did not verify: say why, as far as the device can
		// tell from the UserSig itself.
		t, derr := usersig.Decode(sig.Reveal())
		switch {
		case derr != nil:
			return usersig.CodeOf(derr), "the broker refused the UserSig at CONNECT: " + derr.Error(), true
		case t.Identifier != user:
			return codes.UserSigWrongUser, fmt.Sprintf("the broker refused the UserSig at CONNECT: it is for %q, not %q", t.Identifier, user), true
		}
		return codes.UserSigWrongKey, "the broker refused the UserSig at CONNECT: it is not signed with this app's key and SDKAppID", true
	case mqtt.RefusedNotAuthorized:
		return codes.UserSigExpired, "the broker refused the UserSig at CONNECT: it expired long ago; get a new UserSig", true
	case mqtt.RefusedIdentifierRejected:
		return codes.InvalidParams, "the broker rejected the client id (the instance id " + err.Error() + "): another user's device may hold it; see docs/protocol.md", true
	case mqtt.RefusedBadProtocolVersion:
		return codes.InvalidParams, "the broker does not speak MQTT 3.1.1 (" + err.Error() + ")", true
	case mqtt.RefusedServerUnavailable:
		return codes.ServerTimeout, "the broker is unavailable for now (" + err.Error() + "); retrying", false
	}
	return codes.ServerTimeout, err.Error(), false
}

// WriteMetrics implements the local API's Backend.
func (d *Daemon) WriteMetrics(w io.Writer) { d.metrics.write(w) }
