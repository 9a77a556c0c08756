// Package localapi serves chatd's local API: HTTP with JSON on a Unix
// socket, for chatctl and other local programs (docs/api.md). Everyone who
// can open the socket may read; logging in and out is decided by the peer
// credentials the kernel reports for each connection.
package localapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os/user"
	"strconv"
	"strings"
	"time"

	"chatd/client"
	"chatd/internal/unixsock"
	"chatd/usersig"
)

// Limits of the local API.
const (
	// maxLoginBody bounds the body of POST /v1/login (a UserSig is at most
	// 8 KiB) and of every other request (none needs one).
	maxLoginBody = 16 << 10
	// apiBodyTimeout bounds reading a request body.
	apiBodyTimeout = 10 * time.Second
	// apiEventWriteTimeout bounds writing one event: a client that stops
	// reading loses its stream instead of holding a handler forever.
	apiEventWriteTimeout = 10 * time.Second
	// apiShutdownGrace is how long Serve waits for requests in flight
	// when its context ends.
	apiShutdownGrace = 5 * time.Second
)

// permissionDenied is the message of the 403 for POSTs.
const permissionDenied = "permission denied: logging in or out needs root, the chatd user or the operator group"

// Options configures New.
type Options struct {
	Backend Backend
	// Logger receives one INFO line per POST (never the UserSig); nil
	// discards.
	Logger *slog.Logger
	// OperatorGID is the group whose members may log in and out, besides
	// root and DaemonUID; -1 for none. (0 is the root group.)
	OperatorGID int
	// DaemonUID is the daemon's own uid (os.Getuid()), which may always log
	// in and out; -1 for none.
	DaemonUID int
	// TrustNonUnix lets callers without peer credentials (a TCP connection,
	// as in httptest) log in and out. Only tests should set it.
	TrustNonUnix bool
	// Now is the clock for the snapshot event; nil means time.Now.
	Now func() time.Time
}

// apiEndpoint is one route of the local API.
type apiEndpoint struct {
	method, path string
	handle       func(*Server, http.ResponseWriter, *http.Request)
}

// apiEndpoints lists the routes, in the order the 404 names them.
var apiEndpoints = []apiEndpoint{
	{http.MethodGet, "/v1/status", (*Server).status},
	{http.MethodGet, "/v1/login-user", (*Server).loginUser},
	{http.MethodGet, "/v1/login-status", (*Server).loginStatus},
	{http.MethodPost, "/v1/login", (*Server).login},
	{http.MethodPost, "/v1/logout", (*Server).logout},
	{http.MethodGet, "/v1/events", (*Server).events},
	{http.MethodGet, "/v1/server-time", (*Server).serverTime},
	{http.MethodGet, "/metrics", (*Server).metrics},
}

// Server is the local API: an http.Handler, and Serve runs it on a
// listener.
type Server struct {
	Options
	log *slog.Logger
}

// New returns the local API that chatctl and other local programs use
// (docs/api.md). Everyone who can open the socket may read; logging in and
// out needs root, o.DaemonUID or membership of o.OperatorGID, judged by the
// peer credentials Serve stores.
func New(o Options) *Server {
	a := &Server{Options: o, log: o.Logger}
	if a.log == nil {
		a.log = slog.New(slog.DiscardHandler)
	}
	if a.Now == nil {
		a.Now = time.Now
	}
	return a
}

func (a *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, maxLoginBody)
	var allowed []string
	for _, e := range apiEndpoints {
		if e.path != r.URL.Path {
			continue
		}
		if e.method == r.Method {
			e.handle(a, w, r)
			return
		}
		allowed = append(allowed, e.method)
	}
	if allowed != nil {
		w.Header().Set("Allow", strings.Join(allowed, ", "))
		writeAPIError(w, &client.APIError{
			HTTPStatus: http.StatusMethodNotAllowed,
			Message:    fmt.Sprintf("method %s is not allowed on %s", r.Method, r.URL.Path),
			Hint:       "use " + strings.Join(allowed, " or "),
		})
		return
	}
	var list []string
	for _, e := range apiEndpoints {
		list = append(list, e.method+" "+e.path)
	}
	writeAPIError(w, &client.APIError{
		HTTPStatus: http.StatusNotFound,
		Message:    fmt.Sprintf("no such endpoint %s %s", r.Method, r.URL.Path),
		Hint:       "the endpoints are " + strings.Join(list, ", "),
	})
}

func (a *Server) status(w http.ResponseWriter, r *http.Request) {
	writeAPIJSON(w, http.StatusOK, a.Backend.Status())
}

func (a *Server) loginUser(w http.ResponseWriter, r *http.Request) {
	st := a.Backend.Status()
	var user string
	if st.LoginStatus == client.Logined {
		user = st.UserID
	}
	writeAPIJSON(w, http.StatusOK, client.Result[string]{Data: user})
}

func (a *Server) loginStatus(w http.ResponseWriter, r *http.Request) {
	st := a.Backend.Status()
	writeAPIJSON(w, http.StatusOK, client.Result[int]{Data: int(st.LoginStatus)})
}

func (a *Server) serverTime(w http.ResponseWriter, r *http.Request) {
	writeAPIJSON(w, http.StatusOK, client.Result[client.ServerTime]{Data: a.Backend.ServerTime()})
}

func (a *Server) metrics(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; version=0.0.4")
	a.Backend.WriteMetrics(w)
}

func (a *Server) login(w http.ResponseWriter, r *http.Request) {
	pc, ok := a.authorise(w, r)
	if !ok {
		return
	}
	var req client.LoginRequest
	if apiErr := decodeLoginRequest(w, r, &req); apiErr != nil {
		a.logPOST(r, pc, "bad request", slog.Int("http_status", apiErr.HTTPStatus))
		writeAPIError(w, apiErr)
		return
	}
	sig := usersig.NewSecret(req.UserSig)
	req.UserSig = ""
	code, desc := a.Backend.Login(r.Context(), req.UserID, sig)
	a.logPOST(r, pc, "done", slog.String("user", req.UserID), slog.Int("code", code), slog.String("desc", desc))
	writeAPIJSON(w, http.StatusOK, client.Result[client.Status]{Code: code, Desc: desc, Data: a.Backend.Status()})
}

func (a *Server) logout(w http.ResponseWriter, r *http.Request) {
	pc, ok := a.authorise(w, r)
	if !ok {
		return
	}
	code, desc := a.Backend.Logout(r.Context())
	a.logPOST(r, pc, "done", slog.Int("code", code), slog.String("desc", desc))
	writeAPIJSON(w, http.StatusOK, client.Result[client.Status]{Code: code, Desc: desc, Data: a.Backend.Status()})
}

// events streams newline-delimited JSON: a status snapshot, then every
// event as it happens, until the client goes away or the backend closes the
// subscription.
func (a *Server) events(w http.ResponseWriter, r *http.Request) {
	// Subscribe first: an event between the snapshot and the subscription
	// would otherwise be lost.
	ch, cancel := a.Backend.Subscribe()
	defer cancel()
	st := a.Backend.Status()

	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	enc := json.NewEncoder(w) // one compact line per value
	send := func(ev client.Event) bool {
		_ = rc.SetWriteDeadline(time.Now().Add(apiEventWriteTimeout))
		if err := enc.Encode(ev); err != nil {
			return false
		}
		return rc.Flush() == nil
	}
	if !send(client.Event{Type: client.EventStatus, Time: a.Now(), Snapshot: &st}) {
		return
	}
	for {
		select {
		case <-r.Context().Done():
			return
		case ev, ok := <-ch:
			if !ok || !send(ev) {
				return
			}
		}
	}
}

// authorise answers 403 and returns false unless the caller may log in and
// out.
func (a *Server) authorise(w http.ResponseWriter, r *http.Request) (PeerCred, bool) {
	pc, known := PeerCredFromContext(r.Context())
	if a.mayOperate(pc, known) {
		return pc, true
	}
	hint := a.permissionHint()
	if !known {
		hint = "the caller's identity is unknown (not a Unix socket connection): use chatd's Unix socket"
	}
	a.logPOST(r, pc, "denied", slog.Int("http_status", http.StatusForbidden))
	writeAPIError(w, &client.APIError{HTTPStatus: http.StatusForbidden, Message: permissionDenied, Hint: hint})
	return pc, false
}

// mayOperate reports whether a caller may log in and out.
func (a *Server) mayOperate(pc PeerCred, known bool) bool {
	if !known {
		return a.TrustNonUnix
	}
	return pc.UID == 0 ||
		(a.DaemonUID >= 0 && pc.UID == uint32(a.DaemonUID)) ||
		peerInGroup(pc, a.OperatorGID)
}

// permissionHint says how to get permission to log in and out.
func (a *Server) permissionHint() string {
	if a.OperatorGID < 0 {
		return "no operator group is configured: run it as root (sudo), or set api.operator_group in chatd's config"
	}
	gid := strconv.Itoa(a.OperatorGID)
	if g, err := user.LookupGroupId(gid); err == nil && g.Name != "" {
		return fmt.Sprintf("add yourself to group %s: sudo usermod -aG %s $USER, then log in again", g.Name, g.Name)
	}
	return fmt.Sprintf("add yourself to the operator group (gid %s): sudo usermod -aG %s $USER, then log in again", gid, gid)
}

// logPOST logs a POST with who made it. Never pass it the UserSig.
func (a *Server) logPOST(r *http.Request, pc PeerCred, outcome string, attrs ...slog.Attr) {
	_, known := PeerCredFromContext(r.Context())
	base := []slog.Attr{slog.String("path", r.URL.Path), slog.String("outcome", outcome)}
	if known {
		base = append(base, slog.Int64("uid", int64(pc.UID)), slog.Int64("pid", int64(pc.PID)))
	} else {
		base = append(base, slog.String("remote", r.RemoteAddr))
	}
	a.log.LogAttrs(r.Context(), slog.LevelInfo, "api "+r.Method, append(base, attrs...)...)
}

// decodeLoginRequest reads the body of POST /v1/login into req. Its errors
// never quote the body, which may hold a UserSig.
func decodeLoginRequest(w http.ResponseWriter, r *http.Request, req *client.LoginRequest) *client.APIError {
	const shape = `send {"user_id": "...", "user_sig": "..."}`
	bad := func(msg string) *client.APIError {
		return &client.APIError{HTTPStatus: http.StatusBadRequest, Message: msg, Hint: shape}
	}
	_ = http.NewResponseController(w).SetReadDeadline(time.Now().Add(apiBodyTimeout))
	defer http.NewResponseController(w).SetReadDeadline(time.Time{})
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxLoginBody))
	dec.DisallowUnknownFields()
	err := dec.Decode(req)
	if err == nil {
		// Exactly one JSON value.
		if err = dec.Decode(new(json.RawMessage)); err == nil {
			return bad("malformed JSON: more than one value in the request body")
		} else if errors.Is(err, io.EOF) {
			err = nil
		}
	}
	var (
		maxErr    *http.MaxBytesError
		syntaxErr *json.SyntaxError
		typeErr   *json.UnmarshalTypeError
	)
	switch {
	case err == nil:
	case errors.As(err, &maxErr):
		return &client.APIError{
			HTTPStatus: http.StatusRequestEntityTooLarge,
			Message:    fmt.Sprintf("request body is larger than %d bytes", maxLoginBody),
			Hint:       "a login request is a user_id and a UserSig, far smaller than that",
		}
	case errors.Is(err, io.EOF):
		return bad("the request body is empty")
	case errors.Is(err, io.ErrUnexpectedEOF):
		return bad("malformed JSON: the request body ends early")
	case errors.As(err, &syntaxErr):
		return bad(fmt.Sprintf("malformed JSON at byte %d", syntaxErr.Offset))
	case errors.As(err, &typeErr):
		if typeErr.Field != "" {
			return bad(fmt.Sprintf("malformed login request: %s must be a string", typeErr.Field))
		}
		return bad("malformed login request: the body must be a JSON object")
	case strings.HasPrefix(err.Error(), "json: unknown field "):
		return bad(fmt.Sprintf("unknown field %s in the login request: only user_id and user_sig are accepted",
			strings.TrimPrefix(err.Error(), "json: unknown field ")))
	default:
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return &client.APIError{HTTPStatus: http.StatusRequestTimeout, Message: "reading the request body timed out"}
		}
		return bad("malformed login request")
	}
	var missing []string
	if req.UserID == "" {
		missing = append(missing, "user_id")
	}
	if req.UserSig == "" {
		missing = append(missing, "user_sig")
	}
	switch len(missing) {
	case 1:
		return bad(missing[0] + " is missing or empty")
	case 2:
		return bad("user_id and user_sig are missing or empty")
	}
	return nil
}

func writeAPIJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func writeAPIError(w http.ResponseWriter, e *client.APIError) {
	writeAPIJSON(w, e.HTTPStatus, e)
}

// ListenSocket listens on the Unix socket path for the local API (see
// unixsock.Listen): 0660, owned by groupGID unless that is -1, and never
// taking over a socket another chatd still serves.
func ListenSocket(path string, groupGID int) (net.Listener, error) {
	ln, err := unixsock.Listen(path, "API socket", groupGID)
	if errors.Is(err, unixsock.ErrInUse) {
		return nil, fmt.Errorf("%w; is chatd already running?", err)
	}
	return ln, err
}

// Serve serves the API on ln until ctx ends, then shuts down gracefully
// (open event streams end at once) and returns nil. Each request's context
// carries the peer credentials of its Unix socket connection
// (PeerCredFromContext).
func (a *Server) Serve(ctx context.Context, ln net.Listener) error {
	srv := &http.Server{
		Handler:           a,
		ReadHeaderTimeout: 5 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    16 << 10,
		// Requests inherit ctx, so that event streams end when it does and
		// Shutdown does not wait for them.
		BaseContext: func(net.Listener) context.Context { return ctx },
		ConnContext: func(cctx context.Context, c net.Conn) context.Context {
			if uc, ok := c.(*net.UnixConn); ok {
				if pc, err := peerCredOf(uc); err == nil {
					return withPeerCred(cctx, pc)
				}
			}
			return cctx
		},
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serving the API on %s: %w", ln.Addr(), err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), apiShutdownGrace)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		srv.Close()
	}
	<-errc
	return nil
}
