package stripefake

import (
	"crypto/sha256"
	"encoding/hex"
	"sort"
)

// testCard is one of Stripe's test payment methods and how it behaves.
type testCard struct {
	brand, last4, funding, country string

	// decline is the error every charge gets; nil charges succeed.
	decline *cardDecline
	// attachFails makes attaching (and setting up) the card fail with decline,
	// as Stripe's card check does for its declining test cards.
	attachFails bool
	// authOffSession makes off-session charges fail with
	// authentication_required; on-session the customer authenticates.
	authOffSession bool
}

// cardDecline is what a declined charge reports.
type cardDecline struct {
	code, declineCode, message, param string
}

func (d *cardDecline) apiError() *apiError {
	return &apiError{
		status:      402,
		Type:        errTypeCard,
		Code:        d.code,
		DeclineCode: d.declineCode,
		DocURL:      docURL(d.code),
		Message:     d.message,
		Param:       d.param,
	}
}

var (
	declineGeneric = &cardDecline{code: "card_declined", declineCode: "generic_decline", message: "Your card was declined."}
	declineFunds   = &cardDecline{code: "card_declined", declineCode: "insufficient_funds", message: "Your card has insufficient funds."}
	declineLost    = &cardDecline{code: "card_declined", declineCode: "lost_card", message: "Your card was declined."}
	declineStolen  = &cardDecline{code: "card_declined", declineCode: "stolen_card", message: "Your card was declined."}
	declineExpired = &cardDecline{code: "expired_card", declineCode: "expired_card", message: "Your card has expired.", param: "exp_month"}
	declineCVC     = &cardDecline{code: "incorrect_cvc", declineCode: "incorrect_cvc", message: "Your card's security code is incorrect.", param: "cvc"}
	declineProc    = &cardDecline{code: "processing_error", declineCode: "processing_error", message: "An error occurred while processing your card. Try again in a little bit."}
	declineAuth    = &cardDecline{code: "authentication_required", declineCode: "authentication_required", message: "Your card was declined. This transaction requires authentication."}
)

// testCards maps Stripe's test PaymentMethod tokens to their behaviour
// (https://docs.stripe.com/testing). The pm_card_visa_* spellings are
// Stripe's aliases.
var testCards = map[string]*testCard{
	"pm_card_visa":                            {brand: "visa", last4: "4242", funding: "credit", country: "US"},
	"pm_card_visa_debit":                      {brand: "visa", last4: "5556", funding: "debit", country: "US"},
	"pm_card_mastercard":                      {brand: "mastercard", last4: "4444", funding: "credit", country: "US"},
	"pm_card_amex":                            {brand: "amex", last4: "8431", funding: "credit", country: "US"},
	"pm_card_chargeDeclined":                  {brand: "visa", last4: "0002", funding: "credit", country: "US", decline: declineGeneric, attachFails: true},
	"pm_card_chargeDeclinedInsufficientFunds": {brand: "visa", last4: "9995", funding: "credit", country: "US", decline: declineFunds, attachFails: true},
	"pm_card_chargeDeclinedLostCard":          {brand: "visa", last4: "9987", funding: "credit", country: "US", decline: declineLost, attachFails: true},
	"pm_card_chargeDeclinedStolenCard":        {brand: "visa", last4: "9979", funding: "credit", country: "US", decline: declineStolen, attachFails: true},
	"pm_card_chargeDeclinedExpiredCard":       {brand: "visa", last4: "0069", funding: "credit", country: "US", decline: declineExpired, attachFails: true},
	"pm_card_chargeDeclinedIncorrectCvc":      {brand: "visa", last4: "0127", funding: "credit", country: "US", decline: declineCVC, attachFails: true},
	"pm_card_chargeDeclinedProcessingError":   {brand: "visa", last4: "0119", funding: "credit", country: "US", decline: declineProc, attachFails: true},
	"pm_card_chargeCustomerFail":              {brand: "visa", last4: "0341", funding: "credit", country: "US", decline: declineGeneric},
	"pm_card_authenticationRequired":          {brand: "visa", last4: "3184", funding: "credit", country: "US", authOffSession: true},
	"pm_card_authenticationRequiredOnSetup":   {brand: "visa", last4: "3155", funding: "credit", country: "US"},
}

func init() {
	for _, alias := range []string{"chargeDeclined", "chargeDeclinedInsufficientFunds",
		"chargeDeclinedLostCard", "chargeDeclinedStolenCard", "chargeDeclinedExpiredCard",
		"chargeDeclinedIncorrectCvc", "chargeDeclinedProcessingError"} {
		testCards["pm_card_visa_"+alias] = testCards["pm_card_"+alias]
	}
}

// TestPaymentMethods returns the Stripe test PaymentMethod tokens stripefake
// knows, sorted. Each can be charged directly, attached to a customer, or
// chosen on a hosted Checkout page.
func TestPaymentMethods() []string {
	out := make([]string, 0, len(testCards))
	for k := range testCards {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// fingerprint is stable per card number, as Stripe's is per account.
func (c *testCard) fingerprint() string {
	sum := sha256.Sum256([]byte(c.brand + c.last4))
	return hex.EncodeToString(sum[:8])
}
