package main

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"chatd/client"
	"chatd/daemon"
	"chatd/usersig"
)

// --- recovery after a gateway outage ---

// measuredCapacity is the gateway's login capacity (logins/s) measured by
// the logins section of this run, 0 before it ran.
var measuredCapacity float64

// benchRecovery is deliverable 5: one chatd process back after a 5 s
// outage of chatgw (with its embedded broker), against a bare paho client
// with paho's own reconnect; then a fleet of in-process daemons after the
// same outage.
func benchRecovery(ctx context.Context, o options) (table, error) {
	fleet := min(o.devices, 1000)
	outage := 5 * time.Second
	if o.smoke {
		fleet, outage = 10, time.Second
	}
	t := table{title: "Recovery after a gateway outage",
		note: fmt.Sprintf("chatgw with its embedded broker is killed (SIGKILL), restarted %v later, and timed from when its broker accepts connections again "+
			"until each device is LOGINED and connected again (its `onConnectSuccess`); reconnects per second are the connection attempts (`onConnecting`) "+
			"from the restart on, in the busiest second. chatd runs with the shipped `[reconnect]` defaults (min_delay 1 s, "+
			"max_delay 2 min). *one chatd* is the real chatd process, %d outages; the baseline is a bare paho client with paho's own reconnect "+
			"(defaults: 1 s doubling) beside it. *fleet* is %d daemons (the daemon package, as chatd runs it, all in the benchmark's process) "+
			"through one outage per run; the bound is max(2 s, 1.5 × N / C) with C the gateway's logins/s measured by the logins section of this run.", outage, o.runs, fleet),
		header: []string{"", "p50", "p99 / all back", "peak reconnects per second", "target"}}
	w, err := newWorld(ctx, o.bins, false, nil)
	if err != nil {
		return t, err
	}
	defer w.close()
	if err := w.startGateway(o.bins); err != nil {
		return t, err
	}
	one, bare, err := recoverOne(ctx, o, w, outage)
	if err != nil {
		return t, err
	}
	t.rows = append(t.rows,
		[]string{"one chatd", ms(medianDur(one)), ms(slices.Max(one)), "", "p50 <= 1.5 s"},
		[]string{"bare paho client, paho's reconnect (baseline)", ms(medianDur(bare)), ms(slices.Max(bare)), "", ""})
	var p50s, alls, peaks []float64
	for range o.runs {
		back, peak, err := recoverFleet(ctx, o, w, fleet, outage)
		if err != nil {
			return t, err
		}
		slices.Sort(back)
		p50s, alls, peaks = append(p50s, float64(back[len(back)/2])), append(alls, float64(back[len(back)-1])), append(peaks, float64(peak))
	}
	target := "C not measured"
	if measuredCapacity > 0 {
		target = fmt.Sprintf("all back <= %s (C = %.0f/s)", ms(time.Duration(math.Max(2, 1.5*float64(fleet)/measuredCapacity)*float64(time.Second))), measuredCapacity)
	}
	t.rows = append(t.rows, []string{fmt.Sprintf("fleet of %d", fleet), ms(time.Duration(median(p50s))), ms(time.Duration(median(alls))),
		fmt.Sprintf("%.0f (%.0f %% of the fleet)", median(peaks), 100*median(peaks)/float64(fleet)), target})
	return t, nil
}

// outageOf kills w's gateway, waits d and starts it again; it returns
// when the broker accepts connections again.
func outageOf(o options, w *world, d time.Duration) (time.Time, error) {
	w.gw.kill()
	w.gw = nil
	time.Sleep(d)
	if err := w.startGateway(o.bins); err != nil {
		return time.Time{}, err
	}
	return time.Now(), nil
}

func recoverOne(ctx context.Context, o options, w *world, outage time.Duration) (one, bare []time.Duration, err error) {
	dir, err := os.MkdirTemp(w.dir, "recover-")
	if err != nil {
		return nil, nil, err
	}
	user := "rec00001"
	sig, err := usersig.Generate(appID, key, user, 24*time.Hour, time.Now())
	if err != nil {
		return nil, nil, err
	}
	cfg, err := chatdConfig(w, dir, user, "")
	if err != nil {
		return nil, nil, err
	}
	d, err := startChatd(ctx, o.bins, cfg)
	if err != nil {
		return nil, nil, err
	}
	defer d.stop()
	if _, _, err := d.login(ctx, user, sig); err != nil {
		return nil, nil, err
	}
	buser := "rec00002"
	bsig, err := usersig.Generate(appID, key, buser, 24*time.Hour, time.Now())
	if err != nil {
		return nil, nil, err
	}
	b, err := startProc(o.bins.bareclient, w.broker(), buser, bsig, "i-"+buser, "reconnect")
	if err != nil {
		return nil, nil, err
	}
	defer b.stop()
	connects := func() []time.Time {
		var ts []time.Time
		for _, line := range strings.Split(b.out.String(), "\n") {
			if v, ok := strings.CutPrefix(line, "connected "); ok {
				n, _ := strconv.ParseInt(v, 10, 64)
				ts = append(ts, time.Unix(0, n))
			}
		}
		return ts
	}
	if !waitFor(10*time.Second, func() bool { return len(connects()) > 0 }) {
		return nil, nil, errors.New("the bare client did not connect: " + b.out.String())
	}
	for range o.runs {
		seen := len(connects())
		back, err := outageOf(o, w, outage)
		if err != nil {
			return nil, nil, err
		}
		ev, err := d.waitEvent(client.EventConnectSuccess, nil)
		if err != nil {
			return nil, nil, fmt.Errorf("chatd after the outage: %w", err)
		}
		one = append(one, ev.Time.Sub(back))
		if !waitFor(60*time.Second, func() bool { return len(connects()) > seen }) {
			return nil, nil, errors.New("the bare client did not reconnect within 60 s")
		}
		bare = append(bare, connects()[seen].Sub(back))
		time.Sleep(time.Second)
	}
	return one, bare, nil
}

// recoverFleet runs n daemons logged in to w's gateway through one outage
// and returns when each was back, and the most reconnect attempts
// (onConnecting) the fleet made in one second.
func recoverFleet(ctx context.Context, o options, w *world, n int, outage time.Duration) ([]time.Duration, int, error) {
	dir, err := os.MkdirTemp(w.dir, "fleet-")
	if err != nil {
		return nil, 0, err
	}
	defer os.RemoveAll(dir)
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	type dev struct {
		d      *daemon.Daemon
		events <-chan client.Event
		stop   func()
	}
	devs := make([]dev, n)
	ready := make(chan int, n)
	errs := make(chan error, n)
	for i := range n {
		cfg := daemon.DefaultConfig()
		cfg.SDKAppID = appID
		cfg.Broker = daemon.Brokers{w.broker()}
		cfg.StateDB = filepath.Join(dir, fmt.Sprintf("%d.db", i))
		cfg.Socket = filepath.Join(dir, fmt.Sprintf("%d.sock", i))
		cfg.Log.Level = "error"
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := daemon.Main(ctx, cfg, daemon.RunOptions{Logger: quiet, Started: func(d *daemon.Daemon) {
				ev, stop := d.Subscribe()
				devs[i] = dev{d: d, events: ev, stop: stop}
			}, Ready: func() { ready <- i }})
			if err != nil && ctx.Err() == nil {
				errs <- err
			}
		}()
	}
	for range n {
		select {
		case <-ready:
		case err := <-errs:
			return nil, 0, fmt.Errorf("a daemon of the fleet: %w", err)
		case <-time.After(60 * time.Second):
			return nil, 0, errors.New("the fleet's daemons did not start")
		}
	}
	// Log every device in, 64 at a time.
	sem := make(chan struct{}, 64)
	var lerr error
	var mu sync.Mutex
	var lw sync.WaitGroup
	for i := range n {
		lw.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; lw.Done() }()
			user := fmt.Sprintf("fleet%05d", i)
			sig, err := usersig.Generate(appID, key, user, 24*time.Hour, time.Now())
			if err == nil {
				if code, desc := devs[i].d.Login(ctx, user, usersig.NewSecret(sig)); code != 0 {
					err = fmt.Errorf("fleet login %s: %d %s", user, code, desc)
				}
			}
			if err != nil {
				mu.Lock()
				lerr = err
				mu.Unlock()
			}
		}()
	}
	lw.Wait()
	if lerr != nil {
		return nil, 0, lerr
	}
	// Drain what the logins emitted, then follow each device.
	type mark struct {
		i    int
		t    time.Time
		back bool
	}
	marks := make(chan mark, 4*n)
	for i := range devs {
		for len(devs[i].events) > 0 {
			<-devs[i].events
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case ev, ok := <-devs[i].events:
					if !ok {
						return
					}
					switch ev.Type {
					case client.EventConnecting:
						marks <- mark{i: i, t: ev.Time}
					case client.EventConnectSuccess:
						marks <- mark{i: i, t: ev.Time, back: true}
					}
				case <-ctx.Done():
					return
				}
			}
		}()
	}
	back, err := outageOf(o, w, outage)
	if err != nil {
		return nil, 0, err
	}
	got := make([]time.Duration, n)
	var attempts []time.Time
	left := n
	timeout := time.After(5 * time.Minute)
	for left > 0 {
		select {
		case m := <-marks:
			if !m.back {
				if !m.t.Before(back) { // the attempts the restarted broker saw
					attempts = append(attempts, m.t)
				}
				continue
			}
			if got[m.i] == 0 {
				got[m.i] = max(m.t.Sub(back), time.Nanosecond)
				left--
			}
		case <-timeout:
			return nil, 0, fmt.Errorf("%d of %d devices not back 5 min after the outage", left, n)
		}
	}
	// Peak attempts in any one-second window from the restart on.
	slices.SortFunc(attempts, func(a, b time.Time) int { return a.Compare(b) })
	peak := 0
	for i, j := 0, 0; j < len(attempts); j++ {
		for attempts[j].Sub(attempts[i]) >= time.Second {
			i++
		}
		peak = max(peak, j-i+1)
	}
	for _, d := range devs {
		d.stop()
	}
	return got, peak, nil
}
