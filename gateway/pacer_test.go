package gateway

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/google/go-cmp/cmp"

	"chatd/codes"
	"chatd/mqtt"
)

// The refused requests get consecutive slots at the measured capacity,
// after the queue ahead of them has drained; slots already past are not
// handed out again; the wait is capped.
func TestPacerSpreadsRetriesOverCapacity(t *testing.T) {
	var p pacer
	p.observe(50, 500*time.Millisecond) // 100 messages a second
	var got []time.Duration
	for range 4 {
		got = append(got, p.retryAfter(t0, 0))
	}
	want := []time.Duration{10 * time.Millisecond, 20 * time.Millisecond, 30 * time.Millisecond, 40 * time.Millisecond}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("slots (-want +got):\n%s", diff)
	}
	// A second later the old slots are gone; 200 queued take 2 s to drain.
	if got := p.retryAfter(t0.Add(time.Second), 200); got != 2*time.Second+10*time.Millisecond {
		t.Errorf("behind a backlog of 200: %s, want 2.01s", got)
	}
	if got := p.retryAfter(t0.Add(time.Second), 1_000_000); got != maxRetryAfter {
		t.Errorf("behind a huge backlog: %s, want the cap %s", got, maxRetryAfter)
	}
}

// When the whole queue is full, a request is answered at once with 70169
// and retry_after_ms; presence gets no answer; a device over its own share
// is dropped as before. Every message is acknowledged to the broker.
func TestSaturatedGatewayAnswersRetryAfter(t *testing.T) {
	c := newCommitRig(t)
	q := newFairQueue[inbound](1, 2)
	acks := 0
	ack := func() { acks++ }
	q.offer("a/1", inbound{})
	q.offer("b/1", inbound{})
	login := mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "l1", UserSig: c.r.sig("carol", time.Hour)})
	c.g.enqueueInbound(q, "carol/1", inbound{topic: "chat/v1/up/carol/1", payload: login, ack: ack})
	c.g.enqueueInbound(q, "carol/2", inbound{topic: "chat/v1/up/carol/2", payload: mqtt.Encode(mqtt.Message{Type: mqtt.TypeResume, ID: "r1", Session: "s9"}), ack: ack})
	c.g.enqueueInbound(q, "carol/3", inbound{topic: "chat/v1/up/carol/3", payload: mqtt.Encode(mqtt.Message{Type: mqtt.TypeOffline}), ack: ack})
	c.g.sendQueued()
	if len(c.pub.msgs) != 2 {
		t.Fatalf("answers: %v, want the login's and the resume's", c.pub.sent)
	}
	for i, want := range []struct{ typ, id string }{{mqtt.TypeLoginResult, "l1"}, {mqtt.TypeResumeResult, "r1"}} {
		m := c.pub.msgs[i]
		if m.Type != want.typ || m.ID != want.id || m.Code != codes.ServerTimeout || !codes.Retryable(m.Code) || m.RetryAfterMs <= 0 || m.Desc == "" {
			t.Errorf("answer %d: %+v, want a %s for %s with 70169 and retry_after_ms", i, m, want.typ, want.id)
		}
	}
	if c.pub.msgs[1].RetryAfterMs <= c.pub.msgs[0].RetryAfterMs {
		t.Errorf("two refused requests got the same slot: %d and %d ms", c.pub.msgs[0].RetryAfterMs, c.pub.msgs[1].RetryAfterMs)
	}
	if got := c.g.stats.drops.Get(dropBusy); got != 3 {
		t.Errorf("busy drops %d, want 3", got)
	}
	// A device over its own share, with room in the queue: dropped.
	q = newFairQueue[inbound](1, 10)
	q.offer("carol/1", inbound{})
	c.g.enqueueInbound(q, "carol/1", inbound{topic: "chat/v1/up/carol/1", payload: login, ack: ack})
	c.g.sendQueued()
	if len(c.pub.msgs) != 2 || c.g.stats.drops.Get(dropQueueFull) != 1 {
		t.Errorf("over its share: answers %v, queue_full %d", c.pub.sent, c.g.stats.drops.Get(dropQueueFull))
	}
	if acks != 4 {
		t.Errorf("%d of 4 messages acknowledged", acks)
	}
}

// A fleet logs in at once through a gateway whose queue holds two
// messages: the devices it cannot queue are told when to come back, do so,
// and every device is logged in without waiting for a request timeout.
func TestFleetRetriesWhenToldAndAllGetIn(t *testing.T) {
	const n = 100
	w := startWorld(t, func(c *ServeConfig) { c.Broker.QueueSize = 2; c.RateLimit = RateLimit{Rate: -1} })
	var busy, timeouts, in atomic.Int64
	var wg sync.WaitGroup
	start := make(chan struct{})
	for d := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			user := fmt.Sprintf("f%03d", d)
			sig := w.sig(user, time.Hour)
			answers := make(chan mqtt.Message, 8)
			o := paho.NewClientOptions().AddBroker(w.broker).SetClientID("i-" + user).SetUsername(user).SetPassword(sig).SetAutoReconnect(false)
			cl := paho.NewClient(o)
			if tok := cl.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
				t.Errorf("%s: connect: %v", user, tok.Error())
				return
			}
			defer cl.Disconnect(0)
			if tok := cl.Subscribe(w.cfg.Topics.Down(user, "i-"+user), 1, func(_ paho.Client, m paho.Message) {
				if r, err := mqtt.Decode(m.Payload()); err == nil {
					answers <- r
				}
			}); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
				t.Errorf("%s: subscribe: %v", user, tok.Error())
				return
			}
			<-start
			login := mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "l1", UserSig: sig})
			for attempt := 0; attempt < 50; attempt++ {
				cl.Publish(w.cfg.Topics.Up(user, "i-"+user), 1, false, login)
				select {
				case r := <-answers:
					switch {
					case r.Code == 0:
						in.Add(1)
						return
					case r.Code == codes.ServerTimeout && r.RetryAfterMs > 0:
						busy.Add(1)
						time.Sleep(time.Duration(r.RetryAfterMs) * time.Millisecond)
					default:
						t.Errorf("%s: %+v", user, r)
						return
					}
				case <-time.After(10 * time.Second):
					timeouts.Add(1)
					t.Errorf("%s: no answer within 10 s", user)
					return
				}
			}
			t.Errorf("%s: not logged in after 50 attempts", user)
		}()
	}
	close(start)
	wg.Wait()
	t.Logf("%d devices, %d answers asking to retry later, %d timeouts", n, busy.Load(), timeouts.Load())
	if busy.Load() == 0 {
		t.Error("no device was told to retry later: the queue never filled, the test tested nothing")
	}
	if in.Load() != n {
		t.Errorf("%d of %d devices logged in", in.Load(), n)
	}
}
