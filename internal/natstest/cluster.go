package natstest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"chatd/internal/proctest"
)

// LogDirEnv names the variable that, set to a directory, makes a failed
// test write each node's whole output there.
const LogDirEnv = "NATSTEST_LOGDIR"

// Options says what cluster to start.
type Options struct {
	// Nodes is the number of nodes (default 3). A single node runs
	// standalone: the configuration without its cluster block (nats-server
	// refuses clustered JetStream without routes).
	Nodes int
	// Accounts is written as the accounts include (accounts.conf) next to
	// the configuration, unless AccountsFile names an include to use as
	// it is (e.g. one the chatgw provisioning subcommand wrote).
	Accounts     Accounts
	AccountsFile string
}

// Cluster is a running cluster.
type Cluster struct {
	t     testing.TB
	Dir   string
	Nodes []*Node

	links   []*link
	refuser *refuser
}

// Node is one nats-server of the cluster.
type Node struct {
	Name    string
	Index   int
	Dir     string
	Host    string
	Client  int // NATS protocol port
	Cluster int // route port (reached through the links)
	MQTT    int
	Monitor int

	c       *Cluster
	env     []string
	mu      sync.Mutex
	log     bytes.Buffer
	cmd     *exec.Cmd
	done    chan struct{}
	started int
}

// ClientURL is the node's NATS URL (for gateways).
func (n *Node) ClientURL() string { return fmt.Sprintf("nats://%s:%d", n.Host, n.Client) }

// MQTTURL is the node's MQTT URL (for devices).
func (n *Node) MQTTURL() string { return fmt.Sprintf("tcp://%s:%d", n.Host, n.MQTT) }

// MonitorURL is the base of the node's HTTP monitoring endpoints.
func (n *Node) MonitorURL() string { return fmt.Sprintf("http://%s:%d", n.Host, n.Monitor) }

// ClientURLs is every node's NATS URL, comma-separated (chatgw serve --nats).
func (c *Cluster) ClientURLs() string {
	var s []string
	for _, n := range c.Nodes {
		s = append(s, n.ClientURL())
	}
	return strings.Join(s, ",")
}

// MQTTURLs is every node's MQTT URL.
func (c *Cluster) MQTTURLs() []string {
	var s []string
	for _, n := range c.Nodes {
		s = append(s, n.MQTTURL())
	}
	return s
}

// ConfigFile is the shipped configuration in this module
// (build/nats/nats-server.conf).
func ConfigFile(t testing.TB) string {
	return filepath.Join(proctest.ModuleRoot(t), "build", "nats", "nats-server.conf")
}

// clusterBlock is the configuration's cluster { ... } block, up to the
// first line that is a closing brace.
var clusterBlock = regexp.MustCompile(`(?ms)^cluster \{.*?^\}\n`)

// streamReplicas is the mqtt block's stream_replicas setting.
var streamReplicas = regexp.MustCompile(`(?m)^(\s*stream_replicas:\s*)\d+`)

// Start starts the cluster from the shipped configuration and waits until
// it has a JetStream meta leader that every node follows; t.Cleanup stops
// it (showing the nodes' logs if the test failed).
func Start(t testing.TB, o Options) *Cluster {
	t.Helper()
	if o.Nodes == 0 {
		o.Nodes = 3
	}
	bin := Binary(t)
	c := &Cluster{t: t, Dir: t.TempDir()}
	conf, err := os.ReadFile(ConfigFile(t))
	if err != nil {
		t.Fatal(err)
	}
	if o.Nodes == 1 {
		// Standalone: no cluster block, and one replica of MQTT's streams
		// (nats-server refuses more without a cluster).
		conf = clusterBlock.ReplaceAll(conf, nil)
		conf = streamReplicas.ReplaceAll(conf, []byte("${1}1"))
		if bytes.Contains(conf, []byte("NATS_ROUTES")) {
			t.Fatalf("%s: could not remove the cluster block for a single node", ConfigFile(t))
		}
	}
	if err := os.WriteFile(filepath.Join(c.Dir, "nats-server.conf"), conf, 0o644); err != nil {
		t.Fatal(err)
	}
	acc := filepath.Join(c.Dir, "accounts.conf")
	if o.AccountsFile != "" {
		b, err := os.ReadFile(o.AccountsFile)
		if err != nil {
			t.Fatal(err)
		}
		err = os.WriteFile(acc, b, 0o600)
	} else {
		err = o.Accounts.Write(acc)
	}
	if err != nil {
		t.Fatal(err)
	}
	if c.refuser, err = newRefuser(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.stopAll)
	for i := range o.Nodes {
		n := &Node{Name: fmt.Sprintf("n%d", i), Index: i, Host: "127.0.0.1", c: c, Dir: filepath.Join(c.Dir, fmt.Sprintf("n%d", i))}
		if err := os.MkdirAll(n.Dir, 0o700); err != nil {
			t.Fatal(err)
		}
		c.Nodes = append(c.Nodes, n)
	}
	// One link per ordered pair of nodes: node i's route to node j.
	for i := range c.Nodes {
		for j := range c.Nodes {
			if i == j {
				continue
			}
			to := c.Nodes[j]
			l, err := newLink(i, j, func() string { return to.clusterAddr() })
			if err != nil {
				t.Fatal(err)
			}
			c.links = append(c.links, l)
		}
	}
	for _, n := range c.Nodes {
		n.pickPorts()
		n.env = n.environment()
	}
	for _, n := range c.Nodes {
		n.launch(bin)
	}
	for _, n := range c.Nodes {
		n.waitListening(bin)
	}
	c.WaitMetaLeader(t, 60*time.Second)
	return c
}

func (n *Node) pickPorts() {
	ports := make([]int, 4)
	for i := range ports {
		_, p, _ := net.SplitHostPort(proctest.FreePort(n.c.t))
		ports[i], _ = strconv.Atoi(p)
	}
	n.mu.Lock()
	n.Client, n.Cluster, n.MQTT, n.Monitor = ports[0], ports[1], ports[2], ports[3]
	n.mu.Unlock()
}

func (n *Node) clusterAddr() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.cmd == nil {
		return ""
	}
	return net.JoinHostPort(n.Host, strconv.Itoa(n.Cluster))
}

// environment is the node's values for the shipped configuration (what
// node-a.env holds for a real node).
func (n *Node) environment() []string {
	var routes []string
	for _, l := range n.c.links {
		if l.from == n.Index {
			routes = append(routes, strconv.Quote("nats-route://"+l.addr()))
		}
	}
	return []string{
		"NATS_SERVER_NAME=" + n.Name,
		"NATS_HOST=" + n.Host,
		"NATS_CLIENT_PORT=" + strconv.Itoa(n.Client),
		"NATS_CLUSTER_PORT=" + strconv.Itoa(n.Cluster),
		"NATS_CLUSTER_ADVERTISE=" + n.c.refuser.addr,
		"NATS_ROUTES=[" + strings.Join(routes, ", ") + "]",
		"NATS_MQTT_PORT=" + strconv.Itoa(n.MQTT),
		"NATS_STORE_DIR=" + strconv.Quote(filepath.Join(n.Dir, "jetstream")),
		"NATS_MONITOR=" + strconv.Quote(net.JoinHostPort(n.Host, strconv.Itoa(n.Monitor))),
	}
}

// Env is the node's environment for the shipped configuration.
func (n *Node) Env() []string { return append([]string(nil), n.env...) }

func (n *Node) launch(bin string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.cmd != nil {
		n.c.t.Fatalf("node %s is already running", n.Name)
	}
	cmd := exec.Command(bin, "-c", filepath.Join(n.c.Dir, "nats-server.conf"))
	cmd.Env = append(os.Environ(), n.env...)
	cmd.Stdout = writerFunc(n.write)
	cmd.Stderr = writerFunc(n.write)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	n.started++
	fmt.Fprintf(&n.log, "--- start %d of %s\n", n.started, n.Name)
	if err := cmd.Start(); err != nil {
		n.c.t.Fatalf("starting nats-server %s: %v", n.Name, err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	n.cmd, n.done = cmd, done
}

// waitListening waits until the node answers on its monitoring port; a
// node that lost a race for one of its ports is started again on new ones
// (only at the cluster's first start: a restart keeps its ports, which
// the clients know).
func (n *Node) waitListening(bin string) {
	n.c.t.Helper()
	for attempt := 0; ; attempt++ {
		deadline := time.Now().Add(30 * time.Second)
		for time.Now().Before(deadline) {
			if n.exited() {
				break
			}
			if _, err := n.get("/varz"); err == nil {
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
		log := n.Log()
		if attempt < 3 && n.started == 1+attempt && strings.Contains(log, "address already in use") {
			n.Kill()
			n.pickPorts()
			n.env = n.environment()
			n.launch(bin)
			continue
		}
		n.c.t.Fatalf("nats-server %s did not come up:\n%s", n.Name, log)
	}
}

func (n *Node) exited() bool {
	n.mu.Lock()
	done := n.done
	n.mu.Unlock()
	if done == nil {
		return true
	}
	select {
	case <-done:
		return true
	default:
		return false
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(b []byte) (int, error) { return f(b) }

func (n *Node) write(b []byte) (int, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.log.Write(b)
}

// Log is the node's output so far (every start of it).
func (n *Node) Log() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.log.String()
}

// Running says whether the node's process runs.
func (n *Node) Running() bool { return !n.exited() }

// Kill stops the node with SIGKILL (a power cut, as far as it can tell).
func (n *Node) Kill() { n.signal(syscall.SIGKILL) }

// Stop stops the node with SIGTERM (nats-server's clean shutdown).
func (n *Node) Stop() { n.signal(syscall.SIGTERM) }

func (n *Node) signal(sig syscall.Signal) {
	n.mu.Lock()
	cmd, done := n.cmd, n.done
	n.mu.Unlock()
	if cmd == nil {
		return
	}
	cmd.Process.Signal(sig)
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		<-done
		if _, bench := n.c.t.(*testing.B); bench {
			// A benchmark's thousands of MQTT sessions take their time to
			// end; it reports figures, not how long a stop takes.
			n.c.t.Logf("nats-server %s did not stop within 30s of %v; killed", n.Name, sig)
		} else {
			n.c.t.Errorf("nats-server %s did not stop within 30s of %v", n.Name, sig)
		}
	}
	n.mu.Lock()
	n.cmd, n.done = nil, nil
	n.mu.Unlock()
	// The routes it had die with it.
	for _, l := range n.c.links {
		if l.from == n.Index || l.to == n.Index {
			l.drop()
		}
	}
}

// Restart starts a stopped node again on the same ports and store, and
// waits until the cluster has a meta leader every running node follows.
func (n *Node) Restart() {
	n.c.t.Helper()
	if n.Running() {
		n.c.t.Fatalf("restart of %s: it is running", n.Name)
	}
	bin := Binary(n.c.t)
	n.launch(bin)
	n.waitListening(bin)
	n.c.WaitMetaLeader(n.c.t, 60*time.Second)
}

// Partition cuts the node's routes to every other node (its clients stay
// connected to it) and returns the function that heals them.
func (c *Cluster) Partition(i int) (heal func()) {
	for _, l := range c.links {
		if l.from == i || l.to == i {
			l.setCut(true)
		}
	}
	return func() {
		for _, l := range c.links {
			if l.from == i || l.to == i {
				l.setCut(false)
			}
		}
	}
}

func (c *Cluster) stopAll() {
	for _, n := range c.Nodes {
		n.Stop()
	}
	for _, l := range c.links {
		l.close()
	}
	if c.refuser != nil {
		c.refuser.close()
	}
	if c.t.Failed() {
		dir := os.Getenv(LogDirEnv)
		for _, n := range c.Nodes {
			c.t.Logf("nats-server %s output (its last 200 lines):\n%s", n.Name, tail(n.Log(), 200))
			if dir != "" {
				p := filepath.Join(dir, fmt.Sprintf("%s-%s.log", strings.ReplaceAll(c.t.Name(), "/", "_"), n.Name))
				if err := os.WriteFile(p, []byte(n.Log()), 0o644); err == nil {
					c.t.Logf("nats-server %s's whole output: %s", n.Name, p)
				}
			}
		}
	}
}

func tail(s string, lines int) string {
	parts := strings.Split(s, "\n")
	if len(parts) > lines {
		parts = parts[len(parts)-lines:]
	}
	return strings.Join(parts, "\n")
}

var monitorClient = &http.Client{Timeout: 3 * time.Second}

func (n *Node) get(path string) ([]byte, error) {
	resp, err := monitorClient.Get(n.MonitorURL() + path)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	if _, err := b.ReadFrom(resp.Body); err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return b.Bytes(), fmt.Errorf("%s%s: %s: %s", n.MonitorURL(), path, resp.Status, strings.TrimSpace(b.String()))
	}
	return b.Bytes(), nil
}

// Meta is what a node knows of the JetStream meta group (from /jsz).
type Meta struct {
	Leader   string
	Peers    []Peer
	Routes   int
	JSOnline bool
}

// Peer is a member of the meta group, as the leader sees it.
type Peer struct {
	Name    string `json:"name"`
	Current bool   `json:"current"`
	Offline bool   `json:"offline"`
}

// Meta reads the node's view of the meta group and its route count.
func (n *Node) Meta() (Meta, error) {
	b, err := n.get("/jsz")
	if err != nil {
		return Meta{}, err
	}
	var jsz struct {
		Disabled bool `json:"disabled"`
		Meta     *struct {
			Leader   string `json:"leader"`
			Replicas []Peer `json:"replicas"`
		} `json:"meta_cluster"`
	}
	if err := json.Unmarshal(b, &jsz); err != nil {
		return Meta{}, fmt.Errorf("/jsz of %s: %w", n.Name, err)
	}
	var m Meta
	m.JSOnline = !jsz.Disabled
	if jsz.Meta != nil {
		m.Leader, m.Peers = jsz.Meta.Leader, jsz.Meta.Replicas
	}
	b, err = n.get("/routez")
	if err != nil {
		return m, err
	}
	var rz struct {
		Routes []struct {
			Name string `json:"remote_name"`
		} `json:"routes"`
	}
	if err := json.Unmarshal(b, &rz); err != nil {
		return m, fmt.Errorf("/routez of %s: %w", n.Name, err)
	}
	names := map[string]bool{}
	for _, r := range rz.Routes {
		names[r.Name] = true
	}
	m.Routes = len(names)
	return m, nil
}

// Routes is the number of other nodes this node has a route to.
func (n *Node) Routes() int {
	m, err := n.Meta()
	if err != nil {
		return -1
	}
	return m.Routes
}

// Healthy says whether the node's /healthz answers 200 (its JetStream is
// current with the meta leader and its streams).
func (n *Node) Healthy() error {
	_, err := n.get("/healthz")
	return err
}

// WaitMetaLeader waits until every running node has a route to every
// other running node, follows the same meta leader and reports healthy
// (a standalone node: until it reports healthy), and returns the leader.
func (c *Cluster) WaitMetaLeader(t testing.TB, within time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(within)
	var last error
	for time.Now().Before(deadline) {
		leader, err := c.metaLeader()
		if err == nil {
			return leader
		}
		last = err
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("no JetStream meta leader within %s: %v", within, last)
	return ""
}

func (c *Cluster) metaLeader() (string, error) {
	var running []*Node
	for _, n := range c.Nodes {
		if n.Running() {
			running = append(running, n)
		}
	}
	if len(c.Nodes) == 1 && len(running) == 1 {
		// Standalone: no meta group; JetStream on and healthy is enough.
		n := running[0]
		m, err := n.Meta()
		if err != nil {
			return "", err
		}
		if !m.JSOnline {
			return "", fmt.Errorf("%s has JetStream disabled", n.Name)
		}
		return n.Name, n.Healthy()
	}
	leader := ""
	for _, n := range running {
		m, err := n.Meta()
		if err != nil {
			return "", err
		}
		if m.Routes != len(running)-1 {
			return "", fmt.Errorf("%s has routes to %d nodes, want %d", n.Name, m.Routes, len(running)-1)
		}
		if m.Leader == "" {
			return "", fmt.Errorf("%s knows no meta leader", n.Name)
		}
		if leader != "" && m.Leader != leader {
			return "", fmt.Errorf("%s follows %s, another node %s", n.Name, m.Leader, leader)
		}
		leader = m.Leader
		if err := n.Healthy(); err != nil {
			return "", err
		}
	}
	if leader == "" {
		return "", errors.New("no node is running")
	}
	return leader, nil
}

// Node returns the node called name (nil if none is).
func (c *Cluster) Node(name string) *Node {
	for _, n := range c.Nodes {
		if n.Name == name {
			return n
		}
	}
	return nil
}

// StreamState is a stream's state on one node (its own replica).
type StreamState struct {
	Leader   string
	Messages uint64
	Bytes    uint64
	LastSeq  uint64
	Found    bool
}

// Stream reads the state of the node's replica of stream (in any
// account) from /jsz.
func (n *Node) Stream(stream string) (StreamState, error) {
	b, err := n.get("/jsz?accounts=true&streams=true")
	if err != nil {
		return StreamState{}, err
	}
	var jsz struct {
		Accounts []struct {
			Streams []struct {
				Name    string `json:"name"`
				Cluster *struct {
					Leader string `json:"leader"`
				} `json:"cluster"`
				State struct {
					Messages uint64 `json:"messages"`
					Bytes    uint64 `json:"bytes"`
					LastSeq  uint64 `json:"last_seq"`
				} `json:"state"`
			} `json:"stream_detail"`
		} `json:"account_details"`
	}
	if err := json.Unmarshal(b, &jsz); err != nil {
		return StreamState{}, fmt.Errorf("/jsz of %s: %w", n.Name, err)
	}
	for _, a := range jsz.Accounts {
		for _, s := range a.Streams {
			if s.Name != stream {
				continue
			}
			st := StreamState{Messages: s.State.Messages, Bytes: s.State.Bytes, LastSeq: s.State.LastSeq, Found: true}
			if s.Cluster != nil {
				st.Leader = s.Cluster.Leader
			}
			return st, nil
		}
	}
	return StreamState{}, nil
}

// MQTTClients returns the MQTT client ids connected to the node (from
// /connz), or an error when the node does not answer.
func (n *Node) MQTTClients() (map[string]bool, error) {
	b, err := n.get("/connz?limit=100000")
	if err != nil {
		return nil, err
	}
	var cz struct {
		Conns []struct {
			MQTTClient string `json:"mqtt_client"`
		} `json:"connections"`
	}
	if err := json.Unmarshal(b, &cz); err != nil {
		return nil, fmt.Errorf("/connz of %s: %w", n.Name, err)
	}
	ids := map[string]bool{}
	for _, c := range cz.Conns {
		if c.MQTTClient != "" {
			ids[c.MQTTClient] = true
		}
	}
	return ids, nil
}
