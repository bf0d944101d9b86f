package stripefake

import (
	"net/http"
	"strings"
)

// PaymentMethods

// resolvePMLocked finds a PaymentMethod by id, or makes a fresh one from a
// test token (pm_card_visa ...), as Stripe does when a token is used.
func (s *Server) resolvePMLocked(id, param string, status int) (*paymentMethod, *apiError) {
	if card := testCards[id]; card != nil {
		return s.newPMLocked(id, card), nil
	}
	pm := s.st.pms[id]
	if pm == nil {
		return nil, noSuch(status, param, "PaymentMethod", id)
	}
	return pm, nil
}

func (s *Server) newPMLocked(token string, card *testCard) *paymentMethod {
	now := s.now()
	pm := &paymentMethod{
		id: newID("pm"), created: now.Unix(), token: token, card: card,
		expMonth: 12, expYear: int64(now.Year() + 3),
	}
	s.st.pms[pm.id] = pm
	return pm
}

var errPMReused = "This PaymentMethod was previously used without being attached to a Customer or was detached from a Customer, and may not be used again."

// checkAttachableLocked applies Stripe's rules for attaching pm to cu,
// including the card check that declining test cards fail.
func (s *Server) checkAttachableLocked(pm *paymentMethod, cu *customer) *apiError {
	switch {
	case pm.customer == cu.id:
		return nil
	case pm.customer != "":
		return badParam("", "payment_method_unexpected_state", "The payment method you provided has already been attached to a customer.")
	case pm.used || pm.detached:
		return badParam("", "payment_method_unexpected_state", "%s", errPMReused)
	case pm.card.attachFails:
		e := pm.card.decline.apiError()
		e.PaymentMethod = s.renderPM(pm, nil)
		return e
	}
	return nil
}

// attachLocked attaches pm (already checked) to cu.
func (s *Server) attachLocked(evs *[]*event, pm *paymentMethod, cu *customer, o origin) {
	if pm.customer == cu.id {
		return
	}
	pm.customer = cu.id
	s.emitLocked(evs, "payment_method.attached", s.renderPM(pm, nil), o)
}

func (s *Server) retrievePM(c *call) (any, *apiError) {
	if aerr := c.exp.check("customer"); aerr != nil {
		return nil, aerr
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	id := c.r.PathValue("id")
	pm := s.st.pms[id]
	if pm == nil {
		return nil, noSuch(http.StatusNotFound, "id", "PaymentMethod", id)
	}
	return s.renderPM(pm, c.exp), nil
}

func (s *Server) attachPM(c *call) (any, *apiError) {
	c.p.require("customer")
	if c.p.err != nil {
		return nil, c.p.err
	}
	var evs []*event
	defer func() { s.hooks.enqueue(evs) }()
	s.mu.Lock()
	defer s.mu.Unlock()
	cid := c.p.str("customer")
	cu := s.st.customers[cid]
	if cu == nil {
		return nil, noSuch(http.StatusBadRequest, "customer", "customer", cid)
	}
	pm, aerr := s.resolvePMLocked(c.r.PathValue("id"), "payment_method", http.StatusNotFound)
	if aerr != nil {
		return nil, aerr
	}
	if aerr := s.checkAttachableLocked(pm, cu); aerr != nil {
		return nil, aerr
	}
	s.attachLocked(&evs, pm, cu, c.origin())
	return s.renderPM(pm, c.exp), nil
}

func (s *Server) detachPM(c *call) (any, *apiError) {
	var evs []*event
	defer func() { s.hooks.enqueue(evs) }()
	s.mu.Lock()
	defer s.mu.Unlock()
	id := c.r.PathValue("id")
	pm := s.st.pms[id]
	if pm == nil {
		return nil, noSuch(http.StatusNotFound, "id", "PaymentMethod", id)
	}
	if pm.customer == "" {
		return nil, badParam("", "payment_method_unexpected_state", "The payment method %s is not attached to a customer so detachment is impossible.", id)
	}
	if cu := s.st.customers[pm.customer]; cu != nil && cu.defaultPM == pm.id {
		updated := *cu
		updated.defaultPM = ""
		s.st.customers[cu.id] = &updated
	}
	pm.customer, pm.detached = "", true
	s.emitLocked(&evs, "payment_method.detached", s.renderPM(pm, nil), c.origin())
	return s.renderPM(pm, c.exp), nil
}

// SetupIntents

func (s *Server) retrieveSI(c *call) (any, *apiError) {
	if aerr := c.exp.check("payment_method", "customer", "payment_method.customer"); aerr != nil {
		return nil, aerr
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	id := c.r.PathValue("id")
	si := s.st.sis[id]
	if si == nil {
		return nil, noSuch(http.StatusNotFound, "id", "setup_intent", id)
	}
	return s.renderSI(si, c.exp), nil
}

// PaymentIntents

var paymentIntentParams = []string{
	"amount", "currency", "customer", "payment_method", "confirm", "off_session",
	"description", "metadata[*]", "statement_descriptor_suffix", "setup_future_usage",
	"payment_method_types[#]", "return_url", "receipt_email",
	"automatic_payment_methods[enabled]", "automatic_payment_methods[allow_redirects]",
	"capture_method", "error_on_requires_action",
}

func (s *Server) createPI(c *call) (any, *apiError) {
	p := c.p
	p.require("amount", "currency")
	amount, _ := p.int("amount")
	confirm := p.bool("confirm")
	offSession := false
	switch v := p.str("off_session"); v {
	case "", "false":
	case "true", "one_off", "recurring":
		offSession = true
	default:
		p.fail(badParam("off_session", "", "Invalid off_session: must be a boolean, one_off or recurring"))
	}
	sfu := p.enum("setup_future_usage", "on_session", "off_session")
	p.enum("capture_method", "automatic", "automatic_async")
	p.maxLen("statement_descriptor_suffix", 22)
	p.maxLen("description", 1000)
	checkEmail(p, "receipt_email")
	md := p.metadata("metadata")
	pmTypes := p.list("payment_method_types")
	apmEnabled := p.bool("automatic_payment_methods[enabled]")
	allowRedirects := p.enum("automatic_payment_methods[allow_redirects]", "always", "never")
	p.bool("error_on_requires_action")
	if p.err != nil {
		return nil, p.err
	}
	currency, aerr := checkCurrency("currency", p.str("currency"))
	if aerr != nil {
		return nil, aerr
	}
	if aerr := checkAmount("amount", amount, currency); aerr != nil {
		return nil, aerr
	}
	if aerr := checkPMTypes("payment_method_types", pmTypes); aerr != nil {
		return nil, aerr
	}
	switch {
	case offSession && !confirm:
		return nil, badParam("off_session", "", "You can only pass `off_session` when `confirm` is set to true.")
	case offSession && sfu != "":
		return nil, badParam("off_session", "", "You cannot confirm with `off_session` when `setup_future_usage` is also set on the PaymentIntent, because you cannot set up future usage when processing payments off-session.")
	case len(pmTypes) > 0 && apmEnabled:
		return nil, badParam("automatic_payment_methods", "parameters_exclusive", "You may only specify one of these parameters: automatic_payment_methods, payment_method_types.")
	case confirm && len(pmTypes) == 0 && p.str("return_url") == "" && allowRedirects != "never":
		// Since API version 2023-08-16 automatic payment methods are on by
		// default, and confirming them needs a return_url.
		return nil, badParam("return_url", "",
			"A `return_url` must be specified because this Payment Intent is configured to automatically accept the payment methods enabled in the Dashboard, some of which may require a full page redirect to succeed. If you do not want to accept redirect-based payment methods, set `automatic_payment_methods[enabled]` to `true` and `automatic_payment_methods[allow_redirects]` to `never` when creating Setup Intents and Payment Intents.")
	case confirm && p.str("payment_method") == "":
		return nil, badParam("payment_method", "payment_intent_unexpected_state",
			"You cannot confirm this PaymentIntent because it's missing a payment method. To confirm the PaymentIntent with %s, specify a payment method attached to this customer along with the customer ID.", p.str("customer"))
	}
	if len(pmTypes) == 0 {
		pmTypes = []string{"card"}
	}

	var evs []*event
	defer func() { s.hooks.enqueue(evs) }()
	s.mu.Lock()
	defer s.mu.Unlock()
	var cu *customer
	if cid := p.str("customer"); cid != "" {
		if cu = s.st.customers[cid]; cu == nil {
			return nil, noSuch(http.StatusBadRequest, "customer", "customer", cid)
		}
	}
	var pm *paymentMethod
	if id := p.str("payment_method"); id != "" {
		if pm, aerr = s.resolvePMLocked(id, "payment_method", http.StatusBadRequest); aerr != nil {
			return nil, aerr
		}
		if aerr := checkUsable(pm, cu); aerr != nil {
			return nil, aerr
		}
	}
	pi := &paymentIntent{
		id: newID("pi"), createdAt: s.now(), amount: amount, currency: currency,
		description: p.str("description"), metadata: md, status: piRequiresPaymentMethod,
		setupFutureUsage: sfu, descriptorSuffix: p.str("statement_descriptor_suffix"),
		pmTypes: pmTypes,
	}
	pi.clientSecret = pi.id + "_secret_" + strings.TrimPrefix(newID(""), "_")
	if cu != nil {
		pi.customer = cu.id
	}
	if pm != nil {
		pi.pm, pi.status = pm.id, piRequiresConfirmation
	}
	s.addPILocked(pi)
	if !confirm {
		return s.renderPI(pi, c.exp), nil
	}
	if decline := s.confirmLocked(&evs, pi, pm, cu, offSession, c.origin()); decline != nil {
		return nil, decline
	}
	return s.renderPI(pi, c.exp), nil
}

func checkPMTypes(param string, types []string) *apiError {
	for _, t := range types {
		if t != "card" {
			return badParam(param, "", "The payment method type %q is not supported by stripefake; only \"card\" is.", t)
		}
	}
	return nil
}

// checkUsable applies Stripe's rules for paying with pm on behalf of cu (nil
// for no customer).
func checkUsable(pm *paymentMethod, cu *customer) *apiError {
	switch {
	case pm.customer != "" && cu == nil:
		return badParam("payment_method", "",
			"The provided PaymentMethod %s is attached to a Customer. To use a PaymentMethod that is attached to a Customer, you must also provide the ID of that Customer in the `customer` parameter.", pm.id)
	case pm.customer != "" && pm.customer != cu.id:
		return badParam("payment_method", "",
			"The provided PaymentMethod belongs to a different Customer (%s). Pass customer=%s to use it.", pm.customer, pm.customer)
	case pm.customer == "" && (pm.used || pm.detached):
		return badParam("payment_method", "", "%s", errPMReused)
	}
	return nil
}

func (s *Server) addPILocked(pi *paymentIntent) {
	pi.created = pi.createdAt.Unix()
	s.st.pis[pi.id] = pi
	s.st.piList = append(s.st.piList, pi)
	for k, v := range pi.metadata {
		mk := k + "\x00" + v
		s.st.piByMeta[mk] = append(s.st.piByMeta[mk], pi)
	}
}

// confirmLocked attempts the payment of pi with pm. offSession is true for
// merchant-initiated charges; on-session (Checkout) the customer completes
// any authentication. It returns the card error Stripe answers a decline
// with (HTTP 402, the PaymentIntent embedded), or nil.
func (s *Server) confirmLocked(evs *[]*event, pi *paymentIntent, pm *paymentMethod, cu *customer, offSession bool, o origin) *apiError {
	now := s.unix()
	ch := &charge{
		id: newID("ch"), created: now, amount: pi.amount, currency: pi.currency,
		customer: pi.customer, pi: pi.id, pm: pm.id,
	}
	decline := pm.card.decline
	if decline == nil && pm.card.authOffSession {
		if !offSession && o.reqID != "" {
			// An API confirmation on-session: Stripe asks for 3D Secure.
			pi.pm, pi.status = pm.id, piRequiresAction
			return nil
		}
		if offSession {
			decline = declineAuth
		}
	}
	s.st.charges[ch.id] = ch
	pi.latestCharge = ch.id
	if pm.customer == "" {
		pm.used = true
	}
	if decline != nil {
		ch.status, ch.failure = "failed", decline
		e := decline.apiError()
		e.Charge = ch.id
		e.PaymentMethod = s.renderPM(pm, nil)
		pi.pm, pi.status, pi.lastErr = "", piRequiresPaymentMethod, e
		s.emitLocked(evs, "charge.failed", s.renderCharge(ch, nil), o)
		s.emitLocked(evs, "payment_intent.payment_failed", s.renderPI(pi, nil), o)
		out := *e
		out.PaymentIntent = s.renderPI(pi, nil)
		return &out
	}
	ch.status = piSucceeded
	pi.pm, pi.status, pi.lastErr, pi.amountReceived = pm.id, piSucceeded, nil, pi.amount
	if pi.setupFutureUsage != "" && cu != nil && pm.customer == "" {
		pm.used = false
		s.attachLocked(evs, pm, cu, o)
	}
	s.emitLocked(evs, "charge.succeeded", s.renderCharge(ch, nil), o)
	s.emitLocked(evs, "payment_intent.succeeded", s.renderPI(pi, nil), o)
	return nil
}

func (s *Server) retrievePI(c *call) (any, *apiError) {
	if aerr := c.exp.check("payment_method", "customer", "latest_charge"); aerr != nil {
		return nil, aerr
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	id := c.r.PathValue("id")
	pi := s.st.pis[id]
	if pi == nil {
		return nil, noSuch(http.StatusNotFound, "id", "payment_intent", id)
	}
	return s.renderPI(pi, c.exp), nil
}

// Refunds

var refundParams = []string{"payment_intent", "charge", "amount", "metadata[*]", "reason"}

func (s *Server) createRefund(c *call) (any, *apiError) {
	p := c.p
	amount, hasAmount := p.int("amount")
	reason := p.enum("reason", "duplicate", "fraudulent", "requested_by_customer")
	md := p.metadata("metadata")
	if p.err != nil {
		return nil, p.err
	}
	piID, chID := p.str("payment_intent"), p.str("charge")
	switch {
	case piID == "" && chID == "":
		return nil, badParam("", "parameter_missing", "One of the following params should be provided for this request: payment_intent or charge.")
	case piID != "" && chID != "":
		return nil, badParam("", "parameters_exclusive", "You may only specify one of these parameters: payment_intent, charge.")
	case hasAmount && amount < 1:
		return nil, badParam("amount", "parameter_invalid_integer", "This value must be greater than or equal to 1.")
	}
	var evs []*event
	defer func() { s.hooks.enqueue(evs) }()
	s.mu.Lock()
	defer s.mu.Unlock()
	var ch *charge
	if piID != "" {
		pi := s.st.pis[piID]
		if pi == nil {
			return nil, noSuch(http.StatusBadRequest, "payment_intent", "payment_intent", piID)
		}
		if pi.status != piSucceeded {
			return nil, badParam("payment_intent", "payment_intent_unexpected_state",
				"This PaymentIntent (%s) does not have a successful charge to refund.", piID)
		}
		ch = s.st.charges[pi.latestCharge]
	} else if ch = s.st.charges[chID]; ch == nil {
		return nil, noSuch(http.StatusBadRequest, "charge", "charge", chID)
	}
	if ch.status != piSucceeded {
		return nil, badParam("charge", "charge_not_refundable", "Charge %s has no successful payment to refund.", ch.id)
	}
	left := ch.amount - ch.refunded
	if left == 0 {
		return nil, badParam("charge", "charge_already_refunded", "Charge %s has already been refunded.", ch.id)
	}
	if !hasAmount {
		amount = left
	}
	if amount > left {
		return nil, badParam("amount", "amount_too_large",
			"Refund amount (%s) is greater than unrefunded amount on charge (%s)", formatAmount(amount, ch.currency), formatAmount(left, ch.currency))
	}
	ch.refunded += amount
	re := &refund{
		id: newID("re"), created: s.unix(), amount: amount, currency: ch.currency,
		pi: ch.pi, charge: ch.id, reason: reason, metadata: md,
	}
	s.st.refunds[re.id] = re
	s.emitLocked(&evs, "refund.created", s.renderRefund(re, nil), c.origin())
	s.emitLocked(&evs, "charge.refunded", s.renderCharge(ch, nil), c.origin())
	return s.renderRefund(re, c.exp), nil
}

func (s *Server) retrieveRefund(c *call) (any, *apiError) {
	if aerr := c.exp.check("payment_intent", "charge"); aerr != nil {
		return nil, aerr
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	id := c.r.PathValue("id")
	re := s.st.refunds[id]
	if re == nil {
		return nil, noSuch(http.StatusNotFound, "id", "refund", id)
	}
	return s.renderRefund(re, c.exp), nil
}

// Events

func (s *Server) retrieveEvent(c *call) (any, *apiError) {
	s.mu.Lock()
	defer s.mu.Unlock()
	id := c.r.PathValue("id")
	ev := s.st.events[id]
	if ev == nil {
		return nil, noSuch(http.StatusNotFound, "id", "event", id)
	}
	return rawJSON(ev.payload), nil
}

// rawJSON is an already encoded object.
type rawJSON []byte

// MarshalJSON returns r as is.
func (r rawJSON) MarshalJSON() ([]byte, error) { return r, nil }
