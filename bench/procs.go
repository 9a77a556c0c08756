package main

import (
	"bytes"
	"context"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha512"
	"encoding/base64"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"chatd/mqtt"
)

// bins are the project's binaries the suite runs as processes, built once
// per run.
type bins struct {
	dir, chatd, chatgw, bareclient string
}

func buildBins(ctx context.Context) (*bins, error) {
	dir, err := os.MkdirTemp("", "chatd-bench-bin-")
	if err != nil {
		return nil, err
	}
	root, err := moduleRoot(ctx)
	if err != nil {
		return nil, err
	}
	b := &bins{dir: dir, chatd: filepath.Join(dir, "chatd"), chatgw: filepath.Join(dir, "chatgw"), bareclient: filepath.Join(dir, "bareclient")}
	for name, pkg := range map[string]string{"chatd": "./cmd/chatd", "chatgw": "./cmd/chatgw", "bareclient": "./bench/bareclient"} {
		// As `make build` builds them: static, stripped.
		cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags", "-s -w", "-o", filepath.Join(dir, name), pkg)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			os.RemoveAll(dir)
			return nil, fmt.Errorf("building %s: %w\n%s", name, err, out)
		}
	}
	return b, nil
}

// proc is a child process with its output kept for error messages.
type proc struct {
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan struct{}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.b.Len() > 1<<20 {
		return len(p), nil
	}
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func startProc(bin string, args ...string) (*proc, error) {
	return startProcEnv(bin, nil, args...)
}

// startProcEnv is startProc with env added to the environment.
func startProcEnv(bin string, env []string, args ...string) (*proc, error) {
	p := &proc{cmd: exec.Command(bin, args...), out: &syncBuffer{}, done: make(chan struct{})}
	if env != nil {
		p.cmd.Env = append(os.Environ(), env...)
	}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	// A group of its own, so that stop reaches what it runs (chatd under
	// strace), and a bounded wait for output pipes a child kept open.
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	p.cmd.WaitDelay = 2 * time.Second
	if err := p.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { p.cmd.Wait(); close(p.done) }()
	return p, nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

// stop ends the process with SIGTERM (SIGKILL after 5 s) and waits.
func (p *proc) stop() {
	syscall.Kill(-p.pid(), syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		p.kill()
	}
}

// kill ends the process with SIGKILL and waits.
func (p *proc) kill() {
	syscall.Kill(-p.pid(), syscall.SIGKILL)
	<-p.done
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// waitFor polls cond every 2 ms until it holds or d passed.
func waitFor(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(2 * time.Millisecond)
	}
	return true
}

func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

func listening(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, 100*time.Millisecond)
	if err == nil {
		c.Close()
	}
	return err == nil
}

// world is a gateway on a broker, as a device sees it: chatgw with its
// embedded broker, or chatgw on a Mosquitto run with the shipped
// build/mosquitto/mosquitto.conf.
type world struct {
	name      string
	dir       string
	addr      string // the broker's host:port
	mosquitto bool
	gwArgs    []string
	gw        *proc
	mosq      *proc
	passwords map[string]string // Mosquitto accounts
}

const gwPassword = "bench-gateway-password"

// newWorld prepares a world; users are the device accounts Mosquitto
// needs (the embedded broker takes UserSigs instead).
func newWorld(ctx context.Context, b *bins, mosquitto bool, users []string) (*world, error) {
	dir, err := os.MkdirTemp("", "chatd-bench-world-")
	if err != nil {
		return nil, err
	}
	os.Chmod(dir, 0o755)
	w := &world{name: "embedded", dir: dir, mosquitto: mosquitto}
	keyFile := filepath.Join(dir, "key")
	if err := os.WriteFile(keyFile, []byte(keyHex+"\n"), 0o600); err != nil {
		return nil, err
	}
	if w.addr, err = freeAddr(); err != nil {
		return nil, err
	}
	common := []string{"serve", "--sdkappid", strconv.Itoa(appID), "--key-file", keyFile, "--state", filepath.Join(dir, "gw.db"), "--log-level", "error", "--device-rate", "1000"}
	if !mosquitto {
		w.gwArgs = append(common, "--embedded-broker", w.addr)
		return w, nil
	}
	w.name = "Mosquitto"
	w.passwords = map[string]string{"chatgw": gwPassword}
	for _, u := range users {
		w.passwords[u] = u + "-password"
		if err := os.WriteFile(filepath.Join(dir, u+".pass"), []byte(u+"-password\n"), 0o600); err != nil {
			return nil, err
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "gw.pass"), []byte(gwPassword+"\n"), 0o600); err != nil {
		return nil, err
	}
	w.gwArgs = append(common, "--broker", "tcp://"+w.addr, "--broker-username", "chatgw", "--broker-password-file", filepath.Join(dir, "gw.pass"))
	if err := w.startMosquitto(ctx); err != nil {
		w.close()
		return nil, err
	}
	return w, nil
}

func (w *world) broker() string { return "tcp://" + w.addr }

// startMosquitto runs Mosquitto with the shipped configuration, only its
// paths and its listener's port changed.
func (w *world) startMosquitto(ctx context.Context) error {
	root, err := moduleRoot(ctx)
	if err != nil {
		return err
	}
	shipped, err := os.ReadFile(filepath.Join(root, "build", "mosquitto", "mosquitto.conf"))
	if err != nil {
		return err
	}
	acl, err := os.ReadFile(filepath.Join(root, "build", "mosquitto", "acl"))
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(w.dir, "acl"), acl, 0o644); err != nil {
		return err
	}
	passwd := filepath.Join(w.dir, "passwd")
	if err := writePasswordFile(passwd, w.passwords); err != nil {
		return err
	}
	_, port, _ := net.SplitHostPort(w.addr)
	var conf []string
	for _, line := range strings.Split(string(shipped), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || strings.HasPrefix(f[0], "#") {
			conf = append(conf, line)
			continue
		}
		switch f[0] {
		case "listener":
			line = "listener " + port + " 127.0.0.1"
		case "password_file":
			line = "password_file " + passwd
		case "acl_file":
			line = "acl_file " + filepath.Join(w.dir, "acl")
		case "persistence_location":
			line = "persistence_location " + w.dir + "/"
		case "log_dest":
			line = "log_dest stderr"
		case "log_type":
			line = "log_type error"
		}
		conf = append(conf, line)
	}
	if os.Geteuid() == 0 {
		// As root Mosquitto drops to the mosquitto user, who cannot read
		// the temporary directory.
		conf = append(conf, "user root")
	}
	cf := filepath.Join(w.dir, "mosquitto.conf")
	if err := os.WriteFile(cf, []byte(strings.Join(conf, "\n")), 0o644); err != nil {
		return err
	}
	if w.mosq, err = startProc("mosquitto", "-c", cf); err != nil {
		return fmt.Errorf("mosquitto: %w (install the mosquitto package)", err)
	}
	if !waitFor(5*time.Second, func() bool { return listening(w.addr) }) {
		return fmt.Errorf("mosquitto did not listen on %s: %s", w.addr, w.mosq.out.String())
	}
	return nil
}

// writePasswordFile writes Mosquitto's password file for accounts (user to
// password) the way mosquitto_passwd does (PBKDF2-SHA512, 101 iterations,
// a 12-byte salt; "$7$" in Mosquitto 2.0), without a process per account.
func writePasswordFile(path string, accounts map[string]string) error {
	var b strings.Builder
	for u, p := range accounts {
		salt := make([]byte, 12)
		if _, err := rand.Read(salt); err != nil {
			return err
		}
		h, err := pbkdf2.Key(sha512.New, p, salt, 101, sha512.Size)
		if err != nil {
			return err
		}
		fmt.Fprintf(&b, "%s:$7$101$%s$%s\n", u, base64.StdEncoding.EncodeToString(salt), base64.StdEncoding.EncodeToString(h))
	}
	return os.WriteFile(path, []byte(b.String()), 0o600)
}

// startGateway starts chatgw and waits until it is ready (its /readyz).
func (w *world) startGateway(b *bins) error {
	args := append(slicesClone(w.gwArgs), "--admin", filepath.Join(w.dir, "admin.sock"))
	os.Remove(filepath.Join(w.dir, "admin.sock"))
	p, err := startProc(b.chatgw, args...)
	if err != nil {
		return err
	}
	w.gw = p
	sock := filepath.Join(w.dir, "admin.sock")
	hc := &http.Client{Timeout: time.Second, Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
	defer hc.CloseIdleConnections()
	// Ready: its broker listens and it has subscribed to the devices'
	// topics (on Mosquitto the broker listens before the gateway runs).
	ok := waitFor(10*time.Second, func() bool {
		if p.exited() {
			return true
		}
		resp, err := hc.Get("http://chatgw/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK && listening(w.addr)
	})
	if !ok || p.exited() {
		return fmt.Errorf("chatgw did not start: %s", p.out.String())
	}
	return nil
}

func (w *world) stopGateway() {
	if w.gw != nil {
		w.gw.stop()
		w.gw = nil
	}
}

func (w *world) close() {
	w.stopGateway()
	if w.mosq != nil {
		w.mosq.stop()
	}
	os.RemoveAll(w.dir)
}

func slicesClone(s []string) []string { return append([]string(nil), s...) }

// devicePassword is the MQTT password of a device account: its UserSig on
// the embedded broker, its account's password on Mosquitto.
func (w *world) devicePassword(user, sig string) string {
	if w.mosquitto {
		return w.passwords[user]
	}
	return sig
}

// startMosquittoResponder is the do-nothing responder on Mosquitto: a
// client with the gateway's account answering every request at once.
func (w *world) startMosquittoResponder(ctx context.Context) (stop func(), err error) {
	o := paho.NewClientOptions().AddBroker(w.broker()).SetClientID("bench-responder").SetUsername("chatgw").SetPassword(gwPassword).
		SetAutoReconnect(false).SetOrderMatters(false)
	c := paho.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		return nil, fmt.Errorf("responder connect: %v", tok.Error())
	}
	topics := mqtt.Topics{Prefix: mqtt.DefaultPrefix}
	tok := c.Subscribe(topics.UpFilter(), mqtt.QoSRequest, func(c paho.Client, m paho.Message) { respond(c, topics, m) })
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		return nil, fmt.Errorf("responder subscribe: %v", tok.Error())
	}
	return func() { c.Disconnect(0) }, nil
}

// respond answers a request with a canned success of its own type.
func respond(c paho.Client, topics mqtt.Topics, m paho.Message) {
	user, inst, err := topics.ParseUp(m.Topic())
	if err != nil {
		return
	}
	req, err := mqtt.Decode(m.Payload())
	if err != nil {
		return
	}
	typ := mqtt.TypeLoginResult
	if req.Type == mqtt.TypeResume {
		typ = mqtt.TypeResumeResult
	}
	c.Publish(topics.Down(user, inst), mqtt.QoSReply, false, mqtt.Encode(mqtt.Message{Type: typ, ID: req.ID, Session: "s", ServerTimeMs: 1}))
}
