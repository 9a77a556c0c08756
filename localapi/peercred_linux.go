package localapi

import (
	"net"
	"syscall"
)

// peerCredOf asks the kernel who connected c (SO_PEERCRED).
func peerCredOf(c *net.UnixConn) (PeerCred, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return PeerCred{}, err
	}
	var (
		uc   *syscall.Ucred
		uerr error
	)
	err = raw.Control(func(fd uintptr) {
		uc, uerr = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	})
	if err != nil {
		return PeerCred{}, err
	}
	if uerr != nil {
		return PeerCred{}, uerr
	}
	return PeerCred{PID: uc.Pid, UID: uc.Uid, GID: uc.Gid}, nil
}
