package collector

import "time"

// SetClock replaces the collector's clock (a collector whose clock runs
// ahead of Exchange's, say). Call it before the collector runs.
func SetClock(c *Collector, now func() time.Time) { c.now = now }
