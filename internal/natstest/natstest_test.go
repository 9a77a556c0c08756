//go:build cluster

package natstest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"chatd/internal/proctest"
	"chatd/mqtt"
)

// These tests check the fixture itself, and with it the shipped
// configuration: the cluster comes up, survives kill -9 and a partition,
// carries MQTT between nodes, and keeps an R3 key-value bucket whole.

func TestMain(m *testing.M) {
	code := m.Run()
	proctest.Cleanup()
	os.Exit(code)
}

var topics = mqtt.Topics{Prefix: mqtt.DefaultPrefix}

func accounts() Accounts {
	return Accounts{
		Gateway: User{"chatgw", "gw-secret"},
		Devices: []User{{"dev-1", "dev-1-secret"}, {"dev-2", "dev-2-secret"}},
		System:  User{"sys", "sys-secret"},
	}
}

func connect(t *testing.T, n *Node, opts ...nats.Option) *nats.Conn {
	t.Helper()
	opts = append([]nats.Option{nats.UserInfo("chatgw", "gw-secret"), nats.Timeout(5 * time.Second)}, opts...)
	nc, err := nats.Connect(n.ClientURL(), opts...)
	if err != nil {
		t.Fatalf("connecting to %s: %v", n.Name, err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// The shipped configuration passes nats-server's own check with each
// shipped node's values.
func TestShippedConfigurationChecks(t *testing.T) {
	bin := Binary(t)
	root := proctest.ModuleRoot(t)
	dir := t.TempDir()
	conf, _ := os.ReadFile(filepath.Join(root, "build", "nats", "nats-server.conf"))
	os.WriteFile(filepath.Join(dir, "nats-server.conf"), conf, 0o644)
	if err := accounts().Write(filepath.Join(dir, "accounts.conf")); err != nil {
		t.Fatal(err)
	}
	envs, _ := filepath.Glob(filepath.Join(root, "build", "nats", "node-*.env"))
	if len(envs) != 3 {
		t.Fatalf("build/nats has %d node-*.env files, want 3", len(envs))
	}
	for _, f := range envs {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var env []string
		for _, l := range strings.Split(string(b), "\n") {
			if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
				env = append(env, strings.Replace(l, "NATS_STORE_DIR=/var/lib/nats/jetstream", "NATS_STORE_DIR="+filepath.Join(dir, "js"), 1))
			}
		}
		cmd := exec.Command(bin, "-c", filepath.Join(dir, "nats-server.conf"), "-t")
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.CombinedOutput()
		if err != nil || !strings.Contains(string(out), "is valid") {
			t.Errorf("%s: nats-server -t: %v\n%s", filepath.Base(f), err, out)
		}
	}
	// And a broken value is refused, so the check above can fail.
	cmd := exec.Command(bin, "-c", filepath.Join(dir, "nats-server.conf"), "-t")
	cmd.Env = append(os.Environ(), "NATS_SERVER_NAME=x", "NATS_HOST=127.0.0.1", "NATS_CLIENT_PORT=notaport")
	if out, err := cmd.CombinedOutput(); err == nil {
		t.Errorf("nats-server -t accepted a configuration without its values:\n%s", out)
	}
}

func TestClusterUp(t *testing.T) {
	c := Start(t, Options{Accounts: accounts()})
	leader := c.WaitMetaLeader(t, 10*time.Second)
	if c.Node(leader) == nil {
		t.Fatalf("meta leader %q is not one of the nodes", leader)
	}
	for _, n := range c.Nodes {
		m, err := n.Meta()
		if err != nil {
			t.Fatal(err)
		}
		if m.Routes != 2 || m.Leader != leader || !m.JSOnline {
			t.Errorf("%s: %+v, want routes to 2 nodes and leader %s", n.Name, m, leader)
		}
	}
	// The accounts include is in force: a wrong password is refused.
	if _, err := nats.Connect(c.Nodes[0].ClientURL(), nats.UserInfo("chatgw", "wrong")); err == nil {
		t.Error("a wrong password was accepted")
	}
}

// mqttDevice connects as a device user to one node's MQTT listener.
func mqttDevice(t *testing.T, url, user, pass, inst string) paho.Client {
	t.Helper()
	return mqttDeviceOpts(t, url, user, pass, inst, nil)
}

func mqttDeviceOpts(t *testing.T, url, user, pass, inst string, opt func(*paho.ClientOptions)) paho.Client {
	t.Helper()
	o := paho.NewClientOptions().AddBroker(url).SetClientID(inst).SetUsername(user).SetPassword(pass).
		SetAutoReconnect(false).SetConnectTimeout(10 * time.Second).SetCleanSession(true).SetProtocolVersion(4)
	if opt != nil {
		opt(o)
	}
	c := paho.NewClient(o)
	// The first MQTT connection of an account makes MQTT's streams, and a
	// connection is refused until they have leaders: try again, as chatd
	// does.
	var err error
	for attempt := 0; attempt < 10; attempt++ {
		tok := c.Connect()
		if !tok.WaitTimeout(20 * time.Second) {
			err = fmt.Errorf("no CONNACK within 20s")
		} else if err = tok.Error(); err == nil {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("%s: MQTT connect to %s: %v", user, url, err)
	}
	t.Cleanup(func() { c.Disconnect(0) })
	return c
}

func TestMQTTThroughAnyNode(t *testing.T) {
	c := Start(t, Options{Accounts: accounts()})
	// The gateway side: a queue subscription on the up subjects, on n2.
	gw := connect(t, c.Nodes[2])
	ups := make(chan *nats.Msg, 16)
	if _, err := gw.ChanQueueSubscribe("chat.v1.up.*.*", "chatgw", ups); err != nil {
		t.Fatal(err)
	}
	gw.Flush()
	// A device on n0.
	dev := mqttDevice(t, c.Nodes[0].MQTTURL(), "dev-1", "dev-1-secret", "i1")
	downs := make(chan string, 16)
	if tok := dev.Subscribe(topics.Down("dev-1", "i1"), 1, func(_ paho.Client, m paho.Message) { downs <- string(m.Payload()) }); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	if tok := dev.Publish(topics.Up("dev-1", "i1"), 1, false, "hello up"); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("publish: %v", tok.Error())
	}
	select {
	case m := <-ups:
		if m.Subject != "chat.v1.up.dev-1.i1" || string(m.Data) != "hello up" {
			t.Errorf("gateway got %q on %s", m.Data, m.Subject)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the device's up message did not reach the gateway on another node")
	}
	// Down: the interest of an MQTT subscription on n0 reaches n2 through
	// the routes (wait for it: it propagates asynchronously).
	proctest.Wait(t, 10*time.Second, "the down message at the device", func() bool {
		gw.Publish("chat.v1.down.dev-1.i1", []byte("hello down"))
		select {
		case m := <-downs:
			return m == "hello down"
		case <-time.After(200 * time.Millisecond):
			return false
		}
	})

	t.Run("a device is confined to its own subjects", func(t *testing.T) {
		spy := make(chan string, 16)
		tok := dev.Subscribe(topics.Down("dev-2", "x"), 1, func(_ paho.Client, m paho.Message) { spy <- string(m.Payload()) })
		if !tok.WaitTimeout(10 * time.Second) {
			t.Fatal("no SUBACK for the subscription to another device's down topic")
		}
		// paho reports a refused subscription in the SUBACK code.
		if st, ok := tok.(*paho.SubscribeToken); tok.Error() == nil && (!ok || st.Result()[topics.Down("dev-2", "x")] != 0x80) {
			t.Errorf("subscribing to another device's down topic: granted %v", st.Result())
		}
		gw.Publish("chat.v1.down.dev-2.x", []byte("for dev-2"))
		dev.Publish(topics.Up("dev-2", "x"), 1, false, "forged").WaitTimeout(5 * time.Second)
		// The device stays connected and its own messages go on; one
		// connection's messages arrive in order, so anything forged would
		// come before "own, after".
		if tok := dev.Publish(topics.Up("dev-1", "i1"), 1, false, "own, after"); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("publish after the forged one: %v", tok.Error())
		}
		dev2 := mqttDevice(t, c.Nodes[1].MQTTURL(), "dev-2", "dev-2-secret", "i2")
		if tok := dev2.Publish(topics.Up("dev-2", "i2"), 1, false, "genuine"); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("publish: %v", tok.Error())
		}
		timeout := time.After(10 * time.Second)
		for own, genuine := false, false; !own || !genuine; {
			select {
			case m := <-ups:
				switch string(m.Data) {
				case "forged":
					t.Errorf("dev-1 published on dev-2's up subject %s", m.Subject)
				case "own, after":
					own = true
				case "genuine":
					genuine = true
				}
			case <-timeout:
				t.Fatalf("the devices' own messages did not arrive (dev-1's: %v, dev-2's: %v)", own, genuine)
			}
		}
		select {
		case m := <-spy:
			t.Errorf("dev-1 received dev-2's down message %q", m)
		case <-time.After(300 * time.Millisecond):
		}
	})
}

func kv(t *testing.T, nc *nats.Conn, bucket string, create bool) jetstream.KeyValue {
	t.Helper()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	// An answer can be lost while a fresh cluster settles (as the gateway
	// finds, which retries too): each attempt gets 10 s, all of them a
	// minute. Creating a bucket that exists with the same configuration
	// succeeds, so a retry after a lost answer is safe.
	deadline := time.Now().Add(time.Minute)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		var k jetstream.KeyValue
		var err error
		if create {
			k, err = js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: bucket, Replicas: 3, History: 1})
		} else {
			k, err = js.KeyValue(ctx, bucket)
		}
		cancel()
		if err == nil {
			return k
		}
		if time.Now().After(deadline) || errors.Is(err, jetstream.ErrBucketNotFound) {
			t.Fatalf("bucket %s (create %v): %v", bucket, create, err)
		}
		t.Logf("bucket %s (create %v): %v; trying again", bucket, create, err)
		time.Sleep(500 * time.Millisecond)
	}
}

// put retries a put until it succeeds (an election after a node's death
// takes a few seconds) and returns its revision.
func put(t *testing.T, k jetstream.KeyValue, key, value string, within time.Duration) uint64 {
	t.Helper()
	var rev uint64
	var last error
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		rev, last = k.Put(ctx, key, []byte(value))
		cancel()
		if last == nil {
			return rev
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("put %s: %v", key, last)
	return 0
}

func get(k jetstream.KeyValue, key string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	e, err := k.Get(ctx, key)
	if err != nil {
		return "", err
	}
	return string(e.Value()), nil
}

const bucket = "fixture"
const stream = "KV_" + bucket

// waitReplica waits until node n's replica of the bucket's stream holds
// lastSeq.
func waitReplica(t *testing.T, n *Node, lastSeq uint64) {
	t.Helper()
	var st StreamState
	proctest.Wait(t, 30*time.Second, fmt.Sprintf("%s's replica at sequence %d", n.Name, lastSeq), func() bool {
		st, _ = n.Stream(stream)
		return st.Found && st.LastSeq == lastSeq
	})
}

func TestNodeKillAndRestartKeepTheKV(t *testing.T) {
	c := Start(t, Options{Accounts: accounts()})
	nc := connect(t, c.Nodes[0], nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	// The client knows every node, so it moves when its node dies.
	nc.Close()
	nc, err := nats.Connect(c.ClientURLs(), nats.UserInfo("chatgw", "gw-secret"), nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	k := kv(t, nc, bucket, true)
	var last uint64
	for i := range 20 {
		last = put(t, k, fmt.Sprintf("k%d", i), fmt.Sprintf("v%d", i), 10*time.Second)
	}
	for _, n := range c.Nodes {
		waitReplica(t, n, last)
	}
	// Kill the stream's leader: the worst node to lose.
	st, err := c.Nodes[0].Stream(stream)
	if err != nil || st.Leader == "" {
		t.Fatalf("stream state: %+v %v", st, err)
	}
	victim := c.Node(st.Leader)
	victim.Kill()
	// Reads may fail while the client moves and a new leader is elected,
	// then every value is there.
	proctest.Wait(t, 30*time.Second, "the bucket readable after the kill", func() bool {
		_, err := get(k, "k0")
		return err == nil
	})
	// Writes go on with two of three.
	last = put(t, k, "after-kill", "yes", 30*time.Second)
	for i := range 20 {
		if v, err := get(k, fmt.Sprintf("k%d", i)); err != nil || v != fmt.Sprintf("v%d", i) {
			t.Errorf("k%d with %s dead: %q %v", i, victim.Name, v, err)
		}
	}
	victim.Restart()
	// The restarted node catches up with the write it missed.
	waitReplica(t, victim, last)
	if v, err := get(k, "after-kill"); err != nil || v != "yes" {
		t.Errorf("after-kill: %q %v", v, err)
	}
}

func TestPartitionedNodeRefusesWritesAndCatchesUp(t *testing.T) {
	c := Start(t, Options{Accounts: accounts()})
	maj := connect(t, c.Nodes[0])
	k := kv(t, maj, bucket, true)
	last := put(t, k, "before", "1", 10*time.Second)
	for _, n := range c.Nodes {
		waitReplica(t, n, last)
	}
	cutNode := c.Nodes[2]
	min := connect(t, cutNode, nats.NoReconnect())
	kmin := kv(t, min, bucket, false)
	dev := mqttDevice(t, cutNode.MQTTURL(), "dev-1", "dev-1-secret", "i1")
	lost := make(chan struct{})
	pub := mqttDeviceOpts(t, cutNode.MQTTURL(), "dev-2", "dev-2-secret", "i2", func(o *paho.ClientOptions) {
		o.SetConnectionLostHandler(func(paho.Client, error) { close(lost) })
	})

	heal := c.Partition(2)
	healed := false
	defer func() {
		if !healed {
			heal()
		}
	}()
	start := time.Now()
	proctest.Wait(t, 40*time.Second, "n2 to lose its routes", func() bool { return cutNode.Routes() == 0 })
	proctest.Wait(t, 40*time.Second, "n0 and n1 to see only each other", func() bool {
		return c.Nodes[0].Routes() == 1 && c.Nodes[1].Routes() == 1
	})
	t.Logf("the routes were down %s after the cut", time.Since(start).Round(time.Second))
	// The majority writes (after electing a new leader if n2 led).
	last = put(t, k, "during", "2", 30*time.Second)
	// The minority side cannot: nothing it acknowledges could be lost.
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	_, err := kmin.Put(ctx, "minority", []byte("x"))
	cancel()
	if err == nil {
		t.Error("the partitioned node acknowledged a write")
	}
	if !dev.IsConnectionOpen() {
		t.Error("an idle device on the partitioned node lost its connection")
	}
	// A QoS 1 publish needs JetStream (nats-server stores it before its
	// PUBACK): on the cut-off node it is never acknowledged, and the node
	// closes the device's connection; the device can connect to a node
	// of the majority.
	if tok := pub.Publish(topics.Up("dev-2", "i2"), 1, false, "during the cut"); tok.WaitTimeout(15*time.Second) && tok.Error() == nil {
		t.Error("the cut-off node acknowledged a QoS 1 publish")
	}
	select {
	case <-lost:
	case <-time.After(15 * time.Second):
		t.Error("the cut-off node kept the connection of a device whose QoS 1 publish it could not store")
	}
	// Nor does it take new MQTT connections (a connection stores its
	// session in JetStream).
	o := paho.NewClientOptions().AddBroker(cutNode.MQTTURL()).SetClientID("i3").SetUsername("dev-1").SetPassword("dev-1-secret").
		SetAutoReconnect(false).SetConnectTimeout(10 * time.Second).SetProtocolVersion(4)
	if tok := paho.NewClient(o).Connect(); tok.WaitTimeout(15*time.Second) && tok.Error() == nil {
		t.Error("the cut-off node took a new MQTT connection")
	}
	moved := mqttDevice(t, c.Nodes[0].MQTTURL(), "dev-2", "dev-2-secret", "i2")
	if tok := moved.Publish(topics.Up("dev-2", "i2"), 1, false, "on the majority"); !tok.WaitTimeout(15*time.Second) || tok.Error() != nil {
		t.Errorf("a QoS 1 publish on the majority: %v", tok.Error())
	}
	heal()
	healed = true
	c.WaitMetaLeader(t, 60*time.Second)
	waitReplica(t, cutNode, last)
	if v, err := get(k, "minority"); err == nil {
		t.Errorf("the refused write exists after the heal: %q", v)
	}
	if v, err := get(kmin, "during"); err != nil || v != "2" {
		t.Errorf("the majority's write, read on the healed node: %q %v", v, err)
	}
}

// One node (the capacity benchmark's baseline): JetStream with R1.
func TestSingleNode(t *testing.T) {
	c := Start(t, Options{Nodes: 1, Accounts: accounts()})
	nc := connect(t, c.Nodes[0])
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	k, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: bucket, Replicas: 1})
	if err != nil {
		t.Fatal(err)
	}
	put(t, k, "a", "1", 10*time.Second)
	if v, err := get(k, "a"); err != nil || v != "1" {
		t.Errorf("get: %q %v", v, err)
	}
	// MQTT works too (its streams with one replica).
	d := mqttDevice(t, c.Nodes[0].MQTTURL(), "dev-1", "dev-1-secret", "i1")
	if tok := d.Subscribe(topics.Down("dev-1", "i1"), 1, nil); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Errorf("subscribe: %v", tok.Error())
	}
	if tok := d.Publish(topics.Up("dev-1", "i1"), 1, false, "x"); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Errorf("publish: %v", tok.Error())
	}
}

// MQTT's own streams have three replicas (mqtt.stream_replicas): when the
// node that leads them dies, a device connects to another node,
// subscribes at QoS 1 and publishes at QoS 1 once they have new leaders.
// (With the R2 that nats-server picks by itself here, this stalls until
// the node is back.)
func TestMQTTSurvivesTheDeathOfItsStreamsLeader(t *testing.T) {
	c := Start(t, Options{Accounts: accounts()})
	first := mqttDevice(t, c.Nodes[0].MQTTURL(), "dev-1", "dev-1-secret", "i1")
	if tok := first.Subscribe(topics.Down("dev-1", "i1"), 1, nil); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	var st StreamState
	proctest.Wait(t, 10*time.Second, "the $MQTT_msgs stream with three replicas", func() bool {
		var err error
		st, err = c.Nodes[0].Stream("$MQTT_msgs")
		if err != nil || !st.Found || c.Node(st.Leader) == nil {
			return false
		}
		for _, n := range c.Nodes {
			if s, err := n.Stream("$MQTT_msgs"); err != nil || !s.Found {
				return false
			}
		}
		return true
	})
	victim := c.Node(st.Leader)
	other := c.Nodes[(victim.Index+1)%3]
	first.Disconnect(0)
	victim.Kill()
	gw := connect(t, other)
	got := make(chan string, 4)
	var d paho.Client
	// While the streams elect new leaders (a few seconds), the node may
	// refuse the subscription or close the connection at the QoS 1
	// publish; the device tries again, as chatd does.
	dead := time.Now()
	proctest.Wait(t, 45*time.Second, "a device connected, subscribed and publishing at QoS 1 on "+other.Name, func() bool {
		o := paho.NewClientOptions().AddBroker(other.MQTTURL()).SetClientID("i1").SetUsername("dev-1").SetPassword("dev-1-secret").
			SetAutoReconnect(false).SetConnectTimeout(5 * time.Second).SetProtocolVersion(4)
		cl := paho.NewClient(o)
		if tok := cl.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			return false
		}
		tok := cl.Subscribe(topics.Down("dev-1", "i1"), 1, func(_ paho.Client, m paho.Message) { got <- string(m.Payload()) })
		if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil || tok.(*paho.SubscribeToken).Result()[topics.Down("dev-1", "i1")] == 0x80 {
			cl.Disconnect(0)
			return false
		}
		if tok := cl.Publish(topics.Up("dev-1", "i1"), 1, false, "after the death"); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			cl.Disconnect(0)
			return false
		}
		d = cl
		return true
	})
	t.Logf("the device was back %s after %s's death", time.Since(dead).Round(100*time.Millisecond), victim.Name)
	t.Cleanup(func() { d.Disconnect(0) })
	proctest.Wait(t, 10*time.Second, "a down message at the device", func() bool {
		gw.Publish("chat.v1.down.dev-1.i1", []byte("hello"))
		select {
		case <-got:
			return true
		case <-time.After(200 * time.Millisecond):
			return false
		}
	})
}

// The shipped systemd unit passes systemd-analyze verify, and its
// exposure stays low. (The tests run nats-server directly, not under
// systemd.)
func TestSystemdUnit(t *testing.T) {
	sa := proctest.Tool(t, "systemd-analyze", "systemd")
	bin := Binary(t)
	dir := t.TempDir()
	b, err := os.ReadFile(filepath.Join(proctest.ModuleRoot(t), "build", "nats", "nats-server@.service"))
	if err != nil {
		t.Fatal(err)
	}
	// An instance of the template, with the binary where it is here.
	unit := filepath.Join(dir, "nats-server@a.service")
	os.WriteFile(unit, []byte(strings.ReplaceAll(string(b), "/usr/local/bin/nats-server", bin)), 0o644)
	if out, err := exec.Command(sa, "verify", unit).CombinedOutput(); err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
	out, err := exec.Command(sa, "security", "--offline=true", "--threshold=20", unit).CombinedOutput()
	if err != nil {
		t.Errorf("systemd-analyze security: exposure above 2.0 or an error: %v\n%s", err, out)
	}
}

// Two of three nodes down: the bucket takes no write and the surviving
// node takes no MQTT connection; with a second node back, both work and
// nothing written before is lost.
func TestQuorumLossAndBack(t *testing.T) {
	c := Start(t, Options{Accounts: accounts()})
	mqttDevice(t, c.Nodes[0].MQTTURL(), "dev-1", "dev-1-secret", "i1").Disconnect(0) // MQTT's streams exist
	nc := connect(t, c.Nodes[0], nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	k := kv(t, nc, bucket, true)
	put(t, k, "before", "1", 10*time.Second)
	c.Nodes[1].Kill()
	c.Nodes[2].Kill()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	_, err := k.Put(ctx, "lost-quorum", []byte("x"))
	cancel()
	if err == nil {
		t.Error("a write was acknowledged by one node of three")
	}
	o := paho.NewClientOptions().AddBroker(c.Nodes[0].MQTTURL()).SetClientID("i2").SetUsername("dev-2").SetPassword("dev-2-secret").
		SetAutoReconnect(false).SetConnectTimeout(10 * time.Second).SetProtocolVersion(4)
	if tok := paho.NewClient(o).Connect(); tok.WaitTimeout(15*time.Second) && tok.Error() == nil {
		t.Error("one node of three took a new MQTT connection")
	}
	c.Nodes[1].Restart()
	put(t, k, "back", "2", 30*time.Second)
	if v, err := get(k, "before"); err != nil || v != "1" {
		t.Errorf("before: %q %v", v, err)
	}
	// (The unacknowledged write may or may not exist now: a leader that
	// kept it in its log commits it once a follower is back. Only what was
	// acknowledged is promised.)
	mqttDevice(t, c.Nodes[0].MQTTURL(), "dev-2", "dev-2-secret", "i2")
}

// More devices than nats-server's default of 1,000 consumers per stream
// subscribe at QoS 1 (each subscription is a consumer on MQTT's message
// stream): the shipped configuration raises the limit, and every one of
// them is granted and receives a QoS 1 message.
func TestMoreThanAThousandQoS1Subscriptions(t *testing.T) {
	const n = 1100
	c := Start(t, Options{Nodes: 1, Accounts: Accounts{
		Gateway: User{"chatgw", "gw-secret"},
		Devices: []User{{"dev-1", "dev-1-secret"}},
		System:  User{"sys", "sys-secret"},
	}})
	url := c.Nodes[0].MQTTURL()
	got := make(chan int, n)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 32)
	var refused atomic.Int32
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			inst := fmt.Sprintf("q%04d", i)
			d := mqttDevice(t, url, "dev-1", "dev-1-secret", inst)
			tok := d.Subscribe(topics.Down("dev-1", inst), 1, func(paho.Client, paho.Message) { got <- i })
			if !tok.WaitTimeout(20*time.Second) || tok.Error() != nil {
				t.Errorf("%s: subscribe: %v", inst, tok.Error())
				return
			}
			if st := tok.(*paho.SubscribeToken); st.Result()[topics.Down("dev-1", inst)] == 0x80 {
				refused.Add(1)
			}
		}()
	}
	wg.Wait()
	if r := refused.Load(); r > 0 {
		t.Fatalf("%d of %d QoS 1 subscriptions refused", r, n)
	}
	if t.Failed() {
		t.FailNow()
	}
	nc := connect(t, c.Nodes[0])
	for i := range n {
		if err := nc.Publish("chat.v1.down.dev-1."+fmt.Sprintf("q%04d", i), []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	seen := map[int]bool{}
	deadline := time.After(30 * time.Second)
	for len(seen) < n {
		select {
		case i := <-got:
			seen[i] = true
		case <-deadline:
			t.Fatalf("%d of %d devices received their message", len(seen), n)
		}
	}
}
