// Package mosquittotest starts a real Mosquitto for tests: one broker per call
// on a free loopback port, configured with users, an ACL and a topic prefix,
// its files in t.TempDir, its log captured, and stopped by t.Cleanup.
//
// Tests skip when Mosquitto is not installed, unless CHATD_REQUIRE_MOSQUITTO=1
// makes a missing broker a failure (CI sets it).
package mosquittotest

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"chatd/internal/proctest"
)

// RequireEnv names the environment variable that, set to "1", turns a missing
// Mosquitto into a test failure instead of a skip.
const RequireEnv = "CHATD_REQUIRE_MOSQUITTO"

// installHint is the skip message, and the failure message under RequireEnv.
const installHint = "mosquitto not installed: apt-get install mosquitto mosquitto-clients"

// defaultPrefix is the topic prefix the ACL template is written for
// (mqtt.DefaultPrefix).
const defaultPrefix = "chat"

// readyTimeout bounds how long Start waits for the broker to accept connections.
const readyTimeout = 5 * time.Second

// Config says how to configure a broker.
type Config struct {
	// ACLFile is the acl_file to use, usually ACLTemplate(t); "" means none:
	// every client may publish and subscribe to everything.
	ACLFile string
	// Users maps usernames to passwords. With users, anonymous clients are
	// refused; without, every client is let in (allow_anonymous true).
	Users map[string]string
	// Prefix, if set and not "chat", replaces the leading "chat" of every
	// topic and pattern in ACLFile, the way build/mosquitto/acl says to.
	Prefix string
	// Shipped adds the settings of build/mosquitto/mosquitto.conf's
	// "Protocol behaviour" section (ShippedSettings).
	Shipped bool
	// Dynsec, if set, is a configuration file of the dynamic-security
	// plugin (as `chatgw mosquitto-dynsec` writes it): the broker loads the
	// plugin with a copy of it, and ACLFile and Users must be empty.
	Dynsec string
}

// Broker is a running (or stopped) Mosquitto.
type Broker struct {
	// Addr is "127.0.0.1:PORT"; it stays the same across Stop and Start.
	Addr string

	t    testing.TB
	bin  string
	conf string // path of mosquitto.conf
	log  *logBuffer

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has exited and been reaped
}

// Start starts a broker configured by cfg on a free loopback port and waits
// until it accepts connections. t.Cleanup stops it and, if the test failed,
// logs the broker's log.
func Start(t testing.TB, cfg Config) *Broker {
	t.Helper()
	bin := Tool(t, "mosquitto")
	dir := t.TempDir()
	b := &Broker{t: t, bin: bin, conf: filepath.Join(dir, "mosquitto.conf"), log: newLogBuffer()}

	var aclPath, passwdPath string
	if cfg.ACLFile != "" {
		acl, err := os.ReadFile(cfg.ACLFile)
		if err != nil {
			t.Fatalf("reading ACL: %v", err)
		}
		if cfg.Prefix != "" && cfg.Prefix != defaultPrefix {
			acl = []byte(RewritePrefix(string(acl), cfg.Prefix))
		}
		aclPath = filepath.Join(dir, "acl")
		if err := os.WriteFile(aclPath, acl, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if len(cfg.Users) > 0 {
		passwdPath = filepath.Join(dir, "passwd")
		writePasswords(t, passwdPath, cfg.Users)
	}

	var extra []string
	if cfg.Shipped {
		extra = ShippedSettings(t)
	}
	if cfg.Dynsec != "" {
		if cfg.ACLFile != "" || len(cfg.Users) > 0 {
			t.Fatal("mosquittotest: Dynsec replaces ACLFile and Users")
		}
		b, err := os.ReadFile(cfg.Dynsec)
		if err != nil {
			t.Fatalf("dynamic-security file: %v", err)
		}
		// The plugin rewrites its file on every change: give it a copy.
		p := filepath.Join(dir, "dynamic-security.json")
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		extra = append(extra, "allow_anonymous false", "plugin "+DynsecPlugin(t), "plugin_opt_config_file "+p)
	}
	t.Cleanup(func() {
		b.Stop()
		if t.Failed() {
			t.Logf("mosquitto log:\n%s", b.Log())
		}
	})

	// The free port is only free until someone else takes it: if mosquitto
	// cannot bind it, try another.
	const attempts = 5
	for i := 1; ; i++ {
		port, err := freePort()
		if err != nil {
			t.Fatalf("finding a free port: %v", err)
		}
		b.Addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		if err := os.WriteFile(b.conf, []byte(config(port, aclPath, passwdPath, extra)), 0o644); err != nil {
			t.Fatal(err)
		}
		err = b.start()
		if err == nil {
			return b
		}
		if !errors.Is(err, errAddrInUse) || i == attempts {
			t.Fatalf("starting mosquitto: %v\nmosquitto log:\n%s", err, b.Log())
		}
		t.Logf("port %d was taken, trying another", port)
	}
}

// config is the content of mosquitto.conf.
func config(port int, aclPath, passwdPath string, extra []string) string {
	var c strings.Builder
	c.WriteString("# Written by chatd/mqtt/mosquittotest for one test.\n")
	for _, line := range extra {
		c.WriteString(line + "\n")
	}
	fmt.Fprintf(&c, "listener %d 127.0.0.1\n", port)
	switch {
	case passwdPath != "":
		c.WriteString("allow_anonymous false\n")
		fmt.Fprintf(&c, "password_file %s\n", passwdPath)
	case !slices.Contains(extra, "allow_anonymous false"):
		c.WriteString("allow_anonymous true\n")
	}
	if aclPath != "" {
		fmt.Fprintf(&c, "acl_file %s\n", aclPath)
	}
	c.WriteString("persistence false\n")
	c.WriteString("log_dest stderr\n")
	// Debug level is where the ACL's "Denied PUBLISH" lines are.
	c.WriteString("log_type all\n")
	if os.Geteuid() == 0 {
		// Started as root, mosquitto drops to the "mosquitto" user, which
		// cannot enter t.TempDir (0700, owned by the test's user). Loosening
		// permissions all the way up the path would only work for some
		// TMPDIRs, so the test broker keeps the test's user instead; it logs
		// a warning about it. For other users this line has no effect.
		c.WriteString("user root\n")
	}
	return c.String()
}

// writePasswords writes a password file with mosquitto_passwd, which hashes
// the way the installed broker expects.
func writePasswords(t testing.TB, path string, users map[string]string) {
	t.Helper()
	passwd := Tool(t, "mosquitto_passwd")
	for i, name := range slices.Sorted(maps.Keys(users)) {
		args := []string{"-b", path, name, users[name]}
		if i == 0 {
			args = append([]string{"-c"}, args...)
		}
		if out, err := exec.Command(passwd, args...).CombinedOutput(); err != nil {
			t.Fatalf("mosquitto_passwd for user %q: %v\n%s", name, err, out)
		}
	}
}

// RewritePrefix returns acl with the leading "chat" of every topic and
// pattern replaced by prefix.
func RewritePrefix(acl, prefix string) string {
	lines := strings.Split(acl, "\n")
	for i, line := range lines {
		f := strings.Fields(line)
		if len(f) < 2 || (f[0] != "topic" && f[0] != "pattern") {
			continue
		}
		topic := f[len(f)-1] // "topic [read|write|readwrite|deny] TOPIC"
		if rest, ok := strings.CutPrefix(topic, defaultPrefix+"/"); ok {
			f[len(f)-1] = prefix + "/" + rest
			lines[i] = strings.Join(f, " ")
		}
	}
	return strings.Join(lines, "\n")
}

// freePort returns a loopback port that was free a moment ago.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

var (
	errAddrInUse = errors.New("port already in use")
	// running is logged once the listeners are open.
	running = regexp.MustCompile(`mosquitto version \S+ running`)
)

// start runs mosquitto and waits until it is ready: it has logged that it is
// running and a TCP connect to Addr succeeds.
func (b *Broker) start() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.cmd != nil {
		return errors.New("already running")
	}
	mark := b.log.Len()
	cmd := exec.Command(b.bin, "-c", b.conf)
	cmd.Stdout = b.log
	cmd.Stderr = b.log
	cmd.WaitDelay = time.Second
	setParentDeathSignal(cmd)
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan struct{})
	go func() {
		cmd.Wait()
		close(done)
	}()
	b.cmd, b.done = cmd, done

	deadline := time.Now().Add(readyTimeout)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-done:
			b.cmd, b.done = nil, nil
			if strings.Contains(b.log.Since(mark), "Address already in use") {
				return errAddrInUse
			}
			return fmt.Errorf("mosquitto exited: %v", cmd.ProcessState)
		case <-tick.C:
		}
		if running.MatchString(b.log.Since(mark)) {
			c, err := net.DialTimeout("tcp", b.Addr, time.Second)
			if err == nil {
				c.Close()
				return nil
			}
		}
		if time.Now().After(deadline) {
			b.stopLocked()
			return fmt.Errorf("mosquitto did not accept connections on %s within %v", b.Addr, readyTimeout)
		}
	}
}

// Start starts a stopped broker again, on the same port, for tests of a
// broker restart. Connections made before Stop are gone.
func (b *Broker) Start() {
	b.t.Helper()
	// Mosquitto sets SO_REUSEADDR, so the old listener's TIME_WAIT does not
	// hold the port; someone else taking it in between does, for a while.
	var err error
	for range 5 {
		if err = b.start(); !errors.Is(err, errAddrInUse) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		b.t.Fatalf("restarting mosquitto on %s: %v\nmosquitto log:\n%s", b.Addr, err, b.Log())
	}
}

// Stop stops the broker with SIGTERM and waits for it to exit (SIGKILL after
// 5 s). Stopping a stopped broker does nothing.
func (b *Broker) Stop() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.stopLocked()
}

func (b *Broker) stopLocked() {
	if b.cmd == nil {
		return
	}
	cmd, done := b.cmd, b.done
	b.cmd, b.done = nil, nil
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		cmd.Process.Kill()
		<-done
	}
}

// URL is the broker's address for paho: "tcp://127.0.0.1:PORT".
func (b *Broker) URL() string { return "tcp://" + b.Addr }

// Host is Addr's host, for mosquitto_pub and mosquitto_sub.
func (b *Broker) Host() string { h, _, _ := net.SplitHostPort(b.Addr); return h }

// Port is Addr's port.
func (b *Broker) Port() string { _, p, _ := net.SplitHostPort(b.Addr); return p }

// Log returns what the broker logged so far, across restarts.
func (b *Broker) Log() string { return b.log.String() }

// LogMark returns a position in the log, for WaitLog.
func (b *Broker) LogMark() int { return b.log.Len() }

// WaitLog waits up to timeout for the log written after mark to match re,
// and reports whether it did. The broker logs asynchronously: a line about a
// packet may land after the client has seen the broker's answer to it.
func (b *Broker) WaitLog(mark int, re *regexp.Regexp, timeout time.Duration) bool {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		changed := b.log.Changed()
		if re.MatchString(b.log.Since(mark)) {
			return true
		}
		select {
		case <-changed:
		case <-timer.C:
			return false
		}
	}
}

// Tool returns the path of a Mosquitto program (mosquitto, mosquitto_passwd,
// mosquitto_pub, mosquitto_sub). When it is missing, it skips the test, or
// fails it if CHATD_REQUIRE_MOSQUITTO=1.
func Tool(t testing.TB, name string) string {
	t.Helper()
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	// The broker is in sbin, which is not on every user's PATH.
	for _, dir := range []string{"/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin"} {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p
		}
	}
	if os.Getenv(RequireEnv) == "1" {
		t.Fatalf("%s (%s not found; %s=1 makes this a failure)", installHint, name, RequireEnv)
	}
	t.Skip(installHint)
	return ""
}

// DynsecPluginName is the file name of Mosquitto's dynamic-security plugin.
const DynsecPluginName = "mosquitto_dynamic_security.so"

// DynsecPlugin returns the path of the dynamic-security plugin: where the
// mosquitto package put it (dpkg -L), else the first one in a library
// directory (Debian puts it in the multiarch one, /usr/lib/<triplet>/). When
// it is missing, it skips the test, or fails it if CHATD_REQUIRE_MOSQUITTO=1.
func DynsecPlugin(t testing.TB) string {
	t.Helper()
	if out, err := exec.Command("dpkg", "-L", "mosquitto").Output(); err == nil {
		for _, line := range strings.Split(string(out), "\n") {
			if filepath.Base(line) == DynsecPluginName {
				if _, err := os.Stat(line); err == nil {
					return line
				}
			}
		}
	}
	for _, pat := range []string{"/usr/lib/*/", "/usr/lib/", "/usr/local/lib/", "/usr/lib64/"} {
		if m, _ := filepath.Glob(pat + DynsecPluginName); len(m) > 0 {
			return m[0]
		}
	}
	if os.Getenv(RequireEnv) == "1" {
		t.Fatalf("%s (%s not found; %s=1 makes this a failure)", installHint, DynsecPluginName, RequireEnv)
	}
	t.Skip(installHint + " (with its dynamic-security plugin)")
	return ""
}

// ACLTemplate returns the path of build/mosquitto/acl, found from the test's
// working directory by walking up to go.mod.
func ACLTemplate(t testing.TB) string {
	t.Helper()
	dir := proctest.ModuleRoot(t)
	p := filepath.Join(dir, "build", "mosquitto", "acl")
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("ACL template: %v", err)
	}
	return p
}

// shippedSection starts the section of build/mosquitto/mosquitto.conf that
// ShippedSettings returns.
const shippedSection = "# --- Protocol behaviour."

// ShippedSettings returns the setting lines of the "Protocol behaviour"
// section of build/mosquitto/mosquitto.conf, the settings that shape what
// devices and the gateway see, so that test brokers run with them.
func ShippedSettings(t testing.TB) []string {
	t.Helper()
	p := filepath.Join(proctest.ModuleRoot(t), "build", "mosquitto", "mosquitto.conf")
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("shipped configuration: %v", err)
	}
	var out []string
	in := false
	for _, line := range strings.Split(string(b), "\n") {
		switch {
		case strings.HasPrefix(line, shippedSection):
			in = true
		case strings.HasPrefix(line, "# ---"):
			in = false
		case in && line != "" && !strings.HasPrefix(line, "#"):
			out = append(out, line)
		}
	}
	if len(out) == 0 {
		t.Fatalf("%s has no section %q with settings", p, shippedSection)
	}
	return out
}

// logBuffer collects the broker's output and wakes up waiters on each write.
type logBuffer struct {
	mu      sync.Mutex
	buf     bytes.Buffer
	changed chan struct{} // closed and replaced on every write
}

func newLogBuffer() *logBuffer { return &logBuffer{changed: make(chan struct{})} }

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	close(l.changed)
	l.changed = make(chan struct{})
	return l.buf.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

func (l *logBuffer) Len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Len()
}

// Since returns what was written after the first mark bytes.
func (l *logBuffer) Since(mark int) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return string(l.buf.Bytes()[min(mark, l.buf.Len()):])
}

// Changed returns a channel that is closed by the next write.
func (l *logBuffer) Changed() <-chan struct{} {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.changed
}
