package gateway

// The hostile-device suite: real clients (mosquitto_pub and mosquitto_sub
// as the attackers, mqtt.Conn and paho as devices) try each attack of
// issue "hostile devices" against the embedded broker and a real Mosquitto.
// Each test checks the victim (still logged in with its session, online,
// told nothing forged), the gateway (still connected, still answering) and
// that what the attacker sent is counted.

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"chatd/internal/proctest"
	"chatd/mqtt"
	"chatd/mqtt/mosquittotest"
	"chatd/usersig"
)

type userView struct {
	State    string    `json:"state"`
	Sessions []Session `json:"sessions"`
}

func (w *world) user(id string) userView {
	w.t.Helper()
	var u userView
	w.getJSON("/v1/users/"+id, &u)
	return u
}

func (w *world) hostPort() (string, string) {
	u, err := url.Parse(w.broker)
	if err != nil {
		w.t.Fatal(err)
	}
	h, p, _ := net.SplitHostPort(u.Host)
	return h, p
}

// sigAt makes a UserSig issued at issued for lifetime.
func sigAt(t *testing.T, user string, issued time.Time, lifetime time.Duration) string {
	t.Helper()
	s, err := usersig.Generate(testAppID, testKey, user, lifetime, issued)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// attacker is a mosquitto_sub run by the attacker. It stays connected
// until killed; refused, it exits at once.
type attacker struct {
	cmd    *exec.Cmd
	out    *strings.Builder
	exited chan struct{}
}

func startAttacker(t *testing.T, host, port, user, password, clientID string, args ...string) *attacker {
	t.Helper()
	bin := mosquittotest.Tool(t, "mosquitto_sub")
	all := append([]string{"-h", host, "-p", port, "-V", "mqttv311", "-q", "1", "-u", user, "-P", password, "-i", clientID,
		"-t", "chat/v1/down/" + user + "/" + clientID}, args...)
	a := &attacker{cmd: exec.Command(bin, all...), out: &strings.Builder{}, exited: make(chan struct{})}
	var mu sync.Mutex
	a.cmd.Stdout = lockedWriter{&mu, a.out}
	a.cmd.Stderr = lockedWriter{&mu, a.out}
	if err := a.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { a.cmd.Wait(); close(a.exited) }()
	t.Cleanup(func() { a.cmd.Process.Kill(); <-a.exited })
	return a
}

type lockedWriter struct {
	mu *sync.Mutex
	b  *strings.Builder
}

func (w lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

// refused reports whether the attacker's connection was refused (it
// exited within a second), and what mosquitto_sub said.
func (a *attacker) refused() (bool, string) {
	select {
	case <-a.exited:
		return true, strings.TrimSpace(a.out.String())
	case <-time.After(time.Second):
		return false, ""
	}
}

// die kills the attacker without a DISCONNECT, so the broker publishes its Will.
func (a *attacker) die() {
	a.cmd.Process.Signal(syscall.SIGKILL)
	<-a.exited
}

// victimIntact checks that alice/inst-a is still logged in with session,
// online, connected, and was told nothing.
func victimIntact(t *testing.T, w *world, a *mqtt.Conn, session string) {
	t.Helper()
	select {
	case m := <-a.Pushes():
		t.Errorf("the victim was sent %+v", m)
	default:
	}
	select {
	case <-a.Lost():
		t.Errorf("the victim lost its connection: %v", a.Err())
		return
	default:
	}
	u := w.user("alice")
	if len(u.Sessions) != 1 || u.Sessions[0].ID != session || !u.Sessions[0].Online {
		t.Errorf("the victim's sessions at the gateway: %+v, want %s online", u.Sessions, session)
	}
	if r := request(t, a, mqtt.Message{Type: mqtt.TypeResume, Session: session}); r.Code != 0 {
		t.Errorf("the victim's resume: %+v", r)
	}
}

func loginVictim(t *testing.T, w *world) (*mqtt.Conn, string) {
	t.Helper()
	sig := w.sig("alice", time.Hour)
	a := w.dial("alice", "inst-a", sig)
	res := request(t, a, mqtt.Message{Type: mqtt.TypeLogin, UserSig: sig})
	if res.Code != 0 {
		t.Fatalf("victim login: %+v", res)
	}
	return a, res.Session
}

// Wills are published by the broker without an ACL check unless the broker
// checks them at CONNECT: every forged Will must be refused there. The
// attacker holds only a UserSig for itself that expired a minute ago.
func TestHostileWill(t *testing.T) {
	for _, tc := range []struct {
		name  string
		wills func(session string) [][]string // one attacker connection per Will
	}{
		{"forged kick on another device's down topic", func(s string) [][]string {
			return [][]string{{"--will-topic", "chat/v1/down/alice/inst-a", "--will-payload",
				string(mqtt.Encode(mqtt.Message{Type: mqtt.TypeKick, Session: s, Code: 6208, Reason: mqtt.KickAdmin}))}}
		}},
		{"forged offline on another user's up topic", func(string) [][]string {
			return [][]string{{"--will-topic", "chat/v1/up/alice/inst-a", "--will-payload", `{"type":"offline"}`}}
		}},
		{"ten forged failed logins on another user's up topic", func(string) [][]string {
			var w [][]string
			for i := range 10 {
				w = append(w, []string{"--will-topic", fmt.Sprintf("chat/v1/up/alice/inst-x%d", i), "--will-payload", `{"type":"login","user_sig":"junk"}`})
			}
			return w
		}},
		{"retained Will on its own up topic", func(string) [][]string {
			return [][]string{{"--will-topic", "chat/v1/up/mallory/mal-0", "--will-payload", `{"type":"login","user_sig":"junk"}`, "--will-retain"}}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := startWorld(t, nil)
			a, session := loginVictim(t, w)
			host, port := w.hostPort()
			expired := sigAt(t, "mallory", time.Now().Add(-time.Hour-time.Minute), time.Hour)
			for i, will := range tc.wills(session) {
				att := startAttacker(t, host, port, "mallory", expired, fmt.Sprintf("mal-%d", i), append(will, "--will-qos", "1")...)
				if ok, out := att.refused(); ok {
					t.Logf("attacker %d refused at CONNECT: %s", i, out)
					continue
				}
				t.Errorf("attacker %d with Will %q connected", i, will)
				att.die()
			}
			time.Sleep(300 * time.Millisecond) // a Will would be on its way
			victimIntact(t, w, a, session)
			// A new login of the victim's user is not locked out (70050).
			b := w.dial("alice", "inst-b", w.sig("alice", time.Hour))
			if r := request(t, b, mqtt.Message{Type: mqtt.TypeLogin, UserSig: w.sig("alice", time.Hour)}); r.Code != 0 {
				t.Errorf("alice's next login: %+v", r)
			}
			if m := w.metrics(); !strings.Contains(m, `chatgw_broker_refused_total{reason="bad_will"} `+fmt.Sprint(len(tc.wills(session)))+"\n") {
				t.Errorf("refused Wills not counted:\n%s", grep(m, "refused"))
			}
		})
	}
}

func grep(text, word string) string {
	var out []string
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, word) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// A device of another user cannot take over a connected device's client id.
func TestHostileClientIDTakeover(t *testing.T) {
	w := startWorld(t, nil)
	a, session := loginVictim(t, w)
	host, port := w.hostPort()
	att := startAttacker(t, host, port, "bob", w.sig("bob", time.Hour), "inst-a")
	if ok, out := att.refused(); !ok {
		t.Error("bob connected with alice's client id")
		att.die()
	} else {
		t.Logf("refused: %s", out)
	}
	victimIntact(t, w, a, session)
	// The same user's own instance reconnecting still takes over (it is the
	// same device coming back).
	a2 := w.dial("alice", "inst-a", w.sig("alice", time.Hour))
	if r := request(t, a2, mqtt.Message{Type: mqtt.TypeResume, Session: session}); r.Code != 0 {
		t.Errorf("the device itself reconnecting: %+v", r)
	}
}

// The gateway's connection to its embedded broker cannot be claimed.
func TestHostileGatewayClientIDEmbedded(t *testing.T) {
	emb, err := StartEmbedded(EmbeddedOptions{Addr: "127.0.0.1:0", SDKAppID: testAppID, Key: testKey})
	if err != nil {
		t.Fatal(err)
	}
	defer emb.Close()
	host, port, _ := net.SplitHostPort(emb.Addr().String())
	for _, id := range []string{emb.BrokerOptions().ClientID, "chatgw"} {
		att := startAttacker(t, host, port, "bob", sigAt(t, "bob", time.Now(), time.Hour), id)
		ok, out := att.refused()
		if id == "chatgw" {
			// Nobody holds it: a device may use it like any other id.
			if ok {
				t.Errorf("client id chatgw refused: %s", out)
			}
			continue
		}
		if !ok {
			t.Errorf("a device connected with the gateway's client id %s", id)
		}
	}
}

// UserSig expiry at CONNECT: one that expired long ago is refused (CONNACK
// 5, not authorised); one that expired lately gets in to hear 70001.
func TestHostileExpiredUserSig(t *testing.T) {
	w := startWorld(t, nil)
	host, port := w.hostPort()
	long := sigAt(t, "mallory", time.Now().Add(-26*time.Hour), time.Hour)
	att := startAttacker(t, host, port, "mallory", long, "mal-1")
	ok, out := att.refused()
	if !ok || !strings.Contains(out, "not authorised") {
		t.Errorf("a UserSig expired 25 h ago: refused=%v %q, want CONNACK 5 (not authorised)", ok, out)
	}
	recent := sigAt(t, "mallory", time.Now().Add(-time.Hour-time.Minute), time.Hour)
	c := w.dial("mallory", "mal-2", recent)
	if r := request(t, c, mqtt.Message{Type: mqtt.TypeLogin, UserSig: recent}); r.Code != 70001 {
		t.Errorf("login with a UserSig expired a minute ago: %+v, want 70001", r)
	}
	if m := w.metrics(); !strings.Contains(m, `chatgw_broker_refused_total{reason="usersig_expired_long_ago"} 1`) {
		t.Errorf("not counted:\n%s", grep(m, "refused"))
	}
}

// Retained messages on up topics are not carried out, neither when sent
// nor again at every resubscription.
func TestHostileRetainedEmbedded(t *testing.T) {
	w := startWorld(t, nil)
	sig := w.sig("alice", time.Hour)
	raw, err := rawClient(t, w.broker, "alice", "inst-r", sig)
	if err != nil {
		t.Fatal(err)
	}
	answers := make(chan mqtt.Message, 10)
	raw.Subscribe("chat/v1/down/alice/inst-r", 1, func(_ paho.Client, m paho.Message) {
		r, _ := mqtt.Decode(m.Payload())
		answers <- r
	}).WaitTimeout(5 * time.Second)
	raw.Publish("chat/v1/up/alice/inst-r", 1, true, mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "ret", UserSig: sig})).WaitTimeout(5 * time.Second)
	select {
	case r := <-answers:
		t.Errorf("a retained login was carried out: %+v", r)
	case <-time.After(time.Second):
	}
	if u := w.user("alice"); len(u.Sessions) != 0 {
		t.Errorf("sessions: %+v", u.Sessions)
	}
	if m := w.metrics(); !strings.Contains(m, `chatgw_messages_dropped_total{reason="retained"} 1`) {
		t.Errorf("not counted:\n%s", grep(m, "dropped"))
	}
}

// Sessions persisted as online start offline after a restart of the
// gateway with its embedded broker: no connection survived it.
func TestHostileRestartMarksOffline(t *testing.T) {
	w := startWorld(t, nil)
	_, session := loginVictim(t, w)
	w.stop()
	w.start()
	u := w.user("alice")
	if len(u.Sessions) != 1 || u.Sessions[0].ID != session || u.Sessions[0].Online || u.State != "offline" {
		t.Errorf("after a restart: %+v, want session %s offline", u, session)
	}
}

// floodResult is what one flood run measured.
type floodResult struct {
	sent    int64
	honest  []time.Duration // login round trips of the honest devices
	failed  int
	metrics string
}

// flood runs one device publishing as fast as it can, up to rate messages
// per second, for d, while honest devices log in one after another. dial
// connects a device; flooder is the flooding client.
func flood(t *testing.T, w *world, flooder paho.Client, topic string, payload []byte, rate int, d time.Duration, honest int,
	dial func(user, instance string) (*mqtt.Conn, string)) floodResult {
	t.Helper()
	var res floodResult
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	var sent atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			for range rate / 100 {
				if !flooder.IsConnectionOpen() {
					break
				}
				flooder.Publish(topic, 0, false, payload)
				sent.Add(1)
			}
		}
	}()
	time.Sleep(200 * time.Millisecond) // the flood is on
	// The honest logins are spread over the flood.
	begin := time.Now()
	spacing := (d - 500*time.Millisecond) / time.Duration(honest)
	for i := 0; ctx.Err() == nil && i < honest; i++ {
		time.Sleep(time.Until(begin.Add(time.Duration(i) * spacing)))
		c, sig := dial(fmt.Sprintf("honest%d", i), fmt.Sprintf("h-%d", i))
		start := time.Now()
		rctx, rcancel := context.WithTimeout(context.Background(), 15*time.Second)
		r, err := c.Request(rctx, mqtt.Message{Type: mqtt.TypeLogin, UserSig: sig})
		rcancel()
		if err != nil || r.Code != 0 {
			res.failed++
			t.Logf("honest login %d: %+v %v", i, r, err)
			continue
		}
		res.honest = append(res.honest, time.Since(start))
	}
	<-done
	res.sent = sent.Load()
	res.metrics = w.metrics()
	return res
}

func (r floodResult) p(q float64) time.Duration {
	if len(r.honest) == 0 {
		return 0
	}
	s := slices.Clone(r.honest)
	slices.Sort(s)
	return s[min(len(s)-1, int(float64(len(s))*q))]
}

// One device floods its own up topic; honest devices still log in, and
// the flooder is throttled, cut off and counted.
func TestHostileFloodEmbedded(t *testing.T) {
	for _, tc := range []struct {
		name    string
		payload func(sig string) []byte
	}{
		{"valid logins", func(sig string) []byte {
			return mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, UserSig: sig})
		}},
		{"16 KiB junk", func(string) []byte { return []byte(strings.Repeat("x", 16<<10)) }},
		{"offline", func(string) []byte { return []byte(`{"type":"offline"}`) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := startWorld(t, nil)
			a, session := loginVictim(t, w)
			sig := w.sig("flooder", time.Hour)
			fl, err := rawClient(t, w.broker, "flooder", "f-1", sig)
			if err != nil {
				t.Fatal(err)
			}
			dial := func(user, inst string) (*mqtt.Conn, string) {
				s := w.sig(user, time.Hour)
				return w.dial(user, inst, s), s
			}
			r := flood(t, w, fl, "chat/v1/up/flooder/f-1", tc.payload(sig), 10000, 3*time.Second, 20, dial)
			t.Logf("flooder sent %d; %d honest logins ok, %d failed; p50 %s p99 %s", r.sent, len(r.honest), r.failed, r.p(0.5), r.p(0.99))
			if r.failed > 0 || len(r.honest) == 0 {
				t.Errorf("%d honest logins failed, %d succeeded", r.failed, len(r.honest))
			}
			// The broker may still be reading what the flooder queued.
			for deadline := time.Now().Add(10 * time.Second); !strings.Contains(r.metrics, `chatgw_broker_disconnects_total{reason="flood"} 1`+"\n") && time.Now().Before(deadline); {
				time.Sleep(100 * time.Millisecond)
				r.metrics = w.metrics()
			}
			for _, want := range []string{`chatgw_broker_disconnects_total{reason="flood"} 1`, `chatgw_broker_connected 1`} {
				if !strings.Contains(r.metrics, want+"\n") {
					t.Errorf("metrics lack %q:\n%s", want, grep(r.metrics, "chatgw_broker"))
				}
			}
			if strings.Contains(r.metrics, `chatgw_rate_limited_total{where="broker"} 0`+"\n") {
				t.Error("the broker's rate limit dropped nothing")
			}
			// Cut off, the flooder cannot come straight back.
			if _, err := rawClient(t, w.broker, "flooder", "f-1", sig); err == nil {
				t.Error("the flooder reconnected at once")
			} else {
				t.Logf("flooder reconnecting: %v", err)
			}
			victimIntact(t, w, a, session)
		})
	}
}

// mosqWorld is a gateway on a real Mosquitto with the shipped ACL.
type mosqWorld struct {
	*world
	b *mosquittotest.Broker
}

var mosqUsers = func() map[string]string {
	m := map[string]string{"chatgw": "gw-secret", "alice": "alice-pw", "bob": "bob-pw", "flooder": "flood-pw"}
	for i := range 150 {
		m[fmt.Sprintf("honest%d", i)] = "honest-pw"
	}
	return m
}()

func startMosqWorld(t *testing.T, cfg mosquittotest.Config) *mosqWorld {
	t.Helper()
	cfg.ACLFile = mosquittotest.ACLTemplate(t)
	cfg.Users = mosqUsers
	b := mosquittotest.Start(t, cfg)
	w := startWorld(t, func(c *ServeConfig) {
		c.EmbeddedBroker = ""
		c.Broker = BrokerOptions{URL: b.URL(), Username: "chatgw", Password: mosqUsers["chatgw"]}
	})
	w.broker = b.URL()
	return &mosqWorld{w, b}
}

func (w *mosqWorld) dial(user, instance string) *mqtt.Conn {
	w.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := mqtt.Dial(ctx, mqtt.DialOptions{Brokers: []string{w.b.URL()}, UserID: user, Instance: instance, Username: user, Password: mosqUsers[user]})
	if err != nil {
		w.t.Fatalf("dial %s/%s: %v", user, instance, err)
	}
	w.t.Cleanup(func() { c.Close(false) })
	return c
}

func mosqRawClient(t *testing.T, b *mosquittotest.Broker, user, clientID string) paho.Client {
	t.Helper()
	c, err := rawClient(t, b.URL(), user, clientID, mosqUsers[user])
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// On Mosquitto a device account that connects with the client id
// "chatgw" (the old default) does not push the gateway off.
func TestHostileGatewayClientIDMosquitto(t *testing.T) {
	w := startMosqWorld(t, mosquittotest.Config{Shipped: true})
	// Reconnecting in a loop, as mosquitto_sub does.
	startAttacker(t, w.b.Host(), w.b.Port(), "bob", mosqUsers["bob"], "chatgw")
	time.Sleep(2 * time.Second)
	a := w.dial("alice", "inst-a")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := a.Request(ctx, mqtt.Message{Type: mqtt.TypeLogin, UserSig: w.sig("alice", time.Hour)})
	if err != nil || r.Code != 0 {
		t.Errorf("login while a device holds client id chatgw: %+v %v", r, err)
	}
	if n := strings.Count(w.b.Log(), "already connected, closing old connection"); n > 0 {
		t.Errorf("the broker closed a connection for a reused client id %d times:\n%s", n, grep(w.b.Log(), "already connected"))
	}
	if m := w.metrics(); !strings.Contains(m, "chatgw_broker_connected 1\n") {
		t.Errorf("gateway not connected:\n%s", grep(m, "broker_connected"))
	}
}

// Mosquitto lets %c be any client id the ACL can substitute, such as one
// with a dot: the gateway drops what breaks the layout, on every broker.
func TestHostileTopicIDsMosquitto(t *testing.T) {
	w := startMosqWorld(t, mosquittotest.Config{Shipped: true})
	c := mosqRawClient(t, w.b, "alice", "inst.x")
	got := make(chan string, 4)
	c.Subscribe("chat/v1/down/alice/inst.x", 1, func(_ paho.Client, m paho.Message) { got <- string(m.Payload()) }).WaitTimeout(5 * time.Second)
	c.Publish("chat/v1/up/alice/inst.x", 1, false, mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "1"})).WaitTimeout(5 * time.Second)
	select {
	case m := <-got:
		t.Errorf("a message from instance id inst.x was answered: %s", m)
	case <-time.After(2 * time.Second):
	}
	if u := w.user("alice"); len(u.Sessions) != 0 {
		t.Errorf("sessions: %+v", u.Sessions)
	}
	if m := w.metrics(); !strings.Contains(m, `chatgw_messages_dropped_total{reason="bad_topic"} 1`) {
		t.Errorf("not counted:\n%s", grep(m, "dropped"))
	}
}

// A retained request on Mosquitto (without the shipped retain_available
// false) is carried out once, when it is sent, and not again when the
// broker replays it to the resubscribing gateway.
func TestHostileRetainedMosquitto(t *testing.T) {
	w := startMosqWorld(t, mosquittotest.Config{})
	raw := mosqRawClient(t, w.b, "alice", "inst-r")
	raw.Publish("chat/v1/up/alice/inst-r", 1, true, mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "ret", UserSig: w.sig("alice", time.Hour)})).WaitTimeout(5 * time.Second)
	time.Sleep(500 * time.Millisecond)
	before := w.user("alice").Sessions
	w.stop()
	w.start()
	time.Sleep(time.Second)
	after := w.user("alice").Sessions
	if len(before) != len(after) || len(after) > 0 && after[0].ID != before[0].ID {
		t.Errorf("the retained login was carried out again at resubscription: before %+v, after %+v", before, after)
	}
	if len(after) != 1 {
		t.Errorf("the live retained login was not carried out once: %+v", after)
	}
	if m := w.metrics(); !strings.Contains(m, `chatgw_messages_dropped_total{reason="retained"} 1`) {
		t.Errorf("not counted:\n%s", grep(m, "dropped"))
	}
}

// A goodbye or Will of an older connection never marks the newer session
// offline: 20 logout+login cycles on one instance.
func TestHostilePresenceRace(t *testing.T) {
	cycles := func(t *testing.T, w *world, dial func() *mqtt.Conn) {
		offline := 0
		sig := w.sig("alice", time.Hour)
		for i := range 20 {
			c := dial()
			r := request(t, c, mqtt.Message{Type: mqtt.TypeLogin, UserSig: sig})
			if r.Code != 0 {
				t.Fatalf("cycle %d login: %+v", i, r)
			}
			time.Sleep(50 * time.Millisecond)
			if u := w.user("alice"); len(u.Sessions) != 1 || u.Sessions[0].ID != r.Session || !u.Sessions[0].Online {
				offline++
				t.Logf("cycle %d: %+v", i, u.Sessions)
			}
			request(t, c, mqtt.Message{Type: mqtt.TypeLogout, Session: r.Session})
			c.Close(true)
		}
		if offline > 0 {
			t.Errorf("the new session showed offline in %d of 20 cycles", offline)
		}
	}
	t.Run("mosquitto", func(t *testing.T) {
		w := startMosqWorld(t, mosquittotest.Config{Shipped: true})
		cycles(t, w.world, func() *mqtt.Conn { return w.dial("alice", "inst-a") })
	})
	t.Run("embedded", func(t *testing.T) {
		w := startWorld(t, nil)
		sig := w.sig("alice", time.Hour)
		cycles(t, w, func() *mqtt.Conn { return w.dial("alice", "inst-a", sig) })
	})
}

// One device floods on Mosquitto; honest devices still log in, the
// flooder's messages are dropped at the gateway and counted.
func TestHostileFloodMosquitto(t *testing.T) {
	w := startMosqWorld(t, mosquittotest.Config{Shipped: true})
	a := w.dial("alice", "inst-a")
	res := request(t, a, mqtt.Message{Type: mqtt.TypeLogin, UserSig: w.sig("alice", time.Hour)})
	fl := mosqRawClient(t, w.b, "flooder", "f-1")
	dial := func(user, inst string) (*mqtt.Conn, string) { return w.dial(user, inst), w.sig(user, time.Hour) }
	r := flood(t, w.world, fl, "chat/v1/up/flooder/f-1", mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin}), 10000, 3*time.Second, 20, dial)
	t.Logf("flooder sent %d; %d honest logins ok, %d failed; p50 %s p99 %s", r.sent, len(r.honest), r.failed, r.p(0.5), r.p(0.99))
	if r.failed > 0 || len(r.honest) == 0 {
		t.Errorf("%d honest logins failed, %d succeeded", r.failed, len(r.honest))
	}
	if strings.Contains(r.metrics, `chatgw_rate_limited_total{where="gateway"} 0`+"\n") || !strings.Contains(r.metrics, "chatgw_broker_connected 1\n") {
		t.Errorf("flood not counted or gateway not connected:\n%s", grep(r.metrics, "rate_limited")+grep(r.metrics, "broker_connected"))
	}
	victimIntact(t, w.world, a, res.Session)
}

// freezer forwards TCP to a broker until frozen; then it passes nothing and
// closes nothing, like a device that lost power behind a NAT.
type freezer struct {
	ln     net.Listener
	frozen atomic.Bool
}

func startFreezer(t *testing.T, target string) *freezer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &freezer{ln: ln}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			t.Cleanup(func() { c.Close(); s.Close() })
			pipe := func(dst, src net.Conn) {
				buf := make([]byte, 4096)
				for {
					n, err := src.Read(buf)
					if err != nil {
						return
					}
					if f.frozen.Load() {
						continue
					}
					if _, err := dst.Write(buf[:n]); err != nil {
						return
					}
				}
			}
			go pipe(s, c)
			go pipe(c, s)
		}
	}()
	return f
}

// The presence timing docs/protocol.md promises for Mosquitto: a device that
// goes silent is marked offline 1.5 keepalives later, plus up to 6 s.
func TestPresenceTimingMosquitto(t *testing.T) {
	w := startMosqWorld(t, mosquittotest.Config{Shipped: true})
	f := startFreezer(t, w.b.Addr)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	const keepalive = 2 * time.Second
	c, err := mqtt.Dial(ctx, mqtt.DialOptions{Brokers: []string{"tcp://" + f.ln.Addr().String()}, UserID: "alice", Instance: "inst-a",
		Username: "alice", Password: mosqUsers["alice"], KeepAlive: keepalive})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(false)
	res := request(t, c, mqtt.Message{Type: mqtt.TypeLogin, UserSig: w.sig("alice", time.Hour)})
	if res.Code != 0 {
		t.Fatalf("login: %+v", res)
	}
	f.frozen.Store(true)
	start := time.Now()
	for {
		u := w.user("alice")
		if len(u.Sessions) == 1 && !u.Sessions[0].Online {
			break
		}
		if time.Since(start) > 30*time.Second {
			t.Fatal("the silent device was not marked offline within 30 s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	took := time.Since(start)
	lo, hi := keepalive*3/2, keepalive*3/2+6*time.Second+time.Second // a second for the gateway
	t.Logf("marked offline %s after the device went silent (keepalive %s; documented %s to %s)", took.Round(10*time.Millisecond), keepalive, lo, hi-time.Second)
	if took < lo-100*time.Millisecond || took > hi {
		t.Errorf("marked offline after %s, outside the documented %s to %s", took, lo, hi-time.Second)
	}
}

// A device that invents instance ids (a new client id per connection, one
// login each) leaves a bounded amount of state behind.
func TestHostileInventedInstances(t *testing.T) {
	w := startWorld(t, nil)
	sig := w.sig("mallory", time.Hour)
	const n = 100
	for i := range n {
		c := w.dial("mallory", fmt.Sprintf("made-up-%d", i), sig)
		if r := request(t, c, mqtt.Message{Type: mqtt.TypeLogin, UserSig: sig}); r.Code != 0 {
			t.Fatalf("login %d: %+v", i, r)
		}
		c.Close(i%2 == 0) // some say goodbye first, so the next login kicks them while offline
	}
	var all struct {
		Sessions []Session `json:"sessions"`
	}
	w.getJSON("/v1/sessions", &all)
	if len(all.Sessions) != 1 {
		t.Errorf("%d active sessions, want 1", len(all.Sessions))
	}
	m := w.metrics()
	for kind, atLeast := range map[string]int{"tombstone": n - 1 - 32, "instance_flag": 1} {
		var got int
		fmt.Sscanf(grep(m, `chatgw_state_evicted_total{kind="`+kind+`"}`), `chatgw_state_evicted_total{kind="`+kind+`"} %d`, &got)
		if got < atLeast {
			t.Errorf("evicted %s = %d, want at least %d:\n%s", kind, got, atLeast, grep(m, "evicted"))
		}
	}
}

// dynsecGatewayID is the gateway's client id in the dynamic-security tests,
// bound to its account.
const dynsecGatewayID = "chatgw-dynsec-0123456789abcdef"

// dynsecClientIDs binds each device account of mosqUsers to a client id.
func dynsecClientIDs() map[string]string {
	ids := map[string]string{"alice": "inst-a", "bob": "inst-b", "flooder": "f-1"}
	for i := range 150 {
		ids[fmt.Sprintf("honest%d", i)] = fmt.Sprintf("h-%d", i)
	}
	return ids
}

// startDynsecWorld is a gateway on a real Mosquitto with the
// dynamic-security file that the real `chatgw mosquitto-dynsec` writes for
// mosqUsers, every account bound to its client id; with ban, the gateway
// disables flooding devices' accounts.
func startDynsecWorld(t *testing.T, ban *FloodBan) *mosqWorld {
	t.Helper()
	mosquittotest.DynsecPlugin(t) // skips before building anything if missing
	dir := t.TempDir()
	bin := filepath.Join(dir, "chatgw")
	build := exec.Command("go", "build", "-o", bin, "./cmd/chatgw")
	build.Dir = proctest.ModuleRoot(t)
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building chatgw: %v\n%s", err, out)
	}
	var fleet strings.Builder
	for user, id := range dynsecClientIDs() {
		fmt.Fprintf(&fleet, "%s %s %s\n", user, id, mosqUsers[user])
	}
	fleetPath, gwPass, out := filepath.Join(dir, "fleet"), filepath.Join(dir, "gw.pass"), filepath.Join(dir, "dynsec.json")
	os.WriteFile(fleetPath, []byte(fleet.String()), 0o600)
	os.WriteFile(gwPass, []byte(mosqUsers["chatgw"]), 0o600)
	args := []string{"mosquitto-dynsec", "--fleet", fleetPath, "--gateway-client-id", dynsecGatewayID, "--gateway-password-file", gwPass, "--out", out}
	if ban != nil {
		args = append(args, "--gateway-ban-floods")
	}
	if msg, err := exec.Command(bin, args...).CombinedOutput(); err != nil {
		t.Fatalf("chatgw mosquitto-dynsec: %v\n%s", err, msg)
	}
	b := mosquittotest.Start(t, mosquittotest.Config{Shipped: true, Dynsec: out})
	w := startWorld(t, func(c *ServeConfig) {
		c.EmbeddedBroker = ""
		c.Broker = BrokerOptions{URL: b.URL(), ClientID: dynsecGatewayID, Username: "chatgw", Password: mosqUsers["chatgw"], FloodBan: ban}
	})
	w.broker = b.URL()
	return &mosqWorld{w, b}
}

// With the dynamic-security file, no device account takes over another
// account's client id or the gateway's: the CONNECT is refused, the holder
// stays connected, and the victim stays logged in with its session.
func TestHostileClientIDTakeoverMosquittoDynsec(t *testing.T) {
	w := startDynsecWorld(t, nil)
	a := w.dial("alice", "inst-a")
	res := request(t, a, mqtt.Message{Type: mqtt.TypeLogin, UserSig: w.sig("alice", time.Hour)})
	if res.Code != 0 {
		t.Fatalf("alice's login with her bound id: %+v", res)
	}
	for _, tc := range []struct{ name, user, id string }{
		{"bob as alice's client id", "bob", "inst-a"},
		{"bob as the gateway's client id", "bob", dynsecGatewayID},
		{"alice's own account as the gateway's client id", "alice", dynsecGatewayID},
		{"bob as the old default gateway id", "bob", "chatgw"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			att := startAttacker(t, w.b.Host(), w.b.Port(), tc.user, mosqUsers[tc.user], tc.id)
			if ok, out := att.refused(); !ok {
				t.Errorf("%s connected as %s", tc.user, tc.id)
				att.die()
			} else if !strings.Contains(out, "not authorised") {
				t.Errorf("refused with %q, want not authorised", out)
			}
		})
	}
	if n := strings.Count(w.b.Log(), "already connected, closing old connection"); n > 0 {
		t.Errorf("the broker closed a connection for a reused client id %d times", n)
	}
	if m := w.metrics(); !strings.Contains(m, "chatgw_broker_connected 1\n") {
		t.Errorf("gateway not connected:\n%s", grep(m, "broker_connected"))
	}
	victimIntact(t, w.world, a, res.Session)
	// A device with its own bound id logs in end to end.
	b := w.dial("bob", "inst-b")
	if r := request(t, b, mqtt.Message{Type: mqtt.TypeLogin, UserSig: w.sig("bob", time.Hour)}); r.Code != 0 {
		t.Errorf("bob's login with his bound id: %+v", r)
	}
}

// One device floods on Mosquitto with the dynamic-security plugin: the
// gateway disables its account, which disconnects it and refuses it until
// the ban is over; then it is enabled again. Honest devices log in
// throughout, and both steps are counted.
func TestHostileFloodMosquittoDynsec(t *testing.T) {
	ban := 3 * time.Second
	if testing.Short() {
		// Under emulation the flood and the honest logins outlast 3 s.
		ban = 30 * time.Second
	}
	w := startDynsecWorld(t, &FloodBan{Duration: ban})
	a := w.dial("alice", "inst-a")
	res := request(t, a, mqtt.Message{Type: mqtt.TypeLogin, UserSig: w.sig("alice", time.Hour)})
	fl := mosqRawClient(t, w.b, "flooder", "f-1")
	dial := func(user, inst string) (*mqtt.Conn, string) { return w.dial(user, inst), w.sig(user, time.Hour) }
	r := flood(t, w.world, fl, "chat/v1/up/flooder/f-1", mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin}), 10000, 2*time.Second, 20, dial)
	t.Logf("flooder sent %d before it was cut off; %d honest logins ok, %d failed; p50 %s p99 %s", r.sent, len(r.honest), r.failed, r.p(0.5), r.p(0.99))
	if r.failed > 0 || len(r.honest) == 0 {
		t.Errorf("%d honest logins failed, %d succeeded", r.failed, len(r.honest))
	}
	if fl.IsConnectionOpen() {
		t.Error("the flooder is still connected")
	}
	for _, want := range []string{`chatgw_flood_bans_total{action="disabled"} 1`, `chatgw_flood_bans_total{action="error"} 0`, "chatgw_broker_connected 1"} {
		if !strings.Contains(r.metrics, want+"\n") {
			t.Errorf("metrics lack %q:\n%s", want, grep(r.metrics, "flood_bans")+grep(r.metrics, "broker_connected"))
		}
	}
	if _, err := rawClient(t, w.b.URL(), "flooder", "f-1", mosqUsers["flooder"]); err == nil {
		t.Error("the flooder reconnected during its ban")
	} else {
		t.Logf("the flooder reconnecting during its ban: %v", err)
	}
	// The ban ends: the account is enabled again.
	var back paho.Client
	proctest.Wait(t, ban+5*time.Second, "the flooder's account enabled again", func() bool {
		c, err := rawClient(t, w.b.URL(), "flooder", "f-1", mosqUsers["flooder"])
		back = c
		return err == nil
	})
	back.Disconnect(0)
	if m := w.metrics(); !strings.Contains(m, `chatgw_flood_bans_total{action="enabled"} 1`+"\n") {
		t.Errorf("not counted:\n%s", grep(m, "flood_bans"))
	}
	victimIntact(t, w.world, a, res.Session)
}

// A ban outlives a gateway restart: the account stays disabled on the
// broker, marked with the ban's end, and the next run enables it on time.
func TestHostileFloodBanSurvivesGatewayRestart(t *testing.T) {
	// Long enough for the restart below under qemu's emulation, where
	// flooding, stopping and starting took over 4 s.
	const ban = 12 * time.Second
	w := startDynsecWorld(t, &FloodBan{Duration: ban})
	fl := mosqRawClient(t, w.b, "flooder", "f-1")
	for i := 0; i < 1000 && fl.IsConnectionOpen(); i++ {
		fl.Publish("chat/v1/up/flooder/f-1", 0, false, `{"type":"offline"}`)
		time.Sleep(time.Millisecond)
	}
	if fl.IsConnectionOpen() {
		t.Fatal("the flooder was not cut off")
	}
	cutOff := time.Now()
	w.stop()
	w.start()
	if took := time.Since(cutOff); took > ban/2 {
		t.Skipf("the restart took %v, too much of the %v ban to check that the restarted gateway keeps it", took, ban)
	}
	if _, err := rawClient(t, w.b.URL(), "flooder", "f-1", mosqUsers["flooder"]); err == nil {
		t.Error("the flooder reconnected during its ban, after the gateway's restart")
	}
	proctest.Wait(t, ban+5*time.Second, "the flooder's account enabled by the restarted gateway", func() bool {
		c, err := rawClient(t, w.b.URL(), "flooder", "f-1", mosqUsers["flooder"])
		if err == nil {
			c.Disconnect(0)
		}
		return err == nil
	})
	if m := w.metrics(); !strings.Contains(m, `chatgw_flood_bans_total{action="enabled"} 1`+"\n") {
		t.Errorf("the restarted gateway did not count the lifted ban:\n%s", grep(m, "flood_bans"))
	}
}
