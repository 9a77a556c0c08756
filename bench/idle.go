package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"chatd/usersig"
)

// --- chatd idle against a bare paho client ---

// taskSwitches sums the voluntary and involuntary context switches of
// every thread of pid: each is one time a thread went to sleep or was
// preempted, so their growth over an idle window counts its wakeups.
func taskSwitches(pid int) (float64, error) {
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/status", pid))
	if err != nil || len(tasks) == 0 {
		return 0, fmt.Errorf("no threads of %d in /proc", pid)
	}
	var n float64
	for _, t := range tasks {
		b, err := os.ReadFile(t)
		if err != nil {
			continue // the thread ended
		}
		for _, line := range strings.Split(string(b), "\n") {
			for _, k := range []string{"voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"} {
				if v, ok := strings.CutPrefix(line, k); ok {
					x, _ := strconv.ParseFloat(strings.TrimSpace(v), 64)
					n += x
				}
			}
		}
	}
	return n, nil
}

type idleFigures struct{ rss, anon, wakeups float64 }

// idleWindow measures pids over d: RSS at the end, wakeups per minute.
func idleWindow(d time.Duration, pids ...int) ([]idleFigures, error) {
	before := make([]float64, len(pids))
	for i, p := range pids {
		var err error
		if before[i], err = taskSwitches(p); err != nil {
			return nil, err
		}
	}
	time.Sleep(d)
	out := make([]idleFigures, len(pids))
	for i, p := range pids {
		after, err := taskSwitches(p)
		if err != nil {
			return nil, err
		}
		r, err := rss(p)
		if err != nil {
			return nil, err
		}
		a, err := procStatus(p, "RssAnon:")
		if err != nil {
			return nil, err
		}
		out[i] = idleFigures{rss: r, anon: a, wakeups: (after - before[i]) / d.Minutes()}
	}
	return out, nil
}

// benchIdle is deliverable 6's idle figures: chatd logged in and idle
// against a bare paho client, both connected to the same gateway at once,
// measured over the same window.
func benchIdle(ctx context.Context, o options) (table, error) {
	window := o.idle
	if o.smoke {
		window = 2 * time.Second
	}
	t := table{title: "Idle footprint: chatd against a bare paho client",
		note: fmt.Sprintf("chatd logged in and idle (keepalive 30 s, the default; log level info; no API caller), and beside it a bare paho client "+
			"with chatd's connection settings (clean session, keepalive 30 s, ping timeout 4 s, ordered delivery, a Will), connected and subscribed, both to the "+
			"same chatgw with its embedded broker and measured over the same %v window, after 5 s to settle. RSS is VmRSS at the end, split into RssAnon (heap, stacks) and the rest (RssFile and RssShmem: the mapped pages of the binary and of chatd's state file, shared with the page cache); wakeups are the context "+
			"switches (voluntary and involuntary) of all threads over the window, from /proc/PID/task/*/status, per minute.", window),
		header: []string{"", "RSS", "of which anonymous", "of which file-backed (the binary's pages)", "wakeups per minute"}}
	w, err := newWorld(ctx, o.bins, false, nil)
	if err != nil {
		return t, err
	}
	defer w.close()
	if err := w.startGateway(o.bins); err != nil {
		return t, err
	}
	var cr, ca, cw, br, ba, bw []float64
	for r := range o.runs {
		f, err := idleRun(ctx, o, w, r, window)
		if err != nil {
			return t, err
		}
		cr, ca, cw = append(cr, f[0].rss), append(ca, f[0].anon), append(cw, f[0].wakeups)
		br, ba, bw = append(br, f[1].rss), append(ba, f[1].anon), append(bw, f[1].wakeups)
	}
	x := func(a, b []float64) string { return fmt.Sprintf("%.2fx", median(a)/median(b)) }
	file := func(r, a []float64) []float64 {
		f := make([]float64, len(r))
		for i := range r {
			f[i] = r[i] - a[i]
		}
		return f
	}
	t.rows = [][]string{
		{"chatd", kb(median(cr)), kb(median(ca)), kb(median(file(cr, ca))), fmt.Sprintf("%.0f", median(cw))},
		{"bare paho client (baseline)", kb(median(br)), kb(median(ba)), kb(median(file(br, ba))), fmt.Sprintf("%.0f", median(bw))},
		{"ratio (targets: RSS 1.3x, wakeups 1.2x)", x(cr, br), x(ca, ba), x(file(cr, ca), file(br, ba)), x(cw, bw)},
	}
	return t, nil
}

func idleRun(ctx context.Context, o options, w *world, r int, window time.Duration) ([]idleFigures, error) {
	dir, err := os.MkdirTemp(w.dir, "idle-")
	if err != nil {
		return nil, err
	}
	user := fmt.Sprintf("idle%05d", r)
	sig, err := usersig.Generate(appID, key, user, 24*time.Hour, time.Now())
	if err != nil {
		return nil, err
	}
	cfg, err := chatdConfig(w, dir, user, "")
	if err != nil {
		return nil, err
	}
	// Log at info, as shipped.
	b, _ := os.ReadFile(cfg)
	os.WriteFile(cfg, []byte(strings.Replace(string(b), `level = "error"`, `level = "info"`, 1)), 0o644)
	d, err := startChatd(ctx, o.bins, cfg)
	if err != nil {
		return nil, err
	}
	defer d.stop()
	if _, _, err := d.login(ctx, user, sig); err != nil {
		return nil, err
	}
	// chatd's event stream is closed for the window: it is an API caller.
	d.cancel()
	buser := fmt.Sprintf("bare%05d", r)
	bsig, err := usersig.Generate(appID, key, buser, 24*time.Hour, time.Now())
	if err != nil {
		return nil, err
	}
	bare, err := startProc(o.bins.bareclient, w.broker(), buser, bsig, "i-"+buser)
	if err != nil {
		return nil, err
	}
	defer bare.stop()
	if !waitFor(10*time.Second, func() bool { return strings.Contains(bare.out.String(), "ready") || bare.exited() }) || bare.exited() {
		return nil, errors.New("the bare client did not connect: " + bare.out.String())
	}
	settle := 5 * time.Second
	if o.smoke {
		settle = time.Second
	}
	time.Sleep(settle)
	return idleWindow(window, d.p.pid(), bare.pid())
}
