package config

import (
	"net"
	"net/url"
	"strings"
	"time"

	"github.com/easguard/easguard/pkg/bus"
	"github.com/easguard/easguard/pkg/telemetry"
)

// Common holds the settings every easguard worker shares: which org it
// serves, how it reaches NATS, where it reports. Workers embed it in their
// own configuration struct.
type Common struct {
	Org string `split_words:"true" required:"true" desc:"Exchange organisation this worker set serves; a subject token: lower-case letters, digits, '-' or '_'."`

	NatsURL       string        `split_words:"true" desc:"NATS server URL(s), comma-separated. Empty: the all-in-one binary starts an embedded server."`
	NatsUser      string        `split_words:"true" desc:"NATS user name."`
	NatsPassword  Secret        `split_words:"true" secret:"true" desc:"NATS password."`
	NatsToken     Secret        `split_words:"true" secret:"true" desc:"NATS authentication token."`
	NatsCredsFile string        `split_words:"true" desc:"Path of a NATS .creds file (JWT and NKey)."`
	NatsReplicas  int           `split_words:"true" default:"1" desc:"Replicas of every stream and bucket: 1 for one server, 3 for a cluster."`
	LeaseTTL      time.Duration `split_words:"true" default:"15s" desc:"A standby takes over a singleton duty (the collector of an org) within this time of the active one failing."`
	Retention     time.Duration `split_words:"true" default:"336h" desc:"How long observed, matched, decided and applied events are kept for replay and audit."`
	AckWait       time.Duration `split_words:"true" default:"30s" desc:"A message a crashed worker was handling is redelivered to another replica after this long (live workers extend it while they work)."`
	MaxDeliver    int           `split_words:"true" default:"10" desc:"Deliveries of one message before it is dead-lettered with the reason (retries back off from 1s to 5m in between)."`
	Concurrency   int           `split_words:"true" default:"8" desc:"Messages the matcher, evaluator and mailer of this process each handle at once (replicas add theirs): most of a message's time is waiting for the bus, so several at once keep a full sync of a large organisation moving (on 2 cores a 20,000-partnership full sync judged at about 1,750 a second with 4, 2,150 with 8, and no faster with 16, which only queues requests at the NATS server). Every state change is compare-and-set, so two messages about one device may run together."`

	HTTPAddr     string `split_words:"true" default:"127.0.0.1:9090" desc:"Listen address of /healthz, /readyz and /metrics."`
	DebugAddr    string `split_words:"true" desc:"Listen address of Go's profiler (/debug/pprof/), for diagnosing CPU and memory use; empty: off. It has no authentication: keep it on loopback."`
	LogLevel     string `split_words:"true" default:"info" desc:"Log level: debug, info, warn or error."`
	OtelEndpoint string `split_words:"true" desc:"OTLP/HTTP endpoint for traces and metrics, e.g. http://collector:4318. Empty: OTEL_EXPORTER_OTLP_ENDPOINT if set, else no export."`
	InstanceID   string `split_words:"true" desc:"Name of this replica in leases, logs and traces. Empty: hostname and process id."`

	ShutdownTimeout  time.Duration `split_words:"true" default:"30s" desc:"How long a stopping worker waits for messages in flight."`
	MemoryLimitRatio float64       `split_words:"true" default:"0.9" desc:"Share of the container's memory limit (its cgroup's) that Go is given as its soft limit (GOMEMLIMIT), so that the garbage collector works harder instead of the kernel killing the process at the limit (a 100,000-partnership all-in-one ran at 1.05 GB instead of 1.8 GB with a 1 GiB limit, 27% slower). 0: off; no effect without a cgroup limit; a GOMEMLIMIT in the environment wins."`
	BindTimeout      time.Duration `split_words:"true" default:"1m" desc:"How long a worker keeps trying to provision the streams and buckets (a NATS cluster still forming) and to bind its consumers (a stream not there yet, a conflicting consumer) while /readyz says why, before the process exits non-zero with the reason."`
}

// Validate checks the common settings.
func (c *Common) Validate() error {
	if _, err := bus.ParseOrg(c.Org); err != nil {
		return Invalid(&c.Org, "%v", err)
	}
	for _, u := range splitList(c.NatsURL) {
		p, err := url.Parse(u)
		if err != nil || p.Host == "" {
			return Invalid(&c.NatsURL, "%q is not a URL such as nats://host:4222", redactURL(u))
		}
		switch p.Scheme {
		case "nats", "tls", "ws", "wss":
		default:
			return Invalid(&c.NatsURL, "scheme %q: use nats, tls, ws or wss", p.Scheme)
		}
	}
	if c.NatsToken != "" && (c.NatsUser != "" || c.NatsPassword != "") {
		return Invalid(&c.NatsToken, "use a token or a user and password, not both")
	}
	if (c.NatsUser == "") != (c.NatsPassword == "") {
		return Invalid(&c.NatsUser, "a NATS user needs a password and a password needs a user")
	}
	if c.NatsReplicas != 1 && c.NatsReplicas != 3 && c.NatsReplicas != 5 {
		return Invalid(&c.NatsReplicas, "must be 1, 3 or 5, got %d", c.NatsReplicas)
	}
	if c.LeaseTTL < 2*time.Second {
		return Invalid(&c.LeaseTTL, "must be at least 2s, got %s", c.LeaseTTL)
	}
	if c.AckWait < time.Second || c.AckWait > 10*time.Minute {
		return Invalid(&c.AckWait, "must be between 1s and 10m, got %s", c.AckWait)
	}
	if c.MaxDeliver != 0 && (c.MaxDeliver < 2 || c.MaxDeliver > 100) {
		return Invalid(&c.MaxDeliver, "must be between 2 and 100, got %d", c.MaxDeliver)
	}
	if c.Concurrency < 1 || c.Concurrency > 64 {
		return Invalid(&c.Concurrency, "must be between 1 and 64, got %d", c.Concurrency)
	}
	if c.Retention < time.Hour {
		return Invalid(&c.Retention, "must be at least 1h, got %s", c.Retention)
	}
	if _, _, err := net.SplitHostPort(c.HTTPAddr); err != nil {
		return Invalid(&c.HTTPAddr, "%q is not host:port: %v", c.HTTPAddr, err)
	}
	if c.DebugAddr != "" {
		if _, _, err := net.SplitHostPort(c.DebugAddr); err != nil {
			return Invalid(&c.DebugAddr, "%q is not host:port: %v", c.DebugAddr, err)
		}
	}
	if _, err := telemetry.ParseLevel(c.LogLevel); err != nil {
		return Invalid(&c.LogLevel, "%v", err)
	}
	if c.OtelEndpoint != "" {
		p, err := url.Parse(c.OtelEndpoint)
		if err != nil || (p.Scheme != "http" && p.Scheme != "https") || p.Host == "" {
			return Invalid(&c.OtelEndpoint, "%q is not an http(s) URL", redactURL(c.OtelEndpoint))
		}
	}
	if c.ShutdownTimeout <= 0 {
		return Invalid(&c.ShutdownTimeout, "must be positive, got %s", c.ShutdownTimeout)
	}
	if c.BindTimeout < 0 {
		return Invalid(&c.BindTimeout, "must not be negative, got %s", c.BindTimeout)
	}
	if !(c.MemoryLimitRatio >= 0 && c.MemoryLimitRatio <= 1) { // also refuses NaN
		return Invalid(&c.MemoryLimitRatio, "must be between 0 (off) and 1, got %v", c.MemoryLimitRatio)
	}
	return nil
}

// OrgName returns the validated org.
func (c *Common) OrgName() bus.Org { return bus.Org(c.Org) }

// Topology returns the bus topology these settings ask for.
func (c *Common) Topology() bus.Topology {
	t := bus.DefaultTopology()
	t.Replicas = c.NatsReplicas
	t.LeaseTTL = c.LeaseTTL
	t.FactsMaxAge = c.Retention
	if c.AckWait > 0 {
		t.Consumer.AckWait = c.AckWait
	}
	if c.MaxDeliver > 0 {
		t.Consumer.MaxDeliver = c.MaxDeliver
	}
	return t
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// redactURL drops a password embedded in a URL before it reaches an error.
func redactURL(s string) string {
	p, err := url.Parse(s)
	if err != nil {
		if i := strings.LastIndex(s, "@"); i >= 0 {
			return "…@" + s[i+1:]
		}
		return s
	}
	return p.Redacted()
}
