package client

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"iter"
	"net"
	"net/http"
	"strings"
	"syscall"
	"time"
)

// DefaultSocket is where chatd listens unless configured otherwise.
const DefaultSocket = "/run/chatd/chatd.sock"

// Timeouts of a Client. Login and Logout wait for the gateway's answer, so
// they get longer; Events has none (cancel its context to stop it).
const (
	dialTimeout  = 5 * time.Second
	readTimeout  = 15 * time.Second
	loginTimeout = 2 * time.Minute
)

// maxResponse bounds a response body the client reads (Metrics included).
const maxResponse = 8 << 20

// maxEventLine bounds one line of the event stream.
const maxEventLine = 1 << 20

// Client calls chatd's local API over its Unix socket. It is safe for
// concurrent use.
type Client struct {
	socket string
	hc     *http.Client
}

// New returns a Client for the daemon listening on socketPath
// (DefaultSocket, usually).
func New(socketPath string) *Client {
	d := &net.Dialer{Timeout: dialTimeout}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return d.DialContext(ctx, "unix", socketPath)
		},
		MaxIdleConns:    2,
		IdleConnTimeout: 30 * time.Second,
	}
	return &Client{socket: socketPath, hc: &http.Client{Transport: tr}}
}

// Socket returns the socket path the client uses.
func (c *Client) Socket() string { return c.socket }

// ConnError means the daemon could not be reached at all: the socket is
// missing, nobody listens on it, or the caller may not open it. Hint says
// what to do.
type ConnError struct {
	Socket string
	Err    error
	Hint   string
}

func (e *ConnError) Error() string {
	return "cannot reach chatd: " + e.Err.Error() + ": " + e.Hint
}

func (e *ConnError) Unwrap() error { return e.Err }

// connError turns a dial failure into a *ConnError; other errors pass
// through.
func (c *Client) connError(err error) error {
	var op *net.OpError
	if !errors.As(err, &op) || op.Op != "dial" {
		return err
	}
	var hint string
	switch {
	case errors.Is(err, fs.ErrNotExist):
		hint = fmt.Sprintf("is chatd running? (socket %s not found)", c.socket)
	case errors.Is(err, fs.ErrPermission):
		hint = fmt.Sprintf("no permission to open %s: add yourself to the socket's group (see `ls -l %s`)", c.socket, c.socket)
	case errors.Is(err, syscall.ECONNREFUSED):
		hint = fmt.Sprintf("is chatd running? (nothing is listening on %s)", c.socket)
	default:
		hint = fmt.Sprintf("is chatd running, and is %s its socket?", c.socket)
	}
	return &ConnError{Socket: c.socket, Err: op, Hint: hint}
}

// do sends a request and returns the response of a 2xx answer; any other
// answer is returned as an *APIError.
func (c *Client) do(ctx context.Context, method, path string, body any) (*http.Response, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://chatd"+path, rd)
	if err != nil {
		return nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, c.connError(err)
	}
	if resp.StatusCode/100 != 2 {
		defer resp.Body.Close()
		return nil, readAPIError(resp)
	}
	return resp, nil
}

// readAPIError builds the *APIError of a non-2xx answer.
func readAPIError(resp *http.Response) error {
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return fmt.Errorf("%s %s: %s, and reading the answer failed: %w", resp.Request.Method, resp.Request.URL.Path, resp.Status, err)
	}
	e := &APIError{}
	if json.Unmarshal(b, e) != nil || e.Message == "" {
		e = &APIError{Message: strings.TrimSpace(resp.Status + ": " + firstLine(string(b)))}
	}
	e.HTTPStatus = resp.StatusCode
	return e
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(strings.TrimSpace(s), "\n")
	if len(s) > 200 {
		s = s[:200] + "..."
	}
	return s
}

// call does a request and decodes its JSON answer into out.
func (c *Client) call(ctx context.Context, timeout time.Duration, method, path string, body, out any) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	resp, err := c.do(ctx, method, path, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxResponse)).Decode(out); err != nil {
		return fmt.Errorf("%s %s: decoding the answer: %w", method, path, err)
	}
	return nil
}

// getResult does a GET of a Result and returns its data; a code other than
// 0 is an error.
func getResult[T any](ctx context.Context, c *Client, path string) (T, error) {
	var r Result[T]
	if err := c.call(ctx, readTimeout, http.MethodGet, path, nil, &r); err != nil {
		return r.Data, err
	}
	if r.Code != 0 {
		return r.Data, fmt.Errorf("GET %s: code %d: %s", path, r.Code, r.Desc)
	}
	return r.Data, nil
}

// Status returns GET /v1/status.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var s Status
	err := c.call(ctx, readTimeout, http.MethodGet, "/v1/status", nil, &s)
	return s, err
}

// LoginUser returns the logged-in UserID, or "" while not logged in (the
// SDK's getLoginUser).
func (c *Client) LoginUser(ctx context.Context) (string, error) {
	return getResult[string](ctx, c, "/v1/login-user")
}

// LoginStatus returns the SDK's getLoginStatus.
func (c *Client) LoginStatus(ctx context.Context) (LoginStatus, error) {
	return getResult[LoginStatus](ctx, c, "/v1/login-status")
}

// ServerTime returns the gateway's clock as the daemon knows it.
func (c *Client) ServerTime(ctx context.Context) (ServerTime, error) {
	return getResult[ServerTime](ctx, c, "/v1/server-time")
}

// Login logs the daemon in as user with the UserSig sig and waits for the
// outcome. A failed login is not an error: it is a Result with a code other
// than 0. The error is for a request that did not get that far (the daemon
// is unreachable, the caller may not log in: *ConnError, *APIError).
// Cancelling ctx stops the wait, not the login.
func (c *Client) Login(ctx context.Context, user, sig string) (Result[Status], error) {
	var r Result[Status]
	err := c.call(ctx, loginTimeout, http.MethodPost, "/v1/login", LoginRequest{UserID: user, UserSig: sig}, &r)
	return r, err
}

// Logout logs the daemon out and waits until it is done; see Login for the
// result and the error.
func (c *Client) Logout(ctx context.Context) (Result[Status], error) {
	var r Result[Status]
	err := c.call(ctx, loginTimeout, http.MethodPost, "/v1/logout", nil, &r)
	return r, err
}

// Metrics returns the daemon's metrics in Prometheus text format.
func (c *Client) Metrics(ctx context.Context) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, readTimeout)
	defer cancel()
	resp, err := c.do(ctx, http.MethodGet, "/metrics", nil)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse))
	if err != nil {
		return "", fmt.Errorf("GET /metrics: %w", err)
	}
	return string(b), nil
}

// Events streams GET /v1/events: first an Event of type EventStatus whose
// Snapshot is the status, then each event as it happens. The sequence ends
// when ctx is cancelled (without an error), when the daemon ends the stream
// (with io.ErrUnexpectedEOF) or on any other error, which it yields last.
func (c *Client) Events(ctx context.Context) iter.Seq2[Event, error] {
	return func(yield func(Event, error) bool) {
		for line, err := range c.EventLines(ctx) {
			if err != nil {
				yield(Event{}, err)
				return
			}
			var ev Event
			if err := json.Unmarshal(line, &ev); err != nil {
				yield(Event{}, fmt.Errorf("GET /v1/events: decoding an event: %w", err))
				return
			}
			if !yield(ev, nil) {
				return
			}
		}
	}
}

// EventLines is Events without decoding: each yielded line is one JSON
// object as the daemon sent it, without the newline. The slice is only
// valid until the next iteration.
func (c *Client) EventLines(ctx context.Context) iter.Seq2[[]byte, error] {
	return func(yield func([]byte, error) bool) {
		resp, err := c.do(ctx, http.MethodGet, "/v1/events", nil)
		if err != nil {
			yield(nil, err)
			return
		}
		defer resp.Body.Close()
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(make([]byte, 0, 4096), maxEventLine)
		for sc.Scan() {
			line := bytes.TrimSpace(sc.Bytes())
			if len(line) == 0 {
				continue
			}
			if !yield(line, nil) {
				return
			}
		}
		if ctx.Err() != nil {
			return
		}
		err = sc.Err()
		if err == nil {
			err = io.ErrUnexpectedEOF
		}
		yield(nil, fmt.Errorf("GET /v1/events: the stream ended: %w", err))
	}
}
