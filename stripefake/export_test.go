package stripefake

// InFlightRequests counts idempotency keys whose first request is still
// running, so tests can wait for a request to be in flight.
func (s *Server) InFlightRequests() int { return s.idem.inFlight() }
