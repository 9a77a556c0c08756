package mqtt

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
	"log/slog"

	pahopackets "github.com/eclipse/paho.mqtt.golang/packets"
)

var pahoConnErrors = pahopackets.ConnErrors

// broker starts an embedded broker that lets everyone in, on loopback.
func broker(t *testing.T) (*mochi.Server, string) {
	t.Helper()
	srv := mochi.New(&mochi.Options{InlineClient: true, Logger: slog.New(slog.DiscardHandler)})
	if err := srv.AddHook(new(auth.AllowHook), nil); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.AddListener(listeners.NewNet("t", ln)); err != nil {
		t.Fatal(err)
	}
	if err := srv.Serve(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return srv, ln.Addr().String()
}

// watchUp delivers what is published on the device's up topic.
func watchUp(t *testing.T, srv *mochi.Server, topics Topics) <-chan string {
	ch := make(chan string, 16)
	err := srv.Subscribe(topics.Up("dev-1", "inst-1"), 1, func(_ *mochi.Client, _ packets.Subscription, pk packets.Packet) {
		m, err := Decode(pk.Payload)
		if err == nil {
			select {
			case ch <- m.Type:
			default:
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	return ch
}

func dialTest(t *testing.T, addr string, keepAlive time.Duration) *Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, DialOptions{Brokers: []string{"tcp://" + addr}, Topics: Topics{}, UserID: "dev-1", Instance: "inst-1",
		UserSig: "x", KeepAlive: keepAlive, ConnectTimeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// Abort cuts the connection without DISCONNECT: the broker publishes the
// presence Will. Close does not.
func TestAbortPublishesTheWill(t *testing.T) {
	srv, addr := broker(t)
	up := watchUp(t, srv, Topics{})

	c := dialTest(t, addr, 30*time.Second)
	c.Close(false)
	c = dialTest(t, addr, 30*time.Second)
	c.Abort()
	select {
	case typ := <-up:
		if typ != TypeOffline {
			t.Fatalf("got %q on the up topic, want the Will (offline)", typ)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no Will after Abort")
	}
	select {
	case typ := <-up:
		t.Errorf("a second message %q: the clean Close published a Will too", typ)
	case <-time.After(200 * time.Millisecond):
	}
	select {
	case <-c.Lost():
	default:
		t.Error("Lost is not closed after Abort")
	}
}

// blackhole forwards TCP between a client and addr until cut, then stops
// forwarding in both directions without closing anything: a dead link.
type blackhole struct {
	ln    net.Listener
	mu    sync.Mutex
	cut   bool
	conns []net.Conn
}

func newBlackhole(t *testing.T, addr string) *blackhole {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &blackhole{ln: ln}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", addr)
			if err != nil {
				c.Close()
				continue
			}
			b.mu.Lock()
			b.conns = append(b.conns, c, s)
			b.mu.Unlock()
			go b.pipe(c, s)
			go b.pipe(s, c)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		b.mu.Lock()
		for _, c := range b.conns {
			c.Close()
		}
		b.mu.Unlock()
	})
	return b
}

func (b *blackhole) pipe(dst, src net.Conn) {
	buf := make([]byte, 4096)
	for {
		n, err := src.Read(buf)
		if err != nil {
			return
		}
		b.mu.Lock()
		cut := b.cut
		b.mu.Unlock()
		if cut {
			continue // swallowed
		}
		if _, err := dst.Write(buf[:n]); err != nil {
			return
		}
	}
}

func (b *blackhole) Cut() {
	b.mu.Lock()
	b.cut = true
	b.mu.Unlock()
}

// A dead link (nothing arrives, nothing is closed) is noticed within 1.5
// keepalives: paho pings after a keepalive of silence, and the ping
// timeout is shorter than its check interval.
func TestDeadLinkNoticedWithinOneAndAHalfKeepalives(t *testing.T) {
	_, addr := broker(t)
	bh := newBlackhole(t, addr)
	const keepAlive = 4 * time.Second
	c := dialTest(t, bh.ln.Addr().String(), keepAlive)
	defer c.Close(false)
	bh.Cut()
	cut := time.Now()
	select {
	case <-c.Lost():
	case <-time.After(4 * keepAlive):
		t.Fatalf("a dead link went unnoticed for %s", 4*keepAlive)
	}
	// 1.5 keepalives, plus scheduling slack on a loaded machine.
	if took := time.Since(cut); took > keepAlive*3/2+750*time.Millisecond {
		t.Errorf("noticed after %s; the bound is 1.5 keepalives (%s)", took.Round(10*time.Millisecond), keepAlive*3/2)
	}
	if !errors.Is(c.Err(), io.EOF) && c.Err() == nil {
		t.Error("no reason given for the loss")
	}
}

func TestPingTimeout(t *testing.T) {
	for _, tc := range []struct{ ka, want time.Duration }{
		{2 * time.Second, 500 * time.Millisecond},
		{10 * time.Second, 2 * time.Second},
		{30 * time.Second, 4 * time.Second},
	} {
		if got := pingTimeout(tc.ka); got != tc.want {
			t.Errorf("pingTimeout(%s) = %s, want %s", tc.ka, got, tc.want)
		}
	}
}

// CONNACK refusals are told apart from network failures by type.
func TestRefusalCode(t *testing.T) {
	if _, ok := RefusalCode(errors.New("dial tcp: connection refused")); ok {
		t.Error("a network error counts as a refusal")
	}
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	_, err := Dial(ctx, DialOptions{Brokers: []string{"tcp://" + ln.Addr().String()}, UserID: "dev-1", Instance: "inst-1", ConnectTimeout: time.Second})
	if _, ok := RefusalCode(err); ok || err == nil {
		t.Errorf("connection refused: %v counts as a CONNACK refusal", err)
	}
	for rc := byte(1); rc <= 5; rc++ {
		err := errors.Join(errors.New("connecting"), packetsConnErr(rc))
		if got, ok := RefusalCode(err); !ok || got != rc {
			t.Errorf("rc %d: got %d %v", rc, got, ok)
		}
	}
}

func packetsConnErr(rc byte) error { return pahoConnErrors[rc] }

// ws:// brokers work through the same connection code (and Abort).
func TestWebsocketBroker(t *testing.T) {
	srv := mochi.New(&mochi.Options{InlineClient: true, Logger: slog.New(slog.DiscardHandler)})
	if err := srv.AddHook(new(auth.AllowHook), nil); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	if err := srv.AddListener(listeners.NewWebsocket(listeners.Config{ID: "ws", Address: addr})); err != nil {
		t.Fatal(err)
	}
	if err := srv.Serve(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	up := watchUp(t, srv, Topics{})
	var c *Conn
	for deadline := time.Now().Add(5 * time.Second); ; {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		c, err = Dial(ctx, DialOptions{Brokers: []string{"ws://" + addr + "/"}, UserID: "dev-1", Instance: "inst-1", UserSig: "x", ConnectTimeout: time.Second})
		cancel()
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("dial ws://: %v", err)
	}
	c.Abort()
	select {
	case typ := <-up:
		if typ != TypeOffline {
			t.Fatalf("got %q, want the Will", typ)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no Will after Abort over a websocket")
	}
}
