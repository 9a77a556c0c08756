package gateway

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"chatd/mqtt"
)

// Thousands of immediate reconnects with the same client id, as a device
// makes after a network blip: each new connection subscribes to its down
// topic, sends a request and must get the answer. Half of them say goodbye
// (DISCONNECT) and reconnect at once; the other half connect while the old
// connection is still open (a takeover). A connection whose subscription or
// client entry the broker lost would wait for its answer forever.
func TestImmediateReconnectsKeepTheirSubscription(t *testing.T) {
	devices, rounds := 40, 150
	if testing.Short() {
		devices, rounds = 10, 20
	}
	w := startWorld(t, func(c *ServeConfig) { c.RateLimit = RateLimit{Rate: -1} })
	var lost, done atomic.Int64
	var wg sync.WaitGroup
	for d := range devices {
		wg.Add(1)
		go func() {
			defer wg.Done()
			user := fmt.Sprintf("rc%02d", d)
			sig := w.sig(user, time.Hour)
			id := "dev-" + user // the same client id at every reconnect
			var prev paho.Client
			for i := range rounds {
				answers := make(chan mqtt.Message, 4)
				o := paho.NewClientOptions().AddBroker(w.broker).SetClientID(id).SetUsername(user).SetPassword(sig).
					SetAutoReconnect(false).SetConnectTimeout(5 * time.Second).SetCleanSession(true)
				c := paho.NewClient(o)
				if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
					t.Errorf("%s round %d: connect: %v", user, i, tok.Error())
					return
				}
				if prev != nil {
					// The old connection was taken over; drop the client.
					prev.Disconnect(0)
					prev = nil
				}
				tok := c.Subscribe(w.cfg.Topics.Down(user, id), 1, func(_ paho.Client, m paho.Message) {
					if r, err := mqtt.Decode(m.Payload()); err == nil {
						answers <- r
					}
				})
				if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
					t.Errorf("%s round %d: subscribe: %v", user, i, tok.Error())
					return
				}
				req := fmt.Sprintf("r%d", i)
				c.Publish(w.cfg.Topics.Up(user, id), 1, false, mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogout, ID: req, Session: "none"}))
				got := false
				deadline := time.After(5 * time.Second)
			wait:
				for {
					select {
					case r := <-answers:
						if r.ID == req {
							got = true
							break wait
						}
					case <-deadline:
						break wait
					}
				}
				done.Add(1)
				if !got {
					lost.Add(1)
				}
				if i%2 == 0 {
					c.Disconnect(0) // goodbye, then reconnect at once
				} else {
					prev = c // the next connection takes this one over
				}
			}
			if prev != nil {
				prev.Disconnect(0)
			}
		}()
	}
	wg.Wait()
	t.Logf("%d reconnects, %d without an answer", done.Load(), lost.Load())
	if lost.Load() != 0 {
		t.Errorf("%d of %d reconnected devices never got their answer: the broker lost their subscription", lost.Load(), done.Load())
	}
}
