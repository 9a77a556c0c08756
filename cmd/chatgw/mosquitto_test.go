package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"chatd/mqtt/mosquittotest"
)

// regexpAlreadyConnected is what Mosquitto logs when a connection takes a
// client id over.
var regexpAlreadyConnected = regexp.MustCompile("already connected, closing old connection")

const testGatewayID = "chatgw-0123456789abcdef01234567"

// dynsecFixture writes a fleet and the gateway's password and runs
// `chatgw mosquitto-dynsec` in-process; it returns the file written.
func dynsecFixture(t *testing.T, fleet string, extra ...string) string {
	t.Helper()
	dir := t.TempDir()
	fleetPath := filepath.Join(dir, "fleet")
	gwPass := filepath.Join(dir, "gw.pass")
	out := filepath.Join(dir, "dynamic-security.json")
	os.WriteFile(fleetPath, []byte(fleet), 0o600)
	os.WriteFile(gwPass, []byte("gw-secret\n"), 0o600)
	var stdout, stderr bytes.Buffer
	args := append([]string{"--fleet", fleetPath, "--gateway-client-id", testGatewayID, "--gateway-password-file", gwPass, "--out", out}, extra...)
	if err := mosquittoDynsec(args, &stdout, &stderr); err != nil {
		t.Fatalf("mosquitto-dynsec: %v\n%s", err, stderr.String())
	}
	if fi, err := os.Stat(out); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("written file: %v %v", fi, err)
	}
	return out
}

const testFleet = `# user client-id password
alice inst-a alice-pw
bob   inst-b bob-pw
`

func connect(t *testing.T, b *mosquittotest.Broker, user, clientID, password string) (paho.Client, error) {
	t.Helper()
	o := paho.NewClientOptions().AddBroker(b.URL()).SetClientID(clientID).SetUsername(user).SetPassword(password).
		SetAutoReconnect(false).SetConnectTimeout(5 * time.Second).SetProtocolVersion(4)
	lost := make(chan struct{})
	o.SetConnectionLostHandler(func(paho.Client, error) { close(lost) })
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

// receiver subscribes c to filter and returns what arrives.
func receiver(t *testing.T, c paho.Client, filter string) <-chan string {
	t.Helper()
	got := make(chan string, 16)
	tok := c.Subscribe(filter, 1, func(_ paho.Client, m paho.Message) { got <- m.Topic() + " " + string(m.Payload()) })
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribing to %s: %v", filter, tok.Error())
	}
	return got
}

func publish(t *testing.T, c paho.Client, topic, payload string) {
	t.Helper()
	if tok := c.Publish(topic, 1, false, payload); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("publishing to %s: %v", topic, tok.Error())
	}
}

func expect(t *testing.T, got <-chan string, want string) {
	t.Helper()
	select {
	case m := <-got:
		if m != want {
			t.Errorf("got %q, want %q", m, want)
		}
	case <-time.After(5 * time.Second):
		t.Errorf("%q did not arrive", want)
	}
}

func expectNothing(t *testing.T, got <-chan string, what string) {
	t.Helper()
	select {
	case m := <-got:
		t.Errorf("%s: %q arrived", what, m)
	case <-time.After(500 * time.Millisecond):
	}
}

// What the written file does on the real Mosquitto: every account is bound
// to its client id, so no device takes over another's id or the gateway's,
// and each device has its own two topics only.
func TestMosquittoDynsecOnRealBroker(t *testing.T) {
	b := mosquittotest.Start(t, mosquittotest.Config{Shipped: true, Dynsec: dynsecFixture(t, testFleet)})
	gw, err := connect(t, b, "chatgw", testGatewayID, "gw-secret")
	if err != nil {
		t.Fatalf("the gateway's account: %v", err)
	}
	gwGot := receiver(t, gw, "chat/v1/up/+/+")
	alice, err := connect(t, b, "alice", "inst-a", "alice-pw")
	if err != nil {
		t.Fatalf("alice with her own client id: %v", err)
	}
	aliceGot := receiver(t, alice, "chat/v1/down/alice/inst-a")

	t.Run("refused", func(t *testing.T) {
		for _, tc := range []struct{ name, user, id, pass string }{
			{"another device's client id", "bob", "inst-a", "bob-pw"},
			{"the gateway's client id", "bob", testGatewayID, "bob-pw"},
			{"the old default gateway id", "bob", "chatgw", "bob-pw"},
			{"a made-up client id", "bob", "inst-x", "bob-pw"},
			{"a wrong password", "alice", "inst-a", "bob-pw"},
			{"no account", "mallory", "inst-m", "x"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				mark := b.LogMark()
				if _, err := connect(t, b, tc.user, tc.id, tc.pass); err == nil || !strings.Contains(err.Error(), "not Authorized") {
					t.Errorf("connect: %v, want not authorised", err)
				}
				if b.WaitLog(mark, regexpAlreadyConnected, 300*time.Millisecond) {
					t.Errorf("the broker closed a connection for it:\n%s", b.Log()[mark:])
				}
			})
		}
		if !alice.IsConnectionOpen() || !gw.IsConnectionOpen() {
			t.Errorf("connected: alice %v, gateway %v", alice.IsConnectionOpen(), gw.IsConnectionOpen())
		}
	})

	t.Run("topics", func(t *testing.T) {
		bob, err := connect(t, b, "bob", "inst-b", "bob-pw")
		if err != nil {
			t.Fatalf("bob with his own client id: %v", err)
		}
		bobGot := receiver(t, bob, "chat/v1/down/bob/inst-b")
		// Denied subscriptions are acknowledged (MQTT 3.1.1 SUBACK 0x80 is
		// not reported by paho as an error): they deliver nothing.
		bobSpy := receiver(t, bob, "chat/v1/down/alice/inst-a")
		bobAll := receiver(t, bob, "chat/v1/up/+/+")

		publish(t, alice, "chat/v1/up/alice/inst-a", "login")
		expect(t, gwGot, "chat/v1/up/alice/inst-a login")
		publish(t, alice, "chat/v1/up/bob/inst-b", "forged")
		publish(t, alice, "chat/v1/up/alice/inst-other", "forged")
		publish(t, alice, "chat/v1/down/bob/inst-b", "forged kick")
		expectNothing(t, gwGot, "alice publishing outside her up topic")
		expectNothing(t, bobGot, "alice publishing on bob's down topic")

		publish(t, gw, "chat/v1/down/alice/inst-a", "result")
		expect(t, aliceGot, "chat/v1/down/alice/inst-a result")
		expectNothing(t, bobSpy, "bob subscribed to alice's down topic")
		publish(t, gw, "chat/v1/down/bob/inst-b", "result")
		expect(t, bobGot, "chat/v1/down/bob/inst-b result")
		expectNothing(t, bobAll, "bob subscribed to every up topic")
	})
}

// Why every account is bound: on Mosquitto 2.0 an account without a client
// id may use any id, and its connection closes the holder's. The file
// written never has such an account.
func TestMosquittoDynsecUnboundAccountTakesOver(t *testing.T) {
	path := dynsecFixture(t, testFleet)
	raw, _ := os.ReadFile(path)
	var f dynsecFile
	if err := json.Unmarshal(raw, &f); err != nil {
		t.Fatal(err)
	}
	for _, c := range f.Clients {
		if c.ClientID == "" {
			t.Fatalf("written account %q has no client id", c.Username)
		}
	}
	var m map[string]any
	json.Unmarshal(raw, &m)
	for _, c := range m["clients"].([]any) {
		if c := c.(map[string]any); c["username"] == "bob" {
			delete(c, "clientid")
		}
	}
	unbound, _ := json.Marshal(m)
	os.WriteFile(path, unbound, 0o600)
	b := mosquittotest.Start(t, mosquittotest.Config{Shipped: true, Dynsec: path})
	alice, err := connect(t, b, "alice", "inst-a", "alice-pw")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := connect(t, b, "bob", "inst-a", "bob-pw"); err != nil {
		t.Fatalf("the unbound account was refused (%v): then binding would not be needed", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for alice.IsConnectionOpen() && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if alice.IsConnectionOpen() {
		t.Error("alice kept her connection: an unbound account did not take her id over")
	}
}

func TestMosquittoDynsecRefusesBadFleets(t *testing.T) {
	dir := t.TempDir()
	gwPass := filepath.Join(dir, "gw.pass")
	os.WriteFile(gwPass, []byte("gw-secret\n"), 0o600)
	for _, tc := range []struct {
		name, fleet string
		args        []string
		want        string
	}{
		{"missing password", "alice inst-a\n", nil, "line 1 has 2 fields"},
		{"same user twice", "alice inst-a pw1\nalice inst-b pw2\n", nil, `username "alice" is already device 1`},
		{"same client id twice", "alice inst-a pw1\nbob inst-a pw2\n", nil, `client id "inst-a" is already bound to "alice"`},
		{"the gateway's client id", "alice " + testGatewayID + " pw1\n", nil, "is already bound to \"chatgw\""},
		{"the gateway's username", "chatgw inst-a pw1\n", nil, `username "chatgw" is already the gateway`},
		{"a client id with a dot", "alice inst.a pw1\n", nil, "client id: instance id \"inst.a\""},
		{"a bad user id", "a+b inst-a pw1\n", nil, "UserID \"a+b\""},
		{"empty", "# nobody\n", nil, "no devices"},
		{"short gateway id", "alice inst-a pw\n", []string{"--gateway-client-id", "chatgw"}, "guessable"},
		{"admin without client id", "alice inst-a pw\n", []string{"--admin-username", "admin", "--admin-password-file", gwPass}, "go together"},
		{"bad prefix", "alice inst-a pw\n", []string{"--topic-prefix", "a/#"}, "--topic-prefix"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fleet := filepath.Join(t.TempDir(), "fleet")
			os.WriteFile(fleet, []byte(tc.fleet), 0o600)
			args := append([]string{"--fleet", fleet, "--gateway-client-id", testGatewayID, "--gateway-password-file", gwPass}, tc.args...)
			var stdout, stderr bytes.Buffer
			err := mosquittoDynsec(args, &stdout, &stderr)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one saying %q", err, tc.want)
			}
			if strings.Contains(err.Error(), "pw1") || strings.Contains(err.Error(), "pw2") || stdout.Len() > 0 {
				t.Errorf("a password or output leaked: %v %q", err, stdout.String())
			}
		})
	}
}

// The real binary: the subcommand is registered, prints JSON on standard
// output without any password, and warns about a fleet file others can read.
func TestMosquittoDynsecCommand(t *testing.T) {
	dir := t.TempDir()
	fleet := filepath.Join(dir, "fleet")
	gwPass := filepath.Join(dir, "gw.pass")
	os.WriteFile(fleet, []byte(testFleet), 0o644)
	os.WriteFile(gwPass, []byte("gw-secret\n"), 0o600)
	out, errOut, code := chatgw(t, "mosquitto-dynsec", "--fleet", fleet, "--gateway-client-id", testGatewayID, "--gateway-password-file", gwPass)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	var f dynsecFile
	if err := json.Unmarshal([]byte(out), &f); err != nil || len(f.Clients) != 3 || len(f.Roles) != 3 {
		t.Fatalf("output %v: %s", err, out)
	}
	for _, pw := range []string{"alice-pw", "bob-pw", "gw-secret"} {
		if strings.Contains(out+errOut, pw) {
			t.Errorf("password %q in the output", pw)
		}
	}
	if !strings.Contains(errOut, "others may read it") {
		t.Errorf("no warning about a readable fleet file: %q", errOut)
	}
	_, _, code = chatgw(t, "mosquitto-dynsec", "--fleet", filepath.Join(dir, "none"), "--gateway-client-id", testGatewayID, "--gateway-password-file", gwPass)
	if code != exitConfig {
		t.Errorf("a missing fleet file: exit %d, want %d", code, exitConfig)
	}
}

// Why every device has a role of its own: Mosquitto 2.0's plugin takes %u
// and %c in its topics literally, so one shared role with the ACL
// template's patterns would grant nothing.
func TestMosquittoDynsecNoPatterns(t *testing.T) {
	path := dynsecFixture(t, testFleet)
	raw, _ := os.ReadFile(path)
	var f dynsecFile
	if err := json.Unmarshal(raw, &f); err != nil {
		t.Fatal(err)
	}
	for i, r := range f.Roles {
		if r.Rolename == "chatd-device:alice" {
			f.Roles[i].ACLs = []dynsecACL{
				{"publishClientSend", "chat/v1/up/%u/%c", true},
				{"subscribeLiteral", "chat/v1/down/%u/%c", true},
				{"publishClientReceive", "chat/v1/down/%u/%c", true},
			}
		}
	}
	patterned, _ := json.Marshal(f)
	os.WriteFile(path, patterned, 0o600)
	b := mosquittotest.Start(t, mosquittotest.Config{Shipped: true, Dynsec: path})
	gw, err := connect(t, b, "chatgw", testGatewayID, "gw-secret")
	if err != nil {
		t.Fatal(err)
	}
	gwGot := receiver(t, gw, "chat/v1/up/+/+")
	alice, err := connect(t, b, "alice", "inst-a", "alice-pw")
	if err != nil {
		t.Fatal(err)
	}
	aliceGot := receiver(t, alice, "chat/v1/down/alice/inst-a")
	publish(t, alice, "chat/v1/up/alice/inst-a", "login")
	expectNothing(t, gwGot, "a publish allowed only by a %u/%c pattern")
	publish(t, gw, "chat/v1/down/alice/inst-a", "result")
	expectNothing(t, aliceGot, "a subscription allowed only by a %u/%c pattern")
	// The control: bob's role spells his topics out, and they work.
	bob, err := connect(t, b, "bob", "inst-b", "bob-pw")
	if err != nil {
		t.Fatal(err)
	}
	publish(t, bob, "chat/v1/up/bob/inst-b", "login")
	expect(t, gwGot, "chat/v1/up/bob/inst-b login")
}

func TestServeDynsecFloodBanOption(t *testing.T) {
	key := writeFile(t, "key", testKeyText)
	base := fileConfig{SDKAppID: appID, KeyFile: key, Broker: "tcp://127.0.0.1:1883"}
	for _, tc := range []struct {
		name, ban, embedded string
		want                time.Duration
		err                 string
	}{
		{"off", "", "", 0, ""},
		{"a minute", "1m", "", time.Minute, ""},
		{"not a duration", "soon", "", 0, "use a positive duration"},
		{"negative", "-1m", "", 0, "use a positive duration"},
		{"on the embedded broker", "1m", "127.0.0.1:0", 0, "the embedded broker cuts off flooding devices itself"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fc := base
			fc.DynsecFloodBan = tc.ban
			if tc.embedded != "" {
				fc.Broker, fc.EmbeddedBroker = "", tc.embedded
			}
			cfg, err := buildServeConfig(fc)
			switch {
			case tc.err != "":
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Errorf("error %v, want one saying %q", err, tc.err)
				}
			case err != nil:
				t.Errorf("error %v", err)
			case tc.want == 0 && cfg.Broker.FloodBan != nil:
				t.Errorf("flood ban %+v, want off", cfg.Broker.FloodBan)
			case tc.want != 0 && (cfg.Broker.FloodBan == nil || cfg.Broker.FloodBan.Duration != tc.want):
				t.Errorf("flood ban %+v, want %s", cfg.Broker.FloodBan, tc.want)
			}
		})
	}
}
