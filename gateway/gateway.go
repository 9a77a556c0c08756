// Package gateway is the server side of the product: the login gateway
// devices log in to over MQTT. It verifies UserSigs, enforces the
// multi-client login policy with kicks, answers session resumes, tells
// devices when their UserSig runs out, keeps its state in bbolt, and serves
// an admin API. The rules live in engine.go, without I/O; this file wires
// them to a broker connection and a clock.
package gateway

import (
	"chatd/codes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"chatd/mqtt"
)

// Options configure a Gateway.
type Options struct {
	Config
	Topics mqtt.Topics
	// StatePath is the bbolt state file; empty keeps state in memory only.
	StatePath string
	// NoSurvivors says that no device connection can have outlived the
	// previous run (the embedded broker restarts with the gateway): every
	// session loaded from the state starts offline.
	NoSurvivors bool
	Logger      *slog.Logger
	// Now and NewID are injectable for tests.
	Now   func() time.Time
	NewID func() string
}

// Publisher sends a message to a device; the broker connection provides it.
// Publish must return within a bounded time.
type Publisher interface {
	Publish(topic string, qos byte, payload []byte) error
}

// sendQueueSize bounds the answers and pushes waiting for the broker
// connection; past it, they are dropped and counted.
const sendQueueSize = 16384

// maxHeld bounds the pushes held back while the state cannot be written.
const maxHeld = 10000

// Gateway serialises every event through one mutex-guarded engine and
// persists what changed before the answers go out. Nothing is published
// under the mutex: answers go to a queue that one sender drains.
type Gateway struct {
	opts   Options
	log    *slog.Logger
	now    func() time.Time
	topics mqtt.Topics

	mu    sync.Mutex
	e     *engine
	st    *store
	wake  chan struct{}
	stats *stats
	// held are pushes (kicks, expiry notices) decided while the state
	// could not be written; they go out after the next successful write.
	held []Outbound
	// unwritten is set while the engine has changes the store refused.
	unwritten bool
	// timerAt is when RunTimers will next run Expire.
	timerAt time.Time

	pubMu sync.Mutex
	pub   Publisher
	outq  chan Outbound

	// pacer measures the gateway's capacity and spreads the retries it
	// asks for when saturated.
	pacer pacer

	brokerUp atomic.Bool
	queue    atomic.Pointer[fairQueue[inbound]]
	// clientID is the default MQTT client id: kept in the state file, so
	// the broker's session for it survives restarts, and random.
	clientID string
	// subscribed is closed once the gateway is subscribed to the up topics.
	subscribed     chan struct{}
	subscribedOnce sync.Once
}

// New opens the state and loads it. Close releases it.
func New(opts Options) (*Gateway, error) {
	if err := opts.Config.Validate(); err != nil {
		return nil, err
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.NewID == nil {
		opts.NewID = randomID
	}
	if opts.Topics.Prefix == "" {
		opts.Topics.Prefix = mqtt.DefaultPrefix
	}
	g := &Gateway{opts: opts, log: opts.Logger, now: opts.Now, topics: opts.Topics, wake: make(chan struct{}, 1),
		subscribed: make(chan struct{}), outq: make(chan Outbound, sendQueueSize)}
	g.stats = newStats(opts.Now, g.countSessions)
	g.stats.addGauge("chatgw_broker_connected", "1 while the gateway is connected to its broker.", func() float64 {
		if g.brokerUp.Load() {
			return 1
		}
		return 0
	})
	g.stats.addGauge("chatgw_queue_length", "Device messages waiting for the gateway.", func() float64 {
		if q := g.queue.Load(); q != nil {
			return float64(q.len())
		}
		return 0
	})
	g.stats.addGauge("chatgw_send_queue_length", "Answers and pushes waiting for the broker connection.", func() float64 { return float64(len(g.outq)) })
	g.stats.addGauge("chatgw_state_unwritten", "1 while changes wait to be written to the state file.", func() float64 {
		g.mu.Lock()
		defer g.mu.Unlock()
		if g.unwritten {
			return 1
		}
		return 0
	})
	g.e = newEngine(opts.Config, opts.NewID, g.stats)
	g.clientID = "chatgw-" + randomID()
	if opts.StatePath != "" {
		st, err := openStore(opts.StatePath)
		if err != nil {
			return nil, err
		}
		if err := st.load(g.e); err != nil {
			st.close()
			return nil, fmt.Errorf("loading gateway state %s: %w (move it aside to start with no sessions)", opts.StatePath, err)
		}
		g.st = st
		if g.clientID, err = st.clientID(); err != nil {
			st.close()
			return nil, fmt.Errorf("gateway state %s: %w", opts.StatePath, err)
		}
		n := 0
		if opts.NoSurvivors {
			n = g.e.AllOffline()
			if _, err := st.flush(g.e); err != nil {
				st.close()
				return nil, fmt.Errorf("writing gateway state %s: %w", opts.StatePath, err)
			}
		}
		g.log.Info("gateway state loaded", "path", opts.StatePath, "active_sessions", len(g.e.ActiveSessions("")), "marked_offline", n)
	}
	return g, nil
}

func randomID() string {
	b := make([]byte, 12)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return hex.EncodeToString(b)
}

func (g *Gateway) countSessions() (active, online int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.e.counts()
}

// Close releases the state file.
func (g *Gateway) Close() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.st != nil {
		if g.unwritten {
			g.log.Error("gateway state: changes could not be written before shutdown")
		}
		err := g.st.close()
		g.st = nil
		return err
	}
	return nil
}

// SetPublisher sets where answers go (the broker connection).
func (g *Gateway) SetPublisher(p Publisher) {
	g.pubMu.Lock()
	g.pub = p
	g.pubMu.Unlock()
}

// errUnwritten is what Kick returns when the state write failed.
var errUnwritten = errors.New("the gateway state could not be written; the change is kept in memory and written again every second")

// reqID names a device request being answered: its device and id.
type reqID struct{ user, instance, id string }

// answers reports whether o is the answer to one of reqs (not a push).
func answers(reqs map[reqID]bool, o Outbound) bool {
	return o.Msg.Type != mqtt.TypeKick && o.Msg.Type != mqtt.TypeUserSigExpire && reqs[reqID{o.UserID, o.Instance, o.Msg.ID}]
}

// commit persists the engine's changes in one transaction and queues out;
// call with g.mu held. State is written before anyone is told, so a crash
// never leaves a device holding a session the restarted gateway does not
// know. When the write fails, the answers to the requests being handled
// (reqs) become a retryable 70500, and the pushes wait for the next
// successful write.
func (g *Gateway) commit(out []Outbound, reqs map[reqID]bool) error {
	var err error
	if g.st != nil {
		var wrote bool
		wrote, err = g.st.flush(g.e)
		if wrote {
			g.stats.commits.Add(1)
		}
	} else {
		g.e.dirty.reset()
	}
	if err != nil {
		if !g.unwritten {
			g.log.Error("writing gateway state failed; answering 70500 and retrying every second", "err", err)
		}
		g.unwritten = true
		g.stats.writeFails.Add(1)
		for _, o := range out {
			if answers(reqs, o) {
				g.enqueue(Outbound{UserID: o.UserID, Instance: o.Instance, Msg: mqtt.Message{
					Type: o.Msg.Type, ID: o.Msg.ID, Session: o.Msg.Session, Code: codes.ServerInternal2,
					Desc: "the gateway could not save this change; retry with backoff (the same request id gets the answer once it is saved)"}})
				continue
			}
			if len(g.held) >= maxHeld {
				g.stats.dropped(dropSendQueueFull)
				continue
			}
			g.held = append(g.held, o)
		}
		g.wakeTimers()
		return errUnwritten
	}
	if g.unwritten {
		g.log.Info("gateway state written again", "held_pushes", len(g.held))
		g.unwritten = false
	}
	out = append(g.held, out...)
	g.held = nil
	for _, o := range out {
		g.enqueue(o)
	}
	if n := g.e.NextExpire(); !n.IsZero() && (g.timerAt.IsZero() || n.Before(g.timerAt)) {
		g.wakeTimers()
	}
	return nil
}

func (g *Gateway) wakeTimers() {
	select {
	case g.wake <- struct{}{}:
	default:
	}
}

// enqueue hands o to the sender without blocking.
func (g *Gateway) enqueue(o Outbound) {
	select {
	case g.outq <- o:
	default:
		g.stats.dropped(dropSendQueueFull)
	}
}

// runSender publishes what commit queued, in order, until ctx ends.
func (g *Gateway) runSender(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case o := <-g.outq:
			g.send(o)
		}
	}
}

// sendQueued publishes everything queued now; for tests without Serve.
func (g *Gateway) sendQueued() {
	for {
		select {
		case o := <-g.outq:
			g.send(o)
		default:
			return
		}
	}
}

func (g *Gateway) send(o Outbound) {
	g.pubMu.Lock()
	p := g.pub
	g.pubMu.Unlock()
	if p == nil {
		g.stats.publishFails.Add(1)
		return
	}
	topic := g.topics.Down(o.UserID, o.Instance)
	if err := p.Publish(topic, mqtt.QoSReply, mqtt.Encode(o.Msg)); err != nil {
		g.stats.publishFails.Add(1)
		g.log.Debug("sending to device failed", "user", o.UserID, "instance", o.Instance, "type", o.Msg.Type, "err", err)
	}
}

// parseUp returns the device an up topic belongs to, checking the ids the
// way the embedded broker does, whatever broker delivered the message.
func (g *Gateway) parseUp(topic string) (user, instance string, err error) {
	user, instance, err = g.topics.ParseUp(topic)
	if err != nil {
		return "", "", err
	}
	if err := mqtt.ValidateUserID(user); err != nil {
		return "", "", err
	}
	if err := mqtt.ValidateInstanceID(instance); err != nil {
		return "", "", err
	}
	return user, instance, nil
}

// HandleMessage processes one MQTT message from a device's up topic.
// Whatever it is, it never panics and never blocks on the network.
func (g *Gateway) HandleMessage(topic string, payload []byte) {
	g.HandleMessages([]inbound{{topic: topic, payload: payload}})
}

// HandleMessages processes a batch of device messages in order, as one
// group commit: the changes of all of them are written in one transaction,
// and only then do their answers and pushes go out. Under load the batch
// is whatever queued up during the previous write, so the writes per
// second stay bounded by the disk while the logins per second grow.
func (g *Gateway) HandleMessages(batch []inbound) {
	g.mu.Lock()
	defer g.mu.Unlock()
	var out []Outbound
	var reqs map[reqID]bool
	for _, in := range batch {
		o, req, ok := g.handle(in.topic, in.payload)
		if ok {
			if reqs == nil {
				reqs = map[reqID]bool{}
			}
			reqs[req] = true
		}
		out = append(out, o...)
	}
	if len(out) > 0 || !g.e.dirty.empty() {
		g.commit(out, reqs)
	}
}

// handle runs one message through the engine; call with g.mu held. It
// returns what to send and, when the message is a request that gets an
// answer, which request it is.
func (g *Gateway) handle(topic string, payload []byte) (out []Outbound, req reqID, isReq bool) {
	user, instance, err := g.parseUp(topic)
	if err != nil {
		g.stats.dropped(dropBadTopic)
		g.log.Debug("dropped message", "topic", topic, "err", err)
		return nil, reqID{}, false
	}
	if len(payload) == 0 {
		g.stats.dropped(dropEmpty)
		return nil, reqID{}, false
	}
	m, err := mqtt.Decode(payload)
	if err != nil {
		reason := dropMalformed
		if len(payload) > mqtt.MaxPayload {
			reason = dropOversized
		}
		g.stats.dropped(reason)
		g.log.Debug("bad message from device", "user", user, "instance", instance, "err", err)
		// Answer so a developer sees why, naming the request when it has
		// an id.
		return []Outbound{{UserID: user, Instance: instance, Msg: mqtt.Message{
			Type: mqtt.TypeError, ID: mqtt.PeekID(payload), Code: codes.InvalidParams, Desc: err.Error()}}}, reqID{}, false
	}
	now := g.now()
	out = g.e.Handle(now, user, instance, m)
	for _, o := range out {
		switch o.Msg.Type {
		case mqtt.TypeLoginResult:
			if o.Msg.Code == 0 {
				g.log.Info("login", "user", user, "instance", instance, "platform", m.Platform, "session", o.Msg.Session)
			} else {
				g.log.Info("login refused", "user", user, "instance", instance, "code", o.Msg.Code, "desc", o.Msg.Desc)
			}
		case mqtt.TypeResumeResult:
			g.log.Info("resume", "user", user, "instance", instance, "session", m.Session, "code", o.Msg.Code)
		case mqtt.TypeKick:
			g.log.Info("kick", "user", o.UserID, "instance", o.Instance, "session", o.Msg.Session, "reason", o.Msg.Reason)
		}
		if o.UserID == user && o.Instance == instance && o.Msg.ID == m.ID && o.Msg.Type != mqtt.TypeKick {
			isReq = true
		}
	}
	return out, reqID{user, instance, m.ID}, isReq
}

// Kick kicks every session of user and invalidates the UserSigs issued
// before now. It returns how many sessions were kicked. When the state
// cannot be written it returns an error: the kick is kept in memory and
// written (and its kicks sent) once the state can be written again.
func (g *Gateway) Kick(user string) (int, time.Time, error) {
	if err := mqtt.ValidateUserID(user); err != nil {
		return 0, time.Time{}, err
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	now := g.now()
	out, n := g.e.Kick(now, user)
	g.log.Info("admin kick", "user", user, "sessions", n)
	if err := g.commit(out, nil); err != nil {
		return n, time.Unix(now.Unix(), 0), err
	}
	return n, time.Unix(now.Unix(), 0), nil
}

// Sessions lists the active sessions (of one user, or all when user is "").
func (g *Gateway) Sessions(user string) []Session {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.e.ActiveSessions(user)
}

// RevokedBefore returns when the user's UserSigs were last invalidated.
func (g *Gateway) RevokedBefore(user string) (time.Time, bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	at, ok := g.e.revoked[user]
	if !ok {
		return time.Time{}, false
	}
	return time.Unix(at, 0), true
}

// WriteMetrics writes the Prometheus text format.
func (g *Gateway) WriteMetrics(w io.Writer) { g.stats.write(w) }

// Tick runs the expiry rules now (and writes changes the store refused
// before) and returns when to run them next.
func (g *Gateway) Tick() time.Time {
	g.mu.Lock()
	defer g.mu.Unlock()
	now := g.now()
	out, next := g.e.Expire(now)
	for _, o := range out {
		g.log.Info("usersig expired", "user", o.UserID, "instance", o.Instance, "session", o.Msg.Session)
	}
	g.commit(out, nil)
	if g.unwritten {
		// Try again in a second.
		if at := now.Add(time.Second); next.IsZero() || at.Before(next) {
			next = at
		}
	}
	g.timerAt = next
	if next.IsZero() {
		g.timerAt = now.Add(time.Hour)
	}
	return next
}

// RunTimers sends UserSig-expired notices on time, until ctx ends. The
// notice goes out within a second of the expiry, whether or not the device
// says anything.
func (g *Gateway) RunTimers(ctx context.Context) error {
	for {
		next := g.Tick()
		// Drain the wake-up our own Tick caused.
		select {
		case <-g.wake:
		default:
		}
		wait := time.Hour
		if !next.IsZero() {
			wait = max(next.Sub(g.now()), 10*time.Millisecond)
		}
		t := time.NewTimer(min(wait, time.Hour))
		select {
		case <-ctx.Done():
			t.Stop()
			if errors.Is(ctx.Err(), context.Canceled) {
				return nil
			}
			return ctx.Err()
		case <-g.wake:
		case <-t.C:
		}
		t.Stop()
	}
}
