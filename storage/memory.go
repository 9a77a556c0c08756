package storage

import (
	"fmt"
	"sync"
)

// Memory is a Store that lives in memory only, with the same semantics as
// Bolt (equal saves are skipped, writes are counted). It is for tests of
// the daemon, and for a daemon whose state directory cannot be written.
type Memory struct {
	mu        sync.Mutex
	state     State
	saved     bool
	writes    uint64
	closed    bool
	failWrite error
}

var _ Store = (*Memory)(nil)

// NewMemory returns an empty Memory store.
func NewMemory() *Memory { return &Memory{} }

// FailWrites makes every later Save that would write fail with err and
// store nothing, as a full or read-only disk would; nil heals the store.
// A Save of the state already stored still succeeds without writing, like
// Bolt's, which does no I/O for it.
func (m *Memory) FailWrites(err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.failWrite = err
}

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
	return cloneState(m.state), nil
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
	if m.failWrite != nil {
		return false, fmt.Errorf("saving state to memory: %w", m.failWrite)
	}
	m.state, m.saved = cloneState(s), true
	m.writes++
	return true, nil
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
