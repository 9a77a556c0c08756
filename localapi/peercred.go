package localapi

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"strconv"
)

// PeerCred is who is at the other end of a Unix socket connection, as the
// kernel saw it when the peer connected (SO_PEERCRED).
type PeerCred struct {
	PID int32
	UID uint32
	GID uint32 // the peer's effective (primary) group
}

type peerCredKey struct{}

// withPeerCred returns ctx carrying pc.
func withPeerCred(ctx context.Context, pc PeerCred) context.Context {
	return context.WithValue(ctx, peerCredKey{}, pc)
}

// PeerCredFromContext returns the peer credentials Serve stored for the
// connection a request came in on; false when the connection is not a Unix
// socket or the kernel did not tell.
func PeerCredFromContext(ctx context.Context) (PeerCred, bool) {
	pc, ok := ctx.Value(peerCredKey{}).(PeerCred)
	return pc, ok
}

// procStatusPath is /proc/<pid>/status; a variable so tests can point it
// elsewhere.
var procStatusPath = func(pid int32) string { return "/proc/" + strconv.Itoa(int(pid)) + "/status" }

// peerInGroup reports whether the process pc describes has gid as its primary
// group or among its supplementary groups (the "Groups:" line of
// /proc/<pid>/status). Anything it cannot read or make sense of counts as
// "not a member". The file must also show pc.UID as the effective uid, so
// that a pid reused by another process since it connected is not trusted.
func peerInGroup(pc PeerCred, gid int) bool {
	if gid < 0 {
		return false
	}
	if pc.GID == uint32(gid) {
		return true
	}
	if pc.PID <= 0 {
		return false
	}
	b, err := os.ReadFile(procStatusPath(pc.PID))
	if err != nil {
		return false
	}
	uid, groups, err := parseProcStatus(b)
	if err != nil || uid != pc.UID {
		return false
	}
	for _, g := range groups {
		if g == uint32(gid) {
			return true
		}
	}
	return false
}

// parseProcStatus returns the effective uid (second field of "Uid:") and the
// supplementary groups ("Groups:") from the text of /proc/<pid>/status.
func parseProcStatus(b []byte) (euid uint32, groups []uint32, err error) {
	var haveUID, haveGroups bool
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := sc.Bytes()
		switch {
		case bytes.HasPrefix(line, []byte("Uid:")):
			f := bytes.Fields(line[len("Uid:"):])
			if len(f) < 2 {
				return 0, nil, fmt.Errorf("malformed Uid line %q", line)
			}
			n, err := strconv.ParseUint(string(f[1]), 10, 32)
			if err != nil {
				return 0, nil, fmt.Errorf("malformed Uid line %q", line)
			}
			euid, haveUID = uint32(n), true
		case bytes.HasPrefix(line, []byte("Groups:")):
			for _, f := range bytes.Fields(line[len("Groups:"):]) {
				n, err := strconv.ParseUint(string(f), 10, 32)
				if err != nil {
					return 0, nil, fmt.Errorf("malformed Groups line %q", line)
				}
				groups = append(groups, uint32(n))
			}
			haveGroups = true
		}
	}
	if !haveUID || !haveGroups {
		return 0, nil, fmt.Errorf("no Uid or Groups line")
	}
	return euid, groups, nil
}
