package stripefake

// Wire shapes, as the Stripe API (version 2025-08-27.basil) renders them.
// Expandable fields are `any`: nil (null), an id string, or the expanded
// object. Every render function is called with s.mu held.

func nullable(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

func nullableInt(n int64) *int64 {
	if n == 0 {
		return nil
	}
	return &n
}

func nonNil(m map[string]string) map[string]string {
	if m == nil {
		return map[string]string{}
	}
	return m
}

type customerJSON struct {
	ID              string            `json:"id"`
	Object          string            `json:"object"`
	Created         int64             `json:"created"`
	Description     *string           `json:"description"`
	Email           *string           `json:"email"`
	InvoiceSettings invoiceSettings   `json:"invoice_settings"`
	Livemode        bool              `json:"livemode"`
	Metadata        map[string]string `json:"metadata"`
	Name            *string           `json:"name"`
	Phone           *string           `json:"phone"`
}

type invoiceSettings struct {
	DefaultPaymentMethod any `json:"default_payment_method"`
}

func (s *Server) renderCustomer(c *customer, exp expandSet) *customerJSON {
	out := &customerJSON{
		ID: c.id, Object: "customer", Created: c.created,
		Description: nullable(c.description), Email: nullable(c.email),
		Metadata: nonNil(c.metadata), Name: nullable(c.name), Phone: nullable(c.phone),
	}
	out.InvoiceSettings.DefaultPaymentMethod = s.refPM(c.defaultPM, exp, "invoice_settings.default_payment_method")
	return out
}

type paymentMethodJSON struct {
	ID             string            `json:"id"`
	Object         string            `json:"object"`
	AllowRedisplay string            `json:"allow_redisplay"`
	BillingDetails billingDetails    `json:"billing_details"`
	Card           cardJSON          `json:"card"`
	Created        int64             `json:"created"`
	Customer       any               `json:"customer"`
	Livemode       bool              `json:"livemode"`
	Metadata       map[string]string `json:"metadata"`
	Type           string            `json:"type"`
}

type billingDetails struct {
	Address addressJSON `json:"address"`
	Email   *string     `json:"email"`
	Name    *string     `json:"name"`
	Phone   *string     `json:"phone"`
}

type addressJSON struct {
	City       *string `json:"city"`
	Country    *string `json:"country"`
	Line1      *string `json:"line1"`
	Line2      *string `json:"line2"`
	PostalCode *string `json:"postal_code"`
	State      *string `json:"state"`
}

type cardJSON struct {
	Brand             string         `json:"brand"`
	Checks            cardChecks     `json:"checks"`
	Country           string         `json:"country"`
	DisplayBrand      string         `json:"display_brand"`
	ExpMonth          int64          `json:"exp_month"`
	ExpYear           int64          `json:"exp_year"`
	Fingerprint       string         `json:"fingerprint"`
	Funding           string         `json:"funding"`
	GeneratedFrom     any            `json:"generated_from"`
	Last4             string         `json:"last4"`
	Networks          cardNetworks   `json:"networks"`
	RegulatedStatus   string         `json:"regulated_status"`
	ThreeDSecureUsage threeDSecureUs `json:"three_d_secure_usage"`
	Wallet            any            `json:"wallet"`
}

type cardChecks struct {
	AddressLine1Check      *string `json:"address_line1_check"`
	AddressPostalCodeCheck *string `json:"address_postal_code_check"`
	CVCCheck               *string `json:"cvc_check"`
}

type cardNetworks struct {
	Available []string `json:"available"`
	Preferred *string  `json:"preferred"`
}

type threeDSecureUs struct {
	Supported bool `json:"supported"`
}

func (s *Server) renderPM(pm *paymentMethod, exp expandSet) *paymentMethodJSON {
	return &paymentMethodJSON{
		ID: pm.id, Object: "payment_method", AllowRedisplay: "unspecified",
		Card: cardJSON{
			Brand: pm.card.brand, Checks: cardChecks{CVCCheck: nullable("pass")},
			Country: pm.card.country, DisplayBrand: pm.card.brand,
			ExpMonth: pm.expMonth, ExpYear: pm.expYear,
			Fingerprint: pm.card.fingerprint(), Funding: pm.card.funding, Last4: pm.card.last4,
			Networks:          cardNetworks{Available: []string{pm.card.brand}},
			RegulatedStatus:   "unregulated",
			ThreeDSecureUsage: threeDSecureUs{Supported: true},
		},
		Created: pm.created, Customer: s.refCustomer(pm.customer, exp, "customer"),
		Metadata: nonNil(pm.metadata), Type: "card",
	}
}

type paymentIntentJSON struct {
	ID                        string            `json:"id"`
	Object                    string            `json:"object"`
	Amount                    int64             `json:"amount"`
	AmountCapturable          int64             `json:"amount_capturable"`
	AmountReceived            int64             `json:"amount_received"`
	CanceledAt                *int64            `json:"canceled_at"`
	CancellationReason        *string           `json:"cancellation_reason"`
	CaptureMethod             string            `json:"capture_method"`
	ClientSecret              string            `json:"client_secret"`
	ConfirmationMethod        string            `json:"confirmation_method"`
	Created                   int64             `json:"created"`
	Currency                  string            `json:"currency"`
	Customer                  any               `json:"customer"`
	Description               *string           `json:"description"`
	LastPaymentError          *apiError         `json:"last_payment_error"`
	LatestCharge              any               `json:"latest_charge"`
	Livemode                  bool              `json:"livemode"`
	Metadata                  map[string]string `json:"metadata"`
	NextAction                any               `json:"next_action"`
	PaymentMethod             any               `json:"payment_method"`
	PaymentMethodTypes        []string          `json:"payment_method_types"`
	SetupFutureUsage          *string           `json:"setup_future_usage"`
	StatementDescriptorSuffix *string           `json:"statement_descriptor_suffix"`
	Status                    string            `json:"status"`
}

func (s *Server) renderPI(pi *paymentIntent, exp expandSet) *paymentIntentJSON {
	out := &paymentIntentJSON{
		ID: pi.id, Object: "payment_intent", Amount: pi.amount, AmountReceived: pi.amountReceived,
		CanceledAt: nullableInt(pi.canceledAt), CancellationReason: nullable(pi.cancellationReason),
		CaptureMethod: "automatic", ClientSecret: pi.clientSecret, ConfirmationMethod: "automatic",
		Created: pi.created, Currency: pi.currency,
		Customer:           s.refCustomer(pi.customer, exp, "customer"),
		Description:        nullable(pi.description),
		LastPaymentError:   pi.lastErr.withoutIntents(),
		LatestCharge:       s.refCharge(pi.latestCharge, exp, "latest_charge"),
		Metadata:           nonNil(pi.metadata),
		PaymentMethod:      s.refPM(pi.pm, exp, "payment_method"),
		PaymentMethodTypes: pi.pmTypes, SetupFutureUsage: nullable(pi.setupFutureUsage),
		StatementDescriptorSuffix: nullable(pi.descriptorSuffix), Status: pi.status,
	}
	if pi.status == piRequiresAction {
		out.NextAction = map[string]any{"type": "use_stripe_sdk", "use_stripe_sdk": map[string]any{"type": "three_d_secure_redirect"}}
	}
	return out
}

type chargeJSON struct {
	ID             string  `json:"id"`
	Object         string  `json:"object"`
	Amount         int64   `json:"amount"`
	AmountCaptured int64   `json:"amount_captured"`
	AmountRefunded int64   `json:"amount_refunded"`
	Captured       bool    `json:"captured"`
	Created        int64   `json:"created"`
	Currency       string  `json:"currency"`
	Customer       any     `json:"customer"`
	FailureCode    *string `json:"failure_code"`
	FailureMessage *string `json:"failure_message"`
	Livemode       bool    `json:"livemode"`
	Paid           bool    `json:"paid"`
	PaymentIntent  any     `json:"payment_intent"`
	PaymentMethod  *string `json:"payment_method"`
	Refunded       bool    `json:"refunded"`
	Status         string  `json:"status"`
}

func (s *Server) renderCharge(ch *charge, exp expandSet) *chargeJSON {
	out := &chargeJSON{
		ID: ch.id, Object: "charge", Amount: ch.amount, AmountRefunded: ch.refunded,
		Created: ch.created, Currency: ch.currency,
		Customer:      s.refCustomer(ch.customer, exp, "customer"),
		PaymentIntent: nullable(ch.pi), PaymentMethod: nullable(ch.pm),
		Refunded: ch.refunded > 0 && ch.refunded == ch.amount, Status: ch.status,
	}
	if ch.status == piSucceeded {
		out.AmountCaptured, out.Captured, out.Paid = ch.amount, true, true
	}
	if ch.failure != nil {
		out.FailureCode, out.FailureMessage = nullable(ch.failure.code), nullable(ch.failure.message)
	}
	return out
}

type setupIntentJSON struct {
	ID                 string            `json:"id"`
	Object             string            `json:"object"`
	CancellationReason *string           `json:"cancellation_reason"`
	ClientSecret       string            `json:"client_secret"`
	Created            int64             `json:"created"`
	Customer           any               `json:"customer"`
	Description        *string           `json:"description"`
	LastSetupError     *apiError         `json:"last_setup_error"`
	Livemode           bool              `json:"livemode"`
	Metadata           map[string]string `json:"metadata"`
	NextAction         any               `json:"next_action"`
	PaymentMethod      any               `json:"payment_method"`
	PaymentMethodTypes []string          `json:"payment_method_types"`
	Status             string            `json:"status"`
	Usage              string            `json:"usage"`
}

func (s *Server) renderSI(si *setupIntent, exp expandSet) *setupIntentJSON {
	return &setupIntentJSON{
		ID: si.id, Object: "setup_intent", ClientSecret: si.clientSecret, Created: si.created,
		Customer:           s.refCustomer(si.customer, exp, "customer"),
		Description:        nullable(si.description),
		LastSetupError:     si.lastErr.withoutIntents(),
		Metadata:           nonNil(si.metadata),
		PaymentMethod:      s.refPM(si.pm, exp, "payment_method"),
		PaymentMethodTypes: si.pmTypes, Status: si.status, Usage: si.usage,
	}
}

type sessionJSON struct {
	ID                 string             `json:"id"`
	Object             string             `json:"object"`
	AmountSubtotal     *int64             `json:"amount_subtotal"`
	AmountTotal        *int64             `json:"amount_total"`
	CancelURL          *string            `json:"cancel_url"`
	ClientReferenceID  *string            `json:"client_reference_id"`
	Consent            *consentJSON       `json:"consent"`
	ConsentCollection  *consentCollection `json:"consent_collection"`
	Created            int64              `json:"created"`
	Currency           *string            `json:"currency"`
	Customer           any                `json:"customer"`
	CustomerDetails    *customerDetails   `json:"customer_details"`
	CustomerEmail      *string            `json:"customer_email"`
	CustomText         customText         `json:"custom_text"`
	ExpiresAt          int64              `json:"expires_at"`
	Livemode           bool               `json:"livemode"`
	Locale             *string            `json:"locale"`
	Metadata           map[string]string  `json:"metadata"`
	Mode               string             `json:"mode"`
	PaymentIntent      any                `json:"payment_intent"`
	PaymentMethodTypes []string           `json:"payment_method_types"`
	PaymentStatus      string             `json:"payment_status"`
	SetupIntent        any                `json:"setup_intent"`
	Status             string             `json:"status"`
	SuccessURL         *string            `json:"success_url"`
	UIMode             string             `json:"ui_mode"`
	URL                *string            `json:"url"`
}

type consentJSON struct {
	Promotions     *string `json:"promotions"`
	TermsOfService *string `json:"terms_of_service"`
}

type consentCollection struct {
	PaymentMethodReuseAgreement any     `json:"payment_method_reuse_agreement"`
	Promotions                  string  `json:"promotions"`
	TermsOfService              *string `json:"terms_of_service"`
}

type customerDetails struct {
	Email *string `json:"email"`
	Name  *string `json:"name"`
}

type customText struct {
	AfterSubmit              *customTextMsg `json:"after_submit"`
	ShippingAddress          *customTextMsg `json:"shipping_address"`
	Submit                   *customTextMsg `json:"submit"`
	TermsOfServiceAcceptance *customTextMsg `json:"terms_of_service_acceptance"`
}

type customTextMsg struct {
	Message string `json:"message"`
}

func textMsg(s string) *customTextMsg {
	if s == "" {
		return nil
	}
	return &customTextMsg{Message: s}
}

func (s *Server) renderSession(cs *session, exp expandSet) *sessionJSON {
	out := &sessionJSON{
		ID: cs.id, Object: "checkout.session",
		CancelURL: nullable(cs.cancelURL), ClientReferenceID: nullable(cs.clientReferenceID),
		Created: cs.created, Currency: nullable(cs.currency),
		Customer:      s.refCustomer(cs.customer, exp, "customer"),
		CustomerEmail: nullable(cs.customerEmail),
		CustomText: customText{
			Submit:                   textMsg(cs.submitMessage),
			TermsOfServiceAcceptance: textMsg(cs.tosMessage),
		},
		ExpiresAt: cs.expiresAt, Locale: nullable(cs.locale), Metadata: nonNil(cs.metadata),
		Mode: cs.mode, PaymentIntent: s.refPI(cs.pi, exp, "payment_intent"),
		PaymentMethodTypes: cs.pmTypes, PaymentStatus: cs.paymentStatus,
		SetupIntent: s.refSI(cs.si, exp, "setup_intent"),
		Status:      cs.status, SuccessURL: nullable(cs.successURL), UIMode: "hosted",
	}
	if cs.mode == "payment" {
		out.AmountSubtotal, out.AmountTotal = &cs.amountTotal, &cs.amountTotal
	}
	if cs.tosRequired {
		out.ConsentCollection = &consentCollection{Promotions: "none", TermsOfService: nullable("required")}
		if cs.consentAccepted {
			out.Consent = &consentJSON{TermsOfService: nullable("accepted")}
		}
	}
	if cs.status == sessionOpen {
		out.URL = nullable(cs.url)
	}
	if cs.status == sessionComplete {
		email := cs.customerEmail
		if c := s.st.customers[cs.customer]; c != nil && email == "" {
			email = c.email
		}
		out.CustomerDetails = &customerDetails{Email: nullable(email)}
	}
	return out
}

type refundJSON struct {
	ID            string            `json:"id"`
	Object        string            `json:"object"`
	Amount        int64             `json:"amount"`
	Charge        any               `json:"charge"`
	Created       int64             `json:"created"`
	Currency      string            `json:"currency"`
	Metadata      map[string]string `json:"metadata"`
	PaymentIntent any               `json:"payment_intent"`
	Reason        *string           `json:"reason"`
	Status        string            `json:"status"`
}

func (s *Server) renderRefund(r *refund, exp expandSet) *refundJSON {
	return &refundJSON{
		ID: r.id, Object: "refund", Amount: r.amount,
		Charge:  s.refCharge(r.charge, exp, "charge"),
		Created: r.created, Currency: r.currency, Metadata: nonNil(r.metadata),
		PaymentIntent: s.refPI(r.pi, exp, "payment_intent"),
		Reason:        nullable(r.reason), Status: "succeeded",
	}
}

// ref* render an expandable reference: null, the id, or the object when
// field is in exp.

func (s *Server) refCustomer(id string, exp expandSet, field string) any {
	if id == "" {
		return nil
	}
	if c := s.st.customers[id]; exp.has(field) && c != nil {
		return s.renderCustomer(c, exp.sub(field))
	}
	return id
}

func (s *Server) refPM(id string, exp expandSet, field string) any {
	if id == "" {
		return nil
	}
	if pm := s.st.pms[id]; exp.has(field) && pm != nil {
		return s.renderPM(pm, exp.sub(field))
	}
	return id
}

func (s *Server) refPI(id string, exp expandSet, field string) any {
	if id == "" {
		return nil
	}
	if pi := s.st.pis[id]; exp.has(field) && pi != nil {
		return s.renderPI(pi, exp.sub(field))
	}
	return id
}

func (s *Server) refSI(id string, exp expandSet, field string) any {
	if id == "" {
		return nil
	}
	if si := s.st.sis[id]; exp.has(field) && si != nil {
		return s.renderSI(si, exp.sub(field))
	}
	return id
}

func (s *Server) refCharge(id string, exp expandSet, field string) any {
	if id == "" {
		return nil
	}
	if ch := s.st.charges[id]; exp.has(field) && ch != nil {
		return s.renderCharge(ch, exp.sub(field))
	}
	return id
}
