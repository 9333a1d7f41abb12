package natstest

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
)

// FreeAddr returns a loopback address nothing listens on now, for a
// server or process the test starts to listen on.
//
// It is picked below the kernel's ephemeral range (ip_local_port_range):
// the kernel gives ports from that range to every outgoing connection and
// every ":0" listener, so a port checked free there can be taken by one of
// the many connections the parallel tests open before the process binds
// it (TestDemo once failed so: "bind: address already in use"; a cluster
// node once never listened, its port taken while its peers dialled).
func FreeAddr(tb testing.TB) string {
	tb.Helper()
	return fmt.Sprintf("127.0.0.1:%d", FreePorts(tb, 1)[0])
}

// FreePorts returns n distinct loopback ports nothing listens on now, from
// below the kernel's ephemeral range (see FreeAddr).
func FreePorts(tb testing.TB, n int) []int {
	tb.Helper()
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
	}()
	ports := make([]int, 0, n)
	for range n {
		ln, err := listenLow()
		if err != nil {
			tb.Fatal(err)
		}
		lns = append(lns, ln) // held until all are picked: no port twice
		ports = append(ports, ln.Addr().(*net.TCPAddr).Port)
	}
	return ports
}

// listenLow listens on a loopback port below the kernel's ephemeral range
// (see FreeAddr), so that a listener closed and opened again on the same
// port (a relay cut and restored) does not find it taken by an outgoing
// connection.
func listenLow() (net.Listener, error) {
	low := ephemeralLow()
	for range 200 {
		ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", 10000+rand.IntN(low-10000)))
		if err == nil {
			return ln, nil
		}
		// in use: another test's
	}
	return nil, fmt.Errorf("no free port between 10000 and %d", low)
}

// ephemeralLow is the lowest port the kernel hands out on its own
// (Linux's ip_local_port_range; IANA's 49152 elsewhere).
func ephemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 49152
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 49152
	}
	low, err := strconv.Atoi(f[0])
	if err != nil || low <= 11000 {
		return 49152
	}
	return low
}
