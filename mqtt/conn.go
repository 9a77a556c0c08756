package mqtt

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

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
	resend  time.Duration
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
	po.SetPingTimeout(10 * time.Second)
	po.SetConnectTimeout(o.ConnectTimeout)
	po.SetWriteTimeout(10 * time.Second)
	po.SetOrderMatters(false)
	po.SetBinaryWill(o.Topics.Up(o.UserID, o.Instance), Encode(Message{Type: TypeOffline}), QoSWill, false)
	po.SetConnectionLostHandler(func(_ paho.Client, err error) { c.markLost(err) })
	c.c = paho.NewClient(po)

	t := c.c.Connect()
	if err := wait(ctx, t, o.ConnectTimeout+time.Second); err != nil {
		c.c.Disconnect(0)
		return nil, fmt.Errorf("connecting to %v: %w", o.Brokers, err)
	}
	t = c.c.Subscribe(o.Topics.Down(o.UserID, o.Instance), QoSReply, c.onMessage)
	if err := wait(ctx, t, 10*time.Second); err != nil {
		c.c.Disconnect(0)
		return nil, fmt.Errorf("subscribing to %s: %w", o.Topics.Down(o.UserID, o.Instance), err)
	}
	if st, ok := t.(*paho.SubscribeToken); ok {
		for _, q := range st.Result() {
			if q == 0x80 {
				c.c.Disconnect(0)
				return nil, fmt.Errorf("the broker refused the subscription to %s: check the broker ACL (build/mosquitto/acl) and that the broker username is the UserID and the client id the instance id", o.Topics.Down(o.UserID, o.Instance))
			}
		}
	}
	return c, nil
}

// wait waits for a paho token without ever hanging: bounded by ctx and d.
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

// Close ends the connection. With goodbye, it first tells the gateway the
// device is going offline (a clean disconnect sends no Will).
func (c *Conn) Close(goodbye bool) {
	if goodbye && c.c.IsConnectionOpen() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_ = c.publish(ctx, Message{Type: TypeOffline})
		cancel()
	}
	c.c.Disconnect(250)
	c.markLost(errors.New("closed"))
}
