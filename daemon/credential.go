package daemon

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"chatd/usersig"
)

// readUserSigFile reads the initial credential: one UserSig, surrounding
// white space ignored.
func readUserSigFile(path string) (usersig.Secret, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return usersig.Secret{}, fmt.Errorf("reading usersig_file: %w", err)
	}
	s := strings.TrimSpace(string(b))
	if s == "" {
		return usersig.Secret{}, fmt.Errorf("usersig_file %s is empty", path)
	}
	return usersig.NewSecret(s), nil
}

// runUserSigCommand runs the credential helper like git runs its
// credential helpers: through sh -c, with the UserID (and SDKAppID) in its
// environment; it prints one UserSig on standard output. Its standard error
// is returned in errors (the UserSig never is).
func runUserSigCommand(ctx context.Context, command, userID string, sdkappid uint64, timeout time.Duration) (usersig.Secret, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "/bin/sh", "-c", command)
	cmd.Env = append(os.Environ(), "CHATD_USER_ID="+userID, "CHATD_SDKAPPID="+strconv.FormatUint(sdkappid, 10))
	var out, errb bytes.Buffer
	cmd.Stdout = &limitedBuffer{b: &out, n: 64 << 10}
	cmd.Stderr = &limitedBuffer{b: &errb, n: 4 << 10}
	cmd.WaitDelay = time.Second
	err := cmd.Run()
	if ctx.Err() != nil && errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return usersig.Secret{}, fmt.Errorf("usersig_command did not finish within %s", timeout)
	}
	if err != nil {
		msg := strings.TrimSpace(errb.String())
		if msg != "" {
			return usersig.Secret{}, fmt.Errorf("usersig_command failed: %v: %s", err, msg)
		}
		return usersig.Secret{}, fmt.Errorf("usersig_command failed: %v", err)
	}
	lines := strings.Fields(out.String())
	if len(lines) == 0 {
		return usersig.Secret{}, errors.New("usersig_command printed nothing; it must print one UserSig")
	}
	if len(lines) > 1 {
		return usersig.Secret{}, fmt.Errorf("usersig_command printed %d words; it must print one UserSig and nothing else", len(lines))
	}
	return usersig.NewSecret(lines[0]), nil
}

type limitedBuffer struct {
	b *bytes.Buffer
	n int
}

func (l *limitedBuffer) Write(p []byte) (int, error) {
	if room := l.n - l.b.Len(); room > 0 {
		l.b.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}
