// Package proctest runs the project's real binaries in end-to-end tests:
// it builds them once per test binary, starts them with their output
// captured, stops them with SIGTERM (checking they go), and hands out free
// loopback ports.
package proctest

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

var (
	buildMu  sync.Mutex
	built    = map[string]string{}
	buildDir string
)

// Binary builds ./cmd/<name> of this module (once per test binary) and
// returns its path. GOFLAGS and the environment's GOARCH apply, so under
// qemu-user the binaries are built for the emulated machine.
func Binary(t testing.TB, name string) string {
	t.Helper()
	return BuildPackage(t, name, "./cmd/"+name)
}

// BuildPackage builds the main package pkg (a path in this module, or one
// of a module go.mod requires, as its tools) into a binary called name,
// once per test binary, and returns its path.
func BuildPackage(t testing.TB, name, pkg string) string {
	t.Helper()
	buildMu.Lock()
	defer buildMu.Unlock()
	if p, ok := built[name]; ok {
		return p
	}
	if buildDir == "" {
		d, err := os.MkdirTemp("", "chatd-e2e-bin")
		if err != nil {
			t.Fatal(err)
		}
		buildDir = d
	}
	root := ModuleRoot(t)
	out := filepath.Join(buildDir, name)
	cmd := exec.Command("go", "build", "-o", out, pkg)
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building %s (%s): %v\n%s", name, pkg, err, b)
	}
	built[name] = out
	return out
}

// Cleanup removes the built binaries; call it from TestMain after m.Run.
func Cleanup() {
	buildMu.Lock()
	defer buildMu.Unlock()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
}

// ModuleRoot finds the directory holding go.mod above the working directory.
func ModuleRoot(t testing.TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("go.mod not found above the working directory")
		}
		dir = parent
	}
}

// FreePort returns a loopback host:port that was free a moment ago.
func FreePort(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// Proc is a running binary.
type Proc struct {
	t    testing.TB
	Path string
	Args []string
	Env  []string
	// SysProcAttr is used at each start (e.g. to run as another user).
	SysProcAttr *syscall.SysProcAttr

	mu   sync.Mutex
	log  bytes.Buffer
	cmd  *exec.Cmd
	done chan struct{}
}

// Start runs path with args; t.Cleanup stops it and, if the test failed,
// shows its output.
func Start(t testing.TB, path string, args ...string) *Proc {
	t.Helper()
	p := New(t, path, args...)
	p.Start()
	return p
}

// New prepares a Proc without starting it (set Env or SysProcAttr, then
// Start); t.Cleanup stops it and, if the test failed, shows its output.
func New(t testing.TB, path string, args ...string) *Proc {
	t.Helper()
	p := &Proc{t: t, Path: path, Args: args}
	t.Cleanup(func() {
		p.Stop()
		if t.Failed() {
			t.Logf("%s output:\n%s", filepath.Base(path), p.Log())
		}
	})
	return p
}

// Start (re)starts the process with the same arguments.
func (p *Proc) Start() {
	p.t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd != nil {
		p.t.Fatalf("%s is already running", p.Path)
	}
	cmd := exec.Command(p.Path, p.Args...)
	cmd.Env = append(os.Environ(), p.Env...)
	cmd.Stdout = writerFunc(p.write)
	cmd.Stderr = writerFunc(p.write)
	cmd.SysProcAttr = p.SysProcAttr
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	fmt.Fprintf(writerFunc(p.writeLocked), "--- start %s %s\n", filepath.Base(p.Path), strings.Join(p.Args, " "))
	if err := cmd.Start(); err != nil {
		p.t.Fatalf("starting %s: %v", p.Path, err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	p.cmd, p.done = cmd, done
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(b []byte) (int, error) { return f(b) }

func (p *Proc) write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.log.Write(b)
}

func (p *Proc) writeLocked(b []byte) (int, error) { return p.log.Write(b) }

// Log is the output so far.
func (p *Proc) Log() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.log.String()
}

// Stop sends SIGTERM and waits up to 10 s (then kills and fails the test).
// It returns the exit code, or -1 when the process was not running.
func (p *Proc) Stop() int { return p.signal(syscall.SIGTERM) }

// Kill stops the process with SIGKILL: a power cut, as far as the process
// can tell.
func (p *Proc) Kill() int { return p.signal(syscall.SIGKILL) }

func (p *Proc) signal(sig syscall.Signal) int {
	p.mu.Lock()
	cmd, done := p.cmd, p.done
	p.mu.Unlock()
	if cmd == nil {
		return -1
	}
	cmd.Process.Signal(sig)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		<-done
		p.t.Errorf("%s did not stop within 10s of %v", filepath.Base(p.Path), sig)
	}
	p.mu.Lock()
	p.cmd = nil
	p.mu.Unlock()
	return cmd.ProcessState.ExitCode()
}

// Wait waits (bounded) until cond holds, polling every 20 ms.
func Wait(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited %s for %s", within, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// RequireToolsEnv names the variable that, set to "1" (make check does),
// turns a missing tool into a failure instead of a skip.
const RequireToolsEnv = "CHATD_REQUIRE_TOOLS"

// Tool finds an installed program a test needs, or skips the test (fails
// it under CHATD_REQUIRE_TOOLS=1) with the Debian package to install.
func Tool(t testing.TB, name, debianPackage string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	msg := fmt.Sprintf("%s not installed: apt-get install %s", name, debianPackage)
	if os.Getenv(RequireToolsEnv) == "1" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

// UnixHTTP is an HTTP client that talks to a Unix socket, whatever the
// URL's host.
func UnixHTTP(socket string) *http.Client {
	return &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		}},
	}
}
