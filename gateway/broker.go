package gateway

import (
	"bytes"
	"chatd/codes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

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
}

// StartEmbedded listens on opts.Addr and starts serving.
func StartEmbedded(opts EmbeddedOptions) (*Embedded, error) {
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
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
			c.MaximumClientWritesPending = 1024
			return c
		}(),
	})
	e := &Embedded{srv: srv, addr: ln.Addr(), pipe: newPipeListener(), clientID: "chatgw-" + randomID()}
	hook := &authHook{opts: opts, internalID: e.clientID}
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
func (e *Embedded) Close() error { return e.srv.Close() }

// authHook lets devices in with a genuine UserSig for the UserID they
// claim and confines each to its own two topics, like
// build/mosquitto/acl does on Mosquitto.
type authHook struct {
	mochi.HookBase
	opts       EmbeddedOptions
	internalID string
}

func (h *authHook) ID() string { return "chatgw-auth" }

func (h *authHook) Provides(b byte) bool {
	return bytes.Contains([]byte{mochi.OnConnectAuthenticate, mochi.OnACLCheck}, []byte{b})
}

func (h *authHook) OnConnectAuthenticate(cl *mochi.Client, pk packets.Packet) bool {
	if cl.Net.Listener == internalListener {
		return true
	}
	user := string(pk.Connect.Username)
	log := h.opts.Logger.With("remote", cl.Net.Remote, "client_id", cl.ID, "user", user)
	if err := mqtt.ValidateUserID(user); err != nil {
		log.Info("broker refused device: the MQTT username must be its UserID", "err", err)
		return false
	}
	if err := mqtt.ValidateInstanceID(cl.ID); err != nil || cl.ID == h.internalID {
		log.Info("broker refused device: the MQTT client id must be its instance id", "err", err)
		return false
	}
	// The UserSig must be genuine for this user. An expired one is let in
	// so the device can be told 70001 in the protocol instead of a bare
	// "not authorised"; the gateway refuses the login itself.
	_, err := usersig.Verify(string(pk.Connect.Password), h.opts.SDKAppID, h.opts.Key, user, h.opts.Now())
	if code := usersig.CodeOf(err); code != 0 && code != codes.UserSigExpired {
		log.Info("broker refused device: the MQTT password must be a UserSig for this user", "code", code, "err", err)
		return false
	}
	return true
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

// pipeListener is a net.Listener whose connections come from Dial in the
// same process.
type pipeListener struct {
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

func newPipeListener() *pipeListener {
	return &pipeListener{conns: make(chan net.Conn), done: make(chan struct{})}
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
	client, server := net.Pipe()
	select {
	case l.conns <- server:
		return client, nil
	case <-l.done:
		return nil, net.ErrClosed
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "in-process" }
