package exchange

// Waiting returns how many requests wait for a worker, so that a test can
// tell when its requests have queued.
func (p *Pool) Waiting() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.waiting
}
