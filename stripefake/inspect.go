package stripefake

import (
	"fmt"
	"maps"
	"time"
)

// MetadataChargeID is the metadata key billingd puts on every PaymentIntent
// and Checkout Session; [Server.SuccessfulCharges] counts by it.
const MetadataChargeID = "charge_id"

// PaymentIntent is a snapshot of a stored PaymentIntent.
type PaymentIntent struct {
	ID             string
	Status         string // succeeded, requires_payment_method, requires_action, canceled, ...
	Amount         int64
	AmountReceived int64
	AmountRefunded int64
	Currency       string
	Customer       string
	PaymentMethod  string
	Description    string
	Metadata       map[string]string
	LatestCharge   string
	// LastErrorCode and LastDeclineCode describe the last failed attempt.
	LastErrorCode   string
	LastDeclineCode string
	Created         time.Time
}

// CheckoutSession is a snapshot of a stored Checkout Session.
type CheckoutSession struct {
	ID            string
	Mode          string // payment | setup
	Status        string // open | complete | expired
	PaymentStatus string
	URL           string // the hosted page, while open
	Customer      string
	Currency      string
	AmountTotal   int64
	Metadata      map[string]string
	PaymentIntent string
	SetupIntent   string
	ExpiresAt     time.Time
}

// PaymentMethod is a snapshot of a stored PaymentMethod.
type PaymentMethod struct {
	ID       string
	Token    string // the test token it was made from, e.g. pm_card_visa
	Brand    string
	Last4    string
	Customer string
}

// Totals are the money a currency saw, in its minor unit.
type Totals struct {
	// Collected is the sum of successful charges.
	Collected int64
	// Refunded is the sum of refunds.
	Refunded int64
}

// Net is what was kept: collected minus refunded.
func (t Totals) Net() int64 { return t.Collected - t.Refunded }

func (s *Server) exportPI(pi *paymentIntent) PaymentIntent {
	out := PaymentIntent{
		ID: pi.id, Status: pi.status, Amount: pi.amount, AmountReceived: pi.amountReceived,
		Currency: pi.currency, Customer: pi.customer, PaymentMethod: pi.pm,
		Description: pi.description, Metadata: maps.Clone(nonNil(pi.metadata)),
		LatestCharge: pi.latestCharge, Created: pi.createdAt,
	}
	if ch := s.st.charges[pi.latestCharge]; ch != nil {
		out.AmountRefunded = ch.refunded
	}
	if pi.lastErr != nil {
		out.LastErrorCode, out.LastDeclineCode = pi.lastErr.Code, pi.lastErr.DeclineCode
	}
	return out
}

func exportSession(cs *session) CheckoutSession {
	out := CheckoutSession{
		ID: cs.id, Mode: cs.mode, Status: cs.status, PaymentStatus: cs.paymentStatus,
		Customer: cs.customer, Currency: cs.currency, AmountTotal: cs.amountTotal,
		Metadata: maps.Clone(nonNil(cs.metadata)), PaymentIntent: cs.pi, SetupIntent: cs.si,
		ExpiresAt: time.Unix(cs.expiresAt, 0),
	}
	if cs.status == sessionOpen {
		out.URL = cs.url
	}
	return out
}

// PaymentIntent returns the PaymentIntent with id.
func (s *Server) PaymentIntent(id string) (PaymentIntent, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	pi := s.st.pis[id]
	if pi == nil {
		return PaymentIntent{}, false
	}
	return s.exportPI(pi), true
}

// PaymentIntents returns every PaymentIntent, oldest first.
func (s *Server) PaymentIntents() []PaymentIntent {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]PaymentIntent, len(s.st.piList))
	for i, pi := range s.st.piList {
		out[i] = s.exportPI(pi)
	}
	return out
}

// PaymentIntentsByMetadata returns the PaymentIntents whose metadata has
// key=value, oldest first, whatever their status. It sees everything at
// once, unlike search (see [WithSearchLag]).
func (s *Server) PaymentIntentsByMetadata(key, value string) []PaymentIntent {
	s.mu.Lock()
	defer s.mu.Unlock()
	idx := s.st.piByMeta[key+"\x00"+value]
	out := make([]PaymentIntent, len(idx))
	for i, pi := range idx {
		out[i] = s.exportPI(pi)
	}
	return out
}

// CheckoutSession returns the Checkout Session with id, expiring it first if
// it is due.
func (s *Server) CheckoutSession(id string) (CheckoutSession, bool) {
	var evs []*event
	defer func() { s.hooks.enqueue(evs) }()
	s.mu.Lock()
	defer s.mu.Unlock()
	cs := s.st.sessions[id]
	if cs == nil {
		return CheckoutSession{}, false
	}
	s.expireIfDueLocked(&evs, cs)
	return exportSession(cs), true
}

// CheckoutSessionsByMetadata returns the Checkout Sessions whose metadata
// has key=value, oldest first.
func (s *Server) CheckoutSessionsByMetadata(key, value string) []CheckoutSession {
	var evs []*event
	defer func() { s.hooks.enqueue(evs) }()
	s.mu.Lock()
	defer s.mu.Unlock()
	idx := s.st.sessionsByMeta[key+"\x00"+value]
	out := make([]CheckoutSession, len(idx))
	for i, cs := range idx {
		s.expireIfDueLocked(&evs, cs)
		out[i] = exportSession(cs)
	}
	return out
}

// CustomerPaymentMethods returns the PaymentMethods attached to a customer.
func (s *Server) CustomerPaymentMethods(customerID string) []PaymentMethod {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []PaymentMethod
	for _, pm := range s.st.pms {
		if pm.customer == customerID {
			out = append(out, PaymentMethod{ID: pm.id, Token: pm.token, Brand: pm.card.brand, Last4: pm.card.last4, Customer: pm.customer})
		}
	}
	return out
}

// AttachTestCard attaches a fresh PaymentMethod made from testPM to a
// customer and returns its id, skipping the card check with which Stripe
// refuses to attach its declining test cards. Stripe offers no such thing:
// use it only to set up a saved card that declines later (for example with
// lost_card), which Stripe's own test cards cannot give you except through
// pm_card_chargeCustomerFail and pm_card_authenticationRequired.
func (s *Server) AttachTestCard(customerID, testPM string) (string, error) {
	card := testCards[testPM]
	if card == nil {
		return "", fmt.Errorf("%w %q", ErrUnknownTestCard, testPM)
	}
	var evs []*event
	defer func() { s.hooks.enqueue(evs) }()
	s.mu.Lock()
	defer s.mu.Unlock()
	cu := s.st.customers[customerID]
	if cu == nil {
		return "", fmt.Errorf("stripefake: no such customer %q", customerID)
	}
	pm := s.newPMLocked(testPM, card)
	s.attachLocked(&evs, pm, cu, origin{})
	return pm.id, nil
}

// SuccessfulCharges counts the succeeded PaymentIntents whose metadata
// charge_id is chargeID (refunds do not change the count). Exactly-once
// means this is never more than 1.
func (s *Server) SuccessfulCharges(chargeID string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, pi := range s.st.piByMeta[MetadataChargeID+"\x00"+chargeID] {
		if pi.status == piSucceeded {
			n++
		}
	}
	return n
}

// SuccessfulChargesByChargeID counts succeeded PaymentIntents per metadata
// charge_id value; PaymentIntents without one are not counted.
func (s *Server) SuccessfulChargesByChargeID() map[string]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[string]int{}
	for _, pi := range s.st.piList {
		if id, ok := pi.metadata[MetadataChargeID]; ok && pi.status == piSucceeded {
			out[id]++
		}
	}
	return out
}

// Totals returns, per currency, what successful charges collected and what
// refunds gave back.
func (s *Server) Totals() map[string]Totals {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[string]Totals{}
	for _, ch := range s.st.charges {
		if ch.status != piSucceeded {
			continue
		}
		t := out[ch.currency]
		t.Collected += ch.amount
		t.Refunded += ch.refunded
		out[ch.currency] = t
	}
	return out
}

// RequestCounts returns how many API requests each kind received (see the
// Kind* constants), including rejected and faulted ones.
func (s *Server) RequestCounts() map[string]int64 {
	out := make(map[string]int64, len(s.counts))
	for k, c := range s.counts {
		if n := c.Load(); n > 0 {
			out[k] = n
		}
	}
	return out
}

// RequestCount returns how many API requests of kind were received.
func (s *Server) RequestCount(kind string) int64 {
	if c := s.counts[kind]; c != nil {
		return c.Load()
	}
	return 0
}
