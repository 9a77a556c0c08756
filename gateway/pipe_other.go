//go:build !unix

package gateway

import "net"

// connPair returns an in-process connection (unbuffered: see pipe_unix.go).
func connPair(int) (client, server net.Conn, err error) {
	c, s := net.Pipe()
	return c, s, nil
}
