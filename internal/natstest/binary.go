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
	"testing"

	"chatd/internal/proctest"
)

// Binary builds nats-server (the version go.mod pins as a tool) once per
// test binary and returns its path; proctest.Cleanup removes it.
func Binary(t testing.TB) string {
	t.Helper()
	return proctest.BuildPackage(t, "nats-server", "github.com/nats-io/nats-server/v2")
}
