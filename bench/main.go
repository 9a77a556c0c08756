// Command bench is the project's benchmark suite (`make bench`). Each
// figure is measured against its baseline in the same run and reported as
// a ratio; the tables go to docs/benchmarks.md. Benchmarks are not tests:
// nothing here passes or fails on time.
//
//	go run ./bench [-devices N] [-runs N] [-out docs/benchmarks.md]
//
// -smoke runs everything with tiny sizes, to keep the suite working.
package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"chatd/gateway"
	"chatd/mqtt"
	"chatd/usersig"
)

const (
	appID  = 1400000001
	keyHex = "5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e"
)

var key = usersig.NewSecret(keyHex)

type options struct {
	devices  int // devices for the login and memory figures
	inflight int // logins in flight at once
	runs     int // repetitions; medians are reported
	out      string
	smoke    bool
	only     string // comma-separated section names; "" runs all
	idle     time.Duration
	procs    bool  // the logins figure's brokers as processes of their own
	bins     *bins // the binaries run as processes
}

func main() {
	if addr := os.Getenv(responderEnv); addr != "" {
		if err := runResponder(addr); err != nil {
			fmt.Fprintln(os.Stderr, "bench: responder:", err)
			os.Exit(1)
		}
		return
	}
	var o options
	flag.IntVar(&o.devices, "devices", 2000, "devices for the gateway login and broker memory figures")
	flag.IntVar(&o.inflight, "inflight", 256, "logins in flight at once")
	flag.IntVar(&o.runs, "runs", 3, "runs of each figure (medians are reported)")
	flag.StringVar(&o.out, "out", "", "write the tables to this Markdown file (docs/benchmarks.md)")
	flag.BoolVar(&o.smoke, "smoke", false, "tiny sizes: check that the suite runs, report nothing")
	flag.BoolVar(&o.procs, "procs", false, "run the logins figure's brokers (chatgw, the responder) as processes of their own: needed where one process would hold more than the open-file limit (2 per device)")
	flag.DurationVar(&o.idle, "idle", time.Minute, "the idle footprint's window")
	flag.StringVar(&o.only, "only", "", "run only these sections (comma-separated: "+strings.Join(sectionNames(), ",")+"); the file is not written")
	flag.Parse()
	if o.smoke {
		o.devices, o.inflight, o.runs = 50, 16, 1
	}
	if err := run(context.Background(), o); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// table is one Markdown table of the report.
type table struct {
	title, note string
	header      []string
	rows        [][]string
}

func (t table) markdown() string {
	var b strings.Builder
	fmt.Fprintf(&b, "## %s\n\n", t.title)
	if t.note != "" {
		fmt.Fprintf(&b, "%s\n\n", t.note)
	}
	fmt.Fprintf(&b, "| %s |\n|%s\n", strings.Join(t.header, " | "), strings.Repeat("---|", len(t.header)))
	for _, r := range t.rows {
		fmt.Fprintf(&b, "| %s |\n", strings.Join(r, " | "))
	}
	return b.String()
}

func run(ctx context.Context, o options) error {
	var err error
	if o.bins, err = buildBins(ctx); err != nil {
		return err
	}
	defer os.RemoveAll(o.bins.dir)
	var tables []table
	for _, s := range sections {
		if o.only != "" && !slices.Contains(strings.Split(o.only, ","), s.name) {
			continue
		}
		t, err := s.run(ctx, o)
		if err != nil {
			return fmt.Errorf("%s: %w", s.name, err)
		}
		fmt.Println(t.markdown())
		tables = append(tables, t)
	}
	if o.out == "" || o.smoke || o.only != "" {
		return nil
	}
	var b strings.Builder
	b.WriteString(sectionBegin + "\n")
	b.WriteString("## The `make bench` suite\n\n")
	b.WriteString("Written by `make bench` (`go run ./bench -out docs/benchmarks.md`) between its markers; the\n")
	b.WriteString("rest of this file is measured and written by hand. Every figure is\n")
	fmt.Fprintf(&b, "measured against its baseline in the same run, on the same machine (%d CPUs, %s/%s); the\n", runtime.NumCPU(), runtime.GOOS, runtime.GOARCH)
	fmt.Fprintf(&b, "ratio is what to compare across machines. Medians of %d runs. Reproduce with `make bench`\n", o.runs)
	fmt.Fprintf(&b, "(or `go run ./bench -devices %d -runs %d -out docs/benchmarks.md`).\n\n", o.devices, o.runs)
	for _, t := range tables {
		b.WriteString(strings.Replace(t.markdown(), "## ", "### ", 1))
		b.WriteString("\n")
	}
	b.WriteString(strings.Replace(notYet, "## ", "### ", 1))
	b.WriteString(sectionEnd + "\n")
	return writeSection(o.out, b.String())
}

// sections are the suite's figures, in the order of the report.
var sections = []struct {
	name string
	run  func(context.Context, options) (table, error)
}{
	{"engine", benchEngine},
	{"logins", benchLogins},
	{"memory", benchBrokerMemory},
	{"chatd-login", benchChatdLogin},
	{"recovery", benchRecovery},
	{"idle", benchIdle},
	{"size", benchSize},
}

func sectionNames() []string {
	var n []string
	for _, s := range sections {
		n = append(n, s.name)
	}
	return n
}

// The suite's part of docs/benchmarks.md lies between these markers; the
// rest of the file is kept as it is.
const (
	sectionBegin = "<!-- make bench: begin -->"
	sectionEnd   = "<!-- make bench: end -->"
)

// writeSection replaces the suite's section of path (or appends it).
func writeSection(path, section string) error {
	old, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		return err
	}
	s := string(old)
	i, j := strings.Index(s, sectionBegin), strings.Index(s, sectionEnd)
	switch {
	case i >= 0 && j > i:
		s = s[:i] + section + strings.TrimPrefix(s[j+len(sectionEnd):], "\n")
	case s == "":
		s = "# Benchmarks\n\n" + section
	default:
		s = strings.TrimRight(s, "\n") + "\n\n" + section
	}
	return os.WriteFile(path, []byte(s), 0o644)
}

// notYet says which figures the default run leaves out.
const notYet = `## Not part of the default run

The logins and memory figures at 10,000 devices:
` + "`go run ./bench -only logins,memory -devices 10000 -runs 1 -procs`" + `
measures them (each broker in a process of its own, so that no process
holds more than one end of each connection; Mosquitto and chatgw on it are
processes of their own in every run).
`

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	return s[len(s)/2]
}

// --- the engine's cost per event against the fleet size ---

var benchLine = regexp.MustCompile(`^Benchmark(Engine\w+)/sessions=(\d+)-\d+\s+\d+\s+([0-9.]+) ns/op`)

// benchEngine runs the gateway's Go benchmarks; the baseline of each is
// the same event at 100 sessions.
func benchEngine(ctx context.Context, o options) (table, error) {
	t := table{title: "Gateway engine: cost per event against the fleet size",
		note:   "`go test -bench BenchmarkEngine ./gateway/`: one event with 100, 1,000 and 10,000 sessions (one per user). The baseline is the same event at 100 sessions; flat means a ratio near 1.",
		header: []string{"event", "100 sessions", "1,000", "10,000", "10,000 / 100"}}
	benchtime := "2000x"
	if o.smoke {
		benchtime = "10x"
	}
	res := map[string]map[string][]float64{}
	var err error
	cmd := exec.CommandContext(ctx, "go", "test", "-run", "^$", "-bench", "^BenchmarkEngine", "-benchtime", benchtime, "-count", strconv.Itoa(o.runs), "./gateway/")
	cmd.Stderr = os.Stderr
	if cmd.Dir, err = moduleRoot(ctx); err != nil {
		return t, err
	}
	out, err := cmd.Output()
	if err != nil {
		return t, fmt.Errorf("go test -bench: %w\n%s", err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		m := benchLine.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		v, _ := strconv.ParseFloat(m[3], 64)
		if res[m[1]] == nil {
			res[m[1]] = map[string][]float64{}
		}
		res[m[1]][m[2]] = append(res[m[1]][m[2]], v)
	}
	for _, ev := range []string{"EngineLogin", "EngineResume", "EngineTick"} {
		r := res[ev]
		if r == nil {
			return t, fmt.Errorf("no result for Benchmark%s in:\n%s", ev, out)
		}
		a, b, c := median(r["100"]), median(r["1000"]), median(r["10000"])
		t.rows = append(t.rows, []string{strings.TrimPrefix(ev, "Engine"), ns(a), ns(b), ns(c), fmt.Sprintf("%.2fx", c/a)})
	}
	return t, nil
}

func ns(v float64) string {
	switch {
	case v >= 1e6:
		return fmt.Sprintf("%.2f ms", v/1e6)
	case v >= 1e3:
		return fmt.Sprintf("%.1f µs", v/1e3)
	}
	return fmt.Sprintf("%.0f ns", v)
}

// --- logins through the gateway against a do-nothing responder ---

type loginResult struct {
	rate     float64 // logins per second
	p50, p99 time.Duration
}

func benchLogins(ctx context.Context, o options) (table, error) {
	t := table{title: fmt.Sprintf("Logins: %d devices, %d in flight, embedded broker and Mosquitto", o.devices, o.inflight),
		note: "Every device is connected first; then all log in, " + strconv.Itoa(o.inflight) + " at a time. The baseline is a do-nothing responder " +
			"on the same broker, answering every request at once with a canned success (no UserSig check, no state). " +
			"On Mosquitto (the shipped `build/mosquitto/mosquitto.conf`, only paths and port changed) the devices log in with accounts of the password file, " +
			"chatgw runs as a process of its own and the responder is a client with the gateway's account.",
		header: []string{"", "logins/s", "p50", "p99"}}
	if o.procs {
		t.note += " On the embedded broker each broker (chatgw, the responder) runs as a process of its own (`-procs`), the devices in the benchmark's."
	} else {
		t.note += " On the embedded broker, brokers and devices run in the benchmark's process."
	}
	med := func(rs []loginResult) loginResult {
		var a, b, c []float64
		for _, r := range rs {
			a, b, c = append(a, r.rate), append(b, float64(r.p50)), append(c, float64(r.p99))
		}
		return loginResult{median(a), time.Duration(median(b)), time.Duration(median(c))}
	}
	row := func(name string, r loginResult) []string {
		return []string{name, fmt.Sprintf("%.0f", r.rate), r.p50.Round(time.Millisecond / 10).String(), r.p99.Round(time.Millisecond / 10).String()}
	}
	ratioRow := func(name string, g, b loginResult) []string {
		return []string{name, fmt.Sprintf("%.2fx", g.rate/b.rate), fmt.Sprintf("%.2fx", float64(g.p50)/float64(b.p50)), fmt.Sprintf("%.2fx", float64(g.p99)/float64(b.p99))}
	}
	brokers := []bool{false}
	if _, err := exec.LookPath("mosquitto"); err == nil {
		brokers = append(brokers, true)
	}
	for _, mosq := range brokers {
		var gw, base []loginResult
		for range o.runs {
			r, err := loginRun(ctx, o, false, mosq)
			if err != nil {
				return t, fmt.Errorf("gateway logins (Mosquitto %v): %w", mosq, err)
			}
			gw = append(gw, r)
			r, err = loginRun(ctx, o, true, mosq)
			if err != nil {
				return t, fmt.Errorf("responder logins (Mosquitto %v): %w", mosq, err)
			}
			base = append(base, r)
		}
		g, b := med(gw), med(base)
		if !mosq {
			measuredCapacity = g.rate
			t.rows = append(t.rows, row("chatgw (embedded broker, state file)", g), row("do-nothing responder (baseline)", b),
				ratioRow("ratio (targets: logins/s >= 0.5x, p99 <= 3x)", g, b))
			continue
		}
		t.rows = append(t.rows, row("chatgw on Mosquitto (state file)", g), row("do-nothing responder on Mosquitto (baseline)", b),
			ratioRow("ratio on Mosquitto", g, b))
	}
	if len(brokers) == 1 {
		t.rows = append(t.rows, []string{"Mosquitto", "not installed", "", ""})
	}
	return t, nil
}

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// loginRun starts a broker (with the gateway, or with the responder),
// connects the devices, and times their logins.
func loginRun(ctx context.Context, o options, responder, mosquitto bool) (loginResult, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	dir, err := os.MkdirTemp("", "chatd-bench-")
	if err != nil {
		return loginResult{}, err
	}
	defer os.RemoveAll(dir)
	var addr string
	password := func(user, sig string) string { return sig }
	topics := mqtt.Topics{Prefix: mqtt.DefaultPrefix}
	switch {
	case mosquitto:
		w, err := newWorld(ctx, o.bins, true, deviceUsers("d", o.devices))
		if err != nil {
			return loginResult{}, err
		}
		defer w.close()
		if responder {
			stop, err := w.startMosquittoResponder(ctx)
			if err != nil {
				return loginResult{}, err
			}
			defer stop()
		} else if err := w.startGateway(o.bins); err != nil {
			return loginResult{}, err
		}
		addr, password = w.addr, w.devicePassword
	case o.procs:
		// The broker in a process of its own, so that each process holds
		// one end of every connection (the open-file limit).
		if addr, err = freeAddr(); err != nil {
			return loginResult{}, err
		}
		var p *proc
		if responder {
			self, err := os.Executable()
			if err != nil {
				return loginResult{}, err
			}
			p, err = startProcEnv(self, []string{responderEnv + "=" + addr})
			if err != nil {
				return loginResult{}, err
			}
		} else {
			keyFile := filepath.Join(dir, "key")
			if err := os.WriteFile(keyFile, []byte(keyHex+"\n"), 0o600); err != nil {
				return loginResult{}, err
			}
			p, err = startProc(o.bins.chatgw, "serve", "--sdkappid", strconv.Itoa(appID), "--key-file", keyFile, "--state", filepath.Join(dir, "gw.db"),
				"--embedded-broker", addr, "--log-level", "error", "--device-rate", "1000")
			if err != nil {
				return loginResult{}, err
			}
		}
		defer p.stop()
		if !waitFor(20*time.Second, func() bool { return p.exited() || listening(addr) }) || p.exited() {
			return loginResult{}, fmt.Errorf("the broker did not listen on %s: %s", addr, p.out.String())
		}
		time.Sleep(200 * time.Millisecond) // the gateway subscribes after the broker listens
	case responder:
		emb, err := gateway.StartEmbedded(gateway.EmbeddedOptions{Addr: "127.0.0.1:0", Topics: topics, SDKAppID: appID, Key: key, Logger: quiet, RateLimit: gateway.RateLimit{Rate: -1}})
		if err != nil {
			return loginResult{}, err
		}
		defer emb.Close()
		addr = emb.Addr().String()
		if err := startResponder(ctx, emb, topics); err != nil {
			return loginResult{}, err
		}
	default:
		ready := make(chan net.Addr, 1)
		done := make(chan error, 1)
		go func() {
			done <- gateway.Run(ctx, gateway.ServeConfig{
				Options:        gateway.Options{Config: gateway.Config{SDKAppID: appID, Key: key}, StatePath: filepath.Join(dir, "gw.db"), Logger: quiet, Topics: topics},
				EmbeddedBroker: "127.0.0.1:0",
				RateLimit:      gateway.RateLimit{Rate: -1},
				Ready:          func(b, _ net.Addr) { ready <- b },
			})
		}()
		select {
		case a := <-ready:
			addr = a.String()
		case err := <-done:
			return loginResult{}, err
		}
		defer func() { cancel(); <-done }()
	}
	devs, err := connectDevices(ctx, "tcp://"+addr, topics, o.devices, "d", password)
	if err != nil {
		return loginResult{}, err
	}
	defer func() {
		for _, d := range devs {
			d.c.Disconnect(0)
		}
	}()
	lat := make([]time.Duration, len(devs))
	var next atomic.Int64
	var failed atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for range o.inflight {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= len(devs) {
					return
				}
				d := devs[i]
				t0 := time.Now()
				d.c.Publish(topics.Up(d.user, d.inst), 1, false, mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: "l1", UserSig: d.sig}))
				select {
				case r := <-d.answers:
					if r.Code != 0 {
						failed.Add(1)
					}
				case <-time.After(30 * time.Second):
					failed.Add(1)
				}
				lat[i] = time.Since(t0)
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	if n := failed.Load(); n > 0 {
		return loginResult{}, fmt.Errorf("%d of %d logins failed or timed out", n, len(devs))
	}
	slices.Sort(lat)
	return loginResult{rate: float64(len(devs)) / elapsed.Seconds(), p50: lat[len(lat)/2], p99: lat[len(lat)*99/100]}, nil
}

// responderEnv makes the suite's binary the do-nothing responder on an
// embedded broker listening at its value, for -procs.
const responderEnv = "CHATD_BENCH_RESPONDER"

func runResponder(addr string) error {
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()
	topics := mqtt.Topics{Prefix: mqtt.DefaultPrefix}
	emb, err := gateway.StartEmbedded(gateway.EmbeddedOptions{Addr: addr, Topics: topics, SDKAppID: appID, Key: key, Logger: quiet, RateLimit: gateway.RateLimit{Rate: -1}})
	if err != nil {
		return err
	}
	defer emb.Close()
	if err := startResponder(ctx, emb, topics); err != nil {
		return err
	}
	<-ctx.Done()
	return nil
}

// startResponder answers every device request on the broker with a
// canned success, doing nothing else.
func startResponder(ctx context.Context, emb *gateway.Embedded, topics mqtt.Topics) error {
	bo := emb.BrokerOptions()
	o := paho.NewClientOptions().AddBroker("tcp://embedded").SetClientID(bo.ClientID).SetAutoReconnect(false).SetOrderMatters(false)
	o.SetCustomOpenConnectionFn(func(*url.URL, paho.ClientOptions) (net.Conn, error) { return bo.Dial(ctx) })
	c := paho.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		return fmt.Errorf("responder connect: %v", tok.Error())
	}
	tok := c.Subscribe(topics.UpFilter(), 1, func(c paho.Client, m paho.Message) {
		user, inst, err := topics.ParseUp(m.Topic())
		if err != nil {
			return
		}
		req, err := mqtt.Decode(m.Payload())
		if err != nil {
			return
		}
		c.Publish(topics.Down(user, inst), 1, false, mqtt.Encode(mqtt.Message{Type: mqtt.TypeLoginResult, ID: req.ID, Session: "s", ServerTimeMs: 1}))
	})
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		return fmt.Errorf("responder subscribe: %v", tok.Error())
	}
	go func() { <-ctx.Done(); c.Disconnect(0) }()
	return nil
}

type device struct {
	user, inst, sig string
	c               paho.Client
	answers         chan mqtt.Message
}

// deviceUser is the user of connectDevices' device i; deviceUsers are
// the users of n devices.
func deviceUser(prefix string, i int) string { return fmt.Sprintf("%s%05d", prefix, i) }

func deviceUsers(prefix string, n int) []string {
	us := make([]string, n)
	for i := range us {
		us[i] = deviceUser(prefix, i)
	}
	return us
}

// connectDevices connects n devices (user prefix+i, instance "i-" and the
// user), each subscribed to its down topic, 64 at a time; password gives a
// device's MQTT password from its user and its UserSig.
func connectDevices(ctx context.Context, broker string, topics mqtt.Topics, n int, prefix string, password func(user, sig string) string) ([]*device, error) {
	devs := make([]*device, n)
	errs := make(chan error, n)
	sem := make(chan struct{}, 64)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			user := deviceUser(prefix, i)
			sig, err := usersig.Generate(appID, key, user, 24*time.Hour, time.Now())
			if err != nil {
				errs <- err
				return
			}
			d := &device{user: user, inst: "i-" + user, sig: sig, answers: make(chan mqtt.Message, 8)}
			o := paho.NewClientOptions().AddBroker(broker).SetClientID(d.inst).SetUsername(user).SetPassword(password(user, sig)).
				SetAutoReconnect(false).SetConnectTimeout(30 * time.Second).SetKeepAlive(5 * time.Minute)
			d.c = paho.NewClient(o)
			if tok := d.c.Connect(); !tok.WaitTimeout(60*time.Second) || tok.Error() != nil {
				errs <- fmt.Errorf("device %s: connect: %v", user, tok.Error())
				return
			}
			tok := d.c.Subscribe(topics.Down(user, d.inst), 1, func(_ paho.Client, m paho.Message) {
				if r, err := mqtt.Decode(m.Payload()); err == nil {
					select {
					case d.answers <- r:
					default:
					}
				}
			})
			if !tok.WaitTimeout(60*time.Second) || tok.Error() != nil {
				errs <- fmt.Errorf("device %s: subscribe: %v", user, tok.Error())
				return
			}
			devs[i] = d
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		for _, d := range devs {
			if d != nil {
				d.c.Disconnect(0)
			}
		}
		return nil, err
	}
	return devs, nil
}

// --- the embedded broker's memory per connected device ---

// benchBrokerMemory runs chatgw with its embedded broker as its own
// process and reads its RSS before and after the devices connect; the
// baseline is the same process with no device.
func benchBrokerMemory(ctx context.Context, o options) (table, error) {
	t := table{title: fmt.Sprintf("Embedded broker: memory per connected device (%d devices)", o.devices),
		note: "chatgw serve --embedded-broker as its own process; RSS (VmRSS) after the devices connected and subscribed, minus its RSS with none, divided by the devices. " +
			"The devices run in the benchmark's process.",
		header: []string{"", "RSS idle", "RSS with devices", "per device"}}
	dir, err := os.MkdirTemp("", "chatd-bench-")
	if err != nil {
		return t, err
	}
	defer os.RemoveAll(dir)
	bin := filepath.Join(dir, "chatgw")
	build := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/chatgw")
	if build.Dir, err = moduleRoot(ctx); err != nil {
		return t, err
	}
	if out, err := build.CombinedOutput(); err != nil {
		return t, fmt.Errorf("building chatgw: %w\n%s", err, out)
	}
	keyFile := filepath.Join(dir, "key")
	if err := os.WriteFile(keyFile, []byte(keyHex+"\n"), 0o600); err != nil {
		return t, err
	}
	var idle, loaded, per []float64
	for r := range o.runs {
		i, l, err := memoryRun(ctx, bin, keyFile, filepath.Join(dir, fmt.Sprintf("gw%d.db", r)), o.devices)
		if err != nil {
			return t, err
		}
		idle, loaded, per = append(idle, i), append(loaded, l), append(per, (l-i)/float64(o.devices))
	}
	t.rows = [][]string{{"chatgw", kb(median(idle)), kb(median(loaded)), kb(median(per))}}
	return t, nil
}

func kb(bytes float64) string {
	if bytes >= 10<<20 {
		return fmt.Sprintf("%.1f MB", bytes/(1<<20))
	}
	return fmt.Sprintf("%.1f KB", bytes/1024)
}

func memoryRun(ctx context.Context, bin, keyFile, state string, n int) (idle, loaded float64, err error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, 0, err
	}
	addr := ln.Addr().String()
	ln.Close()
	cmd := exec.CommandContext(ctx, bin, "serve", "--sdkappid", strconv.Itoa(appID), "--key-file", keyFile, "--state", state,
		"--embedded-broker", addr, "--log-level", "error", "--device-rate", "1000")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return 0, 0, err
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	for i := 0; ; i++ {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			break
		}
		if i > 100 {
			return 0, 0, fmt.Errorf("chatgw did not listen on %s: %s", addr, stderr.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond)
	idle, err = rss(cmd.Process.Pid)
	if err != nil {
		return 0, 0, err
	}
	devs, err := connectDevices(ctx, "tcp://"+addr, mqtt.Topics{Prefix: mqtt.DefaultPrefix}, n, "m", func(_, sig string) string { return sig })
	if err != nil {
		return 0, 0, err
	}
	defer func() {
		for _, d := range devs {
			d.c.Disconnect(0)
		}
	}()
	time.Sleep(time.Second)
	loaded, err = rss(cmd.Process.Pid)
	return idle, loaded, err
}

// rss is a process's resident set size in bytes, from /proc.
func rss(pid int) (float64, error) { return procStatus(pid, "VmRSS:") }

// procStatus reads a size field (kB) of /proc/PID/status, in bytes.
func procStatus(pid int, field string) (float64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if v, ok := strings.CutPrefix(s.Text(), field); ok {
			n, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			return n * 1024, err
		}
	}
	return 0, fmt.Errorf("no %s in /proc/%d/status", field, pid)
}

// moduleRoot is the directory of the module's go.mod, where the go
// commands the suite runs must run.
func moduleRoot(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", errors.New("not inside the chatd module: run the suite from the repository")
	}
	return filepath.Dir(mod), nil
}
