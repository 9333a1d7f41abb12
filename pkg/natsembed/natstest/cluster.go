package natstest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// ClusterName is the NATS cluster name of every test cluster.
const ClusterName = "easguard-test"

// Cluster is a real NATS JetStream cluster of in-process servers that talk
// to each other over loopback routes, each with its file store in its own
// temporary directory. Tests use it to see what replicated streams and
// buckets (R3) do when a node dies, comes back with its store, or the
// whole cluster restarts: things a single server cannot show.
//
// Every route a node dials goes through a small TCP relay the cluster
// owns, one per ordered pair of nodes. Kill cuts a node's relays before it
// shuts the node down: its peers lose it without a goodbye, exactly as when
// the process dies, instead of being handed its Raft leaderships by the
// orderly shutdown (nats-server steps leaders down first). Ports and store
// directories stay the same for the life of the cluster, so a restarted
// node is the same member with the same data.
//
// Set EASGUARD_TEST_NATS_LOG=1 to see the servers' logs.
type Cluster struct {
	tb    testing.TB
	mu    sync.Mutex
	nodes []*clusterNode
}

// clusterNode is one member: its fixed options and, while it runs, its server.
type clusterNode struct {
	name       string
	clientPort int
	routePort  int
	storeDir   string
	out        []*relay // route relays this node dials, one per peer
	in         []*relay // route relays its peers dial to reach it
	ns         *server.Server
}

// StartCluster starts an n-node cluster (three is the smallest that keeps
// a quorum when one node fails), waits until it is ready (see WaitReady),
// and shuts it down when the test ends.
func StartCluster(tb testing.TB, n int) *Cluster {
	tb.Helper()
	if n < 1 {
		tb.Fatalf("start cluster: %d nodes", n)
	}
	c := &Cluster{tb: tb}
	ports := FreePorts(tb, 2*n)
	for i := range n {
		c.nodes = append(c.nodes, &clusterNode{
			name: fmt.Sprintf("n%d", i+1), clientPort: ports[2*i], routePort: ports[2*i+1], storeDir: tb.TempDir(),
		})
	}
	for _, from := range c.nodes {
		for _, to := range c.nodes {
			if from == to {
				continue
			}
			r, err := startRelay(fmt.Sprintf("127.0.0.1:%d", to.routePort))
			if err != nil {
				tb.Fatalf("start cluster: route relay %s→%s: %v", from.name, to.name, err)
			}
			from.out = append(from.out, r)
			to.in = append(to.in, r)
		}
	}
	tb.Cleanup(func() {
		c.StopAll()
		for _, nd := range c.nodes {
			for _, r := range nd.out {
				r.close()
			}
		}
	})
	c.StartAll()
	return c
}

// Size returns the number of nodes.
func (c *Cluster) Size() int { return len(c.nodes) }

// URLs returns every node's client URL, in node order, whether it runs or not.
func (c *Cluster) URLs() []string {
	out := make([]string, len(c.nodes))
	for i, nd := range c.nodes {
		out[i] = fmt.Sprintf("nats://127.0.0.1:%d", nd.clientPort)
	}
	return out
}

// URL returns the client URLs comma-separated, as EASGUARD_NATS_URL takes them.
func (c *Cluster) URL() string { return strings.Join(c.URLs(), ",") }

// Name returns node i's server name (n1, n2, …).
func (c *Cluster) Name(i int) string { return c.nodes[i].name }

// Server returns node i's server, or nil while it is down.
func (c *Cluster) Server(i int) *server.Server {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.nodes[i].ns
}

// options builds node nd's server options; the same every start.
func (c *Cluster) options(nd *clusterNode) *server.Options {
	var routes []*url.URL
	for _, r := range nd.out {
		routes = append(routes, &url.URL{Scheme: "nats-route", Host: r.addr()})
	}
	logs := os.Getenv("EASGUARD_TEST_NATS_LOG") != ""
	return &server.Options{
		ServerName: nd.name,
		Host:       "127.0.0.1",
		Port:       nd.clientPort,
		JetStream:  true,
		StoreDir:   nd.storeDir,
		NoSigs:     true,
		NoLog:      !logs,
		Cluster: server.ClusterOpts{
			Name: ClusterName, Host: "127.0.0.1", Port: nd.routePort,
			// Peers learn each other only through the configured
			// relays: an address gossiped between them would be a route
			// that Kill could not cut.
			Advertise: blackhole,
		},
		Routes: routes,
	}
}

// start starts node nd; it must be down. It may run on a goroutine of its
// own, so it reports its failure instead of failing the test.
func (c *Cluster) start(nd *clusterNode) error {
	ns, err := server.NewServer(c.options(nd))
	if err != nil {
		return fmt.Errorf("start NATS node %s: %w", nd.name, err)
	}
	if os.Getenv("EASGUARD_TEST_NATS_LOG") != "" {
		ns.ConfigureLogger()
	}
	go ns.Start()
	// Generous: under -race, with every package's tests sharing two
	// cores, a node that recovers a store has been seen to need over 10s.
	if !ns.ReadyForConnections(30 * time.Second) {
		ns.Shutdown()
		return fmt.Errorf("start NATS node %s: not accepting connections after 30s (client port %d, route port %d)", nd.name, nd.clientPort, nd.routePort)
	}
	c.mu.Lock()
	nd.ns = ns
	c.mu.Unlock()
	return nil
}

// stop shuts node nd down and waits for it; a node that is down stays so.
func (c *Cluster) stop(nd *clusterNode) {
	c.mu.Lock()
	ns := nd.ns
	nd.ns = nil
	c.mu.Unlock()
	if ns != nil {
		ns.Shutdown()
		ns.WaitForShutdown()
	}
}

// Kill ends node i the hard way: its routes are cut first, so its peers
// lose it mid-conversation and must elect new leaders for what it led,
// then it is shut down, which drops its clients' connections. The store
// stays for Restart.
func (c *Cluster) Kill(i int) {
	c.tb.Helper()
	nd := c.nodes[i]
	for _, r := range append(append([]*relay(nil), nd.out...), nd.in...) {
		_ = r.cut(true) // cutting never fails
	}
	c.stop(nd)
}

// Restart starts node i again with the same name, ports and store, and
// waits until the cluster is ready. The node must be down (Kill).
func (c *Cluster) Restart(i int) {
	c.tb.Helper()
	nd := c.nodes[i]
	if c.Server(i) != nil {
		c.tb.Fatalf("restart NATS node %s: it is running", nd.name)
	}
	for _, r := range append(append([]*relay(nil), nd.out...), nd.in...) {
		if err := r.cut(false); err != nil {
			c.tb.Fatalf("restart NATS node %s: %v", nd.name, err)
		}
	}
	if err := c.start(nd); err != nil {
		c.tb.Fatalf("restart: %v", err)
	}
	c.WaitReady(c.tb, time.Minute)
}

// StopAll shuts every node down in an orderly way (what an operator's
// restart of the whole cluster does); stores are kept.
func (c *Cluster) StopAll() {
	var wg sync.WaitGroup
	for _, nd := range c.nodes {
		wg.Add(1)
		go func() { defer wg.Done(); c.stop(nd) }()
	}
	wg.Wait()
}

// StartAll starts every node that is down, with its store, and waits until
// the cluster is ready.
func (c *Cluster) StartAll() {
	c.tb.Helper()
	for _, nd := range c.nodes {
		for _, r := range nd.out {
			if err := r.cut(false); err != nil {
				c.tb.Fatalf("start cluster: %v", err)
			}
		}
	}
	var wg sync.WaitGroup
	errs := make([]error, len(c.nodes))
	for i, nd := range c.nodes {
		if c.Server(i) != nil {
			continue
		}
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = c.start(nd) }()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		c.tb.Fatalf("start cluster: %v", err)
	}
	c.WaitReady(c.tb, time.Minute)
}

// WaitReady waits until the JetStream meta group has a leader that every
// running node follows and that can place a stream on all of them: from
// then on streams and consumers with as many replicas as nodes run can be
// created. JetStream API calls made earlier time out or find no peers
// ("peer offline": the leader has not heard from them yet). The placement
// is checked for real, with a memory stream that is deleted at once.
func (c *Cluster) WaitReady(tb testing.TB, timeout time.Duration) {
	tb.Helper()
	ctx := Context(tb)
	Eventually(tb, timeout, "a JetStream meta leader that can place a stream on every running node", func() bool {
		leader, running := c.metaLeader()
		if leader == nil {
			return false
		}
		nc, err := nats.Connect(leader.ClientURL(), nats.NoReconnect(), nats.Timeout(time.Second))
		if err != nil {
			return false
		}
		defer nc.Close()
		js, err := jetstream.New(nc)
		if err != nil {
			return false
		}
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		const probe = "NATSTEST_READY"
		if _, err := js.CreateStream(cctx, jetstream.StreamConfig{Name: probe, Subjects: []string{"natstest.ready"}, Storage: jetstream.MemoryStorage, Replicas: running}); err != nil {
			return false
		}
		return js.DeleteStream(cctx, probe) == nil
	})
}

// metaLeader returns the meta leader when every running node is current
// and the leader sees each as current, and how many nodes run.
func (c *Cluster) metaLeader() (*server.Server, int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var leader *server.Server
	running := map[string]bool{}
	for _, nd := range c.nodes {
		if nd.ns == nil {
			continue
		}
		running[nd.name] = true
		if !nd.ns.JetStreamIsCurrent() {
			return nil, 0
		}
		if nd.ns.JetStreamIsLeader() {
			leader = nd.ns
		}
	}
	if leader == nil {
		return nil, 0
	}
	jsz, err := leader.Jsz(nil)
	if err != nil || jsz.Meta == nil || jsz.Meta.Leader == "" {
		return nil, 0
	}
	current := 1 // the leader
	for _, p := range jsz.Meta.Replicas {
		if running[p.Name] && p.Current && !p.Offline {
			current++
		}
	}
	if current != len(running) {
		return nil, 0
	}
	return leader, len(running)
}

// Connect opens a client connection to node i only (no failover to the
// others), closed when the test ends.
func (c *Cluster) Connect(tb testing.TB, i int) (*nats.Conn, jetstream.JetStream) {
	tb.Helper()
	nc, err := nats.Connect(c.URLs()[i], nats.Name(tb.Name()), nats.DontRandomize(), nats.NoReconnect())
	if err != nil {
		tb.Fatalf("connect to NATS node %s: %v", c.nodes[i].name, err)
	}
	tb.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		tb.Fatalf("jetstream on node %s: %v", c.nodes[i].name, err)
	}
	return nc, js
}

// blackhole is an address that refuses connections: port 1 on loopback
// has no listener on a test machine.
const blackhole = "127.0.0.1:1"

// relay forwards TCP connections from its own loopback port to a target.
// Cut closes its port and every connection through it, as a dead peer's
// would be: dials are refused (not accepted and dropped, which a server
// would take for a peer that answers). Up listens on the same port again.
type relay struct {
	address string
	target  string

	mu     sync.Mutex
	ln     net.Listener // nil while cut or closed
	closed bool
	conns  map[net.Conn]struct{}
}

func startRelay(target string) (*relay, error) {
	ln, err := listenLow() // Up listens on it again, after connections came and went
	if err != nil {
		return nil, err
	}
	r := &relay{address: ln.Addr().String(), target: target, ln: ln, conns: map[net.Conn]struct{}{}}
	go r.serve(ln)
	return r, nil
}

func (r *relay) addr() string { return r.address }

func (r *relay) serve(ln net.Listener) {
	for {
		in, err := ln.Accept()
		if err != nil {
			return
		}
		go r.forward(in)
	}
}

// forward pipes one accepted connection to the target until either side
// ends or the relay is cut.
func (r *relay) forward(in net.Conn) {
	out, err := net.DialTimeout("tcp", r.target, 2*time.Second)
	if err != nil {
		in.Close()
		return
	}
	r.mu.Lock()
	if r.ln == nil {
		r.mu.Unlock()
		in.Close()
		out.Close()
		return
	}
	r.conns[in], r.conns[out] = struct{}{}, struct{}{}
	r.mu.Unlock()
	done := make(chan struct{}, 2)
	pipe := func(dst, src net.Conn) {
		_, _ = io.Copy(dst, src)
		done <- struct{}{}
	}
	go pipe(out, in)
	go pipe(in, out)
	<-done
	in.Close()
	out.Close()
	r.mu.Lock()
	delete(r.conns, in)
	delete(r.conns, out)
	r.mu.Unlock()
}

// cut closes the port and drops every connection (down true), or listens
// on the port again (down false).
func (r *relay) cut(down bool) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !down {
		if r.ln != nil || r.closed {
			return nil
		}
		ln, err := net.Listen("tcp", r.address)
		if err != nil {
			return fmt.Errorf("relay %s: listen again: %w", r.address, err)
		}
		r.ln = ln
		go r.serve(ln)
		return nil
	}
	if r.ln != nil {
		r.ln.Close()
		r.ln = nil
	}
	for c := range r.conns {
		if tc, ok := c.(*net.TCPConn); ok {
			_ = tc.SetLinger(0) // a reset, as when the peer's process dies
		}
		c.Close()
	}
	return nil
}

// close stops the relay for good.
func (r *relay) close() {
	r.mu.Lock()
	r.closed = true
	r.mu.Unlock()
	_ = r.cut(true)
}
