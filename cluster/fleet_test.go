//go:build cluster

package cluster

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"chatd/mqtt"
)

var topics = mqtt.Topics{Prefix: mqtt.DefaultPrefix}

// sim is a simulated device: a paho client speaking the device protocol
// (login, resume, logout; kicks counted), as chatd does on the wire: a
// clean session, subscribed again on every connection.
type sim struct {
	user, inst, sig string
	c               paho.Client

	mu      sync.Mutex
	waiting map[string]chan mqtt.Message // request id -> its result
	session string
	kicks   atomic.Int32
	seq     atomic.Int64
	// subscribed: the current connection has its down subscription.
	subscribed atomic.Bool
}

// sim connects a simulated device to the MQTT listeners of the given
// nodes (tried in order); like chatd it reconnects when it loses its
// connection, to the next node when its own does not answer.
func (e *env) sim(t testing.TB, user, inst string, nodes ...int) *sim {
	t.Helper()
	d := &sim{user: user, inst: inst, sig: sig(t, user), waiting: map[string]chan mqtt.Message{}}
	pass := e.users[user]
	if e.c == nil {
		// The embedded broker takes the UserSig as the password.
		pass = d.sig
	}
	keepAlive := e.keepAlive
	if keepAlive == 0 {
		keepAlive = 5 * time.Second
	}
	o := paho.NewClientOptions().SetClientID(inst).SetUsername(user).SetPassword(pass).
		SetCleanSession(true).SetConnectTimeout(10 * time.Second).SetKeepAlive(keepAlive).
		SetAutoReconnect(true).SetMaxReconnectInterval(500 * time.Millisecond).SetConnectRetry(false).SetProtocolVersion(4).
		SetOrderMatters(false)
	for _, i := range nodes {
		if e.c == nil {
			o.AddBroker(e.broker)
			continue
		}
		o.AddBroker(e.c.Nodes[i].MQTTURL())
	}
	// Every connection subscribes again (a clean session keeps nothing),
	// retrying a refused subscription as chatd does (nats-server refuses
	// one while the stream behind it elects a leader).
	o.SetOnConnectHandler(func(c paho.Client) {
		for c.IsConnectionOpen() {
			tok := c.Subscribe(topics.Down(user, inst), 1, d.handle)
			// A SUBACK can take long on a loaded node (the subscription is
			// a consumer to create): chatd waits 20 s, longer than the
			// node's js_api_timeout, before it gives up.
			if tok.WaitTimeout(20*time.Second) && tok.Error() == nil && subGranted(tok) {
				d.subscribed.Store(true)
				return
			}
			time.Sleep(200 * time.Millisecond)
		}
	})
	o.SetConnectionLostHandler(func(paho.Client, error) { d.subscribed.Store(false) })
	d.c = paho.NewClient(o)
	// A connect that fails is tried again, as chatd does (nats-server
	// refuses one while the session it stores cannot be written yet).
	var err error
	for attempt := 0; attempt < 5; attempt++ {
		tok := d.c.Connect()
		if !tok.WaitTimeout(30 * time.Second) {
			err = errors.New("no CONNACK within 30s")
		} else if err = tok.Error(); err == nil {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("%s/%s: MQTT connect: %v", user, inst, err)
	}
	t.Cleanup(func() { d.c.Disconnect(0) })
	if !d.waitSubscribed(30 * time.Second) {
		t.Fatalf("%s/%s: no subscription to its down topic within 30s", user, inst)
	}
	return d
}

// subGranted says whether the broker granted every topic of a
// subscription (a refused one is 0x80 in the SUBACK).
func subGranted(tok paho.Token) bool {
	st, ok := tok.(*paho.SubscribeToken)
	if !ok {
		return false
	}
	for _, q := range st.Result() {
		if q == 0x80 {
			return false
		}
	}
	return true
}

// waitSubscribed waits (bounded) until the device is connected and
// subscribed to its down topic.
func (d *sim) waitSubscribed(within time.Duration) bool {
	deadline := time.Now().Add(within)
	for !d.subscribed.Load() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
	return true
}

func (d *sim) handle(_ paho.Client, m paho.Message) {
	msg, err := mqtt.Decode(m.Payload())
	if err != nil {
		return
	}
	if msg.Type == mqtt.TypeKick {
		d.kicks.Add(1)
		d.mu.Lock()
		d.session = ""
		d.mu.Unlock()
		return
	}
	d.mu.Lock()
	ch := d.waiting[msg.ID]
	delete(d.waiting, msg.ID)
	d.mu.Unlock()
	if ch != nil {
		ch <- msg
	}
}

// Session is the session the device holds ("" when none).
func (d *sim) Session() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.session
}

var errNoAnswer = errors.New("no answer")

// request sends one request and waits (bounded) for its result.
func (d *sim) request(m mqtt.Message, within time.Duration) (mqtt.Message, error) {
	start := time.Now()
	if !d.waitSubscribed(within) {
		return mqtt.Message{}, errNoAnswer
	}
	within -= time.Since(start)
	m.ID = fmt.Sprintf("%s-%d", d.inst, d.seq.Add(1))
	ch := make(chan mqtt.Message, 1)
	d.mu.Lock()
	d.waiting[m.ID] = ch
	d.mu.Unlock()
	d.c.Publish(topics.Up(d.user, d.inst), 1, false, mqtt.Encode(m))
	select {
	case r := <-ch:
		return r, nil
	case <-time.After(within):
		d.mu.Lock()
		delete(d.waiting, m.ID)
		d.mu.Unlock()
		return mqtt.Message{}, errNoAnswer
	}
}

func retryable(code int) bool { return code == 70169 || code == 70202 || code == 70500 }

// login logs in with the device's UserSig once: the answer, or errNoAnswer.
func (d *sim) loginOnce(userSig string, within time.Duration) (mqtt.Message, error) {
	r, err := d.request(mqtt.Message{Type: mqtt.TypeLogin, UserSig: userSig, Platform: "Linux"}, within)
	if err == nil && r.Code == 0 {
		d.mu.Lock()
		d.session = r.Session
		d.mu.Unlock()
	}
	return r, err
}

// login logs in as chatd does: a request that gets no answer, or a
// retryable one, is sent again (after retry_after_ms) until ctx ends. It
// returns the final answer and the number of attempts.
func (d *sim) login(ctx context.Context, userSig string) (mqtt.Message, int, error) {
	for n := 1; ; n++ {
		r, err := d.loginOnce(userSig, 5*time.Second)
		if err == nil && !retryable(r.Code) {
			return r, n, nil
		}
		wait := 200 * time.Millisecond
		if err == nil && r.RetryAfterMs > 0 {
			wait = time.Duration(r.RetryAfterMs) * time.Millisecond
		}
		select {
		case <-ctx.Done():
			return r, n, fmt.Errorf("%s/%s: login not answered after %d attempts: %w", d.user, d.inst, n, ctx.Err())
		case <-time.After(wait):
		}
	}
}

// resume resumes the device's session after a reconnect, retrying as
// login does.
func (d *sim) resume(ctx context.Context) (mqtt.Message, error) {
	session := d.Session()
	for {
		r, err := d.request(mqtt.Message{Type: mqtt.TypeResume, Session: session}, 5*time.Second)
		if err == nil && !retryable(r.Code) {
			return r, nil
		}
		select {
		case <-ctx.Done():
			return r, fmt.Errorf("%s/%s: resume not answered: %w", d.user, d.inst, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func (d *sim) logout(within time.Duration) (mqtt.Message, error) {
	r, err := d.request(mqtt.Message{Type: mqtt.TypeLogout, Session: d.Session()}, within)
	if err == nil && r.Code == 0 {
		d.mu.Lock()
		d.session = ""
		d.mu.Unlock()
	}
	return r, err
}

// eachInflight calls fn(i) for every i below n, from inflight goroutines
// that each take the next i as they finish one, and returns when all
// calls have.
func eachInflight(n, inflight int, fn func(i int)) {
	var next atomic.Int64
	var wg sync.WaitGroup
	for range min(inflight, n) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := int(next.Add(1)) - 1; i < n; i = int(next.Add(1)) - 1 {
				fn(i)
			}
		}()
	}
	wg.Wait()
}

// loginAll logs every device in, inflight at a time, as chatd would
// (retrying), calling each(i) after the i-th answer; it fails the test
// for any device that does not end logged in.
func loginAll(t *testing.T, devs []*sim, inflight int, within time.Duration, each func(done int)) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	var done atomic.Int64
	errs := make(chan error, len(devs))
	eachInflight(len(devs), inflight, func(i int) {
		d := devs[i]
		r, _, err := d.login(ctx, d.sig)
		switch {
		case err != nil:
			errs <- err
		case r.Code != 0:
			errs <- fmt.Errorf("%s/%s: login refused: %d %s", d.user, d.inst, r.Code, r.Desc)
		}
		if each != nil {
			each(int(done.Add(1)))
		}
	})
	close(errs)
	n := 0
	for err := range errs {
		if n++; n <= 10 {
			t.Error(err)
		}
	}
	if n > 10 {
		t.Errorf("... %d devices in all did not log in", n)
	}
}

// resumeAll resumes every device's session at once, each within its own
// deadline, and fails the test for any that does not get the session it
// holds back.
func resumeAll(t testing.TB, devs []*sim, within time.Duration) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, len(devs))
	for _, d := range devs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), within)
			defer cancel()
			s := d.Session()
			r, err := d.resume(ctx)
			if err != nil || r.Code != 0 || r.Session != s {
				errs <- fmt.Errorf("%s: resume: %+v %v (held %s)", d.user, r, err, s)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}
