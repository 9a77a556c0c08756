// Package board is the host's side of `make test-board`: test-board.sh
// builds the board's image (the root file system with the chatd and chatgw
// packages installed, the test config, the guest's check scripts) and runs
// TestBoard with BOARD_RUN naming the run's directory. TestBoard starts
// the host's chatgw, boots the image in QEMU, follows the guest's report
// ("BOARD: key=value" lines on a virtio serial port), acts on it (queries
// chatgw's admin API, stops chatgw for the broker outage, restarts it
// after the guest stepped its clock) and judges every check. Without
// BOARD_RUN it is skipped.
package board

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"chatd/internal/proctest"
)

func TestMain(m *testing.M) {
	code := m.Run()
	proctest.Cleanup()
	os.Exit(code)
}

// run is one board run: the files test-board.sh prepared in dir.
type run struct {
	t   *testing.T
	dir string
	env map[string]string // dir/image.env: facts about the image

	gwPath string
	gw     *proctest.Proc
	admin  string // the admin socket

	mu     sync.Mutex
	report map[string]string        // the guest's report, last value per key
	at     map[string]time.Duration // when each key arrived, since the boot
	host   map[string]string        // what the host observed
	boot   time.Time
}

func (r *run) get(key string) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.report[key]
}

func (r *run) hostSet(key, val string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.host[key] = val
}

func (r *run) hostGet(key string) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.host[key]
}

// readEnv reads KEY=VALUE lines.
func readEnv(t *testing.T, path string) map[string]string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, "="); ok {
			m[k] = v
		}
	}
	return m
}

func (r *run) logf(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "board: "+format+"\n", a...)
}

// startGateway runs the host's chatgw with its embedded broker on the port
// the image's config names, and waits until its admin API answers.
func (r *run) startGateway() {
	r.t.Helper()
	if r.gw == nil {
		r.gw = proctest.New(r.t, r.gwPath, "serve", "--sdkappid", r.env["APPID"], "--key-file", filepath.Join(r.dir, "key"),
			"--embedded-broker", "127.0.0.1:"+r.env["PORT"], "--admin", r.admin, "--state", filepath.Join(r.dir, "chatgw.db"))
	}
	r.gw.Start()
	// Not proctest.Wait: this also runs on the report's goroutine, where
	// a test may not stop itself.
	c := proctest.UnixHTTP(r.admin)
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if resp, err := c.Get("http://chatgw/healthz"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return
			}
		}
	}
	r.t.Errorf("chatgw's admin API did not answer within 10 s of its start")
}

func (r *run) stopGateway() {
	if code := r.gw.Stop(); code != 0 {
		r.t.Errorf("chatgw exited %d on SIGTERM, want 0", code)
	}
}

// userState is the gateway's view of the device: "online SESSION,..." or
// "offline ", or the error.
func (r *run) userState() string {
	resp, err := proctest.UnixHTTP(r.admin).Get("http://chatgw/v1/users/" + r.env["USER_ID"])
	if err != nil {
		return "error: " + err.Error()
	}
	defer resp.Body.Close()
	var u struct {
		State    string `json:"state"`
		Sessions []struct {
			ID     string `json:"id"`
			Online bool   `json:"online"`
		} `json:"sessions"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&u); err != nil {
		return "error: " + err.Error()
	}
	var on []string
	for _, s := range u.Sessions {
		if s.Online {
			on = append(on, s.ID)
		}
	}
	return u.State + " " + strings.Join(on, ",")
}

// handle acts on one report line.
func (r *run) handle(key, val string) {
	r.mu.Lock()
	r.report[key] = val
	r.at[key] = time.Since(r.boot).Round(time.Second)
	r.mu.Unlock()
	switch {
	case strings.HasSuffix(key, "_phase"):
		r.logf("guest: %s=%s at +%s", key, val, time.Since(r.boot).Round(time.Second))
	case strings.Contains(key, "_wait_logined_rc"), strings.Contains(key, "_outage_"), strings.Contains(key, "_clock"),
		strings.Contains(key, "_session"), strings.Contains(key, "_log"), key == "error", strings.HasSuffix(key, "_nrestarts"), strings.HasPrefix(key, "b2_gw"):
		r.logf("guest: %s=%s", key, val)
	}
	if key == "b3_clock_guest_now" {
		// Reported at the start of every boot; the third is set back.
		// How far the guest's clock is behind the host's.
		if g, err := strconv.ParseInt(val, 10, 64); err == nil {
			r.hostSet("clock_behind_s", strconv.FormatInt(time.Now().Unix()-g, 10))
		}
	}
	switch key + "=" + val {
	case "b1_phase=logined":
		r.hostSet("admin_b1", r.userState())
	case "b1_outage=ready":
		r.hostSet("admin_before_outage", r.userState())
		r.hostSet("outage_stop", time.Now().UTC().Format("15:04:05"))
		r.logf("outage: stopping chatgw for 20 s")
		r.stopGateway()
		time.Sleep(20 * time.Second)
		r.startGateway()
		r.hostSet("outage_start", time.Now().UTC().Format("15:04:05"))
		r.logf("outage: chatgw is back")
	case "b1_phase=recovered":
		r.hostSet("admin_outage", r.userState())
	case "b3_clock=stepped":
		// The device reconnects after its clock moved: restart chatgw.
		r.logf("clock: the guest stepped its clock; restarting chatgw")
		r.stopGateway()
		r.startGateway()
		r.hostSet("clock_gw_restarted", time.Now().UTC().Format("15:04:05"))
	case "b3_phase=clock_done":
		r.hostSet("admin_clock", r.userState())
	case "b2_phase=logined":
		r.hostSet("admin_b2", r.userState())
	}
}

// follow reads the report file as QEMU writes it until done is closed and
// the file holds nothing more.
func (r *run) follow(path string, done <-chan struct{}) {
	f, err := os.Open(path)
	if err != nil {
		r.t.Error(err)
		return
	}
	defer f.Close()
	br := bufio.NewReader(f)
	var partial string
	for {
		line, err := br.ReadString('\n')
		partial += line
		if err == nil {
			l := strings.TrimRight(partial, "\r\n")
			partial = ""
			if kv, ok := strings.CutPrefix(l, "BOARD: "); ok {
				if k, v, ok := strings.Cut(kv, "="); ok {
					r.handle(k, v)
				}
			}
			continue
		}
		if err != io.EOF {
			r.t.Error(err)
			return
		}
		select {
		case <-done:
			return
		case <-time.After(300 * time.Millisecond):
		}
	}
}

// jf is a field of a JSON object the guest reported ("" when absent).
func (r *run) jf(key, field string) string {
	var m map[string]any
	if json.Unmarshal([]byte(r.get(key)), &m) != nil {
		return ""
	}
	v, ok := m[field]
	if !ok || v == nil {
		return ""
	}
	switch v := v.(type) {
	case string:
		return v
	case float64:
		return strconv.FormatFloat(v, 'f', -1, 64)
	default:
		return fmt.Sprint(v)
	}
}

type result struct {
	name, detail string
	ok, skipped  bool
}

func TestBoard(t *testing.T) {
	dir := os.Getenv("BOARD_RUN")
	if dir == "" {
		t.Skip("make test-board runs this (BOARD_RUN names the image's run directory)")
	}
	r := &run{
		t: t, dir: dir, env: readEnv(t, filepath.Join(dir, "image.env")),
		admin:  filepath.Join(dir, "chatgw.sock"),
		report: map[string]string{}, at: map[string]time.Duration{}, host: map[string]string{},
	}
	r.gwPath = os.Getenv("BOARD_CHATGW")
	if r.gwPath == "" {
		r.gwPath = proctest.Binary(t, "chatgw")
	}
	timeout, err := time.ParseDuration(r.env["TIMEOUT"] + "s")
	if err != nil {
		t.Fatalf("image.env: TIMEOUT %q: %v", r.env["TIMEOUT"], err)
	}
	qemuArgs := strings.Split(strings.TrimSpace(mustRead(t, filepath.Join(dir, "qemu.args"))), "\n")

	r.startGateway()
	r.logf("chatgw: embedded broker on 127.0.0.1:%s (the guest's 10.0.2.2:%s)", r.env["PORT"], r.env["PORT"])
	reportPath := filepath.Join(dir, "report.log")
	if err := os.WriteFile(reportPath, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	qlog, err := os.Create(filepath.Join(dir, "qemu.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer qlog.Close()
	q := exec.CommandContext(ctx, qemuArgs[0], qemuArgs[1:]...)
	q.Stdout, q.Stderr = qlog, qlog
	r.boot = time.Now()
	if err := q.Start(); err != nil {
		t.Fatalf("starting %s: %v", qemuArgs[0], err)
	}
	r.logf("qemu: booting (pid %d, hard timeout %s; serial console in %s)", q.Process.Pid, timeout, filepath.Join(dir, "console.log"))
	qdone := make(chan struct{})
	// A guest that never reports is given up on well before the timeout.
	silent, _ := time.ParseDuration(r.env["SILENT_LIMIT"] + "s")
	go func() {
		select {
		case <-qdone:
		case <-time.After(silent):
			if fi, err := os.Stat(reportPath); err == nil && fi.Size() == 0 {
				r.logf("qemu: no report from the guest in %s; stopping it", silent)
				q.Process.Kill()
			}
		}
	}()
	followed := make(chan struct{})
	go func() { r.follow(reportPath, qdone); close(followed) }()
	qerr := q.Wait()
	close(qdone)
	<-followed
	qemuRC := 0
	if qerr != nil {
		qemuRC = -1
		if ee, ok := qerr.(*exec.ExitError); ok {
			qemuRC = ee.ExitCode()
		}
	}
	hardTimeout := ctx.Err() != nil
	bootTime := time.Since(r.boot).Round(time.Second)
	r.stopGateway()
	r.logf("qemu: exited with %d after %s", qemuRC, bootTime)

	results := r.verdict(qemuRC, hardTimeout)
	pass, fail, skip := 0, 0, 0
	fmt.Printf("\n== board (%s, QEMU %s, software emulation): checks\n", r.env["ARCH"], strings.Join(qemuArgs[:5], " "))
	for _, res := range results {
		word := "PASS"
		switch {
		case res.skipped:
			word = "SKIP"
			skip++
		case res.ok:
			pass++
		default:
			word = "FAIL"
			fail++
			t.Errorf("board check failed: %s (%s)", res.name, res.detail)
		}
		fmt.Printf("%s  %s  (%s)\n", word, res.name, res.detail)
	}
	fmt.Printf("\n== figures (QEMU software emulation: slower than a real board; figures, not assertions)\n")
	fmt.Printf("chatd VmRSS after 60 s idle:     %s kB (VmHWM %s kB)\n", r.get("b2_vmrss_kb"), r.get("b2_vmhwm_kb"))
	fmt.Printf("boot to LOGINED (first boot):    %ss after the kernel started (chatd.service active at %ss; chatctl wait returned at %ss)\n",
		r.get("b1_logined_since_uptime"), r.get("b1_chatd_active_uptime"), r.get("b1_logined_uptime"))
	fmt.Printf("boot to LOGINED (after reboot):  %ss after the kernel started (chatd.service active at %ss)\n",
		r.get("b2_logined_since_uptime"), r.get("b2_chatd_active_uptime"))
	fmt.Printf("outage:                          disconnect seen %ss after outage=ready, LOGINED and connected %ss after that (chatgw down 20 s, max_delay 5s)\n",
		r.get("b1_outage_disconnected_after"), r.get("b1_outage_recovered_after"))
	fmt.Printf("clock step:                      guest clock %s -> %s, LOGINED and connected %ss after the step\n",
		r.get("b3_clock_guest_before"), r.get("b3_clock_guest_after"), r.get("b3_clock_recovered_after"))
	fmt.Printf("systemd-analyze (second boot):   %s\n", r.get("b2_analyze_time"))
	fmt.Printf("critical chain of chatd.service: %s\n", r.get("b2_analyze_chain"))
	fmt.Printf("QEMU run (all boots, checks):    %s\n", bootTime)
	fmt.Printf("board: %d passed, %d failed, %d skipped\n", pass, fail, skip)
}

func mustRead(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// verdict judges the report. Each check names what it saw.
func (r *run) verdict(qemuRC int, hardTimeout bool) []result {
	g, h, jf := r.get, r.hostGet, r.jf
	var out []result
	check := func(name string, ok bool, detail string, a ...any) {
		out = append(out, result{name: name, ok: ok, detail: fmt.Sprintf(detail, a...)})
	}
	nonzero := func(v string) bool { return v != "" && v != "0" }
	state := func(s string) (string, string) { st, sess, _ := strings.Cut(s, " "); return st, sess }

	e := r.env
	check("package: dpkg -i chatd ran the maintainer scripts (user chatd, conffile root:chatd 0640, chatd.service enabled)",
		e["PKG_USER"] == "chatd:/usr/sbin/nologin" && e["PKG_CONF"] == "root:chatd 640" && e["PKG_SERVICE"] == "yes",
		"user %s; conffile %s; chatd.service enabled: %s, chatd.socket enabled: %s", e["PKG_USER"], e["PKG_CONF"], e["PKG_SERVICE"], e["PKG_SOCKET"])
	check("package: dpkg -i chatgw ran the maintainer scripts (user chatgw, conffile root:chatgw 0640, chatgw.service enabled)",
		e["GW_USER"] == "chatgw:/usr/sbin/nologin" && e["GW_CONF"] == "root:chatgw 640" && e["GW_SERVICE"] == "yes",
		"user %s; conffile %s; chatgw.service enabled: %s", e["GW_USER"], e["GW_CONF"], e["GW_SERVICE"])
	check("boot 1: chatd.service active as user chatd, NRestarts=0",
		g("b1_chatd_active") == "active" && g("b1_chatd_user") == "chatd" && g("b1_chatd_nrestarts") == "0",
		"%s, user %s, NRestarts %s", g("b1_chatd_active"), g("b1_chatd_user"), g("b1_chatd_nrestarts"))
	check("boot 1: chatgw.service installed but skipped until configured (inactive, not failed)",
		g("b1_chatgw_active") == "inactive" && g("b1_chatgw_version") == "chatgw "+e["VERSION"],
		"chatgw.service %s (%s); %s", g("b1_chatgw_active"), g("b1_chatgw_condition"), g("b1_chatgw_version"))
	check("boot 1: chatctl status --json shows login_status 1 (LOGINED), connected",
		g("b1_wait_logined_rc") == "0" && jf("b1_status", "login_status") == "1" && jf("b1_status", "connected") == "true",
		"login_status %s, connected %s, session %s, at +%ss uptime", jf("b1_status", "login_status"), jf("b1_status", "connected"), g("b1_session"), g("b1_logined_uptime"))
	st, sess := state(h("admin_b1"))
	check("boot 1: the host's chatgw admin API shows the device online with the guest's session",
		st == "online" && sess == g("b1_session") && sess != "", "%s", orNone(h("admin_b1")))
	check("permissions: a member of group chatd can read the status", g("b1_member_status_rc") == "0",
		"runuser -u member -- chatctl status: rc %s", g("b1_member_status_rc"))
	check("permissions: a plain user cannot log the device out (nor a non-operator member); still LOGINED",
		nonzero(g("b1_plain_logout_rc")) && nonzero(g("b1_member_logout_rc")) && g("b1_after_logout_login_status") == "1",
		"plain: rc %s: %.90s; member: rc %s; login_status after %s", g("b1_plain_logout_rc"), g("b1_plain_logout_out"), g("b1_member_logout_rc"), g("b1_after_logout_login_status"))
	check("outage: chatgw stopped 20 s; chatd saw the disconnect, is LOGINED and connected again, NRestarts=0",
		g("b1_outage_disconnected") == "1" && g("b1_outage_recovered") == "1" && g("b1_outage_nrestarts") == "0",
		"chatgw down %s-%s UTC; chatd: %s, %s failed attempts, onConnectSuccess %s; session %s; NRestarts %s",
		h("outage_stop"), h("outage_start"), g("b1_outage_first_event"), g("b1_outage_failed_attempts"), g("b1_outage_success_at"), g("b1_outage_session"), g("b1_outage_nrestarts"))
	st, _ = state(h("admin_outage"))
	check("outage: the host's chatgw shows the device online again", st == "online", "%s", orNone(h("admin_outage")))

	if !r.clock() {
		out = append(out, result{name: "clock step", skipped: true, detail: "BOARD_CLOCK_STEP=0"})
	} else {
		st, sess = state(h("admin_clock"))
		back, _ := strconv.ParseInt(h("clock_behind_s"), 10, 64)
		step, _ := strconv.ParseInt(e["CLOCK_STEP"], 10, 64)
		check("clock step",
			// Booted a year back (within a minute), then stepped forward.
			back > step-60 && back < step+60 && g("b3_clock") == "stepped" &&
				g("b3_clock_ntp") != "active" && g("b3_clock_logined_rc") == "0" && g("b3_clock_recovered") == "1" &&
				g("b3_clock_session") == g("b3_clock_session_before") && g("b3_clock_session") != "" &&
				g("b3_clock_login_status") == "1" && g("b3_clock_expired_events") == "0" &&
				st == "online" && sess == g("b3_clock_session"),
			"booted %ss behind the host (NTP %s), fresh login rc %s, stepped by %ss with date -s; chatgw restarted at %s; reconnected %s after %ss: login_status %s, session %s -> %s, onUserSigExpired %s, events: %s; gateway: %s",
			h("clock_behind_s"), g("b3_clock_ntp"), g("b3_clock_logined_rc"), e["CLOCK_STEP"], h("clock_gw_restarted"), g("b3_clock_recovered"), g("b3_clock_recovered_after"),
			g("b3_clock_login_status"), g("b3_clock_session_before"), g("b3_clock_session"), g("b3_clock_expired_events"), g("b3_clock_events"), orNone(h("admin_clock")))
	}

	st, _ = state(h("admin_b2"))
	check("reboot: chatd comes back LOGINED with the same session (resumed from its state)",
		g("b2_wait_logined_rc") == "0" && jf("b2_status", "login_status") == "1" && g("b2_session") != "" &&
			g("b2_session") == g("b2_session_before") && st == "online",
		"session before %s, after %s; gateway: %s", g("b2_session_before"), g("b2_session"), orNone(h("admin_b2")))
	check("boot 2: chatd.service active as user chatd, NRestarts=0 (after 60 s idle)",
		g("b2_chatd_active") == "active" && g("b2_chatd_user") == "chatd" && g("b2_chatd_nrestarts") == "0" && jf("b2_idle_status", "login_status") == "1",
		"%s, user %s, NRestarts %s, login_status %s", g("b2_chatd_active"), g("b2_chatd_user"), g("b2_chatd_nrestarts"), jf("b2_idle_status", "login_status"))
	check("boot 2: the packaged chatgw.service, configured, runs under systemd: READY (active), STATUS line, admin socket in /run/chatgw, 0660, group chatgw, NRestarts=0 after 60 s (watchdog)",
		g("b2_gw_active") == "active" && strings.HasPrefix(g("b2_gw_status_text"), "serving") && g("b2_gw_socket") == "srw-rw---- chatgw:chatgw" &&
			g("b2_gw_nrestarts") == "0" && g("b2_gw_user") == "chatgw",
		"%s as user %s, STATUS %q, socket %s, NRestarts %s", g("b2_gw_active"), g("b2_gw_user"), g("b2_gw_status_text"), g("b2_gw_socket"), g("b2_gw_nrestarts"))
	lines, _ := strconv.Atoi(g("b2_journal_chatd_lines"))
	check("journal: no UserSig in the journal (both boots), no eJ... value in chatd's",
		g("b2_journal_usersig_hits") == "0" && g("b2_journal_eJ_hits") == "0" && lines > 0 && g("b2_journal_boots") == "2",
		"UserSig hits %s, eJ hits %s in %s chatd lines over %s boots", g("b2_journal_usersig_hits"), g("b2_journal_eJ_hits"), g("b2_journal_chatd_lines"), g("b2_journal_boots"))
	detail := fmt.Sprintf("qemu rc %d", qemuRC)
	if hardTimeout {
		detail += ": hard timeout of " + r.env["TIMEOUT"] + "s"
	}
	last := "b2_phase"
	if r.clock() {
		last = "b3_phase"
	}
	check("power off: the guest powered off and QEMU exited 0", qemuRC == 0 && !hardTimeout && g(last) == "done", "%s, %s=%s", detail, last, g(last))
	return out
}

// clock reports whether the run has the clock scenario (a third boot).
func (r *run) clock() bool { return r.env["CLOCK_STEP"] != "" && r.env["CLOCK_STEP"] != "0" }

func orNone(s string) string {
	if s == "" {
		return "no answer"
	}
	return s
}

// The report parser and the verdict need no QEMU: a report replayed from a
// file gives the checks' results.
func TestVerdictFromReport(t *testing.T) {
	r := &run{t: t, report: map[string]string{}, at: map[string]time.Duration{}, host: map[string]string{},
		env: map[string]string{"CLOCK_STEP": "31536000", "VERSION": "1.0", "PKG_USER": "chatd:/usr/sbin/nologin"}}
	for _, kv := range []string{
		"b3_clock=stepped", "b3_clock_ntp=inactive", "b3_clock_logined_rc=0", "b3_clock_recovered=1",
		"b3_clock_session_before=s1", "b3_clock_session=s1", "b3_clock_login_status=1", "b3_clock_expired_events=0",
	} {
		k, v, _ := strings.Cut(kv, "=")
		r.report[k] = v
	}
	r.host["admin_clock"] = "online s1"
	r.host["clock_behind_s"] = "31536010"
	byName := func(res []result) map[string]result {
		m := map[string]result{}
		for _, x := range res {
			m[x.name] = x
		}
		return m
	}
	if got := byName(r.verdict(0, false))["clock step"]; !got.ok {
		t.Errorf("clock step: %+v, want ok", got)
	}
	for _, bad := range []struct{ key, val string }{
		{"b3_clock_expired_events", "1"},
		{"b3_clock_session", "s2"},
		{"b3_clock_login_status", "3"},
	} {
		old := r.report[bad.key]
		r.report[bad.key] = bad.val
		if got := byName(r.verdict(0, false))["clock step"]; got.ok {
			t.Errorf("clock step with %s=%s: ok, want a failure", bad.key, bad.val)
		}
		r.report[bad.key] = old
	}
	r.host["clock_behind_s"] = "5"
	if got := byName(r.verdict(0, false))["clock step"]; got.ok {
		t.Errorf("clock step with the guest's clock 5 s behind: ok, want a failure")
	}
	if got := byName(r.verdict(0, false))["power off: the guest powered off and QEMU exited 0"]; got.ok {
		t.Errorf("power off without b2_phase=done: ok, want a failure")
	}
	// A line split across reads is handled once complete.
	dir := t.TempDir()
	p := filepath.Join(dir, "report.log")
	os.WriteFile(p, []byte("BOARD: b2_x=1\r\nnoise\nBOARD: b2_y=a=b"), 0o644)
	done := make(chan struct{})
	go func() {
		time.Sleep(500 * time.Millisecond)
		f, _ := os.OpenFile(p, os.O_APPEND|os.O_WRONLY, 0)
		f.WriteString("c\n")
		f.Close()
		time.Sleep(500 * time.Millisecond)
		close(done)
	}()
	r.follow(p, done)
	if r.get("b2_x") != "1" || r.get("b2_y") != "a=bc" {
		t.Errorf("follow: b2_x=%q b2_y=%q, want 1 and a=bc", r.get("b2_x"), r.get("b2_y"))
	}
}
