// Package cluster holds the tests of a chatgw fleet on a NATS cluster:
// three real nats-server nodes (internal/natstest), real chatgw gateways
// and chatd devices and a simulated fleet, through gateway deaths, node
// deaths, a partition, concurrent logins and a rolling restart; and the
// capacity benchmark. They are behind the build tag "cluster":
//
//	make test-cluster                       # go test -tags cluster ./internal/natstest/ ./cluster/
//	go test -tags cluster -run '^$' -bench Capacity ./cluster/
package cluster
