package stripeapi

import (
	"strconv"

	"github.com/stripe/stripe-go/v82"
)

// ExtraCustomerAccount is the parameter that names a customer modelled as an Accounts v2
// customer-configured Account (acct_...) instead of a Customer (cus_...). stripe-go v82 has no
// field for it, so it is sent with AddExtra.
const ExtraCustomerAccount = "customer_account"

// SetupSessionKey is the idempotency key of the Checkout Session of billingd's setup session id:
// a retried start_setup job gets the same session back, a new setup session gets a new one.
func SetupSessionKey(setupSessionID int64) string {
	return "setup-session:" + strconv.FormatInt(setupSessionID, 10)
}

// OnboardingSession is SetupSession for billingd's setup session setupSessionID, with its
// idempotency key (SetupSessionKey).
func OnboardingSession(setupSessionID int64, customerID, currency, successURL, cancelURL string, metadata map[string]string, termsText string) *stripe.CheckoutSessionCreateParams {
	p := SetupSession(customerID, currency, successURL, cancelURL, metadata, termsText)
	p.SetIdempotencyKey(SetupSessionKey(setupSessionID))
	return p
}

// OnboardingSessionForAccount is OnboardingSession for a customer modelled as an Accounts v2
// customer-configured Account: customer_account instead of customer. Preview: stripefake does not
// model it; the shape is checked against stripe-mock only.
func OnboardingSessionForAccount(setupSessionID int64, accountID, currency, successURL, cancelURL string, metadata map[string]string, termsText string) *stripe.CheckoutSessionCreateParams {
	p := OnboardingSession(setupSessionID, "", currency, successURL, cancelURL, metadata, termsText)
	p.Customer = nil
	p.AddExtra(ExtraCustomerAccount, accountID)
	return p
}

// PaymentMethodAttachToAccount is PaymentMethodAttach for a customer modelled as an Accounts v2
// customer-configured Account (customer_account). Preview, like OnboardingSessionForAccount.
func PaymentMethodAttachToAccount(accountID string) *stripe.PaymentMethodAttachParams {
	p := &stripe.PaymentMethodAttachParams{}
	p.AddExtra(ExtraCustomerAccount, accountID)
	return p
}
