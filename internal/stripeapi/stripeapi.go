// Package stripeapi is billingd's one place for talking to Stripe: the
// client factory and a builder for every request shape billingd sends.
//
// Every builder returns stripe-go v82 params, ready for the matching
// *stripe.Client method (named in its comment). The shapes are checked
// against stripe-mock (Stripe's OpenAPI description) and stripefake by this
// package's conformance test, so a new shape belongs here, with a case in
// that test.
package stripeapi

import (
	"crypto/sha256"
	"encoding/hex"
	"net/http"
	"strings"

	"github.com/stripe/stripe-go/v82"
)

// MetadataChargeID is the metadata key on every PaymentIntent and Checkout
// Session billingd creates for a charge; reconciliation searches by it.
const MetadataChargeID = "charge_id"

// MetadataCustomerRef is the metadata key holding the application's
// customer reference on Stripe customers.
const MetadataCustomerRef = "customer_ref"

// MetadataInstallation is the metadata key holding the installation id
// (billing.installation) on every PaymentIntent, Checkout Session (and the
// SetupIntent or PaymentIntent it makes) and Customer that billingd creates.
// Installations that share a Stripe account ignore each other's objects by
// it.
const MetadataInstallation = "billingd_installation"

// KeyPrefix returns the prefix of every idempotency key that installation
// sends: "billingd-<installation>-". Keys are unique per Stripe account for
// 24 hours, and two installations sharing an account have the same database
// ids, so a key names the installation before the row it is for.
// installation must not be empty.
func KeyPrefix(installation string) string {
	return "billingd-" + installation + "-"
}

// KeyInstallation returns the installation named by an idempotency key made
// with KeyPrefix, or "" for a key made before keys named one (such as
// "billingd-charge-42-attempt-1"), which may still be stored with an
// attempt and replayed.
func KeyInstallation(key string) string {
	rest, ok := strings.CutPrefix(key, "billingd-")
	if !ok || len(rest) < uuidLen+1 || rest[uuidLen] != '-' || !isUUID(rest[:uuidLen]) {
		return ""
	}
	return rest[:uuidLen]
}

// uuidLen is the length of a UUID in its text form, which installation ids take.
const uuidLen = 36

// isUUID reports whether s is a UUID in PostgreSQL's text form (lower-case hex).
func isUUID(s string) bool {
	if len(s) != uuidLen {
		return false
	}
	for i, r := range s {
		switch i {
		case 8, 13, 18, 23:
			if r != '-' {
				return false
			}
		default:
			if (r < '0' || r > '9') && (r < 'a' || r > 'f') {
				return false
			}
		}
	}
	return true
}

// NewClient returns a stripe-go client for secretKey whose API requests go
// to apiBase ("" means Stripe's https://api.stripe.com; a stripefake URL in
// tests and the demo). httpClient nil means stripe-go's default client (80 s
// timeout). maxNetworkRetries bounds stripe-go's own retries, which it makes
// only for connection errors, non-JSON answers and 429 lock_timeout, always
// with the same idempotency key.
//
// The client uses no package-level stripe-go state (stripe.Key,
// stripe.SetBackend), so several clients with different keys and URLs can
// live in one process. stripe-go's own logging is off: callers see every
// failure as a returned error and log it themselves, without secrets.
func NewClient(secretKey, apiBase string, httpClient *http.Client, maxNetworkRetries int64) *stripe.Client {
	cfg := &stripe.BackendConfig{
		HTTPClient:        httpClient,
		MaxNetworkRetries: stripe.Int64(maxNetworkRetries),
		LeveledLogger:     &stripe.LeveledLogger{Level: stripe.LevelNull},
		EnableTelemetry:   stripe.Bool(false),
	}
	api := *cfg
	if apiBase != "" {
		api.URL = stripe.String(strings.TrimSuffix(apiBase, "/"))
	}
	backends := &stripe.Backends{
		API:         stripe.GetBackendWithConfig(stripe.APIBackend, &api),
		Connect:     stripe.GetBackendWithConfig(stripe.ConnectBackend, cfg),
		Uploads:     stripe.GetBackendWithConfig(stripe.UploadsBackend, cfg),
		MeterEvents: stripe.GetBackendWithConfig(stripe.MeterEventsBackend, cfg),
	}
	return stripe.NewClient(secretKey, stripe.WithBackends(backends))
}

// CustomerCreate builds the customer for an application customer of
// installation (client.V1Customers.Create): email, and in metadata ref
// (customer_ref) and installation (billingd_installation). Its idempotency
// key is derived from installation and ref (CustomerKey), so a retried
// onboarding within Stripe's 24-hour key window gets the same customer back
// instead of a duplicate (reusing a ref with another email inside that window
// is an idempotency_error), and another installation's customer of the same
// ref is never returned.
func CustomerCreate(installation, ref, email string) *stripe.CustomerCreateParams {
	p := &stripe.CustomerCreateParams{
		Email:    stripe.String(email),
		Metadata: map[string]string{MetadataCustomerRef: ref, MetadataInstallation: installation},
	}
	p.SetIdempotencyKey(CustomerKey(installation, ref))
	return p
}

// MaxKeyLen is the longest idempotency key Stripe accepts.
const MaxKeyLen = 255

// CustomerKey is the idempotency key of the Stripe Customer of installation's
// customer ref: "billingd-<installation>-customer-create:<ref>". A ref too long
// for that to fit in MaxKeyLen (customer_ref may have 255 characters) is
// replaced by its SHA-256, "...customer-create:sha256:<hex>": the same ref
// still gives the same key.
func CustomerKey(installation, ref string) string {
	k := KeyPrefix(installation) + "customer-create:" + ref
	if len(k) <= MaxKeyLen {
		return k
	}
	sum := sha256.Sum256([]byte(ref))
	return KeyPrefix(installation) + "customer-create:sha256:" + hex.EncodeToString(sum[:])
}

// SetupSession builds a Checkout Session in setup mode that saves a card of
// customerID for later off-session charges (client.V1CheckoutSessions.Create).
// metadata goes on the session and on its SetupIntent. A non-empty termsText
// makes accepting the terms of service required, with termsText shown next
// to the checkbox. It sends no ui_mode: the default hosted page is the one
// with a url.
func SetupSession(customerID, currency, successURL, cancelURL string, metadata map[string]string, termsText string) *stripe.CheckoutSessionCreateParams {
	p := &stripe.CheckoutSessionCreateParams{
		Mode:               stripe.String(string(stripe.CheckoutSessionModeSetup)),
		Customer:           stripe.String(customerID),
		Currency:           stripe.String(strings.ToLower(currency)),
		PaymentMethodTypes: stripe.StringSlice([]string{"card"}),
		SuccessURL:         stripe.String(successURL),
		CancelURL:          stripe.String(cancelURL),
		Metadata:           metadata,
		SetupIntentData:    &stripe.CheckoutSessionCreateSetupIntentDataParams{Metadata: metadata},
	}
	if termsText != "" {
		p.ConsentCollection = &stripe.CheckoutSessionCreateConsentCollectionParams{
			TermsOfService: stripe.String(string(stripe.CheckoutSessionConsentCollectionTermsOfServiceRequired)),
		}
		p.CustomText = &stripe.CheckoutSessionCreateCustomTextParams{
			TermsOfServiceAcceptance: &stripe.CheckoutSessionCreateCustomTextTermsOfServiceAcceptanceParams{
				Message: stripe.String(termsText),
			},
		}
	}
	return p
}

// OffSessionPaymentIntent builds the merchant-initiated charge of a saved
// card (client.V1PaymentIntents.Create): confirm=true, off_session=true,
// card only (so no return_url is needed), with metadata (which carries
// charge_id) and idempotencyKey, which a retry of the same attempt must
// reuse and a new attempt must not. A decline comes back as a *stripe.Error
// with HTTP status 402.
func OffSessionPaymentIntent(customerID, paymentMethodID string, amount int64, currency, description string, metadata map[string]string, idempotencyKey string) *stripe.PaymentIntentCreateParams {
	p := &stripe.PaymentIntentCreateParams{
		Amount:             stripe.Int64(amount),
		Currency:           stripe.String(strings.ToLower(currency)),
		Customer:           stripe.String(customerID),
		PaymentMethod:      stripe.String(paymentMethodID),
		PaymentMethodTypes: stripe.StringSlice([]string{"card"}),
		Confirm:            stripe.Bool(true),
		OffSession:         stripe.Bool(true),
		Metadata:           metadata,
	}
	if description != "" {
		p.Description = stripe.String(description)
	}
	p.SetIdempotencyKey(idempotencyKey)
	return p
}

// RecoverySession builds the Checkout Session in payment mode that lets the
// customer pay a failed charge themselves (client.V1CheckoutSessions.Create):
// one line item of amount in currency named productName, metadata on the
// session and on its PaymentIntent, and the new card saved for future
// off-session charges. Expiry is Stripe's default, 24 hours.
func RecoverySession(customerID string, amount int64, currency, productName, successURL, cancelURL string, metadata map[string]string, idempotencyKey string) *stripe.CheckoutSessionCreateParams {
	cur := strings.ToLower(currency)
	p := &stripe.CheckoutSessionCreateParams{
		Mode:               stripe.String(string(stripe.CheckoutSessionModePayment)),
		Customer:           stripe.String(customerID),
		PaymentMethodTypes: stripe.StringSlice([]string{"card"}),
		SuccessURL:         stripe.String(successURL),
		CancelURL:          stripe.String(cancelURL),
		Metadata:           metadata,
		LineItems: []*stripe.CheckoutSessionCreateLineItemParams{{
			PriceData: &stripe.CheckoutSessionCreateLineItemPriceDataParams{
				Currency:    stripe.String(cur),
				UnitAmount:  stripe.Int64(amount),
				ProductData: &stripe.CheckoutSessionCreateLineItemPriceDataProductDataParams{Name: stripe.String(productName)},
			},
			Quantity: stripe.Int64(1),
		}},
		PaymentIntentData: &stripe.CheckoutSessionCreatePaymentIntentDataParams{
			Metadata:         metadata,
			SetupFutureUsage: stripe.String(string(stripe.PaymentIntentSetupFutureUsageOffSession)),
		},
	}
	p.SetIdempotencyKey(idempotencyKey)
	return p
}

// ExpireSession builds the expiry of an open Checkout Session
// (client.V1CheckoutSessions.Expire), used before a fresh recovery session
// replaces it. Stripe answers 400 if the session is no longer open.
func ExpireSession() *stripe.CheckoutSessionExpireParams {
	return &stripe.CheckoutSessionExpireParams{}
}

// PaymentMethodAttach builds the attachment of a saved card to customerID
// (client.V1PaymentMethods.Attach). Attaching a card already attached to
// that customer succeeds again.
func PaymentMethodAttach(customerID string) *stripe.PaymentMethodAttachParams {
	return &stripe.PaymentMethodAttachParams{Customer: stripe.String(customerID)}
}

// SetupIntentRetrieve builds the read of a completed setup's SetupIntent
// with its payment_method expanded (client.V1SetupIntents.Retrieve), so card
// brand, last4 and expiry come in the same answer.
func SetupIntentRetrieve() *stripe.SetupIntentRetrieveParams {
	p := &stripe.SetupIntentRetrieveParams{}
	p.AddExpand("payment_method")
	return p
}

// PaymentIntentSearchByCharge builds the search for the PaymentIntents of
// one charge of installation by metadata charge_id and billingd_installation
// (client.V1PaymentIntents.Search), newest first. Another installation
// sharing the Stripe account has its own charge of the same id: its
// PaymentIntents carry its own installation and are not found. installation
// "" searches by charge_id alone, for attempts made before PaymentIntents
// carried an installation; the caller must then skip the results that carry
// one. Stripe's search index lags writes by up to a minute, so an empty
// answer right after a lost request does not prove that nothing was charged.
func PaymentIntentSearchByCharge(installation, chargeID string) *stripe.PaymentIntentSearchParams {
	p := &stripe.PaymentIntentSearchParams{}
	p.Query = "metadata['" + MetadataChargeID + "']:'" + escapeSearch(chargeID) + "'"
	if installation != "" {
		p.Query += " AND metadata['" + MetadataInstallation + "']:'" + escapeSearch(installation) + "'"
	}
	return p
}

// escapeSearch escapes a value for a single-quoted search string.
func escapeSearch(v string) string {
	return strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(v)
}

// Refund builds a refund of paymentIntentID (client.V1Refunds.Create): amount
// in the minor unit, or 0 for everything not yet refunded, with metadata and
// idempotencyKey.
func Refund(paymentIntentID string, amount int64, metadata map[string]string, idempotencyKey string) *stripe.RefundCreateParams {
	p := &stripe.RefundCreateParams{
		PaymentIntent: stripe.String(paymentIntentID),
		Metadata:      metadata,
	}
	if amount > 0 {
		p.Amount = stripe.Int64(amount)
	}
	p.SetIdempotencyKey(idempotencyKey)
	return p
}

// SessionRetrieve builds the read of a Checkout Session with its
// PaymentIntent and that PaymentIntent's payment method expanded
// (client.V1CheckoutSessions.Retrieve): a paid recovery session then carries
// the card that paid, for recording it without another call.
func SessionRetrieve() *stripe.CheckoutSessionRetrieveParams {
	p := &stripe.CheckoutSessionRetrieveParams{}
	p.AddExpand("payment_intent.payment_method")
	return p
}

// PaymentIntentRetrieve builds the read of a PaymentIntent with its payment
// method expanded (client.V1PaymentIntents.Retrieve), so card brand, last4,
// expiry and the customer it is attached to come in the same answer.
func PaymentIntentRetrieve() *stripe.PaymentIntentRetrieveParams {
	p := &stripe.PaymentIntentRetrieveParams{}
	p.AddExpand("payment_method")
	return p
}
