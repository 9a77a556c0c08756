package gateway

import (
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"chatd/mqtt"
)

// With the embedded broker's small per-connection queues, kicks pushed to
// many devices at once all arrive: an operator kicks every user of a
// logged-in fleet at the same moment, and every device hears its kick.
func TestKicksToManyDevicesAtOnceAllArrive(t *testing.T) {
	n := 400
	if testing.Short() || raceEnabled {
		// Under the race detector the same burst takes ten times as long
		// on a 2-core machine: fewer devices, the same pattern.
		n = 50
	}
	w := startWorld(t, func(c *ServeConfig) { c.RateLimit = RateLimit{Rate: -1} })
	type dev struct {
		user, session string
		msgs          chan mqtt.Message
		c             paho.Client
	}
	devs := make([]*dev, n)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 32)
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			d := &dev{user: fmt.Sprintf("k%03d", i), msgs: make(chan mqtt.Message, 16)}
			sig := w.sig(d.user, time.Hour)
			inst := "i-" + d.user
			c := paho.NewClient(paho.NewClientOptions().AddBroker(w.broker).SetClientID(inst).SetUsername(d.user).SetPassword(sig).SetAutoReconnect(false))
			if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
				t.Errorf("%s: connect: %v", d.user, tok.Error())
				return
			}
			t.Cleanup(func() { c.Disconnect(0) })
			d.c = c
			if tok := c.Subscribe(w.cfg.Topics.Down(d.user, inst), 1, func(_ paho.Client, m paho.Message) {
				if r, err := mqtt.Decode(m.Payload()); err == nil {
					d.msgs <- r
				}
			}); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
				t.Errorf("%s: subscribe: %v", d.user, tok.Error())
				return
			}
			c.Publish(w.cfg.Topics.Up(d.user, inst), 1, false, mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "l1", UserSig: sig}))
			select {
			case r := <-d.msgs:
				if r.Code != 0 {
					t.Errorf("%s: login: %+v", d.user, r)
					return
				}
				d.session = r.Session
			case <-time.After(10 * time.Second):
				t.Errorf("%s: no login answer", d.user)
				return
			}
			devs[i] = d
		}()
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	// Kick them all at once: the kicks leave the gateway in one burst,
	// while every device sends a burst of requests of its own (resumes of
	// its session), whose answers it is owed too.
	time.Sleep(1100 * time.Millisecond) // revocations are in whole seconds: the UserSigs were issued in an earlier one
	const burst = 5
	for _, d := range devs {
		for j := range burst {
			d.c.Publish(w.cfg.Topics.Up(d.user, "i-"+d.user), 1, false, mqtt.Encode(mqtt.Message{Type: mqtt.TypeResume, ID: fmt.Sprint("r", j), Session: d.session}))
		}
	}
	var kicked atomic.Int64
	for _, d := range devs {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			resp, err := http.Post(w.admin+"/v1/users/"+d.user+"/kick", "", nil)
			if err != nil {
				t.Errorf("kick %s: %v", d.user, err)
				return
			}
			resp.Body.Close()
			if resp.StatusCode != 200 {
				t.Errorf("kick %s: %s", d.user, resp.Status)
			}
		}()
	}
	wg.Wait()
	deadline := time.After(60 * time.Second)
	answers := 0
	for _, d := range devs {
		kick, got := false, 0
		for !kick || got < burst {
			select {
			case m := <-d.msgs:
				switch {
				case m.Type == mqtt.TypeKick && m.Session == d.session:
					kick = true
					kicked.Add(1)
				case m.Type == mqtt.TypeResumeResult:
					got++
					answers++
				default:
					t.Errorf("%s: unexpected %+v", d.user, m)
				}
			case <-deadline:
				t.Fatalf("%d of %d devices heard their kick, %d of %d resumes were answered; %s heard kick %v and %d answers",
					kicked.Load(), n, answers, n*burst, d.user, kick, got)
			}
		}
	}
}
