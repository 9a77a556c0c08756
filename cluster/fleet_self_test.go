//go:build cluster

package cluster

import (
	"context"
	"testing"
	"time"

	"chatd/client"
	"chatd/internal/natstest"
	"chatd/internal/proctest"
)

// The detection of the NATS transport matches the flag, not its
// neighbours, in both spellings the flag package prints.
func TestDetectsTheNATSFlag(t *testing.T) {
	for _, tc := range []struct {
		help string
		want bool
	}{
		{"  --nats URL,URL  (key nats)\n        NATS servers", true},
		{"  -nats string\n        NATS servers", true},
		{"  --nats-user NAME  (key nats_user)\n", false},
		{"  --broker URL  (key broker)\n        external broker URL; see --nats\n", false},
		{"", false},
	} {
		if got := hasNATS.MatchString(tc.help); got != tc.want {
			t.Errorf("%q: %v, want %v", tc.help, got, tc.want)
		}
	}
}

// The simulated device speaks the protocol the way the scenarios count
// on, checked against one real chatgw (embedded broker): login, a second
// instance's kick counted once, resume, logout, and the session lists.
func TestSimulatedDevice(t *testing.T) {
	e, g := newEmbeddedEnv(t)
	a := e.sim(t, "simuser", "i-a", 0)
	b := e.sim(t, "simuser", "i-b", 0)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r, n, err := a.login(ctx, a.sig)
	if err != nil || r.Code != 0 || r.Session == "" || n != 1 {
		t.Fatalf("a login: %+v after %d attempts, %v", r, n, err)
	}
	checkSessions(t, g, map[string]string{"simuser/i-a": a.Session()})
	if r, _, err := b.login(ctx, b.sig); err != nil || r.Code != 0 {
		t.Fatalf("b login: %+v %v", r, err)
	}
	proctest.Wait(t, 10*time.Second, "a kicked", func() bool { return a.kicks.Load() == 1 })
	if a.Session() != "" || b.kicks.Load() != 0 {
		t.Errorf("after the kick: a holds %q, b kicked %d times", a.Session(), b.kicks.Load())
	}
	checkSessions(t, g, map[string]string{"simuser/i-b": b.Session()})
	held := b.Session()
	if r, err := b.resume(ctx); err != nil || r.Code != 0 || r.Session != held {
		t.Errorf("resume: %+v %v, want %s", r, err, held)
	}
	if r, err := b.logout(5 * time.Second); err != nil || r.Code != 0 {
		t.Errorf("logout: %+v %v", r, err)
	}
	checkSessions(t, g, map[string]string{})
	// A wrong UserSig is refused, not retried.
	if r, n, err := a.login(ctx, "not-a-usersig"); err != nil || r.Code == 0 || n != 1 {
		t.Errorf("a bad UserSig: %+v after %d attempts, %v", r, n, err)
	}
}

// A real chatd connects to a node's MQTT listener with its NATS user, and
// moves to the next node in its broker list when that node is killed.
// (No gateway answers here, so it stays logging in; the scenarios log in.)
func TestChatdConnectsToTheClusterAndFailsOver(t *testing.T) {
	e := newClusterEnv(t, []string{"dev-1"}, 3)
	d := e.chatd("d", "dev-1", 1, 2, 0)
	// chatd's status says connected once the gateway answers; the nodes
	// say who is connected to them.
	proctest.Wait(t, 30*time.Second, "n1 to hold chatd's MQTT connection", func() bool { return mqttClients(e.c.Nodes[1]) == 1 })
	if n := mqttClients(e.c.Nodes[0]) + mqttClients(e.c.Nodes[2]); n != 0 {
		t.Errorf("%d MQTT connections on the other nodes", n)
	}
	e.c.Nodes[1].Kill()
	proctest.Wait(t, 60*time.Second, "n2 to hold chatd's MQTT connection", func() bool { return mqttClients(e.c.Nodes[2]) == 1 })
	if s := d.status(); s.LoginStatus != client.Logining {
		t.Errorf("chatd status %+v, want LOGINING (no gateway answers)", s)
	}
}

// mqttClients counts the node's MQTT client connections (-1: no answer).
func mqttClients(n *natstest.Node) int {
	ids, err := n.MQTTClients()
	if err != nil {
		return -1
	}
	return len(ids)
}
