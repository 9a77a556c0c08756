package storage

import (
	"path/filepath"
	"testing"
)

// benchStores runs bench against a Memory and a Bolt store.
func benchStores(b *testing.B, bench func(b *testing.B, s Store)) {
	b.Run("Memory", func(b *testing.B) { bench(b, NewMemory()) })
	b.Run("Bolt", func(b *testing.B) {
		bench(b, openTestBolt(b, filepath.Join(b.TempDir(), "state.db"), BoltOptions{}))
	})
}

func BenchmarkSaveUnchanged(b *testing.B) {
	benchStores(b, func(b *testing.B, s Store) {
		st := sampleState()
		if _, err := s.Save(st); err != nil {
			b.Fatal(err)
		}
		before := s.Writes()
		for b.Loop() {
			if _, err := s.Save(st); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(s.Writes()-before)/float64(b.N), "writes/op")
	})
}

func BenchmarkSaveChanged(b *testing.B) {
	benchStores(b, func(b *testing.B, s Store) {
		st := sampleState()
		before := s.Writes()
		for b.Loop() {
			st.KickCount++
			if _, err := s.Save(st); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(s.Writes()-before)/float64(b.N), "writes/op")
	})
}
