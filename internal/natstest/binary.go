// Package natstest runs a cluster of real nats-server processes on
// loopback for the cluster tests: it builds nats-server once per test
// binary from the version go.mod pins, starts N nodes from the shipped
// configuration (build/nats/nats-server.conf) with JetStream, MQTT and the
// accounts include, waits until they have a JetStream meta leader, and
// kills (-9), restarts and partitions nodes.
//
// A partition cuts a node's routes, not its clients: every route between
// two nodes runs through a proxy in the test process, and cutting a node
// stalls (reads and drops) all traffic on its routes, as a network that
// stops delivering packets does. The nodes find out as in a real
// partition, by their route pings going unanswered; the devices and
// gateways connected to the node keep their connections, as the clients
// on the node's side of a real partition do.
package natstest

import (
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"

	"chatd/internal/proctest"
)

var (
	buildMu  sync.Mutex
	binPath  string
	buildDir string
)

// Binary builds nats-server (the version go.mod pins as a tool) once per
// test binary and returns its path.
func Binary(t testing.TB) string {
	t.Helper()
	buildMu.Lock()
	defer buildMu.Unlock()
	if binPath != "" {
		return binPath
	}
	d, err := os.MkdirTemp("", "chatd-natstest-bin")
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(d, "nats-server")
	cmd := exec.Command("go", "build", "-o", out, "github.com/nats-io/nats-server/v2")
	cmd.Dir = proctest.ModuleRoot(t)
	if b, err := cmd.CombinedOutput(); err != nil {
		os.RemoveAll(d)
		t.Fatalf("building nats-server from the pinned module: %v\n%s", err, b)
	}
	buildDir, binPath = d, out
	return out
}

// Cleanup removes the built binary; call it from TestMain after m.Run.
func Cleanup() {
	buildMu.Lock()
	defer buildMu.Unlock()
	if buildDir != "" {
		os.RemoveAll(buildDir)
		buildDir, binPath = "", ""
	}
}
