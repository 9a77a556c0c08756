//go:build !linux

package mosquittotest

import "os/exec"

// setParentDeathSignal does nothing where there is no PR_SET_PDEATHSIG.
func setParentDeathSignal(*exec.Cmd) {}
