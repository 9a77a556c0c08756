package mosquittotest_test

import (
	"bytes"
	"context"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"chatd/mqtt"
	"chatd/mqtt/mosquittotest"
)

// waitTimeout bounds every wait for the broker or a client.
const waitTimeout = 5 * time.Second

// msg is a received message.
type msg struct {
	Topic, Payload string
}

// inbox collects the messages of one client's subscriptions. Messages arrive
// on the connection's goroutines and must never block them.
type inbox struct {
	ch      chan msg
	dropped atomic.Int64
}

func newInbox() *inbox { return &inbox{ch: make(chan msg, 256)} }

func (in *inbox) put(m msg) {
	select {
	case in.ch <- m:
	default:
		in.dropped.Add(1)
	}
}

// until returns the messages received up to and including marker. Messages
// from one client's connection arrive in the order the broker processed
// them, so anything published before the marker and delivered to this
// client is among them.
func (in *inbox) until(t *testing.T, marker msg) []msg {
	t.Helper()
	timer := time.NewTimer(waitTimeout)
	defer timer.Stop()
	var got []msg
	for {
		select {
		case m := <-in.ch:
			got = append(got, m)
			if m == marker {
				if n := in.dropped.Load(); n > 0 {
					t.Fatalf("%d messages dropped: the inbox is too small", n)
				}
				return got
			}
		case <-timer.C:
			t.Fatalf("marker %v did not arrive within %v; got %v", marker, waitTimeout, got)
		}
	}
}

// client is a legitimate paho client.
type client struct {
	c  paho.Client
	in *inbox
}

// connect logs in to b as user (its password from users) with clientID;
// opts change paho's options before it connects.
func connect(t *testing.T, b *mosquittotest.Broker, user, clientID string, opts ...func(*paho.ClientOptions)) *client {
	t.Helper()
	o := paho.NewClientOptions().
		AddBroker(b.URL()).
		SetClientID(clientID).
		SetUsername(user).
		SetPassword(users[user]).
		SetAutoReconnect(false).
		SetConnectTimeout(waitTimeout)
	for _, opt := range opts {
		opt(o)
	}
	cl := &client{c: paho.NewClient(o), in: newInbox()}
	wait(t, cl.c.Connect(), "%s connecting as %s", clientID, user)
	t.Cleanup(func() { cl.c.Disconnect(250) })
	return cl
}

// subscribe subscribes to filter and requires the broker to grant it.
func (cl *client) subscribe(t *testing.T, filter string) {
	t.Helper()
	tok := cl.c.Subscribe(filter, mqtt.QoSRequest, func(_ paho.Client, m paho.Message) {
		cl.in.put(msg{m.Topic(), string(m.Payload())})
	})
	wait(t, tok, "subscribing to %s", filter)
	if q := tok.(*paho.SubscribeToken).Result()[filter]; q == 0x80 {
		t.Fatalf("subscribing to %s: refused", filter)
	}
}

// publish publishes at QoS 1 and waits for the broker's PUBACK.
func (cl *client) publish(t *testing.T, topic, payload string) {
	t.Helper()
	wait(t, cl.c.Publish(topic, mqtt.QoSRequest, false, payload), "publishing to %s", topic)
}

func wait(t *testing.T, tok paho.Token, format string, args ...any) {
	t.Helper()
	if !tok.WaitTimeout(waitTimeout) {
		t.Fatalf(format+": no answer within %v", append(args, waitTimeout)...)
	}
	if err := tok.Error(); err != nil {
		t.Fatalf(format+": %v", append(args, err)...)
	}
}

// pub runs mosquitto_pub once at QoS 1 (it exits after the broker's PUBACK)
// and returns its output. An empty user connects without credentials.
func pub(t *testing.T, b *mosquittotest.Broker, user, password, clientID, topic, payload string) (string, error) {
	t.Helper()
	bin := mosquittotest.Tool(t, "mosquitto_pub")
	ctx, cancel := context.WithTimeout(t.Context(), 2*waitTimeout)
	defer cancel()
	// MQTT 3.1.1, like our clients: a denied publish still gets its PUBACK.
	args := []string{"-h", b.Host(), "-p", b.Port(), "-V", "mqttv311", "-q", "1",
		"-i", clientID, "-t", topic, "-m", payload}
	if user != "" {
		args = append(args, "-u", user, "-P", password)
	}
	out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
	return string(out), err
}

// mustPub publishes with mosquitto_pub as user and fails the test if that fails.
func mustPub(t *testing.T, b *mosquittotest.Broker, user, clientID, topic, payload string) {
	t.Helper()
	if out, err := pub(t, b, user, users[user], clientID, topic, payload); err != nil {
		t.Fatalf("mosquitto_pub -u %s -i %s -t %s: %v\n%s", user, clientID, topic, err, out)
	}
}

// sub runs mosquitto_sub as user with clientID on filters until the test
// ends, and returns once the broker has acknowledged the subscription. It
// returns the messages it receives and the granted QoS list of the SUBACK.
func sub(t *testing.T, b *mosquittotest.Broker, user, clientID string, filters ...string) (*inbox, string) {
	t.Helper()
	return subArgs(t, b, user, clientID, nil, filters...)
}

// subArgs is sub with more mosquitto_sub arguments.
func subArgs(t *testing.T, b *mosquittotest.Broker, user, clientID string, more []string, filters ...string) (*inbox, string) {
	t.Helper()
	bin := mosquittotest.Tool(t, "mosquitto_sub")
	// mosquitto_sub flushes stdout only after a message; the SUBACK line must
	// be read when it is printed.
	stdbuf, err := exec.LookPath("stdbuf")
	if err != nil {
		t.Fatalf("stdbuf (coreutils) is needed to read mosquitto_sub's output unbuffered: %v", err)
	}
	args := []string{"-oL", bin, "-h", b.Host(), "-p", b.Port(), "-V", "mqttv311", "-q", "1",
		"-i", clientID, "-u", user, "-P", users[user],
		"-d", "-F", "MSG %t %p"}
	args = append(args, more...)
	for _, f := range filters {
		args = append(args, "-t", f)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cmd := exec.CommandContext(ctx, stdbuf, args...)
	in := newInbox()
	subscribed := make(chan string, 1)
	cmd.Stdout = &lineWriter{line: func(line string) {
		if rest, ok := strings.CutPrefix(line, "MSG "); ok {
			topic, payload, _ := strings.Cut(rest, " ")
			in.put(msg{topic, payload})
		} else if rest, ok := strings.CutPrefix(line, "Subscribed "); ok {
			select {
			case subscribed <- rest:
			default:
			}
		}
	}}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("mosquitto_sub: %v", err)
	}
	exited := make(chan struct{})
	go func() {
		cmd.Wait()
		close(exited)
	}()
	t.Cleanup(func() {
		cancel()
		<-exited
	})
	select {
	case s := <-subscribed:
		// "(mid: 1): 1, 1, 128": the granted QoS per filter.
		_, granted, _ := strings.Cut(s, "): ")
		return in, granted
	case <-exited:
		t.Fatalf("mosquitto_sub -u %s -i %s exited before subscribing: %v\n%s", user, clientID, cmd.ProcessState, stderr.String())
	case <-time.After(waitTimeout):
		t.Fatalf("mosquitto_sub -u %s -i %s: no SUBACK within %v", user, clientID, waitTimeout)
	}
	return nil, ""
}

// lineWriter calls line for every complete line written to it.
type lineWriter struct {
	mu   sync.Mutex
	buf  []byte
	line func(string)
}

func (w *lineWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, p...)
	for {
		i := bytes.IndexByte(w.buf, '\n')
		if i < 0 {
			return len(p), nil
		}
		w.line(string(w.buf[:i]))
		w.buf = w.buf[i+1:]
	}
}
