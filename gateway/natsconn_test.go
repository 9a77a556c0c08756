package gateway

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/google/go-cmp/cmp"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"chatd/mqtt"
)

func TestNATSTopicMapping(t *testing.T) {
	for _, tc := range []struct{ topic, subject string }{
		{"chat/v1/up/alice/inst-a", "chat.v1.up.alice.inst-a"},
		{"chat/v1/up/a.b/i", "chat.v1.up.a//b.i"},
		{"chat/v1/up/.a./i", "chat.v1.up.//a//.i"},
		{"chat/v1/up/./i", "chat.v1.up.//.i"},
		{"chat/v1/up/a..b/i", "chat.v1.up.a////b.i"},
		{"chat/v1/down/a*b/i", "chat.v1.down.a*b.i"},
		{"chat/v1/down/>x/i", "chat.v1.down.>x.i"},
		{"chat/v1/down/~_-=$/i", "chat.v1.down.~_-=$.i"},
		{"acme.eu/v1/up/u/i", "acme//eu.v1.up.u.i"},
	} {
		t.Run(tc.topic, func(t *testing.T) {
			s, err := topicToSubject(tc.topic)
			if err != nil || s != tc.subject {
				t.Fatalf("topicToSubject = %q, %v; want %q", s, err, tc.subject)
			}
			back, err := subjectToTopic(s)
			if err != nil || back != tc.topic {
				t.Fatalf("subjectToTopic(%q) = %q, %v; want %q", s, back, err, tc.topic)
			}
		})
	}
	for _, topic := range []string{"chat/v1/up/*/i", "chat/v1/up/>/i", "chat/v1/up//i", "chat/v1/up/a b/i", "/chat", "chat/"} {
		if s, err := topicToSubject(topic); err == nil {
			t.Errorf("topicToSubject(%q) = %q, want an error", topic, s)
		}
	}
	// What no topic of the layout maps to (nats-server writes empty levels
	// with a single '/').
	for _, subj := range []string{"chat.v1.up.*.i", "chat.v1.up.>", "chat.v1.up./.i", "chat.v1.up.a/.i", "chat.v1.up.a///b.i", "chat..v1"} {
		if topic, err := subjectToTopic(subj); err == nil {
			t.Errorf("subjectToTopic(%q) = %q, want an error", subj, topic)
		}
	}
	if s, err := natsUpSubject(mqtt.Topics{Prefix: "acme.eu/chat"}); err != nil || s != "acme//eu.chat.v1.up.*.*" {
		t.Errorf("up subject = %q, %v", s, err)
	}
	if _, err := natsUpSubject(mqtt.Topics{Prefix: "acme/*"}); err == nil {
		t.Error("a prefix with a wildcard level was accepted")
	}
}

// freePort returns a loopback TCP port nobody listens on now.
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// natsNode is an in-process nats-server with JetStream and an MQTT
// listener on loopback.
type natsNode struct {
	s    *server.Server
	conf string
	nats string // nats://127.0.0.1:port
	mqtt string // tcp://127.0.0.1:port
}

// startNATSNode runs nats-server with conf (its listeners, server name and
// store are added here) until the test ends.
func startNATSNode(t *testing.T, conf string) *natsNode {
	t.Helper()
	dir := t.TempDir()
	np, mp := freePort(t), freePort(t)
	full := fmt.Sprintf("server_name: n1\nlisten: 127.0.0.1:%d\njetstream { store_dir: %q }\nmqtt { listen: 127.0.0.1:%d }\n%s\n", np, filepath.Join(dir, "js"), mp, conf)
	path := filepath.Join(dir, "nats.conf")
	if err := os.WriteFile(path, []byte(full), 0o600); err != nil {
		t.Fatal(err)
	}
	n := &natsNode{conf: path, nats: "nats://127.0.0.1:" + strconv.Itoa(np), mqtt: "tcp://127.0.0.1:" + strconv.Itoa(mp)}
	n.start(t)
	t.Cleanup(n.stop)
	return n
}

func (n *natsNode) start(t *testing.T) {
	t.Helper()
	opts, err := server.ProcessConfigFile(n.conf)
	if err != nil {
		t.Fatalf("nats config: %v", err)
	}
	opts.NoSigs = true
	s, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	if testing.Verbose() {
		s.ConfigureLogger()
	}
	s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server not ready within 10s")
	}
	n.s = s
}

func (n *natsNode) stop() {
	if n.s != nil {
		n.s.Shutdown()
		n.s.WaitForShutdown()
		n.s = nil
	}
}

// natsWorld is a gateway serving the devices of a NATS server.
func natsWorld(t *testing.T, n *natsNode, mod func(*ServeConfig)) *world {
	t.Helper()
	w := startWorld(t, func(c *ServeConfig) {
		c.EmbeddedBroker = ""
		c.NATS = NATSOptions{URLs: []string{n.nats}}
		if mod != nil {
			mod(c)
		}
	})
	w.broker = n.mqtt
	return w
}

func skipShort(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("starts nats-server (skipped with -short)")
	}
}

// Devices on the MQTT listener log in, are kicked and resume through a
// gateway on the NATS protocol, with UserIDs using every character the
// topic mapping transforms.
func TestServeNATSLoginKickResume(t *testing.T) {
	skipShort(t)
	n := startNATSNode(t, "")
	w := natsWorld(t, n, nil)
	if m := w.metrics(); !strings.Contains(m, "chatgw_broker_connected 1\n") {
		t.Errorf("not connected:\n%s", grep(m, "broker_connected"))
	}
	// Client ids are one namespace per NATS account: each device its own.
	for i, user := range []string{"alice", "a.b", ".dot.", "x-y_z", "k=v~", "a*b", "a>b", "$x", "..."} {
		t.Run(user, func(t *testing.T) {
			sig := w.sig(user, time.Hour)
			ia, ib := fmt.Sprintf("inst-a%d", i), fmt.Sprintf("inst-b%d", i)
			a := w.dial(user, ia, sig)
			ra := request(t, a, mqtt.Message{Type: mqtt.TypeLogin, UserSig: sig, Platform: "Linux"})
			if ra.Code != 0 {
				t.Fatalf("login: %+v", ra)
			}
			b := w.dial(user, ib, sig)
			if rb := request(t, b, mqtt.Message{Type: mqtt.TypeLogin, UserSig: sig, Platform: "Android"}); rb.Code != 0 {
				t.Fatalf("second login: %+v", rb)
			}
			if k := push(t, a, 5*time.Second); k.Type != mqtt.TypeKick || k.Session != ra.Session {
				t.Fatalf("push = %+v, want the kick of %s", k, ra.Session)
			}
			u := w.user(user)
			if len(u.Sessions) != 1 || u.Sessions[0].Instance != ib {
				t.Errorf("sessions of %q: %+v", user, u.Sessions)
			}
			if r := request(t, b, mqtt.Message{Type: mqtt.TypeResume, Session: u.Sessions[0].ID}); r.Code != 0 {
				t.Errorf("resume: %+v", r)
			}
		})
	}
}

// A UserID that is a NATS wildcard ("*", ">") breaks the subject layout:
// what comes from it is dropped and counted, and nobody is answered.
func TestServeNATSWildcardUserIDs(t *testing.T) {
	skipShort(t)
	n := startNATSNode(t, "")
	w := natsWorld(t, n, nil)
	victim := w.dial("alice", "inst-a", w.sig("alice", time.Hour))
	for i, user := range []string{"*", ">"} {
		c, err := rawClient(t, n.mqtt, user, fmt.Sprintf("wild%d", i), "x")
		if err != nil {
			t.Fatal(err)
		}
		got := make(chan string, 4)
		c.Subscribe("chat/v1/down/"+user+"/inst-a", 1, func(_ paho.Client, m paho.Message) { got <- m.Topic() }).WaitTimeout(5 * time.Second)
		c.Publish("chat/v1/up/"+user+"/inst-a", 1, false, mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "w", UserSig: w.sig(user, time.Hour)})).WaitTimeout(5 * time.Second)
		select {
		case m := <-got:
			t.Errorf("UserID %q was answered on %s", user, m)
		case <-time.After(time.Second):
		}
	}
	select {
	case m := <-victim.Pushes():
		t.Errorf("alice was sent %+v", m)
	default:
	}
	if u := w.user("alice"); len(u.Sessions) != 0 {
		t.Errorf("alice's sessions: %+v", u.Sessions)
	}
	m := w.metrics()
	if !strings.Contains(m, `chatgw_messages_dropped_total{reason="bad_topic"} 2`+"\n") {
		t.Errorf("wildcard UserIDs not dropped as bad_topic:\n%s", grep(m, "dropped"))
	}
	for _, l := range strings.Split(grep(m, "chatgw_logins_total{"), "\n") {
		if !strings.HasSuffix(l, " 0") {
			t.Errorf("a wildcard UserID was answered: %s", l)
		}
	}
}

// A device with a persistent session (clean session off) and a QoS 1
// subscription that is away when a kick is sent gets it when it comes
// back: the gateway stores downs in the MQTT message stream.
func TestServeNATSPersistentSessionGetsPushLater(t *testing.T) {
	skipShort(t)
	n := startNATSNode(t, "")
	w := natsWorld(t, n, nil)
	sig := w.sig("alice", time.Hour)
	got := make(chan mqtt.Message, 8)
	onMsg := func(_ paho.Client, m paho.Message) {
		if msg, err := mqtt.Decode(m.Payload()); err == nil {
			got <- msg
		}
	}
	connect := func() paho.Client {
		o := paho.NewClientOptions().AddBroker(n.mqtt).SetClientID("inst-p").SetUsername("alice").SetPassword(sig).
			SetCleanSession(false).SetAutoReconnect(false).SetDefaultPublishHandler(onMsg)
		c := paho.NewClient(o)
		if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("connect: %v", tok.Error())
		}
		return c
	}
	c := connect()
	if tok := c.Subscribe("chat/v1/down/alice/inst-p", 1, onMsg); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	c.Publish("chat/v1/up/alice/inst-p", 1, false, mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "l1", UserSig: sig, Platform: "Linux"}))
	var session string
	select {
	case r := <-got:
		if r.Type != mqtt.TypeLoginResult || r.Code != 0 {
			t.Fatalf("login: %+v", r)
		}
		session = r.Session
	case <-time.After(10 * time.Second):
		t.Fatal("no login answer")
	}
	c.Disconnect(100) // away, its session kept by NATS
	b := w.dial("alice", "inst-b", sig)
	if r := request(t, b, mqtt.Message{Type: mqtt.TypeLogin, UserSig: sig, Platform: "Android"}); r.Code != 0 {
		t.Fatalf("second login: %+v", r)
	}
	time.Sleep(300 * time.Millisecond) // the kick is out while inst-p is away
	c = connect()
	defer c.Disconnect(0)
	select {
	case k := <-got:
		if k.Type != mqtt.TypeKick || k.Session != session {
			t.Errorf("after coming back: %+v, want the kick of %s", k, session)
		}
	case <-time.After(10 * time.Second):
		t.Error("the kick sent while the device was away never arrived")
	}
	select {
	case m := <-got:
		t.Errorf("a second message: %+v", m)
	case <-time.After(500 * time.Millisecond):
	}
}

// Two gateways in one queue group share the logins: each handles some,
// every request is answered exactly once.
func TestServeNATSQueueGroupSharesLogins(t *testing.T) {
	skipShort(t)
	n := startNATSNode(t, "")
	w1 := natsWorld(t, n, nil)
	w2 := natsWorld(t, n, nil)
	const devices = 40
	var mu sync.Mutex
	answers := map[string]int{} // user -> answers seen
	var wg sync.WaitGroup
	for i := range devices {
		user := fmt.Sprintf("u%02d", i)
		c, err := rawClient(t, n.mqtt, user, "inst-"+user, "x")
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		var once sync.Once
		if tok := c.Subscribe("chat/v1/down/"+user+"/inst", 1, func(_ paho.Client, m paho.Message) {
			mu.Lock()
			answers[user]++
			mu.Unlock()
			once.Do(func() { close(done) })
		}); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
			t.Fatalf("subscribe: %v", tok.Error())
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.Publish("chat/v1/up/"+user+"/inst", 1, false, mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "1", UserSig: w1.sig(user, time.Hour), Platform: "Linux"}))
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				t.Errorf("%s: no answer", user)
			}
		}()
	}
	wg.Wait()
	time.Sleep(500 * time.Millisecond) // a duplicate answer would be on its way
	// The state is the cluster's: both gateways list the whole fleet, each
	// session once, while each counted only the logins it handled.
	for _, w := range []*world{w1, w2} {
		var l struct{ Sessions []Session }
		w.getJSON("/v1/sessions", &l)
		seen := map[string]bool{}
		for _, s := range l.Sessions {
			if seen[s.UserID] {
				t.Errorf("%s has two sessions", s.UserID)
			}
			seen[s.UserID] = true
		}
		if len(seen) != devices {
			t.Errorf("a gateway lists %d users' sessions, want %d", len(seen), devices)
		}
	}
	n1, n2 := loginsOK(t, w1.metrics()), loginsOK(t, w2.metrics())
	if n1 == 0 || n2 == 0 || n1+n2 != devices {
		t.Errorf("logins per gateway: %d and %d, want both > 0 and %d in all", n1, n2, devices)
	}
	want := map[string]int{}
	for i := range devices {
		want[fmt.Sprintf("u%02d", i)] = 1
	}
	mu.Lock()
	defer mu.Unlock()
	if diff := cmp.Diff(want, answers); diff != "" {
		t.Errorf("answers per device (-want +got):\n%s", diff)
	}
}

// waitFor polls cond until it holds or 15 s passed.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited 15s for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// The gateway rides out its NATS server going away: the gauge says so, it
// reconnects by itself when the server is back, and devices get answers
// again; the session made before is still there.
func TestServeNATSReconnects(t *testing.T) {
	skipShort(t)
	n := startNATSNode(t, "")
	w := natsWorld(t, n, nil)
	sig := w.sig("alice", time.Hour)
	a := w.dial("alice", "inst-a", sig)
	r := request(t, a, mqtt.Message{Type: mqtt.TypeLogin, UserSig: sig})
	if r.Code != 0 {
		t.Fatalf("login: %+v", r)
	}
	n.stop()
	waitFor(t, "chatgw_broker_connected 0", func() bool { return strings.Contains(w.metrics(), "chatgw_broker_connected 0\n") })
	n.start(t)
	waitFor(t, "chatgw_broker_connected 1", func() bool { return strings.Contains(w.metrics(), "chatgw_broker_connected 1\n") })
	a2 := w.dial("alice", "inst-a", sig)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	// The gateway's subscription is renewed on the reconnect; until then a
	// request is resent.
	res, err := a2.Request(ctx, mqtt.Message{Type: mqtt.TypeResume, Session: r.Session})
	if err != nil || res.Code != 0 {
		t.Fatalf("resume after the server came back: %+v %v", res, err)
	}
}

// writeTestPKI writes a CA and a certificate with key for 127.0.0.1 signed
// by it, for the server and the client, into dir.
func writeTestPKI(t *testing.T, dir string) (ca, cert, key string) {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}, KeyUsage: x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &k.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	ca, cert, key = filepath.Join(dir, "ca.pem"), filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	for p, b := range map[string][]byte{
		ca:   pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}),
		cert: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		key:  pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}),
	} {
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return ca, cert, key
}

// The gateway reaches a NATS server that requires TLS with a client
// certificate, with the CA, certificate and key the CLI loads.
func TestServeNATSTLS(t *testing.T) {
	skipShort(t)
	ca, cert, key := writeTestPKI(t, t.TempDir())
	n := startNATSNode(t, fmt.Sprintf("tls { cert_file: %q, key_file: %q, ca_file: %q, verify: true }", cert, key, ca))
	if nc, err := nats.Connect(strings.Replace(n.nats, "nats://", "tls://", 1), nats.RootCAs(ca), nats.NoReconnect()); err == nil {
		nc.Close()
		t.Fatal("the server took a client without a certificate: the test proves nothing")
	}
	tc, err := mqtt.LoadTLS(ca, cert, key)
	if err != nil {
		t.Fatal(err)
	}
	w := natsWorld(t, n, func(c *ServeConfig) {
		c.NATS = NATSOptions{URLs: []string{strings.Replace(n.nats, "nats://", "tls://", 1)}, TLS: tc}
	})
	sig := w.sig("alice", time.Hour)
	a := w.dial("alice", "inst-a", sig)
	if r := request(t, a, mqtt.Message{Type: mqtt.TypeLogin, UserSig: sig}); r.Code != 0 {
		t.Fatalf("login through a gateway on TLS: %+v", r)
	}
}

// loginsOK reads chatgw_logins_total{code="0"} from a metrics page.
func loginsOK(t *testing.T, metrics string) int {
	t.Helper()
	for _, line := range strings.Split(metrics, "\n") {
		if v, ok := strings.CutPrefix(line, `chatgw_logins_total{code="0"} `); ok {
			n, err := strconv.Atoi(v)
			if err != nil {
				t.Fatalf("metrics line %q: %v", line, err)
			}
			return n
		}
	}
	t.Fatal("no chatgw_logins_total{code=\"0\"} in the metrics")
	return 0
}

// NATSShard is part of the accounts' layout (chatgw nats-accounts places
// devices by it): its values must not change. These were computed with
// an independent FNV-1a.
func TestNATSShardIsStable(t *testing.T) {
	for _, tc := range []struct {
		user         string
		shards, want int
	}{
		{"alice", 2, 1}, {"bob", 2, 0}, {"mallory", 2, 1},
		{"alice", 3, 2}, {"bob", 3, 2}, {"mallory", 3, 1},
		{"alice", 4, 3}, {"bob", 4, 0}, {"mallory", 4, 1},
		{"alice", 1, 0}, {"alice", 0, 0},
	} {
		if got := NATSShard(tc.user, tc.shards); got != tc.want {
			t.Errorf("NATSShard(%q, %d) = %d, want %d", tc.user, tc.shards, got, tc.want)
		}
	}
	if got := NATSShardUser("chatgw", 0); got != "chatgw" {
		t.Errorf("shard 0's user %q", got)
	}
	if got := NATSShardUser("chatgw", 7); got != "chatgw-7" {
		t.Errorf("shard 7's user %q", got)
	}
}

// Devices spread over three accounts (each with MQTT streams of its own)
// log in through one gateway connected to all three, and the kick of a
// second login reaches the first instance in its own account. A device
// put in another account than its UserID's shard is not answered: its
// message is dropped, counted and logged.
func TestServeNATSShardedAccounts(t *testing.T) {
	skipShort(t)
	const shards = 3
	users := []string{"u00", "u01", "u02", "u03", "u04", "u05", "u06", "u07", "u08"}
	perShard := make([][]string, shards)
	for _, u := range users {
		perShard[NATSShard(u, shards)] = append(perShard[NATSShard(u, shards)], u)
	}
	stray := "stray"
	strayAt := (NATSShard(stray, shards) + 1) % shards
	var conf strings.Builder
	conf.WriteString("accounts {\n")
	for i := range shards {
		fmt.Fprintf(&conf, "  A%d { jetstream: enabled, users: [{user: %q, password: gw-secret}", i, NATSShardUser("gw", i))
		devs := perShard[i]
		if i == strayAt {
			devs = append(devs, stray)
		}
		for _, u := range devs {
			fmt.Fprintf(&conf, ", {user: %q, password: %q}", u, u+"-password")
		}
		conf.WriteString("] }\n")
	}
	conf.WriteString("}\n")
	for i, us := range perShard {
		if len(us) == 0 {
			t.Fatalf("no user of the test is in shard %d: pick others", i)
		}
	}
	n := startNATSNode(t, conf.String())
	var logs lockedBuffer
	w := natsWorld(t, n, func(c *ServeConfig) {
		c.NATS.User, c.NATS.Password, c.NATS.Shards = "gw", "gw-secret", shards
		c.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	})
	type dev struct {
		c   paho.Client
		got chan mqtt.Message
	}
	dial := func(user, inst string) dev {
		t.Helper()
		c, err := rawClient(t, n.mqtt, user, inst, user+"-password")
		if err != nil {
			t.Fatalf("%s/%s: %v", user, inst, err)
		}
		d := dev{c: c, got: make(chan mqtt.Message, 8)}
		if tok := c.Subscribe("chat/v1/down/"+user+"/"+inst, 1, func(_ paho.Client, m paho.Message) {
			if r, err := mqtt.Decode(m.Payload()); err == nil {
				d.got <- r
			}
		}); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("subscribe: %v", tok.Error())
		}
		return d
	}
	next := func(d dev, what string) mqtt.Message {
		t.Helper()
		select {
		case m := <-d.got:
			return m
		case <-time.After(10 * time.Second):
			t.Fatalf("no %s", what)
			return mqtt.Message{}
		}
	}
	for _, u := range users {
		a, b := dial(u, "a-"+u), dial(u, "b-"+u)
		sig := w.sig(u, time.Hour)
		a.c.Publish("chat/v1/up/"+u+"/a-"+u, 1, false, mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "1", UserSig: sig, Platform: "Linux"}))
		ra := next(a, u+"'s first answer")
		if ra.Type != mqtt.TypeLoginResult || ra.Code != 0 {
			t.Fatalf("%s (shard %d): %+v", u, NATSShard(u, shards), ra)
		}
		b.c.Publish("chat/v1/up/"+u+"/b-"+u, 1, false, mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "2", UserSig: sig, Platform: "Linux"}))
		if rb := next(b, u+"'s second answer"); rb.Code != 0 {
			t.Fatalf("%s's second login: %+v", u, rb)
		}
		if k := next(a, u+"'s kick"); k.Type != mqtt.TypeKick || k.Session != ra.Session {
			t.Errorf("%s (shard %d): pushed %+v, want the kick of %s", u, NATSShard(u, shards), k, ra.Session)
		}
	}
	s := dial(stray, "s-1")
	s.c.Publish("chat/v1/up/"+stray+"/s-1", 1, false, mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "1", UserSig: w.sig(stray, time.Hour), Platform: "Linux"}))
	waitFor(t, "the stray device's message counted", func() bool {
		return strings.Contains(w.metrics(), `chatgw_messages_dropped_total{reason="wrong_shard"} 1`+"\n")
	})
	select {
	case m := <-s.got:
		t.Errorf("the device in the wrong account was answered: %+v", m)
	default:
	}
	if u := w.user(stray); len(u.Sessions) != 0 {
		t.Errorf("the stray device has sessions: %+v", u.Sessions)
	}
	if !strings.Contains(logs.String(), "another account than its UserID's shard") {
		t.Errorf("the log does not say why the stray device is dropped:\n%s", logs.String())
	}
	if strings.Contains(logs.String(), "gw-secret") {
		t.Error("the gateway's password reached its log")
	}

	// A gateway told another number of shards than the accounts have.
	serve := func(t *testing.T, shards int, until func(*lockedBuffer) bool) (error, string) {
		var logs lockedBuffer
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		done := make(chan error, 1)
		go func() {
			done <- Run(ctx, ServeConfig{
				Options: Options{Config: Config{SDKAppID: testAppID, Key: testKey}, Logger: slog.New(slog.NewTextHandler(&logs, nil))},
				NATS:    NATSOptions{URLs: []string{n.nats}, User: "gw", Password: "gw-secret", Shards: shards},
			})
		}()
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case err := <-done:
				return err, logs.String()
			case <-tick.C:
				if until != nil && until(&logs) {
					cancel()
					return <-done, logs.String()
				}
			case <-ctx.Done():
				t.Fatalf("the gateway with %d shards neither failed nor logged in 30 s:\n%s", shards, logs.String())
			}
		}
	}
	t.Run("more shards than accounts", func(t *testing.T) {
		err, _ := serve(t, shards+1, nil)
		if err == nil || !strings.Contains(err.Error(), "user gw-3") || !strings.Contains(err.Error(), "--shards 4") {
			t.Errorf("Run returned %v, want the refused user gw-3 named", err)
		}
	})
	t.Run("fewer shards than accounts", func(t *testing.T) {
		err, log := serve(t, shards-1, func(l *lockedBuffer) bool { return strings.Contains(l.String(), "beyond nats_shards") })
		if err != nil {
			t.Errorf("Run returned %v", err)
		}
		if !strings.Contains(log, "user=gw-2") {
			t.Errorf("the log does not name the extra shard's user:\n%s", log)
		}
	})
}

// lockedBuffer is a bytes.Buffer for a logger written from goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
