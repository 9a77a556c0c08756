package gateway

import (
	"container/list"
	"time"
)

// lru is a bounded map with a time to live: at most size entries, each
// forgotten ttl after it was last put, the least recently put first when
// full. It takes the time from its caller, like the engine.
type lru[V any] struct {
	size  int
	ttl   time.Duration
	m     map[string]*list.Element
	order *list.List // front: most recently put
	// evicted is called for each entry dropped because the map was full
	// (not for expired ones).
	evicted func()
}

type lruEntry[V any] struct {
	key string
	v   V
	at  time.Time
}

func newLRU[V any](size int, ttl time.Duration, evicted func()) *lru[V] {
	return &lru[V]{size: size, ttl: ttl, m: map[string]*list.Element{}, order: list.New(), evicted: evicted}
}

func (c *lru[V]) get(k string, now time.Time) (V, bool) {
	var zero V
	el, ok := c.m[k]
	if !ok {
		return zero, false
	}
	e := el.Value.(*lruEntry[V])
	if now.Sub(e.at) > c.ttl {
		c.order.Remove(el)
		delete(c.m, k)
		return zero, false
	}
	return e.v, true
}

// peek returns k's value and when it was put, whatever its age, without
// making it more recent.
func (c *lru[V]) peek(k string) (V, time.Time, bool) {
	el, ok := c.m[k]
	if !ok {
		var zero V
		return zero, time.Time{}, false
	}
	e := el.Value.(*lruEntry[V])
	return e.v, e.at, true
}

func (c *lru[V]) put(k string, v V, now time.Time) {
	if el, ok := c.m[k]; ok {
		e := el.Value.(*lruEntry[V])
		e.v, e.at = v, now
		c.order.MoveToFront(el)
		return
	}
	c.m[k] = c.order.PushFront(&lruEntry[V]{key: k, v: v, at: now})
	c.prune(now)
}

func (c *lru[V]) delete(k string) {
	if el, ok := c.m[k]; ok {
		c.order.Remove(el)
		delete(c.m, k)
	}
}

// prune drops expired entries from the old end, then the oldest while the
// map is over its size.
func (c *lru[V]) prune(now time.Time) {
	for el := c.order.Back(); el != nil; el = c.order.Back() {
		e := el.Value.(*lruEntry[V])
		expired := now.Sub(e.at) > c.ttl
		if !expired && c.order.Len() <= c.size {
			return
		}
		c.order.Remove(el)
		delete(c.m, e.key)
		if !expired && c.evicted != nil {
			c.evicted()
		}
	}
}

func (c *lru[V]) len() int { return c.order.Len() }
