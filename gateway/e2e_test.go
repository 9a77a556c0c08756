package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"chatd/mqtt"
	"chatd/usersig"
)

// world is a gateway with its embedded broker on a free loopback port.
type world struct {
	t      *testing.T
	broker string // tcp://127.0.0.1:port
	admin  string // http://127.0.0.1:port
	state  string
	cancel context.CancelFunc
	done   chan error
	cfg    ServeConfig
}

func testLogger(t *testing.T) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

func startWorld(t *testing.T, mod func(*ServeConfig)) *world {
	t.Helper()
	w := &world{t: t, state: filepath.Join(t.TempDir(), "gw.db")}
	w.cfg = ServeConfig{
		Options: Options{
			Config:    Config{SDKAppID: testAppID, Key: testKey},
			StatePath: w.state,
			Logger:    testLogger(t),
		},
		EmbeddedBroker: "127.0.0.1:0",
		Admin:          "127.0.0.1:0",
	}
	if mod != nil {
		mod(&w.cfg)
	}
	w.start()
	t.Cleanup(w.stop)
	return w
}

func (w *world) start() {
	w.t.Helper()
	ready := make(chan [2]net.Addr, 1)
	cfg := w.cfg
	cfg.Ready = func(b, a net.Addr) { ready <- [2]net.Addr{b, a} }
	ctx, cancel := context.WithCancel(context.Background())
	w.cancel = cancel
	w.done = make(chan error, 1)
	go func() { w.done <- Run(ctx, cfg) }()
	select {
	case addrs := <-ready:
		if addrs[0] != nil { // nil: an external broker
			w.broker = "tcp://" + addrs[0].String()
			// Restart on the same port next time.
			w.cfg.EmbeddedBroker = addrs[0].String()
		}
		w.admin = "http://" + addrs[1].String()
		w.cfg.Admin = addrs[1].String()
	case err := <-w.done:
		w.t.Fatalf("gateway did not start: %v", err)
	case <-time.After(10 * time.Second):
		w.t.Fatal("gateway did not start within 10s")
	}
}

func (w *world) stop() {
	if w.cancel == nil {
		return
	}
	w.cancel()
	select {
	case err := <-w.done:
		if err != nil {
			w.t.Errorf("gateway returned %v", err)
		}
	case <-time.After(30 * time.Second):
		// A bound on a stall, not on speed: the race detector on a busy
		// machine has taken over 10 s.
		buf := make([]byte, 1<<20)
		w.t.Errorf("gateway did not stop within 30s; goroutines:\n%s", buf[:runtime.Stack(buf, true)])
	}
	w.cancel = nil
}

func (w *world) sig(user string, lifetime time.Duration) string {
	s, err := usersig.Generate(testAppID, testKey, user, lifetime, time.Now())
	if err != nil {
		w.t.Fatal(err)
	}
	return s
}

func (w *world) dial(user, instance, sig string) *mqtt.Conn {
	w.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := mqtt.Dial(ctx, mqtt.DialOptions{Brokers: []string{w.broker}, Topics: mqtt.Topics{}, UserID: user, Instance: instance, UserSig: sig})
	if err != nil {
		w.t.Fatalf("dial %s/%s: %v", user, instance, err)
	}
	w.t.Cleanup(func() { c.Close(false) })
	return c
}

func request(t *testing.T, c *mqtt.Conn, m mqtt.Message) mqtt.Message {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := c.Request(ctx, m)
	if err != nil {
		t.Fatalf("%s: %v", m.Type, err)
	}
	return r
}

func push(t *testing.T, c *mqtt.Conn, within time.Duration) mqtt.Message {
	t.Helper()
	select {
	case m := <-c.Pushes():
		return m
	case <-time.After(within):
		t.Fatalf("no push within %s", within)
	}
	return mqtt.Message{}
}

func (w *world) getJSON(path string, v any) {
	w.t.Helper()
	resp, err := http.Get(w.admin + path)
	if err != nil {
		w.t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		w.t.Fatalf("GET %s: %s %s", path, resp.Status, b)
	}
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		w.t.Fatal(err)
	}
}

func (w *world) metrics() string {
	w.t.Helper()
	resp, err := http.Get(w.admin + "/metrics")
	if err != nil {
		w.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

func TestEmbeddedLoginKickResume(t *testing.T) {
	w := startWorld(t, nil)
	sig := w.sig("alice", time.Hour)
	a := w.dial("alice", "inst-a", sig)
	res := request(t, a, mqtt.Message{Type: mqtt.TypeLogin, UserID: "alice", UserSig: sig, Platform: "Linux"})
	if res.Code != 0 || res.Session == "" {
		t.Fatalf("login: %+v", res)
	}
	if d := time.Since(time.UnixMilli(res.ServerTimeMs)); d < -time.Second || d > 5*time.Second {
		t.Errorf("server time is off by %s", d)
	}

	var user struct {
		State    string    `json:"state"`
		Sessions []Session `json:"sessions"`
	}
	w.getJSON("/v1/users/alice", &user)
	if user.State != "online" || len(user.Sessions) != 1 || user.Sessions[0].ID != res.Session {
		t.Fatalf("admin user view: %+v", user)
	}

	// A second instance on another platform kicks the first (single-platform).
	b := w.dial("alice", "inst-b", sig)
	resB := request(t, b, mqtt.Message{Type: mqtt.TypeLogin, UserID: "alice", UserSig: sig, Platform: "Android"})
	if resB.Code != 0 {
		t.Fatalf("second login: %+v", resB)
	}
	k := push(t, a, 5*time.Second)
	if k.Type != mqtt.TypeKick || k.Session != res.Session || k.Code != 6208 || k.ByPlatform != "Android" {
		t.Fatalf("kick = %+v", k)
	}
	// The kicked session cannot be resumed.
	if r := request(t, a, mqtt.Message{Type: mqtt.TypeResume, Session: res.Session}); r.Code != 6208 {
		t.Errorf("resume of a kicked session: %+v", r)
	}

	// Gateway and broker restart; b resumes without a login and kicks nobody.
	w.stop()
	select {
	case <-b.Lost():
	case <-time.After(5 * time.Second):
		t.Fatal("device did not notice the broker going away")
	}
	w.start()
	b2 := w.dial("alice", "inst-b", sig)
	r := request(t, b2, mqtt.Message{Type: mqtt.TypeResume, Session: resB.Session})
	if r.Code != 0 || r.UserSigExpiresAt == 0 || r.ServerTimeMs == 0 {
		t.Fatalf("resume after restart: %+v", r)
	}
	m := w.metrics()
	for _, want := range []string{`chatgw_resumes_total{code="0"} 1`, `chatgw_sessions_active 1`, `chatgw_sessions_online 1`, `chatgw_daily_active_users 1`} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %q:\n%s", want, m)
		}
	}
}

func TestEmbeddedExpiryNotice(t *testing.T) {
	w := startWorld(t, nil)
	sig := w.sig("alice", 2*time.Second)
	a := w.dial("alice", "inst-a", sig)
	res := request(t, a, mqtt.Message{Type: mqtt.TypeLogin, UserSig: sig})
	if res.Code != 0 {
		t.Fatalf("login: %+v", res)
	}
	// The notice comes by timer; the device says nothing meanwhile.
	n := push(t, a, 10*time.Second)
	if n.Type != mqtt.TypeUserSigExpire || n.Session != res.Session || n.Code != 70001 {
		t.Fatalf("notice = %+v", n)
	}
	if !time.Now().After(time.Unix(res.UserSigExpiresAt, 0)) {
		t.Errorf("notice came before the expiry")
	}
	if r := request(t, a, mqtt.Message{Type: mqtt.TypeResume, Session: res.Session}); r.Code != 70001 {
		t.Errorf("resume after expiry: %+v", r)
	}
}

func TestEmbeddedAdminKick(t *testing.T) {
	w := startWorld(t, nil)
	sig := w.sig("alice", time.Hour)
	a := w.dial("alice", "inst-a", sig)
	res := request(t, a, mqtt.Message{Type: mqtt.TypeLogin, UserSig: sig})
	time.Sleep(1100 * time.Millisecond) // the kick revokes UserSigs issued in earlier seconds
	resp, err := http.Post(w.admin+"/v1/users/alice/kick", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	var kr struct {
		Kicked int `json:"kicked_sessions"`
	}
	json.NewDecoder(resp.Body).Decode(&kr)
	resp.Body.Close()
	if kr.Kicked != 1 {
		t.Errorf("kicked %d sessions, want 1", kr.Kicked)
	}
	if k := push(t, a, 5*time.Second); k.Type != mqtt.TypeKick || k.Reason != mqtt.KickAdmin || k.Session != res.Session {
		t.Fatalf("kick = %+v", k)
	}
	if r := request(t, a, mqtt.Message{Type: mqtt.TypeLogin, UserSig: sig}); r.Code != 70052 {
		t.Errorf("login with the revoked UserSig: %+v", r)
	}
	// The revocation survives a restart.
	w.stop()
	w.start()
	a2 := w.dial("alice", "inst-a", sig)
	if r := request(t, a2, mqtt.Message{Type: mqtt.TypeLogin, UserSig: sig}); r.Code != 70052 {
		t.Errorf("after restart, login with the revoked UserSig: %+v", r)
	}
	time.Sleep(1100 * time.Millisecond)
	fresh := w.sig("alice", time.Hour)
	if r := request(t, a2, mqtt.Message{Type: mqtt.TypeLogin, UserSig: fresh}); r.Code != 0 {
		t.Errorf("login with a fresh UserSig: %+v", r)
	}
}

// rawClient connects to the embedded broker with paho directly, to act as a
// misbehaving or hostile device.
func rawClient(t *testing.T, broker, user, clientID, password string) (paho.Client, error) {
	t.Helper()
	o := paho.NewClientOptions().AddBroker(broker).SetClientID(clientID).SetUsername(user).SetPassword(password).
		SetAutoReconnect(false).SetConnectTimeout(5 * time.Second)
	c := paho.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(10 * time.Second) {
		return nil, errors.New("connect timed out")
	}
	if tok.Error() != nil {
		return nil, tok.Error()
	}
	t.Cleanup(func() { c.Disconnect(0) })
	return c, nil
}

func TestEmbeddedBrokerConfinesDevices(t *testing.T) {
	w := startWorld(t, nil)
	aliceSig := w.sig("alice", time.Hour)
	bobSig := w.sig("bob", time.Hour)

	t.Run("connect refused", func(t *testing.T) {
		for _, tc := range []struct{ name, user, id, pass string }{
			{"no UserSig", "alice", "i1", ""},
			{"UserSig of another user", "alice", "i1", bobSig},
			{"garbage password", "alice", "i1", "hunter2"},
			{"bad user id", "a/b", "i1", aliceSig},
			{"client id with a slash", "alice", "i/1", aliceSig},
		} {
			t.Run(tc.name, func(t *testing.T) {
				if _, err := rawClient(t, w.broker, tc.user, tc.id, tc.pass); err == nil {
					t.Error("connected")
				}
			})
		}
	})

	// bob tries to reach alice's session; alice must see only the gateway.
	a := w.dial("alice", "inst-a", aliceSig)
	res := request(t, a, mqtt.Message{Type: mqtt.TypeLogin, UserSig: aliceSig})
	bob, err := rawClient(t, w.broker, "bob", "inst-b", bobSig)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan string, 10)
	tok := bob.Subscribe("chat/v1/down/alice/inst-a", 1, func(_ paho.Client, m paho.Message) { got <- string(m.Payload()) })
	tok.WaitTimeout(5 * time.Second)
	if st := tok.(*paho.SubscribeToken).Result()["chat/v1/down/alice/inst-a"]; st != 0x80 {
		t.Errorf("subscription to alice's topic granted with %#x", st)
	}
	// A forged logout and a forged kick from bob.
	bob.Publish("chat/v1/up/alice/inst-a", 1, false, mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogout, Session: res.Session})).WaitTimeout(5 * time.Second)
	bob.Publish("chat/v1/down/alice/inst-a", 1, false, mqtt.Encode(mqtt.Message{Type: mqtt.TypeKick, Session: res.Session})).WaitTimeout(5 * time.Second)
	// Messages are handled in order per client; a request of alice's own
	// after bob's forgeries shows they were dropped.
	if r := request(t, a, mqtt.Message{Type: mqtt.TypeResume, Session: res.Session}); r.Code != 0 {
		t.Errorf("alice's session was ended by bob: %+v", r)
	}
	select {
	case m := <-a.Pushes():
		t.Errorf("alice got a forged push: %+v", m)
	case m := <-got:
		t.Errorf("bob read alice's topic: %s", m)
	default:
	}
}

func TestEmbeddedBadInput(t *testing.T) {
	w := startWorld(t, nil)
	sig := w.sig("alice", time.Hour)
	a := w.dial("alice", "inst-a", sig)
	raw, err := rawClient(t, w.broker, "alice", "inst-raw", sig)
	if err != nil {
		t.Fatal(err)
	}
	replies := make(chan mqtt.Message, 10)
	raw.Subscribe("chat/v1/down/alice/inst-raw", 1, func(_ paho.Client, m paho.Message) {
		r, _ := mqtt.Decode(m.Payload())
		replies <- r
	}).WaitTimeout(5 * time.Second)
	for _, tc := range []struct {
		name    string
		payload []byte
		want    string // substring of the error's desc; "" = no reply
		id      string // the id the error must echo
	}{
		{"not JSON", []byte("{{{"), "bad protocol message", ""},
		{"no type", []byte(`{"id":"1"}`), "no \"type\"", "1"},
		{"unknown type", []byte(`{"type":"teleport","id":"2"}`), "unknown message type", "2"},
		{"type not a string", []byte(`{"type":5,"id":"3"}`), `field "type" must be a string`, "3"},
		{"code not a number", []byte(`{"type":"login","id":"4","code":"x"}`), `field "code" must be a number`, "4"},
		{"oversized", []byte(`{"type":"login","user_sig":"` + strings.Repeat("x", 20000) + `"}`), "limit is", ""},
		{"empty", nil, "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			raw.Publish("chat/v1/up/alice/inst-raw", 1, false, tc.payload).WaitTimeout(5 * time.Second)
			if tc.want == "" {
				return
			}
			select {
			case r := <-replies:
				if r.Type != mqtt.TypeError || r.Code != 6017 || !strings.Contains(r.Desc, tc.want) || r.ID != tc.id {
					t.Errorf("reply %+v, want error 6017 with id %q mentioning %q", r, tc.id, tc.want)
				}
				for _, goWord := range []string{"Go ", "struct", "mqtt.Message", "int64", "unmarshal"} {
					if strings.Contains(r.Desc, goWord) {
						t.Errorf("desc %q shows Go internals (%q)", r.Desc, goWord)
					}
				}
			case <-time.After(5 * time.Second):
				t.Error("no reply")
			}
		})
	}
	// The gateway still serves.
	if r := request(t, a, mqtt.Message{Type: mqtt.TypeLogin, UserSig: sig}); r.Code != 0 {
		t.Fatalf("login after bad input: %+v", r)
	}
	m := w.metrics()
	for _, want := range []string{`chatgw_messages_dropped_total{reason="malformed"}`, `chatgw_messages_dropped_total{reason="oversized"} 1`, `chatgw_logins_total{code="0"} 1`} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}
