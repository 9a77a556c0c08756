package systemd

import (
	"bytes"
	"io"
	"log/slog"
	"sync"
)

// NewLogger logs to w. Under journald, each line starts with a syslog
// priority prefix ("<3>") that journald turns into the entry's priority,
// and carries no timestamp of its own (the journal has one).
func NewLogger(w io.Writer, level slog.Level, journal bool) *slog.Logger {
	if !journal {
		return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level}))
	}
	return slog.New(slog.NewTextHandler(&prefixWriter{w: w}, &slog.HandlerOptions{
		Level: level,
		ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
			if len(groups) == 0 && a.Key == slog.TimeKey {
				return slog.Attr{}
			}
			return a
		},
	}))
}

// prefixWriter puts sd-daemon's priority prefix before each record. The
// text handler writes one record per Write, starting "level=LEVEL".
type prefixWriter struct {
	mu sync.Mutex
	w  io.Writer
}

var levels = []struct {
	text, prefix string
}{
	{"level=ERROR", "<3>"},
	{"level=WARN", "<4>"},
	{"level=INFO", "<6>"},
	{"level=DEBUG", "<7>"},
}

func (p *prefixWriter) Write(b []byte) (int, error) {
	prefix := "<6>"
	for _, l := range levels {
		if bytes.HasPrefix(b, []byte(l.text)) {
			prefix = l.prefix
			break
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, err := io.WriteString(p.w, prefix); err != nil {
		return 0, err
	}
	return p.w.Write(b)
}
