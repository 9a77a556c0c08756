package mqtt

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"
)

// CONNACK return codes of MQTT 3.1.1 that refuse a connection.
const (
	RefusedBadProtocolVersion    = 1
	RefusedIdentifierRejected    = 2
	RefusedServerUnavailable     = 3
	RefusedBadUsernameOrPassword = 4
	RefusedNotAuthorized         = 5
)

// RefusalCode reports the CONNACK return code when err is the broker's
// refusal of a connection (paho's typed errors), and false for anything
// else (a network failure, a timeout).
func RefusalCode(err error) (byte, bool) {
	for rc := byte(RefusedBadProtocolVersion); rc <= RefusedNotAuthorized; rc++ {
		if errors.Is(err, packets.ConnErrors[rc]) {
			return rc, true
		}
	}
	return 0, false
}

// DialOptions say how a device connects.
type DialOptions struct {
	// Brokers are tried in order: tcp://host:port, ssl://host:port,
	// unix:///path (paho's schemes).
	Brokers  []string
	Topics   Topics
	UserID   string
	Instance string // the MQTT client id
	// Username and Password are the broker credentials. When Username is
	// empty the UserID is used, and when Password is empty too, the
	// UserSig (the embedded broker's scheme).
	Username string
	Password string
	UserSig  string
	TLS      *tls.Config
	// KeepAlive (default 30 s) bounds how long a dead connection goes
	// unnoticed: the broker publishes the presence Will 1.5 keepalives
	// after the device went silent.
	KeepAlive      time.Duration
	ConnectTimeout time.Duration // default 10 s
	// ResendInterval (default 3 s): a request with no answer is sent again
	// with the same id this often, until the caller's context ends. The
	// gateway answers a repeated id with its earlier answer, so nothing
	// happens twice; a gateway that was down when the request was sent
	// (and lost it with its session) still answers promptly.
	ResendInterval time.Duration
}

// Conn is one MQTT connection of a device: no automatic reconnect (the
// daemon owns that policy, with jitter), and never reused after it was lost
// or closed.
type Conn struct {
	c        paho.Client
	topics   Topics
	user     string
	instance string

	mu      sync.Mutex
	pending map[string]chan Message
	pushes  chan Message
	lost    chan struct{}
	lostErr error
	once    sync.Once
	seq     atomic.Uint64
	idBase  string
	connID  string // names this connection in the Will, the goodbye and requests
	resend  time.Duration
	netMu   sync.Mutex
	netConn net.Conn // the network connection under paho, for Abort
}

// ErrConnLost is returned by Request when the connection is gone.
var ErrConnLost = errors.New("connection to the broker lost")

// Dial connects, subscribes to the device's down topic and sets its Will.
func Dial(ctx context.Context, o DialOptions) (*Conn, error) {
	if len(o.Brokers) == 0 {
		return nil, errors.New("no broker address configured")
	}
	if err := ValidateUserID(o.UserID); err != nil {
		return nil, err
	}
	if err := ValidateInstanceID(o.Instance); err != nil {
		return nil, err
	}
	if o.KeepAlive == 0 {
		o.KeepAlive = 30 * time.Second
	}
	if o.ConnectTimeout == 0 {
		o.ConnectTimeout = 10 * time.Second
	}
	if o.ResendInterval == 0 {
		o.ResendInterval = 3 * time.Second
	}
	b := make([]byte, 4)
	rand.Read(b)
	c := &Conn{
		topics:   o.Topics,
		user:     o.UserID,
		instance: o.Instance,
		pending:  map[string]chan Message{},
		pushes:   make(chan Message, 64),
		lost:     make(chan struct{}),
		idBase:   hex.EncodeToString(b),
		resend:   o.ResendInterval,
	}
	cb := make([]byte, 8)
	rand.Read(cb)
	c.connID = "c" + hex.EncodeToString(cb)
	po := paho.NewClientOptions()
	for _, u := range o.Brokers {
		po.AddBroker(u)
	}
	po.SetClientID(o.Instance)
	user, pass := o.Username, o.Password
	if user == "" {
		user = o.UserID
		if pass == "" {
			pass = o.UserSig
		}
	}
	po.SetUsername(user)
	po.SetPassword(pass)
	po.SetTLSConfig(o.TLS)
	po.SetCleanSession(true)
	po.SetAutoReconnect(false)
	po.SetConnectRetry(false)
	po.SetKeepAlive(o.KeepAlive)
	// A dead link is noticed within 1.5 keepalives: paho sends a ping once
	// nothing was received for a keepalive and checks every quarter
	// keepalive (every 5 s above 10 s); a ping timeout shorter than that
	// check interval declares the link dead at the next check.
	po.SetPingTimeout(pingTimeout(o.KeepAlive))
	po.SetConnectTimeout(o.ConnectTimeout)
	po.SetWriteTimeout(10 * time.Second)
	// Messages reach the owner in the order the broker sent them (a login
	// answer before the kick that followed it); the handler never blocks.
	po.SetOrderMatters(true)
	po.SetCustomOpenConnectionFn(func(uri *url.URL, opts paho.ClientOptions) (net.Conn, error) {
		nc, err := openConnection(uri, opts)
		if err == nil {
			c.netMu.Lock()
			c.netConn = nc
			c.netMu.Unlock()
		}
		return nc, err
	})
	// The Will names this connection, so that the gateway ignores it when
	// it comes after a newer connection's login (per-connection presence).
	po.SetBinaryWill(o.Topics.Up(o.UserID, o.Instance), Encode(Message{Type: TypeOffline, Conn: c.connID}), QoSWill, false)
	po.SetConnectionLostHandler(func(_ paho.Client, err error) { c.markLost(err) })
	c.c = paho.NewClient(po)

	t := c.c.Connect()
	if err := wait(ctx, t, o.ConnectTimeout+time.Second); err != nil {
		c.c.Disconnect(0)
		return nil, fmt.Errorf("connecting to %s: %w", strings.Join(o.Brokers, ", "), err)
	}
	t = c.c.Subscribe(o.Topics.Down(o.UserID, o.Instance), QoSReply, c.onMessage)
	// Longer than a NATS node waits for JetStream to make the subscription's
	// consumer before it gives up (mqtt.js_api_timeout, 15 s in build/nats):
	// giving up first would leave the node making a consumer for nobody.
	if err := wait(ctx, t, subscribeTimeout); err != nil {
		c.c.Disconnect(0)
		return nil, fmt.Errorf("subscribing to %s: %w", o.Topics.Down(o.UserID, o.Instance), err)
	}
	if st, ok := t.(*paho.SubscribeToken); ok {
		for _, q := range st.Result() {
			if q == 0x80 {
				c.c.Disconnect(0)
				return nil, fmt.Errorf("the broker refused the subscription to %s: check the broker ACL (build/mosquitto/acl) and that the broker username is the UserID and the client id the instance id; on NATS, the device account's permissions and jetstream.limits.default_max_consumers (build/nats)", o.Topics.Down(o.UserID, o.Instance))
			}
		}
	}
	return c, nil
}

// wait waits for a paho token without ever hanging: bounded by ctx and d.
// subscribeTimeout bounds the wait for the SUBACK of the down topic.
const subscribeTimeout = 20 * time.Second

func wait(ctx context.Context, t paho.Token, d time.Duration) error {
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-t.Done():
		return t.Error()
	case <-ctx.Done():
		return ctx.Err()
	case <-timer.C:
		return errors.New("timed out")
	}
}

func (c *Conn) markLost(err error) {
	c.once.Do(func() {
		c.mu.Lock()
		if err == nil {
			err = ErrConnLost
		}
		c.lostErr = err
		c.mu.Unlock()
		close(c.lost)
	})
}

// onMessage runs on paho's goroutine: it never blocks.
func (c *Conn) onMessage(_ paho.Client, pm paho.Message) {
	m, err := Decode(pm.Payload())
	if err != nil {
		return
	}
	if m.ID != "" {
		c.mu.Lock()
		ch, ok := c.pending[m.ID]
		if ok {
			delete(c.pending, m.ID)
		}
		c.mu.Unlock()
		if ok {
			ch <- m // buffered, one reply per request
			return
		}
		if m.Type != TypeError {
			return // a late or duplicate reply
		}
	}
	select {
	case c.pushes <- m:
	default:
		// 64 unread pushes: the owner is wedged; dropping is better than
		// blocking the MQTT client.
	}
}

// Pushes delivers messages that are not replies: kick, usersig_expired.
func (c *Conn) Pushes() <-chan Message { return c.pushes }

// Lost is closed when the connection is gone.
func (c *Conn) Lost() <-chan struct{} { return c.lost }

// Err says why the connection was lost.
func (c *Conn) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lostErr
}

// Request sends m (setting its ID when empty) and waits for the reply with
// the same ID, the context, or the loss of the connection.
func (c *Conn) Request(ctx context.Context, m Message) (Message, error) {
	if m.ID == "" {
		m.ID = fmt.Sprintf("%s-%d", c.idBase, c.seq.Add(1))
	}
	if m.Conn == "" {
		m.Conn = c.connID
	}
	ch := make(chan Message, 1)
	c.mu.Lock()
	c.pending[m.ID] = ch
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.pending, m.ID)
		c.mu.Unlock()
	}()
	if err := c.publish(ctx, m); err != nil {
		return Message{}, err
	}
	resend := time.NewTicker(c.resend)
	defer resend.Stop()
	for {
		select {
		case r := <-ch:
			return r, nil
		case <-ctx.Done():
			return Message{}, ctx.Err()
		case <-c.lost:
			return Message{}, fmt.Errorf("%w: %v", ErrConnLost, c.Err())
		case <-resend.C:
			if err := c.publish(ctx, m); err != nil {
				return Message{}, err
			}
		}
	}
}

func (c *Conn) publish(ctx context.Context, m Message) error {
	t := c.c.Publish(c.topics.Up(c.user, c.instance), QoSRequest, false, Encode(m))
	select {
	case <-t.Done():
		return t.Error()
	case <-ctx.Done():
		return ctx.Err()
	case <-c.lost:
		return fmt.Errorf("%w: %v", ErrConnLost, c.Err())
	}
}

// Abort cuts the network connection without an MQTT DISCONNECT, so that
// the broker publishes the device's Will (a clean disconnect discards it).
func (c *Conn) Abort() {
	c.netMu.Lock()
	nc := c.netConn
	c.netMu.Unlock()
	if nc != nil {
		nc.Close()
	}
	c.c.Disconnect(0)
	c.markLost(errors.New("aborted"))
}

// pingTimeout is the PINGRESP timeout for a keepalive: a fifth of it
// (under paho's check interval), at least 500 ms and at most 4 s.
func pingTimeout(keepAlive time.Duration) time.Duration {
	return min(max(keepAlive/5, 500*time.Millisecond), 4*time.Second)
}

// Close ends the connection. With goodbye, it first tells the gateway the
// device is going offline (a clean disconnect sends no Will).
//
// A goodbye that the broker did not acknowledge in time is replaced by the
// Will (the connection is cut instead of closed), so that the gateway
// learns the device went away either way.
func (c *Conn) Close(goodbye bool) {
	if goodbye && c.c.IsConnectionOpen() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		err := c.publish(ctx, Message{Type: TypeOffline, Conn: c.connID})
		cancel()
		if err != nil {
			c.Abort()
			return
		}
	}
	c.c.Disconnect(250)
	c.markLost(errors.New("closed"))
}

// openConnection opens the network connection for paho (tcp, ssl, ws, wss
// and unix, the schemes chatd's config allows), so that Abort can cut it.
func openConnection(uri *url.URL, opts paho.ClientOptions) (net.Conn, error) {
	dialer := &net.Dialer{Timeout: opts.ConnectTimeout}
	switch uri.Scheme {
	case "mqtt", "tcp":
		return dialer.Dial("tcp", uri.Host)
	case "unix":
		path := uri.Path
		if uri.Host != "" {
			path = uri.Host
		}
		return dialer.Dial("unix", path)
	case "ssl", "tls", "mqtts", "mqtt+ssl", "tcps":
		cfg := opts.TLSConfig
		if cfg == nil {
			cfg = &tls.Config{}
		}
		return tls.DialWithDialer(dialer, "tcp", uri.Host, cfg)
	case "ws", "wss":
		u := *uri
		u.User = nil
		var cfg *tls.Config
		if uri.Scheme == "wss" {
			cfg = opts.TLSConfig
		}
		return paho.NewWebsocket(u.String(), cfg, opts.ConnectTimeout, opts.HTTPHeaders, opts.WebsocketOptions)
	}
	return nil, fmt.Errorf("broker URL %s: unsupported scheme %q; use tcp, ssl, ws, wss or unix", uri, uri.Scheme)
}
