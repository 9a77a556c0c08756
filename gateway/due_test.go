package gateway

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

// Seeded random sets, reschedules and removals; the heap always yields
// what a sorted list of the same schedule would.
func TestDueHeapMatchesSortedList(t *testing.T) {
	for seed := range uint64(10) {
		rnd := rand.New(rand.NewPCG(seed, 1))
		h := newDueHeap()
		want := map[string]time.Time{}
		for step := range 2000 {
			key := fmt.Sprint("k", rnd.IntN(50))
			switch rnd.IntN(4) {
			case 0, 1:
				at := t0.Add(time.Duration(rnd.IntN(100)) * time.Second)
				h.set(key, at)
				want[key] = at
			case 2:
				h.remove(key)
				delete(want, key)
			case 3:
				d, ok := h.peek()
				if !ok {
					continue
				}
				h.remove(d.key)
				var first dueItem
				for k, at := range want {
					if first.key == "" || at.Before(first.at) || at.Equal(first.at) && k < first.key {
						first = dueItem{at: at, key: k}
					}
				}
				if d != first {
					t.Fatalf("seed %d step %d: earliest is %v, want %v", seed, step, d, first)
				}
				delete(want, d.key)
			}
			if h.len() != len(want) {
				t.Fatalf("seed %d step %d: heap holds %d, want %d", seed, step, h.len(), len(want))
			}
		}
		var got, sorted []string
		for h.len() > 0 {
			d, _ := h.peek()
			h.remove(d.key)
			got = append(got, d.key)
		}
		for k := range want {
			sorted = append(sorted, k)
		}
		slices.SortFunc(sorted, func(a, b string) int {
			if c := want[a].Compare(want[b]); c != 0 {
				return c
			}
			return compareStrings(a, b)
		})
		if !slices.Equal(got, sorted) {
			t.Fatalf("seed %d: drained %v, want %v", seed, got, sorted)
		}
	}
}

func compareStrings(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}
