package main

import (
	"chatd/codes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"chatd/client"
	"chatd/usersig"
)

// maxUserSigInput bounds a UserSig read from a file or standard input.
const maxUserSigInput = 64 << 10

func (c *cmd) status(ctx context.Context, args []string) error {
	fs := c.flags("status")
	asJSON := fs.Bool("json", false, "print the status as JSON (stable field names)")
	if err := c.parse(fs, args, 0); err != nil {
		return err
	}
	st, err := c.client().Status(ctx)
	if err != nil {
		return err
	}
	if *asJSON {
		return writeJSON(c.stdout, st)
	}
	_, err = io.WriteString(c.stdout, c.formatStatus(st))
	return err
}

// formatStatus renders a status for people, one "name: value" per line.
func (c *cmd) formatStatus(st client.Status) string {
	now := c.now()
	var b strings.Builder
	line := func(name, format string, a ...any) {
		fmt.Fprintf(&b, "%-12s %s\n", name+":", fmt.Sprintf(format, a...))
	}
	line("status", "%s (%d)", st.LoginStatus, int(st.LoginStatus))
	user := st.UserID
	if user == "" {
		user = "-"
	}
	line("user", "%s", user)
	conn := st.Connection
	switch {
	case st.Connected:
		conn = "connected"
	case conn == "":
		conn = "disconnected"
	}
	if st.NextRetryAt != nil && !st.Connected {
		conn += fmt.Sprintf(" (next try %s)", relative(st.NextRetryAt.Sub(now)))
	}
	if st.Broker != "" {
		conn += " to " + st.Broker
	}
	line("connection", "%s", conn)
	switch exp := st.UserSigExpiresAt; {
	case exp == nil:
		line("usersig", "none")
	case exp.Before(now):
		line("usersig", "EXPIRED %s (%s)", c.formatTime(*exp), relative(exp.Sub(now)))
	default:
		line("usersig", "expires %s (%s)", c.formatTime(*exp), relative(exp.Sub(now)))
	}
	clock := "trusted"
	if !st.ClockTrusted {
		clock = "not trusted yet (no expiry decisions until chatd hears the gateway's clock or the system clock is synchronised)"
	}
	line("clock", "%s", clock)
	line("server time", "%+d ms from this device's clock", st.ServerTimeOffset)
	if st.LastError.Code == 0 {
		line("last error", "none")
	} else {
		msg := codes.Describe(st.LastError.Code)
		if st.LastError.Message != "" {
			msg += ": " + st.LastError.Message
		}
		if h := codes.Hint(st.LastError.Code); h != "" {
			msg += "; " + h
		}
		line("last error", "%s", msg)
	}
	if !st.Since.IsZero() {
		line("since", "%s (%s)", c.formatTime(st.Since), relative(st.Since.Sub(now)))
	}
	if st.Session != "" {
		line("session", "%s", st.Session)
	}
	if st.Instance != "" {
		line("instance", "%s", st.Instance)
	}
	if st.PendingLogouts > 0 {
		line("logouts", "%d not yet delivered to the gateway (sent when the connection is back)", st.PendingLogouts)
	}
	if !st.StatePersisted && st.StateError != "" {
		line("state", "NOT PERSISTED: %s (logins and logouts will not survive a restart; fix the state directory, then restart chatd)", st.StateError)
	}
	return b.String()
}

func (c *cmd) formatTime(t time.Time) string {
	return t.In(c.loc).Format("2006-01-02 15:04:05 MST")
}

// relative is "in 3h2m" or "5m10s ago".
func relative(d time.Duration) string {
	if d >= 0 {
		return "in " + shortDuration(d)
	}
	return shortDuration(-d) + " ago"
}

// shortDuration rounds d to what a person needs: seconds below an hour,
// minutes below two days, then days and hours.
func shortDuration(d time.Duration) string {
	switch {
	case d < time.Hour:
		return d.Round(time.Second).String()
	case d < 48*time.Hour:
		return strings.TrimSuffix(d.Round(time.Minute).String(), "0s")
	}
	d = d.Round(time.Hour)
	return fmt.Sprintf("%dd%dh", d/(24*time.Hour), d%(24*time.Hour)/time.Hour)
}

func (c *cmd) login(ctx context.Context, args []string) error {
	fs := c.flags("login")
	user := fs.String("user", "", "the UserID to log in as")
	sigArg := fs.String("usersig", "", "the UserSig, or - to read it from standard input (an argument is visible in ps: prefer - or --usersig-file)")
	sigFile := fs.String("usersig-file", "", "a file holding the UserSig")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	if err := c.parse(fs, args, 0); err != nil {
		return err
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if *user == "" {
		return usageErr("login needs --user USERID")
	}
	var sig string
	switch {
	case set["usersig"] && set["usersig-file"]:
		return usageErr("give the UserSig once: --usersig or --usersig-file, not both")
	case set["usersig-file"]:
		b, err := readLimited(*sigFile, nil)
		if err != nil {
			return failure("", "reading the UserSig: %v", err)
		}
		sig = b
	case set["usersig"] && *sigArg == "-":
		b, err := readLimited("", c.stdin)
		if err != nil {
			return failure("", "reading the UserSig from standard input: %v", err)
		}
		sig = b
	case set["usersig"]:
		sig = strings.TrimSpace(*sigArg)
	default:
		return usageErr("login needs the UserSig: --usersig-file FILE, or --usersig - to read it from standard input")
	}
	if sig == "" {
		return usageErr("the UserSig is empty")
	}
	res, err := c.client().Login(ctx, *user, sig)
	if err != nil {
		return noAnswer("login", "LOGINED", err)
	}
	return c.report("login", res, *asJSON, func() string {
		return fmt.Sprintf("logged in as %s: %s (%d)\n", *user, res.Data.LoginStatus, int(res.Data.LoginStatus))
	})
}

// readLimited reads a UserSig from the file path, or from r when path is
// "", trimming surrounding whitespace (a trailing newline).
func readLimited(path string, r io.Reader) (string, error) {
	if path != "" {
		f, err := os.Open(path)
		if err != nil {
			return "", err
		}
		defer f.Close()
		r = f
	}
	b, err := io.ReadAll(io.LimitReader(r, maxUserSigInput+1))
	if err != nil {
		return "", err
	}
	if len(b) > maxUserSigInput {
		return "", fmt.Errorf("more than %d bytes: that is not a UserSig", maxUserSigInput)
	}
	return strings.TrimSpace(string(b)), nil
}

func (c *cmd) logout(ctx context.Context, args []string) error {
	fs := c.flags("logout")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	if err := c.parse(fs, args, 0); err != nil {
		return err
	}
	res, err := c.client().Logout(ctx)
	if err != nil {
		return noAnswer("logout", "LOGOUT", err)
	}
	return c.report("logout", res, *asJSON, func() string {
		return fmt.Sprintf("logged out: %s (%d)\n", res.Data.LoginStatus, int(res.Data.LoginStatus))
	})
}

// noAnswer explains a login or logout that timed out waiting: chatd goes
// on with it.
func noAnswer(what, status string, err error) error {
	if errors.Is(err, context.DeadlineExceeded) {
		return failure("chatd goes on with it: follow it with chatctl watch, or chatctl wait --status "+status,
			"no answer to the %s yet", what)
	}
	return err
}

// report prints the result of a login or logout and turns a code other than
// 0 into exit code 1, with the code and its description on stderr.
func (c *cmd) report(what string, res client.Result[client.Status], asJSON bool, ok func() string) error {
	if asJSON {
		if err := writeJSON(c.stdout, res); err != nil {
			return err
		}
	}
	if res.Code != 0 {
		msg := fmt.Sprintf("%s failed: code %s", what, codes.Describe(res.Code))
		if res.Desc != "" {
			msg += ": " + res.Desc
		}
		return failure(codes.Hint(res.Code), "%s", msg)
	}
	if !asJSON {
		_, err := io.WriteString(c.stdout, ok())
		return err
	}
	return nil
}

func (c *cmd) watch(ctx context.Context, args []string) error {
	fs := c.flags("watch")
	asJSON := fs.Bool("json", false, "print the events as the daemon sends them (one JSON object a line)")
	if err := c.parse(fs, args, 0); err != nil {
		return err
	}
	cl := c.client()
	if *asJSON {
		for line, err := range cl.EventLines(ctx) {
			if err != nil {
				return err
			}
			if _, err := fmt.Fprintf(c.stdout, "%s\n", line); err != nil {
				return err
			}
		}
		return nil
	}
	for ev, err := range cl.Events(ctx) {
		if err != nil {
			return err
		}
		if _, err := fmt.Fprintln(c.stdout, c.formatEvent(ev)); err != nil {
			return err
		}
	}
	return nil // ctx ended: Ctrl-C
}

// formatEvent renders an event on one line.
func (c *cmd) formatEvent(ev client.Event) string {
	var b strings.Builder
	b.WriteString(ev.Time.In(c.loc).Format("2006-01-02 15:04:05"))
	b.WriteString(" ")
	b.WriteString(ev.Type)
	if s := ev.Snapshot; s != nil {
		fmt.Fprintf(&b, " %s (%d)", s.LoginStatus, int(s.LoginStatus))
		if s.UserID != "" {
			fmt.Fprintf(&b, " user=%s", s.UserID)
		}
		conn := s.Connection
		if s.Connected {
			conn = "connected"
		}
		if conn != "" {
			fmt.Fprintf(&b, " connection=%s", conn)
		}
		if s.LastError.Code != 0 {
			fmt.Fprintf(&b, " last_error=%s", codes.Describe(s.LastError.Code))
		}
	} else if ev.Status != 0 {
		fmt.Fprintf(&b, " %s (%d)", ev.Status, int(ev.Status))
	}
	if ev.Snapshot == nil && ev.UserID != "" {
		fmt.Fprintf(&b, " user=%s", ev.UserID)
	}
	if ev.Code != 0 {
		fmt.Fprintf(&b, " code=%s", codes.Describe(ev.Code))
	}
	if ev.Desc != "" {
		fmt.Fprintf(&b, " desc=%q", ev.Desc)
	}
	return b.String()
}

// waitRetry is how long wait pauses before it reconnects after the daemon
// went away; waitPoll how often it also asks for the status, in case an
// event was lost.
const (
	waitRetry = 500 * time.Millisecond
	waitPoll  = 2 * time.Second
)

func (c *cmd) wait(ctx context.Context, args []string) error {
	fs := c.flags("wait")
	statusArg := fs.String("status", "", "the status to wait for: LOGINED, LOGINING, LOGOUT (or 1, 2, 3)")
	timeout := fs.Duration("timeout", 30*time.Second, "give up after this long (0: never)")
	if err := c.parse(fs, args, 0); err != nil {
		return err
	}
	if *statusArg == "" {
		return usageErr("wait needs --status LOGINED|LOGINING|LOGOUT")
	}
	want, ok := client.ParseLoginStatus(strings.ToUpper(*statusArg))
	if !ok {
		return usageErr("wait: unknown status %q: use LOGINED, LOGINING, LOGOUT or 1, 2, 3", *statusArg)
	}
	if *timeout < 0 {
		return usageErr("wait: --timeout must not be negative")
	}
	wctx, cancel := ctx, context.CancelFunc(func() {})
	if *timeout > 0 {
		wctx, cancel = context.WithTimeout(ctx, *timeout)
	}
	defer cancel()

	cur, known, lastErr := c.waitFor(wctx, want)
	switch {
	case known && cur == want:
		fmt.Fprintf(c.stdout, "%s (%d)\n", cur, int(cur))
		return nil
	case ctx.Err() != nil:
		return ctx.Err()
	case errors.As(lastErr, new(*client.APIError)):
		return lastErr
	case !known && lastErr != nil:
		var ce *client.ConnError
		if errors.As(lastErr, &ce) {
			return &client.ConnError{Socket: ce.Socket, Err: fmt.Errorf("timed out after %s waiting for %s: %w", *timeout, want, ce.Err), Hint: ce.Hint}
		}
		return failure("", "timed out after %s waiting for %s: %v", *timeout, want, lastErr)
	case !known:
		return failure("", "timed out after %s waiting for %s", *timeout, want)
	}
	return failure("see chatctl status for why", "timed out after %s waiting for %s: the status is %s (%d)", *timeout, want, cur, int(cur))
}

// waitFor follows the status until it is want or ctx ends. It returns the
// last status seen (known false: none) and the last error met. The event
// stream is reopened when chatd restarts; a permission or API error ends
// the wait at once.
func (c *cmd) waitFor(ctx context.Context, want client.LoginStatus) (cur client.LoginStatus, known bool, lastErr error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	cl := c.client()
	type update struct {
		st  client.LoginStatus
		ok  bool
		err error
	}
	updates := make(chan update)
	send := func(u update) bool {
		select {
		case updates <- u:
			return true
		case <-ctx.Done():
			return false
		}
	}
	go func() {
		for ctx.Err() == nil {
			for ev, err := range cl.Events(ctx) {
				if err != nil {
					if !send(update{err: err}) {
						return
					}
					break
				}
				switch {
				case ev.Snapshot != nil:
					send(update{st: ev.Snapshot.LoginStatus, ok: true})
				case ev.Type == client.EventLoginStatusChanged && ev.Status != 0:
					send(update{st: ev.Status, ok: true})
				}
			}
			t := time.NewTimer(waitRetry)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return
			}
		}
	}()
	poll := time.NewTicker(waitPoll)
	defer poll.Stop()
	for {
		select {
		case <-ctx.Done():
			return cur, known, lastErr
		case u := <-updates:
			if u.err != nil {
				lastErr = u.err
				var ce *client.ConnError
				if errors.As(u.err, new(*client.APIError)) ||
					(errors.As(u.err, &ce) && errors.Is(ce.Err, os.ErrPermission)) {
					return cur, known, lastErr
				}
				continue
			}
			cur, known = u.st, true
		case <-poll.C:
			st, err := cl.Status(ctx)
			if err != nil {
				continue
			}
			cur, known = st.LoginStatus, true
		}
		if known && cur == want {
			return cur, known, nil
		}
	}
}

// writeJSON prints v as indented JSON.
func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// decodedUserSig is what usersig decode prints. It leaves out TLS.sig: with
// it, the output would be the UserSig itself, and people paste this into
// bug reports.
type decodedUserSig struct {
	Version    string `json:"version"`
	Identifier string `json:"identifier"`
	SDKAppID   uint64 `json:"sdkappid"`
	Time       int64  `json:"time"`
	IssuedAt   string `json:"issued_at"`
	Expire     int64  `json:"expire"`
	ExpiresAt  string `json:"expires_at"`
	Expired    bool   `json:"expired"`
	UserBuf    []byte `json:"userbuf,omitempty"`
}

func (c *cmd) usersigDecode(args []string) error {
	// No flag parsing: a UserSig may start with "-".
	if len(args) > 0 && args[0] == "--" {
		args = args[1:]
	} else if len(args) == 1 && (args[0] == "-h" || args[0] == "--help" || args[0] == "-help") {
		fmt.Fprintln(c.stdout, "usage: chatctl usersig decode SIG|-  (- reads the UserSig from standard input)")
		return nil
	}
	if len(args) != 1 {
		return usageErr("usersig decode needs the UserSig as its one argument (or - to read it from standard input)")
	}
	sig := strings.TrimSpace(args[0])
	if sig == "-" {
		s, err := readLimited("", c.stdin)
		if err != nil {
			return failure("", "reading the UserSig from standard input: %v", err)
		}
		sig = s
	}
	t, err := usersig.Decode(sig)
	if err != nil {
		return failure("", "%v", err)
	}
	exp := t.ExpiresAt()
	return writeJSON(c.stdout, decodedUserSig{
		Version:    t.Version,
		Identifier: t.Identifier,
		SDKAppID:   t.SDKAppID,
		Time:       t.Time,
		IssuedAt:   time.Unix(t.Time, 0).UTC().Format(time.RFC3339),
		Expire:     t.Expire,
		ExpiresAt:  exp.Format(time.RFC3339),
		Expired:    c.now().After(exp),
		UserBuf:    t.UserBuf,
	})
}
