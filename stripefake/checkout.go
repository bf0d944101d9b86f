package stripefake

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"
)

const (
	defaultSessionTTL = 24 * time.Hour
	minSessionTTL     = 30 * time.Minute
	maxCustomTextLen  = 1200
)

var checkoutParams = []string{
	"mode", "customer", "customer_email", "currency", "success_url", "cancel_url",
	"metadata[*]", "client_reference_id", "locale", "ui_mode", "expires_at",
	"line_items[#][price_data][currency]", "line_items[#][price_data][unit_amount]",
	"line_items[#][price_data][product_data][name]",
	"line_items[#][price_data][product_data][description]",
	"line_items[#][quantity]",
	"payment_intent_data[metadata][*]", "payment_intent_data[setup_future_usage]",
	"payment_intent_data[description]",
	"setup_intent_data[metadata][*]", "setup_intent_data[description]",
	"consent_collection[terms_of_service]",
	"custom_text[terms_of_service_acceptance][message]", "custom_text[submit][message]",
	"payment_method_types[#]",
}

var sessionExpand = []string{"customer", "payment_intent", "setup_intent",
	"payment_intent.payment_method", "payment_intent.latest_charge", "setup_intent.payment_method"}

func checkURL(p *params, key string) {
	v := p.str(key)
	if v == "" {
		return
	}
	u, err := url.Parse(v)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		p.fail(badParam(key, "url_invalid", "Not a valid URL"))
	}
	p.maxLen(key, 5000)
}

func (s *Server) createSession(c *call) (any, *apiError) {
	p := c.p
	p.require("mode")
	mode := p.enum("mode", "payment", "setup", "subscription")
	ui := p.enum("ui_mode", "hosted", "embedded", "custom")
	checkURL(p, "success_url")
	checkURL(p, "cancel_url")
	checkEmail(p, "customer_email")
	p.maxLen("client_reference_id", 200)
	expiresAt, hasExpiry := p.int("expires_at")
	tos := p.enum("consent_collection[terms_of_service]", "none", "required")
	tosMsg := p.str("custom_text[terms_of_service_acceptance][message]")
	submitMsg := p.str("custom_text[submit][message]")
	p.maxLen("custom_text[terms_of_service_acceptance][message]", maxCustomTextLen)
	p.maxLen("custom_text[submit][message]", maxCustomTextLen)
	sfu := p.enum("payment_intent_data[setup_future_usage]", "on_session", "off_session")
	md := p.metadata("metadata")
	piMD := p.metadata("payment_intent_data[metadata]")
	siMD := p.metadata("setup_intent_data[metadata]")
	pmTypes := p.list("payment_method_types")
	if p.err != nil {
		return nil, p.err
	}
	switch {
	case mode == "subscription":
		return nil, badParam("mode", "", "stripefake supports mode=payment and mode=setup only.")
	case ui != "" && ui != "hosted":
		return nil, badParam("ui_mode", "", "stripefake serves hosted Checkout pages only (ui_mode=hosted).")
	case p.str("customer") != "" && p.str("customer_email") != "":
		return nil, badParam("customer_email", "parameters_exclusive", "You may only specify one of these parameters: customer, customer_email.")
	case tosMsg != "" && tos != "required":
		return nil, badParam("custom_text[terms_of_service_acceptance]", "",
			"You can only set `custom_text[terms_of_service_acceptance]` when `consent_collection[terms_of_service]` is `required`.")
	}
	if aerr := checkPMTypes("payment_method_types", pmTypes); aerr != nil {
		return nil, aerr
	}
	var currency string
	if v := p.str("currency"); v != "" {
		var aerr *apiError
		if currency, aerr = checkCurrency("currency", v); aerr != nil {
			return nil, aerr
		}
	}
	lines, total, aerr := parseLineItems(p)
	if aerr != nil {
		return nil, aerr
	}

	switch mode {
	case "payment":
		if len(lines) == 0 {
			return nil, missingParam("line_items")
		}
		if anyPrefix(p, "setup_intent_data[") {
			return nil, badParam("setup_intent_data", "", "You can not pass `setup_intent_data` in `payment` mode.")
		}
		if currency != "" && currency != lines[0].currency {
			return nil, badParam("currency", "", "The currency (%s) must match the currency of the line items (%s).", currency, lines[0].currency)
		}
		currency = lines[0].currency
		if aerr := checkAmount("line_items", total, currency); aerr != nil {
			aerr.Message = "The Checkout Session's total amount due must add up to at least " + formatAmount(minCharge[currency], currency)
			if total > maxAmount {
				aerr.Message = "The Checkout Session's total amount due must be no more than " + formatAmount(maxAmount, currency)
			}
			return nil, aerr
		}
	case "setup":
		if len(lines) > 0 {
			return nil, badParam("line_items", "", "You cannot pass `line_items` in `setup` mode.")
		}
		if anyPrefix(p, "payment_intent_data[") {
			return nil, badParam("payment_intent_data", "", "You can not pass `payment_intent_data` in `setup` mode.")
		}
		if currency == "" && len(pmTypes) == 0 {
			return nil, badParam("currency", "parameter_missing", "currency is required in setup mode when payment_method_types is not set.")
		}
	}
	if len(pmTypes) == 0 {
		pmTypes = []string{"card"}
	}

	now := s.now()
	if hasExpiry {
		at := time.Unix(expiresAt, 0)
		switch {
		case at.Before(now.Add(minSessionTTL)):
			return nil, badParam("expires_at", "", "The `expires_at` timestamp must be at least 30 minutes from Checkout Session creation.")
		case at.After(now.Add(defaultSessionTTL)):
			return nil, badParam("expires_at", "", "The `expires_at` timestamp must be less than 24 hours from Checkout Session creation.")
		}
	} else {
		expiresAt = now.Add(defaultSessionTTL).Unix()
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	if cid := p.str("customer"); cid != "" && s.st.customers[cid] == nil {
		return nil, noSuch(http.StatusBadRequest, "customer", "customer", cid)
	}
	cs := &session{
		id: newIDLen("cs_test", 58), created: now.Unix(), expiresAt: expiresAt, mode: mode,
		status: sessionOpen, paymentStatus: "unpaid", customer: p.str("customer"),
		customerEmail: p.str("customer_email"), currency: currency,
		successURL: p.str("success_url"), cancelURL: p.str("cancel_url"),
		clientReferenceID: p.str("client_reference_id"), locale: p.str("locale"),
		metadata: md, lineItems: lines, amountTotal: total,
		piMetadata: piMD, piDescription: p.str("payment_intent_data[description]"),
		setupFutureUsage: sfu,
		siMetadata:       siMD, siDescription: p.str("setup_intent_data[description]"),
		tosRequired: tos == "required", tosMessage: tosMsg, submitMessage: submitMsg,
		pmTypes: pmTypes,
	}
	if mode == "setup" {
		cs.paymentStatus = "no_payment_required"
	}
	cs.url = c.baseURL + "/c/pay/" + cs.id
	s.st.sessions[cs.id] = cs
	s.st.openSessions[cs.id] = cs
	for k, v := range md {
		mk := k + "\x00" + v
		s.st.sessionsByMeta[mk] = append(s.st.sessionsByMeta[mk], cs)
	}
	return s.renderSession(cs, c.exp), nil
}

// parseLineItems reads line_items[i][price_data][...] and [quantity].
func parseLineItems(p *params) ([]lineItem, int64, *apiError) {
	var lines []lineItem
	var total int64
	for _, i := range p.indices("line_items") {
		base := fmt.Sprintf("line_items[%d]", i)
		if !anyPrefix(p, base+"[price_data]") {
			return nil, 0, missingParam(base + "[price_data]")
		}
		p.require(base+"[quantity]", base+"[price_data][currency]", base+"[price_data][unit_amount]",
			base+"[price_data][product_data][name]")
		qty, _ := p.int(base + "[quantity]")
		unit, _ := p.int(base + "[price_data][unit_amount]")
		if p.err != nil {
			return nil, 0, p.err
		}
		cur, aerr := checkCurrency(base+"[price_data][currency]", p.str(base+"[price_data][currency]"))
		if aerr != nil {
			return nil, 0, aerr
		}
		switch {
		case qty < 1:
			return nil, 0, badParam(base+"[quantity]", "", "Quantity must be at least 1.")
		case unit < 0:
			return nil, 0, badParam(base+"[price_data][unit_amount]", "", "This value must be greater than or equal to 0.")
		case len(lines) > 0 && cur != lines[0].currency:
			return nil, 0, badParam(base+"[price_data][currency]", "", "All line items must use the same currency.")
		case unit > maxAmount || qty > maxAmount || unit*qty > maxAmount-total:
			return nil, 0, badParam(base, "amount_too_large", "The line item amount is too large.")
		}
		total += unit * qty
		lines = append(lines, lineItem{name: p.str(base + "[price_data][product_data][name]"), currency: cur, unitAmount: unit, quantity: qty})
	}
	return lines, total, nil
}

func (s *Server) retrieveSession(c *call) (any, *apiError) {
	if aerr := c.exp.check(sessionExpand...); aerr != nil {
		return nil, aerr
	}
	var evs []*event
	defer func() { s.hooks.enqueue(evs) }()
	s.mu.Lock()
	defer s.mu.Unlock()
	id := c.r.PathValue("id")
	cs := s.st.sessions[id]
	if cs == nil {
		return nil, noSuch(http.StatusNotFound, "id", "checkout.session", id)
	}
	s.expireIfDueLocked(&evs, cs)
	return s.renderSession(cs, c.exp), nil
}

func (s *Server) expireSession(c *call) (any, *apiError) {
	if aerr := c.exp.check(sessionExpand...); aerr != nil {
		return nil, aerr
	}
	var evs []*event
	defer func() { s.hooks.enqueue(evs) }()
	s.mu.Lock()
	defer s.mu.Unlock()
	id := c.r.PathValue("id")
	cs := s.st.sessions[id]
	if cs == nil {
		return nil, noSuch(http.StatusNotFound, "id", "checkout.session", id)
	}
	s.expireIfDueLocked(&evs, cs)
	if cs.status != sessionOpen {
		return nil, badParam("", "checkout_session_unexpected_state",
			"Only Checkout Sessions with a status in [\"open\"] can be expired. This Checkout Session has a status of %q.", cs.status)
	}
	s.expireLocked(&evs, cs, c.origin())
	return s.renderSession(cs, c.exp), nil
}

func (s *Server) expireIfDueLocked(evs *[]*event, cs *session) {
	if cs.status == sessionOpen && s.unix() >= cs.expiresAt {
		s.expireLocked(evs, cs, origin{})
	}
}

// expireLocked expires an open session and cancels its unpaid PaymentIntent.
func (s *Server) expireLocked(evs *[]*event, cs *session, o origin) {
	cs.status = sessionExpired
	delete(s.st.openSessions, cs.id)
	if pi := s.st.pis[cs.pi]; pi != nil && pi.status != piSucceeded && pi.status != piCanceled {
		pi.status, pi.canceledAt, pi.cancellationReason = piCanceled, s.unix(), "abandoned"
		s.emitLocked(evs, "payment_intent.canceled", s.renderPI(pi, nil), o)
	}
	s.emitLocked(evs, "checkout.session.expired", s.renderSession(cs, nil), o)
}

// SweepExpiredSessions expires every open Checkout Session whose expires_at
// has passed (by the Server's clock), emitting checkout.session.expired. The
// Server does this by itself twice a second and whenever a session is read;
// a test that moves a fake clock can call it to make expiry immediate.
func (s *Server) SweepExpiredSessions() {
	var evs []*event
	defer func() { s.hooks.enqueue(evs) }()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, cs := range s.st.openSessions {
		s.expireIfDueLocked(&evs, cs)
	}
}

// Errors of [Server.CompleteCheckoutSession].
var (
	ErrNoSuchSession    = errors.New("stripefake: no such checkout session")
	ErrSessionNotOpen   = errors.New("stripefake: checkout session is not open")
	ErrUnknownTestCard  = errors.New("stripefake: unknown test payment method")
	ErrTermsNotAccepted = errors.New("stripefake: the terms of service were not accepted")
)

// CardError is a declined payment or card check while completing a
// Checkout Session; the session stays open, as on Stripe's page.
type CardError struct {
	Code        string
	DeclineCode string
	Message     string
}

// Error implements error.
func (e *CardError) Error() string {
	return fmt.Sprintf("stripefake: card declined: %s (%s/%s)", e.Message, e.Code, e.DeclineCode)
}

// CompleteCheckoutSession acts as the customer on the hosted page: pays (mode
// payment) or saves (mode setup) with testPM, one of [TestPaymentMethods],
// accepting the terms of service if the session asks for them. Like Stripe it
// creates a fresh PaymentMethod from the token and
//   - in setup mode, a succeeded SetupIntent with it, attached to the
//     session's customer if there is one;
//   - in payment mode, a PaymentIntent for the session's amount with
//     payment_intent_data's metadata, charged on-session; with
//     setup_future_usage the PaymentMethod is attached to the customer.
//
// It then emits checkout.session.completed (after setup_intent.succeeded or
// charge.succeeded and payment_intent.succeeded). A declining card returns a
// *CardError and leaves the session open (payment mode emits
// payment_intent.payment_failed; a retry reuses the same PaymentIntent).
// Other errors: ErrNoSuchSession, ErrSessionNotOpen, ErrUnknownTestCard.
func (s *Server) CompleteCheckoutSession(ctx context.Context, sessionID, testPM string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	_, err := s.completeSession(sessionID, testPM, true)
	return err
}

// completeSession completes a session; it returns the rendered session.
func (s *Server) completeSession(id, token string, acceptTerms bool) (*sessionJSON, error) {
	card := testCards[token]
	if card == nil {
		return nil, fmt.Errorf("%w %q (want one of %s)", ErrUnknownTestCard, token, strings.Join(TestPaymentMethods(), ", "))
	}
	var evs []*event
	defer func() { s.hooks.enqueue(evs) }()
	s.mu.Lock()
	defer s.mu.Unlock()
	cs := s.st.sessions[id]
	if cs == nil {
		return nil, fmt.Errorf("%w %q", ErrNoSuchSession, id)
	}
	s.expireIfDueLocked(&evs, cs)
	if cs.status != sessionOpen {
		return nil, fmt.Errorf("%w: %s is %s", ErrSessionNotOpen, id, cs.status)
	}
	if cs.tosRequired && !acceptTerms {
		return nil, ErrTermsNotAccepted
	}
	var o origin // the customer acted, not an API request
	pm := s.newPMLocked(token, card)
	cu := s.st.customers[cs.customer]

	switch cs.mode {
	case "setup":
		si := s.st.sis[cs.si]
		if si == nil {
			si = &setupIntent{
				id: newID("seti"), created: s.unix(), customer: cs.customer, usage: "off_session",
				description: cs.siDescription, metadata: cs.siMetadata, pmTypes: cs.pmTypes,
			}
			si.clientSecret = si.id + "_secret_" + strings.TrimPrefix(newID(""), "_")
			s.st.sis[si.id] = si
			cs.si = si.id
		}
		if card.attachFails {
			e := card.decline.apiError()
			e.PaymentMethod = s.renderPM(pm, nil)
			si.status, si.lastErr, si.pm = piRequiresPaymentMethod, e, ""
			s.emitLocked(&evs, "setup_intent.setup_failed", s.renderSI(si, nil), o)
			return nil, &CardError{Code: e.Code, DeclineCode: e.DeclineCode, Message: e.Message}
		}
		if cu != nil {
			s.attachLocked(&evs, pm, cu, o)
		}
		si.pm, si.status, si.lastErr = pm.id, piSucceeded, nil
		s.emitLocked(&evs, "setup_intent.succeeded", s.renderSI(si, nil), o)
	case "payment":
		pi := s.st.pis[cs.pi]
		if pi == nil {
			pi = &paymentIntent{
				id: newID("pi"), createdAt: s.now(), amount: cs.amountTotal, currency: cs.currency,
				customer: cs.customer, description: cs.piDescription, metadata: cs.piMetadata,
				status: piRequiresPaymentMethod, setupFutureUsage: cs.setupFutureUsage, pmTypes: cs.pmTypes,
			}
			pi.clientSecret = pi.id + "_secret_" + strings.TrimPrefix(newID(""), "_")
			s.addPILocked(pi)
			cs.pi = pi.id
		}
		if decline := s.confirmLocked(&evs, pi, pm, cu, false, o); decline != nil {
			return nil, &CardError{Code: decline.Code, DeclineCode: decline.DeclineCode, Message: decline.Message}
		}
	}
	cs.status = sessionComplete
	if cs.mode == "payment" {
		cs.paymentStatus = "paid"
	}
	cs.consentAccepted = cs.tosRequired
	delete(s.st.openSessions, cs.id)
	out := s.renderSession(cs, nil)
	s.emitLocked(&evs, "checkout.session.completed", out, o)
	return out, nil
}
