package gateway

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"chatd/mqtt"
)

// NATSOptions say how the gateway reaches a NATS cluster. Devices connect
// to the cluster's MQTT listeners; the gateway speaks the NATS protocol to
// the same servers and account.
type NATSOptions struct {
	// URLs are the servers to try (nats://, tls://), in any order; the
	// client fails over between them and learns the rest of the cluster
	// from the servers. Ignored when Conn is set.
	URLs []string
	// Credentials: a user and password, a creds file (a user JWT and its
	// nkey seed), or an nkey seed file: at most one kind.
	User      string
	Password  string
	CredsFile string
	NkeyFile  string
	// TLS, when set, is used for every server (tls:// URLs need it or the
	// system's CAs).
	TLS *tls.Config
	// Queue is the queue group the gateways of a fleet share: each device
	// message goes to one of them (default DefaultNATSQueue).
	Queue string
	// Shards is the number of accounts the fleet's devices are spread
	// over (default 1; at most MaxNATSShards). Each account has MQTT
	// streams of its own, and nats-server's cost per QoS 1 message grows
	// with the subscriptions of its account. A user's devices are in
	// account NATSShard(user, Shards); the gateway connects to each, as
	// NATSShardUser(User, i) with Password (a user and password only),
	// and Conn (or the first connection) is shard 0's, which also holds
	// the state bucket.
	Shards int
	// Name is the connection's name in the servers' monitoring (default
	// "chatgw").
	Name string
	// Conn, when set, is an open connection (from DialNATS) that ServeNATS
	// uses and leaves open; otherwise ServeNATS dials and closes its own.
	Conn *nats.Conn
	// QueueSize, PerDeviceQueue, RateLimit and PublishTimeout are as in
	// BrokerOptions.
	QueueSize      int
	PerDeviceQueue int
	RateLimit      RateLimit
	PublishTimeout time.Duration
}

// DefaultNATSQueue is the queue group of the gateways when none is set.
const DefaultNATSQueue = "chatgw"

// MaxNATSShards bounds NATSOptions.Shards.
const MaxNATSShards = 64

// NATSShard is the account, 0 to shards-1, that holds user's devices when
// a fleet's devices are spread over shards accounts: the FNV-1a hash (32
// bits) of the UserID modulo shards. chatgw nats-accounts places the
// devices by it, and a gateway sends to a user's devices through its
// connection to that account.
func NATSShard(user string, shards int) int {
	if shards <= 1 {
		return 0
	}
	h := fnv.New32a()
	h.Write([]byte(user))
	return int(h.Sum32() % uint32(shards))
}

// NATSShardUser is the gateway's NATS user in shard i's account: user in
// shard 0, user-i in the others (user names are one namespace across a
// server's accounts).
func NATSShardUser(user string, i int) string {
	if i == 0 {
		return user
	}
	return user + "-" + strconv.Itoa(i)
}

// mqttPubHeader is the header nats-server's MQTT bridge reads on messages
// from NATS publishers: the QoS to deliver at (and, after it, the MQTT
// publish flags). With "1", the server delivers the core message only to
// QoS 0 subscriptions and leaves QoS 1 subscriptions to the copy stored
// under mqttMsgsPrefix, so each subscriber gets the message once.
const mqttPubHeader = "Nmqtt-Pub"

// mqttMsgsPrefix is where nats-server keeps the QoS 1 messages for MQTT
// subscriptions (its "$MQTT_msgs" stream): a message stored there under
// the subject of a device's down topic is delivered, and redelivered until
// acknowledged, to the QoS 1 subscription of that device's session,
// including a persistent session whose device is away for a while.
const mqttMsgsPrefix = "$MQTT.msgs."

// topicToSubject maps an MQTT topic of the layout (no empty level) to the
// subject nats-server gives it: levels become tokens, and a '.' inside a
// level becomes "//". A level that would be a NATS wildcard ("*", ">")
// or has characters no subject may hold cannot be confined and is refused.
func topicToSubject(topic string) (string, error) {
	levels := strings.Split(topic, "/")
	for i, l := range levels {
		switch {
		case l == "":
			return "", fmt.Errorf("topic %q has an empty level", topic)
		case l == "*" || l == ">":
			return "", fmt.Errorf("topic %q has the level %q, a wildcard on NATS", topic, l)
		case strings.ContainsAny(l, " \t\r\n\f\x7f\x00"):
			return "", fmt.Errorf("topic %q has white space or control characters", topic)
		}
		levels[i] = strings.ReplaceAll(l, ".", "//")
	}
	return strings.Join(levels, "."), nil
}

// NATSSubject is the subject nats-server's MQTT listener gives topic, a
// topic of the layout; an error when the topic cannot be confined on NATS
// (a level that is a wildcard token, an empty level, white space).
func NATSSubject(topic string) (string, error) { return topicToSubject(topic) }

// NATSUpSubject is the subject the gateways subscribe to on NATS: every
// device's up topic.
func NATSUpSubject(t mqtt.Topics) (string, error) { return natsUpSubject(t) }

// subjectToTopic is topicToSubject's inverse: it refuses what no topic of
// the layout maps to (empty levels, a '/' that is not part of "//",
// wildcard tokens).
func subjectToTopic(subject string) (string, error) {
	tokens := strings.Split(subject, ".")
	for i, tk := range tokens {
		if tk == "" || tk == "*" || tk == ">" {
			return "", fmt.Errorf("subject %q has the token %q", subject, tk)
		}
		l := strings.ReplaceAll(tk, "//", ".")
		if strings.Contains(l, "/") {
			return "", fmt.Errorf("subject %q: token %q is no topic level of the layout", subject, tk)
		}
		tokens[i] = l
	}
	return strings.Join(tokens, "/"), nil
}

// natsUpSubject is the subject the gateways subscribe to: every device's
// up topic.
func natsUpSubject(t mqtt.Topics) (string, error) {
	s, err := topicToSubject(strings.TrimSuffix(t.UpFilter(), "/+/+"))
	if err != nil {
		return "", fmt.Errorf("topic prefix %q on NATS: %w", t.Prefix, err)
	}
	return s + ".*.*", nil
}

// natsPublisher sends answers and pushes to a device's down topic, once as
// a core message (for QoS 0 subscriptions, whichever server the device is
// on) and once into the MQTT message stream (for QoS 1 subscriptions,
// persistent sessions included). The stream copy is a JetStream publish
// whose acknowledgement is awaited in the background: one the stream did
// not store (its leader being elected, a route not back yet after a
// partition) is published again, under the same message id so that the
// stream keeps it once, until it is stored or pubAttempts are spent.
// Publish itself never waits for the network beyond the client's stall
// bound (a full buffer is an error).
type natsPublisher struct {
	nc *nats.Conn
	js jetstream.JetStream
}

// pubAttempts bounds the publishes of one message into the MQTT stream;
// pubAttemptHeader counts them on the message.
const (
	pubAttempts      = 6
	pubAttemptHeader = "Chatgw-Attempt"
)

// newNATSPublisher makes the publisher; failed counts a message given up.
func newNATSPublisher(nc *nats.Conn, timeout time.Duration, log *slog.Logger, failed func()) (natsPublisher, error) {
	var js jetstream.JetStream
	retry := func(_ jetstream.JetStream, m *nats.Msg, err error) {
		n, _ := strconv.Atoi(m.Header.Get(pubAttemptHeader))
		if n+1 >= pubAttempts || nc.IsClosed() {
			failed()
			log.Warn("a message to a device was not stored by the MQTT stream; given up", "subject", m.Subject, "attempts", n+1, "err", err)
			return
		}
		m.Header.Set(pubAttemptHeader, strconv.Itoa(n+1))
		// Off the client's callback goroutine, after a pause that grows.
		time.AfterFunc(time.Duration(n+1)*250*time.Millisecond, func() {
			if _, err := js.PublishMsgAsync(m); err != nil {
				failed()
				log.Warn("a message to a device could not be published again", "subject", m.Subject, "err", err)
			}
		})
	}
	js, err := jetstream.New(nc,
		jetstream.WithPublishAsyncMaxPending(sendQueueSize),
		jetstream.WithPublishAsyncTimeout(timeout),
		jetstream.WithPublishAsyncErrHandler(retry))
	if err != nil {
		return natsPublisher{}, err
	}
	return natsPublisher{nc: nc, js: js}, nil
}

func (p natsPublisher) Publish(topic string, qos byte, payload []byte) error {
	subj, err := topicToSubject(topic)
	if err != nil {
		return err
	}
	h := nats.Header{}
	h.Set(mqttPubHeader, string('0'+rune(min(qos, 1))))
	if err := p.nc.PublishMsg(&nats.Msg{Subject: subj, Header: h, Data: payload}); err != nil {
		return err
	}
	if qos == 0 {
		return nil
	}
	sh := nats.Header{}
	sh.Set(mqttPubHeader, h.Get(mqttPubHeader))
	sh.Set(jetstream.MsgIDHeader, randomID())
	_, err = p.js.PublishMsgAsync(&nats.Msg{Subject: mqttMsgsPrefix + subj, Header: sh, Data: payload})
	return err
}

// shardedPublisher sends to a device through the connection to the
// account that holds it.
type shardedPublisher struct {
	pubs []natsPublisher
	down string // the down topics' prefix, up to the UserID
}

func (p shardedPublisher) Publish(topic string, qos byte, payload []byte) error {
	rest, ok := strings.CutPrefix(topic, p.down)
	user, _, ok2 := strings.Cut(rest, "/")
	if !ok || !ok2 || user == "" {
		return fmt.Errorf("%q is not a down topic", topic)
	}
	return p.pubs[NATSShard(user, len(p.pubs))].Publish(topic, qos, payload)
}

// reconnectDelay is the wait before the attempt-th pass over the servers:
// doubling from 250 ms to 10 s, with jitter.
func reconnectDelay(attempt int) time.Duration {
	d := 10 * time.Second
	if attempt < 6 {
		d = 250 * time.Millisecond << attempt
	}
	return d/2 + rand.N(d/2+1)
}

func (no *NATSOptions) defaults() {
	if no.Queue == "" {
		no.Queue = DefaultNATSQueue
	}
	if no.Name == "" {
		no.Name = "chatgw"
	}
	if no.Shards == 0 {
		no.Shards = 1
	}
	if no.QueueSize == 0 {
		no.QueueSize = 4096
	}
	if no.PerDeviceQueue == 0 {
		no.PerDeviceQueue = 8
	}
	if no.RateLimit == (RateLimit{}) {
		no.RateLimit = DefaultRateLimit
	}
	if no.PublishTimeout == 0 {
		no.PublishTimeout = 5 * time.Second
	}
}

// DialNATS opens the gateway's connection to the cluster. It returns at
// once, also when no server answers yet: the client keeps trying every
// server forever, with backoff, and reconnects the same way after a loss.
// Permanent mistakes (no URL, conflicting credentials, unreadable creds
// file) are errors.
func DialNATS(no NATSOptions) (*nats.Conn, error) {
	no.defaults()
	if len(no.URLs) == 0 {
		return nil, errors.New("no NATS server: pass --nats nats://host:4222[,nats://host2:4222...]")
	}
	kinds := 0
	for _, set := range []bool{no.User != "" || no.Password != "", no.CredsFile != "", no.NkeyFile != ""} {
		if set {
			kinds++
		}
	}
	if kinds > 1 {
		return nil, errors.New("NATS credentials: use one of a user and password, a creds file or an nkey seed file")
	}
	opts := []nats.Option{
		nats.Name(no.Name),
		nats.RetryOnFailedConnect(true),
		nats.MaxReconnects(-1),
		nats.CustomReconnectDelay(reconnectDelay),
		nats.Timeout(10 * time.Second),
		nats.PingInterval(10 * time.Second),
		nats.MaxPingsOutstanding(2),
		// A publish never waits longer than this for a slow socket.
		nats.FlusherTimeout(no.PublishTimeout),
		// What waits while reconnecting is bounded: past it, Publish fails
		// and the message is counted as a publish failure.
		nats.ReconnectBufSize(8 << 20),
		// A closed connection is restarted by Run's caller, never here.
		nats.NoCallbacksAfterClientClose(),
	}
	switch {
	case no.User != "":
		opts = append(opts, nats.UserInfo(no.User, no.Password))
	case no.Password != "":
		return nil, errors.New("NATS: a password without a user (--nats-user)")
	case no.CredsFile != "":
		opts = append(opts, nats.UserCredentials(no.CredsFile))
	case no.NkeyFile != "":
		o, err := nats.NkeyOptionFromSeed(no.NkeyFile)
		if err != nil {
			return nil, fmt.Errorf("NATS nkey seed file %s: %w", no.NkeyFile, err)
		}
		opts = append(opts, o)
	}
	if no.TLS != nil {
		opts = append(opts, nats.Secure(no.TLS))
	}
	nc, err := nats.Connect(strings.Join(no.URLs, ","), opts...)
	if err != nil {
		return nil, fmt.Errorf("connecting to NATS %s: %w", strings.Join(no.URLs, ","), err)
	}
	return nc, nil
}

// ServeNATS serves the devices of a NATS cluster until ctx ends: it
// subscribes to every device's up subject in the queue group no.Queue, so
// that each message is handled by exactly one gateway of the group, and
// publishes answers and pushes to the device's down topic (see
// natsPublisher), which reach the device whichever server it is connected
// to. Messages go through the same rate limit, per-device fair queue and
// group commit as on an MQTT broker.
//
// A core NATS subscription has no acknowledgements: what a gateway had
// queued when it died is lost, and the devices send their requests again
// (they resend until answered). Messages that do not map back to a topic
// of the layout are dropped and counted (bad_topic).
func (g *Gateway) ServeNATS(ctx context.Context, no NATSOptions) error {
	no.defaults()
	upSubject, err := natsUpSubject(g.topics)
	if err != nil {
		return err
	}
	if no.Shards < 1 || no.Shards > MaxNATSShards {
		return fmt.Errorf("%d device accounts (shards): use 1 to %d", no.Shards, MaxNATSShards)
	}
	if no.Shards > 1 && no.User == "" {
		return errors.New("devices spread over several accounts (nats_shards) need the gateway's user and password (nats_user, nats_password_file): its user in each account is derived from it")
	}
	nc := no.Conn
	if nc == nil {
		if nc, err = DialNATS(no); err != nil {
			return err
		}
		defer nc.Close()
	}
	conns := []*nats.Conn{nc}
	for i := 1; i < no.Shards; i++ {
		so := no
		so.User, so.Name = NATSShardUser(no.User, i), no.Name+"-"+strconv.Itoa(i)
		c, err := DialNATS(so)
		if err != nil {
			return err
		}
		defer c.Close()
		conns = append(conns, c)
	}
	// brokerUp is recomputed under upMu so that two connections' handlers
	// cannot store their views out of order.
	var upMu sync.Mutex
	allUp := func() bool {
		for _, c := range conns {
			if !c.IsConnected() {
				return false
			}
		}
		return true
	}
	setUp := func() {
		upMu.Lock()
		g.brokerUp.Store(allUp())
		upMu.Unlock()
	}
	q := newFairQueue[inbound](no.PerDeviceQueue, no.QueueSize)
	g.queue.Store(q)
	lim := newLimiter(no.RateLimit)
	var limMu sync.Mutex

	// A connection change wakes the readiness loop below.
	changed := make(chan struct{}, 1)
	poke := func() {
		select {
		case changed <- struct{}{}:
		default:
		}
	}
	// A refused subscription, or a connection the client gave up (the
	// servers refused its user), is permanent until the accounts are
	// fixed: ServeNATS returns it.
	fatalc := make(chan error, 1)
	fatal := func(err error) {
		select {
		case fatalc <- err:
		default:
		}
	}
	subs := make([]*nats.Subscription, len(conns))
	// Whatever happens below, the caller's connection is left without this
	// gateway's subscriptions and handlers.
	defer func() {
		for _, sub := range subs {
			if sub != nil {
				sub.Unsubscribe()
			}
		}
		if no.Conn != nil {
			nc.SetDisconnectErrHandler(nil)
			nc.SetReconnectHandler(nil)
			nc.SetClosedHandler(nil)
			nc.SetErrorHandler(nil)
		}
	}()
	var wrongShardLogged atomic.Int64
	pubs := make([]natsPublisher, len(conns))
	for i, c := range conns {
		shard := []any{}
		if len(conns) > 1 {
			shard = []any{"shard", i}
		}
		c.SetDisconnectErrHandler(func(_ *nats.Conn, err error) {
			setUp()
			g.log.Warn("lost the NATS connection; reconnecting", append(shard, "err", err)...)
			poke()
		})
		c.SetReconnectHandler(func(c *nats.Conn) {
			setUp()
			g.log.Info("reconnected to NATS", append(shard, "server", c.ConnectedUrlRedacted())...)
			poke()
		})
		c.SetClosedHandler(func(c *nats.Conn) {
			setUp()
			poke()
			if ctx.Err() == nil {
				// nats.go gives up only on a refusal it got twice in a
				// row (an authorization violation): never on an outage.
				fatal(fmt.Errorf("the NATS client gave up its connection%s: %v (check the gateway's user and password, and that the accounts were written with chatgw nats-accounts --shards %d)", shardNote(no, i), c.LastError(), no.Shards))
			}
		})
		c.SetErrorHandler(func(_ *nats.Conn, s *nats.Subscription, err error) {
			subj := ""
			if s != nil {
				subj = s.Subject
			}
			g.log.Error("NATS error", append(shard, "subject", subj, "err", err)...)
			if refusesSub(err, upSubject) {
				fatal(fmt.Errorf("NATS refused the gateway's subscription to %s in queue group %s%s: %w (give the gateway's user these permissions: chatgw nats-accounts writes them)", upSubject, no.Queue, shardNote(no, i), err))
			}
		})
		handler := func(m *nats.Msg) {
			topic, err := subjectToTopic(m.Subject)
			if err != nil {
				g.stats.dropped(dropBadTopic)
				g.log.Debug("dropped message", "subject", m.Subject, "err", err)
				return
			}
			user, instance, err := g.parseUp(topic)
			if err != nil {
				g.stats.dropped(dropBadTopic)
				g.log.Debug("dropped message", "topic", topic, "err", err)
				return
			}
			if want := NATSShard(user, len(conns)); want != i {
				// Its answers would go to another account: the accounts
				// were written for another number of shards.
				g.stats.dropped(dropWrongShard)
				now, last := time.Now().UnixNano(), wrongShardLogged.Load()
				if now-last > int64(10*time.Second) && wrongShardLogged.CompareAndSwap(last, now) {
					g.log.Error("a device's message came through another account than its UserID's shard: write the accounts with chatgw nats-accounts --shards N and serve with the same nats_shards",
						"user", user, "account_shard", i, "shard", want, "shards", len(conns))
				}
				return
			}
			key := instKey(user, instance)
			limMu.Lock()
			ok := lim.allow(key, time.Now())
			limMu.Unlock()
			if !ok {
				g.stats.dropped(dropRateLimited)
				g.stats.throttled.With("gateway").Add(1)
				return
			}
			g.enqueueInbound(q, key, inbound{topic: topic, payload: m.Data})
		}
		sub, err := c.QueueSubscribe(upSubject, no.Queue, handler)
		if err != nil {
			return fmt.Errorf("subscribing to %s in queue group %s: %w", upSubject, no.Queue, err)
		}
		// The fair queue bounds what waits; this only keeps a stalled
		// gateway from holding unbounded memory in the client.
		sub.SetPendingLimits(4*no.QueueSize, max(64<<20/len(conns), 8<<20))
		subs[i] = sub
		if pubs[i], err = newNATSPublisher(c, no.PublishTimeout, g.log, func() { g.stats.publishFails.Add(1) }); err != nil {
			return fmt.Errorf("JetStream on NATS: %w", err)
		}
	}
	if len(pubs) == 1 {
		g.SetPublisher(pubs[0])
	} else {
		g.SetPublisher(shardedPublisher{pubs: pubs, down: strings.TrimSuffix(g.topics.Down("u", "i"), "u/i")})
	}
	setUp()
	if no.Shards > 1 {
		go g.probeExtraShard(ctx, no, nc)
	}

	timersDone := make(chan error, 1)
	senderDone := make(chan struct{})
	readyDone := make(chan struct{})
	tctx, cancelTimers := context.WithCancel(ctx)
	go func() { timersDone <- g.RunTimers(tctx) }()
	go func() { g.runSender(tctx); close(senderDone) }()
	go func() {
		defer close(readyDone)
		for _, c := range conns {
			if !g.awaitNATSSubscription(tctx, c, upSubject, setUp, changed) {
				return
			}
		}
		g.log.Info("connected to NATS", "server", nc.ConnectedUrlRedacted(), "subject", upSubject, "queue", no.Queue, "accounts", len(conns))
		g.subscribedOnce.Do(func() {
			g.log.Info("gateway ready: subscribed to the device topics", "filter", g.topics.UpFilter(), "subject", upSubject, "queue", no.Queue)
			close(g.subscribed)
		})
	}()
	defer func() {
		cancelTimers()
		<-timersDone
		<-senderDone
		<-readyDone
		for i, sub := range subs {
			sub.Unsubscribe()
			subs[i] = nil
		}
		// What was decided goes out before the connections are left.
		g.sendQueued()
		for _, c := range conns {
			c.FlushTimeout(2 * time.Second)
		}
		g.brokerUp.Store(false)
		g.SetPublisher(nil)
	}()
	qctx, stop := context.WithCancel(ctx)
	defer stop()
	var failed error
	watchDone := make(chan struct{})
	go func() {
		defer close(watchDone)
		select {
		case failed = <-fatalc:
			stop()
		case <-qctx.Done():
		}
	}()
	for g.handleQueued(qctx, q) {
	}
	stop()
	<-watchDone
	if failed == nil {
		g.drainNATS(subs, q)
	}
	return failed
}

// probeExtraShard logs an error when the servers know a gateway user one
// past the last shard: the accounts were written for more shards than
// no.Shards, and the devices of the accounts beyond it are served by no
// gateway. A refusal (the expected answer) or no answer says nothing.
func (g *Gateway) probeExtraShard(ctx context.Context, no NATSOptions, nc *nats.Conn) {
	user := NATSShardUser(no.User, no.Shards)
	urls := no.URLs
	if len(urls) == 0 {
		urls = nc.Servers()
	}
	opts := []nats.Option{nats.UserInfo(user, no.Password), nats.NoReconnect(), nats.Timeout(5 * time.Second), nats.Name(no.Name + "-probe")}
	if no.TLS != nil {
		opts = append(opts, nats.Secure(no.TLS))
	}
	pc, err := nats.Connect(strings.Join(urls, ","), opts...)
	if err != nil {
		return
	}
	pc.Close()
	if ctx.Err() == nil {
		g.log.Error("the NATS servers know the gateway user of a shard beyond nats_shards: the accounts were written for more shards, and the devices of the accounts from this one on get no answer; serve with the --shards the accounts were written with",
			"user", user, "shards", no.Shards)
	}
}

// drainTimeout bounds the handling of what is queued at shutdown.
const drainTimeout = 5 * time.Second

// drainNATS leaves the queue group at shutdown so that the other gateways
// get the devices' next messages, and handles what this gateway had
// already received instead of dropping it (its devices would have to send
// it again); the deferred end of ServeNATS then sends the answers.
func (g *Gateway) drainNATS(subs []*nats.Subscription, q *fairQueue[inbound]) {
	deadline := time.Now().Add(drainTimeout)
	for _, sub := range subs {
		sub.Drain()
	}
	for _, sub := range subs {
		for sub.IsDraining() && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
	}
	n := 0
	for time.Now().Before(deadline) {
		var batch []inbound
		for len(batch) < maxBatch {
			m, ok := q.tryPop()
			if !ok {
				break
			}
			batch = append(batch, m)
		}
		if len(batch) == 0 {
			break
		}
		g.HandleMessages(batch)
		n += len(batch)
	}
	if n > 0 {
		g.log.Info("left the queue group; handled the messages already received", "messages", n)
	}
}

// refusesSub reports whether err is the server refusing a subscription to
// subject.
func refusesSub(err error, subject string) bool {
	return errors.Is(err, nats.ErrPermissionViolation) && strings.Contains(err.Error(), "Subscription to \""+subject+"\"")
}

// awaitNATSSubscription waits until the server has confirmed nc's
// subscriptions (a flush round trip after them while connected), trying
// again at every connection change and every second; false when ctx ended
// the connection was closed, or the server refused the subscription to
// subject. setUp sets whether every connection of the gateway is up.
func (g *Gateway) awaitNATSSubscription(ctx context.Context, nc *nats.Conn, subject string, setUp func(), changed <-chan struct{}) bool {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		if nc.IsClosed() {
			return false // ServeNATS has the closed handler's error
		}
		if nc.IsConnected() {
			setUp()
			fctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			err := nc.FlushWithContext(fctx)
			cancel()
			if err == nil {
				// The server answers a refused SUB with an error before
				// the flush's PONG, and the client records it first.
				return !refusesSub(nc.LastError(), subject)
			}
			if ctx.Err() == nil {
				g.log.Warn("NATS subscription not confirmed yet; retrying", "err", err)
			}
		}
		select {
		case <-ctx.Done():
			return false
		case <-changed:
		case <-t.C:
		}
	}
}

// shardNote names shard i's account in an error, when there are several.
func shardNote(no NATSOptions, i int) string {
	if no.Shards <= 1 {
		return ""
	}
	return fmt.Sprintf(" (device account %d of %d, user %s)", i, no.Shards, NATSShardUser(no.User, i))
}
