package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	bolt "go.etcd.io/bbolt"

	"chatd/client"
	"chatd/gateway"
	"chatd/mqtt"
	"chatd/usersig"
)

// --- chatd's login and resume against a raw MQTT round trip ---

// rawTimes are the baselines: a bare paho client through the same broker
// to a do-nothing responder.
type rawTimes struct {
	rtt   []time.Duration // one request and its answer on an open connection
	login []time.Duration // connect, subscribe, one request and its answer: what a login takes on the wire
}

// rawRun times the baselines with n of each, on the embedded broker (run
// in this process, with the responder beside it) or on w's Mosquitto.
//
// With viaGateway, w's chatgw answers instead of the responder (its
// gateway must run): the same exchanges with the gateway's real work.
func rawRun(ctx context.Context, w *world, n int, viaGateway bool) (rawTimes, error) {
	var rt rawTimes
	topics := mqtt.Topics{Prefix: mqtt.DefaultPrefix}
	broker := w.broker()
	switch {
	case viaGateway:
	case w.mosquitto:
		stop, err := w.startMosquittoResponder(ctx)
		if err != nil {
			return rt, err
		}
		defer stop()
	default:
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		emb, err := gateway.StartEmbedded(gateway.EmbeddedOptions{Addr: "127.0.0.1:0", Topics: topics, SDKAppID: appID, Key: key, Logger: quiet, RateLimit: gateway.RateLimit{Rate: -1}})
		if err != nil {
			return rt, err
		}
		defer emb.Close()
		if err := startResponder(ctx, emb, topics); err != nil {
			return rt, err
		}
		broker = "tcp://" + emb.Addr().String()
	}
	user := "rawdev"
	sig, err := usersig.Generate(appID, key, user, 24*time.Hour, time.Now())
	if err != nil {
		return rt, err
	}
	pass := w.devicePassword(user, sig)
	dial := func(inst string, answers chan mqtt.Message) (paho.Client, error) {
		o := paho.NewClientOptions().AddBroker(broker).SetClientID(inst).SetUsername(user).SetPassword(pass).
			SetCleanSession(true).SetAutoReconnect(false).SetKeepAlive(30 * time.Second).SetOrderMatters(true)
		c := paho.NewClient(o)
		if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			return nil, fmt.Errorf("raw client connect: %v", tok.Error())
		}
		tok := c.Subscribe(topics.Down(user, inst), mqtt.QoSReply, func(_ paho.Client, m paho.Message) {
			if r, err := mqtt.Decode(m.Payload()); err == nil {
				select {
				case answers <- r:
				default:
				}
			}
		})
		if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			c.Disconnect(0)
			return nil, fmt.Errorf("raw client subscribe: %v", tok.Error())
		}
		return c, nil
	}
	request := func(c paho.Client, inst string, answers chan mqtt.Message, id string) error {
		c.Publish(topics.Up(user, inst), mqtt.QoSRequest, false, mqtt.Encode(mqtt.Message{Type: mqtt.TypeLogin, ID: id, UserID: user, UserSig: sig, Platform: "Linux"}))
		select {
		case r := <-answers:
			if r.Code != 0 {
				return fmt.Errorf("raw request answered %d %s", r.Code, r.Desc)
			}
			return nil
		case <-time.After(10 * time.Second):
			return errors.New("raw request: no answer in 10 s")
		}
	}
	answers := make(chan mqtt.Message, 4)
	tag := strconv.FormatInt(time.Now().UnixNano()%1e9, 36)
	for i := range n {
		// One client id, as a device has (the broker takes the last
		// connection over); towards the real gateway a new one each time,
		// so that each login is a new session with its commit, as chatd's
		// after a logout is.
		inst := "i-raw"
		if viaGateway {
			// Unique across runs too: the gateway refuses a login from
			// an instance that a later login kicked (6208).
			inst = fmt.Sprintf("i-raw-%s-%d", tag, i)
		}
		t0 := time.Now()
		c, err := dial(inst, answers)
		if err != nil {
			return rt, err
		}
		err = request(c, inst, answers, "l")
		rt.login = append(rt.login, time.Since(t0))
		c.Disconnect(0)
		if err != nil {
			return rt, err
		}
	}
	rttInst := "i-raw-rtt-" + tag
	c, err := dial(rttInst, answers)
	if err != nil {
		return rt, err
	}
	defer c.Disconnect(0)
	for i := range n + 1 {
		t0 := time.Now()
		if err := request(c, rttInst, answers, strconv.Itoa(i)); err != nil {
			return rt, err
		}
		if i > 0 { // the first warms the route up
			rt.rtt = append(rt.rtt, time.Since(t0))
		}
	}
	return rt, nil
}

// chatdTimes are chatd's own figures.
type chatdTimes struct {
	login                             []time.Duration // onConnecting to onConnectSuccess of a fresh login, in chatd's events
	loginAPI                          []time.Duration // the POST /v1/login call, from the caller's side
	resume                            []time.Duration // onConnecting to onConnectSuccess of a resume after the connection was cut
	commitsPerLogin, commitsPerResume float64
}

// device is one chatd process with its API client and its events.
type chatdProc struct {
	p      *proc
	c      *client.Client
	events chan client.Event
	cancel context.CancelFunc
	cfg    string
}

// chatdConfig writes a chatd config for w's broker into dir.
func chatdConfig(w *world, dir, user, extra string) (string, error) {
	mqttSection := ""
	if w.mosquitto {
		mqttSection = fmt.Sprintf("username = %q\npassword_file = %q\n", user, filepath.Join(w.dir, user+".pass"))
	}
	cfg := fmt.Sprintf(`sdkappid = %d
broker = %q
state_db = %q
socket = %q

[mqtt]
%s
[log]
level = "error"
%s`, appID, w.broker(), filepath.Join(dir, "state.db"), filepath.Join(dir, "chatd.sock"), mqttSection, extra)
	p := filepath.Join(dir, "chatd.toml")
	return p, os.WriteFile(p, []byte(cfg), 0o644)
}

// startChatd starts chatd (under wrap, e.g. strace, when given) and
// follows its events.
func startChatd(ctx context.Context, b *bins, cfg string, wrap ...string) (*chatdProc, error) {
	args := append(wrap, b.chatd, "--config", cfg)
	p, err := startProc(args[0], args[1:]...)
	if err != nil {
		return nil, err
	}
	sock := filepath.Join(filepath.Dir(cfg), "chatd.sock")
	d := &chatdProc{p: p, c: client.New(sock), events: make(chan client.Event, 256), cfg: cfg}
	if !waitFor(20*time.Second, func() bool {
		if p.exited() {
			return true
		}
		c, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		_, err := d.c.Status(c)
		return err == nil
	}) || p.exited() {
		p.kill()
		return nil, fmt.Errorf("chatd did not answer on %s: %s", sock, p.out.String())
	}
	ectx, cancel := context.WithCancel(ctx)
	d.cancel = cancel
	started := make(chan struct{})
	go func() {
		first := true
		for ev, err := range d.c.Events(ectx) {
			if err != nil {
				return
			}
			if first {
				close(started)
				first = false
				continue
			}
			d.events <- ev
		}
	}()
	select {
	case <-started:
	case <-time.After(10 * time.Second):
		d.stop()
		return nil, errors.New("chatd's event stream did not start")
	}
	return d, nil
}

func (d *chatdProc) stop() {
	if d.cancel != nil {
		d.cancel()
	}
	d.p.stop()
}

// waitEvent waits for an event of type typ and returns it; the events
// before it are passed to seen.
func (d *chatdProc) waitEvent(typ string, seen func(client.Event)) (client.Event, error) {
	timeout := time.After(30 * time.Second)
	var got []string
	for {
		select {
		case ev := <-d.events:
			if ev.Type == typ {
				return ev, nil
			}
			got = append(got, ev.Type)
			if seen != nil {
				seen(ev)
			}
		case <-timeout:
			return client.Event{}, fmt.Errorf("chatd: no %s event within 30 s (got %s)", typ, strings.Join(got, ", "))
		}
	}
}

// connectTime is the time from the last onConnecting to onConnectSuccess.
func (d *chatdProc) connectTime() (time.Duration, error) {
	var connecting time.Time
	ev, err := d.waitEvent(client.EventConnectSuccess, func(ev client.Event) {
		if ev.Type == client.EventConnecting {
			connecting = ev.Time
		}
	})
	if err != nil {
		return 0, err
	}
	if connecting.IsZero() {
		return 0, errors.New("chatd: onConnectSuccess without onConnecting")
	}
	return ev.Time.Sub(connecting), nil
}

func (d *chatdProc) status(ctx context.Context) client.Status {
	c, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	s, _ := d.c.Status(c)
	return s
}

var metricLine = regexp.MustCompile(`^(chatd_state_writes_total|chatd_resumes_total\{code="0"\}|chatd_logins_total\{code="0"\}) (\d+)`)

// metric reads one of chatd's counters.
func (d *chatdProc) metric(ctx context.Context, name string) (float64, error) {
	text, err := d.c.Metrics(ctx)
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(text, "\n") {
		if m := metricLine.FindStringSubmatch(line); m != nil && m[1] == name {
			return strconv.ParseFloat(m[2], 64)
		}
	}
	return 0, nil
}

// login logs in through chatd's API and returns the call's duration and
// chatd's own connect-to-online time.
func (d *chatdProc) login(ctx context.Context, user, sig string) (api, inDaemon time.Duration, err error) {
	t0 := time.Now()
	res, err := d.c.Login(ctx, user, sig)
	api = time.Since(t0)
	if err != nil {
		return 0, 0, fmt.Errorf("chatd login: %w", err)
	}
	if res.Code != 0 {
		return 0, 0, fmt.Errorf("chatd login: %d %s", res.Code, res.Desc)
	}
	inDaemon, err = d.connectTime()
	if err != nil {
		err = fmt.Errorf("login: %w\n%s", err, d.p.out.String())
	}
	return api, inDaemon, err
}

// logout logs out and waits until chatd closed its connection.
func (d *chatdProc) logout(ctx context.Context) error {
	if _, err := d.c.Logout(ctx); err != nil {
		return err
	}
	if !waitFor(10*time.Second, func() bool {
		s := d.status(ctx)
		return s.LoginStatus == client.Logout && !s.Connected && s.Phase == "Idle"
	}) {
		return errors.New("chatd did not close its connection after the logout")
	}
	return nil
}

// cut makes chatd lose its connection: a client with chatd's client id
// and account takes the connection over (the broker ends chatd's) and
// leaves at once; chatd then reconnects and resumes.
func (d *chatdProc) cut(ctx context.Context, w *world, user, sig string) error {
	inst := d.status(ctx).Instance
	o := paho.NewClientOptions().AddBroker(w.broker()).SetClientID(inst).SetUsername(user).SetPassword(w.devicePassword(user, sig)).
		SetCleanSession(true).SetAutoReconnect(false)
	c := paho.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		return fmt.Errorf("taking chatd's connection over: %v", tok.Error())
	}
	c.Disconnect(0)
	return nil
}

// chatdRun starts chatd on w (whose gateway runs) and times n logins and
// n resumes.
func chatdRun(ctx context.Context, b *bins, w *world, n int) (chatdTimes, error) {
	var ct chatdTimes
	dir, err := os.MkdirTemp(w.dir, "chatd-")
	if err != nil {
		return ct, err
	}
	user := "dev00001"
	sig, err := usersig.Generate(appID, key, user, 24*time.Hour, time.Now())
	if err != nil {
		return ct, err
	}
	cfg, err := chatdConfig(w, dir, user, "[reconnect]\nmin_delay = \"100ms\"\nmax_delay = \"200ms\"\n")
	if err != nil {
		return ct, err
	}
	d, err := startChatd(ctx, b, cfg)
	if err != nil {
		return ct, err
	}
	defer d.stop()
	var commits float64
	for i := range n + 1 {
		before, err := d.metric(ctx, "chatd_state_writes_total")
		if err != nil {
			return ct, err
		}
		api, in, err := d.login(ctx, user, sig)
		if err != nil {
			return ct, err
		}
		after, err := d.metric(ctx, "chatd_state_writes_total")
		if err != nil {
			return ct, err
		}
		if i > 0 { // the first creates the state file
			ct.loginAPI, ct.login = append(ct.loginAPI, api), append(ct.login, in)
			commits += after - before
		}
		if i < n {
			if err := d.logout(ctx); err != nil {
				return ct, err
			}
		}
	}
	ct.commitsPerLogin = commits / float64(n)
	resumes0, _ := d.metric(ctx, `chatd_resumes_total{code="0"}`)
	writes0, _ := d.metric(ctx, "chatd_state_writes_total")
	for range n {
		if err := d.cut(ctx, w, user, sig); err != nil {
			return ct, err
		}
		t, err := d.connectTime()
		if err != nil {
			return ct, fmt.Errorf("resume after a cut: %w (status %+v)\n%s", err, d.status(ctx), d.p.out.String())
		}
		ct.resume = append(ct.resume, t)
	}
	resumes1, _ := d.metric(ctx, `chatd_resumes_total{code="0"}`)
	writes1, _ := d.metric(ctx, "chatd_state_writes_total")
	if int(resumes1-resumes0) != n {
		return ct, fmt.Errorf("chatd made %v successful resumes for %d cuts", resumes1-resumes0, n)
	}
	ct.commitsPerResume = (writes1 - writes0) / float64(n)
	return ct, nil
}

// syncsPerLogin runs chatd under strace and counts its fdatasync and
// fsync calls per login and per resume (k of each). It returns -1s when
// strace is not installed.
func syncsPerLogin(ctx context.Context, b *bins, w *world, k int) (login, resume float64, err error) {
	strace, err := exec.LookPath("strace")
	if err != nil {
		return -1, -1, nil
	}
	dir, err := os.MkdirTemp(w.dir, "chatd-strace-")
	if err != nil {
		return 0, 0, err
	}
	user := "dev00002"
	sig, err := usersig.Generate(appID, key, user, 24*time.Hour, time.Now())
	if err != nil {
		return 0, 0, err
	}
	cfg, err := chatdConfig(w, dir, user, "[reconnect]\nmin_delay = \"100ms\"\nmax_delay = \"200ms\"\n")
	if err != nil {
		return 0, 0, err
	}
	trace := filepath.Join(dir, "trace")
	d, err := startChatd(ctx, b, cfg, strace, "-f", "-qq", "-e", "trace=fdatasync,fsync,sync_file_range,msync", "-o", trace)
	if err != nil {
		return 0, 0, err
	}
	defer d.stop()
	count := func() float64 {
		// strace writes each call as it returns; let it catch up.
		time.Sleep(100 * time.Millisecond)
		f, err := os.Open(trace)
		if err != nil {
			return 0
		}
		defer f.Close()
		n := 0
		s := bufio.NewScanner(f)
		for s.Scan() {
			if strings.Contains(s.Text(), "sync") && !strings.Contains(s.Text(), "resumed>") {
				n++
			}
		}
		return float64(n)
	}
	// The first login creates the state file; count the ones after.
	if _, _, err := d.login(ctx, user, sig); err != nil {
		return 0, 0, err
	}
	var syncs atomic.Int64
	for range k {
		if err := d.logout(ctx); err != nil {
			return 0, 0, err
		}
		before := count()
		if _, _, err := d.login(ctx, user, sig); err != nil {
			return 0, 0, err
		}
		syncs.Add(int64(count() - before))
	}
	login = float64(syncs.Load()) / float64(k)
	before := count()
	for range k {
		if err := d.cut(ctx, w, user, sig); err != nil {
			return 0, 0, err
		}
		if _, err := d.connectTime(); err != nil {
			return 0, 0, err
		}
	}
	resume = (count() - before) / float64(k)
	return login, resume, nil
}

func medianDur(ds []time.Duration) time.Duration {
	xs := make([]float64, len(ds))
	for i, d := range ds {
		xs[i] = float64(d)
	}
	return time.Duration(median(xs))
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2f ms", float64(d)/1e6) }

func ratio(a, b time.Duration) string { return fmt.Sprintf("%.2fx", float64(a)/float64(b)) }

// benchChatdLogin is deliverables 1 and 2: chatd's login and resume
// through the real chatd and chatgw, against raw round trips through the
// same broker, on the embedded broker and on Mosquitto as shipped.
func benchChatdLogin(ctx context.Context, o options) (table, error) {
	n := 30
	if o.smoke {
		n = 3
	}
	t := table{title: "chatd's login and resume against a raw MQTT round trip",
		note: fmt.Sprintf("The real chatd against the real chatgw, %d logins and %d resumes per run, medians. "+
			"*chatd login* is `POST /v1/login` as a caller sees it: chatd connects, subscribes, sends the login, the gateway verifies and commits, chatd commits and answers. "+
			"*in chatd* is the same login from chatd's `onConnecting` to its `onConnectSuccess` event (before chatd's commit and answer). "+
			"*chatd resume* is `onConnecting` to `onConnectSuccess` after the connection was cut (another client took chatd's client id over). "+
			"The baselines are a bare paho client through the same broker: to a do-nothing responder (*raw*), and to the real chatgw (*raw client, real gateway*); "+
			"*round trip* is one request and its answer on an open connection, *connect + request* is connect, subscribe, one request and its answer, which is what a login does on the wire. "+
			"Mosquitto runs with the shipped `build/mosquitto/mosquitto.conf` (only paths and port changed, logging to stderr). "+
			"Commits are chatd's bbolt writes (`chatd_state_writes_total`); syncs are chatd's fdatasync/fsync calls, counted with strace in a separate run.", n, n),
		header: []string{"", "embedded broker", "Mosquitto"}}
	type col struct {
		rtt, raw, gwRTT, gwRaw, api, login, resume time.Duration
		sync, commit                               time.Duration
		cl, cr                                     float64
		syncs                                      string
	}
	var cols, floors []col
	for _, mosq := range []bool{false, true} {
		if mosq {
			if _, err := exec.LookPath("mosquitto"); err != nil {
				cols = append(cols, col{syncs: "Mosquitto not installed"})
				continue
			}
		}
		w, err := newWorld(ctx, o.bins, mosq, []string{"rawdev", "dev00001", "dev00002"})
		if err != nil {
			return t, err
		}
		var rtt, raw, gwRTT, gwRaw, login, api, resume []time.Duration
		var cl, cr []float64
		for range o.runs {
			rt, err := rawRun(ctx, w, n, false)
			if err != nil {
				w.close()
				return t, fmt.Errorf("%s: raw: %w", w.name, err)
			}
			if err := w.startGateway(o.bins); err != nil {
				w.close()
				return t, err
			}
			gt, err := rawRun(ctx, w, n, true)
			if err != nil {
				w.close()
				return t, fmt.Errorf("%s: raw client, real gateway: %w", w.name, err)
			}
			ct, err := chatdRun(ctx, o.bins, w, n)
			w.stopGateway()
			if err != nil {
				w.close()
				return t, fmt.Errorf("%s: chatd: %w", w.name, err)
			}
			rtt, raw = append(rtt, medianDur(rt.rtt)), append(raw, medianDur(rt.login))
			gwRTT, gwRaw = append(gwRTT, medianDur(gt.rtt)), append(gwRaw, medianDur(gt.login))
			login, api, resume = append(login, medianDur(ct.login)), append(api, medianDur(ct.loginAPI)), append(resume, medianDur(ct.resume))
			cl, cr = append(cl, ct.commitsPerLogin), append(cr, ct.commitsPerResume)
		}
		if err := w.startGateway(o.bins); err != nil {
			w.close()
			return t, err
		}
		sl, sr, err := syncsPerLogin(ctx, o.bins, w, 5)
		if err == nil {
			fs, fc, ferr := diskFloor(w.dir, 5*n)
			c := col{sync: fs, commit: fc}
			err = ferr
			floors = append(floors, c)
		}
		w.close()
		if err != nil {
			return t, fmt.Errorf("%s: strace: %w", w.name, err)
		}
		c := col{sync: floors[len(floors)-1].sync, commit: floors[len(floors)-1].commit, rtt: medianDur(rtt), raw: medianDur(raw), gwRTT: medianDur(gwRTT), gwRaw: medianDur(gwRaw),
			api: medianDur(api), login: medianDur(login), resume: medianDur(resume), cl: median(cl), cr: median(cr), syncs: "strace not installed"}
		if sl >= 0 {
			c.syncs = fmt.Sprintf("%.1f / %.1f", sl, sr)
		}
		cols = append(cols, c)
	}
	row := func(name string, f func(col) string) {
		r := []string{name}
		for _, c := range cols {
			if c.rtt == 0 {
				r = append(r, c.syncs)
				continue
			}
			r = append(r, f(c))
		}
		t.rows = append(t.rows, r)
	}
	row("raw round trip (baseline)", func(c col) string { return ms(c.rtt) })
	row("raw connect + request (baseline)", func(c col) string { return ms(c.raw) })
	row("raw client, real gateway: round trip (a repeated login, no commit)", func(c col) string { return ms(c.gwRTT) })
	row("raw client, real gateway: connect + request (a new session each time)", func(c col) string { return ms(c.gwRaw) })
	row("**chatd login**", func(c col) string { return ms(c.api) })
	row("in chatd (onConnecting to onConnectSuccess)", func(c col) string { return ms(c.login) })
	row("**chatd resume**", func(c col) string { return ms(c.resume) })
	row("login / raw round trip (target 2.5x)", func(c col) string { return ratio(c.api, c.rtt) })
	row("login / raw connect + request", func(c col) string { return ratio(c.api, c.raw) })
	row("login / raw client, real gateway: connect + request", func(c col) string { return ratio(c.api, c.gwRaw) })
	row("resume / raw round trip (target 2x)", func(c col) string { return ratio(c.resume, c.rtt) })
	row("resume / raw connect + request", func(c col) string { return ratio(c.resume, c.raw) })
	row("the disk: fdatasync of 4 KiB / a bbolt commit", func(c col) string { return ms(c.sync) + " / " + ms(c.commit) })
	row("floor: raw connect + request + 2 bbolt commits (the gateway's, chatd's)", func(c col) string { return ms(c.raw + 2*c.commit) })
	row("login / that floor", func(c col) string { return ratio(c.api, c.raw+2*c.commit) })
	row("chatd's commits per login / resume", func(c col) string { return fmt.Sprintf("%.1f / %.1f", c.cl, c.cr) })
	row("chatd's syncs per login / resume", func(c col) string { return c.syncs })
	if len(cols) == 2 && cols[0].api > 0 && cols[1].api > 0 {
		t.rows = append(t.rows, []string{"login on Mosquitto / on the embedded broker (target 1.2x)", "", ratio(cols[1].api, cols[0].api)})
	}
	return t, nil
}

// diskFloor times, in dir, a 4 KiB write and fdatasync, and a bbolt
// commit of one small key (two fdatasyncs: the pages, then the meta page):
// the floor under each side's commit.
func diskFloor(dir string, n int) (sync, commit time.Duration, err error) {
	f, err := os.CreateTemp(dir, "floor-")
	if err != nil {
		return 0, 0, err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	buf := make([]byte, 4096)
	var ss, cs []time.Duration
	for range n {
		t0 := time.Now()
		if _, err := f.WriteAt(buf, 0); err != nil {
			return 0, 0, err
		}
		if err := syscall.Fdatasync(int(f.Fd())); err != nil {
			return 0, 0, err
		}
		ss = append(ss, time.Since(t0))
	}
	db, err := bolt.Open(filepath.Join(dir, "floor.db"), 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		return 0, 0, err
	}
	defer os.Remove(filepath.Join(dir, "floor.db"))
	defer db.Close()
	for i := range n + 1 {
		t0 := time.Now()
		err := db.Update(func(tx *bolt.Tx) error {
			b, err := tx.CreateBucketIfNotExists([]byte("b"))
			if err != nil {
				return err
			}
			return b.Put([]byte("k"), []byte(strconv.Itoa(i)))
		})
		if err != nil {
			return 0, 0, err
		}
		if i > 0 {
			cs = append(cs, time.Since(t0))
		}
	}
	return medianDur(ss), medianDur(cs), nil
}
