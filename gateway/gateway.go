// Package gateway is the server side of the product: the login gateway
// devices log in to over MQTT. It verifies UserSigs, enforces the
// multi-client login policy with kicks, answers session resumes, tells
// devices when their UserSig runs out, keeps its state in bbolt, and serves
// an admin API. The rules live in engine.go, without I/O; this file wires
// them to a broker connection, a clock and a StateStore (state.go).
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
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"chatd/mqtt"
)

// Options configure a Gateway.
type Options struct {
	Config
	Topics mqtt.Topics
	// Store holds the state, shared with the other gateways that use it:
	// the gateway watches it for their writes. The caller closes it after
	// the gateway. Nil: a bbolt file at StatePath, or memory only when
	// StatePath is empty too.
	Store StateStore
	// StatePath is the bbolt state file, when Store is nil; empty keeps
	// state in memory only.
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

	mu sync.Mutex
	e  *engine
	st StateStore
	// ownStore is set when the gateway opened st (and closes it).
	ownStore  bool
	stopWatch func()
	// revs holds the revision of each cached user's record; gone, of the
	// records this gateway deleted whose deletion the watch has not shown
	// yet. The watch applies only records newer than these.
	revs map[string]uint64
	gone map[string]uint64
	// failed are the users whose record could not be written (not lost to
	// another writer: refused by the store); they stay dirty and are
	// written again every second.
	failed map[string]bool
	wake   chan struct{}
	stats  *stats
	// held are pushes (kicks, expiry notices) decided while their user's
	// record could not be written; they go out once it is written.
	held []Outbound
	// unwritten is set while the engine has changes the store refused.
	unwritten bool
	closed    bool
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
func New(opts Options) (*Gateway, error) { return NewContext(context.Background(), opts) }

// NewContext is New that gives up when ctx ends (a gateway told to stop
// while its shared state is still being read).
func NewContext(ctx context.Context, opts Options) (*Gateway, error) {
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
	g.e.holdEffects()
	g.stats.dau = func() int {
		g.mu.Lock()
		defer g.mu.Unlock()
		return g.e.dau(g.now())
	}
	g.revs, g.gone, g.failed = map[string]uint64{}, map[string]uint64{}, map[string]bool{}
	g.clientID = "chatgw-" + randomID()
	where := "memory"
	switch {
	case opts.Store != nil:
		g.st = opts.Store
		where = "shared store"
	case opts.StatePath != "":
		st, err := openBolt(opts.StatePath, g.log)
		if err != nil {
			return nil, err
		}
		if g.clientID, err = st.clientID(); err != nil {
			st.Close()
			return nil, fmt.Errorf("gateway state %s: %w", opts.StatePath, err)
		}
		g.st, g.ownStore, where = st, true, opts.StatePath
	default:
		g.st, g.ownStore = newMemoryStore(), true
	}
	fail := func(err error) (*Gateway, error) {
		if g.stopWatch != nil {
			g.stopWatch()
		}
		if g.ownStore {
			g.st.Close()
		}
		return nil, err
	}
	if !g.ownStore {
		// Watch before loading, so that no write falls between the two.
		wctx, cancel := context.WithTimeout(ctx, loadTimeout)
		stop, err := g.st.Watch(wctx, g.applyChange)
		cancel()
		if err != nil {
			return fail(fmt.Errorf("watching the gateway state: %w", err))
		}
		g.stopWatch = stop
	}
	lctx, cancel := context.WithTimeout(ctx, loadTimeout)
	defer cancel()
	recs, err := g.st.Load(lctx)
	if err != nil {
		return fail(fmt.Errorf("loading gateway state (%s): %w", where, err))
	}
	// Fail outside the lock: stopping a watch waits for its callback.
	n, err := g.loadRecords(recs, opts.NoSurvivors)
	if err != nil {
		return fail(fmt.Errorf("writing gateway state (%s): %w", where, err))
	}
	if len(recs) > 0 || g.ownStore && opts.StatePath != "" {
		active, _ := g.countSessions()
		g.log.Info("gateway state loaded", "from", where, "users", len(recs), "active_sessions", active, "marked_offline", n)
	}
	return g, nil
}

// loadRecords fills the cache with recs and, with noSurvivors, marks every
// session offline and writes that; it returns how many it marked.
func (g *Gateway) loadRecords(recs []StoredRecord, noSurvivors bool) (int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, r := range recs {
		if r.Revision > g.revs[r.User] {
			g.e.setUser(r.User, r.Record)
			g.revs[r.User] = r.Revision
		}
	}
	if !noSurvivors {
		return 0, nil
	}
	n := g.e.AllOffline()
	if _, err := g.commitUsers(); err != nil {
		return 0, err
	}
	if len(g.e.dirty.users) > 0 {
		return 0, fmt.Errorf("%d users' records changed meanwhile; start again", len(g.e.dirty.users))
	}
	return n, nil
}

// Timeouts of the state store's calls.
const (
	loadTimeout  = time.Minute
	writeTimeout = 10 * time.Second
)

// maxAttempts bounds how often the gateway decides again about a user
// whose record another gateway changed meanwhile; past it, the requests
// are answered 70500 (retry).
const maxAttempts = 8

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

// Close stops watching the state store and closes it if the gateway opened
// it (a state file).
func (g *Gateway) Close() error {
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return nil
	}
	g.closed = true
	if g.unwritten {
		g.log.Error("gateway state: changes could not be written before shutdown", "users", len(g.failed))
	}
	stop := g.stopWatch
	g.mu.Unlock()
	// Outside the lock: a watch callback may be waiting for it.
	if stop != nil {
		stop()
	}
	if g.ownStore {
		return g.st.Close()
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

// errContended is what Kick returns when the user's record kept changing
// under it (other gateways wrote it every time): nothing was changed. It
// is an errUnwritten for the admin API (a 500: try again).
var errContended error = contendedError{}

type contendedError struct{}

func (contendedError) Error() string {
	return "the user's record kept changing while it was being written (other gateways wrote it each time); nothing was changed, try again"
}

func (contendedError) Is(target error) bool { return target == errUnwritten }

// reqID names a device request being answered: its device and id.
type reqID struct{ user, instance, id string }

// reqs maps the requests being handled to the type of their answer.
type reqs map[reqID]string

// answers reports whether o is the answer to one of rs (not a push).
func (rs reqs) answers(o Outbound) bool {
	_, ok := rs[reqID{o.UserID, o.Instance, o.Msg.ID}]
	return ok && o.Msg.Type != mqtt.TypeKick && o.Msg.Type != mqtt.TypeUserSigExpire
}

// retryAnswer is the answer to a request whose change could not be saved.
func retryAnswer(user, instance, typ, id, session string) Outbound {
	return Outbound{UserID: user, Instance: instance, Msg: mqtt.Message{
		Type: typ, ID: id, Session: session, Code: codes.ServerInternal2,
		Desc: "the gateway could not save this change; retry with backoff (the same request id gets the answer once it is saved)"}}
}

// transact decides and saves; call with g.mu held. attempt runs events
// through the engine (only the users in only, or all when only is nil) and
// returns what to send, the requests it answers and the users whose
// refusals depended on their cached record (verify). Then every dirty
// user's record is written, each as one compare-and-set. A user whose
// write lost to another gateway, or whose verified record turned out
// stale, is read again and attempt runs again for that user alone, its
// earlier outcome (answers, pushes, counters) discarded: what is sent is
// what was decided on the record that was written. State is written before
// anyone is told, so a crash never leaves a device holding a session the
// store does not know. When a user's write fails, the answers to its
// requests become a retryable 70500 and its pushes wait for the next
// successful write.
func (g *Gateway) transact(pre []Outbound, attempt func(only map[string]bool) (out []Outbound, rs reqs, verify map[string]bool)) error {
	all := reqs{}
	final := pre
	var only map[string]bool
	var err error
	for n := 1; ; n++ {
		out, rs, verify := attempt(only)
		for r, typ := range rs {
			all[r] = typ
		}
		lost, werr := g.commitUsers()
		if werr != nil {
			err = werr
		}
		var check []string
		for u := range verify {
			if !lost[u] && !g.failed[u] {
				check = append(check, u)
			}
		}
		for _, u := range g.stale(check) {
			lost[u] = true
		}
		for _, o := range out {
			if !lost[o.UserID] {
				if o.Msg.Type == mqtt.TypeUserSigExpire {
					g.log.Info("usersig expired", "user", o.UserID, "instance", o.Instance, "session", o.Msg.Session)
				}
				final = append(final, o)
			}
		}
		// What was decided for the users whose record is written, or who
		// changed nothing, takes effect; a failed user's waits.
		for u := range g.e.pend {
			if !lost[u] && !g.failed[u] {
				g.e.settle(u, true)
			}
		}
		if len(lost) == 0 {
			break
		}
		if n == maxAttempts {
			err = errContended
			g.log.Warn("gateway state: users' records kept changing while being decided; answering 70500", "users", len(lost))
			for r, typ := range rs {
				if lost[r.user] {
					final = append(final, retryAnswer(r.user, r.instance, typ, r.id, ""))
				}
			}
			break
		}
		only = lost
	}
	g.deliver(final, all)
	if errors.Is(err, errContended) {
		return err
	}
	if err != nil {
		return errUnwritten
	}
	return nil
}

// commitUsers writes the dirty users' records, in one call to the store (a
// group commit where the store has transactions). It returns the users
// whose write lost to another writer, reloaded from the store, and the
// error of the writes that failed (those users stay dirty: failed).
func (g *Gateway) commitUsers() (lost map[string]bool, err error) {
	lost = map[string]bool{}
	if len(g.e.dirty.users) == 0 {
		return lost, nil
	}
	users := slices.Sorted(maps.Keys(g.e.dirty.users))
	ws := make([]RecordWrite, len(users))
	for i, u := range users {
		ws[i] = RecordWrite{User: u, Revision: g.revs[u], Record: g.e.record(u)}
	}
	ctx, cancel := context.WithTimeout(context.Background(), writeTimeout)
	defer cancel()
	res := g.st.Write(ctx, ws)
	wrote := false
	for i, r := range res {
		u := users[i]
		switch {
		case r.Err == nil:
			wrote = true
			g.stats.recordWrites.Add(1)
			delete(g.e.dirty.users, u)
			if ws[i].Record == nil {
				// Until the watch shows the deletion, older records of
				// the user it may still show are not applied.
				if base := g.revs[u]; g.stopWatch != nil && (base != 0 || r.Revision != 0) {
					g.gone[u] = max(base, r.Revision)
				}
				delete(g.revs, u)
			} else {
				g.revs[u] = r.Revision
				delete(g.gone, u)
			}
			g.e.settle(u, true)
			if g.failed[u] {
				delete(g.failed, u)
				g.releaseHeld(u)
			}
		case errors.Is(r.Err, ErrConflict):
			g.stats.conflicts.Add(1)
			lost[u] = true
			g.reload(ctx, u, ws[i].Revision)
		default:
			if err == nil {
				err = r.Err
			}
			g.failed[u] = true
		}
	}
	if wrote {
		g.stats.commits.Add(1)
	}
	if err != nil {
		if !g.unwritten {
			g.log.Error("writing gateway state failed; answering 70500 and retrying every second", "err", err, "users", len(g.failed))
		}
		g.stats.writeFails.Add(1)
		g.wakeTimers()
	}
	if g.unwritten && len(g.failed) == 0 {
		g.log.Info("gateway state written again")
	}
	g.unwritten = len(g.failed) > 0
	return lost, err
}

// reload replaces the cached record of user, whose write at revision lost,
// by a fresh read, forgetting what was decided on the old one. A read that
// still gives that revision means the write that won is not applied yet
// (a replicated bucket's leader answers the compare-and-set of a write in
// flight before it reads it): it is read again, a few times, a little
// later. When the read fails, the user is cached as having no record: a
// write decided on that loses again.
func (g *Gateway) reload(ctx context.Context, u string, lostAt uint64) {
	g.forget(u)
	sr, err := g.st.Get(ctx, u)
	for wait := time.Millisecond; err == nil && sr.Revision == lostAt && wait <= 64*time.Millisecond; wait *= 2 {
		time.Sleep(wait)
		sr, err = g.st.Get(ctx, u)
	}
	if err != nil {
		g.log.Warn("reading a user's record failed", "user", u, "err", err)
		g.e.setUser(u, nil)
		delete(g.revs, u)
		return
	}
	g.e.setUser(u, sr.Record)
	if sr.Revision == 0 {
		delete(g.revs, u)
	} else {
		g.revs[u] = sr.Revision
	}
}

// stale reads the records of users (at once) and returns those whose
// record in the store is newer than the cached one, reloaded.
func (g *Gateway) stale(users []string) []string {
	if len(users) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), writeTimeout)
	defer cancel()
	fresh := make([]StoredRecord, len(users))
	errs := make([]error, len(users))
	sem := make(chan struct{}, maxKVWriters)
	var wg sync.WaitGroup
	for i, u := range users {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			fresh[i], errs[i] = g.st.Get(ctx, u)
		})
	}
	wg.Wait()
	var out []string
	for i, u := range users {
		sr := fresh[i]
		if errs[i] != nil || sr.Revision == g.revs[u] {
			continue
		}
		g.forget(u)
		g.e.setUser(u, sr.Record)
		if sr.Revision == 0 {
			delete(g.revs, u)
		} else {
			g.revs[u] = sr.Revision
		}
		out = append(out, u)
	}
	return out
}

// forget drops what was decided for user and not yet written: its held
// pushes, answers and counters.
func (g *Gateway) forget(u string) {
	g.e.settle(u, false)
	delete(g.failed, u)
	g.held = slices.DeleteFunc(g.held, func(o Outbound) bool { return o.UserID == u })
}

// releaseHeld queues the pushes held for user, whose record is written.
func (g *Gateway) releaseHeld(u string) {
	g.held = slices.DeleteFunc(g.held, func(o Outbound) bool {
		if o.UserID == u {
			g.enqueue(o)
			return true
		}
		return false
	})
}

// deliver queues out: the answers of users whose record could not be
// written become 70500, their pushes are held.
func (g *Gateway) deliver(out []Outbound, rs reqs) {
	for _, o := range out {
		if !g.failed[o.UserID] {
			g.enqueue(o)
			continue
		}
		if rs.answers(o) {
			g.enqueue(retryAnswer(o.UserID, o.Instance, o.Msg.Type, o.Msg.ID, o.Msg.Session))
			continue
		}
		if o.Msg.Type != mqtt.TypeKick && o.Msg.Type != mqtt.TypeUserSigExpire {
			g.enqueue(o) // an error answer, which changed nothing
			continue
		}
		if len(g.held) >= maxHeld {
			g.stats.dropped(dropSendQueueFull)
			continue
		}
		g.held = append(g.held, o)
	}
	if n := g.e.NextExpire(); !n.IsZero() && (g.timerAt.IsZero() || n.Before(g.timerAt)) {
		g.wakeTimers()
	}
}

// applyChange applies a record another writer wrote (the store's watch):
// only a newer one than the cached, replacing what this gateway decided
// and could not write yet.
func (g *Gateway) applyChange(c Change) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return
	}
	known, cached := g.revs[c.User]
	if gr, ok := g.gone[c.User]; ok {
		if !cached {
			known = gr
		}
		if c.Revision >= gr {
			delete(g.gone, c.User)
		}
	}
	if c.Revision <= known {
		return
	}
	g.forget(c.User)
	g.e.setUser(c.User, c.Record)
	if c.Record == nil {
		delete(g.revs, c.User)
	} else {
		g.revs[c.User] = c.Revision
	}
	g.unwritten = len(g.failed) > 0
	g.stats.watched.Add(1)
	// Its sessions' expiries are this gateway's to watch too.
	if n := g.e.NextExpire(); !n.IsZero() && (g.timerAt.IsZero() || n.Before(g.timerAt)) {
		g.wakeTimers()
	}
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
// group commit: the changes of all of them are written in one call to the
// store (one transaction for bbolt), and only then do their answers and
// pushes go out. Under load the batch is whatever queued up during the
// previous write, so the writes per second stay bounded by the store while
// the logins per second grow. A user whose record another gateway changed
// meanwhile is read again and its messages decided again (transact).
func (g *Gateway) HandleMessages(batch []inbound) {
	g.mu.Lock()
	defer g.mu.Unlock()
	var pre []Outbound
	var items []upMsg
	for _, in := range batch {
		it, out, ok := g.decode(in.topic, in.payload)
		pre = append(pre, out...)
		if ok {
			items = append(items, it)
		}
	}
	if len(items) == 0 && len(pre) == 0 {
		return
	}
	g.transact(pre, func(only map[string]bool) ([]Outbound, reqs, map[string]bool) {
		var out []Outbound
		rs := reqs{}
		var verify map[string]bool
		for _, it := range items {
			if only != nil && !only[it.user] {
				continue
			}
			o, typ, isReq, check := g.handle(it)
			if isReq {
				rs[reqID{it.user, it.instance, it.m.ID}] = typ
			}
			if check {
				if verify == nil {
					verify = map[string]bool{}
				}
				verify[it.user] = true
			}
			out = append(out, o...)
		}
		return out, rs, verify
	})
}

// upMsg is a decoded device message.
type upMsg struct {
	user, instance string
	m              mqtt.Message
}

// decode checks one message's topic and payload; call with g.mu held. It
// returns what to answer when they are not a message for the engine.
func (g *Gateway) decode(topic string, payload []byte) (upMsg, []Outbound, bool) {
	user, instance, err := g.parseUp(topic)
	if err != nil {
		g.stats.dropped(dropBadTopic)
		g.log.Debug("dropped message", "topic", topic, "err", err)
		return upMsg{}, nil, false
	}
	if len(payload) == 0 {
		g.stats.dropped(dropEmpty)
		return upMsg{}, nil, false
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
		return upMsg{}, []Outbound{{UserID: user, Instance: instance, Msg: mqtt.Message{
			Type: mqtt.TypeError, ID: mqtt.PeekID(payload), Code: codes.InvalidParams, Desc: err.Error()}}}, false
	}
	return upMsg{user, instance, m}, nil, true
}

// handle runs one message through the engine; call with g.mu held. It
// returns what to send and, when the message is a request that gets an
// answer, the answer's type; check says that the outcome rests on the
// cached record alone and changed nothing (a refused resume, a logout or
// an offline that matched no session): with a shared store, the record is
// read to see whether the cache was behind.
func (g *Gateway) handle(it upMsg) (out []Outbound, typ string, isReq, check bool) {
	user, instance, m := it.user, it.instance, it.m
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
			check = o.Msg.Code != 0
		case mqtt.TypeKick:
			g.log.Info("kick", "user", o.UserID, "instance", o.Instance, "session", o.Msg.Session, "reason", o.Msg.Reason)
		}
		if o.UserID == user && o.Instance == instance && o.Msg.ID == m.ID && o.Msg.Type != mqtt.TypeKick {
			isReq, typ = true, o.Msg.Type
		}
	}
	// A logout or an offline that changed nothing may be about a session
	// the cache has not seen yet.
	check = (check || m.Type == mqtt.TypeOffline || m.Type == mqtt.TypeLogout) && !g.ownStore && !g.e.dirty.users[user]
	return out, typ, isReq, check
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
	var n int
	err := g.transact(nil, func(map[string]bool) ([]Outbound, reqs, map[string]bool) {
		var out []Outbound
		out, n = g.e.Kick(now, user)
		return out, nil, nil
	})
	g.log.Info("admin kick", "user", user, "sessions", n)
	if !errors.Is(err, errContended) && !g.failed[user] {
		err = nil // another user's write failed, not this one's
	}
	return n, time.Unix(now.Unix(), 0), err
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
// before) and returns when to run them next. Every gateway sharing a
// store runs them over the whole fleet: the one whose compare-and-set wins
// sends the notice, the others find the session ended on the fresh read.
func (g *Gateway) Tick() time.Time {
	g.mu.Lock()
	defer g.mu.Unlock()
	now := g.now()
	var next time.Time
	g.transact(nil, func(map[string]bool) ([]Outbound, reqs, map[string]bool) {
		var out []Outbound
		out, next = g.e.Expire(now)
		return out, nil, nil
	})
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
