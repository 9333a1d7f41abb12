package matcher

import "time"

// SetAfterMDMRead makes f run between a page's read of the MDM side and its
// verdicts, so that a test can index a record in between.
func SetAfterMDMRead(m *Matcher, f func()) { m.afterMDMRead = f }

// TombstoneTTL is how long m keeps a removal's tombstone (0: for good).
func TombstoneTTL(m *Matcher) time.Duration { return m.tombstoneTTL }

// SetTombstoneTTL shortens the tombstones' life, so that a test sees one go.
func SetTombstoneTTL(m *Matcher, ttl time.Duration) { m.tombstoneTTL = ttl }
