package mosquittotest

import (
	"os/exec"
	"syscall"
)

// setParentDeathSignal has the kernel kill the broker if the test binary dies
// before t.Cleanup could stop it (a panic, a timeout, SIGKILL). The signal
// fires when the OS thread that started the broker exits; Go keeps its threads
// unless a goroutine locked to one ends, which these tests never do.
func setParentDeathSignal(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
