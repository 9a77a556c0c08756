//go:build cluster

package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"chatd/client"
	"chatd/internal/natstest"
	"chatd/internal/proctest"
	"chatd/usersig"
)

const (
	appID   = 1400000001
	keyText = "cluster-secret-key-0123456789abcdef"
	// bucket is the gateways' key-value bucket (--nats-kv-bucket); its
	// stream in JetStream is "KV_" + bucket.
	bucket = "chatgw-cluster-test"
)

var key = usersig.NewSecret(keyText)

func TestMain(m *testing.M) {
	code := m.Run()
	proctest.Cleanup()
	os.Exit(code)
}

var (
	natsOnce sync.Once
	natsHelp string
	natsErr  error
)

// hasNATS matches the --nats flag in `chatgw serve --help` (the flag
// package prints "  -nats string"), not --nats-user and the like.
var hasNATS = regexp.MustCompile(`(?m)^\s+--?nats(\s|=|$)`)

// requireNATSGateway skips the test unless this chatgw can run on NATS:
// `chatgw serve --help` must list --nats. It is detected, so the tests run
// as soon as the transport is in the tree.
func requireNATSGateway(t testing.TB) {
	t.Helper()
	bin := proctest.Binary(t, "chatgw")
	natsOnce.Do(func() {
		out, err := exec.Command(bin, "serve", "--help").CombinedOutput()
		natsHelp, natsErr = string(out), err
	})
	if !hasNATS.MatchString(natsHelp) {
		t.Skipf("chatgw serve --help lists no --nats flag, so this chatgw cannot run on a NATS cluster: the fleet scenarios and the capacity benchmark need `chatgw serve --nats URL,URL,URL` (the fixture's own tests in internal/natstest run without it); help exit: %v", natsErr)
	}
}

var (
	accOnce sync.Once
	accHas  bool
)

// hasAccountsCommand says whether this chatgw has the provisioning
// subcommand (`chatgw --help` lists nats-accounts); without it the tests
// use the fixture's own include of the same shape.
func hasAccountsCommand(t testing.TB) bool {
	bin := proctest.Binary(t, "chatgw")
	accOnce.Do(func() {
		out, _ := exec.Command(bin, "--help").CombinedOutput()
		accHas = regexp.MustCompile(`(?m)^\s+chatgw nats-accounts\s`).Match(out)
	})
	return accHas
}

// env is a cluster with its gateways, the key and the device credentials.
type env struct {
	t       testing.TB
	dir     string
	keyFile string
	gwPass  string
	helper  string
	c       *natstest.Cluster
	users   map[string]string // device user -> NATS password
	broker  string            // without a cluster: the embedded broker's URL
	// replicas is the gateways' --nats-kv-replicas (3; 1 on one node).
	replicas int
	// keepAlive is the simulated devices' MQTT keepalive (0: 5 s, so that
	// a dead node is noticed quickly).
	keepAlive time.Duration
	// shards is the number of device accounts (nats-accounts --shards,
	// serve --nats-shards).
	shards int
}

// newEnv starts a three-node cluster whose accounts include knows the
// given device users.
func newEnv(t testing.TB, users []string) *env {
	t.Helper()
	requireNATSGateway(t)
	return newClusterEnv(t, users, 3)
}

// newClusterEnv is newEnv for the tests that need no gateway on NATS,
// on nodes nodes (1: a standalone server).
func newClusterEnv(t testing.TB, users []string, nodes int) *env {
	t.Helper()
	return newShardedEnv(t, users, nodes, 1)
}

// newShardedEnv is newClusterEnv with the devices spread over shards
// accounts.
func newShardedEnv(t testing.TB, users []string, nodes, shards int) *env {
	t.Helper()
	e := &env{t: t, dir: t.TempDir(), users: map[string]string{}, replicas: min(nodes, 3), shards: shards}
	e.keyFile = filepath.Join(e.dir, "key")
	if err := os.WriteFile(e.keyFile, []byte(keyText), 0o600); err != nil {
		t.Fatal(err)
	}
	e.gwPass = filepath.Join(e.dir, "gw.pass")
	os.WriteFile(e.gwPass, []byte("gw-secret\n"), 0o600)
	acc := natstest.Accounts{Gateway: natstest.User{Name: "chatgw", Password: "gw-secret"}, System: natstest.User{Name: "sys", Password: "sys-secret"}}
	var devices strings.Builder
	for _, u := range users {
		p := u + "-password"
		e.users[u] = p
		acc.Devices = append(acc.Devices, natstest.User{Name: u, Password: p})
		os.WriteFile(filepath.Join(e.dir, u+".pass"), []byte(p+"\n"), 0o600)
		fmt.Fprintf(&devices, "%s %s\n", u, p)
	}
	opts := natstest.Options{Nodes: nodes, Accounts: acc}
	if hasAccountsCommand(t) {
		// The accounts as operators make them: chatgw nats-accounts
		// (bcrypt at its lowest cost: nats-server pays it at every connect).
		devs := filepath.Join(e.dir, "devices")
		os.WriteFile(devs, []byte(devices.String()), 0o600)
		sysPass := filepath.Join(e.dir, "sys.pass")
		os.WriteFile(sysPass, []byte("sys-secret\n"), 0o600)
		opts.AccountsFile = filepath.Join(e.dir, "accounts.conf")
		out, err := exec.Command(proctest.Binary(t, "chatgw"), "nats-accounts", "--devices", devs, "--gateway-password-file", e.gwPass,
			"--system-password-file", sysPass, "--kv-bucket", bucket, "--bcrypt-cost", "4", "--shards", strconv.Itoa(shards), "--out", opts.AccountsFile).CombinedOutput()
		if err != nil {
			t.Fatalf("chatgw nats-accounts: %v\n%s", err, out)
		}
	} else if shards > 1 {
		t.Skip("this chatgw has no nats-accounts to write sharded accounts")
	}
	e.helper = filepath.Join(e.dir, "get-usersig")
	script := fmt.Sprintf("#!/bin/sh\nexec %s usersig gen --sdkappid %d --key-file %s --user \"$CHATD_USER_ID\" --expire 86400\n",
		proctest.Binary(t, "chatgw"), appID, e.keyFile)
	os.WriteFile(e.helper, []byte(script), 0o755)
	e.c = natstest.Start(t, opts)
	return e
}

// newEmbeddedEnv runs one chatgw with its embedded broker instead of a
// cluster: the simulated fleet's own test uses it, since it needs nothing
// the NATS transport brings.
func newEmbeddedEnv(t *testing.T) (*env, *gateway) {
	t.Helper()
	e := &env{t: t, dir: t.TempDir(), users: map[string]string{}}
	e.keyFile = filepath.Join(e.dir, "key")
	if err := os.WriteFile(e.keyFile, []byte(keyText), 0o600); err != nil {
		t.Fatal(err)
	}
	addr := proctest.FreePort(t)
	e.broker = "tcp://" + addr
	g := &gateway{name: "embedded", admin: filepath.Join(e.dir, "gw.sock")}
	g.p = proctest.Start(t, proctest.Binary(t, "chatgw"), "serve", "--sdkappid", strconv.Itoa(appID), "--key-file", e.keyFile,
		"--embedded-broker", addr, "--admin", g.admin, "--state", filepath.Join(e.dir, "gw.db"))
	g.waitReady(t)
	return e, g
}

// gateway is one chatgw serve --nats.
type gateway struct {
	name  string
	admin string
	p     *proctest.Proc
}

// gateway starts a chatgw on the given nodes' NATS URLs (all when none).
func (e *env) gateway(name string, nodes ...int) *gateway {
	e.t.Helper()
	urls := e.c.ClientURLs()
	if len(nodes) > 0 {
		var u []string
		for _, i := range nodes {
			u = append(u, e.c.Nodes[i].ClientURL())
		}
		urls = strings.Join(u, ",")
	}
	g := &gateway{name: name, admin: filepath.Join(e.dir, name+".sock")}
	g.p = proctest.Start(e.t, proctest.Binary(e.t, "chatgw"), "serve", "--sdkappid", strconv.Itoa(appID), "--key-file", e.keyFile,
		"--nats", urls, "--nats-user", "chatgw", "--nats-password-file", e.gwPass,
		"--nats-kv-bucket", bucket, "--nats-kv-replicas", strconv.Itoa(e.replicas), "--nats-shards", strconv.Itoa(max(e.shards, 1)),
		"--admin", g.admin, "--log-level", "debug")
	g.waitReady(e.t)
	return g
}

func (g *gateway) waitReady(t testing.TB) {
	t.Helper()
	proctest.Wait(t, 30*time.Second, g.name+" ready", func() bool {
		resp, err := proctest.UnixHTTP(g.admin).Get("http://chatgw/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
}

func (g *gateway) restart(t testing.TB) {
	t.Helper()
	g.p.Start()
	g.waitReady(t)
}

// adminSession is a session as the admin API lists it.
type adminSession struct {
	ID       string `json:"id"`
	UserID   string `json:"user_id"`
	Instance string `json:"instance"`
	Online   bool   `json:"online"`
}

// sessions is the fleet's active sessions, read through this gateway's
// admin API.
func (g *gateway) sessions(t testing.TB) []adminSession {
	t.Helper()
	resp, err := proctest.UnixHTTP(g.admin).Get("http://chatgw/v1/sessions")
	if err != nil {
		t.Fatalf("%s admin API: %v", g.name, err)
	}
	defer resp.Body.Close()
	var body struct {
		Sessions []adminSession `json:"sessions"`
	}
	b, _ := io.ReadAll(resp.Body)
	if err := json.Unmarshal(b, &body); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("%s GET /v1/sessions: %s %v: %s", g.name, resp.Status, err, b)
	}
	return body.Sessions
}

// kick kicks every session of user and revokes its older UserSigs.
func (g *gateway) kick(t testing.TB, user string) {
	t.Helper()
	resp, err := proctest.UnixHTTP(g.admin).Post("http://chatgw/v1/users/"+user+"/kick", "application/json", nil)
	if err != nil {
		t.Fatalf("%s kick: %v", g.name, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("%s kick %s: %s %s", g.name, user, resp.Status, b)
	}
}

// chatd is one real device.
type chatd struct {
	t    testing.TB
	name string
	p    *proctest.Proc
	c    *client.Client
}

// chatd starts a real chatd as user, trying the brokers in the given
// order of nodes.
func (e *env) chatd(name, user string, nodes ...int) *chatd {
	e.t.Helper()
	dir := filepath.Join(e.dir, name)
	os.MkdirAll(dir, 0o755)
	var brokers []string
	for _, i := range nodes {
		brokers = append(brokers, strconv.Quote(e.c.Nodes[i].MQTTURL()))
	}
	cfg := fmt.Sprintf(`sdkappid = %d
user_id = %q
broker = [%s]
usersig_command = %q
state_db = %q
socket = %q

[mqtt]
keepalive = "5s"
username = %q
password_file = %q

[reconnect]
min_delay = "200ms"
max_delay = "1s"
stable_after = "5s"

[log]
level = "debug"
`, appID, user, strings.Join(brokers, ", "), e.helper, filepath.Join(dir, "state.db"), filepath.Join(dir, "chatd.sock"),
		user, filepath.Join(e.dir, user+".pass"))
	path := filepath.Join(dir, "chatd.toml")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		e.t.Fatal(err)
	}
	d := &chatd{t: e.t, name: name, c: client.New(filepath.Join(dir, "chatd.sock"))}
	d.p = proctest.Start(e.t, proctest.Binary(e.t, "chatd"), "--config", path)
	return d
}

func (d *chatd) status() client.Status {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	s, _ := d.c.Status(ctx)
	return s
}

func (d *chatd) waitFor(within time.Duration, what string, cond func(client.Status) bool) client.Status {
	d.t.Helper()
	var s client.Status
	proctest.Wait(d.t, within, d.name+": "+what, func() bool { s = d.status(); return cond(s) })
	return s
}

func (d *chatd) waitLogined(within time.Duration) client.Status {
	d.t.Helper()
	return d.waitFor(within, "LOGINED and connected", func(s client.Status) bool { return s.LoginStatus == client.Logined && s.Connected })
}

func sig(t testing.TB, user string) string {
	t.Helper()
	s, err := usersig.Generate(appID, key, user, 24*time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// checkSessions asserts that the gateway lists exactly the sessions the
// devices hold (user/instance -> session id): no duplicate, none missing,
// none the devices do not hold.
func checkSessions(t testing.TB, g *gateway, held map[string]string) {
	t.Helper()
	listed := map[string][]string{}
	for _, s := range g.sessions(t) {
		k := s.UserID + "/" + s.Instance
		listed[k] = append(listed[k], s.ID)
	}
	for k, ids := range listed {
		switch want, ok := held[k]; {
		case !ok:
			t.Errorf("%s lists %v for %s, which no device holds", g.name, ids, k)
		case len(ids) != 1:
			t.Errorf("%s lists %d sessions for %s: %v", g.name, len(ids), k, ids)
		case ids[0] != want:
			t.Errorf("%s lists session %s for %s; the device holds %s", g.name, ids[0], k, want)
		}
	}
	for k, want := range held {
		if _, ok := listed[k]; !ok {
			t.Errorf("%s does not list %s's session %s", g.name, k, want)
		}
	}
}
