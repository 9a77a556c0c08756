//go:build cluster

package cluster

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"chatd/internal/proctest"
)

// The capacity benchmark (not a test: it reports, it never judges):
// devices logging in through one gateway on a standalone node (the
// baseline) against three gateways on the three-node cluster, with the
// state's size in the key-value bucket. It writes its section of
// docs/benchmarks.md with -capacity.out:
//
//	go test -tags cluster -run '^$' -bench Capacity -benchtime 1x -timeout 60m ./cluster/ \
//	    -args -capacity.out docs/benchmarks.md
var (
	capDevices  = flag.Int("capacity.devices", 10000, "simulated devices per setup")
	capInflight = flag.Int("capacity.inflight", 256, "logins in flight at once")
	capOut      = flag.String("capacity.out", "", "write the results to this Markdown file (relative to the module root), between its markers")
	capShards   = flag.Int("capacity.shards", 0, "device accounts (nats-accounts --shards); 0: one per capacityPerShard devices")
)

// capConnecting is how many devices connect at once.
const capConnecting = 32

// capacityPerShard is the devices per account when -capacity.shards is 0:
// docs/scale-out.md's sizing.
const capacityPerShard = 1000

// capacityShards is the number of device accounts for n devices:
// -capacity.shards, or defaultShards.
func capacityShards(n int) int {
	if *capShards > 0 {
		return *capShards
	}
	return defaultShards(n)
}

// defaultShards is one account per capacityPerShard devices.
func defaultShards(n int) int { return max(1, (n+capacityPerShard-1)/capacityPerShard) }

type capResult struct {
	name        string
	devices     int
	connects    float64 // MQTT connections (with the down subscription) per second
	rate        float64 // logins per second
	p50, p99    time.Duration
	retries     int64 // answers that asked for a retry, or none in 5 s
	kvBytes     uint64
	kvPerDevice float64
	shards      int // device accounts
}

var (
	capMu      sync.Mutex
	capResults = map[string]capResult{}
)

func BenchmarkCapacity(b *testing.B) {
	requireNATSGateway(b)
	setups := []struct {
		name         string
		nodes, gates int
	}{
		{"one gateway, one node (R1)", 1, 1},
		{"three gateways, three nodes (R3)", 3, 3},
	}
	for _, s := range setups {
		b.Run(fmt.Sprintf("nodes=%d,gateways=%d", s.nodes, s.gates), func(b *testing.B) {
			r := capacityRun(b, s.name, s.nodes, s.gates, *capDevices, *capInflight)
			b.ReportMetric(r.connects, "connects/s")
			b.ReportMetric(r.rate, "logins/s")
			b.ReportMetric(float64(r.p50.Microseconds())/1000, "p50-ms")
			b.ReportMetric(float64(r.p99.Microseconds())/1000, "p99-ms")
			b.ReportMetric(r.kvPerDevice, "kv-bytes/device")
			capMu.Lock()
			capResults[s.name] = r
			capMu.Unlock()
		})
	}
	capMu.Lock()
	defer capMu.Unlock()
	if *capOut == "" || len(capResults) != len(setups) {
		return
	}
	var rs []capResult
	for _, s := range setups {
		rs = append(rs, capResults[s.name])
	}
	out := *capOut
	if !filepath.IsAbs(out) {
		out = filepath.Join(proctest.ModuleRoot(b), out)
	}
	if err := writeCapacitySection(out, capacitySection(rs, *capInflight)); err != nil {
		b.Fatal(err)
	}
}

// capacityRun starts a cluster of nodes with gates gateways, connects n
// simulated devices (spread over the nodes), and times their logins,
// inflight at a time.
func capacityRun(b *testing.B, name string, nodes, gates, n, inflight int) capResult {
	us := users("cap", n)
	shards := capacityShards(n)
	e := newShardedEnv(b, us, nodes, shards)
	// Every 5 s from 10,000 devices is 2,000 pings a second, and a ping
	// answered late under the load of connecting makes a device reconnect
	// and subscribe again: chatd's own default keepalive.
	e.keepAlive = 30 * time.Second
	for i := range gates {
		e.gateway(fmt.Sprintf("g%d", i))
	}
	devs := make([]*sim, n)
	connStart := time.Now()
	eachInflight(n, capConnecting, func(i int) { devs[i] = e.sim(b, us[i], "i-"+us[i], i%nodes) })
	connects := float64(n) / time.Since(connStart).Seconds()
	for i, d := range devs {
		if d == nil {
			b.Fatalf("%s: device %s did not connect (see above)", name, us[i])
		}
	}
	b.ResetTimer()
	lat := make([]time.Duration, n)
	var retries, failed atomic.Int64
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	start := time.Now()
	eachInflight(n, inflight, func(i int) {
		t0 := time.Now()
		r, attempts, err := devs[i].login(ctx, devs[i].sig)
		lat[i] = time.Since(t0)
		retries.Add(int64(attempts - 1))
		if err != nil || r.Code != 0 {
			failed.Add(1)
		}
	})
	elapsed := time.Since(start)
	b.StopTimer()
	if f := failed.Load(); f > 0 {
		b.Fatalf("%s: %d of %d logins failed", name, f, n)
	}
	slices.Sort(lat)
	st, err := e.c.Nodes[0].Stream("KV_" + bucket)
	if err != nil || !st.Found {
		b.Fatalf("the gateways' bucket %s on %s: %+v %v", bucket, e.c.Nodes[0].Name, st, err)
	}
	return capResult{name: name, devices: n, connects: connects, rate: float64(n) / elapsed.Seconds(), p50: lat[n/2], p99: lat[n*99/100],
		retries: retries.Load(), kvBytes: st.Bytes, kvPerDevice: float64(st.Bytes) / float64(n), shards: shards}
}

// The benchmark's part of docs/benchmarks.md lies between these markers;
// the rest of the file is kept as it is.
const (
	capBegin = "<!-- cluster capacity: begin -->"
	capEnd   = "<!-- cluster capacity: end -->"
)

func capacitySection(rs []capResult, inflight int) string {
	var b strings.Builder
	b.WriteString(capBegin + "\n")
	b.WriteString("## Capacity on a NATS cluster\n\n")
	fmt.Fprintf(&b, "Written by the cluster capacity benchmark between its markers. %d simulated devices\n", rs[0].devices)
	fmt.Fprintf(&b, "(paho clients speaking the device protocol) connect first, then all log in, %d at a time,\n", inflight)
	b.WriteString("each retrying as chatd does; a login's time runs from its first request to its answer.\n")
	b.WriteString("Connects/s is the connection phase before: MQTT CONNECT and the QoS 1 subscription to the\n")
	fmt.Fprintf(&b, "down topic, %d at a time, keepalive 30 s (on the cluster each one writes an R3 session record and makes a\n", capConnecting)
	b.WriteString("durable consumer).\n")
	per := "set by -capacity.shards"
	if rs[0].shards == defaultShards(rs[0].devices) {
		per = "one per 1,000 devices"
	}
	fmt.Fprintf(&b, "The devices are spread over %d NATS accounts (`chatgw nats-accounts --shards %d`, `chatgw serve --nats-shards %d`: %s,\n", rs[0].shards, rs[0].shards, rs[0].shards, per)
	b.WriteString("each account with MQTT streams of its own; see docs/scale-out.md).\n")
	b.WriteString("The baseline is one gateway on one standalone nats-server (bucket R1); against it, three\n")
	b.WriteString("gateways on the three-node cluster (bucket R3), the devices spread over the nodes. The KV\n")
	b.WriteString("bytes are the gateways' bucket on one node (one replica) after the logins, per device.\n")
	fmt.Fprintf(&b, "Everything runs on one machine (%d CPUs, %s/%s): the ratio is what to compare. Reproduce with\n\n", runtime.NumCPU(), runtime.GOOS, runtime.GOARCH)
	b.WriteString("    go test -tags cluster -run '^$' -bench Capacity -benchtime 1x -timeout 60m ./cluster/ \\\n")
	fmt.Fprintf(&b, "        -args -capacity.devices %d -capacity.out docs/benchmarks.md\n\n", rs[0].devices)
	b.WriteString("(`-capacity.shards N` sets the accounts; 1 puts every device in one.)\n\n")
	b.WriteString("| | connects/s | logins/s | p50 | p99 | retried requests | KV bytes per device |\n|---|---|---|---|---|---|---|\n")
	for _, r := range rs {
		fmt.Fprintf(&b, "| %s | %.0f | %.0f | %s | %s | %d | %.0f |\n", r.name, r.connects, r.rate, r.p50.Round(time.Millisecond/10), r.p99.Round(time.Millisecond/10), r.retries, r.kvPerDevice)
	}
	if len(rs) == 2 && rs[0].rate > 0 && rs[0].p50 > 0 && rs[0].p99 > 0 {
		fmt.Fprintf(&b, "| ratio (cluster / baseline) | %.2fx | %.2fx | %.2fx | %.2fx | | %.2fx |\n", rs[1].connects/max(rs[0].connects, 1e-9), rs[1].rate/rs[0].rate,
			float64(rs[1].p50)/float64(rs[0].p50), float64(rs[1].p99)/float64(rs[0].p99), rs[1].kvPerDevice/max(rs[0].kvPerDevice, 1))
	}
	b.WriteString(capEnd + "\n")
	return b.String()
}

// writeCapacitySection replaces the benchmark's section of path (or
// appends it), keeping the rest.
func writeCapacitySection(path, section string) error {
	old, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		return err
	}
	s := string(old)
	i, j := strings.Index(s, capBegin), strings.Index(s, capEnd)
	switch {
	case i >= 0 && j > i:
		s = s[:i] + section + strings.TrimPrefix(s[j+len(capEnd):], "\n")
	case s == "":
		s = "# Benchmarks\n\n" + section
	default:
		s = strings.TrimRight(s, "\n") + "\n\n" + section
	}
	return os.WriteFile(path, []byte(s), 0o644)
}

// The benchmark rewrites only its own section, and its table has the
// ratio row.
func TestCapacitySectionKeepsTheRest(t *testing.T) {
	p := filepath.Join(t.TempDir(), "b.md")
	other := "<!-- make bench: begin -->\nsuite\n<!-- make bench: end -->\n"
	os.WriteFile(p, []byte("# Benchmarks\n\nby hand\n\n"+other+"\n"+capBegin+"\nold\n"+capEnd+"\n\n## After\n\nkept\n"), 0o644)
	sec := capacitySection([]capResult{
		{name: "one", devices: 10, connects: 10, rate: 100, p50: time.Millisecond, p99: 2 * time.Millisecond, kvPerDevice: 200},
		{name: "three", devices: 10, connects: 5, rate: 150, p50: 2 * time.Millisecond, p99: 4 * time.Millisecond, kvPerDevice: 200},
	}, 4)
	if err := writeCapacitySection(p, sec); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(p)
	want := "# Benchmarks\n\nby hand\n\n" + other + "\n" + sec + "\n## After\n\nkept\n"
	if string(b) != want {
		t.Errorf("got\n%s\nwant\n%s", b, want)
	}
	if !strings.Contains(sec, "| ratio (cluster / baseline) | 0.50x | 1.50x | 2.00x | 2.00x | | 1.00x |") {
		t.Errorf("no ratio row in\n%s", sec)
	}
	// Appended to a file without the markers.
	q := filepath.Join(t.TempDir(), "c.md")
	os.WriteFile(q, []byte("# Benchmarks\n"), 0o644)
	writeCapacitySection(q, sec)
	if b, _ := os.ReadFile(q); string(b) != "# Benchmarks\n\n"+sec {
		t.Errorf("appended:\n%s", b)
	}
}
