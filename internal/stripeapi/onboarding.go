package stripeapi

import (
	"maps"
	"strconv"

	"github.com/stripe/stripe-go/v82"
)

// ExtraCustomerAccount is the parameter that names a customer modelled as an Accounts v2
// customer-configured Account (acct_...) instead of a Customer (cus_...). stripe-go v82 has no
// field for it, so it is sent with AddExtra.
const ExtraCustomerAccount = "customer_account"

// SetupSessionKey is the idempotency key of the Checkout Session of installation's setup session
// id, "billingd-<installation>-setup-session:<id>": a retried start_setup job gets the same session
// back, a new setup session gets a new one.
func SetupSessionKey(installation string, setupSessionID int64) string {
	return KeyPrefix(installation) + "setup-session:" + strconv.FormatInt(setupSessionID, 10)
}

// OnboardingSession is SetupSession for installation's setup session setupSessionID, with its
// idempotency key (SetupSessionKey) and metadata billingd_installation added to metadata (on the
// session and its SetupIntent; metadata itself is not changed).
func OnboardingSession(installation string, setupSessionID int64, customerID, currency, successURL, cancelURL string, metadata map[string]string, termsText string) *stripe.CheckoutSessionCreateParams {
	md := maps.Clone(metadata)
	if md == nil {
		md = map[string]string{}
	}
	md[MetadataInstallation] = installation
	p := SetupSession(customerID, currency, successURL, cancelURL, md, termsText)
	p.SetIdempotencyKey(SetupSessionKey(installation, setupSessionID))
	return p
}

// OnboardingSessionForAccount is OnboardingSession for a customer modelled as an Accounts v2
// customer-configured Account: customer_account instead of customer. Preview: stripefake does not
// model it; the shape is checked against stripe-mock only.
func OnboardingSessionForAccount(installation string, setupSessionID int64, accountID, currency, successURL, cancelURL string, metadata map[string]string, termsText string) *stripe.CheckoutSessionCreateParams {
	p := OnboardingSession(installation, setupSessionID, "", currency, successURL, cancelURL, metadata, termsText)
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
