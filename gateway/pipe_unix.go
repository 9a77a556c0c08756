//go:build unix

package gateway

import (
	"fmt"
	"net"
	"os"
	"syscall"
)

// connPair returns the two ends of an unnamed Unix stream socket: an
// in-process connection that no other process can reach, buffered by the
// kernel in both directions. (net.Pipe is unbuffered: mochi writes a
// PUBACK from the goroutine that reads the gateway's connection, paho
// acknowledges from the goroutine that delivers its messages, and with no
// buffer in between the two wait for each other forever once the gateway
// is busy.)
func connPair(sndbuf int) (client, server net.Conn, err error) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("in-process broker connection: %w", err)
	}
	if sndbuf > 0 {
		for _, fd := range fds {
			syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_SNDBUF, sndbuf)
		}
	}
	conns := make([]net.Conn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "chatgw-internal")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			for _, c := range conns[:i] {
				c.Close()
			}
			if i == 0 {
				syscall.Close(fds[1])
			}
			return nil, nil, fmt.Errorf("in-process broker connection: %w", err)
		}
		conns[i] = c
	}
	return conns[0], conns[1], nil
}
