package matcher

// SetAfterMDMRead makes f run between a page's read of the MDM side and its
// verdicts, so that a test can index a record in between.
func SetAfterMDMRead(m *Matcher, f func()) { m.afterMDMRead = f }
