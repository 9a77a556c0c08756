package localapi

import (
	"context"
	"io"

	"chatd/client"
	"chatd/usersig"
)

// Backend is what the local API serves: the daemon implements it, and the
// API's tests use a fake.
type Backend interface {
	// Status is a snapshot of where the daemon stands.
	Status() client.Status
	// Login logs in as user with sig and returns when it succeeded or
	// failed, with the SDK's code (0 on success) and a description. A login
	// while one is running joins it; another user is an account switch.
	Login(ctx context.Context, user string, sig usersig.Secret) (code int, desc string)
	// Logout logs out and returns when done.
	Logout(ctx context.Context) (code int, desc string)
	// Subscribe returns a channel of events from now on and a function to
	// stop them. A subscriber that falls behind loses events rather than
	// stalling the daemon; the channel is closed when it is cancelled or
	// the daemon stops.
	Subscribe() (<-chan client.Event, func())
	// ServerTime is the gateway's clock as the daemon knows it.
	ServerTime() client.ServerTime
	// WriteMetrics writes Prometheus text.
	WriteMetrics(w io.Writer)
}
