package gateway

import "time"

// dueHeap is a min-heap of keys by time, ties broken by key, with removal
// and rescheduling by key: the engine's timers (UserSig expiries,
// tombstones and flags to forget) cost O(log n) each instead of a scan of
// the fleet.
type dueHeap struct {
	items []dueItem
	pos   map[string]int // key -> index in items
}

type dueItem struct {
	at  time.Time
	key string
}

func newDueHeap() *dueHeap { return &dueHeap{pos: map[string]int{}} }

func (h *dueHeap) len() int { return len(h.items) }

func (h *dueHeap) less(i, j int) bool {
	a, b := h.items[i], h.items[j]
	if !a.at.Equal(b.at) {
		return a.at.Before(b.at)
	}
	return a.key < b.key
}

func (h *dueHeap) swap(i, j int) {
	h.items[i], h.items[j] = h.items[j], h.items[i]
	h.pos[h.items[i].key] = i
	h.pos[h.items[j].key] = j
}

func (h *dueHeap) up(i int) {
	for i > 0 {
		p := (i - 1) / 2
		if !h.less(i, p) {
			return
		}
		h.swap(i, p)
		i = p
	}
}

func (h *dueHeap) down(i int) {
	n := len(h.items)
	for {
		l := 2*i + 1
		if l >= n {
			return
		}
		c := l
		if r := l + 1; r < n && h.less(r, l) {
			c = r
		}
		if !h.less(c, i) {
			return
		}
		h.swap(i, c)
		i = c
	}
}

// set schedules key at at, replacing its earlier time if it had one.
func (h *dueHeap) set(key string, at time.Time) {
	if i, ok := h.pos[key]; ok {
		h.items[i].at = at
		h.up(i)
		h.down(h.pos[key])
		return
	}
	h.items = append(h.items, dueItem{at: at, key: key})
	h.pos[key] = len(h.items) - 1
	h.up(len(h.items) - 1)
}

// remove unschedules key (nothing happens if it is not scheduled).
func (h *dueHeap) remove(key string) {
	i, ok := h.pos[key]
	if !ok {
		return
	}
	last := len(h.items) - 1
	if i != last {
		h.swap(i, last)
	}
	h.items = h.items[:last]
	delete(h.pos, key)
	if i != last {
		h.up(i)
		h.down(i)
	}
}

// peek returns the earliest item.
func (h *dueHeap) peek() (dueItem, bool) {
	if len(h.items) == 0 {
		return dueItem{}, false
	}
	return h.items[0], true
}
