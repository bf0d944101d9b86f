package jobs

import (
	"context"
	"strconv"
	"strings"

	"github.com/stripe/stripe-go/v82"

	"github.com/billingd/billingd/internal/stripeapi"
)

// The Stripe calls of the recovery flow, through internal/stripeapi's request builders. Each
// is made outside any database transaction.

// recoveryURLs returns the success and cancel URLs of recovery sessions: the configured ones,
// or billingd's own thank-you and come-back pages.
func recoveryURLs(d *Deps) (success, cancel string) {
	base := strings.TrimRight(d.Config.PublicURL, "/")
	success, cancel = d.Config.RecoverySuccessURL, d.Config.RecoveryCancelURL
	if success == "" {
		success = base + "/recover/done"
	}
	if cancel == "" {
		cancel = base + "/recover/canceled"
	}
	return success, cancel
}

// createRecoverySession creates a Checkout Session in mode=payment for the amount due: one line
// item with price_data (the charge's currency and amount, its description as product name),
// metadata charge_id and billingd_installation on the session and its PaymentIntent, and the
// card saved for later off-session charges.
func createRecoverySession(ctx context.Context, d *Deps, s recoveryState, installation, key string) (*stripe.CheckoutSession, error) {
	success, cancel := recoveryURLs(d)
	md := map[string]string{
		stripeapi.MetadataChargeID:     strconv.FormatInt(s.ChargeID, 10),
		stripeapi.MetadataInstallation: installation,
	}
	params := stripeapi.RecoverySession(s.StripeCustomerID, s.Amount, s.Currency, s.Description, success, cancel, md, key)
	if s.StripeCustomerID == "" {
		params.Customer = nil // never saved a card with billingd: Checkout asks for everything
	}
	return d.Stripe.V1CheckoutSessions.Create(ctx, params)
}

// createRefund refunds a PaymentIntent in full.
func createRefund(ctx context.Context, d *Deps, piID, key string, metadata map[string]string) (*stripe.Refund, error) {
	return d.Stripe.V1Refunds.Create(ctx, stripeapi.Refund(piID, 0, metadata, key))
}

// retrievePaymentIntent reads a PaymentIntent with its payment method expanded.
func retrievePaymentIntent(ctx context.Context, d *Deps, id string) (*stripe.PaymentIntent, error) {
	return d.Stripe.V1PaymentIntents.Retrieve(ctx, id, stripeapi.PaymentIntentRetrieve())
}

// attachPaymentMethod attaches a payment method to a Stripe customer.
func attachPaymentMethod(ctx context.Context, d *Deps, pmID, customer string) (*stripe.PaymentMethod, error) {
	return d.Stripe.V1PaymentMethods.Attach(ctx, pmID, stripeapi.PaymentMethodAttach(customer))
}

// retrieveSession reads a Checkout Session with its PaymentIntent and payment method expanded,
// which RecoveryPaidTx uses when the session was paid.
func retrieveSession(ctx context.Context, d *Deps, id string) (*stripe.CheckoutSession, error) {
	return d.Stripe.V1CheckoutSessions.Retrieve(ctx, id, stripeapi.SessionRetrieve())
}

// expireSession expires an open Checkout Session.
func expireSession(ctx context.Context, d *Deps, id string) (*stripe.CheckoutSession, error) {
	return d.Stripe.V1CheckoutSessions.Expire(ctx, id, stripeapi.ExpireSession())
}
