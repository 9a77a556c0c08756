//go:build !linux

package daemon

import (
	"errors"
	"net"
)

// peerCredOf is only implemented on Linux; elsewhere every caller is
// treated as unknown (read-only, unless APIOptions.TrustNonUnix).
func peerCredOf(c *net.UnixConn) (PeerCred, error) {
	return PeerCred{}, errors.New("peer credentials are only supported on Linux")
}
