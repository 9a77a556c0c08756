//go:build !linux

package localapi

import (
	"errors"
	"net"
)

// peerCredOf is only implemented on Linux; elsewhere every caller is
// treated as unknown (read-only, unless Options.TrustNonUnix).
func peerCredOf(c *net.UnixConn) (PeerCred, error) {
	return PeerCred{}, errors.New("peer credentials are only supported on Linux")
}
