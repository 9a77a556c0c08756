package gateway

import (
	"chatd/internal/unixsock"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"time"
)

// AdminHandler serves the admin API:
//
//	GET  /v1/sessions            active sessions
//	GET  /v1/users/{user}        one user's state (online/offline) and sessions
//	POST /v1/users/{user}/kick   kick every session, invalidate older UserSigs
//	GET  /metrics                Prometheus text format
//	GET  /healthz                liveness, and the broker connection
//	GET  /readyz                 200 once devices get answers, 503 before
//
// docs/admin-api.md documents every endpoint. It has no authentication:
// serve it on a Unix socket or loopback only.
func (g *Gateway) AdminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/sessions", func(w http.ResponseWriter, r *http.Request) {
		ss := g.Sessions("")
		if ss == nil {
			ss = []Session{}
		}
		writeJSON(w, http.StatusOK, map[string]any{"sessions": ss})
	})
	mux.HandleFunc("GET /v1/users/{user}", func(w http.ResponseWriter, r *http.Request) {
		user := r.PathValue("user")
		ss := g.Sessions(user)
		state := "offline"
		for _, s := range ss {
			if s.Online {
				state = "online"
			}
		}
		resp := map[string]any{"user_id": user, "state": state, "sessions": ss}
		if ss == nil {
			resp["sessions"] = []Session{}
		}
		if at, ok := g.RevokedBefore(user); ok {
			resp["usersigs_revoked_before"] = at.UTC().Format(time.RFC3339)
		}
		writeJSON(w, http.StatusOK, resp)
	})
	mux.HandleFunc("POST /v1/users/{user}/kick", func(w http.ResponseWriter, r *http.Request) {
		n, at, err := g.Kick(r.PathValue("user"))
		if errors.Is(err, errUnwritten) {
			writeJSON(w, http.StatusInternalServerError, map[string]any{"error": "kick not saved: " + err.Error() + "; its kicks go out once it is written"})
			return
		}
		if err != nil {
			writeJSON(w, http.StatusBadRequest, map[string]any{"error": err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"kicked_sessions": n, "usersigs_revoked_before": at.UTC().Format(time.RFC3339)})
	})
	mux.HandleFunc("GET /metrics", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4")
		g.WriteMetrics(w)
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, g.health())
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		h := g.health()
		code := http.StatusOK
		if !h.Ready {
			code = http.StatusServiceUnavailable
		}
		writeJSON(w, code, h)
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusNotFound, map[string]any{"error": fmt.Sprintf("no such endpoint %s %s; see GET /v1/sessions, GET /v1/users/{user}, POST /v1/users/{user}/kick, GET /metrics, GET /healthz, GET /readyz", r.Method, r.URL.Path)})
	})
	return mux
}

// health is the body of /healthz and /readyz.
type health struct {
	OK              bool `json:"ok"`
	Ready           bool `json:"ready"`
	BrokerConnected bool `json:"broker_connected"`
	StateUnwritten  bool `json:"state_unwritten"`
}

func (g *Gateway) health() health {
	h := health{OK: true, BrokerConnected: g.brokerUp.Load()}
	select {
	case <-g.subscribed:
		h.Ready = h.BrokerConnected
	default:
	}
	g.mu.Lock()
	h.StateUnwritten = g.unwritten
	g.mu.Unlock()
	return h
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

// ListenAdmin listens on addr: a path (containing '/') is a Unix socket made
// 0660 and given to group gid (-1: the process's own group), never taking
// over one that another chatgw still serves; anything else is host:port
// and must be a loopback address, since the API has no authentication of
// its own.
func ListenAdmin(addr string, gid int) (net.Listener, error) {
	if strings.Contains(addr, "/") {
		ln, err := unixsock.Listen(addr, "admin socket", gid)
		if errors.Is(err, unixsock.ErrInUse) {
			return nil, fmt.Errorf("%w; is another chatgw running?", err)
		}
		return ln, err
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("admin address %q: use host:port (loopback) or a socket path: %w", addr, err)
	}
	ip := net.ParseIP(host)
	if host != "localhost" && (ip == nil || !ip.IsLoopback()) {
		return nil, fmt.Errorf("admin address %q is not loopback: the admin API has no authentication; use 127.0.0.1:PORT or a Unix socket path", addr)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("admin address %s: %w", addr, err)
	}
	return ln, nil
}
