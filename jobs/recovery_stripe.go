package jobs

import (
	"context"
	"strconv"
	"strings"

	"github.com/stripe/stripe-go/v82"
)

// The Stripe calls of the recovery flow. Each is made outside any database transaction.

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
// metadata charge_id on the session and its PaymentIntent, and the card saved for later
// off-session charges.
func createRecoverySession(ctx context.Context, d *Deps, s recoveryState, key string) (*stripe.CheckoutSession, error) {
	success, cancel := recoveryURLs(d)
	chargeID := strconv.FormatInt(s.ChargeID, 10)
	params := &stripe.CheckoutSessionCreateParams{
		Mode:       stripe.String(string(stripe.CheckoutSessionModePayment)),
		SuccessURL: stripe.String(success),
		CancelURL:  stripe.String(cancel),
		LineItems: []*stripe.CheckoutSessionCreateLineItemParams{{
			PriceData: &stripe.CheckoutSessionCreateLineItemPriceDataParams{
				Currency:   stripe.String(s.Currency),
				UnitAmount: stripe.Int64(s.Amount),
				ProductData: &stripe.CheckoutSessionCreateLineItemPriceDataProductDataParams{
					Name: stripe.String(s.Description),
				},
			},
			Quantity: stripe.Int64(1),
		}},
		PaymentIntentData: &stripe.CheckoutSessionCreatePaymentIntentDataParams{
			SetupFutureUsage: stripe.String(string(stripe.PaymentIntentSetupFutureUsageOffSession)),
			Metadata:         map[string]string{"charge_id": chargeID},
		},
		Metadata: map[string]string{"charge_id": chargeID},
	}
	if s.StripeCustomerID != "" {
		params.Customer = stripe.String(s.StripeCustomerID)
	}
	params.SetIdempotencyKey(key)
	params.Context = ctx
	return d.Stripe.V1CheckoutSessions.Create(ctx, params)
}

// createRefund refunds a PaymentIntent in full, as a duplicate payment.
func createRefund(ctx context.Context, d *Deps, piID, key string, metadata map[string]string) (*stripe.Refund, error) {
	params := &stripe.RefundCreateParams{
		PaymentIntent: stripe.String(piID),
		Reason:        stripe.String(string(stripe.RefundReasonDuplicate)),
		Metadata:      metadata,
	}
	params.SetIdempotencyKey(key)
	return d.Stripe.V1Refunds.Create(ctx, params)
}

// retrievePaymentIntent reads a PaymentIntent with its payment method expanded.
func retrievePaymentIntent(ctx context.Context, d *Deps, id string) (*stripe.PaymentIntent, error) {
	params := &stripe.PaymentIntentRetrieveParams{}
	params.AddExpand("payment_method")
	return d.Stripe.V1PaymentIntents.Retrieve(ctx, id, params)
}

// attachPaymentMethod attaches a payment method to a Stripe customer.
func attachPaymentMethod(ctx context.Context, d *Deps, pmID, customer string) (*stripe.PaymentMethod, error) {
	params := &stripe.PaymentMethodAttachParams{Customer: stripe.String(customer)}
	return d.Stripe.V1PaymentMethods.Attach(ctx, pmID, params)
}

// retrieveSession reads a Checkout Session with its PaymentIntent and payment method expanded,
// which RecoveryPaidTx uses when the session was paid.
func retrieveSession(ctx context.Context, d *Deps, id string) (*stripe.CheckoutSession, error) {
	params := &stripe.CheckoutSessionRetrieveParams{}
	params.AddExpand("payment_intent.payment_method")
	return d.Stripe.V1CheckoutSessions.Retrieve(ctx, id, params)
}

// expireSession expires an open Checkout Session.
func expireSession(ctx context.Context, d *Deps, id string) (*stripe.CheckoutSession, error) {
	return d.Stripe.V1CheckoutSessions.Expire(ctx, id, &stripe.CheckoutSessionExpireParams{})
}
