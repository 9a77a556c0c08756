package main

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/crypto/bcrypt"

	"chatd/gateway"
	"chatd/internal/proctest"
	"chatd/mqtt"
)

// accountsFor runs chatgw nats-accounts (the real binary) on devices and
// returns the accounts file it wrote.
func accountsFor(t *testing.T, devices string, extra ...string) string {
	t.Helper()
	dir := t.TempDir()
	devFile := filepath.Join(dir, "devices")
	gwPass := filepath.Join(dir, "gw-pass")
	sysPass := filepath.Join(dir, "sys-pass")
	out := filepath.Join(dir, "accounts.conf")
	for p, s := range map[string]string{devFile: devices, gwPass: "gateway-secret\n", sysPass: "system-secret\n"} {
		if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	args := append([]string{"nats-accounts", "--devices", devFile, "--gateway-password-file", gwPass,
		"--system-password-file", sysPass, "--bcrypt-cost", "4", "--out", out}, extra...)
	stdout, stderr, code := chatgw(t, args...)
	if code != 0 {
		t.Fatalf("nats-accounts exit %d: %s", code, stderr)
	}
	if stdout != "" || strings.Contains(stderr, "secret") {
		t.Errorf("nats-accounts printed %q / %q", stdout, stderr)
	}
	st, err := os.Stat(out)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("accounts file mode %o, want 600", st.Mode().Perm())
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	for _, secret := range []string{"gateway-secret", "system-secret", "alice-password", "bob-password"} {
		if strings.Contains(string(b), secret) {
			t.Errorf("the accounts file holds the password %q", secret)
		}
	}
	return string(b)
}

// natsServer runs nats-server (in-process) with a loopback NATS port, an
// MQTT listener, JetStream, and the accounts file; the main configuration
// sets system_account as build/nats's does.
type natsServer struct {
	s          *server.Server
	nats, mqtt string // nats://host:port, tcp://host:port
	mqttPort   string
}

func startNATSServer(t *testing.T, accounts string) *natsServer {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "accounts.conf"), []byte(accounts), 0o600); err != nil {
		t.Fatal(err)
	}
	np, mp := proctest.FreePort(t), proctest.FreePort(t)
	conf := fmt.Sprintf("server_name: n1\nlisten: %s\njetstream { store_dir: %q }\nmqtt { listen: %s }\ninclude ./accounts.conf\nsystem_account: SYS\n", np, filepath.Join(dir, "js"), mp)
	path := filepath.Join(dir, "nats.conf")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	opts, err := server.ProcessConfigFile(path)
	if err != nil {
		t.Fatalf("nats-server refuses the configuration: %v", err)
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
	t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server not ready")
	}
	_, port, _ := net.SplitHostPort(mp)
	return &natsServer{s: s, nats: "nats://" + np, mqtt: "tcp://" + mp, mqttPort: port}
}

// parseAccounts has nats-server read an accounts file the way build/nats's
// configuration includes it.
func parseAccounts(t *testing.T, conf string) *server.Options {
	t.Helper()
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "accounts.conf"), []byte(conf), 0o600)
	main := filepath.Join(dir, "main.conf")
	os.WriteFile(main, []byte("include ./accounts.conf\nsystem_account: SYS\n"), 0o600)
	opts, err := server.ProcessConfigFile(main)
	if err != nil {
		t.Fatalf("nats-server refuses the accounts: %v\n%s", err, conf)
	}
	return opts
}

// The generated accounts parse in the real nats-server and say what the
// page promises: users, hashes, connection types, permissions.
func TestNATSAccountsConfig(t *testing.T) {
	devices := "# the fleet\nalice alice-password\n\nbob\tbob-password\na.b  pass-with spaces\nq\"uote\\x a-password\n"
	hash, err := bcrypt.GenerateFromPassword([]byte("hashed-password"), 4)
	if err != nil {
		t.Fatal(err)
	}
	devices += "pre-hashed " + string(hash) + "\n"
	opts := parseAccounts(t, accountsFor(t, devices, "--topic-prefix", "acme.eu"))
	users := map[string]*server.User{}
	for _, u := range opts.Users {
		users[u.Username] = u
	}
	want := map[string]string{"alice": "alice-password", "bob": "bob-password", "a.b": "pass-with spaces", `q"uote\x`: "a-password",
		"pre-hashed": "hashed-password", "chatgw": "gateway-secret", "sys": "system-secret"}
	if len(users) != len(want) {
		t.Errorf("users: %v", slices.Sorted(func(yield func(string) bool) {
			for k := range users {
				if !yield(k) {
					return
				}
			}
		}))
	}
	for name, pass := range want {
		u := users[name]
		if u == nil {
			t.Errorf("no user %q", name)
			continue
		}
		if !strings.HasPrefix(u.Password, "$2a$") || bcrypt.CompareHashAndPassword([]byte(u.Password), []byte(pass)) != nil {
			t.Errorf("user %q: password is not a bcrypt hash of its password: %q", name, u.Password)
		}
		wantAcc := "CHAT"
		if name == "sys" {
			wantAcc = "SYS"
		}
		if u.Account == nil || u.Account.Name != wantAcc {
			t.Errorf("user %q in account %v, want %s", name, u.Account, wantAcc)
		}
	}
	if u := users["a.b"]; u != nil {
		if got := u.Permissions.Publish.Allow; !slices.Equal(got, []string{"acme//eu.v1.up.a//b.*"}) {
			t.Errorf("a.b publishes to %q", got)
		}
		if got := u.Permissions.Subscribe.Allow; !slices.Equal(got, []string{"acme//eu.v1.down.a//b.*"}) {
			t.Errorf("a.b subscribes to %q", got)
		}
		if _, ok := u.AllowedConnectionTypes["MQTT"]; !ok || len(u.AllowedConnectionTypes) != 1 {
			t.Errorf("a.b connects over %v, want MQTT only", u.AllowedConnectionTypes)
		}
	}
	if u := users["chatgw"]; u != nil {
		if got := u.Permissions.Subscribe.Allow; !slices.Equal(got, []string{"acme//eu.v1.up.*.* chatgw", "_INBOX.>"}) {
			t.Errorf("the gateway subscribes to %q", got)
		}
		if _, ok := u.AllowedConnectionTypes["STANDARD"]; !ok || len(u.AllowedConnectionTypes) != 1 {
			t.Errorf("the gateway connects over %v, want STANDARD only", u.AllowedConnectionTypes)
		}
	}
}

// With --shards the devices go to the account of their UserID's shard
// (gateway.NATSShard), and each account has a gateway user of its own
// that may only take the up subjects in the queue group and send to the
// down subjects; the state bucket's API is shard 0's alone.
func TestNATSAccountsShards(t *testing.T) {
	conf := accountsFor(t, "alice alice-password\nbob bob-password\nmallory mallory-password\n", "--shards", "3")
	opts := parseAccounts(t, conf)
	got := map[string]string{}
	users := map[string]*server.User{}
	for _, u := range opts.Users {
		got[u.Username] = u.Account.Name
		users[u.Username] = u
	}
	// alice and bob hash to shard 2, mallory to 1; shard 0 has no device.
	want := map[string]string{"chatgw": "CHAT", "chatgw-1": "CHAT-1", "chatgw-2": "CHAT-2",
		"alice": "CHAT-2", "bob": "CHAT-2", "mallory": "CHAT-1", "sys": "SYS"}
	if !maps.Equal(got, want) {
		t.Errorf("users' accounts %v, want %v", got, want)
	}
	for _, name := range []string{"chatgw-1", "chatgw-2"} {
		u := users[name]
		if u == nil {
			continue
		}
		if bcrypt.CompareHashAndPassword([]byte(u.Password), []byte("gateway-secret")) != nil {
			t.Errorf("%s: not the gateways' password", name)
		}
		if p := u.Permissions.Publish.Allow; !slices.Equal(p, []string{"chat.v1.down.>", "$MQTT.msgs.chat.v1.down.>"}) {
			t.Errorf("%s publishes to %q, want the down subjects only", name, p)
		}
		if s := u.Permissions.Subscribe.Allow; !slices.Equal(s, []string{"chat.v1.up.*.* chatgw", "_INBOX.>"}) {
			t.Errorf("%s subscribes to %q", name, s)
		}
		if _, ok := u.AllowedConnectionTypes["STANDARD"]; !ok || len(u.AllowedConnectionTypes) != 1 {
			t.Errorf("%s connects over %v, want STANDARD only", name, u.AllowedConnectionTypes)
		}
	}
	if u := users["chatgw"]; u != nil && !slices.Contains(u.Permissions.Publish.Allow, "$KV.chatgw.>") {
		t.Errorf("shard 0's gateway user lost the bucket: %q", u.Permissions.Publish.Allow)
	}
	if n := strings.Count(conf, "jetstream: enabled"); n != 3 {
		t.Errorf("%d accounts with JetStream, want 3 (each shard's MQTT streams)\n%s", n, conf)
	}
}

func TestNATSAccountsErrors(t *testing.T) {
	pass := writeFile(t, "pass", "gateway-secret\n")
	for _, tc := range []struct {
		name    string
		devices string
		args    []string
		want    string
	}{
		{"wildcard UserID", "* a-password\n", nil, "cannot be confined on NATS"},
		{"full wildcard UserID", "> a-password\n", nil, "cannot be confined on NATS"},
		{"no password", "alice\n", nil, "has no password"},
		{"short password", "alice short\n", nil, "shorter than 8"},
		{"duplicate", "alice a-password\nalice b-password\n", nil, "already on line 1"},
		{"the gateway's name", "chatgw a-password\n", nil, "also the gateway user"},
		{"bad UserID", "al/ice a-password\n", nil, "line 1"},
		{"no devices", "# none\n", nil, "lists no device"},
		{"bad hash", "alice $2a$10$junk\n", nil, "not a valid one"},
		{"password as an argument", "alice a-password\n", []string{"gateway-secret"}, "takes no arguments"},
		{"bad queue", "alice a-password\n", []string{"--queue", "a b"}, "--queue"},
		{"no shards", "alice a-password\n", []string{"--shards", "0"}, "--shards 0: use 1 to 64"},
		{"too many shards", "alice a-password\n", []string{"--shards", "65"}, "--shards 65: use 1 to 64"},
		{"a shard's gateway name", "chatgw-1 a-password\n", []string{"--shards", "2"}, "also the gateway user of shard 1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev := writeFile(t, "devices", tc.devices)
			args := append([]string{"nats-accounts", "--devices", dev, "--gateway-password-file", pass, "--bcrypt-cost", "4"}, tc.args...)
			stdout, stderr, code := chatgw(t, args...)
			if code != exitConfig || !strings.Contains(stderr, tc.want) {
				t.Errorf("exit %d, stderr %q; want exit 2 mentioning %q", code, stderr, tc.want)
			}
			if stdout != "" {
				t.Errorf("wrote %q on a refusal", stdout)
			}
			if strings.Contains(stderr, "a-password") || strings.Contains(stderr, "gateway-secret") && tc.args == nil {
				t.Errorf("a password reached the error: %q", stderr)
			}
		})
	}
	if _, stderr, code := chatgw(t, "nats-accounts"); code != exitConfig || !strings.Contains(stderr, "--devices") {
		t.Errorf("no flags: exit %d %q", code, stderr)
	}
}

func TestServeNATSOptionErrors(t *testing.T) {
	keyFile := writeFile(t, "key", testKeyText)
	pass := writeFile(t, "pass", "pw-secret\n")
	base := []string{"serve", "--sdkappid", "1", "--key-file", keyFile}
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"nats and broker", []string{"--nats", "nats://127.0.0.1:4222", "--broker", "tcp://127.0.0.1:1883"}, "choose one of --nats, --broker and --embedded-broker"},
		{"nats and embedded", []string{"--nats", "nats://127.0.0.1:4222", "--embedded-broker", "127.0.0.1:0"}, "choose one of --nats, --broker and --embedded-broker"},
		{"nats option without nats", []string{"--embedded-broker", "127.0.0.1:0", "--nats-queue", "q"}, "nats_queue applies to a NATS cluster only"},
		{"broker option on nats", []string{"--nats", "nats://127.0.0.1:4222", "--broker-username", "x"}, "broker_username applies to an MQTT broker"},
		{"broker tls on nats", []string{"--nats", "nats://127.0.0.1:4222", "--tls-ca", keyFile}, "tls_ca applies to an MQTT broker"},
		{"bad url", []string{"--nats", "nats://127.0.0.1:4222,mqtt://b:1883"}, `"mqtt://b:1883" is not a server URL`},
		{"url with credentials", []string{"--nats", "nats://u:p@127.0.0.1:4222"}, "without credentials"},
		{"no port", []string{"--nats", "nats://a"}, "is not a server URL"},
		{"user without password", []string{"--nats", "nats://127.0.0.1:4222", "--nats-user", "chatgw"}, "go together"},
		{"two kinds of credentials", []string{"--nats", "nats://127.0.0.1:4222", "--nats-user", "chatgw", "--nats-password-file", pass, "--nats-creds", pass}, "use one of"},
		{"missing creds file", []string{"--nats", "nats://127.0.0.1:4222", "--nats-creds", "/nonexistent/creds"}, "/nonexistent/creds"},
		{"replicas", []string{"--nats", "nats://127.0.0.1:4222", "--nats-kv-replicas", "7"}, "1 to 5"},
		{"bucket", []string{"--nats", "nats://127.0.0.1:4222", "--nats-kv-bucket", "a.b"}, "nats_kv_bucket"},
		{"tls key without cert", []string{"--nats", "nats://127.0.0.1:4222", "--nats-tls-key", keyFile}, "set both or neither"},
		{"wildcard prefix", []string{"--nats", "nats://127.0.0.1:4222", "--topic-prefix", "a/*"}, "wildcard"},
		{"shards without nats", []string{"--embedded-broker", "127.0.0.1:0", "--nats-shards", "2"}, "nats_shards applies to a NATS cluster only"},
		{"shards with creds", []string{"--nats", "nats://127.0.0.1:4222", "--nats-creds", pass, "--nats-shards", "2"}, "need nats_user and nats_password_file"},
		{"too many shards", []string{"--nats", "nats://127.0.0.1:4222", "--nats-user", "chatgw", "--nats-password-file", pass, "--nats-shards", "65"}, "nats_shards 65: use 1 to 64"},
		{"no shards", []string{"--nats", "nats://127.0.0.1:4222", "--nats-shards", "0"}, "not a positive whole number"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, errOut, code := chatgw(t, append(base, tc.args...)...)
			if code != exitConfig || !strings.Contains(errOut, tc.want) {
				t.Errorf("exit %d, stderr %q; want exit 2 mentioning %q", code, errOut, tc.want)
			}
			if strings.Contains(errOut, "pw-secret") {
				t.Errorf("the password reached the error: %q", errOut)
			}
		})
	}
}

// natsFleet is a nats-server with the generated accounts and the real
// chatgw binary serving on it.
type natsFleet struct {
	t      *testing.T
	ns     *natsServer
	gw     *proctest.Proc
	admin  string
	shards int
}

var fleetPasswords = map[string]string{"alice": "alice-password", "bob": "bob-password", "mallory": "mallory-password"}

func startNATSFleet(t *testing.T) *natsFleet { t.Helper(); return startNATSFleetShards(t, 1) }

// startNATSFleetShards is startNATSFleet with the devices spread over
// shards accounts (nats-accounts --shards, serve --nats-shards).
func startNATSFleetShards(t *testing.T, shards int) *natsFleet {
	t.Helper()
	if testing.Short() {
		t.Skip("starts nats-server and chatgw (skipped with -short)")
	}
	var devices strings.Builder
	for _, u := range slices.Sorted(func(yield func(string) bool) {
		for k := range fleetPasswords {
			if !yield(k) {
				return
			}
		}
	}) {
		fmt.Fprintf(&devices, "%s %s\n", u, fleetPasswords[u])
	}
	ns := startNATSServer(t, accountsFor(t, devices.String(), "--shards", strconv.Itoa(shards)))
	keyFile := writeFile(t, "key", testKeyText)
	gwPass := writeFile(t, "gw-pass", "gateway-secret\n")
	admin := proctest.FreePort(t)
	gw := proctest.Start(t, proctest.Binary(t, "chatgw"), "serve", "--sdkappid", strconv.Itoa(appID), "--key-file", keyFile,
		"--nats", ns.nats, "--nats-user", "chatgw", "--nats-password-file", gwPass, "--nats-shards", strconv.Itoa(shards), "--admin", admin,
		"--state", filepath.Join(t.TempDir(), "state.db"))
	f := &natsFleet{t: t, ns: ns, gw: gw, admin: admin, shards: shards}
	proctest.Wait(t, 15*time.Second, "chatgw to be ready on NATS", func() bool {
		resp, err := http.Get("http://" + admin + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
	// docs/admin-api.md's readiness line, on NATS too.
	proctest.Wait(t, 5*time.Second, "the readiness line in chatgw's log", func() bool {
		return strings.Contains(gw.Log(), `msg="gateway ready: subscribed to the device topics" filter=chat/v1/up/+/+`)
	})
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("chatgw log:\n%s", gw.Log())
		}
		if strings.Contains(gw.Log(), "gateway-secret") {
			t.Error("the gateway's NATS password reached its log")
		}
	})
	return f
}

func (f *natsFleet) dial(user, instance string) *mqtt.Conn {
	f.t.Helper()
	return dialRetry(f.t, mqtt.DialOptions{Brokers: []string{f.ns.mqtt}, UserID: user, Instance: instance, Username: user, Password: fleetPasswords[user]})
}

func (f *natsFleet) metrics() string {
	f.t.Helper()
	resp, err := http.Get("http://" + f.admin + "/metrics")
	if err != nil {
		f.t.Fatal(err)
	}
	defer resp.Body.Close()
	var b strings.Builder
	buf := make([]byte, 32<<10)
	for {
		n, err := resp.Body.Read(buf)
		b.Write(buf[:n])
		if err != nil {
			break
		}
	}
	return b.String()
}

type fleetSession struct {
	ID       string `json:"id"`
	Instance string `json:"instance"`
	Online   bool   `json:"online"`
}

func (f *natsFleet) sessions(user string) []fleetSession {
	f.t.Helper()
	resp, err := http.Get("http://" + f.admin + "/v1/users/" + url.PathEscape(user))
	if err != nil {
		f.t.Fatal(err)
	}
	defer resp.Body.Close()
	var u struct {
		Sessions []fleetSession `json:"sessions"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&u); err != nil {
		f.t.Fatal(err)
	}
	return u.Sessions
}

// victim logs alice in on a fresh instance.
func (f *natsFleet) victim(t *testing.T, instance string) (*mqtt.Conn, string) {
	t.Helper()
	a := f.dial("alice", instance)
	r := requestRetry(t, a, mqtt.Message{Type: mqtt.TypeLogin, UserSig: sigFor(t, "alice", time.Hour), Platform: "Linux"})
	if r.Code != 0 {
		t.Fatalf("victim login: %+v", r)
	}
	return a, r.Session
}

// intact checks that the victim is still connected, was told nothing, and
// is logged in with session, online, and answered.
func (f *natsFleet) intact(t *testing.T, a *mqtt.Conn, instance, session string) {
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
	found := false
	for _, s := range f.sessions("alice") {
		if s.Instance == instance {
			found = true
			if s.ID != session || !s.Online {
				t.Errorf("the victim's session at the gateway: %+v, want %s online", s, session)
			}
		}
	}
	if !found {
		t.Errorf("the victim's session %s is gone: %+v", session, f.sessions("alice"))
	}
	if r := requestRetry(t, a, mqtt.Message{Type: mqtt.TypeResume, Session: session}); r.Code != 0 {
		t.Errorf("the victim's resume: %+v", r)
	}
}

// attacker is mallory's raw MQTT connection: what it receives is recorded,
// and it can be cut without a DISCONNECT (so that its Will goes out).
type attacker struct {
	c    paho.Client
	mu   sync.Mutex
	got  []string
	conn net.Conn
}

func (a *attacker) record(_ paho.Client, m paho.Message) {
	a.mu.Lock()
	a.got = append(a.got, m.Topic()+" "+string(m.Payload()))
	a.mu.Unlock()
}

func (a *attacker) received() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.got)
}

func (f *natsFleet) attacker(user, password, clientID string, opt func(*paho.ClientOptions)) (*attacker, error) {
	a := &attacker{}
	o := paho.NewClientOptions().AddBroker(f.ns.mqtt).SetClientID(clientID).SetUsername(user).SetPassword(password).
		SetAutoReconnect(false).SetConnectTimeout(5 * time.Second).SetDefaultPublishHandler(a.record).
		SetCustomOpenConnectionFn(func(u *url.URL, _ paho.ClientOptions) (net.Conn, error) {
			c, err := net.DialTimeout("tcp", u.Host, 5*time.Second)
			a.conn = c
			return c, err
		})
	if opt != nil {
		opt(o)
	}
	a.c = paho.NewClient(o)
	tok := a.c.Connect()
	if !tok.WaitTimeout(10 * time.Second) {
		return nil, fmt.Errorf("connect timed out")
	}
	if err := tok.Error(); err != nil {
		return nil, err
	}
	f.t.Cleanup(func() { a.c.Disconnect(0) })
	return a, nil
}

func (f *natsFleet) mallory(clientID string, opt func(*paho.ClientOptions)) *attacker {
	f.t.Helper()
	a, err := f.attacker("mallory", fleetPasswords["mallory"], clientID, opt)
	if err != nil {
		f.t.Fatalf("mallory's own connection: %v", err)
	}
	return a
}

// subscribe reports the broker's SUBACK codes.
func (a *attacker) subscribe(t *testing.T, filter string) byte {
	t.Helper()
	tok := a.c.Subscribe(filter, 1, a.record)
	if !tok.WaitTimeout(5 * time.Second) {
		t.Fatalf("subscribe %s timed out", filter)
	}
	if st, ok := tok.(*paho.SubscribeToken); ok {
		return st.Result()[filter]
	}
	return 0
}

func kickFor(session string) []byte {
	return mqtt.Encode(mqtt.Message{Type: mqtt.TypeKick, Session: session, Code: 6208, Reason: mqtt.KickAdmin})
}

// The hostile-device suite on NATS with the accounts chatgw nats-accounts
// writes: each attack of a device account (mallory) against another
// (alice) leaves alice logged in, connected and told nothing forged, and
// gives mallory nothing of alice's. With three shards mallory (shard 1)
// and alice (shard 2) are in accounts of their own.
func TestNATSHostileDevices(t *testing.T) {
	for _, shards := range []int{1, 3} {
		t.Run(fmt.Sprintf("shards=%d", shards), func(t *testing.T) { hostileDevicesOnNATS(t, startNATSFleetShards(t, shards)) })
	}
}

func hostileDevicesOnNATS(t *testing.T, f *natsFleet) {
	own := "chat/v1/up/mallory/mal-0"
	for i, tc := range []struct {
		name   string
		attack func(t *testing.T, session string)
	}{
		{"publish on another user's up topic", func(t *testing.T, session string) {
			m := f.mallory("mal-pub", nil)
			for _, msg := range []mqtt.Message{{Type: mqtt.TypeLogout, ID: "x", Session: session}, {Type: mqtt.TypeOffline}} {
				m.c.Publish("chat/v1/up/alice/inst-1", 1, false, mqtt.Encode(msg)).WaitTimeout(5 * time.Second)
			}
		}},
		{"subscribe to another user's down topic and wildcards", func(t *testing.T, session string) {
			m := f.mallory("mal-sub", nil)
			for _, filter := range []string{"chat/v1/down/alice/inst-2", "chat/v1/down/alice/+", "chat/v1/down/+/+", "chat/v1/down/#", "chat/#", "#", "+/v1/down/alice/inst-2",
				"$MQTT/sub/#", "$MQTT/msgs/#", "chat/v1/up/alice/inst-2"} {
				if code := m.subscribe(t, filter); code != 0x80 {
					t.Errorf("SUBACK for %s: %#x, want 0x80 (refused)", filter, code)
				}
			}
			// Alice gets answers; mallory must see none of them.
			t.Cleanup(func() {
				if got := m.received(); len(got) > 0 {
					t.Errorf("mallory received %q", got)
				}
			})
		}},
		{"a Will on another user's up topic", func(t *testing.T, session string) {
			m, err := f.attacker("mallory", fleetPasswords["mallory"], "mal-will", func(o *paho.ClientOptions) {
				o.SetBinaryWill("chat/v1/up/alice/inst-3", mqtt.Encode(mqtt.Message{Type: mqtt.TypeOffline}), 1, false)
			})
			if err != nil {
				t.Logf("refused at CONNECT: %v", err)
				return
			}
			m.conn.Close() // no DISCONNECT: the server sends the Will
			time.Sleep(500 * time.Millisecond)
		}},
		{"a Will on another user's down topic", func(t *testing.T, session string) {
			m, err := f.attacker("mallory", fleetPasswords["mallory"], "mal-will2", func(o *paho.ClientOptions) {
				o.SetBinaryWill("chat/v1/down/alice/inst-4", kickFor(session), 1, true)
			})
			if err != nil {
				t.Logf("refused at CONNECT: %v", err)
				return
			}
			m.conn.Close()
			time.Sleep(500 * time.Millisecond)
		}},
		{"retained publishes", func(t *testing.T, session string) {
			m := f.mallory("mal-ret", nil)
			m.c.Publish("chat/v1/down/alice/inst-5", 1, true, kickFor(session)).WaitTimeout(5 * time.Second)
			m.c.Publish("chat/v1/up/alice/inst-5", 1, true, mqtt.Encode(mqtt.Message{Type: mqtt.TypeOffline})).WaitTimeout(5 * time.Second)
			// Its own up topic takes a retained message (nats-server keeps
			// it), which is carried out once and never replayed to anyone
			// but MQTT subscribers of up topics, which no device can be.
			m.c.Publish(own, 1, true, mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "r", UserSig: sigFor(t, "mallory", time.Hour)})).WaitTimeout(5 * time.Second)
			time.Sleep(500 * time.Millisecond)
			// Mallory's retained login was carried out once (one session).
			if ss := f.sessions("mallory"); len(ss) != 1 {
				t.Errorf("mallory's sessions: %+v, want the one of the retained login", ss)
			}
			// A new connection of alice's subscribes to her down topic: no
			// retained forgery comes with it.
			b := f.dial("alice", "inst-5b")
			select {
			case msg := <-b.Pushes():
				t.Errorf("alice's new connection was sent %+v", msg)
			case <-time.After(time.Second):
			}
		}},
		{"publish to NATS-internal subjects", func(t *testing.T, session string) {
			m := f.mallory("mal-int", nil)
			for _, topic := range []string{"$MQTT/msgs/chat/v1/down/alice/inst-6", "$JS/API/STREAM/DELETE/KV_chatgw", "$JS/API/STREAM/LIST",
				"$KV/chatgw/alice", "$MQTT/sess/x", "$SYS/REQ/SERVER/PING", "_INBOX/x"} {
				m.c.Publish(topic, 1, false, kickFor(session)).WaitTimeout(5 * time.Second)
			}
			time.Sleep(500 * time.Millisecond)
		}},
		{"a device account on the NATS protocol", func(t *testing.T, session string) {
			nc, err := nats.Connect(f.ns.nats, nats.UserInfo("mallory", fleetPasswords["mallory"]), nats.NoReconnect(), nats.Timeout(5*time.Second))
			if err == nil {
				nc.Close()
				t.Error("mallory connected over the NATS protocol")
			} else {
				t.Logf("refused: %v", err)
			}
		}},
		{"the gateway's user without its password", func(t *testing.T, session string) {
			if nc, err := nats.Connect(f.ns.nats, nats.UserInfo("chatgw", "guess"), nats.NoReconnect(), nats.Timeout(5*time.Second)); err == nil {
				nc.Close()
				t.Error("connected as chatgw with a wrong password")
			}
			if nc, err := nats.Connect(f.ns.nats, nats.UserInfo("chatgw", fleetPasswords["mallory"]), nats.NoReconnect(), nats.Timeout(5*time.Second)); err == nil {
				nc.Close()
				t.Error("connected as chatgw with mallory's password")
			}
			if _, err := f.attacker("chatgw", "guess", "mal-gw", nil); err == nil {
				t.Error("connected over MQTT as chatgw with a wrong password")
			}
			// Even with its password, the gateway's user is no MQTT device,
			// in any shard's account.
			for i := range f.shards {
				name := gateway.NATSShardUser("chatgw", i)
				if _, err := f.attacker(name, "gateway-secret", "mal-gw2-"+strconv.Itoa(i), nil); err == nil {
					t.Errorf("connected over MQTT as the gateway's user %s", name)
				}
				if nc, err := nats.Connect(f.ns.nats, nats.UserInfo(name, "guess"), nats.NoReconnect(), nats.Timeout(5*time.Second)); err == nil {
					nc.Close()
					t.Errorf("connected as %s with a wrong password", name)
				}
			}
			if _, err := f.attacker("alice", fleetPasswords["mallory"], "mal-as-alice", nil); err == nil {
				t.Error("connected as alice with mallory's password")
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			inst := fmt.Sprintf("inst-%d", i+1)
			a, session := f.victim(t, inst)
			tc.attack(t, session)
			f.intact(t, a, inst, session)
		})
	}
	if m := f.metrics(); !strings.Contains(m, "chatgw_broker_connected 1\n") {
		t.Errorf("the gateway is not connected:\n%s", m)
	}
	// A restarted gateway does not carry out mallory's retained login again
	// (nats-server replays retained messages to MQTT subscriptions only).
	before := f.sessions("mallory")
	if code := f.gw.Stop(); code != 0 {
		t.Errorf("chatgw exited %d on SIGTERM", code)
	}
	f.gw.Start()
	proctest.Wait(t, 15*time.Second, "chatgw to be ready again", func() bool {
		resp, err := http.Get("http://" + f.admin + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
	time.Sleep(500 * time.Millisecond)
	if after := f.sessions("mallory"); len(after) != 1 || len(before) != 1 || after[0].ID != before[0].ID {
		t.Errorf("mallory's sessions before the restart %+v, after %+v", before, after)
	}
}

// build/nats/accounts-example.conf is what nats-accounts writes, and
// nats-server takes it.
func TestNATSAccountsExample(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "..", "build", "nats", "accounts-example.conf"))
	if err != nil {
		t.Fatal(err)
	}
	opts := parseAccounts(t, string(b))
	var names []string
	for _, u := range opts.Users {
		names = append(names, u.Username)
	}
	slices.Sort(names)
	if want := []string{"chatgw", "dev-41", "dev-42", "sys"}; !slices.Equal(names, want) {
		t.Errorf("users %v, want %v", names, want)
	}
}

// On NATS an MQTT client id is one namespace for the whole account: a
// device that connects with another device's client id (its instance id)
// closes that device's connection (MQTT's rule, which nats-server applies
// without asking whose the id is). What it does not get: the victim's
// session at the gateway, which survives and is resumed when the victim
// comes back, and any of the victim's messages.
func TestNATSHostileClientIDTakeover(t *testing.T) {
	f := startNATSFleet(t)
	a, session := f.victim(t, "inst-t")
	m := f.mallory("inst-t", nil)
	for _, filter := range []string{"chat/v1/down/alice/inst-t", "chat/v1/down/mallory/inst-t"} {
		m.subscribe(t, filter)
	}
	select {
	case <-a.Lost():
		t.Logf("the victim's connection was closed, as NATS does: %v", a.Err())
	case <-time.After(5 * time.Second):
		t.Error("the victim kept its connection (then the attacker's failed; either way nothing leaks)")
	}
	m.c.Disconnect(0)
	time.Sleep(1200 * time.Millisecond) // nats-server jails a flapping client id for a second
	b := f.dial("alice", "inst-t")
	if r := requestRetry(t, b, mqtt.Message{Type: mqtt.TypeResume, Session: session}); r.Code != 0 {
		t.Errorf("the victim's resume after the takeover: %+v", r)
	}
	if got := m.received(); len(got) > 0 {
		t.Errorf("the attacker received %q", got)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := b.Request(ctx, mqtt.Message{Type: mqtt.TypeResume, Session: session}); err != nil {
		t.Errorf("a second resume: %v", err)
	}
}

// The gateways' user can do with its key-value bucket what a shared state
// needs (create it, read, write with compare-and-set, delete, watch, list)
// and cannot touch the MQTT listener's streams or another bucket.
func TestNATSAccountsGatewayKV(t *testing.T) {
	if testing.Short() {
		t.Skip("starts nats-server (skipped with -short)")
	}
	ns := startNATSServer(t, accountsFor(t, "alice alice-password\n"))
	nc, err := nats.Connect(ns.nats, nats.UserInfo("chatgw", "gateway-secret"), nats.NoReconnect())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	kv, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "chatgw", History: 1})
	if err != nil {
		t.Fatalf("creating the bucket: %v", err)
	}
	if _, err := js.KeyValue(ctx, "chatgw"); err != nil {
		t.Fatalf("opening the bucket: %v", err)
	}
	w, err := kv.WatchAll(ctx)
	if err != nil {
		t.Fatalf("watch: %v", err)
	}
	defer w.Stop()
	rev, err := kv.Create(ctx, "user.alice", []byte("v1"))
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	if _, err := kv.Update(ctx, "user.alice", []byte("v2"), rev); err != nil {
		t.Fatalf("compare-and-set: %v", err)
	}
	if _, err := kv.Update(ctx, "user.alice", []byte("v3"), rev); err == nil {
		t.Error("a compare-and-set on a stale revision succeeded")
	}
	if e, err := kv.Get(ctx, "user.alice"); err != nil || string(e.Value()) != "v2" {
		t.Fatalf("get: %v %v", e, err)
	}
	got := 0
	for got < 2 {
		select {
		case e := <-w.Updates():
			if e != nil {
				got++
			}
		case <-ctx.Done():
			t.Fatalf("the watch saw %d of 2 writes", got)
		}
	}
	keys, err := kv.ListKeys(ctx)
	if err != nil {
		t.Fatalf("list: %v", err)
	}
	n := 0
	for range keys.Keys() {
		n++
	}
	if n != 1 {
		t.Errorf("listed %d keys, want 1", n)
	}
	if err := kv.Delete(ctx, "user.alice"); err != nil {
		t.Errorf("delete: %v", err)
	}
	// Nothing else of JetStream: not the MQTT listener's streams (which
	// exist once a device has connected), nor another bucket.
	dev := paho.NewClient(paho.NewClientOptions().AddBroker(ns.mqtt).SetClientID("inst-kv").SetUsername("alice").SetPassword("alice-password"))
	if tok := dev.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("alice: %v", tok.Error())
	}
	defer dev.Disconnect(0)
	short, cancel2 := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel2()
	if _, err := js.CreateKeyValue(short, jetstream.KeyValueConfig{Bucket: "other"}); err == nil {
		t.Error("the gateway's user created another bucket")
	}
	for _, name := range []string{"$MQTT_sess", "$MQTT_msgs", "$MQTT_rmsgs"} {
		if _, err := js.Stream(short, name); err == nil {
			t.Errorf("the gateway's user read the stream %s", name)
		}
	}
}
