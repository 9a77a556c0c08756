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

const (
	// maxLoginBody bounds the body of POST /v1/login (a UserSig is at most
	// 8 KiB) and of every other request (none needs one).
	maxLoginBody = 16 << 10
	// maxHeaderBytes bounds a request's line and headers.
	maxHeaderBytes = 16 << 10
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
	// Limits caps connections and event streams and sets the timeouts for
	// slow or idle callers; zero fields take DefaultLimits.
	Limits Limits
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
	{http.MethodGet, "/metrics", (*Server).metricsText},
}

// Server is the local API: an http.Handler, and Serve runs it on a
// listener.
type Server struct {
	Options
	log     *slog.Logger
	conns   *slots // admitted connections (Serve)
	streams *slots // open event streams
	metrics *apiMetrics
}

// New returns the local API that chatctl and other local programs use
// (docs/api.md). Everyone who can open the socket may read; logging in and
// out needs root, o.DaemonUID or membership of o.OperatorGID, judged by the
// peer credentials Serve stores.
func New(o Options) *Server {
	a := &Server{Options: o, log: o.Logger}
	a.Limits = o.Limits.withDefaults()
	a.conns = newSlots(a.Limits.MaxConns, a.Limits.MaxConnsPerUID)
	a.streams = newSlots(a.Limits.MaxStreams, a.Limits.MaxStreamsPerUID)
	a.metrics = newAPIMetrics(a.conns, a.streams)
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
	// The body, if any, must come within the body timeout; also the rest
	// of one that an answer leaves unread, which the server reads after.
	_ = http.NewResponseController(w).SetReadDeadline(time.Now().Add(a.Limits.BodyTimeout))
	var allowed []string
	for _, e := range apiEndpoints {
		if e.path != r.URL.Path {
			continue
		}
		if e.method == r.Method {
			// POST /v1/login reads its body itself; every other request's
			// body is read (and dropped) now, within the body timeout, so
			// that no handler waits on a slow caller.
			if e.path != "/v1/login" {
				if apiErr := a.discardBody(w, r); apiErr != nil {
					a.writeError(w, apiErr)
					return
				}
			}
			e.handle(a, w, r)
			return
		}
		allowed = append(allowed, e.method)
	}
	if allowed != nil {
		w.Header().Set("Allow", strings.Join(allowed, ", "))
		a.writeError(w, &client.APIError{
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
	a.writeError(w, &client.APIError{
		HTTPStatus: http.StatusNotFound,
		Message:    fmt.Sprintf("no such endpoint %s %s", r.Method, r.URL.Path),
		Hint:       "the endpoints are " + strings.Join(list, ", "),
	})
}

func (a *Server) status(w http.ResponseWriter, r *http.Request) {
	a.writeJSON(w, http.StatusOK, a.Backend.Status())
}

func (a *Server) loginUser(w http.ResponseWriter, r *http.Request) {
	st := a.Backend.Status()
	var user string
	if st.LoginStatus == client.Logined {
		user = st.UserID
	}
	a.writeJSON(w, http.StatusOK, client.Result[string]{Data: user})
}

func (a *Server) loginStatus(w http.ResponseWriter, r *http.Request) {
	st := a.Backend.Status()
	a.writeJSON(w, http.StatusOK, client.Result[int]{Data: int(st.LoginStatus)})
}

func (a *Server) serverTime(w http.ResponseWriter, r *http.Request) {
	a.writeJSON(w, http.StatusOK, client.Result[client.ServerTime]{Data: a.Backend.ServerTime()})
}

func (a *Server) metricsText(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; version=0.0.4")
	_ = http.NewResponseController(w).SetWriteDeadline(time.Now().Add(a.Limits.WriteTimeout))
	a.Backend.WriteMetrics(w)
	a.metrics.write(w)
}

func (a *Server) login(w http.ResponseWriter, r *http.Request) {
	pc, ok := a.authorise(w, r)
	if !ok {
		return
	}
	var req client.LoginRequest
	if apiErr := a.decodeLoginRequest(w, r, &req); apiErr != nil {
		a.logPOST(r, pc, "bad request", slog.Int("http_status", apiErr.HTTPStatus))
		a.writeError(w, apiErr)
		return
	}
	sig := usersig.NewSecret(req.UserSig)
	req.UserSig = ""
	code, desc := a.Backend.Login(r.Context(), req.UserID, sig)
	a.logPOST(r, pc, "done", slog.String("user", req.UserID), slog.Int("code", code), slog.String("desc", desc))
	a.writeJSON(w, http.StatusOK, client.Result[client.Status]{Code: code, Desc: desc, Data: a.Backend.Status()})
}

func (a *Server) logout(w http.ResponseWriter, r *http.Request) {
	pc, ok := a.authorise(w, r)
	if !ok {
		return
	}
	code, desc := a.Backend.Logout(r.Context())
	a.logPOST(r, pc, "done", slog.Int("code", code), slog.String("desc", desc))
	a.writeJSON(w, http.StatusOK, client.Result[client.Status]{Code: code, Desc: desc, Data: a.Backend.Status()})
}

// events streams newline-delimited JSON: a status snapshot, then every
// event as it happens, until the client goes away or the backend closes the
// subscription. Streams are capped per peer uid and in total.
func (a *Server) events(w http.ResponseWriter, r *http.Request) {
	pc, known := PeerCredFromContext(r.Context())
	uid := uidKey(pc, known)
	if limit := a.streams.acquire(uid); limit != "" {
		a.metrics.streamsRefused(limit).Inc()
		a.writeError(w, streamRefusal(limit, uid, a.Limits))
		return
	}
	defer a.streams.release(uid)
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
		_ = rc.SetWriteDeadline(time.Now().Add(a.Limits.WriteTimeout))
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
	a.writeError(w, &client.APIError{HTTPStatus: http.StatusForbidden, Message: permissionDenied, Hint: hint})
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

// discardBody reads a request's body, which no endpoint but POST /v1/login
// uses (within the body timeout ServeHTTP set).
func (a *Server) discardBody(w http.ResponseWriter, r *http.Request) *client.APIError {
	rc := http.NewResponseController(w)
	_, err := io.Copy(io.Discard, r.Body)
	return bodyRead(w, rc, bodyError(err))
}

// bodyRead ends reading a request body. After a failure the connection is
// closed after the answer (what is left of the body is not read, and
// the read deadline stays); after success the read deadline goes, so that
// the server's background read, which notices a caller hanging up, does
// not end a long wait (an event stream, a login, a logout) with a timeout.
func bodyRead(w http.ResponseWriter, rc *http.ResponseController, apiErr *client.APIError) *client.APIError {
	if apiErr != nil {
		w.Header().Set("Connection", "close")
		return apiErr
	}
	_ = rc.SetReadDeadline(time.Time{})
	return nil
}

// bodyError is the answer for an error reading a request body, or nil.
func bodyError(err error) *client.APIError {
	var (
		maxErr *http.MaxBytesError
		ne     net.Error
	)
	switch {
	case err == nil:
		return nil
	case errors.As(err, &maxErr):
		return &client.APIError{
			HTTPStatus: http.StatusRequestEntityTooLarge,
			Message:    fmt.Sprintf("request body is larger than %d bytes", maxLoginBody),
			Hint:       "a login request is a user_id and a UserSig, far smaller than that",
		}
	case errors.As(err, &ne) && ne.Timeout():
		return &client.APIError{
			HTTPStatus: http.StatusRequestTimeout,
			Message:    "reading the request body timed out",
			Hint:       "send the whole request at once",
		}
	}
	return &client.APIError{HTTPStatus: http.StatusBadRequest, Message: "reading the request body failed"}
}

// decodeLoginRequest reads the body of POST /v1/login into req (within the
// body timeout ServeHTTP set). Its errors never quote the body, which may
// hold a UserSig.
func (a *Server) decodeLoginRequest(w http.ResponseWriter, r *http.Request, req *client.LoginRequest) *client.APIError {
	return bodyRead(w, http.NewResponseController(w), decodeLogin(r.Body, req))
}

// decodeLogin decodes a login request from body into req.
func decodeLogin(body io.Reader, req *client.LoginRequest) *client.APIError {
	const shape = `send {"user_id": "...", "user_sig": "..."}`
	bad := func(msg string) *client.APIError {
		return &client.APIError{HTTPStatus: http.StatusBadRequest, Message: msg, Hint: shape}
	}
	dec := json.NewDecoder(body)
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
			return bodyError(err)
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

// writeJSON answers v with HTTP status code, within the write timeout.
func (a *Server) writeJSON(w http.ResponseWriter, code int, v any) {
	_ = http.NewResponseController(w).SetWriteDeadline(time.Now().Add(a.Limits.WriteTimeout))
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_, _ = w.Write(apiJSON(v))
}

func (a *Server) writeError(w http.ResponseWriter, e *client.APIError) {
	a.writeJSON(w, e.HTTPStatus, e)
}

// apiJSON is v as the API's answers show it: indented, one newline at the
// end.
func apiJSON(v any) []byte {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		b = []byte(`{"error": "internal error: encoding the answer failed"}`)
	}
	return append(b, '\n')
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
// (PeerCredFromContext). Connections beyond the caps of Options.Limits are
// answered 503 and closed; slow and idle callers are cut off by its
// timeouts. Serve is called at most once.
func (a *Server) Serve(ctx context.Context, ln net.Listener) error {
	lln := newLimitListener(ln, a.Limits, a.conns, a.metrics)
	defer lln.wg.Wait()
	srv := &http.Server{
		Handler:           a,
		ReadHeaderTimeout: a.Limits.HeaderTimeout,
		IdleTimeout:       a.Limits.IdleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		// Requests inherit ctx, so that event streams end when it does and
		// Shutdown does not wait for them.
		BaseContext: func(net.Listener) context.Context { return ctx },
		ConnContext: func(cctx context.Context, c net.Conn) context.Context {
			if lc, ok := c.(*limitedConn); ok && lc.known {
				return withPeerCred(cctx, lc.pc)
			}
			return cctx
		},
		ErrorLog: slog.NewLogLogger(a.log.Handler(), slog.LevelDebug),
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(lln) }()
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
