package gateway

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/url"
	"strings"
	"sync"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"chatd/mqtt"
)

// BrokerOptions say how the gateway reaches its broker.
type BrokerOptions struct {
	URL string // tcp://, ssl://, ws:// ...; ignored when Dial is set
	// ClientID is the gateway's MQTT client id. Whoever knows it can
	// connect with it and push the gateway off a broker that does not tie
	// client ids to accounts (Mosquitto), so it must not be guessable.
	// Empty: one made at random and kept in the state file, or a fresh
	// random one without a state file (see ServeConfig).
	ClientID string
	Username string
	Password string
	TLS      *tls.Config
	// Dial, when set, opens the connection itself (the embedded broker's
	// in-process pipe).
	Dial func(ctx context.Context) (net.Conn, error)
	// QueueSize bounds the messages waiting for the gateway (default 4096);
	// PerDeviceQueue bounds one device's share of them (default 8). Past
	// either, new ones are dropped and counted rather than blocking the
	// MQTT client.
	QueueSize      int
	PerDeviceQueue int
	// RateLimit is the per-device rate at the gateway, checked before the
	// queue (default DefaultRateLimit; Rate < 0 turns it off).
	RateLimit RateLimit
	// PublishTimeout bounds one publish to the broker (default 5 s).
	PublishTimeout time.Duration
	// FloodBan, if set, disables the broker account of a device that
	// floods, through Mosquitto's dynamic-security plugin.
	FloodBan *FloodBan
}

type pahoPublisher struct{ c paho.Client }

func (p pahoPublisher) Publish(topic string, qos byte, payload []byte) error {
	// Bounded by the client's WriteTimeout. Do not wait for the
	// acknowledgement: an immediate failure (not connected) is reported.
	t := p.c.Publish(topic, qos, false, payload)
	select {
	case <-t.Done():
		return t.Error()
	default:
		return nil
	}
}

// inbound is a device message waiting for the gateway.
type inbound struct {
	topic   string
	payload []byte
	ack     func()
}

// Serve connects to the broker, subscribes to every device's up topic and
// processes messages until ctx ends. It reconnects by itself; the
// subscription is renewed on every connect.
//
// Messages reach the engine in the order each device sent them, one device
// after the other (round robin); each is acknowledged to the broker only
// once it is handled, so a broker that keeps the gateway's session
// (Mosquitto) delivers again what a crashed gateway had not handled.
func (g *Gateway) Serve(ctx context.Context, bo BrokerOptions) error {
	if bo.ClientID == "" {
		bo.ClientID = g.clientID
	}
	if bo.QueueSize == 0 {
		bo.QueueSize = 4096
	}
	if bo.PerDeviceQueue == 0 {
		bo.PerDeviceQueue = 8
	}
	if bo.RateLimit == (RateLimit{}) {
		bo.RateLimit = DefaultRateLimit
	}
	if bo.PublishTimeout == 0 {
		bo.PublishTimeout = 5 * time.Second
	}
	q := newFairQueue[inbound](bo.PerDeviceQueue, bo.QueueSize)
	g.queue.Store(q)
	lim := newLimiter(bo.RateLimit)
	var limMu sync.Mutex
	var ban *banner
	if bo.FloodBan != nil {
		ban = newBanner(*bo.FloodBan, g.log, g.stats)
	}

	o := paho.NewClientOptions()
	o.SetClientID(bo.ClientID)
	o.SetUsername(bo.Username)
	o.SetPassword(bo.Password)
	o.SetTLSConfig(bo.TLS)
	o.SetKeepAlive(30 * time.Second)
	o.SetPingTimeout(10 * time.Second)
	o.SetConnectTimeout(10 * time.Second)
	o.SetWriteTimeout(bo.PublishTimeout)
	o.SetAutoReconnect(true)
	o.SetConnectRetry(true)
	o.SetConnectRetryInterval(time.Second)
	o.SetMaxReconnectInterval(10 * time.Second)
	// A persistent session: on a broker that keeps sessions (Mosquitto), the
	// requests devices send while the gateway restarts wait for it.
	o.SetCleanSession(false)
	// In order, and acknowledged by hand once handled. The handler never
	// blocks: it only queues.
	o.SetOrderMatters(true)
	o.SetAutoAckDisabled(true)
	if bo.Dial != nil {
		o.AddBroker("tcp://embedded")
		o.SetCustomOpenConnectionFn(func(*url.URL, paho.ClientOptions) (net.Conn, error) {
			dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			return bo.Dial(dctx)
		})
	} else {
		if bo.URL == "" {
			return errors.New("no broker: pass --broker URL or --embedded-broker ADDR")
		}
		o.AddBroker(bo.URL)
	}
	handler := func(c paho.Client, m paho.Message) {
		if ban != nil && m.Topic() == dynsecResponse {
			ban.handle(c, m)
			return
		}
		if m.Retained() {
			// A retained message is an old one replayed by the broker at
			// (re)subscription: carrying it out again would repeat it.
			g.stats.dropped(dropRetained)
			m.Ack()
			return
		}
		user, instance, err := g.parseUp(m.Topic())
		if err != nil {
			g.stats.dropped(dropBadTopic)
			m.Ack()
			return
		}
		key := instKey(user, instance)
		limMu.Lock()
		ok := lim.allow(key, time.Now())
		limMu.Unlock()
		if !ok {
			g.stats.dropped(dropRateLimited)
			g.stats.throttled.With("gateway").Add(1)
			if ban != nil {
				ban.dropped(user, time.Now())
			}
			m.Ack()
			return
		}
		g.enqueueInbound(q, key, inbound{topic: m.Topic(), payload: m.Payload(), ack: m.Ack})
	}
	// A persistent session's queued messages arrive right after CONNACK,
	// before the subscription below has added its route: without a default
	// handler paho would drop them (a goodbye sent while the gateway was
	// down, a login waiting for it).
	o.SetDefaultPublishHandler(handler)
	filter := g.topics.UpFilter()
	o.SetOnConnectHandler(func(c paho.Client) {
		g.brokerUp.Store(true)
		g.log.Info("connected to broker", "subscribing", filter)
		// This handler runs in its own goroutine: retry until subscribed or
		// the connection is gone (the next connect runs it again).
		for c.IsConnectionOpen() {
			t := c.Subscribe(filter, mqtt.QoSRequest, handler)
			if t.WaitTimeout(10*time.Second) && t.Error() == nil {
				g.subscribedOnce.Do(func() {
					g.log.Info("gateway ready: subscribed to the device topics", "filter", filter)
					close(g.subscribed)
				})
				if ban != nil {
					ban.connected(c)
				}
				return
			}
			g.log.Error("subscribing failed; retrying", "filter", filter, "err", t.Error())
			time.Sleep(time.Second)
		}
	})
	o.SetConnectionLostHandler(func(_ paho.Client, err error) {
		g.brokerUp.Store(false)
		g.log.Warn("lost the broker connection; reconnecting", "err", err)
	})
	c := paho.NewClient(o)
	g.SetPublisher(pahoPublisher{c})
	t := c.Connect()
	// With ConnectRetry the token completes only once connected; don't wait.
	go func() {
		<-t.Done()
		if err := t.Error(); err != nil {
			g.log.Error("connecting to broker failed", "err", err)
		}
	}()
	timersDone := make(chan error, 1)
	senderDone := make(chan struct{})
	tctx, cancelTimers := context.WithCancel(ctx)
	go func() { timersDone <- g.RunTimers(tctx) }()
	go func() { g.runSender(tctx); close(senderDone) }()
	banDone := make(chan struct{})
	go func() {
		defer close(banDone)
		if ban == nil {
			return
		}
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-tctx.Done():
				return
			case <-tick.C:
				ban.tick(time.Now())
			}
		}
	}()
	defer func() {
		cancelTimers()
		<-timersDone
		<-senderDone
		<-banDone
		c.Disconnect(250)
		g.brokerUp.Store(false)
		g.SetPublisher(nil)
	}()
	for g.handleQueued(ctx, q) {
	}
	return nil
}

// enqueueInbound queues a device message for the gateway without
// blocking. When the device's own share is full the message is dropped
// (queue_full); when the whole queue is full the gateway is saturated: a
// request is answered at once with the retryable 70169 and a
// retry_after_ms from the pacer (busy), so the device neither waits for a
// timeout nor comes back with everyone else.
func (g *Gateway) enqueueInbound(q *fairQueue[inbound], key string, in inbound) {
	switch q.offer(key, in) {
	case pushed:
		return
	case shareFull:
		g.stats.dropped(dropQueueFull)
	case queueFull:
		g.answerBusy(key, in.payload, q.len())
	}
	if in.ack != nil {
		in.ack()
	}
}

// answerBusy refuses a device message the gateway has no room for: a
// request is answered 70169 with the pacer's retry_after_ms, and not
// carried out.
func (g *Gateway) answerBusy(key string, payload []byte, queued int) {
	g.stats.dropped(dropBusy)
	user, instance, _ := strings.Cut(key, "/")
	if r, ok := busyAnswer(payload, g.pacer.retryAfter(g.now(), queued)); ok {
		switch r.Type {
		case mqtt.TypeLoginResult:
			g.stats.login(r.Code)
		case mqtt.TypeResumeResult:
			g.stats.resume(r.Code)
		}
		g.enqueue(Outbound{UserID: user, Instance: instance, Msg: r})
	}
}

// brokerDropped answers a device message the embedded broker dropped on
// its way to the gateway (see EmbeddedOptions.Busy).
func (g *Gateway) brokerDropped(topic string, payload []byte) {
	user, instance, err := g.parseUp(topic)
	if err != nil {
		g.stats.dropped(dropBadTopic)
		return
	}
	queued := 0
	if q := g.queue.Load(); q != nil {
		queued = q.len()
	}
	g.answerBusy(instKey(user, instance), payload, max(queued, maxPendingToGateway))
}

// maxBatch bounds the device messages handled in one group commit.
const maxBatch = 256

// handleQueued waits for the next device message, takes whatever else is
// queued behind it (up to maxBatch), handles them as one group commit and
// acknowledges them to the broker. It reports false when ctx ended.
func (g *Gateway) handleQueued(ctx context.Context, q *fairQueue[inbound]) bool {
	m, ok := q.pop(ctx)
	if !ok {
		return false
	}
	batch := []inbound{m}
	for len(batch) < maxBatch {
		m, ok := q.tryPop()
		if !ok {
			break
		}
		batch = append(batch, m)
	}
	start := time.Now()
	g.HandleMessages(batch)
	defer func() { g.pacer.observe(len(batch), time.Since(start)) }()
	for _, m := range batch {
		if m.ack != nil {
			m.ack()
		}
	}
	return true
}
