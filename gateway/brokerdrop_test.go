package gateway

import (
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"chatd/codes"
	"chatd/mqtt"
)

// pausedConn is the gateway's connection to its embedded broker with
// reads that can be held: the gateway stops taking device messages in,
// as a gateway starved of CPU does.
type pausedConn struct {
	net.Conn
	mu     sync.Mutex
	paused bool
	resume chan struct{}
}

func (c *pausedConn) pause() {
	c.mu.Lock()
	c.paused, c.resume = true, make(chan struct{})
	c.mu.Unlock()
}

func (c *pausedConn) unpause() {
	c.mu.Lock()
	if c.paused {
		c.paused = false
		close(c.resume)
	}
	c.mu.Unlock()
}

func (c *pausedConn) Read(b []byte) (int, error) {
	c.mu.Lock()
	paused, resume := c.paused, c.resume
	c.mu.Unlock()
	if paused {
		<-resume
	}
	return c.Conn.Read(b)
}

// mochi drops a message for a client whose queue of pending writes is full,
// whatever its QoS. When that client is the gateway, the device that sent
// the message is answered busy (70169 with retry_after_ms) instead of
// waiting for an answer that will never come.
func TestBrokerQueueToGatewayFullAnswersBusy(t *testing.T) {
	var mu sync.Mutex
	var conns []*pausedConn
	w := startWorld(t, func(c *ServeConfig) {
		c.RateLimit = RateLimit{Rate: -1}
		c.embeddedPending = 4
		c.embeddedPipeBuffer = 4096
		c.wrapGatewayConn = func(nc net.Conn) net.Conn {
			pc := &pausedConn{Conn: nc}
			mu.Lock()
			conns = append(conns, pc)
			mu.Unlock()
			return pc
		}
	})
	mu.Lock()
	gw := conns[len(conns)-1]
	mu.Unlock()

	const n = 80
	answers := make(chan mqtt.Message, n)
	devs := make([]paho.Client, n)
	for i := range n {
		user := fmt.Sprintf("b%03d", i)
		inst := "i-" + user
		sig := w.sig(user, time.Hour)
		c := paho.NewClient(paho.NewClientOptions().AddBroker(w.broker).SetClientID(inst).SetUsername(user).SetPassword(sig).SetAutoReconnect(false))
		if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("%s: connect: %v", user, tok.Error())
		}
		t.Cleanup(func() { c.Disconnect(0) })
		if tok := c.Subscribe(w.cfg.Topics.Down(user, inst), 1, func(_ paho.Client, m paho.Message) {
			if r, err := mqtt.Decode(m.Payload()); err == nil {
				answers <- r
			}
		}); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("%s: subscribe: %v", user, tok.Error())
		}
		devs[i] = c
	}

	gw.pause()
	for i, c := range devs {
		user := fmt.Sprintf("b%03d", i)
		tok := c.Publish(w.cfg.Topics.Up(user, "i-"+user), 1, false, mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "l-" + user, UserSig: w.sig(user, time.Hour)}))
		if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("%s: publish: %v", user, tok.Error())
		}
	}
	// Every publish is acknowledged by the broker: each is now in the
	// broker's queue to the gateway, or was dropped from it.
	time.Sleep(200 * time.Millisecond)
	gw.unpause()

	var ok, busy int
	deadline := time.After(10 * time.Second)
	for ok+busy < n {
		select {
		case r := <-answers:
			switch {
			case r.Type == mqtt.TypeLoginResult && r.Code == codes.OK:
				ok++
			case r.Type == mqtt.TypeLoginResult && r.Code == codes.ServerTimeout && r.RetryAfterMs > 0:
				busy++
			default:
				t.Errorf("unexpected answer %+v", r)
			}
		case <-deadline:
			t.Fatalf("%d of %d logins answered (%d logged in, %d told to retry); the rest got nothing", ok+busy, n, ok, busy)
		}
	}
	if busy == 0 {
		t.Errorf("all %d logins were carried out: the broker's queue to the gateway never filled, so the test tested nothing", n)
	}
	t.Logf("%d logged in, %d told to retry", ok, busy)
}
