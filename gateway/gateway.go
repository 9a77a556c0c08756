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
	"time"

	"chatd/mqtt"
)

// Options configure a Gateway.
type Options struct {
	Config
	Topics mqtt.Topics
	// StatePath is the bbolt state file; empty keeps state in memory only.
	StatePath string
	Logger    *slog.Logger
	// Now and NewID are injectable for tests.
	Now   func() time.Time
	NewID func() string
}

// Publisher sends a message to a device; the broker connection provides it.
type Publisher interface {
	Publish(topic string, qos byte, payload []byte) error
}

// Gateway serialises every event through one mutex-guarded engine and
// persists what changed before the answers go out.
type Gateway struct {
	opts   Options
	log    *slog.Logger
	now    func() time.Time
	topics mqtt.Topics

	mu    sync.Mutex
	e     *engine
	st    *store
	pub   Publisher
	wake  chan struct{}
	stats *stats

	// subscribed is closed once the gateway first receives device messages.
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
	g := &Gateway{opts: opts, log: opts.Logger, now: opts.Now, topics: opts.Topics, wake: make(chan struct{}, 1), subscribed: make(chan struct{})}
	g.stats = newStats(opts.Now, g.countSessions)
	g.e = newEngine(opts.Config, opts.NewID, g.stats)
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
		g.log.Info("gateway state loaded", "path", opts.StatePath, "active_sessions", len(g.e.ActiveSessions("")))
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
	for _, s := range g.e.sessions {
		if s.Active() {
			active++
			if s.Online {
				online++
			}
		}
	}
	return active, online
}

// Close releases the state file.
func (g *Gateway) Close() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.st != nil {
		err := g.st.close()
		g.st = nil
		return err
	}
	return nil
}

// SetPublisher sets where answers go (the broker connection).
func (g *Gateway) SetPublisher(p Publisher) {
	g.mu.Lock()
	g.pub = p
	g.mu.Unlock()
}

// commit persists the engine's changes and sends out; call with g.mu held.
// State is written before anyone is told, so a crash never leaves a device
// holding a session the restarted gateway does not know.
func (g *Gateway) commit(out []Outbound) {
	if g.st != nil {
		if err := g.st.flush(g.e); err != nil {
			g.log.Error("writing gateway state failed", "err", err)
		}
	} else {
		g.e.dirty.reset()
	}
	for _, o := range out {
		if g.pub == nil {
			continue
		}
		topic := g.topics.Down(o.UserID, o.Instance)
		if err := g.pub.Publish(topic, mqtt.QoSReply, mqtt.Encode(o.Msg)); err != nil {
			g.log.Warn("sending to device failed", "user", o.UserID, "instance", o.Instance, "type", o.Msg.Type, "err", err)
		}
	}
	select {
	case g.wake <- struct{}{}:
	default:
	}
}

// HandleMessage processes one MQTT message from a device's up topic.
// Whatever it is, it never panics and never blocks on the network.
func (g *Gateway) HandleMessage(topic string, payload []byte) {
	user, instance, err := g.topics.ParseUp(topic)
	if err != nil {
		g.stats.dropped("bad_topic")
		g.log.Debug("dropped message", "topic", topic, "err", err)
		return
	}
	m, err := mqtt.Decode(payload)
	g.mu.Lock()
	defer g.mu.Unlock()
	if err != nil {
		reason := "malformed"
		if len(payload) > mqtt.MaxPayload {
			reason = "oversized"
		}
		g.stats.dropped(reason)
		g.log.Info("bad message from device", "user", user, "instance", instance, "err", err)
		if len(payload) > 0 && len(payload) <= mqtt.MaxPayload*4 {
			// Answer so a developer sees why; a flood of garbage is dropped silently.
			g.commit([]Outbound{{UserID: user, Instance: instance, Msg: mqtt.Message{
				Type: mqtt.TypeError, Code: codes.InvalidParams, Desc: err.Error()}}})
		}
		return
	}
	now := g.now()
	out := g.e.Handle(now, user, instance, m)
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
	}
	g.commit(out)
}

// Kick kicks every session of user and invalidates the UserSigs issued
// before now. It returns how many sessions were kicked.
func (g *Gateway) Kick(user string) (int, time.Time, error) {
	if err := mqtt.ValidateUserID(user); err != nil {
		return 0, time.Time{}, err
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	now := g.now()
	out, n := g.e.Kick(now, user)
	g.log.Info("admin kick", "user", user, "sessions", n)
	g.commit(out)
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

// Tick runs the expiry rules now and returns when to run them next.
func (g *Gateway) Tick() time.Time {
	g.mu.Lock()
	defer g.mu.Unlock()
	out, next := g.e.Expire(g.now())
	for _, o := range out {
		g.log.Info("usersig expired", "user", o.UserID, "instance", o.Instance, "session", o.Msg.Session)
	}
	g.commit(out)
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
