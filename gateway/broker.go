package gateway

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"chatd/codes"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"chatd/mqtt"
	"chatd/usersig"
)

const internalListener = "chatgw-internal"

// Embedded is an MQTT broker inside the gateway process, for a one-command
// start. Devices connect to it over TCP with their UserID as the MQTT
// username, their instance id as the client id and their UserSig as the
// password; the gateway itself connects through an in-process pipe that no
// other process can reach.
type Embedded struct {
	srv      *mochi.Server
	addr     net.Addr
	pipe     *pipeListener
	clientID string
}

// EmbeddedOptions configure the embedded broker.
type EmbeddedOptions struct {
	Addr     string // host:port to listen on for devices
	Topics   mqtt.Topics
	SDKAppID uint64
	Key      usersig.Secret
	Now      func() time.Time
	Logger   *slog.Logger
	// MaxExpiredAge: a UserSig that expired longer ago than this is refused
	// at CONNECT (default 24 h); one that expired more recently is let in,
	// so that the device hears 70001 in the protocol.
	MaxExpiredAge time.Duration
	// RateLimit is the per-connection rate of publishes (default
	// DefaultRateLimit; Rate < 0 turns it off). Publishes over it are
	// dropped; a connection with FloodDrops of them within FloodWindow is
	// disconnected (defaults 100 and 10 s).
	RateLimit   RateLimit
	FloodDrops  int
	FloodWindow time.Duration

	// Busy is given every device message the broker drops on its way to
	// the gateway because the gateway's connection has a full queue of
	// them (MaximumClientWritesPending): the gateway answers it as it
	// answers any request its full queue refuses. Set by Run.
	Busy func(topic string, payload []byte)

	stats      *stats // the gateway's metrics; set by Run
	pending    int    // mochi's pending writes per client (0: maxPendingToGateway)
	pipeBuffer int    // the gateway connection's socket send buffer (0: the system's)
}

// maxPendingToGateway is mochi's queue of pending writes per client, the
// gateway's own connection included: the device messages the broker holds
// for the gateway beyond it are answered busy (EmbeddedOptions.Busy).
const maxPendingToGateway = 1024

// DefaultMaxExpiredAge is how long after its expiry a UserSig still gets
// a device onto the embedded broker (to be told 70001).
const DefaultMaxExpiredAge = 24 * time.Hour

// StartEmbedded listens on opts.Addr and starts serving.
func StartEmbedded(opts EmbeddedOptions) (*Embedded, error) {
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if opts.MaxExpiredAge == 0 {
		opts.MaxExpiredAge = DefaultMaxExpiredAge
	}
	if opts.RateLimit == (RateLimit{}) {
		opts.RateLimit = DefaultRateLimit
	}
	if opts.FloodDrops == 0 {
		opts.FloodDrops = 100
	}
	if opts.FloodWindow == 0 {
		opts.FloodWindow = 10 * time.Second
	}
	if opts.stats == nil {
		opts.stats = newStats(opts.Now, func() (int, int) { return 0, 0 })
	}
	ln, err := net.Listen("tcp", opts.Addr)
	if err != nil {
		return nil, fmt.Errorf("embedded broker: listening on %s: %w", opts.Addr, err)
	}
	srv := mochi.New(&mochi.Options{
		// mochi logs every connect at INFO; the gateway logs what matters.
		Logger: opts.Logger.With("component", "broker"),
		Capabilities: func() *mochi.Capabilities {
			c := mochi.NewDefaultServerCapabilities()
			c.MaximumPacketSize = 4 * mqtt.MaxPayload
			c.MaximumClientWritesPending = maxPendingToGateway
			if opts.pending > 0 {
				c.MaximumClientWritesPending = int32(opts.pending)
			}
			return c
		}(),
	})
	e := &Embedded{srv: srv, addr: ln.Addr(), pipe: newPipeListener(opts.pipeBuffer), clientID: "chatgw-" + randomID()}
	hook := &authHook{opts: opts, internalID: e.clientID, srv: srv, conns: map[*mochi.Client]*connState{}}
	if err := srv.AddHook(hook, nil); err != nil {
		ln.Close()
		return nil, err
	}
	if err := srv.AddListener(listeners.NewNet("tcp", ln)); err != nil {
		ln.Close()
		return nil, err
	}
	if err := srv.AddListener(listeners.NewNet(internalListener, e.pipe)); err != nil {
		ln.Close()
		return nil, err
	}
	if err := srv.Serve(); err != nil {
		srv.Close()
		return nil, fmt.Errorf("embedded broker: %w", err)
	}
	return e, nil
}

// Addr is where devices connect.
func (e *Embedded) Addr() net.Addr { return e.addr }

// BrokerOptions returns how the gateway connects to this broker.
func (e *Embedded) BrokerOptions() BrokerOptions {
	return BrokerOptions{ClientID: e.clientID, Dial: e.pipe.Dial}
}

// Close disconnects every client and stops the broker.
func (e *Embedded) Close() error {
	// mochi's own Close lists each listener's clients under a read lock
	// that it takes twice (Clients.GetByListener calls Len): a client
	// ending at that moment queues for the write lock between the two, and
	// all three wait forever (seen at shutdown under emulation). Close the
	// listeners first with a closer that takes the lock once; mochi's Close
	// then finds them closed and lists nothing.
	e.srv.Listeners.CloseAll(func(id string) {
		for _, cl := range e.srv.Clients.GetAll() {
			if cl.Net.Listener == id && !cl.Closed() {
				_ = e.srv.DisconnectClient(cl, packets.ErrServerShuttingDown)
			}
		}
	})
	return e.srv.Close()
}

func init() {
	// mochi sends MQTT 5 reason codes that MQTT 3.1.1 does not define to
	// 3.1.1 clients when it has no mapping: give it one for every CONNACK
	// it can send, so a device only ever sees the codes 1 to 5.
	for v5, v3 := range map[packets.Code]packets.Code{
		packets.ErrUnspecifiedError:                   packets.Err3ClientIdentifierNotValid, // a persistent session without a client id
		packets.ErrProtocolViolationProtocolName:      packets.Err3UnsupportedProtocolVersion,
		packets.ErrProtocolViolationProtocolVersion:   packets.Err3UnsupportedProtocolVersion,
		packets.ErrProtocolViolationReservedBit:       packets.Err3UnsupportedProtocolVersion,
		packets.ErrProtocolViolationPasswordTooLong:   packets.ErrMalformedUsernameOrPassword,
		packets.ErrProtocolViolationUsernameTooLong:   packets.ErrMalformedUsernameOrPassword,
		packets.ErrProtocolViolationUsernameNoFlag:    packets.ErrMalformedUsernameOrPassword,
		packets.ErrProtocolViolationFlagNoPassword:    packets.ErrMalformedUsernameOrPassword,
		packets.ErrProtocolViolationPasswordNoFlag:    packets.ErrMalformedUsernameOrPassword,
		packets.ErrProtocolViolationWillFlagNoPayload: packets.Err3NotAuthorized,
		packets.ErrQosNotSupported:                    packets.Err3NotAuthorized,
		packets.ErrRetainNotSupported:                 packets.Err3NotAuthorized,
		packets.ErrServerBusy:                         packets.Err3ServerUnavailable,
		packets.ErrNotAuthorized:                      packets.Err3NotAuthorized,
	} {
		if _, ok := packets.V5CodesToV3[v5]; !ok {
			packets.V5CodesToV3[v5] = v3
		}
	}
}

// authHook lets devices in with a genuine UserSig for the UserID they
// claim, confines each to its own two topics (like build/mosquitto/acl on
// Mosquitto), checks their Wills, keeps client ids to their users, and
// rate-limits their publishes.
type authHook struct {
	mochi.HookBase
	opts       EmbeddedOptions
	internalID string
	srv        *mochi.Server

	mu    sync.Mutex
	conns map[*mochi.Client]*connState
	// banned holds the devices (user + "/" + client id) cut off for
	// flooding, until when they are refused.
	banned map[string]time.Time
}

// connState is what the hook knows about one device connection.
type connState struct {
	conn     string // the connection's id, set on everything it publishes
	bucket   bucket
	drops    int
	since    time.Time // start of the current flood window
	cutOff   bool
	username string
}

func (h *authHook) ID() string { return "chatgw-auth" }

func (h *authHook) Provides(b byte) bool {
	return bytes.Contains([]byte{mochi.OnConnect, mochi.OnConnectAuthenticate, mochi.OnACLCheck, mochi.OnPublish, mochi.OnPublishDropped, mochi.OnWill, mochi.OnDisconnect}, []byte{b})
}

// OnPublishDropped: mochi drops a message, whatever its QoS, for a client
// whose queue of pending writes is full. A device message dropped on its
// way to the gateway would go unanswered (the device would wait its whole
// request timeout), so it is answered busy instead.
func (h *authHook) OnPublishDropped(cl *mochi.Client, pk packets.Packet) {
	if cl.Net.Listener == internalListener && h.opts.Busy != nil {
		h.opts.Busy(pk.TopicName, pk.Payload)
	}
}

// refusal is a CONNACK refusal: its MQTT 3.1.1 return code (the MQTT 5
// reason code for MQTT 5 clients), the metric's reason and a log message.
type refusal struct {
	v3, v5 packets.Code
	reason string
	msg    string
}

var (
	idRejected    = refusal{v3: packets.Err3ClientIdentifierNotValid, v5: packets.ErrClientIdentifierNotValid}
	badCredential = refusal{v3: packets.ErrMalformedUsernameOrPassword, v5: packets.ErrBadUsernameOrPassword}
	notAuthorized = refusal{v3: packets.Err3NotAuthorized, v5: packets.ErrNotAuthorized}
	unavailable   = refusal{v3: packets.Err3ServerUnavailable, v5: packets.ErrServerBusy}
)

// floodBan is how long a device cut off for flooding is refused.
func (h *authHook) floodBan() time.Duration { return 6 * h.opts.FloodWindow }

func (r refusal) with(reason, msg string) *refusal { r.reason, r.msg = reason, msg; return &r }

// check decides about a device's CONNECT; nil lets it in.
func (h *authHook) check(cl *mochi.Client, pk packets.Packet) *refusal {
	user := string(pk.Connect.Username)
	if err := mqtt.ValidateUserID(user); err != nil {
		return badCredential.with(refuseUserID, "the MQTT username must be its UserID: "+err.Error())
	}
	if err := mqtt.ValidateInstanceID(cl.ID); err != nil {
		return idRejected.with(refuseClientID, "the MQTT client id must be its instance id: "+err.Error())
	}
	if cl.ID == h.internalID {
		return idRejected.with(refuseReserved, "the client id is the gateway's own")
	}
	if !pk.Connect.Clean {
		return idRejected.with(refusePersistent, "devices connect with a clean session")
	}
	if pk.Connect.WillFlag {
		if pk.Connect.WillTopic != h.opts.Topics.Up(user, cl.ID) {
			return notAuthorized.with(refuseWill, fmt.Sprintf("the Will's topic %q is not the device's own up topic", pk.Connect.WillTopic))
		}
		if pk.Connect.WillRetain {
			return notAuthorized.with(refuseWill, "the Will is retained")
		}
	}
	// The UserSig must be genuine for this user. One that expired lately
	// is let in so the device can be told 70001 in the protocol instead of
	// a bare refusal; the gateway refuses the login itself.
	t, err := usersig.Verify(string(pk.Connect.Password), h.opts.SDKAppID, h.opts.Key, user, h.opts.Now())
	switch code := usersig.CodeOf(err); {
	case code == codes.UserSigExpired && h.opts.Now().Sub(t.ExpiresAt()) > h.opts.MaxExpiredAge:
		return notAuthorized.with(refuseLongExpired, fmt.Sprintf("the UserSig expired at %s, more than %s ago", t.ExpiresAt().Format(time.RFC3339), h.opts.MaxExpiredAge))
	case code != 0 && code != codes.UserSigExpired:
		return badCredential.with(refuseUserSig, "the MQTT password must be a UserSig for this user: "+codes.Describe(code))
	}
	h.mu.Lock()
	until, banned := h.banned[user+"/"+cl.ID]
	h.mu.Unlock()
	if banned && h.opts.Now().Before(until) {
		return unavailable.with(refuseFlooder, fmt.Sprintf("cut off for flooding until %s", until.Format(time.RFC3339)))
	}
	// A client id belongs to the user connected with it: another user's
	// connection does not take it over.
	if existing, ok := h.srv.Clients.Get(cl.ID); ok && !existing.Closed() && string(existing.Properties.Username) != user {
		return idRejected.with(refuseTaken, "the client id is in use by another user")
	}
	return nil
}

func (h *authHook) OnConnect(cl *mochi.Client, pk packets.Packet) error {
	if cl.Net.Listener == internalListener {
		return nil
	}
	if r := h.check(cl, pk); r != nil {
		h.opts.stats.refused.With(r.reason).Add(1)
		h.opts.Logger.Info("broker refused device", "remote", cl.Net.Remote, "client_id", cl.ID, "user", string(pk.Connect.Username), "reason", r.msg)
		code := r.v5
		if cl.Properties.ProtocolVersion < 5 {
			code = r.v3
		}
		_ = h.srv.SendConnack(cl, code, false, nil)
		return fmt.Errorf("connection refused (CONNACK %#x): %s", code.Code, r.reason)
	}
	h.awaitPredecessor(cl)
	h.mu.Lock()
	h.conns[cl] = &connState{conn: randomID(), bucket: bucket{tokens: float64(h.opts.RateLimit.Burst), last: h.opts.Now()}, username: string(pk.Connect.Username)}
	h.mu.Unlock()
	return nil
}

// takeoverWait bounds how long a connection waits for the broker to finish
// with the previous connection of its client id.
const takeoverWait = 2 * time.Second

// awaitPredecessor ends the previous connection with cl's client id, if
// there is one, and waits until mochi has finished cleaning up after it.
//
// mochi v2.7.9 cleans up after a clean-session connection in that
// connection's own goroutine once its read loop ends: if the connection was
// not taken over, it unsubscribes it and deletes its client id from the
// client list, by id. When a device reconnects at once with the same id,
// the new connection can take the old one over between that goroutine's
// "taken over?" check and the deletion: the deletion then removes the new
// connection from the client list (and the unsubscription its topic), so
// nothing published to the device reaches it until it reconnects again,
// and it waits a whole request timeout for its answer. Waiting here, before
// mochi looks for a session to take over, lets the old connection's
// cleanup finish first; the new one then starts afresh.
func (h *authHook) awaitPredecessor(cl *mochi.Client) {
	old, ok := h.srv.Clients.Get(cl.ID)
	if !ok || old == cl {
		return
	}
	// Only a connection whose session ends with it is cleaned up by its
	// goroutine; one with a session to keep (MQTT 5 session expiry) is
	// taken over by mochi without that race.
	if old.Properties.ProtocolVersion == 5 && old.Properties.Props.SessionExpiryInterval != 0 ||
		old.Properties.ProtocolVersion < 5 && !old.Properties.Clean {
		return
	}
	if !old.Closed() {
		_ = h.srv.DisconnectClient(old, packets.ErrSessionTakenOver)
	}
	deadline := time.Now().Add(takeoverWait)
	for wait := 50 * time.Microsecond; time.Now().Before(deadline); wait = min(2*wait, 5*time.Millisecond) {
		if cur, ok := h.srv.Clients.Get(cl.ID); !ok || cur != old {
			return
		}
		time.Sleep(wait)
	}
	h.opts.Logger.Warn("broker: the previous connection of a client id was not cleaned up in time; taking it over", "client_id", cl.ID, "waited", takeoverWait)
}

// OnConnectAuthenticate lets in what OnConnect let through (mochi asks
// OnConnect first and stops at its error).
func (h *authHook) OnConnectAuthenticate(cl *mochi.Client, pk packets.Packet) bool {
	if cl.Net.Listener == internalListener {
		return true
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	_, ok := h.conns[cl]
	return ok
}

func (h *authHook) OnACLCheck(cl *mochi.Client, topic string, write bool) bool {
	if cl.Net.Listener == internalListener {
		return true
	}
	user := string(cl.Properties.Username)
	if write {
		return topic == h.opts.Topics.Up(user, cl.ID)
	}
	return topic == h.opts.Topics.Down(user, cl.ID)
}

// OnPublish rate-limits a device's publishes, drops retained ones, and
// stamps each with the connection's id.
func (h *authHook) OnPublish(cl *mochi.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Listener == internalListener {
		return pk, nil
	}
	h.mu.Lock()
	cs, ok := h.conns[cl]
	if !ok {
		h.mu.Unlock()
		return pk, packets.ErrRejectPacket
	}
	now := h.opts.Now()
	allowed := true
	if lim := h.opts.RateLimit; lim.Rate > 0 {
		b := &cs.bucket
		if d := now.Sub(b.last); d > 0 {
			b.tokens = min(float64(lim.Burst), b.tokens+d.Seconds()*lim.Rate)
			b.last = now
		}
		if b.tokens >= 1 {
			b.tokens--
		} else {
			allowed = false
		}
	}
	flood := false
	if !allowed {
		if now.Sub(cs.since) > h.opts.FloodWindow {
			cs.since, cs.drops = now, 0
		}
		cs.drops++
		if cs.drops >= h.opts.FloodDrops && !cs.cutOff {
			cs.cutOff, flood = true, true
		}
	}
	conn := cs.conn
	h.mu.Unlock()
	if !allowed {
		h.opts.stats.throttled.With("broker").Add(1)
		if flood {
			h.mu.Lock()
			if h.banned == nil {
				h.banned = map[string]time.Time{}
			}
			for k, until := range h.banned {
				if now.After(until) {
					delete(h.banned, k)
				}
			}
			h.banned[cs.username+"/"+cl.ID] = now.Add(h.floodBan())
			h.mu.Unlock()
			h.opts.stats.disconnects.With("flood").Add(1)
			h.opts.Logger.Warn("broker disconnected a flooding device", "remote", cl.Net.Remote, "client_id", cl.ID, "user", string(cl.Properties.Username),
				"dropped", h.opts.FloodDrops, "within", h.opts.FloodWindow)
			_ = h.srv.DisconnectClient(cl, packets.ErrQuotaExceeded)
		}
		return pk, packets.ErrRejectPacket
	}
	if pk.FixedHeader.Retain {
		// A retained request would be carried out again at every
		// resubscription of the gateway.
		h.opts.stats.dropped(dropRetained)
		return pk, packets.ErrRejectPacket
	}
	pk.Payload = mqtt.SetConn(pk.Payload, conn)
	return pk, nil
}

// OnWill stamps the Will with the connection's id, so that it cannot mark
// a session of a newer connection offline.
func (h *authHook) OnWill(cl *mochi.Client, will mochi.Will) (mochi.Will, error) {
	if cl.Net.Listener == internalListener {
		return will, nil
	}
	h.mu.Lock()
	cs, ok := h.conns[cl]
	h.mu.Unlock()
	if ok {
		will.Payload = mqtt.SetConn(will.Payload, cs.conn)
	}
	return will, nil
}

func (h *authHook) OnDisconnect(cl *mochi.Client, err error, expire bool) {
	h.mu.Lock()
	delete(h.conns, cl)
	h.mu.Unlock()
}

// pipeListener is a net.Listener whose connections come from Dial in the
// same process.
type pipeListener struct {
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
	// sndbuf, when set, is the connections' socket send buffer (tests).
	sndbuf int
}

func newPipeListener(sndbuf int) *pipeListener {
	return &pipeListener{conns: make(chan net.Conn), done: make(chan struct{}), sndbuf: sndbuf}
}

func (l *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *pipeListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *pipeListener) Addr() net.Addr { return pipeAddr{} }

func (l *pipeListener) Dial(ctx context.Context) (net.Conn, error) {
	client, server, err := connPair(l.sndbuf)
	if err != nil {
		return nil, err
	}
	select {
	case l.conns <- server:
		return client, nil
	case <-l.done:
		err = net.ErrClosed
	case <-ctx.Done():
		err = ctx.Err()
	}
	client.Close()
	server.Close()
	return nil, err
}

type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "in-process" }
