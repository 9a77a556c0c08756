package storage

import (
	"slices"
	"sync"
)

// Memory is a Store that lives in memory only, with the same semantics as
// Bolt (equal saves are skipped, the history is bounded, writes are
// counted). It is for tests of the daemon.
type Memory struct {
	mu     sync.Mutex
	state  State
	saved  bool
	events []Event
	writes uint64
	closed bool
}

var _ Store = (*Memory)(nil)

// NewMemory returns an empty Memory store.
func NewMemory() *Memory { return &Memory{} }

// Load implements Store.
func (m *Memory) Load() (State, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return State{}, errClosed
	}
	if !m.saved {
		return State{}, ErrNotFound
	}
	return m.state, nil
}

// Save implements Store.
func (m *Memory) Save(s State) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return false, errClosed
	}
	if m.saved && stateEqual(m.state, s) {
		return false, nil
	}
	m.state, m.saved = s, true
	m.writes++
	return true, nil
}

// AppendEvent implements Store.
func (m *Memory) AppendEvent(e Event) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return errClosed
	}
	m.events = append(m.events, e)
	if over := len(m.events) - MaxEvents; over > 0 {
		m.events = slices.Delete(m.events, 0, over)
	}
	m.writes++
	return nil
}

// Events implements Store.
func (m *Memory) Events(n int) ([]Event, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, errClosed
	}
	if n <= 0 || len(m.events) == 0 {
		return nil, nil
	}
	n = min(n, len(m.events))
	return slices.Clone(m.events[len(m.events)-n:]), nil
}

// Writes implements Store.
func (m *Memory) Writes() uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.writes
}

// Close implements Store.
func (m *Memory) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.closed = true
	return nil
}
