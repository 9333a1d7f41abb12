package mailer

import "time"

// SetClock replaces the mailer's clock, so tests can cross the
// notification period without waiting for it.
func SetClock(m *Mailer, now func() time.Time) { m.now = now }
